"""Program tables: the top features of each component, by loading and by specificity."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pnmf import PNMF, EmptyComponentsWarning, make_counts
from pnmf.programs import specificity

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


@pytest.fixture(scope="module")
def too_many():
    """A fit of 10 components to counts of 5 planted programs, and its warnings."""
    x, _, _ = make_counts(400, 100, 5, random_state=0)
    with pytest.warns(EmptyComponentsWarning, match=r"the fit left \d of 10 components empty") as caught:
        model = PNMF(10, backend="numpy", random_state=0).fit(x)
    return model, caught


def test_a_fit_with_more_components_than_programs_leaves_some_empty_and_says_so(too_many):
    model, caught = too_many
    empty = model.empty_components_
    assert 0 < len(empty) <= 5 and str(len(empty)) in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning names the user's line
    sums = model.loadings_.sum(axis=0)
    used = np.setdiff1d(np.arange(10), empty)
    assert sums[empty].max() < 1e-6 * sums.max() and sums[used].min() > 1e-3 * sums.max()  # a wide gap
    # An empty component's factors keep their prior, N(0, 1).
    np.testing.assert_allclose(model.mean_[:, empty], 0.0, atol=1e-3)
    np.testing.assert_allclose(model.var_[:, empty], 1.0, rtol=1e-3)
    # They add nothing to the rate; only the components in use have top features.
    h = np.exp(model.mean_ + model.var_ / 2)
    rate = model.inverse_transform(h)
    np.testing.assert_allclose(h[:, used] @ model.components_[used], rate, rtol=1e-6)
    assert sorted(set(model.top_features(3).component)) == list(used)


def test_a_fit_of_as_many_components_as_programs_warns_of_none():
    x, _, _ = make_counts(400, 100, 5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyComponentsWarning)
        model = PNMF(5, backend="numpy", random_state=0).fit(x)
    assert model.empty_components_.size == 0
    with pytest.raises(Exception, match="not fitted"):
        _ = PNMF(2).empty_components_


def test_an_empty_component_changes_no_other_components_specificity():
    rng = np.random.default_rng(3)
    w = rng.gamma(0.5, 1.0, (40, 3))
    # Loadings a fit shrank to nothing: zeros, or subnormal float32 noise.
    for empty in (np.zeros(40), rng.random(40) * 1e-40):
        score = specificity(np.column_stack([w[:, :2], empty, w[:, 2]]))
        np.testing.assert_allclose(score[:, [0, 1, 3]], specificity(w), rtol=1e-12, atol=1e-300)
        assert np.all(score[:, 2] == 0.0)


def test_plot_loadings_draws_no_features_for_an_empty_component():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from pnmf import plot

    rng = np.random.default_rng(1)
    w = rng.gamma(0.5, 1.0, (40, 3))
    model = with_loadings(np.column_stack([w, np.zeros(40)]), [f"g{d}" for d in range(40)])
    ax = plot.loadings(model, top=4)
    drawn = [t.get_text() for t in ax.get_yticklabels()]
    assert drawn == [
        t.get_text() for t in plot.loadings(with_loadings(w, [f"g{d}" for d in range(40)]), top=4).get_yticklabels()
    ]
    assert ax.get_title().endswith("empty: component 3")


def test_fit_anndata_names_the_empty_components_and_keeps_them_out_of_its_table(tmp_path):
    anndata = pytest.importorskip("anndata")
    import pnmf

    x, _, _ = make_counts(400, 100, 5, random_state=0)
    adata = anndata.AnnData(x)
    adata.var_names = [f"gene{d}" for d in range(100)]
    with pytest.warns(EmptyComponentsWarning):
        model = pnmf.fit_anndata(adata, 10, random_state=0, backend="numpy")
    stored = adata.uns["pnmf"]
    assert model.empty_components_.size > 0
    np.testing.assert_array_equal(stored["empty_components"], model.empty_components_)
    assert set(stored["top_features"].component).isdisjoint(model.empty_components_)
    adata.write_h5ad(tmp_path / "a.h5ad")  # an array of indices, empty or not, survives the file
    back = anndata.read_h5ad(tmp_path / "a.h5ad").uns["pnmf"]
    np.testing.assert_array_equal(back["empty_components"], model.empty_components_)
    plain = anndata.AnnData(make_counts(120, 30, 3, random_state=2)[0])
    pnmf.fit_anndata(plain, 3, random_state=0)
    plain.write_h5ad(tmp_path / "b.h5ad")
    assert anndata.read_h5ad(tmp_path / "b.h5ad").uns["pnmf"]["empty_components"].size == 0
