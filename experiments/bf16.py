"""CAAP in bf16 against fp32: speed and agreement of the maps ("bf16").

Four ways on the same heldout photos and the real ViT-Tiny, timed in alternating rounds:
  fp32            the reference;
  bf16 (CAAP's precision="bf16")   autocast: matrix products in bfloat16, the residual stream, LayerNorm,
                  the head and the score in fp32;
  bf16 cast       a plain cast of model and pixels to bfloat16 (everything in bf16), for comparison;
  bf16 delta (CAAP's precision="bf16_delta")   every linear layer from CAAP's first block on computes
                  y_ctx + W (x - x_ctx) with the product in bf16, where x_ctx, y_ctx are its fp32 input and
                  output in the unpatched context run of the same image (`hooked_vit.precision.delta_bf16`):
                  the rounding scales with how far a patched run moved from the context, not with the
                  activations; attention, LayerNorm, GELU, the head and the score run in fp32.
Agreement with fp32: Spearman per image, the top patch, and the pointing game and deletion AUC over the
images (the same metrics as the benchmark).

    python experiments/bf16.py --limit 100            # README numbers (CPU)
    python experiments/bf16.py --device cuda --limit 100

The report names the processor and whether it multiplies bf16 natively (`hooked_vit.precision.bf16_support`:
the avx512_bf16 / amx_bf16 flags on x86): without, torch emulates the bf16 products and they run slower than
fp32. bf16 runs here in either case (`allow_slow_bf16=True`): this script measures it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from scipy.stats import spearmanr

from _common import load_samples, positive, write_report, write_text
from caap import CAAP
from caap.cpu import keep_freed_memory
from caap.data import DEFAULT_MODEL, sample_mask
from caap.metrics import Deletion, PointingGame
from caap.models import load_model
from caap.stats import mean_ci
from hooked_vit.precision import bf16_support


def device_description(device: str) -> str:
    """The processor and its bf16 support, for the report: "AMD EPYC ..., bf16 not native (no avx512_bf16 ...)"."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    support = bf16_support(device)
    return f"{name}, bf16 {'native' if support.native else 'not native'} ({support.reason})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--checkpoint")
    p.add_argument("--split", default="heldout")
    p.add_argument("--limit", type=positive, default=100)
    p.add_argument("--chunk", type=positive, default=4, help="images per CAAP call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/bf16")
    args = p.parse_args(argv)
    keep_freed_memory()
    model = load_model(args.model, args.checkpoint, device=args.device)
    _, samples = load_samples(None, args.split, args.limit)
    labels = torch.tensor([s.class_index for s in samples], device=args.device)
    pixels = model.preprocess([s.path for s in samples])
    kinds = ["fp32", "bf16", "bf16_cast", "bf16_delta"]
    maps: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    seconds = dict.fromkeys(kinds, 0.0)
    cast = load_model(args.model, args.checkpoint, device=args.device).to(torch.bfloat16)
    explain = {  # kind -> (pixels, targets) -> maps
        "fp32": CAAP(model).attribute,
        "bf16": CAAP(model, precision="bf16", allow_slow_bf16=True).attribute,  # measured where not native too
        "bf16_cast": lambda x, y: CAAP(cast).attribute(x.to(torch.bfloat16), y),
        "bf16_delta": CAAP(model, precision="bf16_delta", allow_slow_bf16=True).attribute,
    }
    for i in range(0, len(samples), args.chunk):  # alternate the precisions chunk by chunk: drift hits all alike
        x, y = pixels[i : i + args.chunk], labels[i : i + args.chunk]
        for kind in kinds:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = explain[kind](x, y)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[kind] += time.perf_counter() - t0
            maps[kind].append(out.float().cpu())
        print(f"{min(i + args.chunk, len(samples))}/{len(samples)} images", file=sys.stderr)
    full = {k: torch.cat(v) for k, v in maps.items()}
    masks = torch.stack([sample_mask(s, model.data_config) for s in samples])
    pointing, deletion = PointingGame(), Deletion(n_steps=8)  # the benchmark's settings
    rows = []
    for kind in kinds:
        rho = np.array([spearmanr(full["fp32"][j].flatten(), full[kind][j].flatten())[0] for j in range(len(samples))])
        top = float(np.mean([int(full["fp32"][j].argmax() == full[kind][j].argmax()) for j in range(len(samples))]))
        pg = pointing(None, None, full[kind], masks=masks).numpy()
        dl = torch.cat([deletion(model, pixels[j : j + 8], full[kind][j : j + 8].to(args.device), labels[j : j + 8])
                        for j in range(0, len(samples), 8)]).numpy()
        rows.append({"precision": kind, "seconds_per_image": seconds[kind] / len(samples),
                     "speedup": seconds["fp32"] / seconds[kind], "spearman_mean": float(rho.mean()),
                     "spearman_min": float(rho.min()), "top_patch_same": top,
                     "pointing_game": mean_ci(pg), "deletion": mean_ci(dl)})
    lines = [(f"{len(samples)} {args.split} photos, {args.model}, device {args.device} "
              f"({torch.get_num_threads()} threads), CAAP defaults"), f"{device_description(args.device)}", "",
             "| precision | s / image | speed vs fp32 | Spearman vs fp32 (mean / min) | top patch same | pointing game | deletion ↓ |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pg, dl = r["pointing_game"], r["deletion"]
        lines.append(f"| {r['precision']} | {r['seconds_per_image']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['spearman_mean']:.4f} / {r['spearman_min']:.4f} | {r['top_patch_same']:.2f} | "
                     f"{pg[0]:.3f} ± {pg[1]:.3f} | {dl[0]:.3f} ± {dl[1]:.3f} |")
    name = f"bf16_{args.device.split(':')[0]}"
    write_text(Path(args.out) / f"{name}.json", json.dumps(rows, indent=2, default=float))
    write_report(Path(args.out) / f"{name}.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
