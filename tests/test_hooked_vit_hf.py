"""`HookedViT.from_hf`: Hugging Face ViT, DeiT, DINOv2, CLIP and SigLIP vision towers as HookedViT.

Random small configs (experiments/parity_hf.py builds them; no network): parity with the source for every
convertible class, folders written by `save_pretrained` loaded offline, preprocessing equal to the image
processor's own output, the refusals, the headless models' heads (CLIP / SigLIP zero-shot, a linear
probe), the patching engine (sweeps, CAAP, path patching) against one full Hugging Face forward per
intervention, and every baseline with its invariants.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import scramble

from caap.attribution.caap import CAAP
from caap.patching import path_patch, sweep
from caap.patching.scores import logit_score
from hooked_vit import HookedViT, UnsupportedFeature, UnsupportedTimmFeature
from hooked_vit.hf import HF_CLASSES, hf_reference_output
from hooked_vit.loading import ConversionMismatch

TOL = 1e-5
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load_experiment(name: str):
    """An experiments/ script as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


P = _load_experiment("parity_hf")


def images(n: int = 2, seed: int = 0, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- parity
def test_every_convertible_class_has_a_case():
    assert {cls for cls, _ in P.CASES.values()} == set(HF_CLASSES)


@pytest.mark.parametrize("case", list(P.CASES))
def test_parity_with_the_source(case):
    """Output (fast path and every hook attached), every block's output, and other image sizes with the
    position embeddings interpolated as the source does: all within 1e-5 of the source in fp32."""
    r = P.parity(case)
    assert r["scale"] > 0.1  # the comparison is not between near-zeros
    for key in ("fast", "explicit", "blocks", "other_sizes"):
        assert r[key] <= TOL, f"{case}: {key} differs by {r[key]:.2e}"


EXPECTED = {
    "vit": {"class_token": True, "pooling": "token", "n_classes": 10, "pos_embed_antialias": False},
    "vit_gelu_new_no_qkv_bias": {"act_fn": "gelu_tanh", "qkv_bias": False},
    "vit_features": {"n_classes": 0, "pooling": "token"},
    "deit_teacher": {"distilled": True, "dist_head": True, "n_prefix_tokens": 2},
    "deit": {"distilled": True, "dist_head": False, "n_prefix_tokens": 2},
    "dinov2": {"pooling": "token_avg", "layer_scale": True, "dynamic_img_size": True, "d_features": 64},
    "dinov2_swiglu": {"gated_mlp": True, "act_fn": "silu", "d_mlp": 88},
    "dinov2_registers": {"n_registers": 2, "no_embed_class": True, "pos_embed_antialias": True},
    "clip_features": {"pre_norm": True, "fc_norm": True, "act_fn": "quick_gelu", "patch_bias": False, "n_classes": 0},
    "clip_projection": {"proj_dim": 16, "d_features": 16},
    "clip_classifier": {"pooling": "avg", "final_norm": False},
    "siglip_features": {"class_token": False, "pooling": "map", "act_fn": "gelu_tanh", "n_prefix_tokens": 0},
    "siglip_no_head": {"pooling": "avg"},
    "siglip_classifier": {"pooling": "avg", "n_classes": 10},
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_config_read_off_the_source(case):
    cfg = P.convert(P.build(case)).cfg
    for name, value in EXPECTED[case].items():
        assert getattr(cfg, name) == value, f"{case}: cfg.{name}"


def test_dtype_and_device_arguments():
    model = P.build("vit")
    hooked64 = HookedViT.from_hf(model, dtype=torch.float64, processor=_processor("vit"))
    x = images(1).double()
    with torch.no_grad():
        ref = hf_reference_output(model.double(), x)
        assert hooked64(x).dtype == torch.float64
        assert (hooked64(x) - ref).abs().max() <= 1e-12
    model.float()


# ---------------------------------------------------------------------------------------------- folders, processors
PROCESSORS = {  # processors for the 32x32 random models, one per family, in the shapes the hub uses
    "vit": lambda: transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
    "deit": lambda: transformers.DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32},
                                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "dinov2": lambda: transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "clip": lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "siglip": lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
}


def _processor(case: str):
    family = HF_CLASSES[P.CASES[case][0]].family
    return PROCESSORS[family.removesuffix("_registers")]()


photo, synthetic = P.photo, P.synthetic


@pytest.mark.parametrize("case", ["vit", "deit_teacher", "dinov2_swiglu", "dinov2_registers", "clip_projection",
                                  "siglip_features"])
def test_save_pretrained_folder_loads_offline(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = P.build(case), _processor(case)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder's processor is used: no fallback warning
        hooked = HookedViT.from_hf(tmp_path)
    x = images()
    with torch.no_grad():
        assert (hooked(x) - hf_reference_output(model, x)).abs().max() <= TOL
    reloaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    for image in (photo(), synthetic()):
        expected = reloaded(images=image, return_tensors="pt")["pixel_values"]
        assert (hooked.preprocess(image) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", list(P.PROCESSOR_CASES))
def test_preprocess_equals_the_processors_own_output(case):
    """Each family's processor with its published checkpoints' settings, on a real photo and a synthetic image."""
    assert P.preprocessing_parity(case) <= 1e-5


def test_model_object_without_processor_warns_and_resizes_to_its_size():
    model = P.build("clip_features")
    with pytest.warns(UserWarning, match="no image processor given.*resizes to 32x32"):
        hooked = HookedViT.from_hf(model)
    assert hooked.data_config["input_size"] == (3, 32, 32)
    assert hooked.preprocess(synthetic()).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- refusals
def _swin():
    return transformers.SwinModel(transformers.SwinConfig(embed_dim=16, depths=[1], num_heads=[1], image_size=32,
                                                          patch_size=4, window_size=2))


def test_unsupported_architectures_are_refused_naming_the_supported_ones():
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    for model, why in ((_swin(), "Swin"), (resnet, "a CNN")):
        with pytest.raises(UnsupportedFeature, match=rf"is not a Hugging Face vision transformer.*{why}.*supported: "
                                                     r"ViTModel, ViTForImageClassification"):
            HookedViT.from_hf(model)
    assert UnsupportedTimmFeature is UnsupportedFeature  # one error type for both sources


def test_folder_refusals_come_before_the_weights_are_read(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        pytest.fail("the weights were read")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))
    swin = tmp_path / "swin"
    _swin().save_pretrained(swin)
    with pytest.raises(UnsupportedFeature, match="SwinModel is not a Hugging Face vision transformer"):
        HookedViT.from_hf(swin)
    odd = tmp_path / "odd"
    transformers.ViTModel(transformers.ViTConfig(**P.SMALL, hidden_act="gelu_accurate")).save_pretrained(odd)
    with pytest.raises(UnsupportedFeature, match=r"hidden_act='gelu_accurate'.*supported: gelu"):
        HookedViT.from_hf(odd)
    config_only = tmp_path / "config_only"
    transformers.ViTConfig(**P.SMALL, architectures=["ViTModel"]).save_pretrained(config_only)
    with pytest.raises(ValueError, match="holds no weights"):
        HookedViT.from_hf(config_only)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        HookedViT.from_hf(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        HookedViT.from_hf(tmp_path)


def test_config_options_the_conversion_does_not_handle_are_refused():
    odd = transformers.ViTModel(transformers.ViTConfig(**{**P.SMALL, "image_size": 30}))
    with pytest.raises(UnsupportedFeature, match=r"image_size 30 not divisible by patch_size 8"):
        HookedViT.from_hf(odd)
    with pytest.raises(TypeError, match="expected a transformers model or a folder"):
        HookedViT.from_hf(42)


def test_a_processor_for_another_image_size_is_refused():
    model = P.build("vit")
    with pytest.raises(ValueError, match=r"ViTImageProcessor makes 224x224 images but the model takes 32x32.*"
                                         r"dynamic_img_size=True"):
        HookedViT.from_hf(model, processor=transformers.ViTImageProcessor())
    hooked = HookedViT.from_hf(model, processor=transformers.ViTImageProcessor(), dynamic_img_size=True)
    assert hooked.preprocess(synthetic()).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="not a multiple of the model's patch size"):
        HookedViT.from_hf(model, processor=transformers.ViTImageProcessor(size={"height": 30, "width": 30}),
                          dynamic_img_size=True)
    with pytest.raises(ValueError, match="backend"):
        HookedViT.from_hf(model, processor=transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}))
    with pytest.raises(UnsupportedFeature, match="always interpolates"):
        HookedViT.from_hf(P.build("dinov2"), dynamic_img_size=False, processor=_processor("dinov2"))


