"""The ELBO of the Poisson model in its three modes: value and closed-form gradients.

Model (DESIGN §1), counts X (N, D), log-factors F (N, L), loadings W (D, L) >= 0::

    X[n, d] ~ Poisson(rate[n, d]),  rate = exp(F) @ W.T
    F ~ Normal(0, s^2),             q(F) = Normal(mu, var)   (elementwise)

    ELBO = sum X * E_q[log rate] - sum E_q[rate] - sum lgamma(X + 1) - KL(q || p)

The modes differ in how the expectations are estimated, with F_e = mu + sqrt(var) * eps_e:

    mode          E_q[X log rate]                     E_q[rate]
    simple        (1/E) sum_e X log rate(F_e)         (1/E) sum_e rate(F_e)
    expanded      (1/E) sum_e X log rate(F_e)         W @ exp(mu + var/2) (exact)
    lower-bound   X log(exp(mu) @ W.T)   (Jensen)     exact

The log term is evaluated only where X != 0 (sparse input) and the rate sum
factorises: sum_{n,d} rate = sum_l (sum_d W[d, l]) (sum_n exp(F[n, l])).
Monte Carlo samples are processed in chunks so that no (E, N, D) array is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

from .backends.base import TINY_RATE, Array, Backend
from .data import canonical_csr

MODES = ("simple", "expanded", "lower-bound")
VAR_GRADIENTS = ("reparam", "price")

# Elements of one chunk of dense (E, N, D) work: bounds the Monte Carlo buffer.
DENSE_CHUNK = 1 << 22
# The domain of q(F), kept by every trainer: exp(mu + var/2) and the Monte Carlo exp(F_e)
# stay far inside float32's range (3.4e38) whatever the data. The prior N(0, s^2) puts F
# near 0; the scale of the counts belongs to W.
MEAN_BOUND = 30.0
VAR_BOUNDS = (1e-8, 20.0)
# Range of a fitted per-component prior scale (prior_scale='auto').
PRIOR_BOUNDS = (1e-2, 1e2)
# Largest integer count whose log-factorial comes from a table (see lgamma_sum).
LGAMMA_TABLE = 1 << 20
# Counts read at once by count_sums.
COUNT_CHUNK = 1 << 20


def log_term(
    b: Backend,
    x: Array,
    a: Array,
    w: Array,
    second: bool,
    rate: Callable,
    rows: Callable,
    cols: Callable,
    loadings: bool = True,
) -> tuple:
    """sum X log rate with rate = a @ W.T, a = exp(F) (c, N, L), and its derivatives in F and W.

    ``rate(a, w)``, ``rows(v, w)`` and ``cols(v, a)`` are the three products over the
    entries that X keeps (all of them, or its non-zeros)::

        d/dF       = a * ((X / rate) @ W)
        d2/dF2     = a * ((X / rate) @ W) - a^2 * ((X / rate^2) @ W^2)     (diagonal)
        d/dW       = sum_c (X / rate).T @ a

    Returns ``(value, d/dF, d/dW, d2/dF2 or None)``; d/dW is None, and its product is not
    made, unless ``loadings`` (steps with W fixed need none).
    """
    r = rate(a, w) + TINY_RATE  # a floor on rate >= 0, cheaper than a clip
    ratio = x / r
    value = b.sum(x * b.log(r))
    g_f = a * rows(ratio, w)
    g_w = cols(ratio, a) if loadings else None
    # a * (a * ...) rather than a^2 * ...: exp(2F) alone can overflow float32.
    h_f = g_f - a * (a * rows(ratio / r, w * w)) if second else None
    return value, g_f, g_w, h_f


def lgamma_sum(x: np.ndarray) -> float:
    """sum lgamma(x + 1) over the counts, in float64 (see :func:`count_sums`)."""
    return count_sums(x)[0]


def count_sums(x: np.ndarray) -> tuple[float, float, float]:
    """sum lgamma(x + 1), sum x log x and sum x over the counts, in float64.

    Integer counts up to LGAMMA_TABLE are summed from their histogram, as sum_k n_k f(k)
    (one pass over x, no lgamma per entry: 0.1 s less set-up at 5e6 non-zeros); other
    values entry by entry. x is read COUNT_CHUNK entries at a time, so that its copies
    (as integers, in float64) take a few MB whatever its size.
    """
    x = np.asarray(x).ravel()
    if x.size == 0:
        return 0.0, 0.0, 0.0
    top = float(x.max())
    n_k = np.zeros(int(top) + 1) if top <= LGAMMA_TABLE else None
    lgamma = x_log_x = total = 0.0
    for start in range(0, x.size, COUNT_CHUNK):
        part = x[start : start + COUNT_CHUNK]
        if n_k is not None:
            whole = part.astype(np.int64)
            if np.array_equal(whole, part):
                n_k += np.bincount(whole, minlength=len(n_k))
                continue
        part = part.astype(np.float64)
        positive = part[part > 0]
        lgamma += float(gammaln(part + 1.0).sum())
        x_log_x += float(positive @ np.log(positive))
        total += float(positive.sum())
    if n_k is not None:
        k = np.arange(len(n_k), dtype=np.float64)
        lgamma += float(n_k @ gammaln(k + 1.0))
        x_log_x += float(n_k[1:] @ (k[1:] * np.log(k[1:])))
        total += float(n_k @ k)
    return lgamma, x_log_x, total


def log_shift(x_log_x: float, total: float) -> float:
    """The shift m of log rate in the sums of X log rate: sum X log(rate e^-m) is summed on
    the backend and m sum X added in float64, m = sum X log X / sum X.

    Near a fit rate ~ X, so sum X log(rate e^-m) is ~0 where sum X log rate is ~sum X log X:
    with counts ~1000 the latter is ~1e3 times the ELBO, and in float32 its rounding alone
    (hundreds) hid what a step gains. Shifting exp(F) by e^-m leaves every gradient as it was.
    Values below 1 (not counts) have no such sum to cancel: m is at least 0, and exp(F - m)
    stays within float32 whatever they are.
    """
    return max(0.0, x_log_x / total) if total > 0 else 0.0


def counts_term(counts, shift: float) -> float:
    """The ELBO's part that is the counts' alone, -sum lgamma(X + 1), with the m sum X that a
    log term summed at rates e^-m (``shift``, see :func:`log_shift`) leaves out, in float64."""
    return shift * counts.total - counts.lgamma_sum


class DenseCounts:
    """Dense counts X (N, D) on a backend; positions are all N * D entries.

    ``group`` (a :class:`pnmf.distributed.Group`) makes X one block of rows of a larger
    matrix: :func:`evaluate` then sums its row sums over the group's processes.
    """

    scaling = None  # a pnmf.scaling.Scaling: size factors and batches of the rows

    def __init__(self, backend: Backend, x: np.ndarray, group=None):
        self.backend = backend
        self.group = group
        self.shape = x.shape
        self.x = backend.asarray(x)
        self.lgamma_sum, x_log_x, self.total = count_sums(x)
        self.shift = log_shift(x_log_x, self.total)  # sum X log rate is summed at rate e^-shift
        self.chunk = max(1, DENSE_CHUNK // max(1, x.shape[0] * x.shape[1]))

    def log_term(self, a: Array, w: Array, second: bool, loadings: bool = True) -> tuple:
        """sum X log rate and its derivatives for a = exp(F) (c, N, L): see :func:`log_term`."""
        return self.backend.dense_log_term(self.x, a, w, second, loadings)

    def log_value(self, a: Array, w: Array) -> Array:
        """sum X log rate alone for a = exp(F) (c, N, L)."""
        return self.backend.dense_log_value(self.x, a, w)

    def slope(self, a: Array, w: Array) -> Array:
        """d/dF of sum X log rate at a = exp(F) (N, L) alone, (N, L)."""
        return self.backend.dense_slope(self.x, a, w)


class SparseCounts:
    """Sparse counts: only the non-zeros of X (nnz,) and their positions."""

    chunk = 1  # one Monte Carlo sample at a time: each is already an nnz-sized pass
    scaling = None

    def __init__(self, backend: Backend, x: sp.csr_matrix, group=None, loadings: bool = True):
        self.backend = backend
        self.group = group
        self.shape = x.shape
        self.pattern = backend.sparse(x, transpose=loadings)
        self.x = backend.asarray(x.data)
        self.lgamma_sum, x_log_x, self.total = count_sums(x.data)
        self.shift = log_shift(x_log_x, self.total)  # sum X log rate is summed at rate e^-shift

    def log_term(self, a: Array, w: Array, second: bool, loadings: bool = True) -> tuple:
        """The log term over the non-zeros for a (1, N, L): see :func:`log_term`."""
        return self.backend.sparse_log_term(self.pattern, self.x, a, w, second, loadings)

    def log_value(self, a: Array, w: Array) -> Array:
        """sum X log rate alone over the non-zeros for a (1, N, L)."""
        return self.backend.sparse_log_value(self.pattern, self.x, a, w)

    def slope(self, a: Array, w: Array) -> Array:
        """d/dF of sum X log rate at a = exp(F) (N, L) alone, over the non-zeros, (N, L)."""
        return self.backend.sparse_slope(self.pattern, self.x, a, w)


def as_counts(
    backend: Backend, x: np.ndarray | sp.spmatrix, group=None, scaling=None, loadings: bool = True
) -> DenseCounts | SparseCounts:
    """Put validated counts on the backend, sparse input staying sparse.

    ``group``: the process group whose ranks hold the other rows (None: x is all of X).
    ``scaling``: the rows' size factors and batches (a :class:`pnmf.scaling.Scaling`), or None.
    ``loadings``: whether the loadings' gradient is needed from the start; without it a
    backend may leave the structure of X's transpose until a product first needs it (see
    :meth:`pnmf.backends.base.Backend.sparse`).
    """
    group = group if group is not None and group.size > 1 else None
    if sp.issparse(x):
        counts = SparseCounts(backend, canonical_csr(x), group, loadings)
    else:
        counts = DenseCounts(backend, np.asarray(x), group)
    counts.scaling = scaling
    return counts


class Noise:
    """Standard normal draws from the backend's seeded random state, in antithetic pairs.

    With ``antithetic`` (the default) the samples come in pairs eps, -eps: a chunk holds its
    fresh draws, then their negatives; when a chunk's size is odd, the negative of its last
    fresh draw opens the next chunk. Each sample is still standard normal, so every
    estimate keeps its expectation, and the odd-order terms of its noise cancel within a
    pair: the Monte Carlo gradients lose their first-order noise, an even number of samples
    needs no control variate (its first-order term sums to zero), and half the normals are
    drawn.
    """

    def __init__(self, backend: Backend, key: Any, antithetic: bool = True):
        self.backend = backend
        self.key = key
        self.antithetic = antithetic
        self._owed = None  # minus the last sample, when its pair is still to be handed out

    def draw(self, shape: tuple[int, ...]) -> Array:
        b = self.backend
        if not self.antithetic:
            eps, self.key = b.normal(self.key, shape)
            return eps
        count, rest = shape[0], tuple(shape[1:])
        parts = []
        if self._owed is not None and count > 0:
            parts.append(self._owed)
            self._owed, count = None, count - 1
        if count > 0:
            fresh, self.key = b.normal(self.key, ((count + 1) // 2, *rest))
            parts.append(fresh)
            if count > 1:
                parts.append(-fresh[: count // 2])
            if count % 2:
                self._owed = -fresh[-1:]
        return parts[0] if len(parts) == 1 else b.concat(parts)

    def balanced(self, n_samples: int) -> bool:
        """Whether ``n_samples`` draws from the start are whole antithetic pairs (their sum is zero)."""
        return self.antithetic and n_samples % 2 == 0


@dataclass
class Terms:
    """The ELBO and its gradients with respect to mu, var (N, L) and W (D, L).

    ``w_numerator`` is the log term's part of ``g_w``, sum_n (X / rate) exp(F)
    averaged over samples, and ``expected_sum`` is sum_n E_q[exp F] = sum_n exp(mu + var/2),
    (L,): with :func:`rate_denominator`, the numerator and denominator of the multiplicative
    loadings update. With size factors and batches (``counts.scaling``) ``expected_sum`` is
    S[b, l] = sum_{n in b} s[n] E_q[exp F[n, l]], (B, L).
    """

    value: Array
    g_mu: Array | None = None
    g_var: Array | None = None
    g_w: Array | None = None
    w_numerator: Array | None = None
    expected_sum: Array | None = None
    prior_sum: Array | None = None
    mu_sum: Array | None = None
    rows: Array | None = None


def kl_divergence(backend: Backend, mu: Array, var: Array, prior_scale: float | Array, lanes: bool = False) -> Array:
    """KL(q || p) = sum log(s) - log(var)/2 + (var + mu^2) / (2 s^2) - 1/2, summed term by term.

    ``prior_scale`` s is one number, or one per component (L,) (``prior_scale='auto'``).
    ``lanes``: mu and var are (R, N, L), R fits side by side (:mod:`pnmf.restarts`), and the
    KL is one per fit, (R,).
    """
    b, (n, n_comp) = backend, mu.shape[-2:]
    total = (lambda v: b.sum(b.sum(v, axis=-1), axis=-1)) if lanes else b.sum
    if isinstance(prior_scale, (int, float)):
        return (
            n * n_comp * (math.log(prior_scale) - 0.5)
            + (total(var) + total(mu * mu)) / (2 * prior_scale**2)
            - 0.5 * total(b.log(var))
        )
    return (
        n * b.sum(b.log(prior_scale))
        - 0.5 * n * n_comp
        + total((var + mu * mu) * (0.5 / (prior_scale * prior_scale)))
        - 0.5 * total(b.log(var))
    )


def prior_update(b: Backend, terms: Terms) -> Array:
    """The per-component prior scale that maximises the ELBO for fixed q(F) (empirical Bayes):
    s_l^2 = mean_n (mu[n, l]^2 + var[n, l]), from ``terms.prior_sum`` over ``terms.rows`` rows."""
    return b.clip(b.sqrt(terms.prior_sum / terms.rows), PRIOR_BOUNDS[0], PRIOR_BOUNDS[1])


def rate_denominator(b: Backend, g: Array | None, expected_sum: Array) -> Array:
    """-d/dW of the expected-rate sum, (D, L) or (1, L): sum_n E_q[exp F[n, l]] for every d,
    or g.T @ S with batches (g (B, D), S = ``expected_sum`` (B, L))."""
    return expected_sum[None, :] if g is None else b.swap(g) @ expected_sum


def _first_order(counts, mu: Array, w: Array, scale: Array, mode: str) -> Array:
    """d/dF of the sampled part of the ELBO at F = mu, (N, L): the control variate's slope."""
    b = counts.backend
    a = b.exp(mu)
    slope = counts.slope(a, w)
    return slope - scale * a if mode == "simple" else slope


