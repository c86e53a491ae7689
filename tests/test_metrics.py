"""Analytic tests of caap.metrics.

Faithfulness: a transparent linear model, logits = [sum(W * x), 0], on a 32x32 image of ones with 8x8
patches (a 4x4 grid). With the "zero" substrate a removed / unrevealed pixel contributes nothing, so the
target's logit after changing a set of units is a sum of known contributions, and every curve has a closed
form: the perfect map (the contributions themselves) must reach it, the reversed map must do worse and a
random map must sit in between.
Localisation: boxes on a 224x224 input, maps at 7x7, 14x14 and 224x224.
"""

from __future__ import annotations

import math

import pytest
import torch
from metric_closed_forms import partial_sums, sigmoid, trapz
from torch import nn

from caap.metrics import (
    METRICS,
    BoxEnergy,
    Deletion,
    FMeasure,
    Insertion,
    IoU,
    LeRF,
    MoRF,
    NegativePerturbation,
    PointingGame,
    PositivePerturbation,
    get_metric,
    max_points,
)
from hooked_vit.preprocess import gaussian_blur

H = W = 32
P = 8
G = H // P  # 4x4 grid
N = G * G


class LinearModel(nn.Module):
    """logits = [sum(w * x), 0]: the target (class 0) logit is linear in the pixels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weight)  # [chan, H, W]
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        s = (x * self.w).flatten(1).sum(dim=1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def cell_weights(contrib: torch.Tensor) -> torch.Tensor:
    """Per-pixel weights for ones images such that cell j contributes contrib[j] to the logit."""
    w = contrib.view(G, G).repeat_interleave(P, 0).repeat_interleave(P, 1) / (3 * P * P)
    return w.expand(3, H, W).clone()


CONTRIB = torch.tensor([0.9, -0.4, 0.1, 1.6, -0.2, 0.5, 0.0, 2.0, -0.7, 0.3, 1.1, -1.0, 0.7, 0.2, -0.1, 1.3])
PERFECT = CONTRIB.view(1, G, G)
REVERSED = -PERFECT
RANDOM = torch.rand(1, G, G, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def setup():
    model = LinearModel(cell_weights(CONTRIB))
    pixels = torch.ones(1, 3, H, W)
    return model, pixels


def common(**kw):
    return dict(patch_size=P, substrate="zero", **kw)


# ---------------------------------------------------------------------------------------------- insertion / deletion
@pytest.mark.parametrize("score", ["logit", "prob"])
def test_insertion_closed_form(setup, score):
    model, pixels = setup
    f = (lambda s: s) if score == "logit" else sigmoid
    x = [t / N for t in range(N + 1)]
    best = trapz([f(s) for s in partial_sums(CONTRIB)], x)
    worst = trapz([f(s) for s in partial_sums(CONTRIB, descending=False)], x)
    m = Insertion(**common(score=score))
    perfect, reversed_, random = (m(model, pixels, mp, 0).item() for mp in (PERFECT, REVERSED, RANDOM))
    assert perfect == pytest.approx(best, abs=1e-5)
    assert reversed_ == pytest.approx(worst, abs=1e-5)
    assert worst < random < best
    curve = m.curve(model, pixels, PERFECT, 0)
    assert curve.fractions[0] == 0 and curve.fractions[-1] == 1 and curve.scores.shape == (1, N + 1)


@pytest.mark.parametrize("score", ["logit", "prob"])
def test_deletion_closed_form(setup, score):
    model, pixels = setup
    f = (lambda s: s) if score == "logit" else sigmoid
    total = CONTRIB.sum().item()
    x = [t / N for t in range(N + 1)]
    best = trapz([f(total - s) for s in partial_sums(CONTRIB)], x)
    worst = trapz([f(total - s) for s in partial_sums(CONTRIB, descending=False)], x)
    m = Deletion(**common(score=score))
    perfect, reversed_, random = (m(model, pixels, mp, 0).item() for mp in (PERFECT, REVERSED, RANDOM))
    assert not m.higher_is_better
    assert perfect == pytest.approx(best, abs=1e-5)
    assert reversed_ == pytest.approx(worst, abs=1e-5)
    assert best < random < worst


def test_pixel_level_closed_form():
    """Pixel level: every pixel its own weight; n_steps chunks of the ranked pixels."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(1, H, W, generator=gen).expand(3, H, W) / 30
    model, pixels = LinearModel(w.clone()), torch.ones(1, 3, H, W)
    contrib = w.sum(0).flatten()
    perfect = w.sum(0)[None]
    for n_steps in (16, 10):
        counts = [round(t * H * W / n_steps) for t in range(n_steps + 1)]
        desc = partial_sums(contrib)
        x = [c / (H * W) for c in counts]
        expected_ins = trapz([sigmoid(desc[c]) for c in counts], x)
        expected_del = trapz([sigmoid(desc[-1] - desc[c]) for c in counts], x)
        ins = Insertion(level="pixel", n_steps=n_steps, **common())(model, pixels, perfect, 0).item()
        dele = Deletion(level="pixel", n_steps=n_steps, **common())(model, pixels, perfect, 0).item()
        assert ins == pytest.approx(expected_ins, abs=1e-5)
        assert dele == pytest.approx(expected_del, abs=1e-5)
        rev = Insertion(level="pixel", n_steps=n_steps, **common())(model, pixels, -perfect, 0).item()
        noise = torch.rand(1, H, W, generator=gen)
        rnd = Insertion(level="pixel", n_steps=n_steps, **common())(model, pixels, noise, 0).item()
        assert rev < rnd < ins
    # default pixel steps = as many chunks as patches (16 here)
    assert Insertion(level="pixel", **common()).curve(model, pixels, perfect, 0).scores.shape == (1, N + 1)


