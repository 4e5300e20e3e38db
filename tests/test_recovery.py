"""Recovery from real worker loss: real clusters, real SIGKILLs, real stores on disk.

Failures are injected from ``fit(callback=...)``: after iteration N the callback
kills a worker process, so every strategy meets the same failure (same iteration,
same worker, same chunks), and the chunks that die have no copy elsewhere (the
next iteration's contributions have not fetched them yet).
"""

import itertools
import logging
import os
import re
import signal
import threading
import time
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import alive, cli_cluster, committed, kill_worker, new_cluster, wait_for
from distributed import Client, Event
from distributed.diagnostics.plugin import WorkerPlugin

import dask_scar as scar
from dask_scar.bench import iteration_cost
from dask_scar.checkpoint import as_of
from dask_scar.chunks import ChunkId
from dask_scar.datasets import synthetic_classification, synthetic_corpus
from dask_scar.local import fit_local, prepare_local
from dask_scar.recovery import Drift, live_workers, run_on

FRAME = synthetic_classification(12_000, 63, 10, seed=1)   # 64 weight rows x 10 classes
MODEL_BYTES = 64 * 10 * 4


def model():
    # plain gradient descent, strongly convex: the loss falls monotonically, ~5 % of
    # its distance to the optimum per iteration, so "iterations to reach a loss" is sharp
    return scar.SoftmaxRegression(l2=3e-3, learning_rate=1.0)


def once_at(iteration, action):
    """A fit callback that runs ``action()`` once, after ``iteration``."""
    fired = []

    def callback(k, loss):
        if k == iteration and not fired:
            fired.append(k)
            action()
    return callback


def committed_iteration(store) -> int:
    """The iteration of the store's last committed checkpoint round (0 before the first)."""
    return scar.open_store(store).manifest.get("iteration", 0)


def train(client, tmp_path, name, max_iter=100, callback=None, resume=False, **trainer):
    trainer = {"store": tmp_path / f"{name}.zarr", "policy": scar.FullCheckpoint(every=10), "n_chunks": 8,
               **trainer}
    return scar.Trainer(client, model(), **trainer).fit(dd.from_pandas(FRAME, npartitions=8), target="label",
                                                        max_iter=max_iter, tol=0, progress=False,
                                                        callback=callback, resume=resume)


def loss_of(params) -> float:
    """The objective at ``params`` on FRAME, computed in this process."""
    local = model()
    block = prepare_local(local, FRAME, "label")
    c = local.contribution(0, block, params, np)
    return c.loss / c.count + c.penalty


def span(label) -> tuple[int, int]:
    """Rows ``(start, stop)`` of a chunk label such as ``"weights[8:16]"``."""
    start, stop = label[label.index("[") + 1:-1].split(":")
    return int(start), int(stop)


def rows_of(labels) -> int:
    return sum(stop - start for start, stop in map(span, labels))


def scar_keys(client):
    return client.run_on_scheduler(lambda dask_scheduler: sorted(
        k for k in dask_scheduler.tasks if str(k).startswith(("scar-chunk", "scar-update", "scar-contrib",
                                                               "scar-segment"))))


class scar_client:
    """A Client on ``cluster`` that checks, on leaving, that no run left tasks behind."""

    def __init__(self, cluster):
        from distributed import Client

        self.client = Client(cluster)

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                wait_for(lambda: scar_keys(self.client) == [], timeout=10,
                         what=f"the runs' tasks to be released (left when the wait began: {scar_keys(self.client)})")
        finally:
            self.client.close()


def test_drift_bounds_the_perturbation_and_predicts_with_the_contraction_bound():
    a, b = ChunkId("w", 0, 0, 4), ChunkId("w", 1, 4, 8)       # 2 blocks of 2 rows each
    drift = Drift([a, b])
    for k in range(1, 11):                                     # steps shrink by c = 0.9
        drift.record(k, {"w/0": 0.9 ** k, "w/1": 0.0})
    # nothing saved since the start: bounded by the path walked
    assert drift.distance(a) == pytest.approx(sum(0.9 ** k for k in range(1, 11)))
    assert drift.distance(b) == 0.0
    c, last = drift.contraction()
    assert c == pytest.approx(0.9) and last == pytest.approx(0.9 ** 10)
    # the policy measured block distances 3 and 4 now; one more step of 0.5 since
    drift.prioritized({"w/0": [3.0, 4.0], "w/1": [float("inf"), 1.0]})   # inf: unknown, kept as before
    drift.record(11, {"w/0": 0.5, "w/1": 0.0})
    assert drift.distance(a) == pytest.approx(5.0 + 0.5) and drift.distance(b) == 0.0
    # the writer stored block 1 with its values of iteration 11: only block 0's 3.0 remains
    drift.saved(11, {"w/0": [1]}, {"w": 2})
    assert drift.distance(a) == pytest.approx(3.0 + 0.5)    # measured at 10, stepped 0.5 since
    # ... unless it was measured after those values; a whole-chunk save of iteration 11 zeroes it
    drift.saved(11, {"w/0": [0, 1]}, {"w": 2})
    assert drift.distance(a) == 0.0
    drift.record(12, {"w/0": 0.25, "w/1": 0.0})
    delta, predicted, c = drift.predict([a])
    assert delta == pytest.approx(0.25)
    # log_{1/c}(1 + delta / ||x_T - x*||), with ||x_T - x*|| = last step * c / (1 - c)
    c, last = drift.contraction()
    assert predicted == pytest.approx(np.log1p(delta / (last * c / (1 - c))) / np.log(1 / c))
    drift.reset([a])
    assert drift.predict([a])[:2] == (0.0, 0.0)
    # in a fit's order: the step of 13, the distances measured after it, the write of
    # 13's values of block 1: block 0's distance is left
    drift.record(13, {"w/0": 0.1, "w/1": 0.0})
    drift.prioritized({"w/0": [3.0, 4.0]})
    drift.saved(13, {"w/0": [1]}, {"w": 2})
    assert drift.distance(a) == pytest.approx(3.0)
    # a copy from iteration 1 is further off than the store: the store's bound counts
    assert drift.since(a, 1) > 3.0 and drift.predict([], {a: 1})[0] == pytest.approx(3.0)
    assert drift.predict([], {a: 12})[0] == pytest.approx(0.1)


def test_a_stopped_segment_keeps_the_iterations_every_survivor_finished():
    from dask_scar.run import _finished_by_all

    events = [{"epoch": 1, "worker": "a", "iteration": i} for i in (20, 21, 31)] + [
        {"epoch": 1, "worker": "b", "iteration": 30}, {"epoch": 1, "worker": "gone", "iteration": 35},
        {"epoch": 0, "worker": "b", "iteration": 40},          # of the epoch before
        {"epoch": 1, "kind": "written", "iteration": 50}]       # a writer's report
    assert _finished_by_all(events, 1, ["a", "b"], 20) == 30
    assert _finished_by_all(events, 1, ["a"], 20) == 31
    assert _finished_by_all(events, 1, ["a", "c"], 20) == 19       # c said nothing: none kept
    assert _finished_by_all(events, 1, [], 20) == 19


def test_restored_chunks_go_to_the_live_workers_holding_the_fewest_rows():
    from dask_scar.recovery import _spread

    c0, c1, c2, c3 = (ChunkId("w", i, 4 * i, 4 * i + 4) for i in range(4))
    # "a" holds 8 rows: both lost chunks go to "b", the larger first
    assert _spread([c1, c2], {c0: "a", c3: "a", c1: "gone", c2: "gone"}, ["a", "b"]) == {c1: "b", c2: "b"}
    big = ChunkId("v", 0, 0, 12)
    assert _spread([big, c1], {c0: "a"}, ["a", "b"]) == {big: "b", c1: "a"}


def test_plugin_reports_the_lost_scar_keys(own_client):
    victim, survivor = sorted(live_workers(own_client))
    own_client.register_plugin(scar.ScarPlugin())
    lost = own_client.scatter({"scar-chunk-test-x-0-e0-v3": np.ones(4), "not-ours": np.ones(4)}, workers=[victim])
    kept = own_client.scatter({"scar-chunk-test-x-1-e0-v3": np.ones(4)}, workers=[survivor])
    kill_worker(own_client, victim)
    events = wait_for(lambda: [e for _, e in own_client.get_events("scar") if e["action"] == "remove-worker"],
                      what="the plugin's remove-worker event")
    assert events[0]["worker"] == victim and list(events[0]["lost"]) == ["scar-chunk-test-x-0-e0-v3"]
    assert events[0]["expected"] is False and events[0]["stimulus_id"]
    # the nanny starts a new worker process: that is an event too
    wait_for(lambda: any(e["action"] == "add-worker" for _, e in own_client.get_events("scar")),
             what="the add-worker event")
    del lost, kept


