"""Speed suite: ``python -m pnmf.benchmarks --suite speed``.

* digits: a converged natural lower-bound fit of scikit-learn's digits (1797 x 64),
  10 components, against ``sklearn.decomposition.NMF(beta_loss="kullback-leibler",
  solver="mu")`` to its own convergence: wall time, and held-out Poisson deviance of a
  fit on a binomial half of the counts, scored on the other half;
* sparse: time per iteration on a 50,000 x 10,000 CSR matrix at 1% (5e6 non-zeros),
  20 components, ``lower-bound`` natural, against two SciPy sparse-dense products
  (``X @ M`` and ``X.T @ M2``, 20 columns), and the process's peak memory; the Monte
  Carlo modes' cost per sample;
* scaling: time per iteration against nnz from 1e5 to 1e7 (log-log plot);
* peer (``--peer-python PATH``): time per iteration on the seed setting (200 x 100,
  5 components, expanded, E = 10) against the PyPI package ``pnmf`` 0.1.0, which installs
  under the same name and so lives in its own virtual environment; it is called through
  its documented interface only (``from PNMF import PNMF``, ``fit_transform``).

Each sparse measurement runs in a fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import PNMF, poisson_deviance, thin

SPARSE_SHAPE = (50_000, 10_000)
SPARSE_DENSITY = 0.01
SPARSE_COMPONENTS = 20
SCALING_NNZ = (1e5, 3e5, 1e6, 3e6, 1e7)
# Iterations of one timed fit of ours on the seed setting (tol=0, so exactly this many).
PEER_ITERATIONS = 300


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB (NaN where the platform has no
    ``resource`` module: Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB elsewhere


def rss_gb() -> float:
    """This process's resident memory now, in GiB, where ``/proc`` tells it (Linux); elsewhere
    the peak so far, which is at least as much."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, AttributeError):
        return peak_rss_gb()


def sparse_counts(n_rows: int, n_cols: int, nnz: int, seed: int = 0) -> sp.csr_matrix:
    """A CSR count matrix with about ``nnz`` non-zeros spread evenly over the rows."""
    rng = np.random.default_rng(seed)
    per_row = max(1, int(round(nnz / n_rows)))
    rows = np.repeat(np.arange(n_rows, dtype=np.int32), per_row)
    cols = rng.integers(0, n_cols, size=rows.size, dtype=np.int32)
    values = (rng.poisson(1.0, size=rows.size) + 1).astype(np.float32)
    x = sp.csr_matrix((values, (rows, cols)), shape=(n_rows, n_cols))
    x.sum_duplicates()
    return x


def timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the seconds it took: ``(result, seconds)``."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def best_time(fn, repeats: int = 3) -> float:
    """The least wall time of ``repeats`` calls of ``fn``: on a shared machine, noise only adds."""
    return min(timed(fn)[1] for _ in range(repeats))


def fit_times(x, n_components: int, iterations=(2, 8), repeats: int = 2, **params) -> tuple[float, float]:
    """Seconds of fits of ``iterations[0]`` and ``iterations[1]`` iterations (``tol=0``), each the
    best of ``repeats``, after a warm-up fit; ``params`` go to ``PNMF``."""
    params = {"tol": 0, "random_state": 0, "prior_scale": 1.0, **params}
    PNMF(n_components, max_iter=1, **params).fit(x)  # warm up
    first, last = (best_time(lambda n=n: PNMF(n_components, max_iter=n, **params).fit(x), repeats) for n in iterations)
    return first, last


def seconds_per_iteration(
    x,
    backend: str,
    mode: str,
    n_components: int,
    E: int = 1,
    training: str = "natural",
    iterations=(5, 35),
    repeats: int = 2,
) -> float:
    """(T(n2) - T(n1)) / (n2 - n1) for fits of n1 and n2 iterations, each the best of
    ``repeats``: the set-up (conversion, initialisation, final pass) cancels. Thirty
    iterations apart: six gave torch 0.037-0.052 s on the sparse set in four runs, where
    thirty gave 0.047 twice (huge pages)."""
    first, last = fit_times(
        x, n_components, iterations, repeats, mode=mode, training_mode=training, backend=backend, E=E
    )
    return (last - first) / (iterations[1] - iterations[0])


