"""LibraGrad: gradient-flow balancing for Transformer attributions (Mehri et al., CVPR 2025), applied to
Input x Gradient, GAE and Grad-SAM."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import (
    BASELINE_SCORES,
    READOUTS,
    Readout,
    check_choice,
    finish,
    grad_mode,
    leaf_input,
    readout_weights,
)
from caap.baselines._rules import check_rule_support, rule_hooks
from caap.targets import Score, class_score
from hooked_vit import HookedViT

_DOC_COMMON = """
    LibraGrad (Mehri, Soleymani Baghshah & Pilehvar 2025, "LibraGrad: Balancing Gradient Flow for
    Universally Better Vision Transformer Attributions", CVPR 2025) changes only the backward pass, so that
    the gradient of a Transformer is "FullGrad-complete" as a CNN's is (input x gradient plus the biases'
    terms sum to the output): it prunes the backward paths through the attention weights (query and key
    detached), through the LayerNorm's scale (held constant) and through the activation's gate (GELU's
    Φ(x) held constant), and scales bilinear products (gated MLPs, which no HookedViT has). Forward values
    are unchanged. See `caap.baselines._rules`.

    The score differentiated is the target's softmax probability by default, as the authors' LibraGrad
    preset (their "S1": a softmax on the logits before the target is read); score="logit" gives their S0.

    Departures from the authors' code (github.com/NightMachinery/pytorch-image-models-libragrad-v1 and
    decompv-libragrad-v1): their presets also apply "dissent suppression" (DS100) to the gradient of the
    patch-embedding convolution, which does not change token-level maps and is not implemented; the
    gradient-weighted attention variants reuse this package's GAE / Grad-SAM recurrences
    (`caap.baselines.gae`, `caap.baselines.attention_grads`) with the LibraGrad gradients in place of the
    plain ones. Models with qk-norm are refused. Raw values (no rescaling).
"""


def libragrad_gradients(
    model: HookedViT,
    pixels: Float[Tensor, "batch chan H W"],
    targets: Int[Tensor, " batch"],
    score: Score = "prob",
    attention: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """One forward and one LibraGrad backward pass: (the residual stream entering block 0 [batch, pos,
    d_model], its gradient, and with `attention` the attention patterns [batch, head, q, k] of every
    block and their gradients; else two empty lists). The images of a batch do not interact, so the
    gradient of the summed scores is each image's own."""
    store: dict[str, Tensor] = {}
    patterns: list[Tensor] = []

    def keep(resid: Tensor, hook) -> Tensor:
        store["resid"] = resid
        return resid

    def grad_leaf(pattern: Tensor, hook) -> Tensor:
        # the attention weights are constants of the LibraGrad graph (query and key detached): make them
        # a leaf so that their gradient, which exists, can be read
        p = pattern.detach().requires_grad_(True)
        patterns.append(p)
        return p

    hooks = [*rule_hooks(model, "constant"), ("blocks.0.hook_resid_pre", keep)]
    if attention:
        hooks += [(f"blocks.{layer}.attn.hook_pattern", grad_leaf) for layer in range(model.cfg.n_layers)]
    with grad_mode():
        x, targets = leaf_input(pixels), targets.clone()
        with model.hooks(fwd_hooks=hooks):
            logits = model(x)
        total = class_score(logits, targets, score).sum()
        resid = store["resid"]
        grads = torch.autograd.grad(total, [resid, *patterns])
    return resid.detach(), grads[0].detach(), [p.detach() for p in patterns], [g.detach() for g in grads[1:]]


class _LibraGradBase(AttributionMethod):
    resolution = "patch"

    def __init__(self, model: HookedViT, readout: Readout = "auto", score: Score = "prob") -> None:
        super().__init__(model)
        check_rule_support(model, f"LibraGrad ({self.name})")
        check_choice("readout", readout, READOUTS)
        check_choice("score", score, BASELINE_SCORES)
        self.readout, self.score = readout, score

    def _row(self, rel: Tensor) -> Tensor:
        """The readout row of a [batch, pos, pos] matrix, patch columns only."""
        r = readout_weights(self.model, rel.shape[-1], self.readout, rel.device, rel.dtype)
        return torch.einsum("q,bqk->bk", r, rel)[:, self.model.cfg.n_prefix_tokens :]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(readout={self.readout!r}, score={self.score!r})"


class LibraGradIxG(_LibraGradBase):
    __doc__ = (
        """LibraGrad applied to Input x Gradient, at the tokens entering block 0 (the authors' token-level
    IxG, their "blocks__0__CAT"): map = Σ_channels resid_0 ⊙ ∂y/∂resid_0 over the patch tokens, with the
    LibraGrad backward pass. With every bias zero and score="logit" the map plus the prefix tokens'
    terms sums exactly to the target logit (FullGrad-completeness; tested).
    `readout` is unused (kept for a uniform signature).
"""
        + _DOC_COMMON
    )

    name = "libragrad_ixg"
    summary = "Input x Gradient at the first block's tokens, gradient flow rebalanced"
    paper = "Mehri, Soleymani Baghshah & Pilehvar 2025 (CVPR)"

    def token_relevance(self, pixels: Tensor, targets: Tensor) -> Float[Tensor, "batch pos"]:
        """Input x gradient of every token entering block 0, prefix tokens included."""
        resid, g, _, _ = libragrad_gradients(self.model, pixels, targets, self.score)
        return (resid * g).sum(-1)

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        rel = self.token_relevance(pixels, targets)[:, self.model.cfg.n_prefix_tokens :]
        return finish(self.model.to_grid(rel, grid), pixels.device)


class LibraGradGAE(_LibraGradBase):
    __doc__ = (
        """LibraGrad applied to Chefer et al.'s GAE (2021b; the authors' "GenAtt"): the GAE recurrence
        R = I;  for each block: R = R + mean_heads(clamp(G ⊙ A, min=0)) R;  map = R[readout row, patches]
    with G the LibraGrad gradient of the target score with respect to the attention weights A.
"""
        + _DOC_COMMON
    )

    name = "libragrad_gae"
    summary = "GAE with the gradient flow rebalanced"
    paper = "Mehri, Soleymani Baghshah & Pilehvar 2025 (CVPR)"

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        _, _, patterns, grads = libragrad_gradients(self.model, pixels, targets, self.score, attention=True)
        b, _, t, _ = patterns[0].shape
        rel = torch.eye(t, device=patterns[0].device, dtype=patterns[0].dtype).expand(b, t, t)
        for a, g in zip(patterns, grads):
            rel = rel + (g * a).clamp(min=0).mean(dim=1) @ rel
        return finish(self.model.to_grid(self._row(rel), grid), pixels.device)


class LibraGradGradSAM(_LibraGradBase):
    __doc__ = (
        """LibraGrad applied to Grad-SAM (Barkan et al. 2021; the authors' layer-wise "AttnGrad" family):
        M = mean over layers and heads of A ⊙ ReLU(G);  map = M[readout row, patches]
    with G the LibraGrad gradient with respect to the attention weights A (the readout row as
    `caap.baselines.GradSAM`'s default).
"""
        + _DOC_COMMON
    )

    name = "libragrad_gradsam"
    summary = "Grad-SAM with the gradient flow rebalanced"
    paper = "Mehri, Soleymani Baghshah & Pilehvar 2025 (CVPR)"

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        _, _, patterns, grads = libragrad_gradients(self.model, pixels, targets, self.score, attention=True)
        m = torch.stack([(a * g.clamp(min=0)).mean(dim=1) for a, g in zip(patterns, grads)]).mean(dim=0)
        return finish(self.model.to_grid(self._row(m), grid), pixels.device)