def test_a_lost_chunk_is_no_error_in_the_scheduler_log(own_client):
    """When a worker dies holding data with no other copy, the scheduler logs an ERROR:
    "caused the cluster to lose scattered data, which can't be recovered". With the
    plugin, where that data is all parameter chunks, the record is an INFO saying that
    their trainer restores them; other data keeps its ERROR."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("distributed.scheduler")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        a, b = sorted(live_workers(own_client))
        own_client.register_plugin(scar.ScarPlugin())
        chunk = own_client.scatter({"scar-chunk-test-x-0-e0-v3": np.ones(4)}, workers=[a])
        mixed = own_client.scatter({"scar-chunk-test-x-1-e0-v3": np.ones(4), "not-ours": np.ones(4)},
                                   workers=[b])
        for victim in (a, b):
            kill_worker(own_client, victim)
        lost = wait_for(lambda: [(r.levelname, r.getMessage()) for r in records if "scar-chunk" in r.getMessage()]
                        if sum("scar-chunk" in r.getMessage() for r in records) == 2 else None,
                        what="the scheduler's two records of lost data")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    (level_a, text_a), = [(level, text) for level, text in lost if repr(a) in text]
    assert level_a == "INFO" and text_a.startswith(
        f"Removing worker {a!r} lost 1 dask_scar parameter chunk(s) held nowhere else: "
        "['scar-chunk-test-x-0-e0-v3']; their trainer restores them (stimulus_id=")
    (level_b, text_b), = [(level, text) for level, text in lost if repr(b) in text]
    assert level_b == "ERROR" and "lose scattered data, which can't be recovered" in text_b and "not-ours" in text_b
    del chunk, mixed


@pytest.mark.slow
def test_partial_recovery_restores_only_the_lost_chunks_and_beats_full_rollback(tmp_path):
    results, saved = {}, {}
    with dask.config.set({"scar.recovery.replicas": False}):
        with new_cluster(4) as cluster, scar_client(cluster) as client:
            free = train(client, tmp_path, "free")
        # a fresh cluster for each: a nanny does not always bring its killed worker back in time
        for mode, policy in [("partial", scar.FullCheckpoint(every=10)), ("full", scar.FullCheckpoint(every=10)),
                             ("scar", scar.PrioritizedCheckpoint(0.3, every=3))]:
            store = tmp_path / f"{mode}.zarr"
            with new_cluster(4) as cluster, scar_client(cluster) as client:
                victim = sorted(live_workers(client))[1]

                def kill(store=store, mode=mode, client=client, victim=victim):
                    saved[mode] = scar.open_store(store).saved_at    # what a restore can read
                    kill_worker(client, victim)
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    results[mode] = train(client, tmp_path, mode, callback=once_at(35, kill), policy=policy,
                                          recovery="full" if mode == "full" else "partial")
                # the iterations after the recovery trained the restored chunks
                assert not [w for w in said if "after the last iteration" in str(w.message)]

    for mode, result in results.items():
        (event,) = result.events
        assert event.iteration == 36 and event.mode == ("full" if mode == "full" else "partial")
        row = result.history[result.history["event"].str.contains("lost at iteration 36")]
        assert len(row) == 1 and row["iteration"].item() == event.resumed_at + 1
    for mode in ("partial", "scar"):
        event = results[mode].events[0]
        assert len(event.lost_chunks) == 2 and event.moved_chunks == [] and event.resumed_at == 35
        assert results[mode].n_iter == 100 and len(results[mode].history) == 100
        assert results[mode].history["loss"].iloc[-1] == pytest.approx(free.history["loss"].iloc[-1], rel=1e-3)
        # only the lost chunks' saved blocks were read: their newest versions, and the
        # versions before them of the blocks extrapolated -- at most twice their share
        share = rows_of(event.lost_chunks) / 64
        rows = saved[mode]
        lost = np.zeros(len(rows), bool)
        for lab in event.lost_chunks:
            a, b = span(lab)
            lost |= (rows["start"] >= a).to_numpy() & (rows["stop"] <= b).to_numpy()
        newest = ((rows["stop"] - rows["start"])[lost & (rows["iteration"] >= 0)]).sum() * 40
        assert event.extrapolated_blocks > 0
        assert newest < event.bytes_read <= 2 * newest <= 2.1 * share * MODEL_BYTES
        if mode == "partial":       # full rounds at 10, 20, 30: every lost block read twice
            assert event.bytes_read == 2 * newest and event.extrapolated_blocks == lost.sum()
        assert event.seconds < 30 and event.est_perturbation > 0 and event.predicted_extra_iterations > 0
    full = results["full"].events[0]
    assert full.resumed_at == 30 and full.bytes_read == MODEL_BYTES and full.predicted_extra_iterations == 5
    assert results["full"].history["iteration"].tolist()[35:37] == [31, 32]   # counted again from the rollback

    # the iteration cost of the same failure: partial recovery < full rollback
    cost = {mode: iteration_cost(r.history, free.history, at=60) for mode, r in results.items()}
    assert cost["partial"] < cost["full"] and cost["scar"] < cost["full"], cost
    assert cost["full"] >= 5, cost      # the rolled-back iterations alone


def trajectory(frame, n: int) -> list[np.ndarray]:
    """A default SoftmaxRegression's weights after each of iterations 0..n on ``frame``,
    computed in this process."""
    local = scar.SoftmaxRegression()
    block = prepare_local(local, frame, "label")
    cid = ChunkId("weights", 0, 0, local.parameter_specs()["weights"].shape[0])
    state = local.new_state("weights", local.init_rows("weights", cid.start, cid.stop))
    weights = [state["value"].copy()]
    for k in range(1, n + 1):
        c = local.contribution(0, block, {"weights": state["value"]}, np, iteration=k, block_id=0)
        state = local.apply({cid: state}, [c], np)[0][cid]
        weights.append(state["value"].copy())
    return weights


def fit_killed_midway(client, trainer, frame, version: int, max_iter: int = 60, iteration: int = 0):
    """``trainer.fit(frame)`` for ``max_iter`` iterations in a thread, SIGKILLing the second
    worker at a random moment once chunk version ``version`` exists and the loss of
    ``iteration`` was sent; returns the result and the victim."""
    victim = sorted(live_workers(client))[1]
    outcome, started = {}, time.time()
    thread = threading.Thread(target=lambda: outcome.update(
        result=trainer.fit(frame, target="label", max_iter=max_iter, tol=0, progress=False)))
    thread.start()
    wait_for(lambda: client.run_on_scheduler(
        lambda dask_scheduler: any(str(k).startswith("scar-chunk") and int(str(k).rsplit("-v", 1)[1]) >= version
                                   for k in dask_scheduler.tasks)), what="training to start")
    wait_for(lambda: any(t > started and event.get("iteration", 0) >= iteration
                         for t, event in client.get_events("scar-progress")), what=f"iteration {iteration}")
    kill_worker(client, victim)
    thread.join(timeout=120)
    assert not thread.is_alive(), "fit() hung after a worker was killed"
    return outcome["result"], victim


def assert_losses_as_without_the_loss(result, event, frame, at: int):
    """The fit's losses against SoftmaxRegression's in one process, no loss: equal where
    the lost chunks were taken over from surviving copies (nothing was lost at all),
    within 10 iterations at iteration ``at`` where the store or an older copy served."""
    reference = scar.SoftmaxRegression()
    _, losses = fit_local(reference, prepare_local(reference, frame, "label"), max_iter=result.n_iter)
    if event.lost_chunks or event.peer_chunks:
        assert iteration_cost(result.history, pd.DataFrame({"loss": losses}), at=at) <= 10
    else:
        np.testing.assert_allclose(result.history["loss"], losses, rtol=1e-5)


@pytest.mark.slow
def test_kill_during_an_iteration_abandons_it_and_goes_on(tmp_path, digits):
    """A kill at a random moment: the iteration in flight is abandoned and redone; the
    dead worker's chunks come from a copy a contribution had fetched, or the store."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        trainer = scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / "ckpt.zarr", n_chunks=4)
        result, victim = fit_killed_midway(client, trainer, big, version=10)
    (event,) = result.events
    assert event.worker == victim and len(event.lost_chunks + event.moved_chunks + event.peer_chunks) == 2
    assert result.n_iter == 60
    assert_losses_as_without_the_loss(result, event, big, at=50)


@pytest.mark.slow
def test_lbfgs_goes_on_after_a_kill(tmp_path, digits):
    """L-BFGS keeps its memory in every chunk's state. The dead worker's chunks come
    back from live copies (the same memory: nothing lost) or from the store (the
    memories disagree: L-BFGS starts afresh from the current point)."""
    big = pd.concat([digits] * 20, ignore_index=True)
    hyper = dict(l2=1e-3, solver="lbfgs")
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        trainer = scar.Trainer(client, scar.SoftmaxRegression(**hyper), store=tmp_path / "ckpt.zarr", n_chunks=4)
        result, victim = fit_killed_midway(client, trainer, big, version=10)
    (event,) = result.events
    assert event.worker == victim and result.n_iter == 60
    reference = scar.SoftmaxRegression(**hyper)
    _, losses = fit_local(reference, prepare_local(reference, big, "label"), max_iter=60)
    cost = iteration_cost(result.history, pd.DataFrame({"loss": losses}), at=40)
    assert cost is not None and cost <= (15 if event.lost_chunks else 2)


