"""pnmf: probabilistic non-negative matrix factorisation of count data."""

from . import plot
from .consensus import consensus
from .data import make_counts, poisson_deviance, thin
from .estimator import PNMF
from .integrations import fit_anndata, transform_anndata
from .programs import EmptyComponentsWarning
from .selection import select_n_components

__version__ = "0.1.0"

__all__ = [
    "EmptyComponentsWarning",
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
