"""``s2d exits``, ``s2d export`` and ``s2d eval --arch`` as a user runs them: in a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s2d.measure.cost import count_macs
from s2d.models import get_model

REPO = Path(__file__).resolve().parent.parent


def s2d(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "s2d", *args, "--threads", "1"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("s2d: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_arch(path: Path, stages: list[dict], thresholds: list[float] | None = None) -> Path:
    d: dict = {"stages": stages}
    if thresholds is not None:
        d["thresholds"] = thresholds
    path.write_text(json.dumps(d))
    return path


def test_exits_json():
    r = s2d("exits", "--model", "resnet20", "--weights", "none", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == "resnet20" and out["input"] == [1, 28, 28] and out["num_sections"] == 3
    rows = out["exits"]
    assert [e["exit"] for e in rows] == ["relu", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1",
                                         "layer2.2", "layer3.0", "layer3.1", "output"]
    macs = [e["cumulative_macs"] for e in rows]
    assert all(a < b for a, b in itertools.pairwise(macs))
    static = count_macs(get_model("resnet20", 10, 1).eval(), (torch.zeros(1, 1, 28, 28),)).total()
    assert static == 31_332_416
    assert macs[-1] == static
    # the stem alone: conv 1->16 at 28x28 and its batch norm (2 per element)
    assert macs[0] == 28 * 28 * 16 * 9 + 2 * 28 * 28 * 16
    assert [e["fraction_of_static"] for e in rows] == pytest.approx([m / static for m in macs])
    assert [e["channels"] for e in rows] == [16] * 4 + [32] * 3 + [64] * 3
    assert rows[4]["resolution"] == [14, 14] and rows[4]["section"] == 1


def test_exits_human_output():
    r = s2d("exits", "--model", "resnet20", "--weights", "none")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 11 and "exit" in lines[0]
    assert lines[-1].split()[0] == "output" and lines[-1].endswith("100.0%")


def test_doctor_reports_what_splits_and_what_stays_whole():
    """DenseNet splits every conv (its concatenations per segment); ShuffleNet keeps its shuffles whole and
    says where; both reproduce the static logits with the one-stage arch."""
    r = s2d("doctor", "--model", "torchvision:densenet121", "--json")
    assert r.returncode == 0, r.stderr
    dense = json.loads(r.stdout)
    assert dense["split_convs"] == dense["convs"] == 120 and not dense["whole_ops"] and not dense["depth_only"]
    assert dense["one_stage_error"] <= 1e-4 and dense["exits"][-1] == "output"
    r = s2d("doctor", "--model", "torchvision:shufflenet_v2_x0_5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "converts; one-stage arch reproduces the static logits" in lines[0] and "(relative, exact)" in lines[0]
    assert any(re.match(r"convs that split along channels: \d+ of 56", line) for line in lines)
    assert any("shuffle" in line or ("tensor method view" in line and "stage2" in line) for line in lines)


def test_exits_unsupported_model():
    """timm's VGG checks the map size in Python: torch.fx cannot trace it, and the error says so in one line."""
    pytest.importorskip("timm")
    one_line_error(s2d("exits", "--model", "timm:vgg11", "--weights", "none"), "cannot trace", "control flow")


def test_export_static_arch(tmp_path, tiny_run, fmnist):
    """The cheap variant: a one-stage arch needs no head fitting, calibration or BN recalibration."""
    arch = write_arch(tmp_path / "arch.json", [{"width": 1.0, "exit": "output"}])
    out = tmp_path / "export"
    r = s2d("export", "--weights", str(tiny_run["model_pt"]), "--arch", str(arch), "--format", "torchscript",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "exported 1 stages (torchscript)" in r.stdout and "same exit stage for 100.0 %" in r.stdout
    meta = json.loads((out / "dynamic.json").read_text())
    assert meta["stages"][0]["file"] == "stage1.pt" and (out / "stage1.pt").is_file()
    # the exported stage is the trained static model
    from s2d.data import Batches
    from s2d.models.zoo import load_model
    from s2d.transform.export import ExportedDynamicNet

    x = next(iter(Batches(fmnist.test.subset(32), fmnist.info, 32)))[0]
    model = load_model("resnet20", fmnist.info, str(tiny_run["model_pt"]))
    logits, exits = ExportedDynamicNet(out)(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), atol=1e-4, rtol=0)
    assert (exits == 0).all()


