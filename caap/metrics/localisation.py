"""Localisation metrics: does the attribution map fall on the annotated object?

Each compares the map, upsampled to the input size (bilinear by default, `interpolation="nearest"` as
the alternative; a map already at the input size is used as is), with the box-union mask of each image
in the model's input frame (`caap.data.sample_mask` / `box_mask`). They need neither the model nor the
pixels: call `metric(None, None, maps, masks=masks)` (or pass them; the pixels' size is then checked
against the masks'). Images whose mask is empty give NaN (average with `torch.nanmean`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from caap.metrics.base import Interpolation, Metric, Model, as_map_batch, check_masks, upsample_maps
from caap.targets import Target

Threshold = Literal["area", "top_k", "max"]


class _LocalisationMetric(Metric):
    kind = "localisation"

    def __init__(self, *, interpolation: Interpolation = "bilinear") -> None:
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        self.interpolation = interpolation

    def _prepare(
        self, pixels: Tensor | None, maps: Tensor, masks: Any
    ) -> tuple[Float[Tensor, "batch H W"], Bool[Tensor, "batch H W"]]:
        maps = as_map_batch(maps)
        size = tuple(pixels.shape[-2:]) if isinstance(pixels, Tensor) else None
        masks = check_masks(masks, maps.shape[0], size)
        maps = maps.to(masks.device)
        if not torch.isfinite(maps).all():
            raise ValueError("maps contain NaN or inf values")
        return upsample_maps(maps, (masks.shape[-2], masks.shape[-1]), self.interpolation), masks

    def __call__(
        self,
        model: Model | None,
        pixels: Float[Tensor, "batch chan H W"] | None,
        maps: Float[Tensor, "batch h w"],
        targets: Target = None,
        masks: Bool[Tensor, "batch H W"] | None = None,
    ) -> Float[Tensor, " batch"]:
        """One value per image (on the CPU). `model` and `targets` are ignored; `masks` is required."""
        up, masks = self._prepare(pixels, maps, masks)
        out = self._compute(up, masks).float()
        empty = ~masks.flatten(1).any(dim=1)
        return torch.where(empty, torch.full_like(out, float("nan")), out).cpu()

    def _compute(self, up: Float[Tensor, "batch H W"], masks: Bool[Tensor, "batch H W"]) -> Tensor:
        raise NotImplementedError


def max_points(maps: Float[Tensor, "batch H W"]) -> Float[Tensor, "batch 2"]:
    """(row, col) of each map's maximum. Ties (e.g. a coarse map upsampled with "nearest") go to the
    tied pixel nearest to the tied pixels' mean position, so a flat top counts at its centre, not at its
    top-left corner."""
    b, h, w = maps.shape
    flat = maps.reshape(b, -1)
    tied = flat == flat.max(dim=1, keepdim=True).values  # [b, H*W]
    ys = torch.arange(h, device=maps.device, dtype=torch.float32).repeat_interleave(w)
    xs = torch.arange(w, device=maps.device, dtype=torch.float32).repeat(h)
    n = tied.sum(dim=1, keepdim=True).float()
    cy = (tied * ys).sum(dim=1, keepdim=True) / n
    cx = (tied * xs).sum(dim=1, keepdim=True) / n
    d2 = (ys - cy) ** 2 + (xs - cx) ** 2
    d2 = torch.where(tied, d2, torch.full_like(d2, float("inf")))
    idx = d2.argmin(dim=1)
    return torch.stack([idx // w, idx % w], dim=1).float()


class PointingGame(_LocalisationMetric):
    """Pointing game (Zhang, Lin, Brandt, Shen & Sclaroff 2016, "Top-down Neural Attention by Excitation
    Backprop", ECCV; IJCV 2018): 1 (hit) if the maximum of the map upsampled to the input size lies
    within `tolerance` pixels (Euclidean, inclusive; default 15 as in the paper) of the box union, else
    0. Ties: see `max_points`. Higher is better."""

    name = "pointing_game"
    higher_is_better = True

    def __init__(self, *, tolerance: float = 15.0, interpolation: Interpolation = "bilinear") -> None:
        super().__init__(interpolation=interpolation)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
        self.tolerance = float(tolerance)

    def _compute(self, up: Tensor, masks: Tensor) -> Tensor:
        _b, h, w = up.shape
        pts = max_points(up)  # [b, 2]
        ys = torch.arange(h, device=up.device, dtype=torch.float32)[:, None]
        xs = torch.arange(w, device=up.device, dtype=torch.float32)[None, :]
        d2 = (ys - pts[:, 0, None, None]) ** 2 + (xs - pts[:, 1, None, None]) ** 2  # [b, H, W]
        d2 = torch.where(masks, d2, torch.full_like(d2, float("inf")))
        return (d2.flatten(1).min(dim=1).values <= self.tolerance**2 + 1e-6).float()


class BoxEnergy(_LocalisationMetric):
    """Energy-based pointing game (Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu 2020, "Score-CAM:
    Score-Weighted Visual Explanations for Convolutional Neural Networks", CVPR workshops): the share of
    the map's positive mass (negative values clipped to 0 after upsampling) that lies inside the box
    union, in [0, 1]. NaN where the map has no positive value. Higher is better."""

    name = "box_energy"
    higher_is_better = True

    def _compute(self, up: Tensor, masks: Tensor) -> Tensor:
        pos = up.clamp(min=0).flatten(1)
        total = pos.sum(dim=1)
        inside = (pos * masks.flatten(1)).sum(dim=1)
        return torch.where(total > 0, inside / total.clamp(min=torch.finfo(pos.dtype).tiny), torch.nan)


def threshold_maps(
    up: Float[Tensor, "batch H W"],
    masks: Bool[Tensor, "batch H W"],
    threshold: Threshold = "area",
    k: float = 50.0,
    fraction: float = 0.5,
) -> Bool[Tensor, "batch H W"]:
    """Binarise upsampled maps.

    "area"  (default) keep the top-q pixels, q = the mask's own area fraction, so the kept region is as
            large as the box union;
    "top_k" keep the top `k` percent of the pixels;
    "max"   keep the pixels >= min + `fraction` * (max - min) (for non-negative maps: a fraction of the
            max, as CAM's localisation does).
    Top-q keeps every pixel whose value reaches the q-th largest value (ties inclusive), at least one.
    """
    b, h, w = up.shape
    flat = up.reshape(b, -1)
    if threshold in ("area", "top_k"):
        if threshold == "area":
            q = masks.reshape(b, -1).float().mean(dim=1)
        else:
            if not 0 < k <= 100:
                raise ValueError(f"k must be a percentage in (0, 100], got {k}")
            q = torch.full((b,), k / 100.0, device=up.device)
        n_keep = torch.round(q * h * w).long().clamp(min=1, max=h * w)
        ordered = flat.sort(dim=1, descending=True).values
        kth = ordered.gather(1, (n_keep - 1)[:, None])
        keep = flat >= kth
    elif threshold == "max":
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        lo = flat.min(dim=1, keepdim=True).values
        hi = flat.max(dim=1, keepdim=True).values
        keep = flat >= lo + fraction * (hi - lo)
    else:
        raise ValueError(f"threshold must be 'area', 'top_k' or 'max', got {threshold!r}")
    return keep.view(b, h, w)


class _ThresholdMetric(_LocalisationMetric):
    def __init__(
        self,
        *,
        threshold: Threshold = "area",
        k: float = 50.0,
        fraction: float = 0.5,
        interpolation: Interpolation = "bilinear",
    ) -> None:
        super().__init__(interpolation=interpolation)
        if threshold not in ("area", "top_k", "max"):
            raise ValueError(f"threshold must be 'area', 'top_k' or 'max', got {threshold!r}")
        self.threshold = threshold
        self.k = float(k)
        self.fraction = float(fraction)

    def _confusion(self, up: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keep = threshold_maps(up, masks, self.threshold, self.k, self.fraction).flatten(1)
        m = masks.flatten(1)
        tp = (keep & m).sum(dim=1).float()
        fp = (keep & ~m).sum(dim=1).float()
        fn = (~keep & m).sum(dim=1).float()
        return tp, fp, fn


class IoU(_ThresholdMetric):
    """Intersection over union of the thresholded map and the box union (the localisation protocol of
    CAM, Zhou et al. 2016, "Learning Deep Features for Discriminative Localization", CVPR, on masks
    rather than a single box). Threshold options: see `threshold_maps`; default "area". Higher is better.
    """

    name = "iou"
    higher_is_better = True

    def _compute(self, up: Tensor, masks: Tensor) -> Tensor:
        tp, fp, fn = self._confusion(up, masks)
        return tp / (tp + fp + fn).clamp(min=1)


class FMeasure(_ThresholdMetric):
    """F-measure of the thresholded map against the box union: (1 + beta^2) P R / (beta^2 P + R), with
    precision P and recall R over pixels (the F-measure of saliency evaluation, e.g. Achanta et al. 2009,
    "Frequency-tuned Salient Region Detection", CVPR); default beta = 1 (F1). Threshold options: see
    `threshold_maps`. With the default "area" threshold P = R (ties aside), so F1 equals the recall.
    Higher is better."""

    name = "f1"
    higher_is_better = True

    def __init__(self, *, beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def _compute(self, up: Tensor, masks: Tensor) -> Tensor:
        tp, fp, fn = self._confusion(up, masks)
        b2 = self.beta**2
        return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp).clamp(min=1e-12)
