"""``s2d bench peers``: s2d against the alternatives a user has, on the same model, data split and wall clock.

A conversion's report compares the searched network with the static model and with baselines
carved from the same supernet. A user deciding whether s2d is worth it compares it with what
they would do otherwise, so this bench runs those alternatives on the conversion's own model,
weights and train/validation/test split:

* Torch-Pruning static pruning at a few MAC ratios, each KD fine-tuned for as long as the whole
  conversion took (the fair budget: "what does the same CPU time buy"), see ``training.prune``;
* the SDN-style depth-only network (the report's ``depth_only`` row: exits on the static backbone);
* s2d's searched network at its operating points;
* the oracle bound: s2d's stages with exits chosen by an oracle that knows the label.

Every speed ratio is paired with the deployed static model (``measure.timing.paired_speed``).
Peers are checkpointed under ``R/peers/`` and recorded in ``R/peers/peers.json`` as each
finishes, so a killed run continues and a finished peer is never retrained (only timed again when it was
timed in another memory layout than today's deployed networks). Outputs:
``peers.json``, ``peers.md`` and ``peers.png``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from s2d import checkpoint
from s2d.data import Dataset, DatasetInfo, Split, load_dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import StageOutputs, logits, stage_outputs
from s2d.measure.calibration import RULE_BOUND_POINTS, threshold_rule_bound
from s2d.measure.cost import stage_macs, static_cost
from s2d.measure.network import RATIO_KEYS, paired_figures_in_rounds
from s2d.measure.significance import paired_comparison
from s2d.measure.timing import deployable
from s2d.models.zoo import load_model
from s2d.runs import PHASES, write_json_atomic, write_text_atomic
from s2d.training.distill import kd_finetune
from s2d.training.prune import prune_to_mac_ratio, restore_pruned
from s2d.transform.stages import INFERENCE_LAYOUT

if TYPE_CHECKING:
    from s2d.transform.arch import MultiStageArch
    from s2d.transform.supernet import SuperNet

DEFAULT_RATIOS = (1 / 2, 1 / 3, 1 / 4)
NOT_CONVERSION = ("peers", "bench_rank")  # run-directory folders written after the conversion, by benches
CONVERSION_END = ("report.json", "report.md", "pareto.png", "state.json")  # written last, by the report phase
LATENCY_IMAGES = 200  # single test images of the batch-1 latency ratio (as the report's rows)
REPEATS = 10  # batch-256 calls per side of the throughput ratio (as the report's rows)
ROUNDS = 5  # every network of the table is timed once per round, all in the same time window

Log = Callable[[str], None]


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None: peers.json stays strict JSON (e.g. a fine-tune whose budget
    ran out while probing has no step time), and what run_peers returns equals what it saved."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def ratio_key(ratio: float) -> str:
    """The name of a MAC ratio in file names and peers.json (``0.3333`` for 1/3)."""
    return f"{ratio:.4g}"


def _fmt_time(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _event_file_start(path: Path) -> float | None:
    """The creation time TensorBoard writes into an event file's name (``events.out.tfevents.<epoch>...``);
    its mtime is the last write, so the name is what dates the start of a phase."""
    parts = path.name.split(".")
    if len(parts) > 3 and parts[:3] == ["events", "out", "tfevents"] and parts[3].isdigit():
        return float(parts[3])
    return None


def conversion_seconds(run_dir: str | Path) -> tuple[float, str]:
    """How long the conversion in ``run_dir`` took, and how that was found out (to print).

    The sum of the per-phase ``seconds`` in ``state.json`` when every phase records one (the
    conversion's own wall clock over every process that ran a phase, a killed one included (``PhaseClock``), which
    leaves out pauses between a killed run and its resume);
    otherwise the span of the conversion's file times: from the oldest file (or TensorBoard event
    file creation) to the newest of the report phase's outputs (``report.json``, ``report.md``,
    ``pareto.png``, ``state.json``), the conversion's last writes. Other files are no end mark:
    reopening a run rewrites ``config.yaml`` and ``channel_order.json``, and benches write into
    the run directory later. The span includes any pause before a resume, so it overstates the
    cost after one.
    """
    root = Path(run_dir)
    state_path = root / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    phases = {k: state[k] for k in PHASES if isinstance(state.get(k), dict)}  # not the race: the fine-tune has it
    if phases and all(isinstance(v.get("seconds"), (int, float)) for v in phases.values()):
        total = float(sum(v["seconds"] for v in phases.values()))
        parts = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in phases.items())
        return total, f"sum of the phases' seconds in state.json ({parts})"
    starts = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if (not p.is_file() or rel.parts[0] in NOT_CONVERSION or p.name.startswith(".")
                or (rel.parts[0] == "tensorboard" and len(rel.parts) > 2 and rel.parts[1].startswith("peers_"))):
            continue
        mtime = p.stat().st_mtime
        starts.append(min(mtime, _event_file_start(p) or mtime))
    ends = [(root / n).stat().st_mtime for n in CONVERSION_END if (root / n).is_file()]
    if not ends or not starts:
        raise S2DError(f"{root} holds no report files to date the conversion by; pass --peer-seconds S")
    why = "state.json has no per-phase seconds" if phases else "no state.json phases"
    return max(ends) - min(starts), (f"span of the run directory's file times, {_fmt_time(min(starts))} to "
                                     f"{_fmt_time(max(ends))} ({why}; includes any pause before a resume)")


def oracle_bound(correct: torch.Tensor, stage_costs: Sequence[float], static_macs: float) -> dict[str, Any]:
    """The best any exit policy could do on these stages: each sample exits at the first stage that
    classifies it correctly, and at the first stage when none does (it is wrong whatever it pays).

    ``correct`` is (stages, samples) bool, ``stage_costs`` the incremental MACs of each stage. Not
    deployable (it needs the label), so it has no speed figure: it bounds accuracy and cost.
    """
    correct = correct.bool()
    hit = correct.any(0)
    exits = torch.where(hit, correct.int().argmax(0), torch.zeros_like(hit, dtype=torch.long))
    cumulative = torch.tensor(list(stage_costs), dtype=torch.float64).cumsum(0)
    avg = cumulative[exits].mean().item()
    rates = torch.bincount(exits, minlength=correct.shape[0]).double() / correct.shape[1]
    return {"test_accuracy": hit.double().mean().item(), "average_macs": avg, "mac_ratio": avg / static_macs,
            "exit_rates": rates.tolist(), "stage_accuracy": correct.double().mean(1).tolist()}


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per Torch-Pruning peer: is s2d's most accurate point with at least the peer's MAC
    reduction (``mac_ratio`` at most the peer's) at least as accurate as the peer? Where both rows carry
    ``test_wrong`` (the test images each gets wrong), McNemar's exact test says whether the gap is chance.

    Rows of kind ``torch-pruning`` are the peers, rows of kind ``s2d`` s2d's points (searched network
    and its operating points; not the depth-only baseline, not the oracle). ``s2d_wins`` is None when
    no s2d point reaches the peer's reduction.
    """
    s2d = [r for r in rows if r["kind"] == "s2d"]
    out = []
    for peer in (r for r in rows if r["kind"] == "torch-pruning"):
        reach = [r for r in s2d if r["mac_ratio"] <= peer["mac_ratio"]]
        best = max(reach, key=lambda r: (r["test_accuracy"], -r["mac_ratio"]), default=None)
        head = f"{peer['name']} ({1 / peer['mac_ratio']:.2f}x fewer MACs, {peer['test_accuracy'] * 100:.2f} %)"
        if best is None:
            most = max((1 / r["mac_ratio"] for r in s2d), default=float("nan"))
            line = f"{head}: no s2d point reaches {1 / peer['mac_ratio']:.2f}x fewer MACs (s2d's most: {most:.2f}x)"
            wins = None
        else:
            wins = best["test_accuracy"] >= peer["test_accuracy"]
            diff = (best["test_accuracy"] - peer["test_accuracy"]) * 100
            line = (f"{head}: s2d {'is at least as accurate' if wins else 'is LESS accurate'} -- {best['name']} "
                    f"{best['test_accuracy'] * 100:.2f} % at {1 / best['mac_ratio']:.2f}x ({diff:+.2f} points)")
        test = None
        if best is not None and best.get("test_wrong") is not None and peer.get("test_wrong") is not None:
            test = paired_comparison(best["test_wrong"], peer["test_wrong"])
            line += (f"; McNemar p = {test.p_value:.2g} ({test.a_only} images only s2d gets right, {test.b_only} only "
                     f"the pruned network): {'a significant' if test.significant() else 'not a significant'} "
                     "difference at 5 %")
        out.append({"peer": peer["name"], "peer_mac_ratio": peer["mac_ratio"],
                    "peer_test_accuracy": peer["test_accuracy"], "s2d_point": best["name"] if best else None,
                    "s2d_mac_ratio": best["mac_ratio"] if best else None,
                    "s2d_test_accuracy": best["test_accuracy"] if best else None, "s2d_wins": wins,
                    "p_value": test.p_value if test else None, "s2d_only_right": test.a_only if test else None,
                    "peer_only_right": test.b_only if test else None,
                    "significant": test.significant() if test else None, "line": line})
    return out


