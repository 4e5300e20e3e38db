"""What a segment's messages cost as the model grows, side by side in one run.

Inside a segment every worker sends its contribution (an array the size of the
model) to every other worker, every iteration (see ``dask_scar.segment``).

1. *codec*, in this process: one such message through Dask's protocol and back
   (encoded, copied into fresh buffers as a connection's read leaves it, decoded,
   unpickled), two ways. *in-band*: pickled into one bytes value inside the msgpack
   message (how segments sent before). *frames*: pickled with its arrays as frames
   of their own (``dask_scar.segment._pickled``, how they send now).
2. *cluster*: softmax regression on a 2-worker LocalCluster (one thread each), with
   few rows, so that the messages weigh: the segments' time per iteration against
   one worker's rows alone in this process on one BLAS thread (*alone*: its kernel
   and the update of every parameter, without messages or Dask), and against both
   workers' rows at once, a process each, no Dask, waiting for each other after
   every iteration (*in parallel*, as in ``bench_iteration.py``: what the two
   processes cost each other on shared cores and cache). Each size runs
   ``--windows`` times, the three in turn.

    python benchmarks/bench_messages.py
"""

from __future__ import annotations

import argparse
import functools
import timeit

import numpy as np
from bench_iteration import dask_seconds, local_seconds, make_frame, on_cluster, parallel_seconds
from distributed import Client, LocalCluster
from distributed.protocol import pickle
from distributed.protocol.core import dumps, loads

from dask_scar import segment
from dask_scar.models import Contribution

# (features, classes, rows): messages of 4 KB, 0.4 MB, 4 MB and 8 MB
SIZES = [(100, 10, 20_000), (1_000, 100, 2_000), (2_000, 500, 512), (4_000, 500, 512)]


def codec_seconds(features: int, classes: int) -> tuple[float, float]:
    """Seconds of one message's round trip through Dask's protocol: in-band, frames."""
    grad = np.ones((features + 1, classes), np.float32)
    message = {"parts": {0: Contribution({"weights": grad}, count=1, loss=1.0)}, "priorities": None}

    def through(value):
        return loads([bytearray(f) for f in dumps({"op": "push", "reply": False, "value": value})])["value"]

    def in_band():
        return pickle.loads(through(pickle.dumps(message)))

    def frames():
        return segment._unpickled(through(segment._pickled(message)))

    np.testing.assert_array_equal(in_band()["parts"][0].parts["weights"], frames()["parts"][0].parts["weights"])
    number = max(1, int(2e6 // grad.nbytes))
    return tuple(min(timeit.repeat(f, number=number, repeat=5)) / number for f in (in_band, frames))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    rows_out = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for features, classes, rows in SIZES:
            make = functools.partial(make_frame, features=features, classes=classes)
            frame = make(rows)
            # the model's classes are the largest label + 1: so few rows must hold the last
            assert frame["label"].max() == classes - 1, "no row of the last class: change the seed or the rows"
            ddf = on_cluster(frame)
            in_band, frames = codec_seconds(features, classes)
            alone, parallel, segments = [], [], []
            for _ in range(args.windows):
                alone.append(local_seconds(frame.iloc[: rows // 2], args.iters, "numpy", blas_threads=1))
                parallel.append(parallel_seconds(rows, 2, args.iters, make))
                segments.append(dask_seconds(client, ddf, args.iters, "numpy"))
            rows_out.append((features, classes, rows, in_band, frames, alone, parallel, segments))
            client.cancel(ddf)
    print("\nsoftmax regression, float32, 2 workers x 1 thread; a message: one worker's contribution, "
          "(features + 1) x classes")
    print("(codec: one message through Dask's protocol and back, in this process; alone: one worker's rows "
          "in this process, one BLAS thread, no messages; in parallel: both workers' rows at once, a process "
          "each, no Dask; ms per iteration: the fastest window; ratios: the lowest and highest of the "
          "windows', each to the alone timing of its window)")
    print(f"{'features':>8} {'classes':>7} {'rows':>6} {'message':>9} {'in-band us':>10} {'frames us':>9} "
          f"{'ratio':>6} {'alone ms':>8} {'parallel ms':>11} {'/ alone':>9} {'segments ms':>11} {'/ alone':>9}")
    for features, classes, rows, in_band, frames, alone, parallel, segments in rows_out:
        cells = "".join(f" {min(t) * 1e3:>11.1f} {min(r):>4.2f}-{max(r):.2f}"
                        for t, r in ((t, [x / a for x, a in zip(t, alone)]) for t in (parallel, segments)))
        print(f"{features:>8,} {classes:>7} {rows:>6,} {(features + 1) * classes * 4 / 1e6:>7.3f}MB "
              f"{in_band * 1e6:>10.0f} {frames * 1e6:>9.0f} {frames / in_band:>6.2f} {min(alone) * 1e3:>8.1f}"
              + cells)


if __name__ == "__main__":
    main()
