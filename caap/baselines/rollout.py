"""Attention rollout (Abnar & Zuidema 2020)."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import READOUTS, Readout, attention_patterns, check_choice, finish, readout_weights
from hooked_vit import HookedViT
from hooked_vit.checks import check_index

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS = ("mean", "max", "min")


class AttentionRollout(AttributionMethod):
    """Attention rollout: Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers" (ACL).

    Per block, the heads' patterns are fused (mean by default; max or min as in the common ViT
    implementation, jacobgil/vit-explain), optionally the lowest `discard_ratio` of the fused matrix's
    entries are set to zero (as in vit-explain, never the class token's own entry [0, 0]), the residual
    connection is added as `(1 - residual) * A + residual * I` (residual=0.5 in the paper) and the rows are
    renormalised to sum to one. The rollout is the product `Â_L ... Â_start`; the map is the readout row
    (the class token's row, see `caap.baselines._common`) over the patch columns.

    The map does not depend on the target class (that is the method). Register and distillation tokens
    are propagated like any token and dropped from the map. Raw values are returned (no min-max
    rescaling; the rows of the rollout sum to one, so the map over patches sums to at most one).

    Args:
        head_fusion: "mean" (the paper), "max" or "min".
        discard_ratio: fraction of the fused matrix's entries (per image) zeroed before adding the
            identity; 0 reproduces the paper.
        residual: weight of the identity (0.5 in the paper).
        start_layer: first block included (0: all, as in the paper).
        readout: whose row is read: "auto", "class" or "pooled" (see `caap.baselines._common`).
    """

    name = "rollout"
    summary = "the blocks' head-averaged attention, with the residual, multiplied through the depth"
    paper = "Abnar & Zuidema 2020 (ACL)"
    resolution = "patch"

    def __init__(
        self,
        model: HookedViT,
        head_fusion: HeadFusion = "mean",
        discard_ratio: float = 0.0,
        residual: float = 0.5,
        start_layer: int = 0,
        readout: Readout = "auto",
    ) -> None:
        super().__init__(model)
        check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
        check_choice("readout", readout, READOUTS)
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}")
        if not 0.0 <= residual <= 1.0:
            raise ValueError(f"residual must be in [0, 1], got {residual!r}")
        self.head_fusion, self.discard_ratio, self.residual = head_fusion, float(discard_ratio), float(residual)
        self.start_layer, self.readout = check_index(start_layer, model.cfg.n_layers, "start_layer"), readout

    def _fuse(self, pattern: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch q k"]:
        if self.head_fusion == "mean":
            return pattern.mean(dim=1)
        if self.head_fusion == "max":
            return pattern.amax(dim=1)
        return pattern.amin(dim=1)

    def _discard(self, fused: Float[Tensor, "batch q k"]) -> Float[Tensor, "batch q k"]:
        b = fused.shape[0]
        flat = fused.reshape(b, -1).clone()
        k = int(flat.shape[1] * self.discard_ratio)
        if k == 0:
            return fused
        _, idx = flat.topk(k, dim=-1, largest=False)
        keep = torch.zeros_like(idx, dtype=torch.bool)
        if self.model.cfg.class_token:
            keep = idx == 0  # the class token's attention to itself is never dropped
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        flat.scatter_(1, idx, torch.where(keep, flat.gather(1, idx), zero))
        return flat.view_as(fused)

    def rollout(self, pixels: Float[Tensor, "batch chan H W"]) -> Float[Tensor, "batch pos pos"]:
        """The full rollout matrix [batch, pos, pos] (rows: query tokens, columns: input tokens)."""
        layers = list(range(self.start_layer, self.model.cfg.n_layers))
        patterns = attention_patterns(self.model, pixels, layers)
        b, _, t, _ = patterns[0].shape
        eye = torch.eye(t, device=pixels.device, dtype=patterns[0].dtype)
        result = eye.expand(b, t, t)
        for pattern in patterns:
            fused = self._fuse(pattern)
            if self.discard_ratio > 0:
                fused = self._discard(fused)
            a = (1.0 - self.residual) * fused + self.residual * eye
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result
        return result

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        result = self.rollout(pixels)
        r = readout_weights(self.model, result.shape[-1], self.readout, result.device, result.dtype)
        row = torch.einsum("q,bqk->bk", r, result)[:, self.model.cfg.n_prefix_tokens :]
        return finish(self.model.to_grid(row, grid), pixels.device)

    def __repr__(self) -> str:
        return (
            f"AttentionRollout(head_fusion={self.head_fusion!r}, discard_ratio={self.discard_ratio}, "
            f"residual={self.residual}, start_layer={self.start_layer}, readout={self.readout!r})"
        )
