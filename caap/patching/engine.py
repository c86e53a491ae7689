"""The batched activation-patching engine.

One batch row = one intervention: a set of writes (hook point, position, head) whose values come from
a source run, applied to a run in a context (the run the source's values are written into). The engine

1. caches the source activations it needs (one forward with a names filter),
2. computes the context's residual stream at the earliest patched layer once,
3. packs the rows into batches; each batch starts at that layer (`start_at_layer`) from the context's
   residual stream, with ONE hook per patched hook point that writes the source values into its rows
   by advanced indexing (no Python loop over rows),
4. reads a score per row with a user score function and keeps it on the device until the end.

It needs only what TransformerLens' `HookedRootModule` models share: `run_with_cache`, `hooks()` and
`forward(input, start_at_layer=..., stop_at_layer=...)`, so it runs unchanged on `HookedViT` and on
TransformerLens' `TransformerBridge` (language models, `caap.language_models`).

Axes of hooked activations (TransformerLens conventions): [batch, pos, ...] for the residual stream,
attention/MLP outputs and MLP neurons; [batch, pos, head, d] for q, k, v, z and result;
[batch, head, q_pos, k_pos] for the attention scores and pattern (a write's position is the query).
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_vit.checks import as_int, check_index, check_positive_int
from hooked_vit.names import act_name

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""score_fn(output, pair) -> score per row: `output` is the model's output for a batch of rows
(logits), `pair` the index of each row's (source, context) pair, e.g. to look up its target class
(`caap.patching.scores` makes the usual ones). Not to be confused with `caap.metrics.Metric`, which
scores attribution maps. A score function built for a number of pairs (one class per pair) carries it
as its attribute `n_pairs`; the sweeps refuse to use it on another number of pairs (`check_score_pairs`)."""


def check_score_pairs(score_fn: ScoreFn, n_pairs: int, exact: bool = True) -> None:
    """A ValueError naming both counts when `score_fn` was built for another number of pairs than
    `n_pairs` (its attribute `n_pairs`; a score function without one, or with None, takes any number).
    `exact=False`: only more pairs than it was built for are refused (rows that use some pairs only)."""
    built = getattr(score_fn, "n_pairs", None)
    if built is not None and (n_pairs > built or (exact and n_pairs != built)):
        raise ValueError(
            f"the score function was built for {built} pair{'s' if built != 1 else ''} and is used with {n_pairs} "
            f"pair{'s' if n_pairs != 1 else ''}: build it with one class (or token) per pair, or one for all"
        )


class HookedModelConfig(Protocol):
    n_layers: int


class HookedModel(Protocol):
    """What the engine needs of a model: what TransformerLens' `HookedRootModule` models share
    (`HookedViT`; TransformerLens' `TransformerBridge` has the same): `cfg.n_layers`, the hook points by
    name (`hook_dict`), `run_with_cache(x, names_filter=...)`, `hooks(fwd_hooks=[(name, fn)])` (a context
    that adds hooks and removes them on exit),
    `forward(x, start_at_layer=..., stop_at_layer=...)` (a run from a given block's residual stream), and
    `parameters()` (for the device). Sweeps over pixels also use a ViT's `grid_size_for` / `to_grid`."""

    cfg: HookedModelConfig
    hook_dict: dict[str, Any]

    def __call__(self, input: Tensor, start_at_layer: int | None = ..., stop_at_layer: int | None = ...) -> Tensor: ...

    def forward(self, input: Tensor, start_at_layer: int | None = ..., stop_at_layer: int | None = ...) -> Tensor: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]: ...

    def hooks(self, *args: Any, **kwargs: Any) -> AbstractContextManager[Any]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


@dataclass(frozen=True)
class Write:
    """Overwrite one activation with the source's value: hook point `hook`, token `pos` (the query
    position for attention patterns; a tuple of positions writes each of them; None = every position)
    and `head` (None = every head, or the hook has no head axis)."""

    hook: str
    pos: int | tuple[int, ...] | None = None
    head: int | None = None


@dataclass(frozen=True)
class Intervention:
    """One batch row: its writes, and which source run and which context row it uses."""

    writes: tuple[Write, ...]
    source: int = 0
    context: int = 0

    @staticmethod
    def single(hook: str, pos: int | None = None, head: int | None = None, source: int = 0, context: int = 0):
        return Intervention((Write(hook, pos, head),), source, context)


