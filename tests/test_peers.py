"""``s2d bench peers``: the rows it records, the verdicts, the oracle bound, resuming, and its one-line errors.

The conversion is faked (a random ResNet-20 as the static model, a random supernet as the dynamic
network, report.json written by hand) so that the bench runs for real in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_resnet20_supernet

from s2d import checkpoint
from s2d.cli import main
from s2d.data import Dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import StageOutputs, accuracy, stage_outputs
from s2d.measure.calibration import threshold_rule_bound
from s2d.measure.cost import stage_macs, static_cost
from s2d.models import get_model
from s2d.pipeline import peers
from s2d.pipeline.peers import conversion_seconds, oracle_bound, run_peers, verdicts
from s2d.runs import write_json_atomic
from s2d.transform.arch import MultiStageArch
from s2d.transform.stages import INFERENCE_LAYOUT
from s2d.transform.supernet import dynamic_checkpoint

REPO = Path(__file__).resolve().parent.parent
TEST_IMAGES = 300
QUICK = dict(seconds=2.0, progress=False, latency_images=4, repeats=1, rounds=2)
UNTIMED = ("name", "key", "test_accuracy", "test_wrong", "mac_ratio", "average_macs", "finetune", "checkpoint")


def _row(name: str, kind: str, acc: float, mac_ratio: float) -> dict:
    return {"name": name, "kind": kind, "test_accuracy": acc, "mac_ratio": mac_ratio}


def test_verdicts_on_hand_made_numbers():
    rows = [_row("static", "static", 0.935, 1.0),
            _row("TP 1/2", "torch-pruning", 0.930, 0.50),
            _row("TP 1/3", "torch-pruning", 0.925, 0.33),
            _row("TP 1/4", "torch-pruning", 0.900, 0.25),
            _row("depth", "depth_only", 0.990, 0.20),  # the SDN baseline is not s2d: it never counts
            _row("s2d a", "s2d", 0.933, 0.42),
            _row("s2d b", "s2d", 0.931, 0.37),
            _row("s2d c", "s2d", 0.920, 0.31),
            _row("oracle", "oracle", 0.990, 0.10)]  # nor does the oracle
    v = {x["peer"]: x for x in verdicts(rows)}
    assert list(v) == ["TP 1/2", "TP 1/3", "TP 1/4"]
    # at >= 2x: the best of a, b, c is a (93.3 >= 93.0)
    assert v["TP 1/2"]["s2d_point"] == "s2d a" and v["TP 1/2"]["s2d_wins"] is True
    assert "at least as accurate" in v["TP 1/2"]["line"]
    # at >= 1/0.33x only c qualifies (0.31 <= 0.33), and it is less accurate
    assert v["TP 1/3"]["s2d_point"] == "s2d c" and v["TP 1/3"]["s2d_wins"] is False
    assert "LESS accurate" in v["TP 1/3"]["line"]
    # nothing reaches 4x
    assert v["TP 1/4"]["s2d_point"] is None and v["TP 1/4"]["s2d_wins"] is None
    assert "no s2d point reaches 4.00x" in v["TP 1/4"]["line"]
    # a tie counts for s2d, and an equal MAC ratio counts as reaching it
    tie = verdicts([_row("TP", "torch-pruning", 0.9, 0.5), _row("s", "s2d", 0.9, 0.5)])
    assert tie[0]["s2d_wins"] is True
    assert verdicts([_row("s", "s2d", 0.9, 0.5)]) == []


def test_verdicts_say_whether_a_gap_is_chance():
    """Rows that carry the test images they get wrong get McNemar's p; a gap of two images is chance."""
    peer = {**_row("TP", "torch-pruning", 0.9, 0.5), "test_wrong": list(range(100))}
    close = {**_row("s", "s2d", 0.9 - 2 / 1000, 0.5), "test_wrong": list(range(2, 104))}
    v = verdicts([peer, close])[0]
    assert v["s2d_wins"] is False and v["significant"] is False and v["p_value"] > 0.5
    assert (v["s2d_only_right"], v["peer_only_right"]) == (2, 4)
    assert "not a significant difference" in v["line"]
    far = {**_row("s", "s2d", 0.95, 0.5), "test_wrong": list(range(50))}
    v = verdicts([peer, far])[0]
    assert v["s2d_wins"] is True and v["significant"] is True and v["p_value"] < 1e-9
    assert verdicts([_row("TP", "torch-pruning", 0.9, 0.5), close])[0]["p_value"] is None  # no errors, no test


