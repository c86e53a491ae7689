"""Images -> pixels, with the source model's own preprocessing.

AugReg ViTs use mean = std = 0.5, crop 0.9 and bicubic resizing; ImageNet's usual mean/std gives them
wrong answers. So the transform is always the source's own: for a timm model, timm's eval transform built
from the model's data config; for a Hugging Face model, the steps of its image processor (resize, center
crop, rescale, normalise, as transformers' default torchvision backend runs them), recorded in the same
data config dict (`data_config_from_processor`) so that mean and std are where every other reader looks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from hooked_vit.checks import as_int

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor (uint8 HWC / CHW)


def load_image(image: ImageLike) -> Image.Image:
    """One image as an RGB PIL image: a path, a PIL image (any mode, 16-bit and float greyscale
    included), or an array / tensor [H, W], [H, W, 1|3|4] or [1|3|4, H, W] (uint8 0..255, uint16
    0..65535, or float 0..1).

    A file's EXIF orientation is applied (a phone photo reaches the model upright). Anything that
    would silently become a different picture is refused with a ValueError instead: NaN or inf
    values, floats outside [0, 1], 32-bit integer images beyond 16 bits, and files that declare more
    pixels than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im), source=path)
        except Image.DecompressionBombError as e:
            raise ValueError(
                f"{path} declares more pixels than PIL's decompression-bomb limit ({e}); if the file is "
                f"trusted, raise PIL.Image.MAX_IMAGE_PIXELS before reading it"
            ) from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"could not read {path} as an image ({e}); accepted: any format PIL opens") from e
    if isinstance(image, Image.Image):
        return _to_rgb(image, source="the PIL image")
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _to_rgb(Image.fromarray(_array_to_uint8_hwc(image)))
    raise TypeError(
        f"cannot read an image from {type(image).__name__}; accepted: a path, a PIL image, or an "
        f"array [H, W], [H, W, 1|3|4] (uint8, uint16, or float in [0, 1])"
    )


# PIL modes holding more than 8 bits per pixel: PIL's own convert("RGB") clips them to 255 (a 16-bit
# greyscale PNG becomes almost white) or truncates floats, so they go through an array and are scaled.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_rgb(im: Image.Image, source: str = "the image") -> Image.Image:
    if im.mode in _WIDE_MODES:
        a = np.asarray(im)
        if im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(
                f"{source} is a 32-bit integer image with values in [{a.min()}, {a.max()}]; accepted: "
                f"8-bit or 16-bit images (0..65535), or float images in [0, 1]"
            )
        if im.mode != "F":
            a = a.astype(np.uint16)
        return _to_rgb(Image.fromarray(_array_to_uint8_hwc(a, source)))
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def _array_to_uint8_hwc(a: np.ndarray, source: str = "an image array") -> np.ndarray:
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
    if a.dtype == np.uint16:
        return np.ascontiguousarray(np.round(a.astype(np.float64) * (255 / 65535)).astype(np.uint8))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{source} holds NaN or inf values; accepted: finite floats in [0, 1]")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(
                f"{source} holds floats in [{a.min():.4g}, {a.max():.4g}]; accepted: floats in [0, 1], "
                f"or uint8 for 0..255"
            )
        return np.ascontiguousarray((a * 255).round().astype(np.uint8))
    raise ValueError(f"an image array must be uint8, uint16 or float in [0, 1]; got dtype {a.dtype}")


def check_pixels(pixels: Tensor, name: str = "pixels") -> None:
    """Refuse pixels that would give a silently wrong (all-NaN) result: a tensor [batch, chan, H, W]
    with at least one image, floating point, every value finite."""
    if not isinstance(pixels, Tensor) or pixels.ndim != 4:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"{name} must be a tensor [batch, chan, H, W], got {shape}; use model.preprocess()")
    if pixels.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(pixels.shape)}); give at least one image")
    if not pixels.is_floating_point():
        raise ValueError(f"{name} must be floating point (normalised pixels), got {pixels.dtype}; use model.preprocess()")
    if not bool(torch.isfinite(pixels).all()):
        bad = int((~torch.isfinite(pixels)).flatten(1).any(1).nonzero()[0])
        raise ValueError(f"{name} hold NaN or inf values (image {bad} of the batch); every value must be finite")


