"""A searcher's session: its budget of distinct archs, its log (``search_<algo>.jsonl``), its progress bar
and TensorBoard scalars, shared by every searcher so that they compare at equal real evaluations."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d.runs import Run
from s2d.search.archive import pareto_front
from s2d.search.evaluator import ArchEvaluator, Evaluation
from s2d.search.space import SearchSpace
from s2d.transform.arch import MultiStageArch


def logs_tau(n: int, budget: int) -> bool:
    """Whether the predictor's held-out tau is logged after the ``n``-th evaluation: at 20, 40, 80, ... and at
    the end of the budget. Each figure fits five 300-tree forests (about 2 s on one thread at 100 records):
    every 10 evaluations, a 150-evaluation search spent half a minute on this diagnostic."""
    return n == budget or (n >= 20 and n % 20 == 0 and (n // 20) & (n // 20 - 1) == 0)


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
        return self.request_many([arch])[0]

    def request_many(self, archs: list[MultiStageArch]) -> list[Evaluation]:
        """Evaluations of ``archs`` in order, scored together (in parallel with a pool of workers), logged as
        if requested one by one; cut where they would exceed the budget of distinct archs, so a batched
        searcher logs exactly what the same requests one at a time would have."""
        remaining, new, cut = self.budget - len(self.log), set(), len(archs)
        for i, arch in enumerate(archs):
            key = self.evaluator.archive_key(arch)
            if key not in self.seen and key not in new:
                if len(new) == remaining:
                    cut = i
                    break
                new.add(key)
        evs = []
        for arch, ev in zip(archs[:cut], self.evaluator.evaluate_each(archs[:cut], searcher=self.algo), strict=True):
            self._log(self.evaluator.archive_key(arch), ev)  # as each comes: a kill loses only what is in flight
            evs.append(ev)
        return evs

    def _log(self, key: str, ev: Evaluation) -> None:
        if key in self.seen:
            return
        self.seen.add(key)
        self.best = max(self.best, ev.reward)
        n = len(self.log) + 1
        rec = {"n": n, "key": key, "reward": ev.reward, "accuracy": ev.accuracy, "mac_ratio": ev.mac_ratio,
               "cost_ratio": ev.objective_ratio, "average_macs": ev.average_macs, "meets_target": ev.meets_target,
               "best_reward": self.best}
        self.log.append(rec)
        with open(self.log_path, "a") as f:
            f.write(("\n" if self._torn else "") + json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._torn = False
        front = pareto_front(self.log)
        for tag, value in (("reward", ev.reward), ("accuracy", ev.accuracy), ("average_macs", ev.average_macs),
                           ("mac_ratio", ev.mac_ratio), ("best_reward", self.best), ("pareto_size", len(front)),
                           ("num_stages", len(ev.arch["stages"])), ("cost_ratio", ev.objective_ratio),
                           *((k, ev.extra[k]) for k in ("latency_ratio", "batch_time_ratio") if k in ev.extra)):
            self.writer.add_scalar(f"search/{tag}", value, n)
        if self.space is not None and logs_tau(n, self.budget):
            tau = predictor_tau(self.space, self.log)
            if tau is not None:
                self.writer.add_scalar("search/predictor_kendall_tau", tau, n)
        self.writer.flush()
        self.bar.update(1)
        self.bar.set_postfix(best=f"{self.best:.3f}", acc=f"{ev.accuracy:.3f}", macs=f"{ev.mac_ratio:.2f}")

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
