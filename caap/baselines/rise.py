"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import (
    BASELINE_SCORES,
    batched_scores,
    check_choice,
    check_reference,
    finish,
    reference_pixels,
)
from caap.targets import Score
from hooked_vit import HookedViT
from hooked_vit.checks import check_positive_int


class RISE(AttributionMethod):
    """RISE: Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
    Models" (BMVC).

    Masks as in the paper and its reference code: N binary s x s grids with P(1) = p1, each upsampled
    bilinearly to (s + 1) * ceil(H/s) x (s + 1) * ceil(W/s) and cropped to H x W at a random shift in
    [0, cell); the saliency is the score-weighted mean of the masks:

        S(pixel) = 1 / (N p1) Σ_i y_t(x ⊙ M_i) M_i(pixel)

    with y_t the softmax probability of the target (the reference code puts a softmax on the model).
    Masking blends towards the reference, x ⊙ M + x' ⊙ (1 - M); with the default x' = 0 in normalised
    space that is the reference code's `masks * x` on the normalised tensor.

    The masks come from a CPU generator seeded with `seed` at every call, so the same seed gives the same
    map on every device, and every image of a batch uses the same N masks (so a batch gives each image
    what it gets alone). Upsampling uses `torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`; the reference code uses scikit-image's order-1 `resize(mode="reflect")`,
    which samples the same points and differs only in the half pixel at the border of the upsampled
    mask. Masks are built `internal_batch_size` rows at a time, never all at once.

    Args:
        n_masks: N (paper: 4000 for ResNet-50; 8000 for VGG16).
        s: the coarse grid's size, s x s cells (paper: 7); the cell size is ceil(H/s) x ceil(W/s).
        p1: probability that a cell is kept (paper: 0.5).
        seed: mask seed.
        reference: what masked-out pixels blend to ("zero" default, "black", "mean", a float, a tensor).
        score: "prob" (default), "logit" or "log_prob".
        internal_batch_size: forward rows at a time (images x masks).
    """

    name = "rise"
    summary = "random masks, each weighted by the target score of the masked image"
    paper = "Petsiuk, Das & Saenko 2018 (BMVC)"
    resolution = "pixel"

    def __init__(
        self,
        model: HookedViT,
        n_masks: int = 4000,
        s: int = 7,
        p1: float = 0.5,
        seed: int = 0,
        reference: str | float | Tensor = "zero",
        score: Score = "prob",
        internal_batch_size: int = 100,
    ) -> None:
        super().__init__(model)
        n_masks = check_positive_int(n_masks, "n_masks")
        s = check_positive_int(s, "s")
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        check_choice("score", score, BASELINE_SCORES)
        if not 0.0 < p1 <= 1.0:
            raise ValueError(f"p1 must be in (0, 1], got {p1!r}")
        check_reference(reference)
        self.n_masks, self.s, self.p1, self.seed = n_masks, s, float(p1), int(seed)
        self.reference, self.score, self.internal_batch_size = reference, score, internal_batch_size

    def mask_recipe(self, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """The seeded draws: grids [N, s, s], shifts [N] (rows), [N] (columns), and the cell size."""
        h, w = size
        cell = (math.ceil(h / self.s), math.ceil(w / self.s))
        gen = torch.Generator().manual_seed(self.seed)
        grids = (torch.rand(self.n_masks, self.s, self.s, generator=gen) < self.p1).float()
        dy = torch.randint(0, cell[0], (self.n_masks,), generator=gen)
        dx = torch.randint(0, cell[1], (self.n_masks,), generator=gen)
        return grids, dy, dx, cell

    def masks(
        self, size: tuple[int, int], start: int = 0, stop: int | None = None, device=None
    ) -> Float[Tensor, "n H W"]:
        """Masks `start:stop` for images of `size` (H, W)."""
        grids, dy, dx, cell = self.mask_recipe(size)
        stop = self.n_masks if stop is None else stop
        return self._build(grids[start:stop], dy[start:stop], dx[start:stop], cell, size, device)

    def _build(
        self, grids: Tensor, dy: Tensor, dx: Tensor, cell: tuple[int, int], size: tuple[int, int], device
    ) -> Tensor:
        h, w = size
        up = (self.s + 1) * cell[0], (self.s + 1) * cell[1]
        big = F.interpolate(grids.to(device)[:, None], size=up, mode="bilinear", align_corners=False)[:, 0]
        return torch.stack([m[y : y + h, x : x + w] for m, y, x in zip(big, dy.tolist(), dx.tolist())])

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        x = pixels.detach()
        b, _, h, w = x.shape
        base = reference_pixels(self.model, x, self.reference)
        grids, dy, dx, cell = self.mask_recipe((h, w))
        per_chunk = max(1, self.internal_batch_size // b)
        sal = torch.zeros(b, h, w, device=x.device, dtype=x.dtype)
        for start in range(0, self.n_masks, per_chunk):
            stop = min(start + per_chunk, self.n_masks)
            m = self._build(grids[start:stop], dy[start:stop], dx[start:stop], cell, (h, w), x.device).to(x.dtype)
            mm = m[None, :, None]  # [1, n, 1, H, W]
            xr = (x[:, None] * mm + base[:, None] * (1 - mm)).flatten(0, 1)  # [b * n, chan, H, W]
            scores = batched_scores(self.model, xr, targets.repeat_interleave(len(m)), self.score).view(b, len(m))
            sal += torch.einsum("bn,nhw->bhw", scores, m)
        return finish(sal / (self.n_masks * self.p1), pixels.device)

    def __repr__(self) -> str:
        return (
            f"RISE(n_masks={self.n_masks}, s={self.s}, p1={self.p1}, seed={self.seed}, reference={self.reference!r}, "
            f"score={self.score!r}, internal_batch_size={self.internal_batch_size})"
        )
