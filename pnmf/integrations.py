"""AnnData (scanpy) integration."""

from __future__ import annotations

import numpy as np

from .estimator import PNMF


def fit_anndata(adata, n_components: int, layer: str | None = None, key_added: str = "pnmf", **params) -> PNMF:
    """Fit PNMF to ``adata.X`` (or ``adata.layers[layer]``) and store the result in ``adata``.

    Writes, with ``key = key_added``:

    * ``adata.obsm["X_" + key]``: factors E_q[exp F] of the cells (n_obs, n_components);
    * ``adata.varm[key.upper()]``: loadings W (n_vars, n_components);
    * ``adata.uns[key]``: ``params``, ``elbo``, ``elbo_history``, ``n_iter``, ``converged``,
      ``backend``, ``device``, and the posterior ``mean`` and ``var`` of the log-factors.

    Sparse matrices stay sparse. ``params`` go to ``PNMF``. Returns the fitted model.
    """
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise ValueError("adata.X is empty; name a layer with counts (layer=...)")
    model = PNMF(n_components, **params)
    factors = model.fit_transform(x)
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
    }
    return model