@lru_cache(maxsize=16)
def _transform(frozen_config: tuple):
    config = dict(frozen_config)
    if config.get("processor") == HF_PROCESSOR:
        return HFImageTransform(config)
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


def make_transform(data_config: dict[str, Any]):
    """The eval transform of a data config, PIL image -> [3, H, W] (cached): timm's, or a Hugging Face
    image processor's steps (`HFImageTransform`) where the config records them."""
    return _transform(tuple(sorted(data_config.items())))


# ---------------------------------------------------------------------------------------------- Hugging Face
HF_PROCESSOR = "transformers"
"""`data_config["processor"]` of a Hugging Face model: its image processor's steps are in the config."""

_HF_KEYS = ("hf_resize", "hf_resample", "hf_crop", "hf_rescale", "hf_normalize")


def data_config_from_processor(processor: Any, cfg: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The data config of a Hugging Face model: timm's keys (input_size, mean, std, interpolation,
    crop_pct, crop_mode: what the rest of the package reads) plus the image processor's steps for
    `HFImageTransform`. `processor`: a transformers image processor (torchvision backend, transformers'
    default), or None for a resize to the model's image size with `defaults` (image_mean, image_std,
    resample). Refuses steps it does not reproduce, and an output size the model does not take."""
    if processor is None:
        d: dict[str, Any] = {"do_resize": True, "size": {"height": cfg.img_size[0], "width": cfg.img_size[1]},
                             "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
                             "do_normalize": True, **defaults}
        name = "the family's default preprocessing"
    else:
        name = type(processor).__name__
        backend = getattr(processor, "backend", "torchvision")
        if backend != "torchvision":
            raise ValueError(
                f"{name} runs on the {backend!r} backend; HookedViT reproduces transformers' default torchvision "
                f"backend (AutoImageProcessor.from_pretrained(...) without backend=)"
            )
        d = processor.to_dict() if hasattr(processor, "to_dict") else dict(processor)
    problems = [f"{k}={d[k]!r}" for k in ("do_pad", "do_reduce_labels") if d.get(k)]
    size = dict(d.get("size") or {}) if d.get("do_resize") else {}
    size = {k: v for k, v in size.items() if v is not None}
    if size and set(size) not in ({"height", "width"}, {"shortest_edge"}):
        problems.append(f"size={size} (accepted: height and width, or shortest_edge)")
    crop = dict(d.get("crop_size") or {}) if d.get("do_center_crop") else {}
    if problems:
        raise ValueError(f"{name} has steps HookedViT's preprocessing does not reproduce: {'; '.join(problems)}")
    if crop:
        out_size = (int(crop["height"]), int(crop["width"]))
    elif "height" in size:
        out_size = (int(size["height"]), int(size["width"]))
    else:
        raise ValueError(
            f"{name} gives images of varying size (no resize to a fixed size, no center crop); the model takes "
            f"{cfg.img_size[0]}x{cfg.img_size[1]}"
        )
    ph, pw = cfg.patch_size
    if cfg.dynamic_img_size and (out_size[0] % ph or out_size[1] % pw):
        raise ValueError(f"{name} makes {out_size[0]}x{out_size[1]} images, not a multiple of the model's patch size "
                         f"{ph}x{pw}")
    if not cfg.dynamic_img_size and out_size != tuple(cfg.img_size):
        raise ValueError(
            f"{name} makes {out_size[0]}x{out_size[1]} images but the model takes {cfg.img_size[0]}x{cfg.img_size[1]}: "
            f"pass the model's own processor, or dynamic_img_size=True to interpolate its position embeddings"
        )
    mean = tuple(float(v) for v in (d.get("image_mean") if d.get("do_normalize") else (0.0,) * 3))
    std = tuple(float(v) for v in (d.get("image_std") if d.get("do_normalize") else (1.0,) * 3))
    resample = int(d.get("resample", 2))
    short = size.get("shortest_edge")
    return {
        "input_size": (cfg.in_chans, *out_size),
        "mean": mean,
        "std": std,
        "interpolation": _RESAMPLE_NAMES.get(resample, str(resample)),
        "crop_pct": out_size[0] / (short or int(size.get("height", out_size[0]))) if crop else 1.0,
        "crop_mode": "center" if short else "squash",
        "processor": HF_PROCESSOR,
        "hf_resize": ("shortest_edge", int(short)) if short else (
            ("height_width", (int(size["height"]), int(size["width"]))) if size else None),
        "hf_resample": resample,
        "hf_crop": out_size if crop else None,
        "hf_rescale": float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale") else None,
        "hf_normalize": bool(d.get("do_normalize")),
    }


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFImageTransform:
    """A Hugging Face image processor's eval steps on one RGB PIL image -> [3, H, W] float32, as
    transformers' torchvision backend runs them: the uint8 image resized with `torchvision`'s antialiased
    resize (to height x width, or its shorter edge to `shortest_edge` with the longer edge
    int(size * long / short)), center-cropped (zero-padded where the crop is larger), then rescaled and
    normalised in one step, (x - mean / rescale) / (std / rescale) in float32."""

    def __init__(self, config: dict[str, Any]) -> None:
        from torchvision.transforms import InterpolationMode

        modes = {0: InterpolationMode.NEAREST_EXACT, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
                 3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
        self.resize, self.crop = config["hf_resize"], config["hf_crop"]
        self.mode = modes[config["hf_resample"]]
        self.rescale, self.normalize = config["hf_rescale"], config["hf_normalize"]
        self.mean, self.std = config["mean"], config["std"]

    def __call__(self, image: Image.Image) -> Float[Tensor, "3 H W"]:
        import torchvision.transforms.v2.functional as tvF

        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()  # uint8 [3, H, W]
        x = self._geometry(x, self.mode)
        x = x.to(torch.float32)
        if self.normalize:
            scale = 1.0 / self.rescale if self.rescale is not None else 1.0
            mean, std = torch.tensor(self.mean) * scale, torch.tensor(self.std) * scale
            return tvF.normalize(x, mean.tolist(), std.tolist())
        return x * self.rescale if self.rescale is not None else x

    def geometric(self, image: Image.Image) -> Image.Image:
        """Only the resize and crop, with nearest-neighbour resampling (to carry masks and boxes into the
        model's input frame: `caap.data.geometric_transform`)."""
        from torchvision.transforms import InterpolationMode

        x = torch.from_numpy(np.array(image))
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        out = self._geometry(x.contiguous(), InterpolationMode.NEAREST_EXACT).permute(1, 2, 0).numpy()
        return Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out)

    def _geometry(self, x: Tensor, mode: Any) -> Tensor:
        """Resize (antialiased, as the processor) and center crop of an image tensor [C, H, W]."""
        import torchvision.transforms.v2.functional as tvF

        if self.resize is not None:
            kind, value = self.resize
            if kind == "shortest_edge":
                h, w = x.shape[-2:]
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = value, int(value * long / short)
                value = (new_long, new_short) if w <= h else (new_short, new_long)
            x = tvF.resize(x, list(value), interpolation=mode, antialias=True)
        return self._center_crop(x, *self.crop) if self.crop is not None else x

    @staticmethod
    def _center_crop(x: Tensor, ch: int, cw: int) -> Tensor:
        import torchvision.transforms.v2.functional as tvF

        h, w = x.shape[-2:]
        if ch > h or cw > w:
            pad = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
                   (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]
            x = tvF.pad(x, pad, fill=0)
            h, w = x.shape[-2:]
            if (ch, cw) == (h, w):
                return x
        return tvF.crop(x, int((h - ch) / 2.0), int((w - cw) / 2.0), ch, cw)


