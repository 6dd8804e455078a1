"""Counts on disk: mini-batch fits read one batch of rows at a time and equal in-memory fits."""

from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import pnmf
from pnmf import PNMF, data, make_counts
from pnmf.data import DiskRows, release_freed_memory

ad = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")

PARAMS = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, batch_size=100, max_iter=60)


class CountingRows:
    """A matrix that records how many rows each read takes."""

    def __init__(self, x):
        self.x, self.shape, self.reads, self.by_index = x, x.shape, [], 0

    def __getitem__(self, rows):
        self.reads.append(len(range(*rows.indices(self.shape[0]))) if isinstance(rows, slice) else len(rows))
        self.by_index += not isinstance(rows, slice)  # a read of scattered rows, one by one on disk
        return self.x[rows]


@pytest.fixture(scope="module")
def counts():
    x, _, _ = make_counts(1000, 40, 4, random_state=3)
    return sp.csr_matrix(x.astype(np.float32))


def test_a_backed_anndata_fit_reads_batches_and_equals_the_in_memory_fit(tmp_path, counts):
    path = tmp_path / "counts.h5ad"
    ad.AnnData(counts).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    model = pnmf.fit_anndata(backed, 4, **PARAMS)
    memory = PNMF(4, **PARAMS).fit(counts)
    np.testing.assert_array_equal(model.loadings_, memory.loadings_)
    assert model.elbo_ == memory.elbo_
    np.testing.assert_allclose(backed.obsm["X_pnmf"], np.exp(memory.mean_ + 0.5 * memory.var_))
    assert backed.isbacked and backed.varm["PNMF"].shape == (40, 4)


def test_a_fit_on_disk_never_reads_more_than_a_batch_or_block_of_rows(counts):
    source = CountingRows(counts)
    model = PNMF(4, **PARAMS).fit(DiskRows(source, block_rows=64))
    assert max(source.reads) <= 100 and len(source.reads) > 60
    memory = PNMF(4, **PARAMS).fit(counts)
    np.testing.assert_allclose(model.loadings_, memory.loadings_, rtol=1e-6)


def test_dense_h5py_counts_fit_in_batches(tmp_path, counts):
    with h5py.File(tmp_path / "dense.h5", "w") as handle:
        handle["x"] = counts.toarray()
    with h5py.File(tmp_path / "dense.h5", "r") as handle:
        model = PNMF(4, **PARAMS).fit(handle["x"])
    memory = PNMF(4, **PARAMS).fit(counts.toarray())
    np.testing.assert_array_equal(model.loadings_, memory.loadings_)


def test_bad_counts_on_disk_are_named_when_read(tmp_path, counts):
    bad = counts.toarray()
    bad[500, 3] = -1.0
    with h5py.File(tmp_path / "bad.h5", "w") as handle:
        handle["x"] = bad
    with h5py.File(tmp_path / "bad.h5", "r") as handle:
        with pytest.raises(ValueError, match="non-negative"):
            PNMF(4, **PARAMS).fit(handle["x"])
        with pytest.raises(ValueError, match="batch_size"):
            PNMF(4).fit(handle["x"])


def test_non_integer_values_on_disk_warn(tmp_path, counts):
    with h5py.File(tmp_path / "scaled.h5", "w") as handle:
        handle["x"] = counts.toarray() / 3.0
    with h5py.File(tmp_path / "scaled.h5", "r") as handle, pytest.warns(UserWarning, match="non-integer"):
        PNMF(4, **{**PARAMS, "max_iter": 2}).fit(handle["x"])


def test_a_backed_anndata_without_batches_is_read_whole(tmp_path, counts):
    path = tmp_path / "counts.h5ad"
    ad.AnnData(counts).write_h5ad(path)
    params = {k: v for k, v in PARAMS.items() if k != "batch_size"}
    model = pnmf.fit_anndata(ad.read_h5ad(path, backed="r"), 4, **params)
    np.testing.assert_array_equal(model.loadings_, PNMF(4, **params).fit(counts).loadings_)


