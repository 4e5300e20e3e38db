"""What checkpointing costs training, and how fast the store is.

Side by side in one run on one cluster (2 workers, one thread each): the mean
iteration time without a store and with the default policy
(``PrioritizedCheckpoint(0.25, every=5)``, the I/O of a full checkpoint every 20
iterations), after a warm-up fit, in pairs of alternating order so that the
machine's noise hits both alike: ``overhead_%`` compares the medians of the two
sides, ``paired_overhead_%`` is the median of each pair's own ratio (on a shared
machine whose speed drifts between pairs, the steadier of the two). Two models: softmax regression (200,000 x 100, parameters 4 KB: the
fixed cost of a round) and ALS matrix factorization (parameters ~9 MB: the bytes;
100,000 ratings: the parameter bytes do not depend on them, the time to compute does).
Then the store's own write and read rates for a 64 MB parameter in 1 MB blocks.

    python benchmarks/bench_checkpoint.py            # ~11 minutes on 2 shared cores (ALS sets the pace)
    python benchmarks/bench_checkpoint.py --quick
    python benchmarks/bench_checkpoint.py --backend cupy --workers 1 --rows 1000000 --no-als   # a GPU
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_iteration import on_cluster
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar.bench._real import policy_bytes
from dask_scar.store import ZarrStore, make_layouts


def softmax_frame(rows: int, features: int = 100, classes: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    X = rng.standard_normal((rows, features), dtype=np.float32)
    X += rng.standard_normal((classes, features)).astype(np.float32)[labels] * 0.3
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["label"] = labels
    return frame


def ratings_frame(users: int, items: int, ratings: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, users, ratings), rng.integers(0, items, ratings)
    U, V = rng.standard_normal((users, 8)), rng.standard_normal((items, 8))
    return pd.DataFrame({"user": u, "item": i, "rating": ((U[u] * V[i]).sum(axis=1)).astype(np.float32)})


def mean_iteration(client, make_model, frame, target, iters, store, backend="numpy") -> tuple[float, int]:
    kwargs = {"store": store} if store else {}
    result = scar.Trainer(client, make_model(), backend=backend, **kwargs).fit(frame, target=target, max_iter=iters, tol=0,
                                                             progress=False)
    h = result.history.iloc[5:]          # after warm-up; the mean, since rounds touch 2 iterations in 5
    return float(h["seconds"].mean()), policy_bytes(result)


def overhead(client, name, make_model, frame, target, iters, repeats, workdir, backend="numpy") -> dict:
    data = on_cluster(frame)        # once: every fit below reads the same persisted partitions
    mean_iteration(client, make_model, data, target, max(10, iters // 4), None, backend)   # warm-up, not counted
    plain, ckpt, written = [], [], 0
    for r in range(repeats):
        store = workdir / f"{name}-{r}.zarr"
        # pairs in alternating order, so that a drift of the machine's speed hits both alike
        for checkpointed in ((False, True) if r % 2 == 0 else (True, False)):
            seconds, nbytes = mean_iteration(client, make_model, data, target, iters,
                                             store if checkpointed else None, backend)
            if checkpointed:
                ckpt.append(seconds)
                written = nbytes
                shutil.rmtree(store)
            else:
                plain.append(seconds)
    a, b = np.median(plain), np.median(ckpt)
    params = sum(int(np.prod(s.shape)) * 4 for s in make_model_setup(make_model, frame, target).values())
    return {"model": name, "parameter_MB": params / 1e6, "ms_per_it_plain": 1e3 * a,
            "ms_per_it_checkpointed": 1e3 * b, "overhead_%": 100 * (b / a - 1),
            # each pair's own ratio: what the machine's drift between pairs does not move
            "paired_overhead_%": 100 * (np.median(np.array(ckpt) / np.array(plain)) - 1),
            "pairs": repeats, "checkpoint_MB_per_it": written / iters / 1e6}


def make_model_setup(make_model, frame, target):
    from dask_scar.local import prepare_local

    model = make_model()
    prepare_local(model, frame, target)
    return model.parameter_specs()


def store_rates(workdir: Path, mb: int = 64) -> dict:
    rows, cols = mb * 2**20 // (4 * 256), 256
    layouts = make_layouts({"w": ((rows, cols), "float32")}, 8, 8)     # 64 blocks of 1 MB
    lay = layouts["w"]
    store = ZarrStore.create(workdir / "rates.zarr", {"class": "bench", "params": {}}, layouts, None)
    value = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    blocks = {b: value[slice(*lay.bounds(b))] for b in range(lay.n_blocks)}
    start = time.perf_counter()
    stored = store.write_blocks("w", blocks, 1, 0, 1)
    write = time.perf_counter() - start
    start = time.perf_counter()
    loaded = ZarrStore.open(workdir / "rates.zarr").load()["w"]
    read = time.perf_counter() - start
    assert np.array_equal(loaded, value)
    return {"MB": value.nbytes / 1e6, "blocks": lay.n_blocks, "stored_MB": stored / 1e6,
            "write_MB_per_s": value.nbytes / 1e6 / write, "read_MB_per_s": value.nbytes / 1e6 / read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations and repeats")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="where the workers keep the data and parameters (cupy: one GPU per worker)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the softmax case")
    parser.add_argument("--no-als", action="store_true", help="the softmax case only")
    args = parser.parse_args()
    iters, repeats = (40, 2) if args.quick else (100, 4)
    workdir = Path(tempfile.mkdtemp(prefix="scar-bench-"))
    try:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            cases = [overhead(client, f"softmax {args.rows:,} x 100", lambda: scar.SoftmaxRegression(learning_rate=0.5),
                              softmax_frame(args.rows), "label", iters, repeats, workdir, args.backend)]
            if not args.no_als:
                cases.append(overhead(client, "ALS 50k users x 20k items, rank 32",
                                      lambda: scar.MatrixFactorization(rank=32, l2=0.1),
                                      ratings_frame(50_000, 20_000, 100_000), None, iters // 2, repeats, workdir,
                                      args.backend))
        print(pd.DataFrame(cases).to_string(index=False, float_format="{:.3g}".format))
        print()
        print(pd.DataFrame([store_rates(workdir)]).to_string(index=False, float_format="{:.4g}".format))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
