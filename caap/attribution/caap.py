"""CAAP: Causal Attribution via Activation Patching (arXiv 2603.13652).

"For each patch, CAAP inserts the corresponding source-image activations into a neutral target context
over an intermediate range of layers and uses the resulting target-class score as the attribution
signal."

Here, for patch i: the run starts in the neutral context at block `start`; at every block from `start`
to `end` inclusive, the component carried (default: the residual stream entering the block) at patch
i's token is overwritten with the source image's value; after `end` the token evolves freely. The
target-class score of that run is patch i's attribution. One batch row per patch, all rows of all
images packed into batches by the patching engine, every row starting at block `start` from the
context's residual stream (computed once).

Choices the paper leaves open are parameters (see the documentation's CAAP page for how the defaults
were measured on the `dev` split): the neutral context, the layer range, the component and the score.

Beyond the paper, two options of the same class, both on the same engine:

- `direction`: "sufficiency" (the paper: patch i inserted into the neutral context), "necessity" (patch
  i's activations in the source's own run replaced by the context's over the same blocks; the value is
  the score lost), or "both" (their sum).
- `sets=N`: instead of one patch per run, N runs each carrying a random set of patches (each patch in
  the same number of sets, `density` of them; `caap.attribution.sets`), turned into one value per patch by
  an `estimator`: the conditional-mean difference or a least-squares fit. A patch's value then reflects
  what it adds alongside others, not only alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.attribution.sets import ESTIMATORS, Estimator, estimate, sample_sets, set_size
from caap.contexts import NeutralContext, get_context
from caap.patching.engine import (
    Context,
    InputContext,
    Intervention,
    ResidContext,
    Write,
    run_interventions,
    unpatched_scores,
)
from caap.targets import Score, Target, check_score, class_score, resolve_targets
from hooked_vit import HookedViT, act_name
from hooked_vit.checks import check_layer_range, check_positive_int
from hooked_vit.precision import choose_precision, delta_bf16
from hooked_vit.preprocess import check_pixels

Component = Literal["resid_pre", "attn_out", "mlp_out"]
CAAP_COMPONENTS: tuple[str, ...] = get_args(Component)
"""What the patch token may carry from the source (hook names: `hooked_vit.act_name`)."""
CAAP_SCORES = ("logit_diff", "logit", "prob")
"""The scores (`caap.targets.Score`) CAAP may read off each patched run."""
Direction = Literal["sufficiency", "necessity", "both"]
DIRECTIONS: tuple[str, ...] = get_args(Direction)
"""Which way CAAP intervenes: insert the source's patch into the context (the paper), remove it from the
source's run, or both (the sum of the two maps)."""
DEFAULT_DENSITY = 0.5
"""Set sampling's default share of sets that hold each patch."""
Precision = Literal["fp32", "bf16", "bf16_delta"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
"""How the patched runs compute (README, "bf16"): fp32; bf16 under autocast; bf16 products relative to the
unpatched context run (`hooked_vit.precision.delta_bf16`)."""

DEFAULT_CONTEXT = "blur"
"""Default neutral context: a blurred copy of the source. Chosen on the `dev` split (README, "CAAP
defaults"; experiments/caap_defaults.py): tied with grey on the pointing game, best on box energy."""

DEFAULT_LAYER_FRACTIONS = (2 / 3, 1)
"""Default layer range as fractions of the depth: blocks [round(a n), round(b n) - 1], e.g. blocks 8..11
of 12 (the "late" range). Chosen on the `dev` split: late > mid > early with the mean context."""


def default_layers(n_layers: int) -> tuple[int, int]:
    """The default layer range for a model of this depth (inclusive, 0-indexed blocks)."""
    a, b = DEFAULT_LAYER_FRACTIONS
    start = min(n_layers - 1, round(a * n_layers))
    end = max(start, round(b * n_layers) - 1)
    return start, end


class CAAP(AttributionMethod):
    """Causal Attribution via Activation Patching.

    Args:
        model: a HookedViT.
        layers: (start, end), inclusive 0-indexed blocks; default `default_layers(n_layers)`.
        context: "mean", "grey", "black", "blur", "noise", "zero", an image, a pixel tensor
            [1, 3, H, W], or a `NeutralContext`.
        component: what the patch token carries from the source: "resid_pre" (residual stream entering
            each block), "attn_out" or "mlp_out" (that block's attention / MLP output).
        score: "logit_diff" (default: the target logit minus the unpatched context's target logit),
            "logit" (the target logit itself) or "prob" (softmax probability). "logit_diff" is the
            paper's target-class score shifted by one constant per image, so every ranking-based
            metric is unchanged; the shift gives the sign a meaning (positive = the patch adds
            evidence), which metrics on positive mass (box energy) need.
        batch_size: rows (patched runs) per forward pass; None: the engine's `default_batch_size`
            (64 on a GPU, about 1600 tokens on a CPU).
        reference: reference images for the "mean" context (default: the shared ImageNet sample).
        precision: "fp32" (default); "bf16": the runs under `torch.autocast` with bfloat16, so the
            matrix products run in bf16 while the residual stream, LayerNorm, the head and the score stay
            in fp32 (`HookedViT.head_forward` leaves autocast for the head): the fastest, but the maps
            agree with fp32 only to a Spearman of about 0.98, because a patch's effect is a small
            difference of large activations; "bf16_delta": each image's patched runs compute every linear
            layer as its value in the unpatched run they patch (fp32) plus a bf16 product of the
            difference (`hooked_vit.precision.delta_bf16`), so the rounding scales with the patch's effect:
            maps within a Spearman of 0.9999 of fp32, less of a speed-up. Both need native bf16 matrix
            products (`hooked_vit.precision.bf16_support`); without them CAAP runs fp32 and warns
            (`self.precision` says which runs).
        direction: "sufficiency" (default, the paper): a patch's value is the score of the neutral context
            with the patch's source activations inserted (over `layers`, `component`); "necessity": the
            score the source's own run loses when the patch's activations there are replaced by the
            context's over the same blocks (for the "resid_pre" component the context's residual stream at
            each block; for "attn_out" / "mlp_out" the context's run from block `start`), i.e. unpatched
            source score minus patched score, in the units of `score` ("logit_diff" counts as "logit":
            the difference is already one); "both": the sum of the two maps, in the score's units. For a
            score that is additive over the patches both directions give the same map, and "both" twice it.
        sets: None (default, the paper): one patched run per patch, that patch alone. An integer N >= 2:
            N runs per image (per direction), each carrying a random set of patches
            (`caap.attribution.sets.sample_sets`: each patch in round(density * N) of them), and a value per
            patch from the N scores by `estimator`. In the necessity direction the set is what is removed
            and the estimator reads which patches still carry the source. The same sets for every image
            (a function of `seed` and the grid), so an image's map does not depend on its batch.
        density: with `sets`: the share of sets holding each patch, in (0, 1) (default 0.5).
        estimator: with `sets`: "difference" (default; E[score | patch carried] - E[score | not]) or
            "regression" (least-squares additive fit); see `caap.attribution.sets`.
        seed: with `sets`: the seed of the sampled sets.
        allow_slow_bf16: run a bf16 precision even where bf16 products are not native (slower than fp32).

    `attribute(pixels, target)` -> [batch, grid_h, grid_w], one target class per image, as every method;
    `attribute_classes(pixels, classes)` with classes [batch, k] -> [batch, k, grid_h, grid_w], at the
    cost of one map. `forward_passes(n_patches)` is the cost per image in forward-pass equivalents.
    """

    name = "caap"
    summary = "each patch's source activation patched into a neutral context over a layer range; the target score is its attribution"
    paper = "CAAP, Causal Attribution via Activation Patching (arXiv 2603.13652)"
    resolution = "patch"

    def __init__(
        self,
        model: HookedViT,
        layers: tuple[int, int] | None = None,
        context: str | NeutralContext | Any = DEFAULT_CONTEXT,
        component: Component = "resid_pre",
        score: Score = "logit_diff",
        batch_size: int | None = None,
        reference: Any = None,
        progress: bool = False,
        precision: Precision = "fp32",
        direction: Direction = "sufficiency",
        sets: int | None = None,
        density: float | None = None,
        estimator: Estimator | None = None,
        seed: int = 0,
        allow_slow_bf16: bool = False,
    ) -> None:
        super().__init__(model)
        n = model.cfg.n_layers
        start, end = default_layers(n) if layers is None else check_layer_range(layers, n)
        if component not in CAAP_COMPONENTS:
            raise ValueError(f"unknown component {component!r}; accepted: {', '.join(CAAP_COMPONENTS)}")
        check_score(score, CAAP_SCORES)
        batch_size = None if batch_size is None else check_positive_int(batch_size, "batch_size")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; accepted: {', '.join(DIRECTIONS)}")
        self._check_sets(sets, density, estimator, seed)
        self.layers = (start, end)
        self.context = get_context(context, model, reference=reference)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
        self.component, self.score, self.batch_size, self.progress = component, score, batch_size, progress
        self.precision = choose_precision(precision, next(model.parameters()).device, allow_slow_bf16)
        self.direction, self.sets, self.seed = direction, sets, seed
        self.density = None if sets is None else DEFAULT_DENSITY if density is None else float(density)
        self.estimator = None if sets is None else "difference" if estimator is None else estimator

    @staticmethod
    def _check_sets(sets: Any, density: Any, estimator: Any, seed: Any) -> None:
        if sets is None:
            given = [f"{k}={v!r}" for k, v in (("density", density), ("estimator", estimator)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} needs set sampling (sets=N, N >= 2); with sets=None every run "
                                 f"carries one patch")
            return
        if isinstance(sets, bool) or not isinstance(sets, int) or sets < 2:
            raise ValueError(f"sets must be None (one patch per run) or an integer >= 2, got {sets!r}")
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density < 1:
                raise ValueError(f"density must be a number in (0, 1) (the share of sets holding each patch), got "
                                 f"{density!r}")
            set_size(sets, float(density))
        else:
            set_size(sets, DEFAULT_DENSITY)
        if estimator is not None and estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")

    def __repr__(self) -> str:
        extra = "" if self.direction == "sufficiency" else f", direction={self.direction!r}"
        if self.sets is not None:
            extra += f", sets={self.sets}, density={self.density}, estimator={self.estimator!r}, seed={self.seed}"
        return (
            f"CAAP(layers={self.layers}, context={self.context.name!r}, component={self.component!r}, "
            f"score={self.score!r}, precision={self.precision!r}{extra})"
        )

    def forward_passes(self, n_patches: int) -> float:
        """Cost per image in forward-pass equivalents: the patched runs (each runs the blocks from `start`
        on, so it counts as (n_layers - start) / n_layers of a forward pass), plus the whole runs it needs:
        the source's run, the context's (one per image for an image context; an upper bound for the shared
        ones), and the unpatched runs each direction compares with (from `start`)."""
        n_layers = self.model.cfg.n_layers
        part = (n_layers - self.layers[0]) / n_layers
        directions = 2 if self.direction == "both" else 1
        rows = n_patches if self.sets is None else self.sets
        unpatched = (1 if self.score == "logit_diff" or self.direction != "sufficiency" else 0) * directions
        return directions * rows * part + unpatched * part + 2.0

    def attribute_classes(
        self, pixels: Float[Tensor, "batch chan H W"], classes: Int[Tensor, "batch k"] | Sequence[Sequence[int]]
    ) -> Float[Tensor, "batch k grid_h grid_w"]:
        """Maps for several classes per image, [batch, k, grid_h, grid_w], at the cost of one: every
        patched run is scored for all k classes (`attribute` is the one-class-per-image call)."""
        check_pixels(pixels)
        self.model.grid_size_for(pixels)
        c = torch.as_tensor(classes, device=pixels.device)
        if c.ndim != 2 or c.shape[0] != pixels.shape[0]:
            raise ValueError(f"classes must be [batch={pixels.shape[0]}, k] class indices, got shape {tuple(c.shape)}")
        k = [resolve_targets(self.model, pixels, c[:, j]) for j in range(c.shape[1])]
        return self._maps(pixels, torch.stack(k, 1))

    @torch.inference_mode()
    def context_scores(self, pixels: Float[Tensor, "batch chan H W"], target: Target = None) -> Float[Tensor, " batch"]:
        """The target-class logit of each image's unpatched context run (from block `start`, nothing
        patched): what `score="logit_diff"` subtracts, and how much evidence the context alone carries."""
        check_pixels(pixels)
        k = resolve_targets(self.model, pixels, target).view(-1, 1)
        with self._autocast(pixels):
            return self._context_scores(self.context.bind(self.model, pixels), k)[:, 0]

    def _context_scores(self, context: Any, k: Int[Tensor, "batch k"], score: Score = "logit") -> Float[Tensor, "batch k"]:
        """The target scores of the unpatched runs of `context` (one pass from block `start`)."""
        return unpatched_scores(self.model, context, lambda logits, pair: class_score(logits, k[pair], score),
                                k.shape[0], self.layers[0])

    def _autocast(self, pixels: Tensor) -> torch.autocast:
        return torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.inference_mode()
    def _attribute(self, pixels: Tensor, targets: Int[Tensor, " batch"]) -> Float[Tensor, "batch grid_h grid_w"]:
        return self._maps(pixels, targets[:, None])[:, 0]

    @torch.inference_mode()
    def _maps(self, pixels: Tensor, targets: Int[Tensor, "batch k"]) -> Float[Tensor, "batch k grid_h grid_w"]:
        directions = ("sufficiency", "necessity") if self.direction == "both" else (self.direction,)
        with self._autocast(pixels):
            context = self.context.bind(self.model, pixels)
            maps = [self._direction_maps(d, pixels, targets, context) for d in directions]
        return maps[0] if len(maps) == 1 else maps[0] + maps[1]

    def _hooks(self) -> list[str]:
        """The hook points the patched runs write: the component at every block of the range."""
        return [act_name(self.component, layer) for layer in range(self.layers[0], self.layers[1] + 1)]

    def _direction_maps(self, direction: str, pixels: Tensor, targets: Int[Tensor, "batch k"], context: Context
                        ) -> Tensor:
        """One direction's maps. Sufficiency: the rows run in the neutral context and carry the source's
        values; necessity: the rows run in the source's own run and carry the context's values."""
        b = pixels.shape[0]
        if direction == "sufficiency":
            base, donor = context, pixels
            donor_of = (lambda i: i)  # the source image of image i
            base_of = (lambda i: i if context.n > 1 else 0)
            # "logit_diff" subtracts the context's logit from each single patch's; set estimators need no shift
            reference_score = "logit" if self.score == "logit_diff" and self.sets is None else None
        else:
            base, donor = InputContext(self.model, pixels), self._context_values(context)
            donor_of = (lambda i: i if context.n > 1 else 0)  # the context row of image i
            base_of = (lambda i: i)
            reference_score = "prob" if self.score == "prob" else "logit"
        # the unpatched base run's score, once per image: what "logit_diff" subtracts / what necessity loses
        reference = None if reference_score is None else self._context_scores(base, targets, reference_score)
        grid = self.model.grid_size_for(pixels)
        if self.precision != "bf16_delta":
            return self._patched_maps(direction, grid, targets, base, donor,
                                      [donor_of(i) for i in range(b)], [base_of(i) for i in range(b)], reference)
        start = self.layers[0]
        maps = []
        for i in range(b):  # one reference run (the run the rows patch) per image
            row = base_of(i)
            one = ResidContext(lambda layer, row=row: base.resid_pre(layer)[row : row + 1], n=1)
            with delta_bf16(self.model, one.resid_pre(start), start, hooks=self._hooks()):
                maps.append(self._patched_maps(direction, grid, targets[i : i + 1], one, donor,
                                               [donor_of(i)], [0], None if reference is None else reference[i : i + 1]))
        return torch.cat(maps)

    def _context_values(self, context: Context) -> dict[str, Tensor]:
        """The neutral context's values at the hook points the necessity direction writes: its residual
        stream entering each block of the range ("resid_pre"), or its run's outputs from block `start`."""
        if self.component == "resid_pre":
            return {act_name("resid_pre", layer): context.resid_pre(layer)
                    for layer in range(self.layers[0], self.layers[1] + 1)}
        hooks = self._hooks()
        _, cache = self.model.run_with_cache(context.resid_pre(self.layers[0]), start_at_layer=self.layers[0],
                                             names_filter=hooks)
        return {h: cache[h] for h in hooks}

    def _patched_maps(self, direction: str, grid: tuple[int, int], targets: Int[Tensor, "batch k"], base: Context,
                      donor: Tensor | dict[str, Tensor], donors: list[int], bases: list[int],
                      reference: Tensor | None) -> Tensor:
        """Patched runs for each image (one per patch, or one per sampled set) in `base`, carrying `donor`'s
        values (image i: donor row `donors[i]`, base row `bases[i]`), scored for every class of `targets`,
        turned into maps [batch, k, grid_h, grid_w]; `reference`: the unpatched base run's scores."""
        model = self.model
        b = len(donors)
        n_patches = grid[0] * grid[1]
        prefix = model.cfg.n_prefix_tokens
        hooks = self._hooks()
        if self.sets is None:
            written = [(p,) for p in range(n_patches)]
        else:
            z = sample_sets(self.sets, n_patches, self.density, self.seed)
            written = [tuple(int(p) for p in torch.nonzero(row).flatten()) for row in z]
        rows = [
            Intervention(tuple(Write(h, tuple(prefix + p for p in patches)) for h in hooks) if patches else (),
                         source=donors[i], context=bases[i])
            for i in range(b)
            for patches in written
        ]
        n_rows = len(written)
        pairs = torch.arange(b, device=targets.device).repeat_interleave(n_rows)
        k = targets
        raw = "prob" if self.score == "prob" else "logit"
        # sufficiency, one patch per run: the score itself, minus the context's for "logit_diff"
        subtract = direction == "sufficiency" and self.sets is None and self.score == "logit_diff"

        def score_fn(logits: Tensor, pair: Tensor) -> Tensor:
            if subtract:
                return class_score(logits, k[pair], "logit_diff", reference[pair])
            return class_score(logits, k[pair], raw)

        scores = run_interventions(
            model, rows, donor, base, score_fn, batch_size=self.batch_size, pairs=pairs,
            progress="CAAP" if self.progress else False,
        ).view(b, n_rows, -1)  # [batch, rows, k]
        if self.sets is None:
            values = scores if direction == "sufficiency" else reference[:, None, :] - scores
        else:
            carried = z if direction == "sufficiency" else ~z
            values = torch.stack([estimate(self.estimator, carried.to(scores.device), s) for s in scores])
        return values.permute(0, 2, 1).reshape(b, -1, *grid).to(scores.dtype)
