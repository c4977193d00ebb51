"""Per-exit temperature scaling (Guo et al. 2017): one scalar per stage that makes its softmax calibrated.

Early exit heads are probes of frozen features or briefly trained, so their softmax is over- or under-confident
in its own way, and a threshold of 0.9 would mean something different at every exit. Dividing each
stage's logits by a temperature fitted for the lowest negative log-likelihood on held-out images
gives confidences that mean the same thing everywhere; the argmax (accuracy) does not change.
"""

from __future__ import annotations

import torch

from s2d.data import DatasetInfo, Split
from s2d.measure.accuracy import stage_logits
from s2d.transform.arch import MultiStageArch
from s2d.transform.supernet import SuperNet

T_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, iters: int = 100) -> float:
    """The temperature minimising the mean NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(*T_RANGE))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, labels))


def fit_stage_temperatures(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *,
                           device: str = "cpu") -> MultiStageArch:
    """``arch`` with one temperature per stage (the final classifier included), fitted on ``split``."""
    supernet.eval()
    logits = stage_logits(lambda x: supernet.forward_stages(x, arch), split, info, device=device)
    return arch.with_temperatures([fit_temperature(lg, split.labels) for lg in logits])
