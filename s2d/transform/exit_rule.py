"""Exit rules: how confident a stage is, and which samples leave the network there.

Every confidence is in [0, 1] and higher means surer, so one threshold semantics
holds for all rules: threshold 0 lets every sample exit at the first stage, a
threshold above 1 sends every sample to the last stage.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


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


def confidence(rule: str, logits: torch.Tensor) -> torch.Tensor:
    return EXIT_RULES[rule](logits)


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
    return (torch.bincount(exits, minlength=num_stages).float() / max(1, len(exits))).tolist()


def calibrate(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], min_accuracy: float,
              grid: int = 40) -> tuple[list[float], float]:
    """Thresholds minimising average MACs subject to accuracy >= ``min_accuracy`` on these samples.

    ``confidences`` and ``correct`` are (S, N): every stage's confidence and correctness on
    a validation set. Candidate thresholds per stage are quantiles of its confidences plus
    "never exit". Earlier thresholds are enumerated; the last decision is solved for all
    candidates at once with sorted prefix sums (S <= 4 keeps this well under a second).
    Returns the thresholds and the expected average MACs; when no setting reaches the
    accuracy, the most accurate one.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    s, n = conf.shape
    cum = np.cumsum(np.asarray(stage_macs, dtype=np.float64))  # cost of a sample exiting at stage i
    if s == 1:
        return [], float(cum[0])
    qs = np.linspace(0, 1, grid + 1)[1:-1]
    cands = [np.unique(np.append(np.quantile(conf[i], qs), NEVER_EXIT)) for i in range(s - 1)]
    j = s - 2  # the last decision
    best: tuple[float, float, list[float]] | None = None  # (cost, -acc, thresholds)
    fallback: tuple[float, float, list[float]] | None = None  # (-acc, cost, thresholds)
    for prefix in itertools.product(*cands[:j]):
        pending = np.ones(n, dtype=bool)
        base_ok = base_cost = 0.0
        for i, t in enumerate(prefix):
            leave = pending & (conf[i] >= t)
            base_ok += ok[i][leave].sum()
            base_cost += cum[i] * leave.sum()
            pending &= ~leave
        c = conf[j][pending]
        order = np.argsort(-c, kind="stable")
        ok_here = np.concatenate([[0.0], np.cumsum(ok[j][pending][order])])
        ok_last = np.concatenate([[0.0], np.cumsum(ok[s - 1][pending][order])])
        m = len(c) - np.searchsorted(np.sort(c), cands[j], side="left")  # how many leave at stage j
        acc = (base_ok + ok_here[m] + ok_last[-1] - ok_last[m]) / n
        cost = (base_cost + cum[j] * m + cum[s - 1] * (len(c) - m)) / n
        for a, co, t in zip(acc, cost, cands[j], strict=True):
            thresholds = [*map(float, prefix), float(t)]
            if a >= min_accuracy - 1e-12 and (best is None or (co, -a) < best[:2]):
                best = (float(co), float(-a), thresholds)
            if fallback is None or (-a, co) < fallback[:2]:
                fallback = (float(-a), float(co), thresholds)
    if best is not None:
        return best[2], best[0]
    assert fallback is not None
    return fallback[2], fallback[1]
