"""CAAP: shapes, determinism, agreement with the engine's sweep, a provable synthetic case, a real photo."""

from __future__ import annotations

import pytest
import torch

from caap import CAAP
from caap.attribution import default_layers
from caap.contexts import ImageContext
from caap.data import DEFAULT_MODEL, shared_checkpoint
from caap.patching import logit_score, sweep
from hooked_vit import HookedViT, HookedViTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=4, d_model=32, n_heads=4, d_head=8, d_mlp=64, img_size=32, patch_size=8,
                          n_registers=2, n_classes=10)
    m = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_shape_dtype_deterministic(model, pixels):
    caap = CAAP(model, layers=(1, 2), context="grey", batch_size=5)
    a = caap.attribute(pixels)
    b = caap.attribute(pixels)
    assert a.shape == (2, 4, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_batch_equals_single_images(model, pixels):
    caap = CAAP(model, layers=(1, 3), context="blur", batch_size=7)
    both = caap.attribute(pixels, target=[3, 8])
    torch.testing.assert_close(both[0], caap.attribute(pixels[:1], target=3)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], caap.attribute(pixels[1:], target=8)[0], atol=1e-5, rtol=0)


def test_several_targets_at_once(model, pixels):
    caap = CAAP(model, layers=(2, 2), context="zero")
    many = caap.attribute_classes(pixels, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert many.shape == (2, 3, 4, 4)
    torch.testing.assert_close(many[:, 1], caap.attribute(pixels, target=[2, 5]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one integer class index per image"):  # one rank rule: [batch, h, w]
        caap.attribute(pixels, target=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(ValueError, match=r"classes must be \[batch=2, k\]"):
        caap.attribute_classes(pixels, [1, 2])


def test_single_layer_caap_equals_resid_sweep(model, pixels):
    """CAAP over one layer with an image context is the engine's resid_pre sweep into that image."""
    ctx_image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    maps = CAAP(model, layers=(2, 2), context=ImageContext(ctx_image), score="logit").attribute(pixels[:1], target=4)
    result = sweep(model, pixels[:1], ctx_image, logit_score(torch.tensor([4])), layers=[2], progress=False)
    torch.testing.assert_close(maps[0], result.to_grid(model).values[0, 0], atol=1e-5, rtol=0)


def test_scores(model, pixels):
    logit = CAAP(model, layers=(1, 2), context="grey", score="logit").attribute(pixels, target=[0, 1])
    prob = CAAP(model, layers=(1, 2), context="grey", score="prob").attribute(pixels, target=[0, 1])
    diff = CAAP(model, layers=(1, 2), context="grey", score="logit_diff").attribute(pixels, target=[0, 1])
    assert (prob >= 0).all() and (prob <= 1).all()
    # logit_diff is the logit minus one constant per image: the unpatched grey context's logit
    shift = (logit - diff).flatten(1)
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5, rtol=0)
    grey = torch.full((1, 3, 32, 32), 0.5)
    mean = torch.tensor(model.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.data_config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        grey_logits = model((grey - mean) / std)[0]
    torch.testing.assert_close(shift[:, 0], grey_logits[[0, 1]], atol=1e-4, rtol=0)
    # logit and prob rank the same way only approximately; but both pick up the same strongest patch here
    assert logit.shape == prob.shape == diff.shape


def test_bad_arguments(model, pixels):
    with pytest.raises(ValueError, match=r"0 <= start <= end <= 3"):
        CAAP(model, layers=(2, 7))
    with pytest.raises(ValueError, match=r"0 <= start <= end <= 3"):
        CAAP(model, layers=(3, 1))
    with pytest.raises(ValueError, match="unknown context"):
        CAAP(model, context="purple")
    with pytest.raises(ValueError, match="unknown component"):
        CAAP(model, component="q")
    with pytest.raises(ValueError, match="unknown score"):
        CAAP(model, score="loss")
    with pytest.raises(ValueError, match="target class out of range"):
        CAAP(model, context="zero").attribute(pixels, target=10)
    with pytest.raises(ValueError, match="image size"):
        CAAP(model, context="zero").attribute(torch.randn(1, 3, 40, 40))


def test_default_layers():
    assert default_layers(12) == (8, 11)
    assert default_layers(24) == (16, 23)
    assert default_layers(1) == (0, 0)
    for n in range(1, 40):
        s, e = default_layers(n)
        assert 0 <= s <= e < n


def test_synthetic_patch_carries_the_evidence():
    """A model whose class-0 logit is the mean over patches of the patch's mean red value (zero blocks,
    average pooling, identity head): patch 5 of the source is the only bright one, so CAAP must rank it
    first, whatever the layer range, and all other patches equal."""
    cfg = HookedViTConfig(n_layers=3, d_model=4, n_heads=1, d_head=4, d_mlp=4, img_size=16, patch_size=4,
                          n_classes=4, class_token=False, pooling="avg", final_norm=False)
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight[0, 0] = 1 / 16  # d_model 0 = mean red value of the patch
        model.head.weight.copy_(torch.eye(4))
    source = torch.zeros(1, 3, 16, 16)
    source[0, 0, 4:8, 4:8] = 3.0  # patch (1, 1) = index 5
    for layers in [(0, 0), (1, 2), (0, 2)]:
        maps = CAAP(model, layers=layers, context="zero").attribute(source, target=0)[0]
        assert maps.flatten().argmax().item() == 5
        others = torch.cat([maps.flatten()[:5], maps.flatten()[6:]])
        torch.testing.assert_close(others, others[:1].expand_as(others))
        assert maps.flatten()[5] - others[0] == pytest.approx(3.0 / 16, abs=1e-6)


@pytest.mark.shared_data
@pytest.mark.skipif(shared_checkpoint() is None, reason="needs ../shared/models (real ViT-Tiny weights)")
def test_real_weights_chelsea_top_patches_on_the_cat():
    """scikit-image's `chelsea` (a cat) pasted into the lower right of scikit-image's `coffee` photo, which
    the model calls a cup: CAAP with the default settings, for the class 'Egyptian cat', puts its top
    patches on the cat, not on the coffee cup. (Chelsea alone fills the whole 0.9 centre crop, so every
    patch would be 'on the cat'; the composite makes the test able to fail.)"""
    import skimage.data
    from PIL import Image

    from caap.data import box_mask

    model = HookedViT.from_timm(DEFAULT_MODEL, checkpoint_path=shared_checkpoint())
    canvas = Image.fromarray(skimage.data.coffee()).resize((248, 248))
    box = (76, 124, 236, 230)  # where the cat goes, in the 248 x 248 canvas
    canvas.paste(Image.fromarray(skimage.data.chelsea()).resize((box[2] - box[0], box[3] - box[1])), box[:2])
    pixels = model.preprocess(canvas)
    assert model(pixels).argmax().item() not in (281, 282, 285)  # the photo as a whole is not a cat...
    maps = CAAP(model).attribute(pixels, target=285)[0]  # ...but where is the evidence for 'Egyptian cat'?
    cat = box_mask([box], canvas.size, model.data_config)  # the cat, in the model's 224 x 224 frame
    on_cat = cat.view(14, 16, 14, 16).float().mean(dim=(1, 3)).flatten() > 0.5
    top = maps.flatten().topk(5).indices
    assert on_cat[top].all(), f"top patches {top.tolist()} not all on the cat"
    assert maps.flatten()[on_cat].mean() > maps.flatten()[~on_cat].mean()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused_not_mapped_to_nan(bad):
    """NaN or inf in the pixels once gave an all-NaN map; now a clear error, for CAAP and for sweeps."""
    from caap.patching import logit_score, sweep

    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    pixels = torch.zeros(2, 3, 224, 224)
    pixels[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or inf values \(image 1 of the batch\)"):
        CAAP(model, layers=(1, 1), context="zero").attribute(pixels)
    with pytest.raises(ValueError, match="sources hold NaN or inf"):
        sweep(model, pixels, torch.zeros(2, 3, 224, 224), logit_score(torch.tensor([0, 0])), layers=[1])
    with pytest.raises(ValueError, match="empty batch"):
        CAAP(model, layers=(1, 1), context="zero").attribute(pixels[:0])


def test_sources_and_context_of_different_sizes_are_refused():
    """On a dynamic-size model, images of two sizes give different token counts: patching position p of
    one into position p of the other would be silently misaligned."""
    from caap.patching import logit_score, sweep

    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2, dynamic_img_size=True).eval()
    small, large = torch.zeros(1, 3, 224, 224), torch.zeros(1, 3, 256, 256)
    with pytest.raises(ValueError, match="positions would not align"):
        sweep(model, small, large, logit_score(torch.tensor([0])), layers=[1])
    from caap.patching import ResidContext

    with torch.no_grad():
        resid = model(large, stop_at_layer=1)
    with pytest.raises(ValueError, match="positions would not align"):
        sweep(model, small, ResidContext({1: resid}), logit_score(torch.tensor([0])), layers=[1])


def test_bf16_precision_keeps_the_head_and_the_maps_in_fp32():
    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        resid = model(pixels, stop_at_layer=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model.head_forward(resid)
        assert logits.dtype == torch.float32  # the head leaves autocast: no bf16 logits
        torch.testing.assert_close(logits, model.head_forward(resid))
    maps = CAAP(model, layers=(1, 1), context="grey", precision="bf16", allow_slow_bf16=True).attribute(pixels, 3)
    assert maps.dtype == torch.float32 and maps.shape == (1, 14, 14) and torch.isfinite(maps).all()
    with pytest.raises(ValueError, match="accepted: fp32, bf16"):
        CAAP(model, precision="fp16")


@pytest.mark.skipif(shared_checkpoint() is None, reason="needs ../shared/models (real ViT-Tiny weights)")
def test_bf16_maps_agree_with_fp32_on_the_real_model():
    from scipy.stats import spearmanr

    model = HookedViT.from_timm(DEFAULT_MODEL, checkpoint_path=shared_checkpoint())
    import skimage.data

    pixels = model.preprocess([skimage.data.chelsea(), skimage.data.astronaut()])
    fp32 = CAAP(model).attribute(pixels)
    bf16 = CAAP(model, precision="bf16", allow_slow_bf16=True).attribute(pixels)
    for a, b in zip(fp32, bf16):  # about 0.99 on heldout photos (README, bf16)
        assert spearmanr(a.flatten(), b.flatten())[0] > 0.97


def test_bf16_delta_is_exact_where_nothing_changed_and_close_elsewhere():
    """precision="bf16_delta": the unpatched context run through the delta layers is the fp32 run bit for
    bit (every difference is 0), a map agrees with fp32 far better than plain bf16 does on the same model,
    the model's own layers are back afterwards, and a run on another forward path is refused."""
    from scipy.stats import spearmanr

    from hooked_vit.precision import DeltaLinear, delta_bf16

    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=4, embed_dim=96, num_heads=3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # logits of order 1 and peaked attention (timm's init: ~0)
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    before = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    fp32 = CAAP(model, layers=(2, 3), context="grey")
    resid = fp32.context.bind(model, pixels[:1]).resid_pre(2)
    with torch.inference_mode():
        clean = model(resid, start_at_layer=2)
        with delta_bf16(model, resid, 2):
            assert isinstance(model.blocks[3].mlp.fc1, DeltaLinear)
            torch.testing.assert_close(model(resid, start_at_layer=2), clean, rtol=0, atol=0)
            # more rows: the fp32 parts (attention, LayerNorm, head) sum in another order; no bf16 error
            torch.testing.assert_close(model(resid.expand(3, -1, -1), start_at_layer=2), clean.expand(3, -1),
                                       rtol=0, atol=1e-5)
            with pytest.raises(KeyError, match="same forward path"):
                model(resid[:, :50], start_at_layer=2)
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)] == before
    exact = fp32.attribute(pixels, target=torch.tensor([3, 17]))
    for precision, floor in (("bf16_delta", 0.9995), ("bf16", None)):
        maps = CAAP(model, layers=(2, 3), context="grey", precision=precision,
                    allow_slow_bf16=True).attribute(pixels, target=torch.tensor([3, 17]))
        rho = [spearmanr(a.flatten(), b.flatten())[0] for a, b in zip(exact, maps)]
        if floor is not None:
            assert min(rho) > floor, rho
            delta_rho = min(rho)
        else:
            assert min(rho) < delta_rho  # plain bf16 rounds more of the effect away
    # the component and the whole range through the last block: the reference takes the patched runs' path
    for component in ("attn_out", "mlp_out"):
        a = CAAP(model, layers=(2, 3), context="grey", component=component).attribute(pixels, 3)
        b = CAAP(model, layers=(2, 3), context="grey", component=component, precision="bf16_delta",
                 allow_slow_bf16=True).attribute(pixels, 3)
        assert spearmanr(a.flatten(), b.flatten())[0] > 0.999
