"""``s2d bench``: the quality and speed targets, measured (not timed unit tests).

* ``targets``: a conversion's report against the product targets (accuracy within 0.2
  points of static, >= 3x fewer average MACs, >= 2x batch-256 throughput).
* ``rank``: does the supernet rank archs like separate fine-tuning does? Kendall tau
  between each arch's supernet validation accuracy and its accuracy after fine-tuning
  it alone from the static weights, over archs sampled from the space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

from s2d.errors import S2DError
from s2d.runs import open_run, write_json_atomic
from s2d.training.heads import fit_heads
from s2d.training.supernet import train_archs

TARGETS = {"accuracy_delta_points": -0.2, "mac_ratio": 1 / 3, "throughput_ratio": 2.0}
ZOO_TARGETS = {("resnet20", "fashion-mnist"): 0.930, ("mobilenetv2", "fashion-mnist"): 0.925}  # test accuracy


def check_zoo() -> dict[str, Any]:
    """The zoo's recorded test accuracies against the foundation targets."""
    from s2d.models.zoo import load_manifest

    have = {(e["name"], e["dataset"]): e for e in load_manifest()}
    return {f"{n} ({d})": {"value": have[n, d]["test_accuracy"] if (n, d) in have else float("nan"),
                          "target": f">= {t}", "met": (n, d) in have and have[n, d]["test_accuracy"] >= t}
            for (n, d), t in ZOO_TARGETS.items()}


def check_targets(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.exists():
        raise S2DError(f"{path} does not exist; run `s2d convert --run-dir {run_dir}` first")
    d = json.loads(path.read_text())["dynamic"]
    return {
        "accuracy_delta_points": {"value": d["accuracy_delta_points"], "target": ">= -0.2",
                                  "met": d["accuracy_delta_points"] >= TARGETS["accuracy_delta_points"]},
        "mac_reduction": {"value": 1 / d["mac_ratio"], "target": ">= 3", "met": d["mac_ratio"] <= TARGETS["mac_ratio"]},
        "throughput_ratio": {"value": d["throughput_ratio"], "target": ">= 2",
                             "met": d["throughput_ratio"] >= TARGETS["throughput_ratio"]},
    }


@torch.no_grad()
def _mean_stage_accuracy(supernet, arch, data, device: str, images: int) -> tuple[float, float]:
    from s2d.measure.accuracy import stage_logits

    val = data.val.subset(images)
    supernet.eval()  # running (per-arch) statistics, not the batch's
    logits = stage_logits(lambda x: supernet.forward_stages(x, arch), val, data.info, device=device)
    acc = (logits.argmax(-1) == val.labels[None]).float().mean(1)
    return acc.mean().item(), acc[-1].item()


def rank_correlation(pipeline, *, archs: int = 8, steps: int = 150, seed: int = 0, images: int = 2000,
                     progress: bool = True) -> dict[str, Any]:
    """Kendall tau of supernet accuracy vs. separately fine-tuned accuracy, for ``archs`` sampled archs."""

    pipeline.load_supernet()
    rng = np.random.default_rng(seed + 12345)
    sampled = [pipeline.space.sample(rng) for _ in range(archs)]
    device = pipeline.cfg.device
    out_dir = pipeline.run.root / "bench_rank"
    result_path = out_dir / "rank.json"
    rows: list[dict[str, Any]] = json.loads(result_path.read_text())["rows"] if result_path.exists() else []
    info = pipeline.data.info
    for i, arch in enumerate(sampled):
        if i < len(rows):
            continue  # resumed
        shared, shared_last = _mean_stage_accuracy(pipeline.supernet, arch, pipeline.data, device, images)
        alone = pipeline.new_supernet()
        run = open_run(out_dir / f"arch{i}", {"arch": arch.key()}, identity=("arch",))
        if not (run.checkpoints / "alone.pt").exists():  # same head start as the supernet's heads had
            fit_heads(alone, arch, pipeline.data.train.subset(pipeline.budget.head_images), info, device=device)
        train_archs(alone, pipeline.teacher, pipeline.data, lambda r, a=arch: [a], pipeline.train_config(steps),
                    run, ckpt_name="alone.pt", tag="alone", device=device, progress=progress)
        tuned, tuned_last = _mean_stage_accuracy(alone, arch, pipeline.data, device, images)
        rows.append({"arch": arch.to_dict(), "supernet_acc": shared, "finetuned_acc": tuned,
                     "supernet_last_stage_acc": shared_last, "finetuned_last_stage_acc": tuned_last})
        write_json_atomic(result_path, {"rows": rows})
    tau, p = kendalltau([r["supernet_acc"] for r in rows], [r["finetuned_acc"] for r in rows])
    tau_last, _ = kendalltau([r["supernet_last_stage_acc"] for r in rows],
                             [r["finetuned_last_stage_acc"] for r in rows])
    res = {"kendall_tau": float(tau), "p_value": float(p), "kendall_tau_last_stage": float(tau_last),
           "archs": len(rows), "finetune_steps": steps, "val_images": images, "rows": rows}
    write_json_atomic(result_path, res)
    return res
