"""Rows per forward pass against time per block and row: the measurement behind the engine's CPU default
(`caap.patching.default_batch_size`, about 1600 tokens per pass on a CPU).

Runs blocks 2-9 of a random-weight HookedViT on residual-stream batches of each size (the engine's
batches start inside the model like this), in rounds over all sizes, and prints the fastest round per
size in ms per block and row.

    python experiments/speed_batch.py                                   # ViT-Tiny
    python experiments/speed_batch.py --model vit_small_patch16_224 --sizes 2,4,8,16,32
    python experiments/speed_batch.py --default-malloc                  # without caap.cpu.keep_freed_memory()
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from caap.cpu import keep_freed_memory
from hooked_vit import HookedViT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--sizes", default="1,2,4,8,16,32,64,128", help="rows per pass, comma list")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=128, help="rows timed per size and round (at least 2 passes)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds alone")
    args = p.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()
    torch.manual_seed(0)
    model = HookedViT.from_timm(args.model, pretrained=False).eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    x = torch.randn(max(sizes), model.cfg.n_ctx, model.cfg.d_model)
    first, last = 2, min(10, model.cfg.n_layers)
    best: dict[int, float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for bs in sizes:
                xb = x[:bs].contiguous()
                model(xb, start_at_layer=first, stop_at_layer=last)  # warm-up
                n = max(2, args.rows // bs)
                t0 = time.perf_counter()
                for _ in range(n):
                    model(xb, start_at_layer=first, stop_at_layer=last)
                per = (time.perf_counter() - t0) / n / bs / (last - first) * 1e3
                best[bs] = min(best.get(bs, float("inf")), per)
    print(f"{args.model}, {model.cfg.n_ctx} tokens, torch threads {torch.get_num_threads()}, "
          f"fastest of {args.rounds} rounds\n")
    print("| rows per pass | tokens per pass | ms per block and row |")
    print("|---|---|---|")
    for bs in sizes:
        print(f"| {bs} | {bs * model.cfg.n_ctx} | {best[bs]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
