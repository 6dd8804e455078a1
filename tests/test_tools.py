"""Choosing the number of components, plots, AnnData."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import pnmf
from pnmf import PNMF, fit_anndata, make_counts, select_n_components


def test_select_n_components_finds_the_planted_number():
    x, _, _ = make_counts(300, 60, 4, random_state=11)
    table = select_n_components(x, [1, 2, 4, 8], training_mode="natural", mode="lower-bound", backend="numpy")
    assert list(table["n_components"]) == [1, 2, 4, 8]
    deviance = table["heldout_deviance"]
    assert table["best"] == 4
    assert deviance[0] > deviance[1] > deviance[2]  # underfitting costs held-out fit
    assert np.all(np.isfinite(table["train_elbo"]))


def test_select_n_components_checks_its_arguments():
    x = np.ones((5, 4))
    with pytest.raises(ValueError, match="candidates"):
        select_n_components(x, [])
    with pytest.raises(ValueError, match="fraction"):
        select_n_components(x, [1], fraction=1.0)


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
    np.testing.assert_allclose(adata.obsm["X_nmf"], model.transform(x), rtol=1e-5)  # dense vs sparse sums
    assert adata.uns["nmf"]["elbo"] == model.elbo_ and adata.uns["nmf"]["layer"] == "counts"
    np.testing.assert_array_equal(adata.uns["nmf"]["var"], model.var_)
    assert sp.issparse(adata.X)  # the data itself is untouched
