"""Parallel candidate evaluation on Ray workers (``--workers``): the archive is the serial one, even after a
kill -9 of the driver mid-search and a rerun; and batched searchers log what one-at-a-time requests would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_convert import REPO, s2d

SEARCH = ["search", "--budget", "tiny", "--algo", "ppo", "--compare-random", "--val-size", "2000", "--threads", "1",
          "--quiet"]


def _archive(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def supernet_run(tmp_path_factory, tiny_run) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("workers") / "supernet"
    weights = str(tiny_run["model_pt"])
    r, _ = s2d("supernet", "--budget", "tiny", "--algo", "ppo", "--weights", weights, "--val-size", "2000",
               "--threads", "1", "--quiet", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    return run, weights


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("config.yaml", "state.json", "channel_order.json"):
        if (src / name).exists():
            (dst / name).write_text((src / name).read_text())
    (dst / "checkpoints").mkdir()
    (dst / "checkpoints" / "supernet.pt").write_bytes((src / "checkpoints" / "supernet.pt").read_bytes())
    return dst


def test_two_workers_write_the_serial_archive_even_after_kill(supernet_run, tmp_path):
    pytest.importorskip("ray")
    src, weights = supernet_run
    serial = _copy(src, tmp_path / "serial")
    r, _ = s2d(*SEARCH, "--weights", weights, "--run-dir", str(serial))
    assert r.returncode == 0, r.stderr

    par = _copy(src, tmp_path / "parallel")
    args = [*SEARCH, "--weights", weights, "--run-dir", str(par), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "s2d", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:  # kill the driver once the workers have scored a few archs
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (par / "archive.jsonl").exists() and len(_archive(par)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(_archive(par))
    r, _ = s2d(*args)
    assert r.returncode == 0, r.stderr

    want, got = _archive(serial), _archive(par)
    assert 3 <= killed_at < len(got)
    assert [g["key"] for g in got] == [w["key"] for w in want]  # none lost, none twice, in request order
    for g, w in zip(got, want, strict=True):
        assert g["reward"] == pytest.approx(w["reward"], abs=1e-9) and g["searcher"] == w["searcher"]
