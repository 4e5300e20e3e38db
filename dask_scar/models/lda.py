"""Latent Dirichlet allocation by collapsed Gibbs sampling, approximate-distributed (AD-LDA)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import BackendError, DataError
from ._base import (ID_HELP, LOCAL_STATE, Contribution, DataSummary, Model, ParameterSpec, check_ids, check_integers,
                    check_number, stable_seed)

_TILE = 1 << 16  # tokens per (tokens x topics) temporary: bounds memory on large blocks
#: A block's sampler state takes about this many bytes per token (its row, document,
#: word and topic), and a row counting more than MAX_COUNT tokens is refused.
TOKEN_BYTES, MAX_COUNT = 40, 1_000_000


class LDA(Model):
    """Topic model of a (doc, word, count) table by collapsed Gibbs sampling.

    The one parameter is the word-topic count table ``word_topics`` (words x topics,
    chunked by words across the workers). Each data block keeps its tokens' topic
    assignments and its doc-topic counts in ``block[LOCAL_STATE]`` (rebuilt from the
    current table when lost with a worker, or when a full rollback takes the iteration
    count back); an iteration is
    one Gibbs sweep per block against a snapshot of the table, as in AD-LDA (Newman et
    al., 2009): a block sees the snapshot plus its own changes, not the other blocks'.
    A document split across blocks is treated as separate documents by each block.

    The loss reported is the per-token negative log-likelihood
    ``-log sum_k theta_dk phi_wk`` of the assignments and table at the start of the
    iteration (lower is better; ``log(n_words)`` on the first iteration, where the
    table is still zero). Runs on NumPy only.

    Parameters
    ----------
    n_topics : int
        Number of topics K (at least 2).
    alpha, beta : float
        Symmetric Dirichlet priors of the doc-topic and topic-word distributions.
    doc, word, count : str
        Columns of the document id, the word id (non-negative integers) and the
        number of times the word occurs in the document (a non-negative integer;
        one row per token with count 1 works too). The vocabulary is ``max word + 1``.
    subsweeps : int
        A sweep samples the block's tokens in this many random groups, each group
        at once (vectorised) against the counts left by the groups before it.
    random_state : int
        Seed; a run is reproducible given it, the data and the blocks.

    Examples
    --------
    >>> import dask_scar as scar
    >>> from dask_scar.datasets import synthetic_corpus
    >>> frame, true_topics = synthetic_corpus(300, 200, n_topics=5, doc_length=60)
    >>> model = scar.LDA(n_topics=5)
    >>> scar.Trainer(client, model).fit(frame, max_iter=50)     # doctest: +SKIP
    >>> model.topic_word_.shape     # (topics, largest word id + 1)  # doctest: +SKIP
    (5, 198)
    """

    phases = (("word_topics",),)
    feature_dtype = "int64"
    target_dtype = "float32"
    backends = ("numpy",)   # the sampler is a sequential loop over tokens
    extrapolate_restores = False   # counts, drawn afresh every sweep: no trend to follow

    def __init__(self, n_topics: int = 10, alpha: float = 0.1, beta: float = 0.01, doc: str = "doc",
                 word: str = "word", count: str = "count", subsweeps: int = 4, random_state: int = 0):
        self.n_topics = n_topics
        self.alpha = alpha
        self.beta = beta
        self.doc = doc
        self.word = word
        self.count = count
        self.subsweeps = subsweeps
        self.random_state = random_state

    def select_columns(self, columns, target, features):
        return self._fixed_columns(features, target, self.count, doc=self.doc, word=self.word)

    def feature_help(self) -> str:
        return ID_HELP.format(model=type(self).__name__)

    def check_params(self) -> None:
        check_number("n_topics", self.n_topics, 2, integer=True)
        check_number("alpha", self.alpha, 0, low_open=True)
        check_number("beta", self.beta, 0, low_open=True)
        check_number("subsweeps", self.subsweeps, 1, integer=True)
        check_number("random_state", self.random_state, 0, integer=True)

    def setup(self, summary: DataSummary) -> None:
        super().setup(summary)
        doc, word = summary.features
        check_integers(doc, "ids")     # each block numbers its own documents
        self.n_words_ = check_ids(word, summary.n_rows, "ids")
        counts = summary.target
        check_integers(counts, "counts", fix="")
        if counts.max == 0:
            raise DataError(f"column {counts.name!r} holds no tokens (every count is 0): "
                            "LDA needs some words counted at least once")
        if counts.max > MAX_COUNT:
            raise DataError(f"column {counts.name!r} counts a word {counts.max:,.0f} times in one row: LDA keeps "
                            f"every token (about {TOKEN_BYTES} bytes each), so that row alone would take "
                            f"{TOKEN_BYTES * counts.max / 2**30:,.3g} GiB of a worker's memory. A stray value (a byte "
                            f"count, an id)? Drop or fix the row: counts above {MAX_COUNT:,} are refused")

    def parameter_specs(self) -> dict[str, ParameterSpec]:
        return {"word_topics": ParameterSpec((self.n_words_, self.n_topics))}

    # init_rows: Model's zeros. With an all-zero table the first assignments are uniform and
    # the first sweep sees only the block's own counts; no seed is needed to re-create a chunk.

    def contribution(self, phase, block, params, xp, iteration=0, block_id=0):
        """Loss of the block's current assignments, then one sweep; the part is the
        block's whole word-topic count table after the sweep."""
        if xp is not np:
            raise BackendError("LDA runs on NumPy only: train it with Trainer(..., backend='numpy')")
        table = np.asarray(params["word_topics"], dtype=np.float64)
        # seeded per (iteration, block), never an RNG kept in the block: a run is reproducible
        # and a block rebuilt from lineage needs nothing that was lost with it
        rng = np.random.default_rng(stable_seed(self.random_state, iteration, block_id))
        state = block.get(LOCAL_STATE)
        if state is None or iteration < state["iteration"]:
            # first iteration, or the block was rebuilt from lineage after its worker died,
            # or the iteration count went back (recovery="full" rolled the table back to a
            # checkpoint: the assignments must go back with it, as a restarted job's would):
            # draw every token's topic from the current global counts
            state = block[LOCAL_STATE] = self._new_state(block, table, rng)
        state["iteration"] = iteration
        loss = self._nll(block, state, table)
        counts = self._sweep(state, table, rng)
        return Contribution({"word_topics": counts.astype(np.float32)}, count=len(state["z"]), loss=loss,
                            penalty=0.0)

    def update(self, name, state, total, count, start, stop, xp):
        """The chunk's rows of the summed block tables.

        While no block loses its state this equals "old table + every block's count
        deltas" (AD-LDA's merge); as the table is always the sum of the current
        assignments, a chunk restored from an older checkpoint is healed in one iteration.
        """
        return {"value": total.astype(np.float32)}

    # -- fitted model -------------------------------------------------------------
    @property
    def topic_word_(self) -> np.ndarray:
        """Topic-word distributions phi (n_topics x n_words, rows sum to 1) of the fitted table."""
        table = np.asarray(self._fitted()["word_topics"], dtype=np.float64)
        return ((table + self.beta) / (table.sum(axis=0) + self.n_words_ * self.beta)).T

    # -- the sampler ----------------------------------------------------------------
    def _new_state(self, block: dict[str, Any], table: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        X = block["X"]
        counts = np.rint(block["y"]).astype(np.int64)
        _, row_doc = np.unique(X[:, 0], return_inverse=True)   # block-local doc index 0..D-1
        rows = np.repeat(np.arange(len(counts)), counts)         # one entry per token
        doc, word = row_doc[rows], X[rows, 1]
        # p(k | w) ∝ (N_wk + beta) / (N_k + V beta): the word part of the collapsed conditional
        phi = (table + self.beta) / (table.sum(axis=0) + table.shape[0] * self.beta)
        z = np.empty(len(word), dtype=np.intp)
        for tile in _tiles(len(word)):
            z[tile] = _draw(phi[word[tile]], rng)
        doc_topics = np.zeros((row_doc.max() + 1 if len(row_doc) else 0, self.n_topics))
        np.add.at(doc_topics, (doc, z), 1)
        return {"doc": doc, "word": word, "z": z, "doc_topics": doc_topics, "row_doc": row_doc, "iteration": 0}

    def _nll(self, block: dict[str, Any], state: dict[str, Any], table: np.ndarray) -> float:
        K, V = self.n_topics, table.shape[0]
        doc_topics = state["doc_topics"]
        theta = (doc_topics + self.alpha) / (doc_topics.sum(axis=1, keepdims=True) + K * self.alpha)
        norm = table.sum(axis=0) + V * self.beta
        words, counts, row_doc = block["X"][:, 1], np.rint(block["y"]).astype(np.float64), state["row_doc"]
        nll = 0.0
        for tile in _tiles(len(words)):
            likelihood = (theta[row_doc[tile]] * (table[words[tile]] + self.beta) / norm).sum(axis=1)
            nll -= float(counts[tile] @ np.log(likelihood))
        return nll

    def _sweep(self, state: dict[str, Any], table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        K, V, alpha, beta = self.n_topics, table.shape[0], self.alpha, self.beta
        doc, word, z, doc_topics = state["doc"], state["word"], state["z"], state["doc_topics"]
        own = _word_topic_counts(word, z, V, K)
        # The snapshot holds this block's assignments whenever its state lived through the
        # previous iteration; a new state (first iteration, rebuilt block) is missing from it or
        # replaces older assignments. Taking ours out and clipping at zero keeps the view a
        # valid count table (>= our own counts) in every case.
        view = np.maximum(table - own, 0.0) + own
        totals = view.sum(axis=0)
        for group in np.array_split(rng.permutation(len(z)), self.subsweeps):
            new = np.empty(len(group), dtype=np.intp)
            for tile in _tiles(len(group)):
                tokens = group[tile]
                d, w, old = doc[tokens], word[tokens], z[tokens]
                p = (doc_topics[d] + alpha) * (view[w] + beta) / (totals + V * beta)
                # ^{-i}: the token's own assignment does not count for itself
                i = np.arange(len(tokens))
                p[i, old] = ((doc_topics[d, old] - 1 + alpha) * (view[w, old] - 1 + beta)
                             / (totals[old] - 1 + V * beta))
                new[tile] = _draw(p, rng)
            moved = new != z[group]
            tokens, new = group[moved], new[moved]
            d, w, old = doc[tokens], word[tokens], z[tokens]
            _move(doc_topics, d, old, new)
            _move(view, w, old, new)
            totals += np.bincount(new, minlength=K) - np.bincount(old, minlength=K)
            z[tokens] = new
        return _word_topic_counts(word, z, V, K)


def _move(table: np.ndarray, rows: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
    """One count from ``table[rows, old]`` to ``table[rows, new]``, for every token (rows
    repeat). Counting over the whole table beats ``np.add.at`` where the table has few
    cells per token moved (2 per token: 2.3 against 8.2 ms; 31 per token: 72 against
    43 ms), so it is used up to 4."""
    if 4 * len(rows) >= table.size:
        cells = rows * table.shape[1]
        change = np.bincount(cells + new, minlength=table.size) - np.bincount(cells + old, minlength=table.size)
        table += change.reshape(table.shape)
    else:
        np.add.at(table, (rows, old), -1)
        np.add.at(table, (rows, new), 1)


def _tiles(n: int):
    return (slice(s, s + _TILE) for s in range(0, n, _TILE))


def _draw(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One category per row of unnormalised ``weights`` (rows x K), by inverse CDF."""
    cumulative = np.cumsum(weights, axis=1)
    u = rng.random(len(weights)) * cumulative[:, -1]
    return np.minimum((cumulative <= u[:, None]).sum(axis=1), weights.shape[1] - 1)


def _word_topic_counts(word: np.ndarray, z: np.ndarray, n_words: int, n_topics: int) -> np.ndarray:
    return np.bincount(word * n_topics + z, minlength=n_words * n_topics).reshape(n_words, n_topics).astype(
        np.float64)
