"""Conformance: every torchvision CNN classifier, and timm's CNN families, convert generically.

For each model (random weights, small input): the one-stage arch reproduces the static
logits; a two-stage split (half width to a middle exit) computed incrementally equals
the same stages computed from scratch on masked weights, is cheaper in fvcore MACs, and
exported to ONNX gives the same logits under onnxruntime. Ops the engine cannot split
(concatenations, shuffles, permutes, LayerNorm) are kept whole, so such models convert
with fewer splittable layers (depth-only where nothing else is left). A representative
subset runs by default; the rest is marked slow.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torchvision
from test_supernet import assert_stages_close, make_arch, random_model, reference_stages

from s2d.measure.cost import count_macs, stage_macs
from s2d.transform.arch import static_arch
from s2d.transform.export import ExportedDynamicNet, export
from s2d.transform.graph import Rule
from s2d.transform.supernet import SuperNet

TRANSFORMERS = ("vit_", "swin_", "maxvit_")
# One of each family the engine treats differently: residual adds, depthwise + SE gates, stochastic depth,
# grouped convs, concatenations (dense, Inception, Fire), channel split + shuffle, permute + LayerNorm.
DEFAULT = {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "resnext50_32x4d", "densenet121",
           "googlenet", "shufflenet_v2_x0_5", "squeezenet1_1", "convnext_tiny", "alexnet", "mnasnet0_5"}


def _size(model_name: str) -> int:
    """32 px, except Inception's stem (75 px at least) and the 7x7 / 6x6 adaptive pools of VGG and AlexNet,
    which ONNX exports only when they divide the map (224 px)."""
    name = model_name.partition(":")[2]
    if name == "inception_v3":
        return 80
    return 224 if name.startswith(("vgg", "alexnet")) else 32


# timm: one model per family (norm+activation modules, SE/ECA gates, mixed kernels, split attention, dual paths,
# Res2Net splits, HRNet upsampling, RepVGG branches, ...).
TIMM = ["resnet26d", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv4_conv_small",
        "regnety_002", "densenet121", "dla34", "ghostnet_100", "mixnet_s", "rexnet_100", "dpn68", "res2net50_14w_8s",
        "resnest14d", "cspresnet50", "convnext_atto", "lcnet_050", "mnasnet_100", "repvgg_a0", "selecsls42",
        "hrnet_w18_small", "tinynet_a", "efficientnetv2_rw_t", "xception41"]
TIMM_DEFAULT = {"efficientnet_b0", "ghostnet_100", "convnext_atto"}


def _models() -> list:
    names = [n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(TRANSFORMERS)]
    params = [pytest.param(f"torchvision:{n}", id=n, marks=() if n in DEFAULT else pytest.mark.slow) for n in names]
    if importlib.util.find_spec("timm") is not None:  # the optional extra
        params += [pytest.param(f"timm:{n}", id=f"timm:{n}", marks=() if n in TIMM_DEFAULT else pytest.mark.slow)
                   for n in TIMM]
    return params


@pytest.mark.parametrize("name", _models())
def test_torchvision_model_converts(name, tmp_path):
    size = _size(name)
    shape = (3, size, size)
    model = random_model(name, shape)
    sn = SuperNet(model, shape, 10).eval()
    graph = sn.graph
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        assert_stages_close(sn.forward_stages(x, static_arch()), [expected], tol=1e-4, relative=True)

        mid = graph.exits[len(graph.exits) // 2].name
        arch = make_arch((0.5, mid, True), (1.0, "output", True))
        got = sn.forward_stages(x, arch)
        assert_stages_close(got, reference_stages(sn, arch, x), tol=1e-4, relative=True)

        net = sn.materialise(arch.with_thresholds([0.5]))
        assert_stages_close(net.forward_all(x), got, tol=1e-4, relative=True)

        # per-section widths, alternating (every section boundary changes the width), tied channels kept tied
        k = graph.num_sections
        widths = [0.375 if i % 2 == 0 else 0.625 for i in range(k)]
        uneven = make_arch((widths if k > 1 else 0.5, mid, True), (1.0, "output", True))
        assert_stages_close(sn.forward_stages(x, uneven), reference_stages(sn, uneven, x), tol=1e-4, relative=True)
    macs, _ = stage_macs(list(net.stages), shape)
    static = count_macs(model, (torch.zeros(1, *shape),)).total()
    assert macs[0] < static
    split_before_exit = any(t.rule in (Rule.CONV, Rule.GROUPED) and t.quantum < t.channels
                            for t in graph.trunk[: graph.exit(mid).index + 1])
    full_width, _ = stage_macs(list(sn.materialise(make_arch((1.0, mid, True), (1.0, "output", True))
                                                   .with_thresholds([0.5])).stages), shape)
    assert (macs[0] < full_width[0]) == split_before_exit

    export(net, shape, tmp_path, "onnx")
    logits, _ = ExportedDynamicNet(tmp_path)(x)
    ref_logits, _ = net(x)
    assert_stages_close([logits], [ref_logits], tol=1e-4, relative=True)
