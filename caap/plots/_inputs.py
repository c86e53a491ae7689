"""What every plot accepts, coerced in one place: images (PIL, arrays, normalised model pixels), maps at any
resolution, sweep values; and the overlay of a map on an image as an RGB array."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hooked_vit.preprocess import unnormalize

Box = tuple[float, float, float, float]

INTERPOLATIONS = ("bilinear", "nearest")
NORMALIZATIONS = ("minmax", "abs", "symmetric", "none")

_IMAGE_HELP = (
    "accepted: a PIL image, a uint8 array [H, W, 3] (or [H, W], [H, W, 4], [3, H, W]), a float array "
    "[H, W, 3] in [0, 1], or normalised model pixels [3, H, W] / [1, 3, H, W] with data_config"
)
_MAP_HELP = (
    "accepted: [h, w] at any resolution (a patch grid such as 14x14 or 7x7, or full resolution), "
    "[1, h, w], or a square per-patch vector [n_patches] (use model.to_grid for other grids)"
)

# ----------------------------------------------------------------------------- conversions
def _to_numpy(x: Any, name: str) -> np.ndarray:
    """A tensor (any device, dtype, grad), array or nested list -> numpy (floats as float64)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    elif isinstance(x, (list, tuple)) or np.isscalar(x):
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be numeric (a tensor, array or nested list of numbers): {e}") from e
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if x.dtype == np.bool_:
        x = x.astype(np.float64)
    if not (np.issubdtype(x.dtype, np.number)):
        raise ValueError(f"{name} must hold numbers, got dtype {x.dtype}")
    return x


def _resolve_data_config(data_config: Any) -> Mapping[str, Any]:
    """A timm data config dict, or an object carrying one (a `HookedViT`: `model.data_config`)."""
    cfg = getattr(data_config, "data_config", data_config)
    if not isinstance(cfg, Mapping) or "mean" not in cfg or "std" not in cfg:
        raise ValueError(
            "data_config must be timm's data config (a dict with 'mean' and 'std', e.g. model.data_config "
            f"or timm.data.resolve_data_config({{}}, model=...)) or a model carrying one; got {type(cfg).__name__}"
        )
    return cfg


