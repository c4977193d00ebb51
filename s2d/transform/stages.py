"""Code generation: one ``torch.fx.GraphModule`` per stage of a ``MultiStageArch``.

Stage ``s`` (width ``w_s``, exit ``e_s``) computes, for every trunk node up to ``e_s``,
the output channels ``[k, c)`` that no earlier stage computed there: ``c = c_s(C)``
and ``k = c_{s-1}(C)`` if stage ``s-1`` reached the node, else 0. Its inputs are the
image and the cached features of stage ``s-1``; its outputs are its logits and the
features later stages read. A dense conv's new channels read input channels
``[0, c_in)`` (reuse on, or the first stage at that node) or only the new ones
``[c_{s-1}(C_in), c_in)`` (reuse off); every other op is channel-wise. Earlier
channels never read later ones, so cached features are exact. A recomputing last stage
(a cascade) reads no cache: it is the static network's graph inlined on its own weights.

``[k, c)`` are positions in the stage's tensor. They are the channels themselves, except
after a concatenation, where each segment keeps its own channels: position ``i`` then
holds channel ``layout[i]`` (``StageGeometry.layout``), and the layers reading it take
their weights by index.

The same graph runs with shared supernet weights (``Sliced*`` modules) for training
and is materialised with copied weights for deployment, export and fvcore.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from s2d.transform.arch import MultiStageArch
from s2d.transform.fold import fold_narrow_convs
from s2d.transform.graph import OUTPUT_EXIT, ModelGraph, Rule, TrunkNode, Width, channel_dim, section_width
from s2d.transform.sliced import Channels, ChannelSelect, FrozenModule, SlicedBatchNorm2d, SlicedConv2d


def head_key(exit_name: str, width: float) -> str:
    """ModuleDict key of the head for (exit, width): no dots allowed there."""
    return f"{exit_name.replace('.', '_')}__w{round(width * 8)}"


def exit_width(graph: ModelGraph, exit_name: str, width: Width) -> float:
    """The width that sets a stage's channels at its exit (all a head or the classifier sees of it)."""
    return section_width(width, graph.exit(exit_name).trunk_node.width_section)


def reads_tail(graph: ModelGraph, exit_name: str, width: Width) -> bool:
    """Whether a stage of ``width`` exiting at ``exit_name`` classifies with the static model's own tail (pooling
    and classifier) instead of an exit head: at the output, with every channel there (the last stage at width 1,
    or an earlier one tapered to full width in the last section)."""
    return exit_name == OUTPUT_EXIT and exit_width(graph, exit_name, width) == 1.0


def stage_head_key(graph: ModelGraph, exit_name: str, width: Width) -> str:
    """The head a stage of ``width`` exiting at ``exit_name`` reads: stages that differ only away from the exit
    share it."""
    return head_key(exit_name, exit_width(graph, exit_name, width))


@dataclass
class StageGeometry:
    """Which channels of which trunk nodes stage ``s`` computes."""

    index: int
    last: bool
    exit_index: int  # trunk position of this stage's exit
    prev_exit_index: int  # trunk position of stage s-1's exit, -1 for the first stage
    width: Width
    prev_width: Width
    prev: StageGeometry | None = None
    _layouts: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def c(self, t: TrunkNode) -> int:
        return t.width_channels(self.width)

    def k(self, t: TrunkNode) -> int:
        """Channels of ``t`` already computed (and cached) by earlier stages."""
        if t.rule is Rule.INPUT or t.index > self.prev_exit_index:
            return 0
        return t.width_channels(self.prev_width)

    def layout(self, t: TrunkNode) -> list[int] | None:
        """The channel of ``t`` held at each position of this stage's tensor (cached positions first, then the
        new ones), where ``t`` is a concatenation or tied to one; None where positions are channels (a prefix).

        A concatenation's new positions are each segment's new channels, segment after segment.
        """
        if t.segments is None:
            return None
        src = t.source
        if src.name not in self._layouts:
            reached = self.k(src) > 0
            held = list(self.prev.layout(src)) if reached else []
            for off, a in src.segments:
                lo, hi, inner = (self.k(a) if reached else 0), self.c(a), self.layout(a)
                held.extend(off + i for i in (inner[lo:hi] if inner is not None else range(lo, hi)))
            self._layouts[src.name] = held
        return self._layouts[src.name]

    def channels(self, t: TrunkNode, a: int, b: int) -> Channels:
        """The channels of ``t`` at positions [a, b) of this stage's tensor: a range, or indices."""
        layout = self.layout(t)
        if layout is None:
            return a, b
        held = layout[a:b]
        return (held[0], held[-1] + 1) if held == list(range(held[0], held[0] + len(held))) else held


