"""Chefer et al.'s LRP-free gradient-weighted attention relevance ("Generic Attention-model Explainability")."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import (
    BASELINE_SCORES,
    READOUTS,
    Readout,
    attention_with_grads,
    check_choice,
    finish,
    readout_weights,
)
from caap.targets import Score
from hooked_vit import HookedViT


class GenericAttentionExplainability(AttributionMethod):
    """Chefer, Gur & Wolf 2021b, "Generic Attention-model Explainability for Interpreting Bi-Modal and
    Encoder-Decoder Transformers" (ICCV 2021), applied to a ViT as in the authors' ViT notebook.

    This is the LRP-free variant of Chefer et al. 2021a, "Transformer Interpretability Beyond Attention
    Visualization" (CVPR 2021): it is NOT the CVPR method, which weights the attention by its LRP
    relevance; here the attention is weighted by its gradient alone, the simplification the same
    authors published as 2021b (their "rule 5" / "rule 6"):

        R = I
        for each block:  Ā = mean_heads(clamp(dy_t/dA ⊙ A, min=0));  R = R + Ā R
        map = R[readout row, patch columns]

    with y_t the target logit (as the authors' code: one-hot times the logits). The readout row is the
    class token's (position 0) for class-token models (see `caap.baselines._common` for GAP, register
    and distillation tokens; those prefix tokens are propagated and dropped from the map). Raw values
    are returned (the authors min-max rescale only to display).

    Args:
        readout: "auto", "class" or "pooled" (see `caap.baselines._common`).
        score: what is differentiated: "logit" (the paper), "prob" or "log_prob".
    """

    name = "gae"
    summary = "attention weighted by its gradient, accumulated through the blocks (LRP-free)"
    paper = "Chefer, Gur & Wolf 2021b (ICCV)"
    resolution = "patch"

    def __init__(self, model: HookedViT, readout: Readout = "auto", score: Score = "logit") -> None:
        super().__init__(model)
        check_choice("readout", readout, READOUTS)
        check_choice("score", score, BASELINE_SCORES)
        self.readout, self.score = readout, score

    def relevance(
        self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]
    ) -> Float[Tensor, "batch pos pos"]:
        """The full relevance matrix R [batch, pos, pos]."""
        layers = list(range(self.model.cfg.n_layers))
        patterns, grads = attention_with_grads(self.model, pixels, targets, layers, self.score)
        b, _, t, _ = patterns[0].shape
        rel = torch.eye(t, device=patterns[0].device, dtype=patterns[0].dtype).expand(b, t, t)
        for a, g in zip(patterns, grads):
            cam = (g * a).clamp(min=0).mean(dim=1)
            rel = rel + cam @ rel
        return rel

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        rel = self.relevance(pixels, targets)
        r = readout_weights(self.model, rel.shape[-1], self.readout, rel.device, rel.dtype)
        row = torch.einsum("q,bqk->bk", r, rel)[:, self.model.cfg.n_prefix_tokens :]
        return finish(self.model.to_grid(row, grid), pixels.device)

    def __repr__(self) -> str:
        return f"GenericAttentionExplainability(readout={self.readout!r}, score={self.score!r})"


#: Short alias.
CheferGAE = GenericAttentionExplainability
