"""Text and markdown for people: what ``s2d eval`` prints and ``report.md``. Reads figures, measures nothing."""

from __future__ import annotations

import json
from typing import Any


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


def report_markdown(r: dict[str, Any]) -> str:
    s = r["static"]
    lines = [
        f"# s2d conversion: {r['model']} on {r['dataset']} (budget {r['budget']}, search {r['algo']})",
        "",
        f"Static model: test accuracy {s['test_accuracy'] * 100:.2f} %, {s['macs'] / 1e6:.2f} M MACs (fvcore), "
        f"latency {s['latency_ms_batch1']:.2f} ms (batch 1), throughput {s['throughput_img_s_batch256']:.0f} img/s "
        f"(batch 256), {r['threads']} CPU threads. " + (
            f"Budget mode: thresholds are calibrated on validation data for the highest accuracy with average MACs "
            f"at most {r['target_mac_ratio']:.3f} of the static model's ({1 / r['target_mac_ratio']:.2f}x fewer)."
            if r.get("target_mac_ratio") else
            f"Thresholds are calibrated on validation data to stay within {r['tolerance_points']} points of the "
            f"static validation accuracy ({r['static_val_accuracy'] * 100:.2f} %)."),
        "",
        *([f"**Fallback:** {r['fallback']}.", ""] if r.get("fallback") else []),
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
