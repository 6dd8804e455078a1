"""Bad input gets a clear error; hard input gets a finite fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

from pnmf import PNMF, EmptyComponentsWarning, consensus, make_counts, select_n_components, thin
from pnmf.elbo import MODES

from .conftest import BACKENDS

TRAININGS = ("standard", "natural")

BAD_COUNTS = {
    "negative": (np.array([[1.0, -1.0], [0.0, 2.0]]), "non-negative"),
    "nan": (np.array([[1.0, np.nan], [0.0, 2.0]]), "NaN"),
    "inf": (np.array([[1.0, np.inf], [0.0, 2.0]]), "infinite"),
    "complex": (np.array([[1 + 1j, 2], [0, 1]]), "[Cc]omplex"),
    "strings": (np.array([["a", "b"], ["c", "d"]], dtype=object), "could not convert|string"),
    "1-d": (np.array([1.0, 2.0, 3.0]), "2D array"),
    "3-d": (np.ones((2, 2, 2)), "dim"),
    "no rows": (np.ones((0, 3)), "0 sample"),
    "no columns": (np.ones((3, 0)), "0 feature"),
    "sparse negative": (sp.csr_matrix(np.array([[1.0, 0.0], [0.0, -2.0]])), "non-negative"),
    "sparse nan": (sp.csr_matrix(np.array([[1.0, 0.0], [0.0, np.nan]])), "NaN"),
    "all zero": (np.zeros((6, 5)), "no non-zero counts"),
    "sparse, only stored zeros": (sp.csr_matrix((np.zeros(2), ([0, 1], [0, 1])), shape=(3, 2)), "no non-zero counts"),
}


@pytest.mark.parametrize("case", BAD_COUNTS)
def test_bad_counts_are_named(case):
    x, message = BAD_COUNTS[case]
    with pytest.raises((ValueError, TypeError), match=message):
        PNMF(2, backend="numpy").fit(x)


BAD_PARAMS = [
    ("n_components", 0, ValueError),
    ("n_components", -3, ValueError),
    ("n_components", 2.5, TypeError),
    ("n_components", "2", TypeError),
    ("E", 0, ValueError),
    ("max_iter", -1, ValueError),
    ("learning_rate", 0.0, ValueError),
    ("learning_rate", -1e-3, ValueError),
    ("ngd_lr", 0.0, ValueError),
    ("ngd_lr", 1.5, ValueError),
    ("tol", -1.0, ValueError),
    ("prior_scale", 0.0, ValueError),
    ("init_var", -1.0, ValueError),
    ("learning_rate", float("nan"), TypeError),
    ("E", True, TypeError),
]


def test_an_anndata_in_place_of_counts_points_to_its_counts():
    anndata = pytest.importorskip("anndata")
    adata = anndata.AnnData(np.array([[1.0, 2.0], [0.0, 3.0]]))
    with pytest.raises(TypeError, match=r"X is an AnnData: pass its counts .*fit_anndata"):
        PNMF(1, backend="numpy").fit(adata)
    model = PNMF(1, backend="numpy", max_iter=5).fit(adata.X)
    with pytest.raises(TypeError, match="transform_anndata"):
        model.transform(adata)


def test_a_masked_array_is_refused_not_fitted_through_its_mask():
    # np.asarray drops the mask: the masked entries' values were fitted as counts.
    x = np.ma.masked_array(np.array([[1.0, 2.0], [0.0, 3.0], [4.0, 1e6]]), mask=[[0, 0], [0, 0], [0, 1]])
    with pytest.raises(TypeError, match=r"X is a masked array: .*X.filled\(0\)"):
        PNMF(1, backend="numpy").fit(x)
    with pytest.raises(TypeError, match="masked array"):
        thin(x)
    model = PNMF(1, backend="numpy", max_iter=5).fit(x.filled(0))
    with pytest.raises(TypeError, match="masked array"):
        model.transform(x)


def _untidy(x: sp.csr_matrix) -> sp.csr_matrix:
    """x stored untidily: every entry twice (halves, so some stored zeros), each row's
    columns in reverse order, and the arrays read-only (as memory-mapped ones are)."""
    data = np.empty(2 * x.nnz)
    data[0::2] = np.floor(x.data / 2)
    data[1::2] = x.data - data[0::2]
    indices = np.repeat(x.indices, 2)
    for row in range(x.shape[0]):
        start, stop = 2 * x.indptr[row], 2 * x.indptr[row + 1]
        data[start:stop], indices[start:stop] = data[start:stop][::-1].copy(), indices[start:stop][::-1].copy()
    untidy = sp.csr_matrix((data, indices, 2 * x.indptr), shape=x.shape)
    for array in (untidy.data, untidy.indices, untidy.indptr):
        array.setflags(write=False)
    return untidy


def test_a_matrix_with_duplicate_unsorted_and_zero_entries_is_fitted_as_is_and_left_alone(backend_name):
    # SciPy tidies such a matrix in place, even in x.sum(): the fit rewrote the caller's
    # arrays, and failed on read-only ones ("WRITEBACKIFCOPY base is read-only").
    x = sp.csr_matrix(make_counts(60, 20, 3, random_state=0)[0])
    untidy = _untidy(x)
    arrays = [a.copy() for a in (untidy.data, untidy.indices, untidy.indptr)]
    assert not untidy.has_canonical_format and abs(untidy - x).sum() == 0
    params = dict(backend=backend_name, dtype="float64", random_state=0, max_iter=30)
    model = PNMF(3, **params).fit(untidy)
    assert model.elbo_ == pytest.approx(PNMF(3, **params).fit(x).elbo_, rel=1e-12)
    np.testing.assert_allclose(model.transform(untidy), model.transform(x), rtol=1e-12)
    for before, after in zip(arrays, (untidy.data, untidy.indices, untidy.indptr)):
        np.testing.assert_array_equal(before, after)


# Two restarts of 10 iterations may agree on fewer programs than asked: not this test's matter.
@pytest.mark.filterwarnings("ignore:consensus components .* are one program split in two")
def test_selection_and_consensus_leave_an_untidy_matrix_alone():
    untidy = _untidy(sp.csr_matrix(make_counts(60, 20, 3, random_state=0)[0]))
    data = untidy.data.copy()
    select_n_components(untidy, [2, 3], max_iter=10, backend="numpy")
    consensus(untidy, 2, n_restarts=2, max_iter=10, backend="numpy", batch=np.repeat(["a", "b"], 30))
    np.testing.assert_array_equal(untidy.data, data)


def test_bad_factors_for_inverse_transform_are_named():
    model = PNMF(2, backend="numpy", max_iter=20, random_state=0).fit(np.eye(4) + 1.0)
    for h in (-np.ones((3, 2)), np.full((3, 2), np.nan)):
        with pytest.raises(ValueError, match="finite non-negative"):
            model.inverse_transform(h)
    assert model.inverse_transform(np.ones((3, 2))).shape == (3, 4)


@pytest.mark.parametrize("name, value, error", BAD_PARAMS)
def test_bad_parameters_are_named(name, value, error):
    with pytest.raises(error, match=name):
        PNMF(**{"n_components": 2, name: value}).fit(np.ones((4, 3)))


def _hard_inputs():
    rng = np.random.default_rng(0)
    zero_rows_cols = rng.poisson(3.0, (12, 8)).astype(float)
    zero_rows_cols[[2, 7]] = 0
    zero_rows_cols[:, [1, 5]] = 0
    explicit = sp.csr_matrix(rng.poisson(1.0, (10, 6)).astype(float))
    explicit.data[::3] = 0.0  # stored zeros
    return {
        "zero rows and columns": zero_rows_cols,
        "huge counts": rng.poisson(1e6, (8, 6)).astype(float) * rng.integers(0, 2, (8, 6)),
        "beyond 1e6": np.full((5, 4), 3e8) * np.eye(5, 4) + 1.0,
        "non-integer": rng.gamma(0.5, 3.0, (9, 7)),
        "single row": rng.poisson(4.0, (1, 6)).astype(float),
        "2 x 2": np.array([[0.0, 3.0], [5.0, 1.0]]),
        "int32": rng.poisson(2.0, (7, 5)).astype(np.int32),
        "float32": rng.poisson(2.0, (7, 5)).astype(np.float32),
        "sparse explicit zeros": explicit,
    }


HARD = _hard_inputs()


def _assert_finite(model, n_rows):
    assert np.isfinite(model.elbo_)
    assert np.all(np.isfinite(model.elbo_history_))
    for attribute in (model.mean_, model.var_, model.loadings_):
        assert np.all(np.isfinite(attribute))
    assert np.all(model.var_ > 0) and np.all(model.loadings_ >= 0)
    assert model.mean_.shape[0] == n_rows


@pytest.mark.filterwarnings("ignore:X holds non-integer values")  # tiny, huge and fractional values on purpose
@pytest.mark.parametrize("case", HARD)
@pytest.mark.parametrize("training_mode", TRAININGS)
@pytest.mark.parametrize("mode", MODES)
def test_hard_inputs_give_finite_fits(case, mode, training_mode, backend_name):
    x = HARD[case]
    model = PNMF(2, mode=mode, training_mode=training_mode, backend=backend_name, max_iter=40, E=3, random_state=0).fit(
        x
    )
    _assert_finite(model, x.shape[0])
    assert np.all(np.isfinite(model.transform(x)))


def test_a_non_finite_step_stops_with_a_named_error(monkeypatch):
    import pnmf.optim

    def poisoned(b, param, grad, m, v, scales):
        return param * np.nan, m, v

    monkeypatch.setattr(pnmf.optim, "adam", poisoned)
    with pytest.raises(FloatingPointError, match="ELBO became nan at iteration 2"):
        PNMF(2, backend="numpy", mode="lower-bound", training_mode="standard").fit(np.ones((4, 3)))


def test_checked_natural_steps_reject_a_non_finite_candidate(monkeypatch):
    """lower-bound natural steps recover from a NaN candidate by rejecting it."""
    import pnmf.natural

    real_update = pnmf.natural.natural_update
    calls = {"n": 0}

    def sometimes_nan(b, mu, precision, *args, **kwargs):
        calls["n"] += 1
        new_mu, new_precision = real_update(b, mu, precision, *args, **kwargs)
        return (new_mu * np.nan, new_precision) if calls["n"] == 5 else (new_mu, new_precision)

    monkeypatch.setattr(pnmf.natural, "natural_update", sometimes_nan)
    x = np.random.default_rng(1).poisson(3.0, (10, 6)).astype(float)
    model = PNMF(2, mode="lower-bound", training_mode="natural", backend="numpy", max_iter=30, tol=0).fit(x)
    _assert_finite(model, 10)
    assert np.all(np.diff(model.elbo_history_) >= -1e-6 * np.abs(model.elbo_history_[1:]))


def test_interrupt_keeps_the_parameters_and_warns(monkeypatch):
    import pnmf.optim

    real_step = pnmf.optim.StandardTrainer.step
    calls = {"n": 0}

    def interrupted(self, state, key):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real_step(self, state, key)

    monkeypatch.setattr(pnmf.optim.StandardTrainer, "step", interrupted)
    x = np.random.default_rng(2).poisson(3.0, (10, 6)).astype(float)
    with pytest.warns(RuntimeWarning, match="interrupted") as record:
        model = PNMF(2, backend="numpy", mode="expanded", training_mode="standard", max_iter=100).fit(x)
    assert record[0].filename == __file__  # the user's line
    assert not model.converged_ and model.n_iter_ == 20  # the history read before the interrupt
    _assert_finite(model, 10)
    assert model.elbo_ > -np.inf


def _interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C at the ``call``-th step of standard training."""
    import pnmf.optim

    real_step = pnmf.optim.StandardTrainer.step
    calls = {"n": 0}

    def interrupted(self, state, key):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real_step(self, state, key)

    monkeypatch.setattr(pnmf.optim.StandardTrainer, "step", interrupted)


