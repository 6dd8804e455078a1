"""The natural-gradient step: its geometry, its positivity, its monotonicity."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from pnmf import PNMF, make_counts, poisson_deviance
from pnmf.elbo import MODES, as_counts, evaluate
from pnmf.natural import RHO_FLOOR, checked_step, natural_update
from pnmf.optim import multiplicative_loadings
from pnmf.scaling import RowEffects

from .conftest import BACKENDS, cpu_backend, lower_bound_at, small_problem


def _gaussian_fisher(mu: float, var: float) -> np.ndarray:
    """Fisher information of Normal(mu, var) in its natural parameters: Cov of (x, x^2)."""
    return np.array([[var, 2 * mu * var], [2 * mu * var, 2 * var**2 + 4 * mu**2 * var]])


def test_step_is_the_fisher_preconditioned_gradient():
    x, mu, var, w, _ = small_problem(seed=10)
    b = cpu_backend("numpy")
    terms = evaluate(as_counts(b, x), mu, var, w, mode="lower-bound", noise=None, n_samples=1)
    rho = 0.3
    new_mu, new_precision = natural_update(
        b, mu, 1 / var, terms.g_mu, terms.g_var, rho, improved=False, max_mean_step=None
    )
    for n, l in [(0, 0), (3, 1), (8, 2)]:
        m, v = mu[n, l], var[n, l]
        eta = np.array([m / v, -1 / (2 * v)])
        # d(mu, var)/d(eta) and the chain rule give the gradient in natural parameters.
        jacobian = np.array([[v, eta[0] / (2 * eta[1] ** 2)], [0.0, 1 / (2 * eta[1] ** 2)]])
        grad_eta = jacobian.T @ np.array([terms.g_mu[n, l], terms.g_var[n, l]])
        eta_new = eta + rho * np.linalg.solve(_gaussian_fisher(m, v), grad_eta)
        precision = -2 * eta_new[1]
        assert new_precision[n, l] == pytest.approx(precision, rel=1e-9)
        assert new_mu[n, l] == pytest.approx(eta_new[0] / precision, rel=1e-9)


@pytest.mark.parametrize("prior_scale", [0.5, 1.0, 3.0])
def test_full_step_on_the_kl_term_lands_on_the_prior(prior_scale):
    torch = pytest.importorskip("torch")
    from pnmf.elbo import kl_divergence

    rng = np.random.default_rng(11)
    mu = torch.tensor(rng.normal(0, 2.0, (5, 3)), requires_grad=True)
    var = torch.tensor(rng.uniform(0.1, 4.0, (5, 3)), requires_grad=True)
    elbo = -kl_divergence(cpu_backend("torch"), mu, var, prior_scale)
    elbo.backward()
    b = cpu_backend("numpy")
    new_mu, new_precision = natural_update(
        b,
        mu.detach().numpy(),
        1 / var.detach().numpy(),
        mu.grad.numpy(),
        var.grad.numpy(),
        1.0,
        improved=False,
        max_mean_step=None,
    )
    np.testing.assert_allclose(new_mu, 0.0, atol=1e-12)
    np.testing.assert_allclose(new_precision, 1 / prior_scale**2, rtol=1e-12)


@pytest.mark.parametrize("rho", [1e-3, 0.5, 1.0])
def test_improved_rule_keeps_precision_positive_under_adversarial_gradients(rho):
    rng = np.random.default_rng(12)
    b = cpu_backend("numpy")
    precision = 10.0 ** rng.uniform(-4, 4, (1000, 2))
    g_var = rng.choice([-1, 1], size=precision.shape) * 10.0 ** rng.uniform(-6, 8, precision.shape)
    g_mu = rng.normal(0, 1e6, precision.shape)
    mu, new_precision = natural_update(b, np.zeros_like(precision), precision, g_mu, g_var, rho, improved=True)
    assert np.all(new_precision > 0) and np.all(np.isfinite(new_precision))
    assert np.all(np.abs(mu) <= 1.0)  # the trust region on the mean


@pytest.mark.parametrize("mode", MODES)
def test_full_natural_steps_on_large_counts_stay_finite(backend_name, mode):
    x, _, _ = make_counts(30, 20, 3, random_state=1)
    x = x * 1000  # counts in the tens of thousands
    model = PNMF(
        3,
        mode=mode,
        training_mode="natural",
        ngd_lr=1.0,
        backend=backend_name,
        max_iter=60,
        random_state=0,
        dtype="float64" if backend_name != "mlx" else "float32",
    ).fit(x)
    assert np.all(model.var_ > 0) and np.all(np.isfinite(model.var_))
    assert np.all(np.isfinite(model.mean_)) and np.isfinite(model.elbo_)
    assert np.all(np.isfinite(model.elbo_history_))


def test_multiplicative_update_never_lowers_the_lower_bound():
    """The loadings update is the maximiser of a minorant: it cannot lower the Jensen bound."""
    b = cpu_backend("numpy")
    for seed in range(5):
        x, mu, var, w, _ = small_problem(seed=seed, n=15, d=12)
        counts = as_counts(b, x)
        for _ in range(5):
            terms = evaluate(counts, mu, var, w, mode="lower-bound", noise=None, n_samples=1)
            w = multiplicative_loadings(b, w, terms)
            assert evaluate(counts, mu, var, w, mode="lower-bound", noise=None, n_samples=1).value >= terms.value


def test_loadings_and_batch_effects_updates_never_lower_the_lower_bound():
    """With size factors and batches: W's multiplicative update, then g's closed form, each raise the bound."""
    b = cpu_backend("numpy")
    for seed in range(5):
        x, mu, var, w, _ = small_problem(seed=seed, n=15, d=12)
        rng = np.random.default_rng(seed)
        effects = RowEffects(np.exp(rng.normal(0, 0.6, 15)), np.arange(15) % 3, np.ones((3, 12)))
        counts = as_counts(b, x, scaling=effects.scaling(b, x))
        g = effects.g
        values = []
        for _ in range(5):
            terms = evaluate(counts, mu, var, w, g, mode="lower-bound", noise=None, n_samples=1)
            values.append(float(terms.value))
            w = multiplicative_loadings(b, w, terms, g)
            values.append(float(evaluate(counts, mu, var, w, g, mode="lower-bound", noise=None, n_samples=1).value))
            g = counts.scaling.update(g, w, terms.expected_sum)
        assert np.all(np.diff(values) >= -1e-12 * np.abs(values[0]))
        assert values[-1] > values[0] + 1.0


@pytest.mark.parametrize("name", BACKENDS)
def test_lower_bound_natural_fit_never_decreases(name):
    x, _, _ = make_counts(random_state=3)
    params = dict(mode="lower-bound", training_mode="natural", device="cpu", max_iter=300, tol=0, random_state=0)
    # MLX's float64 exp and log are only about float32-accurate: its float64 is checked as float32.
    model = PNMF(5, dtype="float64", backend="numpy" if name == "mlx" else name, **params).fit(x)
    history = model.elbo_history_
    assert len(history) == 300
    assert np.all(np.diff(history) >= -1e-14 * np.abs(history[1:]))
    # The steps are good ones: most of them are taken, and the fit climbs far.
    assert np.mean(np.diff(history) > 0) > 0.9
    assert history[-1] - history[0] > 0.5 * abs(history[-1])
    # The reported ELBO is that of the returned parameters.
    recomputed = lower_bound_at(x, model)
    assert model.elbo_ == pytest.approx(recomputed, rel=1e-10)
    assert history[-1] == pytest.approx(recomputed, rel=1e-10)
    # In float32 a step may "lose" up to float rounding, and the fit ends where float64's does.
    single = PNMF(5, dtype="float32", backend=name, **params).fit(x).elbo_history_
    assert np.all(np.diff(single) >= -1e-6 * np.abs(single[1:]))
    assert single[-1] == pytest.approx(history[-1], rel=1e-4)


def test_natural_training_beats_standard_in_few_iterations():
    x, _, _ = make_counts(random_state=4)
    common = dict(mode="lower-bound", backend="numpy", max_iter=200, tol=0, random_state=0)
    natural = PNMF(5, training_mode="natural", **common).fit(x)
    standard = PNMF(5, training_mode="standard", learning_rate=0.005, **common).fit(x)
    assert natural.elbo_history_[0] == pytest.approx(standard.elbo_history_[0], rel=1e-6)  # same start
    assert natural.elbo_ > standard.elbo_ + 0.01 * abs(standard.elbo_)


@pytest.mark.parametrize("name", BACKENDS)
def test_float32_lower_bound_fit_ends_where_float64_does(name):
    """Float32 rounding in the ELBO must not stop checked steps early (seed setting)."""
    x, _, _ = make_counts(200, 100, 5, random_state=42)
    params = dict(mode="lower-bound", training_mode="natural", tol=1e-6, max_iter=3000, random_state=42)
    reference = PNMF(5, backend="numpy", dtype="float64", **params).fit(x)
    model = PNMF(5, backend=name, device="cpu", dtype="float32", **params).fit(x)
    assert model.converged_
    # Near the optimum the steps of mu and W fall below float32's resolution and round away:
    # float32 parameters settle 2.5e-5 (NumPy) to 5.2e-5 (MLX on the CPU) below float64's
    # optimum on this machine. A stall from ELBO rounding in the checked steps (as with
    # torch.mv's float32 dot) stopped fits at about half of their steps, far lower.
    assert lower_bound_at(x, model) >= reference.elbo_ - 1e-4 * abs(reference.elbo_)


def test_loadings_momentum_speeds_the_monte_carlo_phase(monkeypatch):
    # q(F) and W settle together slowly; momentum on the loadings' update moves along that
    # slow direction. Same data, seed and iterations (100 of them the lower-bound warm start,
    # identical in both): the fit with momentum is ahead (measured: 20 nats at 200 iterations).
    import pnmf.natural

    x = make_counts(600, 200, 6, random_state=3)[0]
    params = dict(n_components=6, mode="expanded", max_iter=200, tol=0, random_state=0, backend="numpy")
    params["dtype"] = "float64"
    with_momentum = PNMF(**params).fit(x).elbo_
    monkeypatch.setattr(pnmf.natural, "LOADINGS_MOMENTUM", 0.0)
    without = PNMF(**params).fit(x).elbo_
    assert with_momentum > without + 10.0


@pytest.mark.parametrize("mode", ["expanded", "simple"])
def test_loadings_momentum_keeps_an_unseen_feature_at_zero(mode):
    x = make_counts(150, 40, 3, random_state=1)[0]
    x[:, 7] = 0.0
    model = PNMF(n_components=3, mode=mode, max_iter=150, tol=0, random_state=0, backend="numpy").fit(x)
    assert np.all(np.isfinite(model.loadings_))
    assert np.all(model.loadings_[7] == 0.0)
    assert np.all(model.loadings_[np.arange(40) != 7] > 0.0)


def _large_counts(n: int, d: int, scale: float, seed: int = 0) -> np.ndarray:
    """Counts ~Poisson(scale * H @ W.T), 5 programs: ~scale where a program is active."""
    rng = np.random.default_rng(seed)
    w, h = rng.gamma(0.3, 1.0, (d, 5)), rng.gamma(1.0, 1.0, (n, 5))
    return rng.poisson(scale * h @ w.T).astype(np.float64)


def _deviance(x: np.ndarray, model) -> float:
    """The Poisson deviance of x at the fit's posterior-mean rate."""
    return poisson_deviance(x, np.exp(model.mean_ + 0.5 * model.var_) @ model.loadings_.T)


