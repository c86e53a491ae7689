"""Evaluation data: manifest folders (images, labels, splits, boxes), class names, and box masks
carried into the model's input frame.

A manifest folder holds `manifest.csv` (columns `filename`, `class_index`, optionally `split`) and,
for localisation, `boxes.csv` (`filename`, `x0`, `y0`, `x1`, `y1` in the image file's own pixels).
`../shared/data/imagenet_val1300_boxes` is one. Data is read in place, never copied.

Where the shared folder lives: the environment variable `CAAP_SHARED_DIR`, else `../shared` beside the
repository checkout.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool
from PIL import Image, ImageDraw
from torch import Tensor

from hooked_vit.checks import check_positive_int

SHARED_ENV = "CAAP_SHARED_DIR"
VAL_BOXES = "imagenet_val1300_boxes"
SAMPLE_1K = "imagenet_sample_1k"
DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def shared_dir() -> Path | None:
    """The shared resources folder (models/ and data/), or None where it is absent: `$CAAP_SHARED_DIR`
    when set (and only it, so that setting it to an empty folder switches the shared files off), else
    `../shared` beside the repository checkout."""
    env = os.environ.get(SHARED_ENV)
    candidate = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    if (candidate / "data").is_dir() or (candidate / "models").is_dir():
        return candidate
    return None


def shared_data_dir(name: str = VAL_BOXES) -> Path | None:
    root = shared_dir()
    path = root / "data" / name if root else None
    return path if path is not None and path.is_dir() else None


def shared_checkpoint(model_name: str = DEFAULT_MODEL) -> Path | None:
    root = shared_dir()
    path = root / "models" / f"{model_name}.pth" if root else None
    return path if path is not None and path.is_file() else None


@dataclass(frozen=True)
class Sample:
    """One image of a manifest folder; `boxes` in the image file's pixels (x0, y0, x1, y1)."""

    path: Path
    class_index: int
    split: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = field(default=())

    @property
    def name(self) -> str:
        return self.path.name


def load_manifest(folder: str | os.PathLike, split: str | None = None, limit: int | None = None) -> list[Sample]:
    """The samples of a manifest folder, optionally one split and the first `limit` of them."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{folder} has no manifest.csv; a data folder needs manifest.csv with columns filename, class_index[, split]"
        )
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"filename", "class_index"} <= set(rows[0]):
        raise ValueError(f"{manifest} must have columns filename and class_index; it has {sorted(rows[0])}")
    if split is not None:
        splits = sorted({r.get("split") or "" for r in rows})
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {manifest}; it has {', '.join(s for s in splits if s) or 'none'}")
        rows = [r for r in rows if r.get("split") == split]
    if limit is not None:
        rows = rows[: check_positive_int(limit, "limit")]
    boxes = _load_boxes(folder)
    return [
        Sample(
            path=folder / r["filename"],
            class_index=int(r["class_index"]),
            split=r.get("split") or None,
            boxes=tuple(boxes.get(r["filename"], ())),
        )
        for r in rows
    ]


def _load_boxes(folder: Path) -> dict[str, list[tuple[float, float, float, float]]]:
    path = folder / "boxes.csv"
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["filename"], []).append((float(r["x0"]), float(r["y0"]), float(r["x1"]), float(r["y1"])))
    return out


@lru_cache(maxsize=1)
def class_names() -> list[str]:
    """ImageNet-1k class names (from the shared labels where present, else "class <i>")."""
    root = shared_dir()
    path = root / "data" / "imagenet_labels" / "imagenet_class_index.json" if root else None
    if path is not None and path.is_file():
        index = json.loads(path.read_text())
        return [index[str(i)][1].replace("_", " ") for i in range(len(index))]
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    except Exception:  # pragma: no cover - depends on timm's bundled metadata
        return [f"class {i}" for i in range(1000)]


@lru_cache(maxsize=1)
def _class_names_as_written() -> list[list[str]]:
    """Every name each ImageNet-1k class answers to, as written: the short name of the shared labels and
    all of WordNet's comma-separated synonyms that timm ships (e.g. 281: tabby, tabby cat)."""
    out = [[n.replace("_", " ").strip()] for n in class_names()]
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        for i, names in enumerate(out):
            names.extend(n.strip() for n in info.index_to_description(i).split(",") if n.strip())
    except Exception:  # pragma: no cover - depends on timm's bundled metadata
        pass
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


