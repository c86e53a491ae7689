"""Neutral target contexts: where CAAP (and any patching run) inserts the source's activations.

Each context yields the residual stream entering a given block, for a batch of source images:

    "mean"   mean activations over a reference image set, per position (computed once; saved to and
             loaded from a file)
    "grey"   a forward pass of a mid-grey image
    "black"  a forward pass of a black image
    "blur"   a forward pass of a blurred copy of each source image
    "noise"  a forward pass of seeded Gaussian noise
    "zero"   zeros
    an image (path, PIL image, array) or a pixel tensor [1, 3, H, W]: a forward pass of it

`get_context(spec, model)` builds one from any of these.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from caap.patching.engine import ResidContext
from hooked_vit import HookedViT

CONTEXT_NAMES = ("mean", "grey", "black", "blur", "noise", "zero")


class NeutralContext(ABC):
    """A target context for a batch of source images."""

    name: str = "context"
    per_source: bool = False
    """Whether the context depends on the source image (one context per image, e.g. "blur")."""

    @abstractmethod
    def resid_pre(
        self, model: HookedViT, layer: int, pixels: Float[Tensor, "batch 3 H W"]
    ) -> Float[Tensor, "n pos d_model"]:
        """The residual stream entering block `layer`: n = batch if `per_source`, else 1."""

    def for_sources(self, model: HookedViT, pixels: Tensor) -> ResidContext:
        """As an engine `Context` for these source images."""
        n = pixels.shape[0] if self.per_source else 1
        memo: dict[int, Tensor] = {}

        def resid(layer: int) -> Tensor:
            if layer not in memo:
                memo[layer] = self.resid_pre(model, layer, pixels)
            return memo[layer]

        return ResidContext(resid, n=n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _raw_to_pixels(raw: Tensor, model: HookedViT) -> Tensor:
    """An image in [0, 1] RGB -> the model's normalised pixel space."""
    mean = torch.tensor(model.data_config["mean"], device=raw.device).view(1, -1, 1, 1)
    std = torch.tensor(model.data_config["std"], device=raw.device).view(1, -1, 1, 1)
    return (raw - mean) / std


class ImageContext(NeutralContext):
    """A forward pass of one fixed image (its residual stream at each layer is computed once per size)."""

    def __init__(self, pixels: Float[Tensor, "1 3 H W"] | None = None, name: str = "image", raw=None) -> None:
        self.pixels, self.name, self._raw = pixels, name, raw
        self._memo: dict[tuple[int, tuple[int, int]], Tensor] = {}

    @torch.inference_mode()
    def resid_pre(self, model: HookedViT, layer: int, pixels: Tensor) -> Tensor:
        size = tuple(pixels.shape[-2:])
        key = (layer, size)
        if key not in self._memo:
            image = self._image(model, size, pixels)
            self._memo[key] = model(image, stop_at_layer=layer)
        return self._memo[key]

    def _image(self, model: HookedViT, size: tuple[int, int], pixels: Tensor) -> Tensor:
        if self.pixels is not None:
            if tuple(self.pixels.shape[-2:]) != size:
                raise ValueError(f"context image is {tuple(self.pixels.shape[-2:])}, sources are {size}")
            return self.pixels.to(pixels.device, pixels.dtype)
        return _raw_to_pixels(self._raw(size).to(pixels.device), model).to(pixels.dtype)


def grey_context() -> ImageContext:
    """A mid-grey image (0.5 in [0, 1] RGB)."""
    return ImageContext(name="grey", raw=lambda size: torch.full((1, 3, *size), 0.5))


def black_context() -> ImageContext:
    return ImageContext(name="black", raw=lambda size: torch.zeros(1, 3, *size))


def noise_context(seed: int = 0, std: float = 0.25) -> ImageContext:
    """Seeded Gaussian noise around mid-grey in [0, 1] RGB (clipped), std `std`."""

    def raw(size: tuple[int, int]) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return (0.5 + std * torch.randn(1, 3, *size, generator=g)).clamp(0, 1)

    return ImageContext(name="noise", raw=raw)


class BlurContext(NeutralContext):
    """A Gaussian-blurred copy of each source image (sigma in pixels)."""

    name = "blur"
    per_source = True

    def __init__(self, sigma: float = 10.0) -> None:
        self.sigma = sigma

    @torch.inference_mode()
    def resid_pre(self, model: HookedViT, layer: int, pixels: Tensor) -> Tensor:
        return model(gaussian_blur(pixels, self.sigma), stop_at_layer=layer)


