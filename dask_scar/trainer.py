"""The driver: runs training iterations on a Dask cluster, one task graph each, or a
segment of them in one task per worker (:mod:`dask_scar.segment`)."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
import uuid
import warnings
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
from distributed import Client
from tqdm.auto import tqdm

from . import checkpoint, config, data
from .backend import array_module
from .checkpoint import Checkpointer
from .chunks import ParameterChunks, place, split_rows
from .exceptions import (BackendError, CheckpointError, CheckpointWarning, DivergenceError, RecoveryWarning,
                         callers_level)
from .models import Model
from .models._base import check_number
from .plugin import ensure_plugin
from .policy import CheckpointPolicy, default_policy, from_json
from .recovery import (RUN_SECONDS, RecoveryEvent, Restore, cancelled, check_scheduler, ctrl_c_after,
                       interruptible, live_or_wait, live_workers, run_on)
from .run import TrainingRun, history_frame
from .store import PROBE_PREFIX, ZarrStore, being_created, local_path, make_layouts, probe

logger = logging.getLogger(__name__)

RECOVERY_MODES = ("partial", "full")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    ``history`` has one row per iteration run: ``iteration``, ``loss`` (the objective
    at the parameters the iteration started from), ``seconds`` (wall time of the
    iteration, a recovery before it included), ``checkpoint_bytes`` and
    ``checkpoint_seconds`` (bytes the checkpoint round of this iteration's values
    took in the store, and seconds the workers spent writing them, in the
    background) and ``event`` (a recovery or rebalance before the iteration, a
    failed checkpoint write). After a full rollback (``recovery="full"``) iteration
    numbers repeat: every row is an iteration that ran. ``events`` lists a
    :class:`~dask_scar.RecoveryEvent` per recovery from worker loss. ``params``
    maps each parameter name to a NumPy array. ``n_iter`` is the last iteration
    run (the store's, when a resume had nothing to train); ``converged`` says
    whether the loss changed by less than ``tol`` (not a callback's stop).
    ``checkpoints`` has one row per checkpoint round: ``round``, ``iteration``,
    ``blocks`` (block numbers written, across parameters in layout order),
    ``bytes``, ``seconds``, ``error`` and ``priorities`` (every block's distance
    from its last save when the round was chosen; None for policies without).
    """

    history: pd.DataFrame
    params: dict[str, np.ndarray]
    n_iter: int
    converged: bool
    events: list[RecoveryEvent] = field(default_factory=list)
    checkpoints: pd.DataFrame | None = None

    def __repr__(self) -> str:
        """A summary: a notebook shows it for a ``fit`` call on a cell's last line."""
        loss = f", final loss {self.history['loss'].iloc[-1]:.6g}" if len(self.history) else ""
        params = ", ".join(f"{name!r}: {value.shape} {value.dtype}" for name, value in self.params.items())
        rounds = "" if self.checkpoints is None else f", {len(self.checkpoints)} checkpoint round(s)"
        return (f"FitResult(n_iter={self.n_iter}, converged={self.converged}{loss}, "
                f"{len(self.events)} recovery event(s){rounds}, params {{{params}}})")


#: a resume within this many seconds of the store's last commit warns that the fit
#: that made it may still run (it stops checkpointing when it sees the store taken over)
RECENT_COMMIT_SECONDS = 60


