"""Image folding (``s2d.transform.fold``): the same numbers, narrow convs on several images at once."""

from __future__ import annotations

import pytest
import torch
from conftest import random_resnet20_supernet
from torch import fx, nn

from s2d.measure.cost import stage_macs
from s2d.measure.timing import deployable
from s2d.models import get_model
from s2d.transform.arch import MultiStageArch
from s2d.transform.fold import (
    FOLD_MIN_BATCH,
    FoldedStage,
    block_diagonal,
    fold_factor,
    fold_graph,
    fold_images,
    fold_narrow_convs,
    unfold_images,
    unfolded,
)
from s2d.transform.stages import materialise


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sn():
    return random_resnet20_supernet(head_std=1.5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fold_then_unfold_gives_back_every_image(layout):
    x = torch.randn(6, 3, 5, 4).contiguous(memory_format=layout)
    f = fold_images(x, 2)
    assert f.shape == (3, 6, 5, 4)
    torch.testing.assert_close(f[1, 3:], x[3], rtol=0, atol=0)  # image 3 is the second of the second pair
    torch.testing.assert_close(unfold_images(f, 2), x, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 4])
def test_a_block_diagonal_conv_is_the_conv_on_each_folded_image(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups).eval()
    x = torch.randn(8, 4, 9, 9)
    with torch.no_grad():
        out = unfold_images(block_diagonal(conv, 2)(fold_images(x, 2)), 2)
        torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=0)


def test_a_width_quarter_stage_is_folded_by_two_and_computes_the_same_logits(sn):
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.25, "exit": "output"},
                                                {"width": 1.0, "exit": "output", "recompute": True}]})
    stage = materialise(sn.plan(arch).stages[0])
    assert isinstance(stage, FoldedStage) and stage.k == 2  # 4-channel convs, folded to 8
    plain = unfolded(stage)
    with torch.no_grad():
        for n in (64, 63, 3):  # a multiple of k, a padded batch, a batch that runs plain
            x = _images(n)
            # (rtol: float32 rounding of logits in the tens, which AVX-512 kernels sum in another order)
            torch.testing.assert_close(stage(x)[0], plain(x)[0], atol=1e-5, rtol=1e-6)
            # one image's logits do not depend on the batch it came in (padding adds blank images)
            torch.testing.assert_close(stage(x)[0][:1], plain(x[:1])[0], atol=1e-5, rtol=1e-6)
    folded = {n: m for n, m in stage.folded.named_children() if n.endswith("_folded")}
    # the stem, layer1's six 4-channel convs, and the two convs reading layer1 (into 8 channels, strided)
    assert len(folded) == 9 and sum(m.in_channels == m.out_channels == 8 for m in folded.values()) == 6
    assert {m.out_channels for m in folded.values()} == {8, 16}, "the 8- and 16-channel sections run unfolded"


def test_a_stage_that_hands_narrow_features_on_is_exact_at_every_output(sn):
    """The first stage of a reusing arch passes its 4-channel layer1 features to the next stage: those
    outputs leave the folded region, and every one must be the plain stage's."""
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.25, "exit": "layer2.2", "reuse": True},
                                                {"width": 1.0, "exit": "output", "reuse": True}]})
    net = sn.materialise(arch)
    first = net.stages[0]
    assert isinstance(first, FoldedStage)
    x = _images(FOLD_MIN_BATCH * 2 + 1, seed=1)
    with torch.no_grad():
        outs, plain = first(x), unfolded(first)(x)
        assert len(outs) == len(plain) > 2
        for a, b in zip(outs, plain, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(net.forward_all(x)[-1], sn.forward_stages(x, arch)[-1], atol=2e-5, rtol=1e-5)


def test_wide_networks_and_counted_stages_are_not_folded(sn):
    static = get_model("resnet20", 10, 1).eval()
    assert isinstance(deployable(static), fx.GraphModule), "16 channels and up: nothing to fold"
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.25, "exit": "output"},
                                                {"width": 1.0, "exit": "output", "recompute": True}]})
    counted = sn.materialise(arch, fold_bn=False).stages
    assert not any(isinstance(s, FoldedStage) for s in counted), "fvcore counts the network, not the kernel"
    macs, _ = stage_macs(list(counted), sn.input_shape)
    assert macs[0] < 0.08 * macs[1]  # a width-0.25 ResNet-20 does about 1/16 of the static MACs


def test_fold_factor_brings_the_narrowest_region_to_eight_channels():
    def net(c: int) -> fx.GraphModule:
        return fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
                                               nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, 16, 1)))

    assert [fold_factor(net(c)) for c in (2, 4, 5, 16)] == [4, 2, 1, 1]
    gm = net(2)
    folded = fold_graph(gm, 4)
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), atol=1e-5, rtol=0)
    wide = net(16)
    assert fold_narrow_convs(wide) is wide, "no narrow conv: the graph itself, not a copy"


def test_a_later_stage_that_reads_cached_features_is_not_folded(sn):
    """Its narrow convs read the earlier stage's features: folding those in and out cost more than it saved."""
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.125, "exit": "output", "reuse": True},
                                                {"width": 0.25, "exit": "output", "reuse": True},
                                                {"width": 1.0, "exit": "output", "recompute": True}]})
    net = sn.materialise(arch)
    assert isinstance(net.stages[0], FoldedStage) and not isinstance(net.stages[1], FoldedStage)
    x = _images(FOLD_MIN_BATCH)
    with torch.no_grad():
        for a, b in zip(net.forward_all(x), sn.forward_stages(x, arch), strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
