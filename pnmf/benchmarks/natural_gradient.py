"""Natural-gradient benchmark: 3 ELBO modes x (standard, natural with each loadings update).

The seed setting: Poisson counts from the model, 200 samples x 100 features, 5 true
components, seed 42, E = 10 Monte Carlo samples, Adam learning rate 0.005, up to 8000
iterations. Every run starts from the same initialisation. For each run it records the
ELBO history, the final ELBO (``PNMF.elbo_``), wall time, and the held-out Poisson
deviance of a second fit on a binomial half of the counts, scored on the other half.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import PNMF, make_counts, poisson_deviance, thin
from ..elbo import MODES
from .speed import timed

# (training_mode, loadings_update) of the compared trainers.
TRAININGS = (("standard", "adam"), ("natural", "multiplicative"), ("natural", "adam"))
CLOSE = 1e-3  # "reached": within this relative distance of the best final ELBO of the mode
STOP_TOL = 1e-4  # the estimator's default tolerance: where a fit stops on its own
SMOOTH = 10  # moving-average window for Monte Carlo histories


@dataclass
class Setting:
    n_samples: int = 200
    n_features: int = 100
    n_components: int = 5
    seed: int = 42
    E: int = 10
    learning_rate: float = 0.005
    max_iter: int = 8000
    tol: float = 1e-6


@dataclass
class Run:
    backend: str
    device: str
    mode: str
    training: str
    loadings_update: str
    n_iter: int
    converged: bool
    final_elbo: float
    wall_s: float
    ms_per_iter: float
    heldout_deviance: float
    history: list = field(repr=False)
    stop_iter: int = 0  # the fit at tol=STOP_TOL: where it stopped, in what time, at what ELBO
    stop_wall_s: float = 0.0
    stop_elbo: float = 0.0
    iters_to_close: int | None = None
    best_elbo: float | None = None


def run_one(x, train, test, setting: Setting, backend: str, mode: str, training: str, update: str) -> Run:
    """Fit once on X (timed) and once on the training half (held-out deviance on the test half)."""
    params = dict(
        n_components=setting.n_components,
        mode=mode,
        training_mode=training,
        loadings_update=update,
        prior_scale=1.0,
        backend=backend,
        E=setting.E,
        learning_rate=setting.learning_rate,
        max_iter=setting.max_iter,
        tol=setting.tol,
        random_state=setting.seed,
    )
    PNMF(**{**params, "max_iter": 20}).fit(x)  # warm up: imports, compilation, caches
    model, wall = timed(PNMF(**params).fit, x)
    stopping, stop_wall = timed(PNMF(**{**params, "tol": STOP_TOL}).fit, x)
    half = PNMF(**params).fit(train)
    rate = np.exp(half.mean_ + half.var_ / 2) @ half.components_  # test and train halves share the rate
    return Run(
        backend=model.backend_,
        device=model.device_,
        mode=mode,
        training=training,
        loadings_update=update,
        n_iter=model.n_iter_,
        converged=model.converged_,
        final_elbo=model.elbo_,
        wall_s=wall,
        ms_per_iter=1e3 * wall / max(model.n_iter_, 1),
        heldout_deviance=poisson_deviance(test, rate),
        history=[float(v) for v in model.elbo_history_],
        stop_iter=int(stopping.n_iter_),
        stop_wall_s=stop_wall,
        stop_elbo=float(stopping.elbo_),
    )


def smoothed(history, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(iteration, ELBO): a 10-iteration moving average in the Monte Carlo modes, else as is."""
    values = np.asarray(history, dtype=float)
    if mode == "lower-bound" or len(values) < SMOOTH:
        return np.arange(1, len(values) + 1), values
    return np.arange(SMOOTH, len(values) + 1), np.convolve(values, np.ones(SMOOTH) / SMOOTH, mode="valid")


def iterations_to(history, target: float, mode: str) -> int | None:
    """First iteration whose (smoothed) ELBO is within CLOSE of ``target``; None if never."""
    steps, values = smoothed(history, mode)
    hits = np.flatnonzero(np.abs(values - target) <= CLOSE * abs(target))
    return int(steps[hits[0]]) if hits.size else None


def summarise(runs: list[Run]) -> None:
    """Fill each run's best ELBO (of its backend and mode) and iterations to reach it."""
    for run in runs:
        peers = [r for r in runs if r.backend == run.backend and r.mode == run.mode]
        run.best_elbo = max(r.final_elbo for r in peers)
        run.iters_to_close = iterations_to(np.asarray(run.history), run.best_elbo, run.mode)


