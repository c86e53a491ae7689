"""Beyond Intuition: token attributions inside Transformers (Chen et al., 2023), head-wise and token-wise."""

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
    chunks,
    finish,
    readout_weights,
)
from caap.targets import Score
from hooked_vit import HookedViT
from hooked_vit.checks import check_int, check_positive_int

_DOC_COMMON = """
    Both variants end with the paper's integrated attention gradient of the last block,
        W = mean_heads(clamp(1/S Σ_{s} ∂y_t/∂A_L (α_s x), min=0)),   α_s = 0, 1/(S-1), ..., 1
    (S = `steps` images scaled from zero, zero meaning the normalisation mean, to x), and
        map = (W ⊙ R)[readout row, patches].
    The `start_layer` default scales the authors' defaults for 12-block ViTs (BT-H 4th block, BT-T 6th,
    1-indexed) to the model's depth: the first block used is int(n_layers * 3 / 12) for BT-H and
    int(n_layers * 5 / 12) for BT-T (blocks 3 and 5, 0-indexed, on a 12-block ViT).

    Departures from the authors' code (github.com/jiaminchen-1031/transformerinterp,
    `ViT_explanation_generator.Baselines.generate_ours` / `generate_ours_c`): their head weights are
    normalised over the whole batch (correct for one image only); here per image. Their readout is the class
    token's row; here the readout of `caap.baselines._common` (the class token where the model pools it).
    Their layers are 1-indexed (`start_layer`); here 0-indexed. Scaled inputs run `internal_batch_size`
    rows at a time. Raw values.
"""


def _start(model: HookedViT, start_layer: int | None, default_twelfths: int) -> int:
    n = model.cfg.n_layers
    if start_layer is None:
        return int(n * default_twelfths / 12)
    return check_int(start_layer, "start_layer", 0, n - 1)


