"""Score attribution maps read from files with the benchmark's metrics: how a user scores any method's maps,
their own included (`caap evaluate`).

    from caap.evaluation import plan_evaluation
    plan = plan_evaluation("maps/", "data/", "scores/", metrics=["insertion", "box_energy"])
    summary = plan.run(model)          # per_image.csv, summary.md, summary.csv in scores/

Maps come as
- a folder of `.npy` files, as `caap explain --out` writes them (`<image stem>_<method>.npy`, one method
  per suffix, so a folder of several methods' maps scores each) or named by the image's file stem
  alone (`<image stem>.npy`: the folder's name is then the method's name); or
- an `explain-dataset` output folder (or one of its `settings-<hash>` folders): its Parquet rows, the
  method named by the settings, matched to the manifest's images by path, else by file stem.

Each map is [grid_h, grid_w] on the model's patch grid or [H, W] at its input size; any other shape is
refused before the model loads. The images and boxes are the manifest's (`caap.data.load_manifest`); the
metrics are `caap.metrics.protocol.build_metrics`'s, computed with `caap.metrics.Evaluator` as
`experiments/benchmark.py` computes them: the same maps give the same numbers. The target is the
manifest's class (the benchmark's), or the predicted class, or one class for every image.

Resuming: every finished chunk of images rewrites `per_image.csv` (atomically); a second run with the same
settings keeps each row whose map is unchanged (by a digest of its values) and computes only what is
missing. Images without a map are counted (`MapSet.missing`), not scored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MapSet", "EvaluationPlan", "find_maps", "plan_evaluation", "CHUNK", "TARGETS"]

CHUNK = 8
"""Images scored together (one `Evaluator`), and how often `per_image.csv` is written."""

TARGETS = ("auto", "label", "predicted")
"""Target modes: the manifest's class (auto and label: a manifest always has one), the predicted class; or
a class index for every image."""


@dataclass
class MapSet:
    """Maps found for the images of a manifest: `maps[method][image]` is a `.npy` path or an array, the
    method's settings where the source names them, and the images without a map per method."""

    source: Path
    kind: str  # "npy" or "parquet"
    maps: dict[str, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, dict[str, int]] = field(default_factory=dict)  # parquet: the class each map explains
    shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.maps)

    def missing(self, images: Sequence[str]) -> dict[str, list[str]]:
        """{method: images of `images` without a map}."""
        return {m: [i for i in images if i not in found] for m, found in self.maps.items()}

    def load(self, method: str, image: str) -> np.ndarray:
        """One map as float32 [h, w]; a ValueError if it holds NaN or infinite values."""
        value = self.maps[method][image]
        m = np.load(value, allow_pickle=False) if isinstance(value, Path) else value
        m = np.array(m, dtype=np.float32)  # a writable copy (torch.from_numpy takes it as is)
        if not np.isfinite(m).all():
            raise ValueError(f"the {method} map of {image} ({value if isinstance(value, Path) else self.source}) "
                             f"holds NaN or infinite values; maps must be finite")
        return m


def _stems(images: Sequence[str]) -> dict[str, str]:
    """{file stem: image} for the manifest's images; a ValueError where two share a stem."""
    out: dict[str, str] = {}
    for image in images:
        stem = Path(image).stem
        if stem in out:
            raise ValueError(f"two images of the manifest share the file stem {stem!r} ({out[stem]}, {image}); "
                             f"maps named by stem cannot tell them apart")
        out[stem] = image
    return out


