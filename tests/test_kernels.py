"""The backends' fused hot loops against the interface's plain versions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from pnmf import PNMF, estimator, make_counts
from pnmf.backends import get_backend
from pnmf.backends import numpy as numpy_backend
from pnmf.backends.base import Backend
from pnmf.elbo import as_counts

from .conftest import BACKENDS, cpu_backend, sparse_products_problem


def _point(seed, c, n=13, d=11, n_comp=4):
    rng = np.random.default_rng(seed)
    x = rng.poisson(4.0, (n, d)).astype(np.float64)
    x[rng.random((n, d)) < 0.3] = 0.0
    a = np.exp(rng.normal(0.0, 1.0, (c, n, n_comp)))
    w = rng.uniform(0.05, 1.0, (d, n_comp))
    return x, a, w


@pytest.mark.parametrize("second", [False, True])
def test_fused_dense_log_term_equals_the_interface_version(backend_name, second):
    b = cpu_backend(backend_name)
    # MLX's own float64 kernels are about float32-accurate; its CPU route computes in NumPy.
    rtol = 1e-6 if backend_name == "mlx" else 1e-12
    # Several sample counts in a row: the scratch buffers of one shape must not leak into another.
    for seed, c in enumerate((3, 1, 3, 2)):
        x, a, w = _point(seed, c)
        args = (b.asarray(x), b.asarray(a), b.asarray(w), second)
        fused = b.dense_log_term(*args)
        plain = Backend.dense_log_term(b, *args)
        for got, want in zip(fused, plain, strict=True):
            if want is None:
                assert got is None
            else:
                np.testing.assert_allclose(b.to_numpy(got), b.to_numpy(want), rtol=rtol, atol=rtol)


def test_column_major_counts_are_held_by_rows(backend_name):
    """A DataFrame's values and a transpose are column-major; the steps read X by rows (flat),
    which of a column-major X would be a copy at every step."""
    b = cpu_backend(backend_name)
    x = np.asfortranarray(_point(0, 1)[0])
    held = as_counts(b, x).x
    if backend_name == "numpy":
        assert held.flags.c_contiguous
    elif backend_name == "torch":
        assert held.is_contiguous()
    np.testing.assert_array_equal(b.to_numpy(held), x)
    assert x.flags.f_contiguous  # the caller's array as it was
    assert b.to_numpy(b.asarray(np.float64(2.5))).shape == ()  # a scalar stays one


@pytest.mark.parametrize("scale, zero_loadings", [(1e20, False), (1.0, True), (1e20, True)])
def test_fused_value_in_float32_at_extreme_rates(scale, zero_loadings):
    """The NumPy loop takes logs of products of two samples' rates: products beyond float32's
    range (rates of 1e20) and floored zero rates must give the per-sample logs' value."""
    b = cpu_backend("numpy", "float32")
    for c in (2, 3):
        x, a, w = _point(7, c)
        a *= scale
        if zero_loadings:
            w[:3] = 0.0  # three features with no rate at all
            x[:, :3] = 0.0
        args = (b.asarray(x), b.asarray(a), b.asarray(w), False)
        value = b.dense_log_term(*args)[0]
        want = Backend.dense_log_term(b, *args)[0]
        assert np.isfinite(value)
        assert value == pytest.approx(float(want), rel=1e-5)


def test_fused_results_are_not_overwritten_by_the_next_call(backend_name):
    b = cpu_backend(backend_name)
    x, a, w = _point(0, 2)
    first = [b.to_numpy(v).copy() for v in b.dense_log_term(b.asarray(x), b.asarray(a), b.asarray(w), True)]
    kept = b.dense_log_term(b.asarray(x), b.asarray(a), b.asarray(w), True)
    b.dense_log_term(b.asarray(x), b.asarray(2 * a), b.asarray(w), True)
    for got, want in zip(kept, first, strict=True):
        np.testing.assert_array_equal(b.to_numpy(got), want)


