"""Choosing the number of components by held-out Poisson deviance (data thinning)."""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from .consensus import _consensus
from .data import poisson_deviance, thin
from .estimator import PNMF, _number
from .loop import interrupt_stops_all
from .programs import EmptyComponentsWarning

log = logging.getLogger(__name__)

# cNMF's K selection drops no restart's component: a stability of all of them (2: unit
# vectors are at most 2 apart).
SELECTION_DENSITY_THRESHOLD = 2.0


def select_n_components(
    X,
    candidates,
    *,
    fraction: float = 0.5,
    random_state=0,
    n_restarts: int = 1,
    density_threshold: float = SELECTION_DENSITY_THRESHOLD,
    batch=None,
    **params,
) -> dict:
    """Score each number of components by the held-out Poisson deviance of a thinned split.

    The counts are split X = X_train + X_test with X_train ~ Binomial(X, fraction): for
    Poisson data the halves are independent with rates fraction * rate and
    (1 - fraction) * rate. A model with each candidate number of components is fitted on
    X_train, and its posterior-mean rate, scaled by (1 - fraction) / fraction, scores
    X_test. Too few components underfit and too many overfit X_train; both raise the
    held-out deviance. Counts more variable than Poisson ones split into halves that share
    the extra noise, and there the deviance can keep falling a little past the data's
    number of programs: look for where it flattens (``pnmf.plot.n_components``), not only
    for ``best``. ``params`` go to ``PNMF``.

    With ``n_restarts`` > 1 each candidate is the consensus of that many restarts
    (:func:`pnmf.consensus`), and the table adds ``stability``, the silhouette of its
    clustering: cNMF's two criteria, an error to minimise and a stability to keep high.
    ``density_threshold`` goes to :func:`pnmf.consensus`. Its default, 2, drops no
    restart's component, as cNMF's K selection does: the stability is that of every
    restart, where the outlier filter (0.5 in :func:`pnmf.consensus`) would keep the
    components that agree and raise the stability of a K whose restarts disagree. With a
    threshold that leaves fewer than K components, the candidate is scored with none
    dropped, with a warning, where :func:`pnmf.consensus` would raise.

    ``batch`` (one label per row) fits every candidate with batch effects (``fit(X,
    batch=...)``), and the held-out rate includes them: the number of programs is then
    chosen for what the batches do not explain.

    Each candidate's result is logged as it comes (logger ``pnmf.selection``, level INFO;
    the ``pnmf select-k`` command shows it).

    ``empty_components`` counts the components each candidate's fit left empty
    (``PNMF.empty_components_``; for a consensus, those of its median restart): a K with
    empty components is fitted with fewer, K less that count, and the held-out deviance
    of the two is about the same.

    Returns a table as a dict of equal-length arrays (``pandas.DataFrame(result)`` shows
    it): ``n_components``, ``heldout_deviance``, ``train_elbo``, ``n_iter``, ``converged``,
    ``empty_components`` (and ``stability``); and ``best``, the candidate with the lowest
    held-out deviance.
    """
    candidates = [k.item() if isinstance(k, np.generic) else k for k in candidates]  # np.int64(8) reads as 8
    if not candidates:
        raise ValueError("candidates=[] must be a non-empty list of positive integers")
    for i, k in enumerate(candidates):  # 2.5 or '3' were taken as 2 and 3
        _number(f"candidates[{i}]", k, integer=True, low=1)
    candidates = [int(k) for k in candidates]
    if len(set(candidates)) < len(candidates):
        twice = sorted({k for k in candidates if candidates.count(k) > 1})
        raise ValueError(f"candidates={candidates!r} names {', '.join(map(str, twice))} more than once")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1)")
    if isinstance(n_restarts, bool) or not isinstance(n_restarts, (int, np.integer)) or n_restarts < 1:
        raise ValueError(f"n_restarts={n_restarts!r} must be a positive integer")
    with warnings.catch_warnings():  # non-integer values: thin's error says more
        warnings.filterwarnings("ignore", message="X holds non-integer values")
        X = PNMF(candidates[0], **{"random_state": random_state, **params})._validate_data(X, reset=True)
    train, test = thin(X, fraction, random_state=random_state)
    rows = []
    for k in candidates:
        start = time.perf_counter()
        # Ctrl-C stops the selection, not one candidate's fit; empty components are a column.
        with interrupt_stops_all(), warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyComponentsWarning)
            if n_restarts > 1:
                # A K whose restarts disagree is scored, not an error that ends the selection.
                model = _consensus(
                    train, k, n_restarts, random_state, density_threshold, batch, params, keep_all_if_too_few=True
                )
            else:
                model = PNMF(k, **{"random_state": random_state, **params}).fit(train, batch=batch)
        factors = np.exp(model.mean_ + model.var_ / 2)
        rate = model.inverse_transform(factors, size_factors=model.size_factors_, batch=batch)
        rate *= (1 - fraction) / fraction
        empty = len(model.empty_components_)
        row = (k, poisson_deviance(test, rate), model.elbo_, model.n_iter_, model.converged_, empty)
        rows.append(row + ((model.stability_,) if n_restarts > 1 else ()))
        stability = f", stability {model.stability_:.3f}" if n_restarts > 1 else ""
        stability += f", {empty} empty" if empty else ""
        log.info("K=%d: held-out deviance %.6g%s (%.1f s)", k, row[1], stability, time.perf_counter() - start)
    columns = ("n_components", "heldout_deviance", "train_elbo", "n_iter", "converged", "empty_components")
    columns += ("stability",) if n_restarts > 1 else ()
    table = {name: np.array(values) for name, values in zip(columns, zip(*rows))}
    table["best"] = int(table["n_components"][np.argmin(table["heldout_deviance"])])
    return table
