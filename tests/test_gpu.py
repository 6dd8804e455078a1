"""The GPU paths (``pytest -m gpu``): torch on CUDA and MLX on its GPU (Metal, or CUDA with
``mlx[cuda13]``) against the float64 NumPy reference on the CPU. Without a GPU every test
here skips, saying why."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from pnmf import PNMF, backends, make_counts
from pnmf.backends import get_backend
from pnmf.elbo import as_counts, evaluate

from .conftest import as_numpy, evaluate_on, lower_bound_at, small_problem, sparse_products_problem

pytestmark = pytest.mark.gpu


def gpu_devices() -> list[tuple[str, str]]:
    """(backend, device) of every GPU a framework here can use.

    PNMF_GPU_TEST_DEVICES="torch:cpu,mlx:cpu" runs these tests on the devices named
    instead, to check the tests themselves where there is no GPU.
    """
    override = os.environ.get("PNMF_GPU_TEST_DEVICES")
    if override:
        return [tuple(item.split(":", 1)) for item in override.split(",")]
    return backends.gpu_devices()


DEVICES = gpu_devices()
NO_GPU = "no GPU here: torch sees no CUDA or MPS device and MLX no GPU (pip install 'mlx[cuda13]' on NVIDIA)"


@pytest.fixture(params=DEVICES or [pytest.param(None, marks=pytest.mark.skip(reason=NO_GPU))], ids=str)
def gpu(request):
    """A float32 backend on a GPU."""
    name, device = request.param
    return get_backend(name, device=device, dtype="float32")


MODES = ["simple", "expanded", "lower-bound"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_elbo_and_gradients_match_the_float64_cpu_reference(gpu, mode, sparse):
    x, mu, var, w, eps = small_problem(seed=3, n=40, d=25, n_components=4, n_samples=6)
    data = sp.csr_matrix(x) if sparse else x
    noise = eps if mode != "lower-bound" else None
    reference = as_numpy(cpu := get_backend("numpy", dtype="float64"), evaluate_on(cpu, data, mu, var, w, mode, noise))
    on_gpu = as_numpy(gpu, evaluate_on(gpu, data, mu, var, w, mode, noise))
    assert float(on_gpu[0]) == pytest.approx(float(reference[0]), rel=1e-5)
    for got, want in zip(on_gpu[1:], reference[1:]):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("training", ["natural", "standard"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_gpu_fit_is_the_cpu_fit(gpu, training, mode, sparse, tmp_path):
    x, _, _ = make_counts(200, 100, 5, random_state=42)
    data = sp.csr_matrix(x) if sparse else x
    params = dict(mode=mode, training_mode=training, random_state=0, max_iter=300 if training == "natural" else 2000)
    cpu = PNMF(5, backend="numpy", dtype="float64", **params).fit(data)
    model = PNMF(5, backend=gpu.name, device=gpu.device, **params).fit(data)
    assert model.backend_ == gpu.name and model.device_ == gpu.device
    assert model.elbo_ == pytest.approx(cpu.elbo_, rel=2e-3)
    on_cpu = PNMF.load(model.save(tmp_path / "model.npz"), backend="numpy")
    factors = on_cpu.transform(data)
    np.testing.assert_allclose(model.transform(data), factors, rtol=5e-3, atol=1e-3 * factors.max())


def test_checked_natural_steps_do_not_stall_on_the_device(gpu):
    """Float32 sums on the device must not stop checked lower-bound steps early."""
    x, _, _ = make_counts(200, 100, 5, random_state=42)
    params = dict(mode="lower-bound", training_mode="natural", tol=1e-6, max_iter=3000, random_state=42)
    reference = PNMF(5, backend="numpy", dtype="float64", **params).fit(x)
    model = PNMF(5, backend=gpu.name, device=gpu.device, **params).fit(x)
    assert model.converged_
    assert lower_bound_at(x, model) >= reference.elbo_ - 1e-4 * abs(reference.elbo_)


def test_saved_on_the_gpu_loads_on_the_cpu_and_back(gpu, tmp_path):
    x, _, _ = make_counts(100, 40, 3, random_state=1)
    model = PNMF(3, backend=gpu.name, device=gpu.device, mode="lower-bound", training_mode="natural").fit(x)
    path = model.save(tmp_path / "model.npz")
    on_cpu = PNMF.load(path, backend="numpy")
    back = PNMF.load(path, backend=gpu.name, device=gpu.device)
    np.testing.assert_array_equal(on_cpu.loadings_, model.loadings_)
    np.testing.assert_array_equal(back.loadings_, model.loadings_)
    assert back.device_ == gpu.device
    factors = on_cpu.transform(x)
    np.testing.assert_allclose(back.transform(x), factors, rtol=1e-3, atol=1e-3 * factors.max())


def test_auto_picks_a_gpu():
    if not DEVICES or os.environ.get("PNMF_GPU_TEST_DEVICES"):
        pytest.skip(NO_GPU if not DEVICES else "the devices were named by PNMF_GPU_TEST_DEVICES")
    chosen = get_backend("auto")
    assert (chosen.name, chosen.device.split(":")[0]) in DEVICES or chosen.device.startswith("cuda")


@pytest.mark.parametrize("training", ["natural", "standard"])
@pytest.mark.parametrize("mode", MODES)
def test_a_step_replayed_from_a_cuda_graph_fits_as_the_eager_step(gpu, training, mode, monkeypatch):
    if gpu.name != "torch" or not gpu.device.startswith("cuda"):
        pytest.skip("CUDA graphs are torch's on CUDA")
    from pnmf.backends import torch as torch_backend

    x, _, _ = make_counts(200, 100, 5, random_state=42)
    params = dict(mode=mode, training_mode=training, backend="torch", device=gpu.device, random_state=0, tol=0)
    monkeypatch.setattr(torch_backend, "CUDA_GRAPHS", False)
    eager = PNMF(5, max_iter=300, **params).fit(x)
    monkeypatch.setattr(torch_backend, "CUDA_GRAPHS", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a step that could not be captured fails here
        graphed = PNMF(5, max_iter=300, **params).fit(x)
    # The same kernels on the same random numbers: the two histories agree to float32 rounding.
    np.testing.assert_allclose(graphed.elbo_history_, eager.elbo_history_, rtol=1e-4)
    np.testing.assert_allclose(graphed.loadings_, eager.loadings_, rtol=1e-2, atol=1e-3 * eager.loadings_.max())


def test_restarts_fitted_together_on_the_gpu_are_the_fits_one_by_one(gpu, monkeypatch):
    from pnmf import restarts

    x, _, _ = make_counts(200, 100, 5, random_state=42)
    model = PNMF(5, backend=gpu.name, device=gpu.device)
    assert restarts.lanes_per_step(model, x, gpu) >= 10  # the seed data's 10 restarts share a step
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a step that could not be captured fails here
        together = model._fit_restarts(x, list(range(10)))
    monkeypatch.setattr(restarts, "MIN_LANES", 10**9)
    alone = model._fit_restarts(x, list(range(10)))
    for fit, reference in zip(together, alone):
        # float32 sums in another order: the same fit, though a checked step may flip near the end.
        np.testing.assert_allclose(fit.elbo_, reference.elbo_, rtol=1e-4)
        unit = [w / np.linalg.norm(w, axis=0) for w in (fit.loadings_, reference.loadings_)]
        assert (unit[0] * unit[1]).sum(axis=0).min() > 0.999


def test_mlx_sparse_kernels_on_cuda_compute_the_sparse_products(gpu):
    if gpu.name != "mlx" or not gpu._kernels:
        pytest.skip("the sparse kernels are MLX's on CUDA")
    x, a, b, rows = sparse_products_problem(3000, 700, 7, 0.02, empty_every=(11, 13))
    pattern, values = gpu.sparse(x), gpu.asarray(x.data)
    got = gpu.sampled_matmul(pattern, gpu.asarray(a), gpu.asarray(b))
    np.testing.assert_allclose(gpu.to_numpy(got), np.sum(a[rows] * b[x.indices], axis=1), rtol=1e-5)
    np.testing.assert_allclose(gpu.to_numpy(gpu.sparse_matmul(pattern, values, gpu.asarray(b))), x @ b, rtol=1e-5)
    np.testing.assert_allclose(gpu.to_numpy(gpu.sparse_matmul_t(pattern, values, gpu.asarray(a))), x.T @ a, rtol=1e-5)
    empty = gpu.sparse(sp.csr_matrix(x.shape))
    assert not gpu.to_numpy(gpu.sparse_matmul_t(empty, gpu.asarray(np.zeros(0)), gpu.asarray(a))).any()


@pytest.mark.parametrize("size", [20_000, 126_000, 1_000_003, 1 << 24, (1 << 24) + 5])
def test_a_full_float32_sum_on_the_device_is_float64_accurate_to_1e_6(gpu, size):
    """The ELBO's sums: a sequential float32 sum of 2e4 terms was off by ~2e-5 relative."""
    values = np.random.default_rng(size).lognormal(0.0, 2.0, size).astype(np.float32)
    total = float(gpu.to_numpy(gpu.sum(gpu.asarray(values))))
    assert total == pytest.approx(values.sum(dtype=np.float64), rel=1e-6)


