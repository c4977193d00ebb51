"""``ArchEvaluator``, ``Objective``, ``Archive`` and ``pareto_front`` against independent computations.

The reference path never touches the evaluator's internals: stage logits come from the
materialised ``DynamicNet`` (batch norm folded, ``forward_all``), exits from a plain loop
over samples, stage MACs from ``s2d.measure.cost.stage_macs`` on the unfolded materialised stages.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from s2d.data import Batches
from s2d.measure.calibration import float32_thresholds
from s2d.measure.cost import stage_macs, static_cost
from s2d.models import get_model
from s2d.search.archive import Archive, pareto_front
from s2d.search.evaluator import ArchEvaluator, Evaluation, Objective
from s2d.search.space import SearchSpace
from s2d.transform.arch import MultiStageArch, Stage, static_arch
from s2d.transform.exit_rule import NEVER_EXIT
from s2d.transform.supernet import SuperNet

VAL_IMAGES = 200

HAND_ARCH = MultiStageArch((Stage(0.25, "layer1.2", True), Stage(0.5, "layer2.2", (True, False, True)),
                            Stage(1.0, "output", False)))


def random_supernet(seed: int = 0) -> tuple[nn.Module, SuperNet]:
    """A random-weight ResNet-20 with non-trivial batch norm and heads with O(1) logits,
    so confidences are spread out (a default-init net gives every sample ~0.1)."""
    torch.manual_seed(seed)
    model = get_model("resnet20", 10, 1).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 1, generator=g)
    sn = SuperNet(model, (1, 28, 28), 10).eval()
    with torch.no_grad():
        for h in sn.heads.values():
            h.fc.weight.normal_(0, 1, generator=g)
    return model, sn


@pytest.fixture(scope="module")
def setup(fmnist):
    model, sn = random_supernet()
    val = fmnist.val.subset(VAL_IMAGES)
    x, y = next(iter(Batches(val, fmnist.info, VAL_IMAGES)))
    return {"model": model, "supernet": sn, "val": val, "info": fmnist.info, "x": x, "y": y,
            "static_macs": static_cost(model, fmnist.info).total_macs}


def make_evaluator(setup, *, static_accuracy: float, objective: Objective | None = None,
                   archive: Archive | None = None) -> ArchEvaluator:
    return ArchEvaluator(setup["supernet"], setup["val"], setup["info"], static_accuracy=static_accuracy,
                         static_macs=setup["static_macs"], objective=objective, archive=archive)


def reference_stage_outputs(setup, arch: MultiStageArch) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct), (S, N), from the materialised DynamicNet (folded batch norm)."""
    net = setup["supernet"].materialise(arch)
    logits = net.forward_all(setup["x"])
    conf = np.stack([lg.softmax(-1).max(-1).values.numpy() for lg in logits]).astype(np.float64)
    correct = np.stack([(lg.argmax(-1) == setup["y"]).numpy() for lg in logits])
    return conf, correct


def reference_costs(setup, arch: MultiStageArch) -> list[float]:
    sn = setup["supernet"]
    return stage_macs(list(sn.materialise(arch, fold_bn=False).stages), sn.input_shape)[0]


def reference_figures(conf: np.ndarray, correct: np.ndarray, thresholds: list[float], costs: list[float]):
    """Per-sample exit by thresholds, accuracy, exit rates, average MACs = Σ P(reach s)·MACs(s)."""
    s, n = conf.shape
    exits = []
    for i in range(n):
        e = s - 1
        for j in range(s - 1):
            if conf[j, i] >= thresholds[j]:
                e = j
                break
        exits.append(e)
    exits = np.array(exits)
    acc = float(np.mean([correct[exits[i], i] for i in range(n)]))
    rates = [float(np.mean(exits == j)) for j in range(s)]
    avg = sum(float(np.mean(exits >= j)) * costs[j] for j in range(s))
    return exits, acc, rates, avg


def gap_thresholds(conf: np.ndarray, quantiles: list[float]) -> list[float]:
    """Thresholds between two well-separated neighbouring confidences near each quantile,
    so float noise between the folded and unfolded paths cannot flip an exit."""
    out = []
    for row, q in zip(conf, quantiles, strict=False):
        v = np.sort(row)
        k = int(q * len(v))
        while v[k + 1] - v[k] < 1e-4:
            k += 1
        out.append(float((v[k] + v[k + 1]) / 2))
    return out


