"""pnmf: probabilistic non-negative matrix factorisation of count data."""

from .data import make_counts, poisson_deviance, thin
from .estimator import PNMF

__version__ = "0.1.0"

__all__ = ["PNMF", "__version__", "make_counts", "poisson_deviance", "thin"]
