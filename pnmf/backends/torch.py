"""PyTorch backend: CUDA, MPS or CPU.

On the CPU the dense hot loop (the log term and its gradients) runs in NumPy on the
tensors' own memory, which was faster here; sparse counts use torch's CSR kernels. On
CUDA a full-batch step on dense counts is replayed from a CUDA graph (``CUDA_GRAPHS``;
set it to False to launch every kernel from Python).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from .base import TINY_RATE, Backend, csr_transpose_order, index_dtype
from .numpy import NumpyBackend

# Replay the training steps that allow it from CUDA graphs (see _Graphed): on an H100 a step
# of the seed setting took 0.28-0.36 ms against 0.98-1.84 ms launched from Python.
CUDA_GRAPHS = True
# Eager steps before the capture (the first calls allocate the backend's scratch buffers).
GRAPH_WARMUP = 3
# Devices with a kernel for the sparse sampled product (torch.sparse.sampled_addmm).
SAMPLED_ADDMM = ("cpu", "cuda")
# Devices whose sparse products index with 32 bits where that reaches (the others keep int64).
SHORT_INDEX = ("cpu", "cuda")
# Devices whose sparse log term writes its nnz-sized intermediates into two buffers kept with
# the pattern (the others allocate them at each step).
KEPT_BUFFERS = ("cpu", "cuda")


class _Graphed:
    """A training step ``(state, key) -> (state, key, value)`` replayed from a CUDA graph.

    At the seed size a step is a few dozen tiny kernels, and launching them from Python costs
    more than running them. After ``GRAPH_WARMUP`` eager calls the step is captured once, with
    the state copied into fixed input tensors and the generator registered with the graph;
    each later call copies into them, in one batched copy, the entries of the state that are
    not those tensors already (inside the fit loop: the entries the last replay changed),
    replays, and returns the fixed output tensors, valid until the next call, with a copy of
    the value. A step that cannot be captured (a host transfer or synchronisation in it)
    runs eagerly, with a warning.
    """

    def __init__(self, fn):
        self.fn, self.calls, self.graph, self.failed = fn, 0, None, None

    def __call__(self, state, key):
        if self.graph is None:
            if self.failed is not None or self.calls < GRAPH_WARMUP:
                self.calls += 1
                return self.fn(state, key)
            try:
                self._capture(state, key)
            except Exception as err:  # any failure to capture leaves the eager step, which works
                self.graph, self.failed = None, f"{type(err).__name__}: {err}"
                torch.cuda.synchronize()
                warnings.warn(
                    f"the training step could not be captured in a CUDA graph ({self.failed}); it runs eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self.fn(state, key)
        elif key is not self.key:
            raise ValueError("a captured step must be called with the generator it was captured with")
        else:
            stale = [(self.inputs[k], v) for k, v in state.items() if v is not self.inputs[k]]
            if stale:
                torch._foreach_copy_([a for a, _ in stale], [v for _, v in stale])
        self.graph.replay()
        return dict(self.outputs), key, self.value.clone()

    def _capture(self, state, key):
        self.inputs = {k: v.clone() for k, v in state.items()}
        self.key = key
        graph = torch.cuda.CUDAGraph()
        if isinstance(key, torch.Generator):
            graph.register_generator_state(key)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            outputs, out_key, value = self.fn(self.inputs, key)
        if out_key is not key or set(outputs) != set(self.inputs):
            raise RuntimeError("the step changes its generator or its state's keys")
        # An output that is an input tensor (state the step leaves as it is) stays that tensor.
        self.graph, self.outputs, self.value = graph, outputs, value


@dataclass
class _Pattern:
    crow: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor | None  # each non-zero's row, where there is no sampled_addmm
    shape: tuple[int, int]
    ones: torch.Tensor  # the pattern as a CSR tensor, for sampled_addmm
    # X.T's (crow, col) and the order taking X's values to it, or, for counts whose steps
    # keep the loadings fixed (transform, the rows' q(F) of a mini-batch fit), what makes
    # them at the first product over X.T: 12 bytes a non-zero and a sort those are spared.
    _transpose: Callable[[], tuple[torch.Tensor, ...]] | tuple[torch.Tensor, ...]
    _scratch: list = field(default_factory=list)

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X.T's CSR structure (crow, col) and the permutation of X's values into it."""
        if callable(self._transpose):
            self._transpose = self._transpose()  # and lets go of X's host arrays
        return self._transpose

    def scratch(self, like: torch.Tensor) -> list[torch.Tensor]:
        """Two buffers shaped like the values ``like`` (nnz,), made at the first call and kept."""
        if not self._scratch or self._scratch[0].dtype != like.dtype:
            self._scratch[:] = [torch.empty_like(like), torch.empty_like(like)]
        return self._scratch


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def devices() -> list[str]:
    """The devices this torch can run on here: 'cpu', each CUDA GPU, 'mps'."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


def _check_cuda(device: torch.device) -> None:
    """RuntimeError unless CUDA ``device`` is there, checked without a tensor: one would open
    a CUDA context on the current GPU, GPU 0 in every process that torchrun starts until
    the process group puts each on its own (see :func:`pnmf.distributed.join`)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RuntimeError(f"there is no CUDA device {device.index} (this machine has {count})")


