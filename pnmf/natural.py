"""Natural-gradient ascent on q(F) (DESIGN §3, ``training_mode='natural'``).

For a Gaussian, the natural gradient with respect to the natural parameters
(mu / var, -1 / (2 var)) is the ordinary gradient with respect to the expectation
parameters (mu, mu^2 + var). In (mu, precision) coordinates, with g_mu = dELBO/dmu,
g_var = dELBO/dvar and step rho::

    precision_new = precision - 2 rho g_var
    mu_new        = mu + rho g_mu / precision_new

``rho`` is a step on the gradient of the *total* ELBO, a sum over samples. Each row of
q(F) sees only its own row of X, so rho in (0, 1] means the same for 10 rows or 10^6:
no 1/N factor belongs here (that factor belongs to losses written as a per-sample mean).
rho = 1 on the KL term alone lands exactly on the prior.

In ``lower-bound`` mode the likelihood's g_var is negative, so for 0 < rho <= 1 the new
precision is a convex combination of positive numbers. The Monte Carlo modes estimate
g_var with Price's theorem and its likelihood part can be positive, so they use the
improved Bayesian learning rule (Lin, Schmidt & Khan, 2020), positive for every rho::

    G = -2 g_var,  precision_new = precision + rho G + (rho G)^2 / (2 precision)
"""

from __future__ import annotations

import math

import numpy as np

from .backends.base import Array, Backend
from .elbo import MEAN_BOUND, VAR_BOUNDS, Noise, evaluate, prior_update
from .optim import EXTRA, LOADING_FLOOR, Trainer, floor_loadings, loadings_state, update_loadings

# Largest change of one mean per step: at most a factor e on the scale of exp(F).
MAX_MEAN_STEP = 1.0
# Heavy-ball momentum of the Monte Carlo steps' multiplicative loadings update (see step), and
# the largest change of log W per step: at most a factor e^0.3.
LOADINGS_MOMENTUM, MAX_LOG_STEP = 0.9, 0.3
# Robbins-Monro schedule of the Monte Carlo modes: rho_t = rho0 (1 + t / TAU) ** -KAPPA.
SCHEDULE_TAU, SCHEDULE_KAPPA = 50.0, 0.7
# A checked step may lower the ELBO by at most this many float epsilons (relative),
ROUNDING = 8
# unless its rho has been halved to this: such a step is an ascent step in exact arithmetic
# (the multiplicative update is one at any rho, and rho -> 0 makes the step on q(F) the
# gradient's first order), so a fall is float rounding of the ELBO's sums, which large
# counts make far larger than eps |ELBO| (see checked_step).
RHO_FLOOR = 2.0**-10
DEFAULT_NGD_LR = {"lower-bound": 1.0, "expanded": 0.2, "simple": 0.2}
# The parameters a checked step keeps the last accepted value of.
PARAMS = ("mu", "precision", "w", *EXTRA)


def natural_update(
    b: Backend,
    mu: Array,
    precision: Array,
    g_mu: Array,
    g_var: Array,
    rho,
    *,
    improved: bool,
    max_mean_step: float | None = MAX_MEAN_STEP,
) -> tuple[Array, Array]:
    """One natural-gradient step on q(F) = Normal(mu, 1 / precision), elementwise.

    ``improved`` adds the improved-BLR term (rho G)^2 / (2 precision), G = -2 g_var,
    which keeps the precision positive whatever the sign of g_var. ``max_mean_step``
    clips each mean step to [-max_mean_step, max_mean_step] (a trust region: far from the
    optimum the step is a Newton step on a*mu - b*exp(mu), which overshoots).
    """
    step_g = -2.0 * rho * g_var
    if improved:
        precision_new = precision + step_g + step_g * step_g / (2.0 * precision)
    else:
        precision_new = precision + step_g
    mean_step = rho * g_mu / precision_new
    if max_mean_step is not None:
        mean_step = b.clip(mean_step, -max_mean_step, max_mean_step)
    return mu + mean_step, precision_new


