"""The PNMF estimator: validation, the fit loop and the fitted attributes."""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data

from . import io
from .backends import BACKENDS, get_backend
from .elbo import MEAN_BOUND, MODES, Noise, as_counts, evaluate
from .init import INITS, initialize
from .natural import NaturalTrainer
from .optim import LOADINGS_UPDATES, StandardTrainer, multiplicative_loadings

TRAINING_MODES = ("standard", "natural")
CHECK_EVERY = 10  # iterations between reads of the ELBO history (each read waits for the device)
WINDOW = {"lower-bound": 10, "expanded": 50, "simple": 50}  # moving-average window of the stopping rule
# Stored counts x Monte Carlo samples per iteration up to which a fit runs on one thread.
# At the seed's size (2e5) a second thread saved 3-10% on an idle 2-core machine and cost up
# to 2x (torch) whenever the other core was busy; from ~1e6 on it saves 15-45%.
SMALL_WORK = 1_000_000
FINAL_SAMPLES = 64  # Monte Carlo samples for the reported ELBO
# The lower-bound warm start of a natural Monte Carlo fit stops at this tolerance: the
# benchmark reached 1e-3 of the best ELBO in ~95 iterations with it, 354 with 1e-5.
WARMUP_TOL = 3e-4
# Mini-batch SVI: local natural steps per batch, and the loadings' Robbins-Monro schedule.
# On 2000 x 60 planted counts, 300 steps of 100 rows ended 0.1% below the full-batch ELBO
# with these; (tau, kappa, steps) = (10, 0.7, 10) ended 2.8% below.
SVI_LOCAL_STEPS = 5
SVI_TAU, SVI_KAPPA = 100.0, 0.6


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of " + ", ".join(repr(a) for a in allowed))


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


