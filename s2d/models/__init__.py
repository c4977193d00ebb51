"""Model registry in the style of ``torchvision.models.get_model``.

``get_model("resnet20", num_classes=10, in_channels=1)`` builds a model;
``weights`` is a checkpoint path or, for ``torchvision:NAME`` models, a torchvision
weights enum name (``DEFAULT``, ``IMAGENET1K_V1``, ...); ``timm:NAME`` models take
``DEFAULT`` for timm's pretrained weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from s2d import checkpoint
from s2d.errors import CheckpointError, UnknownNameError
from s2d.models import timm_adapter, torchvision_adapter
from s2d.models.mobilenetv2_cifar import cifar_mobilenet_v2
from s2d.models.resnet_cifar import CifarResNet

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> model
    description: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str) -> Callable:
    def wrap(fn: Callable[[int, int], nn.Module]) -> Callable[[int, int], nn.Module]:
        _MODELS[name] = ModelEntry(name, fn, description)
        return fn

    return wrap


for _depth in (20, 32, 56, 110):
    register_model(f"resnet{_depth}", f"CIFAR-style ResNet-{_depth} (BasicBlock, 16/32/64 channels)")(
        lambda num_classes, in_channels, d=_depth: CifarResNet(d, num_classes, in_channels)
    )


@register_model("mobilenetv2", "CIFAR-style MobileNetV2 (width 0.5, stride-1 stem)")
def _mobilenetv2(num_classes: int, in_channels: int) -> nn.Module:
    return cifar_mobilenet_v2(num_classes, in_channels)


def list_models() -> list[str]:
    """Registered names; any ``torchvision:NAME`` or ``timm:NAME`` classifier is accepted as well."""
    return [*sorted(_MODELS), f"{TIMM_PREFIX}NAME", f"{TORCHVISION_PREFIX}NAME"]


def describe_models() -> dict[str, str]:
    return {n: e.description for n, e in sorted(_MODELS.items())}


def check_model_name(name: str) -> None:
    """Raise a one-line :class:`UnknownNameError` unless ``get_model`` knows ``name``."""
    if name.startswith(TORCHVISION_PREFIX):
        torchvision_adapter.check_name(name[len(TORCHVISION_PREFIX):])
    elif name.startswith(TIMM_PREFIX):
        timm_adapter.check_name(name[len(TIMM_PREFIX):])
    elif name not in _MODELS:
        raise UnknownNameError(f"unknown model {name!r}; valid: {', '.join(list_models())}")


def get_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    weights: str | Path | None = None,
    image_size: int = 32,
) -> nn.Module:
    """Build a model by name; load ``weights`` (a checkpoint path or a torchvision enum name)."""
    check_model_name(name)
    path = Path(weights) if weights is not None else None
    is_file = path is not None and (path.suffix in (".pt", ".pth", ".ckpt") or path.exists())
    if name.startswith(TORCHVISION_PREFIX):
        tv_weights = None if (weights is None or is_file) else str(weights)
        model = torchvision_adapter.build(name[len(TORCHVISION_PREFIX):], num_classes, in_channels,
                                          image_size, tv_weights)
    elif name.startswith(TIMM_PREFIX):
        hub_weights = None if (weights is None or is_file) else str(weights)
        model = timm_adapter.build(name[len(TIMM_PREFIX):], num_classes, in_channels, image_size, hub_weights)
    else:
        if weights is not None and not is_file:
            raise CheckpointError(f"weights {weights!r} is not a checkpoint file; pass a path to a .pt file")
        model = _MODELS[name].builder(num_classes, in_channels)
    if is_file:
        ckpt = checkpoint.load(path)
        if ckpt.get("model") not in (None, name):
            raise CheckpointError(
                f"checkpoint {path} is for model {ckpt['model']!r}, not {name!r}; pass --model {ckpt['model']}"
            )
        checkpoint.load_into(model, checkpoint.state_dict_of(ckpt), str(path))
    return model