def test_oracle_bound_hand_made():
    correct = torch.tensor([[1, 0, 0, 0],   # stage 0
                            [1, 1, 0, 0],   # stage 1
                            [0, 1, 1, 0]],  # stage 2
                           dtype=torch.bool)
    o = oracle_bound(correct, [10.0, 20.0, 30.0], static_macs=100.0)
    # exits: sample 0 at stage 0 (10), 1 at stage 1 (30), 2 at stage 2 (60), 3 wrong everywhere: stage 0 (10)
    assert o["test_accuracy"] == pytest.approx(0.75)
    assert o["average_macs"] == pytest.approx((10 + 30 + 60 + 10) / 4)
    assert o["mac_ratio"] == pytest.approx(o["average_macs"] / 100)
    assert o["exit_rates"] == pytest.approx([0.5, 0.25, 0.25])
    assert o["stage_accuracy"] == pytest.approx([0.25, 0.5, 0.5])


@pytest.mark.parametrize("errors_least_confident", [True, False])
def test_threshold_rule_bound_hand_made(errors_least_confident):
    """A first stage right on 8 of 10 samples (cost 1), a second right on all (cost 10 more): the oracle averages
    (8 * 1 + 2 * 11) / 10 = 3.0 MACs. Where the first stage is least confident on its 2 errors, thresholds match
    the oracle; where it is most confident on them, keeping every sample right means sending all on (11 MACs)."""
    correct = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10], dtype=torch.bool)
    conf = torch.linspace(0.1, 1.0, 10) if errors_least_confident else torch.linspace(1.0, 0.1, 10)
    outs = StageOutputs(torch.stack([conf, torch.ones(10)]), correct)
    oracle = oracle_bound(correct, [1.0, 10.0], static_macs=11.0)
    assert oracle["average_macs"] == pytest.approx(3.0)
    rule = threshold_rule_bound(outs, [1.0, 10.0], oracle_macs=oracle["average_macs"], reference_accuracy=1.0)
    if errors_least_confident:
        assert rule["accuracy_within"] == 1.0
        assert rule["oracle_multiple_at_0.2"] == rule["oracle_multiple_at_0.5"] == pytest.approx(1.0)
    else:  # within 1.3 x 3.0 MACs at most 2 samples go on (2.8 MACs), the 2 least confident: both were right
        assert rule["accuracy_within"] == pytest.approx(0.8)
        assert rule["oracle_multiple_at_0.2"] == pytest.approx(11.0 / 3.0)
    # one stage: no thresholds, its accuracy at its cost
    one = threshold_rule_bound(StageOutputs(conf[None], correct[1:]), [11.0], oracle_macs=11.0, reference_accuracy=1.0)
    assert one == {"within_oracle": 1.3, "accuracy_within": 1.0, "oracle_multiple_at_0.2": 1.0,
                   "oracle_multiple_at_0.5": 1.0}


def test_peers_json_stays_strict_json():
    """A fine-tune whose budget ran out while probing has no step time (NaN): saved as null."""
    assert peers._json_safe({"a": [1.0, float("nan")], "b": {"c": float("inf"), "d": "x"}, "e": (2,)}) == \
        {"a": [1.0, None], "b": {"c": None, "d": "x"}, "e": [2]}


