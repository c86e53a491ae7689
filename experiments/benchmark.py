"""Benchmark: attribution methods x models x metrics on a manifest folder (default: the `heldout` split of
the shared imagenet_val1300_boxes).

    python experiments/benchmark.py --estimate --out results/benchmark        # time a few images first
    python experiments/benchmark.py --out results/benchmark                   # everything: ~5.3 h on 2 CPU cores
    python experiments/benchmark.py --methods caap,rollout,rise --metrics insertion,deletion --limit 50
    python experiments/benchmark.py --metrics token_deletion,token_insertion,road_morf,road_lerf --shard 1/4

The table in the README (651 heldout images in 45 minutes on 2 CPU cores) is

    python experiments/benchmark.py --methods caap,random,rollout,gae,attention_gradcam,gradsam,gradcam,\
        input_x_gradient,integrated_gradients,smoothgrad --metrics pointing_game,box_energy,iou,f1,insertion,\
        deletion --steps 8 --ig-steps 8 --smoothgrad-samples 8

Target: the TRUE class of every image (the `class_index` of the manifest), for every method and metric,
whether or not the model predicts it (the CSV says whether it does: `predicted`, `correct`).

Methods: "caap" is `CAAP(model)` with its defaults (`caap.attribution.caap`: `DEFAULT_CONTEXT`,
`default_layers`, the residual stream, the logit_diff score; summary.md names them); every other name
is a `caap.baselines` entry, with the cost settings of `_common.method_settings` (documented there: RISE masks,
IG steps, SmoothGrad samples).
Metrics: every `caap.metrics` entry, with the step settings of `_common.metric_settings` (documented
there): `--steps` sets insertion, deletion, token_insertion and token_deletion (1 to the number of
patches; equal steps at its divisors). The cost of both is what `--estimate` measures and extrapolates
to the full run.

In parts: `--shard I/N` computes only the chunks I, I+N, I+2N, ... (chunk = `--batch-size` images; I from
1 to N) into the cache and the chunk stores and writes no table; shards may run one after another or at once (in separate
processes or on separate machines sharing `--out`), with the same flags. A run without `--shard` then
reads every cached chunk, computes whatever is still missing, and writes the tables. An interrupted run
loses at most the chunk in progress.

Outputs under `--out`:
    per_image.csv      one row per image x method x model: a column per metric, the method's runtime
                       per image (`runtime_s`, maps only; `metric_s`: its metrics), the prediction
    summary.md         mean and 95% confidence interval (Student t) per method x metric, the direction
                       of each metric in its header ("insertion ↑"); also printed
    runtime.md         seconds per image per method (maps and metrics)
    bar_<metric>.png   a bar chart per metric (mean, 95% CI); bars.html: all of them, interactive
    examples_<model>.png   overlays: methods (rows) x the first `--grid-images` images (columns)
    chunks/            one small CSV per (model, method, chunk of `--batch-size` images): the per-image scores
                       (`_common.ChunkScores`), meant to be committed, so that a long run continues on another
                       machine; `--import-table` fills them from an earlier run's per_image.csv
    cache/             one file per (model, method, chunk) of maps, and the clean logits: a second run skips
                       every finished chunk (resumable)
    estimate.md        with `--estimate`: the measured cost per method and per metric, extrapolated

Speed (the reported table is 651 images on a 2-core CPU): images go in chunks of `--batch-size`; every
forward pass is batched (`--forward-batch` rows); the clean logits of each image are computed once and
shared by every method and metric; faithfulness metrics share the forward passes they can (see
`caap.metrics.Evaluator`) and use coarser steps than their papers (see `_common.metric_settings`).

Measured cost (`--estimate 3`, ViT-Tiny, 2-core CPU shared with other jobs; "idle" = CPU seconds / 2
threads, a lower bound for an idle machine; 1 plain forward pass = 47 CPU ms per image), for 651 images:

    maps     caap 19 min (its default blocks 8-11, blur context; 37 min with blocks 4-7), occlusion
             47 min, atman 61 min, rise (500 masks) 2.1 h, integrated_gradients (16 steps) 10 min,
             smoothgrad (16 samples) 9 min, the seven others 19 min together;
    metrics  79 forward passes per image and method: ~19 min per method, 4.1 h for 13 methods
             (insertion, deletion, morf, lerf ~3.4 min each per method; the Chefer tests ~2.2 min;
             the four localisation metrics ~9 s together);
    total    ~9 h idle (~27 h at the load of the moment), so the default protocol (13 methods x 10
             metrics) does not fit in an hour on this machine: choose with `--methods`, `--metrics`, `--steps`
             and the cost flags, priced by `--estimate`.
A later `--estimate 4` on an idle machine measured less: 5.3 h for the full protocol (CAAP 13 min, RISE
70 min, AtMan 33 min, occlusion 28 min, IG 18 min; all ten metrics 2.4 h for 13 methods).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from tqdm.auto import tqdm

from _common import (
    AOPC_STEPS,
    IG_STEPS,
    METHOD_NAMES,
    RISE_MASKS,
    SMOOTHGRAD_SAMPLES,
    STEPS,
    ChunkScores,
    OneLineParser,
    UsageError,
    arrow,
    build_metrics,
    header,
    input_frame_boxes,
    load_cached_maps,
    load_chunk,
    load_samples,
    markdown_table,
    method_settings,
    method_tag,
    metric_key,
    positive,
    run_main,
    safe_name,
    save_maps,
    scores_for_chunk,
    seconds_text,
    split_list,
    write_text,
)
from _common import (
    make_method as make_named_method,
)
from caap.attribution import AttributionMethod
from caap.attribution.caap import DEFAULT_CONTEXT, default_layers
from caap.contexts import weights_fingerprint
from caap.data import DEFAULT_MODEL, class_name
from caap.metrics import METRICS, Evaluator, Metric
from caap.metrics.protocol import summary_table as protocol_summary_table
from caap.models import load_model
from caap.stats import mean_ci

Tensor = torch.Tensor

PROG = "benchmark"
METHODS = METHOD_NAMES

def settings_of(args: Any) -> dict[str, dict[str, Any]]:
    """`method_settings` with this run's flags."""
    return method_settings(args.forward_batch, args.seed, args.rise_masks, args.ig_steps, args.smoothgrad_samples,
                           getattr(args, "tis_masks", None))