def checked_step(
    b: Backend, state: dict, value: Array, fresh: dict, rounding: float, rho0: float, active: Array | None = None
) -> dict:
    """The bookkeeping of a checked step: the state's entries that follow from whether the
    ELBO ``value`` at the state's parameters is acceptable.

    accept = value >= accepted_value - rounding * max(-accepted_value, 0), or the state's
    rho <= RHO_FLOOR (and ``active``); where accepted, every ``accepted_<p>`` (p in PARAMS)
    takes the state's p, the statistics in ``fresh`` replace the state's, ``accepted_value``
    takes ``value`` and rho doubles (up to ``rho0``); elsewhere they stay and rho halves, or
    stays too where not ``active``. ``value`` is one number, or one per lane (R,) for arrays
    whose first axis is the lanes.

    The floor keeps a fit moving where the ELBO's float rounding exceeds what a step gains:
    with counts in the thousands the ELBO is the difference of sums ~1e3 times larger, and
    in float32 its value moved by hundreds between points a float64 evaluation put tens
    apart; every step then looked like a fall, rho halved to nothing, and, the multiplicative
    update not shrinking with rho, the same rejected step came back forever.
    """
    slack = rounding * b.clip(-state["accepted_value"], 0.0, None)
    accept = (value >= state["accepted_value"] - slack) | (state["rho"] <= RHO_FLOOR)
    if active is not None:
        accept = accept & active

    def where(new: Array, old: Array) -> Array:
        flag = accept if accept.ndim == 0 else accept.reshape(tuple(accept.shape) + (1,) * (new.ndim - accept.ndim))
        return b.where(flag, new, old)

    update = {"accepted_" + k: where(state[k], state["accepted_" + k]) for k in PARAMS if k in state}
    update.update({k: where(v, state[k]) for k, v in fresh.items()})
    update["accepted_value"] = where(value, state["accepted_value"])
    rho = state["rho"]
    update["rho"] = where(b.clip(2.0 * rho, None, rho0), 0.5 * rho)
    if active is not None:
        update["rho"] = b.where(active, update["rho"], rho)
    return update


