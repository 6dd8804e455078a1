"""Laplace variances of the log-factors: ``posterior(X, method="laplace")``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

import pnmf.laplace
from pnmf import PNMF, make_counts
from pnmf.data import make_batched_counts


def log_joint(model, x, f, s, g_row) -> float:
    """log p(x, F | W) of one row, up to a constant: the oracle the Hessian is taken of."""
    rate = s * g_row * (np.exp(f) @ model.loadings_.T)
    return float((x * np.log(rate) - rate).sum() - 0.5 * (f**2 / model.prior_scale_**2).sum())


def numerical_hessian(fn, f, step=1e-4) -> np.ndarray:
    n = len(f)
    hessian = np.empty((n, n))
    for i, j in np.ndindex(n, n):
        a, b = np.eye(n)[i] * step, np.eye(n)[j] * step
        hessian[i, j] = (fn(f + a + b) - fn(f + a - b) - fn(f - a + b) + fn(f - a - b)) / (4 * step**2)
    return hessian


def test_laplace_variances_are_the_inverse_hessian_of_the_log_joint_with_size_factors_and_batches():
    data = make_batched_counts(300, 60, 4, random_state=0)
    x, batch = data["X"], data["batch"]
    model = PNMF(4, size_factors="total", dtype="float64", random_state=0, backend="numpy").fit(x, batch=batch)
    mean, var = model.posterior(x, batch=batch, method="laplace")
    q_mean, q_var = model.posterior(x, batch=batch)
    np.testing.assert_array_equal(mean, q_mean)  # the same means
    codes = np.searchsorted(model.batches_, batch)
    for n in (0, 1, 150, 299):
        args = (model, x[n], model.size_factors_[n], model.batch_effects_[codes[n]])
        hessian = numerical_hessian(lambda f, args=args: log_joint(args[0], args[1], f, *args[2:]), mean[n])
        expected = np.diag(np.linalg.inv(-hessian))
        np.testing.assert_allclose(var[n], expected, rtol=1e-4)
    assert np.all(var > q_var)  # explaining away: wider than q's, row by row
    # Sparse counts, and blocks of rows of any size, give the same variances.
    np.testing.assert_allclose(model.posterior(sp.csr_matrix(x), batch=batch, method="laplace")[1], var, rtol=1e-10)


def test_laplace_intervals_cover_the_planted_log_factors_where_qs_do_not():
    x, h, w = make_counts(400, 100, 5, random_state=0)
    model = PNMF(5, dtype="float64", random_state=0, backend="numpy").fit(x)
    # The fitted components in the planted order and scale: F = log h + log(planted W / fitted W).
    fitted = model.loadings_
    cosine = (fitted / np.linalg.norm(fitted, axis=0)).T @ (w / np.linalg.norm(w, axis=0))
    rows, cols = linear_sum_assignment(-cosine)
    order = rows[np.argsort(cols)]
    scale = np.median(w / fitted[:, order], axis=0)
    planted = np.log(h) + np.log(scale)

    def coverage(mean, var) -> float:
        mean, sd = mean[:, order], np.sqrt(var[:, order])
        return float(np.mean(np.abs(planted - mean) < 1.96 * sd))

    laplace = coverage(*model.posterior(x, method="laplace"))
    variational = coverage(*model.posterior(x))
    assert 0.88 <= laplace <= 0.99 and variational < 0.8, (laplace, variational)  # 0.923 and 0.682 measured


def test_laplace_variances_of_counts_on_disk_and_in_blocks_are_those_in_memory(tmp_path, monkeypatch):
    anndata = pytest.importorskip("anndata")
    x, _, _ = make_counts(300, 50, 4, random_state=1)
    model = PNMF(4, batch_size=100, dtype="float64", random_state=0, backend="numpy").fit(x)
    in_memory = model.posterior(x, method="laplace")[1]
    anndata.AnnData(sp.csr_matrix(x)).write_h5ad(tmp_path / "x.h5ad")
    backed = anndata.read_h5ad(tmp_path / "x.h5ad", backed="r")
    np.testing.assert_allclose(model.posterior(backed.X, method="laplace")[1], in_memory, rtol=1e-8)
    monkeypatch.setattr(pnmf.laplace, "BLOCK_ENTRIES", 50)  # blocks of about three rows
    np.testing.assert_allclose(model.posterior(x, method="laplace")[1], in_memory, rtol=1e-12)


def test_a_row_where_the_log_joint_is_not_concave_keeps_qs_variance_with_a_warning(monkeypatch):
    x, h, w = make_counts(200, 40, 4, random_state=2)
    # Far from a mode the negative Hessian need not be positive definite: NaN, counted.
    far = np.log(h) + np.random.default_rng(0).normal(0, 1.5, h.shape)
    found, failed = pnmf.laplace.laplace_variance(x, far, w, np.ones(4))
    assert failed == int(np.isnan(found).any(axis=1).sum()) > 0
    assert np.all(found[~np.isnan(found).any(axis=1)] > 0)
    model = PNMF(4, random_state=0, backend="numpy").fit(x)
    original = pnmf.estimator.laplace_variance

    def one_fails(*args):
        var, _ = original(*args)
        var[3] = np.nan
        return var, 1

    monkeypatch.setattr(pnmf.estimator, "laplace_variance", one_fails)
    with pytest.warns(UserWarning, match="not concave at q's mean in 1 of 200 rows") as caught:
        _, var = model.posterior(x, method="laplace")
    assert caught[0].filename == __file__
    np.testing.assert_array_equal(var[3], model.posterior(x)[1][3])
    with pytest.raises(ValueError, match="method='exact' is not one of"):
        model.posterior(x, method="exact")
