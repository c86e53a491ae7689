"""Neutral contexts: each yields the right residual stream; the mean context saves and loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caap.contexts import CONTEXT_NAMES, BlurContext, MeanContext, get_context
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.preprocess import gaussian_blur


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
    bound = get_context(name, model).bind(model, pixels)
    resid = bound.resid_pre(1)
    assert bound.n == (2 if name == "blur" else 1)  # only the blurred copy depends on the source image
    assert resid.shape == (bound.n, model.cfg.n_ctx, 16)
    assert (bound.inputs is None) == (name == "zero")  # image contexts keep their inputs (embedding writes)


def test_image_contexts_are_forward_passes(model, pixels):
    with torch.no_grad():
        grey = model(_to_pixels(model, torch.full((1, 3, 32, 32), 0.5)), stop_at_layer=2)
        black = model(_to_pixels(model, torch.zeros(1, 3, 32, 32)), stop_at_layer=2)
        blurred = model(gaussian_blur(pixels, 10.0), stop_at_layer=2)
    torch.testing.assert_close(get_context("grey", model).bind(model, pixels).resid_pre(2), grey)
    torch.testing.assert_close(get_context("black", model).bind(model, pixels).resid_pre(2), black)
    torch.testing.assert_close(BlurContext(10.0).bind(model, pixels).resid_pre(2), blurred)
    assert not get_context("zero", model).bind(model, pixels).resid_pre(2).any()
    a = get_context("noise", model, seed=3).bind(model, pixels).resid_pre(1)
    b = get_context("noise", model, seed=3).bind(model, pixels).resid_pre(1)
    c = get_context("noise", model, seed=4).bind(model, pixels).resid_pre(1)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_user_image_and_tensor_contexts(model, pixels, tmp_path):
    from PIL import Image

    arr = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    path = tmp_path / "ctx.png"
    Image.fromarray(arr).save(path)
    from_path = get_context(str(path), model).bind(model, pixels).resid_pre(1)
    from_tensor = get_context(model.preprocess(arr), model).bind(model, pixels).resid_pre(1)
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
    torch.testing.assert_close(ctx.bind(model, pixels).resid_pre(2), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ctx.resid[3], final, atol=1e-5, rtol=0)
    path = tmp_path / "mean.pt"
    ctx.save(path)
    loaded = get_context("mean", model, reference=str(path))
    torch.testing.assert_close(loaded.resid, ctx.resid)
    assert loaded.meta["n_images"] == 5


def test_mean_context_errors(model, pixels, tmp_path):
    bad = MeanContext(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="compute it for this model"):
        bad.bind(model, pixels)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a tensor file")
    with pytest.raises(ValueError, match="could not read a mean context"):
        MeanContext.load(junk)
    with pytest.raises(ValueError, match="empty"):
        MeanContext.from_images(model, torch.zeros(0, 3, 32, 32))


def test_unknown_context_name(model):
    with pytest.raises(ValueError, match="accepted: mean, grey, black, blur, noise, zero"):
        get_context("sepia", model)


@pytest.mark.parametrize("name", CONTEXT_NAMES)
def test_names_before_paths(model, pixels, tmp_path, monkeypatch, name):
    """A file or a folder called like a context in the working directory changes nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir() if name in ("mean", "grey") else (tmp_path / name).write_text("not an image")
    ctx = get_context(name, model, reference=torch.randn(2, 3, 32, 32)) if name == "mean" else get_context(name, model)
    assert ctx.name == name


def test_unknown_context_string_is_neither_name_nor_file(model):
    with pytest.raises(ValueError, match="not a context name and not an image file"):
        get_context("no_such_file.png", model)


def _fake_shared(tmp_path, monkeypatch, n=3):
    from PIL import Image

    data = tmp_path / "shared" / "data" / "imagenet_sample_1k"
    data.mkdir(parents=True)
    rows = ["filename,class_index"]
    for i in range(n):
        arr = (np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(data / f"{i}.png")
        rows.append(f"{i}.png,{i}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("CAAP_SHARED_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("CAAP_CACHE_DIR", str(tmp_path / "cache"))


def test_mean_cache_is_atomic_and_recovers_from_a_bad_file(model, tmp_path, monkeypatch):
    from caap.contexts import default_mean_context_path, mean_context_for

    _fake_shared(tmp_path, monkeypatch)
    first = mean_context_for(model, n_images=3, progress=False)
    path = default_mean_context_path(model, 3)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    path.write_bytes(path.read_bytes()[:100])  # a truncated cache file (a crash in an old version)
    with pytest.warns(UserWarning, match="recomputing the mean context"):
        again = mean_context_for(model, n_images=3, progress=False)
    torch.testing.assert_close(again.resid, first.resid)
    MeanContext.load(path)  # the bad file was replaced by a good one


def test_mean_cache_key_covers_every_weight(model, tmp_path, monkeypatch):
    import copy

    from caap.contexts import default_mean_context_path, mean_context_for

    _fake_shared(tmp_path, monkeypatch)
    edited = copy.deepcopy(model)
    before = default_mean_context_path(edited, 3)
    first = mean_context_for(edited, n_images=3, progress=False)
    with torch.no_grad():  # edit a weight far beyond the first 256 values of any parameter
        biggest = max(edited.parameters(), key=lambda p: p.numel())
        assert biggest.numel() > 256
        biggest.view(-1)[-1] += 1.0
    after = default_mean_context_path(edited, 3)
    assert after != before
    second = mean_context_for(edited, n_images=3, progress=False)
    assert not torch.equal(first.resid[-1], second.resid[-1])
