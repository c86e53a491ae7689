"""Faithfulness metrics: perturb the image in the order an attribution map gives and watch the target's score.

All of them are one loop, `perturbation_scores`: rank the units (patch-grid cells or pixels) by the map,
build, for every image and every step, the image with the first `count` units changed (deleted: replaced
by the substrate; inserted: revealed on top of the substrate), run the model on those images in batches
of `batch_size`, and read the target's score. The metrics differ only in the order, the steps and how the
curve is summarised:

===========================  ===========  ======================  ==========  ==============================
metric                       changes      order                   summary     better
===========================  ===========  ======================  ==========  ==============================
`Insertion` (RISE)           insert       most relevant first     AUC         higher
`Deletion` (RISE)            delete       most relevant first     AUC         lower
`MoRF` (AOPC)                delete       most relevant first     AOPC        higher
`LeRF` (AOPC)                delete       least relevant first    AOPC        lower
`PositivePerturbation`       delete       most relevant first     AUC         lower
`NegativePerturbation`       delete       least relevant first    AUC         higher
===========================  ===========  ======================  ==========  ==============================

Levels. `level="patch"` (default) ranks the model's patch-grid cells (the map is area-pooled onto the
grid, or first upsampled where it is coarser, see `caap.metrics.base.pool_maps_to_grid`) and changes one
whole patch-sized cell per step. `level="pixel"` ranks the pixels of the map upsampled to the input size
(bilinear by default, `interpolation="nearest"` as the alternative) and changes `n_steps` equal chunks of
pixels. Ties are broken in raster order (stable sort).

Substrates (what a deleted unit becomes, or what an inserted image starts from), in the normalised input
space the model reads:
    "zero"     the zero tensor, i.e. the dataset's mean colour (RISE's deletion substrate): mid-grey
               (unit RGB 0.5) for the AugReg ViTs (mean = std = 0.5), the ImageNet mean colour (unit
               RGB 0.485, 0.456, 0.406) for models normalised with it; never black.
    "blur"     the image blurred with an 11x11 Gaussian of sigma 5 and zero padding
               (`hooked_vit.preprocess.gaussian_blur(pixels, 5, 11, "zeros")`), RISE's insertion
               substrate (RISE builds the kernel by filtering a delta with scipy's reflect mode; this is
               the plain normalised Gaussian, which differs slightly).
    "black"    zero in raw [0, 1] pixels (unit RGB 0), i.e. (0 - mean) / std: what Chefer et al.'s code
               masks with.
    "uniform"  uniform noise in raw [0, 1] pixels (Samek et al.'s choice), seeded by `seed`.
    or a tensor broadcastable to the pixels, or a callable pixels -> substrate.
"black" and "uniform" need the normalisation: `mean`/`std` arguments or `model.data_config`.

Scores: "prob" (softmax probability of the target), "logit" (the target's logit), "accuracy" (1 where
the target is the top-1 class, else 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from caap.metrics.base import (
    CurveMetric,
    Interpolation,
    Model,
    PerturbationCurve,
    grid_for,
    normalisation,
    pool_maps_to_grid,
    resolve_patch_size,
    upsample_maps,
)
from caap.targets import Score, Target, check_classes, check_score, class_score, resolve_targets
from hooked_vit.checks import check_positive_int
from hooked_vit.preprocess import gaussian_blur, normalize

Substrate = Literal["zero", "blur", "black", "uniform"] | Tensor | Callable[[Tensor], Tensor]
Level = Literal["patch", "pixel"]
PERTURBATION_SCORES = ("prob", "logit", "accuracy")
"""The scores (`caap.targets.Score`) a perturbation curve may follow."""
Order = Literal["most", "least"]
Mode = Literal["insert", "delete"]

#: show a progress bar when a curve takes at least this many model calls (unless `progress` says otherwise)
PROGRESS_MIN_CALLS = 20


# ---------------------------------------------------------------------------------------------- substrates
def make_substrate(
    pixels: Float[Tensor, "batch chan H W"],
    substrate: Substrate,
    model: Any = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    seed: int = 0,
) -> Float[Tensor, "batch chan H W"]:
    """The substrate image for each input (see the module docstring for the named ones)."""
    if isinstance(substrate, Tensor):
        return substrate.to(device=pixels.device, dtype=pixels.dtype).expand_as(pixels)
    if callable(substrate):
        return substrate(pixels).to(device=pixels.device, dtype=pixels.dtype).expand_as(pixels)
    c = pixels.shape[1]
    if substrate == "zero":
        return torch.zeros_like(pixels)
    if substrate == "blur":  # RISE's substrate: zero padding
        return gaussian_blur(pixels, blur_sigma, blur_kernel, padding="zeros")
    if substrate in ("black", "uniform"):
        norm = normalisation(model, mean, std, substrate)
        if substrate == "black":
            unit = torch.zeros(1, c, 1, 1, device=pixels.device)
        else:
            gen = torch.Generator().manual_seed(seed)
            unit = torch.rand(tuple(pixels.shape), generator=gen).to(pixels.device)
        return normalize(unit, norm).to(pixels.dtype).expand_as(pixels)
    raise ValueError(
        f"unknown substrate {substrate!r}; accepted: 'zero', 'blur', 'black', 'uniform', a tensor, or a callable"
    )


# ---------------------------------------------------------------------------------------------- ranking
def _rank(values: Float[Tensor, "batch n"], order: Order) -> Int[Tensor, "batch n"]:
    """rank[b, i] = the step at which unit i is changed (0 = first); ties in index order."""
    if order not in ("most", "least"):
        raise ValueError(f"order must be 'most' or 'least', got {order!r}")
    key = -values if order == "most" else values
    perm = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(perm)
    rank.scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))
    return rank


def unit_ranks(
    maps: Float[Tensor, "batch h w"],
    size: tuple[int, int],
    patch_size: tuple[int, int],
    level: Level = "patch",
    order: Order = "most",
    interpolation: Interpolation = "bilinear",
) -> tuple[Int[Tensor, "batch H W"], int]:
    """For every input pixel, the rank of the unit it belongs to, and the number of units.

    patch level: units are the cells of the patch grid (size // patch_size; leftover border pixels join
    the last row / column of cells); pixel level: units are the pixels of the upsampled map.
    """
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf values")
    b = maps.shape[0]
    h, w = size
    if level == "patch":
        gh, gw = grid_for(size, patch_size)
        cells = pool_maps_to_grid(maps, (gh, gw), size, interpolation).reshape(b, gh * gw)
        cell_rank = _rank(cells, order)
        rows = (torch.arange(h, device=maps.device) // patch_size[0]).clamp(max=gh - 1)
        cols = (torch.arange(w, device=maps.device) // patch_size[1]).clamp(max=gw - 1)
        cell_of_pixel = rows[:, None] * gw + cols[None, :]  # [H, W]
        return cell_rank[:, cell_of_pixel], gh * gw
    if level == "pixel":
        up = upsample_maps(maps, size, interpolation).reshape(b, h * w)
        return _rank(up, order).view(b, h, w), h * w
    raise ValueError(f"level must be 'patch' or 'pixel', got {level!r}")


# ---------------------------------------------------------------------------------------------- the loop
def perturbation_scores(
    model: Model,
    pixels: Float[Tensor, "batch chan H W"],
    substrate: Float[Tensor, "batch chan H W"],
    ranks: Int[Tensor, "batch H W"],
    counts: Int[Tensor, " steps"],
    targets: Int[Tensor, " batch"],
    mode: Mode = "delete",
    scores: Sequence[Score] = ("prob",),
    batch_size: int = 64,
    progress: bool | None = None,
    desc: str = "perturbation",
) -> dict[str, Float[Tensor, "batch steps"]]:
    """{score: values [batch, steps]}: values[i, s] = the target's score on image i with its units of
    rank < counts[s] changed, for every score in `scores` (read off the same forward passes).

    mode "delete": those units take the substrate's values; "insert": those units keep the image's
    values and the rest is substrate. All (image, step) pairs are packed into model calls of
    `batch_size` images under `torch.inference_mode()`; everything stays on the pixels' device.
    """
    if mode not in ("insert", "delete"):
        raise ValueError(f"mode must be 'insert' or 'delete', got {mode!r}")
    batch_size = check_positive_int(batch_size, "batch_size")
    b, n_steps = pixels.shape[0], counts.shape[0]
    counts = counts.to(pixels.device)
    total = b * n_steps
    out = {s: torch.empty(total, device=pixels.device) for s in scores}
    starts = range(0, total, batch_size)
    show = progress if progress is not None else len(starts) >= PROGRESS_MIN_CALLS
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, leave=False, disable=not show):
            pair = torch.arange(start, min(start + batch_size, total), device=pixels.device)
            img, step = pair // n_steps, pair % n_steps
            changed = (ranks[img] < counts[step][:, None, None])[:, None]  # [n, 1, H, W]
            if mode == "delete":
                x = torch.where(changed, substrate[img], pixels[img])
            else:
                x = torch.where(changed, pixels[img], substrate[img])
            logits = model(x)
            if start == 0:
                check_classes(targets, logits.shape[-1])
            for s, values in out.items():
                values[start : start + pair.shape[0]] = class_score(logits, targets[img], s)
    return {s: values.view(b, n_steps) for s, values in out.items()}


def auc(curve: PerturbationCurve) -> Float[Tensor, " batch"]:
    """Area under the curve by the trapezoid rule over the fractions."""
    return torch.trapezoid(curve.scores, x=curve.fractions, dim=-1)


# ---------------------------------------------------------------------------------------------- metrics
class PerturbationMetric(CurveMetric):
    """Shared machinery of the faithfulness metrics (see the module docstring).

    Args:
        level: "patch" (one patch-grid cell per step) or "pixel" (chunks of pixels of the upsampled map).
        substrate: what deleted units become / inserted images start from; the default is the paper's.
        score: "prob", "logit" or "accuracy"; the default is the paper's.
        patch_size: the model's patch size (default `model.cfg.patch_size`); fixes the grid.
        interpolation: how maps are resized ("bilinear" or "nearest"), see `caap.metrics.base`.
        batch_size: images per model call.
        progress: show a tqdm bar (default: when a call makes >= 20 model calls).
        mean, std: the input normalisation for the "black" / "uniform" substrates (default
            `model.data_config`).
        blur_kernel, blur_sigma: the "blur" substrate's Gaussian.
        seed: the "uniform" substrate's noise.
    """

    mode: ClassVar[Mode] = "delete"
    order: ClassVar[Order] = "most"
    default_substrate: ClassVar[str] = "zero"
    default_score: ClassVar[Score] = "prob"

    def __init__(
        self,
        *,
        level: Level = "patch",
        substrate: Substrate | None = None,
        score: Score | None = None,
        patch_size: int | tuple[int, int] | None = None,
        interpolation: Interpolation = "bilinear",
        batch_size: int = 64,
        progress: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        seed: int = 0,
    ) -> None:
        if level not in ("patch", "pixel"):
            raise ValueError(f"level must be 'patch' or 'pixel', got {level!r}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        score = score if score is not None else self.default_score
        check_score(score, PERTURBATION_SCORES)
        self.level = level
        self.substrate = substrate if substrate is not None else self.default_substrate
        self.score = score
        self.patch_size = patch_size
        self.interpolation = interpolation
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.progress = progress
        self.mean = mean
        self.std = std
        self.blur_kernel = blur_kernel
        self.blur_sigma = blur_sigma
        self.seed = seed

    # what the subclasses define: which counts to evaluate, and how a curve becomes one number
    def steps(self, n_units: int, n_cells: int) -> tuple[Int[Tensor, " steps"], Float[Tensor, " steps"]]:
        """(counts, fractions): how many of the `n_units` units are changed at each step of the curve
        (`n_cells`: the patch-grid cells), and the share of units each count is."""
        raise NotImplementedError

    def finish_curve(self, curve: PerturbationCurve) -> PerturbationCurve:
        """The measured curve -> the curve the metric summarises (e.g. a fixed end point appended)."""
        return curve

    def reduce(self, curve: PerturbationCurve) -> Float[Tensor, " batch"]:
        """The finished curve -> one value per image."""
        return auc(curve)

    def substrate_key(self) -> Any:
        """Equal for metrics whose substrates are the same images (a tensor or callable substrate is
        never shared)."""
        if not isinstance(self.substrate, str):
            return id(self)
        return (self.substrate, self.blur_kernel, self.blur_sigma, self.seed, repr(self.mean), repr(self.std))

    def make_substrate(self, model: Model, pixels: Float[Tensor, "batch chan H W"]) -> Float[Tensor, "batch chan H W"]:
        """This metric's substrate image for each input."""
        return make_substrate(
            pixels, self.substrate, model, self.mean, self.std, self.blur_kernel, self.blur_sigma, self.seed
        )

    def curve(
        self,
        model: Model,
        pixels: Float[Tensor, "batch chan H W"],
        maps: Float[Tensor, "batch h w"],
        targets: Target = None,
    ) -> PerturbationCurve:
        """The perturbation curve behind the metric (for plots): fractions and per-image scores, on the CPU."""
        pixels, maps, _ = self.prepare(model, pixels, maps)
        size = (pixels.shape[-2], pixels.shape[-1])
        patch = resolve_patch_size(model, self.patch_size)
        gh, gw = grid_for(size, patch)
        targets = resolve_targets(model, pixels, targets, self.batch_size)
        ranks, n_units = unit_ranks(maps, size, patch, self.level, self.order, self.interpolation)
        counts, fractions = self.steps(n_units, gh * gw)
        scores = perturbation_scores(
            model, pixels, self.make_substrate(model, pixels), ranks, counts, targets, self.mode, (self.score,),
            self.batch_size, self.progress, desc=self.name,
        )[self.score]
        return self.finish_curve(PerturbationCurve(fractions.float().cpu(), scores.float().cpu()))


