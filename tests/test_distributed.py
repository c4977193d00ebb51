"""Data-parallel training (torchrun + DDP, gloo on CPU): the world from the environment, device and backend
choice, batch sharding, and 2-process supernet training against 1 process, with kill -9 and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s2d import distributed
from s2d.data import Batches, Dataset
from s2d.distributed import World
from s2d.errors import S2DError

SCRIPT = Path(__file__).with_name("ddp_supernet.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"]


def test_world_from_torchrun_environment():
    assert distributed.from_environment({}) == World(0, 1, 0)
    w = distributed.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.is_main, w.distributed, w.shard()) == (3, 4, 1, False, True, (3, 4))
    with pytest.raises(S2DError, match="outside WORLD_SIZE"):
        distributed.from_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_backend_and_device_per_rank():
    """nccl and one GPU per local rank on CUDA, gloo on CPU; a single process keeps the device it was given."""
    two = World(1, 2, 1)
    assert distributed.backend_for("cuda") == "nccl" and distributed.backend_for("cpu") == "gloo"
    assert distributed.device_for("cuda", two) == "cuda:1" and distributed.device_for("cpu", two) == "cpu"
    assert distributed.device_for("cuda:1", World()) == "cuda:1"
    with pytest.raises(S2DError, match="--device cuda"):
        distributed.device_for("cuda:0", two)


def test_shards_partition_every_global_batch(quick_data: Dataset):
    """Rank r gets rows r, r + n, ... of exactly the batch one process would see, augmentation included."""
    split, info = quick_data.train.subset(100), quick_data.info
    whole = list(Batches(split, info, 32, shuffle=True, augment=True, seed=5))
    shards = [list(Batches(split, info, 32, shuffle=True, augment=True, seed=5, shard=(r, 2))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards, strict=True):
        torch.testing.assert_close(x[0::2], x0, rtol=0, atol=0)
        torch.testing.assert_close(x[1::2], x1, rtol=0, atol=0)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def _train(out: Path, bn: str, steps: int, ranks: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = ([*TORCHRUN, str(SCRIPT)] if ranks > 1 else [sys.executable, str(SCRIPT)]) + [str(out), bn, str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


def _distance(a: dict, b: dict) -> float:
    """Euclidean distance between the weights (not the BN statistics) of two state dicts."""
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    return torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys]).norm().item()


@pytest.mark.parametrize("bn, tol", [("frozen", 1e-4), ("batch", 0.25)])
def test_two_ranks_train_like_one_process(tmp_path, bn, tol):
    """Same global batch, same sampled archs: with the static BN statistics (frozen) two gloo ranks move the
    weights where one process moves them, to float precision; with per-rank batch statistics (each rank
    normalises its half of the batch), close to it: the gap is a fraction ``tol`` of the distance travelled."""
    _train(tmp_path / "one", bn, 6, 1)
    _train(tmp_path / "two", bn, 6, 2)
    initial, one, two = (torch.load(tmp_path / d / f) for d, f in
                         (("one", "initial.pt"), ("one", "state.pt"), ("two", "state.pt")))
    travelled = _distance(initial, one)
    assert travelled > 5e-3  # it did train
    assert _distance(one, two) <= tol * travelled


def _workers(agent: int) -> list[int]:
    """The processes torchrun (``agent``) started: each in a session of its own, so a kill of the agent's
    process group leaves them running (and writing the run's checkpoints beside a resumed run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent:
            found.append(int(entry.name))
    return found


def _kill_run(proc: subprocess.Popen) -> None:
    """kill -9 of everything a torchrun launch started, as a crash of the machine would: workers, then agent."""
    workers = _workers(proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for init to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_killed_two_rank_run_resumes(tmp_path):
    """kill -9 of a 2-rank run after its first checkpoint; the rerun resumes from it and finishes.

    The kill reaches torchrun's workers too: they run in sessions of their own, and a kill of torchrun's
    process group alone once left them training beside the resumed run (the test then hung)."""
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoints" / "supernet.pt"
    proc = subprocess.Popen([*TORCHRUN, str(SCRIPT), str(out), "frozen", "40"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists() and proc.poll() is None, "no checkpoint before the run ended"
    finally:
        _kill_run(proc)
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 40 and not (out / "state.pt").exists()
    _train(out, "frozen", 40, 2)
    assert torch.load(ckpt, weights_only=False)["step"] == 40


@pytest.mark.slow  # ~2 min: a whole tiny conversion on two ranks
def test_torchrun_convert_tiny_writes_a_report(tmp_path, tiny_run):
    run = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "s2d", "convert", "--budget", "tiny", "--weights", str(tiny_run["model_pt"]),
           "--val-size", "2000", "--threads", "1", "--quiet", "--run-dir", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "report.md").is_file() and (run / "checkpoints" / "dynamic.pt").is_file()
    assert r.stdout.count("summary: test accuracy") == 1  # rank 1 prints nothing
