"""The `caap` command line.

    caap explain [IMAGE ...] [--model NAME] [--checkpoint PATH] [--layers S:E] [--context NAME]
                 [--target CLASS] [--out DIR]
    caap sweep IMAGE [--component resid_pre] [--target CLASS] [--context NAME] [--out DIR]

`explain` writes, per image: a PNG overlay, an interactive HTML view, the raw map (.npy) and a JSON
summary (top classes with names, settings, seconds taken). With no image it explains scikit-image's
`chelsea` photo. `sweep` writes a layer x patch grid (HTML, PNG, .npy, JSON).

Weights: `--checkpoint PATH`, else `$CAAP_CHECKPOINT_DIR/<model>.pth`, else the hub. Bad input gives one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caap.cpu import keep_freed_memory
from caap.data import DEFAULT_MODEL, class_name

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parse_layers(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise CLIError(f"--layers must look like START:END (inclusive block indices, e.g. 4:7), got {text!r}")
    return start, end


def _load_images(paths: list[str]) -> list[tuple[str, Any]]:
    if not paths:
        import skimage.data

        return [("chelsea", skimage.data.chelsea())]
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise CLIError(f"image file not found: {p}")
        out.append((Path(p).stem, p))
    return out


def _target(model: Any, text: str | None) -> int | None:
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        idx = int(text)
        if not 0 <= idx < model.cfg.n_classes:
            raise CLIError(f"--target {idx} is out of range: classes are 0..{model.cfg.n_classes - 1}")
        return idx
    from caap.data import class_names

    names = [n.lower() for n in class_names()]
    if text.lower().replace("_", " ") in names:
        return names.index(text.lower().replace("_", " "))
    raise CLIError(f"--target {text!r} is neither a class index nor an ImageNet class name")


def _top_classes(logits: torch.Tensor, k: int = 5) -> list[dict[str, Any]]:
    probs = logits.softmax(-1)
    top = probs.topk(k)
    return [
        {"class": int(i), "name": class_name(int(i)), "prob": round(float(p), 5), "logit": round(float(logits[i]), 4)}
        for p, i in zip(top.values, top.indices)
    ]


def cmd_explain(args: argparse.Namespace) -> None:
    from caap import CAAP
    from caap.models import load_model
    from caap.plots import overlay_figure, save_html, save_overlay_png

    images = _load_images(args.images)
    layers = _parse_layers(args.layers)
    model = load_model(args.model, args.checkpoint)
    target = _target(model, args.target)
    batch = [(stem, image, model.preprocess(image)) for stem, image in images]  # read every image first
    method = CAAP(model, layers=layers, context=args.context, score=args.score, batch_size=args.batch_size,
                  progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stem, image, pixels in batch:
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(pixels)[0]
        cls = int(logits.argmax()) if target is None else target
        maps = method.attribute(pixels, target=cls)
        seconds = time.perf_counter() - t0
        amap = maps[0].cpu()
        np.save(out / f"{stem}_caap.npy", amap.numpy())
        title = f"CAAP for '{class_name(cls)}' ({cls}), layers {method.layers[0]}-{method.layers[1]}, {method.context.name} context"
        save_overlay_png(pixels[0].cpu(), amap, out / f"{stem}_caap.png", title=title, data_config=model.data_config)
        fig = overlay_figure(pixels[0].cpu(), amap, data_config=model.data_config, title=title, value_label=args.score)
        save_html(fig, out / f"{stem}_caap.html")
        summary = {
            "image": str(image) if isinstance(image, str) else stem,
            "model": args.model,
            "target": {"class": cls, "name": class_name(cls)},
            "top_classes": _top_classes(logits),
            "settings": {"layers": list(method.layers), "context": method.context.name, "component": "resid",
                         "score": args.score, "batch_size": args.batch_size, "grid": list(amap.shape)},
            "seconds": round(seconds, 3),
            "files": [f"{stem}_caap.png", f"{stem}_caap.html", f"{stem}_caap.npy"],
        }
        (out / f"{stem}_caap.json").write_text(json.dumps(summary, indent=2))
        print(f"{stem}: {class_name(cls)} ({cls}) -> {out / (stem + '_caap.png')} [{seconds:.1f} s]")


def cmd_sweep(args: argparse.Namespace) -> None:
    from caap.contexts import get_context
    from caap.models import load_model
    from caap.patching import logit_metric, sweep
    from caap.plots import layer_patch_figure, save_heatmap_png, save_html

    (stem, image), = _load_images([args.image] if args.image else [])
    model = load_model(args.model, args.checkpoint)
    pixels = model.preprocess(image)
    with torch.inference_mode():
        logits = model(pixels)[0]
    target = _target(model, args.target)
    cls = int(logits.argmax()) if target is None else target
    context = get_context(args.context, model).for_sources(model, pixels)
    t0 = time.perf_counter()
    prefix = model.cfg.n_prefix_tokens
    positions = list(range(prefix, model.cfg.n_ctx)) if pixels.shape[-2:] == model.cfg.img_size else None
    result = sweep(model, pixels, context, logit_metric(torch.tensor([cls])), component=args.component,
                   positions=positions, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    grid = result.to_grid(model)
    values = grid.values[0].cpu()  # [layer, grid_h, grid_w]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{stem}_sweep_{args.component}"
    np.save(out / f"{base}.npy", values.numpy())
    title = f"{args.component} patched from '{stem}' into the {args.context} context: logit of '{class_name(cls)}'"
    save_html(layer_patch_figure(values, pixels[0].cpu(), data_config=model.data_config, title=title,
                                 value_label="logit"), out / f"{base}.html")
    save_heatmap_png(values.flatten(1), out / f"{base}.png", title=title, xlabel="patch (row-major)",
                     ylabel="layer", colorbar_label="target logit")
    summary = {"image": stem, "model": args.model, "component": args.component, "context": args.context,
               "target": {"class": cls, "name": class_name(cls)}, "dims": ["layer", "grid_h", "grid_w"],
               "target_score": float(result.target_score[0]), "source_score": float(result.source_score[0]),
               "seconds": round(seconds, 3)}
    (out / f"{base}.json").write_text(json.dumps(summary, indent=2))
    print(f"{stem}: {args.component} sweep -> {out / (base + '.html')} [{seconds:.1f} s]")


def build_parser() -> argparse.ArgumentParser:
    from caap.contexts import CONTEXT_NAMES
    from caap.patching import COMPONENTS

    parser = argparse.ArgumentParser(prog="caap", description="CAAP attribution and activation patching for ViTs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
        p.add_argument("--checkpoint", help="local timm state dict; default $CAAP_CHECKPOINT_DIR/<model>.pth, else the hub")
        p.add_argument("--context", default=None, help=f"neutral context: {', '.join(CONTEXT_NAMES)} or an image file")
        p.add_argument("--target", help="class index or ImageNet class name (default: the predicted class)")
        p.add_argument("--out", default="caap_out", help="output directory (default ./caap_out)")
        p.add_argument("--batch-size", type=int, default=None,
                       help="patched runs per forward pass (default: 64 on a GPU, about 1600 tokens on a CPU)")

    e = sub.add_parser("explain", help="CAAP maps for images (default: scikit-image's chelsea)")
    e.add_argument("images", nargs="*", help="image files")
    e.add_argument("--layers", help="START:END, inclusive block indices (default: the measured default)")
    e.add_argument("--score", default="logit_diff", choices=["logit_diff", "logit", "prob"],
                   help="logit_diff (default): target logit minus the unpatched context's")
    common(e)
    e.set_defaults(func=cmd_explain)

    s = sub.add_parser("sweep", help="layer x patch grid: each (layer, patch) patched alone")
    s.add_argument("image", nargs="?", help="image file (default: chelsea)")
    s.add_argument("--component", default="resid_pre",
                   choices=[c for c in COMPONENTS if c in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")])
    common(s)
    s.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # faster batched passes on the CPU (caap.cpu)
    if args.context is None:
        from caap.attribution.caap import DEFAULT_CONTEXT

        args.context = DEFAULT_CONTEXT
    if args.batch_size is not None and args.batch_size < 1:
        print(f"caap: error: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("caap: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, RuntimeError, OSError, KeyError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"caap: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, CLIError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
