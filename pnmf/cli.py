"""The ``pnmf`` command: fit, transform, select-k, consensus and info, for pipelines and clusters.

Counts are read from AnnData's .h5ad or .zarr, a .loom file (loompy's, velocyto's: genes x
cells, read as cells x genes; ``--layer`` for all three, ``raw.X`` an AnnData's .raw), a
10x directory (matrix.mtx with features.tsv or genes.tsv and barcodes.tsv, gzipped or not,
their names also with a sample's prefix as GEO gives them; a .mtx named alone with such
files beside it is read with them), a 10x HDF5 matrix (.h5, Cell Ranger 2 or later), a
SciPy .npz, a Matrix Market .mtx or a .csv/.tsv table (rows are samples, the first column
their names, the header the features; a table of numbers alone, as ``np.savetxt`` writes
one, is read as a matrix without names); ``--transpose`` reads a .npz, .mtx or table
stored features x samples (genes x cells), as many published ones are. Of a 10x matrix
with other features too (antibodies, CRISPR guides), the Gene Expression features are read.
Every input and argument is checked before any work; a problem is one line on stderr and
exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .consensus import DENSITY_THRESHOLD
from .data import DiskRows, in_memory, share
from .elbo import MODES
from .loop import interrupt_stops_all
from .programs import empty_note


def _say(text: str) -> None:
    """A line on stdout. Once its reader has left (``pnmf ... | head``), the lines go
    nowhere and the command goes on to write its files."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class UsageError(Exception):
    """A bad file or argument: reported on one line, exit status 2."""


@dataclass
class Counts:
    """Counts read from a file: X (samples x features), their names, and the obs table if any."""

    x: object
    obs_names: np.ndarray
    var_names: np.ndarray
    obs: object = None  # a pandas DataFrame (from .h5ad), for --batch-key
    named: bool = True  # whether the file names its features (a .npz does not)


def _open_text(path: Path):
    """A text file, gzipped (.gz) or not."""
    import gzip

    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)  # noqa: SIM115 (the caller closes it)


def _names(path: Path, column: int = 0) -> np.ndarray:
    with _open_text(path) as handle:
        return np.array([line.rstrip("\n").split("\t")[min(column, len(line.split("\t")) - 1)] for line in handle])


def _numbers_only(path: Path, sep: str) -> bool:
    """Whether the first line of a table holds numbers alone (no header row, no name column)."""
    with _open_text(path) as handle:
        fields = handle.readline().rstrip("\n").split(sep)
    try:
        [float(field) for field in fields]
    except ValueError:
        return False
    return True


def _find(folder: Path, *names: str, prefix: str = "") -> Path:
    for name in names:
        for candidate in (folder / (prefix + name), folder / (prefix + name + ".gz")):
            if candidate.exists():
                return candidate
    raise UsageError(f"{folder} is not a 10x directory: no {' or '.join(prefix + n for n in names)} in it")


TENX_MATRIX = ("matrix.mtx", "matrix.mtx.gz")  # a 10x matrix's name (after a sample's prefix)


def _prefix(folder: Path) -> str:
    """The prefix of a 10x directory's file names: '' for matrix.mtx, 'GSM123_' for
    GSM123_matrix.mtx.gz, as GEO names them; UsageError when it holds several samples."""
    if any((folder / name).exists() for name in TENX_MATRIX):
        return ""
    found = sorted(  # a set: GSM1_matrix.mtx beside GSM1_matrix.mtx.gz is one sample
        {path.name[: -len(end)] for path in folder.iterdir() for end in TENX_MATRIX if path.name.endswith(end)}
    )
    if len(found) > 1:
        raise UsageError(
            f"{folder} holds several 10x matrices ({', '.join(f + 'matrix.mtx' for f in found)}): "
            "give one of the .mtx files, which is read with its features and barcodes"
        )
    return found[0] if found else ""


def _tenx_mtx(path: Path) -> tuple[Path, str] | None:
    """The folder and prefix of a .mtx file that is a 10x matrix: NAMEmatrix.mtx(.gz) beside
    NAMEbarcodes.tsv and NAMEfeatures.tsv or NAMEgenes.tsv (gzipped or not); None otherwise."""
    for end in TENX_MATRIX:
        if path.name.endswith(end):
            prefix = path.name[: -len(end)]
            try:
                _find(path.parent, "barcodes.tsv", prefix=prefix)
                _find(path.parent, "features.tsv", "genes.tsv", prefix=prefix)
            except UsageError:
                return None
            return path.parent, prefix
    return None


def _gene_expression(x, var: np.ndarray, types: np.ndarray | None, path: Path) -> tuple[object, np.ndarray]:
    """The Gene Expression features of a 10x matrix that holds others too (antibodies, ...)."""
    if types is None:
        return x, var
    keep = types == "Gene Expression"
    if keep.all() or not keep.any():
        return x, var
    others = ", ".join(sorted(set(types[~keep])))
    _say(f"{path}: kept its {keep.sum()} Gene Expression features of {len(types)} (left out: {others})")
    return x[:, np.flatnonzero(keep)], var[keep]


