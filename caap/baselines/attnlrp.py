"""AttnLRP: Layer-wise Relevance Propagation through attention (Achtibat et al., ICML 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._common import BASELINE_SCORES, check_choice, finish, grad_mode, leaf_input
from caap.baselines._rules import check_rule_support, epsilon_grad, rule_hooks
from caap.targets import Score, class_score
from hooked_vit import HookedViT

Level = Literal["token", "pixel"]


class AttnLRP(AttributionMethod):
    """AttnLRP: Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek 2024, "AttnLRP: Attention-Aware
    Layer-Wise Relevance Propagation for Transformers" (ICML 2024).

    One forward and one backward pass in the gradient x input form of LRP (the paper's Section 3.4 and
    the authors' efficient LXT implementation): forward hooks keep every forward value and change only the
    backward pass (`caap.baselines._rules`):
      - softmax: the paper's softmax rule R_in = x ⊙ (R_out - s Σ R_out), which in this form is the
        softmax's own gradient (the rule is not conservative: what it loses is its bias term);
      - the bilinear products q·k and A·V: the uniform rule (half of the relevance to each factor), i.e.
        the gradient scaled by 1/4 at the query and key and by 1/2 at the value;
      - LayerNorm: the identity rule on the normalisation (its scale held constant);
      - the MLP activation (GELU and the other gated ones): the identity rule (gradient times act(x)/x);
      - linear layers (patch embedding, qkv, attention output, MLP, head): the epsilon rule, the gradient
        scaled by z / (z + ε sign z).
    With ε = 0 and no biases the relevance at the input of block 0 sums to the target logit minus what
    the softmax rule absorbs (tested); biases absorb their share as in LRP.

    Output:
      level="token" (default): the relevance of each patch token at the input of block 0 (patch embedding
        plus its position embedding, after `ln_pre` where there is one), summed over channels
        [batch, grid_h, grid_w]; the prefix tokens' relevance is not in the map.
      level="pixel": gradient x input on the normalised pixels, summed over channels [batch, H, W].

    Departures from the authors' code (github.com/rachtibat/LRP-eXplains-Transformers): for ViTs their
    example applies zennit's gamma rule to the patch embedding and the linear layers and CP-LRP (attention
    held constant) inside attention, tuned for visual quality; here the paper's AttnLRP rules are used
    everywhere, with the epsilon rule on every linear layer (ε = 1e-6 by default, as their explicit
    implementation; their efficient one uses ε = 0). The default map is at the token level, where
    conservation is checked, rather than their pixel heatmaps (`level="pixel"` gives those). Raw values
    (no rescaling). Models with qk-norm are refused (no rule for a LayerNorm inside attention).

    Args:
        level: "token" or "pixel" (see above).
        epsilon: the epsilon rule's stabiliser (0 = plain gradient through linear layers).
        score: "logit" (the paper), "prob" or "log_prob".
    """

    name = "attnlrp"
    summary = "layer-wise relevance propagation with attention-aware rules"
    paper = "Achtibat et al. 2024 (ICML)"
    resolution = "patch"

    def __init__(self, model: HookedViT, level: Level = "token", epsilon: float = 1e-6, score: Score = "logit") -> None:
        super().__init__(model)
        check_rule_support(model, "AttnLRP")
        check_choice("level", level, ("token", "pixel"))
        check_choice("score", score, BASELINE_SCORES)
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or epsilon < 0:
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        self.level, self.epsilon, self.score = level, float(epsilon), score
        self.resolution = "pixel" if level == "pixel" else "patch"

    def relevance(
        self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]
    ) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch H W"]]:
        """(relevance of every token at the input of block 0, prefix tokens included [batch, pos];
        relevance of the pixels summed over channels [batch, H, W])."""
        store: dict[str, Tensor] = {}

        def keep(resid: Tensor, hook) -> Tensor:
            store["resid"] = resid
            return resid

        hooks = [*rule_hooks(self.model, "uniform", self.epsilon), ("blocks.0.hook_resid_pre", keep)]
        with grad_mode():
            x, targets = leaf_input(pixels), targets.clone()
            with self.model.hooks(fwd_hooks=hooks):
                logits = self.model(x)
            logits = epsilon_grad(logits, self.epsilon)
            total = class_score(logits, targets, self.score).sum()
            resid = store["resid"]
            g_x, g_resid = torch.autograd.grad(total, [x, resid])
        return (resid * g_resid).sum(-1).detach(), (x * g_x).sum(1).detach()

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        tokens, pix = self.relevance(pixels, targets)
        if self.level == "pixel":
            return finish(pix, pixels.device)
        grid = self.model.grid_size_for(pixels)
        return finish(self.model.to_grid(tokens[:, self.model.cfg.n_prefix_tokens :], grid), pixels.device)

    def __repr__(self) -> str:
        return f"AttnLRP(level={self.level!r}, epsilon={self.epsilon}, score={self.score!r})"
