"""hooked_vit: timm Vision Transformers as TransformerLens-style hooked models."""

from hooked_vit.config import HookedViTConfig
from hooked_vit.loading import UnsupportedTimmFeature
from hooked_vit.model import HookedViT
from hooked_vit.names import act_name

__all__ = ["HookedViT", "HookedViTConfig", "UnsupportedTimmFeature", "act_name"]
