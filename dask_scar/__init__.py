"""dask_scar: fault-tolerant data-parallel training on Dask (after SCAR, ICML 2019)."""

from . import config  # noqa: F401  (registers the scar.* defaults with dask.config)
from .exceptions import (
    BackendError,
    CheckpointError,
    CheckpointWarning,
    DataError,
    DataWarning,
    DivergenceError,
    MissingPackageError,
    NotFittedError,
    RecoveryWarning,
    ScarError,
    ScarWarning,
    SchedulerLostError,
    StoreMismatchError,
    WorkerLostError,
)
from .models import LDA, LinearRegression, MatrixFactorization, SoftmaxRegression
from .plugin import ScarPlugin
from .recovery import RecoveryEvent
from .policy import (
    CheckpointPolicy,
    FullCheckpoint,
    PrioritizedCheckpoint,
    RandomCheckpoint,
    RoundRobinCheckpoint,
)
from .store import CheckpointStore, ZarrStore, open_store
from .trainer import FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CheckpointError",
    "CheckpointPolicy",
    "CheckpointStore",
    "CheckpointWarning",
    "FullCheckpoint",
    "PrioritizedCheckpoint",
    "RecoveryEvent",
    "RandomCheckpoint",
    "RoundRobinCheckpoint",
    "StoreMismatchError",
    "ZarrStore",
    "open_store",
    "DataError",
    "DataWarning",
    "DivergenceError",
    "FitResult",
    "LDA",
    "LinearRegression",
    "MatrixFactorization",
    "MissingPackageError",
    "NotFittedError",
    "RecoveryWarning",
    "ScarError",
    "ScarWarning",
    "SchedulerLostError",
    "ScarPlugin",
    "SoftmaxRegression",
    "Trainer",
    "WorkerLostError",
]
