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

`get_context(spec, model)` builds one from any of these (a name always means the context, even where a
file of that name exists). `context.bind(model, pixels)` ties it to a model and source images, giving
what the patching engine consumes.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from caap.files import atomic_path
from caap.patching.engine import Context, InputContext, ResidContext
from hooked_vit import HookedViT, act_name
from hooked_vit.checks import check_positive_int
from hooked_vit.preprocess import gaussian_blur, normalize


class NeutralContext(ABC):
    """A neutral target context, not yet tied to a model or images.

    `bind(model, pixels)` ties it to a model and a batch of source images and returns what the patching
    engine consumes (`caap.patching.engine.Context`): the context rows' residual stream entering any
    block, and their model inputs where the context is a real image (so that writes before the first
    block work too). A context that depends on the source image ("blur") has one row per image; the
    others have one row, shared by all images.
    """

    name: str = "context"

    @abstractmethod
    def bind(self, model: HookedViT, pixels: Float[Tensor, "batch chan H W"]) -> Context:
        """The engine's context for these source images."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ImageContext(NeutralContext):
    """A forward pass of one fixed image: given as model pixels [1, 3, H, W], or as a function
    `raw(size) -> [1, 3, H, W]` in [0, 1] RGB for any image size (grey, black, noise)."""

    def __init__(
        self, pixels: Float[Tensor, "1 chan H W"] | None = None, name: str = "image",
        raw: Callable[[tuple[int, int]], Tensor] | None = None,
    ) -> None:
        if (pixels is None) == (raw is None):
            raise ValueError("ImageContext needs exactly one of pixels= (model pixels [1, 3, H, W]) or raw=")
        self.pixels, self.name, self._raw = pixels, name, raw

    def bind(self, model: HookedViT, pixels: Tensor) -> Context:
        return InputContext(model, self.image(model, tuple(pixels.shape[-2:]), pixels))

    def image(self, model: HookedViT, size: tuple[int, int], like: Tensor) -> Float[Tensor, "1 chan H W"]:
        """The context image in the model's pixel space, at `size`, on `like`'s device and dtype."""
        if self.pixels is not None:
            if tuple(self.pixels.shape[-2:]) != size:
                raise ValueError(f"context image is {tuple(self.pixels.shape[-2:])}, sources are {size}")
            return self.pixels.to(like.device, like.dtype)
        return normalize(self._raw(size).to(like.device), model.data_config).to(like.dtype)


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
    """A Gaussian-blurred copy of each source image (sigma in pixels): one context row per image."""

    name = "blur"

    def __init__(self, sigma: float = 10.0) -> None:
        self.sigma = sigma

    @torch.inference_mode()
    def bind(self, model: HookedViT, pixels: Tensor) -> Context:
        return InputContext(model, gaussian_blur(pixels, self.sigma))


class ZeroContext(NeutralContext):
    """An all-zero residual stream at every block (one row)."""

    name = "zero"

    def bind(self, model: HookedViT, pixels: Tensor) -> Context:
        zeros = pixels.new_zeros(1, model.cfg.n_prefix_tokens + _n_patches(model, pixels), model.cfg.d_model)
        return ResidContext(lambda layer: zeros, n=1)


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
        batch_size = check_positive_int(batch_size, "batch_size")
        n = len(images)
        if n == 0:
            raise ValueError("the reference set for a mean context is empty")
        total = None
        last = model.cfg.n_layers - 1
        names = [act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
        names.append(act_name("resid_post", last))
        for i in tqdm(range(0, n, batch_size), desc="mean context", disable=not progress, leave=False):
            chunk = images[i : i + batch_size]
            pixels = chunk.to(model.device) if isinstance(chunk, Tensor) else model.preprocess(list(chunk))
            _, cache = model.run_with_cache(pixels, names_filter=names, return_cache_object=False)
            stack = torch.stack([cache[name] for name in names]).sum(dim=1)
            total = stack if total is None else total + stack
        meta = {"model": getattr(model, "timm_name", None), "n_images": n, "grid": model.cfg.grid_size}
        return cls(total / n, meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` atomically (a temporary file renamed into place: readers never see half a file,
        and of two concurrent writers one complete file wins)."""
        with atomic_path(path) as tmp:
            torch.save({"resid": self.resid.cpu(), "meta": self.meta}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MeanContext":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            resid = data["resid"]
            if not isinstance(resid, Tensor) or resid.ndim != 3:
                raise ValueError(f"'resid' must be a tensor [layers + 1, pos, d_model], got {type(resid).__name__}")
            return cls(resid, data.get("meta"))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"could not read a mean context from {path} ({type(e).__name__}: {e})") from e

    def bind(self, model: HookedViT, pixels: Tensor) -> Context:
        n_pos = model.cfg.n_prefix_tokens + _n_patches(model, pixels)
        expected = (model.cfg.n_layers + 1, n_pos, model.cfg.d_model)
        if tuple(self.resid.shape) != expected:
            raise ValueError(
                f"this mean context has shape {tuple(self.resid.shape)} (layers + 1, positions, d_model) but the "
                f"model and image need {expected}; compute it for this model and image size"
            )
        resid = self.resid.to(pixels.device, pixels.dtype)
        return ResidContext(lambda layer: resid[layer : layer + 1], n=1)


