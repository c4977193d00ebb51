"""Graph analysis: trace a static CNN and decide how each node splits along channels.

The model is traced with ``torch.fx`` (module paths recorded per node, as in
torchvision's feature extraction). The graph is cut in two:

* the **trunk**, from the image to the last feature map ``F``, where every node gets a
  channel rule (dense conv, grouped conv, norm, channel-wise op, binary op, or *whole*);
* the **tail**, from ``F`` to the logits (global pooling, flatten, classifier), which only
  the final full-width stage runs, exactly as the static model does.

Exit points are cut points of the trunk (every later node depends on the input only
through them) at block outputs, named by the block's module path; ``F`` is ``output``.
An op with no channel rule (concatenation, shuffle, permute, LayerNorm, reshape) is
*whole*: every tensor it reads or writes, and everything tied to those channel by
channel, is computed in full by every stage, so the model still converts (depth-only
where nothing else is left to split) and ``why`` says which op kept what whole.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from s2d.errors import UnsupportedModelError

OUTPUT_EXIT = "output"

Width = float | tuple[float, ...]  # one width for every section, or one per section (non-uniform pruning)


def section_width(width: Width, section: int) -> float:
    """The width a stage of ``width`` has in ``section``."""
    return width if isinstance(width, float | int) else width[section]


def channels(width: float, c: int, quantum: int = 1) -> int:
    """Channels of a C-channel tensor that a stage of this width owns: a prefix of at least one unit.

    A unit is ``quantum`` channels: a grouped conv's input or output splits only between whole groups.
    """
    units = c // quantum
    return quantum * min(units, max(1, round(width * units)))


class Rule(str, Enum):
    """How a trunk node maps channels of its inputs to channels of its output."""

    INPUT = "input"  # the image: never split, every stage reads all of it
    CONV = "conv"  # dense conv: output channels read (a prefix of) input channels
    GROUPED = "grouped"  # conv with groups > 1: output group i reads input group i (depthwise: one channel each)
    NORM = "norm"  # batch norm: per-channel parameters and statistics
    CHANNELWISE = "channelwise"  # activation, pooling, dropout: channel i -> channel i
    BINARY = "binary"  # add / mul of two tensors with the same channels
    CONCAT = "concat"  # concatenation on channels: each input keeps its own segment, split by its own rule
    WHOLE = "whole"  # any other op (concat, shuffle, permute, LayerNorm, shapes): every stage computes all of it


_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.sigmoid, F.gelu, F.leaky_relu, F.mish, F.dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.sigmoid,
    torch.tanh,
}
try:  # stochastic depth (drop-path): identity in eval, a per-sample scale in training; channel i reads channel i
    from torchvision.ops import stochastic_depth

    _CHANNELWISE_FUNCTIONS.add(stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}
_BINARY_METHODS = {"add", "add_", "mul", "mul_"}
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOLING_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_KNOWN_CONCAT = {torch.cat, torch.concat, torch.stack}


class _PathTracer(fx.Tracer):
    """Records, on every node, the stack of module paths it was created in."""

    def __init__(self) -> None:
        super().__init__()
        self._stack: list[str] = []

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._stack.pop()

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["scopes"] = list(self._stack)
        return node


@dataclass
class TrunkNode:
    """One node of the trunk with what the transform engine needs to split it."""

    node: fx.Node
    index: int  # position in the trunk
    rule: Rule
    channels: int  # C of the output tensor
    spatial: tuple[int, int]
    inputs: list[str]  # names of trunk nodes read (tensor inputs only)
    section: int = 0
    width_section: int = 0  # the section whose width sets this node's channels (``_width_sections``)
    module: nn.Module | None = None
    quantum: int = 1  # channels per unit a width split keeps whole (a grouped conv's group)
    why: str = ""  # for a WHOLE node: why it cannot be split
    # Where the channels are a concatenation (the concat and what is tied to it channel by channel): the concat
    # node and its inputs with their channel offsets. None where a stage owns a prefix.
    source: TrunkNode | None = None
    segments: list[tuple[int, TrunkNode]] | None = None
    _owned: dict[Width, list[int]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.node.name

    def width_channels(self, width: Width) -> int:
        """Channels of this node a stage of ``width`` (in this node's section) owns (all of the image)."""
        if self.segments is not None:
            return len(self.owned(width))
        if self.rule is Rule.INPUT:
            return self.channels
        return channels(section_width(width, self.width_section), self.channels, self.quantum)

    def owned(self, width: Width) -> list[int]:
        """The channels a stage of ``width`` owns, in canonical order: a prefix, or after a concatenation
        each segment's own channels at its offset, segment after segment."""
        if width not in self._owned:
            if self.segments is None:
                self._owned[width] = list(range(self.width_channels(width)))
            else:
                self._owned[width] = [off + i for off, seg in self.segments for i in seg.owned(width)]
        return self._owned[width]


@dataclass
class Exit:
    name: str  # module path of the block, or "output"
    node: str  # trunk node name
    index: int  # trunk position
    channels: int
    spatial: tuple[int, int]
    section: int
    trunk_node: TrunkNode | None = field(default=None, repr=False)

    def width_channels(self, width: Width) -> int:
        return self.trunk_node.width_channels(width)

    def owned(self, width: Width) -> list[int]:
        """Channels of the exit's features a head of this width reads (see :meth:`TrunkNode.owned`)."""
        return self.trunk_node.owned(width)


@dataclass
class ModelGraph:
    """The analysed static model: traced module, trunk with rules, exits, tail."""

    gm: fx.GraphModule
    trunk: list[TrunkNode]
    tail: list[fx.Node]
    exits: list[Exit]
    num_sections: int
    input_shape: tuple[int, int, int]
    by_name: dict[str, TrunkNode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.trunk}

    def exit(self, name: str) -> Exit:
        for e in self.exits:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def exit_names(self) -> list[str]:
        return [e.name for e in self.exits]

    def truncated(self, *node_names: str) -> fx.GraphModule:
        """The static model up to the last of ``node_names``, returning their features (a tuple for several)."""
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        wanted, found = set(node_names), {}
        for n in self.gm.graph.nodes:
            if n.op == "output":
                break
            env[n] = g.node_copy(n, env.__getitem__)
            if n.name in wanted:
                found[n.name] = env[n]
                if len(found) == len(wanted):
                    break
        outs = [found[name] for name in node_names]
        g.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(self.gm, g)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm


def _where(node: fx.Node) -> str:
    scopes = node.meta.get("scopes") or []
    return f" in module {scopes[-1]!r}" if scopes else ""


def _unsupported(node: fx.Node, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot split node {node.name!r} (op {node.op} {_target_name(node)}{_where(node)}): {why}; "
        "s2d supports dense/grouped convs, batch norm, channel-wise activations/pooling, add and mul"
    )


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def _is_map(node: fx.Node) -> bool:
    """Whether the node outputs a 4D tensor (sizes, scalars and other ranks are not feature maps)."""
    return len(_shape(node) or ()) == 4


def channel_dim(shape: tuple[int, ...], channels: int) -> int | None:
    """The dim of a parameter of ``shape`` that lines up with dim 1 of an (N, C, H, W) map when broadcast
    (a layer scale of shape (C, 1, 1)), if it holds one value per channel; None otherwise."""
    if len(shape) > 4 or math.prod(shape) != channels:
        return None
    dim = 1 - (4 - len(shape))
    return dim if dim >= 0 and shape[dim] == channels else None


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    return math.prod(shape) if shape is not None else 1


def _is_pooling(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _POOLING)
    return node.op == "call_function" and node.target in _POOLING_FUNCTIONS


def trace(model: nn.Module) -> fx.GraphModule:
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise UnsupportedModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "models with data-dependent control flow are not supported"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _concat_dim(node: fx.Node) -> int:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _concat_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.args[0] if node.args else node.kwargs["tensors"])