class Trainer:
    """Data-parallel training of a dask_scar model on a Dask cluster.

    The model's parameters are split by rows into ``n_chunks`` chunks held on the
    workers; the data stays on the workers as one block each. An iteration is one
    task graph (see :mod:`dask_scar.iteration`), or, for the gradient models when
    ``fit`` has no ``callback``, many iterations run as one task per worker, the
    workers exchanging their contributions directly (see :mod:`dask_scar.segment`).

    Parameters
    ----------
    client : distributed.Client
        Client of the cluster to train on.
    model : Model
        ``SoftmaxRegression``, ``LinearRegression``, ``MatrixFactorization`` or ``LDA``.
    store : str or os.PathLike, optional
        Path or fsspec URL (``file://``, ``s3://``...) of a Zarr checkpoint store
        that every worker can write. None: no checkpoints.
    policy : CheckpointPolicy, optional
        Which blocks to save when (:mod:`dask_scar.policy`); default
        ``PrioritizedCheckpoint(scar.checkpoint.fraction, every=scar.checkpoint.every)``
        when a store is given, and when resuming, the policy the store was written with.
    recovery : {"partial", "full"}
        How to recover when a worker dies. ``"partial"`` (SCAR): only the chunks
        that died with it are restored from the store (or taken over from a copy
        that survived elsewhere), each block extrapolated along its drift between
        its last two saved versions (``scar.recovery.extrapolate``); every other
        chunk keeps its current value and
        training goes on with the iteration that was in flight. ``"full"``: the
        traditional rollback of every chunk to the store's last committed round,
        and of the iteration count with it; without a store, to iteration 0 (a job
        restarted with no checkpoint). Without a store, ``"partial"`` starts lost
        chunks that no live worker holds a copy of again from their initial value.
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
        if store is not None and not os.fspath(store).strip():
            raise ValueError(f"store must be a path or URL, got {store!r}; store=None trains without checkpoints")
        if policy is not None and not isinstance(policy, CheckpointPolicy):
            raise TypeError(f"policy must be a dask_scar CheckpointPolicy such as "
                            f"PrioritizedCheckpoint(0.25, every=5), got {policy!r}")
        if policy is not None and store is None:
            raise ValueError("policy= needs store=: the path or URL where checkpoints are written")
        if recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {recovery!r}")
        if n_chunks is not None:
            check_number("n_chunks", n_chunks, 1, integer=True)
        if not isinstance(model, Model):
            raise TypeError(f"model must be a dask_scar model, got {type(model).__name__}")
        if backend not in model.backends:
            raise BackendError(f"{type(model).__name__} runs on {' or '.join(model.backends)} only, "
                               f"not backend={backend!r}: use Trainer(..., backend={model.backends[0]!r})")
        array_module(backend)  # fail now, with an install hint, if CuPy is missing
        if not isinstance(client, Client):
            raise TypeError(f"client must be a distributed Client (Client(LocalCluster()), or "
                            f"Client('tcp://scheduler:8786') for a running cluster), got {type(client).__name__}")
        self.client = client
        self.model = model
        # a relative path would be resolved in each worker's working directory
        self.store = None if store is None else os.fspath(store)
        path = None if self.store is None else local_path(self.store)
        if path is not None and (path == self.store or not os.path.isabs(path)):   # (file://ckpt.zarr too)
            self.store = os.path.abspath(os.path.expanduser(path))
        self.policy = policy     # None: the default, or when resuming, the store's
        self.recovery = recovery
        self.n_chunks = None if n_chunks is None else int(n_chunks)
        self.backend = backend

    def fit(self, frame: Any, target: str | None = None, features: list[str] | None = None,
            max_iter: int = 100, tol: float = 1e-6, resume: bool = False,
            progress: bool | None = None, callback: Callable[[int, float], Any] | None = None) -> FitResult:
        """Train on ``frame`` (a Dask or pandas DataFrame).

        ``target`` names the label (or value) column; ``features`` lists the
        columns to train on (default: every other column; one string is one
        name). ``progress`` shows a tqdm bar (default: ``scar.progress``, on).

        Stops after ``max_iter`` iterations in all (counting those before a
        resume), or once the loss changes by less than ``tol`` relative to its size
        between two iterations (``tol=0`` never stops early). With ``resume=True``
        the parameters are loaded from the store (each block as last saved, the
        others as initialised) and the iteration count goes on from the store's
        newest round written (:meth:`~dask_scar.store.CheckpointStore.resumes_from`;
        a finished fit's last iteration). Raises :class:`~dask_scar.exceptions.DataError` for
        unusable data, :class:`~dask_scar.exceptions.CheckpointError` for an
        unusable store and :class:`~dask_scar.exceptions.StoreMismatchError` for
        a store written for another model, before any training.

        When a worker dies, the chunks it held are restored (see ``recovery=``) and
        training goes on; each recovery is a :class:`~dask_scar.RecoveryEvent` in
        ``result.events`` and noted in the ``event`` column of the history row of
        the iteration that was redone. Losing the scheduler raises
        :class:`~dask_scar.exceptions.SchedulerLostError`.

        ``callback(iteration, loss)``, if given, runs in the calling thread after
        every iteration (logging, a custom stopping rule): returning ``True`` ends
        training there (the result is returned as usual); raising stops it too.
        The next iteration starts once it has returned. Without a callback, the
        gradient models whose updates are replicated (L-BFGS, weights of 8 MB or
        less, or blocks of at least 128 rows) run in *segments*
        (``scar.segment-iterations``, see :mod:`dask_scar.segment`): one task per
        worker for many iterations, the workers exchanging contributions directly,
        ``history`` rows arriving a segment at a time, and the progress bar about a
        second behind. Other models submit each iteration's graph before the one
        before it ends, so that no round trip through this process separates them;
        stopping at ``tol`` then lets one surplus iteration finish, and discards it.
        """
        check_number("max_iter", max_iter, 1, integer=True)
        check_number("tol", tol, 0)
        if progress is not None and not isinstance(progress, (bool, np.bool_)):
            raise TypeError(f"progress must be True, False or None (scar.progress decides), got {progress!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a function of (iteration, loss), got {callback!r}")
        self.model.check_params()
        if resume and self.store is None:
            raise ValueError("resume=True needs the Trainer's store=: the checkpoint to resume from")
        with self.model.fitting(), interruptible():
            return self._fit(frame, target, features, max_iter, tol, resume, progress, callback)

    def _fit(self, frame, target, features, max_iter, tol, resume, progress, callback) -> FitResult:
        client, model = self.client, self.model
        check_scheduler(client, "")
        config.check()      # a bad setting is said before the data is read
        if self.store is not None:
            # a store written for another model class or other columns is refused before the data is read
            _check_store_path(self.store, resume, self._store_model(*data.columns_of(model, frame, target, features)))
        ensure_plugin(client)
        try:
            try:
                training = data.prepare(client, model, frame, target, features, self.backend)
            except CancelledError as exc:
                raise cancelled(client, exc, _resume_hint(self.store) if resume else "", reading=True) from None
            try:
                return self._train(training, max_iter, tol, resume, progress, callback)
            finally:
                # the fit's copy of the data goes now, however the fit ended: an exception's
                # traceback (a notebook keeps the last) holds these futures in its frames
                for block in training.blocks:
                    block.release()
        except Exception:
            if client.status in ("running", "newly-created"):
                raise
        # The client was closed meanwhile (by its user, from another thread): whichever of
        # Dask's errors that gave (a closed client's, a closed loop's), say so (this raises),
        # and how to go on.
        stored = self.store is not None and ZarrStore.exists(self.store)
        check_scheduler(client, _resume_hint(self.store) if stored else "")

    def _train(self, training: data.TrainingData, max_iter, tol, resume, progress, callback) -> FitResult:
        client, model = self.client, self.model
        workers = sorted(live_or_wait(client, ""))    # (none: the only worker went as the read ended)
        n_chunks = self.n_chunks or config.get("chunks-per-worker") * len(workers)
        layouts = make_layouts({name: (spec.shape, spec.dtype) for name, spec in model.parameter_specs().items()},
                               n_chunks, config.get("checkpoint.blocks-per-chunk"))
        run = uuid.uuid4().hex[:8]
        store, ckpt, start, prepare, record = self._open_store(layouts, run, resume, training)
        hint = _resume_hint(self.store) if store is not None else ""
        training_run = None
        try:     # (from here, the store is claimed by the run)
            if start >= max_iter:
                warnings.warn(f"the checkpoint store {self.store} is at iteration {start}, and max_iter={max_iter}: "
                              "nothing to train; the model gets the stored parameters (raise max_iter to go on)",
                              CheckpointWarning, stacklevel=callers_level())
            if store is not None:
                layouts = store.layouts
            chunks = ParameterChunks(client, run, place(split_rows(layouts, n_chunks), workers), version=start)
            restore = Restore(chunks, lambda ids, version, trends: chunks.initialize(
                model, self.backend, version,
                prepare(True, trends if self._extrapolates() else None, self.recovery == "full"), ids),
                self.recovery, functools.partial(_roll_back, client, ckpt), hint,
                (lambda workers: ckpt.check(client, workers, hint)) if ckpt is not None else None)
            shown = config.get("progress", progress)
            interval = _bar_interval() if shown else 0.1
            bar = tqdm(total=max_iter, initial=start, unit="it", desc=type(model).__name__, disable=not shown,
                       mininterval=interval, maxinterval=max(10.0, interval))
            training_run = TrainingRun(model, training, chunks, ckpt, restore, bar, config.get("segment-iterations"))
            training_run.start(lambda: chunks.initialize(model, self.backend, start, prepare(resume)))
            if start < max_iter:    # (a resume with nothing to train leaves the store's record as it was)
                record()
            converged = training_run.iterate(start + 1, max_iter, tol, callback)
            params = training_run.finish()
            while params is None:   # a worker was lost after the last iteration: go on from there
                converged = training_run.iterate(training_run.resume_from, max_iter, tol, callback)
                params = training_run.finish()
        except CancelledError as exc:
            raise cancelled(client, exc, hint) from None
        except DivergenceError as exc:
            if store is None or exc.iteration is None:
                raise
            # the loss of iteration k is that of the parameters of iteration k - 1
            store.mark_diverged(run, exc.iteration - 1)
            error = DivergenceError(f"{exc}. The checkpoint store {self.store} keeps this fit as saved before "
                                    f"iteration {exc.iteration - 1}: fit(..., resume=True) goes on from there with "
                                    "the settings it is given, or delete the store to start afresh")
            error.iteration = exc.iteration
            raise error from None
        finally:
            try:
                if training_run is not None:
                    training_run.close()
            finally:
                if store is not None:
                    with ctrl_c_after():
                        store.release(run)
        rows = training_run.rows
        model.params_ = params
        model.n_iter_ = rows[-1]["iteration"] if rows else start
        behind = ckpt.behind(model.n_iter_) if ckpt is not None else ""
        if behind:
            warnings.warn(behind, CheckpointWarning, stacklevel=callers_level())
        for event in training_run.events:
            # (where the last round had written every block, the store gave back the trained values)
            if event.mode == "partial" and rows and event.resumed_at >= model.n_iter_ and \
                    (event.lost_chunks or event.peer_iterations) and event.est_perturbation != 0:
                warnings.warn(_untrained_after_the_last(event, store is not None), RecoveryWarning,
                              stacklevel=callers_level())
        return FitResult(history=history_frame(rows, ckpt), params=params, n_iter=model.n_iter_, converged=converged,
                         events=training_run.events, checkpoints=ckpt.table() if ckpt is not None else None)

    def _open_store(self, layouts: dict, run: str, resume: bool, training: data.TrainingData):
        """The store, the run's Checkpointer, the first iteration and how chunks are
        prepared, for a fresh or a resumed run (nothing when there is no store)."""
        if self.store is None:
            return None, None, 0, lambda *how: None, lambda: None
        policy = self.policy
        meta = self._store_model(training.features, training.target)
        if resume:
            store = ZarrStore.open(self.store, mode="r+")
            store.check_compatible(meta, layouts)
            policy = self._resumed_policy(store.meta.get("policy"))
            before, now = store.meta["model"]["params"], meta["params"]
            changed = [name for name, value in now.items() if before.get(name, value) != value]
            if changed:
                warnings.warn(f"resuming with {', '.join(f'{n}={now[n]!r}' for n in changed)}; the store was "
                              f"written with {', '.join(f'{n}={before[n]!r}' for n in changed)}. The store "
                              "records the new values once this fit has started", CheckpointWarning,
                              stacklevel=callers_level())
            ago = _committed_ago(store)
            if ago is not None:
                warnings.warn(f"run {store.writer} committed to {self.store} {ago:.0f} s ago and did not end: if "
                              "that fit still runs, it stops checkpointing at its next commit, and this one "
                              "writes the store from now on", CheckpointWarning, stacklevel=callers_level())
        else:
            policy = policy or default_policy()
            try:
                store = ZarrStore.create(self.store, meta, layouts, policy.to_json(), writer=run)
            except CheckpointError:
                _made_meanwhile(self.store)
                raise
        store_id = store.meta["id"]
        try:
            usable_from = checkpoint.check_workers(self.client, store.url, store_id)
        except BaseException:
            if not resume:
                store.destroy()     # never trained (or Ctrl-C): it would only ask for resume=True next time
            raise
        store.claim(run)
        try:    # (a corrupt record, Ctrl-C: the store is let go again)
            cutoff, highest = (store.diverged if resume else None), 0   # highest: round, before a drop
            if cutoff is not None:
                dropped, emptied, highest = store.drop_diverged(run)
            manifest, last = store.manifest, store.last_written()
            start = store.resumes_from(last)
            if cutoff is not None:
                warnings.warn(f"the fit that wrote {self.store} diverged: this one resumes from iteration {start}, as "
                              f"saved before iteration {cutoff}; {dropped} block versions saved from then on are "
                              "forgotten" + (f", and {emptied} blocks saved only then start again from their initial "
                                             "values" if emptied else ""),
                              CheckpointWarning, stacklevel=callers_level())
            epoch = max(int(manifest.get("epoch", -1)), last.epoch) + 1    # (rounds never committed too)
            reference = getattr(policy, "reference_dtype", None) if policy.needs_priorities else False
            ckpt = Checkpointer(store, policy, store.layouts, run, store_id, epoch,
                                max(int(manifest.get("round", 0)), last.round, highest),
                                config.get("checkpoint.backlog"),
                                reference, self._extrapolates())
        except BaseException:
            store.release(run)
            raise
        ckpt.usable_from = usable_from
        ckpt.started_from = max(int(manifest.get("round", 0)), last.round)

        def prepare(load: bool, trends: dict | None = None, committed: bool = False) -> Callable:
            """How new chunks are made ready: from the store's blocks if ``load``
            (extrapolated along ``trends``; ``committed``: each block as of the last
            committed round, for a rollback to it)."""
            return functools.partial(checkpoint.prepare_chunk, url=store.url, store_id=store_id,
                                     block_rows=ckpt.base.block_rows, load=load, reference_dtype=reference,
                                     trends=trends, trail=self._extrapolates(),
                                     upto_round=int(store.manifest.get("round", 0)) if committed else None)

        # the store records the run's model and policy once the chunks are loaded: a resume
        # that fails before (a corrupt block) leaves them as they were
        return store, ckpt, start, prepare, functools.partial(store.record, run, meta, policy.to_json())

    def _resumed_policy(self, stored: dict | None) -> CheckpointPolicy:
        """The policy a resumed fit checkpoints with: the Trainer's, said where it is not
        the one the store was written with, else the store's."""
        if self.policy is None:
            policy = from_json(stored)
            if policy is None:
                policy = default_policy()
                warnings.warn(f"the checkpoint store {self.store} was written with the policy {stored}, which "
                              f"cannot be rebuilt from the store: resuming with {policy!r}. Pass policy= to choose",
                              CheckpointWarning, stacklevel=callers_level())
            return policy
        if stored is not None and self.policy.to_json() != stored:
            warnings.warn(f"resuming with {self.policy!r}; the store was written with "
                          f"{from_json(stored) or stored!r}. The store records the new "
                          "policy once this fit has started",
                          CheckpointWarning, stacklevel=callers_level())
        return self.policy

    def _store_model(self, features: list, target: str | None) -> dict:
        """What a store records of the model it was written for."""
        model = self.model
        return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "params": model.get_params(),
                "columns": {"features": [str(c) for c in features], "target": None if target is None else str(target)}}

    def _extrapolates(self) -> bool:
        """Whether restores from the store extrapolate (and priorities rank blocks by
        how far such a restore would be off): ``scar.recovery.extrapolate``, for
        partial recovery, where the model allows it."""
        return self.recovery == "partial" and self.model.extrapolate_restores and config.get("recovery.extrapolate")