def test_conversion_seconds_prefers_phase_seconds(tmp_path):
    (tmp_path / "tensorboard" / "supernet").mkdir(parents=True)
    t0 = time.time() - 1000
    event = tmp_path / "tensorboard" / "supernet" / f"events.out.tfevents.{int(t0)}.host.1.0"
    event.write_text("x")
    for name in ("report.json", "archive.jsonl", "config.yaml"):
        (tmp_path / name).write_text("{}")
    os.utime(event, (t0 + 300, t0 + 300))  # last written later than it was created
    os.utime(tmp_path / "archive.jsonl", (t0 + 400, t0 + 400))
    os.utime(tmp_path / "report.json", (t0 + 600, t0 + 600))
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "peers.json").write_text("{}")  # written after the conversion: no end mark
    (tmp_path / "channel_order.json").write_text("{}")  # rewritten when the run is reopened: no end mark either
    seconds, how = conversion_seconds(tmp_path)
    assert seconds == pytest.approx(600, abs=1) and "file times" in how
    write_json_atomic(tmp_path / "state.json", {"supernet": {"seconds": 100.0}, "search": {"seconds": 50.5}})
    os.utime(tmp_path / "state.json", (t0 + 600, t0 + 600))
    seconds, how = conversion_seconds(tmp_path)
    assert seconds == pytest.approx(150.5) and "state.json" in how
    write_json_atomic(tmp_path / "state.json", {"supernet": {"seconds": 100.0}, "search": {"seconds": 50.5},
                                                "race": {"seconds": 30.0}, "finetune": {"seconds": 40.0}})
    seconds, how = conversion_seconds(tmp_path)  # the race ran inside the fine-tune: counted once
    assert seconds == pytest.approx(190.5) and "race" not in how
    write_json_atomic(tmp_path / "state.json", {"supernet": {"seconds": 100.0}, "search": {}})  # one phase lacks it
    assert "file times" in conversion_seconds(tmp_path)[1]


