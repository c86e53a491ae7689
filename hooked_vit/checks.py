"""Checks of integer arguments, shared by `hooked_vit` and `caap`: layers, heads, positions, batch sizes,
steps, numbers of masks or samples.

Every integral type counts as an integer: a Python `int`, a numpy integer (`np.int64(8)`, a 0-d integer
array) and a 0-d integer tensor (`torch.tensor(8)`); each is returned as a plain Python `int`. Booleans
(`True` is not the layer 1), floats (`2.5`, and `2.0` too: a float where a count belongs is a mistake
upstream), strings and tensors of more than one value are refused, and the message names the type
received. The errors are `ValueError`s, as every refusal of a bad argument in this package, and also:

- `ArgumentTypeError` is a `TypeError` too (the value is not an integer at all),
- `IndexRangeError` is an `IndexError` too (an integer index outside its axis: a layer, head, position).

    from hooked_vit.checks import check_index, check_layer_range, check_positive_int
    batch_size = check_positive_int(batch_size, "batch_size")       # >= 1
    layer = check_index(layer, model.cfg.n_layers, "layer")          # -n..n-1 -> 0..n-1
    start, end = check_layer_range(layers, model.cfg.n_layers)       # 0 <= start <= end < n
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = [
    "ArgumentTypeError",
    "IndexRangeError",
    "as_int",
    "check_index",
    "check_indices",
    "check_int",
    "check_layer_range",
    "check_positive_int",
    "describe",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument that must be an integer is of another type (a float, a bool, a string, ...)."""


class IndexRangeError(IndexError, ValueError):
    """An integer index (a layer, a head, a position, ...) outside the axis it indexes."""


def describe(value: Any) -> str:
    """The type and value of `value`, for a message: "float 2.5", "bool True", "a torch.float32 tensor of
    shape (3,)"."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a numpy {value.dtype} array of shape {value.shape}"
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    text = str(value) if isinstance(value, np.generic) else repr(value)  # numpy 2's repr: np.float64(7.0)
    return f"{name} {text if len(text) <= 40 else text[:37] + '...'}"


def as_int(value: Any, name: str) -> int:
    """`value` as a Python int: a Python int, a numpy integer (or 0-d integer array) or a 0-d integer
    tensor; anything else (bool, float, string, a tensor of several values) raises `ArgumentTypeError`
    naming `name` and the type received."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be an integer, got {describe(value)}")
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must be an integer (a 0-d integer tensor at most), got {describe(value)}")
        return int(value.item())
    if isinstance(value, np.ndarray) and (value.ndim != 0 or value.dtype.kind not in "iu"):
        raise ArgumentTypeError(f"{name} must be an integer (a 0-d integer array at most), got {describe(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an integer, got {describe(value)}") from None


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """`as_int(value)`, checked to lie in `low..high` (inclusive; None: unbounded): a ValueError that
    names the accepted range otherwise."""
    v = as_int(value, name)
    if (low is not None and v < low) or (high is not None and v > high):
        if high is None:
            accepted = f"at least {low}"
        elif low is None:
            accepted = f"at most {high}"
        else:
            accepted = f"in {low}..{high}"
        raise ValueError(f"{name} must be {accepted}, got {v}")
    return v


def check_positive_int(value: Any, name: str) -> int:
    """A count, a size or a number of steps: an integer >= 1."""
    return check_int(value, name, low=1)


def check_index(value: Any, n: int, name: str, where: str = "") -> int:
    """An index into an axis of length `n`, from the end when negative (Python's convention): returns it in
    0..n-1. `IndexRangeError` names the accepted range; `where` completes the message (" for 'blocks.3...'")."""
    v = as_int(value, name)
    if not -n <= v < n:
        accepted = f"{-n}..{n - 1}" if n > 0 else "none (the axis is empty)"
        raise IndexRangeError(f"{name} {v} is out of range{where}: accepted {accepted}")
    return v % n


def check_indices(values: Any, n: int, name: str) -> list[int]:
    """Several indices (a sequence, a 1-d integer tensor or array, or one integer) into an axis of length
    `n`, each as `check_index` (named `name` in a message)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim > 1:
            raise ValueError(f"{name} must be one index or a 1-d list of indices, got {describe(values)}")
        values = list(values.reshape(-1))
    elif not isinstance(values, Iterable) or isinstance(values, (str, bytes)):
        values = [values]
    return [check_index(v, n, name) for v in values]


def check_layer_range(layers: Any, n_layers: int, name: str = "layers") -> tuple[int, int]:
    """`(start, end)`, inclusive 0-based block indices with 0 <= start <= end <= n_layers - 1: two integers
    of any integral type (a tuple, a list, a 1-d array or tensor of two)."""
    if isinstance(layers, (torch.Tensor, np.ndarray)):
        items = list(layers.reshape(-1)) if layers.ndim == 1 else None
    elif isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        items = list(layers)
    else:
        items = None
    if items is None or len(items) != 2:
        raise ValueError(f"{name} must be a pair (start, end) of block indices, got {describe(layers)}")
    start, end = as_int(items[0], f"{name}[0] (start)"), as_int(items[1], f"{name}[1] (end)")
    if not 0 <= start <= end < n_layers:
        raise ValueError(
            f"{name}=({start}, {end}) is not a valid range: need 0 <= start <= end <= {n_layers - 1} "
            f"(inclusive block indices of this {n_layers}-layer model)"
        )
    return start, end
