"""``s2d/MultiStage-v0`` and ``SearchSpace``: checkers, masks, validity, seeding, baselines.

Everything here runs on the analysed graph only (no supernet, no data): the env gets a
cheap fake evaluator whose figures are a function of the arch, so a test can check what
the env passes through.
"""

from __future__ import annotations

import itertools
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401  (registers s2d/MultiStage-v0)
from envs.multistage import MultiStageEnv
from s2d.errors import ArchError
from s2d.models import get_model
from s2d.search.evaluator import Evaluation
from s2d.search.space import THRESHOLD_GRID, Decision, SearchSpace
from s2d.transform.arch import WIDTH_GRID, MultiStageArch, Stage
from s2d.transform.graph import OUTPUT_EXIT, analyze


@pytest.fixture(scope="module")
def r20_graph():
    return analyze(get_model("resnet20", 10, 1), (1, 28, 28))


@pytest.fixture(scope="module")
def mnv3_graph():
    return analyze(get_model("torchvision:mobilenet_v3_small", 10, 3, image_size=32), (3, 32, 32))


def fake_reward(arch: MultiStageArch) -> float:
    """A deterministic figure of the arch: cheaper, shallower first stages score higher."""
    return 1.0 - sum(s.mean_width for s in arch.stages) / len(arch.stages) - 0.01 * len(arch.stages)


