"""Matrix factorization of a ratings table by alternating least squares (ALS)."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pandas as pd

from ..exceptions import DataError
from ._base import (ID_HELP, Contribution, DataSummary, Model, ParameterSpec, check_ids, check_number,
                    require_columns, require_numeric, score_with, stable_seed)
from .linear import r2_score, squared_errors

_INIT_ROWS = 1024  # rows per seeded init block: init values do not depend on chunking


class MatrixFactorization(Model):
    """Low-rank factorization ``rating ~ user_factors[user] . item_factors[item]`` by ALS.

    Minimises ``1/n * (sum (r - u.v)^2 + l2 * (||U||^2 + ||V||^2))`` over the
    observed ratings. One iteration solves every user's row given the item factors,
    then every item's row given the new user factors (two phases). User and item
    ids must be non-negative integers; the factor matrices have ``max id + 1`` rows
    and are chunked by rows across the workers.

    Parameters
    ----------
    rank : int
        Factors per user and per item.
    l2 : float
        Ridge penalty on both factor matrices (scaled as in the objective above).
    user, item, rating : str
        Columns of the user id, the item id (non-negative integers) and the rating.
    init_scale : float
        Standard deviation of the initial factors (normal, around 0).
    random_state : int
        Seed of the initial factors.

    Examples
    --------
    >>> import dask_scar as scar
    >>> model = scar.MatrixFactorization(rank=16, l2=0.1)
    >>> scar.Trainer(client, model).fit(ratings_ddf)         # doctest: +SKIP
    >>> model.predict(ratings_ddf)                          # doctest: +SKIP
    """

    phases = (("user_factors",), ("item_factors",))
    feature_dtype = "int64"

    def __init__(self, rank: int = 16, l2: float = 0.1, user: str = "user", item: str = "item",
                 rating: str = "rating", init_scale: float = 0.1, random_state: int = 0):
        self.rank = rank
        self.l2 = l2
        self.user = user
        self.item = item
        self.rating = rating
        self.init_scale = init_scale
        self.random_state = random_state

    def select_columns(self, columns, target, features):
        return self._fixed_columns(features, target, self.rating, user=self.user, item=self.item)

    def feature_help(self) -> str:
        return ID_HELP.format(model=type(self).__name__)

    def check_params(self) -> None:
        check_number("rank", self.rank, 1, integer=True)
        check_number("l2", self.l2, 0)
        check_number("init_scale", self.init_scale, 0, low_open=True)
        check_number("random_state", self.random_state, 0, integer=True)

    def setup(self, summary: DataSummary) -> None:
        super().setup(summary)
        self.n_users_, self.n_items_ = (check_ids(column, summary.n_rows, "ids") for column in summary.features)
        self.target_ = summary.target.name     # fit(target=...) may name another column than rating=

    def parameter_specs(self) -> dict[str, ParameterSpec]:
        return {"user_factors": ParameterSpec((self.n_users_, self.rank)),
                "item_factors": ParameterSpec((self.n_items_, self.rank))}

    def init_rows(self, name, start, stop, xp=np):
        out = np.empty((stop - start, self.rank), dtype=np.float32)
        for blk in range(start // _INIT_ROWS, (stop - 1) // _INIT_ROWS + 1):
            lo, hi = blk * _INIT_ROWS, (blk + 1) * _INIT_ROWS
            rng = np.random.default_rng(stable_seed(self.random_state, name, blk))
            values = rng.standard_normal((_INIT_ROWS, self.rank)).astype(np.float32) * self.init_scale
            a, b = max(lo, start), min(hi, stop)
            out[a - start:b - start] = values[a - lo:b - lo]
        return xp.asarray(out)

    def phase_inputs(self, phase: int) -> tuple[str, ...]:
        # phase 0 also reads the user factors, to report the loss before the update
        return ("user_factors", "item_factors") if phase == 0 else ("user_factors",)

    def contribution(self, phase, block, params, xp, iteration=0, block_id=0):
        users, items, ratings = block["X"][:, 0], block["X"][:, 1], block["y"]
        U = params["user_factors"]
        if phase == 0:
            V = params["item_factors"]
            other = V[items]
            residual = ratings - (U[users] * other).sum(axis=1)
            loss = float((residual.astype(xp.float64) ** 2).sum())
            penalty = self.l2 * float((U.astype(xp.float64) ** 2).sum() + (V.astype(xp.float64) ** 2).sum())
            parts = {"user_factors": (users, other, ratings)}
            return Contribution(parts, count=len(ratings), loss=loss, penalty=penalty / self.n_rows_)
        parts = {"item_factors": (items, U[users], ratings)}
        return Contribution(parts, count=len(ratings))

    def combine(self, name, parts, start, stop, xp):
        """The normal equations ``(ids - start, A, b)`` of the rows ``start:stop`` that
        have ratings (rows without any need none, see :meth:`update`), from every
        block's part: its ratings' ids, the other side's factors, and the ratings.

        A block sends those rather than its own equations: ``rank + 2`` numbers per
        rating against ``rank * (rank + 1)`` per id, far less where ids have fewer
        than ~``rank`` ratings in a block.
        """
        pieces = []
        for ids, factors, ratings in parts:
            mine = (ids >= start) & (ids < stop)
            if not mine.all():
                ids, factors, ratings = ids[mine], factors[mine], ratings[mine]
            pieces.append((ids - start, factors, ratings))
        if len(pieces) > 1:
            pieces = [[xp.concatenate(column) for column in zip(*pieces)]]
        return _normal_equations(*pieces[0], xp)

    def update(self, name, state, total, count, start, stop, xp):
        rows, A, b = total
        # A row without ratings has A = 0 and b = 0: its solution is 0. A tiny ridge
        # keeps the others solvable when l2 = 0; it goes on the diagonal in place, as
        # combine built A for this update alone.
        value = xp.zeros((stop - start, self.rank), dtype=xp.float32)
        if len(rows):
            diagonal = xp.arange(self.rank)
            A[:, diagonal, diagonal] += self.l2 + 1e-9
            value[rows] = xp.linalg.solve(A, b[..., None])[..., 0]
        return {"value": value}

    # -- fitted model -------------------------------------------------------------
    def predict(self, data: Any) -> Any:
        """Predicted rating of each (user, item) row (a Dask Series for Dask input), with the
        factors fitted now: a lazy result does not follow a later fit."""
        params, user, item = self._fitted(), self.user, self.item
        if not hasattr(data, "columns"):
            raise DataError(f"{type(self).__name__}.predict needs a DataFrame with the columns user={user!r} "
                            f"and item={item!r}, got {type(data).__name__}")
        require_columns(data.columns, [user, item],
                        f": {type(self).__name__} reads the columns user={user!r} and item={item!r}")
        require_numeric(data.dtypes, [user, item], "user and item ids are integers, as for training")

        def on_frame(frame: pd.DataFrame):
            users, items = params["user_factors"], params["item_factors"]
            pred = (users[_ids(frame, user, len(users))] * items[_ids(frame, item, len(items))]).sum(axis=1)
            return pd.Series(pred, index=frame.index)

        if hasattr(data, "map_partitions"):
            return data.map_partitions(on_frame, meta=pd.Series(dtype="float32"))
        return on_frame(data).to_numpy()

    def score(self, data: Any, target: Any = None) -> float:
        """R^2 of the predicted ratings."""
        return score_with(self, data, self._ratings(target), squared_errors, finish=r2_score)

    def rmse(self, data: Any, target: Any = None) -> float:
        """Root mean squared error of the predicted ratings."""
        return score_with(self, data, self._ratings(target), lambda p, y: ((y - p) ** 2).mean() ** 0.5)

    def _ratings(self, target: Any) -> Any:
        """The ratings to score against: ``target``, or the column the model was fitted on."""
        return getattr(self, "target_", self.rating) if target is None else target


def _ids(frame: pd.DataFrame, column: str, n: int) -> np.ndarray:
    """``frame[column]`` as row numbers of a factor matrix of ``n`` rows, checked."""
    values = frame[column].to_numpy(np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        ids = values.astype(np.int64)
    bad = (ids != values) | (ids < 0) | (ids >= n)
    if bad.any():
        raise DataError(f"column {column!r} must hold integer ids in the fitted range 0..{n - 1}; "
                        f"{bad.sum():,} rows do not (the first holds {values[bad][0]:g})")
    return ids


def _normal_equations(ids, factors, ratings, xp: types.ModuleType, most: int = 65536):
    """Per id: ``A = sum f f^T`` and ``b = sum r f`` over the rows with that id.

    Returns ``(unique sorted ids, A (m, k, k), b (m, k))`` in float64. On the CPU the
    rows are sorted by id, and the ids with the same number of rows are stacked, at
    most ``most`` rows at a time, for batched products: ~20 times faster than adding
    each row's outer product in place.
    """
    if xp is not np:
        return _normal_equations_scattered(ids, factors, ratings, xp)
    order = np.argsort(ids, kind="stable")
    unique, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
    k = factors.shape[1]
    f, r = factors[order].astype(np.float64), ratings[order].astype(np.float64)
    A, b = np.empty((len(unique), k, k)), np.empty((len(unique), k))
    for count in np.unique(counts):
        same = np.flatnonzero(counts == count)
        step = max(1, most // int(count))
        for s in range(0, len(same), step):
            group = same[s:s + step]
            rows = starts[group, None] + np.arange(count)          # (ids, count)
            stacked = f[rows]                                      # (ids, count, k)
            A[group] = stacked.transpose(0, 2, 1) @ stacked
            b[group] = (r[rows][:, None, :] @ stacked)[:, 0]
    return unique, A, b


def _normal_equations_scattered(ids, factors, ratings, xp: types.ModuleType, tile: int = 16384):
    """:func:`_normal_equations` by adding every row's outer product in place (the GPU's way)."""
    unique, inverse = xp.unique(ids, return_inverse=True)
    k = factors.shape[1]
    A = xp.zeros((len(unique), k, k))
    b = xp.zeros((len(unique), k))
    for s in range(0, len(ids), tile):
        f = factors[s:s + tile].astype(xp.float64)
        rows = inverse[s:s + tile]
        xp.add.at(A, rows, f[:, :, None] * f[:, None, :])
        xp.add.at(b, rows, f * ratings[s:s + tile, None])
    return unique, A, b
