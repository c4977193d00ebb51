"""The report of a conversion: rows measured on the test split, then written out.

``RowMeter`` is the only code that touches the test split; ``write_report`` turns the
measured figures (``report.json``) into ``report.md`` and ``pareto.png`` and measures
nothing. Each arch's stage outputs are computed once per split and shared by its row, its
operating points and the exit decisions; speed ratios are paired with the static model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2d.data import Dataset
from s2d.measure.accuracy import StageOutputs, stage_outputs
from s2d.measure.calibration import calibrate_budget_thresholds, calibrate_thresholds
from s2d.measure.cost import average_macs
from s2d.measure.guarantee import Certificate, certify, threshold_sequence
from s2d.measure.latency import LatencyTable
from s2d.measure.network import exit_figures, paired_figures_in_rounds
from s2d.measure.timing import deployable
from s2d.pipeline.format import report_markdown
from s2d.pipeline.plots import plot_pareto
from s2d.runs import write_json_atomic, write_text_atomic
from s2d.search.evaluator import ArchEvaluator, Evaluation
from s2d.transform.arch import MultiStageArch

TOLERANCES = (0.1, 0.2, 0.5, 1.0)  # accuracy points of the operating points
BUDGET_RATIOS = (1 / 2, 1 / 3, 1 / 4)  # average-MAC budgets of the budget points (static pruning's 2x, 3x, 4x)


def _row(name: str, arch: MultiStageArch, val: Evaluation, test: dict[str, Any],
         static: dict[str, Any]) -> dict[str, Any]:
    keep = ("test_accuracy", "average_macs", "exit_rates", "stage_macs")
    return {
        "name": name,
        "arch": arch.to_dict(),
        "calib_accuracy": val.accuracy,
        "calib_average_macs": val.average_macs,
        **{k: test[k] for k in keep},
        "mac_ratio": test["average_macs"] / static["macs"],
        "accuracy_delta_points": (test["test_accuracy"] - static["test_accuracy"]) * 100,
    }


def _test_figures(test: StageOutputs, costs: list[float], thresholds: list[float], static: dict[str, Any]
                  ) -> dict[str, Any]:
    """What ``thresholds`` do on the test outputs (the decisions ``DynamicNet`` takes)."""
    rates = test.exit_rates(thresholds)
    acc = test.accuracy(thresholds)
    avg = average_macs(costs, rates)
    return {"thresholds": thresholds, "test_accuracy": acc,
            "accuracy_delta_points": (acc - static["test_accuracy"]) * 100, "average_macs": avg,
            "mac_ratio": avg / static["macs"], "exit_rates": rates}


def _static_figures(static: dict[str, Any]) -> dict[str, Any]:
    """The figures of a point where the static network is the answer."""
    return {"thresholds": None, "test_accuracy": static["test_accuracy"], "accuracy_delta_points": 0.0,
            "average_macs": static["macs"], "mac_ratio": 1.0, "exit_rates": None}


class ThresholdChooser:
    """Thresholds of a report row, from held-out data only.

    Tolerance mode: the fixed sequence of candidate settings comes from the search's validation
    images, and the setting is certified on the calibration split (``measure.guarantee``). Budget
    mode: the setting that spends the MAC budget on the calibration split (``calibrate_budget``).
    """

    def __init__(self, val: ArchEvaluator, calib: ArchEvaluator, static_correct: torch.Tensor, *,
                 tolerance_points: float | None, confidence: float, latency_ms: float | None = None,
                 latency: LatencyTable | None = None) -> None:
        self.val, self.calib, self.static_correct = val, calib, static_correct
        self.tolerance_points, self.confidence = tolerance_points, confidence
        self.latency_ms, self.latency = latency_ms, latency
        self._outputs: dict[tuple[str, str], StageOutputs] = {}

    def outputs(self, split: str, arch: MultiStageArch) -> StageOutputs:
        """Stage outputs of ``arch`` on ``"val"`` or ``"calib"``, computed once per (split, arch, exit parameters)."""
        key = (split, arch.key() + arch.exit_params())
        if key not in self._outputs:
            self._outputs[key] = (self.val if split == "val" else self.calib).stage_outputs(arch)
        return self._outputs[key]

    def choose(self, arch: MultiStageArch, tolerance_points: float | None = None
               ) -> tuple[MultiStageArch, Certificate | None]:
        """``arch`` with its thresholds, and the certificate (``None`` in budget mode, or when not even
        running every sample to the last stage keeps the tolerance: that arch cannot keep the promise)."""
        tol = self.tolerance_points if tolerance_points is None else tolerance_points
        if tol is None and self.latency_ms is not None and arch.num_stages > 1:
            return arch.with_thresholds(self._latency_thresholds(arch)), None
        if tol is None:
            return arch.with_thresholds(self.calib.evaluate(arch).thresholds), None
        seq = threshold_sequence(self.outputs("val", arch), self.val.stage_costs(arch))
        cert = certify(seq, self.outputs("calib", arch), self.static_correct, tol / 100, self.confidence)
        return arch.with_thresholds(cert.thresholds if cert else seq[0]), cert

    def calib_mac_ratio(self, arch: MultiStageArch) -> float:
        """Average MACs of ``arch`` (with its thresholds) on the calibration split, over the static model's."""
        e = self.calib.score(arch, self.outputs("calib", arch), self.calib.stage_costs(arch))
        return e.average_macs / self.calib.static_macs

    def _latency_thresholds(self, arch: MultiStageArch) -> list[float]:
        """The thresholds that spend the batch-1 latency budget ``latency_ms`` on the calibration split
        (``calibrate_budget``), with stage times from the run's latency table (the search's cost model: each
        stage timed in its chain)."""
        assert self.latency_ms is not None and self.latency is not None, "a latency budget needs the latency table"
        costs, _ = self.latency.stage_costs(arch, "latency")
        return calibrate_budget_thresholds(self.outputs("calib", arch), costs, self.latency_ms)

    def operating_points(self, arch: MultiStageArch, test: StageOutputs, static: dict[str, Any]
                         ) -> list[dict[str, Any]]:
        """The chosen network at other tolerances: certified thresholds applied to the test outputs (the
        decisions ``DynamicNet`` takes), beside the in-sample calibration on the same calibration images
        (what the guarantee costs in MACs, and what it buys in test drop)."""
        costs = self.calib.stage_costs(arch)
        calib = self.outputs("calib", arch)
        out = []
        for tol in TOLERANCES:
            tuned, cert = self.choose(arch, tol)
            in_sample = calibrate_thresholds(calib, costs, self.calib.static_accuracy - tol / 100)[0]
            # Where no setting is certified, or the certified one saves nothing (a cascade that sends every image
            # on pays its narrow stages on top of the static network), the answer at that tolerance is the static
            # network itself, as for the shipped network.
            static_fallback = cert is None or self.calib_mac_ratio(tuned) >= 1
            point: dict[str, Any] = {"tolerance_points": tol, "confidence": self.confidence,
                                     "certificate": cert.to_dict() if cert else None,
                                     "static_fallback": static_fallback,
                                     "calib_mac_ratio": 1.0 if static_fallback else self.calib_mac_ratio(tuned)}
            point.update(_static_figures(static) if static_fallback
                         else _test_figures(test, costs, list(tuned.thresholds), static))
            point.update({f"in_sample_{k}": v for k, v in _test_figures(test, costs, in_sample, static).items()})
            out.append(point)
        return out

    def budget_points(self, arch: MultiStageArch, test: StageOutputs, static: dict[str, Any],
                      ratios: tuple[float, ...] = BUDGET_RATIOS) -> list[dict[str, Any]]:
        """The chosen network at fixed average-MAC budgets (the ratios static pruning is compared at): the most
        accurate thresholds within each budget on the calibration split, applied to the test split."""
        costs = self.calib.stage_costs(arch)
        calib = self.outputs("calib", arch)
        return [{"target_mac_ratio": ratio, **_test_figures(
                    test, costs, calibrate_budget_thresholds(calib, costs, ratio * static["macs"]), static)}
                for ratio in ratios]


