"""The figures of a network on the test split: accuracy, fvcore MACs and CPU speed.

A static model is measured on its own; a dynamic network's accuracy and exit rates come
from its stage outputs (computed once per split, see ``StageOutputs``) and its speed from
real early exits, timed interleaved with the deployed static model.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from s2d.data import Batches, Dataset, DatasetInfo, Split
from s2d.measure.accuracy import StageOutputs, accuracy
from s2d.measure.cost import average_macs, static_cost
from s2d.measure.timing import Forward, deployable, expected_latency, measure_speed, paired_speed
from s2d.transform.dynamic import DynamicNet

if TYPE_CHECKING:
    from s2d.transform.arch import MultiStageArch


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


@torch.no_grad()
def paired_figures(reference: Forward, candidate: Forward, test: Split, info: DatasetInfo, *, device: str = "cpu",
                   latency_images: int = 200, repeats: int = 10, latency_share: tuple[int, int] = (0, 1)
                   ) -> dict[str, float]:
    """Batch-256 throughput (``repeats`` paired calls, median ratio) and batch-1 latency (the mean over the first
    ``latency_images`` test images, each its fastest of 3 paired calls) of ``candidate`` against ``reference``,
    on the same real images: a dynamic network's time depends on where they exit. One protocol for the
    report's rows, the peers and the exported files, so their ratios compare. ``latency_share=(i, n)`` times
    only every n-th of those images from the i-th (one round's share of them)."""
    x256 = next(iter(Batches(test.subset(max(latency_images, 256)), info, 256, device=device)))[0]
    thr = paired_speed(reference, candidate, x256, repeats=repeats)
    images = x256[:latency_images]
    parts = min(latency_share[1], len(images))  # more rounds than images: some images are timed twice
    images = images[latency_share[0] % parts::parts]
    lat = expected_latency(reference, candidate, images.split(1))
    return {
        "latency_images": len(images),
        "latency_ms_batch1": lat.candidate_ms,
        "static_latency_ms_batch1": lat.reference_ms,
        "latency_ratio": lat.ratio,
        "throughput_img_s_batch256": thr.candidate.img_per_s,
        "static_throughput_img_s_batch256": thr.reference.img_per_s,
        "throughput_ratio": thr.speedup,
    }


RATIO_KEYS = ("throughput_ratio", "latency_ratio")


@torch.no_grad()
def paired_figures_in_rounds(reference: nn.Module, candidates: dict[str, nn.Module], test: Split, info: DatasetInfo,
                             *, rounds: int = 5, device: str = "cpu", latency_images: int = 200, repeats: int = 10,
                             log: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`paired_figures` of every candidate, timed together: ``rounds`` rounds, each timing every candidate
    once (the order rotated) on fresh copies of it and of the reference. Batch 256: the median over rounds, with
    its range. Batch 1: each round times its share of the ``latency_images`` (every ``rounds``-th image), and the
    figure is the mean time per image over all of them, with the range of the rounds' ratios: the same single
    images as one round would time, spread over the rounds' time windows (timing every image in every round made
    batch-1 latency 40 % of a small conversion's report).

    Timed one after the other, networks compared in one table were not: on this 2-core VM the static model's
    batch-256 time drifts between 110 and 180 ms over minutes, a fresh copy of the same network varies by about
    ±10 %, and networks of other shapes (memory- against compute-bound) move differently. The same pruned
    network read x2.41 in one process and x3.21 in the next. Rounds put every network in the same time window,
    and fresh copies sample the per-copy spread instead of keeping one draw."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(candidates)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        if log is not None:
            log(f"timing round {r + 1}/{rounds}: {len(names)} networks, each paired with the static model")
        for name in names[r % len(names):] + names[: r % len(names)] if names else []:
            runs[name].append(paired_figures(copy.deepcopy(reference), copy.deepcopy(candidates[name]), test, info,
                                             device=device, latency_images=latency_images, repeats=repeats,
                                             latency_share=(r, rounds)))
    out = {}
    for name, figs in runs.items():
        row: dict[str, Any] = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
        images = sum(f["latency_images"] for f in figs)
        for key in ("latency_ms_batch1", "static_latency_ms_batch1"):  # pooled: the mean over every timed image
            row[key] = sum(f[key] * f["latency_images"] for f in figs) / images
        row["latency_ratio"] = row["latency_ms_batch1"] / row["static_latency_ms_batch1"]
        row["latency_images"] = images
        row.update({f"{k}_range": [min(f[k] for f in figs), max(f[k] for f in figs)] for k in RATIO_KEYS})
        out[name] = {**row, "timing_rounds": rounds}
    return out


def dynamic_speed(net: DynamicNet, reference: nn.Module, data: Dataset, *, device: str = "cpu",
                  limit: int | None = None, latency_images: int = 200, repeats: int = 20, rounds: int = 3
                  ) -> dict[str, Any]:
    """:func:`paired_figures` of ``net`` with real early exits against ``reference`` (the deployed static
    model), in ``rounds`` rounds on fresh copies (one pair of copies of the same network can differ by a
    third under load), with half of ``repeats`` at batch 256 in all."""
    return paired_figures_in_rounds(reference, {"net": net.to(device).eval()}, data.test.subset(limit), data.info,
                                    rounds=rounds, device=device, latency_images=latency_images,
                                    repeats=max(1, repeats // 2 // rounds))["net"]


def exit_figures(arch: MultiStageArch, test: StageOutputs, costs: list[float]) -> dict[str, Any]:
    """Test figures of ``arch`` at its thresholds, from the test split's stage outputs (the decisions
    ``DynamicNet`` takes): accuracy, exit rates and average MACs. Nothing is timed."""
    thresholds = list(arch.thresholds)
    rates = test.exit_rates(thresholds)
    return {
        "arch": arch.to_dict(),
        "test_accuracy": test.accuracy(thresholds),
        "test_images": test.confidence.shape[1],
        "stage_macs": costs,
        "average_macs": average_macs(costs, rates),
        "exit_rates": rates,
    }


def dynamic_figures(net: DynamicNet, test: StageOutputs, costs: list[float], reference: nn.Module, data: Dataset, *,
                    device: str = "cpu", limit: int | None = None, repeats: int = 20, latency_images: int = 200
                    ) -> dict[str, Any]:
    """:func:`exit_figures` of a deployed ``DynamicNet``, and its paired speed."""
    return {**exit_figures(net.arch, test, costs),
            **dynamic_speed(net, reference, data, device=device, limit=limit, latency_images=latency_images,
                            repeats=repeats)}