def _untrained_after_the_last(event: RecoveryEvent, stored: bool) -> str:
    """What to say of a partial recovery after the fit's last iteration: the chunks it
    restored went back in time, and no iteration trained them since."""
    came = [f"{len(event.lost_chunks)} {'from the checkpoint store' if stored else 're-initialised'}"] \
        if event.lost_chunks else []
    if event.peer_iterations:
        came.append(f"{len(event.peer_chunks)} from live workers' copies, {event.peer_iterations} iteration(s) "
                    "behind in all")
    again = ("fit(..., resume=True) with a higher max_iter trains them on from the store" if stored else
             "a store (store=...) lets fit(..., resume=True) train them on")
    cost = "" if math.isnan(event.est_perturbation) else (
        f" (estimated perturbation {event.est_perturbation:.3g}, predicted extra iterations "
        f"{event.predicted_extra_iterations:.3g})")
    return (f"worker {event.worker} was {'retired' if event.retired else 'lost'} after the last iteration "
            f"({event.resumed_at}): the parameters returned "
            f"hold the chunks it held as restored ({' and '.join(came)}), which no iteration trained since{cost}. "
            f"{again}")


def _roll_back(client: Client, ckpt: Checkpointer | None) -> int:
    """A full recovery's iteration to go on from: once every worker's checkpoint writes
    in flight have ended, the round :meth:`ZarrStore.roll_back` chooses. Where they did
    not end in time, or the fit lost its store, the last committed round, as it is."""
    if ckpt is None:
        return 0
    if not ckpt.lost and _writes_ended(client):
        try:
            return ckpt.store.roll_back(ckpt.base.run, ckpt.started_from)
        except CheckpointError as exc:      # taken over, or gone
            ckpt.lose(exc, int(ckpt.store.manifest.get("iteration", 0)))
    return int(ckpt.store.manifest.get("iteration", 0))