def _read_10x_h5(source: Path) -> Counts:
    """A 10x Genomics HDF5 matrix (Cell Ranger's filtered_feature_bc_matrix.h5, v2 or v3)."""
    import h5py

    def text(dataset) -> np.ndarray:
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in dataset[:]])

    with h5py.File(source, "r") as handle:
        groups = [name for name in handle if isinstance(handle[name], h5py.Group)]
        if "matrix" in handle:  # Cell Ranger 3 and later: features of every type
            group, features = handle["matrix"], handle["matrix"]["features"]
            var, types = text(features["name"]), text(features["feature_type"]) if "feature_type" in features else None
        elif len(groups) == 1 and "gene_names" in handle[groups[0]]:  # Cell Ranger 2: one genome's genes
            group = handle[groups[0]]
            var, types = text(group["gene_names"]), None
        else:
            raise UsageError(f"{source} is not a 10x HDF5 matrix: no 'matrix' group (groups: {', '.join(groups)})")
        n_features, n_cells = (int(n) for n in group["shape"][:])
        # Stored features x cells by columns (CSC): its transpose is cells x features by rows.
        x = sp.csc_matrix((group["data"][:], group["indices"][:], group["indptr"][:]), shape=(n_features, n_cells)).T
        obs = text(group["barcodes"])
    x, var = _gene_expression(sp.csr_matrix(x), var, types, source)
    return Counts(x, obs, var)


