"""Scale suite: ``python -m pnmf.benchmarks --suite scale``.

Time per iteration of a ``lower-bound`` natural fit of the 50,000 x 10,000 sparse set
(1%, 5e6 non-zeros, 20 components) in one process with 2 threads against the same fit
over 2 processes with 1 thread each (``distributed=True`` over torch.distributed's gloo,
rows split in halves), the single process's set-up (the time of a fit of one iteration
less one iteration: conversion, validation, initialisation, the final ELBO) against two
SciPy sparse products (``X @ M``, ``X.T @ M2``), the share of the distributed iteration
spent in the all-reduce, and the per-step payload; then an out-of-core mini-batch fit of
a 1,000,000 x 5,000 .h5ad at 1% (5e7 non-zeros) opened with ``backed="r"``: its time and
peak RSS against the size X takes in memory; and the same fit at 5% (2.5e8 non-zeros),
to tell what grows with X from what does not. The fit's own peak is the process's peak
less its RSS when the fit starts (Python, the libraries and the opened AnnData: the
resident memory then, not the peak so far, which opening the file raises for a moment).
The all-reduce's time is measured around the call, so it includes waiting for the slower
rank. Each iteration time is (T(31) - T(11)) / 20 from fits of 11 and 31 iterations, so
set-up and the final pass cancel; every fit runs in a fresh process.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from .speed import (
    SPARSE_COMPONENTS,
    SPARSE_DENSITY,
    SPARSE_SHAPE,
    _scipy_pair_seconds,
    peak_rss_gb,
    rss_gb,
    sparse_counts,
)

ITERATIONS = (11, 31)
DISK_SHAPE = (1_000_000, 5_000)
DISK_DENSITY = 0.01
DENSER_DISK_DENSITY = 0.05
DISK_COMPONENTS = 10
DISK_BATCH = 20_000
DISK_STEPS = 100


def _result(queue, processes) -> dict:
    """The next result on ``queue``; RuntimeError when a process ended without one."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=5)
        except queues.Empty as empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"a benchmark process failed (exit code {dead[0].exitcode}); its output says why"
                ) from empty


def _timed_fits(x, backend: str, distributed: bool) -> tuple[float, float, float, float]:
    """Seconds of fits of ITERATIONS[0] and ITERATIONS[1] iterations, of the longer one's
    all-reduces, and of a fit of one iteration (after a first, which warms up)."""
    from .. import PNMF
    from ..distributed import TorchGroup

    spent = [0.0]
    reduce = TorchGroup.all_sum_host

    def timed_reduce(self, buffer):
        start = time.perf_counter()
        result = reduce(self, buffer)
        spent[0] += time.perf_counter() - start
        return result

    TorchGroup.all_sum_host = timed_reduce
    params = dict(mode="lower-bound", training_mode="natural", prior_scale=1.0, backend=backend, tol=0, random_state=0)
    PNMF(SPARSE_COMPONENTS, max_iter=1, distributed=distributed, **params).fit(x)  # warm up
    times = []
    for n in (1, *ITERATIONS):
        spent[0] = 0.0
        start = time.perf_counter()
        PNMF(SPARSE_COMPONENTS, max_iter=n, distributed=distributed, **params).fit(x)
        times.append(time.perf_counter() - start)
    return times[1], times[2], spent[0], times[0]


def _single(queue, backend: str) -> None:
    x = sparse_counts(*SPARSE_SHAPE, int(SPARSE_SHAPE[0] * SPARSE_SHAPE[1] * SPARSE_DENSITY))
    short, long, _, single = _timed_fits(x, backend, distributed=False)
    queue.put(
        {
            "short_s": short,
            "long_s": long,
            "one_iteration_s": single,
            "scipy_pair_s": _scipy_pair_seconds(x, SPARSE_COMPONENTS),
            "peak_rss_gb": peak_rss_gb(),
        }
    )


