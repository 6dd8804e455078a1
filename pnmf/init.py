"""Initial factors, computed in NumPy so every backend starts from the same point."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd

INITS = ("random", "nndsvd", "nndsvda")
# Smallest initial entry, relative to the mean count: log(0) would be -inf.
FLOOR = 1e-4


def initialize(x, n_components: int, init: str, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative H (N, L) and W (D, L) with X ~ H @ W.T, H's columns of mean 1.

    'random': |normal| entries scaled to the mean count (as scikit-learn's NMF).
    'nndsvd': non-negative double SVD (Boutsidis & Gallopoulos, 2008).
    'nndsvda': NNDSVD with its zeros filled by the mean count (better for counts).
    Components beyond the rank of X start at random.
    """
    n, d = x.shape
    average = max(float(x.mean()), 1e-3)
    scale = np.sqrt(average / n_components)
    h = scale * np.abs(rng.standard_normal((n, n_components)))
    w = scale * np.abs(rng.standard_normal((d, n_components)))
    if init != "random":
        rank = min(n_components, n, d)
        _nndsvd(x, rank, rng, h, w)
        if init == "nndsvda":
            h[h == 0], w[w == 0] = average, average
    h, w = np.maximum(h, FLOOR * average), np.maximum(w, FLOOR * average)
    column_mean = h.mean(axis=0)
    return h / column_mean, w * column_mean


def _nndsvd(x, rank: int, rng: np.random.RandomState, h: np.ndarray, w: np.ndarray) -> None:
    """Write the NNDSVD factors of the leading ``rank`` singular triplets into h and w."""
    u, s, vt = randomized_svd(sp.csr_matrix(x) if sp.issparse(x) else x, rank, random_state=rng)
    for j in range(rank):
        left, right = u[:, j], vt[j]
        if j == 0:
            left, right = np.abs(left), np.abs(right)
        else:
            lp, ln = np.maximum(left, 0), np.maximum(-left, 0)
            rp, rn = np.maximum(right, 0), np.maximum(-right, 0)
            positive = np.linalg.norm(lp) * np.linalg.norm(rp)
            negative = np.linalg.norm(ln) * np.linalg.norm(rn)
            left, right = (lp, rp) if positive >= negative else (ln, rn)
        norm_left, norm_right = np.linalg.norm(left), np.linalg.norm(right)
        if norm_left == 0 or norm_right == 0:
            h[:, j], w[:, j] = 0.0, 0.0
            continue
        size = np.sqrt(s[j] * norm_left * norm_right) if j else np.sqrt(s[j])
        h[:, j] = size * left / norm_left
        w[:, j] = size * right / norm_right
