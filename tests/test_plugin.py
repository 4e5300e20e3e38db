"""ScarPlugin installed the three supported ways, on real schedulers; its turns, and its word to adaptive scaling."""

import logging
import os
import re
import signal
import threading
import time

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import alive, cli_cluster, new_cluster, wait_for
from distributed import Client

import dask_scar as scar
from dask_scar import config
from dask_scar.plugin import ensure_plugin, restart_hung
from dask_scar.recovery import ClusterWatch, live_workers


def _has_plugin(client):
    return client.run_on_scheduler(lambda dask_scheduler: "scar" in dask_scheduler.plugins)


def test_register_plugin_is_idempotent(own_client):
    assert not _has_plugin(own_client)
    own_client.register_plugin(scar.ScarPlugin())
    own_client.register_plugin(scar.ScarPlugin())
    assert _has_plugin(own_client)
    handlers = own_client.run_on_scheduler(lambda dask_scheduler: "scar-detach" in dask_scheduler.stream_handlers)
    assert handlers


def test_trainer_installs_the_plugin_when_absent(own_client, digits):
    assert not _has_plugin(own_client)
    scar.Trainer(own_client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=3, progress=False)
    assert _has_plugin(own_client)
    detached = own_client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["scar"].detached)
    assert detached == 2 * 4  # every chunk: version 0, and version 3 at the end of the one segment


@pytest.mark.slow
def test_preload_on_a_cli_cluster(tmp_path, digits):
    """``dask scheduler --preload dask_scar.preload`` plus ``dask worker`` processes on 127.0.0.1."""
    with cli_cluster(tmp_path, 2) as (_, client):
        assert _has_plugin(client)
        ensure_plugin(client)  # finds it: no second copy
        model = scar.SoftmaxRegression(momentum=0.9)
        result = scar.Trainer(client, model).fit(digits, target="label", max_iter=40, progress=False)
        assert result.history["loss"].iloc[-1] < 0.5 * result.history["loss"].iloc[0]
        assert model.score(digits, "label") > 0.9


def test_new_cluster_helper_uses_processes():
    with new_cluster(2) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()


def test_memory_manager_keeps_chunk_copies_and_drops_others(own_client):
    """Dask's Active Memory Manager drops extra copies of keys, chunks too; with the
    plugin it still does, except for parameter chunks (their owners' copies must stay)."""
    client = own_client
    a = sorted(live_workers(client))[0]

    def two_copies(key):
        future = client.submit(np.ones, 1000, key=key, workers=[a])
        client.replicate([future], n=2)
        client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.extensions["amm"].run_once())
        return future

    def copies(key):
        return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks[key].who_has))

    before = two_copies("scar-chunk-test-weights-0-e0-v1")
    wait_for(lambda: copies(before.key) == 1, what="Dask's memory manager to drop a chunk copy")

    client.register_plugin(scar.ScarPlugin())
    chunk, other = two_copies("scar-chunk-test-weights-0-e0-v2"), two_copies("some-array")
    wait_for(lambda: copies(other.key) == 1, what="the memory manager to drop a copy")
    assert copies(chunk.key) == 2


def _publish(topic, dask_scheduler=None):
    dask_scheduler.log_event(topic, {"n": 1})


def test_subscribe_returns_once_the_scheduler_has_the_subscription(client):
    """An event published by the scheduler right after ``subscribe`` returns (here, by
    an RPC that can overtake the subscription Dask sends on) reaches the handler."""
    from dask_scar.plugin import subscribe

    missed = 0
    for i in range(40):
        got = []
        stop = subscribe(client, f"scar-test-{i}", got.append)
        client.run_on_scheduler(_publish, f"scar-test-{i}")
        try:
            wait_for(lambda: got, what="the event", timeout=1)
        except AssertionError:
            missed += 1
        stop()
    assert missed == 0


