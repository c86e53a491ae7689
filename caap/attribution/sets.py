"""Patch sets for CAAP's set sampling: the sampling design and the estimators that turn the scores of
many sets into one value per patch.

Each patched run carries the source's activations at a *set* of patch tokens (`z[r, i] = True`: run r's
token i carries the source's activations over the layer range) and yields a score `f[r]`. An estimator
maps (z, f) to one value per patch:

- "difference": E[f | i carries the source] - E[f | i does not], the conditional-mean contrast of
  RISE (Petsiuk et al. 2018) and of the Banzhaf value's sampling estimate, on activations instead of
  pixels. For a score that is additive in the carrying tokens, f = b + sum_i w_i z_i, its expectation is
  exactly w_i under the balanced design below (each patch in the same number of sets, chosen
  independently per patch); its sampling error falls as 1 / sqrt(sets).
- "regression": the least-squares fit f ~ b + sum_i w_i z_i (centred; the minimum-norm solution when
  there are fewer sets than patches), the linear surrogate of LIME / KernelSHAP (Ribeiro et al. 2016;
  Lundberg & Lee 2017) with uniform weights. For an additive score it recovers w exactly once there are
  more sets than patches; for a score with interactions it is the best additive approximation over the
  sampled sets.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

Estimator = Literal["difference", "regression"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
"""The estimators of CAAP's set sampling (`CAAP(sets=...)`)."""


def set_size(n_sets: int, density: float) -> int:
    """How many of the `n_sets` sets hold each patch: round(density * n_sets), which must leave every patch
    both in and out of at least one set (else its estimate would be undefined)."""
    k = round(density * n_sets)
    if not 1 <= k <= n_sets - 1:
        raise ValueError(
            f"density={density} with sets={n_sets} puts each patch in {k} of {n_sets} sets; every patch must be in "
            f"at least one set and out of at least one: need 1 <= round(density * sets) <= sets - 1"
        )
    return k


def sample_sets(n_sets: int, n_patches: int, density: float, seed: int = 0) -> Bool[Tensor, "sets patches"]:
    """A balanced random design: each patch is in exactly `set_size(n_sets, density)` of the `n_sets`
    sets, chosen uniformly at random and independently for each patch (so a set holds about
    `density * n_patches` patches). Deterministic for a seed (a CPU generator, whatever the device)."""
    k = set_size(n_sets, density)
    g = torch.Generator().manual_seed(int(seed))
    ranks = torch.rand(n_sets, n_patches, generator=g).argsort(0).argsort(0)  # a random permutation per patch
    return ranks < k


def estimate(
    estimator: Estimator, z: Bool[Tensor, "sets patches"], f: Float[Tensor, "sets ..."]
) -> Float[Tensor, "patches ..."]:
    """One value per patch from the scores `f` of runs whose carrying tokens are `z` (see the module
    docstring). Computed in float64; returned in float32."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
    if z.ndim != 2 or f.shape[0] != z.shape[0]:
        raise ValueError(f"z must be [sets, patches] and f [sets, ...] with the same sets; got {tuple(z.shape)}, "
                         f"{tuple(f.shape)}")
    zf = z.to(torch.float64)
    y = f.to(torch.float64).reshape(f.shape[0], -1)
    if estimator == "difference":
        n_in = zf.sum(0)
        n_out = zf.shape[0] - n_in
        if bool((n_in == 0).any() or (n_out == 0).any()):
            raise ValueError("every patch must be in at least one set and out of at least one for the difference "
                             "estimator")
        w = zf.T @ y / n_in[:, None] - (1 - zf).T @ y / n_out[:, None]
    else:
        zc = zf - zf.mean(0)
        w = torch.linalg.pinv(zc) @ (y - y.mean(0))
    return w.reshape(z.shape[1], *f.shape[1:]).float()
