"""``SuperNet``: stage semantics against an independent masked reference.

The reference follows design.md's stage semantics directly: the masked network of stage
``s`` is the static model with every dense conv weight multiplied by a block mask built
from the arch (channel blocks per stage, reuse on/off per section); a stage's logits
are its exit head on channels ``[0, c_s)`` at its exit, or the static tail for the last
stage. It uses only the analysed graph (node order, sections, exits) and the arch, never
the generated stages.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from s2d.models import get_model
from s2d.transform.arch import MultiStageArch, static_arch
from s2d.transform.sliced import ExitHead
from s2d.transform.stages import head_key, reads_tail
from s2d.transform.supernet import SuperNet

# ---------------------------------------------------------------- helpers


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch norm (running stats and affine) and O(1) classifier outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                bound = 1 / m.in_features ** 0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound * 3)
    return model.eval()


def random_model(name: str, shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(get_model(name, 10, shape[0], image_size=shape[1]), seed)


def supernet(name: str, shape: tuple[int, int, int], seed: int = 0, model: nn.Module | None = None) -> SuperNet:
    model = random_model(name, shape, seed) if model is None else model
    sn = SuperNet(model, shape, 10).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # heads with O(1) logits so that 1e-5 is a meaningful tolerance
        for h in sn.heads.values():
            h.fc.weight.normal_(0, 1, generator=g)
    return sn


def make_arch(*stages) -> MultiStageArch:
    return MultiStageArch.from_dict({"stages": [{"width": w, "exit": e, "reuse": r} for w, e, r in stages]})


def conv_masks(graph, arch: MultiStageArch, s: int) -> dict[str, torch.Tensor]:
    """Weight masks of every dense conv in the masked network of stage ``s`` (0-based)."""
    stages = arch.stages
    exit_index = [graph.exit(st.exit).index for st in stages]
    masks = {}
    for t in graph.trunk:
        conv = t.module
        if t.node.op != "call_module" or not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            continue
        first = min(r for r in range(len(stages)) if t.index <= exit_index[r])  # s_L
        p = graph.by_name[t.inputs[0]]
        reads_image = p.node.op == "placeholder"
        mask = torch.zeros_like(conv.weight)
        for r in range(first, s + 1):
            o0 = 0 if r == first else t.width_channels(stages[r - 1].width)
            o1 = t.width_channels(stages[r].width)
            if reads_image:
                cols = list(range(conv.in_channels))
            elif r == first or stages[r].reuse_in(t.section):
                cols = p.owned(stages[r].width)
            else:  # only the channels the earlier stage did not own (all it owns, when that is none)
                cols = [ch for ch in p.owned(stages[r].width) if ch not in set(p.owned(stages[r - 1].width))]
                cols = cols or p.owned(stages[r].width)
            mask[o0:o1, cols] = 1
        masks[f"{t.node.target}.weight"] = mask
    return masks


def reference_stages(sn: SuperNet, arch: MultiStageArch, x: torch.Tensor,
                     buffers: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every stage's logits, each from its own masked network computed from scratch."""
    graph = sn.graph
    outs = []
    for s, st in enumerate(arch.stages):
        masks = conv_masks(graph, arch, s)
        last = s == arch.num_stages - 1 or reads_tail(graph, st.exit, st.width)  # the static classifier's
        exit_ = graph.exit(st.exit)
        module = sn.static if last else graph.truncated(exit_.node)
        state = {k: p * masks[k] if k in masks else p for k, p in module.named_parameters()}
        if buffers is not None:
            state.update({k: buffers[k] for k, _ in module.named_buffers()})
        y = functional_call(module, state, (x,))
        if not last:
            y = sn.heads[head_key(st.exit, st.width_in(exit_.trunk_node.width_section))](y[:, exit_.owned(st.width)])
        outs.append(y)
    return outs


def assert_stages_close(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float = 1e-5,
                        relative: bool = False) -> None:
    """Max |diff| <= tol, relative to the logits' scale when that exceeds 1 (deep random nets such
    as ResNet-50 reach logits of 50, where float32 summation order alone moves them by 1e-5), or always
    relative with ``relative`` (deep random nets such as VGG-19 also shrink logits to 1e-2)."""
    assert len(got) == len(ref)
    for s, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape, s
        scale = r.abs().max().item()
        floor = 1e-3 if relative else 0.05
        assert scale > floor, f"stage {s + 1}: reference logits too small to test with tolerance {tol}"
        err = (g - r).abs().max().item()
        bound = tol * (scale if relative else max(1.0, scale))
        assert err <= bound, f"stage {s + 1}: max |diff| {err:.3g} (logits up to {scale:.3g})"