class PNMF(TransformerMixin, BaseEstimator):
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
    mode : {'expanded', 'simple', 'lower-bound'}
        How E_q[log rate] is estimated: 'expanded' (Monte Carlo log term, exact expected
        rate), 'simple' (both by Monte Carlo) or 'lower-bound' (deterministic Jensen bound).
    training_mode : {'standard', 'natural'}
        'standard': Adam on the mean, log standard deviation and loadings.
        'natural': natural-gradient steps on q(F) (see ``ngd_lr``); the Monte Carlo modes
        start from a 'lower-bound' natural fit.
    backend : {'auto', 'numpy', 'torch', 'mlx'}
        Array framework. 'auto' takes MLX on an Apple-silicon GPU, torch on CUDA or MPS,
        then on the CPU NumPy for dense counts and torch (if installed) for sparse ones.
    device : str, optional
        Device within the backend: torch 'cpu', 'cuda', 'cuda:1', 'mps'; MLX 'cpu', 'gpu'.
    E : int
        Monte Carlo samples per iteration in the 'simple' and 'expanded' modes, drawn in
        antithetic pairs (eps, -eps): an even E gets the most from them.
    max_iter : int
        Most iterations (every phase of a fit together).
    tol : float
        Stop when the relative change of the mean ELBO over the last window of
        iterations, against the window before, falls below ``tol`` (windows of 10
        iterations in 'lower-bound' mode, 50 in the Monte Carlo modes). In the Monte Carlo
        modes the change must be below ``tol`` by two standard errors of the estimate, so
        noise does not stop a fit by chance; a ``tol`` below the noise floor (about 1e-5
        with E=10 on typical data) runs to ``max_iter``. 0 disables early stopping.
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
    init : {'random', 'nndsvda', 'nndsvd'}
        Initial factors, computed in NumPy so every backend starts from the same point.
        'random' is the default: on the benchmark's data, natural training from it reached
        within 1e-3 of its final ELBO in 90-140 iterations and ended higher, against
        250-480 iterations from the SVD-based starts, whose near-zero entries start
        exp(F) far down the log scale.
    init_var : float
        Initial variance of q(F), the same for both training modes.
    prior_scale : float
        Standard deviation s of the Normal prior on F.
    random_state : int, RandomState or None
        Seeds the initialisation and the Monte Carlo noise.
    verbose : bool
        Show a progress bar with the running ELBO.
    dtype : {'float32', 'float64'}
        Floating dtype of the computation (float64 is not available on MLX GPUs or MPS).
    batch_size : int, optional
        Rows per step for mini-batch stochastic variational inference, for data that do
        not fit in device memory (only the batch is moved to the device). Each step takes
        5 natural lower-bound steps on the batch's local q(F) with W fixed, then moves W
        towards the batch's multiplicative update, W <- (1 - r_t) W + r_t W_batch, with the
        Robbins-Monro schedule r_t = (1 + t/100)^-0.6. The batch sums in that update stand
        for the full-data sums rescaled by N/batch; the factor cancels in its ratio.
        ``elbo_history_`` holds N/batch times each batch's ELBO; after the last step a pass
        over all rows infers their q(F) and ``elbo_`` is the full-data ELBO. ``max_iter``
        counts steps. Needs ``training_mode='natural'`` (multiplicative loadings update).

    Attributes
    ----------
    components_ : ndarray (n_components, n_features)
        W.T, the loadings as rows, as in scikit-learn's NMF.
    loadings_ : ndarray (n_features, n_components)
        W.
    mean_, var_ : ndarray (n_samples, n_components)
        Mean and variance of q(F) for the training rows.
    elbo_ : float
        ELBO at the returned parameters (exact in 'lower-bound' mode, a Monte Carlo
        estimate with 64 samples otherwise).
    elbo_history_ : ndarray (n_iter,)
        ELBO (estimate) at each iteration.
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
        mode: str = "expanded",
        training_mode: str = "standard",
        backend: str = "auto",
        device: str | None = None,
        E: int = 10,
        max_iter: int = 2000,
        tol: float = 1e-4,
        learning_rate: float = 0.05,
        ngd_lr: float | None = None,
        loadings_update: str | None = None,
        init: str = "random",
        init_var: float = 0.01,
        prior_scale: float = 1.0,
        random_state=None,
        verbose: bool = False,
        dtype: str = "float32",
        batch_size: int | None = None,
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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        return tags

    # -- validation -------------------------------------------------------------------
    def _validate_params(self) -> None:
        _number("n_components", self.n_components, integer=True, low=1)
        _one_of("mode", self.mode, MODES)
        _one_of("training_mode", self.training_mode, TRAINING_MODES)
        _one_of("backend", self.backend, ("auto", *BACKENDS))
        _number("E", self.E, integer=True, low=1)
        _number("max_iter", self.max_iter, integer=True, low=0)
        _number("tol", self.tol, low=0)
        _number("learning_rate", self.learning_rate, low=0, low_open=True)
        _number("ngd_lr", self.ngd_lr, low=0, low_open=True, high=1, allow_none=True)
        _one_of("loadings_update", self.loadings_update, (None, *LOADINGS_UPDATES))
        _one_of("init", self.init, INITS)
        _number("init_var", self.init_var, low=0, low_open=True)
        _number("prior_scale", self.prior_scale, low=0, low_open=True)
        _one_of("dtype", self.dtype, ("float32", "float64"))
        _number("batch_size", self.batch_size, integer=True, low=1, allow_none=True)
        if self.batch_size is not None and (self.training_mode, self.loadings_update) not in (
            ("natural", None),
            ("natural", "multiplicative"),
        ):
            raise ValueError(
                f"batch_size={self.batch_size!r} needs training_mode='natural' with the multiplicative loadings "
                f"update; got training_mode={self.training_mode!r}, loadings_update={self.loadings_update!r}"
            )

    def _validate_data(self, X, reset: bool):
        X = validate_data(
            self,
            X,
            reset=reset,
            accept_sparse=("csr", "csc", "coo"),
            dtype=(np.float64, np.float32),
            ensure_min_features=1,
            ensure_min_samples=1,
        )
        check_non_negative(X, f"{type(self).__name__} (counts must be non-negative)")
        return X

    # -- fitting ------------------------------------------------------------------------
    def _trainer(self, counts, training_mode: str, mode: str, fit_loadings: bool):
        rule = self.loadings_update or ("adam" if training_mode == "standard" else "multiplicative")
        common = dict(
            mode=mode,
            n_samples=self.E,
            prior_scale=self.prior_scale,
            learning_rate=self.learning_rate,
            loadings_update=rule,
            update_loadings=fit_loadings,
        )
        if training_mode == "standard":
            return StandardTrainer(counts, **common)
        return NaturalTrainer(counts, ngd_lr=self.ngd_lr if mode == self.mode else None, **common)

    def _phases(self) -> list[tuple[str, str]]:
        """(training mode, ELBO mode) of each phase of ``fit``: natural Monte Carlo fits start from lower-bound."""
        if self.training_mode == "natural" and self.mode != "lower-bound":
            return [("natural", "lower-bound"), ("natural", self.mode)]
        return [(self.training_mode, self.mode)]

    def _optimize(self, counts, mu, var, w, *, phases, fit_loadings: bool, seed: int, desc: str, max_iter=None):
        """Run every phase from (mu, var, W); return them and the history, n_iter, converged."""
        b = counts.backend
        key = b.key(seed)
        history: list[float] = []
        converged = False
        budget = self.max_iter if max_iter is None else max_iter
        progress = _progress(self.verbose and max_iter is None, budget, desc)
        trainer = state = None
        try:
            for index, (phase_training, phase_mode) in enumerate(phases):
                last = index == len(phases) - 1
                trainer = self._trainer(counts, phase_training, phase_mode, fit_loadings)
                state = trainer.init(mu, var, w)
                step = b.compile(trainer.step)
                tol = self.tol if last else max(self.tol, WARMUP_TOL)
                start, pending = len(history), []
                converged = False
                while len(history) + len(pending) < budget and not converged:
                    state, key, value = step(state, key)
                    b.launch(state, key)
                    pending.append(value)
                    if len(pending) == CHECK_EVERY or len(history) + len(pending) == budget:
                        values = [float(b.to_numpy(v)) for v in pending]
                        _check_finite(b, values, trainer.params(state), len(history) + 1)
                        history.extend(values)
                        progress.update(len(values), values[-1])
                        pending = []
                        converged = _converged(history[start:], WINDOW[phase_mode], tol, phase_mode != "lower-bound")
                mu, var, w = trainer.params(state)
                if not last and not converged:
                    break  # max_iter reached during warm-up
        except KeyboardInterrupt:
            warnings.warn(
                f"fit interrupted after {len(history)} iterations; returning the parameters reached so far",
                RuntimeWarning,
                stacklevel=3,
            )
            converged = False
            if trainer is not None:
                mu, var, w = trainer.params(state)
        finally:
            progress.close()
        return mu, var, w, np.asarray(history), converged

    def _final_elbo(self, counts, mu, var, w, seed: int) -> float:
        b = counts.backend
        terms = evaluate(
            counts,
            mu,
            var,
            w,
            mode=self.mode,
            # Independent draws with the control variate: for the value alone they are less
            # noisy than antithetic pairs (whose gain is in the gradients).
            noise=Noise(b, b.key(seed), antithetic=False),
            n_samples=max(self.E, FINAL_SAMPLES),
            chunk=self.E,  # the chunks of the fit's steps: their scratch memory is reused
            prior_scale=self.prior_scale,
            gradients=False,
            control_variate=True,
        )
        return float(b.to_numpy(terms.value))

    def fit(self, X, y=None):
        """Fit the model to counts X (n_samples, n_features), dense or scipy.sparse."""
        self._fit(X)
        return self

    def fit_transform(self, X, y=None):
        """Fit to X and return ``transform(X)``, the factors E_q[exp F] of its rows.

        The training posterior itself is in ``mean_`` and ``var_``; ``fit_transform`` and
        ``fit(X).transform(X)`` give the same factors, as scikit-learn expects.
        """
        return self.fit(X).transform(X)

    def _fit(self, X) -> None:
        self._validate_params()
        X = self._validate_data(X, reset=True)
        b = get_backend(self.backend, self.device, self.dtype, sparse=sp.issparse(X))
        with b.threads(self._thread_limit(X)):
            self._fit_on(b, X)

    def _thread_limit(self, X) -> int | None:
        """1 for small problems (see SMALL_WORK), else None: the frameworks' own choice."""
        entries = X.nnz if sp.issparse(X) else X.size
        samples = 1 if self.mode == "lower-bound" else self.E
        return 1 if entries * samples <= SMALL_WORK else None

    def _fit_on(self, b, X) -> None:
        rng = check_random_state(self.random_state)
        h, w = initialize(X, self.n_components, self.init, rng)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        if self.batch_size is not None and self.batch_size < X.shape[0]:
            self._fit_minibatch(X, b, h, w, seed, rng)
            return
        with b.scope():
            counts = as_counts(b, X)
            mu = b.asarray(np.log(h) - 0.5 * self.init_var)
            var = b.asarray(np.full(h.shape, self.init_var))
            mu, var, w, history, converged = self._optimize(
                counts,
                mu,
                var,
                b.asarray(w),
                phases=self._phases(),
                fit_loadings=True,
                seed=seed,
                desc="PNMF fit",
            )
            self.elbo_ = self._final_elbo(counts, mu, var, w, seed)
            self.mean_, self.var_, self.loadings_ = (b.to_numpy(a).astype(np.float64) for a in (mu, var, w))
        self.components_ = self.loadings_.T
        self.elbo_history_ = history
        self.n_iter_ = len(history)
        self.converged_ = converged
        self.backend_, self.device_ = b.name, b.device

    def _fit_minibatch(self, X, b, h, w, seed: int, rng) -> None:
        """Mini-batch stochastic variational inference (see ``batch_size``)."""
        n = X.shape[0]
        mean, var = np.log(h) - 0.5 * self.init_var, np.full(h.shape, self.init_var)
        order, position = rng.permutation(n), 0
        history: list[float] = []
        converged = False
        progress = _progress(self.verbose, self.max_iter, "PNMF fit (mini-batch)")
        try:
            for step in range(self.max_iter):
                if position + self.batch_size > n:
                    order, position = rng.permutation(n), 0
                rows = np.sort(order[position : position + self.batch_size])
                position += self.batch_size
                with b.scope():
                    counts, mu, local_var, w_device = self._local_posterior(
                        b, X[rows], mean[rows], var[rows], w, seed + step, max_iter=SVI_LOCAL_STEPS
                    )
                    terms = evaluate(
                        counts,
                        mu,
                        local_var,
                        w_device,
                        mode="lower-bound",
                        noise=None,
                        n_samples=1,
                        prior_scale=self.prior_scale,
                    )
                    w_batch = b.to_numpy(multiplicative_loadings(w_device, terms))
                    value = float(b.to_numpy(terms.value)) * n / len(rows)
                    _check_finite(b, [value], (mu, local_var, w_device), step + 1)
                    mean[rows], var[rows] = b.to_numpy(mu), b.to_numpy(local_var)
                rate = (1.0 + step / SVI_TAU) ** -SVI_KAPPA
                w = (1.0 - rate) * w + rate * w_batch.astype(np.float64)
                history.append(value)
                progress.update(1, value)
                if (step + 1) % CHECK_EVERY == 0:
                    converged = _converged(history, WINDOW["expanded"], self.tol, noisy=True)
                    if converged:
                        break
        except KeyboardInterrupt:
            warnings.warn(
                f"fit interrupted after {len(history)} steps; returning the parameters reached so far",
                RuntimeWarning,
                stacklevel=3,
            )
            converged = False
        finally:
            progress.close()
        self.loadings_ = np.asarray(w, dtype=np.float64)
        self.components_ = self.loadings_.T
        self.mean_, self.var_, self.elbo_ = self._infer_rows(X, b, mean, var)
        self.elbo_history_ = np.asarray(history)
        self.n_iter_ = len(history)
        self.converged_ = converged
        self.backend_, self.device_ = b.name, b.device

    def _local_posterior(self, b, x, mean, var, loadings, seed: int, max_iter=None, desc: str = ""):
        """q(F) of the rows of x by natural lower-bound steps with the loadings fixed.

        Call inside ``b.scope()``; returns the counts, mu, var and W on the device.
        """
        counts = as_counts(b, x)
        w = b.asarray(loadings)
        mu, local_var, _, _, _ = self._optimize(
            counts,
            b.asarray(mean),
            b.asarray(var),
            w,
            phases=[("natural", "lower-bound")],
            fit_loadings=False,
            seed=seed,
            desc=desc,
            max_iter=max_iter,
        )
        return counts, mu, local_var, w

    def _infer_rows(self, X, b, mean, var):
        """q(F) of every row with the loadings fixed, a batch at a time; and the full-data ELBO."""
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        mean, var, elbo = mean.copy(), var.copy(), 0.0
        for start in range(0, X.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            with b.scope():
                counts, mu, local_var, w_device = self._local_posterior(
                    b, X[rows], mean[rows], var[rows], self.loadings_, seed, max_iter=self.max_iter
                )
                elbo += self._final_elbo(counts, mu, local_var, w_device, seed)
                mean[rows], var[rows] = b.to_numpy(mu), b.to_numpy(local_var)
        return mean.astype(np.float64), var.astype(np.float64), elbo

    # -- inference with the loadings fixed ------------------------------------------------
    def _infer(self, X):
        """q(F) of new rows with the loadings fixed, and the ELBO (of ``mode``) there.

        The inference takes natural steps on the lower-bound ELBO: deterministic, and each
        row's q(F) depends on that row alone, so transforming a subset of rows gives the
        same factors as transforming them among others.
        """
        check_is_fitted(self, "loadings_")
        X = self._validate_data(X, reset=False)
        b = get_backend(self.backend_, self.device_, self.dtype)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        row_sums = np.asarray(X.sum(axis=1)).ravel()
        # Start every component at the level that matches the row's total count.
        level = np.maximum(row_sums / max(self.loadings_.sum(), 1e-30), 1e-8)
        mu0 = np.repeat(np.log(level)[:, None], self.n_components, axis=1) - 0.5 * self.init_var
        mu0 = np.clip(mu0, -MEAN_BOUND, MEAN_BOUND)
        with b.scope(), b.threads(self._thread_limit(X)):
            counts, mu, var, w = self._local_posterior(
                b, X, mu0, np.full(mu0.shape, self.init_var), self.loadings_, seed, desc="PNMF transform"
            )
            elbo = self._final_elbo(counts, mu, var, w, seed)
            return b.to_numpy(mu).astype(np.float64), b.to_numpy(var).astype(np.float64), elbo

    def transform(self, X):
        """Factors H = E_q[exp F] (n_samples, n_components) of rows of X, loadings fixed.

        q(F) of each row is inferred by natural steps on the lower-bound ELBO (up to
        ``max_iter``, stopping at ``tol``), starting from the level of the row's total count.
        """
        mean, var, _ = self._infer(X)
        return np.exp(mean + 0.5 * var)

    def inverse_transform(self, H):
        """Rate ``H @ components_`` (n_samples, n_features): with H from transform, the posterior-mean rate."""
        check_is_fitted(self, "loadings_")
        H = np.asarray(H, dtype=np.float64)
        if H.ndim != 2 or H.shape[1] != self.n_components:
            raise ValueError(f"H must have shape (n_samples, {self.n_components}); got {H.shape}")
        return H @ self.components_

    def save(self, path) -> Path:
        """Write the fitted model to a portable ``.npz`` file (arrays plus JSON metadata, no pickle)."""
        check_is_fitted(self, "loadings_")
        return io.save(self, path)

    @classmethod
    def load(cls, path, backend: str | None = None, device: str | None = None) -> PNMF:
        """Read a model written by ``save``, to run on ``backend``/``device`` (default: as saved).

        A model fitted on one backend loads into any other with identical loadings. A file
        that is not a pnmf model, or is damaged, raises ValueError.
        """
        return io.load(cls, path, backend=backend, device=device)

    def score(self, X, y=None) -> float:
        """ELBO of X under the fitted loadings (q(F) of its rows inferred by ``transform``)."""
        return self._infer(X)[2]


def _check_finite(b, values: list[float], params, first: int) -> None:
    """Raise FloatingPointError naming the iteration and quantity that stopped being finite."""
    hint = "try dtype='float64', a smaller learning_rate or ngd_lr, or check the counts"
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise FloatingPointError(f"the ELBO became {value} at iteration {first + offset}; {hint}")
    for name, array in zip(("mean of q(F)", "variance of q(F)", "loadings"), params):
        if not bool(b.to_numpy(b.all_finite(array))):
            raise FloatingPointError(
                f"the {name} became non-finite between iterations {first} and {first + len(values) - 1}; {hint}"
            )


def _converged(history: list[float], window: int, tol: float, noisy: bool) -> bool:
    """Whether the mean ELBO of the last ``window`` iterations differs from the window before
    by less than ``tol`` (relative).

    A Monte Carlo (``noisy``) history must show it beyond its noise: the change plus two
    standard errors, the noise estimated from successive differences (which a slow trend
    does not inflate), must be below ``tol``. A tolerance under the noise floor therefore
    runs to ``max_iter`` rather than stopping at a lucky draw.
    """
    if tol <= 0 or len(history) < 2 * window:
        return False
    values = np.asarray(history[-2 * window :])
    recent, previous = values[window:].mean(), values[:window].mean()
    change = abs(recent - previous)
    if noisy:
        noise_sd = np.std(np.diff(values)) / np.sqrt(2.0)
        change += 2.0 * noise_sd * np.sqrt(2.0 / window)
    return bool(change <= tol * abs(recent))


class _Progress:
    """A tqdm bar showing the running ELBO, or nothing."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="it", leave=False)

    def update(self, n: int, elbo: float) -> None:
        self.bar.update(n)
        self.bar.set_postfix(elbo=f"{elbo:.6g}", refresh=False)

    def close(self) -> None:
        self.bar.refresh()  # show the final ELBO even when the fit was quicker than tqdm's refresh interval
        self.bar.close()


class _Silent:
    def update(self, n: int, elbo: float) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(verbose: bool, total: int, desc: str):
    return _Progress(total, desc) if verbose else _Silent()
