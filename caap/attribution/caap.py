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

Choices the paper leaves open are parameters (see README for how the defaults were measured on the
`dev` split): the neutral context, the layer range, the component and the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.contexts import NeutralContext, get_context
from caap.patching.engine import Intervention, ResidContext, Write, run_interventions, unpatched_scores
from caap.targets import Score, Target, check_score, class_score, resolve_targets
from hooked_vit import HookedViT, act_name
from hooked_vit.precision import delta_bf16
from hooked_vit.preprocess import check_pixels

Component = Literal["resid_pre", "attn_out", "mlp_out"]
CAAP_COMPONENTS: tuple[str, ...] = get_args(Component)
"""What the patch token may carry from the source (hook names: `hooked_vit.act_name`)."""
CAAP_SCORES = ("logit_diff", "logit", "prob")
"""The scores (`caap.targets.Score`) CAAP may read off each patched run."""
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
            layer as its value in the unpatched context run (fp32) plus a bf16 product of the difference
            (`hooked_vit.precision.delta_bf16`), so the rounding scales with the patch's effect: maps
            within a Spearman of 0.9999 of fp32, less of a speed-up (README, "bf16").

    `attribute(pixels, target)` -> [batch, grid_h, grid_w], one target class per image, as every method;
    `attribute_classes(pixels, classes)` with classes [batch, k] -> [batch, k, grid_h, grid_w], at the
    cost of one map.
    """

    name = "caap"
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
    ) -> None:
        super().__init__(model)
        n = model.cfg.n_layers
        start, end = default_layers(n) if layers is None else layers
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < n):
            raise ValueError(
                f"layers={layers!r} is not a valid range: need 0 <= start <= end <= {n - 1} "
                f"(inclusive block indices of this {n}-layer model)"
            )
        if component not in CAAP_COMPONENTS:
            raise ValueError(f"unknown component {component!r}; accepted: {', '.join(CAAP_COMPONENTS)}")
        check_score(score, CAAP_SCORES)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.layers = (start, end)
        self.context = get_context(context, model, reference=reference)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
        self.component, self.score, self.batch_size, self.progress = component, score, batch_size, progress
        self.precision = precision

    def __repr__(self) -> str:
        return (
            f"CAAP(layers={self.layers}, context={self.context.name!r}, component={self.component!r}, "
            f"score={self.score!r}, precision={self.precision!r})"
        )

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

    def _context_scores(self, context: Any, k: Int[Tensor, "batch k"]) -> Float[Tensor, "batch k"]:
        """The target logits of the unpatched context runs (one pass from block `start`)."""
        return unpatched_scores(self.model, context, lambda logits, pair: class_score(logits, k[pair]), k.shape[0],
                                self.layers[0])

    def _autocast(self, pixels: Tensor) -> torch.autocast:
        return torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.inference_mode()
    def _attribute(self, pixels: Tensor, targets: Int[Tensor, " batch"]) -> Float[Tensor, "batch grid_h grid_w"]:
        return self._maps(pixels, targets[:, None])[:, 0]

    @torch.inference_mode()
    def _maps(self, pixels: Tensor, targets: Int[Tensor, "batch k"]) -> Float[Tensor, "batch k grid_h grid_w"]:
        with self._autocast(pixels):
            context = self.context.bind(self.model, pixels)
            context_score = None
            if self.score == "logit_diff":  # the unpatched context's score, once per image
                context_score = self._context_scores(context, targets)
            if self.precision != "bf16_delta":
                return self._patched_maps(pixels, targets, context, context_score)
        start = self.layers[0]
        maps = []
        for i in range(pixels.shape[0]):  # one reference run (the image's own context) per image
            row = i if context.n > 1 else 0
            one = ResidContext(lambda layer, row=row: context.resid_pre(layer)[row : row + 1], n=1)
            with delta_bf16(self.model, one.resid_pre(start), start, hooks=self._hooks()):
                maps.append(self._patched_maps(pixels[i : i + 1], targets[i : i + 1], one,
                                               None if context_score is None else context_score[i : i + 1]))
        return torch.cat(maps)

    def _hooks(self) -> list[str]:
        """The hook points the patched runs write: the component at every block of the range."""
        return [act_name(self.component, layer) for layer in range(self.layers[0], self.layers[1] + 1)]

    def _patched_maps(self, pixels: Tensor, targets: Int[Tensor, "batch k"], context: Any,
                      context_score: Tensor | None) -> Tensor:
        """One patched run per (image, patch) in `context` (one row, or one per image), scored for every
        class of `targets`; `context_score`: what "logit_diff" subtracts."""
        model = self.model
        b = pixels.shape[0]
        grid = model.grid_size_for(pixels)
        n_patches = grid[0] * grid[1]
        prefix = model.cfg.n_prefix_tokens
        hooks = self._hooks()
        rows = [
            Intervention(tuple(Write(h, prefix + p) for h in hooks), source=i, context=i if context.n > 1 else 0)
            for i in range(b)
            for p in range(n_patches)
        ]
        pairs = torch.arange(b, device=pixels.device).repeat_interleave(n_patches)
        k = targets

        def score_fn(logits: Tensor, pair: Tensor) -> Tensor:
            return class_score(logits, k[pair], self.score, None if context_score is None else context_score[pair])

        scores = run_interventions(
            model, rows, pixels, context, score_fn, batch_size=self.batch_size, pairs=pairs,
            progress="CAAP" if self.progress else False,
        )
        return scores.view(b, n_patches, -1).permute(0, 2, 1).reshape(b, -1, *grid)
