"""Recovery from worker loss, on the driver.

The scheduler's :class:`~dask_scar.plugin.ScarPlugin` publishes every worker
removal on the ``scar`` topic; :class:`ClusterWatch` hands those events to the
driver thread, which looks at them while it waits for an iteration
(:func:`wait_watching`). The trainer then abandons the iteration in flight and
calls :func:`recover`, which

1. moves the run to a new epoch, so that whatever the abandoned work still
   produces is refused by the scheduler, and lets go of what it already produced;
2. keeps every chunk that still has a copy on a live worker (a graceful
   ``retire_workers`` leaves one; so does a contribution that had fetched it):
   its owner changes, nothing is read;
3. re-creates a chunk whose current value is gone from the newest earlier copy a
   live worker holds (every contribution task reads every chunk and its process
   remembers the copy: usually one iteration old), nothing read either;
4. re-creates the chunks that had no copy at all on the least loaded live workers,
   each reading **only its own blocks** from the checkpoint store, extrapolated
   along their drift between their last two saved versions (:meth:`Drift.trends`;
   but blocks whose drift turned, as their owner last measured; blocks never
   checkpointed start again from their initial value);
5. with ``recovery="full"`` (the traditional baseline) instead rolls every chunk
   back to the store and rewinds the iteration count to its last committed round.

A failure during recovery starts the recovery again; with no worker left it waits
``scar.recovery.wait-for-workers`` seconds for one. A worker that the driver waits
on and that stopped answering the scheduler (hung) is restarted after
``scar.recovery.hung-worker`` (:meth:`ClusterWatch.restart_hung`), and recovered
from as from any other loss.

How much a recovery costs is estimated by :class:`Drift` from what the update
tasks report every iteration (the norm of each chunk's step) and what the
checkpoint policy reports (each block's distance from its saved value): the
perturbation ``||delta||`` between the lost and the restored values, and the extra
iterations the contraction bound of SCAR predicts,
``log_{1/c}(1 + ||delta|| / ||x_T - x*||)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from array import array
from collections import Counter, deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from dask.utils import format_bytes
from distributed import Client, Future
from distributed.client import _wait    # distributed.wait's own, on the given client

from . import config
from .checkpoint import Trend
from .chunks import ChunkId, ParameterChunks, place, release_keys, seen_versions
from .exceptions import SchedulerLostError, ScarError, WorkerLostError
from .plugin import CLUSTER_TOPIC, restart_hung, say_work, segment_of_another_run, set_epoch, subscribe

logger = logging.getLogger(__name__)

#: How often a waiting driver looks at what the ``scar`` topic said: the most a
#: worker's removal can wait before the driver acts on it.
POLL_SECONDS = 0.05
#: A wait that lasts looks at the cluster itself this often: the scheduler, paused and
#: hung workers (:func:`wait_watching`).
LOOK_SECONDS = 2.0


@dataclass
class RecoveryEvent:
    """One recovery from worker loss (in ``FitResult.events``).

    ``iteration`` is the iteration that was in flight; training went on with
    ``resumed_at + 1`` (the same iteration for partial recovery, the last committed
    checkpoint's for full recovery). Each chunk the worker held is in one of three
    lists: ``lost_chunks`` were restored from the store (``bytes_read``;
    ``extrapolated_blocks`` of them along the drift between their last two saves,
    ``reinitialized_blocks`` had never been saved and start again from their
    initial value; for full recovery: every chunk, ``older_blocks`` of the blocks
    as saved by rounds before the one rolled back to), ``peer_chunks`` from a copy a
    live worker kept (the replicas update tasks keep, current for the gradient
    models, or the copy of an earlier iteration a contribution task left:
    ``peer_iterations`` behind, in all), ``moved_chunks`` were taken over from a
    surviving copy of their current value (a graceful retirement, ``retired``, moves
    them all; inside a segment, the live workers' copies are current, and serve). A
    retirement is logged at INFO, a loss at WARNING.
    So ``lost_chunks`` may be empty although chunks died with the worker: none
    needed the store. ``seconds`` run from the moment the driver learned of the loss
    to the moment the restored chunks were in place (``noticed_at``: the wall-clock
    time, ``time.time()``, it learned of the loss). ``contraction`` is the rate
    ``c`` estimated from the recent steps. ``est_perturbation`` estimates
    ``||restored - lost||`` and ``predicted_extra_iterations`` the iterations the
    contraction bound predicts it costs (for full recovery: the iterations rolled
    back); NaN where there is too little history to tell.
    """

    iteration: int
    worker: str
    lost_chunks: list[str]
    bytes_read: int
    seconds: float
    est_perturbation: float
    predicted_extra_iterations: float
    mode: str = "partial"
    moved_chunks: list[str] = field(default_factory=list)
    reinitialized_blocks: int = 0
    extrapolated_blocks: int = 0
    peer_chunks: list[str] = field(default_factory=list)
    peer_iterations: int = 0
    resumed_at: int = 0
    contraction: float = math.nan
    noticed_at: float = math.nan    # time.time() when the driver learned of the loss
    older_blocks: int = 0
    retired: bool = False           # every worker gone was retired gracefully

    def describe(self) -> str:
        """One line for people: which worker went at which iteration, what came back
        from where, how long it took, and the iterations it is predicted to cost."""
        if self.mode != "partial":
            parts = [f"rolled every chunk back to iteration {self.resumed_at} ({self.bytes_read:,} bytes read)"]
            if self.older_blocks:   # a partial policy's round holds a share of the blocks
                parts.append(f"{self.older_blocks} block(s) as saved by rounds before that iteration's")
        else:
            restored = []
            if self.peer_chunks:
                behind = f"{self.peer_iterations} iteration(s) behind in all" if self.peer_iterations else "current"
                restored.append(f"{len(self.peer_chunks)} chunk(s) from live workers' copies ({behind})")
            if self.lost_chunks or not (self.peer_chunks or self.moved_chunks):
                restored.append(f"{len(self.lost_chunks)} chunk(s) ({self.bytes_read:,} bytes read)")
            parts = [f"restored {' and '.join(restored)}"] if restored else []
        if self.moved_chunks:
            parts.append(f"took over {len(self.moved_chunks)} surviving chunk(s)")
        if self.extrapolated_blocks:
            parts.append(f"{self.extrapolated_blocks} block(s) extrapolated from their last two saves")
        if self.reinitialized_blocks:
            parts.append(f"{self.reinitialized_blocks} never-saved block(s) re-initialised")
        what = ", ".join(parts)
        return (f"worker {self.worker} {'retired' if self.retired else 'lost'} at iteration {self.iteration}: "
                f"{what} in {self.seconds:.3f} s; "
                f"estimated perturbation {self.est_perturbation:.4g}, "
                f"predicted extra iterations {self.predicted_extra_iterations:.3g}")


def label(cid: ChunkId) -> str:
    return f"{cid.name}[{cid.start}:{cid.stop}]"


class ClusterWatch:
    """What the ``scar`` topic said about the cluster, for the driver thread.

    The topic handler runs on the client's event loop: it only records the event
    and the time it arrived.
    """

    def __init__(self, client: Client):
        self.client = client
        self.removed: dict[str, float] = {}   # worker -> when the driver learned it was removed
        self.added: list[str] = []            # workers that joined since the last rebalance
        self._lock = threading.Lock()
        self.paused: set[str] = set()         # paused workers already warned about (driver thread only)
        self.retired: set[str] = set()        # removed workers whose removal was expected (retired)
        self.hung: set[str] = set()           # hung workers already warned about (until one joins again)
        self.removals: Counter = Counter()    # worker address -> removals heard (a new process may take it)
        self.hung_after = hung_after()        # None: never, or the scheduler's plugin restarts no hung worker
        self.close = subscribe(client, CLUSTER_TOPIC, self._on_event)

    def _on_event(self, event: tuple[float, dict]) -> None:
        msg = event[1]
        with self._lock:
            if msg.get("action") == "remove-worker":
                self.removed.setdefault(msg["worker"], time.time())
                self.removals[msg["worker"]] += 1
                if msg.get("expected"):
                    self.retired.add(msg["worker"])
                if msg["worker"] in self.added:
                    self.added.remove(msg["worker"])
            elif msg.get("action") == "add-worker":
                self.removed.pop(msg["worker"], None)
                self.hung.discard(msg["worker"])
                self.added.append(msg["worker"])

    def noticed(self, workers: set[str]) -> float | None:
        """When the driver first heard that one of ``workers`` was removed (None: not heard)."""
        with self._lock:
            times = [t for w, t in self.removed.items() if w in workers]
        return min(times) if times else None

    def restart_hung(self, workers: set[str]) -> None:
        """Have the scheduler restart those of ``workers`` that sent it no heartbeat for
        ``scar.recovery.hung-worker`` (see :func:`restart_hung_workers`): their removal
        is then noticed like any other. Asked once of a scheduler whose plugin does not
        do it."""
        if self.hung_after is not None and workers and \
                not restart_hung_workers(self.client, workers, self.hung_after, self.hung):
            self.hung_after = None

    def removals_now(self) -> Counter:
        """How many times each worker address was removed, so far."""
        with self._lock:
            return self.removals.copy()

    def take_added(self) -> list[str]:
        with self._lock:
            added, self.added = self.added, []
        return added


def restart_hung_workers(client: Client, workers: set[str], after: float, warned: set[str]) -> bool:
    """Have the scheduler restart those of ``workers`` that sent it no heartbeat for
    ``after`` seconds (a stopped or deadlocked process, a frozen machine), saying so
    once for each (``warned`` gains them). False: the scheduler's plugin does not do
    it (an older dask-scar)."""
    hung = restart_hung(client, workers, after)
    if hung is None:
        return False
    new = {w: silent for w, silent in sorted(hung.items()) if w not in warned}
    warned.update(new)
    if new:
        logger.warning("dask_scar: worker(s) %s sent the scheduler no heartbeat for %s s (scar.recovery."
                       "hung-worker=%gs): the scheduler restarts them (removes those without a nanny)",
                       ", ".join(new), ", ".join(f"{s:.1f}" for s in new.values()), after)
    return True


def hung_after() -> float | None:
    """``scar.recovery.hung-worker`` in seconds; None where it is off (false, 0)."""
    return config.get("recovery.hung-worker")


def live_workers(client: Client) -> set[str]:
    """The addresses of the cluster's workers, asked of the scheduler now.

    Not ``Client.scheduler_info()``: it refreshes the client's cached identity and
    returns the cache, which the client's own periodic refresh (every 2 s, asking for
    no workers) can overwrite in between -- an empty worker list now and then.
    """
    return set(workers_info(client))


def workers_info(client: Client) -> dict[str, dict]:
    """The scheduler's identity of every worker (status, memory...), asked now (see :func:`live_workers`)."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def paused(info: dict[str, dict], among: set[str]) -> dict[str, str]:
    """The workers of ``among`` that Dask paused (``info``: :func:`workers_info`), each
    described with its memory."""
    return {w: f"{w} ({format_bytes(i.get('metrics', {}).get('memory', 0))} of "
               f"{format_bytes(i.get('memory_limit') or 0)})"
            for w, i in sorted(info.items()) if w in among and i.get("status") == "paused"}


def warn_paused(info: dict[str, dict], among: set[str], warned: set[str]) -> dict[str, str]:
    """Log a warning for each worker of ``among`` newly paused (not in ``warned``,
    which gains it); returns all of them, described."""
    now = paused(info, among)
    new = {w: text for w, text in now.items() if w not in warned}
    if new:
        warned.update(new)
        logger.warning("dask_scar: %s", pause_advice(new))
    return now


def hang_advice(hung_after: float | None) -> str:
    if hung_after is None:
        return ("is the cluster overloaded, or a worker hung? A hung (not dead) worker is only removed after "
                "distributed.scheduler.worker-ttl (default 5 minutes), or after scar.recovery.hung-worker where "
                "the scheduler's dask-scar plugin is as new as this one")
    return (f"is the cluster overloaded, or a task hung on a worker that still sends heartbeats? (One that "
            f"sent none for scar.recovery.hung-worker={hung_after:g}s would have been restarted)")


def pause_advice(workers: dict[str, str]) -> str:
    return (f"worker(s) {', '.join(workers.values())} paused by Dask, at distributed.worker.memory.pause "
            "(80 % of the memory limit by default): training waits until its memory drops. Give the workers "
            "more memory (dask worker --memory-limit), or add workers")


def check_scheduler(client: Client, hint: str) -> None:
    """Raise :class:`SchedulerLostError` if the client lost its scheduler."""
    if client.status in ("closing", "closed"):
        raise SchedulerLostError(f"the Dask client is {client.status} (closed by its user, or after it lost "
                                 f"its scheduler): connect a new one (Client(...)) to train{hint or ''}")
    if client.status not in ("running", "newly-created"):
        raise SchedulerLostError(f"lost the connection to the scheduler at {client.scheduler.address} "
                                 f"(client {client.status}){hint or ''}")


def cancelled(client: Client, error: CancelledError, hint: str, reading: bool = False) -> ScarError:
    """The error to raise for the fit's tasks cancelled from outside: the scheduler
    lost (:class:`SchedulerLostError`), or the cluster restarted (``reading``: while
    the data was read, whose own partitions may be what is gone)."""
    check_scheduler(client, hint)
    if "lost the connection to the scheduler" in str(error):    # before the client's status says so
        return SchedulerLostError(f"lost the connection to the scheduler at {client.scheduler.address}{hint}")
    if reading:
        return ScarError(f"Dask cancelled the reading of the data ({error}): was the cluster restarted "
                         "(client.restart())? A frame persisted before a restart has lost its partitions (Dask's "
                         "own compute of it fails the same way): persist it again from its source. Otherwise, "
                         "start the fit again" + hint)
    return ScarError(f"Dask cancelled the fit's tasks ({error}): was the cluster restarted "
                     f"(client.restart())?{hint or ' Start the fit again'}")


class Drift:
    """What the driver knows of how far the parameters moved, for recovery estimates.

    Per chunk it keeps its *path*: the sum of the norms of every step it took. A
    chunk's distance from what the store would restore is known at some point
    (zero when it was restored or wholly saved; the block distances the policy
    measured), and ``||x - stored|| <= known + path walked since`` (triangle
    inequality).
    """

    def __init__(self, ids: list[ChunkId], window: int = 20, fresh: bool = False, first_round: int = 0):
        """``fresh``: the fit starts from the initial values at iteration 0 (so a block
        saved once can be extrapolated from its initial value); its checkpoint rounds
        are numbered after ``first_round``."""
        self.fresh, self.first_round = fresh, first_round
        self.history = {cid: array("d") for cid in ids}   # the path after each iteration (8 bytes each)
        self.labels = {cid: cid.tag for cid in ids}
        self.chunks = {key: cid for cid, key in self.labels.items()}
        self.path = {cid: 0.0 for cid in ids}
        # per chunk: block distances from the stored values (None: all zero), and the path then
        self.known: dict[ChunkId, tuple[np.ndarray | None, float]] = {cid: (None, 0.0) for cid in ids}
        self.turned: dict[ChunkId, tuple[int, ...]] = {}    # per chunk: blocks a restore takes as saved
        self.totals: deque[float] = deque(maxlen=window)      # recent iterations: the whole step's norm

    def record(self, iteration: int, steps: dict[str, float]) -> None:
        """The norms of the chunks' steps in ``iteration``."""
        for cid, key in self.labels.items():
            self.path[cid] += steps.get(key, 0.0)
        self.totals.append(math.sqrt(sum(v * v for v in steps.values())))
        for cid, history in self.history.items():   # an iteration done again after a recovery: its latest
            del history[max(iteration, 0):]
            history.extend([math.nan] * (iteration - len(history)) + [self.path[cid]])

    def path_at(self, cid: ChunkId, iteration: int) -> float | None:
        """The path of ``cid`` after ``iteration`` of this fit (None: unknown)."""
        history = self.history[cid]
        then = history[iteration] if 0 <= iteration < len(history) else math.nan
        return None if math.isnan(then) else then

    def reset(self, ids: list[ChunkId]) -> None:
        """Chunks now equal to what the store holds (restored, or initialised)."""
        for cid in ids:
            self.known[cid] = (None, self.path[cid])

    def prioritized(self, priorities: dict[str, list[float]], turned: dict[str, list[int]] | None = None) -> None:
        """Each block's distance from what a restore would put back, as the policy
        measured it now (a chunk whose reference was unknown, reported as inf, keeps
        its older bound), and the blocks whose drift turned, which restores take as
        saved (:func:`dask_scar.checkpoint.distances`)."""
        for cid, key in self.labels.items():
            if key in priorities and not np.isinf(priorities[key]).any():
                self.known[cid] = (np.asarray(priorities[key], dtype=float), self.path[cid])
            if key in (turned or {}):
                self.turned[cid] = tuple(turned[key])

    def saved(self, iteration: int, blocks: dict[str, list[int]], block_rows: dict[str, int]) -> None:
        """A writer stored these blocks (of chunk ``"name/index"``) with their values of ``iteration``."""
        for label, chosen in blocks.items():
            cid = self.chunks[label]
            then = self.path_at(cid, iteration)
            distances, since = self.known[cid]
            if then is None or then < since:
                continue        # a newer measurement, or too old to place: the older bound still holds
            first = cid.start // block_rows[cid.name]
            if len(chosen) == -(-cid.stop // block_rows[cid.name]) - first:
                self.known[cid] = (None, then)
            elif distances is not None:
                # a written block is now at most the path walked since ``then`` (<= since
                # ``since``) from the store: the bound with its distance zeroed still holds
                distances = distances.copy()
                distances[[b - first for b in chosen]] = 0.0
                self.known[cid] = (distances, since)

    def trends(self, ids: list[ChunkId]) -> dict[ChunkId, Trend]:
        """What a worker restoring ``ids`` from the store needs to extrapolate their
        blocks along whatever two versions the store holds (see
        :func:`dask_scar.checkpoint.prepare_chunk`): per chunk its path after every
        iteration of this fit (NaN before it), the round this fit's rounds follow, and
        whether the fit started from the initial values, and the blocks whose drift
        turned when last measured."""
        return {cid: Trend(np.array(self.history[cid], dtype=float), self.first_round, self.fresh,
                           self.turned.get(cid, ())) for cid in ids}

    def distance(self, cid: ChunkId) -> float:
        """Upper estimate of ``||x_cid - stored||`` now."""
        distances, since = self.known[cid]
        d = 0.0 if distances is None else float(np.sqrt(np.sum(distances ** 2)))
        return d + self.path[cid] - since

    def contraction(self) -> tuple[float, float]:
        """Contraction rate ``c`` and the last step's norm, from the recent steps."""
        norms = [n for n in self.totals if n > 0]
        if len(norms) < 3:
            return math.nan, math.nan
        c = (norms[-1] / norms[0]) ** (1.0 / (len(norms) - 1))
        return float(min(max(c, 1e-6), 0.999)), norms[-1]

    def since(self, cid: ChunkId, iteration: int) -> float:
        """Upper estimate of ``||x_cid - x_cid at iteration||``: the path walked since."""
        then = self.path_at(cid, iteration)
        return math.inf if then is None else self.path[cid] - then

    def predict(self, lost: list[ChunkId], copies: dict[ChunkId, int] | None = None) -> tuple[float, float, float]:
        """(||delta||, predicted extra iterations, c) for losing ``lost`` now (restored
        from the store) and ``copies`` (restored from copies of these iterations)."""
        delta = math.sqrt(sum(self.distance(cid) ** 2 for cid in lost)
                          + sum(min(self.since(cid, v), self.distance(cid)) ** 2 for cid, v in (copies or {}).items()))
        c, last = self.contraction()
        if math.isnan(c) or delta == 0:
            return delta, (0.0 if delta == 0 else math.nan), c
        remaining = last * c / (1 - c)    # ||x_T - x*|| if the steps shrink by c each iteration
        return delta, math.log1p(delta / max(remaining, 1e-300)) / math.log(1 / c), c


def _spread(ids: list[ChunkId], owner: dict[ChunkId, str], alive: list[str]) -> dict[ChunkId, str]:
    """Place ``ids`` on the live workers holding the fewest parameter rows."""
    load = {w: 0 for w in alive}
    for cid, w in owner.items():
        if w in load and cid not in ids:
            load[w] += cid.stop - cid.start
    placement = {}
    for cid in sorted(ids, key=lambda c: c.start - c.stop):
        worker = min(load, key=lambda w: (load[w], w))
        placement[cid] = worker
        load[worker] += cid.stop - cid.start
    return placement


@dataclass
class Restore:
    """What :func:`recover` needs from the trainer."""

    chunks: ParameterChunks
    # start re-creating chunks at a version from the store, extrapolating blocks along these trends
    initialize: Callable[[list[ChunkId], int, dict], list[Future]]
    mode: str
    rewind_to: Callable[[], int]          # full recovery: roll the store back; the iteration to go on from
    hint: str
    # raise if one of these workers cannot use the store (see Checkpointer.check); None: no store
    check: Callable[[set[str]], None] | None = None

    def place_on(self, workers: set[str]) -> set[str]:
        """``workers``, once they are known to be fit to hold chunks."""
        if self.check is not None:
            self.check(workers)
        return workers


def recover(restore: Restore, watch: ClusterWatch, iteration: int, noticed: float, drift: Drift,
            abandoned: list[str] = (), workers_gone: list[str] = ()) -> RecoveryEvent:
    """Bring every chunk back onto live workers after worker loss, while ``iteration``
    was in flight (its work is abandoned, and so are the keys ``abandoned`` work after
    it makes; ``workers_gone``: workers known gone, besides those that held chunks).
    Returns what was done."""
    chunks, client = restore.chunks, restore.chunks.client
    version = chunks.version
    workers_lost: set[str] = set(workers_gone)
    gone_for_good: set[ChunkId] = set()   # no copy of the current value left: re-created
    lost: set[ChunkId] = set()       # of those, restored from the store (or re-initialised)
    copies: dict[ChunkId, tuple[str, int]] = {}   # the others: from a live worker's older copy
    moved: set[ChunkId] = set()      # taken over from a surviving copy of the current value
    stale = [*(chunks.key(cid, iteration) for cid in chunks.ids), *abandoned]   # what abandoned graphs may make
    while True:
        alive = restore.place_on(live_or_wait(client, restore.hint))
        workers_lost |= {w for w in chunks.owner.values() if w not in alive}
        new_epoch(chunks, stale)
        if restore.mode == "full":
            version = restore.rewind_to()
            lost = set(chunks.ids)
            chunks.owner = place(chunks.ids, sorted(alive))
        else:
            gone = {cid for cid, w in chunks.owner.items() if w not in alive} | set(chunks.lost()) | gone_for_good
            holders = _holders(client, [chunks.futures.get(c) for c in gone - gone_for_good])
            for cid in sorted(gone - gone_for_good):
                live = sorted(set(holders.get(chunks.keys[cid], ())) & alive)
                if live:
                    chunks.owner[cid] = live[0]
                    moved.add(cid)
                else:
                    gone_for_good.add(cid)
                    moved.discard(cid)
            copies = _copies(client, chunks, sorted(gone_for_good), alive, version)
            lost = gone_for_good - set(copies)
            homeless = [cid for cid in sorted(lost) if chunks.owner[cid] not in alive]
            chunks.owner.update(_spread(homeless, chunks.owner, sorted(alive)))
        trends = drift.trends(sorted(lost)) if restore.mode == "partial" else {}
        futures = restore.initialize(sorted(lost), version, trends) if lost else []
        if copies:
            futures += chunks.adopt({cid: worker for cid, (worker, _) in copies.items()}, version)
        stale = [chunks.key(cid, version) for cid in lost | set(copies)]
        try:
            wait_watching(futures, watch, lambda: set(chunks.owner.values()), config.get("iteration-timeout"),
                          restore.hint)
        except Interrupted:
            continue              # another worker went while restoring: start again
        break
    stats: dict[str, int] = {}
    for f in futures:
        for name, value in f.result().items():
            stats[name] = stats.get(name, 0) + value
    del futures
    chunks.advance(version, None if restore.mode == "full" else sorted(lost | set(copies)))
    delta, predicted, c = drift.predict(sorted(lost), {cid: v for cid, (_, v) in copies.items()})
    if restore.mode == "full":
        predicted = float(iteration - 1 - version)   # every iteration since the checkpoint is done again
    drift.reset(sorted(lost))
    return RecoveryEvent(
        iteration=iteration, worker=", ".join(sorted(workers_lost)), lost_chunks=[label(c) for c in sorted(lost)],
        bytes_read=stats.get("bytes", 0), seconds=time.time() - noticed, est_perturbation=delta,
        predicted_extra_iterations=predicted, mode=restore.mode, moved_chunks=[label(c) for c in sorted(moved)],
        reinitialized_blocks=stats.get("never_saved", 0), extrapolated_blocks=stats.get("extrapolated_blocks", 0),
        older_blocks=stats.get("older_blocks", 0),
        peer_chunks=[label(c) for c in sorted(copies)],
        peer_iterations=sum(version - v for _, v in copies.values()), resumed_at=version, contraction=c,
        noticed_at=noticed, retired=bool(workers_lost) and workers_lost <= watch.retired)


def new_epoch(chunks: ParameterChunks, abandoned: list[str]) -> None:
    """Move the run to a new epoch: from now on the scheduler refuses the chunks that
    abandoned work still produces; the keys it already produced (``abandoned``) are let go."""
    chunks.epoch += 1
    set_epoch(chunks.client, chunks.run, chunks.epoch)
    release_keys(chunks.client, abandoned)


def _holders(client: Client, futures: list[Future | None]) -> dict[str, list[str]]:
    """Where copies of these chunks survive (none of those the scheduler forgot), or
    nothing if ``scar.recovery.replicas`` is off."""
    held = [f for f in futures if f is not None and f.status == "finished"]
    if not held or not config.get("recovery.replicas"):
        return {}
    try:
        return client.who_has(held)
    except CancelledError as exc:   # forgotten meanwhile: no copy left
        exc.__traceback__ = None    # (a reference cycle that would hold the futures)
        return {}


#: How long one message to some workers may take (``run_on``): ``Client.run`` waits
#: ``distributed.comm.timeouts.connect`` (30 s) for a worker that died but that the
#: scheduler still lists (two workers without a nanny killed at once: a 30 s recovery
#: in 3 of 6 trials).
RUN_SECONDS = 2.0


def run_on(client: Client, function: Callable, *args, workers: list[str] | None = None,
           seconds: float = RUN_SECONDS) -> dict:
    """``client.run(function, *args, workers=workers, on_error="return")`` (None: every
    worker), asked once more of those still alive where the answers take over
    ``seconds``; empty if they take that long again."""
    for _ in range(2):
        try:
            return client.sync(client._run, function, *args, workers=workers, on_error="return",
                               callback_timeout=seconds)
        except TimeoutError:
            alive = live_workers(client)
            workers = sorted(alive if workers is None else alive & set(workers))
    return {}


def _copies(client: Client, chunks: ParameterChunks, ids: list[ChunkId], alive: set[str],
            newest: int) -> dict[ChunkId, tuple[str, int]]:
    """For chunks with no copy of their current value left: the live worker holding the
    newest copy a contribution task left behind (see :func:`dask_scar.chunks.remember`),
    and its version; nothing if ``scar.recovery.replicas`` is off."""
    if not ids or not config.get("recovery.replicas"):
        return {}
    labels = {cid: cid.tag for cid in ids}
    try:
        offers = run_on(client, seen_versions, chunks.run, list(labels.values()), newest, workers=sorted(alive))
    except Exception:  # noqa: BLE001  (a worker went meanwhile: the store serves)
        logger.debug("could not ask the workers for chunk copies", exc_info=True)
        return {}
    load = {w: sum(1 for o in chunks.owner.values() if o == w) for w in alive}
    found = {}
    for cid, name in labels.items():
        offered = [(versions[name], w) for w, versions in offers.items()
                   if isinstance(versions, dict) and name in versions and w in alive]
        if offered:
            best = max(v for v, _ in offered)
            worker = min((w for v, w in offered if v == best), key=lambda w: (load[w], w))
            load[worker] += 1
            found[cid] = (worker, best)
    return found


def live_or_wait(client: Client, hint: str) -> set[str]:
    """The live workers; with none (all lost, or a batch job's workers not started
    yet), wait ``scar.recovery.wait-for-workers`` seconds for one."""
    check_scheduler(client, hint)
    alive = live_workers(client)
    if alive:
        return alive
    timeout = config.get("recovery.wait-for-workers")
    address = client.scheduler.address
    logger.warning("dask_scar: the cluster of the scheduler at %s has no worker; waiting up to %g s for one to join",
                   address, timeout)
    # nothing queues for a fit that waits: adaptive scaling (adapt(minimum=0)) would start no worker
    waiting = f"waiting-{client.id}"
    asked = say_work(client, waiting, seconds=1.0, most=1, valid_for=timeout)
    deadline = time.monotonic() + timeout
    try:
        while not alive:    # (one that joins may die at once: a nanny's restart of a worker out of memory)
            client.wait_for_workers(1, timeout=max(deadline - time.monotonic(), 0.001))
            alive = live_workers(client)
    except TimeoutError:
        raise WorkerLostError(f"the cluster of the scheduler at {address} has no worker, and none joined within "
                              f"scar.recovery.wait-for-workers={timeout:g}s: start some (cluster.scale(n), or "
                              f"dask worker {address}: a worker whose scheduler went away does not come back "
                              f"to its successor by itself){hint}") from None
    finally:
        if asked:
            say_work(client, waiting, seconds=0.0, most=1, valid_for=0.0)
    return alive


class Interrupted(Exception):
    """A worker holding chunks went away (or a chunk's data died) while waiting."""


#: the KeyboardInterrupt (or subclass: the CLI's SIGTERM) Python ignored in the main thread during a fit
_ignored: list[type[BaseException]] = []


@contextlib.contextmanager
def interruptible():
    """While a fit runs in the main thread, a KeyboardInterrupt that Python ignored
    is noted, and the fit's next wait raises it again. Python ignores exceptions in a
    ``__del__``, and a Ctrl-C lands in one (a dropped Future's) often enough with one
    graph per iteration: the fit went on, about 1 Ctrl-C in 8 in the tests."""
    if threading.current_thread() is not threading.main_thread():
        yield       # (only the main thread gets Ctrl-C)
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            _ignored[:] = [unraisable.exc_type]
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        _ignored.clear()


@contextlib.contextmanager
def ctrl_c_after():
    """In the main thread, a Ctrl-C (SIGINT) pressed during the block, or a SIGTERM
    where Python handles it (the CLI), is handled once the block is done: for short
    clean-up that must not be cut in half (a second Ctrl-C while a stopped fit let go
    of its store left the store named as being written)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [signal.SIGINT] + ([signal.SIGTERM] if callable(signal.getsignal(signal.SIGTERM)) else [])
    pressed: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _: pressed.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else
                          signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        for signum in dict.fromkeys(pressed):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)   # (Python's for SIGINT raises KeyboardInterrupt)
            elif signum == signal.SIGINT and handler != signal.SIG_IGN:
                raise KeyboardInterrupt


def wait_on(client: Client, futures: list[Future], timeout: float | None = None) -> None:
    """``distributed.wait`` for futures of ``client`` (``wait`` itself waits on the
    default client, which may be another, on another cluster, or closed: "IOLoop is
    closed" for a fit on one client after another was closed). First, a Ctrl-C that
    Python ignored during the fit is raised (see :func:`interruptible`)."""
    if _ignored and threading.current_thread() is threading.main_thread():
        raise _ignored.pop()
    client.sync(_wait, futures, timeout=timeout)


def wait_watching(futures: list[Future], watch: ClusterWatch, owners: Callable[[], set[str]], timeout: float,
                  hint: str, progress: Callable[[], bool] | None = None,
                  others: Callable[[], set[str]] = set) -> None:
    """Wait until ``futures`` are done; raise :class:`Interrupted` as soon as one of
    ``owners()`` is removed or a future is cancelled (its input data died with a
    worker), :class:`SchedulerLostError` if the scheduler is gone, or the error of a
    task that failed. ``timeout`` counts from the start, or from the last time
    ``progress()`` (asked between polls) said that work moved on. After 2 s, and every
    2 s, hung workers among ``owners()`` and ``others()`` (the other workers the
    futures run on) are restarted (:meth:`ClusterWatch.restart_hung`).

    ``distributed.wait`` with a short timeout, again and again: it lets go of the
    futures when it times out, where a done-callback would hold a future whose task
    can never run (pinned to a dead worker) for the rest of the client's life.
    """
    client = watch.client
    started = last_look = time.monotonic()
    while True:
        try:
            wait_on(client, futures, timeout=POLL_SECONDS)
            break
        except (CancelledError, TimeoutError) as exc:
            # its traceback sits in a reference cycle that holds the futures until the
            # garbage collector runs: the tasks would outlive the iteration
            exc.__traceback__ = None
            if isinstance(exc, CancelledError):
                break
        if watch.noticed(owners()) is not None:
            raise Interrupted
        now = time.monotonic()
        if progress is not None and progress():
            started = now
        if now - last_look > LOOK_SECONDS:
            # no news for a while: look for ourselves (a scheduler whose plugin predates these events)
            last_look = now
            check_scheduler(client, hint)
            info = workers_info(client)
            if not owners() <= set(info):
                raise Interrupted
            watch.restart_hung(owners() | others())
            stuck = warn_paused(info, owners(), watch.paused)
            if now - started > timeout:
                other = None if stuck else segment_of_another_run(client, [f.key for f in futures])
                if other is None:
                    raise ScarError(f"an iteration took longer than scar.iteration-timeout={timeout:g}s; "
                                    + (pause_advice(stuck) if stuck else hang_advice(watch.hung_after)))
                # another fit's segment holds the workers' threads: this fit waits its turn, not a hang
                logger.warning("dask_scar: this fit's tasks have waited over scar.iteration-timeout=%gs for run %s's "
                               "segment on the same workers to end; it waits on", timeout, other)
                started = now
    for f in futures:
        if f.status == "cancelled":
            check_scheduler(client, hint)
            raise Interrupted
        if f.status == "error":
            # The error ends the fit. Raised, it keeps the frames it passes through, and
            # the future keeps it: its tasks would stay on the cluster for the client's life.
            release_keys(client, [g.key for g in futures])
            f.result()
