"""bf16 matrix products relative to a reference run (`delta_bf16`).

Activation patching reads small differences between runs that share most of their activations: a
patched run is its unpatched context run plus the patch's effect. Rounding the activations themselves
to bfloat16 (what `torch.autocast` does) adds an error proportional to the activations, which can be
as large as the effect being measured. Written relative to the reference run, a linear layer is

    y = y_ref + W (x - x_ref),

exact in real arithmetic; with only the product `W (x - x_ref)` in bf16 (and `y_ref`, `x_ref` kept in
fp32), the rounding error scales with how far the run moved from the reference, not with the
activations. Tokens that did not change give exactly `y_ref`. Attention, LayerNorm, the activation
function, the residual stream and the head run in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_vit.model import HookedViT

__all__ = ["DeltaLinear", "delta_bf16"]


class DeltaLinear(nn.Module):
    """A linear layer computed relative to a reference run: the first call (recording) runs the layer in
    fp32 and keeps its input and output per token count; later calls return `y_ref + W (x - x_ref)` with
    the product in bf16 and the sum in fp32 (`x` broadcasts against the one-row reference). An input
    whose token count was not recorded raises KeyError (the reference must take the same forward path)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.w16 = linear.weight.detach().to(torch.bfloat16)
        self.reference: dict[int, tuple[Tensor, Tensor]] = {}
        self.recording = True

    @property
    def weight(self) -> Tensor:  # `Attention.forward_queries` slices the weights (the class-token path: fp32)
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def forward(self, x: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos d_out"]:
        if self.recording:
            y = self.linear(x)
            self.reference[x.shape[-2]] = (x, y)
            return y
        if x.shape[-2] not in self.reference:
            raise KeyError(f"DeltaLinear: no reference for inputs of {x.shape[-2]} tokens (recorded: "
                           f"{sorted(self.reference)}); the reference run must take the same forward path")
        x_ref, y_ref = self.reference[x.shape[-2]]
        return F.linear((x - x_ref).to(torch.bfloat16), self.w16).float().add_(y_ref)


@contextlib.contextmanager
def delta_bf16(
    model: HookedViT, resid_ref: Float[Tensor, "1 pos d_model"], start: int, hooks: Sequence[str] = ()
) -> Iterator[HookedViT]:
    """Within the context, every linear layer of blocks `start`.. (qkv, attention output, MLP in (both
    branches of a gated MLP) and out) is a `DeltaLinear` whose reference is the run from `resid_ref` (the residual stream entering
    block `start`, one row, fp32); runs from block `start` then compute their products in bf16 relative
    to it. `hooks`: the hook points the later runs will hook; the reference run hooks them too (identity
    hooks), so that it takes the same forward path (HookedViT skips work nothing observes, e.g. the last
    block's other tokens). The model's own layers are back in place on exit, even after an error."""
    if resid_ref.ndim != 3 or resid_ref.shape[0] != 1:
        raise ValueError(f"resid_ref must be one row [1, pos, d_model], got {tuple(resid_ref.shape)}")
    swapped: list[tuple[nn.Module, str, DeltaLinear]] = []
    try:
        for block in model.blocks[start:]:
            mlp = [name for name in ("fc1", "fc1_g", "fc1_x", "fc2") if isinstance(getattr(block.mlp, name, None), nn.Linear)]
            for owner, name in ((block.attn, "qkv"), (block.attn, "proj"), *((block.mlp, n) for n in mlp)):
                wrapper = DeltaLinear(getattr(owner, name))
                setattr(owner, name, wrapper)
                swapped.append((owner, name, wrapper))
        with torch.inference_mode(), model.hooks(fwd_hooks=[(h, _identity) for h in hooks]):
            model(resid_ref.float(), start_at_layer=start)
        for _, _, wrapper in swapped:
            wrapper.recording = False
        yield model
    finally:
        for owner, name, wrapper in swapped:
            setattr(owner, name, wrapper.linear)


def _identity(act: Tensor, hook: object) -> Tensor:
    return act