def test_batches_and_size_factors_on_disk_equal_the_in_memory_fit(tmp_path, counts):
    """The totals and batch sums are read a block at a time; the fit is the in-memory one."""
    labels = np.array(["x", "y"])[np.arange(counts.shape[0]) % 2]
    source = CountingRows(counts)
    params = dict(PARAMS, size_factors="total")
    model = PNMF(4, **params).fit(DiskRows(source, block_rows=64), batch=labels)
    assert max(source.reads) <= 100
    memory = PNMF(4, **params).fit(counts, batch=labels)
    np.testing.assert_allclose(model.loadings_, memory.loadings_, rtol=1e-6)
    np.testing.assert_allclose(model.batch_effects_, memory.batch_effects_, rtol=1e-6)
    np.testing.assert_allclose(model.size_factors_, memory.size_factors_, rtol=1e-12)


def test_transform_and_score_of_counts_on_disk_read_blocks_and_equal_in_memory(tmp_path, counts):
    """Each row's q(F) depends on its row alone: with a fixed number of steps (tol=0) the
    blocks give the in-memory factors; seen batches and size factors go with their rows."""
    labels = np.array(["x", "y"])[np.arange(counts.shape[0]) % 2]
    params = dict(PARAMS, dtype="float64", size_factors="total", tol=0, max_iter=40)
    model = PNMF(4, **params).fit(counts, batch=labels)
    source = CountingRows(counts)
    on_disk = model.transform(DiskRows(source, block_rows=64), batch=labels)
    assert max(source.reads) <= 100 and len(source.reads) >= 10
    np.testing.assert_allclose(on_disk, model.transform(counts, batch=labels), rtol=1e-10)
    path = tmp_path / "counts.h5ad"
    ad.AnnData(counts).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    score = model.score(backed.X, batch=labels)
    assert score == pytest.approx(model.score(counts, batch=labels), rel=1e-10)
    with pytest.raises(ValueError, match="batch 'z' was not seen in fit.*into memory"):
        model.transform(backed.X, batch=np.where(labels == "x", "x", "z"))


def test_a_pass_permutes_blocks_of_rows_and_single_rows_for_small_batches():
    from pnmf.svi import block_permutation

    order = block_permutation(np.random.default_rng(3), 1000, 7)
    assert sorted(order) == list(range(1000))
    blocks = order.reshape(-1, 1)[np.r_[0, np.flatnonzero(np.diff(order) != 1) + 1]].ravel()
    assert np.all(blocks % 7 == 0) and len(blocks) == 143  # whole blocks, the last of 6 rows
    assert not np.all(np.diff(blocks) > 0)  # in random order
    single = block_permutation(np.random.default_rng(3), 1000, 1)
    np.testing.assert_array_equal(single, np.random.default_rng(3).permutation(1000))


def test_large_batches_on_disk_are_read_a_run_of_rows_at_a_time():
    # Batches of 2,560 of 20,000 rows: blocks of 10 rows, so a batch is read in at most 257
    # runs (random single rows would make about 2,200).
    x = sp.csr_matrix(make_counts(20_000, 12, 2, random_state=0)[0])
    source = CountingRows(x)
    params = dict(PARAMS, batch_size=2560, max_iter=3, tol=0)
    model = PNMF(2, **params).fit(DiskRows(source, block_rows=20_000))
    # after a row, the 1,000 rows checked for integers and the sum, before the last pass's 8 batches
    steps = source.reads[3:-8]
    assert len(steps) <= 3 * 257 and sum(steps) == 3 * 2560 and source.by_index == 0
    np.testing.assert_array_equal(model.loadings_, PNMF(2, **params).fit(x).loadings_)