def _scipy_pair_seconds(x, n_columns: int, repeats: int = 5) -> float:
    rng = np.random.default_rng(1)
    m = rng.random((x.shape[1], n_columns), dtype=np.float32)
    m2 = rng.random((x.shape[0], n_columns), dtype=np.float32)
    x @ m  # warm up
    return best_time(lambda: (x @ m, x.T @ m2), repeats)


def _sparse_job(queue, backend: str, shape, nnz: int, monte_carlo: bool, huge_pages: bool) -> None:
    # torch reads it at its first allocation, which is below (see pnmf.cli._huge_pages).
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    x = sparse_counts(*shape, nnz)
    name = f"{backend}, huge pages" if huge_pages else backend
    result = {"backend": name, "n_rows": shape[0], "n_cols": shape[1], "nnz": int(x.nnz)}
    result["scipy_pair_s"] = _scipy_pair_seconds(x, SPARSE_COMPONENTS)
    result["lower-bound_s_per_iter"] = seconds_per_iteration(x, backend, "lower-bound", SPARSE_COMPONENTS)
    if monte_carlo:
        # Standard steps: natural ones would spend these few iterations in the lower-bound warm start.
        # More iterations and repeats than above: every fit ends with a 64-sample pass for the
        # reported ELBO, whose timing noise must not swamp the difference.
        one, five = (
            seconds_per_iteration(
                x, backend, "expanded", SPARSE_COMPONENTS, E=e, training="standard", iterations=(2, 12), repeats=3
            )
            for e in (1, 5)
        )
        result["expanded_s_per_iter_E1"] = one
        result["expanded_s_per_sample"] = (five - one) / 4
    result["peak_rss_gb"] = peak_rss_gb()
    queue.put(result)


def sparse_run(backend: str, shape, nnz: int, monte_carlo: bool = False, huge_pages: bool = False) -> dict:
    """One sparse measurement in a fresh process (its peak memory is then its own); with
    ``huge_pages``, torch's large buffers on transparent huge pages (``THP_MEM_ALLOC_ENABLE``)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_sparse_job, args=(queue, backend, shape, nnz, monte_carlo, huge_pages))
    process.start()
    result = queue.get()
    process.join()
    return result


def digits_run(backend: str) -> dict:
    """Converged fits of the digits, pnmf (natural, lower-bound) against scikit-learn's KL-NMF."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import NMF

    x = load_digits().data
    train, test = thin(x, 0.5, random_state=0)
    ours = PNMF(10, mode="lower-bound", training_mode="natural", prior_scale=1.0, backend=backend, random_state=0)
    ours.fit(x[:50])  # warm up
    theirs = NMF(10, beta_loss="kullback-leibler", solver="mu", max_iter=2000, random_state=0)
    ours_s = best_time(lambda: ours.fit(x))
    theirs_s = best_time(lambda: theirs.fit(x))
    half = PNMF(10, mode="lower-bound", training_mode="natural", prior_scale=1.0, backend=backend, random_state=0)
    half.fit(train)
    nmf_half = NMF(10, beta_loss="kullback-leibler", solver="mu", max_iter=2000, random_state=0)
    nmf_rate = nmf_half.fit_transform(train) @ nmf_half.components_
    return {
        "backend": backend,
        "pnmf_s": ours_s,
        "pnmf_iter": ours.n_iter_,
        "pnmf_converged": ours.converged_,
        "sklearn_s": theirs_s,
        "sklearn_iter": theirs.n_iter_,
        "time_ratio": ours_s / theirs_s,
        "pnmf_heldout_deviance": poisson_deviance(test, np.exp(half.mean_ + half.var_ / 2) @ half.components_),
        "sklearn_heldout_deviance": poisson_deviance(test, nmf_rate),
    }


