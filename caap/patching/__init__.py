"""The batched activation-patching engine and what is built directly on it."""

from caap.patching.engine import (
    Context,
    InputContext,
    Intervention,
    ResidContext,
    Write,
    batched_runs,
    default_batch_size,
    run_interventions,
)
from caap.patching.path import path_patch
from caap.patching.scores import logit_diff_metric, logit_metric, prob_metric
from caap.patching.sweeps import COMPONENTS, SweepResult, sweep

__all__ = [
    "COMPONENTS",
    "Context",
    "InputContext",
    "Intervention",
    "ResidContext",
    "SweepResult",
    "Write",
    "batched_runs",
    "default_batch_size",
    "logit_diff_metric",
    "logit_metric",
    "path_patch",
    "prob_metric",
    "run_interventions",
    "sweep",
]