def _fake_conversion(root: Path, data: Dataset, *, dynamic: bool) -> dict:
    """A run directory as `s2d convert` leaves it, with hand-written report figures."""
    torch.manual_seed(0)
    static = get_model("resnet20", 10, 1).eval()
    info = data.info
    weights = root / "static.pt"
    checkpoint.save_atomic(checkpoint.model_checkpoint(static, model_name="resnet20", num_classes=10, in_channels=1,
                                                       image_size=28, dataset=info.name), weights)
    test = data.test.subset(TEST_IMAGES)
    macs = static_cost(static, info).total_macs
    static_acc = accuracy(static, test, info)
    config = {"command": "convert", "model": "resnet20", "dataset": "fashion-mnist", "weights": str(weights),
              "algo": "ppo", "budget": "tiny", "tolerance": 0.5, "val_size": data.val_size, "split_seed": 0,
              "data_dir": None, "device": "cpu"}
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dyn_acc, points = 0.5, []
    if dynamic:
        sn = random_resnet20_supernet(head_std=1.5)
        arch = MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": "layer1.2", "reuse": True},
                                                    {"width": 1.0, "exit": "output", "reuse": True}]})
        outs = stage_outputs(sn, arch, test, info)
        costs, _ = stage_macs(sn.materialise(arch, fold_bn=False).stages, sn.input_shape)
        for q in (0.7, 0.3):  # about 30 % / 70 % exit at the first stage
            th = [float(outs.confidence[0].quantile(q))]
            rates = outs.exit_rates(th)
            avg = costs[0] + rates[1] * costs[1]
            points.append({"tolerance_points": 0.5 if q == 0.7 else 1.0, "thresholds": th,
                           "test_accuracy": outs.accuracy(th), "average_macs": avg, "mac_ratio": avg / macs,
                           "exit_rates": rates})
        chosen = arch.with_thresholds(points[0]["thresholds"])
        meta = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "image_size": 28, "dataset": info.name}
        checkpoint.save_atomic(dynamic_checkpoint(sn, chosen, meta), root / "checkpoints" / "dynamic.pt")
        dyn_acc = points[0]["test_accuracy"]
    dyn = {"name": "searched + fine-tuned", "test_accuracy": dyn_acc, "average_macs": 0.4 * macs, "mac_ratio": 0.4,
           "exit_rates": [0.3, 0.7], "throughput_ratio": 2.1, "latency_ratio": 0.5}
    depth = {"name": "depth_only (supernet)", "test_accuracy": static_acc - 0.01, "average_macs": 0.6 * macs,
             "mac_ratio": 0.6, "exit_rates": [0.5, 0.5], "throughput_ratio": 1.5, "latency_ratio": 0.6}
    if not dynamic:  # hand-written points without speed figures (a report has none for them)
        points = [{"tolerance_points": 0.5, "thresholds": [0.9], "test_accuracy": dyn_acc, "average_macs": 0.4 * macs,
                   "mac_ratio": 0.4, "exit_rates": [0.3, 0.7]}]
    report = {"model": "resnet20", "dataset": "fashion-mnist", "tolerance_points": 0.5,
              "static": {"test_accuracy": static_acc, "test_images": TEST_IMAGES, "macs": macs},
              "static_val_accuracy": static_acc, "dynamic": dyn, "rows": [depth, dyn], "operating_points": points,
              "layout": INFERENCE_LAYOUT,
              "budget_points": [{"target_mac_ratio": 0.25, "thresholds": [0.5], "test_accuracy": dyn_acc - 0.002,
                                 "average_macs": 0.24 * macs, "mac_ratio": 0.24, "exit_rates": [0.8, 0.2],
                                 "throughput_ratio": 2.6, "latency_ratio": 0.45}]}
    write_json_atomic(root / "report.json", report)
    write_json_atomic(root / "state.json", {p: {"seconds": 30.0} for p in ("supernet", "search", "finetune",
                                                                           "report")})
    return report


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory, fmnist, quick_timing) -> dict:
    root = tmp_path_factory.mktemp("peers-run")
    report = _fake_conversion(root, fmnist, dynamic=True)
    res = run_peers(root, ratios=(1 / 2, 1 / 4), data=fmnist, **QUICK)
    return {"root": root, "report": report, "res": res}


