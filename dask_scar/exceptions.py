"""Errors raised by dask_scar.

Every error derives from :class:`ScarError` and also from the builtin that
describes it best, so ``except ValueError`` keeps working for callers that do not
know this library.
"""

from __future__ import annotations

import os
import sys


class ScarError(Exception):
    """Root of every error raised by dask_scar."""


class DataError(ScarError, ValueError):
    """The training data cannot be used as given (column, dtype or value problem)."""


class BackendError(ScarError, TypeError):
    """Arrays from different backends (NumPy and CuPy) were mixed, a backend is missing, or
    the model does not run on the backend asked for (LDA on CuPy)."""


class DivergenceError(ScarError, FloatingPointError):
    """The loss became non-finite or grew without bound during training, at ``iteration``."""

    iteration: int | None = None


class WorkerLostError(ScarError, RuntimeError):
    """The cluster has no worker, and none joined within ``scar.recovery.wait-for-workers``
    (all lost, or a batch job's workers not started yet)."""


class SchedulerLostError(ScarError, ConnectionError):
    """The driver lost its scheduler while training; ``fit(..., resume=True)`` continues from the store."""


class NotFittedError(ScarError, AttributeError):
    """A model was asked to predict before it was fitted."""


class MissingPackageError(ScarError, ImportError):
    """A package that a path or URL needs is not installed (the message says which)."""


class CheckpointError(ScarError, OSError):
    """The checkpoint store cannot be written or read (path, permission, corrupt block)."""


class StoreMismatchError(ScarError, ValueError):
    """A checkpoint store was written for another model, shape or dtype."""


class ScarWarning(UserWarning):
    """Root of every warning dask_scar gives: ``warnings.filterwarnings("ignore",
    category=dask_scar.ScarWarning)`` silences them all, a subclass one kind."""


class DataWarning(ScarWarning):
    """The data trains, but maybe not as meant: features far from zero (scale them),
    labels or ids that leave classes or rows without data."""


class RecoveryWarning(ScarWarning):
    """A recovery left something the fit could not mend: chunks restored after the last
    iteration, which no iteration trained since."""


class CheckpointWarning(ScarWarning):
    """Something about the checkpoint store the fit goes on despite: a write failed (the
    store keeps its older blocks), the store was deleted or taken over by another run,
    or a resume differs from what the store was written with (hyper-parameters, policy,
    a diverged fit's versions forgotten, a store with nothing left to train)."""


def callers_level() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller point
    at the first frame outside dask_scar (the user's ``fit`` call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
