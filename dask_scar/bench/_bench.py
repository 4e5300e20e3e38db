"""``dask-scar bench``: the iteration cost of failures under each recovery strategy,
simulated over many trials and measured with real kills on a LocalCluster."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import config
from ..local import prepare_local
from ._cases import CASES, STRATEGIES, Case
from ._cost import converged_at, iterations_to_reach, predicted_cost, reached, smoothed
from ._simulate import Simulation

logger = logging.getLogger(__name__)

#: Lost fractions of the workers in the simulated trials, and which stand-in workers die.
LOST = {0.125: (1,), 0.25: (1, 5), 0.5: (1, 3, 5, 7)}
SIM_WORKERS = 8
REAL_WORKERS = 4
REAL_VICTIMS = (1,)          # a quarter of the real cluster
REAL_QUICK = ("traditional", "scar", "scar-paper", "scar+copies")   # real kills of --quick (others: simulated)


@dataclass
class FreeRun:
    """The failure-free run: its losses, where it converged, the target loss, and
    how fast it contracts (for the theory)."""

    losses: list[float]
    n_free: int
    target: float
    distances: np.ndarray            # ||x_k - x*|| for k = 0..max_iter
    contraction: float               # the average rate c over the run to convergence

    def rate_at(self, iteration: int, window: int = 20) -> float:
        """The contraction rate over the ``window`` iterations before ``iteration``
        (gradient descent slows down as it converges: the rate where a failure
        happens is what bounds its cost)."""
        start = max(0, iteration - window)
        if self.distances[start] <= 0 or self.distances[iteration] <= 0:
            return math.nan
        return float((self.distances[iteration] / self.distances[start]) ** (1.0 / (iteration - start)))

    @classmethod
    def of(cls, losses: list[float], case: Case, distances: np.ndarray, contraction: float) -> FreeRun:
        """The failure-free run with these losses: where it converged, by ``case``'s rule."""
        n_free = converged_at(np.array(losses), case.tol, case.smooth)
        return cls(losses, n_free, float(smoothed(losses, case.smooth)[n_free - 1]), distances, contraction)

    def stop(self, budget: int, smooth: int):
        """A trial's stopping rule: the target reached, or ``budget`` iterations run."""
        return lambda ran: len(ran) >= budget or reached(ran, self.target, smooth)

    def predicted(self, delta: float, iteration: int) -> float:
        """SCAR's bound on the cost of a perturbation ``delta`` after ``iteration``."""
        return predicted_cost(delta, float(self.distances[iteration]), self.rate_at(iteration))

    def cost(self, losses: list[float], smooth: int) -> float:
        """Iteration cost of a run with these losses (NaN: never reached the target)."""
        ran = iterations_to_reach(pd.DataFrame({"loss": smoothed(losses, smooth)}), self.target)
        return math.nan if ran is None else float(ran - self.n_free)


@dataclass
class CaseResult:
    case: Case
    free: FreeRun
    trials: list[dict] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)   # strategy -> losses of the plotted trial
    failure: int = 0
    bytes_per_iter: dict[str, float] = field(default_factory=dict)


