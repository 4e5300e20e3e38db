"""Training data: validate a DataFrame and hold it on the workers as NumPy blocks.

The frame's partitions are converted to arrays (``X`` features, ``y`` target), and
the partitions that sit on the same worker are concatenated into one *block*, so
the tasks of an iteration grow with the workers, not with the partitions. Blocks
keep their lineage: a block lost with its worker is rebuilt by Dask from the
DataFrame's graph. The rows stay spread evenly over the running workers
(:func:`spread`): a worker that joins, or survivors that one lost worker's block came
back on, get or give whole blocks, or the ends of blocks cut in two.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client, Future

from . import config
from .backend import array_module, get_array_module, to_device
from .exceptions import DataError, ScarError
from .models import ColumnSummary, DataSummary, Model
from .models._base import (DISTINCT_VALUES, LOCAL_STATE, is_column_name, numeric, require_columns,
                           require_numeric)
from .recovery import hung_after, live_or_wait, restart_hung_workers, wait_on, warn_paused, workers_info

logger = logging.getLogger(__name__)

PAUSE_LOOK_SECONDS = 5.0    # while the data is read, how often to look for paused and hung workers


@dataclass
class TrainingData:
    """Blocks of training arrays persisted on the workers."""

    blocks: list[Future]
    workers: list[str]          # where each block was built (a preference, not a pin)
    rows: list[int]             # rows per block
    summary: DataSummary
    features: list[str]
    target: str | None

    @property
    def n_rows(self) -> int:
        return self.summary.n_rows


# -- pure functions (also used by the single-process reference in dask_scar.local) --

def check_columns(model: Model, columns: list[str], dtypes: pd.Series, target: str | None,
                  features: list[str] | None) -> tuple[list[str], str | None]:
    """Resolve and check feature/target columns against a frame's columns and dtypes."""
    if target is not None and not is_column_name(target):
        raise DataError(f"target= must be one column name of the frame, got {type(target).__name__}: to train on "
                        "labels held apart, add them as a column (ddf.assign(label=y)) and pass target='label'")
    if features is not None:
        features = _feature_names(features)
        twice = sorted(str(c) for c, n in Counter(features).items() if n > 1)
        if twice:
            raise DataError(f"features= names {', '.join(map(repr, twice))} more than once: name each column once")
    features, target = model.select_columns(list(columns), target, features)
    require_columns(columns, [c for c in [*features, target] if c is not None],
                    f"; available columns: {list(columns)}")
    if target is not None and target in features:
        raise DataError(f"the target column {target!r} is also in features=: remove it from features, "
                        "or the model would learn the answer from itself")
    require_numeric(dtypes, features, model.feature_help())
    if target is not None and not numeric(dtypes[target]):
        raise DataError(f"the target column {target!r} ({dtypes[target]}) is not numeric: "
                        f"{model.target_help()}")
    return features, target


def _feature_names(features: Any) -> list:
    """``features=`` as a list of column names (a string is one name)."""
    if isinstance(features, str):
        return [features]
    # a Series holds data, not names (and list() of a Dask one would read it)
    listed = np.iterable(features) and not hasattr(features, "compute") and not isinstance(features, pd.Series)
    names = list(features) if listed else []
    if not listed or not all(is_column_name(c) for c in names):
        raise DataError(f"features= must be a list of column names of the frame (features=['a', 'b']), got "
                        f"{type(features).__name__}: to train on a Series held apart, add it as a column "
                        "(ddf.assign(x=s))")
    return names


def to_arrays(frame: pd.DataFrame, features: list[str], target: str | None,
              feature_dtype: str, target_dtype: str | None) -> tuple[dict[str, np.ndarray], list[ColumnSummary]]:
    """Arrays of one partition, and a summary of every column used (target last).

    Non-finite values are counted, not raised here: the driver names every bad
    column at once. Float columns are converted once, straight to their dtype (a
    value beyond its range becomes inf, and is reported as such); integer ones go
    through float64, where NaN can be seen before the cast.
    """
    checked, X = _numbers(frame[features], feature_dtype)
    summaries = _summaries(features, checked)
    arrays = {"X": np.ascontiguousarray(X)}
    if target is not None:
        checked, arrays["y"] = _numbers(frame[target], target_dtype)
        summaries += _summaries([target], checked[:, None])
        if target_dtype.startswith("int"):     # class labels: which ones have rows
            values = np.unique(arrays["y"])
            if len(values) <= DISTINCT_VALUES:
                summaries[-1].values = frozenset(values.tolist())
    return arrays, summaries


