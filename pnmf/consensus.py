"""Consensus over restarts (as cNMF does): stable programs, and how stable they are."""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.utils import check_random_state

from .estimator import PNMF
from .loop import interrupt_stops_all, user_stacklevel
from .programs import EmptyComponentsWarning, empty_components
from .scaling import batch_sums, check_batch, normalise

log = logging.getLogger(__name__)

# Outlier filter: the mean distance of a (unit-norm) component to its nearest neighbours
# among all restarts' components, over NEIGHBOURS x n_restarts of them (cNMF's default).
NEIGHBOURS = 0.3
# ... and the largest such mean distance a component may have (cNMF's default).
DENSITY_THRESHOLD = 0.5


def consensus(
    X,
    n_components: int,
    n_restarts: int = 10,
    random_state=None,
    *,
    density_threshold: float = DENSITY_THRESHOLD,
    batch=None,
    **pnmf_params,
) -> PNMF:
    """Fit ``n_restarts`` restarts with different seeds and return their consensus as a fitted PNMF.

    Every restart's loadings are scaled to unit norm per component and pooled
    (n_restarts x n_components of them). Components whose mean distance to their
    ``0.3 n_restarts`` nearest neighbours exceeds ``density_threshold`` (0.5: about
    cosine 0.875) are outliers and dropped; the rest are clustered into ``n_components``
    clusters by k-means. The consensus loadings are each cluster's median (of the
    restarts' loadings as fitted), and the factors of X are refitted with them fixed
    (as ``transform`` does), so ``mean_``, ``var_`` and ``elbo_`` are those of the
    consensus model.

    Besides PNMF's attributes, the model has ``stability_`` (the silhouette of the
    clustering, cosine geometry: 1 when every restart finds the same programs; NaN for
    one program),
    ``restart_elbos_`` (n_restarts,) and ``n_outliers_`` (components dropped as outliers);
    ``n_iter_`` is the longest restart's and ``converged_`` whether all converged. For
    each of the n_restarts x n_components components (restart by restart),
    ``restart_labels_`` is the consensus component it joined (-1: an outlier, or empty),
    ``local_density_`` its mean distance to its neighbours (compared with
    ``density_threshold_``; NaN where the restart left it empty) and
    ``restart_similarity_`` the cosine similarities among them (float32):
    :func:`pnmf.plot.consensus` draws them. ``save`` keeps ``stability_``,
    ``n_outliers_``, ``density_threshold_`` and ``restart_elbos_``, not these three. The
    restarts share one copy of X on the device (checked and moved there once); where the
    data is small enough for a step to be bound by overhead and the fit is the default
    kind (dense, ``lower-bound``, natural), they are fitted together, as lanes of one step
    (:mod:`pnmf.restarts`), each still the fit its seed gives alone; otherwise one after
    another.

    Components a restart left empty (``PNMF.empty_components_``: loadings near zero, where the
    data hold fewer programs than ``n_components``) are no program and take no part: the
    consensus clusters the others into ``n_components`` less the median restart's number
    of empty components, and has that many empty components too, last (with a
    ``pnmf.EmptyComponentsWarning``).

    ``batch`` (one label per row, as ``fit``'s) fits every restart with batch effects; the
    consensus model's batch effects are then fitted with its loadings fixed, alongside the
    factors (as ``transform`` estimates those of batches it has not seen), and ``batches_``,
    ``batch_effects_`` and ``transform(X, batch=...)`` are those of a fit with batches.
    Deterministic for a fixed ``random_state``; ``pnmf_params`` go to ``PNMF``.
    """
    return _consensus(X, n_components, n_restarts, random_state, density_threshold, batch, pnmf_params)


