"""Exit rules: how confident a stage is, and which samples leave the network there.

Every confidence is in [0, 1] and higher means surer, so one threshold semantics
holds for all rules: threshold 0 lets every sample exit at the first stage, a
threshold above 1 sends every sample to the last stage.
"""

from __future__ import annotations

import math

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
