"""Text and markdown for people: what ``s2d eval`` prints and ``report.md``. Reads figures, measures nothing."""

from __future__ import annotations

import json
from typing import Any

STATIC_STAGE_WORDS = {"distilled": "its distilled copy of the static network",
                      "untouched": "the untouched static network"}


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
        exit_ = "static net" if st.get("recompute") else st["exit"]  # a cascade's last stage recomputes it
        lines.append(f"  stage {i + 1}: width {width_text(st['width']):<5} exit {exit_:<12} {m / 1e6:7.2f} M MACs  "
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
            f"Budget mode: thresholds are calibrated on the held-out calibration split for the highest accuracy "
            f"with average MACs at most {r['target_mac_ratio']:.3f} of the static model's "
            f"({1 / r['target_mac_ratio']:.2f}x fewer)."
            if r.get("target_mac_ratio") else
            f"Latency budget: thresholds are calibrated on the held-out calibration split for the highest accuracy "
            f"with an average batch-1 latency of at most {r['target_latency_ms']} ms on this machine (stage "
            f"latencies measured paired with the static model; the shipped row's latency is measured end to end)."
            if r.get("target_latency_ms") else
            f"Tolerance {r['tolerance_points']} points at {r['confidence']:.0%} confidence: candidate thresholds "
            f"come from the search's validation images, and the shipped ones are certified on "
            f"{r['calib_images']} held-out calibration images (an upper {r['confidence']:.0%} bound of the accuracy "
            f"drop against the static model within the tolerance; fixed-sequence testing)."),
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
    cert = r["dynamic"].get("certificate")
    if cert:
        lines += ["", f"Shipped network: drop bound {cert['bound_points']:.2f} points on the calibration split "
                  f"(observed there {cert['calib_drop_points']:+.2f}; {cert['tested']} of {cert['candidates']} "
                  f"candidate settings tested); test drop {-r['dynamic']['accuracy_delta_points']:+.2f} points."]
    if r.get("static_stage") and cert:
        lines += ["", f"The cascade's last stage ships {STATIC_STAGE_WORDS[r['static_stage']]}: the cascade was "
                  "certified twice, ending in its distilled copy of the static network and in the untouched static "
                  f"network, each at {cert['confidence']:.1%} confidence (together {r['confidence']:.0%}), and the "
                  "one with fewer average MACs on the calibration split ships (operating points: per tolerance)."]
    if r.get("operating_points"):
        lines += ["", "Operating points of the chosen network: certified thresholds for each tolerance, applied to "
                  "the test split, beside in-sample thresholds (calibrated on the same calibration images without "
                  "a bound: what the guarantee costs):", "",
                  "| tolerance (points) | bound (points) | test Δ points | MACs fewer | exit rates "
                  "| in-sample: test Δ points | in-sample: MACs fewer |",
                  "|---|---|---|---|---|---|---|"]
        for o in r["operating_points"]:
            rates = "static network" if o.get("static_fallback") else " / ".join(f"{x * 100:.0f}"
                                                                                for x in o["exit_rates"])
            if o.get("static_stage") == "untouched" and not o.get("static_fallback"):
                rates += " (untouched last stage)"
            bound = f"{o['certificate']['bound_points']:.2f}" if o.get("certificate") else "none passes"
            lines.append(f"| {o['tolerance_points']} | {bound} | {o['accuracy_delta_points']:+.2f} | "
                         f"{1 / o['mac_ratio']:.2f}x | {rates} | {o['in_sample_accuracy_delta_points']:+.2f} | "
                         f"{1 / o['in_sample_mac_ratio']:.2f}x |")
    if r.get("budget_points"):
        lines += ["", "Budget points of the chosen network (on the calibration split, the most accurate thresholds "
                  "that spend 95-100 % of each average-MAC budget, or a cheaper setting more accurate by more than "
                  "one standard error; applied to the test split, speed timed paired with the static model):", "",
                  "| budget (MACs fewer) | test acc (%) | Δ points | MACs fewer on test | exit rates "
                  "| latency b1 ratio | throughput b256 ratio |",
                  "|---|---|---|---|---|---|---|"]
        for b in r["budget_points"]:
            rates = " / ".join(f"{x * 100:.0f}" for x in b["exit_rates"])
            speed = " | ".join(f"{b[k]:.2f}" if k in b else "-" for k in ("latency_ratio", "throughput_ratio"))
            lines.append(f"| {1 / b['target_mac_ratio']:.0f}x | {b['test_accuracy'] * 100:.2f} | "
                         f"{b['accuracy_delta_points']:+.2f} | {1 / b['mac_ratio']:.2f}x | {rates} | {speed} |")
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
    if r.get("race"):
        lines += ["## Fine-tune race", "", *race_markdown(r["race"]), ""]
    lines += ["Rows marked (supernet) use the shared supernet weights, except archs whose stages are all full "
              "width (static, depth_only): those are the static network plus exit heads, scored with the static "
              "weights and probe heads. The chosen network is fine-tuned on its own afterwards (a full-width "
              "one: its heads, on every training image). Speed ratios are wall-clock on this machine, each timed "
              "interleaved with the static model; batch 256: median of the paired repeats; batch 1: the mean time per "
              "image over single test images with real early exits (each image's fastest of 3 paired calls), as a "
              "user sending them one by one waits.", ""]
    return "\n".join(lines)


def race_markdown(race: dict[str, Any]) -> list[str]:
    """The fine-tune's race (``Pipeline.race``) as markdown lines: each raced arch's score after its first steps."""
    lines = [f"The searched archs below were each fine-tuned for the first {race['steps']} steps of the fine-tune and "
             "scored again on the search's validation images; the best went on:", "",
             "| arch | validation MAC ratio | accuracy (%) | reward |", "|---|---|---|---|"]
    for i, sc in enumerate(race["scores"]):
        mark = " (fine-tuned on)" if i == race["winner"] else ""
        lines.append(f"| {sc['arch']}{mark} | {sc['mac_ratio']:.4f} | {sc['accuracy'] * 100:.2f} | "
                     f"{sc['reward']:.4f} |")
    return lines


def width_text(width: float | list[float]) -> str:
    """A stage's width as written in tables: ``0.375``, or per section ``0.25/0.375/0.5``."""
    return "/".join(f"{w:g}" for w in width) if isinstance(width, list | tuple) else f"{width:g}"


def stages_summary(arch: dict[str, Any]) -> str:
    """One arch in a table cell: ``width@exit`` per stage, ``static`` for a cascade's recomputed last stage."""
    parts = []
    for st in arch["stages"]:
        if st.get("recompute"):
            parts.append("static")
            continue
        reuse = st.get("reuse", True)
        note = "" if reuse is True else " no reuse" if reuse is False else " reuse " + "".join(
            "y" if r else "n" for r in reuse)
        parts.append(f"{width_text(st['width'])}@{st['exit']}{note}")
    return " > ".join(parts)
