"""Modified backward passes through a `HookedViT`, for AttnLRP and LibraGrad: forward hooks that keep every
forward value and change only how the gradient flows back (the "gradient x input" form of LRP, in which
relevance at a tensor t is t ⊙ (modified gradient at t)).

The rules, each a hook on the hook point that carries the tensor it acts on:

- LayerNorm, any of them (`ln1`, `ln2`, `ln_pre`, `ln_final`, `fc_norm`): the normalisation scale is held
  constant, `hook_scale` -> `scale.detach()`, so the layer is linear in its input (AttnLRP's identity
  rule on the normalisation; LibraGrad's LayerNorm correction).
- the MLP activation, any gated one act(x) = x · gate(x) (GELU, tanh-GELU, QuickGELU, SiLU, ReLU): the
  gate is held constant, so the backward pass multiplies by act(x) / x (AttnLRP's identity rule;
  LibraGrad's gate pruning). Written as x · gate(x).detach() plus the exact forward value. A SwiGLU-style
  MLP, act(g) · x: the gate of act held as above, then with "uniform" the product split evenly between
  g and x (AttnLRP's uniform rule on a product), with "constant" act(g) held, so relevance flows through
  x only (LibraGrad's gate pruning).
- attention, two rules:
  "uniform"  AttnLRP: the gradient is scaled by 1/4 at the query and the key and by 1/2 at the value.
             That is the uniform rule on both bilinear products (A·V: half to A, half to V; q·k: half of
             A's half to each), with the softmax's own gradient in between, which in gradient x input
             form is exactly AttnLRP's softmax rule R_in = x ⊙ (R_out - s Σ R_out).
  "constant" LibraGrad (and CP-LRP): query and key detached, the attention weights held constant, so
             relevance flows through the values only.
- linear layers (patch embedding, qkv, attention output, fc1, fc2; the head is the caller's): the
  epsilon rule, the gradient scaled by z / (z + ε sign(z)) at the layer's output z (ε = 0 is the plain
  gradient, the authors' efficient implementation).
- an attention-pooling head ('map', SigLIP): its attention, LayerNorm and MLP by the same rules as a
  block's. Its query comes from the learned probe, not from the image, so the relevance the rules send to
  the query stays there (with "uniform", a quarter of its attention's relevance, as the scores' bias term).
- unit-length features (CLIP's and SigLIP's zero-shot heads): the length held, like a LayerNorm's scale.

Which models: every HookedViT except qk-norm (a LayerNorm inside attention with no hook point to hold its
scale), which `check_rule_support` refuses with the feature named.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from hooked_vit import HookedViT

AttentionRule = Literal["uniform", "constant"]
GATED_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")
SUPPORTED_HELP = (
    "supported: ViTs with LayerNorm (pre-norm blocks, ln_pre, ln_final, fc_norm), softmax attention without "
    f"qk-norm, MLP activations {', '.join(GATED_ACTIVATIONS)} (plain or SwiGLU-style), any prefix tokens, pooling "
    "(attention pooling too), LayerScale and unit-length features"
)


def check_rule_support(model: object, method: str) -> None:
    """A ValueError naming the model feature `method` has no backward rule for, and what is supported."""
    if not isinstance(model, HookedViT):
        raise ValueError(f"{method} runs on a hooked_vit.HookedViT, got {type(model).__name__}; {SUPPORTED_HELP}")
    cfg = model.cfg
    if cfg.qk_norm:
        raise ValueError(
            f"{method} has no rule for qk-norm (the LayerNorm on queries and keys inside attention, timm's "
            f"qk_norm=True): this model uses it; {SUPPORTED_HELP}"
        )
    if cfg.act_fn not in GATED_ACTIVATIONS:
        raise ValueError(f"{method} has no rule for the MLP activation {cfg.act_fn!r}; {SUPPORTED_HELP}")


def gate(act_fn: str, x: Tensor) -> Tensor:
    """gate(x) with act(x) = x · gate(x) for the gated activations of `hooked_vit.components`."""
    if act_fn == "gelu":
        return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if act_fn == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if act_fn == "quick_gelu":
        return torch.sigmoid(1.702 * x)
    if act_fn == "silu":
        return torch.sigmoid(x)
    if act_fn == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"no gate for activation {act_fn!r}; accepted: {', '.join(GATED_ACTIVATIONS)}")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g * ctx.factor, None


class _EpsilonGrad(torch.autograd.Function):
    """Identity forward at a linear layer's output z; the gradient times z / (z + ε sign(z)), sign(0) = 1."""

    @staticmethod
    def forward(ctx, z: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        stab = torch.where(z >= 0, ctx.eps, -ctx.eps)
        return g * (z / (z + stab)), None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    return _ScaleGrad.apply(x, factor)


def epsilon_grad(z: Tensor, eps: float) -> Tensor:
    return _EpsilonGrad.apply(z, eps) if eps > 0 else z


def linear_through(value: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """`value` forward, with the gradient of x ⊙ factor.detach() backward (to x only)."""
    lin = x * factor.detach()
    return lin + (value - lin).detach()


Hook = tuple[str, Callable[..., Tensor]]


def rule_hooks(model: HookedViT, attention: AttentionRule, epsilon: float = 0.0) -> list[Hook]:
    """The forward hooks that implement the rules above on `model` (see the module docstring). Every
    forward value is unchanged (up to float rounding); use inside `model.hooks(fwd_hooks=...)`."""
    cfg = model.cfg
    hooks: list[Hook] = []

    def hold_scale(scale: Tensor, hook) -> Tensor:
        return scale.detach()

    hooks += [(name, hold_scale) for name in model.hook_dict if name.endswith("hook_scale")]

    def eps_hook(z: Tensor, hook) -> Tensor:
        return epsilon_grad(z, epsilon)

    if epsilon > 0:
        hooks.append(("hook_embed", eps_hook))
    prefixes = [f"blocks.{layer}." for layer in range(cfg.n_layers)]
    if getattr(model, "attn_pool", None) is not None:
        prefixes.append("attn_pool.")
    if attention == "uniform":
        qk, v = (lambda t, hook: scale_grad(epsilon_grad(t, epsilon), 0.25)), (
            lambda t, hook: scale_grad(epsilon_grad(t, epsilon), 0.5)
        )
    elif attention == "constant":
        qk, v = (lambda t, hook: t.detach()), (lambda t, hook: epsilon_grad(t, epsilon))
    else:
        raise ValueError(f"attention rule {attention!r} is not accepted; choose 'uniform' or 'constant'")
    for prefix in prefixes:
        pre_store: dict[str, Tensor] = {}

        def keep(t: Tensor, hook, store=pre_store) -> Tensor:
            t = epsilon_grad(t, epsilon)
            store[hook.name.rsplit(".", 1)[-1]] = t
            return t

        def gated_post(post: Tensor, hook, store=pre_store) -> Tensor:
            pre = store.pop("hook_pre")
            lin = store.pop("hook_pre_linear", None)
            g = gate(cfg.act_fn, pre.detach())
            if lin is None:  # act(pre) = pre · gate(pre), the gate held
                return linear_through(post, pre, g)
            if attention == "uniform":  # act(pre) · lin: the gate held, the product split evenly
                part = scale_grad(pre, 0.5) * g * scale_grad(lin, 0.5)
                return part + (post - part).detach()
            return linear_through(post, lin, pre.detach() * g)  # the gate pruned: through lin only

        attn = prefix if prefix == "attn_pool." else prefix + "attn."
        hooks += [(attn + "hook_q", qk), (attn + "hook_k", qk), (attn + "hook_v", v)]
        hooks += [(prefix + "mlp.hook_pre", keep), (prefix + "mlp.hook_post", gated_post)]
        if prefix + "mlp.hook_pre_linear" in model.hook_dict:
            hooks.append((prefix + "mlp.hook_pre_linear", keep))
        if epsilon > 0:
            hooks += [(prefix + "hook_attn_out", eps_hook), (prefix + "hook_mlp_out", eps_hook)]
    return hooks
