"""Finding a model's weights the same way everywhere (the command line, the experiments):
`--checkpoint PATH`, else `$CAAP_CHECKPOINT_DIR/<timm name>.pth`, else the shared models folder
(`caap.data.shared_dir()/models`, i.e. `../shared/models` beside the checkout), else the hub (which
honours `HF_HUB_OFFLINE` and gives up after `$CAAP_HUB_TIMEOUT` seconds; see `hooked_vit.loading`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hooked_vit import HookedViT, HookedViTConfig

CHECKPOINT_DIR_ENV = "CAAP_CHECKPOINT_DIR"
CHECKPOINT_EXTENSIONS = (".pth", ".safetensors", ".bin")


def find_checkpoint(name: str, checkpoint: str | os.PathLike | None = None) -> Path | None:
    """The local checkpoint for `name`: the given path, else `<folder>/<name>.pth` (or .safetensors,
    .bin) in `$CAAP_CHECKPOINT_DIR`, then in the shared models folder, else None (meaning: the hub)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return path
    from caap.data import shared_dir

    folders = [Path(os.environ[CHECKPOINT_DIR_ENV])] if os.environ.get(CHECKPOINT_DIR_ENV) else []
    shared = shared_dir()
    if shared is not None:
        folders.append(shared / "models")
    for folder in folders:
        for ext in CHECKPOINT_EXTENSIONS:
            path = folder / f"{name}{ext}"
            if path.is_file():
                return path
    return None


def model_config(name: str) -> tuple[HookedViTConfig, dict[str, Any]]:
    """The architecture and data config of the timm model `name`, read without weights or network
    (meta device), so that arguments can be checked against it before anything heavy happens. Raises
    ValueError for a name timm does not know, `UnsupportedTimmFeature` for a model HookedViT cannot
    convert."""
    from timm.data import resolve_data_config

    from hooked_vit.loading import config_from_timm, timm_skeleton

    skeleton = timm_skeleton(name)
    return config_from_timm(skeleton), resolve_data_config({}, model=skeleton)


def load_model(
    name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> HookedViT:
    """A pretrained HookedViT from a timm name, with weights found as `find_checkpoint` says."""
    return HookedViT.from_timm(name, checkpoint_path=find_checkpoint(name, checkpoint), pretrained=True, device=device)
