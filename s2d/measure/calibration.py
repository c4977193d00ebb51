"""Exit thresholds: the cheapest setting that keeps a required accuracy on held-out samples."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from s2d.measure.accuracy import StageOutputs
from s2d.transform.exit_rule import NEVER_EXIT


def float32_thresholds(thresholds: list[float]) -> list[float]:
    """Each threshold raised to the smallest float32 >= it.

    Confidences are float32 and torch compares them with a threshold in float32, while
    ``calibrate`` picks thresholds (quantiles) in float64. A threshold between two float32
    values would be rounded, possibly down onto a sample's confidence, and let samples exit
    that calibration counted as continuing. Rounding up keeps ``c >= t`` identical in both
    precisions for every float32 confidence ``c``.
    """
    out = []
    for t in thresholds:
        if t > 1.0:  # "never exit": no confidence reaches it in either precision
            out.append(float(t))
            continue
        t32 = np.float32(t)
        if float(t32) < t:
            t32 = np.nextafter(t32, np.float32(np.inf))
        out.append(float(t32))
    return out


def _settings(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], grid: int,
              last_grid: int | None = None):
    """Every candidate threshold setting with its accuracy and average MACs on these samples.

    Candidate thresholds per stage are ``grid`` quantiles of its confidences (``last_grid`` for the last
    decision, which costs no enumeration) plus 0 (everyone exits) and "never exit".
    Earlier thresholds are enumerated; the last decision is solved for all candidates at
    once with sorted prefix sums (S <= 4 keeps this well under a second). Yields
    (accuracies, costs, thresholds) with one entry per candidate of the last decision.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    s, n = conf.shape
    cum = np.cumsum(np.asarray(stage_macs, dtype=np.float64))  # cost of a sample exiting at stage i
    j = s - 2  # the last decision
    cands = [np.unique(np.concatenate([[0.0], np.quantile(conf[i], np.linspace(0, 1, g + 1)[1:-1]), [NEVER_EXIT]]))
             for i, g in enumerate([grid] * j + [last_grid or grid])]
    for prefix in itertools.product(*cands[:j]):
        pending = np.ones(n, dtype=bool)
        base_ok = base_cost = 0.0
        for i, t in enumerate(prefix):
            leave = pending & (conf[i] >= t)
            base_ok += ok[i][leave].sum()
            base_cost += cum[i] * leave.sum()
            pending &= ~leave
        c = conf[j][pending]
        order = np.argsort(-c, kind="stable")
        ok_here = np.concatenate([[0.0], np.cumsum(ok[j][pending][order])])
        ok_last = np.concatenate([[0.0], np.cumsum(ok[s - 1][pending][order])])
        m = len(c) - np.searchsorted(np.sort(c), cands[j], side="left")  # how many leave at stage j
        acc = (base_ok + ok_here[m] + ok_last[-1] - ok_last[m]) / n
        cost = (base_cost + cum[j] * m + cum[s - 1] * (len(c) - m)) / n
        yield acc, cost, [[*map(float, prefix), float(t)] for t in cands[j]]


def calibrate(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], min_accuracy: float,
              grid: int = 40) -> tuple[list[float], float]:
    """Thresholds minimising average MACs subject to accuracy >= ``min_accuracy`` on these samples.

    ``confidences`` and ``correct`` are (S, N): every stage's confidence and correctness on
    a validation set. Returns the thresholds and the expected average MACs; when no setting
    reaches the accuracy, the most accurate one.
    """
    if len(stage_macs) == 1:
        return [], float(stage_macs[0])
    best: tuple[float, float, list[float]] | None = None  # (cost, -acc, thresholds)
    fallback: tuple[float, float, list[float]] | None = None  # (-acc, cost, thresholds)
    for acc, cost, settings in _settings(confidences, correct, stage_macs, grid):
        for a, co, thresholds in zip(acc, cost, settings, strict=True):
            if a >= min_accuracy - 1e-12 and (best is None or (co, -a) < best[:2]):
                best = (float(co), float(-a), thresholds)
            if fallback is None or (-a, co) < fallback[:2]:
                fallback = (float(-a), float(co), thresholds)
    if best is not None:
        return best[2], best[0]
    assert fallback is not None
    return fallback[2], fallback[1]


