"""Patch occlusion (Zeiler & Fergus 2014), one patch at a time, batched over patches."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import (
    BASELINE_SCORES,
    batched_scores,
    check_choice,
    check_reference,
    chunks,
    finish,
    reference_pixels,
)
from caap.targets import Score
from hooked_vit import HookedViT
from hooked_vit.checks import check_positive_int


class Occlusion(AttributionMethod):
    """Occlusion: Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks" (ECCV),
    with the occluder the size of one ViT patch, stepped patch by patch.

        map[i] = y_t(x) - y_t(x with patch i replaced by the reference)

    so higher means that hiding the patch lowers the target score more. The paper plots the probability
    of the correct class (`score="prob"`, the default); `score="logit"` measures the logit drop.
    The rows (image, patch) run `internal_batch_size` at a time.

    Args:
        reference: what a hidden patch shows: "zero" (default: zeros in normalised space, the
            normalisation mean colour; the paper's grey square), "mean" (the image's own per-channel
            mean), "black", a float or a tensor.
        score: "prob" (default), "logit" or "log_prob".
        internal_batch_size: forward rows at a time.
    """

    name = "occlusion"
    summary = "the target score's drop when each patch is covered"
    paper = "Zeiler & Fergus 2014 (ECCV)"
    resolution = "patch"

    def __init__(
        self,
        model: HookedViT,
        reference: str | float | Tensor = "zero",
        score: Score = "prob",
        internal_batch_size: int = 64,
    ) -> None:
        super().__init__(model)
        check_choice("score", score, BASELINE_SCORES)
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        check_reference(reference)
        self.reference, self.score, self.internal_batch_size = reference, score, internal_batch_size

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        gh, gw = self.model.grid_size_for(pixels)
        ph, pw = self.model.cfg.patch_size
        x = pixels.detach()
        base = reference_pixels(self.model, x, self.reference)
        full = batched_scores(self.model, x, targets, self.score)
        n = gh * gw
        rows = torch.arange(x.shape[0] * n, device=x.device)
        occluded = torch.empty(len(rows), device=x.device, dtype=full.dtype)
        for s in chunks(len(rows), self.internal_batch_size):
            img, k = rows[s] // n, rows[s] % n
            hide = torch.zeros(len(img), n, device=x.device, dtype=torch.bool)
            hide[torch.arange(len(img), device=x.device), k] = True
            hide = hide.view(-1, 1, gh, gw).repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
            xr = torch.where(hide, base[img], x[img])
            occluded[s] = batched_scores(self.model, xr, targets[img], self.score)
        drop = full.repeat_interleave(n) - occluded
        return finish(drop.view(-1, gh, gw), pixels.device)

    def __repr__(self) -> str:
        return (
            f"Occlusion(reference={self.reference!r}, score={self.score!r}, "
            f"internal_batch_size={self.internal_batch_size})"
        )
