"""Sweeps: every (component, layer, position[, head]) patched in turn, one batch row each, with named axes.

    result = sweep(model, clean, corrupted, logit_score(labels), component="resid_pre")
    result.values   # [pair, layer, pos]
    result.to_grid(model).values   # [pair, layer, grid_h, grid_w] (ViT: prefix tokens dropped)

A thin layer over `caap.patching.engine.run_interventions`, in the manner of TransformerLens'
`patching.py` (whose API shape it keeps, without its one-forward-per-index loop).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from caap.patching.engine import (
    Context,
    HookedModel,
    InputContext,
    Intervention,
    ScoreFn,
    Write,
    as_context,
    check_score_pairs,
    run_interventions,
    unpatched_scores,
)
from hooked_vit.checks import check_indices, check_positive_int
from hooked_vit.names import COMPONENTS, HEAD_COMPONENTS, act_name  # noqa: F401 - COMPONENTS: caap.patching re-exports it


@dataclass
class SweepResult:
    """Patching results with named axes.

    `values` has one axis per name in `dims`; `coords[name]` lists the index of each entry along that
    axis (layer numbers, token positions, head numbers, component names, pair numbers).
    `context_score` / `source_score`: the score of the unpatched context and source runs, per pair.
    """

    values: Tensor
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    context_score: Tensor | None = None
    source_score: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != len(self.dims):
            raise ValueError(f"values has {self.values.ndim} axes but dims names {len(self.dims)}: {self.dims}")

    def axis(self, name: str) -> int:
        if name not in self.dims:
            raise KeyError(f"no axis {name!r}; axes are {self.dims}")
        return self.dims.index(name)

    def sel(self, **indexers: Any) -> "SweepResult":
        """Select one entry along named axes by coordinate, e.g. `result.sel(pair=0, layer=3)`."""
        values, dims, coords = self.values, list(self.dims), dict(self.coords)
        for name, value in indexers.items():
            ax = dims.index(name) if name in dims else None
            if ax is None:
                raise KeyError(f"no axis {name!r}; axes are {tuple(dims)}")
            i = coords[name].index(value)
            values = values.select(ax, i)
            dims.pop(ax)
            coords.pop(name)
        return replace(self, values=values, dims=tuple(dims), coords=coords)

    def normalized(self) -> "SweepResult":
        """(patched - context) / (source - context) per pair: 0 = no effect, 1 = the source's score."""
        if self.context_score is None or self.source_score is None:
            raise ValueError("normalisation needs context_score and source_score")
        shape = [-1 if d == "pair" else 1 for d in self.dims]
        t, s = self.context_score.view(shape), self.source_score.view(shape)
        return replace(self, values=(self.values - t) / (s - t))

    def to_grid(self, model: HookedModel, grid_size: tuple[int, int] | None = None) -> "SweepResult":
        """Turn the `pos` axis into (`grid_h`, `grid_w`) with the model's grid helper (prefix tokens
        dropped). The positions swept must be every token, or every patch token."""
        ax = self.axis("pos")
        v = self.values.movedim(ax, -1)
        grid = model.to_grid(v, grid_size=grid_size)
        dims = [d for d in self.dims if d != "pos"] + ["grid_h", "grid_w"]
        coords = {k: c for k, c in self.coords.items() if k != "pos"}
        coords["grid_h"], coords["grid_w"] = list(range(grid.shape[-2])), list(range(grid.shape[-1]))
        return replace(self, values=grid, dims=tuple(dims), coords=coords)

    def to_dataframe(self):
        """One row per entry, a column per axis plus `value` (pandas)."""
        import pandas as pd

        names = list(self.dims)
        grids = itertools.product(*(self.coords.get(n, range(self.values.shape[i])) for i, n in enumerate(names)))
        return pd.DataFrame([(*idx, v) for idx, v in zip(grids, self.values.flatten().tolist())], columns=[*names, "value"])


def _n_pairs(n_sources: int, n_contexts: int) -> int:
    if n_sources != n_contexts and 1 not in (n_sources, n_contexts):
        raise ValueError(
            f"{n_sources} sources and {n_contexts} contexts: give as many of each, or one of either (broadcast)"
        )
    return max(n_sources, n_contexts)


