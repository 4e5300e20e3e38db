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
from distributed import Client, Future, wait
from tqdm.auto import tqdm

from . import checkpoint, config, data, iteration
from .backend import array_module
from .checkpoint import Checkpointer
from .chunks import PROGRESS_TOPIC, ParameterChunks, place, split_rows
from .exceptions import CheckpointError, DivergenceError, ScarError, WorkerLostError
from .models import Model
from .plugin import ensure_plugin
from .policy import CheckpointPolicy, default_policy
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
            progress: bool | None = None) -> FitResult:
        """Train on ``frame`` (a Dask or pandas DataFrame).

        Stops after ``max_iter`` iterations in all (counting those before a
        resume), or once the loss changes by less than ``tol`` relative to its size
        between two iterations (``tol=0`` never stops early). With ``resume=True``
        the parameters are loaded from the store (each block as last saved, the
        others as initialised) and the iteration count goes on from the store's
        last committed round. Raises :class:`~dask_scar.exceptions.DataError` for
        unusable data and :class:`~dask_scar.exceptions.CheckpointError` for an
        unusable store, before any training.
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
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        n_chunks = self.n_chunks or config.get("chunks-per-worker") * len(workers)
        layouts = make_layouts({name: (spec.shape, spec.dtype) for name, spec in model.parameter_specs().items()},
                               n_chunks, config.get("checkpoint.blocks-per-chunk"))
        run = uuid.uuid4().hex[:8]
        store, ckpt, start, prepare = self._open_store(layouts, run, resume)
        if store is not None:
            layouts = store.layouts
        chunks = ParameterChunks(client, run, place(split_rows(layouts, n_chunks), workers))
        timeout = config.get("iteration-timeout")
        hint = (f"; the checkpoint store {self.store} holds the model as last saved: fit(..., resume=True) "
                "continues from it" if store is not None else "")
        try:
            _wait(chunks.initialize(model, self.backend, start, prepare), chunks, timeout, hint)
        except BaseException:
            chunks.advance(start)   # take the chunks that were created, to let them go
            chunks.release()
            raise
        chunks.advance(start)
        data_blocks = [b.key for b in training.blocks]

        rows: list[dict] = []
        converged = False
        divergence_factor = config.get("divergence-factor")
        bar = tqdm(total=max_iter, initial=start, unit="it", desc=type(model).__name__,
                   disable=not config.get("progress", progress))
        inbox: queue.Queue = queue.Queue()

        def on_progress(event: tuple[float, dict]) -> None:
            # runs on the client's event loop: hand over, never block
            if event[1].get("run") == run:
                inbox.put(event[1])

        client.subscribe_topic(PROGRESS_TOPIC, on_progress)
        previous: list[Future] = []     # futures of the last graph, released after the next submit
        stale: list[Future] = []        # chunk futures of the last version, likewise
        last_done = time.perf_counter()
        try:
            for k in range(start + 1, max_iter + 1):
                orders = None
                if ckpt is not None:
                    orders = ckpt.orders(k)
                    if orders is not None and orders.blocks:
                        _drain(inbox, ckpt, timeout, until=lambda: ckpt.outstanding() <= ckpt.backlog + 1)
                graph = iteration.build(model, chunks, data_blocks, training.workers, k, client.id, orders)
                futures = client.get(graph.graph, graph.update_keys, sync=False)
                # Releases go out after the new graph, so they never delay it (the
                # client batches its messages to the scheduler in 10 ms windows).
                previous = stale = []
                _wait(futures, chunks, timeout, hint)
                stale = chunks.advance(k)
                previous = futures
                # The update tasks' events were sent before they finished: they are here.
                loss, priorities = _collect(inbox, ckpt, k, orders is not None and orders.priorities,
                                            len(chunks.ids), timeout)
                if ckpt is not None:
                    ckpt.select(k, chunks.ids, priorities)
                now = time.perf_counter()
                rows.append({"iteration": k, "loss": loss, "seconds": now - last_done})
                last_done = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.6g}", refresh=False)
                _check_divergence(rows, divergence_factor, model)
                if tol > 0 and len(rows) > 1 and _converged(rows[-2]["loss"], loss, tol):
                    converged = True
                    break
            if ckpt is not None:
                # the round selected after the last iteration has no graph to carry it
                _wait(ckpt.flush(client, chunks), chunks, timeout, hint)
                _drain(inbox, ckpt, timeout, until=lambda: ckpt.outstanding() == 0)
            params = chunks.gather()
        finally:
            client.unsubscribe_topic(PROGRESS_TOPIC)
            bar.close()
            del previous, stale
            chunks.release()
        model.params_ = params
        model.n_iter_ = start + len(rows)
        history = _history(rows, ckpt)
        return FitResult(history=history, params=params, n_iter=start + len(rows), converged=converged,
                         checkpoints=ckpt.table() if ckpt is not None else None)

    def _open_store(self, layouts: dict, run: str, resume: bool):
        """The store, the run's Checkpointer, the first iteration and how chunks are
        prepared, for a fresh or a resumed run (nothing when there is no store)."""
        if self.store is None:
            return None, None, 0, None
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
        ckpt = Checkpointer(store, policy, store.layouts, run, store_id, epoch,
                            int(manifest.get("round", 0)), config.get("checkpoint.backlog"))
        reference = getattr(policy, "reference_dtype", None) if policy.needs_priorities else False
        prepare = functools.partial(checkpoint.prepare_chunk, url=store.url, store_id=store_id,
                                    block_rows={n: lay.block_rows for n, lay in store.layouts.items()},
                                    load=resume, reference_dtype=reference)
        return store, ckpt, start, prepare


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


def _collect(inbox: queue.Queue, ckpt: Checkpointer | None, iteration: int, want_priorities: bool,
             n_chunks: int, timeout: float) -> tuple[float, dict[str, list[float]]]:
    """The loss (and block priorities, if asked for) that ``iteration``'s update tasks sent."""
    loss, priorities = None, {}
    while loss is None or (want_priorities and len(priorities) < n_chunks):
        try:
            message = inbox.get(timeout=timeout)
        except queue.Empty:
            raise ScarError(f"no loss arrived for iteration {iteration}: is the scheduler's ScarPlugin from "
                            "another dask_scar version? Install the same version everywhere") from None
        if message.get("kind") == "written":
            ckpt.on_written(message)
            continue
        if message.get("loss") is not None:
            loss = message["loss"]
        priorities.update(message.get("priorities") or {})
    return loss, priorities


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
    history = pd.DataFrame(rows, columns=["iteration", "loss", "seconds"])
    written = ckpt.columns() if ckpt is not None else {}
    notes = ckpt.notes if ckpt is not None else {}
    history["checkpoint_bytes"] = [written.get(k, {}).get("checkpoint_bytes", 0) for k in history["iteration"]]
    history["checkpoint_seconds"] = [written.get(k, {}).get("checkpoint_seconds", 0.0) for k in history["iteration"]]
    history["event"] = ["; ".join(notes.get(k, [])) for k in history["iteration"]]
    return history


