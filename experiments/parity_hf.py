"""Parity of `HookedViT.from_hf` with its Hugging Face source, one row per convertible class, on random
small configs (fp32, CPU, no network).

    python experiments/parity_hf.py

For each case: a random `transformers` model (width 32, 2 layers, 2 heads, 32x32 images, 8x8 patches;
every parameter redrawn at a scale where attention is far from uniform, so that a dropped or swapped
parameter shows), converted; then the max |difference| between the HookedViT's output and the source's
(`hooked_vit.hf.hf_reference_output`: logits, or the features a headless model returns) on two images:
on the fast path (no hooks), on the explicit path (`run_with_cache`, every hook attached), of every
block's output (forward hooks on the source's layers), and at two other image sizes (24x40 and 48x48)
with the position embeddings interpolated as the source does. Then, for each family's image processor
with the settings its published checkpoints use (`PROCESSOR_CASES`), the max |difference| between
`preprocess` and the processor's own output on a real photo (the first of ../shared/data where present, else
scikit-image's `chelsea`) and on a synthetic 75x130 image. The tests (tests/test_hooked_vit_hf.py) build
their models and processors here and require every figure <= 1e-5.
"""

from __future__ import annotations

import argparse
import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from hooked_vit import HookedViT
from hooked_vit.hf import FAMILIES, HF_CLASSES, hf_reference_output

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
OTHER_SIZES = [(24, 40), (48, 48)]

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("ViTForImageClassification", dict(num_labels=10)),
    "vit_gelu_new_no_qkv_bias": ("ViTForImageClassification", dict(num_labels=10, hidden_act="gelu_new", qkv_bias=False)),
    "vit_features": ("ViTModel", {}),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", dict(num_labels=10)),
    "deit": ("DeiTForImageClassification", dict(num_labels=10)),
    "deit_features": ("DeiTModel", {}),
    "dinov2_features": ("Dinov2Model", {}),
    "dinov2": ("Dinov2ForImageClassification", dict(num_labels=10)),
    "dinov2_swiglu": ("Dinov2ForImageClassification", dict(num_labels=10, use_swiglu_ffn=True)),
    "dinov2_registers_features": ("Dinov2WithRegistersModel", dict(num_register_tokens=2)),
    "dinov2_registers": ("Dinov2WithRegistersForImageClassification", dict(num_labels=10, num_register_tokens=2)),
    "dinov2_registers_swiglu": ("Dinov2WithRegistersForImageClassification",
                                dict(num_labels=10, num_register_tokens=2, use_swiglu_ffn=True)),
    "clip_features": ("CLIPVisionModel", {}),
    "clip_projection": ("CLIPVisionModelWithProjection", dict(projection_dim=16)),
    "clip_model": ("CLIPModel", dict(projection_dim=16)),
    "clip_classifier": ("CLIPForImageClassification", dict(num_labels=10)),
    "siglip_features": ("SiglipVisionModel", {}),
    "siglip_no_head": ("SiglipVisionModel", dict(vision_use_head=False)),
    "siglip_model": ("SiglipModel", {}),
    "siglip_classifier": ("SiglipForImageClassification", dict(num_labels=10)),
}
"""Case name -> (transformers class, config options): every class of `hooked_vit.hf.HF_CLASSES`, and the
config variants the conversion reads (activation, qkv bias, SwiGLU, registers, head or none)."""

_CONFIGS = {"vit": "ViTConfig", "deit": "DeiTConfig", "dinov2": "Dinov2Config",
            "dinov2_registers": "Dinov2WithRegistersConfig", "clip": "CLIPVisionConfig", "siglip": "SiglipVisionConfig"}
_COMPOSITE = {"CLIPModel": ("CLIPConfig", "CLIPTextConfig"), "CLIPForImageClassification": ("CLIPConfig", "CLIPTextConfig"),
              "SiglipModel": ("SiglipConfig", "SiglipTextConfig"),
              "SiglipForImageClassification": ("SiglipConfig", "SiglipTextConfig")}
_TOP_LEVEL = ("num_labels", "projection_dim")


IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
PROCESSOR_CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "vit (224x224 bilinear, mean = std = 0.5)": ("ViTImageProcessor", {}, 224),
    "deit (256x256, crop 224, bicubic)": ("DeiTImageProcessor", dict(IMAGENET), 224),
    "dinov2 (shortest edge 256, crop 224)": ("BitImageProcessor", dict(size={"shortest_edge": 256}, **IMAGENET), 224),
    "clip (shortest edge 224, crop 224)": ("CLIPImageProcessor", {}, 224),
    "siglip (224x224 bicubic)": ("SiglipImageProcessor", {}, 224),
    "siglip (384x384 bicubic)": ("SiglipImageProcessor", dict(size={"height": 384, "width": 384}), 384),
}
"""Each family's image processor with its published checkpoints' settings: (class, options, output size)."""


def photo() -> Any:
    """A real photo: the first dev photo of ../shared/data where present, else scikit-image's `chelsea`."""
    from PIL import Image

    from caap import data as caap_data

    data = caap_data.shared_data_dir()
    if data is not None:
        with Image.open(caap_data.load_manifest(data, split="dev")[0].path) as im:
            return im.convert("RGB")
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


