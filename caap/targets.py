"""The target class of each image, and its score: the one lookup every method, metric and patching run uses.

"Target" means one thing in this package: the class an attribution explains (or a metric scores), one
per image. `resolve_targets` turns what a user passes into one class index per image; `class_score`
reads the score of given classes off a batch of logits, row by row.

Scores (`Score`), each method or metric accepting the subset that makes sense for it:

    "logit"       the class's logit
    "prob"        its softmax probability
    "log_prob"    its log-softmax
    "accuracy"    1 where the class is the top-1 class, else 0
    "logit_diff"  its logit minus the logit of the same class in a reference run (`reference`), e.g.
                  the unpatched neutral context for CAAP

Imports nothing from the rest of `caap` (only `hooked_vit.checks`), so every subpackage may use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_vit.checks import describe

Score = Literal["logit", "prob", "log_prob", "accuracy", "logit_diff"]
SCORES: tuple[str, ...] = get_args(Score)

Target = int | Sequence[int] | Tensor | None
"""What a caller may pass as targets: None (each image's predicted class), an int (that class for every
image), or one class index per image (a sequence or an integer tensor [batch])."""

_TARGET_HELP = "None (the predicted class), an int, or one integer class index per image"


def check_score(score: Any, accepted: Sequence[str] = SCORES) -> None:
    """A ValueError naming the accepted scores unless `score` is one of them."""
    if score not in accepted:
        raise ValueError(f"unknown score {score!r}; accepted: {', '.join(accepted)}")


def check_classes(classes: Tensor, n_classes: int | None) -> None:
    """A ValueError unless every class index lies in 0..n_classes-1 (only >= 0 when n_classes is unknown)."""
    if not classes.numel():
        return
    lo, hi = int(classes.min()), int(classes.max())
    if n_classes is not None and n_classes > 0:
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"target class out of range: accepted 0..{n_classes - 1}, got {classes.tolist()}")
    elif lo < 0:
        raise ValueError(f"target class out of range: class indices are >= 0, got {classes.tolist()}")


def resolve_targets(
    model: Any,
    pixels: Float[Tensor, "batch chan H W"],
    target: Target,
    batch_size: int | None = None,
    logits: Float[Tensor, "batch n_classes"] | None = None,
) -> Int[Tensor, " batch"]:
    """One class index per image, on the pixels' device.

    `target`: None (the model's predicted class: from `logits` if given, else forward passes of at most
    `batch_size` images), an int (that class for every image), or one class per image (a sequence or
    an integer tensor [batch]). Indices are checked against `model.cfg.n_classes` where the model has
    one (else only >= 0). Floats, booleans, wrong shapes and empty batches raise a ValueError that says
    what is accepted.
    """
    b = pixels.shape[0]
    if b == 0:
        raise ValueError("no images: pixels has an empty batch axis; pass at least one image [batch >= 1, 3, H, W]")
    if target is None:
        if logits is None:
            step = batch_size or b
            with torch.no_grad():
                logits = torch.cat([model(pixels[i : i + step]) for i in range(0, b, step)])
        return logits.argmax(dim=-1).to(pixels.device)
    if isinstance(target, (bool, float)) or (isinstance(target, Tensor) and not _is_integer(target)):
        raise ValueError(f"target must be {_TARGET_HELP}; got {describe(target)}")
    try:
        t = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"target must be {_TARGET_HELP}; got {describe(target)}") from e
    if not _is_integer(t):
        raise ValueError(f"target must be {_TARGET_HELP}; got {describe(target)}")
    t = t.to(device=pixels.device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(b)
    if t.ndim != 1 or t.shape[0] != b:
        raise ValueError(f"target must be {_TARGET_HELP} ({b}); got shape {tuple(t.shape)}")
    check_classes(t, getattr(getattr(model, "cfg", None), "n_classes", None))
    return t.clone()


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def class_score(
    logits: Float[Tensor, "rows n_classes"],
    classes: Int[Tensor, " rows *k"],
    score: Score = "logit",
    reference: Float[Tensor, " rows *k"] | None = None,
) -> Float[Tensor, " rows *k"]:
    """Each row's score for its own class(es): `classes` [rows] or [rows, k] (several per row) index the
    last axis of `logits`. Computed in float32 (a no-op for float32 logits). `reference` is needed by
    "logit_diff" only: the reference run's logit of the same classes, [rows] or [rows, k]."""
    idx = classes.reshape(classes.shape[0], -1) if classes.ndim else classes.view(1, 1)
    logits = logits.float()
    if score == "logit" or score == "logit_diff":
        out = logits.gather(-1, idx)
    elif score == "prob":
        out = logits.softmax(dim=-1).gather(-1, idx)
    elif score == "log_prob":
        out = logits.log_softmax(dim=-1).gather(-1, idx)
    elif score == "accuracy":
        out = (logits.argmax(dim=-1, keepdim=True) == idx).float()
    else:
        check_score(score)
    out = out.view(classes.shape)
    if score == "logit_diff":
        if reference is None:
            raise ValueError("score 'logit_diff' needs the reference run's logits of the same classes (reference=)")
        out = out - reference
    return out
