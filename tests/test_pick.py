"""``s2d pick``: a conversion's front, and another operating point of it shipped without a new search.

One tiny conversion (module fixture, in-process on the real Fashion-MNIST split the CLI loads) is the parent R;
the picks run through ``s2d.cli.main`` as a user runs them. The report's speed figures are timed with a couple of
repeats instead of twenty (``quick_timing``): what they measure is tested elsewhere, and full timing would triple
this file's run time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from s2d.cli import main
from s2d.data import load_dataset
from s2d.pipeline.convert import ConvertConfig, Pipeline, choose_arch
from s2d.pipeline.format import stages_summary
from s2d.pipeline.pick import (
    PickPipeline,
    candidate_records,
    default_pick_dir,
    front_rows,
    open_conversion,
    pick_config,
)
from s2d.search.archive import Archive

TOLERANCE = 50.0  # the parent's: the tiny static model is weak (~35 %), see test_convert
MAX_DROP = 20.0  # the pick's
VAL_SIZE = 1000  # held-out images: 400 for the search (200 of them score an arch), 600 to calibrate on


def _snapshot(root: Path) -> dict[str, str]:
    """Every file of R (but the pick's own outputs) by content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).parts[0] == "picks" and not p.name.startswith("front.")}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_run, quick_timing) -> dict:
    """R: a tiny conversion's supernet and search (what a pick reuses; its fine-tune and report would only add
    files to R that the snapshot then checks alike), on the 2000 held-out images the CLI loads with R's config."""
    root = tmp_path_factory.mktemp("pick") / "R"
    cfg = ConvertConfig(weights=str(tiny_run["model_pt"]), algo="random", budget="tiny", tolerance=TOLERANCE,
                        val_size=VAL_SIZE)
    p = Pipeline(cfg, root, progress=False, data=load_dataset("fashion-mnist", val_size=VAL_SIZE))
    p.supernet_phase()
    p.search_phase()
    ev = p.evaluator(p.budget.search_val_images)
    return {"root": root, "static_val_accuracy": ev.static_accuracy, "val_images": len(ev.val),
            "records": Archive(root / "archive.jsonl").records()}


def _one_line_error(capsys, *argv: str) -> str:
    assert main(["pick", *argv, "--threads", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("s2d: error: "), err
    return err[0]


def test_list_prints_and_writes_the_non_dominated_front(parent, capsys):
    root, records = parent["root"], parent["records"]
    before = _snapshot(root)
    assert main(["pick", "--run-dir", str(root), "--list", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    front = json.loads((root / "front.json").read_text())
    assert (root / "front.md").read_text() in out and (root / "front.png").stat().st_size > 10_000
    assert _snapshot(root) == before  # --list writes the front files and nothing else
    # the static model on the very images the archive's accuracies are on, as the conversion's evaluator saw it
    assert front["static_val_accuracy"] == parent["static_val_accuracy"]
    assert front["val_images"] == parent["val_images"] == 200 and front["archive_records"] == len(records) > 0
    rows = front["front"]
    assert rows and [r["average_macs"] for r in rows] == sorted(r["average_macs"] for r in rows)
    for r in rows:
        assert r["drop_points"] == pytest.approx((front["static_val_accuracy"] - r["accuracy"]) * 100)
        assert f"| {r['accuracy'] * 100:.2f} | {r['drop_points']:.2f} | {r['mac_ratio']:.3f} |" in out
        assert r["stages"] in out and r["searcher"] in {"seed", "sweep", "random"}
        for other in rows:  # no front point dominates another
            assert not (other["accuracy"] >= r["accuracy"] and other["average_macs"] <= r["average_macs"]
                        and other is not r)
    for rec in records:  # and every scored arch is matched or dominated by one
        assert any(r["accuracy"] >= rec["accuracy"] and r["average_macs"] <= rec["average_macs"] for r in rows)
    assert main(["pick", "--run-dir", str(root), "--threads", "1"]) == 0  # no choice: the same listing
    assert (root / "front.md").read_text() in capsys.readouterr().out


def test_front_rows_and_stages_by_hand():
    recs = [{"key": k, "arch": {"stages": [{"width": w, "exit": "output", "reuse": True}]}, "accuracy": a,
             "average_macs": m, "mac_ratio": m / 100, "reward": 0.0, "meets_target": True, "searcher": "seed"}
            for k, w, a, m in (("a", 0.25, 0.80, 10), ("b", 0.5, 0.79, 20), ("c", 0.75, 0.90, 30), ("d", 1, 0.90, 40))]
    rows = front_rows(recs, static_accuracy=0.91)
    assert [r["key"] for r in rows] == ["a", "c"]  # b costs more for less, d as much for more MACs
    assert [r["drop_points"] for r in rows] == pytest.approx([11.0, 1.0])
    cascade = {"stages": [{"width": 0.375, "exit": "layer2.2", "reuse": True},
                          {"width": 0.5, "exit": "output", "reuse": [True, False, False]},
                          {"width": 1.0, "exit": "output", "reuse": True, "recompute": True}]}
    assert stages_summary(cascade) == "0.375@layer2.2 > 0.5@output reuse ynn > static"


def test_pick_ships_the_point_without_searching_and_leaves_r_alone(parent, capsys):
    root = parent["root"]
    table = root / "latency_table.json"  # stage times R's search measured (--cost latency): the child's too
    table.write_text(json.dumps({"machine": {"threads": 1}, "static": None, "stages": {}}) + "\n")
    before = _snapshot(root)
    argv = ["pick", "--run-dir", str(root), "--max-drop", f"{MAX_DROP:g}", "--threads", "1", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    child = root / "picks" / "drop-20"
    assert f"picked run: {child}" in out and (child / "report.md").read_text() in out
    assert _snapshot(root) == before  # R's archive, report, checkpoints, config: byte for byte

    cfg = yaml.safe_load((child / "config.yaml").read_text())
    parent_cfg = yaml.safe_load((root / "config.yaml").read_text())
    assert cfg["tolerance"] == MAX_DROP and parent_cfg["tolerance"] == TOLERANCE
    assert {k: v for k, v in cfg.items() if k != "tolerance"} == {k: v for k, v in parent_cfg.items()
                                                                  if k != "tolerance"}
    assert ConvertConfig.from_run(child).tolerance == MAX_DROP  # a conversion's run: s2d bench works on it
    report = json.loads((child / "report.json").read_text())
    assert report["tolerance_points"] == MAX_DROP
    if not report["fallback"]:
        assert report["dynamic"]["certificate"]["tolerance_points"] == MAX_DROP
        assert report["dynamic"]["certificate"]["bound_points"] <= MAX_DROP

    # the parent's supernet, not a retrained one; no search: R's candidates re-scored, chosen as convert chooses
    sn, child_sn = root / "checkpoints" / "supernet.pt", child / "checkpoints" / "supernet.pt"
    assert os.stat(child_sn).st_ino == os.stat(sn).st_ino or child_sn.read_bytes() == sn.read_bytes()
    assert (child / table.name).read_bytes() == table.read_bytes()
    state = json.loads((child / "state.json").read_text())
    assert state["supernet"]["reused_from"] == str(root)
    # (a race only when the choice trains: a full-width arch keeps the static weights)
    assert {"supernet", "search", "finetune", "report"} <= set(state) <= {"supernet", "search", "race", "finetune",
                                                                          "report"}
    assert not (child / "search_ppo.jsonl").exists() and not (child / "search_random.jsonl").exists()
    wanted = candidate_records(parent["records"])
    rescored = Archive(child / "archive.jsonl").records()
    assert [r["key"] for r in rescored] == [r["key"] for r in wanted]
    assert [r["searcher"] for r in rescored] == [r["searcher"] for r in wanted]
    summary = state["search"]["summaries"]["pick"]
    assert summary["evaluations"] == summary["scored_here"] == len(wanted)
    assert summary["parent_archive_records"] == len(parent["records"])
    by_key = {r["key"]: r for r in parent["records"]}
    for r in rescored:  # same supernet and images: one-stage archs (no thresholds) score exactly as in R
        if len(r["arch"]["stages"]) == 1:
            assert (r["accuracy"], r["average_macs"]) == (by_key[r["key"]]["accuracy"],
                                                          by_key[r["key"]]["average_macs"])
    main_records = [r for r in rescored if r["searcher"] in ("random", "seed", "sweep")]
    n = parent["val_images"]  # the one-standard-error rule reads how many images the MAC ratios were measured on
    best = choose_arch(main_records, images=n) or choose_arch(rescored, images=n)
    if best is None:
        assert state["search"]["fallback"] and state["search"]["best"]["fallback"]
    else:
        assert state["search"]["best"]["key"] == best["key"] and state["search"]["fallback"] is None

    again = (child / "archive.jsonl").read_bytes(), (child / "report.json").read_bytes()
    assert main(argv) == 0  # finished: prints the report again, scores and measures nothing
    assert ((child / "archive.jsonl").read_bytes(), (child / "report.json").read_bytes()) == again
    assert f"picked run: {child}" in capsys.readouterr().out


def test_pick_with_nothing_within_the_drop_chooses_the_static_network(parent, tmp_path, monkeypatch,
                                                                      nothing_meets_the_target):
    """Re-scored, no candidate keeps the drop: the pick's search phase records the static network as a fallback,
    as a conversion's does (then the report ships the cheapest network that keeps it, and says so in one line).
    Three candidates are enough to show it."""
    import s2d.pipeline.pick as pick

    monkeypatch.setattr(pick, "candidate_records", lambda records, top: records[:3])
    conv = open_conversion(parent["root"])
    cfg = pick_config(conv.cfg, max_drop=1.0, target_mac_ratio=None)
    p = PickPipeline(cfg, tmp_path / "tight", conv, progress=False)
    p.supernet_phase()
    p.search_phase()
    search = json.loads((tmp_path / "tight" / "state.json").read_text())["search"]
    assert search["fallback"].startswith("no searched arch kept the 1.0-point tolerance on validation data")
    assert search["best"] == {"arch": {"stages": [{"width": 1.0, "exit": "output", "reuse": True}],
                                       "exit_rule": "max_softmax", "thresholds": []}, "fallback": True}


def test_budget_pick_rescores_for_the_budget(parent, monkeypatch):
    """A budget pick's objective is the budget's: R's candidates re-scored (R's front, cheapest first, here) meet it
    exactly when their average MACs fit, and the most accurate within it is chosen, as convert chooses in budget
    mode."""
    import s2d.pipeline.pick as pick

    monkeypatch.setattr(pick, "candidate_records", lambda records, top: pick.pareto_front(records)[:4])
    root = parent["root"]
    conv = open_conversion(root)
    cfg = pick_config(conv.cfg, max_drop=None, target_mac_ratio=0.25)
    assert cfg.target_mac_ratio == 0.25 and cfg.tolerance == TOLERANCE and cfg.workers == 1
    child = default_pick_dir(root, max_drop=None, target_mac_ratio=0.25)
    assert child == root / "picks" / "macs-0.25"
    p = PickPipeline(cfg, child, conv, progress=False)
    p.supernet_phase()
    p.search_phase()
    rescored = Archive(child / "archive.jsonl").records()
    assert len(rescored) == min(4, len(pick.pareto_front(parent["records"])))
    for r in rescored:
        assert r["meets_target"] == (r["mac_ratio"] <= 0.25 + 1e-9)
        assert r["reward"] == pytest.approx(r["accuracy"] - 20.0 * max(0.0, r["mac_ratio"] - 0.25))
    best = json.loads((child / "state.json").read_text())["search"]["best"]
    assert best["key"] == choose_arch(rescored, must_meet=False)["key"]


def test_errors_are_one_line_and_leave_r_alone(parent, tmp_path, capsys):
    root = parent["root"]
    before = _snapshot(root)
    r = str(root)
    assert "does not exist" in _one_line_error(capsys, "--run-dir", str(tmp_path / "nowhere"), "--list")
    assert "config.yaml is missing" in _one_line_error(capsys, "--run-dir", str(tmp_path), "--max-drop", "1")
    assert "give one operating point" in _one_line_error(capsys, "--run-dir", r, "--max-drop", "1",
                                                         "--target-mac-ratio", "0.5")
    for bad in ("-1", "0", "nan", "150"):
        assert "--max-drop is in accuracy points" in _one_line_error(capsys, "--run-dir", r, "--max-drop", bad)
    for bad in ("0", "1.5", "inf"):
        assert "--target-mac-ratio is a fraction" in _one_line_error(capsys, "--run-dir", r, "--target-mac-ratio",
                                                                     bad)
    assert "too small to certify a 0.01-point drop" in _one_line_error(capsys, "--run-dir", r, "--max-drop", "0.01")
    assert "--list only shows" in _one_line_error(capsys, "--run-dir", r, "--list", "--max-drop", "1")
    assert "is the conversion itself" in _one_line_error(capsys, "--run-dir", r, "--max-drop", "1", "--out", r)

    bare = tmp_path / "bare"  # a conversion's config without a trained supernet, then without an archive
    bare.mkdir()
    (bare / "config.yaml").write_bytes((root / "config.yaml").read_bytes())
    assert "no trained supernet" in _one_line_error(capsys, "--run-dir", str(bare), "--max-drop", "1")
    (bare / "state.json").write_text(json.dumps({"supernet": {"checkpoint": "checkpoints/supernet.pt"}}))
    (bare / "checkpoints").mkdir()
    os.link(root / "checkpoints" / "supernet.pt", bare / "checkpoints" / "supernet.pt")
    (bare / "archive.jsonl").write_text("")
    assert "empty archive" in _one_line_error(capsys, "--run-dir", str(bare), "--list")
    assert _snapshot(root) == before
