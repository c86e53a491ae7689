"""Hook machinery of HookedViT: clean-up, every hook point live and documented, start/stop at a layer,
the fast paths, clear errors, and the token-axis / grid helpers."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import scramble

import hooked_vit.model
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.cache import ViTActivationCache

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}

# Variants that between them have every hook point: CLIP pre-norm (ln_pre), registers + avg pooling
# + fc_norm, DeiT distilled (pooled [batch, 2, d]), DeiT-III LayerScale + qk-norm.
# Small images (4x4 patches) keep the ~50 patched forwards per variant cheap.
VARIANTS = {
    "clip_prenorm": ("vit_base_patch16_clip_224", {**SMALL, "img_size": 64}),
    "registers_gap_fc_norm": ("vit_base_patch16_reg4_gap_256", {**SMALL, "img_size": 64}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {**SMALL, "img_size": 64}),
    "deit3_qk_norm": ("deit3_small_patch16_224", {**SMALL, "img_size": 64, "qk_norm": True}),
}
# What the Hugging Face families add and no timm variant above has (SigLIP's attention pooling without a class
# token, DINOv2's SwiGLU MLP, CLIP's projection and unit-length features), built from a config.
CONFIG_VARIANTS = {
    "map_swiglu_projected": HookedViTConfig(
        n_layers=2, d_model=64, n_heads=2, d_head=32, d_mlp=96, img_size=64, patch_size=16, class_token=False,
        pooling="map", gated_mlp=True, act_fn="silu", proj_dim=24, normalize_features=True, n_classes=10),
}
ALL_VARIANTS = [*VARIANTS, *CONFIG_VARIANTS]


def variant_model(hooked_pair, variant: str) -> HookedViT:
    """A fresh model of a variant: converted from timm, or built from its config with scrambled weights."""
    if variant in CONFIG_VARIANTS:
        return scramble(HookedViT(CONFIG_VARIANTS[variant]), seed=1)
    name, kwargs = VARIANTS[variant]
    return hooked_pair(name, **kwargs)[1]


@pytest.fixture
def small_model(hooked_pair) -> HookedViT:
    """A fresh 2-block ViT (width 64, 2 heads, class token)."""
    return hooked_pair("vit_small_patch16_224", **SMALL)[1]


@pytest.fixture
def tiny_model(hooked_pair) -> HookedViT:
    """A fresh real-size ViT-Tiny (12 blocks): numerical comparisons accumulate over depth."""
    return hooked_pair("vit_tiny_patch16_224")[1]


def no_hooks_left(model: HookedViT) -> bool:
    return model.context_level == 0 and not any(hp.has_hooks() for hp in model.hook_points())


# ---------------------------------------------------------------------------------------------- clean-up
def _boom(t, hook):
    raise RuntimeError("boom in hook")


@pytest.mark.parametrize("runner, hooks", [
    ("run_with_hooks", [("blocks.0.hook_resid_pre", lambda t, hook: t * 0), ("blocks.1.hook_mlp_out", _boom)]),
    ("hooks_context", [("hook_embed", lambda t, hook: t * 0), ("blocks.1.attn.hook_z", _boom)]),
])
def test_hooks_removed_after_exception(small_model, pixels, runner, hooks):
    x = pixels(small_model)
    clean = small_model(x)
    with pytest.raises(RuntimeError, match="boom in hook"):
        if runner == "run_with_hooks":
            small_model.run_with_hooks(x, fwd_hooks=hooks)
        else:
            with small_model.hooks(fwd_hooks=hooks):
                small_model(x)
    assert no_hooks_left(small_model)
    torch.testing.assert_close(small_model(x), clean, atol=0, rtol=0)


def test_nested_hook_contexts_keep_permanent_hooks(small_model, pixels):
    x = pixels(small_model)
    counts = {"perma": 0, "outer": 0, "inner": 0}

    def counter(key, factor=1.0):
        def hook(t, hook):
            counts[key] += 1
            return t * factor
        return hook

    small_model.add_perma_hook("blocks.1.hook_resid_post", counter("perma", 1.5))
    perma_only = small_model(x)
    assert counts["perma"] == 1
    try:
        with small_model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", counter("outer"))]):
            with small_model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", counter("inner"))]):
                small_model(x)
            assert counts == {"perma": 2, "outer": 1, "inner": 1}
            small_model(x)  # the inner hook is gone, the outer and the permanent one are not
            assert counts == {"perma": 3, "outer": 2, "inner": 1}
            inner = [("blocks.0.hook_mlp_out", counter("inner"))]
            with pytest.raises(RuntimeError), small_model.hooks(fwd_hooks=inner):
                raise RuntimeError("leave the inner context with an exception")
            small_model(x)
            assert counts == {"perma": 4, "outer": 3, "inner": 1}
        torch.testing.assert_close(small_model(x), perma_only, atol=0, rtol=0)
        assert counts == {"perma": 5, "outer": 3, "inner": 1}
        assert small_model.hook_dict["blocks.1.hook_resid_post"].has_hooks(including_permanent=True)
        assert not any(hp.has_hooks(including_permanent=False) for hp in small_model.hook_points())
    finally:
        small_model.reset_hooks(including_permanent=True)
    assert no_hooks_left(small_model)


# ---------------------------------------------------------------------------------------------- every hook point
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_zero_patching_any_hook_point_changes_the_logits(hooked_pair, pixels, variant):
    model = variant_model(hooked_pair, variant)
    model.set_use_attn_result(True)
    x = pixels(model)
    with torch.no_grad():
        clean = model(x)
        unchanged = []
        for hook_name in model.hook_dict:
            patched = model.run_with_hooks(x, fwd_hooks=[(hook_name, lambda t, hook: torch.zeros_like(t))])
            if torch.allclose(patched, clean, atol=1e-6, rtol=0):
                unchanged.append(hook_name)
    assert not unchanged, f"zeroing these hook points does not change the logits: {unchanged}"
    expected = {"clip_prenorm": ["ln_pre.hook_scale", "ln_final.hook_scale"],
                "registers_gap_fc_norm": ["fc_norm.hook_normalized"],
                "deit_distilled": ["hook_pooled"],
                "deit3_qk_norm": ["blocks.1.attn.hook_result"],
                "map_swiglu_projected": ["attn_pool.hook_q", "blocks.1.mlp.hook_pre_linear", "hook_projected",
                                         "feature_norm.hook_scale"]}[variant]
    assert set(expected) <= set(model.hook_dict)  # the variant has the hook points it is here for


def documented_hook_shapes() -> dict[str, list[str]]:
    """Hook names and shapes from the docstring of hooked_vit/model.py: {generic name: [shapes]}.

    "blocks.{l}.attn.hook_q/_k/_v  [a]" gives three names with shape a; "x.hook_scale/_normalized
    [a] / [b]" gives two names, pairwise; "hook_pooled [a]; [b] for ..." one name, either shape.
    """
    out: dict[str, list[str]] = {}
    for line in hooked_vit.model.__doc__.splitlines():
        m = re.match(r"^    (\S*hook_\S*)\s*(.*)$", line)
        if not m:
            continue
        first, *alts = m.group(1).split("/")
        stem = first[: first.rindex("hook_") + len("hook")]
        names = [first] + [stem + a for a in alts]
        shapes = [s.replace(" ", "") for s in re.findall(r"\[[^\]]*\]", m.group(2))]
        if not shapes:
            per_name = [[] for _ in names]
        elif len(shapes) == len(names):
            per_name = [[s] for s in shapes]
        elif len(shapes) == 1 or len(names) == 1:
            per_name = [shapes] * len(names)
        else:
            raise AssertionError(f"cannot read the docstring line {line!r}")
        for n, s in zip(names, per_name):
            out[n] = s
    return out


def test_docstring_lists_the_hook_points():
    documented = documented_hook_shapes()
    assert len(documented) >= 25
    assert "blocks.{l}.attn.hook_pattern" in documented and "hook_pooled" in documented


# Expected shape of every hook, in the docstring's symbols.
EXPECTED_SHAPES = {
    "hook_embed": "[batch,n_patches,d_model]",
    "hook_pos_embed": "[batch,pos,d_model]",
    "ln_pre.hook_scale": "[batch,pos,1]",
    "ln_pre.hook_normalized": "[batch,pos,d_model]",
    "blocks.{l}.hook_resid_pre": "[batch,pos,d_model]",
    "blocks.{l}.ln1.hook_scale": "[batch,pos,1]",
    "blocks.{l}.ln1.hook_normalized": "[batch,pos,d_model]",
    "blocks.{l}.attn.hook_q": "[batch,pos,head,d_head]",
    "blocks.{l}.attn.hook_k": "[batch,pos,head,d_head]",
    "blocks.{l}.attn.hook_v": "[batch,pos,head,d_head]",
    "blocks.{l}.attn.hook_attn_scores": "[batch,head,q_pos,k_pos]",
    "blocks.{l}.attn.hook_pattern": "[batch,head,q_pos,k_pos]",
    "blocks.{l}.attn.hook_z": "[batch,pos,head,d_head]",
    "blocks.{l}.attn.hook_result": "[batch,pos,head,d_model]",
    "blocks.{l}.hook_attn_out": "[batch,pos,d_model]",
    "blocks.{l}.hook_resid_mid": "[batch,pos,d_model]",
    "blocks.{l}.ln2.hook_scale": "[batch,pos,1]",
    "blocks.{l}.ln2.hook_normalized": "[batch,pos,d_model]",
    "blocks.{l}.mlp.hook_pre": "[batch,pos,d_mlp]",
    "blocks.{l}.mlp.hook_post": "[batch,pos,d_mlp]",
    "blocks.{l}.hook_mlp_out": "[batch,pos,d_model]",
    "blocks.{l}.hook_resid_post": "[batch,pos,d_model]",
    "ln_final.hook_scale": "[batch,pos,1]",
    "ln_final.hook_normalized": "[batch,pos,d_model]",
    "hook_pooled": "[batch,d_model]",  # [batch,2,d_model] for DeiT distilled
    "fc_norm.hook_scale": "[batch,1]",
    "fc_norm.hook_normalized": "[batch,d_model]",
    "blocks.{l}.mlp.hook_pre_linear": "[batch,pos,d_mlp]",
    "attn_pool.hook_q": "[batch,1,head,d_head]",
    "attn_pool.hook_k": "[batch,pos,head,d_head]",
    "attn_pool.hook_v": "[batch,pos,head,d_head]",
    "attn_pool.hook_attn_scores": "[batch,head,1,k_pos]",
    "attn_pool.hook_pattern": "[batch,head,1,k_pos]",
    "attn_pool.hook_z": "[batch,1,head,d_head]",
    "attn_pool.hook_attn_out": "[batch,1,d_model]",
    "attn_pool.ln.hook_scale": "[batch,1,1]",
    "attn_pool.ln.hook_normalized": "[batch,1,d_model]",
    "attn_pool.mlp.hook_pre": "[batch,1,d_mlp]",
    "attn_pool.mlp.hook_post": "[batch,1,d_mlp]",
    "attn_pool.hook_mlp_out": "[batch,1,d_model]",
    "hook_projected": "[batch,proj_dim]",
    "feature_norm.hook_scale": "[batch,1]",
    "feature_norm.hook_normalized": "[batch,d_features]",
}


def test_expected_shapes_agree_with_the_docstring():
    documented = documented_hook_shapes()
    assert set(documented) == set(EXPECTED_SHAPES), "docstring and test list different hook points"
    for name, shapes in documented.items():
        if shapes:  # the docstring may give no shape where it says "as above" (ln2)
            assert EXPECTED_SHAPES[name] in shapes, name
    assert "[batch,2,d_model]" in documented["hook_pooled"]


def test_every_hook_has_its_documented_shape(hooked_pair, pixels):
    seen: set[str] = set()
    for variant in ALL_VARIANTS:
        model = variant_model(hooked_pair, variant)
        model.set_use_attn_result(True)
        cfg = model.cfg
        batch = 3
        x = pixels(model, batch=batch)
        with torch.no_grad():
            _, cache = model.run_with_cache(x)
        assert set(cache.keys()) == set(model.hook_dict), "run_with_cache caches every hook point"
        dims = {"batch": batch, "pos": cfg.n_ctx, "q_pos": cfg.n_ctx, "k_pos": cfg.n_ctx, "n_patches": cfg.n_patches,
                "d_model": cfg.d_model, "head": cfg.n_heads, "d_head": cfg.d_head, "d_mlp": cfg.d_mlp,
                "proj_dim": cfg.proj_dim, "d_features": cfg.d_features, "1": 1, "2": 2}
        for key, value in cache.items():
            generic = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", key)
            symbols = EXPECTED_SHAPES[generic]
            if key == "hook_pooled" and cfg.distilled:
                symbols = "[batch,2,d_model]"
            expected = tuple(dims[s] for s in symbols.strip("[]").split(","))
            assert tuple(value.shape) == expected, f"{variant}: {key} {tuple(value.shape)} != {symbols}"
            seen.add(generic)
    assert seen == set(EXPECTED_SHAPES), f"no variant has {set(EXPECTED_SHAPES) - seen}"


# ---------------------------------------------------------------------------------------------- start / stop
def test_stop_then_start_at_layer_equals_full_forward(small_model, pixels):
    x = pixels(small_model)
    n = small_model.cfg.n_layers
    with torch.no_grad():
        logits, cache = small_model.run_with_cache(x, names_filter=lambda k: "hook_resid" in k)
        for layer in range(n + 1):
            resid = small_model(x, stop_at_layer=layer)
            expected = cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
            torch.testing.assert_close(resid, expected, atol=1e-6, rtol=0)
            if layer < n:
                torch.testing.assert_close(small_model(resid, start_at_layer=layer), logits, atol=1e-6, rtol=0)
        resid = small_model(x, stop_at_layer=-1)  # negative layers count from the end
        torch.testing.assert_close(resid, cache[f"blocks.{n - 1}.hook_resid_pre"], atol=1e-6, rtol=0)
        torch.testing.assert_close(small_model(resid, start_at_layer=-1), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"stop_at_layer": 3}, r"stop_at_layer=3 is out of range: this model has 2 layers, accepted -2\.\.2"),
    ({"stop_at_layer": -3}, r"stop_at_layer=-3 is out of range.*accepted -2\.\.2"),
    ({"start_at_layer": 2}, r"start_at_layer=2 is out of range: this model has 2 layers, accepted -2\.\.1"),
    ({"start_at_layer": -3}, r"start_at_layer=-3 is out of range.*accepted -2\.\.1"),
])
def test_layer_out_of_range_names_the_valid_range(small_model, pixels, kwargs, match):
    x = pixels(small_model) if "stop_at_layer" in kwargs else small_model(pixels(small_model), stop_at_layer=0)
    with pytest.raises(ValueError, match=match):
        small_model(x, **kwargs)


# ---------------------------------------------------------------------------------------------- fast paths
def count_calls(monkeypatch, name: str) -> list[int]:
    """Count calls of torch.nn.functional.<name> (HookedViT's fast paths call it)."""
    calls = [0]
    original = getattr(F, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(F, name, wrapper)
    return calls


def test_fast_attention_equals_explicit(tiny_model, pixels, monkeypatch):
    x = pixels(tiny_model)
    n = tiny_model.cfg.n_layers
    sdpa_calls = count_calls(monkeypatch, "scaled_dot_product_attention")
    keep = lambda k: k.endswith("hook_resid_post")
    with torch.no_grad():
        fast, fast_cache = tiny_model.run_with_cache(x, names_filter=keep)
        assert sdpa_calls[0] == n  # no hook on scores or pattern: SDPA in every layer
        # a do-nothing hook on the pattern (one layer) or the scores (all others) forces the explicit path
        hooks = [("blocks.0.attn.hook_pattern", lambda t, hook: None)] + [
            (f"blocks.{l}.attn.hook_attn_scores", lambda t, hook: None) for l in range(1, n)]
        with tiny_model.hooks(fwd_hooks=hooks):
            explicit, explicit_cache = tiny_model.run_with_cache(x, names_filter=keep)
    assert sdpa_calls[0] == n
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=0)
    for key in fast_cache:
        torch.testing.assert_close(explicit_cache[key], fast_cache[key], atol=1e-5, rtol=0)


def test_fast_layernorm_equals_explicit(tiny_model, pixels, monkeypatch):
    x = pixels(tiny_model)
    n = tiny_model.cfg.n_layers
    ln_calls = count_calls(monkeypatch, "layer_norm")
    keep = lambda k: k.endswith(("hook_resid_mid", "hook_resid_post"))
    with torch.no_grad():
        fast, fast_cache = tiny_model.run_with_cache(x, names_filter=keep)
        assert ln_calls[0] == 2 * n + 1  # ln1, ln2 per block and ln_final, all fused
        with tiny_model.hooks(fwd_hooks=[(lambda k: k.endswith("hook_scale"), lambda t, hook: None)]):
            explicit, explicit_cache = tiny_model.run_with_cache(x, names_filter=keep)
    assert ln_calls[0] == 2 * n + 1  # a hook on hook_scale switches every norm to the explicit path
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=0)
    for key in fast_cache:
        torch.testing.assert_close(explicit_cache[key], fast_cache[key], atol=1e-5, rtol=0)


