"""Least-squares linear regression with L2 regularisation (ridge)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base import Contribution, score_with
from ._gradient import GradientModel, scores


class LinearRegression(GradientModel):
    """Linear least squares trained by gradient descent.

    Minimises ``1/(2n) * ||X w + b - y||^2 + l2/2 * ||w||^2`` (the intercept is
    not penalised). Scale the features for the default learning rate to be stable.
    The parameters are those of :class:`SoftmaxRegression` (``solver="lbfgs"`` too).

    Examples
    --------
    >>> import dask_scar as scar
    >>> model = scar.LinearRegression(l2=0.0, learning_rate=0.1, momentum=0.9)
    >>> scar.Trainer(client, model).fit(ddf, target="y")   # doctest: +SKIP
    >>> model.coef_                                        # doctest: +SKIP
    """

    def _n_outputs(self) -> int:
        return 1

    @property
    def coef_(self) -> np.ndarray:
        """Coefficients, shape ``(n_features,)`` (as scikit-learn's for one target)."""
        return super().coef_[0]

    @property
    def intercept_(self) -> float:
        """The intercept, a number (scikit-learn's for one target)."""
        return float(super().intercept_[0])

    def contribution(self, phase, block, params, xp, iteration=0, block_id=0):
        X, y = self._batch(block, xp, iteration, block_id)
        weights = params["weights"]
        d, n = self.n_features_, X.shape[0]
        coef, intercept = weights[:d, 0], weights[d, 0]
        grad = xp.zeros_like(weights)
        residual_sum, squares = xp.zeros((), dtype=xp.float64), xp.zeros((), dtype=xp.float64)
        tile = self._tile_rows(n, xp)      # the block is read from memory once, not twice
        for s in range(0, n, tile):
            Xb = X[s:s + tile]
            residual = Xb @ coef + intercept - y[s:s + tile]
            grad[:d, 0] += residual @ Xb
            residual_sum += residual.sum(dtype=xp.float64)
            wide = residual.astype(xp.float64)
            squares += wide @ wide
        grad[d, 0] = residual_sum
        return Contribution({"weights": grad}, count=n, loss=0.5 * float(squares),
                            penalty=self.penalty_of(weights, xp))

    def predict(self, data: Any) -> Any:
        """Predicted target of each row (a Dask Series for Dask input)."""
        return self._apply(data, lambda X, weights: scores(X, weights)[:, 0], columns=None)

    def score(self, data: Any, target: str | Any) -> float:
        """Coefficient of determination R^2 of the predictions."""
        return score_with(self, data, target, squared_errors, finish=r2_score)


def squared_errors(pred, y) -> tuple:
    """The residual and the total sum of squares of the labels ``y`` (lazy for Dask inputs)."""
    return ((y - pred) ** 2).sum(), ((y - y.mean()) ** 2).sum()


def r2_score(sums: tuple) -> float:
    """R^2 from :func:`squared_errors`' computed sums. For a constant target (no total
    sum of squares) 1.0 where every prediction is right, else 0.0, as scikit-learn's
    ``r2_score`` (``force_finite=True``), not NaN or -inf."""
    residual, total = sums
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return 1.0 - residual / total
