"""``s2d convert`` end to end on the tiny budget, as a user runs it: in a subprocess.

One conversion (module fixture, ~45-60 s here on one thread, most of it the report's
speed measurements) serves every test of the file; the flag errors run on their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from s2d import checkpoint
from s2d.models import get_model
from s2d.pipeline.convert import BUDGETS
from s2d.runs import PhaseClock
from s2d.transform.arch import MultiStageArch
from s2d.transform.graph import analyze
from s2d.transform.supernet import is_dynamic_checkpoint

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def s2d(*args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "s2d", *args], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return r, time.perf_counter() - t0


def convert_args(weights: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["convert", "--budget", "tiny", "--weights", str(weights), "--val-size", "2000", "--threads", "1",
            "--quiet", "--run-dir", str(run_dir), *extra]


def assert_one_line_error(r: subprocess.CompletedProcess, prefix: str, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(prefix), errors[0]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_run) -> dict:
    run_dir = tmp_path_factory.mktemp("convert") / "run"
    # the tiny static model is weak (~35 %) and its 2-step fine-tunes weaker: a wide tolerance lets the
    # searched network be certified, so this run takes the normal path (the fallback has its own test)
    args = convert_args(tiny_run["model_pt"], run_dir, "--tolerance", "50")
    r, seconds = s2d(*args)
    print(f"\ntiny convert took {seconds:.1f} s")
    return {"r": r, "seconds": seconds, "dir": run_dir, "weights": tiny_run["model_pt"], "args": args}


def test_convert_end_to_end(converted):
    r, run = converted["r"], converted["dir"]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip() == "", r.stderr  # --quiet: nothing on stderr
    assert "summary: test accuracy" in r.stdout and "dynamic.pt" in r.stdout

    graph = analyze(get_model("resnet20", 10, 1), (1, 28, 28))
    best = MultiStageArch.from_dict(json.loads((run / "best_arch.json").read_text())).validate(graph)
    assert 2 <= best.num_stages <= 4 and len(best.thresholds) == best.num_stages - 1

    ckpt = checkpoint.load(run / "checkpoints" / "dynamic.pt")
    assert is_dynamic_checkpoint(ckpt) and ckpt["model"] == "resnet20"
    assert MultiStageArch.from_dict(ckpt["arch"]) == best

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["command"] == "convert" and cfg["budget"] == "tiny" and cfg["weights"] == str(converted["weights"])

    report = json.loads((run / "report.json").read_text())
    assert {"static", "dynamic", "rows", "search"} <= set(report)
    names = [row["name"] for row in report["rows"]]
    assert names == ["static (supernet)", "depth_only (supernet)", "width_only (supernet)", "searched (supernet)",
                     "searched + fine-tuned"]
    static = report["static"]
    assert static["test_images"] == 300 and static["macs"] == 31_332_416
    for row in report["rows"]:
        assert sum(row["exit_rates"]) == pytest.approx(1.0)
        assert row["mac_ratio"] == pytest.approx(row["average_macs"] / static["macs"])
        assert row["accuracy_delta_points"] == pytest.approx((row["test_accuracy"] - static["test_accuracy"]) * 100)
        reach = [1 - sum(row["exit_rates"][:s]) for s in range(len(row["exit_rates"]))]
        assert row["average_macs"] == pytest.approx(sum(p * m for p, m in zip(reach, row["stage_macs"],
                                                                                strict=True)))
        assert row["latency_ms_batch1"] > 0 and row["throughput_img_s_batch256"] > 0
        # timed together with every other row, in the budget's rounds, with the range over them
        assert row["timing_rounds"] == BUDGETS["tiny"].speed_rounds
        assert row["throughput_ratio_range"][0] <= row["throughput_ratio"] <= row["throughput_ratio_range"][1]
    by_name = dict(zip(names, report["rows"], strict=True))
    # the one-stage row is the full network (with the supernet's weights): the static MACs, no exits
    assert by_name["static (supernet)"]["mac_ratio"] == pytest.approx(1.0)
    assert by_name["static (supernet)"]["exit_rates"] == [1.0]
    assert [s["width"] for s in by_name["depth_only (supernet)"]["arch"]["stages"]] == [1.0, 1.0, 1.0]
    assert {s["exit"] for s in by_name["width_only (supernet)"]["arch"]["stages"]} == {"output"}
    assert report["dynamic"] == by_name["searched + fine-tuned"]
    assert report["dynamic"]["arch"] == best.to_dict()
    assert set(report["search"]) == {"ppo", "random"}
    assert all(s["evaluations"] == 4 for s in report["search"].values())

    points = report["operating_points"]
    assert [o["tolerance_points"] for o in points] == [0.1, 0.2, 0.5, 1.0]
    for o in points:  # certified on the calibration split, or nothing passes; in-sample figures beside them
        assert o["static_fallback"] == (o["certificate"] is None or o["mac_ratio"] == 1.0)
        if not o["static_fallback"]:
            assert sum(o["exit_rates"]) == pytest.approx(1.0)
            assert o["certificate"]["bound_points"] <= o["tolerance_points"] + 1e-9
        assert sum(o["in_sample_exit_rates"]) == pytest.approx(1.0)
    cert = report["dynamic"]["certificate"]
    assert cert["tolerance_points"] == 50 and cert["bound_points"] <= 50 and cert["calib_images"] == 1200
    assert report["calib_images"] == 1200 and not report["fallback"]
    budget = report["budget_points"]  # static pruning's ratios, each with the speed its MACs buy
    assert [round(1 / b["target_mac_ratio"]) for b in budget] == [2, 3, 4]
    for b in budget:
        assert sum(b["exit_rates"]) == pytest.approx(1.0)
        assert b["latency_ratio"] > 0 and b["throughput_ratio"] > 0 and b["static_throughput_img_s_batch256"] > 0
        assert b["timing_rounds"] == BUDGETS["tiny"].speed_rounds
    assert "| 4x |" in (run / "report.md").read_text()

    md = (run / "report.md").read_text()
    assert md.startswith("# s2d conversion: resnet20 on fashion-mnist (budget tiny, search ppo)")
    assert all(f"| {n} |" in md for n in names) and "| ppo | 4 |" in md and "| random | 4 |" in md

    assert (run / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    archive = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines()]
    seeds = [a for a in archive if a["searcher"] == "seed"]  # 7 pruned widths, their cascades, 2 depth-only
    sweep = [a for a in archive if a["searcher"] == "sweep"]  # the tiny budget's: every 2-stage full-width arch
    assert len(seeds) == 2 * 7 + 2 and {a["searcher"] for a in archive} <= {"ppo", "random", "seed", "sweep"}
    assert len(sweep) == 9 and all(len(a["arch"]["stages"]) == 2 for a in sweep)
    assert 4 <= len(archive) - len(seeds) - len(sweep) <= 8
    for sub in ("supernet", "search_ppo", "search_random", "finetune"):
        assert list((run / "tensorboard" / sub).glob("events.out.tfevents.*")), sub
    for name in ("supernet.pt", "finetune.pt", "ppo.zip", "dynamic.pt"):
        assert (run / "checkpoints" / name).is_file(), name
    state = json.loads((run / "state.json").read_text())
    assert set(state) == {"supernet", "search", "race", "finetune", "report"}
    assert all(state[p]["seconds"] > 0 for p in state)  # each phase records its wall clock (bench peers reads it)
    # the fine-tune raced the search's best two training archs and went on with the better one, from its checkpoint
    race = state["race"]
    assert race["steps"] == BUDGETS["tiny"].race_steps and len(race["scores"]) == len(state["search"]["race"]) == 2
    assert state["search"]["race"][0] == state["search"]["best"]["arch"]
    assert race["winner"] == max(range(2), key=lambda i: (race["scores"][i]["reward"], -i))
    assert MultiStageArch.from_dict(race["arch"]).stages == best.stages
    assert race["arch"]["thresholds"] == []  # each raced arch is scored at thresholds calibrated for it, now
    assert not list((run / "checkpoints").glob("race-*.pt"))
    tiny = BUDGETS["tiny"]
    assert checkpoint.load(run / "checkpoints" / "finetune.pt")["step"] == (tiny.narrow_finetune_steps
                                                                            or tiny.finetune_steps)
    assert "## Fine-tune race" in md and "(fine-tuned on)" in md and report["race"] == race


def test_convert_again_is_quick_and_changes_nothing(converted):
    assert converted["r"].returncode == 0
    run = converted["dir"]
    files = ("archive.jsonl", "search_ppo.jsonl", "search_random.jsonl", "report.json", "best_arch.json",
             "checkpoints/dynamic.pt", "checkpoints/supernet.pt", "checkpoints/finetune.pt")
    before = {f: (run / f).read_bytes() for f in files}
    r, seconds = s2d(*converted["args"])
    assert r.returncode == 0, r.stderr
    print(f"\nsecond tiny convert took {seconds:.1f} s (first {converted['seconds']:.1f} s)")
    assert {f: (run / f).read_bytes() for f in files} == before
    assert "summary: test accuracy" in r.stdout
    assert seconds < 0.5 * converted["seconds"]  # loads, checks and prints; measures nothing again


def test_export_the_converted_network(converted, tmp_path):
    assert converted["r"].returncode == 0
    run = converted["dir"]
    out = tmp_path / "onnx"
    r, _ = s2d("export", "--weights", str(run / "checkpoints" / "dynamic.pt"), "--out", str(out), "--format", "onnx",
               "--threads", "1", "--speed", "--latency-images", "16")
    assert r.returncode == 0, r.stderr
    speed = json.loads((out / "speed.json").read_text())  # where users deploy, paired with the static export
    assert speed["threads"] == 1 and set(speed) == {"threads", "pytorch", "onnxruntime"}
    for runtime in ("pytorch", "onnxruntime"):
        f = speed[runtime]
        assert f["latency_ms_batch1"] > 0 and f["static_throughput_img_s_batch256"] > 0
        assert f"{runtime} | " in r.stdout
    static_meta = json.loads((out / "static" / "dynamic.json").read_text())
    assert len(static_meta["stages"]) == 1 and static_meta["arch"]["stages"][0]["width"] == 1.0
    best = json.loads((run / "best_arch.json").read_text())
    n = len(best["stages"])
    assert f"exported {n} stages (onnx)" in r.stdout
    m = re.search(r"max \|logit diff\| (\S+), same exit stage for (\S+) %", r.stdout)
    assert m and float(m.group(1)) <= 1e-4 and float(m.group(2)) == 100.0, r.stdout
    meta = json.loads((out / "dynamic.json").read_text())
    assert meta["arch"]["thresholds"] == best["thresholds"]
    assert [s["file"] for s in meta["stages"]] == [f"stage{i}.onnx" for i in range(1, n + 1)]


def test_latency_table_against_measured_time(converted, tmp_path, monkeypatch):
    """``s2d bench latency`` on a copy of the run: archive archs timed end to end beside the table's predictions;
    the table is kept in the run, and its stage times in the machine's store for the next run of the model."""
    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))  # an empty store: nothing another test timed
    run = tmp_path / "run"
    shutil.copytree(converted["dir"], run)
    r, _ = s2d("bench", "latency", "--run-dir", str(run), "--archs", "2", "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "bench_latency" / "latency.json").read_text())
    assert res["archs"] == 2 and res["stages_measured"] == res["table_entries"] > 0
    assert res["b1_images"] == BUDGETS["tiny"].latency_images // 2
    for row in res["rows"]:
        assert row["measured_b1"] > 0 and row["predicted_b1"] > 0 and row["measured_large"] > 0
        assert row["error_large"] == pytest.approx(row["predicted_large"] / row["measured_large"] - 1)
        assert sum(row["exit_rates_large"]) == pytest.approx(1.0)
    assert "Median |error|" in r.stdout
    table = json.loads((run / "latency_table.json").read_text())  # kept: see test_latency for its reuse
    assert table["machine"]["threads"] == 1 and len(table["stages"]) == res["table_entries"]
    again = tmp_path / "again"  # another run of the same network on this machine: its stages are not timed again
    shutil.copytree(converted["dir"], again)
    r, _ = s2d("bench", "latency", "--run-dir", str(again), "--archs", "2", "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    second = json.loads((again / "bench_latency" / "latency.json").read_text())
    assert (second["stages_measured"], second["stages_from_store"]) == (0, res["table_entries"])
    assert second["static_ms"] == res["static_ms"]


def test_a_run_dir_holding_a_different_run_is_refused(converted):
    assert converted["r"].returncode == 0
    run = converted["dir"]
    config = (run / "config.yaml").read_bytes()
    archive = (run / "archive.jsonl").read_bytes()
    r, _ = s2d(*convert_args(converted["weights"], run, "--model", "resnet32"))
    assert_one_line_error(r, "s2d: error: ", "holds a different run", "model", "resnet32")
    r, _ = s2d(*convert_args(converted["weights"], run, "--tolerance", "1.0"))
    assert_one_line_error(r, "s2d: error: ", "holds a different run", "tolerance")
    assert (run / "config.yaml").read_bytes() == config
    assert (run / "archive.jsonl").read_bytes() == archive


@pytest.mark.parametrize(("flags", "prefix", "needles"), [
    (["--budget", "nope"], "s2d convert: error: ", ["--budget", "nope"]),
    (["--algo", "annealing"], "s2d convert: error: ", ["--algo"]),
    (["--tolerance", "-1"], "s2d convert: error: ", ["--tolerance", "-1", "[0, 100]"]),
    (["--tolerance", "nan"], "s2d convert: error: ", ["--tolerance", "nan"]),
    (["--max-stages", "7"], "s2d convert: error: ", ["--max-stages", "7"]),
    (["--importance", "random"], "s2d convert: error: ", ["--importance", "random"]),
    (["--device", "tpu"], "s2d: error: ", ["--device"]),
    (["--confidence", "1.5"], "s2d convert: error: ", ["--confidence", "1.5"]),
    (["--calib-size", "5000"], "s2d: error: ", ["--calib-size 5000", "5000 held-out"]),
    # 3000 calibration images cannot certify 0.1 points at 90 % confidence: said, not pretended
    (["--tolerance", "0.1"], "s2d: error: ", ["calibration split (3000 images)", "0.1-point", "--calib-size 3907"]),
    (["--target-macs", "1e12"], "s2d: error: ", ["--target-macs 1e+12", "3.133e+07", "for 4x fewer"]),
    (["--target-macs", "8e6", "--target-mac-ratio", "0.3"], "s2d: error: ", ["give one budget"]),
    (["--target-macs", "-5"], "s2d convert: error: ", ["--target-macs"]),
    (["--cost", "joules"], "s2d convert: error: ", ["--cost", "joules"]),
    (["--cost", "latency", "--workers", "2"], "s2d: error: ", ["--cost latency", "--workers 1"]),
])
def test_bad_flags(tmp_path, capsys, flags, prefix, needles):
    """In this process (a subprocess per flag spent two minutes importing torch): ``main`` is what the console
    script runs, and the process-level one-line behaviour is checked by the subprocess tests around."""
    from s2d.cli import main

    run = tmp_path / "run"
    argv = ["convert", "--budget", "tiny", "--weights", "none", "--run-dir", str(run), "--quiet", *flags]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out, err = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(argv, code, out, err), prefix, *needles)
    assert not (run / "config.yaml").exists()  # refused before the run directory is written


def test_search_without_a_supernet_says_what_to_run(tmp_path):
    r, _ = s2d("search", "--budget", "tiny", "--weights", "none", "--run-dir", str(tmp_path / "run"), "--quiet",
               "--threads", "1")
    assert_one_line_error(r, "s2d: error: ", "no trained supernet", "s2d supernet")


@pytest.mark.slow
def test_interrupted_convert_resumes(tmp_path, tiny_run):
    """Kill the conversion during the search and run it again: it completes, and the search
    picks up where the archive left off (the supernet is not trained again)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "s2d", *convert_args(tiny_run["model_pt"], run)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    archive = run / "archive.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if archive.exists() and len(archive.read_text().splitlines()) >= 2:
            proc.send_signal(2)  # Ctrl-C
            break
        time.sleep(0.05)
    proc.wait(timeout=120)
    assert proc.returncode == 130, proc.stderr.read()
    assert "run the same command again to resume" in proc.stderr.read()
    supernet = (run / "checkpoints" / "supernet.pt").read_bytes()
    kept = archive.read_text()
    r, _ = s2d(*convert_args(tiny_run["model_pt"], run))
    assert r.returncode == 0, r.stderr
    assert archive.read_text().startswith(kept)
    assert (run / "checkpoints" / "supernet.pt").read_bytes() == supernet
    assert json.loads((run / "report.json").read_text())["search"]["ppo"]["evaluations"] == 4


def _state(run: Path) -> dict:
    try:
        return json.loads((run / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _archive_lines(run: Path) -> list[str]:
    path = run / "archive.jsonl"
    return path.read_text().splitlines() if path.exists() else []


# phase -> (when to SIGKILL, judged on the run directory while the process runs)
KILL_POINTS = {
    "supernet": lambda run: (run / "checkpoints" / "supernet.pt").exists() and "supernet" not in _state(run),
    "search": lambda run: len(_archive_lines(run)) >= 2 and "search" not in _state(run),
    "race": lambda run: any((run / "checkpoints").glob("race-*.pt")) and "race" not in _state(run),
    "finetune": lambda run: "search" in _state(run) and "finetune" not in _state(run),
    "report": lambda run: "finetune" in _state(run) and "report" not in _state(run),
}


def _kill_and_resume(phase: str, tmp_path: Path, weights: Path) -> None:
    """SIGKILL ``s2d convert`` inside ``phase``, run the same command again: it finishes, keeps every
    archive line written before the kill, evaluates no arch twice, and writes the report."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the converted fixture's tolerance: its search chooses a narrow arch, so the run has a race to kill (at the
    # default 0.5 points a full-width arch of the sweep wins on this weak model, and nothing trains after the search)
    args = convert_args(weights, run, "--tolerance", "50")
    proc = subprocess.Popen([sys.executable, "-m", "s2d", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_at = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        if KILL_POINTS[phase](run):
            proc.kill()
            killed_at = dict(_state(run))
            clock_at = PhaseClock(run / "clock.json").recorded()
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert killed_at is not None, f"the run ended before reaching {phase}"
    assert proc.returncode == -9
    kept = _archive_lines(run)
    r, _ = s2d(*args)
    assert r.returncode == 0, r.stderr
    lines = _archive_lines(run)
    assert lines[: len(kept)] == kept or (kept and lines[: len(kept) - 1] == kept[:-1])  # a torn last line may go
    keys = [json.loads(line)["key"] for line in lines if line.startswith("{") and line.endswith("}")]
    assert len(keys) == len(set(keys)), "an arch was evaluated twice"
    assert set(_state(run)) == {"supernet", "search", "race", "finetune", "report"}
    assert not list((run / "checkpoints").glob("race-*.pt"))
    report = json.loads((run / "report.json").read_text())
    assert report["search"]["ppo"]["evaluations"] == 4 and (run / "report.md").exists()
    timed = "finetune" if phase == "race" else phase  # the killed process's seconds count in its phase's clock
    assert _state(run)[timed]["seconds"] >= clock_at.get(timed, 0.0)  # (what bench peers gives the pruners)


@pytest.mark.slow
def test_killed_search_resumes(tmp_path, tiny_run):
    """SIGKILL during the search of a conversion (CI kills a search in tests/test_workers.py, with workers)."""
    _kill_and_resume("search", tmp_path, tiny_run["model_pt"])


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["supernet", "race", "finetune", "report"])
def test_killed_phase_resumes(phase, tmp_path, tiny_run):
    _kill_and_resume(phase, tmp_path, tiny_run["model_pt"])


def test_dynamic_checkpoint_rebuilds_the_reported_network(converted, fmnist):
    """dynamic.pt holds the chosen arch's own batch-norm statistics: rebuilt from it alone, the
    network scores exactly what the report measured, with the same exit rates."""
    import torch

    from s2d.data import Batches
    from s2d.transform.supernet import SuperNet

    run = converted["dir"]
    ckpt = checkpoint.load(run / "checkpoints" / "dynamic.pt")
    assert ckpt["head_hidden"] == 256  # --exit-head mlp, the default: full-width heads have a hidden layer
    sn = SuperNet(get_model("resnet20", 10, 1), (1, 28, 28), 10, head_hidden=ckpt["head_hidden"])
    checkpoint.load_into(sn, ckpt["state_dict"], "dynamic.pt")
    net = sn.materialise(MultiStageArch.from_dict(ckpt["arch"]))
    preds, exits = [], []
    with torch.no_grad():
        for x, _ in Batches(fmnist.test.subset(300), fmnist.info, 100):
            p, e = net(x)
            preds.append(p.argmax(1))
            exits.append(e)
    pred, ex = torch.cat(preds), torch.cat(exits)
    report = json.loads((run / "report.json").read_text())["dynamic"]
    assert (pred == fmnist.test.labels[:300]).double().mean().item() == pytest.approx(report["test_accuracy"], abs=1e-9)
    rates = [(ex == s).double().mean().item() for s in range(len(report["exit_rates"]))]
    assert rates == pytest.approx(report["exit_rates"], abs=1e-9)


def test_restore_static_gives_full_width_archs_the_static_network():
    """After supernet training has moved the shared weights and batch-norm buffers, a full-width
    arch fine-tuned 'heads only' must compute the static model again, statistics included."""
    import copy

    import torch

    from s2d.transform.supernet import SuperNet

    torch.manual_seed(0)
    static = get_model("resnet20", 10, 1).eval()
    sn = SuperNet(copy.deepcopy(static), (1, 28, 28), 10)
    sn.use_arch_statistics(lambda: iter([(torch.randn(8, 1, 28, 28), None)]), num_batches=1)
    with torch.no_grad():
        for p in sn.static.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sn.train()
    narrow = MultiStageArch.from_dict({"stages": [{"width": 0.5, "exit": "layer2.2", "reuse": True},
                                                  {"width": 1.0, "exit": "output", "reuse": True}]})
    sn.forward_stages(torch.randn(8, 1, 28, 28), narrow)  # a training step's forward: moves the BN buffers
    arch = MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": "layer1.2", "reuse": True},
                                                {"width": 1.0, "exit": "output", "reuse": True}]})
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert (sn.eval().forward_stages(x, arch)[-1] - static(x)).abs().max() > 1e-2  # moved
        sn.restore_static(static)
        torch.testing.assert_close(sn.eval().forward_stages(x, arch)[-1], static(x), atol=1e-5, rtol=1e-5)
        logits, _ = sn.materialise(arch.with_thresholds([1.01]))(x)
        torch.testing.assert_close(logits, static(x), atol=1e-4, rtol=1e-4)


