"""ViT-CX: Causal Explanation of Vision Transformers (Xie et al., IJCAI 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._clustering import agglomerative_complete
from caap.baselines._common import BASELINE_SCORES, check_choice, chunks, finish, layer_list
from caap.targets import Score, class_score
from hooked_vit import HookedViT
from hooked_vit.checks import check_positive_int


def _minmax_rows(x: Tensor) -> Tensor:
    """Each row rescaled to [0, 1]; a constant row becomes zeros."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


class ViTCX(AttributionMethod):
    """ViT-CX: Xie, Li, Zhang, Zhang & Wang 2023, "ViT-CX: Causal Explanation of Vision Transformers"
    (IJCAI 2023).

    Per image:
      1. masks from the patch embeddings of a late block: the tokens entering the last block's attention
         (`blocks.{layer}.ln1.hook_normalized`, the authors' `blocks[-1].norm1`), patch tokens only; each of
         the d_model channels is a map over the patch grid, upsampled bilinearly to the image and min-max
         rescaled to [0, 1];
      2. the masks are clustered: complete-linkage agglomerative clustering on the cosine distance
         1 - cos(M_i, M_j), merging while the distance is below `distance_threshold` (0.1); each cluster's
         mask is the sum of its members, min-max rescaled;
      3. causal impact with the paper's correction for mask density ("delta"): with Gaussian noise ε_i
         (std `noise_std` in the normalised pixel space) filling the masked-out part,
             s_i = y_t(x ⊙ M_i + ε_i ⊙ (1 - M_i)) - y_t(x + ε_i ⊙ (1 - M_i)) + y_t(x)
         (y_t: the target's softmax probability), and
             S(pixel) = 1/N Σ_i s_i M_i(pixel) / Σ_j M_j(pixel)
         (each pixel normalised by its total mask coverage).
    Pixel resolution [batch, H, W]. The noise comes from a CPU generator seeded with `seed` at every call
    and every image (the same map on any device, alone or in a batch); the clustering is deterministic.

    Departures from the authors' code (github.com/vaynexie/CausalX-ViT): their clustering is scikit-learn's
    `AgglomerativeClustering(linkage="complete", affinity="precomputed")`; here a torch implementation
    with the same linkage and threshold rule (`caap.baselines._clustering`; ties may merge in another
    order). Their upsampling is torchvision's `Resize` (bilinear); here `F.interpolate(bilinear)`, the same
    for upsampling. Every prefix token (class, registers, distillation) is dropped from the feature map
    (their reshape drops the class token; DeiT needs a changed reshape). A feature channel that is constant
    over the image becomes an all-zero mask (theirs divides by zero). Raw values.

    Args:
        layer: the block whose input tokens give the masks (default -1, the last).
        distance_threshold: the clustering's cosine-distance threshold (the authors' default 0.1).
        noise_std: std of the noise that fills the masked-out pixels (the authors' 0.1).
        seed: noise seed.
        score: "prob" (the authors), "logit" or "log_prob".
        internal_batch_size: masked forward passes at a time.
    """

    name = "vit_cx"
    summary = "masks from clustered patch embeddings, scored by their causal effect"
    paper = "Xie et al. 2023 (IJCAI)"
    resolution = "pixel"

    def __init__(
        self,
        model: HookedViT,
        layer: int = -1,
        distance_threshold: float = 0.1,
        noise_std: float = 0.1,
        seed: int = 0,
        score: Score = "prob",
        internal_batch_size: int = 100,
    ) -> None:
        super().__init__(model)
        self.layer = layer_list(model, layer, "layer")[0]
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        check_choice("score", score, BASELINE_SCORES)
        if not 0.0 < distance_threshold <= 2.0:
            raise ValueError(f"distance_threshold must be in (0, 2] (a cosine distance), got {distance_threshold!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.distance_threshold, self.noise_std, self.seed = float(distance_threshold), float(noise_std), int(seed)
        self.score, self.internal_batch_size = score, internal_batch_size

    def feature_masks(self, pixels: Tensor) -> Float[Tensor, "batch d_model H W"]:
        """Step 1: one mask per channel of the tokens entering block `layer`'s attention."""
        name = f"blocks.{self.layer}.ln1.hook_normalized"
        store: dict[str, Tensor] = {}

        def save(x: Tensor, hook) -> None:
            store["x"] = x.detach()

        with torch.no_grad(), self.model.hooks(fwd_hooks=[(name, save)]):
            self.model(pixels)
        grid = self.model.grid_size_for(pixels)
        tokens = store["x"][:, self.model.cfg.n_prefix_tokens :]  # [batch, n_patches, d_model]
        maps = self.model.to_grid(tokens.transpose(1, 2), grid)  # [batch, d_model, gh, gw]
        up = F.interpolate(maps, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        b, d, h, w = up.shape
        return _minmax_rows(up.reshape(b * d, h * w)).reshape(b, d, h, w)

    def cluster_masks(self, masks: Float[Tensor, "d H W"]) -> Float[Tensor, "n_clusters H W"]:
        """Step 2, for one image."""
        flat = masks.flatten(1)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
        labels = agglomerative_complete(1.0 - unit @ unit.T, self.distance_threshold)
        k = int(labels.max()) + 1
        summed = torch.zeros(k, flat.shape[1], device=flat.device, dtype=flat.dtype).index_add_(0, labels, flat)
        return _minmax_rows(summed).reshape(k, *masks.shape[1:])

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        x = pixels.detach()
        b, c, h, w = x.shape
        feats = self.feature_masks(x)
        with torch.no_grad():
            base = class_score(self.model(x), targets, self.score)
        out = []
        for i in range(b):
            masks = self.cluster_masks(feats[i]).to(x.dtype)  # [n, H, W]
            n = masks.shape[0]
            gen = torch.Generator().manual_seed(self.seed)
            noise = (torch.randn(n, c, h, w, generator=gen) * self.noise_std).to(device=x.device, dtype=x.dtype)
            scores = torch.empty(2 * n, device=x.device, dtype=x.dtype)
            for s in chunks(2 * n, self.internal_batch_size):
                rows = torch.arange(s.start, s.stop, device=x.device)
                k = rows % n
                m, eps = masks[k][:, None], noise[k] * (1 - masks[k][:, None])
                masked = torch.where((rows < n)[:, None, None, None], x[i] * m, x[i].expand_as(eps)) + eps
                with torch.no_grad():
                    scores[s] = class_score(self.model(masked), targets[i].repeat(len(rows)), self.score)
            delta = scores[:n] - scores[n:] + base[i]
            coverage = masks.sum(0)
            sal = torch.einsum("n,nhw->hw", delta, masks) / coverage.clamp(min=torch.finfo(x.dtype).tiny) / n
            out.append(torch.where(coverage > 0, sal, torch.zeros_like(sal)))
        return finish(torch.stack(out), pixels.device)

    def __repr__(self) -> str:
        return (
            f"ViTCX(layer={self.layer}, distance_threshold={self.distance_threshold}, noise_std={self.noise_std}, "
            f"seed={self.seed}, score={self.score!r}, internal_batch_size={self.internal_batch_size})"
        )
