"""Hugging Face `transformers` -> HookedViT conversion, table-driven (as `hooked_vit.loading` is for timm).

Four tables do the work:
- `HF_CLASSES`: the `transformers` classes that convert, each with its family, where its vision transformer
  sits inside it, which head it has, and what the HookedViT's output equals (`HFClass.output`).
- `HF_ACTIVATIONS`: `hidden_act` names -> `HookedViTConfig.act_fn`.
- `FAMILIES`: per family, how the config reads (`config_from_hf`) and the state-dict renames
  (`Rename`: HF parameter name -> HookedViT parameter name, with the few reshapes, splits and fusions
  they need). Every parameter of the source is either renamed or listed as not used by the output
  (`Family.unused`), else the conversion refuses: nothing is dropped silently. The HookedViT side is
  loaded with `strict=True`.
- `PROCESSOR_DEFAULTS`: the family's default preprocessing, for a model given without its processor.

Whatever the conversion does not handle (another architecture, an activation, a config option, a
quantised model) raises `UnsupportedFeature` naming it, before any weights are read where a folder is
given; and the converted model is checked against its source on one input at load
(`hooked_vit.loading.check_against_source`), so a silently different model is refused.

Headless models (`ViTModel`, `DeiTModel`, `Dinov2Model`, `CLIPVisionModel`, `SiglipVisionModel`, ...) return
their features, as `HFClass.output` says; `HookedViT.set_zero_shot_head` (CLIP, SigLIP: cosine similarity
to class embeddings) or `HookedViT.set_head` (a linear probe) gives them logits for CAAP and every method.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.loading import UnsupportedFeature, check_against_source

HF_ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
"""`hidden_act` of a `transformers` config -> `HookedViTConfig.act_fn` (the same function; the tanh
approximations are written differently and agree to float rounding)."""


@dataclass(frozen=True)
class HFClass:
    """One convertible `transformers` class.

    family: key of `FAMILIES`. tower: attribute path of the vision transformer inside the model ("" when
    the model is it). head: "none" (features), "classifier" (a linear classifier), "teacher" (DeiT's
    class and distillation classifiers, averaged) or "projection" (CLIP's `visual_projection`).
    pooling: the pooling when it is not the family's own. output: what the HookedViT's output equals."""

    family: str
    tower: str
    head: str
    output: str
    pooling: str | None = None


HF_CLASSES: dict[str, HFClass] = {
    "ViTModel": HFClass("vit", "", "none", "last_hidden_state[:, 0]: the class token after the final LayerNorm "
                        "(the pooler, a dense layer and tanh on it, is not converted)"),
    "ViTForImageClassification": HFClass("vit", "vit", "classifier", "logits"),
    "DeiTModel": HFClass("deit", "", "none", "last_hidden_state[:, 0]: the class token after the final "
                         "LayerNorm (the pooler is not converted)"),
    "DeiTForImageClassification": HFClass("deit", "deit", "classifier", "logits (the class token's classifier)"),
    "DeiTForImageClassificationWithTeacher": HFClass(
        "deit", "deit", "teacher", "logits: the class and distillation classifiers averaged"),
    "Dinov2Model": HFClass("dinov2", "", "none", "pooler_output: the class token after the final LayerNorm"),
    "Dinov2ForImageClassification": HFClass(
        "dinov2", "dinov2", "classifier", "logits of the classifier on the class token and the patch mean",
        pooling="token_avg"),
    "Dinov2WithRegistersModel": HFClass(
        "dinov2_registers", "", "none", "pooler_output: the class token after the final LayerNorm"),
    "Dinov2WithRegistersForImageClassification": HFClass(
        "dinov2_registers", "dinov2_with_registers", "classifier",
        "logits of the classifier on the class token and the patch mean", pooling="token_avg"),
    "CLIPVisionModel": HFClass("clip", "", "none", "pooler_output: the class token after post_layernorm"),
    "CLIPVisionModelWithProjection": HFClass("clip", "vision_model", "projection", "image_embeds"),
    "CLIPModel": HFClass("clip", "vision_model", "projection",
                         "the image embedding: visual_projection of the vision tower's pooler_output"),
    "CLIPForImageClassification": HFClass(
        "clip", "vision_model", "classifier", "logits of the classifier on the mean of the patch tokens",
        pooling="avg"),
    "SiglipVisionModel": HFClass(
        "siglip", "", "none", "pooler_output: the attention-pooling head's output (with vision_use_head=False: "
        "the mean of last_hidden_state, as SiglipForImageClassification pools)"),
    "SiglipModel": HFClass("siglip", "vision_model", "none", "the image embedding: the vision tower's pooler_output"),
    "SiglipForImageClassification": HFClass(
        "siglip", "vision_model", "classifier", "logits of the classifier on the mean of the tokens", pooling="avg"),
}
"""The convertible `transformers` classes (DeiT with its distillation token, DINOv2 with LayerScale, SwiGLU
and interpolated position embeddings, CLIP with pre-LayerNorm and quick GELU, SigLIP without class token and
with attention pooling)."""

SUPPORTED_HELP = "supported: " + ", ".join(HF_CLASSES)

NOT_VISION_TRANSFORMERS = {
    "Siglip2": "SigLIP 2's NaFlex towers (variable patch grids and resolutions)",
    "Swin": "Swin (windowed attention, no global token sequence)",
    "ConvNext": "ConvNeXt (a CNN)",
    "ResNet": "ResNet (a CNN)",
    "Beit": "BEiT (relative position biases)",
    "Data2VecVision": "Data2Vec-vision (relative position biases)",
    "Peft": "a PEFT wrapper (merge the adapters first: model.merge_and_unload())",
}
"""Class-name prefixes with a word on why they do not convert (the error names them)."""


# ---------------------------------------------------------------------------------------------- renames
@dataclass(frozen=True)
class Rename:
    """HF parameter `pattern` (regex, relative to the tower) -> HookedViT parameter `target` (re.sub
    replacement). `rows=(a, b, n)` takes rows [a/n, b/n) of the tensor (a fused projection split);
    `part=(i, n)`: the tensor is part i of n concatenated along the first axis into the target (separate
    q, k, v fused into qkv); `reshape`: an embedding table [n, d] or a vector [d] that HookedViT keeps
    as [1, n, d]."""

    pattern: str
    target: str
    rows: tuple[int, int, int] | None = None
    part: tuple[int, int] | None = None
    reshape: bool = False


def _ln(hf: str, ours: str) -> list[Rename]:
    return [Rename(rf"^{hf}\.weight$", f"{ours}.w"), Rename(rf"^{hf}\.bias$", f"{ours}.b")]


def _linear(hf: str, ours: str) -> list[Rename]:
    return [Rename(rf"^{hf}\.(weight|bias)$", rf"{ours}.\{hf.count('(') + 1}")]


def _qkv(block: str, names: tuple[str, str, str]) -> list[Rename]:
    return [Rename(rf"^{block}\.{n}\.(weight|bias)$", r"blocks.\1.attn.qkv.\2", part=(i, 3)) for i, n in enumerate(names)]


def _block_renames(block: str, ln1: str, ln2: str, attn: str, out: str) -> list[Rename]:
    """A pre-norm block: `block` matches "<layers>.(\\d+)" (group 1 = layer)."""
    return [
        *_ln(rf"{block}\.{ln1}", r"blocks.\1.ln1"),
        *_ln(rf"{block}\.{ln2}", r"blocks.\1.ln2"),
        *_qkv(block, (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj")),
        *_linear(rf"{block}\.{attn}\.{out}", r"blocks.\1.attn.proj"),
        *_linear(rf"{block}\.mlp\.fc1", r"blocks.\1.mlp.fc1"),
        *_linear(rf"{block}\.mlp\.fc2", r"blocks.\1.mlp.fc2"),
    ]


_VIT_RENAMES = [
    Rename(r"^embeddings\.cls_token$", "cls_token"),
    Rename(r"^embeddings\.distillation_token$", "dist_token"),
    Rename(r"^embeddings\.position_embeddings$", "pos_embed"),
    *_linear(r"embeddings\.patch_embeddings\.projection", "patch_embed.proj"),
    *_block_renames(r"layers\.(\d+)", "layernorm_before", "layernorm_after", "attention", "o_proj"),
    *_ln("layernorm", "ln_final"),
]

_DINOV2_RENAMES = [
    Rename(r"^embeddings\.cls_token$", "cls_token"),
    Rename(r"^embeddings\.register_tokens$", "reg_token"),
    Rename(r"^embeddings\.position_embeddings$", "pos_embed"),
    *_linear(r"embeddings\.patch_embeddings\.projection", "patch_embed.proj"),
    *_block_renames(r"encoder\.layer\.(\d+)", "norm1", "norm2", "attention", "o_proj"),
    Rename(r"^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$", r"blocks.\1.attn.ls_gamma"),
    Rename(r"^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", r"blocks.\1.mlp.ls_gamma"),
    *_linear(r"encoder\.layer\.(\d+)\.mlp\.gate_proj", r"blocks.\1.mlp.fc1_g"),
    *_linear(r"encoder\.layer\.(\d+)\.mlp\.up_proj", r"blocks.\1.mlp.fc1_x"),
    *_linear(r"encoder\.layer\.(\d+)\.mlp\.down_proj", r"blocks.\1.mlp.fc2"),
    *_ln("layernorm", "ln_final"),
]

_CLIP_SIGLIP_BLOCKS = _block_renames(r"encoder\.layers\.(\d+)", "layer_norm1", "layer_norm2", "self_attn", "out_proj")

_CLIP_RENAMES = [
    Rename(r"^embeddings\.class_embedding$", "cls_token", reshape=True),
    *_linear(r"embeddings\.patch_embedding", "patch_embed.proj"),
    Rename(r"^embeddings\.position_embedding\.weight$", "pos_embed", reshape=True),
    *_ln("pre_layrnorm", "ln_pre"),
    *_CLIP_SIGLIP_BLOCKS,
    *_ln("post_layernorm", "fc_norm"),
]

_SIGLIP_RENAMES = [
    *_linear(r"embeddings\.patch_embedding", "patch_embed.proj"),
    Rename(r"^embeddings\.position_embedding\.weight$", "pos_embed", reshape=True),
    *_CLIP_SIGLIP_BLOCKS,
    *_ln("post_layernorm", "ln_final"),
    Rename(r"^head\.probe$", "attn_pool.probe"),
    Rename(r"^head\.attention\.in_proj_(weight|bias)$", r"attn_pool.q.\1", rows=(0, 1, 3)),
    Rename(r"^head\.attention\.in_proj_(weight|bias)$", r"attn_pool.kv.\1", rows=(1, 3, 3)),
    *_linear(r"head\.attention\.out_proj", "attn_pool.proj"),
    *_ln(r"head\.layernorm", "attn_pool.ln"),
    *_linear(r"head\.mlp\.fc1", "attn_pool.mlp.fc1"),
    *_linear(r"head\.mlp\.fc2", "attn_pool.mlp.fc2"),
]


# ---------------------------------------------------------------------------------------------- families
def _act(hf_config: Any) -> str:
    act = getattr(hf_config, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise UnsupportedFeature(
            f"hidden_act={act!r} has no HookedViT equivalent; supported: {', '.join(HF_ACTIVATIONS)}"
        )
    return HF_ACTIVATIONS[act]


def _common(c: Any) -> dict[str, Any]:
    d, h = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or d // h
    return dict(
        n_layers=c.num_hidden_layers, d_model=d, n_heads=h, d_head=head_dim, eps=c.layer_norm_eps,
        img_size=c.image_size, patch_size=c.patch_size, in_chans=getattr(c, "num_channels", 3),
    )


def _vit_config(c: Any, spec: HFClass) -> dict[str, Any]:
    deit = spec.family == "deit"
    return dict(**_common(c), d_mlp=c.intermediate_size, act_fn=_act(c), qkv_bias=bool(getattr(c, "qkv_bias", True)),
                distilled=deit, dist_head=spec.head == "teacher", pos_embed_antialias=False)


def _dinov2_config(c: Any, spec: HFClass) -> dict[str, Any]:
    hidden = int(c.hidden_size * c.mlp_ratio)
    swiglu = bool(getattr(c, "use_swiglu_ffn", False))
    registers = spec.family == "dinov2_registers"
    return dict(
        **_common(c),
        d_mlp=(int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden,  # the SwiGLU width as transformers sets it
        act_fn="silu" if swiglu else _act(c), gated_mlp=swiglu, qkv_bias=bool(getattr(c, "qkv_bias", True)),
        layer_scale=True, n_registers=int(getattr(c, "num_register_tokens", 0)) if registers else 0,
        no_embed_class=registers,  # the class token's position embedding is folded into the token (`_fold_class_pos`)
        pos_embed_antialias=registers,  # transformers: plain bicubic for DINOv2, antialiased with registers
    )


def _clip_config(c: Any, spec: HFClass) -> dict[str, Any]:
    out = dict(**_common(c), d_mlp=c.intermediate_size, act_fn=_act(c), patch_bias=False, pre_norm=True,
               pos_embed_antialias=False)
    if spec.pooling == "avg":  # CLIPForImageClassification: the mean of the patch tokens, before any final norm
        return dict(out, pooling="avg", final_norm=False)
    return dict(out, pooling="token", fc_norm=True)  # post_layernorm on the class token


def _siglip_config(c: Any, spec: HFClass) -> dict[str, Any]:
    head = spec.pooling is None and bool(getattr(c, "vision_use_head", True))
    return dict(**_common(c), d_mlp=c.intermediate_size, act_fn=_act(c), class_token=False,
                pooling="map" if head else "avg", pos_embed_antialias=False)


def _fold_class_pos(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 with registers: the class token's position embedding is added to it at any image size (only
    the patches' are interpolated) and the registers get none, so HookedViT holds class token + its
    position embedding, and position embeddings for the patches only (`no_embed_class`)."""
    pos = state["pos_embed"]
    return {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


@dataclass(frozen=True)
class Family:
    """One family of `transformers` vision towers: how its config reads, how its parameters are named,
    which of its parameters no output of the converted classes uses, whether it interpolates its position
    embeddings by default (DINOv2 always does), a last fix-up of the converted state dict, and whether its
    forward takes `interpolate_pos_encoding`."""

    config: Callable[[Any, HFClass], dict[str, Any]]
    renames: list[Rename]
    unused: tuple[str, ...] = ()
    interpolates: bool = False
    fixup: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    accepts_interpolate_flag: bool = True


FAMILIES: dict[str, Family] = {
    "vit": Family(_vit_config, _VIT_RENAMES, unused=(r"^embeddings\.mask_token$", r"^pooler\.")),
    "deit": Family(_vit_config, _VIT_RENAMES, unused=(r"^embeddings\.mask_token$", r"^pooler\.")),
    "dinov2": Family(_dinov2_config, _DINOV2_RENAMES, unused=(r"^embeddings\.mask_token$",), interpolates=True,
                     accepts_interpolate_flag=False),
    "dinov2_registers": Family(_dinov2_config, _DINOV2_RENAMES, unused=(r"^embeddings\.mask_token$",),
                               interpolates=True, fixup=_fold_class_pos, accepts_interpolate_flag=False),
    "clip": Family(_clip_config, _CLIP_RENAMES),
    "siglip": Family(_siglip_config, _SIGLIP_RENAMES),
}

PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "resample": 2},
    "deit": {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225), "resample": 3},
    "dinov2": {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225), "resample": 3},
    "dinov2_registers": {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225), "resample": 3},
    "clip": {"image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711),
             "resample": 3},
    "siglip": {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "resample": 3},
}
"""Each family's processor mean, std and resampling (PIL codes: 2 bilinear, 3 bicubic), used with a resize to
the model's own image size when a model object comes without its image processor (a warning says so)."""


