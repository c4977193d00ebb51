"""Run directories: ``runs/<name>/`` with config, TensorBoard logs and checkpoints.

Running the same command twice resumes the run; a run directory that holds a
different run is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from s2d.errors import RunDirError

# The phases of ``s2d convert``, in order, each recorded in ``state.json`` with its wall clock. Other entries there
# (the fine-tune's ``race``) are parts of a phase: their seconds are already in the phase's.
PHASES = ("supernet", "search", "finetune", "report")


def cache_dir() -> Path:
    """What outlives a run on this machine: unpacked datasets, the store of measured stage times
    (``$S2D_CACHE``, else ``~/.cache/s2d``)."""
    return Path(os.environ.get("S2D_CACHE", Path.home() / ".cache" / "s2d"))


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class PhaseClock:
    """The wall clock of a conversion's phases, kept in ``RUN/clock.json`` while a phase runs (rewritten every
    ``every`` seconds by a daemon thread), so that a phase resumed after a kill goes on counting from where the
    killed process was: ``s2d bench peers`` gives each pruner as long as the whole conversion took, and training
    that a kill made the conversion redo is part of that. Pauses between a kill and its resume are not. Only the
    process that writes the run directory (``write``) keeps the file; other data-parallel ranks just time."""

    def __init__(self, path: Path, *, every: float = 10.0, write: bool = True) -> None:
        self.path, self.every, self.write = path, every, write
        self._phase: str | None = None
        self._base = self._t0 = 0.0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def recorded(self) -> dict[str, float]:
        """Seconds per phase as last written (a phase in progress: up to ``every`` seconds ago)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}

    def start(self, phase: str) -> None:
        """Time ``phase``, from what an earlier process recorded for it."""
        self._end_thread()
        self._phase, self._base, self._t0 = phase, self.recorded().get(phase, 0.0), time.perf_counter()
        if self.write:
            self._save()
            self._halt.clear()
            self._thread = threading.Thread(target=self._beat, name=f"s2d-clock-{phase}", daemon=True)
            self._thread.start()

    def seconds(self) -> float:
        return self._base + time.perf_counter() - self._t0

    def stop(self, phase: str) -> float | None:
        """The phase's seconds over every process that ran it (None: ``phase`` is not being timed)."""
        if self._phase != phase:
            return None
        self._end_thread()
        seconds = self.seconds()
        if self.write:
            self._save(seconds)
        self._phase = None
        return seconds

    def halt(self) -> None:
        """Stop timing without recording an end (a phase that raised): what was last written stays, as after a
        kill, and no thread outlives the phase."""
        self._end_thread()
        self._phase = None

    def _beat(self) -> None:
        while not self._halt.wait(self.every):
            if self.path.parent.is_dir():  # never recreate a run directory removed under a running phase
                self._save()

    def _save(self, seconds: float | None = None) -> None:
        with self._lock:
            if self._phase is None:
                return
            data = self.recorded()
            data[self._phase] = self.seconds() if seconds is None else seconds
            write_json_atomic(self.path, data)

    def _end_thread(self) -> None:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None


@dataclass
class Run:
    root: Path

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text()) if self.config_path.exists() else {}


def open_run(root: str | Path, config: dict[str, Any], *, identity: tuple[str, ...],
             legacy: dict[str, Any] | None = None) -> Run:
    """Create or reopen a run; ``identity`` keys must match an existing run's config.

    Other keys (e.g. epochs, device) may change between invocations, so a user can
    extend a run or resume it on another device. ``legacy`` holds what a run made before an identity key
    existed was made with: its config lacks the key, and reopening it with another value is a clash.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"  # one per process: data-parallel ranks open a run together
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"run directory {root} is not writable ({e.strerror}); pass --run-dir with a writable path"
        ) from None
    run = Run(root)
    old = run.config()
    if old:
        old = {**(legacy or {}), **old}
    clash = {k: (old.get(k), config.get(k)) for k in identity if k in old and old.get(k) != config.get(k)}
    if clash:
        what = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in clash.items())
        raise RunDirError(f"run directory {root} holds a different run ({what}); pass a new --run-dir")
    write_text_atomic(run.config_path, yaml.safe_dump({**old, **config}, sort_keys=False))
    return run
