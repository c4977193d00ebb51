"""The arch evaluator shared by every searcher: reward of an arch on the validation split.

One candidate costs one forward pass per stage over the (cached, in-memory) validation
images, plus numpy: thresholds are calibrated on the stage logits, stage MACs come from
a per-stage fvcore cache. Every evaluation is appended to the run's archive and never
computed twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from s2d.data import Split
from s2d.measure.accuracy import StageOutputs, stage_logits, stage_outputs
from s2d.measure.calibration import calibrate_budget_thresholds, calibrate_thresholds
from s2d.measure.cost import average_macs, stage_macs
from s2d.measure.guarantee import certify, threshold_sequence
from s2d.measure.latency import LatencyTable
from s2d.search.archive import Archive
from s2d.transform.arch import MultiStageArch
from s2d.transform.supernet import SuperNet

OBJECTIVES = ("tolerance", "mnas", "budget")


@dataclass
class Objective:
    """Default: stay within ``tolerance`` of the static accuracy, minimise average MACs.

    ``tolerance``: reward = 1 - MAC ratio, minus ``penalty`` per unit of accuracy below the
    target (thresholds are calibrated to reach it when the arch can).
    ``mnas``: reward = acc * (MAC ratio / target_ratio) ** w (MnasNet), same calibration.
    ``budget``: the inverse question, "at most ``target_ratio`` of the static MACs on average, the
    most accurate": thresholds maximise accuracy within the budget; reward = accuracy, minus
    ``penalty`` per unit of MAC ratio over it. Only the ranking of archs matters here, so archs the
    supernet under-rates in absolute accuracy (narrow ones) still win where the budget needs them.

    ``cost``: ``macs``, ``latency`` (batch-1 milliseconds) or ``throughput`` (a batch of 256's milliseconds per
    sample). Every ratio above (reward, budget, thresholds' cost) is then of that cost to the static network's.

    ``confidence`` (tolerance only) scores an arch by what the report will certify: its thresholds are
    the last of the safest-first sequence whose upper bound of the drop against the static model stays
    within the tolerance (``measure.guarantee``), not the cheapest that keeps it on average. An arch
    that only keeps the tolerance on average (in-sample) is then not feasible: on ResNet-20 the search
    picked depth-only exits at 0.445 of the MACs in-sample that certified no saving at all.
    """

    kind: str = "tolerance"
    tolerance: float = 0.005
    penalty: float = 20.0
    target_ratio: float = 0.33
    mnas_w: float = -0.07
    confidence: float | None = None
    cost: str = "macs"  # what the ratios count: fvcore MACs, or time from a latency table (``measure.latency``)

    def reward(self, accuracy: float, mac_ratio: float, target_accuracy: float) -> float:
        if self.kind == "mnas":
            return accuracy * (mac_ratio / self.target_ratio) ** self.mnas_w
        if self.kind == "budget":
            return accuracy - self.penalty * max(0.0, mac_ratio - self.target_ratio)
        return 1.0 - mac_ratio - self.penalty * max(0.0, target_accuracy - accuracy)


@dataclass
class Evaluation:
    arch: dict[str, Any]
    reward: float
    accuracy: float
    average_macs: float
    mac_ratio: float
    exit_rates: list[float]
    thresholds: list[float]
    stage_macs: list[float]
    stage_accuracy: list[float]
    meets_target: bool
    cost_ratio: float | None = None  # the objective's cost over the static network's (None: MACs, = mac_ratio)
    seconds: float = 0.0
    searcher: str = ""
    index: int = 0
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objective_ratio(self) -> float:
        """The cost the search minimises, over the static network's: MACs unless a time cost was asked for."""
        return self.mac_ratio if self.cost_ratio is None else self.cost_ratio

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Evaluation:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ScoringPool(Protocol):
    """Workers that each hold the supernet once and score archs (``ArchEvaluator.scored``) in parallel."""

    workers: int

    def score(self, archs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Evaluation records of the (canonical) archs, in order, each as soon as it and those before it are
        done."""
        ...


class ArchEvaluator:
    """Scores archs on validation data with a trained supernet."""

    def __init__(self, supernet: SuperNet, val: Split, info, *, static_accuracy: float, static_macs: float,
                 objective: Objective | None = None, archive: Archive | None = None, device: str = "cpu",
                 batch_size: int = 1000, full_width: SuperNet | None = None,
                 static_correct: torch.Tensor | None = None, latency: LatencyTable | None = None) -> None:
        self.supernet, self.val, self.info = supernet, val, info
        self.static_correct = static_correct  # per validation image; needed by a certified objective
        self.full_width = full_width
        self.static_accuracy, self.static_macs = static_accuracy, static_macs
        self.objective = objective or Objective()
        self.latency = latency  # stage times; needed by a time cost, and records predicted time ratios when set
        if self.objective.cost != "macs" and latency is None:
            raise ValueError(f"a {self.objective.cost} objective needs a latency table")
        self.archive = archive
        self.device, self.batch_size = device, batch_size
        self._stage_cost: dict[str, float] = {}
        self._exit_logits: dict[str, torch.Tensor] = {}  # full-width exit -> its logits on ``val``
        self.evaluations = 0  # real (uncached) evaluations in this process
        self.pool: ScoringPool | None = None  # workers that score batches of archs in parallel

    @property
    def certified(self) -> bool:
        """Tolerance thresholds come from the certified rule (``Objective.confidence``) rather than in-sample."""
        return self.objective.kind == "tolerance" and self.objective.confidence is not None

    @property
    def target_accuracy(self) -> float:
        return self.static_accuracy - self.objective.tolerance

    def stage_costs(self, arch: MultiStageArch) -> list[float]:
        """Incremental MACs of every stage, cached per stage prefix (a stage's cost depends only on earlier ones).
        Materialised from the network that scores the arch: a full-width arch on the shared weights would first
        estimate batch-norm statistics it does not need (two thirds of an evaluation's time)."""
        keys = [arch.stage_key(s) for s in range(arch.num_stages)]
        if any(k not in self._stage_cost for k in keys):
            net = self.network_for(arch).materialise(MultiStageArch(arch.stages, arch.exit_rule), fold_bn=False)
            macs, _ = stage_macs(list(net.stages), self.supernet.input_shape)
            self._stage_cost.update(zip(keys, macs, strict=True))
        return [self._stage_cost[k] for k in keys]

    def network_for(self, arch: MultiStageArch) -> SuperNet:
        """The supernet that scores ``arch``.

        An arch whose stages are all full width is the static network plus exit heads: it
        needs no shared-weight training, so with ``full_width`` (the static weights and
        probe heads) it is scored as it will be deployed, not with the shared
        weights, which narrow archs pull away from the static ones.
        """
        if self.full_width is not None and arch.is_full_width:
            return self.full_width
        return self.supernet

    def stage_outputs(self, arch: MultiStageArch) -> StageOutputs:
        """Every stage's confidence and correctness on the validation images.

        A full-width stage's logits are its exit's, whichever stages come before it (every one computes the static
        network up to its exit, and its head is the exit's), so they are computed once per exit: scoring every
        full-width arch of ResNet-20 (``SearchSpace.depth_only_sweep``) costs a few network passes, not one each."""
        if self.full_width is None or not arch.is_full_width:
            return stage_outputs(self.network_for(arch), arch, self.val, self.info, device=self.device,
                                 batch_size=self.batch_size)
        if any(s.exit not in self._exit_logits for s in arch.stages):
            self.full_width.eval()
            logits = stage_logits(lambda x: self.full_width.forward_stages(x, arch), self.val, self.info,
                                  device=self.device, batch_size=self.batch_size)
            self._exit_logits.update((s.exit, lg) for s, lg in zip(arch.stages, logits, strict=True))
        logits = torch.stack([self._exit_logits[s.exit] for s in arch.stages])
        conf = torch.stack([arch.confidence(s, lg) for s, lg in enumerate(logits)])
        return StageOutputs(conf, logits.argmax(-1) == self.val.labels[None])

    def objective_costs(self, arch: MultiStageArch, macs: list[float]) -> tuple[list[float], float]:
        """Per-stage costs in the objective's unit and the static network's: what thresholds trade accuracy for."""
        if self.objective.cost == "macs":
            return macs, self.static_macs
        assert self.latency is not None
        return self.latency.stage_costs(arch, self.objective.cost)

    def score(self, arch: MultiStageArch, outputs: StageOutputs, macs: list[float]) -> Evaluation:
        """The reward of ``arch`` from its stage outputs: the part the tests check by hand."""
        budget = self.objective.kind == "budget"
        costs, static_cost = self.objective_costs(arch, macs)
        cert = None
        if self.certified:  # searched thresholds are certified as they are
            seq = [list(arch.thresholds)] if arch.thresholds or arch.num_stages == 1 else threshold_sequence(
                outputs, costs)
            cert = certify(seq, outputs, self.static_correct, self.objective.tolerance, self.objective.confidence)
            thresholds = cert.thresholds if cert else seq[0]
        elif arch.thresholds or arch.num_stages == 1:
            thresholds = list(arch.thresholds)
        elif budget:
            thresholds = calibrate_budget_thresholds(outputs, costs, self.objective.target_ratio * static_cost)
        else:
            thresholds = calibrate_thresholds(outputs, costs, self.target_accuracy)[0]
        acc = outputs.accuracy(thresholds)
        rates = outputs.exit_rates(thresholds)
        avg = average_macs(macs, rates)
        ratio = average_macs(costs, rates) / static_cost  # the objective's (= avg / static MACs for MACs)
        reward = self.objective.reward(acc, ratio, self.target_accuracy)
        meets = (ratio <= self.objective.target_ratio + 1e-9 if budget else cert is not None if self.certified
                 else acc >= self.target_accuracy - 1e-12)
        if self.certified and not meets:
            reward -= self.objective.penalty * self.objective.tolerance  # below every certified arch
        extra = {}
        if self.latency is not None:  # predicted from stage times (``s2d bench latency`` checks them)
            extra = {"latency_ratio": self.latency.ratio(arch, rates, 1),
                     "batch_time_ratio": self.latency.ratio(arch, rates, self.latency.batch)}
        return Evaluation(arch=arch.with_thresholds(thresholds).to_dict(), reward=reward, accuracy=acc,
                          average_macs=avg, mac_ratio=avg / self.static_macs, exit_rates=rates,
                          thresholds=thresholds, stage_macs=macs, stage_accuracy=outputs.stage_accuracy(),
                          meets_target=meets, cost_ratio=None if self.objective.cost == "macs" else ratio, extra=extra)

    def archive_key(self, arch: MultiStageArch) -> str:
        """The network's canonical key (one per network, however it was encoded); searched thresholds are part
        of the candidate, calibrated ones are not."""
        arch = self.supernet.validate(arch).canonical(self.supernet.graph)
        return arch.key() + (f"|{list(arch.thresholds)}" if arch.thresholds else "")

    def evaluate(self, arch: MultiStageArch, searcher: str = "") -> Evaluation:
        return next(self.evaluate_each([arch], searcher))

    def scored(self, arch: MultiStageArch) -> Evaluation:
        """A fresh evaluation of a canonical arch (no archive): what a worker of a :class:`ScoringPool` runs."""
        t0 = time.perf_counter()
        ev = self.score(arch, self.stage_outputs(arch), self.stage_costs(arch))
        ev.seconds = time.perf_counter() - t0
        if not math.isfinite(ev.reward):
            raise ValueError(f"non-finite reward for {arch.to_json()}")
        return ev

    def evaluate_each(self, archs: list[MultiStageArch], searcher: str = "") -> Iterator[Evaluation]:
        """Evaluations of ``archs``, in order, each as soon as it is done: archived ones from the archive, the
        others scored (all at once by the ``pool``'s workers when there is one) and archived here, one by one
        in request order, so the archive reads the same whether they were scored in parallel or not, and a
        kill loses only what was in flight."""
        canonical = [self.supernet.validate(a).canonical(self.supernet.graph) for a in archs]
        keys = [self.archive_key(a) for a in canonical]
        done: dict[str, Evaluation] = {}
        for key in keys:
            if self.archive is not None and key not in done and (hit := self.archive.get(key)) is not None:
                done[key] = Evaluation.from_record(hit)
                done[key].cached = True
        todo = list(dict.fromkeys(k for k in keys if k not in done))
        first = {k: canonical[keys.index(k)] for k in todo}
        if self.pool is not None and len(todo) > 1:
            fresh = (Evaluation.from_record(r) for r in self.pool.score([first[k].to_dict() for k in todo]))
        else:
            fresh = (self.scored(first[k]) for k in todo)
        for key in keys:
            if key not in done:  # the next uncached key is the next one scored
                ev = next(fresh)
                ev.searcher = searcher
                self.evaluations += 1
                if self.archive is not None:
                    ev.index = len(self.archive)
                    self.archive.add(key, ev.to_record())
                done[key] = ev
            yield done[key]

