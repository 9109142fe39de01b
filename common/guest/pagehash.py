"""xxh3-64 of every row of a buffer: a page's data (4096 bytes) or its packed tags (128).

One digest per page serves twice: as the transit check of a page batch and as the leaf of the
verification tree, so each page is hashed once per side. The loop runs in C where the
extension was built (common/_pagehash.c: no Python call per row, the GIL released); otherwise
in Python, with the same results.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt
import xxhash

from common.indices import runs

U64Array = npt.NDArray[np.uint64]

try:
    from common import _pagehash

    NATIVE = sys.byteorder == "little"  # the extension writes host-order u64s
except ImportError:  # built without a compiler or xxhash.h: the Python loop below
    NATIVE = False


def _python_rows(view: memoryview, width: int, out: U64Array) -> None:
    out[:] = np.fromiter(
        (xxhash.xxh3_64_intdigest(view[i : i + width]) for i in range(0, out.size * width, width)),
        dtype=np.uint64,
        count=out.size,
    )


def row_digests(rows: npt.NDArray[np.uint8], *, native: bool = NATIVE) -> U64Array:
    """One digest per row of a 2-D uint8 array (copied first only if not contiguous)."""
    rows = np.ascontiguousarray(rows)
    count = rows.shape[0] if rows.ndim == 2 else 0
    out = np.empty(count, dtype=np.uint64)
    if count == 0:
        return out
    width = rows.shape[1]
    flat = rows.reshape(-1)
    if native:
        _pagehash.hash_rows(flat, width, out)
    else:
        _python_rows(memoryview(flat), width, out)  # type: ignore[arg-type]
    return out


def table_digests(
    table: npt.NDArray[np.uint8], pages: npt.NDArray[np.int64], *, native: bool = NATIVE
) -> U64Array:
    """Digests of table[pages] (table is (page_count, width)), reading runs of consecutive
    pages in place rather than gathering them first."""
    out = np.empty(pages.size, dtype=np.uint64)
    for a, b in runs(pages):
        first = int(pages[a])
        out[a:b] = row_digests(table[first : first + b - a], native=native)
    return out


def gather_content(
    table: npt.NDArray[np.uint8], pages: npt.NDArray[np.int64], *, copy: bool = True, native: bool = NATIVE
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint8] | None, U64Array]:
    """Which of table[pages] are all zero, and for the others, in order, the digest of each and
    (with `copy`) a fresh copy, in one pass: what is sent is what was hashed, whatever writes
    the table meanwhile. Without `copy` the rows are hashed where they are, for a caller that
    knows nothing writes them before they have been sent."""
    pages = np.ascontiguousarray(pages, dtype=np.int64)
    width = table.shape[1]
    zero = np.zeros(pages.size, dtype=np.bool_)
    rows = np.empty((pages.size, width), dtype=np.uint8) if copy else None
    digests = np.empty(pages.size, dtype=np.uint64)
    if pages.size == 0:
        return zero, rows, digests
    if native:
        out = None if rows is None else rows.reshape(-1)
        count = _pagehash.gather_content(table.reshape(-1), width, pages, out, digests, zero.view(np.uint8))
    else:
        zero[:] = ~table[pages].any(axis=1)
        content = table[pages[~zero]]
        count = content.shape[0]
        if rows is not None:
            rows[:count] = content
        digests[:count] = row_digests(content, native=False)
    return zero, None if rows is None else rows[:count], digests[:count]


def place_checked(
    table: npt.NDArray[np.uint8],
    pages: npt.NDArray[np.int64],
    rows: npt.NDArray[np.uint8],
    expected: U64Array,
    *,
    native: bool = NATIVE,
) -> int:
    """table[pages[i]] = rows[i], each row hashed where it landed (from the cache) and compared
    with expected[i]. Returns how many leading rows landed as expected; the pages from there on
    hold unknown content (the native loop stops after the first bad row, the Python one does not)."""
    pages = np.ascontiguousarray(pages, dtype=np.int64)
    rows = np.ascontiguousarray(rows)
    expected = np.ascontiguousarray(expected, dtype=np.uint64)
    if pages.size == 0:
        return 0
    if native:
        bad = _pagehash.place_rows(rows.reshape(-1), table.shape[1], pages, expected, table.reshape(-1))
        return pages.size if bad < 0 else int(bad)
    table[pages] = rows
    wrong = np.flatnonzero(table_digests(table, pages, native=False) != expected)
    return int(wrong[0]) if wrong.size else pages.size
