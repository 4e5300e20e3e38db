"""Validation and placement of training data on a real cluster."""

import gc
import re
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from conftest import wait_for

import dask_scar as scar
from dask_scar import data
from dask_scar.exceptions import DataError
from dask_scar.recovery import live_workers


def _frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.standard_normal((n, 3)).astype(np.float32), columns=["a", "b", "c"])
    frame["label"] = rng.integers(0, 3, n)
    return frame


def _prepare(client, frame, npartitions=4, **kwargs):
    kwargs.setdefault("target", "label")
    return data.prepare(client, scar.SoftmaxRegression(), dd.from_pandas(frame, npartitions=npartitions),
                        kwargs.pop("target"), kwargs.pop("features", None))


def test_one_block_per_worker_with_all_rows(client):
    frame = _frame(1000)
    training = _prepare(client, frame, npartitions=8)
    workers = live_workers(client)
    assert len(training.blocks) == 2 and set(training.workers) == workers
    assert sum(training.rows) == 1000 == training.n_rows
    blocks = client.gather(training.blocks)
    X = np.concatenate([b["X"] for b in blocks])
    assert X.dtype == np.float32 and X.shape == (1000, 3)
    assert blocks[0]["y"].dtype == np.int32
    # every row arrives once, whatever the block order
    np.testing.assert_allclose(np.sort(X[:, 0]), np.sort(frame["a"].to_numpy()))
    assert all(k.startswith("scar-block-") for k in (b.key for b in training.blocks))


def test_pandas_input_and_explicit_features(client):
    training = data.prepare(client, scar.SoftmaxRegression(), _frame(), "label", ["a", "c"])
    assert training.features == ["a", "c"]
    assert client.gather(training.blocks)[0]["X"].shape[1] == 2
    # the index plays no part: one that Dask cannot sort (mixed types, several levels) is fine
    mixed = _frame().set_index(pd.Index([0, "a"] * 100))
    assert data.prepare(client, scar.SoftmaxRegression(), mixed, "label", None).n_rows == 200
    levels = _frame().set_index(pd.MultiIndex.from_arrays([np.arange(200) % 7, np.arange(200)]))
    assert data.prepare(client, scar.SoftmaxRegression(), levels, "label", None).n_rows == 200


def test_a_large_pandas_frame_travels_in_the_graph_without_a_warning(client):
    """17 MB of pandas data: Dask warns of graphs over 10 MB; the fit chose that."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((100_000, 20)), columns=[f"x{i}" for i in range(20)])
    frame["label"] = rng.integers(0, 3, len(frame))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training = data.prepare(client, scar.SoftmaxRegression(), frame, "label", None)
    assert training.n_rows == 100_000


def test_missing_target_names_the_columns(client):
    with pytest.raises(DataError, match=r"\['nope'\] not in the data; available columns: \['a', 'b', 'c', 'label'\]"):
        _prepare(client, _frame(), target="nope")


def test_a_feature_named_twice_is_refused(client):
    with pytest.raises(DataError, match="features= names 'a' more than once"):
        data.prepare(client, scar.SoftmaxRegression(), _frame(), "label", ["a", "a", "c"])


def _unreadable(frame):
    """A Dask frame whose partitions raise when they are read."""
    def boom(part):
        raise RuntimeError("a partition was read")
    return dd.from_pandas(frame, npartitions=2).map_partitions(boom, meta=frame.iloc[:0])


def test_no_feature_column_is_refused_before_the_data_is_read(client):
    frame = _frame()
    message = "SoftmaxRegression needs at least one feature column besides the target 'label': name them with features="
    with pytest.raises(DataError, match=message):
        data.prepare(client, scar.SoftmaxRegression(), _unreadable(frame), "label", [])
    with pytest.raises(DataError, match=message):
        data.prepare(client, scar.SoftmaxRegression(), _unreadable(frame[["label"]]), "label", None)


def test_text_column_is_named_with_a_fix(client):
    frame = _frame().assign(city=["x"] * 200)
    with pytest.raises(DataError, match=r"'city' \((object|str|string)\) are not numeric.*features="):
        _prepare(client, frame)


def test_text_in_a_partition_whose_dtype_said_numbers_is_named(client, tmp_path):
    """The files of a Parquet dataset disagree: Dask reads the column as floats, one
    file holds it as text."""
    frame = _frame()
    frame.iloc[:100].to_parquet(tmp_path / "part0.parquet")
    late = frame.iloc[100:].astype({"b": str})
    late.loc[late.index[5], "b"] = "n/a"
    late.to_parquet(tmp_path / "part1.parquet")
    ddf = dd.read_parquet(tmp_path)
    assert ddf.dtypes["b"] == np.float32
    with pytest.raises(DataError, match=re.escape(
            "column 'b' holds values that are not numbers in one partition (could not convert string to float: "
            "'n/a'; there its dtype is ")):
        data.prepare(client, scar.SoftmaxRegression(), ddf, "label", None)


def _dates_in_late_rows(frame):
    if frame.index.min() >= 100:
        frame = frame.assign(b=pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(len(frame)), unit="s"))
    return frame


def test_dates_in_a_partition_whose_dtype_said_numbers_are_named(client):
    """A wrong ``meta``: NumPy would turn the dates into numbers and train on them."""
    frame = _frame()
    ddf = dd.from_pandas(frame, npartitions=2).map_partitions(_dates_in_late_rows, meta=frame.iloc[:0])
    with pytest.raises(DataError, match=r"column 'b' holds values that are not numbers in one partition \(dates, "
                                        r"times or durations are not numbers; there its dtype is datetime64\[\w+\]\), "
                                        r"though the frame's dtypes say numbers"):
        data.prepare(client, scar.SoftmaxRegression(), ddf, "label", None)
    # numbers held as objects in a partition convert, as they did
    objects = dd.from_pandas(frame, npartitions=2).map_partitions(lambda f: f.astype({"b": object}),
                                                                  meta=frame.iloc[:0])
    assert data.prepare(client, scar.SoftmaxRegression(), objects, "label", None).n_rows == len(frame)


def test_a_column_summary_counts_every_row_of_a_long_partition():
    """Partitions are summarized in tiles of _SUMMARY_ROWS: the rows at a tile's edges count."""
    from dask_scar.data import _SUMMARY_ROWS, _summaries

    values = np.zeros((_SUMMARY_ROWS + 8, 3), np.float32)
    values[_SUMMARY_ROWS - 1, 0] = np.nan        # the first tile's last row
    values[_SUMMARY_ROWS, 1] = np.inf            # the second tile's first row
    values[_SUMMARY_ROWS - 1, 1], values[-1, 2] = -7, 2.5
    a, b, c = _summaries(["a", "b", "c"], values)
    assert (a.count, a.nonfinite, b.nonfinite, c.nonfinite) == (_SUMMARY_ROWS + 8, 1, 1, 0)
    assert (b.min, b.max, c.max) == (-7, 0, 2.5) and b.integral and not c.integral


