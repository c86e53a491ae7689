"""Static PNGs: PIL-composed overlays and grids (exact pixel layout), matplotlib (Agg canvas, no pyplot
state) heatmaps and bar charts."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from caap.files import atomic_path
from caap.plots._inputs import (
    Box,
    _as_map,
    _check_boxes,
    _check_sweep_2d,
    _colormap,
    _normalize_map,
    as_rgb_array,
    overlay_array,
)
from caap.plots._summary import _axis_title, summarize
from hooked_vit.checks import check_positive_int

# Layout of the PIL-composed PNGs, in output pixels (public so that a caller can predict the size):
#   save_overlay_png: width  = PAD + W*scale + PAD + W*scale + PAD (+ CBAR_W with colorbar)
#                     height = (TITLE_H if title) + PAD + H*scale + PAD
PAD = 8
TITLE_H = 28
LABEL_H = 20
CBAR_W = 72
_BAR_W = 14


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
    with atomic_path(path) as tmp:  # never a truncated PNG (caap.files)
        im.save(tmp, format=None if path.suffix else "PNG")  # the temporary name keeps the suffix
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
    ncols = min(n, 4) if ncols is None else check_positive_int(ncols, "ncols")
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
    return _savefig(fig, path)


def save_comparison_png(
    image: Any,
    maps: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    data_config: Any = None,
    title: str | None = None,
    subtitles: Mapping[str, str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    interpolation: str = "bilinear",
    ncols: int | None = None,
    dpi: int = 110,
) -> Path:
    """The photo, then one overlay per method (`maps`: name -> map, any resolution), each with a colour
    bar of its own map's raw values (min to max: methods differ in scale and units, so each keeps its
    own). matplotlib's Agg canvas, no pyplot state. `subtitles` add a line under a method's name (e.g.
    its seconds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps is empty: give at least one method's map")
    img = as_rgb_array(image, data_config)
    n = len(maps) + 1
    ncols = int(ncols or min(n, 4))
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.3 * ncols, 3.5 * nrows + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=10)
    spacer = fig.colorbar(ScalarMappable(Normalize(0, 1), _colormap(cmap)), ax=axes[0], fraction=0.046, pad=0.02)
    spacer.ax.set_visible(False)  # the photo as large as the overlays
    for ax, (name, m) in zip(axes[1:], maps.items()):
        raw = _as_map(m, f"maps[{name!r}]")
        ax.imshow(overlay_array(img, raw, alpha=alpha, cmap=cmap, interpolation=interpolation))
        line = (subtitles or {}).get(name)
        ax.set_title(name if not line else f"{name}\n{line}", fontsize=10)
        lo, hi = float(raw.min()), float(raw.max())
        bar = fig.colorbar(ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1e-12), _colormap(cmap)), ax=ax,
                           fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _savefig(fig, path)


def _savefig(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:  # never a truncated file (caap.files)
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path


def text_colour(rgba: Any) -> str:
    """White text on a dark cell, black on a light one (by the cell colour's luminance, any colour map)."""
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


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
    return _savefig(fig, path)


