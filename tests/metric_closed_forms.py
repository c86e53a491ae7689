"""Closed forms the metric tests compare against (shared by tests/test_metrics*.py)."""

from __future__ import annotations

import math

import torch


def trapz(y: list[float], x: list[float]) -> float:
    """The trapezoid rule, written out."""
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(y) - 1))


def partial_sums(values: torch.Tensor, descending: bool = True) -> list[float]:
    """[0, s_1, s_1 + s_2, ...] over the values sorted."""
    v = sorted(values.tolist(), reverse=descending)
    out = [0.0]
    for x in v:
        out.append(out[-1] + x)
    return out


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))
