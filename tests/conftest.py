from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from hypothesis import settings

from pnmf.backends import get_backend

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