@pytest.mark.slow
def test_kill_while_the_next_iteration_is_already_submitted(digits):
    """No callback and no store, one graph per iteration (scar.segment-iterations 1):
    every graph is submitted before the one before it ends, and every worker's update
    task keeps current replicas of all chunks. A kill then
    loses only the work in flight: the dead worker's chunks come back from the live
    worker's replicas, and the run goes exactly where a failure-free one goes."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with dask.config.set({"scar.segment-iterations": 1}), new_cluster(2) as cluster, scar_client(cluster) as client:
        free = scar.Trainer(client, scar.SoftmaxRegression(), n_chunks=4).fit(big, target="label", max_iter=60,
                                                                             tol=0, progress=False)
        result, victim = fit_killed_midway(client, scar.Trainer(client, scar.SoftmaxRegression(), n_chunks=4),
                                           big, version=15)
    (event,) = result.events
    assert event.worker == victim and event.bytes_read == 0 and event.lost_chunks == []
    assert len(event.peer_chunks + event.moved_chunks) == 2 and event.peer_iterations == 0
    assert event.est_perturbation == 0 and event.resumed_at == event.iteration - 1
    assert result.n_iter == 60 and len(result.history) == 60
    np.testing.assert_allclose(result.history["loss"], free.history["loss"], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [True, False])
def test_kill_during_a_segment_loses_only_the_iteration_in_flight(tmp_path, digits, replicas):
    """Segments (no callback): of three workers one is SIGKILLed in the middle of a
    segment. The survivors stop, the newest iteration both finished becomes the
    chunks' version, taken from their own copies, and the dead worker's chunks come
    back from the survivors' copies of that iteration (exactly: the run goes where a
    failure-free one goes) or, with copies switched off, from the store."""
    big = pd.concat([digits] * 20, ignore_index=True)
    # one segment for the whole fit, killed once iteration 30 is done: never at a boundary
    n = 400
    with dask.config.set({"scar.recovery.replicas": replicas, "scar.segment-iterations": n}), \
            new_cluster(3) as cluster, scar_client(cluster) as client:
        free = scar.Trainer(client, scar.SoftmaxRegression(), n_chunks=6).fit(big, target="label", max_iter=n,
                                                                             tol=0, progress=False)
        trainer = scar.Trainer(client, scar.SoftmaxRegression(), n_chunks=6, store=tmp_path / "ckpt.zarr",
                               policy=scar.FullCheckpoint(every=10))
        result, victim = fit_killed_midway(client, trainer, big, version=0, max_iter=n, iteration=30)
    (event,) = result.events
    assert event.worker == victim and event.resumed_at == event.iteration - 1 >= 30
    assert result.history["iteration"].tolist() == list(range(1, n + 1))
    if replicas:
        assert event.lost_chunks == [] and event.bytes_read == 0 and event.peer_iterations == 0
        assert len(event.peer_chunks) == 2 and event.est_perturbation == 0
        np.testing.assert_allclose(result.history["loss"], free.history["loss"], rtol=1e-6)
    else:
        assert len(event.lost_chunks) == 2 and event.bytes_read > 0 and event.peer_chunks == []
        cost = iteration_cost(result.history, free.history, at=n - 10)
        assert cost is not None and 0 < cost <= 10
        # the estimate is each lost chunk's path since its last save the driver heard
        # of: one of the two rounds before the kill, written inside the segment (the
        # victim's report of the newer one may have gone with it, for either chunk)
        done, weights = event.resumed_at, trajectory(big, event.resumed_at)
        path = [[float(np.linalg.norm(weights[k][slice(*span(label))] - weights[k - 1][slice(*span(label))]))
                 for k in range(1, done + 1)] for label in event.lost_chunks]
        rounds = [s for s in range(0, done + 1, 10) if s > done - 20]
        since = {saves: float(np.sqrt(sum(sum(p[s:]) ** 2 for p, s in zip(path, saves))))
                 for saves in itertools.product(rounds, repeat=len(path))}
        assert any(v == pytest.approx(event.est_perturbation, rel=1e-3) for v in since.values()), \
            (event.est_perturbation, since)


@pytest.mark.slow
def test_a_nesterov_fit_killed_in_a_segment_gets_its_velocity_back_from_the_drift(tmp_path, digits):
    """Segments, Nesterov momentum, copies off: one of three workers is SIGKILLed. Its
    chunks come back from the store extrapolated, with a velocity from their drift;
    the fit then costs one iteration (four with the velocity restarted from zero, as
    before: 3 runs each; under load, where the kill lands later in the segment, three
    once in a run of the suite beside other work)."""
    big = pd.concat([digits] * 20, ignore_index=True)
    n = 300

    def model():
        return scar.SoftmaxRegression(learning_rate=0.2, momentum=0.9)

    with dask.config.set({"scar.recovery.replicas": False}), new_cluster(3) as cluster, \
            scar_client(cluster) as client:
        free = scar.Trainer(client, model(), n_chunks=6).fit(big, target="label", max_iter=n, tol=0, progress=False)
        trainer = scar.Trainer(client, model(), n_chunks=6, store=tmp_path / "ckpt.zarr",
                               policy=scar.FullCheckpoint(every=10))
        result, victim = fit_killed_midway(client, trainer, big, version=0, max_iter=n, iteration=45)
    (event,) = result.events
    assert event.worker == victim and len(event.lost_chunks) == 2 and event.extrapolated_blocks > 0
    assert iteration_cost(result.history, free.history, at=n - 20) <= 3


@pytest.mark.slow
def test_a_worker_with_data_and_no_chunk_lost_in_a_segment_is_named(digits):
    """The one chunk lives on the first worker; the second, which holds a data block
    only, is SIGKILLed in a segment. The survivors stop, and the event names it (the
    code before: "worker  lost at iteration ...")."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with dask.config.set({"scar.segment-iterations": 400}), new_cluster(3) as cluster, \
            scar_client(cluster) as client:
        trainer = scar.Trainer(client, scar.SoftmaxRegression(), n_chunks=1)
        result, victim = fit_killed_midway(client, trainer, big, version=0, max_iter=400, iteration=30)
    (event,) = result.events
    assert event.worker == victim and event.lost_chunks == event.peer_chunks == event.moved_chunks == []
    assert result.history["event"].str.contains(f"worker {victim} lost at iteration").sum() == 1
    assert result.n_iter == 400


def _remember(run: str, cid: ChunkId, version: int) -> None:
    from dask_scar.chunks import Chunk, remember

    remember(run, {cid: Chunk(cid, {"value": np.full(4, version, np.float32)}, version)})


def test_a_lost_chunk_is_offered_by_the_live_worker_with_its_newest_copy_up_to_the_version_asked(client):
    from dask_scar import recovery
    from dask_scar.chunks import ParameterChunks, forget

    a, b = sorted(live_workers(client))
    cid = ChunkId("w", 0, 0, 4)
    client.run(_remember, "run-copies", cid, 5, workers=[a])
    client.run(_remember, "run-copies", cid, 4, workers=[b])
    chunks = ParameterChunks(client, "run-copies", {cid: "tcp://gone:1"}, version=5)
    try:
        assert recovery._copies(client, chunks, [cid], {a, b}, 5) == {cid: (a, 5)}
        assert recovery._copies(client, chunks, [cid], {a, b}, 4) == {cid: (b, 4)}    # 5 is newer than asked
        assert recovery._copies(client, chunks, [cid], {b}, 5) == {cid: (b, 4)}       # a is not alive
    finally:
        client.run(forget, "run-copies")


@pytest.mark.slow
def test_live_copies_restore_lost_chunks_without_the_store(tmp_path):
    """Killed between two iterations, the dead worker's chunks are gone, but every live
    worker's update task keeps current replicas of them (a gradient model's update is
    cheap), and recovery takes those instead of reading the store (scar.recovery.replicas)."""
    with new_cluster(4) as cluster, scar_client(cluster) as client:
        free = train(client, tmp_path, "free")
        victim = sorted(live_workers(client))[1]
        result = train(client, tmp_path, "copies", callback=once_at(35, lambda: kill_worker(client, victim)))
        # the copies are dropped with the run
        assert all(keys == [] for keys in client.run(lambda: list(__import__("dask_scar.chunks").chunks._seen)
                                                     ).values())
    (event,) = result.events
    assert event.lost_chunks == [] and event.bytes_read == 0 and event.moved_chunks == []
    assert len(event.peer_chunks) == 2 and event.peer_iterations == 0
    assert "from live workers' copies (current)" in event.describe()
    assert event.est_perturbation == 0 and event.resumed_at == 35
    np.testing.assert_allclose(result.history["loss"], free.history["loss"], rtol=1e-6)


@pytest.mark.slow
def test_loss_after_the_last_iteration(tmp_path):
    """Killed once the last iteration ran: partial recovery restores the lost chunks and
    returns; full recovery rolls back and runs the rolled-back iterations again."""
    with dask.config.set({"scar.recovery.replicas": False}), new_cluster(2) as cluster, \
            scar_client(cluster) as client:
        results = {}
        for mode in ("partial", "full"):
            client.wait_for_workers(2, timeout=60)
            victim = sorted(live_workers(client))[1]

            kill = once_at(25, lambda victim=victim: kill_worker(client, victim))

            def kill_after_the_last(k, loss, kill=kill, store=tmp_path / f"{mode}.zarr"):
                # the round of iteration 20 is written while 21.. run and committed when its
                # writers' reports reach the driver, between iterations: give them time
                if 21 <= k < 25 and committed_iteration(store) < 20:
                    time.sleep(0.2)
                kill(k, loss)

            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                results[mode] = train(client, tmp_path, mode, max_iter=25, recovery=mode,
                                      callback=kill_after_the_last)
            untrained = [str(w.message) for w in said if "after the last iteration" in str(w.message)]
            if mode == "partial":   # the restored chunks went back to their saves, and nothing trained them since
                assert len(untrained) == 1 and untrained[0].startswith(
                    f"worker {victim} was lost after the last iteration (25): the parameters returned hold the "
                    "chunks it held as restored (4 from the checkpoint store), which no iteration trained since")
                assert "fit(..., resume=True) with a higher max_iter trains them on from the store" in untrained[0]
            else:                   # full recovery ran the rolled-back iterations again
                assert untrained == []
    (partial,) = results["partial"].events
    assert partial.iteration == 26 and partial.resumed_at == 25 and len(partial.lost_chunks) == 4
    assert results["partial"].history["iteration"].tolist() == list(range(1, 26))
    (full,) = results["full"].events
    assert full.resumed_at == 20
    assert results["full"].history["iteration"].tolist() == list(range(1, 26)) + list(range(21, 26))
    assert results["full"].n_iter == 25
    # the parameters returned are those of iteration 25 redone, not the rolled-back ones
    assert loss_of(results["full"].params) < results["full"].history["loss"].iloc[-1]


@pytest.mark.slow
def test_full_recovery_without_a_store_starts_again_from_the_beginning(tmp_path):
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        victim = sorted(live_workers(client))[1]
        result = train(client, tmp_path, "none", max_iter=20, recovery="full", store=None, policy=None,
                       callback=once_at(8, lambda: kill_worker(client, victim)))
    (event,) = result.events
    assert event.resumed_at == 0 and event.bytes_read == 0 and "rolled every chunk back to iteration 0" in event.describe()
    history = result.history
    assert history["iteration"].tolist() == list(range(1, 9)) + list(range(1, 21))
    # the same maths again from the same initial values
    np.testing.assert_allclose(history["loss"].iloc[8:16], history["loss"].iloc[:8], rtol=1e-6)


