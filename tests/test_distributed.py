"""Data-parallel fits: gloo (and MLX ring) processes spawned from the test, against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pnmf import PNMF, make_counts
from pnmf.distributed import reduce_device

from .conftest import free_port
from .distributed_worker import batch_labels

pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("distributed_worker.py")
DATA = dict(data=[120, 40, 4], data_seed=3)
F64 = dict(n_components=4, dtype="float64", backend="numpy", random_state=0)


def launch(tmp_path: Path, bounds: list[int], fits: list[dict], timeout: float = 120, only_rank_0=False, **job) -> list:
    """Run the worker on len(bounds) - 1 ranks; return each rank's (return code, stderr).

    ``only_rank_0``: wait for rank 0 alone, then kill the others.
    """
    world = len(bounds) - 1
    # A fresh rendezvous file each launch: one left by an earlier launch would hang this one.
    rendezvous = f"file://{tmp_path / f'rendezvous-{time.monotonic_ns()}'}"
    job = dict(DATA, bounds=bounds, fits=fits, rendezvous=rendezvous, **job)
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world), str(tmp_path / "job.json"), str(tmp_path)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world)
    ]
    results = []
    for process in processes[:1] if only_rank_0 else processes:
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"a distributed test fit hung past {timeout} s")
        results.append((process.returncode, err))
    for process in processes:
        process.kill()
        process.wait()
    return results


def load(tmp_path: Path, index: int, world: int) -> list[dict]:
    return [dict(np.load(tmp_path / f"{index}.rank-{rank}.npz")) for rank in range(world)]


def single(params: dict, sparse: bool = False, batches: bool = False) -> PNMF:
    x, _, _ = make_counts(*DATA["data"], random_state=DATA["data_seed"])
    import scipy.sparse as sp

    batch = batch_labels(0, len(x)) if batches else None
    return PNMF(**params).fit(sp.csr_matrix(x) if sparse else x, batch=batch)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between matching columns."""
    return float(np.min((a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)))


EXACT = [
    dict(params=dict(F64, mode="lower-bound", training_mode="natural", tol=1e-5, max_iter=400)),
    dict(params=dict(F64, mode="lower-bound", training_mode="standard", tol=0, max_iter=150, learning_rate=0.05)),
    dict(params=dict(F64, mode="lower-bound", training_mode="natural", tol=1e-5, max_iter=400), sparse=True),
    dict(params=dict(F64, mode="lower-bound", training_mode="natural", loadings_update="adam", tol=0, max_iter=100)),
    dict(  # size factors from the totals of every rank's rows; batches split across ranks
        params=dict(
            F64,
            mode="lower-bound",
            training_mode="natural",
            tol=1e-5,
            max_iter=400,
            size_factors="total",
            prior_scale="auto",
        ),
        batches=True,
    ),
]
MONTE_CARLO = [
    dict(params=dict(F64, mode="expanded", training_mode="natural", tol=0, max_iter=300)),
    dict(params=dict(F64, mode="simple", training_mode="standard", tol=0, max_iter=600, learning_rate=0.05)),
    dict(params=dict(F64, mode="expanded", training_mode="standard", tol=0, max_iter=600), sparse=True),
]


