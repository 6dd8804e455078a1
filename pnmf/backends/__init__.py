"""Backends: one framework per module, imported only when asked for."""

from __future__ import annotations

import importlib
import platform
import sys

from packaging.version import InvalidVersion, Version

from .base import Backend

BACKENDS = ("numpy", "torch", "mlx")

_INSTALL = {
    "torch": 'pip install "pnmf-vi[torch]"   (or: pip install torch)',
    "mlx": 'pip install "pnmf-vi[mlx]"   (Metal on a Mac, the CPU elsewhere; NVIDIA: pip install "pnmf-vi[cuda13]")',
}

# The oldest releases the tests pass on (docs/install.md). Older MLX lacks
# ``mx.is_available`` and its ``mlx.launch`` reads ``-- python script.py`` as a script named
# python.
MINIMUM = {"torch": "2.2", "mlx": "0.32"}
_FRAMEWORK_MODULE = {"torch": "torch", "mlx": "mlx.core"}

_CLASSES = {
    "numpy": ("numpy", "NumpyBackend"),
    "torch": ("torch", "TorchBackend"),
    "mlx": ("mlx", "MLXBackend"),
}


def _older(installed: str, needed: str) -> bool:
    """Whether version ``installed`` is a release before ``needed`` (False when unreadable)."""
    try:
        return Version(installed).release < Version(needed).release
    except InvalidVersion:
        return False


def _module(name: str):
    """Import the backend module ``name``; ImportError with the fix when its framework is
    missing or older than pnmf needs."""
    try:
        module = importlib.import_module(f"{__name__}.{_CLASSES[name][0]}")
    except ImportError as err:
        raise ImportError(f"backend={name!r} needs {name}, which is not installed: {_INSTALL[name]}") from err
    if name in MINIMUM:
        installed = str(getattr(sys.modules[_FRAMEWORK_MODULE[name]], "__version__", ""))
        if _older(installed, MINIMUM[name]):
            raise ImportError(
                f"backend={name!r} needs {name} >= {MINIMUM[name]}, and {name} {installed} is installed: "
                + _INSTALL[name].replace("pip install", "pip install -U")
            )
    return module


def available() -> list[str]:
    """The backends whose framework imports here (torch, MLX, NumPy)."""
    found = []
    for name in ("torch", "mlx", "numpy"):
        try:
            _module(name)
        except ImportError:
            continue
        found.append(name)
    return found


def _auto(sparse: bool = False) -> tuple[str, str | None]:
    """MLX on an Apple-silicon GPU, torch on CUDA, torch on MPS, then the fastest CPU choice.

    On the CPU that is NumPy for dense counts (torch and MLX run the dense hot loop through
    NumPy there and add their own overhead per operation: on the seed setting 0.31 against
    0.46 ms per natural iteration) and torch for sparse counts (its sampled products are
    faster than NumPy's: 1.2-2.4x against 3.4x the time of two SciPy products at 5e6
    non-zeros).
    """
    names = available()
    if "mlx" in names and platform.system() == "Darwin":
        import mlx.core as mx

        if mx.metal.is_available():
            return "mlx", "gpu"
    if "torch" in names:
        import torch

        if torch.cuda.is_available():
            return "torch", "cuda"
        if torch.backends.mps.is_available():
            return "torch", "mps"
        if sparse:
            return "torch", "cpu"
    return "numpy", "cpu"


def gpu_devices() -> list[tuple[str, str]]:
    """(backend, device) of every GPU an installed framework can use: torch on CUDA or MPS,
    MLX on its GPU (Metal, or CUDA with ``mlx[cuda13]``)."""
    names, found = available(), []
    if "torch" in names:
        import torch

        if torch.cuda.is_available():
            found.append(("torch", "cuda"))
        elif torch.backends.mps.is_available():
            found.append(("torch", "mps"))
    if "mlx" in names:
        import mlx.core as mx

        if mx.is_available(mx.gpu):
            found.append(("mlx", "gpu"))
    return found


def get_backend(name: str = "auto", device: str | None = None, dtype: str = "float32", sparse: bool = False) -> Backend:
    """The backend ``name`` ('auto', 'numpy', 'torch', 'mlx') on ``device`` with ``dtype``.

    ``sparse`` says the counts are sparse, which is what 'auto' picks by on a CPU. With
    'auto' and a ``device``, the device picks the framework: 'cuda' and 'mps' torch, 'gpu'
    MLX, 'cpu' the CPU's choice.
    """
    if name == "auto" and device is not None and device != "cpu":
        # The device names its framework: CUDA and MPS are torch's, 'gpu' is MLX's.
        name = "mlx" if device == "gpu" else "torch"
    elif name == "auto":
        name, auto_device = _auto(sparse)
        device = auto_device if device is None else device
        if device == "cpu" and auto_device != "cpu":  # a GPU here, the CPU asked for
            name = "torch" if sparse and "torch" in available() else "numpy"
    if name not in _CLASSES:
        raise ValueError(f"backend={name!r} is not one of 'auto', " + ", ".join(repr(b) for b in BACKENDS))
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r} is not one of 'float32', 'float64'")
    return getattr(_module(name), _CLASSES[name][1])(device=device, dtype=dtype)


__all__ = ["BACKENDS", "Backend", "available", "get_backend", "gpu_devices"]