def test_a_conversion_that_differs_from_its_source_is_refused(monkeypatch):
    """The check at load: swapping two blocks' query weights gives a model that runs but is not the source."""
    import hooked_vit.hf as hf

    real = hf.convert_hf_state_dict

    def swapped(model, name):
        state = real(model, name)
        a, b = state["blocks.0.attn.qkv.weight"].clone(), state["blocks.1.attn.qkv.weight"].clone()
        return {**state, "blocks.0.attn.qkv.weight": b, "blocks.1.attn.qkv.weight": a}

    monkeypatch.setattr(hf, "convert_hf_state_dict", swapped)
    with pytest.raises(ConversionMismatch, match=r"differs from the ViTForImageClassification it came from on the check input by up to"):
        HookedViT.from_hf(P.build("vit"), processor=_processor("vit"))
    hooked = HookedViT.from_hf(P.build("vit"), processor=_processor("vit"), check=False)  # the check can be skipped
    assert hooked.cfg.n_classes == 10


def test_parameters_the_conversion_does_not_know_are_refused():
    model = P.build("vit")
    model.vit.layers[0].extra = torch.nn.Linear(2, 2)  # a variant with a module the source's forward may use
    with pytest.raises(UnsupportedFeature, match=r"parameters the conversion does not know \(layers\.0\.extra\.weight"):
        HookedViT.from_hf(model, processor=_processor("vit"))


