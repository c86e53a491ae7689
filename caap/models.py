"""Finding a model's weights the same way everywhere (the command line, the experiments):
`--checkpoint PATH`, else `$CAAP_CHECKPOINT_DIR/<timm name>.pth`, else the shared models folder
(`caap.data.shared_dir()/models`, i.e. `../shared/models` beside the checkout), else the hub (which
honours `HF_HUB_OFFLINE` and gives up after `$CAAP_HUB_TIMEOUT` seconds; see `hooked_vit.loading`).

A model name that is a folder written by a Hugging Face model's `save_pretrained` (config.json beside
the weights) is that model, read offline with its image processor (`HookedViT.from_hf`)."""

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


def is_hf_folder(name: str | os.PathLike) -> bool:
    """Whether `name` is a folder written by a Hugging Face model's `save_pretrained` (it has a config.json)."""
    path = Path(name)
    return path.is_dir() and (path / "config.json").is_file()


def model_config(name: str) -> tuple[HookedViTConfig, dict[str, Any]]:
    """The architecture and data config of the timm model `name` (or of a Hugging Face `save_pretrained`
    folder), read without weights or network (timm: on the meta device), so that arguments can be checked
    against it before anything heavy happens. Raises ValueError for a name timm does not know,
    `UnsupportedFeature` for a model HookedViT cannot convert."""
    from timm.data import resolve_data_config

    if is_hf_folder(name):
        from hooked_vit.hf import folder_config

        return folder_config(name)

    from hooked_vit.loading import config_from_timm, timm_skeleton

    skeleton = timm_skeleton(name)
    return config_from_timm(skeleton), resolve_data_config({}, model=skeleton)


def class_label(model: Any, index: int) -> str:
    """The name of class `index` of `model`: its own class names where it has them (a Hugging Face
    classifier's labels, a zero-shot head's), ImageNet's for a 1000-class model, else "class <index>"."""
    names = getattr(model, "class_names", None)
    if names is not None:
        return names[index] if 0 <= index < len(names) else f"class {index}"
    if getattr(getattr(model, "cfg", None), "n_classes", 1000) == 1000:
        from caap.data import class_name

        return class_name(index)
    return f"class {index}"


def load_model(
    name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device | None = None
) -> HookedViT:
    """A pretrained HookedViT from a timm name, with weights found as `find_checkpoint` says, or from a
    Hugging Face `save_pretrained` folder (which holds its own weights: no `checkpoint`)."""
    if is_hf_folder(name):
        if checkpoint is not None:
            raise ValueError(f"{name} is a Hugging Face model folder holding its own weights; a checkpoint file is "
                             f"for timm model names")
        return HookedViT.from_hf(name, device=device)
    return HookedViT.from_timm(name, checkpoint_path=find_checkpoint(name, checkpoint), pretrained=True, device=device)