def make_method(name: str, model: Any, args: Any) -> AttributionMethod:
    return make_named_method(name, model, settings_of(args))


def parse_args(argv: list[str] | None) -> Any:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="manifest folder (default: the shared imagenet_val1300_boxes)")
    p.add_argument("--out", default="results/benchmark", help="output folder (default results/benchmark)")
    p.add_argument("--split", default="heldout", help="manifest split (default heldout)")
    p.add_argument("--limit", type=positive, default=None, help="first N images of the split (default all)")
    p.add_argument("--methods", default=None, help=f"comma list (default all): {', '.join(METHODS)}")
    p.add_argument("--metrics", default=None, help=f"comma list (default all): {', '.join(METRICS)}")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name(s), comma list")
    p.add_argument("--checkpoint", default=None,
                   help="weights file(s), comma list matching --model (default $CAAP_CHECKPOINT_DIR/<name>.pth)")
    p.add_argument("--batch-size", type=positive, default=16,
                   help="images per chunk: one attribution call and one cache file per method (default 16)")
    p.add_argument("--forward-batch", type=positive, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of random, RISE and SmoothGrad (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--steps", type=positive, default=STEPS, help=f"insertion/deletion steps (default {STEPS})")
    p.add_argument("--aopc-steps", type=positive, default=AOPC_STEPS,
                   help=f"MoRF/LeRF single-patch steps (default {AOPC_STEPS})")
    p.add_argument("--rise-masks", type=positive, default=RISE_MASKS, help=f"RISE masks (default {RISE_MASKS})")
    p.add_argument("--ig-steps", type=positive, default=IG_STEPS, help=f"IG steps (default {IG_STEPS})")
    p.add_argument("--smoothgrad-samples", type=positive, default=SMOOTHGRAD_SAMPLES,
                   help=f"SmoothGrad samples (default {SMOOTHGRAD_SAMPLES})")
    p.add_argument("--tis-masks", type=positive, default=None,
                   help="TIS masks (default the paper's 1024; each costs a forward pass at half the tokens)")
    p.add_argument("--grid-images", type=int, default=4, help="images in the overlay grid (default 4; 0: none)")
    p.add_argument("--estimate", type=positive, nargs="?", const=4, default=None, metavar="N",
                   help="time N images (default 4) per method and metric, extrapolate the full run, and stop")
    p.add_argument("--reference", type=lambda t: [v.strip() for v in t.split(",") if v.strip()], default=["caap"],
                   help="comma list of methods to pair against every other method in summary.md (default caap)")
    p.add_argument("--import-table", action="append", default=[], metavar="DIR",
                   help="first fill the chunks' score stores from an earlier run's per_image.csv + settings.json (the "
                        "methods whose settings, the metrics whose settings and the chunks whose images match "
                        "this run's; repeatable)")
    p.add_argument("--shard", type=shard, default=None, metavar="I/N",
                   help="compute only chunks I, I+N, I+2N, ... (1 <= I <= N) into the cache and write no table")
    return p.parse_args(argv)


def shard(text: str) -> tuple[int, int]:
    """`--shard I/N` -> (I, N), 1 <= I <= N."""
    import argparse

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 1/4)") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be between 1 and N (e.g. 1/4 ... 4/4)")
    return i, n


