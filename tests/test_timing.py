"""Speed measurement: which call is timed as which (no speed targets here; those live in `s2d bench`)."""

from __future__ import annotations

import time

import torch

from s2d.evaluation import measure_pair, measure_speed


def test_measure_pair_times_each_callable_as_its_own():
    calls: list[str] = []

    def slow(x):
        calls.append("slow")
        time.sleep(0.02)

    def fast(x):
        calls.append("fast")

    x = torch.zeros(4, 3)
    a, b = measure_pair(slow, fast, x, repeats=3, warmup=1)
    assert calls == ["slow", "fast"] * 4  # warm-up, then interleaved call for call
    assert a.per_batch_ms >= 20 > b.per_batch_ms
    assert a.repeats == b.repeats == 3 and a.batch_size == 4
    assert a.img_per_s == 4 / (a.per_batch_ms / 1e3)


def test_measure_speed_repeats_until_min_seconds():
    s = measure_speed(lambda x: time.sleep(0.01), torch.zeros(1), repeats=2, warmup=0, min_seconds=0.1)
    assert s.repeats >= 8 and s.per_batch_ms >= 10