# ---------------------------------------------------------------------------------------------- checks
def hf_class(name: str) -> HFClass:
    """The table entry of a `transformers` class name, or `UnsupportedFeature` naming what is supported."""
    if name in HF_CLASSES:
        return HF_CLASSES[name]
    why = next((w for prefix, w in NOT_VISION_TRANSFORMERS.items() if name.startswith(prefix)), None)
    raise UnsupportedFeature(
        f"{name} is not a Hugging Face vision transformer HookedViT converts"
        + (f" ({why})" if why else "") + f"; {SUPPORTED_HELP}"
    )


def check_hf_config(hf_config: Any, spec: HFClass) -> None:
    """Refuse config options the conversion does not handle, naming each (before any weights are read)."""
    found = []
    image, patch = getattr(hf_config, "image_size", None), getattr(hf_config, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and image % patch:
        found.append(f"image_size {image} not divisible by patch_size {patch} (the source drops the border)")
    if getattr(hf_config, "quantization_config", None):
        found.append("quantised weights (quantization_config): convert the unquantised model")
    act = getattr(hf_config, "hidden_act", "gelu")
    swiglu = spec.family.startswith("dinov2") and bool(getattr(hf_config, "use_swiglu_ffn", False))
    if not swiglu and (not isinstance(act, str) or act not in HF_ACTIVATIONS):  # DINOv2's SwiGLU is SiLU whatever it says
        found.append(f"hidden_act={act!r} (supported: {', '.join(HF_ACTIVATIONS)})")
    if found:
        raise UnsupportedFeature(
            f"{type(hf_config).__name__} uses config options HookedViT does not convert: " + "; ".join(found)
        )


def config_from_hf(hf_config: Any, class_name: str, dynamic_img_size: bool | None = None,
                   n_classes: int | None = None) -> HookedViTConfig:
    """A `HookedViTConfig` read off a `transformers` config and class name alone (no weights, no model):
    what `HookedViT.from_hf` converts into, and what the command line checks its arguments against.
    `n_classes`: the classifier's width (default: the config's `num_labels` for classifiers, 0 otherwise;
    the projection's width for CLIP's projection heads)."""
    spec = hf_class(class_name)
    check_hf_config(hf_config, spec)
    family = FAMILIES[spec.family]
    kwargs = family.config(hf_config, spec)
    if spec.pooling == "token_avg":
        kwargs["pooling"] = "token_avg"
    if spec.head == "projection":
        kwargs["proj_dim"] = int(getattr(hf_config, "projection_dim", 0) or 0)
    if n_classes is None:
        n_classes = int(getattr(hf_config, "num_labels", 0)) if spec.head in ("classifier", "teacher") else 0
    kwargs["n_classes"] = n_classes
    kwargs["dynamic_img_size"] = family.interpolates if dynamic_img_size is None else bool(dynamic_img_size)
    if family.interpolates and not kwargs["dynamic_img_size"]:
        raise UnsupportedFeature(
            f"{class_name} always interpolates its position embeddings to the image's grid; it converts with "
            f"dynamic_img_size=True (the default) only"
        )
    return HookedViTConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- weights
def _attr(model: nn.Module, path: str) -> nn.Module:
    for part in filter(None, path.split(".")):
        model = getattr(model, part)
    return model


def convert_hf_state_dict(model: nn.Module, class_name: str) -> dict[str, torch.Tensor]:
    """The HookedViT state dict of a `transformers` model (the tower's parameters through the family's
    renames, then the head's). Raises `UnsupportedFeature` for a parameter no rename and no `unused`
    pattern accounts for."""
    spec = HF_CLASSES[class_name]
    family = FAMILIES[spec.family]
    tower = _attr(model, spec.tower)
    unused = list(family.unused)
    if spec.family == "clip" and spec.pooling == "avg":
        unused.append(r"^post_layernorm\.")  # CLIPForImageClassification pools before any final norm
    if spec.family == "siglip" and spec.pooling == "avg":
        unused.append(r"^head\.")  # SiglipForImageClassification: the mean of the tokens, not the head
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in tower.state_dict().items():
        value = value.detach()
        if any(re.search(u, key) for u in unused):
            continue
        matched = False
        for r in family.renames:
            if not re.search(r.pattern, key):
                continue
            matched = True
            target = re.sub(r.pattern, r.target, key)
            if r.rows is not None:
                a, b, n = r.rows
                value_r = value[value.shape[0] * a // n : value.shape[0] * b // n]
                out[target] = value_r
            elif r.part is not None:
                parts.setdefault(target, {})[r.part[0]] = value
            else:
                out[target] = value.reshape(1, -1, value.shape[-1]) if r.reshape else value
        if not matched:
            unknown.append(key)
    if unknown:
        raise UnsupportedFeature(
            f"{class_name} has parameters the conversion does not know ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}): a variant of the architecture HookedViT does not convert; "
            f"{SUPPORTED_HELP}"
        )
    for target, pieces in parts.items():
        out[target] = torch.cat([pieces[i] for i in sorted(pieces)], dim=0)
    if family.fixup is not None:
        out = family.fixup(out)
    if spec.head in ("classifier", "teacher", "projection"):
        heads = {"classifier": [("classifier", "head")],
                 "teacher": [("cls_classifier", "head"), ("distillation_classifier", "head_dist")],
                 "projection": [("visual_projection", "proj")]}[spec.head]
        for attr, ours in heads:
            module = getattr(model, attr)
            if isinstance(module, nn.Linear):
                for name, p in module.state_dict().items():
                    out[f"{ours}.{name}"] = p.detach()
    return out


# ---------------------------------------------------------------------------------------------- the source's output
def hf_reference_output(model: nn.Module, pixels: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """What the HookedViT converted from `model` equals (`HFClass.output`), computed by the `transformers`
    model itself on `pixels` [batch, chan, H, W]. `interpolate_pos_encoding`: passed to the model where it
    takes it (DINOv2 always interpolates)."""
    name = type(model).__name__
    spec = hf_class(name)
    family = FAMILIES[spec.family]
    kw = {"interpolate_pos_encoding": interpolate_pos_encoding} if family.accepts_interpolate_flag else {}
    tower = _attr(model, spec.tower)
    if spec.head in ("classifier", "teacher"):
        return model(pixel_values=pixels, **kw).logits
    out = tower(pixel_values=pixels, **kw)
    if spec.head == "projection":
        return model.visual_projection(out.pooler_output)
    if spec.family in ("vit", "deit"):
        return out.last_hidden_state[:, 0]
    if spec.family == "siglip" and out.pooler_output is None:  # vision_use_head=False
        return out.last_hidden_state.mean(dim=1)
    return out.pooler_output


# ---------------------------------------------------------------------------------------------- folders
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_folder_config(folder: str | os.PathLike) -> tuple[Any, str]:
    """(`transformers` config, class name) of a folder written by `save_pretrained`, read offline without
    its weights; refuses a folder that is not one, an unsupported class, or one without weights."""
    from transformers import AutoConfig

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"no such folder: {path} (expected a folder written by save_pretrained)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: not a folder written by a transformers model's save_pretrained")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {config_file} ({e})") from e
    if not architectures:
        raise ValueError(f"{config_file} names no architecture (\"architectures\"); {SUPPORTED_HELP}")
    name = architectures[0]
    hf_class(name)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"{path} holds no weights (none of {', '.join(WEIGHT_FILES)}): save the model with "
                         f"save_pretrained, not only its config")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "vision_config") and name in ("CLIPModel", "SiglipModel", "CLIPForImageClassification",
                                                     "SiglipForImageClassification"):
        vision = config.vision_config
        for key in ("projection_dim", "num_labels"):
            if hasattr(config, key):
                setattr(vision, key, getattr(config, key))
        return vision, name
    return config, name


