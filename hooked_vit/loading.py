"""timm -> HookedViT conversion, table-driven.

Three tables do the work:
- `UNSUPPORTED`: timm features this package does not convert; each one found raises an error that
  names it (better than a silently different model).
- `config_from_timm`: reads the architecture off the timm modules into a `HookedViTConfig`.
- `STATE_DICT_RENAMES`: timm parameter names -> HookedViT parameter names (most are the same; the
  state dict is then loaded with `strict=True`, so nothing can be dropped silently).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn


class UnsupportedTimmFeature(ValueError):
    """The timm model uses a feature HookedViT does not convert."""


def _blocks(m: nn.Module) -> list[nn.Module]:
    return list(getattr(m, "blocks", []))


def _any_block(pred: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    return lambda m: any(pred(b) for b in _blocks(m))


def _not_identity(mod: Any) -> bool:
    return mod is not None and not isinstance(mod, nn.Identity)


def _unsupported_table() -> list[tuple[str, Callable[[nn.Module], bool]]]:
    from timm.layers import Attention, LayerNorm, Mlp, PatchDropout
    from timm.layers.patch_embed import PatchEmbed
    from timm.models.vision_transformer import Block

    def block_type(b: nn.Module) -> bool:
        return type(b) is not Block

    return [
        ("attention pooling head (global_pool='map' or 'prr')", lambda m: getattr(m, "attn_pool", None) is not None),
        ("a block type other than timm's pre-norm `Block` (ResPostBlock, parallel blocks)", _any_block(block_type)),
        ("an attention layer other than timm's `Attention` (e.g. differential attention, RoPE)",
         _any_block(lambda b: type(b.attn) is not Attention)),
        ("gated attention (`gated=True`)", _any_block(lambda b: getattr(b.attn, "gate", None) is not None)),
        ("a norm inside attention (`scale_attn_norm=True`)", _any_block(lambda b: _not_identity(getattr(b.attn, "norm", None)))),
        ("an MLP other than timm's `Mlp` (SwiGLU / GLU)", _any_block(lambda b: type(b.mlp) is not Mlp)),
        ("a norm inside the MLP (`scale_mlp_norm=True`)", _any_block(lambda b: _not_identity(getattr(b.mlp, "norm", None)))),
        ("a norm layer other than LayerNorm (e.g. RmsNorm)", lambda m: any(
            not isinstance(mod, (LayerNorm, nn.LayerNorm)) for b in _blocks(m) for mod in (b.norm1, b.norm2))),
        ("an activation other than GELU, GELU-tanh, QuickGELU, ReLU or SiLU", _any_block(lambda b: _act_name(b.mlp.act) is None)),
        ("attention head dimension times heads different from embed_dim projections (`attn_head_dim` / `dim_out`)",
         _any_block(lambda b: b.attn.proj.out_features != b.attn.qkv.in_features)),
        ("a patch embedding other than timm's `PatchEmbed` (e.g. hybrid CNN stem)",
         lambda m: type(getattr(m, "patch_embed", None)) is not PatchEmbed),
        ("a norm in the patch embedding (`embed_norm_layer`)", lambda m: _not_identity(getattr(m.patch_embed, "norm", None))),
        ("padded dynamic image size (`dynamic_img_pad=True`)", lambda m: bool(getattr(m.patch_embed, "dynamic_img_pad", False))),
        ("patch dropout (`patch_drop_rate > 0`)", lambda m: isinstance(getattr(m, "patch_drop", None), PatchDropout)),
        ("norm_pre other than LayerNorm", lambda m: _not_identity(getattr(m, "norm_pre", None))
         and not isinstance(m.norm_pre, (LayerNorm, nn.LayerNorm))),
    ]


def _act_name(act: nn.Module) -> str | None:
    from timm.layers.activations import QuickGELU as TimmQuickGELU

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, TimmQuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    return None


def check_supported(model: nn.Module) -> None:
    """Raise `UnsupportedTimmFeature` naming every feature of `model` that HookedViT cannot convert."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UnsupportedTimmFeature(
            f"{type(model).__name__} is not a timm VisionTransformer (or a subclass such as DeiT's); "
            f"HookedViT converts plain ViTs (ViT, DeiT, DeiT-III, CLIP, DINOv2, registers), not Swin, "
            f"ConvNeXt, hybrid or other architectures"
        )
    found = [name for name, test in _unsupported_table() if _safe(test, model)]
    if getattr(model, "global_pool", "token") == "":
        found.append("no pooling (`global_pool=''`)")
    if found:
        raise UnsupportedTimmFeature(
            f"timm model {type(model).__name__} uses features HookedViT does not support: " + "; ".join(found)
        )


def _safe(test: Callable[[nn.Module], bool], model: nn.Module) -> bool:
    try:
        return bool(test(model))
    except AttributeError:
        return True


