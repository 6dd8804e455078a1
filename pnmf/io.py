"""Portable model files: NumPy arrays and JSON metadata in one ``.npz``, no pickle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .distributed import speaks

log = logging.getLogger(__name__)

FORMAT = "pnmf-model"
FORMAT_VERSION = 1
ARRAYS = ("mean_", "var_", "loadings_", "elbo_history_")
ROW_ARRAYS = ("mean_", "var_")  # kept in the fit's dtype
# Arrays of a model with size factors or batches, absent (None) otherwise.
OPTIONAL_ARRAYS = ("size_factors_", "batch_effects_", "prior_scale_")
# What a consensus of restarts (pnmf.consensus) adds: its summary, and each restart's ELBO.
CONSENSUS = ("stability_", "n_outliers_", "density_threshold_")
SCALARS = ("elbo_", "n_iter_", "converged_", "backend_", "device_", "n_features_in_", "reference_total_")


def _npz(path: Path):
    """The .npz archive at ``path``; ValueError when the file is not one (an .npy array, or another format)."""
    with open(path, "rb") as handle:
        npy = handle.read(6) == b"\x93NUMPY"
    if not npy and not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
        raise ValueError("it is not an .npz archive")
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"it holds one array of shape {data.shape}, as np.save writes, not an .npz archive")
    return data


def _archive(path: Path, what: str, format: str) -> tuple[dict, dict]:
    """The JSON metadata and the arrays of the pnmf file at ``path`` (a model or a checkpoint);
    ValueError saying that it is not a ``what`` when it is no .npz, another program's .npz,
    damaged, or of another ``format``."""
    foreign = None  # the arrays of an .npz that another program wrote (a SciPy sparse matrix, say)
    try:
        with _npz(path) as data:
            if "metadata" not in data.files:
                foreign = data.files
            else:
                metadata = json.loads(str(data["metadata"][()]))
                arrays = {name: np.array(data[name]) for name in data.files if name != "metadata"}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as err:
        raise ValueError(f"{path} is not a {what} (or is damaged): {err}") from err
    if foreign is not None:
        raise ValueError(f"{path} is not a {what}: an .npz archive of {', '.join(foreign) or 'no arrays'}")
    if not isinstance(metadata, dict) or metadata.get("format") != format:
        raise ValueError(f"{path} is not a {what}: no '{format}' metadata")
    return metadata, arrays


def _floats(values) -> np.ndarray:
    """``values`` as a NumPy float32 or float64 array, float64 unless it is float32."""
    values = np.asarray(values)
    return values if values.dtype == np.float32 else np.asarray(values, dtype=np.float64)


def save(model, path) -> Path:
    """Write a fitted model to ``path`` (``.npz`` is appended if missing); returns the path."""
    from . import __version__

    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "params": model.get_params(),
        "fitted": {name: _plain(getattr(model, name, None)) for name in SCALARS},
        "batches": None if getattr(model, "batches_", None) is None else [_plain(v) for v in model.batches_],
        "feature_names_in": [str(f) for f in getattr(model, "feature_names_in_", [])] or None,
        "consensus": {name: _plain(getattr(model, name)) for name in CONSENSUS}
        if hasattr(model, "stability_")
        else None,
        "versions": {"pnmf": __version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    # q(F) of the rows stays in the fit's precision: in float32 it takes half the file.
    arrays = {
        name: _floats(getattr(model, name)) if name in ROW_ARRAYS else np.asarray(getattr(model, name), np.float64)
        for name in ARRAYS
    }
    for name in OPTIONAL_ARRAYS:
        if getattr(model, name, None) is not None:
            arrays[name] = np.asarray(getattr(model, name), dtype=np.float64)
    if hasattr(model, "restart_elbos_"):
        arrays["restart_elbos_"] = np.asarray(model.restart_elbos_, dtype=np.float64)
    with open(path, "wb") as handle:
        np.savez(handle, metadata=np.array(json.dumps(metadata)), **arrays)
    return path


def load(cls, path, backend: str | None = None, device: str | None = None):
    """Read a model written by ``save``; ``backend``/``device`` choose where it will run."""
    from .backends import get_backend

    path = Path(path)
    metadata, stored = _archive(path, "pnmf model file", FORMAT)
    missing = [name for name in ARRAYS if name not in stored]
    if missing:
        raise ValueError(f"{path} is not a pnmf model file (or is damaged): it lacks {', '.join(missing)}")
    arrays = {name: stored.get(name) for name in ARRAYS + OPTIONAL_ARRAYS}
    restart_elbos = stored.get("restart_elbos_")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer pnmf (format {metadata['format_version']}); upgrade pnmf to read it"
        )
    params = dict(metadata["params"])
    if backend is not None:
        params["backend"], params["device"] = backend, device
    model = cls(**params)
    fitted = metadata["fitted"]
    n_components = params["n_components"]
    shapes_ok = (
        arrays["loadings_"].shape == (fitted["n_features_in_"], n_components)
        and arrays["mean_"].shape == arrays["var_"].shape
        and arrays["mean_"].shape[1:] == (n_components,)
    )
    if not shapes_ok:
        raise ValueError(f"{path} is damaged: its arrays do not have the shapes its metadata describes")
    for name, value in arrays.items():
        setattr(model, name, value)
    for name in SCALARS:
        setattr(model, name, fitted.get(name))
    if model.prior_scale_ is None:  # a file from before prior_scale_ existed: the fixed scale
        model.prior_scale_ = np.full(n_components, float(params["prior_scale"]))
    batches = metadata.get("batches")
    model.batches_ = None if batches is None else np.asarray(batches)
    if (model.batches_ is None) != (model.batch_effects_ is None) or (
        model.batches_ is not None and model.batch_effects_.shape != (len(model.batches_), fitted["n_features_in_"])
    ):
        raise ValueError(f"{path} is damaged: its batch labels and batch effects do not match")
    model.components_ = model.loadings_.T
    if metadata.get("feature_names_in"):
        model.feature_names_in_ = np.asarray(metadata["feature_names_in"], dtype=object)
    if metadata.get("consensus"):  # the figure's data (each restart's components) are not kept
        for name in CONSENSUS:
            setattr(model, name, metadata["consensus"][name])
        model.restart_elbos_ = restart_elbos
    if backend is not None:
        chosen = get_backend(backend, device, params["dtype"])
        model.backend_, model.device_ = chosen.name, chosen.device
    else:
        _run_here(model, path)
    return model


def _run_here(model, path: Path) -> None:
    """Keep the backend and device a model was fitted on where they exist here; else (a
    model fitted on a GPU, loaded on a laptop) take ``backend='auto'``'s, with a warning."""
    import warnings

    from .backends import get_backend

    try:
        get_backend(model.backend_, model.device_, model.dtype)
        return
    except (ImportError, ValueError) as err:
        reason = str(err).splitlines()[0]
    chosen = get_backend("auto", None, model.dtype)
    warnings.warn(
        f"{path} was fitted on {model.backend_} ({model.device_}), which is not available here ({reason}); it runs "
        f"on {chosen.name} ({chosen.device}) instead (PNMF.load(path, backend=..., device=...) chooses)",
        UserWarning,
        stacklevel=4,
    )
    model.backend, model.device = "auto", None
    model.backend_, model.device_ = chosen.name, chosen.device