def test_backward_hooks_fire_on_fast_path_hook_points(small_model, pixels):
    """A backward hook alone (no forward hook) on the pattern or a norm's scale must fire."""
    grads: dict[str, torch.Size] = {}
    for name in ("blocks.0.attn.hook_pattern", "blocks.1.ln2.hook_scale"):
        small_model.add_hook(name, lambda g, hook: grads.__setitem__(hook.name, g.shape), dir="bwd")
    try:
        small_model(pixels(small_model)).sum().backward()
    finally:
        small_model.reset_hooks()
    n_ctx = small_model.cfg.n_ctx
    assert grads == {"blocks.0.attn.hook_pattern": torch.Size([2, 2, n_ctx, n_ctx]),
                     "blocks.1.ln2.hook_scale": torch.Size([2, n_ctx, 1])}


def test_use_attn_result_gives_the_same_logits(tiny_model, pixels):
    x = pixels(tiny_model)
    with torch.no_grad():
        plain = tiny_model(x)
        tiny_model.set_use_attn_result(True)
        per_head, cache = tiny_model.run_with_cache(x, names_filter=lambda k: k.endswith("attn.hook_result"))
        fast_per_head = tiny_model(x)
    assert len(cache) == tiny_model.cfg.n_layers
    torch.testing.assert_close(per_head, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_per_head, plain, atol=1e-5, rtol=0)


