"""``--suite defaults``: the candidates for ``PNMF()``'s defaults, measured on three data sets.

Each candidate (training mode, ELBO mode, loadings update, size factors, prior scale) is
fitted at ``tol=1e-4`` on the training half of a thinned split (X = X_train + X_test,
X_train ~ Binomial(X, 1/2)) and scored by the Poisson deviance of X_test under the fit's
posterior-mean rate s * exp(mu + var/2) @ W.T, which the halves share. Recorded per fit:
wall time, iterations, whether it converged, the training ELBO and the held-out deviance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .. import PNMF, make_counts, poisson_deviance, thin
from ..data import make_batched_counts
from .natural_gradient import _grid, machine
from .speed import timed

# (name, PNMF parameters) of the candidates; every other parameter at its default.
CANDIDATES = [
    ("expanded, standard (Adam)", dict(mode="expanded", training_mode="standard", loadings_update="adam")),
    ("lower-bound, standard (Adam)", dict(mode="lower-bound", training_mode="standard", loadings_update="adam")),
    ("lower-bound, natural", dict(mode="lower-bound", training_mode="natural", loadings_update="multiplicative")),
    ("expanded, natural", dict(mode="expanded", training_mode="natural", loadings_update="multiplicative")),
    ("lower-bound, natural, Adam loadings", dict(mode="lower-bound", training_mode="natural", loadings_update="adam")),
    (
        "lower-bound, natural, prior auto",
        dict(mode="lower-bound", training_mode="natural", loadings_update="multiplicative", prior_scale="auto"),
    ),
    (
        "lower-bound, natural, size factors",
        dict(mode="lower-bound", training_mode="natural", loadings_update="multiplicative", size_factors="total"),
    ),
    (
        "lower-bound, natural, prior auto, size factors",
        dict(
            mode="lower-bound",
            training_mode="natural",
            loadings_update="multiplicative",
            prior_scale="auto",
            size_factors="total",
        ),
    ),
    (
        "expanded, natural, prior auto",
        dict(mode="expanded", training_mode="natural", loadings_update="multiplicative", prior_scale="auto"),
    ),
]
# Every candidate is held to the same budget and tolerance (PNMF's own defaults), prior scale 1
# unless it says 'prior auto'.
COMMON = dict(max_iter=2000, tol=1e-4, random_state=0, prior_scale=1.0)


def datasets(quick: bool = False) -> list[tuple[str, object, int]]:
    """(name, counts, n_components): the seed setting, digits, and a sparse set with depths."""
    from sklearn.datasets import load_digits

    seed, _, _ = make_counts(200, 100, 5, random_state=42)
    rows = 2000 if quick else 10_000
    # Single-cell-like: log-normal depths (sd 0.6), 10 programs, thinned to about 5.6% non-zeros
    # (about 120 counts a row).
    cells = make_batched_counts(rows, 2000, 10, n_batches=1, batch_sd=0.0, random_state=1)["X"]
    sparse = sp.csr_matrix(thin(cells, 0.003, random_state=1)[0])
    return [
        ("seed 200 x 100 (L=5)", seed, 5),
        ("digits 1797 x 64 (L=10)", load_digits().data, 10),
        (f"sparse {rows} x 2000, {100 * sparse.nnz / np.prod(sparse.shape):.1f}% non-zero (L=10)", sparse, 10),
    ]


def heldout_rate(model: PNMF) -> np.ndarray:
    """The fitted rows' posterior-mean rate s * exp(mu + var/2) @ W.T (no batches here)."""
    rate = np.exp(model.mean_ + model.var_ / 2) @ model.components_
    return rate if model.size_factors_ is None else model.size_factors_[:, None] * rate


def run(out: Path, quick: bool = False, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    jobs = [(d, c) for d in datasets(quick) for c in CANDIDATES]
    rows, splits = [], {}
    with tqdm(jobs, desc="defaults", unit="fit", disable=not progress) as bar:
        for (data_name, x, n_components), (name, params) in bar:
            bar.set_postfix_str(f"{data_name.split()[0]}: {name}")
            if data_name not in splits:
                splits[data_name] = thin(x, 0.5, random_state=0)
            train, test = splits[data_name]
            model, wall = timed(PNMF(n_components, **{**COMMON, **params}).fit, train)
            rows.append(
                dict(
                    data=data_name,
                    candidate=name,
                    params=params,
                    wall_s=wall,
                    n_iter=int(model.n_iter_),
                    converged=bool(model.converged_),
                    train_elbo=float(model.elbo_),
                    heldout_deviance=poisson_deviance(test, heldout_rate(model)),
                )
            )
    out.mkdir(parents=True, exist_ok=True)
    record = dict(machine=machine(), common=COMMON, rows=rows)
    (out / "defaults.json").write_text(json.dumps(record, indent=1))
    return record


def report(record: dict) -> str:
    return table(record["rows"])


def table(rows: list[dict]) -> str:
    """One markdown table per data set: every candidate's cost and quality."""
    parts = []
    for data_name in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data_name]
        best = min(r["heldout_deviance"] for r in mine)
        body = [
            (
                r["candidate"],
                f"{r['wall_s']:.2f}",
                f"{r['n_iter']}" + ("" if r["converged"] else " (max)"),
                f"{r['train_elbo']:,.0f}",
                f"{r['heldout_deviance']:,.0f}",
                f"{100 * (r['heldout_deviance'] / best - 1):+.2f}%",
            )
            for r in mine
        ]
        header = ("candidate", "fit (s)", "iterations", "train ELBO", "held-out deviance", "vs best")
        parts.append(f"**{data_name}**\n\n" + _grid(header, body))
    return "\n\n".join(parts)