def _unavailable(device: str, err: Exception) -> str:
    """Why torch cannot run on ``device``, in words (its own message, for the MPS backend, is
    a page on operator registration)."""
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA GPU is visible to it (a CPU-only build of torch, or no driver)"
    elif kind == "mps" and not torch.backends.mps.is_available():
        reason = "MPS needs a Mac with Apple silicon (or an AMD GPU) and a torch built for it"
    elif kind == "gpu":
        reason = "torch names its GPUs 'cuda' and 'mps' ('gpu' is MLX's name)"
    elif "Could not run" in str(err):
        reason = f"this build of torch has no {kind!r} backend"
    else:
        reason = str(err).splitlines()[0]
    return f"device={device!r} is not available to torch: {reason}; devices here: {', '.join(devices())}"


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        device = default_device() if device is None else str(device)
        try:
            self._device = torch.device(device)
            if self._device.type == "cuda":
                _check_cuda(self._device)
            else:
                torch.empty(0, device=self._device)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(_unavailable(device, err)) from err
        if self._device.type == "mps" and dtype == "float64":
            raise ValueError("dtype='float64' is not supported by torch on 'mps'; use 'float32'")
        self.device = str(self._device)
        self.dtype = dtype
        self._dtype = getattr(torch, dtype)
        # On the CPU the dense hot loop runs in NumPy on the tensors' own memory (see below).
        self._host = NumpyBackend(dtype=dtype) if self._device.type == "cpu" else None

    def scope(self):
        # The core computes its own gradients: autograd's bookkeeping only costs time.
        return torch.inference_mode()

    @contextlib.contextmanager
    def threads(self, limit):
        # torch keeps its own intra-op thread count, which also governs its MKL calls.
        if limit is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(limit)
        try:
            with super().threads(limit):
                yield
        finally:
            torch.set_num_threads(before)

    def asarray(self, x):
        # torch.tensor keeps a column-major array's strides; the steps want rows (see NumPy's).
        return torch.tensor(np.asarray(x, dtype=self.dtype, order="C"), dtype=self._dtype, device=self._device)

    def scalar(self, value):
        # A fill, not a copy from the host: a step with constants in it can be captured.
        return torch.full((), float(value), dtype=self._dtype, device=self._device)

    def compile(self, fn, capture=False):
        if capture and CUDA_GRAPHS and self._device.type == "cuda":
            return _Graphed(fn)
        return fn

    def asindex(self, x, dtype=np.int64):
        return torch.as_tensor(np.asarray(x, dtype=dtype), device=self._device)

    def to_numpy(self, a):
        return a.detach().cpu().numpy()

    def zeros_like(self, a):
        return torch.zeros_like(a)

    def exp(self, a):
        return torch.exp(a)

    def log(self, a):
        return torch.log(a)

    def sqrt(self, a):
        return torch.sqrt(a)

    def clip(self, a, low, high):
        return torch.clamp(a, low, high)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def sum(self, a, axis=None, keepdims=False):
        return torch.sum(a) if axis is None else torch.sum(a, dim=axis, keepdim=keepdims)

    def mean(self, a, axis=None):
        return torch.mean(a) if axis is None else torch.mean(a, dim=axis)

    def swap(self, a):
        return a.transpose(-1, -2)

    def concat(self, arrays):
        return torch.cat(arrays)

    def all_finite(self, a):
        return torch.isfinite(a).all()

    def empty(self, shape):
        return torch.empty(shape, dtype=self._dtype, device=self._device)

    def is_array(self, a):
        return isinstance(a, torch.Tensor)

    def to_host(self, a):
        return a.numpy()  # a view of the CPU tensor's memory: no copy

    def from_host(self, a):
        return torch.from_numpy(np.asarray(a))  # shares the NumPy result's memory

    # On the CPU the dense hot loop is NumPy's: at the seed size MKL's small products took
    # 40-58 us against OpenBLAS's 20, and torch's log 115 us against NumPy's 76 (2e5 values).
    def dense_log_term(self, x, a, w, second, loadings=True):
        if self._host is not None:
            return super().dense_log_term(x, a, w, second, loadings)  # handed to the host
        # In place in two scratch (c * N, D) tensors, with the sample axis folded into single
        # matrix products whose outputs have L rows: MKL computes those 3x faster than the
        # (c * N, L) layout.
        c, n, n_comp = a.shape
        flat_a = a.reshape(c * n, n_comp)
        rate = self.buffer("rate", (c * n, x.shape[1]))
        work = self.buffer("work", rate.shape)
        torch.mm(flat_a, w.T, out=rate).add_(TINY_RATE)
        torch.log(rate, out=work)
        # An accurate (cascade) sum, not torch.mv: MKL's float32 dot product was off by enough
        # to reject good checked steps in lower-bound mode (a fit stopped at 260 of ~500 steps).
        value = torch.sum(work.view(c, n, -1).mul_(x))
        torch.div(x, rate.view(c, n, -1), out=work.view(c, n, -1))  # X / rate
        g_f = a * torch.mm(w.T, work.T).T.reshape(a.shape)
        g_w = torch.mm(flat_a.T, work).T if loadings else None
        h_f = None
        if second:
            work.div_(rate)  # X / rate^2
            h_f = g_f - a * (a * torch.mm((w * w).T, work.T).T.reshape(a.shape))
        return value, g_f, g_w, h_f

    def dense_slope(self, x, a, w):
        if self._host is not None:
            return super().dense_slope(x, a, w)  # handed to the host
        ratio = self.buffer("rate", x.shape)
        torch.mm(a, w.T, out=ratio).add_(TINY_RATE)
        torch.div(x, ratio, out=ratio)
        return a * torch.mm(w.T, ratio.T).T

    def key(self, seed):
        generator = torch.Generator(device=self._device)
        generator.manual_seed(int(seed))
        return generator

    def key_to_numpy(self, key):
        return key.get_state().numpy().copy()

    def key_from_numpy(self, state):
        generator = torch.Generator(device=self._device)
        generator.set_state(torch.from_numpy(np.asarray(state, dtype=np.uint8).copy()))
        return generator

    def normal(self, key, shape):
        return torch.randn(shape, generator=key, device=self._device, dtype=self._dtype), key

    def sparse(self, x, transpose=True):
        # Sparse products take 32-bit indices where they reach: 12 bytes a non-zero less, and
        # on the CPU CSR @ dense 2.5x faster (16-21 against 42-49 ms at 2e7 non-zeros, torch
        # 2.2 and 2.13). On an H100, with the kept buffers, an iteration at 1e8 non-zeros took
        # 20.1 against 24.1 ms and 4.0 against 5.4 GB (GPU suite, --more).
        index = index_dtype(x) if self._device.type in SHORT_INDEX else np.int64
        crow, col = self.asindex(x.indptr, index), self.asindex(x.indices, index)
        indptr, indices, shape = x.indptr, x.indices, x.shape  # held until then; X's values are not

        def transpose_structure() -> tuple[torch.Tensor, ...]:
            structure = sp.csr_matrix((np.broadcast_to(np.int8(1), indices.shape), indices, indptr), shape=shape)
            return tuple(self.asindex(a, index) for a in csr_transpose_order(structure))

        rows = None
        if self._device.type not in SAMPLED_ADDMM:  # each non-zero's row, for the gathers there (8 bytes)
            rows = self.asindex(np.repeat(np.arange(x.shape[0], dtype=np.int64), np.diff(x.indptr)))
        return _Pattern(
            crow=crow,
            col=col,
            rows=rows,
            shape=x.shape,
            ones=self._csr(crow, col, torch.ones(len(x.indices), dtype=self._dtype, device=self._device), x.shape),
            _transpose=transpose_structure() if transpose else transpose_structure,
        )

    @staticmethod
    def _csr(crow, col, values, shape):
        with warnings.catch_warnings():
            # torch's notes on its sparse tensors, not the user's concern: beta support, and
            # (torch 2.11, even with check_invariants=False) the invariants left unchecked.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
            return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)

    def sampled_matmul(self, pattern, a, b, out=None):
        """The interface's, written into ``out`` (nnz,) when given."""
        if self._device.type not in SAMPLED_ADDMM:
            return torch.sum(a[pattern.rows] * b[pattern.col], -1, out=out)
        if out is None:
            return torch.sparse.sampled_addmm(pattern.ones, a, b.T, beta=0.0).values()
        # Into a CSR tensor of the pattern's own indices: a fresh result copies them as int64
        # (3x the values' bytes), and took 18 ms against 7 at 4.9e6 non-zeros (torch 2.13, CPU).
        torch.sparse.sampled_addmm(
            pattern.ones, a, b.T, beta=0.0, out=self._csr(pattern.crow, pattern.col, out, pattern.shape)
        )
        return out

    def sparse_log_term(self, pattern, x, a, w, second, loadings=True):
        if self._device.type not in KEPT_BUFFERS:
            return super().sparse_log_term(pattern, x, a, w, second, loadings)
        # The interface's version with its nnz-sized intermediates written into two buffers
        # kept with the pattern, each over one no longer needed: on the CPU each fresh one
        # costs a page fault per 4 kB (see docs/performance.md, huge pages).
        value, rate, spare = self._log_value(pattern, x, a, w)
        ratio = torch.div(x, rate, out=spare if second else rate)
        g_f = a * self.sparse_matmul(pattern, ratio, w)[None]
        h_f = None
        if second:
            squared = torch.div(ratio, rate, out=rate)
            h_f = g_f - a * (a * self.sparse_matmul(pattern, squared, w * w)[None])
        g_w = self.sparse_matmul_t(pattern, ratio, a[0], out=rate if second else spare) if loadings else None
        return value, g_f, g_w, h_f

    def sparse_log_value(self, pattern, x, a, w):
        if self._device.type not in KEPT_BUFFERS:
            return super().sparse_log_value(pattern, x, a, w)
        return self._log_value(pattern, x, a, w)[0]

    def _log_value(self, pattern, x, a, w):
        """sum X log rate over the non-zeros for a (1, N, L), and the pattern's two buffers:
        the first holding the rates (floored at TINY_RATE), the second free."""
        rate, spare = pattern.scratch(x)
        self.sampled_matmul(pattern, a[0], w, out=rate).add_(TINY_RATE)
        return torch.mul(x, torch.log(rate, out=spare), out=spare).sum(), rate, spare

    def sparse_matmul(self, pattern, values, b):
        return self._csr(pattern.crow, pattern.col, values, pattern.shape) @ b

    def sparse_matmul_t(self, pattern, values, a, out=None):
        """The interface's, the gathered values written into ``out`` (nnz,) when given."""
        shape_t = (pattern.shape[1], pattern.shape[0])
        # index_select gathers 2x faster than values[order] on the CPU (1.3 against 2.5 ms at 1.1e6).
        crow_t, col_t, order_t = pattern.transposed()
        values_t = torch.index_select(values, 0, order_t, out=out)
        return self._csr(crow_t, col_t, values_t, shape_t) @ a
