"""The models and data sets of ``dask-scar bench`` (the paper's three algorithms, and two more)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from .. import datasets
from ..models import LDA, LinearRegression, MatrixFactorization, Model, SoftmaxRegression
from ..policy import FullCheckpoint, PrioritizedCheckpoint, RandomCheckpoint, RoundRobinCheckpoint
from ._simulate import Strategy

#: Strategy names in report order; ``traditional`` is the baseline of every reduction.
STRATEGIES = ("traditional", "partial", "scar", "scar-paper", "roundrobin", "random", "scar+copies")


@dataclass
class Case:
    """One model on one data set, and how its failures are measured.

    The failure-free run lasts ``max_iter`` iterations (its end stands in for the
    optimum x*); it *converges* at the first iteration where the loss, averaged
    over ``smooth`` iterations, changes by at most ``tol`` relative per iteration:
    that iteration's loss is the target every failed run must reach.
    ``FullCheckpoint(every)`` is the traditional budget; the partial policies
    save about ``fraction`` of the blocks every ``fraction * every`` iterations
    (rounded: the same bytes per iteration).
    """

    name: str
    description: str
    frame: Callable[[bool], pd.DataFrame]     # quick -> the training frame
    model: Callable[[], Model]
    target: str | None
    max_iter: int
    tol: float
    every: int
    fraction: float = 0.25
    smooth: int = 1

    @property
    def often(self) -> int:
        """Iterations between two rounds of the partial policies (at least 2, so that a
        round is never written while the next one's priorities are measured)."""
        return max(2, round(self.fraction * self.every))

    def strategies(self) -> list[Strategy]:
        fraction = self.often / self.every      # the same bytes per iteration as the full checkpoint
        return [
            Strategy("traditional", FullCheckpoint(self.every), "full"),
            Strategy("partial", FullCheckpoint(self.every), "partial"),
            Strategy("scar", PrioritizedCheckpoint(fraction, self.often), "partial"),
            # the paper's restore: the newest saved version as it is, not extrapolated
            Strategy("scar-paper", PrioritizedCheckpoint(fraction, self.often), "partial", extrapolate=False),
            Strategy("roundrobin", RoundRobinCheckpoint(fraction, self.often), "partial"),
            Strategy("random", RandomCheckpoint(fraction, self.often, seed=0), "partial"),
            # this library's default: the store only serves when no live worker holds a copy
            Strategy("scar+copies", PrioritizedCheckpoint(fraction, self.often), "partial", copies=True),
        ]


def _corpus(quick: bool) -> pd.DataFrame:
    frame, _ = datasets.synthetic_corpus(n_docs=300 if quick else 1500, n_words=400 if quick else 1000,
                                         n_topics=10, doc_length=60 if quick else 100, seed=0)
    return frame


CASES: dict[str, Case] = {case.name: case for case in [
    Case("softmax-digits", "multinomial logistic regression, scikit-learn's digits (1,797 x 64, 10 classes)",
         lambda quick: datasets.digits(), lambda: SoftmaxRegression(l2=1e-3, learning_rate=1.0),
         "label", max_iter=280, tol=1e-3, every=20),
    Case("softmax-synthetic", "multinomial logistic regression, synthetic Gaussian classes",
         lambda quick: datasets.synthetic_classification(5_000 if quick else 200_000, 20 if quick else 50, 10,
                                                         seed=0),
         lambda: SoftmaxRegression(l2=1e-3, learning_rate=1.0), "label", max_iter=200, tol=1e-3, every=20),
    Case("linear", "least squares, synthetic correlated features",
         lambda quick: datasets.synthetic_regression(20_000 if quick else 200_000, 50, seed=0),
         lambda: LinearRegression(l2=1e-3, learning_rate=0.05), "y", max_iter=250, tol=1e-4, every=20),
    Case("mf", "matrix factorization (ALS), synthetic rank-4 ratings",
         lambda quick: datasets.synthetic_ratings(300 if quick else 1000, 200 if quick else 600, 4,
                                                  0.1 if quick else 0.03, seed=0),
         lambda: MatrixFactorization(rank=4, l2=0.1), "rating", max_iter=110, tol=1e-3, every=20),
    Case("lda", "LDA (collapsed Gibbs), synthetic Dirichlet corpus, 10 topics",
         _corpus, lambda: LDA(n_topics=10, alpha=0.1, beta=0.01), "count", max_iter=90, tol=2e-3, every=8,
         smooth=5),
]}
