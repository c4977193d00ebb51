"""A learned predictor of an arch's reward from its structure (CondNAS-style), fitted on the archive.

Real evaluations are the search's scarce resource (a few seconds each on CPU); a regressor fitted
on the ones made so far ranks candidates for free. How far its ranking can be trusted is measured,
not assumed: Kendall's tau between predicted and real rewards on archs it was not fitted on
(k-fold over the evaluations), logged as the search goes.

Features, one block per stage slot (absent stages are zeros): present, width, exit position
(fraction of the exit list), recompute, share of sections that reuse features; plus the stage count.
(A rough stage cost, static MAC share up to the exit times width squared, did not raise tau on the
50-evaluation archives of three small-budget runs, so it is left out.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from s2d.errors import S2DError
from s2d.search.space import SearchSpace
from s2d.transform.arch import MultiStageArch

MIN_FIT = 10  # evaluations below which a predictor is not fitted


def arch_from_key(key: str) -> MultiStageArch:
    """The arch an archive key stands for (its stages; searched thresholds after ``|``)."""
    stages, _, thresholds = key.partition("|")
    return MultiStageArch.from_dict({"stages": json.loads(stages),
                                     "thresholds": json.loads(thresholds) if thresholds else []})


class RewardPredictor:
    """Gradient-boosted trees (scikit-learn) over structural features of an arch."""

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        try:
            from sklearn.ensemble import GradientBoostingRegressor
        except ImportError:
            raise S2DError("the reward predictor needs scikit-learn: pip install -e '.[search]'") from None
        self.space = space
        self.model = GradientBoostingRegressor(n_estimators=150, max_depth=3, learning_rate=0.05, subsample=0.8,
                                               min_samples_leaf=2, random_state=seed)

    def features(self, arch: MultiStageArch) -> np.ndarray:
        sp = self.space
        names = sp.graph.exit_names
        exits = {name: i / max(1, len(names) - 1) for i, name in enumerate(names)}
        out = np.zeros(1 + 5 * sp.max_stages, dtype=np.float32)
        out[0] = arch.num_stages
        for s, st in enumerate(arch.stages[: sp.max_stages]):
            reuse = [st.reuse_in(k) for k in range(sp.num_sections)]
            out[1 + 5 * s: 6 + 5 * s] = (1.0, st.width, exits.get(st.exit, 1.0), float(st.recompute),
                                         float(np.mean(reuse)))
        return out

    def fit(self, archs: Sequence[MultiStageArch], rewards: Sequence[float]) -> RewardPredictor:
        if len(archs) < MIN_FIT:
            raise ValueError(f"a predictor needs at least {MIN_FIT} evaluations, got {len(archs)}")
        self.model.fit(np.stack([self.features(a) for a in archs]), np.asarray(rewards, dtype=float))
        return self

    def predict(self, archs: Sequence[MultiStageArch]) -> np.ndarray:
        return self.model.predict(np.stack([self.features(a) for a in archs]))


def held_out_tau(space: SearchSpace, records: Sequence[dict[str, Any]], folds: int = 5, seed: int = 0
                 ) -> float | None:
    """Kendall's tau of predicted vs real reward over ``records`` (archive or search-log records with ``key``
    and ``reward``), each predicted by a predictor fitted on the other folds. None below ``2 * MIN_FIT``."""
    from scipy.stats import kendalltau

    if len(records) < 2 * MIN_FIT:
        return None
    archs = [arch_from_key(r["key"]) for r in records]
    rewards = np.array([r["reward"] for r in records], dtype=float)
    order = np.random.default_rng(seed).permutation(len(records))
    predicted = np.empty(len(records))
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        model = RewardPredictor(space, seed).fit([archs[i] for i in rest], rewards[rest])
        predicted[part] = model.predict([archs[i] for i in part])
    tau, _ = kendalltau(predicted, rewards)
    return float(tau)
