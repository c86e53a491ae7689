"""What every metric shares: the `Metric` base class (a direction and a name, in the manner of Quantus),
bringing maps of any resolution to the input size or the patch grid, targets, devices and patch sizes.

A model here is anything callable `pixels [batch, chan, H, W] -> logits [batch, n_classes]`: a
`HookedViT`, a timm model, or a small transparent `torch.nn.Module` in a test. Its patch size comes from
`model.cfg.patch_size` (HookedViT) or the metric's `patch_size` argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from caap.targets import Target

Model = Callable[[Tensor], Tensor]
Interpolation = Literal["bilinear", "nearest"]


class Metric(ABC):
    """One number per image, for a batch of attribution maps.

        value = metric(model, pixels, maps, targets=None, masks=None)   # Float[Tensor, "batch"], on the CPU

    Subclasses declare `name` (the registry key), `higher_is_better` and `kind` ("faithfulness" needs
    the model; "localisation" needs `masks`). Undefined values (e.g. an image without boxes) are NaN:
    average with `torch.nanmean`.
    """

    name: ClassVar[str] = "metric"
    higher_is_better: ClassVar[bool] = True
    kind: ClassVar[str] = "faithfulness"

    @abstractmethod
    def __call__(
        self,
        model: Model | None,
        pixels: Float[Tensor, "batch chan H W"] | None,
        maps: Float[Tensor, "batch h w"],
        targets: Target = None,
        masks: Bool[Tensor, "batch H W"] | None = None,
    ) -> Float[Tensor, " batch"]: ...

    def settings(self) -> dict[str, Any]:
        """The metric's settings (its constructor arguments), as `repr` shows them."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------------- maps
@dataclass
class PerturbationCurve:
    """A metric's curve: `scores[i, s]` at `fractions[s]` (the share of units changed)."""

    fractions: Float[Tensor, " steps"]
    scores: Float[Tensor, "batch steps"]


class CurveMetric(Metric):
    """A faithfulness metric read off a curve: `curve(model, pixels, maps, targets)` changes the input
    step by step in the order of the map and scores each step; `reduce(curve)` makes one value per image
    (an area, a mean). Calling the metric is `reduce(curve(...))`."""

    @abstractmethod
    def curve(
        self, model: Model, pixels: Float[Tensor, "batch chan H W"], maps: Float[Tensor, "batch h w"],
        targets: Target = None,
    ) -> PerturbationCurve:
        """Fractions and per-image scores, on the CPU."""

    @abstractmethod
    def reduce(self, curve: PerturbationCurve) -> Float[Tensor, " batch"]:
        """One value per image from the curve."""

    def __call__(
        self,
        model: Model,
        pixels: Float[Tensor, "batch chan H W"],
        maps: Float[Tensor, "batch h w"],
        targets: Target = None,
        masks: Bool[Tensor, "batch H W"] | None = None,
    ) -> Float[Tensor, " batch"]:
        """One value per image (on the CPU); `masks` is ignored."""
        return self.reduce(self.curve(model, pixels, maps, targets))

    def prepare(
        self, model: Model | None, pixels: Any, maps: Any
    ) -> tuple[Float[Tensor, "batch chan H W"], Float[Tensor, "batch h w"], torch.device]:
        """What every curve starts with: a model is required; the pixels checked and moved to the model's
        device, the maps as a batch beside them."""
        if model is None:
            raise ValueError(f"{type(self).__name__} is a faithfulness metric and needs the model")
        pixels = check_pixels(pixels)
        device = model_device(model, pixels.device)
        pixels = pixels.to(device)
        return pixels, as_map_batch(maps, pixels.shape[0]).to(device), device


def as_map_batch(maps: Tensor, batch: int | None = None) -> Float[Tensor, "batch h w"]:
    """Maps as float [batch, h, w]; accepts [batch, h, w], [batch, 1, h, w], or [h, w] for one image."""
    if not isinstance(maps, Tensor):
        maps = torch.as_tensor(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    elif maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"maps must be [batch, h, w] (or [batch, 1, h, w]); got shape {tuple(maps.shape)}")
    if batch is not None and maps.shape[0] != batch:
        raise ValueError(f"got {maps.shape[0]} maps for {batch} images")
    if not maps.is_floating_point():
        maps = maps.float()
    return maps


