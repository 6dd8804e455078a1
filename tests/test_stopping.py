"""Monte Carlo fits stop when they are done: on the averaged parameters' ELBO under fixed
noise, extrapolated to where it converges; never at a lucky draw."""

from __future__ import annotations

import numpy as np
import pytest

from pnmf import PNMF, make_counts
from pnmf.backends import get_backend
from pnmf.loop import CHECK_EVERY, SETTLE, TAIL, TAIL_STANDARD, has_settled
from pnmf.optim import Averaged

SEED = dict(E=10, random_state=42, prior_scale=1.0, backend="numpy", dtype="float64")


@pytest.fixture(scope="module")
def seed_counts():
    return make_counts(200, 100, 5, random_state=42)[0]


def first_stop(values, tol, tail=TAIL):
    """The first check count at which has_settled fires on the prefix of ``values``."""
    return next((n for n in range(1, len(values) + 1) if has_settled(list(values[:n]), tol, tail=tail)), None)


@pytest.mark.parametrize(
    "gap",
    [
        lambda t: 50.0 * 0.99**t,  # gains that decay geometrically
        lambda t: 200.0 / t,  # and as a power of t: the slow creep of a decaying step
    ],
    ids=["geometric", "power"],
)
def test_has_settled_fires_once_the_gain_still_to_come_is_under_tol(gap):
    t = CHECK_EVERY * np.arange(1, 3001)
    limit = -1000.0
    monitors = limit - gap(t)
    tol = 1e-4
    n = first_stop(monitors, tol)
    assert n is not None
    # Stopped within tol of the limit, and not long after the gap fell under it.
    assert gap(t[n - 1]) <= tol * abs(limit) * 1.2  # the windows end on checks: about
    crossed = np.argmax(gap(t) <= tol * abs(limit))
    assert n - 1 <= 2 * max(crossed, SETTLE // CHECK_EVERY)


def test_has_settled_does_not_take_a_transient_for_the_tail():
    # A fast transient (geometric) on top of a slow tail (1 / t): early on, the windows' gains
    # shrink fast, which alone extrapolates too short a remainder (the stop was 2.52 tol short
    # without the ratio's floor; 1.25 tol with it).
    t = CHECK_EVERY * np.arange(1, 3001)
    limit, tol = -1000.0, 1e-4
    gap = 300.0 * 0.97**t + 100.0 / t
    n = first_stop(limit - gap, tol)
    assert n is not None
    assert gap[n - 1] <= 1.5 * tol * abs(limit)


def test_adams_phase_assumes_the_faster_tail_of_its_average(seed_counts, monkeypatch):
    # A remaining distance that falls as t^-4 (the averaged iterates of a constant-rate fit):
    # the natural phases' assumption (no faster than t^-1.25) waits long after it is within
    # tol; Adam's (t^-2.5) stops sooner, still within tol.
    t = CHECK_EVERY * np.arange(1, 3001)
    limit, tol = -1000.0, 1e-4
    gap = 400.0 * (t / 150.0) ** -4.0
    natural, adam = first_stop(limit - gap, tol), first_stop(limit - gap, tol, TAIL_STANDARD)
    assert adam < natural and gap[adam - 1] <= tol * abs(limit)
    # The estimator gives standard training's phase that rule, and natural training's the other.
    import pnmf.loop as loop

    tails = []
    monkeypatch.setattr(loop, "has_settled", lambda monitors, tol, tail: tails.append(tail) or False)
    for training in ("standard", "natural"):
        PNMF(5, mode="expanded", training_mode=training, max_iter=300, **SEED).fit(seed_counts)
        assert set(tails) == {TAIL_STANDARD if training == "standard" else TAIL}
        tails.clear()


def test_has_settled_waits_for_settle_and_never_fires_at_tol_zero():
    flat = [-5.0] * 100
    assert not has_settled(flat[: SETTLE // CHECK_EVERY - 1], 1e-4)
    assert has_settled(flat[: SETTLE // CHECK_EVERY], 1e-4)
    assert not has_settled(flat, 0.0)
    # An ELBO that keeps climbing at a steady rate has not settled, however small each gain.
    assert not has_settled(list(-1000.0 + 1e-3 * np.arange(100)), 1e-4)
    # One that fell by more than tol has not either.
    falling = [-1000.0] * 31 + [-1000.5] * 9  # within the last window
    assert not has_settled(falling, 1e-4)


class Walk:
    """A stand-in trainer whose mean steps by +-1 each iteration (the rest fixed)."""

    def __init__(self, b):
        self.b, self.rng = b, np.random.default_rng(0)

    def init(self, mu, var, w, extra=None):
        return {"mu": mu, "var": var, "w": w}

    def step(self, state, key):
        return dict(state, mu=state["mu"] + self.rng.choice([-1.0, 1.0])), key, 0.0

    def params(self, state):
        return state["mu"], state["var"], state["w"], {}


def test_averaged_weights_the_last_iterates_by_the_polynomial_decay_rule():
    b = get_backend("numpy", dtype="float64")
    eta = 3.0
    walk = Walk(b)
    averaged = Averaged(walk, eta)
    state = averaged.init(np.zeros(1), np.ones(1), np.ones((1, 1)))
    iterates = []
    for _ in range(200):
        state, _, _ = averaged.step(state, None)
        iterates.append(float(state["mu"][0]))
    # The average is sum_t a_t x_t with a_t = c_t prod_{s > t} (1 - c_s), c_t = (eta + 1) / (t + eta).
    c = (eta + 1) / (np.arange(1, 201) + eta)
    weights = c * np.array([np.prod(1 - c[t + 1 :]) for t in range(200)])
    np.testing.assert_allclose(float(averaged.params(state)[0][0]), weights @ np.array(iterates), rtol=1e-12)
    # The first iterates are forgotten: the last quarter carries most of the weight.
    assert weights[150:].sum() > 0.6 and weights[:50].sum() < 0.01
    np.testing.assert_allclose(weights.sum(), 1.0)


@pytest.mark.parametrize("mode", ["expanded", "simple"])
def test_a_natural_monte_carlo_fit_stops_when_done_and_not_before(seed_counts, mode):
    """At tol=1e-4 it stops within 3x the iterations at which it first came within 1e-3 of
    the ELBO of a 2000-iteration fit, and within 1e-4 of that ELBO (the final ELBOs share
    their noise: the same seed)."""
    stopped = PNMF(5, mode=mode, training_mode="natural", tol=1e-4, max_iter=2000, **SEED).fit(seed_counts)
    whole = PNMF(5, mode=mode, training_mode="natural", tol=0, max_iter=2000, **SEED).fit(seed_counts)
    assert stopped.converged_ and stopped.n_iter_ < 2000
    assert (whole.elbo_ - stopped.elbo_) <= 1e-4 * abs(whole.elbo_)
    history = np.convolve(whole.elbo_history_, np.ones(10) / 10, mode="valid")
    reached = 10 + int(np.argmax(history >= whole.elbo_history_[-100:].mean() - 1e-3 * abs(whole.elbo_)))
    assert stopped.n_iter_ <= 3 * reached


def test_the_averaged_parameters_give_the_stopping_rule_a_smooth_elbo(seed_counts, monkeypatch):
    """What the rule reads, the fixed-noise ELBO at the averaged parameters, barely ever
    falls; at the last iterate it falls and rises by the iterates' jitter."""
    import pnmf.estimator as estimator
    import pnmf.loop as loop

    read = []
    monkeypatch.setattr(loop, "has_settled", lambda monitors, tol, **rule: read.append(list(monitors)) or False)
    falls, averaged = {}, estimator.AVERAGE_ETA
    for eta in (averaged, None):
        monkeypatch.setattr(estimator, "AVERAGE_ETA", eta)
        PNMF(5, mode="expanded", training_mode="natural", tol=1e-12, max_iter=1000, **SEED).fit(seed_counts)
        steps = np.diff(read[-1][20:])  # after the first 200 iterations of the phase
        falls[eta] = np.clip(-steps, 0, None).sum()
    assert falls[averaged] * 20 < falls[None]


def test_a_tolerance_under_the_noise_floor_runs_to_max_iter(seed_counts):
    """The per-step estimate's noise is far above tol * |ELBO|; the fit stops on neither it
    nor the fixed-noise estimate at the averaged parameters, which keeps creeping by more."""
    model = PNMF(5, mode="expanded", training_mode="natural", tol=1e-8, max_iter=600, **SEED).fit(seed_counts)
    assert model.n_iter_ == 600 and not model.converged_
    noise = np.std(np.diff(model.elbo_history_[-200:])) / np.sqrt(2)
    assert noise > 100 * 1e-8 * abs(model.elbo_)


def test_recentring_moves_along_the_symmetry_and_helps(seed_counts):
    """Natural Monte Carlo steps recentre every component (mean_n mu = 0 after the shift) and
    reach in 400 iterations what 8000 plain ones did not."""
    model = PNMF(5, mode="expanded", training_mode="natural", tol=0, max_iter=400, **SEED).fit(seed_counts)
    assert np.abs(model.mean_.mean(axis=0)).max() < 0.05
    # The figure 8000 steps without recentring reached on this data, same settings.
    assert model.elbo_ > -46066.9


def test_a_resumed_monte_carlo_fit_stops_where_an_uninterrupted_one_does(seed_counts, tmp_path):
    params = dict(mode="expanded", training_mode="natural", tol=1e-4, checkpoint_every=20, **SEED)
    path = tmp_path / "fit.npz"
    PNMF(5, max_iter=160, checkpoint=path, **params).fit(seed_counts)
    resumed = PNMF(5, max_iter=2000, checkpoint=path, **params).fit(seed_counts)
    whole = PNMF(5, max_iter=2000, **params).fit(seed_counts)
    assert resumed.converged_ and resumed.n_iter_ == whole.n_iter_
    np.testing.assert_array_equal(resumed.elbo_history_, whole.elbo_history_)
    np.testing.assert_array_equal(resumed.components_, whole.components_)


MINIBATCH = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, batch_size=200)


@pytest.fixture(scope="module")
def rows_counts():
    return make_counts(2000, 60, 5, random_state=3)[0]


def test_a_mini_batch_fit_stops_when_done_and_within_tol(rows_counts):
    """A step's ELBO is one batch's, scaled up to every row: its noise (0.9% of the ELBO
    here) would never let a rule on it stop at tol=1e-4. The rule reads one fixed batch's
    ELBO at the averaged loadings, and stops within tol of where a fit of 1500 steps ends."""
    stopped = PNMF(5, max_iter=2000, **MINIBATCH).fit(rows_counts)
    longer = PNMF(5, max_iter=1500, tol=0, **MINIBATCH).fit(rows_counts)
    assert stopped.converged_ and stopped.n_iter_ < 1000  # 740 measured
    assert longer.elbo_ - stopped.elbo_ <= 1e-4 * abs(longer.elbo_)  # 1.7e-6 measured
    noise = np.std(np.diff(stopped.elbo_history_[-100:])) / np.sqrt(2)
    assert noise > 10 * 1e-4 * abs(stopped.elbo_)


def test_a_mini_batch_fit_averages_its_loadings_for_a_smooth_monitor_and_a_higher_elbo(rows_counts, monkeypatch):
    """At the last iterate the monitor batch's ELBO falls and rises by W's jitter, as W follows
    each batch; at the average of the iterates it barely ever falls, and the fit ends higher."""
    import pnmf.loop as loop
    import pnmf.svi as svi

    read, falls, elbos, averaged = [], {}, {}, svi.AVERAGE_ETA
    monkeypatch.setattr(loop, "has_settled", lambda monitors, tol, **rule: read.append(list(monitors)) or False)
    for eta in (averaged, None):
        monkeypatch.setattr(svi, "AVERAGE_ETA", eta)
        elbos[eta] = PNMF(5, max_iter=600, tol=1e-12, **MINIBATCH).fit(rows_counts).elbo_
        assert len(read[-1]) == 60  # one reading every CHECK_EVERY steps
        falls[eta] = np.clip(-np.diff(read[-1][20:]), 0, None).sum()  # after the first 200 steps
    assert falls[averaged] * 100 < falls[None]  # 0.16 against 486 measured
    assert elbos[averaged] > elbos[None]  # -281,608 against -281,633
