"""Forward speed of HookedViT against its timm source, same weights, no hooks.

For each model the two forwards are timed interleaved in one process (timm, hooked, timm, hooked, ...)
under `torch.inference_mode()`, so that load from other processes hits both alike; after a warm-up the
medians are reported with the ratio hooked / timm (target: at most 1.10 on CPU).

    python experiments/speed_forward.py                      # ViT-Tiny and ViT-Base, batch 8
    python experiments/speed_forward.py --models vit_tiny_patch16_224 --batch 4 --repeats 50
    python experiments/speed_forward.py --threads 1   # steadier when other processes share the cores

Random weights (`pretrained=False`): speed does not depend on the values. Before timing, the script
checks that the two models agree on the batch (logits to 1e-4), so the table compares the same function.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch

from hooked_vit import HookedViT

DEFAULT_MODELS = ["vit_tiny_patch16_224", "vit_base_patch16_224"]


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Call each function in turn, `warmup + repeats` rounds; the seconds of the last `repeats`."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    return times


def bench(name: str, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median forward times of timm and HookedViT on the same random weights and pixels."""
    torch.manual_seed(0)
    timm_model = timm.create_model(name, pretrained=False).eval()
    hooked = HookedViT.from_timm(timm_model).eval()
    size = timm_model.patch_embed.img_size
    pixels = torch.randn(batch, 3, *size)
    with torch.inference_mode():
        diff = (timm_model(pixels) - hooked(pixels)).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"{name}: HookedViT and timm disagree (max abs diff {diff:.2e}); not timing")
        times = time_interleaved(
            {"timm": lambda: timm_model(pixels), "hooked": lambda: hooked(pixels)}, repeats, warmup
        )
    t_timm, t_hooked = statistics.median(times["timm"]), statistics.median(times["hooked"])
    return {"timm_ms": 1e3 * t_timm, "hooked_ms": 1e3 * t_hooked, "ratio": t_hooked / t_timm,
            "min_ratio": min(times["hooked"]) / min(times["timm"]), "max_diff": diff}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds per model (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="timm model names")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.repeats} timed rounds, medians")
    print(f"{'model':<28} {'timm ms':>9} {'hooked ms':>10} {'hooked/timm':>12} {'(best/best)':>12} {'max |diff|':>11}")
    for name in args.models:
        r = bench(name, args.batch, args.repeats, args.warmup)
        print(f"{name:<28} {r['timm_ms']:>9.1f} {r['hooked_ms']:>10.1f} {r['ratio']:>12.3f} "
              f"{r['min_ratio']:>12.3f} {r['max_diff']:>11.1e}")
    print("timm ms / hooked ms: medians of the timed rounds; hooked/timm: ratio of the medians (target <= 1.10); "
          "best/best: ratio of the fastest rounds")


if __name__ == "__main__":
    main()
