"""NumPy backend: the reference every other backend is tested against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .base import Backend

# Rows gathered at once by the sampled product: bounds its buffer to CHUNK * L values.
CHUNK = 1 << 18


@dataclass
class _Pattern:
    indptr: np.ndarray
    indices: np.ndarray
    rows: np.ndarray
    shape: tuple[int, int]


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        if device not in (None, "cpu"):
            raise ValueError(f"device={device!r} is not available for the numpy backend; use 'cpu'")
        self.device = "cpu"
        self.dtype = dtype
        self._dtype = np.dtype(dtype)

    def asarray(self, x):
        return np.array(x, dtype=self._dtype, copy=True)

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

    def clip(self, a, low, high):
        return np.clip(a, low, high)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def sum(self, a, axis=None, keepdims=False):
        return np.sum(a, axis=axis, keepdims=keepdims)

    def mean(self, a, axis=None):
        return np.mean(a, axis=axis)

    def swap(self, a):
        return np.swapaxes(a, -1, -2)

    def all_finite(self, a):
        return np.isfinite(a).all()

    def key(self, seed):
        return np.random.default_rng(seed)

    def normal(self, key, shape):
        return key.standard_normal(shape, dtype=self._dtype), key

    def sparse(self, x):
        rows = np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(x.indptr))
        return _Pattern(x.indptr, x.indices, rows, x.shape)

    def sampled_matmul(self, pattern, a, b):
        out = np.empty(len(pattern.rows), dtype=a.dtype)
        for start in range(0, len(out), CHUNK):
            stop = start + CHUNK
            rows, cols = pattern.rows[start:stop], pattern.indices[start:stop]
            np.einsum("ij,ij->i", a[rows], b[cols], out=out[start:stop])
        return out

    def _matrix(self, pattern, values):
        return sp.csr_matrix((values, pattern.indices, pattern.indptr), shape=pattern.shape)

    def sparse_matmul(self, pattern, values, b):
        return np.asarray(self._matrix(pattern, values) @ b)

    def sparse_matmul_t(self, pattern, values, a):
        return np.asarray(self._matrix(pattern, values).T @ a)
