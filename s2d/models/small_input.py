"""Adapting an ImageNet classifier to small images and other channel counts, generically.

No per-architecture code: the first conv takes ``in_channels`` (pretrained RGB kernels
are summed over colour), and for inputs of 64 px or less it runs at stride 1 and the
first max-pool is dropped, so 28-32 px images are not reduced to 1 px before the last
stage. The last ``nn.Linear`` is replaced when the class count differs. Shared by the
torchvision and timm adapters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SMALL_INPUT = 64


def _first(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, kind)), None)


def _last(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    return found[-1] if found else None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def adapt(model: nn.Module, num_classes: int, in_channels: int, image_size: int, pretrained: bool) -> nn.Module:
    """``model`` with its stem and classifier fitted to the data (in place; returned for chaining).

    Where the small-input stem breaks the model (its first max-pool sits in one branch of a block whose
    other branch pools on its own, as in DLA), the stem keeps its stride and pool.
    """
    if image_size <= SMALL_INPUT:
        trial = _fit_stem(copy.deepcopy(model), in_channels, pretrained, small=True)
        try:
            with torch.no_grad():
                trial.eval()(torch.zeros(1, in_channels, image_size, image_size))
        except RuntimeError:
            pass
        else:
            return _fit_head(trial, num_classes)
    return _fit_head(_fit_stem(model, in_channels, pretrained, small=False), num_classes)


def _fit_stem(model: nn.Module, in_channels: int, pretrained: bool, small: bool) -> nn.Module:
    stem = _first(model, nn.Conv2d)
    if stem is not None:
        name, conv = stem
        if conv.in_channels != in_channels or (small and conv.stride != (1, 1)):
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, 1 if small else conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.bias is not None)
            with torch.no_grad():
                w_ = conv.weight
                if in_channels != conv.in_channels:
                    w_ = w_.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels * 3 \
                        if pretrained else new.weight
                new.weight.copy_(w_)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            _set(model, name, new)
        if small and (pool := _first(model, nn.MaxPool2d)) is not None:
            _set(model, pool[0], nn.Identity())
    return model


def _fit_head(model: nn.Module, num_classes: int) -> nn.Module:
    head = _last(model, nn.Linear)
    if head is not None and head[1].out_features != num_classes:
        _set(model, head[0], nn.Linear(head[1].in_features, num_classes, head[1].bias is not None))
    return model
