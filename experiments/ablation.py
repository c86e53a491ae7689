"""Ablation: CAAP's neutral context x layer range (x component) on the `dev` split, against the baselines.

    python experiments/ablation.py --limit 64 --out results/ablation
    python experiments/ablation.py --limit 64 --baselines-csv results/benchmark_dev/per_image.csv
    python experiments/ablation.py --contexts mean,zero --ranges mid,late --components resid_pre,mlp_out

For every (context, range, component) it computes CAAP maps for the first `--limit` images of the split
(target = the true class, score logit_diff as CAAP's default) and scores them with every metric (the same
metric settings as `benchmark.py`, `_common.metric_settings`). It answers the referee's question "does the
choice of neutral context or layer range change the ranking against the baselines?": the baselines are
scored on the same images, read from a benchmark run's per-image CSV (`--baselines-csv`, e.g.
`benchmark.py --split dev --limit 64`; every CAAP-free method in it is used) or, without one, computed here
(the cheap ones by default: `--baselines`), and for each metric CAAP's rank among the methods is printed
for each setting, with the range of ranks it takes.

Contexts: mean, grey, black, blur, noise, zero (`caap.contexts`). Ranges for a model of depth n, as
`_common.named_ranges`: early = blocks [0, n/3), mid = [n/3, 2n/3), late = [2n/3, n), all = [0, n).
Components: resid_pre (the residual stream entering each block, CAAP's default), attn_out, mlp_out.

Maps are cached with caap_defaults.py's file names (`maps_<context>_<range>_<split>_<n>.npz`, plus
`_<component>` before the split for components other than resid_pre) in `--maps-dir`: by default
caap_defaults' own `results/caap_defaults` for its default model, so nothing is computed twice between the
two scripts (a cache of more images of the same split serves its first `--limit`), and
`<out>/maps/<model>` for other models. Metric values are cached under `<out>/scores`: a second run only
computes what is new.

Outputs under `--out`: `ablation.csv` (a row per setting x metric: mean, CI, CAAP's rank, the number of
methods ranked), `ablation_per_image.csv`, `ablation.md` (a table per metric: contexts x ranges, mean ±
95% CI and rank; then the ranks and the answer), `ablation[_<component>].png` (the figure: every metric's
contexts x ranges heatmap, annotated with the mean and CAAP's rank), `heatmap_<metric>[_<component>].png`
and `heatmaps.html`.

Cost: CAAP costs about n_patches x (layers run from the range's start) / n_layers forward passes per image
(ViT-Tiny: early and all 196, mid 131, late 65), so the 24 settings of one component cost ~3500 passes per
image, and every setting adds its metrics' passes (~80 per image with all of them): an hour or more for 64
images on a 2-core CPU. Restrict `--contexts`, `--ranges` or `--metrics` to go faster.
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
    STEPS,
    Chunk,
    OneLineParser,
    UsageError,
    add_data_flags,
    build_metrics,
    fmt,
    header,
    load_cached_maps,
    load_chunk,
    load_samples,
    markdown_table,
    method_settings,
    metric_key,
    named_ranges,
    positive,
    rank_of,
    run_main,
    safe_name,
    save_maps,
    scores_for_chunk,
    split_list,
    write_report,
)
from caap import CAAP
from caap.attribution.caap import CAAP_COMPONENTS, DEFAULT_CONTEXT, default_layers
from caap.baselines import BASELINES, get_baseline
from caap.contexts import CONTEXT_NAMES, get_context
from caap.data import DEFAULT_MODEL
from caap.metrics import METRICS, Evaluator, Metric
from caap.models import load_model
from caap.stats import mean_ci

Tensor = torch.Tensor

PROG = "ablation"
RANGES = ("early", "mid", "late", "all")
CHEAP_BASELINES = ("random", "rollout", "gae", "attention_gradcam", "gradsam", "gradcam", "input_x_gradient")
"""Computed here when no `--baselines-csv` is given: each costs at most a forward and a backward pass per
image. The expensive ones (IG, SmoothGrad, occlusion, RISE, AtMan) come from a benchmark CSV."""
CAAP_DEFAULTS_DIR = Path("results/caap_defaults")


def parse_args(argv: list[str] | None) -> Any:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    add_data_flags(p, limit=64)
    p.add_argument("--contexts", default=",".join(CONTEXT_NAMES),
                   help=f"comma list (default all): {', '.join(CONTEXT_NAMES)}")
    p.add_argument("--ranges", default=",".join(RANGES), help=f"comma list (default all): {', '.join(RANGES)}")
    p.add_argument("--components", default="resid_pre",
                   help=f"comma list (default resid_pre): {', '.join(CAAP_COMPONENTS)}")
    p.add_argument("--metrics", default=None, help=f"comma list (default all): {', '.join(METRICS)}")
    p.add_argument("--baselines-csv", default=None,
                   help="per_image.csv of a benchmark.py run on the same split: the baselines' scores")
    p.add_argument("--baselines", default=",".join(CHEAP_BASELINES),
                   help="baselines computed here when no --baselines-csv is given (default: the cheap ones)")
    p.add_argument("--out", default="results/ablation", help="output folder (default results/ablation)")
    p.add_argument("--maps-dir", default=None,
                   help="CAAP map cache shared with caap_defaults.py (default: results/caap_defaults for its "
                        "default model, else <out>/maps/<model>)")
    p.add_argument("--images-per-call", type=positive, default=4, help="images per CAAP call (default 4)")
    p.add_argument("--batch-size", type=positive, default=128, help="patched runs per CAAP forward (default 128)")
    p.add_argument("--forward-batch", type=positive, default=64, help="rows per metric forward pass (default 64)")
    p.add_argument("--steps", type=positive, default=STEPS, help=f"insertion/deletion steps (default {STEPS})")
    p.add_argument("--aopc-steps", type=positive, default=AOPC_STEPS, help=f"MoRF/LeRF steps (default {AOPC_STEPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def map_file(maps_dir: Path, ctx: str, rng: str, component: str, split: str, n: int) -> Path:
    """caap_defaults.py's cache name, with the component before the split where it is not resid_pre."""
    comp = "" if component == "resid_pre" else f"_{component}"
    return maps_dir / f"maps_{ctx}_{rng}{comp}_{split}_{n}.npz"


