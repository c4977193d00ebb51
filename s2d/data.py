"""Datasets, held in memory as uint8 tensors.

Fashion-MNIST and CIFAR fit in memory; augmenting batches of tensors is ~30x faster
than a DataLoader with PIL transforms on this CPU (see shared/design.md), so every
dataset is loaded once into ``uint8`` tensors and batches are augmented in torch.

The validation split is carved from the training set with a seeded permutation;
search and threshold calibration only ever see ``val``, reports use ``test``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from s2d.errors import DatasetNotFoundError, S2DError, UnknownNameError
from s2d.runs import cache_dir

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its input."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether horizontal flips keep the label
    crop_padding: int = 2


@dataclass
class Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> Split:
        """The first ``n`` samples (all when ``n`` is None); for quick runs and tests."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])


@dataclass
class Dataset:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    split_seed: int
    val_size: int

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise UnknownNameError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def _fashion_mnist_candidates(data_dir: str | None) -> list[Path]:
    """Where to look: an explicit ``--data-dir`` only (a path the user typed is used or rejected,
    never replaced); otherwise ``$S2D_DATA``, then the Debian package."""
    if data_dir:
        return [Path(data_dir)]
    paths = []
    if os.environ.get("S2D_DATA"):
        paths.append(Path(os.environ["S2D_DATA"]))
    paths.append(DEBIAN_FASHION_MNIST)
    return paths


def _find_idx_dir(root: Path) -> Path | None:
    """A folder holding the four IDX files (raw or .gz), at root or in torchvision's layout."""
    for cand in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        if all((cand / f).exists() or (cand / f"{f}.gz").exists() for f in FASHION_MNIST_FILES):
            return cand
    return None


def _load_fashion_mnist(data_dir: str | None, download: bool) -> tuple[Split, Split]:
    from torchvision.datasets import FashionMNIST

    tried = _fashion_mnist_candidates(data_dir)
    source = next((d for p in tried if (d := _find_idx_dir(p)) is not None), None)
    if source is None and data_dir and not download:
        raise DatasetNotFoundError(
            f"--data-dir {data_dir} does not hold fashion-mnist (looked for {', '.join(FASHION_MNIST_FILES)}"
            "[.gz] there and in FashionMNIST/raw); fix the path, or leave --data-dir out to use $S2D_DATA "
            "or the Debian package"
        )
    if source is None:
        if download:
            root = Path(data_dir) if data_dir else cache_dir()
            try:
                train = FashionMNIST(str(root), train=True, download=True)
                test = FashionMNIST(str(root), train=False, download=True)
            except Exception as e:  # network errors come in many types
                raise DatasetNotFoundError(
                    f"fashion-mnist download failed ({type(e).__name__}: {e}); "
                    "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir"
                ) from None
            return _to_split(train), _to_split(test)
        raise DatasetNotFoundError(
            "fashion-mnist not found (tried "
            + ", ".join(str(p) for p in tried)
            + "); fix: `apt-get update && apt-get install -y dataset-fashion-mnist`, "
            "or pass --data-dir DIR / set S2D_DATA, or add --download when online"
        )
    # torchvision's reader wants the raw (un-gzipped) files under <root>/FashionMNIST/raw.
    # The cache is keyed by the source folder, so another --data-dir never reads stale files.
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    root = cache_dir() / "fashion-mnist" / key
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in FASHION_MNIST_FILES:
        dst = raw / f
        if dst.exists():
            continue
        src = source / f
        # A private temp name: two processes filling the cache at once never share a file.
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{f}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fout:
                if src.exists():
                    with open(src, "rb") as fin:
                        shutil.copyfileobj(fin, fout)
                else:
                    with gzip.open(source / f"{f}.gz", "rb") as fin:
                        shutil.copyfileobj(fin, fout)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    try:
        train = FashionMNIST(str(root), train=True)
        test = FashionMNIST(str(root), train=False)
    except Exception as e:
        raise DatasetNotFoundError(
            f"fashion-mnist files in {source} could not be read ({e}); "
            f"delete {raw} and reinstall `dataset-fashion-mnist`"
        ) from None
    return _to_split(train), _to_split(test)


