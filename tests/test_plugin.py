"""ScarPlugin installed the three supported ways, on real schedulers."""

import os
import subprocess
import sys

import pytest
from conftest import new_cluster, wait_for
from distributed import Client

import dask_scar as scar
from dask_scar.plugin import ensure_plugin


def _has_plugin(client):
    return client.run_on_scheduler(lambda dask_scheduler: "scar" in dask_scheduler.plugins)


def test_register_plugin_is_idempotent(own_client):
    assert not _has_plugin(own_client)
    own_client.register_plugin(scar.ScarPlugin())
    own_client.register_plugin(scar.ScarPlugin())
    assert _has_plugin(own_client)
    handlers = own_client.run_on_scheduler(lambda dask_scheduler: "scar-detach" in dask_scheduler.stream_handlers)
    assert handlers


def test_trainer_installs_the_plugin_when_absent(own_client, digits):
    assert not _has_plugin(own_client)
    scar.Trainer(own_client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=3, progress=False)
    assert _has_plugin(own_client)
    detached = own_client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["scar"].detached)
    assert detached >= 3 * 4  # every chunk, every iteration (plus version 0)


@pytest.mark.slow
def test_preload_on_a_cli_cluster(tmp_path, digits):
    """``dask scheduler --preload dask_scar.preload`` plus ``dask worker`` processes on 127.0.0.1."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    bin_dir = os.path.dirname(sys.executable)
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([os.path.join(bin_dir, "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--preload", "dask_scar.preload",
                               "--scheduler-file", str(scheduler_file)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for(scheduler_file.exists, timeout=60, what="the scheduler file")
        for _ in range(2):
            procs.append(subprocess.Popen([os.path.join(bin_dir, "dask"), "worker", "--scheduler-file",
                                           str(scheduler_file), "--nthreads", "1", "--host", "127.0.0.1",
                                           "--dashboard-address", ":0"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            assert _has_plugin(client)
            ensure_plugin(client)  # finds it: no second copy
            model = scar.SoftmaxRegression(momentum=0.9)
            result = scar.Trainer(client, model).fit(digits, target="label", max_iter=40, progress=False)
            assert result.history["loss"].iloc[-1] < 0.5 * result.history["loss"].iloc[0]
            assert model.score(digits, "label") > 0.9
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs[::-1]:
            p.wait(timeout=30)


def test_new_cluster_helper_uses_processes():
    with new_cluster(2) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
