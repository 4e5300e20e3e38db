"""The one place that chooses between NumPy and CuPy.

Model maths takes an ``xp`` argument (the array module) and never imports CuPy
itself; CuPy is imported lazily, on first use, so CPU-only installs never need it.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

from .exceptions import BackendError

_INSTALL_HINT = "install the GPU extra: pip install 'dask-scar[gpu]' (CuPy for CUDA 12)"


def cupy() -> types.ModuleType:
    """Import and return CuPy, or raise :class:`BackendError` with an install hint."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendError(f"CuPy is not installed: {_INSTALL_HINT}") from exc
    return cp


def _is_cupy(array: Any) -> bool:
    # Checked by module name so that NumPy-only machines never import CuPy.
    return type(array).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays: Any) -> types.ModuleType:
    """The array module (``numpy`` or ``cupy``) that all ``arrays`` belong to.

    Scalars and ``None`` are ignored. Mixing NumPy and CuPy arrays raises
    :class:`BackendError`: silent host/device copies would hide a slow path.

    Examples
    --------
    >>> get_array_module(np.zeros(3)) is np
    True
    """
    kinds = set()
    for a in arrays:
        if a is None or np.isscalar(a):
            continue
        if _is_cupy(a):
            kinds.add("cupy")
        elif isinstance(a, np.ndarray):
            kinds.add("numpy")
        else:
            raise BackendError(f"expected a NumPy or CuPy array, got {type(a).__name__}")
    if len(kinds) > 1:
        raise BackendError(
            "NumPy and CuPy arrays were mixed in one call; move them to one device first "
            "with dask_scar.backend.to_device(array, xp) or to_host(array)"
        )
    return cupy() if kinds == {"cupy"} else np


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy of ``array`` (no copy when it already is NumPy)."""
    if _is_cupy(array):
        return array.get()
    return np.asarray(array)


def to_device(array: Any, xp: types.ModuleType) -> Any:
    """``array`` on the device of array module ``xp`` (``numpy`` or ``cupy``)."""
    if xp is np:
        return to_host(array)
    return xp.asarray(array)


def array_module(name: str) -> types.ModuleType:
    """``numpy`` for ``"numpy"``/``"cpu"``, ``cupy`` for ``"cupy"``/``"gpu"``."""
    if name in ("numpy", "cpu"):
        return np
    if name in ("cupy", "gpu"):
        return cupy()
    raise BackendError(f"unknown array backend {name!r}; use 'numpy' or 'cupy'")