def test_messages_to_workers_leave_out_one_that_cannot_be_reached(own_client):
    """A worker that died but is still listed (two killed at once, no nanny to tell the
    scheduler at once) held Client.run for distributed.comm.timeouts.connect, 30 s, in
    the middle of a recovery: run_on asks again, of the workers still alive."""
    alive = sorted(live_workers(own_client))
    gone = "tcp://127.0.0.1:1"      # nothing listens there
    answers = run_on(own_client, os.getpid, workers=[*alive, gone])
    assert sorted(answers) == alive and all(isinstance(pid, int) for pid in answers.values())


def test_a_rollback_says_how_many_blocks_are_older_than_its_round():
    event = scar.RecoveryEvent(iteration=263, worker="tcp://w", lost_chunks=["weights[0:8]"], bytes_read=1640,
                               seconds=0.05, est_perturbation=0.0, predicted_extra_iterations=2, mode="full",
                               resumed_at=260, older_blocks=30)
    assert event.describe().startswith("worker tcp://w lost at iteration 263: rolled every chunk back to iteration "
                                       "260 (1,640 bytes read), 30 block(s) as saved by rounds before that "
                                       "iteration's in 0.050 s")


def test_a_rollback_takes_each_block_as_of_the_committed_round():
    versions = np.array([[[20, 0, 2], [30, 0, 3]],       # a later round wrote it: the committed version
                         [[20, 0, 2], [10, 0, 1]],       # nothing later
                         [[40, 0, 4], [30, 0, 3]],       # two later rounds: round 2's is gone, the older
                         [[-1, -1, -1], [30, 0, 3]]])    # first saved after round 2: never, as of round 2
    assert as_of(versions, 2).tolist() == [[[20, 0, 2], [-1, -1, -1]], [[20, 0, 2], [10, 0, 1]],
                                           [[-1, -1, -1], [30, 0, 3]], [[-1, -1, -1], [-1, -1, -1]]]


class DieWhenUpdating(WorkerPlugin):
    """A worker plugin that SIGKILLs the worker at ``victim`` as it starts its update
    task of ``iteration`` in the fit's first epoch: the task that would have written
    its blocks of the round chosen after the iteration before."""

    name = "die-when-updating"

    def __init__(self, victim: str, iteration: int):
        self.victim, self.iteration = victim, iteration

    def setup(self, worker):
        self.address = worker.address

    def transition(self, key, start, finish, **kwargs):
        if (finish == "executing" and self.address == self.victim and str(key).startswith("scar-update-")
                and f"-e0-{self.iteration}-0-" in str(key)):
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_full_recovery_rolls_every_block_back_to_the_committed_round(tmp_path):
    """Killed as it starts iteration 31, whose tasks write round 30: the surviving
    workers write their blocks of it, the dead one never reports, so round 30 never
    commits and the fit rolls back to 20. Every block must then be as of iteration 20
    (survivors' round-30 blocks mixed in made the redone iterations better than the
    first time)."""
    with new_cluster(3) as cluster, scar_client(cluster) as client:
        free = train(client, tmp_path, "free", max_iter=40, store=None, policy=None)
        victim = sorted(live_workers(client))[1]
        client.register_plugin(DieWhenUpdating(victim, 31))
        result = train(client, tmp_path, "full", max_iter=40, recovery="full",
                       callback=lambda k, loss: None)   # (one graph per iteration: its update tasks write rounds)
    (event,) = result.events
    redone = result.history.iloc[30:]
    assert event.worker == victim and event.resumed_at == 20 and event.iteration == 31
    assert redone["iteration"].iloc[0] == 21
    expected = free.history.set_index("iteration")["loss"].loc[redone["iteration"]]
    np.testing.assert_allclose(redone["loss"], expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_full_recovery_inside_a_segment_rolls_back_to_a_state_the_store_holds_whole(tmp_path, seconds):
    """Segments commit their rounds when they end, while their workers write a round
    every 5 iterations, two versions a block: by a kill inside a segment, the store
    often held no block of the last committed round any more. The rollback took the
    newer versions (a state from tens of iterations later, under the earlier number),
    or read one a survivor was rewriting as corrupt. Now the writes end first, and the
    fit rolls back to the newest round the store holds whole: its first loss is the
    uninterrupted fit's at that iteration."""
    frame = dd.from_pandas(synthetic_classification(20_000, 40, 10, seed=1), npartitions=6)

    def fit(client, name, kill_after=None):
        if kill_after is not None:
            victim = sorted(live_workers(client))[1]

            def kill():
                wait_for(lambda: committed(tmp_path / f"{name}.zarr") > 0, timeout=60, what="a first round")
                time.sleep(kill_after)
                kill_worker(client, victim)

            threading.Thread(target=kill, daemon=True).start()
        return scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / f"{name}.zarr",
                            policy=scar.FullCheckpoint(every=5), recovery="full").fit(
            frame, target="label", max_iter=250, tol=0, progress=False)

    with new_cluster(3) as cluster, scar_client(cluster) as client:
        free = fit(client, "free").history.set_index("iteration")["loss"]
        result = fit(client, "killed", kill_after=seconds)
    (event,) = result.events
    assert event.mode == "full" and event.resumed_at < event.iteration
    after = result.history[result.history["event"].str.contains("rolled every chunk back")].iloc[0]
    assert after["iteration"] == event.resumed_at + 1
    np.testing.assert_allclose(after["loss"], free.loc[after["iteration"]], rtol=1e-6)
    assert result.n_iter == 250
    np.testing.assert_allclose(result.history["loss"].iloc[-1], free.loc[250], rtol=1e-5)