def _vision_config(model: nn.Module, spec: HFClass) -> Any:
    """The vision tower's config (a copy where the projection's width is added to it)."""
    import copy

    config = model.config
    if hasattr(config, "vision_config") and spec.tower:
        vision = _attr(model, spec.tower).config
        if spec.head == "projection":
            vision = copy.copy(vision)
            vision.projection_dim = model.visual_projection.out_features
        return vision
    return config


def _n_classes(model: nn.Module, spec: HFClass) -> int:
    if spec.head == "classifier":
        return model.classifier.out_features if isinstance(model.classifier, nn.Linear) else 0
    if spec.head == "teacher":
        return model.cls_classifier.out_features if isinstance(model.cls_classifier, nn.Linear) else 0
    return 0


# ---------------------------------------------------------------------------------------------- the whole way
def _folder_processor(folder: str | os.PathLike) -> Any:
    """The image processor saved in a `save_pretrained` folder (offline), or None if it holds none."""
    if not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, local_files_only=True)


def _data_config(processor: Any, cfg: HookedViTConfig, spec: HFClass, name: str) -> dict[str, Any]:
    from hooked_vit.preprocess import data_config_from_processor

    if processor is None:
        warnings.warn(
            f"no image processor given for this {name}: preprocess resizes to {cfg.img_size[0]}x{cfg.img_size[1]} "
            f"with the {spec.family} family's default mean, std and resampling; pass processor= (the model's "
            f"AutoImageProcessor) for its own preprocessing", stacklevel=4)
    return data_config_from_processor(processor, cfg, PROCESSOR_DEFAULTS[spec.family])


