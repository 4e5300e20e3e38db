"""One call of :meth:`~dask_scar.Trainer.fit` on the cluster: the iterations, the
checkpoint rounds between them, and the recoveries when workers go."""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import Counter
from concurrent.futures import CancelledError
from typing import Callable

import dask
import numpy as np
import pandas as pd
from distributed import Client, Future
from tqdm.auto import tqdm

from . import checkpoint, config, data, iteration, segment
from .checkpoint import Checkpointer
from .chunks import PROGRESS_TOPIC, ParameterChunks, place, release_keys
from .exceptions import DivergenceError, ScarError
from .models import Model
from .plugin import TURN_STALE_SECONDS, say_work, set_epoch, subscribe
from .recovery import (
    LOOK_SECONDS,
    POLL_SECONDS,
    RUN_SECONDS,
    ClusterWatch,
    Drift,
    Interrupted,
    RecoveryEvent,
    Restore,
    live_or_wait,
    live_workers,
    new_epoch,
    recover,
    run_on,
    wait_on,
    wait_watching,
)

logger = logging.getLogger(__name__)

#: How long a segment after a fit's first runs, where ``scar.segment-iterations`` would
#: end it sooner (but for at most SEGMENT_MOST iterations: the driver lists every
#: iteration's keys and checkpoint orders for a segment). Between two segments the
#: driver takes the first's results in and submits the next through the scheduler,
#: ~10-16 ms on 2 cores; with fast iterations (small blocks, a GPU) that was most of an
#: iteration's cost.
SEGMENT_SECONDS, SEGMENT_MOST = 1.0, 1000
#: A driver waiting for its run's turn to run a segment asks the scheduler again this
#: often (see :class:`dask_scar.plugin.ScarPlugin`), and says so after TURN_SAY_SECONDS.
TURN_POLL_SECONDS, TURN_SAY_SECONDS = 1.0, 10.0
#: A driver tells the scheduler how much work its run has left this often, for Dask's
#: adaptive scaling (see :class:`dask_scar.plugin.ScarPlugin`), asking for at most one
#: worker per WORKER_ROWS rows: 10,000 rows of softmax regression (100 features, 10
#: classes) take 1.2 ms an iteration on one core, about what a segment's iteration
#: costs with almost no rows (1.2-1.7 ms, benchmarks/bench_minibatch.py): fewer rows a
#: worker save less than the worker adds.
WORK_SAY_SECONDS, WORKER_ROWS = 2.0, 10_000


