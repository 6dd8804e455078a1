"""Gene programs from fitted loadings: the top features of each component."""

from __future__ import annotations

from collections import Counter

import numpy as np

RANKINGS = ("loading", "specificity")
# A component whose loadings sum to less than this share of the largest component's is
# empty. The multiplicative update shrinks the loadings of a component the fit does not use
# geometrically, to 1e-9 .. 1e-44 of the largest's at convergence (lower-bound natural fits
# of 5 planted programs with 6 to 20 components, float32 and float64); the weakest component
# in use was 2e-3 of the largest there, in every mode and training.
EMPTY_SHARE = 1e-6


class EmptyComponentsWarning(UserWarning):
    """A fit left components empty: their loadings are (numerically) zero."""


def empty_components(w: np.ndarray) -> np.ndarray:
    """Which columns of the loadings ``w`` (D, L) are empty: summing to under ``EMPTY_SHARE``
    of the largest column's sum (a boolean mask of L)."""
    sums = np.asarray(w, dtype=np.float64).sum(axis=0)
    return sums < EMPTY_SHARE * sums.max() if sums.size else np.zeros(0, dtype=bool)


def empty_note(empty: np.ndarray, shown: int | None = 8) -> str:
    """'component 3', 'components 3 and 7', or past ``shown`` of them 'components 0, 1, ...,
    7 and 12 more', of the indices ``empty``."""
    names = [str(int(l)) for l in empty]
    if len(names) == 1:
        return f"component {names[0]}"
    if shown is not None and len(names) > shown:
        return f"components {', '.join(names[:shown])} and {len(names) - shown} more"
    return f"components {', '.join(names[:-1])} and {names[-1]}"


def specificity(w: np.ndarray) -> np.ndarray:
    """phi[d, l] log(phi[d, l] / p[d]) (D, L): feature d's term of KL(phi_l || p).

    phi_l = W[:, l] / sum_d W[d, l] is component l's distribution over the features and
    p = mean_l phi_l their average over the components in use: a feature every component
    uses alike scores 0, one that component l uses far more than the others scores high, in
    proportion to its weight. An empty component (:func:`empty_components`) has no
    distribution over the features: it scores 0 everywhere and is left out of p.
    """
    empty = empty_components(w)
    phi = w / np.maximum(w.sum(axis=0, keepdims=True), 1e-300)
    phi[:, empty] = 0.0
    used = max(int((~empty).sum()), 1)
    ratio = phi / np.maximum(phi.sum(axis=1, keepdims=True) / used, 1e-300)
    return phi * np.log(np.maximum(ratio, 1e-300))


def feature_labels(model, feature_names=None) -> np.ndarray:
    """The names of the model's features: ``feature_names``, else those seen in fit, else 0..D-1."""
    n_features = model.loadings_.shape[0]
    if feature_names is None:
        feature_names = getattr(model, "feature_names_in_", np.arange(n_features))
    names = np.asarray(feature_names).astype(str)
    if names.shape != (n_features,):
        raise ValueError(f"feature_names has {names.size} entries; the model has {n_features} features")
    return names


def feature_columns(model, n_columns: int, names=None, source: str = "X") -> np.ndarray | None:
    """The columns of counts (``n_columns`` of them, named ``names``) that hold the model's
    features, in its order.

    None when the columns are the model's already, or when the model or the counts do not
    name their features (their number must then match). Counts may hold the features in
    another order, or more of them; a ValueError names a feature of the model they lack or
    name twice.
    """
    fitted = getattr(model, "feature_names_in_", None)
    have = None if names is None else np.asarray(names).astype(str)
    fitted = None if fitted is None else np.asarray(fitted).astype(str)
    if fitted is None or have is None or np.array_equal(fitted, have):
        if n_columns != model.n_features_in_:
            raise ValueError(f"{source} has {n_columns} features; the model was fitted on {model.n_features_in_}")
        return None
    index = {name: i for i, name in enumerate(have)}
    missing = [name for name in fitted if name not in index]
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} of the model's {len(fitted)} features (first: '{missing[0]}'); "
            "the factors need the counts of every one"
        )
    times = Counter(have)
    repeated = [name for name in fitted if times[name] > 1]
    if repeated:
        raise ValueError(f"{source} names feature '{repeated[0]}' more than once: which column is the model's?")
    return np.array([index[name] for name in fitted])


def top_features(model, n: int = 20, feature_names=None):
    """The top ``n`` features of each component, by loading and by specificity, as a DataFrame.

    One row per (component, ranking, rank) with columns ``component``, ``ranking``
    ('loading' or 'specificity'), ``rank`` (0 first), ``feature``, ``loading`` (W[d, l]) and
    ``specificity`` (:func:`specificity`). Empty components (:func:`empty_components`) have
    no top features and no rows.
    """
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("top_features returns a pandas DataFrame: pip install pandas ('pnmf-vi[anndata]')") from err
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")
    names = feature_labels(model, feature_names)
    w = np.asarray(model.loadings_, dtype=np.float64)
    score = specificity(w)
    n = min(int(n), w.shape[0])
    rows = []
    for component in map(int, np.flatnonzero(~empty_components(w))):
        for ranking, key in (("loading", w[:, component]), ("specificity", score[:, component])):
            # Ties broken by feature index, so the table is the same on every platform.
            order = np.lexsort((np.arange(len(key)), -key))[:n]
            for rank, d in enumerate(order):
                rows.append((component, ranking, rank, names[d], w[d, component], score[d, component]))
    columns = ["component", "ranking", "rank", "feature", "loading", "specificity"]
    return pd.DataFrame(rows, columns=columns)
