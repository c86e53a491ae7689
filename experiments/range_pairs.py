"""CAAP's layer ranges against each other, paired over images, from an ablation run's per-image values.

    python experiments/range_pairs.py results/ablation_v2/ablation_per_image.csv --a mid --b late

For every context and component of `ablation.py`'s `ablation_per_image.csv` that has both ranges, and every
metric column: range `--a` minus range `--b`, per image, mean ± 95% CI (Student t), marked `+` where `--a`
is better in the metric's direction (the interval excludes 0), `-` where it is worse, `=` otherwise. The
direction of each metric is the registered metric's (`caap.metrics.METRICS`). Writes range_pairs.md next
to the CSV (or under `--out`) and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import OneLineParser, UsageError, markdown_table, run_main, write_report
from caap.metrics import METRICS
from caap.stats import mean_ci

PROG = "range_pairs"


def _main(argv: list[str] | None) -> int:
    import pandas as pd

    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("csv", help="ablation_per_image.csv of an ablation.py run")
    p.add_argument("--a", default="mid", help="first range (default mid)")
    p.add_argument("--b", default="late", help="second range (default late)")
    p.add_argument("--out", default=None, help="folder for range_pairs.md (default: the CSV's folder)")
    args = p.parse_args(argv)
    path = Path(args.csv)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    df = pd.read_csv(path)
    metrics = [c for c in df.columns if c in METRICS]
    if not metrics:
        raise UsageError(f"{path} has no metric columns")
    for r in (args.a, args.b):
        if r not in set(df["range"]):
            raise UsageError(f"range {r!r} is not in {path} (it has {', '.join(sorted(set(df['range'])))})")
    body = []
    for (comp, ctx), g in df.groupby(["component", "context"], sort=False):
        a = g[g["range"] == args.a].set_index("image")
        b = g[g["range"] == args.b].set_index("image")
        if a.empty or b.empty:
            continue
        images = a.index.intersection(b.index)
        cells = []
        for mt in metrics:
            d = (a.loc[images, mt] - b.loc[images, mt]).dropna().to_numpy(dtype=np.float64)
            mean, half, _ = mean_ci(d)
            sign = 1 if METRICS[mt].higher_is_better else -1
            lo, hi = sign * mean - half, sign * mean + half
            mark = "+" if lo > 0 else "-" if hi < 0 else "="
            cells.append(f"{mark} {mean:+.3f} ± {half:.3f}")
        body.append([f"{ctx} ({comp}), {len(images)} images", *cells])
    if not body:
        raise UsageError(f"no context of {path} has both ranges {args.a!r} and {args.b!r}")
    heads = [f"{mt} {'↑' if METRICS[mt].higher_is_better else '↓'}" for mt in metrics]
    text = "\n".join([
        f"# CAAP, range {args.a} minus range {args.b}, paired over images ({path})", "",
        markdown_table([f"{args.a} minus {args.b}", *heads], body), "",
        (f"Per image, mean ± 95% CI (Student t); `+`: {args.a} better in the metric's direction (the interval "
         f"excludes 0), `-`: {args.b} better, `=`: the interval holds 0."), "",
        f"Command: `python experiments/range_pairs.py {args.csv} --a {args.a} --b {args.b}`",
    ]) + "\n"
    write_report((Path(args.out) if args.out else path.parent) / "range_pairs.md", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
