"""Interactive plotly figures, written as self-contained HTML (`save_html` embeds plotly.js, never a CDN
link)."""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import plotly.graph_objects as go

from caap.files import atomic_path
from caap.plots._inputs import (
    INTERPOLATIONS,
    _as_map,
    _check_alpha,
    _check_boxes,
    _check_sweep_2d,
    _to_numpy,
    as_rgb_array,
)
from caap.plots._summary import _axis_title, summarize


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


def comparison_figure(
    image: Any,
    maps: Mapping[str, Any],
    *,
    data_config: Any = None,
    title: str | None = None,
    subtitles: Mapping[str, str] | None = None,
    alpha: float = 0.5,
    colorscale: str = "Jet",
    interpolation: str = "nearest",
    value_label: str = "value",
    height: int = 600,
) -> go.Figure:
    """Several methods' maps of one image, one at a time: the image with one method's map over it, a
    button per method to switch (the colour bar follows: each method keeps its own scale), and a slider
    for the map's opacity (0 shows the plain image). Hover gives each patch's (row, col) and value.
    `subtitles` (name -> text) add to the title when that method is shown."""
    import plotly.graph_objects as go

    if not maps:
        raise ValueError("maps is empty: give at least one method's map")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
    img = as_rgb_array(image, data_config)
    a = _check_alpha(alpha)
    names = list(maps)
    fig = go.Figure([_image_trace(img)])
    for i, name in enumerate(names):
        fig.add_trace(_map_trace(_as_map(maps[name], f"maps[{name!r}]"), img.shape[:2], label=value_label,
                                 colorscale=colorscale, opacity=a, visible=i == 0, name=name,
                                 zsmooth="best" if interpolation == "bilinear" else False,
                                 colorbar=dict(title=dict(text=value_label))))
    _image_axes(fig)

    def heading(name: str) -> str:
        line = (subtitles or {}).get(name)
        text = f"{title}: {name}" if title else name
        return f"{text} ({line})" if line else text

    buttons = [dict(label=name, method="update",
                    args=[{"visible": [True] + [j == i for j in range(len(names))]}, {"title.text": heading(name)}])
               for i, name in enumerate(names)]
    levels = np.round(np.linspace(0, 1, 11), 2)
    fig.update_layout(
        title=dict(text=heading(names[0]), y=0.98, yanchor="top"),
        height=height,
        margin=dict(l=10, r=10, t=100, b=10),
        updatemenus=[dict(type="buttons", direction="right", buttons=buttons, x=0, xanchor="left", y=1.0,
                          yanchor="bottom", showactive=True, pad=dict(r=4, b=6))],
        sliders=[dict(active=int(np.argmin(np.abs(levels - a))), currentvalue=dict(prefix="map opacity: "),
                      pad=dict(t=10),
                      steps=[dict(method="restyle", args=[{"opacity": float(v)}, list(range(1, len(names) + 1))],
                                  label=f"{v:.1f}") for v in levels])],
    )
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
    with atomic_path(path) as tmp:  # never a truncated HTML file (caap.files)
        fig.write_html(tmp, include_plotlyjs=True, include_mathjax=False, full_html=True, config={"displaylogo": False})
    return path
