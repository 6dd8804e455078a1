"""The fit loop every fit shares: phases, stopping, progress, Ctrl-C and checkpoints.

A trainer is a pure step on arrays (``init(mu, var, w) -> state``,
``step(state, key) -> (state, key, elbo)``, ``params(state) -> (mu, var, w)``); this
module runs one or more of them in sequence (a *phase* each) until the stopping rule fires
or the iteration budget is spent. The all-reduce of a distributed fit happens inside the
step, where the sums over rows are made (:func:`pnmf.elbo.evaluate`), so the loop only
ever reads the ELBO every rank agrees on: every rank stops at the same iteration.

Reading a value from the device waits for it, so the ELBO history is read every
``CHECK_EVERY`` iterations (and whenever a checkpoint is written), and the stopping rule is
checked at fixed iteration counts within a phase: where the reads fall does not change
where a fit stops, so a resumed fit stops where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.base import Array, Backend

# Whether a fit interrupted with Ctrl-C returns what it reached (a fit of its own) or lets
# the interrupt through (one fit of many: restarts, candidates for K, a command).
KEEP_ON_INTERRUPT = contextvars.ContextVar("keep_on_interrupt", default=True)


@contextlib.contextmanager
def interrupt_stops_all():
    """Within it, Ctrl-C stops every fit: KeyboardInterrupt reaches the caller."""
    token = KEEP_ON_INTERRUPT.set(False)
    try:
        yield
    finally:
        KEEP_ON_INTERRUPT.reset(token)


CHECK_EVERY = 10  # iterations between reads of the ELBO history (each read waits for the device)
WINDOW = {"lower-bound": 10, "expanded": 50, "simple": 50}  # moving-average window of the stopping rule
# The stopping rule of a Monte Carlo phase (has_settled): it reads the fixed-noise ELBO at
# iterations t, t / GROWTH and t / GROWTH^2 of the phase, and not before SETTLE iterations.
SETTLE, GROWTH = 150, 1.3
# The rule assumes that the distance to the limit falls no faster than t^-TAIL, so it takes the
# ratio of successive window gains as at least GROWTH^-TAIL (0.72): the gain still to come is
# at least 2.6x the last gain. An early fast transient otherwise makes the slow tail look
# geometric (measured: a sparse fit stopped 1.0e-4 short at its first check, 8e-5 with it).
TAIL = 1.25
# Adam's phase (standard training) settles faster: at a constant learning rate its iterates
# stop drifting, and the average of the last quarter of them (Averaged, eta = 3) forgets its
# start as t^-4. On the sparse benchmark set its gains fell as t^-3.3 to t^-5 from iteration
# 700 on, slowing to t^-1.6 to t^-2.2 near 2000 in one mode; with TAIL its fits ran 3.3-3.5x
# past the iteration where they came within 1e-3, 2e-5 short of tol.
TAIL_STANDARD = 2.5


@dataclass
class Phase:
    """A trainer run until its ELBO changes by less than ``tol`` (see :func:`has_converged`)."""

    trainer: Any
    tol: float
    window: int = WINDOW["lower-bound"]
    noisy: bool = False  # a Monte Carlo ELBO: the change must show beyond its noise
    tail: float = TAIL  # a Monte Carlo phase's stopping rule: see has_settled

    @classmethod
    def of_mode(cls, trainer, mode: str, tol: float) -> Phase:
        """The phase of a trainer on the ELBO of ``mode``, with that mode's window and noise."""
        return cls(trainer, tol, WINDOW[mode], mode != "lower-bound")


@dataclass
class Result:
    """Where a run ended: q(F), W, the ELBO history, whether the last phase converged, and the
    other fitted parameters (``extra``: see :func:`run`)."""

    mu: Array
    var: Array
    w: Array
    history: np.ndarray
    converged: bool
    extra: dict = field(default_factory=dict)
    # Restarts run as lanes (a trainer with ``lanes``): history is (iterations, lanes), and
    # lane j's own fit is its first stops[j] values; converged is then per lane.
    stops: np.ndarray | None = None


