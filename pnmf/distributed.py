"""Data-parallel fits over rows: one process group, one all-reduce per step (DESIGN §7).

Each process holds a block of rows of X (and their q(F)) and a replica of the loadings W.
Every quantity the loadings' update and the stopping rule read is a sum over rows, so a
step needs one all-reduce of one flat buffer: ``[value, w_numerator (D*L),
expected_sum (L), ...]``. Every rank then applies the same update to the same numbers and
W stays bitwise identical across ranks.

Engines: ``torch.distributed`` (gloo on the CPU, NCCL on CUDA) for the NumPy and torch
backends, ``mx.distributed`` (ring, MPI) for MLX. The user starts the processes the
engine's usual way (``torchrun``, ``mlx.launch``); pnmf joins the group that is there.
"""

from __future__ import annotations

import atexit
import numbers
import os
import time
from datetime import timedelta

import numpy as np
from sklearn.utils import check_random_state

from .backends.base import Array, Backend

LAUNCH_HINT = (
    "start the processes with `torchrun --nproc-per-node=2 script.py` (torch and NumPy backends: call "
    "torch.distributed.init_process_group('gloo') or 'nccl' first, or let pnmf join the group torchrun "
    "describes) or `mlx.launch -n 2 script.py` (MLX backend)"
)


class CollectiveError(RuntimeError):
    """A collective operation failed: another process of the group died, raised or timed out."""


class Group:
    """The processes of a data-parallel fit: ``rank`` of ``size``, and sums across them."""

    rank: int = 0
    size: int = 1

    def all_sum_host(self, buffer: np.ndarray) -> np.ndarray:
        """The elementwise sum of a float64 NumPy buffer over every rank."""
        raise NotImplementedError

    def all_sum(self, b: Backend, *arrays: Array | None) -> list[Array | None]:
        """Each array summed over every rank, in ONE all-reduce of one flat buffer; None stays None.

        The default goes through a float64 host buffer; an engine that can reduce device
        arrays overrides it.
        """
        present = [a for a in arrays if a is not None]
        host = [np.asarray(b.to_numpy(a), dtype=np.float64) for a in present]
        flat = self.all_sum_host(np.concatenate([h.reshape(-1) for h in host]))
        parts, start = [], 0
        for h in host:
            part = flat[start : start + h.size].reshape(h.shape)
            start += h.size
            parts.append(b.scalar(float(part)) if h.ndim == 0 else b.asarray(part))
        summed = iter(parts)
        return [None if a is None else next(summed) for a in arrays]

    def row_blocks(self, n_local: int, n_features: int, total: float) -> tuple[np.ndarray, float]:
        """Every rank's number of rows and the sum of all counts, checked in one all-reduce.

        Raises ValueError on every rank (so none is left waiting) when the ranks' shards
        differ in their number of features or a rank holds no rows.
        """
        buffer = np.zeros(self.size + 3)
        buffer[self.rank] = n_local
        buffer[self.size :] = n_features, float(n_features) ** 2, total
        summed = self.all_sum_host(buffer)
        rows, feature_sum, feature_square_sum, grand_total = summed[: self.size], *summed[self.size :]
        if feature_square_sum * self.size != feature_sum**2:
            raise ValueError(
                f"the ranks' shards have different numbers of features (this rank, {self.rank}, has "
                f"{n_features}; their mean is {feature_sum / self.size:g}): every rank needs the same columns"
            )
        if np.any(rows == 0):
            empty = [int(r) for r in np.flatnonzero(rows == 0)]
            raise ValueError(f"rank(s) {empty} hold no rows: give every process at least one row")
        return rows.astype(np.int64), float(grand_total)


class TorchGroup(Group):
    """``torch.distributed``'s default group (gloo, or NCCL for CUDA tensors)."""

    def __init__(self, timeout: float | None, device: str | None = None):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.timeout = timeout
        engine = dist.get_backend()
        self.device = reduce_device(engine, device, torch.cuda.current_device() if engine == "nccl" else 0)

    def all_sum_host(self, buffer: np.ndarray) -> np.ndarray:
        tensor = self.torch.from_numpy(np.ascontiguousarray(buffer, dtype=np.float64)).to(self.device)
        try:
            work = self.dist.all_reduce(tensor, async_op=True)
            if self.timeout is None:
                work.wait()
            else:
                self._wait(work)
        except Exception as err:  # gloo and NCCL raise RuntimeError subclasses of their own
            if "Duplicate GPU" in str(err):  # NCCL: two processes on one GPU
                why = (
                    "NCCL takes one GPU a process, and two processes used the same: give each its own, "
                    'device=f"cuda:{local_rank}" (local_rank = int(os.environ["LOCAL_RANK"])) or '
                    "torch.cuda.set_device(local_rank) before the fit"
                )
            else:
                why = (
                    "another process of the fit probably died, raised or fell behind by more than the timeout: "
                    "its own output says why"
                )
            raise CollectiveError(
                f"rank {self.rank} of {self.size}: an all-reduce failed ({type(err).__name__}: {err}); {why}"
            ) from err
        return tensor.cpu().numpy()

    def _wait(self, work) -> None:
        """Wait for ``work`` at most ``timeout`` seconds (gloo's own wait keeps the group's timeout)."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the other processes within distributed_timeout={self.timeout} s")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        work.wait()  # raises the collective's own error, if it failed


class MLXGroup(Group):
    """``mx.distributed``'s group (ring over TCP, or MPI)."""

    def __init__(self, group):
        import mlx.core as mx

        self.mx, self.group = mx, group
        self.rank, self.size = group.rank(), group.size()

    def all_sum(self, b: Backend, *arrays: Array | None) -> list[Array | None]:
        """One ``mx.distributed.all_sum`` of the arrays' concatenation, in the backend's dtype.

        It stays an MLX operation, so a compiled step (``mx.compile``) keeps it inside; MLX
        GPUs have no float64, so the buffer there is float32.
        """
        mx = self.mx
        present = [a for a in arrays if a is not None]
        summed = mx.distributed.all_sum(mx.concatenate([a.reshape(-1) for a in present]), group=self.group)
        parts, start = [], 0
        for a in present:
            parts.append(summed[start : start + a.size].reshape(a.shape))
            start += a.size
        parts = iter(parts)
        return [None if a is None else next(parts) for a in arrays]

    def all_sum_host(self, buffer: np.ndarray) -> np.ndarray:
        mx = self.mx
        try:
            summed = mx.distributed.all_sum(mx.array(buffer, dtype=mx.float64), group=self.group, stream=mx.cpu)
            return np.array(summed, dtype=np.float64)
        except Exception as err:
            raise CollectiveError(f"rank {self.rank} of {self.size}: an all-reduce failed: {err}") from err


