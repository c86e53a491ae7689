"""Shared fixtures for the HookedViT tests (random timm weights, no network).

`timm_vit(name, **timm_kwargs)` builds a timm model with random weights whose "usually trivial"
parameters (LayerScale gammas, class / register / distillation tokens, position embeddings, biases,
norm weights) are perturbed with noise, so that a conversion that dropped or swapped one of them
would show. Models are cached for the session (tests must not modify them); `hooked_pair` converts a
fresh HookedViT each call, so tests may add hooks or change options on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn

from hooked_vit import HookedViT

# Small sizes for structure tests (what matters there is the architecture, not the width).
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def scramble(model: HookedViT, seed: int = 0, biases: bool = True) -> HookedViT:
    """Random weights at a scale where attention is far from uniform and logits are O(1) (timm's init
    gives near-uniform attention and near-zero logits, where every map is flat): the attribution tests'
    models. LayerNorm weights and LayerScale near 1; `biases=False` zeroes every bias (linear layers,
    convolution, LayerNorm shifts, head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "token" in name or "pos_embed" in name:
                p.copy_(0.5 * r)
            elif p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif name.endswith(".w") or "ls_gamma" in name:
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r if biases else torch.zeros_like(r))
    return model.eval()


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter that timm initialises to a constant (0, 1, 1e-5, ...)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):  # LayerScale: timm starts at 1e-5 or 1
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name in ("cls_token", "reg_token", "dist_token"):
                p.add_(0.5 * noise)
            elif name == "pos_embed" or name.endswith("bias"):
                p.add_(0.1 * noise)
            elif "norm" in name and name.endswith("weight"):  # LayerNorm gains (incl. q/k-norm)
                p.add_(0.2 * noise)
    return model.eval()


_CACHE: dict[tuple, nn.Module] = {}


def _timm_vit(name: str, **timm_kwargs: Any) -> nn.Module:
    import timm

    key = (name, tuple(sorted((k, repr(v)) for k, v in timm_kwargs.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = perturb_(timm.create_model(name, pretrained=False, **timm_kwargs))
    return _CACHE[key]


@pytest.fixture(scope="session")
def timm_vit() -> Callable[..., nn.Module]:
    """`timm_vit(name, **timm_kwargs)`: a perturbed random-weight timm model in eval mode (cached)."""
    return _timm_vit


@pytest.fixture(scope="session")
def hooked_pair() -> Callable[..., tuple[nn.Module, HookedViT]]:
    """`hooked_pair(name, **timm_kwargs)` -> (timm model, a fresh HookedViT converted from it)."""

    def make(name: str, **timm_kwargs: Any) -> tuple[nn.Module, HookedViT]:
        timm_model = _timm_vit(name, **timm_kwargs)
        return timm_model, HookedViT.from_timm(timm_model)

    return make


@pytest.fixture(scope="session")
def small_kwargs() -> dict[str, int]:
    """timm kwargs that shrink a ViT to 2 blocks of width 64 with 2 heads."""
    return dict(SMALL)


def random_pixels(model: HookedViT | nn.Module, batch: int = 2, size: tuple[int, int] | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Gaussian pixels [batch, 3, H, W] at the model's native size (or `size`)."""
    if size is None:
        size = model.cfg.img_size if isinstance(model, HookedViT) else tuple(model.patch_embed.img_size)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def pixels() -> Callable[..., torch.Tensor]:
    """`pixels(model, batch=2, size=None, seed=0)`: deterministic Gaussian pixels for the model."""
    return random_pixels
