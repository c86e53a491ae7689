"""Confidence intervals: one method (Student t) for every table and error bar in the project.

    mean, half, n = mean_ci(values)        # over the finite values; 95% by default

Student's t quantile is computed here without scipy (`t_quantile`). The README's tables, the benchmark's
summaries, the ablation, `experiments/caap_defaults.py` and the plots' error bars all call `mean_ci`.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile without scipy: exact for 1 and 2 degrees of freedom, a Cornish-Fisher
    expansion beyond (error < 0.01 at df >= 3 for p = 0.975)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_ci(values: Any, level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t `level` confidence interval, n) over the finite values (NaN and
    inf left out). The half-width is NaN below two values; the mean is NaN for none."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(v.mean())
    if n == 1:
        return mean, math.nan, 1
    return mean, t_quantile(0.5 + level / 2, n - 1) * float(v.std(ddof=1)) / math.sqrt(n), n
