"""The static peer s2d is compared against: channel pruning with Torch-Pruning, then KD fine-tuning.

A user who wants a model that is N times cheaper, and does not want a dynamic network, prunes
channels and fine-tunes. This module builds that baseline the way a user would, so that
``s2d bench peers`` compares against a fair static alternative rather than a straw man:

* :func:`prune_to_mac_ratio`: Torch-Pruning with group-L2 magnitude importance, the same
  (uniform) ratio in every layer, the classifier kept; the ratio is found by bisection so the
  fvcore MACs hit a target fraction of the original's (the knob users have is the ratio, the
  figure they care about is the cost).
* :func:`kd_finetune`: distillation from the unpruned model for a wall-clock budget, since the
  comparison is "what does the same CPU time buy", not "what do N epochs buy".
* :func:`restore_pruned`: rebuilds a pruned architecture from the unpruned model and a saved
  state dict, so checkpoints stay plain tensors (see its docstring for why).
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d import checkpoint
from s2d.data import Batches, Dataset
from s2d.errors import CheckpointError, S2DError
from s2d.measure.cost import count_macs
from s2d.training.distill import distillation_loss
from s2d.training.outputs import aux_loss, split_outputs

IMPORTANCES = ("l2", "l1")
FINETUNE_FORMAT = "s2d-kd-finetune-v1"
MAX_PRUNING_RATIO = 0.95  # bisection's upper end, lowered so the narrowest group keeps one channel
RATIO_TOLERANCE = 1e-4  # finer than one channel of a 1280-wide layer, so the search finds the nearest width
PROBE_STEPS = 8  # steps run before the schedule is sized ...
PROBE_WARMUP = 2  # ... of which the first are not timed (allocator and cache warm-up make them slower)
SCHEDULE_MARGIN = 0.97  # plan 3 % fewer steps than the probe predicts: the schedule should end, not be cut


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


def _cosine_lr(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def kd_finetune(student: nn.Module, teacher: nn.Module, data: Dataset, *, seconds: float, batch_size: int = 128,
                lr: float = 0.02, weight_decay: float = 5e-4, temperature: float = 2.0, distill_weight: float = 0.7,
                seed: int = 0, checkpoint_path: str | Path | None = None, checkpoint_every: int = 100,
                metadata: dict[str, Any] | None = None, writer: SummaryWriter | None = None, progress: bool = True,
                device: str | torch.device = "cpu", tag: str = "kd_finetune") -> dict[str, float]:
    """Fine-tune ``student`` in place by distillation from ``teacher`` for ``seconds`` of wall-clock time.

    SGD with Nesterov momentum and a cosine schedule. The default ``lr`` was picked on the
    validation split (zoo ResNet-20 pruned to 1/4 of the MACs, 60 s: 0.003 92.1 %, 0.01 92.4 %,
    0.02 92.6 %, 0.05 89.0 %, 0.1 85.3 %). The schedule needs a step count, the
    budget is time: the first steps are timed and the schedule is sized to the steps the rest
    of the budget affords (less a small margin, so the cosine ends rather than being cut).
    Training stops at the planned step count or at the budget, whichever comes first.

    With ``checkpoint_path`` the state is saved atomically right after the schedule is planned,
    every ``checkpoint_every`` steps and at the end; calling again with the same path resumes
    from the last save: the same plan, the step count continued, the training time already
    spent counted against ``seconds``. The student passed on resume must have the saved shapes
    (re-prune it, or rebuild it with :func:`restore_pruned`). ``metadata`` (e.g. the pruning
    ratio) is stored in the checkpoint as is.

    Returns ``steps`` done, ``planned_steps``, training ``seconds`` spent (over all runs),
    ``train_loss`` (mean of the last 50 steps), ``step_seconds`` (probe) and ``resumed_from_step``.
    """
    if not seconds > 0:
        raise S2DError(f"fine-tune budget must be > 0 seconds, got {seconds}")
    if batch_size < 2:
        raise S2DError(f"batch size must be >= 2 (batch norm trains on batch statistics), got {batch_size}")
    if len(data.train) < batch_size:
        raise S2DError(f"the training split has {len(data.train)} images, fewer than one batch of {batch_size}; "
                       "pass a smaller batch size")
    config = dict(seconds=float(seconds), batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                  temperature=temperature, distill_weight=distill_weight, seed=seed)
    device = torch.device(device)
    student.to(device).train()
    teacher.to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    step, planned, spent, step_seconds, last_loss = 0, 0, 0.0, float("nan"), float("nan")
    if path is not None and path.exists():
        state = checkpoint.load(path)
        if state.get("format") != FINETUNE_FORMAT:
            raise CheckpointError(f"{path} is not a KD fine-tune checkpoint; pass another --checkpoint path")
        changed = [f"{k} {state['config'].get(k)} -> {v}" for k, v in config.items() if state["config"].get(k) != v]
        if changed:
            raise CheckpointError(f"{path} was planned with other settings ({'; '.join(changed)}): the schedule "
                                  "depends on them; pass the same settings or delete the checkpoint")
        checkpoint.load_into(student, state["state_dict"], str(path))
        opt.load_state_dict(state["optimizer"])
        step, planned, spent = state["step"], state["planned_steps"], state["seconds_spent"]
        step_seconds, last_loss = state["step_seconds"], state["train_loss"]
    resumed_from = step
    recent: deque[float] = deque(maxlen=50)

    def save() -> None:
        if path is not None:
            checkpoint.save_atomic({
                "format": FINETUNE_FORMAT, "state_dict": student.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "planned_steps": planned, "seconds_spent": spent, "step_seconds": step_seconds,
                "train_loss": sum(recent) / len(recent) if recent else last_loss, "config": config,
                "metadata": metadata or {},
            }, path)

    def result() -> dict[str, float]:
        return {"steps": step, "planned_steps": planned, "seconds": spent,
                "train_loss": sum(recent) / len(recent) if recent else last_loss, "step_seconds": step_seconds,
                "resumed_from_step": resumed_from}

    if planned and (step >= planned or spent >= seconds):
        return result()
    batches = Batches(data.train, data.info, batch_size, shuffle=True, augment=True, seed=seed * 7919 + step,
                      device=device)
    it = iter(batches)
    bar = tqdm(total=planned or None, initial=step, desc=tag, disable=not progress, leave=False)
    start, spent_before = time.perf_counter(), spent
    probe_start = None
    try:
        while True:
            x, y = next(it, (None, None))
            if x is None or len(x) < batch_size:  # drop the short last batch: steps stay alike for the plan
                it = iter(batches)
                continue
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(lr, step, planned) if planned else lr
            with torch.no_grad():
                target = teacher(x)
            logits, aux = split_outputs(student(x))
            loss = distillation_loss(logits, target, y, temperature, distill_weight) + aux_loss(aux, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            recent.append(loss.item())
            spent = spent_before + time.perf_counter() - start
            bar.update(1)
            if not planned:  # probing: time the steps after the warm-up, then size the cosine to the budget left
                if step - resumed_from == PROBE_WARMUP:
                    probe_start = time.perf_counter()
                elif step - resumed_from >= PROBE_STEPS:
                    step_seconds = (time.perf_counter() - probe_start) / (step - resumed_from - PROBE_WARMUP)
                    planned = step + max(0, int(SCHEDULE_MARGIN * (seconds - spent) / step_seconds))
                    bar.total = planned
                    bar.refresh()
                    save()
            if writer is not None and step % 10 == 0:
                writer.add_scalar(f"{tag}/loss", loss.item(), step)
                writer.add_scalar(f"{tag}/lr", opt.param_groups[0]["lr"], step)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            if (planned and step >= planned) or spent >= seconds:
                break
            if planned and step % checkpoint_every == 0:
                save()
    finally:
        bar.close()
    planned = planned or step  # the budget ran out while probing
    save()
    if writer is not None:
        writer.flush()
    return result()
