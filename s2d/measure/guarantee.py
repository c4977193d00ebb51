"""A tolerance as a promise about unseen data: thresholds certified on a held-out calibration split.

Calibrating thresholds on the images that also chose the arch reports the network that got
lucky on them (measured: a 0.2-point tolerance gave a 0.4-point test drop). Here the thresholds
come from a fixed sequence of candidate settings, ordered from the safest (every sample runs to
the last stage) to the most aggressive on the *validation* split, and are then tested in that
order on the *calibration* split, which neither the search nor the fine-tune has seen: each
candidate passes when the test below rejects "its accuracy drop against the static model is the
tolerance or more", and testing stops at the first failure. Fixed-sequence testing
(Learn-then-Test, Angelopoulos et al. 2021) keeps the chance that the shipped setting breaks the
tolerance on the data distribution below ``1 - confidence`` without a multiplicity correction.

The drop is ``p_lost - p_gained``: the shares of images the static network gets right and the dynamic one
wrong, and the reverse. Each candidate is an exact unconditional test of "the drop is at least the tolerance":
Tango's score statistic for a paired difference (Tango 1998), studentized with the variance of the drop
under that hypothesis, and its p-value maximised over the nuisance parameter, the share of images the two
networks disagree on, within a Clopper-Pearson set of confidence ``1 - NUISANCE_RISK`` for it, plus that risk
(Berger & Boos 1994). The null distribution is the trinomial one itself, not a normal approximation, so the
test keeps its level at any size (checked by enumeration in ``tests/test_guarantee.py``). It replaces the union
of a Clopper-Pearson upper bound on the lost images and a lower one on the gained, each at half the risk, which
added two margins where the drop's own variance needs one (30 lost and 30 gained of 3000 at 95 %: a bound of 0.75
points there, 0.44 here). The hypothesis's worst case is taken on its boundary (drop equal to the tolerance);
the enumeration test checks larger drops too.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from s2d.measure.accuracy import StageOutputs
from s2d.measure.calibration import budget_frontier
from s2d.transform.exit_rule import NEVER_EXIT

DEFAULT_CONFIDENCE = 0.9


NUISANCE_RISK = 1e-3  # of the disagreement rate's confidence set, added to every p-value (a tenth of the test's
# risk when that is below 1 %, so that any --confidence below 1 can still be certified)
_NUISANCE_GRID = 32  # points of that set where the p-value is evaluated, then refined around the largest


def _restricted_shares(lost: np.ndarray, gained: np.ndarray, n: int, drop: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood shares of lost and gained images under "the drop is exactly ``drop``" (the root of a
    quadratic; the smaller share is solved for, so both stay non-negative)."""
    if drop < 0:
        gained_share, lost_share = _restricted_shares(gained, lost, n, -drop)
        return lost_share, gained_share
    b = (lost + gained) * (1 - drop) - 2 * drop * (n - lost)
    gained_share = (b + np.sqrt(b * b + 8 * n * gained * drop * (1 - drop))) / (4 * n)
    return gained_share + drop, gained_share


def _score(lost: np.ndarray, gained: np.ndarray, n: int, drop: float) -> np.ndarray:
    """Tango's statistic: the observed drop minus ``drop``, in standard deviations of the drop under that
    hypothesis (-inf / +inf where that deviation is 0 and the observation falls below / above it)."""
    lost, gained = np.asarray(lost, dtype=np.float64), np.asarray(gained, dtype=np.float64)
    a, b = _restricted_shares(lost, gained, n, drop)
    var = np.maximum(a + b - drop * drop, 0.0)
    excess = lost - gained - n * drop
    with np.errstate(divide="ignore", invalid="ignore"):
        z = excess / np.sqrt(n * var)
    return np.where(var > 0, z, np.where(excess > 0, np.inf, np.where(excess < 0, -np.inf, 0.0)))


