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

bf16 pays only where the hardware multiplies bf16 matrices natively: CPUs with the `avx512_bf16` or
`amx_bf16` flags (x86) or `bf16` (Arm), GPUs of compute capability 8.0 and later. Elsewhere torch
emulates the products and they run far slower than fp32 (on an AVX2-only AMD EPYC, about 1 GFLOP/s
against about 100: docs/results/bf16.md). `bf16_support` tells which (the CPU flags where the system lists
them, else a short timed product, once per process) and `choose_precision` falls back to fp32 there, with
a warning, unless asked not to (`allow_slow_bf16=True`).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_vit.model import HookedViT

__all__ = ["Bf16Support", "DeltaLinear", "bf16_support", "choose_precision", "delta_bf16"]


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


# ------------------------------------------------------------------------------------ native bf16 or not
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 CPU flags of native bf16 matrix products (Arm's is `bf16`)."""

PROBE_SLOWDOWN = 2.0
"""The timed probe calls bf16 native when a bf16 product takes at most this many times fp32's time (native
bf16 takes less than fp32; emulated bf16 tens of times more)."""


class Bf16Support(NamedTuple):
    """Whether a device multiplies bf16 matrices natively, and how that was found (for a message)."""

    native: bool
    reason: str


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`), or None where the system
    does not list them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _bf16_probe(n: int = 256, repeats: int = 3) -> float:
    """The time of an n x n bf16 matrix product over an fp32 one on the CPU (best of `repeats` each)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)

    def best(x: Tensor, y: Tensor) -> float:
        torch.mm(x, y)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) / max(best(a, b), 1e-9)


@functools.cache
def _support(device_type: str, index: int | None) -> Bf16Support:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return Bf16Support(True, "not checked: no CUDA device in this process")
        major, minor = torch.cuda.get_device_capability(index)
        return Bf16Support(major >= 8, f"compute capability {major}.{minor}" +
                           ("" if major >= 8 else "; native bf16 needs 8.0 or later"))
    if device_type != "cpu":
        return Bf16Support(True, f"not checked on a {device_type} device")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    machine = platform.machine().lower()
    if flags is not None and machine in ("x86_64", "amd64", "i686", "x86"):
        found = [f for f in BF16_CPU_FLAGS if f in flags]
        if found:
            return Bf16Support(True, f"{' and '.join(found)} flag")
        return Bf16Support(False, f"no {' or '.join(BF16_CPU_FLAGS)} flag; torch's CPU capability {capability}")
    if flags is not None and machine in ("aarch64", "arm64"):
        return Bf16Support("bf16" in flags, "bf16 flag" if "bf16" in flags else "no bf16 flag")
    ratio = _bf16_probe()
    return Bf16Support(ratio <= PROBE_SLOWDOWN, f"a bf16 matrix product took {ratio:.1f}x the time of fp32; "
                                                f"torch's CPU capability {capability}")


def bf16_support(device: torch.device | str = "cpu") -> Bf16Support:
    """Whether `device` multiplies bf16 matrices natively: a GPU by its compute capability; a CPU by its
    flags where the system lists them (x86: `avx512_bf16` or `amx_bf16`; Arm: `bf16`), else by timing a
    256 x 256 product in bf16 against fp32 (native: at most `PROBE_SLOWDOWN` times slower). Found once per
    device and process."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return _support(d.type, d.index)


def choose_precision(precision: str, device: torch.device | str = "cpu", allow_slow_bf16: bool = False) -> str:
    """The precision to run: `precision` itself, except a bf16 one ("bf16", "bf16_delta") on a device
    without native bf16 matrix products (`bf16_support`), which runs "fp32" instead, with one warning line
    saying why, unless `allow_slow_bf16` (e.g. to measure it, or to check a bf16 result on any machine)."""
    if not precision.startswith("bf16") or allow_slow_bf16:
        return precision
    support = bf16_support(device)
    if support.native:
        return precision
    kind = "GPU" if torch.device(device).type == "cuda" else torch.device(device).type.upper()
    warnings.warn(f"precision {precision!r} runs as fp32: bf16 matrix products are not native on this {kind} "
                  f"({support.reason}) and run far slower than fp32; pass allow_slow_bf16=True (command line: "
                  f"--allow-slow-bf16) to run {precision} anyway", stacklevel=2)
    return "fp32"
