"""dask_scar.bench: the iteration-cost measure, the simulated failures, and their
agreement with real ones."""

import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import dask_scar as scar
from dask_scar.bench import (
    CASES,
    STRATEGIES,
    Case,
    Simulation,
    converged_at,
    failure_iterations,
    iteration_cost,
    iterations_to_reach,
    predicted_cost,
    simulate,
    smoothed,
)
from dask_scar.bench._bench import REAL_VICTIMS, REAL_WORKERS, blocks_of, real_trials
from dask_scar.bench._real import BenchCluster
from dask_scar.cli import main
from dask_scar.datasets import synthetic_classification
from dask_scar.local import fit_local, prepare_local
from dask_scar.recovery import live_workers

from conftest import wait_for


def frame(*losses):
    return pd.DataFrame({"loss": losses})


def test_iterations_to_reach_counts_every_row_run():
    assert iterations_to_reach(frame(4.0, 2.0, 1.0), 2.0) == 2
    assert iterations_to_reach(frame(4.0, 2.0, 1.0), 0.5) is None
    # sums taken in another order (rows moved to another worker) round differently
    assert iterations_to_reach(frame(4.0, 2.0 * (1 + 2e-10), 1.0), 2.0) == 2
    assert iterations_to_reach(frame(4.0, 2.0 * (1 + 1e-6), 1.0), 2.0) == 3
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


# -- the theory and the convergence rule ------------------------------------------------

def test_smoothed_and_converged_at():
    assert smoothed([4.0, 2.0, 0.0], 2).tolist() == [4.0, 3.0, 1.0]
    assert smoothed([4.0, 2.0], 1).tolist() == [4.0, 2.0]
    losses = np.array([8.0, 4.0, 2.0, 1.9999, 1.99985])
    assert converged_at(losses, tol=1e-3) == 4          # the first change within 0.1 %: 2.0 -> 1.9999
    assert converged_at(losses, tol=1e-9) == 5          # never: the last iteration


def test_predicted_cost_is_the_contraction_bound():
    # log_{1/c}(1 + delta / ||x_T - x*||): with c = 0.5, delta = 3, distance 1 -> log2(4) = 2
    assert predicted_cost(3.0, 1.0, 0.5) == pytest.approx(2.0)
    assert predicted_cost(0.0, 1.0, 0.5) == 0.0
    assert np.isnan(predicted_cost(1.0, 1.0, 1.0))      # no contraction: no bound


def test_failure_iterations_avoid_checkpoints_and_spread_over_the_interval():
    case = CASES["softmax-digits"]                       # full every 20, partial rounds every 5
    picks = failure_iterations(183, case, 3)
    assert picks == sorted(picks) and len(picks) == 3
    assert all(20 < t < 183 and t % 20 not in (0, 1) and t % 5 not in (0, 1) for t in picks)
    assert len({t % 20 for t in picks}) == 3             # early, middle and late between two full checkpoints
    with pytest.raises(ValueError, match="before its first full checkpoint"):
        failure_iterations(15, case, 3)


# -- the simulation ------------------------------------------------------------------------

TINY = Case("tiny", "a small softmax regression", lambda quick: synthetic_classification(3000, 15, 5, seed=2),
            lambda: scar.SoftmaxRegression(l2=1e-3, learning_rate=1.0), "label", max_iter=120, tol=3e-3, every=10)


@pytest.mark.parametrize("solver", ["gd", "lbfgs"])
def test_simulation_runs_the_trainers_maths(solver):
    frame = TINY.frame(True)
    make = (TINY.model if solver == "gd" else
            lambda: scar.SoftmaxRegression(l2=1e-3, solver="lbfgs"))   # L-BFGS updates all chunks at once
    model = make()
    sim = Simulation(model, blocks_of(model, frame, "label", 4), n_chunks=8, blocks_per_chunk=8)
    losses = sim.failure_free(20, TINY.strategies(), set())[0]
    reference = make()
    _, local = fit_local(reference, prepare_local(reference, frame, "label"), 20)
    np.testing.assert_allclose(losses, local, rtol=1e-5 if solver == "gd" else 1e-4)
    # the chunks and their placement are the trainer's: 8 chunks, 2 per stand-in worker
    assert len(sim.ids) == 8 and sorted(Counter(sim.owner.values()).values()) == [2, 2, 2, 2]


