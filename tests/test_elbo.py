"""Facts about the ELBO estimators: agreement across backends, sparse = dense, the bound, the means."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pnmf.elbo import MODES, Noise, as_counts, evaluate

from .conftest import BACKENDS, as_numpy, cpu_backend, evaluate_on, small_problem


def _value(name, dtype, x, mu, var, w, mode, eps):
    b = cpu_backend(name, dtype)
    return float(b.to_numpy(evaluate_on(b, x, mu, var, w, mode, eps, gradients=False).value))


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-5), ("float32", 1e-4)])
@pytest.mark.parametrize("mode", MODES)
def test_backends_agree(mode, dtype, rtol):
    x, mu, var, w, eps = small_problem(seed=3, n=40, d=30, n_components=4)
    reference = _value("numpy", "float64", x, mu, var, w, mode, eps)
    for name in BACKENDS:
        for data in (x, sp.csr_matrix(x)):
            assert _value(name, dtype, data, mu, var, w, mode, eps) == pytest.approx(reference, rel=rtol)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_equals_dense(backend_name, mode):
    x, mu, var, w, eps = small_problem(seed=4)
    b = cpu_backend(backend_name)
    results = [
        as_numpy(b, evaluate_on(b, data, mu, var, w, mode, eps)) for data in (x, sp.csr_matrix(x), sp.coo_matrix(x))
    ]
    rtol = 1e-5 if backend_name == "mlx" else 1e-9  # MLX's float64 exp/log are about float32-accurate
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            np.testing.assert_allclose(a, c, rtol=rtol, atol=rtol)


def test_sparse_explicit_zeros_and_duplicates_are_the_same_counts():
    x, mu, var, w, eps = small_problem(seed=5)
    coo = sp.coo_matrix(x)
    # Split every count in two duplicate entries and add explicit zeros.
    rows = np.concatenate([coo.row, coo.row, [0, 1]])
    cols = np.concatenate([coo.col, coo.col, [0, 1]])
    data = np.concatenate([coo.data / 2, coo.data / 2, [0.0, 0.0]])
    messy = sp.coo_matrix((data, (rows, cols)), shape=x.shape)
    for mode in MODES:
        assert _value("numpy", "float64", messy, mu, var, w, mode, eps) == pytest.approx(
            _value("numpy", "float64", x, mu, var, w, mode, eps), rel=1e-12
        )


def _mc_terms(
    mode, x, mu, var, w, draws, n_samples=4, seed=0, control_variate=False, antithetic=True, var_gradient="reparam"
):
    b = cpu_backend("numpy", "float64")
    counts = as_counts(b, x)
    noise = Noise(b, b.key(seed), antithetic=antithetic)
    return [
        evaluate(
            counts,
            mu,
            var,
            w,
            mode=mode,
            noise=noise,
            n_samples=n_samples,
            control_variate=control_variate,
            var_gradient=var_gradient,
        )
        for _ in range(draws)
    ]


def _mc_values(*args, **kwargs):
    return np.array([terms.value for terms in _mc_terms(*args, **kwargs)])


def test_lower_bound_is_below_expanded_mean():
    x, mu, var, w, _ = small_problem(seed=6, n=20, d=15)
    var = var * 4  # wide posteriors make the Jensen gap clear
    b = cpu_backend("numpy")
    lower = evaluate(as_counts(b, x), mu, var, w, mode="lower-bound", noise=None, n_samples=1, gradients=False).value
    expanded = _mc_values("expanded", x, mu, var, w, draws=500)
    se = expanded.std() / np.sqrt(len(expanded))
    assert lower < expanded.mean() - 5 * se


def test_simple_and_expanded_have_the_same_mean():
    """Two-sample z-test at five standard errors: false only if one estimator is biased."""
    x, mu, var, w, _ = small_problem(seed=7, n=20, d=15)
    simple = _mc_values("simple", x, mu, var, w, draws=2000, seed=1)
    expanded = _mc_values("expanded", x, mu, var, w, draws=2000, seed=2)
    se = np.sqrt(simple.var() / len(simple) + expanded.var() / len(expanded))
    assert abs(simple.mean() - expanded.mean()) < 5 * se


@pytest.mark.parametrize("mode, noise_ratio", [("simple", 0.9), ("expanded", 0.5)])
def test_control_variate_keeps_the_mean_and_cuts_the_noise(mode, noise_ratio):
    x, mu, var, w, _ = small_problem(seed=8, n=20, d=15)
    plain = _mc_values(mode, x, mu, var, w, draws=1500, seed=3, antithetic=False)
    controlled = _mc_values(mode, x, mu, var, w, draws=1500, seed=4, control_variate=True, antithetic=False)
    se = np.sqrt(plain.var() / len(plain) + controlled.var() / len(controlled))
    assert abs(plain.mean() - controlled.mean()) < 5 * se
    assert controlled.std() < noise_ratio * plain.std()


@pytest.mark.parametrize("sizes", [(4,), (1, 1, 1, 1, 1), (3, 2, 1), (1, 3, 3)])
def test_antithetic_draws_come_in_pairs_across_chunks(sizes):
    b = cpu_backend("numpy", "float64")
    noise = Noise(b, b.key(0))
    eps = np.concatenate([noise.draw((size, 6, 2)) for size in sizes]).reshape(sum(sizes), -1)
    if len(eps) % 2 == 0:  # closed under negation, each value twice in absolute value
        np.testing.assert_array_equal(np.sort(eps, axis=0), np.sort(-eps, axis=0))
        assert len(np.unique(np.abs(eps[:, 0]))) == len(eps) // 2
    else:  # one draw still waits for its negative
        assert len(np.unique(np.abs(eps[:, 0]))) == (len(eps) + 1) // 2
    assert not noise.balanced(5) and noise.balanced(4) and not Noise(b, b.key(0), antithetic=False).balanced(4)


@pytest.mark.parametrize("mode", ["simple", "expanded"])
@pytest.mark.parametrize("var_gradient", ["reparam", "price"])
def test_antithetic_pairs_keep_the_means_and_cut_the_gradient_noise(mode, var_gradient):
    """Same expectations as independent draws (z-tests), and less noise in the gradients whose
    noise is odd in eps: all but the reparameterisation's g_var = E[g(eps) eps] / (2 sd)."""
    x, mu, var, w, _ = small_problem(seed=11, n=20, d=15)
    paired = _mc_terms(mode, x, mu, var, w, draws=600, seed=5, var_gradient=var_gradient)
    independent = _mc_terms(mode, x, mu, var, w, draws=600, seed=6, antithetic=False, var_gradient=var_gradient)
    reduced = ("g_mu", "g_w") if var_gradient == "reparam" else ("g_mu", "g_var", "g_w")
    for name in ("value", "g_mu", "g_var", "g_w"):
        a, c = (np.array([getattr(t, name) for t in terms]) for terms in (paired, independent))
        se = np.sqrt(a.var(axis=0) / len(a) + c.var(axis=0) / len(c))
        assert np.all(np.abs(a.mean(axis=0) - c.mean(axis=0)) < 5 * se + 1e-12), name
        if name in reduced:
            assert np.median(a.std(axis=0) / c.std(axis=0)) < 0.8, name