def _publish_every_2_ms(topic, dask_scheduler=None):
    from tornado.ioloop import PeriodicCallback

    dask_scheduler._scar_test_publisher = PeriodicCallback(lambda: dask_scheduler.log_event(topic, {"n": 1}), 2)
    dask_scheduler._scar_test_publisher.start()


def _stop_publishing(dask_scheduler=None):
    dask_scheduler._scar_test_publisher.stop()


def test_subscribing_while_events_of_another_topic_arrive_does_not_hang(client):
    """While ``subscribe`` waits for the scheduler to take a new subscription, events
    of a topic the client already follows keep arriving on its event loop (a fit
    subscribes twice; workers join meanwhile): their dispatch must not wait for the
    subscription, which needs that loop (it held a lock the wait held: the client hung)."""
    from dask_scar.plugin import subscribe

    got = []
    stop_x = subscribe(client, "scar-test-x", got.append)
    client.run_on_scheduler(_publish_every_2_ms, "scar-test-x")
    try:
        wait_for(lambda: got, what="the first events")

        def subscribe_many():
            for i in range(100):
                subscribe(client, f"scar-test-y{i}", lambda event: None)()

        thread = threading.Thread(target=subscribe_many, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        client.run_on_scheduler(_stop_publishing)
        stop_x()


def test_turns_go_to_live_runs_of_connected_clients_only(own_client):
    """A request for a turn that comes after its run ended, or from a client that
    went (a driver interrupted while its request was on its way), is refused: a turn
    granted then would have had no one to give it back."""
    from dask_scar.plugin import set_epoch

    ensure_plugin(own_client)

    def turn(run, client_id=own_client.id):
        return own_client.sync(own_client.scheduler.scar_turn, run=run, client=client_id, timeout=0.1)

    def state(dask_scheduler):
        plugin = dask_scheduler.plugins["scar"]
        return plugin.turn, list(plugin.waiting)

    assert turn("gone-client-run", "Client-that-went") is False
    set_epoch(own_client, "ended-run", None)
    assert turn("ended-run") is False
    assert own_client.run_on_scheduler(state) == (None, [])
    assert turn("live-run") is True and own_client.run_on_scheduler(state) == ("live-run", [])
    assert turn("next-run") is False and own_client.run_on_scheduler(state) == ("live-run", ["next-run"])
    own_client.sync(own_client.scheduler.scar_turn_release, run="live-run")
    assert turn("next-run") is True
    own_client.sync(own_client.scheduler.scar_turn_release, run="next-run")
    assert own_client.run_on_scheduler(state) == (None, [])


def _detach_in_a_task(key: str, client_id: str, run: str, epoch: int) -> None:
    from dask_scar.chunks import Chunk, ChunkId, detach

    detach({key: Chunk(ChunkId("w", 0, 0, 4), {"value": np.ones(4)}, 3)}, client_id, run, epoch)


def test_chunks_of_an_epoch_their_run_left_behind_are_refused(own_client):
    """A task abandoned by a recovery may still finish: its chunks (of the epoch before)
    are refused, and the worker frees them; those of the run's epoch are kept."""
    from dask_scar.plugin import set_epoch

    ensure_plugin(own_client)
    set_epoch(own_client, "run-e", 2)
    old, new = "scar-chunk-run-e-w-0-e1-v3", "scar-chunk-run-e-w-0-e2-v3"
    for key, epoch in ((old, 1), (new, 2)):
        own_client.submit(_detach_in_a_task, key, own_client.id, "run-e", epoch, pure=False).result()

    def state(dask_scheduler):
        plugin = dask_scheduler.plugins["scar"]
        return plugin.rejected, plugin.detached, sorted(k for k in dask_scheduler.tasks if k in (old, new))

    assert wait_for(lambda: own_client.run_on_scheduler(state)[:2] == (1, 1),
                    what="both chunks' registrations") and own_client.run_on_scheduler(state)[2] == [new]
    wait_for(lambda: sorted(own_client.run(lambda dask_worker: sorted(
        k for k in dask_worker.data if k in (old, new))).values()) in ([[], [new]], [[new], []]),
        what="the worker to free the refused chunk and keep the other")
    set_epoch(own_client, "run-e", None)

    # a driver that went (killed) never ends its runs: the plugin forgets their epochs
    epochs = lambda: own_client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.plugins["scar"].epochs))
    with Client(own_client.scheduler.address) as other:
        set_epoch(other, "run-gone", 1)
        set_epoch(own_client, "run-kept", 1)
        assert epochs() == ["run-gone", "run-kept"]
    wait_for(lambda: epochs() == ["run-kept"], what="the gone client's run to be forgotten")
    set_epoch(own_client, "run-kept", None)
    assert epochs() == []


