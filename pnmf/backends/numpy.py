"""NumPy backend: the reference every other backend is tested against."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .base import TINY_RATE, Backend

# Non-zeros handled at once by the sampled product: its two gathered (CHUNK, L) blocks stay
# in cache (50,000 x 10,000 at 1%, L = 20: 0.097 s at 2^14, 0.18 s at 2^18).
CHUNK = 1 << 14


def _sum_x_log(x: np.ndarray, rate: np.ndarray, work: np.ndarray) -> np.floating:
    """sum_c sum X * log(rate[c]) for rate (c, N, D) >= TINY_RATE, with ``work`` as scratch.

    The logarithm is the costliest pass of the hot loop, so it is taken of the products of
    two samples' rates, half as many values. Each product is at least TINY_RATE^2, a normal
    float; should one overflow (rates beyond 1e19 in float32), the logs are taken one by one.
    """
    c = rate.shape[0]
    half = c // 2
    flat_x = x.reshape(-1)
    if half:
        pairs = work[:half]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below
            np.multiply(rate[:half], rate[half : 2 * half], out=pairs)
            np.log(pairs, out=pairs)
            value = (pairs.reshape(half, -1) @ flat_x).sum()
        if c % 2:
            value += np.log(rate[-1], out=work[-1]).reshape(-1) @ flat_x
        if np.isfinite(value):
            return value
    np.log(rate, out=work)
    return (work.reshape(c, -1) @ flat_x).sum()


@dataclass
class _Pattern:
    indptr: np.ndarray
    indices: np.ndarray
    row_counts: np.ndarray  # non-zeros per row
    bounds: np.ndarray  # first rows of the sampled product's chunks, and N
    longest: int  # non-zeros in the largest chunk
    shape: tuple[int, int]
    _scratch: list = field(default_factory=list)

    def scratch(self, like: np.ndarray) -> list[np.ndarray]:
        """Two buffers shaped like the values ``like`` (nnz,), made at the first call and kept."""
        if not self._scratch or self._scratch[0].dtype != like.dtype:
            self._scratch[:] = [np.empty_like(like), np.empty_like(like)]
        return self._scratch


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r} is not available for the numpy backend; use 'cpu'")
        self.device = "cpu"
        self.dtype = dtype
        self._dtype = np.dtype(dtype)

    def asarray(self, x):
        # Row-major whatever x's layout (a DataFrame's values, a transpose): the steps read
        # X flat, which for a column-major X was a copy each time (a transposed 5,000 x 2,000
        # X: 236.9 against 63.5 ms an iteration).
        return np.array(x, dtype=self._dtype, copy=True, order="C")

    def asindex(self, x):
        return np.asarray(x, dtype=np.int64)

    def to_numpy(self, a):
        return np.asarray(a)

    def zeros_like(self, a):
        return np.zeros_like(a)

    def exp(self, a):
        return np.exp(a)

    def log(self, a):
        return np.log(a)

    def sqrt(self, a):
        return np.sqrt(a)

    # The ndarray methods: np.clip and np.sum add several microseconds of dispatch per call,
    # a tenth of a small fit's iteration.
    def clip(self, a, low, high):
        return np.asarray(a).clip(low, high)

    def where(self, cond, a, b):
        if np.ndim(cond) == 0 and np.shape(a) == np.shape(b):
            return a if cond else b  # one of the two as it is (no array is changed in place)
        return np.where(cond, a, b)

    def sum(self, a, axis=None, keepdims=False):
        if axis == 0 and not keepdims and np.ndim(a) == 2 and a.dtype.kind == "f":
            # Down the rows of an (N, L) array: a matrix-vector product is 2x faster here.
            return np.ones(a.shape[0], dtype=a.dtype) @ a
        return np.asarray(a).sum(axis=axis, keepdims=keepdims)

    def mean(self, a, axis=None):
        return np.mean(a, axis=axis)

    def swap(self, a):
        return np.swapaxes(a, -1, -2)

    def concat(self, arrays):
        return np.concatenate(arrays)

    def all_finite(self, a):
        return np.isfinite(a).all()

    def empty(self, shape):
        return np.empty(shape, dtype=self._dtype)

    def _rates(self, a, w):
        """exp(F) @ W.T + TINY_RATE for a = exp(F) (c, N, L), in the scratch buffer "rate"."""
        c, n, n_comp = a.shape
        rate = self.buffer("rate", (c, n, w.shape[0]))
        # A contiguous copy of W.T: the product is 1.5x faster than with the transposed view.
        np.matmul(a.reshape(c * n, n_comp), np.ascontiguousarray(w.T), out=rate.reshape(c * n, -1))
        np.add(rate, TINY_RATE, out=rate)  # as a floor: np.maximum is 6x slower here
        return rate

    def dense_log_term(self, x, a, w, second, loadings=True):
        # The interface's version, in place in two scratch (c, N, D) arrays and with the
        # sample axis folded into single matrix products.
        c, n, n_comp = a.shape
        flat_a = a.reshape(c * n, n_comp)
        rate = self._rates(a, w)
        work = self.buffer("work", rate.shape)
        flat_rate, flat_work = rate.reshape(c * n, -1), work.reshape(c * n, -1)
        value = _sum_x_log(x, rate, work)
        np.divide(x, rate, out=work)  # X / rate
        g_f = a * (flat_work @ w).reshape(a.shape)
        g_w = flat_work.T @ flat_a if loadings else None
        h_f = None
        if second:
            np.divide(work, rate, out=rate)  # X / rate^2
            h_f = g_f - a * (a * (flat_rate @ (w * w)).reshape(a.shape))
        return value, g_f, g_w, h_f

    def lanes_log_term(self, x, a, w):
        # The interface's version in two scratch (R, N, D) arrays: fresh ones on every step
        # cost page faults (2.4x the time per entry of a single fit at digits' size).
        n_lanes, n, _ = a.shape
        rate = self.buffer("rate", (n_lanes, n, x.shape[1]))
        work = self.buffer("work", rate.shape)
        np.matmul(a, np.swapaxes(w, -1, -2), out=rate)
        np.add(rate, TINY_RATE, out=rate)
        np.log(rate, out=work)
        value = work.reshape(n_lanes, -1) @ x.reshape(-1)
        np.divide(x, rate, out=work)  # X / rate
        return value, a * (work @ w), np.swapaxes(work, -1, -2) @ a

    def dense_log_value(self, x, a, w):
        rate = self._rates(a, w)
        return _sum_x_log(x, rate, self.buffer("work", rate.shape))

    def dense_slope(self, x, a, w):
        ratio = self._rates(a[None], w)[0]
        np.divide(x, ratio, out=ratio)
        return a * (ratio @ w)

    def key(self, seed):
        return np.random.default_rng(seed)

    def key_to_numpy(self, key):
        return np.array(json.dumps(key.bit_generator.state))

    def key_from_numpy(self, state):
        key = np.random.default_rng()
        key.bit_generator.state = json.loads(str(state))
        return key

    def normal(self, key, shape):
        # Box-Muller: twice as fast as the Generator's own normals in float32 here.
        size = math.prod(shape)
        half = (size + 1) // 2
        u = key.random((2, half), dtype=self._dtype)
        radius = np.sqrt(-2.0 * np.log1p(-u[0]))
        angle = (2 * np.pi) * u[1]
        out = np.empty((2, half), dtype=self._dtype)
        np.multiply(radius, np.cos(angle), out=out[0])
        np.multiply(radius, np.sin(angle), out=out[1])
        return out.reshape(-1)[:size].reshape(shape), key

    def sparse(self, x, transpose=True):
        # Chunks of whole rows with about CHUNK non-zeros each: a row's factors are then
        # repeated (np.repeat) rather than gathered, 3x faster than np.take here.
        indptr = x.indptr
        starts = np.flatnonzero(np.diff(indptr[:-1] // CHUNK)) + 1
        bounds = np.concatenate([[0], starts, [x.shape[0]]]).astype(np.int64)
        longest = int(np.diff(indptr[bounds]).max(initial=0))
        return _Pattern(indptr, x.indices, np.diff(indptr), bounds, longest, x.shape)

    def sampled_matmul(self, pattern, a, b, out=None):
        """The interface's, written into ``out`` (nnz,) when given."""
        indptr = pattern.indptr
        out = np.empty(indptr[-1], dtype=a.dtype) if out is None else out
        rows_b = np.empty((pattern.longest, b.shape[1]), dtype=b.dtype)
        ones = np.ones(b.shape[1], dtype=b.dtype)
        for first, last in zip(pattern.bounds[:-1], pattern.bounds[1:], strict=True):
            start, stop = indptr[first], indptr[last]
            block = rows_b[: stop - start]
            np.take(b, pattern.indices[start:stop], axis=0, out=block)
            block *= np.repeat(a[first:last], pattern.row_counts[first:last], axis=0)
            np.matmul(block, ones, out=out[start:stop])  # row sums: faster than an einsum
        return out

    def sparse_log_term(self, pattern, x, a, w, second, loadings=True):
        # The interface's version in two nnz-sized buffers kept with the pattern, each
        # intermediate written over one no longer needed: it made five fresh ones a step,
        # four of them alive at once.
        value, rate, spare = self._log_value(pattern, x, a, w)
        if second:
            ratio = np.divide(x, rate, out=spare)
            squared = np.divide(ratio, rate, out=rate)
        else:
            ratio = np.divide(x, rate, out=rate)
        g_f = a * self.sparse_matmul(pattern, ratio, w)[None]
        g_w = self.sparse_matmul_t(pattern, ratio, a[0]) if loadings else None
        h_f = g_f - a * (a * self.sparse_matmul(pattern, squared, w * w)[None]) if second else None
        return value, g_f, g_w, h_f

    def sparse_log_value(self, pattern, x, a, w):
        return self._log_value(pattern, x, a, w)[0]

    def _log_value(self, pattern, x, a, w):
        """sum X log rate over the non-zeros for a (1, N, L), and the pattern's two buffers:
        the first holding the rates (floored at TINY_RATE), the second free."""
        rate, spare = pattern.scratch(x)
        self.sampled_matmul(pattern, a[0], w, out=rate)
        rate += TINY_RATE
        return np.multiply(x, np.log(rate, out=spare), out=spare).sum(), rate, spare

    def _matrix(self, pattern, values):
        return sp.csr_matrix((values, pattern.indices, pattern.indptr), shape=pattern.shape)

    def sparse_matmul(self, pattern, values, b):
        return np.asarray(self._matrix(pattern, values) @ b)

    def sparse_matmul_t(self, pattern, values, a):
        return np.asarray(self._matrix(pattern, values).T @ a)
