"""Size factors and batch effects: recovery, every path, reference mapping, files and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from pnmf import PNMF
from pnmf.benchmarks.batches import batch_accuracy, matched_cosine
from pnmf.data import make_batched_counts
from pnmf.scaling import batch_sums

from .conftest import BACKENDS

NATURAL = dict(mode="lower-bound", training_mode="natural", dtype="float64", random_state=0)


@pytest.fixture(scope="module")
def planted():
    return make_batched_counts(600, 200, 6, random_state=42)


@pytest.fixture(scope="module")
def small():
    return make_batched_counts(150, 40, 3, random_state=7)


def test_batch_aware_fit_recovers_the_programs_and_forgets_the_batch(planted):
    """3 batches (log g sd 0.5), size factors (log s sd 0.6), 6 programs: the plain fit's
    factors give the batch away and miss the loadings; the batch-aware fit's do neither."""
    x, labels = planted["X"], planted["batch"]
    plain = PNMF(6, **NATURAL).fit(x)
    aware = PNMF(6, size_factors="total", **NATURAL).fit(x, batch=labels)
    assert matched_cosine(aware.loadings_, planted["W"]) >= 0.9
    assert matched_cosine(plain.loadings_, planted["W"]) < 0.85
    chance = 1 / 3
    assert batch_accuracy(aware.transform(x, batch=labels), labels) < chance + 0.1
    assert batch_accuracy(plain.transform(x), labels) > 0.9
    assert aware.elbo_ > plain.elbo_
    # The posterior-mean rate of the rows carries their size factors and batch effects.
    factors = aware.transform(x, batch=labels)
    rate = aware.inverse_transform(factors, size_factors=aware.size_factors_, batch=labels)
    expected = aware.size_factors_[:, None] * aware.batch_effects_[np.arange(600) % 3] * (factors @ aware.components_)
    np.testing.assert_allclose(rate, expected, rtol=1e-12)
    plain_rate = factors @ aware.components_
    assert np.corrcoef(rate.ravel(), x.ravel())[0, 1] > np.corrcoef(plain_rate.ravel(), x.ravel())[0, 1]
    # The fitted batch effects follow the planted ones, up to each feature's scale.
    fitted, true = np.log(aware.batch_effects_), np.log(planted["batch_effects"])
    assert np.corrcoef((fitted - fitted.mean(0)).ravel(), (true - true.mean(0)).ravel())[0, 1] > 0.9


def test_attributes_and_the_normalisation_of_batch_effects(small):
    x, labels = small["X"], small["batch"]
    model = PNMF(3, size_factors="total", **NATURAL).fit(x, batch=labels)
    assert list(model.batches_) == ["batch0", "batch1", "batch2"]
    assert model.batch_effects_.shape == (3, 40)
    totals = x.sum(axis=1)
    np.testing.assert_allclose(model.size_factors_, totals / totals.mean())
    assert model.reference_total_ == pytest.approx(totals.mean())
    # Each feature's count-weighted mean of g over the batches is 1.
    xb = batch_sums(x, np.searchsorted(model.batches_, labels), 3)
    np.testing.assert_allclose((xb * model.batch_effects_).sum(0), xb.sum(0), rtol=1e-10)
    # Integer labels work as well and come back sorted.
    codes = np.array([7, 3, 5])[np.arange(len(x)) % 3]
    assert list(PNMF(3, max_iter=20, **NATURAL).fit(x, batch=codes).batches_) == [3, 5, 7]


def test_size_factors_alone_are_a_constant_in_the_factors(small):
    """Doubling every size factor halves W and leaves q(F) and the ELBO's fit where they were."""
    x, s = small["X"], small["size_factors"]
    one = PNMF(3, **NATURAL).fit(x, size_factors=s)
    two = PNMF(3, **NATURAL).fit(x, size_factors=2 * s)
    np.testing.assert_allclose(two.loadings_ * 2, one.loadings_, rtol=1e-6)
    np.testing.assert_allclose(two.mean_, one.mean_, rtol=1e-6, atol=1e-9)
    assert one.batches_ is None and one.batch_effects_ is None
    # With size factors given to fit, new rows need theirs.
    with pytest.raises(ValueError, match="pass size_factors="):
        one.transform(x)
    np.testing.assert_allclose(one.transform(x, size_factors=s), one.fit_transform(x, size_factors=s), rtol=1e-8)