# ------------------------------------------------------------------ the reward by hand

def test_stage_costs_equal_fvcore_on_materialised_stages(setup):
    ev = make_evaluator(setup, static_accuracy=0.5)
    # archs sharing prefixes, so the per-prefix cache is hit in between
    base = HAND_ARCH.stages
    archs = [HAND_ARCH,
             MultiStageArch((base[0], Stage(1.0, "output", True))),
             MultiStageArch((base[0], base[1], Stage(0.75, "layer3.0", False), Stage(1.0, "output", True))),
             MultiStageArch((base[0], Stage(0.5, "layer2.2", True), Stage(1.0, "output", False))),
             HAND_ARCH,
             static_arch()]
    for arch in archs:
        assert ev.stage_costs(arch) == reference_costs(setup, arch), arch
    # the static arch is the static model: its single stage costs what fvcore counts for the model
    assert ev.stage_costs(static_arch()) == [setup["static_macs"]]
    assert setup["static_macs"] == 31_332_416
    # incremental: a 1/4-width stage to layer1.2 costs far less than the network
    assert 0 < ev.stage_costs(HAND_ARCH)[0] < 0.05 * setup["static_macs"]


@pytest.mark.parametrize("penalised", [True, False])
def test_reward_with_given_thresholds_equals_independent_computation(setup, penalised):
    conf, correct = reference_stage_outputs(setup, HAND_ARCH)
    thresholds = gap_thresholds(conf, [0.5, 0.4])
    arch = HAND_ARCH.with_thresholds(thresholds)
    costs = reference_costs(setup, arch)
    exits, acc, rates, avg = reference_figures(conf, correct, thresholds, costs)
    assert all(r > 0.05 for r in rates), rates  # every stage takes part: the test means something
    static_acc = acc + 0.2 if penalised else acc - 0.1
    objective = Objective(tolerance=0.005, penalty=20.0)
    ev = make_evaluator(setup, static_accuracy=static_acc, objective=objective)
    e = ev.evaluate(arch)

    ratio = avg / setup["static_macs"]
    target = static_acc - 0.005
    reward = 1 - ratio - 20.0 * max(0.0, target - acc)
    assert e.thresholds == pytest.approx(thresholds, abs=0)  # given thresholds are used, not calibrated
    assert e.accuracy == pytest.approx(acc, abs=1e-9)
    assert e.exit_rates == pytest.approx(rates, abs=1e-7)
    assert e.stage_macs == costs
    assert e.average_macs == pytest.approx(avg, rel=1e-6)
    assert e.mac_ratio == pytest.approx(ratio, rel=1e-6)
    assert e.reward == pytest.approx(reward, abs=1e-6)
    assert e.meets_target is (not penalised)
    if penalised:
        assert reward < 1 - ratio - 3.0  # the penalty bites: 20 * (0.195) points
    else:
        assert e.reward == pytest.approx(1 - ratio, abs=1e-6)
    assert e.stage_accuracy == pytest.approx(correct.mean(1).tolist(), abs=1e-9)
    # the archive holds the network's one encoding (reuse flags that change nothing set to true)
    assert e.arch == arch.canonical(setup["supernet"].graph).to_dict() != arch.to_dict() and not e.cached

    # the deployed network with real early exits agrees sample by sample
    logits, ex = setup["supernet"].materialise(arch)(setup["x"])
    assert ex.numpy().tolist() == exits.tolist()
    assert float((logits.argmax(1) == setup["y"]).double().mean()) == pytest.approx(acc, abs=1e-9)


def test_static_arch_reward(setup):
    ev = make_evaluator(setup, static_accuracy=0.9)
    e = ev.evaluate(static_arch())
    _, correct = reference_stage_outputs(setup, static_arch())
    acc = float(correct[0].mean())
    with torch.no_grad():
        assert acc == pytest.approx(float((setup["model"](setup["x"]).argmax(1) == setup["y"]).float().mean()))
    assert e.thresholds == [] and e.exit_rates == [1.0]
    assert e.mac_ratio == pytest.approx(1.0) and e.average_macs == setup["static_macs"]
    assert e.accuracy == pytest.approx(acc)
    assert e.reward == pytest.approx(1 - 1 - 20 * max(0.0, 0.895 - acc))