def find_maps(source: str | os.PathLike, images: Sequence[str]) -> MapSet:
    """The maps in `source` (see the module docstring) for `images` (the manifest's file names, relative
    to its folder). A FileNotFoundError / ValueError that says what is accepted when there is none."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"maps not found: {source}; give a folder of .npy maps or an explain-dataset output")
    if path.is_dir() and (path.name.startswith("settings-") or any(path.glob("settings-*/part-*.parquet"))):
        return _parquet_maps(path, images)
    if not path.is_dir():
        raise ValueError(f"maps: {source} is a file; give a folder of .npy maps (<image stem>_<method>.npy or "
                         f"<image stem>.npy) or an explain-dataset output folder")
    stems = _stems(images)
    maps: dict[str, dict[str, Any]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for f in sorted(path.glob("*.npy")):
        name = f.name[: -len(".npy")]
        match = max((s for s in stems if name == s or name.startswith(s + "_")), key=len, default=None)
        if match is None:
            continue
        method = name[len(match) + 1 :] if name != match else path.resolve().name
        maps.setdefault(method, {})[stems[match]] = f
        shapes.setdefault(method, {})[stems[match]] = _npy_shape(f)
    from caap.methods import METHODS

    known = list(METHODS)  # the registry's order (CAAP first), then the folder's other names
    maps = dict(sorted(maps.items(), key=lambda kv: (known.index(kv[0]) if kv[0] in known else len(known), kv[0])))
    if not maps:
        example = Path(images[0]).stem if images else "IMAGE"
        raise ValueError(f"no map in {source} belongs to an image of the manifest (looked for <image stem>.npy or "
                         f"<image stem>_<method>.npy, e.g. {example}_caap.npy)")
    return MapSet(path, "npy", maps, shapes=shapes)


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npy array ({type(e).__name__}: {e})") from None


def _parquet_maps(path: Path, images: Sequence[str]) -> MapSet:
    from caap.dataset import read_results

    folders = [path] if path.name.startswith("settings-") else sorted(path.glob("settings-*"))
    if len(folders) > 1:
        raise ValueError(f"{path} holds the maps of {len(folders)} settings ({', '.join(f.name for f in folders)}); "
                         f"give one of these folders")
    frame = read_results(path)
    settings = json.loads(frame["settings"].iloc[0]) if len(frame) else {}
    method = settings.get("method", "caap")
    stems = _stems(images)
    by_name = set(images)
    maps: dict[str, Any] = {}
    targets: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for row in frame.itertuples(index=False):
        if row.status != "ok":
            continue
        image = row.image_id if row.image_id in by_name else stems.get(Path(row.image_id).stem)
        if image is None:
            continue
        shape = (int(row.grid_h), int(row.grid_w))
        maps[image] = np.asarray(row.map, dtype=np.float32).reshape(shape)
        targets[image], shapes[image] = int(row.target), shape
    if not maps:
        raise ValueError(f"no row of {path} belongs to an image of the manifest (matched by the image's path, "
                         f"else its file stem)")
    return MapSet(path, "parquet", {method: maps}, {method: settings}, {method: targets}, {method: shapes})


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class EvaluationPlan:
    """Everything checked before the model loads (`plan_evaluation`); `run(model)` scores."""

    maps: MapSet
    samples: list[Any]
    metrics: dict[str, Any]
    out: Path
    target: str | int
    batch_size: int
    settings: dict[str, Any]
    force: bool = False
    warnings: list[str] = field(default_factory=list)
    manifest_folder: Path = Path()

    @property
    def images(self) -> list[str]:
        """The manifest's file names of the images scored (relative to its folder)."""
        return [_image_name(s, self.manifest_folder) for s in self.samples]

    def missing(self) -> dict[str, list[str]]:
        """{method: images without a map}."""
        return self.maps.missing(self.images)

    def run(self, model: Any, progress: bool = True) -> dict[str, Any]:
        """Score every (method, image) not yet in `out/per_image.csv`; write per_image.csv after every
        chunk, then summary.md and summary.csv. Returns {"rows", "computed", "reused", "missing",
        "summary" (markdown), "seconds"}."""
        import torch
        from tqdm.auto import tqdm

        from caap.contexts import weights_fingerprint
        from caap.data import sample_mask
        from caap.files import atomic_path
        from caap.metrics import Evaluator
        from caap.metrics.protocol import metric_key

        settings = {**self.settings, "weights": weights_fingerprint(model)}
        old_rows = self._previous_rows(settings)
        keys = {n: metric_key(m) for n, m in self.metrics.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "evaluate.json") as tmp:
            tmp.write_text(json.dumps({**settings, "metrics": keys}, indent=1, sort_keys=True) + "\n")
        methods = self.maps.methods
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        computed = reused = 0
        t0 = time.perf_counter()
        todo = [(ci, self.samples[ci : ci + CHUNK]) for ci in range(0, len(self.samples), CHUNK)]
        bar = tqdm(total=sum(len(v) for v in self.maps.maps.values()), desc="evaluate", unit="map",
                   disable=not progress)
        try:  # every finished chunk is on disk (per_image.csv) before the next starts
            for _, chunk in todo:
                names = [_image_name(s, self.manifest_folder) for s in chunk]
                need: dict[str, list[int]] = {}
                digests: dict[tuple[str, str], str] = {}
                loaded: dict[tuple[str, str], np.ndarray] = {}
                kept: dict[tuple[str, str], dict[str, float]] = {}  # values of an earlier run for the same map
                for method in methods:
                    for j, image in enumerate(names):
                        if image not in self.maps.maps[method]:
                            continue
                        m = self.maps.load(method, image)
                        loaded[(method, image)] = m
                        digest = hashlib.sha1(m.tobytes() + str(m.shape).encode()).hexdigest()[:16]
                        digests[(method, image)] = digest
                        old = old_rows.get((method, image))
                        if old is not None and old.get("map_digest") == digest:
                            kept[(method, image)] = {n: old[n] for n in self.metrics if old.get(n) is not None}
                        if len(kept.get((method, image), {})) == len(self.metrics):
                            rows[(method, image)] = old
                            reused += 1
                            bar.update(1)
                        else:
                            need.setdefault(method, []).append(j)
                if need:
                    pixels = model.preprocess([s.path for s in chunk])
                    masks = torch.stack([sample_mask(s, model.data_config) for s in chunk]).to(pixels.device)
                    with torch.inference_mode():
                        clean = torch.cat([model(pixels[i : i + self.batch_size])
                                           for i in range(0, len(chunk), self.batch_size)]).float()
                    labels = torch.tensor([s.class_index for s in chunk], device=pixels.device)
                    predicted = clean.argmax(-1)
                    if self.target in ("auto", "label"):
                        targets = labels
                    elif self.target == "predicted":
                        targets = predicted
                    else:
                        targets = torch.full_like(labels, int(self.target))
                    evaluators: dict[tuple[int, ...], Any] = {}
                    for method, idx in need.items():
                        key = tuple(idx)
                        if key not in evaluators:
                            sel = torch.tensor(idx, device=pixels.device)
                            evaluators[key] = Evaluator(model, pixels[sel], targets[sel], masks[sel], clean[sel],
                                                        self.batch_size)
                        todo = {n: m for n, m in self.metrics.items()
                                if any(n not in kept.get((method, names[j]), {}) for j in idx)}
                        maps = torch.stack([torch.from_numpy(loaded[(method, names[j])]) for j in idx])
                        values = evaluators[key].evaluate(maps, todo)
                        for k, j in enumerate(idx):
                            image = names[j]
                            rows[(method, image)] = {
                                "method": method, "image": image, "class_index": chunk[j].class_index,
                                "target": int(targets[j]), "predicted": int(predicted[j]),
                                "map_digest": digests[(method, image)],
                                **kept.get((method, image), {}),
                                **{n: float(v[k]) for n, v in values.items()},
                            }
                            computed += 1
                            bar.update(1)
                    self._write_rows(rows, old_rows)
        finally:
            bar.close()
        ordered = [rows[(m, i)] for m in methods for i in self.images if (m, i) in rows]
        self._write_rows(rows, {})
        summary = self._write_summary(ordered, methods)
        return {"rows": len(ordered), "computed": computed, "reused": reused,
                "missing": {m: len(v) for m, v in self.missing().items() if v}, "summary": summary,
                "seconds": round(time.perf_counter() - t0, 2)}

    # ------------------------------------------------------------------------------- files
    def _previous_rows(self, settings: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        """Rows of an earlier run with the same settings (model weights, target), by (method, image), with
        only the columns of metrics whose settings are unchanged."""
        from caap.metrics.protocol import metric_key

        meta, table = self.out / "evaluate.json", self.out / "per_image.csv"
        if self.force or not meta.is_file() or not table.is_file():
            return {}
        try:
            stored = json.loads(meta.read_text())
            with open(table, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, ValueError):
            return {}
        if any(stored.get(k) != v for k, v in settings.items()):
            return {}
        same = [n for n, m in self.metrics.items() if stored.get("metrics", {}).get(n) == metric_key(m)]
        out = {}
        for r in rows:
            keep = {k: r[k] for k in ("method", "image", "class_index", "target", "predicted", "map_digest") if k in r}
            keep.update({n: _finite_or_nan(r.get(n)) for n in same if n in r})
            out[(r["method"], r["image"])] = keep
        return out

    def _write_rows(self, rows: dict[tuple[str, str], dict[str, Any]], old: dict[tuple[str, str], Any]) -> None:
        from caap.files import atomic_path

        everything = {**old, **rows}  # rows of other images kept until this run replaces them
        cols = ["method", "image", "class_index", "target", "predicted", "map_digest", *self.metrics]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in everything.values():
            if all(n in r for n in self.metrics):
                w.writerow(r)
        with atomic_path(self.out / "per_image.csv") as tmp:
            tmp.write_text(buf.getvalue())

    def _write_summary(self, rows: list[dict[str, Any]], methods: list[str]) -> str:
        from caap.files import atomic_path
        from caap.metrics.protocol import metric_key, summary_table
        from caap.stats import mean_ci

        values = [{**r, **{n: _finite_or_nan(r[n]) for n in self.metrics}} for r in rows]
        present = [m for m in methods if any(r["method"] == m for r in values)]
        n = len(self.samples)
        lines = [f"# Scores of the maps in {self.maps.source}: {', '.join(present)}", "",
                 f"Images: {n} of {self.settings['data']}"
                 + (f" (split {self.settings['split']})" if self.settings.get("split") else "")
                 + f". Target: {self.settings['target']}. Model: {self.settings['model']}.", "",
                 summary_table(values, present, self.metrics), "",
                 ("Mean ± half-width of the 95% confidence interval (Student t) over images; ↑ higher is better, "
                  "↓ lower is better; bold: the best mean of a column. Undefined values (e.g. an image without "
                  "boxes for a localisation metric) are left out of the mean."), "",
                 "Metric settings: " + "; ".join(f"`{metric_key(m)}`" for m in self.metrics.values())]
        missing = {m: v for m, v in self.missing().items() if v}
        if missing:
            lines += ["", "Images without a map (not scored): "
                      + "; ".join(f"{m}: {len(v)} of {n}" for m, v in missing.items())]
        text = "\n".join(lines) + "\n"
        with atomic_path(self.out / "summary.md") as tmp:
            tmp.write_text(text)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "metric", "higher_is_better", "mean", "ci95_half_width", "n"])
        for m in present:
            for name, metric in self.metrics.items():
                mean, half, count = mean_ci([r[name] for r in values if r["method"] == m])
                w.writerow([m, name, metric.higher_is_better, mean, half, count])
        with atomic_path(self.out / "summary.csv") as tmp:
            tmp.write_text(buf.getvalue())
        return text


