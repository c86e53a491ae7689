"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci 2022, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods", ICML), without retraining.

Removing pixels by painting them a constant colour leaks the shape of the removed set to the model (the
mask itself is evidence for a class), so MoRF and LeRF disagree with each other. ROAD fills each removed
pixel with a *noisy linear imputation*: the weighted mean of its 8 neighbours (weight 1/6 for the four
sharing an edge, 1/12 for the four diagonal ones, renormalised over the neighbours inside the image),
where neighbours that are themselves removed are unknowns too, so all removed pixels of an image are one
sparse linear system, solved exactly; Gaussian noise (std 0.01 in unit RGB) is then added to the imputed
pixels. The model then reads the imputed image; no retraining.

==========  ===============================================  =========================  ======
metric      removed at fraction p                             summary                    better
==========  ===============================================  =========================  ======
`ROADMoRF`  the share p of pixels with the highest map value  mean score over the ps     lower
`ROADLeRF`  the share p of pixels with the lowest map value   mean score over the ps     higher
==========  ===============================================  =========================  ======

Fractions p = 0.1, 0.2, ..., 0.9 (the paper's; `fractions=` to change); score: the softmax probability
of the target (default; "logit", "accuracy" too). The map is upsampled to the input size (bilinear,
align_corners=False; `interpolation="nearest"` as the alternative) and its pixels ranked.

Written from the paper; the authors' code (github.com/tleemann/road_evaluation, `road/imputations.py`,
`road/imputed_dataset.py`) was read for the constants. Where this implementation departs from it:
- the imputation runs in unit RGB (the model's pixels un-normalised with `model.data_config` or
  `mean`/`std`, then normalised back), as the authors do by imputing before their normalising
  transform; imputed values are not clipped to [0, 1] (neither are theirs);
- ties between pixels are broken in raster order (the other metrics' rule) instead of their
  per-dataset random jitter of 1e-4 on the min-max normalised map;
- LeRF at fraction p removes the p least relevant pixels (their `remove=False` keeps the p most relevant
  ones, i.e. removes 1 - p; the curve is the same read backwards);
- the noise is seeded (`seed`): one noise field per fraction, the same for every image, so a value does
  not depend on which images share a batch;
- one number per image: the mean of the score over the fractions (the paper plots the curves; the mean
  is the trapezoid-free area under them, as common implementations report it);
- the system is solved with SciPy's sparse LU (`scipy.sparse.linalg.splu`) in float64, all channels
  with one factorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from caap.metrics.base import (
    CurveMetric,
    Interpolation,
    Model,
    PerturbationCurve,
    normalisation,
    upsample_maps,
)
from caap.metrics.faithfulness import PERTURBATION_SCORES, Order, _rank
from caap.targets import Score, Target, check_classes, check_score, class_score, resolve_targets
from hooked_vit.checks import check_positive_int
from hooked_vit.preprocess import normalize, unnormalize

#: (row offset, column offset, weight) of the neighbours in the imputation (Rong et al. 2022)
NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
    (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12),
)
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_NOISE = 0.01


def linear_imputation(image: Float[Tensor, "chan H W"], removed: Bool[Tensor, "H W"]) -> Float[Tensor, "chan H W"]:
    """`image` with every removed pixel replaced by the weighted mean of its in-image neighbours
    (`NEIGHBOURS`, weights renormalised over those inside the image), removed neighbours being unknowns
    of the same sparse linear system; no noise. Known pixels are unchanged. At least one pixel must be
    kept."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    c, h, w = image.shape
    removed = removed.to(torch.bool).cpu()
    if removed.shape != (h, w):
        raise ValueError(f"removed must be [H={h}, W={w}], got {tuple(removed.shape)}")
    flat_removed = removed.flatten().numpy()
    idx = np.flatnonzero(flat_removed)
    m = idx.size
    if m == 0:
        return image.clone()
    if m == h * w:
        raise ValueError("every pixel is removed: the imputation needs at least one kept pixel")
    values = image.detach().cpu().double().reshape(c, h * w).numpy()
    var = np.full(h * w, -1, dtype=np.int64)
    var[idx] = np.arange(m)
    r, col = idx // w, idx % w
    diag = np.zeros(m)
    rhs = np.zeros((m, c))
    rows, cols, vals = [np.arange(m)], [np.arange(m)], [None]
    for dr, dc, wt in NEIGHBOURS:
        rr, cc = r + dr, col + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        diag[inside] += wt
        nb = rr[inside] * w + cc[inside]
        eq = np.flatnonzero(inside)
        unknown = flat_removed[nb]
        rows.append(eq[unknown])
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        np.add.at(rhs, eq[~unknown], wt * values[:, nb[~unknown]].T)
    vals[0] = diag
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m)).tocsc()
    solution = splu(a).solve(rhs)  # [m, c]
    out = values.copy()
    out[:, idx] = solution.T
    return torch.from_numpy(out).reshape(c, h, w).to(image.dtype).to(image.device)


def noise_field(shape: Sequence[int], seed: int, step: int) -> Float[Tensor, "chan H W"]:
    """The standard-normal noise of one fraction (`step`): the same for every image."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return torch.randn(tuple(shape), generator=gen)


