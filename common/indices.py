"""Page-index arrays: the one test for "these pages are a slice, not a scatter"."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def contiguous(indices: npt.NDArray[np.int64]) -> bool:
    """Ascending and gap-free (the usual case in round 1): a slice serves instead of a scatter."""
    n = indices.size
    return n > 0 and int(indices[-1]) - int(indices[0]) + 1 == n and bool((np.diff(indices) == 1).all())