def denormalize(pixels: Tensor | np.ndarray, data_config: Any) -> np.ndarray:
    """Undo the model's normalisation: pixels [3, H, W] (or [1, 3, H, W]) -> uint8 [H, W, 3].

    `data_config` is timm's data config (`model.data_config`) or the model itself; values are
    `pixel * std + mean`, scaled to 0..255, rounded and clipped. Exact inverse of timm's
    `ToTensor + Normalize` for uint8 images.
    """
    cfg = _resolve_data_config(data_config)
    x = _to_numpy(pixels, "pixels").astype(np.float64)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    c = len(cfg["mean"])
    if x.ndim != 3 or x.shape[0] != c or len(cfg["std"]) != c:
        raise ValueError(
            f"pixels must be normalised model pixels [{c}, H, W] or [1, {c}, H, W] (one image; index a batch "
            f"first), matching the data config's {c} channel means; got shape {tuple(x.shape)}"
        )
    x = unnormalize(torch.from_numpy(x)[None], cfg)[0].numpy()
    out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    if c == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def as_rgb_array(image: Any, data_config: Any = None) -> np.ndarray:
    """Any accepted image form -> uint8 [H, W, 3] (see the module docstring for the forms)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB")).copy()
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if not isinstance(image, (Tensor, np.ndarray)):
        raise TypeError(f"cannot use a {type(image).__name__} as an image; {_IMAGE_HELP}")
    a = _to_numpy(image, "image")
    shape = tuple(a.shape)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    is_float = np.issubdtype(a.dtype, np.floating)
    chw = a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4)
    if chw and is_float:
        if data_config is None:
            raise ValueError(
                f"a float image of shape {tuple(a.shape)} is read as normalised model pixels [3, H, W]: pass "
                f"data_config=model.data_config to undo the normalisation (or pass a uint8 [H, W, 3] image)"
            )
        return denormalize(a, data_config)
    if chw:
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"cannot read an image from shape {shape}; {_IMAGE_HELP}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if is_float:
        if a.min() < 0 or a.max() > 1:
            raise ValueError(
                "a float [H, W, 3] image must hold values in [0, 1]; for normalised model pixels pass "
                "[3, H, W] with data_config, else pass uint8"
            )
        return np.ascontiguousarray(np.rint(a * 255).astype(np.uint8))
    if a.min() < 0 or a.max() > 255:
        raise ValueError("an integer image must hold values in 0..255")
    return np.ascontiguousarray(a.astype(np.uint8))


def _as_map(m: Any, name: str = "attribution_map") -> np.ndarray:
    """A map in any accepted form -> float64 [h, w]; checks shape and finiteness."""
    a = _to_numpy(m, name).astype(np.float64)
    shape = tuple(a.shape)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1:
        r = int(round(math.sqrt(a.size)))
        if a.size == 0 or r * r != a.size:
            raise ValueError(f"{name}: a vector of {a.size} values is not a square patch grid; {_MAP_HELP}")
        a = a.reshape(r, r)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} has shape {shape}; {_MAP_HELP}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values ({int((~np.isfinite(a)).sum())} of {a.size})")
    return a


def _normalize_map(m: np.ndarray, normalize: str | None) -> tuple[np.ndarray, float, float]:
    """Map -> [0, 1] for display, with the raw values that 0 and 1 stand for.

    minmax: (m - min) / (max - min); abs: |m| / max|m|; symmetric: 0.5 + m / (2 max|m|) (signed maps
    with a diverging colour map, 0.5 = zero); none: the values clipped to [0, 1].
    """
    mode = "none" if normalize is None else normalize
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not one of {NORMALIZATIONS} (or None)")
    if mode == "minmax":
        lo, hi = float(m.min()), float(m.max())
        out = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        return out, lo, hi
    if mode in ("abs", "symmetric"):
        top = float(np.abs(m).max())
        if mode == "abs":
            return (np.abs(m) / top if top > 0 else np.zeros_like(m)), 0.0, top
        return (0.5 + 0.5 * m / top if top > 0 else np.full_like(m, 0.5)), -top, top
    return np.clip(m, 0.0, 1.0), 0.0, 1.0


def _resize_map(m: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """[h, w] -> [H, W]; bilinear (pixel centres aligned, align_corners=False) or nearest (patches)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
    if m.shape == tuple(size):
        return m
    t = torch.from_numpy(np.ascontiguousarray(m))[None, None]
    if interpolation == "nearest":
        out = F.interpolate(t, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def _colormap(cmap: Any):
    import matplotlib

    if isinstance(cmap, str):
        try:
            return matplotlib.colormaps[cmap]
        except KeyError as e:
            raise ValueError(
                f"unknown matplotlib colour map {cmap!r} (e.g. 'jet', 'viridis', 'inferno', 'RdBu_r')"
            ) from e
    return cmap


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return float(alpha)


def overlay_array(
    image: Any,
    attribution_map: Any,
    *,
    data_config: Any = None,
    alpha: float = 0.5,
    cmap: Any = "jet",
    interpolation: str = "bilinear",
    normalize: str | None = "minmax",
) -> np.ndarray:
    """The map, upsampled to the image and coloured, blended over it: uint8 [H, W, 3].

    `(1 - alpha) * image + alpha * cmap(normalised map)`.
    """
    img = as_rgb_array(image, data_config)
    m, _, _ = _normalize_map(_as_map(attribution_map), normalize)
    m = _resize_map(m, img.shape[:2], interpolation)
    colours = _colormap(cmap)(np.clip(m, 0, 1))[..., :3]
    a = _check_alpha(alpha)
    out = (1 - a) * (img.astype(np.float64) / 255.0) + a * colours
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)



def _check_boxes(boxes: Any) -> list[Box]:
    if boxes is None or (isinstance(boxes, (list, tuple)) and len(boxes) == 0):
        return []
    b = _to_numpy(boxes, "boxes").astype(np.float64)
    if b.ndim == 1 and b.size == 4:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(
            f"boxes must be a list of (x0, y0, x1, y1) in the image's pixels, or an array [n, 4]; "
            f"got shape {tuple(b.shape)}"
        )
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError("each box must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    return [tuple(float(v) for v in row) for row in b]  # type: ignore[misc]


def _check_sweep_2d(values: Any, name: str, rows: str, cols: str) -> np.ndarray:
    v = _to_numpy(values, name).astype(np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"{name} must be [{rows}, {cols}]; got shape {tuple(v.shape)}")
    return v


