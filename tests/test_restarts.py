"""Restarts fitted together as lanes of one step (pnmf.restarts)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

from pnmf import PNMF, loop, make_counts
from pnmf.elbo import as_counts, evaluate
from pnmf.restarts import MIN_LANES, lane_terms, lanes_per_step
from tests.conftest import cpu_backend

SEEDS = [3, 17, 99, 1234, 5]


@pytest.fixture(scope="module")
def seed_counts():
    return make_counts(200, 100, 5, random_state=42)[0]


def test_lane_terms_are_each_lanes_own_elbo_and_gradients(backend_name):
    """Every lane's value and gradients are evaluate()'s for that lane alone (float64)."""
    b = cpu_backend(backend_name)
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (30, 12)).astype(np.float64)
    x[rng.random(x.shape) < 0.3] = 0
    mu = rng.normal(0, 0.5, (3, 30, 4))
    var = rng.uniform(0.05, 0.5, (3, 30, 4))
    w = rng.uniform(0.1, 1.0, (3, 12, 4))
    counts = as_counts(b, x)
    value, g_mu, g_var, w_num, expected_sum = (
        b.to_numpy(t) for t in lane_terms(b, counts, b.asarray(mu), b.asarray(var), b.asarray(w), 1.7)
    )
    for lane in range(3):
        alone = evaluate(
            counts,
            b.asarray(mu[lane]),
            b.asarray(var[lane]),
            b.asarray(w[lane]),
            mode="lower-bound",
            noise=None,
            n_samples=1,
            prior_scale=1.7,
        )
        np.testing.assert_allclose(value[lane], b.to_numpy(alone.value), rtol=1e-12)
        for name, lanes in (("g_mu", g_mu), ("g_var", g_var), ("w_numerator", w_num), ("expected_sum", expected_sum)):
            np.testing.assert_allclose(lanes[lane], b.to_numpy(getattr(alone, name)), rtol=1e-10, err_msg=name)


def test_restarts_fitted_together_are_the_fits_each_seed_gives_alone(seed_counts, backend_name, monkeypatch):
    runs = []
    original = loop.run
    monkeypatch.setattr(loop, "run", lambda *args, **kwargs: runs.append(1) or original(*args, **kwargs))
    params = dict(backend=backend_name, device="cpu", dtype="float64")
    together = PNMF(5, **params)._fit_restarts(seed_counts, SEEDS)
    assert len(runs) == 1  # one run stepped every restart
    alone = [PNMF(5, random_state=seed, **params).fit(seed_counts) for seed in SEEDS]
    # The lanes stop at different iterations: a lane that stopped was held where it stopped.
    assert len({fit.n_iter_ for fit in alone}) > 1
    for fit, reference in zip(together, alone):
        assert fit.random_state == reference.random_state
        assert fit.n_iter_ == reference.n_iter_ and fit.converged_ == reference.converged_
        np.testing.assert_allclose(fit.loadings_, reference.loadings_, rtol=1e-8)
        np.testing.assert_allclose(fit.components_, reference.loadings_.T, rtol=1e-8)
        np.testing.assert_allclose(fit.mean_, reference.mean_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fit.var_, reference.var_, rtol=1e-8)
        np.testing.assert_allclose(fit.elbo_history_, reference.elbo_history_, rtol=1e-12)
        np.testing.assert_allclose(fit.elbo_, reference.elbo_, rtol=1e-12)
        np.testing.assert_array_equal(fit.prior_scale_, reference.prior_scale_)
        assert fit.backend_ == reference.backend_ and fit.batch_effects_ is None
    # Each fit owns its q(F): keeping one restart does not keep every restart's rows alive.
    assert not any(np.shares_memory(a.mean_, b.mean_) for a, b in zip(together, together[1:]))
    assert all(fit.mean_.base is None or fit.mean_.base.shape == fit.mean_.shape for fit in together)


def test_lanes_that_reach_max_iter_end_there_unconverged(seed_counts):
    with pytest.warns(ConvergenceWarning, match="max_iter=30"):
        together = PNMF(5, max_iter=30, dtype="float64", backend="numpy")._fit_restarts(seed_counts, SEEDS)
    for fit, seed in zip(together, SEEDS):
        with pytest.warns(ConvergenceWarning):
            reference = PNMF(5, max_iter=30, dtype="float64", backend="numpy", random_state=seed).fit(seed_counts)
        assert fit.n_iter_ == 30 and not fit.converged_
        np.testing.assert_allclose(fit.loadings_, reference.loadings_, rtol=1e-8)


def test_only_what_lanes_support_runs_as_lanes(seed_counts):
    b = cpu_backend("numpy", "float32")
    assert lanes_per_step(PNMF(5), seed_counts, b) >= MIN_LANES
    # One of anything lanes do not do, and the restarts run one by one.
    for params in (
        dict(mode="expanded"),
        dict(training_mode="standard"),
        dict(loadings_update="adam"),
        dict(prior_scale="auto"),
        dict(size_factors="total"),
        dict(batch_size=50),
        dict(checkpoint="fit.npz"),
    ):
        assert lanes_per_step(PNMF(5, **params), seed_counts, b) == 1, params
    assert lanes_per_step(PNMF(5, batch_size=500), seed_counts, b) >= MIN_LANES  # a batch of every row
    assert lanes_per_step(PNMF(5), sp.csr_matrix(seed_counts), b) == 1
    # Data whose steps are not bound by overhead on a CPU: digits' size.
    assert lanes_per_step(PNMF(5), np.ones((1797, 64)), b) == 1


def test_a_lane_that_becomes_non_finite_is_named_with_its_iteration():
    b = cpu_backend("numpy")
    params = (np.zeros((2, 3, 1)), np.ones((2, 3, 1)), np.ones((2, 4, 1)), {})
    loop.check_finite(b, [np.array([-1.0, -2.0])], params, 7)  # finite: nothing raised
    with pytest.raises(FloatingPointError, match="became nan at iteration 8"):
        loop.check_finite(b, [np.array([-1.0, -2.0]), np.array([-1.0, np.nan])], params, 7)