def test_tasks_queued_behind_another_runs_segment_wait_past_the_timeout(own_client, caplog):
    """Another fit's segment holds a worker's thread for its length: a fit's task queued
    behind it there waits longer than scar.iteration-timeout, and that is no hang. A
    task of the fit that hangs on another worker is one, segment or not."""
    from distributed import wait

    from dask_scar.plugin import segment_of_another_run
    from dask_scar.recovery import wait_watching

    client = own_client
    ensure_plugin(client)
    workers = sorted(live_workers(client))
    segments = [client.submit(time.sleep, 4, key=f"scar-segment-other-e0-1-{i}", workers=[w])
                for i, w in enumerate(workers)]
    wait_for(lambda: len(client.processing()[workers[0]]) == 1, what="the other run's segment to run")
    mine = [client.submit(int, 1, key="scar-chunk-mine-w-0-e0-v0", workers=[workers[0]])]
    wait_for(lambda: len(client.processing()[workers[0]]) == 2, what="this fit's task to queue")
    assert segment_of_another_run(client, [mine[0].key]) == "other"
    assert segment_of_another_run(client, ["scar-chunk-other-w-0-e0-v0"]) is None    # its own segment
    watch = ClusterWatch(client)
    try:
        with caplog.at_level(logging.WARNING, logger="dask_scar"):
            wait_watching(mine, watch, lambda: set(workers), timeout=1.0, hint="")
        assert mine[0].result() == 1
        assert "waited over scar.iteration-timeout=1s for run other's segment on the same workers" in caplog.text
        wait(segments)
        # the other run's segment on one worker, this fit's task hung on the other
        segments = [client.submit(time.sleep, 5, key="scar-segment-other-e0-2-1", workers=[workers[1]])]
        hung = [client.submit(time.sleep, 5, key="scar-chunk-mine-w-0-e0-v1", workers=[workers[0]])]
        wait_for(lambda: all(len(client.processing()[w]) == 1 for w in workers), what="both to run")
        started = time.monotonic()
        with pytest.raises(scar.ScarError, match="took longer than scar.iteration-timeout=1s"):
            wait_watching(hung, watch, lambda: set(workers), timeout=1.0, hint="")
        assert time.monotonic() - started < 5
    finally:
        watch.close()


