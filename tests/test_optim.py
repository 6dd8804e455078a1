"""Adam against torch.optim.Adam, the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from pnmf.optim import adam, adam_scales

from .conftest import cpu_backend


def test_adam_matches_torch_adam_ascent():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    b = cpu_backend("numpy", "float64")
    start = rng.normal(size=(4, 3))
    grads = rng.normal(scale=[[1e-3], [1.0], [10.0], [1e3]], size=(6, 4, 3))  # gradients of every scale
    oracle = torch.nn.Parameter(torch.tensor(start))
    optimizer = torch.optim.Adam([oracle], lr=0.01, betas=(0.9, 0.999), eps=1e-8, maximize=True)
    param, m, v = start, np.zeros_like(start), np.zeros_like(start)
    for t, grad in enumerate(grads, start=1):
        oracle.grad = torch.tensor(grad)
        optimizer.step()
        param, m, v = adam(b, param, grad, m, v, adam_scales(b.scalar(float(t)), 0.01))
        np.testing.assert_allclose(param, oracle.detach().numpy(), rtol=1e-12, atol=1e-15)