def _n_patches(model: HookedViT, pixels: Tensor) -> int:
    gh, gw = model.grid_size_for(pixels)
    return gh * gw


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer of `model` (names, shapes, dtypes and all values): a model
    edited in place gets a new fingerprint."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where caap caches what it computes once (the default mean context): `$CAAP_CACHE_DIR`, default
    `~/.cache/caap`. Everything there can be deleted; it is recomputed when needed."""
    return Path(os.environ.get("CAAP_CACHE_DIR") or Path.home() / ".cache" / "caap")


def default_mean_context_path(model: HookedViT, n_images: int) -> Path:
    """Cache file for the default mean context: named by the model and a fingerprint of all its weights."""
    name = getattr(model, "timm_name", None) or "model"
    return cache_dir() / f"mean_context_{name}_{weights_fingerprint(model)}_{n_images}.pt"


def mean_context_for(
    model: HookedViT, reference: Sequence[Any] | Tensor | str | os.PathLike | None = None, n_images: int = 256,
    progress: bool = True,
) -> MeanContext:
    """A mean context: from a saved file (a path ending in .pt), a reference image list / pixel
    tensor, a manifest folder, or by default the first `n_images` of the shared one-per-class ImageNet
    sample (cached on disk, see `cache_dir`; a cache file that cannot be read, or that does not fit the
    model, is recomputed and replaced)."""
    n_images = check_positive_int(n_images, "n_images")
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
        try:
            ctx = MeanContext.load(path)
        except ValueError as e:
            warnings.warn(f"recomputing the mean context: the cache file is unusable ({e})", stacklevel=2)
        else:
            if tuple(ctx.resid.shape) == (model.cfg.n_layers + 1, model.cfg.n_ctx, model.cfg.d_model):
                return ctx
            warnings.warn(f"recomputing the mean context: the cache file {path} does not fit the model", stacklevel=2)
    samples = load_manifest(folder, limit=n_images)
    ctx = MeanContext.from_images(model, [s.path for s in samples], progress=progress)
    if path is not None:
        ctx.save(path)
    return ctx


CONTEXT_MAKERS: dict[str, Callable[..., NeutralContext]] = {
    "mean": lambda model, reference, seed: mean_context_for(model, reference),
    "grey": lambda model, reference, seed: grey_context(),
    "black": lambda model, reference, seed: black_context(),
    "blur": lambda model, reference, seed: BlurContext(),
    "noise": lambda model, reference, seed: noise_context(seed),
    "zero": lambda model, reference, seed: ZeroContext(),
}


CONTEXT_NAMES: tuple[str, ...] = tuple(CONTEXT_MAKERS)


def check_context_spec(spec: str | os.PathLike) -> None:
    """A string context must be one of `CONTEXT_NAMES` (a name wins over a file of that name) or an
    existing image file; anything else is a ValueError that lists what is accepted. The command line
    calls this before it loads a model; `get_context` calls it too."""
    if isinstance(spec, str) and spec in CONTEXT_MAKERS:
        return
    if not os.path.isfile(spec):
        raise ValueError(
            f"unknown context {os.fspath(spec)!r}: not a context name and not an image file; accepted: "
            f"{', '.join(CONTEXT_NAMES)}, an image file, or a pixel tensor [1, 3, H, W]"
        )


def get_context(
    spec: str | os.PathLike | NeutralContext | Tensor | Any, model: HookedViT, reference: Any = None, seed: int = 0
) -> NeutralContext:
    """A neutral context from a name (`CONTEXT_NAMES`), a context object, a pixel tensor [1, 3, H, W],
    or an image (a path, a PIL image, an array).

    A string is a name when it is one of `CONTEXT_NAMES`, whatever files the working directory holds
    (names before paths: a file called `blur` does not replace the blur context; write `./blur` for
    it). Any other string must be an existing image file."""
    if isinstance(spec, NeutralContext):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        check_context_spec(spec)
        if isinstance(spec, str) and spec in CONTEXT_MAKERS:
            return CONTEXT_MAKERS[spec](model, reference, seed)
    if isinstance(spec, Tensor) and spec.ndim == 4:
        if spec.shape[0] != 1:
            raise ValueError(f"a context pixel tensor must be [1, 3, H, W], got {tuple(spec.shape)}")
        return ImageContext(spec.to(model.device), name="image")
    return ImageContext(model.preprocess(spec), name="image")
