"""The held-out calibration split and the tolerance's confidence bound (``measure.guarantee``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom

from s2d.data import Split, calibration_split, default_calib_size
from s2d.errors import S2DError
from s2d.measure.accuracy import StageOutputs
from s2d.measure.calibration import budget_frontier, calibrate_budget_thresholds
from s2d.measure.cost import average_macs
from s2d.measure.guarantee import (
    NUISANCE_RISK,
    certify,
    drop_pvalue,
    drop_upper_bound,
    keeps_tolerance,
    min_calibration_images,
    threshold_sequence,
)
from s2d.transform.exit_rule import NEVER_EXIT


def _pair(n: int, lost: int, gained: int) -> tuple[np.ndarray, np.ndarray]:
    static = np.ones(n, dtype=bool)
    static[:gained] = False  # the static model misses these, the dynamic one gets them
    dynamic = static.copy()
    dynamic[:gained] = True
    dynamic[gained:gained + lost] = False
    return static, dynamic


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_split_is_disjoint_from_the_search_split(fmnist, seed):
    search, calib = calibration_split(fmnist.val, default_calib_size(len(fmnist.val)), seed)
    assert (len(search), len(calib)) == (2000, 3000)
    as_bytes = {bytes(img.numpy()) for img in search.images}
    assert not any(bytes(img.numpy()) in as_bytes for img in calib.images)
    train = {bytes(img.numpy()) for img in fmnist.train.images[:20000]}
    assert not any(bytes(img.numpy()) in train for img in calib.images[:500])  # held out from training too
    val = {bytes(img.numpy()) for img in fmnist.val.images}
    assert all(bytes(img.numpy()) in val for img in [*search.images[:200], *calib.images[:200]])
    other = calibration_split(fmnist.val, 3000, seed + 1)[1]
    assert not torch.equal(other.labels, calib.labels)  # each seed draws its own calibration split


def test_calibration_split_refuses_an_empty_side():
    val = Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    for size in (0, 10, 11):
        with pytest.raises(S2DError, match="--calib-size"):
            calibration_split(val, size)


def _null_rejection_rate(n: int, lost_share: float, gained_share: float, tolerance: float, risk: float) -> float:
    """The exact probability that the test rejects "the drop is ``tolerance`` or more" when the true shares are
    these, by enumerating every count of lost and gained images with mass above 1e-12."""
    lost = np.arange(n + 1)
    p_lost = binom.pmf(lost, n, lost_share)
    rate = 0.0
    for k in lost[p_lost > 1e-12]:
        p_gained = binom.pmf(np.arange(n - k + 1), n - k, gained_share / (1 - lost_share))
        for g in np.flatnonzero(p_gained > 1e-12):
            if drop_pvalue(int(k), int(g), n, tolerance) <= risk:
                rate += p_lost[k] * p_gained[g]
    return rate


def test_the_test_keeps_its_level_where_the_tolerance_is_broken():
    """Enumerated, not simulated: wherever the true drop is at least the tolerance, the test rejects with
    probability at most its risk; at the boundary with many disagreements it uses most of it (not a test that
    never rejects)."""
    n, tol, risk = 120, 0.025, 0.1
    rates = {}
    for share in (0.025, 0.05, 0.1, 0.2):  # the share of images the two networks disagree on
        for drop in (tol, tol + 0.01):
            if drop <= share:
                rates[share, drop] = _null_rejection_rate(n, (share + drop) / 2, (share - drop) / 2, tol, risk)
    assert max(rates.values()) <= risk
    assert rates[0.2, tol] > 0.07  # close to the risk where the drop is exactly the tolerance
    assert rates[0.2, tol + 0.01] < rates[0.2, tol]


def test_bound_by_hand_and_against_the_union_bound():
    n = 1000
    static = np.ones(n, dtype=bool)
    # nothing lost nor gained: the Clopper-Pearson bound of zero lost images at the risk left by the nuisance set
    assert drop_upper_bound(static, static, 0.9) == pytest.approx(1 - (0.1 - NUISANCE_RISK) ** (1 / n), abs=1e-5)
    static, dynamic = _pair(1000, lost=7, gained=3)
    assert (static.mean() - dynamic.mean()) < drop_upper_bound(static, dynamic, 0.9)
    net_gain = drop_upper_bound(*_pair(1000, lost=1, gained=40), 0.9)
    assert net_gain < 0  # a network that wins enough is certified better than the static one
    # 30 lost, 30 gained of 3000 at 95 %: the drop's own spread is 1.645 sd = 0.42 points; the union of two
    # Clopper-Pearson bounds at 2.5 % each added two margins: 0.75 points
    static, dynamic = _pair(3000, lost=30, gained=30)
    union = beta.ppf(0.975, 31, 2970) - beta.ppf(0.025, 30, 2971)
    assert 100 * union == pytest.approx(0.749, abs=1e-3)
    assert 0.42 < 100 * drop_upper_bound(static, dynamic, 0.95) < 0.45
    assert keeps_tolerance(static, dynamic, 0.0045, 0.95) and not keeps_tolerance(static, dynamic, 0.0042, 0.95)


def test_bound_is_monotone():
    n = 2500
    by_lost = [drop_upper_bound(*_pair(n, lost, 5), 0.9) for lost in range(0, 30)]
    assert all(a < b for a, b in itertools.pairwise(by_lost))  # more lost images: higher bound
    by_gained = [drop_upper_bound(*_pair(n, 10, gained), 0.9) for gained in range(0, 30)]
    assert all(a > b for a, b in itertools.pairwise(by_gained))  # more gained: lower
    by_conf = [drop_upper_bound(*_pair(n, 10, 5), c) for c in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert all(a < b for a, b in itertools.pairwise(by_conf))  # more confidence: higher
    # more images with the same rates: a tighter bound
    assert drop_upper_bound(*_pair(10 * n, 100, 50), 0.9) < drop_upper_bound(*_pair(n, 10, 5), 0.9)


def test_min_calibration_images():
    for tol in (0.001, 0.002, 0.005):
        n = min_calibration_images(tol)
        # from that size on, one lost image (and nothing gained) is within the tolerance; below, it is not
        assert drop_upper_bound(*_pair(n, 1, 0), 0.9) <= tol < drop_upper_bound(*_pair(n - 1, 1, 0), 0.9)
    # one lost image of n is bounded at about 3.9 / n at 90 % (zero lost: 2.3 / n)
    assert 750 < min_calibration_images(0.005) < 800 < 1900 < min_calibration_images(0.002) < 2000
    assert min_calibration_images(0.0) == 0


def _outputs(conf: list[list[float]], correct: list[list[bool]]) -> StageOutputs:
    return StageOutputs(torch.tensor(conf, dtype=torch.float32), torch.tensor(correct))


def test_certify_stops_at_the_first_failure():
    """Fixed-sequence testing: a later candidate that would pass is never reached after a failure."""
    n = 400
    rng = np.random.default_rng(0)
    conf0 = rng.random(n).astype(np.float32)
    last_ok = np.ones(n, dtype=bool)
    first_ok = np.ones(n, dtype=bool)
    first_ok[conf0 > 0.9] = False  # the most confident early exits are wrong
    calib = _outputs([conf0.tolist(), [1.0] * n], [first_ok.tolist(), last_ok.tolist()])
    static = torch.ones(n, dtype=torch.bool)
    safe = [NEVER_EXIT]
    bad = [0.5]  # lets the wrong, confident ones exit
    fine = [0.95]  # would pass (few exits, some wrong)... but comes after the failure
    cert = certify([safe, bad, fine], calib, static, tolerance=0.02, confidence=0.9)
    assert cert is not None and cert.thresholds == safe and cert.tested == 2 and cert.calib_drop_points == 0.0
    assert cert.bound_points == pytest.approx(100 * (1 - (0.1 - NUISANCE_RISK) ** (1 / n)), abs=1e-3)  # none lost
    cert = certify([safe, [2.0 / 3]], calib, static, tolerance=0.5, confidence=0.9)
    assert cert.thresholds == [2.0 / 3] and cert.calib_drop_points > 0
    assert cert.bound_points > cert.calib_drop_points  # the bound sits above what was observed
    # not even the safest candidate passes: the network cannot keep the promise
    wrong_last = _outputs([conf0.tolist(), [1.0] * n], [first_ok.tolist(), [False] * 10 + [True] * (n - 10)])
    assert certify([safe, bad], wrong_last, static, tolerance=0.01, confidence=0.9) is None


def test_threshold_sequence_goes_from_safe_to_aggressive():
    n = 1000
    rng = np.random.default_rng(1)
    conf = rng.random((2, n)).astype(np.float32)
    correct = np.stack([rng.random(n) < 0.5 + 0.5 * conf[0], np.ones(n, dtype=bool)])
    val = _outputs(conf.tolist(), correct.tolist())
    costs = [1.0, 3.0]
    seq = threshold_sequence(val, costs, steps=20)
    assert seq[0] == [NEVER_EXIT] and len(seq) == len({tuple(t) for t in seq}) > 10
    cost = [average_macs(costs, val.exit_rates(t)) for t in seq]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(cost))  # cheaper and cheaper
    assert cost[0] == pytest.approx(4.0) and cost[-1] < 1.3
    budgets = np.linspace(4.0, 1.0, 21)[1:].tolist()
    assert budget_frontier(val, costs, budgets) == [calibrate_budget_thresholds(val, costs, b) for b in budgets]


def test_threshold_sequence_steps_down_even_when_a_cheap_setting_is_most_accurate():
    """Early exits more accurate than the last stage on validation data (a well fine-tuned first stage): the most
    accurate setting of every budget is the cheapest, yet the sequence still walks down one cost step at a time
    (without the bands it jumped from "all to the last stage" to that setting: nothing was certified)."""
    n = 1000
    rng = np.random.default_rng(2)
    conf = rng.random((2, n)).astype(np.float32)
    correct = np.stack([np.ones(n, dtype=bool), rng.random(n) < 0.98])  # stage 1 beats the last stage
    val = _outputs(conf.tolist(), correct.tolist())
    costs = [1.0, 3.0]
    budgets = np.linspace(4.0, 1.0, 21)[1:].tolist()
    plain = budget_frontier(val, costs, budgets)
    assert len({tuple(t) for t in plain}) == 1  # every budget's most accurate setting: everyone exits early
    seq = threshold_sequence(val, costs, steps=20)
    cost = [average_macs(costs, val.exit_rates(t)) for t in seq]
    assert len(seq) > 15 and cost[0] == pytest.approx(4.0)
    assert all(0 <= a - b <= 2 * 3.0 / 20 + 1e-9 for a, b in itertools.pairwise(cost))  # one step at a time


def test_twin_networks_ship_per_tolerance_the_cheaper_certified_point():
    """Per tolerance, the network certified with fewer average MACs on the calibration split; equals (e.g. both
    fall back to the static network) go to the first, the distilled cascade."""
    from s2d.pipeline.report import cheapest_points

    def pt(tol: float, ratio: float) -> dict:
        return {"tolerance_points": tol, "calib_mac_ratio": ratio, "static_fallback": ratio == 1.0}

    merged = cheapest_points({"distilled": [pt(0.1, 1.0), pt(0.2, 1.0), pt(0.5, 0.2)],
                              "untouched": [pt(0.1, 1.0), pt(0.2, 0.4), pt(0.5, 0.25)]})
    assert [m["static_stage"] for m in merged] == ["distilled", "untouched", "distilled"]
    assert [m["calib_mac_ratio"] for m in merged] == [1.0, 0.4, 0.2]


def test_a_confidence_close_to_one_still_certifies():
    """The nuisance set takes a tenth of a risk below 1 %, so any --confidence the CLI accepts can pass."""
    static, dynamic = _pair(3000, lost=0, gained=0)
    assert keeps_tolerance(static, dynamic, 0.01, 0.9995)
    assert drop_upper_bound(static, dynamic, 0.9995) > drop_upper_bound(static, dynamic, 0.99)
