"""What holding back the blocks whose drift turned buys a restore from the store.

A restore from the store extrapolates each block along the drift between its two
saved versions. Where a fit overshoots and swings back (least squares with
momentum here), that puts a block further along its last swing, farther off than
its newest saved version. A chunk's owner measures, with its priorities, which of
its blocks an extrapolated restore would put farther off than the newest saved
version (:func:`dask_scar.checkpoint.distances`); restores take those as saved.

This runs the simulated failures of ``dask-scar bench`` (3 failure iterations,
1/8, 1/4, 1/2 and all of 8 workers lost, surviving copies off) for ``scar``
(``PrioritizedCheckpoint`` + partial recovery) both ways in one run, and the
paper's restore (every block as saved) beside them, and prints the mean iteration
cost of each: the models of ``dask-scar bench --quick`` (gradient descent, ALS), and
those of ``benchmarks/bench_velocity.py`` (Nesterov momentum, names ending ``-nesterov``).

    python benchmarks/bench_turned.py                    # seven models, 2 minutes on 2 cores
    python benchmarks/bench_turned.py --cases linear-nesterov --trials 5
"""

from __future__ import annotations

from dataclasses import replace

from bench_velocity import ALL_LOST, CASES as NESTEROV, arguments, costs

from dask_scar.bench import CASES as BENCH
from dask_scar.bench import Case
from dask_scar.bench._bench import SIM_WORKERS

SHOWN = {"scar": "held", "scar-every-block": "every block extrapolated", "scar-paper": "the paper's"}


class TurnedCase(Case):
    def strategies(self):
        scar = {s.name: s for s in super().strategies()}
        return [scar["scar"], replace(scar["scar"], name="scar-every-block", hold_turned=False), scar["scar-paper"]]


def cases() -> dict[str, Case]:
    out = {name: case for name, case in BENCH.items() if name != "lda"}    # LDA does not extrapolate
    out.update({f"{name}-nesterov": case for name, case in NESTEROV.items()})
    return {name: TurnedCase(**{**case.__dict__, "name": name}) for name, case in out.items()}


def main() -> None:
    every = cases()
    names, trials = arguments(__doc__, every)
    fractions = list(ALL_LOST)
    print("| model | restore | " + " | ".join(f"{f:g} lost" for f in fractions) + " |")
    print("|---|---|" + "---:|" * len(fractions))
    for name in names:
        cost = costs(every[name], trials)
        for strategy, shown in SHOWN.items():
            print(f"| {name} | {shown} | " + " | ".join(f"{cost[strategy, f]:.2f}" for f in fractions) + " |",
                  flush=True)
    print(f"\nmean iteration cost of scar (PrioritizedCheckpoint + partial recovery): blocks whose drift turned "
          f"restored as saved / every block extrapolated / the paper's restore, over {trials} failure "
          f"iterations (simulated, {SIM_WORKERS} workers, copies off)")


if __name__ == "__main__":
    main()
