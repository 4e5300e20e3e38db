"""Parameter chunks: row ranges of the model's parameters, each held on one worker.

A chunk's value lives in a worker's memory under a versioned key
``scar-chunk-<run>-<name>-<index>-e<epoch>-v<iteration>`` and carries no lineage: the task
that computes a new version hands the value to its own worker as *data*, the way
``Client.scatter`` does, and the scheduler registers it as data wanted by the
driver's client (see :class:`~dask_scar.plugin.ScarPlugin`). So the scheduler's
task count stays flat however long training runs, and Dask never tries to
recompute the history of a lost chunk; restoring it is the trainer's job.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from dask.sizeof import sizeof
from distributed import Client, Future, get_worker

from .backend import array_module, to_host
from .models import Model
from .store import BlockLayout

DETACH_OP = "scar-detach"  # stream handler installed on the scheduler by ScarPlugin
PROGRESS_TOPIC = "scar-progress"  # event topic of per-iteration losses


@dataclass(frozen=True, order=True)
class ChunkId:
    """Rows ``start:stop`` of parameter ``name``; ``index`` counts chunks of that parameter."""

    name: str
    index: int
    start: int
    stop: int

    @property
    def tag(self) -> str:
        """``name/index``: how the workers and the driver name a chunk in their messages."""
        return f"{self.name}/{self.index}"


@dataclass
class Chunk:
    """A chunk's state on a worker: its value plus optimizer slots, at ``version``.

    ``reference`` is the chunk's value as last checkpointed, kept by its owner
    when the checkpoint policy ranks blocks by how far they moved, and ``trail``
    what the owner knows of the saves before (:class:`dask_scar.checkpoint.SaveTrail`);
    both are shared by successive versions and never travel with a copy of the chunk.
    """

    id: ChunkId
    state: dict[str, Any]
    version: int
    reference: Any = None
    trail: Any = None

    @property
    def value(self) -> Any:
        return self.state["value"]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reference": None, "trail": None}


@sizeof.register(Chunk)
def _sizeof_chunk(chunk: Chunk) -> int:
    kept = [chunk.reference, getattr(chunk.trail, "previous", None)]
    return sum(sizeof(v) for v in chunk.state.values()) + sum(sizeof(k) for k in kept if k is not None)


CHUNK_PREFIX = "scar-chunk-"
SEGMENT_PREFIX = "scar-segment-"    # a segment's tasks: SEGMENT_PREFIX + run + "-e<epoch>-<first>-<worker>"


def chunk_key(run: str, cid: ChunkId, epoch: int, version: int) -> str:
    """The key of ``version`` of a chunk made in ``epoch`` of ``run`` (a recovery
    starts a new epoch, so a key never names two different values)."""
    return f"{CHUNK_PREFIX}{run}-{cid.name}-{cid.index}-e{epoch}-v{version}"


def split_rows(layouts: dict[str, BlockLayout], n_chunks: int) -> list[ChunkId]:
    """Every parameter split by rows into ``n_chunks`` near-equal chunks of whole
    checkpoint blocks (fewer chunks if there are fewer blocks)."""
    ids = []
    for name, layout in layouts.items():
        n = layout.n_blocks
        bounds = np.linspace(0, n, min(n_chunks, n) + 1).round().astype(int)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            ids.append(ChunkId(name, i, layout.bounds(int(a))[0], layout.bounds(int(b) - 1)[1]))
    return ids


def place(ids: list[ChunkId], workers: list[str]) -> dict[ChunkId, str]:
    """Round-robin placement; each parameter starts on a different worker."""
    workers = sorted(workers)
    names = list(dict.fromkeys(c.name for c in ids))
    return {c: workers[(c.index + names.index(c.name)) % len(workers)] for c in ids}


def release_keys(client: Client, keys: list[str]) -> None:
    """Tell the scheduler that this client no longer wants ``keys``, whether or not
    a future for them still exists: keys workers registered for the driver after
    it abandoned their work, or the keys of a finished run (a future kept alive by
    a reference cycle would otherwise keep its key until garbage collection). It is
    the message a dropped future sends; keys the scheduler does not know are ignored.
    (``Client.cancel`` is no substitute: it also cancels dependents, and trips over
    those no client wants.)"""
    if keys and client.status == "running":
        client._send_to_scheduler({"op": "client-releases-keys", "keys": list(keys), "client": client.id})


def flatten(sources: list[Any]) -> dict[ChunkId, Chunk]:
    """Chunks from task inputs that are a Chunk, a dict of chunks (an update's output),
    or anything with such a dict as ``chunks`` (an update that also contributed)."""
    out: dict[ChunkId, Chunk] = {}
    for source in sources:
        if isinstance(source, Chunk):
            out[source.id] = source
        else:
            out.update(getattr(source, "chunks", source))
    return out


def assemble(chunks: dict[ChunkId, Chunk], names: tuple[str, ...], xp) -> dict[str, Any]:
    """Full parameter arrays from their chunks."""
    params = {}
    for name in names:
        parts = sorted((c for c in chunks.values() if c.id.name == name), key=lambda c: c.id.index)
        params[name] = parts[0].value if len(parts) == 1 else xp.concatenate([c.value for c in parts])
    return params


def detach(chunks: dict[str, Chunk], client_id: str, run: str, epoch: int, progress: list[dict] = ()) -> None:
    """From inside a task: keep ``chunks`` on this worker as lineage-free data under their keys.

    The worker stores them as if scattered to it, and tells the scheduler on its
    ordered stream *before* the running task reports that it finished, so anyone
    who sees the task done can rely on the keys existing. ``progress`` (small
    JSON-able dicts) is published on the ``scar-progress`` topic, in order. The
    scheduler refuses chunks of an ``epoch`` that ``run`` has left behind.
    """
    worker = get_worker()
    task = worker.active_threads.get(threading.get_ident())     # (get_current_task, where it is one)
    nbytes = {key: sizeof(chunk) for key, chunk in chunks.items()}

    def register() -> None:
        let_go_of_inputs(worker, task)
        if worker.batched_stream.closed():
            return      # the scheduler went away: nothing to register with it (send would raise)
        worker.update_data(data=chunks, stimulus_id=f"scar-detach-{time.time()}")
        worker.batched_stream.send({
            "op": DETACH_OP,
            "who_has": {key: [worker.address] for key in chunks},
            "nbytes": nbytes,
            "client": client_id,
            "run": run,
            "epoch": epoch,
            "progress": list(progress),
        })

    worker.loop.add_callback(register)


def let_go_of_inputs(worker, key: str | None) -> None:
    """On the worker's event loop, for the running task ``key``, which has read its
    inputs: forget which of dask_scar's tasks in memory were its inputs.

    A worker keeps a task it was told to release while a task that read it is known
    there (Dask keeps the link for as long as both are): each iteration's update, or
    segment, reads the one before, so every worker kept a record of every past one
    for the whole fit (two per iteration: +14 KB a worker, 2,000 iterations took it
    from 138 to 166 MB). Without the link, an input goes once released, as Dask does
    with one that no task read. (One already released keeps it: it would never go.)"""
    ts = worker.state.tasks.get(key) if key is not None else None
    if ts is None:
        return
    for dependency in [d for d in ts.dependencies if d.state == "memory" and str(d.key).startswith("scar-")]:
        ts.dependencies.discard(dependency)
        dependency.dependents.discard(ts)


# -- the copies contributions leave behind ------------------------------------------------
#
# Every contribution task receives every chunk it reads, and an update task that keeps
# replicas computes every chunk (see :func:`dask_scar.iteration.replicates`); the process
# remembers the two newest copies of each (references, no copy of the data: they are what
# Dask would hold until the driver releases those versions anyway). When a chunk's owner
# dies, a live worker's copy -- one iteration old, or current -- is a far better restore
# than a checkpoint block. Two, because work submitted ahead may already have made the
# next version: recovery goes back to the driver's version, and wants a copy no newer.

_seen: OrderedDict[str, dict[ChunkId, list[Chunk]]] = OrderedDict()   # run -> chunk -> newest copies
_seen_lock = threading.Lock()
#: Runs whose chunk copies (and values kept for checkpoint rounds) a process remembers:
#: a run's driver has them forgotten when it ends, unless it died.
RUNS_REMEMBERED = 4
_SEEN_VERSIONS = 2  # copies remembered per chunk
#: Runs that ended (see :func:`forget`): a task of theirs still running keeps nothing.
_ended: OrderedDict[str, None] = OrderedDict()
_ENDED_RUNS = 64    # ended runs remembered per process


def remember(run: str, chunks: dict[ChunkId, Chunk]) -> None:
    """Keep ``chunks`` among the newest copies this process saw (contribution tasks call
    it with what they read, update tasks with their replicas); nothing once ``run`` ended."""
    with _seen_lock:
        if run in _ended:
            return
        seen = _seen.setdefault(run, {})
        _seen.move_to_end(run)
        while len(_seen) > RUNS_REMEMBERED:
            _seen.popitem(last=False)
        for cid, chunk in chunks.items():
            copies = [c for c in seen.get(cid, []) if c.version != chunk.version] + [chunk]
            seen[cid] = sorted(copies, key=lambda c: c.version)[-_SEEN_VERSIONS:]


def _newest(run: str, newest: int) -> dict[ChunkId, Chunk]:
    """The newest copy of each chunk this process holds, among versions up to ``newest``."""
    with _seen_lock:
        seen = dict(_seen.get(run, {}))
    found = {cid: [c for c in copies if c.version <= newest] for cid, copies in seen.items()}
    return {cid: copies[-1] for cid, copies in found.items() if copies}


def reattach(run: str, chunk: Chunk) -> bool:
    """Give ``chunk``, a copy that reached its owner from another worker, the checkpoint
    reference and trail the owner's own recent copy of it carries (Dask's active memory
    manager may drop the owner's replica of a chunk's key and keep another worker's);
    False if this process has none."""
    with _seen_lock:
        copies = list(_seen.get(run, {}).get(chunk.id, []))
    for copy in reversed(copies):
        if copy.reference is not None and copy.version >= chunk.version - _SEEN_VERSIONS:
            chunk.reference, chunk.trail = copy.reference, copy.trail
            return True
    return False


def seen_versions(run: str, labels: list[str], newest: int) -> dict[str, int]:
    """Run on the workers: the version of each chunk (``name/index``) this process holds a
    copy of, among versions up to ``newest``."""
    found = {cid.tag: chunk.version for cid, chunk in _newest(run, newest).items()}
    return {label: found[label] for label in labels if label in found}


def forget(run: str) -> None:
    """Run on the workers when ``run`` ends: drop its copies. Tasks of the run still
    running (the driver was interrupted while they ran: Dask cannot stop them) keep
    none afterwards."""
    with _seen_lock:
        _seen.pop(run, None)
        _ended[run] = None
        while len(_ended) > _ENDED_RUNS:
            _ended.popitem(last=False)


def ended(run: str) -> bool:
    """Whether :func:`forget` ran for ``run`` in this process."""
    with _seen_lock:
        return run in _ended


def _adopt_chunks(ids: list[ChunkId], keys: list[str], client_id: str, run: str, epoch: int,
                  version: int) -> dict[str, int]:
    """Make the newest copies up to ``version`` this process remembers of ``ids`` the chunks'
    ``version`` (optimizer state included; the checkpoint reference is rebuilt at the next
    checkpointing iteration)."""
    copies = _newest(run, version)
    adopted = {key: Chunk(cid, copies[cid].state, version) for cid, key in zip(ids, keys)}
    detach(adopted, client_id, run, epoch)
    return {}       # nothing read (the same report as a restore from the store)


def _init_chunks(model: Model, ids: list[ChunkId], keys: list[str], client_id: str, run: str, epoch: int,
                 backend: str, version: int, prepare: Callable[..., dict] | None) -> dict[str, int]:
    """Create chunks at their initial value (``prepare(chunk, model=model)`` may then restore
    saved blocks into them, and seed their optimizer slots); returns what ``prepare`` reports
    (bytes read, blocks never saved), summed."""
    xp = array_module(backend)
    chunks = {key: Chunk(cid, model.new_state(cid.name, model.init_rows(cid.name, cid.start, cid.stop, xp)), version)
              for cid, key in zip(ids, keys)}
    totals: dict[str, int] = {}
    for chunk in chunks.values():
        for name, value in (prepare(chunk, model=model) if prepare is not None else {}).items():
            totals[name] = totals.get(name, 0) + value
    detach(chunks, client_id, run, epoch)
    return totals


def _fitted_value(chunk: Chunk, model: Model) -> np.ndarray:
    return to_host(model.fitted_value(chunk.state))


@dataclass
class ParameterChunks:
    """The driver's view of the chunks: where each lives and the futures holding them.

    ``keys`` names each chunk's current value. Chunks restored by a recovery are
    created in a new ``epoch``, so their keys differ from any key used before.
    """

    client: Client
    run: str
    owner: dict[ChunkId, str]
    version: int = 0
    epoch: int = 0
    keys: dict[ChunkId, str] = field(default_factory=dict)
    futures: dict[ChunkId, Future] = field(default_factory=dict)

    @property
    def ids(self) -> list[ChunkId]:
        return sorted(self.owner)

    def key(self, cid: ChunkId, version: int) -> str:
        """The key of a new ``version`` of ``cid``, in the current epoch."""
        return chunk_key(self.run, cid, self.epoch, version)

    def by_worker(self, names: tuple[str, ...] | None = None, ids: list[ChunkId] | None = None
                  ) -> dict[str, list[ChunkId]]:
        out: dict[str, list[ChunkId]] = {}
        for cid in sorted(ids) if ids is not None else self.ids:
            if names is None or cid.name in names:
                out.setdefault(self.owner[cid], []).append(cid)
        return out

    def initialize(self, model: Model, backend: str, version: int = 0,
                   prepare: Callable[..., dict] | None = None,
                   ids: list[ChunkId] | None = None) -> list[Future]:
        """Start creating ``version`` of chunks ``ids`` (default: all) on their owners
        (no parameter data passes the driver); once the returned tasks are done,
        call ``advance(version, ids)``."""
        return [
            self.client.submit(_init_chunks, model, own, [self.key(c, version) for c in own], self.client.id,
                               self.run, self.epoch, backend, version, prepare,
                               key=f"scar-init-{self.run}-e{self.epoch}-{i}", workers=[worker],
                               allow_other_workers=False)
            for i, (worker, own) in enumerate(self.by_worker(ids=ids).items())
        ]

    def adopt(self, copies: dict[ChunkId, str], version: int) -> list[Future]:
        """Start making ``version`` of chunks from the copies their new owners
        (``copies``: chunk -> worker) remember; then ``advance(version, ids)``."""
        by_worker: dict[str, list[ChunkId]] = {}
        for cid, worker in sorted(copies.items()):
            self.owner[cid] = worker
            by_worker.setdefault(worker, []).append(cid)
        return [
            self.client.submit(_adopt_chunks, own, [self.key(c, version) for c in own], self.client.id, self.run,
                               self.epoch, version, key=f"scar-adopt-{self.run}-e{self.epoch}-{i}",
                               workers=[worker], allow_other_workers=False)
            for i, (worker, own) in enumerate(sorted(by_worker.items()))
        ]

    def advance(self, version: int, ids: list[ChunkId] | None = None, lost: set[ChunkId] = frozenset()) -> list[Future]:
        """Take hold of ``version`` of chunks ``ids`` (default: all, and the
        iteration count moves to ``version``); returns the futures let go. Those of
        ``lost`` were never made: they are marked lost (see :meth:`lost`).

        The caller drops the returned futures when convenient: dropping them sends
        a release to the scheduler, which is best batched with the next graph.
        """
        if ids is None:
            ids, self.version = self.ids, version
        old = [self.futures.pop(cid) for cid in ids if cid in self.futures]
        for cid in ids:
            self.keys[cid] = self.key(cid, version)
            # The keys were registered for this client by the workers; "memory" marks the
            # futures finished without another round trip.
            self.futures[cid] = Future(self.keys[cid], self.client, state="lost" if cid in lost else "memory")
        return old

    def lost(self) -> list[ChunkId]:
        """Chunks whose only copy the scheduler reported lost (their worker died), or
        that were never made (see :meth:`advance`)."""
        return [cid for cid, f in self.futures.items() if f.status in ("lost", "cancelled")]

    def gather(self, model: Model, wait: Callable[[list[Future]], None] | None = None) -> dict[str, np.ndarray]:
        """The full fitted parameters as NumPy arrays (``model.fitted_value`` of each
        chunk, taken on its worker: optimizer slots stay there); ``wait(futures)``
        first, where given."""
        ids = list(self.futures)
        futures = self.client.map(_fitted_value, [self.futures[c] for c in ids], model=model, pure=False)
        if wait is not None:
            wait(futures)
        values = self.client.gather(futures)
        host = {cid: Chunk(cid, {"value": v}, self.version) for cid, v in zip(ids, values)}
        return assemble(host, tuple(dict.fromkeys(c.name for c in self.ids)), np)

    def release(self) -> None:
        self.futures = {}
