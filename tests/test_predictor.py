"""The reward predictor: archive keys back to archs, features, and a held-out Kendall tau that means it."""

from __future__ import annotations

import numpy as np
import pytest

from s2d.models import get_model
from s2d.search.predictor import MIN_FIT, RewardPredictor, arch_from_key, held_out_tau
from s2d.search.space import SearchSpace
from s2d.transform.supernet import SuperNet


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return SearchSpace(SuperNet(get_model("resnet20", 10, 1).eval(), (1, 28, 28), 10).graph)


def test_an_archive_key_gives_back_its_arch(space):
    rng = np.random.default_rng(0)
    for _ in range(20):
        arch = space.sample(rng)
        assert arch_from_key(arch.key()).stages == arch.stages
    searched = SearchSpace(space.graph, search_thresholds=True).sample(rng)
    key = searched.key() + f"|{list(searched.thresholds)}"  # the evaluator's key of a searched-threshold arch
    assert arch_from_key(key).thresholds == searched.thresholds


def _records(space: SearchSpace, n: int, noise: float, seed: int = 0) -> list[dict]:
    """Archs with a reward that depends on their structure (narrow, few stages is good) plus noise."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        arch = space.sample(rng)
        if arch.key() in seen:
            continue
        seen.add(arch.key())
        reward = 1 - np.mean([s.width for s in arch.stages]) - 0.05 * arch.num_stages + rng.normal(0, noise)
        out.append({"key": arch.key(), "reward": float(reward)})
    return out


def test_held_out_tau_is_high_for_a_learnable_reward_and_near_zero_for_noise(space):
    assert held_out_tau(space, _records(space, 120, noise=0.01)) > 0.7
    rng = np.random.default_rng(1)
    noise = [{**r, "reward": float(rng.normal())} for r in _records(space, 120, noise=0.0)]
    assert abs(held_out_tau(space, noise)) < 0.2
    assert held_out_tau(space, _records(space, 2 * MIN_FIT - 1, noise=0.0)) is None


def test_features_tell_apart_what_the_predictor_must(space):
    p = RewardPredictor(space)
    rng = np.random.default_rng(2)
    archs = [space.sample(rng) for _ in range(50)]
    feats = {p.features(a).tobytes() for a in archs}
    assert len(feats) >= len({a.key() for a in archs}) * 0.9  # distinct networks, (almost always) distinct features
    with pytest.raises(ValueError, match="at least"):
        p.fit(archs[:3], [0.0, 1.0, 2.0])