def test_monte_carlo_chunks_do_not_change_the_estimate(monkeypatch):
    """The Monte Carlo loop gives the same value whatever the chunk size."""
    import pnmf.elbo

    x, mu, var, w, eps = small_problem(seed=9, n_samples=7)
    whole = _value("numpy", "float64", x, mu, var, w, "expanded", eps)
    monkeypatch.setattr(pnmf.elbo, "DENSE_CHUNK", x.size * 2)  # two samples per chunk
    assert _value("numpy", "float64", x, mu, var, w, "expanded", eps) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_mlx_gather_path_equals_dense(mode):
    """MLX on a GPU gathers and scatter-adds; run that path on the CPU and compare."""
    pytest.importorskip("mlx")
    x, mu, var, w, eps = small_problem(seed=10)
    b = cpu_backend("mlx", "float32")
    b._host = None  # the GPU route
    values = [as_numpy(b, evaluate_on(b, data, mu, var, w, mode, eps)) for data in (x, sp.csr_matrix(x))]
    for a, c in zip(*values, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_float32_value_of_large_counts_is_close_to_float64(name, sparse):
    """Counts ~1e4 make sum X log rate ~1e3 times the ELBO (2.6e6 here); summed as it is, its
    float32 rounding put the ELBO 2,770 (1.1e-3, dense) and 722 (sparse) off on every
    backend, where the sums at rate e^-shift put it 82-466 off."""
    rng = np.random.default_rng(0)
    w, h = rng.gamma(0.3, 1.0, (300, 5)) * 1e4, rng.gamma(1.0, 1.0, (500, 5))
    x = rng.poisson(h @ w.T).astype(np.float64)
    mu, var = np.log(h) + rng.normal(0.0, 0.05, h.shape), np.full(h.shape, 1e-4)
    data = sp.csr_matrix(x) if sparse else x
    values = {}
    for dtype in ("float64", "float32"):
        b = cpu_backend(name, dtype)
        counts = as_counts(b, data)
        terms = evaluate(
            counts,
            b.asarray(mu),
            b.asarray(var),
            b.asarray(w),
            mode="lower-bound",
            noise=None,
            n_samples=1,
            gradients=False,
        )
        values[dtype] = float(b.to_numpy(terms.value))
    assert values["float32"] == pytest.approx(values["float64"], rel=4e-4)