# the last block at the pooled token(s) only: (variant, the tokens the head reads, or None: every token)
POOLED_TOKENS = {
    "class_token": ("vit_small_patch16_224", SMALL, [0]),
    "clip_prenorm": (*VARIANTS["clip_prenorm"], [0]),
    "deit_distilled": (*VARIANTS["deit_distilled"], [0, 1]),
    "deit3_qk_norm": (*VARIANTS["deit3_qk_norm"], [0]),
    "registers_gap_fc_norm": (*VARIANTS["registers_gap_fc_norm"], None),
}


@pytest.mark.parametrize("variant", POOLED_TOKENS)
def test_last_block_at_the_pooled_tokens_equals_the_full_block(hooked_pair, pixels, variant, monkeypatch):
    name, kwargs, tokens = POOLED_TOKENS[variant]
    model = hooked_pair(name, **kwargs)[1]
    x = pixels(model)
    calls = []
    original = hooked_vit.model.TransformerBlock.forward_tokens
    monkeypatch.setattr(hooked_vit.model.TransformerBlock, "forward_tokens",
                        lambda self, r, t: calls.append(t) or original(self, r, t))
    last = model.cfg.n_layers - 1
    with torch.no_grad():
        fast = model(x)
        assert calls == ([tokens] if tokens else [])
        # a do-nothing hook on an activation of the other tokens forces the full last block
        with model.hooks(fwd_hooks=[(f"blocks.{last}.hook_resid_post", lambda t, hook: None)]):
            full = model(x)
        assert len(calls) == (1 if tokens else 0)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    # gradients through the short last block are the full block's
    xg = x.clone().requires_grad_(True)
    model(xg)[:, 0].sum().backward()
    fast_grad = xg.grad
    xg = x.clone().requires_grad_(True)
    with model.hooks(fwd_hooks=[(f"blocks.{last}.mlp.hook_post", lambda t, hook: None)]):
        model(xg)[:, 0].sum().backward()
    torch.testing.assert_close(fast_grad, xg.grad, atol=1e-5, rtol=1e-4)


