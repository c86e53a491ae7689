"""CAAP beyond the paper: the necessity direction, both directions, and set sampling with its estimators.

Known answers come from an additive model: a HookedViT whose blocks add nothing (attention and MLP
outputs zeroed) and that averages its tokens before a linear head. A token's final residual stream is then
the source's when it carries the source's activations over the range and the context's when it does
not, so the target logit is exactly b + sum_i w_i z_i with w_i = head(LN(src_i) - LN(ctx_i)) / n_patches.
"""

from __future__ import annotations

import pytest
import torch

from caap import CAAP
from caap.attribution.sets import estimate, sample_sets, set_size
from hooked_vit import HookedViT, HookedViTConfig, act_name


@pytest.fixture(scope="module")
def additive():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, img_size=32, patch_size=8,
                          class_token=False, pooling="avg", n_classes=5, dynamic_img_size=True)
    m = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        for block in m.blocks:  # every block is the identity on the residual stream
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    return m


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def true_weights(model, pixels, target, layer):
    """w_i of the additive model (blur context: the context image is the blurred source)."""
    from caap.contexts import get_context
    from hooked_vit.preprocess import gaussian_blur

    sigma = get_context("blur", model).sigma
    names = [act_name("resid_pre", layer)]
    _, src = model.run_with_cache(pixels, names_filter=names)
    _, ctx = model.run_with_cache(gaussian_blur(pixels, sigma), names_filter=names)
    ln = model.ln_final

    def per_token(r):
        return model.head(ln(r))[..., target]  # [batch, pos]

    n = src[names[0]].shape[1]
    return ((per_token(src[names[0]]) - per_token(ctx[names[0]])) / n).view(pixels.shape[0], *model.cfg.grid_size)


