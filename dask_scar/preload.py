"""``dask scheduler --preload dask_scar.preload`` installs :class:`~dask_scar.ScarPlugin`."""

from __future__ import annotations

from .plugin import ScarPlugin


def dask_setup(scheduler) -> None:
    scheduler.add_plugin(ScarPlugin())
