"""Shared parts of the models trained by (Nesterov) gradient descent on a weight matrix.

The single parameter ``"weights"`` has shape ``(n_features + 1, n_outputs)``: the
last row is the intercept, which is not penalised.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import DataError
from ._base import DataSummary, Model, ParameterSpec


class GradientModel(Model):
    """Gradient descent with optional Nesterov momentum on ``weights``.

    The objective is ``mean data loss + l2/2 * ||coef||^2``. With ``momentum=mu``
    the chunk also keeps a velocity ``v`` and the update is the Nesterov step in
    the form of Sutskever et al. (2013), which needs only the gradient at the
    stored point and so stays local to each chunk::

        v' = mu * v - lr * g
        w' = w - mu * v + (1 + mu) * v'
    """

    phases = (("weights",),)
    #: Rows a contribution must read for replicated updates to pay: an update touches each
    #: weight a few times in memory, a contribution spends ~4 flops per weight and row in
    #: BLAS, so below ~128 rows replicas add over ~10 % (100 MB of weights on 31-row
    #: blocks, benchmarks/bench_recovery.py: 4.9 s per iteration with them, 3.7 s without).
    REPLICA_MIN_ROWS = 128

    def __init__(self, l2: float = 0.0, learning_rate: float = 0.1, momentum: float = 0.0,
                 batch_size: int | None = None, random_state: int = 0):
        self.l2 = l2
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.batch_size = batch_size
        self.random_state = random_state

    def _check_hyperparameters(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of rows or None, got {self.batch_size}")

    def setup(self, summary: DataSummary) -> None:
        self._check_hyperparameters()
        super().setup(summary)
        self.features_ = [c.name for c in summary.features]
        self.n_features_ = len(self.features_)
        if self.n_features_ == 0:
            raise DataError(f"{type(self).__name__} needs at least one feature column")

    def _n_outputs(self) -> int:
        raise NotImplementedError

    def parameter_specs(self) -> dict[str, ParameterSpec]:
        return {"weights": ParameterSpec((self.n_features_ + 1, self._n_outputs()))}

    def new_state(self, name: str, value: Any) -> dict[str, Any]:
        state = {"value": value}
        if self.momentum:
            state["velocity"] = value * 0
        return state

    def replicate_updates(self, block_rows: int) -> bool:
        rows = block_rows if self.batch_size is None else self.batch_size * block_rows / self.n_rows_
        return rows >= self.REPLICA_MIN_ROWS

    def _batch(self, block: dict[str, Any], xp: types.ModuleType, iteration: int, block_id: int):
        """The rows of ``block`` used at ``iteration``: all, or a seeded minibatch share."""
        X, y = block["X"], block["y"]
        if self.batch_size is None or self.batch_size >= self.n_rows_:
            return X, y
        n = X.shape[0]
        take = max(1, int(round(self.batch_size * n / self.n_rows_)))
        rng = np.random.default_rng([self.random_state, iteration, block_id])
        rows = np.sort(rng.choice(n, size=min(take, n), replace=False))
        rows = xp.asarray(rows)
        return X[rows], y[rows]

    def penalty_of(self, weights: Any, xp: types.ModuleType) -> float:
        if not self.l2:
            return 0.0
        coef = weights[: self.n_features_]
        return 0.5 * self.l2 * float((coef.astype(xp.float64) ** 2).sum())

    def update(self, name, state, total, count, start, stop, xp):
        w = state["value"]
        g = total * (1.0 / count)
        if self.l2:
            # rows past n_features_ hold the intercept, which is not penalised
            penalised = min(stop, self.n_features_) - start
            if penalised > 0:
                g[:penalised] += self.l2 * w[:penalised]
        lr = self.learning_rate
        if not self.momentum:
            return {"value": w - lr * g}
        mu = self.momentum
        v = state["velocity"]
        v_new = mu * v - lr * g
        return {"value": w - mu * v + (1 + mu) * v_new, "velocity": v_new}

    # -- fitted model -------------------------------------------------------------
    @property
    def coef_(self) -> np.ndarray:
        """Coefficients, shape ``(n_features, n_outputs)``."""
        return self._fitted()["weights"][: self.n_features_]

    @property
    def intercept_(self) -> np.ndarray:
        return self._fitted()["weights"][self.n_features_]

    def _scores_numpy(self, X: np.ndarray) -> np.ndarray:
        w = self._fitted()["weights"]
        return X @ w[: self.n_features_] + w[self.n_features_]

    def _apply(self, data: Any, fn, columns: list[str] | None):
        """Apply ``fn`` (rows of features -> array) to NumPy, pandas or Dask data."""
        self._fitted()
        if hasattr(data, "map_partitions"):  # Dask DataFrame: stay lazy
            features = self.features_

            def on_partition(frame: pd.DataFrame):
                out = fn(frame[features].to_numpy(np.float32))
                if columns is None:
                    return pd.Series(out, index=frame.index)
                return pd.DataFrame(out, index=frame.index, columns=columns)

            meta = (pd.Series(dtype="float64") if columns is None
                    else pd.DataFrame({c: pd.Series(dtype="float64") for c in columns}))
            return data.map_partitions(on_partition, meta=meta)
        if isinstance(data, pd.DataFrame):
            data = data[self.features_].to_numpy(np.float32)
        X = np.asarray(data, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_:
            raise DataError(f"expected {self.n_features_} feature columns {self.features_}, got shape {X.shape}")
        return fn(X)
