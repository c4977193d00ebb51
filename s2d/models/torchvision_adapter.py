"""Any ``torchvision.models`` classifier, adapted to small inputs and other channel counts
(:func:`s2d.models.small_input.adapt`)."""

from __future__ import annotations

import socket

import torch
import torchvision
from torch import nn

from s2d.errors import CheckpointError, UnknownNameError
from s2d.models.small_input import adapt


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
    return adapt(model, num_classes, in_channels, image_size, pretrained=bool(weights))
