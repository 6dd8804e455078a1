"""Size factors and batch effects: a per-row, per-batch scaling of the rate (DESIGN §8).

    rate[n, d] = s[n] * g[batch(n), d] * sum_l exp(F[n, l]) W[d, l]

s (N,) > 0 are size factors (sequencing depth, document length), given or computed; g
(B, D) > 0 are batch effects, fitted. Both are constants in F: the log term's gradients in
F and W and the multiplicative update's numerator do not change. The expected-rate sum is

    sum_{n,d} E_q[rate] = sum_{b,l} S[b, l] (g @ W)[b, l],   S[b, l] = sum_{n in b} s[n] E_q[exp F[n, l]]

still O((N + D) L); its gradient in mu is s[n] (g @ W)[batch(n), l] E_q[exp F[n, l]], in W
it is -(g.T @ S), and the ELBO's value gains sum X log(s g). For fixed q(F) and W the ELBO's
maximiser in g is closed-form: g[b, d] = X_b[b, d] / (S @ W.T)[b, d], with X_b the column
sums of each batch's rows.

g and W trade scale feature by feature (g[:, d] c, W[d] / c fit alike). The fitted model
fixes it so that each feature's count-weighted mean of g over the batches is 1,
sum_b X_b[b, d] g[b, d] = sum_b X_b[b, d] (see :func:`normalise`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .backends.base import Array, Backend

SIZE_FACTORS = (None, "total")
# Smallest batch effect inside a logarithm: g is 0 exactly where a batch has no counts of a
# feature, where X log g is 0 * log 0 = 0.
TINY_EFFECT = 1e-30


def row_totals(x) -> np.ndarray:
    """Row sums of counts in memory or on disk (:class:`pnmf.data.DiskRows`, read in blocks)."""
    if hasattr(x, "blocks"):
        return np.concatenate([np.asarray(block.sum(axis=1), dtype=np.float64).ravel() for block in x.blocks()])
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def check_size_factors(size_factors, n_rows: int) -> np.ndarray:
    """Per-row size factors as float64 (n_rows,); ValueError naming what is wrong with them."""
    s = np.asarray(size_factors)
    if s.dtype.kind not in "biuf":
        raise ValueError(f"size_factors must be numbers; got an array of dtype {s.dtype}")
    s = s.astype(np.float64).ravel() if s.ndim <= 2 and s.size == n_rows else s
    if s.shape != (n_rows,):
        raise ValueError(f"size_factors has {s.size} entries (shape {np.shape(size_factors)}); X has {n_rows} rows")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"size_factors must be finite; row {bad[0]} is {s[bad[0]]} ({bad.size} rows are not finite)")
    bad = np.flatnonzero(s <= 0)
    if bad.size:
        raise ValueError(f"size_factors must be > 0; row {bad[0]} is {s[bad[0]]:g} ({bad.size} rows are <= 0)")
    return s


def total_size_factors(totals: np.ndarray, mean_total: float) -> np.ndarray:
    """'total' size factors: each row's count total over ``mean_total`` (the training rows' mean)."""
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(
            f"size_factors='total' needs every row to have counts; row {empty[0]} has none "
            f"({empty.size} empty rows): drop them or give size_factors="
        )
    return totals / mean_total


def check_batch(batch, n_rows: int) -> np.ndarray:
    """Batch labels as a 1-d array (n_rows,); ValueError for a wrong length or missing labels."""
    labels = np.asarray(batch)
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"batch has shape {labels.shape}; it needs one label per row of X ({n_rows} rows)")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise ValueError("batch labels must not be NaN or infinite")
    if labels.dtype.kind == "O":
        if any(v is None or (isinstance(v, float) and v != v) for v in labels):
            raise ValueError("batch labels must not be missing (None or NaN)")
        labels = labels.astype(str) if all(isinstance(v, str) for v in labels) else labels
    return labels


def union_labels(labels: np.ndarray, group) -> np.ndarray:
    """The sorted distinct labels of every rank's rows (this rank's alone without a group).

    Each rank's distinct labels travel as JSON bytes in one all-reduce of a buffer with a
    slot per rank (after one all-reduce of their lengths): labels are strings or integers.
    """
    local = np.unique(labels)
    if group is None:
        return local
    text = json.dumps([v.item() if isinstance(v, np.generic) else v for v in local]).encode()
    lengths = np.zeros(group.size)
    lengths[group.rank] = len(text)
    lengths = group.all_sum_host(lengths).astype(np.int64)
    buffer = np.zeros(int(lengths.sum()))
    start = int(lengths[: group.rank].sum())
    buffer[start : start + len(text)] = np.frombuffer(text, dtype=np.uint8)
    gathered = group.all_sum_host(buffer).astype(np.uint8).tobytes()
    every, offset = [], 0
    for length in lengths:
        every.extend(json.loads(gathered[offset : offset + length].decode()))
        offset += length
    # str, not this rank's own string dtype: another rank's labels may be longer.
    return np.unique(np.asarray(every, dtype=str if local.dtype.kind in "US" else None))


def batch_sums(x, codes: np.ndarray, n_batches: int) -> np.ndarray:
    """X_b (n_batches, D): the column sums of each batch's rows of x (codes (N,) in 0..B-1).

    Counts on disk (:class:`pnmf.data.DiskRows`) are read a block of rows at a time.
    """
    if hasattr(x, "blocks"):
        total, start = np.zeros((n_batches, x.shape[1])), 0
        for block in x.blocks():
            total += batch_sums(block, codes[start : start + block.shape[0]], n_batches)
            start += block.shape[0]
        return total
    n = x.shape[0]
    membership = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_batches, n))
    sums = membership @ x
    return np.asarray(sums.toarray() if sp.issparse(sums) else sums, dtype=np.float64)


@dataclass
class RowEffects:
    """What scales the rate of some rows: size factors s (N,), batch codes (N,) and g (B, D).

    Without size factors s is 1; without batches every code is 0 and g is ones (1, D), not
    fitted. ``free`` (B,) marks the batches whose g a fit may move (all, when fitted in
    ``fit``; those unseen in fit, in ``transform``), or is None when g is fixed.
    """

    s: np.ndarray
    codes: np.ndarray
    g: np.ndarray
    free: np.ndarray | None = None

    def take(self, rows) -> RowEffects:
        """The effects of a subset of the rows (a slice or sorted indices)."""
        return RowEffects(self.s[rows], self.codes[rows], self.g, self.free)

    def scaling(self, b: Backend, x, xb: np.ndarray | None = None) -> Scaling:
        """The :class:`Scaling` of counts x (these rows) on backend b; ``xb`` defaults to x's batch sums."""
        xb = batch_sums(x, self.codes, self.g.shape[0]) if xb is None else xb
        return Scaling(b, self.s, self.codes, xb, row_totals(x), self.free)

    def row_scale(self, w: np.ndarray) -> np.ndarray:
        """sum_d s[n] g[batch(n), d] W[d, l] summed over l, (N,): a row's expected total per unit exp(F)."""
        return self.s * (self.g @ w).sum(axis=1)[self.codes]


