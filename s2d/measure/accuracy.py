"""Accuracy of a model, and every stage's logits and confidences of a multi-stage arch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from s2d.data import Batches, DatasetInfo, Split
from s2d.transform.exit_rule import exit_rates, exit_stages

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


@torch.no_grad()
def stage_logits(forward_stages: Callable[[torch.Tensor], list[torch.Tensor]], split: Split, info: DatasetInfo, *,
                 device: str | torch.device = "cpu", batch_size: int = 500) -> torch.Tensor:
    """Every stage's logits on every sample of ``split``: (S, N, K)."""
    outs = [torch.stack([o.float().cpu() for o in forward_stages(x)])
            for x, _ in Batches(split, info, batch_size, device=device)]
    return torch.cat(outs, dim=1)


@dataclass
class StageOutputs:
    """Every stage's confidence and correctness on one split, computed once per (arch, split).

    Calibration, threshold sweeps, operating points and simulated exits all read these, so
    a split goes through the network once however many figures are derived from it. The
    exits they simulate are the ones ``DynamicNet`` takes (same rule, same comparison).
    """

    confidence: torch.Tensor  # (S, N), float32, the exit rule's
    correct: torch.Tensor  # (S, N), bool

    @property
    def num_stages(self) -> int:
        return self.confidence.shape[0]

    def exits(self, thresholds: list[float] | tuple[float, ...]) -> torch.Tensor:
        return exit_stages(self.confidence, thresholds)

    def accuracy(self, thresholds: list[float] | tuple[float, ...]) -> float:
        """Accuracy with early exits at ``thresholds`` (float64 counting, as calibration counts)."""
        return self.correct.gather(0, self.exits(thresholds)[None])[0].double().mean().item()

    def exit_rates(self, thresholds: list[float] | tuple[float, ...]) -> list[float]:
        return exit_rates(self.exits(thresholds), self.num_stages)

    def stage_accuracy(self) -> list[float]:
        return self.correct.double().mean(1).tolist()


@torch.no_grad()
def stage_outputs(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *,
                  device: str | torch.device = "cpu", batch_size: int = 500) -> StageOutputs:
    """Every stage's exit-rule confidence and correctness on ``split``, in eval mode."""
    supernet.eval()
    logits = stage_logits(lambda x: supernet.forward_stages(x, arch), split, info, device=device,
                          batch_size=batch_size)
    conf = torch.stack([arch.confidence(s, lg) for s, lg in enumerate(logits)])
    return StageOutputs(conf, logits.argmax(-1) == split.labels[None])
