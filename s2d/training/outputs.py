"""A model's output in training mode: logits, and the auxiliary classifiers' logits some models add.

GoogLeNet and Inception v3 return ``(logits, aux...)`` namedtuples while training, so
their side classifiers get a gradient; in eval mode (where s2d traces them) only the
logits. Training code reads both through :func:`split_outputs`, with no per-model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUX_WEIGHT = 0.3  # GoogLeNet's weight for each auxiliary classifier's loss


def split_outputs(out: torch.Tensor | tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, auxiliary logits) of a training-mode output; the logits come first in every such tuple."""
    if isinstance(out, torch.Tensor):
        return out, []
    main, *aux = out
    return main, [a for a in aux if isinstance(a, torch.Tensor)]


def aux_loss(aux: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor | float:
    """The auxiliary classifiers' share of the loss (0 for models without any)."""
    return AUX_WEIGHT * sum(F.cross_entropy(a, labels) for a in aux) if aux else 0.0
