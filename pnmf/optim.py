"""Adam and the multiplicative loadings update on the array interface, and the standard trainer.

Everything here is ascent on the ELBO and is written once for every backend.
"""

from __future__ import annotations

import math

import numpy as np

from .backends.base import Array, Backend
from .elbo import MEAN_BOUND, VAR_BOUNDS, DenseCounts, Noise, Terms, evaluate, prior_update, rate_denominator

LOADINGS_UPDATES = ("adam", "multiplicative")
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
LOG_SD_BOUNDS = tuple(0.5 * math.log(v) for v in VAR_BOUNDS)
# Fitted parameters besides q(F) and W, where the model has them: batch effects g (B, D) and
# a per-component prior scale (L,) (prior_scale='auto'). Trainers carry them in their state.
EXTRA = ("g", "prior")
TINY_DENOMINATOR = 1e-30  # the loadings' update where a feature has no expected rate at all
# The least a positive loading can be. The multiplicative update shrinks the loadings of a
# feature that a component does not use by a factor at every step, down into float32's
# subnormal range, whose arithmetic x86 CPUs do many times slower: a float32 fit of
# 5,000 x 2,000 counts (3% non-zero) went from 7 ms an iteration over its first 300
# iterations to 30 ms by iteration 700, with 4,055 loadings under 1.2e-38 there. Held at
# the floor, such a loading adds nothing that a float sum of rates can show, and can still
# grow back.
LOADING_FLOOR = 1e-30
MONITOR_SEED = 7919  # the fixed noise of Trainer.monitor
AVERAGE = "average_"  # the prefix of the averaged parameters in an Averaged trainer's state


def adam_scales(t: Array, lr: float) -> tuple[Array, Array]:
    """Adam's bias corrections at step count t >= 1 folded into a step size and an epsilon.

    lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
      = [lr sqrt(1 - b2^t) / (1 - b1^t)] * m / (sqrt(v) + eps sqrt(1 - b2^t)),
    the same step with the two scalars computed once for every parameter of a step.
    """
    root = (1 - BETA2**t) ** 0.5
    return lr * root / (1 - BETA1**t), ADAM_EPS * root


