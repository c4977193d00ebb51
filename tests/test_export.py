"""Exported stages (TorchScript, ONNX) reproduce ``DynamicNet`` on real Fashion-MNIST images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_resnet20_supernet

from s2d.data import Batches
from s2d.errors import S2DError
from s2d.transform.arch import MultiStageArch
from s2d.transform.exit_rule import confidence
from s2d.transform.export import ExportedDynamicNet, export

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def images(fmnist) -> torch.Tensor:
    return next(iter(Batches(fmnist.test.subset(64), fmnist.info, 64)))[0]


@pytest.fixture(scope="module")
def net_and_images(images):
    sn = random_resnet20_supernet(head_std=2.0)  # the layer3.0 head pools 7x7 in ceil mode
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.25, "exit": "layer1.2", "reuse": True},
                                                {"width": 0.5, "exit": "layer3.0", "reuse": [True, False, True]},
                                                {"width": 1.0, "exit": "output", "reuse": True}],
                                     "exit_rule": "max_softmax"})
    with torch.no_grad():
        logits = sn.forward_stages(images, arch)
    thresholds = []
    for lg, q in zip(logits[:-1], (0.7, 0.5), strict=False):  # about a third exits at each stage
        c = confidence("max_softmax", lg).sort().values
        k = int(q * (len(c) - 1))
        gaps = (c[1:] - c[:-1])[k - 3:k + 3]  # the widest gap near the quantile: no sample on the edge
        k = k - 3 + int(gaps.argmax())
        assert c[k + 1] - c[k] > 1e-4
        thresholds.append(float((c[k] + c[k + 1]) / 2))
    net = sn.materialise(arch.with_thresholds(thresholds))
    return net, images


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_stages_match_dynamic_net(tmp_path, net_and_images, fmt):
    net, x = net_and_images
    ref_logits, ref_exit = net(x)
    assert set(ref_exit.tolist()) == {0, 1, 2}, "the thresholds should exercise every stage"

    meta = export(net, SHAPE, tmp_path, fmt)
    suffix = "pt" if fmt == "torchscript" else "onnx"
    assert [s["file"] for s in meta["stages"]] == [f"stage{i}.{suffix}" for i in (1, 2, 3)]
    assert all((tmp_path / s["file"]).is_file() for s in meta["stages"])
    assert json.loads((tmp_path / "dynamic.json").read_text()) == meta
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind
    # each stage's inputs are the image and the cached features it was given; outputs: logits + cache
    for s, st in enumerate(meta["stages"]):
        assert st["inputs"] == ["image", *(f"cache_{n}" for n in net.cache_in[s])]
        assert st["outputs"] == ["logits", *(f"next_cache_{n}" for n in net.cache_out[s])]
    assert meta["stages"][0]["inputs"] == ["image"] and len(meta["stages"][1]["inputs"]) > 1
    # stage 2 reads cached features of some nodes and passes them on, grown, to stage 3:
    # the input and output tensors of one node must not clash in the exported graph
    assert set(net.cache_in[1]) & set(net.cache_out[1])

    runner = ExportedDynamicNet(tmp_path)
    assert runner.arch == net.arch
    logits, exits = runner(x)
    assert torch.equal(exits, ref_exit)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    # the runner works on any batch size, including a single image
    one_logits, one_exit = runner(x[5:6])
    assert one_exit.item() == ref_exit[5].item()
    torch.testing.assert_close(one_logits[0], ref_logits[5], atol=1e-4, rtol=0)


def test_export_errors(tmp_path, net_and_images):
    net, _ = net_and_images
    with pytest.raises(S2DError, match="unknown export format 'tflite'"):
        export(net, SHAPE, tmp_path / "x", "tflite")
    with pytest.raises(S2DError, match="not an s2d export"):
        ExportedDynamicNet(tmp_path)
