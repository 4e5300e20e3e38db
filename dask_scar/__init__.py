"""dask_scar: fault-tolerant data-parallel training on Dask (after SCAR, ICML 2019)."""

from . import config  # noqa: F401  (registers the scar.* defaults with dask.config)
from .exceptions import (
    BackendError,
    DataError,
    DivergenceError,
    NotFittedError,
    ScarError,
    WorkerLostError,
)
from .models import LinearRegression, MatrixFactorization, SoftmaxRegression
from .plugin import ScarPlugin
from .trainer import FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "DataError",
    "DivergenceError",
    "FitResult",
    "LinearRegression",
    "MatrixFactorization",
    "NotFittedError",
    "ScarError",
    "ScarPlugin",
    "SoftmaxRegression",
    "Trainer",
    "WorkerLostError",
]