def cheapest_points(points: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per tolerance, the point of the network (``points``' key, in order of preference) that is certified with
    the fewest average MACs on the calibration split, labelled ``static_stage``. Chosen on held-out data only;
    each network must have been certified at its share of the risk (Bonferroni), so the pick keeps the promise."""
    merged = []
    for candidates in zip(*points.values(), strict=True):
        best = min(range(len(candidates)), key=lambda i: (candidates[i]["calib_mac_ratio"], i))
        merged.append({**candidates[best], "static_stage": list(points)[best]})
    return merged


class RowMeter:
    """Measures report rows against one static reference on one test subset.

    Accuracy figures are measured as rows come; speed is timed at the end (:meth:`time_rows`), for every row and
    budget point together, in interleaved rounds: rows timed one after the other, minutes apart, are not timed on
    the same machine (``paired_figures_in_rounds``)."""

    def __init__(self, static_model: nn.Module, static: dict[str, Any], data: Dataset, *, device: str = "cpu",
                 limit: int | None = None, repeats: int = 20, latency_images: int = 200, rounds: int = 1) -> None:
        self.static, self.data, self.device, self.limit = static, data, device, limit
        self.repeats, self.latency_images, self.rounds = repeats, latency_images, rounds
        self.reference = deployable(copy.deepcopy(static_model))
        self._timed: dict[str, tuple[dict[str, Any], nn.Module]] = {}  # record -> the deployed network it times

    def test_outputs(self, ev: ArchEvaluator, arch: MultiStageArch) -> StageOutputs:
        return stage_outputs(ev.network_for(arch), arch, self.data.test.subset(self.limit), self.data.info,
                             device=self.device)

    def row(self, name: str, chooser: ThresholdChooser, arch: MultiStageArch,
            test: StageOutputs | None = None) -> tuple[dict[str, Any], MultiStageArch]:
        """The row of ``arch`` with thresholds from ``chooser`` (held-out data), figures on test; its speed
        figures are added by :meth:`time_rows`."""
        tuned, cert = chooser.choose(arch)
        e = chooser.calib.score(tuned, chooser.outputs("calib", tuned), chooser.calib.stage_costs(tuned))
        test = test if test is not None else self.test_outputs(chooser.calib, arch)
        row = {**_row(name, tuned, e, exit_figures(tuned, test, e.stage_macs), self.static),
               "certificate": cert.to_dict() if cert else None}
        self._timed[name] = (row, chooser.calib.network_for(tuned).materialise(tuned))
        return row, tuned

    def budget_points(self, chooser: ThresholdChooser, arch: MultiStageArch, test: StageOutputs
                      ) -> list[dict[str, Any]]:
        """``chooser``'s budget points of ``arch``; :meth:`time_rows` adds their paired speed: a MAC budget is a
        promise about cost, so the report shows what the MACs spent there become in time."""
        points = chooser.budget_points(arch, test, self.static)
        net = chooser.calib.network_for(arch).materialise(arch)
        for point in points:
            self._timed[f"budget {point['target_mac_ratio']}"] = (point, net.with_thresholds(point["thresholds"]))
        return points

    def time_rows(self) -> None:
        """Time every row and budget point measured so far against the static model, together in ``rounds``
        rounds, and add the figures to them (with their range over the rounds)."""
        per_round = max(1, self.repeats // 2 // self.rounds)  # batch-256 calls: about the same in all as one round
        figures = paired_figures_in_rounds(self.reference, {k: net for k, (_, net) in self._timed.items()},
                                           self.data.test.subset(self.limit), self.data.info, rounds=self.rounds,
                                           device=self.device, latency_images=self.latency_images,
                                           repeats=per_round)
        for key, (record, _) in self._timed.items():
            record.update(figures[key])
        self._timed.clear()


def write_report(run_root: Path, report: dict[str, Any], archive_records: list[dict[str, Any]]) -> None:
    """``report.json``, ``report.md`` and ``pareto.png`` from measured figures."""
    write_json_atomic(run_root / "report.json", report)
    write_text_atomic(run_root / "report.md", report_markdown(report))
    plot_pareto(archive_records, report, run_root / "pareto.png")
