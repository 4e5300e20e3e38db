"""How fast training runs after a worker is SIGKILLed and its nanny starts it again,
after a worker joins, or after the cluster shrinks.

Softmax regression, ``--rows`` x 100 features, on a 2-worker (``--workers``)
LocalCluster (one thread each, nannies). After ``--after`` seconds one worker is SIGKILLed: its
chunks are restored, Dask rebuilds its data block on the survivor, and the nanny
starts a new worker, which gets chunks and the block back (with code before that, the
survivor kept both blocks: run it with such a package on ``PYTHONPATH`` to compare).
With ``--join`` the cluster starts with one worker, and a second joins after
``--after`` seconds: it gets chunks, and half of the one block's rows (with code
before that, chunks only). With ``--shrink`` the cluster starts with three workers
and is scaled down to two after ``--after`` seconds: Dask rebuilds the removed worker's
block on one survivor (``LocalCluster.scale`` closes the worker rather than retiring
it), and the rows are spread over both again (with code before that, one survivor
computed two thirds of them). With ``--hang`` the worker is SIGSTOPped instead of
killed: it sends no heartbeat, and after ``scar.recovery.hung-worker`` (set to 5 s
here, ten heartbeats) its nanny kills it and starts a new one (with code before that,
the fit waited for Dask's ``worker-ttl``, 5 to 10 minutes).
Printed, from one fit's history: ms per iteration before the event, until the data
moved, and after, with their ratios to the first.

    python benchmarks/bench_replacement.py            # about a minute on 2 cores
    python benchmarks/bench_replacement.py --join
    python benchmarks/bench_replacement.py --shrink
    python benchmarks/bench_replacement.py --hang
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

import dask
from bench_iteration import on_cluster
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar import config, datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--iters", type=int, default=700)
    parser.add_argument("--after", type=float, default=4.0, help="seconds into the fit")
    parser.add_argument("--workers", type=int, default=2,
                        help="workers of the kill (the survivors share the lost block, then the replacement "
                             "takes its share back from them)")
    event = parser.add_mutually_exclusive_group()
    event.add_argument("--join", action="store_true", help="start with one worker; a second joins")
    event.add_argument("--shrink", action="store_true", help="start with three workers; scale down to two")
    event.add_argument("--hang", action="store_true", help="SIGSTOP the worker instead of SIGKILLing it")
    args = parser.parse_args()
    with dask.config.set({**config.own_cluster(), **({"scar.recovery.hung-worker": "5s"} if args.hang else {})}), \
            LocalCluster(n_workers=1 if args.join else 3 if args.shrink else args.workers, threads_per_worker=1,
                         dashboard_address=":0", silence_logs=50) as cluster, \
            Client(cluster) as client:
        frame = on_cluster(datasets.synthetic_classification(args.rows, 100, 10))
        if args.join or args.shrink:
            event = threading.Timer(args.after, cluster.scale, (2,))
        else:
            pids, stopped = client.run(os.getpid), []

            def stop():
                stopped.append(time.time())
                os.kill(pids[sorted(pids)[1]], signal.SIGSTOP if args.hang else signal.SIGKILL)
            event = threading.Timer(args.after, stop)
        event.start()
        history = scar.Trainer(client, scar.SoftmaxRegression()).fit(
            frame, target="label", max_iter=args.iters, tol=0, progress=False).history
        event.cancel()
        removed = [e["time"] for _, e in client.get_events("scar") if e.get("action") == "remove-worker"]
    # (rows that move before the first iteration: the partitions as Dask placed them)
    events = history[(history["event"] != "") & (history["iteration"] > 1)]
    if events.empty:
        raise SystemExit(f"the fit ended before the event at {args.after} s: raise --iters")
    noticed = int(events["iteration"].iloc[0])
    # a joining worker shows in the history only once it is running: "before" ends when
    # it was asked for (the fit's first second or so read the data)
    before = int((history["seconds"].cumsum() < args.after - 1).sum()) if args.join else noticed - 1
    if args.hang:       # an interrupted segment's time is on its first row: the hang's wait is there
        before = min(before, int(history.loc[history["seconds"].idxmax(), "iteration"]) - 1)
    if before < 21:
        raise SystemExit(f"fewer than 20 iterations came before the event (the data took long to read): "
                         f"raise --after (now {args.after} s)")
    moved = [int(i) for i, e in zip(events["iteration"], events["event"]) if "data rows" in e]

    def ms(first: int, last: int) -> tuple[float, int]:
        seconds = history[(history["iteration"] >= first) & (history["iteration"] <= last)]["seconds"]
        return 1e3 * float(seconds.mean()), len(seconds)

    # 20 iterations' margin after each change: a segment's rows share its time
    phases = [("before the " + ("join" if args.join else "scale-down" if args.shrink else "hang" if args.hang
                                else "kill"), ms(20, before)),
              ("until the data moved", ms(noticed + 20, (moved or [args.iters + 1])[0] - 1))]
    for n, (start, end) in enumerate(zip(moved, [*moved[1:], args.iters + 1])):
        phases.append((f"after the data moved{f' ({n + 1})' if len(moved) > 1 else ''}", ms(start + 20, end - 1)))
    base = phases[0][1][0]
    for what, (value, n) in phases:
        if n:
            print(f"{what:32s} {value:7.1f} ms/it  ({n} iterations)  ratio {value / base:.2f}")
    if args.hang and removed:
        print(f"the hung worker was removed {removed[0] - stopped[0]:.1f} s after its SIGSTOP")
    said = history[history["event"] != ""]
    for iteration, event in zip(said["iteration"], said["event"]):
        print(f"  iteration {iteration}: {event}")


if __name__ == "__main__":
    main()
