"""`ViTActivationCache`: TransformerLens' `ActivationCache`, plus what a classifier needs.

`HookedViT.run_with_cache` returns one. Everything TransformerLens' cache does that works unchanged on
a HookedViT is inherited (`accumulated_resid`, `stack_activation`, `get_neuron_results`, indexing
such as `cache["pattern", 3]`, ...): HookedViT keeps TransformerLens' names (`cfg.n_layers`,
`blocks[l].attn.W_O` with LayerScale folded in, `blocks[l].mlp.W_out`, `ln_final.hook_scale`, ...).
`accumulated_resid(apply_ln=True)` recomputes the final norm per token, as TransformerLens' logit lens
does (for `fc_norm` models that is a per-token lens; pool first with `pool_stack` for the pooled one).
Overridden, and why:

- `decompose_resid`, `get_full_resid_decomposition`: a ViT's embedding is not one hook. The token
  entering block 0 is a prefix token (class / register / distillation parameter) or a patch
  embedding (`hook_embed`, patches only), plus `hook_pos_embed`, and CLIP-style models then apply
  `ln_pre`. The "embed" component here covers every token, and `ln_pre` is split linearly with its
  cached scale (plus an "ln_pre_bias" component), so the components still sum to the residual stream.
- `apply_ln_to_stack`: the final norm is `ln_final` (per token, before pooling) or `fc_norm` (on the
  pooled vector, after pooling), or absent.
- `logit_attrs`: classes instead of tokens, and the logit is read off the *pooled* representation
  (class token, mean over patches, or DeiT's class + distillation tokens through two heads).
- `stack_head_results` / `stack_neuron_results` at layer 0, `apply_slice_to_batch_dim`,
  `compute_head_results`: small fixes (at layer 0 TransformerLens shapes the empty stack like
  `hook_embed`, which in a ViT holds the patches only, and takes the remainder from the last layer;
  it returns a plain cache; it warns on every call once per-head results are cached).

Added: `pool_stack` (the model's pooling applied to a stack), `logit_contributions` (every class at
once) and `logit_bias` (what no component owns).

Direct logit attribution, exactly
---------------------------------
For token- and avg-pooled models the logits are an affine function of the last residual stream once
the final norm's scale is frozen at its cached value. So for any stack of components that sums to
the last residual stream (`decompose_resid()`, `stack_head_results(incl_remainder=True)`, ...):

    logit_attrs(stack, classes).sum(0) + logit_bias(classes) == logits[batch, classes]
    logit_contributions(stack).sum(0) + logit_bias() == logits

Each component is centred, divided by the final norm's cached scale (per token for `ln_final`, the
pooled vector's for `fc_norm`: pooling is linear so it commutes with the centring), multiplied by the
norm's weight, pooled, and read out with the head's weight. The norm's bias and the head's bias go
to `logit_bias`. Max and avg-max pooling are not linear, so these raise for them. Example:

    logits, cache = model.run_with_cache(pixels)
    target = logits.argmax(-1)                                      # [batch]
    stack, labels = cache.decompose_resid(return_labels=True)      # embed, pos_embed, {l}_attn_out, ...
    attrs = cache.logit_attrs(stack, target)                        # [components, batch]
    heads, head_labels = cache.stack_head_results(return_labels=True)
    head_attrs = cache.logit_attrs(heads, target)                   # [layers * heads, batch]
    # attrs.sum(0) + cache.logit_bias(target) == logits[range(batch), target]   (to ~1e-5)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice, SliceInput

ClassesLike = int | Sequence[int] | Int[Tensor, ""] | Int[Tensor, "batch"]


@dataclass
class _Readout:
    """One linear path from the final residual stream to the logits: logits += weight *
    (sum_p positions[p] * normed_p) @ W + weight * b. A plain model has one; DeiT distilled has two
    (class token through `head`, distillation token through `head_dist`, each weighted 1/2)."""

    weight: float
    positions: Float[Tensor, " pos"]  # pooling weights over the token axis, summing to 1
    W: Float[Tensor, "d_model n_classes"]
    b: Float[Tensor, " n_classes"]
    directions: Callable[[Tensor], Tensor]  # class indices [*c] -> W[:, classes] as [*c, d_model]


class ViTActivationCache(ActivationCache):
    """Activations of one `HookedViT` run, with TransformerLens' analysis helpers adapted to a
    classifier with prefix tokens and pooling. See the module docstring for what differs."""

    # ------------------------------------------------------------------ plumbing
    def apply_slice_to_batch_dim(self, batch_slice: Slice | SliceInput) -> "ViTActivationCache":
        """As TransformerLens', but keeps the class (TransformerLens returns a plain cache)."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return ViTActivationCache(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim)

    def compute_head_results(self) -> None:
        """Per-head outputs `blocks.{l}.attn.hook_result` [batch, pos, head, d_model] from `hook_z` and
        `W_O` (LayerScale included), unless the run cached them (`use_attn_result`). TransformerLens'
        implementation, made quiet when they are already there (it logs a warning each time, and
        `stack_head_results` calls it on every use)."""
        n, ndim = self.model.cfg.n_layers, 4 if self.has_batch_dim else 3
        if all(getattr(self.cache_dict.get(f"blocks.{l}.attn.hook_result"), "ndim", 0) >= ndim for l in range(n)):
            return
        super().compute_head_results()

    def _get(self, key: str, why: str) -> Tensor:
        try:
            return self.cache_dict[key]
        except KeyError as e:
            raise KeyError(
                f"{why} needs '{key}' in the cache; run run_with_cache without a names_filter that drops it"
            ) from e

    def _final_layer(self, layer: int | None) -> bool:
        return layer is None or layer == -1 or layer == self.model.cfg.n_layers

    def _n_tokens(self) -> int:
        n = self.model.cfg.n_layers
        for key in ("ln_final.hook_scale", f"blocks.{n - 1}.hook_resid_post", "blocks.0.hook_resid_pre",
                    "hook_pos_embed"):
            if key in self.cache_dict:
                return self.cache_dict[key].shape[-2]
        raise KeyError("cannot tell the number of tokens: the cache holds no residual stream")

    # ------------------------------------------------------------------ embeddings and decomposition
    def _embed_components(self, pos_slice: Slice) -> tuple[list[Tensor], list[str]]:
        """The residual stream entering block 0 as a sum of components: "embed" (prefix token
        parameters on prefix positions, `hook_embed` on patches), "pos_embed", and with CLIP's
        `ln_pre` both passed through it linearly (cached scale) plus "ln_pre_bias"."""
        model, cfg = self.model, self.model.cfg
        if not self.has_embed:
            return [], []
        patches = self["hook_embed"]  # [*batch, n_patches, d_model]
        prefix = [t for t in (model.cls_token, model.reg_token, model.dist_token) if t is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1)[0].to(patches)  # [n_prefix, d_model]
            tokens = tokens.expand(*patches.shape[:-2], *tokens.shape)
            embed = torch.cat([tokens.detach(), patches], dim=-2)
        else:
            embed = patches
        components, labels = [embed], ["embed"]
        if self.has_pos_embed:
            components.append(self["hook_pos_embed"])
            labels.append("pos_embed")
        if cfg.pre_norm:
            scale = self._get("ln_pre.hook_scale", "decomposing the embeddings of a pre-norm (ln_pre) model")
            w, b = model.ln_pre.w.detach(), model.ln_pre.b.detach()
            components = [(c - c.mean(-1, keepdim=True)) / scale * w for c in components]
            components.append(b.expand_as(embed))
            labels.append("ln_pre_bias")
        return [pos_slice.apply(c, dim=-2) for c in components], labels

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Float[Tensor, "components *batch_and_pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream entering block `layer` (default: after the last block) as a stack of
        components that sum to it: "embed", "pos_embed" (and "ln_pre_bias" for pre-norm models),
        then "{l}_attn_out" and "{l}_mlp_out" per layer. Arguments as in TransformerLens."""
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        incl_attn, incl_mlp = mode != "mlp", mode != "attn"
        components, labels = self._embed_components(pos_slice) if incl_embeds else ([], [])
        for l in range(layer):
            if incl_attn:
                components.append(pos_slice.apply(self[("attn_out", l)], dim=-2))
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                components.append(pos_slice.apply(self[("mlp_out", l)], dim=-2))
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn:
            components.append(pos_slice.apply(self[("attn_out", layer)], dim=-2))
            labels.append(f"{layer}_attn_out")
        if not components:
            raise ValueError("nothing to decompose: no embeddings in the cache and no layers before `layer`")
        stack = torch.stack(components, dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Slice | SliceInput = None,
        apply_ln: bool = False,
    ) -> Float[Tensor, "components *batch_and_pos d_model"] | tuple[Tensor, list[str]]:
        """Each head's output (`attn.hook_result`, LayerScale included, `b_O` excluded) for the layers
        before `layer`: [layer * n_heads, *batch, pos, d_model], labels "L{l}H{h}". With
        `incl_remainder`, a last "remainder" makes the stack sum to the residual stream. TransformerLens'
        implementation, except at layer 0 (its empty stack has `hook_embed`'s shape, patches only, and its
        remainder is the last layer's residual stream)."""
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        if layer > 0:
            return super().stack_head_results(layer, return_labels, incl_remainder, pos_slice, apply_ln)
        return self._empty_stack(return_labels, incl_remainder, pos_slice, apply_ln)

    def stack_neuron_results(self, layer: int, pos_slice: Slice | SliceInput = None, neuron_slice=None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: Tensor | None = None):
        """TransformerLens' `stack_neuron_results` (each MLP neuron's output, `W_out` with LayerScale),
        with layer 0 handled here (TransformerLens shapes the empty stack like `hook_embed`, patches only)."""
        if layer is None or layer == -1:
            layer = self.model.cfg.n_layers
        if layer > 0 or project_output_onto is not None:
            return super().stack_neuron_results(layer, pos_slice, neuron_slice, return_labels, incl_remainder,
                                                apply_ln, project_output_onto)
        return self._empty_stack(return_labels, incl_remainder, pos_slice, apply_ln)

    def _empty_stack(self, return_labels: bool, incl_remainder: bool, pos_slice, apply_ln: bool):
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        resid = pos_slice.apply(self["blocks.0.hook_resid_pre"], dim=-2)
        stack = resid[None] if incl_remainder else resid.new_zeros(0, *resid.shape)
        labels = ["remainder"] if incl_remainder else []
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, 0, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Every head ("L{l}H{h}"), every neuron ("L{l}N{i}", or "{l}_mlp_out" per layer when
        `expand_neurons=False`), the embeddings (as in `decompose_resid`) and "bias" (the attention
        output biases, plus the MLP output biases when neurons are expanded): they sum to the
        residual stream entering `layer` (ln2's input with `mlp_input`). `project_output_onto`
        ([d_model] or [d_model, k]) is applied last."""
        cfg = self.model.cfg
        if layer is None or layer == -1:
            layer = cfg.n_layers
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        n_attn = layer + (1 if mlp_input else 0)
        heads, labels = self.stack_head_results(n_attn, return_labels=True, pos_slice=pos_slice)
        components = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, neuron_labels = self.decompose_resid(
                    layer, pos_slice=pos_slice, incl_embeds=False, mode="mlp", return_labels=True)
            components.append(neurons)
            labels = labels + neuron_labels
        embeds, embed_labels = self._embed_components(pos_slice)
        components += [e[None] for e in embeds]
        labels = labels + embed_labels
        bias = heads.new_zeros(cfg.d_model)
        for l in range(n_attn):
            bias = bias + self.model.blocks[l].attn.b_O.detach().to(bias)
        for l in range(layer if expand_neurons else 0):
            bias = bias + self.model.blocks[l].mlp.b_out.detach().to(bias)
        shape = pos_slice.apply(self["blocks.0.hook_resid_pre"], dim=-2).shape
        components.append(bias.expand(1, *shape))
        labels.append("bias")
        stack = torch.cat(components, dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        if project_output_onto is not None:
            stack = stack @ project_output_onto.to(stack)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ final norm
    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "components *batch_and_pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[Tensor, "components *batch_and_pos d_model"]:
        """TransformerLens' `apply_ln_to_stack`: centre each component and divide by the cached scale
        of the norm that reads the stack (`blocks.{layer}.ln1`/`ln2`, or the final norm for
        `layer=None`/`-1`/`n_layers`). As in TransformerLens, the norm's weight and bias are not
        applied by the cached-scale path (HookedViT does not fold them into the next weights; use
        `logit_attrs` / `logit_contributions` for logits), while `recompute_ln=True` (final layer
        only) applies the whole final norm with statistics of each component.

        The final norm of an `fc_norm` model acts on the pooled vector: its cached scale is
        [batch, 1] and is broadcast over positions when the stack still has a token axis (exact
        after pooling, since pooling is linear). With `recompute_ln`, each token (or pooled vector)
        is normalised by `fc_norm` on its own (a per-token logit lens; pool first with `pool_stack`
        for the pooled one). A model without a final norm gets the stack back unchanged.
        """
        model = self.model
        if not self._final_layer(layer) or model.ln_final is not None:
            return super().apply_ln_to_stack(
                residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
            )
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        norm = model.fc_norm
        if norm is None:
            return residual_stack
        if recompute_ln:
            return F.layer_norm(residual_stack, (residual_stack.shape[-1],), norm.w, norm.b, norm.eps)
        scale = self._fc_norm_scale(batch_slice, has_batch_dim, residual_stack.ndim)
        return (residual_stack - residual_stack.mean(-1, keepdim=True)) / scale

    def _fc_norm_scale(self, batch_slice: Slice, has_batch_dim: bool, stack_ndim: int) -> Tensor:
        scale = self._get("fc_norm.hook_scale", "applying the final norm (fc_norm)")  # [*batch, 1]
        if has_batch_dim and self.has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        if stack_ndim == scale.ndim + 2:  # the stack has a token axis: broadcast the pooled scale over it
            scale = scale.unsqueeze(-2)
        return scale

    def _normalize_for_head(
        self, residual_stack: Tensor, pos_slice: Slice, batch_slice: Slice, has_batch_dim: bool
    ) -> Tensor:
        """Centre, divide by the final norm's cached scale and multiply by its weight: the linear part
        of the final norm, per component (the bias goes to `logit_bias`)."""
        model = self.model
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        norm = model.ln_final if model.ln_final is not None else model.fc_norm
        if norm is None:
            return residual_stack
        centred = residual_stack - residual_stack.mean(-1, keepdim=True)
        if model.ln_final is not None:
            scale = pos_slice.apply(self._get("ln_final.hook_scale", "direct logit attribution"), dim=-2)
            if has_batch_dim and self.has_batch_dim:
                scale = batch_slice.apply(scale, dim=0)
        else:
            scale = self._fc_norm_scale(batch_slice, has_batch_dim, residual_stack.ndim)
        return centred / scale * norm.w

    # ------------------------------------------------------------------ pooling and logits
    def _pool_weights(self, n_tokens: int) -> list[Float[Tensor, " pos"]]:
        """The pooling as weights over the token axis (one vector per pooled token group: two for
        DeiT distilled): `HookedViT.pool_weights`. Raises for max / avg-max pooling, which no weights
        describe."""
        return list(self.model.pool_weights(n_tokens))

    def _readouts(self, n_tokens: int) -> list[_Readout]:
        model, cfg = self.model, self.model.cfg
        if model.head is None:
            raise ValueError("this model has no classification head (n_classes=0): there are no logits to attribute")
        if cfg.normalize_features:
            raise ValueError(
                "the model scales its features to unit length before the head (a zero-shot head): the logits are not "
                "an affine function of the residual stream, so direct logit attribution does not apply (patch the "
                "components instead)"
            )
        weights = self._pool_weights(n_tokens)

        def head_directions(weight: Tensor) -> Callable[[Tensor], Tensor]:
            def directions(classes: Tensor) -> Tensor:
                model._check_classes(classes)
                return weight[classes.to(weight.device)]

            return directions

        if cfg.pooling == "token_avg":  # the head reads [class token, patch mean] side by side: one readout each
            d = cfg.d_model
            w_cls, w_avg = model.head.weight[:, :d], model.head.weight[:, d:]
            return [_Readout(1.0, weights[0], w_cls.T, model.head.bias, head_directions(w_cls)),
                    _Readout(1.0, weights[1], w_avg.T, torch.zeros_like(model.head.bias), head_directions(w_avg))]
        if model.head_dist is None:
            return [_Readout(1.0, weights[0], model.W_U, model.b_U, model.class_to_residual_directions)]
        return [
            _Readout(0.5, weights[0], model.head.weight.T, model.head.bias, head_directions(model.head.weight)),
            _Readout(0.5, weights[1], model.head_dist.weight.T, model.head_dist.bias,
                     head_directions(model.head_dist.weight)),
        ]

    def pool_stack(
        self, residual_stack: Float[Tensor, "components *batch pos d_model"]
    ) -> Float[Tensor, "components *batch d_model"]:
        """Apply the model's pooling to every component: the class token ('token'), the mean over
        the patch tokens ('avg'), or [components, *batch, 2, d_model] (class, distillation token)
        for DeiT distilled. Linear, so the pooled components sum to the pooled stream (`hook_pooled`
        for `fc_norm` models; for `ln_final` models pool `ln_final`'s output). Raises for max pooling."""
        weights = self._pool_weights(residual_stack.shape[-2])
        pooled = [einops.einsum(residual_stack, w.to(residual_stack), "... p d, p -> ... d") for w in weights]
        return pooled[0] if len(pooled) == 1 else torch.stack(pooled, dim=-2)

    def logit_contributions(
        self,
        residual_stack: Float[Tensor, "components *batch pos d_model"],
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "components *batch n_classes"]:
        """Each component's direct contribution to every logit, through the final norm's linear part
        (cached scale and weight), the pooling and the head's weight. `residual_stack` covers every
        token (e.g. `decompose_resid()`); if it sums to the last residual stream, then
        `logit_contributions(stack).sum(0) + logit_bias()` equals the logits."""
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        n_tokens = self._n_tokens()
        if residual_stack.shape[-2] != n_tokens:
            raise ValueError(
                f"logit_contributions needs a stack over all {n_tokens} tokens (got {residual_stack.shape[-2]} "
                f"on axis -2); for single positions use logit_attrs with pos_slice"
            )
        normed = self._normalize_for_head(residual_stack, Slice(None), batch_slice, has_batch_dim)
        out = 0.0
        for r in self._readouts(n_tokens):
            pooled = einops.einsum(normed, r.positions.to(normed), "... p d, p -> ... d")
            out = out + r.weight * (pooled @ r.W.to(normed))
        return out  # type: ignore[return-value]

    def logit_bias(
        self, classes: ClassesLike | None = None, incorrect_classes: ClassesLike | None = None
    ) -> Float[Tensor, "*classes"]:
        """The part of the logits that no residual component owns: the final norm's bias through the
        head, plus the head's bias. [n_classes] for `classes=None`, else one value per class index
        (minus the incorrect classes' when given). Does not depend on the image."""
        model = self.model
        norm = model.ln_final if model.ln_final is not None else model.fc_norm
        total = 0.0
        for r in self._readouts(self._n_tokens()):
            norm_bias = norm.b @ r.W if norm is not None else 0.0
            total = total + r.weight * (norm_bias + r.b)
        if classes is None:
            if incorrect_classes is not None:
                raise ValueError("incorrect_classes needs classes")
            return total  # type: ignore[return-value]
        idx = self._classes(classes)
        model._check_classes(idx.to(model.head.weight.device))  # range check
        out = total[idx.to(total.device)]
        if incorrect_classes is not None:
            bad = self._classes(incorrect_classes)
            self._check_same_shape(idx, bad)
            model._check_classes(bad.to(model.head.weight.device))
            out = out - total[bad.to(total.device)]
        return out

    def logit_attrs(  # type: ignore[override]
        self,
        residual_stack: Float[Tensor, "components *batch_and_pos d_model"],
        classes: ClassesLike,
        incorrect_classes: ClassesLike | None = None,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, " components *batch_and_pos_out"]:
        """Direct logit attribution for classes (TransformerLens' `logit_attrs`, with class indices
        instead of tokens and the model's pooling).

        Args:
            residual_stack: components of the residual stream after the last block,
                [components, batch, pos, d_model], e.g. `decompose_resid()` or
                `stack_head_results(incl_remainder=True)`. With `pos_slice`, the same stack already
                sliced at those positions (as in TransformerLens, e.g. `pos_slice=0` for the class token).
            classes: a class index, or one per image [batch].
            incorrect_classes: same shape as `classes`; attribute the logit difference instead.
            pos_slice: None: the stack covers every token and the result is the contribution to the
                logit through the pooling ([components, batch]). Otherwise the positions the stack was
                sliced at; the result is per position ([components, batch, pos], no pos axis for an
                int), each token weighted as the pooling weights it (class token 1 for 'token'
                pooling and 0 elsewhere, 1/n_patches per patch for 'avg'), so per-position
                attributions over all tokens sum to the pooled one.
            batch_slice: slice of the batch the stack was taken at (applied to the cached scales).
            has_batch_dim: whether the stack has a batch axis.

        Returns:
            Contributions that, summed over the components of a complete stack and added to
            `logit_bias(classes, incorrect_classes)`, give the logit (difference) exactly.
        """
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        idx = self._classes(classes)
        bad = self._classes(incorrect_classes) if incorrect_classes is not None else None
        if bad is not None:
            self._check_same_shape(idx, bad)
        n_tokens = self._n_tokens()
        full = pos_slice.mode == "identity"
        if full and residual_stack.shape[-2] != n_tokens:
            raise ValueError(
                f"residual_stack has {residual_stack.shape[-2]} on its token axis (-2), the model ran with "
                f"{n_tokens} tokens; pass the full token stack, or pos_slice= the positions it was sliced at "
                f"(e.g. pos_slice=0 for the class token)"
            )
        has_pos = pos_slice.mode != "int"
        normed = self._normalize_for_head(residual_stack, pos_slice, batch_slice, has_batch_dim)
        out = 0.0
        for r in self._readouts(n_tokens):
            dirs = r.directions(idx)  # [*classes, d_model]
            if bad is not None:
                dirs = dirs - r.directions(bad)
            dirs = dirs.to(normed)
            if has_pos:
                dirs = dirs.unsqueeze(-2)
            attr = (normed * dirs).sum(-1)  # [components, *batch, (pos)]
            weights = pos_slice.apply(r.positions, dim=0).to(attr)
            out = out + r.weight * attr * weights
        return out.sum(-1) if full else out  # type: ignore[union-attr]

    @staticmethod
    def _classes(classes: Any) -> Tensor:
        if isinstance(classes, str):
            raise TypeError("classes must be class indices (int or integer tensor), not a string")
        idx = torch.as_tensor(classes)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.ndim > 1:
            raise ValueError(f"classes must be an int or a 1-d integer tensor [batch], got {idx.dtype} {tuple(idx.shape)}")
        return idx.long()

    @staticmethod
    def _check_same_shape(idx: Tensor, bad: Tensor) -> None:
        if idx.shape != bad.shape:
            raise ValueError(
                f"classes and incorrect_classes must have the same shape, got {tuple(idx.shape)} and {tuple(bad.shape)}"
            )

