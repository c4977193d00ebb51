"""Wall-clock speed on this machine.

Every speed *ratio* s2d reports comes from :func:`paired_speed`: the reference (the static
model) and the candidate are called alternately on the same inputs and the ratio is the
median of the per-repeat ratios, so a background load slows both alike. Two separately
timed loops on this noisy 2-core machine produce fake speed-ups of up to 1.9x. Both sides
are timed as they would be deployed (:func:`deployable`: batch norm folded). Batch-1 latency over
many images (:func:`expected_latency`) is the mean time per image, each image's fastest paired call.
Timing first keeps freed memory in the process (:func:`s2d.allocator.keep_freed_memory`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from s2d.allocator import keep_freed_memory

Forward = Callable[[torch.Tensor], object]


def deployable(model: nn.Module) -> nn.Module:
    """The model as it would be deployed, and as DynamicNet stages are: batch norm folded into convs,
    weights in the inference layout (channels-last on the CPU), narrow convs folded over images. A speed
    ratio against it is then one of network shapes, not of layouts or kernels."""
    from torch.fx.experimental.optimization import fuse

    from s2d.transform.fold import fold_narrow_convs
    from s2d.transform.stages import inference_layout

    try:
        model = fuse(model.eval())
    except Exception:  # untraceable models keep their batch norm (and the caller's copy its layout)
        model = copy.deepcopy(model)
    return fold_narrow_convs(inference_layout(model))


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
    keep_freed_memory()
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
    keep_freed_memory()
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
def expected_latency(reference: Forward, candidate: Forward, images: Sequence[torch.Tensor], *,
                     repeats: int = 3, warmup: int = 1) -> PairedSpeed:
    """Batch-1 latency of ``candidate`` against ``reference`` averaged over ``images``, as a user who sends
    them one by one waits for them: the ratio is the candidate's total time over the reference's.

    A dynamic network's time depends on the image (where it exits), so the median per-image ratio is the
    time of a typical (early-exiting) image, not of the average one: it flattered cascades. Each image is
    timed ``repeats`` times per side, interleaved, and its fastest call counts, so preemption on a busy
    machine does not land on one side. ``ratio``, ``mean_ratio`` and ``fast_ratio`` all hold the
    expected ratio; the ms fields are the means over images."""
    keep_freed_memory()
    if not images:
        raise ValueError("expected_latency needs at least one image")
    cand, ref = [], []
    for x in images:
        p = paired_speed(reference, candidate, [x] * repeats, warmup=warmup)
        cand.append(p.fast_candidate_ms)
        ref.append(p.fast_reference_ms)
    c_ms, r_ms = statistics.fmean(cand), statistics.fmean(ref)
    ratio = c_ms / r_ms
    return PairedSpeed(batch_size=1, reference_ms=r_ms, candidate_ms=c_ms, ratio=ratio, repeats=repeats * len(cand),
                       mean_ratio=ratio, fast_candidate_ms=c_ms, fast_reference_ms=r_ms)
