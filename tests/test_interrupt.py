"""Interrupting a fit (Ctrl-C, a notebook's stop button) on a real cluster: what stops,
and what it leaves behind."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import dask
import dask.dataframe as dd
import pytest
from conftest import low_rank_ratings, wait_for
from test_trainer import _check_segments_stopped, _running, _scar_keys, _segment_ran_since

import dask_scar as scar


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Python's own SIGINT handler for these tests. A process started in the background
    by a shell without job control (``cmd &`` in a script, some CI runners) ignores
    SIGINT, and Python leaves it so: Ctrl-C cannot reach a fit there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt() -> None:
    """Ctrl-C, as a terminal or a notebook's stop button sends it: a real SIGINT."""
    os.kill(os.getpid(), signal.SIGINT)


def _fit_interrupted(when, fit):
    """``fit()`` with Ctrl-C sent (see :func:`_interrupt`) once ``when()`` is true;
    returns the KeyboardInterrupt, as pytest keeps it."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if when():
                return _interrupt()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        with pytest.raises(KeyboardInterrupt) as kept:
            watcher.start()
            fit()
    finally:
        stop.set()
        watcher.join()
    return kept


def _chunk_version_seen(client, version: int) -> bool:
    """Whether the scheduler holds a chunk of ``version`` or later (an iteration's keys may
    come and go between two looks)."""
    return any(int(key.rsplit("-v", 1)[1]) >= version for key in client.run_on_scheduler(_scar_keys)
               if key.startswith("scar-chunk"))


_IGNORED_CTRL_C_DRIVER = """
import os, signal, sys
import pandas as pd
from distributed import Client
import dask_scar as scar

signal.signal(signal.SIGINT, signal.default_int_handler)     # (as a kernel has, also when started in the background)


class CtrlCInDel:      # sends this process SIGINT from its __del__, where Python ignores the KeyboardInterrupt
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)

seen = []
def callback(k, loss):
    seen.append(k)
    if k == 5:
        CtrlCInDel()    # dropped at once
handler = signal.getsignal(signal.SIGINT)
with Client(sys.argv[1]) as client:
    try:
        scar.Trainer(client, scar.SoftmaxRegression()).fit(pd.read_parquet(sys.argv[2]), target="label",
                                                           max_iter=200, tol=0, progress=False, callback=callback)
        print("trained to", max(seen))
    except KeyboardInterrupt:
        print("stopped after", max(seen), signal.getsignal(signal.SIGINT) is handler)
"""


def test_a_ctrl_c_that_python_ignored_still_stops_the_fit(client, digits, tmp_path):
    """Where a Ctrl-C lands in a ``__del__`` (a dropped Future's, in the driver, often)
    Python ignores its KeyboardInterrupt: the fit went on to ``max_iter``. (A driver
    process of its own, as a notebook's kernel is.)"""
    data = tmp_path / "digits.parquet"
    digits.to_parquet(data)
    out = subprocess.run([sys.executable, "-c", _IGNORED_CTRL_C_DRIVER, client.scheduler.address, str(data)],
                         capture_output=True, text=True, timeout=120)
    assert "Exception ignored" in out.stderr       # Python did ignore it
    assert out.stdout.split() in (["stopped", "after", "5", "True"], ["stopped", "after", "6", "True"]), \
        out.stdout + out.stderr     # (the code before: "trained to 200")


def test_a_second_ctrl_c_as_a_stopped_fit_lets_go_of_its_store_waits_until_it_has(client, digits, tmp_path,
                                                                                   monkeypatch):
    """An impatient user presses Ctrl-C again while the stopped fit lets go of its
    store: the store still ends released (it stayed named as written by the fit, and
    the next resume warned that that fit might still run)."""
    from dask_scar.store import ZarrStore

    release = ZarrStore.release

    def pressed_again(self, run):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)             # (Python runs a signal's handler between bytecodes)
        release(self, run)

    def stop(k, loss):
        if k == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ZarrStore, "release", pressed_again)
    store = tmp_path / "ckpt.zarr"
    with pytest.raises(KeyboardInterrupt):
        scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=2)).fit(
            digits, target="label", max_iter=1000, tol=0, progress=False, callback=stop)
    assert scar.open_store(store).writer is None      # (what it saved by then varies: not asked)


