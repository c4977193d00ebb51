"""``DynamicNet``: real early exits agree with every stage's logits plus the per-sample rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_resnet20_supernet

from s2d.transform.arch import MultiStageArch
from s2d.transform.exit_rule import EXIT_RULES, confidence, entropy, exit_rates, exit_stages, margin, max_softmax
from s2d.transform.supernet import SuperNet

STAGES = [{"width": 0.25, "exit": "layer1.2", "reuse": True},
          {"width": 0.5, "exit": "layer2.2", "reuse": False},
          {"width": 1.0, "exit": "output", "reuse": True}]


@pytest.fixture(scope="module")
def sn() -> SuperNet:
    return random_resnet20_supernet(head_std=1.5)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def thresholds_splitting(all_logits: list[torch.Tensor], rule: str) -> list[float]:
    """Thresholds that let roughly a third of the samples exit at each early stage, placed
    halfway between two confidences so no sample sits on a threshold."""
    out = []
    for lg, q in zip(all_logits[:-1], (0.7, 0.5), strict=False):
        c = confidence(rule, lg).sort().values
        k = int(q * (len(c) - 1))
        assert c[k + 1] - c[k] > 1e-5, "two confidences too close to separate robustly"
        out.append(float((c[k] + c[k + 1]) / 2))
    return out


@pytest.mark.parametrize("rule", list(EXIT_RULES))
def test_dynamic_net_equals_stages_plus_rule(sn, x, rule):
    arch = MultiStageArch.from_dict({"stages": STAGES, "exit_rule": rule})
    with torch.no_grad():
        stage_logits = sn.forward_stages(x, arch)
    thresholds = thresholds_splitting(stage_logits, rule)
    net = sn.materialise(arch.with_thresholds(thresholds))
    all_logits = net.forward_all(x)
    for a, b in zip(all_logits, stage_logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)

    conf = torch.stack([confidence(rule, lg) for lg in all_logits])
    expected_exit = exit_stages(conf, thresholds)
    assert set(expected_exit.tolist()) == {0, 1, 2}, "the thresholds should exercise every stage"
    expected = torch.stack(all_logits)[expected_exit, torch.arange(len(x))]

    logits, exits = net(x)
    assert torch.equal(exits, expected_exit)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    # by hand: a sample exits at the first stage whose confidence reaches its threshold
    for i in range(len(x)):
        s = next((s for s in range(2) if conf[s, i] >= thresholds[s]), 2)
        assert exits[i].item() == s


def test_threshold_extremes(sn, x):
    arch = MultiStageArch.from_dict({"stages": STAGES})
    net = sn.materialise(arch.with_thresholds([0.0, 0.0]))
    all_logits = net.forward_all(x)
    logits, exits = net(x)
    assert torch.equal(exits, torch.zeros(len(x), dtype=torch.long))
    torch.testing.assert_close(logits, all_logits[0], atol=1e-6, rtol=0)
    net.set_thresholds([1.01, 1.5])
    logits, exits = net(x)
    assert torch.equal(exits, torch.full((len(x),), 2, dtype=torch.long))
    torch.testing.assert_close(logits, all_logits[2], atol=1e-5, rtol=0)
    # a threshold of 0 at stage 2 only: nobody reaches stage 3
    net.set_thresholds([1.01, 0.0])
    logits, exits = net(x)
    assert torch.equal(exits, torch.ones(len(x), dtype=torch.long))
    torch.testing.assert_close(logits, all_logits[1], atol=1e-5, rtol=0)
    assert exit_rates(exits, 3) == [0.0, 1.0, 0.0]
    # a confidence equal to the threshold exits (>=): only the most confident sample leaves at stage 1
    conf0 = confidence("max_softmax", all_logits[0])
    net.set_thresholds([conf0.max().item(), 1.01])
    _, exits = net(x)
    assert exits.tolist() == [0 if i == conf0.argmax().item() else 2 for i in range(len(x))]


def test_results_do_not_depend_on_batch_composition(sn, x):
    arch = MultiStageArch.from_dict({"stages": STAGES})
    with torch.no_grad():
        thresholds = thresholds_splitting(sn.forward_stages(x, arch), "max_softmax")
    net = sn.materialise(arch.with_thresholds(thresholds))
    logits, exits = net(x)
    assert len(set(exits.tolist())) == 3
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
    pl, pe = net(x[perm])
    assert torch.equal(pe, exits[perm])
    torch.testing.assert_close(pl, logits[perm], atol=1e-5, rtol=0)
    for i in range(0, len(x), 5):  # alone in its batch
        li, ei = net(x[i:i + 1])
        assert ei.item() == exits[i].item()
        torch.testing.assert_close(li[0], logits[i], atol=1e-5, rtol=0)
    # mixed with other samples: the first half alongside different companions
    other = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ml, me = net(torch.cat([x[:8], other]))
    assert torch.equal(me[:8], exits[:8])
    torch.testing.assert_close(ml[:8], logits[:8], atol=1e-5, rtol=0)


def test_dynamic_net_needs_thresholds(sn):
    from s2d.transform.dynamic import DynamicNet

    plan = sn.plan(MultiStageArch.from_dict({"stages": STAGES}))
    with pytest.raises(ValueError, match="threshold"):
        DynamicNet(MultiStageArch.from_dict({"stages": STAGES}), plan.stages, plan.cache_in, plan.cache_out)


# ---------------------------------------------------------------- exit rules

def test_exit_rules_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05]], dtype=torch.float64)
    logits = p.log() + torch.tensor([[1.0], [-3.0], [7.0]], dtype=torch.float64)  # shift: same softmax
    h = [-sum(v * math.log(v) for v in row) for row in p.tolist()]
    torch.testing.assert_close(max_softmax(logits), torch.tensor([0.5, 1 / 3, 0.9]), atol=1e-6, rtol=0)
    torch.testing.assert_close(margin(logits), torch.tensor([0.2, 0.0, 0.85]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy(logits), torch.tensor([1 - v / math.log(3) for v in h]), atol=1e-6, rtol=0)
    assert confidence("entropy", logits)[1].abs() < 1e-6  # uniform: no confidence
    one_hot = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    for rule in EXIT_RULES:
        assert confidence(rule, one_hot).item() == pytest.approx(1.0, abs=1e-6), rule


def test_exit_rules_stay_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(200, 10, generator=g) * s for s in (0.01, 1, 10, 1000)]
                       + [torch.zeros(3, 10), torch.full((2, 10), 5.0), torch.tensor([[1e4] * 2 + [0] * 8])])
    for rule in EXIT_RULES:
        c = confidence(rule, logits)
        assert c.shape == (len(logits),)
        assert torch.isfinite(c).all(), rule
        assert c.min() >= -1e-6 and c.max() <= 1 + 1e-6, rule
    # higher means surer: sharpening a distribution (lower temperature) never lowers these two
    base = torch.randn(50, 10, generator=g)
    for rule in ("max_softmax", "entropy"):
        assert (confidence(rule, base * 3) >= confidence(rule, base) - 1e-6).all(), rule


def test_exit_stages_by_hand():
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.1],
                         [0.1, 0.8, 0.7, 0.2],
                         [0.0, 0.0, 0.0, 0.0]])
    assert exit_stages(conf, [0.6, 0.75]).tolist() == [0, 1, 0, 2]
    assert exit_stages(conf, [0.95, 0.7]).tolist() == [2, 1, 1, 2]
    assert exit_stages(conf[:1], []).tolist() == [0, 0, 0, 0]  # one stage: everyone at it
    assert exit_rates(torch.tensor([0, 1, 0, 2]), 3) == [0.5, 0.25, 0.25]
