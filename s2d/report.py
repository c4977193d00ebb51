"""Evaluation reports: the figures ``s2d eval`` prints, with stable JSON keys."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from s2d.cost import static_cost
from s2d.data import Dataset
from s2d.evaluation import accuracy, measure_speed


def evaluate_static(model: nn.Module, data: Dataset, *, device: str = "cpu", limit: int | None = None,
                    repeats: int = 20) -> dict[str, Any]:
    """Test accuracy, fvcore MACs, parameters, and CPU latency (batch 1) / throughput (batch 256)."""
    model = model.to(device).eval()
    test = data.test.subset(limit)
    cost = static_cost(model, data.info)
    info = data.info
    x1 = torch.randn(1, info.in_channels, info.image_size, info.image_size, device=device)
    x256 = torch.randn(256, info.in_channels, info.image_size, info.image_size, device=device)
    lat = measure_speed(model, x1, repeats=max(repeats, 20), min_seconds=1.0)
    thr = measure_speed(model, x256, repeats=max(3, repeats // 4))
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
        lines.append(f"not counted  {', '.join(f'{k}×{v}' for k, v in r['fvcore_unsupported_ops'].items())}")
    return "\n".join(lines)