STEP_METRICS = ("insertion", "deletion", "token_insertion", "token_deletion")


def check_steps(model: Any, steps: int, metrics: dict[str, Metric]) -> None:
    """`--steps` against the model's patch grid, before any work: at least one patch a step."""
    used = [m for m in metrics if m in STEP_METRICS]
    n = int(model.cfg.grid_size[0] * model.cfg.grid_size[1])
    if used and steps > n:
        divisors = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        raise UsageError(f"--steps {steps} is more than the {n} patches of the model's grid ({', '.join(used)} "
                         f"change at least one patch a step); accepted: 1..{n}, equal steps at {divisors}")


def resolve_inputs(args: Any) -> tuple[list[str], dict[str, Metric], list[Any], list[tuple[str, str | None]]]:
    methods = split_list(args.methods, METHODS, "method", METHODS)
    metric_names = split_list(args.metrics, list(METRICS), "metric", list(METRICS))
    metrics = build_metrics(metric_names, args.forward_batch, args.steps, args.aopc_steps)
    _, samples = load_samples(args.data, args.split, args.limit)
    names = [m.strip() for m in args.model.split(",") if m.strip()]
    ckpts: list[str | None] = [None] * len(names)
    if args.checkpoint:
        ckpts = [c.strip() for c in args.checkpoint.split(",")]
    if len(ckpts) != len(names):
        raise UsageError(f"--checkpoint names {len(ckpts)} files for {len(names)} models")
    return methods, metrics, samples, list(zip(names, ckpts))


def open_model(name: str, checkpoint: str | None, device: str) -> Any:
    try:
        model = load_model(name, checkpoint, device=device)
    except (RuntimeError, OSError) as e:
        raise UsageError(f"could not load model {name!r}: {e}") from e
    return model.eval()