def _batch_norm_owner(node: fx.Node, modules: dict[str, nn.Module]) -> nn.BatchNorm2d | None:
    """The batch norm module whose own statistics a ``F.batch_norm`` call reads (a norm + activation module
    such as timm's ``BatchNormAct2d`` traces to one), so the call splits like that module."""
    stats = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
    if not isinstance(stats, fx.Node) or stats.op != "get_attr":
        return None
    owner = modules.get(stats.target.rpartition(".")[0])
    return owner if isinstance(owner, nn.BatchNorm2d) else None


def _spatial_reduction(node: fx.Node) -> bool:
    """``x.mean((2, 3), keepdim=True)`` and the like: per channel, keeping a 4D map."""
    if node.target not in ("mean", "amax", "amin", "sum", torch.mean, torch.amax, torch.amin, torch.sum):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    keep = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2])
    return bool(keep) and isinstance(dims, tuple | list) and all(isinstance(d, int) and d % 4 in (2, 3)
                                                                   for d in dims)


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Rule, nn.Module | None, str]:
    """The node's channel rule, its module, and (for :attr:`Rule.WHOLE`) why it cannot be split."""
    if node.op == "placeholder":
        return Rule.INPUT, None, ""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d):
            return (Rule.CONV if m.groups == 1 else Rule.GROUPED), m, ""
        if isinstance(m, nn.BatchNorm2d):
            return Rule.NORM, m, ""
        if isinstance(m, _CHANNELWISE_MODULES):
            return Rule.CHANNELWISE, m, ""
        if isinstance(m, nn.ChannelShuffle):
            return Rule.WHOLE, m, "channel shuffle mixes channels across groups"
        return Rule.WHOLE, m, f"module {type(m).__name__} has no channel rule"
    if node.op == "call_function":
        if node.target is F.batch_norm and (bn := _batch_norm_owner(node, modules)) is not None:
            return Rule.NORM, bn, ""
        if node.target in _CHANNELWISE_FUNCTIONS or _spatial_reduction(node):
            return Rule.CHANNELWISE, None, ""
        if node.target in _BINARY_FUNCTIONS:
            return Rule.BINARY, None, ""
        if node.target in _KNOWN_CONCAT:
            if node.target is not torch.stack and _concat_dim(node) in (1, -3):
                return Rule.CONCAT, None, ""
            return Rule.WHOLE, None, "concatenation on a dim other than channels"
        if node.target is F.channel_shuffle or "shuffle" in _target_name(node):
            return Rule.WHOLE, None, "channel shuffle mixes channels across groups"
        return Rule.WHOLE, None, f"function {_target_name(node)} has no channel rule"
    if node.op == "call_method":
        if node.target in _CHANNELWISE_METHODS or _spatial_reduction(node):
            return Rule.CHANNELWISE, None, ""
        if node.target in _BINARY_METHODS:
            return Rule.BINARY, None, ""
        return Rule.WHOLE, None, f"tensor method {node.target} has no channel rule"
    return Rule.WHOLE, None, f"{node.op} node"