def test_mnas_objective(setup):
    obj = Objective(kind="mnas", target_ratio=0.33, mnas_w=-0.07)
    assert obj.reward(0.9, 0.33, 0.99) == pytest.approx(0.9)  # at the target ratio: the accuracy
    assert obj.reward(0.9, 0.66, 0.0) == pytest.approx(0.9 * 2 ** -0.07)
    assert obj.reward(0.8, 0.1, 0.5) == pytest.approx(0.8 * (0.1 / 0.33) ** -0.07)
    assert obj.reward(0.9, 0.2, 0.0) > obj.reward(0.9, 0.4, 0.0) > obj.reward(0.85, 0.4, 0.0)
    assert obj.reward(0.9, 0.4, 0.0) == obj.reward(0.9, 0.4, 0.95)  # no accuracy target term
    tol = Objective(tolerance=0.01, penalty=10.0)
    assert tol.reward(0.9, 0.3, 0.85) == pytest.approx(0.7)
    assert tol.reward(0.8, 0.3, 0.85) == pytest.approx(0.7 - 10 * 0.05)

    conf, correct = reference_stage_outputs(setup, HAND_ARCH)
    arch = HAND_ARCH.with_thresholds(gap_thresholds(conf, [0.6, 0.5]))
    ev = make_evaluator(setup, static_accuracy=0.3, objective=obj)
    e = ev.evaluate(arch)
    _, acc, _, avg = reference_figures(conf, correct, list(arch.thresholds), reference_costs(setup, arch))
    assert e.accuracy == pytest.approx(acc, abs=1e-9)
    assert e.reward == pytest.approx(acc * (avg / setup["static_macs"] / 0.33) ** -0.07, rel=1e-6)


# ------------------------------------------------------------------ calibration

def calibration_archs(graph) -> list[MultiStageArch]:
    sp = SearchSpace(graph)
    rng = np.random.default_rng(4)
    return [HAND_ARCH, sp.width_only(), sp.depth_only(), *(sp.sample(rng) for _ in range(3))]


def test_calibrated_thresholds_meet_a_reachable_target(setup):
    """Calibrated thresholds are quantiles, often a hair from some sample's confidence (a random
    net saturates at 0.99999...), so the check runs on the evaluator's own stage outputs: the
    float32 confidences compared in float64, as ``calibrate`` compares them."""
    for arch in calibration_archs(setup["supernet"].graph):
        # the target is exactly the last stage's accuracy: sending everyone there reaches it
        ev = make_evaluator(setup, static_accuracy=0.0)
        out = ev.stage_outputs(arch)
        conf, correct = out.confidence.double().numpy(), out.correct.numpy()
        last_acc = float(correct[-1].mean())
        ev.static_accuracy = last_acc + 0.005
        e = ev.evaluate(arch)
        assert len(e.thresholds) == arch.num_stages - 1
        assert e.meets_target and e.accuracy >= last_acc - 1e-9
        costs = reference_costs(setup, arch)
        _, acc, rates, avg = reference_figures(conf, correct, e.thresholds, costs)
        assert e.accuracy == pytest.approx(acc, abs=1e-9)
        assert e.exit_rates == pytest.approx(rates, abs=1e-7)
        assert e.average_macs == pytest.approx(avg, rel=1e-6)
        assert e.average_macs <= sum(costs) * (1 + 1e-9)
        assert e.reward == pytest.approx(1 - avg / setup["static_macs"], abs=1e-6)  # no penalty


def test_float32_thresholds_decide_as_float64_does():
    """torch compares a float32 confidence with a Python float in float32; calibration decides in
    float64. Snapped thresholds make both agree for every float32 confidence."""
    rng = np.random.default_rng(0)
    conf = torch.from_numpy(rng.random(2000).astype(np.float32))
    conf[:1000] = 1 - torch.from_numpy(rng.random(1000).astype(np.float32)) * 1e-6  # saturated, as in trained nets
    c64 = conf.double().numpy()
    raw = np.concatenate([c64[:50] + 1e-12, c64[:50] - 1e-12, rng.random(50), [0.0, 1.0, NEVER_EXIT]])
    snapped = float32_thresholds(raw.tolist())
    assert snapped[-1] == NEVER_EXIT and snapped[-2] == 1.0
    plain_mismatches = 0
    for t, s in zip(raw, snapped, strict=True):
        assert s >= t and (float(np.float32(s)) == s or t > 1)
        assert ((conf >= s).numpy() == (c64 >= t)).all(), t
        plain_mismatches += int(((conf >= float(t)).numpy() != (c64 >= t)).any())
    assert plain_mismatches > 0  # without snapping, some thresholds do disagree


