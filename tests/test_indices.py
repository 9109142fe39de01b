"""Page-index helpers against numpy's set routines, on any input."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from common.indices import contiguous, has_repeats, runs, union

pages = st.lists(st.integers(0, 5000), max_size=200)


@given(a=pages, b=pages)
def test_union_is_the_sorted_set_of_both(a: list[int], b: list[int]) -> None:
    left = np.unique(np.array(a, dtype=np.int64))  # as a dirty sync gives them: sorted, unique
    right = np.unique(np.array(b, dtype=np.int64))
    got = union(left, right)
    assert got.dtype == np.int64
    assert got.tolist() == sorted(set(a) | set(b))


@given(a=pages)
def test_has_repeats_says_whether_a_page_appears_twice(a: list[int]) -> None:
    for dtype in (np.int64, np.uint64):
        assert has_repeats(np.array(a, dtype=dtype)) is (len(set(a)) != len(a))


@given(start=st.integers(0, 1000), n=st.integers(0, 50))
def test_a_run_is_contiguous_and_never_repeats(start: int, n: int) -> None:
    run = np.arange(start, start + n, dtype=np.int64)
    assert contiguous(run) is (n > 0)
    assert not has_repeats(run)
    if n > 1:
        assert not contiguous(run[::-1])
    if n > 2:
        assert not contiguous(np.delete(run, n // 2)), "a gap in the middle"


@given(a=pages)
def test_runs_are_the_stretches_of_consecutive_pages(a: list[int]) -> None:
    ordered = np.array(sorted(set(a)), dtype=np.int64)
    got = runs(ordered)
    assert [p for x, y in got for p in ordered[x:y].tolist()] == ordered.tolist(), "they cover it, in order"
    for x, y in got:
        assert contiguous(ordered[x:y])
    for (_, y), (x, _) in itertools.pairwise(got):
        assert ordered[x] != ordered[y - 1] + 1, "a run ends where the next page is not consecutive"