def find_cached(maps_dir: Path, ctx: str, rng: str, component: str, split: str, files: list[str]) -> Tensor | None:
    """Cached maps of these images: the exact file, else one of more images of the split whose first
    images are these."""
    n = len(files)
    hit = load_cached_maps(map_file(maps_dir, ctx, rng, component, split, n), files)
    if hit is not None:
        return hit[0]
    stem = map_file(maps_dir, ctx, rng, component, split, n).name.rsplit("_", 1)[0]
    for path in sorted(maps_dir.glob(f"{stem}_*.npz")):
        tail = path.stem.rsplit("_", 1)[-1]
        if not tail.isdigit() or int(tail) <= n:
            continue
        try:
            data = np.load(path, allow_pickle=False)
            if [str(f) for f in data["files"][:n]] == files:
                return torch.from_numpy(data["maps"][:n]).float()
        except Exception:
            continue
    return None



def baseline_scores_from_csv(path: Path, model: str, files: list[str], metrics: dict[str, Metric]
                             ) -> dict[str, dict[str, np.ndarray]]:
    """{method: {metric: values in `files` order}} for every method but caap in a benchmark CSV."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"--baselines-csv not found: {path}")
    df = pd.read_csv(path)
    need = {"method", "image"}
    if not need <= set(df.columns):
        raise UsageError(f"{path} is not a benchmark per-image CSV (needs columns method, image, <metrics>)")
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise UsageError(f"{path} has no column for metric(s) {', '.join(missing)}; rerun benchmark.py with them")
    if "model" in df.columns:
        if model not in set(df["model"]):
            raise UsageError(f"{path} has no rows for model {model!r} (it has {', '.join(sorted(set(df['model'])))})")
        df = df[df["model"] == model]
    df = df[df["method"] != "caap"]
    out = {}
    for method, g in df.groupby("method", sort=False):
        g = g.drop_duplicates("image").set_index("image")
        lacking = [f for f in files if f not in g.index]
        if lacking:
            raise UsageError(
                f"{path}: method {method!r} lacks {len(lacking)} of the {len(files)} images (e.g. {lacking[0]}); "
                f"run benchmark.py on the same split with at least --limit {len(files)}"
            )
        out[str(method)] = {m: g.loc[files, m].to_numpy(dtype=np.float64) for m in metrics}
    if not out:
        raise UsageError(f"{path} holds no baseline rows")
    settings = path.with_name("settings.json")
    if settings.is_file():
        theirs = json.loads(settings.read_text()).get("metrics", {})
        for name, m in metrics.items():
            if name in theirs and theirs[name] != metric_key(m):
                print(f"ablation: warning: {path} scored {name} as {theirs[name]}, here it is {metric_key(m)}: "
                      "the ranks compare different settings", file=sys.stderr)
    return out


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    contexts = split_list(args.contexts, CONTEXT_NAMES, "context", CONTEXT_NAMES)
    ranges = split_list(args.ranges, RANGES, "range", RANGES)
    components = split_list(args.components, CAAP_COMPONENTS, "component", ["resid_pre"])
    metric_names = split_list(args.metrics, list(METRICS), "metric", list(METRICS))
    metrics = build_metrics(metric_names, args.forward_batch, args.steps, args.aopc_steps)
    baselines = [] if args.baselines_csv else split_list(args.baselines, list(BASELINES), "baseline", CHEAP_BASELINES)
    _, samples = load_samples(args.data, args.split, args.limit)
    torch.manual_seed(args.seed)
    try:
        model = load_model(args.model, args.checkpoint, device=args.device).eval()
    except (RuntimeError, OSError) as e:
        raise UsageError(f"could not load model {args.model!r}: {e}") from e
    n_layers = model.cfg.n_layers
    named = named_ranges(n_layers)
    for r in ranges:
        a, b = named[r]
        if not 0 <= a <= b < n_layers:
            raise UsageError(f"range {r!r} is empty for a {n_layers}-layer model (blocks {a}..{b})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.maps_dir:
        maps_dir = Path(args.maps_dir)
    elif args.model == DEFAULT_MODEL and args.checkpoint is None:
        maps_dir = CAAP_DEFAULTS_DIR
    else:
        maps_dir = out / "maps" / safe_name(args.model)
    n = len(samples)
    chunk: Chunk = load_chunk(model, samples, 0, 0)
    files = chunk.files
    scores_dir = out / "scores" / safe_name(args.model)
    state: dict[str, Any] = {}

    def evaluator() -> Evaluator:  # clean logits and substrates: once for every setting and baseline
        if "ev" not in state:
            state["ev"] = Evaluator(model, chunk.pixels, chunk.targets, chunk.masks, batch_size=args.forward_batch)
        return state["ev"]

    # ------------------------------------------------------------------ baselines
    if args.baselines_csv:
        base_values = baseline_scores_from_csv(Path(args.baselines_csv), args.model, files, metrics)
        base_source = f"read from {args.baselines_csv}"
    else:
        base_values = {}
        kw = method_settings(args.forward_batch, args.seed)
        for name in baselines:
            path = out / "maps" / safe_name(args.model) / f"baseline_{name}_{args.split}_{n}.npz"
            hit = load_cached_maps(path, files)
            if hit is None:
                t0 = time.perf_counter()
                maps = get_baseline(name, model, **kw.get(name, {})).attribute(
                    chunk.pixels, target=chunk.targets).detach().float().cpu()
                save_maps(path, maps, files, time.perf_counter() - t0)
            else:
                maps = hit[0]
            base_values[name], _ = scores_for_chunk(
                scores_dir / f"baseline_{name}_{args.split}_{n}.json", chunk, maps, metrics, evaluator)
        base_source = "computed here on the same images"

    # ------------------------------------------------------------------ CAAP settings
    settings = [(c, ctx, r) for c in components for ctx in contexts for r in ranges]
    caap_values: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    reused = computed = 0
    bar = tqdm(settings, desc="CAAP settings", unit="setting")
    ctx_objects: dict[str, Any] = {}
    for comp, ctx, rng in bar:
        bar.set_postfix_str(f"{ctx} {rng} {comp}")
        maps = find_cached(maps_dir, ctx, rng, comp, args.split, files)
        if maps is None:
            if ctx not in ctx_objects:
                ctx_objects[ctx] = get_context(ctx, model)
            method = CAAP(model, layers=named[rng], context=ctx_objects[ctx], component=comp,
                          batch_size=args.batch_size)
            t0 = time.perf_counter()
            k = args.images_per_call
            maps = torch.cat([method.attribute(chunk.pixels[i : i + k], target=chunk.targets[i : i + k]).cpu()
                              for i in range(0, n, k)])
            save_maps(map_file(maps_dir, ctx, rng, comp, args.split, n), maps, files, time.perf_counter() - t0)
            computed += 1
        else:
            reused += 1
        tag = f"{ctx}_{rng}" + ("" if comp == "resid_pre" else f"_{comp}")
        caap_values[(comp, ctx, rng)], _ = scores_for_chunk(
            scores_dir / f"caap_{tag}_{args.split}_{n}.json", chunk, maps, metrics, evaluator)
    bar.close()
    print(f"CAAP maps: {reused} setting(s) reused from {maps_dir}, {computed} computed", flush=True)

    # ------------------------------------------------------------------ tables, ranks, plots
    rows, md = [], []
    n_methods = len(base_values) + 1
    default_range = next((r for r, blocks in named.items() if blocks == default_layers(n_layers)), None)
    base_means = {name: {mt: mean_ci(v[mt])[0] for mt in metrics} for name, v in base_values.items()}
    answer = []
    md += [f"# CAAP ablation: {n} images of the `{args.split}` split, {args.model}, target = the true class", "",
           (f"Baselines ({', '.join(base_values)}) {base_source}. Rank r/N: CAAP with that setting among the "
           f"N = {n_methods} methods (1 = best; by the metric's direction)."), ""]
    for mt, m in metrics.items():
        for comp in components:
            body = []
            for ctx in contexts:
                cells = [ctx]
                for rng in ranges:
                    mean, half, cnt = mean_ci(caap_values[(comp, ctx, rng)][mt])
                    scores = {**{b: base_means[b][mt] for b in base_values}, "CAAP": mean}
                    rank, total = rank_of(scores, "CAAP", m.higher_is_better)
                    a, b = named[rng]
                    rows.append(dict(model=args.model, split=args.split, n=cnt, component=comp, context=ctx,
                                     range=rng, layers=f"{a}-{b}", metric=mt,
                                     direction="higher" if m.higher_is_better else "lower", mean=mean, ci=half,
                                     rank=rank, n_methods=total))
                    cells.append(f"{fmt(mean, half)} ({rank}/{total})")
                body.append(cells)
            title = f"## {header(mt, m)}" + (f", component {comp}" if len(components) > 1 else "")
            cols = [f"{r} ({named[r][0]}-{named[r][1]})" for r in ranges]
            bl = ", ".join(f"{b} {fmt(base_means[b][mt], float('nan'))}" for b in
                           sorted(base_values, key=lambda b: -base_means[b][mt] if m.higher_is_better
                                  else base_means[b][mt]))
            md += [title, "", markdown_table(["context \\ range", *cols], body), "",
                   f"Baselines (best first): {bl}", ""]
            mine = [r for r in rows if r["metric"] == mt and r["component"] == comp]
            lo, hi = min(r["rank"] for r in mine), max(r["rank"] for r in mine)
            verdict = "does not change" if lo == hi else "changes"
            best = min(mine, key=lambda r: (r["rank"], -r["mean"] if m.higher_is_better else r["mean"]))
            default = [r for r in mine if (comp, r["context"], r["range"]) == ("resid_pre", DEFAULT_CONTEXT, default_range)]
            answer.append(
                f"- {header(mt, m)}{f' ({comp})' if len(components) > 1 else ''}: CAAP ranks {lo}"
                + ("" if lo == hi else f" to {hi}") + f" of {n_methods} across the {len(mine)} settings: the ranking "
                f"{verdict}; best {best['context']}/{best['range']} (rank {best['rank']})"
                + (f", CAAP's default {DEFAULT_CONTEXT}/{default_range} rank {default[0]['rank']}" if default else "")
                + ".")
    md += ["## Does the choice of neutral context or layer range change the ranking against the baselines?", "",
           *answer, "",
           "Command: `python experiments/ablation.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if k in ("split", "limit", "contexts", "ranges", "components", "metrics", "steps", "aopc_steps", "seed",
                        "baselines_csv" if args.baselines_csv else "baselines") and v is not None) + "`"]
    text = "\n".join(md) + "\n"
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "ablation_per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "component", "context", "range", "layers", *metrics])
        for (comp, ctx, rng), vals in caap_values.items():
            a, b = named[rng]
            for j, s in enumerate(samples):
                w.writerow([s.name, comp, ctx, rng, f"{a}-{b}", *(vals[mt][j] for mt in metrics)])
    write_plots(rows, metrics, contexts, ranges, components, named, out, args, n)
    write_report(out / "ablation.md", text)
    return 0


def setting_grid(rows: list[dict[str, Any]], metric: str, component: str, contexts: list[str], ranges: list[str]
                 ) -> tuple[dict[tuple[str, str], dict[str, Any]], np.ndarray]:
    """One metric's rows by (context, range), and their means as a contexts x ranges array."""
    pick = {(r["context"], r["range"]): r for r in rows if r["metric"] == metric and r["component"] == component}
    return pick, np.array([[pick[(c, g)]["mean"] for g in ranges] for c in contexts], dtype=np.float64)