# ---------------------------------------------------------------------------------------------- heads for headless models
def _text_features(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(input_ids=ids)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def clip_zero_shot(case: str = "clip_model", n_classes: int = 10):
    """(CLIPModel or SiglipModel, its HookedViT with a zero-shot head on n_classes random prompts, the prompts'
    token ids): the HookedViT's logits are the source's `logits_per_image`."""
    model = P.build(case)
    ids = torch.randint(3, 99, (n_classes, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = _text_features(model, ids)
    hooked = P.convert(model)
    bias = float(model.logit_bias.detach()) if hasattr(model, "logit_bias") else 0.0
    hooked.set_zero_shot_head(emb, logit_scale=float(model.logit_scale.detach().exp()), logit_bias=bias)
    return model, hooked, ids


@pytest.mark.parametrize("case", ["clip_model", "siglip_model"])
def test_zero_shot_head_equals_the_sources_logits_per_image(case):
    model, hooked, ids = clip_zero_shot(case)
    x = images(3)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=x).logits_per_image
        out, cache = hooked.run_with_cache(x)
    assert out.shape == ref.shape == (3, 10)
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))
    assert cache["feature_norm.hook_scale"].shape == (3, 1)
    assert hooked.cfg.normalize_features and hooked.cfg.n_classes == 10


def test_set_head_is_a_linear_probe_on_the_features():
    model = P.build("dinov2_features")
    hooked = P.convert(model)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(7, 32, generator=g), torch.randn(7, generator=g)
    x = images()
    with torch.no_grad():
        features = hf_reference_output(model, x)
        assert (hooked.set_head(w, b)(x) - (features @ w.T + b)).abs().max() <= TOL
    assert hooked.cfg.n_classes == 7 and hooked.W_U.shape == (32, 7)
    with pytest.raises(ValueError, match=r"weight must be a float tensor \[n_classes, 32\]"):
        hooked.set_head(torch.randn(7, 31))
    with pytest.raises(ValueError, match=r"bias must be \[n_classes=7\]"):
        hooked.set_head(w, torch.randn(6))
    with pytest.raises(ValueError, match="every class embedding must be finite and non-zero"):
        hooked.set_zero_shot_head(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="logit_scale must be a positive number"):
        hooked.set_zero_shot_head(torch.randn(3, 32), logit_scale=-1.0)