def evaluate(
    counts,
    mu: Array,
    var: Array,
    w: Array,
    g: Array | None = None,
    *,
    mode: str,
    noise: Noise | None,
    n_samples: int,
    prior_scale: float = 1.0,
    gradients: bool = True,
    var_gradient: str = "reparam",
    control_variate: bool = False,
    chunk: int | None = None,
    row_statistics: bool = False,
    loadings: bool = True,
) -> Terms:
    """The ELBO of ``mode`` at (mu, var, W) and, if ``gradients``, its gradients.

    mu, var: (N, L) mean and variance of q(F); w: (D, L) loadings; g: (B, D) batch
    effects when ``counts.scaling`` holds size factors and batches (see :mod:`pnmf.scaling`),
    where the expected rate of row n is s[n] g[batch(n)] * (exp(F) @ W.T).
    For the Monte Carlo modes ``noise`` supplies eps of shape (c, N, L) in chunks, and
    ``var_gradient`` chooses the estimator of dELBO/dvar:
      'reparam' differentiates the sampled objective through F = mu + sqrt(var) eps,
                g_var = (1/E) sum_e dlogp/dF(F_e) * eps_e / (2 sqrt(var));
      'price'   uses Price's theorem, g_var = 1/2 E_q[d2 logp / dF2] (lower variance).
    The gradient with respect to mu is Bonnet's E_q[dlogp/dF] in both.

    ``control_variate`` subtracts from the Monte Carlo *value* its first-order part,
    sum_{n,l} G[n, l] sqrt(var[n, l]) mean_e(eps_e[n, l]) with G = dlogp/dF at F = mu,
    which has mean zero: the same expectation with far less noise (35x less on the
    benchmark's data at its optimum). The gradients stay those of the plain estimator.
    Antithetic noise with an even ``n_samples`` already sums to zero, so no pass is made.

    ``chunk`` caps the Monte Carlo samples handled at once (below the counts' own cap).

    ``prior_scale`` is s of the prior N(0, s^2) on F: one number or one per component (L,).
    ``row_statistics`` adds to the terms ``prior_sum`` = sum_n (mu^2 + var) (L,),
    ``mu_sum`` = sum_n mu (L,) and the number of ``rows``, summed over a distributed fit's
    processes: for :func:`prior_update` and the recentring of natural Monte Carlo steps.

    ``loadings=False`` leaves out the loadings' gradient (``g_w`` and ``w_numerator`` are
    None) and the sparse product over X's transpose it takes: for steps with W fixed (the
    rows' q(F) in ``transform`` and in a mini-batch fit).
    """
    b = counts.backend
    if noise is not None and noise.balanced(n_samples):
        control_variate = False
    scaling = counts.scaling
    if scaling is None:
        coef = b.sum(w, axis=0)  # (L,): the expected rate sum is sum_l coef[l] sum_n E_q[exp F[n, l]]
        scale, row_sum = coef, (lambda v: b.sum(v, axis=0))
    else:
        coef = g @ w  # (B, L): sum_{b,l} coef[b, l] S[b, l]
        scale, row_sum = scaling.rows(coef), scaling.sums  # (N, L), and (N, L) -> (B, L)
    w_num = sampled_sum = None
    # The log term is summed at exp(F - shift) (rates e^-shift; see log_shift), which leaves
    # its gradients as they are; the sampled rate sum of 'simple' needs exp(F) itself.
    shift = counts.shift if mode != "simple" else 0.0
    centre = mu - shift if shift else mu
    if mode == "lower-bound" and not gradients:
        value = counts.log_value(b.exp(centre)[None], w)
    elif mode == "lower-bound":
        value, g_f, w_num, _ = counts.log_term(b.exp(centre)[None], w, second=False, loadings=loadings)
        g_mu, g_var = g_f[0], None
    elif mode in ("simple", "expanded"):
        n, n_comp = mu.shape
        sd = b.sqrt(var)
        second = gradients and var_gradient == "price"
        # Sums over the chunks (None before the first).
        value, g_mu, g_var, w_num, sampled_sum, eps_sum = None, None, None, None, None, None
        chunk = counts.chunk if chunk is None else min(chunk, counts.chunk)
        for start in range(0, n_samples, chunk):
            eps = noise.draw((min(chunk, n_samples - start), n, n_comp))
            a = b.exp(centre + sd * eps)
            if gradients:
                chunk_value, g_f, chunk_w, h_f = counts.log_term(a, w, second, loadings)
                w_num = _plus(w_num, chunk_w) if loadings else None
            else:
                chunk_value = counts.log_value(a, w)
            if mode == "simple":  # the rate sum is sampled too
                rate_part = scale * a
                chunk_value = chunk_value - b.sum(rate_part)
                if gradients:
                    g_f = g_f - rate_part
                    h_f = h_f - rate_part if second else None
                sampled_sum = _plus(sampled_sum, row_sum(b.sum(a, axis=0)))
            value = _plus(value, chunk_value)
            if control_variate:
                eps_sum = _plus(eps_sum, b.sum(eps, axis=0))
            if gradients:
                g_mu = _plus(g_mu, b.sum(g_f, axis=0))
                g_var = _plus(g_var, b.sum(h_f if second else g_f * eps, axis=0))
        value = value / n_samples
        if control_variate:
            value = value - b.sum(_first_order(counts, mu, w, scale, mode) * sd * eps_sum) / n_samples
        if gradients:
            w_num = w_num / n_samples if loadings else None
            g_mu = g_mu / n_samples
            g_var = g_var / (2 * n_samples) if second else g_var / (2 * n_samples * sd)
    else:
        raise ValueError(f"mode={mode!r} is not one of " + ", ".join(repr(m) for m in MODES))

    expected = b.exp(mu + 0.5 * var) if gradients or mode != "simple" else None  # E_q[exp F], (N, L)
    expected_sum = None if expected is None else row_sum(expected)  # (L,) or (B, L)
    if mode != "simple":
        # The exact rate sum factorises: sum_{n,d} rate = sum_l (sum_d W[d, l]) (sum_n E_q[exp F[n, l]]).
        value = value - b.sum(coef * expected_sum)
        if gradients:
            rate_slope = scale * expected  # d/dmu of the rate sum; half of it is d/dvar
            g_mu = g_mu - rate_slope
            g_var = -0.5 * rate_slope if g_var is None else g_var - 0.5 * rate_slope
    value = value + counts_term(counts, shift) - kl_divergence(b, mu, var, prior_scale)
    prior_sum = mu_sum = rows = None
    if row_statistics:
        prior_sum, mu_sum, rows = b.sum(mu * mu + var, axis=0), b.sum(mu, axis=0), b.scalar(float(mu.shape[0]))
    if scaling is not None:
        value = value + scaling.log_size  # this block's rows' sum X log s
    if counts.group is not None:
        # X is one block of rows: the value and the loadings' statistics are sums over rows,
        # so one all-reduce makes them those of the whole matrix on every rank (DESIGN §7).
        value, w_num, expected_sum, sampled_sum, prior_sum, mu_sum, rows = counts.group.all_sum(
            b, value, w_num, expected_sum, sampled_sum, prior_sum, mu_sum, rows
        )
    if scaling is not None:
        value = value + scaling.log_effects(g)  # sum X log g, from the batch sums of all rows
    if not gradients:
        return Terms(value, prior_sum=prior_sum, mu_sum=mu_sum, rows=rows)
    if not loadings:
        g_w = None
    elif mode == "simple":
        # d/dW of the sampled rate sum: -(1/E) sum_e sum_n exp(F_e), the same for every d.
        g_w = w_num - rate_denominator(b, None if scaling is None else g, sampled_sum / n_samples)
    else:
        g_w = w_num - rate_denominator(b, None if scaling is None else g, expected_sum)
    s2 = prior_scale * prior_scale
    prior_mu = mu if isinstance(s2, (int, float)) and s2 == 1 else mu / s2
    return Terms(
        value, g_mu - prior_mu, g_var + (0.5 / var - 0.5 / s2), g_w, w_num, expected_sum, prior_sum, mu_sum, rows
    )


def _plus(total: Array | None, part: Array) -> Array:
    """``total + part``, or ``part`` where there is no total yet."""
    return part if total is None else total + part