# ---------------------------------------------------------------------------------------------- the run
def run_model(model: Any, name: str, methods: list[str], metrics: dict[str, Metric], samples: list[Any],
              args: Any, out: Path) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Per-image rows for one model, and the first images' maps per method (for the overlay grid)."""
    cache = out / "cache" / safe_name(f"{name}-weights{weights_fingerprint(model)}")  # another checkpoint: another cache
    for table in args.import_table:
        import_table(Path(table), name, out / "chunks" / cache.name, methods, metrics, samples, args)
    objects: dict[str, AttributionMethod] = {}
    rows: list[dict[str, Any]] = []
    grid_maps: dict[str, Any] = {}
    starts = list(enumerate(range(0, len(samples), args.batch_size)))
    if args.shard is not None:
        i, n = args.shard
        starts = [(ci, start) for ci, start in starts if ci % n == i - 1]
    bar = tqdm(total=len(starts) * len(methods), desc=name.split(".")[0], unit="chunk")
    for ci, start in starts:
        chunk = load_chunk(model, samples[start : start + args.batch_size], ci, start)
        clean = clean_logits(model, chunk, cache / "clean" / f"{args.split}_{chunk.tag}.npz", args.forward_batch)
        probs = clean.softmax(-1)
        evaluators: list[Evaluator] = []

        def evaluator() -> Evaluator:  # made when a metric is first missing from the cache
            if not evaluators:
                evaluators.append(Evaluator(model, chunk.pixels, chunk.targets, chunk.masks, clean, args.forward_batch))
            return evaluators[0]

        for method in methods:
            bar.set_postfix_str(f"{method} images {chunk.tag}")
            tag = method_tag(method, settings_of(args))
            path = cache / "maps" / tag / f"{args.split}_{chunk.tag}.npz"
            store_path = out / "chunks" / cache.name / tag / f"{args.split}_{chunk.tag}.csv"
            store = ChunkScores.load(store_path, chunk.files)
            hit = load_cached_maps(path, chunk.files)
            seconds = None
            if hit is None and (store.missing(metrics) or store.maps_s is None):
                if method not in objects:
                    objects[method] = make_method(method, model, args)
                t0 = time.perf_counter()
                maps = objects[method].attribute(chunk.pixels, target=chunk.targets).detach().float().cpu()
                seconds = time.perf_counter() - t0
                save_maps(path, maps, chunk.files, seconds)
            elif hit is not None:
                maps, seconds = hit
            else:  # every score is kept in the chunk's store: no maps needed
                maps = None
            values, metric_seconds = scores_for_chunk(store_path, chunk, maps, metrics, evaluator, seconds)
            seconds = ChunkScores.load(store_path, chunk.files).maps_s
            seconds = float("nan") if seconds is None else seconds
            have = grid_maps.get(method)
            if maps is not None and args.grid_images > 0 and (have is None or len(have) < args.grid_images):
                more = maps[: args.grid_images - (0 if have is None else len(have))]
                grid_maps[method] = more if have is None else torch.cat([have, more])
            n = len(chunk.samples)
            for j, s in enumerate(chunk.samples):
                t = int(chunk.targets[j])
                rows.append({
                    "model": name, "method": method, "split": args.split, "image": s.name, "class_index": s.class_index,
                    "class_name": class_name(s.class_index), "predicted": int(clean[j].argmax()),
                    "correct": int(int(clean[j].argmax()) == t), "target_prob": float(probs[j, t]),
                    "runtime_s": seconds / n, "metric_s": metric_seconds / n,
                    **{m: float(values[m][j]) for m in metrics},
                })
            bar.update(1)
    bar.close()
    return rows, grid_maps


def import_table(table: Path, name: str, store_dir: Path, methods: list[str], metrics: dict[str, Metric],
                 samples: list[Any], args: Any) -> None:
    """Fill missing chunk stores (`ChunkScores`) from an earlier benchmark run's `per_image.csv` and
    `settings.json`: only the methods run with this run's settings, the metrics with this run's settings
    (`metric_key`) and the chunks all of whose images that run scored; the values are copied as written
    (the CSV keeps every float exactly). Nothing already in a store is overwritten."""
    try:
        settings = json.loads((table / "settings.json").read_text())
        with open(table / "per_image.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["model"] == name and r["split"] == args.split]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--import-table {table}: needs a benchmark's per_image.csv and settings.json ({e})") from e
    ours = settings_of(args)
    same_metrics = {n: m for n, m in metrics.items() if settings.get("metrics", {}).get(n) == metric_key(m)}
    by = {(r["method"], r["image"]): r for r in rows}
    copied = 0
    for method in methods:
        if method not in settings.get("methods", {}) or settings["methods"][method] != ours.get(method, {}):
            continue
        tag = method_tag(method, ours)
        for start in range(0, len(samples), args.batch_size):
            chunk_samples = samples[start : start + args.batch_size]
            found = [by.get((method, s.name)) for s in chunk_samples]
            if any(r is None for r in found):
                continue
            files = [s.name for s in chunk_samples]
            tag_c = f"{start:05d}-{start + len(chunk_samples):05d}"
            store = ChunkScores.load(store_dir / tag / f"{args.split}_{tag_c}.csv", files)
            new = {n: m for n, m in store.missing(same_metrics).items()}
            if not new:
                continue
            for n, m in new.items():
                store.scores[metric_key(m)] = [float(r[n]) for r in found]
            if store.maps_s is None:
                store.maps_s = sum(float(r["runtime_s"]) for r in found)
            store.metric_s += sum(float(r["metric_s"]) for r in found)
            store.save()
            copied += 1
    print(f"--import-table {table}: {copied} (method, chunk) stores filled", flush=True)


def clean_logits(model: Any, chunk: Any, path: Path, batch: int) -> Tensor:
    """The unperturbed logits of a chunk's images, once (cached with the maps)."""
    hit = load_cached_maps(path, chunk.files)
    if hit is not None:
        return hit[0].to(chunk.pixels.device)
    with torch.inference_mode():
        logits = torch.cat([model(chunk.pixels[i : i + batch]) for i in range(0, len(chunk.samples), batch)])
    save_maps(path, logits.float().cpu(), chunk.files, 0.0)
    return logits.float()


