"""What the experiment scripts share: one-line command-line errors, the evaluation data of a manifest
folder, the metric and method settings of the reported tables, CAAP's named layer ranges, per-chunk caches of
maps and metric values (computed with `caap.metrics.Evaluator`), and markdown tables.

Not a module of the `caap` package: the scripts in `experiments/` import it by putting their own folder
on `sys.path` (they are run as `python experiments/<script>.py`, or imported by the tests).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from caap import CAAP
from caap.attribution.caap import DEFAULT_LAYER_FRACTIONS
from caap.baselines import BASELINES, get_baseline
from caap.cli import positive_int
from caap.cpu import keep_freed_memory
from caap.data import DEFAULT_MODEL, VAL_BOXES, Sample, box_mask, load_manifest, sample_mask, shared_data_dir
from caap.files import atomic_path
from caap.metrics import Evaluator, Metric
from caap.metrics.protocol import (  # noqa: F401 - the metric protocol, re-exported to the scripts
    AOPC_STEPS,
    STEPS,
    arrow,
    build_metrics,
    fmt,
    header,
    markdown_table,
    metric_key,
    metric_settings,
)


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


def add_data_flags(p: argparse.ArgumentParser, limit: int, split_help: str = "manifest split (default dev)") -> None:
    """The flags of every script over the shared photos: --data, --split (default dev), --limit, --model,
    --checkpoint (read by `load_samples` and `caap.models.load_model`)."""
    p.add_argument("--data", default=None, help="manifest folder (default: the shared imagenet_val1300_boxes)")
    p.add_argument("--split", default="dev", help=split_help)
    p.add_argument("--limit", type=positive, default=limit, help=f"first N images of the split (default {limit})")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name")
    p.add_argument("--checkpoint", default=None,
                   help="weights file (default $CAAP_CHECKPOINT_DIR/<model>.pth, else ../shared/models)")


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


positive = positive_int
"""argparse type for counts (>= 1): the command line's own, `caap.cli.positive_int`."""


# ---------------------------------------------------------------------------------------------- metrics
# STEPS, AOPC_STEPS, metric_settings, build_metrics, metric_key, arrow, header, fmt, markdown_table:
# `caap.metrics.protocol` (imported above), shared with `caap evaluate`


# ---------------------------------------------------------------------------------------------- methods
RISE_MASKS = 500
"""RISE: 500 masks instead of the paper's 4000 (Petsiuk et al. 2018, for ResNet-50). Each mask costs one
forward pass per image: 4000 masks would take ~17 h for 651 images on an idle 2-core CPU, 500 take ~2.1 h
(measured). The map is a Monte-Carlo average, so its noise grows as 1/sqrt(N): ~2.8x that of 4000 masks
(how much that moves the metrics was not measured here; `--rise-masks` sets it)."""

IG_STEPS = 16
"""Integrated gradients: 16 Gauss-Legendre steps (Captum's default 50); a forward and a backward pass per
step (~10 min for 651 images, idle). Gauss-Legendre quadrature of the smooth path integral needs far
fewer points than a Riemann sum; `--ig-steps` sets it."""

SMOOTHGRAD_SAMPLES = 16
"""SmoothGrad: 16 noisy samples (the paper's 50); a forward and a backward pass per sample (~9 min for 651
images, idle); the averaging noise grows as 1/sqrt(n). `--smoothgrad-samples` sets it."""


CAAP_VARIANTS: dict[str, dict[str, Any]] = {
    # CAAP beyond the paper (`caap.attribution.caap`: `direction`, `sets`, `density`, `estimator`), each on
    # the default context, layers, component and score; the candidates compared on the first `dev` photos
    # (results/caap_variants_dev) before any of them ran on `heldout`
    "caap_necessity": {"direction": "necessity"},
    "caap_both": {"direction": "both"},
    "caap_sets_difference": {"sets": 256},
    "caap_sets_regression": {"sets": 256, "estimator": "regression"},
    "caap_sets_regression_d25": {"sets": 256, "density": 0.25, "estimator": "regression"},
    "caap_sets_both": {"sets": 128, "direction": "both", "estimator": "regression"},
}
"""Named CAAP settings beside "caap" (`CAAP(model)` with its defaults): a benchmark method each."""

METHOD_NAMES: list[str] = ["caap", *CAAP_VARIANTS, *BASELINES]
"""Every method name the experiment scripts accept."""


def is_caap(name: str) -> bool:
    return name == "caap" or name in CAAP_VARIANTS


def make_method(name: str, model: Any, settings: dict[str, dict[str, Any]]) -> Any:
    """The attribution object of a method name with its settings (`method_settings`)."""
    kw = settings.get(name, {})
    return CAAP(model, **kw) if is_caap(name) else get_baseline(name, model, **kw)