def _rank(queue, backend: str, rank: int, world: int, rendezvous: str) -> None:
    import torch
    import torch.distributed as dist
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    x = sparse_counts(*SPARSE_SHAPE, int(SPARSE_SHAPE[0] * SPARSE_SHAPE[1] * SPARSE_DENSITY))
    rows = x.shape[0] // world
    local = x[rank * rows : (rank + 1) * rows if rank < world - 1 else x.shape[0]]
    with threadpool_limits(1):
        short, long, reduce_s, _ = _timed_fits(local, backend, distributed=True)
    peak = peak_rss_gb()
    queue.put({"rank": rank, "short_s": short, "long_s": long, "allreduce_s": reduce_s, "peak_rss_gb": peak})
    dist.destroy_process_group()


def run(backend: str, world: int = 2) -> dict:
    """Time one process (all threads) against ``world`` processes of one thread each."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_single, args=(queue, backend))
    process.start()
    single = _result(queue, [process])
    process.join()

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = f"file://{Path(folder) / 'rendezvous'}"
        ranks = [context.Process(target=_rank, args=(queue, backend, r, world, rendezvous)) for r in range(world)]
        for p in ranks:
            p.start()
        results = sorted((_result(queue, ranks) for _ in ranks), key=lambda r: r["rank"])
        for p in ranks:
            p.join()
    steps = ITERATIONS[1] - ITERATIONS[0]
    one = (single["long_s"] - single["short_s"]) / steps
    many = max((r["long_s"] - r["short_s"]) / steps for r in results)
    # The longer fit's all-reduces: its steps plus the initialisation's and the final ELBO's few.
    reduce_per_iter = max(r["allreduce_s"] for r in results) / ITERATIONS[1]
    payload = SPARSE_SHAPE[1] * SPARSE_COMPONENTS + 2 * SPARSE_COMPONENTS + 1
    return {
        "backend": backend,
        "shape": list(SPARSE_SHAPE),
        "nnz": int(SPARSE_SHAPE[0] * SPARSE_SHAPE[1] * SPARSE_DENSITY),
        "n_components": SPARSE_COMPONENTS,
        "one_process_s_per_iter": one,
        # Around the iterations (conversion, validation, initialisation, the final ELBO): T(1) - t,
        # from a fit of its own (T(11) - 10 t, one iteration more, carries ten times t's noise).
        "one_process_setup_s": single["one_iteration_s"] - one,
        "scipy_pair_s": single["scipy_pair_s"],
        "processes": world,
        "distributed_s_per_iter": many,
        "ratio": many / one,
        "allreduce_s_per_iter": reduce_per_iter,
        "allreduce_share": reduce_per_iter / many,
        "payload_floats": payload,
        "payload_mb": payload * 8 / 1e6,
        "one_process_peak_rss_gb": single["peak_rss_gb"],
        "rank_peak_rss_gb": [r["peak_rss_gb"] for r in results],
    }


def report(record: dict) -> str:
    """The scale suite's result as a few lines of text."""
    return "\n".join(
        [
            f"{record['shape'][0]:,} x {record['shape'][1]:,} sparse, {record['nnz']:,} non-zeros, "
            f"{record['n_components']} components, lower-bound natural, backend {record['backend']}",
            f"1 process x 2 threads:  {record['one_process_s_per_iter'] * 1e3:.1f} ms per iteration "
            f"= {record['one_process_s_per_iter'] / record['scipy_pair_s']:.2f}x two SciPy products "
            f"({record['scipy_pair_s'] * 1e3:.1f} ms); set-up {record['one_process_setup_s']:.2f} s "
            f"= {record['one_process_setup_s'] / record['scipy_pair_s']:.1f}x; peak RSS "
            f"{record['one_process_peak_rss_gb']:.2f} GB",
            f"{record['processes']} processes x 1 thread: {record['distributed_s_per_iter'] * 1e3:.1f} ms per "
            f"iteration = {record['ratio']:.2f}x (peak RSS per rank "
            + ", ".join(f"{g:.2f}" for g in record["rank_peak_rss_gb"])
            + " GB)",
            f"all-reduce: {record['allreduce_s_per_iter'] * 1e3:.2f} ms per iteration "
            f"({100 * record['allreduce_share']:.1f}% of it), {record['payload_floats']:,} float64 "
            f"({record['payload_mb']:.2f} MB) per step",
        ]
        + [line for key in ("out_of_core", "out_of_core_denser") if key in record for line in _disk_report(record[key])]
    )


