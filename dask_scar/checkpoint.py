"""Checkpointing during training: priorities and writes on the workers, rounds on the driver.

How a round goes (policy due after iteration ``t``):

1. the update tasks of iteration ``t`` keep version ``t`` of the chunks they hold
   and compute every block's distance from what a restore would put back (if the
   policy asks for priorities; :func:`distances`), sent with their
   ``scar-progress`` event — one number per block, and the blocks whose drift
   turned, no parameter data;
2. the driver's :class:`Checkpointer` selects the round's blocks;
3. the update tasks of the next graph the driver submits hand the selected blocks
   of version ``t`` to a writer thread of their worker process and carry on:
   training does not wait for the store, and the writer writes between training
   tasks (see :func:`training_task`). That graph is ``t + 2``'s, whose submission
   never waits for the choice (``t + 1``'s was submitted before ``t`` ended); it is
   ``t + 1``'s where graphs are not submitted ahead (a fit with a ``callback``).
   Inside a segment (:mod:`dask_scar.segment`) the workers choose the round
   themselves, as step 2 does (:func:`choose`), and each writes its blocks in its
   update of ``t + 1``, while it waits for the other workers (:func:`write_now`).
   The writer writes the blocks (data, then their record), updates the chunk's
   reference copy, and reports bytes and seconds as another ``scar-progress``
   event;
4. when every chunk of the round has reported, the driver commits the round in
   the store's manifest (the newest such round, once per batch of reports it takes in,
   :meth:`Checkpointer.commit`). At most ``scar.checkpoint.backlog`` rounds are in
   flight; beyond that the driver waits before it submits more work.

After the fit's last iteration, one more round writes every block that no round wrote
with that iteration's values (:meth:`Checkpointer.last`): a finished fit's store holds
its result, and a resume that trains further goes on exactly.

A failing write (full disk, lost permission) is reported, not raised: training
goes on and the store keeps the blocks it had (chunk writes are atomic). So is a
failing commit (step 4): the store keeps its last committed round until a later one
commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import queue
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
from distributed import Client, get_worker

from .backend import get_array_module, to_host
from .chunks import PROGRESS_TOPIC, RUNS_REMEMBERED, Chunk, ChunkId, ended
from .exceptions import CheckpointError, CheckpointWarning, callers_level
from .policy import CheckpointPolicy
from .store import NEVER, BlockLayout, ZarrStore, pick, probe

logger = logging.getLogger(__name__)

#: After a fit's first checkpoint warning, the log gets its notes at most this often.
NOTE_SECONDS = 60.0

#: Stores a worker process keeps open (see :func:`open_cached`).
OPEN_STORES = 8
#: Seconds an update task measuring priorities waits for its process's last writes
#: (a store that slow is reported by the writes themselves; priorities then go on).
WRITE_WAIT = 10.0
#: Seconds a write may wait, from when its task handed it over, for a moment when no
#: training task runs in its process (a worker has one every iteration, waiting for
#: the others' updates; where tasks overlap, as with several threads, it may have none).
IDLE_WAIT = 0.2


@dataclass(frozen=True)
class Orders:
    """What the update tasks of one iteration do for checkpointing (small; sent with every task)."""

    run: str
    url: str
    store_id: str
    epoch: int
    block_rows: dict[str, int]
    reference: str | None | bool = False  # dtype of the reference copy chunks keep (False: none)
    priorities: bool = False            # report block distances of the new chunks
    keep: bool = False                  # keep the new chunks' values for a round chosen from them
    round: int = 0                      # round to write, if ``blocks``
    blocks: dict[ChunkId, tuple[int, ...]] = field(default_factory=dict)  # selected blocks per chunk
    version: int = NEVER                # the chunk version whose blocks the round writes
    extrapolate: bool = False           # priorities: the nearer of saved and extrapolated (see distances)


# -- on the workers ---------------------------------------------------------------------

def chunk_blocks(cid: ChunkId, block_rows: int) -> range:
    return range(cid.start // block_rows, math.ceil(cid.stop / block_rows))


@dataclass
class SaveTrail:
    """What a chunk's owner knows of its blocks' last two saves, to rank blocks by
    how far a restore would be off (see :func:`trend_factors`): the versions before
    the reference's (``previous``: the initial value before the first save), per
    block the iteration and the chunk's path at each of the two saves (-1, NaN:
    unknown), and the chunk's path now (its step norms summed). ``fresh``: the
    chunk started from its initial value at iteration 0."""

    previous: Any
    saved_at: np.ndarray
    saved_path: np.ndarray
    previous_at: np.ndarray
    previous_path: np.ndarray
    path: float = 0.0
    fresh: bool = False

    @classmethod
    def new(cls, previous: Any, n_blocks: int, fresh: bool) -> SaveTrail:
        return cls(previous, np.full(n_blocks, NEVER), np.full(n_blocks, np.nan), np.full(n_blocks, NEVER),
                   np.full(n_blocks, np.nan), 0.0, fresh)


def trend_factors(now: int, path: float, saved_at: np.ndarray, saved_path: np.ndarray, previous_at: np.ndarray,
                  previous_path: np.ndarray, fresh: bool) -> np.ndarray:
    """Per block, the factor ``f`` of an extrapolated restore after iteration ``now``,
    ``newest + f * (newest - previous)``: the chunk's ``path`` since the newest save
    over its path between the two saves, at most their ratio in iterations; 0 where
    a block has no two saves to go by (in a ``fresh`` fit a block saved once has its
    initial value, of iteration 0 and path 0, before it). Restores
    (:func:`restore_factors`), priorities (:func:`predicted`) and the bench's
    simulation all go by it."""
    i1, p1 = _before(previous_at, previous_path, fresh)
    usable = (saved_at >= 0) & (i1 >= 0) & (saved_path > p1) & (saved_at > i1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.minimum((path - saved_path) / (saved_path - p1), (now - saved_at) / (saved_at - i1))
    return np.where(usable, np.maximum(f, 0.0), 0.0)


def _before(previous_at: np.ndarray, previous_path: np.ndarray, fresh: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the iteration and the chunk's path of the version before the newest:
    in a ``fresh`` fit, a block saved once has its initial value (0, 0) before it."""
    first = fresh & (previous_at < 0)
    return np.where(first, 0, previous_at), np.where(first, 0.0, previous_path)


