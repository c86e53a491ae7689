"""Benchmark results -> bars: mean and Student-t interval per group (`caap.stats`), from raw values or
ready summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from caap.plots._inputs import _to_numpy
from caap.stats import mean_ci


# ----------------------------------------------------------------------------- benchmark summaries
def _mean_ci(values: Any, ci: float) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n): `caap.stats.mean_ci` as an interval."""
    mean, half, n = mean_ci(_to_numpy(values, "values"), ci)
    return mean, mean - half, mean + half, n


_LO_KEYS = ("{m}_ci_low", "{m}_lo", "{m}_low", "ci_low", "ci_lo", "lo", "low", "lower")
_HI_KEYS = ("{m}_ci_high", "{m}_hi", "{m}_high", "ci_high", "ci_hi", "hi", "high", "upper")
_HALF_KEYS = ("{m}_ci", "ci", "ci95", "err", "error")


def _summary_from_mapping(d: Mapping[str, Any], metric: str | None) -> tuple[float, float, float, int] | None:
    """(mean, lo, hi, n) from a summary such as {"mean": .., "ci_low": .., "ci_high": .., "n": ..}."""
    m = metric or ""
    mean_key = next((k for k in ("mean", m) if k and k in d and np.isscalar(d[k])), None)
    if mean_key is None:
        return None
    mean = float(d[mean_key])
    n = int(d.get("n", d.get(f"{m}_n", 0)) or 0)
    lo_key = next((k.format(m=m) for k in _LO_KEYS if k.format(m=m) in d), None)
    hi_key = next((k.format(m=m) for k in _HI_KEYS if k.format(m=m) in d), None)
    if lo_key and hi_key:
        return mean, float(d[lo_key]), float(d[hi_key]), n
    half_key = next((k.format(m=m) for k in _HALF_KEYS if k.format(m=m) in d), None)
    if half_key:
        return mean, mean - float(d[half_key]), mean + float(d[half_key]), n
    return mean, math.nan, math.nan, n


def summarize(
    data: Any, metric: str | None = None, *, x: str | None = None, color: str | None = None, ci: float = 0.95
) -> list[dict[str, Any]]:
    """Benchmark results -> one record per bar: {"x", "color", "mean", "lo", "hi", "n"}.

    Accepted:
      - a dict {name: number}, {name: per-image values (list / array / tensor)}, {name: summary dict
        ({"mean", "ci_low", "ci_high"} or {"mean", "ci"} half-width, optional "n")}, or
        {name: {metric: any of those}};
      - a pandas DataFrame with a `metric` column and a grouping column `x` (default "method", else the
        first text column) and optionally `color`: several rows per group are per-image values (mean and
        a t-based `ci` interval are computed); one row per group is a summary whose interval is read
        from columns such as `{metric}_ci_low` / `{metric}_ci_high`, `ci_low` / `ci_high` or `ci`
        (half-width). A long summary table with columns `metric` and `mean` is filtered on the metric.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci}")
    records: list[dict[str, Any]] = []
    if hasattr(data, "columns") and hasattr(data, "groupby"):
        df = data
        if metric is None:
            raise ValueError(f"metric: name the column to plot, one of {list(df.columns)}")
        if metric not in df.columns:
            if "metric" in df.columns and "mean" in df.columns:
                df = df[df["metric"] == metric]
                if len(df) == 0:
                    present = sorted(set(data["metric"]))
                    raise ValueError(f"no rows with metric == {metric!r}; metrics present: {present}")
                value_col = "mean"
            else:
                raise ValueError(f"metric {metric!r} is not a column; columns: {list(df.columns)}")
        else:
            value_col = metric
        if x is None:
            text_cols = [
                c for c in df.columns if df[c].dtype == object or str(df[c].dtype) in ("string", "str", "category")
            ]
            x = "method" if "method" in df.columns else (text_cols[0] if text_cols else None)
        if x is None or x not in df.columns:
            raise ValueError(f"x: name the column that labels the bars; columns: {list(df.columns)}")
        if color is not None and color not in df.columns:
            raise ValueError(f"color {color!r} is not a column; columns: {list(df.columns)}")
        keys = [x] + ([color] if color else [])
        for key, g in df.groupby(keys, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            if len(g) > 1:
                mean, lo, hi, n = _mean_ci(g[value_col].to_numpy(dtype=np.float64), ci)
            else:
                row = {str(k): v for k, v in g.iloc[0].to_dict().items()}
                if value_col == "mean":
                    row.setdefault(metric, row["mean"])
                mean, lo, hi, n = _summary_from_mapping(row, metric) or (float(row[value_col]), math.nan, math.nan, 1)
            group = str(key[1]) if color else None
            records.append({"x": str(key[0]), "color": group, "mean": mean, "lo": lo, "hi": hi, "n": n})
        return records
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            f"bar data must be a non-empty dict {{name: values | number | summary dict}} or a pandas DataFrame, "
            f"got {type(data).__name__}"
        )
    for name, val in data.items():
        if isinstance(val, Mapping) and metric is not None and metric in val and not np.isscalar(val[metric]):
            val = val[metric]
        if isinstance(val, Mapping):
            s = _summary_from_mapping(val, metric)
            if s is None:
                raise ValueError(
                    f"{name!r}: a summary dict needs a 'mean' (or {metric!r}) entry and optionally ci_low/ci_high "
                    f"or ci; got keys {list(val)}"
                )
            mean, lo, hi, n = s
        elif isinstance(val, (int, float, np.integer, np.floating)) or (isinstance(val, Tensor) and val.ndim == 0):
            mean, lo, hi, n = float(val), math.nan, math.nan, 1
        else:
            mean, lo, hi, n = _mean_ci(val, ci)
        records.append({"x": str(name), "color": None, "mean": mean, "lo": lo, "hi": hi, "n": n})
    return records


def _axis_title(metric: str | None, higher_is_better: bool | None) -> str:
    t = metric or "value"
    if higher_is_better is not None:
        t += " (higher is better)" if higher_is_better else " (lower is better)"
    return t


