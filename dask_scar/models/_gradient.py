"""Shared parts of the models trained by (Nesterov) gradient descent on a weight matrix.

The single parameter ``"weights"`` has shape ``(n_features + 1, n_outputs)``: the
last row is the intercept, which is not penalised.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any

import numpy as np
import pandas as pd

from .. import config
from ..exceptions import DataError, DataWarning, callers_level
from ._base import DataSummary, Model, ParameterSpec, check_number, require_columns, require_numeric


SOLVERS = ("gd", "lbfgs")
ARMIJO = 1e-4   # sufficient decrease a trial point must show, as a fraction of the predicted one
#: The most a kernel's per-tile temporaries take: with many classes (150,000 labels,
#: a price column taken for classes) 4096 rows' would take 4.9 GB a worker.
TILE_BYTES = 256 * 2**20
#: A feature column whose values pass this size gets a warning: next to the intercept's
#: column of ones, it makes the objective ill-conditioned. On 3 scaled features plus one
#: around 1,000 (offset or spread), L-BFGS stopped at ``tol=1e-6`` at the initial loss
#: (1.097 against 0.560); around 100, within 0.02 %; gradient descent diverged on both.
UNSCALED = 1e3


class GradientModel(Model):
    """Gradient descent with optional Nesterov momentum, or L-BFGS, on ``weights``.

    The objective is ``mean data loss + l2/2 * ||coef||^2``. With ``momentum=mu``
    the chunk also keeps a velocity ``v`` and the update is the Nesterov step in
    the form of Sutskever et al. (2013), which needs only the gradient at the
    stored point and so stays local to each chunk::

        v' = mu * v - lr * g
        w' = w - mu * v + (1 + mu) * v'

    With ``solver="lbfgs"`` every update task holds every chunk (replicated
    updates, see :meth:`replicate_updates`) and runs L-BFGS's two-loop recursion
    over all of them, with the line search spread over iterations: each iteration
    evaluates one trial point ``base + t * direction``. A trial that decreases the
    objective enough (Armijo) becomes the new base and the next direction starts
    with ``t = 1``; one that does not is replaced by a shorter step from the same
    base. So an iteration costs one pass over the data, as with gradient descent.
    Each chunk keeps ``2 * memory + 4`` arrays of its size; when the chunks' states
    disagree (a recovery restored some of them) the memory starts afresh from the
    current point.
    """

    phases = (("weights",),)
    #: Rows a contribution must read for replicated updates to pay on any model: an update
    #: touches each weight a few times in memory, a contribution spends ~4 flops per weight
    #: and row in BLAS, so below ~128 rows replicas add over ~10 % (100 MB of weights on
    #: 31-row blocks, benchmarks/bench_recovery.py: 4.9 s per iteration with them, 3.7 s
    #: without).
    REPLICA_MIN_ROWS = 128
    #: Weights (bytes) that replicate on blocks of any rows: their updates and the
    #: workers' exchange cost less than a task graph per iteration, which a model that
    #: does not replicate runs instead of segments. benchmarks/bench_minibatch.py
    #: (minibatches of 100 on 2 workers): replicated, 0.05-0.06 of the time per
    #: iteration at 340 bytes of weights, 0.10-0.11 at 0.4 MB, 0.49-0.57 at 8 MB; at
    #: 32 MB about the same time either way (measured with 2 workers only).
    REPLICA_ANY_BYTES = 8 * 2**20

    def __init__(self, l2: float = 0.0, learning_rate: float = 0.1, momentum: float = 0.0,
                 batch_size: int | None = None, random_state: int = 0, solver: str = "gd", memory: int = 10):
        self.l2 = l2
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.batch_size = batch_size
        self.random_state = random_state
        self.solver = solver
        self.memory = memory

    def check_params(self) -> None:
        check_number("learning_rate", self.learning_rate, 0, low_open=True)
        check_number("momentum", self.momentum, 0, 1, high_open=True)
        check_number("l2", self.l2, 0)
        check_number("random_state", self.random_state, 0, integer=True)
        if self.batch_size is not None:
            check_number("batch_size (rows per minibatch, or None)", self.batch_size, 1, integer=True)
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.solver == "lbfgs":
            if self.batch_size is not None:
                raise ValueError("solver='lbfgs' needs the whole data in every iteration: use batch_size=None, "
                                 "or solver='gd' for minibatch SGD")
            if self.momentum:
                raise ValueError("momentum applies to solver='gd' only; use momentum=0 with solver='lbfgs'")
            check_number("memory (L-BFGS correction pairs)", self.memory, 1, integer=True)

    def setup(self, summary: DataSummary) -> None:
        super().setup(summary)
        far = [(c.name, max(abs(c.min), abs(c.max))) for c in summary.features
               if max(abs(c.min), abs(c.max)) > UNSCALED]
        if far:
            shown = ", ".join(f"{name!r} (up to {size:.3g})" for name, size in far[:5])
            warnings.warn(f"feature column(s) {shown}{', ...' if len(far) > 5 else ''} lie far from zero, next to "
                          "the intercept's column of ones: gradient descent diverges or crawls on such features, and "
                          "L-BFGS may stop far from the optimum where the loss barely moves (converged=True on a "
                          "model that has not learned). "
                          "Scale the features first: subtract each column's mean and divide by its standard "
                          "deviation", DataWarning, stacklevel=callers_level())
        self.features_ = [c.name for c in summary.features]
        self.n_features_ = len(self.features_)
        self.tile_rows_ = config.get("tile-rows")   # read here: the workers' settings may differ

    def _n_outputs(self) -> int:
        raise NotImplementedError

    def parameter_specs(self) -> dict[str, ParameterSpec]:
        return {"weights": ParameterSpec((self.n_features_ + 1, self._n_outputs()))}

    def new_state(self, name: str, value: Any) -> dict[str, Any]:
        state = {"value": value}
        if self.momentum and self.solver == "gd":
            state["velocity"] = value * 0
        return state

    def restore_slots(self, state: dict[str, Any], step: Any) -> None:
        # Nesterov's velocity is the step per iteration, where the step keeps its direction
        if "velocity" in state:
            state["velocity"] = step

    def replicate_updates(self, block_rows: int) -> bool:
        if self.solver == "lbfgs":
            return True     # its step needs every chunk
        rows = block_rows if self.batch_size is None else self.batch_size * block_rows / self.n_rows_
        weights = self.parameter_specs()["weights"]
        size = int(np.prod(weights.shape)) * np.dtype(weights.dtype).itemsize
        return rows >= self.REPLICA_MIN_ROWS or size <= self.REPLICA_ANY_BYTES

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

    def _tile_rows(self, n: int, xp: types.ModuleType, row_bytes: int = 0) -> int:
        """Rows per tile of a kernel's loop over ``n`` rows: ``scar.tile-rows`` (as the
        driver had it at :meth:`setup`) on the CPU (a tile stays in cache from the first
        product to the second), all on a GPU; fewer where the tile's temporaries,
        ``row_bytes`` a row, would pass :data:`TILE_BYTES`."""
        tiles = getattr(self, "tile_rows_", None) or config.get("tile-rows")     # (a model not set up)
        tile = n if xp is not np else min(n, tiles)
        return max(1, min(tile, TILE_BYTES // row_bytes) if row_bytes else tile)

    def penalty_of(self, weights: Any, xp: types.ModuleType) -> float:
        if not self.l2:
            return 0.0
        coef = weights[: self.n_features_]
        return 0.5 * self.l2 * float((coef.astype(xp.float64) ** 2).sum())

    def _gradient(self, w, total, count, start, stop):
        """The objective's gradient for rows ``start:stop`` (``total``: the summed data part)."""
        g = total * (1.0 / count)
        if self.l2:
            # rows past n_features_ hold the intercept, which is not penalised
            penalised = min(stop, self.n_features_) - start
            if penalised > 0:
                g[:penalised] += self.l2 * w[:penalised]
        return g

    def update(self, name, state, total, count, start, stop, xp):
        w = state["value"]
        g = self._gradient(w, total, count, start, stop)
        lr = self.learning_rate
        if not self.momentum:
            return {"value": w - lr * g}
        mu = self.momentum
        v = state["velocity"]
        v_new = mu * v - lr * g
        return {"value": w - mu * v + (1 + mu) * v_new, "velocity": v_new}

    @property
    def line_search(self) -> bool:
        return self.solver == "lbfgs"

    def update_chunks(self, states, totals, count, loss, xp):
        if self.solver != "lbfgs":
            return super().update_chunks(states, totals, count, loss, xp)
        ids = sorted(states, key=lambda c: c.start)
        if [c.start for c in ids] != [0, *(c.stop for c in ids[:-1])] or ids[-1].stop != self.n_features_ + 1:
            raise RuntimeError(f"an L-BFGS update needs every chunk of the weights; it got rows "
                               f"{[(c.start, c.stop) for c in ids]} of {self.n_features_ + 1}")
        x = {c: states[c]["value"] for c in ids}
        g = {c: self._gradient(x[c], totals[c], count, c.start, c.stop) for c in ids}

        def dot(a, b) -> float:    # over all chunks, in float64, in one fixed order: replicas agree
            return sum(float((a[c].astype(xp.float64) * b[c]).sum()) for c in ids)

        meta = states[ids[0]].get("lbfgs")
        if meta is None or any(states[c].get("lbfgs") != meta for c in ids):
            # the first iteration, or chunks from different points (a recovery): start afresh
            meta, s_pairs, y_pairs = None, [], []
        else:
            s_pairs = [{c: states[c]["s"][i] for c in ids} for i in range(len(meta["sy"]))]
            y_pairs = [{c: states[c]["y"][i] for c in ids} for i in range(len(meta["sy"]))]
            base, grad, direction = ({c: states[c][k] for c in ids} for k in ("base", "grad", "direction"))
            t, f_base, slope = meta["t"], meta["f"], meta["slope"]
        if meta is not None and not (math.isfinite(loss) and loss <= f_base + ARMIJO * t * slope):
            # the trial point is not good enough: a shorter step from the same base, at the
            # minimum of the quadratic through f(base), its slope and f(trial), within [t/10, t/2]
            curvature = loss - f_base - slope * t
            shrink = -slope * t / (2 * curvature) if math.isfinite(loss) and curvature > 0 else 0.1
            t *= min(0.5, max(0.1, shrink))
            sy = meta["sy"]
        else:
            sy = meta["sy"] if meta is not None else ()
            if meta is not None:   # the trial is the new base; remember the curvature pair
                s_new = {c: x[c] - base[c] for c in ids}
                y_new = {c: g[c] - grad[c] for c in ids}
                sy_new, yy = dot(s_new, y_new), dot(y_new, y_new)
                if sy_new > 1e-10 * yy > 0:
                    s_pairs, y_pairs = (s_pairs + [s_new])[-self.memory:], (y_pairs + [y_new])[-self.memory:]
                    sy = (sy + (sy_new,))[-self.memory:]
            base, grad, f_base = x, g, loss
            direction = self._two_loop(g, s_pairs, y_pairs, sy, dot)
            slope = dot(grad, direction)
            if not slope < 0:      # not a descent direction (rounding): forget the pairs
                s_pairs, y_pairs, sy = [], [], ()
                direction = {c: -g[c] for c in ids}
                slope = dot(grad, direction)
            t = 1.0 if s_pairs else self.learning_rate
        meta = {"f": f_base, "t": t, "slope": slope, "sy": sy, "step": (meta or {}).get("step", 0) + 1}
        return {c: {"value": base[c] + t * direction[c], "base": base[c], "grad": grad[c],
                    "direction": direction[c], "s": tuple(p[c] for p in s_pairs),
                    "y": tuple(p[c] for p in y_pairs), "lbfgs": meta} for c in ids}

    @staticmethod
    def _two_loop(g, s_pairs, y_pairs, sy, dot):
        """``-H g`` for L-BFGS's inverse-Hessian estimate ``H`` from the pairs (oldest first)."""
        q = {c: v.copy() for c, v in g.items()}
        alphas = []
        for s, y, rho_inv in zip(reversed(s_pairs), reversed(y_pairs), reversed(sy)):
            a = dot(s, q) / rho_inv
            alphas.append(a)
            for c in q:
                q[c] -= a * y[c]
        if s_pairs:
            gamma = sy[-1] / dot(y_pairs[-1], y_pairs[-1])
            for c in q:
                q[c] *= gamma
        for s, y, rho_inv, a in zip(s_pairs, y_pairs, sy, reversed(alphas)):
            b = dot(y, q) / rho_inv
            for c in q:
                q[c] += (a - b) * s[c]
        return {c: -v for c, v in q.items()}

    def fitted_value(self, state):
        # L-BFGS: the last accepted point (its objective was measured), not the trial beyond it
        return state.get("base", state["value"])

    # -- fitted model -------------------------------------------------------------
    @property
    def coef_(self) -> np.ndarray:
        """Coefficients, shaped as scikit-learn's: ``(n_classes, n_features)`` (a
        view of ``params_["weights"]``, which holds them transposed, the intercepts
        in its last row)."""
        return self._fitted()["weights"][: self.n_features_].T

    @property
    def intercept_(self) -> np.ndarray:
        """Intercepts, shape ``(n_classes,)``."""
        return self._fitted()["weights"][self.n_features_]

    def _apply(self, data: Any, fn, columns: list[str] | None):
        """``fn(rows of features, weights)`` (an array) on NumPy, pandas or Dask data, with
        the weights and features fitted now: a lazy result does not follow a later fit."""
        weights, features = self._fitted()["weights"], self.features_
        if hasattr(data, "map_partitions") and getattr(data, "ndim", 2) == 1:
            raise DataError(f"expected the {len(features)} feature column(s) as a frame, got a Dask Series: pass "
                            "the frame, or series.to_frame()")
        if hasattr(data, "columns"):
            has = list(data.columns)
            require_columns(data.columns, features, f": the model was fitted on {features}; the data has "
                                                    f"{has[:20]}{f' and {len(has) - 20} more' if len(has) > 20 else ''}")
            require_numeric(data.dtypes, features, "the model was fitted on numbers: encode them as for training")
        if hasattr(data, "map_partitions"):  # Dask DataFrame: stay lazy

            def on_partition(frame: pd.DataFrame):
                out = fn(_finite(_floats(frame[features]), features), weights)
                if columns is None:
                    return pd.Series(out, index=frame.index)
                return pd.DataFrame(out, index=frame.index, columns=columns)

            return data.map_partitions(on_partition, meta=on_partition(data._meta))
        if isinstance(data, pd.DataFrame):
            data = _floats(data[features])
        try:
            with np.errstate(over="ignore"):      # (beyond float32's range: inf, which _finite names)
                X = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            if type(data).__module__.startswith("cupy"):
                raise DataError("predictions take NumPy, pandas or Dask data: pass cupy.asnumpy(X)") from None
            raise DataError(f"the data to predict on must be numbers ({exc}): the model was fitted on "
                            f"{len(features)} numeric columns") from None
        if X.ndim != 2 or X.shape[1] != len(features):
            raise DataError(f"expected {len(features)} feature columns {features}, got shape {X.shape}")
        return fn(_finite(X, features), weights)


def scores(X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``X @ coef + intercept`` for ``weights`` that hold the intercepts in their last row."""
    return X @ weights[:-1] + weights[-1]


def _floats(frame: pd.DataFrame) -> np.ndarray:
    """``frame`` as float32, NA as NaN, values beyond float32's range as inf (no warning)."""
    with np.errstate(over="ignore"):
        return frame.to_numpy(np.float32, na_value=np.nan)


def _finite(X: np.ndarray, features: list) -> np.ndarray:
    """``X``, checked to hold finite values only (as training did)."""
    finite = np.isfinite(X).all(axis=0)
    if not finite.all():
        bad = [name for name, ok in zip(features, finite) if not ok]
        raise DataError(f"NaN/inf values (or values beyond float32's range) in column(s) {bad}: drop or fill "
                        "those rows before predicting")
    return X
