"""AnnData (scanpy) integration."""

from __future__ import annotations

import numpy as np

from . import distributed
from .backends import get_backend
from .estimator import PNMF


def fit_anndata(adata, n_components: int, layer: str | None = None, key_added: str = "pnmf", **params) -> PNMF:
    """Fit PNMF to ``adata.X`` (or ``adata.layers[layer]``) and store the result in ``adata``.

    Writes, with ``key = key_added``:

    * ``adata.obsm["X_" + key]``: factors E_q[exp F] of the cells (n_obs, n_components);
    * ``adata.varm[key.upper()]``: loadings W (n_vars, n_components);
    * ``adata.uns[key]``: ``params``, ``elbo``, ``elbo_history``, ``n_iter``, ``converged``,
      ``backend``, ``device``, and the posterior ``mean`` and ``var`` of the log-factors.

    Sparse matrices stay sparse. ``params`` go to ``PNMF``. Returns the fitted model.

    An AnnData opened with ``backed="r"`` keeps X on disk: with ``batch_size=`` the fit
    reads one batch of rows at a time (and the last pass, which infers every cell's
    factors, one batch at a time too), so the whole X is never in memory. Without
    ``batch_size`` X is read whole.

    With ``distributed=True`` (see ``PNMF``), every process passes the same AnnData (for
    instance the same file opened with ``backed="r"``) and reads only its own block of
    rows, split evenly in rank order. The loadings are the same on every process; each
    process's factors, ``mean`` and ``var`` are those of its rows, which ``uns[key]["rows"]``
    names as ``[start, stop)``, and ``obsm`` is not written.
    """
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise ValueError("adata.X is empty; name a layer with counts (layer=...)")
    model = PNMF(n_components, **params)
    rows = slice(0, adata.n_obs)
    if params.get("distributed"):
        backend = get_backend(model.backend, model.device, model.dtype).name
        rows = distributed.shard(adata.n_obs, distributed.join(backend, model.distributed_timeout))
        x = x[rows]  # a backed X reads only these rows
    elif getattr(adata, "isbacked", False) and layer is None and model.batch_size is None:
        x = x[0 : adata.n_obs]
    factors = model.fit_transform(x)
    if not params.get("distributed"):
        adata.obsm[f"X_{key_added}"] = factors
    adata.varm[key_added.upper()] = model.loadings_
    adata.uns[key_added] = {
        "params": {k: v for k, v in model.get_params().items() if v is not None},
        "elbo": float(model.elbo_),
        "elbo_history": np.asarray(model.elbo_history_),
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "backend": model.backend_,
        "device": model.device_,
        "mean": model.mean_,
        "var": model.var_,
        "layer": layer if layer is not None else "X",
        "rows": [rows.start, rows.stop],
    }
    if params.get("distributed"):
        adata.uns[key_added]["factors"] = factors
    return model
