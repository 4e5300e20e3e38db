"""The same maths as :class:`~dask_scar.Trainer`, in one process, without Dask.

It is the reference that distributed results are checked against and the baseline
of ``benchmarks/bench_iteration.py``; it is also handy for debugging a model.
"""

from __future__ import annotations

import types

import numpy as np
import pandas as pd

from . import data
from .chunks import ChunkId
from .models import Model


def prepare_local(model: Model, frame: pd.DataFrame, target: str | None = None,
                  features: list[str] | None = None) -> dict[str, np.ndarray]:
    """Validate ``frame`` like the trainer does, set up ``model``, and return the block arrays."""
    features, target = data.check_columns(model, list(frame.columns), frame.dtypes, target, features)
    arrays, summary = data.to_arrays(frame, features, target, model.feature_dtype,
                                     model.target_dtype if target is not None else None)
    model.setup(data.summarize([summary], target is not None))
    return arrays


def fit_local(model: Model, block: dict[str, np.ndarray], max_iter: int, xp: types.ModuleType = np,
              callback=None) -> tuple[dict[str, np.ndarray], list[float]]:
    """Run ``max_iter`` iterations on one block; returns the parameters and the losses.

    ``model`` must be set up (see :func:`prepare_local`). ``callback(iteration)``,
    if given, runs after each iteration.
    """
    specs = model.parameter_specs()
    whole = {name: ChunkId(name, 0, 0, spec.shape[0]) for name, spec in specs.items()}   # one chunk each
    state = {whole[name]: model.new_state(name, model.init_rows(name, 0, spec.shape[0], xp))
             for name, spec in specs.items()}
    losses = []
    for k in range(1, max_iter + 1):
        for phase, names in enumerate(model.phases):
            params = {name: state[whole[name]]["value"] for name in model.phase_inputs(phase)}
            c = model.contribution(phase, block, params, xp, iteration=k, block_id=0)
            new, loss = model.apply({whole[name]: state[whole[name]] for name in names}, [c], xp)
            state.update(new)
            if phase == 0:
                losses.append(loss)
        if callback is not None:
            callback(k)
    return {cid.name: model.fitted_value(s) for cid, s in state.items()}, losses