class _AUCMetric(PerturbationMetric):
    """Insertion / deletion (Petsiuk et al. 2018): every unit, `n_steps` steps."""

    def __init__(self, *, n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_steps = None if n_steps is None else check_positive_int(n_steps, "n_steps")

    def steps(self, n_units: int, n_cells: int) -> tuple[Tensor, Tensor]:
        if self.n_steps is None and self.level == "patch":
            counts = torch.arange(n_units + 1)
        else:
            n = min(self.n_steps or n_cells, n_units)
            counts = torch.round(torch.arange(n + 1, dtype=torch.float64) * n_units / n).long()
        return counts, counts.double() / n_units


class Insertion(_AUCMetric):
    """Insertion AUC (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC): start from the substrate (default "blur", as RISE: an 11x11 Gaussian of sigma
    5 px, zero padding, in the normalised input) and reveal the units
    in decreasing relevance; the area under the target's score (default softmax probability) against the
    fraction revealed, trapezoid rule over [0, 1]. Higher is better.

    `n_steps`: at patch level, default one cell per step (given: that many equal steps of cells); at
    pixel level, default as many equal chunks of pixels as there are patches (RISE uses 224 px a step).
    Other arguments: see `PerturbationMetric`.
    """

    name = "insertion"
    higher_is_better = True
    mode = "insert"
    order = "most"
    default_substrate = "blur"


class Deletion(_AUCMetric):
    """Deletion AUC (Petsiuk, Das & Saenko 2018, "RISE", BMVC): remove the units in decreasing
    relevance, replacing them with the substrate (default "zero", the dataset's mean colour, as RISE:
    mid-grey for mean = std = 0.5 models; "black" for unit RGB 0); the area
    under the target's score against the fraction removed. Lower is better. Arguments as `Insertion`.
    """

    name = "deletion"
    higher_is_better = False
    mode = "delete"
    order = "most"
    default_substrate = "zero"


class _AOPCMetric(PerturbationMetric):
    """AOPC = 1/(K+1) sum_{k=0..K} (f(x^(0)) - f(x^(k))), x^(k) = the image with its first k regions
    removed (Samek et al. 2017). A region is a patch-grid cell (patch level) or a patch-sized chunk of
    pixels (pixel level); K = `n_steps` (default 100, Samek et al.'s L), capped at the number of regions."""

    def __init__(self, *, n_steps: int = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_steps = check_positive_int(n_steps, "n_steps")

    def steps(self, n_units: int, n_cells: int) -> tuple[Tensor, Tensor]:
        k = min(self.n_steps, n_cells)
        counts = torch.round(torch.arange(k + 1, dtype=torch.float64) * n_units / n_cells).long()
        return counts, counts.double() / n_units

    def reduce(self, curve: PerturbationCurve) -> Tensor:
        return (curve.scores[:, :1] - curve.scores).mean(dim=1)


class MoRF(_AOPCMetric):
    """AOPC with the Most Relevant regions removed First (Samek, Binder, Montavon, Lapuschkin & Müller
    2017, "Evaluating the Visualization of What a Deep Neural Network Has Learned", IEEE TNNLS): the
    average drop of the target's score (default softmax probability) over K steps. Higher is better.

    Samek et al. replace regions with uniform noise (`substrate="uniform"`); the default here is "zero"
    (the mean colour), deterministic and free of the normalisation. See `PerturbationMetric` for the rest.
    """

    name = "morf"
    higher_is_better = True
    order = "most"


class LeRF(_AOPCMetric):
    """AOPC with the Least Relevant regions removed First (the LeRF curve of Samek et al. 2017, IEEE
    TNNLS): a faithful map removes what does not matter first, so the score barely drops. Lower is
    better. Arguments as `MoRF`."""

    name = "lerf"
    higher_is_better = False
    order = "least"


class _CheferMetric(PerturbationMetric):
    """Chefer, Gur & Wolf 2021 ("Transformer Interpretability Beyond Attention Visualization", CVPR),
    perturbation tests, following their code (github.com/hila-chefer/Transformer-Explainability):
    mask 10%, 20%, ..., 90% of the units (count = floor(fraction * n_units)) and record top-1 accuracy
    w.r.t. the target (`score="accuracy"`, the default; "prob" is available). The curve gets the
    unperturbed point at 0 and, by their convention, the value `final_value` (0) at 100%; AUC by the
    trapezoid rule over [0, 1] (their script sums (y_i + y_{i+1}) / 2 * 0.1 over the 11 points).
    `final_value=None` evaluates the fully masked image instead.

    Their code zeroes raw [0, 1] pixels (black, `substrate="black"`, the default here; it needs the
    normalisation from `mean`/`std` or `model.data_config`) and ranks the pixels of the 14x14 map
    bilinearly upsampled to 224x224 (`level="pixel"`); the default here masks whole patches
    (`level="patch"`). With `targets=None` (the predicted class) the curve starts at 1, as their
    "original prediction" variant.
    """

    default_substrate = "black"
    default_score = "accuracy"

    def __init__(
        self,
        *,
        fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        final_value: float | None = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        fr = [float(f) for f in fractions]
        if any(not 0 < f < 1 for f in fr) or fr != sorted(set(fr)):
            raise ValueError(f"fractions must be increasing values strictly between 0 and 1, got {fr}")
        self.fractions = tuple(fr)
        self.final_value = final_value

    def steps(self, n_units: int, n_cells: int) -> tuple[Tensor, Tensor]:
        fr = [0.0, *self.fractions] + ([1.0] if self.final_value is None else [])
        f = torch.tensor(fr, dtype=torch.float64)
        counts = torch.floor(f * n_units + 1e-9).long()
        return counts, f

    def finish_curve(self, curve: PerturbationCurve) -> PerturbationCurve:
        if self.final_value is None:
            return curve
        b = curve.scores.shape[0]
        last = torch.full((b, 1), float(self.final_value), dtype=curve.scores.dtype)
        return PerturbationCurve(
            torch.cat([curve.fractions, torch.ones(1, dtype=curve.fractions.dtype)]),
            torch.cat([curve.scores, last], dim=1),
        )


class PositivePerturbation(_CheferMetric):
    """Chefer et al. 2021's positive perturbation test (CVPR): mask the most relevant units first; a
    faithful map makes accuracy fall fast. AUC, lower is better. See `_CheferMetric` for the details."""

    name = "positive_perturbation"
    higher_is_better = False
    order = "most"


class NegativePerturbation(_CheferMetric):
    """Chefer et al. 2021's negative perturbation test (CVPR): mask the least relevant units first; a
    faithful map keeps the accuracy up. AUC, higher is better. See `_CheferMetric` for the details."""

    name = "negative_perturbation"
    higher_is_better = True
    order = "least"