def gaussian_blur(pixels: Float[Tensor, "b c H W"], sigma: float) -> Float[Tensor, "b c H W"]:
    """Separable Gaussian blur with reflect padding (kernel radius 3 sigma)."""
    radius = max(1, int(3 * sigma))
    radius = min(radius, min(pixels.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, device=pixels.device, dtype=pixels.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = pixels.shape[1]
    out = F.pad(pixels, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class ZeroContext(NeutralContext):
    name = "zero"

    def resid_pre(self, model: HookedViT, layer: int, pixels: Tensor) -> Tensor:
        n_pos = model.cfg.n_prefix_tokens + _n_patches(model, pixels)
        return pixels.new_zeros(1, n_pos, model.cfg.d_model)


class MeanContext(NeutralContext):
    """Mean residual stream over a reference image set, per layer and position.

    Build with `MeanContext.from_images(model, images)` (paths, PIL images or a pixel tensor), save
    with `.save(path)`, load with `MeanContext.load(path)`. `resid[l]` is the mean of
    `blocks.{l}.hook_resid_pre` ([n_layers + 1, pos, d_model]; the last entry is the final output).
    """

    name = "mean"

    def __init__(self, resid: Float[Tensor, "layer_plus_1 pos d_model"], meta: dict[str, Any] | None = None) -> None:
        self.resid, self.meta = resid, dict(meta or {})

    @classmethod
    @torch.inference_mode()
    def from_images(
        cls, model: HookedViT, images: Sequence[Any] | Tensor, batch_size: int = 32, progress: bool = True
    ) -> "MeanContext":
        n = len(images)
        if n == 0:
            raise ValueError("the reference set for a mean context is empty")
        total = None
        last = model.cfg.n_layers - 1
        names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
        names.append(f"blocks.{last}.hook_resid_post")
        for i in tqdm(range(0, n, batch_size), desc="mean context", disable=not progress, leave=False):
            chunk = images[i : i + batch_size]
            pixels = chunk.to(model.device) if isinstance(chunk, Tensor) else model.preprocess(list(chunk))
            _, cache = model.run_with_cache(pixels, names_filter=names, return_cache_object=False)
            stack = torch.stack([cache[name] for name in names]).sum(dim=1)
            total = stack if total is None else total + stack
        meta = {"model": getattr(model, "timm_name", None), "n_images": n, "grid": model.cfg.grid_size}
        return cls(total / n, meta)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"resid": self.resid.cpu(), "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeanContext":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            return cls(data["resid"], data.get("meta"))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"could not read a mean context from {path} ({type(e).__name__}: {e})") from e

    def resid_pre(self, model: HookedViT, layer: int, pixels: Tensor) -> Tensor:
        n_pos = model.cfg.n_prefix_tokens + _n_patches(model, pixels)
        expected = (model.cfg.n_layers + 1, n_pos, model.cfg.d_model)
        if tuple(self.resid.shape) != expected:
            raise ValueError(
                f"this mean context has shape {tuple(self.resid.shape)} (layers + 1, positions, d_model) but the "
                f"model and image need {expected}; compute it for this model and image size"
            )
        return self.resid[layer : layer + 1].to(pixels.device, pixels.dtype)


def _n_patches(model: HookedViT, pixels: Tensor) -> int:
    gh, gw = model.grid_size_for(pixels)
    return gh * gw


def default_mean_context_path(model: HookedViT, n_images: int) -> Path:
    """Cache file for the default mean context: named by the model and a fingerprint of its weights."""
    import hashlib

    root = Path(os.environ.get("CAAP_CACHE_DIR", Path.home() / ".cache" / "caap"))
    name = getattr(model, "timm_name", None) or "model"
    with torch.no_grad():
        sample = torch.cat([p.detach().flatten()[:256].float().cpu() for p in model.parameters()])
    digest = hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:12]
    return root / f"mean_context_{name}_{digest}_{n_images}.pt"


def mean_context_for(
    model: HookedViT, reference: Sequence[Any] | Tensor | str | os.PathLike | None = None, n_images: int = 256,
    progress: bool = True,
) -> MeanContext:
    """A mean context: from a saved file (a path ending in .pt), a reference image list / pixel
    tensor, or by default the first `n_images` of the shared one-per-class ImageNet sample (cached on
    disk under $CAAP_CACHE_DIR, default ~/.cache/caap)."""
    if isinstance(reference, (str, os.PathLike)) and str(reference).endswith(".pt"):
        return MeanContext.load(reference)
    if reference is not None and not isinstance(reference, (str, os.PathLike)):
        return MeanContext.from_images(model, reference, progress=progress)
    from caap.data import SAMPLE_1K, load_manifest, shared_data_dir

    folder = Path(reference) if reference is not None else shared_data_dir(SAMPLE_1K)
    if folder is None:
        raise FileNotFoundError(
            "the 'mean' context needs reference images: pass reference= (images, a pixel tensor, a manifest "
            f"folder or a saved .pt), or set CAAP_SHARED_DIR to the shared folder holding data/{SAMPLE_1K}"
        )
    path = default_mean_context_path(model, n_images) if reference is None else None
    if path is not None and path.is_file():
        ctx = MeanContext.load(path)
        if tuple(ctx.resid.shape[1:]) == (model.cfg.n_ctx, model.cfg.d_model):
            return ctx
    samples = load_manifest(folder, limit=n_images)
    ctx = MeanContext.from_images(model, [s.path for s in samples], progress=progress)
    if path is not None:
        ctx.save(path)
    return ctx


def get_context(
    spec: str | NeutralContext | Tensor | Any, model: HookedViT, reference: Any = None, seed: int = 0
) -> NeutralContext:
    """A neutral context from a name ("mean", "grey", "black", "blur", "noise", "zero"), a context
    object, a pixel tensor [1, 3, H, W], or an image (path, PIL image, array)."""
    if isinstance(spec, NeutralContext):
        return spec
    if isinstance(spec, str) and not os.path.exists(spec):
        makers = {
            "mean": lambda: mean_context_for(model, reference),
            "grey": grey_context,
            "gray": grey_context,
            "black": black_context,
            "blur": BlurContext,
            "noise": lambda: noise_context(seed),
            "zero": ZeroContext,
        }
        if spec not in makers:
            raise ValueError(
                f"unknown context {spec!r}; accepted: {', '.join(CONTEXT_NAMES)}, an image file, or a pixel tensor"
            )
        return makers[spec]()
    if isinstance(spec, Tensor) and spec.ndim == 4:
        if spec.shape[0] != 1:
            raise ValueError(f"a context pixel tensor must be [1, 3, H, W], got {tuple(spec.shape)}")
        return ImageContext(spec.to(model.device), name="image")
    return ImageContext(model.preprocess(spec), name="image")
