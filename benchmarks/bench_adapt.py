"""What Dask's adaptive scaling gives a fit: ``cluster.adapt(minimum=1, maximum=2)``
on a cluster that starts with one worker, against one worker and two workers fixed.

Softmax regression, ``--rows`` x 100 features, 10 classes, ``--iters`` iterations,
LocalClusters of one-thread workers (nannies), each fit on a fresh cluster with the
data persisted on its workers first, in rounds whose order alternates. Printed: each
setup's median time for the whole fit, its ratio to one worker, and where the adaptive
cluster's second worker took its rows (the fit's iteration, and seconds into it). With
code before the fits told the scheduler their work, adapt never added the worker (run it
with such a package on ``PYTHONPATH`` to compare).

    python benchmarks/bench_adapt.py            # about two minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time

import dask
import numpy as np
import pandas as pd
from bench_iteration import on_cluster
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar import config, datasets

SETUPS = ("1 worker", "adapt(1, 2)", "2 workers")


def fit_once(setup: str, frame: pd.DataFrame, iters: int) -> dict:
    with dask.config.set(config.own_cluster()), \
            LocalCluster(n_workers=2 if setup == "2 workers" else 1, threads_per_worker=1,
                         dashboard_address=":0", silence_logs=50) as cluster, \
            Client(cluster) as client:
        data = on_cluster(frame)
        if setup.startswith("adapt"):
            cluster.adapt(minimum=1, maximum=2)
        started = time.perf_counter()
        history = scar.Trainer(client, scar.SoftmaxRegression()).fit(
            data, target="label", max_iter=iters, tol=0, progress=False).history
        seconds = time.perf_counter() - started
    moved = history[history["event"].str.contains("data rows onto")]
    at = int(moved["iteration"].iloc[0]) if len(moved) else None
    return {"setup": setup, "seconds": seconds, "moved_at_iteration": at,
            "moved_after_s": float(history["seconds"].iloc[:at - 1].sum()) if at else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--iters", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    frame = datasets.synthetic_classification(args.rows, 100, 10)
    runs = []
    for r in range(args.rounds):
        for setup in (SETUPS if r % 2 == 0 else SETUPS[::-1]):
            runs.append(fit_once(setup, frame, args.iters))
            print(runs[-1], flush=True)
    table = pd.DataFrame(runs)
    summary = table.groupby("setup", sort=False)["seconds"].agg(["median", "min", "max"]).loc[list(SETUPS)]
    summary["ratio_to_1_worker"] = summary["median"] / summary.loc["1 worker", "median"]
    print(f"\nsoftmax, {args.rows:,} rows x 100 features, {args.iters} iterations, {args.rounds} rounds: "
          "seconds for the whole fit")
    print(summary.round(2).to_string())
    adaptive = table[table["setup"].str.startswith("adapt")]
    print("adapt's second worker took its rows at iteration(s)", list(adaptive["moved_at_iteration"]),
          "seconds into the fit", [None if np.isnan(s) else round(s, 1) for s in adaptive["moved_after_s"]])


if __name__ == "__main__":
    main()
