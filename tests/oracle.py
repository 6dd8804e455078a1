"""The ELBO written directly from DESIGN §1, for each framework's autodiff to differentiate."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln


def elbo_formula(xp, x, mu, var, w, mode, eps, prior_scale, log, scale=None):
    """The ELBO with dense counts x (N, D) and noise eps (E, N, L), in namespace ``xp``.

    ``scale`` (N, D), when given, multiplies every rate: s[n] g[batch(n), d] (DESIGN §8).
    """
    lgamma_sum = float(gammaln(np.asarray(x, dtype=np.float64) + 1).sum())
    s2 = prior_scale**2
    scale = 1.0 if scale is None else scale
    if mode == "lower-bound":
        log_term = xp.sum(x * log(scale * (xp.exp(mu) @ w.T)))
    else:
        f = mu[None] + xp.sqrt(var)[None] * eps
        log_term = xp.sum(x[None] * log(scale * (xp.exp(f) @ w.T))) / eps.shape[0]
    if mode == "simple":
        rate_sum = xp.sum(scale * (xp.exp(f) @ w.T)) / eps.shape[0]
    else:
        rate_sum = xp.sum(scale * (xp.exp(mu + var / 2) @ w.T))
    log_prior = math.log(prior_scale) if isinstance(prior_scale, float) else log(prior_scale)
    kl = xp.sum(log_prior - 0.5 * log(var) + (var + mu * mu) / (2 * s2) - 0.5)
    return log_term - rate_sum - lgamma_sum - kl


def torch_oracle(x, mu, var, w, mode, eps, prior_scale=1.0, effects=None):
    """Value and (d/dmu, d/dvar, d/dW) by torch autograd, in float64.

    ``effects = (s, codes, g)`` scales the rates by s[n] g[codes[n], d]; d/dg is then
    returned as well.
    """
    import torch

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in dict(mu=mu, var=var, w=w).items()}
    scale = g = None
    if effects is not None:
        s, codes, g_values = effects
        g = torch.tensor(g_values, dtype=torch.float64, requires_grad=True)
        scale = torch.tensor(s, dtype=torch.float64)[:, None] * g[torch.as_tensor(codes)]
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
        scale,
    )
    value.backward()
    grads = float(value.detach()), t["mu"].grad.numpy(), t["var"].grad.numpy(), t["w"].grad.numpy()
    return grads if g is None else (*grads, g.grad.numpy())


def mlx_oracle(x, mu, var, w, mode, eps, prior_scale=1.0, effects=None):
    """Value and (d/dmu, d/dvar, d/dW) by mx.value_and_grad, in float64 on the CPU (and
    d/dg with ``effects = (s, codes, g)``, as :func:`torch_oracle`)."""
    import mlx.core as mx

    def as_mx(a):
        return mx.array(np.asarray(a, dtype=np.float64))

    s, codes, g = (
        effects if effects is not None else (np.ones(len(x)), np.zeros(len(x), dtype=int), np.ones((1, x.shape[1])))
    )

    def f(mu_, var_, w_, g_):
        scale = as_mx(s)[:, None] * g_[mx.array(codes)]
        return elbo_formula(mx, as_mx(x), mu_, var_, w_, mode, as_mx(eps), prior_scale, mx.log, scale)

    with mx.stream(mx.cpu):
        value, grads = mx.value_and_grad(f, argnums=(0, 1, 2, 3))(as_mx(mu), as_mx(var), as_mx(w), as_mx(g))
        grads = [np.array(g) for g in grads]
        return (float(value), *grads) if effects is not None else (float(value), *grads[:3])
