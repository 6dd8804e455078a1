"""GPU suite: ``python -m pnmf.benchmarks --suite gpu``.

On every GPU a framework here can use (torch on CUDA or MPS, MLX on its GPU), in one run:

* seed setting (200 x 100, 5 components, ``expanded``, E = 10): time per iteration of
  natural and standard training (fits of 20 and 220 iterations), for torch on CUDA also with
  its steps replayed from CUDA graphs; with ``--peer-python`` also PyPI ``pnmf`` 0.1.0 run
  from its own environment; and the fits of 10 restarts of the seed data (the defaults),
  together as lanes of one step and one by one (:mod:`pnmf.restarts`);
* dense 20,000 x 2,000 Poisson counts, 20 components, ``lower-bound`` natural: time per
  iteration ((T(211) - T(11)) / 200 on a GPU, (T(31) - T(11)) / 20 on the CPU), and time
  and iterations to converge;
* sparse 1,000,000 x 20,000 at 0.5% (1e8 non-zeros), 20 components, ``lower-bound``
  natural: time per iteration ((T(111) - T(11)) / 100 on a GPU, (T(8) - T(3)) / 5 on the
  CPU), set-up, time to converge and peak device memory, against the floor of two cuSPARSE
  products of the same shapes (``torch.sparse.mm``: X @ M and X.T @ M2, 20 columns) timed
  in the same run;
* with ``--more``, torch's alternatives on a GPU: the sparse fit with 64- in place of 32-bit
  indices, with its log term's intermediates allocated at each step in place of buffers kept
  with the pattern, and both;
  MLX's alternatives on a GPU: the seed setting with every full sum taken
  in blocks of 32 (as on the CPU) in place of one reduction; on CUDA the sparse fit with the
  gathers and scatter-adds that Metal runs in place of the CUDA kernels; and, each in a
  process of its own, a first fit (seed setting, 20 iterations) with MLX's kernel cache on
  disk empty and then filled by the first process, and the seed setting with MLX's CUDA
  graphs off (``MLX_USE_CUDA_GRAPHS=0``);
* the dense and sparse fits again with torch on the machine's CPU, 2 threads, for the ratio
  (``--cpu no`` leaves them out; ``--cpu only`` runs them alone and adds them to the
  ``gpu.json`` a GPU machine left in the output folder).

``--quick`` shrinks every size (for a check of the suite itself, which then also runs
where there is no GPU, on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from .. import PNMF, make_counts
from ..backends import available, get_backend, gpu_devices
from .speed import best_time, fit_times, sparse_counts
from .workflow import RESTARTS, restart_times

NOISE = "time per iteration below the noise of the fits' difference"
FULL = {"dense": (20_000, 2_000), "sparse": (1_000_000, 20_000), "density": 0.005, "components": 20}
QUICK = {"dense": (2_000, 300), "sparse": (20_000, 2_000), "density": 0.005, "components": 10}
CPU_THREADS = 2


def synchronize(name: str, device: str) -> None:
    """Wait for the device's queued work (a fit's results are read back, so fits need none)."""
    if name == "torch" and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_memory(name: str, device: str, reset: bool = False) -> float | None:
    """Peak device memory in GB since the last reset (None where the framework does not say)."""
    if name == "torch" and device.startswith("cuda"):
        import torch

        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2**30
    if name == "mlx" and device == "gpu":
        import mlx.core as mx

        if reset:
            mx.reset_peak_memory()
        return mx.get_peak_memory() / 2**30
    return None


def per_iteration(x, name: str, device: str, n_components: int, iterations=(11, 31), repeats=2, **params) -> dict:
    """Seconds per iteration and set-up, from the best of ``repeats`` fits of each length."""
    short, long = fit_times(x, n_components, iterations, repeats, backend=name, device=device, **params)
    step = (long - short) / (iterations[1] - iterations[0])
    return {"s_per_iter": step, "setup_s": short - (iterations[0] - 1) * step}


def converge(x, name: str, device: str, n_components: int, max_iter: int = 2000) -> dict:
    """A fit at the default tolerance: seconds, iterations, ELBO and peak device memory."""
    peak_memory(name, device, reset=True)
    start = time.perf_counter()
    model = PNMF(
        n_components,
        mode="lower-bound",
        training_mode="natural",
        prior_scale=1.0,
        backend=name,
        device=device,
        random_state=0,
        max_iter=max_iter,
    ).fit(x)
    seconds = time.perf_counter() - start
    return {
        "s": seconds,
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "elbo": float(model.elbo_),
        "peak_device_gb": peak_memory(name, device),
    }


def cusparse_floor(x, n_components: int) -> float | None:
    """Seconds for X @ M and X.T @ M2 with ``torch.sparse.mm`` on CUDA (best of 5), or None."""
    if "torch" not in available():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    xt = x.T.tocsr()
    as_csr = lambda m: torch.sparse_csr_tensor(  # noqa: E731
        torch.from_numpy(m.indptr.astype(np.int64)),
        torch.from_numpy(m.indices.astype(np.int64)),
        torch.from_numpy(m.data.astype(np.float32)),
        size=m.shape,
        device=device,
    )
    a, at = as_csr(x), as_csr(xt)
    m = torch.rand(x.shape[1], n_components, device=device)
    m2 = torch.rand(x.shape[0], n_components, device=device)

    def products():
        torch.sparse.mm(a, m)
        torch.sparse.mm(at, m2)
        torch.cuda.synchronize()

    products()
    return best_time(products, 5)


def run(
    quick: bool = False,
    peer_python: str | None = None,
    progress=print,
    save=None,
    cpu: str = "also",
    more: bool = False,
) -> dict:
    """Every measurement above on every GPU here (on the CPU too with ``quick`` when there is none).

    torch's GPU comes first, then the cuSPARSE floor, PyPI pnmf, MLX's GPU and the CPU;
    ``save(record)`` is called after each part, so that a run cut short keeps what it
    measured. ``cpu``: "also" (the CPU after the GPUs), "no" (GPUs only) or "only" (the
    CPU's part alone, to be run on another machine than the GPU's). ``more``: torch's and
    MLX's alternatives, and MLX's new processes too (see the module's docstring).
    """
    from .natural_gradient import machine

    if cpu not in ("also", "no", "only"):
        raise ValueError(f"cpu must be 'also', 'no' or 'only', not {cpu!r}")
    save = save or (lambda record: None)
    sizes = QUICK if quick else FULL
    devices = [] if cpu == "only" else gpu_devices()
    if not devices and cpu != "only":
        if not quick:
            raise SystemExit(
                "--suite gpu found no GPU (torch sees no CUDA or MPS, MLX no GPU); --quick runs it on the CPU"
            )
        devices = [("torch", "cpu")]
    record = {"machine": machine(), "quick": quick, "devices": [f"{n}:{d}" for n, d in devices], "runs": []}
    if any(d.startswith("cuda") for _, d in devices):
        import torch

        record["gpu"] = torch.cuda.get_device_name(0)
    seed, _, _ = make_counts(200, 100, 5, random_state=42)
    dense, _, _ = make_counts(*sizes["dense"], sizes["components"], random_state=0)
    rows, cols = sizes["sparse"]
    sparse = sparse_counts(rows, cols, int(rows * cols * sizes["density"]))
    components = sizes["components"]
    record["sparse_nnz"] = int(sparse.nnz)
    # torch first, then the floor and the peer, which are torch's too; MLX after them.
    devices = sorted(devices, key=lambda d: d[0] != "torch")
    for index, (name, device) in enumerate(devices):
        record["runs"].append(measure(name, device, seed, dense, sparse, components, progress, more))
        save(record)
        if index == 0:
            progress("cuSPARSE floor ...")
            record["cusparse_floor_s"] = cusparse_floor(sparse, components)
            save(record)
            if peer_python:
                from .speed import peer_run

                progress("seed setting against PyPI pnmf 0.1.0 ...")
                record["peer"] = peer_run(peer_python, sorted({name for name, _ in devices}))
                save(record)
    if more and ("mlx", "gpu") in devices:  # last: a part that runs out of time loses nothing else
        progress("[mlx:gpu] first fits in new processes (kernel cache empty, then filled) ...")
        record["mlx_new_process"] = new_processes("gpu")
        save(record)
    # The CPU's fits and the floor are torch's: an MLX-only machine measures its GPU alone.
    if cpu != "no" and ("torch", "cpu") not in devices and "torch" in available():
        record["runs"].append(measure("torch", "cpu", seed, dense, sparse, components, progress))
        save(record)
    return record


def measure(name: str, device: str, seed, dense, sparse, components: int, progress=print, more=False) -> dict:
    """One device's entry: the seed setting (GPUs only), the dense and the sparse fit; with
    ``more``, torch's and MLX's alternatives on a GPU."""
    on_cpu = device == "cpu"
    with cpu_threads(CPU_THREADS) if on_cpu else contextlib.nullcontext():
        entry = {"backend": name, "device": get_backend(name, device).device}
        if not on_cpu:
            progress(f"[{name}:{device}] seed setting ...")
            entry["seed"] = seed_setting(seed, name, device)  # torch: each kernel launched from Python
            if name == "mlx" and more:
                from ..backends import mlx as mlx_backend

                progress(f"[{name}:{device}] seed setting, full sums in blocks ...")
                with _switched(mlx_backend, "GPU_PLAIN_SUM", 0):
                    entry["seed_blocked_sums"] = seed_setting(seed, name, device)
            if name == "torch" and device.startswith("cuda"):
                progress(f"[{name}:{device}] seed setting, steps replayed from CUDA graphs ...")
                entry["seed_graphed"] = seed_setting(seed, name, device, graphs=True)
            progress(f"[{name}:{device}] {RESTARTS} restarts of the seed data, together and one by one ...")
            entry["restarts"] = restart_times(seed, 5, name, device)
        progress(f"[{name}:{device}] dense {dense.shape[0]:,} x {dense.shape[1]:,} ...")
        # On a GPU an iteration of the dense fit is about a millisecond: 200 of them tell it from the noise.
        lengths = (11, 31) if on_cpu else (11, 211)
        entry["dense"] = per_iteration(
            dense, name, device, components, lengths, mode="lower-bound", training_mode="natural"
        )
        entry["dense"].update(converge(dense, name, device, components))
        progress(f"[{name}:{device}] sparse {sparse.shape[0]:,} x {sparse.shape[1]:,}, {sparse.nnz:,} non-zeros ...")
        # Few iterations on the CPU: one takes seconds at 1e8 non-zeros. On a GPU 100: the set-up
        # (5-7 s on the H100) varies by more than 20 iterations' time (11 and 31 gave -3.8 ms).
        iterations, repeats = ((3, 8), 1) if on_cpu else ((11, 111), 2)
        entry["sparse"] = per_iteration(
            sparse, name, device, components, iterations, repeats, mode="lower-bound", training_mode="natural"
        )
        if not on_cpu:
            entry["sparse"].update(converge(sparse, name, device, components, max_iter=1000))
        if more and name == "torch" and not on_cpu:
            entry.update(torch_alternatives(sparse, device, components, progress))
        if more and getattr(get_backend(name, device), "_kernels", False):
            from ..backends import mlx as mlx_backend

            progress(f"[{name}:{device}] sparse, products by gathers and scatter-adds (Metal's path) ...")
            peak_memory(name, device, reset=True)
            with _switched(mlx_backend, "CUDA_KERNELS", False):
                entry["sparse_gathered"] = per_iteration(
                    sparse, name, device, components, (11, 31), 1, mode="lower-bound", training_mode="natural"
                )
            entry["sparse_gathered"]["peak_device_gb"] = peak_memory(name, device)
    return entry


# torch's alternatives on a GPU (--more): the sparse fit with each choice of the device
# switched to the other (SHORT_INDEX: 32- or 64-bit indices; KEPT_BUFFERS: the log term's
# intermediates kept with the pattern or allocated at each step), and both.
TORCH_CHOICES = {"SHORT_INDEX": ("64-bit indices", "32-bit indices"), "KEPT_BUFFERS": ("fresh buffers", "kept buffers")}
TORCH_ALTERNATIVES = {
    "sparse_index_switched": ["SHORT_INDEX"],
    "sparse_buffers_switched": ["KEPT_BUFFERS"],
    "sparse_both_switched": ["SHORT_INDEX", "KEPT_BUFFERS"],
}


def torch_alternatives(sparse, device: str, components: int, progress=print) -> dict:
    """The sparse fit on ``device`` with torch's choices switched (see TORCH_ALTERNATIVES):
    time per iteration, peak memory and the choices it ran with."""
    from ..backends import torch as torch_backend

    kind = device.split(":")[0]
    entries = {}
    for label, flags in TORCH_ALTERNATIVES.items():
        with contextlib.ExitStack() as stack:
            for flag in flags:
                now = getattr(torch_backend, flag)
                switched = tuple(k for k in now if k != kind) if kind in now else (*now, kind)
                stack.enter_context(_switched(torch_backend, flag, switched))
            choices = [TORCH_CHOICES[f][kind in getattr(torch_backend, f)] for f in TORCH_CHOICES]
            progress(f"[torch:{device}] sparse, {', '.join(choices)} ...")
            peak_memory("torch", device, reset=True)
            entries[label] = per_iteration(
                sparse, "torch", device, components, (11, 111), 1, mode="lower-bound", training_mode="natural"
            )
            entries[label].update(peak_device_gb=peak_memory("torch", device), choices=choices)
    return entries


# A child process's part: the seed setting's first fits, or its time per iteration.
_CHILD = """
import json, sys, time
start = time.perf_counter()
from pnmf import PNMF, make_counts
from pnmf.benchmarks.gpu import per_iteration
x, _, _ = make_counts(200, 100, 5, random_state=42)
record = {"import_s": time.perf_counter() - start}
params = dict(mode="expanded", training_mode="natural", E=10)
if sys.argv[1] == "first":
    for name in ("first_fit_s", "second_fit_s"):
        start = time.perf_counter()
        PNMF(5, backend="mlx", device=sys.argv[2], max_iter=20, tol=0, random_state=0, **params).fit(x)
        record[name] = time.perf_counter() - start
else:
    record["natural_s_per_iter"] = per_iteration(x, "mlx", sys.argv[2], 5, (20, 220), **params)["s_per_iter"]
print(json.dumps(record))
"""


def new_processes(device: str, timeout: float = 90) -> dict:
    """MLX in new processes: the seed setting's first two fits (20 iterations each) with the
    kernel cache (``MLX_PTX_CACHE_DIR``) empty and then as the first process left it; and the
    seed setting's time per natural iteration with MLX's CUDA graphs off (on the kernels the
    first process built). A part that fails or runs past ``timeout`` seconds records why."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MLX_PTX_CACHE_DIR": cache}
        runs = [
            ("empty_cache", "first", {}),
            ("filled_cache", "first", {}),
            ("no_cuda_graphs", "seed", {"MLX_USE_CUDA_GRAPHS": "0"}),
        ]
        for label, part, extra in runs:
            try:
                answer = subprocess.run(
                    [sys.executable, "-c", _CHILD, part, device],
                    env={**env, **extra},
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=True,
                )
                result[label] = json.loads(answer.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                result[label] = {"error": f"did not end within {timeout:g} s"}
            except subprocess.CalledProcessError as err:
                result[label] = {"error": f"exit code {err.returncode}: {err.stderr.strip()[-300:]}"}
            except (ValueError, IndexError) as err:  # no JSON line in the output
                result[label] = {"error": f"{type(err).__name__}: {err}"}
    return result


def seed_setting(seed, name: str, device: str, graphs: bool = False) -> dict:
    """Seconds per iteration on the seed setting, natural and standard training, with torch's
    steps launched from Python or (``graphs``) replayed from CUDA graphs; with ``graphs`` the
    record says which steps could not be captured."""
    result = {}
    with contextlib.ExitStack() as stack:
        if name == "torch":
            from ..backends import torch as torch_backend

            stack.enter_context(_switched(torch_backend, "CUDA_GRAPHS", graphs))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always", RuntimeWarning)
        for training in ("natural", "standard"):
            result[training] = per_iteration(
                seed, name, device, 5, iterations=(20, 220), mode="expanded", training_mode=training, E=10
            )["s_per_iter"]
        if graphs:
            result["capture_failures"] = sorted({str(w.message) for w in caught if "CUDA graph" in str(w.message)})
    return result


@contextlib.contextmanager
def _switched(module, flag: str, on: bool):
    """``module.flag`` set to ``on`` for the duration."""
    before = getattr(module, flag)
    setattr(module, flag, on)
    try:
        yield
    finally:
        setattr(module, flag, before)


@contextlib.contextmanager
def cpu_threads(count: int):
    """torch's own thread count and the BLAS pools limited to ``count`` threads."""
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(count):
            yield
    finally:
        torch.set_num_threads(previous)


def combine(gpu_record: dict | None, cpu_record: dict) -> dict:
    """The GPU machine's record with the CPU's fits from another machine's ``--cpu only`` run
    (its entry replaces any CPU entry there; ``cpu_machine`` names where it ran)."""
    if gpu_record is None or gpu_record.get("quick") != cpu_record.get("quick"):
        return cpu_record
    runs = [r for r in gpu_record["runs"] if r["device"] != "cpu"] + cpu_record["runs"]
    return {**gpu_record, "runs": runs, "cpu_machine": cpu_record["machine"]}


def report(record: dict) -> str:
    """The GPU suite's record as text: one block per device, ratios to the floor, the CPU and torch."""
    gpu = f", {record['gpu']}" if "gpu" in record else ""
    lines = [f"pnmf GPU suite on {record['machine']}{gpu}{' (quick sizes)' if record['quick'] else ''}"]
    if "cpu_machine" in record:
        lines.append(f"(the CPU's fits on {record['cpu_machine']})")
    floor = record.get("cusparse_floor_s")
    by_device = {f"{r['backend']}:{r['device']}": r for r in record["runs"]}
    cpu = by_device.get("torch:cpu")
    torch_gpu = next((r for r in record["runs"] if r["backend"] == "torch" and r["device"] != "cpu"), None)
    for key, entry in by_device.items():
        lines.append(f"\n{key}")
        faster = cpu is not None and entry is not cpu
        if "seed" in entry:
            natural, standard = entry["seed"]["natural"], entry["seed"]["standard"]
            lines.append(
                f"  seed setting: {natural * 1e3:.3f} ms (natural), {standard * 1e3:.3f} ms (standard) per iteration"
                + (", launched from Python" if "seed_graphed" in entry else "")
            )
        if "seed_blocked_sums" in entry:
            blocked = entry["seed_blocked_sums"]
            lines.append(
                f"  seed setting, full sums in blocks of 32: {blocked['natural'] * 1e3:.3f} ms (natural), "
                f"{blocked['standard'] * 1e3:.3f} ms (standard)"
            )
        if "seed_graphed" in entry:
            graphed = entry["seed_graphed"]
            text = f"  seed setting, steps replayed from CUDA graphs: {graphed['natural'] * 1e3:.3f} ms (natural)"
            text += f", {graphed['standard'] * 1e3:.3f} ms (standard)"
            lines.append(text + "".join(f"; not captured: {f}" for f in graphed["capture_failures"]))
        if "restarts" in entry:
            r = entry["restarts"]
            lines.append(
                f"  {RESTARTS} restarts of the seed data (lower-bound): {r['together_s']:.3f} s together, "
                f"{r['one_by_one_s']:.3f} s one by one ({r['one_by_one_s'] / r['together_s']:.2f}x)"
            )
        d = entry["dense"]
        # A longer fit that was not the slower: an iteration is below the timing's noise.
        text = "  dense: " + (f"{d['s_per_iter'] * 1e3:.2f} ms per iteration" if d["s_per_iter"] > 0 else NOISE)
        text += f"; converged in {d['n_iter']} iterations, {d['s']:.2f} s"
        if faster and d["s_per_iter"] > 0:
            text += f"; {cpu['dense']['s_per_iter'] / d['s_per_iter']:.1f}x faster per iteration than the CPU"
        lines.append(text)
        s = entry["sparse"]
        measured = s["s_per_iter"] > 0
        text = f"  sparse ({record['sparse_nnz']:,} non-zeros): "
        text += f"{s['s_per_iter'] * 1e3:.1f} ms per iteration" if measured else NOISE
        text += f", set-up {s['setup_s']:.2f} s"
        if measured and floor and entry is not cpu:
            text += f"; {s['s_per_iter'] / floor:.2f}x the cuSPARSE floor ({floor * 1e3:.1f} ms)"
        if "n_iter" in s:
            text += f"; converged in {s['n_iter']} iterations, {s['s']:.1f} s"
        if s.get("peak_device_gb") is not None:
            text += f"; peak device memory {s['peak_device_gb']:.2f} GB"
        if measured and faster:
            speedup = cpu["sparse"]["s_per_iter"] / s["s_per_iter"]
            text += f"; {speedup:.1f}x faster per iteration than {CPU_THREADS} CPU threads"
        if measured and entry["backend"] == "mlx" and torch_gpu and torch_gpu["sparse"]["s_per_iter"] > 0:
            text += f"; {s['s_per_iter'] / torch_gpu['sparse']['s_per_iter']:.2f}x torch's time"
        lines.append(text)
        for label in TORCH_ALTERNATIVES:
            if label in entry:
                alt = entry[label]
                text = f"  sparse, {', '.join(alt['choices'])}: {alt['s_per_iter'] * 1e3:.1f} ms per iteration"
                if measured and alt["s_per_iter"] > 0:
                    text += f" ({alt['s_per_iter'] / s['s_per_iter']:.2f}x)"
                lines.append(text + f"; peak device memory {alt['peak_device_gb']:.2f} GB")
        if "sparse_gathered" in entry:
            g = entry["sparse_gathered"]
            text = "  sparse, products by gathers and scatter-adds instead of the CUDA kernels: "
            text += f"{g['s_per_iter'] * 1e3:.1f} ms per iteration"
            if measured:
                text += f" ({g['s_per_iter'] / s['s_per_iter']:.2f}x the kernels' time)"
            if g.get("peak_device_gb") is not None:
                text += f"; peak device memory {g['peak_device_gb']:.2f} GB"
            lines.append(text)
    if "mlx_new_process" in record:
        lines.append(
            "\nmlx:gpu in new processes"
            + (f" ({record['mlx_new_process_from']})" if "mlx_new_process_from" in record else "")
        )
        runs = record["mlx_new_process"]
        for label, text in (("empty_cache", "kernel cache empty"), ("filled_cache", "kernel cache filled")):
            run = runs.get(label, {"error": "not run"})
            if "error" in run:
                lines.append(f"  {text}: {run['error']}")
            else:
                lines.append(
                    f"  {text}: import {run['import_s']:.1f} s, first fit (seed setting, 20 iterations) "
                    f"{run['first_fit_s']:.2f} s, second {run['second_fit_s']:.2f} s"
                )
        run = runs.get("no_cuda_graphs", {"error": "not run"})
        step = run.get("natural_s_per_iter")
        lines.append(
            "  seed setting, MLX_USE_CUDA_GRAPHS=0: "
            + (run["error"] if step is None else f"{step * 1e3:.3f} ms per natural iteration")
        )
    if "peer" in record:
        peer = record["peer"]
        lines.append(f"\nPyPI pnmf 0.1.0: {peer['peer_s_per_iter'] * 1e3:.3f} ms per iteration on the seed setting")
        for o in peer["ours"]:
            lines.append(
                f"  ours, {o['backend']} {o['training']}: {o['s_per_iter'] * 1e3:.3f} ms ({o['ratio_to_peer']:.2f}x)"
            )
    return "\n".join(lines)