def test_rows_of_a_backed_csr_matrix_read_by_runs_equal_those_in_memory(tmp_path):
    x = sp.random(300, 20, density=0.05, format="lil", random_state=0, dtype=np.float32)
    x[40:60] = 0  # empty rows, a run of them
    x = sp.csr_matrix(x)
    x.data = np.ceil(x.data * 5)
    ad.AnnData(x).write_h5ad(tmp_path / "x.h5ad")
    rows = DiskRows(ad.read_h5ad(tmp_path / "x.h5ad", backed="r").X)
    picks = [np.arange(30, 70), np.array([0, 1, 2, 45, 46, 200, 299]), np.array([7]), np.array([], dtype=int)]
    for pick in picks:
        block = rows[pick]
        assert block.shape == (len(pick), 20) and (block != x[pick]).nnz == 0
    assert (rows[250:] != x[250:]).nnz == 0 and rows[5:5].shape == (0, 20)


def test_verbose_passes_over_rows_on_disk_show_one_bar_over_the_rows(counts, capsys):
    model = PNMF(4, **dict(PARAMS, max_iter=20, verbose=True)).fit(DiskRows(CountingRows(counts)))
    shown = capsys.readouterr().err
    assert "PNMF fit (mini-batch)" in shown and "PNMF factors of every row" in shown
    model.transform(DiskRows(CountingRows(counts)))  # 10 blocks of batch_size rows
    shown = capsys.readouterr().err
    assert "PNMF transform (rows on disk)" in shown and "PNMF transform:" not in shown
    assert "1000/1000" in shown


def test_an_h5py_group_holding_a_csr_matrix_fits_as_its_anndata_does(tmp_path, counts):
    path = tmp_path / "counts.h5ad"
    ad.AnnData(counts).write_h5ad(path)
    with h5py.File(path, "r") as handle:
        model = PNMF(4, **PARAMS).fit(handle["X"])
        np.testing.assert_array_equal(model.loadings_, PNMF(4, **PARAMS).fit(counts).loadings_)
        with pytest.raises(ValueError, match="encoding-type 'csr_matrix'.*'dataframe'"):
            PNMF(4, **PARAMS).fit(handle["obs"])


class OnlyRows(CountingRows):
    """Rows that raise when a read reaches outside [low, high)."""

    def __init__(self, x, low: int, high: int):
        super().__init__(x)
        self.low, self.high = low, high

    def __getitem__(self, rows):
        read = np.arange(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows)
        assert read.size == 0 or (read.min() >= self.low and read.max() < self.high), (read.min(), read.max())
        return super().__getitem__(rows)


def test_a_share_of_the_rows_on_disk_reads_only_its_own(counts):
    source = OnlyRows(counts, 300, 700)
    share = DiskRows(source, block_rows=150, rows=slice(300, 700))
    assert share.shape == (400, 40)
    assert (share[0:10] != counts[300:310]).nnz == 0 and (share[390:500] != counts[690:700]).nnz == 0
    assert (share[np.array([0, 1, 5, 399])] != counts[[300, 301, 305, 699]]).nnz == 0
    assert share.sum() == pytest.approx(counts[300:700].sum()) and max(source.reads) <= 150


def test_counts_on_disk_by_columns_are_refused_for_batches_and_read_whole_to_map(tmp_path, counts):
    path = tmp_path / "csc.h5ad"
    ad.AnnData(sp.csc_matrix(counts)).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"stored by columns \(CSC\).*to_memory"):
        PNMF(4, **PARAMS).fit(backed.X)  # each batch would read every count
    model = PNMF(4, **PARAMS).fit(counts)
    with pytest.raises(ValueError, match="stored by columns"):
        model.transform(backed.X)
    np.testing.assert_allclose(pnmf.transform_anndata(model, backed), model.transform(counts), rtol=1e-6)