@pytest.mark.slow
def test_graceful_retirement_moves_chunks_without_restoring(tmp_path, digits, caplog):
    with new_cluster(3) as cluster, scar_client(cluster) as client, caplog.at_level(logging.INFO, "dask_scar"):
        victim = sorted(live_workers(client))[0]
        hyper = dict(l2=1e-4, learning_rate=0.5, momentum=0.9)
        result = scar.Trainer(client, scar.SoftmaxRegression(**hyper), store=tmp_path / "ckpt.zarr", n_chunks=6).fit(
            digits, target="label", max_iter=60, tol=0, progress=False,
            callback=once_at(20, lambda: client.retire_workers([victim])))
    # scaling down is no loss: said at INFO
    said = [r for r in caplog.records if f"worker {victim} retired at iteration 21" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    (event,) = result.events
    assert event.lost_chunks == [] and len(event.moved_chunks) == 2 and event.bytes_read == 0
    assert event.worker == victim and event.est_perturbation == 0 and event.retired
    assert f"worker {victim} retired at iteration 21: took over 2 surviving chunk(s) in" in \
        result.history["event"].iloc[20]
    # nothing was lost: the very same losses as the same maths in one process
    reference = scar.SoftmaxRegression(**hyper)
    _, losses = fit_local(reference, prepare_local(reference, digits, "label"), max_iter=60)
    np.testing.assert_allclose(result.history["loss"], losses, rtol=1e-5)


def _fit_until_a_segment_runs_on(client, worker: str, frame, max_iter: int):
    """A softmax fit started in a thread, returned (thread, outcome) once ``worker``
    runs one of its segments."""
    outcome = {}
    fit = threading.Thread(target=lambda: outcome.update(result=scar.Trainer(client, scar.SoftmaxRegression()).fit(
        frame, target="label", max_iter=max_iter, tol=0, progress=False)))
    fit.start()
    wait_for(lambda: any(str(k).startswith("scar-segment") for k in client.processing().get(worker, ())),
             timeout=60, what="a segment on the worker")
    return fit, outcome


@pytest.mark.slow
def test_a_worker_retired_during_a_segment_leaves_at_once(tmp_path):
    """A worker told to close (retired, scaled down, its job ending) while it runs a
    segment: the segment stops for it at its next exchange, so the worker does not
    wait out Dask's 30 s for its running task (it did, 3 of 3 runs; a pod's grace
    period is often 30 s too)."""
    frame = dd.from_pandas(synthetic_classification(30000, 30, 10), npartitions=6)
    with cli_cluster(tmp_path, 3) as (cluster, client):
        victim = sorted(live_workers(client))[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        (process,) = [p for p in cluster.workers if p.pid == pid]
        fit, outcome = _fit_until_a_segment_runs_on(client, victim, frame, max_iter=1500)
        start = time.monotonic()
        client.retire_workers([victim])
        process.wait(timeout=60)
        left = time.monotonic() - start
        fit.join(timeout=120)
    (event,) = outcome["result"].events
    assert event.retired and event.worker == victim and outcome["result"].n_iter == 1500
    assert left < 15, f"the retired worker took {left:.1f} s to exit"     # Dask's executor wait is 30 s


@pytest.mark.slow
def test_chunks_never_checkpointed_start_again_from_their_initial_value(tmp_path):
    # (no live copies: restored from the store alone)
    with dask.config.set({"scar.recovery.replicas": False}), new_cluster(2) as cluster, \
            scar_client(cluster) as client:
        victim = sorted(live_workers(client))[0]
        result = train(client, tmp_path, "early", max_iter=40, callback=once_at(4, lambda: kill_worker(client, victim)))
    (event,) = result.events
    assert event.bytes_read == 0 and len(event.lost_chunks) == 4
    assert event.reinitialized_blocks == rows_of(event.lost_chunks) == 32     # one row per block here
    assert "never-saved block(s) re-initialised" in event.describe()
    assert result.n_iter == 40 and result.history["loss"].iloc[-1] < result.history["loss"].iloc[4]


@pytest.mark.slow
def test_two_workers_lost_close_together(tmp_path):
    with dask.config.set({"scar.recovery.replicas": False}), new_cluster(4) as cluster, \
            scar_client(cluster) as client:
        first, second = sorted(live_workers(client))[1:3]
        free = train(client, tmp_path, "free")

        def kill_two():
            kill_worker(client, first)
            # the second dies while the driver learns of, or recovers from, the first
            threading.Timer(0.02, kill_worker, args=(client, second)).start()
        result = train(client, tmp_path, "twice", callback=once_at(35, kill_two))
    workers = ", ".join(e.worker for e in result.events)
    assert first in workers and second in workers
    restored = [c for e in result.events for c in e.lost_chunks]
    assert rows_of(set(restored)) == 32       # both workers' chunks (one may die twice: once restored onto the second)
    assert result.n_iter == 100
    # half the model, 5 iterations stale: it costs fewer than 10 iterations
    assert iteration_cost(result.history, free.history, at=90) <= 10


class DieWhenRestoring(WorkerPlugin):
    """A worker plugin that SIGKILLs its own process as it starts the first restore task
    of epoch 1 (``scar-init-<run>-e1-0``): a real failure at a precise moment inside a
    recovery."""

    name = "die-when-restoring"

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("scar-init-") and str(key).endswith("-e1-0"):
            os.kill(os.getpid(), signal.SIGKILL)


class DieWhenStarting(WorkerPlugin):
    """A worker plugin that SIGKILLs its own process as it starts creating the fit's
    first chunks (``scar-init-<run>-e0-0``), once: the file ``marker`` says it did."""

    name = "die-when-starting"

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if (finish == "executing" and str(key).startswith("scar-init-") and str(key).endswith("-e0-0")
                and not os.path.exists(self.marker)):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_the_only_worker_lost_while_the_chunks_are_made(tmp_path, digits):
    """The only worker dies as the fit creates its chunks, and another joins a second
    later: the fit waits for it and trains (the code before: ZeroDivisionError)."""
    died = tmp_path / "died"
    with cli_cluster(tmp_path, 1) as (cluster, client):
        client.register_plugin(DieWhenStarting(str(died)))

        def replace():
            wait_for(died.exists, timeout=60, what="the worker's death")
            time.sleep(1)
            cluster.add_workers(1)

        replacer = threading.Thread(target=replace)
        replacer.start()
        try:
            result = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=5, tol=0,
                                                                      progress=False)
        finally:
            replacer.join()
    assert died.exists() and result.n_iter == 5 and not result.events
    assert result.history["iteration"].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_worker_lost_during_recovery(tmp_path):
    with dask.config.set({"scar.recovery.replicas": False}), new_cluster(4) as cluster, \
            scar_client(cluster) as client:
        free = train(client, tmp_path, "free")
        workers = sorted(live_workers(client))
        client.register_plugin(DieWhenRestoring())
        result = train(client, tmp_path, "killed", callback=once_at(35, lambda: kill_worker(client, workers[1])))
    (event,) = result.events                     # one recovery, started again when its restorer died
    lost = event.worker.split(", ")
    assert len(lost) == 2 and workers[1] in lost
    assert len(event.lost_chunks) == 4           # both workers' chunks, restored by the two left
    assert result.n_iter == 100 and event.resumed_at == 35
    assert iteration_cost(result.history, free.history, at=90) <= 10


@pytest.mark.slow
def test_new_worker_gets_chunks_at_the_next_rebalance(tmp_path, digits):
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        before = set(live_workers(client))
        holders = {}

        def grow():
            cluster.scale(3)
            client.wait_for_workers(3, timeout=60)

        def look():
            holders["chunks"] = client.run_on_scheduler(lambda dask_scheduler: sorted(
                {ws.address for k, ts in dask_scheduler.tasks.items() if str(k).startswith("scar-chunk")
                 for ws in ts.who_has or ()}))
        steps = {10: grow, 20: look}
        hyper = dict(l2=1e-4, learning_rate=0.5, momentum=0.9)
        result = scar.Trainer(client, scar.SoftmaxRegression(**hyper), n_chunks=6).fit(
            digits, target="label", max_iter=30, tol=0, progress=False,
            callback=lambda k, loss: steps[k]() if k in steps else None)
        (new,) = set(live_workers(client)) - before
    assert new in holders["chunks"]
    assert result.history["event"].iloc[10] == (f"rebalanced 2 chunk(s) onto {new}; "
                                                f"moved 599 data rows onto {new}")
    reference = scar.SoftmaxRegression(**hyper)
    _, losses = fit_local(reference, prepare_local(reference, digits, "label"), max_iter=30)
    np.testing.assert_allclose(result.history["loss"], losses, rtol=1e-5)   # moving loses nothing


async def _retire_then_call_it_off(dask_worker):
    import asyncio

    from distributed.core import Status

    dask_worker.status = Status.closing_gracefully      # as Client.retire_workers begins
    await asyncio.sleep(0.5)                            # (on the worker's event loop, not blocking it)
    dask_worker.status = Status.running                 # as Dask does when the data has nowhere to go


@pytest.mark.slow
def test_a_retirement_called_off_leaves_the_segment_running(digits):
    """Dask may call a retirement off (no other worker can take the data): a worker
    only *closing gracefully* goes on with its segment, or its peers would wait for
    its messages until scar.iteration-timeout."""
    frame = pd.concat([digits] * 20, ignore_index=True)
    with dask.config.set({"scar.iteration-timeout": 20}), new_cluster(2) as cluster, \
            scar_client(cluster) as client:
        victim = sorted(live_workers(client))[0]
        fit, outcome = _fit_until_a_segment_runs_on(client, victim, frame, max_iter=1500)
        client.run(_retire_then_call_it_off, workers=[victim])
        fit.join(timeout=120)
    result = outcome["result"]      # (the code before: none; the fit raised "no word from worker(s)" after 20 s)
    assert result.n_iter == 1500 and result.events == []


def _blocks_held(dask_worker):
    """Rows of each data block on this worker, and whether its arrays are views of a
    larger array (which then stays in memory too; an array received from another
    worker is a view of its message, a few hundred bytes larger)."""
    return sorted((len(block["X"]), any(getattr(v.base, "nbytes", 0) - v.nbytes > 4096 for v in block.values()))
                  for key, block in dask_worker.data.items() if str(key).startswith("scar-block"))


def _block_types(dask_worker):
    """The array types of this worker's data blocks."""
    return sorted({type(v).__module__.split(".")[0] for key, block in dask_worker.data.items()
                   if str(key).startswith("scar-block") for v in block.values()})


def _settled(client, rows=5391, **where):
    """What :func:`_blocks_held` says once the workers hold ``rows`` rows in all: a cut
    end stays where it was cut (and a copy where it went) until Dask lets it go."""
    held = {}

    def settled():
        held.clear()
        held.update(client.run(_blocks_held, **where))
        return sum(n for blocks in held.values() for n, _ in blocks) == rows

    wait_for(settled, what=f"the workers to hold {rows} rows in all")
    return held


def _fit_with_steps(client, frame, steps, max_iter, pandas_frame=None, backend="numpy", rtol=1e-5):
    hyper = dict(l2=1e-4, learning_rate=0.5)
    result = scar.Trainer(client, scar.SoftmaxRegression(**hyper), n_chunks=6, backend=backend).fit(
        frame, target="label", max_iter=max_iter, tol=0, progress=False,
        callback=lambda k, loss: steps[k]() if k in steps else None)
    reference = scar.SoftmaxRegression(**hyper)
    local = prepare_local(reference, frame if pandas_frame is None else pandas_frame, "label")
    _, losses = fit_local(reference, local, max_iter=max_iter)
    np.testing.assert_allclose(result.history["loss"], losses, rtol=rtol)     # the maths is unchanged
    return result


@pytest.mark.slow
def test_a_replacement_worker_gets_a_data_block_back(digits):
    """A killed worker's block is rebuilt on a survivor, and the two survivors share its
    rows; the worker its nanny starts again gets a third of them back, as one block, so
    that three workers compute again, not two."""
    frame = pd.concat([digits] * 3, ignore_index=True)
    with new_cluster(3) as cluster, scar_client(cluster) as client:
        before = set(live_workers(client))
        victim = sorted(before)[0]
        seen = {}

        def blocks_by_worker(dask_scheduler):
            return sorted(len([k for k in (ts.key for ts in ws.has_what) if str(k).startswith("scar-block")])
                          for ws in dask_scheduler.workers.values())

        steps = {10: lambda: kill_worker(client, victim),
                 20: lambda: client.wait_for_workers(3, timeout=60),
                 40: lambda: seen.update(blocks=client.run_on_scheduler(blocks_by_worker),
                                         workers=set(live_workers(client)))}
        result = _fit_with_steps(client, frame, steps, max_iter=50)     # the losses: restored from live copies
    assert seen["blocks"] == [1, 1, 1]
    (new,) = seen["workers"] - before
    moved = list(result.history["event"][result.history["event"].str.contains("data rows")].str.split("; ").str[-1])
    assert moved[-1] == f"moved 1,797 data rows onto {new}"
    # (the survivors share the rebuilt block's rows, unless the new worker had already joined)
    assert moved[:-1] in ([], *([f"moved 898 data rows onto {w}"] for w in before - {victim}))


@pytest.mark.slow
def test_a_worker_that_joins_gets_an_even_share_of_the_rows(digits):
    """Two workers hold a block each; a third joins: a sixth of the rows comes off the
    end of each block, and the new worker holds them as one block. Then a fourth."""
    frame = pd.concat([digits] * 3, ignore_index=True)     # 5,391 rows: blocks of 2,696 and 2,695
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        seen, joined = {}, []

        def grow(n):
            before = set(live_workers(client))
            cluster.scale(n)
            client.wait_for_workers(n, timeout=60)
            joined.extend(set(live_workers(client)) - before)

        steps = {10: lambda: grow(3), 20: lambda: seen.update(three=_settled(client)),
                 30: lambda: grow(4), 40: lambda: seen.update(four=_settled(client))}
        result = _fit_with_steps(client, frame, steps, max_iter=50)
    # (the code before: blocks of 0, 2695 and 2696 rows)
    assert sorted(seen["three"].values()) == [[(1797, False)]] * 3
    assert sorted(seen["four"].values()) == [[(1347, False)], [(1348, False)], [(1348, False)], [(1348, False)]]
    assert result.history["event"].iloc[10].endswith(f"moved 1,797 data rows onto {joined[0]}")
    assert result.history["event"].iloc[30].endswith(f"moved 1,347 data rows onto {joined[1]}")


class _SlowStart(WorkerPlugin):
    """A worker plugin whose setup blocks the worker's event loop for 3 s: a worker
    that starts with it stays in status ``init`` on the scheduler (known, running no
    task) meanwhile."""

    name = "scar-test-slow-start"

    def setup(self, worker):
        time.sleep(3)


@pytest.mark.slow
def test_a_worker_that_joins_still_starting_gets_rows_once_it_runs(digits):
    """The scheduler says a worker joined while it is still starting: its rows
    move once it runs (the code before looked once, found it not running, and left
    every row on the first worker for the rest of the fit)."""
    frame = pd.concat([digits] * 3, ignore_index=True)
    with new_cluster(1) as cluster, scar_client(cluster) as client:
        client.register_plugin(_SlowStart())
        seen = {}
        steps = {3: lambda: cluster.scale(2), **{k: lambda: time.sleep(0.25) for k in range(4, 40)},
                 45: lambda: seen.update(rows=_settled(client))}
        result = _fit_with_steps(client, frame, steps, max_iter=50)
    assert sorted(seen["rows"].values()) == [[(2695, False)], [(2696, False)]]
    assert result.history["event"].str.contains("moved 2,696 data rows onto").sum() == 1


def _read_slowly(frame):
    Event("scar-test-reading").set()
    time.sleep(5)
    return frame


@pytest.mark.slow
def test_a_worker_that_joins_while_the_data_is_read_gets_rows(digits):
    """The data is one partition that takes 5 s to make; a worker joins meanwhile (Dask
    may then run the partition's next tasks on either worker)."""
    frame = pd.concat([digits] * 3, ignore_index=True)
    slow = dd.from_delayed([dask.delayed(_read_slowly)(frame)], meta=frame.head(0))
    with new_cluster(1) as cluster, scar_client(cluster) as client:
        def grow():
            Event("scar-test-reading", client=client).wait(timeout=60)
            cluster.scale(2)

        grower = threading.Thread(target=grow)
        grower.start()
        seen = {}
        result = _fit_with_steps(client, slow, {5: lambda: seen.update(rows=_settled(client))}, max_iter=10,
                                 pandas_frame=frame)
        grower.join()
    assert sorted(seen["rows"].values()) == [[(2695, False)], [(2696, False)]]    # (the code before: [], 5,391)
    (taker,) = [w for w, blocks in seen["rows"].items() if blocks == [(2696, False)]]
    assert result.history["event"].iloc[0] == f"moved 2,696 data rows onto {taker}"


@pytest.mark.slow
def test_rows_rebuilt_after_their_taker_died_do_not_keep_the_whole_block(tmp_path, digits):
    """A worker takes the end of the only block and is SIGKILLed: Dask rebuilds its rows
    on the donor from the lineage (the whole block, cut again), and the donor keeps a
    copy of them, not a view that holds the whole rebuilt block in memory; a worker
    that joins later takes them back. (Workers without a nanny: a nanny's replacement
    can join before the donor is looked at.)"""
    frame = pd.concat([digits] * 3, ignore_index=True)
    with cli_cluster(tmp_path, 1) as (cluster, client):
        (first,) = live_workers(client)
        seen = {}

        def grow():
            cluster.add_workers(1)
            client.wait_for_workers(2, timeout=60)

        steps = {3: grow, 10: lambda: kill_worker(client, (set(live_workers(client)) - {first}).pop()),
                 15: lambda: seen.update(rebuilt=_settled(client, workers=[first])),
                 20: grow, 30: lambda: seen.update(rows=_settled(client))}
        result = _fit_with_steps(client, frame, steps, max_iter=40)
    assert seen["rebuilt"][first] == [(2695, False), (2696, False)]    # (97a1ea5: (2696, True), a view)
    assert sorted(seen["rows"].values()) == [[(2695, False)], [(2696, False)]]
    assert len(result.events) == 1


@pytest.mark.slow
def test_a_loss_with_no_replacement_spreads_the_rows_over_the_survivors(tmp_path, digits):
    """Three workers with no nanny; one is SIGKILLed and stays dead. Dask rebuilds its
    block on one survivor, which would then compute two thirds of the rows, the other
    one third: the end of a block moves, and each survivor computes half."""
    frame = pd.concat([digits] * 3, ignore_index=True)     # 5,391 rows: blocks of 1,797
    with cli_cluster(tmp_path, 3) as (_, client):
        victim = sorted(live_workers(client))[0]
        seen = {}
        steps = {10: lambda: kill_worker(client, victim), 20: lambda: seen.update(rows=_settled(client))}
        result = _fit_with_steps(client, frame, steps, max_iter=30)    # the chunks: from live copies
    # (the code before: one survivor held 1,797 × 2 rows, the other 1,797)
    rows = {w: sum(n for n, _ in blocks) for w, blocks in seen["rows"].items()}
    assert sorted(rows.values()) == [2695, 2696]
    assert not any(view for blocks in seen["rows"].values() for _, view in blocks)
    (taker,) = [w for w, n in rows.items() if n == 2695]
    moved = result.history[result.history["event"].str.contains("data rows")]
    assert list(moved["event"].str.split("; ").str[-1]) == [f"moved 898 data rows onto {taker}"]


@pytest.mark.slow
def test_a_retired_workers_rows_are_spread_over_the_rest(digits):
    """A worker of three is retired: Dask moves its block onto one survivor, and the
    rows are spread over both again."""
    frame = pd.concat([digits] * 3, ignore_index=True)
    with new_cluster(3) as cluster, scar_client(cluster) as client:
        victim = sorted(live_workers(client))[0]
        seen = {}
        steps = {10: lambda: client.retire_workers([victim]), 20: lambda: seen.update(rows=_settled(client))}
        result = _fit_with_steps(client, frame, steps, max_iter=30)
    # the moved block is cut: its first rows stay, a copy; the end goes (the code before: 1,797 x 2 and 1,797)
    assert sorted(seen["rows"].values()) == [[(898, False), (1797, False)], [(899, False), (1797, False)]]
    assert result.events[0].retired


@pytest.mark.slow
def test_work_beyond_the_workers_memory_ends_the_fit_after_dasks_tries():
    """Workers of 700 MiB. Softmax with 40,000 classes: its tiles shrink to fit
    (4096 rows' temporaries would take 1.3 GB) and it trains. LDA on 50 million tokens
    in the first rows (50 counts of a million, the most it takes): every try kills the
    worker that draws them; after Dask's allowed-failures (3) the fit says so rather
    than recover without end."""
    from distributed import LocalCluster

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.standard_normal(4000), "b": rng.standard_normal(4000)})
    frame["price"] = rng.integers(0, 40_000, len(frame))
    corpus, _ = synthetic_corpus(100, 50, n_topics=3, doc_length=30)
    corpus.loc[:49, "count"] = 1_000_000
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="700MiB", dashboard_address=":0",
                      silence_logs=50) as cluster, Client(cluster) as client:
        with pytest.warns(UserWarning, match="without a row"):
            result = scar.Trainer(client, scar.SoftmaxRegression()).fit(frame, target="price", max_iter=2,
                                                                        progress=False)
        assert result.n_iter == 2 and not result.events
        with pytest.raises(scar.ScarError, match=re.escape(
                "workers were lost 4 times in a row at iteration 1, with no iteration done in between (Dask gives a "
                "task distributed.scheduler.allowed-failures=3 tries): the fit's work may be what kills them")):
            scar.Trainer(client, scar.LDA(n_topics=3)).fit(corpus, max_iter=2, progress=False)