# ---------------------------------------------------------------------------------------------- outputs
def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def summary_table(rows: list[dict[str, Any]], methods: list[str], metrics: dict[str, Metric], model: str) -> str:
    """Markdown: a row per method, a column per metric ("name ↑/↓"), mean ± 95% CI; best in bold
    (`caap.metrics.protocol.summary_table` over this model's rows)."""
    return protocol_summary_table([r for r in rows if r["model"] == model], methods, metrics)


def paired_differences(rows: list[dict[str, Any]], a: str, b: str, metric: str, model: str) -> np.ndarray:
    """Per image, method `a`'s value minus method `b`'s, over the images where both are defined."""
    per = {(r["method"], r["image"]): r for r in rows if r["model"] == model}
    images = [r["image"] for r in rows if r["model"] == model and r["method"] == a]
    d = np.array([per[(a, i)][metric] - per[(b, i)][metric] for i in images if (b, i) in per], dtype=np.float64)
    return d[np.isfinite(d)]


def leaders(rows: list[dict[str, Any]], methods: list[str], metrics: dict[str, Metric], model: str
            ) -> dict[str, dict[str, str]]:
    """Per metric: the method with the best mean ("best") and the methods tied with it ("tied": the paired 95%
    interval of their difference to the best holds 0); {metric: {method: "best" | "tied"}}."""
    out: dict[str, dict[str, str]] = {}
    for mt, m in metrics.items():
        means = {me: mean_ci([r[mt] for r in rows if r["method"] == me and r["model"] == model])[0] for me in methods}
        means = {me: v for me, v in means.items() if not np.isnan(v)}
        if not means:
            continue
        best = (max if m.higher_is_better else min)(means, key=means.__getitem__)
        out[mt] = {best: "best"}
        for me in means:
            if me != best:
                mean, half, _ = mean_ci(paired_differences(rows, me, best, mt, model))
                if not np.isnan(mean) and abs(mean) <= half:
                    out[mt][me] = "tied"
    return out


def leaders_table(rows: list[dict[str, Any]], methods: list[str], metrics: dict[str, Metric], model: str) -> str:
    """Markdown: a row per method, a column per metric: "1st" (best mean), "=1st" (tied with it: paired 95%
    interval holding 0), blank otherwise; and the count of metrics where the method is first or tied-first."""
    lead = leaders(rows, methods, metrics, model)
    body = []
    for me in methods:
        cells = [{"best": "1st", "tied": "=1st"}.get(lead.get(mt, {}).get(me, ""), "") for mt in metrics]
        body.append([me, *cells, str(sum(bool(c) for c in cells))])
    return markdown_table(["method", *(header(mt, m) for mt, m in metrics.items()), "first or tied"], body)


def paired_table(rows: list[dict[str, Any]], methods: list[str], metrics: dict[str, Metric], model: str,
                 reference: str = "caap") -> str:
    """Markdown: a row per other method, a column per metric: the per-image difference `reference` minus
    method (mean ± 95% CI over the images where both are defined), marked +, - or = by the direction
    of the metric. Paired intervals are much narrower than the two methods' own intervals."""
    body = []
    for me in methods:
        if me == reference:
            continue
        cells = []
        for mt, m in metrics.items():
            mean, half, _ = mean_ci(paired_differences(rows, reference, me, mt, model))
            if np.isnan(mean):
                cells.append("n/a")
                continue
            sign = 1 if m.higher_is_better else -1
            lo, hi = sign * mean - half, sign * mean + half
            mark = "+" if lo > 0 else "-" if hi < 0 else "="
            cells.append(f"{mark} {mean:+.3f} ± {half:.3f}")
        body.append([me, *cells])
    return markdown_table([f"{reference} minus", *(header(mt, m) for mt, m in metrics.items())], body)