# ---------------------------------------------------------------------------------------------- the engine vs Hugging Face
def scored(case: str):
    """(source model, HookedViT, logits_fn(pixels) through the source only): classifiers as they are,
    CLIP / SigLIP with a zero-shot head (the source's own `logits_per_image`), other headless models with
    a linear head applied to the source's features."""
    if case in ("clip_model", "siglip_model"):
        model, hooked, ids = clip_zero_shot(case)
        return model, hooked, lambda x: model(input_ids=ids, pixel_values=x).logits_per_image
    model = P.build(case)
    hooked = P.convert(model)
    if hooked.cfg.n_classes:
        return model, hooked, lambda x: hf_reference_output(model, x)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(10, hooked.cfg.d_features, generator=g) / math.sqrt(hooked.cfg.d_features)
    hooked.set_head(w)
    return model, hooked, lambda x: hf_reference_output(model, x) @ w.T


def hf_layer_inputs(model, x: torch.Tensor, logits_fn) -> list[torch.Tensor]:
    """The hidden states entering each of the source's layers (HookedViT's `blocks.{l}.hook_resid_pre`)."""
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in P.layers_of(model)]
    try:
        with torch.no_grad():
            logits_fn(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def hf_patched(model, x: torch.Tensor, logits_fn, writes: dict[int, list[int]], source: list[torch.Tensor]):
    """One full forward of the source model on `x` with the hidden states entering layer l at positions
    writes[l] taken from `source` (its layer inputs on the source image)."""
    layers = P.layers_of(model)

    def make(layer: int):
        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, writes[layer]] = source[layer][:, writes[layer]]
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        return pre

    handles = [layers[layer].register_forward_pre_hook(make(layer), with_kwargs=True) for layer in writes]
    try:
        with torch.no_grad():
            return logits_fn(x)
    finally:
        for h in handles:
            h.remove()


ENGINE_CASES = ["vit", "deit_teacher", "dinov2_swiglu", "dinov2_registers", "clip_model", "clip_classifier",
                "siglip_model", "siglip_features"]


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_sweep_equals_one_hf_forward_per_intervention(case):
    model, hooked, logits_fn = scored(case)
    x = images(2, seed=5)
    source, context = x[:1], x[1:]
    target = 3
    result = sweep(hooked, source, context, logit_score(target), component="resid_pre", batch_size=7, progress=False)
    src = hf_layer_inputs(model, source, logits_fn)
    n_pos = hooked.cfg.n_ctx
    ref = torch.tensor([[float(hf_patched(model, context, logits_fn, {layer: [p]}, src)[0, target])
                         for p in range(n_pos)] for layer in range(hooked.cfg.n_layers)])
    assert result.values.shape == (1, hooked.cfg.n_layers, n_pos)
    assert (result.values[0] - ref).abs().max() <= 1e-4
    assert float(ref.std()) > 1e-3  # the patches matter: the comparison is not between constants


@pytest.mark.parametrize("case", ["vit", "dinov2_registers", "clip_model", "siglip_features"])
def test_caap_equals_one_hf_forward_per_patch(case):
    """CAAP (resid_pre at every block of the range, at one patch token) against the source model patched by
    hand, one forward per patch, in the same context (a given image)."""
    model, hooked, logits_fn = scored(case)
    x = images(2, seed=6)
    source, context = x[:1], x[1:]
    method = CAAP(hooked, layers=(0, 1), context=context, score="logit")
    target = 2
    maps = method.attribute(source, target=target)
    src = hf_layer_inputs(model, source, logits_fn)
    prefix = hooked.cfg.n_prefix_tokens
    ref = torch.tensor([float(hf_patched(model, context, logits_fn, {0: [prefix + p], 1: [prefix + p]}, src)[0, target])
                        for p in range(hooked.cfg.n_patches)])
    assert maps.shape == (1, *hooked.cfg.grid_size)
    assert (maps.flatten() - ref).abs().max() <= 1e-4


def hf_attention_out_projs(model) -> list[torch.nn.Linear]:
    """The output projection of each layer's attention: its input is the heads' outputs (`hook_z`)."""
    out = []
    for layer in P.layers_of(model):
        attn = getattr(layer, "attention", None) or layer.self_attn
        out.append(getattr(attn, "o_proj", None) or attn.out_proj)
    return out


