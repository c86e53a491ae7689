"""Loading (timm name, timm object, local checkpoint), unsupported timm features, preprocessing, and
the real ViT-Tiny weights and photos of ../shared (skipped where that folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from caap import data as caap_data
from hooked_vit import HookedViT, UnsupportedTimmFeature

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- loading
def test_timm_model_object_converts(timm_vit, pixels):
    """A user's own fine-tune: a timm model object with its own head (10 classes)."""
    timm_model = timm_vit("vit_small_patch16_224", num_classes=10, **SMALL)
    model = HookedViT.from_timm(timm_model)
    assert model.cfg.n_classes == 10
    x = pixels(model)
    with torch.no_grad():
        out, ref = model(x), timm_model(x)
    assert out.shape == (2, 10)
    assert max_diff(out, ref) <= 1e-4


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_checkpoint_path_loads_a_local_state_dict(timm_vit, pixels, tmp_path, fmt):
    timm_model = timm_vit("vit_small_patch16_224", num_classes=7, **SMALL)
    state = {k: v.detach().clone() for k, v in timm_model.state_dict().items()}
    path = tmp_path / f"finetune.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif fmt == "wrapped":  # a training checkpoint: {"model": state_dict} with DataParallel prefixes
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    model = HookedViT.from_timm("vit_small_patch16_224", checkpoint_path=path, num_classes=7, **SMALL)
    fresh = HookedViT.from_timm("vit_small_patch16_224", pretrained=False, num_classes=7, **SMALL)
    x = pixels(model)
    with torch.no_grad():
        out, ref, random = model(x), timm_model(x), fresh(x)
    assert max_diff(out, ref) <= 1e-4
    assert max_diff(random, ref) > 1e-2  # the checkpoint's weights, not random ones


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*nothing_here\.pth"):
        HookedViT.from_timm("vit_small_patch16_224", checkpoint_path=tmp_path / "nothing_here.pth", **SMALL)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch checkpoint\x00\x01")
    with pytest.raises(ValueError, match=r"could not read checkpoint .*garbage\.pth.*timm state dict"):
        HookedViT.from_timm("vit_small_patch16_224", checkpoint_path=path, **SMALL)


def test_checkpoint_of_another_model_is_a_clear_error(timm_vit, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm_vit("vit_small_patch16_224", **SMALL).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match the timm model"):
        HookedViT.from_timm("vit_small_patch16_224", checkpoint_path=path, depth=3, embed_dim=64, num_heads=2)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown timm model name 'vit_tinny_patch16_224'; close matches: "
                                         r"vit_tiny_patch16_224"):
        HookedViT.from_timm("vit_tinny_patch16_224", pretrained=False)