def _cut_points(nodes: list[fx.Node]) -> set[str]:
    """Nodes n such that no value computed before n is used after n."""
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users if u in pos), default=pos[n]) for n in nodes}
    cuts, reach = set(), -1  # reach: furthest use of any value strictly before the current node
    for i, n in enumerate(nodes):
        if reach <= i and n.op != "placeholder":
            cuts.add(n.name)
        reach = max(reach, last_use[n])
    return cuts


def _scope_outputs(nodes: list[fx.Node]) -> dict[str, str]:
    """Module path -> the name of the last node created inside it (its output)."""
    last: dict[str, str] = {}
    for n in nodes:
        for s in n.meta.get("scopes", []):
            last[s] = n.name
    return last


def _block_name(node: fx.Node, scope_out: dict[str, str], modules: dict[str, nn.Module]) -> str | None:
    """Name an exit after the block whose output it is.

    A block is a module inside an ``nn.Sequential``/``nn.ModuleList`` (``layer2.1``,
    ``features.6``) or a child of the model (``conv1``). Prefer the outermost non-leaf
    block inside a container (``features.1`` rather than ``features.1.block.2``), then a
    non-leaf child of the model, then a leaf (VGG's ``features.3``).
    """

    def parent(path: str) -> str:
        return path.rpartition(".")[0]

    def in_container(path: str) -> bool:
        return isinstance(modules.get(parent(path)), nn.Sequential | nn.ModuleList)

    owned = [s for s in node.meta.get("scopes", []) if scope_out.get(s) == node.name]
    non_leaf = [s for s in owned if any(True for _ in modules[s].children())]
    for group in (
        [s for s in non_leaf if in_container(s)],
        [s for s in non_leaf if parent(s) == ""],
    ):
        if group:
            return min(group, key=lambda s: s.count("."))
    leaves = [s for s in owned if in_container(s) or parent(s) == ""]
    return max(leaves, key=lambda s: s.count("."), default=None)


def _components(trunk: list[TrunkNode]) -> list[list[TrunkNode]]:
    """Nodes whose channels are tied one to one (see :func:`_tie_channels`), by union-find."""
    parent = {t.name: t.name for t in trunk}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for t in trunk:
        metadata = "tensor_meta" not in t.node.meta  # a shape, rank or assert reads no channel values
        if t.rule not in (Rule.INPUT, Rule.CONV, Rule.CONCAT) and not metadata:
            for a in t.inputs:
                parent[find(a)] = find(t.name)
    members: dict[str, list[TrunkNode]] = {}
    for t in trunk:
        members.setdefault(find(t.name), []).append(t)
    return list(members.values())


