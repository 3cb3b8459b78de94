"""Interval unions (gpudoctor.model.steps): merge_intervals and union_ns against a per-nanosecond count."""

from __future__ import annotations

import numpy as np

from gpudoctor.gate.samples import busy_in_windows
from gpudoctor.model.steps import merge_intervals, union_ns


def test_union_matches_counting_covered_nanoseconds():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(0, 30))
        s = rng.integers(0, 100, n)
        e = s + rng.integers(0, 20, n)
        covered = np.zeros(130, bool)
        for a, b in zip(s, e):
            covered[a:b] = True
        bs, be = merge_intervals(s, e)
        blocks = np.zeros(130, bool)
        for a, b in zip(bs, be):
            blocks[a:b] = True
        assert (blocks == covered).all()
        assert (bs[1:] > be[:-1]).all() and (be >= bs).all()  # disjoint, sorted
        assert union_ns(s, e) == covered.sum()
        assert union_ns(s, e, 20, 60) == covered[20:60].sum()
        lo = rng.integers(0, 100, 4)
        hi = lo + rng.integers(1, 40, 4)
        assert busy_in_windows(s, e, lo, hi).tolist() == [int(covered[a:b].sum()) for a, b in zip(lo, hi)]


def test_merge_of_nothing():
    bs, be = merge_intervals([], [])
    assert len(bs) == len(be) == 0 and union_ns(np.array([]), np.array([])) == 0
