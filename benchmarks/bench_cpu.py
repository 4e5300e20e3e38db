"""Where the CPU of one training iteration goes: the driver's process and each worker's.

The softmax regression of ``bench_iteration.py`` on a 2-worker LocalCluster (one
thread each, the workers' profiler off). In a LocalCluster the driver's process also
runs the scheduler and the nannies, so its CPU is everything Dask does outside the
workers; on a machine with as many cores as workers it competes with them.

Each figure is the difference between a fit of 60 iterations and one of 10, divided
by 50: the preparation of the data and the start and end of a fit cancel out. The
pairs run twice for every ``--chunks`` value (parameter chunks: each is one key
registered, reported and released per segment, or per iteration with
``--segment-iterations 1``). For scale, the same kernel on one
worker's rows in this process alone, on one thread: what a worker would spend if Dask
cost nothing.

With ``--store``, every fit runs twice more with a checkpoint store and the default
policy (``PrioritizedCheckpoint(0.25, every=5)``), and the columns are side by side:
what checkpointing costs, per process and thread.

    python benchmarks/bench_cpu.py                        # 1,000,000 rows, 4 chunks
    python benchmarks/bench_cpu.py --rows 200000 --chunks 2 4 16
    python benchmarks/bench_cpu.py --rows 200000 --store
    python benchmarks/bench_cpu.py --segment-iterations 1     # one task graph per iteration
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import dask
import psutil
from bench_iteration import local_seconds, make_frame, on_cluster
from distributed import Client, LocalCluster

import dask_scar as scar

SHORT, LONG = 10, 60


def thread_names() -> dict[int, str]:
    """Run in any process: its Python threads' names by native id."""
    return {t.native_id: t.name for t in threading.enumerate()}


def cpu_seconds(processes: dict[str, psutil.Process], names: dict[str, dict[int, str]]) -> dict[str, float]:
    """User + system CPU of each process, and of each of its threads (named where
    ``names`` knows them; threads of C libraries, such as BLAS's, by number)."""
    out = {}
    for name, process in processes.items():
        out[name] = sum(process.cpu_times()[:2])
        for t in process.threads():
            label = names.get(name, {}).get(t.id, f"thread {t.id}")
            label = "".join(c for c in label if not c.isdigit()).strip("-_ ") or "other"   # pools number them
            key = f"    {name.split()[0]} {label}"
            out[key] = out.get(key, 0.0) + t.user_time + t.system_time
    return out


def fit(client: Client, ddf, n_chunks: int, iters: int, processes, names,
        store: bool = False) -> tuple[float, dict[str, float]]:
    workdir = tempfile.mkdtemp(prefix="scar-bench-cpu-") if store else None
    kwargs = {"store": os.path.join(workdir, "ckpt.zarr")} if store else {}
    try:
        before, start = cpu_seconds(processes, names), time.perf_counter()
        scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.5), n_chunks=n_chunks, **kwargs).fit(
            ddf, target="label", max_iter=iters, tol=0, progress=False)
        wall, after = time.perf_counter() - start, cpu_seconds(processes, names)
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return wall, {k: after[k] - before.get(k, 0.0) for k in after}


def per_iteration(client, ddf, n_chunks, processes, names, store=False) -> tuple[float, dict[str, float]]:
    """Wall and CPU ms per iteration: a LONG fit minus a SHORT one."""
    (short_wall, short), (long_wall, long) = (fit(client, ddf, n_chunks, n, processes, names, store)
                                              for n in (SHORT, LONG))
    return ((long_wall - short_wall) / (LONG - SHORT) * 1000,
            {k: (long[k] - short.get(k, 0.0)) / (LONG - SHORT) * 1000 for k in long})


def line(label: str, ms: list[float]) -> str:
    """A row of the table: one figure per run, and the difference where there are two."""
    return f"  {label:40s} " + " ".join(f"{v:6.1f}" for v in ms) + (f" {ms[1] - ms[0]:+6.1f}" if len(ms) == 2 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4], help="parameter chunks (Trainer n_chunks)")
    parser.add_argument("--store", action="store_true", help="also with a checkpoint store, side by side")
    parser.add_argument("--segment-iterations", type=int, default=None,
                        help="scar.segment-iterations (default: the library's; 1: one task graph per iteration)")
    args = parser.parse_args()

    segments = {} if args.segment_iterations is None else {"scar.segment-iterations": args.segment_iterations}
    with dask.config.set({"distributed.worker.profile.enabled": False, **segments}), \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        frame = make_frame(args.rows)
        ddf = on_cluster(frame)
        processes = {"driver (client, scheduler, nannies)": psutil.Process()}
        workers = sorted(client.run(os.getpid).items())
        for i, (_, pid) in enumerate(workers):
            processes[f"worker{i}"] = psutil.Process(pid)
        fit(client, ddf, args.chunks[0], 5, processes, {})     # warm-up: the workers start their threads
        names = {"driver (client, scheduler, nannies)": thread_names(),
                 **{f"worker{i}": client.run(thread_names, workers=[address])[address]
                    for i, (address, _) in enumerate(workers)}}
        print(f"softmax regression, {args.rows:,} rows x 100 features x 10 classes, 2 workers x 1 thread, "
              f"{psutil.cpu_count()} cores; ms per iteration ({LONG}-iteration fit minus {SHORT}-iteration fit)")
        alone = local_seconds(frame.iloc[: args.rows // 2], 15, "numpy", blas_threads=1)
        print(f"one worker's rows in this process alone, one thread (no Dask): {alone * 1000:.1f} ms")
        for n_chunks in args.chunks:
            for _ in range(2):
                runs = [per_iteration(client, ddf, n_chunks, processes, names)]
                if args.store:
                    runs.append(per_iteration(client, ddf, n_chunks, processes, names, store=True))
                total = [sum(v for k, v in per.items() if not k.startswith(" ")) for _, per in runs]
                print(f"\n{n_chunks} chunks" + ("   (no store | with checkpoints | difference)" if args.store else ""))
                print(line("wall", [wall for wall, _ in runs]))
                print(line("CPU", total))
                for name in dict.fromkeys(k for _, per in runs for k in per):
                    ms = [per.get(name, 0.0) for _, per in runs]
                    if max(ms) >= 0.5:
                        print(line(name, ms))


if __name__ == "__main__":
    main()
