"""AtMan: attention manipulation (Deiseroth, Deb, Weinbach, Brack, Schramowski & Kersting 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import (
    BASELINE_SCORES,
    attention_names,
    batched_scores,
    check_choice,
    chunks,
    finish,
    layer_list,
)
from caap.targets import Score
from hooked_vit import HookedViT
from hooked_vit.checks import check_positive_int


class AtMan(AttributionMethod):
    """AtMan: Deiseroth, Deb, Weinbach, Brack, Schramowski & Kersting 2023, "AtMan: Understanding
    Transformer Predictions Through Memory Efficient Attention Manipulation" (NeurIPS 2023).

    A perturbation method in attention space: to score patch i, every query's pre-softmax attention
    score for key i is multiplied by `suppression_factor` (0.1 in the authors' code), in every layer and
    head, and the change of the target's cross-entropy is recorded:

        map[i] = CE_t(x, token i suppressed) - CE_t(x) = log p_t(x) - log p_t(x, i suppressed)

    (`score="log_prob"`, the authors' `get_delta_cross_entropies`; "logit" and "prob" give the drop of
    those instead). Higher means suppressing the patch hurts the target more.

    Details, as in the authors' implementation:
    - Multiplicative manipulation on scores shifted to a row minimum of zero (`shift_scores=True`; the
      shift leaves the softmax unchanged and makes the multiplication a true suppression even where
      scores are negative). `shift_scores=False` multiplies the raw scores, as the paper's equation reads.
    - Conceptual suppression (`conceptual_threshold`, the paper's κ): patches whose embedding has cosine
      similarity >= κ with patch i are suppressed together with it, each by
      `(1 - f) (1 - sim) + f` (f = suppression_factor) when `scale_by_similarity`, else by f.
      The similarity is taken on the patch embeddings (`hook_embed`, before position embeddings).
      None disables it. (The authors' Explainer defaults to κ = 0.6; 0.7 is the value of their vision
      experiments' grid; treat it as a setting to tune on the dev split.)
    - Only patch tokens are suppressed; the class, register and distillation tokens are never
      suppressed and get no entry.
    The rows (image, patch) run `internal_batch_size` at a time, one hook per layer scaling each row's
    key columns by that row's factors.

    Args:
        suppression_factor: multiplier of the suppressed key's scores (0 < f < 1 suppresses).
        conceptual_threshold: κ, or None for single-token suppression.
        scale_by_similarity: scale the factor of similar patches by their similarity (authors' default).
        shift_scores: see above.
        layers: which blocks are manipulated (None: all, the paper).
        score: "log_prob" (default), "logit" or "prob".
        internal_batch_size: forward rows at a time.
    """

    name = "atman"
    summary = "the target's loss change when attention to each patch is suppressed"
    paper = "Deiseroth et al. 2023 (NeurIPS)"
    resolution = "patch"

    def __init__(
        self,
        model: HookedViT,
        suppression_factor: float = 0.1,
        conceptual_threshold: float | None = 0.7,
        scale_by_similarity: bool = True,
        shift_scores: bool = True,
        layers: int | list[int] | None = None,
        score: Score = "log_prob",
        internal_batch_size: int = 32,
    ) -> None:
        super().__init__(model)
        check_choice("score", score, BASELINE_SCORES)
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        if suppression_factor < 0:
            raise ValueError(f"suppression_factor must be >= 0, got {suppression_factor!r}")
        if conceptual_threshold is not None and not 0.0 <= conceptual_threshold <= 1.0:
            raise ValueError(f"conceptual_threshold must be in [0, 1] or None, got {conceptual_threshold!r}")
        self.suppression_factor = float(suppression_factor)
        self.conceptual_threshold = conceptual_threshold
        self.scale_by_similarity, self.shift_scores = bool(scale_by_similarity), bool(shift_scores)
        self.layers = layer_list(model, layers)
        self.score, self.internal_batch_size = score, internal_batch_size

    def factors(self, pixels: Float[Tensor, "batch chan H W"]) -> Float[Tensor, "batch n_patches pos"]:
        """Row i of image b: the multiplier of every key column when patch i is explained."""
        gh, gw = self.model.grid_size_for(pixels)
        n, p = gh * gw, self.model.cfg.n_prefix_tokens
        b, f = pixels.shape[0], self.suppression_factor
        out = torch.ones(b, n, p + n, device=pixels.device, dtype=pixels.dtype)
        if self.conceptual_threshold is not None:
            store: dict[str, Tensor] = {}

            def save(emb: Tensor, hook) -> None:
                store["emb"] = emb.detach()

            with torch.no_grad(), self.model.hooks(fwd_hooks=[("hook_embed", save)]):
                self.model.embed(pixels)
            emb = F.normalize(store["emb"].float(), dim=-1, eps=1e-8)
            sim = (emb @ emb.transpose(1, 2)).clamp(-1, 1).to(out.dtype)  # [b, n, n]
            similar = sim >= self.conceptual_threshold
            scaled = (1 - f) * (1 - sim) + f if self.scale_by_similarity else torch.full_like(sim, f)
            out[:, :, p:] = torch.where(similar, scaled, torch.ones_like(sim))
        idx = torch.arange(n, device=pixels.device)
        out[:, idx, p + idx] = f
        return out

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        gh, gw = self.model.grid_size_for(pixels)
        x = pixels.detach()
        n = gh * gw
        full = batched_scores(self.model, x, targets, self.score)
        factors = self.factors(x)
        current: dict[str, Tensor] = {}

        def manipulate(scores: Tensor, hook) -> Tensor:
            if self.shift_scores:
                scores = scores - scores.amin(dim=-1, keepdim=True)
            return scores * current["f"][:, None, None, :]

        hooks = [(name, manipulate) for name in attention_names(self.model, self.layers, "attn_scores")]
        rows = torch.arange(x.shape[0] * n, device=x.device)
        suppressed = torch.empty(len(rows), device=x.device, dtype=full.dtype)
        with self.model.hooks(fwd_hooks=hooks):
            for s in chunks(len(rows), self.internal_batch_size):
                img, k = rows[s] // n, rows[s] % n
                current["f"] = factors[img, k]
                suppressed[s] = batched_scores(self.model, x[img], targets[img], self.score)
        drop = full.repeat_interleave(n) - suppressed
        return finish(drop.view(-1, gh, gw), pixels.device)

    def __repr__(self) -> str:
        return (
            f"AtMan(suppression_factor={self.suppression_factor}, conceptual_threshold={self.conceptual_threshold}, "
            f"scale_by_similarity={self.scale_by_similarity}, shift_scores={self.shift_scores}, layers={self.layers}, "
            f"score={self.score!r}, internal_batch_size={self.internal_batch_size})"
        )