class Scaling:
    """Size factors s and batch memberships of the rows of one block of counts, on a backend.

    ``codes`` (N,) index the rows' batches in 0..B-1; ``xb`` (B, D) are the batch column
    sums of *all* rows (summed over a distributed fit's ranks); ``free`` (B,) marks the
    batches whose g the trainers update (None: all of them; ``transform`` frees only
    batches unseen in fit). ``log_size`` is sum_n (sum_d X[n, d]) log s[n], this block's
    constant part of sum X log(s g).
    """

    def __init__(self, b: Backend, s: np.ndarray, codes: np.ndarray, xb: np.ndarray, totals: np.ndarray, free=None):
        self.backend = b
        self.n_batches = xb.shape[0]
        self.log_size = float(totals @ np.log(s))
        self.xb = b.asarray(xb)
        self.free = None if free is None or np.all(free) else b.asarray(np.asarray(free, dtype=float)[:, None])
        if self.n_batches == 1:
            self.column = b.asarray(s[:, None])  # (N, 1)
        else:
            n = len(s)
            self.pattern = b.sparse(sp.csr_matrix((s, codes, np.arange(n + 1)), shape=(n, self.n_batches)))
            self.values = b.asarray(s)

    def rows(self, coef: Array) -> Array:
        """s[n] coef[batch(n)] (N, L) for coef (B, L)."""
        if self.n_batches == 1:
            return self.column * coef
        return self.backend.sparse_matmul(self.pattern, self.values, coef)

    def sums(self, v: Array) -> Array:
        """sum_{n in b} s[n] v[n] (B, L) for v (N, L)."""
        if self.n_batches == 1:
            return self.backend.swap(self.column) @ v
        return self.backend.sparse_matmul_t(self.pattern, self.values, v)

    def log_effects(self, g: Array) -> Array:
        """sum X log g = sum_{b,d} X_b[b, d] log g[b, d], 0 where a batch has no counts."""
        b = self.backend
        return b.sum(self.xb * b.log(b.clip(g, TINY_EFFECT, None)))

    def update(self, g: Array, w: Array, sums: Array) -> Array:
        """The ELBO's maximiser in g for fixed q(F) and W: X_b / (S @ W.T), on the free batches."""
        b = self.backend
        fitted = self.xb / b.clip(sums @ b.swap(w), TINY_EFFECT, None)
        return fitted if self.free is None else b.where(self.free > 0, fitted, g)


def normalise(g: np.ndarray, w: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(g, W) rescaled per feature so that sum_b X_b[b, d] g[b, d] = sum_b X_b[b, d]; the rate is unchanged.

    A feature without counts keeps its scale.
    """
    weight = xb.sum(axis=0)
    scale = np.divide((xb * g).sum(axis=0), weight, out=np.ones(g.shape[1]), where=weight > 0)
    scale = np.where(scale > 0, scale, 1.0)
    return g / scale, w * scale[:, None]
