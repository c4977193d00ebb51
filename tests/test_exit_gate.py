"""Learned exit gates: fitted to "exiting here loses nothing", they rank the images an exit would lose below
the ones it keeps better than the softmax does, on images they were not fitted on; exits honour them."""

from __future__ import annotations

import pytest
import torch
from conftest import random_resnet20_supernet

from s2d.data import Batches, Split, calibration_split
from s2d.errors import ArchError
from s2d.measure.accuracy import logits, stage_outputs
from s2d.measure.exit_gate import fit_gate, fit_stage_gates, safe_exits, softmax_gate
from s2d.models.zoo import load_model
from s2d.transform.arch import MultiStageArch
from s2d.transform.exit_rule import gate_confidence, gate_size, max_softmax

STAGES = [{"width": 0.25, "exit": "layer1.2", "reuse": True}, {"width": 1.0, "exit": "output", "reuse": True}]


def _auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    return ((pos[:, None] > neg[None]).double().mean() + 0.5 * (pos[:, None] == neg[None]).double().mean()).item()


@pytest.fixture(scope="module")
def two_stage_logits(fmnist):
    """Real stages of unequal strength: the zoo ResNet-20 on noisy images (a weak first stage) and on the clean
    ones (the last stage), on the two held-out parts (search validation, calibration)."""
    model = load_model("resnet20", fmnist.info, "zoo")
    search, calib = calibration_split(fmnist.val.subset(3000), 1500)
    gen = torch.Generator().manual_seed(0)
    out = []
    for split in (search, calib):
        noise = 35 * torch.randn(split.images.shape, generator=gen)
        noisy = Split((split.images.float() + noise).clamp(0, 255).to(torch.uint8), split.labels)
        out.append((torch.stack([logits(model, noisy, fmnist.info), logits(model, split, fmnist.info)]), split.labels))
    return out


def test_a_fitted_gate_ranks_lost_images_lower_than_the_softmax_on_held_out_images(two_stage_logits):
    (fit_logits, fit_labels), (held_logits, held_labels) = two_stage_logits
    fit_safe, held_safe = safe_exits(fit_logits, fit_labels)[0], safe_exits(held_logits, held_labels)[0]
    assert 0.05 < 1 - held_safe.double().mean() < 0.6  # the weak stage loses images the last one keeps
    gate = fit_gate(fit_logits[0], fit_safe)
    gated = _auc(gate_confidence(held_logits[0], gate), held_safe)
    softmax = _auc(max_softmax(held_logits[0]), held_safe)
    print(f"held-out AUC of 'exiting loses nothing': gate {gated:.4f}, max softmax {softmax:.4f}")
    assert gated > softmax + 0.005


def test_degenerate_stages_get_the_softmax_itself():
    lg = torch.randn(50, 10) * 3
    for safe in (torch.ones(50, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)):
        assert fit_gate(lg, safe) == softmax_gate(10)
    assert torch.allclose(gate_confidence(lg, softmax_gate(10)), max_softmax(lg), atol=1e-6)


def test_safe_exits_count_only_images_the_last_stage_would_keep():
    lg = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]],  # first stage: right, wrong, wrong
                       [[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]]])  # last stage: right, right, wrong
    assert safe_exits(lg, torch.tensor([0, 0, 1])).tolist() == [[True, False, True]]


def test_gates_round_trip_and_are_validated():
    gate = [0.5] * gate_size(10)
    arch = MultiStageArch.from_dict({"stages": STAGES, "thresholds": [0.8], "gates": [gate]})
    assert arch.gates == (tuple(gate),)
    assert MultiStageArch.from_dict(arch.to_dict()) == arch
    assert arch.with_thresholds([0.5]).gates == arch.gates and arch.with_temperatures([2.0, 1.0]).gates == arch.gates
    assert "gates" not in MultiStageArch.from_dict({"stages": STAGES}).to_dict()
    for bad in ([gate, gate], [[]], [[0.5, True]], [[float("nan")] * 3], "on"):
        with pytest.raises(ArchError, match="gates"):
            MultiStageArch.from_dict({"stages": STAGES, "gates": bad})
    sn = random_resnet20_supernet(head_std=1.0)
    with pytest.raises(ArchError, match="another model"):
        sn.validate(MultiStageArch.from_dict({"stages": STAGES, "gates": [[0.5] * gate_size(100)]}))


def test_exits_read_gated_confidences(quick_data):
    """``DynamicNet`` and ``StageOutputs`` take the same decisions on the gate's probability, and they differ from
    the softmax's."""
    sn = random_resnet20_supernet(head_std=1.5)
    split = quick_data.val.subset(300)
    arch = fit_stage_gates(sn, MultiStageArch.from_dict({"stages": STAGES}).with_temperatures([1.5, 1.0]), split,
                           quick_data.info)
    assert len(arch.gates) == 1 and len(arch.gates[0]) == gate_size(10)
    outs = stage_outputs(sn, arch, split, quick_data.info)
    plain = stage_outputs(sn, MultiStageArch(arch.stages, temperatures=arch.temperatures), split, quick_data.info)
    # between two confidences far apart, so folding batch norm into the deployed convs moves nobody across it
    c = outs.confidence[0].sort().values[len(split) // 4: 3 * len(split) // 4]
    gap = int((c[1:] - c[:-1]).argmax())
    threshold = float(c[gap] + c[gap + 1]) / 2
    gated = arch.with_thresholds([threshold])
    x = torch.cat([xb for xb, _ in Batches(split, quick_data.info, 300)])
    with torch.no_grad():
        first = sn.forward_stages(x[:4], arch)[0]
    assert torch.allclose(gated.confidence(0, first), gate_confidence(first / 1.5, arch.gates[0]))
    _, exits = sn.materialise(gated)(x)
    assert torch.equal(exits, outs.exits([threshold]))
    assert not torch.equal(outs.exits([threshold]), plain.exits([float(plain.confidence[0].median())]))