def _to_split(ds) -> Split:
    data = torch.as_tensor(np.asarray(ds.data))
    if data.ndim == 3:  # (N, H, W) grayscale
        data = data.unsqueeze(1)
    else:  # (N, H, W, C) colour
        data = data.permute(0, 3, 1, 2)
    return Split(data.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))


def _load_cifar(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root = Path(data_dir or os.environ.get("S2D_DATA") or cache_dir() / name)
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError:
        raise DatasetNotFoundError(
            f"{name} not found in {root}; pass --download (needs network) "
            "or --data-dir pointing at the extracted torchvision folder"
        ) from None
    except Exception as e:
        raise DatasetNotFoundError(
            f"{name} download failed ({type(e).__name__}); you look offline: "
            f"copy the dataset to {root} or pass --data-dir"
        ) from None
    return _to_split(train), _to_split(test)


def _load_folder_split(path: Path, classes: list[str], image_size: int) -> Split:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    images, labels = [], []
    for label, cls in enumerate(classes):
        if not (path / cls).is_dir():
            raise DatasetNotFoundError(f"imagefolder {path} has no class folder {cls!r} (found in the train folder)")
        for f in sorted((path / cls).iterdir()):
            if not f.is_file() or not f.name.lower().endswith(IMG_EXTENSIONS):
                continue  # e.g. README.txt, .DS_Store
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((image_size, image_size))
                    images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
            except OSError as e:
                raise DatasetNotFoundError(f"imagefolder image {f} cannot be read ({type(e).__name__}); "
                                           "remove or replace it") from None
            labels.append(label)
    if not images:
        raise DatasetNotFoundError(f"imagefolder {path} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _load_imagefolder(path: Path, image_size: int, seed: int) -> tuple[Split, Split, list[str]]:
    """``PATH/train`` and ``PATH/test`` when both exist, else one folder split 85/15."""
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder {path} is not a directory; pass imagefolder:PATH with one "
            "sub-folder per class (or PATH/train and PATH/test)"
        )
    has_splits = (path / "train").is_dir() and (path / "test").is_dir()
    train_root = path / "train" if has_splits else path
    classes = sorted(d.name for d in train_root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise DatasetNotFoundError(f"imagefolder {train_root} needs at least two class sub-folders")
    if has_splits:
        return (
            _load_folder_split(train_root, classes, image_size),
            _load_folder_split(path / "test", classes, image_size),
            classes,
        )
    full = _load_folder_split(train_root, classes, image_size)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed + 1))
    n_test = max(1, int(0.15 * len(full)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return (
        Split(full.images[train_idx], full.labels[train_idx]),
        Split(full.images[test_idx], full.labels[test_idx]),
        classes,
    )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[:10000].float() / 255
    return (
        tuple(round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist()),
        tuple(round(v, 4) for v in x.std(dim=(0, 2, 3)).tolist()),
    )


VAL_FRACTION = 0.1  # default validation split: 10 % of the training images ...
VAL_CAP = 5000  # ... at most this many
MIN_TRAIN = 1000  # fewer training images than this left after the split is refused


def default_val_size(train_images: int) -> int:
    """10 % of the training images, at most 5000: a fixed 5000 would take 83 % of a 6000-image dataset."""
    return max(1, min(VAL_CAP, round(VAL_FRACTION * train_images)))


def load_dataset(
    name: str = "fashion-mnist",
    *,
    data_dir: str | None = None,
    download: bool = False,
    val_size: int | None = None,
    split_seed: int = 0,
    image_size: int = 32,
) -> Dataset:
    """Load a dataset by name with a deterministic train/val split.

    ``val_size`` None takes :func:`default_val_size`. ``image_size`` only applies to
    ``imagefolder:`` data, which is resized on load.
    """
    if name == "fashion-mnist":
        train, test = _load_fashion_mnist(data_dir, download)
        info = DatasetInfo(name, 10, 1, 28, (0.2860,), (0.3530,), hflip=True)
    elif name in ("cifar10", "cifar100"):
        train, test = _load_cifar(name, data_dir, download)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        if name == "cifar100":
            mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        info = DatasetInfo(name, 10 if name == "cifar10" else 100, 3, 32, mean, std, hflip=True, crop_padding=4)
    elif name.startswith("imagefolder:"):
        train, test, classes = _load_imagefolder(Path(name.split(":", 1)[1]), image_size, split_seed)
        mean, std = _channel_stats(train.images)
        info = DatasetInfo(name, len(classes), 3, image_size, mean, std, hflip=True, crop_padding=image_size // 8)
    else:
        raise UnknownNameError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    if val_size is None:
        val_size = default_val_size(len(train))
    left = len(train) - val_size
    if val_size < 1 or left < min(MIN_TRAIN, len(train) // 2):
        raise DatasetNotFoundError(
            f"--val-size {val_size} leaves {max(left, 0)} of {name}'s {len(train)} training images to train on; "
            f"pass a smaller --val-size (default: {default_val_size(len(train))})"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    return Dataset(
        info=info,
        train=Split(train.images[train_idx], train.labels[train_idx]),
        val=Split(train.images[val_idx], train.labels[val_idx]),
        test=test,
        split_seed=split_seed,
        val_size=val_size,
    )


def default_calib_size(val_size: int) -> int:
    """60 % of the held-out images (3000 of Fashion-MNIST's 5000): the tolerance's bound needs about
    1100 images to certify anything within 0.5 points at 90 % confidence and 2800 within 0.2
    (``measure.guarantee.min_calibration_images``), while the search ranks archs well on 2000."""
    return val_size * 3 // 5


def calibration_split(val: Split, calib_size: int, seed: int = 0) -> tuple[Split, Split]:
    """(search validation, calibration): disjoint random parts of the held-out images, drawn with ``seed``.

    The static model never trained on either; the search and the fine-tune read only the first, the
    chosen network's thresholds are certified on the second. A conversion's seed draws its own
    partition, so repeating it over seeds repeats the calibration split's randomness too."""
    if not 0 < calib_size < len(val):
        raise S2DError(f"--calib-size {calib_size} must leave images on both sides of the "
                       f"{len(val)} held-out validation images; pass a size between 1 and {len(val) - 1}")
    perm = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))
    search, calib = perm[: len(val) - calib_size].sort().values, perm[len(val) - calib_size:].sort().values
    return Split(val.images[search], val.labels[search]), Split(val.images[calib], val.labels[calib])


class Batches:
    """Iterates (normalised images, labels) batches of an in-memory split.

    ``augment`` applies random crop with padding and (where the dataset allows)
    horizontal flips, vectorised over the batch. With ``shard=(rank, ranks)`` a
    data-parallel rank gets its rows of each global batch.
    """

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.split, self.info, self.batch_size = split, info, batch_size
        self.shard = shard  # (rank, ranks): yield rows rank, rank + ranks, ... of every global batch
        self.shuffle, self.augment, self.device = shuffle, augment, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        c = len(info.mean)
        self._mean = torch.tensor(info.mean, device=self.device).view(1, c, 1, 1)
        self._std = torch.tensor(info.std, device=self.device).view(1, c, 1, 1)

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device, torch.float32) / 255 - self._mean) / self._std

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.info.crop_padding
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        rows = (oy[:, None] + torch.arange(h)).to(x.device)
        cols = (ox[:, None] + torch.arange(w)).to(x.device)
        if self.info.hflip:
            flip = torch.rand(n, generator=self.generator) < 0.5
            cols = torch.where(flip[:, None].to(x.device), cols.flip(1), cols)
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            x = self.normalise(self.split.images[idx])
            if self.augment:  # the whole global batch, so every rank's rows are what one process would see
                x = self._augment(x)
            y = self.split.labels[idx].to(self.device)
            rank, ranks = self.shard
            yield (x, y) if ranks == 1 else (x[rank::ranks], y[rank::ranks])
