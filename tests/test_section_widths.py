"""Per-section widths (non-uniform pruning): the arch value, tied channels across section boundaries,
stages that compute exactly the masked network, and the search space's taper decision."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from s2d.errors import ArchError
from s2d.measure.cost import stage_macs
from s2d.models import get_model
from s2d.search.space import Decision, SearchSpace
from s2d.transform.arch import MultiStageArch, Stage
from s2d.transform.graph import OUTPUT_EXIT, Rule, analyze
from tests.test_env import enumerate_masked, make_env, masked_episode
from tests.test_supernet import supernet

TAPERED = [0.25, 0.375, 0.5]  # ResNet-20's 0.375 tapered: 4 / 12 / 32 channels


@pytest.fixture(scope="module")
def r20():
    return supernet("resnet20", (1, 28, 28))


def arch_of(*stages) -> MultiStageArch:
    return MultiStageArch.from_dict({"stages": [{"width": w, "exit": e} for w, e in stages]})


# ------------------------------------------------------------------ the arch value

def test_json_round_trip_and_equal_widths_collapse():
    a = arch_of((TAPERED, OUTPUT_EXIT))
    assert a.stages[0].width == tuple(TAPERED) and a.stages[0].per_section
    assert a.to_dict()["stages"][0]["width"] == TAPERED
    assert MultiStageArch.from_dict(a.to_dict()) == a
    # one network, one key: a list of equal widths is that width
    same = arch_of(([0.5, 0.5, 0.5], OUTPUT_EXIT))
    assert same.stages[0].width == 0.5 and same.key() == arch_of((0.5, OUTPUT_EXIT)).key()
    assert a.stages[0].mean_width == pytest.approx(np.sqrt((0.25 ** 2 + 0.375 ** 2 + 0.5 ** 2) / 3))


@pytest.mark.parametrize("stages, message", [
    ([([0.25, 0.5], OUTPUT_EXIT)], "has 2 values but the model has 3 sections"),
    ([([0.25, 0.3, 0.5], OUTPUT_EXIT)], "width 0.3 is off the grid"),
    ([(TAPERED, "layer2.0"), ([0.375, 0.375, 0.375], OUTPUT_EXIT)], "width 0.375 in section 3 is smaller"),
    ([(TAPERED, "layer2.0"), (TAPERED, "layer2.0"), (1.0, OUTPUT_EXIT)], "same width and exit"),
])
def test_validation_names_the_stage_and_section(r20, stages, message):
    with pytest.raises(ArchError, match=message):
        arch_of(*stages).validate(r20.graph)


def test_bad_width_lists_are_refused_on_load():
    for bad in ([], [True, 0.5, 0.5], ["a", 0.5, 0.5]):
        with pytest.raises(ArchError, match="width must be a number or a list"):
            arch_of((bad, OUTPUT_EXIT))


# ------------------------------------------------------------------ channels

def test_resnet20_tapered_stage_is_a_4_12_32_network(r20):
    arch = arch_of((TAPERED, OUTPUT_EXIT)).validate(r20.graph)
    net = r20.materialise(arch, fold_bn=False)
    convs = [m for m in net.stages[0].modules() if isinstance(m, nn.Conv2d)]
    assert sorted({m.out_channels for m in convs}) == [4, 12, 32]
    assert convs[0].out_channels == 4 and convs[-1].out_channels == 32
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (shared,) = r20.forward_stages(x, arch)
        (copied,) = r20.materialise(arch).forward_all(x)
    torch.testing.assert_close(copied, shared, atol=1e-5, rtol=1e-5)
    # its MACs lie between the uniform networks of its narrowest and widest section
    (tapered,), _ = stage_macs(net.stages, r20.input_shape)
    (lo,), _ = stage_macs(r20.materialise(arch_of((0.25, OUTPUT_EXIT)), fold_bn=False).stages, r20.input_shape)
    (hi,), _ = stage_macs(r20.materialise(arch_of((0.5, OUTPUT_EXIT)), fold_bn=False).stages, r20.input_shape)
    assert lo < tapered < hi


def test_tied_channels_take_the_width_of_their_first_section():
    """MobileNetV3's first block is a depthwise conv on the stem's output, in the next section: it, its norm and
    its squeeze-excitation scale keep the stem's channel count (the stem's section), while the block's
    projection sets its own. Tensors an op ties channel for channel always get one width."""
    graph = analyze(get_model("torchvision:mobilenet_v3_small", 10, 3, image_size=32), (3, 32, 32))
    crossing = [t for t in graph.trunk if t.rule is Rule.GROUPED and t.width_section != t.section]
    assert crossing, "expected a depthwise conv right after a section boundary"
    for t in graph.trunk:
        if t.rule in (Rule.GROUPED, Rule.NORM, Rule.CHANNELWISE, Rule.BINARY):
            assert {graph.by_name[a].width_section for a in t.inputs} == {t.width_section}, t.name
    assert any(t.rule is Rule.CONV and t.width_section == t.section > 0 for t in graph.trunk)
    resnet = analyze(get_model("resnet20", 10, 1), (1, 28, 28))
    assert all(t.width_section == t.section for t in resnet.trunk if t.rule is not Rule.INPUT)


# ------------------------------------------------------------------ the search space

@pytest.fixture(scope="module")
def spaces(r20):
    return SearchSpace(r20.graph), SearchSpace(r20.graph, section_widths=True)


def test_taper_is_one_grid_step_each_way(spaces):
    _, space = spaces
    i = space.widths.index(0.375)
    assert space.taper(i) == tuple(TAPERED)
    assert space.taper(0) == (0.125, 0.125, 0.25)  # clipped at the narrow end
    assert space.taper(len(space.widths) - 1) == (0.875, 1.0, 1.0)


def test_without_section_widths_the_space_is_unchanged(spaces):
    plain, _ = spaces
    assert all(d.kind != "taper" for d in plain.decisions(4))
    rng = np.random.default_rng(0)
    assert not any(s.per_section for _ in range(200) for s in plain.sample(rng).stages)


@pytest.mark.parametrize("n", [1, 2])
def test_masks_allow_exactly_the_valid_tapered_archs(spaces, r20, n):
    _, space = spaces
    shapes = {space.widths[i] for i in range(len(space.widths))} | {space.taper(i) for i in range(len(space.widths))}
    shapes = {Stage(s, OUTPUT_EXIT).width for s in shapes}  # equal widths collapse, as archs hold them
    valid = set()
    for firsts in itertools.product(itertools.product(shapes, space.exits), repeat=n - 1):
        for last in shapes:
            stages = (*(Stage(w, e) for w, e in firsts), Stage(last, OUTPUT_EXIT))
            try:
                MultiStageArch(stages).validate(r20.graph)
            except ArchError:
                continue
            valid.add(tuple((s.width, s.exit) for s in stages))
    assert enumerate_masked(space, n) == valid
    assert any(isinstance(w, tuple) for arch in valid for w, _ in arch)


def test_sampled_and_decoded_archs_are_valid_and_round_trip(spaces, r20):
    _, space = spaces
    rng = np.random.default_rng(1)
    tapered = 0
    for _ in range(300):
        arch = space.sample(rng)
        arch.validate(r20.graph)
        assert space.decode(space.encode(arch)) == arch
        tapered += any(s.per_section for s in arch.stages)
    assert tapered > 50
    assert space.size() > SearchSpace(r20.graph).size()
    pruned = [a for a in space.seeds() if a.num_stages == 1]
    assert arch_of((TAPERED, OUTPUT_EXIT)) in pruned and arch_of((0.375, OUTPUT_EXIT)) in pruned


def test_sandwich_trains_tapered_pruned_networks(spaces):
    plain, space = spaces
    rng = np.random.default_rng(0)
    drawn = [a for _ in range(40) for a in space.sandwich(random_archs=0)(rng)]
    assert any(a.stages[0].per_section for a in drawn) and any(not a.stages[0].per_section for a in drawn)
    # without section widths the sampler's random stream is the one it always was
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    first = [x.key() for _ in range(10) for x in plain.sandwich()(a)]
    assert first == [x.key() for _ in range(10) for x in plain.sandwich()(b)]
    assert all(not s.per_section for _ in range(10) for x in plain.sandwich()(a) for s in x.stages)


def test_env_episodes_build_tapered_archs(r20):
    env, fake = make_env(r20.graph, section_widths=True)
    plain, _ = make_env(r20.graph)
    assert env.observation_space.shape[0] > plain.observation_space.shape[0]
    rng = np.random.default_rng(0)
    for ep in range(60):
        masked_episode(env, rng, seed=ep)
    assert any(s.per_section for a in fake.archs for s in a.stages)
    taper = Decision("taper", 0)
    assert env.unwrapped.kinds[-1] == taper.kind


def test_env_checkers_pass_with_tapers(r20):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env, fake = make_env(r20.graph, section_widths=True)
    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped, warn=True)
    assert fake.archs


def test_cli_flag_reaches_the_run_config():
    from s2d.cli import build_parser
    from s2d.cli.convert import config_from_args

    on = config_from_args(build_parser().parse_args(["convert", "--section-widths"]))
    off = config_from_args(build_parser().parse_args(["convert"]))
    assert on.section_widths and not off.section_widths
