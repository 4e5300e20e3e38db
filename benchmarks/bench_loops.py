"""Where the event loops' time goes during a fit: every callback each loop runs, timed.

The softmax regression of ``bench_iteration.py`` on a 2-worker LocalCluster (one
thread each). After a warm-up fit, every process's asyncio loop times each callback
it runs (the thread CPU of ``asyncio.Handle._run``, grouped by the function it calls:
a periodic callback by its target, a coroutine by its name) for ``--seconds`` of a
long fit. Tornado runs a periodic callback in two steps, the second as a coroutine:
each call counts twice, its time is the two steps'. The driver's process holds the client, the scheduler and the nannies; each
worker's loop receives the segments' messages and runs Dask's own periodic work. On
a machine with as many cores as workers, every millisecond here is taken from the
training threads, which also wait for the GIL while their loop holds it.

    python benchmarks/bench_loops.py                        # 1,000,000 rows, Dask's settings
    python benchmarks/bench_loops.py --rows 20000 --quiet    # dask_scar.config.QUIET
"""

from __future__ import annotations

import argparse
import threading
import time

import dask
from bench_iteration import make_frame, on_cluster
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar.config import QUIET


def install() -> None:
    """Run in every process: time each callback of the asyncio loops (off until :func:`start`)."""
    import asyncio.events
    import collections

    handle = asyncio.events.Handle
    if hasattr(handle, "scar_timed"):
        return
    run, totals, on = handle._run, collections.defaultdict(lambda: [0, 0.0]), [False]

    def name(callback) -> str:
        while hasattr(callback, "func"):        # functools.partial
            callback = callback.func
        target = getattr(callback, "__self__", None)
        if type(target).__name__ == "PeriodicCallback":
            return name(target.callback)
        coro = getattr(target, "get_coro", lambda: None)()     # a task's step
        if coro is not None:
            frame = getattr(coro, "cr_frame", None)
            own = frame.f_locals.get("self") if frame is not None else None
            if type(own).__name__ == "PeriodicCallback":        # tornado runs them as coroutines
                return name(own.callback)
            return "coroutine " + getattr(coro, "__qualname__", type(coro).__name__)
        return getattr(callback, "__qualname__", None) or type(callback).__name__

    def timed(self):
        if not on[0]:
            return run(self)
        callback = self._callback
        if getattr(callback, "__name__", "") == "_run_callback" and self._args:    # tornado's wrapper
            callback = self._args[0]
        entry = totals[name(callback)]
        start = time.thread_time()
        try:
            return run(self)
        finally:
            entry[0] += 1
            entry[1] += time.thread_time() - start

    handle._run, handle.scar_timed = timed, (totals, on)


def start() -> None:
    import asyncio.events

    totals, on = asyncio.events.Handle.scar_timed
    totals.clear()
    on[0] = True


def stop() -> dict:
    import asyncio.events

    totals, on = asyncio.events.Handle.scar_timed
    on[0] = False
    return {k: tuple(v) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the loops are timed")
    parser.add_argument("--quiet", action="store_true", help="the cluster with dask_scar.config.QUIET")
    parser.add_argument("--top", type=int, default=12, help="callbacks shown per process")
    args = parser.parse_args()

    settings = QUIET if args.quiet else {}
    with dask.config.set(settings), \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        ddf = on_cluster(make_frame(args.rows))
        trainer = scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.5))
        client.run(install)
        install()
        began = time.perf_counter()
        warm = trainer.fit(ddf, target="label", max_iter=10, tol=0, progress=False)
        warm_up = time.perf_counter() - began       # the data's preparation and 10 iterations
        per_it = warm.history["seconds"].iloc[1:].mean()
        # a fit that outlasts its preparation and the timing
        iterations = int((warm_up + args.seconds + 2) / per_it) + 20
        result = {}
        long_fit = threading.Thread(target=lambda: result.update(fit=trainer.fit(
            ddf, target="label", max_iter=iterations, tol=0, progress=False)))
        long_fit.start()
        time.sleep(warm_up)
        cluster.loop.add_callback(start)
        client.run(start)
        began = time.perf_counter()
        time.sleep(args.seconds)
        workers = client.run(stop)
        seconds = time.perf_counter() - began
        box, done = {}, threading.Event()
        cluster.loop.add_callback(lambda: (box.update(driver=stop()), done.set()))
        done.wait()
        long_fit.join()
        history = result["fit"].history
        per_it = history["seconds"].iloc[1:].mean()
        print(f"softmax regression, {args.rows:,} rows, 2 workers x 1 thread, "
              f"{'dask_scar.config.QUIET' if args.quiet else 'Dask defaults'}; {per_it * 1000:.1f} ms per iteration; "
              f"each loop's callbacks timed for {seconds:.1f} s (thread CPU)")
        for who, totals in [("driver's process (client, scheduler, nannies)", box["driver"]),
                            *((f"worker {i}", t) for i, (_, t) in enumerate(sorted(workers.items())))]:
            cpu, calls = sum(t for _, t in totals.values()), sum(n for n, _ in totals.values())
            print(f"\n{who}: {cpu / seconds * 1000:.1f} ms/s, {cpu / seconds * per_it * 1000:.2f} ms per iteration, "
                  f"{calls / seconds:.0f} callbacks/s")
            for label, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.top]:
                print(f"  {t / seconds * 1000:7.2f} ms/s {n / seconds:7.1f}/s {t / n * 1e6:6.0f} us  {label}")


if __name__ == "__main__":
    main()
