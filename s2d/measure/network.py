"""The figures of a network on the test split: accuracy, fvcore MACs and CPU speed.

A static model is measured on its own; a dynamic network's accuracy and exit rates come
from its stage outputs (computed once per split, see ``StageOutputs``) and its speed from
real early exits, timed interleaved with the deployed static model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from s2d.data import Batches, Dataset, DatasetInfo, Split
from s2d.measure.accuracy import StageOutputs, accuracy
from s2d.measure.cost import average_macs, static_cost
from s2d.measure.timing import Forward, deployable, expected_latency, measure_speed, paired_speed
from s2d.transform.dynamic import DynamicNet


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
                   latency_images: int = 200, repeats: int = 10) -> dict[str, float]:
    """Batch-256 throughput (``repeats`` paired calls, median ratio) and batch-1 latency (the mean over the first
    ``latency_images`` test images, each its fastest of 3 paired calls) of ``candidate`` against ``reference``,
    on the same real images: a dynamic network's time depends on where they exit. One protocol for the
    report's rows, the peers and the exported files, so their ratios compare."""
    x256 = next(iter(Batches(test.subset(max(latency_images, 256)), info, 256, device=device)))[0]
    thr = paired_speed(reference, candidate, x256, repeats=repeats)
    lat = expected_latency(reference, candidate, x256[:latency_images].split(1))
    return {
        "latency_ms_batch1": lat.candidate_ms,
        "static_latency_ms_batch1": lat.reference_ms,
        "latency_ratio": lat.ratio,
        "throughput_img_s_batch256": thr.candidate.img_per_s,
        "static_throughput_img_s_batch256": thr.reference.img_per_s,
        "throughput_ratio": thr.speedup,
    }


def dynamic_speed(net: DynamicNet, reference: nn.Module, data: Dataset, *, device: str = "cpu",
                  limit: int | None = None, latency_images: int = 200, repeats: int = 20) -> dict[str, float]:
    """:func:`paired_figures` of ``net`` with real early exits against ``reference`` (the deployed static
    model), with half of ``repeats`` at batch 256."""
    return paired_figures(reference, net.to(device).eval(), data.test.subset(limit), data.info, device=device,
                          latency_images=latency_images, repeats=max(1, repeats // 2))


def dynamic_figures(net: DynamicNet, test: StageOutputs, costs: list[float], reference: nn.Module, data: Dataset, *,
                    device: str = "cpu", limit: int | None = None, repeats: int = 20, latency_images: int = 200
                    ) -> dict[str, Any]:
    """Test figures of a deployed ``DynamicNet``: accuracy and exit rates at its thresholds (from the
    test split's stage outputs), average MACs, and paired speed."""
    thresholds = list(net.arch.thresholds)
    rates = test.exit_rates(thresholds)
    return {
        "arch": net.arch.to_dict(),
        "test_accuracy": test.accuracy(thresholds),
        "test_images": test.confidence.shape[1],
        "stage_macs": costs,
        "average_macs": average_macs(costs, rates),
        "exit_rates": rates,
        **dynamic_speed(net, reference, data, device=device, limit=limit, latency_images=latency_images,
                        repeats=repeats),
    }
