"""``s2d convert``: static CNN → searched dynamic network, in resumable phases.

supernet training → search (PPO or random; random also as the honest baseline) →
fine-tune of the best arch → threshold calibration on validation data → test report.
Each phase checkpoints into the run directory; running the same command again skips
finished phases and resumes the unfinished one. The test split is touched only by
the final report.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from s2d import checkpoint, distributed
from s2d.data import Batches, Dataset, Split, calibration_split, default_calib_size, load_dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import logits
from s2d.measure.cost import static_cost
from s2d.measure.exit_gate import fit_stage_gates
from s2d.measure.guarantee import DEFAULT_CONFIDENCE, min_calibration_images
from s2d.measure.latency import COSTS, LatencyTable
from s2d.measure.network import evaluate_static
from s2d.measure.temperature import fit_stage_temperatures
from s2d.measure.timing import deployable
from s2d.models.zoo import load_model
from s2d.pipeline.format import race_markdown, stages_summary
from s2d.pipeline.report import RowMeter, ThresholdChooser, cheapest_points, write_report
from s2d.runs import PHASES, PhaseClock, Run, cache_dir, open_run, write_json_atomic
from s2d.search.archive import Archive
from s2d.search.evaluator import ArchEvaluator, Objective
from s2d.search.runner import ALGOS, run_search
from s2d.search.space import SWEEP_LIMIT, SearchSpace
from s2d.training.distill import kd_finetune
from s2d.training.heads import HEAD_EPOCHS, exit_heads, init_heads
from s2d.training.supernet import SupernetConfig, probe, train_archs
from s2d.transform.arch import MultiStageArch, static_arch
from s2d.transform.importance import CRITERIA, order_channels
from s2d.transform.sliced import EXIT_HEADS
from s2d.transform.stages import INFERENCE_LAYOUT
from s2d.transform.supernet import SuperNet, dynamic_checkpoint


@dataclass(frozen=True)
class Budget:
    supernet_steps: int
    evaluations: int
    search_val_images: int  # validation images per candidate during the search
    finetune_steps: int
    batch_size: int
    compare_random: bool  # also run random search at the same number of evaluations
    test_limit: int | None = None  # test images in the report (None: all)
    report_val_images: int | None = None  # validation images for the report's calibration (None: all)
    head_images: int = 5000  # training images whose static features fit the supernet's starting exit heads
    bn_images: int = 2000  # training images that estimate an arch's batch-norm statistics
    probe_images: int = 1000  # validation images of the training progress probe (TensorBoard), at every checkpoint
    final_head_images: int | None = None  # training images of the full-width heads: scored and shipped (None: all)
    speed_repeats: int = 20  # paired timing repeats of every report row (batch 256: half of them)
    latency_images: int = 200  # single test images of every report row's batch-1 latency
    speed_rounds: int = 3  # the report's rows are timed together in this many interleaved rounds (RowMeter)
    narrow_finetune_steps: int | None = None  # steps of a narrow arch's fine-tune (None: finetune_steps): narrow
    # stages need about as long as a static pruner's fine-tune to be as good as its network. A fixed count, not
    # a wall clock, so that the network a user gets does not depend on how loaded the machine was.
    static_stage_steps: int = 0  # KD steps of a cascade's recomputed static last stage (0: it stays the static net)
    supernet_random_archs: int = 1  # random archs per supernet step, after the pruned networks (SearchSpace.sandwich)
    sweep_archs: int = SWEEP_LIMIT  # full-width archs scored before the search (SearchSpace.depth_only_sweep)
    race_archs: int = 1  # searched archs fine-tuned ``race_steps`` steps each before the best goes on (1: no race)
    race_steps: int = 0  # steps of the fine-tune's schedule each raced arch trains before they are scored again
    # (well past the warm-up, which is the schedule's first tenth: on the full budget's ResNet-20 supernet 500 of
    # 4000 steps, barely past the 400-step warm-up, put [0.5, static] ahead of [0.375, static], 0.304 against 0.344;
    # 800 steps put them 0.329 and 0.269)


BUDGETS = {
    "tiny": Budget(supernet_steps=3, evaluations=4, search_val_images=200, finetune_steps=2, batch_size=32,
                   compare_random=True, test_limit=300, report_val_images=300, head_images=500, bn_images=250,
                   probe_images=200, final_head_images=500, speed_repeats=2, latency_images=16,  # smoke, not data
                   speed_rounds=1, static_stage_steps=2, race_archs=2, race_steps=1, sweep_archs=10),
    # tiny checkpoints (and probes) at every one of its 3 steps, and every evaluation recalibrates batch norm:
    # 1000 probe images and 500 batch-norm images were a third of a tiny conversion
    "small": Budget(supernet_steps=450, evaluations=40, search_val_images=2000, finetune_steps=60,
                    batch_size=128, compare_random=False, bn_images=1000, narrow_finetune_steps=1500,
                    supernet_random_archs=0, race_archs=3, race_steps=300),
    # No random arch per step: it was a third of a step's time (0.8 against 1.07 steps/s), and the demo's
    # searches were won by the seed cascades [w, static], whose narrow stage is a pruned network, trained
    # without it (runs/demo2, runs/demo3: the three best archs were seeds). The full budget keeps it: there
    # multi-stage archs that only random archs train came first.
    # 1200 narrow fine-tune steps instead of 1500 (runs/demo4's search, re-run): 46 s shorter, the same budget points
    # (93.50 / 93.43 / 93.20 % against 93.50 / 93.44 / 93.23 %) but certified at 3.98x against 4.43x (0.5 points).
    # 2500 steps (race 500; runs/demo-v9-long on runs/demo-v9's supernet and search) lift the first stage from 92.66
    # to 92.88 % on the validation images, but take the demo from 8.6 to 11.6 min, too close to its 15 on a slow
    # hour of this VM, for test budget points of 93.50 / 93.46 / 93.36 % against 93.49 / 93.44 / 93.32 %: kept 1500.
    # a second, random search at the same evaluations doubled the search phase without changing the network
    # shipped: comparing searchers is `s2d bench search`'s job, on one supernet and several seeds.
    # No static-stage distillation: it would push the demo past 15 min, and a peer distilled for as short a
    # time stays below its teacher (14 min of KD: 93.51 / 93.25 / 93.19 % at 2x / 3x / 4x), so it caps nothing.
    # 800 supernet steps (each narrow width ~330) rank [0.5, static] above [0.375, static] on ResNet-20, as the
    # README's ranking figures predict, and a first stage at width 0.5 cannot reach 4x: keep 1200
    # The static stage's 2000 KD steps (9.5 min) moved the budget points at 2x / 3x / 4x from 93.50 / 93.51 /
    # 93.40 % to 93.59 / 93.61 / 93.49 % (ResNet-20, the same narrow stage; static 93.50 %). 3000 steps (+5 min, the
    # same supernet, search and narrow stage) gave 93.52 / 93.51 / 93.48 %: no gain, the copy's accuracy moves by
    # about 0.07 points with its schedule alone
    # 10000 narrow fine-tune steps instead of 4000 (+12.5 min, 47.2 in all; runs/full-r20-v10-long against
    # runs/full-r20-v10, the same supernet, search, race winner and static stage): the first stage alone 93.44 %
    # against 93.20 % on the validation images, and on test certified 5.79x at +0.03 points against 5.03x at -0.24
    # (0.5 points), budget points 93.57 / 93.60 / 93.60 % against 93.57 / 93.53 / 93.39 %. A pruner's KD fine-tune
    # of the same wall clock takes about 20000 steps; the narrow stage was the under-trained part of the conversion.
    # From scratch (runs/full-r20-v11) the budget took 54.0 min, not 47.2: its search's leaders included a
    # non-cascade arch that races at half the cascades' speed (race 10.6 min). Certified 5.75x at -0.16 points.
    # With hidden-layer exit heads (runs/full-r20-v12) the search chose full-width exits after layer1.0 and layer1.1
    # (reward 0.746 against 0.731 for [0.375, static]): nothing trains after the search, 19.9 min in all, certified
    # 4.88x at +0.04 points (throughput x3.02). A search that picks a cascade still pays for its fine-tune.
    # With every full-width arch swept and scored with the heads it ships (runs/full-r20-v15, 20.8 min) it ships
    # exits after the stem, layer1.1 and layer2.0: certified 12.42x at -0.14 points, x5.1-5.8; the small budget
    # ships the same network in 7.4 min, so on ResNet-20 the supernet's 13.7 min serve only the archs it lost to.
    "full": Budget(supernet_steps=1200, evaluations=150, search_val_images=2500, finetune_steps=500,
                   batch_size=128, compare_random=False, head_images=20000, bn_images=1000,
                   narrow_finetune_steps=10000, static_stage_steps=2000, race_archs=3, race_steps=1300),
}


def mac_ratio_standard_error(record: dict[str, Any], images: int) -> float:
    """Standard error of a scored arch's average-MAC ratio over ``images`` validation images: images exit at
    different stages and pay different MACs, so the average of a few thousand is known to about this much."""
    static = record["average_macs"] / record["mac_ratio"]
    paid = np.cumsum(record["stage_macs"]) / static  # what an image exiting at each stage pays
    rates = np.asarray(record["exit_rates"], dtype=np.float64)
    mean = float((rates * paid).sum())
    return float(np.sqrt((rates * (paid - mean) ** 2).sum() / max(1, images)))


def choose_arch(records: list[dict[str, Any]], *, must_meet: bool = True, images: int | None = None
                ) -> dict[str, Any] | None:
    """The searched arch to fine-tune: the best reward among the archs that keep the promise on
    validation data. A slightly infeasible arch can out-score every feasible one (the penalty is
    linear in the shortfall), and fine-tuning does not win back what the supernet already misses.

    With ``images`` (the validation images the MAC ratios were measured on; the tolerance objective in MACs),
    the one-standard-error rule: among the feasible archs whose MAC ratio is within one standard error of the
    best's, the one with the fewest stages (then the best reward). Those differences are noise of the proxy,
    while every extra stage shares the fine-tune and adds a head and a routing step: on ResNet-20's full budget
    the proxy put a 4-stage arch 1 % ahead of the 2-stage cascade, which after fine-tuning was 0.27-0.33 points
    more accurate at every budget point.

    ``None`` when no arch keeps it and ``must_meet``: the caller ships a network that does (the static
    one) instead of a worse one. Budget mode (``must_meet=False``) takes the best reward anyway: no
    network is known to fit an average-MAC budget, so the nearest is the answer."""
    feasible = [r for r in records if r["meets_target"]]
    if not feasible and must_meet:
        return None
    best = max(feasible or records, key=lambda r: r["reward"])
    if images is None or not feasible or any(k not in best for k in ("stage_macs", "exit_rates", "average_macs")):
        return best
    within = best["mac_ratio"] + mac_ratio_standard_error(best, images)
    ties = [r for r in feasible if r["mac_ratio"] <= within]
    return min(ties, key=lambda r: (len(r["arch"]["stages"]), -r["reward"]))


def race_candidates(records: list[dict[str, Any]], best: dict[str, Any], k: int, *, must_meet: bool = True
                    ) -> list[dict[str, Any]]:
    """The archs to race in the fine-tune: ``best`` first, then the best rewards among the other archs of as many
    stages that keep the promise (any arch in budget mode), ``k`` at most, each with a first stage (width and exit)
    none of the others has: variants that differ only after the first exit (a search's neighbours) would race the
    same question twice. Only archs that train: a full-width arch keeps the static weights and fits only its heads,
    so a short fine-tune says nothing of it (nor is it raced when it is ``best``).

    Why race at all: the supernet ranks near-equal archs by what its shared weights give them, not by what a
    fine-tune makes of them. On ResNet-20's demo it put [0.5, static] first and [0.375, static] second (MAC ratios
    0.429 and 0.444 on 2000 validation images); fine-tuned 1500 steps each they scored 0.304 and 0.244 there, and
    300 steps already ranked them so (0.429 and 0.394).

    Why as many stages: the race scores on the images the search chose on, so among structures it inherits the
    search's winner's curse (a search tries many multi-stage variants and keeps the luckiest on those images). On
    ResNet-20's full budget a race of [0.5, static] against a 4-stage arch put the 4-stage one ahead after 500
    steps (0.292 against 0.304); fine-tuned, it certified 4.15x at -0.43 points on test and gave 93.06 / 93.01 /
    93.01 % at 2x / 3x / 4x, below every 2-stage cascade of this model, as the three multi-stage archs that led
    the search before it were. The structure stays the one the search chose (``choose_arch``)."""
    def first(r: dict[str, Any]) -> tuple[float, str] | None:
        """The arch's first stage, None for an arch that does not train."""
        arch = MultiStageArch.from_dict(r["arch"])
        return None if arch.is_full_width else (arch.stages[0].width, arch.stages[0].exit)

    if best.get("fallback") or first(best) is None:
        return [best]
    out, firsts = [best], {first(best)}
    for r in sorted(records, key=lambda r: -r["reward"]):
        if len(out) >= k:
            break
        head = first(r)
        if (head is None or head in firsts or (must_meet and not r["meets_target"])
                or len(r["arch"]["stages"]) != len(best["arch"]["stages"])):
            continue
        out.append(r)
        firsts.add(head)
    return out


