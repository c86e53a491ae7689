"""caap.plots: PNG overlays and grids (PIL), offline HTML figures (plotly), input checks."""

from __future__ import annotations

import base64
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from caap import plots as P
from caap.plots._inputs import _normalize_map
from caap.stats import t_quantile

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture(scope="module")
def augreg_config() -> dict:
    """The real data config timm gives the AugReg ViT (no weights needed to read it)."""
    import timm
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model(MODEL, pretrained=False))
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    return cfg


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 224x224 uint8 test picture with structure (gradients and a bright square)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]
    img = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.float64)
    img[60:120, 100:180] = 230
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def blob(h: int, w: int, row: float, col: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (0.05 * h * w))


def normalize(x: np.ndarray, cfg: dict) -> torch.Tensor:
    t = torch.from_numpy(x).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    return (t - mean) / std


def overlay_size(h: int, w: int, title: bool, colorbar: bool = True, scale: float = 1) -> tuple[int, int]:
    hd, wd = round(h * scale), round(w * scale)
    return (3 * P.PAD + 2 * wd + (P.CBAR_W if colorbar else 0), (P.TITLE_H if title else 0) + 2 * P.PAD + hd)


def panels(png: Image.Image, h: int, w: int, title: bool) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(png.convert("RGB"))
    top = (P.TITLE_H if title else 0) + P.PAD
    left = a[top : top + h, P.PAD : P.PAD + w]
    right = a[top : top + h, 2 * P.PAD + w : 2 * P.PAD + 2 * w]
    return left, right


# ----------------------------------------------------------------------------- denormalize, images
def test_denormalize_round_trip_with_the_augreg_config(augreg_config, photo):
    assert np.array_equal(P.denormalize(normalize(photo, augreg_config), augreg_config), photo)
    # timm's own eval transform (crop_pct=1 on an image already 224x224 leaves the pixels alone)
    from hooked_vit.preprocess import preprocess

    pixels = preprocess(Image.fromarray(photo), {**augreg_config, "crop_pct": 1.0})  # [1, 3, 224, 224]
    out = P.denormalize(pixels, augreg_config)
    assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
    assert np.array_equal(out, photo)


def test_denormalize_other_configs_and_inputs(photo):
    px = normalize(photo, IMAGENET)
    assert np.array_equal(P.denormalize(px, IMAGENET), photo)
    assert np.array_equal(P.denormalize(px.numpy(), IMAGENET), photo)
    assert np.array_equal(P.denormalize(px.half(), IMAGENET).astype(int), photo.astype(int)) or (
        np.abs(P.denormalize(px.half(), IMAGENET).astype(int) - photo).max() <= 1
    )
    model_like = SimpleNamespace(data_config=IMAGENET)  # a HookedViT carries model.data_config
    assert np.array_equal(P.denormalize(px[None].requires_grad_(), model_like), photo)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (4, 8, 8), (8, 8), (3, 8)])
def test_denormalize_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        P.denormalize(torch.zeros(shape), IMAGENET)


def test_denormalize_needs_mean_and_std():
    with pytest.raises(ValueError, match="mean"):
        P.denormalize(torch.zeros(3, 4, 4), {"input_size": (3, 4, 4)})


def test_image_forms_agree(photo, augreg_config):
    px = normalize(photo, augreg_config)
    forms = [
        Image.fromarray(photo),
        photo,
        torch.from_numpy(photo),
        torch.from_numpy(photo).permute(2, 0, 1),  # uint8 [3, H, W]
        photo.astype(np.float32) / 255,  # float [H, W, 3] in [0, 1]
    ]
    for f in forms:
        assert np.array_equal(P.as_rgb_array(f), photo)
    assert np.array_equal(P.as_rgb_array(px, augreg_config), photo)
    assert np.array_equal(P.as_rgb_array(px[None], augreg_config), photo)
    assert P.as_rgb_array(photo[..., 0]).shape == (224, 224, 3)  # grey