PATHS = [
    dict(mode="lower-bound", training_mode="natural"),
    dict(mode="lower-bound", training_mode="standard", learning_rate=0.05),
    dict(mode="expanded", training_mode="natural"),
    dict(mode="expanded", training_mode="standard", learning_rate=0.05),
    dict(mode="simple", training_mode="natural"),
    dict(mode="simple", training_mode="standard", learning_rate=0.05, loadings_update="multiplicative"),
    dict(mode="lower-bound", training_mode="natural", loadings_update="adam"),
]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(str(v) for k, v in p.items() if k != "learning_rate"))
def test_every_path_fits_batches_better_than_without(small, path, sparse):
    """In every mode, training mode and loadings update, dense and sparse, the batch-aware fit
    beats the plain one on the ELBO and gets closer to the planted loadings."""
    x = sp.csr_matrix(small["X"]) if sparse else small["X"]
    params = dict(dtype="float64", random_state=0, max_iter=400, **path)
    aware = PNMF(3, size_factors="total", **params).fit(x, batch=small["batch"])
    plain = PNMF(3, **params).fit(x)
    assert np.isfinite(aware.elbo_) and aware.batch_effects_.shape == (3, 40)
    assert aware.elbo_ > plain.elbo_ + 0.01 * abs(plain.elbo_)
    assert matched_cosine(aware.loadings_, small["W"]) > matched_cosine(plain.loadings_, small["W"])


@pytest.mark.parametrize("name", BACKENDS[1:])
def test_backends_agree_with_batches(small, name):
    """A deterministic batch-aware fit gives NumPy's loadings and batch effects on every backend."""
    x, labels = sp.csr_matrix(small["X"]), small["batch"]
    # 30 steps: past them MLX's float32-accurate exp and log (even in float64) move the
    # near-zero loadings of this small problem by more than rounding.
    params = dict(NATURAL, max_iter=30, tol=0, size_factors="total")
    reference = PNMF(3, backend="numpy", **params).fit(x, batch=labels)
    other = PNMF(3, backend=name, device="cpu", **params).fit(x, batch=labels)
    rtol = 1e-4 if name == "mlx" else 1e-8  # MLX's float64 transcendental functions are float32-accurate
    np.testing.assert_allclose(other.loadings_, reference.loadings_, rtol=rtol)
    np.testing.assert_allclose(other.batch_effects_, reference.batch_effects_, rtol=rtol)


def test_minibatch_fit_with_batches(planted):
    """Mini-batch SVI moves g with W: the programs are found and the factors forget the batch."""
    x, labels = planted["X"], planted["batch"]
    model = PNMF(6, size_factors="total", batch_size=100, max_iter=300, **NATURAL).fit(x, batch=labels)
    assert matched_cosine(model.loadings_, planted["W"]) >= 0.85
    assert batch_accuracy(np.exp(model.mean_ + model.var_ / 2), labels) < 1 / 3 + 0.15
    xb = batch_sums(x, np.searchsorted(model.batches_, labels), 3)
    np.testing.assert_allclose((xb * model.batch_effects_).sum(0), xb.sum(0), rtol=1e-10)


@pytest.mark.parametrize("dense", [False, True])
def test_minibatch_batch_effects_of_genes_without_counts_in_a_step(dense):
    """Sparse counts in 4 batches, steps of 60 rows (15 of each batch): many genes have no
    counts among a step's rows of a batch, and 3 have none at all. Each step's own closed-form
    g was 0 for them, and the next step's loadings update 0/0: the ELBO became -inf."""
    from pnmf.data import thin

    data = make_batched_counts(600, 800, 6, n_batches=4, random_state=3)
    x = sp.csr_matrix(thin(data["X"], 0.003, random_state=1)[0])
    silent = np.asarray(x.sum(axis=0)).ravel() == 0
    assert silent.sum() == 3
    x = x.toarray() if dense else x
    model = PNMF(6, batch_size=60, max_iter=100, random_state=0).fit(x, batch=data["batch"])
    full = PNMF(6, random_state=0).fit(x, batch=data["batch"])
    # 100 steps of 60 rows with 6% non-zero: the noise of small steps, not a failure
    assert np.isfinite(model.elbo_) and abs(model.elbo_ - full.elbo_) < 0.25 * abs(full.elbo_)
    assert np.isfinite(model.loadings_).all() and np.isfinite(model.batch_effects_).all()
    # the genes without counts fade out: their loadings (averaged over the last steps) are
    # far below every other gene's largest one (2e-11 against 2e-3 measured)
    assert model.loadings_[silent].max() < 1e-6 * model.loadings_[~silent].max(axis=1).min()


