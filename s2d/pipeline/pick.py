"""``s2d pick``: another operating point of a finished conversion, without training a supernet or searching again.

A conversion's archive holds every arch its search scored (validation accuracy against average MACs), so the
accuracy/cost trade-off it found is already there: :func:`list_front` writes its Pareto front
(``R/front.{md,json,png}``) next to the static model's accuracy on the same validation images. :func:`pick` then
ships the point a user asks for (an accuracy drop, or an average-MAC budget) as a child run
(``R/picks/drop-P`` or ``R/picks/macs-X``): R's configuration with the new promise, R's trained supernet (hard
link), and as its search the re-scoring of R's best archs under the new objective (their thresholds depend on
it), chosen the way ``s2d convert`` chooses; the fine-tune and the certified report follow as in a conversion.
Nothing in R is written except the front files and the ``picks/`` folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from s2d.data import Dataset, calibration_split, default_calib_size, load_dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import logits
from s2d.measure.guarantee import min_calibration_images
from s2d.models.zoo import load_model
from s2d.pipeline.convert import BUDGETS, ConvertConfig, Pipeline
from s2d.pipeline.format import stages_summary
from s2d.runs import write_json_atomic, write_text_atomic
from s2d.search.archive import Archive, pareto_front
from s2d.search.runner import summarise
from s2d.transform.arch import MultiStageArch

TOP_BY_REWARD = 20  # besides the front (and the seeds), the parent's best archs by its reward are re-scored
PICKS = "picks"  # the children's folder inside the parent run


@dataclass(frozen=True)
class Conversion:
    """A finished conversion's run directory, checked to hold what a pick reuses."""

    root: Path
    cfg: ConvertConfig
    archive: Archive
    state: dict[str, Any]


def open_conversion(run_dir: str | Path) -> Conversion:
    """R read-only, or one line saying what is missing: the run, its trained supernet, its archive."""
    root = Path(run_dir)
    if not root.is_dir():
        raise S2DError(f"run directory {root} does not exist; pass the --run-dir of a finished s2d convert")
    cfg = ConvertConfig.from_run(root)
    state_path = root / "state.json"
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
    except (OSError, json.JSONDecodeError):
        raise S2DError(f"{state_path} is unreadable; re-run s2d convert --run-dir {root} to repair it") from None
    if "supernet" not in state or not (root / "checkpoints" / "supernet.pt").exists():
        raise S2DError(f"{root} has no trained supernet (checkpoints/supernet.pt of a finished supernet phase); "
                       f"run s2d convert --run-dir {root} first")
    archive = Archive(root / "archive.jsonl")
    if not len(archive):
        raise S2DError(f"{root} has an empty archive (archive.jsonl): its search scored nothing to pick from; "
                       f"run s2d convert --run-dir {root} to finish it")
    return Conversion(root, cfg, archive, state)


def static_validation_accuracy(cfg: ConvertConfig, data: Dataset | None = None) -> tuple[float, int]:
    """The static model's accuracy on the images the archive's accuracies were measured on (the search's
    validation images), and their number: a drop is only meaningful on the same images."""
    data = data or load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)
    search_val, _ = calibration_split(data.val, cfg.calib_size or default_calib_size(len(data.val)), seed=cfg.seed)
    val = search_val.subset(BUDGETS[cfg.budget].search_val_images)
    static = load_model(cfg.model, data.info, cfg.weights).to(cfg.device)
    correct = logits(static, val, data.info, device=cfg.device).argmax(1) == val.labels
    return correct.float().mean().item(), len(val)


def front_rows(records: list[dict[str, Any]], static_accuracy: float) -> list[dict[str, Any]]:
    """The archive's Pareto front (higher accuracy, fewer average MACs), cheapest first, each with its drop."""
    return [{"key": r["key"], "arch": r["arch"], "stages": stages_summary(r["arch"]), "searcher": r.get("searcher", ""),
             "accuracy": r["accuracy"], "drop_points": (static_accuracy - r["accuracy"]) * 100,
             "average_macs": r["average_macs"], "mac_ratio": r["mac_ratio"], "reward": r["reward"],
             "meets_target": r["meets_target"],
             # predicted by the latency table when the search had one (--cost latency|throughput)
             "latency_ratio": r.get("extra", {}).get("latency_ratio"),
             "batch_time_ratio": r.get("extra", {}).get("batch_time_ratio")} for r in pareto_front(records)]