def write_outputs(rows: list[dict[str, Any]], grids: dict[str, Any], models: list[Any], methods: list[str],
                  metrics: dict[str, Metric], samples: list[Any], args: Any, out: Path,
                  settings: dict[str, Any]) -> str:
    import pandas as pd

    from caap.plots import bar_chart, save_bar_png, save_grid_png, save_html

    write_csv(rows, out / "per_image.csv")
    write_text(out / "settings.json", json.dumps({
        "split": args.split, "images": [s.name for s in samples], "target": "true class",
        "metrics": {k: metric_key(v) for k, v in metrics.items()},
        "methods": {k: v for k, v in settings.items() if k in methods},
        "caap_defaults": caap_defaults_text(models)}, indent=1) + "\n")
    n = len(samples)
    parts = [f"# Benchmark: {n} images of the `{args.split}` split, target = the true class", ""]
    for name, _ in models:
        parts += [f"## {name}", "", summary_table(rows, methods, metrics, name), ""]
        if len(methods) > 1:
            parts += [f"### First or tied-first per metric ({name.split('.')[0]})", "",
                      leaders_table(rows, methods, metrics, name), "",
                      ("1st: the best mean; =1st: the paired 95% interval (Student t) of the per-image difference to the "
                       "best method holds 0."), ""]
        for ref in [r for r in args.reference if r in methods] if len(methods) > 1 else []:
            parts += [f"### {ref} against each method, paired over images ({name.split('.')[0]})", "",
                      paired_table(rows, methods, metrics, name, reference=ref), "",
                      (f"{ref}'s value minus the method's, per image, then mean ± 95% CI (Student t) of those "
                      f"differences; `+` {ref} better, `-` {ref} worse (the interval excludes 0 on that side, in the "
                      "metric's direction), `=` the interval contains 0."), ""]
    parts += [
        ("Mean ± half-width of the 95% confidence interval (Student t) over images; ↑ higher is better, "
        "↓ lower is better; bold: the best mean of a column. Undefined values (e.g. no positive mass for box "
        "energy) are left out of the mean."),
        "",
        "Metric settings: " + "; ".join(f"`{metric_key(v)}`" for v in metrics.values()),
        "",
        "Method settings: " + "; ".join(f"{k}: `{v}`" for k, v in settings.items() if k in methods),
        "",
        *([f"CAAP's defaults: {caap_defaults_text(models)}.", ""] if "caap" in methods else []),
        "Command: `python experiments/benchmark.py " + " ".join(command_flags(args)) + "`",
    ]
    summary = "\n".join(parts) + "\n"
    write_text(out / "summary.md", summary)

    lines = [(f"# Runtime per image ({n} images, `{args.split}`, device {args.device}, "
             f"chunks of {args.batch_size} images, {args.forward_batch} rows per forward pass)"), ""]
    for name, _ in models:
        body = []
        for me in methods:
            rs = [r for r in rows if r["method"] == me and r["model"] == name]
            maps_s = float(np.mean([r["runtime_s"] for r in rs]))
            metric_s = float(np.mean([r["metric_s"] for r in rs]))
            body.append([me, f"{maps_s:.3f}", f"{metric_s:.3f}", seconds_text((maps_s + metric_s) * len(rs))])
        every = [r for r in rows if r["model"] == name]
        total = sum(r["runtime_s"] + r["metric_s"] for r in every)
        body.append(["**all**", "", "", f"**{seconds_text(total)}**"])
        lines += [f"## {name}", "", markdown_table(
            ["method", "maps (s / image)", "metrics (s / image)", "whole run"], body), ""]
    lines.append("Maps: the attribution call alone (a chunk's time / its images), as first computed (cached "
                 "chunks keep the time they took). Metrics: all metrics of the method, sharing forward passes. "
                 "all: the sum over methods (reading the images and their one clean forward pass not included).")
    write_text(out / "runtime.md", "\n".join(lines))

    df = pd.DataFrame(rows)
    color = "model" if len(models) > 1 else None
    for mt, m in metrics.items():
        save_bar_png(df, mt, out / f"bar_{mt}.png", x="method", color=color, higher_is_better=m.higher_is_better,
                     title=f"{header(mt, m)} ({n} images, {args.split})")
    save_html(bars_figure(df, metrics, color, bar_chart, n, args.split), out / "bars.html")
    for name, model in models:
        if args.grid_images > 0 and grids.get(name):
            k = min(args.grid_images, n)
            g = grids[name]
            px = model.preprocess([s.path for s in samples[:k]]).cpu()
            boxes = [input_frame_boxes(s, model.data_config) for s in samples[:k]]
            save_grid_png(
                [px[j] for _ in methods for j in range(k)], [g[me][j] for me in methods for j in range(k)], None,
                out / f"examples_{safe_name(name)}.png", ncols=k, row_titles=methods,
                col_titles=[class_name(s.class_index) for s in samples[:k]], data_config=model.data_config,
                boxes=[boxes[j] for _ in methods for j in range(k)],
                title=f"{name}: maps for the true class (green: boxes)",
            )
    return summary


