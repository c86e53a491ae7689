"""Many maps, many metrics, one batch of images: every forward pass that can be shared is run once.

    evaluator = Evaluator(model, pixels, targets, masks=masks, batch_size=64)
    values = evaluator.evaluate(maps, {"insertion": Insertion(n_steps=16), "box_energy": BoxEnergy()})
    # {"insertion": Float[Tensor, "batch"], "box_energy": ...}, on the CPU; equal to each metric's own call

What is shared (the metrics' own calls share nothing):
- the unperturbed logits (one forward pass per image, for every map and metric; also the predicted
  class when `targets` is None);
- per substrate, the fully perturbed image and its logits (once per image, not per map);
- faithfulness metrics with the same (mode, order, level, interpolation, substrate) perturb the same
  images: one pass over the union of their steps serves all of them (e.g. deletion and MoRF both
  delete the most relevant patches first into the zero substrate), and every score they need
  (probability, logit, top-1 accuracy) is read off the same logits.
- token deletion / insertion (`caap.metrics.tokens`) with the same (mode, order, interpolation, patch
  size) run the same token sequences: one pass over the union of their steps; the every-patch-kept end
  is the clean run, and the prefix-tokens-only end is run once per image, not per map.
Localisation metrics need no forward pass; they get `masks`. Metrics with per-map fill-ins (ROAD) run
their own passes and share only the targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from caap.metrics.base import Metric, Model, PerturbationCurve, as_map_batch, grid_for, resolve_patch_size
from caap.metrics.faithfulness import PerturbationMetric, perturbation_scores, unit_ranks
from caap.metrics.tokens import TokenPerturbationMetric, cell_order, prefix_only_logits, token_scores
from caap.targets import Target, class_score, resolve_targets
from hooked_vit.checks import check_positive_int


class Evaluator:
    """Metrics of attribution maps for one batch of images (see the module docstring).

    Args:
        model: pixels -> logits (as for the metrics).
        pixels: [batch, chan, H, W], on the model's device.
        targets: the class per image (None: the predicted class).
        masks: box-union masks [batch, H, W] for localisation metrics.
        clean_logits: the unperturbed logits, if already computed (else one forward pass here).
        batch_size: images per model call.

    `forwards` counts the images run through the model so far.
    """

    def __init__(
        self,
        model: Model,
        pixels: Float[Tensor, "batch chan H W"],
        targets: Target = None,
        masks: Bool[Tensor, "batch H W"] | None = None,
        clean_logits: Float[Tensor, "batch n_classes"] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model, self.pixels, self.masks = model, pixels, masks
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.size = (pixels.shape[-2], pixels.shape[-1])
        self.forwards = 0
        self.clean = self._forward(pixels) if clean_logits is None else clean_logits.to(pixels.device)
        self.targets: Int[Tensor, " batch"] = resolve_targets(model, pixels, targets, logits=self.clean)
        self._substrates: dict[Any, tuple[Tensor, Tensor]] = {}
        self._no_patches: Tensor | None = None  # logits of the prefix tokens alone (token metrics)

    @torch.inference_mode()
    def _forward(self, x: Tensor) -> Tensor:
        self.forwards += x.shape[0]
        return torch.cat([self.model(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)])

    def prepare(self, metrics: Mapping[str, Metric]) -> None:
        """Compute the substrates of the faithfulness metrics and the logits of the fully perturbed images
        now (they are shared by every map; `evaluate` calls this itself)."""
        for m in metrics.values():
            if isinstance(m, PerturbationMetric) and m.substrate_key() not in self._substrates:
                sub = m.make_substrate(self.model, self.pixels)
                self._substrates[m.substrate_key()] = (sub, self._forward(sub))

    @torch.inference_mode()
    def evaluate(self, maps: Float[Tensor, "batch h w"], metrics: Mapping[str, Metric]) -> dict[str, Tensor]:
        """{name: values [batch]} (CPU, float32; NaN where undefined) for every metric of `metrics`."""
        b = self.pixels.shape[0]
        maps = as_map_batch(maps, b).to(self.pixels.device)
        self.prepare(metrics)
        groups: dict[Any, list[tuple[str, PerturbationMetric]]] = {}
        for name, m in metrics.items():
            if isinstance(m, PerturbationMetric):
                key = (m.mode, m.order, m.level, m.interpolation, m.substrate_key())
                groups.setdefault(key, []).append((name, m))
        out: dict[str, Tensor] = {}
        for (mode, order, level, interpolation, key), members in groups.items():
            out.update(self._perturbation_group(maps, members, mode, order, level, interpolation, key))
        token_groups: dict[Any, list[tuple[str, TokenPerturbationMetric]]] = {}
        for name, m in metrics.items():
            if isinstance(m, TokenPerturbationMetric):
                token_groups.setdefault(m.group_key(), []).append((name, m))
        for members in token_groups.values():
            out.update(self._token_group(maps, members))
        for name, m in metrics.items():
            if name not in out:
                out[name] = m(self.model, self.pixels, maps, self.targets, masks=self.masks).float().cpu()
        return {name: out[name] for name in metrics}

    def _perturbation_group(
        self, maps: Tensor, members: list[tuple[str, PerturbationMetric]], mode: str, order: str, level: str,
        interpolation: str, key: Any,
    ) -> dict[str, Tensor]:
        """The metrics of one group: one pass over the union of their steps; the curve's ends (nothing or
        everything changed) come from the shared clean and substrate logits."""
        patch = resolve_patch_size(self.model, members[0][1].patch_size)
        gh, gw = grid_for(self.size, patch)
        ranks, n_units = unit_ranks(maps, self.size, patch, level, order, interpolation)
        steps = {name: m.steps(n_units, gh * gw) for name, m in members}
        counts = sorted({int(c) for c, _ in steps.values() for c in c.tolist()})
        kinds = tuple(sorted({m.score for _, m in members}))
        sub, sub_logits = self._substrates[key]
        ends = {c: self.clean if (c == 0) == (mode == "delete") else sub_logits for c in counts if c in (0, n_units)}
        inner = [c for c in counts if c not in ends]
        col = {c: j for j, c in enumerate(counts)}
        scores = {k: torch.empty(maps.shape[0], len(counts), device=self.pixels.device) for k in kinds}
        for c, logits in ends.items():
            for k in kinds:
                scores[k][:, col[c]] = class_score(logits, self.targets, k)
        if inner:
            measured = perturbation_scores(
                self.model, self.pixels, sub, ranks, torch.tensor(inner), self.targets, mode, kinds,
                self.batch_size, progress=False,
            )
            self.forwards += maps.shape[0] * len(inner)
            cols = [col[c] for c in inner]
            for k in kinds:
                scores[k][:, cols] = measured[k]
        out = {}
        for name, m in members:
            c, fractions = steps[name]
            idx = torch.tensor([col[int(v)] for v in c.tolist()], device=self.pixels.device)
            curve = PerturbationCurve(fractions.float().cpu(), scores[m.score][:, idx].float().cpu())
            out[name] = m.reduce(m.finish_curve(curve)).float()
        return out

    def _token_group(self, maps: Tensor, members: list[tuple[str, TokenPerturbationMetric]]) -> dict[str, Tensor]:
        """Token metrics that run the same sequences: one pass over the union of their steps; the clean
        logits serve the every-patch-kept end, the prefix-only logits (once per image) the other."""
        first = members[0][1]
        patch = resolve_patch_size(self.model, first.patch_size)
        grid = grid_for(self.size, patch)
        n = grid[0] * grid[1]
        perm = cell_order(maps, grid, self.size, first.order, first.interpolation)
        steps = {name: m.steps(n) for name, m in members}
        counts = sorted({int(c) for c, _ in steps.values() for c in c.tolist()})
        kinds = tuple(sorted({m.score for _, m in members}))
        empty = n if first.mode == "delete" else 0
        known = {n - empty: self.clean}
        if empty in counts:
            if self._no_patches is None:
                self._no_patches = prefix_only_logits(self.model, self.pixels, self.batch_size)
                self.forwards += self.pixels.shape[0]
            known[empty] = self._no_patches
        scores = token_scores(self.model, self.pixels, perm, counts, self.targets, first.mode, kinds,
                              self.batch_size, known, progress=False)
        self.forwards += maps.shape[0] * len([c for c in counts if c not in known])
        col = {c: j for j, c in enumerate(counts)}
        out = {}
        for name, m in members:
            c, fractions = steps[name]
            idx = torch.tensor([col[int(v)] for v in c.tolist()], device=self.pixels.device)
            curve = PerturbationCurve(fractions.float().cpu(), scores[m.score][:, idx].float().cpu())
            out[name] = m.reduce(curve).float()
        return out