def geometries(graph: ModelGraph, arch: MultiStageArch) -> list[StageGeometry]:
    out, prev_e, prev_w, prev = [], -1, 0.0, None
    for i, st in enumerate(arch.stages):
        e = graph.exit(st.exit).index
        prev = StageGeometry(i, i == arch.num_stages - 1, e, prev_e, st.width, prev_w, prev)
        out.append(prev)
        prev_e, prev_w = e, st.width
    return out


@dataclass
class _Emitter:
    """Builds the fx graph of one stage; records which cached nodes it reads."""

    graph: ModelGraph
    arch: MultiStageArch
    geo: StageGeometry
    heads: nn.ModuleDict
    cache_in: list[str]
    g: fx.Graph = field(default_factory=fx.Graph)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    reads: set[str] = field(default_factory=set)
    new: dict[str, fx.Node] = field(default_factory=dict)
    cached: dict[str, fx.Node] = field(default_factory=dict)
    memo: dict[tuple[str, int, int], fx.Node] = field(default_factory=dict)

    def _module(self, name: str, m: nn.Module) -> str:
        self.modules[name] = m
        return name

    def slice(self, name: str, a: int, b: int) -> fx.Node:
        """Channels [a, b) of trunk node ``name`` at this stage, from cache and/or new values."""
        t = self.graph.by_name[name]
        if t.rule is Rule.INPUT:
            return self.new[name]
        if (name, a, b) in self.memo:  # e.g. a block's conv and its shortcut read the same input
            return self.memo[name, a, b]
        k = self.geo.k(t)
        pieces = []
        if a < k:
            self.reads.add(name)
            src = self.cached.get(name)
            if src is None:  # first pass: only record the read
                src = self.g.placeholder(f"cache_{name}")
                self.cached[name] = src
            hi = min(b, k)
            pieces.append(src if (a, hi) == (0, k) else self.g.call_function(torch.narrow, (src, 1, a, hi - a)))
        if b > k:
            src = self.new[name]
            lo, hi, c = max(a, k) - k, b - k, self.geo.c(t) - k
            pieces.append(src if (lo, hi) == (0, c) else self.g.call_function(torch.narrow, (src, 1, lo, hi - lo)))
        out = pieces[0] if len(pieces) == 1 else self.g.call_function(torch.cat, (pieces, 1))
        self.memo[name, a, b] = out
        return out

    def attr(self, target: str, owner: nn.Module | None = None, prefix: str = "attr",
             selection: Channels | None = None, channels: int = 0) -> fx.Node:
        """A parameter or buffer of ``owner`` (the static model) that an op reads, such as a layer scale:
        shared, not copied, so supernet training updates it like a conv's weight. With ``selection``, a
        per-channel one is cut to those channels of a ``channels``-channel map."""
        name = f"{prefix}_{target.replace('.', '_')}"
        value = owner if owner is not None else self.graph.gm
        for part in target.split("."):
            value = getattr(value, part)
        self.modules[name] = value
        node = self.g.get_attr(name)
        dim = channel_dim(tuple(value.shape), channels) if selection is not None else None
        if dim is None or selection == (0, channels):
            return node
        return self.select(node, selection, dim, f"sel_{name}")

    def select(self, node: fx.Node, selection: Channels, dim: int, key: str) -> fx.Node:
        if isinstance(selection, tuple):
            return self.g.call_function(torch.narrow, (node, dim, selection[0], selection[1] - selection[0]))
        return self.g.call_module(self._module(key, ChannelSelect(selection, dim)), (node,))

    def _conv_input_range(self, t: TrunkNode, p: TrunkNode) -> tuple[int, int]:
        c_in = self.geo.c(p)
        if p.rule is Rule.INPUT or self.geo.k(t) == 0 or self.arch.stages[self.geo.index].reuse_in(t.section):
            return 0, c_in
        own = p.width_channels(self.geo.prev_width)
        return (own, c_in) if own < c_in else (0, c_in)  # no own input channels: read what exists

    def node(self, t: TrunkNode) -> None:
        k, c = self.geo.k(t), self.geo.c(t)
        if c <= k:
            return  # every channel of this node is cached
        name, fxn = t.name, t.node
        if t.rule in (Rule.CONV, Rule.GROUPED):
            p = self.graph.by_name[t.inputs[0]]
            if t.rule is Rule.CONV:
                lo, hi = self._conv_input_range(t, p)
                mod = SlicedConv2d(t.module, (k, c), None if p.rule is Rule.INPUT else self.geo.channels(p, lo, hi))
            else:  # the new output groups read their own input groups
                per_out, per_in = t.channels // t.module.groups, p.channels // t.module.groups
                lo, hi = k // per_out * per_in, c // per_out * per_in
                mod = SlicedConv2d(t.module, (k, c), (lo, hi), grouped=True)
            inp = self.slice(p.name, lo, hi)
            self.new[name] = self.g.call_module(self._module(f"m_{name}", mod), (inp,))
        elif t.rule is Rule.NORM:
            inp = self.slice(t.inputs[0], k, c)
            bn = SlicedBatchNorm2d(t.module, self.geo.channels(t, k, c))
            self.new[name] = self.g.call_module(self._module(f"m_{name}", bn), (inp,))
        elif t.rule is Rule.CONCAT:  # each segment's new channels, segment after segment
            pieces = [self.slice(a.name, self.geo.k(a) if k else 0, self.geo.c(a)) for _, a in t.segments
                      if self.geo.c(a) > (self.geo.k(a) if k else 0)]
            self.new[name] = pieces[0] if len(pieces) == 1 else self.g.call_function(torch.cat, (pieces, 1))
        else:  # channel-wise and binary ops: the same op on the new channels of every input; whole ops: on all
            def arg(a):
                if not isinstance(a, fx.Node):
                    return a
                if a.op == "get_attr":
                    return self.attr(a.target, selection=None if t.rule is Rule.WHOLE else self.geo.channels(t, k, c),
                                     channels=t.channels)
                if t.rule is Rule.WHOLE:
                    return self.slice(a.name, 0, self.geo.c(self.graph.by_name[a.name]))
                return self.slice(a.name, k, c)

            args = fx.node.map_arg(fxn.args, arg)
            kwargs = fx.node.map_arg(fxn.kwargs, arg)
            if fxn.op == "call_module":
                target = self._module(f"m_{name}", t.module)
                self.new[name] = self.g.call_module(target, args, kwargs)
            elif fxn.op == "call_method":
                self.new[name] = self.g.call_method(fxn.target, args, kwargs)
            else:
                self.new[name] = self.g.call_function(fxn.target, args, kwargs)

    def head(self) -> fx.Node:
        exit_ = self.graph.exit(self.arch.stages[self.geo.index].exit)
        t = self.graph.by_name[exit_.node]
        feats = self.slice(t.name, 0, self.geo.c(t))
        layout = self.geo.layout(t)
        if layout is not None:  # after a concatenation: channels in the order the head (or classifier) reads
            position = {ch: i for i, ch in enumerate(layout)}
            order = [position[ch] for ch in t.owned(self.geo.width)]
            if order != list(range(len(order))):
                feats = self.select(feats, order, 1, f"order_{t.name}")
        if not reads_tail(self.graph, exit_.name, self.geo.width):  # e.g. a last stage narrow at the output
            key = stage_head_key(self.graph, exit_.name, self.geo.width)
            return self.g.call_module(self._module(f"head_{key}", self.heads[key]), (feats,))
        # The static model's own tail (pooling, flatten, classifier) on all the output's channels.
        env: dict[fx.Node, fx.Node] = {t.node: feats}
        self._inline(self.graph.tail, env, self.graph.gm, "tail")
        return env[self.graph.tail[-1]]

    def _inline(self, nodes, env: dict[fx.Node, fx.Node], owner: nn.Module, prefix: str,
                wrap=lambda m: m) -> None:
        """Copy static-graph ``nodes`` into this stage (``env`` maps their inputs), calling ``owner``'s modules
        (through ``wrap``) under ``prefix``-ed names."""
        modules = dict(owner.named_modules())

        def lookup(a: fx.Node) -> fx.Node:
            if a not in env and a.op == "get_attr":
                env[a] = self.attr(a.target, owner, prefix)
            return env[a]

        for n in nodes:
            if n.op == "call_module":
                target = self._module(f"{prefix}_{n.target.replace('.', '_')}", wrap(modules[n.target]))
                env[n] = self.g.call_module(target, fx.node.map_arg(n.args, lookup), fx.node.map_arg(n.kwargs, lookup))
            elif n.op != "get_attr":
                env[n] = self.g.node_copy(n, lookup)

    def recompute(self, reference: nn.Module) -> None:
        """The static network inlined from the image (no cache read), on ``reference``'s frozen weights, so
        that batch norm folds into its convs on materialisation like any other stage's."""
        nodes = list(self.graph.gm.graph.nodes)
        env: dict[fx.Node, fx.Node] = {n: self.g.placeholder("x") for n in nodes if n.op == "placeholder"}
        body = [n for n in nodes if n.op not in ("placeholder", "output")]
        self._inline(body, env, reference, "static", wrap=FrozenModule)
        out = next(n for n in nodes if n.op == "output")
        self.g.output((fx.node.map_arg(out.args[0], env.__getitem__),))

    def emit(self, cache_out: list[str], reference: nn.Module | None = None) -> None:
        if self.arch.stages[self.geo.index].recompute:
            if reference is None:
                raise ValueError("a recomputing stage needs the static network's weights (reference)")
            self.recompute(reference)
            return
        x_node = self.graph.trunk[0]
        self.new[x_node.name] = self.g.placeholder("x")
        for name in self.cache_in:
            self.cached[name] = self.g.placeholder(f"cache_{name}")
        for t in self.graph.trunk[1 : self.geo.exit_index + 1]:
            self.node(t)
        logits = self.head()
        outs = [self.slice(n, 0, self.geo.c(self.graph.by_name[n])) for n in cache_out]
        self.g.output((logits, *outs))