@pytest.mark.slow
def test_a_restart_during_training_is_said_and_not_recovered(digits, caplog):
    """``client.restart()`` while segments run: the fit ends with the restart's error,
    and reports no recovery of the workers the restart took (it reported one with the
    chunks re-initialised, then one of no worker and no chunk)."""
    frame = pd.concat([digits] * 20, ignore_index=True)
    with new_cluster(2) as cluster, Client(cluster) as client:
        thread, outcome = _fit_outcome(client, frame, max_iter=100_000, tol=0)
        wait_for(lambda: client.run_on_scheduler(lambda dask_scheduler: any(
            str(ts.key).startswith("scar-segment") and ts.state == "processing"
            for ts in dask_scheduler.tasks.values())), what="a segment to run")
        client.restart()
        thread.join(timeout=60)
    assert not thread.is_alive() and type(outcome["error"]) is scar.ScarError, outcome
    assert str(outcome["error"]) == ("Dask cancelled the fit's tasks (2 of the fit's 2 data blocks cancelled): "
                                     "was the cluster restarted (client.restart())? Start the fit again")
    assert not [r for r in caplog.records if "lost at iteration" in r.getMessage()]


@pytest.mark.slow
def test_cli_cluster_kill_one_then_every_worker(tmp_path):
    """``dask scheduler --preload dask_scar.preload`` + ``dask worker`` (no nanny: the dead stay dead)."""
    # the store alone, restored as saved: what iteration 43 starts from is known exactly
    with dask.config.set({"scar.recovery.replicas": False, "scar.recovery.extrapolate": False}), \
            cli_cluster(tmp_path, 4) as (cluster, client):
        free = train(client, tmp_path, "free")
        victim = sorted(live_workers(client))[1]
        saved = {}

        def kill_all():
            # round 40, written during 41 by the workers' writer threads: wait until every block is in
            wait_for(lambda: (scar.open_store(tmp_path / "killed.zarr").saved_at["iteration"] == 40).all(),
                     what="round 40 in the store")
            saved.update(scar.open_store(tmp_path / "killed.zarr").load())
            for worker in cluster.workers:
                worker.kill()
            threading.Timer(1.0, cluster.add_workers, args=(2,)).start()   # replacements arrive later
        steps = {20: lambda: kill_worker(client, victim), 42: kill_all}
        result = train(client, tmp_path, "killed", callback=lambda k, loss: steps.pop(k)() if k in steps else None)
        assert len(live_workers(client)) == 2
    one, every = result.events
    assert one.worker == victim and len(one.lost_chunks) == 2 and 0 < one.bytes_read <= 1.05 * MODEL_BYTES / 4
    assert one.est_perturbation > 0     # round 20 was chosen, not yet written: round 10 was restored
    assert len(every.lost_chunks) == 8 and every.bytes_read == MODEL_BYTES   # everything, from the store
    assert every.resumed_at == 42 and every.est_perturbation > 0
    # iteration 43 started from exactly what the store held (data blocks rebuilt from the frame's lineage)
    assert result.history["loss"].iloc[42] == pytest.approx(loss_of(saved), rel=1e-5)
    assert result.n_iter == 100
    # two failures (a quarter of the model 10 iterations stale, then all of it 2 iterations
    # stale) cost fewer than 10 iterations
    assert iteration_cost(result.history, free.history, at=90) <= 10


