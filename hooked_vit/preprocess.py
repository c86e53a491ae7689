"""Images -> pixels, with the source model's own timm data config.

AugReg ViTs use mean = std = 0.5, crop 0.9 and bicubic resizing; ImageNet's usual mean/std gives them
wrong answers. So the transform is always built by timm from the model's own data config.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image, UnidentifiedImageError
from torch import Tensor

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor (uint8 HWC / CHW)


def load_image(image: ImageLike) -> Image.Image:
    """One image as an RGB PIL image: a path, a PIL image (any mode), or an array / tensor
    [H, W], [H, W, 1|3|4] (uint8 0..255, or float 0..1)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return _to_rgb(im)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"could not read {path} as an image ({e}); accepted: any format PIL opens") from e
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _to_rgb(Image.fromarray(_array_to_uint8_hwc(image)))
    raise TypeError(
        f"cannot read an image from {type(image).__name__}; accepted: a path, a PIL image, or a "
        f"uint8 array [H, W], [H, W, 1|3|4]"
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _array_to_uint8_hwc(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(
            f"an image array must be [H, W], [H, W, 1|3|4] or [1|3|4, H, W]; got shape {tuple(a.shape)}"
        )
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        if a.min() < 0 or a.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1]; pass uint8 for 0..255")
        return np.ascontiguousarray((a * 255).round().astype(np.uint8))
    raise ValueError(f"an image array must be uint8 or float in [0, 1]; got dtype {a.dtype}")


@lru_cache(maxsize=16)
def _transform(frozen_config: tuple):
    from timm.data import create_transform

    return create_transform(**dict(frozen_config), is_training=False)


def make_transform(data_config: dict[str, Any]):
    """timm's eval transform for a data config (cached)."""
    return _transform(tuple(sorted(data_config.items())))


def preprocess(images: ImageLike | Sequence[ImageLike], data_config: dict[str, Any]) -> Float[Tensor, "batch 3 H W"]:
    """One image or a list of images -> a pixel batch with timm's eval transform for `data_config`."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or (
        isinstance(images, Tensor) and images.ndim in (2, 3)
    ):
        images = [images]
    if isinstance(images, Tensor):
        raise ValueError(
            f"a tensor of shape {tuple(images.shape)} looks like a batch of pixels already; pass it to the "
            f"model directly, or pass single images [H, W, C] to preprocess"
        )
    images = list(images)
    if not images:
        raise ValueError("no images given")
    transform = make_transform(data_config)
    return torch.stack([transform(load_image(im)) for im in images])
