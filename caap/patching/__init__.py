"""The batched activation-patching engine and what is built directly on it."""

from caap.patching.engine import (
    Context,
    HookedModel,
    InputContext,
    Intervention,
    ResidContext,
    ScoreFn,
    Write,
    batched_runs,
    default_batch_size,
    run_interventions,
)
from caap.patching.path import path_patch
from caap.patching.scores import logit_diff_score, logit_score, prob_score
from caap.patching.sweeps import COMPONENTS, SweepResult, sweep

__all__ = [
    "COMPONENTS",
    "Context",
    "HookedModel",
    "InputContext",
    "Intervention",
    "ResidContext",
    "ScoreFn",
    "SweepResult",
    "Write",
    "batched_runs",
    "default_batch_size",
    "logit_diff_score",
    "logit_score",
    "path_patch",
    "prob_score",
    "run_interventions",
    "sweep",
]