@pytest.mark.slow
def test_an_interrupted_fit_stops_its_segments(client, digits, tmp_path):
    """Interrupting a fit (Ctrl-C, a notebook's stop button) during a segment: the
    fit's clean-up stops the segment's tasks at their next exchange. Dask cannot stop
    a running task, and left alone these would run the segment's remaining iterations
    (here ~100,000, minutes) on the threads the next fit needs, and write their
    checkpoint rounds."""
    ddf = dd.from_pandas(digits, npartitions=4)
    started = time.time()
    with dask.config.set({"scar.segment-iterations": 100_000}):     # once its workers sent progress (every second)
        _fit_interrupted(lambda: _segment_ran_since(client, started), lambda: scar.Trainer(
            client, scar.SoftmaxRegression(), store=tmp_path / "ckpt").fit(ddf, target="label", max_iter=100_000,
                                                                          tol=0, progress=False))
    _check_segments_stopped(client, ddf)


def test_interrupted_fits_leave_no_chunk_behind(client):
    """Interrupted while waiting for an iteration (ALS: one graph per iteration), a fit
    used to leave that iteration's chunks on the workers, wanted by the client for good:
    a model's worth of memory per press of a notebook's stop button."""
    frame, _ = low_rank_ratings()
    ddf = dd.from_pandas(frame, npartitions=4)
    for trial in range(3):
        _fit_interrupted(lambda: _chunk_version_seen(client, 3), lambda: scar.Trainer(
            client, scar.MatrixFactorization(rank=5)).fit(ddf, max_iter=100_000, tol=0, progress=False))
        gc.collect()
        wait_for(lambda: client.run_on_scheduler(_scar_keys) == [], timeout=10,
                 what=f"no scar- key left on the scheduler after interrupt {trial + 1}")
        wait_for(lambda: all(keys == [] for keys in client.run(
            lambda dask_worker: [k for k in dask_worker.data if str(k).startswith("scar-chunk")]).values()),
            timeout=10, what="no chunk left in the workers' memory")


def _tasks(dask_scheduler) -> list[str]:
    return sorted(map(str, dask_scheduler.tasks))


@pytest.mark.parametrize("model", ["softmax", "als"])
def test_an_interrupted_fit_holds_nothing_while_its_traceback_lives(client, model, digits):
    """A notebook keeps the last exception's traceback (``sys.last_traceback``), whose
    frames held the fit's futures: a copy of the training data stayed on the workers
    (and, for ALS, the iteration in flight) until another error replaced it."""
    if model == "als":
        ddf, fit = dd.from_pandas(low_rank_ratings()[0], npartitions=4), dict(model=scar.MatrixFactorization(rank=5))
    else:
        ddf, fit = dd.from_pandas(digits, npartitions=4), dict(model=scar.SoftmaxRegression(), target="label")
    started = time.time()
    kept = _fit_interrupted(
        lambda: any(t >= started and e.get("iteration", 0) >= 3 for t, e in client.get_events("scar-progress")),
        lambda: scar.Trainer(client, fit.pop("model")).fit(ddf, **fit, max_iter=100_000, tol=0, progress=False))
    assert kept.tb is not None
    wait_for(lambda: client.run_on_scheduler(_tasks) == [], timeout=10,
             what="no task left on the scheduler while the traceback lives")


def _slow_remember(seconds: float) -> None:
    """On a worker: each task waits ``seconds`` before it keeps its chunk copies, so that
    an interrupted fit's tasks are still running when the driver says the run ended."""
    from dask_scar import chunks, iteration

    def remember(run, copies):
        time.sleep(seconds)
        chunks.remember(run, copies)

    iteration.remember = remember


def _runs_kept() -> list[str]:
    """On a worker: the runs whose chunk copies (or values for checkpoint rounds) it keeps."""
    from dask_scar import checkpoint, chunks

    return sorted({*chunks._seen, *checkpoint._kept})