def _load_conversion(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    report_path = root / "report.json"
    if not report_path.exists():
        raise S2DError(f"{report_path} does not exist; run s2d convert first (`s2d convert --run-dir {root}`)")
    try:
        report = json.loads(report_path.read_text())
        config = yaml.safe_load((root / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise S2DError(f"{root} holds an unreadable report.json or config.yaml ({e}); re-run s2d convert") from None
    if not isinstance(config, dict) or "model" not in config or "static" not in report:
        raise S2DError(f"{root} is not a finished conversion (config.yaml or report.json incomplete); "
                       "run s2d convert first")
    return config, report


def wrong_images(model: nn.Module, test: Split, info: DatasetInfo, *, device: str) -> list[int]:
    """Indices of the test images ``model`` gets wrong: what a paired significance test needs."""
    correct = logits(model, test, info, device=device).argmax(1) == test.labels
    return torch.nonzero(~correct).flatten().tolist()


def wrong_images_at(outs: StageOutputs, thresholds: Sequence[float]) -> list[int]:
    """Indices of the test images a dynamic network gets wrong with early exits at ``thresholds``."""
    correct = outs.correct.gather(0, outs.exits(list(thresholds))[None])[0]
    return torch.nonzero(~correct).flatten().tolist()


def _finished_student(row: dict[str, Any], static: nn.Module, data: Dataset, *, device: str) -> nn.Module | None:
    """A finished peer's network, rebuilt from its checkpoint (None without one)."""
    ckpt = Path(row.get("checkpoint", ""))
    if not ckpt.is_file():
        return None
    info = data.info
    state = checkpoint.load(ckpt)
    return restore_pruned(static, state["state_dict"], (info.in_channels, info.image_size, info.image_size),
                          source=str(ckpt)).to(device).eval()


def _refresh_finished(row: dict[str, Any], static: nn.Module, data: Dataset, test: Split, *,
                      device: str) -> dict[str, Any]:
    """A finished peer, completed where an older s2d left it short: its test errors when they were not recorded.
    Only when the checkpoint rebuilds the network whose accuracy the row reports."""
    if row.get("test_wrong") is not None:
        return row
    student = _finished_student(row, static, data, device=device)
    if student is None:
        return row
    wrong = wrong_images(student, test, data.info, device=device)
    if abs(1 - len(wrong) / len(test) - row["test_accuracy"]) < 0.5 / len(test):  # else not the same network
        row["test_wrong"] = wrong
    return row


def _tp_peer(target: float, seconds: float, static: nn.Module, data: Dataset, test: Split, static_macs: float,
             root: Path, *, device: str, progress: bool, log: Log) -> dict[str, Any]:
    """Prune to ``target`` (or rebuild a killed run's student from its checkpoint), KD fine-tune, score on test
    (its speed is timed with every other network of the table, see :func:`run_peers`)."""
    info = data.info
    shape = (info.in_channels, info.image_size, info.image_size)
    key = ratio_key(target)
    ckpt = root / "peers" / f"tp_{key}.pt"
    if ckpt.exists():  # a killed run: same widths, same plan, the time already spent counted
        state = checkpoint.load(ckpt)
        if "state_dict" not in state:
            raise S2DError(f"{ckpt} is not a KD fine-tune checkpoint; delete it to prune again")
        student = restore_pruned(static, state["state_dict"], shape, source=str(ckpt))
        meta = dict(state.get("metadata") or {})
        log(f"Torch-Pruning 1/{1 / target:.3g}: resuming {ckpt} (step {state.get('step')})")
    else:
        start = time.perf_counter()
        pruned = prune_to_mac_ratio(static, shape, target)
        student = pruned.module
        meta = {"target_ratio": target, "pruning_ratio": pruned.pruning_ratio,
                "prune_seconds": time.perf_counter() - start}
        log(f"Torch-Pruning 1/{1 / target:.3g}: uniform pruning ratio {pruned.pruning_ratio:.4f} gives "
            f"{pruned.mac_ratio:.3f} of the MACs; KD fine-tune for {seconds:.0f} s")
    writer = SummaryWriter(str(root / "tensorboard" / f"peers_{key}"))
    try:
        ft = kd_finetune(student, deployable(static), data, seconds=seconds, checkpoint_path=ckpt, metadata=meta,
                         writer=writer, progress=progress, device=device, tag=f"peers_{key}")
        student.eval()
        wrong = wrong_images(student, test, info, device=device)
        acc = 1 - len(wrong) / len(test)
        writer.add_scalar(f"peers_{key}/test_accuracy", acc, ft["steps"])
    finally:
        writer.close()
    macs = static_cost(student, info).total_macs
    prune_s = float(meta.get("prune_seconds", 0.0))
    return {"name": f"Torch-Pruning 1/{1 / target:.3g}", "kind": "torch-pruning", "key": key,
            "target_ratio": target, "pruning_ratio": meta.get("pruning_ratio"), "test_accuracy": acc,
            "test_wrong": wrong,
            "average_macs": macs, "mac_ratio": macs / static_macs,
            "params": sum(p.numel() for p in student.parameters()),
            "seconds_budget": seconds,
            "finetune": ft,
            "prune_seconds": prune_s, "cost_seconds": prune_s + ft["seconds"], "checkpoint": str(ckpt)}


def _s2d_network(root: Path, config: dict[str, Any], data: Dataset, *, device: str) -> tuple[SuperNet, MultiStageArch]:
    """The conversion's deployed network, rebuilt from ``checkpoints/dynamic.pt``."""
    from s2d.pipeline.evaluate import dynamic_from_files

    return dynamic_from_files(data, str(root / "checkpoints" / "dynamic.pt"), model_name=config["model"], arch=None,
                              tolerance=0.0, device=device)


def _s2d_measured(root: Path, report: dict[str, Any], data: Dataset, test: Split, static_macs: float, static_acc: float,
                  network: Callable[[], tuple[SuperNet, MultiStageArch]], *, device: str) -> dict[str, Any]:
    """The oracle bound (with how near it a threshold rule can come) and the test images each operating and budget
    point gets wrong, from
    ``checkpoints/dynamic.pt`` (the points' speed is timed with the other networks, see :func:`run_peers`).

    Only when the rebuilt network reproduces the report's test accuracy at its thresholds (else
    the figures would be of another network): ``available`` False with the reason otherwise.
    """
    from s2d.transform.supernet import is_dynamic_checkpoint

    path = root / "checkpoints" / "dynamic.pt"
    if not path.exists():
        return {"available": False, "reason": f"{path} is missing"}
    if not is_dynamic_checkpoint(checkpoint.load(path)):
        return {"available": False, "reason": f"{path} is not a dynamic checkpoint of s2d convert"}
    supernet, arch = network()
    outs = stage_outputs(supernet, arch, test, data.info, device=device)
    here, there = outs.accuracy(list(arch.thresholds)), report.get("dynamic", {}).get("test_accuracy")
    if there is None or abs(here - there) > 2 / len(test) + 1e-9:
        return {"available": False, "reason": f"{path} scores {here:.4f} on the test images, the report says "
                                              f"{there}; it is not the reported network"}
    costs, _ = stage_macs(supernet.materialise(arch, fold_bn=False).stages, supernet.input_shape)
    wrong = {"dynamic": wrong_images_at(outs, arch.thresholds)}
    for point in report.get("budget_points", []):
        wrong[f"budget:{point['target_mac_ratio']}"] = wrong_images_at(outs, point["thresholds"])
    points = []
    for point in report.get("operating_points", []):
        if point.get("static_fallback"):  # the static network is the answer there: nothing of s2d's to time
            continue
        wrong[f"tol:{point['tolerance_points']}"] = wrong_images_at(outs, point["thresholds"])
        points.append({"tolerance_points": point["tolerance_points"], "thresholds": point["thresholds"],
                       "test_accuracy_here": outs.accuracy(point["thresholds"])})
    budget_points = [{"target_mac_ratio": p["target_mac_ratio"], "thresholds": p["thresholds"]}
                     for p in report.get("budget_points", [])]
    oracle = oracle_bound(outs.correct, costs, static_macs)
    oracle["threshold_rule"] = threshold_rule_bound(outs, costs, oracle_macs=oracle["average_macs"],
                                                    reference_accuracy=static_acc)
    return {"available": True, "sha256": checkpoint.sha256(path), "test_images": len(test),
            "oracle": oracle, "stage_macs": costs, "operating_points": points,
            "budget_points": budget_points, "test_wrong": wrong}


def _timed_networks(peers: list[dict[str, Any]], measured: dict[str, Any],
                    network: Callable[[], tuple[SuperNet, MultiStageArch]], static: nn.Module, data: Dataset, *,
                    device: str) -> dict[str, tuple[dict[str, Any], nn.Module]]:
    """Every network of the table that has a speed to measure here, deployed, with the record its figures go to:
    the peers (from their checkpoints) and s2d's operating and budget points (``checkpoints/dynamic.pt``)."""
    nets: dict[str, tuple[dict[str, Any], nn.Module]] = {}
    for row in peers:
        student = _finished_student(row, static, data, device=device)
        if student is not None:
            nets[row["name"]] = (row, deployable(student))
    if measured.get("available"):
        supernet, arch = network()
        net = supernet.materialise(arch)
        for point in measured["operating_points"]:
            nets[f"s2d @ {point['tolerance_points']} pts"] = (point, net.with_thresholds(point["thresholds"]))
        for point in measured["budget_points"]:
            nets[f"s2d @ budget {1 / point['target_mac_ratio']:.0f}x"] = \
                (point, net.with_thresholds(point["thresholds"]))
    return nets


def _report_speed(row: dict[str, Any], layout: str | None) -> dict[str, Any]:
    """A report row's paired speed ratios and where they came from: None when the report has none, or timed them
    in another memory layout than the rows measured here (``layout``: the report's)."""
    if row.get("throughput_ratio") is None or layout != INFERENCE_LAYOUT:
        return {"throughput_ratio": None, "latency_ratio": None, "speed_source": None}
    return {"throughput_ratio": row["throughput_ratio"], "latency_ratio": row.get("latency_ratio"),
            "speed_source": "report"}


def _report_rows(report: dict[str, Any], measured: dict[str, Any], static_acc: float,
                 conversion_s: float, static_wrong: list[int] | None = None) -> list[dict[str, Any]]:
    """The report's depth-only, searched + fine-tuned and operating-point rows, in the peers' terms; s2d's rows
    carry the test images they get wrong when the network was rebuilt here (``measured``)."""
    rows = []
    layout = report.get("layout")
    wrong = measured.get("test_wrong", {}) if measured.get("available") else {}
    timed_keys = (*RATIO_KEYS, *(f"{k}_range" for k in RATIO_KEYS))  # as paired_figures_in_rounds gives them
    depth = next((r for r in report.get("rows", []) if r["name"].startswith("depth_only")), None)
    if depth is not None:
        rows.append({"name": "SDN-style depth-only", "kind": "depth_only", "test_accuracy": depth["test_accuracy"],
                     "average_macs": depth["average_macs"], "mac_ratio": depth["mac_ratio"],
                     "exit_rates": depth.get("exit_rates"), **_report_speed(depth, layout),
                     "cost_seconds": None})
    dyn = report.get("dynamic")
    tol = report.get("tolerance_points")
    if dyn is not None:
        rows.append({"name": f"s2d searched + fine-tuned (tol {tol})", "kind": "s2d",
                     "test_accuracy": dyn["test_accuracy"], "average_macs": dyn["average_macs"],
                     "mac_ratio": dyn["mac_ratio"], "exit_rates": dyn.get("exit_rates"),
                     **_report_speed(dyn, layout),
                     "cost_seconds": conversion_s, "test_wrong": wrong.get("dynamic")})
    speeds = {p["tolerance_points"]: p for p in measured.get("operating_points", [])} if measured.get("available") \
        else {}
    for point in report.get("operating_points", []):
        sp = speeds.get(point["tolerance_points"])
        name = f"s2d @ {point['tolerance_points']} pts" + (" (static network)" if point.get("static_fallback") else "")
        rows.append({"name": name, "kind": "s2d",
                     "tolerance_points": point["tolerance_points"], "test_accuracy": point["test_accuracy"],
                     "average_macs": point["average_macs"], "mac_ratio": point["mac_ratio"],
                     "exit_rates": point.get("exit_rates"),
                     **({k: sp.get(k) for k in timed_keys} if sp else dict.fromkeys(RATIO_KEYS)),
                     "speed_source": "measured here" if sp else None, "cost_seconds": conversion_s,
                     "test_wrong": static_wrong if point.get("static_fallback")
                     else wrong.get(f"tol:{point['tolerance_points']}")})
    budget_speeds = {p["target_mac_ratio"]: p for p in measured.get("budget_points", [])} \
        if measured.get("available") else {}
    for point in report.get("budget_points", []):  # calibrated to the MAC budgets static pruning is compared at
        sp = budget_speeds.get(point["target_mac_ratio"])
        rows.append({"name": f"s2d @ budget {1 / point['target_mac_ratio']:.0f}x", "kind": "s2d",
                     "test_accuracy": point["test_accuracy"], "average_macs": point["average_macs"],
                     "mac_ratio": point["mac_ratio"], "exit_rates": point.get("exit_rates"),
                     **({k: sp.get(k) for k in timed_keys} | {"speed_source": "measured here"} if sp
                        else _report_speed(point, layout)),
                     "cost_seconds": conversion_s, "test_wrong": wrong.get(f"budget:{point['target_mac_ratio']}")})
    if measured.get("available"):
        o = measured["oracle"]
        rows.append({"name": "oracle exits on s2d's stages (bound)", "kind": "oracle",
                     **{k: v for k, v in o.items() if k != "threshold_rule"},
                     **dict.fromkeys(RATIO_KEYS), "speed_source": None, "cost_seconds": None})
    for r in rows:
        r["accuracy_delta_points"] = (r["test_accuracy"] - static_acc) * 100
    return rows


def run_peers(run_dir: str | Path, *, ratios: Sequence[float] = DEFAULT_RATIOS, seconds: float | None = None,
              device: str = "cpu", progress: bool = True, data: Dataset | None = None,
              test_limit: int | None = None, latency_images: int = LATENCY_IMAGES, repeats: int = REPEATS,
              rounds: int = ROUNDS, log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) the peers of the conversion in ``run_dir``; write ``R/peers/peers.{json,md,png}``.

    ``ratios`` are the Torch-Pruning peers' target MAC ratios (empty: no peers); ``seconds`` the KD
    fine-tune budget of each (None: as long as the conversion took, see :func:`conversion_seconds`).
    ``data`` (the conversion's split; loaded from its config when None) and ``test_limit`` (test images;
    None: as many as the report used), ``latency_images`` and ``repeats`` exist for quick runs.

    Every call times every deployable network of the table again, together, in ``rounds`` interleaved rounds
    (:func:`paired_figures_in_rounds`): a peer timed when it finished and an s2d point timed an hour later were
    not timed on the same machine. Nothing is trained again: peers come back from their checkpoints.
    """
    log = log or (print if progress else (lambda _s: None))
    root = Path(run_dir)
    config, report = _load_conversion(root)
    for r in ratios:
        if not (isinstance(r, (int, float)) and 0 < r < 1):
            raise S2DError(f"a peer's MAC ratio must be in (0, 1) (e.g. 0.5 for 2x fewer MACs), got {r}")
    if rounds < 1:
        raise S2DError(f"timing rounds must be >= 1, got {rounds}; pass --rounds 1 or more")
    if len({ratio_key(r) for r in ratios}) != len(ratios):
        raise S2DError(f"MAC ratios {list(ratios)} repeat one; give each once")
    conversion_s, conversion_how = conversion_seconds(root)
    if seconds is None:
        seconds, seconds_how = conversion_s, f"the conversion's wall clock: {conversion_how}"
    else:
        seconds_how = "--peer-seconds"
    if not (seconds > 0 and math.isfinite(seconds)):
        raise S2DError(f"the peers' fine-tune budget must be > 0 seconds, got {seconds}; pass --peer-seconds S")
    log(f"conversion took {conversion_s / 60:.1f} min ({conversion_how})")
    log(f"Torch-Pruning peers fine-tune for {seconds:.0f} s each ({seconds_how})")

    out_dir = root / "peers"
    out_path = out_dir / "peers.json"
    try:
        done: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    except ValueError as e:
        raise S2DError(f"{out_path} is unreadable ({e}); delete it (finished peers keep their checkpoints "
                       "and are measured again)") from None
    finished = {p["key"]: p for p in done.get("peers", [])}
    for key in (ratio_key(r) for r in ratios):
        old = finished.get(key)
        if old is not None and abs(old["seconds_budget"] - float(seconds)) > 0.5:  # the hint below is rounded
            raise S2DError(f"{out_path} holds the 1/{1 / old['target_ratio']:.3g} peer fine-tuned for "
                           f"{old['seconds_budget']:.0f} s, not {seconds:.0f} s; pass --peer-seconds "
                           f"{old['seconds_budget']:.6g} or delete {out_dir}")

    data = data or load_dataset(config["dataset"], data_dir=config.get("data_dir"), val_size=config.get("val_size"),
                                split_seed=config.get("split_seed", 0))
    test = data.test.subset(test_limit if test_limit is not None else report["static"].get("test_images"))
    static = load_model(config["model"], data.info, config.get("weights", "zoo")).to(device).eval()
    static_macs = static_cost(static, data.info).total_macs
    static_wrong = wrong_images(static, test, data.info, device=device)
    static_acc = 1 - len(static_wrong) / len(test)
    if abs(static_acc - report["static"]["test_accuracy"]) > 1e-6:
        log(f"warning: the static model scores {static_acc * 100:.2f} % here, the report says "
            f"{report['static']['test_accuracy'] * 100:.2f} %; deltas are against {static_acc * 100:.2f} %")
    reference = deployable(copy.deepcopy(static))

    def save(extra: dict[str, Any]) -> None:
        done.update({"run_dir": str(root), "model": config["model"], "dataset": config["dataset"],
                     "peer_seconds": float(seconds), "peer_seconds_source": seconds_how,
                     "conversion_seconds": conversion_s, "conversion_seconds_source": conversion_how,
                     "test_images": len(test), **extra})
        done.update(_json_safe(done))
        write_json_atomic(out_path, done)

    peers = []
    for target in ratios:
        key = ratio_key(target)
        if key in finished:
            log(f"Torch-Pruning 1/{1 / target:.3g}: finished before ({finished[key]['test_accuracy'] * 100:.2f} %)")
            peers.append(_refresh_finished(finished[key], static, data, test, device=device))
            continue
        row = _tp_peer(target, float(seconds), static, data, test, static_macs, root, device=device,
                       progress=progress, log=log)
        finished[key] = row
        peers.append(row)
        save({"peers": list(finished.values())})  # appended as it finishes: a killed run keeps it
        log(f"{row['name']}: {row['test_accuracy'] * 100:.2f} %, {1 / row['mac_ratio']:.2f}x fewer MACs")

    asked = {ratio_key(r) for r in ratios}
    for key, old in finished.items():  # peers of other ratios finished on this budget stay in the table
        if key not in asked and abs(old["seconds_budget"] - float(seconds)) <= 0.5:
            peers.append(_refresh_finished(old, static, data, test, device=device))
    peers.sort(key=lambda p: -p["target_ratio"])

    s2d_network = functools.cache(lambda: _s2d_network(root, config, data, device=device))  # built once, if at all
    measured = done.get("s2d_measured", {})
    dyn = root / "checkpoints" / "dynamic.pt"
    if not (measured.get("available") and dyn.exists() and measured.get("sha256") == checkpoint.sha256(dyn)
            and measured.get("test_images") == len(test) and "test_wrong" in measured
            and "threshold_rule" in measured.get("oracle", {})
            and all("thresholds" in p for p in measured.get("budget_points", []) + measured["operating_points"])):
        log("s2d: oracle bound and operating points from checkpoints/dynamic.pt")
        measured = _s2d_measured(root, report, data, test, static_macs, static_acc, s2d_network, device=device)
        if not measured["available"]:
            log(f"s2d: oracle bound not available: {measured['reason']}")

    nets = _timed_networks(peers, measured, s2d_network, static, data, device=device)
    figures = paired_figures_in_rounds(reference, {name: net for name, (_, net) in nets.items()}, test, data.info,
                                       rounds=rounds, device=device, latency_images=latency_images, repeats=repeats,
                                       log=log)
    for name, (record, _) in nets.items():
        record.update(figures[name], layout=INFERENCE_LAYOUT)
    for p in peers:
        p["speed_source"] = "measured here" if p["name"] in nets else None
        if p["name"] not in nets:  # its checkpoint is gone: no figure rather than one from another time window
            p.update(dict.fromkeys(RATIO_KEYS))
    if measured.get("available"):
        measured["layout"] = INFERENCE_LAYOUT

    static_row = {"name": "static", "kind": "static", "test_accuracy": static_acc, "average_macs": static_macs,
                  "mac_ratio": 1.0, "throughput_ratio": 1.0, "latency_ratio": 1.0, "speed_source": "by definition",
                  "cost_seconds": None, "accuracy_delta_points": 0.0, "test_wrong": static_wrong}
    for p in peers:
        p["accuracy_delta_points"] = (p["test_accuracy"] - static_acc) * 100
    rows = [static_row, *peers, *_report_rows(report, measured, static_acc, conversion_s, static_wrong)]
    result = {"static_test_accuracy": static_acc, "static_macs": static_macs, "rows": rows,
              "verdicts": verdicts(rows),
              "oracle": measured.get("oracle") if measured.get("available") else
              {"available": False, "reason": measured.get("reason")},
              "s2d_measured": measured}
    save({"peers": list(finished.values()), **result})
    write_text_atomic(out_dir / "peers.md", peers_markdown(done))
    plot_peers(done, out_dir / "peers.png")
    return done


def _cell(v: float | None, fmt: str, spread: list[float] | None = None) -> str:
    """A figure, with its range over timing rounds when it has one."""
    if v is None:
        return "—"
    return format(v, fmt) + ("" if spread is None else f" ({spread[0]:{fmt}}–{spread[1]:{fmt}})")


def rule_bound_line(rule: dict[str, Any], static_accuracy: float) -> str:
    """How near the oracle a threshold rule can come (:func:`threshold_rule_bound`), in words."""
    within = rule["within_oracle"]
    best = rule["accuracy_within"]
    at = ("no setting is that cheap" if best is None
          else f"at most {best * 100:.2f} % ({(best - static_accuracy) * 100:+.2f} points)")
    multiples = " / ".join("none" if rule.get(f"oracle_multiple_at_{p}") is None
                           else f"{rule[f'oracle_multiple_at_{p}']:.2f}x" for p in RULE_BOUND_POINTS)
    points = " / ".join(f"{p}" for p in RULE_BOUND_POINTS)
    return (f"How near the oracle any confidence-threshold rule on these stages can come (every setting of the "
            f"calibration grid, fitted on these very test images: a bound, not a network to ship): within {within}x "
            f"the oracle's MACs, {at}; within {points} points of the static model, at least {multiples} the "
            "oracle's MACs.")


def peers_markdown(res: dict[str, Any]) -> str:
    """``peers.md``: the table, the verdicts and where the figures come from (measures nothing)."""
    lines = [f"# s2d against its peers: {res['model']} on {res['dataset']}", "",
             f"Same model, weights and data split as the conversion in `{res['run_dir']}`; "
             f"{res['test_images']} test images. Torch-Pruning peers: KD fine-tune of "
             f"{res['peer_seconds']:.0f} s each ({res['peer_seconds_source']}). The conversion took "
             f"{res['conversion_seconds'] / 60:.1f} min ({res['conversion_seconds_source']}).", "",
             "| network | MACs fewer | test acc (%) | Δ points | b256 throughput ratio | b1 latency ratio | "
             "cost (min) |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cost = r.get("cost_seconds")
        lines.append(f"| {r['name']} | {1 / r['mac_ratio']:.2f}x | {r['test_accuracy'] * 100:.2f} | "
                     f"{r['accuracy_delta_points']:+.2f} | "
                     f"{_cell(r.get('throughput_ratio'), '.2f', r.get('throughput_ratio_range'))} | "
                     f"{_cell(r.get('latency_ratio'), '.2f', r.get('latency_ratio_range'))} | "
                     f"{_cell(None if cost is None else cost / 60, '.1f')} |")
    lines += ["", "Verdicts (s2d's most accurate point with at least the peer's MAC reduction):", ""]
    lines += [f"- {v['line']}" for v in res["verdicts"]] or ["- no Torch-Pruning peers were run"]
    oracle = res["oracle"]
    lines += ["", ("Oracle bound: exits chosen knowing the label (first correct stage; the first stage when none "
                   f"is): {oracle['test_accuracy'] * 100:.2f} % at {1 / oracle['mac_ratio']:.2f}x fewer MACs; no "
                   "exit rule on these stages can beat it, and it has no speed figure (it is not deployable).")
              if oracle.get("available", True) else f"Oracle bound: not available ({oracle['reason']})."]
    if oracle.get("threshold_rule"):
        lines += ["", rule_bound_line(oracle["threshold_rule"], res["static_test_accuracy"])]
    lines += ["", "Speed ratios are wall-clock on this machine, each timed interleaved with the deployed static model "
              "(BN folded, channels-last on the CPU, as s2d's stages): throughput > 1 and latency < 1 are faster; "
              "batch-1 latency is the mean time per image over single test images (each image's fastest of 3 "
              "paired calls). Torch-Pruning rows and the s2d operating and budget points are measured here, together: "
              "each is timed once per round, on fresh copies, in rounds that interleave all of them, and shows the "
              "median over rounds with the range in brackets (timed one after the other, minutes apart, the same "
              "network's ratio moved by up to a third on this machine). "
              "The depth-only and searched + fine-tuned rows come from the conversion's report.json (— where it has "
              "none, or timed them in another memory layout). Cost: pruning plus fine-tuning for the peers, the whole "
              "conversion for s2d's points (one conversion yields all of them); the depth-only network is a "
              "by-product of the conversion's report (probe exit heads on the static weights).", ""]
    return "\n".join(lines)


def plot_peers(res: dict[str, Any], path: str | Path) -> None:
    """``peers.png``: accuracy against MAC reduction and against measured throughput ratio.

    The axes fit the deployable networks; an oracle bound beyond them is drawn at the top edge
    with its figures written out, so it marks the gap without squashing the comparison.
    """
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    rows = res["rows"]
    styles = {"static": ("*", "black", 180), "torch-pruning": ("v", "tab:orange", 60),
              "depth_only": ("s", "tab:green", 60), "s2d": ("o", "tab:blue", 60)}
    labels = {"static": "static", "torch-pruning": "Torch-Pruning + KD", "depth_only": "SDN-style depth-only",
              "s2d": "s2d (searched, operating points)"}
    shown = [r for r in rows if r["kind"] in styles]
    accs = [r["test_accuracy"] * 100 for r in shown]
    lo, hi = min(accs) - 0.3, max(accs) + 0.3
    oracle = next((r for r in rows if r["kind"] == "oracle"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    for ax, key, xlabel in ((axes[0], "mac_ratio", "MAC reduction (x fewer average MACs than static, log scale)"),
                            (axes[1], "throughput_ratio", "batch-256 throughput ratio vs static (measured, paired)")):
        xs_all = []
        for kind, (marker, colour, size) in styles.items():
            pts = [r for r in shown if r["kind"] == kind and r.get(key) is not None]
            if not pts:
                continue
            xs = [1 / r[key] if key == "mac_ratio" else r[key] for r in pts]
            ys = [r["test_accuracy"] * 100 for r in pts]
            xs_all += xs
            order = sorted(range(len(xs)), key=xs.__getitem__)
            if kind in ("torch-pruning", "s2d") and len(xs) > 1:
                ax.plot([xs[i] for i in order], [ys[i] for i in order], color=colour, lw=0.8, alpha=0.6)
            ax.scatter(xs, ys, marker=marker, s=size, color=colour, edgecolor="black", label=labels[kind], zorder=3)
        ax.axhline(res["static_test_accuracy"] * 100, ls="--", lw=0.7, color="gray")
        if oracle is not None:
            text = f"oracle bound: {oracle['test_accuracy'] * 100:.2f} % at {1 / oracle['mac_ratio']:.2f}x fewer MACs"
            inside = oracle["test_accuracy"] * 100 <= hi
            if key == "mac_ratio":
                x, y = 1 / oracle["mac_ratio"], min(oracle["test_accuracy"] * 100, hi)
                xs_all.append(x)
                ax.scatter([x], [y], marker="X" if inside else "^", s=120, color="gold", edgecolor="black",
                           label="oracle exits (bound)", zorder=4, clip_on=False)
                ax.annotate(text + ("" if inside else " (above the axis)"), (x, y), textcoords="offset points",
                            xytext=(-8, -14), ha="right", fontsize=7)
            elif inside:
                ax.axhline(oracle["test_accuracy"] * 100, ls=":", color="goldenrod", label="oracle accuracy bound")
            else:
                ax.annotate(text + " (above the axis; no speed figure)", (0.02, 0.97), xycoords="axes fraction",
                            va="top", fontsize=7)
        ax.set_ylim(lo, hi)
        if key == "mac_ratio" and xs_all:
            ax.set_xscale("log")
            ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16) if min(xs_all) / 1.2 <= t <= max(xs_all) * 1.2]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlim(min(xs_all) / 1.15, max(xs_all) * 1.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if oracle is None:
        axes[0].set_title("oracle bound: not available", fontsize=8)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{res['model']} on {res['dataset']}: s2d and its peers "
                 f"(peers fine-tuned {res['peer_seconds']:.0f} s each; dashed: static accuracy)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