@functools.lru_cache(maxsize=1 << 16)
def drop_pvalue(lost: int, gained: int, n: int, drop: float, nuisance_risk: float = NUISANCE_RISK) -> float:
    """p-value of the hypothesis "the dynamic network's drop is ``drop`` (a fraction) or more", from ``lost`` and
    ``gained`` images of ``n``: small when the observed counts are unlikely under every drop that large.

    Exact: the probability, maximised over the nuisance share of disagreements ``s`` (within its Clopper-Pearson
    set), that the trinomial counts score at most the observed score; the drop's boundary value is the worst
    case of the hypothesis. Cached: a threshold sequence meets the same counts again and again."""
    from scipy.special import gammaln, xlogy  # scipy costs every CLI process half a second at import
    from scipy.stats import beta

    if drop <= -1:
        return 1.0
    if drop >= 1:
        return 1.0 if lost == n else nuisance_risk
    disagree = lost + gained
    s_lo = 0.0 if disagree == 0 else float(beta.ppf(nuisance_risk / 2, disagree, n - disagree + 1))
    s_hi = 1.0 if disagree == n else float(beta.ppf(1 - nuisance_risk / 2, disagree + 1, n - disagree))
    lo, hi = max(abs(drop), s_lo), min(s_hi, 2 - drop, 2 + drop)  # shares a, b = (s +- drop) / 2 within [0, 1]
    if lo > hi:  # no disagreement rate both plausible and compatible with a drop that large
        return nuisance_risk

    def window(low: float, high: float) -> np.ndarray:  # counts of a share in [low, high], 8 sd (+10) either side
        def sd(x: float) -> float:
            return 8 * np.sqrt(n * x * (1 - x)) + 10
        return np.arange(max(0, int(n * low - sd(low))), int(min(n, n * high + sd(high))) + 1, dtype=np.float64)

    ls = window((lo + drop) / 2, (hi + drop) / 2)[:, None]
    gs = window((lo - drop) / 2, (hi - drop) / 2)[None, :]
    rest = n - ls - gs
    log_multinomial = np.where(rest >= 0, gammaln(n + 1) - gammaln(ls + 1) - gammaln(gs + 1)
                               - gammaln(np.maximum(rest, 0) + 1), -np.inf)
    at_most = _score(ls, gs, n, drop) <= _score(np.float64(lost), np.float64(gained), n, drop) + 1e-12

    def tail(s: float) -> float:
        a, b = (s + drop) / 2, (s - drop) / 2
        with np.errstate(invalid="ignore"):
            p = np.exp(log_multinomial + xlogy(ls, a) + xlogy(gs, b) + xlogy(rest, max(1 - a - b, 0.0)))
        p = np.nan_to_num(p)
        return float(p[at_most].sum() + max(0.0, 1.0 - p.sum()))  # mass outside the window counted as extreme,
        # so a narrow window can only make the test more cautious

    grid = np.linspace(lo, hi, _NUISANCE_GRID)
    tails = [tail(s) for s in grid]
    i = int(np.argmax(tails))
    finer = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 17)
    return min(1.0, max(tails + [tail(s) for s in finer]) + nuisance_risk)


def _counts(static_correct: torch.Tensor | np.ndarray, dynamic_correct: torch.Tensor | np.ndarray
            ) -> tuple[int, int, int]:
    s = np.asarray(static_correct, dtype=bool)
    d = np.asarray(dynamic_correct, dtype=bool)
    return int((s & ~d).sum()), int((~s & d).sum()), len(s)


def _risks(confidence: float) -> tuple[float, float]:
    """The test's risk and its nuisance set's share of it."""
    risk = 1 - confidence
    return risk, min(NUISANCE_RISK, risk / 10)


def keeps_tolerance(static_correct: torch.Tensor | np.ndarray, dynamic_correct: torch.Tensor | np.ndarray,
                    tolerance: float, confidence: float = DEFAULT_CONFIDENCE) -> bool:
    """Whether the test rejects "the drop is ``tolerance`` (a fraction) or more" at ``1 - confidence``."""
    lost, gained, n = _counts(static_correct, dynamic_correct)
    risk, nuisance = _risks(confidence)
    return drop_pvalue(lost, gained, n, round(tolerance, 12), nuisance) <= risk


