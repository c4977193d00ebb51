"""Graph analysis: exit points, sections, cut points and the models the engine refuses."""

from __future__ import annotations

import re

import pytest
import torch
from torch import fx, nn

from s2d.errors import UnsupportedModelError
from s2d.models import get_model
from s2d.transform.graph import analyze

TORCHVISION = ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2",
               "torchvision:mobilenet_v3_small", "torchvision:vgg11_bn"]


def _order(graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.gm.graph.nodes)}


def _is_cut_point(graph, node_name: str) -> bool:
    """Independent check: no value computed before the node (except constants) is used after it."""
    pos = _order(graph)
    target = next(n for n in graph.gm.graph.nodes if n.name == node_name)
    for n, i in pos.items():
        if i >= pos[target] or n.op in ("get_attr", "placeholder"):
            continue
        if any(pos[u] > pos[target] for u in n.users):
            return False
    # the image itself must be read only up to the node, too
    image = next(n for n in graph.gm.graph.nodes if n.op == "placeholder")
    return all(pos[u] <= pos[target] for u in image.users)


def _check_exits_are_cut_points(graph) -> None:
    for e in graph.exits:
        assert _is_cut_point(graph, e.node), (e.name, e.node)
        t = graph.by_name[e.node]
        assert (t.index, t.channels, tuple(t.spatial)) == (e.index, e.channels, tuple(e.spatial))
    indices = [e.index for e in graph.exits]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)


def test_resnet20_exits_and_sections():
    graph = analyze(get_model("resnet20", 10, 1), (1, 28, 28))
    expected = ["relu", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                "layer3.0", "layer3.1", "output"]
    assert graph.exit_names == expected
    assert graph.num_sections == 3
    assert [e.section for e in graph.exits] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [e.channels for e in graph.exits] == [16] * 4 + [32] * 3 + [64] * 3
    assert [e.spatial for e in graph.exits] == [(28, 28)] * 4 + [(14, 14)] * 3 + [(7, 7)] * 3
    _check_exits_are_cut_points(graph)
    # a node inside a residual block is not a cut point, and not an exit
    assert not _is_cut_point(graph, "layer1_0_conv1")
    assert not _is_cut_point(graph, "layer2_0_bn2")
    assert "layer1_0_conv1" not in {e.node for e in graph.exits}
    # the trunk ends at the last feature map; the classifier tail is not part of it
    assert graph.trunk[-1].name == graph.exit("output").node
    assert [t.index for t in graph.trunk] == list(range(len(graph.trunk)))
    tail_targets = {str(n.target) for n in graph.tail}
    assert {"avgpool", "fc"} <= tail_targets
    # every trunk node belongs to the section of the next exit at or after it
    for t in graph.trunk:
        nxt = next(e for e in graph.exits if e.index >= t.index)
        assert t.section == nxt.section, t.name


def test_truncated_model_computes_the_exit_features():
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 1).eval()
    graph = analyze(model, (1, 28, 28))
    x = torch.randn(2, 1, 28, 28)
    feats = {}
    model.layer2[1].register_forward_hook(lambda m, i, o: feats.setdefault("layer2.1", o.clone()))
    with torch.no_grad():
        model(x)
        got = graph.truncated(graph.exit("layer2.1").node)(x)
    torch.testing.assert_close(got, feats["layer2.1"], atol=0, rtol=0)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_analyse(name):
    graph = analyze(get_model(name, 10, 3, image_size=32), (3, 32, 32))
    assert len(graph.exits) >= 4
    assert graph.exit_names[-1] == "output"
    assert len(set(graph.exit_names)) == len(graph.exit_names)
    assert graph.num_sections >= 3
    _check_exits_are_cut_points(graph)
    # sections are runs of one resolution, numbered in order
    sections = [e.section for e in graph.exits]
    assert sections == sorted(sections) and sections[0] == 0 and sections[-1] == graph.num_sections - 1
    for a, b in zip(graph.exits, graph.exits[1:], strict=False):
        assert (a.section == b.section) == (a.spatial == b.spatial), (a.name, b.name)


def test_mobilenetv2_exits_are_blocks():
    graph = analyze(get_model("mobilenetv2", 10, 3), (3, 32, 32))
    assert graph.exit_names[-1] == "output"
    assert all(re.fullmatch(r"features\.\d+", n) for n in graph.exit_names[:-1]), graph.exit_names
    _check_exits_are_cut_points(graph)


