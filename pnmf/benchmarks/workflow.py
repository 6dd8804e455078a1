"""``--suite workflow``: what restarts cost: one fit against the consensus of 10 restarts
(fitted together where they can be, and one by one), and K selection with and without
restarts, on the seed data and on digits."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import sys
from pathlib import Path

from .. import PNMF, consensus, make_counts, restarts, select_n_components
from ..backends import BACKENDS
from .natural_gradient import _grid, machine
from .speed import best_time, timed

RESTARTS = 10


def run(out: Path, quick: bool = False, progress: bool = True) -> dict:
    from sklearn.datasets import load_digits

    seed, _, _ = make_counts(200, 100, 5, random_state=42)
    rows = []
    for name, x, k, candidates in (
        ("seed 200 x 100", seed, 5, [3, 4, 5, 6, 7]),
        ("digits 1797 x 64", load_digits().data, 10, [6, 8, 10, 12, 14]),
    ):
        PNMF(k, max_iter=5).fit(x)  # warm up
        single, single_s = timed(PNMF(k, random_state=0).fit, x)
        model, consensus_s = timed(consensus, x, k, RESTARTS, random_state=0)
        with one_by_one():
            _, one_by_one_s = timed(consensus, x, k, RESTARTS, random_state=0)
        plain, select_s = timed(select_n_components, x, candidates)
        table, select_restarts_s = timed(select_n_components, x, candidates, n_restarts=RESTARTS)
        rows.append(
            dict(
                data=name,
                n_components=k,
                single_fit_s=single_s,
                single_elbo=float(single.elbo_),
                consensus_s=consensus_s,
                consensus_one_by_one_s=one_by_one_s,
                consensus_elbo=float(model.elbo_),
                stability=model.stability_,
                outliers=model.n_outliers_,
                candidates=candidates,
                select_s=select_s,
                select_restarts_s=select_restarts_s,
                chosen=plain["best"],
                chosen_with_restarts=table["best"],
                stability_per_k=[float(v) for v in table["stability"]],
            )
        )
    record = dict(machine=machine(), restarts=RESTARTS, rows=rows, lanes=lanes(seed))
    out.mkdir(parents=True, exist_ok=True)
    (out / "workflow.json").write_text(json.dumps(record, indent=1))
    return record


def lanes(x, n_components: int = 5) -> list[dict]:
    """:func:`restart_times` of x on every backend here, on its default device."""
    return [
        dict(backend=backend, **restart_times(x, n_components, backend))
        for backend in BACKENDS
        if importlib.util.find_spec(backend) is not None
    ]


def restart_times(x, n_components: int, backend: str, device: str | None = None, repeats: int = 3) -> dict:
    """Seconds for the fits of RESTARTS restarts of x, together (as lanes) and one by one,
    without the consensus's clustering and refit (least time of ``repeats``)."""
    model = PNMF(n_components, backend=backend, device=device)
    model._fit_restarts(x, [0, 1])  # warm up
    fits = functools.partial(model._fit_restarts, x, list(range(RESTARTS)))
    together = best_time(fits, repeats)
    with one_by_one():
        alone = best_time(fits, repeats)
    return dict(together_s=together, one_by_one_s=alone)


@contextlib.contextmanager
def one_by_one():
    """Restarts fitted one after another even where they could share a step (for comparison)."""
    fewest = restarts.MIN_LANES
    restarts.MIN_LANES = sys.maxsize
    try:
        yield
    finally:
        restarts.MIN_LANES = fewest


def report(record: dict) -> str:
    header = ("data", "K", "1 fit (s)", f"consensus of {record['restarts']} (s)", "one by one (s)", "stability",
              "select K (s)", f"select K, {record['restarts']} restarts (s)", "chosen K",
              "stability per candidate")  # fmt: skip
    body = [
        (
            r["data"],
            r["n_components"],
            f"{r['single_fit_s']:.2f}",
            f"{r['consensus_s']:.2f}",
            f"{r['consensus_one_by_one_s']:.2f}",
            f"{r['stability']:.3f}",
            f"{r['select_s']:.2f}",
            f"{r['select_restarts_s']:.2f}",
            f"{r['chosen']} / {r['chosen_with_restarts']}",
            ", ".join(f"{k}: {s:.2f}" for k, s in zip(r["candidates"], r["stability_per_k"])),
        )
        for r in record["rows"]
    ]
    lines = [_grid(header, body)]
    if "lanes" in record:
        lines += [
            "",
            f"The fits of {record['restarts']} restarts of the seed data alone (least of 3):",
            _grid(
                ("backend", "together (s)", "one by one (s)", "speed-up"),
                [
                    (
                        r["backend"],
                        f"{r['together_s']:.3f}",
                        f"{r['one_by_one_s']:.3f}",
                        f"{r['one_by_one_s'] / r['together_s']:.2f}x",
                    )  # fmt: skip
                    for r in record["lanes"]
                ],
            ),
        ]
    return "\n".join(lines)
