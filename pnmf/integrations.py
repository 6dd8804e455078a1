"""AnnData (scanpy) integration."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from sklearn.utils.validation import check_is_fitted

from . import distributed
from .data import in_memory, pick_columns, share
from .estimator import COUNTS_HINT, PNMF
from .programs import feature_columns


def _size_factors(adata, size_factors):
    """``size_factors`` as PNMF takes them: 'total' (a strategy), an obs column's values or an array."""
    if isinstance(size_factors, str) and size_factors != "total":
        if size_factors not in adata.obs:
            raise KeyError(f"size_factors={size_factors!r} is neither 'total' nor a column of adata.obs")
        return adata.obs[size_factors].to_numpy()
    return size_factors


def batch_labels(obs, key: str) -> np.ndarray:
    """The batch labels in column ``key`` of an obs table, as strings; a ValueError when
    some are missing (NaN would otherwise become a batch called 'nan')."""
    column = obs[key]
    missing = int(column.isna().sum())
    if missing:
        first = column.index[column.isna().to_numpy()][0]
        raise ValueError(
            f"obs[{key!r}] has {missing} missing label{'s' * (missing > 1)} (first: row {first!r}): "
            "give those cells a batch or leave them out"
        )
    return np.asarray(column.astype(str))


def layer_names(adata) -> list[str]:
    """The names of ``adata``'s layers (anndata 0.13 lists X among them, as None)."""
    return [name for name in adata.layers if name is not None]


def _counts(adata, layer: str | None):
    """``adata.X``, or the layer ``layer``; a KeyError naming the layers there when it is not one."""
    if layer is not None:
        layers = layer_names(adata)
        if layer not in layers:
            raw = "; counts in adata.raw are fitted as fit_anndata(adata.raw.to_adata(), ...)" if adata.raw else ""
            raise KeyError(f"layer={layer!r} is not a layer of adata (its layers: {', '.join(layers) or 'none'}{raw})")
        return adata.layers[layer]
    if adata.X is None:
        raise ValueError("adata.X is empty; name a layer with counts (layer=...)")
    return adata.X


@contextlib.contextmanager
def _counts_hint(adata, layer: str | None):
    """Within it, the warning on values that are not counts names where else ``adata``
    keeps a matrix (:data:`pnmf.estimator.COUNTS_HINT`)."""
    token = COUNTS_HINT.set(_other_matrices(adata, layer))
    try:
        yield
    finally:
        COUNTS_HINT.reset(token)


def _other_matrices(adata, layer: str | None) -> str:
    """Which of ``adata``'s matrices was read, and where else it keeps one."""
    others = [f"layer={name!r}" for name in layer_names(adata) if name != layer]
    if layer is not None and adata.X is not None:
        others.insert(0, "adata.X (layer=None)")
    if adata.raw is not None:
        others.append("adata.raw, as fit_anndata(adata.raw.to_adata(), ...)")
    read = "adata.X" if layer is None else f"layer={layer!r}"
    if not others:
        return f"{read} was read; this AnnData has no other layer and no .raw"
    return f"{read} was read; this AnnData also has {', '.join(others)}"


def _labels(adata, batch_key: str | None):
    if batch_key is None:
        return None
    if batch_key not in adata.obs:
        raise KeyError(f"batch_key={batch_key!r} is not a column of adata.obs")
    return batch_labels(adata.obs, batch_key)


def transform_named(model: PNMF, x, names=None, *, batch=None, size_factors=None, source: str = "X"):
    """``model.transform`` of counts x whose columns are the features ``names``.

    The model's features are picked from x by name when they differ (another order, or more
    of them; see :func:`pnmf.programs.feature_columns`). Counts on disk are transformed a
    block of rows at a time (their columns picked block by block), unless they are stored
    by columns (CSC) or a batch unseen in fit needs its rows at once. Returns the factors
    and the picked columns (None: x's own).
    """
    columns = feature_columns(model, x.shape[1], names, source)
    if getattr(x, "format", None) == "csc":  # stored by columns: rows are not read alone
        x = in_memory(x)
    if columns is not None:
        x = pick_columns(x, columns)
    if batch is not None and model.batches_ is not None and model._unseen_batches(batch).size:
        x = in_memory(x)
    with warnings.catch_warnings():  # the names were matched above; the counts carry none
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        return model.transform(x, batch=batch, size_factors=size_factors), columns


def transform_anndata(
    model: PNMF,
    adata,
    layer: str | None = None,
    key_added: str = "pnmf",
    *,
    batch_key: str | None = None,
    size_factors=None,
) -> np.ndarray:
    """Map the cells of ``adata`` onto a fitted model's programs: ``adata.obsm["X_" + key_added]``.

    The counts are ``adata.X`` or ``adata.layers[layer]``; the model's genes are picked by
    name from ``adata.var_names`` (which may hold them in another order, or more genes), so
    a query dataset need not be subset first. ``batch_key`` names the obs column of each
    cell's batch, required when the model was fitted with batches: batches seen in fit keep
    their effects, new ones have theirs estimated with the loadings fixed. ``size_factors``
    as in :func:`fit_anndata` (by default the model's own strategy). A backed AnnData is
    read a block of cells at a time. Returns the factors (n_obs, n_components).
    """
    check_is_fitted(model)
    model._check_batches(batch_key is not None, "batch_key=", ", the column of adata.obs with each cell's batch")
    x = _counts(adata, layer)
    per_cell = _size_factors(adata, size_factors)
    if isinstance(per_cell, str):
        raise ValueError("size_factors='total' is a fitting strategy: transform uses the model's own")
    with _counts_hint(adata, layer):
        factors, _ = transform_named(
            model,
            x,
            np.asarray(adata.var_names),
            batch=_labels(adata, batch_key),
            size_factors=per_cell,
            source="adata" if layer is None else f"adata.layers[{layer!r}]",
        )
    adata.obsm[f"X_{key_added}"] = factors
    return factors


