"""Analytic tests of the metrics that share no fill-in with the methods: token deletion / insertion
(patch tokens leave the sequence), ROAD (noisy linear imputation), and the cascading-randomisation
sanity check.

Token metrics: a transparent "token-sum" model whose target logit is the sum of the kept patch tokens'
values (each patch's value: the mean of its pixels), so every curve has a closed form, as the pixel-space
insertion/deletion tests in test_metrics.py.
ROAD: the imputation reproduces any linear ramp exactly away from the border (the 8-neighbour weights are
symmetric), a constant surround exactly, and the weighted mean with the paper's 1/6 and 1/12 weights.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from metric_closed_forms import partial_sums, sigmoid, trapz
from torch import nn

from caap.metrics import (
    METRICS,
    Evaluator,
    ROADLeRF,
    ROADMoRF,
    TokenDeletion,
    TokenInsertion,
    get_metric,
    linear_imputation,
)
from caap.metrics.road import NEIGHBOURS

H = W = 32
P = 8
G = H // P
N = G * G
CONTRIB = torch.tensor([0.9, -0.4, 0.1, 1.6, -0.2, 0.5, 0.0, 2.0, -0.7, 0.3, 1.1, -1.0, 0.7, 0.2, -0.1, 1.3])
PERFECT = CONTRIB.view(1, G, G)
REVERSED = -PERFECT
RANDOM = torch.rand(1, G, G, generator=torch.Generator().manual_seed(0))


class TokenSumModel(nn.Module):
    """logits = [bias + sum of the kept patches' values, 0]; a patch's value is the mean of its pixels."""

    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(patch_size=(P, P), n_prefix_tokens=1)
        self.bias = bias
        self.calls = 0
        self.rows = 0

    def values(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x.view(b, c, G, P, G, P).mean((1, 3, 5)).reshape(b, N)

    def forward_patches(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        s = self.bias + self.values(x).gather(1, keep.long()).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_patches(x, torch.arange(N).expand(x.shape[0], N))


def image_of(contrib: torch.Tensor) -> torch.Tensor:
    return contrib.view(G, G).repeat_interleave(P, 0).repeat_interleave(P, 1).expand(1, 3, H, W).clone()


# ---------------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("score", ["logit", "prob"])
@pytest.mark.parametrize("n_steps", [None, 4, 3])
def test_token_curves_closed_form(score, n_steps):
    model, pixels = TokenSumModel(), image_of(CONTRIB)
    f = (lambda s: s) if score == "logit" else sigmoid
    k = n_steps or N
    counts = [round(t * N / k) for t in range(k + 1)]
    x = [c / N for c in counts]
    total = CONTRIB.sum().item()
    best, worst = partial_sums(CONTRIB), partial_sums(CONTRIB, descending=False)
    dele, ins = TokenDeletion(n_steps=n_steps, score=score), TokenInsertion(n_steps=n_steps, score=score)
    assert not dele.higher_is_better and ins.higher_is_better
    # deletion: the most relevant tokens leave first; insertion: they come first
    assert dele(model, pixels, PERFECT, 0).item() == pytest.approx(trapz([f(total - best[c]) for c in counts], x), abs=1e-5)
    assert dele(model, pixels, REVERSED, 0).item() == pytest.approx(trapz([f(total - worst[c]) for c in counts], x), abs=1e-5)
    assert ins(model, pixels, PERFECT, 0).item() == pytest.approx(trapz([f(best[c]) for c in counts], x), abs=1e-5)
    assert ins(model, pixels, REVERSED, 0).item() == pytest.approx(trapz([f(worst[c]) for c in counts], x), abs=1e-5)
    if n_steps is None:
        d = [dele(model, pixels, mp, 0).item() for mp in (PERFECT, RANDOM, REVERSED)]
        i = [ins(model, pixels, mp, 0).item() for mp in (PERFECT, RANDOM, REVERSED)]
        assert d[0] < d[1] < d[2] and i[0] > i[1] > i[2]


def test_token_metrics_any_resolution_and_batching():
    model = TokenSumModel()
    pixels = torch.cat([image_of(CONTRIB), image_of(CONTRIB.flip(0))])
    maps = torch.cat([PERFECT, RANDOM])
    ref = TokenDeletion(n_steps=4)(model, pixels, maps, 0)
    fine = maps.repeat_interleave(8, 1).repeat_interleave(8, 2)  # pixel resolution, constant per patch
    assert torch.allclose(TokenDeletion(n_steps=4)(model, pixels, fine, 0), ref)
    model.calls = 0
    small = TokenDeletion(n_steps=4, batch_size=1)(model, pixels, maps, 0)
    assert torch.allclose(small, ref)
    # a call holds batch_size full images' worth of tokens: more rows when fewer tokens are kept
    assert model.calls < 2 * 5
    curve = TokenInsertion(n_steps=4).curve(model, pixels, maps, 0)
    assert curve.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and curve.scores.shape == (2, 5)


def test_token_metric_errors():
    model, pixels = TokenSumModel(), image_of(CONTRIB)
    with pytest.raises(ValueError, match=r"accepted: 1\.\.16, equal steps at the divisors 1, 2, 4, 8, 16"):
        TokenDeletion(n_steps=17)(model, pixels, PERFECT, 0)
    with pytest.raises(ValueError, match="n_steps must be at least 1, got 0"):
        TokenDeletion(n_steps=0)
    with pytest.raises(ValueError, match="forward_patches"):
        TokenInsertion(patch_size=P)(lambda x: model(x), pixels, PERFECT, 0)
    with pytest.raises(ValueError, match="NaN"):
        TokenInsertion()(model, pixels, PERFECT * float("nan"), 0)


def test_evaluator_shares_token_passes():
    model = TokenSumModel(bias=0.3)
    pixels = torch.cat([image_of(CONTRIB), image_of(-CONTRIB)])
    maps = torch.cat([PERFECT, RANDOM])
    metrics = {"td8": TokenDeletion(n_steps=8), "td4": TokenDeletion(n_steps=4, score="logit"),
               "ti": TokenInsertion(n_steps=4), "ti_acc": TokenInsertion(n_steps=4, score="accuracy")}
    ev = Evaluator(model, pixels, [0, 0])
    before = model.rows
    got = ev.evaluate(maps, metrics)
    # deletion: counts 1..8 of 8 steps (4 steps are a subset; 0 kept = the prefix alone, once per image);
    # insertion: counts 0..3 of 4 (16 = the clean run), the prefix-only logits reused
    assert model.rows - before == 2 * 7 + 2 + 2 * 3
    for name, m in metrics.items():
        assert torch.allclose(got[name], m(model, pixels, maps, [0, 0]), atol=1e-6), name


def test_tiny_hooked_vit_token_metrics():
    """forward_patches with every patch kept is the model's own forward, so the curves' clean end agrees."""
    from hooked_vit import HookedViT

    torch.manual_seed(0)
    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    pixels = torch.randn(2, 3, 64, 64)
    maps = torch.rand(2, 4, 4)
    for cls in (TokenDeletion, TokenInsertion):
        curve = cls().curve(model, pixels, maps)
        assert curve.scores.shape == (2, 17) and ((curve.scores >= 0) & (curve.scores <= 1)).all()
        with torch.no_grad():
            clean = model(pixels).softmax(-1).max(-1).values
        end = 0 if cls is TokenDeletion else -1
        assert torch.allclose(curve.scores[:, end], clean, atol=1e-5)
    ev = Evaluator(model, pixels)
    got = ev.evaluate(maps, {"d": TokenDeletion(n_steps=4), "i": TokenInsertion(n_steps=4)})
    assert torch.allclose(got["d"], TokenDeletion(n_steps=4)(model, pixels, maps), atol=1e-5)
    assert torch.allclose(got["i"], TokenInsertion(n_steps=4)(model, pixels, maps), atol=1e-5)


# ---------------------------------------------------------------------------------------------- ROAD
def test_imputation_reproduces_a_linear_ramp_exactly():
    r = torch.arange(40.0, dtype=torch.float64)[:, None]
    c = torch.arange(30.0, dtype=torch.float64)[None]
    ramp = torch.stack([0.3 * r - 0.2 * c + 1, 0.01 * r + 0.05 * c, -0.1 * r + 0 * c])
    removed = torch.zeros(40, 30, dtype=torch.bool)
    removed[5:30, 4:20] = True  # a block, and scattered single pixels, all away from the border
    removed[32:38:2, 22:28:3] = True
    out = linear_imputation(ramp, removed)
    assert torch.allclose(out, ramp, atol=1e-9)
    assert out.dtype == ramp.dtype


def test_imputation_weights_and_border():
    img = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(1)).double()
    removed = torch.zeros(5, 6, dtype=torch.bool)
    removed[2, 3] = True  # one interior pixel: the weighted mean of its 8 known neighbours
    expected = sum(w * img[:, 2 + dr, 3 + dc] for dr, dc, w in NEIGHBOURS)
    assert sum(w for *_, w in NEIGHBOURS) == pytest.approx(1.0)
    assert torch.allclose(linear_imputation(img, removed)[:, 2, 3], expected)
    removed[:] = False
    removed[0, 0] = True  # a corner: 3 neighbours, weights renormalised (1/6, 1/6, 1/12) / (5/12)
    corner = (img[:, 0, 1] / 6 + img[:, 1, 0] / 6 + img[:, 1, 1] / 12) / (5 / 12)
    out = linear_imputation(img, removed)
    assert torch.allclose(out[:, 0, 0], corner)
    assert torch.equal(out[:, 1:], img[:, 1:])  # known pixels unchanged
    with pytest.raises(ValueError, match="at least one kept pixel"):
        linear_imputation(img, torch.ones(5, 6, dtype=torch.bool))


class MeanModel(nn.Module):
    """logits = [mean of channel 0, 0] in the model's (normalised) pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0].flatten(1).mean(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_road_closed_form():
    """A bright 16x16 square (unit 1) on a mid-grey surround (unit 0.5); mean = std = 0.5, so the model's
    logit is the share of the image the square covers (0.25) and 0 for a uniform grey image. MoRF with the
    square as the map removes it first: its boundary is all grey, so it is imputed grey and the logit is 0
    at every fraction >= 0.25. LeRF removes the top rows first, bordered by grey: nothing changes."""
    unit = torch.full((1, 3, H, W), 0.5)
    unit[..., 16:, 16:] = 1.0
    norm = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = (unit - 0.5) / 0.5
    square = torch.zeros(1, H, W)
    square[:, 16:, 16:] = 1.0
    model = MeanModel()
    morf = ROADMoRF(fractions=(0.25, 0.5, 0.75), noise=0.0, score="logit", **norm)
    lerf = ROADLeRF(fractions=(0.125, 0.25, 0.375), noise=0.0, score="logit", **norm)
    assert not morf.higher_is_better and lerf.higher_is_better
    assert torch.allclose(morf.curve(model, pixels, square, 0).scores, torch.zeros(1, 3), atol=1e-6)
    assert torch.allclose(lerf.curve(model, pixels, square, 0).scores, torch.full((1, 3), 0.25), atol=1e-6)
    # the square's own map: the best MoRF; the reversed map removes the grey first and keeps the square longer
    assert morf(model, pixels, square, 0).item() < morf(model, pixels, -square, 0).item()
    # noise: seeded, and independent of the batch the image is in
    noisy = ROADMoRF(fractions=(0.5,), score="logit", **norm)
    a = noisy(model, pixels, -square, 0)
    b = noisy(model, torch.cat([pixels, pixels]), torch.cat([-square, -square]), 0)
    assert torch.allclose(a, b[:1]) and torch.allclose(b[0], b[1])
    assert not torch.allclose(a, ROADMoRF(fractions=(0.5,), score="logit", seed=1, **norm)(model, pixels, -square, 0))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ROADMoRF(fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="mean=... and std="):
        ROADMoRF()(model, pixels, square, 0)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_tiny_hooked_vit():
    from hooked_vit import HookedViT

    for name, better in {"token_deletion": False, "token_insertion": True, "road_morf": False, "road_lerf": True}.items():
        m = get_metric(name)
        assert name in METRICS and m.name == name and m.higher_is_better is better and m.kind == "faithfulness"
    torch.manual_seed(0)
    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    pixels = torch.randn(2, 3, 64, 64)
    for name in ("road_morf", "road_lerf"):
        v = get_metric(name, fractions=(0.3, 0.6))(model, pixels, torch.rand(2, 4, 4))
        assert v.shape == (2,) and ((v >= 0) & (v <= 1)).all()


# ---------------------------------------------------------------------------------------------- sanity
class TokenOcclusion:
    """A map that depends on every weight: the drop of the target logit when one patch token leaves."""

    def __init__(self, model) -> None:
        self.model = model

    def attribute(self, pixels, target=None):
        b, n = pixels.shape[0], 16
        with torch.no_grad():
            full = self.model(pixels).gather(1, target.view(-1, 1))[:, 0]
            drops = []
            for j in range(n):
                keep = torch.tensor([i for i in range(n) if i != j]).expand(b, n - 1)
                drops.append(full - self.model.forward_patches(pixels, keep).gather(1, target.view(-1, 1))[:, 0])
        return torch.stack(drops, 1).view(b, 4, 4)


def test_cascading_randomisation_flags_a_model_free_map():
    from caap.metrics.sanity import EdgeDetector, cascading_randomisation, randomisation_stages, spearman
    from hooked_vit import HookedViT

    torch.manual_seed(0)
    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert [s for s, _ in randomisation_stages(model)] == ["head", "blocks.1", "blocks.0", "embed"]
    edge = cascading_randomisation(model, EdgeDetector, pixels, seed=0)
    assert edge.stages == ["trained", "head", "blocks.1", "blocks.0", "embed"]
    assert edge.maps.shape == (5, 3, 4, 4) and torch.allclose(edge.spearman, torch.ones(5, 3))
    assert edge.flagged
    occ = cascading_randomisation(model, TokenOcclusion, pixels, targets=[1, 2, 3], seed=0)
    assert torch.allclose(occ.spearman[0], torch.ones(3))
    assert occ.stage_means[1:].max() < 0.5 and not occ.flagged
    assert occ.targets.tolist() == [1, 2, 3]
    # seeded, a subset of stages, and the user's model untouched
    again = cascading_randomisation(model, TokenOcclusion, pixels, targets=[1, 2, 3], seed=0, stages=["blocks.1"])
    assert again.stages == ["trained", "blocks.1"] and torch.allclose(again.maps[1], occ.maps[2])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="accepted: head, blocks.1, blocks.0, embed"):
        cascading_randomisation(model, EdgeDetector, pixels, stages=["blocks.7"])
    # Spearman: rank-based, ties averaged, NaN for a constant map
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    r = spearman(a, torch.tensor([[10.0, 20.0, 30.0, 400.0], [1.0, 2.0, 3.0, 4.0]]))
    assert r[0].item() == pytest.approx(1.0) and math.isnan(r[1].item())
