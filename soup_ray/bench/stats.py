"""Order statistics shared by the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np


def percentile(values: Sequence[float], q: float, method: Literal["linear", "nearest_rank"] = "linear") -> float | None:
    """The ``q``-th percentile (0-100) of ``values``; None when there are none.

    ``linear`` interpolates between order statistics (latencies);
    ``nearest_rank`` returns an observed value, the ceil(q/100*n)-th smallest
    (costs counted in whole images).
    """
    if len(values) == 0:
        return None
    return float(
        np.percentile(
            np.asarray(values, dtype=np.float64), q, method="linear" if method == "linear" else "inverted_cdf"
        )
    )
