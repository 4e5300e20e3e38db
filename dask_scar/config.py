"""dask_scar settings, read through ``dask.config`` under the ``scar`` namespace.

Defaults live in ``dask_scar.yaml``; override them like any Dask setting::

    dask.config.set({"scar.chunks-per-worker": 4})
    # or DASK_SCAR__CHUNKS_PER_WORKER=4 in the environment, or a YAML file.
"""

from __future__ import annotations

import math
import multiprocessing
import numbers
import os
import sys
from collections.abc import Callable
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

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
    ``train``) and its tests', to hold while they run (the forkserver's preload is set
    for the whole process, once this is called):

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
    """The value of ``scar.<key>``, or ``override`` when that is not None; read as its
    kind (:data:`KINDS`: durations in seconds), or :class:`ValueError` naming the key."""
    if override is not None:
        return override
    value = dask.config.get(f"scar.{key}")
    kind = KINDS.get(key)
    return value if kind is None else kind(key, value)


def check() -> None:
    """Every ``scar.*`` setting read once: a bad one raises :class:`ValueError` naming
    it before a fit reads its data."""
    for key in KINDS:
        get(key)


def _count(least: int) -> Callable[[str, Any], int]:
    def read(key: str, value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():     # quoted in YAML
            value = int(value)
        if isinstance(value, float) and value.is_integer():       # 4e3 from the environment
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"scar.{key}={value!r}: give a whole number, at least {least}")
        return int(value)
    return read


def _number(above: float, most: float = math.inf) -> Callable[[str, Any], float]:
    def read(key: str, value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not above < number <= most:
            bound = f"more than {above:g}" + (f" and at most {most:g}" if most < math.inf else "")
            raise ValueError(f"scar.{key}={value!r}: give a number {bound}")
        return number
    return read


def _duration(zero: bool = False, off: bool = False) -> Callable[[str, Any], float | None]:
    """Seconds: a number, or a duration such as ``'90s'`` or ``'10 minutes'``; 0 only
    where ``zero``; with ``off``, None for false or 0."""
    def read(key: str, value: Any) -> float | None:
        if off and (value is None or value is False):
            return None
        try:
            seconds = parse_timedelta(value) if not isinstance(value, bool) else None
        except (ValueError, TypeError, KeyError, AttributeError):
            seconds = None
        if seconds is None or seconds < 0 or (seconds == 0 and not (zero or off)):
            raise ValueError(f"scar.{key}={value!r} is no duration: give one such as '60s' or 60 (seconds)"
                             + (", or false to leave hung workers to Dask" if off else ""))
        return None if off and seconds == 0 else float(seconds)
    return read


_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in _FLAGS:     # from the environment
        return _FLAGS[value.strip().lower()]
    if isinstance(value, numbers.Integral) and value in (0, 1):      # 0 and 1 from the environment too
        return bool(value)
    if not isinstance(value, bool):
        raise ValueError(f"scar.{key}={value!r}: give true or false")
    return value


#: How each ``scar.*`` setting is read (see ``dask_scar.yaml`` for what they mean).
KINDS: dict[str, Callable[[str, Any], Any]] = {
    "chunks-per-worker": _count(1),
    "progress": _flag,
    "tile-rows": _count(1),
    "divergence-factor": _number(1.0),
    "segment-iterations": _count(1),
    "iteration-timeout": _duration(),
    "recovery.wait-for-workers": _duration(zero=True),
    "recovery.hung-worker": _duration(off=True),
    "recovery.replicas": _flag,
    "recovery.extrapolate": _flag,
    "checkpoint.fraction": _number(0.0, 1.0),
    "checkpoint.every": _count(1),
    "checkpoint.blocks-per-chunk": _count(1),
    "checkpoint.backlog": _count(0),
}
