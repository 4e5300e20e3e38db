"""The iteration-cost measure (dask_scar.bench)."""

import pandas as pd
import pytest

from dask_scar.bench import iteration_cost, iterations_to_reach


def frame(*losses):
    return pd.DataFrame({"loss": losses})


def test_iterations_to_reach_counts_every_row_run():
    assert iterations_to_reach(frame(4.0, 2.0, 1.0), 2.0) == 2
    assert iterations_to_reach(frame(4.0, 2.0, 1.0), 0.5) is None
    # a rollback re-runs iterations: they are rows, and they count
    rolled_back = pd.DataFrame({"iteration": [1, 2, 3, 2, 3, 4], "loss": [4.0, 2.0, 1.5, 2.0, 1.5, 1.0]})
    assert iterations_to_reach(rolled_back, 1.0) == 6


def test_iteration_cost_against_the_failure_free_run():
    free = frame(4.0, 2.0, 1.0, 0.5, 0.25)
    assert iteration_cost(free, free, at=4) == 0
    assert iteration_cost(frame(4.0, 2.0, 3.0, 1.5, 0.9, 0.5), free, at=4) == 2
    assert iteration_cost(frame(4.0, 2.0, 3.0), free, at=3) is None       # never got there
    # the failure-free run may reach its own loss at `at` earlier (a plateau): that is the baseline
    assert iteration_cost(frame(4.0, 1.0, 1.0, 1.0), frame(4.0, 1.0, 1.0, 1.0), at=4) == 0
    with pytest.raises(ValueError, match="at must be between 1 and the failure-free run's 5 iterations"):
        iteration_cost(free, free, at=6)