def test_tasks_still_running_after_an_interrupt_keep_no_chunk_copies(own_client):
    """Dask cannot stop a running task: those of an interrupted fit (ALS, one graph per
    iteration) ran on after the workers had dropped the run's chunk copies, and kept
    new ones for good (a model's worth per worker and run, up to 4 runs)."""
    client = own_client
    client.run(_slow_remember, 0.5)
    frame, _ = low_rank_ratings()
    ddf = dd.from_pandas(frame, npartitions=4)
    _fit_interrupted(lambda: _chunk_version_seen(client, 2), lambda: scar.Trainer(
        client, scar.MatrixFactorization(rank=5)).fit(ddf, max_iter=100_000, tol=0, progress=False))
    wait_for(lambda: set(client.run(_running).values()) == {0}, timeout=20, what="the run's tasks to end")
    kept = client.run(_runs_kept)
    assert len(kept) == 2 and not any(kept.values()), kept


def _turns(dask_scheduler):
    plugin = dask_scheduler.plugins["scar"]
    return plugin.turn, list(plugin.waiting)


def test_a_fit_interrupted_while_it_waits_for_its_turn_gives_its_place_back(client, digits):
    """Another run's segment has the cluster's turn (here a second client holds it); a
    fit waits for it, and Ctrl-C stops the wait: the fit's place in the queue goes with
    it, so the next fit waits for no one (a lease that nobody held, granted after the
    interrupt, held every fit on the cluster for 30-40 s). When the other client goes,
    so does its turn."""
    from distributed import Client

    from dask_scar.plugin import ensure_plugin

    ensure_plugin(client)
    with Client(client.scheduler.address) as other:
        assert other.sync(other.scheduler.scar_turn, run="other-run", client=other.id, timeout=5)
        waiting = lambda: client.run_on_scheduler(_turns)[1] != []     # noqa: E731
        _fit_interrupted(waiting, lambda: scar.Trainer(client, scar.SoftmaxRegression()).fit(
            digits, target="label", max_iter=100, tol=0, progress=False))
        assert client.run_on_scheduler(_turns) == ("other-run", [])
    wait_for(lambda: client.run_on_scheduler(_turns) == (None, []), what="the closed client's turn to go")
    result = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=30, tol=0,
                                                               progress=False)
    assert result.n_iter == 30 and client.run_on_scheduler(_turns) == (None, [])


def test_clean_up_finishes_before_a_ctrl_c_or_a_handled_sigterm_acts():
    """What the store's release runs in: a Ctrl-C, or a SIGTERM where Python handles it
    (the CLI's), pressed meanwhile acts once it is done."""
    from dask_scar.recovery import ctrl_c_after

    order = []

    def on_term(signum, frame):
        order.append("SIGTERM handled")
        raise RuntimeError("terminated")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for signum, raised in ((signal.SIGTERM, RuntimeError), (signal.SIGINT, KeyboardInterrupt)):
            order.clear()
            with pytest.raises(raised):
                with ctrl_c_after():
                    os.kill(os.getpid(), signum)
                    time.sleep(0.1)         # (Python runs a signal's handler between bytecodes)
                    order.append("clean-up done")
            assert order[0] == "clean-up done"
        assert signal.getsignal(signal.SIGTERM) is on_term and signal.getsignal(signal.SIGINT) is \
            signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")     # (Python ignoring it is the point)
def test_a_sigterm_that_python_ignored_comes_back_as_itself(client):
    """The CLI's SIGTERM raises a KeyboardInterrupt of its own kind: ignored in a
    ``__del__``, the fit's next wait raises that kind again (exit 143, not 130)."""
    from dask_scar.cli import Terminated
    from dask_scar.recovery import interruptible, wait_on

    class Dropped:
        def __del__(self):
            raise Terminated

    with interruptible():
        Dropped()       # its __del__ raises: Python says "Exception ignored" and goes on
        with pytest.raises(Terminated):
            wait_on(client, [])