def step_scales(last: float, factors: np.ndarray, saved_path: np.ndarray, previous_at: np.ndarray,
                previous_path: np.ndarray, fresh: bool) -> np.ndarray:
    """Per block, the scale ``s`` that makes ``s * (newest - previous)`` the block's
    share of the chunk's step at the iteration restored, of norm ``last``: the chunk's
    path between the block's two saves, walked along that drift, shrunk to one step.
    Where a block keeps its direction, that is its step per iteration now (Nesterov's
    velocity, :meth:`dask_scar.models.Model.restore_slots`); 0 where ``factors``
    (:func:`trend_factors`) is (no trend to go by) or ``last`` is unknown."""
    _, p1 = _before(previous_at, previous_path, fresh)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = last / (saved_path - p1)
    return np.where((factors != 0) & np.isfinite(scales), scales, 0.0)


def predicted(chunk: Chunk, block_rows: int) -> Any:
    """Where an extrapolated restore would put each block of the chunk now (its
    reference where no trend is known)."""
    trail, ref = chunk.trail, chunk.reference
    f = trend_factors(chunk.version, trail.path, trail.saved_at, trail.saved_path, trail.previous_at,
                      trail.previous_path, trail.fresh)
    if not f.any():
        return ref
    dtype = chunk.value.dtype
    return extrapolated(ref.astype(dtype), trail.previous.astype(dtype), f, block_rows)


def extrapolated(newest: Any, previous: Any, factors: np.ndarray, block_rows: int) -> Any:
    """``newest + f * (newest - previous)``, block by block: ``newest`` and ``previous``
    are a chunk's rows (from the start of a block), ``factors`` one ``f`` per block
    (:func:`trend_factors`); a block with ``f = 0`` stays as it is. The one step of
    restores, priorities and the bench's simulation."""
    return newest + by_block(factors, block_rows, newest) * (newest - previous)


def drift_step(newest: np.ndarray, previous: np.ndarray, scales: np.ndarray, block_rows: int) -> np.ndarray:
    """``s * (newest - previous)``, block by block (``scales``: :func:`step_scales`), in
    float64 on the host: the step per iteration a restored chunk's drift gives."""
    drift = np.asarray(newest, dtype=np.float64) - previous
    return by_block(scales, block_rows, drift) * drift


def by_block(factors: np.ndarray, block_rows: int, like: Any) -> Any:
    """One number per block (``factors``) as a column of ``like``'s rows, its array type and dtype."""
    xp = get_array_module(like)
    f = np.repeat(np.asarray(factors, dtype=like.dtype), block_rows)[:len(like)]
    return xp.asarray(f).reshape(-1, *(1,) * (like.ndim - 1))


