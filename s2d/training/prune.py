"""The static peer s2d is compared against: channel pruning with Torch-Pruning, then KD fine-tuning.

A user who wants a model that is N times cheaper, and does not want a dynamic network, prunes
channels and fine-tunes. This module builds that baseline the way a user would, so that
``s2d bench peers`` compares against a fair static alternative rather than a straw man:

* :func:`prune_to_mac_ratio`: Torch-Pruning with group-L2 magnitude importance, the same
  (uniform) ratio in every layer, the classifier kept; the ratio is found by bisection so the
  fvcore MACs hit a target fraction of the original's (the knob users have is the ratio, the
  figure they care about is the cost).
* :func:`s2d.training.distill.kd_finetune` then distils from the unpruned model for a wall-clock
  budget, since the comparison is "what does the same CPU time buy", not "what do N epochs buy".
* :func:`restore_pruned`: rebuilds a pruned architecture from the unpruned model and a saved
  state dict, so checkpoints stay plain tensors (see its docstring for why).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from s2d import checkpoint
from s2d.errors import CheckpointError, S2DError
from s2d.measure.cost import count_macs

IMPORTANCES = ("l2", "l1")
MAX_PRUNING_RATIO = 0.95  # bisection's upper end, lowered so the narrowest group keeps one channel
RATIO_TOLERANCE = 1e-4  # finer than one channel of a 1280-wide layer, so the search finds the nearest width


@dataclass
class PrunedModel:
    """A pruned copy of a model with the ratio that produced it and what it costs."""

    module: nn.Module
    pruning_ratio: float  # Torch-Pruning's uniform ratio: the fraction of channels removed in every group
    macs: float  # fvcore MACs of the pruned model
    base_macs: float  # fvcore MACs of the model it was pruned from
    target_ratio: float  # the MAC ratio asked for

    @property
    def mac_ratio(self) -> float:
        """Pruned MACs over original MACs (e.g. 0.33 for "3x fewer MACs")."""
        return self.macs / self.base_macs

    @property
    def reduction(self) -> float:
        """How many times fewer MACs than the original (1 / ``mac_ratio``)."""
        return self.base_macs / self.macs


def importance_criterion(importance: str | tp.importance.Importance) -> tp.importance.Importance:
    """Torch-Pruning's scorer for a criterion name; an ``Importance`` instance is used as is."""
    if isinstance(importance, tp.importance.Importance):
        return importance
    if importance == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    raise S2DError(f"unknown pruning importance {importance!r}; valid: {', '.join(IMPORTANCES)}")


def _example_inputs(model: nn.Module, input_shape: tuple[int, ...],
                    example_inputs: torch.Tensor | None) -> torch.Tensor:
    if example_inputs is not None:
        return example_inputs
    param = next(model.parameters(), None)
    return torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")


