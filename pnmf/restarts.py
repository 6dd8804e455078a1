"""Restarts fitted together: one step moves every restart of a fit (consensus, K selection).

A restart is a *lane*: its q(F) and W are stacked along a leading axis, mu and var
(R, N, L), W (R, D, L), over the same counts X (N, D) held once on the device. Every
array operation of a step then works on all R restarts at once, so a small fit, whose
step is bound by the cost of launching each operation rather than by its arithmetic,
pays that cost once for R fits.

Each lane is the fit its seed would give alone: the same start, the same checked natural
steps of the ``lower-bound`` ELBO with the multiplicative loadings update (DESIGN §3),
and the same stopping rule, read lane by lane; a lane that has stopped is frozen
(:meth:`LaneTrainer.freeze`) while the others go on. Other configurations run their
restarts one after another (:func:`lanes_per_step`), as does data whose steps are
not bound by overhead on the device at hand.
"""

from __future__ import annotations

import numpy as np

from .backends.base import Array, Backend
from .elbo import MEAN_BOUND, VAR_BOUNDS, counts_term, kl_divergence
from .natural import DEFAULT_NGD_LR, ROUNDING, checked_step, natural_update

# Fewest restarts worth a shared step: below it, lanes cost more in memory traffic than
# they save in overhead (see LANE_ENTRIES).
MIN_LANES = 4


def lane_terms(b: Backend, counts, mu: Array, var: Array, w: Array, prior_scale: float):
    """The ``lower-bound`` ELBO of every lane and its gradients, for dense X (N, D) shared.

    With a = exp(mu) (R, N, L), rate = a @ W.T (R, N, D) and s the prior scale, per lane::

        value  = sum X log rate - sum_l (sum_d W) (sum_n exp(mu + var/2))
                 - sum lgamma(X + 1) - KL(q || N(0, s^2))                        (R,)
        g_mu   = a * ((X / rate) @ W) - (sum_d W) exp(mu + var/2) - mu / s^2    (R, N, L)
        g_var  = -(sum_d W) exp(mu + var/2) / 2 + 1 / (2 var) - 1 / (2 s^2)    (R, N, L)

    and the multiplicative update's numerator (X / rate).T @ a (R, D, L) and denominator
    sum_n exp(mu + var/2) (R, L): :func:`pnmf.elbo.evaluate` of each lane on its own.
    """
    # The log term at exp(F - shift), as pnmf.elbo.evaluate sums it (see log_shift).
    log_term, g_f, w_numerator = b.lanes_log_term(counts.x, b.exp(mu - counts.shift), w)
    expected = b.exp(mu + 0.5 * var)
    expected_sum = b.sum(expected, axis=-2)
    coef = b.sum(w, axis=-2)  # (R, L): the expected rate sum is sum_l coef * expected_sum
    s2 = prior_scale * prior_scale
    kl = kl_divergence(b, mu, var, prior_scale, lanes=True)
    value = log_term - b.sum(coef * expected_sum, axis=-1) + counts_term(counts, counts.shift) - kl
    rate_slope = coef[:, None, :] * expected
    g_mu = g_f - rate_slope - mu / s2
    g_var = -0.5 * rate_slope + (0.5 / var - 0.5 / s2)
    return value, g_mu, g_var, w_numerator, expected_sum


