"""Checkpoint policies: *which* blocks to save, and when. They never touch the store.

Every ``every`` iterations a policy selects a set of blocks out of all the
parameters' blocks (numbered 0..n-1 across parameters, in layout order); the
workers holding them write them. A policy that spends the same I/O as
``FullCheckpoint(every=C)`` saves ``fraction * n`` blocks every ``fraction * C``
iterations.

* :class:`FullCheckpoint` — every block (the traditional checkpoint);
* :class:`PrioritizedCheckpoint` — the blocks that moved most since they were last
  saved (SCAR);
* :class:`RoundRobinCheckpoint`, :class:`RandomCheckpoint` — the ablations.
"""

from __future__ import annotations

import inspect

import numpy as np

from . import config
from .models._base import check_number


class CheckpointPolicy:
    """Base class: saves ``fraction`` of the blocks every ``every`` iterations."""

    #: True when :meth:`select` needs each block's distance from its last saved value.
    needs_priorities = False
    fraction = 1.0

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = int(every)

    def due(self, iteration: int) -> bool:
        """Whether the state after ``iteration`` is checkpointed."""
        return iteration % self.every == 0

    def count(self, n_blocks: int) -> int:
        """Blocks saved per round."""
        return min(n_blocks, max(1, round(self.fraction * n_blocks)))

    def select(self, n_blocks: int, round: int, priorities: np.ndarray | None = None) -> np.ndarray:
        """Sorted indices of the blocks to save in round ``round`` (1, 2, ...)."""
        raise NotImplementedError

    def to_json(self) -> dict:
        """The policy as a store records it (:func:`from_json` builds it again)."""
        return {"class": type(self).__name__, "every": self.every, "fraction": self.fraction}

    def __repr__(self) -> str:
        names = inspect.signature(type(self)).parameters
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in names)})"


def _check_fraction(fraction: float) -> float:
    check_number("fraction", fraction, 0, 1, low_open=True)
    return float(fraction)


class FullCheckpoint(CheckpointPolicy):
    """Every block every ``every`` iterations: the traditional checkpoint."""

    def __init__(self, every: int = 20):
        super().__init__(every)

    def select(self, n_blocks: int, round: int, priorities: np.ndarray | None = None) -> np.ndarray:
        return np.arange(n_blocks)


class PrioritizedCheckpoint(CheckpointPolicy):
    """SCAR's prioritized partial checkpoint: every ``every`` iterations, the
    ``fraction`` of blocks with the largest ``||x_block - last_saved_block||`` --
    or, where restores extrapolate (``scar.recovery.extrapolate``, the default),
    the largest distance from where a restore would put the block now: its last
    saved version moved along the drift from the version before (see
    :func:`dask_scar.checkpoint.trend_factors`), or as saved where that is nearer
    (the block's drift turned, and a restore takes it as saved:
    :func:`dask_scar.checkpoint.distances`).

    The distances are computed on the workers that hold the chunks, against a
    copy of each block as last saved (as initialised, before its first save),
    and, to extrapolate, one of the version before, which those workers keep
    beside the chunk: **two extra copies of the parameters** (one with
    ``scar.recovery.extrapolate: false``), spread over the workers like the
    parameters themselves. Where that is too much, ``reference_dtype="float16"``
    keeps the copies at half the size of float32 parameters (distances then carry
    ~1e-3 relative error, which only matters for near-ties). Only one number per
    block travels to the driver (and, extrapolating, the list of blocks whose
    drift turned).

    With ``every = fraction * C`` it writes the same bytes per iteration as
    ``FullCheckpoint(every=C)``.
    """

    needs_priorities = True

    def __init__(self, fraction: float = 0.25, every: int = 5, reference_dtype: str | None = None):
        super().__init__(every)
        self.fraction = _check_fraction(fraction)
        if reference_dtype not in (None, "float16", "float32", "float64"):
            raise ValueError(f"reference_dtype must be None, 'float16', 'float32' or 'float64', "
                             f"got {reference_dtype!r}")
        self.reference_dtype = reference_dtype

    def select(self, n_blocks: int, round: int, priorities: np.ndarray | None = None) -> np.ndarray:
        if priorities is None or len(priorities) != n_blocks:
            raise ValueError(f"PrioritizedCheckpoint needs one priority per block ({n_blocks})")
        # stable sort: among equal priorities the lower block index goes first
        order = np.argsort(-np.asarray(priorities, dtype=float), kind="stable")
        return np.sort(order[: self.count(n_blocks)])

    def to_json(self) -> dict:
        return {**super().to_json(), "reference_dtype": self.reference_dtype}


class RoundRobinCheckpoint(CheckpointPolicy):
    """``fraction`` of the blocks every ``every`` iterations, in turn (ablation)."""

    def __init__(self, fraction: float = 0.25, every: int = 5):
        super().__init__(every)
        self.fraction = _check_fraction(fraction)

    def select(self, n_blocks: int, round: int, priorities: np.ndarray | None = None) -> np.ndarray:
        m = self.count(n_blocks)
        return np.sort((np.arange(m) + (round - 1) * m) % n_blocks)


class RandomCheckpoint(CheckpointPolicy):
    """``fraction`` of the blocks every ``every`` iterations, drawn at random (ablation)."""

    def __init__(self, fraction: float = 0.25, every: int = 5, seed: int = 0):
        super().__init__(every)
        self.fraction = _check_fraction(fraction)
        check_number("seed", seed, 0, integer=True)
        self.seed = int(seed)

    def select(self, n_blocks: int, round: int, priorities: np.ndarray | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, round])
        return np.sort(rng.choice(n_blocks, self.count(n_blocks), replace=False))

    def to_json(self) -> dict:
        return {**super().to_json(), "seed": self.seed}


def from_json(spec: dict | None) -> CheckpointPolicy | None:
    """The policy that :meth:`CheckpointPolicy.to_json` described, if it is one of this
    module's (None for another class: it cannot be rebuilt from its name)."""
    classes = {cls.__name__: cls for cls in (FullCheckpoint, PrioritizedCheckpoint, RoundRobinCheckpoint,
                                             RandomCheckpoint)}
    cls = classes.get((spec or {}).get("class"))
    if cls is None:
        return None
    names = inspect.signature(cls).parameters
    return cls(**{name: value for name, value in spec.items() if name in names})


def default_policy() -> CheckpointPolicy:
    """``PrioritizedCheckpoint`` with ``scar.checkpoint.fraction`` and ``scar.checkpoint.every``."""
    return PrioritizedCheckpoint(config.get("checkpoint.fraction"), config.get("checkpoint.every"))

