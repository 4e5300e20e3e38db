"""Multinomial logistic regression (softmax regression) with L2 regularisation."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..exceptions import DataError, DataWarning, callers_level
from ._base import Contribution, DataSummary, check_ids, score_with
from ._gradient import GradientModel, scores


class SoftmaxRegression(GradientModel):
    """Multinomial logistic regression trained by full-batch gradient descent or minibatch SGD.

    Minimises ``mean cross-entropy + l2/2 * ||coef||^2`` (the intercept is not
    penalised), the objective of scikit-learn's ``LogisticRegression(C=1/(l2*n))``.
    Class labels are the integers ``0 .. n_classes-1`` (labels from 1 train a class 0
    that has no rows, and a warning says so). Scale the features (to unit
    range or variance) for the default learning rate to be stable.

    Parameters
    ----------
    l2 : float
        L2 penalty on the coefficients.
    learning_rate : float
        Step size of gradient descent.
    momentum : float
        Nesterov momentum in [0, 1); 0 is plain gradient descent.
    batch_size : int or None
        Rows per minibatch over the whole data (split across blocks by size);
        None trains on all rows every iteration.
    random_state : int
        Seed of the minibatch sampling.
    solver : {"gd", "lbfgs"}
        ``"gd"``: gradient descent (Nesterov with ``momentum``); ``"lbfgs"``: L-BFGS
        with a line search spread over iterations (full batches; ``learning_rate`` is
        then only the first step), usually several times fewer iterations.
    memory : int
        L-BFGS correction pairs kept (each chunk keeps ``2 * memory + 4`` copies of its rows).

    Examples
    --------
    >>> import dask_scar as scar
    >>> model = scar.SoftmaxRegression(l2=1e-4, learning_rate=0.5)
    >>> result = scar.Trainer(client, model).fit(ddf, target="label")  # doctest: +SKIP
    >>> model.predict(ddf).compute()                                   # doctest: +SKIP
    """

    target_dtype = "int32"

    def __init__(self, l2: float = 1e-4, learning_rate: float = 0.5, momentum: float = 0.0,
                 batch_size: int | None = None, random_state: int = 0, solver: str = "gd", memory: int = 10):
        super().__init__(l2=l2, learning_rate=learning_rate, momentum=momentum,
                         batch_size=batch_size, random_state=random_state, solver=solver, memory=memory)

    def setup(self, summary: DataSummary) -> None:
        super().setup(summary)
        t = summary.target
        self.n_classes_ = check_ids(t, summary.n_rows, "class labels")
        if t.min == t.max:
            raise DataError(f"target column {t.name!r} holds a single class ({t.min:g}); "
                            "classification needs two or more")
        empty = self.n_classes_ - len(t.values) if t.values is not None else int(t.min)
        if empty > 0:
            first = sorted(t.values or ())[:5]
            some = ("" if t.values is None else
                    f" (the labels are {', '.join(f'{v:g}' for v in first)}{', ...' if len(t.values) > 5 else ''})")
            warnings.warn(f"target column {t.name!r}: the model trains the classes 0..{t.max:g}{some}, "
                          f"{'at least ' if t.values is None else ''}{empty} of them "
                          "without a row, and predict_proba has a column for each. Encode the labels with "
                          "pandas.factorize to train only the classes in the data", DataWarning,
                          stacklevel=callers_level())
        self.classes_ = np.arange(self.n_classes_)

    def target_help(self) -> str:
        return ("encode the classes as integers 0, 1, 2, ... (e.g. codes, classes = pandas.factorize(labels); "
                "classes[model.predict(...)] maps predictions back)")

    def _n_outputs(self) -> int:
        return self.n_classes_

    def contribution(self, phase, block, params, xp, iteration=0, block_id=0):
        X, y = self._batch(block, xp, iteration, block_id)
        weights = params["weights"]
        d, n, k = self.n_features_, X.shape[0], self.n_classes_
        coef_t = xp.ascontiguousarray(weights[:d].T)          # (K, d)
        bias = weights[d][:, None]                             # (K, 1)
        grad_t, part = xp.zeros_like(coef_t), xp.empty_like(coef_t)
        grad_bias = xp.zeros(k, dtype=xp.float64)
        class_sums = xp.empty(k, dtype=xp.float64)
        loss = xp.zeros((), dtype=xp.float64)
        # Class-major layout (K, rows): the reductions over classes run along the
        # leading axis, which vectorises far better than along a short last axis.
        # On the CPU, tiles keep the feature rows in cache for the second product,
        # and every tile reuses the same buffers: Dask's workers run with
        # MALLOC_TRIM_THRESHOLD_ set, which makes glibc map and unmap (and the kernel
        # zero) a fresh large temporary every time, ~30 % of this loop. OpenBLAS
        # computes a tile's scores faster as rows @ (d, K), copied into the
        # class-major buffer, than as (K, d) @ rows.T (0.58 of the time per row).
        cpu = xp is np
        tile = self._tile_rows(n, xp, row_bytes=k * X.dtype.itemsize * (2 if cpu else 1))
        buffer, column = xp.empty((k, tile), dtype=X.dtype), xp.empty(tile, dtype=X.dtype)
        by_row = np.empty((tile, k), dtype=X.dtype) if cpu else None
        offsets = xp.arange(tile, dtype=y.dtype)
        for s in range(0, n, tile):
            Xb, yb = X[s:s + tile], y[s:s + tile]
            rows = Xb.shape[0]
            z = buffer if rows == tile else xp.empty((k, rows), dtype=X.dtype)
            c = column[:rows]
            if cpu:
                np.matmul(Xb, weights[:d], out=by_row[:rows])
                z[...] = by_row[:rows].T
            else:
                xp.matmul(coef_t, Xb.T, out=z)
            z += bias
            z.max(axis=0, out=c)
            z -= c
            true = yb * rows + offsets[:rows]      # where each row's own class sits in z
            flat = z.reshape(-1)
            loss -= flat[true].sum(dtype=xp.float64)
            xp.exp(z, out=z)
            z.sum(axis=0, out=c)
            loss += xp.log(c).sum(dtype=xp.float64)
            xp.reciprocal(c, out=c)
            z *= c
            flat[true] -= 1.0
            xp.matmul(z, Xb, out=part)
            grad_t += part
            z.sum(axis=1, dtype=xp.float64, out=class_sums)
            grad_bias += class_sums
        grad = xp.concatenate([grad_t.T, grad_bias.astype(grad_t.dtype)[None, :]])
        return Contribution({"weights": grad}, count=n, loss=float(loss),
                            penalty=self.penalty_of(weights, xp))

    # -- fitted model ---------------------------------------------------------------
    def predict_proba(self, data: Any) -> Any:
        """Class probabilities, shape ``(rows, n_classes)`` (a Dask DataFrame for Dask input)."""
        self._fitted()      # before classes_, which an unfitted model lacks
        return self._apply(data, probabilities, columns=[str(c) for c in self.classes_])

    def predict(self, data: Any) -> Any:
        """Most probable class of each row (a Dask Series for Dask input)."""
        return self._apply(data, lambda X, weights: scores(X, weights).argmax(axis=1), columns=None)

    def score(self, data: Any, target: str | Any) -> float:
        """Accuracy: the fraction of rows whose predicted class equals ``target``.

        ``target`` is a column name of ``data`` or an array of labels.
        """
        self._fitted()
        k = self.n_classes_
        return score_with(self, data, target, lambda pred, y: (pred == y).mean(),
                          valid=lambda y: (y >= 0) & (y < k) & (y % 1 == 0), what=f"class labels 0..{k - 1}")


def probabilities(X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Softmax of each row's class :func:`scores`."""
    z = scores(X, weights)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z
