"""Mini-batch stochastic variational inference (``PNMF(batch_size=...)``), a trainer on host arrays.

Each step takes one batch of rows: a few natural lower-bound steps on the batch's q(F),
started afresh from the rows' totals, with W fixed, then W moves towards the batch's multiplicative update,
W <- (1 - r_t) W + r_t W_batch, r_t = (1 + t / TAU) ** -KAPPA for step t = 1, 2, ...
The batch sums in that update stand for the full-data sums rescaled by N / batch; the
factor cancels in its ratio. Batch effects and a fitted prior scale move with the same r_t.
The fitted parameters are the average of the iterates (Polyak-Ruppert, as an Averaged Monte
Carlo fit's), and the stopping rule reads the ELBO of one fixed batch at that average.
W lives in host memory; only the batch goes to the device. In a distributed fit each
process draws its share of every batch from its own rows, and one all-reduce a step sums
the batches' statistics (with batch effects, also each batch's counts and rows among
them), so W and g stay the same on every process; with ``tol`` > 0, one more every 10
steps sums the fixed batch's ELBO.
"""

from __future__ import annotations

import numpy as np

from .backends import get_backend
from .distributed import Group
from .elbo import Terms, evaluate
from .optim import AVERAGE, EXTRA, averaging_weight, multiplicative_loadings
from .scaling import TINY_EFFECT, RowEffects

# Local natural steps per batch, and the loadings' Robbins-Monro schedule. On 2000 x 60
# planted counts, 300 steps of 100 rows from fresh local starts ended 0.07% below the
# full-batch ELBO with these (0.64% with 5 local steps, 0.02% with 20 at 1.6x the time);
# with q(F) kept between passes, (tau, kappa, steps) = (10, 0.7, 10) had ended 2.8% below.
LOCAL_STEPS = 10
TAU, KAPPA = 100.0, 0.6
# A fitted prior scale ('auto') is held at its start for the first PRIOR_HOLD steps, while W
# moves fastest. Updated from the first step, it shrank every component's factors before
# the programs had formed (20,000 x 2,000 counts with batches and size factors, batches of
# 2,000, 300 steps: every scale 0.02, ELBO -8,901,340 against -8,882,151 with the scale
# fixed at 1); held 100 steps, -8,833,915 (scales 0.09-0.42).
PRIOR_HOLD = int(TAU)
# A pass permutes blocks of batch_size // BLOCKS_PER_BATCH consecutive rows, not single
# rows: a batch of counts on disk is then read as a few hundred runs of rows rather than
# one read per row (a 1e6-row .h5ad, batches of 20,000: 0.45 s a batch row by row, most of
# a step). On 40,000 x 300 planted counts sorted by their dominant program (the worst case
# for blocks), batches of 4,000 for 150 steps: the final ELBO 0.12-0.15% below the full
# fit's with single rows, 0.13-0.16% with 250 blocks of 16 rows, 0.20-0.35% with 62
# blocks of 64 (two seeds each).
BLOCKS_PER_BATCH = 256
MONITOR = 2**40  # seeds the monitor batch's draw apart from every pass's, [seed, pass] (see monitor)
# The fitted W (and g, prior scale) is the average of the iterates, weighted as an Averaged
# Monte Carlo fit's (c_t = (eta + 1) / (t + eta): about the last quarter of the steps), and
# the stopping rule reads the ELBO of one fixed batch at that average (``monitor``). At the
# last iterate that ELBO jitters by 1-2e-4 (relative) for hundreds of steps, as W follows
# each batch with weight r_t (0.58 at step 150), and stopped fits at their 150th step, 5e-4
# short; at the average it rises smoothly, and the average ends higher: 3000 x 800 counts,
# batches of 500, 3000 steps, -3,323,050 for both; 40,000 x 2,000 planted counts (27%
# non-zero), batches of 2,000, 1500 steps, -54,550,140 against -54,551,333.
AVERAGE_ETA = 3.0
AVERAGED = ("w", "prior", "batch_counts", "batch_rate")  # the state's averaged arrays (see params)
# has_settled's tail for a mini-batch fit: the remaining gap of those two fits fell as t^-1
# to t^-1.5. At tol = 1e-4 the rule then stopped them at steps 280 and 390, 1.07e-4 and
# 4.7e-5 below the ELBO their monitor batch reached at 3000 and 1500 steps (with 1.25, the
# Monte Carlo phases' tail: 220 and 350 steps, 1.33e-4 and 5.8e-5).
TAIL = 1.0