@dataclass
class StagePlan:
    """The generated stages of one arch, with what each passes to the next."""

    arch: MultiStageArch
    stages: list[fx.GraphModule]
    cache_in: list[list[str]]
    cache_out: list[list[str]]


def build_stages(graph: ModelGraph, arch: MultiStageArch, heads: nn.ModuleDict,
                 reference: nn.Module | None = None) -> StagePlan:
    """Generate every stage of ``arch`` over shared weights (the supernet's); a recomputing last stage
    runs on ``reference`` (the untouched static network) instead."""
    geos = geometries(graph, arch)
    order = {t.name: t.index for t in graph.trunk}
    # Pass 1: which cached nodes does each stage read directly?
    direct = []
    for geo in geos:
        em = _Emitter(graph, arch, geo, heads, [])
        em.emit([], reference)
        direct.append(em.reads)
    # Pass 2 (backwards): a stage must also forward the cached channels later stages need.
    cache_in: list[list[str]] = [[] for _ in geos]
    cache_out: list[list[str]] = [[] for _ in geos]
    needed: set[str] = set()
    for geo in reversed(geos):
        cache_out[geo.index] = sorted(needed, key=order.__getitem__)
        ins = set(direct[geo.index]) | {n for n in needed if geo.k(graph.by_name[n]) > 0}
        cache_in[geo.index] = sorted(ins, key=order.__getitem__)
        needed = ins
    stages = []
    for geo in geos:
        em = _Emitter(graph, arch, geo, heads, cache_in[geo.index])
        em.emit(cache_out[geo.index], reference)
        em.g.lint()
        stages.append(fx.GraphModule(em.modules, em.g, f"Stage{geo.index + 1}"))
    return StagePlan(arch, stages, cache_in, cache_out)


