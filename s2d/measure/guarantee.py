"""A tolerance as a promise about unseen data: thresholds certified on a held-out calibration split.

Calibrating thresholds on the images that also chose the arch reports the network that got
lucky on them (measured: a 0.2-point tolerance gave a 0.4-point test drop). Here the thresholds
come from a fixed sequence of candidate settings, ordered from the safest (every sample runs to
the last stage) to the most aggressive on the *validation* split, and are then tested in that
order on the *calibration* split, which neither the search nor the fine-tune has seen: each
candidate passes when an upper confidence bound of its accuracy drop against the static model
is within the tolerance, and testing stops at the first failure. Fixed-sequence testing
(Learn-then-Test, Angelopoulos et al. 2021) keeps the chance that the shipped setting breaks the
tolerance on the data distribution below ``1 - confidence`` without a multiplicity correction.

The drop is ``p_lost - p_gained``: the shares of images the static network gets right and the
dynamic one wrong, and the reverse. A one-sided Clopper-Pearson upper bound of the first minus a
lower bound of the second, each at risk ``(1 - confidence) / 2``, bounds it by a union bound: exact,
monotone (one more lost image raises it, one more gained image lowers it), and without assuming
the number of disagreements known, as McNemar's conditional test does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from s2d.measure.accuracy import StageOutputs
from s2d.measure.calibration import budget_frontier
from s2d.transform.exit_rule import NEVER_EXIT

DEFAULT_CONFIDENCE = 0.9


def drop_upper_bound(static_correct: torch.Tensor | np.ndarray, dynamic_correct: torch.Tensor | np.ndarray,
                     confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Upper ``confidence`` bound of the accuracy drop (a fraction, not points) of the dynamic network."""
    from scipy.stats import beta  # scipy.stats costs every CLI process half a second at import; few need it

    s = np.asarray(static_correct, dtype=bool)
    d = np.asarray(dynamic_correct, dtype=bool)
    n = len(s)
    lost, gained = int((s & ~d).sum()), int((~s & d).sum())
    risk = (1 - confidence) / 2
    upper_lost = 1.0 if lost == n else float(beta.ppf(1 - risk, lost + 1, n - lost))
    lower_gained = 0.0 if gained == 0 else float(beta.ppf(risk, gained, n - gained + 1))
    return upper_lost - lower_gained


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
    best: Certificate | None = None
    tested = 0
    for thresholds in sequence:
        tested += 1
        dyn = calib.correct.gather(0, calib.exits(thresholds)[None])[0]
        bound = drop_upper_bound(static_correct, dyn, confidence)
        if bound > tolerance + 1e-12:
            break
        drop = float(np.asarray(static_correct, dtype=np.float64).mean() - dyn.double().mean().item())
        best = Certificate(thresholds, bound * 100, drop * 100, confidence, tolerance * 100, len(dyn), tested,
                           len(sequence))
    if best is not None:
        best.tested = tested
    return best
