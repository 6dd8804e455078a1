"""Synthetic counts from the model, held-out splits by data thinning, and the Poisson deviance."""

from __future__ import annotations

import ctypes
import functools
import platform

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_non_negative


def make_counts(
    n_samples: int = 200,
    n_features: int = 100,
    n_components: int = 5,
    *,
    loading_shape: float = 0.5,
    random_state=42,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson counts drawn from the model: returns ``(X, H, W)``.

    F ~ Normal(0, 1) (N, L), W ~ Gamma(loading_shape, 1 / loading_shape) (D, L),
    H = exp(F), X ~ Poisson(H @ W.T). Gamma loadings with shape < 1 are sparse-ish,
    so the components are distinguishable.
    """
    rng = check_random_state(random_state)
    h = np.exp(rng.standard_normal((n_samples, n_components)))
    w = rng.gamma(loading_shape, 1.0 / loading_shape, size=(n_features, n_components))
    x = rng.poisson(h @ w.T).astype(np.float64)
    return x, h, w


def make_batched_counts(
    n_samples: int = 600,
    n_features: int = 200,
    n_components: int = 6,
    *,
    n_batches: int = 3,
    batch_sd: float = 0.5,
    size_sd: float = 0.6,
    loading_shape: float = 0.5,
    random_state=42,
) -> dict[str, np.ndarray]:
    """Counts from the model with size factors and batch effects (see :mod:`pnmf.scaling`).

    rate[n, d] = s[n] g[batch(n), d] (H @ W.T)[n, d] with H = exp(F), F ~ Normal(0, 1),
    W ~ Gamma(loading_shape, 1 / loading_shape), log s ~ Normal(0, size_sd^2) and
    log g ~ Normal(0, batch_sd^2) independently per batch and feature; rows are assigned
    to batches in turn (row n to batch n mod n_batches, labelled 'batch0', 'batch1', ...).
    Returns a dict with ``X``, ``H``, ``W``, ``size_factors``, ``batch`` (the labels) and
    ``batch_effects`` (n_batches, n_features).
    """
    rng = check_random_state(random_state)
    h = np.exp(rng.standard_normal((n_samples, n_components)))
    w = rng.gamma(loading_shape, 1.0 / loading_shape, size=(n_features, n_components))
    s = np.exp(size_sd * rng.standard_normal(n_samples))
    g = np.exp(batch_sd * rng.standard_normal((n_batches, n_features)))
    codes = np.arange(n_samples) % n_batches
    x = rng.poisson(s[:, None] * g[codes] * (h @ w.T)).astype(np.float64)
    labels = np.array([f"batch{c}" for c in codes])
    return {"X": x, "H": h, "W": w, "size_factors": s, "batch": labels, "batch_effects": g}


# Values checked for integers at a time (their temporaries: a few MB).
CHECK_CHUNK = 1 << 20


def non_integers(values: np.ndarray) -> tuple[int, float | None]:
    """How many of ``values`` are not whole numbers, and the first of them (None: none)."""
    values = np.ravel(values, order="K")  # no copy of a contiguous array
    if values.dtype.kind != "f":
        return 0, None
    n, example = 0, None
    for start in range(0, values.size, CHECK_CHUNK):  # bounded temporaries
        part = values[start : start + CHECK_CHUNK]
        fractional = part != np.floor(part)
        found = int(np.count_nonzero(fractional))
        if found and example is None:
            example = float(part[fractional][0])
        n += found
    return n, example


def canonical_csr(x) -> sp.csr_matrix:
    """Sparse ``x`` as CSR with each entry stored once, in order, and no stored zeros.

    ``x`` itself (as a ``csr_matrix``) when it is so already; otherwise a new matrix, never
    ``x`` changed: SciPy tidies a matrix in place (``sum_duplicates``, ``sort_indices``,
    ``eliminate_zeros``; even ``x.sum()`` sums the duplicates of ``x``), which would rewrite
    the caller's arrays, or fail on read-only ones.
    """
    csr = sp.csr_matrix(x)  # a CSR input's arrays are shared, not copied
    if csr.has_canonical_format and np.all(csr.data):
        return csr
    if x.format == "csr":
        csr = csr.copy()
    csr.sum_duplicates()
    csr.eliminate_zeros()
    return csr


def refuse_containers(x) -> None:
    """A TypeError when x is an AnnData, whose counts are one of its matrices, or a masked
    array, whose mask a fit would pass over (it models every entry)."""
    if type(x).__name__ == "AnnData":  # without importing anndata
        raise TypeError(
            "X is an AnnData: pass its counts (adata.X or adata.layers['counts']), or call "
            "pnmf.fit_anndata(adata, ...) / pnmf.transform_anndata(model, adata, ...)"
        )
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            "X is a masked array: the model has a count for every entry and would fit the masked "
            "ones' values; pass X.filled(0) to count them as zeros, or leave out the rows or "
            "features with missing counts"
        )


def thin(x, fraction: float = 0.5, random_state=None):
    """Split counts into X_train + X_test = X with X_train ~ Binomial(X, fraction).

    For Poisson counts the two parts are independent Poisson with rates fraction * rate
    and (1 - fraction) * rate, so X_test scores a model fitted on X_train.
    Sparse input gives sparse output with the same pattern. X must hold integer counts.
    """
    refuse_containers(x)
    x = check_array(x, accept_sparse="csr", dtype=(np.float64, np.float32), input_name="X")
    check_non_negative(x, "thin (counts must be non-negative)")
    n, example = non_integers(x.data if sp.issparse(x) else x)
    if n:
        raise ValueError(
            f"thinning splits integer counts (X_train ~ Binomial(X, fraction)); X holds non-integer values, "
            f"such as {example:.4g}: pass the raw counts"
        )
    rng = check_random_state(random_state)
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        train = x.copy()
        train.data = rng.binomial(np.rint(x.data).astype(np.int64), fraction).astype(x.dtype)
        train.eliminate_zeros()
        return train, (x - train).tocsr()
    x = np.asarray(x)
    train = rng.binomial(np.rint(x).astype(np.int64), fraction).astype(np.float64)
    return train, x - train


def poisson_deviance(x, rate: np.ndarray) -> float:
    """Total Poisson deviance 2 sum (x log(x / rate) - x + rate) of counts x at ``rate``."""
    rate = np.asarray(rate, dtype=np.float64)
    if sp.issparse(x):
        x = sp.coo_matrix(x)
        values, at_counts = x.data.astype(np.float64), rate[x.row, x.col]
    else:
        values = np.asarray(x, dtype=np.float64).ravel()
        at_counts = rate.ravel()
    positive = values > 0
    log_term = values[positive] * np.log(values[positive] / np.maximum(at_counts[positive], 1e-300))
    return float(2.0 * (log_term.sum() - values.sum() + rate.sum()))


class DiskRows:
    """Counts kept on disk, read a block of rows at a time.

    ``data`` is anything that slices by rows into a NumPy array or a scipy.sparse matrix
    without reading the rest: the ``X`` of an AnnData opened with ``backed="r"``, an
    ``anndata.io.sparse_dataset``, an h5py or zarr dataset, or an h5py or zarr group
    holding a CSR matrix as AnnData writes one (``h5py.File("x.h5ad")["X"]``). A mini-batch fit
    (``PNMF(batch_size=...)``) given such counts reads only the rows of its current batch;
    ``PNMF.fit`` wraps AnnData, h5py and zarr datasets in this class by itself. Every block
    read is checked as in-memory counts are (finite, non-negative). ``rows``: a slice of
    rows that stands for the whole (a process's share of a distributed fit).
    """

    def __init__(self, data, block_rows: int = 10_000, rows: slice | None = None):
        if hasattr(data, "keys") and not hasattr(data, "shape"):  # a group of arrays
            data = _CSRGroup.of_group(data)
        if getattr(data, "format", None) == "csc":
            raise ValueError(
                "the counts on disk are stored by columns (CSC): every read of a few rows reads all of them. "
                "Read them into memory (adata.to_memory()), or write them by rows once "
                "(adata.X = adata.X.tocsr(); adata.write_h5ad(path), in memory)"
            )
        whole = tuple(int(s) for s in data.shape)
        if len(whole) != 2 or min(whole) < 1:
            raise ValueError(f"counts on disk must be a non-empty 2-d matrix; got shape {whole}")
        first, stop, _ = (rows or slice(None)).indices(whole[0])
        self.first, self.shape = first, (max(stop - first, 0), whole[1])
        self.data = _CSRGroup.of(data, whole) or data
        self.block_rows = block_rows
        self.sparse = sp.issparse(self[0:1])

    def __getitem__(self, rows) -> np.ndarray | sp.csr_matrix:
        """The rows ``rows`` (a slice, or sorted row indices) read from disk and checked.

        Sorted indices that form runs of consecutive rows are read a run at a time (a slice
        each): reading rows one by one costs a read per row.
        """
        from sklearn.utils.validation import check_array, check_non_negative

        if isinstance(rows, slice):  # within this share of the rows, then placed in the whole
            start, stop, step = rows.indices(self.shape[0])
            rows = slice(start + self.first, stop + self.first, step)
        else:
            rows = np.asarray(rows) + self.first
        if isinstance(self.data, _CSRGroup):
            block = self.data.take(np.arange(rows.start, rows.stop, rows.step) if isinstance(rows, slice) else rows)
        elif isinstance(self.data, (DiskRows, _Columns)):  # pnmf's own readers take scattered rows at once
            block = _matrix(self.data[rows])
        elif isinstance(rows, slice) or len(rows) == 0 or len(_runs(rows)[0]) == len(rows):
            block = _matrix(self.data[rows])
        else:
            runs = [_matrix(self.data[int(a) : int(b)]) for a, b in zip(*_runs(rows))]
            block = sp.vstack(runs, format="csr") if sp.issparse(runs[0]) else np.concatenate(runs)
        block = check_array(block, accept_sparse="csr", dtype=(np.float64, np.float32), ensure_min_samples=0)
        check_non_negative(block, "PNMF (counts must be non-negative)")
        return block

    def blocks(self):
        """Every row, ``block_rows`` at a time."""
        for start in range(0, self.shape[0], self.block_rows):
            yield self[start : start + self.block_rows]

    def sum(self) -> float:
        """The sum of every count, read a block at a time."""
        return sum(float(block.sum()) for block in self.blocks())


class _CSRGroup:
    """Rows of a CSR matrix stored as a group of arrays (``data``, ``indices``, ``indptr``:
    an .h5ad's X, HDF5 or zarr), each run of consecutive rows in two reads.

    AnnData's backed matrices check their own package version on every read (5 ms a call
    here, anndata 0.12): too slow for a batch read as a few hundred runs of rows. The row
    pointers (8 bytes a row) are read once.
    """

    def __init__(self, group, shape: tuple[int, int]):
        self.shape = shape
        self.values, self.columns = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)

    @classmethod
    def of_group(cls, group) -> _CSRGroup:
        """The reader of an HDF5 or zarr group that holds a CSR matrix as AnnData writes one."""
        encoding = group.attrs.get("encoding-type")
        if encoding != "csr_matrix" or "shape" not in group.attrs:
            raise ValueError(
                f"counts on disk given as a group of arrays must be a CSR matrix as AnnData writes one "
                f"(encoding-type 'csr_matrix'); this group's encoding-type is {encoding!r}: pass the "
                "AnnData's X (anndata.read_h5ad(path, backed='r').X), or read the counts into memory"
            )
        return cls(group, tuple(int(s) for s in group.attrs["shape"]))

    @classmethod
    def of(cls, data, shape: tuple[int, int]) -> _CSRGroup | None:
        """The reader of ``data``'s group when it is a backed CSR matrix, else None."""
        group = getattr(data, "group", None)
        if getattr(data, "format", None) != "csr" or group is None:
            return None
        if not all(name in group for name in ("data", "indices", "indptr")):
            return None
        return cls(group, shape)

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows ``rows`` (sorted indices) as a CSR matrix."""
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.values.dtype)
        spans = [(self.indptr[a], self.indptr[b]) for a, b in zip(*_runs(rows))]
        values = np.concatenate([self.values[low:high] for low, high in spans])
        columns = np.concatenate([self.columns[low:high] for low, high in spans])
        pointers = np.r_[0, np.cumsum(self.indptr[rows + 1] - self.indptr[rows])]
        return sp.csr_matrix((values, columns, pointers), shape=(len(rows), self.shape[1]))


def _runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of consecutive values in sorted, non-empty ``rows``: their first values and
    their ends (exclusive)."""
    last = np.flatnonzero(np.diff(rows) != 1)
    return rows[np.r_[0, last + 1]], rows[np.r_[last, len(rows) - 1]] + 1


def in_memory(x):
    """x itself, or all its rows read into memory when it is on disk (see :func:`on_disk`)."""
    return x[0 : x.shape[0]] if on_disk(x) else x


def share(x, rows: slice, batched: bool):
    """A process's rows of x: left on disk for a fit that reads them in batches (``batched``,
    counts on disk), else read now."""
    return DiskRows(x, rows=rows) if batched and on_disk(x) else x[rows]


class _Columns:
    """Rows of counts on disk (a :class:`DiskRows`) with only some of their columns, in a given order."""

    def __init__(self, data: DiskRows, columns: np.ndarray):
        self.data, self.columns = data, columns
        self.shape = (data.shape[0], len(columns))

    def __getitem__(self, rows):
        return self.data[rows][:, self.columns]


def pick_columns(x, columns: np.ndarray):
    """The columns ``columns`` of x, in that order: a copy in memory, or, for counts on disk,
    a reader that picks them from each block of rows it reads. Counts on disk stored by
    columns (CSC), whose rows are not read alone, are read whole first."""
    if getattr(x, "format", None) == "csc":
        x = in_memory(x)
    if not on_disk(x):
        return x[:, columns]
    return DiskRows(_Columns(x if isinstance(x, DiskRows) else DiskRows(x), columns))


def _matrix(block) -> np.ndarray | sp.csr_matrix:
    return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)


def on_disk(x) -> bool:
    """Whether x is a dataset of AnnData (backed), h5py or zarr, which ``DiskRows`` reads by rows."""
    if type(x).__name__ == "AnnData":  # the container, not its counts (PNMF names the mistake)
        return False
    return isinstance(x, DiskRows) or type(x).__module__.split(".")[0] in ("anndata", "h5py", "zarr")


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is another (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool | None:
    """Hand the memory that arrays have freed, but that C's allocator still keeps, back to
    the system; whether any went back (None where that cannot be done: not glibc).

    Called between the passes of a fit of counts on disk, so that the next pass's arrays
    (the per-row results, every row's factors) do not come on top of the last batch's
    buffers. glibc keeps freed blocks below its (adaptive) mmap threshold for reuse, and
    torch's CPU tensors were kept so: a torch fit of a 1,000,000 x 5,000 .h5ad at 1%
    (batches of 20,000 rows, ~1e6 non-zeros each) peaked at 0.66 GB without it, 0.60 GB
    with it (the factors of every row take 0.037 GB).
    """
    trim = _malloc_trim()
    return None if trim is None else bool(trim(0))