def cuda_devices() -> list[str]:
    return [device for name, device in DEVICES if name == "torch" and device.startswith("cuda")]


def test_a_distributed_fit_on_cuda_is_the_single_process_fit(tmp_path):
    """Two processes on one GPU (a gloo group: NCCL takes one GPU a process) fit the rows
    of the single-process fit on that GPU; the buffer goes through the host."""
    if not cuda_devices():
        pytest.skip("needs torch on CUDA")
    from .test_distributed import launch, load, single

    device = cuda_devices()[0]
    params = dict(
        n_components=4, backend="torch", device=device, dtype="float64", random_state=0, tol=1e-5, max_iter=400
    )
    fits = [dict(params=dict(params, mode="lower-bound", training_mode="natural"), sparse=sparse) for sparse in (0, 1)]
    codes = launch(tmp_path, [0, 50, 120], fits, timeout=240)
    assert all(code == 0 for code, _ in codes), [err[-2000:] for _, err in codes]
    for index, fit in enumerate(fits):
        ranks = load(tmp_path, index, 2)
        reference = single(fit["params"], sparse=fit["sparse"])
        assert np.array_equal(ranks[0]["loadings"], ranks[1]["loadings"])
        assert int(ranks[0]["n_iter"]) == int(ranks[1]["n_iter"]) == reference.n_iter_
        np.testing.assert_allclose(ranks[0]["loadings"], reference.loadings_, rtol=1e-8)
        np.testing.assert_allclose(np.vstack([r["mean"] for r in ranks]), reference.mean_, rtol=1e-8, atol=1e-12)


