"""Metrics for patching runs: `metric(output, pair) -> [rows]` (or [rows, k] for several classes).

`output` is the model's output for a batch of rows: logits [rows, n_classes] for a ViT, or
[rows, seq, vocab] for a language model (`pos` picks the position, default the last). `pair` gives each
row's pair index, used to look up that pair's classes / tokens.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from caap.patching.engine import Metric
from caap.targets import class_score


def _logits_at(output: Tensor, pos: int) -> Tensor:
    return output if output.ndim == 2 else output[:, pos]


def _per_pair(classes: Int[Tensor, " n_pairs *k"] | int, pair: Tensor) -> Tensor:
    c = torch.as_tensor(classes, device=pair.device)
    c = c.expand(int(pair.max()) + 1) if c.ndim == 0 else c
    return c[pair]


def logit_metric(classes: Int[Tensor, " n_pairs *k"] | int, pos: int = -1) -> Metric:
    """The logit of each pair's class (several per pair: [n_pairs, k] -> [rows, k])."""

    def metric(output: Tensor, pair: Tensor) -> Tensor:
        return class_score(_logits_at(output, pos), _per_pair(classes, pair), "logit")

    return metric


def prob_metric(classes: Int[Tensor, " n_pairs *k"] | int, pos: int = -1) -> Metric:
    """The softmax probability of each pair's class."""

    def metric(output: Tensor, pair: Tensor) -> Tensor:
        return class_score(_logits_at(output, pos), _per_pair(classes, pair), "prob")

    return metric


def logit_diff_metric(
    correct: Int[Tensor, " n_pairs"] | int, incorrect: Int[Tensor, " n_pairs"] | int, pos: int = -1
) -> Metric:
    """logit(correct) - logit(incorrect) per pair (e.g. answer tokens of a language model)."""

    def metric(output: Tensor, pair: Tensor) -> Tensor:
        logits = _logits_at(output, pos)
        return class_score(logits, _per_pair(correct, pair)) - class_score(logits, _per_pair(incorrect, pair))

    return metric
