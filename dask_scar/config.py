"""dask_scar settings, read through ``dask.config`` under the ``scar`` namespace.

Defaults live in ``dask_scar.yaml``; override them like any Dask setting::

    dask.config.set({"scar.chunks-per-worker": 4})
    # or DASK_SCAR__CHUNKS_PER_WORKER=4 in the environment, or a YAML file.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "dask_scar.yaml")

with open(_DEFAULTS_FILE) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)


def get(key: str, override: Any = None) -> Any:
    """The value of ``scar.<key>``, or ``override`` when that is not None."""
    if override is not None:
        return override
    return dask.config.get(f"scar.{key}")
