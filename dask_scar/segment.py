"""Segments: many iterations in one task per worker, the workers exchanging their
contributions directly.

An iteration graph (:mod:`dask_scar.iteration`) goes through the scheduler every
iteration: a worker's task ends, the scheduler hears of it and tells the other
worker, which fetches the result and starts its next task. On two shared cores
that cost 25-35 ms of CPU and 10 ms of waiting per iteration, against a kernel of
~20 ms at 200k rows. Where every update task updates every chunk (the gradient
models, see :func:`dask_scar.iteration.replicates`), each worker can instead run
one long task for a *segment* of iterations: it computes its blocks'
contributions, sends them to every other worker of the segment (pickled, the arrays
as frames of their own, on a connection held for the segment, filed by the receiver's
:data:`PUSH_OP` handler, see :class:`_Outbox`), takes theirs, and updates every chunk
itself, in the same order everywhere, so all replicas agree exactly.

A fit's first segment ends after ``scar.segment-iterations`` iterations; a later one
after as many, or as many as took :data:`dask_scar.run.SEGMENT_SECONDS` in the one
before where that is more (at most :data:`~dask_scar.run.SEGMENT_MOST`); or where the
loss converged to ``tol`` (every worker sees the same loss, so all stop at the same
iteration). Checkpoint rounds do not end it: after a due iteration every worker sends
its chunks' priorities with its next message, all choose the round's blocks as the
driver does, and each writes its own while it waits for the others (see
:func:`run_segment`). Only at the end does each worker register its own chunks' newest
version with the scheduler (:func:`dask_scar.chunks.detach`). Every iteration it notes its
progress (the loss and every chunk's step, so the driver hears all of them as long as
one worker lives) and remembers its copies of every chunk
(:func:`dask_scar.chunks.remember`). The progress goes to the driver with the segment's
end, when the driver stops the segment, and at least every :data:`PROGRESS_SECONDS`: one
event per iteration per worker cost the scheduler's process 1-2 ms of CPU per iteration,
and each worker ~0.5 ms. When a worker dies during a segment, the driver
tells the others to stop (:func:`abort`), takes over the last version all survivors
reached from their copies, and recovers from there: the work lost is the iteration in
flight, as with iteration graphs. When the run ends while a segment runs (the driver
was interrupted), :func:`forget` stops its tasks the same way; when the driver dies,
each task stops once the scheduler has released it (:func:`_released`). While a
segment runs, its worker's statistical profiler is paused and its event-loop health
check slowed (:func:`_pause`): both hold the GIL the training thread needs. Its
process's allocator keeps freed memory for the next iteration meanwhile
(:func:`_hold_freed_memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from dask._task_spec import Dict, List, Task, TaskRef
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import parse_timedelta
from distributed import get_worker
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol import pickle
from distributed.protocol.serialize import Serialized, register_serialization_family
from distributed.utils import ensure_memoryview
from distributed.worker import thread_state

from . import checkpoint, chunks, config
from .chunks import SEGMENT_PREFIX, Chunk, ChunkId, chunk_key, detach, flatten, remember
from .exceptions import ScarError
from .iteration import contribute, step
from .models import Model
from .policy import CheckpointPolicy
from .store import BlockLayout

logger = logging.getLogger(__name__)

PUSH_OP = "scar_segment_push"   # worker handler: a message for a segment running here
FRAMES = "scar-frames"          # serializer of a message: its frames, handed over as they arrive
POLL_SECONDS = 0.05
PROGRESS_SECONDS = 1.0          # a segment sends its iterations' progress at least this often

_box: dict[tuple[str, int, int, str], list] = {}   # (run, epoch, iteration, sender) -> its message's frames
_aborted: set[tuple[str, int]] = set()             # (run, epoch) whose segments must stop
_cond = threading.Condition()
_running = 0                                       # segments running in this process
_paused: dict[str, Any] = {}                       # what _pause changed, for _resume
#: The event-loop health check's interval while segments run (Dask's default is 20 ms):
#: the quiet settings' (:data:`dask_scar.config.QUIET`).
TICK_MS = parse_timedelta(config.QUIET["distributed.admin.tick.interval"]) * 1000


class SegmentAborted(ScarError):
    """A segment stopped before its end: the driver aborted its epoch (another worker
    of it died), or its run is over (``run_over``: the run ended, or the scheduler
    released the task because the driver is gone)."""

    def __init__(self, message: str, run_over: bool):
        super().__init__(message)
        self.run_over = run_over


def _pickled(message: Any) -> Serialized:
    """``message`` pickled, each contiguous array a frame of its own: the array's
    memory, not a copy."""
    buffers = []
    head = pickle.dumps(message, buffer_callback=buffers.append)
    return Serialized({"serializer": FRAMES}, [head, *map(ensure_memoryview, buffers)])


def _unpickled(frames: list) -> Any:
    """The message of :func:`_pickled`'s frames (its arrays read from the frames' memory)."""
    return pickle.loads(frames[0], buffers=frames[1:])


def _frames(header: dict, frames: list) -> list:
    """Dask's deserializer of :data:`FRAMES`: the frames as they are."""
    return list(frames)


