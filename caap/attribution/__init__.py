"""Attribution methods with one call shape: `Method(model, ...).attribute(pixels, target=None)`."""

from caap.attribution.base import AttributionMethod
from caap.attribution.caap import CAAP, default_layers

__all__ = ["CAAP", "AttributionMethod", "default_layers"]
