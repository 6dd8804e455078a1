"""MLX backend: Apple-silicon GPUs (Metal), CUDA, or the CPU.

MLX has no sparse arrays. On CUDA the sparse products are kernels of our own over the CSR
structure and its transpose (``mx.fast.cuda_kernel``); on Metal they gather the rows they
need and scatter-add the results, an (nnz, L) array per product. On the CPU the hot loop
(the log term and its gradients, dense or sparse) is handed to the NumPy backend: MLX's
CPU kernels were 10-30 times slower than NumPy's and SciPy's here (50,000 x 10,000 CSR at
1%, 20 columns: MLX gather 0.92 s and scatter-add 1.49 s against SciPy's 0.04 s per
product). A step that leaves MLX cannot be traced, so on the CPU it is not compiled. MLX
has float64 on the CPU only, and there its exp and log are about float32-accurate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from .base import Backend, csr_transpose_order
from .numpy import NumpyBackend

# MLX runs float32 matrix products at TF32 precision on GPUs with matrix units (CUDA tensor
# cores, Apple M5) unless MLX_ENABLE_TF32=0 is set before its first operation: errors near
# 1e-3 of each product, where the ELBO and the checked natural steps assume float32's 1e-7.
# The products here have L columns and are bound by memory, not arithmetic, so full float32
# costs little. A value the user set stays.
os.environ.setdefault("MLX_ENABLE_TF32", "0")


def kernel_cache() -> str | None:
    """A lasting folder of the user's for the CUDA kernels MLX builds, one per MLX version.

    MLX on CUDA builds its kernels at first use (a first fit on an H100 took 65 s, with the
    kernels on disk 0.9 s) and keeps them under the system's temporary directory, which is
    often emptied at reboots and, on a machine shared by several users, belongs to whoever
    made it first (the others cannot write there).
    """
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pnmf", f"mlx-{version}", "ptx")


# MLX reads it when it first builds a kernel (on CUDA only); a value the user set stays.
if "MLX_PTX_CACHE_DIR" not in os.environ and (cache := kernel_cache()) is not None:
    os.environ["MLX_PTX_CACHE_DIR"] = cache

import mlx.core as mx  # noqa: E402

# Block length of the two-level full sum (MLX's CPU reduction accumulates sequentially).
SUM_BLOCK = 32
# On a GPU a full sum of at most this many values is one reduction: MLX's CUDA reduction
# adds at most 248 values in sequence per thread (below 2**17 values; at most 32 from there
# to 2**24) and combines the threads' sums by a tree (that order of additions, emulated in
# NumPy on 126,000 lognormal values: within 1e-7 of float64). The blocks cost a seed-size
# step 28 of its 77 nodes (reshapes, pads and their sums), each a kernel launch.
GPU_PLAIN_SUM = 1 << 24
# Non-zeros handled at once by the sampled product: bounds its buffer to CHUNK * L values.
CHUNK = 1 << 18


# Sparse products on CUDA by the kernels below (False: the gathers and scatter-adds of Metal).
CUDA_KERNELS = os.environ.get("PNMF_MLX_CUDA_KERNELS", "1") != "0"
# Threads per block of the kernels.
BLOCK = 256

# (a @ b.T) at the non-zeros: a thread per non-zero, the two rows' dot product.
_SAMPLED = """
    const size_t k = cg::this_grid().thread_rank();
    if (k >= size_t(rows_shape[0])) return;
    const int width = a_shape[1];
    const T* left = a + size_t(rows[k]) * width;
    const T* right = b + size_t(cols[k]) * width;
    T total = 0;
    for (int l = 0; l < width; ++l) total += left[l] * right[l];
    out[k] = total;
"""

# S @ m for S in CSR (starts, index) with its values in the order ``order`` gives them
# (ORDERED) or as they are: a thread per output entry (row, column of m), summing the row's
# non-zeros. S.T @ m is the same kernel on the transpose's CSR.
_SEGMENTS = """
    const size_t t = cg::this_grid().thread_rank();
    const int width = m_shape[1];
    const size_t row = t / width;
    if (row + 1 >= size_t(starts_shape[0])) return;
    const int l = t % width;
    T total = 0;
    for (int k = starts[row]; k < starts[row + 1]; ++k) {
        const T value = ORDERED ? values[order[k]] : values[k];
        total += value * m[size_t(index[k]) * width + l];
    }
    out[t] = total;