def save_figure(rows: list[dict[str, Any]], metrics: dict[str, Metric], contexts: list[str], ranges: list[str],
                col_labels: list[str], component: str, path: Path, title: str) -> None:
    """The ablation figure: one heatmap per metric (contexts x ranges; colour = the mean, brighter =
    better), each cell annotated with the mean and CAAP's rank among the methods; cells where CAAP
    ranks first are outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from caap.plots import text_colour

    names = list(metrics)
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(3.4 * ncols + 0.4, 0.55 * len(contexts) * nrows + 1.3 * nrows + 0.6), dpi=150)
    FigureCanvasAgg(fig)
    for k, mt in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        pick, v = setting_grid(rows, mt, component, contexts, ranges)
        im = ax.imshow(np.nan_to_num(v, nan=np.nanmean(v) if np.isfinite(v).any() else 0.0), aspect="auto",
                       cmap="viridis" if metrics[mt].higher_is_better else "viridis_r", interpolation="nearest")
        for (i, j), val in np.ndenumerate(v):
            row = pick[(contexts[i], ranges[j])]
            text = "n/a" if not np.isfinite(val) else f"{val:.2f}\n{row['rank']}/{row['n_methods']}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                    color=text_colour(im.cmap(im.norm(val))) if np.isfinite(val) else "black")
            if row["rank"] == 1:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_xticks(range(len(ranges)), col_labels, fontsize=7)
        ax.set_yticks(range(len(contexts)), contexts, fontsize=7)
        ax.set_title(header(mt, metrics[mt]), fontsize=9)
    fig.suptitle(title + "; red: CAAP ranks first", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def write_plots(rows: list[dict[str, Any]], metrics: dict[str, Metric], contexts: list[str], ranges: list[str],
                components: list[str], named: dict[str, tuple[int, int]], out: Path, args: Any, n: int) -> None:
    """A PNG heatmap (contexts x ranges, mean; rank in the HTML) per metric and component, and one HTML."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from caap.plots import save_heatmap_png, save_html

    panels = [(mt, comp) for mt in metrics for comp in components]
    titles = [header(mt, metrics[mt]) + (f" ({comp})" if len(components) > 1 else "") for mt, comp in panels]
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=titles,
                        vertical_spacing=min(0.08, 0.3 / max(1, len(panels))))
    cols = [f"{r} ({named[r][0]}-{named[r][1]})" for r in ranges]
    png_cols = [f"{r}\n{named[r][0]}-{named[r][1]}" for r in ranges]
    for comp in components:
        save_figure(rows, metrics, contexts, ranges, png_cols, comp,
                    out / f"ablation{'' if len(components) == 1 else f'_{comp}'}.png",
                    title=f"CAAP ablation, {args.split} ({n} images){f', {comp}' if len(components) > 1 else ''}: "
                          f"mean (rank among {rows[0]['n_methods'] if rows else '?'} methods)")
    for i, ((mt, comp), title) in enumerate(zip(panels, titles), start=1):
        pick, values = setting_grid(rows, mt, comp, contexts, ranges)
        ranks = [[f"{pick[(c, r)]['mean']:.3g}<br>rank {pick[(c, r)]['rank']}/{pick[(c, r)]['n_methods']}"
                  for r in ranges] for c in contexts]
        suffix = "" if len(components) == 1 else f"_{comp}"
        if np.isfinite(values).all():
            save_heatmap_png(values, out / f"heatmap_{mt}{suffix}.png",
                             title=f"CAAP: {title}, {args.split} ({n} images)",
                             xlabel="layer range (blocks)", ylabel="neutral context", row_labels=contexts,
                             col_labels=png_cols, colorbar_label=title, cmap="viridis" if metrics[mt].higher_is_better
                             else "viridis_r")
        else:
            print(f"ablation: no heatmap PNG for {mt}: some setting has no defined value", file=sys.stderr)
        fig.add_trace(go.Heatmap(z=np.where(np.isfinite(values), values, None).tolist(), x=cols, y=contexts,
                                 text=ranks, texttemplate="%{text}", colorscale="Viridis",
                                 reversescale=not metrics[mt].higher_is_better, showscale=False,
                                 hovertemplate="%{y}, %{x}<br>%{text}<extra></extra>"), row=i, col=1)
    fig.update_layout(height=max(300, 70 * len(contexts) + 120) * len(panels), template="plotly_white",
                      title=f"CAAP ablation, {args.split} ({n} images): mean and rank among the methods")
    save_html(fig, out / "heatmaps.html")


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