def test_reference_mapping_estimates_the_effects_of_a_new_batch(planted):
    """Fit on two batches; map the third. Its g is estimated with the loadings fixed: it follows
    the planted one, and the new rows' ELBO beats borrowing a seen batch's g."""
    x, labels, h = planted["X"], planted["batch"], planted["H"]
    seen = labels != "batch2"
    model = PNMF(6, size_factors="total", **NATURAL).fit(x[seen], batch=labels[seen])
    new, new_labels = x[~seen], labels[~seen]
    names, g = model.map_batches(new, batch=new_labels)
    assert list(names) == ["batch0", "batch1", "batch2"]
    np.testing.assert_array_equal(g[:2], model.batch_effects_)
    # log g of the new batch against batch0's, as planted: the features' common scale cancels.
    fitted, true = np.log(g), np.log(planted["batch_effects"])
    assert np.corrcoef(fitted[2] - fitted[0], true[2] - true[0])[0, 1] > 0.95
    borrowed = np.full(len(new), "batch0")
    assert model.score(new, batch=new_labels) > model.score(new, batch=borrowed) + 100
    mapped = model.transform(new, batch=new_labels)
    c = np.corrcoef(np.log(mapped).T, np.log(h[~seen]).T)[:6, 6:]
    assert c[linear_sum_assignment(-c)].mean() > 0.8
    # Seen labels keep their g: the seen rows' factors are the fit's.
    np.testing.assert_allclose(
        model.transform(x[seen], batch=labels[seen]), model.fit_transform(x[seen], batch=labels[seen]), rtol=1e-6
    )
    with pytest.raises(ValueError, match="fitted without batches"):
        PNMF(6, max_iter=5, **NATURAL).fit(x).map_batches(new, batch=new_labels)


def test_save_and_load_keep_size_factors_labels_and_effects(small, tmp_path):
    x, labels = small["X"], small["batch"]
    for batch in (labels, np.arange(len(x)) % 3):
        model = PNMF(3, size_factors="total", max_iter=100, **NATURAL).fit(x, batch=batch)
        loaded = PNMF.load(model.save(tmp_path / "model"))
        np.testing.assert_array_equal(loaded.batches_, model.batches_)
        assert loaded.batches_.dtype.kind == model.batches_.dtype.kind
        np.testing.assert_array_equal(loaded.batch_effects_, model.batch_effects_)
        np.testing.assert_array_equal(loaded.size_factors_, model.size_factors_)
        assert loaded.reference_total_ == model.reference_total_
        np.testing.assert_allclose(loaded.transform(x, batch=batch), model.transform(x, batch=batch), rtol=1e-12)
    plain = PNMF.load(PNMF(3, max_iter=10, **NATURAL).fit(x).save(tmp_path / "plain"))
    assert plain.batches_ is None and plain.batch_effects_ is None and plain.size_factors_ is None


