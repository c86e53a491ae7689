"""Grad-CAM on a ViT's patch tokens (Selvaraju et al. 2017, as pytorch-grad-cam applies it to ViTs)."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import BASELINE_SCORES, check_choice, finish, grad_mode, leaf_input
from caap.targets import Score, class_score
from hooked_vit import HookedViT, act_name


class GradCAM(AttributionMethod):
    """Grad-CAM: Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization" (ICCV), adapted to ViTs as in pytorch-grad-cam's ViT example
    (`target_layers=[model.blocks[-1].norm1]`, a reshape that drops the class token).

    The activations are the patch tokens of a hooked activation, by default the output of the last
    block's first LayerNorm (`blocks.{L-1}.ln1.hook_normalized`, pytorch-grad-cam's `blocks[-1].norm1`),
    viewed as a [d_model, grid_h, grid_w] feature map:
        w_c = mean over patches of dy_t/dA_c ,   map = ReLU(sum_c w_c A_c)
    with y_t the target logit (pytorch-grad-cam's `ClassifierOutputTarget`). All prefix tokens (class,
    registers, distillation) are dropped, as pytorch-grad-cam's reshape drops the class token. The map
    stays on the patch grid and is not min-max rescaled (pytorch-grad-cam rescales and upsamples for
    display).

    Note: with class-token pooling the patch tokens of the *output* of the last block (its
    `hook_resid_post`) do not reach the logits, so their gradient is zero: keep a hook inside the last
    block or earlier.

    Args:
        hook_name: a hook with a token axis, [batch, pos, d] (default: the last block's
            `ln1.hook_normalized`).
        score: "logit" (default), "prob" or "log_prob".
    """

    name = "gradcam"
    summary = "Grad-CAM on the last block's normalised patch tokens"
    paper = "Selvaraju et al. 2017 (ICCV)"
    resolution = "patch"

    def __init__(self, model: HookedViT, hook_name: str | None = None, score: Score = "logit") -> None:
        super().__init__(model)
        check_choice("score", score, BASELINE_SCORES)
        hook_name = hook_name or act_name("normalized", model.cfg.n_layers - 1, "ln1")
        if hook_name not in model.hook_dict:
            raise ValueError(f"unknown hook name {hook_name!r}; model.hook_dict lists the accepted names")
        self.hook_name, self.score = hook_name, score

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        grid = self.model.grid_size_for(pixels)
        store: dict[str, Tensor] = {}

        def save(act: Tensor, hook) -> None:
            store["act"] = act

        with grad_mode():
            x, targets = leaf_input(pixels), targets.clone()  # clones: the caller may be in inference mode
            with self.model.hooks(fwd_hooks=[(self.hook_name, save)]):
                logits = self.model(x)
            act = store["act"]
            if act.ndim != 3:
                raise ValueError(f"{self.hook_name} must have shape [batch, pos, d]; got {tuple(act.shape)}")
            (grad,) = torch.autograd.grad(class_score(logits, targets, self.score).sum(), act)
        p = self.model.cfg.n_prefix_tokens
        act, grad = act.detach()[:, p:], grad[:, p:]  # [batch, n_patches, d]
        weights = grad.mean(dim=1, keepdim=True)
        cam = (weights * act).sum(dim=-1).clamp(min=0)
        return finish(self.model.to_grid(cam, grid), pixels.device)

    def __repr__(self) -> str:
        return f"GradCAM(hook_name={self.hook_name!r}, score={self.score!r})"