def synthetic() -> Any:
    """A non-square synthetic image with sharp edges and gradients (resampling differences show)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:75, 0:130]
    rgb = np.stack([(x * 2) % 256, (y * 3) % 256, ((x // 8 + y // 8) % 2) * 255], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def preprocessing_parity(case: str) -> float:
    """Max |`hooked_vit.preprocess` - the processor's output| over `photo()` and `synthetic()`."""
    import transformers

    from hooked_vit import HookedViTConfig
    from hooked_vit.preprocess import data_config_from_processor, preprocess

    name, options, size = PROCESSOR_CASES[case]
    processor = getattr(transformers, name)(**options)
    cfg = HookedViTConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, d_mlp=8, img_size=size, patch_size=16)
    data_config = data_config_from_processor(processor, cfg, {})
    worst = 0.0
    for image in (photo(), synthetic()):
        expected = processor(images=image, return_tensors="pt")["pixel_values"]
        ours = preprocess(image, data_config)
        if ours.shape != expected.shape:
            raise AssertionError(f"{case}: {tuple(ours.shape)} != the processor's {tuple(expected.shape)}")
        worst = max(worst, (ours - expected).abs().max().item())
    return worst


def scramble_hf(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter at a scale where attention is far from uniform and outputs are O(1)
    (transformers' init gives near-uniform attention and near-zero outputs, where a wrong conversion can
    hide): matrices N(0, 1/fan_in), tokens and position embeddings N(0, 0.5^2), LayerScale in [0.5, 1.5],
    norm gains 1 + N(0, 0.1^2), biases N(0, 0.1^2). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if any(k in name for k in ("token", "position", "class_embedding", "probe")):
                p.copy_(0.5 * r)
            elif "lambda1" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def build(case: str, seed: int = 0) -> nn.Module:
    """The random `transformers` model of `CASES[case]`, scrambled (`scramble_hf`), in eval mode."""
    import transformers

    class_name, options = CASES[case]
    family = HF_CLASSES[class_name].family
    vision = {**SMALL, **{k: v for k, v in options.items() if k not in _TOP_LEVEL or class_name not in _COMPOSITE}}
    if class_name in _COMPOSITE:
        top, text = _COMPOSITE[class_name]
        config = getattr(transformers, top)(
            vision_config=getattr(transformers, _CONFIGS[family])(**vision).to_dict(),
            text_config=getattr(transformers, text)(**TEXT).to_dict(),
            **{k: v for k, v in options.items() if k in _TOP_LEVEL})
    else:
        config = getattr(transformers, _CONFIGS[family])(**vision)
    torch.manual_seed(seed)
    return scramble_hf(getattr(transformers, class_name)(config), seed)


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The source's transformer layers (what each HookedViT block equals)."""
    spec = HF_CLASSES[type(model).__name__]
    tower = model
    for part in filter(None, spec.tower.split(".")):
        tower = getattr(tower, part)
    for path in ("layers", "encoder.layer", "encoder.layers"):
        node: Any = tower
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return node
    raise AttributeError(f"no layer list in {type(tower).__name__}")


def convert(model: nn.Module, dynamic: bool = False) -> HookedViT:
    """`HookedViT.from_hf(model)`, without the no-processor warning (random models have none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedViT.from_hf(model, dynamic_img_size=True if dynamic else None)


def parity(case: str, batch: int = 2) -> dict[str, float]:
    """Max |difference| HookedViT - source for `case`: output on the fast and the explicit path, block
    outputs, and the outputs at `OTHER_SIZES` (position embeddings interpolated)."""
    model = build(case)
    hooked = convert(model)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for layer in layers_of(model)]
    try:
        with torch.inference_mode():
            ref = hf_reference_output(model, x)
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode():
        fast = hooked(x)
        explicit, cache = hooked.run_with_cache(x)
    blocks = max((cache[f"blocks.{i}.hook_resid_post"] - o).abs().max().item() for i, o in enumerate(outputs))
    dynamic = convert(model, dynamic=True)
    interpolate = FAMILIES[HF_CLASSES[type(model).__name__].family].accepts_interpolate_flag
    other = 0.0
    for size in OTHER_SIZES:
        y = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            other = max(other, (dynamic(y) - hf_reference_output(model, y, interpolate)).abs().max().item())
    return {"fast": (fast - ref).abs().max().item(), "explicit": (explicit - ref).abs().max().item(),
            "blocks": blocks, "other_sizes": other, "scale": ref.abs().max().item(), "shape": tuple(ref.shape)}


def _shared() -> bool:
    from caap import data as caap_data

    return caap_data.shared_data_dir() is not None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args(argv)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}; fp32, CPU; max abs difference HookedViT - source")
    print("| case | class | output | fast path | every hook | block outputs | 24x40, 48x48 | max abs output |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for case in args.cases:
        r = parity(case)
        worst = max(worst, r["fast"], r["explicit"], r["blocks"], r["other_sizes"])
        print(f"| {case} | {CASES[case][0]} | {list(r['shape'])} | {r['fast']:.1e} | {r['explicit']:.1e} | "
              f"{r['blocks']:.1e} | {r['other_sizes']:.1e} | {r['scale']:.2f} |")
    print(f"worst: {worst:.1e}")
    print()
    print(f"preprocessing: max abs difference HookedViT.preprocess - the image processor output, on a real photo "
          f"({'../shared/data' if _shared() else 'scikit-image chelsea'}) and a synthetic 75x130 image")
    print("| processor | max abs difference |")
    print("|---|---|")
    for case in PROCESSOR_CASES:
        print(f"| {case} | {preprocessing_parity(case):.1e} |")


if __name__ == "__main__":
    main()
