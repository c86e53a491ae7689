"""caap: activation patching and CAAP attribution for Vision Transformers (and language models).

    from hooked_vit import HookedViT
    from caap import CAAP
    model = HookedViT.from_timm("vit_tiny_patch16_224.augreg_in21k_ft_in1k", checkpoint_path=...)
    maps = CAAP(model).attribute(model.preprocess(["cat.jpg"]))   # [1, 14, 14]

The names below are imported on first use (PEP 562), so that `import caap.cli` starts without torch and
the command line can answer Ctrl-C during its imports with one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CAAP": "caap.attribution",
    "AttributionMethod": "caap.attribution",
    "CONTEXT_NAMES": "caap.contexts",
    "MeanContext": "caap.contexts",
    "get_context": "caap.contexts",
}

__all__ = ["CAAP", "CONTEXT_NAMES", "AttributionMethod", "MeanContext", "get_context"]

if TYPE_CHECKING:
    from caap.attribution import CAAP, AttributionMethod
    from caap.contexts import CONTEXT_NAMES, MeanContext, get_context


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'caap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