def _tie_channels(trunk: list[TrunkNode]) -> None:
    """Decide, for every node, which channels a stage of a given width owns.

    Channel i of a norm, activation or binary op reads channel i of its inputs, and a
    grouped conv's group i reads group i: such tensors form one component (union-find)
    that must be cut alike. A component is fed by its *sources*: dense convs, the image,
    concatenations. Fed by convs only, it is cut after the same number of units; its unit
    count is the gcd of the group counts of its grouped convs (its channels otherwise).
    Fed by one concatenation only (and free of grouped convs), each segment keeps its own
    channels. A component with the image or a :attr:`Rule.WHOLE` op in it has one unit:
    it is never split; so is one where a concatenation meets another source, and then the
    concatenation's inputs too (it reads all of them).
    """
    by_name = {t.name: t for t in trunk}
    while True:
        groups = _components(trunk)
        demoted = False
        for group in groups:
            concats = [t for t in group if t.rule is Rule.CONCAT]
            sources = [t for t in group if t.rule in (Rule.CONV, Rule.CONCAT, Rule.INPUT)]
            mixed = any(t.rule in (Rule.GROUPED, Rule.WHOLE, Rule.INPUT) for t in group)
            if concats and (len(sources) > 1 or mixed):
                for t in concats:
                    t.rule, t.why = Rule.WHOLE, "concatenation whose channels are also tied to another tensor"
                demoted = True
        if not demoted:
            break
    for group in groups:
        concat = next((t for t in group if t.rule is Rule.CONCAT), None)
        if concat is not None:
            segments, off = [], 0
            for a in _concat_inputs(concat.node):
                segments.append((off, by_name[a.name]))
                off += by_name[a.name].channels
            for t in group:
                t.source, t.segments = concat, segments
            continue
        units = 0
        for t in group:
            if t.rule in (Rule.INPUT, Rule.WHOLE):
                units = 1
            elif t.rule is Rule.GROUPED and units != 1:
                units = math.gcd(units, t.module.groups)
        if units and any(t.channels % units for t in group):  # groups that do not divide a tied tensor
            units = 1
        for t in group:
            t.quantum = t.channels // units if units else 1


def _channels_first(trunk: list[TrunkNode]) -> set[str]:
    """Names of the nodes whose output has channels on dim 1.

    Convs and norms need it; element-wise ops keep their inputs' layout; a whole op
    (concat, view, permute) is channels-first when it concatenates on dim 1 or when its
    output has the shape of the nearest channels-first tensor it derives from (a channel
    shuffle's view back, ConvNeXt's permute back), not after a permute to channels-last.
    """
    by_name = {t.name: t for t in trunk}
    nchw: set[str] = set()
    for t in trunk:
        shape = _shape(t.node)
        if t.rule in (Rule.INPUT, Rule.CONV, Rule.GROUPED, Rule.NORM):
            ok = True
        elif not _is_map(t.node):
            ok = False
        elif t.rule in (Rule.CHANNELWISE, Rule.BINARY):
            ok = all(a in nchw for a in t.inputs)
        elif t.node.target in _KNOWN_CONCAT:
            ok = _concat_dim(t.node) in (1, -3) and all(a in nchw for a in t.inputs)
        else:  # the nearest channels-first ancestors, breadth first
            frontier, seen, found = list(t.inputs), set(), []
            while frontier and not found:
                found = [a for a in frontier if a in nchw]
                seen.update(frontier)
                frontier = [b for a in frontier for b in by_name[a].inputs if b not in seen]
            ok = any(_shape(by_name[a].node) == shape for a in found)
        if ok:
            nchw.add(t.name)
    return nchw


