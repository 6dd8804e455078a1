"""``--suite batches``: size factors and batch effects on counts simulated from the model.

600 rows x 200 features, 6 programs, 3 batches (log g ~ Normal(0, 0.5^2) per batch and
feature) and log-normal size factors (sd 0.6) (:func:`pnmf.data.make_batched_counts`).
The plain fit and the fit with ``batch`` and ``size_factors='total'`` are compared on:
the mean cosine of their loadings with the planted ones (after matching), and how well a
5-fold cross-validated logistic regression predicts the batch from their log factors
(chance: 1/3). Reference mapping: a fit on two batches maps the third, whose batch
effects are estimated with the loadings fixed. The consensus of restarts and the choice
of K, with and without the batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from .. import PNMF
from ..data import make_batched_counts
from .natural_gradient import _grid, machine
from .speed import timed

PARAMS = dict(mode="lower-bound", training_mode="natural", dtype="float64", random_state=0)


def matched_cosine(w: np.ndarray, planted: np.ndarray) -> float:
    """Mean cosine between the columns of w and the planted loadings, after the best matching."""
    cosines = (w / np.linalg.norm(w, axis=0)).T @ (planted / np.linalg.norm(planted, axis=0))
    rows, cols = linear_sum_assignment(-cosines)
    return float(cosines[rows, cols].mean())


def batch_accuracy(factors: np.ndarray, labels: np.ndarray) -> float:
    """5-fold cross-validated accuracy of a logistic regression predicting the batch from log factors."""
    return float(cross_val_score(LogisticRegression(max_iter=2000), np.log(factors), labels, cv=5).mean())


def run(out: Path, quick: bool = False, progress: bool = True) -> dict:
    data = make_batched_counts(600, 200, 6, random_state=42)
    x, labels = data["X"], data["batch"]
    fits = {}
    for name, params, kwargs in (
        ("plain", {}, {}),
        ("size factors", dict(size_factors="total"), {}),
        ("batches", {}, dict(batch=labels)),
        ("batches and size factors", dict(size_factors="total"), dict(batch=labels)),
        (
            "batches and size factors, mini-batch",
            dict(size_factors="total", batch_size=100, max_iter=300),
            dict(batch=labels),
        ),
    ):
        model = PNMF(6, **{**PARAMS, **params})
        factors, wall = timed(model.fit_transform, x, **kwargs)
        fits[name] = dict(
            wall_s=wall,
            n_iter=int(model.n_iter_),
            elbo=float(model.elbo_),
            loadings_cosine=matched_cosine(model.loadings_, data["W"]),
            batch_accuracy=batch_accuracy(factors, labels),
        )
    seen = labels != "batch2"
    reference = PNMF(6, size_factors="total", **PARAMS).fit(x[seen], batch=labels[seen])
    _, g = reference.map_batches(x[~seen], batch=labels[~seen])
    fitted, true = np.log(g), np.log(data["batch_effects"])
    mapping = dict(
        new_batch_effects_correlation=float(np.corrcoef(fitted[2] - fitted[0], true[2] - true[0])[0, 1]),
        heldout_elbo_mapped=reference.score(x[~seen], batch=labels[~seen]),
        heldout_elbo_borrowed=reference.score(x[~seen], batch=np.full((~seen).sum(), "batch0")),
    )
    record = dict(
        machine=machine(), fits=fits, mapping=mapping, workflow=workflow_check(data), prior=prior_check(quick)
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "batches.json").write_text(json.dumps(record, indent=1))
    return record


def workflow_check(data: dict) -> dict:
    """Consensus of 4 restarts (6 components) and K selection over 4, 6 and 8 components,
    with size factors 'total', with and without the batches."""
    from ..consensus import consensus
    from ..selection import select_n_components

    x, labels, result = data["X"], data["batch"], {}
    for name, batch in (("with batches", labels), ("without", None)):
        model, wall = timed(consensus, x, 6, 4, batch=batch, size_factors="total", **PARAMS)
        cosines = (model.loadings_ / np.linalg.norm(model.loadings_, axis=0)).T @ (
            data["W"] / np.linalg.norm(data["W"], axis=0)
        )
        rows, cols = linear_sum_assignment(-cosines)
        table = select_n_components(x, [4, 6, 8], batch=batch, size_factors="total", **PARAMS)
        result[name] = dict(
            consensus_wall_s=wall,
            stability=float(model.stability_),
            cosine_mean=float(cosines[rows, cols].mean()),
            cosine_min=float(cosines[rows, cols].min()),
            candidates=[int(k) for k in table["n_components"]],
            heldout_deviance=[float(v) for v in table["heldout_deviance"]],
            best=int(table["best"]),
        )
    return result


def prior_check(quick: bool = False) -> list[dict]:
    """A batch-aware fit of 20,000 x 2,000 sparse counts (4 batches, depths, 10 programs,
    thinned to about 6% non-zeros) with the prior scale fixed at 1 and fitted ('auto')."""
    import scipy.sparse as sp

    from ..data import thin

    rows = 4000 if quick else 20_000
    data = make_batched_counts(rows, 2000, 10, n_batches=4, random_state=3)
    x = sp.csr_matrix(thin(data["X"], 0.003, random_state=1)[0])
    results = []
    for prior in (1.0, "auto"):
        model = PNMF(10, size_factors="total", prior_scale=prior, random_state=0)
        _, wall = timed(model.fit, x, batch=data["batch"])
        results.append(
            dict(
                prior_scale=prior,
                rows=rows,
                nonzero=float(x.nnz / np.prod(x.shape)),
                elbo=float(model.elbo_),
                loadings_cosine=matched_cosine(model.loadings_, data["W"]),
                n_iter=int(model.n_iter_),
                wall_s=wall,
            )
        )
    return results


def report(record: dict) -> str:
    body = [
        (
            name,
            f"{fit['loadings_cosine']:.3f}",
            f"{fit['batch_accuracy']:.3f}",
            f"{fit['elbo']:,.0f}",
            f"{fit['n_iter']}",
            f"{fit['wall_s']:.2f}",
        )
        for name, fit in record["fits"].items()
    ]
    header = ("fit", "loadings cosine", "batch predicted (chance 0.333)", "ELBO", "iterations", "time (s)")
    m = record["mapping"]
    return (
        _grid(header, body)
        + "\n\nReference mapping of batch2 onto a fit of batch0 and batch1: correlation of its estimated"
        + f" log g with the planted one (both relative to batch0) {m['new_batch_effects_correlation']:.3f};"
        + f" ELBO of its rows {m['heldout_elbo_mapped']:,.0f} with its own g against"
        + f" {m['heldout_elbo_borrowed']:,.0f} with batch0's."
        + "\n\nConsensus of 4 restarts and K selection (held-out deviance at "
        + ", ".join(map(str, record["workflow"]["with batches"]["candidates"]))
        + " components), size factors 'total':\n"
        + "\n".join(
            f"  {name}: consensus loadings cosine {w['cosine_mean']:.3f} (worst program {w['cosine_min']:.3f}),"
            f" stability {w['stability']:.3f}, {w['consensus_wall_s']:.1f} s; deviance "
            + ", ".join(f"{v:,.0f}" for v in w["heldout_deviance"])
            + f": chosen {w['best']}"
            for name, w in record["workflow"].items()
        )
        + "\n\nPrior scale on a batch-aware fit of "
        + f"{record['prior'][0]['rows']:,} x 2,000 ({100 * record['prior'][0]['nonzero']:.1f}% non-zero): "
        + "; ".join(
            f"{p['prior_scale']}: ELBO {p['elbo']:,.0f}, loadings cosine {p['loadings_cosine']:.3f}, "
            f"{p['n_iter']} iterations, {p['wall_s']:.1f} s"
            for p in record["prior"]
        )
    )
