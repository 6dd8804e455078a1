"""One process of a distributed test fit, started by tests/test_distributed.py.

    python distributed_worker.py RANK WORLD_SIZE JOB_JSON OUT_DIR

The job names the data (``make_counts`` arguments, or ``make_batched_counts``'s with
``batched``), each rank's first row (``bounds``)
and the fits to run; each fit's result is written to OUT_DIR/FIT.rank-RANK.npz.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch.distributed as dist

import pnmf
from pnmf import PNMF, make_counts
from pnmf.data import make_batched_counts
from pnmf.distributed import Group


def batch_labels(start: int, stop: int) -> np.ndarray:
    """The batch labels of global rows start..stop-1 (of different lengths: a rank holding only
    short ones must still learn the long ones whole)."""
    return np.array([("a", "batch-b", "cc")[n % 3] for n in range(start, stop)])


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    job = json.loads(Path(sys.argv[3]).read_text())
    out = Path(sys.argv[4])
    if job.get("engine", "torch") == "torch":
        dist.init_process_group(
            "gloo", init_method=job["rendezvous"], rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
    if job.get("batched"):  # counts with size factors and batch effects (row n in batch n mod 3)
        x = make_batched_counts(*job["data"], n_batches=3, random_state=job["data_seed"])["X"]
    else:
        x, _, _ = make_counts(*job["data"], random_state=job["data_seed"])
    bounds = job["bounds"]
    local = x[bounds[rank] : bounds[rank + 1]]
    if rank in job.get("drop_column", []):
        local = local[:, 1:]
    for index, fit in enumerate(job["fits"]):
        if fit.get("die") == rank:
            os._exit(3)  # dies without a word, as a killed process does
        if fit.get("hang") == rank:
            time.sleep(120)  # alive but never joins the all-reduce
        if fit.get("no_reduce"):
            Group.all_sum = lambda self, b, *arrays: list(arrays)  # the all-reduce switched off
        data = sp.csr_matrix(local) if fit.get("sparse") else local
        # Batches by global row (row n in batch n mod 3): a rank may hold only some of them.
        batch = batch_labels(bounds[rank], bounds[rank + 1]) if fit.get("batches") else None
        if fit.get("h5ad"):  # every rank opens the same file and reads its own rows
            import anndata

            adata = anndata.read_h5ad(fit["h5ad"], backed="r")
            model = pnmf.fit_anndata(adata, distributed=True, **fit["params"])
            start, stop = adata.uns["pnmf"]["rows"]
            data = sp.csr_matrix(x[start:stop])
        else:
            model = PNMF(distributed=True, **fit["params"]).fit(data, batch=batch)
        np.savez(
            out / f"{index}.rank-{rank}.npz",
            loadings=model.loadings_,
            mean=model.mean_,
            var=model.var_,
            elbo=model.elbo_,
            history=model.elbo_history_,
            n_iter=model.n_iter_,
            converged=model.converged_,
            transform=model.transform(data, batch=batch),
            batch_effects=np.zeros(0) if model.batch_effects_ is None else model.batch_effects_,
            prior_scale=model.prior_scale_,
            batches=np.zeros(0) if model.batches_ is None else model.batches_.astype(str),
        )
    if job.get("engine", "torch") == "torch":
        # Every rank leaves together: with torch 2.2 a rank destroying its group after the
        # others had gone hung there in 1 of 5-9 runs (its fits done, its files written).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        # Leave at once: at a normal exit torch.distributed waits for the failed
        # collective up to the group's own timeout (60 s here).
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
