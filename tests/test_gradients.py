"""The closed-form gradients equal each framework's autodiff of the ELBO formula."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp

from pnmf.elbo import MODES, as_counts, evaluate, prior_update
from pnmf.scaling import RowEffects

from .conftest import BACKENDS, FixedNoise, cpu_backend, evaluate_on, small_problem
from .oracle import elbo_formula, mlx_oracle, torch_oracle

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


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BACKENDS)
def test_without_the_loadings_gradient_the_rest_is_unchanged(name, mode, sparse):
    x, mu, var, w, eps = small_problem(seed=2)
    b = cpu_backend(name)
    data = sp.csr_matrix(x) if sparse else x
    both = evaluate_on(b, data, mu, var, w, mode, eps, var_gradient="price")
    alone = evaluate_on(b, data, mu, var, w, mode, eps, var_gradient="price", loadings=False)
    assert both.g_w is not None and both.w_numerator is not None
    assert alone.g_w is None and alone.w_numerator is None
    for name_ in ("value", "g_mu", "g_var", "expected_sum"):
        np.testing.assert_array_equal(b.to_numpy(getattr(alone, name_)), b.to_numpy(getattr(both, name_)))


def scaled_problem(seed: int = 3, n_batches: int = 3):
    """small_problem's point with size factors, batch codes and batch effects g (B, D)."""
    x, mu, var, w, eps = small_problem(seed=seed)
    rng = np.random.default_rng(seed)
    s = np.exp(rng.normal(0.0, 0.6, len(x)))
    codes = np.arange(len(x)) % n_batches
    g = np.exp(rng.normal(0.0, 0.5, (n_batches, x.shape[1])))
    return x, mu, var, w, eps, (s, codes, g)


@pytest.mark.parametrize("oracle", ORACLES, ids=lambda o: o.__name__)
@pytest.mark.parametrize("n_batches", [1, 3], ids=["size-factors", "batches"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_with_size_factors_and_batches_match_autodiff(name, mode, sparse, n_batches, oracle):
    """rate = s[n] g[batch(n), d] exp(F) @ W.T: the value and the gradients in mu, var, W."""
    x, mu, var, w, eps, (s, codes, g) = scaled_problem(n_batches=n_batches)
    b = cpu_backend(name)
    data = sp.csr_matrix(x) if sparse else x
    scaling = RowEffects(s, codes, g).scaling(b, data)
    terms = evaluate(
        as_counts(b, data, scaling=scaling),
        *(b.asarray(a) for a in (mu, var, w, g)),
        mode=mode,
        noise=FixedNoise(b, eps),
        n_samples=eps.shape[0],
        prior_scale=1.3,
    )
    value, g_mu, g_var, g_w, _ = oracle(x, mu, var, w, mode, eps, 1.3, effects=(s, codes, g))
    rtol = 1e-5 if oracle is mlx_oracle or name == "mlx" else 1e-9
    np.testing.assert_allclose(float(b.to_numpy(terms.value)), value, rtol=rtol)
    for mine, theirs in ((terms.g_mu, g_mu), (terms.g_var, g_var), (terms.g_w, g_w)):
        np.testing.assert_allclose(b.to_numpy(mine), theirs, rtol=rtol * 10, atol=rtol * 10)


@pytest.mark.parametrize("mode", ["lower-bound", "expanded"])
@pytest.mark.parametrize("name", BACKENDS)
def test_batch_effects_update_is_the_maximiser(name, mode):
    """The closed-form g zeroes the ELBO's gradient in g (autodiff) and raises the ELBO."""
    x, mu, var, w, eps, (s, codes, g) = scaled_problem()
    x = x + 1.0  # every batch with counts of every feature: g > 0, where log g is finite
    b = cpu_backend(name)
    scaling = RowEffects(s, codes, g).scaling(b, x)
    counts = as_counts(b, x, scaling=scaling)
    before = evaluate(
        counts, *(b.asarray(a) for a in (mu, var, w, g)), mode=mode, noise=FixedNoise(b, eps), n_samples=5
    )
    fitted = b.to_numpy(scaling.update(b.asarray(g), b.asarray(w), before.expected_sum))
    value, *_, g_g = torch_oracle(x, mu, var, w, mode, eps, effects=(s, codes, fitted))
    assert value > float(b.to_numpy(before.value))
    rtol = 1e-5 if name == "mlx" else 1e-9
    np.testing.assert_allclose(g_g, 0.0, atol=rtol * np.abs(x).sum())
    # and it is not zero at the start: the check can fail
    assert np.abs(torch_oracle(x, mu, var, w, mode, eps, effects=(s, codes, g))[-1]).max() > 1.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", BACKENDS)
def test_per_component_prior_scale_gradients_and_update(name, mode):
    """A prior scale per component (prior_scale='auto'): the gradients match torch's autodiff,
    and the closed-form update zeroes the ELBO's gradient in the scale."""
    torch = pytest.importorskip("torch")

    x, mu, var, w, eps = small_problem(seed=4)
    prior = np.array([0.5, 1.0, 2.5])
    b = cpu_backend(name)
    terms = evaluate_on(b, x, mu, var, w, mode, eps, prior_scale=b.asarray(prior), row_statistics=True)

    def oracle(scale):
        t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in dict(mu=mu, var=var, w=w).items()}
        s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
        value = elbo_formula(torch, torch.tensor(x), t["mu"], t["var"], t["w"], mode, torch.tensor(eps), s, torch.log)
        value.backward()
        return float(value.detach()), t["mu"].grad.numpy(), t["var"].grad.numpy(), t["w"].grad.numpy(), s.grad.numpy()

    value, g_mu, g_var, g_w, g_prior = oracle(prior)
    rtol = 1e-5 if name == "mlx" else 1e-9
    np.testing.assert_allclose(float(b.to_numpy(terms.value)), value, rtol=rtol)
    for mine, theirs in ((terms.g_mu, g_mu), (terms.g_var, g_var), (terms.g_w, g_w)):
        np.testing.assert_allclose(b.to_numpy(mine), theirs, rtol=rtol * 10, atol=rtol * 10)
    assert np.abs(g_prior).max() > 1.0
    fitted = b.to_numpy(prior_update(b, terms))
    np.testing.assert_allclose(fitted**2, (mu**2 + var).mean(axis=0), rtol=rtol)
    assert oracle(fitted)[0] > value
    np.testing.assert_allclose(oracle(fitted)[-1], 0.0, atol=rtol * 100)


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
