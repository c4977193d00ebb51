"""``s2d bench latency``: is the latency table (``s2d.measure.latency``) a model of measured time?

Archs of a conversion's archive (with the thresholds their search gave them) are materialised as they are
deployed and timed end to end, paired with the static network, on validation images: a batch of 256 and
single images. Each measured ratio is set beside the table's prediction for the same exits (the exit
rates the network actually had on those images, so the comparison isolates the time model from exit-rate
noise). The figure of merit is the median relative error of the predicted time ratio. At batch 1 each image
is timed a few times and its fast calls count, as the table's are (the mean over images is the expected
latency); at batch 256, the median of paired repeats.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

import torch
from tqdm import tqdm

from s2d.data import Batches
from s2d.errors import S2DError
from s2d.measure.latency import LARGE_BATCH
from s2d.measure.timing import expected_latency, paired_speed
from s2d.pipeline.format import stages_summary
from s2d.runs import write_json_atomic, write_text_atomic
from s2d.transform.arch import MultiStageArch

B1_IMAGES = 100
B1_REPEATS = 5  # paired calls per single image; the fastest count (see ``LatencyTable``)


def _exit_rates(net, x: torch.Tensor, stages: int) -> list[float]:
    _, exits = net(x)
    return (torch.bincount(exits, minlength=stages).float() / len(x)).tolist()


def run_latency_bench(pipeline, *, archs: int = 20, b1_images: int | None = None, repeats: int = 5, seed: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """Time ``archs`` archive archs end to end and write ``R/bench_latency/latency.{json,md}``."""
    if not (pipeline.run.checkpoints / "supernet.pt").exists():
        raise S2DError(f"{pipeline.run.root} has no trained supernet (checkpoints/supernet.pt); run s2d convert "
                       f"--run-dir {pipeline.run.root} first")
    records = {r["key"]: r for r in pipeline.archive.records()}
    if not records:
        raise S2DError(f"{pipeline.run.root}/archive.jsonl holds no evaluated arch; run s2d search first")
    pipeline.load_supernet()
    chosen = random.Random(seed).sample(sorted(records), min(archs, len(records)))
    b1_images = b1_images or min(B1_IMAGES, pipeline.budget.latency_images // 2)
    table = pipeline.latency_table()
    info = pipeline.data.info
    images = pipeline.search_val.subset(max(LARGE_BATCH, b1_images))
    xn = next(iter(Batches(images, info, LARGE_BATCH, device=pipeline.cfg.device)))[0]
    x1 = xn[:b1_images]
    rows = []
    for key in tqdm(chosen, desc="latency", disable=not progress):
        arch = MultiStageArch.from_dict(records[key]["arch"])
        net = pipeline.supernet.materialise(arch)
        many = paired_speed(table.reference, net, xn, repeats=repeats, warmup=1)
        b1 = expected_latency(table.reference, net, x1.split(1), repeats=B1_REPEATS)
        rates_n, rates_1 = _exit_rates(net, xn, arch.num_stages), _exit_rates(net, x1, arch.num_stages)
        row = {"arch": arch.to_dict(), "stages": arch.num_stages, "mac_ratio": records[key]["mac_ratio"],
               "measured_b1": b1.ratio,
               "predicted_b1": table.ratio(arch, rates_1, 1),
               "measured_large": many.ratio, "predicted_large": table.ratio(arch, rates_n, LARGE_BATCH),
               "exit_rates_large": rates_n, "exit_rates_b1": rates_1}
        row["error_b1"] = row["predicted_b1"] / row["measured_b1"] - 1
        row["error_large"] = row["predicted_large"] / row["measured_large"] - 1
        rows.append(row)
    res = {"run_dir": str(pipeline.run.root), "model": pipeline.cfg.model, "archs": len(rows), "batch": LARGE_BATCH,
           "b1_images": b1_images, "machine": table.machine, "table_entries": len(table),
           "stages_measured": table.measured, "stages_from_store": table.reused,
           "static_ms": {"b1": table.static_ms(1), "large": table.static_ms(LARGE_BATCH)},
           "median_abs_error_b1": statistics.median(abs(r["error_b1"]) for r in rows),
           "median_abs_error_large": statistics.median(abs(r["error_large"]) for r in rows),
           "rows": rows}
    out = pipeline.run.root / "bench_latency"
    write_json_atomic(out / "latency.json", res)
    write_text_atomic(out / "latency.md", latency_markdown(res))
    return res


def latency_markdown(res: dict[str, Any]) -> str:
    b = res["batch"]
    lines = [f"# Latency table against measured time: {res['model']}, {res['archs']} archs", "",
             f"Time ratio to the static network (< 1: faster), measured end to end and predicted by the table, with "
             f"the exits the network took on the same validation images. Batch 1: mean over {res['b1_images']} "
             f"single images (fast calls); batch {b}: median of paired repeats.", "",
             f"| arch (width@exit) | MAC ratio | batch 1 measured | predicted | error | batch {b} measured "
             "| predicted | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {stages_summary(r['arch'])} | {r['mac_ratio']:.3f} | {r['measured_b1']:.3f} | "
                     f"{r['predicted_b1']:.3f} | {r['error_b1']:+.1%} | {r['measured_large']:.3f} | "
                     f"{r['predicted_large']:.3f} | {r['error_large']:+.1%} |")
    lines += ["", f"Median |error|: batch 1 {res['median_abs_error_b1']:.1%}, batch {b} "
              f"{res['median_abs_error_large']:.1%}. Table: {res['table_entries']} stages "
              f"({res['stages_measured']} measured by this run, {res.get('stages_from_store', 0)} from the "
              f"machine's store of stage times); static network {res['static_ms']['b1']:.3f} ms at "
              f"batch 1, {res['static_ms']['large']:.1f} ms at batch {b}; machine {res['machine']}."]
    return "\n".join(lines) + "\n"
