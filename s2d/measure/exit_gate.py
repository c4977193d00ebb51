"""Learned exit gates: a logistic model per exit, fitted on held-out images, deciding who may leave.

A threshold on the softmax treats every prediction alike, but what an exit should ask is narrower: would
letting this image out here lose it? That happens only when the stage is wrong *and* the last stage would
have been right. The gate is fitted to exactly that event (on the search's validation images, after the
search, as the temperatures are) from what the stage's logits say (``exit_rule.gate_features``), so the
thresholds calibrated on its probability spend the later stages on the images they can still fix.
"""

from __future__ import annotations

import torch

from s2d.data import DatasetInfo, Split
from s2d.measure.accuracy import stage_logits
from s2d.transform.arch import MultiStageArch
from s2d.transform.exit_rule import gate_features, gate_size
from s2d.transform.supernet import SuperNet


def softmax_gate(num_classes: int) -> list[float]:
    """The gate whose probability is the max softmax itself (weight 1 on its log-odds): what a stage gets
    when its held-out images hold nothing to learn from (it never loses, or never keeps, an image)."""
    w = [0.0] * gate_size(num_classes)
    w[1] = 1.0
    return w


def fit_gate(logits: torch.Tensor, safe: torch.Tensor, *, l2: float = 1.0, iters: int = 200) -> list[float]:
    """Weights of a logistic model of ``safe`` (exiting here loses nothing) from the stage's ``logits``.

    L2-penalised maximum likelihood (LBFGS, float64) on standardised features, folded back into weights
    on the raw features; ``l2`` is the penalty per image-equivalent (sklearn's ``C = 1 / l2``)."""
    if bool(safe.all()) or not bool(safe.any()):
        return softmax_gate(logits.shape[-1])
    x = gate_features(logits).double()
    y = safe.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 / (2 * len(y)) * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    raw = (w / std).detach()
    return [float(b.detach() - (raw * mean).sum()), *map(float, raw)]


def safe_exits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(S-1, N): exiting at stage s loses nothing, i.e. stage s is right or the last stage is wrong too."""
    correct = logits.argmax(-1) == labels[None]
    return correct[:-1] | ~correct[-1:]


def fit_stage_gates(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *,
                    device: str = "cpu") -> MultiStageArch:
    """``arch`` with a gate for every stage but the last, fitted on ``split`` to the stage's tempered logits."""
    if arch.num_stages < 2:
        return arch
    supernet.eval()
    logits = stage_logits(lambda x: supernet.forward_stages(x, arch), split, info, device=device)
    if arch.temperatures:
        logits = logits / torch.tensor(arch.temperatures)[:, None, None]
    safe = safe_exits(logits, split.labels)
    return arch.with_gates([fit_gate(logits[s], safe[s]) for s in range(arch.num_stages - 1)])
