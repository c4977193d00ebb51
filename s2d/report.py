"""Evaluation reports: the figures ``s2d eval`` prints, with stable JSON keys."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2d.cost import average_macs, stage_macs, static_cost
from s2d.data import Batches, Dataset
from s2d.errors import S2DError
from s2d.evaluation import accuracy, measure_pair, measure_speed, stage_confidence
from s2d.runs import write_json_atomic, write_text_atomic
from s2d.transform.arch import MultiStageArch
from s2d.transform.dynamic import DynamicNet
from s2d.transform.exit_rule import calibrate, exit_rates
from s2d.transform.supernet import SuperNet


def deployable(model: nn.Module) -> nn.Module:
    """The model as it would be deployed: batch norm folded into convs (as DynamicNet stages are)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception:  # untraceable models are timed as they are
        return model


def evaluate_static(model: nn.Module, data: Dataset, *, device: str = "cpu", limit: int | None = None,
                    repeats: int = 20) -> dict[str, Any]:
    """Test accuracy, fvcore MACs, parameters, and CPU latency (batch 1) / throughput (batch 256)."""
    model = model.to(device).eval()
    test = data.test.subset(limit)
    cost = static_cost(model, data.info)
    info = data.info
    x1 = torch.randn(1, info.in_channels, info.image_size, info.image_size, device=device)
    x256 = torch.randn(256, info.in_channels, info.image_size, info.image_size, device=device)
    deployed = deployable(model)
    lat = measure_speed(deployed, x1, repeats=max(repeats, 20), min_seconds=1.0)
    thr = measure_speed(deployed, x256, repeats=max(3, repeats // 4))
    return {
        "test_accuracy": accuracy(model, test, info, device=device),
        "test_images": len(test),
        "macs": cost.total_macs,
        "macs_unit": "MACs (fvcore counts one multiply-add as one)",
        "macs_by_operator": cost.by_operator,
        "fvcore_unsupported_ops": cost.unsupported_ops,
        "params": sum(p.numel() for p in model.parameters()),
        "latency_ms_batch1": lat.per_batch_ms,
        "throughput_img_s_batch256": thr.img_per_s,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def format_eval(r: dict[str, Any]) -> str:
    lines = [
        f"model        {r['model']} (weights: {r['weights']}) on {r['dataset']}",
        f"test acc     {r['test_accuracy'] * 100:.2f} % ({r['test_images']} images)",
        f"MACs         {r['macs'] / 1e6:.2f} M (fvcore; 1 multiply-add = 1)",
        f"params       {r['params'] / 1e6:.3f} M",
        f"latency      {r['latency_ms_batch1']:.2f} ms (batch 1, median, {r['threads']} threads)",
        f"throughput   {r['throughput_img_s_batch256']:.0f} img/s (batch 256, median)",
    ]
    if r.get("fvcore_unsupported_ops"):
        lines.append(f"not counted  {', '.join(f'{k}×{v}' for k, v in r['fvcore_unsupported_ops'].items())} "
                     "(elementwise ops carry no multiply-adds)")
    if r.get("dynamic"):
        return "\n".join(lines) + "\n" + format_dynamic(r["dynamic"])
    return "\n".join(lines)


@torch.no_grad()
def measure_dynamic(net: DynamicNet, data: Dataset, costs: list[float], *, device: str = "cpu",
                    limit: int | None = None, latency_images: int = 200, repeats: int = 20,
                    reference: nn.Module | None = None) -> dict[str, Any]:
    """Test figures of a deployed ``DynamicNet``, with real early exits (not simulated).

    With ``reference`` (the deployed static model) its speed is timed interleaved with the
    network's on the same images, and the row's speed ratios use those paired timings.
    """
    net = net.to(device).eval()
    test = data.test.subset(limit)
    preds, exits = [], []
    for x, _ in Batches(test, data.info, 256, device=device):
        logits, ex = net(x)
        preds.append(logits.argmax(1).cpu())
        exits.append(ex.cpu())
    pred, ex = torch.cat(preds), torch.cat(exits)
    rates = exit_rates(ex, net.arch.num_stages)
    images = Batches(test.subset(max(latency_images, 256)), data.info, 256, device=device)
    x256 = next(iter(images))[0]
    singles = x256[:latency_images].split(1)
    paired: dict[str, float] = {}
    if reference is None:
        thr = measure_speed(net, x256, repeats=max(3, repeats // 4))
        net(singles[0])
        lat = [measure_speed(net, xi, repeats=1, warmup=0).per_batch_ms for xi in singles]
    else:  # interleaved with the static model on the same images: ratios that survive a busy machine
        ref_thr, thr = measure_pair(reference, net, x256, repeats=max(5, repeats // 2))
        net(singles[0])
        reference(singles[0])
        pairs = [measure_pair(reference, net, xi, repeats=1, warmup=0) for xi in singles]
        lat = [b.per_batch_ms for _, b in pairs]
        paired = {"static_latency_ms_batch1": float(torch.tensor([a.per_batch_ms for a, _ in pairs]).median()),
                  "static_throughput_img_s_batch256": ref_thr.img_per_s}
    return {
        "arch": net.arch.to_dict(),
        "test_accuracy": (pred == test.labels).float().mean().item(),
        "test_images": len(test),
        "stage_macs": costs,
        "average_macs": average_macs(costs, rates),
        "exit_rates": rates,
        "latency_ms_batch1": float(torch.tensor(lat).median()),
        "throughput_img_s_batch256": thr.img_per_s,
        **paired,
    }


def prepare_arch(supernet: SuperNet, arch: MultiStageArch, data: Dataset, *, device: str = "cpu",
                 head_images: int = 20000, recalibrate: bool = True) -> None:
    """Make an arch of an untrained supernet usable: BN statistics for it, and trained exit heads."""
    from s2d.finetune import fit_heads

    if arch.num_stages == 1:
        return
    if recalibrate and not arch.is_full_width:  # full-width archs compute the static network
        train = Batches(data.train, data.info, 256, shuffle=True, seed=1, device=device)
        supernet.recalibrate_bn(arch, train, num_batches=20)
    fit_heads(supernet, arch, data.train.subset(head_images), data.info, device=device)


def calibrate_arch(supernet: SuperNet, arch: MultiStageArch, data: Dataset, costs: list[float], *,
                   min_accuracy: float, device: str = "cpu") -> tuple[MultiStageArch, dict[str, Any]]:
    """Thresholds from the validation split (never the test split), and the validation figures."""
    conf, correct = stage_confidence(supernet, arch, data.val, data.info, device=device)
    from s2d.search.evaluator import float32_thresholds
    from s2d.transform.exit_rule import exit_stages

    thresholds, cost = calibrate(conf, correct, costs, min_accuracy)
    thresholds = float32_thresholds(thresholds)
    ex = exit_stages(conf, thresholds)
    val = {
        "val_accuracy": correct.gather(0, ex[None])[0].float().mean().item(),
        "val_stage_accuracy": correct.float().mean(1).tolist(),
        "val_average_macs": cost,
        "val_exit_rates": exit_rates(ex, arch.num_stages),
    }
    return arch.with_thresholds(thresholds), val


def evaluate_dynamic(model_name: str, model: nn.Module, data: Dataset, arch_path: str, static: dict[str, Any], *,
                     device: str = "cpu", limit: int | None = None, repeats: int = 20,
                     tolerance: float = 0.005) -> dict[str, Any]:
    """``s2d eval --arch``: the arch's figures next to the static model's, with their ratios.

    Without a trained supernet the arch's exit heads are fitted on the training split (frozen
    backbone) and batch norm is recalibrated; thresholds missing from the arch file are
    calibrated on validation data to stay within ``tolerance`` of the static accuracy there.
    """
    info = data.info
    supernet = SuperNet(model.cpu(), (info.in_channels, info.image_size, info.image_size),
                        info.num_classes).to(device)
    arch = supernet.validate(MultiStageArch.load(arch_path))
    static_val = accuracy(supernet.static, data.val, info, device=device)  # before BN is recalibrated for the arch
    prepare_arch(supernet, arch, data, device=device)
    costs, skipped = stage_macs(supernet.materialise(arch, fold_bn=False).stages, supernet.input_shape)
    calibrated, val = calibrate_arch(supernet, arch, data, costs, min_accuracy=static_val - tolerance,
                                     device=device)
    if arch.thresholds:
        calibrated = arch  # the file's thresholds win; the calibration is reported for comparison
    if len(calibrated.thresholds) != calibrated.num_stages - 1:
        raise S2DError("internal: thresholds missing after calibration")
    net = supernet.materialise(calibrated)
    out = measure_dynamic(net, data, costs, device=device, limit=limit, repeats=repeats)
    out.update(val)
    out["static_val_accuracy"] = static_val
    out["fvcore_unsupported_ops"] = skipped
    out["mac_ratio"] = out["average_macs"] / static["macs"]
    out["speedup_macs"] = static["macs"] / out["average_macs"]
    out["latency_ratio"] = out["latency_ms_batch1"] / static["latency_ms_batch1"]
    out["throughput_ratio"] = out["throughput_img_s_batch256"] / static["throughput_img_s_batch256"]
    out["accuracy_delta"] = out["test_accuracy"] - static["test_accuracy"]
    out["threshold_sweep"] = threshold_sweep(supernet, arch, data, costs, static["macs"], device=device, limit=limit)
    return out


SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


@torch.no_grad()
def threshold_sweep(supernet: SuperNet, arch: MultiStageArch, data: Dataset, costs: list[float], static_macs: float,
                    *, device: str = "cpu", limit: int | None = None) -> list[dict[str, Any]]:
    """Test accuracy and average MACs with one threshold for every stage, for a few values.

    A report figure (how accuracy trades against cost), never used to choose anything.
    """
    from s2d.transform.exit_rule import exit_stages

    conf, correct = stage_confidence(supernet, arch, data.test.subset(limit), data.info, device=device)
    rows = []
    for t in SWEEP:
        ex = exit_stages(conf, [t] * (arch.num_stages - 1))
        rates = exit_rates(ex, arch.num_stages)
        avg = average_macs(costs, rates)
        rows.append({"threshold": t, "test_accuracy": correct.gather(0, ex[None])[0].double().mean().item(),
                     "average_macs": avg, "mac_ratio": avg / static_macs, "exit_rates": rates})
    return rows


def format_dynamic(d: dict[str, Any]) -> str:
    stages = d["arch"]["stages"]
    lines = ["", "dynamic network"]
    for i, (st, m, r) in enumerate(zip(stages, d["stage_macs"], d["exit_rates"], strict=True)):
        th = d["arch"]["thresholds"][i] if i < len(d["arch"]["thresholds"]) else None
        lines.append(f"  stage {i + 1}: width {st['width']:<5} exit {st['exit']:<12} {m / 1e6:7.2f} M MACs  "
                     f"exits {r * 100:5.1f} %" + (f"  threshold {th:.3f}" if th is not None else ""))
    lines += [
        f"test acc     {d['test_accuracy'] * 100:.2f} % ({d['accuracy_delta'] * 100:+.2f} points vs static)",
        f"avg MACs     {d['average_macs'] / 1e6:.2f} M "
        f"({d['mac_ratio']:.3f} of static, {d['speedup_macs']:.2f}x fewer)",
        f"latency      {d['latency_ms_batch1']:.2f} ms batch 1 ({d['latency_ratio']:.2f}x static)",
        f"throughput   {d['throughput_img_s_batch256']:.0f} img/s batch 256 ({d['throughput_ratio']:.2f}x static)",
    ]
    if d.get("threshold_sweep"):
        lines.append("threshold sweep (same threshold at every stage; test split, for reference only):")
        for r in d["threshold_sweep"]:
            rates = " / ".join(f"{x * 100:.0f}" for x in r["exit_rates"])
            lines.append(f"  {r['threshold']:<5} acc {r['test_accuracy'] * 100:6.2f} %  "
                         f"MACs {r['average_macs'] / 1e6:6.2f} M ({r['mac_ratio']:.3f})  exits {rates} %")
    return "\n".join(lines)


def _row(name: str, arch: MultiStageArch, val: Any, test: dict[str, Any], static: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "arch": arch.to_dict(),
        "val_accuracy": val.accuracy,
        "val_average_macs": val.average_macs,
        **{k: test[k] for k in ("test_accuracy", "average_macs", "exit_rates", "stage_macs", "latency_ms_batch1",
                                "throughput_img_s_batch256")},
        "mac_ratio": test["average_macs"] / static["macs"],
        "accuracy_delta_points": (test["test_accuracy"] - static["test_accuracy"]) * 100,
        "latency_ratio": test["latency_ms_batch1"] / test.get("static_latency_ms_batch1",
                                                              static["latency_ms_batch1"]),
        "throughput_ratio": test["throughput_img_s_batch256"] / test.get("static_throughput_img_s_batch256",
                                                                         static["throughput_img_s_batch256"]),
    }


def build_report(p) -> dict[str, Any]:
    """The final report of a conversion (``s2d.convert.Pipeline``): static vs dynamic vs baselines, on test data.

    Baselines and the searched arch before fine-tuning are measured on the trained supernet;
    the chosen network after its own fine-tune. Thresholds are calibrated on the full
    validation split for every row.
    """
    from s2d.convert import baselines, final_state, save_dynamic

    data, device, limit = p.data, p.cfg.device, p.budget.test_limit
    static = evaluate_static(p.static, data, device=device, limit=limit)
    reference = deployable(copy.deepcopy(p.static))
    rows = []
    p.load_supernet()
    ev = p.evaluator(p.budget.report_val_images)
    for name, arch in baselines(p.space).items():
        e = ev.evaluate(arch)
        tuned = arch.with_thresholds(e.thresholds)
        rows.append(_row(f"{name} (supernet)", tuned, e,
                         measure_dynamic(ev.network_for(tuned).materialise(tuned), data, e.stage_macs, device=device,
                                         limit=limit, reference=reference), static))
    chosen = MultiStageArch.from_dict(json.loads((p.run.root / "best_arch.json").read_text()))
    chosen = MultiStageArch(chosen.stages, chosen.exit_rule,
                            chosen.thresholds if p.cfg.search_thresholds else ())
    e = ev.evaluate(chosen)
    before = chosen.with_thresholds(e.thresholds)
    rows.append(_row("searched (supernet)", before, e,
                     measure_dynamic(ev.network_for(before).materialise(before), data, e.stage_macs, device=device,
                                     limit=limit, reference=reference), static))
    final_state(p)
    ev = p.evaluator(p.budget.report_val_images, full_width=False)
    e = ev.evaluate(chosen)
    final = chosen.with_thresholds(e.thresholds)
    dyn = _row("searched + fine-tuned", final, e,
               measure_dynamic(p.supernet.materialise(final), data, e.stage_macs, device=device, limit=limit,
                               reference=reference), static)
    rows.append(dyn)
    points = operating_points(p.supernet, chosen, data, ev, static, device=device, limit=limit)
    save_dynamic(p, final)
    write_json_atomic(p.run.root / "best_arch.json", final.to_dict())
    report = {
        "model": p.cfg.model, "dataset": p.cfg.dataset, "budget": p.cfg.budget, "algo": p.cfg.algo,
        "tolerance_points": p.cfg.tolerance, "static": {k: v for k, v in static.items() if k != "macs_by_operator"},
        "static_val_accuracy": ev.static_accuracy, "dynamic": dyn, "rows": rows, "operating_points": points,
        "search": p.state.get("search", {}).get("summaries", {}),
        "threads": torch.get_num_threads(),
    }
    write_json_atomic(p.run.root / "report.json", report)
    write_text_atomic(p.run.root / "report.md", report_markdown(report))
    plot_pareto(p.archive.records(), report, p.run.root / "pareto.png")
    p._done("report", report="report.md")
    return report


TOLERANCES = (0.1, 0.2, 0.5, 1.0)  # accuracy points


@torch.no_grad()
def operating_points(supernet: SuperNet, arch: MultiStageArch, data: Dataset, ev: Any, static: dict[str, Any], *,
                     device: str = "cpu", limit: int | None = None) -> list[dict[str, Any]]:
    """The chosen network at other accuracy tolerances: thresholds re-calibrated on validation
    data for each, then applied to the test split. Exits are simulated from every stage's test
    logits (the same decisions ``DynamicNet`` takes); no timing."""
    from s2d.search.evaluator import float32_thresholds
    from s2d.transform.exit_rule import exit_stages

    conf, correct = ev.stage_outputs(arch)
    costs = ev.stage_costs(arch)
    t_conf, t_correct = stage_confidence(supernet, arch, data.test.subset(limit), data.info, device=device)
    out = []
    for tol in TOLERANCES:
        thresholds = float32_thresholds(calibrate(conf, correct, costs, ev.static_accuracy - tol / 100)[0])
        ex = exit_stages(t_conf, thresholds)
        rates = exit_rates(ex, arch.num_stages)
        acc = t_correct.gather(0, ex[None])[0].double().mean().item()
        avg = average_macs(costs, rates)
        out.append({"tolerance_points": tol, "thresholds": thresholds, "test_accuracy": acc,
                    "accuracy_delta_points": (acc - static["test_accuracy"]) * 100, "average_macs": avg,
                    "mac_ratio": avg / static["macs"], "exit_rates": rates})
    return out


def report_markdown(r: dict[str, Any]) -> str:
    s = r["static"]
    lines = [
        f"# s2d conversion: {r['model']} on {r['dataset']} (budget {r['budget']}, search {r['algo']})",
        "",
        f"Static model: test accuracy {s['test_accuracy'] * 100:.2f} %, {s['macs'] / 1e6:.2f} M MACs (fvcore), "
        f"latency {s['latency_ms_batch1']:.2f} ms (batch 1), throughput {s['throughput_img_s_batch256']:.0f} img/s "
        f"(batch 256), {r['threads']} CPU threads. Thresholds are calibrated on validation data to stay within "
        f"{r['tolerance_points']} points of the static validation accuracy ({r['static_val_accuracy'] * 100:.2f} %).",
        "",
        "| network | test acc (%) | Δ points | avg MACs (M) | MAC ratio | exit rates | latency b1 ratio "
        "| throughput b256 ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        rates = " / ".join(f"{x * 100:.0f}" for x in row["exit_rates"])
        lines.append(f"| {row['name']} | {row['test_accuracy'] * 100:.2f} | {row['accuracy_delta_points']:+.2f} | "
                     f"{row['average_macs'] / 1e6:.2f} | {row['mac_ratio']:.3f} | {rates} | "
                     f"{row['latency_ratio']:.2f} | {row['throughput_ratio']:.2f} |")
    if r.get("operating_points"):
        lines += ["", "Operating points of the chosen network (thresholds re-calibrated on validation data for each "
                  "tolerance, exits applied to the test split):", "",
                  "| tolerance (points) | test acc (%) | Δ points | MAC ratio | MACs fewer | exit rates |",
                  "|---|---|---|---|---|---|"]
        for o in r["operating_points"]:
            rates = " / ".join(f"{x * 100:.0f}" for x in o["exit_rates"])
            lines.append(f"| {o['tolerance_points']} | {o['test_accuracy'] * 100:.2f} | "
                         f"{o['accuracy_delta_points']:+.2f} | {o['mac_ratio']:.3f} | {1 / o['mac_ratio']:.2f}x | "
                         f"{rates} |")
    d = r["dynamic"]
    lines += ["", "## Chosen network", "", "```json", json.dumps(d["arch"], indent=2), "```", ""]
    if r["search"]:
        lines += ["## Search", "", "| searcher | evaluations | best reward | evaluations to best | "
                  "best MAC ratio within tolerance | evaluations to it |", "|---|---|---|---|---|---|"]
        for algo, sm in r["search"].items():
            ratio = sm.get("best_mac_ratio_within_tolerance")
            lines.append(f"| {algo} | {sm.get('evaluations')} | {sm.get('best_reward', float('nan')):.4f} | "
                         f"{sm.get('evaluations_to_best')} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                         f"{sm.get('evaluations_to_that_ratio') or '-'} |")
        lines.append("")
    lines += ["Rows marked (supernet) use the shared supernet weights, except archs whose stages are all full "
              "width (static, depth_only): those are the static network plus exit heads, scored with the static "
              "weights and linear-probe heads. The chosen network is fine-tuned on its own afterwards (a full-width "
              "one: its heads, on every training image). Speed ratios are wall-clock on this machine, each timed "
              "interleaved with the static model (medians); batch-1 latency is the median over single test images "
              "with real early exits.", ""]
    return "\n".join(lines)


def plot_pareto(records: list[dict[str, Any]], report: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for searcher, colour in (("ppo", "tab:blue"), ("random", "tab:gray")):
        pts = [r for r in records if r.get("searcher") == searcher]
        if pts:
            ax.scatter([r["average_macs"] / 1e6 for r in pts], [r["accuracy"] * 100 for r in pts], s=12,
                       alpha=0.6, color=colour, label=f"{searcher} ({len(pts)} archs, search val subset)")
    s = report["static"]
    ax.scatter([s["macs"] / 1e6], [report["static_val_accuracy"] * 100], marker="*", s=160, color="black",
               label="static model")
    markers = {"depth_only (supernet)": "s", "width_only (supernet)": "^", "static (supernet)": "D",
               "searched (supernet)": "o", "searched + fine-tuned": "P"}
    for row in report["rows"]:
        ax.scatter([row["val_average_macs"] / 1e6], [row["val_accuracy"] * 100], marker=markers.get(row["name"], "x"),
                   s=70, edgecolor="black", label=row["name"])
    ax.axhline((report["static_val_accuracy"] - report["tolerance_points"] / 100) * 100, ls="--", lw=0.8,
               color="tab:red", label="tolerance")
    ax.set_xlabel("average MACs (M, fvcore)")
    ax.set_ylabel("validation accuracy (%)")
    accs = [r["accuracy"] * 100 for r in records] + [report["static_val_accuracy"] * 100]
    ax.set_ylim(max(min(accs), report["static_val_accuracy"] * 100 - 15), max(accs) + 0.5)
    ax.set_title(f"{report['model']} on {report['dataset']}: accuracy vs average MACs")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
