"""Image folding: a stage's narrow convolutions run on several images at once.

On the CPU, oneDNN's convolutions are slow per MAC when a tensor has very few channels: a 3x3 conv
over 4 channels at 28x28 runs at about a sixth of the speed per MAC of a 16-channel one. A width-0.25
ResNet-20 stage (4/8/16 channels) does 6.5 % of the static MACs but took 22 % of its batch-256 time, 57 %
of it in the 4-channel convs. Folding ``k`` images into the channel dimension, (N, C, H, W) ->
(N/k, kC, H, W), and giving each conv ``k`` copies of its weight on the block diagonal computes the same
numbers (the off-diagonal blocks are zeros) with ``k`` times the MACs in a kernel that is more than
``k`` times faster: that stage then takes 18 % of the static time (README, "Speed you can compare").

The fold is a rule of the inference layout, like channels-last: applied to deployed (BN-folded)
networks on the CPU, to the static model and the peers as to s2d's stages, so speed ratios compare
network shapes, not kernels. Only a region that starts at the image, with convs of at most
``FOLD_MAX_CHANNELS`` channels, is folded, by the ``k`` that brings it to ``FOLD_CHANNELS``; wider tensors
and every other op (pooling, heads, concatenations) see the images unfolded again. A region starting at a
later stage's cached features is not: folding the caches in and out cost more than it saved (the second
stage of [0.125, 0.25]: 1.30x its plain time). Small batches (and the exports, traced at batch 2) run the
plain graph.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

FOLD_MAX_CHANNELS = 4  # convs reading at most this many channels start or continue a folded region
FOLD_CHANNELS = 8  # a region is folded by the k that brings its widest narrow input to this many channels
FOLD_MIN_BATCH = 16  # smaller batches run unfolded (folding pads to a multiple of k and pays per call)

# ops that act on each channel of each image alone: they run on folded tensors as they are
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                        nn.LeakyReLU, nn.Identity, nn.Dropout)
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.mul, torch.add, torch.mul, torch.relu, F.relu, F.relu6,
                          F.hardswish, F.silu, F.gelu, torch.sigmoid}
_ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid"}


def fold_images(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) -> (N/k, kC, H, W): image ``n`` of each group of ``k`` owns channels ``[nC, (n+1)C)``."""
    n, c, h, w = x.shape
    return (x.permute(0, 2, 3, 1).reshape(n // k, k, h, w, c).permute(0, 2, 3, 1, 4)
            .reshape(n // k, h, w, k * c).permute(0, 3, 1, 2))


def unfold_images(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`fold_images`."""
    m, kc, h, w = x.shape
    c = kc // k
    return (x.permute(0, 2, 3, 1).reshape(m, h, w, k, c).permute(0, 3, 1, 2, 4)
            .reshape(m * k, h, w, c).permute(0, 3, 1, 2))


def block_diagonal(conv: nn.Conv2d, k: int) -> nn.Conv2d:
    """``conv`` applied to each of ``k`` folded images: its weight k times on the block diagonal (a dense
    conv: oneDNN's grouped convs are slower here than the dense one with zero blocks), or, for a grouped
    conv, ``k`` times the groups."""
    ci, co, g = conv.in_channels, conv.out_channels, conv.groups
    new = nn.Conv2d(ci * k, co * k, conv.kernel_size, conv.stride, conv.padding, conv.dilation, g * k if g > 1 else 1,
                    conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        if g > 1:
            new.weight.copy_(conv.weight.repeat(k, 1, 1, 1))
        else:
            new.weight.zero_()
            for j in range(k):
                new.weight[j * co:(j + 1) * co, j * ci:(j + 1) * ci] = conv.weight
        if conv.bias is not None:
            new.bias.copy_(conv.bias.repeat(k))
    new.weight.requires_grad_(False)
    if new.bias is not None:
        new.bias.requires_grad_(False)
    return new.eval().to(memory_format=torch.channels_last)


def _foldable_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and m.groups in (1, m.in_channels)


def _elementwise(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return isinstance(modules[n.target], _ELEMENTWISE_MODULES)
    if n.op == "call_function":
        return n.target in _ELEMENTWISE_FUNCTIONS
    return n.op == "call_method" and n.target in _ELEMENTWISE_METHODS


def fold_factor(gm: fx.GraphModule) -> int:
    """How many images a folded copy of ``gm`` runs at once (1: it does not start with a narrow conv)."""
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    modules = dict(gm.named_modules())
    first = [modules[n.target] for n in (image.users if image is not None else ())
             if n.op == "call_module" and _foldable_conv(modules[n.target])]
    if not any(m.in_channels <= FOLD_MAX_CHANNELS and m.out_channels <= FOLD_MAX_CHANNELS for m in first):
        return 1
    narrow = [max(m.in_channels, m.out_channels) for m in gm.modules() if _foldable_conv(m)
              and m.in_channels <= FOLD_MAX_CHANNELS and m.out_channels <= FOLD_MAX_CHANNELS]
    return max(1, FOLD_CHANNELS // max(narrow))


def fold_graph(gm: fx.GraphModule, k: int) -> fx.GraphModule:
    """A copy of ``gm`` that computes the same outputs from a batch whose size is a multiple of ``k``, with its
    narrow convs on ``k`` images folded into channels (see the module doc for the regions)."""
    gm = copy.deepcopy(gm)
    graph, modules = gm.graph, dict(gm.named_modules())
    folded: set[fx.Node] = set()
    folds: dict[fx.Node, fx.Node] = {}  # one fold per unfolded tensor that starts a region
    unfolds: dict[fx.Node, fx.Node] = {}  # one unfold per folded tensor that an unfolded op reads

    def plain(src: fx.Node) -> fx.Node:
        if src not in unfolds:
            with graph.inserting_after(src):
                unfolds[src] = graph.call_function(unfold_images, (src, k))
        return unfolds[src]

    image = next(n for n in graph.nodes if n.op == "placeholder")
    for n in list(graph.nodes):
        ins = n.all_input_nodes
        if n.op == "call_module" and _foldable_conv(modules[n.target]):
            conv, src = modules[n.target], n.args[0]
            narrow_out = conv.out_channels <= FOLD_MAX_CHANNELS
            if src not in folded:
                if not (src is image and conv.in_channels <= FOLD_MAX_CHANNELS and narrow_out):
                    continue
                if src not in folds:
                    with graph.inserting_after(src):
                        folds[src] = graph.call_function(fold_images, (src, k))
                n.replace_input_with(src, folds[src])
            name = f"{n.target.replace('.', '_')}_folded"
            gm.add_submodule(name, block_diagonal(conv, k))
            n.target = name
            if narrow_out:
                folded.add(n)
            else:  # a conv that widens the tensor ends the region: its (smaller, strided) output is unfolded
                out = plain(n)
                n.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        elif ins and _elementwise(n, modules) and all(i in folded for i in ins):
            folded.add(n)
        else:
            for i in ins:
                if i in folded:
                    n.replace_input_with(i, plain(i))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


class FoldedStage(nn.Module):
    """A graph and its folded copy: batches of at least ``FOLD_MIN_BATCH`` run folded (padded with blank images
    to a multiple of ``k``), smaller ones plain. Every input and output is batch-major (a stage's image and
    caches), and each image is computed on its own, so padding changes no image's result."""

    def __init__(self, plain: fx.GraphModule, folded: fx.GraphModule, k: int) -> None:
        super().__init__()
        self.plain, self.folded, self.k = plain, folded, k

    def forward(self, *inputs: torch.Tensor):
        n = inputs[0].shape[0]
        if n < FOLD_MIN_BATCH:
            return self.plain(*inputs)
        pad = -n % self.k
        if pad:
            inputs = tuple(torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) for t in inputs)
        out = self.folded(*inputs)
        if not pad:
            return out
        return type(out)(t[:n] for t in out) if isinstance(out, tuple | list) else out[:n]


def fold_narrow_convs(gm: nn.Module) -> nn.Module:
    """``gm`` with its narrow conv regions folded (a :class:`FoldedStage`), or ``gm`` itself when it has none,
    is not a graph, or does not run on the CPU (where the rule was measured)."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    p = next(gm.parameters(), None)
    k = fold_factor(gm)
    if p is None or p.device.type != "cpu" or k == 1:
        return gm
    folded = fold_graph(gm, k)
    if sum(name.endswith("_folded") for name, _ in folded.named_children()) < 2:
        return gm  # one conv (a later stage's new stem channels): nothing but the fold and the unfold
    return FoldedStage(gm, folded, k)


def unfolded(module: nn.Module) -> nn.Module:
    """The plain graph of a folded stage (what exports trace), or the module itself."""
    return module.plain if isinstance(module, FoldedStage) else module