# ---------------------------------------------------------------------------------------- hook axes
_HEAD_LAST = re.compile(r"hook_(q|k|v|z|result|q_input|k_input|v_input)$")
_PATTERN = re.compile(r"hook_(pattern|attn_scores)$")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def hook_axes(hook: str) -> tuple[int | None, int | None]:
    """(position axis, head axis) of a hook point's activation, TransformerLens conventions."""
    if _HEAD_LAST.search(hook):
        return 1, 2
    if _PATTERN.search(hook):
        return 2, 1
    return 1, None


def hook_layer(hook: str) -> int | None:
    """The block a hook point belongs to; None for hooks before the first block (embeddings)."""
    m = _LAYER.match(hook)
    if m:
        return int(m.group(1))
    if hook.startswith(("hook_embed", "hook_pos_embed", "hook_tokens", "ln_pre.")):
        return None
    return -1  # after the last block (ln_final, pooling, unembedding)


def start_layer_for(hooks: Iterable[str], n_layers: int) -> int | None:
    """The earliest block a run must start at so that every hook point in `hooks` is run."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    layers = [n_layers - 1 if layer == -1 else layer for layer in layers]
    return min(layers) if layers else n_layers - 1


# ---------------------------------------------------------------------------------------- contexts
class Context(Protocol):
    """Where the rows run (the engine's one notion of a context): `n` context rows, the residual stream
    entering any block for each row, and the rows' model inputs (pixels or tokens) where the context is
    a real input, None where it exists only as residual streams (e.g. mean activations). Writes before
    the first block (embeddings) need `inputs`. `caap.contexts.NeutralContext.bind` makes one."""

    n: int
    inputs: Tensor | None

    def resid_pre(self, layer: int) -> Float[Tensor, "n pos d_model"]: ...


class InputContext:
    """A context given as model inputs (pixels or tokens): its residual stream entering every block
    comes from one forward pass (computed on first use)."""

    def __init__(self, model: HookedModel, inputs: Tensor) -> None:
        self.model, self.inputs, self.n = model, inputs, inputs.shape[0]
        self._resid: dict[int, Tensor] = {}

    @torch.inference_mode()
    def resid_pre(self, layer: int) -> Tensor:
        if not self._resid:
            names = [act_name("resid_pre", i) for i in range(self.model.cfg.n_layers)]
            _, cache = self.model.run_with_cache(self.inputs, names_filter=names)
            self._resid = {i: cache[name] for i, name in enumerate(names)}
        return self._resid[layer]


class ResidContext:
    """A context given directly as residual streams: a tensor [n, pos, d_model] per layer (a dict), or
    a function of the layer returning one. It has no model inputs (`inputs` is None)."""

    inputs = None

    def __init__(self, resid_pre: Callable[[int], Tensor] | dict[int, Tensor], n: int | None = None) -> None:
        self._fn = resid_pre.__getitem__ if isinstance(resid_pre, dict) else resid_pre
        self.n = n if n is not None else next(iter(resid_pre.values())).shape[0] if isinstance(resid_pre, dict) else 1

    def resid_pre(self, layer: int) -> Tensor:
        return self._fn(layer)


def as_context(model: HookedModel, context: Tensor | Context) -> Context:
    return InputContext(model, context) if isinstance(context, Tensor) else context


# ---------------------------------------------------------------------------------------- compiling
@dataclass
class _HookWrites:
    """All writes into one hook point, as aligned index tensors sorted by row."""

    row: Tensor
    pos: Tensor
    head: Tensor | None
    source: Tensor
    pos_axis: int
    head_axis: int | None


def compile_interventions(
    interventions: Sequence[Intervention], source_cache: dict[str, Tensor], device: torch.device
) -> dict[str, _HookWrites]:
    """Expand every write into explicit (row, pos, head, source) indices, grouped by hook point."""
    table: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    for row, iv in enumerate(interventions):
        for w in iv.writes:
            if w.hook not in source_cache:
                raise KeyError(f"no source activation for hook {w.hook!r}")
            act = source_cache[w.hook]
            pos_axis, head_axis = hook_axes(w.hook)
            source = as_int(iv.source, f"intervention {row}'s source")
            if not 0 <= source < act.shape[0]:
                raise IndexError(f"intervention {row} uses source {source}; there are {act.shape[0]} sources")
            n_pos = act.shape[pos_axis] if act.ndim > pos_axis else 1
            n_head = act.shape[head_axis] if head_axis is not None else 1
            where = f" for {w.hook!r}"
            if w.pos is None:
                positions: Sequence[int] = range(n_pos)
            elif isinstance(w.pos, tuple):
                positions = [check_index(p, n_pos, "position", where) for p in w.pos]
            else:
                positions = [check_index(w.pos, n_pos, "position", where)]
            if head_axis is None and w.head is not None:
                raise ValueError(f"hook {w.hook!r} has no head axis; got head={w.head}")
            heads = range(n_head) if w.head is None else [check_index(w.head, n_head, "head", where)]
            table[w.hook].extend((row, p, h, source) for p in positions for h in heads)
    out = {}
    for hook, entries in table.items():
        idx = torch.tensor(entries, dtype=torch.long, device=device)
        idx = idx[torch.argsort(idx[:, 0], stable=True)]
        pos_axis, head_axis = hook_axes(hook)
        cols = [c.contiguous() for c in idx.unbind(1)]
        out[hook] = _HookWrites(cols[0], cols[1], cols[2] if head_axis else None, cols[3], pos_axis, head_axis)
    return out


def _write_hook(writes: _HookWrites, source_act: Tensor, r0: int, r1: int) -> Callable | None:
    """A hook that writes the source values into rows [r0, r1) of this batch, or None if it has none."""
    lo, hi = torch.searchsorted(writes.row, torch.tensor([r0, r1], device=writes.row.device)).tolist()
    if lo == hi:
        return None
    rows = writes.row[lo:hi] - r0
    src = writes.source[lo:hi]
    pos = writes.pos[lo:hi]
    dst_idx: list[Tensor] = [rows]
    src_idx: list[Tensor] = [src]
    if writes.head is not None:
        head = writes.head[lo:hi]
        rest = (head, pos) if writes.head_axis == 1 else (pos, head)
    else:
        rest = (pos,)
    dst_idx.extend(rest)
    src_idx.extend(rest)
    values = source_act[tuple(src_idx)]

    def hook(act: Tensor, hook: Any) -> Tensor:
        act[tuple(dst_idx)] = values.to(act.dtype)
        return act

    return hook


# ---------------------------------------------------------------------------------------- running
CPU_TOKENS_PER_PASS = 1600
"""On a CPU, the engine's default batch holds about this many tokens (8 rows of a 197-token ViT)."""


def default_batch_size(model: HookedModel, n_pos: int) -> int:
    """Rows per forward pass when `batch_size` is None: 64 on an accelerator; on a CPU as many rows as
    fit in `CPU_TOKENS_PER_PASS` tokens (at least 1), because bigger batches run slower per row there once
    their activations leave the cache (`experiments/speed_batch.py` measures it; README, Speed)."""
    if next(model.parameters()).device.type != "cpu":
        return 64
    return max(1, CPU_TOKENS_PER_PASS // max(1, n_pos))


def _n_pos(model: HookedModel, x: Tensor) -> int:
    """Tokens per row of an engine input: residual streams [n, pos, d] and tokens [n, pos] say so;
    pixels [n, C, H, W] have the model's n_ctx."""
    return x.shape[1] if x.ndim in (2, 3) else int(model.cfg.n_ctx)


def batched_runs(
    model: HookedModel,
    n_rows: int,
    batch_size: int | None,
    start_layer: int | None,
    make_input: Callable[[int, int], Tensor],
    make_hooks: Callable[[int, int], list[tuple[str, Callable]]],
    readout: Callable[[Tensor, int, int], Tensor],
    stop_at_layer: int | None = None,
    progress: bool | str = False,
) -> Tensor:
    """The engine's core loop: rows [r0, r1) at a time, from `start_layer` (None: from the inputs),
    with that batch's hooks; `readout(output, r0, r1)` gives the rows' scores. Returns them
    concatenated (on the model's device). Hooks are removed even if a hook raises.

    Each hook point gets one dispatching hook for the whole loop (registered when a batch first names
    it), which calls the current batch's functions: adding and removing hooks for every batch would
    walk every hook point of the model each time."""
    if batch_size is None:
        batch_size = default_batch_size(model, _n_pos(model, make_input(0, min(1, n_rows))))
    batch_size = check_positive_int(batch_size, "batch_size")
    # as few batches as batch_size allows, of equal size (196 rows at 64 -> 4 x 49, not 64+64+64+4)
    n_batches = -(-n_rows // batch_size)
    bounds = [round(i * n_rows / n_batches) for i in range(n_batches + 1)]
    desc = progress if isinstance(progress, str) else "patching"
    bar = tqdm(range(n_batches), desc=desc, disable=not progress or n_batches < 2, leave=False)
    outs = []
    kwargs = {} if stop_at_layer is None else {"stop_at_layer": stop_at_layer}
    current: dict[str, list[Callable]] = {}

    def dispatch(name: str) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor:
            for fn in current.get(name, ()):
                out = fn(act, hook)
                act = act if out is None else out
            return act

        return hook

    # each dispatcher enters its own `hooks(fwd_hooks=...)` context: the one way to add and remove hooks
    # that HookedRootModule (HookedViT) and TransformerLens' TransformerBridge share
    # (the bridge's `add_hook` takes no level, and its bare `hooks()` removes only what it added itself)
    with torch.inference_mode(), contextlib.ExitStack() as stack:  # removes them in reverse, even on error
        registered: set[str] = set()
        for i in bar:
            r0, r1 = bounds[i], bounds[i + 1]
            x = make_input(r0, r1)
            current.clear()
            for name, fn in make_hooks(r0, r1):
                if name not in registered:
                    stack.enter_context(model.hooks(fwd_hooks=[(name, dispatch(name))]))
                    registered.add(name)
                current.setdefault(name, []).append(fn)
            out = model(x, start_at_layer=start_layer, **kwargs) if start_layer is not None else model(x, **kwargs)
            outs.append(readout(out, r0, r1))
    return torch.cat(outs) if outs else torch.empty(0)


def cache_sources(model: HookedModel, sources: Tensor | dict[str, Tensor], hooks: Iterable[str]) -> dict[str, Tensor]:
    """The source activations at `hooks`: from one forward pass of the source inputs, or checked in a
    ready cache."""
    hooks = sorted(set(hooks))
    if isinstance(sources, dict) or hasattr(sources, "cache_dict"):
        cache = getattr(sources, "cache_dict", sources)
        missing = [h for h in hooks if h not in cache]
        if missing:
            raise KeyError(f"the source cache lacks {missing[:5]}")
        return {h: cache[h] for h in hooks}
    unknown = [h for h in hooks if h not in model.hook_dict]
    if unknown:
        raise ValueError(f"unknown hook name(s) {unknown[:5]} (model.hook_dict lists the hook names)")
    with torch.inference_mode():
        _, cache = model.run_with_cache(sources, names_filter=hooks)
    return {h: cache[h] for h in hooks}


def run_interventions(
    model: HookedModel,
    interventions: Sequence[Intervention],
    sources: Tensor | dict[str, Tensor],
    context: Tensor | Context,
    score_fn: ScoreFn,
    batch_size: int | None = None,
    pairs: Int[Tensor, " n"] | None = None,
    progress: bool | str = False,
) -> Tensor:
    """Run every intervention (one batch row each) and return the score per row, [n, ...].

    Args:
        model: a HookedViT or a TransformerLens `TransformerBridge` (anything with `hooks()`,
            `run_with_cache` and `forward(x, start_at_layer=..., stop_at_layer=...)`).
        interventions: the rows.
        sources: source inputs [n_sources, ...] (pixels / tokens) or a ready cache {hook: activation}.
        context: the runs the rows patch into: model inputs [n_contexts, ...], or a `Context` giving
            residual streams.
        score_fn: `score_fn(output, pair) -> [rows, ...]`; `pair` is each row's entry of `pairs`
            (default: the row's context index).
        batch_size: rows per forward pass (None: `default_batch_size`).
        pairs: each row's pair index, [n] integers (default: the row's context index).
    """
    if not interventions:
        raise ValueError("no interventions given")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if pairs is not None:
        pairs = torch.as_tensor(pairs)
        if pairs.dtype.is_floating_point or pairs.dtype == torch.bool or pairs.shape != (len(interventions),):
            raise ValueError(f"pairs must be one integer pair index per intervention [{len(interventions)}], got "
                             f"a {pairs.dtype} tensor of shape {tuple(pairs.shape)}")
    last = int(pairs.max()) if pairs is not None else max(as_int(iv.context, "an intervention's context")
                                                            for iv in interventions)
    check_score_pairs(score_fn, last + 1, exact=False)  # rows may use some of the pairs only
    n_layers = model.cfg.n_layers
    context = as_context(model, context)
    # each row starts at its own earliest patched block: group rows by start layer (stable order)
    row_start = [start_layer_for([w.hook for w in iv.writes], n_layers) for iv in interventions]
    if any(s is None for s in row_start) and context.inputs is None:
        raise ValueError("writes before the first block need the context as model inputs, not residual streams")
    key = [-1 if s is None else s for s in row_start]
    order = sorted(range(len(interventions)), key=key.__getitem__)
    interventions = [interventions[i] for i in order]
    hooks = {w.hook for iv in interventions for w in iv.writes}
    for name, x in (("sources", sources), ("context inputs", context.inputs)):
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"the {name} hold NaN or inf values; every value must be finite")
    if isinstance(sources, Tensor) and context.inputs is not None and sources.shape[1:] != context.inputs.shape[1:]:
        raise ValueError(
            f"the sources {tuple(sources.shape)} and the context inputs {tuple(context.inputs.shape)} differ in "
            f"shape (e.g. images of two sizes on a dynamic-size model): their positions would not align; "
            f"give both the same size"
        )
    source_cache = cache_sources(model, sources, hooks) if hooks else {}
    _check_positions_align(source_cache, context, row_start)
    device = next(model.parameters()).device
    writes = compile_interventions(interventions, source_cache, device)
    rows_ctx = torch.tensor([as_int(iv.context, "an intervention's context") for iv in interventions], device=device)
    if int(rows_ctx.max()) >= context.n or int(rows_ctx.min()) < 0:
        raise IndexError(f"interventions use context rows up to {int(rows_ctx.max())}; there are {context.n}")
    order_t = torch.tensor(order, device=device)
    pair = (rows_ctx if pairs is None else pairs.to(device)[order_t])

    def make_hooks(r0: int, r1: int) -> list[tuple[str, Callable]]:
        out = []
        for hook, w in writes.items():
            fn = _write_hook(w, source_cache[hook], r0, r1)
            if fn is not None:
                out.append((hook, fn))
        return out

    results = []
    sorted_keys = [key[i] for i in order]
    lo = 0
    while lo < len(interventions):
        hi = lo
        while hi < len(interventions) and sorted_keys[hi] == sorted_keys[lo]:
            hi += 1
        start = row_start[order[lo]]
        base = context.inputs if start is None else context.resid_pre(start)
        results.append(batched_runs(
            model,
            hi - lo,
            batch_size,
            start,
            make_input=lambda r0, r1, lo=lo, base=base: base[rows_ctx[lo + r0 : lo + r1]],
            make_hooks=lambda r0, r1, lo=lo: make_hooks(lo + r0, lo + r1),
            readout=lambda out, r0, r1, lo=lo: score_fn(out, pair[lo + r0 : lo + r1]),
            progress=progress,
        ))
        lo = hi
    values = torch.cat(results)
    return values[torch.argsort(order_t)]


def _check_positions_align(source_cache: dict[str, Tensor], context: Context, row_start: list[int | None]) -> None:
    """Refuse a source whose activations have another number of positions than the context's residual
    stream: writing position p of one into position p of the other would patch the wrong tokens."""
    starts = sorted({s for s in row_start if s is not None})
    if not starts or not source_cache:
        return
    n_pos = context.resid_pre(starts[0]).shape[1]
    for hook, act in source_cache.items():
        if hook_layer(hook) in (None, -1):  # embeddings (patches only) and the pooled head: no token axis to compare
            continue
        pos_axis, _ = hook_axes(hook)
        if act.shape[pos_axis] != n_pos:
            raise ValueError(
                f"the source's {hook} has {act.shape[pos_axis]} positions, the context's residual stream {n_pos} "
                f"(e.g. images of two sizes on a dynamic-size model): positions would not align; give both the "
                f"same size"
            )


@torch.inference_mode()
def unpatched_scores(model: HookedModel, context: Context, score_fn: ScoreFn, n_pairs: int, layer: int = 0) -> Tensor:
    """`score_fn` of the unpatched runs in `context`, per pair (pair i runs in context row min(i, n - 1)):
    one forward pass of the context's rows from block `layer`, the scores every patched row of a pair is
    compared with."""
    logits = model(context.resid_pre(layer), start_at_layer=layer)
    pairs = torch.arange(n_pairs, device=logits.device)
    return score_fn(logits[pairs.clamp(max=context.n - 1)], pairs)
