"""Knowledge distillation from the static model: the loss every s2d training phase uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                      weight: float) -> torch.Tensor:
    """Hinton KD towards the static model's logits, mixed with cross-entropy on the labels."""
    kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(teacher / temperature, -1),
                  reduction="batchmean") * temperature**2
    return weight * kd + (1 - weight) * F.cross_entropy(logits, labels)
