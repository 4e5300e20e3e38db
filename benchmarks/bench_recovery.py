"""How fast training comes back after a worker is SIGKILLed.

A softmax regression whose weights are ~100 MB of float32 (``--mb``) trains on a
4-worker LocalCluster (one thread each, loopback) with a full checkpoint every 2
iterations. After iteration 4 (once round 2 is in the store) the worker holding a
quarter of the chunks is killed; the chunks that die have no copy elsewhere.
Measured, side by side in one run, partial recovery (SCAR: read the lost quarter)
and full recovery (the traditional rollback: read everything):

* detection: SIGKILL -> the scheduler's ``scar`` event at a second client;
* kill -> resumed: SIGKILL -> the restored chunks are in place and the next
  iteration is submitted (includes detection);
* the bytes each recovery read from the store.

    python benchmarks/bench_recovery.py              # about 2 minutes on 2 cores
    python benchmarks/bench_recovery.py --mb 20 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar.recovery import live_workers


def wide_frame(features: int, classes: int, rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.standard_normal((rows, features), dtype=np.float32),
                         columns=[f"x{i}" for i in range(features)])
    labels = rng.integers(0, classes, rows)
    labels[0] = classes - 1             # the number of classes is the largest label + 1
    frame["label"] = labels
    return frame


class Listener:
    """A second client that records when the scheduler's ``scar`` events arrive."""

    def __init__(self, address: str):
        self.client = Client(address)
        self.removed: dict[str, float] = {}
        self.client.subscribe_topic("scar", self._on_event)

    def _on_event(self, event) -> None:
        if event[1]["action"] == "remove-worker":
            self.removed.setdefault(event[1]["worker"], time.time())

    def close(self) -> None:
        self.client.close()


def one_kill(client: Client, listener: Listener, frame: pd.DataFrame, store: Path, mode: str,
             n_chunks: int) -> dict:
    victim = sorted(live_workers(client))[1]
    pid = client.run(os.getpid, workers=[victim])[victim]
    killed = {}

    def kill(iteration, loss):
        if iteration == 4 and not killed:
            # round 2 (written in the background during iteration 3) is in the store
            deadline = time.monotonic() + 300
            while (scar.open_store(store).saved_at["iteration"] < 2).any() and time.monotonic() < deadline:
                time.sleep(0.05)
            killed["at"] = time.time()
            os.kill(pid, signal.SIGKILL)

    model = scar.SoftmaxRegression(learning_rate=0.1)
    result = scar.Trainer(client, model, store=store, policy=scar.FullCheckpoint(every=2), recovery=mode,
                          n_chunks=n_chunks).fit(frame, target="label", max_iter=6, tol=0, progress=False,
                                                 callback=kill)
    (event,) = result.events
    model_bytes = sum(v.nbytes for v in result.params.values())
    return {"recovery": mode, "model_MB": model_bytes / 1e6,
            "lost_MB": len(event.lost_chunks) / n_chunks * model_bytes / 1e6 if mode == "partial" else np.nan,
            "read_MB": event.bytes_read / 1e6,
            "detect_ms": 1e3 * (listener.removed[victim] - killed["at"]),
            "kill_to_resumed_s": event.noticed_at + event.seconds - killed["at"],
            "restore_s": event.seconds,
            "iteration_s": float(result.history["seconds"].iloc[1:3].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="model size in MB (float32 weights)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    side = int(np.sqrt(args.mb * 1e6 / 4))          # features x classes weights
    frame = wide_frame(side, side, rows=max(64, side // 40))
    workdir = Path(tempfile.mkdtemp(prefix="scar-bench-"))
    rows = []
    try:
        with dask.config.set({"scar.recovery.replicas": False}), \
                LocalCluster(n_workers=4, threads_per_worker=1, dashboard_address=":0",
                             silence_logs=50) as cluster, Client(cluster) as client:
            listener = Listener(cluster.scheduler_address)
            for r in range(args.repeats):
                for mode in ("partial", "full"):
                    client.wait_for_workers(4, timeout=120)     # the nanny replaced the last victim
                    store = workdir / f"{mode}-{r}.zarr"
                    rows.append(one_kill(client, listener, frame, store, mode, n_chunks=8))
                    shutil.rmtree(store)
                    print(rows[-1], flush=True)
            listener.close()
        table = pd.DataFrame(rows)
        print()
        print(f"{side} features x {side} classes, {len(frame)} rows, 4 workers; medians of {args.repeats}:")
        print(table.groupby("recovery", sort=False).median().to_string(float_format="{:.3g}".format))
        partial, full = (table[table["recovery"] == m]["kill_to_resumed_s"].median() for m in ("partial", "full"))
        print(f"\nkill -> resumed, partial / full: {partial / full:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        threading.Event().wait(0.1)


if __name__ == "__main__":
    main()
