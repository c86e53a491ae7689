"""`HookedViTConfig`: the architecture of a Vision Transformer, and nothing else.

Field names follow TransformerLens' config (`TransformerLensConfig`) wherever the meaning is the same
(`n_layers`, `d_model`, `n_heads`, `d_head`, `d_mlp`, `act_fn`, `eps`, `use_attn_result`, ...), so
that `transformer_lens.ActivationCache` and code written for language models read it unchanged. The
rest describes what a ViT has and a language model does not: the image and patch size, the prefix
tokens (class token, register tokens, distillation token), CLIP's pre-norm, pooling (class token,
averages, attention pooling, DINOv2's class token and patch mean), `fc_norm`, LayerScale, qk-norm, the
SwiGLU MLP, and the image-text heads of CLIP and SigLIP (projection, unit-length features).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from hooked_vit.checks import as_int

ActFn = Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu"]
Pooling = Literal["token", "avg", "max", "avgmax", "map", "token_avg"]
POOLINGS: tuple[str, ...] = ("token", "avg", "max", "avgmax", "map", "token_avg")
"""`HookedViTConfig.pooling`: the class token; the mean, max or their average over the tokens; attention
pooling with one learned query ("map": SigLIP's head, timm's `global_pool='map'`); the class token and the
mean of the patch tokens side by side ("token_avg": DINOv2's classifier)."""


@dataclass
class HookedViTConfig:
    """Architecture of a `HookedViT`. Build one by hand, or let `HookedViT.from_timm` / `HookedViT.from_hf`
    read it off a timm or Hugging Face model.

    Token axis: prefix tokens first (class, then registers, then the distillation token), then the
    patches in row-major order, exactly as timm lays them out.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    act_fn: ActFn = "gelu"
    eps: float = 1e-6
    # --- image and patches
    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    dynamic_img_size: bool = False
    """Whether the model accepts any image size divisible by the patch size (the position
    embeddings are resampled to the image's grid, as timm's `dynamic_img_size=True` and Hugging Face's
    `interpolate_pos_encoding=True` do)."""
    # --- prefix tokens
    class_token: bool = True
    n_registers: int = 0
    distilled: bool = False
    """DeiT distilled: a distillation token after the class token and a second head; at inference
    the two heads' logits are averaged."""
    dist_head: bool = True
    """For a distilled model: whether the distillation token has its own head, averaged with the class
    token's (timm, Hugging Face's `DeiTForImageClassificationWithTeacher`), or the head reads the class
    token alone (Hugging Face's `DeiTForImageClassification` and `DeiTModel`)."""
    # --- embeddings
    pos_embed: bool = True
    no_embed_class: bool = False
    """Position embeddings cover only the patches (DeiT-III, DINOv2 with registers), not the prefix."""
    patch_bias: bool = True
    pre_norm: bool = False
    """CLIP's `ln_pre`: a LayerNorm on the embeddings before the first block."""
    pos_embed_antialias: bool = True
    """How the position embeddings are resampled to another grid: bicubic with antialiasing, as timm
    does (True), or plain bicubic, as Hugging Face's `interpolate_pos_encoding` does (False)."""
    # --- blocks
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    layer_scale: bool = False
    gated_mlp: bool = False
    """SwiGLU-style MLP (TransformerLens' name): fc2(act(fc1_g(x)) * fc1_x(x)), with `d_mlp` the width
    of each branch (DINOv2's SwiGLU variant, timm's SwiGLU and SwiGLUPacked)."""
    # --- head
    final_norm: bool = True
    """Whether there is a final LayerNorm (`ln_final` over all tokens, or `fc_norm` after pooling)."""
    pooling: Pooling = "token"
    pool_include_prefix: bool = False
    fc_norm: bool = False
    """Final LayerNorm after pooling (`fc_norm`) instead of before it (`ln_final`)."""
    proj_dim: int = 0
    """A linear map without bias from the pooled (and normed) features into an image-text embedding
    space of this width (CLIP's `visual_projection`); 0: none."""
    normalize_features: bool = False
    """Scale the features (after the projection) to unit length before the head: with a head whose
    rows are class embeddings times a logit scale, the logits are CLIP's and SigLIP's scaled cosine
    similarities (`HookedViT.set_zero_shot_head`)."""
    n_classes: int = 1000
    """Number of classes of the head; 0 means no head (the model returns the features: the pooled
    representation, projected and normalised where the model does so)."""
    # --- run-time options, as in TransformerLens
    use_attn_result: bool = False
    """Compute each head's output separately (`attn.hook_result`, [batch, pos, head, d_model])."""
    device: str | torch.device | None = None
    """Where the model's parameters are, as in TransformerLens' config (whose utilities, e.g.
    `patching.generic_activation_patch` and `ActivationCache`, read it): set by `HookedViT` when it is
    built and kept in sync by its `.to()` / `.cuda()` / `.cpu()`."""
    # --- fixed, for transformer_lens.ActivationCache
    normalization_type: str = field(default="LN", init=False)
    attn_only: bool = field(default=False, init=False)
    positional_embedding_type: str = field(default="standard", init=False)

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size, "img_size")
        self.patch_size = _pair(self.patch_size, "patch_size")
        problems = []
        if self.n_layers < 1:
            problems.append(f"n_layers must be at least 1, got {self.n_layers}")
        if self.n_heads * self.d_head <= 0:
            problems.append(f"n_heads and d_head must be positive, got {self.n_heads}, {self.d_head}")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            problems.append(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")
        if self.pooling in ("token", "token_avg") and not self.class_token:
            problems.append(f"pooling={self.pooling!r} needs a class token")
        if self.pooling == "map" and self.n_heads * self.d_head != self.d_model:
            problems.append("attention pooling ('map') needs n_heads * d_head == d_model")
        if self.pooling == "token_avg" and (self.fc_norm or self.proj_dim):
            problems.append("pooling='token_avg' takes neither fc_norm nor a projection")
        if self.proj_dim < 0:
            problems.append(f"proj_dim must be 0 (none) or positive, got {self.proj_dim}")
        if self.distilled and (not self.class_token or self.pooling != "token"):
            problems.append("a distilled model needs a class token and pooling='token'")
        if self.act_fn not in ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu"):
            problems.append(f"act_fn must be gelu, gelu_tanh, quick_gelu, relu or silu; got {self.act_fn!r}")
        if problems:
            raise ValueError("invalid HookedViTConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived quantities
    @property
    def grid_size(self) -> tuple[int, int]:
        """(grid_h, grid_w) at the model's native image size."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_prefix_tokens(self) -> int:
        """Class token + register tokens + distillation token."""
        return int(self.class_token) + self.n_registers + int(self.distilled)

    @property
    def d_features(self) -> int:
        """Width of what the head reads: the projection's, else d_model (twice d_model for
        'token_avg', whose two pooled vectors are concatenated)."""
        if self.proj_dim:
            return self.proj_dim
        return 2 * self.d_model if self.pooling == "token_avg" else self.d_model

    @property
    def n_ctx(self) -> int:
        """Number of tokens at the native image size (TransformerLens' name)."""
        return self.n_prefix_tokens + self.n_patches

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("normalization_type", "attn_only", "positional_embedding_type", "device"):
            d.pop(k)
        return d


def _pair(x: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if not isinstance(x, (tuple, list)):
        v = as_int(x, name)
        return (v, v)
    if len(x) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {x!r}")
    return as_int(x[0], name), as_int(x[1], name)
