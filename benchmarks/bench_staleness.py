"""What a partial checkpoint would have to achieve: the iteration cost of restoring
the lost chunks as they were ``age`` iterations before the failure.

``dask-scar bench`` measures real policies. This asks what *any* policy could do:
for each case of the bench (``--quick`` data, simulated, the same failures and
lost fractions), the dead workers' chunks are put back as they were exactly ``age``
iterations earlier -- every lost block equally old -- and the cost is printed next
to ``traditional`` (full checkpoint every ``every`` + full rollback).

The budget argument: a policy that writes the I/O of a full checkpoint every
``C`` iterations and saves each block periodically (block ``i`` every ``P_i``
iterations) has ``mean(1/P_i) = 1/C``; so ``mean(P_i) >= C`` (Jensen) and, at a
failure at a random time, a block is on average at least ``C/2`` iterations old.
Blocks that never move can be left out (scikit-learn's digits have pixels that are
always 0); blocks that all drift alike cannot, and there ages spread around that
mean cost more than the uniform age (the error is dominated by the oldest blocks).
So on such a model, age ``C/2`` bounds what any policy at that I/O can do.

    python benchmarks/bench_staleness.py                        # gradient models and ALS, ~1 minute
    python benchmarks/bench_staleness.py --cases linear --ages 1 5 10
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from dask_scar import config
from dask_scar.bench import CASES, FreeRun, Simulation, failure_iterations
from dask_scar.bench._bench import LOST, SIM_WORKERS, blocks_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    deterministic = [name for name, case in CASES.items() if case.smooth == 1]   # not LDA's sampler
    parser.add_argument("--cases", default=",".join(deterministic),
                        help=f"comma-separated, of: {', '.join(deterministic)}")
    parser.add_argument("--ages", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    args = parser.parse_args()
    if min(args.ages) < 0:
        parser.error(f"ages are iterations before the failure: 0 or more, got {min(args.ages)}")
    for name in args.cases.split(","):
        if name not in deterministic:
            parser.error(f"unknown case {name!r}: choose among {', '.join(deterministic)} (LDA's sampler "
                         f"draws differently after any change, so one trial per age says little)")

    print("| model | traditional | " + " | ".join(f"age {a}" for a in args.ages) + " |")
    print("|---|---:|" + "---:|" * len(args.ages))
    for name in args.cases.split(","):
        case = CASES[name]
        model = case.model()
        sim = Simulation(model, blocks_of(model, case.frame(True), case.target, SIM_WORKERS), 2 * SIM_WORKERS,
                         config.get("checkpoint.blocks-per-chunk"))
        traditional = next(s for s in case.strategies() if s.name == "traditional")
        losses, trajectory, _, _ = sim.failure_free(case.max_iter, [traditional], set())
        free = FreeRun.of(losses, case, np.zeros(len(trajectory)), float("nan"))
        failures = failure_iterations(free.n_free, case, 3)
        snapshots = sim.failure_free(max(failures), [traditional], set(failures))[2]
        stop = free.stop(free.n_free + 3 * case.every + 50, case.smooth)

        def mean_cost(trial) -> float:
            return float(np.mean([trial(t, victims) for t in failures for victims in LOST.values()]))

        def full_rollback(t: int, victims: tuple[int, ...]) -> float:
            return free.cost(sim.trial(snapshots[t], traditional, victims, losses[:t], stop).losses, case.smooth)

        def aged(age: int):
            def trial(t: int, victims: tuple[int, ...]) -> float:
                states = copy.deepcopy(snapshots[t].states)
                dead = {sim.workers[v] for v in victims}
                for cid in sim.ids:
                    if sim.owner[cid] in dead:
                        then = trajectory[max(0, t - age)][cid.name][cid.start:cid.stop]
                        states[cid] = model.new_state(cid.name, then.copy())
                ran, k = list(losses[:t]), t + 1
                while not stop(ran):
                    ran.append(sim.step(states, k))
                    k += 1
                return free.cost(ran, case.smooth)
            return trial

        base = mean_cost(full_rollback)
        cells = []
        for age in args.ages:
            cost = mean_cost(aged(age))
            cells.append(f"{cost:.2f} ({1 - cost / base:.0%})")
        print(f"| {name} | {base:.2f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nmean iteration cost over {len(LOST)} lost fractions x 3 failure iterations (simulated, "
          f"{SIM_WORKERS} workers); in brackets: less than traditional")


if __name__ == "__main__":
    main()
