from __future__ import annotations

import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``condition()`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def new_cluster(n_workers: int = 2) -> LocalCluster:
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
