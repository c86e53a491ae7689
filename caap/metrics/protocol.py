"""The benchmark's metric protocol: which settings every reported table uses, how a metric's values are
identified between runs, and how a table of per-image values is summarised.

    metrics = build_metrics(["insertion", "deletion", "box_energy"], batch_size=64)   # the tables' settings
    metric_key(metrics["insertion"])     # "Insertion(level='patch', ..., n_steps=49)"
    print(summary_table(rows, ["caap", "gae"], metrics))  # mean ± 95% CI per method x metric, markdown

`experiments/benchmark.py` and `caap evaluate` both build their metrics here, so the same maps get the
same numbers from either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from caap.metrics.base import Metric

__all__ = [
    "AOPC_STEPS",
    "STEPS",
    "arrow",
    "build_metrics",
    "fmt",
    "header",
    "markdown_table",
    "metric_key",
    "metric_settings",
    "summary_table",
]

STEPS = 49
"""Insertion / deletion and token insertion / deletion: equal steps of patches (196 cells / 49 = 4 patches,
2% of the image, a step) instead of the paper's one patch (or 224 pixels) a step: its AUC is within 0.005 of
the one-patch AUC on average for all four metrics with a margin (`experiments/metric_steps.py`, ViT-Tiny on 8
`dev` photos, CAAP and GAE maps: mean absolute difference 0.0012 to 0.0020 at 49 steps, at most 0.0052 on
one image; at 28, 0.0023 to 0.0042, at most 0.013; at 8, 0.010 to 0.013). See `metric_settings`."""

AOPC_STEPS = 16
"""MoRF / LeRF: the first 16 patches removed one at a time (Samek et al. remove 100 regions of 9x9 px,
16% of a 224 px image; 16 ViT patches are 8%). See `metric_settings`."""


def metric_settings(steps: int = STEPS, aopc_steps: int = AOPC_STEPS) -> dict[str, dict[str, Any]]:
    """The settings every table uses, per metric (anything not named keeps the metric's default).

    Cost is what decides them: a faithfulness metric costs one forward pass per perturbation step per
    image per method. With the library defaults (insertion and deletion at every one of 196 patches,
    AOPC with 100 regions) the six faithfulness metrics cost ~616 forward passes per image and method,
    i.e. 13 methods x 651 images ~ 5.2 M forward passes: ~34 h on an idle 2-core CPU (ViT-Tiny, ~24 ms
    per image and pass). Here:
      insertion, deletion   patch level, `steps` equal steps (default 49: 48 forward passes per image,
                            the two ends being shared, see `caap.metrics.Evaluator`), AUC over [0, 1];
      token_insertion, token_deletion  the same `steps` (patch tokens dropped, no substrate);
      road_morf, road_lerf  the paper's 9 fractions (10%, ..., 90%), one sparse solve per image and
                            fraction on the CPU (~0.1-0.9 s each at 224 px);
      morf, lerf            patch level, `aopc_steps` single-patch steps (default 16);
      positive/negative_perturbation  Chefer et al.'s 9 steps (unchanged);
      localisation          no forward pass at all (unchanged).
    Measured with the former 16 steps: the first ten metrics together cost 79 forward passes per image and
    method (about 1.8 s per image and method on an idle 2-core CPU; localisation alone: ~0.02 s); 49 steps
    add 66 passes, and each token metric costs up to 48 passes of about half the tokens. Every metric keeps its paper's substrate
    and score. `benchmark.py --estimate` prices the steps.
    """
    return {
        "insertion": {"n_steps": steps},
        "deletion": {"n_steps": steps},
        "token_insertion": {"n_steps": steps},
        "token_deletion": {"n_steps": steps},
        "morf": {"n_steps": aopc_steps},
        "lerf": {"n_steps": aopc_steps},
    }


def build_metrics(names: Sequence[str], batch_size: int, steps: int = STEPS, aopc_steps: int = AOPC_STEPS
                  ) -> dict[str, Metric]:
    """The metrics called `names` (`caap.metrics.METRICS` keys) with the tables' settings
    (`metric_settings`); faithfulness metrics run `batch_size` images a forward pass, without a bar."""
    from caap.metrics import METRICS, get_metric

    settings = metric_settings(steps, aopc_steps)
    out = {}
    for name in names:
        kw = dict(settings.get(name, {}))
        if getattr(METRICS[name], "kind", None) == "faithfulness":
            kw.update(batch_size=batch_size, progress=False)
        out[name] = get_metric(name, **kw)
    return out


def metric_key(metric: Metric) -> str:
    """What identifies a metric's values in caches and between scripts: its class and every setting that
    changes its values (not `batch_size` or `progress`)."""
    settings = {k: v for k, v in metric.settings().items() if k not in ("batch_size", "progress")}
    return f"{type(metric).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


def arrow(metric: Metric) -> str:
    """↑ for a metric where higher is better, ↓ otherwise."""
    return "↑" if metric.higher_is_better else "↓"


def header(name: str, metric: Metric) -> str:
    """Column header with the metric's direction, e.g. "insertion ↑"."""
    return f"{name} {arrow(metric)}"


def fmt(mean: float, half: float, digits: int = 3) -> str:
    """"mean ± half-width" (just the mean where the interval is undefined; "n/a" for no value)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: a header row, then one line per row."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], metrics: Mapping[str, Metric]) -> str:
    """Markdown: a row per method, a column per metric ("name ↑/↓"), mean ± 95% CI (Student t,
    `caap.stats.mean_ci`) over the rows of that method (`row["method"]`, one row per image); the best
    mean of each column in bold when there are several methods. Undefined values (NaN) are left out."""
    from caap.stats import mean_ci

    stats = {(me, mt): mean_ci([r[mt] for r in rows if r["method"] == me]) for me in methods for mt in metrics}
    best = {}
    for mt, m in metrics.items():
        means = [stats[(me, mt)][0] for me in methods if not math.isnan(stats[(me, mt)][0])]
        if means:
            best[mt] = max(means) if m.higher_is_better else min(means)
    body = []
    for me in methods:
        cells = []
        for mt in metrics:
            mean, half, _ = stats[(me, mt)]
            text = fmt(mean, half)
            cells.append(f"**{text}**" if len(methods) > 1 and mean == best.get(mt) else text)
        body.append([me, *cells])
    return markdown_table(["method", *(header(mt, m) for mt, m in metrics.items())], body)
