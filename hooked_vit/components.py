"""The building blocks of a `HookedViT`: LayerNorm, attention, MLP (plain or SwiGLU-style gated), the
transformer block, and the pieces of the heads (attention pooling, unit-length features).

Every intermediate activation passes through a `transformer_lens` `HookPoint`, with its shape written
beside it. Hook names follow TransformerLens wherever one exists.

Two fast paths keep an un-hooked forward as fast as timm's, and each falls back to the explicit
computation as soon as someone hooks what it would skip:
- attention uses `torch.nn.functional.scaled_dot_product_attention` unless `hook_attn_scores` or
  `hook_pattern` has a hook;
- LayerNorm uses `torch.nn.functional.layer_norm` unless `hook_scale` has a hook.
The explicit paths compute the same function (tests compare them to 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig


def _hooked(hook_point: HookPoint) -> bool:
    """Whether a forward or backward hook is attached (cheaper than `HookPoint.has_hooks` on the hot
    path). Backward hooks count: they only fire if the fast path does not skip the hook point."""
    return bool(hook_point._forward_hooks or hook_point._backward_hooks)


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(act_fn: str) -> nn.Module:
    table: dict[str, nn.Module] = {
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "quick_gelu": QuickGELU(),
        "relu": nn.ReLU(),
        "silu": nn.SiLU(),
    }
    if act_fn not in table:
        raise ValueError(f"unknown act_fn {act_fn!r}; accepted: {', '.join(table)}")
    return table[act_fn]


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' hooks: `hook_scale` (the divisor) and `hook_normalized` (the
    output, after the affine transform). Works on any leading shape."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1] (or [batch, 1] on a pooled vector)
        self.hook_normalized = HookPoint()  # [batch, pos, d_model] (or [batch, d_model])

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if not _hooked(self.hook_scale):
            out = F.layer_norm(x, (x.shape[-1],), self.w, self.b, self.eps)
            return self.hook_normalized(out)
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> one d_model vector per patch, row-major."""

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            cfg.in_chans, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
        )

    def forward(self, pixels: Float[Tensor, "batch chan H W"]) -> Float[Tensor, "batch n_patches d_model"]:
        return rearrange(self.proj(pixels), "b d gh gw -> b (gh gw) d")