def test_image_checks(augreg_config):
    with pytest.raises(ValueError, match="data_config"):
        P.as_rgb_array(torch.zeros(3, 32, 32))  # normalised pixels without their config
    with pytest.raises(ValueError, match="accepted"):
        P.as_rgb_array(np.zeros((32, 32, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.as_rgb_array(np.full((8, 8, 3), 3.0))
    with pytest.raises(TypeError):
        P.as_rgb_array(42)


# ----------------------------------------------------------------------------- PNG overlays
@pytest.mark.parametrize("map_shape", [(7, 7), (14, 14), (224, 224), (196,), (1, 14, 14)])
@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_overlay_png_any_map_resolution(tmp_path, photo, map_shape, kind):
    m = torch.rand(map_shape) if kind == "tensor" else np.random.default_rng(1).random(map_shape)
    out = P.save_overlay_png(photo, m, tmp_path / "deep" / "er" / "ov.png", title="a title")
    assert out.is_file()
    with Image.open(out) as png:
        png.load()
        assert png.format == "PNG"
        assert png.size == overlay_size(224, 224, title=True)
        left, right = panels(png, 224, 224, title=True)
    assert np.array_equal(left, photo)  # the plain image, untouched
    assert np.array_equal(right, P.overlay_array(photo, m))  # the overlay, aligned with it


def test_overlay_depends_on_the_map(tmp_path, photo):
    a = P.save_overlay_png(photo, blob(14, 14, 2, 2), tmp_path / "a.png")
    b = P.save_overlay_png(photo, blob(14, 14, 11, 11), tmp_path / "b.png")
    la, ra = panels(Image.open(a), 224, 224, title=False)
    lb, rb = panels(Image.open(b), 224, 224, title=False)
    assert np.array_equal(la, lb)
    assert np.abs(ra.astype(int) - rb.astype(int)).mean() > 10
    # where the map is high (jet: red) vs low (jet: blue), on a grey image
    grey = np.full((224, 224, 3), 128, np.uint8)
    ov = P.overlay_array(grey, blob(14, 14, 2, 2), alpha=0.6).astype(int)
    hot, cold = ov[2 * 16 + 8, 2 * 16 + 8], ov[11 * 16 + 8, 11 * 16 + 8]
    assert hot[0] > hot[2] and cold[2] > cold[0]
    assert np.array_equal(P.overlay_array(grey, blob(14, 14, 2, 2), alpha=0.0), grey)


def test_overlay_scale_colorbar_and_file_suffix(tmp_path, photo):
    out = P.save_overlay_png(photo[:, :200], torch.rand(14, 12), tmp_path / "s.png", scale=2, colorbar=False)
    assert Image.open(out).size == overlay_size(224, 200, title=False, colorbar=False, scale=2)
    out = P.save_overlay_png(photo, torch.rand(14, 14), tmp_path / "noext")
    assert Image.open(out).format == "PNG"


def test_nearest_shows_patches_bilinear_smooths(photo):
    grey = np.full((224, 224, 3), 128, np.uint8)
    m = torch.rand(14, 14, generator=torch.Generator().manual_seed(0))
    near = P.overlay_array(grey, m, interpolation="nearest")
    smooth = P.overlay_array(grey, m, interpolation="bilinear")
    block = (slice(5 * 16, 6 * 16), slice(7 * 16, 8 * 16))
    assert (near[block] == near[5 * 16, 7 * 16]).all()  # one colour per patch
    assert len(np.unique(smooth[block].reshape(-1, 3), axis=0)) > 1
    with pytest.raises(ValueError, match="interpolation"):
        P.overlay_array(grey, m, interpolation="cubic")


def test_overlay_from_normalised_pixels_and_boxes(tmp_path, photo, augreg_config):
    px = normalize(photo, augreg_config)
    box = (48, 64, 160, 176)
    out = P.save_overlay_png(
        px, torch.rand(14, 14), tmp_path / "b.png", data_config=augreg_config, boxes=[box], box_color=(0, 255, 0)
    )
    left, right = panels(Image.open(out), 224, 224, title=False)
    for panel in (left, right):
        assert tuple(panel[120, 48]) == (0, 255, 0)  # left edge of the box
        assert tuple(panel[64, 100]) == (0, 255, 0)  # top edge
    assert np.array_equal(left[100:140, 60:150], photo[100:140, 60:150])  # inside untouched
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        P.save_overlay_png(photo, torch.rand(14, 14), tmp_path / "x.png", boxes=[(1, 2, 3)])
    with pytest.raises(ValueError, match="x1 >= x0"):
        P.save_overlay_png(photo, torch.rand(14, 14), tmp_path / "x.png", boxes=[(10, 2, 3, 40)])


def test_normalizations():
    m = np.array([[-2.0, 0.0], [1.0, 2.0]])
    mm, lo, hi = _normalize_map(m, "minmax")
    assert (lo, hi) == (-2.0, 2.0) and mm.min() == 0 and mm.max() == 1
    sym, lo, hi = _normalize_map(m, "symmetric")
    assert sym[0, 1] == 0.5 and (lo, hi) == (-2.0, 2.0)
    ab, _, _ = _normalize_map(m, "abs")
    assert ab[0, 0] == 1 and ab[0, 1] == 0
    const, _, _ = _normalize_map(np.ones((3, 3)), "minmax")
    assert (const == 0).all()
    with pytest.raises(ValueError, match="normalize"):
        _normalize_map(m, "zscore")


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 14, 14), "shape"),
        (torch.rand(3, 4, 5), "shape"),
        (torch.rand(10), "square"),
        (torch.rand(0, 0), "shape"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
    ],
)
def test_bad_maps_raise(tmp_path, photo, bad, match):
    with pytest.raises(ValueError, match=match):
        P.save_overlay_png(photo, bad, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=match):
        P.overlay_figure(photo, bad)
    assert not (tmp_path / "bad.png").exists()