class _BeyondIntuition(AttributionMethod):
    resolution = "patch"
    default_twelfths = 0

    def __init__(
        self,
        model: HookedViT,
        start_layer: int | None = None,
        steps: int = 20,
        readout: Readout = "auto",
        score: Score = "logit",
        internal_batch_size: int = 32,
    ) -> None:
        super().__init__(model)
        steps = check_positive_int(steps, "steps")
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        check_choice("readout", readout, READOUTS)
        check_choice("score", score, BASELINE_SCORES)
        self.start_layer = _start(model, start_layer, self.default_twelfths)
        self.steps, self.readout, self.score, self.internal_batch_size = steps, readout, score, internal_batch_size

    def last_block_weight(self, pixels: Tensor, targets: Tensor) -> Float[Tensor, "batch pos pos"]:
        """W: the integrated, clamped, head-averaged gradient of the last block's attention."""
        x = pixels.detach()
        b, n = x.shape[0], self.steps
        alphas = torch.linspace(0, 1, n, device=x.device, dtype=x.dtype)
        last = self.model.cfg.n_layers - 1
        total = None
        rows = torch.arange(b * n, device=x.device)
        for s in chunks(len(rows), self.internal_batch_size):
            img, k = rows[s] // n, rows[s] % n
            _, (g,) = attention_with_grads(
                self.model, alphas[k].view(-1, 1, 1, 1) * x[img], targets[img], [last], self.score
            )
            if total is None:
                total = torch.zeros(b, *g.shape[1:], device=g.device, dtype=g.dtype)
            total.index_add_(0, img, g)
        assert total is not None
        return (total / n).clamp(min=0).mean(dim=1)

    def _finish(self, rel: Tensor, weight: Tensor, pixels: Tensor) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        m = weight * rel
        r = readout_weights(self.model, m.shape[-1], self.readout, m.device, m.dtype)
        row = torch.einsum("q,bqk->bk", r, m)[:, self.model.cfg.n_prefix_tokens :]
        return finish(self.model.to_grid(row, grid), pixels.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(start_layer={self.start_layer}, steps={self.steps}, readout={self.readout!r}, "
            f"score={self.score!r}, internal_batch_size={self.internal_batch_size})"
        )


class BeyondIntuitionHead(_BeyondIntuition):
    __doc__ = (
        """Beyond Intuition, head-wise (BT-H): Chen, Li, Yu, Zhang & Wang 2023, "Beyond Intuition: Rethinking
    Token Attributions inside Transformers" (TMLR 2023).

    For each block l from `start_layer` on, with A_lh the attention of head h and G_lh = ∂y_t/∂A_lh:
        I_h = mean_ij |A_lh^T G_lh|_ij,   I_h normalised to sum 1 over heads,   Ā_l = Σ_h I_h A_lh,
        R = I;  R = R + Ā_l R  (block by block)
"""
        + _DOC_COMMON
    )

    name = "beyond_intuition_head"
    summary = "attention rolled out with head weights from integrated gradients (head-wise)"
    paper = "Chen et al. 2023 (TMLR)"
    default_twelfths = 3

    def relevance(self, pixels: Tensor, targets: Tensor) -> Float[Tensor, "batch pos pos"]:
        """R, before the last block's gradient weight."""
        layers = list(range(self.start_layer, self.model.cfg.n_layers))
        patterns, grads = attention_with_grads(self.model, pixels, targets, layers, self.score)
        b, _, t, _ = patterns[0].shape
        rel = torch.eye(t, device=patterns[0].device, dtype=patterns[0].dtype).expand(b, t, t)
        for a, g in zip(patterns, grads):
            importance = (a.transpose(-1, -2) @ g).abs().mean(dim=(-1, -2))  # [batch, head]
            importance = importance / importance.sum(dim=1, keepdim=True).clamp(min=1e-30)
            rel = rel + torch.einsum("bh,bhqk->bqk", importance, a) @ rel
        return rel

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        return self._finish(self.relevance(pixels, targets), self.last_block_weight(pixels, targets), pixels)


class BeyondIntuitionToken(_BeyondIntuition):
    __doc__ = (
        """Beyond Intuition, token-wise (BT-T): Chen, Li, Yu, Zhang & Wang 2023, "Beyond Intuition:
    Rethinking Token Attributions inside Transformers" (TMLR 2023).

    For each block l from `start_layer` on, with Ā_l the head-averaged attention, z the block's input
    (`hook_resid_pre`) and v̂ = Σ_h v_h W_O^h the values mapped through the output projection (no bias):
        D_l = diag(|v̂_i| / |z_i|),   R = I;  R = R + Ā_l D_l R  (block by block);  then R = |R|
"""
        + _DOC_COMMON
        + """    BT-T only: W_O includes LayerScale where the model has it (the authors' models have none).
"""
    )

    name = "beyond_intuition_token"
    summary = "attention rolled out with token weights from integrated gradients (token-wise)"
    paper = "Chen et al. 2023 (TMLR)"
    default_twelfths = 5

    def relevance(self, pixels: Tensor, targets: Tensor) -> Float[Tensor, "batch pos pos"]:
        """|R|, before the last block's gradient weight (no gradient needed)."""
        layers = list(range(self.start_layer, self.model.cfg.n_layers))
        store: dict[str, Tensor] = {}

        def save(x: Tensor, hook) -> None:
            store[hook.name] = x.detach()

        names = [f"blocks.{lay}.{part}" for lay in layers for part in ("hook_resid_pre", "attn.hook_v", "attn.hook_pattern")]
        with torch.no_grad(), self.model.hooks(fwd_hooks=[(n, save) for n in names]):
            self.model(pixels)
            rel = None
            for lay in layers:
                z = store[f"blocks.{lay}.hook_resid_pre"]
                v_out = torch.einsum("bphd,hdm->bpm", store[f"blocks.{lay}.attn.hook_v"], self.model.blocks[lay].attn.W_O)
                order = v_out.norm(dim=-1) / z.norm(dim=-1).clamp(min=1e-30)  # [batch, pos]
                a = store[f"blocks.{lay}.attn.hook_pattern"].mean(dim=1)
                if rel is None:
                    b, t = order.shape
                    rel = torch.eye(t, device=a.device, dtype=a.dtype).expand(b, t, t)
                rel = rel + (a * order[:, None, :]) @ rel
        assert rel is not None
        return rel.abs()

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        return self._finish(self.relevance(pixels, targets), self.last_block_weight(pixels, targets), pixels)
