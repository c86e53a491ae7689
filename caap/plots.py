"""Plots for attribution maps and patching sweeps.

Two kinds of output, neither needing a browser or a network:

- static PNGs, composed with PIL (exact pixel layout, no figure margins to guess):
  `save_overlay_png` (image | map over image, colour bar, boxes, title) and `save_grid_png` (a grid of
  overlays, e.g. methods x images, with row and column titles); `save_heatmap_png` and `save_bar_png`
  (matplotlib, Agg canvas, no pyplot state) for sweeps and benchmark summaries in a README;
- interactive plotly figures written as self-contained HTML (`save_html` embeds plotly.js, never a CDN
  link): `overlay_figure`, `layer_patch_figure`, `head_figure`, `bar_chart`.

Images may be given as a PIL image, a uint8 array [H, W, 3] (also [H, W] grey, [H, W, 4], uint8
[3, H, W]), a float array [H, W, 3] in [0, 1], or the model's normalised pixels [3, H, W] (or a batch
of one) together with `data_config` (`model.data_config`, or the model itself). Maps and sweep values
may be torch tensors (any device or dtype, with or without grad) or numpy arrays. A map is
[h, w] at any resolution (the 14x14 or 7x7 patch grid, or full resolution), [1, h, w], or a square
per-patch vector [n_patches]. Wrong shapes raise a ValueError that says what was given and what is
accepted. Every writer creates missing parent folders and returns the path it wrote.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from caap.stats import mean_ci
from hooked_vit.preprocess import unnormalize

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "denormalize",
    "as_rgb_array",
    "overlay_array",
    "save_overlay_png",
    "save_grid_png",
    "save_heatmap_png",
    "save_bar_png",
    "overlay_figure",
    "layer_patch_figure",
    "head_figure",
    "bar_chart",
    "summarize",
    "save_html",
    "text_colour",
]

Box = tuple[float, float, float, float]

# Layout of the PIL-composed PNGs, in output pixels (public so that a caller can predict the size):
#   save_overlay_png: width  = PAD + W*scale + PAD + W*scale + PAD (+ CBAR_W with colorbar)
#                     height = (TITLE_H if title) + PAD + H*scale + PAD
PAD = 8
TITLE_H = 28
LABEL_H = 20
CBAR_W = 72
_BAR_W = 14

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


# ----------------------------------------------------------------------------- PIL helpers
@lru_cache(maxsize=8)
def _font(size: int):
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no FreeType or no font file: PIL's own font
        try:
            return ImageFont.load_default(size)
        except TypeError:
            return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _draw_centered(draw: ImageDraw.ImageDraw, text: str, box: tuple[float, float, float, float], size: int) -> None:
    font = _font(size)
    x0, y0, x1, y1 = box
    text = _fit_text(draw, str(text), font, max(x1 - x0 - 4, 8))
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), text, fill=(0, 0, 0), font=font, anchor="mm")


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


def _draw_boxes(panel: Image.Image, boxes: list[Box], scale: float, colour, width: int) -> None:
    draw = ImageDraw.Draw(panel)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=tuple(colour), width=width)


def _scaled(arr: np.ndarray, scale: float) -> Image.Image:
    im = Image.fromarray(arr)
    if scale == 1:
        return im
    h, w = arr.shape[:2]
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def _check_scale(scale: float) -> float:
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def _save_pil(im: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=None if path.suffix else "PNG")
    return path


# ----------------------------------------------------------------------------- static PNGs
def save_overlay_png(
    image: Any,
    attribution_map: Any,
    path: str | os.PathLike,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: Any = "jet",
    *,
    data_config: Any = None,
    interpolation: str = "bilinear",
    normalize: str | None = "minmax",
    boxes: Any = None,
    box_color: tuple[int, int, int] = (0, 255, 0),
    scale: float = 1,
    colorbar: bool = True,
) -> Path:
    """The plain image beside the map drawn over it, as a PNG (PIL only, no browser).

    The map (any resolution) is upsampled to the image size (`interpolation="nearest"` shows the
    patches), normalised to [0, 1] (`normalize`: minmax, abs, symmetric, none) and blended with `alpha`.
    `boxes` (x0, y0, x1, y1) in the image's pixels are outlined on both panels; the colour bar is
    labelled with the raw values at its ends. Size: see `PAD`, `TITLE_H`, `CBAR_W`.
    """
    img = as_rgb_array(image, data_config)
    raw = _as_map(attribution_map)
    scale = _check_scale(scale)
    over = overlay_array(img, raw, alpha=alpha, cmap=cmap, interpolation=interpolation, normalize=normalize)
    _, lo, hi = _normalize_map(raw, normalize)
    box_list = _check_boxes(boxes)

    left, right = _scaled(img, scale), _scaled(over, scale)
    wd, hd = left.size
    top = TITLE_H if title else 0
    width = 3 * PAD + 2 * wd + (CBAR_W if colorbar else 0)
    canvas = Image.new("RGB", (width, top + 2 * PAD + hd), (255, 255, 255))
    lw = max(1, round(2 * scale))
    for panel in (left, right):
        _draw_boxes(panel, box_list, scale, box_color, lw)
    canvas.paste(left, (PAD, top + PAD))
    canvas.paste(right, (2 * PAD + wd, top + PAD))
    draw = ImageDraw.Draw(canvas)
    if title:
        _draw_centered(draw, title, (0, 0, width, TITLE_H), 16)
    if colorbar:
        x0, y0 = 3 * PAD + 2 * wd, top + PAD
        ramp = _colormap(cmap)(np.linspace(1, 0, hd))[:, :3]
        bar = np.repeat((ramp * 255).round().astype(np.uint8)[:, None], _BAR_W, axis=1)
        canvas.paste(Image.fromarray(bar), (x0, y0))
        font = _font(11)
        draw.text((x0 + _BAR_W + 4, y0), f"{hi + 0.0:.3g}", fill=(0, 0, 0), font=font, anchor="lt")
        draw.text((x0 + _BAR_W + 4, y0 + hd), f"{lo + 0.0:.3g}", fill=(0, 0, 0), font=font, anchor="lb")
    return _save_pil(canvas, path)


def _split_images(images: Any, n: int, data_config: Any) -> list[np.ndarray]:
    """One image for every cell, or a sequence / batch with one per cell."""
    if isinstance(images, (Tensor, np.ndarray)) and images.ndim == 4 and images.shape[0] != 1:
        items: list[Any] = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"images: give one image for every cell or one per cell ({n} cells), got {len(items)}")
    return [as_rgb_array(im, data_config) for im in items]


def save_grid_png(
    images: Any,
    maps: Any,
    titles: Sequence[str] | None,
    path: str | os.PathLike,
    ncols: int | None = None,
    *,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    title: str | None = None,
    data_config: Any = None,
    alpha: float = 0.5,
    cmap: Any = "jet",
    interpolation: str = "bilinear",
    normalize: str | None = "minmax",
    boxes: Sequence[Any] | None = None,
    box_color: tuple[int, int, int] = (0, 255, 0),
    scale: float = 1,
) -> Path:
    """A grid of overlays (e.g. methods down the rows, images across the columns) as one PNG.

    Cells are filled row-major from `maps` (a list of maps, None for the plain image, or an array
    [n, h, w]; an array [rows, cols, h, w] sets `ncols` itself). `images` is one image for every cell
    or one per cell (a list, or a batch [n, 3, H, W] with `data_config`). `titles` label the cells,
    `row_titles` / `col_titles` the rows and columns, `boxes` (one list per cell, or None) are outlined.
    Every map is normalised on its own; cells take the first image's size times `scale`.
    """
    if isinstance(maps, (Tensor, np.ndarray)):
        if maps.ndim == 4:
            ncols = ncols or int(maps.shape[1])
            maps = maps.reshape(-1, *maps.shape[2:])
        if maps.ndim not in (2, 3):
            raise ValueError(f"maps as an array must be [n, h, w] or [rows, cols, h, w]; got shape {tuple(maps.shape)}")
        cells = list(maps) if maps.ndim == 3 else [maps]
    elif isinstance(maps, (list, tuple)):
        cells = list(maps)
    else:
        raise TypeError(f"maps must be a list of maps or an array [n, h, w], got {type(maps).__name__}")
    n = len(cells)
    if n == 0:
        raise ValueError("maps is empty: nothing to draw")
    ncols = int(ncols or min(n, 4))
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    imgs = _split_images(images, n, data_config)
    checks = (("titles", titles, n), ("row_titles", row_titles, nrows), ("col_titles", col_titles, ncols))
    for name, labels, want in checks:
        if labels is not None and len(labels) != want:
            raise ValueError(
                f"{name} has {len(labels)} entries; the grid ({nrows} rows x {ncols} columns) needs {want}"
            )
    if boxes is not None and len(boxes) != n:
        raise ValueError(f"boxes must hold one entry (a list of boxes or None) per cell: {n}, got {len(boxes)}")
    scale = _check_scale(scale)

    ch, cw = round(imgs[0].shape[0] * scale), round(imgs[0].shape[1] * scale)
    label_h = LABEL_H if titles is not None else 0
    top = (TITLE_H if title else 0) + (LABEL_H if col_titles is not None else 0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 0
    if row_titles is not None:
        left = min(220, int(max(probe.textlength(str(t), font=_font(13)) for t in row_titles)) + 2 * PAD)
    width = left + PAD + ncols * (cw + PAD)
    height = top + PAD + nrows * (label_h + ch + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        _draw_centered(draw, title, (0, 0, width, TITLE_H), 16)
    if col_titles is not None:
        y = TITLE_H if title else 0
        for c, t in enumerate(col_titles):
            x = left + PAD + c * (cw + PAD)
            _draw_centered(draw, t, (x, y, x + cw, y + LABEL_H), 13)
    for r in range(nrows):
        y = top + PAD + r * (label_h + ch + PAD)
        if row_titles is not None:
            _draw_centered(draw, row_titles[r], (0, y + label_h, left, y + label_h + ch), 13)
    for i, (img, m) in enumerate(zip(imgs, cells)):
        r, c = divmod(i, ncols)
        x, y = left + PAD + c * (cw + PAD), top + PAD + r * (label_h + ch + PAD)
        arr = img if m is None else overlay_array(
            img, _as_map(m, f"maps[{i}]"), alpha=alpha, cmap=cmap, interpolation=interpolation, normalize=normalize
        )
        cell = Image.fromarray(arr)
        cell_scale = cw / img.shape[1]
        if cell.size != (cw, ch):
            cell = cell.resize((cw, ch), Image.Resampling.LANCZOS)
        if boxes is not None and boxes[i] is not None:
            _draw_boxes(cell, _check_boxes(boxes[i]), cell_scale, box_color, max(1, round(2 * cell_scale)))
        canvas.paste(cell, (x, y + label_h))
        if titles is not None:
            _draw_centered(draw, titles[i], (x, y, x + cw, y + label_h), 12)
    return _save_pil(canvas, path)


def _check_sweep_2d(values: Any, name: str, rows: str, cols: str) -> np.ndarray:
    v = _to_numpy(values, name).astype(np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"{name} must be [{rows}, {cols}]; got shape {tuple(v.shape)}")
    return v


def save_heatmap_png(
    values: Any,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "",
    ylabel: str = "",
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cmap: str | None = None,
    center: float | None = None,
    colorbar_label: str = "",
    annotate: bool | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """A static heatmap [rows, cols] (e.g. layer x head, layer x patch) with matplotlib's Agg canvas.

    Signed values get a diverging map ("RdBu_r") centred at `center` (default 0); otherwise "viridis".
    `annotate` writes each value in its cell (default: when there are at most 400 cells).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    v = _check_sweep_2d(values, "values", "rows", "cols")
    if not np.isfinite(v).all():
        raise ValueError("values hold NaN or infinite entries")
    signed = v.min() < 0 < v.max()
    if center is None and signed:
        center = 0.0
    norm = None
    if center is not None:
        span = max(abs(v.max() - center), abs(v.min() - center)) or 1.0
        norm = TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
    cmap = cmap or ("RdBu_r" if center is not None else "viridis")
    r, c = v.shape
    fig = Figure(figsize=figsize or (min(16, 2.5 + 0.45 * c), min(12, 1.8 + 0.4 * r)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(v, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(colorbar_label)
    for labels, setter, n_ticks in ((row_labels, ax.set_yticks, r), (col_labels, ax.set_xticks, c)):
        if labels is not None:
            if len(labels) != n_ticks:
                raise ValueError(f"{len(labels)} labels given for an axis of {n_ticks}")
            setter(range(n_ticks), [str(x) for x in labels])
    if annotate if annotate is not None else r * c <= 400:
        for (i, j), val in np.ndenumerate(v):
            ax.text(j, i, f"{val:.2g}", ha="center", va="center", fontsize=7, color=text_colour(im.cmap(im.norm(val))))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def text_colour(rgba: Any) -> str:
    """White text on a dark cell, black on a light one (by the cell colour's luminance, any colour map)."""
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


# ----------------------------------------------------------------------------- benchmark summaries
def _mean_ci(values: Any, ci: float) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n): `caap.stats.mean_ci` as an interval."""
    mean, half, n = mean_ci(_to_numpy(values, "values"), ci)
    return mean, mean - half, mean + half, n


_LO_KEYS = ("{m}_ci_low", "{m}_lo", "{m}_low", "ci_low", "ci_lo", "lo", "low", "lower")
_HI_KEYS = ("{m}_ci_high", "{m}_hi", "{m}_high", "ci_high", "ci_hi", "hi", "high", "upper")
_HALF_KEYS = ("{m}_ci", "ci", "ci95", "err", "error")


def _summary_from_mapping(d: Mapping[str, Any], metric: str | None) -> tuple[float, float, float, int] | None:
    """(mean, lo, hi, n) from a summary such as {"mean": .., "ci_low": .., "ci_high": .., "n": ..}."""
    m = metric or ""
    mean_key = next((k for k in ("mean", m) if k and k in d and np.isscalar(d[k])), None)
    if mean_key is None:
        return None
    mean = float(d[mean_key])
    n = int(d.get("n", d.get(f"{m}_n", 0)) or 0)
    lo_key = next((k.format(m=m) for k in _LO_KEYS if k.format(m=m) in d), None)
    hi_key = next((k.format(m=m) for k in _HI_KEYS if k.format(m=m) in d), None)
    if lo_key and hi_key:
        return mean, float(d[lo_key]), float(d[hi_key]), n
    half_key = next((k.format(m=m) for k in _HALF_KEYS if k.format(m=m) in d), None)
    if half_key:
        return mean, mean - float(d[half_key]), mean + float(d[half_key]), n
    return mean, math.nan, math.nan, n


def summarize(
    data: Any, metric: str | None = None, *, x: str | None = None, color: str | None = None, ci: float = 0.95
) -> list[dict[str, Any]]:
    """Benchmark results -> one record per bar: {"x", "color", "mean", "lo", "hi", "n"}.

    Accepted:
      - a dict {name: number}, {name: per-image values (list / array / tensor)}, {name: summary dict
        ({"mean", "ci_low", "ci_high"} or {"mean", "ci"} half-width, optional "n")}, or
        {name: {metric: any of those}};
      - a pandas DataFrame with a `metric` column and a grouping column `x` (default "method", else the
        first text column) and optionally `color`: several rows per group are per-image values (mean and
        a t-based `ci` interval are computed); one row per group is a summary whose interval is read
        from columns such as `{metric}_ci_low` / `{metric}_ci_high`, `ci_low` / `ci_high` or `ci`
        (half-width). A long summary table with columns `metric` and `mean` is filtered on the metric.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci}")
    records: list[dict[str, Any]] = []
    if hasattr(data, "columns") and hasattr(data, "groupby"):
        df = data
        if metric is None:
            raise ValueError(f"metric: name the column to plot, one of {list(df.columns)}")
        if metric not in df.columns:
            if "metric" in df.columns and "mean" in df.columns:
                df = df[df["metric"] == metric]
                if len(df) == 0:
                    present = sorted(set(data["metric"]))
                    raise ValueError(f"no rows with metric == {metric!r}; metrics present: {present}")
                value_col = "mean"
            else:
                raise ValueError(f"metric {metric!r} is not a column; columns: {list(df.columns)}")
        else:
            value_col = metric
        if x is None:
            text_cols = [
                c for c in df.columns if df[c].dtype == object or str(df[c].dtype) in ("string", "str", "category")
            ]
            x = "method" if "method" in df.columns else (text_cols[0] if text_cols else None)
        if x is None or x not in df.columns:
            raise ValueError(f"x: name the column that labels the bars; columns: {list(df.columns)}")
        if color is not None and color not in df.columns:
            raise ValueError(f"color {color!r} is not a column; columns: {list(df.columns)}")
        keys = [x] + ([color] if color else [])
        for key, g in df.groupby(keys, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            if len(g) > 1:
                mean, lo, hi, n = _mean_ci(g[value_col].to_numpy(dtype=np.float64), ci)
            else:
                row = {str(k): v for k, v in g.iloc[0].to_dict().items()}
                if value_col == "mean":
                    row.setdefault(metric, row["mean"])
                mean, lo, hi, n = _summary_from_mapping(row, metric) or (float(row[value_col]), math.nan, math.nan, 1)
            group = str(key[1]) if color else None
            records.append({"x": str(key[0]), "color": group, "mean": mean, "lo": lo, "hi": hi, "n": n})
        return records
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            f"bar data must be a non-empty dict {{name: values | number | summary dict}} or a pandas DataFrame, "
            f"got {type(data).__name__}"
        )
    for name, val in data.items():
        if isinstance(val, Mapping) and metric is not None and metric in val and not np.isscalar(val[metric]):
            val = val[metric]
        if isinstance(val, Mapping):
            s = _summary_from_mapping(val, metric)
            if s is None:
                raise ValueError(
                    f"{name!r}: a summary dict needs a 'mean' (or {metric!r}) entry and optionally ci_low/ci_high "
                    f"or ci; got keys {list(val)}"
                )
            mean, lo, hi, n = s
        elif isinstance(val, (int, float, np.integer, np.floating)) or (isinstance(val, Tensor) and val.ndim == 0):
            mean, lo, hi, n = float(val), math.nan, math.nan, 1
        else:
            mean, lo, hi, n = _mean_ci(val, ci)
        records.append({"x": str(name), "color": None, "mean": mean, "lo": lo, "hi": hi, "n": n})
    return records


def _axis_title(metric: str | None, higher_is_better: bool | None) -> str:
    t = metric or "value"
    if higher_is_better is not None:
        t += " (higher is better)" if higher_is_better else " (lower is better)"
    return t


def bar_chart(
    data: Any,
    metric: str | None = None,
    *,
    x: str | None = None,
    color: str | None = None,
    ci: float = 0.95,
    title: str | None = None,
    higher_is_better: bool | None = None,
) -> go.Figure:
    """Bars of the mean with error bars for the `ci` interval (see `summarize` for the inputs);
    hover shows mean, interval and n. `color` groups bars side by side (e.g. one colour per model)."""
    import plotly.graph_objects as go

    recs = summarize(data, metric, x=x, color=color, ci=ci)
    fig = go.Figure()
    groups = list(dict.fromkeys(r["color"] for r in recs))
    for g in groups:
        rs = [r for r in recs if r["color"] == g]
        mean = np.array([r["mean"] for r in rs])
        lo, hi = np.array([r["lo"] for r in rs]), np.array([r["hi"] for r in rs])
        has_ci = np.isfinite(lo) & np.isfinite(hi)
        fig.add_trace(
            go.Bar(
                x=[r["x"] for r in rs],
                y=mean.tolist(),
                name=str(g) if g is not None else (metric or "value"),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=np.where(has_ci, hi - mean, 0).tolist(),
                    arrayminus=np.where(has_ci, mean - lo, 0).tolist(),
                    visible=bool(has_ci.any()),
                ),
                customdata=[[r["lo"], r["hi"], r["n"]] for r in rs],
                hovertemplate=(
                    "%{x}<br>mean %{y:.4g}<br>"
                    + f"{round(ci * 100)}% CI "
                    + "[%{customdata[0]:.4g}, %{customdata[1]:.4g}]<br>n = %{customdata[2]}"
                    + "<extra>%{fullData.name}</extra>"
                ),
            )
        )
    fig.update_layout(
        title=title or None,
        barmode="group",
        showlegend=len(groups) > 1,
        yaxis_title=_axis_title(metric, higher_is_better),
        xaxis_title=x or "",
        template="plotly_white",
    )
    return fig