def test_nccl_reduces_on_the_fits_own_gpu(tmp_path):
    """The all-reduce of an NCCL group runs on the fit's GPU, whichever is current (a
    group of one process: NCCL refuses two processes on one GPU)."""
    devices = cuda_devices()
    if not devices:
        pytest.skip("needs torch on CUDA")
    import torch
    import torch.distributed as dist

    from pnmf.distributed import TorchGroup

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        for device in {"cuda:0", f"cuda:{torch.cuda.device_count() - 1}"}:
            group = TorchGroup(timeout=30.0, device=device)
            assert group.device == device
            buffer = np.random.default_rng(0).normal(size=1001)
            np.testing.assert_array_equal(group.all_sum_host(buffer), buffer)  # a group of one: the sum is itself
            b = get_backend("torch", device=device, dtype="float32")
            summed = group.all_sum(b, b.asarray(buffer[:6].reshape(2, 3)), None, b.scalar(2.5))
            assert summed[1] is None and float(b.to_numpy(summed[2])) == 2.5
            np.testing.assert_allclose(b.to_numpy(summed[0]), buffer[:6].reshape(2, 3), rtol=1e-7)
        assert TorchGroup(timeout=None, device="cuda").device == "cuda:0"  # no index: the current GPU
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("flags", [["SHORT_INDEX"], ["KEPT_BUFFERS"], ["SHORT_INDEX", "KEPT_BUFFERS"]], ids="+".join)
def test_torchs_sparse_choices_compute_the_same_log_term(gpu, flags, monkeypatch):
    """32-bit indices and kept buffers (the GPU suite's --more switches them) against 64-bit
    indices and buffers allocated at each step."""
    if gpu.name != "torch":
        pytest.skip("torch's choices")
    from pnmf.backends import torch as torch_backend

    x, mu, var, w, _ = small_problem(seed=5, n=300, d=80, n_components=4, n_samples=1)
    data = sp.csr_matrix(x)
    kind = gpu.device.split(":")[0]
    for flag in ("SHORT_INDEX", "KEPT_BUFFERS"):
        monkeypatch.setattr(torch_backend, flag, ())
    reference = as_numpy(gpu, evaluate_on(gpu, data, mu, var, w, "lower-bound", None))
    for flag in flags:
        monkeypatch.setattr(torch_backend, flag, (kind,))
    counts = as_counts(gpu, data)
    assert (counts.pattern.crow.dtype == torch_backend.torch.int32) == ("SHORT_INDEX" in flags)
    for _ in range(2):  # the second time on the buffers the first left with the pattern
        terms = evaluate(counts, *map(gpu.asarray, (mu, var, w)), mode="lower-bound", noise=None, n_samples=1)
        got = as_numpy(gpu, terms)
        assert float(got[0]) == pytest.approx(float(reference[0]), rel=1e-6)
        for g, want in zip(got[1:], reference[1:]):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