def run(
    b: Backend,
    phases: list[Phase],
    mu: Array,
    var: Array,
    w: Array,
    extra: dict | None = None,
    *,
    seed: int,
    max_iter: int,
    progress=None,
    checkpoint=None,
) -> Result:
    """Run ``phases`` in turn from (mu, var, W, extra), ``max_iter`` iterations at most in all.

    ``extra``: the model's fitted parameters besides q(F) and W, where it has them: ``'g'``
    the batch effects (B, D), ``'prior'`` the per-component prior scale (L,).

    A phase before the last that does not converge within the budget ends the run. A run
    interrupted with Ctrl-C returns what it had reached, with a warning. ``checkpoint``
    (a :class:`pnmf.io.Checkpoint`) is written every ``checkpoint.every`` iterations and,
    when it holds a saved state, the run resumes from it.

    A trainer with ``lanes`` (R restarts in one step, :mod:`pnmf.restarts`) reports one ELBO
    per lane; each lane's stopping rule reads its own history, a lane that stops is frozen
    (``trainer.freeze``) and the run ends when every lane has stopped. Such a run has one
    phase and no checkpoint.
    """
    progress = progress or Silent()
    key = b.key(seed)
    history: list[float] = []
    converged = False
    first_phase, saved = 0, None
    if checkpoint is not None:
        saved = checkpoint.load()
        if saved is not None:
            first_phase, history = saved["phase"], list(saved["history"])
            progress.update(len(history), history[-1] if history else math.nan)
    trainer = state = lanes = None
    try:
        for index in range(first_phase, len(phases)):
            phase, last = phases[index], index == len(phases) - 1
            trainer = phase.trainer
            state = trainer.init(mu, var, w, extra)
            start = len(history)
            lanes = Lanes(trainer, len(phases), checkpoint) if hasattr(trainer, "lanes") else None
            # A Monte Carlo phase whose trainer can estimate its ELBO with common random numbers
            # (or a mini-batch phase, on one fixed batch) stops on those estimates (see
            # has_settled), read at every check when it may stop early.
            monitor = getattr(trainer, "monitor", None) if phase.noisy and phase.tol > 0 else None
            monitors: list[float] = []
            if saved is not None:
                state = {name: b.asarray(value) for name, value in saved["state"].items()}
                key, start, monitors = b.key_from_numpy(saved["key"]), saved["phase_start"], saved["monitors"]
                saved = None
            step = b.compile(trainer.step, capture=getattr(trainer, "capturable", False))
            pending: list[Array] = []
            converged = False
            while len(history) + len(pending) < max_iter and not converged:
                state, key, value = step(state, key)
                b.launch(state, key)
                pending.append(value)
                done = len(history) + len(pending)
                check = (done - start) % CHECK_EVERY == 0 or done == max_iter
                save = checkpoint is not None and done % checkpoint.every == 0
                if check or save:
                    values = [_read(b, v) for v in pending]
                    check_finite(b, values, trainer.params(state), len(history) + 1)
                    history.extend(values)
                    progress.update(len(values), float(np.max(values[-1])))
                    pending = []
                if check and lanes is not None:
                    state, converged = lanes.check(state, history, start, phase)
                elif check and monitor is not None:
                    monitors.append(float(b.to_numpy(monitor(state))))
                    converged = has_settled(monitors, phase.tol, tail=phase.tail)
                elif check:
                    converged = has_converged(history[start:], phase.window, phase.tol, phase.noisy)
                if save and not converged:
                    checkpoint.save(
                        index,
                        start,
                        {k: b.to_numpy(v) for k, v in state.items()},
                        b.key_to_numpy(key),
                        history,
                        monitors,
                    )
            mu, var, w, extra = trainer.params(state)
            if not last and not converged:
                break  # max_iter reached before the last phase
    except KeyboardInterrupt:
        if not KEEP_ON_INTERRUPT.get():
            raise
        warnings.warn(
            f"fit interrupted after {len(history)} iterations; returning the parameters reached so far",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        converged = False
        if trainer is not None:
            mu, var, w, extra = trainer.params(state)
    finally:
        progress.close()
    if lanes is not None:
        return lanes.result(mu, var, w, history)
    return Result(mu, var, w, np.asarray(history), converged, extra or {})


class Lanes:
    """The stopping rule of a run whose trainer steps several restarts (``trainer.lanes``)."""

    def __init__(self, trainer, n_phases: int, checkpoint):
        if n_phases != 1 or checkpoint is not None:
            raise ValueError("restarts run as lanes in one phase and without a checkpoint")
        self.trainer = trainer
        self.stops = np.zeros(trainer.lanes, dtype=np.int64)  # 0: still running

    def check(self, state: dict, history: list, start: int, phase: Phase) -> tuple[dict, bool]:
        """Stop every running lane whose own history has converged; (state, all stopped)."""
        running = self.stops == 0
        columns = np.asarray(history[start:])
        for lane in np.flatnonzero(running):
            if has_converged(list(columns[:, lane]), phase.window, phase.tol, phase.noisy):
                self.stops[lane] = len(history)
        if (self.stops == 0).sum() < running.sum():
            state = self.trainer.freeze(state, self.stops == 0)
        return state, bool((self.stops > 0).all())

    def result(self, mu: Array, var: Array, w: Array, history: list) -> Result:
        """Lanes that never stopped ran to the end of the run (max_iter or Ctrl-C), unconverged."""
        converged = self.stops > 0
        stops = np.where(converged, self.stops, len(history))
        return Result(mu, var, w, np.asarray(history).reshape(len(history), -1), converged, {}, stops)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, in the function calling this, name the
    first line outside pnmf and scikit-learn (whose wrappers call ``fit_transform``): the
    user's, however deep inside a fit the warning is raised."""
    import sklearn

    inside = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], sklearn))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _read(b: Backend, value: Array) -> float | np.ndarray:
    """An ELBO read from the device: a number, or one per lane."""
    array = b.to_numpy(value)
    return float(array) if np.ndim(array) == 0 else array.astype(np.float64)


