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
from torch import nn

from s2d.data import DatasetInfo


@dataclass
class StaticCost:
    total_macs: float
    by_operator: dict[str, float]
    by_module: dict[str, float]
    unsupported_ops: dict[str, int] = field(default_factory=dict)


def count_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """An fvcore analysis with warnings silenced (unsupported ops are read from the result)."""
    was_training = module.training
    module.eval()
    with warnings.catch_warnings():  # fvcore uses torch.jit, which torch flags as deprecated
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import elementwise_flop_counter

        analysis = FlopCountAnalysis(module, inputs)
        # exit heads pool with a fixed kernel: counted like fvcore's adaptive pooling (one per input element)
        analysis.set_op_handle("aten::avg_pool2d", elementwise_flop_counter(1, 0))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
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


def stage_macs(stages: list[nn.Module], input_shape: tuple[int, int, int]) -> tuple[list[float], list[dict[str, int]]]:
    """Incremental fvcore MACs of each materialised stage, and the ops fvcore skipped in each.

    Stages are counted one by one on a fixed path: stage s gets the cached features
    stage s-1 produced for a zero image, so the count never depends on exit decisions.
    """
    param = next(stages[0].parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    cache: tuple[torch.Tensor, ...] = ()
    macs, skipped = [], []
    with torch.no_grad():
        for stage in stages:
            a = count_macs(stage, (x, *cache))
            macs.append(float(a.total()))
            skipped.append(dict(Counter(a.unsupported_ops())))
            cache = tuple(stage(x, *cache)[1:])
    return macs, skipped


def average_macs(macs: list[float], exit_rates: list[float]) -> float:
    """Σ_s P(reach stage s) · incremental MACs(s)."""
    reach, total = 1.0, 0.0
    for m, r in zip(macs, exit_rates, strict=True):
        total += reach * m
        reach -= r
    return total


def exit_macs(graph, input_shape: tuple[int, int, int]) -> list[float]:
    """Cumulative static MACs from the image to each exit point of a ``ModelGraph``.

    Intermediate exits count the trunk up to the exit (no head). The ``output`` exit's head
    is the static classifier itself, so it counts the whole static model: the last value is
    the static MACs (for VGG the classifier alone is a fifth of them).
    """
    from s2d.transform.graph import OUTPUT_EXIT

    x = torch.zeros(1, *input_shape)
    return [float(count_macs(graph.gm if e.name == OUTPUT_EXIT else graph.truncated(e.node), (x,)).total())
            for e in graph.exits]
