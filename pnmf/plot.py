"""Figures of a fitted model (needs matplotlib: ``pip install "pnmf-vi[plot]"``)."""

from __future__ import annotations

import numpy as np

from .programs import empty_components, empty_note, feature_labels, specificity


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('pnmf.plot needs matplotlib: pip install "pnmf-vi[plot]"') from err
    return plt


def _axes(ax, figsize=(6, 4)):
    if ax is None:
        _, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
    return ax


def elbo_history(model, ax=None):
    """The ELBO at every iteration of the fit (log iteration axis)."""
    history = np.asarray(model.elbo_history_)
    if history.size == 0:
        raise ValueError(
            "the model has no ELBO history: a consensus of restarts has none of its own (their final ELBOs are "
            "restart_elbos_; pnmf.plot.consensus draws the restarts)"
        )
    ax = _axes(ax)
    ax.semilogx(np.arange(1, len(history) + 1), history, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("ELBO")
    ax.set_title(f"{model.mode}, {model.training_mode} training: ELBO {model.elbo_:.6g}")
    return ax


def loadings(model, feature_names=None, top: int = 8, ax=None, table=None):
    """Heatmap of the loadings of each component's ``top`` most specific features (rows scaled
    to max 1), as ``model.top_features`` ranks them by specificity; empty components
    (``model.empty_components_``) have none, and the title names them.

    ``table``: a ``top_features`` table to take the rows and their labels from instead.
    """
    w = np.asarray(model.loadings_)
    names = feature_labels(model, feature_names)
    chosen = []
    if table is not None:
        picked = table[table["ranking"] == "specificity"].sort_values(["component", "rank"])
        index = {name: d for d, name in enumerate(names)}
        missing = sorted(set(picked["feature"]) - set(index))
        if missing:
            raise ValueError(f"table names features the model does not have: {missing[:5]}")
        candidates = [index[f] for f in picked["feature"]]
    else:
        score = specificity(w)
        used = np.flatnonzero(~empty_components(w))
        candidates = [d for l in used for d in np.argsort(-score[:, l], kind="stable")[:top]]
    for d in candidates:
        if d not in chosen:
            chosen.append(d)
    block = w[chosen] / np.maximum(w[chosen].max(axis=1, keepdims=True), 1e-300)
    ax = _axes(ax, figsize=(1.0 + 0.6 * w.shape[1], 0.25 * len(chosen) + 1.5))
    image = ax.imshow(block, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(chosen)), names[chosen], fontsize=7)
    ax.set_xticks(range(w.shape[1]), [str(l) for l in range(w.shape[1])])
    ax.set_xlabel("component")
    empty = np.flatnonzero(empty_components(w))
    title = "loadings (each feature scaled to its largest)"
    ax.set_title(title + (f"; empty: {empty_note(empty)}" if empty.size else ""))
    ax.figure.colorbar(image, ax=ax, fraction=0.05)
    return ax


def factors(model, component: int = 0, max_rows: int = 200, ax=None):
    """Posterior mean of F[:, component] per row, sorted, with q's 95% interval (``mean_``,
    ``var_``: too narrow in ``lower-bound`` mode; ``model.posterior(X, method="laplace")``
    gives the wider Laplace variances)."""
    n_components = np.shape(model.mean_)[1]
    if not -n_components <= component < n_components:
        raise ValueError(f"component={component} is not one of the model's {n_components} (0 to {n_components - 1})")
    mean = np.asarray(model.mean_)[:, component]
    sd = np.sqrt(np.asarray(model.var_)[:, component])
    order = np.argsort(mean)
    if len(order) > max_rows:
        order = order[np.linspace(0, len(order) - 1, max_rows).astype(int)]
    ax = _axes(ax)
    position = np.arange(len(order))
    ax.fill_between(
        position,
        mean[order] - 1.96 * sd[order],
        mean[order] + 1.96 * sd[order],
        alpha=0.3,
        label="95% posterior interval",
    )
    ax.plot(position, mean[order], lw=1.2, label="posterior mean")
    ax.set_xlabel("rows, sorted by posterior mean")
    ax.set_ylabel(f"log-factor F[:, {component}]")
    ax.legend(fontsize=8)
    return ax


