"""Model-randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim 2018, "Sanity Checks
for Saliency Maps", NeurIPS): cascading randomisation.

An explanation of what a model learned must change when what it learned is destroyed. Starting from the
top, the model's weights are replaced by random ones stage by stage, cumulatively: the head (with the
final norm), then the last block, ..., down to the first block, and finally the embeddings (patch
embedding, position embeddings, prefix tokens). At every stage each method explains the same images for
the same classes, and its map is compared with its map on the trained model by Spearman's rank
correlation (of the maps, and of their absolute values, since a sign flip is no evidence of
dependence). A method whose map does not change is flagged.

    result = cascading_randomisation(model, lambda m: GradSAM(m), pixels, targets)
    result.stages          # ["trained", "head", "blocks.11", ..., "blocks.0", "embed"]
    result.spearman        # [stages, batch]: rank correlation with the trained model's map
    result.flagged         # True: the map stayed similar (>= threshold) at every randomised stage

Flag rule: the mean over images of max(Spearman of the maps, Spearman of their absolute values) stays at
or above `threshold` (default 0.5) at every randomised stage. Why 0.5: two unrelated maps on a 14x14 grid
correlate near 0 (standard deviation 1/sqrt(195) = 0.07 for independent patches, a few times more for
spatially smooth maps), and maps of the trained model that agree to 0.5 after the whole network is
random carry at least as much of the input's structure (edges, position) as of the model; Adebayo et
al.'s failing methods (guided backpropagation, gradient x input on the input's edges) stay well above
it. A map independent of the model (an edge detector, a seeded random map) has Spearman 1 everywhere.

Randomisation: every parameter tensor of a stage is redrawn from a Gaussian with that tensor's own mean
and standard deviation (seeded), so each layer keeps its scale and the random network's activations
stay in range (Adebayo et al. re-run each layer's initialiser instead, whose scale a pretrained ViT no
longer has). The model passed in is never changed: the check works on a deep copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from caap.metrics.base import as_map_batch
from caap.targets import Target, resolve_targets

#: parameter-name prefixes of the head stage (HookedViT's and timm's names; attention pooling and CLIP's projection)
HEAD_PREFIXES = ("head", "head_dist", "fc_norm", "ln_final", "norm", "attn_pool", "proj")
SANITY_THRESHOLD = 0.5


def randomisation_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """[(stage, parameter names)] from the top: "head" (head, final norm, fc_norm, attention pooling,
    projection), "blocks.{L-1}", ...,
    "blocks.0", "embed" (every other parameter: patch embedding, position embeddings, prefix tokens,
    pre-norm). Stages without parameters are left out."""
    head, blocks, embed = [], {}, []
    for name, _ in model.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(name)
        elif name.split(".")[0] in HEAD_PREFIXES:
            head.append(name)
        else:
            embed.append(name)
    stages = [("head", head)] + [(f"blocks.{i}", blocks[i]) for i in sorted(blocks, reverse=True)] + [("embed", embed)]
    return [(s, names) for s, names in stages if names]


@torch.no_grad()
def randomise_(model: nn.Module, names: Sequence[str], generator: torch.Generator) -> None:
    """Redraw the named parameters in place: Gaussian with each tensor's own mean and std."""
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        mean, std = p.float().mean(), (p.float().std() if p.numel() > 1 else torch.tensor(0.0))
        noise = torch.randn(tuple(p.shape), generator=generator)
        p.copy_((mean.cpu() + std.cpu() * noise).to(p.device, p.dtype))