register_serialization_family(FRAMES, None, _frames)


def _receive(key: tuple | None = None, value: Any = None) -> None:
    """The :data:`PUSH_OP` handler (on the worker's event loop): file a message's frames."""
    run, epoch, _, _ = key = tuple(key)
    with _cond:
        if (run, epoch) not in _aborted and not chunks.ended(run):
            _box[key] = value
            _cond.notify_all()


class SegmentHandler(WorkerPlugin):
    """Installs the :data:`PUSH_OP` handler on every worker, present and future."""

    name = "scar-segments"
    idempotent = True

    def setup(self, worker) -> None:
        worker.handlers[PUSH_OP] = _receive


def abort(run: str, epoch: int) -> None:
    """Run on workers: stop the segments of ``run``'s ``epoch`` and drop what came for them."""
    with _cond:
        _aborted.add((run, epoch))
        for key in [k for k in _box if k[0] == run and k[1] <= epoch]:
            del _box[key]
        _cond.notify_all()


def forget(run: str) -> None:
    """Run on the workers when ``run`` ends, however it ends: a segment of it still
    running (the driver was interrupted) stops at its next exchange. Dask cannot stop
    a running task; left alone, it would run its remaining iterations on the thread
    the next fit needs. The run's chunk copies go too (:func:`dask_scar.chunks.forget`,
    which records that it ended), and so do the values kept for its checkpoint rounds
    (:func:`dask_scar.checkpoint.forget`)."""
    with _cond:
        chunks.forget(run)
        for key in [k for k in _box if k[0] == run]:
            del _box[key]
        _aborted.difference_update({a for a in _aborted if a[0] == run})
        _cond.notify_all()
    checkpoint.forget(run)


class _Outbox:
    """A segment's messages to its peers. The training thread pickles a message, its
    arrays out of band (the receiving one unpickles it, in :func:`_take`); per peer,
    one coroutine on the event loop writes them in order on one connection from the
    worker's pool, held for the whole segment, and asks no reply. Every step of a
    message on an event loop keeps that worker's training thread waiting for the GIL:
    with Dask's serialization, a pooled rpc per message and its reply, a 4 KB message
    took ~1.4 ms of the two event loops' time. The arrays go as frames of their own,
    written from their memory and read into the receiver's buffer: no copy in pickle or
    msgpack (with 4 MB messages those copies took ~12 ms of a worker's CPU per
    iteration, over half on its event loop). A contribution must not change once
    made: it is written after :meth:`send` returns."""

    def __init__(self, worker, peers: list[str]):
        self.worker = worker
        self.queues = {address: asyncio.Queue() for address in peers}
        for address, queue in self.queues.items():
            worker.loop.add_callback(self._post, address, queue)

    def send(self, key: tuple, message: dict) -> None:
        if not self.queues:
            return      # a segment of one worker: nothing to pickle (on a GPU, to copy to the host)
        payload = _pickled(message)
        for queue in self.queues.values():
            self.worker.loop.add_callback(queue.put_nowait, {"op": PUSH_OP, "reply": False, "key": key,
                                                             "value": payload})

    def close(self) -> None:
        """Once the messages sent so far are written, give the connections back."""
        for queue in self.queues.values():
            self.worker.loop.add_callback(queue.put_nowait, None)

    async def _post(self, address: str, queue: asyncio.Queue) -> None:
        pool, comm = self.worker.rpc, None
        try:
            while (message := await queue.get()) is not None:
                comm = comm or await pool.connect(address)
                await comm.write(message)
        except Exception:  # noqa: BLE001  (a dead peer: the driver aborts the segment)
            logger.debug("dask_scar: could not send a segment's message to %s", address, exc_info=True)
            if comm is not None:
                comm.abort()
        finally:
            if comm is not None:
                pool.reuse(address, comm)