def test_mapping_counts_on_disk_picks_the_models_genes_a_block_of_rows_at_a_time(counts):
    from pnmf.integrations import transform_named

    genes = np.array([f"g{j}" for j in range(40)])
    model = PNMF(4, **dict(PARAMS, dtype="float64", tol=0, max_iter=40)).fit(counts)  # blocks equal the whole
    expected = model.transform(counts)
    model.feature_names_in_ = genes.astype(object)
    order = np.random.default_rng(0).permutation(40)
    extra = sp.csr_matrix(np.ones((counts.shape[0], 3), dtype=np.float32))
    source = CountingRows(sp.hstack([counts[:, order], extra], format="csr"))  # shuffled, and 3 more genes
    factors, columns = transform_named(model, DiskRows(source), np.r_[genes[order], ["x", "y", "z"]])
    np.testing.assert_array_equal(genes[order][columns], genes)
    assert max(source.reads) <= 100  # a block of batch_size rows at a time, never the whole
    np.testing.assert_allclose(factors, expected, rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_per_row_results_are_in_the_fits_dtype_on_every_path(tmp_path, counts, dtype):
    # What grows with the rows (q(F), the factors) stays in the precision the fit computed
    # it in; the loadings are float64. A file written and read back keeps both.
    params = dict(PARAMS, dtype=dtype, max_iter=5, tol=0)
    full = PNMF(4, **dict(params, batch_size=None)).fit(counts)
    batched = PNMF(4, **params).fit(counts)
    on_disk = batched.transform(DiskRows(counts, block_rows=300))
    for model in (full, batched):
        assert model.mean_.dtype == model.var_.dtype == np.dtype(dtype)
        assert model.loadings_.dtype == np.float64
        assert model.transform(counts[:7]).dtype == np.dtype(dtype)
        assert all(a.dtype == np.dtype(dtype) for a in model.posterior(counts[:7]))
    assert on_disk.dtype == np.dtype(dtype)
    # written block by block in place; BLAS sums a block of rows as it sums them all, to rounding
    np.testing.assert_allclose(on_disk, batched.transform(counts), rtol=1e-5 if dtype == "float32" else 1e-12)
    restored = PNMF.load(batched.save(tmp_path / "model.npz"))
    assert restored.mean_.dtype == np.dtype(dtype) and restored.loadings_.dtype == np.float64
    np.testing.assert_array_equal(restored.mean_, batched.mean_)


# In a process of its own: glibc keeps every freed block (no trimming of its heap's top, blocks
# of 100 kB below the mmap threshold), as it keeps torch's freed buffers in a long fit.
KEEPS_FREED_BLOCKS = """
import ctypes
libc = ctypes.CDLL(None)
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD
from pnmf.benchmarks.speed import rss_gb
from pnmf.data import release_freed_memory

blocks = [b"x" * 100_000 for _ in range(1000)]
del blocks
kept = rss_gb()
released = release_freed_memory()
print(released, (kept - rss_gb()) * 1024)
"""


@pytest.mark.skipif(data._malloc_trim() is None, reason="malloc_trim is glibc's (Linux)")
def test_release_freed_memory_hands_blocks_the_allocator_kept_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", KEEPS_FREED_BLOCKS], capture_output=True, text=True, check=True)
    released, dropped_mb = out.stdout.split()
    assert released == "True"
    assert float(dropped_mb) > 90  # of the 100 MB freed


def test_release_freed_memory_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    data._malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is None
    finally:
        monkeypatch.undo()
        data._malloc_trim.cache_clear()


def test_a_fit_on_disk_releases_freed_memory_around_its_pass_over_every_row(tmp_path, counts, monkeypatch):
    calls = []
    monkeypatch.setattr("pnmf.estimator.release_freed_memory", lambda: calls.append("fit"))
    path = tmp_path / "counts.h5ad"
    ad.AnnData(counts).write_h5ad(path)
    model = PNMF(4, **PARAMS).fit(ad.read_h5ad(path, backed="r").X)
    assert calls == ["fit", "fit"]  # before the pass (the steps' buffers) and after it (the last batch's)
    model.transform(ad.read_h5ad(path, backed="r").X)
    assert len(calls) == 3
