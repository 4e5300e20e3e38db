"""Real failures: the bench's cases trained by :class:`~dask_scar.Trainer` on a
LocalCluster, with worker processes really killed (SIGKILL) after a chosen iteration.

Surviving copies of chunks are not used (``scar.recovery.replicas: false``), so
every lost chunk is restored from the store, as SCAR is measured -- except by the
``scar+copies`` strategy, this library's default, which restores from the copies
contribution tasks left on live workers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import dask
import dask.dataframe as dd
import pandas as pd
from distributed import Client

from .. import config
from ..checkpoint import settle
from ..recovery import live_workers
from ..trainer import Trainer
from ._cases import Case
from ._cost import reached
from ._simulate import Strategy


@dataclass
class RealRun:
    """One run on the cluster: its losses (every iteration run) and recoveries."""

    strategy: str
    losses: list[float]
    seconds: float
    bytes_written: int = 0
    events: list = field(default_factory=list)


_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


class BenchCluster:
    """A LocalCluster of ``workers`` single-threaded worker processes whose workers
    get killed on purpose: :meth:`ready` hands out its client once the nannies have
    replaced every killed worker, or a new cluster if they have not within
    ``patience`` seconds (a safety net: the one cause seen, the LocalCluster giving up
    a nanny, is prevented below)."""

    def __init__(self, workers: int, patience: float = 30):
        self.workers, self.patience = workers, patience
        self.killed: set[str] = set()
        self.cluster = self.client = None
        # A LocalCluster gives up a worker's nanny (closes it, and the worker it has
        # restarted) when, ``distributed.deploy.lost-worker-timeout`` (15 s) after a
        # loss, the scheduler lists no worker of that name -- checked once, when the
        # timer fires. A run here takes about that long, so a worker killed again close
        # to 15 s after an earlier kill of the same nanny had its replacement closed
        # just as it joined: a second loss in the run, which no strategy had asked for
        # (2 runs in 14 of one case; 3 of 30 in a full bench). The nannies here only
        # ever replace workers killed on purpose: never give them up.
        self._config = dask.config.set({"distributed.deploy.lost-worker-timeout": "1 day", **config.own_cluster()})
        try:
            self._start()
        except BaseException:
            self._config.__exit__(None, None, None)
            raise

    def _start(self) -> None:
        from distributed import LocalCluster

        # A worker killed on purpose leaves the semaphores of its nanny's queues to
        # Python's resource tracker, which cleans them up when this process exits and
        # warns that they "leaked". The tracker is a child interpreter started with this
        # one's -W options: the warning is not news here.
        if _TRACKER_WARNING not in sys.warnoptions:
            sys.warnoptions.append(_TRACKER_WARNING)
        self.cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, silence_logs=logging.CRITICAL,
                                    **config.NO_DASHBOARD)
        self.client = Client(self.cluster)

    def ready(self) -> Client:
        deadline = time.monotonic() + self.patience
        while True:
            alive = live_workers(self.client)
            if len(alive) == self.workers and not alive & self.killed:
                return self.client
            if time.monotonic() > deadline:
                self._stop()
                self._start()
                deadline = time.monotonic() + self.patience
            time.sleep(0.1)

    def kill(self, workers: list[str]) -> None:
        """SIGKILL the processes of ``workers``."""
        for pid in self.client.run(os.getpid, workers=workers).values():
            os.kill(pid, signal.SIGKILL)
        self.killed.update(workers)

    def close(self) -> None:
        self._stop()
        self._config.__exit__(None, None, None)

    def _stop(self) -> None:
        self.client.close()
        self.cluster.close()

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_real(cluster: BenchCluster, case: Case, frame: pd.DataFrame, store: str | None,
             strategy: Strategy | None, failure: int | None = None, victims: tuple[int, ...] = (),
             target: float | None = None, max_iter: int | None = None) -> RealRun:
    """Train ``case`` once; kill workers ``victims`` (indices into the sorted worker
    addresses, the order chunks are placed in) after iteration ``failure``; stop when
    the (smoothed) loss reaches ``target``, or after ``max_iter`` iterations."""
    client, workers = cluster.ready(), cluster.workers
    addresses = sorted(live_workers(client))
    doomed = [addresses[v] for v in victims]
    losses: list[float] = []

    def callback(k: int, loss: float) -> bool:
        losses.append(loss)
        if failure is not None and k == failure and len(losses) == failure:
            # as the simulation has it: the store holds every write handed out before the failure
            client.run(settle, workers=doomed)
            cluster.kill(doomed)
        return target is not None and reached(losses, target, case.smooth)

    trainer = Trainer(client, case.model(), store=store, policy=strategy.policy if strategy else None,
                      recovery=strategy.recovery if strategy else "partial", n_chunks=2 * workers)
    ddf = dd.from_pandas(frame, npartitions=2 * workers)
    started = time.perf_counter()
    with dask.config.set({"scar.recovery.replicas": bool(strategy and strategy.copies),
                          "scar.recovery.extrapolate": bool(strategy is None or strategy.extrapolate)}), \
            warnings.catch_warnings():
        # the data travels in the graph, as a frame made in memory does: not news here
        warnings.filterwarnings("ignore", message="Sending large graph")
        result = trainer.fit(ddf, target=case.target, max_iter=max_iter or case.max_iter, tol=0, progress=False,
                             callback=callback)
    return RealRun(strategy.name if strategy else "failure-free", losses, time.perf_counter() - started,
                   policy_bytes(result), result.events)


def policy_bytes(result) -> int:
    """Bytes a fit's checkpoint policy wrote: its rounds, not the fit's end round."""
    rounds = result.checkpoints
    return 0 if rounds is None else int(rounds.loc[~rounds["end"], "bytes"].sum())


def quiet_cluster_logs() -> None:
    """The cluster's complaints about workers killed on purpose are not news here."""
    for name in ("distributed", "dask_scar"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
