"""The driver: runs training iterations on a Dask cluster, one task graph each."""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client, Future, wait
from tqdm.auto import tqdm

from . import config, data, iteration
from .backend import array_module
from .chunks import PROGRESS_TOPIC, ParameterChunks, place, split_rows
from .exceptions import DivergenceError, ScarError, WorkerLostError
from .models import Model
from .plugin import ensure_plugin

logger = logging.getLogger(__name__)

RECOVERY_MODES = ("partial", "full")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    ``history`` has one row per iteration: ``iteration``, ``loss`` (the objective
    at the parameters the iteration started from) and ``seconds`` (wall time of the
    iteration). ``params`` maps each parameter name to a NumPy array.
    """

    history: pd.DataFrame
    params: dict[str, np.ndarray]
    n_iter: int
    converged: bool
    events: list[Any] = field(default_factory=list)


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
    store, policy :
        Checkpoint store and policy. Not available in this version: pass None.
    recovery : {"partial", "full"}
        How to recover from worker loss once checkpointing is available.
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
        if store is not None or policy is not None:
            raise NotImplementedError(
                "checkpoint stores and policies are not available in this version of dask_scar; "
                "create the Trainer without store= and policy=")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
        if n_chunks is not None and (not isinstance(n_chunks, int) or n_chunks < 1):
            raise ValueError(f"n_chunks must be a positive integer or None, got {n_chunks!r}")
        if not isinstance(model, Model):
            raise TypeError(f"model must be a dask_scar model, got {type(model).__name__}")
        array_module(backend)  # fail now, with an install hint, if CuPy is missing
        self.client = client
        self.model = model
        self.store = store
        self.policy = policy
        self.recovery = recovery
        self.n_chunks = n_chunks
        self.backend = backend

    def fit(self, frame: Any, target: str | None = None, features: list[str] | None = None,
            max_iter: int = 100, tol: float = 1e-6, resume: bool = False,
            progress: bool | None = None) -> FitResult:
        """Train on ``frame`` (a Dask or pandas DataFrame).

        Stops after ``max_iter`` iterations, or once the loss changes by less than
        ``tol`` relative to its size between two iterations (``tol=0`` never stops
        early). Raises :class:`~dask_scar.exceptions.DataError` for unusable data,
        before any training.
        """
        if resume:
            raise NotImplementedError("resume=True needs a checkpoint store, not available in this version")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        client, model = self.client, self.model
        ensure_plugin(client)
        training = data.prepare(client, model, frame, target, features, self.backend)
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        n_chunks = self.n_chunks or config.get("chunks-per-worker") * len(workers)
        run = uuid.uuid4().hex[:8]
        chunks = ParameterChunks(client, run, place(split_rows(model, n_chunks), workers))
        timeout = config.get("iteration-timeout")
        _wait(chunks.initialize(model, self.backend), chunks, timeout)
        chunks.advance(0)
        data_blocks = [b.key for b in training.blocks]

        rows: list[dict] = []
        converged = False
        divergence_factor = config.get("divergence-factor")
        bar = tqdm(total=max_iter, unit="it", desc=type(model).__name__,
                   disable=not config.get("progress", progress))
        losses: queue.Queue = queue.Queue()

        def on_progress(event: tuple[float, dict]) -> None:
            # runs on the client's event loop: hand over, never block
            if event[1].get("run") == run:
                losses.put(event[1])

        client.subscribe_topic(PROGRESS_TOPIC, on_progress)
        previous: list[Future] = []     # futures of the last graph, released after the next submit
        stale: list[Future] = []        # chunk futures of the last version, likewise
        last_done = time.perf_counter()
        try:
            for k in range(1, max_iter + 1):
                graph = iteration.build(model, chunks, data_blocks, training.workers, k, client.id)
                futures = client.get(graph.graph, graph.update_keys, sync=False)
                # Releases go out after the new graph, so they never delay it (the
                # client batches its messages to the scheduler in 10 ms windows).
                previous = stale = []
                _wait(futures, chunks, timeout)
                stale = chunks.advance(k)
                previous = futures
                # The loss event was sent before the updates finished: it is here.
                try:
                    loss = losses.get(timeout=timeout)["loss"]
                except queue.Empty:
                    raise ScarError(f"no loss arrived for iteration {k}: is the scheduler's ScarPlugin from "
                                    "another dask_scar version? Install the same version everywhere") from None
                now = time.perf_counter()
                rows.append({"iteration": k, "loss": loss, "seconds": now - last_done})
                last_done = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.6g}", refresh=False)
                _check_divergence(rows, divergence_factor, model)
                if tol > 0 and k > 1 and _converged(rows[-2]["loss"], loss, tol):
                    converged = True
                    break
            params = chunks.gather()
        finally:
            client.unsubscribe_topic(PROGRESS_TOPIC)
            bar.close()
            del previous, stale
            chunks.release()
        model.params_ = params
        model.n_iter_ = len(rows)
        history = pd.DataFrame(rows, columns=["iteration", "loss", "seconds"])
        return FitResult(history=history, params=params, n_iter=len(rows), converged=converged)


def _wait(futures: list[Future], chunks: ParameterChunks, timeout: float) -> None:
    """Wait for an iteration's updates; fail clearly instead of hanging on a lost worker."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait(futures, timeout=1.0)
            break
        except CancelledError as exc:
            # the scheduler forgot tasks: a chunk's only copy died with its worker
            _raise_if_lost(chunks, ask_scheduler=True)
            raise ScarError(f"the tasks of an iteration were cancelled: {exc}") from exc
        except TimeoutError:
            _raise_if_lost(chunks, ask_scheduler=True)
            if time.monotonic() > deadline:
                raise ScarError(f"an iteration took longer than scar.iteration-timeout={timeout}s; "
                                "is the cluster overloaded or a worker hung?") from None
    _raise_if_lost(chunks, ask_scheduler=False)
    for f in futures:
        if f.status == "error":
            f.result()
        elif f.status != "finished":
            raise ScarError(f"task {f.key} was {f.status}; was the cluster restarted?")


def _raise_if_lost(chunks: ParameterChunks, ask_scheduler: bool) -> None:
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
            "restore them (checkpoint stores come later): run fit() again")


def _converged(previous: float, current: float, tol: float) -> bool:
    return abs(previous - current) <= tol * max(abs(previous), abs(current), 1e-300)


def _check_divergence(rows: list[dict], factor: float, model: Model) -> None:
    loss = rows[-1]["loss"]
    if not math.isfinite(loss) or loss > factor * max(abs(rows[0]["loss"]), 1e-12):
        hint = (f"lower learning_rate (now {model.learning_rate}) or scale the features"
                if hasattr(model, "learning_rate") else "check the data's scale and the model's l2")
        raise DivergenceError(f"training diverged: loss {loss:.6g} at iteration {rows[-1]['iteration']} "
                              f"(it started at {rows[0]['loss']:.6g}); {hint}")