def test_rows_of_every_network(peer_run):
    res, report, root = peer_run["res"], peer_run["report"], peer_run["root"]
    saved = json.loads((root / "peers" / "peers.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"peers.json holds {c}: not strict JSON"))
    assert saved["rows"] == res["rows"]
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["static", "torch-pruning", "torch-pruning", "depth_only", "s2d", "s2d", "s2d", "s2d", "oracle"]
    assert res["peer_seconds"] == 2.0 and res["peer_seconds_source"] == "--peer-seconds"
    assert res["conversion_seconds"] == pytest.approx(120.0) and "state.json" in res["conversion_seconds_source"]
    assert res["test_images"] == TEST_IMAGES
    static, tp2, tp4 = res["rows"][:3]
    assert static["mac_ratio"] == 1.0 and static["throughput_ratio"] == 1.0
    assert static["test_accuracy"] == pytest.approx(report["static"]["test_accuracy"])
    for tp, target in ((tp2, 0.5), (tp4, 0.25)):
        assert abs(tp["mac_ratio"] / target - 1) < 0.1
        assert tp["throughput_ratio"] > 0 and tp["latency_ratio"] > 0 and tp["speed_source"] == "measured here"
        assert tp["timing_rounds"] == 2 and tp["layout"] == INFERENCE_LAYOUT
        for k in ("throughput_ratio", "latency_ratio"):  # the median of 2 rounds lies in their range
            assert tp[f"{k}_range"][0] <= tp[k] <= tp[f"{k}_range"][1]
        ft = tp["finetune"]
        assert ft["steps"] > 0 and (ft["steps"] >= ft["planned_steps"] or ft["seconds"] >= 2.0)  # plan or budget done
        assert ft["seconds"] < 2.0 + 3.0  # the budget holds (one step over at most)
        assert tp["cost_seconds"] >= tp["finetune"]["seconds"]
        assert tp["accuracy_delta_points"] == pytest.approx((tp["test_accuracy"] - static["test_accuracy"]) * 100)
        assert (root / "peers" / f"tp_{peers.ratio_key(target)}.pt").exists()
        assert any((root / "tensorboard" / f"peers_{peers.ratio_key(target)}").iterdir())
    depth, searched, p05, p10, budget4, oracle = res["rows"][3:]
    assert budget4["name"] == "s2d @ budget 4x" and budget4["mac_ratio"] == 0.24
    assert budget4["test_accuracy"] == report["budget_points"][0]["test_accuracy"]
    # the budget points are timed here (the report's figures may be of another layout or machine load)
    assert budget4["speed_source"] == "measured here" and budget4["throughput_ratio"] not in (None, 2.6)
    assert budget4["throughput_ratio"] == res["s2d_measured"]["budget_points"][0]["throughput_ratio"]
    assert budget4["throughput_ratio_range"] == res["s2d_measured"]["budget_points"][0]["throughput_ratio_range"]
    v4 = next(v for v in res["verdicts"] if v["peer"] == "Torch-Pruning 1/4")
    if budget4["mac_ratio"] <= tp4["mac_ratio"]:  # the budget point is the only s2d point that cheap
        assert v4["s2d_point"] == "s2d @ budget 4x"
    assert (depth["throughput_ratio"], depth["speed_source"], depth["cost_seconds"]) == (1.5, "report", None)
    assert (searched["throughput_ratio"], searched["cost_seconds"]) == (2.1, pytest.approx(120.0))
    for row, point in ((p05, report["operating_points"][0]), (p10, report["operating_points"][1])):
        assert row["test_accuracy"] == point["test_accuracy"] and row["mac_ratio"] == point["mac_ratio"]
        assert row["speed_source"] == "measured here" and row["throughput_ratio"] > 0
    measured = res["s2d_measured"]
    assert measured["available"]
    assert [p["test_accuracy_here"] for p in measured["operating_points"]] == \
        pytest.approx([p["test_accuracy"] for p in report["operating_points"]])
    # the oracle exits at the first correct stage: at least as accurate as any stage, cheaper than the last
    assert oracle["test_accuracy"] >= max(oracle["stage_accuracy"]) - 1e-12
    assert oracle["throughput_ratio"] is None and 0 < oracle["mac_ratio"] < 1
    assert res["oracle"]["test_accuracy"] == oracle["test_accuracy"] and "threshold_rule" not in oracle
    rule = res["oracle"]["threshold_rule"]  # thresholds fitted on the test images: never above the oracle's accuracy
    assert rule["within_oracle"] == 1.3 and rule["accuracy_within"] <= oracle["test_accuracy"] + 1e-12
    assert [v["peer"] for v in res["verdicts"]] == ["Torch-Pruning 1/2", "Torch-Pruning 1/4"]
    # every row but the oracle's and the baseline's names the test images it gets wrong, as many as it scores
    for row in (static, tp2, tp4, searched, p05, p10):  # (the budget point's accuracy here is hand-written)
        assert len(row["test_wrong"]) == round((1 - row["test_accuracy"]) * TEST_IMAGES)
    assert all(v["p_value"] is not None and 0 < v["p_value"] <= 1 for v in res["verdicts"])
    md = (root / "peers" / "peers.md").read_text()
    assert "| Torch-Pruning 1/4 |" in md and "Oracle bound:" in md and "not available" not in md
    assert peers.rule_bound_line(rule, res["static_test_accuracy"]) in md
    assert all(v["line"] in md for v in res["verdicts"])
    assert (root / "peers" / "peers.png").stat().st_size > 10_000


def test_finished_peers_are_not_retrained(peer_run, fmnist, monkeypatch):
    root, first = peer_run["root"], peer_run["res"]

    def refuse(*_a, **_k):
        raise AssertionError("a finished peer was trained again")

    monkeypatch.setattr(peers, "prune_to_mac_ratio", refuse)
    monkeypatch.setattr(peers, "kd_finetune", refuse)
    monkeypatch.setattr(peers, "_s2d_measured", refuse)  # measured once per dynamic.pt, too
    again = run_peers(root, ratios=(1 / 2, 1 / 4), data=fmnist, **QUICK)
    assert [r["test_accuracy"] for r in again["rows"]] == [r["test_accuracy"] for r in first["rows"]]
    assert again["rows"][1]["speed_source"] == "measured here"  # timed again, from its checkpoint
    with pytest.raises(S2DError, match="--peer-seconds 2"):  # another budget would mix two comparisons
        run_peers(root, ratios=(1 / 2,), data=fmnist, **{**QUICK, "seconds": 3.0})
    # the hint's rounded figure is the same budget
    only_half = run_peers(root, ratios=(1 / 2,), data=fmnist, **{**QUICK, "seconds": 2.0004})
    # the 1/4 peer finished on this budget stays in the table (and the markdown) when only 1/2 is asked for
    assert [{k: r.get(k) for k in UNTIMED} for r in only_half["rows"][:3]] == \
        [{k: r.get(k) for k in UNTIMED} for r in first["rows"][:3]]
    assert "| Torch-Pruning 1/4 |" in (root / "peers" / "peers.md").read_text()


def test_a_peer_finished_before_errors_were_recorded_gets_them_from_its_checkpoint(peer_run, fmnist, monkeypatch):
    root, first = peer_run["root"], peer_run["res"]
    path = root / "peers" / "peers.json"
    saved = json.loads(path.read_text())
    for p in saved["peers"]:
        del p["test_wrong"]
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(peers, "kd_finetune", lambda *_a, **_k: pytest.fail("a finished peer was trained again"))
    again = run_peers(root, ratios=(1 / 2, 1 / 4), data=fmnist, **QUICK)
    assert [p["test_wrong"] for p in again["peers"]] == [p["test_wrong"] for p in first["peers"]]


def test_every_network_is_timed_together_in_rounds_on_fresh_copies(peer_run, fmnist, monkeypatch):
    """Figures timed minutes apart are not of one machine: every call times the finished peers and s2d's points
    again, round by round in a rotated order, each call on fresh copies of the network and of the static model;
    nothing is trained, and figures an older peers.json recorded (another layout) are replaced."""
    from s2d.measure import network

    root, first = peer_run["root"], peer_run["res"]
    path = root / "peers" / "peers.json"
    saved = json.loads(path.read_text())
    for p in saved["peers"]:
        del p["layout"]
    write_json_atomic(path, saved)
    monkeypatch.setattr(peers, "kd_finetune", lambda *_a, **_k: pytest.fail("a finished peer was trained again"))
    calls = []
    real = network.paired_figures
    monkeypatch.setattr(network, "paired_figures", lambda ref, cand, *a, **k: calls.append((ref, cand)) or
                        real(ref, cand, *a, **k))
    again = run_peers(root, ratios=(1 / 2,), data=fmnist, **{**QUICK, "rounds": 3})
    timed = 2 + len(first["s2d_measured"]["operating_points"]) + len(first["s2d_measured"]["budget_points"])
    assert len(calls) == 3 * timed  # both peers and every s2d point, in each of the 3 rounds
    assert len({id(c) for _, c in calls}) == len(calls) and len({id(r) for r, _ in calls}) == len(calls)
    kinds = [type(c).__name__ for _, c in calls]
    assert kinds[:timed] != kinds[timed:2 * timed]  # the order rotates between rounds
    assert [p["layout"] for p in again["peers"]] == [INFERENCE_LAYOUT] * 2
    assert all(p["timing_rounds"] == 3 for p in again["peers"] + again["s2d_measured"]["budget_points"])
    # a report timed in another layout keeps its accuracy figures, not its speed ones
    report = json.loads((root / "report.json").read_text())
    write_json_atomic(root / "report.json", {k: v for k, v in report.items() if k != "layout"})
    try:
        rows = {r["name"]: r for r in run_peers(root, ratios=(1 / 2,), data=fmnist, **QUICK)["rows"]}
    finally:
        write_json_atomic(root / "report.json", report)
    assert rows["SDN-style depth-only"]["throughput_ratio"] is None and rows["SDN-style depth-only"]["test_accuracy"]
    assert rows["s2d @ budget 4x"]["speed_source"] == "measured here"
    assert [p["test_accuracy"] for p in again["peers"]] == [p["test_accuracy"] for p in first["peers"]]
    md = (root / "peers" / "peers.md").read_text()
    lo, hi = rows["Torch-Pruning 1/2"]["throughput_ratio_range"]
    assert f"({lo:.2f}–{hi:.2f})" in md


def test_killed_run_continues_from_its_checkpoint(peer_run, fmnist, monkeypatch):
    """Killed after the fine-tune but before peers.json recorded it: the checkpoint is rebuilt, not re-pruned,
    and its finished schedule is not run again."""
    root = peer_run["root"]
    path = root / "peers" / "peers.json"
    saved = json.loads(path.read_text())
    before = next(p for p in saved["peers"] if p["key"] == peers.ratio_key(1 / 4))
    saved["peers"] = [p for p in saved["peers"] if p is not before]
    write_json_atomic(path, saved)
    monkeypatch.setattr(peers, "prune_to_mac_ratio", lambda *_a, **_k: pytest.fail("pruned again"))
    res = run_peers(root, ratios=(1 / 2, 1 / 4), data=fmnist, **QUICK)
    after = next(p for p in res["peers"] if p["key"] == peers.ratio_key(1 / 4))
    assert after["finetune"]["steps"] == before["finetune"]["steps"]
    assert after["finetune"]["resumed_from_step"] == before["finetune"]["steps"]  # nothing left to train
    assert after["test_accuracy"] == before["test_accuracy"] and after["mac_ratio"] == before["mac_ratio"]
    assert after["prune_seconds"] == before["prune_seconds"]  # the cost includes the pruning of the first run


def test_without_a_dynamic_checkpoint_the_oracle_is_not_available(tmp_path, fmnist):
    _fake_conversion(tmp_path, fmnist, dynamic=False)
    res = run_peers(tmp_path, ratios=(), data=fmnist, **QUICK)
    assert [r["kind"] for r in res["rows"]] == ["static", "depth_only", "s2d", "s2d", "s2d"]
    assert res["oracle"] == {"available": False, "reason": f"{tmp_path / 'checkpoints' / 'dynamic.pt'} is missing"}
    point = res["rows"][-2]
    assert point["throughput_ratio"] is None and point["speed_source"] is None  # no figure is made up
    assert res["verdicts"] == []
    md = (tmp_path / "peers" / "peers.md").read_text()
    assert "Oracle bound: not available" in md and "| s2d @ 0.5 pts | 2.50x |" in md and "| — | — |" in md


@pytest.mark.parametrize("ratios", ["1,2", "2,x", "", "3,3", "-2"])
def test_bad_ratios_are_one_line(tmp_path, capsys, ratios):
    assert main(["bench", "peers", "--run-dir", str(tmp_path), "--ratios", ratios, "--threads", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("s2d: error: ") and "--ratios" in err[0]


def test_cli_without_a_conversion_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "s2d", "bench", "peers", "--run-dir", str(tmp_path), "--threads", "1",
                        "--peer-seconds", "5"], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("s2d: error: ") and "run s2d convert first" in lines[0]
    assert not (tmp_path / "peers").exists()
    assert main(["bench", "peers", "--run-dir", str(tmp_path), "--peer-seconds", "0", "--threads", "1"]) == 2