def test_adaptive_target_asks_for_the_workers_the_fits_could_use(own_client):
    """Dask's adaptive scaling sees no queued task for a fit (one task per worker):
    the plugin raises the scheduler's adaptive target to the workers that would do
    the runs' remaining work in adapt's target duration, at most the most any run
    could use, for live runs of connected clients that said so lately."""
    from dask_scar.plugin import say_work, set_epoch

    client = own_client
    idle = client.sync(client.scheduler.adaptive_target)    # Dask's own: two idle workers
    ensure_plugin(client)

    def target(duration="5s"):      # as Dask's Adaptive asks: the scheduler's handler
        return client.sync(client.scheduler.adaptive_target, target_duration=duration)

    assert target() == idle
    assert say_work(client, "run-a", seconds=100.0, most=4, valid_for=60)
    assert target() == 4                    # 20 workers for 100 s in 5 s, but its rows use 4
    assert target("50s") == 2
    assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.adaptive_target()) == 4   # the HTTP API's way
    assert say_work(client, "run-b", seconds=200.0, most=3, valid_for=60)
    assert target("100s") == 3              # both runs' work (they take turns), at most 4
    set_epoch(client, "run-a", None)        # run-a ended
    assert target("100s") == 2 and target() == 3
    say_work(client, "run-b", seconds=0.0, most=1, valid_for=0)     # withdrawn
    assert target() == idle
    assert say_work(client, "run-c", seconds=100.0, most=4, valid_for=2)
    assert target() == 4
    wait_for(lambda: target() == idle, timeout=10, what="run-c's work to lapse")
    set_epoch(client, "ended-run", None)
    say_work(client, "ended-run", seconds=100.0, most=4, valid_for=60)
    with Client(client.scheduler.address) as other:
        say_work(other, "other-run", seconds=100.0, most=4, valid_for=60)
        assert target() == 4
    wait_for(lambda: target() == idle, timeout=10, what="the closed client's work to go")

    say_work(client, "run-d", seconds=100.0, most=4, valid_for=60)
    client.unregister_scheduler_plugin("scar")      # (Dask does not close it)
    client.register_plugin(scar.ScarPlugin())
    assert target() == idle                 # the new plugin's, not the removed one's on top

    def fail(**kwargs):
        raise OSError("a scheduler under load")

    client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.handlers.update(scar_workload=fail))
    assert say_work(client, "run-e", seconds=100.0, most=4, valid_for=60) is True    # tried again later
    client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.handlers.pop("scar_workload") and None)
    assert say_work(client, "run-e", seconds=100.0, most=4, valid_for=60) is False   # an older plugin's scheduler


