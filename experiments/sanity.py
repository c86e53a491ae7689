"""Model-randomisation sanity check (Adebayo et al. 2018) for every method, on a few `dev` photos.

    python experiments/sanity.py --limit 8 --methods caap,random,rollout,gae,attention_gradcam,gradsam,gradcam,\
        input_x_gradient,integrated_gradients,smoothgrad --out results/sanity

For each method: its maps (target = the true class) on the real ViT-Tiny and after cascading
randomisation from the top (head, block 11, ..., block 0, embeddings; `caap.metrics.sanity`), compared
by Spearman's rank correlation with the trained model's maps; a method whose maps stay similar (mean
similarity >= `--threshold`, default 0.5, at every stage) is flagged. The Sobel edge map of the image
("edge", Adebayo et al.'s model-free reference) is added as a row that must be flagged.

Outputs under `--out`: sanity.md (the table, also printed), sanity.csv (per method x stage x image:
Spearman of the maps and of their absolute values), sanity.png (mean similarity per stage, one line per
method, 95% interval bands) and sanity.html (the same, interactive, plotly.js embedded: works offline).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from _common import (
    IG_STEPS,
    METHOD_NAMES,
    RISE_MASKS,
    SMOOTHGRAD_SAMPLES,
    OneLineParser,
    UsageError,
    add_data_flags,
    load_chunk,
    load_samples,
    make_method,
    markdown_table,
    method_settings,
    method_tag,
    positive,
    run_main,
    safe_name,
    split_list,
    write_report,
)
from caap.contexts import weights_fingerprint
from caap.files import atomic_path
from caap.metrics.sanity import SANITY_THRESHOLD, EdgeDetector, RandomisationResult, cascading_randomisation
from caap.models import load_model
from caap.stats import mean_ci

PROG = "sanity"
METHODS = [*METHOD_NAMES, "edge"]
DEFAULT_METHODS = ["caap", "random", "rollout", "gae", "attention_gradcam", "gradsam", "gradcam", "input_x_gradient",
                   "integrated_gradients", "smoothgrad", "edge"]


def settings_of(args: Any) -> dict[str, dict[str, Any]]:
    return method_settings(args.forward_batch, args.seed, RISE_MASKS, args.ig_steps, args.smoothgrad_samples,
                           args.tis_masks)


def factory(name: str, args: Any) -> Any:
    if name == "edge":
        return EdgeDetector
    settings = settings_of(args)
    return lambda m: make_method(name, m, settings)


def cache_file(out: Path, name: str, args: Any, weights: str) -> Path:
    """Where one method's result is kept: named by `method_tag` (the method's settings), the model's weights
    (`weights_fingerprint`) and the run's seed; `load_result` also checks the images."""
    tag = "edge" if name == "edge" else method_tag(name, settings_of(args))
    return out / "cache" / safe_name(f"{tag}-weights{weights}-seed{args.seed}.npz")


def load_result(path: Path, files: list[str], threshold: float) -> tuple[RandomisationResult, float] | None:
    """(result, seconds) saved by `save_result` for exactly these images; None if absent or unreadable (a file
    cut short by an interrupted run is computed again)."""
    if not path.is_file():
        return None
    try:
        d = np.load(path, allow_pickle=False)
        if [str(f) for f in d["files"]] != files:
            return None
        result = RandomisationResult([str(s) for s in d["stages"]], torch.from_numpy(d["maps"]),
                                     torch.from_numpy(d["spearman"]), torch.from_numpy(d["spearman_abs"]),
                                     threshold, torch.from_numpy(d["targets"]))
        return result, float(d["seconds"])
    except Exception:
        return None


def save_result(path: Path, files: list[str], result: RandomisationResult, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, files=np.array(files), stages=np.array(result.stages), maps=result.maps.numpy(),
                            spearman=result.spearman.numpy(), spearman_abs=result.spearman_abs.numpy(),
                            targets=result.targets.cpu().numpy(), seconds=seconds)


def table_stages(stages: list[str]) -> list[str]:
    """The stages shown in the markdown table: head, every third block from the top, block 0, embed."""
    blocks = [s for s in stages if s.startswith("blocks.")]
    shown = set(blocks[::3]) | set(blocks[-1:])
    return [s for s in stages[1:] if not s.startswith("blocks.") or s in shown]


