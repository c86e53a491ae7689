"""Hook-point names: one function from a component and a layer to the hook's full name.

The names are TransformerLens' (`transformer_lens.utils.get_act_name` builds the same ones), so the
same component names serve `HookedViT` and TransformerLens language models alike:

    act_name("resid_pre", 3)             -> "blocks.3.hook_resid_pre"
    act_name("pattern", 3)               -> "blocks.3.attn.hook_pattern"
    act_name("normalized", 11, "ln1")    -> "blocks.11.ln1.hook_normalized"
    act_name("embed")                    -> "hook_embed"
"""

from __future__ import annotations

COMPONENTS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
}
"""Per-block components: name -> the hook's name inside block `l` (`blocks.{l}.<that>`)."""

HEAD_COMPONENTS = frozenset({"q", "k", "v", "z", "result", "attn_scores", "pattern"})
"""Components with a head axis."""

NORM_COMPONENTS = ("scale", "normalized")
"""LayerNorm hooks: `act_name("scale", l, "ln1")` -> `blocks.{l}.ln1.hook_scale`; without a layer,
`act_name("normalized", norm="ln_final")` -> `ln_final.hook_normalized`."""

MODEL_COMPONENTS = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "pooled": "hook_pooled"}
"""Hooks outside the blocks."""


def act_name(component: str, layer: int | None = None, norm: str | None = None) -> str:
    """The full hook-point name of `component` in block `layer` (see the module docstring).

    `norm` names the LayerNorm ("ln1", "ln2", "ln_final", "ln_pre", "fc_norm") for "scale" and
    "normalized". Unknown components raise a ValueError that lists the accepted ones."""
    if component in NORM_COMPONENTS:
        if norm is None:
            raise ValueError(f"component {component!r} needs norm= (ln1, ln2, ln_final, ln_pre or fc_norm)")
        return f"{norm}.hook_{component}" if layer is None else f"blocks.{layer}.{norm}.hook_{component}"
    if layer is None and component in MODEL_COMPONENTS:
        return MODEL_COMPONENTS[component]
    if component not in COMPONENTS:
        accepted = [*COMPONENTS, *NORM_COMPONENTS, *MODEL_COMPONENTS]
        raise ValueError(f"unknown component {component!r}; accepted: {', '.join(accepted)}")
    if layer is None:
        raise ValueError(f"component {component!r} is per block: pass its layer")
    return f"blocks.{layer}.{COMPONENTS[component]}"
