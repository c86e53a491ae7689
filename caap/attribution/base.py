"""The call shape every attribution method shares, in the manner of Captum.

    method = SomeMethod(model, **settings)
    maps = method.attribute(pixels, target=None)     # [batch, h, w]

`target=None` means each image's predicted class; an int means that class for every image; a
sequence or tensor gives one class per image. Maps are on the patch grid ([batch, grid_h, grid_w])
for token-level methods or at pixel resolution ([batch, H, W]) for pixel-level ones; metrics accept
either. Higher means more evidence for the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from jaxtyping import Float, Int
from torch import Tensor

from caap.targets import Target, resolve_targets
from hooked_vit import HookedViT
from hooked_vit.preprocess import check_pixels


class AttributionMethod(ABC):
    """Base class: subclasses set `name` and implement `_attribute` for resolved targets."""

    name: str = "method"
    #: "patch" if maps come on the patch grid, "pixel" if at image resolution
    resolution: str = "patch"
    #: one line on what the method computes (`caap methods` lists it)
    summary: str = ""
    #: the paper that defines the method: authors, year, venue
    paper: str = ""

    def __init__(self, model: HookedViT) -> None:
        self.model = model

    def attribute(self, pixels: Float[Tensor, "batch chan H W"], target: Target = None) -> Float[Tensor, "batch h w"]:
        check_pixels(pixels)  # a 4-d float tensor, at least one image, no NaN or inf (never an all-NaN map)
        self.model.grid_size_for(pixels)  # checks the image size
        targets = resolve_targets(self.model, pixels, target)
        return self._attribute(pixels, targets)

    @abstractmethod
    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
