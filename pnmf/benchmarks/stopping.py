"""``--suite stopping``: where Monte Carlo fits stop at tol=1e-4, against the same fits run on.

For the seed setting (200 x 100, L=5, E=10, Adam learning rate 0.005, seed 42, up to 8000
iterations), digits (1797 x 64, L=10, the same settings) and a sparse single-cell-like set
(10,000 x 2,000, about 5.6% non-zero, L=10, PNMF's defaults), in 'expanded' and 'simple'
mode under natural and standard training, it fits twice: to ``max_iter`` (``tol=0``) and at
``tol=1e-4``. It records the iteration at which the first fit's ELBO history (a 10-iteration
moving average) first came within 1e-3 of its best, where the second stopped, and the
distance of the second's final ELBO to the first's. On the sparse set it times the
'expanded' natural fit against the 'lower-bound' natural fit (the better of two runs each).
Mini-batch fits of digits (200 rows a step) and the sparse set (1,000) are fitted the same
two ways, to 2000 steps and at tol=1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import PNMF, make_counts
from .natural_gradient import STOP_TOL, _grid, iterations_to, machine, smoothed
from .speed import timed

SEED_SETTINGS = dict(E=10, learning_rate=0.005, max_iter=8000, random_state=42, prior_scale=1.0)
SPARSE_SETTINGS = dict(max_iter=2000, random_state=0, prior_scale=1.0)
TRAININGS = ("natural", "standard")
MODES = ("expanded", "simple")
MINIBATCH_ROWS = {"digits": 200, "sparse": 1000}  # rows per step of the mini-batch fits, about 10 a pass
MINIBATCH_STEPS = 2000  # PNMF's max_iter


def datasets(quick: bool = False) -> list[tuple[str, object, int, dict]]:
    """(name, counts, n_components, settings)."""
    from sklearn.datasets import load_digits

    from .defaults import datasets as sets

    seed = make_counts(200, 100, 5, random_state=42)[0]
    sparse_name, sparse, _ = sets(quick)[2]
    quick_settings = dict(max_iter=1000) if quick else {}
    return [
        ("seed 200 x 100 (L=5)", seed, 5, SEED_SETTINGS),
        ("digits 1797 x 64 (L=10)", load_digits().data, 10, {**SEED_SETTINGS, **quick_settings}),
        (sparse_name, sparse, 10, {**SPARSE_SETTINGS, **quick_settings}),
    ]


def reached(history, mode: str) -> int:
    """First iteration whose 10-iteration moving average is within 1e-3 of its best."""
    return iterations_to(history, smoothed(history, mode)[1].max(), mode)


def run(out: Path, quick: bool = False, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    jobs = [(d, m, t) for d in datasets(quick) for m in MODES for t in TRAININGS]
    rows, costs = [], []
    with tqdm(jobs, desc="stopping", unit="pair", disable=not progress) as bar:
        for (name, x, n_components, settings), mode, training in bar:
            bar.set_postfix_str(f"{name.split()[0]}: {mode}, {training}")
            params = dict(n_components=n_components, mode=mode, training_mode=training, **settings)
            whole, whole_wall = timed(PNMF(**{**params, "tol": 0}).fit, x)
            stopped, wall = timed(PNMF(**{**params, "tol": STOP_TOL}).fit, x)
            first = reached(whole.elbo_history_, mode)
            rows.append(
                dict(
                    data=name,
                    mode=mode,
                    training=training,
                    max_iter=int(whole.n_iter_),
                    max_iter_wall_s=whole_wall,
                    max_iter_elbo=float(whole.elbo_),
                    reached=first,
                    stop_iter=int(stopped.n_iter_),
                    converged=bool(stopped.converged_),
                    stop_wall_s=wall,
                    stop_elbo=float(stopped.elbo_),
                    stop_over_reached=stopped.n_iter_ / first,
                    shortfall=(whole.elbo_ - stopped.elbo_) / abs(whole.elbo_),
                )
            )
    name, x, n_components, settings = datasets(quick)[2]
    for mode in ("lower-bound", "expanded"):
        params = dict(n_components=n_components, mode=mode, training_mode="natural", tol=STOP_TOL, **settings)
        fits = [timed(PNMF(**params).fit, x) for _ in range(2)]
        costs.append(
            dict(
                data=name,
                mode=mode,
                wall_s=min(wall for _, wall in fits),
                n_iter=int(fits[0][0].n_iter_),
                elbo=float(fits[0][0].elbo_),
            )
        )
    record = dict(machine=machine(), rows=rows, cost=costs, minibatch=minibatch_rows(quick))
    out.mkdir(parents=True, exist_ok=True)
    (out / "stopping.json").write_text(json.dumps(record, indent=1))
    return record


def minibatch_rows(quick: bool = False) -> list[dict]:
    """Mini-batch fits ('lower-bound' natural, ``MINIBATCH_ROWS`` rows a step, prior scale 1)
    of digits and the sparse set, to ``max_iter`` steps (tol=0) and at tol=1e-4."""
    rows = []
    for name, x, n_components, settings in datasets(quick)[1:]:
        steps = 500 if quick else MINIBATCH_STEPS
        params = dict(n_components=n_components, mode="lower-bound", training_mode="natural")
        params.update(batch_size=MINIBATCH_ROWS[name.split()[0]], max_iter=steps)
        params.update(random_state=settings["random_state"], prior_scale=settings["prior_scale"])
        whole, whole_wall = timed(PNMF(**params, tol=0).fit, x)
        stopped, wall = timed(PNMF(**params, tol=STOP_TOL).fit, x)
        rows.append(
            dict(
                data=name,
                batch_size=params["batch_size"],
                max_iter=int(whole.n_iter_),
                max_iter_wall_s=whole_wall,
                max_iter_elbo=float(whole.elbo_),
                stop_iter=int(stopped.n_iter_),
                converged=bool(stopped.converged_),
                stop_wall_s=wall,
                stop_elbo=float(stopped.elbo_),
                shortfall=(whole.elbo_ - stopped.elbo_) / abs(whole.elbo_),
            )
        )
    return rows


def report(record: dict) -> str:
    header = (
        "data",
        "mode",
        "training",
        "within 1e-3 at",
        "stopped at",
        "ratio",
        "shortfall",
        "stop s",
        "max_iter s",
    )
    body = [
        (
            r["data"].split(",")[0],
            r["mode"],
            r["training"],
            r["reached"],
            r["stop_iter"] if r["converged"] else f"{r['stop_iter']} (max_iter)",
            f"{r['stop_over_reached']:.2f}",
            f"{r['shortfall']:.1e}",
            f"{r['stop_wall_s']:.1f}",
            f"{r['max_iter_wall_s']:.1f}",
        )
        for r in record["rows"]
    ]
    lower, expanded = record["cost"]
    minibatch = [
        (
            r["data"].split(",")[0],
            r["batch_size"],
            r["stop_iter"] if r["converged"] else f"{r['stop_iter']} (max_iter)",
            f"{r['shortfall']:.1e}",
            f"{r['stop_wall_s']:.1f}",
            f"{r['max_iter_wall_s']:.1f}",
        )
        for r in record.get("minibatch", [])
    ]
    header_minibatch = ("data", "rows a step", "stopped at", "shortfall", "stop s", f"{MINIBATCH_STEPS} steps s")
    return (
        _grid(header, body)
        + f"\n\nShortfall: (ELBO run to max_iter - ELBO stopped at tol={STOP_TOL:g}) / |ELBO|. "
        + f"On {lower['data']}: 'lower-bound' natural {lower['wall_s']:.1f} s ({lower['n_iter']} iterations,"
        + f" ELBO {lower['elbo']:,.0f}); 'expanded' natural {expanded['wall_s']:.1f} s ({expanded['n_iter']}"
        + f" iterations, ELBO {expanded['elbo']:,.0f}): {expanded['wall_s'] / lower['wall_s']:.2f}x."
        + ("\n\nMini-batch fits ('lower-bound' natural):\n" + _grid(header_minibatch, minibatch) if minibatch else "")
    )