def test_simulated_recovery_rules():
    result = simulate(TINY, TINY.frame(True), 4, [45], 1, {0.25: (1,), 0.0: ()})
    by = {(t["strategy"], t["lost_fraction"]): t for t in result.trials}
    full = by["traditional", 0.25]
    # full rollback: back to the last full checkpoint (iteration 40), and the same
    # trajectory from there: it costs exactly the iterations rolled back
    assert full["resumed_at"] == 40 and full["iteration_cost"] == 45 - 40
    assert full["bytes_read"] == 16 * 5 * 4             # every parameter: 16 rows x 5 classes of float32
    # partial recovery reads only the lost quarter's chunks, and costs less
    scar_trial = by["scar", 0.25]
    assert scar_trial["resumed_at"] == 45 and scar_trial["lost_chunks"] == 2
    paper = by["scar-paper", 0.25]
    assert paper["bytes_read"] <= full["bytes_read"] / 4      # the newest saved versions of 2 chunks of 8
    # extrapolating reads the versions before them too, and costs no more
    assert paper["bytes_read"] < scar_trial["bytes_read"] <= 2 * paper["bytes_read"]
    assert scar_trial["iteration_cost"] <= paper["iteration_cost"]
    assert 0 <= scar_trial["iteration_cost"] < full["iteration_cost"]
    assert scar_trial["predicted_cost"] > 0 and scar_trial["perturbation_norm"] > 0
    # nobody lost: nothing restored, nothing to pay
    assert by["scar", 0.0]["iteration_cost"] == 0 and by["scar", 0.0]["perturbation_norm"] == 0
    # the same bytes per iteration for the full and the prioritized checkpoint
    assert result.bytes_per_iter["scar"] == pytest.approx(result.bytes_per_iter["traditional"], rel=0.1)


