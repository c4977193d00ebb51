"""Any timm classifier (``timm:NAME``, optional extra ``pip install -e '.[timm]'``), adapted like torchvision's.

timm builds the model with the class and channel counts itself (``num_classes``,
``in_chans``); :func:`s2d.models.small_input.adapt` then fits the stem to small images.
Pretrained weights come from the Hugging Face hub, so offline they fail in one line.
"""

from __future__ import annotations

import socket

from torch import nn

from s2d.errors import CheckpointError, S2DError, UnknownNameError
from s2d.models.small_input import adapt


def _timm():
    try:
        import timm
    except ImportError:
        raise S2DError("timm models need the optional extra: pip install -e '.[timm]'") from None
    return timm


def check_name(arch: str) -> None:
    if arch not in _timm().list_models():
        raise UnknownNameError(f"unknown timm model {arch!r}; valid: any name from timm.list_models(), "
                               "e.g. resnet18, efficientnet_b0, regnetx_002")


def build(arch: str, num_classes: int, in_channels: int, image_size: int, weights: str | None) -> nn.Module:
    """``weights``: None for random init, anything else (e.g. ``DEFAULT``) for timm's pretrained weights."""
    timm = _timm()
    check_name(arch)
    pretrained = bool(weights)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # offline: fail within seconds, never hang
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)
    except Exception as e:
        if not pretrained:
            raise
        raise CheckpointError(
            f"could not fetch timm weights for {arch} ({type(e).__name__}); you look offline: download them "
            "on a networked machine into the Hugging Face cache (HF_HOME) or pass --weights PATH") from None
    finally:
        socket.setdefaulttimeout(old)
    return adapt(model, num_classes, in_channels, image_size, pretrained)