def _all_settings(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], grid: int,
                  last_grid: int | None = None) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """Every candidate setting at once: (accuracies, average MACs, thresholds)."""
    accs, costs, settings = [], [], []
    for acc, cost, thresholds in _settings(confidences, correct, stage_macs, grid, last_grid):
        accs.append(acc)
        costs.append(cost)
        settings += thresholds
    return np.concatenate(accs), np.concatenate(costs), settings


BUDGET_BAND = 0.05  # budget mode spends the budget: its settings cost at least 95 % of it
BUDGET_GRID = 200  # quantiles of the last exit decision in budget mode: with 40, a 2-stage cascade's average MACs
# move in steps of 2.5 % of the last stage's cost, 7.5 % of a 3x budget, so a 5 % band often held no setting and
# the costliest one below the budget landed 5.4 % under it on test (ResNet-20 demo, 3x)


def _spend(acc: np.ndarray, cost: np.ndarray, limit: float, samples: int) -> int | None:
    """Budget mode's choice among settings: the most accurate one that spends the budget (average MACs between
    ``1 - BUDGET_BAND`` of ``limit`` and ``limit``; the costlier of equals), unless a cheaper setting is more
    accurate by more than one binomial standard error; the costliest within ``limit`` when none is that close;
    ``None`` when none fits.

    The most accurate setting anywhere below the budget is mostly the luckiest on these samples: so chosen, a
    ResNet-20 cascade [0.25, static] asked for 4x fewer MACs shipped 5.21x on test at -0.24 points, where a
    setting at 3.45x lost 0.05. The standard error keeps a clearly better cheap setting (early stages that beat
    the last one) from being passed over; a cruder rule, the costliest setting within a standard error of the
    best, threw away accuracy between settings of one cost in a 4-stage MobileNetV2 cascade (4x: +0.03 points
    on test against +0.33)."""
    fits = np.flatnonzero(cost <= limit)
    if not len(fits):
        return None
    best = fits[np.lexsort((-cost[fits], -acc[fits]))[0]]  # the most accurate anywhere, the costlier of equals
    band = fits[cost[fits] >= limit * (1 - BUDGET_BAND)]
    if not len(band):
        return int(fits[np.lexsort((-acc[fits], -cost[fits]))[0]])  # the costliest, the more accurate of equals
    spent = band[np.lexsort((-cost[band], -acc[band]))[0]]
    top = acc[best]
    return int(best if top - acc[spent] > np.sqrt(top * (1 - top) / samples) + 1e-12 else spent)


def calibrate_budget(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], max_macs: float,
                     grid: int = 40, last_grid: int = BUDGET_GRID) -> tuple[list[float], float, float]:
    """Budget mode: the most accurate thresholds that spend about ``max_macs`` on average on these samples, at
    most that (:func:`_spend`).

    Returns (thresholds, accuracy, average MACs); when no setting fits the budget, the cheapest one.
    """
    if len(stage_macs) == 1:
        ok = np.asarray(correct, dtype=np.float64)
        return [], float(ok[0].mean()), float(stage_macs[0])
    acc, cost, settings = _all_settings(confidences, correct, stage_macs, grid, last_grid)
    i = _spend(acc, cost, max_macs * (1 + 1e-12), confidences.shape[1])
    if i is None:
        i = int(np.lexsort((-acc, cost))[0])
    return settings[i], float(acc[i]), float(cost[i])