def fit_anndata(
    adata,
    n_components: int,
    layer: str | None = None,
    key_added: str = "pnmf",
    *,
    batch_key: str | None = None,
    size_factors=None,
    **params,
) -> PNMF:
    """Fit PNMF to ``adata.X`` (or ``adata.layers[layer]``) and store the result in ``adata``.

    ``batch_key`` names the column of ``adata.obs`` with each cell's batch: the fit then has
    a batch effect per batch and gene (``PNMF.fit(X, batch=...)``). ``size_factors`` is
    None, ``'total'`` (each cell's total count over the mean), the name of a column of
    ``adata.obs`` holding size factors, or an array of them (one per cell).

    Writes, with ``key = key_added``:

    * ``adata.obsm["X_" + key]``: factors E_q[exp F] of the cells (n_obs, n_components);
    * ``adata.varm[key.upper()]``: loadings W (n_vars, n_components);
    * ``adata.uns[key]``: ``params``, ``elbo``, ``elbo_history``, ``n_iter``, ``converged``,
      ``backend``, ``device``, ``empty_components`` (``PNMF.empty_components_``), and the
      posterior ``mean`` and ``var`` of the log-factors; with batches ``batches`` (the
      labels) and ``batch_effects`` (n_batches, n_vars), and with size factors
      ``size_factors`` (one per cell); and ``top_features``, the program table of
      ``PNMF.top_features`` (20 genes per component in use, named by ``adata.var_names``).

    Sparse matrices stay sparse. ``params`` go to ``PNMF``. Returns the fitted model, its
    ``feature_names_in_`` the genes (``adata.var_names``): ``transform_anndata`` maps other
    cells onto it, matching genes by name.

    An AnnData opened with ``backed="r"`` keeps X on disk: with ``batch_size=`` the fit
    reads one batch of rows at a time (and the last pass, which infers every cell's
    factors, one batch at a time too), so the whole X is never in memory. Without
    ``batch_size`` X is read whole. Only X stays on disk: AnnData reads a backed file's
    layers into memory when it opens it (to fit a layer of a file too large for that, pass
    ``h5py.File(path, "r")["layers/NAME"]`` to ``PNMF(batch_size=...).fit``, or use the
    ``pnmf`` command, which reads a layer by rows).

    With ``distributed=True`` (see ``PNMF``), every process passes the same AnnData (for
    instance the same file opened with ``backed="r"``) and reads only its own block of
    rows, split evenly in rank order (with ``batch_size``, one batch of them at a time).
    The loadings are the same on every process; each process's factors, ``mean`` and
    ``var`` are those of its rows, which ``uns[key]["rows"]`` names as ``[start, stop)``,
    and ``obsm`` is not written.
    """
    x = _counts(adata, layer)
    size_factors = _size_factors(adata, size_factors)
    labels = _labels(adata, batch_key)
    strategy = size_factors if isinstance(size_factors, str) else None
    per_cell = None if size_factors is None or isinstance(size_factors, str) else np.asarray(size_factors)
    model = PNMF(n_components, size_factors=strategy, **params)
    rows = slice(0, adata.n_obs)
    if params.get("distributed"):
        rows = distributed.shard(adata.n_obs, distributed.join_fit(model))
        x = share(x, rows, batched=model.batch_size is not None)  # a backed X reads only these rows
    elif model.batch_size is None:
        x = in_memory(x)
    labels = None if labels is None else labels[rows]
    if per_cell is not None and per_cell.shape[:1] == (adata.n_obs,):
        per_cell = per_cell[rows]
    with _counts_hint(adata, layer):
        factors = model.fit_transform(x, size_factors=per_cell, batch=labels)
    model.feature_names_in_ = np.asarray(adata.var_names).astype(object)  # for top_features, plots, save
    if not params.get("distributed"):
        adata.obsm[f"X_{key_added}"] = factors
    adata.varm[key_added.upper()] = model.loadings_
    adata.uns[key_added] = {
        # Written as .h5ad attributes: numbers, strings and booleans (a checkpoint Path as its text).
        "params": {
            k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in model.get_params().items()
            if v is not None
        },
        "elbo": float(model.elbo_),
        "elbo_history": np.asarray(model.elbo_history_),
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "backend": model.backend_,
        "device": model.device_,
        "empty_components": model.empty_components_,
        "mean": model.mean_,
        "var": model.var_,
        "layer": layer if layer is not None else "X",
        "rows": [rows.start, rows.stop],
    }
    if model.batches_ is not None:
        adata.uns[key_added]["batches"] = np.asarray(model.batches_)
        adata.uns[key_added]["batch_effects"] = model.batch_effects_
    if model.size_factors_ is not None:
        adata.uns[key_added]["size_factors"] = model.size_factors_
    try:
        adata.uns[key_added]["top_features"] = model.top_features(20, feature_names=np.asarray(adata.var_names))
    except ImportError:  # pandas comes with anndata; without it there is no table
        pass
    if params.get("distributed"):
        adata.uns[key_added]["factors"] = factors
    return model