def test_hooks_the_short_last_block_fires_see_every_token(small_model, pixels):
    """hook_resid_pre, ln1 and the keys and values of the last block keep the short path and their
    full shapes; an edit there changes the logits exactly as in the full block."""
    x = pixels(small_model)
    last = small_model.cfg.n_layers - 1
    shapes: dict[str, tuple[int, ...]] = {}

    def roll(t, hook):  # move every token's activation to the next token, and amplify it
        shapes[hook.name] = tuple(t.shape)
        return 10 * t.roll(1, dims=1)

    names = [f"blocks.{last}.hook_resid_pre", f"blocks.{last}.ln1.hook_normalized",
             f"blocks.{last}.attn.hook_k", f"blocks.{last}.attn.hook_v"]
    with torch.no_grad():
        _, cache = small_model.run_with_cache(x, names_filter="hook_pooled")
    clean = cache["hook_pooled"]
    for hook_name in names:
        pooled = {}
        keep = ("hook_pooled", lambda t, hook: pooled.__setitem__(len(pooled), t))
        with torch.no_grad(), small_model.hooks(fwd_hooks=[(hook_name, roll), keep]):
            assert small_model._head_tokens() == [0]
            short_logits = small_model(x)
            with small_model.hooks(fwd_hooks=[(f"blocks.{last}.hook_mlp_out", lambda t, hook: None)]):
                assert small_model._head_tokens() is None
                full_logits = small_model(x)
        assert shapes[hook_name][:2] == (2, small_model.cfg.n_ctx)
        short, full = pooled[0], pooled[1]
        assert (short - clean).abs().max() > 1e-3, hook_name  # the edit changed the pooled token
        torch.testing.assert_close(short, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(short_logits, full_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_hook_name_is_a_clear_error(small_model, pixels):
    x = pixels(small_model)
    match = r"unknown hook name 'blocks\.0\.hook_resid_psot'; did you mean blocks\.0\.hook_resid_post"
    with pytest.raises(ValueError, match=match):
        small_model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_psot", lambda t, hook: None)])
    typo = [("blocks.0.hook_resid_pre", lambda t, hook: None), ("blocks.0.hook_resid_psot", lambda t, hook: None)]
    with pytest.raises(ValueError, match=match), small_model.hooks(fwd_hooks=typo):
        pass
    with pytest.raises(ValueError, match=match):
        small_model.add_hook("blocks.0.hook_resid_psot", lambda t, hook: None)
    assert no_hooks_left(small_model)


def test_hook_result_without_use_attn_result_is_a_clear_error(small_model, pixels):
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        small_model.run_with_hooks(pixels(small_model), fwd_hooks=[("blocks.0.attn.hook_result", lambda t, hook: None)])
    with pytest.raises(ValueError, match=r"set_use_attn_result\(True\)"):
        small_model.add_hook("blocks.0.attn.hook_result", lambda t, hook: None)
    assert no_hooks_left(small_model)
    _, cache = small_model.run_with_cache(pixels(small_model))  # caching every hook point still works
    assert "blocks.0.attn.hook_result" not in cache.cache_dict


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 224, 224), r"expected pixels of shape \[batch, 3, H, W\], got \(3, 224, 224\)"),
    (torch.zeros(2, 1, 224, 224), r"expected pixels of shape \[batch, 3, H, W\], got \(2, 1, 224, 224\)"),
    (torch.zeros(2, 3, 200, 200), r"image size 200x200 does not match the model's 224x224"),
    ([[0.0]], r"expected pixels of shape \[batch, 3, H, W\], got list"),
])
def test_wrong_pixel_shape_is_a_clear_error(small_model, bad, match):
    with pytest.raises(ValueError, match=match):
        small_model(bad)


