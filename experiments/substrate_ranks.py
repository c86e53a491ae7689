"""Does CAAP's rank against the strongest baselines depend on the faithfulness metric's substrate?

    python experiments/substrate_ranks.py results/benchmark_v2/all_methods/per_image.csv --out results/benchmark_v2

Reads a `benchmark.py` per-image CSV and compares, per family, the same question asked with three
substrates (what stands in for the removed / not yet inserted patches):
    insertion family  insertion (blur: 11x11 Gaussian, sigma 5 px, close to CAAP's default context),
                      token_insertion (no substrate: the tokens are not in the sequence),
                      road_lerf (noisy linear imputation; keeps the most relevant pixels longest)
    deletion family   deletion ("zero": mid-grey), token_deletion (no substrate), road_morf (imputation)
For each metric: CAAP's rank among all methods of the CSV (by mean, 1 = best), the best baselines, and CAAP
minus each of the `--top` strongest baselines (by that metric's mean), paired over images (mean ± 95% CI,
Student t; `+` CAAP better, `-` worse, `=` the interval holds 0). Images where a value is undefined are
left out of that pair. Writes substrate_ranks.md under `--out` and prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import OneLineParser, UsageError, markdown_table, positive, run_main, write_report
from caap.stats import mean_ci

PROG = "substrate_ranks"
FAMILIES = {
    "insertion": [("insertion", "blur", True), ("token_insertion", "none (tokens dropped)", True),
                  ("road_lerf", "noisy linear imputation", True)],
    "deletion": [("deletion", "zero (mid-grey)", False), ("token_deletion", "none (tokens dropped)", False),
                 ("road_morf", "noisy linear imputation", False)],
}


def _main(argv: list[str] | None) -> int:
    import pandas as pd

    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("csv", help="per_image.csv of a benchmark.py run")
    p.add_argument("--out", default=None, help="folder for substrate_ranks.md (default: the CSV's folder)")
    p.add_argument("--top", type=positive, default=3, help="strongest baselines compared per metric (default 3)")
    p.add_argument("--exclude", default="random", help="methods left out of the ranks (default random)")
    args = p.parse_args(argv)
    path = Path(args.csv)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path}")
    df = pd.read_csv(path)
    skip = {m.strip() for m in args.exclude.split(",") if m.strip()}
    df = df[~df["method"].isin(skip)]
    if "caap" not in set(df["method"]):
        raise UsageError(f"{path} has no caap rows")
    wanted = [m for fam in FAMILIES.values() for m, _, _ in fam if m in df.columns]
    if not wanted:
        raise UsageError(f"{path} has none of the metric columns {', '.join(m for f in FAMILIES.values() for m, _, _ in f)}")
    wide = {m: df.pivot_table(index="image", columns="method", values=m, aggfunc="first") for m in wanted}
    methods = sorted(set(df["method"]))
    n_images = df["image"].nunique()
    parts = [f"# CAAP's rank by substrate: {n_images} images, {len(methods)} methods ({path})", ""]
    for family, metrics in FAMILIES.items():
        body = []
        for metric, substrate, higher in metrics:
            if metric not in wide:
                body.append([metric, substrate, "not in the CSV", "", "", ""])
                continue
            w = wide[metric]
            means = w.mean(axis=0, skipna=True)
            order = sorted(methods, key=lambda me: -means[me] if higher else means[me])
            rank = order.index("caap") + 1
            strongest = [me for me in order if me != "caap"][: args.top]
            cells = []
            for me in strongest:
                d = (w["caap"] - w[me]).dropna().to_numpy(dtype=np.float64)
                mean, half, _ = mean_ci(d)
                lo, hi = (mean - half, mean + half) if higher else (-mean - half, -mean + half)
                mark = "+" if lo > 0 else "-" if hi < 0 else "="
                cells.append(f"{me} {mark} {mean:+.3f} ± {half:.3f}")
            body.append([metric, substrate, f"{means['caap']:.3f}", f"{rank}/{len(methods)}",
                         f"{order[0]} {means[order[0]]:.3f}", "; ".join(cells)])
        parts += [f"## {family} family ({'higher' if metrics[0][2] else 'lower'} is better)", "",
                  markdown_table(["metric", "substrate", "CAAP mean", "CAAP rank", "best method",
                                  f"CAAP minus the {args.top} strongest baselines (paired)"], body), ""]
    parts += [(f"Ranks by mean over the images (methods left out: {', '.join(sorted(skip)) or 'none'}); paired: "
               "CAAP minus the baseline per image, mean ± 95% CI (Student t); `+` CAAP better in the metric's "
               "direction, `-` worse, `=` the interval holds 0."), "",
              f"Command: `python experiments/substrate_ranks.py {args.csv}"
              + (f" --top {args.top}" if args.top != 3 else "")
              + (f" --exclude {args.exclude}" if args.exclude != "random" else "") + "`"]
    text = "\n".join(parts) + "\n"
    write_report((Path(args.out) if args.out else path.parent) / "substrate_ranks.md", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