@pytest.mark.parametrize("sparse", [False, True])
def test_slope_is_the_log_term_gradient(backend_name, sparse):
    b = cpu_backend(backend_name)
    x, a, w = _point(4, 1)
    counts = as_counts(b, sp.csr_matrix(x) if sparse else x)
    slope = counts.slope(b.asarray(a[0]), b.asarray(w))
    gradient = counts.log_term(b.asarray(a), b.asarray(w), False)[1][0]
    np.testing.assert_allclose(b.to_numpy(slope), b.to_numpy(gradient), rtol=1e-6 if backend_name == "mlx" else 1e-12)
    # and it is d/dF of sum X log(exp(F) @ W.T), by central differences in F = log a
    f, h = np.log(a[0]), 1e-6
    target = np.zeros_like(f)
    for i, j in np.ndindex(f.shape):
        step = np.zeros_like(f)
        step[i, j] = h
        up, down = np.exp(f + step) @ w.T, np.exp(f - step) @ w.T
        target[i, j] = np.sum(x * (np.log(up) - np.log(down))) / (2 * h)
    np.testing.assert_allclose(b.to_numpy(slope), target, rtol=1e-6)


def test_sampled_product_across_chunks(monkeypatch):
    # Many chunks, a last chunk that is not full, a row longer than a chunk, empty rows,
    # and a matrix with no non-zeros at all.
    monkeypatch.setattr(numpy_backend, "CHUNK", 150)
    rng = np.random.default_rng(1)
    x = sp.random(300, 200, density=0.06, format="lil", random_state=2)
    x[7, :] = 1.0  # 200 non-zeros, more than a chunk
    x[8:10, :] = 0.0
    x = sp.csr_matrix(x)
    assert x.nnz > 20 * 150 and x.nnz % 150 != 0
    b = get_backend("numpy", dtype="float64")
    for matrix in (x, sp.csr_matrix(x[150:]), sp.csr_matrix((300, 200))):
        a, w = rng.random((matrix.shape[0], 6)), rng.random((200, 6))
        got = b.sampled_matmul(b.sparse(matrix), a, w)
        rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        np.testing.assert_allclose(got, (a @ w.T)[rows, matrix.indices], rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_normals_are_standard_normal(dtype):
    b = get_backend("numpy", dtype=dtype)
    key = b.key(0)
    eps, key = b.normal(key, (7, 31, 3))  # an odd count of draws
    assert eps.shape == (7, 31, 3) and eps.dtype == np.dtype(dtype)
    draws, _ = b.normal(key, (200_000,))
    assert not np.array_equal(draws[: eps.size], eps.ravel())  # the state advanced
    # Kolmogorov-Smirnov against N(0, 1): p > 1e-3 fails by chance once in a thousand seeds.
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 5 / np.sqrt(draws.size)
    assert abs(draws.var() - 1) < 5 * np.sqrt(2 / draws.size)
    # the same seed, the same draws
    again, _ = b.normal(b.key(0), (7, 31, 3))
    np.testing.assert_array_equal(again, eps)


@pytest.mark.parametrize("sparse", [False, True])
def test_value_alone_is_the_log_term_value(backend_name, sparse):
    """The value-only pass (a fit's final ELBO) against the full hot loop, odd and even chunks."""
    b = cpu_backend(backend_name)
    rtol = 1e-6 if backend_name == "mlx" else 1e-12
    for seed, c in enumerate((1,) if sparse else (1, 2, 5)):
        x, a, w = _point(seed, c)
        counts = as_counts(b, sp.csr_matrix(x) if sparse else x)
        value = counts.log_value(b.asarray(a), b.asarray(w))
        want = counts.log_term(b.asarray(a), b.asarray(w), False)[0]
        assert float(b.to_numpy(value)) == pytest.approx(float(b.to_numpy(want)), rel=rtol)


@pytest.mark.parametrize("second", [False, True])
def test_sparse_log_term_equals_the_dense_one(backend_name, second):
    b = cpu_backend(backend_name)
    rtol = 1e-6 if backend_name == "mlx" else 1e-12
    x, a, w = _point(5, 1)
    sparse = as_counts(b, sp.csr_matrix(x)).log_term(b.asarray(a), b.asarray(w), second)
    plain = Backend.sparse_log_term(
        b, b.sparse(sp.csr_matrix(x)), b.asarray(sp.csr_matrix(x).data), b.asarray(a), b.asarray(w), second
    )
    dense = b.dense_log_term(b.asarray(x), b.asarray(a), b.asarray(w), second)
    for got, interface, want in zip(sparse, plain, dense, strict=True):
        if want is None:
            assert got is None and interface is None
            continue
        np.testing.assert_allclose(b.to_numpy(got), b.to_numpy(want), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(b.to_numpy(interface), b.to_numpy(want), rtol=rtol, atol=rtol)


def test_sparse_log_term_called_again_leaves_its_earlier_results_alone(backend_name):
    """A backend may keep buffers between calls on the same counts (torch on the CPU and NumPy do):
    each call's results are its own, whatever the calls after it."""
    b = cpu_backend(backend_name)
    rtol = 1e-6 if backend_name == "mlx" else 1e-12
    x, a, w = _point(5, 1)
    counts = as_counts(b, sp.csr_matrix(x))
    points = [(a, w, True), (a * 2.0, w * 0.5, False), (a * 0.3, w, True)]
    results = [counts.log_term(b.asarray(p), b.asarray(q), second) for p, q, second in points]
    for (p, q, second), got in zip(points, results, strict=True):
        want = b.dense_log_term(b.asarray(x), b.asarray(p), b.asarray(q), second)
        for g, v in zip(got, want, strict=True):
            if v is None:
                assert g is None
                continue
            np.testing.assert_allclose(b.to_numpy(g), b.to_numpy(v), rtol=rtol, atol=rtol)


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def _torch_threads() -> int | None:
    torch = pytest.importorskip("torch") if "torch" in BACKENDS else None
    return None if torch is None else torch.get_num_threads()


def test_thread_limit_holds_inside_the_block_only(backend_name):
    b = cpu_backend(backend_name)
    before = (_blas_threads(), _torch_threads())
    with b.threads(None):
        assert (_blas_threads(), _torch_threads()) == before
    with b.threads(1):
        assert all(n == 1 for n in _blas_threads())
        if backend_name == "torch":
            assert _torch_threads() == 1
    assert (_blas_threads(), _torch_threads()) == before


@pytest.mark.parametrize("small_work, limited", [(estimator.SMALL_WORK, True), (0, False)])
def test_small_fits_run_on_one_thread(monkeypatch, backend_name, small_work, limited):
    monkeypatch.setattr(estimator, "SMALL_WORK", small_work)
    seen = []
    fused = type(cpu_backend(backend_name)).dense_log_term

    def spy(self, *args):
        seen.append((_blas_threads(), _torch_threads()))
        return fused(self, *args)

    monkeypatch.setattr(type(cpu_backend(backend_name)), "dense_log_term", spy)
    x = np.random.default_rng(0).poisson(2.0, (30, 20))
    before = (_blas_threads(), _torch_threads())
    model = PNMF(2, backend=backend_name, device="cpu", max_iter=5, random_state=0).fit(x)
    model.transform(x)
    assert seen and (_blas_threads(), _torch_threads()) == before
    for blas, torch_threads in seen:
        if limited:  # the BLAS under NumPy, and torch's own pool in a torch fit
            assert all(n == 1 for n in blas) and (backend_name != "torch" or torch_threads == 1)
        else:
            assert (blas, torch_threads) == before


@pytest.mark.parametrize("second", [False, True])
def test_torch_own_fused_path_equals_the_interface_version(second):
    # On the CPU torch hands this loop to NumPy; its own version is the one CUDA and MPS run.
    pytest.importorskip("torch")
    b = cpu_backend("torch")
    b._host = None
    for seed, c in enumerate((3, 1, 2)):
        x, a, w = _point(seed, c)
        args = (b.asarray(x), b.asarray(a), b.asarray(w))
        for got, want in zip(b.dense_log_term(*args, second), Backend.dense_log_term(b, *args, second), strict=True):
            if want is None:
                assert got is None
            else:
                np.testing.assert_allclose(b.to_numpy(got), b.to_numpy(want), rtol=1e-12, atol=1e-12)
        slope_args = (args[0], args[1][0], args[2])
        np.testing.assert_allclose(
            b.to_numpy(b.dense_slope(*slope_args)), b.to_numpy(Backend.dense_slope(b, *slope_args)), rtol=1e-12
        )


@pytest.mark.parametrize("sampled_addmm", [True, False], ids=["sampled_addmm", "gathered rows (MPS)"])
def test_torch_sparse_products_on_the_cpu_index_with_int32(monkeypatch, sampled_addmm):
    torch = pytest.importorskip("torch")
    from pnmf.backends import torch as torch_backend

    if not sampled_addmm:  # the path of devices without the sampled product, run on the CPU
        monkeypatch.setattr(torch_backend, "SAMPLED_ADDMM", ())
    b = cpu_backend("torch")
    x, a, w, rows = sparse_products_problem(60, 25, 4, 0.2)
    assert not callable(b.sparse(x)._transpose)  # X.T's structure ready before any step
    pattern = b.sparse(x, transpose=False)
    assert pattern.crow.dtype == pattern.col.dtype == torch.int32
    assert callable(pattern._transpose)  # without: it waits for the first product over X.T
    assert (pattern.rows is None) == sampled_addmm  # 8 bytes a non-zero, kept only where it is used
    values = b.asarray(x.data)
    rtol = 1e-12
    sampled = b.to_numpy(b.sampled_matmul(pattern, b.asarray(a), b.asarray(w)))
    np.testing.assert_allclose(sampled, (a @ w.T)[rows, x.indices], rtol=rtol)
    np.testing.assert_allclose(b.to_numpy(b.sparse_matmul(pattern, values, b.asarray(w))), x @ w, rtol=rtol)
    np.testing.assert_allclose(b.to_numpy(b.sparse_matmul_t(pattern, values, b.asarray(a))), x.T @ a, rtol=rtol)
    assert all(index.dtype == torch.int32 for index in pattern.transposed())


def test_index_dtype_is_int32_below_2_to_the_31_and_int64_from_there():
    from types import SimpleNamespace

    from pnmf.backends.base import index_dtype

    assert index_dtype(SimpleNamespace(nnz=2**31 - 1, shape=(2**31 - 1, 10))) is np.int32
    assert index_dtype(SimpleNamespace(nnz=2**31, shape=(10, 10))) is np.int64
    assert index_dtype(SimpleNamespace(nnz=10, shape=(10, 2**31))) is np.int64


def test_csr_transpose_order_is_the_transpose():
    from pnmf.backends.base import csr_transpose_order

    x = sp.random(300, 70, density=0.1, format="csr", random_state=5)
    x.data = np.arange(1.0, x.nnz + 1.0)
    x.indptr[100:110] = x.indptr[100]  # some empty rows
    x = sp.csr_matrix((x.data[: x.indptr[-1]], x.indices[: x.indptr[-1]], x.indptr), shape=x.shape)
    indptr_t, indices_t, order = csr_transpose_order(x)
    transpose = x.T.tocsr()
    transpose.sort_indices()
    np.testing.assert_array_equal(indptr_t, transpose.indptr)
    np.testing.assert_array_equal(indices_t, transpose.indices)
    np.testing.assert_array_equal(x.data[order], transpose.data)


@pytest.mark.parametrize(
    "values",
    [[0, 1, 2, 5, 1000, 3, 3], [0.5, 2.0, 3.25], [[3, 0], [1, 7]], [], [2e6, 1.0], [4.0, 0.0, 1e-9]],
    ids=["integers", "fractions", "matrix", "empty", "beyond the table", "almost whole"],
)
def test_count_sums_are_the_sums_of_lgamma_x_log_x_and_x(values):
    from scipy.special import gammaln, xlogy

    from pnmf.elbo import count_sums, lgamma_sum

    x = np.asarray(values, dtype=np.float64)
    lgamma, x_log_x, total = count_sums(x)
    assert lgamma == lgamma_sum(x) == pytest.approx(float(gammaln(x + 1.0).sum()), rel=1e-13, abs=1e-13)
    assert x_log_x == pytest.approx(float(xlogy(x, x).sum()), rel=1e-13, abs=1e-13)
    assert total == pytest.approx(float(x.sum()), rel=1e-15)
    assert lgamma_sum(x.astype(np.float32)) == pytest.approx(float(gammaln(x.astype(np.float32) + 1.0).sum()), rel=1e-6)


def test_count_sums_of_chunks_whole_and_not_are_the_sums_of_all(monkeypatch):
    """Read in chunks, some of integers (summed from a histogram) and some not: the sums of all."""
    from scipy.special import gammaln, xlogy

    import pnmf.elbo as elbo

    x = np.random.default_rng(0).poisson(3.0, 1000).astype(np.float64)
    x[700] = 2.5  # the chunk of entries 600-799 is summed entry by entry
    monkeypatch.setattr(elbo, "COUNT_CHUNK", 200)
    lgamma, x_log_x, total = elbo.count_sums(x)
    assert lgamma == pytest.approx(float(gammaln(x + 1.0).sum()), rel=1e-13)
    assert x_log_x == pytest.approx(float(xlogy(x, x).sum()), rel=1e-13)
    assert total == pytest.approx(float(x.sum()), rel=1e-15)


@pytest.fixture
def device_path_steps(monkeypatch):
    """Torch on the path CUDA runs (no NumPy hand-off), on the CPU, every host copy or read
    made inside a training step recorded: a step captured in a CUDA graph may make none.
    Yields (refused calls, the capture flag of every compiled step)."""
    torch = pytest.importorskip("torch")
    from pnmf.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "NumpyBackend", lambda dtype: None)
    refused, captures, stepping = [], [], [False]

    def refuse(name, original):
        def call(*args, **kwargs):
            if stepping[0]:
                refused.append(name)
            return original(*args, **kwargs)

        return call

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse(name, getattr(torch, name)))
    for name in ("item", "cpu", "numpy", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name, getattr(torch.Tensor, name)))

    def compile(self, fn, capture=False):
        captures.append(capture)

        def step(state, key):
            stepping[0] = True
            try:
                return fn(state, key)
            finally:
                stepping[0] = False

        return step

    monkeypatch.setattr(torch_backend.TorchBackend, "compile", compile)
    yield refused, captures