def _wait(futures: list[Future], chunks: ParameterChunks, timeout: float, hint: str = "") -> None:
    """Wait for an iteration's updates; fail clearly instead of hanging on a lost worker."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait(futures, timeout=1.0)
            break
        except CancelledError as exc:
            # the scheduler forgot tasks: a chunk's only copy died with its worker
            _raise_if_lost(chunks, True, hint)
            raise ScarError(f"the tasks of an iteration were cancelled: {exc}") from exc
        except TimeoutError:
            _raise_if_lost(chunks, True, hint)
            if time.monotonic() > deadline:
                raise ScarError(f"an iteration took longer than scar.iteration-timeout={timeout}s; "
                                "is the cluster overloaded or a worker hung?") from None
    _raise_if_lost(chunks, False, hint)
    for f in futures:
        if f.status == "error":
            f.result()
        elif f.status != "finished":
            raise ScarError(f"task {f.key} was {f.status}; was the cluster restarted?")


def _raise_if_lost(chunks: ParameterChunks, ask_scheduler: bool, hint: str) -> None:
    """Raise if a chunk's only copy is gone (its future was cancelled) or, when
    ``ask_scheduler``, if its owner is gone while a replica survives elsewhere:
    either way its pinned update can never run."""
    lost = set(chunks.lost())
    if ask_scheduler:
        alive = set(chunks.client.scheduler_info(n_workers=-1)["workers"])
        lost |= {c for c, w in chunks.owner.items() if w not in alive}
    lost = sorted(lost)
    if lost:
        workers = sorted({chunks.owner[c] for c in lost})
        raise WorkerLostError(
            f"worker(s) {workers} died holding parameter chunks "
            f"{[f'{c.name}[{c.start}:{c.stop}]' for c in lost]}; this version of dask_scar cannot "
            f"restore them while training{hint or ': run fit() again'}")


def _converged(previous: float, current: float, tol: float) -> bool:
    return abs(previous - current) <= tol * max(abs(previous), abs(current), 1e-300)


def _check_divergence(rows: list[dict], factor: float, model: Model) -> None:
    loss = rows[-1]["loss"]
    if not math.isfinite(loss) or loss > factor * max(abs(rows[0]["loss"]), 1e-12):
        hint = (f"lower learning_rate (now {model.learning_rate}) or scale the features"
                if hasattr(model, "learning_rate") else "check the data's scale and the model's l2")
        raise DivergenceError(f"training diverged: loss {loss:.6g} at iteration {rows[-1]['iteration']} "
                              f"(it started at {rows[0]['loss']:.6g}); {hint}")