def test_calibration_goes_cheap_when_the_target_is_loose(setup):
    costs = reference_costs(setup, HAND_ARCH)
    e = make_evaluator(setup, static_accuracy=0.0).evaluate(HAND_ARCH)
    assert e.meets_target
    # nearly everyone leaves at stage 1 (the lowest candidate threshold is a low quantile)
    assert e.exit_rates[0] >= 0.95
    assert e.average_macs <= costs[0] + 0.05 * sum(costs[1:])


def test_unreachable_target_is_penalised(setup):
    _, correct = reference_stage_outputs(setup, HAND_ARCH)
    e = make_evaluator(setup, static_accuracy=1.0).evaluate(HAND_ARCH)
    assert not e.meets_target
    assert e.accuracy >= float(correct[-1].mean()) - 1e-9  # the most accurate setting was chosen
    assert e.reward == pytest.approx(1 - e.mac_ratio - 20 * (0.995 - e.accuracy), abs=1e-9)


# ------------------------------------------------------------------ archive

def test_repeated_arch_is_served_from_the_archive(setup, tmp_path):
    path = tmp_path / "archive.jsonl"
    ev = make_evaluator(setup, static_accuracy=0.3, archive=Archive(path))
    first = ev.evaluate(HAND_ARCH, searcher="ppo")
    assert ev.evaluations == 1 and not first.cached and first.index == 0 and first.searcher == "ppo"
    again = ev.evaluate(HAND_ARCH, searcher="random")
    assert ev.evaluations == 1 and again.cached
    assert again.reward == first.reward and again.thresholds == first.thresholds
    assert again.searcher == "ppo"  # the record of who found it first
    other = ev.evaluate(static_arch())
    assert ev.evaluations == 2 and other.index == 1
    # searched thresholds are part of the candidate: the same stages with thresholds are new
    with_t = HAND_ARCH.with_thresholds([0.5, 0.5])
    ev.evaluate(with_t)
    ev.evaluate(with_t)
    assert ev.evaluations == 3
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    keys = [json.loads(line)["key"] for line in lines]
    assert len(set(keys)) == 3 and keys[0] == ev.archive_key(HAND_ARCH)
    # a fresh process (new archive, new evaluator) evaluates none of them again
    ev2 = make_evaluator(setup, static_accuracy=0.3, archive=Archive(path))
    for arch in (HAND_ARCH, static_arch(), with_t):
        assert ev2.evaluate(arch).cached
    assert ev2.evaluations == 0 and len(path.read_text().splitlines()) == 3
    rec = Evaluation.from_record(json.loads(lines[0]))
    assert rec.reward == first.reward and rec.exit_rates == first.exit_rates


def _rec(key: str, reward: float, acc: float = 0.5, macs: float = 1.0, searcher: str = "ppo") -> dict:
    return {"key": key, "reward": reward, "accuracy": acc, "average_macs": macs, "searcher": searcher}


def test_archive_ignores_a_torn_last_line_and_keeps_appending(tmp_path):
    path = tmp_path / "archive.jsonl"
    a = Archive(path)
    a.add("a", _rec("a", 0.1))
    a.add("b", _rec("b", 0.3, searcher="random"))
    with open(path, "a") as f:
        f.write('{"key": "c", "reward": 0.')  # killed mid-write
    b = Archive(path)
    assert len(b) == 2 and b.get("c") is None and b.get("b")["reward"] == 0.3
    assert b.best()["key"] == "b" and b.best("ppo")["key"] == "a"
    assert [r["key"] for r in b.records("random")] == ["b"]
    b.add("d", _rec("d", 0.2))
    # the record written after the torn line survives a reload
    c = Archive(path)
    assert [r["key"] for r in c.records()] == ["a", "b", "d"]
    assert c.get("d")["reward"] == 0.2


