"""Faithfulness and localisation metrics for attribution maps, one class per metric (in the manner of
Quantus): each declares its `name`, `higher_is_better` and `kind`, and is called the same way:

    metric = Insertion()                                   # or get_metric("insertion", level="pixel")
    values = metric(model, pixels, maps, targets=None, masks=None)    # Float[Tensor, "batch"], CPU

Arguments of the call:
    model    any callable pixels [batch, chan, H, W] -> logits [batch, n_classes] (a `HookedViT`, a timm
             model, a transparent test module); run on its own device (the first parameter's; the pixels'
             for parameter-free callables) under `torch.inference_mode()`, `batch_size` images a call.
             Faithfulness metrics need it; localisation metrics ignore it (pass None).
    pixels   [batch, chan, H, W], normalised as the model expects (`model.preprocess`). Localisation
             metrics only check their size against the masks' (may be None).
    maps     [batch, h, w] (or [batch, 1, h, w]) at ANY resolution: the patch grid (14x14), coarser (7x7),
             finer (24x24) or the pixels (224x224). Higher = more evidence for the target.
             Pixel-level use: upsampled to (H, W), bilinear (align_corners=False) by default,
             `interpolation="nearest"` as the alternative. Patch-level use: area-averaged onto the
             model's patch grid, a coarser map being first upsampled to (H, W).
    targets  None (each image's predicted class), an int, or one class per image. Faithfulness only.
    masks    bool [batch, H, W] box unions in the input frame (`caap.data.sample_mask` / `box_mask`).
             Localisation only.

The patch grid is (H // patch_h, W // patch_w), the patch size being the metric's `patch_size` argument
or `model.cfg.patch_size`. Values are NaN where undefined (an empty mask, a map without positive mass):
average with `torch.nanmean`. Faithfulness metrics also give their curve: `metric.curve(model, pixels,
maps, targets)` -> `PerturbationCurve(fractions, scores)`.

Faithfulness (needs the model)                         better   default substrate / score
    Insertion   insertion AUC (Petsiuk et al. 2018)     higher   blur / softmax prob
    Deletion    deletion AUC (Petsiuk et al. 2018)      lower    zero (= mean colour) / softmax prob
    MoRF        AOPC, most relevant first (Samek 2017)  higher   zero / softmax prob
    LeRF        AOPC, least relevant first              lower    zero / softmax prob
    PositivePerturbation  Chefer et al. 2021            lower    black / top-1 accuracy AUC
    NegativePerturbation  Chefer et al. 2021            higher   black / top-1 accuracy AUC
    TokenDeletion   patch tokens dropped from the       lower    none (tokens leave the sequence) / prob
                    sequence, most relevant first, AUC
    TokenInsertion  patch tokens added to the prefix     higher   none / softmax prob
                    tokens, most relevant first, AUC
    ROADMoRF    ROAD (Rong et al. 2022), most relevant  lower    noisy linear imputation / softmax prob
                pixels removed first, mean over 10-90%
    ROADLeRF    ROAD, least relevant removed first      higher   noisy linear imputation / softmax prob
Localisation (needs masks)
    PointingGame  max within 15 px of the boxes (Zhang et al. 2016)      higher
    BoxEnergy     share of positive mass in the boxes (Score-CAM 2020)   higher
    IoU, FMeasure thresholded map vs boxes (top-q%, q = box area)        higher

Substrates, levels and scores: see `caap.metrics.faithfulness`; token metrics: `caap.metrics.tokens`;
ROAD: `caap.metrics.road`; thresholds: `caap.metrics.localisation`. Sanity check (not a metric of one map):
`caap.metrics.sanity.cascading_randomisation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from caap.metrics.base import CurveMetric, Metric, PerturbationCurve, pool_maps_to_grid, upsample_maps
from caap.metrics.evaluate import Evaluator
from caap.metrics.faithfulness import (
    Deletion,
    Insertion,
    LeRF,
    MoRF,
    NegativePerturbation,
    PerturbationMetric,
    PositivePerturbation,
    auc,
    make_substrate,
    perturbation_scores,
    unit_ranks,
)
from caap.metrics.localisation import BoxEnergy, FMeasure, IoU, PointingGame, max_points, threshold_maps
from caap.metrics.road import ROADLeRF, ROADMetric, ROADMoRF, linear_imputation
from caap.metrics.tokens import TokenDeletion, TokenInsertion, TokenPerturbationMetric

#: every metric by name; calling an entry (with optional keyword settings) builds the metric
METRICS: dict[str, Callable[..., Metric]] = {
    cls.name: cls
    for cls in (
        Insertion,
        Deletion,
        MoRF,
        LeRF,
        PositivePerturbation,
        NegativePerturbation,
        TokenDeletion,
        TokenInsertion,
        ROADMoRF,
        ROADLeRF,
        PointingGame,
        BoxEnergy,
        IoU,
        FMeasure,
    )
}


def get_metric(name: str, **settings: Any) -> Metric:
    """The metric called `name` (case-insensitive, '-' or ' ' for '_'), built with its defaults
    overridden by `settings`, e.g. `get_metric("deletion", level="pixel", score="logit")`."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; accepted names: {', '.join(sorted(METRICS))}")
    return METRICS[key](**settings)


__all__ = [
    "METRICS",
    "BoxEnergy",
    "CurveMetric",
    "Deletion",
    "Evaluator",
    "FMeasure",
    "Insertion",
    "IoU",
    "LeRF",
    "Metric",
    "MoRF",
    "NegativePerturbation",
    "PerturbationCurve",
    "PerturbationMetric",
    "PointingGame",
    "PositivePerturbation",
    "ROADLeRF",
    "ROADMetric",
    "ROADMoRF",
    "TokenDeletion",
    "TokenInsertion",
    "TokenPerturbationMetric",
    "auc",
    "get_metric",
    "linear_imputation",
    "make_substrate",
    "max_points",
    "perturbation_scores",
    "pool_maps_to_grid",
    "threshold_maps",
    "unit_ranks",
    "upsample_maps",
]