@pytest.mark.parametrize("case", ["vit", "dinov2_swiglu", "clip_model", "siglip_features"])
def test_path_patching_to_the_logits_equals_hf_forwards(case):
    """Path patching each head's direct path to the logits: one source forward per sender with every other
    head's output frozen to its context value (hooks on the attention output projections' inputs)."""
    model, hooked, logits_fn = scored(case)
    x = images(2, seed=7)
    source, context = x[:1], x[1:]
    target = 1
    fast = path_patch(hooked, source, context, logit_score(target), batch_size=3, progress=False)
    projs = hf_attention_out_projs(model)
    h, dh = hooked.cfg.n_heads, hooked.cfg.d_head

    def heads_in(inp):
        store: list[torch.Tensor] = []
        handles = [p.register_forward_pre_hook(lambda m, a: store.append(a[0].detach().clone())) for p in projs]
        try:
            with torch.no_grad():
                logits_fn(inp)
        finally:
            for handle in handles:
                handle.remove()
        return store

    z_src, z_ctx = heads_in(source), heads_in(context)
    ref = []
    for layer in range(hooked.cfg.n_layers):
        for head in range(h):
            def freeze(m, a, i, layer=layer, head=head):
                z = z_ctx[i].clone()
                if i == layer:
                    z[..., head * dh:(head + 1) * dh] = z_src[i][..., head * dh:(head + 1) * dh]
                return (z,)

            handles = [p.register_forward_pre_hook(lambda m, a, i=i: freeze(m, a, i)) for i, p in enumerate(projs)]
            try:
                with torch.no_grad():
                    ref.append(float(logits_fn(context)[0, target]))
            finally:
                for handle in handles:
                    handle.remove()
    assert (fast[0] - torch.tensor(ref)).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------- baselines
def baseline_models() -> dict[str, HookedViT]:
    """HookedViTs with what the Hugging Face families add: attention pooling and no class token (SigLIP,
    zero-shot head), SwiGLU + registers + class-token-and-patch-mean pooling (DINOv2), pre-norm, projection
    and unit-length features (CLIP, zero-shot head), a distillation token without its head (DeiT)."""
    return {"siglip_zero_shot": clip_zero_shot("siglip_model")[1], "clip_zero_shot": clip_zero_shot("clip_model")[1],
            "dinov2_registers_swiglu": P.convert(P.build("dinov2_registers_swiglu")),
            "deit_class_head": P.convert(P.build("deit"))}


@pytest.fixture(scope="module")
def hf_models() -> dict[str, HookedViT]:
    return baseline_models()


BASELINE_SETTINGS = {
    "integrated_gradients": dict(n_steps=3, internal_batch_size=4), "smoothgrad": dict(n_samples=3, internal_batch_size=4),
    "rise": dict(n_masks=24, internal_batch_size=16), "tis": dict(n_masks=16, internal_batch_size=32, kmeans_iters=10),
    "vit_cx": dict(internal_batch_size=64), "beyond_intuition_head": dict(steps=3, internal_batch_size=8),
    "beyond_intuition_token": dict(steps=3, internal_batch_size=8),
}


@pytest.mark.parametrize("layout", ["siglip_zero_shot", "clip_zero_shot", "dinov2_registers_swiglu", "deit_class_head"])
def test_every_baseline_runs_batch_equals_alone_and_cleans_up(hf_models, layout):
    from caap.baselines import BASELINES, get_baseline

    model = hf_models[layout]
    x = images(2, seed=8)
    for name in BASELINES:
        method = get_baseline(name, model, **BASELINE_SETTINGS.get(name, {}))
        out = method.attribute(x, target=[3, 7])
        expected = model.cfg.grid_size if method.resolution == "patch" else (32, 32)
        assert out.shape == (2, *expected) and torch.isfinite(out).all(), name
        if name not in ("random", "attention_gradcam"):  # Grad-CAM clamps at 0: all-zero where every head weighs < 0
            assert out.abs().sum() > 0, name
            alone = method.attribute(x[1:], target=7)[0]
            torch.testing.assert_close(out[1], alone, rtol=1e-3, atol=1e-3 * float(alone.abs().max()) + 1e-7,
                                       msg=name)
        assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values()), name
        assert all(p.grad is None for p in model.parameters()), name


