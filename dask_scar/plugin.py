"""The scheduler side of dask_scar.

:class:`ScarPlugin` is cheap, touches no storage and never raises out of a hook. It

* lets a worker register a parameter chunk it computed as lineage-free data (the
  ``scar-detach`` stream handler, see :mod:`dask_scar.chunks`), refusing chunks of
  a run's past epoch so that work abandoned by a recovery leaves nothing behind;
* tells drivers about the cluster: when a worker is removed, which ``scar-`` keys
  died with it, and when a worker joins — as events on the ``scar`` topic;
* keeps the Active Memory Manager from dropping copies of parameter chunks (see
  :class:`KeepChunkReplicas`);
* gives fits their turns to run a segment, and tells Dask's adaptive scaling how
  many workers the fits could use (see :class:`ScarPlugin`);
* removes, on a driver's request, a hung worker that its fit waits on.

The scheduler's ``remove_worker`` plugin hook runs only after the lost keys have
been forgotten; the scheduler's own ``remove-worker`` event on the ``all`` topic,
which every plugin sees in :meth:`ScarPlugin.log_event` just before, still names
them. Drivers subscribe to ``scar``, never to ``all``.

Install it with ``client.register_plugin(ScarPlugin())``, with
``dask scheduler --preload dask_scar.preload``, or let :class:`~dask_scar.Trainer`
install it when it is missing.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import math
import re
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable

import dask.config
from dask.utils import parse_timedelta
from distributed import Client
from distributed.active_memory_manager import ReduceReplicas
from distributed.client import ClosedClientError
from distributed.core import Status, rpc
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.metrics import time as heartbeat_clock
from distributed.scheduler import heartbeat_interval

from .chunks import CHUNK_PREFIX, DETACH_OP, PROGRESS_TOPIC, SEGMENT_PREFIX
from .exceptions import ScarError

logger = logging.getLogger(__name__)

CLUSTER_TOPIC = "scar"          # events: a worker was removed (and what it lost), a worker joined
EPOCH_HANDLER = "scar_epoch"    # rpc: a driver moves its run to a new epoch
TURN_HANDLER = "scar_turn"      # rpc: a driver waits for its run's turn to run a segment
TURN_RELEASE_HANDLER = "scar_turn_release"      # rpc: ... and gives it back
WORKLOAD_HANDLER = "scar_workload"  # rpc: a driver says how much work its run has left
HUNG_HANDLER = "scar_hung"      # rpc: a driver asks for the workers it waits on that stopped answering
#: A run waiting for its turn that has not asked again for this long lost its place
#: (its driver asks every :data:`dask_scar.run.TURN_POLL_SECONDS`).
TURN_STALE_SECONDS = 30.0
#: A run that holds the turn with no segment task running for this long loses it (its
#: driver hung: a laptop gone to sleep, a stopped process, whose client is still
#: connected), so that the other runs go on.
TURN_IDLE_SECONDS = 30.0
#: How long a hung worker's nanny may take to answer and kill it before the worker is
#: removed without it, and how long the process gets to stop before its SIGKILL.
NANNY_KILL_SECONDS = 10.0
NANNY_GRACE_SECONDS = 1.0
ENDED_RUNS = 4096               # ended runs the plugin remembers, to refuse their late chunks


_handlers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # client -> topic -> _Topic
_handlers_lock = threading.Lock()


#: How long :func:`subscribe` waits for the scheduler to take a subscription in.
SUBSCRIBE_SECONDS = 10.0


def _wait_subscribed(client: Client, topic: str) -> None:
    """Until the scheduler lists ``client`` among ``topic``'s subscribers (given up
    after :data:`SUBSCRIBE_SECONDS`, or at once where it cannot tell)."""
    if client.asynchronous:
        return
    deadline = time.monotonic() + SUBSCRIBE_SECONDS
    while not client.run_on_scheduler(_subscribed, topic, client.id) and time.monotonic() < deadline:
        time.sleep(0.01)


def _subscribed(topic: str, client: str, dask_scheduler=None) -> bool:
    """Whether the scheduler lists ``client`` among ``topic``'s subscribers; True where
    it cannot tell (Dask's broker is not part of its API, and may change)."""
    topics = getattr(getattr(dask_scheduler, "_broker", None), "_topics", None)
    if not isinstance(topics, dict):
        return True
    entry = topics.get(topic)
    subscribers = getattr(entry, "subscribers", None) if entry is not None else ()
    return subscribers is None or client in subscribers


def subscribe(client: Client, topic: str, handler: Callable[[tuple[float, Any]], None]) -> Callable[[], None]:
    """Call ``handler((timestamp, event))`` on the client's event loop for every event of ``topic``;
    returns the function that stops it. A Client keeps one handler per topic, which a
    second subscription replaces (two fits at once on one client lost each other's
    events that way): this subscribes each client once per topic and hands every
    event to all of its subscribers. It returns once the scheduler has the
    subscription (Dask sends it on without waiting): an event published after that
    reaches ``handler``."""
    token = object()
    with _handlers_lock:
        topics = _handlers.setdefault(client, {})
        entry = topics.get(topic)
        new = entry is None
        if new:
            entry = topics[topic] = _Topic()

            def dispatch(event, entry=entry):      # (on the client's event loop: takes no lock)
                for _, each in entry.handlers:
                    each(event)

            client.subscribe_topic(topic, dispatch)
        entry.handlers = (*entry.handlers, (token, handler))

    def stop() -> None:
        with _handlers_lock:    # (unsubscribing inside: before any later subscription reaches the scheduler)
            before = entry.handlers
            entry.handlers = tuple(pair for pair in before if pair[0] is not token)
            if len(entry.handlers) == len(before) or entry.handlers or topics.get(topic) is not entry:
                return
            del topics[topic]
            with contextlib.suppress(ValueError, ClosedClientError):    # (a closed client has none)
                client.unsubscribe_topic(topic)

    # (waited for outside the lock: dispatch runs on the loop that the wait needs)
    try:
        if new:
            try:
                _wait_subscribed(client, topic)
            finally:
                entry.confirmed.set()
        else:
            entry.confirmed.wait(SUBSCRIBE_SECONDS)
    except BaseException:       # (Ctrl-C): the handler goes again
        stop()
        raise
    return stop


class _Topic:
    """A client's subscription to a topic: its handlers, as a tuple that a change
    replaces (so that dispatch reads them without a lock), and whether the scheduler
    has it yet."""

    def __init__(self) -> None:
        self.handlers: tuple[tuple[object, Callable], ...] = ()
        self.confirmed = threading.Event()


SCHEDULER_LOG = logging.getLogger("distributed.scheduler")
_LOST_DATA = re.compile(r"(Removing worker .*) caused the cluster to lose scattered data, which can't be "
                        r"recovered: (\{.*\}) (\(stimulus_id=.*\))$", re.DOTALL)


def chunk_loss_note(record: logging.LogRecord) -> bool:
    """A filter of the scheduler's log, while :class:`ScarPlugin` runs there. When a
    removed worker held data with no other copy, the scheduler logs an ERROR: "caused
    the cluster to lose scattered data, which can't be recovered". Where all of it is
    parameter chunks, which dask_scar's trainers restore, that ERROR is expected and
    wrong: it becomes an INFO record that says so."""
    if record.levelno != logging.ERROR or record.args or not isinstance(record.msg, str):
        return True
    match = _LOST_DATA.match(record.msg)
    if match is None:
        return True
    try:
        keys = ast.literal_eval(match[2])
    except (ValueError, SyntaxError):
        return True
    if not keys or not all(isinstance(k, str) and k.startswith(CHUNK_PREFIX) for k in keys):
        return True
    record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
    record.msg = (f"{match[1]} lost {len(keys)} dask_scar parameter chunk(s) held nowhere else: "
                  f"{sorted(keys)}; their trainer restores them {match[3]}")
    return logging.getLogger(record.name).isEnabledFor(logging.INFO)


class KeepChunkReplicas(ReduceReplicas):
    """Dask's ``ReduceReplicas`` policy of the Active Memory Manager, except for chunks.

    Every 2 s, by default, the AMM drops all but one copy of each key, choosing the
    worker with the most memory in use -- for a chunk, often its owner. The owner's
    next update then fetches the chunk back over the network, and a worker killed
    later takes with it chunks the driver believes live elsewhere (seen on a GPU
    run: 4 chunks lost with a worker that owned 2). Copies of a chunk exist only
    where a contribution read it, and go with its version one iteration later;
    they are the copies recovery takes over first.
    """

    def run(self):
        suggestions = super().run()
        answer = None
        while True:
            try:
                suggestion = suggestions.send(answer)
            except StopIteration:
                return
            answer = None if str(suggestion.ts.key).startswith(CHUNK_PREFIX) else (yield suggestion)


class ScarPlugin(SchedulerPlugin):
    """Scheduler plugin of dask_scar (``name = "scar"``; installing it twice is a no-op).

    Events on the ``scar`` topic are dicts with ``action`` ``"remove-worker"``
    (``worker``, ``lost``: the ``scar-`` keys that had no other copy, ``expected``:
    True for a graceful retirement, ``stimulus_id``, ``time``) or ``"add-worker"``
    (``worker``, ``time``).

    It also gives runs their *turns*: one run's segment at a time on the cluster (a
    segment's task on each worker waits for the others' at every iteration, so two
    runs' segments, each first on some workers' only thread, would wait for each
    other). A run's turn and its place in the queue go when its driver gives them
    back, when the run ends, when the driver's client goes, when no segment task of
    the run has run for :data:`TURN_IDLE_SECONDS` (a turn), and (a place) when its
    driver stops asking for :data:`TURN_STALE_SECONDS`.

    And it tells Dask's adaptive scaling (``cluster.adapt``) about the fits' work. A
    fit keeps one task per worker busy, so nothing queues and Dask would never add a
    worker for it. Each run's driver says every few seconds how many worker-seconds
    its remaining iterations would take, and how many workers its rows could use at
    most; the scheduler's ``adaptive_target`` asks for enough workers to do the runs'
    work in ``distributed.adaptive.target-duration`` (adapt's ``target_duration``),
    as Dask does for queued tasks, at most the most any run could use. The work of
    a run goes when the run ends, when its client goes, and when its driver has not
    said it again for as long as it asked.

    And it restarts, on a driver's request, a worker that the driver's fit waits on
    and that has sent no heartbeat for the driver's ``scar.recovery.hung-worker``:
    what Dask does only after ``distributed.scheduler.worker-ttl`` (5 minutes), for
    every worker.

    Examples
    --------
    >>> client.register_plugin(ScarPlugin())   # doctest: +SKIP
    >>> stop = subscribe(client, "scar", print)  # doctest: +SKIP

    (Not ``client.subscribe_topic``: a Client keeps one handler per topic, and a
    new one replaces the trainer's.)
    """

    name = "scar"
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.detached = 0   # chunks registered, for diagnostics
        self.rejected = 0   # chunks refused because their run moved to a newer epoch
        self.epochs: dict[str, tuple[int, str | None]] = {}  # run -> (epoch, its driver's client)
        self.ended: OrderedDict[str, None] = OrderedDict()   # the last ENDED_RUNS runs that ended
        self.turn: str | None = None                # the run whose segment runs
        self.waiting: dict[str, tuple[str, float]] = {}   # runs waiting, in order -> (client, when last asked)
        self.turn_client: str | None = None         # the client of the run that has the turn
        self.turn_busy = 0.0                        # when a segment task of that run last ran (or it got the turn)
        self._turn_changed: asyncio.Event | None = None
        self.workloads: dict[str, tuple[str, float, int, float]] = {}   # run -> (client, worker-seconds left,
        #                                                                  most workers, until: monotonic)
        self._adaptive_target: Callable | None = None      # the scheduler's own
        self.restarting: set[str] = set()           # hung workers being restarted
        self._restarts: set[asyncio.Task] = set()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._turn_changed = asyncio.Event()
        scheduler.stream_handlers[DETACH_OP] = self._detach
        scheduler.handlers[EPOCH_HANDLER] = self._set_epoch
        scheduler.handlers[TURN_HANDLER] = self._take_turn
        scheduler.handlers[TURN_RELEASE_HANDLER] = self._release_turn
        scheduler.handlers[WORKLOAD_HANDLER] = self._set_workload
        scheduler.handlers[HUNG_HANDLER] = self._restart_hung
        # Adaptive scaling asks the scheduler's adaptive_target: Dask's Adaptive through the
        # handler, Kubernetes' operator through the HTTP API, which calls the attribute.
        # (Dask's unregister_scheduler_plugin does not close a plugin: a removed one's is replaced)
        previous = getattr(scheduler.adaptive_target, "__self__", None)
        self._adaptive_target = (previous._adaptive_target if isinstance(previous, ScarPlugin)
                                 else scheduler.adaptive_target)
        scheduler.adaptive_target = scheduler.handlers["adaptive_target"] = self.adaptive_target
        self._swap_policies(ReduceReplicas, KeepChunkReplicas)
        SCHEDULER_LOG.addFilter(chunk_loss_note)

    async def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stream_handlers.pop(DETACH_OP, None)
            for handler in (EPOCH_HANDLER, TURN_HANDLER, TURN_RELEASE_HANDLER, WORKLOAD_HANDLER, HUNG_HANDLER):
                self.scheduler.handlers.pop(handler, None)
            if vars(self.scheduler).get("adaptive_target") == self.adaptive_target:
                del self.scheduler.adaptive_target
                self.scheduler.handlers["adaptive_target"] = self.scheduler.adaptive_target
            self._swap_policies(KeepChunkReplicas, ReduceReplicas)
            SCHEDULER_LOG.removeFilter(chunk_loss_note)

    def _swap_policies(self, old: type, new: type) -> None:
        """Replace the Active Memory Manager's policies of exactly type ``old`` by ``new``."""
        amm = self.scheduler.extensions.get("amm")
        for policy in list(getattr(amm, "policies", ())):
            if type(policy) is old:
                amm.policies.remove(policy)
                amm.add_policy(new())

    # -- hooks -----------------------------------------------------------------------
    def log_event(self, topic: str, msg: Any) -> None:
        if topic != "all" or not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        try:
            lost = sorted(k for k in (*msg.get("lost-scattered-tasks", ()), *msg.get("lost-computed-tasks", ()))
                          if isinstance(k, str) and k.startswith("scar-"))
            self.scheduler.log_event(CLUSTER_TOPIC, {
                "action": "remove-worker", "worker": msg.get("worker"), "lost": lost,
                "expected": bool(msg.get("expected")), "stimulus_id": msg.get("stimulus_id"), "time": time.time()})
        except Exception:  # never raise out of a scheduler hook
            logger.exception("dask_scar: could not report the removal of worker %s", msg.get("worker"))

    def remove_client(self, scheduler: Any, client: str) -> None:
        for run in [run for run, (_, owner) in self.epochs.items() if owner == client]:
            del self.epochs[run]        # (the scheduler let go of its chunks: none is current any more)
        for run in [run for run, (owner, _) in self.waiting.items() if owner == client]:
            self._release_turn(run)
        for run in [run for run, work in self.workloads.items() if work[0] == client]:
            del self.workloads[run]
        if self.turn is not None and self.turn_client == client:
            self._release_turn(self.turn)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        try:
            self.scheduler.log_event(CLUSTER_TOPIC, {"action": "add-worker", "worker": worker, "time": time.time()})
        except Exception:  # never raise out of a scheduler hook
            logger.exception("dask_scar: could not report the arrival of worker %s", worker)

    # -- handlers --------------------------------------------------------------------
    async def _take_turn(self, run: str, client: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``run``'s turn (first come, first served);
        True once it has it. A run that waited in vain keeps its place while its driver
        asks again."""
        if self.turn == run:
            return True
        self._check_idle_turn()
        if run in self.ended or client not in self.scheduler.clients:
            return False        # a request that came after its run ended, or its client went: no turn
        self.waiting[run] = (client, time.monotonic())
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            for stale in [r for r, (_, asked) in self.waiting.items() if now - asked > TURN_STALE_SECONDS]:
                del self.waiting[stale]
            if run not in self.waiting:
                return False        # given back meanwhile (the run ended)
            if self.turn is None and next(iter(self.waiting)) == run:
                del self.waiting[run]
                if client not in self.scheduler.clients:
                    return False    # it went while it waited
                self.turn, self.turn_client, self.turn_busy = run, client, time.monotonic()
                return True
            changed = self._turn_changed
            try:
                await asyncio.wait_for(changed.wait(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return False

    def _check_idle_turn(self) -> None:
        """Take the turn back from a run none of whose segment tasks has run for
        :data:`TURN_IDLE_SECONDS` (asked while other runs wait)."""
        if self.turn is None:
            return
        now, prefix = time.monotonic(), f"{SEGMENT_PREFIX}{self.turn}-"
        if any(str(ts.key).startswith(prefix) for ws in self.scheduler.workers.values() for ts in ws.processing):
            self.turn_busy = now
        elif now - self.turn_busy > TURN_IDLE_SECONDS:
            logger.warning("dask_scar: run %s has held the segment turn for %.0f s without running a segment (is its "
                           "driver hung?): the turn goes to the next run", self.turn, now - self.turn_busy)
            self._release_turn(self.turn)

    def _release_turn(self, run: str) -> None:
        """``run`` gives back its turn, or its place in the queue."""
        self.waiting.pop(run, None)
        if self.turn == run:
            self.turn = self.turn_client = None
        self._turn_changed.set()
        self._turn_changed = asyncio.Event()

    def _set_workload(self, run: str, client: str, seconds: float, most: int, valid_for: float) -> bool:
        """``run``'s remaining iterations would take its workers ``seconds`` (summed over
        them), and its rows could use at most ``most`` workers; it says so again within
        ``valid_for`` seconds, or no longer counts (at once: 0). True: heard (a
        scheduler without this handler answers None)."""
        if valid_for <= 0:
            self.workloads.pop(run, None)
        elif run not in self.ended and client in self.scheduler.clients:
            self.workloads[run] = (client, float(seconds), int(most), time.monotonic() + valid_for)
        return True

    def wanted(self, target_duration: Any = None) -> int:
        """The workers that would do the runs' remaining work in ``target_duration``
        (default ``distributed.adaptive.target-duration``), at most the most any run
        could use; 0 without runs."""
        now = time.monotonic()
        for run in [run for run, (_, _, _, until) in self.workloads.items() if until < now]:
            del self.workloads[run]
        if not self.workloads:
            return 0
        if target_duration is None:
            target_duration = dask.config.get("distributed.adaptive.target-duration")
        seconds = sum(work[1] for work in self.workloads.values())
        most = max(work[2] for work in self.workloads.values())
        return min(most, math.ceil(seconds / parse_timedelta(target_duration)))

    def adaptive_target(self, target_duration: Any = None) -> int:
        """The scheduler's ``adaptive_target``, raised to :meth:`wanted`."""
        target = self._adaptive_target(target_duration)
        try:
            return max(target, self.wanted(target_duration))
        except Exception:  # never fail the scheduler's own answer
            logger.exception("dask_scar: could not add the fits' work to the adaptive target")
            return target

    def _restart_hung(self, workers: list[str], after: float) -> dict[str, float]:
        """Restart each of ``workers`` that has sent no heartbeat for ``after`` seconds
        (at least ten heartbeats, as Dask's ``worker-ttl``): see :meth:`_restart`.
        Returns them, each with how long it has been silent (those already restarting
        too). It does not wait for the restarts."""
        try:
            after = max(after, 10 * heartbeat_interval(len(self.scheduler.workers)))
            hung = self._silent(workers, after)
            new = sorted(set(hung) - self.restarting)
            if new:
                logger.warning("dask_scar: worker(s) %s sent no heartbeat for %s s (more than %.1f s), and a fit "
                               "waits for them: restarting them", ", ".join(new),
                               ", ".join(f"{hung[w]:.1f}" for w in new), after)
                self.restarting.update(new)
                task = asyncio.create_task(self._restart(new, after))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)
            return hung
        except Exception:  # never raise out of a scheduler handler
            logger.exception("dask_scar: could not look for hung workers among %s", workers)
            return {}

    def _silent(self, workers: list[str], after: float) -> dict[str, float]:
        """Those of ``workers`` that have sent no heartbeat for ``after`` seconds, with how long."""
        now = heartbeat_clock()
        return {w: now - ws.last_seen for w in workers
                if (ws := self.scheduler.workers.get(w)) is not None and now - ws.last_seen > after}

    async def _restart(self, workers: list[str], after: float) -> None:
        """As Dask's ``restart_workers``: the nannies of ``workers`` kill their processes
        and start new ones (the scheduler removes a worker when its process is gone);
        workers with no nanny, whose nanny does not answer (a machine that froze whole),
        or that are being retired are removed, and told to close should they wake. A
        hung process gets :data:`NANNY_GRACE_SECONDS` to stop before its SIGKILL (Dask's
        restart waits 4 s). Those that sent a heartbeat meanwhile are left alone."""
        scheduler, stimulus_id = self.scheduler, f"scar-hung-worker-{time.time()}"
        try:
            states = {w: scheduler.workers[w] for w in sorted(self._silent(workers, after))}
            nannies = {w: ws.nanny for w, ws in states.items() if ws.nanny and ws.status != Status.closing_gracefully}
            for worker in sorted(set(states) - set(nannies)):
                await scheduler.remove_worker(worker, stimulus_id=stimulus_id)
            answers = await asyncio.gather(*(self._kill(nanny, stimulus_id) for nanny in nannies.values()),
                                           return_exceptions=True)
            for worker, answer in zip(nannies, answers):
                # (the same worker, still silent: not one that woke, nor a new process at its address)
                if answer is not None and scheduler.workers.get(worker) is states[worker] \
                        and self._silent([worker], after):
                    logger.warning("dask_scar: the nanny of hung worker %s did not kill it (%r): removing it",
                                   worker, answer)
                    await scheduler.remove_worker(worker, stimulus_id=stimulus_id)
        except Exception:  # noqa: BLE001
            logger.exception("dask_scar: could not restart hung worker(s) %s", workers)
        finally:
            self.restarting.difference_update(workers)

    async def _kill(self, nanny: str, reason: str) -> None:
        async with rpc(nanny, connection_args=self.scheduler.connection_args) as comm:
            await asyncio.wait_for(comm.kill(timeout=NANNY_GRACE_SECONDS, reason=reason), NANNY_KILL_SECONDS)

    def _set_epoch(self, run: str, epoch: int | None, client: str | None = None) -> None:
        """From then on, refuse chunks of ``run`` from an older epoch. ``None``: the run
        ended; refuse all of its chunks, and let go of every one its driver's ``client``
        still wants (the iteration in flight when the fit was interrupted registers its
        chunks after the driver has stopped waiting for them)."""
        if epoch is not None:
            self.epochs[run] = (max(epoch, self.epochs.get(run, (epoch,))[0]), client)
            return
        self._release_turn(run)
        self.workloads.pop(run, None)
        self.epochs.pop(run, None)
        self.ended[run] = None
        while len(self.ended) > ENDED_RUNS:
            self.ended.popitem(last=False)
        if client in self.scheduler.clients:
            prefix = f"{CHUNK_PREFIX}{run}-"
            keys = [key for key in self.scheduler.tasks if isinstance(key, str) and key.startswith(prefix)]
            if keys:
                self.scheduler.client_releases_keys(keys, client, stimulus_id=f"scar-run-ended-{time.time()}")

    def _detach(self, worker: str, who_has: dict, nbytes: dict, client: str, run: str = "", epoch: int = 0,
                progress: list[dict] = (), **kwargs: Any) -> None:
        """Register chunks a worker holds as data wanted by the driver's ``client``;
        publish ``progress`` (iterations' losses) for the driver."""
        try:
            scheduler = self.scheduler
            current = run not in self.ended and epoch >= self.epochs.get(run, (epoch,))[0]
            if current and worker in scheduler.workers and client in scheduler.clients:
                scheduler.update_data(who_has=who_has, nbytes=nbytes, client=client)
                self.detached += len(who_has)
                for event in progress:
                    scheduler.log_event(PROGRESS_TOPIC, event)
                return
            # Abandoned work, or the driver is gone, or the worker is leaving: nobody will
            # ever ask for these chunks, so let the worker free them instead of keeping them.
            self.rejected += len(who_has)
            stream = scheduler.stream_comms.get(worker)
            if stream is not None:
                stream.send({"op": "free-keys", "keys": list(who_has), "stimulus_id": f"scar-orphan-{time.time()}"})
        except Exception:  # never raise out of a scheduler handler
            logger.exception("dask_scar: could not register chunks %s from %s", list(who_has), worker)


