"""hooked_vit: timm and Hugging Face Vision Transformers as TransformerLens-style hooked models."""

from hooked_vit.config import HookedViTConfig
from hooked_vit.loading import ConversionMismatch, UnsupportedFeature, UnsupportedTimmFeature
from hooked_vit.model import HookedViT
from hooked_vit.names import act_name

__all__ = ["ConversionMismatch", "HookedViT", "HookedViTConfig", "UnsupportedFeature", "UnsupportedTimmFeature", "act_name"]
