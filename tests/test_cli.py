"""The ``pnmf`` command, driven as a user drives it: its arguments, exit code, stdout and stderr.

Most runs call ``pnmf.cli.main`` in this process, as a fresh one would run it (its own
stdout, stderr, working directory, environment and warning filters); a new Python process
for each would spend most of its time importing. Those that test the process itself (the
console script, ``python -m``, torchrun, pipes, huge pages) start one.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from pnmf import PNMF, consensus, select_n_components
from pnmf.data import make_batched_counts, make_counts

from .conftest import free_port

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")


def pnmf_command(*args, cwd: Path, module: bool = False, process: bool = False) -> subprocess.CompletedProcess:
    """``pnmf ARGS`` run in ``cwd``: in this process, or in a process of its own with ``process``
    (the console script installed beside this Python) or ``module`` (``python -m pnmf``)."""
    args = [str(a) for a in args]
    if process or module:
        script = Path(sys.executable).with_name("pnmf")
        prefix = [str(script)] if script.exists() and not module else [sys.executable, "-m", "pnmf"]
        return subprocess.run([*prefix, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    from pnmf import cli

    stdout, stderr, environ, here = io.StringIO(), io.StringIO(), dict(os.environ), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh process's filters, not this test run's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                code = cli.main(args)
            except SystemExit as done:  # --help, --version
                code = done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 240 x 50 counts as .h5ad (with a batch column and a counts layer), 10x, .npz and .csv."""
    folder = tmp_path_factory.mktemp("counts")
    data = make_batched_counts(240, 50, 3, random_state=0)
    x = data["X"]
    cells, genes = [f"cell{i}" for i in range(240)], [f"gene{j}" for j in range(50)]
    adata = anndata.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"donor": data["batch"]}, index=cells))
    adata.var_names = genes
    adata.layers["counts"] = adata.X.copy()
    adata.write_h5ad(folder / "cells.h5ad")
    sp.save_npz(folder / "counts.npz", sp.csr_matrix(x))
    pd.DataFrame(x, index=cells, columns=genes).to_csv(folder / "counts.csv")
    pd.DataFrame(x, index=cells, columns=genes).to_csv(folder / "counts.tsv", sep="\t")
    np.savetxt(folder / "bare.csv", x, delimiter=",", fmt="%d")  # numbers alone: no header, no names
    scipy.io.mmwrite(folder / "counts.mtx", sp.coo_matrix(x))
    # Genes x cells, as many published tables are (read with --transpose).
    pd.DataFrame(x.T, index=genes, columns=cells).to_csv(folder / "genes_by_cells.tsv.gz", sep="\t")
    scipy.io.mmwrite(folder / "genes_by_cells.mtx", sp.coo_matrix(x.T))
    sp.save_npz(folder / "genes_by_cells.npz", sp.csc_matrix(x.T))
    tenx = folder / "tenx"
    tenx.mkdir()
    scipy.io.mmwrite(tenx / "matrix.mtx", sp.coo_matrix(x.T))
    with open(tenx / "matrix.mtx", "rb") as raw, gzip.open(tenx / "matrix.mtx.gz", "wb") as packed:
        packed.write(raw.read())
    (tenx / "matrix.mtx").unlink()
    with gzip.open(tenx / "features.tsv.gz", "wt") as handle:
        handle.write("".join(f"ID{j}\t{g}\tGene Expression\n" for j, g in enumerate(genes)))
    with gzip.open(tenx / "barcodes.tsv.gz", "wt") as handle:
        handle.write("".join(f"{c}\n" for c in cells))
    write_10x_h5(folder / "tenx.h5", x, cells, genes)
    write_10x_mtx(folder / "geo", x, cells, genes, prefix="GSM1_")  # as GEO names a sample's files
    write_loom(folder / "cells.loom", x, cells, genes, {"donor": data["batch"]}, {"spliced": x, "unspliced": x // 2})
    return folder, data


def write_10x_mtx(folder: Path, x: np.ndarray, cells, genes, prefix: str = "") -> None:
    """Counts as Cell Ranger writes them to a directory (gzipped), the names prefixed."""
    folder.mkdir(exist_ok=True)
    with gzip.open(folder / f"{prefix}matrix.mtx.gz", "wb") as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(x.T))
    with gzip.open(folder / f"{prefix}features.tsv.gz", "wt") as handle:
        handle.write("".join(f"ID{j}\t{g}\tGene Expression\n" for j, g in enumerate(genes)))
    with gzip.open(folder / f"{prefix}barcodes.tsv.gz", "wt") as handle:
        handle.write("".join(f"{c}\n" for c in cells))


def write_10x_h5(path: Path, x: np.ndarray, cells, genes, antibodies: np.ndarray | None = None) -> None:
    """Counts as Cell Ranger 3 writes them: features x cells by columns, names as bytes."""
    import h5py

    types = ["Gene Expression"] * len(genes)
    if antibodies is not None:  # another modality's features, after the genes
        x = np.hstack([x, antibodies])
        genes, types = [*genes, *(f"CD{j}" for j in range(antibodies.shape[1]))], types + ["Antibody Capture"] * 2
    stored = sp.csc_matrix(x.T)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        group["barcodes"] = np.array(cells, dtype="S")
        group["data"], group["indices"], group["indptr"] = stored.data.astype(np.int32), stored.indices, stored.indptr
        group["shape"] = np.array(stored.shape, dtype=np.int32)
        features = group.create_group("features")
        features["name"] = np.array(genes, dtype="S")
        features["id"] = np.array([f"ENSG{j}" for j in range(len(genes))], dtype="S")
        features["feature_type"] = np.array(types, dtype="S")


def write_loom(path: Path, x: np.ndarray, cells, genes, cell_attributes: dict, layers: dict) -> None:
    """Counts as loompy writes a loom file: genes x cells in chunks, names as variable-length
    strings (the genes) and bytes (the cells), layers of the same shape."""
    import h5py

    text = h5py.string_dtype()
    with h5py.File(path, "w") as handle:
        handle.create_dataset("matrix", data=x.T.astype(np.float32), chunks=(16, 16))
        handle.create_group("attrs")["LOOM_SPEC_VERSION"] = "3.0.0"
        handle.create_group("row_attrs")["Gene"] = np.array(genes, dtype=object).astype(text)
        columns = handle.create_group("col_attrs")
        columns["CellID"] = np.array(cells, dtype="S")
        for name, values in cell_attributes.items():
            columns[name] = np.array(values, dtype="S")
        stored = handle.create_group("layers")
        for name, values in layers.items():
            stored.create_dataset(name, data=values.T.astype(np.float32), chunks=(16, 16))
        handle.create_group("row_graphs"), handle.create_group("col_graphs")


def read_factors(path: Path) -> np.ndarray:
    return pd.read_csv(path, index_col=0).to_numpy()


FORMATS = [
    *("counts.csv", "counts.tsv", "bare.csv", "counts.npz", "counts.mtx", "tenx", "tenx.h5", "cells.h5ad"),
    *("geo", "geo/GSM1_matrix.mtx.gz"),  # a 10x directory of GEO's names, and its .mtx alone
    "cells.loom",
]
TRANSPOSED = ["genes_by_cells.tsv.gz", "genes_by_cells.mtx", "genes_by_cells.npz"]  # read with --transpose
UNNAMED = ("counts.npz", "bare.csv", "counts.mtx", "genes_by_cells.mtx", "genes_by_cells.npz")


@pytest.mark.parametrize("name", FORMATS + TRANSPOSED)
def test_fit_reads_every_format_and_writes_what_the_api_computes(files, name, tmp_path):
    folder, data = files
    out = tmp_path / "out"
    transpose = ["--transpose"] if name in TRANSPOSED else []
    done = pnmf_command(
        "fit",
        folder / name,
        *transpose,
        "-k",
        3,
        "--seed",
        0,
        "--backend",
        "numpy",
        "--dtype",
        "float64",
        "-o",
        out,
        cwd=tmp_path,
        process=name == "cells.h5ad",  # the console script, once
    )
    assert done.returncode == 0, done.stderr
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64")
    expected = model.fit_transform(data["X"])
    summary = (
        f"fitted 3 components to 240 rows x 50 features on numpy (cpu): {model.n_iter_} iterations, converged, ELBO "
    )
    assert summary + f"{model.elbo_:.6g}" in done.stdout, done.stdout
    if name.endswith(".h5ad"):
        written = anndata.read_h5ad(out / "factors.h5ad")
        assert list(written.obs_names[:2]) == ["cell0", "cell1"] and written.varm["PNMF"].shape == (50, 3)
        factors = written.obsm["X_pnmf"]
    else:
        factors = read_factors(out / "factors.csv")
        rows = pd.read_csv(out / "factors.csv", index_col=0).index
        assert list(rows[:2]) == ([0, 1] if name in UNNAMED else ["cell0", "cell1"])
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    saved = PNMF.load(out / "model.npz")
    np.testing.assert_allclose(saved.loadings_, model.loadings_, rtol=1e-8)
    programs = pd.read_csv(out / "programs.csv", dtype={"feature": str})
    names = [str(j) for j in range(50)] if name in UNNAMED else [f"gene{j}" for j in range(50)]
    assert list(programs.feature) == list(model.top_features(20, feature_names=names).feature)


def test_batches_layers_transform_info_and_python_m(files, tmp_path):
    folder, data = files
    fitted = pnmf_command(
        "fit", folder / "cells.h5ad", "--layer", "counts", "--batch-key", "donor", "--size-factors", "total",
        "-k", 3, "--factors", "csv", "-o", tmp_path / "fit", cwd=tmp_path, module=True,
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    model = PNMF.load(tmp_path / "fit" / "model.npz")
    assert list(model.batches_) == ["batch0", "batch1", "batch2"] and model.size_factors_ is not None
    mapped = pnmf_command(
        "transform", tmp_path / "fit" / "model.npz", folder / "cells.h5ad", "--batch-key", "donor",
        "--factors", "csv", "-o", tmp_path / "mapped", cwd=tmp_path,
    )  # fmt: skip
    assert mapped.returncode == 0, mapped.stderr
    np.testing.assert_allclose(
        read_factors(tmp_path / "mapped" / "factors.csv"), read_factors(tmp_path / "fit" / "factors.csv"), rtol=1e-4
    )
    info = pnmf_command("info", tmp_path / "fit" / "model.npz", cwd=tmp_path)
    assert info.returncode == 0 and "batches: batch0, batch1, batch2" in info.stdout
    s = model.size_factors_
    line = f"size factors: row totals over {model.reference_total_:.6g}, {s.min():.3g} to {s.max():.3g}"
    assert line in info.stdout and "prior scale" not in info.stdout
    unlabelled = pnmf_command(
        "transform", tmp_path / "fit" / "model.npz", folder / "cells.h5ad", "-o", tmp_path / "x", cwd=tmp_path
    )
    assert unlabelled.returncode == 2 and "pass --batch-key, the column with each row's batch" in unlabelled.stderr
    swapped = pnmf_command(
        "transform", folder / "cells.h5ad", tmp_path / "fit" / "model.npz", "-o", tmp_path / "x", cwd=tmp_path
    )
    assert swapped.returncode == 2 and "error: the model comes first: pnmf transform " in swapped.stderr
    counts = pnmf_command("info", folder / "cells.h5ad", cwd=tmp_path)
    assert counts.returncode == 2 and "holds counts, not a model" in counts.stderr
    assert not (tmp_path / "x").exists()
    assert "most specific features" in info.stdout and "component 0: gene" in info.stdout


def test_a_matrix_is_fitted_in_the_layout_that_its_share_of_non_zeros_makes_faster(tmp_path):
    x, _, _ = make_counts(600, 500, 4, random_state=0)  # 300,000 entries: large enough to move
    thinned = np.random.default_rng(0).binomial(x.astype(np.int64), 0.02).astype(np.float64)
    dense_share, thin_share = np.mean(x > 0), np.mean(thinned > 0)
    assert dense_share >= 0.5 and 0 < thin_share <= 0.2
    pd.DataFrame(thinned).to_csv(tmp_path / "thin.csv")  # a table: read dense
    scipy.io.mmwrite(tmp_path / "full.mtx", sp.coo_matrix(x))  # Matrix Market: read sparse
    common = ("-k", 4, "--max-iter", 20, "--tol", 0, "--backend", "numpy", "--seed", 0)
    for name, counts, share, layout in (
        ("thin.csv", sp.csr_matrix(thinned), thin_share, "sparse"),
        ("full.mtx", x, dense_share, "dense"),
    ):
        done = pnmf_command("fit", name, *common, "-o", tmp_path / layout, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"{name} is {share:.1%} non-zero: held as a {layout} matrix" in done.stdout
        fitted = PNMF.load(tmp_path / layout / "model.npz").loadings_
        params = dict(n_components=4, max_iter=20, tol=0, backend="numpy", random_state=0)
        np.testing.assert_array_equal(fitted, PNMF(**params).fit(counts).loadings_)
        # The layouts round differently, so the equality above tells which one was fitted.
        other = counts.toarray() if sp.issparse(counts) else sp.csr_matrix(counts)
        assert not np.array_equal(fitted, PNMF(**params).fit(other).loadings_)
    mapped = pnmf_command("transform", tmp_path / "dense" / "model.npz", "thin.csv", "-o", "m", cwd=tmp_path)
    assert mapped.returncode == 0 and "thin.csv is" in mapped.stdout and "held as a sparse matrix" in mapped.stdout
    batched = pnmf_command("fit", "thin.csv", *common, "--batch-size", 200, "-o", "b", cwd=tmp_path)
    assert batched.returncode == 0 and "held as a sparse matrix" in batched.stdout  # read whole: a table
    (tmp_path / "few.txt").write_text("\n".join(map(str, range(50))))
    small = pnmf_command("fit", "thin.csv", *common, "--features", "few.txt", "-o", "s", cwd=tmp_path)
    assert small.returncode == 0 and "held as" not in small.stdout  # 600 x 50 entries: too few to move


def test_a_10x_matrix_with_antibodies_keeps_its_genes(files, tmp_path):
    folder, data = files
    cells, genes = [f"cell{i}" for i in range(240)], [f"gene{j}" for j in range(50)]
    antibodies = np.random.default_rng(0).poisson(30.0, (240, 2)).astype(float)
    write_10x_h5(tmp_path / "both.h5", data["X"], cells, genes, antibodies)
    common = ("-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "--factors", "csv")
    done = pnmf_command("fit", tmp_path / "both.h5", *common, "-o", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kept its 50 Gene Expression features of 52 (left out: Antibody Capture)" in done.stdout
    model = PNMF.load(tmp_path / "out" / "model.npz")
    assert list(model.feature_names_in_) == genes
    expected = PNMF(3, random_state=0, backend="numpy", dtype="float64").fit(data["X"])
    np.testing.assert_allclose(model.loadings_, expected.loadings_, rtol=1e-8)
    import h5py

    shutil.copy(folder / "tenx.h5", tmp_path / "v2.h5")
    with h5py.File(tmp_path / "v2.h5", "a") as handle:  # Cell Ranger 2: one group per genome, its gene names
        handle.move("matrix/features/name", "matrix/gene_names")
        handle.move("matrix/features/id", "matrix/genes")
        del handle["matrix/features"]
        handle.move("matrix", "GRCh38")
    done = pnmf_command("fit", tmp_path / "v2.h5", *common, "-o", tmp_path / "v2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(PNMF.load(tmp_path / "v2" / "model.npz").loadings_, expected.loadings_, rtol=1e-8)
    shutil.copy(folder / "tenx.h5", tmp_path / "other.h5")
    with h5py.File(tmp_path / "other.h5", "a") as handle:
        handle.move("matrix", "counts")
    done = pnmf_command("fit", tmp_path / "other.h5", *common, "-o", tmp_path / "bad", cwd=tmp_path)
    assert done.returncode == 2 and "not a 10x HDF5 matrix: no 'matrix' group (groups: counts)" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_normalised_x_warns_on_one_line_naming_the_files_layers(files, tmp_path):
    folder, data = files
    adata = anndata.read_h5ad(folder / "cells.h5ad")
    adata.X = sp.csr_matrix(np.log1p(data["X"]))
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    common = ("-k", 3, "--max-iter", 5, "--backend", "numpy", "--factors", "csv")
    done = pnmf_command("fit", tmp_path / "normalised.h5ad", *common, "-o", tmp_path / "x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "non-integer" in line]
    assert len(lines) == 1 and lines[0].startswith("pnmf: warning: X holds non-integer values"), done.stderr
    assert "its layers are counts" in lines[0] and "UserWarning" not in done.stderr
    layer = pnmf_command(
        "fit", tmp_path / "normalised.h5ad", "--layer", "counts", *common, "-o", tmp_path / "c", cwd=tmp_path
    )
    assert layer.returncode == 0 and "non-integer" not in layer.stderr, layer.stderr
    select = pnmf_command(
        "select-k", tmp_path / "normalised.h5ad", "--candidates", 2, 3, "-o", tmp_path / "k", cwd=tmp_path
    )  # thinning needs integer counts: an error, with the same pointer to the layers
    assert select.returncode == 2 and select.stderr.startswith("pnmf: error: thinning splits integer counts")
    assert "its layers are counts" in select.stderr and not (tmp_path / "k").exists()


def test_cells_without_a_batch_are_named_not_made_a_batch(files, tmp_path):
    folder, _ = files
    adata = anndata.read_h5ad(folder / "cells.h5ad")
    labelled = ~adata.obs_names.isin(["cell3", "cell9"])
    adata.obs["donor"] = pd.Series(adata.obs["donor"].to_numpy(dtype=object), index=adata.obs_names).where(labelled)
    adata.obs["donor"] = adata.obs["donor"].astype("category")  # as AnnData stores strings
    adata.write_h5ad(tmp_path / "unlabelled.h5ad")
    done = pnmf_command(
        "fit", tmp_path / "unlabelled.h5ad", "-k", 2, "--batch-key", "donor", "-o", tmp_path / "out", cwd=tmp_path
    )
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert "pnmf: error: obs['donor'] has 2 missing labels (first: row 'cell3')" in done.stderr


def test_select_k_and_consensus(files, tmp_path):
    folder, _ = files
    plt = pytest.importorskip("matplotlib.pyplot")
    open_figures = plt.get_fignums()
    select = pnmf_command(
        "select-k", folder / "counts.npz", "--candidates", 2, 3, 4, "--restarts", 2, "-o", tmp_path / "k", cwd=tmp_path
    )
    assert select.returncode == 0, select.stderr
    table = pd.read_csv(tmp_path / "k" / "select_k.csv")
    assert list(table.n_components) == [2, 3, 4] and "stability" in table
    assert f"chosen number of components: {table.n_components[table.heldout_deviance.idxmin()]}" in select.stdout
    assert (tmp_path / "k" / "select_k.png").stat().st_size > 1000
    assert [line.split(":")[1] for line in select.stderr.splitlines() if "held-out deviance" in line] == [
        " K=2",
        " K=3",
        " K=4",
    ]  # one line per candidate, as it comes
    cons = pnmf_command(
        "consensus", folder / "counts.csv", "-k", 3, "--restarts", 3, "-o", tmp_path / "c", cwd=tmp_path
    )
    assert cons.returncode == 0, cons.stderr
    assert "stability (silhouette)" in cons.stdout and (tmp_path / "c" / "programs.csv").exists()
    assert (tmp_path / "c" / "programs.png").stat().st_size > 1000 and "programs.png" in cons.stdout
    assert (tmp_path / "c" / "consensus.png").stat().st_size > 1000 and "consensus.png" in cons.stdout
    assert plt.get_fignums() == open_figures  # each figure closed once written: main may run again here
    stability = cons.stdout.split("stability (silhouette): ")[1][:5]
    info = pnmf_command("info", tmp_path / "c" / "model.npz", cwd=tmp_path).stdout
    assert f"consensus of 3 restarts: stability {stability}, outlier components dropped" in info
    # cNMF's local density threshold: the same restarts, their components kept or dropped by it.
    common = ("-k", 5, "--restarts", 3, "--seed", 0, "--backend", "numpy")
    dropped = {}
    for threshold in (0.02, 2.0):
        done = pnmf_command(
            "consensus",
            folder / "counts.npz",
            *common,
            "--density-threshold",
            threshold,
            "-o",
            tmp_path / "d",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        dropped[threshold] = int(done.stdout.split("outlier components dropped: ")[1].split()[0])
    assert dropped[2.0] == 0 < dropped[0.02]
    bad = pnmf_command(
        "consensus", folder / "counts.npz", *common, "--density-threshold", -1, "-o", tmp_path / "e", cwd=tmp_path
    )
    assert bad.returncode == 2 and "density_threshold=-1.0 must be in (0, 2]" in bad.stderr
    alone = pnmf_command(
        "select-k",
        folder / "counts.npz",
        "--candidates",
        2,
        "--density-threshold",
        0.3,
        "-o",
        tmp_path / "s",
        cwd=tmp_path,
    )  # one fit per K: no restarts for the threshold to filter
    assert alone.returncode == 2 and "give --restarts 2 or more" in alone.stderr and not (tmp_path / "s").exists()


def test_select_k_and_consensus_fit_batches_with_batch_key(files, tmp_path):
    folder, data = files
    common = ["--batch-key", "donor", "--backend", "numpy", "--dtype", "float64", "--seed", 0]
    select = pnmf_command(
        "select-k", folder / "cells.h5ad", "--candidates", 2, 3, *common, "-o", tmp_path / "k", cwd=tmp_path
    )
    assert select.returncode == 0, select.stderr
    x, params = sp.csr_matrix(data["X"]), dict(random_state=0, backend="numpy", dtype="float64")
    expected = select_n_components(x, [2, 3], batch=data["batch"], **params)
    table = pd.read_csv(tmp_path / "k" / "select_k.csv")
    np.testing.assert_allclose(table.heldout_deviance, expected["heldout_deviance"], rtol=1e-8)
    cons = pnmf_command(
        "consensus", folder / "cells.h5ad", "-k", 3, "--restarts", 3, *common, "-o", tmp_path / "c", cwd=tmp_path
    )
    assert cons.returncode == 0, cons.stderr
    model, expected = PNMF.load(tmp_path / "c" / "model.npz"), consensus(x, 3, 3, batch=data["batch"], **params)
    assert list(model.batches_) == list(expected.batches_) == sorted(set(data["batch"]))
    np.testing.assert_allclose(model.loadings_, expected.loadings_, rtol=1e-8)
    np.testing.assert_allclose(model.batch_effects_, expected.batch_effects_, rtol=1e-8)


BAD = [
    (["fit", "missing.h5ad", "-k", "3"], "missing.h5ad: no such file"),
    (["fit", "counts.csv"], "required: --n-components"),
    (["fit", "counts.csv", "-k", "0"], "n_components=0 must be >= 1"),
    (["fit", "counts.csv", "-k", "3", "--mode", "exact"], "invalid choice: 'exact'"),
    (["fit", "counts.csv", "-k", "3", "--prior-scale", "wide"], "--prior-scale 'wide'"),
    (["fit", "counts.csv", "-k", "3", "--layer", "raw"], "--layer applies to .h5ad"),
    (["fit", "cells.h5ad", "-k", "3", "--layer", "raw"], "no layer 'raw'"),
    (["fit", "cells.h5ad", "-k", "3", "--batch-key", "sample"], "--batch-key 'sample' is not a column"),
    (["fit", "counts.csv", "-k", "3", "--batch-key", "donor"], "--batch-key needs an .h5ad"),
    (["fit", "garbage.npz", "-k", "3"], "garbage.npz could not be read"),
    (["fit", "notes.txt2", "-k", "3"], "unknown format"),
    (["fit", "cells.h5ad", "-k", "3", "--transpose"], "--transpose applies to .npz, .mtx, .csv and .tsv"),
    (["fit", "negative.csv", "-k", "3"], "non-negative"),
    (["fit", "counts.csv", "-k", "3", "--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint"),
    (["fit", "cells.h5ad", "-k", "3", "--batch-size", "0"], "batch_size=0 must be >= 1"),
    (["transform", "model.npz", "counts.csv"], "model.npz: no such model file"),
    (["select-k", "counts.csv", "--candidates", "0", "2"], "--candidates must be positive"),
    (["consensus", "counts.csv", "-k", "2", "--restarts", "1"], "--restarts 1 must be at least 2"),
    (["consensus", "counts.csv", "-k", "2", "--top", "0"], "--top 0 must be at least 1"),
    (["select-k", "counts.csv", "--candidates", "2", "--top", "5"], "unrecognized arguments: --top 5"),
    ([], "required: COMMAND"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_files_and_arguments_are_one_line_exit_2_and_write_nothing(files, tmp_path, args, message):
    folder, data = files
    for name in ("counts.csv", "cells.h5ad"):
        shutil.copy(folder / name, tmp_path / name) if (folder / name).is_file() else None
    (tmp_path / "garbage.npz").write_bytes(b"not a matrix")
    (tmp_path / "notes.txt2").write_text("1,2\n")
    pd.DataFrame(-data["X"][:5]).to_csv(tmp_path / "negative.csv")
    before = set(os.listdir(tmp_path))
    done = pnmf_command(*args, *(["-o", "out"] if args else []), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pnmf: error: ") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert set(os.listdir(tmp_path)) == before  # nothing written


def test_transform_picks_the_model_features_by_name_and_refuses_counts_without_them(files, tmp_path):
    """Counts with the model's features in another order, or among others, give the factors
    of the counts in the model's order; counts lacking one, or naming one twice, are refused."""
    folder, data = files
    common = ["--backend", "numpy", "--dtype", "float64", "--factors", "csv"]
    fit = ["fit", folder / "counts.csv", "-k", 2, "--max-iter", 50, *common, "-o", tmp_path / "m"]
    assert pnmf_command(*fit, cwd=tmp_path).returncode == 0
    table = pd.read_csv(folder / "counts.csv", index_col=0)
    extra = pd.DataFrame(np.ones((len(table), 3)), index=table.index, columns=["x1", "x2", "x3"])
    variants = {
        "same": table,
        "shuffled": table[table.columns[::-1]],
        "more": pd.concat([extra, table[table.columns[::-1]]], axis=1),
        "fewer": table[table.columns[1:]],
    }
    factors = {}
    for name, counts in variants.items():
        counts.to_csv(tmp_path / f"{name}.csv")
        model = tmp_path / "m" / "model.npz"
        done = pnmf_command("transform", model, f"{name}.csv", *common, "-o", name, cwd=tmp_path)
        if name == "fewer":
            assert done.returncode == 2 and not (tmp_path / name).exists()
            assert "lacks 1 of the model's 50 features (first: 'gene0')" in done.stderr, done.stderr
        else:
            assert done.returncode == 0, done.stderr
            factors[name] = read_factors(tmp_path / name / "factors.csv")
    np.testing.assert_allclose(factors["shuffled"], factors["same"], rtol=1e-10)
    np.testing.assert_allclose(factors["more"], factors["same"], rtol=1e-10)
    with warnings.catch_warnings():  # AnnData's, on names that are not unique: the point here
        warnings.simplefilter("ignore")
        twice = anndata.AnnData(sp.csr_matrix(pd.concat([table, table[table.columns[:1]]], axis=1).to_numpy()))
        twice.var_names = [*table.columns, table.columns[0]]  # a .csv's reader would rename the second
        twice.write_h5ad(tmp_path / "twice.h5ad")
    done = pnmf_command("transform", model, "twice.h5ad", *common, "-o", "twice", cwd=tmp_path)
    assert done.returncode == 2 and "names feature 'gene0' more than once" in done.stderr, done.stderr


def test_a_loom_files_layers_cell_attributes_and_blocks_are_read(files, tmp_path, monkeypatch):
    # A .loom was "unknown format".
    import h5py

    from pnmf import cli

    folder, data = files
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "--max-iter", 30, "--tol", 0]
    run = ["fit", folder / "cells.loom", "--layer", "unspliced", "--batch-key", "donor", *common]
    done = pnmf_command(*run, "-o", tmp_path / "u", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64", max_iter=30, tol=0)
    model.fit(data["X"] // 2, batch=data["batch"])
    fitted = PNMF.load(tmp_path / "u" / "model.npz")
    np.testing.assert_allclose(fitted.loadings_, model.loadings_, rtol=1e-8)
    assert list(fitted.batches_) == ["batch0", "batch1", "batch2"] and fitted.feature_names_in_[1] == "gene1"
    missing = pnmf_command("fit", folder / "cells.loom", "--layer", "ambiguous", *common, "-o", "m", cwd=tmp_path)
    assert missing.returncode == 2 and "has no layer 'ambiguous' (layers: spliced, unspliced)" in missing.stderr
    with h5py.File(tmp_path / "other.loom", "w") as handle:
        handle["counts"] = np.ones((3, 2))
    other = pnmf_command("fit", tmp_path / "other.loom", *common, "-o", "o", cwd=tmp_path)
    assert other.returncode == 2 and "other.loom is not a loom file: no 2-D dataset 'matrix'" in other.stderr
    monkeypatch.setattr(cli, "LOOM_BLOCK", 50 * 7)  # 7 cells a block: 35 blocks, the last of 2
    counts = cli.read_counts(str(folder / "cells.loom"), "spliced")
    np.testing.assert_array_equal(counts.x.toarray(), data["X"])
    assert list(counts.obs_names[-2:]) == ["cell238", "cell239"] and list(counts.obs.donor[:1]) == ["batch0"]


def test_features_named_in_a_list_are_fitted_alone(files, tmp_path):
    folder, data = files
    listing = tmp_path / "genes.txt"
    listing.write_text("".join(f"gene{j}\n" for j in range(29, 4, -1)) + "\nnotagene\n")  # any order, a stranger
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "--features", listing]
    done = pnmf_command("fit", folder / "counts.csv", *common, "-o", "a", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kept the 25 of 50 features of" in done.stdout and "(1 of its names are not among them)" in done.stdout
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64").fit(data["X"][:, 5:30])
    fitted = PNMF.load(tmp_path / "a" / "model.npz")
    np.testing.assert_allclose(fitted.loadings_, model.loadings_, rtol=1e-8)
    assert list(fitted.feature_names_in_) == [f"gene{j}" for j in range(5, 30)]
    # Counts on disk read by batches of scattered rows, their columns picked from each.
    batches = ["--max-iter", 30, "--tol", 0, "--batch-size", 60]
    done = pnmf_command("fit", folder / "cells.h5ad", *common, *batches, "-o", "b", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64", max_iter=30, tol=0, batch_size=60)
    model.fit(data["X"][:, 5:30])
    np.testing.assert_allclose(PNMF.load(tmp_path / "b" / "model.npz").loadings_, model.loadings_, rtol=1e-8)
    for counts, error in [
        ("counts.npz", "--features picks features by name, and"),
        ("cells.h5ad", "none of the 1 names in"),
    ]:
        if counts == "cells.h5ad":
            listing.write_text("GENE5\n")
        refused = pnmf_command("fit", folder / counts, *common, "-o", "c", cwd=tmp_path)
        assert refused.returncode == 2 and error in refused.stderr and not (tmp_path / "c").exists(), refused.stderr


def test_values_that_are_not_counts_in_a_layer_draw_a_warning_that_names_x_and_the_other_layers(files, tmp_path):
    _, data = files
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--max-iter", 20, "-q"]
    adata = anndata.AnnData(data["X"], layers={"log": np.log1p(data["X"]), "spliced": data["X"]})
    adata.write_h5ad(tmp_path / "swapped.h5ad")
    wrong = pnmf_command("fit", "swapped.h5ad", *common, "--layer", "log", "-o", "z", cwd=tmp_path)
    hint = "swapped.h5ad's layer log was read; without --layer its X is read; its other layers are spliced"
    assert "X holds non-integer values" in wrong.stderr and hint in wrong.stderr, wrong.stderr
    right = pnmf_command("fit", "swapped.h5ad", *common, "--layer", "spliced", "-o", "y", cwd=tmp_path)
    assert right.returncode == 0 and "non-integer" not in right.stderr, right.stderr


def test_the_counts_in_an_anndatas_raw_are_read_as_layer_raw_x(files, tmp_path):
    # CELLxGENE's files and many others keep the counts in .raw.X, X normalised and of fewer
    # genes: the warning pointed to .raw.X, which the command could not read.
    pytest.importorskip("zarr")
    folder, data = files
    adata = anndata.read_h5ad(folder / "cells.h5ad")
    adata.raw = adata
    adata = adata[:, :30].copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "normalised.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notice of the zarr format it writes
        adata.write_zarr(tmp_path / "normalised.zarr")
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "-q"]
    plain = pnmf_command("fit", "normalised.h5ad", *common, "-o", "x", cwd=tmp_path)
    assert "X holds non-integer values" in plain.stderr and "its layers are counts, raw.X" in plain.stderr
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64").fit(data["X"])
    for name, extra in [("normalised.h5ad", []), ("normalised.zarr", ["--batch-size", 60, "--max-iter", 30])]:
        done = pnmf_command("fit", name, *common, "--layer", "raw.X", *extra, "-o", name + ".out", cwd=tmp_path)
        assert done.returncode == 0 and "non-integer" not in done.stderr, done.stderr
        assert "to 240 rows x 50 features" in done.stdout
        fitted = PNMF.load(tmp_path / (name + ".out") / "model.npz")
        assert list(fitted.feature_names_in_) == [f"gene{j}" for j in range(50)]
        if not extra:
            np.testing.assert_allclose(fitted.loadings_, model.loadings_, rtol=1e-8)
    batched = PNMF(3, random_state=0, backend="numpy", dtype="float64", batch_size=60, max_iter=30)
    np.testing.assert_allclose(fitted.loadings_, batched.fit(data["X"]).loadings_, rtol=1e-8)
    mapped = pnmf_command(
        "transform", "normalised.h5ad.out/model.npz", "normalised.h5ad", "--layer", "raw.X", "-o", "t", cwd=tmp_path
    )
    assert mapped.returncode == 0, mapped.stderr
    np.testing.assert_allclose(
        anndata.read_h5ad(tmp_path / "t" / "factors.h5ad").obsm["X_pnmf"], model.transform(data["X"]), rtol=1e-5
    )


def test_fit_in_batches_reads_the_h5ad_from_disk(files, tmp_path, monkeypatch):
    from pnmf import cli
    from pnmf.data import on_disk

    folder, data = files
    seen = []
    fit = PNMF.fit
    monkeypatch.setattr(PNMF, "fit", lambda self, X, **kw: seen.append(on_disk(X)) or fit(self, X, **kw))
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "--max-iter", 30, "--tol", 0]
    assert cli.main([str(a) for a in ["fit", folder / "cells.h5ad", *common, "--batch-size", 60, "-o", tmp_path]]) == 0
    assert seen == [True]  # the counts handed to the fit were still on disk
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64", max_iter=30, tol=0, batch_size=60)
    model.fit(data["X"])
    np.testing.assert_allclose(PNMF.load(tmp_path / "model.npz").loadings_, model.loadings_, rtol=1e-8)
    written = anndata.read_h5ad(tmp_path / "factors.h5ad").obsm["X_pnmf"]
    np.testing.assert_allclose(written, np.exp(model.mean_ + model.var_ / 2), rtol=1e-8)


@pytest.mark.parametrize("stored", ["csr", "csc", "dense"])
@pytest.mark.parametrize("container", ["h5ad", "zarr"])
def test_an_anndatas_x_or_layer_is_read_by_rows_from_disk(files, tmp_path, monkeypatch, capsys, stored, container):
    # A .zarr was "not a 10x directory: no matrix.mtx in it"; and a layer of an .h5ad was read
    # whole (AnnData's backed="r" reads every layer into memory), even for --batch-size.
    from pnmf import cli
    from pnmf.data import on_disk

    if container == "zarr":
        pytest.importorskip("zarr")
    folder, data = files
    adata = anndata.read_h5ad(folder / "cells.h5ad")
    counts = {"csr": adata.X, "csc": sp.csc_matrix(adata.X), "dense": adata.X.toarray()}[stored]
    adata.X, adata.layers["counts"] = counts, counts
    path = tmp_path / f"cells.{container}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notice of the zarr format it writes
        adata.write_h5ad(path) if container == "h5ad" else adata.write_zarr(path)
    seen = []
    fit = PNMF.fit
    monkeypatch.setattr(PNMF, "fit", lambda self, X, **kw: seen.append(on_disk(X)) or fit(self, X, **kw))
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "--max-iter", 30, "--tol", 0]
    run = [str(a) for a in ["fit", path, *common, "--batch-key", "donor", "--batch-size", 60]]
    assert cli.main([*run, "-o", str(tmp_path / "x")]) == 0
    assert cli.main([*run, "--layer", "counts", "-o", str(tmp_path / "layer")]) == 0
    assert seen == [stored != "csc"] * 2  # read by batches, unless stored by columns (then read whole)
    said = capsys.readouterr().out
    assert ("is stored by columns (CSC): read whole" in said) == (stored == "csc")
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64", max_iter=30, tol=0, batch_size=60)
    model.fit(data["X"], batch=data["batch"].astype(str))
    for out in ("x", "layer"):
        np.testing.assert_allclose(PNMF.load(tmp_path / out / "model.npz").loadings_, model.loadings_, rtol=1e-8)
        written = anndata.read_h5ad(tmp_path / out / "factors.h5ad")  # as the input: AnnData
        assert list(written.obs_names) == list(adata.obs_names)
    done = pnmf_command("fit", path, "-k", 3, "--layer", "raw", "-o", tmp_path / "r", cwd=tmp_path)
    assert done.returncode == 2 and f"cells.{container} has no layer 'raw' (layers: counts)" in done.stderr


def test_transform_reads_the_h5ad_from_disk_unless_a_new_batch_needs_its_rows_whole(files, tmp_path, monkeypatch):
    from pnmf import cli
    from pnmf.data import on_disk

    folder, data = files
    common = ["--backend", "numpy", "--dtype", "float64", "--factors", "csv"]
    fitted = ["fit", folder / "cells.h5ad", "-k", 3, "--seed", 0, "--batch-key", "donor", *common, "-o", tmp_path / "f"]
    assert cli.main([str(a) for a in fitted]) == 0
    model = PNMF.load(tmp_path / "f" / "model.npz")
    renamed = anndata.read_h5ad(folder / "cells.h5ad")
    renamed.obs["donor"] = renamed.obs["donor"].astype(str).str.replace("batch2", "new")
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    seen = []
    transform = PNMF.transform
    monkeypatch.setattr(PNMF, "transform", lambda self, X, **kw: seen.append(on_disk(X)) or transform(self, X, **kw))
    for name, out in ((folder / "cells.h5ad", "t"), (tmp_path / "renamed.h5ad", "r")):
        args = ["transform", tmp_path / "f" / "model.npz", name, "--batch-key", "donor", *common, "-o", tmp_path / out]
        assert cli.main([str(a) for a in args]) == 0
    assert seen == [True, False]  # from disk; then read whole to estimate the new batch's effects
    expected = transform(model, pd.DataFrame(data["X"], columns=model.feature_names_in_), batch=data["batch"])
    np.testing.assert_allclose(read_factors(tmp_path / "t" / "factors.csv"), expected, rtol=1e-6)
    mapped = read_factors(tmp_path / "r" / "factors.csv")
    assert np.isfinite(mapped).all() and mapped.shape == (240, 3)


def test_a_distributed_fit_reads_only_its_own_rows_of_the_h5ad(files, monkeypatch):
    from pnmf import cli, distributed
    from pnmf.data import on_disk

    folder, data = files
    rank_1_of_2 = distributed.Group()
    rank_1_of_2.rank, rank_1_of_2.size = 1, 2
    joined = []
    monkeypatch.setattr(
        distributed, "join", lambda backend, timeout=None, device=None: joined.append((backend, device)) or rank_1_of_2
    )
    counts = cli.read_counts(str(folder / "cells.h5ad"), backed=True)
    assert on_disk(counts.x)
    rows, suffix = cli._rows(counts, PNMF(3, backend="numpy", distributed=True))
    assert joined == [("numpy", "cpu")]  # the group of the fit's backend and device (torch.distributed for NumPy)
    assert suffix == ".rank-1-of-2" and list(rows.obs_names[:2]) == ["cell120", "cell121"]
    np.testing.assert_array_equal(rows.x.toarray(), data["X"][120:])
    assert list(rows.obs["donor"]) == list(data["batch"][120:])


def test_a_fit_resumes_from_its_checkpoint_and_refuses_another_fits(files, tmp_path):
    folder, data = files
    common = ["-k", 3, "--seed", 0, "--backend", "numpy", "--dtype", "float64", "--tol", 0]
    common += ["--checkpoint", tmp_path / "state.npz", "--checkpoint-every", 10]
    first = pnmf_command("fit", folder / "counts.csv", *common, "--max-iter", 20, "-o", "a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "20 iterations, as --tol 0 asks," in first.stdout and "resuming" not in first.stderr
    longer = pnmf_command("fit", folder / "counts.csv", *common, "--max-iter", 40, "-o", "b", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert f"pnmf: resuming from {tmp_path / 'state.npz'} at iteration 20" in longer.stderr
    model = PNMF(3, random_state=0, backend="numpy", dtype="float64", tol=0, max_iter=40).fit(data["X"])
    resumed = PNMF.load(tmp_path / "b" / "model.npz")
    assert resumed.n_iter_ == 40
    np.testing.assert_allclose(resumed.loadings_, model.loadings_, rtol=1e-8)
    pd.DataFrame(data["X"][::-1]).to_csv(tmp_path / "other.csv")  # the rows in another order
    other = pnmf_command("fit", "other.csv", *common, "--max-iter", 40, "-o", "c", cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "belongs to another fit (its data differ" in other.stderr and not (tmp_path / "c").exists()


def test_fit_runs_unchanged_under_torchrun(files, tmp_path):
    pytest.importorskip("torch.distributed")
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    folder, data = files
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [torchrun, "--nproc-per-node", "2", "--master-port", free_port(), "-m", "pnmf", "fit"]
    command += [folder / "counts.csv", "-k", 3, "--distributed", "--backend", "numpy", "--dtype", "float64"]
    command += ["--seed", 0, "-o", tmp_path / "d"]
    done = subprocess.run([str(a) for a in command], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    # The line of rank 0 counts every process's rows (it said "every process's rows").
    assert f"fitted 3 components to {len(data['X']):,} rows over 2 processes x" in done.stdout
    assert [p.name for p in (tmp_path / "d").glob("*.png")] == ["programs.png"]  # by rank 0 alone
    whole = PNMF(3, random_state=0, backend="numpy", dtype="float64").fit(data["X"])
    np.testing.assert_allclose(PNMF.load(tmp_path / "d" / "model.npz").loadings_, whole.loadings_, rtol=1e-8)
    info = pnmf_command("info", tmp_path / "d" / "model.npz", cwd=tmp_path).stdout
    half = (len(data["X"]) + 1) // 2
    assert f"rows: {half} in this file, one process's block of a distributed fit" in info
    halves = [read_factors(tmp_path / "d" / f"factors.rank-{r}-of-2.csv") for r in range(2)]
    # Each rank's transform stops on its own rows' ELBO: the same factors up to that tolerance.
    relative = np.abs(np.vstack(halves) / whole.transform(data["X"]) - 1)
    assert np.median(relative) < 1e-4 and relative.max() < 0.1


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed (pip install mlx)")
def test_fit_runs_unchanged_under_mlx_launch(files, tmp_path):
    # --distributed joined torch.distributed whatever the backend: under mlx.launch every
    # process found "no process group of size > 1".
    pytest.importorskip("mlx.core")
    port = free_port()
    folder, data = files
    command = ["mlx.launch", "-n", 2, "--backend", "ring", "--starting-port", port, "--", sys.executable, "-m", "pnmf"]
    command += ["fit", folder / "counts.csv", "-k", 3, "--distributed", "--backend", "mlx", "--device", "cpu"]
    command += ["--seed", 0, "-o", tmp_path / "d"]
    done = subprocess.run([str(a) for a in command], capture_output=True, text=True, timeout=300)
    # mlx.launch exits 0 even when a rank fails: the files must be there.
    halves = [tmp_path / "d" / f"factors.rank-{r}-of-2.csv" for r in range(2)]
    assert done.returncode == 0 and all(h.exists() for h in halves), done.stderr[-2000:]
    whole = PNMF(3, random_state=0, backend="mlx", device="cpu").fit(data["X"])
    model = PNMF.load(tmp_path / "d" / "model.npz")
    np.testing.assert_allclose(model.loadings_, whole.loadings_, rtol=2e-3, atol=1e-6)  # float32 sums
    assert sum(len(read_factors(h)) for h in halves) == len(data["X"])


def test_a_reader_that_leaves_stops_no_command_and_shows_no_traceback(files, tmp_path):
    # `pnmf fit ... | head -1` ended in a BrokenPipeError's traceback after the first line.
    folder, _ = files
    script = Path(sys.executable).with_name("pnmf")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "pnmf"]
    for command in (["fit", folder / "tenx", "-k", 3, "--max-iter", 20, "-o", tmp_path / "f"], ["info"]):
        if command == ["info"]:
            command.append(tmp_path / "f" / "model.npz")
        read, write = os.pipe()
        os.close(read)  # the reader has left before the first line
        try:
            done = subprocess.run([*prefix, *map(str, command)], stdout=write, stderr=subprocess.PIPE, timeout=300)
        finally:
            os.close(write)
        stderr = done.stderr.decode()
        assert done.returncode == 0 and "Traceback" not in stderr and "Exception" not in stderr, stderr
    figure = {"programs.png"} if importlib.util.find_spec("matplotlib") else set()
    assert {p.name for p in (tmp_path / "f").iterdir()} == {"model.npz", "programs.csv", "factors.csv", *figure}


@pytest.mark.parametrize("terminal", [True, False])
def test_a_progress_bar_is_shown_on_a_terminal_unless_quiet_and_elsewhere_if_asked(
    files, tmp_path, monkeypatch, capsys, terminal
):
    from pnmf import cli

    folder, _ = files
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    common = ["fit", str(folder / "counts.csv"), "-k", "3", "--max-iter", "20", "--backend", "numpy"]
    shown = {}
    for flags in ([], ["-q"], ["-v"]):
        assert cli.main([*common, *flags, "-o", str(tmp_path / "out")]) == 0
        shown[" ".join(flags)] = "PNMF fit" in capsys.readouterr().err
    assert shown == {"": terminal, "-q": False, "-v": True}
    # transform's own choice, not the one saved with the model (the last fit's: -v)
    common = ["transform", str(tmp_path / "out" / "model.npz"), str(folder / "counts.csv")]
    for flags in ([], ["-q"], ["-v"]):
        assert cli.main([*common, *flags, "-o", str(tmp_path / "t")]) == 0
        shown[" ".join(flags)] = "PNMF transform" in capsys.readouterr().err
    assert shown == {"": terminal, "-q": False, "-v": True}


def test_an_output_folder_that_cannot_be_made_is_one_line_not_a_traceback(files, tmp_path):
    # It was a traceback, and for a file in the way only after the fit.
    folder, _ = files
    (tmp_path / "file").write_text("")
    common = ["fit", folder / "counts.csv", "-k", 2, "--max-iter", 5, "--tol", 0]
    early = pnmf_command(*common, "-o", tmp_path / "file" / "out", cwd=tmp_path)
    assert early.returncode == 2 and early.stdout == ""  # refused before the fit
    assert f"cannot be made: {tmp_path / 'file'} is not a directory" in early.stderr
    if Path("/proc").is_dir():  # a folder no one can make a folder in (root may try: then at the end)
        late = pnmf_command(*common, "-o", "/proc/pnmf-out", cwd=tmp_path)
        assert late.returncode == 2 and "Traceback" not in late.stderr and "pnmf: error:" in late.stderr
        assert late.stderr.count("\n") == 1, late.stderr


def test_help_names_each_default_and_no_missing_one(tmp_path):
    done = pnmf_command("fit", "--help", cwd=tmp_path)
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert done.returncode == 0
    for default in ("(default: 2000)", "(default: 0)", "(default: 0.0001)", "(default: natural)"):
        assert default in text, default
    assert "(default: None)" not in text and "(default: False)" not in text


def test_the_prior_scale_is_fixed_at_1_unless_asked_as_help_says(files, tmp_path):
    folder, _ = files
    common = ("-k", 2, "--max-iter", 20, "--backend", "numpy", "--factors", "csv")
    help_text = " ".join(pnmf_command("fit", "--help", cwd=tmp_path).stdout.split())
    assert "a number (default: 1) or 'auto'" in help_text
    for option, expected in (((), 1.0), (("--prior-scale", "auto"), "auto"), (("--prior-scale", "0.5"), 0.5)):
        done = pnmf_command("fit", folder / "counts.npz", *common, *option, "-o", tmp_path / "f", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        model = PNMF.load(tmp_path / "f" / "model.npz")
        assert model.prior_scale == expected
        info = pnmf_command("info", tmp_path / "f" / "model.npz", cwd=tmp_path).stdout
        fitted = f"prior scale (fitted): {', '.join(f'{v:.3g}' for v in model.prior_scale_)}"
        assert (fitted in info) == (expected == "auto") and "size factors" not in info


def test_a_folder_of_several_10x_samples_names_them_and_each_mtx_is_read_with_its_names(files, tmp_path):
    folder, data = files
    x, cells, genes = data["X"], [f"cell{i}" for i in range(240)], [f"gene{j}" for j in range(50)]
    write_10x_mtx(tmp_path / "geo", x, cells, genes, prefix="GSM1_")
    write_10x_mtx(tmp_path / "geo", x[:100], cells[:100], genes, prefix="GSM2_")
    done = pnmf_command("fit", "geo", "-k", 2, "-o", "out", cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert "holds several 10x matrices (GSM1_matrix.mtx, GSM2_matrix.mtx)" in done.stderr, done.stderr
    done = pnmf_command("fit", "geo/GSM2_matrix.mtx.gz", "-k", 2, "--max-iter", 20, "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "read as a 10x matrix, with GSM2_features.tsv.gz" in done.stdout
    assert "to 100 rows x 50 features" in done.stdout
    assert list(pd.read_csv(tmp_path / "out" / "factors.csv", index_col=0).index[:2]) == ["cell0", "cell1"]
    done = pnmf_command("fit", "geo/GSM2_matrix.mtx.gz", "-T", "-k", 2, "-o", "out2", cwd=tmp_path)
    assert done.returncode == 2 and "says which way it is stored" in done.stderr


HUGE_PAGE_PROBE = """
import sys, torch
from pnmf import cli

fit = cli.cmd_fit

def probed(args):  # after the fit: are torch's large buffers page-aligned, as with huge pages?
    written = fit(args)
    print("huge pages:", all(torch.empty(2**20).data_ptr() % 4096 == 0 for _ in range(5)))
    return written

cli.cmd_fit = probed
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torch's huge pages are Linux's")
@pytest.mark.parametrize(
    "extra, setting, expected", [([], None, True), (["--batch-size", "100"], None, False), ([], "0", False)]
)
def test_a_fit_in_memory_puts_torchs_buffers_on_huge_pages(files, tmp_path, extra, setting, expected):
    """torch aligns its buffers of 2 MB and more to the page, not to 64 bytes, when
    THP_MEM_ALLOC_ENABLE is set at its first allocation: the command sets it for fits held in
    memory, before torch allocates anything, and keeps a value the user set."""
    pytest.importorskip("torch")
    folder, _ = files
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    args = [
        "fit",
        folder / "counts.npz",
        "-k",
        2,
        "--backend",
        "torch",
        "--max-iter",
        5,
        "-o",
        tmp_path / "out",
        *extra,
    ]
    done = subprocess.run(
        [sys.executable, "-c", HUGE_PAGE_PROBE, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"huge pages: {expected}" in done.stdout, done.stdout


def test_large_counts_in_float32_warn_in_the_commands_words(tmp_path):
    """Counts ~1000 (spectra, images): float32 cannot resolve tol; the command says which option does."""
    rng = np.random.default_rng(0)
    w, h = rng.gamma(0.3, 1.0, (300, 5)), rng.gamma(1.0, 1.0, (500, 5))
    pd.DataFrame(rng.poisson(1e3 * h @ w.T)).to_csv(tmp_path / "spectra.csv")
    done = pnmf_command("fit", "spectra.csv", "-k", 5, "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("pnmf: warning: float32 rounds")]
    assert len(warned) == 1 and "fit with --dtype float64" in warned[0], done.stderr
    done = pnmf_command(
        "fit", "spectra.csv", "-k", 5, "--dtype", "float64", "--max-iter", 50, "-o", "out64", cwd=tmp_path
    )
    assert done.returncode == 0 and "float32 rounds" not in done.stderr, done.stderr
    assert "raise --max-iter (or --tol)" in done.stderr


def test_empty_components_are_named_and_left_out_of_the_programs(files, tmp_path):
    folder, _ = files  # three programs and three batches' effects, fitted with twelve components
    done = pnmf_command("fit", folder / "counts.csv", "-k", 12, "-o", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "components empty" in line]
    assert len(warned) == 1 and warned[0].startswith("pnmf: warning: the fit left"), done.stderr
    assert "pnmf select-k" in warned[0] and "programs.csv leaves these out" in warned[0]
    model = PNMF.load(tmp_path / "out" / "model.npz")
    empty = model.empty_components_
    assert empty.size > 0
    programs = pd.read_csv(tmp_path / "out" / "programs.csv")
    assert sorted(set(programs.component)) == sorted(set(range(12)) - set(empty))
    info = pnmf_command("info", tmp_path / "out" / "model.npz", cwd=tmp_path)
    line = next(line for line in info.stdout.splitlines() if line.strip().startswith("empty"))
    assert all(str(l) in line for l in empty)
    listed = [line.split(":")[0] for line in info.stdout.splitlines() if line.strip().startswith("component ")]
    assert listed == [f"  component {l}" for l in sorted(set(range(12)) - set(empty))]
