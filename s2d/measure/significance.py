"""Is one network more accurate than another on the same test images, or is the gap chance?

Two networks scored on one test set make paired errors: only the images exactly one of them
gets wrong say which is better. McNemar's exact test asks whether those split unevenly enough
to rule out a coin flip. A verdict of "0.02 points behind" on 10,000 images is two images; the
test says whether a re-run with another seed could just as well reverse it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedComparison:
    a_only: int  # images only network A classifies correctly
    b_only: int  # images only network B classifies correctly
    p_value: float  # two-sided exact McNemar test of "A and B are equally accurate"

    def significant(self, level: float = 0.05) -> bool:
        return self.p_value < level


def paired_comparison(a_wrong: Iterable[int], b_wrong: Iterable[int]) -> PairedComparison:
    """McNemar's exact test from the indices of the test images each network gets wrong."""
    from scipy.stats import binomtest  # lazily, as in guarantee.py

    a, b = set(a_wrong), set(b_wrong)
    a_only, b_only = len(b - a), len(a - b)
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5).pvalue)
    return PairedComparison(a_only, b_only, min(1.0, p))
