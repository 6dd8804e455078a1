"""Consensus over restarts and choosing K with it."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import pnmf
from pnmf import PNMF, make_counts, select_n_components
from pnmf.data import thin


@pytest.fixture(scope="module")
def seed_counts():
    return make_counts(200, 100, 5, random_state=42)


def matched_cosine(w, planted) -> float:
    cosines = (w / np.linalg.norm(w, axis=0)).T @ (planted / np.linalg.norm(planted, axis=0))
    rows, cols = linear_sum_assignment(-cosines)
    return float(cosines[rows, cols].min())


def test_consensus_finds_the_planted_programs_stably(seed_counts):
    x, _, w = seed_counts
    model = pnmf.consensus(x, 5, n_restarts=6, random_state=0, backend="numpy")
    assert matched_cosine(model.loadings_, w) > 0.95
    assert model.stability_ > 0.95 and model.n_outliers_ == 0
    assert model.restart_elbos_.shape == (6,) and len(set(model.restart_elbos_)) == 6  # different seeds
    # Its factors are refitted to the consensus loadings: transform finds them again.
    np.testing.assert_allclose(model.transform(x), np.exp(model.mean_ + model.var_ / 2), rtol=1e-5)
    assert np.isfinite(model.elbo_) and model.elbo_ >= np.median(model.restart_elbos_) - 1e-4 * abs(model.elbo_)
    again = pnmf.consensus(x, 5, n_restarts=6, random_state=0, backend="numpy")
    np.testing.assert_array_equal(again.loadings_, model.loadings_)  # deterministic
    # The restarts share one copy of X on the device and are the fits each seed gives alone
    # (fitted together as lanes, their float32 sums round differently: see test_restarts).
    seeds = np.random.RandomState(0).randint(np.iinfo(np.int32).max, size=6)
    alone = [PNMF(5, random_state=int(seed), backend="numpy").fit(x).elbo_ for seed in seeds]
    np.testing.assert_allclose(model.restart_elbos_, alone, rtol=1e-5)


def test_too_many_components_are_unstable_and_lose_outliers(seed_counts):
    x, _, _ = seed_counts
    planted = pnmf.consensus(x, 5, n_restarts=6, random_state=0, backend="numpy")
    with pytest.warns(UserWarning, match="one program split in two"):  # a restart's lone component
        too_many = pnmf.consensus(x, 7, n_restarts=6, random_state=0, backend="numpy")
    assert too_many.stability_ < planted.stability_ - 0.1
    assert too_many.n_outliers_ > 0 == planted.n_outliers_
    # What the consensus plot draws: each of the 6 x 7 components, its consensus component or
    # -1, and its density against the threshold (NaN: a restart left it empty).
    labels, density = too_many.restart_labels_, too_many.local_density_
    assert labels.shape == (42,) and set(labels) == {-1, *range(7)}
    empty = np.isnan(density)
    assert np.array_equal(labels < 0, empty | (density > too_many.density_threshold_))
    assert (labels[~empty] < 0).sum() == too_many.n_outliers_
    assert too_many.restart_similarity_.shape == (42, 42)
    np.testing.assert_allclose(np.diag(too_many.restart_similarity_), 1.0, rtol=1e-5)
    # The members of a consensus component are alike.
    members = [np.flatnonzero(labels == l) for l in range(7)]
    for l, rows in enumerate(members):
        within = too_many.restart_similarity_[np.ix_(rows, rows)].mean()
        assert within > 0.9, (l, within)


@pytest.mark.filterwarnings("ignore:consensus components")
def test_the_consensus_plot_groups_components_and_marks_the_threshold(seed_counts):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    x, _, _ = seed_counts
    model = pnmf.consensus(x, 7, n_restarts=6, random_state=0, backend="numpy")
    left, right = pnmf.plot.consensus(model)
    shown = left.images[0].get_array()
    labels = model.restart_labels_
    # Rows grouped by consensus component, the outliers last.
    order = np.argsort(np.where(labels < 0, 99, labels), kind="stable")
    np.testing.assert_array_equal(shown, model.restart_similarity_[np.ix_(order, order)])
    assert right.lines[0].get_xdata()[0] == model.density_threshold_
    assert f"{model.n_outliers_} dropped" in right.get_legend().get_texts()[0].get_text()
    with pytest.raises(ValueError, match="not a consensus"):
        pnmf.plot.consensus(PNMF(5, backend="numpy", max_iter=5).fit(x))
    with pytest.raises(ValueError, match="no ELBO history.*restart_elbos_"):
        pnmf.plot.elbo_history(model)  # not an empty figure


def test_consensus_checks_its_arguments(seed_counts):
    x, _, _ = seed_counts
    with pytest.raises(ValueError, match="n_restarts=1 must be an integer >= 2"):
        pnmf.consensus(x, 5, n_restarts=1)
    with pytest.raises(ValueError, match="density_threshold"):
        pnmf.consensus(x, 5, density_threshold=0)
    with pytest.raises(ValueError, match="fewer than n_components"):
        pnmf.consensus(x, 8, n_restarts=3, random_state=0, density_threshold=0.01, backend="numpy")


def test_k_selection_with_restarts_chooses_the_planted_k_and_shows_stability(seed_counts):
    x, _, _ = seed_counts
    table = select_n_components(x, [3, 4, 5, 6, 7], n_restarts=4, backend="numpy")
    assert table["best"] == 5
    stability = dict(zip(table["n_components"], table["stability"]))
    assert stability[5] > 0.95 and stability[5] >= max(stability.values()) - 0.01
    with pytest.raises(ValueError, match="n_restarts=0"):
        select_n_components(x, [5], n_restarts=0)
    # The stability is that of every restart's component, as cNMF's K selection scores it:
    # at 7 components, 2 more than planted, the outlier filter (0.5) would keep the ones
    # that agree and make the clusters cleaner.
    with pytest.warns(UserWarning, match="one program split in two"):  # 7 > 5: programs split
        filtered = select_n_components(x, [7], n_restarts=4, backend="numpy", density_threshold=0.5)
    assert filtered["stability"][0] > stability[7]
    train, _ = thin(x, 0.5, random_state=0)  # the half each candidate is fitted on
    every = pnmf.consensus(train, 7, 4, random_state=0, backend="numpy", density_threshold=2.0)
    assert stability[7] == pytest.approx(every.stability_, rel=1e-12) and every.n_outliers_ == 0


def test_a_saved_consensus_keeps_its_stability_and_restarts(seed_counts, tmp_path):
    # model.npz of `pnmf consensus` lost them: `pnmf info` could not say how stable it was.
    x, _, _ = seed_counts
    model = pnmf.consensus(x, 5, n_restarts=3, random_state=0, backend="numpy")
    loaded = PNMF.load(model.save(tmp_path / "consensus.npz"))
    assert (loaded.stability_, loaded.n_outliers_, loaded.density_threshold_) == (
        model.stability_,
        model.n_outliers_,
        model.density_threshold_,
    )
    np.testing.assert_array_equal(loaded.restart_elbos_, model.restart_elbos_)
    if importlib.util.find_spec("matplotlib") is not None:
        with pytest.raises(ValueError, match="a consensus read from a file keeps its stability, not each"):
            pnmf.plot.consensus(loaded)
    plain = PNMF.load(PNMF(5, backend="numpy", max_iter=5).fit(x).save(tmp_path / "plain.npz"))
    assert not hasattr(plain, "stability_") and not hasattr(plain, "restart_elbos_")


def test_restarts_that_agree_on_fewer_programs_than_k_are_named_not_called_stable():
    # Two restarts of 4 components on counts of 6 programs: the outlier filter kept one
    # component of each of 4 clusters, two of them the same program. The stability was 1.
    x, _, _ = make_counts(300, 80, 6, random_state=8)
    with pytest.warns(UserWarning, match=r"consensus components \d and \d are one program split in two") as record:
        model = pnmf.consensus(x, 4, n_restarts=2, random_state=0, backend="numpy")
    assert record[0].filename == __file__
    kept = model.restart_labels_[model.restart_labels_ >= 0]
    assert sorted(kept) == [0, 1, 2, 3] and model.stability_ == 0.0
    # A selection whose threshold leaves fewer than K components scores the candidate with
    # every component (it raised, and the other candidates' fits were lost).
    x, _, _ = make_counts(300, 80, 6, random_state=1)
    with pytest.warns(UserWarning, match="K=3: only 2 of 6 components are within density_threshold=0.5"):
        table = select_n_components(x, [3, 6], n_restarts=2, backend="numpy", density_threshold=0.5)
    assert list(table["n_components"]) == [3, 6] and np.all(np.isfinite(table["heldout_deviance"]))
    train, _ = thin(x, 0.5, random_state=0)
    every = pnmf.consensus(train, 3, 2, random_state=0, backend="numpy", density_threshold=2.0)
    assert table["stability"][0] == pytest.approx(every.stability_, rel=1e-12)


def test_the_k_selection_plot_draws_both_criteria_and_marks_k(seed_counts):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    x, _, _ = seed_counts
    table = select_n_components(x, [4, 5, 6], n_restarts=2, backend="numpy")
    ax = pnmf.plot.n_components(table)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["held-out deviance", f"chosen: {table['best']}", "stability (silhouette)"]
    right = [other for other in ax.figure.axes if other is not ax][0]
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), table["stability"])


@pytest.fixture(scope="module")
def batched():
    from pnmf.data import make_batched_counts

    return make_batched_counts(600, 200, 6, n_batches=3, random_state=0)


def test_consensus_with_batches_finds_the_programs_the_batches_hide(batched):
    """Counts with gene-level batch effects: the consensus of restarts fitted with batches
    recovers the planted programs (those without batches absorb the effects), and its own
    batch effects, fitted with the consensus loadings fixed, are those of a single fit."""
    x, labels = batched["X"], batched["batch"]
    params = dict(size_factors="total", backend="numpy", random_state=0)
    model = pnmf.consensus(x, 6, 4, batch=labels, **params)
    plain = pnmf.consensus(x, 6, 4, **params)
    single = PNMF(6, **params).fit(x, batch=labels)
    assert model.stability_ > 0.95 and list(model.batches_) == ["batch0", "batch1", "batch2"]
    recovered, absorbed = (matched_cosine(m.loadings_, batched["W"]) for m in (model, plain))
    assert recovered > 0.9 and recovered > absorbed + 0.2  # worst program: 0.925 against 0.490 measured
    g, g_single = np.log(model.batch_effects_), np.log(single.batch_effects_)
    assert np.corrcoef(g.ravel(), g_single.ravel())[0, 1] > 0.99
    xb = np.stack([x[labels == b].sum(axis=0) for b in model.batches_])
    np.testing.assert_allclose((xb * model.batch_effects_).sum(0), xb.sum(0), rtol=1e-10)  # fit's normalisation
    assert model.score(x, batch=labels) == pytest.approx(model.elbo_, rel=1e-3)
    assert model.elbo_ >= single.elbo_ - 1e-3 * abs(single.elbo_)


def test_k_selection_with_batches_does_not_spend_components_on_them(batched):
    """Without batches the held-out deviance keeps falling past the planted 6 programs, the
    extra components soaking up the batch effects; with them it is lowest at 6."""
    x, labels = batched["X"], batched["batch"]
    with_batches = pnmf.select_n_components(x, [4, 6, 8], batch=labels, size_factors="total")
    without = pnmf.select_n_components(x, [4, 6, 8], size_factors="total")
    assert with_batches["best"] == 6 and without["best"] == 8  # measured
    assert (with_batches["heldout_deviance"] < without["heldout_deviance"]).all()


@pytest.mark.filterwarnings("ignore:consensus components")
def test_components_the_restarts_left_empty_are_no_program_of_the_consensus():
    x, _, planted = make_counts(400, 100, 5, random_state=0)
    with pytest.warns(pnmf.EmptyComponentsWarning, match="the consensus has") as caught:
        model = pnmf.consensus(x, 10, n_restarts=6, random_state=0, backend="numpy")
    # The restarts are the fits each seed gives alone: the median one's empty components.
    seeds = np.random.RandomState(0).randint(np.iinfo(np.int32).max, size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pnmf.EmptyComponentsWarning)
        alone = [PNMF(10, random_state=int(seed), backend="numpy").fit(x) for seed in seeds]
    n_empty = int(np.median([len(fit.empty_components_) for fit in alone]))
    assert n_empty > 0 and f"{10 - n_empty} programs and {n_empty} empty" in str(caught[0].message)
    np.testing.assert_array_equal(model.empty_components_, np.arange(10 - n_empty, 10))  # last
    # None of the programs is a cluster of empty components, and the planted ones are among them.
    sums = model.loadings_.sum(axis=0)
    assert sums[: 10 - n_empty].min() > 1e-3 * sums.max()
    assert matched_cosine(planted, model.loadings_[:, : 10 - n_empty]) > 0.95
    # Each restart's empty components: NaN density, no consensus component, not an outlier.
    empty = np.concatenate([np.isin(np.arange(10), fit.empty_components_) for fit in alone])
    np.testing.assert_array_equal(np.isnan(model.local_density_), empty)
    assert np.all(model.restart_labels_[empty] == -1)
    assert model.n_outliers_ == int((model.restart_labels_[~empty] == -1).sum())
    assert np.isfinite(model.stability_) and np.isfinite(model.elbo_) and np.isfinite(model.mean_).all()


def test_k_selection_counts_the_empty_components_of_each_candidate_without_a_warning():
    x, _, _ = make_counts(400, 100, 5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pnmf.EmptyComponentsWarning)
        table = select_n_components(x, [5, 10], backend="numpy")
        restarts = select_n_components(x, [5, 10], n_restarts=3, backend="numpy")
    for result in (table, restarts):
        assert result["empty_components"][0] == 0 and result["empty_components"][1] > 0