def test_pixel_level_matches_patch_level_for_a_patch_map(setup):
    """A grid map upsampled with "nearest": ranked pixels come cell by cell, so 16 pixel chunks = 16 cells."""
    model, pixels = setup
    for cls in (Insertion, Deletion):
        patch = cls(**common())(model, pixels, RANDOM, 0)
        pixel = cls(level="pixel", interpolation="nearest", **common())(model, pixels, RANDOM, 0)
        assert torch.allclose(patch, pixel, atol=1e-6)


def test_maps_at_other_resolutions_rank_the_same_cells(setup):
    """A pixel-resolution (32x32) or 8x8 map that is constant per cell is pooled back to the same grid."""
    model, pixels = setup
    m = Insertion(**common())
    ref = m(model, pixels, PERFECT, 0)
    for factor in (2, 8):
        fine = PERFECT.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        assert torch.allclose(m(model, pixels, fine, 0), ref)
    # a coarser 2x2 map: nearest upsampling gives every cell its parent's value
    coarse = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])
    as_grid = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    a = Insertion(interpolation="nearest", **common())(model, pixels, coarse, 0)
    assert torch.allclose(a, m(model, pixels, as_grid, 0))


def rise_blur(x):
    return gaussian_blur(x, 5.0, 11, "zeros")  # the metrics' "blur" substrate


def test_blur_substrate(setup):
    model, pixels = setup
    img = torch.randn(2, 3, 40, 40)
    blurred = rise_blur(torch.ones(1, 3, 40, 40))
    assert torch.allclose(blurred[..., 5:-5, 5:-5], torch.ones(1, 3, 30, 30), atol=1e-5)  # kernel sums to 1
    assert blurred[0, 0, 0, 0] < 1  # zero padding at the border, as RISE
    assert rise_blur(img).shape == img.shape
    # insertion from the blurred image: the target logit is W.blur(x) + the revealed cells' W.(x - blur(x))
    sub = rise_blur(pixels)
    base = (model.w * sub[0]).sum().item()
    gain = (model.w * (pixels[0] - sub[0])).sum(0).view(G, P, G, P).sum((1, 3)).flatten()
    x = [t / N for t in range(N + 1)]
    expected = trapz([base + s for s in partial_sums(gain)], x)
    m = Insertion(patch_size=P, score="logit")
    assert m.substrate == "blur"
    perfect = m(model, pixels, gain.view(1, G, G), 0).item()
    assert perfect == pytest.approx(expected, abs=1e-4)
    assert m(model, pixels, -gain.view(1, G, G), 0).item() < perfect


