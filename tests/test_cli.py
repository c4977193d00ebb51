"""The ``s2d`` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def s2d(*args: str, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "s2d", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("s2d: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_help_lists_the_commands():
    r = s2d("--help")
    assert r.returncode == 0
    for cmd in ("train-base", "zoo", "eval"):
        assert cmd in r.stdout
    r = s2d("eval", "--help")
    assert r.returncode == 0 and "--weights" in r.stdout and "--json" in r.stdout
    r = s2d("--version")
    assert r.returncode == 0 and r.stdout.startswith("s2d ")


def test_zoo_json_parses():
    r = s2d("zoo", "--json")
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    assert isinstance(entries, list)
    for e in entries:
        assert {"name", "dataset", "test_accuracy", "macs", "params"} <= set(e)
    r = s2d("zoo")
    assert r.returncode == 0 and r.stdout.strip()


def test_unknown_model():
    line = assert_one_line_error(s2d("eval", "--model", "resnet21", "--threads", "1"), "'resnet21'")
    for name in ("resnet20", "mobilenetv2", "torchvision:NAME"):
        assert name in line


def test_unknown_dataset():
    line = assert_one_line_error(s2d("eval", "--dataset", "mnist", "--threads", "1"), "'mnist'")
    assert "fashion-mnist" in line and "imagefolder:PATH" in line


def test_missing_dataset(tmp_path):
    assert_one_line_error(s2d("eval", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--threads", "1"),
                          "cifar10 not found", str(tmp_path))


def _eval_without_data(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import pathlib, sys
        import s2d.data
        s2d.data.DEBIAN_FASHION_MNIST = pathlib.Path({str(tmp_path / 'debian')!r})
        from s2d.cli import main
        sys.exit(main(["eval", *{list(flags)!r}, "--threads", "1"]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "S2D_DATA": str(tmp_path / "env"), "S2D_CACHE": str(tmp_path / "c")}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


def test_missing_fashion_mnist(tmp_path):
    """No Debian package either: the one-line message names every path tried and the fix."""
    r = _eval_without_data(tmp_path)
    assert_one_line_error(r, str(tmp_path / "env"), str(tmp_path / "debian"),
                          "apt-get install -y dataset-fashion-mnist")


def test_explicit_data_dir_is_refused_not_replaced(tmp_path):
    """--data-dir that does not hold the data: one line naming that folder, no fallback."""
    r = _eval_without_data(tmp_path, "--data-dir", str(tmp_path / "nonexistent"))
    line = assert_one_line_error(r, str(tmp_path / "nonexistent"), "train-images-idx3-ubyte")
    assert str(tmp_path / "env") not in line


def test_corrupt_weights(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 this is not a checkpoint")
    assert_one_line_error(s2d("eval", "--weights", str(bad), "--threads", "1"), "corrupt or truncated", str(bad))
    assert bad.read_bytes() == b"\x80\x02 this is not a checkpoint"
    assert_one_line_error(s2d("eval", "--weights", str(tmp_path / "nope.pt"), "--threads", "1"), "does not exist")


def test_train_base_rejects_zero_epochs():
    r = s2d("train-base", "--epochs", "0")
    assert r.returncode == 2
    assert "--epochs" in r.stderr and "must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    r = s2d("train-base", "--epochs", "1", "--train-limit", "64", "--val-size", "500", "--threads", "1",
            "--run-dir", str(blocker / "run"))
    assert_one_line_error(r, "not writable", str(blocker / "run"))
    assert blocker.read_text() == "keep me"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A real (tiny) `s2d train-base` through the CLI."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    r = s2d("train-base", "--model", "resnet20", "--train-limit", "256", "--epochs", "1", "--val-size", "500",
            "--threads", "1", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "trained resnet20: val accuracy" in r.stdout
    return run_dir


def test_train_base_writes_checkpoints_and_tensorboard(cli_run):
    assert (cli_run / "checkpoints" / "model.pt").is_file()
    assert (cli_run / "checkpoints" / "last.pt").is_file()
    assert list((cli_run / "tensorboard").glob("events.out.tfevents.*"))
    cfg = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert (cfg["command"], cfg["model"], cfg["epochs"], cfg["val_size"], cfg["train_limit"]) == (
        "train-base", "resnet20", 1, 500, 256)
    assert cfg["split_seed"] == 0  # the validation split is recorded
    # Running the same command again resumes: the run is finished, so nothing is retrained.
    before = (cli_run / "checkpoints" / "model.pt").read_bytes()
    r = s2d("train-base", "--model", "resnet20", "--train-limit", "256", "--epochs", "1", "--val-size", "500",
            "--threads", "1", "--run-dir", str(cli_run), "--quiet")
    assert r.returncode == 0, r.stderr
    assert (cli_run / "checkpoints" / "model.pt").read_bytes() == before
    # The same run dir with another model is refused.
    r = s2d("train-base", "--model", "resnet32", "--train-limit", "256", "--epochs", "1", "--val-size", "500",
            "--threads", "1", "--run-dir", str(cli_run))
    assert_one_line_error(r, "holds a different run", "resnet32")


def test_eval_json_has_stable_keys(cli_run):
    weights = cli_run / "checkpoints" / "model.pt"
    r = s2d("eval", "--weights", str(weights), "--limit", "200", "--repeats", "3", "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("test_accuracy", "macs", "params", "latency_ms_batch1", "throughput_img_s_batch256"):
        assert key in out, key
    assert out["test_images"] == 200
    assert 0.0 <= out["test_accuracy"] <= 1.0
    assert out["test_accuracy"] * 200 == pytest.approx(round(out["test_accuracy"] * 200), abs=1e-3)
    assert out["macs"] == 31_332_416  # fvcore, ResNet-20 on 1x28x28
    assert out["params"] == 272_186
    assert out["latency_ms_batch1"] > 0 and out["throughput_img_s_batch256"] > 0
    assert out["threads"] == 1
    assert (out["model"], out["dataset"], out["weights"]) == ("resnet20", "fashion-mnist", str(weights))


def test_eval_human_output(cli_run):
    weights = cli_run / "checkpoints" / "model.pt"
    r = s2d("eval", "--weights", str(weights), "--limit", "100", "--repeats", "3", "--threads", "1")
    assert r.returncode == 0, r.stderr
    for label in ("test acc", "MACs", "31.33 M", "latency", "throughput", "(100 images)"):
        assert label in r.stdout, label


def test_eval_with_a_checkpoint_of_another_model(cli_run):
    weights = cli_run / "checkpoints" / "model.pt"
    assert_one_line_error(s2d("eval", "--model", "mobilenetv2", "--weights", str(weights), "--threads", "1"),
                          "'resnet20'", "--model resnet20")