def test_additive_model_is_additive(additive, pixels):
    """The premise of the known answers: inserting every patch gives the source's logit."""
    caap = CAAP(additive, layers=(1, 2), context="blur", score="logit")
    w = true_weights(additive, pixels, 3, 1)
    ctx = caap.context_scores(pixels, target=3)
    torch.testing.assert_close(ctx + w.flatten(1).sum(1), additive(pixels)[:, 3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("direction,factor", [("sufficiency", 1), ("necessity", 1), ("both", 2)])
def test_single_patch_directions_known_answer(additive, pixels, direction, factor):
    w = true_weights(additive, pixels, 3, 1)
    got = CAAP(additive, layers=(1, 2), context="blur", direction=direction, batch_size=5).attribute(pixels, target=3)
    torch.testing.assert_close(got, factor * w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("direction", ["sufficiency", "necessity"])
def test_sets_regression_recovers_additive_weights(additive, pixels, direction):
    """More sets than patches: the least-squares fit of an additive score is exact."""
    w = true_weights(additive, pixels, 1, 0)
    caap = CAAP(additive, layers=(0, 2), context="blur", sets=40, density=0.3, estimator="regression",
                direction=direction, batch_size=16)
    torch.testing.assert_close(caap.attribute(pixels, target=1), w, atol=1e-4, rtol=1e-3)


def test_sets_difference_known_answer(additive, pixels):
    """The difference estimator on an additive score is w_i plus the design's cross terms, exactly:
    sum_j w_j (mean z_j over sets holding i - mean z_j over sets without i)."""
    w = true_weights(additive, pixels, 2, 1).flatten(1)  # [batch, 16]
    z = sample_sets(24, 16, 0.5, seed=7).double()
    n_in = z.sum(0)
    cross = (z.T @ z) / n_in[:, None] - ((1 - z).T @ z) / (24 - n_in)[:, None]  # [i, j]
    expected = (w.double() @ cross.T).float()  # diagonal of cross is 1: w_i + cross terms
    got = CAAP(additive, layers=(1, 1), context="blur", sets=24, seed=7).attribute(pixels, target=2)
    torch.testing.assert_close(got.flatten(1), expected, atol=1e-5, rtol=1e-4)


def test_sets_difference_converges(additive, pixels):
    w = true_weights(additive, pixels, 2, 1).flatten(1)
    errors = []
    for n in (16, 256):
        got = CAAP(additive, layers=(1, 1), context="blur", sets=n, batch_size=64).attribute(pixels, target=2)
        errors.append(float((got.flatten(1) - w).abs().mean()))
    assert errors[1] < errors[0] / 2


def test_design_is_balanced_and_seeded():
    z = sample_sets(50, 30, 0.3, seed=1)
    assert z.shape == (50, 30) and (z.sum(0) == 15).all()
    assert torch.equal(z, sample_sets(50, 30, 0.3, seed=1)) and not torch.equal(z, sample_sets(50, 30, 0.3, seed=2))


def test_estimators_on_a_constant_score_give_zero():
    z = sample_sets(20, 8, 0.5)
    for est in ("difference", "regression"):
        assert estimate(est, z, torch.full((20, 3), 2.5)).abs().max() < 1e-6


@pytest.mark.parametrize("context", ["mean", "grey", "zero", "blur"])
def test_every_context_any_grid_batch(additive, context):
    x = torch.randn(3, 3, 48, 32, generator=torch.Generator().manual_seed(3))  # a 6 x 4 grid
    ref = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(4))
    for kw in ({"direction": "both"}, {"sets": 12, "estimator": "regression"}, {"sets": 12, "direction": "necessity"}):
        caap = CAAP(additive, layers=(1, 2), context=context, reference=ref, batch_size=7, **kw)
        maps = caap.attribute(x, target=[0, 1, 2])
        assert maps.shape == (3, 6, 4) and torch.isfinite(maps).all()
        one = caap.attribute(x[1:2], target=1)
        torch.testing.assert_close(maps[1:2], one, atol=1e-5, rtol=1e-4)  # an image's map ignores its batch


def test_components_and_several_classes(additive, pixels):
    for component in ("attn_out", "mlp_out"):
        caap = CAAP(additive, layers=(1, 2), component=component, direction="both", sets=8)
        many = caap.attribute_classes(pixels, torch.tensor([[1, 2], [3, 4]]))
        assert many.shape == (2, 2, 4, 4)
        torch.testing.assert_close(many[:, 1], caap.attribute(pixels, target=[2, 4]), atol=1e-5, rtol=1e-4)


def test_bf16_delta_close_to_fp32():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, img_size=32, patch_size=8, n_classes=5)
    m = HookedViT(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for kw in ({"direction": "necessity"}, {"sets": 16, "direction": "both"}):
        fp32 = CAAP(m, layers=(1, 2), **kw).attribute(x, target=[1, 2])
        delta = CAAP(m, layers=(1, 2), precision="bf16_delta", **kw).attribute(x, target=[1, 2])
        assert float((delta - fp32).abs().max()) < 0.05 * float(fp32.abs().max())


def test_cost_in_forward_passes(additive):
    single = CAAP(additive, layers=(1, 2))  # 16 patches, blocks 1-2 of 3: each run 2/3 of a forward
    assert single.forward_passes(16) == pytest.approx(16 * 2 / 3 + 2 / 3 + 2)
    both_sets = CAAP(additive, layers=(1, 2), sets=30, direction="both", score="prob")
    assert both_sets.forward_passes(16) == pytest.approx(2 * 30 * 2 / 3 + 2 * 2 / 3 + 2)


@pytest.mark.parametrize("kwargs,message", [
    ({"sets": 1}, "sets must be None"),
    ({"sets": 2.5}, "sets must be None"),
    ({"sets": True}, "sets must be None"),
    ({"sets": 10, "density": 1.0}, r"density must be a number in \(0, 1\)"),
    ({"sets": 10, "density": 0.01}, "need 1 <= round"),
    ({"sets": 10, "estimator": "shapley"}, "unknown estimator 'shapley'; accepted: difference, regression"),
    ({"estimator": "regression"}, "needs set sampling"),
    ({"density": 0.3}, "needs set sampling"),
    ({"direction": "sideways"}, "unknown direction 'sideways'; accepted: sufficiency, necessity, both"),
    ({"sets": 10, "seed": 1.5}, "seed must be an integer"),
])
def test_bad_options_refused(additive, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAAP(additive, **kwargs)


def test_set_size_bounds():
    assert set_size(10, 0.5) == 5
    with pytest.raises(ValueError, match="every patch must be in"):
        set_size(3, 0.9)