def test_an_interrupt_stops_restarts_selections_and_commands_not_one_fit(monkeypatch, tmp_path, capsys):
    import pnmf
    from pnmf.cli import main

    x = np.random.default_rng(2).poisson(3.0, (30, 6)).astype(float)
    params = dict(backend="numpy", mode="expanded", training_mode="standard", max_iter=40, tol=0)
    _interrupt_at(monkeypatch, 60)  # in the second restart, or the second candidate
    with pytest.raises(KeyboardInterrupt):
        pnmf.consensus(x, 2, n_restarts=3, **params)
    _interrupt_at(monkeypatch, 60)
    with pytest.raises(KeyboardInterrupt):
        pnmf.select_n_components(x, [1, 2, 3], **params)
    _interrupt_at(monkeypatch, 10)
    import scipy.sparse

    scipy.sparse.save_npz(tmp_path / "x.npz", scipy.sparse.csr_matrix(x))
    command = ["fit", str(tmp_path / "x.npz"), "-k", 2, "--mode", "expanded", "--training-mode", "standard"]
    status = main([*map(str, command), "--backend", "numpy", "-o", str(tmp_path / "out")])
    assert status == 130 and "pnmf: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    _interrupt_at(monkeypatch, 10)  # a fit of its own still keeps what it reached
    with pytest.warns(RuntimeWarning, match="interrupted"):
        assert PNMF(2, **params).fit(x).n_iter_ < 40


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 10),
    n_components=st.integers(1, 4),
    density=st.floats(0.0, 1.0),
    log_scale=st.floats(-2.0, 6.0),
    sparse=st.booleans(),
    mode=st.sampled_from(MODES),
    training_mode=st.sampled_from(TRAININGS),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**16),
)
def test_property_random_problems_give_finite_reproducible_fits(
    n, d, n_components, density, log_scale, sparse, mode, training_mode, backend, seed
):
    rng = np.random.default_rng(seed)
    x = rng.poisson(10.0**log_scale, (n, d)).astype(float) * (rng.random((n, d)) < density)
    x[rng.integers(n), rng.integers(d)] += 1.0  # counts without one non-zero are refused (BAD_COUNTS)
    data = sp.csr_matrix(x) if sparse else x
    params = dict(mode=mode, training_mode=training_mode, backend=backend, max_iter=20, E=2, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings either
        warnings.simplefilter("ignore", ConvergenceWarning)  # 20 iterations: stopped early on purpose
        warnings.simplefilter("ignore", EmptyComponentsWarning)  # a single count needs one component
        first = PNMF(n_components, **params).fit(data)
    _assert_finite(first, n)
    second = PNMF(n_components, **params).fit(data)
    np.testing.assert_array_equal(first.loadings_, second.loadings_)
    np.testing.assert_array_equal(first.elbo_history_, second.elbo_history_)


def test_non_integer_counts_warn_at_the_users_line_and_counts_do_not():
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, (30, 8)).astype(float)
    normalised = np.log1p(counts)
    for data in (normalised, sp.csr_matrix(normalised)):
        with pytest.warns(UserWarning, match="non-integer values .* raw counts") as record:
            PNMF(2, backend="numpy", max_iter=5).fit(data)
        assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ConvergenceWarning)
        PNMF(2, backend="numpy", max_iter=5).fit(counts.astype(np.float32))
        PNMF(2, backend="numpy", max_iter=5).fit(sp.csr_matrix(counts))
        PNMF(2, backend="numpy", max_iter=5).fit(counts.astype(np.int64))