class FakeEvaluator:
    """Stands in for ``ArchEvaluator.evaluate``: records every arch, returns figures computed from it."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.archs: list[MultiStageArch] = []

    def __call__(self, arch: MultiStageArch) -> Evaluation:
        arch.validate(self.graph)  # the env must only ever hand over valid archs
        self.archs.append(arch)
        n = arch.num_stages
        thresholds = list(arch.thresholds) or [0.9] * (n - 1)
        return Evaluation(arch=arch.with_thresholds(thresholds).to_dict(), reward=fake_reward(arch),
                          accuracy=0.5 + 0.1 * n, average_macs=1e6 * arch.stages[0].mean_width, mac_ratio=0.1 * n,
                          exit_rates=[1.0 / n] * n, thresholds=thresholds, stage_macs=[1e6] * n,
                          stage_accuracy=[0.5] * n, meets_target=n > 2)


def make_env(graph, **space_kw) -> tuple[gymnasium.Env, FakeEvaluator]:
    fake = FakeEvaluator(graph)
    env = gymnasium.make("s2d/MultiStage-v0", space=SearchSpace(graph, **space_kw), evaluate=fake)
    return env, fake


def masked_episode(env: gymnasium.Env, rng: np.random.Generator, seed: int | None = None):
    """One episode with uniformly random valid actions; returns (observations, actions, reward, info).

    The mask is read as sb3-contrib reads it through wrappers (``get_wrapper_attr``).
    """
    obs, _ = env.reset(seed=seed)
    observations, actions = [obs], []
    while True:
        mask = env.get_wrapper_attr("action_masks")()
        assert mask.dtype == bool and mask.shape == (env.action_space.n,) and mask.any()
        a = int(rng.choice(np.flatnonzero(mask)))
        actions.append(a)
        obs, reward, terminated, truncated, info = env.step(a)
        assert not truncated
        assert env.observation_space.contains(obs)
        observations.append(obs)
        if terminated:
            return observations, actions, reward, info
        assert reward == 0.0


# ------------------------------------------------------------------ checkers

@pytest.mark.parametrize("search_thresholds", [False, True])
def test_env_checkers_pass(r20_graph, search_thresholds):
    env, fake = make_env(r20_graph, search_thresholds=search_thresholds)
    assert env.spec is not None and env.spec.id == "s2d/MultiStage-v0"
    inner = env.unwrapped
    assert isinstance(inner, MultiStageEnv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(inner)
        sb3_check_env(inner, warn=True)
    assert [str(w.message) for w in caught] == []  # neither checker has anything to say
    assert fake.archs  # the checkers ran whole episodes, so the last step was reached


# ------------------------------------------------------------------ masked rollouts

@pytest.mark.parametrize("graph_name", ["r20_graph", "mnv3_graph"])
@pytest.mark.parametrize("search_thresholds", [False, True])
def test_masked_random_rollouts_are_valid(request, graph_name, search_thresholds):
    graph = request.getfixturevalue(graph_name)
    env, fake = make_env(graph, search_thresholds=search_thresholds)
    inner: MultiStageEnv = env.unwrapped
    space = inner.space
    rng = np.random.default_rng(0)
    stage_counts, lengths = set(), set()
    reuse_seen, widths_seen, exits_seen = set(), set(), set()
    for ep in range(200):
        _, actions, reward, info = masked_episode(env, rng, seed=ep)
        arch = fake.archs[-1]
        arch.validate(graph)
        MultiStageArch.from_dict(info["arch"]).validate(graph)
        n = arch.num_stages
        assert 1 <= n <= 4
        assert len(actions) == 1 + len(space.decisions(n))
        assert reward == pytest.approx(fake_reward(arch))
        assert info["accuracy"] == pytest.approx(0.5 + 0.1 * n) and info["meets_target"] == (n > 2)
        assert len(arch.thresholds) == ((n - 1) if search_thresholds else 0)
        if search_thresholds:
            assert set(arch.thresholds) <= set(THRESHOLD_GRID)
        stage_counts.add(n)
        lengths.add(len(actions))
        for s in arch.stages:
            widths_seen.add(s.width)
            exits_seen.add(s.exit)
            reuse_seen.update([s.reuse] if isinstance(s.reuse, bool) else s.reuse)
    assert len(fake.archs) == 200
    assert stage_counts == {1, 2, 3, 4}
    assert reuse_seen == {True, False}
    assert widths_seen == set(WIDTH_GRID)
    assert exits_seen == set(graph.exit_names)


def enumerate_masked(space: SearchSpace, n: int) -> set[tuple]:
    """Every (width, exit) sequence of n-stage archs the masks allow (reuse/thresholds fixed)."""
    decisions = [d for d in space.decisions(n) if d.kind in ("width", "taper", "exit")]
    out = set()

    def walk(i: int, chosen: dict) -> None:
        if i == len(decisions):
            arch = space.build(n, chosen)  # validates
            out.add(tuple((s.width, s.exit) for s in arch.stages))
            return
        d = decisions[i]
        for a in np.flatnonzero(space.options(d, chosen, n)):
            walk(i + 1, {**chosen, space.key_of(d): int(a)})

    walk(0, {})
    return out


def _enumerate_valid(graph, n: int) -> set[tuple]:
    """Brute force: every (width, exit) sequence that MultiStageArch.validate accepts."""
    pairs = list(itertools.product(WIDTH_GRID, graph.exit_names))
    out = set()
    for firsts in itertools.product(pairs, repeat=n - 1):
        for last_width in WIDTH_GRID:  # the last stage may be narrower than 1 (static pruning)
            stages = (*(Stage(w, e) for w, e in firsts), Stage(last_width, OUTPUT_EXIT))
            try:
                MultiStageArch(stages).validate(graph)
            except ArchError:
                continue
            out.add(tuple((s.width, s.exit) for s in stages))
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_masks_allow_exactly_the_valid_archs(r20_graph, n):
    """The masks neither admit an invalid arch nor hide a valid one (widths and exits)."""
    space = SearchSpace(r20_graph)
    masked = enumerate_masked(space, n)
    valid = _enumerate_valid(r20_graph, n)
    assert masked == valid
    if n == 1:
        assert len(valid) == len(WIDTH_GRID)  # one stage: a uniformly pruned network at each width


def test_masks_never_dead_end_near_the_end(r20_graph):
    """A 4-stage arch whose first stage is late and wide must still be completable."""
    space = SearchSpace(r20_graph)
    n_w, n_e = len(space.widths), len(space.exits)
    chosen: dict = {}
    w_mask = space.options(Decision("width", 0), chosen, 4)
    assert w_mask[n_w - 1]  # full width at stage 1 is fine: later stages can move the exit
    chosen[("width", 0)] = n_w - 1
    e_mask = space.options(Decision("exit", 0), chosen, 4)
    # stages 2 and 3 (full width too) need strictly later exits before 'output' (index n_e - 1),
    # so stage 1 can exit no later than index n_e - 4
    assert np.flatnonzero(e_mask).tolist() == list(range(n_e - 3))


def test_invalid_action_is_mapped_to_a_valid_one(r20_graph):
    env, fake = make_env(r20_graph)
    inner: MultiStageEnv = env.unwrapped
    env.reset(seed=0)
    assert inner.action_masks().tolist()[:5] == [False, True, True, True, True]
    env.step(0)  # 0 stages: the nearest valid choice is 1 (a pruned network)
    assert inner.num_stages == 1 and inner.decision == Decision("width", 0)
    env.reset()
    env.step(2)
    assert inner.num_stages == 2
    assert inner.decision == Decision("width", 0)
    env.step(5)  # width 6/8
    assert inner.chosen[("width", 0)] == 5
    env.step(9)  # exit 'output' at width 6/8: allowed (S2DNAS-style width-only stage)
    assert inner.chosen[("exit", 0)] == 9
    env.step(2)  # last stage width 3/8 -> narrower than 6/8 at the same exit: nearest valid is 7/8
    assert inner.chosen[("width", 1)] == 6
    env.reset()
    env.step(2)
    env.step(5)
    env.step(9)
    env.step(7)  # last stage at full width
    assert inner.decision == Decision("recompute", 1)
    env.step(0)  # reuse features (no cascade)
    # reuse flags are 0/1: 7 maps to 1 (nearest), -3 to 0
    env.step(7)
    env.step(-3)
    _, reward, terminated, _, info = env.step(1)
    assert terminated and info["accuracy"] == pytest.approx(0.7)
    arch = fake.archs[-1]
    assert arch.stages[0] == Stage(0.75, OUTPUT_EXIT, True)
    assert arch.stages[1] == Stage(1.0, OUTPUT_EXIT, (True, False, True))
    assert reward == pytest.approx(fake_reward(arch))

    # widths cannot go backwards: after a 6/8 first stage, a 1/8 second stage becomes 6/8
    env.reset()
    env.step(3)
    env.step(5)  # width 6/8
    env.step(2)  # exit layer1.1
    env.step(0)  # width 1/8 -> nearest valid is 6/8
    assert inner.chosen[("width", 1)] == 5
    env.step(2)  # exit layer1.1 again at the same width is empty -> next exit
    assert inner.chosen[("exit", 1)] == 3
    # a too-large action maps to the largest valid one
    env.reset()
    env.step(99)
    assert inner.num_stages == 4


def test_same_seed_same_actions_same_episode(r20_graph):
    def run(seed: int) -> tuple[list[np.ndarray], list[MultiStageArch]]:
        env, fake = make_env(r20_graph, search_thresholds=True)
        rng = np.random.default_rng(seed)
        obs = []
        for ep in range(20):
            o, _, _, _ = masked_episode(env.unwrapped, rng, seed=seed if ep == 0 else None)
            obs += o
        return obs, fake.archs

    obs_a, archs_a = run(7)
    obs_b, archs_b = run(7)
    assert len(obs_a) == len(obs_b)
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b, strict=True))
    assert archs_a == archs_b
    _, archs_c = run(8)
    assert archs_c != archs_a


def test_observation_describes_the_decisions(r20_graph):
    """Different partial archs give different observations (the agent can tell them apart)."""
    env, _ = make_env(r20_graph, search_thresholds=True)
    inner: MultiStageEnv = env.unwrapped
    rng = np.random.default_rng(3)
    seen: dict[bytes, tuple] = {}
    for _ in range(100):
        inner.reset()
        history: tuple = ()
        while True:
            o = inner._obs()
            key = o.tobytes()
            state = (inner.num_stages, tuple(sorted(inner.chosen.items())), inner.decision)
            assert seen.setdefault(key, state) == state, "two different states share an observation"
            a = int(rng.choice(np.flatnonzero(inner.action_masks())))
            history += (a,)
            *_, terminated, _, _ = inner.step(a)
            if terminated:
                break


# ------------------------------------------------------------------ SearchSpace

def test_sample_is_reproducible_and_valid(r20_graph):
    space = SearchSpace(r20_graph)
    a = [space.sample(np.random.default_rng(11)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    s1 = [space.sample(g1) for _ in range(50)]
    s2 = [space.sample(g2) for _ in range(50)]
    assert s1 == s2
    s3 = [space.sample(np.random.default_rng(6)) for _ in range(50)]
    assert s3 != s1
    for arch in s1:
        arch.validate(r20_graph)
        assert 1 <= arch.num_stages <= 4 and arch.thresholds == ()
    assert {a.num_stages for a in s1} == {1, 2, 3, 4}
    multi = [a for a in s1 if a.num_stages > 1]  # one-stage archs are just the 8 widths
    assert len({a.key() for a in multi}) >= 0.9 * len(multi)  # a big space: repeats are rare


def test_sample_respects_stage_limits_and_thresholds(r20_graph):
    space = SearchSpace(r20_graph, min_stages=3, max_stages=3, search_thresholds=True)
    rng = np.random.default_rng(0)
    for _ in range(50):
        arch = space.sample(rng)
        assert arch.num_stages == 3
        assert len(arch.thresholds) == 2 and set(arch.thresholds) <= set(THRESHOLD_GRID)
    with pytest.raises(ValueError):
        SearchSpace(r20_graph, min_stages=3, max_stages=2)
    with pytest.raises(ValueError):
        SearchSpace(r20_graph, max_stages=5)


def test_smallest(r20_graph, mnv3_graph):
    """Quarter width at the end of the first section (the first exit whose next exit changes resolution)."""
    expected = {id(r20_graph): "layer1.2", id(mnv3_graph): "features.0"}
    for graph in (r20_graph, mnv3_graph):
        space = SearchSpace(graph)
        arch = space.smallest()
        arch.validate(graph)
        assert arch.stages == (Stage(WIDTH_GRID[1], expected[id(graph)], True), Stage(1.0, OUTPUT_EXIT, True))
        assert arch.thresholds == ()


def test_depth_only(r20_graph, mnv3_graph):
    space = SearchSpace(r20_graph)
    arch = space.depth_only()
    assert [(s.width, s.exit) for s in arch.stages] == [(1.0, "layer1.2"), (1.0, "layer2.2"), (1.0, OUTPUT_EXIT)]
    assert space.depth_only(2).stages[0].exit == "layer2.2"  # the latest section end first
    four = space.depth_only(4)
    assert four.num_stages == 4 and all(s.width == 1.0 for s in four.stages)
    assert [s.exit for s in space.depth_only(early=True).stages] == ["layer1.0", "layer2.0", OUTPUT_EXIT]
    assert [s.exit for s in space.depth_only(2, early=True).stages] == ["layer1.0", OUTPUT_EXIT]  # the earliest
    for graph in (r20_graph, mnv3_graph):
        space = SearchSpace(graph)
        for n in (2, 3, 4):
            arch = space.depth_only(n)
            arch.validate(graph)
            assert arch.num_stages == n
            assert all(s.width == 1.0 and s.reuse is True for s in arch.stages)
            idx = [graph.exit_names.index(s.exit) for s in arch.stages]
            assert idx == sorted(set(idx)) and idx[-1] == len(graph.exit_names) - 1
            early = space.depth_only(n, early=True)  # validated; ordered, full width, ends at the output
            e_idx = [graph.exit_names.index(s.exit) for s in early.stages]
            assert e_idx == sorted(set(e_idx)) and e_idx[-1] == len(graph.exit_names) - 1 and e_idx[0] == 1
    # MobileNetV3: the first stages end sections (the resolution changes right after them)
    space = SearchSpace(mnv3_graph)
    by_name = {e.name: e for e in mnv3_graph.exits}
    names = mnv3_graph.exit_names
    for s in space.depth_only(3).stages[:-1]:
        nxt = mnv3_graph.exits[names.index(s.exit) + 1]
        assert nxt.section != by_name[s.exit].section


def test_depth_only_sweep(r20_graph, mnv3_graph):
    """Every full-width arch of up to four stages on ResNet-20 (9 exits before the output: 9 + 36 + 84), valid and
    distinct, the stem's exit included; a limit drops whole stage counts, the largest first."""
    space = SearchSpace(r20_graph)
    sweep = space.depth_only_sweep()
    assert len(sweep) == 9 + 36 + 84 == len({a.key() for a in sweep})
    assert all(a.is_full_width and a.stages[-1].exit == OUTPUT_EXIT and 2 <= a.num_stages <= 4 for a in sweep)
    assert sweep[0].stages[0].exit == r20_graph.exit_names[0]  # the stem's exit
    assert space.depth_only(early=True) in sweep and space.depth_only() in sweep
    assert [a.num_stages for a in space.depth_only_sweep(limit=50)] == [2] * 9 + [3] * 36
    assert len(space.depth_only_sweep(limit=1)) == 9  # one stage count at least
    assert all(a.num_stages <= 3 for a in SearchSpace(r20_graph, max_stages=3).depth_only_sweep())
    for arch in SearchSpace(mnv3_graph).depth_only_sweep():
        arch.validate(mnv3_graph)


def test_width_only(r20_graph, mnv3_graph):
    for graph in (r20_graph, mnv3_graph):
        space = SearchSpace(graph)
        arch = space.width_only()
        arch.validate(graph)
        assert [(s.width, s.exit, s.reuse) for s in arch.stages] == [
            (0.25, OUTPUT_EXIT, True), (0.5, OUTPUT_EXIT, True), (1.0, OUTPUT_EXIT, True)]
        arch = space.width_only((0.125, 0.5, 0.75))
        assert arch.num_stages == 4 and [s.width for s in arch.stages] == [0.125, 0.5, 0.75, 1.0]
    with pytest.raises(ArchError):
        SearchSpace(r20_graph).width_only((0.5, 0.25))  # widths must not decrease
