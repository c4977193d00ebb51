"""McNemar's exact test on paired test-set errors, checked against hand-counted binomial tails."""

from __future__ import annotations

from math import comb

import pytest

from s2d.measure.significance import paired_comparison


def test_only_the_images_one_network_alone_gets_wrong_count():
    a_wrong, b_wrong = {1, 2, 3}, {3, *range(4, 13)}  # image 3 both miss: it says nothing
    r = paired_comparison(a_wrong, b_wrong)
    assert (r.a_only, r.b_only) == (9, 2)
    # two-sided: P(X >= 9) + P(X <= 2) for X ~ Binomial(11, 1/2)
    tail = sum(comb(11, k) for k in (9, 10, 11)) / 2**11
    assert r.p_value == pytest.approx(2 * tail)
    assert not r.significant() and r.significant(level=0.1)


def test_two_images_apart_is_chance_and_two_hundred_is_not():
    close = paired_comparison(range(0, 100), range(2, 100 + 2 + 2))  # 2 vs 4 images only one misses
    assert close.p_value > 0.5
    far = paired_comparison(range(0, 100), range(100, 300))
    assert (far.a_only, far.b_only) == (200, 100) and far.p_value < 1e-6 and far.significant()
    assert paired_comparison([5, 6], [6, 5]).p_value == 1.0  # the same errors