@pytest.mark.parametrize("bounds", [[0, 60, 120], [0, 1, 70, 120]], ids=["2 even", "3 uneven, one row"])
def test_fit_over_processes_is_the_single_process_fit(tmp_path, bounds):
    world = len(bounds) - 1
    no_reduce = dict(EXACT[0], no_reduce=True)
    # The same .h5ad opened backed by every rank, each fitting its own even share of rows.
    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp

    x = make_counts(*DATA["data"], random_state=DATA["data_seed"])[0]
    anndata.AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "x.h5ad")
    backed = dict(EXACT[2], h5ad=str(tmp_path / "x.h5ad"))
    codes = launch(tmp_path, bounds, [*EXACT, *MONTE_CARLO, backed, no_reduce])  # no_reduce stays last
    assert all(code == 0 for code, _ in codes), [err[-2000:] for _, err in codes]

    for index, fit in enumerate(EXACT):
        ranks = load(tmp_path, index, world)
        reference = single(fit["params"], fit.get("sparse", False), fit.get("batches", False))
        for r in ranks:  # global results, the same on every rank, bitwise for the loadings
            assert np.array_equal(r["loadings"], ranks[0]["loadings"])
            assert np.array_equal(r["history"], ranks[0]["history"])
            assert int(r["n_iter"]) == reference.n_iter_
        np.testing.assert_allclose(ranks[0]["loadings"], reference.loadings_, rtol=1e-8)
        np.testing.assert_allclose(np.vstack([r["mean"] for r in ranks]), reference.mean_, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(ranks[0]["elbo"], reference.elbo_, rtol=1e-10)
        if fit.get("batches"):
            np.testing.assert_allclose(ranks[0]["batch_effects"], reference.batch_effects_, rtol=1e-8)
            for r in ranks:  # every rank knows every label whole, whichever it holds itself
                np.testing.assert_array_equal(r["batches"], reference.batches_)
            np.testing.assert_allclose(ranks[0]["prior_scale"], reference.prior_scale_, rtol=1e-8)
            assert np.ptp(reference.prior_scale_) > 0.01  # fitted per component, not left at 1
        # transform works on each rank's rows; its stopping rule reads their own ELBO, so a
        # block of rows stops at another iteration than all rows together.
        x = make_counts(*DATA["data"], random_state=DATA["data_seed"])[0]
        local_factors = np.vstack([r["transform"] for r in ranks])
        batch = batch_labels(0, len(x)) if fit.get("batches") else None
        np.testing.assert_allclose(local_factors, reference.transform(x, batch=batch), rtol=1e-5)

    for index, fit in enumerate(MONTE_CARLO, start=len(EXACT)):
        ranks = load(tmp_path, index, world)
        reference = single(fit["params"], fit.get("sparse", False))
        assert all(np.array_equal(r["loadings"], ranks[0]["loadings"]) for r in ranks)
        assert float(ranks[0]["elbo"]) == pytest.approx(reference.elbo_, rel=1e-3)
        assert cosine(ranks[0]["loadings"], reference.loadings_) >= 0.99

    # Without the all-reduce each rank fits its own rows: the same test fails.
    ranks = load(tmp_path, len(EXACT) + len(MONTE_CARLO) + 1, world)
    reference = single(EXACT[0]["params"])
    assert not np.allclose(ranks[0]["loadings"], reference.loadings_, rtol=1e-3)

    # fit_anndata on a backed file: each rank's even share, the single-process fit's loadings.
    ranks = load(tmp_path, len(EXACT) + len(MONTE_CARLO), world)
    reference = single(EXACT[2]["params"], sparse=True)
    np.testing.assert_allclose(ranks[0]["loadings"], reference.loadings_, rtol=1e-8)
    np.testing.assert_allclose(np.vstack([r["mean"] for r in ranks]), reference.mean_, rtol=1e-8, atol=1e-12)


def test_every_rank_stops_at_the_same_iteration(tmp_path):
    # Monte Carlo noise differs between ranks; the stopping rule reads only the reduced ELBO.
    params = dict(F64, mode="expanded", training_mode="standard", tol=1e-3, max_iter=3000, learning_rate=0.05)
    codes = launch(tmp_path, [0, 50, 120], [dict(params=params)])
    assert all(code == 0 for code, _ in codes), [err[-2000:] for _, err in codes]
    ranks = load(tmp_path, 0, 2)
    assert bool(ranks[0]["converged"]) and int(ranks[0]["n_iter"]) < 3000
    assert {int(r["n_iter"]) for r in ranks} == {int(ranks[0]["n_iter"])}


def test_a_fit_that_stops_at_max_iter_warns_once_from_rank_0(tmp_path):
    # Every rank stops alike, so each printed the same warning: torchrun showed it once per process.
    codes = launch(tmp_path, [0, 50, 120], [dict(params=dict(F64, max_iter=3, tol=1e-4))])
    assert all(code == 0 for code, _ in codes), [err[-2000:] for _, err in codes]
    assert [err.count("stopped at max_iter=3") for _, err in codes] == [1, 0]
    assert [bool(r["converged"]) for r in load(tmp_path, 0, 2)] == [False, False]


def test_without_a_seed_every_rank_fits_the_same_loadings(tmp_path):
    # random_state=None draws from each process's own global state: rank 0's draw is shared.
    params = dict(F64, random_state=None, mode="lower-bound", training_mode="natural", tol=0, max_iter=30)
    codes = launch(tmp_path, [0, 60, 120], [dict(params=params)] * 2)
    assert all(code == 0 for code, _ in codes), [err[-2000:] for _, err in codes]
    first, second = load(tmp_path, 0, 2), load(tmp_path, 1, 2)
    np.testing.assert_array_equal(first[0]["loadings"], first[1]["loadings"])
    np.testing.assert_array_equal(first[0]["history"], first[1]["history"])
    assert not np.allclose(first[0]["loadings"], second[0]["loadings"])  # not a fixed seed


def test_a_distributed_fit_resumes_from_the_last_iteration_every_rank_holds(tmp_path):
    """The ranks rename their checkpoints only once every rank has written its state: a rank
    killed between that and its rename has its newer state in its temporary file."""
    path = tmp_path / "fit.npz"
    params = dict(F64, mode="lower-bound", training_mode="natural", tol=0, checkpoint=str(path), checkpoint_every=10)

    def run(max_iter: int) -> list:
        return launch(tmp_path, [0, 60, 120], [dict(params=dict(params, max_iter=max_iter))])

    assert all(code == 0 for code, _ in run(20))
    rank_0, rank_1 = (tmp_path / f"fit.rank-{r}-of-2.npz" for r in range(2))
    rank_1_at_20 = rank_1.read_bytes()
    assert all(code == 0 for code, _ in run(30))
    rank_1_at_30 = rank_1.read_bytes()
    rank_1.write_bytes(rank_1_at_20)  # rank 1 killed before renaming its state at 30 ...
    (tmp_path / "fit.rank-0-of-2.npz.partial").write_bytes(b"half of a later state")  # ... rank 0 while writing
    codes = run(40)  # rank 0 holds 30 alone, rank 1 20 alone: refused on both
    assert all(
        code != 0 and "hold no iteration in common (iterations held by rank 0: 30; rank 1: 20)" in err
        for code, err in codes
    ), [err[-2000:] for _, err in codes]
    (tmp_path / "fit.rank-1-of-2.npz.partial").write_bytes(rank_1_at_30)
    codes = run(40)  # 30 is on every rank now, renamed or not
    assert all(code == 0 for code, _ in codes), [err[-2000:] for _, err in codes]
    ranks = load(tmp_path, 0, 2)
    reference = single(dict(F64, mode="lower-bound", training_mode="natural", tol=0, max_iter=40))
    np.testing.assert_allclose(ranks[0]["loadings"], reference.loadings_, rtol=1e-8)
    np.testing.assert_allclose(np.vstack([r["mean"] for r in ranks]), reference.mean_, rtol=1e-8, atol=1e-12)
    assert len(ranks[1]["history"]) == 40 and not rank_0.with_name(rank_0.name + ".partial").exists()


def test_shards_with_different_features_raise_on_every_rank_before_any_step(tmp_path):
    params = dict(F64, mode="lower-bound", training_mode="natural")
    codes = launch(tmp_path, [0, 60, 120], [dict(params=params)], drop_column=[1])
    for code, err in codes:
        assert code != 0
        assert "ValueError" in err and "different numbers of features" in err
    assert not list(tmp_path.glob("*.npz"))


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_failed_rank_stops_the_others_with_a_clear_error(tmp_path, fault):
    timeout = 4.0
    params = dict(F64, mode="lower-bound", training_mode="natural", distributed_timeout=timeout)
    fits = [dict(params=params), dict(params=params, **{fault: 1})]
    started = time.monotonic()
    processes_done = launch(tmp_path, [0, 60, 120], fits, timeout=60, only_rank_0=fault == "hang")
    code, err = processes_done[0]
    assert code != 0
    assert "CollectiveError" in err and "all-reduce failed" in err
    assert (tmp_path / "0.rank-0.npz").exists() and not (tmp_path / "1.rank-0.npz").exists()
    if fault == "die":
        assert processes_done[1][0] == 3
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("n_rows, size", [(10, 3), (2, 2), (1001, 4), (7, 7)])
def test_shards_split_the_rows_evenly_in_rank_order(n_rows, size):
    from types import SimpleNamespace

    from pnmf.distributed import shard

    blocks = [shard(n_rows, SimpleNamespace(rank=r, size=size)) for r in range(size)]
    assert blocks[0].start == 0 and blocks[-1].stop == n_rows
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    lengths = [b.stop - b.start for b in blocks]
    assert max(lengths) - min(lengths) <= 1 and sorted(lengths, reverse=True) == lengths


@pytest.mark.parametrize(
    "engine, device, current, where",
    [
        ("gloo", "cuda:1", 0, "cpu"),  # gloo reduces on the host, wherever the fit runs
        ("nccl", "cuda:3", 0, "cuda:3"),  # the fit's own GPU, not the current one
        ("nccl", "cuda", 2, "cuda:2"),  # no index: the current GPU, as torch.device('cuda') is
        ("nccl", "cpu", 1, "cuda:1"),  # a fit on the CPU in an NCCL group: the current GPU
        ("nccl", None, 0, "cuda:0"),
    ],
)
def test_the_buffer_is_reduced_where_the_engine_reduces(engine, device, current, where):
    assert reduce_device(engine, device, current) == where


def test_two_processes_on_one_gpu_are_told_to_take_one_each(tmp_path, monkeypatch):
    """NCCL refuses two processes on one GPU ("Duplicate GPU detected"): the error says how
    to give each its own, not that another process died."""
    import torch.distributed as dist

    from pnmf.distributed import CollectiveError, TorchGroup

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        group = TorchGroup(timeout=None)
        nccl = "ncclInvalidUsage: ... Last error: Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000"
        monkeypatch.setattr(group.dist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(nccl)))
        with pytest.raises(CollectiveError, match=r"one GPU a process.*device=f\"cuda:\{local_rank\}\"") as caught:
            group.all_sum_host(np.ones(3))
        assert "died" not in str(caught.value)
        monkeypatch.setattr(group.dist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("closed")))
        with pytest.raises(CollectiveError, match="another process of the fit probably died"):
            group.all_sum_host(np.ones(3))
    finally:
        dist.destroy_process_group()


