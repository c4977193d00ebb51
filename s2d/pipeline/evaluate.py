"""``s2d eval --arch`` and ``s2d export``: a hand-written arch on a pretrained model, without a supernet run.

The arch's exit heads are fitted on the training split (frozen backbone) and batch norm is
recalibrated for it; thresholds missing from the arch are calibrated on validation data.
Each split goes through the network once: the validation outputs serve calibration, the
test outputs serve accuracy, exit rates and the threshold sweep.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from s2d import checkpoint
from s2d.data import Dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import StageOutputs, accuracy, stage_outputs
from s2d.measure.calibration import calibrate_thresholds
from s2d.measure.cost import average_macs, stage_macs
from s2d.measure.network import dynamic_figures, evaluate_static
from s2d.measure.timing import deployable
from s2d.models import get_model
from s2d.training.heads import prepare_arch
from s2d.transform.arch import MultiStageArch
from s2d.transform.sliced import EXIT_HEADS
from s2d.transform.supernet import SuperNet, is_dynamic_checkpoint

__all__ = ["dynamic_from_files", "evaluate_dynamic", "evaluate_static", "threshold_sweep"]


def _supernet(model: nn.Module, data: Dataset, device: str, head_hidden: int = EXIT_HEADS["mlp"]) -> SuperNet:
    info = data.info
    return SuperNet(model.cpu(), (info.in_channels, info.image_size, info.image_size), info.num_classes,
                    head_hidden=head_hidden).to(device)


def _prepared(model: nn.Module, data: Dataset, arch: MultiStageArch, *, tolerance: float,
              device: str) -> tuple[SuperNet, MultiStageArch, float, list[float], list[dict[str, int]], StageOutputs]:
    """A supernet of ``model`` ready for ``arch``: heads fitted, BN recalibrated, thresholds calibrated
    (unless the arch has them). Returns (supernet, arch with thresholds, static val accuracy, stage MACs,
    ops fvcore skipped, validation stage outputs)."""
    supernet = _supernet(model, data, device)
    arch = supernet.validate(arch)
    static_val = accuracy(supernet.static, data.val, data.info, device=device)  # before BN is recalibrated
    prepare_arch(supernet, arch, data, device=device)
    costs, skipped = stage_macs(supernet.materialise(arch, fold_bn=False).stages, supernet.input_shape)
    val = stage_outputs(supernet, arch, data.val, data.info, device=device)
    if not arch.thresholds:
        arch = arch.with_thresholds(calibrate_thresholds(val, costs, static_val - tolerance)[0])
    return supernet, arch, static_val, costs, skipped, val


SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def threshold_sweep(test: StageOutputs, costs: list[float], static_macs: float) -> list[dict[str, Any]]:
    """Test accuracy and average MACs with one threshold for every stage, for a few values.

    A report figure (how accuracy trades against cost), never used to choose anything.
    """
    rows = []
    for t in SWEEP:
        th = [t] * (test.num_stages - 1)
        rates = test.exit_rates(th)
        avg = average_macs(costs, rates)
        rows.append({"threshold": t, "test_accuracy": test.accuracy(th), "average_macs": avg,
                     "mac_ratio": avg / static_macs, "exit_rates": rates})
    return rows


def evaluate_dynamic(model: nn.Module, data: Dataset, arch: MultiStageArch, static: dict[str, Any], *,
                     device: str = "cpu", limit: int | None = None, repeats: int = 20,
                     tolerance: float = 0.005) -> dict[str, Any]:
    """``s2d eval --arch``: the arch's figures next to the static model's (``static``), with paired speed ratios."""
    reference = deployable(copy.deepcopy(model).to(device))  # before the supernet recalibrates shared BN buffers
    supernet, arch, static_val, costs, skipped, val = _prepared(model, data, arch, tolerance=tolerance, device=device)
    test = stage_outputs(supernet, arch, data.test.subset(limit), data.info, device=device)
    out = dynamic_figures(supernet.materialise(arch), test, costs, reference, data, device=device, limit=limit,
                          repeats=repeats)
    th = list(arch.thresholds)
    out.update({
        "val_accuracy": val.accuracy(th),
        "val_stage_accuracy": val.stage_accuracy(),
        "val_average_macs": average_macs(costs, val.exit_rates(th)),
        "val_exit_rates": val.exit_rates(th),
        "static_val_accuracy": static_val,
        "fvcore_unsupported_ops": skipped,
        "mac_ratio": out["average_macs"] / static["macs"],
        "speedup_macs": static["macs"] / out["average_macs"],
        "accuracy_delta": out["test_accuracy"] - static["test_accuracy"],
        "threshold_sweep": threshold_sweep(test, costs, static["macs"]),
    })
    return out


def dynamic_from_files(data: Dataset, weights: str | None, *, model_name: str, arch: MultiStageArch | None,
                       tolerance: float, device: str = "cpu") -> tuple[SuperNet, MultiStageArch]:
    """(supernet, arch with thresholds) from a dynamic checkpoint of ``s2d convert`` (its arch unless
    ``arch`` is given), or from a static model and an arch."""
    from s2d.models.zoo import load_model

    ckpt = checkpoint.load(weights) if weights and Path(weights).is_file() else None
    if ckpt is not None and is_dynamic_checkpoint(ckpt):
        supernet = _supernet(get_model(ckpt["model"], ckpt["num_classes"], ckpt["in_channels"],
                                       image_size=ckpt["image_size"]), data, device,
                             head_hidden=ckpt.get("head_hidden", 0))  # checkpoints older than the key: linear
        checkpoint.load_into(supernet, ckpt["state_dict"], str(weights))
        arch = arch or MultiStageArch.from_dict(ckpt["arch"])
        return supernet.eval(), supernet.validate(arch)
    if arch is None:
        raise S2DError("--arch ARCH.json is required unless --weights is a dynamic checkpoint from `s2d convert`")
    supernet, arch, *_ = _prepared(load_model(model_name, data.info, weights), data, arch, tolerance=tolerance,
                                   device=device)
    return supernet.eval(), arch
