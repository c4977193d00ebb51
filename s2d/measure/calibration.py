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


def _settings(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], grid: int):
    """Every candidate threshold setting with its accuracy and average MACs on these samples.

    Candidate thresholds per stage are quantiles of its confidences plus 0 (everyone exits) and
    "never exit".
    Earlier thresholds are enumerated; the last decision is solved for all candidates at
    once with sorted prefix sums (S <= 4 keeps this well under a second). Yields
    (accuracies, costs, thresholds) with one entry per candidate of the last decision.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    s, n = conf.shape
    cum = np.cumsum(np.asarray(stage_macs, dtype=np.float64))  # cost of a sample exiting at stage i
    qs = np.linspace(0, 1, grid + 1)[1:-1]
    cands = [np.unique(np.concatenate([[0.0], np.quantile(conf[i], qs), [NEVER_EXIT]])) for i in range(s - 1)]
    j = s - 2  # the last decision
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


def calibrate_budget(confidences: torch.Tensor, correct: torch.Tensor, stage_macs: list[float], max_macs: float,
                     grid: int = 40) -> tuple[list[float], float, float]:
    """Budget mode: thresholds maximising accuracy subject to average MACs <= ``max_macs`` on these samples.

    Of equally accurate settings the costliest within the budget: it sends more images to the later
    stages, and those differ from the static network's predictions least. Picking the cheaper of equals
    had the ResNet-20 cascade [0.375, static] exit 83 % of the images under a 2x budget, since calibration
    accuracy is flat from there on: 93.44 % on test at 3.17x, against 93.49 % at 2.03x spending the budget.

    Returns (thresholds, accuracy, average MACs); when no setting fits the budget, the cheapest one.
    """
    if len(stage_macs) == 1:
        ok = np.asarray(correct, dtype=np.float64)
        return [], float(ok[0].mean()), float(stage_macs[0])
    best: tuple[float, float, list[float]] | None = None  # (-acc, -cost, thresholds)
    cheapest: tuple[float, float, list[float]] | None = None  # (cost, -acc, thresholds)
    for acc, cost, settings in _settings(confidences, correct, stage_macs, grid):
        for a, co, thresholds in zip(acc, cost, settings, strict=True):
            if co <= max_macs * (1 + 1e-12) and (best is None or (-a, -co) < best[:2]):
                best = (float(-a), float(-co), thresholds)
            if cheapest is None or (co, -a) < cheapest[:2]:
                cheapest = (float(co), float(-a), thresholds)
    if best is not None:
        return best[2], -best[0], -best[1]
    assert cheapest is not None
    return cheapest[2], -cheapest[1], cheapest[0]


def budget_frontier(outputs: StageOutputs, costs: list[float], budgets: list[float], grid: int = 40,
                    bands: bool = False) -> list[list[float]]:
    """:func:`calibrate_budget` for many budgets in one pass over the candidate settings: for each budget,
    the most accurate thresholds whose average MACs on these samples fit it, the costliest of equals (the
    cheapest setting when none fits), snapped to float32. Walking the budgets down walks the accuracy-cost
    frontier.

    ``bands`` (budgets in decreasing order): each budget's setting must also cost more than the next
    budget, so consecutive settings differ in cost by about one step even where the most accurate setting
    of a large budget is cheap; a band without any setting repeats the one above it."""
    if len(costs) == 1:
        return [[] for _ in budgets]
    limits = np.asarray(budgets, dtype=np.float64) * (1 + 1e-12)
    floors = np.concatenate([limits[1:], [-np.inf]]) if bands else np.full(len(limits), -np.inf)
    best: list[tuple[float, float, list[float]] | None] = [None] * len(budgets)  # (-acc, -cost, thresholds)
    cheapest: tuple[float, float, list[float]] | None = None  # (cost, -acc, thresholds)
    for acc, cost, settings in _settings(outputs.confidence, outputs.correct, costs, grid):
        order = np.lexsort((-cost, -acc))  # most accurate first, the costlier of equals first
        i = int(np.lexsort((-acc, cost))[0])
        if cheapest is None or (cost[i], -acc[i]) < cheapest[:2]:
            cheapest = (float(cost[i]), float(-acc[i]), settings[i])
        for b, (limit, floor) in enumerate(zip(limits, floors, strict=True)):
            fits = order[(cost[order] <= limit) & (cost[order] > floor)]
            if len(fits):
                j = int(fits[0])
                if best[b] is None or (-acc[j], -cost[j]) < best[b][:2]:
                    best[b] = (float(-acc[j]), float(-cost[j]), settings[j])
    assert cheapest is not None
    if bands:  # an empty band: the setting of the band above (or the cheapest setting for the first)
        for b in range(len(best)):
            if best[b] is None and b > 0:
                best[b] = best[b - 1]
    return [float32_thresholds(b[2] if b is not None else cheapest[2]) for b in best]


def calibrate_thresholds(outputs: StageOutputs, costs: list[float], min_accuracy: float) -> tuple[list[float], float]:
    """:func:`calibrate` on one arch's stage outputs, thresholds snapped to float32 (as they are compared)."""
    thresholds, cost = calibrate(outputs.confidence, outputs.correct, costs, min_accuracy)
    return float32_thresholds(thresholds), cost


def calibrate_budget_thresholds(outputs: StageOutputs, costs: list[float], max_macs: float) -> list[float]:
    """:func:`calibrate_budget` on one arch's stage outputs, thresholds snapped to float32."""
    return float32_thresholds(calibrate_budget(outputs.confidence, outputs.correct, costs, max_macs)[0])