# ---------------------------------------------------------------- one stage == static

ONE_STAGE_MODELS = [
    ("resnet20", (1, 28, 28)),
    ("mobilenetv2", (3, 32, 32)),
    ("torchvision:resnet18", (3, 32, 32)),
    ("torchvision:resnet50", (3, 32, 32)),
    ("torchvision:mobilenet_v2", (3, 32, 32)),
    ("torchvision:mobilenet_v3_small", (3, 32, 32)),
    ("torchvision:vgg11_bn", (3, 32, 32)),
    ("torchvision:efficientnet_b0", (3, 32, 32)),  # stochastic depth (drop-path) and squeeze-and-excitation gates
    ("torchvision:resnext50_32x4d", (3, 32, 32)),  # grouped convs: widths keep whole groups
    ("torchvision:regnet_x_400mf", (3, 32, 32)),  # grouped convs with few groups (2 at the first stage)
]


@pytest.mark.parametrize("name, shape", ONE_STAGE_MODELS)
def test_one_stage_arch_is_the_static_model(name, shape):
    model = random_model(name, shape)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)  # the original module, not the traced one
    sn = supernet(name, shape, model=model)
    with torch.no_grad():
        (got,) = sn.forward_stages(x, static_arch())
        (dyn,) = sn.materialise(static_arch()).forward_all(x)
    assert expected.abs().max() > 0.05
    # rtol: without gradients the supernet runs channels-last, whose float sums run in another order (ResNet-50's
    # random logits reach hundreds)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dyn, expected, atol=1e-5, rtol=1e-5)

    # The same code splits every model: a 3-stage arch (reuse off, then per-section flags)
    # equals its masked reference too.
    names = sn.graph.exit_names
    flags = [i % 2 == 0 for i in range(sn.graph.num_sections)]
    arch = make_arch((0.25, names[len(names) // 3], False), (0.5, names[2 * len(names) // 3], flags),
                     (1.0, "output", [not f for f in flags]))
    with torch.no_grad():
        assert_stages_close(sn.forward_stages(x, arch), reference_stages(sn, arch, x))


# ---------------------------------------------------------------- incremental == masked from scratch

RESNET20_ARCHS = {
    "2 stages reuse on": [(0.25, "layer1.2", True), (1.0, "output", True)],
    "2 stages reuse off": [(0.5, "layer2.1", False), (1.0, "output", False)],
    "3 stages reuse on": [(0.25, "layer1.1", True), (0.5, "layer2.2", True), (1.0, "output", True)],
    "3 stages reuse off": [(0.25, "layer1.1", False), (0.625, "layer2.2", False), (1.0, "output", False)],
    "3 stages per-section reuse": [(0.25, "layer1.2", False), (0.5, "layer2.2", [True, False, True]),
                                   (1.0, "output", [False, True, False])],
    "depth only": [(1.0, "layer1.2", True), (1.0, "layer2.2", False), (1.0, "output", True)],
    "width only": [(0.5, "output", False), (1.0, "output", True)],
    "shared exit, two widths": [(0.25, "layer2.0", False), (0.75, "layer2.0", False), (1.0, "output", True)],
    "4 stages": [(0.125, "relu", False), (0.375, "layer1.0", True), (0.375, "layer3.0", False),
                 (1.0, "output", [True, False, False])],
    # per-section widths: section k's blocks (and the downsampling shortcut into it) at its own width
    "per-section widths, cascade": [([0.25, 0.375, 0.5], "output", True), (1.0, "output", True)],
    "per-section widths, reuse off": [([0.25, 0.375, 0.5], "layer2.2", False),
                                      ([0.375, 0.5, 0.75], "layer3.1", [True, False, True]), (1.0, "output", False)],
    "per-section widths, then uniform": [([0.125, 0.25, 0.375], "layer3.0", True), (0.375, "layer3.0", False),
                                         (1.0, "output", True)],
    # full width in the last section: the stage classifies with the static model's own classifier
    "tapered to full width at the output": [([0.75, 0.875, 1.0], "output", True), (1.0, "output", True)],
}

MOBILENET_ARCHS = {
    "2 stages reuse on": [(0.375, "features.3", True), (1.0, "output", True)],
    "3 stages reuse off": [(0.25, "features.2", False), (0.5, "features.6", False), (1.0, "output", False)],
    "3 stages per-section reuse": [(0.25, "features.1", True), (0.625, "features.8", [True, False, True, False, True]),
                                   (1.0, "output", [False, True, False, True, False])],
    "depth only": [(1.0, "features.3", True), (1.0, "features.8", True), (1.0, "output", True)],
    "shared exit, two widths": [(0.375, "features.3", False), (0.75, "features.3", True), (1.0, "output", False)],
    "per-section widths": [([0.25, 0.375, 0.5, 0.5, 0.625], "features.6", True),
                           ([0.5, 0.5, 0.75, 0.75, 1.0], "features.9", [False, True, True, False, True]),
                           (1.0, "output", False)],
}


@pytest.fixture(scope="module")
def resnet20_sn() -> SuperNet:
    return supernet("resnet20", (1, 28, 28))


@pytest.fixture(scope="module")
def mobilenet_sn() -> SuperNet:
    return supernet("torchvision:mobilenet_v3_small", (3, 32, 32))


def check_incremental(sn: SuperNet, arch, x: torch.Tensor) -> None:
    """forward_stages (and its first stages alone) equals the independent masked reference."""
    with torch.no_grad():
        ref = reference_stages(sn, arch, x)
        assert_stages_close(sn.forward_stages(x, arch), ref)
        assert_stages_close(sn.forward_stages(x, arch, upto=2), ref[:2])


@pytest.mark.parametrize("label", list(RESNET20_ARCHS))
def test_incremental_stages_equal_masked_reference_resnet20(resnet20_sn, label):
    check_incremental(resnet20_sn, make_arch(*RESNET20_ARCHS[label]),
                      torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("label", list(MOBILENET_ARCHS))
def test_incremental_stages_equal_masked_reference_mobilenet_v3(mobilenet_sn, label):
    check_incremental(mobilenet_sn, make_arch(*MOBILENET_ARCHS[label]),
                      torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


def test_reference_distinguishes_reuse(resnet20_sn):
    """Guard against a vacuous reference: reuse on and off give different stage-2 logits."""
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    on = make_arch((0.25, "layer2.2", True), (1.0, "output", True))
    off = make_arch((0.25, "layer2.2", True), (1.0, "output", False))
    with torch.no_grad():
        got_on, got_off = resnet20_sn.forward_stages(x, on)[1], resnet20_sn.forward_stages(x, off)[1]
        ref_on = reference_stages(resnet20_sn, on, x)[1]
    assert (got_on - got_off).abs().max() > 1e-2
    assert (got_off - ref_on).abs().max() > 1e-2


class _Narrow(nn.Module):
    """A 3-channel feature map in the middle, where some widths own no channel of their own."""

    def __init__(self) -> None:
        super().__init__()

        def block(i, o, stride=1):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(1, 8), block(8, 3), block(3, 8), block(8, 16, 2), block(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_reuse_off_without_own_input_channels():
    """channels(0.25, 3) == channels(0.375, 3) == 1: stage 2 has no own input channels at a
    3-channel tensor, so with reuse off it reads the existing ones, [0, c_2)."""
    torch.manual_seed(0)
    sn = SuperNet(randomize(_Narrow()), (1, 12, 12), 10).eval()
    assert sn.graph.exit_names == ["features.0", "features.1", "features.2", "features.3", "output"]
    x = torch.randn(4, 1, 12, 12)
    for stages in ([(0.25, "features.1", False), (0.375, "features.3", False), (1.0, "output", False)],
                   [(0.25, "features.2", True), (0.375, "features.2", False), (1.0, "output", [False, True])]):
        arch = make_arch(*stages)
        with torch.no_grad():
            assert_stages_close(sn.forward_stages(x, arch), reference_stages(sn, arch, x), tol=1e-5)


class _Padded(nn.Module):
    """Non-zero padding modes, a depthwise conv, conv biases and a BN without affine parameters."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(8, affine=False),
                          nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode=mode, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 16, 3, 2, padding=1, padding_mode=mode, groups=16), nn.BatchNorm2d(16),
                          nn.Hardswish()),
            nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU6()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class _Grouped(nn.Module):
    """Grouped convs the engine must keep whole: a channel multiplier (8 -> 16 in 4 groups) and, on the same
    tensor chain, a 2-group conv, so the chain splits in gcd(4, 2) = 2 units; then a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.features[0](x)
        y = self.features[1](x)
        y = y + self.features[2](y)
        return self.fc(self.pool(self.features[3](y)).flatten(1))


def test_grouped_convs_split_between_whole_groups():
    torch.manual_seed(0)
    model = randomize(_Grouped())
    sn = SuperNet(model, (3, 10, 10), 10).eval()
    units = {t.module.groups: t.channels // t.quantum for t in sn.graph.trunk if t.rule.value == "grouped"}
    assert units == {4: 2, 2: 2}
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        assert_stages_close(sn.forward_stages(x, static_arch()), [model(x)])
        for stages in ([(0.25, "features.0", True), (0.375, "features.1", False), (1.0, "output", False)],
                       [(0.25, "features.1", True), (0.75, "features.1", True), (1.0, "output", True)]):
            arch = make_arch(*stages)
            ref = reference_stages(sn, arch, x)
            assert_stages_close(sn.forward_stages(x, arch), ref)
            assert_stages_close(sn.materialise(arch).forward_all(x), ref, tol=1e-4)


class _Dense(nn.Module):
    """DenseNet-style: every layer reads the concatenation of all earlier outputs (norm on the concat, nested
    segments of unequal size); the transition reads the last concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4, 3, padding=1)) for c in (8, 12, 16))
        self.trans = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 16, 1), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.fc(self.pool(self.trans(torch.cat(feats, 1))).flatten(1))


def test_concatenations_split_per_segment():
    """Stages over concatenations equal their masked reference, for archs whose stages own different parts of
    each segment (so cached and new channels interleave), and the materialised network agrees."""
    torch.manual_seed(0)
    model = randomize(_Dense())
    sn = SuperNet(model, (3, 8, 8), 10).eval()
    assert [t.rule.value for t in sn.graph.trunk].count("concat") == 4  # one of a single tensor
    x = torch.randn(3, 3, 8, 8)
    names = sn.graph.exit_names
    with torch.no_grad():
        assert_stages_close(sn.forward_stages(x, static_arch()), [model(x)])
        for stages in ([(0.25, "stem", True), (0.5, "trans.1", False), (1.0, "output", True)],
                       [(0.375, "trans.1", True), (0.75, "trans.1", False), (1.0, "output", False)],
                       [(0.5, names[0], True), (1.0, "output", False)]):
            arch = make_arch(*stages)
            ref = reference_stages(sn, arch, x)
            assert_stages_close(sn.forward_stages(x, arch), ref)
            assert_stages_close(sn.materialise(arch).forward_all(x), ref, tol=1e-4)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_padding_modes(mode):
    """Slices pad like the static conv (reflect/circular padding is per channel, so it splits)."""
    torch.manual_seed(0)
    model = randomize(_Padded(mode))
    sn = SuperNet(model, (3, 10, 10), 10).eval()
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        assert_stages_close(sn.forward_stages(x, static_arch()), [expected])
        assert_stages_close(sn.materialise(static_arch()).forward_all(x), [expected])
        arch = make_arch((0.25, "features.1", False), (0.5, "features.2", True), (1.0, "output", [False, True]))
        ref = reference_stages(sn, arch, x)
        assert_stages_close(sn.forward_stages(x, arch), ref)
        assert_stages_close(sn.materialise(arch).forward_all(x), ref)


# ---------------------------------------------------------------- materialised DynamicNet

@pytest.mark.parametrize("fold_bn", [True, False])
def test_materialised_forward_all_equals_forward_stages(resnet20_sn, mobilenet_sn, fold_bn):
    cases = [(resnet20_sn, RESNET20_ARCHS["3 stages per-section reuse"], (1, 28, 28)),
             (resnet20_sn, RESNET20_ARCHS["depth only"], (1, 28, 28)),
             (mobilenet_sn, MOBILENET_ARCHS["3 stages per-section reuse"], (3, 32, 32))]
    for sn, stages, shape in cases:
        arch = make_arch(*stages)
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = sn.forward_stages(x, arch)
        net = sn.materialise(arch, fold_bn=fold_bn)
        got = net.forward_all(x)
        assert_stages_close(got, ref, tol=1e-5 if not fold_bn else 2e-5)
        # materialised weights are copies: changing the supernet does not change the net
        assert not any(p.requires_grad for p in net.parameters())
        # on the CPU they are laid out channels-last (the faster layout here), and the layout changes no logit
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    conv = resnet20_sn.static.get_submodule("layer1.0.conv1")
    net = resnet20_sn.materialise(make_arch(*RESNET20_ARCHS["2 stages reuse on"]), fold_bn=fold_bn)
    x = torch.randn(2, 1, 28, 28)
    before = net.forward_all(x)
    with torch.no_grad():
        saved = conv.weight.clone()
        conv.weight.mul_(2)
    try:
        after = net.forward_all(x)
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------- batch norm recalibration

def test_recalibrate_bn_matches_masked_activation_statistics():
    sn = supernet("resnet20", (1, 28, 28), seed=5)
    arch = make_arch((0.25, "layer1.2", False), (0.5, "layer2.1", [True, False, True]), (1.0, "output", True))
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(6, 1, 28, 28, generator=g), torch.zeros(6, dtype=torch.long)) for _ in range(4)]

    # Independent reference: the full masked network (every channel of every node, as the
    # arch computes it) in training mode, batch statistics at every BN, one batch at a time.
    masks = conv_masks(sn.graph, arch, arch.num_stages - 1)
    static = copy.deepcopy(sn.static).train()
    bns = {n: m for n, m in static.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in bns}
    for name, m in bns.items():
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen[name].append(
            (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=True))))
    with torch.no_grad():
        state = {k: p * masks[k] if k in masks else p for k, p in static.named_parameters()}
        for x, _ in batches:
            functional_call(static, state, (x,))
    expected_mean = {n: torch.stack([m for m, _ in v]).mean(0) for n, v in seen.items()}
    expected_var = {n: torch.stack([v for _, v in vs]).mean(0) for n, vs in seen.items()}

    sn.recalibrate_bn(arch, iter(batches + batches), num_batches=len(batches))  # stops after num_batches
    assert not sn.training
    got = {n: m for n, m in sn.static.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(got) == set(expected_mean) and len(got) == 21
    for n, m in got.items():
        torch.testing.assert_close(m.running_mean, expected_mean[n], atol=1e-4, rtol=1e-4, msg=n)
        torch.testing.assert_close(m.running_var, expected_var[n], atol=1e-4, rtol=1e-4, msg=n)
        assert m.momentum == 0.1  # restored
    # the dropped off-diagonal blocks really shift statistics: not the static network's
    plain = copy.deepcopy(sn.static).train()
    stats = []
    plain.get_submodule("layer1.0.bn1").register_forward_pre_hook(lambda mod, inp: stats.append(inp[0].mean((0, 2, 3))))
    with torch.no_grad():
        plain(batches[0][0])
    assert (stats[0] - seen["layer1.0.bn1"][0][0]).abs().max() > 1e-3



def test_arch_statistics_are_estimated_once_per_arch_and_invalidated_by_training():
    sn = supernet("resnet20", (1, 28, 28), seed=6)
    a = make_arch((0.25, "layer1.2", True), (1.0, "output", True))
    b = make_arch((0.5, "layer2.2", False), (1.0, "output", True))
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(6, 1, 28, 28, generator=g), torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    x = torch.randn(4, 1, 28, 28, generator=g)

    ref = copy.deepcopy(sn)  # by hand: recalibrate for the arch, then an eval-mode forward
    ref.recalibrate_bn(a, iter(batches), num_batches=3)
    with torch.no_grad():
        expected_a = ref.eval().forward_stages(x, a)

    calls = []
    sn.use_arch_statistics(lambda: calls.append(1) or iter(batches), num_batches=3)
    sn.eval()
    with torch.no_grad():
        assert_stages_close(sn.forward_stages(x, a), expected_a)
        sn.forward_stages(x, a)  # the buffers already hold a's statistics
        assert len(calls) == 1
        sn.forward_stages(x, b)
        assert len(calls) == 2
        assert_stages_close(sn.forward_stages(x, a), expected_a)
        assert len(calls) == 3
        sn.train()
        sn.forward_stages(x, b)  # a training forward moves the running statistics
        sn.eval()
        assert_stages_close(sn.forward_stages(x, a), expected_a)
        assert len(calls) == 4
        sn.materialise(a)  # materialising needs the arch's statistics too: still a's
        assert len(calls) == 4
        sn.load_state_dict(sn.state_dict())
        sn.materialise(a)
        assert len(calls) == 5


# ---------------------------------------------------------------- training through the stages

def test_gradients_reach_shared_weights():
    sn = supernet("resnet20", (1, 28, 28), seed=3).train()
    arch = make_arch((0.25, "layer1.2", True), (0.5, "layer2.2", False), (1.0, "output", True))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 3])
    buffers = {k: b.clone() for k, b in sn.static.named_buffers()}

    def loss_of(outs):
        return sum(nn.functional.cross_entropy(o, y) for o in outs)

    loss_of(sn.forward_stages(x, arch)).backward()
    params = dict(sn.named_parameters())
    got = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    sn.zero_grad(set_to_none=True)
    loss_of(reference_stages(sn, arch, x, buffers=buffers)).backward()
    ref = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}

    assert set(got) == set(ref)
    used_heads = {f"heads.{head_key(s.exit, s.width)}.fc.weight" for s in arch.stages[:-1]}
    assert used_heads <= set(got)
    assert {"static.conv1.weight", "static.layer3.2.conv2.weight", "static.fc.weight"} <= set(got)
    for k in got:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
    # blocks an arch does not use get no gradient: stage 1 (4 of 16 channels) never reads
    # channels 4.. at layer1.0.conv1 and stage 2 (reuse off in section 0) never reads 0..4
    g = got["static.layer1.0.conv1.weight"]
    assert g[:4, :4].abs().sum() > 0 and g[:4, 4:].abs().sum() == 0
    assert g[4:8, 4:8].abs().sum() > 0 and g[4:8, :4].abs().sum() == 0
    assert g[8:, :8].abs().sum() > 0  # stage 3 reuses everything
    assert g[8:, 8:].abs().sum() > 0


def test_forwards_without_gradients_run_channels_last_and_training_gets_the_weights_back():
    sn = supernet("resnet20", (1, 28, 28), seed=5).eval()
    arch = make_arch((0.25, "layer1.2", True), (0.5, "layer2.2", False), (1.0, "output", True))
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    conv = sn.static.get_submodule("layer2.0.conv1").weight
    with_grad = [o.detach() for o in sn.forward_stages(x, arch)]
    assert conv.is_contiguous()
    with torch.no_grad():
        fast = sn.forward_stages(x, arch)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for a, b in zip(fast, with_grad, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a training step after an evaluation: the same parameter objects, back in the default layout, updated
    opt = torch.optim.SGD(sn.parameters(), lr=0.1)
    before = conv.detach().clone()
    sn.train()
    sum(o.sum() for o in sn.forward_stages(x, arch)).backward()
    opt.step()
    assert sn.static.get_submodule("layer2.0.conv1").weight is conv and conv.is_contiguous()
    assert not torch.equal(conv.detach(), before)


# ---------------------------------------------------------------- exit heads

@pytest.mark.parametrize("spatial, cells", [((28, 28), 16), ((14, 14), 16), ((7, 7), 16), ((8, 4), 16),
                                            ((3, 9), 9), ((2, 2), 4), ((1, 1), 1)])
def test_exit_head_pools_to_a_small_grid(spatial, cells):
    head = ExitHead(8, 10, spatial)
    assert head.fc.in_features == 8 * cells
    x = torch.randn(2, 8, *spatial)
    pooled = head.pool(x)
    assert pooled[0, 0].numel() == cells
    if spatial == (7, 7):  # windows of 2, the last one holds the 7th row/column alone
        torch.testing.assert_close(pooled[:, :, 0, 0], x[:, :, :2, :2].mean((2, 3)))
        torch.testing.assert_close(pooled[:, :, 3, 3], x[:, :, 6, 6])
    assert head(x).shape == (2, 10)


def test_fit_heads_sees_each_training_image_once_with_per_arch_statistics(fmnist):
    """Estimating an arch's statistics runs forwards of its own; they must not leak into the
    pooled features the heads are fitted on."""
    from s2d.data import Batches
    from s2d.training.heads import pooled_exit_features

    sn = supernet("resnet20", (1, 28, 28), seed=9)
    bn_images = fmnist.train.subset(64)
    sn.use_arch_statistics(lambda: Batches(bn_images, fmnist.info, 32), num_batches=2)
    arch = make_arch((0.5, "layer1.2", True), (1.0, "output", True))
    feats = pooled_exit_features(sn, arch, fmnist.train.subset(100), fmnist.info)
    assert [f.shape for f in feats] == [(100, 8 * 16)]