def _numbers(data: pd.DataFrame | pd.Series, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as floats to check, and as ``dtype`` to train on. Nullable and boolean
    columns become NaN/0/1; an out-of-range value becomes inf, reported with its
    column's name."""
    integer = dtype.startswith("int")
    # (NumPy turns dates into numbers: a partition whose dtype is not the frame's says so)
    if isinstance(data, pd.DataFrame):
        odd = [name for name, kind in data.dtypes.items() if _temporal(kind)]
        if odd:
            raise DataError(_not_numbers(data[odd], TypeError("dates, times or durations are not numbers")))
    elif _temporal(data.dtype):
        raise DataError(_not_numbers(data, TypeError("dates, times or durations are not numbers")))
    try:
        with np.errstate(over="ignore"):
            values = data.to_numpy(dtype=np.float64 if integer else dtype, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise DataError(_not_numbers(data, exc)) from None
    return values, (np.nan_to_num(values).astype(dtype) if integer else values)


def _temporal(dtype: Any) -> bool:
    """Dates, times, durations, periods or intervals: NumPy would make them numbers."""
    if isinstance(dtype, (pd.PeriodDtype, pd.IntervalDtype)):
        return True
    if isinstance(dtype, pd.ArrowDtype):
        import pyarrow as pa

        return pa.types.is_temporal(dtype.pyarrow_dtype)
    return pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype)


def _not_numbers(data: pd.DataFrame | pd.Series, exc: Exception) -> str:
    """What to say of a partition whose columns do not all convert to numbers, though
    the frame's dtypes said they would (files of one dataset that disagree, a wrong
    ``meta``): the first column that does not convert alone, else the first."""
    columns = list(data.items()) if isinstance(data, pd.DataFrame) else [(data.name, data)]
    for name, column in columns:
        try:
            column.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as error:
            exc = error
            break
    else:
        name, column = columns[0]
    where, convert = ((f"column {name!r}", f"ddf[{name!r}] = dd.to_numeric(ddf[{name!r}], errors='coerce')")
                      if name is not None else ("a column", "with dd.to_numeric(..., errors='coerce')"))
    return (f"{where} holds values that are not numbers in one partition ({exc}; there its dtype is "
            f"{column.dtype}), though the frame's dtypes say numbers: the files of a dataset may disagree on "
            f"its type, or a map_partitions' meta be wrong. Convert it, e.g. {convert}, or fix the data")


_SUMMARY_ROWS = 8192    # rows per pass: temporaries stay in cache, however long the partition


def _summaries(names: list[str], values: np.ndarray) -> list[ColumnSummary]:
    """Count, non-finite count, finite min/max and integrality of each column of ``values``."""
    n, d = values.shape
    nonfinite, integral = np.zeros(d, np.int64), np.ones(d, bool)
    low, high = np.full(d, np.inf), np.full(d, -np.inf)
    for start in range(0, n, _SUMMARY_ROWS):
        tile = values[start:start + _SUMMARY_ROWS]
        finite = np.isfinite(tile)
        if not finite.all():
            nonfinite += len(tile) - finite.sum(axis=0)
            whole = np.where(finite, tile == np.round(tile), True)
            low = np.minimum(low, np.where(finite, tile, np.inf).min(axis=0))
            high = np.maximum(high, np.where(finite, tile, -np.inf).max(axis=0))
        else:
            whole = tile == np.round(tile)
            low, high = np.minimum(low, tile.min(axis=0)), np.maximum(high, tile.max(axis=0))
        integral &= whole.all(axis=0)
    return [ColumnSummary(name, count=n, nonfinite=int(nonfinite[j]), min=float(low[j]), max=float(high[j]),
                          integral=bool(integral[j])) for j, name in enumerate(names)]


def summarize(parts: list[list[ColumnSummary]], has_target: bool) -> DataSummary:
    """Merge partition summaries; raise :class:`DataError` for empty data or NaN/inf."""
    merged = _merged(parts)
    n_rows = merged[0].count if merged else 0
    if n_rows == 0:
        raise DataError("the training data has no rows")
    bad = [f"{c.name!r} ({c.nonfinite} of {c.count} rows)" for c in merged if c.nonfinite]
    if bad:
        raise DataError(f"NaN/inf values (or values beyond float32's range) in column(s) {', '.join(bad)}: "
                        "drop those rows (ddf.dropna()) "
                        "or fill them (ddf.fillna(...)) before training")
    target = merged[-1] if has_target else None
    return DataSummary(n_rows, merged[:-1] if has_target else merged, target)


def _merged(parts: list[list[ColumnSummary]]) -> list[ColumnSummary]:
    """The column summaries of several partitions, merged column by column."""
    merged = list(parts[0])
    for part in parts[1:]:
        merged = [a.merge(b) for a, b in zip(merged, part)]
    return merged


def concat_blocks(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The parts' arrays (NumPy, or CuPy on the GPU) concatenated, name by name."""
    return {name: get_array_module(*(p[name] for p in parts)).concatenate([p[name] for p in parts])
            for name in parts[0]}


# -- on the cluster ---------------------------------------------------------------------

def _partition_arrays(frame, features, target, feature_dtype, target_dtype):
    return to_arrays(frame, features, target, feature_dtype, target_dtype)


def _block(backend, *parts):
    block = concat_blocks([arrays for arrays, _ in parts if len(next(iter(arrays.values())))])
    xp = array_module(backend)
    return {name: to_device(values, xp) for name, values in block.items()}


def _block_summary(*parts):
    """The summaries of one worker's partitions, merged there (a target's distinct
    values travel once per worker, not once per partition)."""
    return _merged([summary for _, summary in parts])


def _rows(block, start, stop, copy):
    """Rows ``start:stop`` of a block: a copy (the whole block's memory can then go) or
    views (of rows on their way to another worker). Model state kept in the block
    (``LOCAL_STATE``) is left behind: the model builds it again, as for a rebuilt block."""
    return {name: values[start:stop].copy() if copy else values[start:stop]
            for name, values in block.items() if name != LOCAL_STATE}


def _take(*parts):
    """``parts`` as one block on the worker this task runs on. Rows that are views of
    a larger block (a cut's end, rebuilt from its lineage here) are copied, so that the
    larger block's memory can go. One whole block keeps its model state
    (``LOCAL_STATE``); blocks joined leave theirs behind, as cut ones do."""
    if len(parts) > 1:
        return concat_blocks([{name: values for name, values in p.items() if name != LOCAL_STATE} for p in parts])
    return {name: values.copy() if _larger_base(values) else values for name, values in parts[0].items()}


def _larger_base(values) -> bool:
    """Whether ``values`` is a view of a buffer larger by a sixteenth or more, which
    stays in memory with it (not an array received from another worker: its buffer
    holds a few hundred bytes more, the message's)."""
    nbytes = getattr(values, "nbytes", 0)
    return getattr(getattr(values, "base", None), "nbytes", 0) - nbytes >= nbytes / 16


#: a worker within this fraction of an even share of the rows neither gives nor takes
#: any, and a whole block moves where it is within this of the rows owed, rather than
#: leaving a sliver of it behind
BALANCE_SLACK = 0.1


def spread(client: Client, training: TrainingData) -> tuple[str, bool]:
    """Balance the training rows over the running workers, where one of them holds
    more or less than an even share by more than ``BALANCE_SLACK``: a worker that
    joined (a replacement, or one more, also while the data was read), the survivor
    that a lost or retired worker's block came back on, partitions that Dask placed
    unevenly. Each worker computes an even share of the data from the next iteration
    on. Donors give whole blocks where they fit, otherwise the end of a block cut in
    two where it lies. Each taker gets what it takes as one block, made by a task of
    its own (not a transfer), so the moved rows keep their lineage. Returns what moved,
    and whether to spread again: a worker that joined is still starting (status
    ``init``; the scheduler announces it as it registers), and takes its rows once it
    runs."""
    info = workers_info(client)
    running = sorted(w for w, about in info.items() if about.get("status") == "running")
    starting = any(about.get("status") == "init" for about in info.values())
    where = holders(client, training.blocks)     # as they are (a replacement may have a lost one's address)
    training.workers = [where[b.key] or w for b, w in zip(training.blocks, training.workers)]
    taken: dict[str, list[int]] = defaultdict(list)     # taker -> the blocks (or cut ends) it takes
    for i, n, taker in _plan(training.workers, training.rows, running):
        if n < training.rows[i]:    # cut: the donor keeps the block's first rows
            _cut(client, training, i, training.rows[i] - n)
            i = len(training.blocks) - 1
        training.workers[i] = taker
        taken[taker].append(i)
    if not taken:
        return "", starting
    moved = 0
    for taker, took in taken.items():
        parts = [training.blocks[i] for i in took]
        training.blocks.append(client.submit(_take, *parts, workers=[taker], allow_other_workers=True,
                                             key=f"scar-block-{dask.base.tokenize([p.key for p in parts], taker)}"))
        training.workers.append(taker)
        training.rows.append(sum(training.rows[i] for i in took))
        moved += training.rows[-1]
    gone = {i for took in taken.values() for i in took}
    kept = [i for i in range(len(training.blocks)) if i not in gone]
    training.blocks, training.workers, training.rows = ([values[i] for i in kept] for values in
                                                        (training.blocks, training.workers, training.rows))
    return f"moved {moved:,} data rows onto {', '.join(sorted(taken))}", starting


def _plan(workers: list[str], rows: list[int], running: list[str]) -> list[tuple[int, int, str]]:
    """The moves that spread ``rows`` (of blocks on ``workers``) evenly over ``running``,
    in order: (block, rows off its end, taker). A block not moved whole is cut in two,
    and its end becomes a new, last block. The most loaded worker gives to the least
    (the slowest one sets the pace) until both are within ``BALANCE_SLACK`` of an even
    share, or no move is left: a worker gives or takes, never both, so one that took a
    whole block a little over its share gives nothing back, and another may stay short
    (random layouts end within two slacks)."""
    if not running:
        return []
    workers, rows = list(workers), list(rows)
    load = {w: 0 for w in running}
    for w, n in zip(workers, rows):
        if w in load:
            load[w] += n
    share = sum(load.values()) / len(running)
    slack = max(BALANCE_SLACK * share, 1)
    moves: list[tuple[int, int, str]] = []
    givers, takers = set(), set()
    while True:
        donor = max((w for w in running if w not in takers), key=lambda w: (load[w], w))
        taker = min((w for w in running if w not in givers), key=lambda w: (load[w], w))
        spare, owed = load[donor] - share, share - load[taker]
        if max(spare, owed) <= slack or min(spare, owed) < 1:
            return moves
        pieces = _to_give(workers, rows, donor, min(spare, owed), slack)
        if not pieces:
            return moves
        givers.add(donor)
        takers.add(taker)
        for i, n in pieces:
            moves.append((i, n, taker))
            if n < rows[i]:
                rows[i] -= n
                rows.append(n)
                workers.append(taker)
            else:
                workers[i] = taker
            load[donor] -= n
            load[taker] += n


def _to_give(workers: list[str], rows: list[int], donor: str, give: float, slack: float) -> list[tuple[int, int]]:
    """The donor's blocks to move for ``give`` rows, and the rows of each to move:
    whole blocks that fit, largest first, then the end of the smallest block left (if
    more than ``slack`` rows are still owed, or nothing fitted whole)."""
    mine = sorted((i for i, w in enumerate(workers) if w == donor), key=lambda i: -rows[i])
    chosen = []
    for i in mine:
        if rows[i] <= give + slack:
            chosen.append((i, rows[i]))
            give -= rows[i]
    given = {i for i, _ in chosen}
    left = [i for i in mine if i not in given]
    if left and (give > slack or not chosen) and round(give) >= 1:
        chosen.append((left[-1], int(round(give))))
    return chosen


def _cut(client: Client, training: TrainingData, i: int, keep: int) -> None:
    """Block ``i`` becomes its first ``keep`` rows; the rest becomes a new, last block.
    Both are made where the block is, so only the rows that move travel."""
    old, worker, n = training.blocks[i], training.workers[i], training.rows[i]

    def part(start: int, stop: int, copy: bool) -> Future:
        return client.submit(_rows, old, start, stop, copy,
                             key=f"scar-block-{dask.base.tokenize(old.key, start, stop)}",
                             workers=[worker], allow_other_workers=True)

    training.blocks[i], training.rows[i] = part(0, keep, True), keep
    training.blocks.append(part(keep, n, False))
    training.workers.append(worker)
    training.rows.append(n - keep)


def holders(client: Client, futures: list[Future]) -> dict[str, str]:
    """One worker holding each future's data ("" if none), by key: ``Client.who_has``
    answers in no particular order."""
    return {key: sorted(workers)[0] if workers else "" for key, workers in client.who_has(futures).items()}


def columns_of(model: Model, data: Any, target: str | None,
               features: list[str] | None) -> tuple[list[str], str | None]:
    """The feature and target columns that training on ``data`` (a Dask or pandas
    DataFrame) uses, checked against its columns' names and dtypes; nothing is read."""
    if not isinstance(data, (pd.DataFrame, dd.DataFrame)):
        raise DataError(f"expected a Dask or pandas DataFrame, got {type(data).__name__}")
    return check_columns(model, list(data.columns), data.dtypes, target, features)


def as_dask_frame(data: pd.DataFrame | dd.DataFrame, n_workers: int) -> dd.DataFrame:
    """A Dask DataFrame with at least one partition per worker."""
    if isinstance(data, pd.DataFrame):
        # the index plays no part in training, and from_pandas sorts it (a mixed or
        # multi-level one fails there)
        return dd.from_pandas(data.reset_index(drop=True), npartitions=max(1, n_workers))
    if data.npartitions < n_workers:
        data = data.repartition(npartitions=n_workers)
    return data


_FILTERING = threading.Lock()     # around warnings.catch_warnings, which the process shares


def prepare(client: Client, model: Model, data: Any, target: str | None,
            features: list[str] | None, backend: str = "numpy") -> TrainingData:
    """Validate ``data`` and persist it on the workers as one block per worker
    (NumPy arrays, or CuPy arrays on the GPU for ``backend="cupy"``).

    Raises :class:`DataError` naming the offending column before any training.
    """
    features, target = columns_of(model, data, target, features)
    n_workers = len(live_or_wait(client, ""))
    frame = as_dask_frame(data, n_workers)
    target_dtype = model.target_dtype if target is not None else None

    parts = frame.to_delayed()
    # (catch_warnings sets the process's filters and puts back what it found: two fits
    # at once in two threads could leave one's filter behind, for good)
    with _FILTERING, warnings.catch_warnings():
        if isinstance(data, pd.DataFrame):
            # A pandas frame travels in the graph, and Dask warns of a large one. That is
            # what keeps it safe: the scheduler holds its partitions as the blocks'
            # lineage, to rebuild a block lost with its worker (scattered data would die
            # with the worker that held it).
            warnings.filterwarnings("ignore", message="Sending large graph")
        converted = client.compute([dask.delayed(_partition_arrays, pure=True)(
            p, features, target, model.feature_dtype, target_dtype) for p in parts])
    blocks: list[Future] = []
    rows: list[int] = []
    try:
        warned, hung, after = set(), set(), hung_after()
        timeout, done, moved = config.get("iteration-timeout"), 0, time.monotonic()
        while True:     # however long it takes to read, but paused workers are said, hung ones restarted
            try:
                wait_on(client, converted, timeout=PAUSE_LOOK_SECONDS)
                break
            except TimeoutError as exc:
                # Dask's sync() holds the error in a reference cycle with its traceback, which
                # holds this frame, and so every partition's arrays until the collector runs
                exc.__traceback__ = None
                info = workers_info(client)
                paused = warn_paused(info, set(info), warned)
                now_done = sum(f.done() for f in converted)
                # a slow read takes its time; one with no partition done while a worker stays
                # paused (its memory may never drop) ends at the timeout
                if now_done > done or not paused:
                    done, moved = now_done, time.monotonic()
                elif time.monotonic() - moved > timeout:
                    raise ScarError(f"reading the data finished no partition for scar.iteration-timeout={timeout:g}s, "
                                    f"with {'every worker' if len(paused) == len(info) else 'workers'} paused by "
                                    f"Dask for {'its' if len(paused) == len(info) else 'their'} memory "
                                    f"({', '.join(paused.values())}; "
                                    "distributed.worker.memory.pause, 80 % of the memory limit by default): give "
                                    "the workers more memory (dask worker --memory-limit), or add workers")
                if after is not None and not restart_hung_workers(client, set(info), after, hung):
                    after = None
        failed = [f for f in converted if f.status == "error"]
        if failed:
            failed[0].result()  # raises the partition's error

        by_worker: dict[str, list[Future]] = defaultdict(list)
        where = holders(client, converted)
        for future in converted:
            by_worker[where[future.key]].append(future)
        summaries = client.gather([client.submit(_block_summary, *futs, pure=False) for futs in by_worker.values()])
        summary = summarize(summaries, target is not None)
        model.setup(summary)

        for (worker, futs), merged in zip(by_worker.items(), summaries):
            n = merged[0].count
            if n == 0:
                continue  # empty partitions only: no block on this worker
            blocks.append(client.submit(_block, backend, *futs, key=f"scar-block-{dask.base.tokenize(backend, futs)}",
                                        workers=[worker] if worker else None, allow_other_workers=bool(worker)))
            rows.append(n)
        wait_on(client, blocks)
        where = holders(client, blocks)
        workers = [where[b.key] for b in blocks]
    except BaseException:
        # an error (bad data, Ctrl-C) keeps this frame in its traceback, and a notebook
        # keeps the last traceback: the partitions' and blocks' arrays go now
        for future in [*converted, *blocks]:
            future.release()
        raise
    del converted  # the blocks hold the arrays now; partitions stay as lineage only
    logger.info("training data: %d rows in %d blocks on %d workers", summary.n_rows, len(blocks), n_workers)
    return TrainingData(blocks, workers, rows, summary, features, target)
