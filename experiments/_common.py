"""What the experiment scripts share: one-line command-line errors, the evaluation data of a manifest
folder, the metric settings of the reported tables, faithfulness metrics evaluated with shared forward
passes, per-chunk caches, and markdown tables.

Not a module of the `caap` package: the scripts in `experiments/` import it by putting their own folder
on `sys.path` (they are run as `python experiments/<script>.py`, or imported by the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caap.cpu import keep_freed_memory
from caap.data import VAL_BOXES, Sample, box_mask, load_manifest, sample_mask, shared_data_dir
from caap.metrics import METRICS, Metric, PerturbationCurve, PerturbationMetric, get_metric, make_substrate, unit_ranks
from caap.metrics.base import as_map_batch, grid_for, resolve_patch_size
from caap.targets import class_score


# ---------------------------------------------------------------------------------------------- errors
class UsageError(Exception):
    """A bad flag or input: reported as one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (`prog: error: ...`) and never exits the interpreter itself:
    `main(argv)` returns the status, so tests can call it in-process."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run `body` (after `caap.cpu.keep_freed_memory()`); a `UsageError`, `ValueError`, `FileNotFoundError`
    or `KeyError` becomes one line on stderr (`prog: error: ...`) and exit status 2, without a traceback."""
    keep_freed_memory()  # faster batched passes on the CPU (caap.cpu)
    try:
        return body()
    except (UsageError, ValueError, FileNotFoundError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2


def split_list(text: str | None, accepted: Sequence[str], what: str, default: Sequence[str]) -> list[str]:
    """A comma list of names checked against `accepted` ("all" or empty = `default`); '-' = '_'."""
    if text is None or text.strip() in ("", "all"):
        return list(default)
    names = [t.strip().lower().replace("-", "_") for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in accepted]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}")
    if not names:
        raise UsageError(f"--{what}s is empty")
    return list(dict.fromkeys(names))


def load_samples(data: str | None, split: str | None, limit: int | None) -> tuple[Path, list[Sample]]:
    """The manifest folder (default: the shared imagenet_val1300_boxes) and its samples, or a UsageError."""
    folder = Path(data) if data else shared_data_dir(VAL_BOXES)
    if folder is None:
        raise UsageError("no data folder: pass --data DIR or set CAAP_SHARED_DIR to the shared folder")
    if not folder.is_dir():
        raise UsageError(f"data folder not found: {folder}")
    samples = load_manifest(folder, split=split, limit=limit)
    if not samples:
        raise UsageError(f"no images in split {split!r} of {folder}")
    return folder, samples


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


# ---------------------------------------------------------------------------------------------- metrics
STEPS = 16
"""Insertion / deletion: equal steps of patches (196 cells / 16 = ~12 patches, 6% of the image, a step)
instead of the paper's one patch (or 224 pixels) a step. See `metric_settings`."""

AOPC_STEPS = 16
"""MoRF / LeRF: the first 16 patches removed one at a time (Samek et al. remove 100 regions of 9x9 px,
16% of a 224 px image; 16 ViT patches are 8%). See `metric_settings`."""


def metric_settings(steps: int = STEPS, aopc_steps: int = AOPC_STEPS) -> dict[str, dict[str, Any]]:
    """The settings every table uses, per metric (anything not named keeps the metric's default).

    Cost is what decides them: a faithfulness metric costs one forward pass per perturbation step per
    image per method. With the library defaults (insertion and deletion at every one of 196 patches,
    AOPC with 100 regions) the six faithfulness metrics cost ~616 forward passes per image and method,
    i.e. 13 methods x 651 images ~ 5.2 M forward passes: ~34 h on an idle 2-core CPU (ViT-Tiny, ~24 ms
    per image and pass). Here:
      insertion, deletion   patch level, `steps` equal steps (default 16: 15 forward passes per image,
                            the two ends being shared, see `SharedPerturbation`), AUC over [0, 1];
      morf, lerf            patch level, `aopc_steps` single-patch steps (default 16);
      positive/negative_perturbation  Chefer et al.'s 9 steps (unchanged);
      localisation          no forward pass at all (unchanged).
    Measured: all ten together cost 79 forward passes per image and method (about 1.8 s per image and
    method on an idle 2-core CPU; localisation alone: ~0.02 s). Every metric keeps its paper's substrate
    and score. `benchmark.py --estimate` prices the steps.
    """
    return {
        "insertion": {"n_steps": steps},
        "deletion": {"n_steps": steps},
        "morf": {"n_steps": aopc_steps},
        "lerf": {"n_steps": aopc_steps},
    }