@torch.no_grad()
def find_classifier(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The conv/linear layer that produces the model's logits: its outputs are the classes, never pruned.

    Found by running the model once: the layer whose output tensor *is* the model's output,
    else (a classifier followed by flatten/view) the last layer called with as many outputs
    as the model has.
    """
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, _inp, out: calls.append((mod, out)))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    try:
        out = model.eval()(example_inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for mod, o in reversed(calls):
        if o is out:
            return mod
    if isinstance(out, torch.Tensor) and out.ndim >= 2:
        for mod, o in reversed(calls):
            if isinstance(o, torch.Tensor) and o.ndim >= 2 and o.shape[1] == out.shape[1]:
                return mod
    raise S2DError(f"cannot find the classifier of {type(model).__name__}: no conv or linear layer produces "
                   "its output; prune it with an explicit ignored layer in Torch-Pruning instead")


def _has_empty_layer(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and (m.in_channels == 0 or m.out_channels == 0):
            return True
        if isinstance(m, nn.Linear) and (m.in_features == 0 or m.out_features == 0):
            return True
    return False


def narrowest_group(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Channels of the narrowest prunable group (the classifier's outputs excluded).

    The uniform pruner keeps ``int(C * (1 - ratio))`` channels of a group and leaves a group it
    would empty whole, so MACs only fall monotonically with the ratio while every group keeps
    one channel: ``ratio < 1 - 1 / narrowest``.
    """
    model = copy.deepcopy(model).eval()
    classifier = find_classifier(model, example_inputs)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    return min(dg.get_out_channels(g[0].dep.target.module) for g in dg.get_all_groups(ignored_layers=[classifier]))


def prune_uniform(model: nn.Module, pruning_ratio: float, example_inputs: torch.Tensor, *,
                  importance: str | tp.importance.Importance = "l2") -> nn.Module:
    """A pruned deep copy: ``pruning_ratio`` of the channels of every group removed, lowest importance first.

    The copy is traced in eval mode (tracing in train mode would update its batch-norm
    statistics with the example input) and returned in the original's mode.
    """
    pruned = copy.deepcopy(model).eval()
    classifier = find_classifier(pruned, example_inputs)
    pruner = tp.pruner.MetaPruner(pruned, example_inputs, importance=importance_criterion(importance),
                                  pruning_ratio=pruning_ratio, ignored_layers=[classifier])
    pruner.step()
    return pruned.train(model.training)


def prune_to_mac_ratio(model: nn.Module, input_shape: tuple[int, ...], target_ratio: float, *,
                       importance: str | tp.importance.Importance = "l2",
                       example_inputs: torch.Tensor | None = None) -> PrunedModel:
    """Prune a copy of ``model`` so its fvcore MACs are as close as possible to ``target_ratio`` of the original's.

    Bisects Torch-Pruning's uniform pruning ratio: the kept width of every group is
    ``int(C * (1 - ratio))``, so MACs fall monotonically (in steps) as the ratio grows. The
    nearest of the two bracketing widths (in log MACs) is returned. ``model`` is not modified.
    """
    if not 0 < target_ratio < 1:
        raise S2DError(f"target MAC ratio must be in (0, 1), got {target_ratio}")
    x = _example_inputs(model, input_shape, example_inputs)
    base_macs = float(count_macs(model, (x,)).total())
    tried: dict[float, tuple[nn.Module, float] | None] = {}

    def evaluate(ratio: float) -> float:
        """MAC ratio at ``ratio``; 0 when the ratio empties a layer (counts as "too far")."""
        try:
            pruned = prune_uniform(model, ratio, x, importance=importance)
        except (RuntimeError, ValueError, IndexError):  # TP fails on layers pruned to nothing
            tried[ratio] = None
            return 0.0
        if _has_empty_layer(pruned):
            tried[ratio] = None
            return 0.0
        macs = float(count_macs(pruned, (x,)).total())
        tried[ratio] = (pruned, macs)
        return macs / base_macs

    lo, hi = 0.0, min(MAX_PRUNING_RATIO, 1 - 1.001 / narrowest_group(model, x))
    if evaluate(hi) > target_ratio:
        smallest = min(v[1] for v in tried.values() if v is not None) / base_macs
        raise S2DError(f"uniform pruning cannot reach {target_ratio:.3f} of the MACs (ratio {hi} gives "
                       f"{smallest:.3f}); ask for a larger MAC ratio")
    while hi - lo > RATIO_TOLERANCE:
        mid = (lo + hi) / 2
        if evaluate(mid) > target_ratio:
            lo = mid
        else:
            hi = mid
    valid = [(r, v) for r, v in tried.items() if v is not None]
    ratio, (module, macs) = min(valid, key=lambda rv: (abs(math.log(rv[1][1] / base_macs / target_ratio)), rv[0]))
    return PrunedModel(module=module, pruning_ratio=ratio, macs=macs, base_macs=base_macs, target_ratio=target_ratio)


def _out_width(weight: torch.Tensor, module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return weight.shape[1] * module.groups
    return weight.shape[0]


def restore_pruned(base: nn.Module, state_dict: dict[str, torch.Tensor], input_shape: tuple[int, ...], *,
                   example_inputs: torch.Tensor | None = None, source: str = "state dict") -> nn.Module:
    """Rebuild a pruned model from the unpruned ``base`` and the pruned model's state dict.

    Why not pickle the pruned module: s2d checkpoints load with ``weights_only=True`` (no code
    runs on load) and a pickle names classes by import path, which breaks when modules move.
    Why not re-run the search: the widths would then depend on the base weights, the TP version
    and the bisection staying bit-identical. Here the widths come from the saved tensors' shapes
    alone: every channel group of ``base`` is cut to the saved width (which channels are cut does
    not matter, the state dict overwrites them all), then the weights are loaded strictly.
    """
    model = copy.deepcopy(base).eval()
    x = _example_inputs(model, input_shape, example_inputs)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    names = {m: n for n, m in model.named_modules()}
    for group in list(dg.get_all_groups()):
        dep = group[0].dep
        root, handler = dep.target.module, dep.handler
        key = f"{names[root]}.weight" if names.get(root) else "weight"
        if key not in state_dict:
            continue  # load_into below names the missing keys
        current, wanted = dg.get_out_channels(root), _out_width(state_dict[key], root)
        if wanted > current:
            raise CheckpointError(f"{source}: {names[root]} has {wanted} output channels, more than the "
                                  f"unpruned model's {current}; it was pruned from another model")
        if wanted < current:
            dg.get_pruning_group(root, handler, list(range(wanted, current))).prune()
    checkpoint.load_into(model, state_dict, source)
    return model.train(base.training)
