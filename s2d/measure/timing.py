"""Wall-clock speed on this machine.

Every speed *ratio* s2d reports comes from :func:`paired_speed`: the reference (the static
model) and the candidate are called alternately on the same inputs and the ratio is the
median of the per-repeat ratios, so a background load slows both alike. Two separately
timed loops on this noisy 2-core machine produce fake speed-ups of up to 1.9x. Both sides
are timed as they would be deployed (:func:`deployable`: batch norm folded).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Forward = Callable[[torch.Tensor], object]


def deployable(model: nn.Module) -> nn.Module:
    """The model as it would be deployed: batch norm folded into convs (as DynamicNet stages are)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception:  # untraceable models are timed as they are
        return model


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def _time(f: Forward, x: torch.Tensor) -> float:
    t = time.perf_counter()
    f(x)
    _sync(x)
    return time.perf_counter() - t


@dataclass
class Speed:
    """Median wall-clock figures; ``per_batch_ms`` is per forward call."""

    batch_size: int
    per_batch_ms: float
    img_per_s: float
    repeats: int


@torch.no_grad()
def measure_speed(forward: Forward, x: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                  min_seconds: float = 0.0) -> Speed:
    """Absolute figures of one network (median of ``repeats`` calls after ``warmup``).

    For a figure on its own (``s2d eval`` of a static model); never divide two of these:
    use :func:`paired_speed` for ratios.
    """
    for _ in range(warmup):
        forward(x)
    _sync(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        times.append(_time(forward, x))
    med = statistics.median(times)
    return Speed(batch_size=len(x), per_batch_ms=med * 1e3, img_per_s=len(x) / med, repeats=len(times))


@dataclass
class PairedSpeed:
    """A candidate timed call for call against a reference on the same inputs."""

    batch_size: int
    reference_ms: float  # median per call
    candidate_ms: float
    ratio: float  # median over repeats of candidate time / reference time (< 1: the candidate is faster)
    repeats: int
    mean_ratio: float = float("nan")  # candidate's total time over the reference's: the average cost of a
    # sequence of inputs (a dynamic network's expected latency), where the median ratio is a typical input's
    fast_candidate_ms: float = float("nan")  # the 10th percentiles of the calls: a call that nothing preempted.
    fast_reference_ms: float = float("nan")  # On 2 busy cores a millisecond call is preempted now and then, and a
    # 2 ms one more often than a 0.5 ms one, so under load the median ratio of short calls is biased; these are not.

    @property
    def fast_ratio(self) -> float:
        return self.fast_candidate_ms / self.fast_reference_ms

    @property
    def speedup(self) -> float:
        """Reference time over candidate time: the throughput ratio (> 1: the candidate is faster)."""
        return 1.0 / self.ratio

    @property
    def reference(self) -> Speed:
        return Speed(self.batch_size, self.reference_ms, self.batch_size / self.reference_ms * 1e3, self.repeats)

    @property
    def candidate(self) -> Speed:
        return Speed(self.batch_size, self.candidate_ms, self.batch_size / self.candidate_ms * 1e3, self.repeats)


@torch.no_grad()
def paired_speed(reference: Forward, candidate: Forward, inputs: torch.Tensor | Sequence[torch.Tensor], *,
                 repeats: int = 10, warmup: int = 2) -> PairedSpeed:
    """Time ``candidate`` against ``reference``, interleaved call for call.

    ``inputs`` is one batch (timed ``repeats`` times) or a sequence of inputs (e.g. single
    test images, each timed once per side, so a dynamic network's data-dependent exits are
    sampled as the data has them). The order alternates between repeats so neither side
    always runs on a warm cache.
    """
    xs = [inputs] * repeats if isinstance(inputs, torch.Tensor) else list(inputs)
    if not xs:
        raise ValueError("paired_speed needs at least one input")
    for _ in range(warmup):
        reference(xs[0])
        candidate(xs[0])
    ref_t, cand_t, ratios = [], [], []
    for i, x in enumerate(xs):
        if i % 2:
            c = _time(candidate, x)
            r = _time(reference, x)
        else:
            r = _time(reference, x)
            c = _time(candidate, x)
        ref_t.append(r)
        cand_t.append(c)
        ratios.append(c / r)
    return PairedSpeed(batch_size=len(xs[0]), reference_ms=statistics.median(ref_t) * 1e3,
                       candidate_ms=statistics.median(cand_t) * 1e3, ratio=statistics.median(ratios),
                       repeats=len(xs), mean_ratio=sum(cand_t) / sum(ref_t),
                       fast_candidate_ms=_fast(cand_t) * 1e3, fast_reference_ms=_fast(ref_t) * 1e3)


def _fast(times: list[float]) -> float:
    return sorted(times)[len(times) // 10]


@torch.no_grad()
def stage_latencies_ms(reference: Forward, stages: Sequence[Callable[..., tuple[torch.Tensor, ...]]],
                       x: torch.Tensor, *, repeats: int = 30) -> tuple[list[float], float]:
    """Batch-1 milliseconds of every stage (fed the cache of the stage before it), each timed paired with
    ``reference`` on the same image: (per-stage ms, reference ms). A sample's latency is the sum over the
    stages it runs, plus the routing between them; the static model's latency comes from the same loop,
    so a busy machine scales both."""
    cache: tuple[torch.Tensor, ...] = ()
    ratios, ref_ms = [], []
    for stage in stages:
        p = paired_speed(reference, lambda xs, st=stage, c=cache: st(xs, *c), [x] * repeats, warmup=3)
        ratios.append(p.ratio)
        ref_ms.append(p.reference_ms)
        cache = tuple(stage(x, *cache)[1:])
    ref = statistics.median(ref_ms)
    return [r * ref for r in ratios], ref