@lru_cache(maxsize=1)
def _class_synonyms() -> list[set[str]]:
    """`_class_names_as_written`, lower case, one space between words: what a name is compared with."""
    return [{_norm(n) for n in names} for names in _class_names_as_written()]


def class_index(name: str, n_classes: int = 1000) -> int:
    """The ImageNet-1k class a name means: case and underscores do not matter, any WordNet synonym
    counts ("tabby", "tabby cat"). A name shared by several classes ("crane": the bird and the
    machine) raises a ValueError that lists them with their indices; an unknown name one that lists
    the closest names."""
    import difflib

    key = " ".join(name.lower().replace("_", " ").split())
    synonyms = _class_synonyms()[:n_classes]
    matches = [i for i, names in enumerate(synonyms) if key in names]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = "; ".join(f"{i} ({_description(i)})" for i in matches)
        raise ValueError(f"class name {name!r} is ambiguous, it names {len(matches)} classes: {listed}; pass the index")
    containing = classes_containing(key, n_classes)
    hint = ""
    if containing:
        shown = ", ".join(f"{n} ({i})" for i, n in containing[:_SHOWN])
        more = f" and {len(containing) - _SHOWN} more" if len(containing) > _SHOWN else ""
        hint = f"; classes whose names contain it: {shown}{more}"
    every = sorted({n for names in synonyms for n in names})
    close = [c for c in difflib.get_close_matches(key, every, n=5) if all(c != _norm(n) for _, n in containing)]
    hint += f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"{name!r} is not an ImageNet class name{hint}; pass a class index 0..{n_classes - 1} or a name")


_SHOWN = 10


def classes_containing(word: str, n_classes: int = 1000) -> list[tuple[int, str]]:
    """The ImageNet-1k classes one of whose names holds `word` as whole words ("cat": tabby cat, tiger
    cat, Persian cat, ...; not "polecat"), as (index, that name), by index."""
    import re

    key = _norm(word)
    if not key:
        return []
    pattern = re.compile(rf"(?<![\w-]){re.escape(key)}(?![\w-])")
    out = []
    for i, names in enumerate(_class_names_as_written()[:n_classes]):
        hits = [n for n in names if pattern.search(_norm(n))]
        if hits:
            out.append((i, min(hits, key=len)))
    return out


def _description(index: int) -> str:
    try:
        from timm.data import ImageNetInfo

        return ImageNetInfo().index_to_description(index, detailed=True)
    except Exception:  # pragma: no cover - depends on timm's bundled metadata
        return class_name(index)


def class_name(index: int) -> str:
    names = class_names()
    return names[index] if 0 <= index < len(names) else f"class {index}"


def box_mask(
    boxes: Any, image_size: tuple[int, int], data_config: dict[str, Any]
) -> Bool[Tensor, "H W"]:
    """The union of `boxes` (x0, y0, x1, y1 in the original image's pixels; `image_size` = (width,
    height)) as a mask in the model's input frame: the same resize and crop that
    `model.preprocess` applies to the image, so mask pixel (i, j) lies under pixel (i, j) of the input."""
    canvas = Image.new("L", tuple(int(s) for s in image_size), 0)
    draw = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    return torch.from_numpy(np.asarray(geometric_transform(canvas, data_config)) > 127)


def geometric_transform(image: Image.Image, data_config: dict[str, Any]) -> Image.Image:
    """Only the resize and crop steps of the model's eval transform (timm's, or a Hugging Face image
    processor's), with nearest-neighbour resampling."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    from hooked_vit.preprocess import make_transform

    transform = make_transform(data_config)
    if hasattr(transform, "geometric"):  # a Hugging Face image processor's steps (hooked_vit.preprocess)
        return transform.geometric(image)
    out = image
    for t in transform.transforms:
        if isinstance(t, Resize):
            out = Resize(t.size, interpolation=InterpolationMode.NEAREST, max_size=t.max_size)(out)
        elif isinstance(t, CenterCrop):
            out = t(out)
        elif type(t).__name__ in ("MaybeToTensor", "ToTensor", "Normalize", "MaybePILToTensor"):
            continue
        else:
            raise ValueError(f"cannot carry boxes through the transform step {t!r}")
    return out


def sample_mask(sample: Sample, data_config: dict[str, Any]) -> Bool[Tensor, "H W"]:
    """A sample's box union in the model's input frame."""
    with Image.open(sample.path) as im:
        size = im.size
    return box_mask(sample.boxes, size, data_config)
