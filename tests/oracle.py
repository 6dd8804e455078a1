"""The ELBO written directly from DESIGN §1, for each framework's autodiff to differentiate."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln


def elbo_formula(xp, x, mu, var, w, mode, eps, prior_scale, log):
    """The ELBO with dense counts x (N, D) and noise eps (E, N, L), in namespace ``xp``."""
    lgamma_sum = float(gammaln(np.asarray(x, dtype=np.float64) + 1).sum())
    s2 = prior_scale**2
    if mode == "lower-bound":
        log_term = xp.sum(x * log(xp.exp(mu) @ w.T))
    else:
        f = mu[None] + xp.sqrt(var)[None] * eps
        log_term = xp.sum(x[None] * log(xp.exp(f) @ w.T)) / eps.shape[0]
    if mode == "simple":
        rate_sum = xp.sum(xp.exp(f) @ w.T) / eps.shape[0]
    else:
        rate_sum = xp.sum(xp.exp(mu + var / 2) @ w.T)
    kl = xp.sum(math.log(prior_scale) - 0.5 * log(var) + (var + mu * mu) / (2 * s2) - 0.5)
    return log_term - rate_sum - lgamma_sum - kl


def torch_oracle(x, mu, var, w, mode, eps, prior_scale=1.0):
    """Value and (d/dmu, d/dvar, d/dW) by torch autograd, in float64."""
    import torch

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in dict(mu=mu, var=var, w=w).items()}
    value = elbo_formula(
        torch,
        torch.tensor(x, dtype=torch.float64),
        t["mu"],
        t["var"],
        t["w"],
        mode,
        torch.tensor(eps, dtype=torch.float64),
        prior_scale,
        torch.log,
    )
    value.backward()
    return float(value.detach()), t["mu"].grad.numpy(), t["var"].grad.numpy(), t["w"].grad.numpy()


def mlx_oracle(x, mu, var, w, mode, eps, prior_scale=1.0):
    """Value and (d/dmu, d/dvar, d/dW) by mx.value_and_grad, in float64 on the CPU."""
    import mlx.core as mx

    def as_mx(a):
        return mx.array(np.asarray(a, dtype=np.float64))

    def f(mu_, var_, w_):
        return elbo_formula(mx, as_mx(x), mu_, var_, w_, mode, as_mx(eps), prior_scale, mx.log)

    with mx.stream(mx.cpu):
        value, grads = mx.value_and_grad(f, argnums=(0, 1, 2))(as_mx(mu), as_mx(var), as_mx(w))
        return float(value), *(np.array(g) for g in grads)
