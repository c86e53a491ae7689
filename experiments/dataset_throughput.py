"""Throughput of `caap explain-dataset`: the single-process path against Ray Data with 1 and 2 workers.
Each configuration explains the same heldout photos from scratch into its own folder; the
time is end to end (model loading and, for Ray, starting the local cluster included), as a user sees it.

    python experiments/dataset_throughput.py --limit 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import positive, write_report
from caap.data import DEFAULT_MODEL, VAL_BOXES, shared_data_dir
from caap.dataset import DatasetSettings, explain_dataset, read_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--limit", type=positive, default=100)
    p.add_argument("--split", default="heldout")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/dataset")
    args = p.parse_args(argv)
    data = shared_data_dir(VAL_BOXES)
    if data is None:
        print("dataset_throughput: error: the shared photos are absent (set CAAP_SHARED_DIR)", file=sys.stderr)
        return 2
    # the precision asked for is the one measured, native bf16 or not
    settings = DatasetSettings(model=args.model, precision=args.precision, device=args.device, allow_slow_bf16=True)
    configs = [("single process", {}), ("Ray Data, 1 worker", {"ray": True, "workers": 1}),
               ("Ray Data, 2 workers", {"ray": True, "workers": 2})]
    rows, maps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in configs:
            t0 = time.perf_counter()
            summary = explain_dataset(data, Path(tmp) / name.replace(" ", "_").replace(",", ""), settings,
                                      split=args.split, limit=args.limit, progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            frame = read_results(summary["folder"])
            maps[name] = np.stack(frame["map"].to_numpy())
            rows.append((name, summary["explained"], seconds))
            print(f"{name}: {summary['explained']} images in {seconds:.1f} s", file=sys.stderr)
            if kwargs.get("ray"):
                import ray

                ray.shutdown()  # each Ray configuration starts its own local cluster, as a user's run does
    base = rows[0][2]
    diff = {name: float(np.abs(maps[name] - maps[configs[0][0]]).max()) for name, _ in configs}
    lines = [(f"{args.limit} {args.split} photos, {args.model}, CAAP defaults, precision {args.precision}, "
             f"device {args.device}; end-to-end seconds (model loading and Ray start-up included)"), "",
             "| path | images | seconds | images / s | vs single process | max abs map difference vs single process |",
             "|---|---|---|---|---|---|"]
    for name, n, seconds in rows:
        lines.append(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.3f} | {base / seconds:.2f}x | {diff[name]:.1e} |")
    write_report(Path(args.out) / f"throughput_{args.device.split(':')[0]}_{args.precision}.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