class ROADMetric(CurveMetric):
    """ROAD without retraining (see the module docstring).

    Args:
        fractions: the shares of pixels removed (strictly between 0 and 1, increasing); default the
            paper's 0.1, ..., 0.9.
        noise: std of the Gaussian noise added to imputed pixels, in unit RGB (default 0.01, the paper's).
        score: "prob" (default), "logit" or "accuracy".
        interpolation: how maps are upsampled to the input ("bilinear" or "nearest").
        batch_size: imputed images per model call.
        progress: show a tqdm bar (default: for at least 20 imputations).
        mean, std: the input normalisation (default `model.data_config`).
        seed: the noise.
    """

    order: ClassVar[Order] = "most"

    def __init__(
        self,
        *,
        fractions: Sequence[float] = ROAD_FRACTIONS,
        noise: float = ROAD_NOISE,
        score: Score = "prob",
        interpolation: Interpolation = "bilinear",
        batch_size: int = 64,
        progress: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        fr = [float(f) for f in fractions]
        if not fr or any(not 0 < f < 1 for f in fr) or fr != sorted(set(fr)):
            raise ValueError(f"fractions must be increasing values strictly between 0 and 1, got {fr}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        check_score(score, PERTURBATION_SCORES)
        self.fractions = tuple(fr)
        self.noise = float(noise)
        self.score = score
        self.interpolation = interpolation
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.progress = progress
        self.mean = mean
        self.std = std
        self.seed = int(seed)

    def impute(
        self, unit: Float[Tensor, "chan H W"], removed: Bool[Tensor, "H W"], step: int
    ) -> Float[Tensor, "chan H W"]:
        """One image in unit RGB with its removed pixels imputed, plus this fraction's noise."""
        out = linear_imputation(unit, removed)
        if self.noise > 0:
            noise = noise_field(unit.shape, self.seed, step).to(out.device, out.dtype)
            out = torch.where(removed.to(out.device)[None], out + self.noise * noise, out)
        return out

    def curve(
        self,
        model: Model,
        pixels: Float[Tensor, "batch chan H W"],
        maps: Float[Tensor, "batch h w"],
        targets: Target = None,
    ) -> PerturbationCurve:
        """Fractions and per-image scores [batch, len(fractions)], on the CPU."""
        pixels, maps, device = self.prepare(model, pixels, maps)
        b, _, h, w = pixels.shape
        if not torch.isfinite(maps).all():
            raise ValueError("maps contain NaN or inf values")
        norm = normalisation(model, self.mean, self.std, "ROAD imputation (unit RGB)")
        targets = resolve_targets(model, pixels, targets, self.batch_size)
        ranks = _rank(upsample_maps(maps, (h, w), self.interpolation).reshape(b, h * w), self.order).view(b, h, w)
        unit = unnormalize(pixels, norm).cpu()
        counts = [int(f * h * w) for f in self.fractions]
        pairs = [(i, s) for i in range(b) for s in range(len(counts))]
        scores = torch.empty(b, len(counts))
        show = self.progress if self.progress is not None else len(pairs) >= 20
        bar = tqdm(total=len(pairs), desc=self.name, leave=False, disable=not show)
        checked = False
        for start in range(0, len(pairs), self.batch_size):
            part = pairs[start : start + self.batch_size]
            batch = torch.stack([
                self.impute(unit[i], (ranks[i] < counts[s]).cpu(), s) for i, s in part
            ])
            with torch.inference_mode():
                logits = model(normalize(batch, norm).to(device=device, dtype=pixels.dtype))
            if not checked:
                check_classes(targets, logits.shape[-1])
                checked = True
            img = torch.tensor([i for i, _ in part], device=device)
            values = class_score(logits, targets[img], self.score).float().cpu()
            for (i, s), v in zip(part, values.tolist()):
                scores[i, s] = v
            bar.update(len(part))
        bar.close()
        return PerturbationCurve(torch.tensor(self.fractions, dtype=torch.float32), scores)

    def reduce(self, curve: PerturbationCurve) -> Float[Tensor, " batch"]:
        """The mean score over the fractions."""
        return curve.scores.mean(dim=1)


class ROADMoRF(ROADMetric):
    """ROAD, Most Relevant First (Rong et al. 2022, ICML): remove the share p of pixels with the highest
    map values, impute them (noisy linear imputation), read the target's score; the mean over p = 0.1..0.9.
    A faithful map makes the score fall fast: lower is better. See the module docstring."""

    name = "road_morf"
    higher_is_better = False
    order = "most"


class ROADLeRF(ROADMetric):
    """ROAD, Least Relevant First (Rong et al. 2022, ICML): remove the share p of pixels with the lowest
    map values; a faithful map keeps the score up: higher is better. See the module docstring."""

    name = "road_lerf"
    higher_is_better = True
    order = "least"
