"""The closed-form gradients equal each framework's autodiff of the ELBO formula."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp

from pnmf.elbo import MODES, as_counts, evaluate

from .conftest import BACKENDS, FixedNoise, cpu_backend, evaluate_on, small_problem
from .oracle import mlx_oracle, torch_oracle

ORACLES = [o for o, mod in ((torch_oracle, "torch"), (mlx_oracle, "mlx")) if importlib.util.find_spec(mod)]


@pytest.mark.parametrize("oracle", ORACLES, ids=lambda o: o.__name__)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_match_autodiff(name, mode, sparse, oracle):
    x, mu, var, w, eps = small_problem(seed=1)
    prior_scale = 1.7
    b = cpu_backend(name)
    terms = evaluate_on(b, sp.csr_matrix(x) if sparse else x, mu, var, w, mode, eps, prior_scale=prior_scale)
    value, g_mu, g_var, g_w = oracle(x, mu, var, w, mode, eps, prior_scale)
    # MLX computes float64 transcendental functions to about float32 accuracy.
    rtol = 1e-5 if oracle is mlx_oracle or name == "mlx" else 1e-9
    np.testing.assert_allclose(float(b.to_numpy(terms.value)), value, rtol=rtol)
    for mine, theirs in ((terms.g_mu, g_mu), (terms.g_var, g_var), (terms.g_w, g_w)):
        np.testing.assert_allclose(b.to_numpy(mine), theirs, rtol=rtol * 10, atol=rtol * 10)


@pytest.mark.parametrize("mode", ["simple", "expanded"])
def test_price_variance_gradient_is_unbiased(mode):
    """Price's g_var and the reparameterised g_var estimate the same expectation."""
    x, mu, var, w, _ = small_problem(seed=2, n=4, d=5, n_components=2)
    b = cpu_backend("numpy")
    counts = as_counts(b, x)
    rng = np.random.default_rng(0)
    draws = {"reparam": [], "price": []}
    for _ in range(400):
        eps = rng.standard_normal((20, *mu.shape))
        for kind in draws:
            terms = evaluate(counts, mu, var, w, mode=mode, noise=FixedNoise(b, eps), n_samples=20, var_gradient=kind)
            draws[kind].append(terms.g_var)
    reparam, price = np.array(draws["reparam"]), np.array(draws["price"])
    # Difference of two means of 400 draws each: five standard errors.
    se = np.sqrt(reparam.var(axis=0) / 400 + price.var(axis=0) / 400)
    assert np.all(np.abs(reparam.mean(axis=0) - price.mean(axis=0)) < 5 * se + 1e-12)
    assert np.all(price.std(axis=0) <= reparam.std(axis=0) * 1.05)