PEER_SCRIPT = """
import json, sys, time
import numpy as np
from PNMF import PNMF
x = np.load(sys.argv[1])
PNMF(n_components=5, random_state=42).fit_transform(x)  # warm up
best = None
for _ in range(3):
    start = time.perf_counter()
    model = PNMF(n_components=5, random_state=42)
    model.fit_transform(x)
    seconds = time.perf_counter() - start
    best = seconds if best is None else min(best, seconds)
print(json.dumps({"wall_s": best, "n_iter": int(getattr(model, "n_iter_", 0))}))
"""
PEER_ROUNDS = 3


def peer_run(peer_python: str, backends: list[str]) -> dict:
    """Seconds per iteration of PyPI ``pnmf`` (in ``peer_python``) and of ours, on the seed data.

    Rounds alternate between the two, each the best of three fits, and each side keeps its
    best round, so that a busy spell on the machine does not fall on one side only.
    """
    import subprocess
    import tempfile

    from .. import make_counts

    x, _, _ = make_counts(200, 100, 5, random_state=42)
    folder = tempfile.TemporaryDirectory()
    data = Path(folder.name) / "seed_counts.npy"
    np.save(data, x)
    peer_s, n_iter, ours = [], 0, {}
    try:
        for _ in range(PEER_ROUNDS):
            answer = subprocess.run(
                [peer_python, "-c", PEER_SCRIPT, str(data)], capture_output=True, text=True, check=True, timeout=3600
            )
            peer = json.loads(answer.stdout.strip().splitlines()[-1])
            n_iter = peer["n_iter"]
            peer_s.append(peer["wall_s"] / max(n_iter, 1))
            for backend in backends:
                for training in ("standard", "natural"):
                    params = dict(
                        mode="expanded", training_mode=training, backend=backend, E=10, tol=0, prior_scale=1.0
                    )
                    PNMF(5, max_iter=20, random_state=42, **params).fit(x)  # warm up
                    seconds = best_time(lambda p=params: PNMF(5, max_iter=PEER_ITERATIONS, random_state=42, **p).fit(x))
                    key = (backend, training)
                    ours[key] = min(ours.get(key, np.inf), seconds / PEER_ITERATIONS)
    finally:
        folder.cleanup()
    result = {"peer_s_per_iter": min(peer_s), "peer_n_iter": n_iter, "rounds": PEER_ROUNDS, "ours": []}
    for (backend, training), seconds in ours.items():
        result["ours"].append(
            {
                "backend": backend,
                "training": training,
                "s_per_iter": seconds,
                "ratio_to_peer": seconds / result["peer_s_per_iter"],
            }
        )
    return result


def plot_scaling(rows: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for backend in sorted({r["backend"] for r in rows}):
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["nnz"])
        ax.loglog([r["nnz"] for r in mine], [r["lower-bound_s_per_iter"] for r in mine], marker="o", label=backend)
    nnz = np.array(sorted({r["nnz"] for r in rows}), dtype=float)
    scipy = [np.mean([r["scipy_pair_s"] for r in rows if r["nnz"] == n]) for n in nnz]
    ax.loglog(nnz, scipy, color="grey", ls="--", label="two SciPy products (mean over runs)")
    ax.loglog(nnz, scipy[-1] * nnz / nnz[-1], color="lightgrey", lw=0.8, label="linear in nnz")
    ax.set_xlabel("non-zeros")
    ax.set_ylabel("seconds per iteration (lower-bound, natural)")
    ax.set_title(f"{SPARSE_COMPONENTS} components, 50,000 rows")
    ax.legend(fontsize=8)
    path = out / "speed_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(backends: list[str], out: Path, quick: bool = False, peer_python: str | None = None) -> dict:
    from .natural_gradient import machine

    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "digits": [], "sparse": [], "scaling": []}
    if peer_python:
        print("seed setting against PyPI pnmf 0.1.0 ...", flush=True)
        record["peer"] = peer_run(peer_python, backends)
    for backend in backends:
        print(f"[{backend}] digits ...", flush=True)
        record["digits"].append(digits_run(backend))
        if quick:
            continue
        print(f"[{backend}] sparse 50,000 x 10,000 at 1% ...", flush=True)
        nnz = int(SPARSE_SHAPE[0] * SPARSE_SHAPE[1] * SPARSE_DENSITY)
        record["sparse"].append(sparse_run(backend, SPARSE_SHAPE, nnz, monte_carlo=True))
        if backend == "torch" and sys.platform == "linux":  # the command line's setting for fits in memory
            print("[torch] the same on huge pages ...", flush=True)
            record["sparse"].append(sparse_run(backend, SPARSE_SHAPE, nnz, monte_carlo=True, huge_pages=True))
        for target in SCALING_NNZ:
            print(f"[{backend}] scaling, nnz {target:.0e} ...", flush=True)
            n_rows = 50_000
            record["scaling"].append(sparse_run(backend, (n_rows, max(1000, int(target / 500))), int(target)))
    (out / "speed.json").write_text(json.dumps(record, indent=1))
    if record["scaling"]:
        plot_scaling(record["scaling"], out)
    return record


