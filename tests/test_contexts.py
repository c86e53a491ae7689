"""Neutral contexts: each yields the right residual stream; the mean context saves and loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caap.contexts import CONTEXT_NAMES, BlurContext, MeanContext, gaussian_blur, get_context
from hooked_vit import HookedViT, HookedViTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, img_size=32, patch_size=8,
                          n_classes=5)
    return HookedViT(cfg).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _to_pixels(model, raw):
    mean = torch.tensor(model.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.data_config["std"]).view(1, 3, 1, 1)
    return (raw - mean) / std


@pytest.mark.parametrize("name", [n for n in CONTEXT_NAMES if n != "mean"])
def test_named_contexts_shapes(model, pixels, name):
    ctx = get_context(name, model)
    resid = ctx.resid_pre(model, 1, pixels)
    assert resid.shape == ((2 if ctx.per_source else 1), model.cfg.n_ctx, 16)


def test_image_contexts_are_forward_passes(model, pixels):
    with torch.no_grad():
        grey = model(_to_pixels(model, torch.full((1, 3, 32, 32), 0.5)), stop_at_layer=2)
        black = model(_to_pixels(model, torch.zeros(1, 3, 32, 32)), stop_at_layer=2)
        blurred = model(gaussian_blur(pixels, 10.0), stop_at_layer=2)
    torch.testing.assert_close(get_context("grey", model).resid_pre(model, 2, pixels), grey)
    torch.testing.assert_close(get_context("black", model).resid_pre(model, 2, pixels), black)
    torch.testing.assert_close(BlurContext(10.0).resid_pre(model, 2, pixels), blurred)
    assert not get_context("zero", model).resid_pre(model, 2, pixels).any()
    a = get_context("noise", model, seed=3).resid_pre(model, 1, pixels)
    b = get_context("noise", model, seed=3).resid_pre(model, 1, pixels)
    c = get_context("noise", model, seed=4).resid_pre(model, 1, pixels)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_user_image_and_tensor_contexts(model, pixels, tmp_path):
    from PIL import Image

    arr = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    path = tmp_path / "ctx.png"
    Image.fromarray(arr).save(path)
    from_path = get_context(str(path), model).resid_pre(model, 1, pixels)
    from_tensor = get_context(model.preprocess(arr), model).resid_pre(model, 1, pixels)
    torch.testing.assert_close(from_path, from_tensor)
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        get_context(torch.zeros(2, 3, 32, 32), model)


def test_gaussian_blur_preserves_constants_and_smooths():
    flat = torch.full((1, 3, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    noisy = torch.randn(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noisy, 2.0).std() < noisy.std() / 2


def test_mean_context_round_trip(model, pixels, tmp_path):
    refs = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ctx = MeanContext.from_images(model, refs, batch_size=2, progress=False)
    assert ctx.resid.shape == (4, model.cfg.n_ctx, 16)
    with torch.no_grad():
        expected = model(refs, stop_at_layer=2).mean(0, keepdim=True)
        final = model(refs, stop_at_layer=3).mean(0)
    torch.testing.assert_close(ctx.resid_pre(model, 2, pixels), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ctx.resid[3], final, atol=1e-5, rtol=0)
    path = tmp_path / "mean.pt"
    ctx.save(path)
    loaded = get_context("mean", model, reference=str(path))
    torch.testing.assert_close(loaded.resid, ctx.resid)
    assert loaded.meta["n_images"] == 5


def test_mean_context_errors(model, pixels, tmp_path):
    bad = MeanContext(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="compute it for this model"):
        bad.resid_pre(model, 0, pixels)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor file")
    with pytest.raises(ValueError, match="could not read a mean context"):
        MeanContext.load(junk)
    with pytest.raises(ValueError, match="empty"):
        MeanContext.from_images(model, torch.zeros(0, 3, 32, 32))


def test_unknown_context_name(model):
    with pytest.raises(ValueError, match="accepted: mean, grey, black, blur, noise, zero"):
        get_context("sepia", model)