def blocks_of(model, frame: pd.DataFrame, target: str | None, workers: int) -> list[dict[str, np.ndarray]]:
    """The frame as ``workers`` contiguous row blocks (the model set up on all of it)."""
    arrays = prepare_local(model, frame, target)
    bounds = np.linspace(0, len(frame), workers + 1).round().astype(int)
    return [{k: v[a:b] for k, v in arrays.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def failure_iterations(n_free: int, case: Case, count: int) -> list[int]:
    """``count`` failure iterations spread over the failure-free run after its first
    full checkpoint, at different points between two full checkpoints, each away
    from a checkpoint (and, where the policy allows, from a partial round) so that
    every write the store holds at the failure had finished -- in a real run too."""
    often = case.often
    allowed = [r for r in range(case.every) if r not in (0, 1) and (often <= 2 or r % often not in (0, 1))]
    picks = set()
    for i in range(count):
        residue = allowed[int((i + 0.5) * len(allowed) / count)]
        span = n_free - case.every
        base = (case.every + int((i + 0.5) / count * span)) // case.every * case.every
        t = base + residue
        while t >= n_free and t - case.every > case.every:
            t -= case.every
        if case.every < t < n_free:
            picks.add(t)
    if not picks:
        raise ValueError(f"{case.name}: the failure-free run converged after {n_free} iterations, before "
                         f"its first full checkpoint (every {case.every}): too early to place failures")
    return sorted(picks)


def simulate(case: Case, frame: pd.DataFrame, workers: int, failures: list[int] | None, count: int,
             lost: dict[float, tuple[int, ...]]) -> CaseResult:
    """The failure-free run, then every strategy under every (failure, lost fraction)."""
    model = case.model()
    sim = Simulation(model, blocks_of(model, frame, case.target, workers), 2 * workers,
                     config.get("checkpoint.blocks-per-chunk"))
    strategies = case.strategies()
    losses, trajectory, _, stores = sim.failure_free(case.max_iter, strategies, set())
    n_free = converged_at(np.array(losses), case.tol, case.smooth)
    xstar = np.concatenate([v.ravel() for v in trajectory[-1].values()]).astype(np.float64)
    distances = np.array([np.linalg.norm(np.concatenate([v.ravel() for v in x.values()]) - xstar)
                          for x in trajectory])
    contraction = float((distances[n_free] / distances[0]) ** (1.0 / n_free)) if distances[0] > 0 else math.nan
    free = FreeRun.of(losses, case, distances, contraction)
    failures = failures or failure_iterations(n_free, case, count)
    snapshots = sim.failure_free(max(failures), strategies, set(failures))[2]
    result = CaseResult(case, free, failure=failures[len(failures) // 2])
    stop = free.stop(n_free + 3 * case.every + 50, case.smooth)

    for failure in failures:
        for fraction, victims in lost.items():
            for strategy in strategies:
                trial = sim.trial(snapshots[failure], strategy, victims, losses[:failure], stop)
                result.trials.append({
                    "model": case.name, "mode": "simulated", "strategy": strategy.name, "workers": workers,
                    "failure_iteration": failure, "lost_fraction": fraction,
                    "iteration_cost": free.cost(trial.losses, case.smooth),
                    "perturbation_norm": trial.perturbation,
                    "predicted_cost": free.predicted(trial.perturbation, failure),
                    "contraction": free.rate_at(failure),
                    "bytes_read": trial.bytes_read, "resumed_at": trial.resumed_at,
                    "lost_chunks": trial.lost_chunks,
                })
                if failure == result.failure and fraction == 0.25:
                    result.curves[strategy.name] = trial.losses
    result.bytes_per_iter = {name: store.bytes_per_iteration for name, store in stores.items()}
    return result


def real_trials(result: CaseResult, frame: pd.DataFrame, cluster, tmp: str,
                names: tuple[str, ...] = STRATEGIES, real_free: bool = True) -> dict[str, list[float]]:
    """One real SIGKILL per strategy (of ``names``) on a :class:`~._real.BenchCluster`
    (``REAL_WORKERS`` workers, ``REAL_VICTIMS`` killed after the same iteration),
    next to a simulation of the very same failure; adds their rows to
    ``result.trials`` and returns the real loss curves.

    The real costs are measured against a real failure-free run, or, without
    ``real_free``, against the simulated one of the same cluster shape -- the same
    maths as the trainer's, so the same losses for a deterministic model (a
    stochastic one, ``case.smooth > 1``, always gets a real failure-free run)."""
    from ._real import run_real

    case = result.case
    model = case.model()
    sim = Simulation(model, blocks_of(model, frame, case.target, REAL_WORKERS), 2 * REAL_WORKERS,
                     config.get("checkpoint.blocks-per-chunk"))
    strategies = [s for s in case.strategies() if s.name in names]
    failure = result.failure
    losses, _, snapshots, _ = sim.failure_free(case.max_iter, strategies, {failure})
    sim_free = free = FreeRun.of(losses, case, result.free.distances, result.free.contraction)
    if real_free or case.smooth > 1:
        free_run = run_real(cluster, case, frame, None, None, max_iter=sim_free.n_free + 10)
        free = FreeRun.of(free_run.losses, case, result.free.distances, result.free.contraction)
    budget = free.n_free + 3 * case.every + 50
    curves = {"failure-free": free.losses}
    for strategy in strategies:
        run = run_real(cluster, case, frame, f"{tmp}/{case.name}-{strategy.name}.zarr", strategy, failure,
                       REAL_VICTIMS, free.target, max_iter=budget)
        same = sim.trial(snapshots[failure], strategy, REAL_VICTIMS, losses[:failure],
                         sim_free.stop(budget, case.smooth))
        events = run.events
        result.trials.append({
            "model": case.name, "mode": "real", "strategy": strategy.name, "workers": REAL_WORKERS,
            "failure_iteration": failure, "lost_fraction": len(REAL_VICTIMS) / REAL_WORKERS,
            "iteration_cost": free.cost(run.losses, case.smooth),
            "simulated_cost": sim_free.cost(same.losses, case.smooth),
            "perturbation_norm": same.perturbation,
            "predicted_cost": result.free.predicted(same.perturbation, failure),
            "est_perturbation": sum(e.est_perturbation for e in events),
            "bytes_read": sum(e.bytes_read for e in events),
            "simulated_bytes_read": same.bytes_read,
            "extrapolated_blocks": sum(e.extrapolated_blocks for e in events),
            "recovery_seconds": sum(e.seconds for e in events),
            "bytes_written_per_iter": run.bytes_written / max(1, len(run.losses)),
            "resumed_at": events[0].resumed_at if events else math.nan,
            "lost_chunks": sum(len(e.lost_chunks) for e in events), "recoveries": len(events),
            "seconds": run.seconds,
        })
        curves[strategy.name] = run.losses
    return curves


def aggregate(results: list[CaseResult]) -> pd.DataFrame:
    """One row per (model, strategy): the simulated trials' mean cost (all failure
    times and lost fractions), beside the real run's."""
    trials = pd.DataFrame([t for r in results for t in r.trials])
    rows = []
    for r in results:
        for name in STRATEGIES:
            sim = trials[(trials["model"] == r.case.name) & (trials["strategy"] == name)
                         & (trials["mode"] == "simulated")]
            real = trials[(trials["model"] == r.case.name) & (trials["strategy"] == name) & (trials["mode"] == "real")]
            pick = (lambda col: float(real[col].mean()) if len(real) and col in real else math.nan)
            rows.append({
                "model": r.case.name, "strategy": name,
                "iteration_cost": sim["iteration_cost"].mean(), "iteration_cost_std": sim["iteration_cost"].std(),
                "trials": int(sim["iteration_cost"].notna().sum()),
                "not_reached": int(sim["iteration_cost"].isna().sum()),
                "lost_fraction": "/".join(f"{f:g}" for f in sorted(sim["lost_fraction"].unique())),
                "perturbation_norm": sim["perturbation_norm"].mean(), "predicted_cost": sim["predicted_cost"].mean(),
                "bytes_written_per_iter": r.bytes_per_iter.get(name, math.nan),
                "bytes_read": sim["bytes_read"].mean(),
                "recovery_seconds": pick("recovery_seconds"),
                "real_iteration_cost": pick("iteration_cost"), "real_simulated_cost": pick("simulated_cost"),
                "real_bytes_read": pick("bytes_read"),
                "real_est_perturbation": pick("est_perturbation"), "real_perturbation_norm": pick("perturbation_norm"),
                "n_free": r.free.n_free, "contraction": r.free.contraction,
            })
    table = pd.DataFrame(rows)
    base = table[table["strategy"] == "traditional"].set_index("model")
    for col, src in (("reduction", "iteration_cost"), ("real_reduction", "real_iteration_cost")):
        table[col] = 1 - table[src] / table["model"].map(base[src])
    return table


def markdown(table: pd.DataFrame) -> str:
    """The table the README shows."""
    lines = ["| model | strategy | iteration cost (simulated, mean ± std) | vs traditional | real kill: cost "
             "(simulated same case) | ‖δ‖ | predicted (bound) | bytes written / iteration | bytes read |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table.itertuples():
        if math.isnan(row.real_iteration_cost) and math.isnan(row.real_simulated_cost):
            real = "—"      # no real kill for this strategy
        else:
            cost = "not reached" if math.isnan(row.real_iteration_cost) else f"{row.real_iteration_cost:g}"
            real = f"{cost} ({row.real_simulated_cost:g})"
        lines.append(f"| {row.model} | {row.strategy} | {row.iteration_cost:.2f} ± {row.iteration_cost_std:.2f} | "
                     f"{'' if row.strategy == 'traditional' else f'{100 * row.reduction:.0f} %'} | {real} | "
                     f"{row.perturbation_norm:.3g} | {row.predicted_cost:.2f} | {row.bytes_written_per_iter:,.0f} | "
                     f"{row.bytes_read:,.0f} |")
    return "\n".join(lines)


def plot(result: CaseResult, curves: dict[str, list[float]], path: Path, what: str) -> None:
    """Loss against iterations run for one case: the failure, and each strategy's recovery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    failure = result.failure
    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax in (whole, zoom):
        for name, losses in curves.items():
            style = {"color": "black", "linewidth": 2.5, "alpha": 0.35} if name not in STRATEGIES else {}
            ax.plot(np.arange(1, len(losses) + 1), losses, label=name, **style)
            if name in STRATEGIES and len(losses) > failure:
                ax.plot([failure + 1], [losses[failure]], "o", color=ax.lines[-1].get_color())
        ax.axvline(failure, color="grey", linestyle=":")
        ax.axhline(result.free.target, color="grey", linewidth=0.8)
        ax.set_xlabel("iterations run (rolled-back ones count)")
    whole.set_yscale("log")
    whole.set_ylabel("loss")
    whole.set_title(f"{result.case.name}: {what}")
    ends = [len(c) for n, c in curves.items() if n in STRATEGIES]
    right = max(ends + [failure + 5]) + 2
    zoom.set_xlim(failure - 3, right)
    window = [v for c in curves.values() for v in c[failure - 3:right]]
    zoom.set_ylim(min(window) - 0.02 * (max(window) - min(window)), max(window) + 0.02 * (max(window) - min(window)))
    zoom.set_title(f"killed after iteration {failure}; dots: first iteration after recovery", fontsize=10)
    zoom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(quick: bool = False, out: str | Path = "bench-out", trials: int = 3, cases: list[str] | None = None,
        real: bool = True, echo=print) -> pd.DataFrame:
    """Run the bench; write ``out/bench.csv``, ``out/trials.csv``, ``out/bench.md`` and
    ``out/recovery.png``; return the per-(model, strategy) table."""
    from ._real import BenchCluster, quiet_cluster_logs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = cases or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    results, plotted = [], None
    cluster = None
    started = time.perf_counter()
    try:
        if real:
            quiet_cluster_logs()
            cluster = BenchCluster(REAL_WORKERS)
        with tempfile.TemporaryDirectory(prefix="dask-scar-bench-") as tmp:
            for name in names:
                case = CASES[name]
                t0 = time.perf_counter()
                frame = case.frame(quick)
                result = simulate(case, frame, SIM_WORKERS, None, trials, LOST)
                echo(f"{name}: converged after {result.free.n_free} iterations (target loss "
                     f"{result.free.target:.6g}); {len(result.trials)} simulated trials in "
                     f"{time.perf_counter() - t0:.1f} s")
                if cluster is not None:
                    t0 = time.perf_counter()
                    curves = real_trials(result, frame, cluster, tmp, REAL_QUICK if quick else STRATEGIES,
                                         real_free=not quick)
                    echo(f"{name}: {len(curves) - 1} real kills (SIGKILL) in {time.perf_counter() - t0:.1f} s")
                    if plotted is None:
                        plotted = (result, curves, "real SIGKILL of 1 of 4 workers")
                results.append(result)
    finally:
        if cluster is not None:
            cluster.close()
    table = aggregate(results)
    pd.DataFrame([t for r in results for t in r.trials]).to_csv(out / "trials.csv", index=False)
    table.to_csv(out / "bench.csv", index=False)
    text = markdown(table)
    (out / "bench.md").write_text(text + "\n")
    if plotted is None and results:
        first = results[0]
        plotted = (first, {"failure-free": first.free.losses, **first.curves}, "simulated loss of 1/4 of the workers")
    if plotted is not None:
        plot(*plotted[:2], out / "recovery.png", plotted[2])
    echo(text)
    echo(f"wrote {out / 'bench.csv'}, {out / 'trials.csv'}, {out / 'bench.md'} and {out / 'recovery.png'} "
         f"in {time.perf_counter() - started:.0f} s")
    return table
