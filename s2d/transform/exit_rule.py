"""Exit rules: how confident a stage is, and which samples leave the network there.

Every confidence is in [0, 1] and higher means surer, so one threshold semantics
holds for all rules: threshold 0 lets every sample exit at the first stage, a
threshold above 1 sends every sample to the last stage.
"""

from __future__ import annotations

import math

import torch

from s2d.errors import ArchError


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().softmax(-1).max(-1).values


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """1 - normalised entropy of the softmax."""
    logp = logits.float().log_softmax(-1)
    h = -(logp.exp() * logp).sum(-1)
    return 1 - h / math.log(logits.shape[-1])


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability."""
    top = logits.float().softmax(-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


NEVER_EXIT = 1.01  # above every confidence: the stage never lets a sample exit

EXIT_RULES = {"max_softmax": max_softmax, "entropy": entropy, "margin": margin}
# Every rule's confidence lies in [0, 1] (entropy as 1 - H / ln C), so thresholds do too; NEVER_EXIT
# is the one value outside, written by calibration for a stage that should let nobody out.
THRESHOLD_RANGE = {rule: (0.0, 1.0) for rule in EXIT_RULES}


def check_thresholds(rule: str, thresholds: tuple[float, ...] | list[float]) -> None:
    """One-line error for an unknown rule or a threshold no confidence of the rule can reach (or
    that every confidence reaches from below 0): such an exit silently never, or always, fires."""
    if rule not in EXIT_RULES:
        raise ArchError(f"unknown exit_rule {rule!r}; valid: {', '.join(EXIT_RULES)}")
    lo, hi = THRESHOLD_RANGE[rule]
    for i, t in enumerate(thresholds, 1):
        if not (math.isfinite(t) and lo <= t <= hi) and t != NEVER_EXIT:
            raise ArchError(f"threshold {i} = {t} is outside exit_rule {rule}'s range [{lo:g}, {hi:g}] "
                            f"(or {NEVER_EXIT}: never exit); no sample could exit as intended")


def confidence(rule: str, logits: torch.Tensor) -> torch.Tensor:
    return EXIT_RULES[rule](logits)


GATE_TOP = 3  # sorted probabilities a gate reads


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """What an exit gate reads of a stage's (tempered) logits: the log-odds of the top probability, the top
    ``GATE_TOP`` probabilities, the entropy rule's confidence, the predicted class (one-hot) and its log-odds per class.

    The per-class terms are what a single confidence threshold lacks: a stage that calls an image a trouser is
    right at a lower softmax than one that calls it a shirt, so the gate learns one scale per predicted class."""
    p = logits.float().softmax(-1)
    top = p.topk(min(GATE_TOP, p.shape[-1]), dim=-1).values
    if top.shape[-1] < GATE_TOP:
        top = torch.nn.functional.pad(top, (0, GATE_TOP - top.shape[-1]))
    p1 = top[..., :1].clamp(1e-7, 1 - 1e-7)
    log_odds = p1.log() - (-p1).log1p()
    ent = entropy(logits)[..., None]
    onehot = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)
    return torch.cat([log_odds, top, ent, onehot, onehot * log_odds], -1)


def gate_size(num_classes: int) -> int:
    """Weights of one gate: a bias and one per feature of :func:`gate_features`."""
    return 1 + 2 + GATE_TOP + 2 * num_classes


def gate_confidence(logits: torch.Tensor, weights: tuple[float, ...] | list[float]) -> torch.Tensor:
    """A learned exit rule (EDANAS searches the rule's parameters; here they are fitted): the gate's probability
    that letting the sample out here costs no accuracy, in [0, 1] like every confidence."""
    w = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
    return torch.sigmoid(gate_features(logits) @ w[1:] + w[0])


def exit_stages(confidences: torch.Tensor, thresholds: list[float] | tuple[float, ...]) -> torch.Tensor:
    """Stage index (0-based) at which each sample exits, from per-stage confidences (S, N).

    A sample exits at the first stage s < S-1 whose confidence reaches thresholds[s];
    otherwise at the last stage.
    """
    s, n = confidences.shape
    exits = torch.full((n,), s - 1, dtype=torch.long)
    for i in range(s - 2, -1, -1):
        exits = torch.where(confidences[i] >= thresholds[i], torch.full_like(exits, i), exits)
    return exits


def exit_rates(exits: torch.Tensor, num_stages: int) -> list[float]:
    """Fraction of samples leaving at each stage, in float64 (average MACs are weighed with them)."""
    return (torch.bincount(exits, minlength=num_stages).double() / max(1, len(exits))).tolist()