def adam(b: Backend, param: Array, grad: Array, m: Array, v: Array, scales: tuple[Array, Array]):
    """One Adam ascent step (Kingma & Ba 2015), with ``scales = adam_scales(t, lr)``.

    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
    param <- param + lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    step, eps = scales
    m = BETA1 * m + (1 - BETA1) * grad
    v = BETA2 * v + (1 - BETA2) * (grad * grad)
    return param + step * m / (b.sqrt(v) + eps), m, v


def multiplicative_loadings(b: Backend, w: Array, terms: Terms, g: Array | None = None) -> Array:
    """The exact maximiser in W of the Jensen bound for fixed q(F) (KL-NMF fixed point).

    W <- W * [sum_n (X / rate) exp(F)] / sum_n exp(mu + var/2), the numerator averaged
    over the Monte Carlo samples in the sampled modes; ``terms`` evaluated at (q(F), W).
    With size factors and batch effects g (B, D) the denominator is g.T @ S (D, L),
    S[b, l] = sum_{n in b} s[n] exp(mu + var/2)[n, l]. A feature whose every batch effect
    is 0 (no counts in any batch) has a denominator of 0, and its loadings go to 0.
    The result is held at LOADING_FLOOR or above where positive (:func:`floor_loadings`).
    """
    new = w * terms.w_numerator / b.clip(rate_denominator(b, g, terms.expected_sum), TINY_DENOMINATOR, None)
    return floor_loadings(b, new)


def floor_loadings(b: Backend, w: Array) -> Array:
    """W with every positive entry at LOADING_FLOOR or above; a zero (a feature without
    counts) stays zero."""
    return b.where(w > 0, b.clip(w, LOADING_FLOOR, None), w)


def loadings_state(b: Backend, w: Array, rule: str) -> dict:
    """The optimiser state the loadings update ``rule`` carries besides W."""
    return {"m_w": b.zeros_like(w), "v_w": b.zeros_like(w)} if rule == "adam" else {}


def update_loadings(b: Backend, state: dict, terms: Terms, t: Array, rule: str, lr: float):
    """W after one step of ``rule``; Adam works on log W, so W stays positive."""
    w = state["w"]
    if rule == "multiplicative":
        return multiplicative_loadings(b, w, terms, state.get("g")), {}
    log_w, m, v = adam(b, b.log(w), terms.g_w * w, state["m_w"], state["v_w"], adam_scales(t, lr))
    return floor_loadings(b, b.exp(log_w)), {"m_w": m, "v_w": v}


class Trainer:
    """What every full-batch trainer holds: the counts, the ELBO's mode and samples, the prior
    scale, and how the loadings (``update_loadings``), batch effects (``update_batches``) and
    a per-component prior scale carried in the state (``update_prior``) move."""

    def __init__(
        self,
        counts,
        *,
        mode,
        n_samples,
        prior_scale,
        learning_rate,
        loadings_update,
        update_loadings,
        update_batches=False,
        update_prior=True,
    ):
        self.counts = counts
        self.b = counts.backend
        self.mode = mode
        self.n_samples = n_samples
        self.prior_scale = prior_scale
        self.lr = learning_rate
        self.rule = loadings_update
        self.fit_loadings = update_loadings
        self.fit_batches = update_batches
        self.fit_prior = update_prior

    def learns_prior(self, state: dict) -> bool:
        """Whether a step fits the per-component prior scale that ``state`` carries."""
        return self.fit_prior and "prior" in state

    @property
    def capturable(self) -> bool:
        """Whether a step may be recorded once and replayed (a CUDA graph; see
        :meth:`Backend.compile`): dense counts on one process. A distributed step's all-reduce
        is not recorded, nor a sparse step, whose replay has not been checked on a GPU."""
        return isinstance(self.counts, DenseCounts) and self.counts.group is None

    def monitor(self, state: dict) -> Array:
        """The ELBO at the state's parameters, estimated with the same noise at every call
        (common random numbers): what the stopping rule of a Monte Carlo fit reads."""
        return self.fixed_noise_elbo(*self.params(state))

    def fixed_noise_elbo(self, mu: Array, var: Array, w: Array, extra: dict) -> Array:
        """The ELBO at (mu, var, W, extra) under the noise of seed MONITOR_SEED (see monitor)."""
        b = self.b
        return evaluate(
            self.counts,
            mu,
            var,
            w,
            extra.get("g"),
            mode=self.mode,
            noise=Noise(b, b.key(MONITOR_SEED), antithetic=False),
            n_samples=self.n_samples,
            prior_scale=extra.get("prior", self.prior_scale),
            gradients=False,
            control_variate=True,
        ).value


def averaging_weight(t, eta: float):
    """c_t = (eta + 1) / (t + eta), the weight of iterate t = 1, 2, ... in a running average
    that keeps about the last 1 / (eta + 1) of the iterates (Shamir & Zhang, 2013)."""
    return (eta + 1.0) / (t + eta)


class Averaged:
    """A Monte Carlo trainer whose fitted parameters are the average of its iterates.

    Under Monte Carlo gradients the iterates jitter about the optimum by an amount that
    shrinks only as the step does; their average does not (Polyak-Ruppert averaging). The
    average weights iterate t by the polynomial-decay rule c_t = (eta + 1) / (t + eta)
    (Shamir & Zhang, 2013): about the last 1 / (eta + 1) of the phase counts, so the early
    iterates, far from the optimum, are forgotten. ``params`` and ``monitor`` (what the
    stopping rule reads) are those of the average; the steps themselves are the trainer's.
    """

    def __init__(self, trainer, eta: float):
        self.trainer, self.b, self.eta = trainer, trainer.b, eta

    @property
    def capturable(self) -> bool:
        return self.trainer.capturable

    def init(self, mu: Array, var: Array, w: Array, extra: dict | None = None) -> dict:
        state = self.trainer.init(mu, var, w, extra)
        average = {"mu": mu, "var": var, "w": w, **(extra or {})}
        return {**state, AVERAGE + "t": self.b.scalar(0.0), **{AVERAGE + k: v for k, v in average.items()}}

    def step(self, state: dict, key):
        inner = {k: v for k, v in state.items() if not k.startswith(AVERAGE)}
        new, key, value = self.trainer.step(inner, key)
        mu, var, w, extra = self.trainer.params(new)
        t = state[AVERAGE + "t"] + 1
        c = averaging_weight(t, self.eta)
        new[AVERAGE + "t"] = t
        for name, current in {"mu": mu, "var": var, "w": w, **extra}.items():
            new[AVERAGE + name] = state[AVERAGE + name] + c * (current - state[AVERAGE + name])
        return new, key, value

    def params(self, state: dict) -> tuple[Array, Array, Array, dict]:
        extra = {k: state[AVERAGE + k] for k in EXTRA if AVERAGE + k in state}
        return state[AVERAGE + "mu"], state[AVERAGE + "var"], state[AVERAGE + "w"], extra

    def monitor(self, state: dict) -> Array:
        return self.trainer.fixed_noise_elbo(*self.params(state))


class StandardTrainer(Trainer):
    """Adam on mu, log sd = log(var)/2 and the loadings (DESIGN §3, ``training_mode='standard'``).

    The parameters Adam moves live in one flat array ``theta`` = [mu, log sd, log W] (log W
    when the loadings are on Adam), so a step is one Adam update and one clip, whatever
    their number: on small data each array operation costs more in overhead than in work.
    """

    def __init__(self, counts, **settings):
        super().__init__(counts, **settings)
        self.adam_w = self.fit_loadings and self.rule == "adam"

    def init(self, mu: Array, var: Array, w: Array, extra: dict | None = None) -> dict:
        b = self.b
        self.shapes = (tuple(mu.shape), tuple(w.shape))
        parts = [mu, 0.5 * b.log(var)] + ([b.log(w)] if self.adam_w else [])
        theta = b.concat([p.reshape(-1) for p in parts])
        # The bounds of theta, entry by entry: mu's, log sd's, and log W's floor (LOADING_FLOOR).
        size = mu.shape[0] * mu.shape[1]
        low, high = np.full(theta.shape[0], -np.inf), np.full(theta.shape[0], np.inf)
        low[:size], high[:size] = -MEAN_BOUND, MEAN_BOUND
        low[size : 2 * size], high[size : 2 * size] = LOG_SD_BOUNDS
        low[2 * size :] = math.log(LOADING_FLOOR)
        self.bounds = b.asarray(low), b.asarray(high)
        state = {"theta": theta, "m": b.zeros_like(theta), "v": b.zeros_like(theta), "w": w, "t": b.scalar(0.0)}
        return dict(state, **(extra or {}))

    def _split(self, theta: Array) -> tuple[Array, Array, Array | None]:
        """mu, log sd and (when on Adam) log W: views of theta."""
        (n, n_comp), w_shape = self.shapes
        size = n * n_comp
        log_w = theta[2 * size :].reshape(w_shape) if self.adam_w else None
        return theta[:size].reshape(n, n_comp), theta[size : 2 * size].reshape(n, n_comp), log_w

    def params(self, state: dict) -> tuple[Array, Array, Array, dict]:
        mu, log_sd, _ = self._split(state["theta"])
        return mu, self.b.exp(2 * log_sd), state["w"], {k: state[k] for k in EXTRA if k in state}

    def step(self, state: dict, key):
        """Evaluate the ELBO and its gradients at the current parameters, then take one Adam step."""
        b = self.b
        mu, var, w, extra = self.params(state)
        g = extra.get("g")
        noise = Noise(b, key)
        terms = evaluate(
            self.counts,
            mu,
            var,
            w,
            g,
            mode=self.mode,
            noise=noise,
            n_samples=self.n_samples,
            prior_scale=extra.get("prior", self.prior_scale),
            control_variate=True,
            row_statistics=self.learns_prior(extra),
            loadings=self.fit_loadings,
        )
        t = state["t"] + 1
        # Gradients in theta's coordinates: d/dlog sd = g_var * 2 var, d/dlog W = g_w * W.
        grads = [terms.g_mu, terms.g_var * (2 * var)] + ([terms.g_w * w] if self.adam_w else [])
        grad = b.concat([g.reshape(-1) for g in grads])
        theta, m, v = adam(b, state["theta"], grad, state["m"], state["v"], adam_scales(t, self.lr))
        theta = b.clip(theta, *self.bounds)
        new = dict(state, theta=theta, m=m, v=v, t=t)
        if self.adam_w:
            new["w"] = b.exp(self._split(theta)[2])
        elif self.fit_loadings:
            new["w"] = multiplicative_loadings(b, w, terms, g)
        if self.fit_batches:
            new["g"] = self.counts.scaling.update(g, new["w"], terms.expected_sum)
        if self.learns_prior(extra):
            new["prior"] = prior_update(b, terms)
        return new, noise.key, terms.value