def test_bad_size_factors_and_batches_are_named_before_any_work(small):
    x, labels = small["X"], small["batch"]
    model = PNMF(3, **NATURAL)
    cases = [
        (dict(size_factors=np.ones(10)), "size_factors has 10 entries"),
        (dict(size_factors=np.r_[0.0, np.ones(149)]), "must be > 0; row 0"),
        (dict(size_factors=np.r_[np.ones(149), -1.0]), "must be > 0; row 149"),
        (dict(size_factors=np.r_[np.nan, np.ones(149)]), "must be finite; row 0"),
        (dict(size_factors=np.r_[np.inf, np.ones(149)]), "must be finite"),
        (dict(batch=labels[:-1]), "one label per row"),
        (dict(batch=np.r_[[None], labels[1:]].astype(object)), "must not be missing"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.fit(x, **kwargs)
        assert not hasattr(model, "loadings_")
    emptied = x.copy()
    emptied[labels == "batch1"] = 0
    with pytest.raises(ValueError, match="batch 'batch1' has no counts"):
        model.fit(emptied, batch=labels)
    empty_row = x.copy()
    empty_row[4] = 0
    with pytest.raises(ValueError, match="row 4 has none"):
        PNMF(3, size_factors="total").fit(empty_row)
    with pytest.raises(ValueError, match="size_factors='median' is not one of"):
        PNMF(3, size_factors="median").fit(x)
    with pytest.raises(TypeError, match="go to fit"):
        PNMF(3, size_factors=np.ones(150)).fit(x)
    fitted = PNMF(3, max_iter=20, **NATURAL).fit(x, batch=labels)
    with pytest.raises(ValueError, match="fitted with batches"):
        fitted.transform(x)
    with pytest.raises(ValueError, match="fitted without batches"):
        PNMF(3, max_iter=20, **NATURAL).fit(x).transform(x, batch=labels)


def test_input_arrays_are_not_modified(small):
    x, labels, s = small["X"].copy(), small["batch"].copy(), small["size_factors"].copy()
    PNMF(3, max_iter=30, **NATURAL).fit(x, size_factors=s, batch=labels)
    np.testing.assert_array_equal(x, small["X"])
    np.testing.assert_array_equal(labels, small["batch"])
    np.testing.assert_array_equal(s, small["size_factors"])


def test_fit_anndata_reads_batches_and_size_factors_from_obs(small):
    anndata = pytest.importorskip("anndata")
    import pandas as pd

    obs = pd.DataFrame(
        {"sample": pd.Categorical(small["batch"]), "depth": small["size_factors"]},
        index=[f"cell{i}" for i in range(150)],
    )
    adata = anndata.AnnData(sp.csr_matrix(small["X"]), obs=obs)
    model = pnmf_fit_anndata(adata, 3, batch_key="sample", size_factors="depth", **NATURAL)
    stored = adata.uns["pnmf"]
    assert list(stored["batches"]) == ["batch0", "batch1", "batch2"]
    np.testing.assert_array_equal(stored["batch_effects"], model.batch_effects_)
    np.testing.assert_array_equal(stored["size_factors"], small["size_factors"])
    direct = PNMF(3, **NATURAL).fit(small["X"], size_factors=small["size_factors"], batch=small["batch"])
    np.testing.assert_allclose(model.loadings_, direct.loadings_, rtol=1e-8)
    np.testing.assert_allclose(
        adata.obsm["X_pnmf"],
        direct.transform(small["X"], size_factors=small["size_factors"], batch=small["batch"]),
        rtol=1e-6,
    )
    from pnmf import transform_anndata

    mapped = adata.obsm["X_pnmf"].copy()
    np.testing.assert_allclose(
        transform_anndata(model, adata, batch_key="sample", size_factors="depth"), mapped, rtol=1e-6
    )
    with pytest.raises(ValueError, match="pass batch_key=, the column of adata.obs"):
        transform_anndata(model, adata, size_factors="depth")  # the model has batch effects: which apply?
    plain = PNMF(3, **NATURAL).fit(small["X"])
    with pytest.raises(ValueError, match="batch_key= was given but this model was fitted without batches"):
        transform_anndata(plain, adata, batch_key="sample")
    with pytest.raises(KeyError, match="batch_key='donor'"):
        pnmf_fit_anndata(adata, 3, batch_key="donor")
    unlabelled = adata.copy()
    unlabelled.obs.loc["cell7", "sample"] = np.nan  # not a batch called 'nan'
    with pytest.raises(ValueError, match=r"obs\['sample'\] has 1 missing label \(first: row 'cell7'\)"):
        pnmf_fit_anndata(unlabelled, 3, batch_key="sample")
    with pytest.raises(KeyError, match="size_factors='depth2'"):
        pnmf_fit_anndata(adata, 3, size_factors="depth2")


def pnmf_fit_anndata(*args, **kwargs):
    from pnmf import fit_anndata

    return fit_anndata(*args, **kwargs)


def test_the_batch_effects_plot_shows_the_most_shifted_features(planted):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pnmf import plot

    model = PNMF(6, size_factors="total", **NATURAL).fit(planted["X"], batch=planted["batch"])
    ax = plot.batch_effects(model, top=12)
    shown = ax.images[0].get_array()
    centred = np.log2(model.batch_effects_) - np.log2(model.batch_effects_).mean(axis=0)
    spread = np.ptp(centred, axis=0)
    assert shown.shape == (3, 12) and np.allclose(shown.mean(axis=0), 0.0)
    # The 12 columns are the features with the largest spread between batches.
    assert np.ptp(shown, axis=0).min() >= np.sort(spread)[-12] - 1e-12
    assert [t.get_text() for t in ax.get_yticklabels()] == ["batch0", "batch1", "batch2"]
    # They are features the planted effects shift too: their planted spread is above the median.
    planted_spread = np.ptp(np.log2(planted["batch_effects"]), axis=0)
    columns = [int(t.get_text()) for t in ax.get_xticklabels()]
    assert np.median(planted_spread[columns]) > np.median(planted_spread)
    with pytest.raises(ValueError, match="no batch effects"):
        plot.batch_effects(PNMF(6, **NATURAL).fit(planted["X"]))