def save_bar_png(
    data: Any,
    metric: str | None,
    path: str | os.PathLike,
    *,
    x: str | None = None,
    color: str | None = None,
    ci: float = 0.95,
    title: str | None = None,
    higher_is_better: bool | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """`bar_chart` as a static PNG (matplotlib Agg canvas), for a README table's figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = summarize(data, metric, x=x, color=color, ci=ci)
    labels = list(dict.fromkeys(r["x"] for r in recs))
    groups = list(dict.fromkeys(r["color"] for r in recs))
    fig = Figure(figsize=figsize or (max(4.0, 0.9 * len(labels) * max(1, len(groups)) + 1.5), 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(groups)
    for gi, g in enumerate(groups):
        by_x = {r["x"]: r for r in recs if r["color"] == g}
        xs = [i + (gi - (len(groups) - 1) / 2) * width for i, lab in enumerate(labels) if lab in by_x]
        rs = [by_x[lab] for lab in labels if lab in by_x]
        mean = np.array([r["mean"] for r in rs])
        lo, hi = np.array([r["lo"] for r in rs]), np.array([r["hi"] for r in rs])
        err = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
        ax.bar(xs, mean, width=width, yerr=err, capsize=3, label=str(g) if g is not None else None)
    long_labels = max(map(len, labels)) > 8
    ax.set_xticks(range(len(labels)), labels, rotation=30 if long_labels else 0)
    if long_labels:
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    ax.set_ylabel(_axis_title(metric, higher_is_better))
    if x:
        ax.set_xlabel(x)
    if len(groups) > 1:
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title=color)
    if title:
        ax.set_title(title)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- interactive (plotly)
def _png_data_uri(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_trace(img: np.ndarray):
    """go.Image with pixel (i, j) centred at x=j, y=i (plotly's image convention)."""
    import plotly.graph_objects as go

    return go.Image(source=_png_data_uri(img), hoverinfo="skip", name="image")


def _map_trace(m: np.ndarray, frame: tuple[int, int] | None, **kwargs: Any):
    """A heatmap of m [h, w] whose cells cover the image frame (H, W) in go.Image's coordinates:
    cell (r, c) spans pixels [c W/w, (c+1) W/w) x [r H/h, (r+1) H/h). Hover gives (row, col) and value."""
    import plotly.graph_objects as go

    h, w = m.shape
    H, W = frame or (h, w)
    dx, dy = W / w, H / h
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    unit = "pixel" if (h, w) == (H, W) and frame is not None else "patch"
    label = kwargs.pop("label", "value")
    return go.Heatmap(
        z=m,
        x0=dx / 2 - 0.5,
        dx=dx,
        y0=dy / 2 - 0.5,
        dy=dy,
        customdata=np.stack([rows, cols], axis=-1).astype(np.int32),
        hovertemplate=f"{unit} (row %{{customdata[0]}}, col %{{customdata[1]}})<br>{label} %{{z:.4g}}<extra></extra>",
        **kwargs,
    )


def _image_axes(fig, row: int | None = None, col: int | None = None) -> None:
    kw = dict(row=row, col=col) if row is not None else {}
    fig.update_xaxes(visible=False, constrain="domain", **kw)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x" if not kw else None, constrain="domain", **kw)


def overlay_figure(
    image: Any,
    attribution_map: Any,
    *,
    data_config: Any = None,
    title: str | None = None,
    alpha: float = 0.5,
    colorscale: str = "Jet",
    interpolation: str = "nearest",
    boxes: Any = None,
    zmid: float | None = None,
    value_label: str = "value",
    opacity_slider: bool = True,
    height: int = 560,
) -> go.Figure:
    """The image (`go.Image`) with the map as a semi-transparent `go.Heatmap` aligned to its pixels.

    The map keeps its raw values (colour bar and hover show them); each cell covers its patch of the
    image, and hover shows the patch (row, col) and value ("pixel" for full-resolution maps).
    `interpolation="bilinear"` smooths the display (plotly's zsmooth), "nearest" shows the patches.
    `boxes` (x0, y0, x1, y1 in the image's pixels) are outlined; a slider sets the map's opacity
    (0 shows the plain image). `zmid=0` centres a diverging `colorscale` such as "RdBu_r".
    """
    import plotly.graph_objects as go

    img = as_rgb_array(image, data_config)
    m = _as_map(attribution_map)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
    a = _check_alpha(alpha)
    H, W = img.shape[:2]
    heat = _map_trace(
        m,
        (H, W),
        label=value_label,
        colorscale=colorscale,
        opacity=a,
        zsmooth="best" if interpolation == "bilinear" else False,
        zmid=zmid,
        colorbar=dict(title=dict(text=value_label)),
        name="map",
    )
    fig = go.Figure([_image_trace(img), heat])
    _image_axes(fig)
    shapes = [
        dict(type="rect", x0=x0 - 0.5, y0=y0 - 0.5, x1=x1 - 0.5, y1=y1 - 0.5, line=dict(color="lime", width=2))
        for x0, y0, x1, y1 in _check_boxes(boxes)
    ]
    margin = dict(l=10, r=10, t=50 if title else 10, b=10)
    layout: dict[str, Any] = dict(title=title or None, shapes=shapes, height=height, margin=margin)
    if opacity_slider:
        levels = np.round(np.linspace(0, 1, 11), 2)
        layout["sliders"] = [
            dict(
                active=int(np.argmin(np.abs(levels - a))),
                currentvalue=dict(prefix="map opacity: "),
                pad=dict(t=10),
                steps=[dict(method="restyle", args=[{"opacity": float(v)}, [1]], label=f"{v:.1f}") for v in levels],
            )
        ]
    fig.update_layout(**layout)
    return fig


def _sweep_to_layers_grid(values: Any, grid_size: tuple[int, int] | None) -> np.ndarray:
    v = _to_numpy(values, "values").astype(np.float64)
    if v.ndim == 3:
        if grid_size is not None and tuple(v.shape[1:]) != tuple(grid_size):
            raise ValueError(f"values have grid {tuple(v.shape[1:])} but grid_size={tuple(grid_size)}")
        out = v
    elif v.ndim == 2:
        n = v.shape[1]
        if grid_size is None:
            r = int(round(math.sqrt(n)))
            if r * r != n:
                raise ValueError(
                    f"values [n_layers, {n}]: {n} patches do not form a square grid; pass grid_size=(grid_h, grid_w) "
                    f"(drop prefix tokens first, e.g. model.to_grid)"
                )
            grid_size = (r, r)
        gh, gw = grid_size
        if gh * gw != n:
            raise ValueError(f"grid_size={tuple(grid_size)} holds {gh * gw} patches but values have {n}")
        out = v.reshape(v.shape[0], gh, gw)
    else:
        raise ValueError(
            f"values must be [n_layers, grid_h, grid_w] or [n_layers, n_patches]; got shape {tuple(v.shape)}"
        )
    if 0 in out.shape:
        raise ValueError(f"values are empty: shape {tuple(v.shape)}")
    if not np.isfinite(out).all():
        raise ValueError("values hold NaN or infinite entries")
    return out


def _color_range(v: np.ndarray, colorscale: str | None, zmid: float | None) -> dict[str, Any]:
    """Diverging scale centred on zmid (default 0 for signed values), sequential otherwise."""
    lo, hi = float(v.min()), float(v.max())
    if zmid is None and lo < 0 < hi:
        zmid = 0.0
    if zmid is not None:
        span = max(abs(hi - zmid), abs(lo - zmid)) or 1.0
        return dict(colorscale=colorscale or "RdBu_r", cmin=zmid - span, cmax=zmid + span, cmid=zmid)
    return dict(colorscale=colorscale or "Viridis", cmin=lo, cmax=hi if hi > lo else lo + 1e-12)


def layer_patch_figure(
    values: Any,
    image: Any = None,
    *,
    data_config: Any = None,
    grid_size: tuple[int, int] | None = None,
    layer_labels: Sequence[str] | None = None,
    layer: int | None = None,
    title: str | None = None,
    colorscale: str | None = None,
    zmid: float | None = None,
    alpha: float = 0.6,
    value_label: str = "value",
    height: int = 560,
) -> go.Figure:
    """A layer x patch sweep: left, a heatmap of layers (rows) by patch index (columns); right, one
    layer's [grid_h, grid_w] map (over `image` when given), with a slider over layers that also marks
    the layer's row on the left.

    `values`: [n_layers, grid_h, grid_w], or [n_layers, n_patches] (square, or with `grid_size`).
    Both panels share one colour axis: diverging around 0 when the values change sign.
    `layer` picks the layer shown first (default: the one with the largest |value|).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    g = _sweep_to_layers_grid(values, grid_size)
    L, gh, gw = g.shape
    flat = g.reshape(L, gh * gw)
    labels = [str(x) for x in (layer_labels if layer_labels is not None else range(L))]
    if len(labels) != L:
        raise ValueError(f"layer_labels has {len(labels)} entries for {L} layers")
    if layer is None:
        layer = int(np.abs(g).reshape(L, -1).max(axis=1).argmax())
    if not -L <= layer < L:
        raise ValueError(f"layer={layer} is out of range for {L} layers")
    layer %= L
    img = as_rgb_array(image, data_config) if image is not None else None
    a = _check_alpha(alpha)

    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.08,
        subplot_titles=("layer x patch", "patch grid at one layer"),
    )
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    fig.add_trace(
        go.Heatmap(
            z=flat,
            y=list(range(L)),
            coloraxis="coloraxis",
            customdata=np.broadcast_to(np.stack([rows, cols], -1), (L, gh * gw, 2)).astype(np.int32),
            text=[[lab] * (gh * gw) for lab in labels],
            hovertemplate=(
                "layer %{text}, patch %{x} (row %{customdata[0]}, col %{customdata[1]})"
                f"<br>{value_label} %{{z:.4g}}<extra></extra>"
            ),
            name="layer x patch",
        ),
        row=1, col=1,
    )
    frame = None
    if img is not None:
        fig.add_trace(_image_trace(img), row=1, col=2)
        frame = img.shape[:2]
    grid_trace = _map_trace(g[layer], frame, label=value_label, coloraxis="coloraxis", name="grid",
                            opacity=a if img is not None else 1.0)
    fig.add_trace(grid_trace, row=1, col=2)
    grid_index = len(fig.data) - 1

    fig.update_yaxes(autorange="reversed", tickvals=list(range(L)), ticktext=labels, title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="patch index (row-major)", row=1, col=1)
    fig.update_xaxes(visible=False, constrain="domain", row=1, col=2)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x2", constrain="domain", row=1, col=2)

    def marker(i: int) -> list[dict[str, Any]]:
        return [dict(type="rect", xref="x", yref="y", x0=-0.5, x1=gh * gw - 0.5, y0=i - 0.5, y1=i + 0.5,
                     line=dict(color="black", width=2))]

    cr = _color_range(g, colorscale, zmid)
    fig.update_layout(
        title=title or None,
        height=height,
        shapes=marker(layer),
        coloraxis=dict(
            colorscale=cr["colorscale"], cmin=cr["cmin"], cmax=cr["cmax"], colorbar=dict(title=dict(text=value_label))
        ),
        sliders=[
            dict(
                active=layer,
                currentvalue=dict(prefix="layer: "),
                pad=dict(t=40),
                steps=[
                    dict(
                        method="update",
                        label=labels[i],
                        args=[{"z": [g[i].tolist()]}, {"shapes": marker(i)}, [grid_index]],
                    )
                    for i in range(L)
                ],
            )
        ],
        template="plotly_white",
    )
    return fig


def head_figure(
    values: Any,
    *,
    title: str | None = None,
    layer_labels: Sequence[str] | None = None,
    head_labels: Sequence[str] | None = None,
    colorscale: str = "RdBu_r",
    zmid: float = 0.0,
    value_label: str = "value",
    show_values: bool | None = None,
) -> go.Figure:
    """Head-level patching results [n_layers, n_heads] as a heatmap on a diverging colour scale
    centred at `zmid` (0: positive red, negative blue, symmetric range). `show_values` writes each
    value in its cell (default: at most 400 cells)."""
    import plotly.graph_objects as go

    v = _check_sweep_2d(values, "values", "n_layers", "n_heads")
    if not np.isfinite(v).all():
        raise ValueError("values hold NaN or infinite entries")
    L, n_heads = v.shape
    ylab = [str(x) for x in (layer_labels if layer_labels is not None else range(L))]
    xlab = [str(x) for x in (head_labels if head_labels is not None else range(n_heads))]
    if len(ylab) != L or len(xlab) != n_heads:
        raise ValueError(f"labels: {len(ylab)} layer and {len(xlab)} head labels for values of shape {(L, n_heads)}")
    span = float(np.abs(v - zmid).max()) or 1.0
    show = show_values if show_values is not None else v.size <= 400
    fig = go.Figure(
        go.Heatmap(
            z=v,
            x=xlab,
            y=ylab,
            colorscale=colorscale,
            zmid=zmid,
            zmin=zmid - span,
            zmax=zmid + span,
            texttemplate="%{z:.2f}" if show else None,
            colorbar=dict(title=dict(text=value_label)),
            hovertemplate=f"layer %{{y}}, head %{{x}}<br>{value_label} %{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or None,
        xaxis=dict(title="head", type="category"),
        yaxis=dict(title="layer", type="category", autorange="reversed"),
        template="plotly_white",
    )
    return fig


def save_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """Write a plotly figure as one self-contained HTML file that works offline (plotly.js is
    embedded, ~4.5 MB; no CDN)."""
    if not hasattr(fig, "write_html"):
        raise TypeError(f"save_html needs a plotly Figure, got {type(fig).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, include_mathjax=False, full_html=True, config={"displaylogo": False})
    return path
