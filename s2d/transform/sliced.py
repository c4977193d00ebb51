"""Channel slices of shared layers, and the exit heads.

A ``Sliced*`` module computes a block of output channels from a block of input
channels with the *shared* weights of a static layer (so supernet training updates
the static weights); ``materialise()`` copies the slice out into a plain layer for
deployment, export and FLOP counting.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

Channels = tuple[int, int] | list[int]  # a range [a, b), or channel indices (after a concatenation)


def _index(channels: Channels) -> torch.Tensor | None:
    """The indices of a selection that is not a range, as a tensor."""
    return None if isinstance(channels, tuple) else torch.tensor(channels, dtype=torch.long)


def _take(t: torch.Tensor, dim: int, channels: Channels, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        return t.narrow(dim, channels[0], channels[1] - channels[0])
    return t.index_select(dim, index.to(t.device))


class SlicedConv2d(nn.Module):
    """Output channels ``out_range`` from input channels ``in_channels`` of ``conv``.

    Input channels are a range, or indices where the input is a concatenation whose
    segments a stage owns in part. For a grouped (or depthwise) conv both ranges cover
    whole groups, and the slice is a grouped conv over just those groups.
    """

    def __init__(self, conv: nn.Conv2d, out_range: tuple[int, int], in_channels: Channels | None,
                 grouped: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.out_range, self.in_channels, self.grouped = out_range, in_channels, grouped
        o0, o1 = out_range
        self.groups = (o1 - o0) * conv.groups // conv.out_channels if grouped else 1
        self.register_buffer("in_index", _index(in_channels) if in_channels is not None and not grouped else None,
                             persistent=False)

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        o0, o1 = self.out_range
        w = self.conv.weight[o0:o1]
        if not self.grouped and self.in_channels is not None:
            w = _take(w, 1, self.in_channels, self.in_index)
        b = self.conv.bias[o0:o1] if self.conv.bias is not None else None
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._weight()
        c = self.conv
        if c.padding_mode != "zeros":  # reflect/replicate/circular pad each channel on its own, as nn.Conv2d does
            x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
            return F.conv2d(x, w, b, c.stride, 0, c.dilation, self.groups)
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, self.groups)

    def materialise(self) -> nn.Conv2d:
        w, b = self._weight()
        c = self.conv
        conv = nn.Conv2d(w.shape[1] * self.groups, w.shape[0], c.kernel_size, c.stride, c.padding, c.dilation,
                         self.groups, b is not None, padding_mode=c.padding_mode).to(w.device)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        return conv


class SlicedBatchNorm2d(nn.Module):
    """Channels ``channels`` (a range, or indices) of a shared batch norm.

    In training mode the running statistics of those channels are updated in place
    (range slices are views of the shared buffers; index selections are written back),
    with the shared module's momentum.
    """

    def __init__(self, bn: nn.BatchNorm2d, channels: Channels) -> None:
        super().__init__()
        self.bn = bn
        self.channels = channels
        self.register_buffer("index", _index(channels), persistent=False)

    def _take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else _take(t, 0, self.channels, self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        use_batch_stats = self.training or bn.running_mean is None
        mean, var = self._take(bn.running_mean), self._take(bn.running_var)
        out = F.batch_norm(x, mean, var, self._take(bn.weight), self._take(bn.bias), use_batch_stats,
                           bn.momentum if bn.momentum is not None else 0.1, bn.eps)
        if self.index is not None and self.training and mean is not None:
            with torch.no_grad():  # index_select copied the statistics: write the updated ones back
                bn.running_mean.index_copy_(0, self.index.to(mean.device), mean)
                bn.running_var.index_copy_(0, self.index.to(var.device), var)
        return out

    def materialise(self) -> nn.BatchNorm2d:
        src = self.bn
        n = self.channels[1] - self.channels[0] if self.index is None else len(self.index)
        bn = nn.BatchNorm2d(n, src.eps, src.momentum, src.affine, src.track_running_stats).to(
            src.weight.device if src.weight is not None else "cpu")
        with torch.no_grad():
            if src.affine:
                bn.weight.copy_(self._take(src.weight))
                bn.bias.copy_(self._take(src.bias))
            if src.track_running_stats:
                bn.running_mean.copy_(self._take(src.running_mean))
                bn.running_var.copy_(self._take(src.running_var))
        return bn.eval()


class ChannelSelect(nn.Module):
    """``x.index_select(dim, index)``: puts a concatenation's channels in the order a head or the static
    classifier expects (at exits only), or picks a per-channel parameter's entries."""

    def __init__(self, index: list[int], dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index.to(x.device))


HEAD_GRID = 4  # exit heads pool a feature map to (at most) HEAD_GRID x HEAD_GRID cells
EXIT_HEADS = {"mlp": 256, "linear": 0}  # --exit-head: hidden units of the full-width exit heads (``ExitHead``)


def head_pool(spatial: tuple[int, int], grid: int = HEAD_GRID) -> nn.Module:
    """Average pooling of a feature map to at most ``grid`` x ``grid`` cells.

    A fixed-kernel ``AvgPool2d`` (ceil mode, so 7x7 gives 4x4) rather than adaptive
    pooling: ONNX exports it for any map size, and it keeps where things are, which a
    global average throws away (a global-pool probe of ResNet-20's first section scores
    ~30 % on Fashion-MNIST).
    """
    kh, kw = (max(1, math.ceil(s / grid)) for s in spatial)
    if kh == kw == 1:
        return nn.Identity()
    return nn.AvgPool2d((kh, kw), (kh, kw), ceil_mode=True, count_include_pad=False)


def pooled_cells(spatial: tuple[int, int], grid: int = HEAD_GRID) -> int:
    """Spatial cells after ``head_pool``: the linear layer sees channels x cells features."""
    kh, kw = (max(1, math.ceil(s / grid)) for s in spatial)
    return math.ceil(spatial[0] / kh) * math.ceil(spatial[1] / kw)


class ExitHead(nn.Module):
    """CondNAS-style exit classifier: pooling to a small grid, then one linear layer, or with ``hidden`` units
    a hidden layer (linear + ReLU) before it.

    The hidden layer is for heads fitted on a frozen backbone (full-width exits read the static network's
    features, which nothing else adapts to them): on the zoo MobileNetV2 it lifts the validation accuracy of
    exits after ``features.6`` / ``.11`` / ``.14`` from 91.4 / 92.7 / 93.5 % to 93.1 / 93.8 / 94.0 %
    (256 units, all training images; the static network scores 93.4 %)."""

    def __init__(self, channels: int, num_classes: int, spatial: tuple[int, int] = (1, 1), hidden: int = 0) -> None:
        super().__init__()
        self.pool = head_pool(spatial)
        features = channels * pooled_cells(spatial)
        self.hidden = nn.Sequential(nn.Linear(features, hidden), nn.ReLU()) if hidden else None
        self.fc = nn.Linear(hidden or features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        if self.hidden is not None:
            x = self.hidden(x)
        return self.fc(x)


class FrozenModule(nn.Module):
    """A static-network module that a stage runs but no training touches: always in eval mode (its batch
    norm keeps the static statistics), no gradients. What a recomputing (cascade) last stage is made of."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def materialise(self) -> nn.Module:
        return copy.deepcopy(self.module)
