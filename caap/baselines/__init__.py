"""Baseline attribution methods for ViTs, each an `AttributionMethod` (`caap.attribution.base`):

    from caap.baselines import get_baseline
    maps = get_baseline("rollout", model).attribute(pixels, target=None)   # [batch, h, w]

| name                   | class                          | paper                                   | resolution |
|------------------------|--------------------------------|-----------------------------------------|------------|
| random                 | RandomAttribution              | sanity floor                            | patch      |
| rollout                | AttentionRollout               | Abnar & Zuidema 2020                    | patch      |
| gae                    | GenericAttentionExplainability | Chefer et al. 2021b (LRP-free)          | patch      |
| attention_gradcam      | AttentionGradCAM               | Chefer et al. 2021a's Grad-CAM baseline | patch      |
| gradsam                | GradSAM                        | Barkan et al. 2021                      | patch      |
| gradcam                | GradCAM                        | Selvaraju et al. 2017 (pytorch-grad-cam)| patch      |
| input_x_gradient       | InputXGradient                 | Shrikumar et al. 2016                   | pixel      |
| integrated_gradients   | IntegratedGradients            | Sundararajan et al. 2017                | pixel      |
| smoothgrad             | SmoothGrad                     | Smilkov et al. 2017                     | pixel      |
| occlusion              | Occlusion                      | Zeiler & Fergus 2014                    | patch      |
| rise                   | RISE                           | Petsiuk et al. 2018                     | pixel      |
| atman                  | AtMan                          | Deiseroth et al. 2023                   | patch      |
| attnlrp                | AttnLRP                        | Achtibat et al. 2024                    | patch      |
| libragrad_ixg          | LibraGradIxG                   | Mehri et al. 2025 (on Input x Gradient) | patch      |
| libragrad_gae          | LibraGradGAE                   | Mehri et al. 2025 (on GAE)              | patch      |
| libragrad_gradsam      | LibraGradGradSAM               | Mehri et al. 2025 (on Grad-SAM)         | patch      |
| tis                    | TIS                            | Englebert et al. 2023                   | patch      |
| vit_cx                 | ViTCX                          | Xie et al. 2023                         | pixel      |
| beyond_intuition_head  | BeyondIntuitionHead            | Chen et al. 2023 (BT-H)                 | patch      |
| beyond_intuition_token | BeyondIntuitionToken           | Chen et al. 2023 (BT-T)                 | patch      |

Every method with CAAP, by name, with its options read from text and its measured cost:
`caap.methods.METHODS` (the command line's `caap methods`, `caap explain --method NAME`).

Maps cover the patch tokens only (prefix tokens never get an entry); for how methods that read "the
class token's row" treat register tokens, distillation tokens and models without a class token, see
`caap.baselines._common`.
"""

from __future__ import annotations

from typing import Any

from caap.attribution.base import AttributionMethod
from caap.baselines.atman import AtMan
from caap.baselines.attention_grads import AttentionGradCAM, GradSAM
from caap.baselines.attnlrp import AttnLRP
from caap.baselines.beyond_intuition import BeyondIntuitionHead, BeyondIntuitionToken
from caap.baselines.gae import CheferGAE, GenericAttentionExplainability
from caap.baselines.gradcam import GradCAM
from caap.baselines.gradients import InputXGradient, IntegratedGradients, SmoothGrad
from caap.baselines.libragrad import LibraGradGAE, LibraGradGradSAM, LibraGradIxG
from caap.baselines.occlusion import Occlusion
from caap.baselines.random_map import RandomAttribution
from caap.baselines.rise import RISE
from caap.baselines.rollout import AttentionRollout
from caap.baselines.tis import TIS
from caap.baselines.vitcx import ViTCX
from hooked_vit import HookedViT

BASELINES: dict[str, type[AttributionMethod]] = {
    cls.name: cls
    for cls in (
        RandomAttribution,
        AttentionRollout,
        GenericAttentionExplainability,
        AttentionGradCAM,
        GradSAM,
        GradCAM,
        InputXGradient,
        IntegratedGradients,
        SmoothGrad,
        Occlusion,
        RISE,
        AtMan,
        AttnLRP,
        LibraGradIxG,
        LibraGradGAE,
        LibraGradGradSAM,
        TIS,
        ViTCX,
        BeyondIntuitionHead,
        BeyondIntuitionToken,
    )
}
"""Registry: method name -> class (each class's `name`)."""


def get_baseline(name: str, model: HookedViT, **kwargs: Any) -> AttributionMethod:
    """Build the baseline called `name` (case and '-' / '_' do not matter) for `model`; keyword
    arguments go to its constructor."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; accepted names: {', '.join(BASELINES)}")
    return BASELINES[key](model, **kwargs)


__all__ = [
    "BASELINES",
    "get_baseline",
    "AtMan",
    "AttentionGradCAM",
    "AttentionRollout",
    "AttnLRP",
    "BeyondIntuitionHead",
    "BeyondIntuitionToken",
    "CheferGAE",
    "GenericAttentionExplainability",
    "GradCAM",
    "GradSAM",
    "InputXGradient",
    "IntegratedGradients",
    "LibraGradGAE",
    "LibraGradGradSAM",
    "LibraGradIxG",
    "Occlusion",
    "RISE",
    "RandomAttribution",
    "SmoothGrad",
    "TIS",
    "ViTCX",
]
