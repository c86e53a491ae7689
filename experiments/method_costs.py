"""The measured cost per image of every attribution method, as `caap methods` shows it: read off a benchmark
run's per-image CSV (the `runtime_s` column: one method's attribution call over a chunk, divided by its
images) and its settings.json (the cost settings each method ran with), written to
`caap/method_costs.csv` (shipped with the package).

    python experiments/method_costs.py            # from results/benchmark_v2/all_32 (ViT-Tiny, 32 heldout photos)
    python experiments/method_costs.py --run results/benchmark_v2/all_32 --machine "2 CPU cores, no GPU"

Columns: method, model, maps_s_per_image (mean over the run's images), images, settings (the method's
cost settings in that run, JSON; rows per forward pass and seeds left out), machine, source (the run
folder).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OneLineParser, UsageError, run_main, write_text

PROG = "method_costs"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = "results/benchmark_v2/all_32"
OUT = ROOT / "caap" / "method_costs.csv"
NOT_COST = ("internal_batch_size", "batch_size", "seed", "progress")
"""Settings that do not change what a map costs per image in the sense shown (rows per pass, seeds)."""


def costs(run: Path, machine: str) -> list[dict[str, str]]:
    """One row per (model, method) of the run: mean maps seconds per image and the settings it ran with."""
    per_image, settings_file = run / "per_image.csv", run / "settings.json"
    for path in (per_image, settings_file):
        if not path.is_file():
            raise UsageError(f"{path} not found; --run must be a benchmark output folder (per_image.csv, settings.json)")
    settings = json.loads(settings_file.read_text()).get("methods", {})
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    with open(per_image, newline="") as f:
        for row in csv.DictReader(f):
            seconds[(row["model"], row["method"])].append(float(row["runtime_s"]))
    source = run.resolve().relative_to(ROOT).as_posix() if run.resolve().is_relative_to(ROOT) else run.name
    rows = []
    for (model, method), values in seconds.items():
        kept = {k: v for k, v in settings.get(method, {}).items() if k not in NOT_COST}
        rows.append({"method": method, "model": model, "maps_s_per_image": f"{sum(values) / len(values):.4f}",
                     "images": str(len(values)), "settings": json.dumps(kept, sort_keys=True), "machine": machine,
                     "source": source})
    return rows


def _main(argv: list[str] | None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--run", default=DEFAULT_RUN, help=f"benchmark output folder (default {DEFAULT_RUN})")
    p.add_argument("--machine", default="2 CPU cores, no GPU", help="where the run was measured (a column)")
    p.add_argument("--out", default=str(OUT), help="CSV to write (default caap/method_costs.csv)")
    args = p.parse_args(argv)
    run = Path(args.run) if Path(args.run).is_absolute() else ROOT / args.run
    rows = costs(run, args.machine)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(Path(args.out), buf.getvalue())
    for r in rows:
        print(f"{r['method']:<24} {float(r['maps_s_per_image']):8.3f} s / image  {r['settings']}")
    shown = Path(args.out).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"wrote {shown} ({len(rows)} methods, {rows[0]['model']}, {args.machine})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
