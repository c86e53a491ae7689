"""How many steps do the insertion / deletion AUCs need? The AUC at 8 / 28 / 49 equal steps against the
AUC at 196 one-patch steps, per image, on real photos and real maps.

    python experiments/metric_steps.py --limit 32 --methods caap,gae,input_x_gradient --out results/metric_steps

For every image of the first `--limit` of the split (target = the true class) and every method, the
curves of insertion (blur substrate), deletion ("zero" substrate), token insertion and token deletion
(no substrate) are measured at every patch count 0..196 (ViT-Tiny, 14x14 grid); the AUC at k steps uses
the counts round(t * 196 / k), t = 0..k, of the same curve (what the metric at `n_steps=k` computes: the
counts are a subset, the passes are shared by `caap.metrics.Evaluator`). Reported per metric and step
count: the mean and the largest absolute difference from the 196-step AUC over images x methods, and the
smallest step count whose mean absolute difference is under `--tolerance` (default 0.005).

Substrates (normalised input space, ViT-Tiny AugReg: mean = std = 0.5 per channel): "blur" = the image
convolved with an 11x11 Gaussian of sigma 5 px, zero padding (`hooked_vit.preprocess.gaussian_blur`);
"zero" = 0 in the normalised space = unit-RGB 0.5, i.e. mid-grey (the dataset-mean colour, RISE's choice;
black would be unit-RGB 0). Token metrics drop tokens and need no substrate.

Outputs under `--out`: metric_steps.md (the table, also printed) and metric_steps.csv (per image x method
x metric: the AUC at every step count). Resumable: every chunk of `--batch-size` images is cached under
`--out/cache` (keyed by the settings); a second run with the same flags (or a smaller `--limit`) reads the
finished chunks and computes the rest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import (
    METHOD_NAMES,
    OneLineParser,
    UsageError,
    add_data_flags,
    load_chunk,
    load_samples,
    make_method,
    markdown_table,
    method_settings,
    positive,
    run_main,
    split_list,
    write_report,
)
from caap.contexts import weights_fingerprint
from caap.metrics import Deletion, Evaluator, Insertion, TokenDeletion, TokenInsertion
from caap.models import load_model

PROG = "metric_steps"
METHODS = METHOD_NAMES
FAMILIES = {"insertion": Insertion, "deletion": Deletion, "token_insertion": TokenInsertion,
            "token_deletion": TokenDeletion}


def parse_steps(text: str, n_cells: int) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"--steps must be whole numbers separated by commas, got {text!r}") from None
    bad = [s for s in steps if not 1 <= s < n_cells]
    if bad or not steps:
        raise UsageError(f"--steps {bad or text!r}: each must be between 1 and {n_cells - 1} "
                         f"({n_cells}, one patch a step, is the reference)")
    return steps


def _main(argv: list[str] | None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    add_data_flags(p, limit=32)
    p.add_argument("--methods", default="caap,gae,input_x_gradient", help=f"comma list: {', '.join(METHODS)}")
    p.add_argument("--metrics", default=",".join(FAMILIES), help=f"comma list: {', '.join(FAMILIES)}")
    p.add_argument("--steps", default="8,28,49", help="step counts compared with one patch a step (default 8,28,49)")
    p.add_argument("--tolerance", type=float, default=0.005, help="mean absolute AUC error accepted (default 0.005)")
    p.add_argument("--batch-size", type=positive, default=8, help="images per chunk (default 8)")
    p.add_argument("--forward-batch", type=positive, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/metric_steps", help="output folder (default results/metric_steps)")
    args = p.parse_args(argv)
    methods = split_list(args.methods, METHODS, "method", ["caap"])
    families = split_list(args.metrics, list(FAMILIES), "metric", list(FAMILIES))
    _, samples = load_samples(args.data, args.split, args.limit)
    try:
        model = load_model(args.model, args.checkpoint, device=args.device).eval()
    except (RuntimeError, OSError) as e:
        raise UsageError(f"could not load model {args.model!r}: {e}") from e
    n_cells = model.cfg.grid_size[0] * model.cfg.grid_size[1]
    steps = parse_steps(args.steps, n_cells)
    all_steps = [*steps, n_cells]
    metrics = {f"{fam}@{k}": FAMILIES[fam](n_steps=k, batch_size=args.forward_batch, progress=False)
               for fam in families for k in all_steps}
    kw = method_settings(args.forward_batch, args.seed)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    seconds = 0.0  # compute time of every chunk, cached ones included
    key = hashlib.sha1(json.dumps([args.model, weights_fingerprint(model), args.split, methods, families, all_steps,
                                   args.seed]).encode()).hexdigest()[:10]  # another checkpoint: another cache
    cache = Path(args.out) / "cache" / key
    cache.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), args.batch_size):
        part = samples[start : start + args.batch_size]
        path = cache / f"{args.split}_{start:05d}-{start + len(part):05d}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("images") == [s.name for s in part]:
                rows += saved["rows"]
                seconds += float(saved.get("seconds", 0.0))
                continue
        t_chunk = time.perf_counter()
        chunk = load_chunk(model, part, 0, start)
        new: list[dict[str, Any]] = []
        ev = Evaluator(model, chunk.pixels, chunk.targets, batch_size=args.forward_batch)
        for method in methods:
            obj = make_method(method, model, kw)
            maps = obj.attribute(chunk.pixels, target=chunk.targets).detach().float()
            values = ev.evaluate(maps, metrics)
            for j, s in enumerate(chunk.samples):
                for fam in families:
                    new.append({"image": s.name, "method": method, "metric": fam,
                                **{str(k): float(values[f"{fam}@{k}"][j]) for k in all_steps}})
        tmp = path.with_name(path.name + ".tmp")
        seconds += time.perf_counter() - t_chunk
        tmp.write_text(json.dumps({"images": [s.name for s in part], "rows": new,
                                   "seconds": time.perf_counter() - t_chunk}))
        os.replace(tmp, path)
        rows += new
        print(f"{start + len(chunk.samples)}/{len(samples)} images, {time.perf_counter() - t0:.0f} s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metric_steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    body, chosen = [], {}
    for fam in families:
        rs = [r for r in rows if r["metric"] == fam]
        ref = np.array([r[str(n_cells)] for r in rs])
        for k in steps:
            err = np.abs(np.array([r[str(k)] for r in rs]) - ref)
            if fam not in chosen and err.mean() < args.tolerance:
                chosen[fam] = k
            body.append([fam, k, f"{err.mean():.4f}", f"{err.max():.4f}", f"{np.array([r[str(k)] for r in rs]).mean():.3f}"])
        body.append([fam, f"{n_cells} (reference)", "", "", f"{ref.mean():.3f}"])
    n = len(samples)
    table = markdown_table(["metric", "steps", "mean abs. difference", "max abs. difference", "mean AUC"], body)
    verdict = "; ".join(f"{fam}: {chosen.get(fam, f'none of {steps} (use {n_cells})')}" for fam in families)
    text = "\n".join([
        (f"# AUC step counts: {n} photos of `{args.split}` x {len(methods)} methods ({', '.join(methods)}), "
        f"{args.model}, target = the true class"), "",
        table, "",
        (f"Difference: the AUC at k equal steps minus the AUC at {n_cells} one-patch steps, per image and method "
         f"({n * len(methods)} pairs). Smallest step count with a mean absolute difference under {args.tolerance}: "
         f"{verdict}."), "",
        ("Substrates: insertion starts from the image blurred by an 11x11 Gaussian of sigma 5 px (zero padding); "
         "deletion fills with 0 in the normalised input, unit-RGB 0.5 = mid-grey for this model (mean = std = 0.5); "
         "token metrics drop the patch tokens (no substrate)."), "",
        (f"Command: `python experiments/metric_steps.py --limit {args.limit} --methods {','.join(methods)} "
         f"--metrics {','.join(families)} --steps {','.join(map(str, steps))}`"),
        (f"Computed in {seconds:.0f} s (wall, the sum over chunks, on {args.device}; this machine's load varies: "
         "2 shared CPU cores)."),
    ])
    write_report(out / "metric_steps.md", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
