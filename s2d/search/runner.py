"""Searchers over one evaluator and one budget: PPO (MaskablePPO), NSGA-II (pymoo) and random search.

A searcher's budget is the number of *distinct* archs it asks for (served from the
archive or not), so PPO and random search compare at equal evaluations. Each searcher
keeps its own log (``search_<algo>.jsonl``: the order it found archs in, for
"evaluations to reach" figures) and its own TensorBoard scalars, written with the
evaluation count as the step so SB3's dumps never overwrite them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d.errors import S2DError
from s2d.runs import Run
from s2d.search.archive import pareto_front
from s2d.search.evaluator import ArchEvaluator, Evaluation
from s2d.search.space import SearchSpace
from s2d.transform.arch import MultiStageArch

ALGOS = ("ppo", "nsga2", "random")


TAU_EVERY = 10  # evaluations between two held-out Kendall tau figures of the reward predictor


def predictor_tau(space: SearchSpace, records: list[dict[str, Any]]) -> float | None:
    """The reward predictor's held-out Kendall tau on ``records``; None without scikit-learn or enough records."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return None
    from s2d.search.predictor import held_out_tau

    return held_out_tau(space, records)


def read_search_log(path: Path) -> list[dict[str, Any]]:
    """A searcher's ``search_<algo>.jsonl`` (empty when missing), without a line torn by a kill."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class SearchSession:
    """Budget, log, progress bar and TensorBoard scalars of one searcher."""

    def __init__(self, evaluator: ArchEvaluator, run: Run, algo: str, budget: int, progress: bool = True,
                 space: SearchSpace | None = None) -> None:
        self.evaluator, self.algo, self.budget, self.space = evaluator, algo, budget, space
        self.log_path = run.root / f"search_{algo}.jsonl"
        self.log = read_search_log(self.log_path)
        text = self.log_path.read_text() if self.log_path.exists() else ""
        self._torn = bool(text) and not text.endswith("\n")  # killed mid-line: the next record starts a new line
        self.seen = {r["key"] for r in self.log}
        self.best = max((r["reward"] for r in self.log), default=-np.inf)
        self.writer = SummaryWriter(str(run.tensorboard / f"search_{algo}"), purge_step=len(self.log) + 1)
        self.bar = tqdm(total=budget, initial=min(len(self.log), budget), desc=f"search ({algo})",
                        disable=not progress)

    @property
    def done(self) -> bool:
        return len(self.log) >= self.budget

    def request(self, arch: MultiStageArch) -> Evaluation:
        ev = self.evaluator.evaluate(arch, searcher=self.algo)
        key = self.evaluator.archive_key(arch)
        if key in self.seen:
            return ev
        self.seen.add(key)
        self.best = max(self.best, ev.reward)
        n = len(self.log) + 1
        rec = {"n": n, "key": key, "reward": ev.reward, "accuracy": ev.accuracy, "mac_ratio": ev.mac_ratio,
               "average_macs": ev.average_macs, "meets_target": ev.meets_target, "best_reward": self.best}
        self.log.append(rec)
        with open(self.log_path, "a") as f:
            f.write(("\n" if self._torn else "") + json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._torn = False
        front = pareto_front(self.log)
        for tag, value in (("reward", ev.reward), ("accuracy", ev.accuracy), ("average_macs", ev.average_macs),
                           ("mac_ratio", ev.mac_ratio), ("best_reward", self.best), ("pareto_size", len(front)),
                           ("num_stages", len(ev.arch["stages"]))):
            self.writer.add_scalar(f"search/{tag}", value, n)
        if self.space is not None and n % TAU_EVERY == 0:
            tau = predictor_tau(self.space, self.log)
            if tau is not None:
                self.writer.add_scalar("search/predictor_kendall_tau", tau, n)
        self.writer.flush()
        self.bar.update(1)
        self.bar.set_postfix(best=f"{self.best:.3f}", acc=f"{ev.accuracy:.3f}", macs=f"{ev.mac_ratio:.2f}")
        return ev

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def random_search(session: SearchSession, space: SearchSpace, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(len(session.log)):  # replay the draws already made, so a resumed run continues the sequence
        space.sample(rng)
    tries = 0
    while not session.done:
        session.request(space.sample(rng))
        tries += 1
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
               settings: PPOSettings | None = None) -> None:
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback

    from envs.multistage import MultiStageEnv

    env = MultiStageEnv(space, session.request)
    settings = settings or PPOSettings.for_budget(session.budget, space.max_decisions() - 2)
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
                if done and "accuracy" in info:
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
