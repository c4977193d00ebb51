"""``s2d convert --seeds N``: error bars over seeds, and the exceedance counts of the tolerance."""

from __future__ import annotations

import json

import pytest
from test_convert import assert_one_line_error, convert_args, s2d

from s2d.pipeline.seeds import seeds_markdown, summarize_seeds


def _report(drop: float, ratio: float, points: list[tuple[float, float, float, bool, float]],
            fallback: str | None = None) -> dict:
    return {"tolerance_points": 0.5, "confidence": 0.9, "fallback": fallback,
            "dynamic": {"accuracy_delta_points": -drop, "mac_ratio": ratio, "throughput_ratio": 1 / ratio},
            "operating_points": [{"tolerance_points": tol, "accuracy_delta_points": -d, "mac_ratio": r,
                                  "certificate": {"bound_points": tol} if certified else None,
                                  "in_sample_accuracy_delta_points": -d_in, "in_sample_mac_ratio": r_in}
                                 for tol, d, r, certified, d_in, r_in in
                                 [(p[0], p[1], p[2], p[3], p[4], p[2] * 0.8) for p in points]]}


def test_summary_by_hand():
    reports = {0: _report(0.2, 0.5, [(0.2, 0.1, 0.5, True, 0.3), (0.5, 0.6, 0.4, True, 0.7)]),
               1: _report(0.4, 0.25, [(0.2, 0.25, 0.5, True, 0.1), (0.5, 0.3, 0.25, False, 0.6)]),
               2: _report(0.0, 1.0, [(0.2, 0.0, 1.0, True, 0.2), (0.5, 0.2, 1.0, True, 0.4)], fallback="static")}
    s = summarize_seeds(reports)
    assert s["seeds"] == [0, 1, 2]
    assert s["shipped"]["test_drop_points"]["mean"] == pytest.approx(0.2)
    assert s["shipped"]["test_drop_points"]["std"] == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.0
    assert s["shipped"]["macs_fewer"]["mean"] == pytest.approx((2 + 4 + 1) / 3)
    assert s["shipped"]["fallbacks"] == 1
    p02, p05 = s["operating_points"]
    assert (p02["exceeded"], p02["in_sample_exceeded"], p02["certified"]) == (1, 1, 3)  # 0.25 > 0.2; 0.3 > 0.2
    assert (p05["exceeded"], p05["in_sample_exceeded"], p05["certified"]) == (1, 2, 2)
    assert p05["in_sample_macs_fewer"]["mean"] == pytest.approx(sum(1 / (r * 0.8) for r in (0.4, 0.25, 1.0)) / 3)
    md = seeds_markdown(s, "resnet20", "fashion-mnist", "small")
    assert "over 3 seeds" in md and "| 0.2 | 3 of 3 | 0.12 ± 0.13 |" in md and "1 of 3 |" in md


def test_budget_points_over_seeds():
    def report(ratios: tuple[float, float], drops: tuple[float, float]) -> dict:
        r = _report(0.1, 0.5, [(0.5, 0.1, 0.5, True, 0.1)])
        r["budget_points"] = [{"target_mac_ratio": t, "mac_ratio": m, "accuracy_delta_points": -d,
                               "throughput_ratio": 1 / m} for t, m, d in zip((1 / 2, 1 / 4), ratios, drops,
                                                                             strict=True)]
        return r

    # 4x budget: test MACs at 0.24 (4 % under: a hit), 0.26 (4 % over: a hit), 0.2 (20 % under: a miss)
    s = summarize_seeds({0: report((0.5, 0.24), (0.0, 0.1)), 1: report((0.49, 0.26), (0.1, 0.2)),
                         2: report((0.5, 0.2), (0.2, 0.3))})
    half, quarter = s["budget_points"]
    assert half["hit"] == 3 and quarter["hit"] == 2
    assert quarter["off_budget"]["mean"] == pytest.approx((-0.04 + 0.04 - 0.2) / 3)
    assert quarter["test_drop_points"]["mean"] == pytest.approx(0.2)
    assert quarter["macs_fewer"]["mean"] == pytest.approx((1 / 0.24 + 1 / 0.26 + 5) / 3)
    md = seeds_markdown(s, "resnet20", "fashion-mnist", "small")
    assert "| 4x | 0.20 ± 0.10 |" in md and "| 2 of 3 |" in md and "-6.7% ±" in md
    # reports written before budget points existed: no rows, no table
    assert summarize_seeds({0: _report(0.1, 0.5, [])})["budget_points"] == []


def test_seeds_refuse_a_single_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("command: convert\n")
    r, _ = s2d("convert", "--budget", "tiny", "--weights", "none", "--seeds", "2", "--run-dir", str(run),
               "--quiet", "--threads", "1")
    assert_one_line_error(r, "s2d: error: ", "single conversion", "--seeds")
    assert (run / "config.yaml").read_text() == "command: convert\n" and not (run / "seed-0").exists()


@pytest.mark.slow
def test_two_seeds_end_to_end(tmp_path, tiny_run):
    run = tmp_path / "seeds"
    r, _ = s2d(*convert_args(tiny_run["model_pt"], run, "--seeds", "2", "--tolerance", "50"), timeout=1800)
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["shipped"]["test_drop_points"]["n"] == 2
    reports = [json.loads((run / f"seed-{k}" / "report.json").read_text()) for k in (0, 1)]
    drops = [-rep["dynamic"]["accuracy_delta_points"] for rep in reports]
    assert summary["shipped"]["test_drop_points"]["mean"] == pytest.approx(sum(drops) / 2)
    assert "over 2 seeds" in r.stdout
