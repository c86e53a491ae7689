"""Pixel-level gradient attributions: Input x Gradient, Integrated Gradients, SmoothGrad.

All three differentiate the target logit (by default) with respect to the normalised pixels the model
reads, and reduce the channel axis at the end: the signed sum over channels, or with `abs=True` the
sum of absolute values (the grayscale reduction of Smilkov et al.'s saliency library). Internal rows
(interpolation steps, noisy samples) are batched `internal_batch_size` at a time, as Captum's knob of
that name; the images of a batch never interact, so a batch gives each image its own answer.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import (
    BASELINE_SCORES,
    check_choice,
    check_reference,
    chunks,
    finish,
    input_gradients,
    reduce_channels,
    reference_pixels,
)
from caap.targets import Score
from hooked_vit import HookedViT
from hooked_vit.checks import check_positive_int

IGMethod = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


class InputXGradient(AttributionMethod):
    """Input x Gradient: Shrikumar et al. 2016, "Not Just a Black Box: Learning Important Features Through
    Propagating Activation Differences" (arXiv:1605.01713); see also Shrikumar et al. 2017 (DeepLIFT).

        map = reduce_channels(x ⊙ dy_t/dx)        [batch, H, W]

    on the normalised pixels x. `abs=False` (default) sums the channels with sign; `abs=True` sums
    their absolute values.
    """

    name = "input_x_gradient"
    summary = "the pixels times the target score's gradient"
    paper = "Shrikumar et al. 2016"
    resolution = "pixel"

    def __init__(self, model: HookedViT, abs: bool = False, score: Score = "logit") -> None:
        super().__init__(model)
        check_choice("score", score, BASELINE_SCORES)
        self.abs, self.score = bool(abs), score

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grad = input_gradients(self.model, pixels, targets, self.score)
        return finish(reduce_channels(pixels.detach() * grad, self.abs), pixels.device)

    def __repr__(self) -> str:
        return f"InputXGradient(abs={self.abs}, score={self.score!r})"


def ig_alphas(n_steps: int, method: IGMethod) -> tuple[list[float], list[float]]:
    """(step sizes, alphas) of the path integral's quadrature, as Captum's `approximation_methods`."""
    check_choice("method", method, IG_METHODS)
    n = n_steps
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return list(0.5 * w), list(0.5 * (1 + x))
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")
        steps = [1 / (2 * (n - 1))] + [1 / (n - 1)] * (n - 2) + [1 / (2 * (n - 1))]
        return steps, list(np.linspace(0, 1, n))
    steps = [1 / n] * n
    if method == "riemann_left":
        return steps, list(np.linspace(0, 1 - 1 / n, n))
    if method == "riemann_right":
        return steps, list(np.linspace(1 / n, 1, n))
    return steps, list(np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n))


class IntegratedGradients(AttributionMethod):
    """Integrated Gradients: Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks" (ICML).

        IG(x) = (x - x') ⊙ ∫_0^1 dy_t/dx (x' + α (x - x')) dα ,   map = reduce_channels(IG)

    The integral uses `n_steps` points of Captum's quadratures (default Gauss-Legendre, Captum's
    default); the rows (image, step) run `internal_batch_size` at a time. Completeness holds up to the
    quadrature error: map.sum() ≈ y_t(x) - y_t(x') with `abs=False`.

    Args:
        reference: x'. "zero" (default: zeros in normalised space, i.e. the normalisation mean colour),
            "black" (pixel value 0 before normalisation), "mean", a float or a tensor.
        n_steps: quadrature points (Captum's default 50).
        method: "gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid".
        internal_batch_size: forward/backward rows at a time.
        abs: channel reduction (see the module docstring).
        score: "logit" (default), "prob" or "log_prob".
    """

    name = "integrated_gradients"
    summary = "gradients integrated along the straight path from a reference image"
    paper = "Sundararajan, Taly & Yan 2017 (ICML)"
    resolution = "pixel"

    def __init__(
        self,
        model: HookedViT,
        reference: str | float | Tensor = "zero",
        n_steps: int = 50,
        method: IGMethod = "gausslegendre",
        internal_batch_size: int = 32,
        abs: bool = False,
        score: Score = "logit",
    ) -> None:
        super().__init__(model)
        n_steps = check_positive_int(n_steps, "n_steps")
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        check_choice("score", score, BASELINE_SCORES)
        check_reference(reference)
        self.steps, self.alphas = ig_alphas(n_steps, method)
        self.reference, self.n_steps, self.method = reference, n_steps, method
        self.internal_batch_size, self.abs, self.score = internal_batch_size, bool(abs), score

    def integrated_gradients(self, pixels: Tensor, targets: Tensor) -> Float[Tensor, "batch chan H W"]:
        """The per-channel attributions [batch, chan, H, W], before the channel reduction."""
        x = pixels.detach()
        base = reference_pixels(self.model, x, self.reference)
        diff = x - base
        alphas = torch.tensor(self.alphas, device=x.device, dtype=x.dtype)
        steps = torch.tensor(self.steps, device=x.device, dtype=x.dtype)
        total = torch.zeros_like(x)
        n = self.n_steps
        rows = torch.arange(x.shape[0] * n, device=x.device)
        for s in chunks(len(rows), self.internal_batch_size):
            img, k = rows[s] // n, rows[s] % n
            xr = base[img] + alphas[k].view(-1, 1, 1, 1) * diff[img]
            g = input_gradients(self.model, xr, targets[img], self.score)
            total.index_add_(0, img, g * steps[k].view(-1, 1, 1, 1))
        return diff * total

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        return finish(reduce_channels(self.integrated_gradients(pixels, targets), self.abs), pixels.device)

    def __repr__(self) -> str:
        return (
            f"IntegratedGradients(reference={self.reference!r}, n_steps={self.n_steps}, method={self.method!r}, "
            f"internal_batch_size={self.internal_batch_size}, abs={self.abs}, score={self.score!r})"
        )


class SmoothGrad(AttributionMethod):
    """SmoothGrad: Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise" (arXiv:1706.03825).

        M̂(x) = 1/n Σ_i dy_t/dx (x + ε_i),   ε_i ~ N(0, σ²),   σ = noise_level · (max(x) - min(x))
        map = reduce_channels(M̂)        (default abs=True: Σ_c |M̂_c|, the paper's library's grayscale map)

    σ is a fraction of each image's own input range (the paper's "noise level", 10-20% recommended).
    The noise comes from a CPU generator seeded with `seed` at every call, so the same seed gives the same
    map on every device; every image of a batch sees the same standard-normal draws (scaled by its own
    σ), so a batch gives each image what it gets alone.

    Args:
        n_samples: noisy copies per image (paper: 50).
        noise_level: σ as a fraction of the input range (default 0.15).
        seed: noise seed.
        multiply_by_input: average (x + ε) ⊙ gradient instead (SmoothGrad on Input x Gradient, as
            Captum's NoiseTunnel on InputXGradient).
        internal_batch_size: forward/backward rows at a time.
        abs: channel reduction (see the module docstring).
        score: "logit" (default), "prob" or "log_prob".
    """

    name = "smoothgrad"
    summary = "gradients averaged over noisy copies of the image"
    paper = "Smilkov et al. 2017"
    resolution = "pixel"

    def __init__(
        self,
        model: HookedViT,
        n_samples: int = 50,
        noise_level: float = 0.15,
        seed: int = 0,
        multiply_by_input: bool = False,
        internal_batch_size: int = 32,
        abs: bool = True,
        score: Score = "logit",
    ) -> None:
        super().__init__(model)
        n_samples = check_positive_int(n_samples, "n_samples")
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        check_choice("score", score, BASELINE_SCORES)
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")
        self.n_samples, self.noise_level, self.seed = n_samples, float(noise_level), int(seed)
        self.multiply_by_input, self.internal_batch_size = bool(multiply_by_input), internal_batch_size
        self.abs, self.score = bool(abs), score

    def smoothed(self, pixels: Tensor, targets: Tensor) -> Float[Tensor, "batch chan H W"]:
        """The averaged per-channel gradients [batch, chan, H, W], before the channel reduction."""
        x = pixels.detach()
        b = x.shape[0]
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.n_samples, *x.shape[1:], generator=gen).to(device=x.device, dtype=x.dtype)
        sigma = self.noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
        total = torch.zeros_like(x)
        n = self.n_samples
        rows = torch.arange(b * n, device=x.device)
        for s in chunks(len(rows), self.internal_batch_size):
            img, k = rows[s] // n, rows[s] % n
            xr = x[img] + sigma[img].view(-1, 1, 1, 1) * noise[k]
            g = input_gradients(self.model, xr, targets[img], self.score)
            total.index_add_(0, img, g * xr if self.multiply_by_input else g)
        return total / n

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        return finish(reduce_channels(self.smoothed(pixels, targets), self.abs), pixels.device)

    def __repr__(self) -> str:
        return (
            f"SmoothGrad(n_samples={self.n_samples}, noise_level={self.noise_level}, seed={self.seed}, "
            f"multiply_by_input={self.multiply_by_input}, internal_batch_size={self.internal_batch_size}, "
            f"abs={self.abs}, score={self.score!r})"
        )
