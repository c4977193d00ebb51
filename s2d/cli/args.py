"""Argument helpers shared by every command group: one definition of each common flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from s2d.errors import S2DError

DEFAULT_MODEL = "resnet20"
DEFAULT_DATASET = "fashion-mnist"


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number in a range; the error names the range."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {left}{lo}, {hi}{right}, got {s}")
        return v

    return parse


def check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise S2DError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise S2DError(f"--device {device} asked for but CUDA is not available here; use --device cpu")
    return device


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="fashion-mnist (default), cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", help="where the dataset lives (default: $S2D_DATA, then the Debian package)")
    p.add_argument("--download", action="store_true", help="download cifar/fashion-mnist when online")
    p.add_argument("--val-size", type=positive_int,
                   help="validation images carved from train (default: 10 %% of it, at most 5000)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: all cores)")


def add_model_args(p: argparse.ArgumentParser, *, weights_default: str | None = "zoo") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name, e.g. resnet20, mobilenetv2, torchvision:resnet18, timm:efficientnet_b0")
    p.add_argument("--weights", default=weights_default,
                   help="'zoo' (the model zoo's checkpoint for this dataset), a checkpoint path, "
                        "a torchvision weights name, or 'none' for random init")


def load_data(args: argparse.Namespace):
    from s2d.data import load_dataset

    return load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                        val_size=args.val_size, split_seed=args.split_seed)


def load_data_and_model(args: argparse.Namespace):
    """(dataset, model) for commands that evaluate a pretrained model."""
    from s2d.models.zoo import load_model

    data = load_data(args)
    return data, load_model(args.model, data.info, args.weights)