def n_components(table: dict, ax=None):
    """Held-out deviance against the number of components (from ``select_n_components``), and
    with restarts the consensus stability on a second axis, as cNMF's K-selection plot; the
    chosen K is marked."""
    from matplotlib.ticker import MaxNLocator

    ax = _axes(ax)
    lines = ax.plot(table["n_components"], table["heldout_deviance"], marker="o", color="C0", label="held-out deviance")
    lines.append(ax.axvline(table["best"], color="grey", ls="--", lw=0.8, label=f"chosen: {table['best']}"))
    ax.set_xlabel("number of components")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no tick between two numbers of components
    ax.set_ylabel("held-out Poisson deviance", color="C0")
    if "stability" in table:
        right = ax.twinx()
        lines += right.plot(
            table["n_components"], table["stability"], marker="s", color="C1", label="stability (silhouette)"
        )
        right.set_ylabel("consensus stability (silhouette)", color="C1")
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    return ax


def consensus(model, axes=None):
    """The restarts behind a consensus model (from :func:`pnmf.consensus`), as cNMF draws them.

    Left: the cosine similarity of every restart's components, grouped by the consensus
    component each joined (outliers and empty components last, past the white line):
    bright blocks on the diagonal are programs every restart found. Right: each component's
    mean distance to its neighbours, the outlier criterion, with ``density_threshold``
    marked: a threshold in a gap between a peak near 0 and a tail keeps the reproducible
    components. ``axes``: two Axes to draw into. Returns the two Axes.
    """
    labels = getattr(model, "restart_labels_", None)
    if labels is None and hasattr(model, "stability_"):
        raise ValueError(
            "a consensus read from a file keeps its stability, not each restart's components: draw the model "
            "pnmf.consensus returns (the pnmf consensus command writes this figure as consensus.png)"
        )
    if labels is None:
        raise ValueError("the model is not a consensus: fit it with pnmf.consensus")
    if axes is None:
        _, axes = _pyplot().subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    left, right = axes
    # Kept components by consensus component, then the outliers; restart order within each.
    order = np.lexsort((np.arange(len(labels)), np.where(labels < 0, labels.max() + 1, labels)))
    image = left.imshow(model.restart_similarity_[np.ix_(order, order)], vmin=0, vmax=1, interpolation="nearest")
    left.figure.colorbar(image, ax=left, fraction=0.05, label="cosine similarity")
    kept = int((labels >= 0).sum())
    if kept < len(labels):
        for line in (left.axhline, left.axvline):
            line(kept - 0.5, color="white", lw=1.5)
    left.set_title(f"{len(labels)} components of the restarts, by consensus component")
    left.set_xticks([])
    left.set_yticks([])
    used = np.isfinite(model.local_density_)  # not the components a restart left empty
    right.hist(model.local_density_[used], bins=min(50, max(10, len(labels) // 4)), color="C0")
    dropped = int((labels[used] < 0).sum())
    empty = f"; {int((~used).sum())} empty, not drawn" if not used.all() else ""
    right.axvline(model.density_threshold_, color="C3", ls="--", label=f"threshold: {dropped} dropped{empty}")
    right.set_xlabel("mean distance to nearest neighbours")
    right.set_ylabel("components")
    right.legend(fontsize=8)
    return axes


def batch_effects(model, feature_names=None, top: int = 30, ax=None):
    """Heatmap of log2 of the batch effects g (batches x features) of the ``top`` features
    whose effects differ most between batches (by the spread of log g), each centred on its
    mean over the batches: red where a batch measures a feature higher than the others,
    blue where lower. The features a batch shifts most, at a glance.
    """
    g = getattr(model, "batch_effects_", None)
    if g is None:
        raise ValueError("the model has no batch effects: fit it with batch= (one label per row)")
    names = feature_labels(model, feature_names)
    log_g = np.log2(np.maximum(np.asarray(g, dtype=np.float64), 1e-300))
    centred = log_g - log_g.mean(axis=0, keepdims=True)
    chosen = np.argsort(-np.ptp(centred, axis=0), kind="stable")[: min(top, centred.shape[1])]
    limit = max(float(np.abs(centred[:, chosen]).max()), 1e-12)
    ax = _axes(ax, figsize=(0.25 * len(chosen) + 2.5, 0.35 * len(g) + 2.0))
    image = ax.imshow(centred[:, chosen], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(chosen)), names[chosen], rotation=90, fontsize=7)
    ax.set_yticks(range(len(g)), [str(b) for b in model.batches_])
    ax.set_title(f"batch effects: log2 g, centred per feature ({len(chosen)} most variable)")
    ax.figure.colorbar(image, ax=ax, fraction=0.05, label="log2 fold")
    return ax