def test_fit_anndata_s_warning_on_values_that_are_not_counts_names_where_else_the_adata_keeps_a_matrix():
    anndata = pytest.importorskip("anndata")
    from pnmf import fit_anndata

    counts = np.random.default_rng(0).poisson(2.0, (30, 8)).astype(np.float32)
    normalised = np.log1p(counts)
    adata = anndata.AnnData(normalised)
    adata.layers["counts"] = counts
    adata.raw = anndata.AnnData(counts)
    with pytest.warns(UserWarning, match=r"adata\.X was read; this AnnData also has layer='counts', adata\.raw,"):
        fit_anndata(adata, 2, backend="numpy", max_iter=5)
    swapped = anndata.AnnData(counts)
    swapped.layers["log"] = normalised
    with pytest.warns(UserWarning, match=r"layer='log' was read; this AnnData also has adata\.X \(layer=None\)\)"):
        fit_anndata(swapped, 2, layer="log", backend="numpy", max_iter=5)
    with pytest.warns(UserWarning, match=r"\(adata\.X was read; this AnnData has no other layer and no \.raw\)"):
        fit_anndata(anndata.AnnData(normalised), 2, backend="numpy", max_iter=5)
    # Outside fit_anndata the warning is as it was: the hint is set for its fit alone.
    with pytest.warns(UserWarning, match=r"raw counts \(of an AnnData, often layers\['counts'\] or \.raw\.X\)"):
        PNMF(2, backend="numpy", max_iter=5).fit(normalised)


