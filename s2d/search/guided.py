"""Predictor-guided episodes for PPO (CondNAS-style): the agent learns from predicted rewards, and a real
evaluation is spent only on the candidate the predictor ranks best among those it proposed.

With real rewards only, PPO sees one reward per real evaluation: about 150 in a whole search, too few
to learn a policy over millions of networks. Here every episode is scored by the reward predictor
(fitted on the real evaluations so far, refitted after each new one), and every ``every`` episodes the
best-predicted new arch of the batch is evaluated for real. The budget still counts real evaluations
only, so PPO-guided compares with the other searchers at equal cost. Until ``warmup`` real evaluations
exist there is nothing to fit, and episodes are evaluated for real as in plain PPO.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from s2d.search.evaluator import Evaluation
from s2d.search.predictor import RewardPredictor, arch_from_key
from s2d.search.space import SearchSpace
from s2d.transform.arch import MultiStageArch

if TYPE_CHECKING:
    from s2d.search.session import SearchSession

WARMUP = 20  # real evaluations before the predictor scores episodes
EPISODES_PER_EVALUATION = 16


class GuidedScorer:
    """The reward function of predictor-guided PPO's environment."""

    def __init__(self, session: SearchSession, space: SearchSpace, seed: int, *, warmup: int = WARMUP,
                 every: int = EPISODES_PER_EVALUATION) -> None:
        self.session, self.space, self.seed = session, space, seed
        self.warmup, self.every = warmup, every
        self.predictor: RewardPredictor | None = None
        self.candidates: dict[str, tuple[float, MultiStageArch]] = {}
        self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._refit()  # a resumed search starts from what it evaluated before

    def _refit(self) -> None:
        log = self.session.log
        if len(log) >= self.warmup:
            self.predictor = RewardPredictor(self.space, self.seed).fit(
                [arch_from_key(r["key"]) for r in log], [r["reward"] for r in log])

    def _real(self, arch: MultiStageArch) -> Evaluation:
        before = len(self.session.log)
        ev = self.session.request(arch)
        if len(self.session.log) > before:
            self._refit()
        return ev

    def __call__(self, arch: MultiStageArch) -> Evaluation:
        if self.predictor is None:
            return self._real(arch)  # warming up
        self.episodes += 1
        key = self.session.evaluator.archive_key(arch)
        predicted = None
        if key not in self.session.seen:
            predicted = float(self.predictor.predict([arch])[0])
            self.candidates[key] = (predicted, arch)
        if self.episodes % self.every == 0:
            if self.candidates:
                _, best = max(self.candidates.values(), key=lambda c: c[0])
            else:  # the agent only proposed known networks: a random one keeps the search going
                best = self.space.sample(self.rng)
            self.candidates.clear()
            self._real(best)
        if key in self.session.seen:  # a real reward is known (from the archive: no cost), maybe just now
            return self.session.request(arch)
        nan = math.nan
        return Evaluation(arch=arch.to_dict(), reward=predicted, accuracy=nan, average_macs=nan, mac_ratio=nan,
                          exit_rates=[], thresholds=[], stage_macs=[], stage_accuracy=[], meets_target=False,
                          cached=True, extra={"predicted": True})