def materialise(stage: fx.GraphModule, fold_bn: bool = True) -> nn.Module:
    """A standalone copy of a stage: sliced weights copied out, batch norm folded into convs and, as deployed,
    narrow convs on several images at once (:mod:`s2d.transform.fold`). Without ``fold_bn`` (what fvcore
    counts), a plain ``fx.GraphModule`` of the stage's own ops."""
    modules = {}
    for name, m in stage._modules.items():  # not named_children(): it drops modules registered twice
        copied = isinstance(m, SlicedConv2d | SlicedBatchNorm2d | FrozenModule)
        modules[name] = m.materialise() if copied else copy.deepcopy(m)
    for n in stage.graph.nodes:  # parameters and buffers read directly by ops (layer scales)
        if n.op == "get_attr":
            modules[n.target] = getattr(stage, n.target).detach().clone()
    gm = fx.GraphModule(modules, copy.deepcopy(stage.graph), stage.__class__.__name__)
    gm.eval()
    if fold_bn:
        from torch.fx.experimental.optimization import fuse

        gm = fuse(gm, inplace=True, no_trace=True)
    for p in gm.parameters():
        p.requires_grad_(False)
    gm = inference_layout(gm)
    return fold_narrow_convs(gm) if fold_bn else gm


INFERENCE_LAYOUT = "channels_last+fold8"  # names the rules of ``inference_layout`` (channels-last on the CPU, CUDA
# as it is) and of ``fold_narrow_convs`` (narrow convs folded to 8 channels on the CPU); stored beside speed
# figures, so that figures timed under other rules are measured again, not mixed


def inference_layout(module: nn.Module) -> nn.Module:
    """The module with its conv weights in channels-last (NHWC) layout when it runs on the CPU.

    oneDNN's NCHW convs reorder every activation into a channel-blocked layout and back, and pad
    narrow channel counts to the block. On this 2-core AVX2 CPU at batch 256, ResNet-20 runs 1.6x
    faster in NHWC and its width-0.5 prefix 2.1x (``../shared/design.md``). A conv picks NHWC when
    its weight is, so inputs need no conversion. On CUDA the layout is left alone (NHWC pays off
    there with tensor-core dtypes, which s2d does not use). In place; returns the module."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cpu":
        module.to(memory_format=torch.channels_last)
    return module