def sweep(
    model: HookedModel,
    sources: Tensor,
    context: Tensor | Context,
    score_fn: ScoreFn,
    component: str | Sequence[str] = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    per_position: bool | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Patch each (component, layer, position[, head]) from the source into the context, one at a time.

    Args:
        sources: source inputs [n, ...] (pixels or tokens). Pair i is source i with context i (one of
            either is broadcast).
        context: the runs patched into (TransformerLens' "corrupted" run): inputs [n, ...] or a `Context`
            (e.g. a neutral context's residual streams).
        score_fn: `score_fn(output, pair) -> [rows]` (`caap.patching.scores`).
        component: one name or several, from `COMPONENTS`.
        layers / positions / heads: what to sweep (default: all): integers of any integral type (Python,
            numpy, 0-d tensors) or a 1-d integer tensor, negative ones counted from the end.
        batch_size: rows per forward pass (None: the engine's `default_batch_size`).
        per_position: for head components, patch each (position, head) (True) or each head at every
            position (False). Default: False for `pattern`, True otherwise.

    Returns:
        `SweepResult` with dims (pair, [component,] layer, pos) for position components, and
        (pair, [component,] layer, [pos,] head) for head components.
    """
    components = [component] if isinstance(component, str) else list(component)
    for c in components:
        act_name(c, 0)
    head_kinds = {c in HEAD_COMPONENTS for c in components}
    if len(head_kinds) > 1:
        raise ValueError("sweep components with a head axis and without one separately")
    has_heads = head_kinds.pop()
    if per_position is None:
        per_position = not set(components) <= {"pattern", "attn_scores"}
    if "result" in components and not getattr(model.cfg, "use_attn_result", False):
        raise ValueError("component 'result' needs model.cfg.use_attn_result = True (model.set_use_attn_result(True))")

    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    context = as_context(model, context)
    n_pairs = _n_pairs(sources.shape[0], context.n)
    check_score_pairs(score_fn, n_pairs)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else check_indices(layers, n_layers, "layer")
    n_pos = _n_positions(model, sources)
    positions = list(range(n_pos)) if positions is None else check_indices(positions, n_pos, "position")
    n_heads = model.cfg.n_heads
    heads = list(range(n_heads)) if heads is None else check_indices(heads, n_heads, "head")

    axes: list[tuple[str, list]] = [("pair", list(range(n_pairs)))]
    if len(components) > 1:
        axes.append(("component", components))
    axes.append(("layer", layers))
    if not has_heads or per_position:
        axes.append(("pos", positions))
    if has_heads:
        axes.append(("head", heads))

    rows, row_pairs = [], []
    for idx in itertools.product(*(c for _, c in axes)):
        named = dict(zip((n for n, _ in axes), idx))
        comp = named.get("component", components[0])
        hook = act_name(comp, named["layer"])
        write = Write(hook, named.get("pos"), named.get("head"))
        pair = named["pair"]
        rows.append(Intervention((write,), source=min(pair, sources.shape[0] - 1), context=min(pair, context.n - 1)))
        row_pairs.append(pair)
    pairs = torch.tensor(row_pairs)
    values = run_interventions(
        model, rows, sources, context, score_fn, batch_size=batch_size, pairs=pairs,
        progress="sweep" if progress else False,
    )
    shape = [len(c) for _, c in axes] + list(values.shape[1:])
    context_score = unpatched_scores(model, context, score_fn, n_pairs)
    source_score = unpatched_scores(model, InputContext(model, sources), score_fn, n_pairs)
    dims = tuple(n for n, _ in axes) + tuple(f"out{i}" for i in range(values.ndim - 1))
    return SweepResult(values.view(shape), dims, {n: c for n, c in axes}, context_score, source_score)


def _n_positions(model: HookedModel, sources: Tensor) -> int:
    if sources.ndim == 4:  # pixels
        gh, gw = model.grid_size_for(sources)
        return model.cfg.n_prefix_tokens + gh * gw
    return sources.shape[1]  # tokens