def test_a_resumed_fit_that_loses_a_worker_recovers_and_writes_in_a_later_epoch(own_client, tmp_path):
    """Epochs only grow in a store: the resume writes in epoch 1, and after its recovery in 2
    (the recovery set the chunks' epoch, 1, before)."""
    train(own_client, tmp_path, "resumed", max_iter=10)
    victim = sorted(live_workers(own_client))[1]
    result = train(own_client, tmp_path, "resumed", max_iter=30, resume=True,
                   callback=once_at(15, lambda: kill_worker(own_client, victim)))
    (event,) = result.events
    assert event.iteration == 16 and result.n_iter == 30
    assert result.history["iteration"].tolist() == list(range(11, 31))
    store = scar.open_store(tmp_path / "resumed.zarr")
    assert (store.manifest["iteration"], store.manifest["epoch"]) == (30, 2)
    assert store.saved_at[["iteration", "epoch"]].drop_duplicates().values.tolist() == [[30, 2]]


def test_scheduler_loss_ends_fit_saying_how_to_resume(tmp_path):
    store = tmp_path / "ckpt.zarr"
    killed = []

    def kill_once_round_20_is_committed(k, loss):
        # the round of iteration 20 is written while 21.. run, and committed when its
        # writers' reports reach the driver: however fast the iterations, kill after that
        if 25 <= k <= 29 and not killed and (committed_iteration(store) == 20 or k == 29):
            killed.append(k)
            cluster.scheduler.kill()

    with cli_cluster(tmp_path, 2) as (cluster, client):
        with pytest.raises(scar.SchedulerLostError, match=r"lost the connection to the scheduler .*"
                                                          r"fit\(\.\.\., resume=True\) continues from it"):
            train(client, tmp_path, "ckpt", callback=kill_once_round_20_is_committed)
    committed = scar.open_store(store).manifest["iteration"]
    assert committed == 20
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        result = train(client, tmp_path, "ckpt", max_iter=30, resume=True)
    assert result.history["iteration"].tolist() == list(range(21, 31))


def test_closing_the_client_during_a_fit_says_how_to_resume(tmp_path, digits):
    """The client a fit runs on is closed (by its user, in another cell or thread):
    the fit ends with SchedulerLostError, not with the closed client's error from the
    fit's clean-up (``ClosedClientError`` while it unsubscribed from a topic, which also
    left the store claimed by the run), and a fit on another client resumes (where
    ``distributed.wait`` ran on the default client, the closed one: "IOLoop is closed")."""
    store = tmp_path / "ckpt.zarr"
    frame = pd.concat([digits] * 5, ignore_index=True)
    with new_cluster(2) as cluster, scar_client(cluster) as client, \
            Client(cluster.scheduler_address) as other:
        outcome = {}

        def close_at_10(k, loss):
            if k == 10:
                threading.Thread(target=other.close).start()

        with pytest.raises(scar.SchedulerLostError, match=r"client is closed .* fit\(\.\.\., resume=True\)"):
            scar.Trainer(other, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=5)).fit(
                frame, target="label", max_iter=1000, tol=0, progress=False, callback=close_at_10)
        assert scar.open_store(store).writer is None
        outcome["result"] = scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(
            frame, target="label", max_iter=30, tol=0, progress=False, resume=True)
    assert outcome["result"].n_iter == 30


def fit_hung_midway(client, frame, pids: list[int], max_iter: int = 500, kill: list[int] = (), timeout: float = 60):
    """``fit(frame)`` in a thread, SIGSTOPping the processes ``pids`` (and SIGKILLing
    ``kill``) once iteration 50 was sent, with scar.recovery.hung-worker at 3 s and
    scar.iteration-timeout at ``timeout``; returns the result (the processes are
    SIGKILLed if the fit did not end in 120 s)."""
    outcome, started = {}, time.time()
    trainer = scar.Trainer(client, scar.SoftmaxRegression())
    with dask.config.set({"scar.recovery.hung-worker": "3s", "scar.iteration-timeout": timeout}):
        thread = threading.Thread(target=lambda: outcome.update(
            result=trainer.fit(frame, target="label", max_iter=max_iter, tol=0, progress=False)))
        thread.start()
        wait_for(lambda: any(t > started and event.get("iteration", 0) >= 50
                             for t, event in client.get_events("scar-progress")), what="iteration 50")
        for pid in kill:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        thread.join(timeout=120)
    if thread.is_alive() or "result" not in outcome:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("the fit did not get over the hung worker(s)")
    return outcome["result"]


@pytest.mark.slow
def test_a_hung_worker_is_restarted_and_the_fit_goes_on(digits, caplog):
    """A worker SIGSTOPped during a segment is not dead: Dask removes it only after
    distributed.scheduler.worker-ttl (5 minutes, checked every 5 minutes), and until then
    the fit waits for it (the code before failed at scar.iteration-timeout here). After
    scar.recovery.hung-worker without a heartbeat, its nanny kills it and starts a new
    process; the fit recovers as from a kill, and ends at the loss it would have reached."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with new_cluster(2) as cluster, Client(cluster) as client, caplog.at_level(logging.WARNING, logger="dask_scar"):
        victim = sorted(live_workers(client))[1]
        pid = client.run(os.getpid, workers=[victim])[victim]
        result = fit_hung_midway(client, big, [pid])
        wait_for(lambda: not alive(pid), timeout=30, what="the nanny to kill the hung process")
        wait_for(lambda: len(live_workers(client)) == 2, timeout=60, what="the nanny's new worker")
    (event,) = result.events
    assert event.worker == victim and result.n_iter == 500
    warned = [r.getMessage() for r in caplog.records if "no heartbeat" in r.getMessage()]
    assert any(m.startswith(f"dask_scar: worker(s) {victim} sent the scheduler no heartbeat for ") for m in warned)
    assert_losses_as_without_the_loss(result, event, big, at=400)


@pytest.mark.slow
def test_a_worker_that_hangs_as_another_dies_is_restarted_while_the_segment_stops(digits):
    """One worker of three SIGKILLed and another SIGSTOPped at once: stopping the
    segment waits for the hung worker's task too (up to scar.iteration-timeout, 600 s,
    with the code before), and restarts it after scar.recovery.hung-worker instead."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with new_cluster(3) as cluster, Client(cluster) as client:
        _, killed, hung = sorted(live_workers(client))
        pids = client.run(os.getpid)
        result = fit_hung_midway(client, big, [pids[hung]], kill=[pids[killed]], timeout=600)
        wait_for(lambda: not alive(pids[hung]), timeout=30, what="the nanny to kill the hung process")
    assert result.n_iter == 500
    assert sorted(w for e in result.events for w in e.worker.split(", ")) == sorted([killed, hung])