def spearman(a: Float[Tensor, "batch n"], b: Float[Tensor, "batch n"]) -> Float[Tensor, " batch"]:
    """Spearman's rank correlation per row (ties get their average rank); NaN where a row is constant."""
    from scipy.stats import rankdata

    ra = torch.from_numpy(rankdata(a.double().cpu().numpy(), axis=1))
    rb = torch.from_numpy(rankdata(b.double().cpu().numpy(), axis=1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = ra.norm(dim=1) * rb.norm(dim=1)
    r = (ra * rb).sum(1) / den
    return torch.where(den > 0, r, torch.full_like(r, float("nan"))).float()


@dataclass
class RandomisationResult:
    """Maps and their similarity to the trained model's, per stage (stage 0 = "trained")."""

    stages: list[str]
    maps: Float[Tensor, "stage batch h w"]
    spearman: Float[Tensor, "stage batch"]
    spearman_abs: Float[Tensor, "stage batch"]
    threshold: float = SANITY_THRESHOLD
    targets: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def similarity(self) -> Float[Tensor, "stage batch"]:
        """max(Spearman, Spearman of |maps|) per stage and image (NaN where both are undefined)."""
        return torch.fmax(self.spearman, self.spearman_abs)

    @property
    def stage_means(self) -> Float[Tensor, " stage"]:
        """The similarity's mean over images per stage (NaNs left out)."""
        return torch.nanmean(self.similarity, dim=1)

    @property
    def flagged(self) -> bool:
        """True when the map stays similar (mean >= threshold) at every randomised stage."""
        means = self.stage_means[1:]
        return bool(means.numel()) and bool((means >= self.threshold).all())


def cascading_randomisation(
    model: nn.Module,
    method_factory: Callable[[nn.Module], Any],
    pixels: Float[Tensor, "batch chan H W"],
    targets: Target = None,
    stages: Sequence[str] | None = None,
    seed: int = 0,
    threshold: float = SANITY_THRESHOLD,
) -> RandomisationResult:
    """Cascading randomisation of `model` from the top (see the module docstring).

    Args:
        model: the trained model; never changed (a deep copy is randomised).
        method_factory: model -> an object with `.attribute(pixels, target) -> maps [batch, h, w]`, called
            once per stage on the randomised copy (e.g. `lambda m: CAAP(m)` or `lambda m: get_baseline("gae", m)`).
        pixels: [batch, chan, H, W] on the model's device.
        targets: the class per image (None: the trained model's prediction), the same at every stage.
        stages: the randomised stages to report, by name (default all of `randomisation_stages`); the
            randomisation is still cumulative over every stage above a reported one.
        seed: the random weights (the same seed gives the same random models).
        threshold: the flag's threshold on the mean similarity.
    """
    all_stages = randomisation_stages(model)
    names = [s for s, _ in all_stages]
    wanted = list(names if stages is None else stages)
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; accepted: {', '.join(names)}")
    was_training = model.training
    copy_ = copy.deepcopy(model).eval()
    model.train(was_training)
    targets = resolve_targets(model, pixels, targets)
    gen = torch.Generator().manual_seed(int(seed))

    def maps_of(m: nn.Module) -> Tensor:
        out = method_factory(m).attribute(pixels, target=targets)
        return as_map_batch(out.detach(), pixels.shape[0]).float().cpu()

    reference = maps_of(copy_)
    collected, labels = [reference], ["trained"]
    for stage, params in all_stages:
        randomise_(copy_, params, gen)
        if stage in wanted:
            collected.append(maps_of(copy_))
            labels.append(stage)
        if all(s in labels for s in wanted):
            break
    maps = torch.stack(collected)
    flat_ref = reference.flatten(1)
    rho = torch.stack([spearman(flat_ref, m.flatten(1)) for m in maps])
    rho_abs = torch.stack([spearman(flat_ref.abs(), m.flatten(1).abs()) for m in maps])
    return RandomisationResult(labels, maps, rho, rho_abs, float(threshold), targets.cpu())


class EdgeDetector:
    """Adebayo et al.'s model-free reference: the Sobel gradient magnitude of the image (channels summed),
    area-pooled onto `grid` (default: the model's patch grid, when it has one). `EdgeDetector(model).attribute(pixels, target)` ignores the model
    and the target, so it is flagged by construction."""

    name = "edge"

    def __init__(self, model: Any = None, grid: tuple[int, int] | None = None) -> None:
        self.model = model
        self.grid = grid

    def attribute(self, pixels: Float[Tensor, "batch chan H W"], target: Target = None) -> Float[Tensor, "batch h w"]:
        x = pixels.detach().float().sum(1, keepdim=True)
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
        gx = torch.nn.functional.conv2d(x, kx.view(1, 1, 3, 3), padding=1)
        gy = torch.nn.functional.conv2d(x, kx.t().reshape(1, 1, 3, 3), padding=1)
        mag = (gx**2 + gy**2).sqrt()
        grid = self.grid
        if grid is None and hasattr(self.model, "grid_size_for"):
            grid = self.model.grid_size_for(pixels)
        if grid is not None:
            mag = torch.nn.functional.adaptive_avg_pool2d(mag, tuple(grid))
        return mag[:, 0]


def summary_rows(results: dict[str, RandomisationResult]) -> list[dict[str, Any]]:
    """One row per method: the mean similarity per stage, the minimum over randomised stages, the flag."""
    rows = []
    for method, r in results.items():
        means = r.stage_means.tolist()
        rows.append({"method": method, **dict(zip(r.stages, means)),
                     "min": float(np.nanmin(means[1:])) if len(means) > 1 else float("nan"), "flagged": r.flagged})
    return rows
