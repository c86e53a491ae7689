"""caap: activation patching and CAAP attribution for Vision Transformers (and language models).

    from hooked_vit import HookedViT
    from caap import CAAP
    model = HookedViT.from_timm("vit_tiny_patch16_224.augreg_in21k_ft_in1k", checkpoint_path=...)
    maps = CAAP(model).attribute(model.preprocess(["cat.jpg"]))   # [1, 14, 14]
"""

from caap.attribution import CAAP, AttributionMethod
from caap.contexts import CONTEXT_NAMES, MeanContext, get_context

__all__ = ["CAAP", "CONTEXT_NAMES", "AttributionMethod", "MeanContext", "get_context"]
