"""Gradient-weighted attention maps: attention Grad-CAM (as in Chefer et al.'s baselines) and Grad-SAM."""

from __future__ import annotations

from typing import Literal

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
    layer_list,
    readout_weights,
)
from caap.targets import Score
from hooked_vit import HookedViT


class AttentionGradCAM(AttributionMethod):
    """Grad-CAM on the attention map of one block, as the "GradCAM" baseline of Chefer, Gur & Wolf 2021,
    "Transformer Interpretability Beyond Attention Visualization" (CVPR; `Baselines.generate_cam_attn` in
    their code), after Selvaraju et al. 2017, "Grad-CAM" (ICCV).

    For the last block (by default), with A_h the attention of head h and G_h = dy_t/dA_h:
        a_h = A_h[readout row, patches],  g_h = G_h[readout row, patches]
        w_h = mean over patches of g_h                      (one weight per head)
        map = clamp(mean_h(w_h * a_h), min=0)
    The readout row is the class token's (see `caap.baselines._common` for other prefix layouts).
    Raw values (Chefer's code min-max rescales for display).

    Args:
        layer: which block (default -1, the last).
        readout: "auto", "class" or "pooled".
        score: "logit" (as the authors' code), "prob" or "log_prob".
    """

    name = "attention_gradcam"
    summary = "Grad-CAM on one block's attention map"
    paper = "Chefer, Gur & Wolf 2021a (CVPR), after Selvaraju et al. 2017"
    resolution = "patch"

    def __init__(self, model: HookedViT, layer: int = -1, readout: Readout = "auto", score: Score = "logit") -> None:
        super().__init__(model)
        check_choice("readout", readout, READOUTS)
        check_choice("score", score, BASELINE_SCORES)
        self.layer = layer_list(model, layer, "layer")[0]
        self.readout, self.score = readout, score

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        (a,), (g,) = attention_with_grads(self.model, pixels, targets, [self.layer], self.score)
        p = self.model.cfg.n_prefix_tokens
        r = readout_weights(self.model, a.shape[-1], self.readout, a.device, a.dtype)
        cam = torch.einsum("q,bhqk->bhk", r, a)[..., p:]
        grad = torch.einsum("q,bhqk->bhk", r, g)[..., p:]
        weights = grad.mean(dim=-1, keepdim=True)
        row = (cam * weights).mean(dim=1).clamp(min=0)
        return finish(self.model.to_grid(row, grid), pixels.device)

    def __repr__(self) -> str:
        return f"AttentionGradCAM(layer={self.layer}, readout={self.readout!r}, score={self.score!r})"


class GradSAM(AttributionMethod):
    """Grad-SAM: Barkan et al. 2021, "Grad-SAM: Explaining Transformers via Gradient Self-Attention Maps"
    (CIKM 2021).

        M = mean over layers and heads of  A_lh ⊙ ReLU(dy_t/dA_lh)           [pos, pos]
        map = M[readout row, patches]           (rows="readout", the default)
        map = mean over all query rows of M[:, patches]   (rows="all")

    The paper was written for BERT-style text classifiers; public re-implementations score each token
    by averaging M over all query rows (rows="all"). For a ViT the default reads the class token's row
    instead (rows="readout"), the convention of the other attention methods here (see
    `caap.baselines._common` for models without a class token). Which one the paper's equation means
    for a classifier with a [CLS] token was not checked against the paper's text.

    Args:
        rows: "readout" or "all" (see above).
        readout: "auto", "class" or "pooled".
        score: "logit" (default), "prob" or "log_prob".
    """

    name = "gradsam"
    summary = "attention times its positive gradient, averaged over blocks and heads"
    paper = "Barkan et al. 2021 (CIKM)"
    resolution = "patch"

    def __init__(
        self,
        model: HookedViT,
        rows: Literal["readout", "all"] = "readout",
        readout: Readout = "auto",
        score: Score = "logit",
    ) -> None:
        super().__init__(model)
        check_choice("rows", rows, ("readout", "all"))
        check_choice("readout", readout, READOUTS)
        check_choice("score", score, BASELINE_SCORES)
        self.rows, self.readout, self.score = rows, readout, score

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        layers = list(range(self.model.cfg.n_layers))
        patterns, grads = attention_with_grads(self.model, pixels, targets, layers, self.score)
        m = torch.stack([(a * g.clamp(min=0)).mean(dim=1) for a, g in zip(patterns, grads)]).mean(dim=0)
        p = self.model.cfg.n_prefix_tokens
        if self.rows == "all":
            row = m.mean(dim=1)[:, p:]
        else:
            r = readout_weights(self.model, m.shape[-1], self.readout, m.device, m.dtype)
            row = torch.einsum("q,bqk->bk", r, m)[:, p:]
        return finish(self.model.to_grid(row, grid), pixels.device)

    def __repr__(self) -> str:
        return f"GradSAM(rows={self.rows!r}, readout={self.readout!r}, score={self.score!r})"
