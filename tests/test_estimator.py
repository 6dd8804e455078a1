"""The estimator's contract: fitting, attributes, inference, backends and errors."""

from __future__ import annotations

import builtins
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import NotFittedError

from pnmf import PNMF, make_counts, poisson_deviance, select_n_components, thin

from .conftest import BACKENDS, lower_bound_at


def _matched_cosines(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Cosine similarity of each true column with its best-matched estimated column."""
    a = estimated / np.linalg.norm(estimated, axis=0)
    b = truth / np.linalg.norm(truth, axis=0)
    similarity = a.T @ b
    rows, cols = linear_sum_assignment(-similarity)
    return similarity[rows, cols]


@pytest.fixture(scope="module")
def planted():
    return make_counts(200, 100, 5, random_state=42)


@pytest.mark.parametrize(
    "training_mode, mode", [("natural", "lower-bound"), ("natural", "expanded"), ("standard", "lower-bound")]
)
def test_fit_raises_the_elbo_and_recovers_planted_loadings(planted, backend_name, training_mode, mode):
    x, _, w_true = planted
    model = PNMF(
        5,
        mode=mode,
        training_mode=training_mode,
        backend=backend_name,
        random_state=0,
        max_iter=1500 if training_mode == "standard" else 600,
    ).fit(x)
    assert model.elbo_history_[-1] > model.elbo_history_[0]
    assert model.elbo_ > model.elbo_history_[0] + 0.5 * abs(model.elbo_)
    assert np.min(_matched_cosines(model.loadings_, w_true)) > 0.9


def test_fitted_attributes(planted):
    x, _, _ = planted
    model = PNMF(4, mode="expanded", training_mode="natural", backend="numpy", random_state=0, max_iter=100)
    h = model.fit_transform(x)
    n, d = x.shape
    assert h.shape == (n, 4) and model.components_.shape == (4, d) and model.loadings_.shape == (d, 4)
    assert model.mean_.shape == model.var_.shape == (n, 4)
    np.testing.assert_array_equal(model.components_, model.loadings_.T)
    np.testing.assert_array_equal(h, model.transform(x))  # fit_transform(X) == fit(X).transform(X)
    assert np.all(model.var_ > 0) and np.all(model.loadings_ >= 0)
    assert model.n_iter_ == len(model.elbo_history_) <= 100
    assert isinstance(model.converged_, bool) and model.n_features_in_ == d
    assert model.backend_ == "numpy" and model.device_ == "cpu"
    assert all(isinstance(a, np.ndarray) for a in (model.mean_, model.var_, model.loadings_, model.elbo_history_))
    # The posterior-mean rate is H @ components_.
    np.testing.assert_allclose(model.inverse_transform(h), h @ model.components_)


def test_elbo_is_recomputable_from_the_attributes(planted):
    x, _, _ = planted
    model = PNMF(
        5, mode="lower-bound", training_mode="natural", backend="numpy", dtype="float64", random_state=0, max_iter=50
    ).fit(x)
    value = lower_bound_at(x, model)
    assert model.elbo_ == pytest.approx(value, rel=1e-12)


def test_max_iter_is_a_cap_and_tol_zero_runs_to_it(planted):
    x, _, _ = planted
    for training_mode in ("standard", "natural"):
        model = PNMF(3, mode="expanded", training_mode=training_mode, backend="numpy", max_iter=37, tol=0).fit(x)
        assert model.n_iter_ == 37 and not model.converged_
    early = PNMF(3, mode="lower-bound", training_mode="natural", backend="numpy", max_iter=5000, tol=1e-3).fit(x)
    assert early.converged_ and early.n_iter_ < 5000


def test_every_backend_starts_from_the_same_point_and_agrees(planted):
    x, _, _ = planted
    fits = [
        PNMF(5, mode="lower-bound", training_mode="natural", backend=name, random_state=0, max_iter=30, tol=0).fit(x)
        for name in BACKENDS
    ]
    for other in fits[1:]:
        np.testing.assert_allclose(other.elbo_history_[0], fits[0].elbo_history_[0], rtol=1e-5)
        np.testing.assert_allclose(other.elbo_history_, fits[0].elbo_history_, rtol=1e-3)


def test_sparse_fit_equals_dense_fit(planted, backend_name):
    x, _, _ = planted
    params = dict(
        mode="expanded",
        training_mode="natural",
        backend=backend_name,
        random_state=0,
        max_iter=40,
        tol=0,
        dtype="float64" if backend_name != "mlx" else "float32",
    )
    dense = PNMF(4, **params).fit(x)
    sparse = PNMF(4, **params).fit(sp.csr_matrix(x))
    np.testing.assert_allclose(sparse.loadings_, dense.loadings_, rtol=1e-3, atol=1e-6)
    assert sparse.elbo_ == pytest.approx(dense.elbo_, rel=1e-4)


def test_transform_is_deterministic_and_agrees_with_fit(planted):
    x, _, _ = planted
    model = PNMF(
        5, mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, max_iter=2000, tol=1e-7
    ).fit(x)
    h_fit = np.exp(model.mean_ + model.var_ / 2)
    h1, h2 = model.transform(x), model.transform(x)
    np.testing.assert_array_equal(h1, h2)
    # Inference with the loadings fixed finds (nearly) the training posterior again.
    assert np.median(np.abs(h1 - h_fit) / h_fit) < 0.05
    assert model.score(x) == pytest.approx(model.elbo_, rel=1e-3)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_transform_makes_no_product_for_the_loadings_it_keeps_fixed(planted, backend_name, sparse, monkeypatch):
    from pnmf.backends.base import Backend
    from pnmf.elbo import DenseCounts, SparseCounts

    x, _, _ = planted
    data = sp.csr_matrix(x) if sparse else x
    model = PNMF(5, backend=backend_name, max_iter=30, random_state=0).fit(data)
    expected = model.transform(data[:40])

    def refuse(*args, **kwargs):
        raise AssertionError("a product over X's transpose, for d/dW, with the loadings fixed")

    for backend in Backend.__subclasses__():
        if "sparse_matmul_t" in vars(backend):
            monkeypatch.setattr(backend, "sparse_matmul_t", refuse)
    for counts in (DenseCounts, SparseCounts):
        log_term = counts.log_term

        def checked(self, a, w, second, loadings=True, _log_term=log_term):
            assert loadings is False
            result = _log_term(self, a, w, second, loadings)
            assert result[2] is None
            return result

        monkeypatch.setattr(counts, "log_term", checked)
    np.testing.assert_array_equal(model.transform(data[:40]), expected)


def test_posterior_of_new_rows_is_what_transform_reads_and_narrows_with_more_counts(planted):
    x, _, _ = planted
    model = PNMF(5, backend="numpy", dtype="float64", random_state=0, max_iter=2000, tol=1e-7).fit(x)
    mean, var = model.posterior(x[:50])
    assert mean.shape == var.shape == (50, 5) and np.all(var > 0)
    np.testing.assert_allclose(np.exp(mean + var / 2), model.transform(x[:50]), rtol=1e-12)
    # The training rows' posterior again (the fit's is the same optimum, reached from elsewhere).
    assert np.median(np.abs(mean - model.mean_[:50])) < 0.05
    assert np.median(var / model.var_[:50]) == pytest.approx(1, abs=0.05)
    # Ten times the counts at the same proportions: the same factors, known ten times better.
    deep_mean, deep_var = model.posterior(10 * x[:50])
    assert np.median(deep_var / var) < 0.2
    assert np.median(np.abs(deep_mean - np.log(10) - mean)) < 0.1
    with pytest.raises(NotFittedError):
        PNMF(2).posterior(x)


def test_score_prefers_the_right_data(planted):
    x, _, _ = planted
    train, test = thin(x, 0.5, random_state=0)
    model = PNMF(5, mode="lower-bound", training_mode="natural", backend="numpy", random_state=0).fit(train)
    shuffled = np.random.default_rng(0).permutation(test.ravel()).reshape(test.shape)
    assert model.score(test) > model.score(shuffled)


def test_thinning_and_deviance(planted):
    x, _, _ = planted
    train, test = thin(x, 0.5, random_state=1)
    np.testing.assert_array_equal(train + test, x)
    assert np.all(train >= 0) and np.all(test >= 0)
    assert abs(train.sum() / x.sum() - 0.5) < 0.01
    strain, stest = thin(sp.csr_matrix(x), 0.5, random_state=1)
    np.testing.assert_array_equal((strain + stest).toarray(), x)
    rate = x + 0.5
    assert poisson_deviance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert poisson_deviance(sp.csr_matrix(x), rate) == pytest.approx(poisson_deviance(x, rate))
    assert poisson_deviance(x, rate) > 0
    # Only counts split: a fraction would leave a negative part (2.6 = 3 + -0.4).
    for bad, message in ((x + 0.6, "non-integer values, such as"), (-x, "non-negative"), (x * np.nan, "NaN")):
        with pytest.raises(ValueError, match=message):
            thin(bad, 0.5, random_state=1)
        with pytest.raises(ValueError, match=message):
            select_n_components(bad, [1, 2], backend="numpy")


def test_input_is_not_modified(planted):
    x, _, _ = planted
    dense, sparse = x.copy(), sp.csr_matrix(x)
    sparse_copy = sparse.copy()
    for data in (dense, sparse):
        PNMF(3, backend="numpy", max_iter=5).fit(data).transform(data)
    np.testing.assert_array_equal(dense, x)
    assert (sparse != sparse_copy).nnz == 0


@pytest.mark.parametrize(
    "param, value",
    [
        ("mode", "exact"),
        ("training_mode", "fast"),
        ("backend", "jax"),
        ("init", "svd"),
        ("loadings_update", "sgd"),
        ("dtype", "float16"),
    ],
)
def test_unknown_names_raise_valueerror_naming_the_value(param, value):
    with pytest.raises(ValueError, match=f"{param}='{value}'"):
        PNMF(2, **{param: value}).fit(np.ones((3, 3)))


def test_bad_counts_raise_before_backend_work():
    with pytest.raises(ValueError, match="non-negative"):
        PNMF(2).fit(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        PNMF(2).fit(np.full((3, 3), np.nan))
    with pytest.raises(NotFittedError):
        PNMF(2).transform(np.ones((3, 3)))
    model = PNMF(2, backend="numpy", max_iter=5).fit(np.ones((3, 3)))
    with pytest.raises(ValueError, match="features"):
        model.transform(np.ones((3, 4)))


def test_missing_framework_names_the_fix(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.delitem(sys.modules, "pnmf.backends.torch", raising=False)
    with pytest.raises(ImportError, match="pip install"):
        PNMF(2, backend="torch").fit(np.ones((3, 3)))


def test_auto_backend_picks_the_fastest_cpu_choice(planted):
    """On a CPU: NumPy for dense counts, torch (when installed) for sparse ones."""
    x, _, _ = planted
    dense = PNMF(2, backend="auto", max_iter=3).fit(x)
    assert dense.backend_ == "numpy" and dense.device_ == "cpu"
    sparse = PNMF(2, backend="auto", max_iter=3).fit(sp.csr_matrix(x))
    assert sparse.backend_ == ("torch" if "torch" in BACKENDS else "numpy") and sparse.device_ == "cpu"
    assert sparse.transform(x).shape == (x.shape[0], 2)  # a fitted model keeps its backend


def test_device_choice_is_checked():
    with pytest.raises(ValueError, match="device"):
        PNMF(2, backend="numpy", device="cuda").fit(np.ones((3, 3)))


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch is not installed")
def test_a_device_torch_cannot_use_is_named_with_the_reason_and_the_devices_there_are():
    import torch

    from pnmf.backends.torch import TorchBackend, devices

    here = ", ".join(devices())
    assert devices()[0] == "cpu"
    if not torch.backends.mps.is_available():  # torch's own text was a page on operator registration
        with pytest.raises(
            ValueError, match=f"device='mps' is not available to torch: MPS needs a Mac.*; devices here: {here}$"
        ):
            TorchBackend("mps")
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match=f"device='cuda:0' .*: no CUDA GPU is visible to it .*; devices here: {here}$"
        ):
            TorchBackend("cuda:0")
    with pytest.raises(ValueError, match="device='gpu' .*: torch names its GPUs 'cuda' and 'mps'"):
        TorchBackend("gpu")


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch is not installed")
def test_a_cuda_device_is_checked_without_a_tensor_on_it(monkeypatch):
    """A tensor would open a CUDA context on the current GPU: GPU 0 in each process of a
    torchrun launch, before its process group puts it on its own."""
    import torch

    from pnmf.backends.torch import TorchBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    made = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(k.get("device")) or empty(*a, **k))
    assert TorchBackend("cuda").device == "cuda" and TorchBackend("cuda:1").device == "cuda:1"
    assert made == []
    with pytest.raises(ValueError, match="device='cuda:2' is not available to torch: there is no CUDA device 2 "):
        TorchBackend("cuda:2")
    TorchBackend("cpu")
    assert made == [torch.device("cpu")]  # other devices are tried with an empty tensor


def test_with_backend_auto_the_device_picks_the_framework(monkeypatch):
    import pnmf.backends as backends

    if "torch" in BACKENDS:  # CUDA is torch's: its own error here, not NumPy's
        with pytest.raises(ValueError, match="device='cuda' is not available to torch"):
            backends.get_backend("auto", "cuda")
    if "mlx" in BACKENDS:  # 'gpu' is MLX's
        if ("mlx", "gpu") in backends.gpu_devices():
            assert backends.get_backend("auto", "gpu").name == "mlx"
        else:
            with pytest.raises(ValueError, match="device='gpu' is not available to this MLX install"):
                backends.get_backend("auto", "gpu")
    # A GPU found, the CPU asked for: the CPU's own choice (NumPy for dense counts).
    monkeypatch.setattr(backends, "_auto", lambda sparse=False: ("torch", "cuda"))
    assert backends.get_backend("auto", "cpu").name == "numpy"
    assert backends.get_backend("auto", "cpu", sparse=True).name == ("torch" if "torch" in BACKENDS else "numpy")


def test_verbose_shows_a_progress_bar_with_the_elbo(planted, capsys):
    x, _, _ = planted
    PNMF(3, backend="numpy", max_iter=30, tol=0, verbose=True).fit(x)
    err = capsys.readouterr().err
    assert "PNMF fit" in err and "elbo=" in err
    PNMF(3, backend="numpy", max_iter=30, tol=0).fit(x)
    assert capsys.readouterr().err == ""  # silent by default


def test_mini_batch_reaches_the_full_batch_elbo():
    x, _, w_true = make_counts(2000, 60, 5, random_state=3)
    params = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0)
    full = PNMF(5, **params).fit(x)
    batched = PNMF(5, batch_size=100, max_iter=300, **params).fit(sp.csr_matrix(x))
    assert batched.n_iter_ == 300 and batched.mean_.shape == (2000, 5)
    assert abs(batched.elbo_ - full.elbo_) < 0.01 * abs(full.elbo_)
    assert np.min(_matched_cosines(batched.loadings_, w_true)) > 0.9
    # elbo_ is the full-data ELBO at the returned parameters.
    assert batched.elbo_ == pytest.approx(lower_bound_at(x, batched), rel=1e-5)


def test_a_feature_missing_from_the_first_batch_keeps_its_loadings():
    # Sparse rows: most features have no counts among the first batch's 50 rows, whose
    # multiplicative update gives them loadings 0. A first step that moved W all the way
    # there zeroed 773 of these 1000 features' loadings for good (multiplicative updates
    # keep a 0): after 20 steps the ELBO was -342,654 against -111,844.
    from pnmf.benchmarks.speed import sparse_counts

    x = sparse_counts(1000, 1000, 5000)
    params = dict(mode="lower-bound", training_mode="natural", random_state=0, tol=0)
    batched = PNMF(5, batch_size=50, max_iter=100, **params).fit(x)
    assert (batched.loadings_.max(axis=1) > 0).all()
    full = PNMF(5, **params, max_iter=500).fit(x)
    assert batched.elbo_ > 1.5 * full.elbo_  # 5 nonzeros a row: steps of 50 rows are noisy


def test_mini_batch_needs_natural_training():
    with pytest.raises(ValueError, match="batch_size"):
        PNMF(2, batch_size=10, training_mode="standard").fit(np.ones((20, 3)))


def test_auto_prior_scale_is_fitted_per_component_and_raises_the_elbo(tmp_path):
    """prior_scale='auto' ends at its closed form s_l^2 = mean_n(mu^2 + var), with a higher ELBO
    than the fixed scale 1 it starts from; the model file keeps it and transform uses it."""
    x, _, _ = make_counts(300, 60, 4, random_state=5)
    params = dict(mode="lower-bound", training_mode="natural", dtype="float64", random_state=0, tol=1e-7)
    auto = PNMF(4, prior_scale="auto", max_iter=3000, **params).fit(x)
    fixed = PNMF(4, max_iter=3000, prior_scale=1.0, **params).fit(x)
    np.testing.assert_allclose(auto.prior_scale_**2, (auto.mean_**2 + auto.var_).mean(axis=0), rtol=1e-3)
    np.testing.assert_array_equal(fixed.prior_scale_, np.ones(4))
    assert np.ptp(auto.prior_scale_) > 0.05 and auto.elbo_ > fixed.elbo_
    loaded = PNMF.load(auto.save(tmp_path / "auto"))
    np.testing.assert_array_equal(loaded.prior_scale_, auto.prior_scale_)
    np.testing.assert_allclose(loaded.transform(x), auto.transform(x), rtol=1e-10)
    # transform infers q(F) under the fitted scales: under scale 1 the factors differ
    assert not np.allclose(auto.transform(x), PNMF.load(fixed.save(tmp_path / "fixed")).transform(x), rtol=1e-2)
    # The scale is fitted once a first phase with it held at 1 has settled (about 1,300
    # iterations of Adam here).
    for mode, training in (("expanded", "natural"), ("simple", "standard")):
        model = PNMF(4, mode=mode, training_mode=training, prior_scale="auto", max_iter=3000, random_state=0).fit(x)
        assert model.converged_ and np.isfinite(model.elbo_) and np.ptp(model.prior_scale_) > 0.05
    svi = PNMF(4, prior_scale="auto", batch_size=50, max_iter=200, **params).fit(x)
    np.testing.assert_allclose(svi.prior_scale_, auto.prior_scale_, rtol=0.15)
    with pytest.raises(ValueError, match="prior_scale='fit' is not one of 'auto'"):
        PNMF(4, prior_scale="fit").fit(x)


@pytest.mark.parametrize("batch_size", [None, 200])
def test_a_fitted_prior_scale_waits_for_the_programs_to_form(batch_size):
    """Sparse counts with depths (2,000 x 2,000, 6% non-zero, 10 programs). Fitted from the
    first step, the prior scales shrank the factors before the programs had formed: the
    ELBO ended below the fixed scale's (-884,472 against -884,055), and in mini-batches
    every scale fell to 0.02. Held at 1 until the fit first settles (for the first 100
    steps in mini-batches), they end at 0.3-0.5 and the ELBO beats the fixed scale's."""
    from pnmf.benchmarks.batches import matched_cosine
    from pnmf.data import make_batched_counts

    data = make_batched_counts(2000, 2000, 10, n_batches=4, random_state=3)
    x = sp.csr_matrix(thin(data["X"], 0.003, random_state=1)[0])
    params = dict(size_factors="total", random_state=0, batch_size=batch_size, max_iter=300)
    fixed = PNMF(10, **params).fit(x)
    auto = PNMF(10, prior_scale="auto", **params).fit(x)
    assert auto.prior_scale_.min() > 0.2 and auto.elbo_ > fixed.elbo_
    assert matched_cosine(auto.loadings_, data["W"]) > matched_cosine(fixed.loadings_, data["W"]) - 0.05


def test_a_fitted_prior_scale_does_not_switch_a_planted_component_off():
    # Fitted from the first step, from this seed one scale fell to 0.024 and never came back:
    # ELBO -108,950.1 where the other seeds reach -103,196 to -103,199.
    x = make_counts(1200, 40, 4, random_state=3)[0]
    params = dict(dtype="float64", backend="numpy", prior_scale="auto", size_factors="total", max_iter=3000)
    model = PNMF(4, random_state=0, **params).fit(x)
    other = PNMF(4, random_state=1, **params).fit(x)
    assert model.prior_scale_.min() > 0.3 and model.elbo_ == pytest.approx(other.elbo_, rel=1e-3)


def test_a_fit_stopped_by_max_iter_warns_as_scikit_learn_does():
    from sklearn.exceptions import ConvergenceWarning

    x, _, _ = make_counts(100, 30, 3, random_state=5)
    params = dict(mode="lower-bound", training_mode="natural", random_state=0)
    with pytest.warns(ConvergenceWarning, match="max_iter=5") as record:
        model = PNMF(3, max_iter=5, **params).fit(x)
    assert not model.converged_
    # The warning names the user's line, also from fit_transform and mini-batch fits (it
    # named pnmf/estimator.py from those).
    assert record[0].filename == __file__
    for fit in (PNMF(3, max_iter=5, **params).fit_transform, PNMF(3, max_iter=5, batch_size=50, **params).fit):
        with pytest.warns(ConvergenceWarning) as record:
            fit(x)
        assert record[0].filename == __file__, record[0].filename
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PNMF(3, max_iter=2000, **params).fit(x).converged_  # converged: no warning
        PNMF(3, max_iter=5, tol=0, **params).fit(x)  # tol=0 asks for max_iter iterations
