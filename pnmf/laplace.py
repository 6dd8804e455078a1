"""Laplace variances of the log-factors: the curvature of the exact log joint at q's mean.

q(F) of a row is a diagonal Gaussian. Its variance in ``lower-bound`` mode comes from a
bound whose log term is linear in F, so it misses the negative curvature that components
sharing a feature's counts add (explaining away), and its intervals are too narrow: with
the planted loadings of ``make_counts``, its 95% intervals of F held 59-71% of the planted
values. The Laplace variance is the diagonal of the inverse of the negative Hessian of
log p(x, F | W) in F, per row, at q's mean: it keeps the components' correlations within a
row, and its 95% intervals held 94.5-95.6% there (85-92% with fitted loadings, whose own
uncertainty is in no interval; docs/model.md).

For row n, with W~[d, l] = s[n] g[batch(n), d] W[d, l], h = exp(F) and
phi[d, l] = h[l] W~[d, l] / sum_k h[k] W~[d, k], the negative Hessian is

    A[l, k] = delta[l, k] (h[l] sum_d W~[d, l] - sum_d x[d] phi[d, l] + 1 / prior[l]^2)
              + sum_d x[d] phi[d, l] phi[d, k],

which needs only the row's non-zero counts.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# The most non-zeros x L^2 entries one block of rows holds (float64: 128 MB).
BLOCK_ENTRIES = 1 << 24


def laplace_variance(x, mean: np.ndarray, loadings: np.ndarray, prior_scale: np.ndarray, s=None, codes=None, g=None):
    """Laplace variances (N, L) of the log-factors of the rows of counts ``x`` (N, D, dense or
    sparse) at ``mean`` (N, L), with the loadings (D, L) and prior scales (L,) fixed; ``s``
    (N,) the rows' size factors, ``codes`` (N,) their batches and ``g`` (B, D) the batch
    effects (default: none). Returns the variances and the number of rows whose negative
    Hessian was not positive definite there (their variance is NaN)."""
    x = sp.csr_matrix(x, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    w = np.asarray(loadings, dtype=np.float64)
    n, n_components = mean.shape
    s = np.ones(n) if s is None else np.asarray(s, dtype=np.float64)
    codes = np.zeros(n, dtype=np.int64) if codes is None else np.asarray(codes)
    g = np.ones((1, w.shape[0])) if g is None else np.asarray(g, dtype=np.float64)
    precision = 1.0 / np.asarray(prior_scale, dtype=np.float64) ** 2
    totals = g @ w  # (B, L): sum_d g[b, d] W[d, l]
    out = np.empty((n, n_components))
    failed = 0
    per_block = max(1, BLOCK_ENTRIES // n_components**2)
    start = 0
    while start < n:
        # As many rows as keep the block's non-zeros x L^2 within BLOCK_ENTRIES (one at least).
        stop = max(start + 1, int(np.searchsorted(x.indptr, x.indptr[start] + per_block, side="right")) - 1)
        stop = min(stop, n, start + per_block)  # rows without counts hold L^2 entries too
        block = x[start:stop]
        rows = np.repeat(np.arange(stop - start), np.diff(block.indptr))
        h = np.exp(mean[start:stop])
        # h[l] W~[d, l] / s[n] at each non-zero: the size factor cancels in phi.
        z = h[rows] * w[block.indices] * g[codes[start:stop][rows], block.indices][:, None]
        phi = z / np.maximum(z.sum(axis=1, keepdims=True), 1e-300)
        counts = sp.csr_matrix((block.data, np.arange(block.nnz), block.indptr), shape=(stop - start, block.nnz))
        outer = counts @ (phi[:, :, None] * phi[:, None, :]).reshape(block.nnz, -1)
        a = np.asarray(outer).reshape(stop - start, n_components, n_components)
        diagonal = h * s[start:stop, None] * totals[codes[start:stop]] - counts @ phi + precision
        a[:, np.arange(n_components), np.arange(n_components)] += diagonal
        variance, bad = _inverse_diagonal(a)
        out[start:stop] = variance
        failed += bad
        start = stop
    return out, failed


def _inverse_diagonal(a: np.ndarray) -> tuple[np.ndarray, int]:
    """The diagonals of the inverses of the symmetric matrices ``a`` (M, L, L), NaN where one
    is not positive definite; and how many were not."""
    try:
        return _cholesky_inverse_diagonal(a), 0
    except np.linalg.LinAlgError:  # one matrix or more: each on its own
        out = np.empty(a.shape[:2])
        bad = 0
        for i, matrix in enumerate(a):
            try:
                out[i] = _cholesky_inverse_diagonal(matrix[None])[0]
            except np.linalg.LinAlgError:
                out[i], bad = np.nan, bad + 1
        return out, bad


def _cholesky_inverse_diagonal(a: np.ndarray) -> np.ndarray:
    """diag(A^-1) of positive definite A (M, L, L) from its Cholesky factor C: A^-1 = C^-T C^-1."""
    inverse_factor = np.linalg.solve(np.linalg.cholesky(a), np.broadcast_to(np.eye(a.shape[1]), a.shape))
    return (inverse_factor**2).sum(axis=1)
