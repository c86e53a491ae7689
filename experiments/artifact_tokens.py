"""High-norm "artifact" tokens (Darcet et al. 2024, "Vision Transformers Need Registers") and CAAP's top
patches: how often is CAAP's strongest patch such a token, or one of its 8 neighbours, at each layer range?

    python experiments/artifact_tokens.py --limit 32 --context blur --maps-dir results/ablation_v2/maps \
        --baselines-dir results/ablation_v2/maps/vit_tiny_patch16_224.augreg_in21k_ft_in1k --out results/artifact_tokens

Artifact tokens, per image (the source photo, the real model): the residual stream entering each block
from `--from-block` on (`blocks.{l}.hook_resid_pre`, l >= 8 for ViT-Tiny: the stream CAAP's default range
carries), its L2 norm at every patch token, divided by the median norm over the image's patch tokens at
that block; a patch whose ratio exceeds `--threshold` (default 10) at any of those blocks is an artifact
token. Its neighbourhood: the artifact tokens and their 8 neighbours on the patch grid.

For every named range (early 0-3, mid 4-7, late 8-11, all 0-11 for a 12-block model: `_common.named_ranges`)
CAAP's maps with `--context` (read from the ablation's map cache `--maps-dir`, file
`maps_<context>_<range>_<split>_<n>.npz` as `ablation.py` / `caap_defaults.py` write it; computed and
saved there when absent) give, over images:
    top1_artifact     share of images whose top patch is an artifact token
    top1_near         ... is an artifact token or one of its 8 neighbours
    top5_near         share of the top-5 patches (over images x 5) that are artifact tokens or neighbours
    any5_near         share of images with at least one of the top-5 patches there
    chance            the share of the grid the neighbourhood covers (what a random patch would give)
Maps of other methods found in `--baselines-dir` (`baseline_<name>_<split>_<n>.npz`, the ablation's
cache) get the same row, for comparison.

Outputs under `--out`: artifact_tokens.md (printed too) and artifact_tokens.csv (per image: the artifact
tokens, their ratios, and each map's top-5 patches).
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
    OneLineParser,
    UsageError,
    add_data_flags,
    load_cached_maps,
    load_chunk,
    load_samples,
    markdown_table,
    named_ranges,
    positive,
    run_main,
    save_maps,
    split_list,
    write_report,
)
from caap import CAAP
from caap.contexts import CONTEXT_NAMES, get_context
from caap.models import load_model
from caap.stats import mean_ci
from hooked_vit import act_name

PROG = "artifact_tokens"
RANGES = ("early", "mid", "late", "all")


def parse_args(argv: list[str] | None) -> Any:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    add_data_flags(p, limit=32, split_help="manifest split (default dev; never tune on heldout)")
    p.add_argument("--context", default="blur", help=f"CAAP's context (default blur): {', '.join(CONTEXT_NAMES)}")
    p.add_argument("--ranges", default=",".join(RANGES), help=f"comma list (default all): {', '.join(RANGES)}")
    p.add_argument("--threshold", type=float, default=10.0,
                   help="artifact token: norm / median patch norm above this at some block (default 10)")
    p.add_argument("--from-block", type=int, default=None,
                   help="first block whose resid_pre is measured (default: 2n/3, i.e. 8 of 12)")
    p.add_argument("--maps-dir", default="results/ablation_v2/maps", help="CAAP map cache (ablation.py's)")
    p.add_argument("--baselines-dir", default=None, help="folder of baseline_<name>_<split>_<n>.npz maps to compare")
    p.add_argument("--images-per-call", type=positive, default=4)
    p.add_argument("--batch-size", type=positive, default=128, help="patched runs per CAAP forward (default 128)")
    p.add_argument("--out", default="results/artifact_tokens")
    return p.parse_args(argv)


def norm_ratios(model: Any, pixels: torch.Tensor, blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image and patch (grid order): the largest over `blocks` of ||resid_pre|| / median patch norm, and
    the largest raw norm; both [batch, grid_h * grid_w]."""
    names = [act_name("resid_pre", b) for b in blocks]
    pos = model.patch_positions().to(pixels.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(pixels, names_filter=lambda n: n in names)
    norms = torch.stack([cache[n][:, pos].float().norm(dim=-1) for n in names])  # [blocks, batch, patches]
    ratios = norms / norms.median(dim=-1, keepdim=True).values
    return ratios.amax(0).cpu().numpy(), norms.amax(0).cpu().numpy()


def neighbourhood(flags: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """The flagged cells and their 8 neighbours (Chebyshev distance <= 1), flat."""
    g = flags.reshape(gh, gw)
    out = np.zeros_like(g)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            src = g[max(0, -dy) : gh - max(0, dy), max(0, -dx) : gw - max(0, dx)]
            out[max(0, dy) : gh - max(0, -dy), max(0, dx) : gw - max(0, -dx)] |= src
    return out.reshape(-1)


def overlap_row(maps: np.ndarray, art: np.ndarray, near: np.ndarray) -> dict[str, Any]:
    """Shares (mean ± 95% CI over images) of top patches on artifact tokens / their neighbourhoods."""
    flat = maps.reshape(len(maps), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    top1, top5 = order[:, 0], order[:, :5]
    rows = np.arange(len(flat))
    vals = {
        "top1_artifact": art[rows, top1].astype(float),
        "top1_near": near[rows, top1].astype(float),
        "top5_near": np.take_along_axis(near, top5, axis=1).mean(1),
        "any5_near": np.take_along_axis(near, top5, axis=1).any(1).astype(float),
    }
    return {k: mean_ci(v)[:2] for k, v in vals.items()} | {"_top5": top5}


def map_path(maps_dir: Path, ctx: str, rng: str, split: str, n: int) -> Path:
    return maps_dir / f"maps_{ctx}_{rng}_{split}_{n}.npz"


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    ranges = split_list(args.ranges, RANGES, "range", RANGES)
    if args.context not in CONTEXT_NAMES:
        raise UsageError(f"unknown context {args.context!r}; accepted: {', '.join(CONTEXT_NAMES)}")
    if not args.threshold > 1:
        raise UsageError(f"--threshold must be above 1 (a ratio to the median norm), got {args.threshold}")
    _, samples = load_samples(args.data, args.split, args.limit)
    try:
        model = load_model(args.model, args.checkpoint, device="cpu").eval()
    except (RuntimeError, OSError) as e:
        raise UsageError(f"could not load model {args.model!r}: {e}") from e
    n_layers = model.cfg.n_layers
    start = round(2 * n_layers / 3) if args.from_block is None else args.from_block
    if not 0 <= start < n_layers:
        raise UsageError(f"--from-block {start} is outside the model's blocks 0..{n_layers - 1}")
    blocks = list(range(start, n_layers))
    named = named_ranges(n_layers)
    gh, gw = model.cfg.grid_size
    n = len(samples)
    chunk = load_chunk(model, samples, 0, 0)
    files = chunk.files

    ratio_parts, norm_parts = [], []
    for i in range(0, n, 16):
        r, m = norm_ratios(model, chunk.pixels[i : i + 16], blocks)
        ratio_parts.append(r)
        norm_parts.append(m)
    ratios, norms = np.concatenate(ratio_parts), np.concatenate(norm_parts)
    art = ratios > args.threshold
    near = np.stack([neighbourhood(a, gh, gw) for a in art])

    maps_dir = Path(args.maps_dir)
    methods: dict[str, np.ndarray] = {}
    for rng in ranges:
        path = map_path(maps_dir, args.context, rng, args.split, n)
        hit = load_cached_maps(path, files)
        if hit is None:
            method = CAAP(model, layers=named[rng], context=get_context(args.context, model), batch_size=args.batch_size)
            t0 = time.perf_counter()
            k = args.images_per_call
            maps = torch.cat([method.attribute(chunk.pixels[i : i + k], target=chunk.targets[i : i + k]).cpu()
                              for i in range(0, n, k)])
            save_maps(path, maps, files, time.perf_counter() - t0)
            print(f"{PROG}: computed CAAP {args.context}/{rng} for {n} images into {path}", flush=True)
        else:
            maps = hit[0]
        a, b = named[rng]
        methods[f"caap {args.context} {rng} ({a}-{b})"] = maps.numpy()
    if args.baselines_dir:
        for path in sorted(Path(args.baselines_dir).glob(f"baseline_*_{args.split}_{n}.npz")):
            hit = load_cached_maps(path, files)
            if hit is not None:
                methods[path.stem[len("baseline_") : -len(f"_{args.split}_{n}")]] = hit[0].numpy()

    per_image_art = art.sum(1)
    chance = near.mean(1)
    body, top5s = [], {}
    for name, maps in methods.items():
        r = overlap_row(maps, art, near)
        top5s[name] = r.pop("_top5")
        body.append([name, *(f"{m:.2f} ± {h:.2f}" for m, h in r.values())])
    cm, ch = mean_ci(chance)[:2]
    am = mean_ci(art.mean(1))[:2]
    med = np.median(norms, axis=1)
    text = "\n".join([
        f"# Artifact tokens and top patches: {n} images of `{args.split}`, {args.model}, target = the true class",
        "",
        (f"Artifact token: a patch whose residual norm (`resid_pre`, blocks {blocks[0]}-{blocks[-1]}) exceeds "
         f"{args.threshold:g} x the image's median patch norm at some block. {int((per_image_art > 0).sum())} of {n} "
         f"images have at least one; {per_image_art.mean():.2f} per image on average (at most {per_image_art.max()}); "
         f"share of the grid: {am[0]:.3f} ± {am[1]:.3f}. Their largest norm: median {np.median(norms[art]):.0f} "
         f"over those tokens, against a median patch norm (largest over the blocks) of {np.median(med):.1f}; "
         f"their largest ratio: median {np.median(ratios[art]) if art.any() else float('nan'):.0f}."),
        "",
        (f"Neighbourhood = artifact tokens and their 8 neighbours: {cm:.3f} ± {ch:.3f} of the grid "
         "(chance: what a patch drawn at random would hit)."),
        "",
        markdown_table(["map", "top-1 is an artifact token", "top-1 in the neighbourhood",
                        "top-5 in the neighbourhood (share)", "any of top-5 in the neighbourhood"], body),
        "",
        "Mean ± 95% CI (Student t) over images. Command: `python experiments/artifact_tokens.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if k in ("split", "limit", "context", "ranges", "threshold", "from_block", "maps_dir",
                            "baselines_dir") and v is not None) + "`",
    ])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "artifact_tokens.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "artifact_patches", "artifact_ratios", "neighbourhood_share", *(f"top5 {m}" for m in methods)])
        for j, s in enumerate(samples):
            idx = np.flatnonzero(art[j])
            w.writerow([s.name, " ".join(map(str, idx)), " ".join(f"{ratios[j, i]:.1f}" for i in idx),
                        f"{chance[j]:.4f}", *(" ".join(map(str, top5s[m][j])) for m in methods)])
    write_report(out / "artifact_tokens.md", text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
