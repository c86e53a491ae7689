"""ViTActivationCache: TransformerLens' analyses on a HookedViT cache, and exact direct logit attribution
for classes (components + biases sum to the real logits)."""

from __future__ import annotations

import pytest
import torch

from hooked_vit import HookedViT
from hooked_vit.cache import ViTActivationCache

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}
LOGIT_ATOL = 1e-4
RESID_ATOL = 1e-5

# token pooling + ln_final (real size), avg pooling + fc_norm (registers, no class token), and the
# other heads HookedViT supports: DeiT distilled (two heads), CLIP pre-norm, avg pooling + ln_final,
# DeiT-III LayerScale.
MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "gap_fc_norm": ("vit_base_patch16_reg4_gap_256", SMALL),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", SMALL),
    "clip_prenorm": ("vit_base_patch16_clip_224", SMALL),
    "gap_ln_final": ("vit_small_patch16_224", {**SMALL, "global_pool": "avg", "fc_norm": False}),
    "deit3_layerscale": ("deit3_small_patch16_224", SMALL),
}
BATCH = 3
CLASSES = torch.tensor([3, 517, 999])
INCORRECT = torch.tensor([0, 2, 3])

_RUNS: dict[str, tuple[HookedViT, torch.Tensor, ViTActivationCache]] = {}


@pytest.fixture(params=list(MODELS))
def run(request, hooked_pair, pixels) -> tuple[HookedViT, torch.Tensor, ViTActivationCache]:
    """(model, logits, cache) for each model in MODELS (one cached run per model, batch of 3)."""
    key = request.param
    if key not in _RUNS:
        name, kwargs = MODELS[key]
        model = hooked_pair(name, **kwargs)[1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(pixels(model, batch=BATCH))
        _RUNS[key] = (model, logits, cache)
    return _RUNS[key]


def final_resid(model: HookedViT, cache) -> torch.Tensor:
    return cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]


def close(actual, expected, atol):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------- decomposition
def test_run_with_cache_gives_a_vit_activation_cache(run):
    model, _, cache = run
    assert isinstance(cache, ViTActivationCache) and cache.model is model
    assert isinstance(cache.apply_slice_to_batch_dim([0, 2]), ViTActivationCache)


