"""timm -> HookedViT conversion, table-driven.

Three tables do the work:
- `_unsupported_table`: timm features this package does not convert; each one found raises an error that
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


class UnsupportedFeature(ValueError):
    """The source model (timm or Hugging Face `transformers`) uses an architecture, a feature or a config
    option that HookedViT does not convert; the message names it and what is supported."""


UnsupportedTimmFeature = UnsupportedFeature
"""The name this error had when only timm models converted (kept for existing code)."""


class ConversionMismatch(RuntimeError):
    """The converted model does not compute what its source computes on the check input (refused
    rather than returned: a silently different model is worse than none)."""


def check_against_source(
    model: nn.Module, reference: Callable[[torch.Tensor], torch.Tensor], source: str, seed: int = 0,
) -> float:
    """Run `model` and `reference` (the source model's forward) on one image of Gaussian pixels at the
    model's native size, on the model's device and in its dtype, and raise `ConversionMismatch` unless
    the outputs agree: max |difference| <= 1e-4 x max(1, max |reference|) in fp32 or fp64, 1e-2 x in
    half precision (the check catches a wrong structure, whose errors are of the order of the outputs,
    not float rounding). Returns the max |difference|."""
    param = next(model.parameters())
    cfg = model.cfg
    x = torch.randn(1, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(seed))
    x = x.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        ref, out = reference(x), model(x)
    if out.shape != ref.shape:
        raise ConversionMismatch(
            f"the converted model returns {tuple(out.shape)}, {source} returns {tuple(ref.shape)} on the check input"
        )
    diff = (out.float() - ref.float()).abs().max().item()
    rel = 1e-4 if param.dtype in (torch.float32, torch.float64) else 1e-2
    tol = rel * max(1.0, ref.float().abs().max().item())
    if not diff <= tol:  # NaN fails too
        raise ConversionMismatch(
            f"the converted model differs from {source} on the check input by up to {diff:.3g} (tolerance {tol:.3g}): "
            f"refusing a silently different model; please report the model's config"
        )
    return diff


def _blocks(m: nn.Module) -> list[nn.Module]:
    return list(getattr(m, "blocks", []))


def _any_block(pred: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    return lambda m: any(pred(b) for b in _blocks(m))


def _not_identity(mod: Any) -> bool:
    return mod is not None and not isinstance(mod, nn.Identity)


def _mlp_kind(mlp: nn.Module) -> str | None:
    """"plain" (timm's `Mlp`), "swiglu" (`SwiGLU`: fc1_g, fc1_x), "glu" (`GluMlp` / `SwiGLUPacked`: one fc1
    whose halves are the two branches), or None for another MLP."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp:
        return "plain"
    if type(mlp) is SwiGLU:
        return "swiglu"
    if type(mlp) is GluMlp and isinstance(mlp.fc1, nn.Linear):
        return "glu"
    return None


def _mlp_act(mlp: nn.Module) -> nn.Module:
    return mlp.act


def _d_mlp(mlp: nn.Module) -> int:
    """The width of the MLP's activation (of each branch for a gated MLP)."""
    kind = _mlp_kind(mlp)
    if kind == "swiglu":
        return mlp.fc1_g.out_features
    return mlp.fc1.out_features // 2 if kind == "glu" else mlp.fc1.out_features


def _map_problems(m: nn.Module) -> bool:
    """Whether timm's attention-pooling head has options HookedViT's `AttentionPool` lacks (several latent
    queries, its own position embedding, qk-norm, no query projection, no MLP, another pooling of the
    latents, missing biases, an MLP of another width than the blocks')."""
    pool = getattr(m, "attn_pool", None)
    if pool is None:
        return False
    from timm.layers import AttentionPoolLatent

    return (type(pool) is not AttentionPoolLatent or pool.latent_len != 1 or pool.pos_embed is not None
            or _not_identity(pool.q_norm) or not isinstance(pool.q, nn.Linear) or pool.mlp is None
            or pool.pool != "token" or pool.q.bias is None or pool.kv.bias is None
            or pool.mlp.fc1.out_features != _d_mlp(m.blocks[0].mlp) or _act_name(pool.mlp.act) != _act_name(
                _mlp_act(m.blocks[0].mlp)))


def _unsupported_table() -> list[tuple[str, Callable[[nn.Module], bool]]]:
    from timm.layers import Attention, LayerNorm, PatchDropout
    from timm.layers.patch_embed import PatchEmbed
    from timm.models.vision_transformer import Block

    def block_type(b: nn.Module) -> bool:
        return type(b) is not Block

    return [
        ("attention pooling by rotated queries (global_pool='prr')", lambda m: getattr(m, "global_pool", "") == "prr"),
        (("an attention-pooling head ('map') with several latents, its own position embedding, qk-norm, no query "
          "projection or an MLP unlike the blocks'"), _map_problems),
        ("a block type other than timm's pre-norm `Block` (ResPostBlock, parallel blocks)", _any_block(block_type)),
        ("an attention layer other than timm's `Attention` (e.g. differential attention, RoPE)",
         _any_block(lambda b: type(b.attn) is not Attention)),
        ("gated attention (`gated=True`)", _any_block(lambda b: getattr(b.attn, "gate", None) is not None)),
        ("a norm inside attention (`scale_attn_norm=True`)", _any_block(lambda b: _not_identity(getattr(b.attn, "norm", None)))),
        ("an MLP other than timm's `Mlp`, `SwiGLU` or `GluMlp` / `SwiGLUPacked`", _any_block(lambda b: _mlp_kind(b.mlp) is None)),
        ("a norm inside the MLP (`scale_mlp_norm=True`)", _any_block(lambda b: _not_identity(getattr(b.mlp, "norm", None)))),
        ("a norm layer other than LayerNorm (e.g. RmsNorm)", lambda m: any(
            not isinstance(mod, (LayerNorm, nn.LayerNorm)) for b in _blocks(m) for mod in (b.norm1, b.norm2))),
        ("an activation other than GELU, GELU-tanh, QuickGELU, ReLU or SiLU",
         _any_block(lambda b: _act_name(_mlp_act(b.mlp)) is None)),
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
    """The `HookedViTConfig.act_fn` of a timm MLP activation module, or None if it has no equivalent.
    timm builds `act_layer="gelu"` / `"gelu_tanh"` from its own classes, not `nn.GELU`."""
    from timm.layers import activations as timm_act

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    table = {
        timm_act.GELU: "gelu",
        timm_act.GELUTanh: "gelu_tanh",
        timm_act.QuickGELU: "quick_gelu",
        nn.ReLU: "relu",
        nn.SiLU: "silu",
    }
    return table.get(type(act))


_PLAIN_VITS = ("HookedViT converts plain ViTs (ViT, DeiT, DeiT-III, CLIP, DINOv2, registers, SigLIP; SwiGLU MLPs, "
               "attention pooling)")


def check_supported(model: nn.Module) -> None:
    """Raise `UnsupportedTimmFeature` naming every feature of `model` that HookedViT cannot convert."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer) and getattr(model, "rope", None) is not None:
        raise UnsupportedFeature(
            f"{type(model).__name__} uses rotary position embeddings (timm's RoPE ViTs: vit_*_rope_*, EVA-02), "
            f"which HookedViT does not convert: it has absolute position embeddings only; {_PLAIN_VITS}"
        )
    if not isinstance(model, VisionTransformer):
        raise UnsupportedTimmFeature(
            f"{type(model).__name__} is not a timm VisionTransformer (or a subclass such as DeiT's); {_PLAIN_VITS}, "
            f"not Swin, ConvNeXt, hybrid or other architectures"
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
    mlp_kind = _mlp_kind(blk.mlp)
    fc_in = blk.mlp.fc1_g if mlp_kind == "swiglu" else blk.mlp.fc1
    return HookedViTConfig(
        n_layers=len(model.blocks),
        d_model=model.embed_dim,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        d_mlp=_d_mlp(blk.mlp),
        act_fn=_act_name(blk.mlp.act),  # type: ignore[arg-type]
        gated_mlp=mlp_kind != "plain",
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
        mlp_bias=fc_in.bias is not None,
        qk_norm=_not_identity(q_norm),
        qk_norm_eps=q_norm.eps if _not_identity(q_norm) else 1e-6,
        layer_scale=_not_identity(blk.ls1),
        final_norm=_not_identity(model.norm) or _not_identity(model.fc_norm),
        pooling=model.global_pool,  # 'map': attention pooling (timm's AttentionPoolLatent)
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
    (r"^attn_pool\.latent$", "attn_pool.probe"),
    (r"^attn_pool\.norm\.weight$", "attn_pool.ln.w"),
    (r"^attn_pool\.norm\.bias$", "attn_pool.ln.b"),
    # everything else keeps its timm name: patch_embed.proj, cls_token, reg_token, dist_token,
    # pos_embed, blocks.{l}.attn.qkv / q_norm / k_norm / proj, blocks.{l}.mlp.fc1 / fc2 (SwiGLU: fc1_g / fc1_x),
    # attn_pool.q / kv / proj / mlp, head, head_dist
]


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor], glu_gate_last: bool | None = None
                            ) -> dict[str, torch.Tensor]:
    """timm parameter names -> HookedViT's (`STATE_DICT_RENAMES`). `glu_gate_last`: for a `GluMlp` /
    `SwiGLUPacked` model, whether the gate is the second half of `fc1` (GluMlp's default) or the first
    (SwiGLUPacked); its fc1 is split into the gate `fc1_g` and the other branch `fc1_x`."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in STATE_DICT_RENAMES:
            if re.search(pattern, key):
                new = re.sub(pattern, repl, key)
                break
        glu = glu_gate_last is not None and re.match(r"^blocks\.\d+\.mlp\.fc1\.(weight|bias)$", key)
        if glu:
            first, second = value.chunk(2, dim=0)
            gate, other = (second, first) if glu_gate_last else (first, second)
            out[new.replace(".fc1.", ".fc1_g.")], out[new.replace(".fc1.", ".fc1_x.")] = gate, other
        else:
            out[new] = value
    return out


HUB_TIMEOUT_ENV = "CAAP_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 20.0
"""Seconds the hub has to answer a first request before loading gives up (`$CAAP_HUB_TIMEOUT`)."""


def check_timm_name(name: str) -> str:
    """`name` if timm knows it, else a ValueError with the closest names timm does know."""
    import timm

    if not isinstance(name, str):
        raise TypeError(f"expected a timm model name or a timm model object, got {type(name).__name__}")
    base = name.split(".")[0]
    if not timm.is_model(base):
        import difflib

        close = difflib.get_close_matches(base, timm.list_models(), n=5) or timm.list_models(f"*{base}*")[:5]
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model name {name!r}{hint} (timm.list_models() lists them)")
    return name


def timm_skeleton(name: str, **timm_kwargs: Any) -> nn.Module:
    """The timm model `name` built on the meta device: its architecture and data config, no weights,
    no memory, no network. Raises `UnsupportedTimmFeature` if HookedViT cannot convert it, so that
    a name is checked before any download."""
    import timm

    check_timm_name(name)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    check_supported(model)
    return model


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_timeout() -> float:
    text = os.environ.get(HUB_TIMEOUT_ENV)
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${HUB_TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"${HUB_TIMEOUT_ENV} must be positive, got {text!r}")
    return value


def _no_weights_help(name: str) -> str:
    return (
        f"pass checkpoint_path= (command line: --checkpoint) a local timm state dict of {name} "
        f"(.pth/.safetensors), or set CAAP_CHECKPOINT_DIR to a folder holding {name}.pth"
    )


def _hub_cached_file(skeleton: nn.Module) -> str | None:
    """The local hub-cache copy of the weights timm would fetch for this model, if there is one."""
    cfg = getattr(skeleton, "pretrained_cfg", {}) or {}
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    filename = cfg.get("hf_hub_filename")
    for candidate in [filename] if filename else ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(repo, candidate)
        if isinstance(path, str):
            return path
    return None


def _probe_hub(skeleton: nn.Module, name: str, timeout: float) -> None:
    """Ask the hub for the weights' metadata in a daemon thread, and give up after `timeout` seconds.

    huggingface_hub retries a request that times out, and a proxy that accepts connections but never
    answers keeps it waiting without end; a thread we stop waiting for bounds that. Only once the hub has
    answered does the (then fast-failing) download start."""
    import threading

    cfg = getattr(skeleton, "pretrained_cfg", {}) or {}
    repo, url = cfg.get("hf_hub_id"), cfg.get("url")
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            if repo:
                from huggingface_hub import HfApi

                HfApi().model_info(repo, timeout=timeout)
            elif url:
                import urllib.request

                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome["error"] = None
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="caap-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RuntimeError(
            f"no local weights for {name!r} and the hub did not answer within {timeout:g} s (no network, or a "
            f"proxy that does not respond); {_no_weights_help(name)}, or set HF_HUB_OFFLINE=1 to fail at once "
            f"(${HUB_TIMEOUT_ENV} sets the wait)"
        )
    error = outcome.get("error")
    if error is not None:
        raise RuntimeError(
            f"no local weights for {name!r} and the hub could not be reached ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); {_no_weights_help(name)}"
        ) from error


def resolve_timm_model(
    name_or_model: str | nn.Module,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model object from a name (a local checkpoint, or the hub) or the object itself.

    A name is checked first (known to timm, and a ViT HookedViT converts) on the meta device, so that an
    unsupported name fails at once, before any download. Hub downloads honour `HF_HUB_OFFLINE` (only
    the local hub cache is used) and give up after `$CAAP_HUB_TIMEOUT` seconds (default 20) when the hub
    does not answer."""
    import timm

    if isinstance(name_or_model, nn.Module):
        if checkpoint_path is not None:
            load_timm_checkpoint(name_or_model, checkpoint_path)
        return name_or_model
    name = check_timm_name(name_or_model)
    skeleton = timm_skeleton(name, **timm_kwargs)
    if checkpoint_path is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        load_timm_checkpoint(model, checkpoint_path)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **timm_kwargs)
    cached = _hub_cached_file(skeleton)
    if cached is not None:  # timm's own loader (and its checkpoint filter) on the cached file: no network
        timm_kwargs = {**timm_kwargs, "pretrained_cfg_overlay": {**timm_kwargs.get("pretrained_cfg_overlay", {}),
                                                                 "file": cached}}
    else:
        if _env_flag("HF_HUB_OFFLINE"):
            raise RuntimeError(
                f"no local weights for {name!r} and HF_HUB_OFFLINE is set, so the hub is not asked; "
                f"{_no_weights_help(name)}"
            )
        _probe_hub(skeleton, name, _hub_timeout())
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as e:  # network, hub, missing file: all mean "no weights here"
        raise RuntimeError(
            f"could not fetch pretrained weights for {name!r} from the hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); {_no_weights_help(name)}, or pretrained=False for "
            f"random weights"
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
    mlp = timm_model.blocks[0].mlp
    glu = bool(mlp.gate_last) if _mlp_kind(mlp) == "glu" else None
    state = convert_timm_state_dict({k: v.detach() for k, v in timm_model.state_dict().items()}, glu_gate_last=glu)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.timm_name = getattr(timm_model, "pretrained_cfg", {}).get("architecture") if isinstance(
        name_or_model, nn.Module) else name_or_model
    return model.to(device=device, dtype=dtype)