def method_settings(
    forward_batch: int, seed: int, rise_masks: int = RISE_MASKS, ig_steps: int = IG_STEPS,
    smoothgrad_samples: int = SMOOTHGRAD_SAMPLES, tis_masks: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Constructor settings per method: only the cost knobs differ from the classes' defaults (see the
    constants above), plus the rows per forward pass and the seed (`tis_masks`: TIS's masks, None = its
    paper's 1024)."""
    fb = forward_batch
    tis = {} if tis_masks is None else {"n_masks": tis_masks}
    return {
        "caap": {},  # CAAP(model): its defaults, nothing else
        **{name: dict(kw) for name, kw in CAAP_VARIANTS.items()},
        "random": {"seed": seed},
        "rise": {"n_masks": rise_masks, "seed": seed, "internal_batch_size": fb},
        "integrated_gradients": {"n_steps": ig_steps, "internal_batch_size": fb},
        "smoothgrad": {"n_samples": smoothgrad_samples, "seed": seed, "internal_batch_size": fb},
        "occlusion": {"internal_batch_size": fb},
        "atman": {"internal_batch_size": fb},
        # the recent baselines: the papers' settings (see each class); only rows per pass and the seed
        "tis": {"seed": seed, "internal_batch_size": fb, **tis},
        "vit_cx": {"seed": seed, "internal_batch_size": fb},
        "beyond_intuition_head": {"internal_batch_size": fb},
        "beyond_intuition_token": {"internal_batch_size": fb},
    }


def method_tag(name: str, settings: dict[str, dict[str, Any]]) -> str:
    """A method's cache name: its name and a fingerprint of everything that changes its maps (the class's
    constructor defaults, overridden by `settings[name]` from `method_settings`; for CAAP also its default
    layer fractions), so a changed setting or default computes new maps instead of reusing stale ones."""
    cls = CAAP if is_caap(name) else BASELINES[name]
    spec = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}
    spec.update(settings.get(name, {}))
    spec = {k: v for k, v in spec.items() if k not in ("internal_batch_size", "batch_size", "progress")}
    if is_caap(name):
        spec["default_layer_fractions"] = DEFAULT_LAYER_FRACTIONS
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def named_ranges(n_layers: int) -> dict[str, tuple[int, int]]:
    """CAAP's layer ranges for a model of depth n (inclusive blocks): early = [0, n/3), mid = [n/3, 2n/3),
    late = [2n/3, n), all = [0, n)."""
    a, b = round(n_layers / 3), round(2 * n_layers / 3)
    return {"early": (0, a - 1), "mid": (a, b - 1), "late": (b, n_layers - 1), "all": (0, n_layers - 1)}


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
    with atomic_path(path) as tmp:  # a reader (or a resumed run) never sees half a cache file
        np.savez_compressed(tmp, maps=maps.detach().cpu().float().numpy(), files=np.array(files), seconds=seconds)


@dataclass
class ChunkScores:
    """One (method, chunk)'s metric values per image, kept as a small CSV that is committed with the results,
    so that a long run continues on a fresh machine where the last one stopped instead of starting over
    (the maps themselves stay in the ignored cache). Columns: `image`, `maps_s` (the attribution's seconds
    per image, when known), `metric_s` (the metrics' seconds per image, over all runs), `forwards` (forward
    passes per image), then one column per metric, named by its `metric_key` (so another setting is another
    column, never a stale value)."""

    path: Path
    files: list[str]
    scores: dict[str, list[float]]
    maps_s: float | None = None
    metric_s: float = 0.0
    forwards: float = 0.0

    FIXED: ClassVar[tuple[str, ...]] = ("image", "maps_s", "metric_s", "forwards")

    @classmethod
    def load(cls, path: Path, files: list[str]) -> ChunkScores:
        """The store at `path` if it holds exactly these images; an empty one if it is missing, cut short or
        for other images (then it is recomputed)."""
        empty = cls(path, list(files), {})
        if not path.is_file():
            return empty
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if [r["image"] for r in rows] != list(files) or not rows:
                return empty
            keys = [k for k in rows[0] if k not in cls.FIXED]
            maps = [float(r["maps_s"]) if r["maps_s"] else None for r in rows]
            return cls(path, list(files), {k: [float(r[k]) for r in rows] for k in keys},
                       None if None in maps else float(sum(maps)), sum(float(r["metric_s"]) for r in rows),
                       sum(float(r["forwards"]) for r in rows))
        except (OSError, KeyError, ValueError, csv.Error):
            return empty

    def missing(self, metrics: dict[str, Metric]) -> dict[str, Metric]:
        return {n: m for n, m in metrics.items() if metric_key(m) not in self.scores}

    def values(self, metrics: dict[str, Metric]) -> dict[str, np.ndarray]:
        return {n: np.array(self.scores[metric_key(m)], dtype=np.float64) for n, m in metrics.items()}

    def save(self) -> None:
        n = len(self.files)
        keys = list(self.scores)
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*self.FIXED, *keys])
            for j, image in enumerate(self.files):
                w.writerow([image, "" if self.maps_s is None else repr(self.maps_s / n), repr(self.metric_s / n),
                            repr(self.forwards / n), *(repr(float(self.scores[k][j])) for k in keys)])


def scores_for_chunk(
    path: Path, chunk: Chunk, maps: Tensor, metrics: dict[str, Metric], evaluator: Callable[[], Evaluator],
    maps_seconds: float | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Metric values of one (method, chunk), from its `ChunkScores` where the same metric (same settings,
    `metric_key`) was computed before; the rest computed now and added. `maps_seconds`: the attribution's
    time for the chunk, kept beside the scores. Returns (values, seconds the metrics of this (method, chunk)
    took over all runs)."""
    store = ChunkScores.load(path, chunk.files)
    todo = store.missing(metrics)
    if maps_seconds is not None and store.maps_s is None:
        store.maps_s = maps_seconds
    if todo:
        ev = evaluator()
        before = ev.forwards
        t0 = time.perf_counter()
        new = ev.evaluate(maps, todo)
        store.metric_s += time.perf_counter() - t0
        store.forwards += ev.forwards - before
        for n, v in new.items():
            store.scores[metric_key(metrics[n])] = [float(x) for x in v.tolist()]
    if todo or maps_seconds is not None:
        store.save()
    return store.values(metrics), store.metric_s


# ---------------------------------------------------------------------------------------------- tables
def write_text(path: Path, text: str) -> Path:
    """Write `text` (ending in one newline) to `path` atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n")
    return path


def write_report(path: Path, text: str) -> None:
    """The scripts' ending: the markdown report written to `path` (`write_text`) and printed."""
    write_text(path, text)
    print()
    print(text.rstrip("\n"))


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