def test_no_arch_within_tolerance_ships_the_static_network(tmp_path, tiny_run, capsys, nothing_meets_the_target,
                                                           quick_timing):
    """The user's case from the issue: the search finds nothing within tolerance. The conversion must
    not ship its best-reward arch anyway (42 % at 1.00x MACs there): it ships the static network,
    says so in one line on stderr and in the report, and exits 0."""
    from s2d.cli import main

    run = tmp_path / "run"
    assert main(convert_args(tiny_run["model_pt"], run)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("s2d: no searched arch kept the 0.5-point tolerance"), err

    report = json.loads((run / "report.json").read_text())
    assert report["fallback"] and "**Fallback:**" in (run / "report.md").read_text()
    shipped = report["dynamic"]
    assert shipped["certificate"]["bound_points"] <= 0.5  # it keeps the promise on the calibration split
    depth = next(r for r in report["rows"] if r["name"] == "depth_only (supernet)")
    if depth["certificate"] is not None and depth["mac_ratio"] < 1:  # the cheaper network that keeps it
        assert shipped["name"] == "shipped: depth-only exits on the static network (fallback)"
        assert shipped["arch"]["stages"] == depth["arch"]["stages"]
        assert shipped["test_accuracy"] == pytest.approx(depth["test_accuracy"], abs=1e-9)
    else:
        assert shipped["name"] == "shipped: static network (fallback)"
        assert shipped["arch"]["stages"] == [{"width": 1.0, "exit": "output", "reuse": True}]
        assert shipped["test_accuracy"] == pytest.approx(report["static"]["test_accuracy"], abs=1e-6)
    assert shipped["name"].removeprefix("shipped: ").removesuffix(" (fallback)") in err[0]
    ckpt = checkpoint.load(run / "checkpoints" / "dynamic.pt")
    assert MultiStageArch.from_dict(ckpt["arch"]).stages == MultiStageArch.from_dict(shipped["arch"]).stages


@pytest.mark.slow  # a whole tiny conversion (~2 min) for one report decision
def test_a_cascade_that_saves_nothing_is_not_shipped(tmp_path, tiny_run, monkeypatch, capsys, quick_timing):
    """A cascade certified only with thresholds that exit nobody runs its narrow stage and then the whole
    static network: more MACs than the static model for the same predictions. The static network ships."""
    import s2d.pipeline.convert as convert
    import s2d.pipeline.report as report_mod
    from s2d.cli import main

    cascade = {"stages": [{"width": 0.25, "exit": "output"}, {"width": 1.0, "exit": "output", "recompute": True}],
               "exit_rule": "max_softmax", "thresholds": []}
    monkeypatch.setattr(convert, "choose_arch", lambda records, must_meet=True, images=None: {"arch": cascade})
    monkeypatch.setattr(convert, "race_candidates", lambda records, best, k, must_meet=True: [best])
    certify = report_mod.certify
    monkeypatch.setattr(report_mod, "certify", lambda seq, *a, **k: certify(seq[:1], *a, **k))  # exit nobody
    run = tmp_path / "run"
    assert main(convert_args(tiny_run["model_pt"], run)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "save no MACs" in err[0] and "shipped: static network" in err[0], err
    report = json.loads((run / "report.json").read_text())
    assert report["dynamic"]["name"] == "shipped: static network (fallback)"
    assert report["dynamic"]["mac_ratio"] == pytest.approx(1.0)
    assert json.loads((run / "best_arch.json").read_text())["stages"] == [
        {"width": 1.0, "exit": "output", "reuse": True}]
    static_acc = report["static"]["test_accuracy"]
    for o in report["operating_points"]:  # at every tolerance the answer is the static network, not a costlier one
        assert o["static_fallback"] and o["mac_ratio"] == 1.0 and o["test_accuracy"] == static_acc
        assert o["accuracy_delta_points"] == 0.0 and o["exit_rates"] is None
    assert "| 0.1 | " in (run / "report.md").read_text() and "| static network |" in (run / "report.md").read_text()


@pytest.mark.slow
def test_latency_budget_end_to_end(tmp_path, tiny_run):
    run = tmp_path / "run"
    r, _ = s2d(*convert_args(tiny_run["model_pt"], run, "--target-latency-ms", "2.5"))
    assert r.returncode == 0, r.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["target_latency_ms"] == 2.5 and report["target_mac_ratio"] is None
    plan = json.loads((run / "state.json").read_text())["latency_plan"]
    assert plan["static_latency_ms"] > 0 and plan["ratio"] == pytest.approx(min(1, 2.5 / plan["static_latency_ms"]))
    assert "Latency budget" in (run / "report.md").read_text()
