"""Choose CAAP's defaults (neutral context x layer range) by measuring on the `dev` split.

For every (context, layer range) this computes CAAP maps for the first `--limit` images of the split
(target = the true class) and scores them with the pointing game (15 px tolerance) and box energy on the
ImageNet boxes. Maps are saved (one .npz per setting) so that other experiments can reuse them.

    python experiments/caap_defaults.py --split dev --limit 64 --contexts mean --ranges early,mid,late
    python experiments/caap_defaults.py --split dev --limit 64 --contexts grey,blur,zero --ranges late \
        --name caap_defaults_dev_contexts

The README's defaults came from these two commands, a two-stage search to fit the CPU budget: first the
layer range with the mean context (the context the authors mention), then the context at the best range.

Prints a markdown table (mean and Student-t 95% confidence interval per setting, `caap.stats.mean_ci`)
and writes it with a CSV.
Ranges are named for a model of depth n: early = blocks [0, n/3), mid = [n/3, 2n/3), late = [2n/3, n),
all = [0, n) (0-indexed, inclusive ends in the table).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from tqdm.auto import tqdm

from _common import named_ranges, write_report
from caap import CAAP
from caap.contexts import get_context
from caap.data import DEFAULT_MODEL, VAL_BOXES, load_manifest, sample_mask, shared_data_dir
from caap.metrics import BoxEnergy, PointingGame
from caap.models import load_model
from caap.stats import mean_ci


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="manifest folder (default: the shared imagenet_val1300_boxes)")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=120)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--contexts", default="mean,grey,blur,zero")
    p.add_argument("--ranges", default="early,mid,late")
    p.add_argument("--images-per-call", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="results/caap_defaults")
    p.add_argument("--name", default=None, help="base name of the table files (default caap_defaults_<split>)")
    args = p.parse_args(argv)

    data = Path(args.data) if args.data else shared_data_dir(VAL_BOXES)
    if data is None:
        print("caap_defaults: no data folder: pass --data or set CAAP_SHARED_DIR", file=sys.stderr)
        return 2
    samples = load_manifest(data, split=args.split, limit=args.limit)
    model = load_model(args.model, args.checkpoint)
    ranges = named_ranges(model.cfg.n_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = torch.cat([model.preprocess([s.path]) for s in samples])
    masks = torch.stack([sample_mask(s, model.data_config) for s in samples])
    targets = torch.tensor([s.class_index for s in samples])
    pointing, energy = PointingGame(), BoxEnergy()

    rows = []
    for ctx_name in args.contexts.split(","):
        context = get_context(ctx_name, model)
        for range_name in args.ranges.split(","):
            layers = ranges[range_name]
            cache = out / f"maps_{ctx_name}_{range_name}_{args.split}_{len(samples)}.npz"
            t0 = time.perf_counter()
            if cache.is_file():
                maps = torch.from_numpy(np.load(cache)["maps"])
            else:
                method = CAAP(model, layers=layers, context=context, batch_size=args.batch_size)
                chunks = []
                k = args.images_per_call
                for i in tqdm(range(0, len(samples), k), desc=f"{ctx_name} {range_name}", leave=False):
                    chunks.append(method.attribute(pixels[i : i + k], target=targets[i : i + k]))
                maps = torch.cat(chunks)
                np.savez_compressed(cache, maps=maps.numpy(), files=[s.name for s in samples])
            seconds = time.perf_counter() - t0
            pg = pointing(None, pixels, maps, masks=masks).numpy()
            be = energy(None, pixels, maps, masks=masks).numpy()
            (pg_m, pg_ci, _), (be_m, be_ci, _) = mean_ci(pg), mean_ci(be)
            rows.append(dict(context=ctx_name, range=range_name, layers=f"{layers[0]}-{layers[1]}",
                             pointing_game=pg_m, pointing_game_ci=pg_ci, box_energy=be_m, box_energy_ci=be_ci,
                             n=len(samples), seconds=seconds))
            print(f"{ctx_name:6s} {range_name:6s} pointing {pg_m:.3f} ± {pg_ci:.3f}  energy {be_m:.3f} ± {be_ci:.3f}",
                  flush=True)

    name = args.name or f"caap_defaults_{args.split}"
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"CAAP settings on the `{args.split}` split (first {len(samples)} images), {args.model}, target = true class",
        "",
        "| context | range | blocks | pointing game | box energy |",
        "|---|---|---|---|---|",
    ]
    best = max(rows, key=lambda r: (r["pointing_game"], r["box_energy"]))
    for r in rows:
        mark = " **(best)**" if r is best else ""
        lines.append(f"| {r['context']} | {r['range']} | {r['layers']} | {r['pointing_game']:.3f} ± "
                     f"{r['pointing_game_ci']:.3f}{mark} | {r['box_energy']:.3f} ± {r['box_energy_ci']:.3f} |")
    lines.append("")
    lines.append(f"Command: python experiments/caap_defaults.py --split {args.split} --limit {args.limit} "
                 f"--contexts {args.contexts} --ranges {args.ranges}" + (f" --name {args.name}" if args.name else ""))
    table = "\n".join(lines)
    write_report(out / f"{name}.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
