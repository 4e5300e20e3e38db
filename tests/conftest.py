from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from dask_scar import config

# For every cluster of the tests, for as long as they run (nannies replace killed
# workers with it too): worker processes forked from a server that imported the
# library once, SIGKILLed as any other.
dask.config.set(config.own_cluster())


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``condition()`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def committed(store, what: str = "iteration") -> int:
    """The store's last committed iteration (or round); 0 while it is not there, or
    being created."""
    import dask_scar as scar

    try:
        return scar.open_store(store).manifest.get(what, 0)
    except scar.CheckpointError:
        return 0


def new_cluster(n_workers: int = 2, settings: dict | None = None) -> LocalCluster:
    """Worker processes with Dask's settings, but for :func:`dask_scar.config.own_cluster`'s
    and then ``settings``."""
    with dask.config.set(settings or {}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0", silence_logs=40)


@pytest.fixture(scope="module")
def client():
    """A real 2-worker cluster (separate processes), shared by the tests of a module."""
    with new_cluster(2) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture
def own_client():
    """A fresh 2-worker cluster for tests that kill workers or change the cluster."""
    with new_cluster(2) as cluster, Client(cluster) as c:
        yield c


class CliCluster:
    """``dask scheduler --preload dask_scar.preload`` and ``dask worker`` processes on 127.0.0.1.

    Workers run without a nanny (unless asked), so a killed worker stays dead until
    ``add_workers``.
    """

    def __init__(self, workdir: Path, preload: bool = True):
        self.workdir = Path(workdir)
        self.scheduler_file = self.workdir / "scheduler.json"
        # the workers can import the tests' modules (functions given to ``client.run``)
        path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        self.dask = os.path.join(os.path.dirname(sys.executable), "dask")
        self.log = open(self.workdir / "cluster.log", "ab")
        args = [self.dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                "--scheduler-file", str(self.scheduler_file)]
        self.scheduler = subprocess.Popen(args + (["--preload", "dask_scar.preload"] if preload else []),
                                          env=self.env, stdout=self.log, stderr=self.log)
        self.workers: list[subprocess.Popen] = []
        wait_for(self.scheduler_file.exists, timeout=60, what="the scheduler file")

    def add_workers(self, n: int, nanny: bool = False) -> None:
        """``n`` more workers; with ``nanny``, each is a nanny process that starts the
        worker's process (and starts it again if it dies)."""
        for _ in range(n):
            self.workers.append(subprocess.Popen(
                [self.dask, "worker", "--scheduler-file", str(self.scheduler_file), "--nthreads", "1",
                 "--host", "127.0.0.1", "--dashboard-address", ":0", "--nanny" if nanny else "--no-nanny"],
                env=self.env, stdout=self.log, stderr=self.log))

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.kill()
        for p in [*self.workers, self.scheduler]:
            p.wait(timeout=30)
        self.log.close()


@contextmanager
def cli_cluster(workdir: Path, n_workers: int, preload: bool = True):
    """A :class:`CliCluster` with ``n_workers`` workers and a client connected to it."""
    cluster = CliCluster(workdir, preload)
    try:
        cluster.add_workers(n_workers)
        with Client(scheduler_file=str(cluster.scheduler_file), timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=60)
            yield cluster, client
    finally:
        cluster.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_worker(client: Client, address: str) -> int:
    """SIGKILL the process of the worker at ``address``; returns its pid."""
    pid = client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture(scope="session")
def digits() -> pd.DataFrame:
    """scikit-learn's bundled digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    frame = pd.DataFrame((X / 16.0).astype(np.float32), columns=[f"p{i}" for i in range(X.shape[1])])
    frame["label"] = y
    return frame


def low_rank_ratings(n_users=60, n_items=40, rank=5, density=0.6, seed=0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((n_users, rank)) @ rng.standard_normal((n_items, rank)).T
    users, items = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
    mask = rng.random(users.shape) < density
    frame = pd.DataFrame({"user": users[mask], "item": items[mask], "rating": R[mask]})
    return frame, R
