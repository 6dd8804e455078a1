"""scikit-learn compatibility and persistence."""

from __future__ import annotations

import pickle
import warnings

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import check_estimator

from pnmf import PNMF, make_counts

from .conftest import BACKENDS


@pytest.mark.filterwarnings("ignore:X holds non-integer values")  # scikit-learn's checks fit random reals
def test_check_estimator_passes_every_check():
    # float64: the subset-invariance check asks transform of one row and of 20 rows to agree
    # within 1e-7, one float32 rounding, and BLAS sums a row differently in different batches.
    results = check_estimator(PNMF(n_components=2, max_iter=20, backend="numpy", dtype="float64"), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) >= 40


def test_params_roundtrip_and_clone():
    model = PNMF(3, mode="lower-bound", training_mode="natural", ngd_lr=0.5, random_state=4)
    assert model.get_params()["ngd_lr"] == 0.5
    model.set_params(E=7, tol=1e-3)
    twin = clone(model)
    assert twin.get_params() == model.get_params() and twin is not model


@pytest.fixture(scope="module")
def fitted():
    x, _, _ = make_counts(60, 20, 3, random_state=5)
    return x, PNMF(3, mode="lower-bound", training_mode="natural", backend="numpy", random_state=0).fit(x)


def test_pickle_and_joblib(fitted, tmp_path):
    x, model = fitted
    for restored in (pickle.loads(pickle.dumps(model)), _joblib_roundtrip(model, tmp_path)):
        np.testing.assert_array_equal(restored.loadings_, model.loadings_)
        np.testing.assert_array_equal(restored.transform(x), model.transform(x))


def _joblib_roundtrip(model, tmp_path):
    joblib.dump(model, tmp_path / "model.joblib")
    return joblib.load(tmp_path / "model.joblib")


@pytest.mark.parametrize("target", BACKENDS)
def test_save_and_load_into_any_backend(fitted, tmp_path, target):
    x, model = fitted
    path = model.save(tmp_path / "model")
    assert path.suffix == ".npz"
    loaded = PNMF.load(path, backend=target, device="cpu")
    assert loaded.backend_ == target
    for name in ("loadings_", "components_", "mean_", "var_", "elbo_history_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.elbo_ == model.elbo_ and loaded.n_iter_ == model.n_iter_
    np.testing.assert_allclose(loaded.transform(x), model.transform(x), rtol=1e-3)
    # Loaded as saved when no backend is named.
    assert PNMF.load(path).get_params() == model.get_params()


def test_a_model_fitted_on_a_device_missing_here_loads_onto_what_is_here(fitted, tmp_path):
    x, model = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as saved, where it can run: silently
        assert PNMF.load(model.save(tmp_path / "here.npz")).backend_ == model.backend_
    away = clone(model).set_params(backend="torch", device="cuda:7")
    vars(away).update({k: v for k, v in vars(model).items() if k.endswith("_")})
    away.backend_, away.device_ = "torch", "cuda:7"  # as a GPU cluster would have saved it
    with pytest.warns(UserWarning, match=r"fitted on torch \(cuda:7\), which is not available here") as record:
        loaded = PNMF.load(away.save(tmp_path / "away.npz"))
    assert record[0].filename == __file__
    assert loaded.device_ == "cpu" and loaded.get_params()["backend"] == "auto"
    np.testing.assert_allclose(loaded.transform(x), model.transform(x), rtol=1e-3)


def test_load_rejects_foreign_and_damaged_files(fitted, tmp_path):
    _, model = fitted
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.ones(3))
    with pytest.raises(ValueError, match="not a pnmf model file: an .npz archive of a$"):
        PNMF.load(foreign)
    counts = tmp_path / "counts.npz"  # SciPy's sparse counts, given where the model goes
    sp.save_npz(counts, sp.csr_matrix(np.eye(3)))
    with pytest.raises(ValueError, match=r"not a pnmf model file: an \.npz archive of .*indptr"):
        PNMF.load(counts)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a pnmf model file .*: it is not an .npz archive$"):
        PNMF.load(text)  # was numpy's advice to load it as a pickle
    one_array = tmp_path / "loadings.npy"  # np.save's file (was: TypeError, "context manager protocol")
    np.save(one_array, model.loadings_)
    with pytest.raises(ValueError, match=r"not a pnmf model .*one array of shape \(\d+, \d+\)"):
        PNMF.load(one_array)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(model.save(tmp_path / "good").read_bytes()[:300])
    with pytest.raises(ValueError, match="not a pnmf model"):
        PNMF.load(damaged)
    with pytest.raises(FileNotFoundError):
        PNMF.load(tmp_path / "missing.npz")


def test_works_in_a_pipeline():
    x, _, _ = make_counts(50, 15, 2, random_state=6)
    pipe = make_pipeline(FunctionTransformer(np.round), PNMF(2, backend="numpy", max_iter=50, random_state=0))
    h = pipe.fit_transform(x)
    assert h.shape == (50, 2) and np.all(np.isfinite(h))


def test_output_columns_are_named_and_pandas_output_keeps_the_rows():
    pd = pytest.importorskip("pandas")
    x, _, _ = make_counts(40, 12, 3, random_state=2)
    frame = pd.DataFrame(x, index=[f"cell{i}" for i in range(40)], columns=[f"g{j}" for j in range(12)])
    model = PNMF(3, backend="numpy", max_iter=30, random_state=0).fit(frame)
    assert list(model.get_feature_names_out()) == ["pnmf0", "pnmf1", "pnmf2"]
    h = model.set_output(transform="pandas").transform(frame)
    assert list(h.columns) == ["pnmf0", "pnmf1", "pnmf2"] and list(h.index) == list(frame.index)
    np.testing.assert_allclose(h.to_numpy(), model.set_output(transform="default").transform(frame))