def _writes_ended(client: Client) -> bool:
    """Whether every live worker's checkpoint writes in flight ended, within
    :data:`~dask_scar.checkpoint.WRITE_WAIT` (a worker gone meanwhile writes no more)."""
    answers = run_on(client, checkpoint.settle_off_the_loop, seconds=checkpoint.WRITE_WAIT + RUN_SECONDS)
    alive = live_workers(client)
    return bool(answers) and all(answer is True or worker not in alive for worker, answer in answers.items())


def _resume_hint(store: str) -> str:
    return f"; the checkpoint store {store} holds the model as last saved: fit(..., resume=True) continues from it"


#: Seconds between progress-bar updates written to a log (stderr neither a terminal nor
#: a notebook's): a batch job's log gets a line's worth, not ten frames a second.
LOG_BAR_SECONDS = 30.0


def _bar_interval() -> float:
    """tqdm's own 0.1 s on a terminal or in a notebook's widget, :data:`LOG_BAR_SECONDS`
    else (also in a notebook without ipywidgets, where tqdm writes text)."""
    from tqdm.autonotebook import tqdm as maybe_notebook
    from tqdm.std import tqdm as plain

    isatty = getattr(sys.stderr, "isatty", None)
    return 0.1 if maybe_notebook is not plain or (isatty is not None and isatty()) else LOG_BAR_SECONDS