def preprocess(images: ImageLike | Sequence[ImageLike], data_config: dict[str, Any]) -> Float[Tensor, "batch chan H W"]:
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


# ---------------------------------------------------------------------------------------------- pixel space
# Two spaces: unit RGB (each channel in [0, 1], what an image file holds) and the model's normalised
# pixels ((unit - mean) / std per channel, timm's data config: what `preprocess` returns and the model
# reads). Every "black image", "mid-grey image", blur and un-normalisation in the project goes through here.


def _stats(data_config: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) as [1, C, 1, 1] tensors in `like`'s device and dtype (1 or C values in the config)."""
    cfg = getattr(data_config, "data_config", data_config)  # a HookedViT carries its config
    if not hasattr(cfg, "get") or cfg.get("mean") is None or cfg.get("std") is None:
        raise ValueError(
            "need the input normalisation: timm's data config (a dict with 'mean' and 'std', e.g. "
            f"model.data_config) or a model carrying one; got {type(cfg).__name__}"
        )
    c = like.shape[1] if like.ndim == 4 else 1
    mean = torch.as_tensor(cfg["mean"], dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(cfg["std"], dtype=torch.float64).reshape(-1)
    if mean.numel() not in (1, c) or std.numel() not in (1, c):
        raise ValueError(f"mean/std must have 1 or {c} values, got {mean.tolist()} / {std.tolist()}")
    kw = {"device": like.device, "dtype": like.dtype}
    return mean.view(1, -1, 1, 1).to(**kw), std.view(1, -1, 1, 1).to(**kw)


def normalize(unit: Float[Tensor, "batch chan H W"], data_config: Any) -> Float[Tensor, "batch chan H W"]:
    """Unit RGB [0, 1] -> the model's normalised pixels, `(unit - mean) / std` (float32 at least)."""
    unit = unit if unit.is_floating_point() else unit.float()
    mean, std = _stats(data_config, unit)
    return (unit - mean) / std


def unnormalize(pixels: Float[Tensor, "batch chan H W"], data_config: Any) -> Float[Tensor, "batch chan H W"]:
    """The model's normalised pixels -> unit RGB, `pixels * std + mean` (not clipped)."""
    mean, std = _stats(data_config, pixels)
    return pixels * std + mean


def constant_image(
    value: float, size: tuple[int, int], data_config: Any, batch: int = 1, channels: int = 3,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch chan H W"]:
    """An image of one unit-RGB `value` everywhere (0: black, 0.5: mid-grey) in the model's normalised
    pixels, [batch, channels, H, W]."""
    unit = torch.full((1, channels, 1, 1), float(value), device=device)
    return normalize(unit, data_config).to(dtype).expand(batch, channels, *size)


def gaussian_blur(
    pixels: Float[Tensor, "batch chan H W"],
    sigma: float,
    kernel_size: int | None = None,
    padding: Literal["reflect", "zeros"] = "reflect",
) -> Float[Tensor, "batch chan H W"]:
    """Each channel blurred by a normalised Gaussian of `sigma` pixels, separably (rows, then columns).

    `kernel_size`: odd; default 2 * radius + 1 with radius = max(1, int(3 sigma)), capped at the image
    size - 1. `padding`: "reflect" (mirror the border) or "zeros" (zeros outside the image, as
    `conv2d(padding=...)`). The callers state theirs: CAAP's blur context (`caap.contexts`, sigma 10,
    reflect) and the metrics' "blur" substrate (RISE: kernel 11, sigma 5, zeros)."""
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    if kernel_size is None:
        radius = min(max(1, int(3 * sigma)), min(pixels.shape[-2:]) - 1)
    else:
        kernel_size = as_int(kernel_size, "blur kernel_size")
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"blur kernel_size must be odd and positive, got {kernel_size}")
        radius = kernel_size // 2
    x = torch.arange(-radius, radius + 1, device=pixels.device, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * float(sigma) ** 2))
    k = (k / k.sum()).to(pixels.dtype)
    c = pixels.shape[1]
    rows, cols = k.view(1, 1, 1, -1).expand(c, 1, 1, -1), k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    if padding == "reflect":
        out = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")
        return F.conv2d(F.conv2d(out, rows, groups=c), cols, groups=c)
    out = F.conv2d(pixels, rows, padding=(0, radius), groups=c)
    return F.conv2d(out, cols, padding=(radius, 0), groups=c)
