"""Importance-ordered channels: permute a static model so every layer's best channels come first.

Stages own *prefixes* of every layer's channels, so a width-``w`` stage keeps the first
``round(w * C)`` channels. In a pretrained model those are arbitrary; after
:func:`order_channels` they are the channels a structured pruner would keep.

A permutation must not change the function, so channels that are coupled (residual
adds, depthwise convs, concatenations, squeeze-excitation products) move together.
Torch-Pruning's ``DependencyGraph`` already finds those groups and maps indices through
concatenations and flattens, and its importance criteria score them; Torch-Pruning only
*removes* channels, so applying a permutation to every member of a group is done here.

Couplings the graph does not model (e.g. a channel shuffle, a residual add of the raw
input) would make a permutation change the outputs. Every group is therefore checked on
a random probe batch right after it is permuted, and undone and reported as skipped if
the outputs moved.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.pruner import function as tpf

from s2d.errors import S2DError, UnsupportedModelError

CRITERIA = ("l2", "l1", "bn_scale", "taylor")
PROBE_RTOL = 1e-4  # float reordering moves outputs by ~1e-6 (relative); a wrong permutation by O(1)

_OPS = tp.ops.OPTYPE
_DUMMY = {_OPS.ELEMENTWISE, _OPS.CONCAT, _OPS.SPLIT, _OPS.RESHAPE, _OPS.SLICE, _OPS.UNBIND, _OPS.EXPAND}
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class GroupOrder:
    """One permuted group: ``permutation[i]`` is the old root channel now at position ``i``."""

    root: str  # name of the layer whose output channels define the group
    layers: list[str]
    permutation: list[int]
    scores: list[float]  # importance of the new channels 0, 1, ... (descending; TP normalises to mean 1)


@dataclass
class SkippedGroup:
    """A group left in its original order, and why."""

    root: str
    channels: int
    reason: str


@dataclass
class ChannelOrder:
    """What :func:`order_channels` did, for reports and tests."""

    criterion: str
    groups: list[GroupOrder] = field(default_factory=list)
    skipped: list[SkippedGroup] = field(default_factory=list)

    @property
    def num_permuted(self) -> int:
        return len(self.groups)

    def top_share(self, fraction: float) -> float:
        """Share of total importance held by the first ``fraction`` of channels, averaged over groups.

        ``fraction`` itself means importance is spread evenly; close to 1 means a narrow
        prefix already holds most of what a pruner would keep.
        """
        shares = []
        for g in self.groups:
            s = torch.tensor(g.scores).clamp_min(0)
            k = max(1, round(fraction * len(s)))
            if s.sum() > 0:
                shares.append(float(s[:k].sum() / s.sum()))
        return sum(shares) / len(shares) if shares else float("nan")


def _scorer(criterion: str) -> tp.importance.Importance:
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _flat(out) -> Tensor:
    """All tensors of a model output (tensor, tuple, dict) as one flat vector."""
    if isinstance(out, Tensor):
        return out.detach().flatten().float()
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat(o) for o in out])


def _output_layers(dg: tp.DependencyGraph) -> list[nn.Module]:
    """The conv/linear layers whose output channels are the model's outputs (the classifier).

    Found by walking back from the graph's sinks through parameter-free ops and
    per-channel norms; those channels are the class scores and must keep their order.
    (TP adds an explicit output node only when the last op is not a module; a model
    ending in ``fc`` has ``fc`` itself as a sink.)
    """
    found: list[nn.Module] = []
    stack = [n for n in dg.module2node.values() if n.type == _OPS.OUTPUT or not n.outputs]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, (nn.modules.conv._ConvNd, nn.Linear)):
            found.append(node.module)
        else:
            stack.extend(node.inputs)
    return found


def _axes(dep: tp.Dependency) -> list[tuple[Tensor, int]] | str:
    """The tensors (with the dim) a permutation of ``dep``'s channels must move, or why it cannot.

    The pruning function TP chose for the dependency says which side of the layer the
    group's channels are on: out-channel handlers move rows, in-channel handlers columns.
    """
    m, fn, node = dep.target.module, dep.handler, dep.target
    if node.type in _DUMMY:
        return []
    if node.type == _OPS.OUTPUT:
        return "its channels reach the model output"
    if isinstance(m, nn.modules.conv._ConvNd):
        out_dim, in_dim = (1, 0) if m.transposed else (0, 1)
        if fn == tpf.prune_depthwise_conv_out_channels:  # TP ties a depthwise conv's in and out channels
            if not (m.groups == m.in_channels == m.out_channels):
                return f"conv with groups={m.groups}, {m.in_channels} -> {m.out_channels} channels"
            return [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])
        if m.groups > 1:
            return f"grouped conv (groups={m.groups}) couples channels block-wise"
        if fn == tpf.prune_conv_out_channels:
            return [(m.weight, out_dim)] + ([(m.bias, 0)] if m.bias is not None else [])
        if fn == tpf.prune_conv_in_channels:
            return [(m.weight, in_dim)]
    elif isinstance(m, nn.Linear):
        if fn == tpf.prune_linear_out_channels:
            return [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])
        if fn == tpf.prune_linear_in_channels:
            return [(m.weight, 1)]
    elif isinstance(m, _CHANNEL_NORMS):
        names = ("weight", "bias", "running_mean", "running_var")
        return [(t, 0) for t in (getattr(m, n, None) for n in names) if t is not None]
    elif isinstance(m, nn.GroupNorm):
        if m.num_groups not in (1, m.num_channels):  # statistics are pooled per block of channels
            return f"GroupNorm with {m.num_groups} groups pools statistics across channels"
        return [(t, 0) for t in (m.weight, m.bias) if t is not None]
    elif isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            return f"LayerNorm over {tuple(m.normalized_shape)}"
        return [(t, 0) for t in (m.weight, m.bias) if t is not None]
    elif isinstance(m, nn.PReLU):
        return [(m.weight, 0)] if m.num_parameters > 1 else []
    elif isinstance(m, nn.Parameter) and node.type == _OPS.PARAMETER:
        return [(m, node.pruning_dim)]
    return f"no permutation rule for {type(m).__name__} ({getattr(fn, '__name__', fn)})"


def _index(idxs: list[int], root_idxs: list[int], order: Tensor, size: int) -> Tensor | str:
    """Gather index for one dependency: ``new[idxs[j]] = old[idxs[p[j]]]`` through the root mapping.

    A dependency may see each root channel once (conv, BN), at an offset (after a
    concatenation) or as several consecutive entries (a flatten before a linear layer);
    it has to see every root channel equally often, or moving channels across the
    uncovered part (a split or slice) would change what the layers behind it read.
    """
    if any(r is None for r in root_idxs):
        return "TP's index mapping lost the root channel"
    channels = len(order)
    idx, root = torch.tensor(idxs, dtype=torch.long), torch.tensor(root_idxs, dtype=torch.long)
    if len(idx) == 0 or int(idx.max()) >= size or int(idx.min()) < 0:
        return "index mapping out of range"
    if int(root.min()) < 0 or int(root.max()) >= channels:
        return "root index out of range"
    counts = torch.bincount(root, minlength=channels)
    if int(counts.min()) == 0:
        return "a split or slice sees only part of the channels"
    if int(counts.max()) != int(counts.min()):
        return "uneven index mapping"
    if len(set(idxs)) != len(idxs):
        return "an index is mapped twice"
    by_idx = torch.argsort(idx)
    idx, root = idx[by_idx], root[by_idx]
    rows = idx[torch.argsort(root, stable=True)].view(channels, -1)  # row r: root r's indices, ascending
    index = torch.arange(size)
    index[rows.flatten()] = rows[order].flatten()
    return index


def _plan(group, order: Tensor) -> list[tuple[Tensor, int, Tensor]] | str:
    """Every (tensor, dim, gather index) the group's permutation touches, or why it cannot be applied."""
    moves = []
    for item in group:
        axes = _axes(item.dep)
        if isinstance(axes, str):
            return f"{_name(item.dep)}: {axes}"
        for t, dim in axes:
            index = _index(list(item.idxs), list(item.root_idxs), order, t.shape[dim])
            if isinstance(index, str):
                return f"{_name(item.dep)}: {index}"
            moves.append((t, dim, index.to(t.device)))
    return moves


