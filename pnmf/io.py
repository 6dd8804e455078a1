"""Portable model files: NumPy arrays and JSON metadata in one ``.npz``, no pickle."""

from __future__ import annotations

import json
import platform
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "pnmf-model"
FORMAT_VERSION = 1
ARRAYS = ("mean_", "var_", "loadings_", "elbo_history_")
SCALARS = ("elbo_", "n_iter_", "converged_", "backend_", "device_", "n_features_in_")


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
        "fitted": {name: _plain(getattr(model, name)) for name in SCALARS},
        "feature_names_in": [str(f) for f in getattr(model, "feature_names_in_", [])] or None,
        "versions": {"pnmf": __version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    arrays = {name: np.asarray(getattr(model, name), dtype=np.float64) for name in ARRAYS}
    with open(path, "wb") as handle:
        np.savez(handle, metadata=np.array(json.dumps(metadata)), **arrays)
    return path


def load(cls, path, backend: str | None = None, device: str | None = None):
    """Read a model written by ``save``; ``backend``/``device`` choose where it will run."""
    from .backends import get_backend

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data["metadata"][()]))
            arrays = {name: np.array(data[name]) for name in ARRAYS}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, EOFError) as err:
        raise ValueError(f"{path} is not a pnmf model file (or is damaged): {err}") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pnmf model file: no '{FORMAT}' metadata")
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
        setattr(model, name, fitted[name])
    model.components_ = model.loadings_.T
    if metadata.get("feature_names_in"):
        model.feature_names_in_ = np.asarray(metadata["feature_names_in"], dtype=object)
    if backend is not None:
        chosen = get_backend(backend, device, params["dtype"])
        model.backend_, model.device_ = chosen.name, chosen.device
    return model


def _plain(value):
    """A JSON-friendly copy of a NumPy scalar."""
    return value.item() if isinstance(value, np.generic) else value