def caap_defaults_text(models: list[Any]) -> str:
    """What `CAAP(model)` ran with: its default context and layer range (inclusive blocks) per model."""
    parts = []
    for name, model in models:
        a, b = default_layers(model.cfg.n_layers)
        parts.append(f"{name}: context {DEFAULT_CONTEXT!r}, blocks {a}-{b} of {model.cfg.n_layers}, resid_pre, logit_diff")
    return "; ".join(parts)


def bars_figure(df: Any, metrics: dict[str, Metric], color: str | None, bar_chart: Any, n: int, split: str) -> Any:
    """One interactive figure: a bar chart per metric, stacked."""
    from plotly.subplots import make_subplots

    names = list(metrics)
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=[header(mt, metrics[mt]) for mt in names],
                        vertical_spacing=min(0.08, 0.3 / max(1, len(names))))
    for i, mt in enumerate(names, start=1):
        sub = bar_chart(df, mt, x="method", color=color, higher_is_better=metrics[mt].higher_is_better)
        for trace in sub.data:
            trace.showlegend = color is not None and i == 1
            fig.add_trace(trace, row=i, col=1)
        fig.update_yaxes(title_text=f"{mt} {arrow(metrics[mt])}", row=i, col=1)
    fig.update_layout(height=320 * len(names), title=f"Benchmark: {n} images of the {split} split (95% CI)",
                      template="plotly_white", barmode="group")
    return fig


def command_flags(args: Any) -> list[str]:
    flags = []
    for key in ("split", "limit", "methods", "metrics", "model", "batch_size", "steps", "aopc_steps",
                "rise_masks", "ig_steps", "smoothgrad_samples", "tis_masks", "seed"):
        v = getattr(args, key)
        if v is not None:
            flags.append(f"--{key.replace('_', '-')} {v}")
    if args.reference != ["caap"]:
        flags.append(f"--reference {','.join(args.reference)}")
    return flags


