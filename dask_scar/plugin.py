"""The scheduler side of dask_scar.

:class:`ScarPlugin` is cheap and synchronous, does no I/O and never raises out of a
hook. It installs one stream handler that lets a worker register a parameter chunk
it computed as lineage-free data (see :mod:`dask_scar.chunks`).

Install it with ``client.register_plugin(ScarPlugin())``, with
``dask scheduler --preload dask_scar.preload``, or let :class:`~dask_scar.Trainer`
install it when it is missing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from .chunks import DETACH_OP, PROGRESS_TOPIC

logger = logging.getLogger(__name__)


class ScarPlugin(SchedulerPlugin):
    """Scheduler plugin of dask_scar (``name = "scar"``; installing it twice is a no-op).

    Examples
    --------
    >>> client.register_plugin(ScarPlugin())   # doctest: +SKIP
    """

    name = "scar"
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.detached = 0  # chunks registered, for diagnostics

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.stream_handlers[DETACH_OP] = self._detach

    async def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stream_handlers.pop(DETACH_OP, None)

    def _detach(self, worker: str, who_has: dict, nbytes: dict, client: str, progress: dict | None = None,
                **kwargs: Any) -> None:
        """Register chunks a worker holds as data wanted by the driver's ``client``;
        publish ``progress`` (an iteration's loss) for the driver."""
        try:
            scheduler = self.scheduler
            if worker in scheduler.workers and client in scheduler.clients:
                scheduler.update_data(who_has=who_has, nbytes=nbytes, client=client)
                self.detached += len(who_has)
                if progress is not None:
                    scheduler.log_event(PROGRESS_TOPIC, progress)
                return
            # The driver is gone (or the worker is leaving): nobody will ever ask for
            # these chunks, so let the worker free them instead of keeping them forever.
            stream = scheduler.stream_comms.get(worker)
            if stream is not None:
                stream.send({"op": "free-keys", "keys": list(who_has), "stimulus_id": f"scar-orphan-{time.time()}"})
        except Exception:  # never raise out of a scheduler handler
            logger.exception("dask_scar: could not register chunks %s from %s", list(who_has), worker)


def ensure_plugin(client: Client) -> None:
    """Install :class:`ScarPlugin` on the client's scheduler unless it is there already."""
    present = client.run_on_scheduler(lambda dask_scheduler: ScarPlugin.name in dask_scheduler.plugins)
    if not present:
        client.register_plugin(ScarPlugin())
