"""What seeding Nesterov's velocity from the drift buys a restore from the store.

The store keeps no optimizer state. A chunk restored from it extrapolated gets, as
its velocity, the step per iteration its blocks' drift gives
(:func:`dask_scar.checkpoint.step_scales`); before, the velocity restarted at zero.
This runs the simulated failures of ``dask-scar bench`` (3 failure iterations, 1/8,
1/4, 1/2 and all of 8 workers lost, surviving copies off) on models with Nesterov
momentum (digits; 50,000 x 50 synthetic data), both ways in one run, and prints the mean
iteration cost of each: seeded / from zero. ``traditional`` (full checkpoint +
full rollback) and ``scar-paper`` (the newest saved version as it is) do not
extrapolate, and their velocity restarts at zero either way: one figure each.

    python benchmarks/bench_velocity.py                  # three models, 2.5 minutes on 2 cores
    python benchmarks/bench_velocity.py --cases digits --trials 5
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import pandas as pd

from dask_scar import datasets
from dask_scar.bench import Case, simulate
from dask_scar.bench._bench import LOST, SIM_WORKERS
from dask_scar.models import LinearRegression, Model, SoftmaxRegression

ALL_LOST = {**LOST, 1.0: tuple(range(SIM_WORKERS))}


class NesterovCase(Case):
    def strategies(self):
        return [s for s in super().strategies() if s.name in ("traditional", "partial", "scar", "scar-paper")]


CASES = {case.name: case for case in [
    NesterovCase("digits", "softmax regression, scikit-learn's digits", lambda quick: datasets.digits(),
                 lambda: SoftmaxRegression(l2=1e-3, learning_rate=0.5, momentum=0.9), "label",
                 max_iter=300, tol=1e-4, every=20),
    NesterovCase("synthetic", "softmax regression, synthetic Gaussian classes (50,000 x 50)",
                 lambda quick: datasets.synthetic_classification(50_000, 50, 10, seed=0),
                 lambda: SoftmaxRegression(l2=1e-3, learning_rate=1.0, momentum=0.9), "label",
                 max_iter=200, tol=1e-4, every=20),
    NesterovCase("linear", "least squares, synthetic correlated features (50,000 x 50)",
                 lambda quick: datasets.synthetic_regression(50_000, 50, seed=0),
                 lambda: LinearRegression(l2=1e-3, learning_rate=0.05, momentum=0.9), "y",
                 max_iter=250, tol=1e-5, every=20),
]}


@contextmanager
def velocity_from_zero(case: Case):
    """The restore as it was: the model's optimizer slots keep their fresh values."""
    kind = type(case.model())
    seeded = kind.restore_slots
    kind.restore_slots = Model.restore_slots
    try:
        yield
    finally:
        kind.restore_slots = seeded


def costs(case: Case, trials: int) -> pd.Series:
    result = simulate(case, case.frame(True), SIM_WORKERS, None, trials, ALL_LOST)
    table = pd.DataFrame(result.trials)
    return table.groupby(["strategy", "lost_fraction"])["iteration_cost"].mean()


def arguments(description: str, cases: dict[str, Case]) -> tuple[list[str], int]:
    """The command line's ``--cases`` (names of ``cases``, all by default) and ``--trials``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(cases), help=f"comma-separated, of: {', '.join(cases)}")
    parser.add_argument("--trials", type=int, default=3, help="failure iterations per model")
    args = parser.parse_args()
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose among {', '.join(cases)}")
    return names, args.trials


def main() -> None:
    names, trials = arguments(__doc__, CASES)
    fractions = list(ALL_LOST)
    print("| model | strategy | " + " | ".join(f"{f:g} lost" for f in fractions) + " |")
    print("|---|---|" + "---:|" * len(fractions))
    for name in names:
        case = CASES[name]
        seeded = costs(case, trials)
        with velocity_from_zero(case):
            zero = costs(case, trials)
        for strategy in ("traditional", "partial", "scar", "scar-paper"):
            # neither a rollback nor the paper's restore extrapolates: their velocity restarts either way
            one = strategy in ("traditional", "scar-paper")
            cells = [f"{seeded[strategy, f]:.2f}" + ("" if one else f" / {zero[strategy, f]:.2f}") for f in fractions]
            print(f"| {name} | {strategy} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nmean iteration cost, velocity seeded from the drift / restarted from zero, over {trials} "
          f"failure iterations (simulated, {SIM_WORKERS} workers, copies off)")


if __name__ == "__main__":
    main()