FORMATS = ".h5ad, .zarr, .loom, a 10x directory or .h5, .npz, .mtx, .csv or .tsv"
# Formats that store a bare matrix, whose orientation the file does not say.
BARE = (".npz", ".mtx", ".mtx.gz", ".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
# Files that hold counts and cannot be a model (an .npz may be either).
COUNTS_ONLY = (".h5ad", ".zarr", ".loom", ".h5", *(suffix for suffix in BARE if suffix != ".npz"))


def read_counts(path: str, layer: str | None = None, backed: bool = False, transpose: bool = False) -> Counts:
    """Counts from .h5ad or .zarr (AnnData), .loom, a 10x directory or .h5, .npz, .mtx or .csv/.tsv;
    UsageError naming what is wrong.

    ``backed``: an .h5ad's or .zarr's X (or the layer ``layer``) stays on disk, to be read
    by rows, and their other matrices are not read. ``transpose``: the file (a bare
    matrix: .npz, .mtx, .csv or .tsv) holds features x samples, as many published tables do.
    """
    source = Path(path)
    if not source.exists():
        raise UsageError(f"{path}: no such file or directory")
    if layer is not None and source.suffix not in (".h5ad", ".zarr", ".loom"):
        raise UsageError(f"--layer applies to .h5ad, .zarr and .loom files; {path} is not one")
    bare = source.is_file() and source.name.endswith(BARE) and _tenx_mtx(source) is None
    if transpose and not bare:
        raise UsageError(
            f"--transpose applies to .npz, .mtx, .csv and .tsv files, which do not say which way they are "
            f"stored; {path} says which way it is stored, and its samples (cells) are read as rows"
        )
    counts = _read(source, path, layer, backed)
    if transpose:
        counts = Counts(
            sp.csr_matrix(counts.x.T) if sp.issparse(counts.x) else counts.x.T.copy(),
            counts.var_names,
            counts.obs_names,
            named=counts.named,
        )
    return counts


def _read(source: Path, path: str, layer: str | None, backed: bool) -> Counts:
    try:
        if source.suffix == ".zarr":
            return _read_zarr(source, layer, backed)
        tenx = (source, _prefix(source)) if source.is_dir() else _tenx_mtx(source)
        if tenx is not None:
            from scipy.io import mmread

            folder, prefix = tenx
            matrix = _find(folder, "matrix.mtx", prefix=prefix)
            x = sp.csr_matrix(mmread(matrix).T)  # 10x stores features x cells
            features = _find(folder, "features.tsv", "genes.tsv", prefix=prefix)
            var = _names(features, column=1)
            types = _names(features, column=2) if features.name[len(prefix) :].startswith("features") else None
            obs = _names(_find(folder, "barcodes.tsv", prefix=prefix))
            if x.shape != (len(obs), len(var)):
                raise UsageError(
                    f"{path}: {matrix.name} is {x.shape[1]} x {x.shape[0]} but the names are {len(var)} x {len(obs)}"
                )
            if not source.is_dir():
                _say(f"{path}: read as a 10x matrix, with {features.name} and the barcodes beside it")
            x, var = _gene_expression(x, var, types, source)
            return Counts(x, obs, var)
        if source.suffix == ".h5":
            return _read_10x_h5(source)
        if source.suffix == ".h5ad":
            if backed:
                import h5py

                # Kept open while the counts are read; AnnData's backed="r" would read every layer whole.
                counts = _stored_anndata(h5py.File(source, "r"), path, layer)
                if counts is not None:
                    return counts
            import anndata

            from .integrations import layer_names

            adata = anndata.read_h5ad(source, backed="r" if backed else None)
            return _annotated(path, layer, layer_names(adata), _layer_reader(adata), adata.obs, adata.var, _raw(adata))
        if source.suffix == ".loom":
            return _read_loom(source, path, layer)
        if source.suffix == ".npz" or source.name.endswith((".mtx", ".mtx.gz")):
            if source.suffix == ".npz":
                x = sp.load_npz(source)
            else:
                from scipy.io import mmread

                x = mmread(source)
            x = sp.csr_matrix(x)
            return Counts(x, np.arange(x.shape[0]).astype(str), np.arange(x.shape[1]).astype(str), named=False)
        if source.name.endswith(BARE):  # a table
            import pandas as pd

            sep = "\t" if source.name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
            if _numbers_only(source, sep):  # no header, no row names: a bare matrix (np.savetxt's)
                values = pd.read_csv(source, sep=sep, header=None).to_numpy()
                _say(f"{path} has no header row: read as a matrix without names")
                if values.dtype.kind not in "biuf":
                    raise UsageError(f"{path} holds values that are not numbers")
                n, d = values.shape
                return Counts(
                    values.astype(np.float64), np.arange(n).astype(str), np.arange(d).astype(str), named=False
                )
            table = pd.read_csv(source, sep=sep, index_col=0)
            if table.shape[1] == 0:
                raise UsageError(f"{path} has no feature columns (expected a header row and a name column)")
            values = table.to_numpy()
            if values.dtype.kind not in "biuf":
                raise UsageError(f"{path} holds values that are not numbers")
            return Counts(
                values.astype(np.float64), table.index.astype(str).to_numpy(), table.columns.astype(str).to_numpy()
            )
    except UsageError:
        raise
    except ImportError as err:
        fix = "pip install zarr" if err.name == "zarr" else "pip install 'pnmf-vi[anndata]'"
        raise UsageError(f"reading {path} needs {err.name}: {fix}") from err
    except Exception as err:  # a damaged or foreign file, as the reader reports it
        raise UsageError(
            f"{path} could not be read: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    raise UsageError(f"{path}: unknown format (expected {FORMATS})")


def _keep_features(counts: Counts, args) -> Counts:
    """The counts' features named in the file ``args.features`` (one name a line, as cNMF's
    and scHPF's gene lists are), in the counts' order; the counts unchanged without it."""
    from .data import pick_columns

    if args.features is None:
        return counts
    listing = Path(args.features)
    if not listing.is_file():
        raise UsageError(f"--features {args.features}: no such file")
    if not counts.named:
        raise UsageError(f"--features picks features by name, and {args.counts} does not name its features")
    with _open_text(listing) as handle:
        wanted = {line.strip() for line in handle} - {""}
    names = counts.var_names.astype(str)
    keep = np.flatnonzero(np.isin(names, list(wanted)))
    if keep.size == 0:
        raise UsageError(
            f"none of the {len(wanted):,} names in {args.features} is a feature of {args.counts} "
            f"(its first features: {', '.join(names[:3])})"
        )
    absent = len(wanted) - len(set(names[keep]))
    _say(
        f"kept the {keep.size:,} of {len(names):,} features of {args.counts} named in {args.features}"
        + (f" ({absent:,} of its names are not among them)" if absent else "")
    )
    return Counts(pick_columns(counts.x, keep), counts.obs_names, counts.var_names[keep], counts.obs, counts.named)


# A file's format fixes its layout (tables are dense; .mtx, .npz and 10x matrices sparse),
# and the fit is faster in the other one at some densities. On 2 CPU cores, a lower-bound
# natural iteration of a 5,000 x 2,000 matrix with 10 components took 62 ms dense (NumPy)
# against 12.5 ms sparse with torch (23.5 with NumPy) at 6% non-zeros, 65 against 46 (105)
# at 26%, 61 against 67 (144) at 42% and 62 against 140 (241) at 69%. On a GPU dense
# products cost far less per entry than sparse ones, so there only the move to dense holds.
SPARSE_UP_TO = 0.2  # a dense matrix with at most this share of non-zeros is fitted sparse on a CPU
DENSE_FROM = 0.5  # a sparse one with at least this share is fitted dense (in less memory, too)
LAYOUT_FROM = 1 << 18  # smaller matrices keep their layout: their steps cost little either way


def _on_cpu(backend: str, device: str | None, dtype: str) -> bool:
    """Whether a fit with these settings runs on the CPU (False where they are not valid:
    the fit names the problem)."""
    from .backends import get_backend

    try:
        return get_backend(backend, device, dtype, sparse=True).device == "cpu"
    except (ImportError, ValueError, RuntimeError):
        return False


def _layout(counts: Counts, path: str, backend: str, device: str | None, dtype: str) -> Counts:
    """The counts in memory in the faster layout for a fit with these settings: dense from
    DENSE_FROM non-zeros on, sparse (CSR) up to SPARSE_UP_TO on a CPU; counts on disk, and
    matrices under LAYOUT_FROM entries, as they are."""
    x = counts.x
    if not (isinstance(x, np.ndarray) or sp.issparse(x)) or x.shape[0] * x.shape[1] < LAYOUT_FROM:
        return counts
    share = (x.nnz if sp.issparse(x) else np.count_nonzero(x)) / (x.shape[0] * x.shape[1])
    if sp.issparse(x) and share >= DENSE_FROM:
        counts.x, layout = x.toarray(), "dense"
    elif not sp.issparse(x) and share <= SPARSE_UP_TO and _on_cpu(backend, device, dtype):
        counts.x, layout = sp.csr_matrix(x), "sparse"
    else:
        return counts
    _say(f"{path} is {share:.1%} non-zero: held as a {layout} matrix, which is faster there")
    return counts


def _annotated(path: str, layer: str | None, layers: list[str], read, obs, var, raw_var=None) -> Counts:
    """The counts of an AnnData (or loom) file: X or the layer ``layer`` (of ``layers``), as
    ``read(layer)`` reads them (``read(None)``: X, None when there is none), with the names of
    its rows (``obs``'s index) and features (``var``'s). An AnnData's ``.raw`` (its features
    ``raw_var``, None when it has none) is the layer named :data:`RAW`."""
    if raw_var is not None:
        layers = [*layers, RAW]
        var = raw_var if layer == RAW else var
    if layer is not None and layer not in layers:
        raise UsageError(f"{path} has no layer {layer!r} (layers: {', '.join(layers) or 'none'})")
    x = read(layer)
    if x is None:
        raise UsageError(f"{path} has no X; name a layer with counts (--layer)")
    hint = None  # where else the file keeps a matrix, should this one's values not be counts
    if layer is None and layers:
        hint = f"{path}'s X was read; its layers are {', '.join(layers)}: --layer NAME reads one"
    elif layer is not None:
        others = [name for name in layers if name != layer]
        rest = f"; its other layers are {', '.join(others)}: --layer NAME reads one" if others else ""
        hint = f"{path}'s layer {layer} was read; without --layer its X is read{rest}"
    if hint:
        _HINTS.update(dict.fromkeys(NOT_COUNTS, hint))
    return Counts(x, np.asarray(obs.index), np.asarray(var.index), obs)


def _read_zarr(source: Path, layer: str | None, backed: bool) -> Counts:
    """An AnnData stored as .zarr; with ``backed`` its X and layers stay on disk, to be read
    by rows (AnnData reads a .zarr only whole)."""
    import anndata
    import zarr

    from .integrations import layer_names

    if backed:
        counts = _stored_anndata(zarr.open_group(source, mode="r"), str(source), layer)
        if counts is not None:
            return counts
    adata = anndata.read_zarr(source)
    return _annotated(str(source), layer, layer_names(adata), _layer_reader(adata), adata.obs, adata.var, _raw(adata))


def _stored_anndata(store, path: str, layer: str | None) -> Counts | None:
    """The counts of an AnnData in an HDF5 file or zarr store (``store``, opened), left on
    disk: X, a layer or .raw's X, read by rows when stored by rows (CSR) or dense, whole when
    stored by columns (CSC); the names and ``obs`` read now. None for a file that anndata's
    element reader cannot read (written by an old anndata): read it through AnnData."""
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem

    try:
        obs, var = read_elem(store["obs"]), read_elem(store["var"])
    except Exception:
        return None
    layers = sorted(store["layers"].keys()) if "layers" in store else []

    def rows(node, name: str):
        if hasattr(node, "shape"):  # dense: an array, read by rows
            return node
        if node.attrs.get("encoding-type") == "csr_matrix":
            return DiskRows(node)
        _say(f"{path}: {name} is stored by columns (CSC): read whole (stored by rows, it would be read by rows)")
        return read_elem(node)

    def read(name):
        if name == RAW:
            return rows(store["raw"]["X"], "raw.X")
        if name is None:
            return rows(store["X"], "X") if "X" in store else None
        return rows(store["layers"][name], f"layer {name}")

    raw = store["raw"] if "raw" in store else None  # anndata may write an empty array there
    raw_var = read_elem(raw["var"]) if hasattr(raw, "keys") and "X" in raw and "var" in raw else None
    return _annotated(path, layer, layers, read, obs, var, raw_var)


# The layer name that reads an AnnData's .raw (its X and its features): where many published
# files (CELLxGENE's among them) keep the counts when X holds normalised values.
RAW = "raw.X"


def _raw(adata):
    """The features of ``adata.raw`` (None when it has none)."""
    return None if adata.raw is None else adata.raw.var


def _layer_reader(adata):
    """``read(name)`` of :func:`_annotated` for an AnnData: its layer ``name``, its .raw's X, or X."""
    return lambda name: adata.X if name is None else adata.raw.X if name == RAW else adata.layers[name]


# Where loom files name their genes and cells (loompy's convention, then AnnData's and others').
LOOM_GENES = ("Gene", "var_names", "gene_names", "Genes", "gene", "Accession")
LOOM_CELLS = ("CellID", "obs_names", "cell_names", "CellIDs", "cell_id")
LOOM_BLOCK = 2**24  # values read at a time (64 MB of float32), a block of cells


def _read_loom(source: Path, path: str, layer: str | None) -> Counts:
    """A loom file (loompy, velocyto): /matrix and /layers/NAME stored genes x cells, the
    genes' and cells' attributes in /row_attrs and /col_attrs; read cells x genes, by
    blocks of cells into a sparse matrix."""
    import h5py
    import pandas as pd

    def column(dataset) -> np.ndarray:
        values = dataset[:]
        if values.dtype.kind in "OS":
            values = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])
        return values

    def attributes(group_name: str, n: int) -> dict[str, np.ndarray]:
        group = handle.get(group_name)
        if not isinstance(group, h5py.Group):
            return {}
        return {k: column(v) for k, v in group.items() if isinstance(v, h5py.Dataset) and v.shape == (n,)}

    def cells_by_genes(name: str | None):
        stored = handle["matrix"] if name is None else handle["layers"][name]
        step = max(1, LOOM_BLOCK // max(n_genes, 1))
        blocks = [sp.csr_matrix(stored[:, start : start + step].T) for start in range(0, n_cells, step)]
        return sp.vstack(blocks, format="csr")

    with h5py.File(source, "r") as handle:
        if not isinstance(handle.get("matrix"), h5py.Dataset) or handle["matrix"].ndim != 2:
            raise UsageError(f"{path} is not a loom file: no 2-D dataset 'matrix' in it")
        n_genes, n_cells = handle["matrix"].shape
        layers = sorted(name for name in handle.get("layers", {}) if name)  # '' is /matrix again
        genes, cells = attributes("row_attrs", n_genes), attributes("col_attrs", n_cells)
        gene_key = next((k for k in LOOM_GENES if k in genes), None)
        cell_key = next((k for k in LOOM_CELLS if k in cells), None)
        var = pd.Index(genes[gene_key] if gene_key else np.arange(n_genes).astype(str))
        obs = pd.DataFrame(cells, index=cells[cell_key] if cell_key else np.arange(n_cells).astype(str))
        counts = _annotated(path, layer, layers, cells_by_genes, obs, pd.DataFrame(index=var))
    counts.named = gene_key is not None
    return counts


# What the command line adds to a warning that starts with the key (set as files are read).
_HINTS: dict[str, str] = {}
# The starts of the warning and the error of values that are not counts.
NOT_COUNTS = ("X holds non-integer values", "thinning splits integer counts")


# The estimator's words for what the command's options set.
_AS_OPTIONS = {
    "dtype='float64'": "--dtype float64",
    "raise max_iter (or tol)": "raise --max-iter (or --tol)",
    "fewer components than n_components": "fewer components than -k",
    "fit fewer (pnmf.select_n_components), or leave these out (empty_components_)": (
        "fit fewer (pnmf select-k); programs.csv leaves these out"
    ),
    " (empty_components_); fit fewer components": "; fit fewer components (pnmf select-k)",
}


def _hinted(text: str) -> str:
    """A message with what the files read suggest about it, in the command's options."""
    for words, option in _AS_OPTIONS.items():
        text = text.replace(words, option)
    return " ".join([text, *(hint for start, hint in _HINTS.items() if text.startswith(start))])


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line of the command's own."""
    print(f"pnmf: warning: {_hinted(str(message))}", file=sys.stderr)


def _batch(counts: Counts, key: str | None):
    if key is None:
        return None
    if counts.obs is None:
        raise UsageError("--batch-key needs an .h5ad or .zarr input, whose obs holds the batch labels")
    if key not in counts.obs:
        raise UsageError(f"--batch-key {key!r} is not a column of obs (columns: {', '.join(counts.obs.columns)})")
    from .integrations import batch_labels

    return batch_labels(counts.obs, key)


def _verbose(args) -> bool:
    """Whether to show a progress bar: as --verbose or --quiet say, else on a terminal."""
    return sys.stderr.isatty() if args.verbose is None else args.verbose


def _model_params(args) -> dict:
    params = dict(
        mode=args.mode,
        training_mode=args.training_mode,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        max_iter=args.max_iter,
        tol=args.tol,
        random_state=args.seed,
        verbose=_verbose(args),
        size_factors=args.size_factors,
        distributed=args.distributed,
    )
    for name in ("batch_size", "checkpoint", "checkpoint_every"):  # options of fit alone
        if getattr(args, name, None) is not None:
            params[name] = getattr(args, name)
    if args.prior_scale is not None:
        params["prior_scale"] = args.prior_scale if args.prior_scale == "auto" else _number(args.prior_scale)
    return params


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--prior-scale {text!r} is neither 'auto' nor a number") from None
    return value


def _rows(counts: Counts, model) -> tuple[Counts, str]:
    """This process's rows of ``model``'s fit (under torchrun or mlx.launch with
    --distributed), and the suffix of its output files.

    Counts on disk (an .h5ad's X) are read here when the fit takes its rows whole (no
    ``batch_size``): this process's rows, or all of them. A mini-batch fit reads its batches.
    """
    from . import distributed as dist

    if not model.distributed:
        if model.batch_size is None:
            counts.x = in_memory(counts.x)
        return counts, ""
    group = dist.join_fit(model)
    rows = dist.shard(counts.x.shape[0], group)
    obs = None if counts.obs is None else counts.obs.iloc[rows]
    x = share(counts.x, rows, batched=model.batch_size is not None)
    return Counts(x, counts.obs_names[rows], counts.var_names, obs), f".rank-{group.rank}-of-{group.size}"


def _factor_format(args) -> str:
    """The format of the factors' file, its writer's imports checked before anything is written."""
    fmt = args.factors or ("h5ad" if str(args.counts).rstrip("/").endswith((".h5ad", ".zarr")) else "csv")
    if fmt == "h5ad":
        try:
            import anndata  # noqa: F401
        except ImportError:
            raise UsageError("--factors h5ad needs anndata: pip install 'pnmf-vi[anndata]'") from None
    return fmt


def _write_factors(out: Path, name: str, counts: Counts, factors: np.ndarray, model, fmt: str) -> list[Path]:
    if fmt == "h5ad":
        import anndata
        import pandas as pd

        adata = anndata.AnnData(
            obs=pd.DataFrame(index=counts.obs_names.astype(str)), var=pd.DataFrame(index=counts.var_names.astype(str))
        )
        adata.obsm["X_pnmf"] = factors
        adata.varm["PNMF"] = model.loadings_
        path = out / f"{name}.h5ad"
        adata.write_h5ad(path)
        return [path]
    path = out / f"{name}.csv"
    header = "," + ",".join(f"component_{l}" for l in range(factors.shape[1]))
    rows = [f"{label}," + ",".join(f"{v:.9g}" for v in row) for label, row in zip(counts.obs_names, factors)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return [path]


def _outputs(args, counts: Counts, model, factors: np.ndarray, suffix: str) -> list[Path]:
    """model.npz, programs.csv and programs.png (by rank 0 alone under --distributed), and the factors."""
    fmt = _factor_format(args)
    table = model.top_features(args.top, feature_names=counts.var_names)  # before any file is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if not suffix or suffix.startswith(".rank-0-"):
        written.append(model.save(out / "model.npz"))
        table.to_csv(out / "programs.csv", index=False)
        written.append(out / "programs.csv")
        written += _figure(lambda plot: _programs_figure(plot, model, counts.var_names), out / "programs.png")
    return written + _write_factors(out, "factors" + suffix, counts, factors, model, fmt)


def _programs_figure(plot, model, names):
    """The loadings of each program's most specific features, fewer of them for many
    programs: a figure of 160 rows at most."""
    return plot.loadings(model, feature_names=names, top=max(1, min(8, 160 // model.n_components))).figure


def _check_out(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    made = out.absolute()  # the folder the outputs' folder will be made in, checked before any work
    while not made.exists():
        made = made.parent
    if not made.is_dir():
        raise UsageError(f"--out {args.out} cannot be made: {made} is not a directory")
    if not os.access(made, os.W_OK | os.X_OK):
        raise UsageError(f"--out {args.out} cannot be made: {made} is not writable")
    if getattr(args, "top", 1) < 1:
        raise UsageError(f"--top {args.top} must be at least 1")


def cmd_fit(args) -> list[Path]:
    from .estimator import PNMF

    _check_out(args)
    if args.checkpoint_every is not None and args.checkpoint is None:
        raise UsageError("--checkpoint-every needs --checkpoint (the file to write)")
    model = PNMF(args.n_components, **_model_params(args))
    model._validate_params()  # a bad parameter is named before the counts are read
    counts = _keep_features(read_counts(args.counts, args.layer, backed=True, transpose=args.transpose), args)
    n_rows = counts.x.shape[0]
    counts, suffix = _rows(counts, model)
    if not suffix:  # one process (counts left on disk for a mini-batch fit keep their layout)
        counts = _layout(counts, args.counts, args.backend, args.device, args.dtype)
    batch = _batch(counts, args.batch_key)
    start = time.perf_counter()
    factors = model.fit_transform(counts.x, batch=batch)
    model.feature_names_in_ = counts.var_names.astype(object)  # the model file keeps them
    if not suffix or suffix.startswith(".rank-0-"):
        settled = "converged" if model.converged_ else "not converged (see the warning)"
        if model.tol == 0:
            settled = "as --tol 0 asks"
        rows = f"{n_rows:,} rows" + (f" over {suffix.rsplit('-', 1)[1]} processes" if suffix else "")
        rows += f" x {model.n_features_in_:,} features"
        _say(
            f"fitted {model.n_components} components to {rows} on {model.backend_} ({model.device_}): "
            f"{model.n_iter_} iterations, {settled}, ELBO {model.elbo_:.6g} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    return _outputs(args, counts, model, factors, suffix)


def cmd_consensus(args) -> list[Path]:
    from .consensus import consensus

    _check_out(args)
    if args.restarts < 2:
        raise UsageError(f"--restarts {args.restarts} must be at least 2")
    counts = _keep_features(read_counts(args.counts, args.layer, transpose=args.transpose), args)
    counts = _layout(counts, args.counts, args.backend, args.device, args.dtype)
    params = _model_params(args)
    seed = params.pop("random_state")
    params.pop("distributed")
    batch = _batch(counts, args.batch_key)
    model = consensus(
        counts.x,
        args.n_components,
        args.restarts,
        random_state=seed,
        density_threshold=args.density_threshold,
        batch=batch,
        **params,
    )
    model.feature_names_in_ = counts.var_names.astype(object)
    _say(f"stability (silhouette): {model.stability_:.3f}; outlier components dropped: {model.n_outliers_}")
    written = _outputs(args, counts, model, np.exp(model.mean_ + model.var_ / 2), "")
    figure = _figure(lambda plot: plot.consensus(model)[0].figure, Path(args.out) / "consensus.png")
    return written + figure


def _figure(draw, path: Path) -> list[Path]:
    """``draw(pnmf.plot)``'s figure written to ``path``; nothing without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import plot

    figure = draw(plot)
    try:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)  # main may run many times in one process
    return [path]


def cmd_transform(args) -> list[Path]:
    from .integrations import transform_named

    _check_out(args)
    if args.model.rstrip("/").endswith(COUNTS_ONLY) and args.counts.endswith(".npz"):
        raise UsageError(f"the model comes first: pnmf transform {args.counts} {args.model}")
    model = _load(args.model, args.backend, args.device)
    model.verbose = _verbose(args)  # not the fit's choice, saved with the model
    counts = read_counts(args.counts, args.layer, backed=True, transpose=args.transpose)
    counts = _layout(counts, args.counts, model.backend, model.device, model.dtype)
    batch = _batch(counts, args.batch_key)
    model._check_batches(batch is not None, "--batch-key", ", the column with each row's batch")
    fmt = _factor_format(args)
    names = counts.var_names if counts.named else None
    factors, columns = transform_named(model, counts.x, names, batch=batch, source=args.counts)
    if columns is not None:
        _say(f"matched the model's {len(columns)} features by name among the {len(names)} of {args.counts}")
        counts.var_names = counts.var_names[columns]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return _write_factors(out, "factors", counts, factors, model, fmt)


def cmd_select_k(args) -> list[Path]:
    from .selection import SELECTION_DENSITY_THRESHOLD, select_n_components

    _check_out(args)
    if any(k < 1 for k in args.candidates):
        raise UsageError(f"--candidates must be positive integers; got {args.candidates}")
    if args.density_threshold is not None and args.restarts < 2:
        raise UsageError("--density-threshold filters the restarts of a consensus: give --restarts 2 or more")
    counts = _keep_features(read_counts(args.counts, args.layer, transpose=args.transpose), args)
    counts = _layout(counts, args.counts, args.backend, args.device, args.dtype)
    params = _model_params(args)
    seed = params.pop("random_state")
    params.pop("distributed")
    batch = _batch(counts, args.batch_key)
    table = select_n_components(
        counts.x,
        args.candidates,
        random_state=seed,
        n_restarts=args.restarts,
        density_threshold=SELECTION_DENSITY_THRESHOLD if args.density_threshold is None else args.density_threshold,
        batch=batch,
        **params,
    )
    best = table.pop("best")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(table)
    lines = [",".join(names)] + [",".join(str(table[n][i]) for n in names) for i in range(len(args.candidates))]
    (out / "select_k.csv").write_text("\n".join(lines) + "\n")
    written = [out / "select_k.csv"]
    _say(f"chosen number of components: {best}")
    return written + _figure(lambda plot: plot.n_components({**table, "best": best}).figure, out / "select_k.png")


def _load(path: str, backend: str | None, device: str | None):
    from .estimator import PNMF

    if not Path(path).exists():
        raise UsageError(f"{path}: no such model file")
    if str(path).rstrip("/").endswith(COUNTS_ONLY):
        raise UsageError(f"{path} holds counts, not a model (the model.npz that pnmf fit writes)")
    return PNMF.load(path, backend=None if backend == "auto" else backend, device=device)


def cmd_info(args) -> list[Path]:
    model = _load(args.model, None, None)
    _say(f"pnmf model {args.model}")
    rows = f"rows fitted: {len(model.mean_)}"
    if model.distributed:  # a process saves its own rows' posterior
        rows = f"rows: {len(model.mean_)} in this file, one process's block of a distributed fit"
    _say(f"  components: {model.n_components}   features: {model.n_features_in_}   {rows}")
    _say(f"  mode: {model.mode}   training: {model.training_mode}   backend: {model.backend_} ({model.device_})")
    _say(f"  ELBO: {model.elbo_:.6g}   iterations: {model.n_iter_}   converged: {model.converged_}")
    if model.batches_ is not None:
        _say(f"  batches: {', '.join(map(str, model.batches_))}")
    if model.size_factors_ is not None:
        s = model.size_factors_
        how = "given" if model.reference_total_ is None else f"row totals over {model.reference_total_:.6g}"
        _say(f"  size factors: {how}, {s.min():.3g} to {s.max():.3g} (median {np.median(s):.3g})")
    if model.prior_scale == "auto":
        _say(f"  prior scale (fitted): {', '.join(f'{v:.3g}' for v in model.prior_scale_)}")
    empty = model.empty_components_
    if empty.size:
        _say(f"  empty (loadings near zero, no features): {empty_note(empty, shown=None)}")
    if hasattr(model, "stability_"):
        _say(
            f"  consensus of {len(model.restart_elbos_)} restarts: stability {model.stability_:.3f}, "
            f"outlier components dropped {model.n_outliers_} (density threshold {model.density_threshold_:g})"
        )
    table = model.top_features(5)
    _say("  most specific features (programs.csv ranks by loading too):")
    for component, block in table[table.ranking == "specificity"].groupby("component"):
        _say(f"  component {component}: {', '.join(block.feature)}")
    return []


DENSITY_HELP = "drop restarts' components farther than this from their neighbours (cNMF's local density threshold)"


class _DefaultsShown(argparse.HelpFormatter):
    """Help that names each option's default, where it has one and the help does not."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        unset = any(action.default is value for value in (None, False, argparse.SUPPRESS))  # 0 is a default
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text.strip()


def parser() -> argparse.ArgumentParser:
    from . import __version__

    main = argparse.ArgumentParser(
        prog="pnmf", description="Probabilistic NMF of count data: fit, transform, select-k, consensus, info."
    )
    shown = dict(formatter_class=_DefaultsShown)
    main.add_argument("--version", action="version", version=f"pnmf {__version__}")
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub, model_options=True, outputs=True):
        sub.add_argument("counts", help=".h5ad, .zarr, .loom, 10x directory or .h5, .npz, .mtx, .csv or .tsv")
        sub.add_argument(
            "--transpose", "-T", action="store_true", help="the .npz, .mtx, .csv or .tsv holds features x samples"
        )
        sub.add_argument(
            "--layer", help="the .h5ad, .zarr or .loom layer with the counts (default: X; raw.X: an AnnData's .raw)"
        )
        sub.add_argument("--out", "-o", required=True, help="folder for the outputs")
        sub.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch", "mlx"], help="array framework")
        sub.add_argument("--device", help="torch: cpu, cuda, mps; MLX: cpu, gpu")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="float precision")
        sub.add_argument(
            "--batch-key", help="obs column of an .h5ad or .zarr (a .loom's col_attrs) with each row's batch"
        )
        sub.add_argument(
            "--verbose", "-v", action="store_true", default=None, help="a progress bar (default: on a terminal)"
        )
        sub.add_argument("--quiet", "-q", dest="verbose", action="store_false", default=None, help="no progress bar")
        if model_options:
            sub.add_argument(
                "--features", metavar="FILE", help="fit only the features named in FILE, one a line (a gene list)"
            )
            sub.add_argument("--mode", default="lower-bound", choices=MODES, help="ELBO: Jensen bound or Monte Carlo")
            sub.add_argument(
                "--training-mode", default="natural", choices=["natural", "standard"], help="natural gradients or Adam"
            )
            sub.add_argument("--size-factors", choices=["total"], help="per-row size factors: row totals")
            sub.add_argument(
                "--prior-scale", help="scale of the factors' prior: a number (default: 1) or 'auto' (fitted)"
            )
            sub.add_argument("--max-iter", type=int, default=2000, help="most iterations (steps of a mini-batch fit)")
            sub.add_argument(
                "--tol", type=float, default=1e-4, help="stop when the ELBO settles to this (0: run max-iter)"
            )
            sub.add_argument("--seed", type=int, default=0, help="random seed")
        if model_options and outputs:  # a model, its programs and factors are written
            sub.add_argument("--top", type=int, default=20, help="features per component in programs.csv")
            sub.add_argument("--factors", choices=["h5ad", "csv"], help="format of the factors (default: as the input)")

    fit = commands.add_parser("fit", help="fit a model; write model.npz, factors, programs.csv and .png", **shown)
    common(fit)
    fit.add_argument("--n-components", "-k", type=int, required=True, help="number of components (programs)")
    fit.add_argument(
        "--distributed", action="store_true", help="one fit over every process (under torchrun, or mlx.launch with MLX)"
    )
    fit.add_argument(
        "--batch-size", type=int, help="rows per step of a mini-batch fit (an .h5ad's X is then read by batches)"
    )
    fit.add_argument("--checkpoint", help="file for the fit's state; a rerun of the same fit resumes from it")
    fit.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints (default: 100)")
    fit.set_defaults(run=cmd_fit)

    cons = commands.add_parser(
        "consensus", help="the consensus of restarts; write as fit does, and consensus.png", **shown
    )
    common(cons)
    cons.add_argument("--n-components", "-k", type=int, required=True, help="number of components (programs)")
    cons.add_argument("--restarts", type=int, default=10, help="fits whose components are combined")
    cons.add_argument("--density-threshold", type=float, default=DENSITY_THRESHOLD, help=DENSITY_HELP)
    cons.set_defaults(run=cmd_consensus, distributed=False)

    select = commands.add_parser("select-k", help="held-out deviance (and stability) per number of components", **shown)
    common(select, outputs=False)
    select.add_argument("--candidates", type=int, nargs="+", required=True, metavar="K", help="numbers of components")
    select.add_argument("--restarts", type=int, default=1, help="restarts per K (> 1: consensus and stability)")
    select.add_argument(
        "--density-threshold",
        type=float,
        help=f"{DENSITY_HELP} (with --restarts; default: 2, none dropped, as cNMF's K selection)",
    )
    select.set_defaults(run=cmd_select_k, distributed=False)

    transform = commands.add_parser("transform", help="factors of new counts under a fitted model", **shown)
    transform.add_argument("model", help="a model.npz written by fit")
    common(transform, model_options=False)
    transform.add_argument("--factors", choices=["h5ad", "csv"], help="format of the factors (default: as the input)")
    transform.set_defaults(run=cmd_transform)

    info = commands.add_parser("info", help="summarise a model file", **shown)
    info.add_argument("model", help="a model.npz written by fit")
    info.set_defaults(run=cmd_info)

    for sub in (main, fit, cons, select, transform, info):
        sub.error = _one_line  # argparse's own errors: one line too
    return main


def _one_line(message: str):
    raise UsageError(message)


def _log_to_stderr() -> None:
    """pnmf's progress messages (logger 'pnmf', INFO and up) as lines on the stderr of this call."""
    logger = logging.getLogger("pnmf")
    if not logger.handlers:  # once, however often main runs in one process
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pnmf: %(message)s"))
        handler.pnmf_command = True
        logger.addHandler(handler)
    for handler in logger.handlers:
        if getattr(handler, "pnmf_command", False):
            handler.stream = sys.stderr  # the caller may have redirected stderr since the last call
    logger.setLevel(logging.INFO)


def _huge_pages(args) -> None:
    """torch's CPU buffers of 2 MB and more on transparent huge pages for fits held in memory
    (Linux; a value the user set is kept).

    A torch fit of sparse counts allocates buffers afresh each step (its sampled products
    over the non-zeros, the factors' arrays), and without huge pages takes a page fault per
    4 kB of each: in memory its steps took 1.3-1.9x as long (65-72 against 38-52 ms at 5e6
    non-zeros, four runs each). Mini-batch fits and transforms read from disk are left out:
    their changing buffers fragment memory that huge pages back whole (a mini-batch fit's
    peak rose from 0.83 to 1.03-1.29 GB). torch reads the variable at its first allocation,
    which comes later (docs/performance.md).
    """
    held = args.command in ("fit", "consensus", "select-k") and getattr(args, "batch_size", None) is None
    if held and sys.platform == "linux":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None) -> int:
    _log_to_stderr()
    try:
        args = parser().parse_args(argv)
        _huge_pages(args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.showwarning = _show_warning
            with interrupt_stops_all():  # Ctrl-C stops the command: no outputs of a fit cut short
                written = args.run(args)
        for path in written:
            _say(f"wrote {path}")
    except UsageError as err:
        print(f"pnmf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pnmf: interrupted; nothing more was written (a fit with --checkpoint resumes from it)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, ImportError, FloatingPointError) as err:
        print(f"pnmf: error: {_hinted(str(err).splitlines()[0]) if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except OSError as err:  # an output that cannot be written: a full disk, a folder taken away
        where = f"{err.filename}: " if err.filename else ""
        print(f"pnmf: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
