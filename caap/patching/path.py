"""Exact path patching (Wang et al. 2022, "Interpretability in the Wild"; Goldowsky-Dill et al. 2023).

The effect of sender heads on receivers, and through nothing else, in two passes:

1. Run the context with each sender head's output (`hook_z`) taken from the source and every other
   head's output frozen to its context value (MLPs recompute, as in Wang et al.; `freeze_mlps=True`
   freezes them too). Record the receivers' inputs: receiver heads' q, k or v (or the logits, when
   the receiver is the logits, which ends the procedure here).
2. Run the context with only the receivers' inputs replaced by the recorded ones; read the score.

Both passes are batched over senders (one row per (pair, sender)), start at the earliest layer that
can change, and use the engine's core loop.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from caap.patching.engine import HookedModel, InputContext, ScoreFn, batched_runs, cache_sources, check_score_pairs
from hooked_vit.checks import as_int, check_positive_int, describe
from hooked_vit.names import act_name

Head = tuple[int, int]


def path_patch(
    model: HookedModel,
    sources: Tensor,
    contexts: Tensor,
    score_fn: ScoreFn,
    senders: Sequence[Head] | None = None,
    receivers: Sequence[Head] | Literal["logits"] = "logits",
    receiver_input: str | Sequence[str] = "q",
    freeze_mlps: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
) -> Tensor:
    """Path-patching effect of each sender head on the receivers.

    Args:
        sources, contexts: inputs [n_pairs, ...] (pair i = source i into context i; TransformerLens'
            clean and corrupted runs).
        score_fn: `score_fn(output, pair) -> [rows]` (`caap.patching.scores`).
        senders: (layer, head) pairs; default every head.
        receivers: (layer, head) pairs whose `receiver_input` ("q", "k", "v", or several) takes the
            senders' effect, or "logits" for the direct path to the output.
        freeze_mlps: freeze MLP outputs in pass 1 as well as heads.

    Returns:
        [n_pairs, n_senders]: the score after patching each sender's path.
    """
    cfg = model.cfg
    if sources.shape[0] != contexts.shape[0]:
        raise ValueError(f"{sources.shape[0]} sources and {contexts.shape[0]} contexts: give one source per context")
    check_score_pairs(score_fn, sources.shape[0])
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if senders is None:
        senders = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    else:
        senders = [check_head(cfg, item, "sender") for item in senders]
    if not senders:
        raise ValueError("no sender heads given")
    kinds = [receiver_input] if isinstance(receiver_input, str) else list(receiver_input)
    if any(k not in ("q", "k", "v") for k in kinds):
        raise ValueError(f"receiver_input must be 'q', 'k', 'v' or a list of them; got {receiver_input!r}")
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise ValueError(f"receivers must be (layer, head) pairs or 'logits'; got {receivers!r}")
    kv_heads = getattr(cfg, "n_key_value_heads", None)
    if not to_logits and kv_heads and kv_heads != cfg.n_heads and any(k in ("k", "v") for k in kinds):
        raise ValueError(
            f"receiver_input {receiver_input!r}: this model shares keys and values between query heads "
            f"(n_key_value_heads={kv_heads}, n_heads={cfg.n_heads}), so a receiver's k or v is not its own; "
            f"path patching supports receiver_input='q' or receivers='logits' here"
        )
    if not to_logits:
        receivers = [check_head(cfg, item, "receiver") for item in receivers]
        if not receivers:
            raise ValueError("no receiver heads given")

    n_pairs, n_send = sources.shape[0], len(senders)
    n_rows = n_pairs * n_send
    row_pair = torch.arange(n_rows, device=sources.device) // n_send
    row_sender = torch.arange(n_rows, device=sources.device) % n_send
    first = min(layer for layer, _ in senders)
    last = cfg.n_layers - 1 if to_logits else max(layer for layer, _ in receivers)  # type: ignore[union-attr]
    z_hooks = [act_name("z", layer) for layer in range(first, last + 1)]
    mlp_hooks = [act_name("mlp_out", layer) for layer in range(first, last + 1)] if freeze_mlps else []
    src = cache_sources(model, sources, z_hooks)
    ctx = cache_sources(model, contexts, z_hooks + mlp_hooks)
    context = InputContext(model, contexts)
    resid_first = context.resid_pre(first)

    sender_layer = torch.tensor([layer for layer, _ in senders], device=sources.device)[row_sender]
    sender_head = torch.tensor([head for _, head in senders], device=sources.device)[row_sender]

    def freeze_hooks(r0: int, r1: int) -> list[tuple[str, Callable]]:
        pair = row_pair[r0:r1]
        hooks: list[tuple[str, Callable]] = []
        for layer in range(first, last + 1):
            name = act_name("z", layer)
            rows = (sender_layer[r0:r1] == layer).nonzero().flatten()
            hooks.append((name, _freeze_z(ctx[name], src[name], pair, rows, sender_head[r0:r1][rows])))
        for name in mlp_hooks:
            hooks.append((name, _replace(ctx[name], pair)))
        return hooks

    if to_logits:
        return batched_runs(
            model, n_rows, batch_size, first,
            make_input=lambda r0, r1: resid_first[row_pair[r0:r1]],
            make_hooks=freeze_hooks,
            readout=lambda out, r0, r1: score_fn(out, row_pair[r0:r1]),
            progress="path patching" if progress else False,
        ).view(n_pairs, n_send)

    # pass 1: record the receivers' inputs
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in receivers:  # type: ignore[union-attr]
        by_layer[layer].append(head)
    recv_hooks = [(act_name(k, layer), heads) for layer, heads in sorted(by_layer.items()) for k in kinds]
    captured: dict[str, Tensor] = {}

    def pass1_hooks(r0: int, r1: int) -> list[tuple[str, Callable]]:
        hooks = freeze_hooks(r0, r1)
        for name, heads in recv_hooks:
            hooks.append((name, _capture(captured, name, heads)))
        return hooks

    def pass1_readout(_: Tensor, r0: int, r1: int) -> Tensor:
        return torch.cat([captured[name].flatten(1) for name, _ in recv_hooks], dim=1)

    recorded = batched_runs(
        model, n_rows, batch_size, first,
        make_input=lambda r0, r1: resid_first[row_pair[r0:r1]],
        make_hooks=pass1_hooks,
        readout=pass1_readout,
        stop_at_layer=last + 1,
        progress="path patching (1/2)" if progress else False,
    )

    # pass 2: only the receivers' inputs change
    first_recv = min(by_layer)
    resid_recv = context.resid_pre(first_recv)
    sizes = [captured[name].flatten(1).shape[1] for name, _ in recv_hooks]

    def pass2_hooks(r0: int, r1: int) -> list[tuple[str, Callable]]:
        parts = recorded[r0:r1].split(sizes, dim=1)
        return [(name, _overwrite_heads(part, heads)) for (name, heads), part in zip(recv_hooks, parts)]

    return batched_runs(
        model, n_rows, batch_size, first_recv,
        make_input=lambda r0, r1: resid_recv[row_pair[r0:r1]],
        make_hooks=pass2_hooks,
        readout=lambda out, r0, r1: score_fn(out, row_pair[r0:r1]),
        progress="path patching (2/2)" if progress else False,
    ).view(n_pairs, n_send)


def check_head(cfg: Any, item: Any, what: str = "head") -> Head:
    """`item` as a (layer, head) pair of Python ints: two integers (any integral type: Python, numpy, 0-d
    tensors) naming a head of the model whose config is `cfg`; a ValueError says what is wrong (`what`
    names the argument: "sender", "receiver", ...)."""
    try:
        layer, head = item
    except (TypeError, ValueError):
        raise ValueError(f"each {what} must be a (layer, head) pair, got {describe(item)}") from None
    layer, head = as_int(layer, f"a {what}'s layer"), as_int(head, f"a {what}'s head")
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise ValueError(f"head ({layer}, {head}) is out of range: layers 0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}")
    return layer, head


def _freeze_z(ctx_z: Tensor, src_z: Tensor, pair: Tensor, rows: Tensor, heads: Tensor) -> Callable:
    """Every head's z := the context's; the senders' rows get the source's z for their head."""
    values = ctx_z[pair].clone()
    if len(rows):
        values[rows, :, heads] = src_z[pair[rows], :, heads]

    def hook(act: Tensor, hook: Any) -> Tensor:
        return values.to(act.dtype)

    return hook


def _replace(ctx: Tensor, pair: Tensor) -> Callable:
    values = ctx[pair]

    def hook(act: Tensor, hook: Any) -> Tensor:
        return values.to(act.dtype)

    return hook


def _capture(store: dict[str, Tensor], name: str, heads: list[int]) -> Callable:
    def hook(act: Tensor, hook: Any) -> None:
        store[name] = act[:, :, heads].clone()

    return hook


def _overwrite_heads(flat: Tensor, heads: list[int]) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        act[:, :, heads] = flat.view(act.shape[0], act.shape[1], len(heads), act.shape[3]).to(act.dtype)
        return act

    return hook
