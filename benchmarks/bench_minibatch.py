"""Minibatch SGD with updates replicated (segments) against kept on each chunk's owner
(one task graph per iteration), side by side on one cluster.

Softmax regression on a 2-worker LocalCluster (one thread each), ``batch_size=100``
(50 rows of each worker's block an iteration), for models of a few hundred bytes to
16 MB of weights. A model of at most ``REPLICA_ANY_BYTES`` (8 MB) replicates its
updates whatever its blocks' rows, and so runs in segments; the benchmark sets it (on
the driver, which decides) to infinity for one way and to 0 for the other, to show
both on either side of the bound. Runs alternate, twice each.
Printed: ms per iteration (the fit's mean after its first five), each way, and their
ratio.

    python benchmarks/bench_minibatch.py          # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse

import dask
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar import config, datasets

#: rows, features, classes, iterations
CASES = [(20_000, 20, 4, 400), (20_000, 1000, 100, 150), (20_000, 4000, 500, 30), (20_000, 8000, 500, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    default, replicated = scar.SoftmaxRegression.REPLICA_ANY_BYTES, float("inf")
    with dask.config.set(config.own_cluster()), LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                                                           silence_logs=50) as cluster, Client(cluster) as client:
        print(f"{'weights':>9} {'rows x features x classes':>26} {'replicated ms/it':>18} {'on owners ms/it':>17} "
              f"{'ratio':>7}")
        for rows, features, classes, iters in CASES:
            frame = datasets.synthetic_classification(rows, features, classes)
            times: dict[float, list[float]] = {replicated: [], 0: []}
            for bound in (replicated, 0, replicated, 0):
                scar.SoftmaxRegression.REPLICA_ANY_BYTES = bound
                history = scar.Trainer(client, scar.SoftmaxRegression(batch_size=args.batch_size)).fit(
                    frame, target="label", max_iter=iters, tol=0, progress=False).history
                times[bound].append(1e3 * history["seconds"].iloc[5:].mean())
            scar.SoftmaxRegression.REPLICA_ANY_BYTES = default
            fast, slow = times[replicated], times[0]
            print(f"{(features + 1) * classes * 4 / 2**20:7.2f}MB {f'{rows:,} x {features} x {classes}':>26} "
                  f"{' / '.join(f'{t:.1f}' for t in fast):>18} {' / '.join(f'{t:.1f}' for t in slow):>17} "
                  f"{min(fast) / min(slow):7.2f}", flush=True)


if __name__ == "__main__":
    main()