class Attention(nn.Module):
    """Multi-head self-attention as in timm (fused qkv projection, optional qk-norm, optional
    LayerScale folded into the output), with TransformerLens' hooks.

    `hook_q` and `hook_k` see the query and key after qk-norm (the vectors that enter the scores).
    LayerScale multiplies the output, so `hook_result` and `W_O` / `b_O` include it: the heads'
    results sum to `hook_attn_out` minus `b_O`.
    """

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.scale = cfg.d_head**-0.5
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.q_norm = nn.LayerNorm(cfg.d_head, eps=cfg.qk_norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.LayerNorm(cfg.d_head, eps=cfg.qk_norm_eps) if cfg.qk_norm else None
        self.proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=cfg.proj_bias)
        self.ls_gamma = nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale else None

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_pattern = HookPoint()  # [batch, head, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model] (only when cfg.use_attn_result)

    # ---- TransformerLens-style weight views (read-only views of the fused timm weights)
    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self._in_weight(0)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._in_weight(1)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._in_weight(2)

    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return self._in_bias(0)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._in_bias(1)

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._in_bias(2)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        """Per-head output weights, LayerScale included."""
        w = rearrange(self.proj.weight, "m (h d) -> h d m", h=self.n_heads)
        return w * self.ls_gamma if self.ls_gamma is not None else w

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        """Output bias, LayerScale included."""
        b = self.proj.bias if self.proj.bias is not None else self.proj.weight.new_zeros(self.proj.out_features)
        return b * self.ls_gamma if self.ls_gamma is not None else b

    def _in_weight(self, i: int) -> Tensor:
        w = self.qkv.weight.view(3, self.n_heads, self.d_head, -1)[i]
        return rearrange(w, "h d m -> h m d")

    def _in_bias(self, i: int) -> Tensor:
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(self.n_heads, self.d_head)
        return self.qkv.bias.view(3, self.n_heads, self.d_head)[i]

    # ---- forward
    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.d_head).unbind(2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        if _hooked(self.hook_attn_scores) or _hooked(self.hook_pattern):
            scores = self.hook_attn_scores((q * self.scale) @ k.transpose(-2, -1))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        out = self.proj(z.reshape(b, n, self.n_heads * self.d_head))
        return out * self.ls_gamma if self.ls_gamma is not None else out

    def forward_queries(self, x: Float[Tensor, "batch pos d_model"], queries: list[int]
                        ) -> Float[Tensor, "batch query d_model"]:
        """The output at the query tokens `queries` only, every token still a key and a value. Fires
        `hook_k` and `hook_v` (full shapes) and no other hook point: the caller checks those are unhooked."""
        b, n, _ = x.shape
        h, dh = self.n_heads, self.d_head
        w, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, w[h * dh :], None if bias is None else bias[h * dh :]).view(b, n, 2, h, dh)
        k, v = kv.unbind(2)
        q = F.linear(x[:, queries], w[: h * dh], None if bias is None else bias[: h * dh]).view(b, len(queries), h, dh)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k, v = self.hook_k(k), self.hook_v(v)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = self.proj(z.transpose(1, 2).reshape(b, len(queries), h * dh))
        return out * self.ls_gamma if self.ls_gamma is not None else out


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (LayerScale folded into the output, as in Attention). `bias` and
    `layer_scale` default to the config's (the attention-pooling head's MLP has biases and no LayerScale)."""

    def __init__(self, cfg: HookedViTConfig, bias: bool | None = None, layer_scale: bool | None = None) -> None:
        super().__init__()
        bias = cfg.mlp_bias if bias is None else bias
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=bias)
        self.act = make_activation(cfg.act_fn)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=bias)
        use_ls = cfg.layer_scale if layer_scale is None else layer_scale
        self.ls_gamma = nn.Parameter(torch.ones(cfg.d_model)) if use_ls else None
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc1.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return _bias(self.fc1)

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """Output weights, LayerScale included."""
        return self.fc2.weight.T * self.ls_gamma if self.ls_gamma is not None else self.fc2.weight.T

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        b = _bias(self.fc2)
        return b * self.ls_gamma if self.ls_gamma is not None else b

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        post = self.hook_post(self.act(self.hook_pre(self.fc1(x))))
        out = self.fc2(post)
        return out * self.ls_gamma if self.ls_gamma is not None else out


class GatedMLP(MLP):
    """SwiGLU-style MLP: fc2(act(fc1_g(x)) * fc1_x(x)), LayerScale folded into the output. Hooks as in
    TransformerLens' gated MLP: `hook_pre` is the gate's pre-activation fc1_g(x), `hook_pre_linear` the
    other branch fc1_x(x), `hook_post` their product after the activation."""

    def __init__(self, cfg: HookedViTConfig) -> None:
        nn.Module.__init__(self)
        self.fc1_g = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.fc1_x = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.act = make_activation(cfg.act_fn)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.ls_gamma = nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale else None
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc1_g.weight.T

    @property
    def b_gate(self) -> Float[Tensor, " d_mlp"]:
        return _bias(self.fc1_g)

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc1_x.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return _bias(self.fc1_x)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate = self.act(self.hook_pre(self.fc1_g(x)))
        post = self.hook_post(gate * self.hook_pre_linear(self.fc1_x(x)))
        out = self.fc2(post)
        return out * self.ls_gamma if self.ls_gamma is not None else out


def _bias(linear: nn.Linear) -> Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


class TransformerBlock(nn.Module):
    """Pre-norm block: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid))."""

    def __init__(self, cfg: HookedViTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp = GatedMLP(cfg) if cfg.gated_mlp else MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model] (after LayerScale)
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model] (after LayerScale)
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def forward_tokens(self, resid_pre: Float[Tensor, "batch pos d_model"], tokens: list[int]
                       ) -> Float[Tensor, "batch token d_model"]:
        """The block's output at `tokens` only: what a last block computes when the head reads only
        those tokens (class-token pooling). Every token still enters attention as a key and a value, so
        the result equals `forward(resid_pre)[:, tokens]` (up to float rounding). Fires the hook points
        that see every token (`tokens_only_hooks`) and no other: the caller checks the rest are unhooked."""
        resid_pre = self.hook_resid_pre(resid_pre)
        resid_mid = resid_pre[:, tokens] + self.attn.forward_queries(self.ln1(resid_pre), tokens)
        return resid_mid + self.mlp(self.ln2(resid_mid))

    def tokens_only_hooks(self) -> list[HookPoint]:
        """The hook points `forward_tokens` fires, with the same shapes as `forward`."""
        return [self.hook_resid_pre, self.ln1.hook_scale, self.ln1.hook_normalized, self.attn.hook_k, self.attn.hook_v]


class AttentionPool(nn.Module):
    """Multi-head attention pooling ("MAP" head): one learned query, the probe, attends over the tokens;
    the result r becomes r + mlp(ln(r)), one vector per image. SigLIP's vision head and timm's
    `global_pool='map'`. Hooks as in a block, with one query position (the probe)."""

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        d, self.n_heads, self.d_head = cfg.d_model, cfg.n_heads, cfg.d_head
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.ln = LayerNorm(d, cfg.eps)
        self.mlp = MLP(cfg, bias=True, layer_scale=False)
        self.hook_q = HookPoint()  # [batch, 1, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, 1, k_pos]
        self.hook_pattern = HookPoint()  # [batch, head, 1, k_pos]
        self.hook_z = HookPoint()  # [batch, 1, head, d_head]
        self.hook_attn_out = HookPoint()  # [batch, 1, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, 1, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_model"]:
        b, n, _ = x.shape
        h, dh = self.n_heads, self.d_head
        q = self.hook_q(self.q(self.probe.expand(b, -1, -1)).view(b, 1, h, dh))
        k, v = self.kv(x).view(b, n, 2, h, dh).unbind(2)
        k, v = self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]
        if _hooked(self.hook_attn_scores) or _hooked(self.hook_pattern):
            scores = self.hook_attn_scores((q * dh**-0.5) @ k.transpose(-2, -1))
            z = self.hook_pattern(scores.softmax(dim=-1)) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))  # [batch, 1, head, d_head]
        r = self.hook_attn_out(self.proj(z.reshape(b, 1, h * dh)))
        return (r + self.hook_mlp_out(self.mlp(self.ln(r))))[:, 0]


class FeatureNorm(nn.Module):
    """Scale each feature vector to unit length (CLIP's and SigLIP's image embeddings before their cosine
    similarity with text embeddings), with LayerNorm's hook names: `hook_scale` is the length."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_scale = HookPoint()  # [batch, 1]
        self.hook_normalized = HookPoint()  # [batch, d_features]

    def forward(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch d"]:
        return self.hook_normalized(x / self.hook_scale(x.norm(dim=-1, keepdim=True)))