@torch.no_grad()
def _apply(moves: list[tuple[Tensor, int, Tensor]], inverse: bool = False) -> None:
    """Gather every tensor (and its gradient, so Taylor scores of later groups stay valid) in place."""
    for t, dim, index in moves:
        if inverse:
            index = torch.argsort(index)
        t.copy_(t.index_select(dim, index))
        if t.grad is not None:
            t.grad.copy_(t.grad.index_select(dim, index))


def _name(dep: tp.Dependency) -> str:
    return dep.target._name or type(dep.target.module).__name__


def _sorted_copy(group) -> tp.Group:
    """A copy of ``group`` with each item's indices sorted together with their root indices.

    TP's Taylor importance sorts ``idxs`` in place without their ``root_idxs``, which would
    scramble the score-to-channel mapping of an unsorted item (and corrupt the group).
    """
    copy = tp.Group()
    for item in group:
        pairs = sorted(zip(item.idxs, item.root_idxs, strict=True))
        copy.add_dep(item.dep, [i for i, _ in pairs])
        copy[-1].root_idxs = [r for _, r in pairs]
    copy._DG = group._DG
    return copy


def _taylor_gradients(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> None:
    """Cross-entropy gradients summed over ``batches``, in eval mode so BN statistics stay as they are."""
    model.zero_grad(set_to_none=True)
    n = 0
    with torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            n += 1
    if n == 0:
        raise S2DError("criterion 'taylor' got an empty batch iterable; pass at least one (images, labels) batch")


def order_channels(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    criterion: str = "l2",
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
) -> ChannelOrder:
    """Permute ``model``'s channels in place, most important first, one Torch-Pruning group at a time.

    Afterwards every width prefix holds the channels a pruner with the same criterion
    would keep. The function is unchanged (each group is verified on a probe batch);
    groups that cannot be permuted exactly keep their order and are listed in
    ``skipped``. The classifier's outputs (the class order) are never permuted.
    ``criterion`` is one of :data:`CRITERIA`; ``taylor`` needs ``batches`` of
    (images, labels) for the gradients. Taylor leaves ``.grad`` cleared.
    """
    if criterion not in CRITERIA:
        raise S2DError(f"unknown importance criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if criterion == "taylor" and batches is None:
        raise S2DError("criterion 'taylor' needs gradients: pass batches=(images, labels) batches")
    was_training = model.training  # TP's tracer switches the model to eval mode and leaves it there
    try:
        return _order(model, input_shape, criterion, batches)
    finally:
        if criterion == "taylor":
            model.zero_grad(set_to_none=True)
        model.train(was_training)


def _order(model: nn.Module, input_shape: tuple[int, int, int], criterion: str,
           batches: Iterable[tuple[Tensor, Tensor]] | None) -> ChannelOrder:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.enable_grad():  # TP traces through autograd
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(1, *input_shape, device=device), verbose=False)
    except Exception as e:  # TP fails in many ways (ZeroDivisionError in a reshape mapping, KeyError, ...)
        where = traceback.extract_tb(e.__traceback__)[-1].name
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise UnsupportedModelError(
            f"Torch-Pruning cannot build the dependency graph of {type(model).__name__} "
            f"({type(e).__name__} in {where}: {detail}); channel ordering needs a model its tracer understands"
        ) from None
    names = {m: n for n, m in model.named_modules()}
    result = ChannelOrder(criterion)
    model.eval()
    if criterion == "taylor":
        _taylor_gradients(model, batches, device)
    probe = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = _flat(model(probe))
    scorer = _scorer(criterion)
    groups = dg.get_all_groups(ignored_layers=_output_layers(dg), root_module_types=[nn.Conv2d, nn.Linear])
    for group in groups:
        outcome = _order_group(group, model, names, scorer, criterion, lambda: _flat(model(probe)), reference)
        if isinstance(outcome, GroupOrder):
            result.groups.append(outcome)
        else:
            root = names.get(group[0].dep.target.module, _name(group[0].dep))
            result.skipped.append(SkippedGroup(root, len(group[0].idxs), outcome))
    return result


@torch.no_grad()
def _order_group(group, model: nn.Module, names: dict[nn.Module, str], scorer: tp.importance.Importance,
                 criterion: str, probe: Callable[[], Tensor], reference: Tensor) -> GroupOrder | str:
    """Score one group, permute it, check the probe outputs did not move; the reason if it is left as is."""
    layers = list(dict.fromkeys(names[it.dep.target.module] for it in group if it.dep.target.module in names))
    if criterion == "taylor":
        missing = [n for n in layers if _lacks_grad(model.get_submodule(n))]
        if missing:
            return f"no gradient for {missing[0]} (frozen parameters?)"
    scores = scorer(_sorted_copy(group))
    if scores is None:
        return f"criterion {criterion!r} finds no layer to score in this group"
    if not torch.isfinite(scores).all():
        return f"criterion {criterion!r} gives non-finite scores (all zero?)"
    order = torch.argsort(scores, descending=True, stable=True).cpu()  # ties keep their order
    moves = _plan(group, order)
    if isinstance(moves, str):
        return moves
    _apply(moves)
    error = float((probe() - reference).abs().max())
    if error > PROBE_RTOL * max(float(reference.abs().max()), 1e-6):
        _apply(moves[::-1], inverse=True)
        return (f"permuting changed the outputs by {error:.2g}: a coupling TP's graph does not model "
                "(channel shuffle, raw-input residual, chunk + cat, ...)")
    root = names.get(group[0].dep.target.module, _name(group[0].dep))
    return GroupOrder(root, layers, order.tolist(), scores[order].tolist())


def _lacks_grad(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.grad is None