def analyze(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelGraph:
    """Trace ``model`` (C, H, W input) and build its :class:`ModelGraph`."""
    model = model.eval()
    gm = trace(model)
    modules = dict(model.named_modules())  # the original containers (gm flattens them to nn.Module)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the traceback before it raises
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as e:
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise UnsupportedModelError(f"the model does not run on a {input_shape} input ({detail}); try another "
                                    "input size (a dataset with larger images)") from None
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model takes {len(placeholders)} inputs; s2d needs exactly one image input")

    # The classifier boundary: the first cut point whose output is a tensor but not a 4D feature map (a
    # reshape inside a block, such as a channel shuffle's 5D view, is not a cut point; a chunk's tuple is no
    # tensor).
    cuts = _cut_points(nodes)
    boundary = next((i for i, n in enumerate(nodes)
                     if n.op != "placeholder" and n.name in cuts and _shape(n) is not None and not _is_map(n)),
                    None)
    if boundary is None:
        raise UnsupportedModelError("the model never leaves 4D feature maps; s2d needs an image classifier")
    end = boundary  # trunk is nodes[:end]; trailing pooling and shape queries belong to the tail (heads pool too)
    while end > 1 and (_is_pooling(nodes[end - 1], modules) or not _is_map(nodes[end - 1])):
        end -= 1
    trunk_fx, tail = nodes[:end], nodes[end:]
    last = trunk_fx[-1]
    if last.name not in cuts:
        raise _unsupported(last, "the last feature map is not a cut point of the graph")
    for n in tail:  # the tail must read the trunk only through F
        for a in _tensor_inputs(n):
            if a in trunk_fx and a is not last:
                raise _unsupported(n, f"the classifier reads {a.name!r}, not only the last feature map")

    trunk: list[TrunkNode] = []
    names = set()
    for i, n in enumerate(trunk_fx):
        rule, module, why = _classify(n, modules)
        shape = _shape(n) or ()
        if rule is not Rule.INPUT and not _is_map(n):
            rule, why = Rule.WHOLE, why or f"output is a {len(shape)}D tensor, not a feature map"
        if rule in (Rule.BINARY, Rule.CHANNELWISE):
            chans = {(_shape(a) or (0, 0))[1] for a in _tensor_inputs(n)}
            params = [a for a in n.all_input_nodes if a.op == "get_attr" and _numel(a) > 1
                      and channel_dim(_shape(a) or (), shape[1] if len(shape) == 4 else -1) is None]
            if len(chans) > 1 or params:
                rule, why = Rule.WHOLE, "broadcasts over channels (inputs with different channel counts, or a " \
                                        "parameter that is not one value per channel)"
        ins = [a.name for a in _tensor_inputs(n)]
        for a in ins:
            if a not in names:
                raise _unsupported(n, f"reads {a!r} which is not part of the trunk")
        names.add(n.name)
        chans, spatial = (shape[1], (shape[2], shape[3])) if len(shape) == 4 else (1, (1, 1))
        trunk.append(TrunkNode(n, i, rule, chans, spatial, ins, module=module, why=why))

    _tie_channels(trunk)

    # Exit candidates: cut points at the end of a chain of channel-wise ops, at block outputs.
    scope_out = _scope_outputs(trunk_fx)
    rule_of = {t.name: t.rule for t in trunk}
    exits: list[Exit] = []
    nchw = _channels_first(trunk)
    for t in trunk[1:-1]:
        if t.name not in cuts or t.name not in nchw:
            continue  # a head reads channels on dim 1: not after a permute to channels-last
        users = [u.name for u in t.node.users if u.name in names]
        if len(users) == 1 and rule_of[users[0]] in (Rule.NORM, Rule.CHANNELWISE):
            continue
        block = _block_name(t.node, scope_out, modules)
        if block is not None:
            exits.append(Exit(block, t.name, t.index, t.channels, t.spatial, 0, t))
    # Drop exits nested inside another exit's block (e.g. an expansion inside an inverted residual).
    exit_names = {e.name for e in exits}
    exits = [e for e in exits if not any(e.name.startswith(o + ".") for o in exit_names)]
    exits = [e for e in exits if e.name != _block_name(last, scope_out, modules)]
    exits.append(Exit(OUTPUT_EXIT, last.name, len(trunk) - 1, trunk[-1].channels, trunk[-1].spatial, 0,
                      trunk[-1]))

    # Sections: runs of exits at the same resolution; every node belongs to the section of the next exit.
    section, prev = 0, exits[0].spatial
    for e in exits:
        if e.spatial != prev:
            section, prev = section + 1, e.spatial
        e.section = section
    j = 0
    for t in trunk:
        while exits[j].index < t.index:
            j += 1
        t.section = exits[j].section
    _width_sections(trunk)
    return ModelGraph(gm, trunk, tail, exits, section + 1, tuple(input_shape))


def _width_sections(trunk: list[TrunkNode]) -> None:
    """Per-section widths: every node of a component of tied channels (:func:`_components`: a dense conv's output
    and the norms, activations, depthwise convs and residual adds it reaches channel for channel, Torch-Pruning's
    dependency group) takes the width of the component's first section, so that tied tensors keep one channel
    count where a component crosses a section boundary (a depthwise conv right after the stem, a
    squeeze-excitation scale)."""
    for members in _components(trunk):  # each in trunk order, where sections only grow
        for t in members:
            t.width_section = members[0].section