def _image_name(sample: Any, folder: Path) -> str:
    try:
        return sample.path.relative_to(folder).as_posix()
    except ValueError:
        return str(sample.path)


def _finite_or_nan(value: Any) -> float | None:
    """A CSV cell as a float (NaN for an empty or 'nan' cell); None for no cell."""
    if value is None:
        return None
    if isinstance(value, float):
        return value
    try:
        return float(value) if str(value).strip() else math.nan
    except ValueError:
        return None


def plan_evaluation(
    maps: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    *,
    model_name: str,
    grid: tuple[int, int],
    img_size: tuple[int, int],
    weights: str,
    split: str | None = None,
    limit: int | None = None,
    target: str | int = "auto",
    batch_size: int = 64,
    steps: int | None = None,
    aopc_steps: int | None = None,
    force: bool = False,
) -> EvaluationPlan:
    """Read the manifest and find the maps; check metric names, map shapes (the model's patch `grid` or its
    `img_size`), boxes for the localisation metrics and `out`, all before any model loads. ValueError /
    FileNotFoundError with a one-line reason otherwise. `weights` names the model's weights (a digest)
    for the record kept beside the scores."""
    from caap.data import load_manifest
    from caap.metrics import METRICS
    from caap.metrics.protocol import AOPC_STEPS, STEPS, build_metrics

    folder = Path(data)
    if folder.is_file() and folder.name == "manifest.csv":
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder; give a manifest folder (manifest.csv, boxes.csv)")
    samples = load_manifest(folder, split=split, limit=limit)
    if not samples:
        raise ValueError(f"no images in {folder}" + (f", split {split!r}" if split else ""))
    names = list(METRICS) if not metrics else list(dict.fromkeys(metrics))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(map(repr, unknown))}; accepted: {', '.join(METRICS)}")
    if isinstance(target, str) and target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)} or a class index, got {target!r}")
    built = build_metrics(names, batch_size, steps or STEPS, aopc_steps or AOPC_STEPS)
    n_patches = grid[0] * grid[1]
    for name in ("insertion", "deletion", "token_insertion", "token_deletion"):
        if name in built and (steps or STEPS) > n_patches:
            raise ValueError(f"--steps {steps or STEPS} is more than the {n_patches} patches of the model's grid "
                             f"({name} changes at least one patch a step); accepted: 1..{n_patches}")
    plan_warnings = []
    local = [n for n, m in built.items() if m.kind == "localisation"]
    if local:
        boxed = sum(1 for s in samples if s.boxes)
        if boxed == 0:
            raise ValueError(f"--metrics {', '.join(local)} need boxes, and {folder} has none for these images "
                             f"(boxes.csv: filename, x0, y0, x1, y1); leave them out or give a manifest with boxes")
        if boxed < len(samples):
            plan_warnings.append(f"{len(samples) - boxed} of {len(samples)} images have no boxes: their "
                                 f"{', '.join(local)} are undefined (left out of the means)")
    images = [_image_name(s, folder) for s in samples]
    found = find_maps(maps, images)
    accepted = {tuple(grid), tuple(img_size)}
    for method, shapes in found.shapes.items():
        for image, shape in shapes.items():
            if tuple(shape) not in accepted:
                raise ValueError(
                    f"the {method} map of {image} is {'x'.join(map(str, shape))}; {model_name} takes maps on its "
                    f"{grid[0]}x{grid[1]} patch grid or at its {img_size[0]}x{img_size[1]} input size")
    if isinstance(target, str) and target in ("auto", "label"):
        for method, explained in found.targets.items():
            other = sum(1 for i, s in zip(images, samples) if i in explained and explained[i] != s.class_index)
            if other:
                plan_warnings.append(f"{other} {method} maps explain another class than the manifest's, which is "
                                     f"the class scored (--target predicted or a class index scores another)")
    settings = {"model": model_name, "checkpoint": weights, "data": str(data), "split": split,
                "target": "the manifest's class" if target in ("auto", "label") else
                ("the predicted class" if target == "predicted" else f"class {target}")}
    return EvaluationPlan(found, samples, built, Path(out), target, batch_size, settings, force, plan_warnings,
                          manifest_folder=folder)