STATIC_STAGES = ("distilled", "untouched")  # a distilled cascade's last stage, then its certification twin's
FINETUNE_LR = 0.02  # backbone lr of the chosen arch's fine-tune (chosen on validation for the pruning peer)


@dataclass
class ConvertConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    weights: str = "zoo"
    algo: str = "ppo"
    budget: str = "small"
    tolerance: float = 0.5  # accuracy points below the static model allowed on validation data
    objective: str = "tolerance"
    cost: str = "macs"  # what the search minimises: fvcore MACs, batch-1 latency or batch-256 time (latency table)
    search_thresholds: bool = False
    section_widths: bool = False  # stages may taper their width over the sections (SearchSpace.taper)
    exit_gates: bool = False  # fit a learned gate per exit on the search's validation images (else: the softmax)
    exit_head: str = "mlp"  # full-width exit heads: a hidden layer before the classifier ("mlp") or one layer
    max_stages: int = 4
    bn: str = "batch"  # batch-norm statistics while training the supernet: "batch" (per arch) or "frozen"
    importance: str = "l2"  # channel order of the supernet (Torch-Pruning criterion), or "none"
    target_mac_ratio: float | None = None  # budget mode: at most this fraction of the static MACs, most accurate
    target_macs: float | None = None  # budget mode in absolute MACs (resolved to target_mac_ratio on load)
    target_latency_ms: float | None = None  # budget mode in batch-1 milliseconds on this machine
    confidence: float = DEFAULT_CONFIDENCE  # of the tolerance's bound on the calibration split
    calib_size: int | None = None  # held-out images kept for the chosen network's thresholds (None: half)
    seed: int = 0
    val_size: int | None = None  # None: 10 % of the training images, at most 5000 (resolved on load)
    split_seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    workers: int = 1  # Ray workers scoring the search's candidates (1: in this process)
    ray_address: str | None = None  # an existing Ray cluster (None: a local one)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> ConvertConfig:
        """The configuration a conversion's run directory was made with (``config.yaml``), so that benches on
        a finished run need no flags repeated."""
        from dataclasses import fields

        import yaml

        path = Path(run_dir) / "config.yaml"
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise S2DError(f"{path} is missing or unreadable ({e.__class__.__name__}); run s2d convert "
                           f"--run-dir {run_dir} first") from None
        if not isinstance(saved, dict) or "model" not in saved or saved.get("command", "convert") != "convert":
            raise S2DError(f"{run_dir} is not a conversion's run directory; run s2d convert --run-dir {run_dir}")
        cfg = cls(**{**LEGACY, **{f.name: saved[f.name] for f in fields(cls) if f.name in saved}})
        if cfg.target_macs is not None:  # the saved ratio is resolved from it: one budget, as the user gave it
            cfg.target_mac_ratio = None
        return cfg

    def validate(self) -> None:
        if self.exit_head not in EXIT_HEADS:
            raise S2DError(f"unknown --exit-head {self.exit_head!r}; valid: {', '.join(EXIT_HEADS)}")
        if self.budget not in BUDGETS:
            raise S2DError(f"unknown --budget {self.budget!r}; valid: {', '.join(BUDGETS)}")
        if self.algo not in ALGOS:
            raise S2DError(f"unknown --algo {self.algo!r}; valid: {', '.join(ALGOS)}")
        if not 0 <= self.tolerance < 100:
            raise S2DError(f"--tolerance is in accuracy points (e.g. 0.5), got {self.tolerance}")
        if self.cost not in COSTS:
            raise S2DError(f"unknown --cost {self.cost!r}; valid: {', '.join(COSTS)}")
        if self.cost != "macs" and self.workers > 1:
            raise S2DError(f"--cost {self.cost} times stages on this machine, one at a time; run it with --workers 1")
        if self.bn not in ("batch", "frozen"):
            raise S2DError(f"unknown --bn {self.bn!r}; valid: batch, frozen")
        if self.target_mac_ratio is not None and self.target_latency_ms is not None:
            raise S2DError("give one budget: --target-macs, --target-mac-ratio or --target-latency-ms")
        if self.target_mac_ratio is not None and not 0 < self.target_mac_ratio <= 1:
            raise S2DError(f"--target-mac-ratio is a fraction of the static MACs in (0, 1], "
                           f"got {self.target_mac_ratio}")
        if self.importance not in (*CRITERIA, "none"):
            raise S2DError(f"unknown --importance {self.importance!r}; valid: {', '.join(CRITERIA)}, none")
        if not 0.5 <= self.confidence < 1:
            raise S2DError(f"--confidence is a probability in [0.5, 1), e.g. 0.9, got {self.confidence}")
        if not 2 <= self.max_stages <= 4:
            raise S2DError(f"--max-stages must be 2, 3 or 4, got {self.max_stages}")


