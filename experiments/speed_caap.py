"""How fast is the patching engine? Two measurements, random weights (the speed does not depend on them).

1. CAAP for one image against the ideal: CAAP runs n_patches patched passes of (layers run) blocks, so
   its ideal cost is n_patches x (layers run) / n_layers plain forwards. We report
   (CAAP time / one plain forward's time) / ideal, with the plain forward at batch 1 (the definition) and,
   stricter, per image at the engine's batch size (what batching alone would give).
2. The same layer x position sweep (resid_pre, every layer and token) through TransformerLens'
   `patching.generic_activation_patch` (one forward per index) and through our engine; the two
   results must agree, and we report the speedup.

    python experiments/speed_caap.py                    # ViT-Tiny and ViT-Base, CPU
    python experiments/speed_caap.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from caap import CAAP
from caap.attribution import default_layers
from caap.patching import logit_metric, sweep
from hooked_vit import HookedViT


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vit_tiny_patch16_224,vit_base_patch16_224")
    p.add_argument("--tl-models", default="vit_tiny_patch16_224", help="models for the TransformerLens comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    print(f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}, batch size {args.batch_size}")

    print("\n## CAAP vs the ideal n_patches x (layers run) / n_layers forwards\n")
    print("| model | layers | ideal (forwards) | plain forward, batch 1 | CAAP, 1 image | CAAP / ideal (batch-1 forward) "
          "| CAAP / ideal (batched forward) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = HookedViT.from_timm(name, pretrained=False, device=device, dtype=dtype)
        pixels = torch.randn(1, 3, *model.cfg.img_size, device=device, dtype=dtype)
        start, end = default_layers(model.cfg.n_layers)
        caap = CAAP(model, layers=(start, end), context="grey", batch_size=args.batch_size)
        ideal = model.cfg.n_patches * (model.cfg.n_layers - start) / model.cfg.n_layers
        batch = pixels.expand(args.batch_size, -1, -1, -1).contiguous()
        with torch.inference_mode():
            caap.attribute(pixels, target=0)  # warm-up; the grey context is computed once here
            model(pixels), model(batch)
            t_fwd = timed(lambda: model(pixels), args.repeats * 5, sync)
            t_fwd_b = timed(lambda: model(batch), args.repeats, sync) / args.batch_size
        t_caap = timed(lambda: caap.attribute(pixels, target=0), args.repeats, sync)
        print(f"| {name} | {start}-{end} | {ideal:.1f} | {t_fwd * 1e3:.1f} ms | {t_caap:.2f} s | "
              f"{t_caap / t_fwd / ideal:.2f} | {t_caap / t_fwd_b / ideal:.2f} |", flush=True)

    if args.tl_models:
        from transformer_lens.patching import get_act_patch_resid_pre

        print("\n## layer x position resid_pre sweep: TransformerLens generic_activation_patch vs this engine\n")
        print("| model | patched runs | TransformerLens | ours | speedup | max abs difference |")
        print("|---|---|---|---|---|---|")
        for name in args.tl_models.split(","):
            torch.manual_seed(0)
            model = HookedViT.from_timm(name, pretrained=False, device=device, dtype=dtype)
            model.cfg.device = device  # generic_activation_patch allocates its output on model.cfg.device
            g = torch.Generator().manual_seed(1)
            clean = torch.randn(1, 3, *model.cfg.img_size, generator=g).to(device, dtype)
            corrupt = torch.randn(1, 3, *model.cfg.img_size, generator=g).to(device, dtype)
            with torch.inference_mode():
                _, clean_cache = model.run_with_cache(clean)
            metric_one = lambda logits: logits[0, 0]  # noqa: E731
            import transformer_lens.patching as tlp

            n_pos = model.cfg.n_ctx

            def run_tl():
                # positions are tokens, not pixels: give the index grid explicitly
                import pandas as pd

                df = pd.DataFrame([(layer, pos) for layer in range(model.cfg.n_layers) for pos in range(n_pos)],
                                  columns=["layer", "pos"])
                with torch.inference_mode():
                    return tlp.generic_activation_patch(model, corrupt, clean_cache, metric_one,
                                                        tlp.layer_pos_patch_setter, "resid_pre", index_df=df)

            def run_ours():
                return sweep(model, clean, corrupt, logit_metric(torch.tensor([0], device=device)),
                             component="resid_pre", batch_size=args.batch_size, progress=False).values[0]

            _ = get_act_patch_resid_pre  # the specialisation we mirror (it infers positions from token shape)
            sync()
            t0 = time.perf_counter()
            tl_values = run_tl()
            sync()
            t_tl = time.perf_counter() - t0
            run_ours()
            t_ours = timed(run_ours, args.repeats, sync)
            diff = (tl_values.view(model.cfg.n_layers, n_pos).float() - run_ours().float()).abs().max().item()
            print(f"| {name} | {model.cfg.n_layers * n_pos} | {t_tl:.1f} s | {t_ours:.1f} s | {t_tl / t_ours:.1f}x | "
                  f"{diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
