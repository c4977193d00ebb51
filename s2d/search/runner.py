"""Searchers over one evaluator and one budget: PPO (MaskablePPO, plain or predictor-guided), NSGA-II
(pymoo), predictor-screened evolution and random search.

A searcher's budget is the number of *distinct* archs it asks for (served from the
archive or not), so PPO and random search compare at equal evaluations. Each searcher
keeps its own log (``search_<algo>.jsonl``: the order it found archs in, for
"evaluations to reach" figures) and its own TensorBoard scalars, written with the
evaluation count as the step so SB3's dumps never overwrite them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2d.errors import S2DError
from s2d.runs import Run
from s2d.search.evaluator import ArchEvaluator
from s2d.search.session import SearchSession
from s2d.search.space import SearchSpace

ALGOS = ("ppo", "ppo_guided", "nsga2", "evolution", "random")


def random_search(session: SearchSession, space: SearchSpace, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(len(session.log)):  # replay the draws already made, so a resumed run continues the sequence
        space.sample(rng)
    tries = 0
    while not session.done:  # as many draws as archs are still due: a pool of workers scores them together
        batch = [space.sample(rng) for _ in range(session.budget - len(session.log))]
        session.request_many(batch)
        tries += len(batch)
        if tries > 50 * session.budget:
            raise S2DError(f"random search found only {len(session.log)} distinct archs; lower --evaluations")


@dataclass
class PPOSettings:
    """Sized for small budgets: SB3's default n_steps=2048 would never update on a few hundred episodes."""

    n_steps: int = 128
    batch_size: int = 32
    n_epochs: int = 4
    learning_rate: float = 1e-3
    ent_coef: float = 0.01
    gamma: float = 1.0  # the only reward comes at the end of an episode

    @classmethod
    def for_budget(cls, budget: int, decisions_per_episode: int) -> PPOSettings:
        steps = budget * decisions_per_episode
        n = int(np.clip(2 ** round(np.log2(max(1, steps / 8))), 32, 512))  # about 8 updates over the budget
        return cls(n_steps=n, batch_size=max(8, n // 4))


def ppo_search(session: SearchSession, space: SearchSpace, run: Run, seed: int,
               settings: PPOSettings | None = None, guided: bool = False) -> None:
    """MaskablePPO over the decisions; ``guided``: episodes scored by the reward predictor (``GuidedScorer``)."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback

    from envs.multistage import MultiStageEnv

    score = session.request
    episodes = session.budget
    if guided:
        from s2d.search.guided import EPISODES_PER_EVALUATION, GuidedScorer

        score = GuidedScorer(session, space, seed)
        episodes *= EPISODES_PER_EVALUATION
    env = MultiStageEnv(space, score)
    settings = settings or PPOSettings.for_budget(episodes, space.max_decisions() - 2)
    path = run.checkpoints / "ppo.zip"
    if path.exists():
        try:
            model = MaskablePPO.load(str(path), env=env, tensorboard_log=str(run.tensorboard))
        except Exception as e:
            raise S2DError(f"PPO checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart "
                           "the agent (the archive keeps every evaluation)") from None
    else:
        model = MaskablePPO("MlpPolicy", env, n_steps=settings.n_steps, batch_size=settings.batch_size,
                            n_epochs=settings.n_epochs, learning_rate=settings.learning_rate,
                            ent_coef=settings.ent_coef, gamma=settings.gamma, seed=seed, verbose=0,
                            tensorboard_log=str(run.tensorboard))

    class Budget(BaseCallback):
        """Stops at the budget and checkpoints the agent every few episodes."""

        def __init__(self) -> None:
            super().__init__()
            self.episodes = 0

        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"], strict=True):
                if done and math.isfinite(info.get("accuracy", math.nan)):  # a real evaluation
                    self.episodes += 1
                    self.logger.record("s2d/episode_accuracy", info["accuracy"])
                    self.logger.record("s2d/episode_mac_ratio", info["mac_ratio"])
                    if self.episodes % 10 == 0:
                        save_agent(model, path)
            return not session.done

    try:
        model.learn(total_timesteps=10**9, callback=Budget(), tb_log_name="ppo", reset_num_timesteps=not path.exists())
    finally:
        save_agent(model, path)


def save_agent(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    model.save(str(tmp))
    saved = tmp if tmp.exists() else tmp.with_suffix(tmp.suffix + ".zip")
    os.replace(saved, path)


def run_search(evaluator: ArchEvaluator, space: SearchSpace, run: Run, *, algo: str, budget: int, seed: int = 0,
               progress: bool = True) -> dict[str, Any]:
    """Run (or resume) one searcher to its budget; returns its summary."""
    if algo not in ALGOS:
        raise S2DError(f"unknown --algo {algo!r}; valid: {', '.join(ALGOS)}")
    session = SearchSession(evaluator, run, algo, budget, progress, space=space)
    try:
        if not session.done:
            if algo == "random":
                random_search(session, space, seed)
            elif algo == "ppo_guided":
                ppo_search(session, space, run, seed, guided=True)
            elif algo == "evolution":
                from s2d.search.evolution import evolution_search

                evolution_search(session, space, seed)
            elif algo == "nsga2":
                from s2d.search.nsga import nsga2_search

                nsga2_search(session, space, seed)
            else:
                ppo_search(session, space, run, seed)
    finally:
        session.close()
    return summarise(session.log, evaluator.objective.tolerance)


def summarise(log: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Best reward, its MAC ratio, and the evaluations it took to reach it."""
    if not log:
        return {"evaluations": 0}
    best = max(log, key=lambda r: r["reward"])
    feasible = [r for r in log if r["meets_target"]]
    best_ok = min(feasible, key=lambda r: r["mac_ratio"]) if feasible else None
    return {
        "evaluations": len(log),
        "best_reward": best["reward"],
        "best_key": best["key"],
        "evaluations_to_best": best["n"],
        "best_mac_ratio_within_tolerance": best_ok["mac_ratio"] if best_ok else None,
        "evaluations_to_that_ratio": best_ok["n"] if best_ok else None,
        "tolerance": tolerance,
    }