# what a run directory written before a setting existed was made with (its config.yaml lacks the key)
LEGACY = {"exit_head": "linear"}

IDENTITY = ("model", "dataset", "weights", "algo", "budget", "tolerance", "objective", "cost", "search_thresholds",
            "section_widths", "exit_head",
            "max_stages", "bn", "importance", "target_mac_ratio", "target_macs", "seed", "val_size", "split_seed",
            "confidence", "calib_size", "target_latency_ms")


def search_evaluator(config: dict[str, Any], run_dir: str) -> ArchEvaluator:
    """The search's evaluator of a conversion, rebuilt from its config and run directory: what each Ray worker
    of ``--workers`` holds (``s2d.pipeline.workers``)."""
    pipeline = Pipeline(ConvertConfig(**config), run_dir, progress=False)
    pipeline.load_supernet()
    return pipeline.evaluator(pipeline.budget.search_val_images)


class Pipeline:
    """The phases of a conversion over one run directory."""

    def __init__(self, cfg: ConvertConfig, run_dir: str | Path, *, progress: bool = True,
                 data: Dataset | None = None) -> None:
        cfg.validate()
        self.cfg, self.progress = cfg, progress
        self.budget = BUDGETS[cfg.budget]
        self.data = data or load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size,
                                         split_seed=cfg.split_seed)
        cfg.val_size = self.data.val_size  # the resolved default is part of the run's identity
        self._resolve_target_macs(cfg)
        cfg.calib_size = cfg.calib_size or default_calib_size(len(self.data.val))
        self.search_val, self.calib = calibration_split(self.data.val, cfg.calib_size, seed=cfg.seed)
        need = min_calibration_images(cfg.tolerance / 100)
        if not self.budget_mode and len(self.calib) < need:
            raise S2DError(f"the calibration split ({len(self.calib)} images) is too small to promise a "
                           f"{cfg.tolerance}-point tolerance (one lost image is {100 / len(self.calib):.3g} points); "
                           f"it needs {need} images: pass --calib-size {need} (with a --val-size that leaves it) or "
                           f"a larger --tolerance")
        self.run: Run = open_run(run_dir, {"command": "convert", **asdict(cfg)}, identity=IDENTITY, legacy=LEGACY)
        self.static = load_model(cfg.model, self.data.info, cfg.weights).to(cfg.device)
        # the distillation target of every training phase, as deployed (BN folded, channels-last on the CPU): the
        # same logits to 1e-5 and a 1.6-1.9x faster forward alone (the demo's fine-tune took as long: 330 s either way)
        self.teacher = deployable(self.static)
        self.ordered = self._importance_ordered()
        self.supernet = self.new_supernet()
        self._full_width: SuperNet | None = None
        self._latency: LatencyTable | None = None
        self._static_correct: dict[tuple[bool, int], torch.Tensor] = {}
        self.space = SearchSpace(self.supernet.graph, max_stages=cfg.max_stages,
                                 search_thresholds=cfg.search_thresholds, section_widths=cfg.section_widths)
        self.archive = Archive(self.run.root / "archive.jsonl")
        self.state_path = self.run.root / "state.json"
        self.clock = PhaseClock(self.run.root / "clock.json", write=distributed.current().is_main)
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    @property
    def budget_mode(self) -> bool:
        """A cost budget (MACs or latency), not an accuracy tolerance, is the promise."""
        return self.cfg.target_mac_ratio is not None or self.cfg.target_latency_ms is not None

    @property
    def cost(self) -> str:
        """The search's cost: a batch-1 latency budget is searched in (predicted) batch-1 latency."""
        return "latency" if self.cfg.target_latency_ms is not None else self.cfg.cost

    def latency_table(self) -> LatencyTable:
        """Stage times of this run's supernet on this machine (``latency_table.json``, kept between phases and
        benches; stages another run of this model timed come from the machine's store): the cost model of
        ``--cost latency|throughput`` and of a latency budget."""
        if self._latency is None:
            self._latency = LatencyTable(self.supernet, deployable(copy.deepcopy(self.static)),
                                         path=self.run.root / "latency_table.json",
                                         shared=cache_dir() / "latency", device=self.cfg.device,
                                         seed=self.cfg.seed, repeats=max(2, self.budget.speed_repeats // 4),
                                         b1_repeats=self.budget.speed_repeats * 3 // 2)
        return self._latency

    def _latency_ratio(self) -> float:
        """``--target-latency-ms`` over the static model's batch-1 latency, kept in ``state.json`` when first
        measured (a resumed search keeps its objective). The chosen network's thresholds then meet the latency
        itself, from its measured stage latencies."""
        if "latency_plan" not in self.state:
            static_ms = self.latency_table().static_ms(1)
            self.state["latency_plan"] = {"static_latency_ms": static_ms,
                                          "ratio": min(1.0, self.cfg.target_latency_ms / static_ms)}
            write_json_atomic(self.state_path, self.state)
        plan = self.state["latency_plan"]
        return plan.get("ratio", plan.get("mac_ratio"))  # runs before the latency table searched in MACs

    def _resolve_target_macs(self, cfg: ConvertConfig) -> None:
        """``--target-macs`` is the budget in the user's unit; the pipeline works with the ratio."""
        if cfg.target_macs is None:
            return
        if cfg.target_mac_ratio is not None or cfg.target_latency_ms is not None:
            raise S2DError("give one budget: --target-macs, --target-mac-ratio or --target-latency-ms")
        macs = static_cost(load_model(cfg.model, self.data.info, cfg.weights), self.data.info).total_macs
        if not 0 < cfg.target_macs <= macs:
            raise S2DError(f"--target-macs {cfg.target_macs:.4g} is outside (0, {macs:.4g}], the static "
                           f"{cfg.model}'s MACs (fvcore); e.g. --target-macs {macs / 4:.4g} for 4x fewer")
        cfg.target_mac_ratio = cfg.target_macs / macs

    def new_supernet(self) -> SuperNet:
        """A supernet of the static model; with ``bn == "batch"`` every arch gets its own BN statistics,
        estimated on fixed, un-augmented training images, so they are reproducible."""
        info, cfg = self.data.info, self.cfg
        sn = SuperNet(copy.deepcopy(self.ordered).cpu(), (info.in_channels, info.image_size, info.image_size),
                      info.num_classes, head_hidden=EXIT_HEADS[cfg.exit_head]).to(cfg.device)
        self._arch_statistics(sn)
        return sn

    def _importance_ordered(self) -> torch.nn.Module:
        """A copy of the static model whose coupled channel groups are sorted by importance (same
        logits), so that a width-w prefix keeps what a static pruner would keep. Deterministic for
        a given model and criterion, so every supernet of the run shares the order its checkpoints hold."""
        model = copy.deepcopy(self.static).cpu().eval()
        if self.cfg.importance == "none":
            return model.to(self.cfg.device)
        info = self.data.info
        batches = None
        if self.cfg.importance == "taylor":
            batches = list(Batches(self.data.train.subset(1024), info, 256))
        order = order_channels(model, (info.in_channels, info.image_size, info.image_size),
                               criterion=self.cfg.importance, batches=batches)
        summary = {"criterion": order.criterion, "groups_permuted": order.num_permuted,
                   "top_quarter_share": order.top_share(0.25),
                   "skipped": [{"root": s.root, "channels": s.channels, "reason": s.reason} for s in order.skipped]}
        write_json_atomic(self.run.root / "channel_order.json", summary)
        return model.to(self.cfg.device)

    def _arch_statistics(self, sn: SuperNet) -> None:
        info, cfg = self.data.info, self.cfg
        if cfg.bn == "batch":
            bn_images = self.data.train.subset(self.budget.bn_images)
            sn.use_arch_statistics(lambda: Batches(bn_images, info, 250, device=cfg.device),
                                   num_batches=-(-len(bn_images) // 250))
        else:
            sn.use_arch_statistics(None)

    def _done(self, phase: str, **result: Any) -> None:
        """Record a finished phase with its wall clock over every process that ran it (what `s2d bench peers`
        gives the peers: the same time s2d took, summed over ``PHASES``)."""
        assert phase in PHASES, f"{phase!r} is not one of {PHASES}: bench peers would not count its seconds"
        seconds = self.clock.stop(phase)
        if seconds is not None:
            result["seconds"] = seconds
        self.state[phase] = result
        if distributed.current().is_main:
            write_json_atomic(self.state_path, self.state)

    def train_config(self, steps: int) -> SupernetConfig:
        c = self.cfg
        return SupernetConfig(model=c.model, dataset=c.dataset, weights=c.weights, steps=steps,
                              batch_size=self.budget.batch_size, seed=c.seed, val_size=c.val_size,
                              split_seed=c.split_seed, bn=c.bn, checkpoint_every=max(1, min(50, steps // 4)),
                              probe_images=self.budget.probe_images)

    # --- phases ---------------------------------------------------------------------------
    def supernet_phase(self) -> None:
        """Exit heads as probes of the static features, then sandwich-rule fine-tuning
        of the supernet, distilled from the static model."""
        self.clock.start("supernet")
        probes = [self.space.width_only(), self.space.depth_only()]
        if not (self.run.checkpoints / "supernet.pt").exists():  # a resumed run has its heads in the checkpoint
            init_heads(self.supernet, self.data.train.subset(self.budget.head_images), self.data.info,
                       device=self.cfg.device)
        train_archs(self.supernet, self.teacher, self.data,
                    self.space.sandwich(random_archs=self.budget.supernet_random_archs),
                    self.train_config(self.budget.supernet_steps), self.run, ckpt_name="supernet.pt",
                    tag="supernet", device=self.cfg.device, progress=self.progress, probe_archs=probes)
        self._done("supernet", checkpoint="checkpoints/supernet.pt")

    def load_supernet(self) -> None:
        path = self.run.checkpoints / "supernet.pt"
        checkpoint.load_into(self.supernet, checkpoint.load(path)["state_dict"], str(path))
        self._arch_statistics(self.supernet)  # a heads-only fine-tune may have switched them off

    def full_width_supernet(self) -> SuperNet:
        """The static weights and statistics with full-width heads: what a full-width arch is (no shared-weight
        training), for the evaluator and the heads-only fine-tune, which ships these heads. Fitted as shipped (the
        fine-tune's images and epochs), so that a full-width arch is scored as deployed: on ResNet-20's full budget,
        probes fitted on 20000 images for 10 epochs put the best full-width arch at 0.178 of the static MACs on
        the search's images, and heads fitted on all 55000 for 15 epochs at 0.082 (56 s for every exit)."""
        if self._full_width is None:
            sn = self.new_supernet()
            sn.use_arch_statistics(None)
            init_heads(sn, self.data.train.subset(self.budget.final_head_images), self.data.info, seed=self.cfg.seed,
                       device=self.cfg.device, widths=(1.0,), epochs=HEAD_EPOCHS)
            self._full_width = sn
        return self._full_width

    @functools.cached_property
    def static_macs(self) -> float:
        """fvcore MACs of the static model, traced once: every evaluator divides by it."""
        return static_cost(self.static, self.data.info).total_macs

    def static_correct(self, split: Split, *, calibration: bool) -> torch.Tensor:
        """Which of a held-out split's first images the static model classifies correctly, computed once per split
        and size: every evaluator and threshold chooser compares against it (a distilled cascade's report builds
        four choosers, which ran the static model 12 times)."""
        key = (calibration, len(split))
        if key not in self._static_correct:
            self._static_correct[key] = logits(self.static, split, self.data.info,
                                               device=self.cfg.device).argmax(1) == split.labels
        return self._static_correct[key]

    def evaluator(self, val_images: int | None, *, full_width: bool = True, calibration: bool = False
                  ) -> ArchEvaluator:
        """Scores archs on the search's validation images (``calibration``: on the calibration split);
        ``full_width=False`` scores every arch with ``self.supernet`` as it is (the fine-tuned network)."""
        val = (self.calib if calibration else self.search_val).subset(val_images)
        static_correct = self.static_correct(val, calibration=calibration)
        return ArchEvaluator(self.supernet, val, self.data.info, static_accuracy=static_correct.float().mean().item(),
                             static_correct=static_correct,
                             static_macs=self.static_macs,
                             objective=self.objective(),
                             archive=self.archive if val_images == self.budget.search_val_images and not calibration
                             else None,
                             device=self.cfg.device,
                             full_width=self.full_width_supernet() if full_width else None,
                             latency=self.latency_table() if self.cost != "macs" else None)

    def threshold_chooser(self, *, full_width: bool, confidence: float | None = None) -> ThresholdChooser:
        """Thresholds of the report's rows: a sequence from the search's validation images, certified on
        the calibration split (or the budget's setting there)."""
        calib = self.evaluator(None, full_width=full_width, calibration=True)
        return ThresholdChooser(self.evaluator(self.budget.report_val_images, full_width=full_width), calib,
                                self.static_correct(self.calib, calibration=True),
                                confidence=confidence or self.cfg.confidence,
                                tolerance_points=None if self.budget_mode else self.cfg.tolerance,
                                latency_ms=self.cfg.target_latency_ms,
                                latency=self.latency_table() if self.cfg.target_latency_ms else None)

    def _with_exit_fit(self, chooser: ThresholdChooser, arch: MultiStageArch) -> MultiStageArch:
        """Per-exit temperatures, then gates (``exit_gates``), fitted on the search's validation images (not the
        calibration split, which must stay untouched until the thresholds are certified on it)."""
        network = chooser.val.network_for(arch)
        arch = fit_stage_temperatures(network, arch, chooser.val.val, self.data.info, device=self.cfg.device)
        if self.cfg.exit_gates:
            arch = fit_stage_gates(network, arch, chooser.val.val, self.data.info, device=self.cfg.device)
        return arch

    def objective(self) -> Objective:
        """``--target-mac-ratio`` asks the budget question; otherwise the configured objective."""
        if self.budget_mode:
            ratio = self.cfg.target_mac_ratio if self.cfg.target_mac_ratio is not None else self._latency_ratio()
            return Objective("budget", self.cfg.tolerance / 100, target_ratio=ratio, cost=self.cost)
        if self.cfg.objective == "tolerance":  # archs are scored by what the report can certify
            return Objective("tolerance", self.cfg.tolerance / 100, confidence=self.cfg.confidence, cost=self.cost)
        return Objective(self.cfg.objective, self.cfg.tolerance / 100, cost=self.cost)

    def search_phase(self, algos: list[str] | None = None) -> dict[str, Any]:
        self.clock.start("search")
        self.load_supernet()
        algos = algos or [self.cfg.algo, *(["random"] if self.budget.compare_random and self.cfg.algo != "random"
                                           else [])]
        ev = self.evaluator(self.budget.search_val_images)
        pool = None
        if self.cfg.workers > 1:
            from s2d.pipeline.workers import RayScoringPool

            build = functools.partial(search_evaluator, asdict(self.cfg), str(self.run.root))
            ev.pool = pool = RayScoringPool(build, self.cfg.workers, address=self.cfg.ray_address)
        try:
            seeds, sweep = list(self.space.seeds()), self.space.depth_only_sweep(self.budget.sweep_archs)
            with tqdm(total=len(seeds) + len(sweep), desc="search (seeds, full-width sweep)",
                      disable=not self.progress) as bar:
                for archs, searcher in ((seeds, "seed"), (sweep, "sweep")):
                    for _ in ev.evaluate_each(archs, searcher=searcher):  # archived: a resumed search skips them
                        bar.update()
            summaries = {a: run_search(ev, self.space, self.run, algo=a, budget=self.budget.evaluations,
                                       seed=self.cfg.seed, progress=self.progress) for a in algos}
        finally:
            if pool is not None:
                pool.close()
        self.record_choice(summaries)
        return summaries

    def record_choice(self, summaries: dict[str, Any]) -> dict[str, Any]:
        """Choose the arch to fine-tune among the archive's records (the configured searcher's and the seeds' first)
        and record the search phase: the end of a search, and of ``s2d pick``'s re-scoring of another run's archs.
        Returns the choice (the static network, marked ``fallback``, when no arch keeps the tolerance)."""
        records = self.archive.records()
        main = [r for r in records if r.get("searcher") in (self.cfg.algo, "seed", "sweep")] or records
        must_meet = not self.budget_mode
        # the one-standard-error rule where the search minimises MACs within the tolerance (not budget mode)
        images = (len(self.search_val.subset(self.budget.search_val_images))
                  if self.cfg.objective == "tolerance" and self.cost == "macs" and must_meet else None)
        best = (choose_arch(main, must_meet=must_meet, images=images)
                or choose_arch(records, must_meet=must_meet, images=images))
        fallback = None
        if best is None:
            fallback = (f"no searched arch kept the {self.cfg.tolerance}-point tolerance on validation data "
                        "(try --budget full or a larger --tolerance)")
            best = {"arch": static_arch().to_dict(), "fallback": True}
        if "finetune" not in self.state:  # afterwards best_arch.json describes the fine-tuned network
            write_json_atomic(self.run.root / "best_arch.json", best["arch"])
        race = race_candidates(main, best, self.budget.race_archs, must_meet=must_meet)
        stage_times = ({"measured": self._latency.measured, "from_store": self._latency.reused}
                       if self._latency is not None else None)  # what the time cost's table cost this search
        self._done("search", summaries=summaries, best=best, fallback=fallback,
                   race=[r["arch"] for r in race] if len(race) > 1 else [], stage_times=stage_times)
        return best

    def finetune_phase(self) -> None:
        """Fine-tune the chosen arch alone.

        An arch whose stages are all full width computes the static network plus exit heads,
        so it keeps the static weights untouched (the supernet's shared weights lose
        accuracy to the narrow archs) and only its heads are fitted: training its backbone with its exits, 1500 KD
        steps from the static weights, lowered every exit on both zoo models (ResNet-20's shipped stem exit 90.1 ->
        87.1 % on validation, at lr 0.02 or 0.002, batch-norm statistics per batch or frozen). Any other arch is
        fine-tuned from the importance-ordered static weights, distilled from the static model;
        a cascade's recomputed static last stage is distilled first, on its own.
        """
        self.clock.start("finetune")
        self.load_supernet()
        arch = self.chosen_arch(keep_thresholds=True)
        if arch.is_full_width:  # no training: rank 0 fits the heads, the others wait for its checkpoint
            if distributed.current().is_main:
                self._fit_heads_on_static(arch)
            distributed.barrier()
        else:
            raced = [self._searched_part(MultiStageArch.from_dict(a))
                     for a in self.state.get("search", {}).get("race", [])]
            if any(a.is_cascade for a in [arch, *raced]):  # before the race: every candidate ends in the same copy
                self.distil_static_stage()
            steps = self.budget.narrow_finetune_steps or self.budget.finetune_steps
            cfg = self.train_config(steps)
            cfg.lr = FINETUNE_LR
            if len(raced) > 1:
                arch = self.race(raced, cfg)
            if not (self.run.checkpoints / "finetune.pt").exists():  # a resumed fine-tune has its weights there
                self._start_finetune()
            train_archs(self.supernet, self.teacher, self.data, lambda rng: [arch], cfg, self.run,
                        ckpt_name="finetune.pt", tag="finetune", device=self.cfg.device, progress=self.progress)
        self._done("finetune", checkpoint="checkpoints/finetune.pt")

    def _start_finetune(self) -> None:
        """Start an arch's fine-tune from the importance-ordered static weights, as a static pruner does: measured on
        ResNet-20 (width 0.5, 1500 steps) 92.65 % test from them against 91.9 % from the shared supernet weights,
        which the narrow archs' training pulls away from the static ones."""
        self.supernet.restore_static(self.ordered)
        self._arch_statistics(self.supernet)

    def race(self, archs: list[MultiStageArch], cfg: SupernetConfig) -> MultiStageArch:
        """One round of successive halving, straight down to one arch: fine-tune each the first ``race_steps`` steps
        of its schedule, score it again on the search's validation images (the search's reward, the arch now trained
        alone), and go on with the best one from where it stopped; the others' checkpoints are deleted. The choice
        is recorded (``state.json``'s ``race``, TensorBoard text ``finetune/race``) and a resumed run keeps it."""
        ckpts = self.run.checkpoints
        # named after the arch, so that a checkpoint can only ever resume the arch it trained
        names = [f"race-{hashlib.sha1(a.key().encode()).hexdigest()[:12]}.pt" for a in archs]
        done = self.state.get("race")
        if done is None:
            started, scores = time.perf_counter(), []
            # the whole search split and no archive: the archive keeps the supernet's scores
            evaluator = self.evaluator(None, full_width=False)
            for i, arch in enumerate(archs):
                if not (ckpts / names[i]).exists():
                    self._start_finetune()
                train_archs(self.supernet, self.teacher, self.data, lambda rng, arch=arch: [arch], cfg, self.run,
                            ckpt_name=names[i], tag=f"finetune/race{i}", device=self.cfg.device,
                            progress=self.progress, until=self.budget.race_steps)
                checkpoint.load_into(self.supernet, checkpoint.load(ckpts / names[i])["state_dict"],
                                     str(ckpts / names[i]))  # when it was done earlier, train_archs loaded nothing
                self._arch_statistics(self.supernet)
                scores.append(evaluator.evaluate(arch).to_record())
            winner = distributed.broadcast(max(range(len(archs)), key=lambda i: (scores[i]["reward"], -i)))
            done = {"steps": self.budget.race_steps, "winner": winner, "arch": archs[winner].to_dict(),
                    "scores": [{"arch": stages_summary(a.to_dict()),
                                **{k: sc[k] for k in ("reward", "mac_ratio", "accuracy", "meets_target")}}
                               for a, sc in zip(archs, scores, strict=True)],
                    "seconds": time.perf_counter() - started}
            self._record_race(done)
        winner = done["winner"]
        # (a winner's checkpoint gone missing: its fine-tune starts again from the static weights)
        if not (ckpts / "finetune.pt").exists() and (ckpts / names[winner]).exists() and distributed.current().is_main:
            (ckpts / names[winner]).replace(ckpts / "finetune.pt")
        distributed.barrier()
        if distributed.current().is_main:
            for name in names:
                (ckpts / name).unlink(missing_ok=True)
        return MultiStageArch.from_dict(done["arch"])

    def _record_race(self, done: dict[str, Any]) -> None:
        self.state["race"] = done
        if not distributed.current().is_main:
            return
        write_json_atomic(self.state_path, self.state)
        write_json_atomic(self.run.root / "best_arch.json", done["arch"])
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.run.tensorboard / "finetune")) as writer:
            writer.add_text("finetune/race", "\n".join(race_markdown(done)))
            for i, sc in enumerate(done["scores"]):
                writer.add_scalar("finetune/race_mac_ratio", sc["mac_ratio"], i)

    def distil_static_stage(self) -> None:
        """Distil the copy of the static network that a cascade's last stage recomputes, from the static model,
        with the recipe of the pruning peers (``kd_finetune``). Left untouched, that stage caps the cascade at the
        static accuracy wherever images reach it, while a distilled peer ends above its teacher (ResNet-20, 40 min:
        93.60 % against 93.50 %). Its weights share nothing with the narrow stages, so training it apart from them
        is the same as training them jointly, one batch stream each. Rank 0 trains; every rank loads its result."""
        steps = self.budget.static_stage_steps
        if not steps:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = self.run.checkpoints / "static_stage.pt"
        stage = self.supernet.reference.module
        if distributed.current().is_main:
            student = copy.deepcopy(stage).requires_grad_(True)
            with SummaryWriter(str(self.run.tensorboard / "finetune")) as writer:
                kd_finetune(student, self.teacher, self.data, steps=steps, batch_size=self.budget.batch_size,
                            lr=FINETUNE_LR, seed=self.cfg.seed, checkpoint_path=path, writer=writer,
                            progress=self.progress, device=self.cfg.device, tag="finetune/static_stage")
        distributed.barrier()
        checkpoint.load_into(stage, checkpoint.load(path)["state_dict"], str(path))
        stage.eval()

    def _fit_heads_on_static(self, arch: MultiStageArch) -> None:
        """The heads-only fine-tune: the static weights, and the heads the search scored ``arch`` with."""
        from torch.utils.tensorboard import SummaryWriter

        path = self.run.checkpoints / "finetune.pt"
        if path.exists():
            return
        self.supernet.restore_static(self.ordered)
        for (_, head), (_, fitted) in zip(exit_heads(self.supernet, arch), exit_heads(self.full_width_supernet(), arch),
                                          strict=True):
            head.load_state_dict(fitted.state_dict())
        with SummaryWriter(str(self.run.tensorboard / "finetune")) as writer:
            for k, v in probe(self.supernet, [arch], self.data, device=self.cfg.device,
                              images=self.budget.probe_images).items():
                writer.add_scalar(f"finetune/val_{k.replace('arch0', 'arch')}", v, 0)
        checkpoint.save_atomic({"state_dict": self.supernet.state_dict(), "static_backbone": True}, path)

    def chosen_arch(self, keep_thresholds: bool = False) -> MultiStageArch:
        """The searched arch (``state.json``'s search result, else ``best_arch.json``: the report rewrites that
        file with the shipped network, which after a fallback is not the one fine-tuned, so a re-run of the
        report must not read it back); calibrated thresholds are dropped, searched ones kept."""
        best = self.state.get("race", {}).get("arch") or self.state.get("search", {}).get("best", {}).get("arch")
        arch = MultiStageArch.from_dict(best if best else json.loads((self.run.root / "best_arch.json").read_text()))
        return arch if keep_thresholds else self._searched_part(arch)

    def _searched_part(self, arch: MultiStageArch) -> MultiStageArch:
        """``arch`` without the thresholds its evaluation calibrated (those belong to the network it was scored
        as); searched ones (``--search-thresholds``) are part of the candidate and stay."""
        return MultiStageArch(arch.stages, arch.exit_rule, arch.thresholds if self.cfg.search_thresholds else ())

    def _static_stage(self, key: str) -> contextlib.AbstractContextManager[None]:
        """Run a cascade's last stage on its distilled copy (as fine-tuned) or on the untouched static weights."""
        return self.supernet.reference_weights(self.ordered) if key == "untouched" else contextlib.nullcontext()

    def load_finetuned(self) -> SuperNet:
        """The supernet with the chosen arch's fine-tuned weights (``checkpoints/finetune.pt``)."""
        path = self.run.checkpoints / "finetune.pt"
        state = checkpoint.load(path)
        checkpoint.load_into(self.supernet, state["state_dict"], str(path))
        if state.get("static_backbone"):  # the static network's own batch-norm statistics are the right ones
            self.supernet.use_arch_statistics(None)
        return self.supernet

    def save_dynamic(self, arch: MultiStageArch, supernet: SuperNet | None = None) -> Path:
        """``checkpoints/dynamic.pt``: what rebuilds the deployed network (``s2d export``), from ``supernet``
        (default: the fine-tuned one)."""
        info = self.data.info
        meta = {"model": self.cfg.model, "num_classes": info.num_classes, "in_channels": info.in_channels,
                "image_size": info.image_size, "dataset": info.name}
        path = self.run.checkpoints / "dynamic.pt"
        checkpoint.save_atomic(dynamic_checkpoint(supernet or self.supernet, arch, meta), path)
        return path

    def report_phase(self) -> dict[str, Any]:
        """Every figure of the report, on the test split: the static model, the baselines and the
        searched arch on the supernet, and the chosen network after its fine-tune, with its operating
        points. Thresholds are calibrated on validation data for every row, never on test data."""
        self.clock.start("report")
        device = self.cfg.device
        static = evaluate_static(self.static, self.data, device=device, limit=self.budget.test_limit)
        meter = RowMeter(self.static, static, self.data, device=device, limit=self.budget.test_limit,
                         repeats=self.budget.speed_repeats, latency_images=self.budget.latency_images,
                         rounds=self.budget.speed_rounds)
        self.load_supernet()
        chooser = self.threshold_chooser(full_width=True)
        baselines = self.space.baselines()
        rows = [meter.row(f"{name} (supernet)", chooser, arch)[0] for name, arch in baselines.items()]
        depth_only = rows[list(baselines).index("depth_only")]
        chosen = self.chosen_arch()
        rows.append(meter.row("searched (supernet)", chooser, chosen)[0])
        self.load_finetuned()
        chooser = self.threshold_chooser(full_width=False)
        chosen = self._with_exit_fit(chooser, chosen)
        fallback = self.state.get("search", {}).get("fallback")
        # A cascade whose static stage was distilled has a twin that ends in the untouched static network: it never
        # disagrees with the static model where images reach the last stage, so a tight tolerance can be certified
        # on it when the distilled copy's own disagreements (a few dozen calibration images each way) already
        # bound the drop above the tolerance. Each twin is certified at half the risk and the cheaper one ships.
        twin = (not self.budget_mode and not fallback and chosen.is_cascade
                and (self.run.checkpoints / "static_stage.pt").exists())
        choosers = {"distilled": chooser}
        if twin:
            share = 1 - (1 - self.cfg.confidence) / 2
            choosers = {key: self.threshold_chooser(full_width=False, confidence=share) for key in STATIC_STAGES}
        static_stage = "distilled"
        if not self.budget_mode and not fallback:
            ratios: dict[str, float | None] = {}
            for key, ch in choosers.items():
                with self._static_stage(key):
                    tuned, cert = ch.choose(chosen)
                    ratios[key] = None if cert is None else ch.calib_mac_ratio(tuned)
            saving = {k: r for k, r in ratios.items() if r is not None and r < 1}
            if saving:
                static_stage = min(saving, key=saving.__getitem__)  # the first of equals: the distilled one
                chooser = choosers[static_stage]
            elif all(r is None for r in ratios.values()):
                fallback = (f"the fine-tuned network cannot be shown to keep the {self.cfg.tolerance}-point "
                            f"tolerance at {self.cfg.confidence:.0%} confidence on the calibration split (try "
                            "--budget full or a larger --tolerance)")
            else:  # e.g. a cascade whose certified setting exits nobody
                fallback = (f"the fine-tuned network keeps the {self.cfg.tolerance}-point tolerance only with "
                            "thresholds that save no MACs over the static network (try --budget full or a larger "
                            "--tolerance)")
        name = "searched + fine-tuned"
        if fallback:  # the cheapest network that keeps the promise: depth-only exits on the static weights, or it
            certified = depth_only["certificate"] is not None and depth_only["mac_ratio"] < 1
            chosen = baselines["depth_only"] if certified else static_arch()
            name = f"shipped: {'depth-only exits on the static network' if certified else 'static network'} (fallback)"
            fallback += f"; shipped: {name.removeprefix('shipped: ').removesuffix(' (fallback)')}"
            chooser = self.threshold_chooser(full_width=True)  # the static weights (and probe heads)
            chosen = self._with_exit_fit(chooser, chosen)
            twin, choosers, static_stage = False, {"distilled": chooser}, "distilled"
        tests, twin_points = {}, {}
        for key, ch in choosers.items():
            with self._static_stage(key):
                tests[key] = meter.test_outputs(ch.calib, chosen)
                twin_points[key] = ch.operating_points(chosen, tests[key], static)
                if key == static_stage:  # the shipped network: its row, budget points and checkpoint
                    dyn, final = meter.row(name, ch, chosen, tests[key])
                    budget_points = meter.budget_points(ch, final, tests[key])
                    self.save_dynamic(final, ch.calib.network_for(final))
        meter.time_rows()  # every row and budget point, together
        rows.append({**dyn, "static_stage": static_stage} if twin else dyn)
        points = cheapest_points(twin_points) if twin else twin_points["distilled"]
        write_json_atomic(self.run.root / "best_arch.json", final.to_dict())
        report = {
            "model": self.cfg.model, "dataset": self.cfg.dataset, "budget": self.cfg.budget, "algo": self.cfg.algo,
            "tolerance_points": self.cfg.tolerance, "target_mac_ratio": self.cfg.target_mac_ratio,
            "target_latency_ms": self.cfg.target_latency_ms,
            "static": {k: v for k, v in static.items() if k != "macs_by_operator"},
            "static_val_accuracy": chooser.val.static_accuracy, "static_calib_accuracy": chooser.calib.static_accuracy,
            "confidence": self.cfg.confidence, "calib_images": len(self.calib), "dynamic": dyn, "rows": rows,
            "operating_points": points, "budget_points": budget_points,
            "search": self.state.get("search", {}).get("summaries", {}), "threads": torch.get_num_threads(),
            "layout": INFERENCE_LAYOUT, "fallback": fallback, "static_stage": static_stage if twin else None,
            "race": self.state.get("race"),
        }
        write_report(self.run.root, report, self.archive.records())
        self._done("report", report="report.md")
        return report

    def run_all(self) -> dict[str, Any]:
        """Every phase not done yet. Under torchrun the training phases run data-parallel on every rank;
        the search and the report, on rank 0 while the others wait, and its results reach them all."""
        try:
            return self._run_phases()
        finally:
            self.clock.halt()  # a phase that raised leaves its last heartbeat, as a kill does

    def _run_phases(self) -> dict[str, Any]:
        world = distributed.current()
        if "supernet" not in self.state:
            self.supernet_phase()
        if "search" not in self.state:
            if world.is_main:
                self.search_phase()
            self.state = distributed.broadcast(self.state)
        if "finetune" not in self.state:
            self.finetune_phase()
        report = self.run.root / "report.json"
        if "report" in self.state and report.exists():  # finished: re-measuring would only add timing noise
            return json.loads(report.read_text())
        return distributed.broadcast(self.report_phase() if world.is_main else None)