def config_from_timm(model: nn.Module):
    """Read a `HookedViTConfig` off a timm VisionTransformer (after `check_supported`)."""
    from hooked_vit.config import HookedViTConfig

    check_supported(model)
    blk = model.blocks[0]
    attn = blk.attn
    pe = model.patch_embed
    distilled = getattr(model, "dist_token", None) is not None
    q_norm = attn.q_norm
    return HookedViTConfig(
        n_layers=len(model.blocks),
        d_model=model.embed_dim,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        d_mlp=blk.mlp.fc1.out_features,
        act_fn=_act_name(blk.mlp.act),  # type: ignore[arg-type]
        eps=blk.norm1.eps,
        img_size=tuple(pe.img_size),
        patch_size=tuple(pe.patch_size),
        in_chans=pe.proj.in_channels,
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        class_token=model.cls_token is not None,
        n_registers=getattr(model, "num_reg_tokens", 0),
        distilled=distilled,
        pos_embed=model.pos_embed is not None,
        no_embed_class=bool(model.no_embed_class),
        patch_bias=pe.proj.bias is not None,
        pre_norm=_not_identity(model.norm_pre),
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        mlp_bias=blk.mlp.fc1.bias is not None,
        qk_norm=_not_identity(q_norm),
        qk_norm_eps=q_norm.eps if _not_identity(q_norm) else 1e-6,
        layer_scale=_not_identity(blk.ls1),
        final_norm=_not_identity(model.norm) or _not_identity(model.fc_norm),
        pooling=model.global_pool,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        fc_norm=_not_identity(model.fc_norm),
        n_classes=model.num_classes,
    )


# timm parameter name -> HookedViT parameter name (regex, replacement); first match wins.
STATE_DICT_RENAMES: list[tuple[str, str]] = [
    (r"^norm_pre\.weight$", "ln_pre.w"),
    (r"^norm_pre\.bias$", "ln_pre.b"),
    (r"^blocks\.(\d+)\.norm([12])\.weight$", r"blocks.\1.ln\2.w"),
    (r"^blocks\.(\d+)\.norm([12])\.bias$", r"blocks.\1.ln\2.b"),
    (r"^blocks\.(\d+)\.ls1\.gamma$", r"blocks.\1.attn.ls_gamma"),
    (r"^blocks\.(\d+)\.ls2\.gamma$", r"blocks.\1.mlp.ls_gamma"),
    (r"^norm\.weight$", "ln_final.w"),
    (r"^norm\.bias$", "ln_final.b"),
    (r"^fc_norm\.weight$", "fc_norm.w"),
    (r"^fc_norm\.bias$", "fc_norm.b"),
    # everything else keeps its timm name: patch_embed.proj, cls_token, reg_token, dist_token,
    # pos_embed, blocks.{l}.attn.qkv / q_norm / k_norm / proj, blocks.{l}.mlp.fc1 / fc2, head, head_dist
]


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in STATE_DICT_RENAMES:
            if re.search(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        out[new] = value
    return out


def resolve_timm_model(
    name_or_model: str | nn.Module,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model object from a name (hub or local checkpoint) or the object itself."""
    import timm

    if isinstance(name_or_model, nn.Module):
        if checkpoint_path is not None:
            load_timm_checkpoint(name_or_model, checkpoint_path)
        return name_or_model
    if not isinstance(name_or_model, str):
        raise TypeError(f"expected a timm model name or a timm model object, got {type(name_or_model).__name__}")
    name = name_or_model
    base = name.split(".")[0]
    if not timm.is_model(base):
        import difflib

        close = difflib.get_close_matches(base, timm.list_models(), n=5) or timm.list_models(f"*{base}*")[:5]
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model name {name!r}{hint} (timm.list_models() lists them)")
    if checkpoint_path is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        load_timm_checkpoint(model, checkpoint_path)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **timm_kwargs)
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as e:  # network, hub, missing file: all mean "no weights here"
        raise RuntimeError(
            f"could not fetch pretrained weights for {name!r} from the hub ({type(e).__name__}: {e}); "
            f"pass checkpoint_path= a local timm state dict (.pth/.safetensors), or pretrained=False "
            f"for random weights"
        ) from e


def load_timm_checkpoint(model: nn.Module, checkpoint_path: str | os.PathLike) -> None:
    """Load a local timm state dict (.pth/.pt/.bin torch pickle, or .safetensors) into `model`."""
    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"could not read checkpoint {path} ({type(e).__name__}: {e}); expected a timm state dict "
            f"saved with torch.save (.pth/.pt/.bin) or a .safetensors file"
        ) from e
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match the timm model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def hooked_vit_from_timm(
    cls,
    name_or_model: str | nn.Module,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **timm_kwargs: Any,
):
    from timm.data import resolve_data_config

    timm_model = resolve_timm_model(name_or_model, checkpoint_path, pretrained, **timm_kwargs)
    cfg = config_from_timm(timm_model)
    model = cls(cfg, data_config=resolve_data_config({}, model=timm_model))
    state = convert_timm_state_dict({k: v.detach() for k, v in timm_model.state_dict().items()})
    model.load_state_dict(state, strict=True)
    model.eval()
    model.timm_name = getattr(timm_model, "pretrained_cfg", {}).get("architecture") if isinstance(
        name_or_model, nn.Module) else name_or_model
    return model.to(device=device, dtype=dtype)