def _consensus(
    X, n_components, n_restarts, random_state, density_threshold, batch, pnmf_params, keep_all_if_too_few=False
) -> PNMF:
    """:func:`consensus`; with ``keep_all_if_too_few``, restarts too unlike each other for
    ``density_threshold`` to leave enough components are combined with none dropped
    (``density_threshold_`` 2, with a warning), as cNMF scores every K, instead of raising."""
    if isinstance(n_restarts, bool) or not isinstance(n_restarts, (int, np.integer)) or n_restarts < 2:
        raise ValueError(f"n_restarts={n_restarts!r} must be an integer >= 2")
    if not 0 < density_threshold <= 2:
        raise ValueError(
            f"density_threshold={density_threshold!r} must be in (0, 2] (unit vectors are at most 2 apart)"
        )
    rng = check_random_state(random_state)
    seeds = rng.randint(np.iinfo(np.int32).max, size=n_restarts)
    start = time.perf_counter()
    with interrupt_stops_all():  # no consensus of restarts cut short
        fits = PNMF(n_components, **pnmf_params)._fit_restarts(X, seeds, batch)
    log.info("K=%d: %d restarts fitted (%.1f s)", n_components, n_restarts, time.perf_counter() - start)
    raw = np.concatenate([fit.loadings_.T for fit in fits])  # (R * L, D)
    # Components a restart left empty are no program: they take no part in the clustering,
    # and the consensus has as many empty components as the median restart.
    empty = np.concatenate([empty_components(fit.loadings_) for fit in fits])
    n_empty = int(np.median(empty.reshape(n_restarts, n_components).sum(axis=1)))
    n_programs = n_components - n_empty
    unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-300)
    unit[empty] = 0.0
    # One product of the components gives every distance used below: the outlier filter's
    # Euclidean ones (|a - b|^2 = 2 - 2 a.b for unit vectors), the silhouette's cosine ones
    # and the similarities pnmf.plot.consensus draws.
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, 1.0)
    euclidean = np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))
    used = np.flatnonzero(~empty)
    neighbours = min(max(1, int(round(NEIGHBOURS * n_restarts))), len(used) - 1)
    density = np.full(len(raw), np.nan)
    if neighbours > 0:
        found = NearestNeighbors(n_neighbors=neighbours + 1, metric="precomputed").fit(euclidean[np.ix_(used, used)])
        distances, _ = found.kneighbors(euclidean[np.ix_(used, used)])
        density[used] = distances[:, 1:].mean(axis=1)
    else:  # one component in use among all restarts: no neighbour to be far from
        density[used] = 0.0
    keep = ~empty & (density <= density_threshold)
    if keep.sum() < n_programs and keep_all_if_too_few:
        warnings.warn(
            f"K={n_components}: only {int(keep.sum())} of {len(used)} components are within density_threshold="
            f"{density_threshold} of their neighbours; the consensus of every component is scored (the restarts "
            "disagree: a low stability)",
            stacklevel=user_stacklevel(),
        )
        density_threshold, keep = 2.0, ~empty
    if keep.sum() < n_programs:
        wanted = f"n_components={n_components}" + (f" less the {n_empty} left empty" if n_empty else "")
        raise ValueError(
            f"only {int(keep.sum())} of {len(used)} components are within density_threshold={density_threshold} "
            f"of their neighbours, fewer than {wanted}: raise density_threshold or n_restarts, or fit fewer "
            "components"
        )
    if n_empty:
        warnings.warn(
            f"the restarts left a median of {n_empty} of {n_components} components empty (loadings near zero): the "
            f"consensus has {n_programs} programs and {n_empty} empty component{'s' if n_empty > 1 else ''} "
            "(empty_components_); fit fewer components",
            EmptyComponentsWarning,
            stacklevel=user_stacklevel(),
        )
    clusters = KMeans(n_programs, n_init=10, random_state=int(rng.randint(np.iinfo(np.int32).max)))
    labels = clusters.fit_predict(unit[keep])
    if len(np.unique(labels)) < n_programs:
        raise ValueError(f"the restarts' components fall into fewer clusters than the {n_programs} programs to find")
    priors = np.concatenate([fit.prior_scale_ for fit in fits])
    # Clusters in the order of their largest member's index: restart 0's order where it holds.
    order = sorted(range(n_programs), key=lambda c: np.flatnonzero(labels == c)[0])
    _warn_if_split(euclidean[np.ix_(keep, keep)], np.argsort(order)[labels], density_threshold)
    loadings = np.zeros((raw.shape[1], n_components))
    loadings[:, :n_programs] = np.stack([np.median(raw[keep][labels == c], axis=0) for c in order], axis=1)
    prior = [np.median(priors[keep][labels == c]) for c in order]
    prior += [float(np.median(priors[empty]))] * n_empty if n_empty else []
    model = PNMF(n_components, random_state=random_state, **pnmf_params)
    first = fits[0]
    # What the data fixes is the same in every restart: its shape, names and size factors.
    for name in ("n_features_in_", "backend_", "device_", "feature_names_in_", "size_factors_", "reference_total_"):
        if hasattr(first, name):
            setattr(model, name, getattr(first, name))
    model.loadings_, model.components_ = loadings, loadings.T
    model.prior_scale_ = np.array(prior)
    if batch is None:
        model.batches_ = model.batch_effects_ = None
        model.mean_, model.var_, model.elbo_, _ = model._infer(X, check_counts=False)  # the restarts checked X
    else:  # every batch new to the consensus loadings: its g fitted with them fixed
        model.batches_, model.batch_effects_ = first.batches_[:0], np.ones((0, loadings.shape[0]))
        model.mean_, model.var_, model.elbo_, (batches, g) = model._infer(X, batch=batch, check_counts=False)
        x = model._validate_data(X, reset=False)
        xb = batch_sums(x, np.searchsorted(batches, check_batch(batch, x.shape[0])), len(batches))
        model.batch_effects_, model.loadings_ = normalise(g, loadings, xb)
        model.batches_, model.components_ = batches, model.loadings_.T
    # The restarts' fits: the longest one's iterations, and whether every one converged.
    model.elbo_history_ = np.zeros(0)
    model.n_iter_ = max(fit.n_iter_ for fit in fits)
    model.converged_ = all(fit.converged_ for fit in fits)
    model.stability_ = _stability(np.maximum(1.0 - similarity[np.ix_(keep, keep)], 0.0), labels, n_programs)
    model.restart_elbos_ = np.array([fit.elbo_ for fit in fits])
    model.n_outliers_ = int((~keep & ~empty).sum())
    # What pnmf.plot.consensus draws: every restart's component, where it went and why.
    model.local_density_, model.density_threshold_ = density, float(density_threshold)
    model.restart_labels_ = np.full(len(keep), -1)
    model.restart_labels_[keep] = np.argsort(order)[labels]
    model.restart_similarity_ = similarity.astype(np.float32)
    return model


