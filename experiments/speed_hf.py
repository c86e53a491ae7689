"""Forward speed of HookedViT against its Hugging Face source, same weights, no hooks.

    python experiments/speed_hf.py                    # ViT-Base/16 at 224 (random config), batch 2
    python experiments/speed_hf.py --batch 8 --repeats 20 --threads 1

A random `ViTForImageClassification` with ViT-Base's config (12 layers, width 768, 12 heads, 224x224, 16x16
patches, 1000 classes; no download: speed does not depend on the values) and its `HookedViT.from_hf`
conversion, timed interleaved in one process (source, hooked, source, hooked, ...) under
`torch.inference_mode()` as experiments/speed_forward.py times timm; after a warm-up the medians and their
ratio hooked / source are reported, with the CPU and the instruction sets torch uses. Before timing, the two
must agree on the batch (logits to 1e-4).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import warnings

import torch

from hooked_vit import HookedViT
from speed_forward import time_interleaved


def cpu_description() -> str:
    """The CPU's model name and the vector instruction sets it reports, and torch's CPU capability."""
    name, flags = platform.processor() or "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name") and name in ("unknown CPU", "x86_64", ""):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "sse4"))]
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{name}; flags {' '.join(sorted(set(flags))) or 'unknown'}; torch CPU capability {capability}"


def bench(batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median forward times of the Hugging Face model and its HookedViT on the same weights and pixels."""
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no image processor: speed does not need one
        hooked = HookedViT.from_hf(model).eval()
    pixels = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        diff = (model(pixel_values=pixels).logits - hooked(pixels)).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"HookedViT and its source disagree (max abs diff {diff:.2e}); not timing")
        times = time_interleaved(
            {"hf": lambda: model(pixel_values=pixels), "hooked": lambda: hooked(pixels)}, repeats, warmup)
    t_hf, t_hooked = statistics.median(times["hf"]), statistics.median(times["hooked"])
    return {"hf_ms": 1e3 * t_hf, "hooked_ms": 1e3 * t_hooked, "ratio": t_hooked / t_hf,
            "min_ratio": min(times["hooked"]) / min(times["hf"]), "max_diff": diff,
            "attn": model.config._attn_implementation}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=6, help="timed rounds (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.repeats} timed rounds, medians")
    print(f"CPU: {cpu_description()}")
    r = bench(args.batch, args.repeats, args.warmup)
    print(f"{'model':<40} {'HF ms':>9} {'hooked ms':>10} {'hooked/HF':>10} {'(best/best)':>12} {'max |diff|':>11}")
    print(f"{'ViT-Base/16 224 (ViTForImageClassification)':<40} {r['hf_ms']:>9.1f} {r['hooked_ms']:>10.1f} "
          f"{r['ratio']:>10.3f} {r['min_ratio']:>12.3f} {r['max_diff']:>11.1e}")
    print(f"HF attention implementation: {r['attn']}; HookedViT: scaled_dot_product_attention (no hooks)")


if __name__ == "__main__":
    main()
