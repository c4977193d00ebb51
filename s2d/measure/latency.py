"""A latency model of multi-stage networks on this machine: a lookup table of measured stage times.

MACs do not turn into time one for one (a narrow conv runs at lower efficiency than a wide one; a 4-stage
arch pays for four head poolings and its routing), so a search that minimises MACs is not a search that
minimises latency. As in OFA's and nn-Meter's latency tables, the time of every distinct stage is measured
once, materialised as it is deployed (batch norm folded), at batch 1, 64 and 256, and kept in a
table; an arch's average latency is then composed from its stages and exit rates without timing the arch:

* batch 1: the expected latency is the sum over stages of P(reach the stage) · the stage's time;
* batch N: stage s runs on the ``N · P(reach s)`` samples still in the batch; its time at n samples is
  interpolated piecewise linearly between the measured batches. Not linear from 1 to 256: on this CPU a
  batch of 64 small images costs less per image than one of 256, whose activations no longer fit in cache
  (with two points only, the last stage of a cascade was predicted 25-40 % too slow).

A stage's computation depends only on the stages before it (``MultiStageArch.stage_key``), so archs that
share a prefix share entries, and a search pays for measuring a stage once. Every stage is timed paired
with the static network (``paired_speed``) and stored as a multiple of its time, so a background load
slows both alike and the table's figures stay comparable between measurements. Batch-1 calls last about a
millisecond and are preempted unevenly on a busy machine, so their ratio is of the fast calls (10th percentile):
the time a call takes when nothing else runs.

The table is a property of one machine: it is stored with the torch version, thread count, device and
batch it was measured with, and a table measured under other conditions is not reused. A stage's time depends on
its shape, not on its weights, so the machine also keeps a store of stage times per network shape (``shared``,
``~/.cache/s2d/latency`` for ``s2d convert``): another run of the same model on this machine (a second seed, a
new tolerance) looks its stages up there instead of timing them again (ResNet-20's full budget: ~400 stages,
6.5 min). Entries move between tables as multiples of each table's static time, as they were measured.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2d.measure.timing import measure_speed, paired_speed
from s2d.runs import write_json_atomic
from s2d.transform.arch import MultiStageArch
from s2d.transform.dynamic import early_exit, route
from s2d.transform.exit_rule import NEVER_EXIT
from s2d.transform.stages import INFERENCE_LAYOUT, materialise
from s2d.transform.supernet import SuperNet

LARGE_BATCH = 256
MID_BATCH = 64
COSTS = ("macs", "latency", "throughput")  # what a search minimises: MACs, batch-1 latency, batch-256 time


@dataclass(frozen=True)
class StageTime:
    """Milliseconds of one forward call at batch 1, ``mid`` and ``batch``."""

    b1_ms: float
    mid_ms: float
    large_ms: float
    mid: int = MID_BATCH
    batch: int = LARGE_BATCH

    def at(self, n: float) -> float:
        """Time on ``n`` samples (``n`` may be an expectation): linear between the measured batches."""
        if n <= 0:
            return 0.0
        if n < 1:  # run with probability n
            return n * self.b1_ms
        if n <= self.mid:
            return self.b1_ms + (self.mid_ms - self.b1_ms) * (n - 1) / (self.mid - 1)
        return self.mid_ms + (self.large_ms - self.mid_ms) * (n - self.mid) / (self.batch - self.mid)


def machine(device: str, batch: int, mid: int) -> dict[str, Any]:
    """What a table's times depend on besides the network."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "cpu": platform.processor() or platform.machine(), "batch": batch, "mid": mid, "layout": INFERENCE_LAYOUT}


def rescaled(t: StageTime, source: StageTime, target: StageTime) -> StageTime:
    """``t``, measured beside the static time ``source``, as the same multiples of ``target``."""
    return replace(t, b1_ms=t.b1_ms / source.b1_ms * target.b1_ms, mid_ms=t.mid_ms / source.mid_ms * target.mid_ms,
                   large_ms=t.large_ms / source.large_ms * target.large_ms)


def _read_table(path: Path | None, expect: dict[str, Any]) -> tuple[StageTime, dict[str, StageTime]] | None:
    """A saved table's static time and stage times, or None when absent, unreadable or made under other
    conditions than ``expect`` (its ``machine``, and for a shared store its ``network``)."""
    if path is None or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if any(saved.get(k) != v for k, v in expect.items()):
            return None  # measured elsewhere, with other threads, or for another network: says nothing here
        return StageTime(**saved["static"]), {k: StageTime(**v) for k, v in saved["stages"].items()}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: measured again, then overwritten