def speedups(runs: list[Run]) -> list[dict]:
    """Standard's iterations to within 1e-3 of the best, over each natural variant's."""
    rows = []
    for run in runs:
        if run.training != "natural":
            continue
        standard = next(r for r in runs if r.backend == run.backend and r.mode == run.mode and r.training == "standard")
        ratio = None
        if run.iters_to_close and standard.iters_to_close:
            ratio = standard.iters_to_close / run.iters_to_close
        rows.append(
            dict(
                backend=run.backend,
                mode=run.mode,
                loadings_update=run.loadings_update,
                standard_iters=standard.iters_to_close,
                natural_iters=run.iters_to_close,
                ratio=ratio,
                elbo_gain=run.final_elbo - standard.final_elbo,
            )
        )
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(runs: list[Run]) -> str:
    header = (
        "backend",
        "device",
        "mode",
        "training",
        "W update",
        "iters",
        "iters@1e-3",
        "final ELBO",
        "wall s",
        "ms/iter",
        "held-out dev.",
        "stop@1e-4",
        "stop s",
        "stop ELBO",
    )
    rows = [
        (
            r.backend,
            r.device,
            r.mode,
            r.training,
            r.loadings_update,
            str(r.n_iter),
            _fmt(r.iters_to_close, "d"),
            f"{r.final_elbo:.1f}",
            f"{r.wall_s:.2f}",
            f"{r.ms_per_iter:.3f}",
            f"{r.heldout_deviance:.1f}",
            str(r.stop_iter),
            f"{r.stop_wall_s:.2f}",
            f"{r.stop_elbo:.1f}",
        )
        for r in runs
    ]
    return _grid(header, rows)


def speedup_table(rows: list[dict]) -> str:
    header = ("backend", "mode", "natural W update", "standard iters@1e-3", "natural iters@1e-3", "ratio", "ELBO gain")
    body = [
        (
            r["backend"],
            r["mode"],
            r["loadings_update"],
            _fmt(r["standard_iters"], "d"),
            _fmt(r["natural_iters"], "d"),
            _fmt(r["ratio"], ".1f"),
            f"{r['elbo_gain']:+.1f}",
        )
        for r in rows
    ]
    return _grid(header, body)


def _grid(header, rows) -> str:
    """A Markdown table."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def plot(runs: list[Run], out: Path) -> list[Path]:
    """The two figures; nothing (and a note) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    training_colors = {
        ("standard", "adam"): "tab:blue",
        ("natural", "multiplicative"): "tab:red",
        ("natural", "adam"): "tab:orange",
    }
    mode_colors = {"simple": "tab:green", "expanded": "tab:purple", "lower-bound": "tab:brown"}
    styles = dict(zip(sorted({r.backend for r in runs}), ("-", "--", ":")))
    paths = []

    fig, axes = plt.subplots(2, len(MODES), figsize=(5 * len(MODES), 8), squeeze=False)
    for col, mode in enumerate(MODES):
        for run in (r for r in runs if r.mode == mode):
            style = dict(color=training_colors[(run.training, run.loadings_update)], ls=styles[run.backend], lw=1.2)
            history = np.asarray(run.history)
            axes[0, col].loglog(
                np.arange(1, len(history) + 1),
                -history,
                **style,
                label=f"{run.training} (W: {run.loadings_update}), {run.backend}",
            )
            steps, values = smoothed(history, mode)
            gap = np.abs(values - run.best_elbo) / abs(run.best_elbo)
            axes[1, col].loglog(steps, np.maximum(gap, 1e-8), **style)
        axes[0, col].set_title(f"mode = {mode}")
        axes[0, col].set_ylabel("loss (-ELBO)")
        axes[1, col].axhline(CLOSE, color="grey", lw=0.8, ls="--")
        axes[1, col].set_ylabel("|ELBO - best| / |best|" + (" (10-iteration mean)" if mode != "lower-bound" else ""))
        axes[1, col].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Standard (Adam) vs natural-gradient training")
    fig.tight_layout()
    paths.append(out / "natural_gradient_comparison.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    best = max(r.final_elbo for r in runs)
    fig, axes = plt.subplots(1, len(TRAININGS), figsize=(5 * len(TRAININGS), 4), squeeze=False, sharey=True)
    for col, (training, update) in enumerate(TRAININGS):
        ax = axes[0, col]
        for run in (r for r in runs if (r.training, r.loadings_update) == (training, update)):
            history = np.asarray(run.history)
            ax.semilogx(
                np.arange(1, len(history) + 1),
                history,
                color=mode_colors[run.mode],
                ls=styles[run.backend],
                lw=1.2,
                label=f"{run.mode}, {run.backend}",
            )
        ax.set_title(f"{training} (W: {update})")
        ax.set_xlabel("iteration")
        ax.set_ylim(best - 0.05 * abs(best), best + 0.005 * abs(best))
    axes[0, 0].set_ylabel("ELBO")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("ELBO of every mode, per training mode")
    fig.tight_layout()
    paths.append(out / "natural_gradient_elbo_comparison.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def machine() -> str:
    import os

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run(backends: list[str], out: Path, setting: Setting, progress: bool = True) -> list[Run]:
    """Every (backend, mode, training) run of ``setting``; writes JSON and figures to ``out``."""
    from tqdm.auto import tqdm

    x, _, _ = make_counts(setting.n_samples, setting.n_features, setting.n_components, random_state=setting.seed)
    train, test = thin(x, 0.5, random_state=setting.seed)
    jobs = [(b, m, t, u) for b in backends for m in MODES for t, u in TRAININGS]
    runs = []
    with tqdm(jobs, desc="benchmark", unit="run", disable=not progress) as bar:
        for backend, mode, training, update in bar:
            bar.set_postfix_str(f"{backend} {mode} {training}/{update}")
            runs.append(run_one(x, train, test, setting, backend, mode, training, update))
    summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(setting=asdict(setting), machine=machine(), runs=[asdict(r) for r in runs], speedups=speedups(runs))
    (out / "natural_gradient.json").write_text(json.dumps(record, indent=1))
    plot(runs, out)
    return runs