# ---------------------------------------------------------------------------------------------- estimate
def _timed(fn: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process over all its threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - w0, time.process_time() - c0


def estimate(model: Any, name: str, methods: list[str], metrics: dict[str, Metric], samples: list[Any],
             args: Any, out: Path) -> str:
    """Time `args.estimate` images per method and per metric and extrapolate to `len(samples)` images.

    The machine is shared, so wall time says little about an idle run. Three numbers per item: wall
    seconds now; CPU seconds (this process, all threads), which other jobs barely change, and from which
    the idle-machine time is estimated as CPU seconds / threads (a lower bound: it assumes both threads
    busy all the time); and "passes", the cost in plain forward passes per image (CPU seconds over
    those of one plain forward pass, measured here at `--forward-batch` rows), a machine-independent
    unit."""
    k = min(args.estimate, len(samples))
    chunk = load_chunk(model, samples[:k], 0, 0)
    fb = args.forward_batch
    threads = torch.get_num_threads() if chunk.pixels.device.type == "cpu" else 1
    x = chunk.pixels.repeat((fb + k - 1) // k, 1, 1, 1)[:fb]
    with torch.inference_mode():
        model(x[:2])
        _, wall, cpu = _timed(lambda: model(x))
        clean = model(chunk.pixels).float()
    cpu_pass = cpu / fb if chunk.pixels.device.type == "cpu" else wall / fb
    throughput = fb / wall
    n, nm = len(samples), len(methods)
    print(f"estimate: {name}, {k} images timed, extrapolated to {n}; plain forward pass: {throughput:.1f} images/s "
          f"now, {cpu_pass * 1000:.0f} CPU ms each ({threads} threads)", flush=True)

    def cost(wall: float, cpu: float, times: int) -> list[str]:
        cpu = cpu if chunk.pixels.device.type == "cpu" else wall
        return [f"{wall / k:.3f}", f"{cpu / k:.3f}", f"{cpu / k / cpu_pass:.0f}",
                seconds_text(wall / k * times), seconds_text(cpu / k / threads * times)]

    rows_m, rows_t = [], []
    total_now = total_idle = 0.0
    maps = None
    for me in methods:
        obj = make_method(me, model, args)
        m, wall, cpu = _timed(lambda: obj.attribute(chunk.pixels, target=chunk.targets).detach().float().cpu())
        maps = m if maps is None else maps
        rows_m.append([me, *cost(wall, cpu, n)])
        total_now, total_idle = total_now + wall / k * n, total_idle + cpu / k / threads * n
        print("  " + " | ".join(rows_m[-1]), flush=True)
    for mt, m in metrics.items():
        ev = Evaluator(model, chunk.pixels, chunk.targets, chunk.masks, clean, fb)
        ev.prepare({mt: m})  # the fully perturbed image: once per image, not per method
        _, wall, cpu = _timed(lambda: ev.evaluate(maps, {mt: m}))
        rows_t.append([header(mt, m), *cost(wall, cpu, n * nm)])
        print("  " + " | ".join(rows_t[-1]), flush=True)
    ev = Evaluator(model, chunk.pixels, chunk.targets, chunk.masks, clean, fb)
    ev.prepare(metrics)
    before = ev.forwards
    _, wall, cpu = _timed(lambda: ev.evaluate(maps, metrics))
    shared = cost(wall, cpu, n * nm)
    total_now, total_idle = total_now + wall / k * n * nm, total_idle + cpu / k / threads * n * nm
    cols = ["s / image now", "CPU s / image", "passes / image"]
    text = "\n".join([
        f"# Cost estimate: {name}, {n} images of `{args.split}`, {nm} methods, {len(metrics)} metrics",
        "",
        (f"Measured on {k} images, device {args.device}, {threads} threads; a plain forward pass now: "
        f"{throughput:.1f} images/s, {cpu_pass * 1000:.0f} CPU ms per image. 'now': wall time at this moment's "
        f"load; 'idle': CPU seconds / {threads} threads, the time on an idle machine (a lower bound); "
        "'passes': the cost in plain forward passes per image, independent of the machine."),
        "",
        "## Maps (per method)",
        "",
        markdown_table(["method", *cols, f"{n} images now", "idle"], rows_m),
        "",
        "## Metrics (each alone, per image and method; the cost does not depend on the map)",
        "",
        markdown_table(["metric", *cols, f"{n} images x {nm} methods now", "idle"], rows_t),
        "",
        (f"All metrics together, sharing forward passes ({(ev.forwards - before) / k:.0f} forward passes per image "
        f"and method): {shared[0]} s / image now, {shared[1]} CPU s, {shared[2]} passes; {shared[3]} now, "
        f"{shared[4]} idle for the run."),
        "",
        (f"**Whole run: {seconds_text(total_now)} at this moment's load, about {seconds_text(total_idle)} on an "
        f"idle machine.**"),
        "",
        "Settings: " + " ".join(command_flags(args)),
    ])
    write_text(out / "estimate.md", text)
    return text


# ---------------------------------------------------------------------------------------------- main
def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    methods, metrics, samples, model_specs = resolve_inputs(args)
    if args.grid_images < 0:
        raise UsageError("--grid-images must be >= 0")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {me: settings_of(args).get(me, {}) for me in methods}
    if args.estimate:
        for name, ckpt in model_specs:
            model = open_model(name, ckpt, args.device)
            check_steps(model, args.steps, metrics)
            text = estimate(model, name, methods, metrics, samples, args, out)
            print()
            print(text)
        return 0
    rows, grids, models = [], {}, []
    for name, ckpt in model_specs:
        model = open_model(name, ckpt, args.device)
        check_steps(model, args.steps, metrics)
        r, g = run_model(model, name, methods, metrics, samples, args, out)
        rows += r
        grids[name] = g
        models.append((name, model))
    if args.shard is not None:
        i, n = args.shard
        chunks = len(range(0, len(samples), args.batch_size))
        print(f"shard {i}/{n}: {len(range(i - 1, chunks, n))} of {chunks} chunks ({args.batch_size} images each) are in "
              f"{out / 'cache'}; once every shard is done, run the same command without --shard to write the tables")
        return 0
    summary = write_outputs(rows, grids, models, methods, metrics, samples, args, out, settings)
    print()
    print(summary)
    print(f"Wrote {out / 'per_image.csv'}, summary.md, runtime.md, bar_*.png, bars.html, examples_*.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