def build_metrics(names: Sequence[str], batch_size: int, steps: int = STEPS, aopc_steps: int = AOPC_STEPS
                  ) -> dict[str, Metric]:
    settings = metric_settings(steps, aopc_steps)
    out = {}
    for name in names:
        kw = dict(settings.get(name, {}))
        if getattr(METRICS[name], "kind", None) == "faithfulness":
            kw.update(batch_size=batch_size, progress=False)
        out[name] = get_metric(name, **kw)
    return out


def metric_key(metric: Metric) -> str:
    """What identifies a metric's values in caches and between scripts: its class and every setting that
    changes its values (not `batch_size` or `progress`)."""
    settings = {k: v for k, v in metric._settings().items() if k not in ("batch_size", "progress")}
    return f"{type(metric).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


def arrow(metric: Metric) -> str:
    return "↑" if metric.higher_is_better else "↓"


def header(name: str, metric: Metric) -> str:
    """Column header with the metric's direction, e.g. "insertion ↑"."""
    return f"{name} {arrow(metric)}"


class SharedPerturbation:
    """The faithfulness metrics of one chunk of images, with every forward pass that can be shared done once.

    Perturbation metrics differ in their order (most / least relevant first), mode (insert / delete),
    substrate and steps. Metrics with the same (mode, order, level, substrate) perturb the same images:
    one pass over the union of their steps serves all of them (e.g. deletion and MoRF: both delete the
    most relevant patches first into the zero substrate), and each pass yields every score they need
    (probability, logit, top-1 accuracy) from the same logits. The two ends of every curve do not depend
    on the map: the unperturbed image (the clean logits, computed once per image and shared by every
    method and metric) and the fully perturbed one (once per image and substrate). Values equal the
    metrics' own `metric(model, pixels, maps, targets)` (a test says so).
    """

    def __init__(self, model: Any, pixels: Tensor, targets: Tensor, clean_logits: Tensor, batch_size: int = 64):
        self.model, self.pixels, self.targets, self.batch_size = model, pixels, targets.to(pixels.device), batch_size
        self.clean = clean_logits.to(pixels.device)
        self.size = (pixels.shape[-2], pixels.shape[-1])
        self._substrates: dict[Any, tuple[Tensor, Tensor]] = {}
        self.forwards = 0

    def _substrate(self, m: PerturbationMetric) -> tuple[Any, Tensor, Tensor]:
        """(key, substrate images, logits of the fully substituted images)."""
        sub = m.substrate
        key: Any = id(m)  # a tensor or callable substrate: not shared
        if isinstance(sub, str):
            key = (sub, m.blur_kernel, m.blur_sigma, m.seed, repr(m.mean), repr(m.std))
        if key not in self._substrates:
            s = make_substrate(self.pixels, sub, self.model, m.mean, m.std, m.blur_kernel, m.blur_sigma, m.seed)
            self._substrates[key] = (s, self._forward(s))
        return key, *self._substrates[key]

    @torch.inference_mode()
    def _forward(self, x: Tensor) -> Tensor:
        self.forwards += x.shape[0]
        return torch.cat([self.model(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    @torch.inference_mode()
    def evaluate(self, maps: Tensor, metrics: dict[str, Metric]) -> dict[str, Tensor]:
        """{name: values [batch]} for the faithfulness metrics among `metrics` (others are skipped)."""
        model, pixels = self.model, self.pixels
        b = pixels.shape[0]
        maps = as_map_batch(maps, b).to(pixels.device)
        groups: dict[Any, list[tuple[str, PerturbationMetric]]] = {}
        for name, m in metrics.items():
            if isinstance(m, PerturbationMetric):
                key, _, _ = self._substrate(m)
                groups.setdefault((m.mode, m.order, m.level, m.interpolation, key), []).append((name, m))
        out: dict[str, Tensor] = {}
        for (mode, order, level, interpolation, key), members in groups.items():
            patch = resolve_patch_size(model, members[0][1].patch_size)
            gh, gw = grid_for(self.size, patch)
            ranks, n_units = unit_ranks(maps, self.size, patch, level, order, interpolation)
            steps = {name: m._steps(n_units, gh * gw) for name, m in members}
            counts = sorted({int(c) for c, _ in steps.values() for c in c.tolist()})
            kinds = sorted({m.score for _, m in members})
            sub, sub_logits = self._substrates[key][0], self._substrates[key][1]
            logits_at: dict[int, Tensor] = {}
            for c in counts:  # the two ends of the curve do not depend on the map
                if c in (0, n_units):
                    logits_at[c] = self.clean if (c == 0) == (mode == "delete") else sub_logits
            inner = [c for c in counts if c not in logits_at]
            scores = {k: torch.empty(b, len(counts), device=pixels.device) for k in kinds}
            col = {c: j for j, c in enumerate(counts)}
            for c, lg in logits_at.items():
                for k in kinds:
                    scores[k][:, col[c]] = class_score(lg, self.targets, k)
            if inner:
                ic = torch.tensor(inner, device=pixels.device)
                total = b * len(inner)
                for start in range(0, total, self.batch_size):
                    pair = torch.arange(start, min(start + self.batch_size, total), device=pixels.device)
                    img, step = pair // len(inner), pair % len(inner)
                    changed = (ranks[img] < ic[step][:, None, None])[:, None]
                    if mode == "delete":
                        x = torch.where(changed, sub[img], pixels[img])
                    else:
                        x = torch.where(changed, pixels[img], sub[img])
                    lg = model(x)
                    self.forwards += x.shape[0]
                    cols = torch.tensor([col[inner[s]] for s in step.tolist()], device=pixels.device)
                    for k in kinds:
                        scores[k][img, cols] = class_score(lg, self.targets[img], k)
            for name, m in members:
                c, fractions = steps[name]
                idx = torch.tensor([col[int(v)] for v in c.tolist()], device=pixels.device)
                curve = PerturbationCurve(fractions.float().cpu(), scores[m.score][:, idx].float().cpu())
                out[name] = m._reduce(m._finish(curve)).float()
        return out


def evaluate_chunk(
    shared: SharedPerturbation, maps: Tensor, metrics: dict[str, Metric], masks: Tensor
) -> dict[str, np.ndarray]:
    """Every metric of `metrics` on one chunk's maps: {name: values [batch]} (NaN where undefined)."""
    values = shared.evaluate(maps, metrics)
    for name, m in metrics.items():
        if name not in values:
            values[name] = m(None, None, maps, masks=masks)
    return {name: values[name].numpy().astype(np.float64) for name in metrics}


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Chunk:
    index: int
    start: int
    samples: list[Sample]
    pixels: Tensor
    masks: Tensor
    targets: Tensor

    @property
    def files(self) -> list[str]:
        return [s.name for s in self.samples]

    @property
    def tag(self) -> str:
        return f"{self.start:05d}-{self.start + len(self.samples):05d}"


def load_chunk(model: Any, samples: list[Sample], index: int, start: int) -> Chunk:
    """Pixels (the model's own preprocessing), box-union masks in the input frame, and targets (the true
    class) of a run of samples."""
    pixels = model.preprocess([s.path for s in samples])
    masks = torch.stack([sample_mask(s, model.data_config) for s in samples])
    targets = torch.tensor([s.class_index for s in samples], device=pixels.device)
    return Chunk(index, start, samples, pixels, masks, targets)


def input_frame_boxes(sample: Sample, data_config: dict[str, Any]) -> list[tuple[float, float, float, float]]:
    """Each box of a sample carried into the model's input frame (the bounding box of its mask)."""
    from PIL import Image

    with Image.open(sample.path) as im:
        size = im.size
    out = []
    for box in sample.boxes:
        m = box_mask([box], size, data_config).numpy()
        ys, xs = np.nonzero(m)
        if len(ys):
            out.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    return out


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# ---------------------------------------------------------------------------------------------- caches
def load_cached_maps(path: Path, files: list[str]) -> tuple[Tensor, float] | None:
    """(maps, seconds) from a cache file written by `save_maps`, if it holds exactly these images."""
    if not path.is_file():
        return None
    try:
        data = np.load(path, allow_pickle=False)
        if [str(f) for f in data["files"]] != list(files):
            return None
        seconds = float(data["seconds"]) if "seconds" in data.files else float("nan")
        return torch.from_numpy(data["maps"]).float(), seconds
    except Exception:  # a file cut short by an interrupted run: compute again
        return None


def save_maps(path: Path, maps: Tensor, files: list[str], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, maps=maps.detach().cpu().float().numpy(), files=np.array(files), seconds=seconds)
    os.replace(tmp, path)


def load_cached_scores(path: Path, files: list[str]) -> dict[str, Any]:
    """The cache of one (method, chunk): {"scores": {metric_key: values}, "seconds": metric seconds,
    "forwards": forward passes}; empty scores if none was computed for these images."""
    empty = {"scores": {}, "seconds": 0.0, "forwards": 0}
    if not path.is_file():
        return empty
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return empty
    return data if data.get("files") == list(files) and "scores" in data else empty


def save_scores(path: Path, files: list[str], cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**cache, "files": list(files)}))
    os.replace(tmp, path)


def scores_for_chunk(
    path: Path, chunk: Chunk, maps: Tensor, metrics: dict[str, Metric], shared: Callable[[], SharedPerturbation]
) -> tuple[dict[str, np.ndarray], float]:
    """Metric values of one (method, chunk), from the cache where the same metric (same settings,
    `metric_key`) was computed before; the rest computed now and added to the cache. Returns (values, seconds
    the metrics of this (method, chunk) took over all runs)."""
    cache = load_cached_scores(path, chunk.files)
    done = cache["scores"]
    todo = {n: m for n, m in metrics.items() if metric_key(m) not in done}
    if todo:
        sp = shared()
        before = sp.forwards
        t0 = time.perf_counter()
        new = evaluate_chunk(sp, maps, todo, chunk.masks)
        cache["seconds"] = cache.get("seconds", 0.0) + time.perf_counter() - t0
        cache["forwards"] = cache.get("forwards", 0) + sp.forwards - before
        for n, v in new.items():
            done[metric_key(metrics[n])] = [None if math.isnan(x) else x for x in v.tolist()]
        save_scores(path, chunk.files, cache)
    values = {n: np.array([np.nan if x is None else x for x in done[metric_key(m)]], dtype=np.float64)
              for n, m in metrics.items()}
    return values, float(cache.get("seconds", 0.0))


# ---------------------------------------------------------------------------------------------- tables
def fmt(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def rank_of(scores: dict[str, float], who: str, higher_is_better: bool) -> tuple[int, int]:
    """(rank of `who` among the methods by mean score, 1 = best; number ranked). NaN means are last;
    ties share the better rank."""
    def key(v: float) -> float:
        return -math.inf if math.isnan(v) else (v if higher_is_better else -v)

    mine = key(scores[who])
    return 1 + sum(key(v) > mine for n, v in scores.items() if n != who), len(scores)


def seconds_text(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"
