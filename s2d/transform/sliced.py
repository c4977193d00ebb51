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


class SlicedConv2d(nn.Module):
    """Output channels ``out_range`` from input channels ``in_range`` of ``conv``.

    For a grouped (or depthwise) conv both ranges cover whole groups, and the slice is a
    grouped conv over just those groups.
    """

    def __init__(self, conv: nn.Conv2d, out_range: tuple[int, int], in_range: tuple[int, int] | None,
                 grouped: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.out_range, self.in_range, self.grouped = out_range, in_range, grouped
        o0, o1 = out_range
        self.groups = (o1 - o0) * conv.groups // conv.out_channels if grouped else 1

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        o0, o1 = self.out_range
        w = self.conv.weight[o0:o1]
        if not self.grouped and self.in_range is not None:
            w = w[:, self.in_range[0]:self.in_range[1]]
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
    """Channels ``channel_range`` of a shared batch norm.

    In training mode the running statistics of those channels are updated in place
    (slices are views of the shared buffers), with the shared module's momentum.
    """

    def __init__(self, bn: nn.BatchNorm2d, channel_range: tuple[int, int]) -> None:
        super().__init__()
        self.bn = bn
        self.channel_range = channel_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.channel_range
        bn = self.bn
        use_batch_stats = self.training or bn.running_mean is None
        return F.batch_norm(
            x,
            bn.running_mean[a:b] if bn.running_mean is not None else None,
            bn.running_var[a:b] if bn.running_var is not None else None,
            bn.weight[a:b] if bn.weight is not None else None,
            bn.bias[a:b] if bn.bias is not None else None,
            use_batch_stats,
            bn.momentum if bn.momentum is not None else 0.1,
            bn.eps,
        )

    def materialise(self) -> nn.BatchNorm2d:
        a, b = self.channel_range
        src = self.bn
        bn = nn.BatchNorm2d(b - a, src.eps, src.momentum, src.affine, src.track_running_stats).to(
            src.weight.device if src.weight is not None else "cpu")
        with torch.no_grad():
            if src.affine:
                bn.weight.copy_(src.weight[a:b])
                bn.bias.copy_(src.bias[a:b])
            if src.track_running_stats:
                bn.running_mean.copy_(src.running_mean[a:b])
                bn.running_var.copy_(src.running_var[a:b])
        return bn.eval()


HEAD_GRID = 4  # exit heads pool a feature map to (at most) HEAD_GRID x HEAD_GRID cells


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
    """CondNAS-style exit classifier: pooling to a small grid, then one linear layer."""

    def __init__(self, channels: int, num_classes: int, spatial: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.pool = head_pool(spatial)
        self.fc = nn.Linear(channels * pooled_cells(spatial), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


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