def test_transform_and_score_warn_on_values_that_are_not_counts_once_and_consensus_once(tmp_path):
    anndata = pytest.importorskip("anndata")
    from pnmf import transform_anndata

    counts = np.random.default_rng(0).poisson(2.0, (60, 8)).astype(np.float64)
    normalised = np.log1p(counts)
    model = PNMF(2, backend="numpy", max_iter=5, batch_size=20).fit(counts)
    for method in (model.transform, model.score, model.posterior):
        with pytest.warns(UserWarning, match="non-integer values") as record:
            method(normalised)
        assert record[0].filename == __file__
    with warnings.catch_warnings(record=True) as record:  # fit checks X, its transform does not again
        warnings.simplefilter("always")
        PNMF(2, backend="numpy", max_iter=5).fit_transform(normalised)
    assert sum("non-integer" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.transform(counts)
    # Counts on disk are transformed a block at a time (20 rows here): one warning, not three.
    query = anndata.AnnData(normalised)
    query.layers["counts"] = counts
    query.write_h5ad(tmp_path / "query.h5ad")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        transform_anndata(model, anndata.read_h5ad(tmp_path / "query.h5ad", backed="r"))
    texts = [str(w.message) for w in record if "non-integer" in str(w.message)]
    assert len(texts) == 1 and "adata.X was read; this AnnData also has layer='counts'" in texts[0]
    # A consensus checks its counts once, before the restarts, not again in its own last pass.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        consensus(normalised, 2, n_restarts=2, backend="numpy", max_iter=5)
    assert sum("non-integer" in str(w.message) for w in record) == 1
