"""Accuracy and wall-clock speed of a model on this machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from s2d.data import Batches, DatasetInfo, Split

if TYPE_CHECKING:
    from s2d.transform.arch import MultiStageArch
    from s2d.transform.supernet import SuperNet


@torch.no_grad()
def logits(model: nn.Module, split: Split, info: DatasetInfo, *, device: str | torch.device = "cpu",
           batch_size: int = 500) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x).float().cpu() for x, _ in Batches(split, info, batch_size, device=device)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, split: Split, info: DatasetInfo, *, device: str | torch.device = "cpu",
             batch_size: int = 500) -> float:
    pred = logits(model, split, info, device=device, batch_size=batch_size).argmax(1)
    return (pred == split.labels).float().mean().item()


@dataclass
class Speed:
    """Median wall-clock figures; ``per_batch_ms`` is per forward call."""

    batch_size: int
    per_batch_ms: float
    img_per_s: float
    repeats: int


@torch.no_grad()
def measure_speed(forward: Callable[[torch.Tensor], object], x: torch.Tensor, *, repeats: int = 20,
                  warmup: int = 3, min_seconds: float = 0.0) -> Speed:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones.

    ``min_seconds`` keeps repeating until that much time has been spent, which
    steadies batch-1 figures where one call takes a few milliseconds.
    """
    for _ in range(warmup):
        forward(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        forward(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return Speed(batch_size=len(x), per_batch_ms=med * 1e3, img_per_s=len(x) / med, repeats=len(times))


def measure_pair(a: Callable[[torch.Tensor], object], b: Callable[[torch.Tensor], object], x: torch.Tensor, *,
                 repeats: int = 10, warmup: int = 2) -> tuple[Speed, Speed]:
    """Timings of ``a`` and ``b`` on ``x``, call for call interleaved.

    A background load then slows both alike, so their ratio stays meaningful on a busy
    machine, where two separately timed medians can differ by 1.5x for the same network.
    """
    for _ in range(warmup):
        a(x)
        b(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for f, ts in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            f(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    meds = [statistics.median(ts) for ts in times]
    return tuple(Speed(batch_size=len(x), per_batch_ms=m * 1e3, img_per_s=len(x) / m, repeats=repeats)
                 for m in meds)  # type: ignore[return-value]


@torch.no_grad()
def stage_logits(forward_stages: Callable[[torch.Tensor], list[torch.Tensor]], split: Split, info: DatasetInfo, *,
                 device: str | torch.device = "cpu", batch_size: int = 500) -> torch.Tensor:
    """Every stage's logits on every sample of ``split``: (S, N, K)."""
    outs = [torch.stack([o.float().cpu() for o in forward_stages(x)])
            for x, _ in Batches(split, info, batch_size, device=device)]
    return torch.cat(outs, dim=1)


@torch.no_grad()
def stage_confidence(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *,
                     device: str | torch.device = "cpu", batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stage's exit-rule confidence and correctness on ``split``: both (S, N), in eval mode."""
    from s2d.transform.exit_rule import confidence

    supernet.eval()
    logits = stage_logits(lambda x: supernet.forward_stages(x, arch), split, info, device=device,
                          batch_size=batch_size)
    conf = torch.stack([confidence(arch.exit_rule, lg) for lg in logits])
    return conf, logits.argmax(-1) == split.labels[None]