def test_distributed_without_a_group_says_how_to_launch():
    x, _, _ = make_counts(20, 10, 2, random_state=0)
    with pytest.raises(ValueError, match="torchrun"):
        PNMF(2, distributed=True, backend="numpy").fit(x)


def test_distributed_rejects_svd_init():
    x, _, _ = make_counts(20, 10, 2, random_state=0)
    with pytest.raises(ValueError, match="init='nndsvda' needs every row"):
        PNMF(2, distributed=True, init="nndsvda").fit(x)


def test_a_distributed_mini_batch_fit_is_the_single_process_mini_batch_fit(tmp_path):
    """Each process draws its share of every batch from its own rows (in memory, or read
    from the same backed .h5ad); one all-reduce a step sums the batches' statistics."""
    anndata = pytest.importorskip("anndata")
    import scipy.sparse as sp

    data = dict(data=[1200, 40, 4], data_seed=3)
    x = make_counts(*data["data"], random_state=data["data_seed"])[0]
    anndata.AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "x.h5ad")
    params = dict(F64, mode="lower-bound", training_mode="natural", batch_size=120, tol=0, max_iter=150)
    fits = [
        dict(params=params),
        dict(params=dict(params, size_factors="total"), sparse=True),
        dict(params=dict(params, prior_scale="auto")),
        dict(params=params, h5ad=str(tmp_path / "x.h5ad")),
        # tol > 0: the stopping rule reads one fixed batch's ELBO, that batch drawn by every
        # process from its own rows and its ELBO summed: every rank stops at the same step.
        dict(params=dict(params, tol=1e-3, max_iter=1000)),
    ]
    codes = launch(tmp_path, [0, 1, 500, 1200], fits, **data)  # a rank with one row
    for code, err in codes:
        assert code == 0, err[-2000:]
    for index, fit in enumerate(fits):
        ranks = load(tmp_path, index, 3)
        reference = PNMF(**fit["params"]).fit(x)
        steps = 150 if fit["params"]["tol"] == 0 else int(ranks[0]["n_iter"])
        assert 150 <= steps < 1000 and all(bool(r["converged"]) for r in ranks) == (fit["params"]["tol"] > 0)
        for r in ranks:  # the same loadings and history on every rank, bitwise
            assert np.array_equal(r["loadings"], ranks[0]["loadings"])
            assert np.array_equal(r["history"], ranks[0]["history"]) and int(r["n_iter"]) == steps
        assert sum(len(r["mean"]) for r in ranks) == 1200
        assert float(ranks[0]["elbo"]) == pytest.approx(reference.elbo_, rel=1e-3)
        assert cosine(ranks[0]["loadings"], reference.loadings_) >= 0.99