def _pause(worker) -> None:
    """(On the event loop) pause the worker's statistical profiler and slow its event-loop
    health check. A segment keeps its thread busy for many iterations: the profiler
    would sample it every 10 ms, and the check run every 20 ms, each holding the GIL
    the training thread needs (on 2 cores at 1M rows, 19 and 8 ms of the worker's
    loop per second, see benchmarks/bench_loops.py). What the profiler would see is
    the kernel; the check still reports a loop blocked for seconds."""
    profiler = worker.periodic_callbacks.get("profile")
    _paused["profiler"] = profiler is not None and profiler.is_running()
    if _paused["profiler"]:
        profiler.stop()
    tick = worker.periodic_callbacks.get("tick")
    if tick is not None:
        _paused["tick"] = tick.callback_time
        tick.callback_time = max(tick.callback_time, TICK_MS)


def _resume(worker) -> None:
    """(On the event loop) undo :func:`_pause`."""
    if _paused.pop("profiler", False):
        worker.periodic_callbacks["profile"].start()
    if "tick" in _paused:
        worker.periodic_callbacks["tick"].callback_time = _paused.pop("tick")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters


@functools.cache
def _glibc() -> tuple | None:
    """glibc's ``mallopt`` and ``malloc_trim``; None where the C library is another."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _hold_freed_memory(hold: bool) -> None:
    """While segments run (``hold``), glibc's allocator serves arrays up to 32 MB from
    its heap and keeps what is freed there; afterwards, Dask's settings again, and the
    freed memory goes back to the system (``malloc_trim``).

    Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also fixes
    glibc's mmap threshold at 128 KB: each larger array is a memory map of its own,
    zeroed page by page by the kernel when first touched and unmapped when freed. A
    segment makes and frees arrays the size of the model every iteration (the
    contributions, the messages, the update), so that with a 1M-parameter model and
    512 rows per worker, half of an iteration went to it (80 against 41 ms, 2 workers
    on 2 cores). Nothing changes where that variable is not set (glibc then raises its
    threshold itself) or where the C library is not glibc."""
    try:
        trim = int(os.environ["MALLOC_TRIM_THRESHOLD_"])
        mmap = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 128 << 10))     # glibc's default
    except (KeyError, ValueError):
        return
    if (glibc := _glibc()) is None:
        return
    mallopt, malloc_trim = glibc
    if hold:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    else:
        mallopt(_M_MMAP_THRESHOLD, mmap)
        mallopt(_M_TRIM_THRESHOLD, trim)
        malloc_trim(0)


@contextlib.contextmanager
def _hushed(worker):
    """Dask's periodic work that a segment does not need, paused while segments run in
    this worker (:func:`_pause`; several at once pause it once), and freed memory
    held for reuse (:func:`_hold_freed_memory`)."""
    global _running
    with _cond:
        _running += 1
        if _running == 1:
            worker.loop.add_callback(_pause, worker)
            _hold_freed_memory(True)
    try:
        yield
    finally:
        with _cond:
            _running -= 1
            if _running == 0:
                worker.loop.add_callback(_resume, worker)
                _hold_freed_memory(False)


@contextlib.contextmanager
def _handing_over():
    """However a segment's task ends (an error too): the checkpoint writes it left to
    itself and did not get to go to the writer thread (:func:`dask_scar.checkpoint.hand_over`)."""
    try:
        yield
    finally:
        checkpoint.hand_over()


def _released(worker, task: str) -> bool:
    """Whether the scheduler released this worker's running ``task``: nobody wants its
    result any more (its driver let go of it, or is gone)."""
    state = worker.state.tasks.get(task)
    return state is None or state.state == "cancelled"


def _leaving(worker) -> bool:
    """Whether this worker is closing (retired once its data moved, scaled down, its
    job or pod told to stop): Dask waits for its running tasks before it exits, and
    the driver recovers from its departure either way. Not while a retirement is
    only under way (``closing_gracefully``): Dask may call that off, and the worker
    then stays and its peers wait for its messages."""
    return worker.status not in (Status.running, Status.paused, Status.closing_gracefully)


def _take(run: str, epoch: int, iteration: int, peers: list[str], timeout: float) -> list[dict]:
    """The messages of ``peers`` for ``iteration``, unpickled, once all are here. The
    wait is a gap between training tasks: the task writes its checkpoint blocks first,
    and the writer thread may write too. Raises :class:`SegmentAborted` if the driver
    stopped the segment, the run ended, the scheduler released this task, or this
    worker is closing."""
    worker, task = get_worker(), thread_state.key
    deadline = time.monotonic() + timeout
    keys = [(run, epoch, iteration, peer) for peer in peers]
    with checkpoint.idle():
        checkpoint.write_now()      # this round's blocks, while the others catch up
        with _cond:
            while True:
                aborted, ended, leaving = (run, epoch) in _aborted, chunks.ended(run), _leaving(worker)
                if aborted or ended or leaving or _released(worker, task):
                    raise SegmentAborted(f"segment of run {run} stopped at iteration {iteration}",
                                         run_over=ended or not (aborted or leaving))
                if all(key in _box for key in keys):
                    messages = [_box.pop(key) for key in keys]
                    break
                if time.monotonic() > deadline:
                    missing = [key[-1] for key in keys if key not in _box]
                    raise ScarError(f"no word from worker(s) {missing} for iteration {iteration} within "
                                    f"scar.iteration-timeout={timeout:g}s")
                _cond.wait(POLL_SECONDS)
    return [_unpickled(frames) for frames in messages]


def stops_at(model: Model, loss: float) -> bool:
    """Whether a segment ends at an iteration with this loss, on its workers and on the
    driver alike: one that is not finite, but for a line-search model's (a trial it
    rejects, and retries shorter)."""
    return not (math.isfinite(loss) or model.line_search)


def converged(previous: float | None, current: float, tol: float) -> bool:
    """Whether the loss moved by no more than ``tol``, relatively (the driver's rule too);
    never where either is not finite (a trial L-BFGS rejects)."""
    return (previous is not None and math.isfinite(previous) and math.isfinite(current)
            and abs(previous - current) <= tol * max(abs(previous), abs(current), 1e-300))


@dataclass(frozen=True)
class Rounds:
    """What a segment's workers need to choose checkpoint rounds themselves."""

    policy: CheckpointPolicy
    layouts: dict[str, BlockLayout]
    next: int       # the number of the first round chosen inside the segment


@checkpoint.training_task
def run_segment(model: Model, sources: list, blocks: dict[int, dict], n_blocks: int, peers: list[str],
                first: int, last: int, own: list[ChunkId], client_id: str, run: str, epoch: int,
                orders: list[checkpoint.Orders | None], rounds: Rounds | None, previous_loss: float | None,
                tol: float, timeout: float) -> dict[ChunkId, Chunk] | None:
    """Iterations ``first..last`` (fewer if the loss converges to ``tol``) on this
    worker's data ``blocks`` (block id -> block); returns every chunk's newest version
    (None if the driver stopped the segment). ``orders[i]`` are the checkpoint
    orders of iteration ``first + i``. After a due iteration ``t`` (its orders
    ``keep``) other than the last, every worker sends its chunks' priorities with its
    next message, and all choose round ``t``'s blocks alike (:func:`checkpoint.choose`),
    written by the update of ``t + 1`` (the driver chooses the same and waits for the
    writers' reports)."""
    worker = get_worker()
    with _cond:     # leftovers of an earlier epoch of this run
        for key in [k for k in _box if k[0] == run and k[1] < epoch]:
            del _box[key]
    current = flatten(sources)
    ids = sorted(current)
    made = {b: contribute(model, 0, block, [current], first, b, run) for b, block in blocks.items()}
    k, loss, due, number = first, previous_loss, None, rounds.next if rounds is not None else 0
    held, sent = [], time.monotonic()     # progress not sent yet, and when it last was
    with _hushed(worker), contextlib.closing(_Outbox(worker, peers)) as outbox, _handing_over():
        while True:
            outbox.send((run, epoch, k, worker.address),
                        {"parts": made, "priorities": due["priorities"] if due else None})
            try:
                messages = _take(run, epoch, k, peers, timeout)
            except SegmentAborted as stop:
                detach({}, client_id, run, epoch, held)     # how far this worker got
                if stop.run_over:
                    # its driver may be gone, and no forget will come: drop the run's chunk
                    # copies, its peers' messages, what it kept for a checkpoint round
                    forget(run)
                return None     # quietly: the driver knows why
            parts = dict(made)
            for message in messages:
                parts.update(message["parts"])
            todo = orders[k - first]
            if due is not None:     # choose round ``k - 1``'s blocks, as every worker does
                priorities = dict(due["priorities"] or {})
                for message in messages:
                    priorities.update(message["priorities"] or {})
                chosen, _, _ = checkpoint.choose(rounds.policy, rounds.layouts, ids, number, priorities)
                todo = checkpoint.with_round(due["orders"], number, chosen, k - 1, todo)
                number += 1
            new, progress = step(model, current, [parts[b] for b in range(n_blocks)], own, k, run, epoch, todo,
                                 report=ids, inline=True)
            progress.update(worker=worker.address, stamp=time.time())
            held.append(progress)
            remember(run, new)      # every chunk: what recovery takes over should a peer die
            previous, loss = loss, progress["loss"]
            if k == last or (tol > 0 and converged(previous, loss, tol)) or stops_at(model, loss):
                detach({chunk_key(run, cid, epoch, k): new[cid] for cid in own}, client_id, run, epoch, held)
                return new
            if time.monotonic() - sent >= PROGRESS_SECONDS:
                detach({}, client_id, run, epoch, held)     # progress only
                held, sent = [], time.monotonic()
            due = ({"orders": todo, "priorities": progress.get("priorities")}
                   if rounds is not None and todo is not None and todo.keep else None)
            current, k = new, k + 1
            made = {b: contribute(model, 0, block, [current], k, b, run) for b, block in blocks.items()}


def build(model: Model, chunks, blocks: list[str], block_workers: list[str], first: int, last: int,
          client_id: str, orders: list, rounds: Rounds | None, previous_loss: float | None, tol: float,
          timeout: float, previous: dict[str, str]) -> tuple[HighLevelGraph, list[str], list[str]]:
    """The graph of a segment: one task per worker that holds data blocks or owns
    chunks, pinned there. A worker's task reads its own task of the segment before
    (``previous``: worker -> key), where there is one, and otherwise every chunk.
    Returns the graph, its keys, and the workers they run on."""
    workers = sorted(set(block_workers) | set(chunks.owner.values()))
    mine = {w: [b for b, bw in enumerate(block_workers) if bw == w] for w in workers}
    owned = chunks.by_worker()
    tag = f"{chunks.run}-e{chunks.epoch}-{first}"
    layers, keys = {}, []
    for i, worker in enumerate(workers):
        key = f"{SEGMENT_PREFIX}{tag}-{i}"
        sources = ([TaskRef(previous[worker])] if worker in previous
                   else [TaskRef(chunks.keys[cid]) for cid in chunks.ids])
        data = Dict({b: TaskRef(blocks[b]) for b in mine[worker]})
        task = Task(key, run_segment, model, List(*sources), data, len(blocks), [w for w in workers if w != worker],
                    first, last, owned.get(worker, []), client_id, chunks.run, chunks.epoch, orders, rounds,
                    previous_loss, tol, timeout)
        layers[key] = MaterializedLayer(
            {key: task}, annotations={"workers": [worker], "allow_other_workers": False})
        keys.append(key)
    return HighLevelGraph(layers, {name: set() for name in layers}), keys, workers