def _plain(value):
    """A JSON-friendly copy of a NumPy scalar."""
    return value.item() if isinstance(value, np.generic) else value


CHECKPOINT_FORMAT = "pnmf-checkpoint"


def data_fingerprint(x) -> str:
    """A digest of counts x (dense or scipy.sparse): its shape, dtype and values."""
    digest = hashlib.blake2b(digest_size=16)
    if hasattr(x, "blocks"):  # counts on disk (pnmf.data.DiskRows), read a block at a time
        digest.update(repr(("disk", x.shape)).encode())
        for block in x.blocks():
            digest.update(data_fingerprint(block).encode())
        return digest.hexdigest()
    digest.update(repr((type(x).__name__, x.shape, str(x.dtype))).encode())
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        parts = (x.data, x.indices, x.indptr)
    else:
        parts = (x,)
    for part in parts:
        digest.update(np.ascontiguousarray(part).data)
    return digest.hexdigest()


class Checkpoint:
    """A fit's state in one ``.npz`` file (arrays and JSON metadata, no pickle).

    ``fingerprint`` names the data and parameters the state belongs to: a file written for
    other data or other parameters is refused, never mixed in. Writes go to a temporary
    file (``name.npz.partial``) that is then renamed over the last checkpoint, so a fit
    killed while writing leaves the previous checkpoint whole. ``group``: in a distributed
    fit each rank keeps its own file (``name.rank-R-of-S.npz``); the ranks rename only once
    every rank has written its state, and resume from the last iteration that every rank
    holds, renamed or still in its temporary file.
    """

    def __init__(self, path, every: int, fingerprint: dict, group=None):
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        if group is not None and group.size > 1:
            path = path.with_name(f"{path.stem}.rank-{group.rank}-of-{group.size}.npz")
        self.path, self.every, self.fingerprint = path, every, fingerprint
        self.group = group if group is not None and group.size > 1 else None
        self.partial = path.with_name(path.name + ".partial")

    def load(self) -> dict | None:
        """The saved state (phase, phase_start, state, key, history), or None when there is none.

        A temporary file that was written whole but not yet renamed (the process was killed
        in between) counts as a checkpoint too; one left half-written is ignored.
        """
        held = [self._read(self.path)]
        try:
            held.append(self._read(self.partial))
        except ValueError:
            pass  # written in part, or for a fit since replaced: never renamed, so never a checkpoint
        held = [saved for saved in held if saved is not None]
        if self.group is None:
            saved = max(held, key=lambda saved: len(saved["history"]), default=None)
        else:
            saved = self._common(held)
        if saved is not None and speaks(self.group):
            name = self.path if self.group is None else str(self.path).replace(".rank-0-", ".rank-*-")
            log.info("resuming from %s at iteration %d", name, len(saved["history"]))
        return saved

    def _common(self, held: list[dict]) -> dict | None:
        """Of this rank's saved states, the one at the last iteration that every rank holds."""
        size, rank = self.group.size, self.group.rank
        table = np.zeros((size, 2))
        for slot, saved in enumerate(held):
            table[rank, slot] = len(saved["history"]) + 1  # 0: no state in this slot
        table = self.group.all_sum_host(table.reshape(-1)).reshape(size, 2) - 1
        if (table < 0).all():
            return None
        common = set.intersection(*({n for n in row if n >= 0} for row in table))
        if not common:
            held_by = "; ".join(
                f"rank {r}: {', '.join(str(int(n)) for n in row if n >= 0) or 'none'}" for r, row in enumerate(table)
            )
            raise ValueError(
                f"the ranks' checkpoints hold no iteration in common (iterations held by {held_by}); remove "
                f"{self.path.name.replace(f'rank-{rank}-', 'rank-*-')} to start afresh"
            )
        return next(saved for saved in held if len(saved["history"]) == max(common))

    def _read(self, path: Path) -> dict | None:
        """The state saved in ``path`` (None when there is no such file); ValueError when it
        is damaged, not a checkpoint, or another fit's."""
        if not path.exists():
            return None
        metadata, arrays = _archive(path, "pnmf checkpoint", CHECKPOINT_FORMAT)
        differ = sorted(k for k in self.fingerprint if metadata["fingerprint"].get(k) != self.fingerprint[k])
        if differ:
            raise ValueError(
                f"the checkpoint {path} belongs to another fit (its {', '.join(differ)} differ from this "
                "fit's); remove it, or name another checkpoint path, to start afresh"
            )
        return {
            "phase": metadata["phase"],
            "phase_start": metadata["phase_start"],
            "key": arrays.pop("key"),
            "history": arrays.pop("history"),
            "monitors": list(metadata.get("monitors", [])),
            "state": {name[len("state.") :]: value for name, value in arrays.items()},
        }

    def save(
        self, phase: int, phase_start: int, state: dict, key: np.ndarray, history: list[float], monitors=()
    ) -> None:
        """Write the state of a fit ``len(history)`` iterations in (phase ``phase``, begun at ``phase_start``),
        with the phase's ``monitors`` (:func:`pnmf.loop.run`)."""
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "phase": phase,
            "phase_start": phase_start,
            "n_iter": len(history),
            "monitors": [float(v) for v in monitors],
        }
        arrays = {"state." + name: np.asarray(value) for name, value in state.items()}
        with open(self.partial, "wb") as handle:
            np.savez(handle, metadata=np.array(json.dumps(metadata)), key=key, history=np.asarray(history), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        if self.group is not None:
            # Rename only once every rank's state is on disk: a rank killed while writing then
            # leaves every rank's last checkpoint at the same iteration.
            self.group.all_sum_host(np.zeros(1))
        os.replace(self.partial, self.path)