def test_export_two_stages_onnx(tmp_path, tiny_run):
    """The full path: BN recalibration, head fitting, thresholds from the file, ONNX export, check
    (about 25 s here, so not marked slow)."""
    arch = write_arch(tmp_path / "arch.json", [{"width": 0.5, "exit": "layer2.2", "reuse": True},
                                               {"width": 1.0, "exit": "output", "reuse": False}], [0.8])
    out = tmp_path / "export"
    r = s2d("export", "--weights", str(tiny_run["model_pt"]), "--arch", str(arch), "--format", "onnx",
            "--out", str(out), "--val-size", "500")
    assert r.returncode == 0, r.stderr
    assert "exported 2 stages (onnx)" in r.stdout
    m = re.search(r"max \|logit diff\| (\S+), same exit stage for (\S+) %", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 1e-4 and float(m.group(2)) == 100.0
    meta = json.loads((out / "dynamic.json").read_text())
    assert meta["arch"]["thresholds"] == [0.8]
    assert [s["file"] for s in meta["stages"]] == ["stage1.onnx", "stage2.onnx"]


def test_export_bad_arch(tmp_path, tiny_run):
    arch = write_arch(tmp_path / "arch.json", [{"width": 0.25, "exit": "layer1.2", "reuse": [True, False]},
                                               {"width": 1.0, "exit": "output"}])
    r = s2d("export", "--weights", str(tiny_run["model_pt"]), "--arch", str(arch), "--out", str(tmp_path / "o"))
    one_line_error(r, "stage 1", "reuse", "3 sections")
    assert not (tmp_path / "o").exists()


def test_eval_bad_arch(tmp_path):
    arch = write_arch(tmp_path / "arch.json", [{"width": 0.3, "exit": "layer1.2"},
                                               {"width": 1.0, "exit": "output"}])
    r = s2d("eval", "--model", "resnet20", "--weights", "none", "--arch", str(arch), "--limit", "8",
            "--repeats", "1", "--val-size", "500")
    one_line_error(r, "stage 1", "width", "0.3", "grid")
    arch.write_text('{"stages": [{"width": 0.5, "exit": "layer9.9"}, {"width": 1.0, "exit": "output"}]}')
    r = s2d("eval", "--model", "resnet20", "--weights", "none", "--arch", str(arch), "--limit", "8",
            "--repeats", "1", "--val-size", "500")
    one_line_error(r, "stage 1", "exit", "'layer9.9'")


def test_eval_threshold_outside_the_rule_range_is_refused(tmp_path):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({"stages": [{"width": 0.5, "exit": "layer1.2"}, {"width": 1.0, "exit": "output"}],
                                "exit_rule": "max_softmax", "thresholds": [1.7]}))
    r = s2d("eval", "--model", "resnet20", "--weights", "none", "--arch", str(arch), "--limit", "8",
            "--repeats", "1", "--val-size", "500")
    one_line_error(r, "max_softmax", "1.7", "[0, 1]")


def test_eval_of_the_static_arch_is_a_speed_tie(tmp_path, tiny_run):
    """The one-stage full-width arch is the static network: its paired speed ratios are ~1, where
    two separately timed loops used to report a 1.86x throughput 'gain' for the same network."""
    arch = write_arch(tmp_path / "arch.json", [{"width": 1.0, "exit": "output"}])
    r = s2d("eval", "--weights", str(tiny_run["model_pt"]), "--arch", str(arch), "--limit", "256",
            "--repeats", "20", "--val-size", "1000", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["dynamic"]
    assert d["exit_rates"] == [1.0] and d["mac_ratio"] == pytest.approx(1.0, rel=1e-6)
    # within 1.4x either way: beside the other test worker on 2 cores a fresh clone's CI measured 0.80 (stop 46);
    # the separately timed loops this guards against reported 1.86
    assert 1 / 1.4 <= d["throughput_ratio"] <= 1.4, d["throughput_ratio"]
    assert 1 / 1.4 <= d["latency_ratio"] <= 1.4, d["latency_ratio"]
