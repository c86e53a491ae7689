"""Tests of `caap.baselines`: every method on every token layout and grid, batch = each image alone,
determinism, clean-up (hooks, parameter grads), and known answers where a method has one."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import scramble

from caap.attribution.base import AttributionMethod
from caap.baselines import (
    BASELINES,
    RISE,
    AtMan,
    AttentionGradCAM,
    AttentionRollout,
    GenericAttentionExplainability,
    GradCAM,
    GradSAM,
    InputXGradient,
    IntegratedGradients,
    Occlusion,
    SmoothGrad,
    get_baseline,
)
from caap.baselines._common import readout_weights
from hooked_vit import HookedViT, HookedViTConfig

# small settings so that the whole file runs in well under two minutes on two CPU cores
SMALL = {
    "integrated_gradients": dict(n_steps=3, internal_batch_size=4),
    "smoothgrad": dict(n_samples=3, internal_batch_size=4),
    "rise": dict(n_masks=24, internal_batch_size=16),
    "occlusion": dict(internal_batch_size=160),
    "atman": dict(internal_batch_size=160),
    # the baselines of tests/test_baselines_modern.py (their own invariants are tested there)
    "tis": dict(n_masks=16, internal_batch_size=32, kmeans_iters=10),
    "vit_cx": dict(internal_batch_size=64),
    "beyond_intuition_head": dict(steps=3, internal_batch_size=8),
    "beyond_intuition_token": dict(steps=3, internal_batch_size=8),
}
SEEDED = ("random", "smoothgrad", "rise")
# one forward per patch: the batch-vs-alone check runs the second image alone only (its batch offset
# is the part that can go wrong), to keep the file fast
PER_PATCH = ("occlusion", "atman")
# the dynamic-size model at a small non-square size (a 4x6 grid), for tests that need many calls
FAST_SIZE = (64, 96)


MODEL_SPECS = {
    # ViT-Ti's layout (3 heads, 14x14), narrowed from 192 to 96 channels to keep the file fast
    "tiny": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=96), (224, 224), (14, 14)),
    "grid7": ("vit_tiny_patch16_224", dict(depth=2, patch_size=32, embed_dim=64, num_heads=2), (224, 224), (7, 7)),
    "registers": ("vit_base_patch16_reg4_gap_256", dict(depth=2, embed_dim=64, num_heads=2), (256, 256), (16, 16)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, embed_dim=64, num_heads=2), (224, 224), (14, 14)),
    "dynamic": (
        "vit_tiny_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=2, dynamic_img_size=True),
        (160, 224),
        (10, 14),
    ),
}


@pytest.fixture(scope="module")
def models() -> dict[str, HookedViT]:
    out = {}
    for i, (key, (name, kwargs, _, _)) in enumerate(MODEL_SPECS.items()):
        out[key] = scramble(HookedViT.from_timm(name, pretrained=False, **kwargs), seed=i)
    return out


def images(size: tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def hooks_clean(model: HookedViT) -> bool:
    return all(
        not hp.fwd_hooks and not hp.bwd_hooks and not hp._forward_hooks and not hp._backward_hooks
        for hp in model.hook_dict.values()
    )


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> None:
    scale = float(b.abs().max()) + 1e-12
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


def tiny_config(**kw) -> HookedViTConfig:
    base = dict(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, img_size=(64, 64), patch_size=(16, 16), n_classes=10
    )
    base.update(kw)
    return HookedViTConfig(**base)


# ---------------------------------------------------------------------------- every method, every layout
@pytest.mark.parametrize("layout", list(MODEL_SPECS))
@pytest.mark.parametrize("method_name", list(BASELINES))
def test_contract(models, layout, method_name):
    """Shape, dtype, device, finiteness; batch of two with different targets = each image alone;
    no hook left behind; no parameter .grad; requires_grad flags untouched."""
    model = models[layout]
    _, _, size, grid = MODEL_SPECS[layout]
    method = get_baseline(method_name, model, **SMALL.get(method_name, {}))
    assert isinstance(method, AttributionMethod)
    flags = [p.requires_grad for p in model.parameters()]
    x = images(size)
    out = method.attribute(x, target=[3, 7])
    expected = grid if method.resolution == "patch" else size
    assert out.shape == (2, *expected)
    assert out.dtype == torch.float32 and out.device == x.device and not out.requires_grad
    assert torch.isfinite(out).all()
    if method_name != "random":
        assert out.abs().sum() > 0, "an all-zero map on a random model points to a bug"
    assert hooks_clean(model)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags

    if method_name == "random":
        close(method.attribute(x[:1], target=3)[0], out[0])  # the first draw either way
        return
    for i, t in enumerate([3, 7]):
        if i == 0 and method_name in PER_PATCH:
            continue
        close(out[i], method.attribute(x[i : i + 1], target=t)[0])


@pytest.mark.parametrize("method_name", list(BASELINES))
def test_default_target_and_repeatability(models, method_name):
    """target=None is the predicted class, and a second call gives the same maps."""
    model = models["dynamic"]
    method = get_baseline(method_name, model, **SMALL.get(method_name, {}))
    x = images(FAST_SIZE, seed=1)
    pred = model(x).argmax(-1)
    a = method.attribute(x)
    torch.testing.assert_close(a, method.attribute(x, target=pred))


@pytest.mark.parametrize("method_name", SEEDED)
def test_seeded(models, method_name):
    model = models["dynamic"]
    x = images(FAST_SIZE)
    kw = SMALL.get(method_name, {})
    a = get_baseline(method_name, model, seed=5, **kw).attribute(x, target=1)
    b = get_baseline(method_name, model, seed=5, **kw).attribute(x, target=1)
    c = get_baseline(method_name, model, seed=6, **kw).attribute(x, target=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


GRADIENT_METHODS = [
    "gae", "gradsam", "attention_gradcam", "gradcam", "input_x_gradient", "integrated_gradients", "smoothgrad",
]


@pytest.mark.parametrize("method_name", GRADIENT_METHODS)
def test_gradient_methods_under_no_grad_and_inference_mode(models, method_name):
    model = models["dynamic"]
    method = get_baseline(method_name, model, **SMALL.get(method_name, {}))
    x = images(FAST_SIZE)
    ref = method.attribute(x, target=[1, 2])
    with torch.no_grad():
        close(method.attribute(x, target=[1, 2]), ref, rel=1e-5)
    with torch.inference_mode():
        xi = x.clone()
        close(method.attribute(xi, target=[1, 2]), ref, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters(models):
    """Gradient methods work on a model whose parameters do not require grad, and leave them so."""
    model = copy.deepcopy(models["grid7"]).requires_grad_(False)
    x = images((224, 224))
    for name in ("gae", "gradcam", "input_x_gradient"):
        ref = get_baseline(name, models["grid7"]).attribute(x, target=[1, 2])
        close(get_baseline(name, model).attribute(x, target=[1, 2]), ref, rel=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------- registry
def test_registry():
    assert set(BASELINES) == {
        "random", "rollout", "gae", "attention_gradcam", "gradsam", "gradcam", "input_x_gradient",
        "integrated_gradients", "smoothgrad", "occlusion", "rise", "atman",
        "attnlrp", "libragrad_ixg", "libragrad_gae", "libragrad_gradsam", "tis", "vit_cx",
        "beyond_intuition_head", "beyond_intuition_token",
    }
    for name, cls in BASELINES.items():
        assert cls.name == name and issubclass(cls, AttributionMethod)
        assert cls.resolution in ("patch", "pixel")
        assert re.search(r"(19|20)\d\d", cls.__doc__ or ""), f"{cls.__name__} should cite its paper"
    model = HookedViT(tiny_config())
    assert isinstance(get_baseline("Integrated-Gradients", model, n_steps=2), IntegratedGradients)
    with pytest.raises(ValueError, match="accepted names: .*rollout.*atman"):
        get_baseline("lrp", model)
    with pytest.raises(TypeError):
        get_baseline("rollout", model, no_such_setting=1)


def test_bad_settings():
    model = HookedViT(tiny_config())
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="reference"):
        Occlusion(model, reference="blurry")
    with pytest.raises(ValueError, match="n_steps"):
        IntegratedGradients(model, n_steps=0)
    with pytest.raises(ValueError, match="score"):
        RISE(model, score="margin")
    with pytest.raises(ValueError, match="layer"):
        AttentionGradCAM(model, layer=3)
    with pytest.raises(ValueError, match="unknown hook"):
        GradCAM(model, hook_name="blocks.0.nope")
    no_cls = HookedViT(tiny_config(class_token=False, pooling="avg"))
    with pytest.raises(ValueError, match="class token"):
        AttentionRollout(no_cls, readout="class").attribute(torch.randn(1, 3, 64, 64))


def test_readout_rows(models):
    reg, dist = models["registers"], models["distilled"]
    w = readout_weights(reg, 4 + 256)  # no class token, average pooling over the patches
    assert torch.allclose(w[:4], torch.zeros(4)) and torch.allclose(w[4:], torch.full((256,), 1 / 256))
    w = readout_weights(dist, 2 + 196)
    assert w[0] == 1 and w[1:].abs().sum() == 0
    w = readout_weights(dist, 2 + 196, "pooled")
    assert w[0] == 0.5 and w[1] == 0.5 and w[2:].abs().sum() == 0
    x = images((224, 224))
    a = AttentionRollout(dist).attribute(x)
    b = AttentionRollout(dist, readout="pooled").attribute(x)
    assert a.shape == b.shape == (2, 14, 14) and not torch.allclose(a, b)


# ---------------------------------------------------------------------------- known answers: attention
def forced_model(n_layers: int, seed: int = 0):
    """A hand-built model whose attention patterns are replaced by fixed row-stochastic matrices."""
    model = scramble(HookedViT(tiny_config(n_layers=n_layers, img_size=(48, 64))), seed)  # 3x4 grid, 13 tokens
    g = torch.Generator().manual_seed(seed + 100)
    patterns = [torch.softmax(3 * torch.randn(2, 13, 13, generator=g), dim=-1) for _ in range(n_layers)]
    for layer, pat in enumerate(patterns):
        name = f"blocks.{layer}.attn.hook_pattern"
        model.add_hook(name, lambda x, hook, p=pat: p.expand_as(x).clone(), is_permanent=True)
    return model, patterns


def reference_rollout(patterns, fusion="mean", discard=0.0):
    result = torch.eye(13)
    for pat in patterns:
        fused = {"mean": pat.mean(0), "max": pat.amax(0), "min": pat.amin(0)}[fusion].clone()
        if discard:
            flat = fused.view(-1)
            idx = flat.topk(int(flat.numel() * discard), largest=False).indices
            idx = idx[idx != 0]  # vit-explain: never drop the class token's own entry
            flat[idx] = 0
        a = 0.5 * fused + 0.5 * torch.eye(13)
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result[0, 1:].view(3, 4)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9)])
def test_rollout_known_pattern(n_layers, fusion, discard):
    model, patterns = forced_model(n_layers)
    x = torch.randn(2, 3, 48, 64)
    out = AttentionRollout(model, head_fusion=fusion, discard_ratio=discard).attribute(x)
    ref = reference_rollout(patterns, fusion, discard)
    torch.testing.assert_close(out, ref.expand(2, 3, 4), rtol=1e-5, atol=1e-6)
    if n_layers == 1 and fusion == "mean" and discard == 0:  # the one-layer formula, by hand
        a = 0.5 * patterns[0].mean(0) + 0.5 * torch.eye(13)
        torch.testing.assert_close(out[0].flatten(), a[0, 1:] / a[0].sum(), rtol=1e-5, atol=1e-6)
    model.reset_hooks(including_permanent=True)


def reference_attention_grads(model, x, target):
    """Patterns and their gradients the plain way (retain_grad + backward on a copy of the model)."""
    model = copy.deepcopy(model)
    saved = []

    def keep(p, hook):
        p.retain_grad()
        saved.append(p)

    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    logits = model.run_with_hooks(x, fwd_hooks=[(n, keep) for n in names])
    logits[0, target].backward()
    return [p[0].detach() for p in saved], [p.grad[0] for p in saved]


@pytest.mark.parametrize("layout", ["tiny", "registers"])
def test_attention_gradient_methods_match_reference(models, layout):
    model = models[layout]
    _, _, size, grid = MODEL_SPECS[layout]
    x = images(size, n=1, seed=3)
    target = 5
    attn, grads = reference_attention_grads(model, x, target)
    p = model.cfg.n_prefix_tokens
    t = attn[0].shape[-1]
    # the readout row: the class token where there is one, else the mean of the patch rows (GAP)
    r = torch.zeros(t)
    if model.cfg.class_token:
        r[0] = 1
    else:
        r[p:] = 1 / (t - p)

    rel = torch.eye(t)  # Chefer et al. 2021b
    for a, g in zip(attn, grads):
        rel = rel + (g * a).clamp(min=0).mean(0) @ rel
    close(GenericAttentionExplainability(model).attribute(x, target)[0], (r @ rel)[p:].view(grid), rel=1e-4)

    a, g = attn[-1], grads[-1]  # Grad-CAM on the last attention map, as in Chefer et al.'s baselines
    cam, gr = (r @ a)[:, p:], (r @ g)[:, p:]
    ref = (cam * gr.mean(-1, keepdim=True)).mean(0).clamp(min=0)
    close(AttentionGradCAM(model).attribute(x, target)[0], ref.view(grid), rel=1e-4)

    m = torch.stack([(a * g.clamp(min=0)).mean(0) for a, g in zip(attn, grads)]).mean(0)  # Grad-SAM
    close(GradSAM(model).attribute(x, target)[0], (r @ m)[p:].view(grid), rel=1e-4)
    close(GradSAM(model, rows="all").attribute(x, target)[0], m.mean(0)[p:].view(grid), rel=1e-4)


def test_gradcam_matches_reference(models):
    model = copy.deepcopy(models["distilled"])
    x = images((224, 224), n=1, seed=4)
    saved = {}

    def keep(a, hook):
        a.retain_grad()
        saved["a"] = a

    logits = model.run_with_hooks(x, fwd_hooks=[("blocks.1.ln1.hook_normalized", keep)])
    logits[0, 9].backward()
    a, g = saved["a"][0, 2:].detach(), saved["a"].grad[0, 2:]  # drop class + distillation tokens
    ref = torch.relu((a * g.mean(0)).sum(-1)).view(14, 14)
    close(GradCAM(models["distilled"]).attribute(x, 9)[0], ref, rel=1e-4)


# ---------------------------------------------------------------------------- known answers: linear model
def linear_model(seed: int = 0, **kw) -> HookedViT:
    """A HookedViT whose logits are an affine function of the pixels: attention and MLP outputs are
    zeroed, no final norm, average pooling over the patches. logit_t = W_t . mean_i(Conv(x_i)) + const."""
    cfg = tiny_config(pooling="avg", final_norm=False, **kw)
    model = scramble(HookedViT(cfg), seed)
    with torch.no_grad():
        for blk in model.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    return model


def linear_gradient(model: HookedViT, target: int, size: tuple[int, int]) -> torch.Tensor:
    """d logit_target / d pixels [chan, H, W], analytically."""
    conv = model.patch_embed.proj.weight  # [d, c, ph, pw]
    gh, gw = model.grid_size_for(size)
    per_patch = torch.einsum("d,dcij->cij", model.head.weight[target], conv) / (gh * gw)
    return per_patch.repeat(1, gh, gw).detach()


def test_input_x_gradient_linear():
    model = linear_model()
    x = torch.randn(2, 3, 64, 64)
    g3, g7 = linear_gradient(model, 3, (64, 64)), linear_gradient(model, 7, (64, 64))
    out = InputXGradient(model).attribute(x, [3, 7])
    torch.testing.assert_close(out[0], (x[0] * g3).sum(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[1], (x[1] * g7).sum(0), rtol=1e-4, atol=1e-6)
    out = InputXGradient(model, abs=True).attribute(x, [3, 7])
    torch.testing.assert_close(out[0], (x[0] * g3).abs().sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
@pytest.mark.parametrize("reference", ["zero", "black"])
def test_integrated_gradients_linear(method, reference):
    """On an affine function IG is exact for any quadrature: (x - x') * gradient."""
    model = linear_model()
    x = torch.randn(2, 3, 64, 64)
    if reference == "zero":
        base = torch.zeros(1, 3, 1, 1)
    else:
        mean, std = torch.tensor(model.data_config["mean"]), torch.tensor(model.data_config["std"])
        base = (-mean / std).view(1, 3, 1, 1)
    ig = IntegratedGradients(model, reference=reference, n_steps=5, method=method, internal_batch_size=3)
    out = ig.attribute(x, [3, 7])
    for i, t in enumerate([3, 7]):
        ref = ((x[i] - base[0]) * linear_gradient(model, t, (64, 64))).sum(0)
        torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)


