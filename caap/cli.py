"""The `caap` command line.

    caap explain [IMAGE ...] [--method NAME[,NAME ...]] [--option KEY=VALUE ...] [--layers S:E] [--context C]
    caap methods [NAME]
    caap sweep [IMAGE] [--component resid_pre] [--context C]
    caap explain-dataset SOURCE [--method NAME] [--option KEY=VALUE ...] [--split S] [--limit N] [--ray ...]
    caap evaluate MAPS --data MANIFEST [--split S] [--limit N] [--metrics a,b] [--steps N]

Every subcommand that runs a model takes the same flags, with one meaning (`add_model_flags`): `--model`
(a timm name), `--checkpoint` (weights file), `--device`, `--precision`, `--target`, `--batch-size`,
`--out`, `--force`.

`explain` writes, per image and method: a PNG overlay, an interactive HTML view, the raw map (.npy) and a
JSON summary (top classes with names, settings, seconds taken); with several methods (`--method a,b,c`),
each method's .npy map and one comparison: the photo and one overlay per method (PNG, and an HTML view
with one button per method) and one JSON with every method's settings and seconds. With no image it
explains scikit-image's `chelsea` photo. `methods` lists the methods (what each computes, its paper, its
measured cost per image) or one method's options. `sweep` writes a layer x patch grid (HTML, PNG, .npy,
JSON). `explain-dataset` writes Parquet shards, one row per image, and resumes where a killed run stopped
(`caap.dataset`). `evaluate` scores maps (a folder of .npy files, or an explain-dataset output) with the
benchmark's metrics on the images of a manifest (`caap.evaluation`).

Weights: `--checkpoint PATH`, else `$CAAP_CHECKPOINT_DIR/<model>.pth`, else the shared models folder,
else the hub (see `caap.models`).

Order of work: every argument is checked first (names, ranges, method options, image files, output
folders and files), against the model's architecture read without weights; then every image is read;
then the weights are loaded and the maps computed. Each image's files are written to temporary names and
renamed into place together.

Exit codes: 0 done; 2 the command line is wrong (checked before any heavy work: an unknown name, a bad
range or option, a missing file, an output folder that cannot be created, an output that already
exists); 1 the work failed (an unreadable image, no weights, an unreachable hub, ...) or is incomplete
(`evaluate`: images without a map); 130 interrupted (Ctrl-C). Every error is one line on stderr
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CHELSEA = "chelsea"
"""The bundled default image (scikit-image's `chelsea` photo)."""
TARGET_WORDS = ("auto", "label", "predicted")
"""`--target` words: auto (the default: the manifest's class where the input has one, else the predicted
class), label (the manifest's class), predicted (the model's top class)."""
COMPARE = "compare"
"""The file name part of a comparison of several methods (`<stem>_compare.png`)."""


class CLIError(Exception):
    """The command line is wrong: printed as one line, exit code 2."""


@dataclass(frozen=True)
class ImageArg:
    """One image of the command line: the name its outputs carry, and the image (a path or an array)."""

    stem: str
    image: Any


# ------------------------------------------------------------------------------------------- checks
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
    return check_layers((start, end), n_layers, text)


def check_layers(layers: tuple[int, int], n_layers: int, text: str) -> tuple[int, int]:
    start, end = layers
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


def parse_target_arg(text: str | None, n_classes: int, labels: bool) -> str | int:
    """`--target` as every subcommand reads it: "auto" (also for no flag), "label", "predicted", or a class
    index (from an index or an ImageNet class name). `labels`: whether the input can have a manifest's class."""
    if text is None or text.strip().lower() == "auto":
        return "auto"
    word = text.strip().lower()
    if word in ("label", "predicted"):
        if word == "label" and not labels:
            raise CLIError("--target label means the manifest's class, and images given on the command line have "
                           "none; give a class index or name, or predicted")
        return word
    return parse_target(text, n_classes)


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


def output_folder(text: str, flag: str = "--out") -> Path:
    """The output folder, checked before any work: a folder that exists and can be written, or one that
    can be created (no file in its path, write permission where it would be created)."""
    out = Path(text)
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"{flag} {text} is a file; it must be a folder (created if missing)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {text}: permission denied: this folder cannot be written")
        return out
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise CLIError(f"{flag} {text} cannot be created: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CLIError(f"{flag} {text} cannot be created: permission denied in {parent}")
            break
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


def load(args: argparse.Namespace) -> Any:
    """The model of `--model` / `--checkpoint` on `--device` (after every check)."""
    from caap.models import load_model

    return load_model(args.model, args.checkpoint, device=args.device)


# ------------------------------------------------------------------------------------------- methods
def method_kwargs(args: argparse.Namespace, cfg: Any, several: bool) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The chosen methods and each one's constructor keywords: `--option`, CAAP's own flags (`--layers`,
    `--context`, `--score`), `--batch-size` and `--precision`; all checked before any weights load."""
    from caap.methods import method_options, parse_method_list, parse_options

    try:
        names = parse_method_list(args.method)
    except ValueError as e:
        raise CLIError(f"--method: {e}") from None
    if len(names) > 1 and not several:
        raise CLIError(f"--method {args.method}: this command takes one method (explain compares several)")
    try:
        kwargs = parse_options(names, args.option or [])
    except ValueError as e:
        raise CLIError(str(e)) from None
    flags = {"layers": args.layers, "context": args.context, "score": args.score}
    given = [f for f, v in flags.items() if v is not None]
    if given and "caap" not in names:
        raise CLIError(f"--{given[0]} is a setting of CAAP, which is not among --method {','.join(names)}; "
                       f"another method's settings go in --option KEY=VALUE (caap methods NAME lists them)")
    if "caap" in names:
        caap = kwargs["caap"]
        for flag in given:
            if flag in caap:
                raise CLIError(f"CAAP's {flag} is given twice (--{flag} and --option); give it once")
        if args.layers is not None:
            caap["layers"] = parse_layers(args.layers, cfg.n_layers)
        elif "layers" in caap and caap["layers"] is not None:
            caap["layers"] = check_layers(caap["layers"], cfg.n_layers, ":".join(map(str, caap["layers"])))
        if args.context is not None:
            caap["context"] = args.context
        if "context" in caap:
            check_context(caap["context"])
        if args.score is not None:
            caap["score"] = args.score
        from caap.attribution.caap import CAAP_SCORES

        if caap.get("score", "logit_diff") not in CAAP_SCORES:
            raise CLIError(f"CAAP's score {caap['score']!r} is not accepted; accepted: {', '.join(CAAP_SCORES)}")
    takes_precision = [n for n in names if "precision" in _parameters(n)]
    if args.precision != "fp32":
        fp32_only = [n for n in names if n not in takes_precision]
        if fp32_only:
            raise CLIError(f"--precision {args.precision}: {', '.join(fp32_only)} run only in fp32 (--precision is "
                           f"CAAP's patched runs' setting); drop it or choose caap")
    for n in names:
        params = _parameters(n)
        if "precision" in params:
            kwargs[n]["precision"] = args.precision
        for b in ("batch_size", "internal_batch_size"):
            if args.batch_size is not None and b in params:
                kwargs[n][b] = args.batch_size
        if "progress" in params:
            kwargs[n]["progress"] = not several
        method_options(n)  # the options of every method resolve (an annotation error shows here, not after load)
    return names, kwargs


def _parameters(name: str) -> set[str]:
    import inspect

    from caap.methods import method_class

    return set(list(inspect.signature(method_class(name).__init__).parameters)[2:])


def build_methods(model: Any, kwargs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each method built for the loaded model; a value its constructor refuses is a usage error."""
    from caap.methods import get_method

    out = {}
    for name, kw in kwargs.items():
        try:
            out[name] = get_method(name, model, **kw)
        except (ValueError, TypeError) as e:
            raise CLIError(f"{name}: {e}") from None
    return out


# ------------------------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> None:
    images = image_args(args.images)
    out = output_folder(args.out)
    cfg, data_config = architecture(args.model, args.checkpoint)
    names, kwargs = method_kwargs(args, cfg, several=True)
    several = len(names) > 1
    if several:
        compare = ("png", "html", "json")  # the JSON last: it marks an image as complete
        files = {im.stem: [out / f"{im.stem}_{m}.npy" for m in names] + [out / f"{im.stem}_{COMPARE}.{e}"
                                                                           for e in compare] for im in images}
    else:
        files = {im.stem: [out / f"{im.stem}_{names[0]}.{e}" for e in ("png", "html", "npy", "json")] for im in images}
    check_new_outputs([p for paths in files.values() for p in paths], args.force)
    target = parse_target_arg(args.target, cfg.n_classes, labels=False)
    pixels = read_pixels(images, data_config)

    import numpy as np
    import torch

    from caap.files import atomic_paths
    from caap.methods import method_settings
    from caap.models import class_label
    from caap.plots import comparison_figure, overlay_figure, save_comparison_png, save_html, save_overlay_png

    model = load(args)
    methods = build_methods(model, kwargs)
    out.mkdir(parents=True, exist_ok=True)
    for im, x in zip(images, pixels):
        x = x.to(model.device)
        with torch.inference_mode():
            logits = model(x)[0]
        cls = int(logits.argmax()) if target in ("auto", "predicted") else int(target)
        maps, seconds = {}, {}
        for name, method in methods.items():
            t0 = time.perf_counter()
            maps[name] = method.attribute(x, target=cls)[0].detach().float().cpu()
            seconds[name] = time.perf_counter() - t0
            if several:
                print(f"{im.stem}: {name} [{seconds[name]:.1f} s]", flush=True)
        base = {
            "image": im.image if isinstance(im.image, str) else im.stem,
            "model": args.model,
            "target": {"class": cls, "name": class_label(model, cls)},
            "top_classes": _top_classes(logits, model),
        }
        photo = x[0].float().cpu()
        if several:
            summary = {**base, "methods": {
                n: {"settings": method_settings(methods[n], kwargs[n]), "seconds": round(seconds[n], 3),
                    "map": files[im.stem][i].name, "shape": list(maps[n].shape)} for i, n in enumerate(names)},
                "files": [p.name for p in files[im.stem][:-1]]}
            title = f"{im.stem}: maps for '{class_label(model, cls)}' ({cls})"
            subtitles = {n: f"{seconds[n]:.2f} s" for n in names}
            with atomic_paths(files[im.stem]) as paths:
                for n, npy in zip(names, paths):
                    np.save(npy, maps[n].numpy())
                png, html, js = paths[len(names):]
                save_comparison_png(photo, maps, png, data_config=model.data_config, title=title, subtitles=subtitles)
                save_html(comparison_figure(photo, maps, data_config=model.data_config, title=title,
                                            subtitles=subtitles, value_label="attribution"), html)
                js.write_text(json.dumps(summary, indent=2))
            print(f"{im.stem}: {class_label(model, cls)} ({cls}) -> {files[im.stem][-3]}")
            continue
        (name,) = names
        method, amap = methods[name], maps[name]
        if name == "caap":
            start, end = method.layers
            title = f"CAAP for '{class_label(model, cls)}' ({cls}), layers {start}-{end}, {method.context.name} context"
            label = method.score
        else:
            title, label = f"{name} for '{class_label(model, cls)}' ({cls})", "attribution"
        summary = {**base, "method": name, "settings": {**method_settings(method, kwargs[name]),
                                                        "grid": list(amap.shape)},
                   "seconds": round(seconds[name], 3), "files": [p.name for p in files[im.stem][:3]]}
        with atomic_paths(files[im.stem]) as (png, html, npy, js):
            save_overlay_png(photo, amap, png, title=title, data_config=model.data_config)
            save_html(overlay_figure(photo, amap, data_config=model.data_config, title=title, value_label=label), html)
            np.save(npy, amap.numpy())
            js.write_text(json.dumps(summary, indent=2))
        print(f"{im.stem}: {class_label(model, cls)} ({cls}) -> {files[im.stem][0]} [{seconds[name]:.1f} s]")
    if several:
        print(f"wrote {sum(len(v) for v in files.values())} files to {out}/ (a .npy map per method; the comparison "
              f"as PNG, HTML view and JSON with every method's settings and seconds)")
    else:
        print(f"wrote {len(images) * 4} files to {out}/ (PNG overlay, HTML view, .npy map, JSON summary)")


# ------------------------------------------------------------------------------------------- methods
def cmd_methods(args: argparse.Namespace) -> None:
    from caap.methods import METHODS, measured_costs, method_class, method_options

    if args.name:
        try:
            cls = method_class(args.name)
        except ValueError as e:
            raise CLIError(str(e)) from None
        print(f"{cls.name}: {cls.summary}")
        print(f"paper: {cls.paper}")
        print(f"maps: {'on the patch grid' if cls.resolution == 'patch' else 'at the pixels'}")
        options = method_options(cls.name)
        print("options (--option KEY=VALUE):" if options else "options: none")
        for o in options.values():
            print(f"  {o.describe()}")
        return
    costs = measured_costs()
    any_cost = next(iter(costs.values()), None)
    width = max(map(len, METHODS))
    print(f"{len(METHODS)} attribution methods (caap explain --method NAME; caap methods NAME lists its options)")
    if any_cost is not None:
        print(f"cost: seconds per image for the maps alone, measured on {any_cost.model} with {any_cost.machine} "
              f"({any_cost.source}, {any_cost.images} images; in parentheses where that run's settings differ from "
              f"the method's defaults)")
    print()
    for name, cls in METHODS.items():
        cost = costs[name].describe() if name in costs else "not measured"
        print(f"{name:<{width}}  {cost:<22}  {cls.paper}")
        print(f"{'':<{width}}  {cls.summary}")


# ------------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> None:
    from caap.models import class_label
    (image,) = image_args([args.image] if args.image else [])
    out = output_folder(args.out)
    base = f"{image.stem}_sweep_{args.component}"
    files = [out / f"{base}.{ext}" for ext in ("npy", "html", "png", "json")]
    check_new_outputs(files, args.force)
    context_spec = args.context or _default_context()
    check_context(context_spec)
    if args.precision not in SWEEP_PRECISIONS:
        raise CLIError(f"--precision {args.precision}: sweep accepts {', '.join(SWEEP_PRECISIONS)} (bf16_delta is "
                       f"CAAP's)")
    cfg, data_config = architecture(args.model, args.checkpoint)
    target = parse_target_arg(args.target, cfg.n_classes, labels=False)
    (pixels,) = read_pixels([image], data_config)

    import numpy as np
    import torch

    from caap.contexts import get_context
    from caap.files import atomic_paths
    from caap.patching import logit_score, sweep
    from caap.plots import layer_patch_figure, save_heatmap_png, save_html

    model = load(args)
    pixels = pixels.to(model.device)
    with torch.inference_mode():
        logits = model(pixels)[0]
    cls = int(logits.argmax()) if target in ("auto", "predicted") else int(target)
    context = get_context(context_spec, model).bind(model, pixels)
    t0 = time.perf_counter()
    prefix = model.cfg.n_prefix_tokens
    positions = list(range(prefix, model.cfg.n_ctx)) if tuple(pixels.shape[-2:]) == tuple(model.cfg.img_size) else None
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        result = sweep(model, pixels, context, logit_score(torch.tensor([cls])), component=args.component,
                       positions=positions, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    values = result.to_grid(model).values[0].float().cpu()  # [layer, grid_h, grid_w]
    title = f"{args.component} patched from '{image.stem}' into the {context_spec} context: logit of '{class_label(model, cls)}'"
    summary = {"image": image.image if isinstance(image.image, str) else image.stem, "model": args.model,
               "component": args.component, "context": context_spec, "precision": args.precision,
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


def _default_context() -> str:
    from caap.attribution.caap import DEFAULT_CONTEXT

    return DEFAULT_CONTEXT


SWEEP_PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------------------- explain-dataset
def cmd_explain_dataset(args: argparse.Namespace) -> None:
    from caap.dataset import DatasetSettings, check_ray_address, plan_dataset

    if not os.path.exists(args.source):
        raise CLIError(f"no such folder or file: {args.source}")
    output_folder(args.out)
    cfg, _ = architecture(args.model, args.checkpoint)
    (name,), kwargs = method_kwargs(args, cfg, several=False)
    target = parse_target_arg(args.target, cfg.n_classes, labels=True)
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
    own = {k: v for k, v in kwargs[name].items() if k not in ("precision", "batch_size", "internal_batch_size",
                                                                "progress")}
    caap_fields = {k: own.pop(k) for k in ("layers", "context", "component", "score") if k in own and name == "caap"}
    try:  # a bad source, split or output fails here, at once, before any work
        settings = DatasetSettings(model=args.model, checkpoint=args.checkpoint, target=str(target),
                                   precision=args.precision, device=args.device, method=name, options=own,
                                   batch_size=args.batch_size, allow_slow_bf16=args.allow_slow_bf16, **caap_fields)
        job = plan_dataset(args.source, args.out, settings, split=args.split, limit=args.limit)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if args.force:  # explain every image again: this settings folder's earlier shards go first
        for shard in job.store.shards():
            shard.unlink()
    summary = job.run(shard_size=args.shard_size, ray=bool(args.ray or args.ray_address),
                      ray_address=args.ray_address, workers=args.workers)
    rate = f", {summary['images_per_second']} images/s" if summary["images_per_second"] else ""
    print(f"{summary['explained']} explained, {summary['failed']} failed, {summary['already_done']} already done "
          f"({summary['non_image_files']} non-image files skipped){rate} -> {summary['folder']}")


# ------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from caap.evaluation import plan_evaluation
    from caap.files import file_digest
    from caap.models import find_checkpoint

    out = output_folder(args.out)
    metrics = [m.strip().lower().replace("-", "_") for m in args.metrics.split(",") if m.strip()] \
        if args.metrics and args.metrics.strip() != "all" else None
    cfg, _ = architecture(args.model, args.checkpoint)
    target = parse_target_arg(args.target, cfg.n_classes, labels=True)
    try:
        path = find_checkpoint(args.model, args.checkpoint)
        plan = plan_evaluation(
            args.maps, args.data, out, metrics, model_name=args.model, grid=tuple(cfg.grid_size),
            img_size=tuple(cfg.img_size), weights=f"sha256:{file_digest(path)}" if path else f"hub:{args.model}",
            split=args.split, limit=args.limit, target=target, batch_size=args.batch_size or 64, steps=args.steps,
            aopc_steps=args.aopc_steps, force=args.force)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    for line in plan.warnings:
        print(f"caap: warning: {line}", file=sys.stderr)
    missing = {m: v for m, v in plan.missing().items() if v}
    n = len(plan.samples)
    for method, images in missing.items():
        print(f"caap: warning: {len(images)} of {n} images have no {method} map in {args.maps} (first: {images[0]}); "
              f"the other {n - len(images)} are scored", file=sys.stderr)
    model = load(args)
    result = plan.run(model)
    print()
    print(result["summary"].rstrip("\n"))
    print()
    print(f"scored {result['computed']} maps ({result['reused']} kept from an earlier run) -> {out / 'per_image.csv'}, "
          f"summary.md, summary.csv")
    return EXIT_FAILED if missing else 0


# ------------------------------------------------------------------------------------------- parser
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


TARGET_HELP = ("the class: an index, an ImageNet class name, 'predicted' (the model's top class) or 'label' (the "
               "manifest's class); default auto: the manifest's class where the input has one, else the predicted "
               "class")


def add_model_flags(p: argparse.ArgumentParser, out: str, out_help: str, precision: bool = True,
                    batch_help: str = "patched runs (or a method's rows) per forward pass (default: the method's)"
                    ) -> None:
    """The flags every subcommand that runs a model shares, with one meaning: --model, --checkpoint,
    --device, --precision, --target, --batch-size, --out, --force."""
    from caap.attribution.caap import PRECISIONS
    from caap.data import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="local timm state dict; default $CAAP_CHECKPOINT_DIR/<model>.pth, "
                                        "else ../shared/models/<model>.pth, else the hub")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    if precision:
        p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="fp32 (default); bf16: matrix products in bfloat16 under autocast (the fastest, maps close "
                            "to fp32); bf16_delta: CAAP's bf16 products of the differences from the context run (maps "
                            "within rounding of fp32, less of a speed-up)")
    p.add_argument("--target", help=TARGET_HELP)
    p.add_argument("--batch-size", type=positive_int, default=None, help=batch_help)
    p.add_argument("--out", default=out, help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite the outputs of an earlier run")


def add_context_flag(p: argparse.ArgumentParser, what: str) -> None:
    from caap.attribution.caap import DEFAULT_CONTEXT
    from caap.contexts import CONTEXT_NAMES

    p.add_argument("--context", default=None,
                   help=f"{what}: {', '.join(CONTEXT_NAMES)} or an image file (a name always means the context; "
                        f"write ./{DEFAULT_CONTEXT} for a file of that name); default {DEFAULT_CONTEXT}")


def add_method_flags(p: argparse.ArgumentParser, several: bool) -> None:
    from caap.attribution.caap import CAAP_SCORES

    p.add_argument("--method", default="caap",
                   help=("attribution method(s), a comma list compares them (default caap; caap methods lists them)"
                         if several else "attribution method (default caap; caap methods lists them)"))
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method's setting (a keyword of its constructor), repeatable: n_masks=1000 goes to every "
                        "chosen method that takes it, rise.n_masks=1000 to one; caap methods NAME lists them")
    p.add_argument("--layers", help="CAAP: START:END, inclusive block indices (default: the measured default)")
    add_context_flag(p, "CAAP's neutral context")
    p.add_argument("--score", default=None, choices=CAAP_SCORES,
                   help="CAAP: logit_diff (default): target logit minus the unpatched context's")


def build_parser() -> argparse.ArgumentParser:
    from caap.metrics.protocol import AOPC_STEPS, STEPS

    parser = argparse.ArgumentParser(prog="caap", description="Attribution methods, activation patching and "
                                                              "metrics for ViTs (CAAP and 20 other methods)")
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("explain", help="maps of one method or several side by side (default: CAAP on "
                                       "scikit-image's chelsea)")
    e.add_argument("images", nargs="*", help="image files")
    add_method_flags(e, several=True)
    add_model_flags(e, "caap_out", "output folder (default ./caap_out)")
    e.set_defaults(func=cmd_explain)

    m = sub.add_parser("methods", help="the attribution methods: what each computes, its paper, its measured cost")
    m.add_argument("name", nargs="?", help="one method: its options")
    m.set_defaults(func=cmd_methods)

    s = sub.add_parser("sweep", help="layer x patch grid: each (layer, patch) patched alone")
    s.add_argument("image", nargs="?", help="image file (default: chelsea)")
    s.add_argument("--component", default="resid_pre", choices=SWEEP_COMPONENTS)
    add_context_flag(s, "neutral context patched into")
    add_model_flags(s, "caap_out", "output folder (default ./caap_out)")
    s.set_defaults(func=cmd_sweep)

    d = sub.add_parser("explain-dataset", help="maps for a whole folder / manifest / list -> Parquet shards "
                                               "(resumable; --ray for Ray Data)")
    d.add_argument("source", help="a folder of images, a manifest folder (manifest.csv) or its CSV, or a list "
                                  "file (.txt, one path per line)")
    add_method_flags(d, several=False)
    add_model_flags(d, "caap_dataset", "output folder (default ./caap_dataset); one subfolder per settings hash; "
                                       "--force explains every image again")
    d.add_argument("--split", help="a split of the manifest (e.g. heldout)")
    d.add_argument("--limit", type=positive_int, help="only the first N images")
    d.add_argument("--shard-size", type=positive_int, default=32, help="images per Parquet shard (default 32)")
    d.add_argument("--allow-slow-bf16", action="store_true",
                   help="run --precision bf16 / bf16_delta even where the device has no native bf16 matrix products "
                        "(there it is slower than fp32, and runs fp32 unless this is given)")
    d.add_argument("--ray", action="store_true", help="run on Ray Data (local Ray unless --ray-address)")
    d.add_argument("--ray-address", help="an existing Ray cluster, HOST:PORT or ray://HOST:PORT (implies --ray)")
    d.add_argument("--workers", type=positive_int, default=1, help="Ray actors, each loading the model once (default 1; "
                                                                "on GPUs one actor per GPU)")
    d.set_defaults(func=cmd_explain_dataset)

    v = sub.add_parser("evaluate", help="score maps (.npy folder or explain-dataset output) with the benchmark's "
                                        "metrics on a manifest's images")
    v.add_argument("maps", help="a folder of .npy maps (<image stem>_<method>.npy as explain writes them, or "
                                "<image stem>.npy) or an explain-dataset output folder")
    v.add_argument("--data", required=True, help="manifest folder (manifest.csv: filename, class_index[, split]; "
                                                 "boxes.csv for the localisation metrics)")
    v.add_argument("--split", help="a split of the manifest (e.g. heldout)")
    v.add_argument("--limit", type=positive_int, help="only the first N images")
    v.add_argument("--metrics", help="comma list (default all): insertion, deletion, box_energy, ...")
    v.add_argument("--steps", type=positive_int, default=None,
                   help=f"insertion / deletion / token metrics steps (default {STEPS}, the benchmark's)")
    v.add_argument("--aopc-steps", type=positive_int, default=None,
                   help=f"MoRF / LeRF single-patch steps (default {AOPC_STEPS})")
    add_model_flags(v, "caap_scores", "output folder (default ./caap_scores): per_image.csv, summary.md, summary.csv",
                    precision=False, batch_help="images per forward pass of the metrics (default 64)")
    v.set_defaults(func=cmd_evaluate)
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 itself on a malformed command line
    from caap.cpu import keep_freed_memory

    keep_freed_memory()  # faster batched passes on the CPU (caap.cpu)
    try:
        code = args.func(args)
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
    return int(code or 0)


def _warn_in_one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"caap: warning: {_one_line(message) if isinstance(message, Warning) else message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 1, 2 or 130, see the module docstring). Warnings
    are one line each on stderr (`caap: warning: ...`)."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_in_one_line
            return _run(argv)
    except KeyboardInterrupt:  # also during the heavy imports
        print("caap: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