def test_decompose_resid_sums_to_the_residual_stream(run):
    model, _, cache = run
    with torch.no_grad():
        stack, labels = cache.decompose_resid(return_labels=True)
        n = model.cfg.n_layers
        expected_labels = ["embed", "pos_embed"] + (["ln_pre_bias"] if model.cfg.pre_norm else [])
        expected_labels += [f"{l}_{kind}" for l in range(n) for kind in ("attn_out", "mlp_out")]
        assert labels == expected_labels
        assert stack.shape == (len(labels), BATCH, model.cfg.n_ctx, model.cfg.d_model)
        close(stack.sum(0), final_resid(model, cache), RESID_ATOL)
        for layer in sorted({0, n // 2, n - 1}):
            close(cache.decompose_resid(layer=layer).sum(0), cache["resid_pre", layer], RESID_ATOL)
            close(cache.decompose_resid(layer=layer, mlp_input=True).sum(0), cache["resid_mid", layer], RESID_ATOL)
        # pos_slice: the class token (or first register) alone
        close(cache.decompose_resid(pos_slice=0).sum(0), final_resid(model, cache)[:, 0], RESID_ATOL)


def test_accumulated_resid(run):
    model, _, cache = run
    n = model.cfg.n_layers
    with torch.no_grad():
        acc, labels = cache.accumulated_resid(return_labels=True, incl_mid=True)
        assert labels[-1] == "final_post" and labels[:3] == ["0_pre", "0_mid", "1_pre"]
        close(acc[-1], final_resid(model, cache), 0)
        close(acc[1], cache["resid_mid", 0], 0)
        lens = cache.accumulated_resid(apply_ln=True)  # logit lens: the final norm, recomputed per stream
        assert lens.shape == (n + 1, BATCH, model.cfg.n_ctx, model.cfg.d_model)
        if model.ln_final is not None:
            close(lens[-1], cache["ln_final.hook_normalized"], RESID_ATOL)
        else:  # fc_norm acts after pooling: pool, then recompute the norm -> the model's normalised vector
            pooled = cache.pool_stack(cache.accumulated_resid())
            close(cache.apply_ln_to_stack(pooled, recompute_ln=True)[-1], cache["fc_norm.hook_normalized"], RESID_ATOL)


def test_apply_ln_to_stack_with_the_cached_scale(run):
    """Centre + divide by the cached final-norm scale, summed over components, times the norm's
    weight plus its bias, is the normalised stream the model computed."""
    model, _, cache = run
    with torch.no_grad():
        normed = cache.apply_ln_to_stack(cache.decompose_resid())
        norm = model.ln_final if model.ln_final is not None else model.fc_norm
        if model.ln_final is not None:
            close(normed.sum(0) * norm.w + norm.b, cache["ln_final.hook_normalized"], RESID_ATOL)
        else:
            close(cache.pool_stack(normed).sum(0) * norm.w + norm.b, cache["fc_norm.hook_normalized"], RESID_ATOL)
        # before a block: ln1 of layer 1
        ln1 = cache.apply_ln_to_stack(cache.decompose_resid(layer=1), layer=1)
        close(ln1.sum(0) * model.blocks[1].ln1.w + model.blocks[1].ln1.b, cache["blocks.1.ln1.hook_normalized"],
              RESID_ATOL)


def test_pool_stack_sums_to_the_pooled_stream(run):
    model, _, cache = run
    with torch.no_grad():
        stack = cache.decompose_resid()
        pooled = cache.pool_stack(stack)
        source = cache["ln_final.hook_normalized"] if model.ln_final is not None else final_resid(model, cache)
        summed = cache.pool_stack(source[None])[0]
    if model.cfg.distilled:
        assert pooled.shape == (len(stack), BATCH, 2, model.cfg.d_model)
    close(summed, cache["hook_pooled"], RESID_ATOL)
    if model.ln_final is None:
        close(pooled.sum(0), cache["hook_pooled"], RESID_ATOL)


# ---------------------------------------------------------------------------------------------- heads
def test_head_results_sum_to_attn_out_minus_b_O(run):
    model, _, cache = run
    n, h = model.cfg.n_layers, model.cfg.n_heads
    with torch.no_grad():
        heads, labels = cache.stack_head_results(return_labels=True)
        assert labels[: h + 1] == [f"L0H{i}" for i in range(h)] + ["L1H0"] and len(labels) == n * h
        assert heads.shape == (n * h, BATCH, model.cfg.n_ctx, model.cfg.d_model)
        for layer in range(n):
            per_layer = heads[layer * h:(layer + 1) * h].sum(0)
            close(per_layer, cache["attn_out", layer] - model.blocks[layer].attn.b_O, RESID_ATOL)
        with_rest = cache.stack_head_results(incl_remainder=True)
        close(with_rest.sum(0), final_resid(model, cache), RESID_ATOL)


def test_computed_head_results_equal_the_models_per_head_results(hooked_pair, pixels):
    """compute_head_results (from hook_z and W_O, LayerScale included) == use_attn_result's hook_result."""
    model = hooked_pair("deit3_small_patch16_224", **SMALL)[1]
    x = pixels(model)
    with torch.no_grad():
        _, computed = model.run_with_cache(x)
        model.set_use_attn_result(True)
        _, cached = model.run_with_cache(x)
    assert "blocks.0.attn.hook_result" not in computed.cache_dict
    computed.compute_head_results()
    for layer in range(model.cfg.n_layers):
        key = f"blocks.{layer}.attn.hook_result"
        close(computed[key], cached[key], RESID_ATOL)
    close(cached.stack_head_results(), computed.stack_head_results(), RESID_ATOL)


def test_stack_results_at_layer_zero(run):
    model, _, cache = run
    empty, labels = cache.stack_head_results(layer=0, return_labels=True)
    assert empty.shape == (0, BATCH, model.cfg.n_ctx, model.cfg.d_model) and labels == []
    rest = cache.stack_head_results(layer=0, incl_remainder=True)
    close(rest[0], cache["resid_pre", 0], 0)
    assert cache.stack_neuron_results(0).shape[0] == 0


def test_full_resid_decomposition_sums_to_the_residual_stream(run):
    model, _, cache = run
    with torch.no_grad():
        stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
        assert labels[-1] == "bias" and "embed" in labels and "L0H0" in labels and "1_mlp_out" in labels
        close(stack.sum(0), final_resid(model, cache), RESID_ATOL)
        mid = cache.get_full_resid_decomposition(layer=1, mlp_input=True, expand_neurons=False)
        close(mid.sum(0), cache["resid_mid", 1], RESID_ATOL)
        if model.cfg.d_model <= 64:  # one row per neuron: small models only
            neurons = cache.get_full_resid_decomposition(pos_slice=0)
            assert neurons.shape[0] == model.cfg.n_layers * (model.cfg.n_heads + model.cfg.d_mlp) + len(
                [x for x in labels if x in ("embed", "pos_embed", "ln_pre_bias", "bias")])
            close(neurons.sum(0), final_resid(model, cache)[:, 0], RESID_ATOL)


# ---------------------------------------------------------------------------------------------- logits
def test_direct_logit_attribution_sums_to_the_logits(run):
    """Per component: logit_attrs(stack, classes).sum(0) + logit_bias(classes) == logits[b, classes]."""
    model, logits, cache = run
    classes = CLASSES % model.cfg.n_classes
    picked = logits[torch.arange(BATCH), classes]
    with torch.no_grad():
        for stack in (cache.decompose_resid(), cache.stack_head_results(incl_remainder=True),
                      cache.get_full_resid_decomposition(expand_neurons=False)):
            attrs = cache.logit_attrs(stack, classes)
            assert attrs.shape == (stack.shape[0], BATCH)
            close(attrs.sum(0) + cache.logit_bias(classes), picked, LOGIT_ATOL)
        # logit differences
        diff = cache.logit_attrs(cache.decompose_resid(), classes, incorrect_classes=INCORRECT)
        close(diff.sum(0) + cache.logit_bias(classes, INCORRECT),
              picked - logits[torch.arange(BATCH), INCORRECT], LOGIT_ATOL)
        # one class for the whole batch
        one = cache.logit_attrs(cache.decompose_resid(), 7)
        close(one.sum(0) + cache.logit_bias(7), logits[:, 7], LOGIT_ATOL)
        # every class at once
        contributions = cache.logit_contributions(cache.decompose_resid())
        assert contributions.shape == (len(cache.decompose_resid()), BATCH, model.cfg.n_classes)
        close(contributions.sum(0) + cache.logit_bias(), logits, LOGIT_ATOL)
    assert logits.std() > 0.1  # the sums compare non-trivial logits


@pytest.mark.parametrize("run", ["gap_fc_norm"], indirect=True)
def test_fc_norm_attribution_is_pool_then_scale_then_unembed(run):
    """The recipe spelled out for a pooled-then-normalised model: pool the components, centre, divide
    by fc_norm's cached scale, multiply by its weight, then W_U; the biases b_fc @ W_U + b_U."""
    model, logits, cache = run
    assert model.fc_norm is not None and model.cfg.pooling == "avg"
    with torch.no_grad():
        pooled = cache.pool_stack(cache.decompose_resid())  # [components, batch, d_model]
        centred = pooled - pooled.mean(-1, keepdim=True)
        per_component = centred / cache["fc_norm.hook_scale"] * model.fc_norm.w @ model.W_U
        bias = model.fc_norm.b @ model.W_U + model.b_U
    close(per_component.sum(0) + bias, logits, LOGIT_ATOL)
    close(per_component, cache.logit_contributions(cache.decompose_resid()), LOGIT_ATOL)


def test_per_position_attributions_sum_to_the_pooled_one(run):
    model, _, cache = run
    classes = CLASSES % model.cfg.n_classes
    with torch.no_grad():
        stack = cache.decompose_resid()
        pooled = cache.logit_attrs(stack, classes)
        per_pos = cache.logit_attrs(stack, classes, pos_slice=slice(None))
        assert per_pos.shape == (len(stack), BATCH, model.cfg.n_ctx)
        close(per_pos.sum(-1), pooled, LOGIT_ATOL)
        if model.cfg.pooling == "token" and not model.cfg.distilled:
            # TransformerLens' idiom: a stack at the class token with pos_slice=0 gives the pooled attribution
            close(cache.logit_attrs(stack[:, :, 0], classes, pos_slice=0), pooled, LOGIT_ATOL)
            assert torch.all(per_pos[..., 1:] == 0)  # patches reach the logits only through the class token
        if model.cfg.pooling == "avg":
            patches = model.patch_positions()
            sub = cache.logit_attrs(stack[:, :, patches], classes, pos_slice=patches)
            close(sub.sum(-1), pooled, LOGIT_ATOL)


def test_logit_attrs_errors(run):
    model, _, cache = run
    stack = cache.decompose_resid()
    with pytest.raises(ValueError, match=r"class index out of range: accepted 0\.\.\d+"):
        cache.logit_attrs(stack, model.cfg.n_classes)
    with pytest.raises(ValueError, match="classes and incorrect_classes must have the same shape"):
        cache.logit_attrs(stack, CLASSES % model.cfg.n_classes, incorrect_classes=1)
    with pytest.raises(ValueError, match=r"pos_slice= the positions it was sliced at"):
        cache.logit_attrs(stack[:, :, :5], 1)


@pytest.mark.parametrize("pooling", ["max", "avgmax"])
def test_nonlinear_pooling_raises_a_clear_error(hooked_pair, pixels, pooling):
    model = hooked_pair("vit_small_patch16_224", global_pool=pooling, **SMALL)[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(pixels(model))
    stack = cache.decompose_resid()  # the decomposition itself is fine
    close(stack.sum(0), final_resid(model, cache), RESID_ATOL)
    for call in (lambda: cache.logit_attrs(stack, 1), lambda: cache.logit_contributions(stack),
                 lambda: cache.logit_bias(1), lambda: cache.pool_stack(stack)):
        with pytest.raises(ValueError, match=rf"pooling='{pooling}' is not linear"):
            call()


@pytest.mark.parametrize("key", ["gap_fc_norm", "deit_distilled"])
def test_attribution_on_a_cache_without_batch_axis(hooked_pair, pixels, key):
    """run_with_cache(remove_batch_dim=True) (one image): the same identities, with no batch axis."""
    name, kwargs = MODELS[key]
    model = hooked_pair(name, **kwargs)[1]
    with torch.no_grad():
        logits, cache = model.run_with_cache(pixels(model, batch=1), remove_batch_dim=True)
        stack = cache.decompose_resid()
        assert stack.shape == (6, model.cfg.n_ctx, model.cfg.d_model)
        attrs = cache.logit_attrs(stack, 5)
        assert attrs.shape == (6,)
        close(attrs.sum(0) + cache.logit_bias(5), logits[0, 5], LOGIT_ATOL)
        close(cache.logit_contributions(stack).sum(0) + cache.logit_bias(), logits[0], LOGIT_ATOL)
