"""Costs: fvcore MACs of static models and of every stage of a multi-stage arch.

fvcore counts one multiply-add as one "flop", so its numbers are MACs and are
reported as such. Models are counted in eval mode on a fixed path (never the
data-dependent dynamic forward). Ops fvcore does not count are reported, not hidden.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

from s2d.data import DatasetInfo


@dataclass
class StaticCost:
    total_macs: float
    by_operator: dict[str, float]
    by_module: dict[str, float]
    unsupported_ops: dict[str, int] = field(default_factory=dict)


def count_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> FlopCountAnalysis:
    """An fvcore analysis with warnings silenced (unsupported ops are read from the result)."""
    was_training = module.training
    module.eval()
    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():  # fvcore's jit tracing warns about torch.jit deprecation
        warnings.simplefilter("ignore")
        analysis.total()  # run the trace now, in eval mode
    module.train(was_training)
    return analysis


def static_cost(model: nn.Module, info: DatasetInfo) -> StaticCost:
    device = next(model.parameters()).device
    x = torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=device)
    a = count_macs(model, (x,))
    return StaticCost(
        total_macs=float(a.total()),
        by_operator={k: float(v) for k, v in a.by_operator().items()},
        by_module={k: float(v) for k, v in a.by_module().items()},
        unsupported_ops=dict(Counter(a.unsupported_ops())),
    )