def front_markdown(front: dict[str, Any]) -> str:
    """``front.md``: the table ``s2d pick --list`` prints."""
    lines = [f"# Pareto front of {front['run_dir']}: {front['model']} on {front['dataset']}", "",
             f"{len(front['front'])} of the {front['archive_records']} archs its search scored are on the front "
             f"(validation accuracy against average MACs, each at the thresholds the search gave it for a "
             f"{front['tolerance_points']:g}-point tolerance" +
             (f" / a {front['target_mac_ratio']:g} MAC budget" if front["target_mac_ratio"] is not None else "") +
             f"). Static model: {front['static_val_accuracy'] * 100:.2f} % on the same {front['val_images']} "
             "validation images.", "",
             "| # | val acc (%) | drop (points) | MAC ratio | fewer MACs | predicted latency ratio (b1 / b256) "
             "| stages | searcher |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(front["front"], 1):
        time = (f"{r['latency_ratio']:.3f} / {r['batch_time_ratio']:.3f}" if r.get("latency_ratio") is not None
                else "-")
        lines.append(f"| {i} | {r['accuracy'] * 100:.2f} | {r['drop_points']:.2f} | {r['mac_ratio']:.3f} | "
                     f"{1 / r['mac_ratio']:.2f}x | {time} | {r['stages']} | {r['searcher']} |")
    lines += ["", "Ship one: `s2d pick --run-dir R --max-drop POINTS` (certified on the calibration split) or "
              "`--target-mac-ratio X`; the archs are re-scored for the new promise, then fine-tuned and calibrated "
              "as in s2d convert. A drop here is in-sample: the certified one costs a little more.", ""]
    return "\n".join(lines)


def list_front(run_dir: str | Path, *, device: str = "cpu", data: Dataset | None = None) -> dict[str, Any]:
    """R's front with drops against the static model, written to ``R/front.{json,md,png}`` (nothing else in R)."""
    from s2d.pipeline.plots import plot_front

    conv = open_conversion(run_dir)
    cfg = replace(conv.cfg, device=device)
    static_acc, val_images = static_validation_accuracy(cfg, data)
    records = conv.archive.records()
    front = {"run_dir": str(conv.root), "model": cfg.model, "dataset": cfg.dataset,
             "tolerance_points": cfg.tolerance, "target_mac_ratio": cfg.target_mac_ratio,
             "static_val_accuracy": static_acc, "val_images": val_images, "archive_records": len(records),
             "front": front_rows(records, static_acc)}
    write_json_atomic(conv.root / "front.json", front)
    write_text_atomic(conv.root / "front.md", front_markdown(front))
    plot_front(records, front, conv.root / "front.png")
    return front


def candidate_records(records: list[dict[str, Any]], top: int = TOP_BY_REWARD) -> list[dict[str, Any]]:
    """The parent's archs worth re-scoring, in archive order: its front, its ``top`` best by reward and the
    seeds (the known-good archs a conversion always weighs). Re-scoring all of a full search's archive would
    cost as much as the search's evaluations did."""
    keep = {r["key"] for r in pareto_front(records)}
    keep |= {r["key"] for r in sorted(records, key=lambda r: r["reward"], reverse=True)[:top]}
    keep |= {r["key"] for r in records if r.get("searcher") == "seed"}
    return [r for r in records if r["key"] in keep]


def check_choice(max_drop: float | None, target_mac_ratio: float | None) -> None:
    """Exactly one promise, with a value that means something."""
    if (max_drop is None) == (target_mac_ratio is None):
        raise S2DError("give one operating point: --max-drop POINTS (accuracy) or --target-mac-ratio X (budget)")
    if max_drop is not None and not (math.isfinite(max_drop) and 0 < max_drop < 100):
        raise S2DError(f"--max-drop is in accuracy points below the static model, in (0, 100), e.g. 0.3; "
                       f"got {max_drop}")
    if target_mac_ratio is not None and not (math.isfinite(target_mac_ratio) and 0 < target_mac_ratio <= 1):
        raise S2DError(f"--target-mac-ratio is a fraction of the static MACs in (0, 1], e.g. 0.25 for 4x fewer; "
                       f"got {target_mac_ratio}")


def pick_config(parent: ConvertConfig, *, max_drop: float | None, target_mac_ratio: float | None,
                device: str = "cpu") -> ConvertConfig:
    """R's configuration with the new promise: the same model, data, split and supernet, so the child's
    evaluator scores on the very images R's did."""
    check_choice(max_drop, target_mac_ratio)
    if max_drop is not None:
        calib = parent.calib_size
        need = min_calibration_images(max_drop / 100)
        if calib is not None and calib < need:
            raise S2DError(f"the conversion's calibration split ({calib} images) is too small to certify a "
                           f"{max_drop:g}-point drop (one lost image is {100 / calib:.3g} points; it needs {need} "
                           f"images); pick a larger --max-drop")
        return replace(parent, tolerance=max_drop, target_mac_ratio=None, target_macs=None, target_latency_ms=None,
                       device=device, workers=1, ray_address=None)
    return replace(parent, target_mac_ratio=target_mac_ratio, target_macs=None, target_latency_ms=None,
                   device=device, workers=1, ray_address=None)


def default_pick_dir(parent: Path, *, max_drop: float | None, target_mac_ratio: float | None) -> Path:
    """``R/picks/drop-P`` or ``R/picks/macs-X``: one child per promise, so picking it again resumes it."""
    name = f"drop-{max_drop:g}" if max_drop is not None else f"macs-{target_mac_ratio:g}"
    return parent / PICKS / name


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (a copy across filesystems), appearing at once. Every checkpoint write
    replaces its file rather than rewriting it, so nothing written in the child reaches the parent's file."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class PickPipeline(Pipeline):
    """A conversion whose supernet phase adopts the parent's trained supernet and whose search re-scores the
    parent's archs under this run's objective; the fine-tune and report are the conversion's own."""

    def __init__(self, cfg: ConvertConfig, run_dir: str | Path, parent: Conversion, *, progress: bool = True,
                 data: Dataset | None = None, top: int = TOP_BY_REWARD) -> None:
        super().__init__(cfg, run_dir, progress=progress, data=data)
        self.parent, self.top = parent, top

    def supernet_phase(self) -> None:
        """R's checkpoint, linked in; its training time is the cost of this phase too. So is R's latency table
        (its stage times are of this supernet on this machine), when R has one."""
        link_or_copy(self.parent.root / "checkpoints" / "supernet.pt", self.run.checkpoints / "supernet.pt")
        table = self.parent.root / "latency_table.json"
        if table.exists() and not (self.run.root / table.name).exists():
            link_or_copy(table, self.run.root / table.name)
        parent = self.parent.state["supernet"]
        self._done("supernet", checkpoint="checkpoints/supernet.pt", reused_from=str(self.parent.root),
                   **({"seconds": parent["seconds"]} if "seconds" in parent else {}))

    def search_phase(self, algos: list[str] | None = None) -> dict[str, Any]:
        """No search: R's candidates (:func:`candidate_records`) scored by this run's evaluator, under its
        objective, into its own archive (a killed pick resumes without re-scoring), then chosen as a
        conversion chooses. Each keeps the searcher R found it with."""
        self.clock.start("search")
        self.load_supernet()
        ev = self.evaluator(self.budget.search_val_images)
        log = []
        candidates = candidate_records(self.parent.archive.records(), self.top)
        for n, rec in enumerate(tqdm(candidates, desc="re-scoring", disable=not self.progress), 1):
            arch = MultiStageArch.from_dict(rec["arch"])
            if not self.cfg.search_thresholds:  # R's thresholds were calibrated for R's promise
                arch = MultiStageArch(arch.stages, arch.exit_rule)
            e = ev.evaluate(arch, searcher=rec.get("searcher", ""))
            log.append({**e.to_record(), "key": ev.archive_key(arch), "n": n})
        summary = {**summarise(log, ev.objective.tolerance), "parent_run": str(self.parent.root),
                   "parent_archive_records": len(self.parent.archive), "scored_here": ev.evaluations}
        self.record_choice({"pick": summary})
        return {"pick": summary}


def pick(run_dir: str | Path, *, max_drop: float | None = None, target_mac_ratio: float | None = None,
         out: str | Path | None = None, device: str = "cpu", progress: bool = True, data: Dataset | None = None,
         top: int = TOP_BY_REWARD) -> tuple[Path, dict[str, Any]]:
    """Ship the operating point of R's front a promise asks for, as the child run ``out`` (default
    :func:`default_pick_dir`); returns its directory and report. Resumable like a conversion."""
    conv = open_conversion(run_dir)
    cfg = pick_config(conv.cfg, max_drop=max_drop, target_mac_ratio=target_mac_ratio, device=device)
    child = Path(out) if out is not None else default_pick_dir(conv.root, max_drop=max_drop,
                                                               target_mac_ratio=target_mac_ratio)
    if child.resolve() == conv.root.resolve():
        raise S2DError(f"--out {child} is the conversion itself; a pick goes into a run directory of its own")
    p = PickPipeline(cfg, child, conv, progress=progress, data=data, top=top)
    return p.run.root, p.run_all()
