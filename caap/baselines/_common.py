"""Helpers the baseline methods share: gradients whatever the caller's autograd mode, the target score,
the readout row of attention matrices, reference pixel values, and channel reduction.

Token conventions (see `hooked_vit.model`): prefix tokens first (class token, register tokens,
distillation token), then the patches row-major. Every map is over the patch tokens only.

Readout ("the class token's row"). Attention-matrix methods read the row of the token the head reads:
- `readout="auto"` (default): the class token (position 0) when the model pools with its class token
  (`pooling="token"`, which includes DeiT distilled models); otherwise the mean of the rows of the
  tokens the head pools over (the patches, and the prefix tokens too when `pool_include_prefix`).
  For "max"/"avgmax" pooling the uniform mean is an approximation of which rows the head reads.
- `readout="class"`: position 0 (an error where the model has no class token).
- `readout="pooled"`: the rows the head actually pools: for a distilled model the mean of the class and
  the distillation token rows (the two heads are averaged), else as "auto".
Register and distillation tokens take part in the propagation like any token (attention flows
through them) but never get a map entry: their columns are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.targets import Score, class_score
from hooked_vit import HookedViT, act_name
from hooked_vit.checks import check_indices
from hooked_vit.preprocess import constant_image

Readout = Literal["auto", "class", "pooled"]
BASELINE_SCORES = ("logit", "prob", "log_prob")
"""The scores (`caap.targets.Score`) a baseline method may differentiate or compare."""
READOUTS = ("auto", "class", "pooled")


@contextmanager
def grad_mode() -> Iterator[None]:
    """Autograd on, whatever the caller's mode (`torch.no_grad()` or `torch.inference_mode()`)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def leaf_input(pixels: Tensor) -> Tensor:
    """A fresh leaf copy of `pixels` that requires grad (so the graph exists even where the model's
    parameters are frozen); must be called inside `grad_mode()`."""
    return pixels.detach().clone().requires_grad_(True)


def check_choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, accepted))}")


def readout_weights(
    model: HookedViT, n_tokens: int, readout: Readout = "auto", device=None, dtype=None
) -> Float[Tensor, " pos"]:
    """Weights over the query rows that the readout reads (see the module docstring)."""
    check_choice("readout", readout, READOUTS)
    if readout == "class":
        if not model.cfg.class_token:
            raise ValueError(
                "readout='class' needs a class token; this model has none (use readout='auto' or 'pooled')"
            )
        w = torch.zeros(n_tokens)
        w[0] = 1.0
    else:  # the model's own pooling (hooked_vit: HookedViT.pool_weights)
        groups = model.pool_weights(n_tokens, max_as_mean=True)
        w = groups.mean(dim=0) if readout == "pooled" else groups[0]
    return w.to(device=device, dtype=dtype or torch.float32)


def patch_slice(model: HookedViT) -> slice:
    """The token positions of the patches (prefix tokens come first)."""
    return slice(model.cfg.n_prefix_tokens, None)


REFERENCE_HELP = (
    "'zero' (zeros in normalised space: the normalisation mean colour), 'black' (pixel value 0 before "
    "normalisation), 'mean' (each image's own per-channel mean), a float (in normalised space), or a tensor "
    "broadcastable to the pixels"
)


def check_reference(reference: object) -> None:
    """A ValueError unless `reference` is a name `reference_pixels` knows, a number or a tensor."""
    if isinstance(reference, str) and reference not in ("zero", "black", "mean"):
        raise ValueError(f"reference={reference!r} is not accepted; use {REFERENCE_HELP}")


def reference_pixels(
    model: HookedViT, pixels: Float[Tensor, "batch chan H W"], reference: str | float | Tensor
) -> Float[Tensor, "batch chan H W"]:
    """The reference input that ablated / interpolated pixels take, expanded to `pixels`' shape."""
    if isinstance(reference, Tensor):
        return reference.to(device=pixels.device, dtype=pixels.dtype).expand_as(pixels)
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return torch.full_like(pixels, float(reference))
    if reference == "zero":
        return torch.zeros_like(pixels)
    if reference == "black":
        b, c, h, w = pixels.shape
        return constant_image(0.0, (h, w), model.data_config, b, c, pixels.device, pixels.dtype)
    if reference == "mean":
        return pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
    raise ValueError(f"reference={reference!r} is not accepted; use {REFERENCE_HELP}")


def reduce_channels(attr: Float[Tensor, "batch chan H W"], abs: bool) -> Float[Tensor, "batch H W"]:
    """Channel reduction of a pixel attribution: the sum over channels, or with `abs=True` the sum of
    absolute values over channels (the grayscale visualisation of Smilkov et al.'s saliency library)."""
    return attr.abs().sum(dim=1) if abs else attr.sum(dim=1)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def finish(x: Tensor, device: torch.device) -> Tensor:
    """Detached float32 on the input's device."""
    return x.detach().to(device=device, dtype=torch.float32)


def attention_names(model: HookedViT, layers: list[int], component: str = "pattern") -> list[str]:
    return [act_name(component, layer) for layer in layers]


def layer_list(model: HookedViT, layers: int | list[int] | None, name: str = "layers") -> list[int]:
    """Normalise a layer selection (None = every layer; one integer or several, of any integral type;
    negative indices count from the end)."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    out = check_indices(layers, n, name)
    if not out:
        raise ValueError(f"{name} is empty")
    return sorted(set(out))


def attention_with_grads(
    model: HookedViT,
    pixels: Float[Tensor, "batch chan H W"],
    targets: Int[Tensor, " batch"],
    layers: list[int],
    score: Score = "logit",
) -> tuple[list[Tensor], list[Tensor]]:
    """The attention patterns [batch, head, q, k] of `layers` and the gradient of each image's target
    score with respect to them, by `torch.autograd.grad` (no `.grad` left on any parameter).

    The images of a batch do not interact, so the gradient of the summed scores gives each image the
    gradient of its own target."""
    names = attention_names(model, layers)
    store: dict[str, Tensor] = {}

    def save(pattern: Tensor, hook) -> None:
        store[hook.name] = pattern

    with grad_mode():
        x, targets = leaf_input(pixels), targets.clone()  # clones: callers may be in inference mode
        with model.hooks(fwd_hooks=[(n, save) for n in names]):
            logits = model(x)
        total = class_score(logits, targets, score).sum()
        patterns = [store[n] for n in names]
        grads = torch.autograd.grad(total, patterns)
    return [p.detach() for p in patterns], [g.detach() for g in grads]


def attention_patterns(model: HookedViT, pixels: Tensor, layers: list[int]) -> list[Tensor]:
    """The attention patterns [batch, head, q, k] of `layers`, without gradients."""
    names = attention_names(model, layers)
    store: dict[str, Tensor] = {}

    def save(pattern: Tensor, hook) -> None:
        store[hook.name] = pattern.detach()

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, save) for n in names]):
        model(pixels)
    return [store[n] for n in names]


def input_gradients(
    model: HookedViT, x: Float[Tensor, "rows chan H W"], targets: Int[Tensor, " rows"], score: Score = "logit"
) -> Float[Tensor, "rows chan H W"]:
    """d(row's target score) / d(row's pixels), for every row at once."""
    with grad_mode():
        xi, targets = leaf_input(x), targets.clone()  # clones: callers may be in inference mode
        total = class_score(model(xi), targets, score).sum()
        (g,) = torch.autograd.grad(total, xi)
    return g.detach()


def batched_scores(model: HookedViT, x: Tensor, targets: Tensor, score: Score) -> Tensor:
    with torch.no_grad():
        return class_score(model(x), targets, score)
