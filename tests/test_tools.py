"""Choosing the number of components, plots, AnnData."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import pnmf
from pnmf import PNMF, fit_anndata, make_counts, select_n_components, transform_anndata


def test_select_n_components_finds_the_planted_number():
    x, _, _ = make_counts(300, 60, 4, random_state=11)
    table = select_n_components(x, [1, 2, 4, 8], training_mode="natural", mode="lower-bound", backend="numpy")
    assert list(table["n_components"]) == [1, 2, 4, 8]
    deviance = table["heldout_deviance"]
    assert table["best"] == 4
    assert deviance[0] > deviance[1] > deviance[2]  # underfitting costs held-out fit
    assert np.all(np.isfinite(table["train_elbo"]))


def test_each_candidate_and_its_restarts_are_logged_as_they_come(caplog):
    x, _, _ = make_counts(100, 30, 2, random_state=1)
    with caplog.at_level("INFO", logger="pnmf"):
        table = select_n_components(x, [1, 3], n_restarts=2, backend="numpy", max_iter=50)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["K=1", "K=1", "K=3", "K=3"]  # restarts, then the result
    assert lines[1].startswith(f"K=1: held-out deviance {table['heldout_deviance'][0]:.6g}, stability")
    assert "2 restarts fitted" in lines[2]


def test_select_n_components_checks_its_arguments():
    x = np.ones((5, 4))
    with pytest.raises(ValueError, match="candidates"):
        select_n_components(x, [])
    with pytest.raises(ValueError, match="fraction"):
        select_n_components(x, [1], fraction=1.0)
    with pytest.raises(TypeError, match=r"candidates\[0\]=2.5 must be an integer"):  # was fitted as K=2
        select_n_components(x, [2.5, 3])
    with pytest.raises(ValueError, match=r"candidates\[1\]=0 must be >= 1"):
        select_n_components(x, np.array([2, 0]))
    with pytest.raises(ValueError, match="names 3 more than once"):  # it fitted K=3 twice, a table of repeats
        select_n_components(x, [2, 3, 3])


@pytest.fixture(scope="module")
def model():
    x, _, _ = make_counts(80, 30, 3, random_state=12)
    return PNMF(3, training_mode="natural", mode="lower-bound", backend="numpy", random_state=0).fit(x)


def test_plots_draw_what_they_say(model):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = pnmf.plot.elbo_history(model)
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), model.elbo_history_)
    names = [f"gene{i}" for i in range(30)]
    ax = pnmf.plot.loadings(model, feature_names=names, top=4)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 3 < len(labels) <= 12 and set(labels) <= set(names)
    top_feature = names[int(np.argmax(model.loadings_[:, 0] * model.loadings_[:, 0] / model.loadings_.sum(1)))]
    assert top_feature in labels
    with pytest.raises(ValueError, match="feature_names"):
        pnmf.plot.loadings(model, feature_names=names[:5])
    ax = pnmf.plot.factors(model, component=1)
    assert np.all(np.diff(ax.lines[0].get_ydata()) >= 0)  # rows sorted by posterior mean
    with pytest.raises(ValueError, match="component=3 is not one of the model's 3"):  # was NumPy's IndexError
        pnmf.plot.factors(model, component=3)
    table = {"n_components": np.array([4, 6, 8]), "heldout_deviance": np.array([3.0, 1.0, 2.0]), "best": 6}
    ax = pnmf.plot.n_components(table)
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [3.0, 1.0, 2.0])
    ax.figure.canvas.draw()
    ticks = ax.get_xticks()
    assert np.array_equal(ticks, np.round(ticks)) and {4, 6, 8} <= set(ticks)  # numbers of components only


def test_fit_anndata_writes_the_model_into_the_object():
    anndata = pytest.importorskip("anndata")
    x, _, _ = make_counts(40, 25, 3, random_state=13)
    adata = anndata.AnnData(X=sp.csr_matrix(x))
    adata.layers["counts"] = sp.csr_matrix(x)
    model = fit_anndata(
        adata, 3, layer="counts", key_added="nmf", training_mode="natural", backend="numpy", random_state=0
    )
    assert adata.obsm["X_nmf"].shape == (40, 3)
    np.testing.assert_array_equal(adata.varm["NMF"], model.loadings_)
    np.testing.assert_allclose(adata.obsm["X_nmf"], transform_anndata(model, adata, "counts", "q"), rtol=1e-5)
    assert adata.obsm["X_q"].shape == (40, 3)
    assert adata.uns["nmf"]["elbo"] == model.elbo_ and adata.uns["nmf"]["layer"] == "counts"
    np.testing.assert_array_equal(adata.uns["nmf"]["var"], model.var_)
    assert sp.issparse(adata.X)  # the data itself is untouched
    # Normalised data in place of counts: the warning names the user's line (it named
    # pnmf/estimator.py through fit_anndata).
    adata.layers["normalised"] = sp.csr_matrix(np.log1p(x))
    with pytest.warns(UserWarning, match="non-integer values") as record:
        fit_anndata(adata, 3, layer="normalised", backend="numpy", max_iter=5)
    assert record[0].filename == __file__
    adata.raw = adata  # counts in .raw: the error says how to fit them
    with pytest.raises(KeyError, match=r"not a layer of adata .*fit_anndata\(adata.raw.to_adata\(\), ...\)"):
        fit_anndata(adata, 3, layer="raw.X", backend="numpy")


def test_what_fit_anndata_stores_is_written_and_read_back_as_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    from pathlib import Path

    x, _, _ = make_counts(40, 25, 3, random_state=13)
    adata = anndata.AnnData(X=sp.csr_matrix(x))
    model = fit_anndata(adata, 3, backend="numpy", random_state=0, checkpoint=Path(tmp_path / "fit.npz"))
    transform_anndata(model, adata, key_added="again")
    adata.write_h5ad(tmp_path / "out.h5ad")  # a checkpoint Path among the params broke this
    read = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert read.uns["pnmf"]["params"]["checkpoint"] == str(tmp_path / "fit.npz")
    assert read.uns["pnmf"]["params"]["n_components"] == 3
    np.testing.assert_array_equal(read.obsm["X_again"], adata.obsm["X_again"])
    assert list(read.uns["pnmf"]["top_features"].columns) == list(model.top_features(2).columns)


def test_a_layer_that_is_not_there_is_named_with_the_layers_that_are():
    anndata = pytest.importorskip("anndata")
    x = make_counts(20, 6, 2)[0]
    adata = anndata.AnnData(sp.csr_matrix(x), layers={"raw": sp.csr_matrix(x)})
    with pytest.raises(KeyError, match=r"layer='counts' is not a layer of adata \(its layers: raw\)"):
        fit_anndata(adata, 2, layer="counts")
    model = fit_anndata(adata, 2, layer="raw", max_iter=5)
    with pytest.raises(KeyError, match="its layers: raw"):
        transform_anndata(model, adata, layer="counts")


def test_transform_anndata_matches_genes_by_name(tmp_path):
    anndata = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    x, _, _ = make_counts(60, 20, 3, random_state=4)
    genes = np.array([f"g{j}" for j in range(20)])
    adata = anndata.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes))
    model = fit_anndata(adata, 3, backend="numpy", dtype="float64", random_state=0)
    np.testing.assert_array_equal(model.feature_names_in_, genes)
    assert set(model.top_features(2).feature) <= set(genes)  # the genes' names, not column numbers
    # A query with the genes shuffled, two more of them, and on disk.
    order = np.random.default_rng(0).permutation(20)
    extra = np.random.default_rng(1).poisson(1.0, (60, 2)).astype(float)
    query = anndata.AnnData(
        sp.csr_matrix(np.hstack([x[:, order], extra])), var=pd.DataFrame(index=[*genes[order], "new1", "new2"])
    )
    query.write_h5ad(tmp_path / "query.h5ad")
    backed = anndata.read_h5ad(tmp_path / "query.h5ad", backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no complaint about names: they were matched
        factors = transform_anndata(model, backed)
    np.testing.assert_allclose(factors, adata.obsm["X_pnmf"], rtol=1e-8)
    np.testing.assert_array_equal(backed.obsm["X_pnmf"], factors)
    with pytest.raises(ValueError, match="lacks 1 of the model's 20 features .*'g5'"):
        transform_anndata(model, query[:, query.var_names != "g5"].copy())
    with pytest.raises(ValueError, match="has 19 features; the model was fitted on 20"):
        transform_anndata(PNMF(3, backend="numpy", max_iter=5).fit(x), anndata.AnnData(sp.csr_matrix(x[:, 1:])))


@pytest.mark.parametrize("missing", ["torch", "mlx", "matplotlib", "pandas"])
def test_a_missing_extra_names_this_distributions_extra(monkeypatch, missing):
    import sys
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        extras = set(metadata("pnmf-vi").get_all("Provides-Extra"))
    except PackageNotFoundError:
        pytest.skip("pnmf-vi is not installed as a distribution here")
    model = PNMF(2, backend="numpy", max_iter=5).fit(make_counts(20, 6, 2)[0])
    calls = {
        "torch": ("pnmf.backends.torch", lambda: PNMF(2, backend="torch").fit(np.ones((3, 3)))),
        "mlx": ("pnmf.backends.mlx", lambda: PNMF(2, backend="mlx").fit(np.ones((3, 3)))),
        "matplotlib": ("matplotlib.pyplot", lambda: pnmf.plot.elbo_history(model)),
        "pandas": ("pandas", lambda: model.top_features(3)),
    }
    module, call = calls[missing]
    monkeypatch.setitem(sys.modules, module, None)  # an import of it fails, as when it is not installed
    with pytest.raises(ImportError) as raised:
        call()
    named = re.findall(r"pnmf[-\w]*\[(\w+)\]", str(raised.value))
    assert named and all(extra in extras for extra in named), str(raised.value)
    assert re.findall(r"([\w-]+)\[", str(raised.value))[0] == "pnmf-vi"  # not the other project 'pnmf'


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_a_framework_older_than_needed_is_named_with_the_upgrade(monkeypatch, framework):
    # MLX 0.26 lacked mx.is_available: backend='auto' crashed with an AttributeError.
    from pnmf import backends

    module = pytest.importorskip({"torch": "torch", "mlx": "mlx.core"}[framework])
    major, minor = backends.MINIMUM[framework].split(".")
    old = f"{major}.{int(minor) - 1}.9+cpu"
    monkeypatch.setattr(module, "__version__", old)
    with pytest.raises(
        ImportError,
        match=rf"needs {framework} >= [\d.]+, and {framework} {re.escape(old)} is installed: pip install -U",
    ):
        PNMF(2, backend=framework).fit(np.ones((3, 3)))
    assert framework not in backends.available()
    assert PNMF(2, max_iter=3).fit(np.ones((3, 3))).backend_ == "numpy"  # 'auto' passes it over