class LaneTrainer:
    """Checked natural ``lower-bound`` steps of R fits of the same dense counts at once.

    The step of :class:`pnmf.natural.NaturalTrainer` with the multiplicative loadings update,
    lane by lane: a step that lowers a lane's ELBO (beyond float rounding) is rejected and
    that lane's rho halved, regrown up to ``ngd_lr`` after accepted steps. A frozen lane
    (:meth:`freeze`) accepts nothing more, so its parameters and reported ELBO stay where
    its own stopping rule left them. ``lanes`` (R) tells :func:`pnmf.loop.run` that the
    step's ELBO is one value per lane.
    """

    def __init__(self, counts, *, lanes: int, prior_scale: float, ngd_lr: float | None):
        self.counts, self.b, self.lanes = counts, counts.backend, lanes
        self.prior_scale = prior_scale
        self.rho0 = DEFAULT_NGD_LR["lower-bound"] if ngd_lr is None else ngd_lr
        self.rounding = float(ROUNDING * np.finfo(self.b.dtype).eps)

    @property
    def capturable(self) -> bool:
        """As a single fit's step (:attr:`pnmf.optim.Trainer.capturable`): dense, one process."""
        return True

    def init(self, mu: Array, var: Array, w: Array, extra: dict | None = None) -> dict:
        b, lanes = self.b, self.lanes
        state = {"mu": mu, "precision": 1.0 / var, "w": w}
        return dict(
            state,
            **{"accepted_" + k: v for k, v in state.items()},
            rho=b.asarray(np.full(lanes, self.rho0)),
            accepted_value=b.asarray(np.full(lanes, -np.inf)),
            active=b.asarray(np.ones(lanes)) > 0,
            g_mu=b.zeros_like(mu),
            g_var=b.zeros_like(mu),
            w_numerator=b.zeros_like(w),
            expected_sum=b.zeros_like(w[:, 0]),
        )

    def params(self, state: dict) -> tuple[Array, Array, Array, dict]:
        return state["accepted_mu"], 1.0 / state["accepted_precision"], state["accepted_w"], {}

    def freeze(self, state: dict, active: np.ndarray) -> dict:
        """The state with only the lanes where ``active`` holds still moving."""
        return dict(state, active=self.b.asarray(np.asarray(active, dtype=np.float64)) > 0)

    def step(self, state: dict, key):
        b, counts = self.b, self.counts
        value, g_mu, g_var, w_numerator, expected_sum = lane_terms(
            b, counts, state["mu"], 1.0 / state["precision"], state["w"], self.prior_scale
        )
        # Step from each lane's last accepted point: the new one if its ELBO did not fall (up
        # to rounding) and the lane is still running, else the old one.
        fresh = {"g_mu": g_mu, "g_var": g_var, "w_numerator": w_numerator, "expected_sum": expected_sum}
        new = dict(state, **checked_step(b, state, value, fresh, self.rounding, self.rho0, state["active"]))
        mu, precision, w = new["accepted_mu"], new["accepted_precision"], new["accepted_w"]
        new_mu, new_precision = natural_update(
            b, mu, precision, new["g_mu"], new["g_var"], new["rho"][:, None, None], improved=False
        )
        new["mu"] = b.clip(new_mu, -MEAN_BOUND, MEAN_BOUND)
        new["precision"] = b.clip(new_precision, 1.0 / VAR_BOUNDS[1], 1.0 / VAR_BOUNDS[0])
        new["w"] = w * new["w_numerator"] / new["expected_sum"][:, None, :]
        return new, key, new["accepted_value"]


def lanes_per_step(model, X, b: Backend) -> int:
    """How many of ``model``'s restarts on X share one step on backend b; 1: one by one.

    Lanes need dense counts in one process, the ``lower-bound`` mode with natural steps and
    the multiplicative loadings update, a fixed prior scale, the whole of X in every step,
    no size factors, batches or checkpoint, and room for MIN_LANES of them within the
    backend's :meth:`~pnmf.backends.base.Backend.lane_entries`.
    """
    lanes = b.lane_entries() // max(1, X.shape[0] * X.shape[1])
    supported = (
        isinstance(X, np.ndarray)
        and model.mode == "lower-bound"
        and model.training_mode == "natural"
        and model.loadings_update in (None, "multiplicative")
        and model.prior_scale != "auto"
        and model.size_factors is None
        and getattr(model, "batches_", None) is None
        and (model.batch_size is None or model.batch_size >= X.shape[0])
        and not model.distributed
        and model.checkpoint is None
    )
    return lanes if supported and lanes >= MIN_LANES else 1