def check_finite(b: Backend, values: list, params, first: int) -> None:
    """Raise FloatingPointError naming the iteration and quantity that stopped being finite
    (``values``: the ELBOs read, a number each, or one per lane)."""
    hint = "try dtype='float64', a smaller learning_rate or ngd_lr, or check the counts"
    for offset, value in enumerate(values):
        if not np.isfinite(value).all():
            value = np.asarray(value)[~np.isfinite(value)].flat[0]  # of the first lane that failed
            raise FloatingPointError(f"the ELBO became {value} at iteration {first + offset}; {hint}")
    mu, var, w, extra = params
    arrays = {"mean of q(F)": mu, "variance of q(F)": var, "loadings": w, "batch effects": extra.get("g")}
    for name, array in arrays.items():
        if array is not None and not bool(b.to_numpy(b.all_finite(array))):
            raise FloatingPointError(
                f"the {name} became non-finite between iterations {first} and {first + len(values) - 1}; {hint}"
            )


def has_settled(monitors: list[float], tol: float, every: int = CHECK_EVERY, tail: float = TAIL) -> bool:
    """Whether a Monte Carlo phase is within ``tol`` (relative) of the ELBO it converges to.

    ``monitors[k]`` is the ELBO at iteration ``(k + 1) * every`` of the phase, estimated with
    the same noise every time (common random numbers) at the averaged parameters: a smooth
    function of parameters that settle, so Monte Carlo noise can neither fake a stop nor hide
    one. Its gains over the windows (t / GROWTH^2, t / GROWTH] and (t / GROWTH, t] shrink by
    a ratio r as the fit converges; the gain still to come is then about the last gain times
    r / (1 - r) (Aitken's extrapolation over windows that grow with t, exact for gains that
    decay geometrically or as a power of t), with r taken as at least GROWTH^-tail (a
    remaining distance that falls no faster than t^-tail). The fit has
    settled when the last gain and the gain to come are both at most ``tol * |ELBO|``. Not
    before SETTLE iterations.
    """
    n = len(monitors)
    if tol <= 0 or n * every < SETTLE:
        return False
    middle, first = round(n / GROWTH) - 1, round(n / GROWTH**2) - 1
    last, before = monitors[-1] - monitors[middle], monitors[middle] - monitors[first]
    scale = tol * abs(monitors[-1])
    if last <= 0:  # no gain: settled unless the ELBO fell by more than tol
        return bool(-last <= scale)
    if before <= last:  # not slowing down
        return False
    ratio = max(last / before, GROWTH**-tail)
    return bool(last <= scale and last * ratio / (1.0 - ratio) <= scale)


def has_converged(history: list[float], window: int, tol: float, noisy: bool) -> bool:
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


class Progress:
    """A tqdm bar showing the running ELBO."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def update(self, n: int, elbo: float) -> None:
        self.bar.update(n)
        self.bar.set_postfix(elbo=f"{elbo:.6g}", refresh=False)

    def close(self) -> None:
        self.bar.refresh()  # show the final ELBO even when the fit was quicker than tqdm's refresh interval
        self.bar.close()


class Silent:
    """No progress bar."""

    def update(self, n: int, elbo: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(verbose: bool, total: int, desc: str, unit: str = "it"):
    """A progress bar when ``verbose``, else one that shows nothing."""
    return Progress(total, desc, unit) if verbose else Silent()
