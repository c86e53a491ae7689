"""How fast is the patching engine? Two measurements, random weights (the speed does not depend on them).

1. CAAP for one image against the ideal: CAAP runs n_patches patched passes of (layers run) blocks, so
   its ideal cost is n_patches x (layers run) / n_layers plain forwards. We report
   (CAAP time / one plain forward's time) / ideal, with the plain forward at batch 1 (the definition) and,
   stricter, per image at the engine's batch size (what batching alone would give); each round times
   the forwards and CAAP together, and the table gives the medians over rounds.
2. The same layer x position sweep (resid_pre, every layer and token) through TransformerLens'
   `patching.generic_activation_patch` (one forward per index) and through our engine; the two
   results must agree, and we report the speedup. The two are timed in alternating rounds (the
   machine's speed drifts by 10-20% over minutes on a shared VM): medians of each, and the median of the
   per-round ratios.

Batch size: the engine's default (`caap.patching.default_batch_size`: 64 on a GPU, about 1600 tokens
per pass on a CPU) unless `--batch-size` is given.

    python experiments/speed_caap.py                    # ViT-Tiny and ViT-Base, CPU
    python experiments/speed_caap.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# before tqdm is imported (it reads the environment then): silences generic_activation_patch's bar
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from caap import CAAP
from caap.attribution import default_layers
from caap.cpu import keep_freed_memory
from caap.patching import default_batch_size, logit_score, sweep
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
    p.add_argument("--batch-size", type=int, default=None, help="rows per pass (default: the engine's default)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each sweep comparison round runs both)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc thresholds alone")
    args = p.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()  # as the command line does; it speeds both sides of the comparison (caap.cpu)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    print(f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"batch size {args.batch_size or 'engine default'}")

    print("\n## CAAP vs the ideal n_patches x (layers run) / n_layers forwards\n")
    print("| model | layers | rows per pass | ideal (forwards) | plain forward, batch 1 | CAAP, 1 image "
          "| CAAP / ideal (batch-1 forward) | CAAP / ideal (forward at the same batch) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [m for m in args.models.split(",") if m]:  # --models "": only the TransformerLens comparison
        torch.manual_seed(0)
        model = HookedViT.from_timm(name, pretrained=False, device=device, dtype=dtype)
        pixels = torch.randn(1, 3, *model.cfg.img_size, device=device, dtype=dtype)
        start, end = default_layers(model.cfg.n_layers)
        bs = args.batch_size or default_batch_size(model, model.cfg.n_ctx)
        caap = CAAP(model, layers=(start, end), context="grey", batch_size=bs)
        ideal = model.cfg.n_patches * (model.cfg.n_layers - start) / model.cfg.n_layers
        batch = pixels.expand(bs, -1, -1, -1).contiguous()
        with torch.inference_mode():
            caap.attribute(pixels, target=0)  # warm-up; the grey context is computed once here
            model(pixels), model(batch)
        rounds = []  # (forward at batch 1, forward per image at the engine's batch, CAAP), measured together
        for _ in range(args.repeats):
            with torch.inference_mode():
                t_fwd = timed(lambda: model(pixels), 5, sync)
                t_fwd_b = timed(lambda: model(batch), 3, sync) / bs
            rounds.append((t_fwd, t_fwd_b, timed(lambda: caap.attribute(pixels, target=0), 1, sync)))
        med = statistics.median
        print(f"| {name} | {start}-{end} | {bs} | {ideal:.1f} | {med(r[0] for r in rounds) * 1e3:.1f} ms | "
              f"{med(r[2] for r in rounds):.2f} s | {med(c / f / ideal for f, _, c in rounds):.2f} | "
              f"{med(c / fb / ideal for _, fb, c in rounds):.2f} |", flush=True)

    if args.tl_models:
        from transformer_lens.patching import get_act_patch_resid_pre

        print("\n## layer x position resid_pre sweep: TransformerLens generic_activation_patch vs this engine\n")
        print("| model | patched runs | rows per pass | TransformerLens (median) | ours (median) | speedup "
              "(median of rounds) | each round | max abs difference |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.tl_models.split(","):
            torch.manual_seed(0)
            model = HookedViT.from_timm(name, pretrained=False, device=device, dtype=dtype)
            g = torch.Generator().manual_seed(1)
            clean = torch.randn(1, 3, *model.cfg.img_size, generator=g).to(device, dtype)
            corrupt = torch.randn(1, 3, *model.cfg.img_size, generator=g).to(device, dtype)
            with torch.inference_mode():
                _, clean_cache = model.run_with_cache(clean)
            metric_one = lambda logits: logits[0, 0]
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
                return sweep(model, clean, corrupt, logit_score(torch.tensor([0], device=device)),
                             component="resid_pre", batch_size=args.batch_size, progress=False).values[0]

            _ = get_act_patch_resid_pre  # the specialisation we mirror (it infers positions from token shape)
            bs = args.batch_size or default_batch_size(model, n_pos)
            ours_values = run_ours()  # warm-up
            t_tl, t_ours = [], []
            for _ in range(args.repeats):  # alternate, so that a slow minute of the machine hits both
                t_tl.append(timed(run_tl, 1, sync))
                t_ours.append(timed(run_ours, 1, sync))
            tl_values = run_tl()
            diff = (tl_values.view(model.cfg.n_layers, n_pos).float() - ours_values.float()).abs().max().item()
            ratio = statistics.median(a / b for a, b in zip(t_tl, t_ours))
            rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(t_tl, t_ours))
            print(f"| {name} | {model.cfg.n_layers * n_pos} | {bs} | {statistics.median(t_tl):.1f} s | "
                  f"{statistics.median(t_ours):.1f} s | {ratio:.2f}x | {rounds} | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