@pytest.mark.slow
def test_adapt_adds_a_worker_during_a_fit_and_lets_it_go_after():
    """``cluster.adapt(1, 2)`` on a one-worker cluster: the fit's work asks for a
    second worker, which takes its share of the rows; once the fit is over, Dask
    retires it."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((40_000, 20)).astype("float32"), columns=[f"x{i}" for i in range(20)])
    frame["label"] = rng.integers(0, 5, len(frame))
    with new_cluster(1) as cluster, Client(cluster) as client:
        cluster.adapt(minimum=1, maximum=2, interval="200ms")
        started, joined = time.monotonic(), []

        def until_the_new_worker_ran_a_while(k, loss):     # (a callback: one graph per iteration)
            workers = client.scheduler_info()["workers"]
            if len(workers) == 2 and not joined:
                joined.append(k)
            return (joined and k > joined[0] + 30) or time.monotonic() - started > 120

        result = scar.Trainer(client, scar.SoftmaxRegression()).fit(
            frame, target="label", max_iter=100_000, tol=0, progress=False, callback=until_the_new_worker_ran_a_while)
        assert joined, "no worker joined in 120 s"
        moved = [e for e in result.history["event"] if "moved" in e]
        assert len(moved) == 1 and "20,000 data rows onto" in moved[0]
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, timeout=30,
                 what="adapt to retire the worker once the fit was over")


@pytest.mark.slow
def test_a_fit_waiting_for_its_first_worker_gets_one_from_adapt(digits):
    """``cluster.adapt(minimum=0)`` with no worker: nothing queues while a fit waits
    for workers, so the fit asks for one itself."""
    with dask.config.set({"scar.recovery.wait-for-workers": 30}), new_cluster(0) as cluster, \
            Client(cluster) as client:
        cluster.adapt(minimum=0, maximum=1, interval="200ms")
        model = scar.SoftmaxRegression()
        result = scar.Trainer(client, model).fit(digits, target="label", max_iter=5, progress=False)
        assert len(result.history) == 5 and len(client.scheduler_info()["workers"]) == 1
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["scar"].workloads) == {}


def test_a_scheduler_that_gives_no_turns_is_asked_once_per_fit(own_client, digits, caplog):
    """A scheduler whose dask-scar plugin is older answers None to the turn and work
    requests (and logs a warning for each): a fit asks once, says so once, and runs."""
    client = own_client
    ensure_plugin(client)

    def answer_none(dask_scheduler):
        dask_scheduler.asked = []
        for handler in ("scar_turn", "scar_turn_release", "scar_workload"):
            dask_scheduler.handlers[handler] = lambda handler=handler, **kwargs: dask_scheduler.asked.append(handler)

    client.run_on_scheduler(answer_none)
    with caplog.at_level("WARNING", logger="dask_scar"):
        result = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=600, tol=0,
                                                                    progress=False)
    assert len(result.history) == 600
    asked = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.asked)
    assert asked.count("scar_turn") == 1 and "scar_turn_release" not in asked and asked.count("scar_workload") <= 1
    assert sum("gives segments no turns" in r.getMessage() for r in caplog.records) == 1


def test_a_turn_held_with_no_segment_running_goes_to_the_next_run(own_client, digits, monkeypatch, caplog):
    """A driver that hung holding the turn (its client still connected, no segment of
    its run on the cluster) keeps the other fits waiting only TURN_IDLE_SECONDS."""
    import dask_scar.plugin

    monkeypatch.setattr(dask_scar.plugin, "TURN_IDLE_SECONDS", 2.0)    # (the scheduler runs in this process)
    client = own_client
    ensure_plugin(client)
    with Client(client.scheduler.address) as hung:
        assert hung.sync(hung.scheduler.scar_turn, run="hung-run", client=hung.id, timeout=1) is True
        outcome = []
        fit = threading.Thread(target=lambda: outcome.append(scar.Trainer(client, scar.SoftmaxRegression()).fit(
            digits, target="label", max_iter=30, progress=False)), daemon=True)
        with caplog.at_level("WARNING", logger="dask_scar"):
            fit.start()
            fit.join(60)
        assert not fit.is_alive(), "the fit still waits for the hung run's turn"
        assert len(outcome[0].history) == 30
        assert any("run hung-run has held the segment turn for" in r.getMessage() for r in caplog.records)



@pytest.mark.slow
def test_a_hung_worker_is_restarted_on_request(own_client):
    """A SIGSTOPped worker sends no heartbeat, and Dask would remove it only after
    distributed.scheduler.worker-ttl (5 minutes). Asked by a fit's driver, the plugin
    removes it once it has been silent for scar.recovery.hung-worker (at least ten
    heartbeats: 5 s here), and its nanny starts a new process. Switched off, nothing."""
    client = own_client
    ensure_plugin(client)
    workers = live_workers(client)
    healthy, victim = sorted(workers)
    pid = client.run(os.getpid, workers=[victim])[victim]
    with dask.config.set({"scar.recovery.hung-worker": False}):
        off = ClusterWatch(client)
    with dask.config.set({"scar.recovery.hung-worker": "1s"}):
        watch = ClusterWatch(client)
    try:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2.5)
        assert restart_hung(client, workers, 1.0) == {}      # silent for less than ten heartbeats
        time.sleep(3.5)
        off.restart_hung(workers)
        assert victim in live_workers(client) and not off.hung
        assert restart_hung(client, {healthy}, 1.0) == {}
        watch.restart_hung(workers)
        assert watch.hung == {victim}
        wait_for(lambda: victim not in live_workers(client), timeout=10, what="the hung worker's removal")
        wait_for(lambda: not alive(pid), timeout=30, what="the nanny to kill the hung process")
        wait_for(lambda: len(live_workers(client)) == 2, timeout=60, what="the nanny's new worker")
        client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.handlers.pop("scar_hung") and None)
        assert restart_hung(client, workers, 1.0) is None       # an older plugin's scheduler
        watch.restart_hung(workers)
        assert watch.hung_after is None         # asked once
    finally:
        watch.close()
        off.close()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("key, setting, said", [
    ("recovery.hung-worker", "soon", " is no duration: give one such as '60s' or 60 (seconds), or false"),
    ("recovery.hung-worker", -5, " is no duration: give one"),
    ("recovery.hung-worker", True, " is no duration: give one"),
    ("iteration-timeout", "ten", " is no duration: give one such as '60s' or 60 (seconds)"),
    ("iteration-timeout", 0, " is no duration: give one"),
    ("recovery.wait-for-workers", "-3s", " is no duration: give one"),
    ("chunks-per-worker", 0, ": give a whole number, at least 1"),
    ("chunks-per-worker", "two", ": give a whole number, at least 1"),
    ("checkpoint.blocks-per-chunk", 2.5, ": give a whole number, at least 1"),
    ("divergence-factor", "big", ": give a number more than 1"),
    ("checkpoint.fraction", 1.5, ": give a number more than 0 and at most 1"),
    ("recovery.replicas", "sometimes", ": give true or false"),
])
def test_a_bad_setting_is_said_before_the_data_is_read(client, digits, key, setting, said):
    with dask.config.set({f"scar.{key}": setting}), \
            pytest.raises(ValueError, match=re.escape(f"scar.{key}={setting!r}{said}")):
        scar.Trainer(client, scar.SoftmaxRegression()).fit(dd.from_pandas(digits, npartitions=2).map_partitions(
            _never, meta=digits), target="label", max_iter=3, progress=False)


def test_settings_are_read_as_their_kind():
    """Durations as Dask writes them, and the strings that environment variables give."""
    settings = {"scar.iteration-timeout": "10 minutes", "scar.recovery.wait-for-workers": 0,
                "scar.recovery.hung-worker": 0, "scar.chunks-per-worker": "4", "scar.recovery.replicas": "false",
                "scar.progress": 0, "scar.tile-rows": 4e3}     # 0 and 4e3: Dask reads DASK_SCAR__PROGRESS=0 so
    with dask.config.set(settings):
        assert [config.get(k) for k in ("iteration-timeout", "recovery.wait-for-workers", "recovery.hung-worker",
                                        "chunks-per-worker", "recovery.replicas", "progress", "tile-rows")] == [
            600.0, 0.0, None, 4, False, False, 4000]
    with dask.config.set({"scar.recovery.hung-worker": "90s"}):
        assert config.get("recovery.hung-worker") == 90.0


@pytest.mark.slow
def test_settings_are_the_drivers_not_the_workers(tmp_path, digits):
    """Workers started with a bad scar.* setting in their environment: the fit reads its
    settings where it was started, and trains."""
    from conftest import CliCluster

    cluster = CliCluster(tmp_path)
    try:
        cluster.env["DASK_SCAR__TILE_ROWS"] = "abc"
        cluster.add_workers(2)
        with Client(scheduler_file=str(cluster.scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            assert set(client.run(lambda: dask.config.get("scar.tile-rows")).values()) == {"abc"}
            result = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=3,
                                                                        progress=False)
        assert result.n_iter == 3
    finally:
        cluster.close()


def _never(part):
    raise AssertionError("the data was read")


_SCHEDULER_WITHOUT_DASK_SCAR = """
import sys
sys.modules["dask_scar"] = None      # as on a scheduler where dask-scar is not installed
from distributed.cli.dask_scheduler import main
main()
"""


def test_a_scheduler_without_dask_scar_is_named(tmp_path):
    import subprocess
    import sys

    file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen([sys.executable, "-c", _SCHEDULER_WITHOUT_DASK_SCAR, "--host", "127.0.0.1",
                                  "--port", "0", "--dashboard-address", ":0", "--scheduler-file", str(file)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(file.exists, timeout=60, what="the scheduler file")
        with Client(scheduler_file=str(file), timeout=30) as client:
            with pytest.raises(scar.ScarError, match=r"the scheduler at tcp://127.0.0.1:\d+ cannot import dask_scar "
                                                     r"\(.*\): install dask-scar, the same version as here, on the "
                                                     r"scheduler and on every worker"):
                scar.Trainer(client, scar.SoftmaxRegression()).fit(pd.DataFrame({"x": [0.0, 1.0], "y": [0, 1]}),
                                                                   target="y", progress=False)
    finally:
        scheduler.kill()
        scheduler.wait()