def ensure_plugin(client: Client) -> None:
    """Install :class:`ScarPlugin` on the client's scheduler unless it is there already."""
    try:
        present = client.run_on_scheduler(lambda dask_scheduler: ScarPlugin.name in dask_scheduler.plugins)
        if not present:
            client.register_plugin(ScarPlugin())
    except ImportError as exc:      # raised by the scheduler, which could not unpickle the plugin
        raise ScarError(f"the scheduler at {client.scheduler.address} cannot import dask_scar ({exc}): install "
                        "dask-scar, the same version as here, on the scheduler and on every worker") from None


def say_work(client: Client, run: str, seconds: float, most: int, valid_for: float) -> bool:
    """Tell the scheduler that ``run``'s remaining work would take ``seconds`` of its
    workers' time, on at most ``most`` workers, for the next ``valid_for`` seconds
    (see :class:`ScarPlugin`); False where the scheduler's plugin takes no work (an
    older dask-scar: the scheduler logs a warning for every such call, and answers
    None). Raises nothing, and a call that failed counts as heard (the next one may
    not fail): the work is only a hint to adaptive scaling."""
    try:
        return client.sync(client.scheduler.scar_workload, run=run, client=client.id, seconds=seconds, most=most,
                           valid_for=valid_for) is not None
    except Exception:  # noqa: BLE001
        logger.debug("could not tell the scheduler the work of run %s", run, exc_info=True)
        return True