def test_pareto_front_by_hand():
    recs = [
        {"k": "a", "accuracy": 0.90, "average_macs": 10.0},
        {"k": "b", "accuracy": 0.85, "average_macs": 5.0},
        {"k": "c", "accuracy": 0.80, "average_macs": 6.0},  # dominated by b
        {"k": "d", "accuracy": 0.95, "average_macs": 20.0},
        {"k": "e", "accuracy": 0.90, "average_macs": 12.0},  # dominated by a (same accuracy, more MACs)
        {"k": "f", "accuracy": 0.70, "average_macs": 2.0},
        {"k": "g", "accuracy": 0.86, "average_macs": 5.0},  # same MACs as b, more accurate: b is dominated
        {"k": "h", "accuracy": 0.60, "average_macs": 3.0},  # dominated by f
    ]
    assert [r["k"] for r in pareto_front(recs)] == ["f", "g", "a", "d"]
    assert pareto_front([]) == []
    assert [r["k"] for r in pareto_front(recs[:1])] == ["a"]


def test_full_width_archs_are_scored_on_the_full_width_network(setup):
    """With ``full_width``, an arch whose stages are all width 1 (the static network plus heads) is
    scored on that network; any narrower arch still on the shared supernet."""
    _, other = random_supernet(seed=3)
    ev = ArchEvaluator(setup["supernet"], setup["val"], setup["info"], static_accuracy=0.5,
                       static_macs=setup["static_macs"], full_width=other)
    depth = MultiStageArch((Stage(1.0, "layer1.2", True), Stage(1.0, "layer2.2", True), Stage(1.0, "output", True)))
    assert ev.network_for(depth) is other and ev.network_for(HAND_ARCH) is setup["supernet"]
    out = ev.stage_outputs(depth)
    conf, correct = out.confidence, out.correct
    ref_conf, ref_correct = reference_stage_outputs({**setup, "supernet": other}, depth)
    np.testing.assert_allclose(conf.numpy(), ref_conf, atol=1e-5)
    assert (correct.numpy() == ref_correct).all()
    shared_conf, _ = reference_stage_outputs(setup, depth)
    assert np.abs(shared_conf - ref_conf).max() > 1e-2  # the two networks really differ
    conf = ev.stage_outputs(HAND_ARCH).confidence
    np.testing.assert_allclose(conf.numpy(), reference_stage_outputs(setup, HAND_ARCH)[0], atol=1e-5)


def test_full_width_stage_outputs_are_computed_once_per_exit(setup, monkeypatch):
    """A full-width stage's logits are its exit's whatever comes before it: the evaluator runs the network once
    for the exits it has not seen, and every later arch over seen exits gets the reference outputs without a pass."""
    _, other = random_supernet(seed=3)
    ev = ArchEvaluator(setup["supernet"], setup["val"], setup["info"], static_accuracy=0.5,
                       static_macs=setup["static_macs"], full_width=other)
    passes = []
    forward = other.forward_stages
    monkeypatch.setattr(other, "forward_stages", lambda x, arch, upto=None: passes.append(arch) or forward(x, arch))

    def stages(*exits: str) -> MultiStageArch:
        return MultiStageArch(tuple(Stage(1.0, e, True) for e in exits))

    seen = [stages("relu", "layer1.2", "layer3.0", "output"), stages("layer2.2", "output")]
    for arch in seen:
        ev.stage_outputs(arch)
    network_passes = len(passes)
    for arch in (stages("relu", "layer2.2", "output"), stages("layer1.2", "layer3.0", "output"), stages("output")):
        out = ev.stage_outputs(arch)
        ref_conf, ref_correct = reference_stage_outputs({**setup, "supernet": other}, arch)
        np.testing.assert_allclose(out.confidence.numpy(), ref_conf, atol=1e-5)
        assert (out.correct.numpy() == ref_correct).all()
    assert len(passes) == network_passes  # all from the cache
    ev.stage_outputs(stages("layer1.0", "output"))  # an exit not seen yet: one more pass
    assert len(passes) > network_passes


def test_budget_objective_fits_the_mac_budget_and_ranks_by_accuracy(setup):
    """Budget mode: thresholds keep average MACs within the target ratio; a looser budget never
    scores a lower accuracy; an arch whose cheapest setting is over budget does not meet it."""
    costs = reference_costs(setup, HAND_ARCH)
    full = sum(costs) / setup["static_macs"]
    accs = []
    for frac in (0.3, 0.6, 1.0):
        target = full * frac
        ev = make_evaluator(setup, static_accuracy=0.5, objective=Objective("budget", target_ratio=target))
        e = ev.evaluate(HAND_ARCH)
        assert e.meets_target and e.mac_ratio <= target + 1e-9
        assert e.reward == pytest.approx(e.accuracy)
        accs.append(e.accuracy)
    assert accs == sorted(accs)
    tight = costs[0] / setup["static_macs"] * 0.5  # below the first stage alone
    ev = make_evaluator(setup, static_accuracy=0.5, objective=Objective("budget", target_ratio=tight, penalty=20.0))
    e = ev.evaluate(HAND_ARCH)
    assert not e.meets_target and e.reward == pytest.approx(e.accuracy - 20.0 * (e.mac_ratio - tight))