def _committed_ago(store: ZarrStore) -> float | None:
    """Seconds since the store's writer, a run that did not end, last committed, if
    that is within :data:`RECENT_COMMIT_SECONDS` (it may still be running)."""
    ago = time.time() - store.manifest.get("time", 0)
    return ago if store.writer is not None and ago < RECENT_COMMIT_SECONDS else None


def _writing(store: ZarrStore) -> str:
    """What to say of a fit that may be writing ``store`` now."""
    if store.writer is None:
        return ""
    ago = _committed_ago(store)
    recent = f", last committed {ago:.0f} s ago" if ago is not None else ""
    return (f" that run {store.writer} writes{recent} (unless its driver died): a resume takes the store over "
            "from it, and it stops checkpointing")


def _wait_for_a_creation(url: str) -> None:
    """While another fit creates its store at ``url`` (a fit started on the same path at
    the same moment: see :func:`dask_scar.store.being_created`), for at most
    ``CREATION_SECONDS``."""
    while being_created(url):
        time.sleep(0.1)


def _entries(path: str) -> list[str]:
    """What the directory ``path`` holds, but another fit's probe (a fit starting on the
    same path writes its probe there, then its store); nothing if it is none."""
    try:
        return [name for name in os.listdir(path) if not name.startswith(PROBE_PREFIX)]
    except OSError:
        return []


