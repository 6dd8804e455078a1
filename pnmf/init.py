"""Initial factors, computed in NumPy so every backend starts from the same point."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd

INITS = ("random", "nndsvd", "nndsvda")
# Smallest initial entry, relative to the mean count: log(0) would be -inf.
FLOOR = 1e-4
# Rows of the initial normal draw made at once when a process starts only a block of the rows.
ROW_BLOCK = 1 << 16


def initialize(
    x, n_components: int, init: str, rng: np.random.RandomState, group=None, keep_rows: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Non-negative H (N, L) and W (D, L) with X ~ H @ W.T, H's columns of mean 1.

    'random': |normal| entries scaled to the mean count (as scikit-learn's NMF).
    'nndsvd': non-negative double SVD (Boutsidis & Gallopoulos, 2008).
    'nndsvda': NNDSVD with its zeros filled by the mean count (better for counts).
    Components beyond the rank of X start at random.

    ``keep_rows=False`` returns (None, W): H is drawn a block of rows at a time for its
    column means alone ('random' only), so memory does not grow with the rows.

    With a process ``group`` (:mod:`pnmf.distributed`), x is this rank's block of rows:
    the mean count and H's column means are those of all ranks' rows, and a row's start
    depends only on its global index and ``rng``'s seed, so any split of the rows starts
    where the single-process fit of all of them does ('random' only).
    """
    n, d = x.shape
    if group is None:
        rows, total, rank = np.array([n]), float(x.sum()), 0
    else:
        if init != "random":
            raise ValueError(f"init={init!r} needs every row in one process; use init='random' with distributed=True")
        rows, total = group.row_blocks(n, d, float(x.sum()))
        rank = group.rank
    n_total, first = int(rows.sum()), int(rows[:rank].sum())
    average = max(total / (n_total * d), 1e-3)
    scale = np.sqrt(average / n_components)
    if not keep_rows:  # every rank draws every row's start, so the sums agree without a word
        if init != "random":
            raise ValueError(f"init={init!r} needs every row in memory; use init='random' for fits in batches")
        column_sum = np.zeros(n_components)
        for _, block in _normal_blocks(rng, n_total, n_components):
            column_sum += np.maximum(scale * np.abs(block), FLOOR * average).sum(axis=0)
        w = np.maximum(scale * np.abs(rng.standard_normal((d, n_components))), FLOOR * average)
        return None, w * (column_sum / n_total)
    h = scale * np.abs(_row_block_normals(rng, first, n, n_total, n_components))
    w = scale * np.abs(rng.standard_normal((d, n_components)))
    if init != "random":
        _nndsvd(x, min(n_components, n, d), rng, h, w)
        if init == "nndsvda":
            h[h == 0], w[w == 0] = average, average
    h, w = np.maximum(h, FLOOR * average), np.maximum(w, FLOOR * average)
    column_sum = h.sum(axis=0)
    if group is not None:
        column_sum = group.all_sum_host(column_sum)
    column_mean = column_sum / n_total
    return h / column_mean, w * column_mean


def _row_block_normals(rng: np.random.RandomState, first: int, n_rows: int, n_total: int, n_cols: int) -> np.ndarray:
    """Rows ``first:first + n_rows`` of ``rng.standard_normal((n_total, n_cols))``.

    The draw is made in blocks of rows, keeping only this block: the memory of one block,
    and ``rng`` ends where the whole draw would leave it (so every rank draws W alike).
    """
    if first == 0 and n_rows == n_total:
        return rng.standard_normal((n_total, n_cols))
    out = np.empty((n_rows, n_cols))
    for start, block in _normal_blocks(rng, n_total, n_cols):
        low, high = max(start, first), min(start + len(block), first + n_rows)
        if low < high:
            out[low - first : high - first] = block[low - start : high - start]
    return out


def _normal_blocks(rng: np.random.RandomState, n_total: int, n_cols: int):
    """``rng.standard_normal((n_total, n_cols))`` drawn ``ROW_BLOCK`` rows at a time: (first row, block)."""
    for start in range(0, n_total, ROW_BLOCK):
        yield start, rng.standard_normal((min(ROW_BLOCK, n_total - start), n_cols))


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