def restart_hung(client: Client, workers: set[str], after: float) -> dict[str, float] | None:
    """Ask the scheduler to restart those of ``workers`` that have sent it no heartbeat
    for ``after`` seconds (see :class:`ScarPlugin`); returns them, each with its
    silence in seconds. None: the scheduler's plugin does not do it (an older
    dask-scar). Raises nothing: a call that failed found none."""
    try:
        return client.sync(client.scheduler.scar_hung, workers=sorted(workers), after=after)
    except Exception:  # noqa: BLE001
        logger.debug("could not ask the scheduler for hung workers among %s", workers, exc_info=True)
        return {}


def segment_of_another_run(client: Client, keys: list[str]) -> str | None:
    """The run, not one of ``keys``' own, whose segment runs now on a worker that one of
    ``keys``' tasks (or its inputs' tasks) waits on: a segment's tasks hold their
    workers' threads for the segment's length, and other fits' tasks queue behind them.
    None if there is none, or the scheduler cannot tell."""
    try:
        return client.run_on_scheduler(_segment_of_another_run, list(keys))
    except Exception:  # noqa: BLE001
        logger.debug("could not ask the scheduler for other runs' segments", exc_info=True)
        return None


def _run_of(key: str) -> str:
    return key.split("-")[2]       # scar-<kind>-<run>-...


def _segment_of_another_run(keys: list[str], dask_scheduler=None) -> str | None:
    runs = {_run_of(key) for key in keys if key.startswith("scar-") and key.count("-") >= 2}
    waiting = [dask_scheduler.tasks.get(key) for key in keys]
    for ts in [t for w in waiting if w is not None for t in (w, *w.dependencies)]:
        ws = ts.processing_on
        if ws is None or ts.state != "processing":
            continue
        for other in ws.processing:
            key = str(other.key)
            if key.startswith(SEGMENT_PREFIX) and _run_of(key) not in runs:
                return _run_of(key)
    return None


def set_epoch(client: Client, run: str, epoch: int | None) -> None:
    """Tell the scheduler that ``run`` is at ``epoch``: chunks from older epochs are
    refused (``None``: the run ended, all of them are, and the client lets go of them)."""
    client.sync(client.scheduler.scar_epoch, run=run, epoch=epoch, client=client.id)