def _made_meanwhile(url: str) -> None:
    """Where this fit could not create its store because a group appeared at ``url``
    since the fit started (another fit started on the same path at the same moment):
    raise :class:`CheckpointError` naming the run that writes it. Returns if it holds
    no dask_scar store."""
    _wait_for_a_creation(url)
    if ZarrStore.exists(url):
        store = ZarrStore.open(url)     # (one whose creation did not finish says so)
        raise CheckpointError(
            f"{url} already holds a dask_scar checkpoint{_writing(store)}; another fit created it after this one "
            "started. Pass resume=True (--resume on the command line) to continue from it, or choose another "
            "store path")


def _check_store_path(url: str, resume: bool, model: dict | None = None) -> None:
    """Before any work: the store path suits ``resume`` and can be written, and a store
    to resume was written for ``model`` (:meth:`_store_model`: its class and columns)."""
    path = local_path(url)
    _wait_for_a_creation(url)
    if ZarrStore.exists(url):
        # one whose creation did not finish, or that lost an array, says so the same
        # way whether resumed or not: neither can be resumed
        store = ZarrStore.open(url)
        store.check_arrays()
        if resume:
            if model is not None:
                store.check_compatible(model)
        elif store.unused:
            logger.info("the checkpoint store %s holds no saved block, and no fit writes it: starting afresh", url)
            ZarrStore.open(url, mode="r+").destroy()
        else:
            raise CheckpointError(
                f"{url} already holds a dask_scar checkpoint{_writing(store)}: pass resume=True (--resume on the "
                "command line) to continue from it, or delete it or choose another store path to start afresh")
    elif resume:
        if path is not None and os.path.exists(path):
            ZarrStore.open(url)      # its own error: damaged, or not a dask_scar store
        raise CheckpointError(f"resume=True, but there is no dask_scar checkpoint store at {url}")
    held = _entries(path) if not resume and path is not None else []
    if held:
        raise CheckpointError(f"{url} is a directory that is not empty and holds no readable dask_scar "
                              "checkpoint: choose a new (or empty) path for the store")
    probe(url)
