"""The driver: runs training iterations on a Dask cluster, one task graph each."""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import time
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
from distributed import Client, Future
from tqdm.auto import tqdm

from . import checkpoint, config, data, iteration
from .backend import array_module
from .checkpoint import Checkpointer
from .chunks import PROGRESS_TOPIC, ParameterChunks, place, release_keys, split_rows
from .exceptions import CheckpointError, DivergenceError, ScarError
from .models import Model
from .plugin import ensure_plugin, set_epoch
from .policy import CheckpointPolicy, default_policy
from .recovery import (ClusterWatch, Drift, Interrupted, RecoveryEvent, Restore, live_workers, recover,
                       wait_watching)
from .store import ZarrStore, make_layouts, probe

logger = logging.getLogger(__name__)

RECOVERY_MODES = ("partial", "full")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    ``history`` has one row per iteration: ``iteration``, ``loss`` (the objective
    at the parameters the iteration started from), ``seconds`` (wall time of the
    iteration), ``checkpoint_bytes`` and ``checkpoint_seconds`` (bytes the
    checkpoint round of this iteration's values took in the store, and seconds the
    workers spent writing them, in the background) and ``event`` (warnings, such as
    a failed checkpoint write). ``params`` maps each parameter name to a NumPy array.
    ``checkpoints`` has one row per checkpoint round: ``round``, ``iteration``,
    ``blocks`` (block numbers written, across parameters in layout order),
    ``bytes``, ``seconds``, ``error`` and ``priorities`` (every block's distance
    from its last save when the round was chosen; None for policies without).
    """

    history: pd.DataFrame
    params: dict[str, np.ndarray]
    n_iter: int
    converged: bool
    events: list[Any] = field(default_factory=list)
    checkpoints: pd.DataFrame | None = None


class Trainer:
    """Data-parallel training of a dask_scar model on a Dask cluster.

    The model's parameters are split by rows into ``n_chunks`` chunks held on the
    workers; the data stays on the workers as one block each. Every iteration is
    one task graph (see :mod:`dask_scar.iteration`).

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster to train on.
    model : Model
        ``SoftmaxRegression``, ``LinearRegression`` or ``MatrixFactorization``.
    store : str or os.PathLike, optional
        Path or fsspec URL (``file://``, ``s3://``...) of a Zarr checkpoint store
        that every worker can write. None: no checkpoints.
    policy : CheckpointPolicy, optional
        Which blocks to save when (:mod:`dask_scar.policy`); default
        ``PrioritizedCheckpoint(scar.checkpoint.fraction, every=scar.checkpoint.every)``
        when a store is given.
    recovery : {"partial", "full"}
        How to recover from worker loss (worker-loss recovery arrives in a later
        version; today a lost worker ends ``fit``, and ``resume=True`` continues
        from the store).
    n_chunks : int, optional
        Chunks per parameter; default ``scar.chunks-per-worker`` times the workers.
    backend : {"numpy", "cupy"}
        Array library on the workers: CuPy keeps data blocks and chunks on the GPU.

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> import dask_scar as scar
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> trainer = scar.Trainer(client, scar.SoftmaxRegression())           # doctest: +SKIP
    >>> result = trainer.fit(ddf, target="label", max_iter=200)            # doctest: +SKIP
    >>> result.history.tail()                                              # doctest: +SKIP
    """

    def __init__(self, client: Client, model: Model, store: Any = None, policy: Any = None,
                 recovery: str = "partial", n_chunks: int | None = None, backend: str = "numpy"):
        if store is not None and not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store must be a path or URL, got {type(store).__name__}")
        if policy is not None and not isinstance(policy, CheckpointPolicy):
            raise TypeError(f"policy must be a dask_scar CheckpointPolicy such as "
                            f"PrioritizedCheckpoint(0.25, every=5), got {policy!r}")
        if policy is not None and store is None:
            raise ValueError("policy= needs store=: the path or URL where checkpoints are written")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
        if n_chunks is not None and (not isinstance(n_chunks, int) or n_chunks < 1):
            raise ValueError(f"n_chunks must be a positive integer or None, got {n_chunks!r}")
        if not isinstance(model, Model):
            raise TypeError(f"model must be a dask_scar model, got {type(model).__name__}")
        array_module(backend)  # fail now, with an install hint, if CuPy is missing
        self.client = client
        self.model = model
        self.store = None if store is None else os.fspath(store)
        self.policy = policy if policy is not None or store is None else default_policy()
        self.recovery = recovery
        self.n_chunks = n_chunks
        self.backend = backend

    def fit(self, frame: Any, target: str | None = None, features: list[str] | None = None,
            max_iter: int = 100, tol: float = 1e-6, resume: bool = False,
            progress: bool | None = None, callback: Callable[[int, float], Any] | None = None) -> FitResult:
        """Train on ``frame`` (a Dask or pandas DataFrame).

        Stops after ``max_iter`` iterations in all (counting those before a
        resume), or once the loss changes by less than ``tol`` relative to its size
        between two iterations (``tol=0`` never stops early). With ``resume=True``
        the parameters are loaded from the store (each block as last saved, the
        others as initialised) and the iteration count goes on from the store's
        last committed round. Raises :class:`~dask_scar.exceptions.DataError` for
        unusable data and :class:`~dask_scar.exceptions.CheckpointError` for an
        unusable store, before any training.

        When a worker dies, the chunks it held are restored (see ``recovery=``) and
        training goes on; each recovery is a :class:`~dask_scar.RecoveryEvent` in
        ``result.events`` and noted in the ``event`` column of the history row of
        the iteration that was redone. Losing the scheduler raises
        :class:`~dask_scar.exceptions.SchedulerLostError`.

        ``callback(iteration, loss)``, if given, runs in the calling thread after
        every iteration (logging, a custom stopping rule: it may raise to stop).
        """
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if resume and self.store is None:
            raise ValueError("resume=True needs the Trainer's store=: the checkpoint to resume from")
        client, model = self.client, self.model
        if self.store is not None:
            _check_store_path(self.store, resume)
        ensure_plugin(client)
        training = data.prepare(client, model, frame, target, features, self.backend)
        workers = sorted(live_workers(client))
        n_chunks = self.n_chunks or config.get("chunks-per-worker") * len(workers)
        layouts = make_layouts({name: (spec.shape, spec.dtype) for name, spec in model.parameter_specs().items()},
                               n_chunks, config.get("checkpoint.blocks-per-chunk"))
        run = uuid.uuid4().hex[:8]
        store, ckpt, start, prepare = self._open_store(layouts, run, resume)
        if store is not None:
            layouts = store.layouts
        chunks = ParameterChunks(client, run, place(split_rows(layouts, n_chunks), workers), version=start)
        hint = (f"; the checkpoint store {self.store} holds the model as last saved: fit(..., resume=True) "
                "continues from it" if store is not None else "")
        restore = Restore(chunks, lambda ids, version: chunks.initialize(model, self.backend, version,
                                                                          prepare(True), ids),
                          self.recovery, lambda: int(store.manifest.get("iteration", 0)) if store else 0, hint)
        bar = tqdm(total=max_iter, initial=start, unit="it", desc=type(model).__name__,
                   disable=not config.get("progress", progress))
        training_run = _Run(model, training, chunks, ckpt, restore, bar)
        try:
            training_run.start(lambda: chunks.initialize(model, self.backend, start, prepare(resume)))
            converged = training_run.iterate(start + 1, max_iter, tol, callback)
            params = training_run.finish()
        finally:
            training_run.close()
        rows = training_run.rows
        model.params_ = params
        model.n_iter_ = rows[-1]["iteration"] if rows else start
        return FitResult(history=_history(rows, ckpt), params=params, n_iter=model.n_iter_, converged=converged,
                         events=training_run.events, checkpoints=ckpt.table() if ckpt is not None else None)

    def _open_store(self, layouts: dict, run: str, resume: bool):
        """The store, the run's Checkpointer, the first iteration and how chunks are
        prepared, for a fresh or a resumed run (nothing when there is no store)."""
        if self.store is None:
            return None, None, 0, lambda load: None
        model, policy = self.model, self.policy
        meta = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "params": model.get_params()}
        if resume:
            store = ZarrStore.open(self.store, mode="r+")
            store.check_compatible(meta, layouts)
        else:
            store = ZarrStore.create(self.store, meta, layouts, policy.to_json())
        manifest = store.manifest
        start = int(manifest.get("iteration", 0))
        epoch = int(manifest.get("epoch", -1)) + 1
        store_id = store.meta["id"]
        errors = self.client.run(checkpoint.check_access, store.url, store_id, on_error="return")
        for worker, error in sorted(errors.items()):
            if isinstance(error, BaseException):
                raise CheckpointError(f"worker {worker} cannot use the checkpoint store: {error}") from error
        reference = getattr(policy, "reference_dtype", None) if policy.needs_priorities else False
        ckpt = Checkpointer(store, policy, store.layouts, run, store_id, epoch,
                            int(manifest.get("round", 0)), config.get("checkpoint.backlog"), reference)

        def prepare(load: bool) -> Callable:
            """How new chunks are made ready: from the store's blocks if ``load``."""
            return functools.partial(checkpoint.prepare_chunk, url=store.url, store_id=store_id,
                                     block_rows=ckpt.base.block_rows, load=load, reference_dtype=reference)

        return store, ckpt, start, prepare


class _Run:
    """One call of :meth:`Trainer.fit` on the cluster: the iterations, and the
    recoveries between them."""

    def __init__(self, model: Model, training: data.TrainingData, chunks: ParameterChunks,
                 ckpt: Checkpointer | None, restore: Restore, bar: tqdm):
        self.model, self.training, self.chunks, self.ckpt, self.restore, self.bar = (
            model, training, chunks, ckpt, restore, bar)
        self.client = chunks.client
        self.timeout = config.get("iteration-timeout")
        self.watch = ClusterWatch(self.client)
        self.drift = Drift(chunks.ids, chunks.version)
        if ckpt is not None:
            ckpt.on_saved = self.drift.saved
        self.rows: list[dict] = []
        self.events: list[RecoveryEvent] = []
        self.note = ""                      # what happened before the next row: a recovery, a rebalance
        self.inbox: queue.Queue = queue.Queue()
        self.previous: list[Future] = []    # futures of the last graph, released after the next submit
        self.stale: list[Future] = []       # chunk futures of the last version, likewise
        run = chunks.run

        def on_progress(event: tuple[float, dict]) -> None:
            # runs on the client's event loop: hand over, never block
            if event[1].get("run") == run:
                self.inbox.put(event[1])

        self.client.subscribe_topic(PROGRESS_TOPIC, on_progress)

    def owners(self) -> set[str]:
        return set(self.chunks.owner.values())

    def wait(self, futures: list[Future]) -> None:
        wait_watching(futures, self.watch, self.owners, self.timeout, self.restore.hint)

    def completed(self, futures: list[Future]) -> bool:
        """Wait for ``futures``; False if a worker holding chunks went meanwhile.
        (Recovery runs outside of any ``except`` block: an exception raised and caught
        there would chain to the one being handled, and keep its frames, with their
        futures, alive until the garbage collector runs.)"""
        try:
            self.wait(futures)
            return True
        except Interrupted:
            return False

    def start(self, submit: Callable[[], list[Future]]) -> None:
        """Create every chunk (``submit()`` starts the tasks); placed afresh if a worker goes meanwhile."""
        chunks = self.chunks
        while True:
            futures = submit()
            made = [chunks.key(cid, chunks.version) for cid in chunks.ids]
            try:
                self.wait(futures)
                break
            except Interrupted:
                chunks.epoch += 1
                set_epoch(self.client, chunks.run, chunks.epoch)
                release_keys(self.client, made)
                chunks.owner = place(chunks.ids, sorted(live_workers(self.client)))
            except BaseException:
                release_keys(self.client, made)   # the chunks that were created
                raise
        chunks.advance(chunks.version)

    def iterate(self, first: int, max_iter: int, tol: float, callback: Callable | None) -> bool:
        """Iterations ``first..max_iter``; True if they stopped at ``tol``."""
        chunks, ckpt, client = self.chunks, self.ckpt, self.client
        divergence_factor = config.get("divergence-factor")
        last_done = time.perf_counter()
        k = first
        while k <= max_iter:
            if self.watch.noticed(self.owners()) is not None:
                k = self.recover(k)     # lost between iterations: recover before submitting work
                continue
            if self.watch.added:
                self.note = _join(self.note, _rebalance(chunks, self.watch))
            orders = None
            if ckpt is not None:
                orders = ckpt.orders(k)
                if orders is not None and orders.blocks:
                    _drain(self.inbox, ckpt, self.timeout, until=lambda: ckpt.outstanding() <= ckpt.backlog + 1)
            _forget_dead_block_workers(self.training, self.watch)
            graph = iteration.build(self.model, chunks, [b.key for b in self.training.blocks],
                                    self.training.workers, k, client.id, orders)
            futures = client.get(graph.graph, graph.update_keys, sync=False)
            # Releases go out after the new graph, so they never delay it (the
            # client batches its messages to the scheduler in 10 ms windows).
            self.previous = self.stale = []
            if not self.completed(futures):
                del futures
                k = self.recover(k)
                continue
            self.stale = chunks.advance(k)
            self.previous = futures
            # The update tasks' events were sent before they finished: they are here.
            loss, priorities, steps = _collect(self.inbox, ckpt, k, chunks.epoch,
                                               orders is not None and orders.priorities, len(chunks.ids),
                                               self.timeout)
            self.drift.record(k, steps)
            self.drift.prioritized(k, priorities)
            if ckpt is not None:
                ckpt.select(k, chunks.ids, priorities)
            now = time.perf_counter()
            self.rows.append({"iteration": k, "loss": loss, "seconds": now - last_done, "event": self.note})
            self.note, last_done = "", now
            self.bar.update(k - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.6g}", refresh=False)
            _check_divergence(self.rows, divergence_factor, self.model)
            if callback is not None:
                callback(k, loss)
            if tol > 0 and len(self.rows) > 1 and _converged(self.rows[-2]["loss"], loss, tol):
                return True
            k += 1
        return False

    def recover(self, k: int) -> int:
        """Recover from worker loss noticed while iteration ``k`` was due; returns
        the iteration to go on with."""
        noticed = self.watch.noticed(self.owners()) or time.time()
        event = recover(self.restore, self.watch, k, noticed, self.drift)
        if self.ckpt is not None:
            self.ckpt.recovered(self.chunks.epoch)
        logger.warning("dask_scar: %s", event.describe())
        self.events.append(event)
        self.note = _join(self.note, event.describe())
        return event.resumed_at + 1

    def finish(self) -> dict[str, np.ndarray]:
        """Write the last checkpoint round and gather the parameters."""
        ckpt = self.ckpt
        while True:
            # the round selected after the last iteration has no graph to carry it
            if ckpt is None or self.completed(ckpt.flush(self.client, self.chunks)):
                if ckpt is not None:
                    _drain(self.inbox, ckpt, self.timeout, until=lambda: ckpt.outstanding() == 0)
                if self.watch.noticed(self.owners()) is None:
                    params = self.gather()
                    if params is not None:
                        return params
            # lost after the last iteration: the parameters are what recovery restores
            self.recover(self.chunks.version + 1)

    def gather(self) -> dict[str, np.ndarray] | None:
        try:
            return self.chunks.gather()
        except CancelledError as exc:
            exc.__traceback__ = None    # see completed()
            return None

    def close(self) -> None:
        self.client.unsubscribe_topic(PROGRESS_TOPIC)
        self.watch.close()
        self.bar.close()
        release_keys(self.client, [f.key for f in [*self.previous, *self.stale, *self.chunks.futures.values()]])
        self.previous = self.stale = []
        self.chunks.release()
        _end_run(self.client, self.chunks.run)


def _check_store_path(url: str, resume: bool) -> None:
    """Before any work: the store path suits ``resume`` and can be written."""
    exists = ZarrStore.exists(url)
    if resume and not exists:
        raise CheckpointError(f"resume=True, but there is no dask_scar checkpoint store at {url}")
    if not resume and exists:
        raise CheckpointError(
            f"{url} already holds a dask_scar checkpoint: pass resume=True to continue from it, or "
            "delete it or choose another store path to start afresh")
    probe(url)


def _collect(inbox: queue.Queue, ckpt: Checkpointer | None, iteration: int, epoch: int, want_priorities: bool,
             n_chunks: int, timeout: float) -> tuple[float, dict[str, list[float]], dict[str, float]]:
    """The loss, the chunks' step norms and (if asked for) block priorities that
    ``iteration``'s update tasks sent; events of abandoned work are dropped."""
    loss, priorities, steps = None, {}, {}
    while loss is None or len(steps) < n_chunks or (want_priorities and len(priorities) < n_chunks):
        try:
            message = inbox.get(timeout=timeout)
        except queue.Empty:
            raise ScarError(f"no loss arrived for iteration {iteration}: is the scheduler's ScarPlugin from "
                            "another dask_scar version? Install the same version everywhere") from None
        if message.get("kind") == "written":
            ckpt.on_written(message)
            continue
        if message.get("iteration") != iteration or message.get("epoch") != epoch:
            continue
        if message.get("loss") is not None:
            loss = message["loss"]
        steps.update(message["steps"])
        priorities.update(message.get("priorities") or {})
    return loss, priorities, steps


def _drain(inbox: queue.Queue, ckpt: Checkpointer, timeout: float, until: Callable[[], bool]) -> None:
    """Take the writers' reports in until ``until()``; warn about rounds that never report."""
    while not until():
        try:
            ckpt.on_written(inbox.get(timeout=timeout))
        except queue.Empty:
            ckpt.abandon(f"no report from the checkpoint writers within scar.iteration-timeout={timeout}s")
    while True:
        try:
            ckpt.on_written(inbox.get_nowait())
        except queue.Empty:
            return


def _history(rows: list[dict], ckpt: Checkpointer | None) -> pd.DataFrame:
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


def _rebalance(chunks: ParameterChunks, watch: ClusterWatch) -> str:
    """Give workers that joined a share of the chunks: the next update of a moved
    chunk runs on its new owner (its value travels there; nothing is restored)."""
    watch.take_added()
    alive = live_workers(chunks.client)
    load = {w: [] for w in sorted(alive)}
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


def _forget_dead_block_workers(training: data.TrainingData, watch: ClusterWatch) -> None:
    """A data block whose worker died is rebuilt by Dask wherever the scheduler
    chooses: its tasks lose their placement, and get it back once it exists."""
    if watch.removed and any(w in watch.removed for w in training.workers if w):
        training.workers = [None if w in watch.removed else w for w in training.workers]
    elif None in training.workers:
        holders = training.blocks[0].client.who_has(training.blocks)
        training.workers = [sorted(holders.get(b.key, ()))[0] if holders.get(b.key) else None
                            for b in training.blocks]


def _end_run(client: Client, run: str) -> None:
    if client.status != "running":
        return      # the scheduler is gone: nothing to tidy, and an rpc would wait to time out
    try:
        set_epoch(client, run, None)
    except Exception:  # noqa: BLE001  (the scheduler is gone: nothing to tidy)
        logger.debug("could not tell the scheduler that run %s ended", run, exc_info=True)


def _converged(previous: float, current: float, tol: float) -> bool:
    return abs(previous - current) <= tol * max(abs(previous), abs(current), 1e-300)


def _check_divergence(rows: list[dict], factor: float, model: Model) -> None:
    loss = rows[-1]["loss"]
    if not math.isfinite(loss) or loss > factor * max(abs(rows[0]["loss"]), 1e-12):
        hint = (f"lower learning_rate (now {model.learning_rate}) or scale the features"
                if hasattr(model, "learning_rate") else "check the data's scale and the model's l2")
        raise DivergenceError(f"training diverged: loss {loss:.6g} at iteration {rows[-1]['iteration']} "
                              f"(it started at {rows[0]['loss']:.6g}); {hint}")