def upsample_maps(
    maps: Float[Tensor, "batch h w"], size: tuple[int, int], interpolation: Interpolation = "bilinear"
) -> Float[Tensor, "batch H W"]:
    """Maps at the input size (H, W). Equal sizes pass unchanged; otherwise `F.interpolate` with
    "bilinear" (align_corners=False, the usual choice for ViT maps, e.g. Chefer et al.'s code) or
    "nearest" ("nearest-exact": each pixel takes the value of the map cell it lies in)."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    x = maps[:, None].float()
    if interpolation == "bilinear":
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    elif interpolation == "nearest":
        x = F.interpolate(x, size=size, mode="nearest-exact")
    else:
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    return x[:, 0]


def pool_maps_to_grid(
    maps: Float[Tensor, "batch h w"],
    grid: tuple[int, int],
    size: tuple[int, int],
    interpolation: Interpolation = "bilinear",
) -> Float[Tensor, "batch grid_h grid_w"]:
    """Maps on the patch grid. A map already on the grid passes unchanged; a finer one (e.g. at pixel
    resolution) is area-averaged onto the grid; a coarser one (e.g. 7x7 for a 14x14 grid) is first
    upsampled to the input size `size` with `interpolation`, then area-averaged."""
    h, w = maps.shape[-2:]
    if (h, w) == tuple(grid):
        return maps
    if h < grid[0] or w < grid[1]:
        maps = upsample_maps(maps, size, interpolation)
    return F.adaptive_avg_pool2d(maps[:, None].float(), grid)[:, 0]


# ---------------------------------------------------------------------------------------------- model
def model_device(model: Any, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter (or buffer); `fallback` for parameter-free callables."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return fallback


def resolve_patch_size(model: Any, patch_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(patch_h, patch_w): the metric's own `patch_size`, else `model.cfg.patch_size`."""
    if patch_size is None:
        patch_size = getattr(getattr(model, "cfg", None), "patch_size", None)
    if patch_size is None:
        raise ValueError(
            "cannot tell the model's patch size: pass patch_size=... to the metric "
            "(a HookedViT carries it in model.cfg.patch_size)"
        )
    if isinstance(patch_size, int):
        return (patch_size, patch_size)
    ph, pw = (int(p) for p in patch_size)
    return (ph, pw)


def grid_for(size: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    ph, pw = patch_size
    if h < ph or w < pw:
        raise ValueError(f"image size {h}x{w} is smaller than the patch size {ph}x{pw}")
    return (h // ph, w // pw)


def normalisation(
    model: Any, mean: Sequence[float] | None, std: Sequence[float] | None, what: str
) -> dict[str, Sequence[float]]:
    """The per-channel normalisation {"mean", "std"} (the metric's own, else `model.data_config`), needed
    to place a substrate defined in unit RGB ("black", "uniform") into the normalised input space
    (`hooked_vit.preprocess.normalize`)."""
    cfg = getattr(model, "data_config", None) or {}
    mean = mean if mean is not None else cfg.get("mean")
    std = std if std is not None else cfg.get("std")
    if mean is None or std is None:
        raise ValueError(
            f"the {what!r} substrate is defined in raw [0, 1] pixel space and needs the normalisation: pass "
            f"mean=... and std=... to the metric (a HookedViT carries them in model.data_config), or use "
            f"substrate='zero'"
        )
    return {"mean": mean, "std": std}


def check_pixels(pixels: Any) -> Tensor:
    if not isinstance(pixels, Tensor) or pixels.ndim != 4:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a tensor [batch, chan, H, W], got {shape}; use model.preprocess()")
    return pixels



def check_masks(masks: Any, batch: int, size: tuple[int, int] | None = None) -> Bool[Tensor, "batch H W"]:
    """Box-union masks as bool [batch, H, W] (an [H, W] mask is shared by the batch)."""
    if masks is None:
        raise ValueError(
            "this localisation metric needs masks: bool [batch, H, W] box unions in the input frame "
            "(caap.data.sample_mask / box_mask)"
        )
    masks = torch.as_tensor(masks)
    if masks.ndim == 2:
        masks = masks.expand(batch, *masks.shape)
    if masks.ndim != 3 or masks.shape[0] != batch:
        raise ValueError(f"masks must be [batch={batch}, H, W]; got shape {tuple(masks.shape)}")
    if size is not None and tuple(masks.shape[-2:]) != tuple(size):
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the images are {tuple(size)}")
    return masks.bool()
