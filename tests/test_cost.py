"""fvcore MACs of static models and of the stages of an arch; average MACs; threshold calibration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from s2d.data import DatasetInfo
from s2d.measure.calibration import BUDGET_BAND, calibrate, calibrate_budget
from s2d.measure.cost import average_macs, count_macs, exit_macs, stage_macs, static_cost
from s2d.models import get_model
from s2d.transform.arch import MultiStageArch, static_arch
from s2d.transform.exit_rule import NEVER_EXIT, exit_stages
from s2d.transform.graph import channels
from s2d.transform.supernet import SuperNet

CIFAR = DatasetInfo("cifar10", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True)
SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return get_model("resnet20", 10, 3).eval()


@pytest.fixture(scope="module")
def cost(resnet20):
    return static_cost(resnet20, CIFAR)


def test_resnet20_published_conv_macs(cost):
    conv = cost.by_operator["conv"]
    assert conv == pytest.approx(40.81e6, rel=0.005)
    # fvcore's total adds batch norm (2 per element in eval: scale and shift), the global
    # average pool (one per input element) and the classifier on top of the convs
    bn_elements = 32 * 32 * 16 * 7 + 16 * 16 * 32 * 7 + 8 * 8 * 64 * 7  # stem + 6 BNs per section + shortcut
    assert cost.by_operator["batch_norm"] == 2 * bn_elements
    assert cost.by_operator["adaptive_avg_pool2d"] == 8 * 8 * 64
    assert cost.by_operator["linear"] == 64 * 10
    assert cost.total_macs == pytest.approx(sum(cost.by_operator.values()))
    assert cost.total_macs == 41_218_688  # 40.81 M conv + 0.40 M BN + pool + fc
    assert set(cost.unsupported_ops) == {"aten::add"}  # the 9 residual adds carry no multiply-add
    assert cost.unsupported_ops["aten::add"] == 9


def _conv_geometry(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Conv2d, int]]:
    """Every conv with its output resolution H*W, measured with hooks."""
    out: dict[str, tuple[nn.Conv2d, int]] = {}

    def hook(mod, inputs, output, name):
        out[name] = (mod, output.shape[2] * output.shape[3])

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_reuse_on_stage_macs_sum(resnet20, cost):
    sn = SuperNet(resnet20, SHAPE, 10).eval()
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.25, "exit": "layer1.2", "reuse": True},
                                                {"width": 0.5, "exit": "layer2.2", "reuse": True},
                                                {"width": 1.0, "exit": "output", "reuse": True}]})
    net = sn.materialise(arch, fold_bn=False)
    macs, skipped = stage_macs(list(net.stages), SHAPE)
    assert len(macs) == 3 and all(m > 0 for m in macs)
    assert all(set(s) <= {"aten::add"} for s in skipped), skipped

    # Expected, independently: stage r owns output rows [c_{r-1}, c_r) of a conv (from 0 for
    # the first stage reaching it) and, with reuse on, reads input channels [0, c_r(C_in)):
    # the upper-triangular blocks (input channels [c_r(C_in), C_in)) are never computed.
    widths = [s.width for s in arch.stages]
    exit_index = [sn.graph.exit(s.exit).index for s in arch.stages]
    index_of = {str(t.node.target): t.index for t in sn.graph.trunk if t.node.op == "call_module"}
    skipped_macs = 0
    for name, (conv, hw) in _conv_geometry(resnet20, torch.zeros(1, *SHAPE)).items():
        k = conv.kernel_size[0] * conv.kernel_size[1]
        if conv.in_channels == 3:  # the stem reads the whole image
            continue
        first = min(r for r in range(3) if index_of[name] <= exit_index[r])
        for r in range(first, 3):
            rows = channels(widths[r], conv.out_channels) - (
                0 if r == first else channels(widths[r - 1], conv.out_channels))
            cols = conv.in_channels - channels(widths[r], conv.in_channels)
            skipped_macs += rows * cols * k * hw
    heads = 0
    for st in arch.stages[:-1]:
        e = sn.graph.exit(st.exit)
        c = channels(st.width, e.channels)
        h, w = e.spatial
        cells = math.ceil(h / math.ceil(h / 4)) * math.ceil(w / math.ceil(w / 4))  # pooled to <= 4x4, ceil mode
        heads += h * w * c + c * cells * 10  # pooling (one per input element) + linear
    assert skipped_macs > 1e6  # a real saving, not a vacuous identity
    assert sum(macs) == cost.total_macs - skipped_macs + heads

    # folding batch norm into the convs removes exactly the BN count
    folded, _ = stage_macs(list(sn.materialise(arch).stages), SHAPE)
    assert sum(folded) == sum(macs) - cost.by_operator["batch_norm"]

    # per stage: stage 1 is a quarter-width network up to layer1.2 (stem reads 3 channels)
    c1 = 4
    stage1_conv = 32 * 32 * (c1 * 3 * 9 + 6 * c1 * c1 * 9)
    stage1_bn = 2 * 32 * 32 * c1 * 7
    assert macs[0] == stage1_conv + stage1_bn + 32 * 32 * c1 + c1 * 16 * 10  # head: 32x32 pooled to 4x4, linear


def test_one_stage_arch_costs_the_static_model(resnet20, cost):
    sn = SuperNet(resnet20, SHAPE, 10).eval()
    macs, _ = stage_macs(list(sn.materialise(static_arch(), fold_bn=False).stages), SHAPE)
    assert macs == [cost.total_macs]


def test_exit_macs_are_cumulative(resnet20, cost):
    graph = SuperNet(resnet20, SHAPE, 10).graph
    macs = exit_macs(graph, SHAPE)
    assert len(macs) == len(graph.exits)
    assert all(a < b for a, b in itertools.pairwise(macs))
    # the stem: conv 3->16 on 32x32 plus its batch norm
    assert macs[0] == 32 * 32 * 16 * 27 + 2 * 32 * 32 * 16
    # the output exit is the whole static model (its head is the static classifier)
    assert macs[-1] == cost.total_macs


def test_average_macs_by_hand():
    assert average_macs([10.0, 20.0, 40.0], [0.5, 0.25, 0.25]) == pytest.approx(10 + 0.5 * 20 + 0.25 * 40)
    assert average_macs([10.0, 20.0], [0.0, 1.0]) == 30.0
    assert average_macs([10.0, 20.0], [1.0, 0.0]) == 10.0
    assert average_macs([7.0], [1.0]) == 7.0


# ---------------------------------------------------------------- calibration

def _brute_force(conf, correct, macs, min_accuracy, grid):
    """Every combination of the documented candidates: quantiles of each stage's confidences
    at (1..grid-1)/grid plus 0 ('everyone exits') and 'never exit'."""
    s, n = conf.shape
    qs = np.linspace(0, 1, grid + 1)[1:-1]
    cands = [np.unique(np.concatenate([[0.0], np.quantile(conf[i].numpy().astype(np.float64), qs), [NEVER_EXIT]]))
             for i in range(s - 1)]
    cum = np.cumsum(macs)
    results = []
    for th in itertools.product(*cands):
        ex = exit_stages(conf.double(), list(th)).numpy()
        acc = correct.numpy()[ex, np.arange(n)].mean()
        results.append((float(cum[ex].mean()), float(acc), list(th)))
    feasible = [r for r in results if r[1] >= min_accuracy - 1e-12]
    return results, feasible


@pytest.mark.parametrize("seed, min_accuracy, quantised, useless_first", [
    (0, 0.6, False, False), (1, 0.75, False, False), (2, 0.5, False, False),
    (3, 0.6, True, False),  # ties: many samples sit exactly on a candidate threshold
    (4, 0.7, True, True),  # stage 1 is always wrong: the optimum never exits there
])
def test_calibrate_matches_brute_force(seed, min_accuracy, quantised, useless_first):
    g = torch.Generator().manual_seed(seed)
    s, n, grid = 3, 60, 8
    conf = torch.rand(s, n, generator=g)
    if quantised:
        conf = (conf * 5).floor() / 5
    # later stages are more accurate, and confident samples more often right
    p_ok = torch.tensor([[0.5], [0.7], [0.9]]) * 0.6 + 0.4 * conf
    correct = torch.rand(s, n, generator=g) < p_ok
    if useless_first:
        correct[0] = False
        correct[2] = True
        min_accuracy = 1.0
    macs = [1.0, 2.5, 6.0]
    thresholds, avg = calibrate(conf, correct, macs, min_accuracy, grid=grid)
    _, feasible = _brute_force(conf, correct, macs, min_accuracy, grid)
    assert feasible, "pick a reachable accuracy target"
    best = min(r[0] for r in feasible)
    # the returned thresholds satisfy the constraint and cost what calibrate says
    ex = exit_stages(conf.double(), thresholds).numpy()
    acc = correct.numpy()[ex, np.arange(n)].mean()
    assert acc >= min_accuracy - 1e-12
    assert avg == pytest.approx(np.cumsum(macs)[ex].mean(), abs=1e-9)
    assert avg == pytest.approx(best, abs=1e-9)
    if useless_first:
        assert thresholds[0] > 1 and not (ex == 0).any()
    else:
        assert best < np.cumsum(macs)[-1]  # a real saving over running every stage


def test_calibrate_unreachable_target_returns_most_accurate():
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(2, 40, generator=g)
    correct = torch.rand(2, 40, generator=g) < 0.5
    macs = [1.0, 3.0]
    thresholds, avg = calibrate(conf, correct, macs, min_accuracy=1.01, grid=10)
    results, feasible = _brute_force(conf, correct, macs, 1.01, 10)
    assert not feasible
    best_acc = max(r[1] for r in results)
    ex = exit_stages(conf.double(), thresholds).numpy()
    assert correct.numpy()[ex, np.arange(40)].mean() == pytest.approx(best_acc)
    cheapest_at_best = min(r[0] for r in results if r[1] == pytest.approx(best_acc))
    assert avg == pytest.approx(cheapest_at_best)


def test_calibrate_one_stage():
    assert calibrate(torch.rand(1, 5), torch.ones(1, 5, dtype=torch.bool), [4.0], 0.9) == ([], 4.0)


def test_count_macs_restores_training_mode():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    a = count_macs(m, (torch.zeros(1, 1, 5, 5),))
    assert m.training
    assert a.by_operator()["conv"] == 2 * 9 * 3 * 3
    assert a.by_operator()["batch_norm"] == 2 * 2 * 3 * 3  # counted in eval mode (scale and shift)


@pytest.mark.parametrize("seed, budget", [(0, 3.0), (1, 5.0), (2, 1.5), (3, 9.5)])
def test_calibrate_budget_matches_brute_force(seed, budget):
    """Budget mode: the most accurate setting costing 95-100 % of the budget, unless one within the budget is
    more accurate by more than a standard error; the costliest within it when none costs that much."""
    g = torch.Generator().manual_seed(seed)
    s, n, grid = 3, 60, 8
    conf = torch.rand(s, n, generator=g)
    correct = torch.rand(s, n, generator=g) < torch.tensor([[0.5], [0.7], [0.9]]) * 0.6 + 0.4 * conf
    macs = [1.0, 2.5, 6.0]
    thresholds, acc, avg = calibrate_budget(conf, correct, macs, budget, grid=grid, last_grid=grid)
    results, _ = _brute_force(conf, correct, macs, 0.0, grid)
    fitting = [r for r in results if r[0] <= budget + 1e-9]
    assert fitting
    top = max(r[1] for r in fitting)
    band = [r for r in fitting if r[0] >= budget * (1 - BUDGET_BAND) - 1e-9]
    if not band:
        assert avg == pytest.approx(max(r[0] for r in fitting), abs=1e-9)
        assert acc == pytest.approx(max(r[1] for r in fitting if r[0] >= avg - 1e-9), abs=1e-9)
    elif top - max(r[1] for r in band) > np.sqrt(top * (1 - top) / n) + 1e-9:  # a clearly better cheap setting
        assert acc == pytest.approx(top, abs=1e-9)
        assert avg == pytest.approx(max(r[0] for r in fitting if r[1] >= top - 1e-9), abs=1e-9)
    else:
        assert acc == pytest.approx(max(r[1] for r in band), abs=1e-9)
        assert avg == pytest.approx(max(r[0] for r in band if r[1] >= acc - 1e-9), abs=1e-9)
    ex = exit_stages(conf.double(), thresholds).numpy()
    assert avg == pytest.approx(np.cumsum(macs)[ex].mean(), abs=1e-9) and avg <= budget + 1e-9
    assert acc == pytest.approx(correct.numpy()[ex, np.arange(n)].mean(), abs=1e-9)


def test_calibrate_budget_lands_close_to_the_budget():
    """A narrow stage then the static network, [0.07, 1.0]: the last decision's finer grid lets the
    calibration spend 98 % of a budget where 40 quantiles stop at 92 % (a step is 2.5 % of the static cost)."""
    g = torch.Generator().manual_seed(0)
    conf, correct = torch.rand(2, 3000, generator=g), torch.ones(2, 3000, dtype=torch.bool)
    budget = 0.07 + 0.2499
    coarse = calibrate_budget(conf, correct, [0.07, 1.0], budget, last_grid=40)[2]
    fine = calibrate_budget(conf, correct, [0.07, 1.0], budget)[2]
    assert coarse == pytest.approx(0.07 + 0.225, abs=1e-3) and 0.98 * budget <= fine <= budget


def test_calibrate_budget_spends_the_budget_when_accuracy_is_flat():
    """Stage 1 is as accurate as the last on every sample: every setting ties, and the budget is spent
    on the later stage (closest to the static network) rather than saved."""
    conf = torch.linspace(0.05, 0.95, 20)[None].repeat(2, 1)
    correct = torch.ones(2, 20, dtype=torch.bool)
    thresholds, acc, avg = calibrate_budget(conf, correct, [1.0, 3.0], 2.5, grid=20)
    assert acc == 1.0 and avg == pytest.approx(2.5)  # half the samples go on: 1 + 3 / 2 (cheaper: all exit, 1.0)
    assert (conf[0] >= thresholds[0]).float().mean().item() == 0.5


def test_calibrate_budget_spends_the_budget_unless_a_cheaper_setting_is_clearly_better():
    """400 samples in order of confidence; the cheap stage is wrong on the 40 least confident, the last stage
    on the 10 least confident and on some middling ones that the cheap stage gets right. Sending 200 on (the
    budget) instead of 150 costs 2 samples in one case (luck: within a standard error, 3 samples here) and is
    done; sending 200 instead of 160 costs 20 in the other, and the cheaper setting is chosen."""
    n = 400
    conf = torch.linspace(0.01, 0.99, n)[None].repeat(2, 1)
    for middling, continuing in ((range(150, 152), 200), (range(160, 180), 160)):
        correct = torch.ones(2, n, dtype=torch.bool)
        correct[0, :40] = False
        correct[1, :10] = False
        correct[1, middling] = False
        _, acc, avg = calibrate_budget(conf, correct, [1.0, 3.0], 2.5, grid=100)
        assert avg == pytest.approx(1 + 3 * continuing / n)
        assert acc == pytest.approx((n - 10 - (len(middling) if continuing == 200 else 0)) / n)


def test_calibrate_budget_below_every_setting_returns_the_cheapest():
    conf, correct = torch.rand(2, 30), torch.rand(2, 30) < 0.5
    thresholds, _, avg = calibrate_budget(conf, correct, [1.0, 3.0], 0.5, grid=10)
    assert avg == pytest.approx(1.0) and thresholds[0] <= conf[0].min().item()
    assert calibrate_budget(conf[:1], correct[:1], [4.0], 1.0)[2] == 4.0  # one stage: nothing to choose