def test_nan_and_inf_are_counted_per_column(client):
    frame = _frame()
    frame.loc[3, "a"] = np.nan
    frame.loc[150, "a"] = np.inf
    frame.loc[7, "c"] = -np.inf
    with pytest.raises(DataError, match=r"'a' \(2 of 200 rows\), 'c' \(1 of 200 rows\).*dropna") as kept:
        _prepare(client, frame)
    # the partitions were read before the error: they go, though a notebook keeps the traceback
    assert kept.tb is not None
    wait_for(lambda: client.run_on_scheduler(lambda dask_scheduler: [
        str(k) for k in dask_scheduler.tasks if "_partition_arrays" in str(k)]) == [], timeout=10,
        what="the partitions to go while the DataError lives")


def test_values_beyond_float32_are_refused_by_name(client):
    """float64 data is trained as float32: 1e300 would become inf in the block."""
    frame = _frame().astype({"b": np.float64})
    frame.loc[11, "b"] = 1e300
    with pytest.raises(DataError, match=r"beyond float32's range.*'b' \(1 of 200 rows\)"):
        _prepare(client, frame)
    target = _frame().astype({"b": np.float64})
    target.loc[4, "b"] = -1e39
    with pytest.raises(DataError, match=r"'b' \(1 of 200 rows\)"):
        data.prepare(client, scar.LinearRegression(), dd.from_pandas(target, npartitions=2), "b", None)


def test_empty_frame_is_refused(client):
    with pytest.raises(DataError, match="no rows"):
        _prepare(client, _frame().iloc[:0], npartitions=2)


def test_empty_partitions_are_skipped(client):
    frame = _frame(100)
    ddf = dd.from_pandas(frame, npartitions=4)
    ddf = ddf[ddf["a"] > 10.0].repartition(npartitions=2)  # keeps nothing
    full = dd.concat([ddf, dd.from_pandas(frame, npartitions=1)])
    training = data.prepare(client, scar.SoftmaxRegression(), full, "label", None)
    assert training.n_rows == 100
    assert all(n > 0 for n in training.rows)


def test_not_a_dataframe(client):
    with pytest.raises(DataError, match="expected a Dask or pandas DataFrame, got ndarray"):
        data.prepare(client, scar.SoftmaxRegression(), np.zeros((3, 3)), "label", None)


def test_each_block_is_placed_where_its_data_is(client):
    # Client.who_has answers in no particular order: blocks matched to workers by
    # position trained every block on the other worker, fetching it every iteration
    for seed in range(6):
        training = _prepare(client, _frame(400, seed=seed), npartitions=4)
        holders = client.who_has(training.blocks)
        assert [w in holders[b.key] for b, w in zip(training.blocks, training.workers)] == [True, True], seed


def test_live_workers_never_reads_the_clients_emptied_cache():
    """Client.scheduler_info() returns a cache that the client's periodic refresh (here
    every millisecond) fills without workers: it listed none in about a third of 300
    calls. live_workers asks the scheduler itself."""
    import dask
    from conftest import new_cluster
    from distributed import Client

    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}), \
            new_cluster(2) as cluster, Client(cluster) as client:
        assert all(len(live_workers(client)) == 2 for _ in range(300))


def _read_slowly(frame):
    import time
    time.sleep(1)
    return frame