"""


@dataclass
class _Pattern:
    rows: mx.array  # row of each non-zero
    cols: mx.array  # column of each non-zero
    shape: tuple[int, int]
    # For the CUDA kernels: the CSR row starts, and the transpose's CSR (row starts, columns)
    # with the positions of its values among the non-zeros.
    starts: mx.array | None = None
    starts_t: mx.array | None = None
    cols_t: mx.array | None = None
    order_t: mx.array | None = None


# Each kernel's inputs, as its source names them, and its source.
_KERNEL_SOURCES = {
    "sampled": (["a", "b", "rows", "cols"], _SAMPLED),
    "segments": (["starts", "index", "order", "values", "m"], _SEGMENTS),
}
_kernels: dict = {}


def _kernel(name: str):
    """The CUDA kernel ``name`` of ``_KERNEL_SOURCES``, built on first use."""
    if name not in _kernels:
        inputs, source = _KERNEL_SOURCES[name]
        _kernels[name] = mx.fast.cuda_kernel(
            name=f"pnmf_{name}", input_names=inputs, output_names=["out"], source=source
        )
    return _kernels[name]


def _launch(name: str, inputs: list, size: int, shape: tuple, dtype, **template) -> mx.array:
    if size == 0:
        return mx.zeros(shape, dtype=dtype)
    if size >= 2**31:
        raise ValueError(f"a sparse product of {size:,} entries is beyond the CUDA kernels' int32 grid")
    (out,) = _kernel(name)(
        inputs=inputs,
        template=[("T", dtype), *template.items()],
        grid=(size, 1, 1),
        threadgroup=(BLOCK, 1, 1),
        output_shapes=[shape],
        output_dtypes=[dtype],
    )
    return out


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
        self._kernels = device == "gpu" and CUDA_KERNELS and mx.cuda.is_available()
        self._in_flight: tuple = ()

    def scope(self):
        return mx.stream(self._device)

    def launch(self, *trees):
        # At most two steps in flight: queue this one, then wait for the one before. MLX keeps
        # a queued step's intermediates until it has run, and the loop reads the ELBO (and so
        # waits) only every ten steps: on CUDA, 1e8 non-zeros, a fit's peak memory grew from
        # 4.4 GB (1 step) to 8.7 GB (3) and 33.2 GB (10).
        mx.async_eval(trees)
        mx.eval(self._in_flight)
        self._in_flight = trees

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
        if self.device == "gpu" and a.size <= GPU_PLAIN_SUM:
            return mx.sum(a)
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

    def sparse(self, x, transpose=True):
        if self._host is not None:
            return self._host.sparse(x, transpose)
        if x.nnz >= 2**31:
            raise ValueError(f"X has {x.nnz:,} non-zeros; MLX indexes them with int32, at most 2**31 - 1")
        rows = np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(x.indptr))
        pattern = _Pattern(self.asindex(rows), self.asindex(x.indices), x.shape)
        if self._kernels:
            starts_t, cols_t, order_t = csr_transpose_order(x)
            pattern.starts, pattern.starts_t = self.asindex(x.indptr), self.asindex(starts_t)
            pattern.cols_t, pattern.order_t = self.asindex(cols_t), self.asindex(order_t)
        return pattern

    def is_array(self, a):
        return isinstance(a, mx.array)

    def to_host(self, a):
        return np.asarray(a)

    def from_host(self, a):
        return mx.array(a, dtype=self._dtype)  # the host's float64 would come in as float32

    # The sparse log term goes to the host as well: its pattern is the host's (see sparse).
    def sparse_log_term(self, pattern, x, a, w, second, loadings=True):
        if self._host is not None:
            return self.on_host("sparse_log_term", pattern, x, a, w, second, loadings)
        return super().sparse_log_term(pattern, x, a, w, second, loadings)

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
        if self._kernels:
            return _launch("sampled", [a, b, pattern.rows, pattern.cols], nnz, (nnz,), a.dtype)
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
        if self._kernels:
            return self._segments(pattern.starts, pattern.cols, None, values, b)
        out = mx.zeros((pattern.shape[0], b.shape[-1]), dtype=b.dtype)
        return out.at[pattern.rows].add(values[:, None] * b[pattern.cols])

    def sparse_matmul_t(self, pattern, values, a):
        if self._host is not None:
            return self.on_host("sparse_matmul_t", pattern, values, a)
        if self._kernels:
            return self._segments(pattern.starts_t, pattern.cols_t, pattern.order_t, values, a)
        out = mx.zeros((pattern.shape[1], a.shape[-1]), dtype=a.dtype)
        return out.at[pattern.cols].add(values[:, None] * a[pattern.rows])

    @staticmethod
    def _segments(starts, index, order, values, m):
        """The segments kernel: rows of a CSR (``starts``, ``index``) times m, (rows, L)."""
        shape = (starts.shape[0] - 1, m.shape[-1])
        ordered = order is not None
        inputs = [starts, index, order if ordered else starts[:1], values, m]
        return _launch("segments", inputs, shape[0] * shape[1], shape, m.dtype, ORDERED=ordered)
