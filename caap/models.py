"""Finding a model's weights the same way everywhere (the command line, the experiments):
`--checkpoint PATH`, else `<CAAP_CHECKPOINT_DIR>/<timm name>.pth`, else the hub."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hooked_vit import HookedViT

CHECKPOINT_DIR_ENV = "CAAP_CHECKPOINT_DIR"


def find_checkpoint(name: str, checkpoint: str | os.PathLike | None = None) -> Path | None:
    """The local checkpoint for `name`: the given path, else `$CAAP_CHECKPOINT_DIR/<name>.pth`
    (or .safetensors) where it exists, else None (meaning: the hub)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return path
    folder = os.environ.get(CHECKPOINT_DIR_ENV)
    if folder:
        for ext in (".pth", ".safetensors", ".bin"):
            path = Path(folder) / f"{name}{ext}"
            if path.is_file():
                return path
    return None


def load_model(
    name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> HookedViT:
    """A pretrained HookedViT from a timm name, with weights found as `find_checkpoint` says."""
    path = find_checkpoint(name, checkpoint)
    try:
        return HookedViT.from_timm(name, checkpoint_path=path, pretrained=True, device=device)
    except RuntimeError as e:
        if path is None and "hub" in str(e):
            raise RuntimeError(
                f"no local weights for {name!r} and the hub is unreachable: pass --checkpoint PATH, or set "
                f"{CHECKPOINT_DIR_ENV} to a folder holding {name}.pth"
            ) from e
        raise
