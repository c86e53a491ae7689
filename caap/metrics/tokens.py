"""Token deletion and token insertion: faithfulness curves with no fill-in image at all.

A ViT reads a sequence of tokens and takes sequences of any length, so a patch can be removed from the
input itself instead of being painted over with a substitute ("zero", a blurred copy, noise): the model
runs on its prefix tokens (class, registers, distillation) and only the kept patch tokens, each with its
own position embedding (`HookedViT.forward_patches(pixels, keep)`). The metric then shares no
intervention with any method that fills patches in (CAAP's blur context, occlusion, RISE, ...), which is
what a reviewer asks of a faithfulness metric in 2026 (cf. the input sampling of Englebert et al. 2023,
"Transformer Input Sampling", which drops tokens the same way).

===================  ==============================================  =======  ======
metric               kept tokens at step s (count c_s)               summary  better
===================  ==============================================  =======  ======
`TokenDeletion`      all but the c_s most relevant patches            AUC      lower
`TokenInsertion`     only the c_s most relevant patches               AUC      higher
===================  ==============================================  =======  ======

The map is area-pooled onto the model's patch grid (any resolution; `caap.metrics.base.pool_maps_to_grid`),
the patches are ranked by it (ties in raster order), and the target's score (default softmax probability;
"logit" and "accuracy" too) is read at `n_steps + 1` equal counts from 0 to all patches; the AUC is the
trapezoid rule over the fraction of patches removed (inserted), [0, 1]. The curve's ends: with every
patch kept the run is the model's own forward pass on the image; with none, the prefix tokens alone
(for a class-token ViT, an image-independent output). A model that pools the patch tokens only (global
average pooling without prefix tokens) has no output on the empty sequence: token insertion's first
point and token deletion's last are then undefined and raise.

Substrate: none. Departures from the pixel-space insertion/deletion of Petsiuk et al. (2018, "RISE") are
only the removal itself; the ranking, the steps and the AUC are the same as `caap.metrics.Insertion` /
`Deletion` at patch level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

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
    pool_maps_to_grid,
    resolve_patch_size,
)
from caap.metrics.faithfulness import PERTURBATION_SCORES, Mode, Order, auc
from caap.targets import Score, Target, check_classes, check_score, class_score, resolve_targets
from hooked_vit.checks import check_positive_int

#: show a progress bar when a curve takes at least this many model calls (unless `progress` says otherwise)
PROGRESS_MIN_CALLS = 20


def check_token_model(model: Any) -> None:
    """A clear error for a model that cannot drop tokens."""
    if not callable(getattr(model, "forward_patches", None)):
        raise ValueError(
            f"token deletion / insertion drop patch tokens from the input sequence and need a model with "
            f"forward_patches(pixels, keep) (a hooked_vit.HookedViT); got {type(model).__name__}"
        )


def cell_order(
    maps: Float[Tensor, "batch h w"], grid: tuple[int, int], size: tuple[int, int], order: Order,
    interpolation: Interpolation = "bilinear",
) -> Int[Tensor, "batch n"]:
    """perm[b, r] = the patch (row-major index) of rank r: the most (order "most") or least relevant first;
    ties in raster order."""
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf values")
    if order not in ("most", "least"):
        raise ValueError(f"order must be 'most' or 'least', got {order!r}")
    cells = pool_maps_to_grid(maps, grid, size, interpolation).reshape(maps.shape[0], -1)
    return torch.sort(-cells if order == "most" else cells, dim=1, stable=True).indices


def kept_tokens(perm: Int[Tensor, "batch n"], count: int, mode: Mode) -> Int[Tensor, "batch k"]:
    """The patches kept with `count` patches changed: "delete" drops the first `count` of the order,
    "insert" keeps only them; sorted into raster order."""
    kept = perm[:, count:] if mode == "delete" else perm[:, :count]
    return kept.sort(dim=1).values


def kept_count(n: int, count: int, mode: Mode) -> int:
    """How many of `n` patch tokens are kept with `count` changed."""
    return n - count if mode == "delete" else count


def token_scores(
    model: Model,
    pixels: Float[Tensor, "batch chan H W"],
    perm: Int[Tensor, "batch n"],
    counts: Sequence[int],
    targets: Int[Tensor, " batch"],
    mode: Mode = "delete",
    scores: Sequence[Score] = ("prob",),
    batch_size: int = 64,
    known: Mapping[int, Float[Tensor, "batch n_classes"]] | None = None,
    progress: bool | None = None,
    desc: str = "tokens",
) -> dict[str, Float[Tensor, "batch steps"]]:
    """{score: values [batch, len(counts)]}: the target's score with `counts[s]` patches changed (see
    `kept_tokens`), for every score in `scores`, read off the same forward passes.

    `known`: logits already computed for some counts (e.g. the clean run, every patch kept), not run
    again. The model runs `forward_patches` under `torch.inference_mode()`; a call holds at most
    `batch_size` full-length images' worth of tokens (more rows when fewer tokens are kept)."""
    if mode not in ("insert", "delete"):
        raise ValueError(f"mode must be 'insert' or 'delete', got {mode!r}")
    batch_size = check_positive_int(batch_size, "batch_size")
    check_token_model(model)
    known = known or {}
    b, n = perm.shape
    prefix = int(getattr(getattr(model, "cfg", None), "n_prefix_tokens", 1))
    budget = batch_size * (n + prefix)
    out = {s: torch.empty(b, len(counts), device=pixels.device) for s in scores}
    jobs = []  # (column, count, first image, last image)
    for col, c in enumerate(counts):
        if int(c) in known:
            for s in scores:
                out[s][:, col] = class_score(known[int(c)].to(pixels.device), targets, s)
            continue
        n_kept = kept_count(n, int(c), mode)
        rows = max(1, budget // (n_kept + prefix))
        jobs += [(col, int(c), i, min(i + rows, b)) for i in range(0, b, rows)]
    show = progress if progress is not None else len(jobs) >= PROGRESS_MIN_CALLS
    checked = False
    with torch.inference_mode():
        for col, c, i, j in tqdm(jobs, desc=desc, leave=False, disable=not show):
            logits = model.forward_patches(pixels[i:j], kept_tokens(perm[i:j], c, mode))
            if not torch.isfinite(logits).all():
                raise ValueError(_EMPTY_HELP if kept_count(n, c, mode) == 0 else
                                 f"the model gave non-finite logits with {kept_count(n, c, mode)} patch tokens kept")
            if not checked:
                check_classes(targets, logits.shape[-1])
                checked = True
            for s, values in out.items():
                values[i:j, col] = class_score(logits, targets[i:j], s)
    return out


@torch.inference_mode()
def prefix_only_logits(model: Model, pixels: Float[Tensor, "batch chan H W"], batch_size: int = 64
                       ) -> Float[Tensor, "batch n_classes"]:
    """The logits of the prefix tokens alone (no patch token kept), per image: the end of the curves
    where every patch is dropped."""
    check_token_model(model)
    batch_size = check_positive_int(batch_size, "batch_size")
    b = pixels.shape[0]
    empty = torch.zeros(b, 0, dtype=torch.long, device=pixels.device)
    rows = max(1, batch_size * 8)
    logits = torch.cat([model.forward_patches(pixels[i : i + rows], empty[i : i + rows]) for i in range(0, b, rows)])
    if not torch.isfinite(logits).all():
        raise ValueError(_EMPTY_HELP)
    return logits


_EMPTY_HELP = ("the model gave non-finite logits with no patch token kept: a model that pools only the patch "
               "tokens (average pooling without prefix tokens) has no output on an empty sequence, so token "
               "insertion's first point and token deletion's last are undefined for it")


class TokenPerturbationMetric(CurveMetric):
    """Token deletion / insertion (see the module docstring).

    Args:
        n_steps: equal steps of patches from none to all (default: one patch a step, as many steps as
            the grid has patches). Between 1 and the number of patches; a count that does not divide the
            patches gives steps of rounded sizes (e.g. 8 steps of 196 patches: 24 or 25 patches each).
        score: "prob" (default), "logit" or "accuracy".
        patch_size: the model's patch size (default `model.cfg.patch_size`); fixes the grid.
        interpolation: how coarser maps are upsampled before pooling ("bilinear" or "nearest").
        batch_size: full-length images' worth of tokens per model call.
        progress: show a tqdm bar (default: when a call makes >= 20 model calls).
    """

    mode: ClassVar[Mode] = "delete"
    order: ClassVar[Order] = "most"

    def __init__(
        self,
        *,
        n_steps: int | None = None,
        score: Score = "prob",
        patch_size: int | tuple[int, int] | None = None,
        interpolation: Interpolation = "bilinear",
        batch_size: int = 64,
        progress: bool | None = None,
    ) -> None:
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        check_score(score, PERTURBATION_SCORES)
        self.n_steps = None if n_steps is None else check_positive_int(n_steps, "n_steps")  # None: a patch a step
        self.score = score
        self.patch_size = patch_size
        self.interpolation = interpolation
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.progress = progress

    def steps(self, n_cells: int) -> tuple[Int[Tensor, " steps"], Float[Tensor, " steps"]]:
        """(counts, fractions): patches changed at each point of the curve, and their share."""
        k = n_cells if self.n_steps is None else self.n_steps
        if k > n_cells:
            raise ValueError(
                f"n_steps={k} is more than the {n_cells} patches of the grid (a step changes at least one patch); "
                f"accepted: 1..{n_cells}, equal steps at the divisors "
                f"{', '.join(str(d) for d in range(1, n_cells + 1) if n_cells % d == 0)}"
            )
        counts = torch.round(torch.arange(k + 1, dtype=torch.float64) * n_cells / k).long()
        return counts, counts.double() / n_cells

    def reduce(self, curve: PerturbationCurve) -> Float[Tensor, " batch"]:
        return auc(curve)

    def curve(
        self,
        model: Model,
        pixels: Float[Tensor, "batch chan H W"],
        maps: Float[Tensor, "batch h w"],
        targets: Target = None,
        clean_logits: Float[Tensor, "batch n_classes"] | None = None,
    ) -> PerturbationCurve:
        """The curve behind the metric: fractions and per-image scores, on the CPU. `clean_logits`: the
        unperturbed logits, if known (they are the curve's every-patch-kept end)."""
        pixels, maps, _ = self.prepare(model, pixels, maps)
        check_token_model(model)
        size = (pixels.shape[-2], pixels.shape[-1])
        grid = grid_for(size, resolve_patch_size(model, self.patch_size))
        n = grid[0] * grid[1]
        targets = resolve_targets(model, pixels, targets, self.batch_size, logits=clean_logits)
        perm = cell_order(maps, grid, size, self.order, self.interpolation)
        counts, fractions = self.steps(n)
        known = {} if clean_logits is None else {0 if self.mode == "delete" else n: clean_logits}
        scores = token_scores(
            model, pixels, perm, counts.tolist(), targets, self.mode, (self.score,), self.batch_size, known,
            self.progress, desc=self.name,
        )[self.score]
        return PerturbationCurve(fractions.float().cpu(), scores.float().cpu())

    def group_key(self) -> Any:
        """Equal for token metrics that run the same sequences (`caap.metrics.Evaluator` shares them)."""
        return (type(self).mode, type(self).order, self.interpolation, repr(self.patch_size))


class TokenDeletion(TokenPerturbationMetric):
    """Token deletion AUC: drop the patch tokens from the input sequence in decreasing relevance (the
    prefix tokens stay; no fill-in image) and integrate the target's score (default softmax probability)
    over the fraction dropped, trapezoid rule over [0, 1]. Lower is better. The ranking, steps and AUC of
    Petsiuk et al. 2018's deletion ("RISE", BMVC) at patch level; the removal is the ViT's own (see the
    module docstring). Arguments: see `TokenPerturbationMetric`."""

    name = "token_deletion"
    higher_is_better = False
    mode = "delete"
    order = "most"


class TokenInsertion(TokenPerturbationMetric):
    """Token insertion AUC: start from the prefix tokens alone and add the patch tokens in decreasing
    relevance (each with its own position embedding; no substrate image), integrating the target's score
    (default softmax probability) over the fraction added, trapezoid rule over [0, 1]. Higher is better.
    Petsiuk et al. 2018's insertion ("RISE", BMVC) with the ViT's own removal. Arguments: see
    `TokenPerturbationMetric`."""

    name = "token_insertion"
    higher_is_better = True
    mode = "insert"
    order = "most"
