"""Adam against torch.optim.Adam, the oracle, and the standard trainer's parameter layout."""

from __future__ import annotations

import numpy as np
import pytest

from pnmf.optim import adam, adam_scales

from .conftest import cpu_backend, small_problem


def test_adam_matches_torch_adam_ascent():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    b = cpu_backend("numpy", "float64")
    start = rng.normal(size=(4, 3))
    grads = rng.normal(scale=[[1e-3], [1.0], [10.0], [1e3]], size=(6, 4, 3))  # gradients of every scale
    oracle = torch.nn.Parameter(torch.tensor(start))
    optimizer = torch.optim.Adam([oracle], lr=0.01, betas=(0.9, 0.999), eps=1e-8, maximize=True)
    param, m, v = start, np.zeros_like(start), np.zeros_like(start)
    for t, grad in enumerate(grads, start=1):
        oracle.grad = torch.tensor(grad)
        optimizer.step()
        param, m, v = adam(b, param, grad, m, v, adam_scales(b.scalar(float(t)), 0.01))
        np.testing.assert_allclose(param, oracle.detach().numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule", ["adam", "multiplicative"])
def test_standard_trainer_keeps_its_parameters_in_one_array(rule):
    """init and params round-trip (mu, var, W); a step moves every part and keeps the bounds."""
    from pnmf.elbo import MEAN_BOUND, VAR_BOUNDS, as_counts
    from pnmf.optim import StandardTrainer

    x, mu, var, w, _ = small_problem(seed=3)
    b = cpu_backend("numpy", "float64")
    trainer = StandardTrainer(
        as_counts(b, x),
        mode="lower-bound",
        n_samples=1,
        prior_scale=1.0,
        learning_rate=50.0,  # steps far past the bounds
        loadings_update=rule,
        update_loadings=True,
    )
    state = trainer.init(mu, var, w)
    *params, extra = trainer.params(state)
    assert extra == {}  # no batch effects, a fixed prior
    for got, want in zip(params, (mu, var, w), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    new, _, _ = trainer.step(state, b.key(0))
    new_mu, new_var, new_w, _ = trainer.params(new)
    for got, old in zip((new_mu, new_var, new_w), (mu, var, w), strict=True):
        assert not np.allclose(got, old)
    assert np.all(np.abs(new_mu) <= MEAN_BOUND)
    assert np.all((new_var >= VAR_BOUNDS[0] * (1 - 1e-9)) & (new_var <= VAR_BOUNDS[1] * (1 + 1e-9)))
    assert np.isclose(np.abs(new_mu), MEAN_BOUND).any() or np.isclose(new_var, VAR_BOUNDS).any()
    assert np.all(new_w > 0)


@pytest.mark.parametrize("mode", ["lower-bound", "expanded"])
def test_unused_loadings_stop_at_the_floor_not_in_the_subnormals(backend_name, mode):
    """The multiplicative update shrinks a loading that a component does not use at every
    step; in float32 it reached the subnormal range (slow arithmetic on x86) and then 0, where
    it could never grow back. Held at LOADING_FLOOR, it stays a normal positive number,
    while the loadings of features without any counts stay exactly 0."""
    from pnmf import PNMF
    from pnmf.data import make_counts
    from pnmf.optim import LOADING_FLOOR

    x, _, _ = make_counts(300, 100, 4, loading_shape=0.05, random_state=0)
    counted = x.sum(axis=0) > 0
    assert not counted.all()
    model = PNMF(4, mode=mode, backend=backend_name, dtype="float32", max_iter=300, tol=0, random_state=0).fit(x)
    w = model.loadings_
    assert np.all(w[~counted] == 0)
    assert np.all(w[counted] >= np.float32(LOADING_FLOOR) * (1 - 1e-6))
    assert np.any(w[counted] < 1e-20)  # some loadings did shrink to the floor