def drop_upper_bound(static_correct: torch.Tensor | np.ndarray, dynamic_correct: torch.Tensor | np.ndarray,
                     confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Upper ``confidence`` bound of the accuracy drop (a fraction, not points) of the dynamic network: the
    smallest drop the test rejects (to 1e-5, a thousandth of a point), by bisection from the observed drop."""
    lost, gained, n = _counts(static_correct, dynamic_correct)
    risk, nuisance = _risks(confidence)

    def rejected(drop: float) -> bool:
        return drop_pvalue(lost, gained, n, round(drop, 12), nuisance) <= risk

    lo = (lost - gained) / n
    step = 1.0 / n
    hi = min(lo + step, 1.0)
    while hi < 1.0 and not rejected(hi):
        lo, step = hi, 2 * step
        hi = min(hi + step, 1.0)
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if rejected(mid) else (mid, hi)
    return hi


def min_calibration_images(tolerance: float) -> int:
    """Below this many images a single lost image (and nothing gained) already bounds the drop above
    ``tolerance`` (a fraction): only a network that never disagrees with the static one could be
    certified, so the split is too small to promise that tolerance (0 for a zero tolerance)."""
    if tolerance <= 0:
        return 0
    n = 1
    while drop_upper_bound(*_one_lost(n), DEFAULT_CONFIDENCE) > tolerance:
        n = n * 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if drop_upper_bound(*_one_lost(mid), DEFAULT_CONFIDENCE) > tolerance else (lo, mid)
    return hi


def _one_lost(n: int) -> tuple[np.ndarray, np.ndarray]:
    static = np.ones(n, dtype=bool)
    dynamic = static.copy()
    dynamic[0] = False
    return static, dynamic


def threshold_sequence(val: StageOutputs, costs: list[float], steps: int = 40) -> list[list[float]]:
    """Candidate settings from the validation split, safest first: every sample to the last stage, then, for
    an average-MAC budget that falls in ``steps`` even steps to the cheapest stage's cost, the most accurate
    setting on validation data that costs between this budget and the next. Fine steps matter: testing stops
    at the first failure. Without the band, a fine-tuned network whose early stages match the static one on
    validation data jumped from "all to the last stage" straight to its most accurate setting there, a cheap
    one that then failed on the calibration split, and nothing was certified (ResNet-20 full budget, a
    4-stage cascade). Chosen without the calibration split, so testing them there in this order is a fixed
    sequence."""
    seq = [[NEVER_EXIT] * (val.num_stages - 1)]
    budgets = np.linspace(sum(costs), costs[0], steps + 1)[1:].tolist()
    for thresholds in budget_frontier(val, costs, budgets, bands=True):
        if thresholds not in seq:
            seq.append(thresholds)
    return seq


@dataclass
class Certificate:
    """The shipped thresholds and what the calibration split says about them."""

    thresholds: list[float]
    bound_points: float  # upper confidence bound of the drop on the calibration split, in points
    calib_drop_points: float  # observed drop there
    confidence: float
    tolerance_points: float
    calib_images: int
    tested: int  # candidates tested before the first failure (or all)
    candidates: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def certify(sequence: list[list[float]], calib: StageOutputs, static_correct: torch.Tensor, tolerance: float,
            confidence: float = DEFAULT_CONFIDENCE) -> Certificate | None:
    """The last setting of ``sequence`` that passes before the first that fails (``None``: not even the
    first passes, so the network cannot keep the promise and the static one must be shipped)."""
    passed: tuple[list[float], torch.Tensor] | None = None
    tested = 0
    for thresholds in sequence:
        tested += 1
        dyn = calib.correct.gather(0, calib.exits(thresholds)[None])[0]
        if not keeps_tolerance(static_correct, dyn, tolerance, confidence):
            break
        passed = thresholds, dyn
    if passed is None:
        return None
    thresholds, dyn = passed
    drop = float(np.asarray(static_correct, dtype=np.float64).mean() - dyn.double().mean().item())
    # the bound is for the report: at or below the tolerance, since the test rejected that drop
    bound = min(drop_upper_bound(static_correct, dyn, confidence), tolerance)
    return Certificate(thresholds, bound * 100, drop * 100, confidence, tolerance * 100, len(dyn), tested,
                       len(sequence))
