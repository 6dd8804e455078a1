"""The array interface the core is written against.

Every backend implements these methods; the core never imports a framework.
Arithmetic operators (``+ - * / ** @``) and ``.shape`` are the framework's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

Array = Any
Key = Any

# threadpoolctl's view of the thread pools loaded with each backend class (see Backend.threads).
_POOLS: dict[type, Any] = {}
# Scratch arrays a backend keeps (see Backend.buffer); more shapes than this start afresh.
MAX_BUFFERS = 8
# Smallest rate inside a logarithm: a rate of exactly zero would give 0 * log 0. The product
# of two floored rates (1e-36) is still a normal float32, which NumpyBackend.dense_log_term uses.
TINY_RATE = 1e-18
# Restarts fitted together (pnmf.restarts): the most lanes x N x D entries one step holds.
# A CPU gains only while a step is bound by the overhead of each operation (the seed data's
# 200 x 100, 10 lanes: 1.5x with NumPy, 2.8x with torch, 3.4x with MLX; 2 lanes of digits'
# 1797 x 64 were already 25% slower than one by one with NumPy); a GPU launches kernels far
# slower than it computes small ones, so its lanes may hold much more (not yet measured).
LANE_ENTRIES = {"cpu": 1 << 18, "accelerator": 1 << 24}


class Backend:
    """One framework on one device, with one floating dtype."""

    name: str = ""
    device: str = ""
    dtype: str = "float32"
    # A NumPy backend the dense hot loop (dense_log_term, dense_slope) is handed to where the
    # framework's CPU kernels are slower (see on_host); None keeps it in the framework.
    _host: Backend | None = None

    # -- creation and conversion -------------------------------------------
    def asarray(self, x: np.ndarray) -> Array:
        """Copy a NumPy array onto the device, in the backend's float dtype."""
        raise NotImplementedError

    def asindex(self, x: np.ndarray) -> Array:
        """Copy an integer index array onto the device."""
        raise NotImplementedError

    def to_numpy(self, a: Array) -> np.ndarray:
        """Copy an array back into NumPy (synchronises the device)."""
        raise NotImplementedError

    def zeros_like(self, a: Array) -> Array:
        """Zeros with the shape and dtype of ``a``."""
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...]) -> Array:
        """An uninitialised array of ``shape`` in the backend's float dtype."""
        raise NotImplementedError

    def buffer(self, name: str, shape: tuple[int, ...]) -> Array:
        """A scratch array of ``shape`` kept between calls, for backends that work in place.

        Fresh (c, N, D) arrays on every step cost page faults; a fit needs a few shapes
        (full and last Monte Carlo chunks, one sample), one buffer per name and shape.
        """
        cache = self.__dict__.setdefault("_buffers", {})
        key = (name, tuple(shape))
        if key not in cache:
            if len(cache) >= MAX_BUFFERS:
                cache.clear()
            cache[key] = self.empty(shape)
        return cache[key]

    def scalar(self, value: float) -> Array:
        """A 0-d array holding ``value`` in the backend's float dtype."""
        return self.asarray(np.asarray(value, dtype=self.dtype))

    # -- elementwise ---------------------------------------------------------
    def exp(self, a: Array) -> Array:
        """exp(a)"""
        raise NotImplementedError

    def log(self, a: Array) -> Array:
        """Natural logarithm of a."""
        raise NotImplementedError

    def sqrt(self, a: Array) -> Array:
        """Square root of a."""
        raise NotImplementedError

    def clip(self, a: Array, low, high) -> Array:
        """a bounded to [low, high]; None leaves that side open. The bounds are numbers or
        arrays of the backend that broadcast with a (a bound per entry)."""
        raise NotImplementedError

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        """a where cond holds, else b."""
        raise NotImplementedError

    # -- reductions and shapes ------------------------------------------------
    def sum(self, a: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        """Sum over ``axis`` (all axes when None)."""
        raise NotImplementedError

    def mean(self, a: Array, axis: int | None = None) -> Array:
        """Mean over ``axis`` (all axes when None)."""
        raise NotImplementedError

    def swap(self, a: Array) -> Array:
        """Transpose the last two axes."""
        raise NotImplementedError

    def concat(self, arrays: list[Array]) -> Array:
        """The arrays joined along their first axis."""
        raise NotImplementedError

    def all_finite(self, a: Array) -> Array:
        """A 0-d boolean array: every entry of a is finite."""
        raise NotImplementedError

    # -- randomness -------------------------------------------------------------
    def key(self, seed: int) -> Key:
        """A random state seeded with ``seed``."""
        raise NotImplementedError

    def key_to_numpy(self, key: Key) -> np.ndarray:
        """The random state as a NumPy array, for checkpoints (``key_from_numpy`` restores it)."""
        raise NotImplementedError

    def key_from_numpy(self, state: np.ndarray) -> Key:
        """The random state that ``key_to_numpy`` wrote."""
        raise NotImplementedError

    def normal(self, key: Key, shape: tuple[int, ...]) -> tuple[Array, Key]:
        """Standard normal draws of ``shape`` and the advanced random state."""
        raise NotImplementedError

    def lane_entries(self) -> int:
        """The most lanes x N x D entries of one step of restarts fitted together (LANE_ENTRIES)."""
        return LANE_ENTRIES["cpu" if self.device == "cpu" else "accelerator"]

    # -- sparse counts -----------------------------------------------------------
    def sparse(self, x: sp.csr_matrix, transpose: bool = True) -> Any:
        """The backend's handle on the sparsity pattern of a CSR matrix (N, D).

        With ``transpose=False`` a backend may build what its products over X.T need at the
        first such product rather than now (steps with the loadings fixed never make one);
        with True it is ready before any step, which then moves nothing from the host.
        """
        raise NotImplementedError

    def sampled_matmul(self, pattern: Any, a: Array, b: Array) -> Array:
        """(a @ b.T) at the non-zeros of ``pattern``: a (N, L), b (D, L) -> (nnz,)."""
        raise NotImplementedError

    def sparse_matmul(self, pattern: Any, values: Array, b: Array) -> Array:
        """S @ b with S the pattern holding ``values``: (nnz,), (D, L) -> (N, L)."""
        raise NotImplementedError

    def sparse_matmul_t(self, pattern: Any, values: Array, a: Array) -> Array:
        """S.T @ a with S the pattern holding ``values``: (nnz,), (N, L) -> (D, L)."""
        raise NotImplementedError

    # -- the Poisson log term ------------------------------------------------------
    def dense_log_term(self, x: Array, a: Array, w: Array, second: bool, loadings: bool = True) -> tuple:
        """:func:`log_term` for dense counts x (N, D) and a (c, N, L), the hot loop of a fit
        (d/dW None unless ``loadings``).

        Backends may fuse it; this version is written on the interface, or handed to the
        host backend where there is one.
        """
        if self._host is not None:
            return self.on_host("dense_log_term", x, a, w, second, loadings)
        from ..elbo import log_term  # the math lives with the ELBO, which imports this module

        return log_term(
            self,
            x,
            a,
            w,
            second,
            rate=lambda a, w: a @ self.swap(w),
            rows=lambda v, w: v @ w,
            cols=lambda v, a: self.sum(self.swap(v) @ a, axis=0),
            loadings=loadings,
        )

    def dense_log_value(self, x: Array, a: Array, w: Array) -> Array:
        """The value of :meth:`dense_log_term` alone, sum X log rate for a (c, N, L)."""
        if self._host is not None:
            return self.on_host("dense_log_value", x, a, w)
        return self.sum(x * self.log(a @ self.swap(w) + TINY_RATE))

    def dense_slope(self, x: Array, a: Array, w: Array) -> Array:
        """d/dF of sum X log rate at a = exp(F) (N, L) alone: a * ((X / rate) @ W), (N, L)."""
        if self._host is not None:
            return self.on_host("dense_slope", x, a, w)
        return a * ((x / (a @ self.swap(w) + TINY_RATE)) @ w)

    def lanes_log_term(self, x: Array, a: Array, w: Array) -> tuple:
        """sum X log rate of each of R fits (lanes) of dense counts x (N, D), rate = a @ W.T
        with a = exp(F) (R, N, L) and W (R, D, L): ``(value (R,), d/dF (R, N, L), d/dW (R, D, L))``,
        d/dF = a * ((X / rate) @ W) and d/dW = (X / rate).T @ a lane by lane."""
        if self._host is not None:
            return self.on_host("lanes_log_term", x, a, w)
        rate = a @ self.swap(w) + TINY_RATE
        ratio = x / rate
        value = self.sum(self.sum(x * self.log(rate), axis=-1), axis=-1)
        return value, a * (ratio @ w), self.swap(ratio) @ a

    def sparse_log_term(self, pattern: Any, x: Array, a: Array, w: Array, second: bool, loadings: bool = True) -> tuple:
        """:func:`log_term` over the non-zeros of ``pattern`` (values x, (nnz,)) for a (1, N, L)
        (d/dW None unless ``loadings``)."""
        from ..elbo import log_term

        return log_term(
            self,
            x,
            a,
            w,
            second,
            rate=lambda a, w: self.sampled_matmul(pattern, a[0], w)[None],
            rows=lambda v, w: self.sparse_matmul(pattern, v[0], w)[None],
            cols=lambda v, a: self.sparse_matmul_t(pattern, v[0], a[0]),
            loadings=loadings,
        )

    def sparse_log_value(self, pattern: Any, x: Array, a: Array, w: Array) -> Array:
        """The value of :meth:`sparse_log_term` alone, for a (1, N, L)."""
        return self.sum(x * self.log(self.sampled_matmul(pattern, a[0], w) + TINY_RATE))

    def sparse_slope(self, pattern: Any, x: Array, a: Array, w: Array) -> Array:
        """:meth:`dense_slope` over the non-zeros of ``pattern`` (values x, (nnz,)), (N, L)."""
        rate = self.sampled_matmul(pattern, a, w) + TINY_RATE
        return a * self.sparse_matmul(pattern, x / rate, w)

    # -- handing work to NumPy ------------------------------------------------------
    def to_host(self, a: Array) -> np.ndarray:
        """``a`` as a NumPy array for the host backend (a view where the memory allows)."""
        return self.to_numpy(a)

    def from_host(self, a: np.ndarray) -> Array:
        """A NumPy result of the host backend as an array of this backend."""
        return self.asarray(a)

    def on_host(self, method: str, *args: Any) -> Any:
        """The host backend's ``method`` on ``args``, arrays converted there and back.

        Arguments that are not arrays of this backend (flags, sparsity patterns) pass as they
        are; a tuple result comes back element by element, its Nones kept.
        """
        result = getattr(self._host, method)(*(self.to_host(v) if self.is_array(v) else v for v in args))
        if isinstance(result, tuple):
            return tuple(None if v is None else self.from_host(v) for v in result)
        return self.from_host(result)

    def is_array(self, a: Any) -> bool:
        """Whether ``a`` is an array of this backend's framework."""
        raise NotImplementedError

    # -- execution ----------------------------------------------------------------
    def compile(self, fn: Callable, capture: bool = False) -> Callable:
        """A faster equivalent of a pure function of arrays (identity by default).

        ``capture``: ``fn`` is a training step ``(state, key) -> (state, key, value)`` whose
        calls may be recorded once and replayed (its arrays keep their shapes, it reads
        nothing back to the host and talks to no other process); torch on CUDA then replays
        it from a CUDA graph.
        """
        return fn

    def threads(self, limit: int | None) -> contextlib.AbstractContextManager:
        """A context in which the CPU work uses at most ``limit`` threads (None: no limit).

        Limits the BLAS and OpenMP pools through threadpoolctl, for the block only. The pools
        are looked up once per framework (a lookup reads the process's memory map: 2 ms).
        """
        if limit is None:
            return contextlib.nullcontext()
        if type(self) not in _POOLS:
            from threadpoolctl import ThreadpoolController

            _POOLS[type(self)] = ThreadpoolController()
        return _POOLS[type(self)].limit(limits=limit)

    def launch(self, *trees: Any) -> None:
        """Start computing the arrays in ``trees`` without waiting (lazy frameworks)."""

    def scope(self) -> contextlib.AbstractContextManager:
        """A context in which the backend's work runs on its device."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, dtype={self.dtype!r})"


def csr_transpose_order(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR structure of x.T and the permutation taking x's values to x.T's order.

    Returns ``(indptr_t, indices_t, order)`` with ``x.T.data == x.data[order]``, int32 where
    the non-zeros and the shape allow it (else int64). SciPy's CSR-to-CSC conversion (a
    counting sort, O(nnz + n)) moves the positions 0..nnz-1 as values: 9x faster than a
    lexsort at 5e6 non-zeros.
    """
    index = index_dtype(x)
    positions = sp.csr_matrix((np.arange(x.nnz, dtype=index), x.indices, x.indptr), shape=x.shape).tocsc()
    return positions.indptr.astype(index, copy=False), positions.indices.astype(index, copy=False), positions.data


def index_dtype(x: sp.csr_matrix) -> type:
    """int32 where it indexes every non-zero, row and column of x, else int64."""
    return np.int32 if max(x.nnz, *x.shape) < 2**31 else np.int64
