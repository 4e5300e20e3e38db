"""How much a failure costs training, measured the way the SCAR paper does.

``dask-scar bench`` (:func:`run`) trains each case of :data:`CASES` failure-free,
then fails it the same way under each recovery strategy -- simulated over many
trials (:mod:`._simulate`) and with real SIGKILLs on a LocalCluster
(:mod:`._real`) -- and reports the iteration cost of each strategy against
traditional checkpoint/rollback.
"""

from ._bench import CaseResult, FreeRun, aggregate, failure_iterations, markdown, run, simulate
from ._cases import CASES, STRATEGIES, Case
from ._cost import converged_at, iteration_cost, iterations_to_reach, predicted_cost, smoothed
from ._simulate import Simulation, Strategy

__all__ = [
    "CASES",
    "STRATEGIES",
    "Case",
    "CaseResult",
    "FreeRun",
    "Simulation",
    "Strategy",
    "converged_at",
    "aggregate",
    "failure_iterations",
    "markdown",
    "run",
    "iteration_cost",
    "iterations_to_reach",
    "predicted_cost",
    "simulate",
    "smoothed",
]