def test_start_at_layer_needs_a_residual_stream(small_model, pixels):
    with pytest.raises(ValueError, match=r"with start_at_layer, input must be the residual stream \[batch, pos, 64\]"):
        small_model(pixels(small_model), start_at_layer=1)


def test_run_with_cache_returns_a_vit_activation_cache(small_model, pixels):
    _logits, cache = small_model.run_with_cache(pixels(small_model, batch=1), remove_batch_dim=True)
    assert isinstance(cache, ViTActivationCache) and not cache.has_batch_dim
    assert cache["blocks.1.hook_resid_post"].shape == (small_model.cfg.n_ctx, small_model.cfg.d_model)
    assert cache["pattern", 1].shape == (2, small_model.cfg.n_ctx, small_model.cfg.n_ctx)  # TL shorthand
    _, raw = small_model.run_with_cache(pixels(small_model), return_cache_object=False)
    assert isinstance(raw, dict)


def test_run_with_cache_pos_slice_leaves_pooled_activations_alone(hooked_pair, pixels):
    """pos_slice cuts the token axis; pooled activations ([batch, d_model]) have none."""
    model = hooked_pair(*VARIANTS["registers_gap_fc_norm"][:1], **VARIANTS["registers_gap_fc_norm"][1])[1]
    x = pixels(model, batch=3)
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        _, sliced = model.run_with_cache(x, pos_slice=5)
    d, h = model.cfg.d_model, model.cfg.n_heads
    assert sliced["hook_pooled"].shape == (3, d) and sliced["fc_norm.hook_scale"].shape == (3, 1)
    assert sliced["blocks.1.hook_resid_post"].shape == (3, 1, d)
    assert sliced["blocks.1.attn.hook_z"].shape == (3, 1, h, model.cfg.d_head)
    assert sliced["blocks.1.attn.hook_pattern"].shape == (3, h, 1, model.cfg.n_ctx)
    torch.testing.assert_close(sliced["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, 5:6])
    torch.testing.assert_close(sliced["hook_pooled"], full["hook_pooled"])
    with pytest.raises(ValueError, match="remove_batch_dim needs a batch of one image, got 3"):
        model.run_with_cache(x, remove_batch_dim=True)


# ---------------------------------------------------------------------------------------------- grid helpers
GRIDS = [
    pytest.param("vit_tiny_patch16_224", {}, None, (14, 14), id="14x14"),
    pytest.param("vit_base_patch32_224", SMALL, None, (7, 7), id="7x7"),
    pytest.param("vit_base_patch16_384", SMALL, None, (24, 24), id="24x24"),
    pytest.param("vit_small_patch16_224", {**SMALL, "dynamic_img_size": True}, (160, 224), (10, 14),
                 id="dynamic_10x14"),
]


@pytest.mark.parametrize("name, kwargs, size, grid", GRIDS)
def test_to_grid_from_grid_round_trip(hooked_pair, pixels, name, kwargs, size, grid):
    model = hooked_pair(name, **kwargs)[1]
    x = pixels(model, size=size)
    assert model.grid_size_for(x) == grid
    gh, gw = grid
    grid_arg = grid if size else None
    # known answer: patch k sits at row k // gw, column k % gw
    index_grid = model.to_grid(torch.arange(gh * gw), grid_size=grid_arg)
    assert index_grid.shape == grid
    assert index_grid[1, 0] == gw and index_grid[gh - 1, gw - 1] == gh * gw - 1
    # per-patch values, with extra leading axes
    values = torch.randn(2, 5, gh * gw)
    assert torch.equal(model.from_grid(model.to_grid(values, grid_size=grid_arg)), values)
    # a per-token activation from the model: prefix tokens are dropped
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    per_token = cache["blocks.0.hook_resid_post"].norm(dim=-1)  # [batch, pos]
    g = model.to_grid(per_token, grid_size=grid_arg)
    assert g.shape == (2, gh, gw)
    assert torch.equal(model.from_grid(g), per_token[:, model.patch_positions(grid)])
    with pytest.raises(ValueError, match="fits neither"):
        model.to_grid(torch.zeros(gh * gw + 7), grid_size=grid)


@pytest.mark.parametrize("name, kwargs, expected", [
    ("vit_small_patch16_224", SMALL, {"class": [0]}),
    ("vit_base_patch16_reg4_gap_256", SMALL, {"registers": [0, 1, 2, 3]}),
    ("vit_small_patch14_reg4_dinov2", {**SMALL, "img_size": 56}, {"class": [0], "registers": [1, 2, 3, 4]}),
    ("deit_tiny_distilled_patch16_224", SMALL, {"class": [0], "distillation": [1]}),
])
def test_prefix_and_patch_positions(hooked_pair, pixels, name, kwargs, expected):
    model = hooked_pair(name, **kwargs)[1]
    assert model.prefix_positions == expected
    n_prefix = sum(len(v) for v in expected.values())
    assert torch.equal(model.patch_positions(), torch.arange(n_prefix, n_prefix + model.cfg.n_patches))
    with torch.no_grad():
        _, cache = model.run_with_cache(pixels(model), names_filter=["hook_embed", "hook_pos_embed",
                                                                     "blocks.0.hook_resid_pre"])
    resid, pos = cache["blocks.0.hook_resid_pre"], cache["hook_pos_embed"]
    # the positions hold what they say: each prefix token's parameter, then the patch embeddings
    params = {"class": model.cls_token, "registers": model.reg_token, "distillation": model.dist_token}
    for kind, idx in expected.items():
        torch.testing.assert_close(resid[:, idx], params[kind].detach().expand(2, -1, -1) + pos[:, idx])
    patches = model.patch_positions()
    torch.testing.assert_close(resid[:, patches], cache["hook_embed"] + pos[:, patches])


# ------------------------------------------------------------------------------------ dropping tokens
@pytest.mark.parametrize("kwargs", [{}, {"global_pool": "avg", "fc_norm": True}, {"reg_tokens": 2, "class_token": True}])
def test_forward_patches_drops_tokens_from_the_sequence(kwargs):
    """Keeping every patch is the plain forward; keeping some equals a model run on the shorter
    sequence built by hand (prefix tokens + kept patches, each with its own position embedding)."""
    model = HookedViT.from_timm("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, **kwargs).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    n, p = model.cfg.grid_size[0] * model.cfg.grid_size[1], model.cfg.n_prefix_tokens
    with torch.no_grad():
        every = torch.arange(n).expand(2, -1)
        torch.testing.assert_close(model.forward_patches(pixels, every), model(pixels), atol=1e-5, rtol=0)
        keep = torch.tensor([[0, 5, 7], [15, 3, 9]])
        resid = model.embed(pixels)
        by_hand = torch.stack([
            model(torch.cat([resid[i, :p], resid[i, p + keep[i]]])[None], start_at_layer=0)[0] for i in range(2)
        ])
        torch.testing.assert_close(model.forward_patches(pixels, keep), by_hand, atol=1e-5, rtol=0)
        assert not torch.allclose(model.forward_patches(pixels, keep), model(pixels), atol=1e-3)
        model.forward_patches(pixels, torch.zeros(2, 0, dtype=torch.long))  # prefix tokens only
    for bad, message in [(torch.tensor([[0, 0]] * 2), "twice"), (torch.tensor([[n]] * 2), "outside"),
                         (torch.tensor([[0.5]] * 2), "integer"), (torch.tensor([0, 1]), "integer")]:
        with pytest.raises(ValueError, match=message):
            model.forward_patches(pixels, bad)



def test_cfg_device_follows_the_parameters(small_model, pixels):
    """`cfg.device`, as TransformerLens' config has it, follows `.to()`; TransformerLens' patching utilities
    (which allocate on `model.cfg.device`) then run on a HookedViT as they are."""
    import pandas as pd
    from transformer_lens import patching

    model = small_model
    x = pixels(model, batch=1)
    assert model.cfg.device == torch.device("cpu")
    model.to(torch.float64).to(torch.float32)
    assert model.cfg.device == model.device == torch.device("cpu")
    with torch.inference_mode():
        _, cache = model.run_with_cache(x)
        index = pd.DataFrame([(0, 0), (0, 1)], columns=["layer", "pos"])
        out = patching.generic_activation_patch(model, x, cache, lambda logits: logits[0, 0],
                                                patching.layer_pos_patch_setter, "resid_pre", index_df=index)
    assert out.shape == (2,) and out.device == torch.device("cpu")