def budget_frontier(outputs: StageOutputs, costs: list[float], budgets: list[float], grid: int = 40,
                    bands: bool = False) -> list[list[float]]:
    """:func:`calibrate_budget` for many budgets over one enumeration of the settings (snapped to float32).

    ``bands`` (budgets in decreasing order): each budget's setting is instead the most accurate one costing
    more than the next budget (the costlier of equals), so that walking the budgets down walks the
    accuracy-cost frontier one cost step at a time even where the most accurate setting of a large budget is
    cheap (a band without any setting repeats the one above it): the candidate sequence of a certificate."""
    if len(costs) == 1:
        return [[] for _ in budgets]
    acc, cost, settings = _all_settings(outputs.confidence, outputs.correct, costs, grid)
    cheapest = int(np.lexsort((-acc, cost))[0])
    limits = np.asarray(budgets, dtype=np.float64) * (1 + 1e-12)
    out: list[list[float]] = []
    for b, limit in enumerate(limits):
        if not bands:
            i = _spend(acc, cost, float(limit), outputs.confidence.shape[1])
            out.append(settings[cheapest if i is None else i])
            continue
        floor = limits[b + 1] if b + 1 < len(limits) else -np.inf
        band = np.flatnonzero((cost <= limit) & (cost > floor))
        if len(band):
            out.append(settings[int(band[np.lexsort((-cost[band], -acc[band]))[0]])])
        else:  # an empty band: the setting of the band above (the cheapest setting for the first)
            out.append(out[-1] if out else settings[cheapest])
    return [float32_thresholds(t) for t in out]


def calibrate_thresholds(outputs: StageOutputs, costs: list[float], min_accuracy: float) -> tuple[list[float], float]:
    """:func:`calibrate` on one arch's stage outputs, thresholds snapped to float32 (as they are compared)."""
    thresholds, cost = calibrate(outputs.confidence, outputs.correct, costs, min_accuracy)
    return float32_thresholds(thresholds), cost


def calibrate_budget_thresholds(outputs: StageOutputs, costs: list[float], max_macs: float) -> list[float]:
    """:func:`calibrate_budget` on one arch's stage outputs, thresholds snapped to float32."""
    return float32_thresholds(calibrate_budget(outputs.confidence, outputs.correct, costs, max_macs)[0])


RULE_BOUND_WITHIN = 1.3  # #10's target: average MACs within 1.3x of the oracle over the same stages
RULE_BOUND_POINTS = (0.2, 0.5)  # accuracy drops at which the bound states the cheapest setting


def threshold_rule_bound(outputs: StageOutputs, costs: list[float], *, oracle_macs: float, reference_accuracy: float,
                         grid: int = 40) -> dict[str, float | None]:
    """How near the oracle any confidence-threshold rule on these stages can come: every setting of the grid
    calibration searches, scored on the very samples the oracle is (fitted in-sample, so a bound, never a figure to
    ship). It tells a stage set whose oracle is out of reach (a near-free first exit that is right on most samples,
    whose few errors its confidence cannot single out) from thresholds that leave MACs on the table.

    Returns the best accuracy at average MACs within ``RULE_BOUND_WITHIN`` times ``oracle_macs``, and for each of
    ``RULE_BOUND_POINTS`` the fewest average MACs, as a multiple of ``oracle_macs``, of a setting at most that many
    points below ``reference_accuracy`` (None: no setting)."""
    if len(costs) == 1:
        acc, cost = outputs.correct.double().mean(1).numpy(), np.asarray(costs, dtype=np.float64)
    else:
        acc, cost, _ = _all_settings(outputs.confidence, outputs.correct, costs, grid)
    near = cost <= RULE_BOUND_WITHIN * oracle_macs * (1 + 1e-12)
    out: dict[str, float | None] = {"within_oracle": RULE_BOUND_WITHIN,
                                    "accuracy_within": float(acc[near].max()) if near.any() else None}
    for points in RULE_BOUND_POINTS:
        keeps = acc >= reference_accuracy - points / 100 - 1e-12
        out[f"oracle_multiple_at_{points}"] = float(cost[keeps].min() / oracle_macs) if keeps.any() else None
    return out
