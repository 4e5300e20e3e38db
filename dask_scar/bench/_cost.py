"""How much a failure costs training: the measure of the SCAR paper.

The *iteration cost* of a failure is the number of iterations a run needs to reach
a target loss, minus the number the failure-free run (same seed, same data)
needed; iterations rolled back and run again count. The target is the loss of
the failure-free run at a chosen iteration.

Examples
--------
>>> import pandas as pd
>>> free = pd.DataFrame({"loss": [4.0, 2.0, 1.0, 0.5]})
>>> failed = pd.DataFrame({"loss": [4.0, 2.0, 3.0, 1.5, 0.9, 0.5]})
>>> iteration_cost(failed, free, at=3)          # the free run reached 1.0 after 3 iterations
2
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def iterations_to_reach(history: pd.DataFrame, loss: float) -> int | None:
    """Iterations run (every row of ``history``, rolled-back ones included) until
    the loss first fell to ``loss`` or below; None if it never did."""
    reached = np.flatnonzero(history["loss"].to_numpy() <= loss)
    return int(reached[0]) + 1 if len(reached) else None


def iteration_cost(history: pd.DataFrame, free: pd.DataFrame, at: int) -> int | None:
    """Extra iterations ``history`` needed to reach the loss that the failure-free
    run ``free`` had after ``at`` iterations (None: never reached)."""
    if not 1 <= at <= len(free):
        raise ValueError(f"at must be between 1 and the failure-free run's {len(free)} iterations, got {at}")
    ran = iterations_to_reach(history, float(free["loss"].iloc[at - 1]))
    return None if ran is None else ran - iterations_to_reach(free, float(free["loss"].iloc[at - 1]))