# ---------------------------------------------------------------------------------------------- AOPC
def test_aopc_closed_form(setup):
    model, pixels = setup
    k = 8
    most, least = partial_sums(CONTRIB)[: k + 1], partial_sums(CONTRIB, descending=False)[: k + 1]
    morf, lerf = MoRF(n_steps=k, score="logit", **common()), LeRF(n_steps=k, score="logit", **common())
    # with the logit score and a zero substrate, f(x0) - f(xk) = the sum of the k removed contributions
    assert morf(model, pixels, PERFECT, 0).item() == pytest.approx(sum(most) / (k + 1), abs=1e-5)
    assert lerf(model, pixels, PERFECT, 0).item() == pytest.approx(sum(least) / (k + 1), abs=1e-5)
    for metric in (MoRF(n_steps=k, **common()), LeRF(n_steps=k, **common())):
        vals = [metric(model, pixels, mp, 0).item() for mp in (PERFECT, RANDOM, REVERSED)]
        if metric.higher_is_better:
            assert vals[0] > vals[1] > vals[2]
        else:
            assert vals[0] < vals[1] < vals[2]
    # K is capped at the number of regions; default K = 100
    assert MoRF(**common()).curve(model, pixels, PERFECT, 0).scores.shape == (1, N + 1)


# ---------------------------------------------------------------------------------------------- Chefer
def test_chefer_perturbation_closed_form(setup):
    model, pixels = setup
    fr = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    counts = [math.floor(f * N + 1e-9) for f in fr]
    total = CONTRIB.sum().item()
    # "black" with mean = std = 0.5 puts -1 in every masked pixel: a masked cell gives -c instead of +c
    pos = PositivePerturbation(patch_size=P, mean=(0.5,) * 3, std=(0.5,) * 3)
    neg = NegativePerturbation(patch_size=P, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert pos.substrate == "black" and pos.score == "accuracy"
    for metric, desc in ((pos, True), (neg, False)):
        s = partial_sums(CONTRIB, descending=desc)
        acc = [float(total - 2 * s[c] > 0) for c in counts] + [0.0]
        expected = trapz(acc, fr + [1.0])
        assert metric(model, pixels, PERFECT, 0).item() == pytest.approx(expected, abs=1e-6)
    assert pos(model, pixels, PERFECT, 0) < pos(model, pixels, REVERSED, 0)
    assert neg(model, pixels, PERFECT, 0) > neg(model, pixels, REVERSED, 0)
    # with the probability score, the random map sits strictly in between
    for cls in (PositivePerturbation, NegativePerturbation):
        m = cls(score="prob", **common())
        vals = [m(model, pixels, mp, 0).item() for mp in (PERFECT, RANDOM, REVERSED)]
        assert (vals[0] < vals[1] < vals[2]) if not m.higher_is_better else (vals[0] > vals[1] > vals[2])
    # final_value=None evaluates the fully masked image
    curve = PositivePerturbation(final_value=None, **common()).curve(model, pixels, PERFECT, 0)
    assert curve.fractions.tolist()[-1] == 1.0 and curve.scores.shape == (1, 11)


def test_black_substrate_needs_normalisation(setup):
    model, pixels = setup
    with pytest.raises(ValueError, match="mean=... and std="):
        PositivePerturbation(patch_size=P)(model, pixels, PERFECT, 0)


# ---------------------------------------------------------------------------------------------- plumbing
def test_batching_targets_and_errors(setup):
    model, pixels = setup
    pix = pixels.expand(3, -1, -1, -1)
    maps = torch.cat([PERFECT, RANDOM, REVERSED])
    a = Deletion(batch_size=1, **common())(model, pix, maps, 0)
    model.calls = 0
    b = Deletion(batch_size=64, **common())(model, pix, maps, None)  # None: predicted class (0 here)
    assert model.calls == 1 + math.ceil(3 * (N + 1) / 64)
    assert torch.allclose(a, b) and a.shape == (3,)
    with pytest.raises(ValueError, match="patch_size"):
        Deletion()(lambda x: model(x), pixels, PERFECT, 0)
    assert Deletion(patch_size=P)(lambda x: model(x), pixels, PERFECT, 0).shape == (1,)  # any callable
    with pytest.raises(ValueError, match="out of range"):
        Deletion(**common())(model, pixels, PERFECT, 5)
    with pytest.raises(ValueError, match="maps"):
        Deletion(**common())(model, pixels, torch.zeros(2, G, G), 0)


def test_tiny_hooked_vit():
    """A random 2-block HookedViT (no download): patch size and normalisation come from the model."""
    from hooked_vit import HookedViT

    torch.manual_seed(0)
    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    pixels = torch.randn(2, 3, 64, 64)
    for name, cls in METRICS.items():
        m = cls()
        if m.kind != "faithfulness":
            continue
        for maps in (torch.rand(2, 4, 4), torch.rand(2, 2, 2), torch.rand(2, 64, 64)):
            v = m(model, pixels, maps)
            assert v.shape == (2,) and torch.isfinite(v).all(), name
        if name in ("insertion", "deletion", "positive_perturbation", "negative_perturbation", "token_deletion",
                    "token_insertion", "road_morf", "road_lerf"):
            assert ((v >= 0) & (v <= 1)).all(), name
    v = Insertion(level="pixel", n_steps=8)(model, pixels, torch.rand(2, 4, 4), targets=[1, 2])
    assert v.shape == (2,)


# ---------------------------------------------------------------------------------------------- localisation
S = 224
BOX = (slice(32, 160), slice(64, 192))  # rows 32..159, cols 64..191: cells 2..9 x 4..11 on a 14x14 grid


def box_mask(n: int = 1) -> torch.Tensor:
    m = torch.zeros(n, S, S, dtype=torch.bool)
    m[:, BOX[0], BOX[1]] = True
    return m


def peaked(res: int, row: int, col: int) -> torch.Tensor:
    m = torch.zeros(1, res, res)
    m[0, row, col] = 1.0
    return m


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_pointing_game_and_energy_inside_outside(interpolation):
    masks = box_mask()
    inside = [peaked(14, 5, 7), peaked(7, 2, 3), peaked(S, 80, 112)]
    outside = [peaked(14, 13, 0), peaked(7, 6, 0), peaked(S, 215, 5)]
    pg, energy = PointingGame(interpolation=interpolation), BoxEnergy(interpolation=interpolation)
    for mp in inside:
        assert pg(None, None, mp, masks=masks).item() == 1
        assert energy(None, None, mp, masks=masks).item() == pytest.approx(1.0)
    for mp in outside:
        assert pg(None, None, mp, masks=masks).item() == 0
        assert energy(None, None, mp, masks=masks).item() == pytest.approx(0.0)


def test_pointing_game_tolerance_boundary():
    masks = box_mask()
    pg = PointingGame()  # 15 px
    assert pg.tolerance == 15
    assert pg(None, None, peaked(S, 100, 191 + 15), masks=masks).item() == 1  # 15 px right of the box
    assert pg(None, None, peaked(S, 100, 191 + 16), masks=masks).item() == 0
    assert pg(None, None, peaked(S, 159 + 9, 191 + 12), masks=masks).item() == 1  # diagonal: 9-12-15
    assert pg(None, None, peaked(S, 159 + 10, 191 + 12), masks=masks).item() == 0
    assert pg(None, None, peaked(S, 31 - 14, 100), masks=masks).item() == 1  # above the box
    strict = PointingGame(tolerance=0)
    assert strict(None, None, peaked(S, 100, 191), masks=masks).item() == 1
    assert strict(None, None, peaked(S, 100, 192), masks=masks).item() == 0


def test_max_points_ties_go_to_the_centre():
    m = torch.zeros(1, 224, 224)
    m[0, 32:64, 96:128] = 1  # a 7x7 cell upsampled with nearest
    assert max_points(m).tolist() == [[47.0, 111.0]]  # a tied pixel next to the block's centre (47.5, 111.5)


def test_iou_and_f1_of_the_mask_itself():
    masks = box_mask(2)
    masks[1] = False
    masks[1, 10:50, 100:220] = True
    for thr in ("area", "max", "top_k"):
        kw = {"k": 100 * masks[0].float().mean().item()} if thr == "top_k" else {}
        iou = IoU(threshold=thr, **kw)(None, None, masks.float(), masks=masks)
        f1 = FMeasure(threshold=thr, **kw)(None, None, masks.float(), masks=masks)
        assert torch.allclose(iou[0], torch.tensor(1.0)) and torch.allclose(f1[0], torch.tensor(1.0)), thr
    # the cell-aligned box as a 14x14 map: exact with nearest, close with bilinear
    grid_map = masks[:1].float().view(1, 14, 16, 14, 16).mean((2, 4))
    assert IoU(interpolation="nearest")(None, None, grid_map, masks=masks[:1]).item() == pytest.approx(1.0)
    assert IoU()(None, None, grid_map, masks=masks[:1]).item() > 0.85
    # a map peaked outside the box overlaps nothing
    far = peaked(S, 220, 2)
    assert IoU(threshold="max")(None, None, far, masks=masks[:1]).item() == 0
    assert FMeasure(threshold="max")(None, None, far, masks=masks[:1]).item() == 0


def test_iou_f1_analytic_partial_overlap():
    masks = box_mask()  # 128 x 128
    mp = torch.zeros(1, S, S)
    mp[0, 32:160, 128:256 - 32] = 1  # 128 x 96 box, fully inside the mask's rows, cols 128..223
    # overlap: rows 32..159 x cols 128..191 = 128 x 64; union = 128*128 + 128*96 - 128*64
    iou = IoU(threshold="max")(None, None, mp, masks=masks).item()
    assert iou == pytest.approx(64 / (128 + 96 - 64))
    p, r = 64 / 96, 64 / 128
    assert FMeasure(threshold="max")(None, None, mp, masks=masks).item() == pytest.approx(2 * p * r / (p + r))
    f2 = FMeasure(threshold="max", beta=2.0)(None, None, mp, masks=masks).item()
    assert f2 == pytest.approx(5 * p * r / (4 * p + r))


def test_localisation_consistent_across_resolutions():
    """One coarse map at 7x7, 14x14 and 224x224 (nearest copies): every localisation metric agrees
    exactly with nearest upsampling, and the pointing game also with bilinear."""
    gen = torch.Generator().manual_seed(3)
    masks = box_mask(4)
    coarse = torch.rand(4, 7, 7, generator=gen)
    versions = [coarse, coarse.repeat_interleave(2, 1).repeat_interleave(2, 2),
                coarse.repeat_interleave(32, 1).repeat_interleave(32, 2)]
    for m in (PointingGame(interpolation="nearest"), BoxEnergy(interpolation="nearest"),
              IoU(interpolation="nearest"), FMeasure(interpolation="nearest")):
        vals = [m(None, None, v, masks=masks) for v in versions]
        assert torch.allclose(vals[0], vals[1]) and torch.allclose(vals[0], vals[2]), m.name
    peaks = [peaked(7, 2, 3), peaked(14, 5, 7), peaked(S, 88, 120)]
    vals = [PointingGame()(None, None, p, masks=box_mask()).item() for p in peaks]
    assert vals == [1.0, 1.0, 1.0]


def test_localisation_edge_cases():
    masks = box_mask(2)
    masks[1] = False
    mp = torch.rand(2, 14, 14)
    for name in ("pointing_game", "box_energy", "iou", "f1"):
        v = get_metric(name)(None, None, mp, masks=masks)
        assert v.shape == (2,) and not torch.isnan(v[0]) and torch.isnan(v[1]), name
    assert torch.isnan(BoxEnergy()(None, None, -torch.ones(1, 14, 14), masks=box_mask())).all()
    neg = torch.full((1, 14, 14), -1.0)
    neg[0, 5, 7] = 2.0
    assert BoxEnergy()(None, None, neg, masks=box_mask()).item() == pytest.approx(1.0)  # negatives ignored
    with pytest.raises(ValueError, match="masks"):
        IoU()(None, None, mp)
    with pytest.raises(ValueError, match="images are"):
        IoU()(None, torch.zeros(2, 3, 64, 64), mp, masks=masks)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_directions():
    expected = {
        "insertion": True, "deletion": False, "morf": True, "lerf": False,
        "positive_perturbation": False, "negative_perturbation": True,
        "pointing_game": True, "box_energy": True, "iou": True, "f1": True,
        "token_deletion": False, "token_insertion": True, "road_morf": False, "road_lerf": True,
    }
    assert set(METRICS) == set(expected)
    for name, better in expected.items():
        m = get_metric(name)
        assert m.name == name and isinstance(m.higher_is_better, bool) and m.higher_is_better is better
        assert m.kind in ("faithfulness", "localisation")
    assert get_metric("Pointing-Game", tolerance=5).tolerance == 5
    with pytest.raises(ValueError, match="accepted names: box_energy, deletion"):
        get_metric("nope")
    assert "Insertion(" in repr(get_metric("insertion"))
