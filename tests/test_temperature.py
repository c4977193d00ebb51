"""Per-exit temperature scaling: fitted on one split, it lowers the NLL on another; exits honour it."""

from __future__ import annotations

import pytest
import torch
from conftest import random_resnet20_supernet

from s2d.data import Batches, calibration_split
from s2d.errors import ArchError
from s2d.measure.accuracy import logits, stage_outputs
from s2d.measure.temperature import fit_stage_temperatures, fit_temperature, nll
from s2d.models.zoo import load_model
from s2d.transform.arch import MultiStageArch
from s2d.transform.exit_rule import max_softmax

STAGES = [{"width": 0.25, "exit": "layer1.2", "reuse": True}, {"width": 1.0, "exit": "output", "reuse": True}]


@pytest.fixture(scope="module")
def zoo_logits(fmnist):
    """The zoo ResNet-20's logits on the two held-out parts (search validation, calibration)."""
    model = load_model("resnet20", fmnist.info, "zoo")
    search, calib = calibration_split(fmnist.val.subset(2000), 1000)
    return (logits(model, search, fmnist.info), search.labels), (logits(model, calib, fmnist.info), calib.labels)


@pytest.mark.parametrize("scale", [0.25, 4.0])  # under- and over-confident versions of a real classifier
def test_fit_lowers_held_out_nll(zoo_logits, scale):
    (fit_logits, fit_labels), (held_logits, held_labels) = zoo_logits
    t = fit_temperature(fit_logits * scale, fit_labels)
    assert nll(held_logits * scale, held_labels, t) < nll(held_logits * scale, held_labels, 1.0) - 0.01
    # scaling the logits scales the fitted temperature: the fit finds the same calibrated softmax
    assert t == pytest.approx(scale * fit_temperature(fit_logits, fit_labels), rel=0.02)
    assert ((held_logits * scale / t).argmax(1) == held_logits.argmax(1)).all()  # accuracy unchanged


def test_temperatures_round_trip_and_are_validated():
    arch = MultiStageArch.from_dict({"stages": STAGES, "thresholds": [0.8], "temperatures": [2.0, 1.5]})
    assert arch.temperatures == (2.0, 1.5)
    assert MultiStageArch.from_dict(arch.to_dict()) == arch
    assert arch.with_thresholds([0.5]).temperatures == (2.0, 1.5)  # recalibrating keeps them
    assert "temperatures" not in MultiStageArch.from_dict({"stages": STAGES}).to_dict()
    for bad in ([2.0], [0.0, 1.0], [-1.0, 1.0], [True, 1.0], "hot"):
        with pytest.raises(ArchError, match="temperatures"):
            MultiStageArch.from_dict({"stages": STAGES, "temperatures": bad})


def test_exits_read_tempered_confidences(quick_data):
    """``DynamicNet`` and ``StageOutputs`` take the same decisions on logits / T, which differ from T = 1."""
    sn = random_resnet20_supernet(head_std=1.5)
    split = quick_data.val.subset(200)
    arch = fit_stage_temperatures(sn, MultiStageArch.from_dict({"stages": STAGES}), split, quick_data.info)
    assert len(arch.temperatures) == 2 and arch.temperatures[0] != pytest.approx(1.0, abs=0.05)
    outs = stage_outputs(sn, arch, split, quick_data.info)
    plain = stage_outputs(sn, MultiStageArch(arch.stages), split, quick_data.info)
    threshold = float(outs.confidence[0].median())
    tempered = arch.with_thresholds([threshold])
    with torch.no_grad():
        first = sn.forward_stages(torch.zeros(1, 1, 28, 28), arch)[0]
    assert tempered.confidence(0, first) == pytest.approx(max_softmax(first / arch.temperatures[0]))
    x = torch.cat([xb for xb, _ in Batches(split, quick_data.info, 200)])
    _, exits = sn.materialise(tempered)(x)
    assert torch.equal(exits, outs.exits([threshold]))
    assert not torch.equal(outs.exits([threshold]), plain.exits([threshold]))
