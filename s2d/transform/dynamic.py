"""``DynamicNet``: a materialised multi-stage network for deployment.

Stage 1 runs on the whole batch; samples whose confidence reaches the stage's
threshold exit; only the rest continue, with the features already computed for
them. Plain PyTorch modules (``torch.fx.GraphModule``, folded over images where that is faster:
``s2d.transform.fold``), no masks at run time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from s2d.transform.arch import MultiStageArch

StageRunner = Callable[[int, torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def early_exit(run_stage: StageRunner, x: torch.Tensor, arch: MultiStageArch) -> tuple[torch.Tensor, torch.Tensor]:
    """The early-exit loop shared by ``DynamicNet`` and exported runners.

    ``run_stage(s, x, cache)`` returns (logits, *cache for stage s+1). Samples that exit
    are dropped from the batch, and from the cache, before the next stage runs.
    """
    n, last = x.shape[0], arch.num_stages - 1
    idx = torch.arange(n, device=x.device)
    exit_stage = torch.full((n,), last, dtype=torch.long, device=x.device)
    out: torch.Tensor | None = None
    cache: tuple[torch.Tensor, ...] = ()
    for s in range(arch.num_stages):
        res = run_stage(s, x, cache)
        logits, cache = res[0], tuple(res[1:])
        if s == last and len(idx) == n:  # nobody left early: the last stage's logits are the output
            return logits, exit_stage
        if out is None:
            out = logits.new_empty((n, logits.shape[1]))
        if s == last:
            out[idx] = logits
            break
        rest = route(arch, s, logits, x, cache, idx, out, exit_stage)
        if rest is None:
            break
        x, cache, idx = rest
    assert out is not None
    return out, exit_stage


def route(arch: MultiStageArch, s: int, logits: torch.Tensor, x: torch.Tensor, cache: tuple[torch.Tensor, ...],
          idx: torch.Tensor, out: torch.Tensor, exit_stage: torch.Tensor
          ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor] | None:
    """Stage ``s``'s exit decision: the samples (``idx`` in the whole batch) confident enough are written to
    ``out`` and ``exit_stage``; the others go on with their inputs and cache, or ``None`` when none is left.

    At batch 1 a stage's decision is always all or nothing, and at large batches often so: those cases skip
    the boolean indexing of outputs, inputs and cache (nobody exits: the batch goes on as it is)."""
    done = arch.confidence(s, logits) >= arch.thresholds[s]
    exiting = int(done.sum())
    if exiting == 0:
        return x, cache, idx
    if exiting == len(done):
        out[idx] = logits
        exit_stage[idx] = s
        return None
    out[idx[done]] = logits[done]
    exit_stage[idx[done]] = s
    keep = ~done
    return x[keep], tuple(c[keep] for c in cache), idx[keep]


class DynamicNet(nn.Module):
    def __init__(self, arch: MultiStageArch, stages: list[nn.Module], cache_in: list[list[str]],
                 cache_out: list[list[str]]) -> None:
        super().__init__()
        if len(arch.thresholds) != arch.num_stages - 1:
            raise ValueError("DynamicNet needs one threshold per stage but the last (calibrate them first)")
        self.arch = arch
        self.stages = nn.ModuleList(stages)
        self.cache_in, self.cache_out = cache_in, cache_out

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.arch.thresholds

    def set_thresholds(self, thresholds: list[float] | tuple[float, ...]) -> None:
        self.arch = self.arch.with_thresholds(thresholds)

    def with_thresholds(self, thresholds: list[float] | tuple[float, ...]) -> DynamicNet:
        """The same stages (shared, not copied) exiting at other thresholds: one network's operating points."""
        return DynamicNet(self.arch.with_thresholds(thresholds), list(self.stages), self.cache_in, self.cache_out)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K) and the 0-based stage each sample exited at (N,)."""
        return early_exit(lambda s, xs, cache: tuple(self.stages[s](xs, *cache)), x, self.arch)

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's logits on every sample (no early exit), e.g. for calibration."""
        outs, cache = [], ()
        for stage in self.stages:
            res = stage(x, *cache)
            outs.append(res[0])
            cache = tuple(res[1:])
        return outs
