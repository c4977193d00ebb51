"""Importance-ordered channels: the permutation is exact, sorted, and puts the top channels first."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from s2d.errors import S2DError, UnsupportedModelError
from s2d.models import get_model
from s2d.transform.importance import CRITERIA, ChannelOrder, order_channels

SMALL = {"resnet20": 12, "mobilenetv2": 25}  # model -> number of TP groups (all permutable)
FMNIST_SHAPE = (1, 28, 28)


def _randomised(name: str, in_channels: int = 1, seed: int = 0) -> nn.Module:
    """A random-weight model whose BN parameters and statistics differ per channel (not 1/0 as at init)."""
    torch.manual_seed(seed)
    if name.startswith("torchvision:"):
        model = get_model(name, 10, in_channels, image_size=32)
    else:
        model = get_model(name, 10, in_channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def _batches(shape: tuple[int, ...], n: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]


def _check_sorted(order: ChannelOrder) -> None:
    for g in order.groups:
        s = torch.tensor(g.scores)
        assert (s[:-1] >= s[1:]).all(), g.root
        assert sorted(g.permutation) == list(range(len(g.permutation)))


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_permuted_model_has_the_same_logits(name: str, criterion: str):
    model = _randomised(name)
    x = torch.randn(16, *FMNIST_SHAPE, generator=torch.Generator().manual_seed(2))
    reference, before = _logits(model, x), copy.deepcopy(model.state_dict())
    result = order_channels(model, FMNIST_SHAPE, criterion=criterion, batches=_batches(FMNIST_SHAPE))
    assert result.criterion == criterion
    assert result.skipped == [] and result.num_permuted == SMALL[name]
    torch.testing.assert_close(_logits(model, x), reference, rtol=1e-5, atol=1e-5)
    # something moved: every group's permutation is applied to real tensors, and not all are the identity
    assert any(g.permutation != sorted(g.permutation) for g in result.groups)
    assert len(_changed(before, model)) > 50
    _check_sorted(result)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:densenet121"])
def test_torchvision_models_keep_their_logits(name: str):
    """Residual adds (resnet18), squeeze-excitation products and depthwise convs (mobilenet_v3),
    concatenations (densenet121: one conv's channels sit at an offset in every later layer's input)."""
    model = _randomised(name, in_channels=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference, before = _logits(model, x), copy.deepcopy(model.state_dict())
    result = order_channels(model, (3, 32, 32), criterion="l2")
    assert result.skipped == [] and result.num_permuted > 10
    error = (_logits(model, x) - reference).abs().max() / reference.abs().max()
    assert error <= 1e-5
    assert _changed(before, model)
    _check_sorted(result)


def test_shufflenet_is_refused_cleanly_and_left_alone():
    """TP's tracer fails on ShuffleNet's channel shuffle (a 5-D view); the model must come back untouched."""
    model = _randomised("torchvision:shufflenet_v2_x0_5", in_channels=3).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError) as info:
        order_channels(model, (3, 32, 32))
    assert "\n" not in str(info.value) and "Torch-Pruning" in str(info.value)
    assert _changed(before, model) == [] and model.training


def test_recomputed_importance_is_non_increasing():
    """TP, scoring the permuted model from scratch, sees every group already sorted (and the same scores)."""
    for criterion in ("l2", "bn_scale"):
        model = _randomised("resnet20")
        result = order_channels(model, FMNIST_SHAPE, criterion=criterion)
        recorded = {g.root: torch.tensor(g.scores) for g in result.groups}
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *FMNIST_SHAPE))
        scorer = (tp.importance.GroupMagnitudeImportance(p=2) if criterion == "l2"
                  else tp.importance.BNScaleImportance())
        names = {m: n for n, m in model.named_modules()}
        seen = 0
        for group in dg.get_all_groups(ignored_layers=[model.fc], root_module_types=[nn.Conv2d, nn.Linear]):
            again = scorer(group)
            root = names[group[0].dep.target.module]
            assert (again[:-1] >= again[1:] - 1e-6 * again.max()).all(), (criterion, root)
            torch.testing.assert_close(again, recorded[root], rtol=1e-5, atol=1e-6)
            seen += 1
        assert seen == len(recorded) == 12


def test_dominant_channel_moves_to_position_zero():
    model = _randomised("resnet20")
    k = 5
    block = model.layer2[1]
    with torch.no_grad():
        block.conv1.weight[k] *= 50  # by far the largest filter of the block's inner group
    old_w1, old_bn = block.conv1.weight.clone(), block.bn1.weight.clone()
    old_w2, old_mean = block.conv2.weight.clone(), block.bn1.running_mean.clone()
    result = order_channels(model, FMNIST_SHAPE, criterion="l2")
    group = next(g for g in result.groups if g.root == "layer2.1.conv1")
    assert group.permutation[0] == k
    assert group.layers == ["layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2"]
    p = torch.tensor(group.permutation)
    # the block reads and writes the layer2 residual stream, which is another group with its own permutation q
    stream = next(g for g in result.groups if "layer2.1.conv1" in g.layers and g is not group)
    assert "layer2.1.conv2" in stream.layers and "layer2.0.downsample.0" in stream.layers
    q = torch.tensor(stream.permutation)
    # the out-channels of conv1, every per-channel tensor of bn1 and the in-channels of conv2 moved together
    torch.testing.assert_close(block.conv1.weight, old_w1[p][:, q], rtol=0, atol=0)
    torch.testing.assert_close(block.bn1.weight, old_bn[p], rtol=0, atol=0)
    torch.testing.assert_close(block.bn1.running_mean, old_mean[p], rtol=0, atol=0)
    torch.testing.assert_close(block.conv2.weight, old_w2[q][:, p], rtol=0, atol=0)
    assert group.scores[0] > 5 * group.scores[1]


def test_bn_scale_prefix_keeps_the_top_k():
    """In a block's inner group the only BN is bn1, so a width-k prefix must hold bn1's k largest |gamma|."""
    model = _randomised("resnet20")
    bn = model.layer3[0].bn1
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.1, 3.0, bn.num_features)[torch.randperm(bn.num_features, generator=gen)])
        bn.weight[::7] *= -1  # BN-scale importance is |gamma|
    old = bn.weight.detach().abs().clone()
    x = torch.randn(8, *FMNIST_SHAPE, generator=gen)
    reference = _logits(model, x)
    order_channels(model, FMNIST_SHAPE, criterion="bn_scale")
    for k in (8, 16, 32, 48):
        torch.testing.assert_close(bn.weight.detach().abs()[:k], old.sort(descending=True).values[:k])
    torch.testing.assert_close(_logits(model, x), reference, rtol=1e-5, atol=1e-5)


class _RawResidual(nn.Module):
    """conv(x) + x: TP's graph has no node for the image, so it misses that conv's channels are the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(self.conv(x) + x)).mean((2, 3)))


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.g, self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.g(torch.relu(self.bn(self.a(x)))))).mean((2, 3)))