def test_a_checked_step_at_the_floor_of_rho_is_taken_whatever_its_value():
    b = cpu_backend("numpy")
    state = dict(mu=b.asarray(np.ones(3)), accepted_mu=b.asarray(np.zeros(3)), accepted_value=b.scalar(-1000.0))
    fall = b.scalar(-1100.0)  # far beyond float64 rounding
    taken = checked_step(b, dict(state, rho=b.scalar(RHO_FLOOR)), fall, {}, 1e-15, 1.0)
    assert np.array_equal(b.to_numpy(taken["accepted_mu"]), np.ones(3))
    assert float(taken["accepted_value"]) == -1100.0 and float(taken["rho"]) == 2 * RHO_FLOOR
    refused = checked_step(b, dict(state, rho=b.scalar(2 * RHO_FLOOR)), fall, {}, 1e-15, 1.0)
    assert np.array_equal(b.to_numpy(refused["accepted_mu"]), np.zeros(3))
    assert float(refused["accepted_value"]) == -1000.0 and float(refused["rho"]) == RHO_FLOOR


@pytest.mark.parametrize("name", BACKENDS)
def test_float32_fits_of_large_counts_keep_moving(name):
    """With counts ~1000 float32 rounds the ELBO by tens, more than a late step gains: steps
    looked like falls, rho halved to nothing and the multiplicative update, which rho does
    not shrink, brought back the same rejected step (the last 120 of 600 iterations flat)."""
    x = _large_counts(200, 100, 1e3)
    model = PNMF(5, backend=name, device="cpu", tol=0, max_iter=600, random_state=0).fit(x)
    flat = max(len(list(run)) for _, run in itertools.groupby(model.elbo_history_))
    assert flat <= 12  # ten halvings of rho, then a step is taken


def test_float32_fit_of_large_counts_ends_near_float64_and_says_when_it_may_not():
    """The float32 fit of counts ~1000 stopped with a deviance 1.36x the float64 fit's (the
    ELBO's rounding hid the steps' gains); it now ends within 10% and warns that float64
    resolves it, where counts ~100 fit as float64 does without a warning."""
    x = _large_counts(500, 300, 1e3)
    with pytest.warns(ConvergenceWarning, match="dtype='float64'"):
        single = PNMF(5, random_state=0).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        double = PNMF(5, dtype="float64", random_state=0).fit(x)
        small = _large_counts(500, 300, 100.0)
        PNMF(5, random_state=0).fit(small)
    assert _deviance(x, single) <= 1.1 * _deviance(x, double)