def _no_bias(model: HookedViT, seed: int = 0) -> HookedViT:
    """The model's architecture with the baselines' test weights and every bias zero (`conftest.scramble`)."""
    import copy

    return scramble(copy.deepcopy(model), seed=seed, biases=False)


@pytest.mark.parametrize("layout", ["siglip_zero_shot", "clip_zero_shot", "dinov2_registers_swiglu", "deit_class_head"])
def test_attnlrp_conservation_and_libragrad_completeness(hf_models, layout):
    """The rules' invariants on what the Hugging Face families add: LibraGrad's input x gradient at block 0
    sums to the target logit (no biases), and AttnLRP's relevance sums to the logit minus what the softmax
    rule absorbs and what reaches the attention-pooling probe (a constant, not a token)."""
    from caap.baselines import AttnLRP, LibraGradIxG

    model = _no_bias(hf_models[layout])
    x, t = images(2, seed=9), torch.tensor([1, 4])
    with torch.no_grad():
        logits = model(x)[torch.arange(2), t]
    total = LibraGradIxG(model, score="logit").token_relevance(x, t).sum(-1)
    torch.testing.assert_close(total, logits, rtol=1e-4, atol=1e-5)

    parts: dict[str, list[torch.Tensor]] = {"hook_pattern": [], "hook_attn_scores": [], "probe_scores": []}

    def capture(tensor: torch.Tensor, hook) -> torch.Tensor:
        key = "probe_scores" if hook.name == "attn_pool.hook_attn_scores" else hook.name.split(".")[-1]
        dims = tuple(range(1, tensor.ndim))
        tensor.register_hook(lambda g: parts[key].append((tensor.detach() * g).sum(dim=dims)))
        return tensor

    names = [n for n in model.hook_dict if n.endswith(("hook_pattern", "hook_attn_scores"))]
    with model.hooks(fwd_hooks=[(n, capture) for n in names]):
        tokens, _ = AttnLRP(model, epsilon=0.0).relevance(x, t)
    scores = sum(parts["hook_attn_scores"]) + sum(parts["probe_scores"] or [0.0])
    # the uniform rule gives q and k a quarter of q·k's relevance each; the probe's query holds its quarter
    absorbed = 0.5 * (sum(parts["hook_pattern"]) - scores) + 0.25 * sum(parts["probe_scores"] or [0.0])
    torch.testing.assert_close(tokens.sum(-1), logits - absorbed, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- cache, precision
@pytest.mark.parametrize("case", ["dinov2_registers_swiglu", "deit", "clip_projection", "vit"])
def test_direct_logit_attribution_sums_to_the_logits(case):
    """The heads the Hugging Face families bring stay affine in the last residual stream: DINOv2's class
    token and patch mean side by side, DeiT's class head beside an unread distillation token, CLIP's
    projection (with a linear probe on it)."""
    _, hooked, _ = scored(case)
    x = images(2, seed=10)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x)
    t = logits.argmax(-1)
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, t)
    total = attrs.sum(0) + cache.logit_bias(t)
    torch.testing.assert_close(total, logits[torch.arange(2), t], rtol=1e-4, atol=1e-4)
    every = cache.logit_contributions(stack).sum(0) + cache.logit_bias()
    torch.testing.assert_close(every, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case, match", [("siglip_classifier", None), ("siglip_model", "unit length"),
                                         ("siglip_features", "not linear")])
def test_direct_logit_attribution_refuses_nonlinear_heads(case, match):
    _, hooked, _ = scored(case)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(images(1))
    stack = cache.decompose_resid()
    if match is None:  # SigLIP's classifier pools with a plain mean: linear, attributed exactly
        total = cache.logit_attrs(stack, 0) + 0
        torch.testing.assert_close(total.sum(0) + cache.logit_bias(0), logits[:, 0], rtol=1e-4, atol=1e-4)
        return
    with pytest.raises(ValueError, match=match):
        cache.logit_attrs(stack, 0)