def reduce_device(engine: str, device: str | None, current: int) -> str:
    """Where ``torch.distributed``'s ``engine`` reduces the buffer of a fit on ``device``.

    gloo reduces on the host. NCCL reduces on a GPU, and every rank must use its own: the
    fit's own GPU, or the ``current`` CUDA device (``torch.cuda.set_device``) when the fit
    runs on the CPU or names no index ('cuda').
    """
    if engine != "nccl":
        return "cpu"
    if device is not None and device.startswith("cuda:"):
        return device
    return f"cuda:{current}"


def speaks(group: Group | None) -> bool:
    """Whether this process speaks for the fit (its progress, warnings and notices): a
    single process, or rank 0 of a group."""
    return group is None or group.rank == 0


def shared_random_state(random_state, group: Group | None) -> np.random.RandomState:
    """``check_random_state(random_state)``, drawing alike on every rank of ``group``.

    An int seeds every rank alike. None (NumPy's global state) and a RandomState differ
    between processes, and each rank would start from its own loadings: rank 0 draws a
    seed for all of them instead.
    """
    rng = check_random_state(random_state)
    if group is None or isinstance(random_state, numbers.Integral):
        return rng
    seed = np.zeros(1)
    if group.rank == 0:
        seed[0] = rng.randint(np.iinfo(np.int32).max)
    return np.random.RandomState(int(group.all_sum_host(seed)[0]))


def shard(n_rows: int, group: Group) -> slice:
    """This rank's block of ``n_rows`` rows split evenly in rank order (the first blocks one row longer)."""
    base, extra = divmod(n_rows, group.size)
    start = group.rank * base + min(group.rank, extra)
    return slice(start, start + base + (group.rank < extra))


def join(backend: str, timeout: float | None = None, device: str | None = None) -> Group:
    """The process group of a ``distributed=True`` fit on ``backend`` and ``device``;
    ValueError without one of size > 1.

    torch.distributed is joined as it is; when it is not initialised but ``torchrun``'s
    environment (WORLD_SIZE > 1) is there, pnmf initialises it: NCCL for a fit on CUDA
    (each process on GPU LOCAL_RANK when ``device`` is 'cuda' without an index), gloo
    otherwise.
    """
    if backend == "mlx":
        import mlx.core as mx

        if not mx.distributed.is_available():
            raise ValueError(f"distributed=True on MLX needs mx.distributed, which this MLX build lacks; {LAUNCH_HINT}")
        group = mx.distributed.init()
        if group.size() < 2:
            raise ValueError(f"distributed=True found an MLX group of size {group.size()}; {LAUNCH_HINT}")
        return MLXGroup(group)
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise ImportError(
            f"distributed=True with backend={backend!r} needs torch.distributed: pip install torch"
        ) from err
    if not dist.is_available():
        raise ValueError("distributed=True needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        engine = "nccl" if device is not None and device.startswith("cuda") else "gloo"
        if device == "cuda":  # torchrun starts a process per GPU: LOCAL_RANK names this one's
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        kwargs = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        dist.init_process_group(engine, **kwargs)
        if engine == "gloo":
            # Destroyed at exit: a gloo group still open while the interpreter shuts down can
            # abort it (SIGABRT; once in 58 two-process runs here). NCCL's is left alone: its
            # teardown is collective and would wait for a rank that failed.
            atexit.register(_leave, dist)
    if not dist.is_initialized() or dist.get_world_size() < 2:
        size = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(f"distributed=True found no process group of size > 1 (size {size}); {LAUNCH_HINT}")
    return TorchGroup(timeout, device)


def join_fit(model) -> Group:
    """The process group of ``model``'s ``distributed=True`` fit: that of the backend its
    parameters choose (torch.distributed for torch and NumPy, mx.distributed for MLX)."""
    from .backends import get_backend

    b = get_backend(model.backend, model.device, model.dtype)
    return join(b.name, model.distributed_timeout, b.device)


def _leave(dist) -> None:
    """Destroy the torch.distributed group pnmf initialised, if it is still there."""
    if dist.is_initialized():
        dist.destroy_process_group()
