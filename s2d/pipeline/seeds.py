"""``s2d convert --seeds N``: one conversion per seed, then error bars over them.

A seed draws the supernet's arch sampling, the search and the calibration split, so the spread
over seeds is the spread a user would see re-running the conversion. Each seed is an ordinary,
resumable run directory (``R/seed-K``); ``R/seeds.{json,md}`` only read their reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from s2d.runs import write_json_atomic, write_text_atomic


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarize_seeds(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std of the shipped network's test drop and MAC ratio, and per operating point the test
    drop, the MAC ratio and how often the test drop exceeded the tolerance, certified and in-sample."""
    seeds = sorted(reports)
    shipped = [reports[s]["dynamic"] for s in seeds]
    out: dict[str, Any] = {
        "seeds": seeds,
        "tolerance_points": reports[seeds[0]].get("tolerance_points"),
        "confidence": reports[seeds[0]].get("confidence"),
        "shipped": {
            "test_drop_points": _stats([-d["accuracy_delta_points"] for d in shipped]),
            "macs_fewer": _stats([1 / d["mac_ratio"] for d in shipped]),
            "throughput_ratio": _stats([d["throughput_ratio"] for d in shipped]),
            "fallbacks": sum(bool(reports[s].get("fallback")) for s in seeds),
        },
        "operating_points": [],
    }
    tolerances = [o["tolerance_points"] for o in reports[seeds[0]].get("operating_points", [])]
    for i, tol in enumerate(tolerances):
        points = [reports[s]["operating_points"][i] for s in seeds]
        row: dict[str, Any] = {"tolerance_points": tol, "certified": sum(p["certificate"] is not None for p in points)}
        for key in ("", "in_sample_"):
            drops = [-p[f"{key}accuracy_delta_points"] for p in points]
            row[f"{key}test_drop_points"] = _stats(drops)
            row[f"{key}macs_fewer"] = _stats([1 / p[f"{key}mac_ratio"] for p in points])
            # test accuracies are float32: 10 of 10000 images read as a 0.1000002-point drop, which keeps 0.1
            row[f"{key}exceeded"] = sum(d > tol + 1e-4 for d in drops)
        out["operating_points"].append(row)
    out["budget_points"] = _budget_rows([reports[s].get("budget_points", []) for s in seeds])
    return out


BUDGET_MISS = 0.05  # a budget point "hits" its budget when the test's average MACs are within 5 % of it


def _budget_rows(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per MAC budget: the test drop, the MACs fewer, and how far the test's average MACs landed from the
    budget (the calibration split spends it; unseen images spend a little more or less)."""
    if not per_seed or any(len(points) != len(per_seed[0]) for points in per_seed):
        return []
    rows = []
    for i, first in enumerate(per_seed[0]):
        points = [points[i] for points in per_seed]
        off = [p["mac_ratio"] / p["target_mac_ratio"] - 1 for p in points]
        row: dict[str, Any] = {
            "target_mac_ratio": first["target_mac_ratio"],
            "test_drop_points": _stats([-p["accuracy_delta_points"] for p in points]),
            "macs_fewer": _stats([1 / p["mac_ratio"] for p in points]),
            "off_budget": _stats(off),
            "hit": sum(abs(o) <= BUDGET_MISS + 1e-9 for o in off),
        }
        if all("throughput_ratio" in p for p in points):
            row["throughput_ratio"] = _stats([p["throughput_ratio"] for p in points])
        rows.append(row)
    return rows


def _pm(s: dict[str, float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['mean'])} ± {fmt.replace('+', '').format(s['std'])}"


def seeds_markdown(summary: dict[str, Any], model: str, dataset: str, budget: str) -> str:
    n = len(summary["seeds"])
    sh = summary["shipped"]
    lines = [
        f"# s2d conversion over {n} seeds: {model} on {dataset} (budget {budget})", "",
        f"Seeds {', '.join(map(str, summary['seeds']))}: each draws the supernet's arch sampling, the search and "
        f"the calibration split. Mean ± standard deviation over seeds.", "",
        "| shipped network | test drop (points) | MACs fewer | throughput b256 ratio | fallbacks |",
        "|---|---|---|---|---|",
        f"| tolerance {summary['tolerance_points']} at {summary['confidence']:.0%} confidence | "
        f"{_pm(sh['test_drop_points'])} | {_pm(sh['macs_fewer'])}x | {_pm(sh['throughput_ratio'])} | "
        f"{sh['fallbacks']} of {n} |",
    ]
    if summary["operating_points"]:
        risk = 1 - summary["confidence"]
        lines += ["", f"Operating points: how often the test drop exceeded the tolerance (the confidence allows "
                  f"{risk:.0%} of certified points), with the certified thresholds and with in-sample ones "
                  "calibrated on the same calibration images:", "",
                  "| tolerance | certified | test drop | MACs fewer | exceeded | in-sample: test drop "
                  "| in-sample: MACs fewer | in-sample: exceeded |", "|---|---|---|---|---|---|---|---|"]
        for o in summary["operating_points"]:
            lines.append(f"| {o['tolerance_points']} | {o['certified']} of {n} | {_pm(o['test_drop_points'])} | "
                         f"{_pm(o['macs_fewer'])}x | {o['exceeded']} of {n} | "
                         f"{_pm(o['in_sample_test_drop_points'])} | {_pm(o['in_sample_macs_fewer'])}x | "
                         f"{o['in_sample_exceeded']} of {n} |")
    if summary.get("budget_points"):
        lines += ["", f"Budget points: the thresholds that spend each average-MAC budget on the calibration split, "
                  f"applied to the test split; hit: the test's average MACs within {BUDGET_MISS:.0%} of the budget "
                  "(off budget: their relative distance, negative when below):", "",
                  "| budget | test drop | MACs fewer | off budget | hit | throughput b256 ratio |",
                  "|---|---|---|---|---|---|"]
        for b in summary["budget_points"]:
            thr = _pm(b["throughput_ratio"]) if "throughput_ratio" in b else "-"
            lines.append(f"| {1 / b['target_mac_ratio']:.0f}x | {_pm(b['test_drop_points'])} | "
                         f"{_pm(b['macs_fewer'])}x | {_pm(b['off_budget'], '{:+.1%}')} | {b['hit']} of {n} | "
                         f"{thr} |")
    return "\n".join(lines) + "\n"


def write_seeds(root: Path, reports: dict[int, dict[str, Any]], model: str, dataset: str, budget: str
                ) -> dict[str, Any]:
    summary = summarize_seeds(reports)
    write_json_atomic(root / "seeds.json", summary)
    write_text_atomic(root / "seeds.md", seeds_markdown(summary, model, dataset, budget))
    return summary