def test_bad_alpha_and_scale(tmp_path, photo):
    with pytest.raises(ValueError, match="alpha"):
        P.save_overlay_png(photo, torch.rand(14, 14), tmp_path / "a.png", alpha=1.5)
    with pytest.raises(ValueError, match="scale"):
        P.save_overlay_png(photo, torch.rand(14, 14), tmp_path / "a.png", scale=0)


# ----------------------------------------------------------------------------- PNG grids
def test_grid_png(tmp_path, photo, augreg_config):
    other = photo[::-1].copy()
    px = torch.stack([normalize(photo, augreg_config), normalize(other, augreg_config)])
    maps = [None, None, blob(14, 14, 3, 3), blob(7, 7, 5, 5), torch.rand(224, 224), torch.rand(196)]
    images = [photo, other] * 3
    out = P.save_grid_png(
        images, maps, [f"cell {i}" for i in range(6)], tmp_path / "g" / "grid.png", 2,
        row_titles=["image", "CAAP", "rollout"], col_titles=["dog", "cat"], title="methods x images",
        boxes=[None, [(10, 10, 50, 50)], None, None, None, None],
    )
    with Image.open(out) as png:
        png.load()
        w, h = png.size
        arr = np.asarray(png.convert("RGB"))
    assert w > 2 * 224 and h > 3 * 224 and h < 3 * 224 + 200
    # the plain cell 0 is the photo itself, somewhere in the first row
    top = P.TITLE_H + P.LABEL_H + P.PAD + P.LABEL_H
    x0 = w - 2 * (224 + P.PAD)
    assert np.array_equal(arr[top : top + 224, x0 : x0 + 224], photo)
    # a batch of normalised pixels (one per column, repeated) and a [rows, cols, h, w] array of maps
    maps2 = torch.rand(3, 2, 14, 14)
    out2 = P.save_grid_png(torch.cat([px] * 3), maps2, None, tmp_path / "g2.png", data_config=augreg_config)
    assert Image.open(out2).size == (P.PAD + 2 * (224 + P.PAD), P.PAD + 3 * (224 + P.PAD))
    maps2[2, 1] = 1 - maps2[2, 1]
    out3 = P.save_grid_png(torch.cat([px] * 3), maps2, None, tmp_path / "g3.png", data_config=augreg_config)
    a2, a3 = np.asarray(Image.open(out2)), np.asarray(Image.open(out3))
    assert not np.array_equal(a2, a3)
    assert np.array_equal(a2[: P.PAD + 2 * (224 + P.PAD)], a3[: P.PAD + 2 * (224 + P.PAD)])  # other rows alike


def test_grid_png_checks(tmp_path, photo):
    maps = [torch.rand(14, 14)] * 4
    with pytest.raises(ValueError, match="titles has 3"):
        P.save_grid_png(photo, maps, ["a", "b", "c"], tmp_path / "x.png", 2)
    with pytest.raises(ValueError, match="row_titles"):
        P.save_grid_png(photo, maps, None, tmp_path / "x.png", 2, row_titles=["r"])
    with pytest.raises(ValueError, match="one per cell"):
        P.save_grid_png([photo, photo, photo], maps, None, tmp_path / "x.png", 2)
    with pytest.raises(ValueError, match="empty"):
        P.save_grid_png(photo, [], None, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"maps\[1\]"):
        P.save_grid_png(photo, [torch.rand(14, 14), torch.rand(5)], None, tmp_path / "x.png")


# ----------------------------------------------------------------------------- HTML (plotly)
def plotly_data(html: str) -> list[dict]:
    """The traces passed to Plotly.newPlot in a written HTML file."""
    i = html.index("Plotly.newPlot(")
    i = html.index(",", i) + 1  # after the div id
    while html[i].isspace():
        i += 1
    data, _ = json.JSONDecoder().raw_decode(html, i)
    return data