def _warn_if_split(distance: np.ndarray, labels: np.ndarray, density_threshold: float) -> None:
    """Warn when the clustering put a component and its nearest neighbour, closer than
    ``density_threshold`` (neighbours, to the outlier filter), in two consensus components:
    k-means made n_components clusters of fewer programs, as when the filter leaves about
    one component per cluster. Without a filter (threshold 2) every pair is that close."""
    if density_threshold >= 2 or len(labels) < 2:
        return
    distance = distance.copy()
    np.fill_diagonal(distance, np.inf)
    nearest = distance.argmin(axis=1)
    alone = np.bincount(labels)[labels] == 1  # the only member of its cluster
    split = alone & (distance[np.arange(len(labels)), nearest] <= density_threshold) & (labels != labels[nearest])
    if split.any():
        first = int(np.flatnonzero(split)[0])
        pair = sorted((int(labels[first]), int(labels[nearest[first]])))
        warnings.warn(
            f"consensus components {pair[0]} and {pair[1]} are one program split in two (the restarts' components "
            f"in them are {distance[first, nearest[first]]:.2f} apart, within density_threshold={density_threshold}): "
            "the restarts agree on fewer programs than the consensus has; fit more restarts or fewer components",
            stacklevel=user_stacklevel(),
        )


def _stability(cosine: np.ndarray, labels: np.ndarray, n_components: int) -> float:
    """Silhouette of the clustering, from the cosine distances of its members; NaN for one
    component, where it is undefined. Clusters of one member each score 0 (silhouette's
    value for a lone member): the filter left one restart's component of each program."""
    if n_components < 2:
        return float("nan")
    if len(labels) == n_components:
        return 0.0
    return float(silhouette_score(cosine, labels, metric="precomputed"))
