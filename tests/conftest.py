from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import settings

from pnmf.backends import get_backend
from pnmf.elbo import as_counts, evaluate

# CI replays the same examples every run, so a submission's result does not depend on luck.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

BACKENDS = ["numpy"] + [name for name in ("torch", "mlx") if importlib.util.find_spec(name) is not None]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


def cpu_backend(name: str, dtype: str = "float64"):
    """The backend ``name`` on the CPU, where every backend has float64."""
    return get_backend(name, device="cpu", dtype=dtype)


class FixedNoise:
    """Hands out a preset eps (E, N, L) chunk by chunk, for comparisons with an oracle."""

    def __init__(self, backend, eps: np.ndarray):
        self.backend, self.eps, self.used = backend, eps, 0

    def draw(self, shape):
        chunk = self.eps[self.used : self.used + shape[0]]
        assert chunk.shape == tuple(shape)
        self.used += shape[0]
        return self.backend.asarray(chunk)

    def balanced(self, n_samples):
        return False


def small_problem(seed: int = 0, n: int = 9, d: int = 7, n_components: int = 3, n_samples: int = 5):
    """Counts with zeros, and a point (mu, var, W) and noise eps to evaluate the ELBO at."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, (n, d)).astype(np.float64)
    x[rng.random((n, d)) < 0.4] = 0.0
    mu = rng.normal(0.0, 0.5, (n, n_components))
    var = rng.uniform(0.05, 0.5, (n, n_components))
    w = rng.uniform(0.1, 1.0, (d, n_components))
    eps = rng.standard_normal((n_samples, n, n_components))
    return x, mu, var, w, eps


def sparse_products_problem(n, d, width, density, empty_every=(7, 5), dtype=np.float64):
    """Operands of the sparse products: a CSR x (n, d) whose every ``empty_every[0]``-th row
    and ``empty_every[1]``-th column (from the fourth and third) are empty, dense a (n, width)
    and b (d, width), and the row of each non-zero."""
    rng = np.random.default_rng(0)
    x = sp.random(n, d, density=density, random_state=1, format="csr", dtype=dtype)
    x = sp.csr_matrix(x.multiply(np.arange(n)[:, None] % empty_every[0] != 3))
    x = sp.csr_matrix(x.multiply(np.arange(d)[None, :] % empty_every[1] != 2))
    a, b = rng.random((n, width), dtype=dtype), rng.random((d, width), dtype=dtype)
    return x, a, b, np.repeat(np.arange(n), np.diff(x.indptr))


def evaluate_on(b, data, mu, var, w, mode, eps=None, **kwargs):
    """``evaluate`` on backend ``b`` at NumPy parameters; ``eps`` (E, N, L) fixes the noise."""
    return evaluate(
        as_counts(b, data),
        b.asarray(mu),
        b.asarray(var),
        b.asarray(w),
        mode=mode,
        noise=None if eps is None else FixedNoise(b, eps),
        n_samples=1 if eps is None else eps.shape[0],
        **kwargs,
    )


def as_numpy(b, terms) -> list:
    """The value and the three gradients of ``terms`` as NumPy arrays."""
    return [b.to_numpy(a) for a in (terms.value, terms.g_mu, terms.g_var, terms.g_w)]


def free_port() -> int:
    """A TCP port free on this machine now: a launcher's fixed port clashes with another run's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lower_bound_at(x, model) -> float:
    """The lower-bound ELBO of counts x at a fitted model's parameters, in float64 NumPy."""
    b = get_backend("numpy", dtype="float64")
    return float(
        evaluate_on(
            b,
            x,
            model.mean_,
            model.var_,
            model.loadings_,
            "lower-bound",
            prior_scale=model.prior_scale_,
            gradients=False,
        ).value
    )
