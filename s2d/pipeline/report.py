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

from torch import nn

from s2d.data import Dataset
from s2d.measure.accuracy import StageOutputs, stage_outputs
from s2d.measure.calibration import calibrate_thresholds
from s2d.measure.cost import average_macs
from s2d.measure.network import dynamic_figures
from s2d.measure.timing import deployable
from s2d.pipeline.format import report_markdown
from s2d.pipeline.plots import plot_pareto
from s2d.runs import write_json_atomic, write_text_atomic
from s2d.search.evaluator import ArchEvaluator, Evaluation
from s2d.transform.arch import MultiStageArch

TOLERANCES = (0.1, 0.2, 0.5, 1.0)  # accuracy points of the operating points


def _row(name: str, arch: MultiStageArch, val: Evaluation, test: dict[str, Any],
         static: dict[str, Any]) -> dict[str, Any]:
    keep = ("test_accuracy", "average_macs", "exit_rates", "stage_macs", "latency_ms_batch1",
            "throughput_img_s_batch256", "latency_ratio", "throughput_ratio")
    return {
        "name": name,
        "arch": arch.to_dict(),
        "val_accuracy": val.accuracy,
        "val_average_macs": val.average_macs,
        **{k: test[k] for k in keep},
        "mac_ratio": test["average_macs"] / static["macs"],
        "accuracy_delta_points": (test["test_accuracy"] - static["test_accuracy"]) * 100,
    }


def operating_points(val: StageOutputs, test: StageOutputs, costs: list[float], static_val_accuracy: float,
                     static: dict[str, Any]) -> list[dict[str, Any]]:
    """The chosen network at other accuracy tolerances: thresholds re-calibrated on validation
    outputs for each, then applied to the test outputs (the decisions ``DynamicNet`` takes)."""
    out = []
    for tol in TOLERANCES:
        thresholds = calibrate_thresholds(val, costs, static_val_accuracy - tol / 100)[0]
        rates = test.exit_rates(thresholds)
        acc = test.accuracy(thresholds)
        avg = average_macs(costs, rates)
        out.append({"tolerance_points": tol, "thresholds": thresholds, "test_accuracy": acc,
                    "accuracy_delta_points": (acc - static["test_accuracy"]) * 100, "average_macs": avg,
                    "mac_ratio": avg / static["macs"], "exit_rates": rates})
    return out


class RowMeter:
    """Measures report rows against one static reference on one test subset."""

    def __init__(self, static_model: nn.Module, static: dict[str, Any], data: Dataset, *, device: str = "cpu",
                 limit: int | None = None) -> None:
        self.static, self.data, self.device, self.limit = static, data, device, limit
        self.reference = deployable(copy.deepcopy(static_model))

    def test_outputs(self, ev: ArchEvaluator, arch: MultiStageArch) -> StageOutputs:
        return stage_outputs(ev.network_for(arch), arch, self.data.test.subset(self.limit), self.data.info,
                             device=self.device)

    def row(self, name: str, ev: ArchEvaluator, arch: MultiStageArch,
            test: StageOutputs | None = None) -> tuple[dict[str, Any], MultiStageArch]:
        """The row of ``arch`` with thresholds calibrated by ``ev`` (validation), figures on test."""
        e = ev.evaluate(arch)
        tuned = arch.with_thresholds(e.thresholds)
        test = test if test is not None else self.test_outputs(ev, arch)
        figures = dynamic_figures(ev.network_for(tuned).materialise(tuned), test, e.stage_macs, self.reference,
                                  self.data, device=self.device, limit=self.limit)
        return _row(name, tuned, e, figures, self.static), tuned


def write_report(run_root: Path, report: dict[str, Any], archive_records: list[dict[str, Any]]) -> None:
    """``report.json``, ``report.md`` and ``pareto.png`` from measured figures."""
    write_json_atomic(run_root / "report.json", report)
    write_text_atomic(run_root / "report.md", report_markdown(report))
    plot_pareto(archive_records, report, run_root / "pareto.png")
