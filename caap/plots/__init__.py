"""Plots for attribution maps and patching sweeps.

Two kinds of output, neither needing a browser or a network:

- static PNGs, composed with PIL (exact pixel layout, no figure margins to guess):
  `save_overlay_png` (image | map over image, colour bar, boxes, title) and `save_grid_png` (a grid of
  overlays, e.g. methods x images, with row and column titles); `save_comparison_png` (matplotlib: the
  photo and one overlay per method, each with its own colour bar); `save_heatmap_png` and `save_bar_png`
  (matplotlib, Agg canvas, no pyplot state) for sweeps and benchmark summaries in a README;
- interactive plotly figures written as self-contained HTML (`save_html` embeds plotly.js, never a CDN
  link): `overlay_figure`, `comparison_figure` (one button per method), `layer_patch_figure`,
  `head_figure`, `bar_chart`.

Images may be given as a PIL image, a uint8 array [H, W, 3] (also [H, W] grey, [H, W, 4], uint8
[3, H, W]), a float array [H, W, 3] in [0, 1], or the model's normalised pixels [3, H, W] (or a batch
of one) together with `data_config` (`model.data_config`, or the model itself). Maps and sweep values
may be torch tensors (any device or dtype, with or without grad) or numpy arrays. A map is
[h, w] at any resolution (the 14x14 or 7x7 patch grid, or full resolution), [1, h, w], or a square
per-patch vector [n_patches]. Wrong shapes raise a ValueError that says what was given and what is
accepted. Every writer creates missing parent folders and returns the path it wrote.
"""

from caap.plots._inputs import INTERPOLATIONS, NORMALIZATIONS, as_rgb_array, denormalize, overlay_array
from caap.plots._summary import summarize
from caap.plots.html import (
    bar_chart,
    comparison_figure,
    head_figure,
    layer_patch_figure,
    overlay_figure,
    save_html,
)
from caap.plots.png import (
    CBAR_W,
    LABEL_H,
    PAD,
    TITLE_H,
    save_bar_png,
    save_comparison_png,
    save_grid_png,
    save_heatmap_png,
    save_overlay_png,
    text_colour,
)

__all__ = [
    "CBAR_W",
    "INTERPOLATIONS",
    "LABEL_H",
    "NORMALIZATIONS",
    "PAD",
    "TITLE_H",
    "as_rgb_array",
    "bar_chart",
    "comparison_figure",
    "denormalize",
    "head_figure",
    "layer_patch_figure",
    "overlay_array",
    "overlay_figure",
    "save_bar_png",
    "save_comparison_png",
    "save_grid_png",
    "save_heatmap_png",
    "save_html",
    "save_overlay_png",
    "summarize",
    "text_colour",
]
