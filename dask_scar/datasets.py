"""Synthetic (and bundled) training sets for the demo, the benchmarks and the tests.

Every generator is deterministic given ``seed`` and returns a pandas DataFrame
(``dd.from_pandas`` makes it a Dask one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def synthetic_classification(rows: int, features: int, classes: int, seed: int = 0,
                             separation: float = 1.5) -> pd.DataFrame:
    """Gaussian classes around random centres: a frame of ``x0..`` features and ``label``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * separation / np.sqrt(features) * 3
    labels = rng.integers(0, classes, rows)
    X = (centres[labels] + rng.standard_normal((rows, features))).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["label"] = labels
    return frame


def synthetic_regression(rows: int, features: int, seed: int = 0, noise: float = 0.1) -> pd.DataFrame:
    """``y = X w + 0.5 + noise`` with correlated standard-normal features ``x0..``."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(features) + 0.3 * rng.standard_normal((features, features)) / np.sqrt(features)
    X = (rng.standard_normal((rows, features)) @ mixing).astype(np.float32)
    w = rng.standard_normal(features) / np.sqrt(features)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["y"] = (X @ w + 0.5 + noise * rng.standard_normal(rows)).astype(np.float32)
    return frame


def synthetic_ratings(users: int, items: int, rank: int, density: float, seed: int = 0,
                      noise: float = 0.05) -> pd.DataFrame:
    """Ratings of a rank-``rank`` matrix at a random ``density`` of (user, item) pairs,
    every user and item rated at least once: columns ``user``, ``item``, ``rating``."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((users, rank)) / rank ** 0.25
    V = rng.standard_normal((items, rank)) / rank ** 0.25
    n = max(int(density * users * items), users + items)
    user = np.concatenate([np.arange(users), rng.integers(0, users, n - users)])
    item = np.concatenate([rng.integers(0, items, users), np.arange(items),
                           rng.integers(0, items, n - users - items)])
    pairs = np.unique(np.stack([user, item], axis=1), axis=0)
    rating = (U[pairs[:, 0]] * V[pairs[:, 1]]).sum(axis=1) + noise * rng.standard_normal(len(pairs))
    return pd.DataFrame({"user": pairs[:, 0], "item": pairs[:, 1], "rating": rating.astype(np.float32)})


def digits() -> pd.DataFrame:
    """scikit-learn's bundled handwritten digits (1,797 rows x 64 pixels, scaled to
    [0, 1]) with their ``label``; needs scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:     # pragma: no cover - depends on the environment
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from exc
    X, y = load_digits(return_X_y=True)
    frame = pd.DataFrame((X / 16.0).astype(np.float32), columns=[f"px{i}" for i in range(X.shape[1])])
    frame["label"] = y
    return frame


def synthetic_corpus(n_docs: int, n_words: int, n_topics: int, doc_length: int, seed: int = 0,
                     alpha: float = 0.1, beta: float = 0.05) -> tuple[pd.DataFrame, np.ndarray]:
    """Documents drawn from an LDA model: a ``doc``, ``word``, ``count`` frame and the true topics.

    Topics ``phi_k ~ Dirichlet(beta)`` over ``n_words`` words (a small ``beta`` makes
    them sparse, hence distinct), topic mixtures ``theta_d ~ Dirichlet(alpha)``, and
    ``doc_length`` tokens per document drawn from ``sum_k theta_dk phi_k``. The frame
    holds one row per distinct (doc, word) pair with its count (int64 columns, sorted
    by doc then word); the second value is the true topic-word matrix (n_topics x n_words).
    """
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(n_words, beta), size=n_topics)
    theta = rng.dirichlet(np.full(n_topics, alpha), size=n_docs)
    docs = np.repeat(np.arange(n_docs), doc_length)
    # each token's topic by inverse CDF on its document's mixture
    cumulative = np.cumsum(theta, axis=1)[docs]
    topics = np.minimum((cumulative < rng.random(len(docs))[:, None] * cumulative[:, -1:]).sum(axis=1),
                        n_topics - 1)
    words = np.empty(len(docs), dtype=np.int64)
    for k in range(n_topics):
        mine = topics == k
        words[mine] = rng.choice(n_words, size=int(mine.sum()), p=phi[k])
    pairs, counts = np.unique(docs.astype(np.int64) * n_words + words, return_counts=True)
    frame = pd.DataFrame({"doc": pairs // n_words, "word": pairs % n_words, "count": counts.astype(np.int64)})
    return frame, phi