def test_pretrained_without_hub_points_to_checkpoint_path(monkeypatch):
    """No network: timm fails to fetch; the error says how to load local weights instead."""
    real_create = timm.create_model
    calls = []

    def offline_create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("simulated: no network, cannot reach the Hugging Face hub")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    monkeypatch.setattr("hooked_vit.loading._probe_hub", lambda *a: None)  # the hub answered; the download fails
    monkeypatch.setattr("hooked_vit.loading._hub_cached_file", lambda *a: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(RuntimeError, match=r"could not fetch pretrained weights for 'vit_tiny_patch16_224'.*"
                                           r"no network.*checkpoint_path="):
        HookedViT.from_timm("vit_tiny_patch16_224")
    assert calls == [False, True]  # the architecture is checked (meta device) before the download


def test_support_is_checked_before_any_download(monkeypatch):
    """A name HookedViT cannot convert fails at once, without asking the hub."""
    monkeypatch.setattr("hooked_vit.loading._probe_hub", lambda *a: pytest.fail("asked the hub"))
    with pytest.raises(UnsupportedTimmFeature, match="ResNet is not a timm VisionTransformer"):
        HookedViT.from_timm("resnet18")


def test_hf_hub_offline_fails_at_once_naming_the_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("hooked_vit.loading._hub_cached_file", lambda *a: None)
    monkeypatch.setattr("hooked_vit.loading._probe_hub", lambda *a: pytest.fail("asked the hub"))
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE is set.*checkpoint_path=.*CAAP_CHECKPOINT_DIR"):
        HookedViT.from_timm("vit_tiny_patch16_224")


_HANGING_HUB = """
import os, socket, sys, threading, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
held = []
threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
proxy = "http://127.0.0.1:%d" % server.getsockname()[1]
for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
    os.environ[var] = proxy
for var in ("NO_PROXY", "no_proxy", "HF_HUB_OFFLINE"):
    os.environ.pop(var, None)
os.environ["CAAP_HUB_TIMEOUT"] = "1"
from hooked_vit import HookedViT
t0 = time.perf_counter()
try:
    HookedViT.from_timm("vit_tiny_patch16_224")
except RuntimeError as e:
    print("%.1f %s" % (time.perf_counter() - t0, e))
"""


def test_a_hub_that_never_answers_gives_up_after_the_timeout(tmp_path):
    """A proxy that accepts connections and never answers (the hang the reliability review found): the
    loader gives up after $CAAP_HUB_TIMEOUT seconds with what to do. No network needed: the proxy is local."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", _HANGING_HUB], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    seconds, _, message = proc.stdout.strip().partition(" ")
    assert "did not answer within 1 s" in message and "checkpoint_path=" in message, proc.stdout + proc.stderr
    assert float(seconds) < 10


def test_gelu_tanh_converts():
    """timm builds act_layer="gelu_tanh" from its own GELUTanh class (not nn.GELU): it converts, exactly."""
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, act_layer="gelu_tanh").eval()
    hooked = HookedViT.from_timm(timm_model)
    assert hooked.cfg.act_fn == "gelu_tanh"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(hooked(x), timm_model(x)) < 1e-4


# ---------------------------------------------------------------------------------------------- unsupported
@pytest.mark.parametrize("name, kwargs, feature", [
    ("swin_tiny_patch4_window7_224", {}, r"SwinTransformer is not a timm VisionTransformer"),
    ("resnet18", {}, r"ResNet is not a timm VisionTransformer"),
    ("vit_small_patch16_224", {"global_pool": "prr", "depth": 1}, r"attention pooling by rotated queries"),
    ("vit_small_patch16_224", {"mlp_layer": "GluMlp", "act_layer": "sigmoid", "depth": 1}, r"an activation other than GELU"),
    ("vit_small_patch16_224", {"mlp_layer": "GatedMlp", "depth": 1}, r"an MLP other than timm's `Mlp`, `SwiGLU`"),
    ("vit_small_patch16_224", {"norm_layer": "rmsnorm", "depth": 1}, r"a norm layer other than LayerNorm"),
    ("vit_base_patch16_rope_224", {"depth": 1}, r"Eva uses rotary position embeddings \(timm's RoPE ViTs"),
])
def test_unsupported_features_raise_naming_the_feature(name, kwargs, feature):
    import timm.layers

    kwargs = {k: getattr(timm.layers, v) if k == "mlp_layer" else v for k, v in kwargs.items()}
    if kwargs.get("norm_layer") == "rmsnorm":
        kwargs = {**kwargs, "norm_layer": timm.layers.RmsNorm}
    timm_model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedTimmFeature, match=feature):
        HookedViT.from_timm(timm_model)


# ---------------------------------------------------------------------------------------------- preprocess
@pytest.fixture(scope="module")
def augreg_model() -> HookedViT:
    """ViT-Tiny's architecture and data config (AugReg: mean = std = 0.5, crop 0.9, bicubic), 1 block."""
    return HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=1)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    import skimage.data

    return skimage.data.chelsea()  # [300, 451, 3] uint8, ships with scikit-image


def timm_transform(model_name: str, **kwargs):
    return create_transform(**resolve_data_config({}, model=timm.create_model(model_name, pretrained=False, **kwargs)))