def decode(arr) -> np.ndarray:
    """Plotly >= 6 writes arrays as base64 typed arrays; older versions as lists."""
    if isinstance(arr, dict) and "bdata" in arr:
        shape = [int(s) for s in str(arr.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"])).reshape(shape)
    return np.asarray(arr, dtype=np.float64)


def assert_self_contained(html: str) -> None:
    import plotly.offline

    assert plotly.offline.get_plotlyjs() in html  # the whole plotly.js bundle is embedded
    assert not re.search(r"<script[^>]*\ssrc=", html)  # no external scripts at all (no cdn.plot.ly)


@pytest.mark.parametrize("map_shape", [(7, 7), (14, 14), (224, 224)])
def test_overlay_figure_html_is_offline_and_holds_the_map(tmp_path, photo, map_shape):
    m = torch.randn(map_shape, dtype=torch.float64)
    fig = P.overlay_figure(photo, m, title="Overlay of a test map", boxes=[(10, 20, 100, 120)], alpha=0.4)
    out = P.save_html(fig, tmp_path / "html" / "overlay.html")
    html = out.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert "Overlay of a test map" in html
    data = plotly_data(html)
    assert [t["type"] for t in data] == ["image", "heatmap"]
    assert data[0]["source"].startswith("data:image/png;base64,")
    assert np.allclose(decode(data[1]["z"]), m.numpy())
    assert "row %{customdata[0]}, col %{customdata[1]}" in data[1]["hovertemplate"]
    # the heatmap's cells cover the image: first cell centre and width in go.Image pixel coordinates
    h, w = map_shape
    assert math.isclose(data[1]["dx"], 224 / w) and math.isclose(data[1]["x0"], 224 / w / 2 - 0.5)
    assert math.isclose(data[1]["dy"], 224 / h) and math.isclose(data[1]["y0"], 224 / h / 2 - 0.5)
    assert data[1]["opacity"] == pytest.approx(0.4)
    assert fig.layout.sliders[0].steps[0].args[0] == {"opacity": 0.0}
    assert list(fig.layout.sliders[0].steps[0].args[1]) == [1]  # opacity slider on the map


def test_overlay_figure_from_pixels_and_interpolation(photo, augreg_config):
    px = normalize(photo, augreg_config)
    fig = P.overlay_figure(px, torch.rand(196), data_config=augreg_config, interpolation="bilinear")
    assert fig.data[1].zsmooth == "best"
    assert np.asarray(fig.data[1].z).shape == (14, 14)
    with pytest.raises(ValueError, match="data_config"):
        P.overlay_figure(normalize(photo, augreg_config), torch.rand(14, 14))


@pytest.mark.parametrize("shape", [(12, 196), (12, 14, 14)])
def test_layer_patch_figure(tmp_path, photo, shape):
    torch.manual_seed(0)
    v = torch.randn(shape)
    grids = v.reshape(12, 14, 14).numpy()
    fig = P.layer_patch_figure(v, photo, layer=3, value_label="logit diff", title="layer x patch sweep")
    heat = fig.data[0]
    assert np.allclose(np.asarray(heat.z), grids.reshape(12, 196))  # rows = layers, columns = patches
    assert [t.type for t in fig.data] == ["heatmap", "image", "heatmap"]
    assert np.allclose(np.asarray(fig.data[2].z), grids[3])
    steps = fig.layout.sliders[0].steps
    assert len(steps) == 12 and fig.layout.sliders[0].active == 3
    for i, s in enumerate(steps):
        assert np.allclose(np.asarray(s.args[0]["z"][0]), grids[i])
        assert list(s.args[2]) == [2]
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax  # signed: centred at 0
    html = P.save_html(fig, tmp_path / "lp.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert np.allclose(decode(plotly_data(html)[0]["z"]), grids.reshape(12, 196))


def test_layer_patch_figure_shapes():
    fig = P.layer_patch_figure(np.random.default_rng(0).random((4, 6)), grid_size=(2, 3))
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert np.asarray(fig.data[1].z).shape == (2, 3)
    assert fig.layout.coloraxis.cmin >= 0  # non-negative values: sequential scale
    with pytest.raises(ValueError, match="grid_size"):
        P.layer_patch_figure(torch.rand(4, 6))
    with pytest.raises(ValueError, match="holds 4 patches"):
        P.layer_patch_figure(torch.rand(4, 6), grid_size=(2, 2))
    with pytest.raises(ValueError, match=r"\[n_layers, grid_h, grid_w\] or \[n_layers, n_patches\]"):
        P.layer_patch_figure(torch.rand(12))
    with pytest.raises(ValueError, match="layer_labels"):
        P.layer_patch_figure(torch.rand(4, 9), layer_labels=["a"])


def test_head_figure(tmp_path):
    v = torch.randn(12, 3)
    v[5, 1] = 4.0
    fig = P.head_figure(v, title="head patching")
    h = fig.data[0]
    assert np.allclose(np.asarray(h.z), v.numpy())
    assert h.zmid == 0 and h.zmin == -4.0 and h.zmax == 4.0  # diverging, centred at 0
    html = P.save_html(fig, tmp_path / "heads.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert np.allclose(decode(plotly_data(html)[0]["z"]), v.numpy())
    with pytest.raises(ValueError, match=r"\[n_layers, n_heads\]"):
        P.head_figure(torch.rand(2, 3, 4))


# ----------------------------------------------------------------------------- bar charts
def test_t_quantile():
    for df, want in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452), (100, 1.9840)]:
        assert t_quantile(0.975, df) == pytest.approx(want, abs=2e-3)


def test_bar_chart_from_raw_values_and_summaries(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.random(40)
    fig = P.bar_chart(
        {"caap": torch.from_numpy(raw), "rand": {"mean": 0.3, "ci_low": 0.25, "ci_high": 0.4, "n": 40}, "fixed": 0.1},
        "deletion AUC",
        higher_is_better=False,
        title="benchmark",
    )
    bar = fig.data[0]
    assert list(bar.x) == ["caap", "rand", "fixed"]
    half = t_quantile(0.975, 39) * raw.std(ddof=1) / math.sqrt(40)
    assert bar.y[0] == pytest.approx(raw.mean())
    assert bar.error_y.array[0] == pytest.approx(half) and bar.error_y.arrayminus[0] == pytest.approx(half)
    assert bar.error_y.array[1] == pytest.approx(0.1) and bar.error_y.arrayminus[1] == pytest.approx(0.05)
    assert bar.error_y.array[2] == 0
    assert "lower is better" in fig.layout.yaxis.title.text
    html = P.save_html(fig, tmp_path / "bars.html").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert "benchmark" in html and "caap" in html


def test_bar_chart_from_dataframes(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    long = pd.DataFrame(
        {
            "method": ["caap"] * 20 + ["rollout"] * 20,
            "model": (["tiny"] * 10 + ["small"] * 10) * 2,
            "insertion": rng.random(40),
        }
    )
    fig = P.bar_chart(long, "insertion", color="model")
    assert [t.name for t in fig.data] == ["tiny", "small"]
    sub = long[(long.method == "caap") & (long.model == "tiny")]["insertion"]
    assert fig.data[0].y[0] == pytest.approx(sub.mean())
    summary = pd.DataFrame(
        {"method": ["a", "b"], "pointing": [0.7, 0.5], "pointing_ci_low": [0.6, 0.4], "pointing_ci_high": [0.8, 0.55]}
    )
    fig = P.bar_chart(summary, "pointing")
    assert list(fig.data[0].error_y.array) == pytest.approx([0.1, 0.05])
    tidy = pd.DataFrame({"method": ["a", "a"], "metric": ["del", "ins"], "mean": [0.2, 0.6], "ci": [0.05, 0.1]})
    fig = P.bar_chart(tidy, "ins")
    assert fig.data[0].y[0] == pytest.approx(0.6) and fig.data[0].error_y.array[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not a column"):
        P.bar_chart(long, "deletion")
    assert P.save_bar_png(long, "insertion", tmp_path / "png" / "bars.png", color="model").is_file()


def test_bar_chart_checks():
    with pytest.raises(ValueError, match="non-empty dict"):
        P.bar_chart([1, 2, 3], "x")
    with pytest.raises(ValueError, match="summary dict"):
        P.bar_chart({"a": {"median": 1.0}}, "x")
    with pytest.raises(ValueError, match="ci"):
        P.bar_chart({"a": [1.0, 2.0]}, "x", ci=95)


# ----------------------------------------------------------------------------- static sweeps
def test_static_heatmap_and_bar_pngs(tmp_path):
    out = P.save_heatmap_png(torch.randn(12, 3), tmp_path / "a" / "heads.png", xlabel="head", ylabel="layer", title="t")
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    other = P.save_heatmap_png(torch.randn(12, 3) + 5, tmp_path / "b.png")
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(other)))
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        P.save_heatmap_png(torch.randn(3), tmp_path / "c.png")
    out = P.save_bar_png({"a": [0.1, 0.2, 0.3], "b": [0.5, 0.4, 0.6]}, "AUC", tmp_path / "bars.png")
    assert Image.open(out).size[0] > 100


def test_save_html_needs_a_figure(tmp_path):
    with pytest.raises(TypeError):
        P.save_html({"data": []}, tmp_path / "x.html")