def test_bench_command_writes_its_files(tmp_path, capsys):
    assert main(["bench", "--quick", "--simulated-only", "--cases", "linear", "--trials", "1",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "bench.csv")
    for column in ("model", "strategy", "iteration_cost", "iteration_cost_std", "trials", "lost_fraction",
                   "perturbation_norm", "predicted_cost", "bytes_written_per_iter", "bytes_read",
                   "recovery_seconds"):
        assert column in table.columns, column
    assert table["strategy"].tolist() == list(STRATEGIES)
    assert (table["trials"] == 3).all()                 # one failure iteration x three lost fractions
    assert (tmp_path / "recovery.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| linear | scar |" in out
    assert main(["bench", "--cases", "linear,nope", "--out", str(tmp_path)]) == 2
    assert "unknown case(s) nope; choose from softmax-digits, softmax-synthetic, linear, mf, lda" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_simulated_and_real_failures_agree(tmp_path):
    """The same failure (iteration, worker, policy) with a real SIGKILL on a 4-worker
    LocalCluster and in the simulation costs the same number of iterations."""
    frame = TINY.frame(True)
    result = simulate(TINY, frame, REAL_WORKERS, [45], 1, {0.25: REAL_VICTIMS})
    with BenchCluster(REAL_WORKERS) as cluster:
        real_trials(result, frame, cluster, str(tmp_path), ("traditional", "scar", "scar-paper"))
    real = {t["strategy"]: t for t in result.trials if t["mode"] == "real"}
    assert set(real) == {"traditional", "scar", "scar-paper"}
    for name, trial in real.items():
        assert trial["recoveries"] == 1, name
        assert abs(trial["iteration_cost"] - trial["simulated_cost"]) <= 1, (name, trial)
        if name != "traditional":       # the same blocks read, newest and previous versions
            assert trial["bytes_read"] == trial["simulated_bytes_read"], (name, trial)
    assert real["traditional"]["resumed_at"] == 40
    assert real["scar"]["bytes_read"] < real["traditional"]["bytes_read"]
    # scar extrapolates the lost blocks from their last two saves; the paper's restore does not
    assert real["scar"]["extrapolated_blocks"] > 0 and real["scar-paper"]["extrapolated_blocks"] == 0
    assert real["scar"]["bytes_read"] > real["scar-paper"]["bytes_read"]
    # the trainer's own estimate of the perturbation bounds the one measured in the simulation
    assert real["scar"]["est_perturbation"] >= 0.9 * real["scar"]["perturbation_norm"]


def every_worker_killed(tmp_path, case: Case, frame: pd.DataFrame, strategy, failure: int, after: int,
                        free: list[float]) -> list[float]:
    """``case`` on a real cluster of REAL_WORKERS, every worker SIGKILLed after
    iteration ``failure``: the ``after`` losses after the restore (checked: every chunk
    came from the store, some blocks extrapolated, and the losses before are ``free``)."""
    from dask_scar.bench._real import run_real

    with BenchCluster(REAL_WORKERS) as cluster:
        run = run_real(cluster, case, frame, str(tmp_path / "ckpt.zarr"), strategy, failure,
                       tuple(range(REAL_WORKERS)), max_iter=failure + after)
    (event,) = run.events
    assert event.extrapolated_blocks > 0 and len(event.lost_chunks) == 2 * REAL_WORKERS
    np.testing.assert_allclose(run.losses[:failure], free, rtol=1e-5)
    return run.losses[failure:]


@pytest.mark.slow
def test_a_real_restore_seeds_nesterovs_velocity_as_the_simulation_does(tmp_path, monkeypatch):
    """With Nesterov momentum, a chunk restored from the store gets a velocity: the step
    its blocks' drift gives (the store keeps no velocity). The real fit's losses after a
    SIGKILL are those of the simulation that seeds it, not of one that restarts it
    from zero -- and seeded, its losses are lower here."""
    from dask_scar.models import Model

    case = Case("tiny-nesterov", "", TINY.frame, lambda: scar.SoftmaxRegression(l2=1e-3, learning_rate=0.5,
                                                                                 momentum=0.7),
                "label", max_iter=150, tol=3e-4, every=10)
    failure, victims = 35, tuple(range(REAL_WORKERS))     # every worker: every chunk from the store
    frame = case.frame(True)
    (strategy,) = [s for s in case.strategies() if s.name == "partial"]
    model = case.model()
    sim = Simulation(model, blocks_of(model, frame, "label", REAL_WORKERS), 2 * REAL_WORKERS, 8)
    free, _, snapshots, _ = sim.failure_free(failure, [strategy], {failure})
    after = 12

    def simulated() -> list[float]:
        return sim.trial(snapshots[failure], strategy, victims, free, lambda losses: len(losses) >= failure + after
                         ).losses[failure:]

    seeded = simulated()
    with monkeypatch.context() as m:
        m.setattr(type(model), "restore_slots", Model.restore_slots)       # the velocity restarts from zero
        from_zero = simulated()
    assert seeded != pytest.approx(from_zero, rel=1e-3)
    np.testing.assert_allclose(every_worker_killed(tmp_path, case, frame, strategy, failure, after, free), seeded,
                               rtol=1e-4)
    assert all(a < b for a, b in zip(seeded[1:], from_zero[1:]))


@pytest.mark.slow
def test_a_real_restore_takes_blocks_whose_drift_turned_as_saved_as_the_simulation_does(tmp_path):
    """Least squares with momentum overshoots: some blocks swing back, and extrapolating
    them along their last drift puts them farther off. Their owners say so with their
    priorities, and a restore from the store takes those blocks as saved: the real
    fit's losses after a SIGKILL of every worker are the simulation's that does so, and
    lower than those of one that extrapolates every block."""
    from dataclasses import replace

    from dask_scar.datasets import synthetic_regression

    case = Case("tiny-swing", "", lambda quick: synthetic_regression(4000, 20, seed=0),
                lambda: scar.LinearRegression(l2=1e-3, learning_rate=0.05, momentum=0.9), "y", max_iter=150,
                tol=1e-5, every=10)
    failure, victims, after = 20, tuple(range(REAL_WORKERS)), 12
    frame = case.frame(True)
    (strategy,) = [s for s in case.strategies() if s.name == "scar"]
    every_block = replace(strategy, name="every-block", hold_turned=False)
    model = case.model()
    sim = Simulation(model, blocks_of(model, frame, "y", REAL_WORKERS), 2 * REAL_WORKERS, 8)
    free, _, snapshots, _ = sim.failure_free(failure, [strategy, every_block], {failure})
    assert sum(int(turned.sum()) for turned in snapshots[failure].stores["scar"].turned.values()) > 0
    held, extrapolated = (sim.trial(snapshots[failure], s, victims, free, lambda losses: len(losses) >= failure + after
                                    ).losses[failure:] for s in (strategy, every_block))
    assert held[0] < 0.7 * extrapolated[0]
    np.testing.assert_allclose(every_worker_killed(tmp_path, case, frame, strategy, failure, after, free), held,
                               rtol=1e-4)


@pytest.mark.slow
def test_bench_cluster_keeps_the_nanny_of_a_worker_killed_twice():
    """A LocalCluster closes a worker's nanny when, 15 s (lost-worker-timeout) after a
    loss, it lists no worker of that name. A bench or demo run takes about that long:
    killing the same nanny's worker again just before the timer fired lost the nanny's
    next replacement too, and with it a second worker in the middle of a run."""
    with BenchCluster(1) as cluster:
        client = cluster.ready()
        first = next(iter(live_workers(client)))
        killed_at = time.monotonic()
        cluster.kill([first])
        client = cluster.ready()                    # the nanny's replacement
        restart = time.monotonic() - killed_at
        second = next(iter(live_workers(client)))
        # kill it again so that its own replacement joins about when the first loss's timer fires
        time.sleep(max(0.0, killed_at + 15 - restart / 2 - time.monotonic()))
        cluster.kill([second])
        wait_for(lambda: live_workers(client) - {first, second}, timeout=40,
                 what="the nanny to replace the worker killed the second time")
        time.sleep(2)       # past the timer: the replacement is still there
        assert len(live_workers(client) - {first, second}) == 1
