"""HookedViT computes the same function as its timm source (random weights, fp32, no network).

For every supported family: the logits agree to 1e-4 and the residual stream after every block
(`blocks.{l}.hook_resid_post`) equals timm's block output (captured with forward hooks on
`timm_model.blocks[l]`) to 1e-5, on the fast path (no hooks: SDPA, fused LayerNorm) and on the
explicit path that `run_with_cache` takes (every hook attached). Weights that timm initialises to
constants (LayerScale, tokens, position embeddings, biases, norm gains) are perturbed first (see
conftest.py), so a dropped or swapped parameter shows.

The big families are shrunk with timm kwargs (`depth=2` ...) to keep CI fast, except one real-size
ViT-Base (12 blocks, width 768).
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import GluMlp, SwiGLU, SwiGLUPacked

from hooked_vit import HookedViT

LOGIT_ATOL = 1e-4
RESID_ATOL = 1e-5
BATCH = 2

# (timm name, timm kwargs, input size (None: native), expected config fields)
CASES = [
    pytest.param("vit_tiny_patch16_224", {}, None,
                 {"n_layers": 12, "grid_size": (14, 14), "n_prefix_tokens": 1, "pooling": "token"}, id="vit_tiny"),
    pytest.param("vit_small_patch16_224", {}, None, {"n_layers": 12, "d_model": 384}, id="vit_small"),
    pytest.param("vit_base_patch16_224", {}, None, {"n_layers": 12, "d_model": 768, "n_heads": 12},
                 id="vit_base_real_size"),
    pytest.param("vit_base_patch32_224", {"depth": 2}, None, {"grid_size": (7, 7), "patch_size": (32, 32)},
                 id="vit_base_patch32"),
    pytest.param("vit_base_patch16_384", {"depth": 2}, None, {"grid_size": (24, 24), "img_size": (384, 384)},
                 id="vit_base_384"),
    pytest.param("deit_tiny_distilled_patch16_224", {}, None, {"distilled": True, "n_prefix_tokens": 2},
                 id="deit_distilled"),
    pytest.param("deit3_small_patch16_224", {"depth": 4}, None, {"layer_scale": True, "no_embed_class": True},
                 id="deit3_layerscale"),
    pytest.param("vit_base_patch16_reg4_gap_256", {"depth": 2}, None,
                 {"n_registers": 4, "class_token": False, "pooling": "avg", "fc_norm": True, "grid_size": (16, 16)},
                 id="registers_gap"),
    pytest.param("vit_small_patch14_dinov2", {"img_size": 224, "depth": 4}, None,
                 {"patch_size": (14, 14), "grid_size": (16, 16), "layer_scale": True, "n_classes": 0},
                 id="dinov2"),
    pytest.param("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 4}, None,
                 {"n_registers": 4, "class_token": True, "no_embed_class": True, "layer_scale": True},
                 id="dinov2_registers"),
    pytest.param("vit_base_patch16_clip_224", {"depth": 2}, None, {"pre_norm": True, "act_fn": "gelu"},
                 id="clip_prenorm"),
    pytest.param("vit_base_patch16_clip_quickgelu_224", {"depth": 2}, None,
                 {"pre_norm": True, "act_fn": "quick_gelu"}, id="clip_quickgelu"),
    pytest.param("vit_small_patch16_224", {"global_pool": "avg", "depth": 4}, None,
                 {"pooling": "avg", "fc_norm": True}, id="gap_fc_norm"),
    pytest.param("vit_small_patch16_224", {"global_pool": "avg", "fc_norm": False, "depth": 4}, None,
                 {"pooling": "avg", "fc_norm": False}, id="gap_ln_final"),
    pytest.param("vit_small_patch16_224", {"global_pool": "max", "depth": 2}, None, {"pooling": "max"},
                 id="max_pool"),
    pytest.param("vit_small_patch16_224", {"global_pool": "avgmax", "depth": 2}, None, {"pooling": "avgmax"},
                 id="avgmax_pool"),
    pytest.param("vit_small_patch16_224", {"qk_norm": True, "depth": 4}, None, {"qk_norm": True}, id="qk_norm"),
    pytest.param("vit_small_patch16_224", {"dynamic_img_size": True, "depth": 4}, (160, 224),
                 {"dynamic_img_size": True}, id="dynamic_160x224"),
    pytest.param("vit_small_patch16_224", {"dynamic_img_size": True, "depth": 4}, None,
                 {"dynamic_img_size": True}, id="dynamic_native"),
    pytest.param("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 2, "dynamic_img_size": True},
                 (112, 168), {"dynamic_img_size": True, "no_embed_class": True}, id="dynamic_dinov2_registers"),
    pytest.param("vit_base_patch16_siglip_224", {"depth": 2, "embed_dim": 64, "num_heads": 2}, None,
                 {"pooling": "map", "class_token": False, "n_prefix_tokens": 0}, id="siglip_map"),
    pytest.param("vit_small_patch16_224", {"global_pool": "map", "depth": 2}, None,
                 {"pooling": "map", "class_token": True}, id="map_beside_class_token"),
    pytest.param("vit_small_patch16_224", {"mlp_layer": SwiGLU, "act_layer": "silu", "depth": 2}, None,
                 {"gated_mlp": True, "act_fn": "silu", "d_mlp": 1536}, id="swiglu"),
    pytest.param("vit_small_patch16_224", {"mlp_layer": SwiGLUPacked, "act_layer": "silu", "depth": 2}, None,
                 {"gated_mlp": True, "d_mlp": 768}, id="swiglu_packed"),
    pytest.param("vit_small_patch16_224", {"mlp_layer": GluMlp, "act_layer": "gelu", "depth": 2}, None,
                 {"gated_mlp": True, "act_fn": "gelu", "d_mlp": 768}, id="glu_gate_last"),
    pytest.param("vit_small_patch16_224", {"mlp_layer": SwiGLU, "act_layer": "silu", "global_pool": "map",
                                           "class_token": False, "depth": 2}, None,
                 {"gated_mlp": True, "pooling": "map"}, id="swiglu_map"),
]


def timm_block_outputs(timm_model, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's logits and the output of each of its blocks (forward hooks on `blocks[l]`)."""
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach())) for b in timm_model.blocks]
    try:
        with torch.no_grad():
            logits = timm_model(pixels)
    finally:
        for h in handles:
            h.remove()
    assert len(outputs) == len(timm_model.blocks)
    return logits, outputs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name, timm_kwargs, size, expected_cfg", CASES)
