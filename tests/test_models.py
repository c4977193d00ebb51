"""The model registry: every listed name builds, adapts to the input and gives the right output shape."""

from __future__ import annotations

import socket
import time
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from s2d.errors import CheckpointError, S2DError, UnknownNameError
from s2d.models import get_model, list_models

NAMES = [
    "resnet20", "resnet32", "resnet56", "resnet110", "mobilenetv2",
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small", "torchvision:vgg11_bn",
]

# Published parameter counts of the CIFAR ResNets (option B shortcuts add a few 1x1 convs).
RESNET_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet56": 0.85, "resnet110": 1.7}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("in_channels", "size", "classes"), [(1, 28, 10), (3, 32, 7)])
def test_registry_round_trip(name, in_channels, size, classes):
    torch.manual_seed(0)
    model = get_model(name, num_classes=classes, in_channels=in_channels, image_size=size).eval()
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == in_channels
    assert stem.stride == (1, 1)  # small inputs keep full resolution at the stem
    assert not any(isinstance(m, nn.MaxPool2d) for m in list(model.modules())[:8])
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == classes
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()  # depends on the input


@pytest.mark.parametrize("name", sorted(RESNET_PARAMS_M))
def test_cifar_resnet_sizes(name):
    model = get_model(name, 10, 3)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(RESNET_PARAMS_M[name], rel=0.05)
    depth = int(name[len("resnet"):])
    convs3x3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3x3) + 1 == depth  # 6n+1 3x3 convs + the fc layer


def test_mobilenetv2_is_small_and_keeps_torchvision_names():
    model = get_model("mobilenetv2", 10, 1, image_size=28)
    params = sum(p.numel() for p in model.parameters())
    assert 0.3e6 < params < 1.0e6
    names = dict(model.named_modules())
    assert "features.0.0" in names and "classifier.1" in names


def test_same_seed_same_weights():
    torch.manual_seed(1)
    a = get_model("resnet20", 10, 1).state_dict()
    torch.manual_seed(1)
    b = get_model("resnet20", 10, 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", ["resnet21", "vgg", "torchvision:not_a_model"])
def test_unknown_model_lists_valid_names(bad):
    with pytest.raises(UnknownNameError) as e:
        get_model(bad, 10, 1)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad.split(":")[-1]) in msg
    if not bad.startswith("torchvision:"):
        for name in ("resnet20", "resnet32", "resnet56", "resnet110", "mobilenetv2", "torchvision:NAME"):
            assert name in msg
    else:
        assert "resnet18" in msg


def test_list_models_names_everything_registered():
    assert list_models() == ["mobilenetv2", "resnet110", "resnet20", "resnet32", "resnet56", "timm:NAME",
                             "torchvision:NAME"]


def test_weights_that_are_not_a_file_are_refused_for_zoo_models(tmp_path):
    with pytest.raises(CheckpointError) as e:
        get_model("resnet20", 10, 1, weights="IMAGENET1K_V1")
    assert "not a checkpoint file" in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        get_model("resnet20", 10, 1, weights=tmp_path / "missing.pt")


def test_unknown_torchvision_weights_name_lists_valid_ones():
    with pytest.raises(UnknownNameError) as e:
        get_model("torchvision:resnet18", 10, 3, weights="NOT_A_WEIGHT")
    assert "IMAGENET1K_V1" in str(e.value) and "\n" not in str(e.value)


def test_torchvision_weights_offline_fail_fast_with_one_line(monkeypatch):
    seen_timeouts = []

    def offline_get_model(arch, **kwargs):
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model", offline_get_model)
    before = socket.getdefaulttimeout()
    t = time.perf_counter()
    with pytest.raises(S2DError) as e:
        get_model("torchvision:resnet18", 10, 3, weights="IMAGENET1K_V1")
    assert time.perf_counter() - t < 5
    assert isinstance(e.value, CheckpointError)
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "URLError" in msg and "--weights PATH" in msg
    assert seen_timeouts and seen_timeouts[0] is not None and seen_timeouts[0] <= 30  # downloads cannot hang
    assert socket.getdefaulttimeout() == before  # restored afterwards