def test_preprocess_uses_the_models_own_data_config(augreg_model):
    cfg = augreg_model.data_config
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    deit = HookedViT.from_timm("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    assert deit.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_preprocess_equals_timms_transform_on_a_real_image(augreg_model, cat):
    pil = Image.fromarray(cat)
    expected = timm_transform("vit_tiny_patch16_224", depth=1)(pil)[None]
    assert torch.equal(augreg_model.preprocess(pil), expected)
    assert torch.equal(augreg_model.preprocess(cat), expected)
    # per model: DeiT (ImageNet mean/std) preprocesses the same photo differently, again exactly as timm
    deit = HookedViT.from_timm("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    deit_expected = timm_transform("deit_tiny_distilled_patch16_224", depth=1)(pil)[None]
    assert torch.equal(deit.preprocess(pil), deit_expected)
    assert max_diff(deit_expected, expected) > 0.1


def test_preprocess_accepts_paths_pil_modes_and_arrays(augreg_model, cat, tmp_path):
    pre = augreg_model.preprocess
    rgb = Image.fromarray(cat)
    reference = pre(rgb)
    assert reference.shape == (1, 3, 224, 224) and reference.dtype == torch.float32
    # a path (PNG: lossless) and a str path
    png = tmp_path / "cat.png"
    rgb.save(png)
    assert torch.equal(pre(png), reference) and torch.equal(pre(str(png)), reference)
    # uint8 arrays: [H, W, 3], [H, W, 4] (opaque), float [0, 1]
    assert torch.equal(pre(cat), reference)
    assert torch.equal(pre(np.dstack([cat, np.full(cat.shape[:2], 255, np.uint8)])), reference)
    assert torch.equal(pre(cat / 255.0), reference)
    # RGBA: opaque equals RGB; fully transparent is composited on white
    assert torch.equal(pre(rgb.convert("RGBA")), reference)
    clear = np.zeros((*cat.shape[:2], 4), np.uint8)
    white = pre(Image.new("RGB", rgb.size, (255, 255, 255)))
    assert torch.allclose(white, torch.ones_like(white))  # (1 - 0.5) / 0.5
    assert torch.equal(pre(clear), white) and torch.equal(pre(Image.fromarray(clear, "RGBA")), white)
    # greyscale: PIL 'L' and [H, W] arrays give three equal channels, as timm on the RGB conversion
    grey = rgb.convert("L")
    grey_ref = timm_transform("vit_tiny_patch16_224", depth=1)(grey.convert("RGB"))[None]
    assert torch.equal(pre(grey), grey_ref) and torch.equal(pre(np.asarray(grey)), grey_ref)
    assert torch.equal(grey_ref[:, 0], grey_ref[:, 1]) and torch.equal(grey_ref[:, 1], grey_ref[:, 2])
    # a list of mixed inputs -> one batch, in order
    batch = pre([png, grey, cat, Image.fromarray(clear, "RGBA")])
    assert batch.shape == (4, 3, 224, 224)
    assert torch.equal(batch, torch.cat([reference, grey_ref, reference, white]))


def test_preprocess_errors_are_clear(augreg_model, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"could not read .*notes\.txt as an image"):
        augreg_model.preprocess(text)
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*missing\.jpg"):
        augreg_model.preprocess(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match=r"an image array must be \[H, W\], \[H, W, 1\|3\|4\]"):
        augreg_model.preprocess(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="no images given"):
        augreg_model.preprocess([])


def test_sixteen_bit_greyscale_keeps_its_grey_levels(augreg_model, tmp_path):
    """A 16-bit PNG (PIL mode I;16) is scaled to 8 bits, not clipped to white by convert("RGB")."""
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    eight = np.round(levels / 257).astype(np.uint8)
    expected = augreg_model.preprocess(eight)
    assert torch.allclose(augreg_model.preprocess(path), expected, atol=2 / 255 / 0.5)
    assert torch.allclose(augreg_model.preprocess(levels), expected, atol=2 / 255 / 0.5)  # a uint16 array too
    assert augreg_model.preprocess(path).mean() < 0.1  # mid-grey on average, not white (1.0)


def test_exif_orientation_is_applied(augreg_model, tmp_path):
    """A JPEG whose EXIF says "rotate 90" reaches the model upright, as a viewer shows it."""
    wide = np.zeros((60, 120, 3), np.uint8)
    wide[:, :60] = 255  # left half white
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    Image.fromarray(wide).save(path, exif=exif, quality=95)
    upright = np.rot90(wide, k=-1)  # what a viewer shows: 120 high, 60 wide, white on top
    assert torch.allclose(augreg_model.preprocess(path), augreg_model.preprocess(np.ascontiguousarray(upright)),
                          atol=0.1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_are_refused(augreg_model, tmp_path, bad):
    arr = np.full((32, 32, 3), 0.5, np.float32)
    arr[3, 4, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        augreg_model.preprocess(arr)
    path = tmp_path / "float.tiff"
    Image.fromarray(arr[..., 1]).save(path)  # a float TIFF (PIL mode F) holding the bad value
    with pytest.raises(ValueError, match="NaN or inf"):
        augreg_model.preprocess(path)


def test_decompression_bomb_is_a_clear_error(augreg_model, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(path)  # a tiny file; the limit is lowered so that it counts as a bomb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 4)
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        augreg_model.preprocess(path)


def test_preprocess_follows_the_models_dtype(augreg_model, cat):
    import copy

    half = copy.deepcopy(augreg_model).to(torch.bfloat16)
    pixels = half.preprocess(cat)
    assert pixels.dtype == torch.bfloat16
    with torch.no_grad():
        assert half(pixels).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- real weights
MODEL_NAME = caap_data.DEFAULT_MODEL
CHECKPOINT = caap_data.shared_checkpoint()
DATA_DIR = caap_data.shared_data_dir()
needs_checkpoint = pytest.mark.skipif(
    CHECKPOINT is None, reason=f"shared checkpoint {MODEL_NAME}.pth not found (set CAAP_SHARED_DIR or ../shared/models)")
needs_data = pytest.mark.skipif(
    DATA_DIR is None, reason="shared photos not found (set CAAP_SHARED_DIR or ../shared/data/imagenet_val1300_boxes)")


@pytest.fixture(scope="module")
def real_models():
    """(timm model with the shared checkpoint loaded, HookedViT from the same file)."""
    timm_model = timm.create_model(MODEL_NAME, pretrained=False)
    timm_model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    timm_model.eval()
    return timm_model, HookedViT.from_timm(MODEL_NAME, checkpoint_path=CHECKPOINT)


@pytest.mark.shared_data
@needs_checkpoint
def test_real_checkpoint_logits_equal_timm(real_models, cat):
    timm_model, model = real_models
    x = model.preprocess([cat, np.fliplr(cat).copy(), cat[:150]])
    with torch.no_grad():
        out, ref = model(x), timm_model(x)
    assert max_diff(out, ref) <= 1e-4
    assert out[0].argmax().item() in range(281, 286)  # chelsea is a cat: ImageNet classes 281-285


@pytest.mark.shared_data
@needs_checkpoint
@needs_data
def test_real_checkpoint_dev_accuracy_equals_timm(real_models):
    from caap.data import load_manifest

    timm_model, model = real_models
    samples = load_manifest(DATA_DIR, split="dev")
    assert len(samples) == 649
    transform = create_transform(**resolve_data_config({}, model=timm_model))
    timm_preds, hooked_preds = [], []
    with torch.inference_mode():
        for start in range(0, len(samples), 64):
            chunk = samples[start:start + 64]
            timm_pixels = []
            for s in chunk:
                with Image.open(s.path) as im:
                    timm_pixels.append(transform(im.convert("RGB")))
            timm_preds.append(timm_model(torch.stack(timm_pixels)).argmax(-1))
            hooked_preds.append(model(model.preprocess([s.path for s in chunk])).argmax(-1))
    timm_preds, hooked_preds = torch.cat(timm_preds), torch.cat(hooked_preds)
    labels = torch.tensor([s.class_index for s in samples])
    disagree = [samples[i].name for i in torch.nonzero(timm_preds != hooked_preds).flatten().tolist()]
    assert not disagree, f"HookedViT and timm predict different classes for {disagree[:10]}"
    timm_acc = (timm_preds == labels).float().mean().item()
    hooked_acc = (hooked_preds == labels).float().mean().item()
    assert hooked_acc == timm_acc
    assert timm_acc > 0.75  # ../shared/models/README.md: top-1 0.826 on all 1300 photos