class NaturalTrainer(Trainer):
    """Natural steps on q(F); loadings by the multiplicative update or by Adam.

    ``lower-bound`` is deterministic, so with the multiplicative loadings update (or fixed
    loadings) each step is checked: a step that lowers the ELBO is rejected and rho halved
    (and regrown up to ``ngd_lr`` after accepted steps). The reported ELBO is that of the
    accepted parameters, which therefore never decreases by more than float rounding
    (8 eps |ELBO|: 1e-6 relative in float32, 2e-15 in float64; or, where a step is taken at
    RHO_FLOOR, the rounding of the sums it is the difference of). With Adam on the loadings rho
    stays at ``ngd_lr``. The Monte Carlo modes follow the schedule
    rho_t = ngd_lr (1 + t / 50) ** -0.7, are best started from a lower-bound fit, and give
    the multiplicative loadings update heavy-ball momentum on log W (LOADINGS_MOMENTUM,
    each entry's step capped at MAX_LOG_STEP).
    """

    def __init__(self, counts, *, ngd_lr, **settings):
        super().__init__(counts, **settings)
        self.rho0 = DEFAULT_NGD_LR[self.mode] if ngd_lr is None else ngd_lr
        # Adam's loadings step does not shrink with rho, so only the multiplicative rule is checked.
        self.checked = self.mode == "lower-bound" and (self.rule == "multiplicative" or not self.fit_loadings)
        # Monte Carlo steps recentre each component (see step): without it the fit creeps along
        # the exp(F) / W symmetry at the decaying rho long after its loadings have settled;
        self.recentre = self.mode != "lower-bound" and self.fit_loadings
        # and their multiplicative loadings update carries momentum (see step).
        self.momentum = LOADINGS_MOMENTUM if self.recentre and self.rule == "multiplicative" else 0.0
        # Float rounding makes a sum of 1e5 terms uncertain by ~eps * |ELBO|: a smaller "loss"
        # is noise, and rejecting it would stall a float32 fit short of its optimum.
        self.rounding = float(ROUNDING * np.finfo(self.b.dtype).eps)

    def init(self, mu: Array, var: Array, w: Array, extra: dict | None = None) -> dict:
        b = self.b
        state = {"mu": mu, "precision": 1.0 / var, "w": w, "t": b.scalar(0.0), **(extra or {})}
        if self.fit_loadings:
            state.update(loadings_state(b, w, self.rule))
        if self.momentum:
            state["velocity"] = b.zeros_like(w)
        if self.checked:
            g = state.get("g")
            state.update(
                rho=b.scalar(self.rho0),
                accepted_value=b.scalar(-math.inf),
                **{"accepted_" + k: v for k, v in state.items() if k in PARAMS},
                **{k: b.zeros_like(mu) for k in ("g_mu", "g_var")},
                expected_sum=b.zeros_like(w[0] if g is None else g @ w),
            )
            if self.fit_loadings:
                state["w_numerator"] = b.zeros_like(w)
            if self.learns_prior(state):
                state.update(prior_sum=b.zeros_like(w[0]), rows=b.scalar(0.0))
        return state

    def params(self, state: dict) -> tuple[Array, Array, Array, dict]:
        prefix = "accepted_" if self.checked else ""
        extra = {k: state[prefix + k] for k in EXTRA if prefix + k in state}
        return state[prefix + "mu"], 1.0 / state[prefix + "precision"], state[prefix + "w"], extra

    def step(self, state: dict, key):
        b = self.b
        mu, precision, w = state["mu"], state["precision"], state["w"]
        g, prior = state.get("g"), state.get("prior", self.prior_scale)
        noise = Noise(b, key)
        terms = evaluate(
            self.counts,
            mu,
            1.0 / precision,
            w,
            g,
            mode=self.mode,
            noise=noise,
            n_samples=self.n_samples,
            prior_scale=prior,
            var_gradient="price",
            control_variate=True,
            row_statistics=self.learns_prior(state) or self.recentre,
            loadings=self.fit_loadings,
        )
        t = state["t"] + 1
        new = dict(state, t=t)
        if self.checked:
            # Step from the last accepted point: the new one if the ELBO did not fall (up to
            # rounding), else the old one.
            statistics = (
                ("g_mu", "g_var", "expected_sum")
                + (("w_numerator",) if self.fit_loadings else ())
                + (("prior_sum", "rows") if self.learns_prior(state) else ())
            )
            fresh = {name: getattr(terms, name) for name in statistics}
            new.update(checked_step(b, state, terms.value, fresh, self.rounding, self.rho0))
            for name in statistics:
                setattr(terms, name, new[name])
            rho, reported = new["rho"], new["accepted_value"]
            mu, precision, w = new["accepted_mu"], new["accepted_precision"], new["accepted_w"]
            g = new.get("accepted_g")
        elif self.mode == "lower-bound":
            rho, reported = self.rho0, terms.value
        else:
            rho, reported = self.rho0 * (1.0 + t / SCHEDULE_TAU) ** -SCHEDULE_KAPPA, terms.value
        new_mu, new_precision = natural_update(
            b, mu, precision, terms.g_mu, terms.g_var, rho, improved=not self.checked
        )
        new["mu"] = b.clip(new_mu, -MEAN_BOUND, MEAN_BOUND)
        new["precision"] = b.clip(new_precision, 1.0 / VAR_BOUNDS[1], 1.0 / VAR_BOUNDS[0])
        if self.fit_loadings:
            new["w"], moments = update_loadings(b, dict(state, w=w, g=g), terms, t, self.rule, self.lr)
            new.update(moments)
            if self.momentum:
                # Heavy ball on log W: velocity = beta velocity + log(W_mu / W), W <- W e^velocity,
                # each entry's change capped at MAX_LOG_STEP. q(F) and W settle together slowly
                # (the slow mode of alternating updates); momentum along it halved the Monte Carlo
                # phase on the sparse benchmark set. A zero loading (a feature never seen) stays zero.
                bound = math.exp(MAX_LOG_STEP)
                ratio = b.where(w > 0, b.clip(new["w"] / b.clip(w, LOADING_FLOOR, None), 1.0 / bound, bound), 1.0)
                new["velocity"] = b.clip(self.momentum * state["velocity"] + b.log(ratio), -MAX_LOG_STEP, MAX_LOG_STEP)
                new["w"] = w * b.exp(new["velocity"])
        if self.fit_batches:
            new["g"] = self.counts.scaling.update(g, new["w"], terms.expected_sum)
        if self.learns_prior(state):
            new["prior"] = prior_update(b, terms)
        if self.recentre:
            # exp(F - a) W e^a = exp(F) W: shifting a component's means by a and scaling its
            # loadings by e^a leaves every rate, sampled or expected, as it was; a = mean_n mu
            # minimises the KL term along that line.
            shift = terms.mu_sum / terms.rows
            new["mu"] = b.clip(new["mu"] - shift, -MEAN_BOUND, MEAN_BOUND)
            new["w"] = floor_loadings(b, new["w"] * b.exp(shift))
        return new, noise.key, reported