class LatencyTable:
    """Measured stage times of a supernet's archs (see the module doc): ``path`` keeps them for a run, ``shared``
    (a folder) for every run of this network shape on this machine."""

    def __init__(self, supernet: SuperNet, reference: nn.Module, *, path: str | Path | None = None,
                 shared: str | Path | None = None, device: str = "cpu", batch: int = LARGE_BATCH, repeats: int = 5,
                 b1_repeats: int = 30, seed: int = 0) -> None:
        self.supernet, self.reference = supernet, reference.eval()
        self.path = Path(path) if path is not None else None
        self.device, self.batch, self.mid = device, batch, min(MID_BATCH, max(2, batch // 4))
        self.repeats, self.b1_repeats = repeats, b1_repeats
        self.machine = machine(device, batch, self.mid)
        shape = supernet.input_shape
        # What a stage's time depends on besides its key: the network's layers and the input's shape.
        self.network = hashlib.sha256(f"{tuple(shape)}|{reference!r}".encode()).hexdigest()[:16]
        self.shared = self._shared_path(Path(shared)) if shared is not None else None
        g = torch.Generator().manual_seed(seed)
        self._x1 = torch.randn(1, *shape, generator=g).to(device)
        self._xn = torch.randn(batch, *shape, generator=g).to(device)
        self.entries: dict[str, StageTime] = {}
        self.static: StageTime | None = None
        self.measured = 0  # stages timed by this process
        self.reused = 0  # stages taken from the machine's shared store
        store_lacks = self._load()
        if self.static is None:
            one = paired_speed(self.reference, self.reference, [self._x1] * self.b1_repeats, warmup=3)
            large = measure_speed(self.reference, self._xn, repeats=self.repeats).per_batch_ms
            x_mid = self._xn[: self.mid]  # its time as a share of the large batch's, interleaved with it
            mid = paired_speed(lambda _: self.reference(self._xn), lambda _: self.reference(x_mid), self._xn,
                               repeats=self.repeats, warmup=1)
            self.static = StageTime(one.fast_reference_ms, mid.ratio * large, large, self.mid, batch)
            self._save()
        elif self.reused or store_lacks:
            self._save()  # the run keeps the stage times it took from the store, the store those it lacked

    def _shared_path(self, folder: Path) -> Path:
        """One file per machine and network shape, so runs of other models never read or rewrite it."""
        digest = hashlib.sha256(json.dumps([self.machine, self.network], sort_keys=True).encode()).hexdigest()[:16]
        return folder / f"{digest}.json"

    def _load(self) -> bool:
        """The run's own table, then what the shared store holds beyond it (in the run's static time). True when
        the run's table holds stages the store lacks."""
        if (own := _read_table(self.path, {"machine": self.machine})) is not None:
            self.static, self.entries = own
        store = _read_table(self.shared, {"machine": self.machine, "network": self.network})
        stored = store[1] if store is not None else {}
        store_lacks = self.shared is not None and any(k not in stored for k in self.entries)
        if store is None:
            return store_lacks
        static, entries = store
        if self.static is None:
            self.static = static
        for key, t in entries.items():
            if key not in self.entries:
                self.entries[key] = rescaled(t, static, self.static)
                self.reused += 1
        return store_lacks

    def _save(self) -> None:
        assert self.static is not None
        if self.path is not None:
            write_json_atomic(self.path, {"machine": self.machine, "static": asdict(self.static),
                                          "stages": {k: asdict(v) for k, v in self.entries.items()}})
        if self.shared is not None:  # merged into what other runs stored meanwhile, in the store's static time
            static, entries = _read_table(self.shared, {"machine": self.machine, "network": self.network}) or (
                self.static, {})
            entries.update({k: rescaled(t, self.static, static) for k, t in self.entries.items() if k not in entries})
            write_json_atomic(self.shared, {"machine": self.machine, "network": self.network, "static": asdict(static),
                                            "stages": {k: asdict(v) for k, v in entries.items()}})

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def stage_times(self, arch: MultiStageArch) -> list[StageTime]:
        """Every stage's times, measuring the stages the table does not hold yet."""
        keys = [arch.stage_key(s) for s in range(arch.num_stages)]
        if any(k not in self.entries for k in keys):
            self._measure(arch, keys)
        return [self.entries[k] for k in keys]

    def _measure(self, arch: MultiStageArch, keys: list[str]) -> None:
        plan = self.supernet.plan(MultiStageArch(arch.stages, arch.exit_rule))  # timing needs no BN statistics
        stages = [materialise(s).to(self.device) for s in plan.stages]
        missing = [s for s, k in enumerate(keys) if k not in self.entries]
        b1 = self._chain_b1_ms(arch, stages, upto=missing[-1])
        cn: tuple[torch.Tensor, ...] = ()
        assert self.static is not None
        for s, (stage, key) in enumerate(zip(stages, keys, strict=True)):
            if key not in self.entries:
                exiting = None if s == len(stages) - 1 else 0.5
                x_mid, c_mid = self._xn[: self.mid], tuple(c[: self.mid] for c in cn)
                mid = paired_speed(self.reference, self._stage_call(arch, s, stage, c_mid, x_mid, exiting), x_mid,
                                   repeats=self.repeats, warmup=1)
                many = paired_speed(self.reference, self._stage_call(arch, s, stage, cn, self._xn, exiting),
                                    self._xn, repeats=self.repeats, warmup=1)
                self.entries[key] = StageTime(b1[s], mid.ratio * self.static.mid_ms, many.ratio * self.static.large_ms,
                                              self.mid, self.batch)
                self.measured += 1
            cn = tuple(stage(self._xn, *cn)[1:])
        self._save()

    def _chain_b1_ms(self, arch: MultiStageArch, stages: list[nn.Module], upto: int) -> list[float]:
        """Batch-1 time of each stage ``0..upto`` as a difference of the early-exit loop's times over growing
        prefixes of the arch (nobody exiting). Timed alone, in a loop that keeps its weights in cache, a
        stage of ResNet-20 at batch 1 runs up to 40 % faster than in the chain, where every stage brings in
        its own weights and cache; the loop's own ops are counted too."""
        assert self.static is not None
        prefix = []
        for s in range(upto + 1):
            head = MultiStageArch(arch.stages[: s + 1], arch.exit_rule, (NEVER_EXIT,) * s)
            run = functools.partial(early_exit, lambda k, x, c: tuple(stages[k](x, *c)), arch=head)
            prefix.append(paired_speed(self.reference, run, [self._x1] * self.b1_repeats, warmup=3).fast_ratio)
        steps = [prefix[0], *(b - a for a, b in itertools.pairwise(prefix))]
        return [max(step, 0.0) * self.static.b1_ms for step in steps]

    @staticmethod
    def _stage_call(arch: MultiStageArch, s: int, stage: nn.Module, cache: tuple[torch.Tensor, ...],
                    x: torch.Tensor, exiting: float | None):
        """Stage ``s`` on ``x`` as the early-exit loop runs it: with its exit decision (``route``), where an
        ``exiting`` share of the batch leaves (a batch of one goes on: the next stage runs only then)."""
        if exiting is None:  # the last stage decides nothing
            return lambda xs: stage(xs, *cache)
        logits = stage(x, *cache)[0]
        n = len(x)
        threshold = float(arch.confidence(s, logits).quantile(1 - exiting)) if n > 1 else NEVER_EXIT
        routed = MultiStageArch(arch.stages, arch.exit_rule, (threshold,) * (arch.num_stages - 1))
        idx, out = torch.arange(n, device=x.device), torch.empty_like(logits)
        exit_stage = torch.zeros(n, dtype=torch.long, device=x.device)

        def call(xs: torch.Tensor):
            res = stage(xs, *cache)
            return route(routed, s, res[0], xs, tuple(res[1:]), idx, out, exit_stage)
        return call

    def predict_ms(self, arch: MultiStageArch, exit_rates: list[float], batch: int = 1) -> float:
        """Expected milliseconds of one forward call on ``batch`` samples whose exits follow ``exit_rates``."""
        reach, total = 1.0, 0.0
        for t, rate in zip(self.stage_times(arch), exit_rates, strict=True):
            total += t.at(reach * batch)
            reach -= rate
        return total

    def static_ms(self, batch: int = 1) -> float:
        assert self.static is not None
        return self.static.at(batch)

    def ratio(self, arch: MultiStageArch, exit_rates: list[float], batch: int = 1) -> float:
        """Predicted time over the static network's at the same batch (< 1: faster)."""
        return self.predict_ms(arch, exit_rates, batch) / self.static_ms(batch)

    def stage_costs(self, arch: MultiStageArch, cost: str) -> tuple[list[float], float]:
        """Per-sample stage costs for threshold calibration and their static counterpart, in milliseconds:
        batch-1 times (``latency``) or a large batch's time per sample (``throughput``, the linear part)."""
        if cost == "latency":
            return [t.b1_ms for t in self.stage_times(arch)], self.static_ms(1)
        if cost == "throughput":
            return [t.large_ms / self.batch for t in self.stage_times(arch)], self.static_ms(self.batch) / self.batch
        raise ValueError(f"no time cost {cost!r}; valid: latency, throughput")