@pytest.mark.slow
def test_a_hung_worker_that_owns_no_chunk_is_restarted_too(digits):
    """One graph per iteration (a callback), one chunk on the first of three workers:
    the third holds rows only, and the iteration waits for it all the same."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with new_cluster(3) as cluster, Client(cluster) as client:
        victim = sorted(live_workers(client))[2]
        pid = client.run(os.getpid, workers=[victim])[victim]
        try:
            with dask.config.set({"scar.recovery.hung-worker": "3s", "scar.iteration-timeout": 60}):
                result = scar.Trainer(client, scar.SoftmaxRegression(), n_chunks=1).fit(
                    big, target="label", max_iter=60, tol=0, progress=False,
                    callback=once_at(20, lambda: os.kill(pid, signal.SIGSTOP)))
            wait_for(lambda: not alive(pid), timeout=30, what="the nanny to kill the hung process")
            assert victim not in live_workers(client)
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert result.n_iter == 60 and not result.events       # no chunk was lost; Dask rebuilt its rows


@pytest.mark.slow
def test_hung_workers_with_no_nanny_or_a_frozen_one_are_removed_and_leave_when_woken(tmp_path, digits):
    """Two workers hang at once: one with no nanny (nothing can restart it), and one whose
    nanny is stopped too (a machine that froze whole: its nanny does not answer). Both
    are removed, the fit goes on with the third, and once woken both close (the nanny
    with its worker) instead of training with their old state."""
    big = pd.concat([digits] * 20, ignore_index=True)
    with cli_cluster(tmp_path, 1) as (cluster, client):
        cluster.add_workers(1)
        cluster.add_workers(1, nanny=True)
        client.wait_for_workers(3, timeout=60)
        lone, nanny = cluster.workers[1:]
        pids, parents = client.run(os.getpid), client.run(os.getppid)
        victims = sorted(w for w in pids if pids[w] == lone.pid or parents[w] == nanny.pid)
        assert len(victims) == 2
        result = fit_hung_midway(client, big, [pids[w] for w in victims] + [nanny.pid])
        assert live_workers(client) == set(pids) - set(victims)
        for pid in [pids[w] for w in victims] + [nanny.pid]:
            os.kill(pid, signal.SIGCONT)
        assert lone.wait(timeout=30) == 0 and nanny.wait(timeout=30) == 0
    assert result.n_iter == 500 and sorted(w for e in result.events for w in e.worker.split(", ")) == victims


def _pause(dask_worker, on=True):
    from distributed.core import Status

    dask_worker.status = Status.paused if on else Status.running


@pytest.mark.slow
def test_a_paused_worker_is_named_with_its_memory(digits, caplog):
    """Dask pauses a worker whose memory reaches distributed.worker.memory.pause; every
    task of a fit is pinned to its worker, so the fit waits for it. The driver says so
    at once, and the timeout's error names it instead of guessing at a hung worker.
    (Here the worker is paused by hand: its memory monitor, switched off, would unpause
    it as soon as its memory is below the threshold.)"""
    settings = {"distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}
    with dask.config.set({"scar.iteration-timeout": 8}), new_cluster(2, settings) as cluster, \
            Client(cluster) as client:
        victim = sorted(live_workers(client))[1]
        outcome = {}

        def fit():
            try:
                outcome["result"] = scar.Trainer(client, scar.SoftmaxRegression()).fit(
                    pd.concat([digits] * 20, ignore_index=True), target="label", max_iter=100_000, tol=0,
                    progress=False)
            except Exception as exc:  # noqa: BLE001
                outcome["error"] = exc

        with caplog.at_level(logging.WARNING, logger="dask_scar"):
            thread = threading.Thread(target=fit)
            thread.start()
            wait_for(lambda: any(e.get("iteration", 0) >= 5 for _, e in client.get_events("scar-progress")),
                     what="training to start")
            client.run(_pause, workers=[victim])
            thread.join(timeout=120)
        client.run(_pause, on=False, workers=[victim])
    assert not thread.is_alive() and "result" not in outcome
    message = str(outcome["error"])
    assert message.startswith("an iteration took longer than scar.iteration-timeout=8s; worker(s) "
                              f"{victim} (") and "paused by Dask, at distributed.worker.memory.pause" in message
    warned = [r.getMessage() for r in caplog.records if "paused by Dask" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"dask_scar: worker(s) {victim} (")


@pytest.mark.slow
def test_a_read_that_paused_workers_hold_up_ends_at_the_timeout(digits, monkeypatch):
    """Every worker paused before the data is read, or one that alone may make some
    partitions: the read never moves, and after scar.iteration-timeout without a
    partition done the fit says why."""
    from dask_scar import data

    monkeypatch.setattr(data, "PAUSE_LOOK_SECONDS", 0.5)
    settings = {"distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}
    with dask.config.set({"scar.iteration-timeout": 3}), new_cluster(2, settings) as cluster, \
            Client(cluster) as client:
        client.run(_pause)
        with pytest.raises(scar.ScarError, match=r"reading the data finished no partition for "
                                                 r"scar.iteration-timeout=3s, with every worker paused by Dask for "
                                                 r"its memory \(tcp://.*\): give the workers more memory"):
            scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=3, progress=False)
        client.run(_pause, on=False)
        # one worker paused, holding up partitions that only it may make: the other
        # worker's being free does not make the read move
        victim = sorted(live_workers(client))[1]
        client.run(_pause, workers=[victim])
        frame = client.persist(dd.from_pandas(digits, npartitions=2), workers=[victim], allow_other_workers=False)
        with pytest.raises(scar.ScarError, match=rf"no partition for scar.iteration-timeout=3s, with workers paused by "
                                                 rf"Dask for their memory \({re.escape(victim)}"):
            scar.Trainer(client, scar.SoftmaxRegression()).fit(frame, target="label", max_iter=3, progress=False)
        client.run(_pause, on=False, workers=[victim])


def _slow_frame(frame, seconds):
    """``frame`` as a Dask DataFrame whose two partitions each take ``seconds`` to make."""
    halves = [frame.iloc[: len(frame) // 2], frame.iloc[len(frame) // 2:]]
    return dd.from_delayed([dask.delayed(lambda part: (time.sleep(seconds), part)[1])(h) for h in halves],
                           meta=frame.head(0))


def _fit_outcome(client, frame, **fit):
    outcome = {}

    def run():
        try:
            scar.Trainer(client, scar.SoftmaxRegression()).fit(frame, target="label", progress=False, **fit)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc
    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: client.run_on_scheduler(lambda dask_scheduler: any(
        ts.state == "processing" for ts in dask_scheduler.tasks.values())), what="the data's tasks to run")
    return thread, outcome


@pytest.mark.slow
def test_a_worker_that_hangs_while_the_data_is_read_is_restarted(digits):
    """The read waits for every partition: a worker SIGSTOPped while it makes one is
    restarted after scar.recovery.hung-worker, Dask makes the partition again, and the
    fit goes on (the code before waited for Dask's worker-ttl, 5 minutes)."""
    with new_cluster(2) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        outcome = {}

        def fit():
            outcome["result"] = scar.Trainer(client, scar.SoftmaxRegression()).fit(
                _slow_frame(digits, 4), target="label", max_iter=5, progress=False)
        with dask.config.set({"scar.recovery.hung-worker": "3s"}):
            thread = threading.Thread(target=fit)
            thread.start()
            busy = wait_for(lambda: client.run_on_scheduler(lambda dask_scheduler: sorted(
                ws.address for ws in dask_scheduler.workers.values() if ws.processing)), what="the data's tasks to run")
            os.kill(pids[busy[0]], signal.SIGSTOP)
            thread.join(timeout=90)
        if thread.is_alive():
            os.kill(pids[busy[0]], signal.SIGKILL)
        assert not thread.is_alive() and len(outcome["result"].history) == 5
        wait_for(lambda: not alive(pids[busy[0]]), timeout=30, what="the nanny to kill the hung process")


@pytest.mark.slow
def test_a_worker_that_hangs_as_the_parameters_are_gathered_is_restarted(digits, monkeypatch):
    """The last checkpoint round and the gathering of the parameters wait for the
    chunks' owners too: a worker SIGSTOPped as the fit finishes is restarted, its
    chunks recovered, and the fit returns (the code before waited for Dask's
    worker-ttl, 5 minutes)."""
    from dask_scar.run import TrainingRun

    finish, stopped = TrainingRun.finish, []

    def stop_then_finish(self):
        if not stopped:
            stopped.append(pid)
            os.kill(pid, signal.SIGSTOP)
        return finish(self)

    monkeypatch.setattr(TrainingRun, "finish", stop_then_finish)
    with new_cluster(2) as cluster, Client(cluster) as client:
        victim = sorted(live_workers(client))[1]
        pid = client.run(os.getpid, workers=[victim])[victim]
        outcome = {}
        with dask.config.set({"scar.recovery.hung-worker": "3s"}):
            thread = threading.Thread(target=lambda: outcome.update(result=scar.Trainer(
                client, scar.SoftmaxRegression(), n_chunks=4).fit(digits, target="label", max_iter=30, progress=False)))
            thread.start()
            thread.join(timeout=90)
        if thread.is_alive():
            os.kill(pid, signal.SIGKILL)
        assert stopped and not thread.is_alive()
        result = outcome["result"]
        assert result.n_iter == 30 and [e.worker for e in result.events] == [victim]
        wait_for(lambda: not alive(pid), timeout=30, what="the nanny to kill the hung process")


@pytest.mark.slow
def test_the_cluster_going_while_the_data_is_read_is_said(tmp_path, digits):
    """The scheduler lost, or the cluster restarted, while the data was read: the
    same errors as later in a fit, not Dask's FuturesCancelledError."""
    with cli_cluster(tmp_path, 2) as (cluster, client):
        thread, outcome = _fit_outcome(client, _slow_frame(digits, 5))
        cluster.scheduler.kill()
        thread.join(timeout=60)
    assert not thread.is_alive() and isinstance(outcome["error"], scar.SchedulerLostError), outcome
    assert str(outcome["error"]).startswith("lost the connection to the scheduler")
    with new_cluster(2) as cluster, Client(cluster) as client:
        thread, outcome = _fit_outcome(client, _slow_frame(digits, 5))
        client.restart()
        thread.join(timeout=60)
    assert not thread.is_alive() and type(outcome["error"]) is scar.ScarError, outcome
    assert str(outcome["error"]).startswith("Dask cancelled the reading of the data (") and str(
        outcome["error"]).endswith("was the cluster restarted (client.restart())? A frame persisted before a restart "
                                   "has lost its partitions (Dask's own compute of it fails the same way): persist it "
                                   "again from its source. Otherwise, start the fit again")


def test_a_frame_persisted_before_a_restart_is_said_to_need_persisting_again(own_client, digits):
    ddf = dd.from_pandas(digits, npartitions=4).persist()
    scar.Trainer(own_client, scar.SoftmaxRegression()).fit(ddf, target="label", max_iter=2, progress=False)
    own_client.restart()
    with pytest.raises(scar.ScarError, match="A frame persisted before a restart has lost its partitions"):
        scar.Trainer(own_client, scar.SoftmaxRegression()).fit(ddf, target="label", max_iter=2, progress=False)
    again = dd.from_pandas(digits, npartitions=4).persist()     # from its source
    assert scar.Trainer(own_client, scar.SoftmaxRegression()).fit(again, target="label", max_iter=2,
                                                                  progress=False).n_iter == 2