def test_integrated_gradients_completeness(models):
    """On a non-linear model the map sums to y(x) - y(x') up to the quadrature error."""
    model = models["grid7"]
    x = 0.5 * images((224, 224), n=1, seed=2)
    out = IntegratedGradients(model, n_steps=24, internal_batch_size=24).attribute(x, 4)
    with torch.no_grad():
        gap = model(x)[0, 4] - model(torch.zeros_like(x))[0, 4]
    assert abs(float(out.sum()) - float(gap)) < 0.02 * abs(float(gap)) + 1e-3


def test_smoothgrad_linear():
    """The gradient of an affine function does not change under noise."""
    model = linear_model()
    x = torch.randn(2, 3, 64, 64)
    g = linear_gradient(model, 3, (64, 64))
    out = SmoothGrad(model, n_samples=4, abs=False, internal_batch_size=3).attribute(x, 3)
    torch.testing.assert_close(out, g.sum(0).expand(2, 64, 64), rtol=1e-4, atol=1e-6)
    out = SmoothGrad(model, n_samples=4, internal_batch_size=3).attribute(x, 3)
    torch.testing.assert_close(out, g.abs().sum(0).expand(2, 64, 64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reference", ["zero", "mean"])
def test_occlusion_linear(reference):
    """Occluding patch i of an affine model drops the logit by the patch's own linear term."""
    model = linear_model(img_size=(48, 64))  # 3x4 grid
    x = torch.randn(2, 3, 48, 64)
    out = Occlusion(model, reference=reference, score="logit", internal_batch_size=5).attribute(x, [3, 7])
    for i, t in enumerate([3, 7]):
        base = x[i].mean(dim=(1, 2), keepdim=True) if reference == "mean" else 0
        contrib = ((x[i] - base) * linear_gradient(model, t, (48, 64))).sum(0)
        ref = contrib.view(3, 16, 4, 16).sum(dim=(1, 3))
        torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-5)


def single_patch_model(model: HookedViT, keep: int) -> HookedViT:
    """The model, with every patch embedding but patch `keep` zeroed: the logits read that patch only."""
    model = copy.deepcopy(model)

    def only(emb, hook):
        mask = torch.zeros(emb.shape[1], 1)
        mask[keep] = 1
        return emb * mask

    model.add_hook("hook_embed", only, is_permanent=True)
    return model


def test_occlusion_finds_the_only_patch(models):
    """A model whose output depends on one patch: occlusion puts it first, everything else at zero
    (non-square grid, so a transposed index would show)."""
    keep = 3 * 14 + 11  # row 3, column 11 of a 10x14 grid
    model = single_patch_model(models["dynamic"], keep)
    x = images((160, 224), n=1, seed=5)
    hidden = x.clone()
    hidden[..., 48:64, 176:192] = 0
    with torch.no_grad():
        target = int((model(x) - model(hidden)).argmax())
    out = Occlusion(model, score="logit").attribute(x, target)[0]
    assert out.shape == (10, 14)
    assert int(out.flatten().argmax()) == keep and out[3, 11] > 0
    rest = out.flatten()[torch.arange(140) != keep]
    assert rest.abs().max() < 1e-5 * out[3, 11]


def test_rise_matches_its_formula_and_finds_the_patch():
    """RISE on an affine model whose logit reads one patch: the map is exactly
    1/(N p1) sum_i y(x * M_i) M_i for the method's own masks, and it peaks on that patch."""
    keep = 6  # row 1, column 2 of a 4x4 grid
    model = single_patch_model(linear_model(seed=1), keep)
    with torch.no_grad():
        model.head.bias.zero_()
        model.patch_embed.proj.bias.zero_()
    x = images((64, 64), n=1, seed=6)
    contrib = torch.stack([(x[0] * linear_gradient(model, t, (64, 64))).sum(0)[16:32, 32:48].sum() for t in range(10)])
    target = int(contrib.argmax())
    rise = RISE(model, n_masks=400, s=4, score="logit", internal_batch_size=64, seed=3)
    out = rise.attribute(x, target)[0]
    masks = rise.masks((64, 64))
    assert masks.shape == (400, 64, 64) and masks.min() >= 0 and masks.max() <= 1
    assert abs(float(masks.mean()) - 0.5) < 0.05
    with torch.no_grad():
        scores = model(x * masks[:, None])[:, target]
    ref = torch.einsum("n,nhw->hw", scores, masks) / (400 * 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    per_patch = F.avg_pool2d(out[None, None], 16)[0, 0]
    assert int(per_patch.flatten().argmax()) == keep


def test_rise_masks_non_square():
    rise = RISE(HookedViT(tiny_config()), n_masks=8, s=3, seed=0)
    m = rise.masks((48, 80))
    assert m.shape == (8, 48, 80)
    torch.testing.assert_close(m, rise.masks((48, 80)))
    torch.testing.assert_close(m[2:5], rise.masks((48, 80), 2, 5))


# ---------------------------------------------------------------------------- AtMan
def test_atman_matches_a_plain_loop(models):
    """Each patch's entry is the cross-entropy change of one forward with that key's scores
    (shifted to a zero row minimum) multiplied by the factor in every layer (non-square grid)."""
    model = models["dynamic"]
    x = images((160, 224), n=1, seed=7)
    p = model.cfg.n_prefix_tokens
    out = AtMan(model, conceptual_threshold=None, internal_batch_size=50).attribute(x, 2)[0]
    with torch.no_grad():
        base = model(x).log_softmax(-1)[0, 2]
        for k in (0, 13, 3 * 14 + 11, 139):
            def suppress(scores, hook, k=k):
                scores = scores - scores.amin(-1, keepdim=True)
                scores[..., p + k] *= 0.1
                return scores

            names = [f"blocks.{i}.attn.hook_attn_scores" for i in range(model.cfg.n_layers)]
            ce = model.run_with_hooks(x, fwd_hooks=[(n, suppress) for n in names]).log_softmax(-1)[0, 2]
            torch.testing.assert_close(out.flatten()[k], base - ce, rtol=1e-3, atol=1e-6)


def test_atman_conceptual_factors(models):
    model = models["grid7"]
    x = images((224, 224), n=1, seed=8)
    x[..., :, 0:64] = 0.3  # patches in the first two columns are identical
    f = AtMan(model, conceptual_threshold=0.7).factors(x)[0]  # [49, 50]
    assert f.shape == (49, 50)
    assert (f[:, 0] == 1).all()  # the class token is never suppressed
    assert torch.allclose(f[torch.arange(49), 1 + torch.arange(49)], torch.full((49,), 0.1))
    assert torch.allclose(f[0, 1 + 1], torch.tensor(0.1))  # patch (0,1) equals patch (0,0)
    assert torch.allclose(f[0, 1 + 7], torch.tensor(0.1))  # and so does (1,0)
    assert ((f >= 0.1 - 1e-6) & (f <= 1)).all()
    none = AtMan(model, conceptual_threshold=None).factors(x)[0]
    assert (none == 1).sum() == 49 * 50 - 49


# ---------------------------------------------------------------------------- batching knobs, devices
@pytest.mark.parametrize(
    "method_name,small,large",
    [
        ("integrated_gradients", dict(n_steps=5, internal_batch_size=3), dict(n_steps=5, internal_batch_size=64)),
        ("smoothgrad", dict(n_samples=5, internal_batch_size=2), dict(n_samples=5, internal_batch_size=64)),
        ("occlusion", dict(internal_batch_size=7), dict(internal_batch_size=200)),
        ("rise", dict(n_masks=20, internal_batch_size=6), dict(n_masks=20, internal_batch_size=200)),
        ("atman", dict(internal_batch_size=7), dict(internal_batch_size=200)),
    ],
)
def test_internal_batch_size_does_not_change_the_answer(models, method_name, small, large):
    model = models["dynamic"]
    x = images(FAST_SIZE)
    a = get_baseline(method_name, model, **small).attribute(x, [0, 5])
    close(a, get_baseline(method_name, model, **large).attribute(x, [0, 5]), rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method_name", list(BASELINES))
def test_cuda(models, method_name):
    """Maps come back on the input's device and agree with the CPU."""
    cpu = models["dynamic"]
    gpu = copy.deepcopy(cpu).cuda()
    x = images((160, 224))
    method = get_baseline(method_name, gpu, **SMALL.get(method_name, {}))
    out = method.attribute(x.cuda(), [3, 7])
    assert out.device.type == "cuda" and out.dtype == torch.float32
    ref = get_baseline(method_name, cpu, **SMALL.get(method_name, {})).attribute(x, [3, 7])
    close(out.cpu(), ref, rel=2e-2)  # TF32 / kernel differences
    assert hooks_clean(gpu) and all(p.grad is None for p in gpu.parameters())


# ---------------------------------------------------------------------------- real weights (optional)
@pytest.mark.shared_data
@pytest.mark.slow
def test_real_weights_deletion_sanity():
    """On the real ViT-Ti and real photos: hiding each image's top fifth of patches by a map lowers the
    predicted class's probability more than hiding its bottom fifth (summed over two photos), for
    class-sensitive maps (GAE, Grad-SAM). (Occlusion, AtMan and SmoothGrad pass it too, but cost
    many forwards per photo.)"""
    from caap.data import DEFAULT_MODEL, VAL_BOXES, load_manifest, shared_checkpoint, shared_data_dir

    ckpt, data = shared_checkpoint(), shared_data_dir(VAL_BOXES)
    if ckpt is None or data is None:
        pytest.skip("no shared checkpoint or data")
    model = HookedViT.from_timm(DEFAULT_MODEL, checkpoint_path=str(ckpt), pretrained=False)
    samples = load_manifest(data, split="dev", limit=2)
    x = model.preprocess([s.path for s in samples])
    with torch.no_grad():
        target = model(x).argmax(-1)

    def hidden_prob(i: int, idx: torch.Tensor) -> float:
        m = torch.zeros(196)
        m[idx] = 1
        m = m.view(1, 1, 14, 14).repeat_interleave(16, 2).repeat_interleave(16, 3)
        with torch.no_grad():
            return float(model(x[i : i + 1] * (1 - m)).softmax(-1)[0, target[i]])

    for method in (GenericAttentionExplainability(model), GradSAM(model)):
        maps = method.attribute(x)  # target None: the prediction
        if method.resolution == "pixel":
            maps = F.avg_pool2d(maps[:, None], 16)[:, 0]
        maps = maps.flatten(1)
        top, bottom = [], []
        for i in range(len(x)):
            order = maps[i].argsort(descending=True)
            top.append(hidden_prob(i, order[:39]))
            bottom.append(hidden_prob(i, order[-39:]))
        assert sum(top) < sum(bottom) - 0.3, (type(method).__name__, top, bottom)