class MinibatchTrainer:
    """One step per batch of ``model.batch_size`` rows of x, on the device backend ``b``.

    The batches of pass e over the rows are those of a permutation seeded by (seed, e)
    (of blocks of consecutive rows, :func:`block_permutation`), so step t's batch follows
    from t alone and a resumed fit takes the batches an uninterrupted one would. The state
    is W, t and their averages (with batch effects and a fitted prior scale, theirs too):
    each batch's q(F) starts afresh from its rows' totals (as ``transform`` does), so
    memory does not grow with the rows and rows on disk are read one batch at a time.
    """

    def __init__(self, x, b, model, seed: int, effects: RowEffects | None = None, group=None, batch_sums=None):
        self.x, self.b, self.model, self.seed, self.effects, self.group = x, b, model, seed, effects, group
        # Batch effects move with W: g = X_b / R_b, the closed form, with the counts X_b of
        # batch b (B x D) and their expected rate per unit of g, R_b = S_b @ W.T, each a running
        # average of the step's sums over its rows of b (scaled up to all of b's rows), started
        # at b's counts (``batch_sums``) and at the R_b that gives the starting g. Averaging the
        # step's own closed form instead gave g = 0 to every gene without counts among the
        # step's rows of b, which the next steps' loadings followed to 0/0 (an ELBO of -inf:
        # 600 x 800 counts at 6% non-zero, 4 batches, steps of 60 rows).
        self.fit_batches = effects is not None and effects.free is not None
        self.n, self.batch = x.shape[0], model.batch_size
        self.n_total, self.host = self.n, get_backend("numpy", dtype="float64")
        if self.fit_batches:  # every process's counts and rows of each batch
            self.batch_sums = np.asarray(batch_sums, dtype=np.float64)
            self.batch_rows = np.bincount(effects.codes, minlength=len(self.batch_sums)).astype(np.float64)
        if group is not None:
            # A distributed fit: each process draws its share of the batch from its own rows,
            # and one all-reduce a step sums the batches' statistics (``_all_sum``).
            rows = np.concatenate([[float(self.n)], self.batch_rows if self.fit_batches else []])
            rows = group.all_sum_host(rows)
            self.n_total = int(rows[0])
            if self.fit_batches:
                self.batch_rows = rows[1:]
            self.batch = min(self.n, max(1, round(self.batch * self.n / self.n_total)))
        self.per_pass = self.n // self.batch
        self.block = max(1, self.batch // BLOCKS_PER_BATCH)
        self._pass, self._order = -1, None
        self._monitor = None  # (rows, their counts): see monitor

    def init(self, mean, var, w: np.ndarray, extra: dict | None = None) -> dict:
        state = {"w": np.asarray(w, dtype=np.float64), "t": np.float64(0)}
        state.update({k: np.asarray(v, dtype=np.float64) for k, v in (extra or {}).items()})
        if self.fit_batches:  # R_b that gives the starting g
            state["batch_rate"] = self.batch_sums / np.clip(state["g"], TINY_EFFECT, None)
            state["batch_counts"] = self.batch_sums.copy()
        if AVERAGE_ETA is not None:
            state.update({AVERAGE + k: state[k].copy() for k in AVERAGED if k in state})
        return state

    def params(self, state: dict) -> tuple[None, None, np.ndarray, dict]:
        """W and the extra parameters; with averaging, their averages, and g the closed form
        for the averaged W: the average of X_b over that of R_b (R_b is linear in W).
        Averaging g itself paired a gene's late g, large where its loadings fade, with their
        earlier, larger values: 600 x 800 counts at 4% non-zero in 4 batches, 300 steps of 60
        rows, ended at an ELBO of -1.8e7, against -7.3e4 at the last iterate and -6.9e4 so."""
        if AVERAGE_ETA is None:
            return None, None, state["w"], {k: state[k] for k in EXTRA if k in state}
        extra = {k: state[k] for k in EXTRA if k in state}
        if "prior" in state:
            extra["prior"] = state[AVERAGE + "prior"]
        if self.fit_batches:
            rate = np.clip(state[AVERAGE + "batch_rate"], TINY_EFFECT, None)
            extra["g"] = state[AVERAGE + "batch_counts"] / rate
        return None, None, state[AVERAGE + "w"], extra

    def _rows(self, t: int) -> np.ndarray:
        """The sorted rows of step t's batch."""
        epoch, slot = divmod(t, self.per_pass)
        if epoch != self._pass:
            rng = np.random.default_rng([self.seed, epoch] + ([] if self.group is None else [self.group.rank]))
            self._pass, self._order = epoch, block_permutation(rng, self.n, self.block)
        return np.sort(self._order[slot * self.batch : (slot + 1) * self.batch])

    def monitor(self, state: dict) -> float:
        """The ELBO of one fixed batch of rows under the state's W (and g, prior scale), its
        q(F) from the same fresh start and local steps as a step's: a function of the global
        parameters alone, free of which batch a step drew, for the stopping rule
        (:func:`pnmf.loop.has_settled`). Scaled up to all rows as a step's value is; summed
        over the processes of a distributed fit."""
        if self._monitor is None:  # drawn and read once; a batch of rows more in memory
            rng = np.random.default_rng([self.seed, MONITOR] + ([] if self.group is None else [self.group.rank]))
            rows = np.sort(block_permutation(rng, self.n, self.block)[: self.batch])
            self._monitor = rows, self.x[rows]
        rows, x = self._monitor
        with self.b.scope():
            _, _, w, extra = self.params(state)
            value = self._batch_terms(dict(state, w=w, **extra), rows, x, self.seed)[0].value
            value = np.array([_host(self.b, value), len(rows)])
        if self.group is not None:
            value = self.group.all_sum_host(value)
        return float(value[0] * self.n_total / value[1])

    def _batch_terms(self, state: dict, rows: np.ndarray, x, seed: int):
        """q(F) of the rows of x by the local steps, W fixed, and their lower-bound terms:
        (terms, counts, the rows' effects, W and g on the device). Call inside ``b.scope()``."""
        effects = None
        if self.effects is not None:  # the batch's rows with g fixed during the local steps
            effects = RowEffects(self.effects.s[rows], self.effects.codes[rows], state["g"])
        counts, mu, var, w, extra = self.model._local_posterior(
            self.b, x, effects, state["w"], seed, max_iter=LOCAL_STEPS, prior=state.get("prior")
        )
        terms = evaluate(
            counts,
            mu,
            var,
            w,
            extra.get("g"),
            mode="lower-bound",
            noise=None,
            n_samples=1,
            prior_scale=extra["prior"],
            row_statistics="prior" in state,
        )
        return terms, counts, effects, w, extra.get("g")

    def step(self, state: dict, key):
        b = self.b
        t = int(state["t"])
        rows = self._rows(t)
        with b.scope():
            terms, counts, effects, w, g = self._batch_terms(state, rows, self.x[rows], self.seed + t)
            # With batches: the step's rows of each batch, and their counts X_b (B, D).
            in_step = np.bincount(effects.codes, minlength=len(self.batch_rows)) if self.fit_batches else None
            step_sums = counts.scaling.xb if self.fit_batches else None
            if self.group is None:
                rows_in_batches = len(rows)
                w_device = multiplicative_loadings(b, w, terms, g)
                w_batch = b.to_numpy(w_device).astype(np.float64)
                value = float(b.to_numpy(terms.value))
                prior_sum = None if terms.prior_sum is None else b.to_numpy(terms.prior_sum)
            else:
                terms, rows_in_batches, step_sums, in_step = self._all_sum(terms, len(rows), step_sums, in_step)
                w_batch = multiplicative_loadings(self.host, state["w"], terms, state.get("g"))
                value, prior_sum = float(terms.value), terms.prior_sum
            if self.fit_batches:  # S_b (B, L) and X_b on the host
                expected_sum, step_sums = (_host(self.b, a) for a in (terms.expected_sum, step_sums))
            if "prior" in state:  # the batch's estimate of s_l^2 = mean_n (mu^2 + var)
                prior_batch = np.asarray(prior_sum, dtype=np.float64) / rows_in_batches
            value *= self.n_total / rows_in_batches
        # Below 1 from the first step: a step that moved W all the way to the batch's update
        # gave 0 to the loadings of every feature without counts in the batch, for good.
        rate = (1.0 + (t + 1) / TAU) ** -KAPPA
        new = dict(state, w=(1.0 - rate) * state["w"] + rate * w_batch, t=np.float64(t + 1))
        if self.fit_batches:  # R_b for the moved W: the step's own W is 0 on genes without counts in it
            scale = np.divide(self.batch_rows, in_step, out=np.zeros(len(in_step)), where=in_step > 0)[:, None]
            estimates = {"batch_counts": step_sums * scale, "batch_rate": expected_sum * scale @ new["w"].T}
            for name, estimate in estimates.items():
                new[name] = np.where(scale > 0, (1.0 - rate) * state[name] + rate * estimate, state[name])
            new["g"] = new["batch_counts"] / np.clip(new["batch_rate"], TINY_EFFECT, None)
        if "prior" in state and t >= PRIOR_HOLD:
            new["prior"] = np.sqrt((1.0 - rate) * state["prior"] ** 2 + rate * prior_batch)
        if AVERAGE_ETA is not None:
            c = averaging_weight(t + 1, AVERAGE_ETA)
            for name in AVERAGED:
                if name in state:
                    new[AVERAGE + name] = state[AVERAGE + name] + c * (new[name] - state[AVERAGE + name])
        return new, key, value

    def _all_sum(self, terms: Terms, rows: int, step_sums=None, in_step=None):
        """Every process's batch statistics summed in one all-reduce, on the host in float64:
        the ELBO, the loadings' numerator and denominator, the prior's sum; the rows; with
        batch effects, the counts X_b of the step's rows of each batch and their number.
        Returns (terms, rows, X_b, rows of each batch)."""
        local = [terms.value, terms.w_numerator, terms.expected_sum, terms.prior_sum, step_sums, in_step]
        local = [None if a is None else _host(self.b, a) for a in local]
        value, numerator, expected, prior_sum, step_sums, in_step, rows = Group.all_sum(
            self.group, self.host, *local, np.float64(rows)
        )
        terms = Terms(value, w_numerator=numerator, expected_sum=expected, prior_sum=prior_sum)
        return terms, int(rows), step_sums, in_step


def _host(b, array) -> np.ndarray:
    """A backend's array (or a NumPy one) as a float64 NumPy array."""
    return np.asarray(array if isinstance(array, np.ndarray) else b.to_numpy(array), dtype=np.float64)


def block_permutation(rng: np.random.Generator, n: int, block: int) -> np.ndarray:
    """A permutation of range(n) that keeps blocks of ``block`` consecutive rows together,
    the blocks in random order (the last one shorter when ``block`` does not divide n);
    with ``block == 1``, ``rng.permutation(n)``."""
    if block == 1:
        return rng.permutation(n)
    starts = rng.permutation(-(-n // block)) * block
    lengths = np.minimum(starts + block, n) - starts
    offsets = np.cumsum(lengths) - lengths  # where each block begins in the permutation
    return np.repeat(starts - offsets, lengths) + np.arange(n)
