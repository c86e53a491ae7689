"""The floor every attribution method has to beat: a random map."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import finish
from hooked_vit import HookedViT


class RandomAttribution(AttributionMethod):
    """Uniform random scores on the patch grid, independent of the image and of the target.

    The usual sanity floor of attribution benchmarks (e.g. Adebayo et al. 2018, "Sanity Checks for
    Saliency Maps"; the random baseline of Hooker et al. 2019, "A Benchmark for Interpretability Methods
    in Deep Neural Networks"). Each call draws from a CPU generator seeded with `seed`, so the same seed
    gives the same maps on every device; image i of a batch gets the i-th draw, so a batch is not the
    same as each image alone (by design: the images get different maps).
    """

    name = "random"
    summary = "uniform random scores, independent of image and model: the sanity floor"
    paper = "Adebayo et al. 2018 (sanity checks)"
    resolution = "patch"

    def __init__(self, model: HookedViT, seed: int = 0) -> None:
        super().__init__(model)
        self.seed = int(seed)

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        gh, gw = self.model.grid_size_for(pixels)
        gen = torch.Generator().manual_seed(self.seed)
        return finish(torch.rand(pixels.shape[0], gh, gw, generator=gen), pixels.device)

    def __repr__(self) -> str:
        return f"RandomAttribution(seed={self.seed})"
