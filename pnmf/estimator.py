"""The PNMF estimator: parameters, validation and the fitted attributes.

The loop that runs a fit (phases, stopping, progress, Ctrl-C, checkpoints) is
:mod:`pnmf.loop`; the all-reduce of a distributed fit is :mod:`pnmf.distributed`.
"""

from __future__ import annotations

import contextvars
import json
import math
import numbers
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data

from . import distributed, io, loop, programs
from .backends import BACKENDS, get_backend
from .data import DiskRows, canonical_csr, non_integers, on_disk, refuse_containers, release_freed_memory
from .elbo import MEAN_BOUND, MODES, Noise, as_counts, evaluate
from .init import INITS, initialize
from .laplace import laplace_variance
from .loop import TAIL_STANDARD, Phase
from .natural import NaturalTrainer
from .optim import LOADINGS_UPDATES, Averaged, StandardTrainer
from .restarts import LaneTrainer, lanes_per_step
from .scaling import (
    SIZE_FACTORS,
    RowEffects,
    batch_sums,
    check_batch,
    check_size_factors,
    normalise,
    row_totals,
    total_size_factors,
    union_labels,
)
from .svi import TAIL as SVI_TAIL
from .svi import MinibatchTrainer

TRAINING_MODES = ("standard", "natural")
# Stored counts x Monte Carlo samples per iteration up to which a fit runs on one thread.
# At the seed's size (2e5) a second thread saved 3-10% on an idle 2-core machine and cost up
# to 2x (torch) whenever the other core was busy; from ~1e6 on it saves 15-45%.
SMALL_WORK = 1_000_000
FINAL_SAMPLES = 64  # Monte Carlo samples for the reported ELBO
NATURAL_SAMPLES, STANDARD_SAMPLES = 2, 10  # E's defaults (see its docstring)
# The lower-bound warm start of a natural Monte Carlo fit stops at this tolerance: the
# benchmark reached 1e-3 of the best ELBO in ~95 iterations with it, 354 with 1e-5.
WARMUP_TOL = 3e-4
AVERAGE_ETA = 3.0
# Share of the change tol stops at (tol |ELBO|) that the ELBO's float rounding, eps * sum X,
# may reach before a fit warns that it may stop short (see PNMF._warn_if_rounded).
ROUNDED_SHARE = 0.25


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of " + ", ".join(repr(a) for a in allowed))


# Rows of counts on disk (at most a block) whose values are checked for integers before a fit.
COUNTS_CHECKED_ON_DISK = 1000


# Where the caller's data keep other matrices that may hold the raw counts (fit_anndata: an
# AnnData's layers and .raw), for the warning on values that are not counts; None: unknown.
COUNTS_HINT: contextvars.ContextVar[str | None] = contextvars.ContextVar("COUNTS_HINT", default=None)


def warn_if_not_counts(values: np.ndarray) -> None:
    """Warn when the counts hold non-integer values: normalised data in place of counts.

    The model is Poisson: scaled or log-transformed values violate it, and the ELBO is
    then no bound on a likelihood. Intensities that are not counts (some spectra, images)
    can still be fitted; the warning says what the numbers mean, and where the raw counts
    may be (:data:`COUNTS_HINT`).
    """
    n, example = non_integers(values)
    if n:
        where = COUNTS_HINT.get() or "of an AnnData, often layers['counts'] or .raw.X"
        warnings.warn(
            f"X holds non-integer values ({n:,} of {np.size(values):,} entries, such as {example:.4g}): the model is "
            "Poisson, for counts; normalised or log-transformed data violate it and the ELBO is then no bound on "
            f"a likelihood. Pass the raw counts ({where}).",
            UserWarning,
            stacklevel=loop.user_stacklevel(),  # the user's call, through fit_anndata or a Pipeline too
        )


def _number(name: str, value, *, integer=False, low=None, high=None, low_open=False, allow_none=False):
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise TypeError(f"{name}={value!r} must be {'an integer' if integer else 'a finite real number'}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value!r} must be <= {high}")


class PNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Probabilistic non-negative matrix factorisation of counts.

    Counts X (n_samples, n_features) are Poisson with rate exp(F) @ W.T, where the
    log-factors F (n_samples, n_components) have a Normal(0, prior_scale^2) prior and a
    Gaussian variational posterior q(F) = Normal(``mean_``, ``var_``), and the loadings
    W = ``loadings_`` (n_features, n_components) are non-negative. ``fit`` maximises the
    evidence lower bound (ELBO), a lower bound on log p(X | W) that includes
    lgamma(X + 1), so it can be compared across modes, backends and other models.

    Parameters
    ----------
    n_components : int
        Number of components L.
    mode : {'lower-bound', 'expanded', 'simple'}
        How E_q[log rate] is estimated: 'lower-bound' (deterministic Jensen bound, the
        default), 'expanded' (Monte Carlo log term, exact expected rate) or 'simple' (both
        by Monte Carlo). 'expanded' gives a tighter bound and, measured on three data sets
        (docs/defaults.md), a 0.14-3.8% lower held-out deviance under natural training, for
        3-17x the time.
    training_mode : {'natural', 'standard'}
        'natural' (the default): natural-gradient steps on q(F) (see ``ngd_lr``); the Monte
        Carlo modes start from a 'lower-bound' natural fit. 'standard': Adam on the mean,
        log standard deviation and loadings.
    backend : {'auto', 'numpy', 'torch', 'mlx'}
        Array framework. 'auto' takes MLX on an Apple-silicon GPU, torch on CUDA or MPS,
        then on the CPU NumPy for dense counts and torch (if installed) for sparse ones.
    device : str, optional
        Device within the backend: torch 'cpu', 'cuda', 'cuda:1', 'mps'; MLX 'cpu', 'gpu'.
    E : int, optional
        Monte Carlo samples per iteration in the 'simple' and 'expanded' modes, drawn in
        antithetic pairs (eps, -eps): an even E gets the most from them. Default: 2 under
        natural training, whose averaged iterates absorb the noise of one antithetic pair
        (E=10 costs 4-5x the time for an ELBO within 1e-4: docs/natural_gradient.md), 10
        under standard training.
    max_iter : int
        Most iterations (every phase of a fit together).
    tol : float
        When to stop. In 'lower-bound' mode: when the mean ELBO over the last 10 iterations
        changed by less than ``tol`` (relative) against the 10 before. In the Monte Carlo
        modes the fitted parameters are the average of the last iterates (Polyak averaging)
        and the rule reads their ELBO estimated with the same noise at every check (every 10
        iterations): it stops when both the gain over the last quarter of the phase and the gain
        still to come, extrapolated from how the gains shrink, are under ``tol * |ELBO|``,
        so ``tol`` is about the relative distance to the ELBO the fit converges to; not
        before 150 iterations of that phase, and never on the noise of a single estimate.
        Mini-batch fits stop by the same rule, on the ELBO of one fixed batch of rows at
        the averaged loadings (see ``batch_size``). 0 disables early stopping.
    learning_rate : float
        Adam's step size (standard training, and the loadings under ``loadings_update='adam'``).
    ngd_lr : float in (0, 1], optional
        Natural-gradient step rho on the total ELBO. Each row's q(F) sees only its own row
        of X, so rho needs no 1/n_samples factor and means the same at any data size.
        Default 1.0 in 'lower-bound' mode (with step rejection), and 0.2 in the Monte Carlo
        modes, decayed as rho (1 + t/50)^-0.7.
    loadings_update : {'adam', 'multiplicative'}, optional
        How W is updated. Default 'adam' for standard training and 'multiplicative' (the
        exact maximiser of the Jensen bound in W, no learning rate) for natural training.
        In the Monte Carlo modes under natural training the multiplicative update carries
        heavy-ball momentum on log W (0.9, at most a factor e^0.3 per step), which halved the
        iterations to convergence on a sparse 10,000 x 2,000 set.
    init : {'random', 'nndsvda', 'nndsvd'}
        Initial factors, computed in NumPy so every backend starts from the same point.
        'random' is the default: on the benchmark's data, natural training from it reached
        within 1e-3 of its final ELBO in 90-140 iterations and ended higher, against
        250-480 iterations from the SVD-based starts, whose near-zero entries start
        exp(F) far down the log scale.
    init_var : float
        Initial variance of q(F), the same for both training modes.
    prior_scale : float or 'auto'
        Standard deviation s of the Normal prior on F, the same for every component (default
        1). 'auto' fits one per component by empirical Bayes: held at 1 until the fit has
        first settled (to ``max(tol, 3e-4)``; in mini-batch fits for the first 100 steps),
        then at every step s_l^2 = mean_n (mu[n, l]^2 + var[n, l]), the maximiser of the
        ELBO for fixed q(F) (``prior_scale_`` holds the fitted values). Updated from the
        first step, the scales shrank the factors before the programs had formed and the fit
        settled in a worse optimum. Measured (docs/defaults.md): it lowered the held-out
        deviance on three data sets and raised the ELBO of a batch-aware fit of 20,000 x
        2,000 counts, whose loadings came a little further from the planted ones (cosine 0.895
        against 0.918); it is not the default.
    random_state : int, RandomState or None
        Seeds the initialisation and the Monte Carlo noise. With ``distributed=True`` and
        no int, rank 0 draws the seed for every rank (their loadings start alike).
    verbose : bool
        Show a progress bar with the running ELBO.
    dtype : {'float32', 'float64'}
        Floating dtype of the computation (float64 is not available on MLX GPUs or MPS).
    batch_size : int, optional
        Rows per step for mini-batch stochastic variational inference, for data that do
        not fit in device memory (only the batch is moved to the device) or on disk (a
        backed AnnData's X, an h5py or zarr dataset: only the batch is read). Each step
        takes 10 natural lower-bound steps on the batch's q(F), started afresh from the
        rows' totals, with W fixed, then moves W
        towards the batch's multiplicative update, W <- (1 - r_t) W + r_t W_batch, with the
        Robbins-Monro schedule r_t = (1 + t/100)^-0.6. The batch sums in that update stand
        for the full-data sums rescaled by N/batch; the factor cancels in its ratio.
        The fitted W (and batch effects, prior scale) is the average of the iterates, as in a
        Monte Carlo fit, over about the last quarter of the steps; the stopping rule reads
        the ELBO of one fixed batch of rows at that average every 10 steps (the batch read
        once and kept), so it stops when the loadings have settled, not on which batch a
        step drew. ``elbo_history_`` holds N/batch times each batch's ELBO; after the last
        step a pass over all rows infers their q(F) and ``elbo_`` is the full-data ELBO.
        ``max_iter`` counts steps. Needs ``training_mode='natural'`` (multiplicative
        loadings update).
    distributed : bool
        Data-parallel fit: this process's X is one block of rows of the whole matrix and
        every step sums the loadings' statistics over the processes of the group set up
        by ``torchrun``/``torch.distributed`` (torch, NumPy) or ``mlx.launch`` (MLX). The
        fitted loadings, ELBO and history are those of all rows and equal on every rank;
        ``mean_``/``var_`` are this process's rows. Needs ``init='random'``. With
        ``batch_size``, each process draws its share of every batch from its own rows. On
        several GPUs give each process its own (``device=f"cuda:{local_rank}"``); when pnmf
        starts the group under ``torchrun`` itself (NCCL for a fit on CUDA, gloo
        otherwise), ``device='cuda'`` puts each process on GPU ``LOCAL_RANK``.
    distributed_timeout : float, optional
        Seconds a collective may wait for the other processes before raising.
    checkpoint : str or Path, optional
        File to which the fit's state is written every ``checkpoint_every`` iterations
        (write then rename); a fit started again with the same data and parameters resumes
        from it, and one with other data or parameters is refused.
    checkpoint_every : int
        Iterations between checkpoints.
    size_factors : {None, 'total'}
        Per-row size factors s (sequencing depth, document length) in the rate
        s[n] g[batch(n), d] (exp(F) @ W.T)[n, d], so that the factors do not soak them up.
        None: no size factors (s = 1); 'total': each row's total count over the mean total
        of the training rows (``transform`` divides new rows' totals by the same mean).
        Per-row values given to ``fit``/``transform`` (``size_factors=``) override it.
        Batch effects g come from ``fit(X, batch=labels)``: a factor per batch and feature,
        fitted in closed form, so programs are shared across batches (see ``batch_effects_``).

    Attributes
    ----------
    components_ : ndarray (n_components, n_features)
        W.T, the loadings as rows, as in scikit-learn's NMF.
    loadings_ : ndarray (n_features, n_components)
        W, in float64.
    empty_components_ : ndarray of int
        The components the fit left empty, whose loadings sum to under 1e-6 of the largest
        component's: the natural steps shrink the loadings of a component the data do not
        need to zero, so a fit with more components than the data hold may have some (with
        a ``pnmf.EmptyComponentsWarning``). They add nothing to the rate, their factors keep
        the prior, and ``top_features`` leaves them out.
    mean_, var_ : ndarray (n_samples, n_components)
        Mean and variance of q(F) for the training rows, in ``dtype`` (float32 by default),
        the precision they were computed in: what grows with the rows takes no more memory
        than the fit needed. ``transform``, ``fit_transform`` and ``posterior`` return
        ``dtype`` too.
    elbo_ : float
        ELBO at the returned parameters (exact in 'lower-bound' mode, a Monte Carlo
        estimate with 64 samples otherwise).
    elbo_history_ : ndarray (n_iter,)
        ELBO (estimate) at each iteration.
    size_factors_ : ndarray (n_samples,) or None
        The training rows' size factors s (None without size factors).
    batches_ : ndarray (n_batches,) or None
        The batch labels seen in fit, sorted (None when fitted without ``batch``).
    batch_effects_ : ndarray (n_batches, n_features) or None
        g, the batch-specific scaling of each feature, row b for ``batches_[b]``. g and the
        loadings trade scale feature by feature; the fit fixes it so that each feature's
        mean of g over the batches, weighted by the feature's counts in each batch, is 1:
        sum_b X_b[b, d] g[b, d] = sum_b X_b[b, d] (X_b: the column sums of batch b's rows).
    prior_scale_ : ndarray (n_components,)
        The prior scale of each component (``prior_scale`` repeated, or fitted with 'auto').
    reference_total_ : float or None
        With ``size_factors='total'``, the mean total count of the training rows.
    n_iter_ : int
    converged_ : bool
    backend_, device_ : str
        The backend and device used.
    n_features_in_ : int
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        mode: str = "lower-bound",
        training_mode: str = "natural",
        backend: str = "auto",
        device: str | None = None,
        E: int | None = None,
        max_iter: int = 2000,
        tol: float = 1e-4,
        learning_rate: float = 0.05,
        ngd_lr: float | None = None,
        loadings_update: str | None = None,
        init: str = "random",
        init_var: float = 0.01,
        prior_scale: float | str = 1.0,
        random_state=None,
        verbose: bool = False,
        dtype: str = "float32",
        batch_size: int | None = None,
        distributed: bool = False,
        distributed_timeout: float | None = None,
        checkpoint=None,
        checkpoint_every: int = 100,
        size_factors: str | None = None,
    ):
        self.n_components = n_components
        self.mode = mode
        self.training_mode = training_mode
        self.backend = backend
        self.device = device
        self.E = E
        self.max_iter = max_iter
        self.tol = tol
        self.learning_rate = learning_rate
        self.ngd_lr = ngd_lr
        self.loadings_update = loadings_update
        self.init = init
        self.init_var = init_var
        self.prior_scale = prior_scale
        self.random_state = random_state
        self.verbose = verbose
        self.dtype = dtype
        self.batch_size = batch_size
        self.distributed = distributed
        self.distributed_timeout = distributed_timeout
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.size_factors = size_factors

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        # transform returns ``dtype`` whatever the input's (float64 only when dtype='float64')
        tags.transformer_tags.preserves_dtype = [self.dtype]
        return tags

    @property
    def empty_components_(self) -> np.ndarray:
        """Indices of the components the fit left empty: loadings summing to under 1e-6 of the
        largest component's (an empty component adds nothing to the rate, and its factors
        keep their prior)."""
        check_is_fitted(self, "loadings_")
        return np.flatnonzero(programs.empty_components(self.loadings_))

    @property
    def _n_features_out(self) -> int:
        """Columns of ``transform``'s output (named pnmf0, pnmf1, ... by ``get_feature_names_out``)."""
        return self.components_.shape[0]

    @property
    def _samples(self) -> int:
        """E, or its default for the training mode."""
        if self.E is not None:
            return self.E
        return NATURAL_SAMPLES if self.training_mode == "natural" else STANDARD_SAMPLES

    # -- validation -------------------------------------------------------------------
    def _validate_params(self) -> None:
        _number("n_components", self.n_components, integer=True, low=1)
        _one_of("mode", self.mode, MODES)
        _one_of("training_mode", self.training_mode, TRAINING_MODES)
        _one_of("backend", self.backend, ("auto", *BACKENDS))
        _number("E", self.E, integer=True, low=1, allow_none=True)
        _number("max_iter", self.max_iter, integer=True, low=0)
        _number("tol", self.tol, low=0)
        _number("learning_rate", self.learning_rate, low=0, low_open=True)
        _number("ngd_lr", self.ngd_lr, low=0, low_open=True, high=1, allow_none=True)
        _one_of("loadings_update", self.loadings_update, (None, *LOADINGS_UPDATES))
        _one_of("init", self.init, INITS)
        _number("init_var", self.init_var, low=0, low_open=True)
        if isinstance(self.prior_scale, str):
            _one_of("prior_scale", self.prior_scale, ("auto",))
        else:
            _number("prior_scale", self.prior_scale, low=0, low_open=True)
        _one_of("dtype", self.dtype, ("float32", "float64"))
        _number("batch_size", self.batch_size, integer=True, low=1, allow_none=True)
        _one_of("distributed", self.distributed, (False, True))
        _number("distributed_timeout", self.distributed_timeout, low=0, low_open=True, allow_none=True)
        _number("checkpoint_every", self.checkpoint_every, integer=True, low=1)
        if not (self.size_factors is None or isinstance(self.size_factors, str)):
            raise TypeError("size_factors must be None or 'total'; per-row size factors go to fit(X, size_factors=...)")
        _one_of("size_factors", self.size_factors, SIZE_FACTORS)
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, Path)):
            raise TypeError(f"checkpoint={self.checkpoint!r} must be a file path (str or pathlib.Path) or None")
        if self.checkpoint is not None and not Path(self.checkpoint).absolute().parent.is_dir():
            # found before the fit, not at its first checkpoint
            raise ValueError(f"checkpoint={str(self.checkpoint)!r}: its folder does not exist")
        if self.distributed and self.init != "random":
            raise ValueError(
                f"init={self.init!r} needs every row in one process; use init='random' with distributed=True"
            )
        if self.batch_size is not None and (self.training_mode, self.loadings_update) not in (
            ("natural", None),
            ("natural", "multiplicative"),
        ):
            raise ValueError(
                f"batch_size={self.batch_size!r} needs training_mode='natural' with the multiplicative loadings "
                f"update; got training_mode={self.training_mode!r}, loadings_update={self.loadings_update!r}"
            )

    def _validate_data(self, X, reset: bool, check_counts: bool | None = None):
        """X checked and converted as the fit needs it; ``check_counts`` (default: ``reset``,
        a fit) warns when its values are not counts."""
        refuse_containers(X)
        try:
            X = validate_data(
                self,
                X,
                reset=reset,
                accept_sparse=("csr", "csc", "coo"),
                dtype=(np.float64, np.float32),
                ensure_min_features=1,
                ensure_min_samples=1,
            )
        except ValueError as err:  # scikit-learn's own words on NaN point to other estimators
            if str(err).startswith("Input X contains"):
                what = "NaN" if "NaN" in str(err) else "infinite values"
                raise ValueError(
                    f"X contains {what}: counts must be finite (drop or fill missing values first)"
                ) from err
            raise
        if sp.issparse(X):
            X = canonical_csr(X)  # SciPy's first sum would tidy the caller's matrix in place
        check_non_negative(X, f"{type(self).__name__} (counts must be non-negative)")
        # A fit of no counts has no programs to find (every loading goes to 0): most likely
        # the wrong matrix. A process of a distributed fit may hold rows without counts.
        if reset and not self.distributed and not np.any(X.data if sp.issparse(X) else X):
            raise ValueError("X has no non-zero counts: there is nothing to factorise (are these the counts?)")
        if reset if check_counts is None else check_counts:
            warn_if_not_counts(X.data if sp.issparse(X) else X)
        return X

    # -- fitting ------------------------------------------------------------------------
    def _trainer(
        self,
        counts,
        training_mode: str,
        mode: str,
        fit_loadings: bool,
        fit_batches: bool = False,
        prior=None,
        fit_prior: bool = True,
    ):
        """A trainer; ``prior`` is a fixed prior scale (a number or a per-component array on the
        backend), by default ``prior_scale`` (1, the start, where it is 'auto' and fitted);
        with ``fit_prior=False`` a prior scale 'auto' stays where the state holds it."""
        rule = self.loadings_update or ("adam" if training_mode == "standard" else "multiplicative")
        if prior is None:
            prior = 1.0 if self.prior_scale == "auto" else float(self.prior_scale)
        common = dict(
            mode=mode,
            n_samples=self._samples,
            prior_scale=prior,
            learning_rate=self.learning_rate,
            loadings_update=rule,
            update_loadings=fit_loadings,
            update_batches=fit_batches,
            update_prior=fit_prior,
        )
        if training_mode == "standard":
            return StandardTrainer(counts, **common)
        return NaturalTrainer(counts, ngd_lr=self.ngd_lr if mode == self.mode else None, **common)

    def _phases(self, counts, fit_batches: bool) -> list[Phase]:
        """The phases of ``fit``: natural Monte Carlo fits start from a lower-bound natural fit,
        and a fitted prior scale ('auto') is held at 1 until the fit has first settled."""
        auto = self.prior_scale == "auto"
        sampled = self.mode != "lower-bound"

        def trainer(fit_prior: bool = True):
            made = self._trainer(counts, self.training_mode, self.mode, True, fit_batches, fit_prior=fit_prior)
            # Monte Carlo: the parameters are averaged over the phase's last iterates, and the
            # stopping rule reads their ELBO under fixed noise (loop.has_settled).
            return Averaged(made, AVERAGE_ETA) if sampled and AVERAGE_ETA is not None else made

        def phase(made, tol: float) -> Phase:
            return Phase(made, tol, noisy=True, tail=TAIL_STANDARD) if sampled else Phase.of_mode(made, self.mode, tol)

        if sampled and self.training_mode == "natural":
            warmup = self._trainer(counts, "natural", "lower-bound", True, fit_batches, fit_prior=not auto)
            return [
                Phase.of_mode(warmup, "lower-bound", max(self.tol, WARMUP_TOL)),
                Phase(trainer(), self.tol, noisy=True),
            ]
        main = phase(trainer(), self.tol)
        return [phase(trainer(fit_prior=False), max(self.tol, WARMUP_TOL)), main] if auto else [main]

    def _prior_on(self, b):
        """The fitted prior scale for inference: a number, or per component on backend b ('auto')."""
        return b.asarray(self.prior_scale_) if self.prior_scale == "auto" else float(self.prior_scale)

    def _final_elbo(self, counts, mu, var, w, extra: dict, seed: int) -> float:
        b = counts.backend
        terms = evaluate(
            counts,
            mu,
            var,
            w,
            extra.get("g"),
            mode=self.mode,
            # Independent draws with the control variate: for the value alone they are less
            # noisy than antithetic pairs (whose gain is in the gradients).
            noise=Noise(b, b.key(seed), antithetic=False),
            n_samples=max(self._samples, FINAL_SAMPLES),
            chunk=self._samples,  # the chunks of the fit's steps: their scratch memory is reused
            prior_scale=extra["prior"] if "prior" in extra else self._prior_on(b),
            gradients=False,
            control_variate=True,
        )
        return float(b.to_numpy(terms.value))

    def fit(self, X, y=None, *, size_factors=None, batch=None):
        """Fit the model to counts X (n_samples, n_features), dense or scipy.sparse.

        ``size_factors`` (n_samples,) > 0 put a size factor in each row's rate (overriding
        the ``size_factors`` parameter); ``batch`` (n_samples,) labels (strings or integers)
        fit a batch effect per batch and feature (``batch_effects_``). With
        ``distributed=True``, X, ``size_factors`` and ``batch`` are this process's block of rows.

        Non-integer values (normalised data where counts belong) draw a ``UserWarning``; for
        intensities that are not counts by design, ``warnings.filterwarnings("ignore",
        "X holds non-integer values")`` silences it.
        """
        self._fit(X, size_factors, batch)
        return self

    def fit_transform(self, X, y=None, *, size_factors=None, batch=None):
        """Fit to X and return ``transform(X)``, the factors E_q[exp F] of its rows.

        The training posterior itself is in ``mean_`` and ``var_``; ``fit_transform`` and
        ``fit(X).transform(X)`` give the same factors, as scikit-learn expects.
        """
        self.fit(X, size_factors=size_factors, batch=batch)
        if on_disk(X):  # the fit's last pass inferred q(F) of every row, a batch at a time
            return _expected_exp(self.mean_, self.var_)
        mean, var, _, _ = self._infer(X, size_factors, batch, check_counts=False)  # fit has checked X
        return _expected_exp(mean, var)

    def _fit(self, X, size_factors=None, batch=None) -> None:
        self._validate_params()
        if on_disk(X):
            X = X if isinstance(X, DiskRows) else DiskRows(X)
            if self.batch_size is None:
                raise ValueError(
                    "counts on disk (a backed AnnData's X, an h5py or zarr dataset) are read a batch of rows at a "
                    "time: set batch_size=, or read them into memory first"
                )
            self.n_features_in_ = X.shape[1]
            first = X[0 : min(X.shape[0], X.block_rows, COUNTS_CHECKED_ON_DISK)]
            warn_if_not_counts(first.data if sp.issparse(first) else first)
            if self.batch_size >= X.shape[0]:
                X = X[0 : X.shape[0]]
        else:
            X = self._validate_data(X, reset=True)
        sparse = X.sparse if isinstance(X, DiskRows) else sp.issparse(X)
        b = get_backend(self.backend, self.device, self.dtype, sparse=sparse)
        group = distributed.join(b.name, self.distributed_timeout, b.device) if self.distributed else None
        effects, xb = self._fit_effects(X, size_factors, batch, group)
        with b.threads(self._thread_limit(X)):
            self._fit_on(b, X, group, effects, xb)
        self._warn_if_empty(group)

    def _warn_if_empty(self, group=None) -> None:
        """Warn (from one process of a distributed fit) when the fit left components empty."""
        empty = self.empty_components_
        if empty.size and distributed.speaks(group):
            warnings.warn(
                f"the fit left {empty.size} of {self.n_components} components empty ({programs.empty_note(empty)}): "
                "an empty component's loadings are zero, so it adds nothing to the rate and its factors keep their "
                "prior; the data are fitted with fewer components than n_components: fit fewer "
                "(pnmf.select_n_components), or leave these out (empty_components_)",
                programs.EmptyComponentsWarning,
                stacklevel=loop.user_stacklevel(),
            )

    def _fit_effects(self, X, size_factors, batch, group) -> tuple[RowEffects | None, np.ndarray | None]:
        """The size factors and batches of the training rows, checked before any work.

        Sets ``size_factors_``, ``reference_total_`` and ``batches_``; returns the rows'
        :class:`RowEffects` (None for the plain model) and the batch sums X_b of all rows.
        """
        n = X.shape[0]
        self.size_factors_ = self.reference_total_ = self.batches_ = self.batch_effects_ = None
        if size_factors is not None:
            self.size_factors_ = check_size_factors(size_factors, n)
        labels = None if batch is None else check_batch(batch, n)
        if self.size_factors_ is None and self.size_factors is None and labels is None:
            return None, None
        if self.size_factors_ is None and self.size_factors == "total":
            totals = row_totals(X)
            grand = np.array([totals.sum(), n], dtype=np.float64)
            grand = grand if group is None else group.all_sum_host(grand)
            self.reference_total_ = float(grand[0] / grand[1])
            self.size_factors_ = total_size_factors(totals, self.reference_total_)
        s = np.ones(n) if self.size_factors_ is None else self.size_factors_
        if labels is None:
            return RowEffects(s, np.zeros(n, dtype=np.int64), np.ones((1, X.shape[1]))), None
        self.batches_ = union_labels(labels, group)
        codes = np.searchsorted(self.batches_, labels)
        xb = batch_sums(X, codes, len(self.batches_))
        xb = xb if group is None else group.all_sum_host(xb.ravel()).reshape(xb.shape)
        empty = np.flatnonzero(xb.sum(axis=1) <= 0)
        if empty.size:
            raise ValueError(f"batch {_label(self.batches_[empty[0]])} has no counts at all: drop its rows")
        return RowEffects(s, codes, np.ones(xb.shape), free=np.ones(len(self.batches_), dtype=bool)), xb

    def _thread_limit(self, X) -> int | None:
        """1 for small problems (see SMALL_WORK), else None: the frameworks' own choice."""
        if isinstance(X, DiskRows):
            return None
        entries = X.nnz if sp.issparse(X) else X.size
        samples = 1 if self.mode == "lower-bound" else self._samples
        return 1 if entries * samples <= SMALL_WORK else None

    def _checkpoint(self, X, group, effects: RowEffects | None = None) -> io.Checkpoint | None:
        if self.checkpoint is None:
            return None
        # What may change between a run and its resumption: how long it runs and what it shows.
        free = ("max_iter", "tol", "verbose", "checkpoint", "checkpoint_every", "distributed_timeout")
        params = {k: v for k, v in self.get_params().items() if k not in free}
        fingerprint = {
            "params": json.loads(json.dumps(params, default=repr)),
            "data": io.data_fingerprint(X),
            "process": [0, 1] if group is None else [group.rank, group.size],
        }
        if effects is not None:  # the rows' size factors and batches are data too
            fingerprint["rows"] = io.data_fingerprint(np.column_stack([effects.s, effects.codes]))
            fingerprint["batches"] = None if self.batches_ is None else [str(v) for v in self.batches_]
        return io.Checkpoint(self.checkpoint, self.checkpoint_every, fingerprint, group)

    def _fit_restarts(self, X, seeds, batch=None) -> list[PNMF]:
        """Fits of X (with ``batch`` labels, as ``fit``'s) from each of ``seeds``, sharing one
        checked copy of X on the device (consensus)."""
        self._validate_params()
        if self.distributed:
            raise ValueError("restarts (pnmf.consensus) run in one process; distributed=True is not supported there")
        X = self._validate_data(X, reset=True)
        b = get_backend(self.backend, self.device, self.dtype, sparse=sp.issparse(X))
        effects, xb = self._fit_effects(X, None, batch, None)
        fitted = {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}
        fits = []
        with b.threads(self._thread_limit(X)), b.scope():
            counts = as_counts(b, X, None, None if effects is None else effects.scaling(b, X, xb))
            lanes = lanes_per_step(self, X, b)
            for first in range(0, len(seeds), lanes):
                group = [clone(self).set_params(random_state=int(seed)) for seed in seeds[first : first + lanes]]
                for fit in group:
                    vars(fit).update(fitted)
                if len(group) == 1:
                    group[0]._fit_on(b, X, None, effects, xb, counts)
                else:
                    self._fit_lanes(b, X, counts, group)
                fits.extend(group)
        return fits

    def _fit_lanes(self, b, X: np.ndarray, counts, fits: list[PNMF]) -> None:
        """Fit ``fits`` (this model's clones with their own seeds) together, as lanes of one
        step (:mod:`pnmf.restarts`): each ends as its own ``fit`` would."""
        starts = []
        for fit in fits:
            rng = check_random_state(fit.random_state)
            h, w = initialize(X, self.n_components, self.init, rng)
            starts.append((np.log(h) - 0.5 * self.init_var, w))
        mu = np.stack([mu for mu, _ in starts])
        trainer = LaneTrainer(counts, lanes=len(fits), prior_scale=float(self.prior_scale), ngd_lr=self.ngd_lr)
        result = loop.run(
            b,
            [Phase.of_mode(trainer, "lower-bound", self.tol)],
            b.asarray(mu),
            b.asarray(np.full(mu.shape, self.init_var)),
            b.asarray(np.stack([w for _, w in starts])),
            seed=0,  # the lower-bound steps draw no noise
            max_iter=self.max_iter,
            progress=loop.progress_bar(self.verbose, self.max_iter, f"PNMF fits ({len(fits)} restarts together)"),
        )
        for lane, fit in enumerate(fits):
            fit._set_posterior(counts, result.mu[lane], result.var[lane], result.w[lane], {}, seed=0)
            fit.batch_effects_ = None
            fit._set_run(b, result.history[: result.stops[lane], lane], result.converged[lane])

    def _fit_on(self, b, X, group, effects: RowEffects | None, xb: np.ndarray | None, counts=None) -> None:
        """Fit to X on backend b; ``counts``: X already on the device (restarts share it)."""
        rng = distributed.shared_random_state(self.random_state, group)
        # Distributed, every process takes the mini-batch path: some may hold fewer rows than a batch.
        minibatch = self.batch_size is not None and (group is not None or self.batch_size < X.shape[0])
        # Mini-batch fits keep no q(F) of the rows between steps: only W is drawn here.
        h, w = initialize(X, self.n_components, self.init, rng, group, keep_rows=not minibatch)
        if effects is not None:  # the size factors' scale belongs to s, not to the start of W
            s_sum = np.array([effects.s.sum(), len(effects.s)])
            s_sum = s_sum if group is None else group.all_sum_host(s_sum)
            w = w * (s_sum[1] / s_sum[0])
        seed = int(rng.randint(np.iinfo(np.int32).max))
        show = self.verbose and distributed.speaks(group)
        g = None
        if minibatch:
            host = get_backend("numpy", dtype="float64")
            trainer = MinibatchTrainer(X, b, self, seed, effects, group, xb)
            result = loop.run(
                host,
                [Phase(trainer, self.tol, noisy=True, tail=SVI_TAIL)],  # stops on trainer.monitor
                None,
                None,
                w,
                self._start_extra(np.asarray, effects),
                seed=seed,
                max_iter=self.max_iter,
                progress=loop.progress_bar(show, self.max_iter, "PNMF fit (mini-batch)"),
                checkpoint=self._checkpoint(X, group, effects),
            )
            self.loadings_ = np.asarray(result.w, dtype=np.float64)
            g = result.extra.get("g")
            self._set_prior(result.extra.get("prior"))
            if self.batches_ is not None:
                g, self.loadings_ = normalise(g, self.loadings_, xb)
            del trainer  # and its monitor batch of counts, before the pass over every row
            release_freed_memory()
            self.mean_, self.var_, self.elbo_ = self._infer_rows(
                X, b, None if effects is None else RowEffects(effects.s, effects.codes, g), group
            )
        else:
            # Each rank draws its own Monte Carlo noise; rank 0 (or a single process) uses seed.
            noise_seed = seed if group is None else (seed + 1_000_003 * group.rank) % np.iinfo(np.int32).max
            with b.scope():
                if counts is None:
                    counts = as_counts(b, X, group, None if effects is None else effects.scaling(b, X, xb))
                result = loop.run(
                    b,
                    self._phases(counts, fit_batches=self.batches_ is not None),
                    b.asarray(np.log(h) - 0.5 * self.init_var),
                    b.asarray(np.full(h.shape, self.init_var)),
                    b.asarray(w),
                    self._start_extra(b.asarray, effects),
                    seed=noise_seed,
                    max_iter=self.max_iter,
                    progress=loop.progress_bar(show, self.max_iter, "PNMF fit"),
                    checkpoint=self._checkpoint(X, group, effects),
                )
                g = self._set_posterior(counts, result.mu, result.var, result.w, result.extra, noise_seed)
            if self.batches_ is not None:
                g, self.loadings_ = normalise(g, self.loadings_, xb)
        self.batch_effects_ = g if self.batches_ is not None else None
        self._set_run(b, result.history, result.converged, group)

    def _set_posterior(self, counts, mu, var, w, extra: dict, seed: int) -> np.ndarray | None:
        """``elbo_``, ``mean_``, ``var_``, ``loadings_`` and ``prior_scale_`` from a run's
        parameters on the device; returns the fitted batch effects g (None without them)."""
        b = counts.backend
        self.elbo_ = self._final_elbo(counts, mu, var, w, extra, seed)
        self._warn_if_rounded(counts)
        # copies: restarts fitted together hand each fit a view of their stacked arrays
        self.mean_, self.var_ = (np.array(b.to_numpy(a), dtype=self.dtype) for a in (mu, var))
        self.loadings_ = b.to_numpy(w).astype(np.float64)
        fitted = {k: b.to_numpy(v).astype(np.float64) for k, v in extra.items()}
        self._set_prior(fitted.get("prior"))
        return fitted.get("g")

    def _warn_if_rounded(self, counts) -> None:
        """Warn where float rounding of the ELBO, about eps * sum X (the size of its rate sum),
        is over a quarter of the change ``tol`` stops at: large counts in float32.

        Measured on counts ~Poisson(c * H @ W.T) of 500 x 300 and 2,000 x 500: at c = 1,000 the
        share is 0.34-0.36 and the float32 fit's deviance 5-7% above float64's, at c = 3,000
        0.92-0.94 and 12-23%; at c = 300 0.12 and within 0.4%.
        """
        if self.tol <= 0:
            return
        total = np.array([counts.total])
        total = total if counts.group is None else counts.group.all_sum_host(total)
        rounding = float(np.finfo(counts.backend.dtype).eps * total[0])
        if rounding > ROUNDED_SHARE * self.tol * abs(self.elbo_) and distributed.speaks(counts.group):
            warnings.warn(
                f"{np.dtype(counts.backend.dtype).name} rounds the ELBO of counts this large (sum {total[0]:.3g}) "
                f"by about {rounding:.2g}, over a quarter of the change tol={self.tol} stops at, so the fit may stop "
                "short of its optimum; fit with dtype='float64' (NumPy, torch on a CPU or CUDA, MLX on its CPU)",
                ConvergenceWarning,
                stacklevel=loop.user_stacklevel(),
            )

    def _set_run(self, b, history: np.ndarray, converged: bool, group=None) -> None:
        """The attributes every fit sets from its loadings and its run; warns at max_iter
        (once: in a distributed fit, where every process stops alike, from rank 0 alone)."""
        self.components_ = self.loadings_.T
        self.elbo_history_ = history
        self.n_iter_ = len(history)
        self.converged_ = bool(converged)
        self.backend_, self.device_ = b.name, b.device
        if not self.converged_ and self.n_iter_ == self.max_iter and self.tol > 0 and distributed.speaks(group):
            warnings.warn(
                f"PNMF stopped at max_iter={self.max_iter} before the ELBO settled to tol={self.tol}; "
                "raise max_iter (or tol) for a converged fit",
                ConvergenceWarning,
                stacklevel=loop.user_stacklevel(),
            )

    def _start_extra(self, asarray, effects: RowEffects | None) -> dict:
        """The starting batch effects (ones) and per-component prior scale (1, 'auto') of a fit."""
        extra = {} if effects is None else {"g": asarray(effects.g)}
        if self.prior_scale == "auto":
            extra["prior"] = asarray(np.ones(self.n_components))
        return extra

    def _set_prior(self, fitted: np.ndarray | None) -> None:
        """``prior_scale_``: the fitted per-component prior scale, or the fixed one repeated."""
        if fitted is None:
            self.prior_scale_ = np.full(self.n_components, float(self.prior_scale))
        else:
            self.prior_scale_ = np.asarray(fitted, dtype=np.float64)

    def _local_posterior(
        self, b, x, effects: RowEffects | None, loadings, seed: int, max_iter=None, desc: str = "", prior=None
    ):
        """q(F) of the rows of x by natural lower-bound steps with the loadings fixed, started
        from the rows' totals (:meth:`_row_start`); with ``effects``, their size factors and
        batches, the g of ``effects.free`` batches fitted alongside. ``prior``: the prior
        scale (default: the fitted one).

        Call inside ``b.scope()``; returns the counts, mu, var, W and the extra parameters
        (:func:`pnmf.loop.run`'s; the prior scale among them) on the device.
        """
        # The loadings stay fixed: X.T's structure waits for a product that needs it (a mini-batch step's last).
        counts = as_counts(b, x, scaling=None if effects is None else effects.scaling(b, x), loadings=False)
        w = b.asarray(loadings)
        fit_batches = effects is not None and effects.free is not None
        prior = self._prior_on(b) if prior is None else prior
        prior = b.asarray(prior) if isinstance(prior, np.ndarray) else prior
        trainer = self._trainer(counts, "natural", "lower-bound", False, fit_batches, prior=prior)
        budget = self.max_iter if max_iter is None else max_iter
        mean, var = self._row_start(x, loadings, effects)
        result = loop.run(
            b,
            [Phase.of_mode(trainer, "lower-bound", self.tol)],
            b.asarray(mean),
            b.asarray(var),
            w,
            None if effects is None else {"g": b.asarray(effects.g)},
            seed=seed,
            max_iter=budget,
            progress=loop.progress_bar(self.verbose and max_iter is None, budget, desc),
        )
        return counts, result.mu, result.var, w, dict(result.extra, prior=prior)

    def _row_start(self, x, loadings: np.ndarray, effects: RowEffects | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A start for q(F) of the rows of x with the loadings fixed: every component at the
        level that matches the row's total count, variance ``init_var``."""
        row_sums = row_totals(x)
        per_unit = float(loadings.sum()) if effects is None else effects.row_scale(loadings)
        level = np.maximum(row_sums / np.maximum(per_unit, 1e-30), 1e-8)
        mu0 = np.repeat(np.log(level)[:, None], loadings.shape[1], axis=1) - 0.5 * self.init_var
        mu0 = np.clip(mu0, -MEAN_BOUND, MEAN_BOUND)
        return mu0, np.full(mu0.shape, self.init_var)

    def _per_row(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two empty (n, n_components) arrays for the q(F) of n rows, in ``dtype`` (results
        that grow with the rows are kept in the precision they were computed in)."""
        return np.empty((n, self.n_components), dtype=self.dtype), np.empty((n, self.n_components), dtype=self.dtype)

    def _infer_rows(self, X, b, effects: RowEffects | None, group=None):
        """q(F) of every row with the loadings fixed, a batch of rows at a time (each read
        only when its turn comes); and the full-data ELBO (of every process's rows)."""
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        (mean, var), elbo = self._per_row(X.shape[0]), 0.0
        show = self.verbose and distributed.speaks(group)
        progress = loop.progress_bar(show, X.shape[0], "PNMF factors of every row", unit="row")
        for start in range(0, X.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            elbo += self._infer_block(X, rows, b, effects, seed, mean, var)
            progress.update(len(mean[rows]), elbo)
        progress.close()
        release_freed_memory()  # the last batch's buffers, before the caller's factors of every row
        return mean, var, elbo if group is None else float(group.all_sum_host(np.array([elbo]))[0])

    def _infer_block(self, X, rows: slice, b, effects: RowEffects | None, seed: int, mean, var) -> float:
        """q(F) of X's rows ``rows`` written into ``mean[rows]`` and ``var[rows]``; their ELBO.
        A call of its own, so that a block's counts and buffers are gone before the next is read."""
        with b.scope():
            counts, mu, local_var, w_device, extra = self._local_posterior(
                b, X[rows], None if effects is None else effects.take(rows), self.loadings_, seed, self.max_iter
            )
            mean[rows], var[rows] = b.to_numpy(mu), b.to_numpy(local_var)
            return self._final_elbo(counts, mu, local_var, w_device, extra, seed)

    # -- inference with the loadings fixed ------------------------------------------------
    def _check_batches(self, given: bool, argument: str = "batch=", what: str = "") -> None:
        """ValueError unless batches are given exactly when the model was fitted with them;
        ``argument`` names what gives them (``batch=``, or a front end's own name for it),
        ``what`` says what it is."""
        batches = getattr(self, "batches_", None)
        if not given and batches is not None:
            raise ValueError(
                f"this model was fitted with batches ({len(batches)}: {_preview(batches)}); pass {argument}"
                f"{what} (labels seen in fit use their batch effects, new labels get theirs estimated)"
            )
        if given and batches is None:
            raise ValueError(f"{argument} was given but this model was fitted without batches")

    def _effects(self, X, size_factors, batch) -> tuple[RowEffects | None, np.ndarray | None]:
        """The size factors and batches of new rows, and the labels of their g's rows (the
        batches seen in fit, then those unseen, whose g is free).

        A model fitted with batches needs ``batch``; one fitted with size factors given to
        ``fit`` needs ``size_factors`` (with ``size_factors='total'`` they come from the
        rows' totals over ``reference_total_``).
        """
        n = X.shape[0]
        fitted_s = getattr(self, "size_factors_", None) is not None
        self._check_batches(batch is not None)
        batches = getattr(self, "batches_", None)
        if size_factors is not None:
            s = check_size_factors(size_factors, n)
        elif self.size_factors == "total" and fitted_s:
            s = total_size_factors(row_totals(X), self.reference_total_)
        elif fitted_s:
            raise ValueError("this model was fitted with size factors given to fit; pass size_factors= for new rows")
        else:
            s = None
        if s is None and batches is None:
            return None, None
        s = np.ones(n) if s is None else s
        if batches is None:
            return RowEffects(s, np.zeros(n, dtype=np.int64), np.ones((1, self.n_features_in_))), None
        labels = check_batch(batch, n)
        unseen = self._unseen_batches(labels)
        every = np.concatenate([batches, unseen]) if unseen.size else batches
        order = np.argsort(every, kind="stable")
        codes = order[np.searchsorted(every[order], labels)]
        g = np.vstack([self.batch_effects_, np.ones((unseen.size, self.n_features_in_))])
        free = np.arange(len(every)) >= len(batches)
        new_totals = batch_sums(X, codes, len(every))[len(batches) :].sum(axis=1)
        if np.any(new_totals <= 0):
            raise ValueError(
                f"new batch {_label(unseen[np.argmax(new_totals <= 0)])} has no counts at all: its batch effects "
                "cannot be estimated"
            )
        return RowEffects(s, codes, g, free if unseen.size else None), every

    def _infer(self, X, size_factors=None, batch=None, quiet: bool = False, check_counts: bool = True):
        """q(F) of new rows with the loadings fixed, and the ELBO (of ``mode``) there.

        The inference takes natural steps on the lower-bound ELBO: deterministic, and each
        row's q(F) depends on that row alone (and, for a batch unseen in fit, on the other
        rows of that batch), so transforming a subset of rows gives the same factors as
        transforming them among others. ``quiet``: no progress bar (the caller shows one);
        ``check_counts``: warn when X's values are not counts (the rows a fit has checked
        need not be checked again).
        """
        check_is_fitted(self, "loadings_")
        if on_disk(X):
            return self._infer_on_disk(X, size_factors, batch, check_counts)
        X = self._validate_data(X, reset=False, check_counts=check_counts)
        effects, labels = self._effects(X, size_factors, batch)
        b = get_backend(self.backend_, self.device_, self.dtype)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        with b.scope(), b.threads(self._thread_limit(X)):
            counts, mu, var, w, extra = self._local_posterior(
                b, X, effects, self.loadings_, seed, self.max_iter if quiet else None, desc="PNMF transform"
            )
            elbo = self._final_elbo(counts, mu, var, w, extra, seed)
            g = None if labels is None else b.to_numpy(extra["g"]).astype(np.float64)
            mean, var = (np.asarray(b.to_numpy(a), dtype=self.dtype) for a in (mu, var))
            return mean, var, elbo, (labels, g)

    def _infer_on_disk(self, X, size_factors, batch, check_counts: bool):
        """:meth:`_infer` of counts on disk, a block of rows at a time (``batch_size`` rows,
        or the reader's block), each block read only when its turn comes; the first block's
        values checked for counts, as a fit checks them."""
        X = X if isinstance(X, DiskRows) else DiskRows(X)
        n = X.shape[0]
        size_factors = None if size_factors is None else check_size_factors(size_factors, n)
        batch = None if batch is None else check_batch(batch, n)
        if batch is not None and getattr(self, "batches_", None) is not None:
            unseen = self._unseen_batches(batch)
            if unseen.size:
                raise ValueError(
                    f"batch {_label(unseen[0])} was not seen in fit, and a new batch's effects are estimated from all "
                    "its rows at once: read the counts on disk into memory to map new batches"
                )
        step = self.batch_size or X.block_rows
        (mean, var), elbo, batches = self._per_row(n), 0.0, None
        progress = loop.progress_bar(self.verbose, n, "PNMF transform (rows on disk)", unit="row")
        for start in range(0, n, step):
            rows = slice(start, start + step)
            mean[rows], var[rows], block_elbo, block_batches = self._infer(
                X[rows],
                None if size_factors is None else size_factors[rows],
                None if batch is None else batch[rows],
                quiet=True,
                check_counts=check_counts and start == 0,
            )
            elbo += block_elbo
            batches = block_batches if batches is None else batches
            progress.update(len(mean[rows]), elbo)
        progress.close()
        release_freed_memory()
        return mean, var, elbo, batches

    def _unseen_batches(self, batch) -> np.ndarray:
        """The labels in ``batch`` that were not seen in fit, sorted (their batch effects
        are estimated by ``transform`` and ``map_batches``)."""
        return np.setdiff1d(np.unique(np.asarray(batch)), self.batches_)

    def transform(self, X, *, size_factors=None, batch=None):
        """Factors H = E_q[exp F] (n_samples, n_components) of rows of X, loadings fixed.

        q(F) of each row is inferred by natural steps on the lower-bound ELBO (up to
        ``max_iter``, stopping at ``tol``), starting from the level of the row's total count.

        ``size_factors`` (n_samples,) are the rows' size factors (by default those of the
        ``size_factors`` strategy). On a model fitted with batches, ``batch`` (n_samples,)
        is required: labels seen in fit use their batch effects; the batch effects of new
        labels are estimated from X with the loadings fixed, alternating with q(F) (mapping
        a new dataset onto the fitted programs).

        Counts on disk (a backed AnnData's X, an h5py or zarr dataset) are read and
        transformed a block of rows at a time (``batch_size`` rows, else 10,000); their
        batches must have been seen in fit.
        """
        mean, var, _, _ = self._infer(X, size_factors, batch)
        return _expected_exp(mean, var)

    def posterior(self, X, *, size_factors=None, batch=None, method: str = "variational"):
        """Mean and variance (each (n_samples, n_components)) of the log-factors F of rows of X, loadings fixed.

        ``method="variational"``: q(F[n, l]) = Normal(mean[n, l], var[n, l]), row n's
        variational posterior, inferred as :meth:`transform` infers it (which returns
        E_q[exp F] = exp(mean + var/2)); for the training rows the fit's are ``mean_`` and
        ``var_``. Its variances come from the lower-bound ELBO, whose log term is linear in
        F: they miss what components that share a feature's counts leave uncertain, and are
        too small for intervals (with the planted loadings of ``make_counts``, 95% intervals
        held 59-71% of the planted log-factors).

        ``method="laplace"``: the same means, and the Laplace variances there: the diagonal
        of the inverse of the negative Hessian of the exact log joint log p(x, F | W) in F,
        row by row (:mod:`pnmf.laplace`), which keeps the components' correlations within a
        row. Their 95% intervals held 94.5-95.6% of the planted log-factors there (with
        fitted loadings, 85-92%: the loadings' own uncertainty is not in them). Rows where
        the log joint is not concave at the mean keep q's variance, with a warning.

        The factor H[n, l] = exp(F[n, l]) is then log-normal: its 95% credible interval is
        exp(mean +- 1.96 sqrt(var)), its median exp(mean), its variance (exp(var) - 1)
        exp(2 mean + var). Rows with fewer counts have wider intervals. Other arguments as
        for :meth:`transform`; see docs/model.md, "How wide are the intervals".
        """
        if method not in ("variational", "laplace"):
            raise ValueError(f"method={method!r} is not one of 'variational', 'laplace'")
        mean, var, _, (_, g) = self._infer(X, size_factors, batch)
        if method == "laplace":
            var = self._laplace(X, mean, var, size_factors, batch, g)
        return mean, var

    def _laplace(self, X, mean, var, size_factors, batch, g) -> np.ndarray:
        """The Laplace variances at ``mean`` of the rows of X (q's ``var`` where the log joint
        is not concave there), a block of rows at a time for counts on disk."""
        blocks = X if isinstance(X, DiskRows) else DiskRows(X) if on_disk(X) else None
        out = np.empty(mean.shape, dtype=self.dtype)
        failed = 0
        step = None if blocks is None else (self.batch_size or blocks.block_rows)
        for start in range(0, mean.shape[0], step or max(mean.shape[0], 1)):
            rows = slice(start, start + step) if step else slice(None)
            x = self._validate_data(X if blocks is None else blocks[rows], reset=False, check_counts=False)
            effects, _ = self._effects(
                x,
                size_factors if size_factors is None or not step else np.asarray(size_factors)[rows],
                batch if batch is None or not step else np.asarray(batch)[rows],
            )
            if effects is not None and g is not None:
                effects = RowEffects(effects.s, effects.codes, g)
            found, bad = laplace_variance(
                x,
                mean[rows],
                self.loadings_,
                self.prior_scale_,
                *(() if effects is None else (effects.s, effects.codes, effects.g)),
            )
            out[rows] = np.where(np.isnan(found), var[rows], found)
            failed += bad
        if failed:
            warnings.warn(
                f"the log joint is not concave at q's mean in {failed} of {mean.shape[0]} rows: their variance is "
                "q's (method='variational')",
                stacklevel=loop.user_stacklevel(),
            )
        return out

    def map_batches(self, X, *, batch, size_factors=None) -> tuple[np.ndarray, np.ndarray]:
        """The batch effects of the batches of new rows X, as ``transform`` uses them.

        Returns ``(labels, g)``: the labels seen in fit (``batches_``, with their fitted
        ``batch_effects_``) followed by the new labels of ``batch`` in sorted order, and g
        (n_labels, n_features). A new batch's g is its closed-form maximiser of the ELBO of
        X with the loadings fixed, alternating with q(F) of its rows; it shares the fitted
        model's scale (each feature's scale stays with the loadings).
        """
        if getattr(self, "batches_", None) is None:
            check_is_fitted(self, "loadings_")
            raise ValueError("this model was fitted without batches; fit it with batch= to map batches")
        return self._infer(X, size_factors, batch)[3]

    def inverse_transform(self, H, *, size_factors=None, batch=None):
        """Rate ``H @ components_`` (n_samples, n_features): with H from transform, the posterior-mean rate.

        ``size_factors`` (n_samples,) and ``batch`` (n_samples,) labels seen in fit scale it
        to ``s[n] g[batch(n), d] (H @ components_)[n, d]``, the rate of those rows; without
        them it is the rate at s = 1 and g = 1.
        """
        check_is_fitted(self, "loadings_")
        H = np.asarray(H, dtype=np.float64)
        if H.ndim != 2 or H.shape[1] != self.n_components:
            raise ValueError(f"H must have shape (n_samples, {self.n_components}); got {H.shape}")
        if not np.all(np.isfinite(H)) or np.any(H < 0):
            raise ValueError("H must hold finite non-negative factors (as transform returns)")
        rate = H @ self.components_
        if size_factors is not None:
            rate *= check_size_factors(size_factors, len(H))[:, None]
        if batch is not None:
            self._check_batches(given=True)
            labels = check_batch(batch, len(H))
            unseen = self._unseen_batches(labels)
            if unseen.size:
                raise ValueError(f"batch {_label(unseen[0])} was not seen in fit: map it first (map_batches)")
            rate *= self.batch_effects_[np.searchsorted(self.batches_, labels)]
        return rate

    def top_features(self, n: int = 20, feature_names=None):
        """The top ``n`` features of each component, by loading and by specificity (a pandas DataFrame).

        Specificity is feature d's term of KL(phi_l || p), phi[d, l] log(phi[d, l] / p[d]),
        with phi_l = W[:, l] / sum_d W[d, l] the component's distribution over the features
        and p their mean over the components: features that every component uses alike
        (housekeeping genes, stop words) score 0. One row per (component,
        ranking, rank) with columns ``component``, ``ranking`` ('loading' or
        'specificity'), ``rank`` (0 first), ``feature``, ``loading`` and ``specificity``;
        ``table[table.ranking == "specificity"]`` gives the program table. Features are named
        by ``feature_names``, else by the names seen in fit, else by their index.
        """
        check_is_fitted(self, "loadings_")
        return programs.top_features(self, n, feature_names)

    def save(self, path) -> Path:
        """Write the fitted model to a portable ``.npz`` file (arrays plus JSON metadata, no pickle)."""
        check_is_fitted(self, "loadings_")
        return io.save(self, path)

    @classmethod
    def load(cls, path, backend: str | None = None, device: str | None = None) -> PNMF:
        """Read a model written by ``save``, to run on ``backend``/``device`` (default: as saved).

        A model fitted on one backend loads into any other with identical loadings. One
        fitted on a backend or device this machine lacks (a GPU) runs on ``backend='auto'``'s
        choice instead, with a warning. A file that is not a pnmf model, or is damaged,
        raises ValueError.
        """
        return io.load(cls, path, backend=backend, device=device)

    def score(self, X, y=None, *, size_factors=None, batch=None) -> float:
        """ELBO of X under the fitted loadings (q(F) of its rows inferred by ``transform``;
        counts on disk a block of rows at a time, as there)."""
        return self._infer(X, size_factors, batch)[2]


def _expected_exp(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """E_q[exp F] = exp(mean + var / 2), in one new array (rows by the million stay affordable)."""
    out = 0.5 * var
    out += mean
    return np.exp(out, out=out)


def _label(value) -> str:
    """A batch label as the user wrote it, for an error message."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _preview(labels, shown: int = 5) -> str:
    """The first few labels, for an error message."""
    head = ", ".join(_label(v) for v in labels[:shown])
    return head + (", ..." if len(labels) > shown else "")