class _DenseBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grow = nn.Conv2d(8, 4, 3, padding=1)
        self.trans = nn.Conv2d(12, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, torch.relu(self.grow(x))], 1)
        return self.fc(self.pool(torch.relu(self.trans(x))).flatten(1))


class _GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.grouped(torch.relu(self.stem(x))))).flatten(1))


def test_channel_concat_splits_per_segment():
    """Each concatenated input keeps its own segment: a width-w stage owns every segment's own prefix."""
    graph = analyze(_DenseBlockNet(), (3, 16, 16))
    cat = graph.by_name["cat"]
    assert cat.rule.value == "concat" and [(off, a.name) for off, a in cat.segments] == [(0, "relu"), (8, "relu_1")]
    assert cat.owned(0.5) == [0, 1, 2, 3, 8, 9] and cat.width_channels(0.5) == 6 and cat.owned(1.0) == list(range(12))
    assert graph.by_name["relu"].quantum == 1 and graph.by_name["trans"].width_channels(0.5) == 4


class _ConcatPlusConv(nn.Module):
    """A concat added to a conv's output: the add ties the concat's channels to a prefix, so it stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.cat([self.a(x), self.b(x)], 1) + self.c(x)).flatten(1))


def test_concat_tied_to_another_tensor_is_whole():
    graph = analyze(_ConcatPlusConv(), (3, 8, 8))
    assert graph.by_name["cat"].rule.value == "whole" and "tied" in graph.by_name["cat"].why
    assert all(graph.by_name[n].width_channels(0.25) == graph.by_name[n].channels for n in ("a", "b", "c", "add"))


def test_shufflenet_splits_around_its_shuffles():
    """Channel split, concat and shuffle are whole; the convs inside each branch still split, and the stage
    outputs (a shuffle's view back to channels-first) are exits."""
    graph = analyze(get_model("torchvision:shufflenet_v2_x0_5", 10, 3, image_size=32), (3, 32, 32))
    assert {n.split(".")[0] for n in graph.exit_names} >= {"stage2", "stage3", "stage4"}
    convs = [t for t in graph.trunk if t.rule.value in ("conv", "grouped")]
    assert any(t.quantum < t.channels for t in convs) and any(t.quantum == t.channels for t in convs)
    assert any("shuffle" in t.why or "view" in t.why for t in graph.trunk)


def test_no_exit_after_a_permute_to_channels_last():
    """ConvNeXt permutes to channels-last around its LayerNorm and linear layers: no exit may land there
    (a head reads channels on dim 1); exits are block outputs, back in channels-first."""
    graph = analyze(get_model("torchvision:convnext_tiny", 10, 3, image_size=32), (3, 32, 32))
    assert len(graph.exits) > 5
    assert all(re.fullmatch(r"features\.\d+(\.\d+)?|avgpool|output", n) for n in graph.exit_names), graph.exit_names
    assert all(graph.by_name[e.node].channels in (96, 192, 384, 768) for e in graph.exits)


def test_grouped_conv_splits_between_whole_groups():
    """groups=2 over 8 channels: the conv, and the tensors it reads and writes, split in units of 4 channels."""
    graph = analyze(_GroupedNet(), (3, 16, 16))
    grouped = graph.by_name["grouped"]
    assert grouped.rule.value == "grouped" and grouped.quantum == 4
    assert graph.by_name[grouped.inputs[0]].quantum == 4
    assert [grouped.width_channels(w) for w in (0.125, 0.5, 0.625, 1.0)] == [4, 4, 4, 8]


def test_depthwise_conv_is_accepted():
    """groups == channels is depthwise, which splits channel by channel."""
    model = _GroupedNet()
    model.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    graph = analyze(model, (3, 16, 16))
    assert graph.by_name["grouped"].rule.value == "grouped" and graph.by_name["grouped"].quantum == 1
    assert graph.by_name["stem"].rule.value == "conv"


class _OddSizes(nn.Module):
    """Adds a stride-2 branch to an upsampled one: the sizes only agree for even inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, 2, 1)
        self.side = nn.Conv2d(4, 4, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.down(x)
        return self.fc(self.pool(x + self.up(self.side(x))).flatten(1))


def test_a_model_that_fails_on_the_input_size_is_refused_in_one_line(capsys):
    analyze(_OddSizes(), (3, 16, 16))
    with pytest.raises(UnsupportedModelError) as err:
        analyze(_OddSizes(), (3, 14, 14))
    msg = str(err.value)
    assert "does not run on a (3, 14, 14) input" in msg and "\n" not in msg and "size of tensor" in msg
    assert "Traceback" not in capsys.readouterr().err