def _disk_report(disk: dict) -> list[str]:
    fit = disk["peak_rss_gb"] - disk["rss_after_open_gb"]
    return [
        f"out of core: {disk['shape'][0]:,} x {disk['shape'][1]:,} .h5ad (backed), {disk['nnz']:,} non-zeros, "
        f"{disk['n_components']} components, {disk['steps']} steps of {disk['batch_size']:,} rows and the final "
        f"pass: {disk['seconds']:.0f} s; against X's {disk['x_in_memory_gb']:.2f} GB in memory, the fit's own "
        f"peak {fit:.2f} GB ({fit / disk['x_in_memory_gb']:.2f}x; the per-row outputs {disk['outputs_gb']:.2f} GB), "
        f"the process's {disk['peak_rss_gb']:.2f} GB ({disk['peak_rss_gb'] / disk['x_in_memory_gb']:.2f}x; after "
        f"imports {disk['rss_after_imports_gb']:.2f} GB, after opening the file {disk['rss_after_open_gb']:.2f} GB)"
    ]


def _write_h5ad(path: str, density: float) -> None:
    import anndata

    x = sparse_counts(*DISK_SHAPE, int(DISK_SHAPE[0] * DISK_SHAPE[1] * density))
    anndata.AnnData(x).write_h5ad(path)


def _disk_fit(queue, path: str, backend: str) -> None:
    import warnings

    import anndata
    import h5py
    from sklearn.exceptions import ConvergenceWarning

    from .. import fit_anndata

    warnings.simplefilter("ignore", ConvergenceWarning)  # DISK_STEPS steps by design, as the parent ignores it

    if backend == "torch":
        import torch  # noqa: F401  (its memory belongs to the baseline, not to the fit)
    baseline = rss_gb()
    with h5py.File(path, "r") as handle:
        group = handle["X"]
        in_memory = sum(group[name].size * group[name].dtype.itemsize for name in ("data", "indices", "indptr"))
        nnz = int(group["data"].size)
    adata = anndata.read_h5ad(path, backed="r")
    opened = rss_gb()  # what the fit starts from (opening the file peaks above it, briefly)
    start = time.perf_counter()
    model = fit_anndata(
        adata,
        DISK_COMPONENTS,
        mode="lower-bound",
        training_mode="natural",
        backend=backend,
        batch_size=DISK_BATCH,
        max_iter=DISK_STEPS,
        random_state=0,
    )
    seconds = time.perf_counter() - start
    queue.put(
        {
            "shape": list(DISK_SHAPE),
            "nnz": nnz,
            "n_components": DISK_COMPONENTS,
            "batch_size": DISK_BATCH,
            "steps": int(model.n_iter_),
            "seconds": seconds,
            "x_in_memory_gb": in_memory / 2**30,
            "peak_rss_gb": peak_rss_gb(),
            "rss_after_imports_gb": baseline,
            "rss_after_open_gb": opened,
            # mean_, var_ and the factors: (n_rows, n_components) each, in the fit's dtype
            "outputs_gb": 3 * model.mean_.nbytes / 2**30,
            "elbo": float(model.elbo_),
        }
    )


def out_of_core(backend: str, density: float = DISK_DENSITY) -> dict:
    """A mini-batch fit of an .h5ad on disk at ``density`` in a fresh process: its time and peak memory."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "counts.h5ad")
        writer = context.Process(target=_write_h5ad, args=(path, density))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the .h5ad failed (exit code {writer.exitcode})")
        queue = context.Queue()
        process = context.Process(target=_disk_fit, args=(queue, path, backend))
        process.start()
        result = _result(queue, [process])
        process.join()
    return result