def block_distances(chunk: Chunk, block_rows: int, target: Any = None, value: Any = None) -> list[float]:
    """``||value - target||`` of each block of the chunk (``value`` by default the
    chunk's), ``target`` by default its reference (inf where no reference is kept)."""
    n = len(chunk_blocks(chunk.id, block_rows))
    if chunk.reference is None:
        return [math.inf] * n
    value = chunk.value if value is None else value
    xp = get_array_module(value)
    diff = value - (chunk.reference if target is None else target)
    sq = (diff * diff).reshape(diff.shape[0], -1).sum(axis=1, dtype=xp.float64)
    full = (len(sq) // block_rows) * block_rows
    sums = sq[:full].reshape(-1, block_rows).sum(axis=1)
    if full < len(sq):
        sums = xp.concatenate([sums, sq[full:].sum(keepdims=True)])
    return [float(v) for v in to_host(xp.sqrt(sums))]


def new_reference(value: Any, dtype: str | None) -> Any:
    """The reference copy a chunk keeps for priorities (its value as last saved)."""
    return value.astype(dtype or value.dtype, copy=True)


def distances(chunks: dict[ChunkId, Chunk], orders: Orders, model: Any
              ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each block's priority: its distance from where a restore would put it -- once
    the last round's writes are done (they usually are: rounds are at least two
    iterations apart). That is its value as last saved or, with
    ``orders.extrapolate``, the nearer of that and the extrapolated value
    (:func:`predicted`); then also, per chunk, the blocks the extrapolation would put
    farther off (their drift turned: a fit that overshoots swings back), which a
    restore should take as saved (:attr:`Trend.held`). A block's value is what a save
    would write (``model.fitted_value``: L-BFGS's accepted point, not its trial)."""
    settle()
    out, turned = {}, {}
    for cid, c in chunks.items():
        rows, label, value = orders.block_rows[cid.name], cid.tag, model.fitted_value(c.state)
        out[label] = saved = block_distances(c, rows, value=value)
        target = predicted(c, rows) if orders.extrapolate and c.trail is not None and c.reference is not None \
            else None
        if target is not None and target is not c.reference:
            # (a trail with no trend, as on a chunk's new owner, judges nothing: the
            # driver keeps what it last heard, as the store keeps the versions)
            nearer, held = held_back(block_distances(c, rows, target, value), saved)
            out[label], turned[label] = nearer.tolist(), np.flatnonzero(held).tolist()
    return out, turned


def held_back(moved: Any, saved: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per block, from its distances to its extrapolated and its saved value: its
    priority (the nearer), and whether its drift turned (the extrapolation is the
    farther: a restore takes the block as saved). The one rule of
    :func:`distances` and the bench's simulation."""
    moved, saved = np.asarray(moved, dtype=float), np.asarray(saved, dtype=float)
    return np.minimum(moved, saved), moved > saved


def _as_saved(chunk: Chunk, model: Any) -> tuple[Any, float]:
    """What a save of ``chunk`` records: the value a fitted model keeps from it (a line
    search's last accepted point, not its trial), and its path now (NaN: no trail)."""
    return model.fitted_value(chunk.state), chunk.trail.path if chunk.trail else math.nan


def keep(run: str, chunks: dict[ChunkId, Chunk], model: Any) -> None:
    """Keep the values of ``chunks`` (new versions, on their owner) and their paths, for
    the round chosen from them: it is written while a later iteration runs. Nothing
    once ``run`` ended (a task of it still running: see :func:`dask_scar.chunks.forget`,
    which the driver has the workers run before :func:`forget`)."""
    with _lock:
        if ended(run):
            return
        runs = _kept.setdefault(run, {})
        _kept.move_to_end(run)
        while len(_kept) > RUNS_REMEMBERED:     # (runs whose driver died, and never had them forgotten)
            _kept.popitem(last=False)
        for cid, chunk in chunks.items():
            kept = runs.setdefault(cid, {})
            for version in [v for v in kept if v < chunk.version - 2]:    # a round nobody wrote
                del kept[version]
            kept[chunk.version] = _as_saved(chunk, model)


def forget(run: str) -> None:
    """Run on the workers when ``run`` ends: drop the values kept for its rounds."""
    with _lock:
        _kept.pop(run, None)


def save(chunks: dict[ChunkId, Chunk], orders: Orders, model: Any, inline: bool = False) -> int:
    """Hand this worker's share of the round's blocks (of version ``orders.version``:
    the chunks themselves, or the values :func:`keep` kept) to the process's writer
    thread (``inline``: to the task itself, see :func:`write_now`)."""
    jobs = 0
    for cid, chunk in chunks.items():
        with _lock:
            kept = _kept.get(orders.run, {}).get(cid, {}).pop(orders.version, None)
        blocks = orders.blocks.get(cid)
        if not blocks:
            continue
        if chunk.version == orders.version:
            kept = _as_saved(chunk, model)
        values = None           # not kept here (the chunk came from another worker): reported
        if kept is not None:
            rows, values = orders.block_rows[cid.name], {}
            for b in blocks:
                start, stop = b * rows - cid.start, min((b + 1) * rows, cid.stop) - cid.start
                values[b] = to_host(kept[0][start:stop])
        with _writing:
            _writing.count += 1
        job = (get_worker(), orders, chunk, values, kept[1] if kept else math.nan, time.monotonic())
        if inline:
            with _lock:
                _inline.append(job)
        else:
            _writer().put(job)
        jobs += 1
    return jobs


def save_task(sources: list[Chunk], orders: Orders, model: Any) -> int:
    """A task that saves selected blocks outside an iteration (the last round of a fit)."""
    return save({c.id: c for c in sources}, orders, model)


_stores: dict[tuple[str, str], ZarrStore] = {}
#: run -> chunk -> version -> (value, path): kept for a round (see keep)
_kept: OrderedDict[str, dict[ChunkId, dict[int, tuple[Any, float]]]] = OrderedDict()
_inline: list[tuple] = []       # writes a segment's task does itself (see write_now)
_lock = threading.Lock()
_queue: queue.Queue | None = None
_writing = threading.Condition()     # .count: writes handed to this process's writer, not yet done
_writing.count = 0
_tasks = threading.Condition()       # .running: training tasks running here; .settling: threads in settle()
_tasks.running = _tasks.settling = 0
#: One write at a time in a process: the writer thread and a segment's task (see
#: write_now) may write the same block, and each puts it in the older of its two slots.
_one_write = threading.Lock()


async def settle_off_the_loop() -> bool:
    """:func:`settle` for ``Client.run``: in a thread, not on the worker's event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, settle)


def settle(timeout: float = WRITE_WAIT) -> bool:
    """Wait until this process's checkpoint writes are done, at most ``timeout``
    seconds; True if they are (then every reference and record is the last round's)."""
    write_now()
    with _tasks:
        _tasks.settling += 1        # the writer need not wait for the task that waits for it
        _tasks.notify_all()
    try:
        with _writing:
            return _writing.wait_for(lambda: _writing.count == 0, timeout)
    finally:
        with _tasks:
            _tasks.settling -= 1


def training_task(func: Callable) -> Callable:
    """Mark a training task: while one runs, this process's writer thread holds its
    writes (at most :data:`IDLE_WAIT` seconds) for a moment between tasks. A writer
    running beside the task competes with it for the interpreter's lock at every
    system call it makes: on two busy cores, a round whose writes took ~5 ms of CPU
    per worker added 23-32 ms to the iterations that way, and -3 to +17 ms held for
    the gaps (softmax, 200k rows).

    NumPy's floating-point warnings are off in the task: a loss that overflows to inf
    or NaN reaches the driver, whose :class:`~dask_scar.DivergenceError` says what to
    do, without a warning from every worker before it."""
    @functools.wraps(func)
    def task(*args, **kwargs):
        with _running(1), np.errstate(all="ignore"):
            return func(*args, **kwargs)
    return task


@contextlib.contextmanager
def _running(tasks: int):
    """``tasks`` more training tasks count as running here while inside; the writer
    thread hears of each change."""
    _count(tasks)
    try:
        yield
    finally:
        _count(-tasks)


def _count(tasks: int) -> None:
    with _tasks:
        _tasks.running += tasks
        _tasks.notify_all()


def open_cached(url: str, store_id: str) -> ZarrStore:
    """The store at ``url``, opened once per process (per store id, so a store
    re-created at the same path is re-opened); the :data:`OPEN_STORES` used last stay
    open (a long-lived worker sees a new store every fit)."""
    with _lock:
        store = _stores.pop((url, store_id), None)
        if store is None:
            while len(_stores) >= OPEN_STORES:
                del _stores[next(iter(_stores))]
            store = ZarrStore.open(url, mode="r+")
            if store.meta.get("id") != store_id:
                raise CheckpointError(f"the checkpoint store at {url} seen from this process is not the one "
                                      "the driver created: the workers must see the same storage as the driver "
                                      "(a shared filesystem, or an object store URL such as s3://...)")
        _stores[(url, store_id)] = store        # the newest, last in line to go
        return store


def check_workers(client: Client, url: str, store_id: str, workers: list[str] | None = None,
                  joined: bool = False, hint: str = "") -> set[str]:
    """Raise :class:`CheckpointError` if one of ``workers`` (None: every worker) cannot
    use the driver's store (:func:`check_access`); ``joined``: they joined during the fit.
    A worker that cannot be asked (gone meanwhile) is left to the recovery. Returns the
    workers that can use it."""
    answers = client.run(check_access, url, store_id, workers=workers, on_error="return")
    problems = {w: p for w, p in answers.items() if isinstance(p, str)}
    if not problems:
        return {w for w, p in answers.items() if p is None}
    worker, problem = min(problems.items())
    raise CheckpointError(f"worker {worker}{' (joined during the fit)' if joined else ''} cannot use the "
                          f"checkpoint store: {problem}. The workers must see the same storage as the driver: "
                          "a shared filesystem, or an object store URL such as s3://... (a memory:// store "
                          "lives in one process)" + hint)


def check_access(url: str, store_id: str) -> str | None:
    """Run on every worker before training: what keeps this worker from using the
    driver's store (None: nothing; it is that store, and writable here)."""
    try:
        open_cached(url, store_id)
        probe(url)
    except Exception as exc:  # noqa: BLE001  (told to the driver, which raises)
        return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return None


def _writer() -> queue.Queue:
    global _queue
    with _lock:
        if _queue is None:
            _queue = queue.Queue()
            threading.Thread(target=_write_forever, args=(_queue,), name="scar-checkpoint-writer",
                             daemon=True).start()
        return _queue


def _write_forever(jobs: queue.Queue) -> None:
    while True:
        job = jobs.get()
        with _tasks:     # a round's jobs share one deadline
            _tasks.wait_for(lambda: _tasks.running == 0 or _tasks.settling,
                            max(0.0, job[-1] + IDLE_WAIT - time.monotonic()))
        _write(*job[:-1])


def write_now() -> None:
    """From a segment's task, while it waits for the other workers anyway: the writes
    :func:`save` was told to leave to it, in this thread (a writer thread beside the
    task would run on into the next kernel, and compete with it)."""
    while True:
        with _lock:
            if not _inline:
                return
            job = _inline.pop(0)
        _write(*job[:-1])


def hand_over() -> None:
    """At the end of a segment's task: the writes it did not get to, to the writer thread."""
    with _lock:
        jobs, _inline[:] = list(_inline), []
    for job in jobs:
        _writer().put(job)


def _write(worker, orders: Orders, chunk: Chunk, values: dict | None, path: float) -> None:
    started = time.perf_counter()
    report = {"run": orders.run, "kind": "written", "round": orders.round, "chunk": chunk.id.index,
              "parameter": chunk.id.name, "version": orders.version, "blocks": sorted(values or ()), "bytes": 0,
              "error": None}
    try:
        if ended(orders.run):   # its rounds were given up, and another fit may write the store now
            return
        if values is None:
            raise CheckpointError(f"version {orders.version} of chunk {chunk.id.tag} "
                                  "is not on its owner any more")
        store = open_cached(orders.url, orders.store_id)
        with _one_write:
            report["bytes"] = store.write_blocks(chunk.id.name, values, orders.version, orders.epoch, orders.round)
            _update_reference(chunk, values, orders.block_rows[chunk.id.name], orders.version, path)
    except Exception as exc:  # noqa: BLE001  (reported to the driver, which warns)
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with _writing:
            _writing.count -= 1
            _writing.notify_all()
    report["seconds"] = time.perf_counter() - started
    try:
        worker.log_event(PROGRESS_TOPIC, report)
    except Exception:  # noqa: BLE001  (worker closing: nobody left to tell)
        logger.debug("could not report a checkpoint write", exc_info=True)


def _update_reference(chunk: Chunk, values: dict[int, np.ndarray], rows: int, version: int, path: float) -> None:
    """The blocks ``values`` of ``chunk`` were saved, of its ``version``, when its path was ``path``."""
    ref, trail = chunk.reference, chunk.trail
    if ref is None:
        return
    xp = get_array_module(ref)
    first = chunk.id.start // rows
    for b, host in values.items():
        start = b * rows - chunk.id.start
        if trail is not None:
            i = b - first
            trail.previous[start:start + len(host)] = ref[start:start + len(host)]
            trail.previous_at[i], trail.previous_path[i] = trail.saved_at[i], trail.saved_path[i]
            trail.saved_at[i], trail.saved_path[i] = version, path
        ref[start:start + len(host)] = xp.asarray(host, dtype=ref.dtype)


@dataclass(frozen=True)
class Trend:
    """What the driver tells a worker restoring a chunk, to extrapolate its blocks:
    the chunk's path after every iteration of this fit (``paths[k]``, NaN where
    unknown), the round this fit's rounds are numbered after (versions of earlier
    rounds belong to another fit), whether the fit started from the initial
    values at iteration 0, and the blocks not to extrapolate (:func:`distances`'
    turned blocks, as last measured on the chunk's owner)."""

    paths: np.ndarray
    first_round: int
    fresh: bool
    held: tuple[int, ...] = ()      # blocks (from the chunk's first) restored as saved: their drift turned


def restore_factors(trend: Trend, now: int, newest: np.ndarray, previous: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`trend_factors` of blocks restored after iteration ``now`` from the
    versions the store holds (records ``newest`` and ``previous``: iteration, epoch,
    round per block), with the paths the driver measured, and their
    :func:`step_scales`; 0 for a block with a version from another fit (or, but in a
    fresh fit, none before its newest), and for the trend's ``held`` blocks."""
    paths = trend.paths

    def path_at(at: np.ndarray) -> np.ndarray:      # called only once ``now`` is known: paths is not empty
        return np.where((at >= 0) & (at < len(paths)), paths[np.clip(at, 0, len(paths) - 1)], np.nan)

    ours = newest[:, 2] > trend.first_round
    first = previous[:, 2] == NEVER             # saved once: before it, the initial value (if fresh)
    usable = ours & ((previous[:, 2] > trend.first_round) | first)
    if now >= len(paths) or not usable.any():
        return np.zeros(len(newest)), np.zeros(len(newest))
    saved_path, previous_path = path_at(newest[:, 0]), path_at(previous[:, 0])
    previous_at = np.where(first, NEVER, previous[:, 0])
    factors = trend_factors(now, float(paths[now]), np.where(usable, newest[:, 0], NEVER), saved_path,
                            previous_at, previous_path, trend.fresh)
    factors[list(trend.held)] = 0.0
    last = float(paths[now] - paths[now - 1]) if now >= 1 else math.nan
    return factors, step_scales(last, factors, saved_path, previous_at, previous_path, trend.fresh)


def as_of(versions: np.ndarray, round: int) -> np.ndarray:
    """``versions`` (blocks, 2, 4) with each version written after ``round`` counted
    as never saved; where both were (the version of ``round`` was overwritten), the
    newer of the two only."""
    drop = versions[:, :, 2] > round
    both = drop.all(axis=1)
    drop[both] = False
    drop[both, pick(versions[both])[1]] = True
    return np.where(drop[:, :, None], NEVER, versions)


def prepare_chunk(chunk: Chunk, url: str | None, store_id: str, block_rows: dict[str, int], load: bool,
                  reference_dtype: str | None | bool, trends: dict[ChunkId, Trend] | None = None,
                  trail: bool = False, upto_round: int | None = None, model: Any = None) -> dict[str, int]:
    """Make a new chunk ready for checkpointing: with ``load``, overwrite its saved
    blocks from the store (reading only this chunk's blocks; the others keep their
    initial value); unless ``reference_dtype`` is False, keep a reference copy for
    priorities (the saved values) and, with ``trail``, a :class:`SaveTrail` (for
    priorities that extrapolate). Returns the bytes read and the numbers of blocks
    never saved, extrapolated, and (with ``upto_round``) saved last by an earlier round.

    With a ``trend`` for the chunk, each block is restored *extrapolated* along the
    two versions the store holds: ``newest + f * (newest - previous)``, ``f`` from
    :func:`restore_factors` (how far the chunk walked since the newest version,
    over how far it walked between the two): where a block keeps its direction, as
    gradient descent's blocks do once the slowest mode leads, that restores where it
    would be now rather than where it was when saved. The ``model`` (if given) then
    seeds the chunk's optimizer slots from the step that drift gives per iteration
    (:func:`step_scales`, :meth:`dask_scar.models.Model.restore_slots`).

    With ``upto_round`` (a rollback to the last committed round), each block comes
    back as of that round: versions that later rounds wrote are passed over (the
    survivors of a round whose writer died wrote theirs, but the round never
    committed), unless the block has no other (then the older of the two).
    """
    nbytes = never = older = 0
    value = chunk.value
    xp = get_array_module(value)
    target, moved = None, 0                     # the extrapolated value, blocks moved
    if load:
        cid, rows = chunk.id, block_rows[chunk.id.name]
        store = open_cached(url, store_id)
        blocks = list(chunk_blocks(cid, rows))
        trend = (trends or {}).get(cid)
        initial = to_host(value).copy() if trend is not None else None
        versions = store.versions(cid.name, blocks)     # the records, read once
        if upto_round is not None:
            versions = as_of(versions, upto_round)
        saved_blocks = store.read_blocks(cid.name, blocks, versions=versions)
        for b, saved in saved_blocks.items():
            start = b * rows - cid.start
            value[start:start + len(saved)] = xp.asarray(saved, dtype=value.dtype)
            nbytes += saved.nbytes
        never = len(blocks) - len(saved_blocks)
        newest = pick(versions)[0]
        if upto_round is not None:      # blocks the rounds before the one rolled back to saved last
            older = int(((newest[:, 0] != NEVER) & (newest[:, 2] < upto_round)).sum())
        if trend is not None and saved_blocks:
            before = pick(versions, previous=True)[0]
            factors, scales = restore_factors(trend, chunk.version, newest, before)
            # the versions before of the blocks that move (a block never saved has f = 0;
            # one saved once, in a fresh fit, moves from its initial value)
            moving = factors != 0
            read = store.read_blocks(cid.name, [b for b, m in zip(blocks, moving) if m], previous=True,
                                     versions=versions[moving])
            nbytes += sum(v.nbytes for v in read.values())
            # a version before that a write cut short replaced is gone: no drift to follow
            gone = moving & (before[:, 0] != NEVER) & ~np.isin(blocks, list(read))
            factors[gone] = scales[gone] = 0
            moving &= ~gone
            moved = int(moving.sum())
            if moved:
                previous = initial          # the initial value where no version before is read
                for b, before in read.items():
                    previous[b * rows - cid.start:b * rows - cid.start + len(before)] = before
                newest_value = to_host(value)
                target = extrapolated(newest_value, previous, factors, rows)
                if model is not None:
                    model.restore_slots(chunk.state, xp.asarray(drift_step(newest_value, previous, scales, rows),
                                                                dtype=value.dtype))
    if reference_dtype is not False:        # the reference: the values as saved
        chunk.reference = new_reference(value, reference_dtype)
        if trail:
            chunk.trail = SaveTrail.new(new_reference(value, reference_dtype),
                                        len(chunk_blocks(chunk.id, block_rows[chunk.id.name])), fresh=not load)
    if target is not None:
        value[...] = xp.asarray(target, dtype=value.dtype)
    return {"bytes": nbytes, "never_saved": never, "extrapolated_blocks": moved, "older_blocks": older}


def restore_reference(chunk: Chunk, initial: Any, orders: Orders) -> None:
    """Give a chunk that changed worker (a copy carries no reference) its reference
    again: the store's saved blocks, ``initial`` rows where never saved."""
    scratch = Chunk(chunk.id, {"value": initial}, chunk.version)
    prepare_chunk(scratch, orders.url, orders.store_id, orders.block_rows, True, orders.reference,
                  trail=orders.extrapolate)
    chunk.reference, chunk.trail = scratch.reference, scratch.trail


# -- on the driver ----------------------------------------------------------------------

@dataclass
class Round:
    iteration: int
    chunks: dict[str, tuple[ChunkId, tuple[int, ...]]]   # "name/index" -> the chunk and its blocks to write
    blocks: list[int]                   # global block numbers written
    priorities: np.ndarray | None       # every block's priority when selected
    reports: list[dict] = field(default_factory=list)
    abandoned: str = ""                 # why the round will never be committed
    end: bool = False                   # the fit's end round (Checkpointer.last)

    @property
    def done(self) -> bool:
        return bool(self.abandoned) or len(self.reports) >= len(self.chunks)

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.reports if r["error"]]


def choose(policy: CheckpointPolicy, layouts: dict[str, BlockLayout], ids: list[ChunkId], number: int,
           priorities: dict[str, list[float]]) -> tuple[dict[ChunkId, tuple[int, ...]], list[int], Any]:
    """Round ``number``'s blocks of each chunk in ``ids`` (those with any), every block
    chosen (global numbers) and every block's priority (None if the policy needs none):
    on the driver, and in a segment's workers, which have every chunk's priorities and
    choose exactly the same blocks."""
    offsets, n = _offsets(layouts)
    values = None
    if policy.needs_priorities:
        values = np.zeros(n)
        for cid in ids:
            span = chunk_blocks(cid, layouts[cid.name].block_rows)
            offset = offsets[cid.name]
            values[offset + span.start:offset + span.stop] = priorities[cid.tag]
    chosen = set(policy.select(n, number, values).tolist())
    blocks = {}
    for cid in ids:
        mine = tuple(b for b in chunk_blocks(cid, layouts[cid.name].block_rows) if offsets[cid.name] + b in chosen)
        if mine:
            blocks[cid] = mine
    return blocks, sorted(chosen), values


def _offsets(layouts: dict[str, BlockLayout]) -> tuple[dict[str, int], int]:
    """Each parameter's first global block number, and the blocks of all of them."""
    offsets, n = {}, 0
    for name, lay in layouts.items():
        offsets[name], n = n, n + lay.n_blocks
    return offsets, n


def with_round(orders: Orders, number: int, blocks: dict[ChunkId, tuple[int, ...]], version: int,
               then: Orders | None) -> Orders:
    """Orders that write round ``number`` (``blocks`` of ``version``, the iteration
    ``orders`` were for) and do what ``then``, the iteration's own orders, say."""
    return Orders(**{**orders.__dict__, "round": number, "blocks": blocks, "version": version,
                     "priorities": then is not None and then.priorities, "keep": then is not None and then.keep})


def idle():
    """Within a training task: a wait (for other workers' contributions) that counts
    as a gap between training tasks, when this process's writer may write."""
    return _running(-1)


class Checkpointer:
    """The driver's side of checkpointing: when, which blocks, and the rounds in flight."""

    def __init__(self, store: ZarrStore, policy: CheckpointPolicy, layouts: dict[str, BlockLayout],
                 run: str, store_id: str, epoch: int, last_round: int, backlog: int,
                 reference: str | None | bool = False, extrapolate: bool = False):
        self.store = store
        self.policy = policy
        self.layouts = layouts
        self.backlog = backlog
        self.base = Orders(run, store.url, store_id, epoch, {n: lay.block_rows for n, lay in layouts.items()},
                           reference, extrapolate=extrapolate)
        self.round = last_round
        self.recovered_at = last_round         # the last round chosen before this fit's last recovery
        self.tried = last_round                # the newest round whose commit was tried (once each)
        self.finished = (last_round, -1)       # the newest round written in full: number, iteration
        self.rounds: dict[int, Round] = {}
        self.pending: list[Orders] = []        # selected, to be written by the next graphs
        self.notes: dict[int, list[str]] = {}  # iteration -> warnings for the history
        self.early: list[dict] = []            # writers' reports of rounds not chosen here yet
        self.stopped: dict[int, int] = {}      # rounds of stopped segments -> their last iteration kept
        self.lost = ""                         # why this fit writes the store no more (gone, taken over)
        self.usable_from: set[str] = set()     # workers known to use the store (checked)
        self.started_from = 0                  # the round whose versions the fit started from (a resume's)
        #: called as ``on_saved(iteration, {"name/index": blocks}, block_rows)`` when a
        #: writer reports blocks written with their values of ``iteration``
        self.on_saved: Callable[[int, dict, dict], None] | None = None
        self._warned = False
        self._logged = 0.0      # when the log last got a note (after the first, a warning)
        self._last_note: str | None = None     # the last note (a failure) of this fit
        self._unlogged = 0      # notes since, in the history only

    def check(self, client: Client, workers: set[str], hint: str) -> None:
        """Raise :class:`CheckpointError` if one of ``workers``, not checked before (they
        joined during the fit), cannot use the store; before a chunk goes to them."""
        new = sorted(workers - self.usable_from)
        if new and not self.lost:
            self.usable_from |= check_workers(client, self.store.url, self.base.store_id, new, joined=True, hint=hint)

    # -- orders ------------------------------------------------------------------------
    def orders(self, iteration: int) -> Orders | None:
        """Orders for the graph of ``iteration`` (None when it has nothing to do): the
        oldest round selected and not yet handed out, and if the policy is due after
        ``iteration``, keep (and rank) its new values."""
        due = self.policy.due(iteration) and not self.lost
        pending = self.pending.pop(0) if self.pending else None
        if pending is None and not due:
            return None
        base = pending or self.base
        return Orders(**{**base.__dict__, "priorities": due and self.policy.needs_priorities, "keep": due})

    def select(self, iteration: int, ids: list[ChunkId], priorities: dict[str, list[float]]) -> None:
        """After ``iteration`` finished: if the policy is due, choose the round's blocks."""
        if not self.policy.due(iteration) or self.lost:
            return
        blocks, chosen, values = choose(self.policy, self.layouts, ids, self.round + 1, priorities)
        self._add(iteration, blocks, chosen, values)
        reports, self.early = self.early, []
        for report in reports:
            self.on_written(report)

    def last(self, iteration: int, ids: list[ChunkId]) -> None:
        """After the fit's last iteration: a round of every block that no round of
        ``iteration`` writes already, so that the store ends where the fit did (a
        resume goes on from there exactly)."""
        if self.lost:
            return
        # (rounds before a recovery wrote values it may have replaced; a failed one, none)
        written = {(key, b) for number, rnd in self.rounds.items()
                   if rnd.iteration == iteration and number > self.recovered_at and not rnd.abandoned
                   and not rnd.errors for key, (_, blocks) in rnd.chunks.items() for b in blocks}
        offsets = _offsets(self.layouts)[0]
        blocks = {}
        for cid in ids:
            rest = tuple(b for b in chunk_blocks(cid, self.layouts[cid.name].block_rows)
                         if (cid.tag, b) not in written)
            if rest:
                blocks[cid] = rest
        if blocks:
            self._add(iteration, blocks, sorted(offsets[c.name] + b for c, bs in blocks.items() for b in bs), None,
                      end=True)

    def _add(self, iteration: int, blocks: dict[ChunkId, tuple[int, ...]], chosen: list[int],
             priorities: Any, end: bool = False) -> None:
        """The next round: ``blocks`` of each chunk (``chosen``: their global numbers)
        with their values of ``iteration``, to be written by the next graph submitted."""
        self.round += 1
        self.rounds[self.round] = Round(iteration, {c.tag: (c, b) for c, b in blocks.items()},
                                        chosen, priorities, end=end)
        self.pending.append(Orders(**{**self.base.__dict__, "round": self.round, "blocks": blocks,
                                      "version": iteration}))

    def handed_out(self, iteration: int) -> None:
        """The round chosen after ``iteration`` is being written already: a segment's
        workers chose the same blocks themselves (see :func:`choose`)."""
        self.pending = [orders for orders in self.pending if orders.version != iteration]

    def skip(self, rounds: int, done: int) -> None:
        """Rounds a stopped segment's workers may have begun to write: their numbers
        are not used again. Their blocks stay in the store, never committed, and a
        recovery may read them: :attr:`on_saved` hears of those of iterations up to
        ``done``, the segment's last that training keeps."""
        self.stopped.update({number: done for number in range(self.round + 1, self.round + rounds + 1)})
        self.round += rounds
        reports, self.early = self.early, []
        for report in reports:
            self.on_written(report)

    def flush(self, client: Client, chunks, model: Any) -> list:
        """Submit the rounds still waiting for a graph to carry them; returns their futures."""
        pending, self.pending = self.pending, []
        futures = []
        for orders in pending:
            for worker, ids in chunks.by_worker().items():
                own = [cid for cid in ids if cid in orders.blocks]
                if own:
                    futures.append(client.submit(save_task, [chunks.futures[c] for c in own], orders, model,
                                                 workers=[worker], allow_other_workers=False, pure=False))
        return futures

    # -- reports -----------------------------------------------------------------------
    def outstanding(self) -> int:
        return sum(1 for r in self.rounds.values() if not r.done)

    def on_written(self, report: dict) -> None:
        if report.get("kind") != "written":
            return
        number = report["round"]
        rnd = self.rounds.get(number)
        if rnd is None:
            if number > self.round:         # a segment chose it before this driver did
                self.early.append(report)
            elif report["version"] <= self.stopped.get(number, -1):    # not of an iteration done again
                self._saved(report)
            return
        rnd.reports.append(report)
        self._saved(report)
        if not rnd.done or rnd.abandoned:
            return
        if rnd.errors:
            try:
                self.store.check_present()      # its writers found it deleted: said once, as commit does
            except CheckpointError as exc:
                if not self.lost:
                    self.lose(exc, rnd.iteration)
                return
            message = (f"checkpoint round {report['round']} (iteration {rnd.iteration}) failed: "
                       f"{rnd.errors[0]}; the store keeps its older blocks and training goes on")
            self._note(rnd.iteration, message)
        elif report["round"] > self.finished[0]:
            self.finished = (report["round"], rnd.iteration)

    def _saved(self, report: dict) -> None:
        if not report["error"] and self.on_saved is not None:
            self.on_saved(report["version"], {f"{report['parameter']}/{report['chunk']}": report["blocks"]},
                          self.base.block_rows)

    def commit(self) -> None:
        """Record the newest round whose writers all reported in the store's manifest
        (once per batch of reports the driver takes in: a segment's end brings several
        rounds' at once, and one write of the manifest takes ~2 ms)."""
        number, iteration = self.finished
        if number > self.tried and not self.lost:
            self.tried = number
            try:
                self.store.commit({"round": number, "iteration": iteration, "epoch": self.base.epoch,
                                   "run": self.base.run, "time": time.time()})
            except CheckpointError as exc:      # gone, or another fit's now
                self.lose(exc, iteration)
                return
            except OSError as exc:              # a full disk, lost permission: a later round may commit
                newest = self.store.manifest.get("round")      # as last committed (a failed write keeps it)
                kept = f"keeps round {newest} as its newest" if newest else "has no round yet"
                self._note(iteration, f"could not record checkpoint round {number} (iteration {iteration}) in "
                                      f"the checkpoint store at {self.store.url}: {exc}; the store {kept} and "
                                      "training goes on")
                return

    def lose(self, exc: CheckpointError, iteration: int) -> None:
        """The store is gone, or another fit's now: this fit goes on without checkpoints."""
        self.lost = f"{exc}; this fit goes on without checkpoints"
        self._note(iteration, self.lost, repeats=False)
        self.abandon(self.lost, warn=False)

    def abandon(self, reason: str, warn: bool = True) -> None:
        """Give up on the rounds in flight and the one selected but not yet handed
        out: they are never committed. Blocks their writers still write land in the
        store with their own records (a later round or a recovery may use them)."""
        self.pending = []
        for number, rnd in self.rounds.items():
            if not rnd.done:
                rnd.abandoned = reason
                message = f"checkpoint round {number} (iteration {rnd.iteration}) abandoned: {reason}"
                if warn:
                    self._note(rnd.iteration, message)
                else:
                    logger.info(message)

    def drop_pending(self, reason: str) -> None:
        """Give up on the rounds selected and not yet handed out (when chunks move:
        the values they write were kept where the chunks were)."""
        for orders in self.pending:
            self.rounds[orders.round].abandoned = reason
            logger.info("checkpoint round %d (iteration %d) abandoned: %s", orders.round, orders.version, reason)
        self.pending = []

    def recovered(self) -> None:
        """After a recovery: rounds in flight may miss a dead writer, and the values
        selected for the next round may have been replaced; blocks are written in the
        next epoch from now on (a resumed fit's first is the store's last plus one)."""
        self.abandon("training recovered from worker loss", warn=False)
        self.base = Orders(**{**self.base.__dict__, "epoch": self.base.epoch + 1})
        self.recovered_at = self.round

    def _note(self, iteration: int, message: str, repeats: bool = True) -> None:
        """Into the history; a warning the first time in a fit, and after that into the
        log, a note that ``repeats`` (a round's failure) at most once every
        :data:`NOTE_SECONDS` (a store that fails every round filled a batch job's log
        with hundreds of lines a second)."""
        self.notes.setdefault(iteration, []).append(message)
        self._last_note = message
        if not repeats and self._warned:
            logger.warning(message)
        elif not self._warned:
            self._warned, self._logged = True, time.monotonic()
            warnings.warn(message + " (later failures of this fit: see history['event'])", CheckpointWarning,
                          stacklevel=callers_level())
        elif time.monotonic() - self._logged >= NOTE_SECONDS:
            since = f" ({self._unlogged} more since the last, in history['event'])" if self._unlogged else ""
            logger.warning(message + since)
            self._logged, self._unlogged = time.monotonic(), 0
        else:
            self._unlogged += 1

    def behind(self, iteration: int) -> str:
        """What to say at the end of a fit that reached ``iteration`` where the store's
        last committed round is older than the fit's newest round (its writes or its
        record failed, as a note said); "" where it is not (rounds abandoned by a recovery
        do not count), or where the fit lost the store (said then)."""
        rounds = [rnd.iteration for rnd in self.rounds.values() if not rnd.abandoned]
        if self.lost or self._last_note is None or not rounds:
            return ""
        committed = int(self.store.manifest.get("iteration", 0))
        if committed >= max(rounds):
            return ""
        return (f"the checkpoint store {self.store.url} committed iteration {committed} last, and this fit reached "
                f"{iteration}: its later rounds were not all written or recorded (the last failure: "
                f"{self._last_note}). fit(..., resume=True) would go on from iteration "
                f"{self.store.resumes_from()}, with the blocks written since")

    def table(self) -> pd.DataFrame:
        """One row per round: what was written, and with what result."""
        return pd.DataFrame(
            [{"round": number, "iteration": r.iteration, "blocks": r.blocks,
              "bytes": sum(x["bytes"] for x in r.reports), "seconds": sum(x["seconds"] for x in r.reports),
              "error": "; ".join(r.errors) or r.abandoned, "priorities": r.priorities, "end": r.end}
             for number, r in self.rounds.items()],
            columns=["round", "iteration", "blocks", "bytes", "seconds", "error", "priorities", "end"])

    def columns(self) -> dict[int, dict[str, Any]]:
        """Per iteration: bytes written and seconds spent writing by the round of that iteration."""
        out: dict[int, dict[str, Any]] = {}
        for rnd in self.rounds.values():
            row = out.setdefault(rnd.iteration, {"checkpoint_bytes": 0, "checkpoint_seconds": 0.0})
            row["checkpoint_bytes"] += sum(r["bytes"] for r in rnd.reports)
            row["checkpoint_seconds"] += sum(r["seconds"] for r in rnd.reports)
        return out