def test_certified_tolerance_scores_what_the_report_can_certify(setup):
    """With a confidence, the search's thresholds are the certified ones (fixed-sequence testing of the
    drop bound against the static model), so an arch that keeps the tolerance only on average is not
    feasible, and a feasible arch's thresholds keep the bound."""
    from s2d.measure.guarantee import certify, drop_upper_bound, threshold_sequence

    sn = setup["supernet"]
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.5, "exit": "output"},
                                                {"width": 1.0, "exit": "output", "recompute": True}]})
    with torch.no_grad():
        static_correct = setup["model"](setup["x"]).argmax(1) == setup["y"]
    static_acc = static_correct.float().mean().item()

    def evaluator(tol: float, correct: torch.Tensor) -> ArchEvaluator:
        return ArchEvaluator(sn, setup["val"], setup["info"], static_accuracy=correct.float().mean().item(),
                             static_macs=setup["static_macs"], static_correct=correct,
                             objective=Objective("tolerance", tol, confidence=0.9))

    ev = evaluator(0.3, static_correct)
    e = ev.evaluate(arch)
    out, costs = ev.stage_outputs(arch), ev.stage_costs(arch)
    cert = certify(threshold_sequence(out, costs), out, static_correct, 0.3, 0.9)
    assert cert is not None and e.meets_target and e.thresholds == cert.thresholds
    dyn = out.correct.gather(0, out.exits(e.thresholds)[None])[0]
    assert drop_upper_bound(static_correct, dyn, 0.9) <= 0.3
    assert e.reward == pytest.approx(1 - e.mac_ratio, abs=1e-9)
    # in-sample, an arch whose average accuracy keeps the tolerance is feasible ...
    in_sample = make_evaluator(setup, static_accuracy=static_acc, objective=Objective("tolerance", 0.3)).evaluate(arch)
    assert in_sample.meets_target
    # ... but a static model right on every image leaves no room for a bound within 0.1 points: not feasible,
    # and below every feasible arch
    strict = evaluator(0.001, torch.ones_like(static_correct)).evaluate(arch)
    assert not strict.meets_target and strict.thresholds == [NEVER_EXIT] and strict.reward < e.reward - 1


def test_time_costs_come_from_the_latency_table(setup):
    """``cost="latency"``: thresholds keep the predicted batch-1 latency (from the table's stage times) within the
    budget, MACs are still reported as MACs, and every record carries the table's predicted time ratios."""
    import copy

    from s2d.measure.latency import LatencyTable

    sn = setup["supernet"]
    table = LatencyTable(sn, copy.deepcopy(sn.static), batch=8, repeats=2, b1_repeats=3)
    arch = sn.validate(HAND_ARCH).canonical(sn.graph)  # the evaluator's key: the table times this encoding
    times = [t.b1_ms for t in table.stage_times(arch)]
    full = sum(times) / table.static_ms(1)
    for frac in (0.4, 1.0):
        ev = ArchEvaluator(sn, setup["val"], setup["info"], static_accuracy=0.5, static_macs=setup["static_macs"],
                           objective=Objective("budget", target_ratio=full * frac, cost="latency"), latency=table)
        e = ev.evaluate(arch)
        assert table.measured == len(times)  # nothing timed twice
        reach = 1 - np.cumsum([0.0, *e.exit_rates[:-1]])
        assert e.cost_ratio == pytest.approx(float(np.dot(reach, times)) / table.static_ms(1))
        assert e.cost_ratio <= full * frac + 1e-9 and e.meets_target
        assert e.extra["latency_ratio"] == pytest.approx(e.cost_ratio)
        macs = reference_costs(setup, HAND_ARCH)
        assert e.mac_ratio == pytest.approx(float(np.dot(reach, macs)) / setup["static_macs"])
    with pytest.raises(ValueError, match="latency table"):
        ArchEvaluator(sn, setup["val"], setup["info"], static_accuracy=0.5, static_macs=setup["static_macs"],
                      objective=Objective(cost="throughput"))