@pytest.mark.parametrize("mode", ["simple", "expanded", "lower-bound"])
@pytest.mark.parametrize("training", ["natural", "standard"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_torch_device_steps_neither_copy_from_nor_wait_for_the_host(device_path_steps, mode, training, sparse):
    refused, captures = device_path_steps
    x, _, _ = make_counts(40, 15, 3, random_state=2)
    model = PNMF(3, mode=mode, training_mode=training, backend="torch", max_iter=150, tol=0, random_state=0)
    model.fit(sp.csr_matrix(x) if sparse else x)
    assert model.n_iter_ == 150 and np.isfinite(model.elbo_)
    assert not refused, f"host transfers or reads inside a step: {sorted(set(refused))}"
    # The loop asks for dense steps to be captured; sparse ones are not (not yet checked on a GPU).
    assert captures and all(c == (not sparse) for c in captures)


def test_torch_device_steps_of_restarts_together_neither_copy_from_nor_wait_for_the_host(device_path_steps):
    refused, captures = device_path_steps
    x, _, _ = make_counts(60, 20, 3, random_state=2)
    fits = PNMF(3, backend="torch", max_iter=300)._fit_restarts(x, [0, 1, 2, 3])
    assert captures == [True]  # one step for the four restarts, captured
    assert len({fit.n_iter_ for fit in fits}) > 1  # lanes were frozen (between steps) as they stopped
    assert not refused, f"host transfers or reads inside a step: {sorted(set(refused))}"


@pytest.mark.parametrize("preset", [None, "1"])
def test_mlx_multiplies_in_full_float32_unless_the_user_chose_otherwise(preset):
    # MLX's default on GPUs with matrix units is TF32 (errors near 1e-3 per product).
    import os
    import subprocess
    import sys

    pytest.importorskip("mlx.core")
    env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
    if preset is not None:
        env["MLX_ENABLE_TF32"] = preset
    script = "import os, pnmf.backends.mlx; print(os.environ['MLX_ENABLE_TF32'])"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == (preset or "0")


@pytest.mark.parametrize("preset", [None, "/somewhere/else"])
def test_mlx_keeps_its_cuda_kernels_in_the_users_cache_unless_told_otherwise(preset, tmp_path):
    import os
    import subprocess
    import sys
    from importlib.metadata import version

    pytest.importorskip("mlx.core")
    env = {k: v for k, v in os.environ.items() if k != "MLX_PTX_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    if preset is not None:
        env["MLX_PTX_CACHE_DIR"] = preset
    script = "import os, pnmf.backends.mlx; print(os.environ['MLX_PTX_CACHE_DIR'])"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == (preset or str(tmp_path / "pnmf" / f"mlx-{version('mlx')}" / "ptx"))
    assert not (tmp_path / "pnmf").exists()  # made by MLX when it first builds a CUDA kernel, not here


def test_mlx_float64_on_the_cpu_stays_float64_through_the_numpy_hand_off():
    mx = pytest.importorskip("mlx.core")
    b = get_backend("mlx", device="cpu", dtype="float64")
    x = np.arange(12.0).reshape(3, 4) * 0.1
    a = b.asarray(np.full((2, 3, 2), 1.0 + 1e-12))
    w = b.asarray(np.ones((2, 4, 2)))
    assert b.asarray(x).dtype == mx.float64  # MLX's own default would make it float32
    value, g_f, g_w = b.lanes_log_term(b.asarray(x), a, w)  # computed by NumPy, handed back
    assert {value.dtype, g_f.dtype, g_w.dtype} == {mx.float64}
    # 1 + 1e-12 survives only in float64: rate = 2 (1 + 1e-12), d/dF = a * sum_d X / rate * W.
    expected = (1.0 + 1e-12) * x.sum(axis=1) / (2 * (1.0 + 1e-12))
    np.testing.assert_allclose(b.to_numpy(g_f)[0, :, 0], expected, rtol=1e-15)
    assert b.to_numpy(a)[0, 0, 0] - 1.0 == pytest.approx(1e-12, rel=1e-3)


def _cuda_kernels_as_cpp() -> str:
    """MLX CUDA kernels' bodies wrapped as MLX wraps them, compiled as C++ with a serial shim.

    MLX puts each input's pointer in the signature, followed by its shape where the body
    names ``<input>_shape``, then the outputs, then the template constants before the body.
    Each kernel here is called once per thread index, which ``cg::this_grid()`` hands out.
    """
    from pnmf.backends import mlx as mlx_backend

    floats = {"a", "b", "values", "m"}  # the other inputs are int32 indices

    def kernel(name, source, constants):
        inputs, body = mlx_backend._KERNEL_SOURCES[source]
        params = []
        for input_name in inputs:
            params.append(f"const {'float' if input_name in floats else 'int32_t'}* {input_name}")
            if f"{input_name}_shape" in body:
                params.append(f"const Shape {input_name}_shape")
        consts = "".join(f"  {line}\n" for line in ["using T = float;", *constants])
        return f"void {name}({', '.join(params)}, float* out) {{\n{consts}{body}\n}}\n"

    return (
        "#include <array>\n#include <cstddef>\n#include <cstdint>\n#include <cstdio>\n"
        "using Shape = std::array<int32_t, 8>;\nstatic size_t thread;\n"
        "namespace cg { struct Grid { unsigned long long thread_rank() const { return thread; } };\n"
        "inline Grid this_grid() { return {}; } }\n"
        + kernel("sampled", "sampled", [])
        + kernel("ordered", "segments", ["constexpr bool ORDERED = true;"])
        + kernel("in_order", "segments", ["constexpr bool ORDERED = false;"])
    )


def test_mlx_cuda_kernels_compute_the_sparse_products(tmp_path):
    """The CUDA kernels' bodies, run serially on the CPU: (a @ b.T) at the non-zeros, S @ b
    and S.T @ a, with empty rows and columns and threads past the end (which must write
    nothing: the arrays are exactly sized, and the address sanitizer watches them)."""
    import shutil
    import subprocess

    pytest.importorskip("mlx")
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the CUDA kernels' bodies for the CPU")
    from pnmf.backends.base import csr_transpose_order

    n, d, width = 37, 23, 5
    x, a, b, rows = sparse_products_problem(n, d, width, 0.2, dtype=np.float32)
    starts_t, cols_t, order_t = csr_transpose_order(x)

    def array(name, values, ctype):
        return f"static {ctype} {name}[] = {{{', '.join(map(repr, np.asarray(values).ravel().tolist()))}}};\n"

    main = (
        array("A", a, "float")
        + array("B", b, "float")
        + array("ROWS", rows, "int32_t")
        + array("COLS", x.indices, "int32_t")
        + array("STARTS", x.indptr, "int32_t")
        + array("VALUES", x.data, "float")
        + array("STARTS_T", starts_t, "int32_t")
        + array("COLS_T", cols_t, "int32_t")
        + array("ORDER_T", order_t, "int32_t")
        + f"""int main() {{
  float* sampled_out = new float[{x.nnz}];
  float* rows_out = new float[{n * width}];
  float* cols_out = new float[{d * width}];
  Shape a_shape{{{n}, {width}}}, b_shape{{{d}, {width}}}, nnz{{{x.nnz}}}, starts{{{n + 1}}}, starts_t{{{d + 1}}};
  for (thread = 0; thread < {x.nnz + 300}; ++thread) sampled(A, a_shape, B, ROWS, nnz, COLS, sampled_out);
  for (thread = 0; thread < {n * width + 300}; ++thread)
    in_order(STARTS, starts, COLS, STARTS, VALUES, B, b_shape, rows_out);
  for (thread = 0; thread < {d * width + 300}; ++thread)
    ordered(STARTS_T, starts_t, COLS_T, ORDER_T, VALUES, A, a_shape, cols_out);
  for (int i = 0; i < {x.nnz}; ++i) printf("%.9g ", sampled_out[i]);
  printf("\\n");
  for (int i = 0; i < {n * width}; ++i) printf("%.9g ", rows_out[i]);
  printf("\\n");
  for (int i = 0; i < {d * width}; ++i) printf("%.9g ", cols_out[i]);
  printf("\\n");
  delete[] sampled_out;
  delete[] rows_out;
  delete[] cols_out;
}}
"""
    )
    (tmp_path / "kernels.cpp").write_text(_cuda_kernels_as_cpp() + main)
    build = [compiler, "-std=c++17", "-O1", "-fsanitize=address", "-o", str(tmp_path / "kernels")]
    built = subprocess.run([*build, str(tmp_path / "kernels.cpp")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    result = subprocess.run([str(tmp_path / "kernels")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    sampled_out, rows_out, cols_out = (np.array(line.split(), dtype=np.float64) for line in result.stdout.splitlines())
    np.testing.assert_allclose(sampled_out, np.sum(a[rows] * b[x.indices], axis=1), rtol=1e-6)
    np.testing.assert_allclose(rows_out, (x @ b).ravel(), rtol=1e-6)
    np.testing.assert_allclose(cols_out, (x.T @ a).ravel(), rtol=1e-6)


def test_mlx_waits_for_the_step_before_each_one_it_queues(monkeypatch):
    """At most two steps in flight: a queued MLX step holds its intermediates until it runs."""
    pytest.importorskip("mlx")
    from pnmf.backends import mlx as mlx_backend

    waited, real = [], mlx_backend.mx.eval
    monkeypatch.setattr(mlx_backend.mx, "eval", lambda *trees: (waited.append(trees), real(*trees))[1])
    b = get_backend("mlx", device="cpu", dtype="float32")
    steps = [b.asarray(np.full(3, float(i))) for i in range(3)]
    for step in steps:
        b.launch(step)
    # Queuing step i waited for step i - 1 (the first for nothing), never for step i itself.
    assert [len(trees[0]) for trees in waited] == [0, 1, 1]
    assert waited[1][0][0] is steps[0] and waited[2][0][0] is steps[1]


@pytest.mark.parametrize("sampled_addmm", [True, False])
def test_torch_sampled_product_written_into_a_buffer_is_the_fresh_one(monkeypatch, sampled_addmm):
    # On the CPU the rates go into a buffer kept with the pattern (sampled_addmm's out=);
    # without sampled_addmm (MPS) each non-zero's row and column are gathered.
    torch = pytest.importorskip("torch")
    from pnmf.backends import torch as torch_backend

    if not sampled_addmm:
        monkeypatch.setattr(torch_backend, "SAMPLED_ADDMM", ())
    b = get_backend("torch", "cpu", "float64")
    x, a, w = _point(3, 1)
    pattern = b.sparse(sp.csr_matrix(x))
    fresh = b.sampled_matmul(pattern, b.asarray(a[0]), b.asarray(w))
    buffer = torch.full((sp.csr_matrix(x).nnz,), float("nan"), dtype=torch.float64)
    written = b.sampled_matmul(pattern, b.asarray(a[0]), b.asarray(w), out=buffer)
    assert written.data_ptr() == buffer.data_ptr()
    np.testing.assert_array_equal(buffer.numpy(), fresh.numpy())
    rows, cols = sp.csr_matrix(x).nonzero()
    np.testing.assert_allclose(buffer.numpy(), np.einsum("nl,nl->n", a[0][rows], w[cols]), rtol=1e-12)


def test_a_sparse_torch_fit_says_nothing_of_torchs_sparse_tensors():
    """torch's own notes on CSR tensors (beta support; with torch 2.11 the invariants left
    unchecked, said even under check_invariants=False) are not the user's to read."""
    pytest.importorskip("torch")
    import warnings

    x = sp.csr_matrix(make_counts(60, 25, 3, random_state=2)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PNMF(3, backend="torch", device="cpu", max_iter=3000).fit(x)
        model.transform(x)
