"""Small clusterings in torch for the mask-based baselines (TIS: k-means; ViT-CX: complete-linkage
agglomerative clustering), so that no scikit-learn is needed."""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans(points: Tensor, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4) -> Tensor:
    """Lloyd's k-means with Euclidean distance on `points` [n, dim]; returns the centroids [k, dim].

    Initial centroids: k distinct points drawn by a CPU generator seeded with `seed` (the same draw on
    every device). Stops after `max_iter` iterations or when no centroid moves more than `tol` (relative
    to the points' scale). A cluster that loses all its points keeps its centroid."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({n}), got k={k}")
    x = points.float()
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    scale = float(x.abs().max()) + 1e-12
    for _ in range(max_iter):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        shift = float((new - centroids).abs().max())
        centroids = new
        if shift <= tol * scale:
            break
    return centroids.to(points.dtype)


def agglomerative_complete(distance: Tensor, threshold: float) -> Tensor:
    """Complete-linkage agglomerative clustering of n items from their distance matrix [n, n]: clusters
    are merged, closest first, while their linkage distance (the largest distance between their members)
    is below `threshold` (scikit-learn's `distance_threshold` semantics). Deterministic (ties: the first
    pair in row-major order). Returns the cluster of each item [n], numbered 0.. in order of first item."""
    n = distance.shape[0]
    d = distance.detach().double().clone()
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    d.fill_diagonal_(float("inf"))
    labels = torch.arange(n, device=d.device)
    for _ in range(n - 1):
        flat = int(d.argmin())
        i, j = divmod(flat, n)
        if not bool(d[i, j] < threshold):
            break
        i, j = min(i, j), max(i, j)
        merged = torch.maximum(d[i], d[j])
        d[i], d[:, i] = merged, merged
        d[i, i] = inf
        d[j], d[:, j] = inf, inf
        labels[labels == j] = i
    _, first = torch.unique(labels, return_inverse=True)
    return first