def write_plots(results: dict[str, RandomisationResult], out: Path, title: str) -> None:
    import plotly.graph_objects as go
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from caap.plots import save_html

    stages = next(iter(results.values())).stages
    x = list(range(len(stages)))
    fig = Figure(figsize=(9, 4.2), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pfig = go.Figure()
    colours = [f"C{i}" for i in range(10)] if len(results) <= 10 else list(colormaps["tab20"].colors)
    for ci, (name, r) in enumerate(results.items()):
        stats = [mean_ci(r.similarity[s].numpy()) for s in range(len(stages))]
        mean = np.array([m for m, _, _ in stats])
        half = np.nan_to_num(np.array([h for _, h, _ in stats]))
        style = "--" if r.flagged else "-"
        line = ax.plot(x, mean, style, marker="o", ms=3, color=colours[ci % len(colours)],
                       label=f"{name}{' (flagged)' if r.flagged else ''}")[0]
        ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.12, lw=0)
        pfig.add_trace(go.Scatter(x=stages, y=mean, mode="lines+markers", name=name + (" (flagged)" if r.flagged else ""),
                                  line={"dash": "dash" if r.flagged else "solid"},
                                  error_y={"type": "data", "array": half, "visible": True}))
    threshold = next(iter(results.values())).threshold
    ax.axhline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [s.replace("blocks.", "b") for s in stages], rotation=45, ha="right")
    ax.set_xlabel("randomised down to (cumulative, from the top)")
    ax.set_ylabel("Spearman with the trained map")
    ax.set_ylim(-0.3, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    with atomic_path(out / "sanity.png") as tmp:
        fig.savefig(tmp, format="png")
    pfig.add_hline(y=threshold, line_dash="dot", line_color="grey")
    pfig.update_layout(title=title, template="plotly_white", xaxis_title="randomised down to (cumulative)",
                       yaxis_title="Spearman with the trained map (mean, 95% CI)", yaxis_range=[-0.3, 1.05])
    save_html(pfig, out / "sanity.html")


def _main(argv: list[str] | None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    add_data_flags(p, limit=8)
    p.add_argument("--methods", default=None, help=f"comma list (default {','.join(DEFAULT_METHODS)}): {', '.join(METHODS)}")
    p.add_argument("--threshold", type=float, default=SANITY_THRESHOLD,
                   help=f"flag when the mean Spearman stays >= this at every stage (default {SANITY_THRESHOLD})")
    p.add_argument("--seed", type=int, default=0, help="random weights and seeded methods (default 0)")
    p.add_argument("--forward-batch", type=positive, default=64, help="rows per forward pass (default 64)")
    p.add_argument("--ig-steps", type=positive, default=IG_STEPS, help=f"IG steps (default {IG_STEPS})")
    p.add_argument("--smoothgrad-samples", type=positive, default=SMOOTHGRAD_SAMPLES,
                   help=f"SmoothGrad samples (default {SMOOTHGRAD_SAMPLES})")
    p.add_argument("--tis-masks", type=positive, default=None,
                   help="TIS's masks (default: its paper's 1024; the benchmark's tables used 128)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="results/sanity", help="output folder (default results/sanity)")
    args = p.parse_args(argv)
    methods = split_list(args.methods, METHODS, "method", DEFAULT_METHODS)
    if not -1 <= args.threshold <= 1:
        raise UsageError(f"--threshold must be between -1 and 1, got {args.threshold}")
    _, samples = load_samples(args.data, args.split, args.limit)
    try:
        model = load_model(args.model, args.checkpoint, device=args.device).eval()
    except (RuntimeError, OSError) as e:
        raise UsageError(f"could not load model {args.model!r}: {e}") from e
    chunk = load_chunk(model, samples, 0, 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, RandomisationResult] = {}
    seconds: dict[str, float] = {}
    weights = weights_fingerprint(model)
    for name in methods:  # each method's result is kept as soon as it is done: a stopped run resumes
        path = cache_file(out, name, args, weights)
        cached = load_result(path, chunk.files, args.threshold)
        if cached is None:
            t0 = time.perf_counter()
            torch.manual_seed(args.seed)
            result = cascading_randomisation(model, factory(name, args), chunk.pixels, chunk.targets,
                                             seed=args.seed, threshold=args.threshold)
            cached = result, time.perf_counter() - t0
            save_result(path, chunk.files, *cached)
        results[name], seconds[name] = cached
        r = results[name]
        print(f"{name}: min mean similarity {float(np.nanmin(r.stage_means[1:].numpy())):.3f}"
              f"{'  FLAGGED' if r.flagged else ''} ({seconds[name]:.0f} s)", flush=True)

    stages = next(iter(results.values())).stages
    with open(out / "sanity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "stage", "image", "spearman", "spearman_abs"])
        for name, r in results.items():
            for si, stage in enumerate(r.stages):
                for j, s in enumerate(chunk.samples):
                    w.writerow([name, stage, s.name, f"{float(r.spearman[si, j]):.4f}",
                                f"{float(r.spearman_abs[si, j]):.4f}"])
    shown = table_stages(stages)
    body = []
    for name, r in results.items():
        idx = {s: i for i, s in enumerate(r.stages)}
        cells = []
        for s in shown:
            mean, half, _ = mean_ci(r.similarity[idx[s]].numpy())
            cells.append(f"{mean:.2f} ± {half:.2f}")
        body.append([name, *cells, f"{float(np.nanmin(r.stage_means[1:].numpy())):.2f}",
                     "**flagged**" if r.flagged else "passes", f"{seconds[name]:.0f}"])
    n = len(chunk.samples)
    table = markdown_table(["method", *(s.replace("blocks.", "block ") for s in shown), "min", "verdict", "s"], body)
    text = "\n".join([
        f"# Cascading randomisation: {n} photos of `{args.split}`, {args.model}, target = the true class", "",
        table, "",
        (f"Each cell: the similarity of the method's map after randomising every stage from the head down to that "
         f"one with its map on the trained model, max(Spearman of the maps, Spearman of their absolute values), "
         f"mean ± 95% interval (Student t) over the images. Flagged: the mean stays >= {args.threshold} at every "
         f"stage (the map does not follow the model). All {len(stages) - 1} stages in sanity.csv / sanity.png. "
         f"s: seconds for all stages (as first computed: results are kept per method in "
         f"cache/ and reused)."), "",
        (f"Command: `python experiments/sanity.py --limit {args.limit} --methods {','.join(methods)} "
        f"--threshold {args.threshold} --seed {args.seed} --ig-steps {args.ig_steps} "
        f"--smoothgrad-samples {args.smoothgrad_samples}"
        f"{'' if args.tis_masks is None else f' --tis-masks {args.tis_masks}'}`"),
    ])
    write_plots(results, out, f"Cascading randomisation ({n} {args.split} photos, {args.model.split('.')[0]})")
    write_report(out / "sanity.md", text)
    print(f"Wrote {out / 'sanity.md'}, sanity.csv, sanity.png, sanity.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
