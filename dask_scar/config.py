"""dask_scar settings, read through ``dask.config`` under the ``scar`` namespace.

Defaults live in ``dask_scar.yaml``; override them like any Dask setting::

    dask.config.set({"scar.chunks-per-worker": 4})
    # or DASK_SCAR__CHUNKS_PER_WORKER=4 in the environment, or a YAML file.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "dask_scar.yaml")

with open(_DEFAULTS_FILE) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)

#: Dask's periodic work slowed down, for CPU workers with a core or two each: the
#: workers' statistical profiler off (it samples every 10 ms), the event loops' health
#: check every 1 s instead of 20 ms, the system monitor every 5 s instead of 0.5 s,
#: the memory monitors every 1 s instead of 0.1 s. ``dask-scar train`` starts its
#: LocalCluster (which has no dashboard to feed) with them; the README suggests them
#: for CPU clusters.
QUIET = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
}


#: LocalCluster arguments for a cluster dask_scar starts itself: no dashboard, and the
#: scheduler's HTTP server (health checks) on a free port (Dask's default, 8787, warns
#: where another cluster has it).
NO_DASHBOARD = {"dashboard_address": ":0", "scheduler_kwargs": {"dashboard": False}}


def own_cluster() -> dict:
    """Settings of the clusters dask_scar starts itself (``dask-scar demo``, ``bench`` and
    ``train``) and its tests', to hold while they run:

    * Where the platform has it (not on Windows), nannies start their worker processes
      by forking one server process that imported dask_scar once, not by spawning a
      fresh interpreter that imports it again: on 2 cores a LocalCluster of 4 starts in
      0.7 s, not 6 s, and a nanny replaces a killed worker sooner. The workers are still
      separate processes.
    * CPython 3.11 before 3.11.9 can deadlock a process when one thread takes
      ``sys._current_frames()`` (Dask's statistical profiler does, every 10 ms in each
      worker) while a full garbage collection runs and another thread starts (CPython
      gh-106883, dask/distributed#8616). A worker that replaced a killed one hung that
      way in a test run here, as it started Zarr's threads. On such a Python the
      profiler is off.
    """
    settings: dict[str, Any] = {}
    if (3, 11) <= sys.version_info < (3, 11, 9):
        settings["distributed.worker.profile.enabled"] = False
    if "forkserver" in multiprocessing.get_all_start_methods():
        from distributed.utils import get_mp_context

        settings["distributed.worker.multiprocessing-method"] = "forkserver"
        with dask.config.set(settings):
            context = get_mp_context()      # sets Dask's own list first: replace it
        context.set_forkserver_preload(["distributed", "dask_scar.trainer", "dask_scar.preload"])
    return settings


def get(key: str, override: Any = None) -> Any:
    """The value of ``scar.<key>``, or ``override`` when that is not None."""
    if override is not None:
        return override
    return dask.config.get(f"scar.{key}")