def report(record: dict) -> str:
    from .natural_gradient import _grid

    lines = []
    if record.get("peer"):
        peer = record["peer"]
        lines.append(
            f"Seed setting, expanded, E=10: PyPI pnmf 0.1.0 {1e3 * peer['peer_s_per_iter']:.3f} ms/iteration "
            f"({peer['peer_n_iter']} iterations, its defaults)"
        )
        lines.append(
            _grid(
                ("backend", "training", "ms / iteration", "ratio to PyPI pnmf"),
                [
                    (o["backend"], o["training"], f"{1e3 * o['s_per_iter']:.3f}", f"{o['ratio_to_peer']:.2f}")
                    for o in peer["ours"]
                ],
            )
        )
        lines.append("")
    lines.append("Digits (1797 x 64, 10 components), converged fits:")
    lines.append(
        _grid(
            ("backend", "pnmf s", "iters", "sklearn NMF s", "iters", "time ratio", "held-out dev. pnmf", "sklearn"),
            [
                (
                    d["backend"],
                    f"{d['pnmf_s']:.3f}",
                    d["pnmf_iter"],
                    f"{d['sklearn_s']:.3f}",
                    d["sklearn_iter"],
                    f"{d['time_ratio']:.2f}",
                    f"{d['pnmf_heldout_deviance']:.0f}",
                    f"{d['sklearn_heldout_deviance']:.0f}",
                )
                for d in record["digits"]
            ],
        )
    )
    if record["sparse"]:
        lines.append("\nSparse 50,000 x 10,000 at 1%, 20 components (seconds per iteration):")
        lines.append(
            _grid(
                (
                    "backend",
                    "nnz",
                    "lower-bound",
                    "two SciPy products",
                    "ratio",
                    "expanded E=1",
                    "per extra sample",
                    "peak GB",
                ),
                [
                    (
                        s["backend"],
                        s["nnz"],
                        f"{s['lower-bound_s_per_iter']:.3f}",
                        f"{s['scipy_pair_s']:.3f}",
                        f"{s['lower-bound_s_per_iter'] / s['scipy_pair_s']:.1f}",
                        f"{s['expanded_s_per_iter_E1']:.3f}",
                        f"{s['expanded_s_per_sample']:.3f}",
                        f"{s['peak_rss_gb']:.2f}",
                    )
                    for s in record["sparse"]
                ],
            )
        )
    if record["scaling"]:
        lines.append("\nTime per iteration against nnz (lower-bound, natural):")
        lines.append(
            _grid(
                ("backend", "shape", "nnz", "s / iter", "two SciPy products", "peak GB"),
                [
                    (
                        s["backend"],
                        f"{s['n_rows']} x {s['n_cols']}",
                        s["nnz"],
                        f"{s['lower-bound_s_per_iter']:.3f}",
                        f"{s['scipy_pair_s']:.3f}",
                        f"{s['peak_rss_gb']:.2f}",
                    )
                    for s in record["scaling"]
                ],
            )
        )
    return "\n".join(lines)
