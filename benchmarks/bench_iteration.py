"""Per-iteration time of the Dask trainer against the same maths in one NumPy process.

Side by side in one run on one machine (absolute times on shared CPUs mean little;
the ratio is the figure): softmax regression, float32, N rows x 100 features x 10
classes, a 2-worker LocalCluster (one thread each) against a single-process loop
(NumPy with its default BLAS threads) running ``dask_scar.local.fit_local``. The
cluster runs four ways: with Dask's defaults (segments: one task per worker for
many iterations, see ``dask_scar.segment``), with the workers' statistical profiler
off (``distributed.worker.profile.enabled: false``; by default it samples every
thread of every worker every 10 ms, on the cores the training needs; a segment pauses
it while it runs, so this differs from the defaults between segments only), with the
profiler off and one task graph per iteration (``scar.segment-iterations: 1``), and
*quiet*: the profiler off and the periodic work of every Dask process slowed
down (:data:`dask_scar.config.QUIET`: the event loops' tick 1 s instead of 20 ms, the
system monitor 5 s instead of 0.5 s, the memory monitors 1 s instead of 0.1 s), the
settings the README suggests for CPU clusters and ``dask-scar train`` uses for its own.
Dask's time per iteration is the mean over the fit's iterations after the first, the
segments' boundaries included. Each cluster runs
in ``--windows`` windows (2), in turn, per row count, and each time the single process
is timed again just before it, while no cluster runs (an idle cluster's periodic work
slows it by ~5 %): a ratio divides by the single process of its own window (this
machine's speed drifts by a third within minutes), and the table gives the lowest,
highest and median of the windows' ratios (*no-overhead* and *in parallel* are timed in
every window, before the cluster).
Then the time to a fixed loss against scikit-learn's ``LogisticRegression`` (lbfgs):
the iterations' time, and fit()'s wall clock from its call (the data's preparation
included), against scikit-learn's ``fit`` on arrays already in memory.

Two columns say what the cluster would take if Dask cost nothing. *no-overhead*:
one worker's share of the rows, alone in this process on one BLAS thread (the
workers' setting). *in parallel*: every worker's share at once, each in a process
of its own on one BLAS thread, without Dask, all waiting for each other after every
iteration. The second is the floor of the ratio on this machine: on the 2-core CI
machine two such processes slow each other down by a third, Dask or not.

With ``--backend cupy`` both sides run on the GPU: the workers keep blocks and
chunks as CuPy arrays, and the baseline is the same loop on CuPy arrays in one
process (timed with a device synchronisation after every iteration).

    python benchmarks/bench_iteration.py                  # 1,000,000 and 200,000 rows
    python benchmarks/bench_iteration.py --rows 200000 --no-sklearn
    python benchmarks/bench_iteration.py --rows 1000000 --no-sklearn --windows 6
    python benchmarks/bench_iteration.py --backend cupy --workers 1 --rows 10000000 1000000 --no-sklearn
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import warnings

import dask
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

import dask.dataframe as dd

import dask_scar as scar
from dask_scar.backend import array_module, to_device
from dask_scar.config import QUIET
from dask_scar.local import fit_local, prepare_local

FEATURES, CLASSES = 100, 10


def make_frame(rows: int, seed: int = 0, features: int = FEATURES, classes: int = CLASSES) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)).astype(np.float32) * 0.3
    labels = rng.integers(0, classes, rows)
    X = rng.standard_normal((rows, features), dtype=np.float32)
    X += centres[labels]
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["label"] = labels
    return frame


def on_cluster(frame: pd.DataFrame):
    """``frame`` as a Dask DataFrame of 4 partitions, persisted on the cluster. The frame
    goes into the graph, so Dask warns of a large graph: silenced here, for this graph
    only (the trainer's graphs are what the warning is about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return dd.from_pandas(frame, npartitions=4).persist()


def local_seconds(frame: pd.DataFrame, iters: int, backend: str, blas_threads: int | None = None,
                  then=None) -> float:
    """Median seconds per iteration of ``fit_local`` (``blas_threads``: None, NumPy's
    default; ``then()``, if given, runs at the end of every iteration and is timed)."""
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits     # in the test extra

        with threadpool_limits(blas_threads):
            return local_seconds(frame, iters, backend, then=then)
    xp = array_module(backend)
    model = scar.SoftmaxRegression(learning_rate=0.5)
    block = {k: to_device(v, xp) for k, v in prepare_local(model, frame, "label").items()}
    sync = (lambda: None) if xp is np else xp.cuda.Device().synchronize
    stamps = [time.perf_counter()]

    def stamp(k):
        sync()
        if then is not None:
            then()
        stamps.append(time.perf_counter())

    fit_local(model, block, iters, xp=xp, callback=stamp)
    return float(np.median(np.diff(stamps)[2:]))


def _share_loop(rows: int, workers: int, index: int, iters: int, barrier, results, make) -> None:
    """In a process of its own: ``fit_local`` on share ``index`` of the rows of
    ``make(rows)``, one BLAS thread, waiting for the other shares after every
    iteration, as workers do."""
    share = -(-rows // workers)
    part = make(rows).iloc[index * share:(index + 1) * share]
    barrier.wait()
    results.put(local_seconds(part, iters, "numpy", blas_threads=1, then=barrier.wait))


def parallel_seconds(rows: int, workers: int, iters: int, make=make_frame) -> float:
    """Seconds per iteration of every worker's share computed at once, each in a
    process of its own with one BLAS thread and no Dask, all waiting for each other
    after every iteration: what a cluster of ``workers`` on this machine's cores
    would take if Dask cost nothing (two such processes on two cores slow each other
    down well beyond what one share alone takes)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    processes = [ctx.Process(target=_share_loop, args=(rows, workers, i, iters, barrier, results, make))
                 for i in range(workers)]
    for process in processes:
        process.start()
    times = [results.get() for _ in processes]
    for process in processes:
        process.join()
    return max(times)


def dask_seconds(client: Client, ddf, iters: int, backend: str, segment: int | None = None) -> float:
    """Mean seconds per iteration after the first (which creates the chunks): the
    rows' seconds add up to fit()'s time, the segments' boundaries included.
    ``segment``: ``scar.segment-iterations`` (None: the default)."""
    settings = {} if segment is None else {"scar.segment-iterations": segment}
    with dask.config.set(settings):
        result = scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.5), backend=backend).fit(
            ddf, target="label", max_iter=iters, tol=0, progress=False)
    return float(result.history["seconds"].iloc[1:].mean())


def time_to_loss(client: Client, frame: pd.DataFrame, ddf, max_iter: int) -> None:
    from sklearn.linear_model import LogisticRegression

    l2 = 1e-4
    X, y = frame.drop(columns="label").to_numpy(), frame["label"].to_numpy()
    start = time.perf_counter()
    sk = LogisticRegression(C=1 / (l2 * len(y)), max_iter=1000).fit(X, y)
    sk_seconds = time.perf_counter() - start
    p = sk.predict_proba(X)
    sk_loss = -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * l2 * (sk.coef_ ** 2).sum()
    target = sk_loss * 1.001
    print(f"\ntime to loss <= {target:.5f} (scikit-learn's optimum {sk_loss:.5f} + 0.1 %), {len(y):,} rows:")
    print(f"  scikit-learn lbfgs       {sk_seconds:7.2f} s  {int(sk.n_iter_[0]):4d} iterations (to its own tol)")
    for name, hyper in (("dask-scar GD", {}), ("dask-scar Nesterov 0.9", {"momentum": 0.9}),
                        ("dask-scar L-BFGS", {"solver": "lbfgs"})):
        start = time.perf_counter()
        result = scar.Trainer(client, scar.SoftmaxRegression(l2=l2, learning_rate=0.5, **hyper)).fit(
            ddf, target="label", max_iter=max_iter, tol=0, progress=False)
        wall = time.perf_counter() - start
        h = result.history
        hit = h.index[h["loss"] <= target]
        if len(hit):
            i = hit[0]
            # fit()'s wall clock up to that iteration: the data's preparation and the
            # chunks' creation included, and (conservatively) the fit's end too
            whole = wall - h["seconds"].iloc[i + 1:].sum()
            print(f"  {name:24s} {h['seconds'].iloc[:i + 1].sum():7.2f} s  {int(h['iteration'].iloc[i]):4d} iterations"
                  f"  ({whole:.2f} s from the call of fit())")
        else:
            print(f"  {name:24s}  not reached in {max_iter} iterations (loss {h['loss'].iloc[-1]:.5f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 200_000])
    parser.add_argument("--iters", type=int, default=41)
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="array library of both sides (cupy: workers and baseline on the GPU)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the cluster (one thread each)")
    parser.add_argument("--max-iter", type=int, default=400, help="iteration cap of the time-to-loss runs")
    parser.add_argument("--windows", type=int, default=2, help="windows per cluster (each cluster runs in turn)")
    args = parser.parse_args()

    frames = {rows: make_frame(rows) for rows in args.rows}
    # per row count: (seconds, ratio) of each column in each window; a ratio divides by the
    # single process timed in the same window, so that a quiet or busy spell of the machine
    # hits both sides
    results = {rows: {} for rows in args.rows}
    single_s = {rows: [] for rows in args.rows}

    def note(rows: int, column: str, seconds: float, single: float) -> None:
        results[rows].setdefault(column, []).append((seconds, seconds / single))

    clusters = [({"distributed.worker.profile.enabled": True}, ["defaults"]),
                ({"distributed.worker.profile.enabled": False}, ["profiler off", "graphs"]),
                (QUIET, ["quiet"])]
    for window, (settings, runs) in enumerate(clusters * args.windows):    # each cluster in turn
        for rows, frame in frames.items():
            # the process-only columns first, while no cluster runs: an idle cluster's
            # periodic work slows the single process down by ~5 %
            single = local_seconds(frame, args.iters, args.backend)
            single_s[rows].append(single)
            note(rows, "no-overhead", local_seconds(frame.iloc[: -(-rows // args.workers)], args.iters,
                                                    args.backend, blas_threads=1), single)
            if args.backend == "numpy":
                note(rows, "in parallel", parallel_seconds(rows, args.workers, args.iters), single)
            with dask.config.set(settings), \
                    LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster, \
                    Client(cluster) as client:
                ddf = on_cluster(frame)
                for run in runs:
                    note(rows, run, dask_seconds(client, ddf, args.iters, args.backend,
                                                 1 if run == "graphs" else None), single)
                if "profiler off" in runs and window < len(clusters) and rows == min(args.rows) \
                        and not args.no_sklearn and args.backend == "numpy":
                    time_to_loss(client, frame, ddf, args.max_iter)
    print(f"\nsoftmax regression, {FEATURES} features x {CLASSES} classes, float32; {args.workers} workers x 1 "
          f"thread vs one process, backend {args.backend} (ratio: Dask / one process, time per iteration)")
    print("(defaults: Dask's settings, segments of scar.segment-iterations iterations; graphs: one task graph "
          "per iteration, scar.segment-iterations=1, profiler off; quiet: dask_scar.config.QUIET)")
    print("(no-overhead: one worker's rows alone in one process; in parallel: every worker's rows at once, "
          "a process each, no Dask)")
    columns = ["defaults", "profiler off", "graphs", "quiet", "no-overhead", "in parallel"]
    print(f"(each cluster in {args.windows} windows, in turn; ms: the fastest window; ratios: the lowest and "
          "highest of the windows', each to the single process timed in its window, and their median)")
    print(f"{'rows':>10} {'single ms/it':>12}" + "".join(f" {c:>12} {'ratios':>17}" for c in columns))
    for rows in args.rows:
        cells = [results[rows].get(c, [(np.nan, np.nan)]) for c in columns]
        print(f"{rows:>10,} {min(single_s[rows]) * 1000:12.1f}" + "".join(
            f" {min(s for s, _ in cell) * 1000:12.1f} {min(r for _, r in cell):5.2f}-{max(r for _, r in cell):4.2f}"
            f" ({np.median([r for _, r in cell]):4.2f})" for cell in cells))


if __name__ == "__main__":
    main()