def test_parity_with_timm(hooked_pair, pixels, name, timm_kwargs, size, expected_cfg):
    timm_model, model = hooked_pair(name, **timm_kwargs)
    for field, value in expected_cfg.items():
        assert getattr(model.cfg, field) == value, f"cfg.{field}"
    x = pixels(model, batch=BATCH, size=size)
    timm_logits, timm_blocks = timm_block_outputs(timm_model, x)
    assert timm_logits.std() > 1e-2  # the comparison below is not between near-constants

    with torch.no_grad():
        fast_logits = model(x)  # fast path: no hooks at all
        _, resid_cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
        explicit_logits, full_cache = model.run_with_cache(x)  # every hook attached: explicit attention and LN

    assert max_diff(fast_logits, timm_logits) <= LOGIT_ATOL
    assert max_diff(explicit_logits, timm_logits) <= LOGIT_ATOL
    n_tokens = model.cfg.n_prefix_tokens + (size[0] // model.cfg.patch_size[0]) * (size[1] // model.cfg.patch_size[1]) \
        if size else model.cfg.n_ctx
    for layer, timm_out in enumerate(timm_blocks):
        assert timm_out.shape == (BATCH, n_tokens, model.cfg.d_model)
        key = f"blocks.{layer}.hook_resid_post"
        assert max_diff(resid_cache[key], timm_out) <= RESID_ATOL, f"fast path, {key}"
        assert max_diff(full_cache[key], timm_out) <= RESID_ATOL, f"explicit path, {key}"


def test_parity_on_a_single_image_batch_shape_and_dtype(hooked_pair, pixels):
    """Batch of one and float64 (dtype= converts the whole model)."""
    timm_model, _ = hooked_pair("vit_small_patch16_224", depth=2, embed_dim=64, num_heads=2)
    timm64 = copy.deepcopy(timm_model).double()  # the shared fixture stays fp32
    model64 = HookedViT.from_timm(timm_model, dtype=torch.float64)
    x = pixels(model64, batch=1).double()
    with torch.no_grad():
        ref, out = timm64(x), model64(x)
    assert out.dtype == torch.float64 and out.shape == ref.shape == (1, 1000)
    assert max_diff(out, ref) <= 1e-10


def test_fixed_size_model_rejects_other_image_sizes(hooked_pair, pixels):
    _, model = hooked_pair("vit_small_patch16_224", depth=2, embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match=r"160x224 does not match the model's 224x224.*dynamic_img_size=True"):
        model(pixels(model, size=(160, 224)))


def test_dynamic_model_rejects_sizes_not_divisible_by_the_patch(hooked_pair, pixels):
    _, model = hooked_pair("vit_small_patch16_224", dynamic_img_size=True, depth=4)
    with pytest.raises(ValueError, match=r"150x224 is not a positive multiple of the patch size 16x16"):
        model(pixels(model, size=(150, 224)))
