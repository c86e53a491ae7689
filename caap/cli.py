"""The `caap` command line.

    caap explain [IMAGE ...] [--model NAME] [--checkpoint PATH] [--layers S:E] [--context NAME]
                 [--target CLASS] [--out DIR] [--force]
    caap sweep [IMAGE] [--component resid_pre] [--target CLASS] [--context NAME] [--out DIR] [--force]
    caap explain-dataset SOURCE [--out DIR] [--split S] [--limit N] [--ray [--workers N] [--ray-address A]]

`explain` writes, per image: a PNG overlay, an interactive HTML view, the raw map (.npy) and a JSON
summary (top classes with names, settings, seconds taken). With no image it explains scikit-image's
`chelsea` photo. `sweep` writes a layer x patch grid (HTML, PNG, .npy, JSON). `explain-dataset` writes
Parquet shards, one row per image, and resumes where a killed run stopped (`caap.dataset`).

Weights: `--checkpoint PATH`, else `$CAAP_CHECKPOINT_DIR/<model>.pth`, else the shared models folder,
else the hub (see `caap.models`).

Order of work: every argument is checked first (names, ranges, image files, output files), against the
model's architecture read without weights; then every image is read; then the weights are loaded and the
maps computed. Each image's files are written to temporary names and renamed into place together.

Exit codes: 0 done; 2 the command line is wrong (checked before any heavy work: unknown name, bad range,
missing file, an output that already exists); 1 the work failed (an unreadable image, no weights, an
unreachable hub, ...); 130 interrupted (Ctrl-C). Every error is one line on stderr
(`CAAP_DEBUG=1` shows the traceback of an unexpected one).

This module imports only the standard library at import time: the heavy imports happen inside `main`,
where Ctrl-C is answered with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CHELSEA = "chelsea"
"""The bundled default image (scikit-image's `chelsea` photo)."""


class CLIError(Exception):
    """The command line is wrong: printed as one line, exit code 2."""


@dataclass(frozen=True)
class ImageArg:
    """One image of the command line: the name its outputs carry, and the image (a path or an array)."""

    stem: str
    image: Any


def parse_layers(text: str | None, n_layers: int) -> tuple[int, int] | None:
    """`START:END` (inclusive block indices) checked against the model's depth."""
    if text is None:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise CLIError(
            f"--layers must look like START:END (inclusive block indices, e.g. 4:7), got {text!r}"
        ) from None
    if not 0 <= start <= end < n_layers:
        raise CLIError(
            f"--layers {text} is not a valid range: need 0 <= START <= END <= {n_layers - 1} (inclusive block "
            f"indices of this {n_layers}-layer model)"
        )
    return start, end


def parse_target(text: str | None, n_classes: int) -> int | None:
    """A class index, or an ImageNet class name (for a 1000-class model); None = the predicted class."""
    if text is None:
        return None
    if text.strip().lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < n_classes:
            raise CLIError(f"--target {index} is out of range: classes are 0..{n_classes - 1}")
        return index
    if n_classes != 1000:
        raise CLIError(f"--target {text!r}: class names are ImageNet-1k's; this model has {n_classes} classes, "
                       f"pass an index 0..{n_classes - 1}")
    from caap.data import class_index

    try:
        return class_index(text)
    except ValueError as e:
        raise CLIError(f"--target: {e}") from None


def image_args(paths: list[str]) -> list[ImageArg]:
    """The images to explain, each with a name for its outputs that is unique within the run: the file
    stem, or for files that share a stem (`a/x.jpg`, `b/x.jpg`) the path that tells them apart."""
    if not paths:
        import skimage.data

        return [ImageArg(CHELSEA, skimage.data.chelsea())]
    resolved = [Path(p).resolve() for p in paths]
    for p, r in zip(paths, resolved):
        if not r.is_file():
            raise CLIError(f"image file not found: {p}" if not r.exists() else f"not a file: {p}")
    if len(set(resolved)) < len(resolved):
        twice = next(p for p, r in zip(paths, resolved) if resolved.count(r) > 1)
        raise CLIError(f"image {twice} is given twice")
    plain = [r.stem for r in resolved]
    stems = list(plain)
    if len(set(stems)) < len(stems):
        root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
        stems = ["_".join(r.relative_to(root).with_suffix("").parts) if plain.count(s) > 1 else s
                 for r, s in zip(resolved, plain)]
        if len(set(stems)) < len(stems):  # x.jpg beside x.png: keep the extension too
            stems = ["_".join(r.relative_to(root).parts) if stems.count(s) > 1 else s for r, s in zip(resolved, stems)]
    return [ImageArg(stem, str(p)) for stem, p in zip(stems, paths)]


def output_folder(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {text} is a file; it must be a folder (created if missing)")
    return out


def check_new_outputs(paths: list[Path], force: bool) -> None:
    """Refuse to overwrite an earlier run's files unless `--force`."""
    if force:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise CLIError(f"output {existing[0]} already exists{more}; pass --force to overwrite, or --out NEW_FOLDER")


def check_context(spec: str) -> None:
    from caap.contexts import check_context_spec

    try:
        check_context_spec(spec)
    except ValueError as e:
        raise CLIError(str(e)) from None


def architecture(name: str, checkpoint: str | None) -> tuple[Any, dict[str, Any]]:
    """(HookedViTConfig, data config) of `--model`, read without weights; and `--checkpoint` exists."""
    from caap.models import is_hf_folder, model_config

    if checkpoint is not None and is_hf_folder(name):
        raise CLIError(f"--checkpoint is for timm model names; the Hugging Face folder {name} holds its own weights")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CLIError(f"checkpoint file not found: {checkpoint}")
    try:
        return model_config(name)
    except ValueError as e:  # unknown timm name, or not a ViT HookedViT converts (UnsupportedFeature)
        raise CLIError(f"--model {name}: {e}") from None


def read_pixels(images: list[ImageArg], data_config: dict[str, Any]) -> list[Any]:
    """Every image as pixels [1, 3, H, W] (all are read before the heavy work starts)."""
    from hooked_vit.preprocess import preprocess

    return [preprocess(im.image, data_config) for im in images]


def _top_classes(logits: Any, model: Any, k: int = 5) -> list[dict[str, Any]]:
    from caap.models import class_label

    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    return [
        {"class": int(i), "name": class_label(model, int(i)), "prob": round(float(p), 5), "logit": round(float(logits[i]), 4)}
        for p, i in zip(top.values, top.indices)
    ]


def cmd_explain(args: argparse.Namespace) -> None:
    images = image_args(args.images)
    out = output_folder(args.out)
    suffixes = ("png", "html", "npy", "json")  # the JSON last: it marks an image as complete
    files = {im.stem: [out / f"{im.stem}_caap.{ext}" for ext in suffixes] for im in images}
    check_new_outputs([p for paths in files.values() for p in paths], args.force)
    check_context(args.context)
    cfg, data_config = architecture(args.model, args.checkpoint)
    layers = parse_layers(args.layers, cfg.n_layers)
    target = parse_target(args.target, cfg.n_classes)
    pixels = read_pixels(images, data_config)

    import numpy as np
    import torch

    from caap import CAAP
    from caap.files import atomic_paths
    from caap.models import class_label, load_model
    from caap.plots import overlay_figure, save_html, save_overlay_png

    model = load_model(args.model, args.checkpoint)
    method = CAAP(model, layers=layers, context=args.context, score=args.score, batch_size=args.batch_size,
                  progress=True)
    out.mkdir(parents=True, exist_ok=True)
    for im, x in zip(images, pixels):
        x = x.to(model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(x)[0]
        cls = int(logits.argmax()) if target is None else target
        amap = method.attribute(x, target=cls)[0].float().cpu()
        seconds = time.perf_counter() - t0
        start, end = method.layers
        title = f"CAAP for '{class_label(model, cls)}' ({cls}), layers {start}-{end}, {method.context.name} context"
        summary = {
            "image": im.image if isinstance(im.image, str) else im.stem,
            "model": args.model,
            "target": {"class": cls, "name": class_label(model, cls)},
            "top_classes": _top_classes(logits, model),
            "settings": {"layers": [start, end], "context": method.context.name, "component": method.component,
                         "score": args.score, "batch_size": args.batch_size, "grid": list(amap.shape)},
            "seconds": round(seconds, 3),
            "files": [p.name for p in files[im.stem][:3]],
        }
        with atomic_paths(files[im.stem]) as (png, html, npy, js):
            save_overlay_png(x[0].float().cpu(), amap, png, title=title, data_config=model.data_config)
            save_html(overlay_figure(x[0].float().cpu(), amap, data_config=model.data_config, title=title,
                                     value_label=args.score), html)
            np.save(npy, amap.numpy())
            js.write_text(json.dumps(summary, indent=2))
        print(f"{im.stem}: {class_label(model, cls)} ({cls}) -> {files[im.stem][0]} [{seconds:.1f} s]")
    print(f"wrote {len(images) * len(suffixes)} files to {out}/ (PNG overlay, HTML view, .npy map, JSON summary)")


def cmd_sweep(args: argparse.Namespace) -> None:
    (image,) = image_args([args.image] if args.image else [])
    out = output_folder(args.out)
    base = f"{image.stem}_sweep_{args.component}"
    files = [out / f"{base}.{ext}" for ext in ("npy", "html", "png", "json")]
    check_new_outputs(files, args.force)
    check_context(args.context)
    cfg, data_config = architecture(args.model, args.checkpoint)
    target = parse_target(args.target, cfg.n_classes)
    (pixels,) = read_pixels([image], data_config)

    import numpy as np
    import torch

    from caap.contexts import get_context
    from caap.files import atomic_paths
    from caap.models import class_label, load_model
    from caap.patching import logit_score, sweep
    from caap.plots import layer_patch_figure, save_heatmap_png, save_html

    model = load_model(args.model, args.checkpoint)
    pixels = pixels.to(model.device)
    with torch.inference_mode():
        logits = model(pixels)[0]
    cls = int(logits.argmax()) if target is None else target
    context = get_context(args.context, model).bind(model, pixels)
    t0 = time.perf_counter()
    prefix = model.cfg.n_prefix_tokens
    positions = list(range(prefix, model.cfg.n_ctx)) if tuple(pixels.shape[-2:]) == tuple(model.cfg.img_size) else None
    result = sweep(model, pixels, context, logit_score(torch.tensor([cls])), component=args.component,
                   positions=positions, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    values = result.to_grid(model).values[0].float().cpu()  # [layer, grid_h, grid_w]
    title = f"{args.component} patched from '{image.stem}' into the {args.context} context: logit of '{class_label(model, cls)}'"
    summary = {"image": image.image if isinstance(image.image, str) else image.stem, "model": args.model,
               "component": args.component, "context": args.context,
               "target": {"class": cls, "name": class_label(model, cls)}, "dims": ["layer", "grid_h", "grid_w"],
               "context_score": float(result.context_score[0]), "source_score": float(result.source_score[0]),
               "seconds": round(seconds, 3)}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(files) as (npy, html, png, js):
        np.save(npy, values.numpy())
        save_html(layer_patch_figure(values, pixels[0].float().cpu(), data_config=model.data_config, title=title,
                                     value_label="logit"), html)
        save_heatmap_png(values.flatten(1), png, title=title, xlabel="patch (row-major)", ylabel="layer",
                         colorbar_label="target logit")
        js.write_text(json.dumps(summary, indent=2))
    print(f"{image.stem}: {args.component} sweep -> {files[1]} [{seconds:.1f} s]")


def cmd_explain_dataset(args: argparse.Namespace) -> None:
    from caap.dataset import DatasetSettings, check_ray_address, plan_dataset

    if not os.path.exists(args.source):
        raise CLIError(f"no such folder or file: {args.source}")
    output_folder(args.out)
    check_context(args.context)
    cfg, _ = architecture(args.model, args.checkpoint)
    layers = parse_layers(args.layers, cfg.n_layers)
    target = args.target
    if target not in ("auto", "label", "predicted"):
        target = str(parse_target(target, cfg.n_classes))
    if args.ray or args.ray_address:
        from caap.dataset import _import_ray

        try:
            _import_ray()
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        if args.ray_address:
            try:
                check_ray_address(args.ray_address)
            except ValueError as e:
                raise CLIError(str(e)) from None
    try:  # a bad source, split or output fails here, at once, before any work
        settings = DatasetSettings(model=args.model, checkpoint=args.checkpoint, layers=layers, context=args.context,
                                   score=args.score, target=target, precision=args.precision, device=args.device)
        job = plan_dataset(args.source, args.out, settings, split=args.split, limit=args.limit)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    summary = job.run(shard_size=args.shard_size, ray=bool(args.ray or args.ray_address),
                      ray_address=args.ray_address, workers=args.workers)
    rate = f", {summary['images_per_second']} images/s" if summary["images_per_second"] else ""
    print(f"{summary['explained']} explained, {summary['failed']} failed, {summary['already_done']} already done "
          f"({summary['non_image_files']} non-image files skipped){rate} -> {summary['folder']}")


SWEEP_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the error into one line and exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from caap.attribution.caap import CAAP_SCORES, DEFAULT_CONTEXT, PRECISIONS
    from caap.contexts import CONTEXT_NAMES
    from caap.data import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="caap", description="CAAP attribution and activation patching for ViTs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name, or a Hugging Face model folder (save_pretrained) (default {DEFAULT_MODEL})")
        p.add_argument("--checkpoint", help="local timm state dict; default $CAAP_CHECKPOINT_DIR/<model>.pth, "
                                            "else ../shared/models/<model>.pth, else the hub")
        p.add_argument("--context", default=DEFAULT_CONTEXT,
                       help=f"neutral context: {', '.join(CONTEXT_NAMES)} or an image file (a name always means "
                            f"the context; write ./{DEFAULT_CONTEXT} for a file of that name); default {DEFAULT_CONTEXT}")
        p.add_argument("--target", help="class index or ImageNet class name (default: the predicted class)")
        p.add_argument("--out", default="caap_out", help="output folder (default ./caap_out)")
        p.add_argument("--force", action="store_true", help="overwrite outputs of an earlier run")
        p.add_argument("--batch-size", type=positive_int, default=None,
                       help="patched runs per forward pass (default: 64 on a GPU, about 1600 tokens on a CPU)")

    e = sub.add_parser("explain", help="CAAP maps for images (default: scikit-image's chelsea)")
    e.add_argument("images", nargs="*", help="image files")
    e.add_argument("--layers", help="START:END, inclusive block indices (default: the measured default)")
    e.add_argument("--score", default="logit_diff", choices=CAAP_SCORES,
                   help="logit_diff (default): target logit minus the unpatched context's")
    common(e)
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("explain-dataset", help="CAAP maps for a whole folder / manifest / list -> Parquet shards "
                                               "(resumable; --ray for Ray Data)")
    d.add_argument("source", help="a folder of images, a manifest folder (manifest.csv) or its CSV, or a list "
                                  "file (.txt, one path per line)")
    d.add_argument("--out", default="caap_dataset", help="output folder (default ./caap_dataset); one subfolder "
                                                         "per settings hash")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name, or a Hugging Face model folder (save_pretrained) (default {DEFAULT_MODEL})")
    d.add_argument("--checkpoint", help="local timm state dict (default: as for explain)")
    d.add_argument("--layers", help="START:END, inclusive block indices (default: the measured default)")
    d.add_argument("--context", default=DEFAULT_CONTEXT, help=f"neutral context (default {DEFAULT_CONTEXT})")
    d.add_argument("--score", default="logit_diff", choices=CAAP_SCORES)
    d.add_argument("--target", default="auto", help="auto (default: the manifest's class where there is one, else "
                                                    "the predicted class), label, predicted, or a class index / name")
    d.add_argument("--split", help="a split of the manifest (e.g. heldout)")
    d.add_argument("--limit", type=positive_int, help="only the first N images")
    d.add_argument("--shard-size", type=positive_int, default=32, help="images per Parquet shard (default 32)")
    d.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: matrix products in bfloat16 under autocast, residual stream and score in fp32 (the "
                        "fastest, maps close to fp32); bf16_delta: bf16 products of the differences from the "
                        "context run (maps within rounding of fp32, less of a speed-up); README, bf16")
    d.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    d.add_argument("--ray", action="store_true", help="run on Ray Data (local Ray unless --ray-address)")
    d.add_argument("--ray-address", help="an existing Ray cluster, HOST:PORT or ray://HOST:PORT (implies --ray)")
    d.add_argument("--workers", type=positive_int, default=1, help="Ray actors, each loading the model once (default 1; "
                                                                "on GPUs one actor per GPU)")
    d.set_defaults(func=cmd_explain_dataset)

    s = sub.add_parser("sweep", help="layer x patch grid: each (layer, patch) patched alone")
    s.add_argument("image", nargs="?", help="image file (default: chelsea)")
    s.add_argument("--component", default="resid_pre", choices=SWEEP_COMPONENTS)
    common(s)
    s.set_defaults(func=cmd_sweep)
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 itself on a malformed command line
    from caap.cpu import keep_freed_memory

    keep_freed_memory()  # faster batched passes on the CPU (caap.cpu)
    try:
        args.func(args)
    except CLIError as e:
        print(f"caap: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # the work failed: one line, unless asked for the traceback
        if os.environ.get("CAAP_DEBUG"):
            raise
        known = isinstance(e, (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError, TypeError))
        message = _one_line(e) if known else f"{type(e).__name__}: {_one_line(e)} (CAAP_DEBUG=1 shows the traceback)"
        print(f"caap: error: {message}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1, 2 or 130, see the module docstring)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # also during the heavy imports
        print("caap: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
