"""Score functions for patching runs (`ScoreFn`): `score_fn(output, pair) -> [rows]` (or [rows, k] for several
classes), each reading `caap.targets.class_score` off the output.

`output` is the model's output for a batch of rows: logits [rows, n_classes] for a ViT, or
[rows, seq, vocab] for a language model (`pos` picks the position, default the last). `pair` gives each
row's pair index, used to look up that pair's classes / tokens.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from caap.patching.engine import ScoreFn
from caap.targets import class_score


def _logits_at(output: Tensor, pos: int) -> Tensor:
    return output if output.ndim == 2 else output[:, pos]


def _per_pair(classes: Int[Tensor, " n_pairs *k"] | int, pair: Tensor) -> Tensor:
    c = torch.as_tensor(classes, device=pair.device)
    c = c.expand(int(pair.max()) + 1) if c.ndim == 0 else c
    return c[pair]


def logit_score(classes: Int[Tensor, " n_pairs *k"] | int, pos: int = -1) -> ScoreFn:
    """The logit of each pair's class (several per pair: [n_pairs, k] -> [rows, k])."""

    def score_fn(output: Tensor, pair: Tensor) -> Tensor:
        return class_score(_logits_at(output, pos), _per_pair(classes, pair), "logit")

    return score_fn


def prob_score(classes: Int[Tensor, " n_pairs *k"] | int, pos: int = -1) -> ScoreFn:
    """The softmax probability of each pair's class."""

    def score_fn(output: Tensor, pair: Tensor) -> Tensor:
        return class_score(_logits_at(output, pos), _per_pair(classes, pair), "prob")

    return score_fn


def logit_diff_score(
    correct: Int[Tensor, " n_pairs"] | int, incorrect: Int[Tensor, " n_pairs"] | int, pos: int = -1
) -> ScoreFn:
    """logit(correct) - logit(incorrect) per pair (e.g. answer tokens of a language model)."""

    def score_fn(output: Tensor, pair: Tensor) -> Tensor:
        logits = _logits_at(output, pos)
        return class_score(logits, _per_pair(correct, pair)) - class_score(logits, _per_pair(incorrect, pair))

    return score_fn
