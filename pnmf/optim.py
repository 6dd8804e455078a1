"""Adam and the multiplicative loadings update on the array interface, and the standard trainer.

Everything here is ascent on the ELBO and is written once for every backend.
"""

from __future__ import annotations

import math

from .backends.base import Array, Backend
from .elbo import MEAN_BOUND, VAR_BOUNDS, Noise, Terms, evaluate

LOADINGS_UPDATES = ("adam", "multiplicative")
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
LOG_SD_BOUNDS = tuple(0.5 * math.log(v) for v in VAR_BOUNDS)


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


def multiplicative_loadings(w: Array, terms: Terms) -> Array:
    """The exact maximiser in W of the Jensen bound for fixed q(F) (KL-NMF fixed point).

    W <- W * [sum_n (X / rate) exp(F)] / sum_n exp(mu + var/2), the numerator averaged
    over the Monte Carlo samples in the sampled modes; ``terms`` evaluated at (q(F), W).
    """
    return w * terms.w_numerator / terms.expected_sum[None, :]


def loadings_state(b: Backend, w: Array, rule: str) -> dict:
    """The optimiser state the loadings update ``rule`` carries besides W."""
    return {"m_w": b.zeros_like(w), "v_w": b.zeros_like(w)} if rule == "adam" else {}


def update_loadings(b: Backend, state: dict, terms: Terms, t: Array, rule: str, lr: float, scales=None):
    """W after one step of ``rule``; Adam works on log W, so W stays positive.

    ``scales``: Adam's ``adam_scales(t, lr)`` when the caller has them already.
    """
    w = state["w"]
    if rule == "multiplicative":
        return multiplicative_loadings(w, terms), {}
    scales = adam_scales(t, lr) if scales is None else scales
    log_w, m, v = adam(b, b.log(w), terms.g_w * w, state["m_w"], state["v_w"], scales)
    return b.exp(log_w), {"m_w": m, "v_w": v}


class StandardTrainer:
    """Adam on mu, log sd = log(var)/2 and the loadings (DESIGN §3, ``training_mode='standard'``)."""

    def __init__(self, counts, *, mode, n_samples, prior_scale, learning_rate, loadings_update, update_loadings):
        self.counts = counts
        self.b = counts.backend
        self.mode = mode
        self.n_samples = n_samples
        self.prior_scale = prior_scale
        self.lr = learning_rate
        self.rule = loadings_update
        self.fit_loadings = update_loadings

    def init(self, mu: Array, var: Array, w: Array) -> dict:
        b = self.b
        state = {"mu": mu, "log_sd": 0.5 * b.log(var), "w": w, "t": b.scalar(0.0)}
        for name in ("mu", "log_sd"):
            state["m_" + name] = b.zeros_like(mu)
            state["v_" + name] = b.zeros_like(mu)
        if self.fit_loadings:
            state.update(loadings_state(b, w, self.rule))
        return state

    def params(self, state: dict) -> tuple[Array, Array, Array]:
        return state["mu"], self.b.exp(2 * state["log_sd"]), state["w"]

    def step(self, state: dict, key):
        """Evaluate the ELBO and its gradients at the current parameters, then take one Adam step."""
        b = self.b
        mu, var, w = self.params(state)
        noise = Noise(b, key)
        terms = evaluate(
            self.counts,
            mu,
            var,
            w,
            mode=self.mode,
            noise=noise,
            n_samples=self.n_samples,
            prior_scale=self.prior_scale,
            control_variate=True,
        )
        t = state["t"] + 1
        new = dict(state, t=t)
        scales = adam_scales(t, self.lr)
        new["mu"], new["m_mu"], new["v_mu"] = adam(b, mu, terms.g_mu, state["m_mu"], state["v_mu"], scales)
        new["mu"] = b.clip(new["mu"], -MEAN_BOUND, MEAN_BOUND)
        new["log_sd"], new["m_log_sd"], new["v_log_sd"] = adam(
            b, state["log_sd"], terms.g_var * (2 * var), state["m_log_sd"], state["v_log_sd"], scales
        )
        new["log_sd"] = b.clip(new["log_sd"], *LOG_SD_BOUNDS)
        if self.fit_loadings:
            new["w"], moments = update_loadings(b, state, terms, t, self.rule, self.lr, scales)
            new.update(moments)
        return new, noise.key, terms.value