def test_a_distributed_mini_batch_fit_with_batch_effects_is_the_single_process_fit(tmp_path):
    """Counts with size factors and batch effects (row n in batch n mod 3, a rank holding one
    row): the all-reduce also sums each batch's counts and rows in the step, so g is the
    same on every rank, and the fit the single-process mini-batch fit up to the batches' noise."""
    from pnmf.data import make_batched_counts

    planted = make_batched_counts(1200, 40, 4, n_batches=3, random_state=3)
    params = dict(F64, mode="lower-bound", training_mode="natural", batch_size=120, tol=0, max_iter=150)
    params.update(size_factors="total")
    fits = [dict(params=params, batches=True), dict(params=dict(params, prior_scale="auto"), batches=True)]
    codes = launch(tmp_path, [0, 1, 500, 1200], fits, data=[1200, 40, 4], data_seed=3, batched=True)
    for code, err in codes:
        assert code == 0, err[-2000:]
    for index, fit in enumerate(fits):
        ranks = load(tmp_path, index, 3)
        reference = PNMF(**fit["params"]).fit(planted["X"], batch=batch_labels(0, 1200))
        for r in ranks:  # the same loadings, batch effects and history on every rank, bitwise
            assert np.array_equal(r["loadings"], ranks[0]["loadings"])
            assert np.array_equal(r["batch_effects"], ranks[0]["batch_effects"])
            assert np.array_equal(r["history"], ranks[0]["history"]) and int(r["n_iter"]) == 150
        assert float(ranks[0]["elbo"]) == pytest.approx(reference.elbo_, rel=1e-3)
        assert cosine(ranks[0]["loadings"], reference.loadings_) >= 0.99
        g, g_reference = np.log(ranks[0]["batch_effects"]), np.log(reference.batch_effects_)
        assert np.corrcoef(g.ravel(), g_reference.ravel())[0, 1] >= 0.97  # 0.9996 measured (0.989 unaveraged)
        planted_g = np.log(planted["batch_effects"]).ravel()  # and as near the planted g
        assert np.corrcoef(g.ravel(), planted_g)[0, 1] >= np.corrcoef(g_reference.ravel(), planted_g)[0, 1] - 0.02


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed (pip install mlx)")
def test_mlx_ring_fit_over_two_processes_is_the_single_process_fit(tmp_path):
    pytest.importorskip("mlx.core")
    port = free_port()
    params = dict(
        n_components=4,
        backend="mlx",
        device="cpu",
        mode="lower-bound",
        training_mode="natural",
        random_state=0,
        tol=1e-5,
        max_iter=400,
    )
    job = dict(DATA, bounds=[0, 60, 120], fits=[dict(params=params)], engine="mlx")
    (tmp_path / "job.json").write_text(json.dumps(job))
    # mlx.launch passes no rank argument: the worker reads it from the group.
    script = tmp_path / "mlx_worker.py"
    script.write_text(
        "import sys, mlx.core as mx\n"
        "group = mx.distributed.init(strict=True, backend='ring')\n"
        f"sys.argv = ['w', str(group.rank()), str(group.size()), {str(tmp_path / 'job.json')!r}, {str(tmp_path)!r}]\n"
        f"sys.path.insert(0, {str(WORKER.parent)!r})\n"
        "import distributed_worker\n"
        "distributed_worker.main()\n"
    )
    done = subprocess.run(
        ["mlx.launch", "-n", "2", "--backend", "ring", "--starting-port", str(port), "--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    # mlx.launch exits 0 even when a rank fails: the results must be there.
    assert done.returncode == 0 and (tmp_path / "0.rank-1.npz").exists(), done.stderr[-3000:]
    ranks = load(tmp_path, 0, 2)
    reference = single(params)
    assert np.array_equal(ranks[0]["loadings"], ranks[1]["loadings"])
    # float32 on MLX: the reduction order differs from the single process's sums.
    np.testing.assert_allclose(ranks[0]["loadings"], reference.loadings_, rtol=2e-3, atol=1e-6)
    assert float(ranks[0]["elbo"]) == pytest.approx(reference.elbo_, rel=1e-4)
