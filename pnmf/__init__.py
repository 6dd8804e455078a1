"""pnmf: probabilistic non-negative matrix factorisation of count data."""

import os

# torch's CPU tensors of 2 MB and more on transparent huge pages (Linux), as NumPy's arrays
# are by default: a fresh buffer then takes one page fault per 2 MB instead of one per 4 kB.
# A torch fit of sparse counts on the CPU, which allocates its buffers afresh each step,
# spent as long in the kernel as in its own code without it (docs/performance.md). torch
# reads the variable at its first allocation, so it is set here, before pnmf uses torch;
# a value already set (THP_MEM_ALLOC_ENABLE=0) is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import plot  # noqa: E402 (after the variable, which must precede any use of torch)
from .consensus import consensus
from .data import make_counts, poisson_deviance, thin
from .estimator import PNMF
from .integrations import fit_anndata, transform_anndata
from .selection import select_n_components

__version__ = "0.1.0"

__all__ = [
    "PNMF",
    "__version__",
    "consensus",
    "fit_anndata",
    "make_counts",
    "plot",
    "poisson_deviance",
    "select_n_components",
    "thin",
    "transform_anndata",
]
