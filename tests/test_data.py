"""Datasets: Fashion-MNIST from the Debian files, the validation split, augmentation, lookup, errors."""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import s2d.data
from s2d.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, Batches, Split, load_dataset
from s2d.errors import DatasetNotFoundError, S2DError, UnknownNameError


def _row_keys(split: Split) -> Counter:
    """Multiset of (image bytes, label) hashes."""
    imgs = split.images.reshape(len(split), -1).numpy()
    return Counter(
        hashlib.blake2b(row.tobytes() + bytes([int(y)]), digest_size=12).digest()
        for row, y in zip(imgs, split.labels.tolist(), strict=True)
    )


def _raw_train() -> Split:
    """The 60000 original training images straight from the Debian files (IDX: 16/8-byte headers)."""
    images = np.frombuffer(gzip.decompress((DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").read_bytes())[16:],
                           dtype=np.uint8).reshape(-1, 1, 28, 28)
    labels = np.frombuffer(gzip.decompress((DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz").read_bytes())[8:],
                           dtype=np.uint8)
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


# --- Fashion-MNIST from the Debian package ------------------------------------------------------

def test_fashion_mnist_shapes_and_info(fmnist):
    assert (len(fmnist.train), len(fmnist.val), len(fmnist.test)) == (55000, 5000, 10000)
    for split in (fmnist.train, fmnist.val, fmnist.test):
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
        assert split.labels.dtype == torch.int64
        assert split.labels.min().item() == 0 and split.labels.max().item() == 9
    info = fmnist.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("fashion-mnist", 10, 1, 28)
    assert info.crop_padding == 2
    # Real pixels, not zeros: the mean of Fashion-MNIST is ~0.286.
    assert 0.27 < fmnist.test.images.float().mean().item() / 255 < 0.30


def test_fashion_mnist_label_counts(fmnist):
    assert torch.bincount(fmnist.test.labels, minlength=10).tolist() == [1000] * 10
    # train + val is the original training set: exactly 6000 per class.
    both = torch.bincount(fmnist.train.labels, minlength=10) + torch.bincount(fmnist.val.labels, minlength=10)
    assert both.tolist() == [6000] * 10
    # A random 5000-image validation split is roughly balanced (500 expected per class).
    assert all(400 < c < 600 for c in torch.bincount(fmnist.val.labels, minlength=10).tolist())


def test_split_is_a_partition_of_the_original_training_set(fmnist):
    original = _raw_train()
    assert len(original) == 60000
    train_keys, val_keys = _row_keys(fmnist.train), _row_keys(fmnist.val)
    # Multiset equality: every original (image, label) lands in exactly one of train/val.
    assert train_keys + val_keys == _row_keys(original)
    # No image is shared between the two, except exact duplicates the original already holds twice.
    shared = set(train_keys) & set(val_keys)
    duplicated_in_original = {k for k, c in _row_keys(original).items() if c > 1}
    assert shared <= duplicated_in_original


def test_split_is_deterministic_and_seeded(fmnist):
    again = load_dataset("fashion-mnist", split_seed=0)
    assert torch.equal(again.val.images, fmnist.val.images)
    assert torch.equal(again.val.labels, fmnist.val.labels)
    other = load_dataset("fashion-mnist", split_seed=1)
    assert other.split_seed == 1
    assert not torch.equal(other.val.images, fmnist.val.images)
    # Different seeds pick mostly different validation images (random overlap is ~5000/60000).
    overlap = len(set(_row_keys(other.val)) & set(_row_keys(fmnist.val)))
    assert overlap < 1000
    small = load_dataset("fashion-mnist", val_size=500, split_seed=0)
    assert (len(small.train), len(small.val), small.val_size) == (59500, 500, 500)


def test_default_val_size_scales_with_the_dataset():
    from s2d.data import default_val_size

    assert default_val_size(60000) == 5000  # capped
    assert default_val_size(6000) == 600  # 10 %, not 83 % of a small dataset
    assert default_val_size(5) == 1


def test_default_split_of_a_small_dataset_keeps_most_images_for_training(isolated):
    _write_idx(isolated / "debian", 300, 10, seed=0)
    d = load_dataset("fashion-mnist")
    assert (len(d.train), len(d.val), d.val_size) == (270, 30, 30)


@pytest.mark.parametrize("val_size", [0, 60000, 59500])
def test_bad_val_size_is_one_line_error(val_size):
    with pytest.raises(S2DError) as e:
        load_dataset("fashion-mnist", val_size=val_size)
    assert "--val-size" in str(e.value) and "\n" not in str(e.value)


# --- Batches ----------------------------------------------------------------------------------------

def test_batches_normalise_to_unit_statistics(fmnist):
    x, _ = next(iter(Batches(fmnist.train.subset(20000), fmnist.info, batch_size=20000)))
    assert abs(x.mean().item()) < 0.02
    assert abs(x.std().item() - 1) < 0.02


def test_batches_cover_the_split_once_per_epoch(fmnist):
    split = fmnist.val.subset(1000)
    batches = Batches(split, fmnist.info, batch_size=96, shuffle=True, seed=3)
    assert len(batches) == 11  # ceil(1000 / 96)
    ys = torch.cat([y for _, y in batches])
    assert len(ys) == 1000
    assert not torch.equal(ys, split.labels)  # shuffled
    assert torch.equal(ys.sort().values, split.labels.sort().values)


def test_augmentation_keeps_shapes_and_is_seeded(fmnist):
    split = fmnist.val.subset(64)
    plain_x, plain_y = next(iter(Batches(split, fmnist.info, 64)))
    a1, y1 = next(iter(Batches(split, fmnist.info, 64, augment=True, seed=7)))
    a2, _ = next(iter(Batches(split, fmnist.info, 64, augment=True, seed=7)))
    a3, _ = next(iter(Batches(split, fmnist.info, 64, augment=True, seed=8)))
    assert a1.shape == plain_x.shape == (64, 1, 28, 28) and a1.dtype == torch.float32
    assert torch.equal(y1, plain_y)  # labels unchanged, order unchanged without shuffle
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, a3)
    assert not torch.equal(a1, plain_x)


def test_augmentation_is_a_padded_crop_or_its_mirror(fmnist):
    split = fmnist.val.subset(16)
    x, _ = next(iter(Batches(split, fmnist.info, 16)))
    aug, _ = next(iter(Batches(split, fmnist.info, 16, augment=True, seed=1)))
    p = fmnist.info.crop_padding
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    flips = 0
    for i in range(16):
        crops = [(dy, dx, padded[i, :, dy:dy + 28, dx:dx + 28]) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
        matches = [(dy, dx, flip) for dy, dx, c in crops for flip in (False, True)
                   if torch.equal(aug[i], c.flip(-1) if flip else c)]
        assert matches, f"augmented image {i} is not a shifted/flipped crop of the original"
        flips += all(f for _, _, f in matches)
    assert 0 < flips < 16  # both flipped and unflipped images occur


# --- where the data comes from ------------------------------------------------------------------

def _write_idx(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    """Tiny gzipped IDX files in the Debian package's layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(folder / f"{name}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{name}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No Debian package, no $S2D_DATA, an empty cache."""
    monkeypatch.setattr(s2d.data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.delenv("S2D_DATA", raising=False)
    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_missing_fashion_mnist_names_tried_paths_and_fix(isolated, monkeypatch):
    (isolated / "env").mkdir()
    monkeypatch.setenv("S2D_DATA", str(isolated / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert "\n" not in msg
    for tried in ("env", "debian"):
        assert str(isolated / tried) in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_explicit_data_dir_is_used_or_rejected_never_replaced(isolated, monkeypatch):
    """A --data-dir the user typed that lacks the files is an error, even when $S2D_DATA and the
    Debian path hold the dataset."""
    _write_idx(isolated / "debian", 30, 10, seed=0)
    _write_idx(isolated / "env", 40, 10, seed=1)
    monkeypatch.setenv("S2D_DATA", str(isolated / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", data_dir=str(isolated / "nonexistent"), val_size=5)
    msg = str(e.value)
    assert "\n" not in msg and str(isolated / "nonexistent") in msg and "train-images-idx3-ubyte" in msg
    assert str(isolated / "env") not in msg


def test_lookup_order_data_dir_then_env_then_debian(isolated, monkeypatch):
    _write_idx(isolated / "debian", 30, 10, seed=0)
    _write_idx(isolated / "env", 40, 10, seed=1)
    _write_idx(isolated / "flag", 50, 10, seed=2)

    def n_train(**kw) -> int:
        d = load_dataset("fashion-mnist", val_size=5, **kw)
        return len(d.train) + len(d.val)

    assert n_train() == 30  # only the Debian path
    monkeypatch.setenv("S2D_DATA", str(isolated / "env"))
    assert n_train() == 40  # $S2D_DATA before Debian
    assert n_train(data_dir=str(isolated / "flag")) == 50  # --data-dir before both
    monkeypatch.delenv("S2D_DATA")
    assert n_train() == 30  # the cache never serves another source's files


def test_torchvision_layout_and_raw_files_are_found(isolated):
    raw = isolated / "tv" / "FashionMNIST" / "raw"
    _write_idx(raw, 20, 10, seed=3)
    for f in FASHION_MNIST_FILES:  # un-gzipped, as torchvision leaves them
        (raw / f).write_bytes(gzip.decompress((raw / f"{f}.gz").read_bytes()))
        (raw / f"{f}.gz").unlink()
    d = load_dataset("fashion-mnist", data_dir=str(isolated / "tv"), val_size=4)
    assert (len(d.train), len(d.val), len(d.test)) == (16, 4, 10)
    assert d.test.labels.tolist() == [i % 10 for i in range(10)]


# --- other datasets -----------------------------------------------------------------------------------

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def _png_folder(root: Path, per_class: int) -> None:
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (20 + i, 30) if i % 2 else (40, 24)  # mixed sizes are resized on load
            Image.new("RGB", size, rgb).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")


def test_imagefolder_single_folder(tmp_path):
    _png_folder(tmp_path / "pics", per_class=6)
    d = load_dataset(f"imagefolder:{tmp_path / 'pics'}", image_size=16, val_size=3)
    assert (d.info.num_classes, d.info.in_channels, d.info.image_size) == (3, 3, 16)
    assert len(d.train) + len(d.val) + len(d.test) == 18
    assert len(d.test) == 2  # 15 % held out for test
    assert len(d.val) == 3
    for split in (d.train, d.val, d.test):
        assert tuple(split.images.shape[1:]) == (3, 16, 16) and split.images.dtype == torch.uint8
        # Class order is the sorted folder names: blue=0, green=1, red=2; each image is its class's colour.
        dominant = split.images.float().mean(dim=(2, 3)).argmax(1)
        assert torch.equal(dominant, torch.tensor([2, 1, 0])[split.labels])
    x, _ = next(iter(Batches(d.train, d.info, 8, augment=True)))
    assert x.shape == (8, 3, 16, 16)


def test_imagefolder_with_train_and_test(tmp_path):
    _png_folder(tmp_path / "ds" / "train", per_class=4)
    _png_folder(tmp_path / "ds" / "test", per_class=2)
    d = load_dataset(f"imagefolder:{tmp_path / 'ds'}", image_size=8, val_size=2)
    assert (len(d.train), len(d.val), len(d.test)) == (10, 2, 6)
    assert d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_errors_are_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    assert "not a directory" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="at least two class"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}")
    _png_folder(tmp_path / "bad", per_class=2)
    (tmp_path / "bad" / "red" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(f"imagefolder:{tmp_path / 'bad'}", image_size=8, val_size=1)
    assert "broken.png" in str(e.value) and "\n" not in str(e.value)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("mnist")
    msg = str(e.value)
    assert "'mnist'" in msg and "\n" not in msg
    for name in ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH"):
        assert name in msg


def test_cifar_missing_offline_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(tmp_path) in str(e.value) and "--download" in str(e.value) and "\n" not in str(e.value)
