"""Graph analysis: trace a static CNN and decide how each node splits along channels.

The model is traced with ``torch.fx`` (module paths recorded per node, as in
torchvision's feature extraction). The graph is cut in two:

* the **trunk**, from the image to the last feature map ``F``, where every node gets a
  channel rule (dense conv, depthwise conv, norm, channel-wise op, binary op);
* the **tail**, from ``F`` to the logits (global pooling, flatten, classifier), which only
  the final full-width stage runs, exactly as the static model does.

Exit points are cut points of the trunk (every later node depends on the input only
through them) at block outputs, named by the block's module path; ``F`` is ``output``.
Anything the engine cannot split raises :class:`UnsupportedModelError` naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from s2d.errors import UnsupportedModelError

OUTPUT_EXIT = "output"


class Rule(str, Enum):
    """How a trunk node maps channels of its inputs to channels of its output."""

    INPUT = "input"  # the image: never split, every stage reads all of it
    CONV = "conv"  # dense conv: output channels read (a prefix of) input channels
    DEPTHWISE = "depthwise"  # conv with groups == channels: channel i reads channel i
    NORM = "norm"  # batch norm: per-channel parameters and statistics
    CHANNELWISE = "channelwise"  # activation, pooling, dropout: channel i -> channel i
    BINARY = "binary"  # add / mul of two tensors with the same channels


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
    module: nn.Module | None = None

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class Exit:
    name: str  # module path of the block, or "output"
    node: str  # trunk node name
    index: int  # trunk position
    channels: int
    spatial: tuple[int, int]
    section: int


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
        "s2d supports dense/depthwise convs, batch norm, channel-wise activations/pooling, add and mul"
    )


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


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


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Rule, nn.Module | None]:
    if node.op == "placeholder":
        return Rule.INPUT, None
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                return Rule.CONV, m
            if m.groups == m.in_channels == m.out_channels:
                return Rule.DEPTHWISE, m
            raise _unsupported(node, f"grouped conv (groups={m.groups}, {m.in_channels}->{m.out_channels} "
                                     "channels) whose groups a channel split would break")
        if isinstance(m, nn.BatchNorm2d):
            return Rule.NORM, m
        if isinstance(m, _CHANNELWISE_MODULES):
            return Rule.CHANNELWISE, m
        if isinstance(m, nn.ChannelShuffle):
            raise _unsupported(node, "channel shuffle mixes channels across stages")
        raise _unsupported(node, f"module type {type(m).__name__} has no channel rule")
    if node.op == "call_function":
        if node.target in _CHANNELWISE_FUNCTIONS:
            return Rule.CHANNELWISE, None
        if node.target in _BINARY_FUNCTIONS:
            return Rule.BINARY, None
        if node.target in _KNOWN_CONCAT:
            raise _unsupported(node, "channel concat (DenseNet/Inception-style) ties channels of different tensors")
        if node.target is F.channel_shuffle or "shuffle" in _target_name(node):
            raise _unsupported(node, "channel shuffle mixes channels across stages")
        raise _unsupported(node, "unknown function")
    if node.op == "call_method":
        if node.target in _CHANNELWISE_METHODS:
            return Rule.CHANNELWISE, None
        if node.target in _BINARY_METHODS:
            return Rule.BINARY, None
        raise _unsupported(node, "unknown tensor method (reshapes/views inside the trunk cannot be split)")
    raise _unsupported(node, "unexpected node kind")


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


def analyze(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelGraph:
    """Trace ``model`` (C, H, W input) and build its :class:`ModelGraph`."""
    model = model.eval()
    gm = trace(model)
    modules = dict(model.named_modules())  # the original containers (gm flattens them to nn.Module)
    try:
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    except Exception as e:
        raise UnsupportedModelError(f"shape propagation failed on a {input_shape} input ({e})") from None
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model takes {len(placeholders)} inputs; s2d needs exactly one image input")

    # The classifier boundary: the first node whose output is not a 4D feature map.
    boundary = next((i for i, n in enumerate(nodes) if n.op != "placeholder" and len(_shape(n) or ()) != 4), None)
    if boundary is None:
        raise UnsupportedModelError("the model never leaves 4D feature maps; s2d needs an image classifier")
    end = boundary  # trunk is nodes[:end]; trailing pooling belongs to the tail (the head pools too)
    while end > 1 and _is_pooling(nodes[end - 1], modules):
        end -= 1
    trunk_fx, tail = nodes[:end], nodes[end:]
    cuts = _cut_points(nodes)
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
        rule, module = _classify(n, modules)
        shape = _shape(n)
        if shape is None or len(shape) != 4:
            raise _unsupported(n, f"output is not a 4D feature map (shape {shape})")
        ins = [a.name for a in _tensor_inputs(n)]
        if rule is Rule.BINARY:
            tensors = [a for a in _tensor_inputs(n)]
            chans = {(_shape(a) or (0, 0))[1] for a in tensors}
            if len(chans) > 1:
                raise _unsupported(n, f"binary op on tensors with different channel counts {sorted(chans)}")
        for a in ins:
            if a not in names:
                raise _unsupported(n, f"reads {a!r} which is not part of the trunk")
        names.add(n.name)
        trunk.append(TrunkNode(n, i, rule, shape[1], (shape[2], shape[3]), ins, module=module))

    # Exit candidates: cut points at the end of a chain of channel-wise ops, at block outputs.
    scope_out = _scope_outputs(trunk_fx)
    rule_of = {t.name: t.rule for t in trunk}
    exits: list[Exit] = []
    for t in trunk[1:-1]:
        if t.name not in cuts:
            continue
        users = [u.name for u in t.node.users if u.name in names]
        if len(users) == 1 and rule_of[users[0]] in (Rule.NORM, Rule.CHANNELWISE):
            continue
        block = _block_name(t.node, scope_out, modules)
        if block is not None:
            exits.append(Exit(block, t.name, t.index, t.channels, t.spatial, 0))
    # Drop exits nested inside another exit's block (e.g. an expansion inside an inverted residual).
    exit_names = {e.name for e in exits}
    exits = [e for e in exits if not any(e.name.startswith(o + ".") for o in exit_names)]
    exits = [e for e in exits if e.name != _block_name(last, scope_out, modules)]
    exits.append(Exit(OUTPUT_EXIT, last.name, len(trunk) - 1, trunk[-1].channels, trunk[-1].spatial, 0))

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
    return ModelGraph(gm, trunk, tail, exits, section + 1, tuple(input_shape))