class _ChunkCat(nn.Module):
    """ShuffleNet's chunk + cat pattern, on which TP maps the concat offsets wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1, y2 = self.a(x).chunk(2, dim=1)
        return self.fc(torch.cat([y1, self.b(y2)], 1).mean((2, 3)))


@pytest.mark.parametrize(("cls", "permuted", "skipped", "reason"), [
    (_RawResidual, ["conv2"], ["conv"], "changed the outputs"),
    (_Grouped, ["b"], ["g", "a"], "grouped conv (groups=2)"),
    (_ChunkCat, [], ["b"], "changed the outputs"),
])
def test_couplings_it_cannot_permute_are_skipped_and_stay_exact(cls, permuted, skipped, reason):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    reference = _logits(model, x)
    result = order_channels(model, (3, 16, 16))
    assert [g.root for g in result.groups] == permuted
    assert [s.root for s in result.skipped] == skipped
    assert all(reason in s.reason for s in result.skipped)
    torch.testing.assert_close(_logits(model, x), reference, rtol=1e-5, atol=1e-6)


def test_errors_are_one_line_s2d_errors():
    model = _randomised("resnet20")
    with pytest.raises(S2DError, match="needs gradients"):
        order_channels(model, FMNIST_SHAPE, criterion="taylor")
    with pytest.raises(S2DError, match="unknown importance criterion 'l3'"):
        order_channels(model, FMNIST_SHAPE, criterion="l3")
    with pytest.raises(S2DError, match="empty batch"):
        order_channels(model, FMNIST_SHAPE, criterion="taylor", batches=[])


def test_leaves_mode_gradients_and_statistics_as_they_were():
    """Only a permutation: train mode is restored, Taylor's gradients are cleared, BN statistics are not updated."""
    model = _randomised("resnet20").train()
    stats = {n: m.running_var.clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    order_channels(model, FMNIST_SHAPE, criterion="taylor", batches=_batches(FMNIST_SHAPE))
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_var.sort().values, stats[n].sort().values, rtol=0, atol=0)
