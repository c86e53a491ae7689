"""TIS: Transformer Input Sampling (Englebert et al., ICCV Workshops 2023)."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from caap.attribution.base import AttributionMethod
from caap.baselines._clustering import kmeans
from caap.baselines._common import BASELINE_SCORES, check_choice, chunks, finish
from caap.targets import Score, class_score
from hooked_vit import HookedViT
from hooked_vit.checks import check_positive_int

MaskSource = Literal["clusters", "random"]


class TIS(AttributionMethod):
    """Transformer Input Sampling: Englebert, Stassin, Nanfack, Mahmoudi, Siebert, Cornu & De Vleeschouwer
    2023, "Explaining through Transformer Input Sampling" (ICCV Workshops 2023).

    A ViT runs on any subset of its tokens, so TIS masks by dropping patch tokens from the input
    sequence (`HookedViT.forward_patches`: the prefix tokens and the kept patches, each with its own
    position embedding; no fill-in image). Per image:
      1. masks (masks="clusters", the paper): the outputs of every block, concatenated over blocks,
         give each activation channel a vector over the patch tokens [n_layers * d_model, n_patches];
         k-means (Euclidean, k = n_masks) groups these channels, and each centroid, a vector over the
         patches, keeps its top tokens_ratio * n_patches tokens: one binary mask per centroid;
      2. each mask is scored by the model on the kept tokens alone: y_t = softmax probability of the
         target (the authors' score);
      3. S(patch) = Σ_i y_t(M_i) M_i(patch) / Σ_i M_i(patch) (the paper's correction for how often
         a token is kept; a token no mask keeps gets 0).
    masks="random" draws each mask as a uniform random subset of the same size instead (RISE-style token
    sampling; same for every image).

    The k-means starts from k distinct channels drawn by a CPU generator seeded with `seed` at every
    call (random masks likewise), so the same seed gives the same map on any device and an image gets
    the same map alone or in a batch. The masked forward passes run `internal_batch_size` rows at a time.

    Departures from the authors' code (github.com/aenglebert/Transformer_Input_Sampling): their k-means
    is the fast_pytorch_kmeans package (random initial centroids, its own stopping rule); here a
    seeded Lloyd's k-means (`caap.baselines._clustering.kmeans`, at most `kmeans_iters` iterations).
    Their code removes the class token only; here every prefix token (class, register, distillation)
    is dropped from the features and always kept in the sequence. If the model has fewer activation
    channels than n_masks, k is the number of channels. Raw values (the authors min-max rescale to [0, 1]).

    Args:
        n_masks: number of masks (the authors' default 1024).
        tokens_ratio: fraction of the patches each mask keeps (the authors' default 0.5).
        masks: "clusters" (the paper) or "random" (see above).
        seed: seed of the k-means initialisation (or of the random masks).
        score: "prob" (the authors), "logit" or "log_prob".
        internal_batch_size: masked forward passes at a time.
        kmeans_iters: maximum k-means iterations.
    """

    name = "tis"
    summary = "random subsets of patch tokens dropped from the sequence, scores averaged per token"
    paper = "Englebert et al. 2023 (ICCV Workshops)"
    resolution = "patch"

    def __init__(
        self,
        model: HookedViT,
        n_masks: int = 1024,
        tokens_ratio: float = 0.5,
        masks: MaskSource = "clusters",
        seed: int = 0,
        score: Score = "prob",
        internal_batch_size: int = 128,
        kmeans_iters: int = 100,
    ) -> None:
        super().__init__(model)
        n_masks = check_positive_int(n_masks, "n_masks")
        internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")
        kmeans_iters = check_positive_int(kmeans_iters, "kmeans_iters")
        check_choice("masks", masks, ("clusters", "random"))
        check_choice("score", score, BASELINE_SCORES)
        if not isinstance(tokens_ratio, (int, float)) or not 0.0 < tokens_ratio <= 1.0:
            raise ValueError(f"tokens_ratio must be in (0, 1], got {tokens_ratio!r}")
        self.n_masks, self.tokens_ratio, self.masks, self.seed = n_masks, float(tokens_ratio), masks, int(seed)
        self.score, self.internal_batch_size, self.kmeans_iters = score, internal_batch_size, kmeans_iters

    def token_features(self, pixels: Tensor) -> Float[Tensor, "batch n_patches features"]:
        """Every block's output at the patch tokens, concatenated over blocks."""
        names = [f"blocks.{layer}.hook_resid_post" for layer in range(self.model.cfg.n_layers)]
        store: dict[str, Tensor] = {}

        def save(resid: Tensor, hook) -> None:
            store[hook.name] = resid.detach()

        with torch.no_grad(), self.model.hooks(fwd_hooks=[(n, save) for n in names]):
            self.model(pixels)
        p = self.model.cfg.n_prefix_tokens
        return torch.cat([store[n][:, p:] for n in names], dim=-1)

    def keep_indices(self, features: Float[Tensor, "n_patches features"]) -> Int[Tensor, "n_masks k"]:
        """The kept patch indices of each mask, for one image."""
        n = features.shape[0]
        k = max(1, int(self.tokens_ratio * n))
        if self.masks == "random":
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.stack([torch.randperm(n, generator=gen) for _ in range(self.n_masks)])
            return order[:, :k].sort(dim=1).values.to(features.device)
        points = features.T  # one point per activation channel, a vector over the patches
        centroids = kmeans(points, min(self.n_masks, points.shape[0]), self.seed, self.kmeans_iters)
        return centroids.topk(k, dim=1).indices.sort(dim=1).values

    def _attribute(self, pixels: Float[Tensor, "batch chan H W"], targets: Int[Tensor, " batch"]) -> Tensor:
        x = pixels.detach()
        grid = self.model.grid_size_for(x)
        n = grid[0] * grid[1]
        feats = self.token_features(x) if self.masks == "clusters" else None
        out = []
        for i in range(x.shape[0]):
            keep = self.keep_indices(feats[i] if feats is not None else x.new_zeros(n, 1))
            scores = []
            with torch.no_grad():
                for s in chunks(len(keep), self.internal_batch_size):
                    rows = keep[s]
                    logits = self.model.forward_patches(x[i : i + 1].expand(len(rows), -1, -1, -1), rows)
                    scores.append(class_score(logits, targets[i].repeat(len(rows)), self.score))
            score = torch.cat(scores)
            masks = torch.zeros(len(keep), n, device=x.device, dtype=score.dtype).scatter_(1, keep, 1.0)
            coverage = masks.sum(0)
            sal = (score[:, None] * masks).sum(0) / coverage.clamp(min=1)
            out.append(sal)
        return finish(self.model.to_grid(torch.stack(out), grid), pixels.device)

    def __repr__(self) -> str:
        return (
            f"TIS(n_masks={self.n_masks}, tokens_ratio={self.tokens_ratio}, masks={self.masks!r}, seed={self.seed}, "
            f"score={self.score!r}, internal_batch_size={self.internal_batch_size}, kmeans_iters={self.kmeans_iters})"
        )