def test_caap_bf16_delta_on_a_swiglu_model_stays_close_to_fp32():
    """The bf16_delta precision wraps both branches of a gated MLP (and the fp32 reference run is exact)."""
    hooked = P.convert(P.build("dinov2_registers_swiglu"))
    x = images(1, seed=11)
    fp32 = CAAP(hooked, layers=(0, 1), context="grey").attribute(x, target=3)
    delta = CAAP(hooked, layers=(0, 1), context="grey", precision="bf16_delta").attribute(x, target=3)
    corr = torch.corrcoef(torch.stack([fp32.flatten(), delta.flatten()]))[0, 1]
    assert corr > 0.99


# ---------------------------------------------------------------------------------------------- TransformerLens 4's ViT bridge
def test_transformerlens_vit_bridge_cross_check(tmp_path):
    """TransformerLens 4's ViT bridge and `HookedViT.from_hf` on one Hugging Face ViT (experiments/bridge_vit.py):
    the same logits and the same activations at every hook point the engine patches, and the same resid_pre
    sweep (the engine on HookedViT; one bridge forward per patch with the bridge's own hooks). The engine itself
    needs `start_at_layer`, which TransformerLens 4.3 refuses for vision models: where it does, the refusal is
    checked; where a later TransformerLens accepts it, the engine's results on both must agree."""
    pytest.importorskip("transformer_lens.model_bridge.supported_architectures.vit",
                        reason="this TransformerLens has no ViT bridge (TransformerLens 4 has)")
    B = _load_experiment("bridge_vit")
    model = P.build("vit")
    hooked, bridge = P.convert(model), B.boot_bridge(model, tmp_path)
    x = images(2, seed=12)
    with torch.no_grad():
        assert (bridge(x) - hooked(x)).abs().max() <= TOL
    names = [f"blocks.{layer}.{n}" for layer in range(2) for n in B.ENGINE_HOOKS]
    for name, diff in B.compare_hooks(bridge, hooked, x, names).items():
        assert isinstance(diff, float) and diff <= TOL, (name, diff)
    source, context, target = x[:1], x[1:], 4
    ours = sweep(hooked, source, context, logit_score(target), component="resid_pre", progress=False).values[0]
    loop = B.bridge_sweep(bridge, source, context, target, 2, hooked.cfg.n_ctx)
    assert (ours - loop).abs().max() <= 1e-4 and float(loop.std()) > 1e-3
    on_bridge = B.engine_on_bridge(bridge, source, context, target, 2, hooked.cfg.n_ctx)
    if isinstance(on_bridge, str):
        assert "start_at_layer is not supported for vision models" in on_bridge
    else:
        assert (on_bridge - ours).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------- the command line
def test_cli_explains_and_sweeps_with_a_hugging_face_folder(tmp_path, capsys):
    """`--model FOLDER`: a save_pretrained folder is read offline with its processor; the outputs name the
    model's own classes (its config's id2label), and a checkpoint beside a folder is a usage error."""
    import json

    from caap.cli import main

    model = P.build("vit")
    model.config.id2label = {i: f"kind {i}" for i in range(10)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    folder = tmp_path / "vit"
    model.save_pretrained(folder)
    _processor("vit").save_pretrained(folder)
    photo().save(tmp_path / "photo.png")
    code = main(["explain", str(tmp_path / "photo.png"), "--model", str(folder), "--layers", "0:1", "--context", "grey",
                 "--target", "3", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "photo_caap.json").read_text())
    assert summary["target"] == {"class": 3, "name": "kind 3"}
    assert np.load(tmp_path / "out" / "photo_caap.npy").shape == (4, 4)
    assert all(c["name"].startswith("kind ") for c in summary["top_classes"])
    code = main(["sweep", str(tmp_path / "photo.png"), "--model", str(folder), "--context", "grey",
                 "--out", str(tmp_path / "sweep")])
    assert code == 0, capsys.readouterr().err
    assert np.load(tmp_path / "sweep" / "photo_sweep_resid_pre.npy").shape == (2, 4, 4)
    code = main(["explain", "--model", str(folder), "--checkpoint", str(tmp_path / "photo.png"), "--out", str(tmp_path)])
    assert code == 2 and "holds its own weights" in capsys.readouterr().err
