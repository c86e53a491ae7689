"""Score functions for patching runs (`ScoreFn`): `score_fn(output, pair) -> [rows]` (or [rows, k] for several
classes), each reading `caap.targets.class_score` off the output.

`output` is the model's output for a batch of rows: logits [rows, n_classes] for a ViT, or
[rows, seq, vocab] for a language model (`pos` picks the position, default the last). `pair` gives each
row's pair index, used to look up that pair's classes / tokens.

Classes are one per pair (an integer tensor or sequence [n_pairs], or [n_pairs, k]) or one for every pair
(an int). A score function built for n pairs carries `n_pairs = n` (None for one class for all): the
sweeps refuse to use it with another number of pairs, and the function itself refuses a pair index
beyond them, with both counts in the message (a ValueError).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from caap.patching.engine import ScoreFn
from caap.targets import class_score
from hooked_vit.checks import as_int, describe


def _classes(classes: Any, name: str) -> Tensor:
    """The classes as an integer tensor: one for all pairs (0-d) or one row per pair."""
    if not isinstance(classes, (Tensor, np.ndarray, list, tuple)):
        return torch.tensor(as_int(classes, name))
    c = torch.as_tensor(classes)
    if c.ndim == 0:
        return torch.tensor(as_int(c, name))
    if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
        raise ValueError(f"{name} must be class (or token) indices: an int, or one integer per pair; got {describe(c)}")
    if c.ndim > 2 or c.shape[0] == 0:
        raise ValueError(f"{name} must be an int, [n_pairs] or [n_pairs, k] indices; got shape {tuple(c.shape)}")
    return c


def _n_pairs(*classes: Tensor) -> int | None:
    sizes = {c.shape[0] for c in classes if c.ndim}
    if len(sizes) > 1:
        raise ValueError(f"the classes are given for different numbers of pairs ({sorted(sizes)}); give as many of each")
    return sizes.pop() if sizes else None


def _per_pair(c: Tensor, pair: Tensor, n_pairs: int | None) -> Tensor:
    c = c.to(pair.device)
    if c.ndim == 0:
        return c.expand(pair.shape[0])
    if pair.numel() and int(pair.max()) >= c.shape[0]:
        raise ValueError(f"the score function was built for {n_pairs} pair{'s' if n_pairs != 1 else ''} and is used "
                         f"with {int(pair.max()) + 1} pairs (pair index {int(pair.max())}): build it with one class "
                         f"(or token) per pair, or one for all")
    return c[pair]


def _logits_at(output: Tensor, pos: int) -> Tensor:
    return output if output.ndim == 2 else output[:, pos]


def logit_score(classes: Int[Tensor, " n_pairs *k"] | int, pos: int = -1) -> ScoreFn:
    """The logit of each pair's class (several per pair: [n_pairs, k] -> [rows, k])."""
    c = _classes(classes, "classes")
    n = _n_pairs(c)
    pos = as_int(pos, "pos")

    def score_fn(output: Tensor, pair: Tensor) -> Tensor:
        return class_score(_logits_at(output, pos), _per_pair(c, pair, n), "logit")

    score_fn.n_pairs = n  # type: ignore[attr-defined]
    return score_fn


def prob_score(classes: Int[Tensor, " n_pairs *k"] | int, pos: int = -1) -> ScoreFn:
    """The softmax probability of each pair's class."""
    c = _classes(classes, "classes")
    n = _n_pairs(c)
    pos = as_int(pos, "pos")

    def score_fn(output: Tensor, pair: Tensor) -> Tensor:
        return class_score(_logits_at(output, pos), _per_pair(c, pair, n), "prob")

    score_fn.n_pairs = n  # type: ignore[attr-defined]
    return score_fn


def logit_diff_score(
    correct: Int[Tensor, " n_pairs"] | int, incorrect: Int[Tensor, " n_pairs"] | int, pos: int = -1
) -> ScoreFn:
    """logit(correct) - logit(incorrect) per pair (e.g. answer tokens of a language model)."""
    good, bad = _classes(correct, "correct"), _classes(incorrect, "incorrect")
    n = _n_pairs(good, bad)
    pos = as_int(pos, "pos")

    def score_fn(output: Tensor, pair: Tensor) -> Tensor:
        logits = _logits_at(output, pos)
        return class_score(logits, _per_pair(good, pair, n)) - class_score(logits, _per_pair(bad, pair, n))

    score_fn.n_pairs = n  # type: ignore[attr-defined]
    return score_fn
