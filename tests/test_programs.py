"""Program tables: the top features of each component, by loading and by specificity."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pnmf import PNMF, make_counts

pd = pytest.importorskip("pandas")


def with_loadings(w, names=None) -> PNMF:
    model = PNMF(w.shape[1])
    model.loadings_ = np.asarray(w, dtype=float)
    if names is not None:
        model.feature_names_in_ = np.asarray(names, dtype=object)
    return model


def test_a_feature_every_component_uses_tops_the_loadings_but_not_the_specificity():
    rng = np.random.default_rng(0)
    w = rng.gamma(0.5, 1.0, (30, 3))
    w[0] = 50.0  # a housekeeping feature, loud in every component
    w[1] = [20.0, 0.01, 0.01]  # specific to component 0
    table = with_loadings(w, [f"g{d}" for d in range(30)]).top_features(n=3)
    assert list(table.columns) == ["component", "ranking", "rank", "feature", "loading", "specificity"]
    assert len(table) == 3 * 2 * 3
    by_loading = table[(table.ranking == "loading") & (table["rank"] == 0)]
    assert list(by_loading.feature) == ["g0", "g0", "g0"]
    specific = table[table.ranking == "specificity"]
    assert "g0" not in set(specific[specific.component == 0].feature)
    assert specific[(specific.component == 0) & (specific["rank"] == 0)].feature.item() == "g1"
    np.testing.assert_allclose(table.loading, w[table.feature.str[1:].astype(int), table.component])
    phi = w / w.sum(axis=0)
    expected = phi * np.log(phi / phi.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(table.specificity, expected[table.feature.str[1:].astype(int), table.component])
    # ranked: each (component, ranking) block is sorted by its score
    for (_, ranking), block in table.groupby(["component", "ranking"]):
        assert np.all(np.diff(block[ranking].to_numpy()) <= 0)


def test_the_fitted_programs_name_the_planted_ones():
    x, _, w = make_counts(300, 80, 4, random_state=3)
    model = PNMF(4, random_state=0).fit(x)
    names = [f"gene{d}" for d in range(80)]
    table = model.top_features(n=10, feature_names=names)
    cosines = (model.loadings_ / np.linalg.norm(model.loadings_, axis=0)).T @ (w / np.linalg.norm(w, axis=0))
    fitted, planted = linear_sum_assignment(-cosines)
    for l, p in zip(fitted, planted):
        mine = set(table[(table.component == l) & (table.ranking == "loading")].feature)
        truth = {names[d] for d in np.argsort(-w[:, p])[:10]}
        assert len(mine & truth) >= 7


def test_top_features_checks_its_arguments(monkeypatch):
    model = with_loadings(np.ones((5, 2)))
    with pytest.raises(ValueError, match="feature_names has 3 entries; the model has 5"):
        model.top_features(feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        model.top_features(n=0)
    assert len(model.top_features(n=50)) == 2 * 2 * 5  # at most every feature
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        model.top_features()
    with pytest.raises(Exception, match="not fitted"):
        PNMF(2).top_features()


def test_plot_loadings_takes_its_rows_from_the_table():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pnmf import plot

    rng = np.random.default_rng(1)
    model = with_loadings(rng.gamma(0.5, 1.0, (40, 3)), [f"g{d}" for d in range(40)])
    table = model.top_features(n=4)
    ax = plot.loadings(model, table=table)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == list(
        dict.fromkeys(table[table.ranking == "specificity"].sort_values(["component", "rank"]).feature)
    )
    assert plot.loadings(model, top=4).get_yticklabels()[0].get_text() == labels[0]
    with pytest.raises(ValueError, match="does not have"):
        plot.loadings(model, table=table.assign(feature="nope"))


def test_fit_anndata_stores_the_program_table(tmp_path):
    anndata = pytest.importorskip("anndata")
    x, _, _ = make_counts(120, 30, 3, random_state=2)
    adata = anndata.AnnData(x)
    adata.var_names = [f"gene{d}" for d in range(30)]
    import pnmf

    model = pnmf.fit_anndata(adata, 3, random_state=0)
    table = adata.uns["pnmf"]["top_features"]
    assert set(table.feature) <= set(adata.var_names) and len(table) == 3 * 2 * 20
    pd.testing.assert_frame_equal(table, model.top_features(20, feature_names=adata.var_names))
    adata.write_h5ad(tmp_path / "a.h5ad")  # the table survives the file
    back = anndata.read_h5ad(tmp_path / "a.h5ad").uns["pnmf"]["top_features"]
    assert list(back.feature) == list(table.feature)
