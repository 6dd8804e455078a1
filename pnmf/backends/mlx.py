"""MLX backend: Apple-silicon GPUs (Metal), CUDA, or the CPU.

MLX has no sparse arrays. On a GPU the sparse products gather the rows they need and
scatter-add the results. On the CPU the hot loop (the log term and its gradients, dense
or sparse) is handed to the NumPy backend: MLX's CPU kernels were 10-30 times slower
than NumPy's and SciPy's here (50,000 x 10,000 CSR at 1%, 20 columns: MLX gather 0.92 s
and scatter-add 1.49 s against SciPy's 0.04 s per product). A step that leaves MLX
cannot be traced, so on the CPU it is not compiled. MLX has float64 on the CPU only, and
there its exp and log are about float32-accurate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# MLX runs float32 matrix products at TF32 precision on GPUs with matrix units (CUDA tensor
# cores, Apple M5) unless MLX_ENABLE_TF32=0 is set before its first operation: errors near
# 1e-3 of each product, where the ELBO and the checked natural steps assume float32's 1e-7.
# The products here have L columns and are bound by memory, not arithmetic, so full float32
# costs little. A value the user set stays.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from .base import Backend
from .numpy import NumpyBackend

# Block length of the two-level full sum (MLX's CPU reduction accumulates sequentially).
SUM_BLOCK = 32
# Non-zeros handled at once by the sampled product: bounds its buffer to CHUNK * L values.
CHUNK = 1 << 18


@dataclass
class _Pattern:
    rows: mx.array
    cols: mx.array
    shape: tuple[int, int]


def default_device() -> str:
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        device = default_device() if device is None else str(device)
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device={device!r} is not an MLX device; use 'cpu' or 'gpu'")
        if device == "gpu" and default_device() != "gpu":
            raise ValueError("device='gpu' is not available to this MLX install; use 'cpu'")
        if device == "gpu" and dtype == "float64":
            raise ValueError("dtype='float64' is not supported by MLX on the GPU; use 'float32'")
        self.device = device
        self.dtype = dtype
        self._device = mx.gpu if device == "gpu" else mx.cpu
        self._dtype = getattr(mx, dtype)
        # On the CPU the hot loop and the sparse products go through NumPy and SciPy: MLX's
        # CPU kernels were 10-30 times slower here (a (2000, 5) @ (5, 100) product 660 us
        # against 22 us; exp of 2e5 values 2.6 ms; see also the module docstring).
        self._host = NumpyBackend(dtype=dtype) if device == "cpu" else None
        # A step that hands work to NumPy cannot be traced by mx.compile.
        self._traceable = self._host is None

    def scope(self):
        return mx.stream(self._device)

    def launch(self, *trees):
        mx.async_eval(trees)

    def compile(self, fn, capture=False):
        return mx.compile(fn) if self._traceable else fn

    def asarray(self, x):
        return mx.array(np.asarray(x, dtype=self.dtype), dtype=self._dtype)  # float64 would come in as float32

    def asindex(self, x):
        return mx.array(np.asarray(x, dtype=np.int32))

    def to_numpy(self, a):
        return np.array(a, copy=True)

    def empty(self, shape):
        return mx.zeros(shape, dtype=self._dtype)

    def zeros_like(self, a):
        return mx.zeros_like(a)

    def exp(self, a):
        return mx.exp(a)

    def log(self, a):
        return mx.log(a)

    def sqrt(self, a):
        return mx.sqrt(a)

    def clip(self, a, low, high):
        return mx.clip(a, low, high)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def sum(self, a, axis=None, keepdims=False):
        if axis is not None or keepdims:
            return mx.sum(a, axis=axis, keepdims=keepdims)
        # Sum blocks first: a float32 ELBO summed in one sequential pass over 2e4 terms was
        # off by ~2e-5 relative, enough to reject good natural steps in lower-bound mode.
        flat = a.reshape(-1)
        while flat.size > SUM_BLOCK:
            pad = -flat.size % SUM_BLOCK
            if pad:
                flat = mx.concatenate([flat, mx.zeros((pad,), dtype=flat.dtype)])
            flat = mx.sum(flat.reshape(-1, SUM_BLOCK), axis=1)
        return mx.sum(flat)

    def mean(self, a, axis=None):
        return mx.mean(a, axis=axis)

    def swap(self, a):
        return mx.swapaxes(a, -1, -2)

    def concat(self, arrays):
        return mx.concatenate(arrays)

    def all_finite(self, a):
        return mx.all(mx.isfinite(a))

    def key(self, seed):
        return mx.random.key(int(seed))

    def key_to_numpy(self, key):
        return np.array(key)

    def key_from_numpy(self, state):
        return mx.array(np.asarray(state, dtype=np.uint32))

    def normal(self, key, shape):
        draw_key, next_key = mx.random.split(key)
        return mx.random.normal(shape, dtype=self._dtype, key=draw_key), next_key

    def sparse(self, x):
        if self._host is not None:
            return self._host.sparse(x)
        rows = np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(x.indptr))
        return _Pattern(self.asindex(rows), self.asindex(x.indices), x.shape)

    def is_array(self, a):
        return isinstance(a, mx.array)

    def to_host(self, a):
        return np.asarray(a)

    def from_host(self, a):
        return mx.array(a, dtype=self._dtype)  # the host's float64 would come in as float32

    # The sparse log term goes to the host as well: its pattern is the host's (see sparse).
    def sparse_log_term(self, pattern, x, a, w, second):
        if self._host is not None:
            return self.on_host("sparse_log_term", pattern, x, a, w, second)
        return super().sparse_log_term(pattern, x, a, w, second)

    def sparse_log_value(self, pattern, x, a, w):
        if self._host is not None:
            return self.on_host("sparse_log_value", pattern, x, a, w)
        return super().sparse_log_value(pattern, x, a, w)

    def sparse_slope(self, pattern, x, a, w):
        if self._host is not None:
            return self.on_host("sparse_slope", pattern, x, a, w)
        return super().sparse_slope(pattern, x, a, w)

    def sampled_matmul(self, pattern, a, b):
        if self._host is not None:
            return self.on_host("sampled_matmul", pattern, a, b)
        nnz = pattern.rows.shape[0]
        parts = [
            mx.sum(a[pattern.rows[start : start + CHUNK]] * b[pattern.cols[start : start + CHUNK]], axis=-1)
            for start in range(0, nnz, CHUNK)
        ]
        if len(parts) == 1:
            return parts[0]
        return mx.concatenate(parts) if parts else mx.zeros((0,), dtype=a.dtype)

    def sparse_matmul(self, pattern, values, b):
        if self._host is not None:
            return self.on_host("sparse_matmul", pattern, values, b)
        out = mx.zeros((pattern.shape[0], b.shape[-1]), dtype=b.dtype)
        return out.at[pattern.rows].add(values[:, None] * b[pattern.cols])

    def sparse_matmul_t(self, pattern, values, a):
        if self._host is not None:
            return self.on_host("sparse_matmul_t", pattern, values, a)
        out = mx.zeros((pattern.shape[1], a.shape[-1]), dtype=a.dtype)
        return out.at[pattern.cols].add(values[:, None] * a[pattern.rows])