def folder_config(folder: str | os.PathLike, dynamic_img_size: bool | None = None
                  ) -> tuple[HookedViTConfig, dict[str, Any]]:
    """(HookedViTConfig, data config) of a `save_pretrained` folder, read offline without its weights: what
    `HookedViT.from_hf(folder)` will be, for checking arguments before anything heavy happens."""
    config, name = read_folder_config(folder)
    cfg = config_from_hf(config, name, dynamic_img_size)
    return cfg, _data_config(_folder_processor(folder), cfg, HF_CLASSES[name], name)


def class_names_of(model: nn.Module, n_classes: int) -> list[str] | None:
    """The source's class names (`config.id2label`) when it names its `n_classes` classes (not transformers'
    placeholder "LABEL_i"), else None."""
    labels = getattr(model.config, "id2label", None) or {}
    names = [labels.get(i, labels.get(str(i))) for i in range(n_classes)]
    if n_classes == 0 or any(n is None for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return [str(n) for n in names]


def hooked_vit_from_hf(
    cls,
    model_or_folder: nn.Module | str | os.PathLike,
    processor: Any = None,
    dynamic_img_size: bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    check: bool = True,
):
    """`HookedViT.from_hf`: see there."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        import transformers

        config, name = read_folder_config(model_or_folder)
        config_from_hf(config, name, dynamic_img_size)  # every refusal before the weights are read
        if processor is None:
            processor = _folder_processor(model_or_folder)
        model = getattr(transformers, name).from_pretrained(model_or_folder, local_files_only=True)
    elif isinstance(model_or_folder, nn.Module):
        model = model_or_folder
    else:
        raise TypeError(f"expected a transformers model or a folder written by save_pretrained, got "
                        f"{type(model_or_folder).__name__}")
    name = type(model).__name__
    spec = hf_class(name)
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise UnsupportedFeature(f"{name} holds quantised weights: convert the unquantised model")
    cfg = config_from_hf(_vision_config(model, spec), name, dynamic_img_size, n_classes=_n_classes(model, spec))
    data_config = _data_config(processor, cfg, spec, name)
    source_param = next(model.parameters())
    hooked = cls(cfg, data_config=data_config).to(device=source_param.device, dtype=source_param.dtype)
    hooked.load_state_dict(convert_hf_state_dict(model, name), strict=True)
    hooked.eval()
    hooked.hf_name = getattr(model.config, "_name_or_path", "") or name
    hooked.class_names = class_names_of(model, cfg.n_classes)
    if check:
        was_training = model.training
        model.eval()
        try:
            interpolate = cfg.dynamic_img_size and FAMILIES[spec.family].accepts_interpolate_flag
            check_against_source(hooked, lambda x: hf_reference_output(model, x, interpolate), f"the {name} it came from")
        finally:
            model.train(was_training)
    return hooked.to(device=device, dtype=dtype)
