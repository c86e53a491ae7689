"""`HookedViT`: a Vision Transformer as a TransformerLens `HookedRootModule`.

Hook points, in the order a forward pass meets them (shapes at batch b, T tokens, N patches):

    hook_embed                     [batch, n_patches, d_model]  patch embeddings
    hook_pos_embed                 [batch, pos, d_model]        position embeddings (zeros on prefix
                                                                tokens when the model has none there)
    ln_pre.hook_scale/_normalized  [batch, pos, 1] / [batch, pos, d_model]   (CLIP pre-norm only)
    blocks.{l}.hook_resid_pre      [batch, pos, d_model]
    blocks.{l}.ln1.hook_scale      [batch, pos, 1]
    blocks.{l}.ln1.hook_normalized [batch, pos, d_model]
    blocks.{l}.attn.hook_q/_k/_v   [batch, pos, head, d_head]
    blocks.{l}.attn.hook_attn_scores  [batch, head, q_pos, k_pos]
    blocks.{l}.attn.hook_pattern   [batch, head, q_pos, k_pos]
    blocks.{l}.attn.hook_z         [batch, pos, head, d_head]
    blocks.{l}.attn.hook_result    [batch, pos, head, d_model]  (cfg.use_attn_result)
    blocks.{l}.hook_attn_out       [batch, pos, d_model]        (after LayerScale)
    blocks.{l}.hook_resid_mid      [batch, pos, d_model]
    blocks.{l}.ln2.hook_scale/_normalized
    blocks.{l}.mlp.hook_pre/_post  [batch, pos, d_mlp]
    blocks.{l}.mlp.hook_pre_linear [batch, pos, d_mlp]          (gated MLP: the branch fc1_x)
    blocks.{l}.hook_mlp_out        [batch, pos, d_model]        (after LayerScale)
    blocks.{l}.hook_resid_post     [batch, pos, d_model]
    ln_final.hook_scale/_normalized  [batch, pos, 1] / [batch, pos, d_model]  (not with fc_norm)
    attn_pool.hook_q               [batch, 1, head, d_head]     (attention pooling, 'map': the probe)
    attn_pool.hook_k/_v            [batch, pos, head, d_head]
    attn_pool.hook_attn_scores/_pattern  [batch, head, 1, k_pos]
    attn_pool.hook_z               [batch, 1, head, d_head]
    attn_pool.hook_attn_out        [batch, 1, d_model]
    attn_pool.ln.hook_scale/_normalized  [batch, 1, 1] / [batch, 1, d_model]
    attn_pool.mlp.hook_pre/_post   [batch, 1, d_mlp]
    attn_pool.hook_mlp_out         [batch, 1, d_model]
    hook_pooled                    [batch, d_model]; [batch, 2, d_model] for DeiT distilled
                                   (class, distillation token) and 'token_avg' (class token, patch
                                   mean): the pooled representation
    fc_norm.hook_scale/_normalized [batch, 1] / [batch, d_model]  (fc_norm models only)
    hook_projected                 [batch, proj_dim]            (CLIP's visual projection)
    feature_norm.hook_scale/_normalized  [batch, 1] / [batch, d_features]  (unit-length features)

Token axis: prefix tokens first (class, registers, distillation), then patches row-major.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from hooked_vit.checks import IndexRangeError, as_int
from hooked_vit.components import AttentionPool, FeatureNorm, LayerNorm, PatchEmbed, TransformerBlock
from hooked_vit.config import HookedViTConfig

if TYPE_CHECKING:
    from hooked_vit.cache import ViTActivationCache


class HookedViT(HookedRootModule):
    """A Vision Transformer with a `HookPoint` on every intermediate activation.

    Build it from timm with `HookedViT.from_timm(...)` or from Hugging Face `transformers` with
    `HookedViT.from_hf(...)`; it then computes the same function as its source (logits to 1e-4 in
    fp32, every block's output to 1e-5).
    """

    def __init__(self, cfg: HookedViTConfig, data_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.data_config: dict[str, Any] = dict(data_config) if data_config else _default_data_config(cfg)
        """The source model's preprocessing: timm's data config (input size, mean, std, crop,
        interpolation), with the image processor's steps added for a Hugging Face model
        (`hooked_vit.preprocess`); timm's defaults for a model built by hand."""
        d = cfg.d_model
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.n_registers, d)) if cfg.n_registers else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        n_pos = cfg.n_patches + (0 if cfg.no_embed_class else cfg.n_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d)) if cfg.pos_embed else None
        self.ln_pre = LayerNorm(d, cfg.eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList([TransformerBlock(cfg, layer) for layer in range(cfg.n_layers)])
        self.ln_final = LayerNorm(d, cfg.eps) if cfg.final_norm and not cfg.fc_norm else None
        self.attn_pool = AttentionPool(cfg) if cfg.pooling == "map" else None
        self.fc_norm = LayerNorm(d, cfg.eps) if cfg.final_norm and cfg.fc_norm else None
        self.proj = nn.Linear(d, cfg.proj_dim, bias=False) if cfg.proj_dim else None
        self.feature_norm = FeatureNorm() if cfg.normalize_features else None
        self.head = nn.Linear(cfg.d_features, cfg.n_classes) if cfg.n_classes > 0 else None
        self.head_dist = nn.Linear(d, cfg.n_classes) if self._dist_pooled and cfg.n_classes > 0 else None

        self.hook_embed = HookPoint()  # [batch, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pooled = HookPoint()  # [batch, d_model] ([batch, 2, d_model]: distilled, 'token_avg')
        self.hook_projected = HookPoint() if cfg.proj_dim else None  # [batch, proj_dim]
        self._tail_hook_points: list[HookPoint] | None = None  # see _head_tokens
        self.class_names: list[str] | None = None
        """The head's class names where the source names them (a Hugging Face config's `id2label`, or
        `set_head` / `set_zero_shot_head`'s), else None (timm models: ImageNet's, `caap.data.class_names`)."""
        self.setup()
        self.cfg.device = self._param_device()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_timm(
        cls,
        name_or_model: str | nn.Module,
        checkpoint_path: str | None = None,
        pretrained: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **timm_kwargs: Any,
    ) -> "HookedViT":
        """Convert a timm ViT: a timm model name, a timm model object (e.g. your own fine-tune), or a
        name plus `checkpoint_path` (a local timm state dict: .pth, .bin or .safetensors).

        `pretrained=False` gives random weights (no download). Extra keyword arguments go to
        `timm.create_model` (e.g. `num_classes`, `dynamic_img_size=True`, `qk_norm=True`).
        """
        from hooked_vit.loading import hooked_vit_from_timm

        return hooked_vit_from_timm(cls, name_or_model, checkpoint_path, pretrained, device, dtype, **timm_kwargs)

    @classmethod
    def from_hf(
        cls,
        model_or_folder: Any,
        processor: Any = None,
        dynamic_img_size: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        check: bool = True,
    ) -> "HookedViT":
        """Convert a Hugging Face `transformers` ViT: a model object (e.g. your own fine-tune) or a folder
        written by `save_pretrained` (read offline). ViT, DeiT, DINOv2 (with or without registers), the
        vision towers of CLIP and SigLIP; `hooked_vit.hf` lists the classes and what each one's output is.

        `processor`: the image processor whose preprocessing `preprocess` reproduces (default: the
        folder's `preprocessor_config.json`, else the family's default processor at the model's image
        size). `dynamic_img_size`: accept any image size divisible by the patch size, the position
        embeddings interpolated as the source's `interpolate_pos_encoding=True` does (default: as the
        source runs by default: DINOv2 always interpolates, the others do not). `check`: compare the
        converted model with the source on one input and refuse a difference (`ConversionMismatch`).
        """
        from hooked_vit.hf import hooked_vit_from_hf

        return hooked_vit_from_hf(cls, model_or_folder, processor, dynamic_img_size, device, dtype, check)

    # ------------------------------------------------------------------ grid helpers
    def grid_size_for(self, pixels: Tensor | tuple[int, int]) -> tuple[int, int]:
        """(grid_h, grid_w) for a pixel batch [batch, chan, H, W] or an (H, W) size, after checking
        that the model accepts that size."""
        h, w = pixels.shape[-2:] if isinstance(pixels, Tensor) else pixels
        ph, pw = self.cfg.patch_size
        if self.cfg.dynamic_img_size:
            if h % ph or w % pw or h < ph or w < pw:
                raise ValueError(
                    f"image size {h}x{w} is not a positive multiple of the patch size {ph}x{pw}; "
                    f"this model accepts any size divisible by the patch size"
                )
        elif (h, w) != self.cfg.img_size:
            raise ValueError(
                f"image size {h}x{w} does not match the model's {self.cfg.img_size[0]}x{self.cfg.img_size[1]}; "
                f"this model has a fixed size (build it with dynamic_img_size=True to accept others), "
                f"use model.preprocess() to resize"
            )
        return (h // ph, w // pw)

    @property
    def prefix_positions(self) -> dict[str, list[int]]:
        """Token indices of the prefix tokens by kind: 'class', 'registers', 'distillation'."""
        out: dict[str, list[int]] = {}
        i = 0
        if self.cfg.class_token:
            out["class"] = [0]
            i = 1
        if self.cfg.n_registers:
            out["registers"] = list(range(i, i + self.cfg.n_registers))
            i += self.cfg.n_registers
        if self.cfg.distilled:
            out["distillation"] = [i]
        return out

    def patch_positions(self, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Token indices of the patches, row-major (default: the native grid)."""
        gh, gw = grid_size or self.cfg.grid_size
        return torch.arange(self.cfg.n_prefix_tokens, self.cfg.n_prefix_tokens + gh * gw)

    def to_grid(
        self, x: Float[Tensor, "... n"], grid_size: tuple[int, int] | None = None
    ) -> Float[Tensor, "... grid_h grid_w"]:
        """A per-patch or per-token vector on the last axis -> [..., grid_h, grid_w].

        The last axis holds either the patches alone or every token (prefix tokens first, which are
        dropped). `grid_size` defaults to the native grid, else to the square grid the length fits.
        """
        n, p = x.shape[-1], self.cfg.n_prefix_tokens
        if grid_size is None:
            if n in (self.cfg.n_patches, p + self.cfg.n_patches):
                grid_size = self.cfg.grid_size
            elif _is_square(n) or _is_square(n - p):
                grid_size = _square_grid(n if _is_square(n) else n - p)
            else:
                raise ValueError(f"a last axis of {n} does not form a square grid; pass grid_size=(grid_h, grid_w)")
        gh, gw = grid_size
        if n == p + gh * gw and p:
            x = x[..., p:]
        elif n != gh * gw:
            raise ValueError(
                f"a last axis of {n} fits neither {gh}x{gw} patches nor {p} prefix tokens plus them"
            )
        return rearrange(x, "... (gh gw) -> ... gh gw", gh=gh, gw=gw)

    def from_grid(self, x: Float[Tensor, "... grid_h grid_w"]) -> Float[Tensor, "... n_patches"]:
        """[..., grid_h, grid_w] -> [..., grid_h * grid_w] (row-major, the patches' token order)."""
        return rearrange(x, "... gh gw -> ... (gh gw)")

    # ------------------------------------------------------------------ forward
    def embed(self, pixels: Float[Tensor, "batch chan H W"]) -> Float[Tensor, "batch pos d_model"]:
        """Pixels -> the residual stream entering block 0 (`blocks.0.hook_resid_pre`)."""
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != self.cfg.in_chans:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(
                f"expected pixels of shape [batch, {self.cfg.in_chans}, H, W], got {shape}; "
                f"use model.preprocess(images) for paths, PIL images or arrays"
            )
        grid = self.grid_size_for(pixels)
        b = pixels.shape[0]
        x = self.hook_embed(self.patch_embed(pixels))  # [batch, n_patches, d_model]
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token, self.dist_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1) if prefix else x
        if self.pos_embed is not None:
            x = x + self.hook_pos_embed(self._pos_embed_for(grid).expand(b, -1, -1))
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return x

    def forward_patches(
        self, pixels: Float[Tensor, "batch chan H W"], keep: Int[Tensor, "batch k"]
    ) -> Float[Tensor, "batch n_classes"]:
        """Logits of the model run on its prefix tokens and only the patch tokens `keep` (per image, k
        indices into the row-major patch grid, each at most once): the other patches are dropped from the
        token sequence, not filled in, and every kept token keeps its own position embedding. A ViT takes
        any number of tokens, so this needs no substitute image ("zero", blur, ...): token deletion and
        insertion metrics and input-sampling methods use it. With average pooling the mean is over the
        kept tokens; k = 0 leaves the prefix tokens alone."""
        resid = self.embed(pixels)
        b, n_patches = pixels.shape[0], resid.shape[1] - self.cfg.n_prefix_tokens
        keep = torch.as_tensor(keep, device=resid.device)
        if keep.ndim != 2 or keep.shape[0] != b or keep.is_floating_point() or keep.dtype == torch.bool:
            raise ValueError(f"keep must be integer patch indices [batch={b}, k], got {keep.dtype} {tuple(keep.shape)}")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n_patches):
            raise ValueError(f"keep holds patch indices outside 0..{n_patches - 1}: {int(keep.min())}..{int(keep.max())}")
        if keep.shape[1] > 1 and bool((keep.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("keep names a patch twice in one row; each kept patch appears once")
        prefix = torch.arange(self.cfg.n_prefix_tokens, device=resid.device).expand(b, -1)
        index = torch.cat([prefix, keep.long() + self.cfg.n_prefix_tokens], dim=1)
        kept = resid.gather(1, index[..., None].expand(-1, -1, resid.shape[-1]))
        return self(kept, start_at_layer=0)

    def _pos_embed_for(self, grid: tuple[int, int]) -> Float[Tensor, "1 pos d_model"]:
        assert self.pos_embed is not None
        cfg = self.cfg
        n_prefix_in_pos = 0 if cfg.no_embed_class else cfg.n_prefix_tokens
        pos = self.pos_embed
        if grid != cfg.grid_size:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=cfg.grid_size, num_prefix_tokens=n_prefix_in_pos,
                                         antialias=cfg.pos_embed_antialias)
        if cfg.no_embed_class and cfg.n_prefix_tokens:
            pos = torch.cat([pos.new_zeros(1, cfg.n_prefix_tokens, cfg.d_model), pos], dim=1)
        return pos

    def head_forward(self, resid: Float[Tensor, "batch pos d_model"], tokens_only: bool = False
                     ) -> Float[Tensor, "batch n_classes"]:
        """The residual stream after the last block -> logits (final norm, pooling, head).
        `tokens_only`: `resid` holds just the pooled token(s) (see `forward`). Under `torch.autocast` the
        head runs in fp32 all the same: attributions read differences of nearly equal logits, which a
        16-bit head would round away."""
        if torch.is_autocast_enabled(resid.device.type):
            with torch.autocast(resid.device.type, enabled=False):
                return self.head_forward(resid.float(), tokens_only)
        x = self.ln_final(resid) if self.ln_final is not None else resid
        pooled = self.hook_pooled((x[:, 0] if x.shape[1] == 1 else x) if tokens_only else self.pool(x))
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        if self.proj is not None:
            pooled = self.hook_projected(self.proj(pooled))
        if self.feature_norm is not None:
            pooled = self.feature_norm(pooled)
        if self.head is None:
            return pooled
        if self.head_dist is not None:
            return (self.head(pooled[:, 0]) + self.head_dist(pooled[:, 1])) / 2
        return self.head(pooled.flatten(1))

    @property
    def _dist_pooled(self) -> bool:
        """Whether the head reads the distillation token too (DeiT distilled with its second head)."""
        return self.cfg.distilled and self.cfg.dist_head

    def pool(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """The pooling: the class token (and distillation token), avg/max/avgmax over tokens, attention
        pooling ('map'), or the class token and the mean of the patch tokens ('token_avg', [batch, 2,
        d_model])."""
        cfg = self.cfg
        if self._dist_pooled:
            return x[:, [0, cfg.n_prefix_tokens - 1]]
        if cfg.pooling == "token":
            return x[:, 0]
        if cfg.pooling == "token_avg":
            return torch.stack([x[:, 0], x[:, cfg.n_prefix_tokens :].mean(dim=1)], dim=1)
        x = x if cfg.pool_include_prefix else x[:, cfg.n_prefix_tokens :]
        if cfg.pooling == "map":
            assert self.attn_pool is not None
            return self.attn_pool(x)
        if cfg.pooling == "avg":
            return x.mean(dim=1)
        if cfg.pooling == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def pool_weights(self, n_tokens: int, max_as_mean: bool = False) -> Float[Tensor, "group pos"]:
        """The pooling as weights over the token axis: one row per pooled vector (two for DeiT distilled:
        the class token, then the distillation token; two for 'token_avg': the class token, then the
        patch mean), each summing to 1, so that `pool(x)` is `weights @ x` for class-token and average
        pooling. The one description of which tokens the head reads, for the cache's direct logit
        attribution and the attention-readout baselines.

        Max, avg-max and attention pooling are not linear: they raise, or with `max_as_mean=True` get
        the uniform mean over the tokens they pool (an approximation of which tokens the head reads)."""
        cfg = self.cfg
        if cfg.pooling in ("max", "avgmax", "map") and not max_as_mean:
            raise ValueError(
                f"pooling={cfg.pooling!r} is not linear, so the logits do not split into per-component "
                f"contributions; direct logit attribution and pool_stack need pooling 'token', 'avg' or "
                f"'token_avg' (patch the components instead)"
            )
        w = torch.zeros(2 if self._dist_pooled or cfg.pooling == "token_avg" else 1, n_tokens, device=self.W_E.device)
        if self._dist_pooled:
            w[0, 0] = w[1, cfg.n_prefix_tokens - 1] = 1.0
        elif cfg.pooling == "token":
            w[0, 0] = 1.0
        elif cfg.pooling == "token_avg":
            w[0, 0] = 1.0
            w[1, cfg.n_prefix_tokens :] = 1.0 / (n_tokens - cfg.n_prefix_tokens)
        else:
            start = 0 if cfg.pool_include_prefix else cfg.n_prefix_tokens
            w[0, start:] = 1.0 / (n_tokens - start)
        return w

    def forward(
        self,
        input: Tensor,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
    ) -> Tensor:
        """Run the model, in the manner of TransformerLens.

        Args:
            input: pixels [batch, chan, H, W]; or, with `start_at_layer=l`, the residual stream
                entering block l ([batch, pos, d_model], `blocks.{l}.hook_resid_pre`).
            start_at_layer: first block to run (negative counts from the end).
            stop_at_layer: stop before this block and return the residual stream entering it
                (`stop_at_layer=n_layers` returns the last block's output, before the final norm).

        Returns:
            logits [batch, n_classes], or the residual stream [batch, pos, d_model] when
            `stop_at_layer` is given.
        """
        n = self.cfg.n_layers
        start = 0 if start_at_layer is None else self._layer_index(start_at_layer, "start_at_layer")
        stop = n if stop_at_layer is None else self._layer_index(stop_at_layer, "stop_at_layer", allow_end=True)
        if start_at_layer is None:
            resid = self.embed(input)
        else:
            if not isinstance(input, Tensor) or input.ndim != 3 or input.shape[-1] != self.cfg.d_model:
                shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
                raise ValueError(
                    f"with start_at_layer, input must be the residual stream [batch, pos, {self.cfg.d_model}], got {shape}"
                )
            resid = input
        tokens = self._head_tokens() if stop_at_layer is None and start < n else None
        if tokens is None:
            for block in self.blocks[start:stop]:
                resid = block(resid)
            return resid if stop_at_layer is not None else self.head_forward(resid)
        for block in self.blocks[start : n - 1]:
            resid = block(resid)
        return self.head_forward(self.blocks[-1].forward_tokens(resid, tokens), tokens_only=True)

    def _head_tokens(self) -> list[int] | None:
        """The tokens the head reads when it reads only prefix tokens (class-token pooling; class and
        distillation token for DeiT distilled) and nothing observes the other tokens of the last block:
        then the last block is computed for those tokens alone (their attention over every token is
        unchanged). None when every token is needed: another pooling, per-head results, or a hook on a
        last-block activation other than `TransformerBlock.tokens_only_hooks` or on the final norm."""
        cfg = self.cfg
        if cfg.pooling != "token" or cfg.use_attn_result:
            return None
        if self._tail_hook_points is None:
            last = self.blocks[-1]
            free = {id(h) for h in last.tokens_only_hooks()}
            self._tail_hook_points = [m for m in last.modules() if isinstance(m, HookPoint) and id(m) not in free]
            if self.ln_final is not None:
                self._tail_hook_points += [self.ln_final.hook_scale, self.ln_final.hook_normalized]
        if any(h._forward_hooks or h._backward_hooks for h in self._tail_hook_points):
            return None
        return [0, cfg.n_prefix_tokens - 1] if self._dist_pooled else [0]

    def _layer_index(self, layer: int, name: str, allow_end: bool = False) -> int:
        n = self.cfg.n_layers
        hi = n if allow_end else n - 1
        layer = as_int(layer, name)
        if not -n <= layer <= hi:
            raise IndexRangeError(f"{name}={layer} is out of range: this model has {n} layers, accepted {-n}..{hi}")
        return layer % n if layer < 0 else layer

    # ------------------------------------------------------------------ TransformerLens niceties
    def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False, prepend=False):
        if hook_point_name.endswith("attn.hook_result") and not self.cfg.use_attn_result:
            raise ValueError(
                f"{hook_point_name} only fires with per-head results: call model.set_use_attn_result(True) first"
            )

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:  # type: ignore[override]
        if isinstance(name, str) and name not in self.hook_dict:
            raise ValueError(_unknown_hook_message(name, self.hook_dict))
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False) -> Iterator[HookedViT]:
        """TransformerLens' `hooks()` (also behind `run_with_hooks`), after checking every named hook point:
        an unknown name raises a ValueError with the closest names (TransformerLens: a KeyError), and a
        user's hook on `attn.hook_result` needs per-head results (`run_with_cache` names every hook point,
        so caching skips that check)."""
        for hooks, direction in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
            for name, hook in hooks:
                if not isinstance(name, str):
                    continue
                if name not in self.hook_dict:
                    raise ValueError(_unknown_hook_message(name, self.hook_dict))
                if not self.is_caching:
                    self.check_hooks_to_add(self.hook_dict[name], name, hook, dir=direction)
        with super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as model:
            yield model

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs (`blocks.{l}.attn.hook_result`); slower, so off by default."""
        self.cfg.use_attn_result = use_attn_result

    def run_with_cache(  # type: ignore[override]
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        pos_slice: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, ViTActivationCache | dict[str, Tensor]]:
        """Run and cache activations; returns (output, `ViTActivationCache`), as TransformerLens does.

        `remove_batch_dim` and `pos_slice` are applied here rather than by TransformerLens, which
        takes axis -2 of every activation with 2+ dims for the token axis: wrong for the pooled
        activations (`hook_pooled`, `fc_norm.*`: [batch, d_model], no token axis), where it crashed
        (remove_batch_dim) or sliced the batch (pos_slice).
        """
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        if remove_batch_dim or pos_slice is not None:
            cache_dict = {k: _slice_cached(k, v, remove_batch_dim, pos_slice) for k, v in cache_dict.items()}
        if not return_cache_object:
            return out, cache_dict
        from hooked_vit.cache import ViTActivationCache

        return out, ViTActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    # ------------------------------------------------------------------ weights, TransformerLens names
    @property
    def W_U(self) -> Float[Tensor, "d_model n_classes"]:
        """Unembedding: the linear map from the pooled representation (after the final norm) to the
        logits: the classifier, after the projection where there is one (with `normalize_features` the
        features' length divides the logits too, which this leaves out); for a distilled model, the
        average of its two heads (exact for the logits when the class and distillation token carry the
        same vector). A 'token_avg' head reads two vectors side by side and has no such matrix."""
        if self.head is None:
            raise ValueError("this model has no classification head (n_classes=0)")
        if self.cfg.pooling == "token_avg":
            raise ValueError(
                "the head reads the class token and the patch mean side by side (pooling='token_avg'): there is "
                "no single [d_model, n_classes] unembedding; model.head.weight holds both halves"
            )
        w = self.head.weight.T
        w = (w + self.head_dist.weight.T) / 2 if self.head_dist is not None else w
        return self.proj.weight.T @ w if self.proj is not None else w

    @property
    def b_U(self) -> Float[Tensor, " n_classes"]:
        """The head's bias (the average of both heads' for a distilled model)."""
        if self.head is None:
            raise ValueError("this model has no classification head (n_classes=0)")
        return (self.head.bias + self.head_dist.bias) / 2 if self.head_dist is not None else self.head.bias

    @property
    def W_E(self) -> Float[Tensor, "chan_patch d_model"]:
        """Patch embedding as a matrix from the flattened patch (chan, ph, pw) to d_model."""
        return rearrange(self.patch_embed.proj.weight, "d c ph pw -> (c ph pw) d")

    @property
    def W_pos(self) -> Float[Tensor, "pos d_model"]:
        if self.pos_embed is None:
            raise ValueError("this model has no position embeddings")
        return self._pos_embed_for(self.cfg.grid_size)[0]

    def class_to_residual_directions(self, classes: int | Sequence[int] | Tensor) -> Tensor:
        """The unembedding column of each class: [d_model] or [n, d_model] (TransformerLens'
        `tokens_to_residual_directions` for classes)."""
        idx = torch.as_tensor(classes, device=self.W_U.device)
        self._check_classes(idx)
        return self.W_U[:, idx].T if idx.ndim else self.W_U[:, idx]

    def set_head(
        self, weight: Float[Tensor, "n_classes d_features"], bias: Float[Tensor, " n_classes"] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> HookedViT:
        """Give the model a linear head on its features (a linear probe, or any class directions): then
        logits = features @ weight.T + bias, and CAAP, the sweeps and every attribution method score those.
        The features are what the model returned without a head (the pooled representation, after the
        final norm, the projection and the unit-length scaling where the model has them), `cfg.d_features`
        wide. Replaces a head the model had (a distilled model's two heads too). `class_names`: one per row
        (`model.class_names`). Returns the model."""
        d = self.cfg.d_features
        weight = torch.as_tensor(weight)
        if weight.ndim != 2 or weight.shape[1] != d or weight.shape[0] < 1 or not weight.is_floating_point():
            raise ValueError(f"weight must be a float tensor [n_classes, {d}] (the features are {d} wide), got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        n = weight.shape[0]
        if bias is not None:
            bias = torch.as_tensor(bias)
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias must be [n_classes={n}], got {tuple(bias.shape)}")
        if not bool(torch.isfinite(weight).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
            raise ValueError("the head's weight and bias must be finite")
        if class_names is not None and len(class_names) != n:
            raise ValueError(f"class_names has {len(class_names)} names for {n} classes")
        param = next(self.parameters())
        head = nn.Linear(d, n).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias if bias is not None else torch.zeros(n))
        self.head, self.head_dist = head, None
        self.cfg.n_classes, self.cfg.dist_head = n, False
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        return self

    def set_zero_shot_head(
        self, class_embeddings: Float[Tensor, "n_classes d_features"], logit_scale: float = 100.0,
        logit_bias: float = 0.0, class_names: Sequence[str] | None = None,
    ) -> HookedViT:
        """CLIP and SigLIP zero-shot classification as the model's head: logits = logit_scale x cosine
        similarity between the image embedding and each class embedding + logit_bias, as CLIPModel's
        `logits_per_image` (logit_scale = `clip.logit_scale.exp()`) and SiglipModel's (also
        logit_bias = `siglip.logit_bias`). `class_embeddings`: one row per class, in the image embedding's
        space, e.g. `clip.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))`.
        The features are scaled to unit length (`cfg.normalize_features`, hook `feature_norm.*`), the head's
        rows are the class embeddings at unit length times logit_scale. `class_names`: one per class
        embedding (e.g. the prompts' class words). Returns the model."""
        emb = torch.as_tensor(class_embeddings)
        if emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(f"class_embeddings must be a float tensor [n_classes, d], got {emb.dtype} {tuple(emb.shape)}")
        norms = emb.float().norm(dim=-1, keepdim=True)
        if not bool((norms > 0).all()) or not bool(torch.isfinite(emb).all()):
            raise ValueError("every class embedding must be finite and non-zero")
        if not (float(logit_scale) > 0 and torch.isfinite(torch.tensor(float(logit_scale)))):
            raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
        n = emb.shape[0]
        bias = torch.full((n,), float(logit_bias))
        self.set_head(emb.float() / norms * float(logit_scale), bias, class_names)
        if self.feature_norm is None:
            self.cfg.normalize_features = True
            self.feature_norm = FeatureNorm()
            self._tail_hook_points = None
            self.setup()
        return self

    def _check_classes(self, idx: Tensor) -> None:
        n = self.cfg.n_classes
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"class index out of range: accepted 0..{n - 1}, got {idx.tolist()}")

    # ------------------------------------------------------------------ images
    def preprocess(self, images: Any) -> Float[Tensor, "batch chan H W"]:
        """Paths, PIL images, uint8/float arrays (greyscale, RGB, RGBA) or a list of them ->
        pixels [batch, 3, H, W], with the source model's own timm data config, on the model's device
        and in its dtype (a bfloat16 model gets bfloat16 pixels)."""
        from hooked_vit.preprocess import preprocess

        param = next(self.parameters())
        return preprocess(images, self.data_config).to(device=param.device, dtype=param.dtype)

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device

    # `cfg.device` follows the parameters, as TransformerLens' config does (its utilities read it)
    def to(self, *args: Any, **kwargs: Any) -> HookedViT:  # type: ignore[override]
        out = super().to(*args, **kwargs)
        self.cfg.device = self._param_device()
        return out

    def cuda(self, device: Any = None) -> HookedViT:  # type: ignore[override]
        out = super().cuda(device)
        self.cfg.device = self._param_device()
        return out

    def cpu(self) -> HookedViT:  # type: ignore[override]
        out = super().cpu()
        self.cfg.device = self._param_device()
        return out

    @property
    def device(self) -> torch.device:
        return self._param_device()


def _slice_cached(name: str, value: Tensor, remove_batch_dim: bool, pos_slice: Any) -> Tensor:
    """Apply run_with_cache's `pos_slice` (on the token axis, where the activation has one) and
    `remove_batch_dim` to one cached activation."""
    from transformer_lens.utilities import Slice

    base = name.removesuffix("_grad")
    if base == "hook_pooled" or base.startswith("fc_norm."):
        pos_dim = None  # pooled: [batch, (2,) d_model]
    elif base.rsplit(".", 1)[-1] in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result"):
        pos_dim = -3  # [batch, pos, head, d]
    else:
        pos_dim = -2  # [batch, pos, d] and the query axis of [batch, head, q_pos, k_pos]
    if pos_slice is not None and pos_dim is not None:
        value = Slice.unwrap(pos_slice).apply(value, dim=pos_dim)
    if remove_batch_dim:
        if value.shape[0] != 1:
            raise ValueError(f"remove_batch_dim needs a batch of one image, got {value.shape[0]} ({name})")
        value = value[0]
    return value


def _unknown_hook_message(name: str, hook_dict: dict[str, HookPoint]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(hook_dict), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown hook name {name!r}{hint} (model.hook_dict lists all {len(hook_dict)} hook names)"


def _is_square(n: int) -> bool:
    r = int(round(max(n, 0) ** 0.5))
    return n > 0 and r * r == n


def _square_grid(n: int) -> tuple[int, int]:
    r = int(round(n**0.5))
    return (r, r)


def _default_data_config(cfg: HookedViTConfig) -> dict[str, Any]:
    """timm's defaults, for a model built by hand (no timm source to read a data config off)."""
    from timm.data import resolve_data_config

    return resolve_data_config({"input_size": (cfg.in_chans, *cfg.img_size)})
