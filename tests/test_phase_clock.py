"""PhaseClock: a phase's wall clock survives a SIGKILL, so `s2d bench peers` gives the pruners the whole
conversion's time after a resume (tests/test_convert.py kills a real conversion in every phase)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from s2d.runs import PhaseClock

KILLED_PHASE = """
import sys, time
from pathlib import Path
from s2d.runs import PhaseClock
clock = PhaseClock(Path(sys.argv[1]), every=0.05)
clock.start("supernet")
print("started", flush=True)
time.sleep(60)
"""


def test_a_phase_counts_its_seconds_and_records_them(tmp_path):
    clock = PhaseClock(tmp_path / "clock.json", every=0.05)
    assert clock.stop("search") is None  # not being timed: nothing to record
    clock.start("search")
    time.sleep(0.3)
    recorded = clock.recorded()["search"]
    assert 0.1 <= recorded <= 0.3  # the heartbeat wrote it while the phase ran
    seconds = clock.stop("search")
    assert seconds is not None and 0.3 <= seconds < 1.0
    assert json.loads((tmp_path / "clock.json").read_text()) == {"search": seconds}
    assert clock.stop("search") is None


def test_a_killed_phase_goes_on_from_its_recorded_seconds(tmp_path):
    path = tmp_path / "clock.json"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PHASE, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    before = PhaseClock(path).recorded()["supernet"]
    assert 0.35 <= before <= 1.5  # at most one heartbeat (0.05 s) lost to the kill, plus start-up
    clock = PhaseClock(path, every=0.05)
    clock.start("supernet")
    time.sleep(0.2)
    seconds = clock.stop("supernet")
    assert seconds is not None and before + 0.2 <= seconds < before + 1.0
    # another phase starts from zero; the finished one's record stays
    clock.start("report")
    assert clock.stop("report") < 0.5 and clock.recorded()["supernet"] == seconds


def test_a_rank_that_does_not_write_keeps_no_file(tmp_path):
    clock = PhaseClock(tmp_path / "clock.json", every=0.01, write=False)
    clock.start("finetune")
    time.sleep(0.05)
    assert clock.stop("finetune") >= 0.05 and not (tmp_path / "clock.json").exists()


def test_an_unreadable_clock_file_counts_from_zero(tmp_path):
    (tmp_path / "clock.json").write_text("{not json")
    clock = PhaseClock(tmp_path / "clock.json")
    clock.start("search")
    assert clock.stop("search") < 0.5
    assert set(clock.recorded()) == {"search"}


def test_a_halted_phase_keeps_its_last_heartbeat_and_no_thread(tmp_path):
    """A phase that raised: timing stops, nothing more is written, and a removed run directory is not recreated."""
    clock = PhaseClock(tmp_path / "run" / "clock.json", every=0.02)
    clock.start("search")
    time.sleep(0.1)
    clock.halt()
    written = clock.recorded()["search"]
    time.sleep(0.1)
    assert clock.recorded()["search"] == written and clock.stop("search") is None
    clock.start("report")
    (tmp_path / "run" / "clock.json").unlink()
    (tmp_path / "run").rmdir()
    time.sleep(0.1)
    assert not (tmp_path / "run").exists()
    clock.halt()
