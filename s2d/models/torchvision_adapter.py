"""Any ``torchvision.models`` classifier, adapted to small inputs and other channel counts.

The adaptation is generic (no per-architecture code): the first conv takes
``in_channels`` (pretrained RGB kernels are summed over colour), and for inputs of
64 px or less it runs at stride 1 and the first max-pool is dropped, so 28-32 px
images are not reduced to 1 px before the last stage. The last ``nn.Linear`` is
replaced when the class count differs.
"""

from __future__ import annotations

import socket

import torch
import torchvision
from torch import nn

from s2d.errors import CheckpointError, UnknownNameError

SMALL_INPUT = 64


def _first(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, kind)), None)


def _last(model: nn.Module, kind: type) -> tuple[str, nn.Module] | None:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    return found[-1] if found else None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _pretrained_weights(arch: str, weights: str):
    try:
        enum = torchvision.models.get_model_weights(arch)
        w = enum[weights.split(".")[-1]] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        raise UnknownNameError(f"unknown weights {weights!r} for torchvision:{arch}; "
                               f"valid: DEFAULT, a path to a checkpoint, or one of "
                               f"{', '.join(e.name for e in torchvision.models.get_model_weights(arch))}") from None
    return w


def check_name(arch: str) -> None:
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownNameError(
            f"unknown torchvision model {arch!r}; valid: any classifier name from "
            "torchvision.models.list_models(), e.g. resnet18, mobilenet_v2"
        )


def build(arch: str, num_classes: int, in_channels: int, image_size: int, weights: str | None) -> nn.Module:
    check_name(arch)
    if weights:
        w = _pretrained_weights(arch, weights)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)  # offline: fail within seconds, never hang
        try:
            model = torchvision.models.get_model(arch, weights=w)
        except Exception as e:
            raise CheckpointError(
                f"could not fetch torchvision weights {w} ({type(e).__name__}); you look offline: "
                "download them on a networked machine into the torch hub cache "
                f"({torch.hub.get_dir()}) or pass --weights PATH"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    else:
        model = torchvision.models.get_model(arch, num_classes=num_classes)
    stem = _first(model, nn.Conv2d)
    if stem is not None:
        name, conv = stem
        small = image_size <= SMALL_INPUT
        if conv.in_channels != in_channels or (small and conv.stride != (1, 1)):
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, 1 if small else conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.bias is not None)
            with torch.no_grad():
                w_ = conv.weight
                if in_channels != conv.in_channels:
                    w_ = w_.sum(1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels * 3 \
                        if weights else new.weight
                new.weight.copy_(w_)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            _set(model, name, new)
        if small and (pool := _first(model, nn.MaxPool2d)) is not None:
            _set(model, pool[0], nn.Identity())
    head = _last(model, nn.Linear)
    if head is not None and head[1].out_features != num_classes:
        _set(model, head[0], nn.Linear(head[1].in_features, num_classes, head[1].bias is not None))
    return model