def test_a_slow_read_lets_the_partitions_arrays_go(client, monkeypatch):
    """While the data is read, prepare() looks for paused workers every
    PAUSE_LOOK_SECONDS. Once it returns, nothing of it keeps the partitions' arrays
    (the blocks hold the rows now), without waiting for the garbage collector."""
    monkeypatch.setattr(data, "PAUSE_LOOK_SECONDS", 0.1)
    frame = _frame(400)
    slow = dd.from_delayed([dask.delayed(_read_slowly)(frame)], meta=frame.head(0))
    gc.disable()
    try:
        training = data.prepare(client, scar.SoftmaxRegression(), slow, "label", None)
        # (futures are let go on the client's event loop: soon, not at once)
        wait_for(lambda: not [k for k in client.refcount if str(k).startswith("_partition_arrays")], timeout=5,
                 what="the partitions' futures to go")     # (the code before: kept until the collector ran)
    finally:
        gc.enable()
    assert training.n_rows == 400


def test_a_worker_lost_as_the_read_ends_is_read_again(own_client, monkeypatch):
    """A worker SIGKILLed right after the partitions were read, before the driver asks
    where they are: Dask reads them again (for a second, here), the blocks of those it
    holds nowhere meanwhile go where Dask puts them, and every row is there."""
    from conftest import kill_worker

    holders, killed = data.holders, []

    def kill_first(client, futures):
        if not killed:
            killed.append(kill_worker(client, sorted(live_workers(client))[0]))
            wait_for(lambda: len(live_workers(client)) < 2, what="the scheduler to see the worker gone")
        return holders(client, futures)

    monkeypatch.setattr(data, "holders", kill_first)
    frame = _frame(400)
    slow = dd.from_delayed([dask.delayed(_read_slowly)(part) for part in (frame[:200], frame[200:])],
                           meta=frame.head(0))
    training = data.prepare(own_client, scar.SoftmaxRegression(), slow, "label", None)
    assert killed and training.n_rows == 400 and sum(training.rows) == 400


def _loads_after(workers, rows, running):
    """Each running worker's rows after :func:`data._plan`'s moves, checking each move."""
    workers, rows = list(workers), list(rows)
    givers, takers = set(), set()
    for i, n, taker in data._plan(workers, rows, running):
        assert 1 <= n <= rows[i] and workers[i] != taker
        givers.add(workers[i])
        takers.add(taker)
        if n < rows[i]:     # a cut: the end moves, as a new block
            rows[i] -= n
            rows.append(n)
            workers.append(taker)
        else:
            workers[i] = taker
    assert not givers & takers    # a worker gives or takes, never both
    loads = dict.fromkeys(running, 0)
    for w, n in zip(workers, rows):
        if w in loads:
            loads[w] += n
    return loads


def test_rows_are_spread_over_every_worker_that_needs_some():
    """One worker holds every block (three were lost and Dask rebuilt theirs on it);
    three replacements join at once. (The code before: 1,700, 0 and 0 rows for them.)"""
    loads = _loads_after(["a"] * 4, [1700, 1700, 1700, 2088], ["a", "b", "c", "d"])
    assert all(abs(n - 1797) <= 179.7 for n in loads.values()), loads


@pytest.mark.parametrize("workers, rows, running, expected", [
    (["a", "b"], [2696, 2695], ["a", "b", "c"], {"a": 1797, "b": 1797, "c": 1797}),    # a join
    (["a", "a", "b"], [1797, 1797, 1797], ["a", "b"], {"a": 2696, "b": 2695}),        # a loss: one block rebuilt
    (["a", "b"], [2000, 1000], ["a", "b"], {"a": 1500, "b": 1500}),                    # partitions placed unevenly
    (["a", "b"], [1600, 1400], ["a", "b"], {"a": 1600, "b": 1400}),                    # within the slack: nothing
    (["a", "b", "p"], [1000, 1000, 5000], ["a", "b"], {"a": 1000, "b": 1000}),         # p (paused) is left alone
])
def test_spread_plans(workers, rows, running, expected):
    loads = _loads_after(workers, rows, running)
    assert {w: loads[w] for w in running} == expected


def test_spread_plans_on_random_layouts():
    """Rows conserved, no one worse off, every worker within two slacks of an even share."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        running = [f"w{i:02d}" for i in range(rng.integers(1, 21))]
        n_blocks = int(rng.integers(1, 31))
        workers = list(rng.choice(running, n_blocks))
        rows = [int(rng.choice([rng.integers(1, 21), rng.integers(1, 2001), rng.integers(1000, 300_001)]))
                for _ in range(n_blocks)]
        loads = _loads_after(workers, rows, running)
        before = max(sum(n for w, n in zip(workers, rows) if w == r) for r in running)
        share = sum(rows) / len(running)
        slack = max(data.BALANCE_SLACK * share, 1)
        assert sum(loads.values()) == sum(rows) and max(loads.values()) <= before
        if sum(rows) >= 50 * len(running):     # (a few rows over many workers: rounding weighs)
            assert all(abs(n - share) <= 2 * slack for n in loads.values()), (workers, rows, loads)