class TrainingRun:
    """One call of :meth:`Trainer.fit` on the cluster: the iterations, and the
    recoveries between them."""

    def __init__(self, model: Model, training: data.TrainingData, chunks: ParameterChunks,
                 ckpt: Checkpointer | None, restore: Restore, bar: tqdm, segment_length: int = 1):
        self.model, self.training, self.chunks, self.ckpt, self.restore, self.bar = (
            model, training, chunks, ckpt, restore, bar)
        self.client = chunks.client
        self.timeout = config.get("iteration-timeout")
        self.divergence_factor = config.get("divergence-factor")
        self.watch = ClusterWatch(self.client)
        self.drift = Drift(chunks.ids, fresh=chunks.version == 0, first_round=ckpt.round if ckpt is not None else 0)
        if ckpt is not None:
            ckpt.on_saved = self.drift.saved
        self.rows: list[dict] = []
        self.events: list[RecoveryEvent] = []
        self.fruitless = (0, 0)             # losses in a row with no iteration done between; rows then
        self.note = ""                      # what happened before the next row: a recovery, a rebalance
        self.resume_from: int | None = None  # set by finish() when it had to recover
        self.inbox: queue.Queue = queue.Queue()
        self.early: list[dict] = []         # events of an iteration after the one being collected
        self.previous: list[Future] = []    # futures of the last graph, released after the next submit
        self.waiting: list[Future] = []     # those waited for last (released at the end, however it came)
        self.stale: list[Future] = []       # chunk futures of the last version, likewise
        self.ahead = None                   # (iteration, graph, futures, orders) submitted, not yet waited for
        self.last = None                    # the last graph done, while the next may read its results
        # decided once, on the blocks as read: the smaller blocks a join cuts change only its cost
        self.replicated = iteration.replicates(model, training.rows)
        self.segment_length = segment_length    # the first segment's iterations, and the least (1: graphs)
        self.next_segment = segment_length      # the next segment's, from the last's speed (SEGMENT_SECONDS)
        self.segment_handler = False            # SegmentHandler installed on the workers
        self.turnless = False                   # the scheduler gives no turns (said once)
        self.work_said = -math.inf              # when the run last told the scheduler its work
        self.spread = True                      # workers joined (or did while the data was read): rows may move
        self.segment_results: dict[str, str] = {}   # worker -> its task of the last segment
        self.clock = time.perf_counter()        # when the last row's iteration was done
        run, inbox = chunks.run, self.inbox

        def on_progress(event: tuple[float, dict]) -> None:
            # Runs on the client's event loop: hand over, never block. It holds the inbox
            # only, not this run, which holds the training data's blocks.
            if event[1].get("run") == run:
                inbox.put(event[1])

        try:
            self.unsubscribe = subscribe(self.client, PROGRESS_TOPIC, on_progress)
        except BaseException:   # (Ctrl-C, the scheduler gone): close() will not run
            self.watch.close()
            bar.close()
            raise

    def owners(self) -> set[str]:
        return set(self.chunks.owner.values())

    def wait(self, futures: list[Future]) -> None:
        wait_watching(futures, self.watch, self.owners, self.timeout, self.restore.hint, others=self.data_workers)

    def data_workers(self) -> set[str]:
        return {w for w in self.training.workers if w is not None}

    def completed(self, futures: list[Future]) -> bool:
        """Wait for ``futures``; False if a worker holding chunks went meanwhile.
        (Recovery runs outside of any ``except`` block: an exception raised and caught
        there would chain to the one being handled, and keep its frames, with their
        futures, alive until the garbage collector runs.)"""
        self.waiting = futures
        try:
            self.wait(futures)
            return True
        except Interrupted:
            self.waiting = []   # some ran on the dead worker: the caller lets them go before recovering
            return False

    def start(self, submit: Callable[[], list[Future]]) -> None:
        """Create every chunk (``submit()`` starts the tasks); placed afresh if a worker goes meanwhile."""
        chunks = self.chunks
        while True:
            futures = submit()
            made = [chunks.key(cid, chunks.version) for cid in chunks.ids]
            try:
                if self.completed(futures):
                    break
            except BaseException:
                release_keys(self.client, made)   # the chunks that were created
                raise
            new_epoch(chunks, made)
            alive = live_or_wait(self.client, self.restore.hint)    # (none: a one-worker cluster's went)
            chunks.owner = place(chunks.ids, sorted(self.restore.place_on(alive)))
        chunks.advance(chunks.version)

    def iterate(self, first: int, max_iter: int, tol: float, callback: Callable | None) -> bool:
        """Iterations ``first..max_iter``; True if they stopped at ``tol``.

        While iteration ``k`` runs, the graph of ``k + 1`` is already on the scheduler,
        reading ``k``'s results (see :func:`dask_scar.iteration.build`), so no round trip
        through the driver separates them -- except around recoveries and rebalances,
        and when a ``callback`` may act between iterations. A checkpoint round chosen
        from ``k``'s priorities goes with the next graph submitted (see
        :mod:`dask_scar.checkpoint`). A graph submitted ahead and not needed is done
        and let go."""
        chunks, ckpt = self.chunks, self.ckpt
        self.clock = time.perf_counter()
        k, converged = first, False
        try:
            while k <= max_iter:
                self.say_work(k, max_iter)
                if self.watch.noticed(self.owners()) is not None:
                    k = self.recover(k)     # lost between iterations: recover before submitting work
                    continue
                if self.ahead is None:
                    if self.watch.added:
                        joined = self.watch.take_added()
                        self.restore.place_on(set(joined))     # a chunk's owner writes and restores it
                        self.note = _join(self.note, _rebalance(chunks, joined))
                        if ckpt is not None:
                            ckpt.drop_pending("the chunks moved to new workers")
                        self.last = None    # the chunks moved: read them where they are now
                        self.spread = True
                    placed = list(self.training.workers)
                    if _forget_dead_block_workers(self.training, self.watch):
                        self.spread = True      # rebuilt or moved onto survivors: one may hold two blocks
                    if self.spread and None not in self.training.workers:   # each block where it is now
                        moved, self.spread = data.spread(self.client, self.training)
                        self.note = _join(self.note, moved)
                    if self.training.workers != placed:
                        self.last = None
                    if self.segmentable(callback):
                        k, converged = self.segment(k, max_iter, tol)
                        if converged:
                            break
                        continue
                    self.ahead = self.submit(k, self.last, fuse=k < max_iter)
                _, graph, futures, orders = self.ahead
                self.ahead, self.segment_results = None, {}
                if (k < max_iter and callback is None and not self.watch.added
                        and None not in self.training.workers):
                    self.ahead = self.submit(k + 1, graph, fuse=k + 1 < max_iter)
                # Releases go out after the new graph, so they never delay it (the
                # client batches its messages to the scheduler in 10 ms windows); so
                # does the commit of the rounds whose writers reported (~1.5 ms).
                self.previous = self.stale = []
                if ckpt is not None:
                    ckpt.commit()
                if not self.completed(futures):
                    del futures
                    k = self.recover(k)
                    continue
                self.stale = chunks.advance(k)
                self.previous, self.last = futures, graph
                # The update tasks' events were sent before they finished: they are here.
                now = time.perf_counter()
                converged = self.record(k, orders, now - self.clock, tol)
                self.clock = now
                stop = callback(k, self.rows[-1]["loss"]) if callback is not None else None
                if converged or (isinstance(stop, (bool, np.bool_)) and stop):
                    break           # the caller's own stopping rule (a bool: other return values mean nothing)
                k += 1
        except BaseException:
            release_keys(self.client, self.abandon())
            raise
        self.settle()
        if converged and self.rows:     # a bar left at 7 % says why
            self.bar.set_postfix_str(f"loss={self.rows[-1]['loss']:.6g}, converged", refresh=True)
        return converged

    def record(self, k: int, orders: checkpoint.Orders | None, seconds: float, tol: float,
               select: bool = True) -> bool:
        """Take in the events of iteration ``k``, done: its row of the history, the
        chunks' steps, a checkpoint round chosen from its priorities (unless not
        ``select``). True if the loss converged to ``tol``."""
        want = select and orders is not None and orders.priorities
        loss, priorities, turned, steps, stamp = _collect(self.inbox, self.early, self.ckpt, k, self.chunks.epoch,
                                                          want, len(self.chunks.ids), self.timeout)
        self.drift.record(k, steps)
        self.drift.prioritized(priorities, turned)
        if self.ckpt is not None and select:
            self.ckpt.select(k, self.chunks.ids, priorities)
        # "stamp": the worker's clock on the event (a segment's), not a column of the history
        self.rows.append({"iteration": k, "loss": loss, "seconds": seconds, "event": self.note, "stamp": stamp})
        self.note = ""
        if stamp is None:       # a segment's rows (stamped): the bar moves as its events come
            self.show(k, loss)
        _check_divergence(self.rows, self.divergence_factor, self.model)
        return tol > 0 and len(self.rows) > 1 and segment.converged(self.rows[-2]["loss"], loss, tol)

    def show(self, k: int, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.6g}", refresh=False)    # shown by the update
        self.bar.update(k - self.bar.n)     # backwards too, after a rollback

    def take_in(self) -> bool:
        """During a segment: keep what arrived for :meth:`record` and move the bar to
        the newest iteration reported; True if one was."""
        moved = False
        for message in _take_all(self.inbox):
            self.keep(message)
            if message.get("epoch") == self.chunks.epoch and message.get("loss") is not None:
                moved = True
                if message["iteration"] > self.bar.n:
                    self.show(message["iteration"], message["loss"])
        return moved

    def segmentable(self, callback: Callable | None) -> bool:
        """Whether the next iterations can run as a segment (see :mod:`dask_scar.segment`)."""
        return (self.segment_length > 1 and callback is None and self.replicated
                and None not in self.training.workers)

    def segment(self, k: int, max_iter: int, tol: float) -> tuple[int, bool]:
        """Run iterations from ``k`` as one segment; returns the iteration to go on
        with, and whether the loss converged to ``tol``."""
        chunks, ckpt = self.chunks, self.ckpt
        if not self.segment_handler:
            known = live_workers(self.client)
            try:
                self.client.register_plugin(segment.SegmentHandler())
            except OSError:     # a worker died as the plugin reached it (CommClosedError); the others have it
                deadline = time.monotonic() + RUN_SECONDS
                while known <= live_workers(self.client):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(POLL_SECONDS)
                self.segment_handler = True
                return k, False     # recover first, where it held chunks
            self.segment_handler = True
        last = min(max_iter, k + self.next_segment - 1)
        rounds = None
        if ckpt is not None:
            orders = [ckpt.orders(i) for i in range(k, last + 1)]
            if any(o is not None and o.blocks for o in orders):
                self.drain(until=lambda: ckpt.outstanding() <= ckpt.backlog + 1)
            rounds = segment.Rounds(ckpt.policy, ckpt.layouts, ckpt.round + 1)
        else:
            orders = [None] * (last - k + 1)
        previous_loss = self.rows[-1]["loss"] if self.rows else None
        graph, keys, workers = segment.build(self.model, chunks, [b.key for b in self.training.blocks],
                                             self.training.workers, k, last, self.client.id, orders, rounds,
                                             previous_loss, tol, self.timeout, self.segment_results)
        # A segment's task on each worker waits for the others' at every iteration: two
        # fits' segments on one cluster, each taking a worker's only thread first on a
        # different worker, would wait for each other to the timeout. One segment runs
        # at a time on a cluster: its run's turn.
        self.take_turn()
        try:
            futures = self.client.get(graph, keys, sync=False)
            self.previous = self.stale = []
            made = [chunks.key(c, i) for i in range(k, last + 1) for c in chunks.ids]   # what the segment registers
            interrupted, self.waiting = False, futures
            try:    # the timeout is an iteration's: the workers' progress events restart it
                wait_watching(futures, self.watch, lambda: set(workers), self.timeout, self.restore.hint,
                              progress=self.take_in)
            except Interrupted:     # recovery runs outside the except block: see completed()
                interrupted = True
            if interrupted:
                done = self.abort_segment(k, futures, workers, orders)
        finally:
            self.release_turn()
        if interrupted:
            if ckpt is not None:    # the rounds its workers chose, each written or not
                ckpt.skip(sum(1 for o in orders[:-1] if o is not None and o.keep), done)
            futures.clear()     # some ran on the dead worker: let them go before recovering
            return self.recover(done + 1, abandoned=[chunks.key(c, i) for i in range(k, last + 1) if i != done
                                                     for c in chunks.ids],
                                workers_gone=[w for w in workers if self.watch.noticed({w}) is not None]), False
        # Each event carries its worker's clock: the rows' seconds split the segment's
        # time as its iterations took it, and add up to the driver's.
        converged, i = False, k
        try:
            for i in range(k, last + 1):
                converged = self.record(i, orders[i - k], 0.0, tol)
                if converged or segment.stops_at(self.model, self.rows[-1]["loss"]):
                    break       # where its workers stopped
                if ckpt is not None and i < last:
                    ckpt.handed_out(i)      # the workers went on, and wrote it
        except BaseException:
            release_keys(self.client, made)
            raise
        if ckpt is not None:
            ckpt.commit()
        self.show(i, self.rows[-1]["loss"])
        now = time.perf_counter()
        rows = self.rows[-(i - k + 1):]
        stamps = [row["stamp"] for row in rows]
        inner = [b - a for a, b in zip(stamps, stamps[1:])] if None not in stamps else [0.0] * (len(stamps) - 1)
        for row, seconds in zip(rows[1:], inner):
            row["seconds"] = seconds
        rows[0]["seconds"] = max(now - self.clock - sum(inner), 0.0)
        took, self.clock = now - self.clock, now
        fits = int(SEGMENT_SECONDS * len(rows) / max(took, 1e-6))     # iterations in SEGMENT_SECONDS
        self.next_segment = max(self.segment_length, min(SEGMENT_MOST, fits))
        self.stale = chunks.advance(i)
        self.previous, self.segment_results, self.last = futures, dict(zip(workers, keys)), None
        return i + 1, converged

    def say_work(self, k: int, max_iter: int) -> None:
        """Tell the scheduler, every :data:`WORK_SAY_SECONDS`, how many worker-seconds
        iterations ``k..max_iter`` would take at the last 20 iterations' speed, for
        Dask's adaptive scaling (a fit that converges sooner needs less). Where the
        scheduler's plugin takes none (an older one), the run says nothing more."""
        now = time.monotonic()
        if now - self.work_said < WORK_SAY_SECONDS or len(self.rows) < 2:
            return
        self.work_said = now
        # the median: a recovery's row holds the recovery, a segment's first row its start
        per_iteration = float(np.median([row["seconds"] for row in self.rows[-20:]]))
        workers = len(self.data_workers())
        if not say_work(self.client, self.chunks.run, seconds=(max_iter - k + 1) * per_iteration * workers,
                        most=max(1, self.training.n_rows // WORKER_ROWS),
                        valid_for=max(TURN_STALE_SECONDS, 3 * per_iteration * self.next_segment)):
            self.work_said = math.inf

    def take_turn(self) -> None:
        """Wait for this run's turn to run a segment on the cluster (another fit's
        segment may be running), saying so after :data:`TURN_SAY_SECONDS`. Interrupted,
        it gives its place back (and the scheduler does when the run ends). A scheduler
        whose plugin gives no turns (it logs a warning for every request) is asked once."""
        if self.turnless:
            return
        waited, said = time.monotonic(), False
        try:
            while True:
                got = self.client.sync(self.client.scheduler.scar_turn, run=self.chunks.run, client=self.client.id,
                                       timeout=TURN_POLL_SECONDS)
                if got is None:     # the scheduler's dask_scar plugin gives no turns
                    self.turnless = True
                    logger.warning("dask_scar: the scheduler's dask_scar plugin gives segments no turns (is it "
                                   "of an older version?): fits that share this cluster may wait for each "
                                   "other's segments. Install the same dask-scar version on the scheduler")
                if got in (True, None):
                    return
                if not said and time.monotonic() - waited > TURN_SAY_SECONDS:
                    said = True
                    logger.warning("dask_scar: run %s waits for another fit's segment on this cluster to end",
                                   self.chunks.run)
        except BaseException:
            self.release_turn()
            raise

    def release_turn(self) -> None:
        """Give back this run's turn (or its place in the queue); raises nothing: the
        scheduler may be gone, and then so is the turn."""
        if self.turnless:
            return
        try:
            self.client.sync(self.client.scheduler.scar_turn_release, run=self.chunks.run)
        except Exception:  # noqa: BLE001
            logger.debug("could not give back the turn of run %s", self.chunks.run, exc_info=True)

    def abort_segment(self, k: int, futures: list[Future], workers: list[str],
                      orders: list[checkpoint.Orders | None]) -> int:
        """A worker of the segment from ``k`` is gone: stop the others, take in the
        iterations every survivor finished, and make the newest of them the chunks'
        version, from the survivors' copies; returns it (``k - 1`` if none)."""
        chunks = self.chunks
        alive = live_workers(self.client)
        survivors = [w for w in workers if w in alive]
        run_on(self.client, segment.abort, chunks.run, chunks.epoch, workers=survivors)
        # their events are then here
        removals = self.watch.removals_now()
        _wait_done(self.watch, [(f, w) for f, w in zip(futures, workers) if w in alive], self.timeout, removals)
        # (a hung one is gone now, even if a new process took its address: its last
        # iterations' news, a second behind, do not count)
        survivors = [w for w in survivors if self.watch.removals[w] == removals[w]]
        messages, self.early = self.early + _take_all(self.inbox), []
        done = _finished_by_all(messages, chunks.epoch, survivors, k)
        for message in messages:
            self.keep(message)
        for i in range(k, done + 1):       # every event of these is here: no priorities wanted
            self.record(i, orders[i - k], time.perf_counter() - self.clock, 0.0, select=False)
            self.clock = time.perf_counter()
        self.early = []
        if done >= k:
            self.show(done, self.rows[-1]["loss"])
            mine = {cid: w for cid, w in chunks.owner.items() if w in survivors}
            adopting = chunks.adopt(mine, done)      # (one task per worker, in their order)
            try:
                wait_watching(adopting, self.watch, lambda: set(mine.values()), self.timeout, self.restore.hint)
            except Interrupted:
                pass        # another worker went: recovery sees it
            except Exception as exc:    # an adoption failed (its worker had no copy that new)
                if isinstance(exc, ScarError) or not any(f.status == "error" for f in adopting):
                    raise
                exc.__traceback__ = None    # see completed()
            adopted = {w for f, w in zip(adopting, sorted(set(mine.values()))) if f.status == "finished"}
            # the chunks not adopted were never made: marked lost, recovery restores them
            # (were their owner's address taken by a new process, they would look held)
            chunks.advance(done, lost={cid for cid, w in chunks.owner.items() if w not in adopted})
        return done

    def submit(self, k: int, after: iteration.IterationGraph | None, fuse: bool):
        """Submit the graph of iteration ``k`` (reading ``after``'s results, if given;
        with ``fuse``, its update tasks also compute the next contributions)."""
        orders = None
        if self.ckpt is not None:
            orders = self.ckpt.orders(k)
            if orders is not None and orders.blocks:
                self.drain(until=lambda: self.ckpt.outstanding() <= self.ckpt.backlog + 1)
        graph = iteration.build(self.model, self.chunks, [b.key for b in self.training.blocks],
                                self.training.workers, k, self.client.id, orders, after, self.replicated, fuse)
        return k, graph, self.client.get(graph.graph, graph.update_keys, sync=False), orders

    def settle(self) -> None:
        """Let go of a graph submitted ahead that training no longer needs, once it is
        done (so that nothing it registers afterwards outlives it). A worker lost
        meanwhile is left to :meth:`finish` to notice."""
        if self.ahead is not None:
            self.completed(self.ahead[2])
            release_keys(self.client, self.abandon())

    def abandon(self) -> list[str]:
        """Drop the graph submitted ahead, if any; returns the keys it makes (its
        update tasks' and the chunk versions it registers), for the caller to release."""
        if self.ahead is None:
            return []
        k, graph, _, _ = self.ahead
        self.ahead = None
        return [*graph.update_keys, *(self.chunks.key(c, k) for c in self.chunks.ids)]

    def recover(self, k: int, abandoned: list[str] = (), workers_gone: list[str] = ()) -> int:
        """Recover from worker loss noticed while iteration ``k`` was due (the keys
        ``abandoned`` work may have registered are let go; ``workers_gone``: workers
        known gone, holding chunks or not, such as a segment's); returns the iteration
        to go on with."""
        noticed = self.watch.noticed(self.owners() | set(workers_gone)) or time.time()
        self.last, self.segment_results = None, {}    # what they made belongs to an abandoned epoch
        if self.ckpt is not None:
            # rounds whose writers all reported are committed before a rollback looks for one
            self.drain(until=lambda: True)
        self.check_data()
        event = recover(self.restore, self.watch, k, noticed, self.drift, abandoned=[*self.abandon(), *abandoned],
                        workers_gone=workers_gone)
        self.check_data()       # (a restart's cancellation may come while the workers come back)
        if self.ckpt is not None:
            self.ckpt.recovered()
        with self.bar.external_write_mode():    # on a line of its own, not after the bar's
            # (a retirement is the cluster's own doing, scaling down: nothing was lost)
            logger.log(logging.INFO if event.retired else logging.WARNING, "dask_scar: %s", event.describe())
        self.events.append(event)
        self.note = _join(self.note, event.describe())
        self.give_up_when_fruitless(event, k)
        return event.resumed_at + 1

    def give_up_when_fruitless(self, event: RecoveryEvent, k: int) -> None:
        """Raise :class:`ScarError` when workers were lost (not retired) more times in a
        row than Dask lets a task run on workers that die
        (``distributed.scheduler.allowed-failures``), with no iteration done in between:
        the fit's own work kills them (over their memory), and each recovery would only
        start it again."""
        if event.retired:
            return
        count, rows = self.fruitless
        count = count + 1 if rows == len(self.rows) else 1
        self.fruitless = (count, len(self.rows))
        allowed = max(int(dask.config.get("distributed.scheduler.allowed-failures")), 1)
        if count <= allowed:
            return
        if not event.worker:    # work abandoned, though no worker went
            raise ScarError(
                f"the fit started iteration {k} again {count} times, with no worker lost: a task of it "
                "waits on a worker that is gone: is dask_scar's scheduler plugin ('scar') still installed? "
                "client.unregister_scheduler_plugin takes it away" + self.restore.hint)
        raise ScarError(
            f"workers were lost {count} times in a row at iteration {k}, with no iteration done in "
            f"between (Dask gives a task distributed.scheduler.allowed-failures={allowed} tries): the fit's "
            "work may be what kills them. A worker over its memory limit is restarted by its nanny, whose log "
            "says 'exceeded 95% memory budget': give the workers more memory, or more workers, make the "
            "model smaller (classes, ids, topics, features), or look for a stray value in the data (a count "
            "of millions)" + self.restore.hint)

    def check_data(self) -> None:
        """Raise :class:`CancelledError` where the data blocks were cancelled from
        outside (``client.restart()``, ``client.cancel``): workers lost with them are
        not recovered, and no recovery is reported."""
        cancelled = sum(block.cancelled() for block in self.training.blocks)
        if cancelled:
            raise CancelledError(f"{cancelled} of the fit's {len(self.training.blocks)} data blocks cancelled")

    def finish(self) -> dict[str, np.ndarray] | None:
        """Write the last checkpoint rounds (every block of the last iteration, see
        :meth:`Checkpointer.last`) and gather the parameters. If a worker is lost
        meanwhile: recover, set :attr:`resume_from` (the iteration after the last for
        partial recovery; full recovery rolled back) and return None."""
        ckpt = self.ckpt
        if ckpt is not None and self.rows:      # (none: a resume with nothing to train)
            ckpt.last(self.chunks.version, self.chunks.ids)
        # the rounds selected after the last iteration have no graph to carry them
        if ckpt is None or self.completed(ckpt.flush(self.client, self.chunks, self.model)):
            if ckpt is not None:
                self.drain(until=lambda: ckpt.outstanding() == 0)
            if self.watch.noticed(self.owners()) is None:
                params = self.gather()
                if params is not None:
                    return params
        self.resume_from = self.recover(self.chunks.version + 1)
        return None

    def drain(self, until: Callable[[], bool]) -> None:
        """Take the checkpoint writers' reports in until ``until()``. Stops early when
        a worker holding chunks is lost (its writer will never report: the recovery
        abandons its rounds), and has hung ones restarted; gives up on rounds silent
        for ``scar.iteration-timeout``."""
        ckpt, deadline = self.ckpt, time.monotonic() + self.timeout
        last_look = time.monotonic()
        while not until() and self.watch.noticed(self.owners()) is None:
            try:
                self.keep(self.inbox.get(timeout=POLL_SECONDS))
            except queue.Empty:
                if time.monotonic() - last_look > LOOK_SECONDS:     # a writer's worker may be hung
                    last_look = time.monotonic()
                    self.watch.restart_hung(self.owners())
                if time.monotonic() > deadline:
                    ckpt.abandon(f"no report from the checkpoint writers within "
                                 f"scar.iteration-timeout={self.timeout:g}s")
        for message in _take_all(self.inbox):
            self.keep(message)
        ckpt.commit()

    def keep(self, message: dict) -> None:
        """A message taken in out of turn: a writer's report goes to the Checkpointer, an
        iteration's event waits in :attr:`early` for :meth:`record`."""
        if message.get("kind") == "written":
            self.ckpt.on_written(message)
        else:
            self.early.append(message)

    def gather(self) -> dict[str, np.ndarray] | None:
        """The fitted parameters; None if a worker holding chunks went meanwhile."""
        try:
            return self.chunks.gather(self.model, wait=self.wait)
        except (CancelledError, Interrupted) as exc:
            exc.__traceback__ = None    # see completed()
            return None

    def close(self) -> None:
        self.unsubscribe()
        self.watch.close()
        self.bar.close()
        release_keys(self.client, [f.key for f in [*self.previous, *self.stale, *self.waiting,
                                                   *self.chunks.futures.values()]])
        self.previous = self.stale = self.waiting = []
        self.chunks.release()
        _end_run(self.client, self.chunks.run)


def _collect(inbox: queue.Queue, early: list[dict], ckpt: Checkpointer | None, iteration: int, epoch: int,
             want_priorities: bool, n_chunks: int, timeout: float
             ) -> tuple[float, dict[str, list[float]], dict[str, list[int]], dict[str, float], float | None]:
    """The loss, (if asked for) block priorities and turned blocks
    (:func:`~dask_scar.checkpoint.distances`) and the chunks' step norms that
    ``iteration``'s update tasks sent, and the worker's clock on the event that
    carried the loss (segments stamp theirs; None otherwise); events of abandoned
    work are dropped. Events of
    the iteration after (a worker with no data block updates its chunks for the next
    iteration while another is still busy with this one's; :meth:`drain` takes in
    those of the iteration in flight) wait in ``early``."""
    loss, priorities, turned, steps, stamp = None, {}, {}, {}, None
    waiting, early[:] = early[:], []
    while loss is None or len(steps) < n_chunks or (want_priorities and len(priorities) < n_chunks):
        if waiting:
            message = waiting.pop(0)
        else:
            try:
                message = inbox.get(timeout=timeout)
            except queue.Empty:
                raise ScarError(f"no loss arrived for iteration {iteration}: is the scheduler's ScarPlugin from "
                                "another dask_scar version? Install the same version everywhere") from None
        if message.get("kind") == "written":
            ckpt.on_written(message)
            continue
        if message.get("epoch") != epoch or message.get("iteration") != iteration:
            if message.get("epoch") == epoch and message.get("iteration", 0) > iteration:
                early.append(message)
            continue
        if message.get("loss") is not None and loss is None:
            loss, stamp = message["loss"], message.get("stamp")
        steps.update(message["steps"])
        priorities.update(message.get("priorities") or {})
        turned.update(message.get("turned") or {})
    early.extend(waiting)
    return loss, priorities, turned, steps, stamp


def _wait_done(watch: ClusterWatch, futures: list[tuple[Future, str]], timeout: float,
               removals: Counter) -> None:
    """Wait until none of ``futures`` (each with its worker) is pending (done, failed,
    or cancelled when its input died with a worker) but those of workers removed since
    ``removals`` (:attr:`ClusterWatch.removals`), at most ``timeout`` seconds. Every
    ``LOOK_SECONDS`` their hung workers are restarted (:meth:`ClusterWatch.restart_hung`)."""
    started = last_look = time.monotonic()
    while True:
        pending = {w: f for f, w in futures if f.status == "pending" and watch.removals[w] == removals[w]}
        now = time.monotonic()
        if not pending or now - started > timeout:
            return
        if now - last_look > LOOK_SECONDS:
            last_look = now
            watch.restart_hung(set(pending))
        try:
            wait_on(watch.client, list(pending.values()), timeout=POLL_SECONDS)
        except (CancelledError, TimeoutError) as exc:
            exc.__traceback__ = None    # see TrainingRun.completed


def _finished_by_all(messages: list[dict], epoch: int, survivors: list[str], k: int) -> int:
    """The newest iteration of a segment from ``k`` that every one of ``survivors``
    finished, by their events of ``epoch`` (``k - 1``: none)."""
    reached: dict[str, int] = {}
    for message in messages:
        if message.get("epoch") == epoch and "worker" in message:
            reached[message["worker"]] = max(reached.get(message["worker"], k - 1), message["iteration"])
    return min((reached.get(w, k - 1) for w in survivors), default=k - 1)


def _take_all(inbox: queue.Queue) -> list[dict]:
    out = []
    while True:
        try:
            out.append(inbox.get_nowait())
        except queue.Empty:
            return out


def history_frame(rows: list[dict], ckpt: Checkpointer | None) -> pd.DataFrame:
    history = pd.DataFrame(rows, columns=["iteration", "loss", "seconds", "event"])
    written = ckpt.columns() if ckpt is not None else {}
    notes = ckpt.notes if ckpt is not None else {}
    history.insert(3, "checkpoint_bytes", [written.get(k, {}).get("checkpoint_bytes", 0)
                                           for k in history["iteration"]])
    history.insert(4, "checkpoint_seconds", [written.get(k, {}).get("checkpoint_seconds", 0.0)
                                             for k in history["iteration"]])
    history["event"] = [_join(event, *notes.get(k, [])) for k, event in zip(history["iteration"], history["event"])]
    return history


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _rebalance(chunks: ParameterChunks, joined: list[str]) -> str:
    """Give the workers that ``joined`` (and are still there) a share of the chunks: the
    next update of a moved chunk runs on its new owner (its value travels there;
    nothing is restored). One that joined since is left for the next rebalance."""
    known = set(chunks.owner.values()) | set(joined)
    load = {w: [] for w in sorted(live_workers(chunks.client)) if w in known}
    for cid in chunks.ids:
        load.setdefault(chunks.owner[cid], []).append(cid)
    moved = []
    while True:
        most = max(load, key=lambda w: (len(load[w]), w))
        least = min(load, key=lambda w: (len(load[w]), w))
        if len(load[most]) - len(load[least]) <= 1:
            break
        cid = load[most].pop()
        load[least].append(cid)
        chunks.owner[cid] = least
        moved.append(cid)
    if not moved:
        return ""
    to = sorted({chunks.owner[c] for c in moved})
    return f"rebalanced {len(moved)} chunk(s) onto {', '.join(to)}"


def _forget_dead_block_workers(training: data.TrainingData, watch: ClusterWatch) -> bool:
    """A data block whose worker died is rebuilt by Dask wherever the scheduler
    chooses (a retired worker's is moved): its tasks lose their placement, and get it
    back once it exists. True if blocks lost their worker."""
    if watch.removed and any(w in watch.removed for w in training.workers if w):
        training.workers = [None if w in watch.removed else w for w in training.workers]
        return True
    if None in training.workers:
        where = data.holders(training.blocks[0].client, training.blocks)
        training.workers = [where[b.key] or None for b in training.blocks]
    return False


def _end_run(client: Client, run: str) -> None:
    if client.status != "running":
        return      # the scheduler is gone: nothing to tidy, and an rpc would wait to time out
    try:
        set_epoch(client, run, None)
        run_on(client, segment.forget, run)    # the chunk copies and values the workers kept
    except Exception:  # noqa: BLE001  (the scheduler is gone: nothing to tidy)
        logger.debug("could not tell the scheduler that run %s ended", run, exc_info=True)


#: Trials in a row whose loss is not finite after which a line search gives up (each
#: shrinks the step tenfold).
LINE_SEARCH_TRIALS = 30


def _check_divergence(rows: list[dict], factor: float, model: Model) -> None:
    if model.line_search:   # a high loss is a trial it rejects: only one that never comes back is divergence
        last = rows[-LINE_SEARCH_TRIALS:]
        if len(last) == LINE_SEARCH_TRIALS and not any(math.isfinite(row["loss"]) for row in last):
            error = DivergenceError(f"training diverged: {LINE_SEARCH_TRIALS} trial steps in a row, each ten "
                                    f"times shorter than the one before, gave no finite loss (iteration "
                                    f"{rows[-1]['iteration']}); check the data's scale and the model's l2")
            error.iteration = rows[-1]["iteration"] - LINE_SEARCH_TRIALS + 1
            raise error
        return
    loss = rows[-1]["loss"]
    if not math.isfinite(loss) or loss > factor * max(abs(rows[0]["loss"]), 1e-12):
        hint = (f"lower learning_rate (now {model.learning_rate}) or scale the features"
                if hasattr(model, "learning_rate") else "check the data's scale and the model's l2")
        error = DivergenceError(f"training diverged: loss {loss:.6g} at iteration {rows[-1]['iteration']} "
                                f"(it started at {rows[0]['loss']:.6g}); {hint}")
        error.iteration = rows[-1]["iteration"]
        raise error
