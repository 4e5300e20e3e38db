"""The ``dask-scar`` command line: ``demo`` and ``train``."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import pandas as pd


def synthetic_classification(rows: int, features: int, classes: int, seed: int = 0,
                             separation: float = 1.5) -> pd.DataFrame:
    """Gaussian classes around random centres: a frame of ``x0..`` features and ``label``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * separation / np.sqrt(features) * 3
    labels = rng.integers(0, classes, rows)
    X = (centres[labels] + rng.standard_normal((rows, features))).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["label"] = labels
    return frame


def _loss_curve(history: pd.DataFrame, lines: int = 12) -> str:
    """A text plot of the loss: one line per sampled iteration."""
    losses = history["loss"].to_numpy()
    picks = np.unique(np.linspace(0, len(losses) - 1, min(lines, len(losses))).round().astype(int))
    lo, hi = losses.min(), losses.max()
    out = []
    for i in picks:
        width = 1 + int(40 * (losses[i] - lo) / (hi - lo)) if hi > lo else 1
        out.append(f"  iter {int(history['iteration'].iloc[i]):5d}  loss {losses[i]:.5f}  {'#' * width}")
    return "\n".join(out)


def _plot(history: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["iteration"], history["loss"])
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo(args: argparse.Namespace) -> int:
    from distributed import Client, LocalCluster

    import dask.dataframe as dd

    import dask_scar as scar

    rows = 5_000 if args.quick else args.rows
    max_iter = 30 if args.quick else args.max_iter
    print(f"dask-scar demo: softmax regression on {rows:,} rows x {args.features} features, "
          f"{args.classes} classes, {args.workers} workers")
    frame = synthetic_classification(rows, args.features, args.classes)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        ddf = dd.from_pandas(frame, npartitions=2 * args.workers)
        model = scar.SoftmaxRegression(l2=1e-4, learning_rate=0.5, momentum=0.9)
        trainer = scar.Trainer(client, model)
        start = time.perf_counter()
        result = trainer.fit(ddf, target="label", max_iter=max_iter, tol=1e-7, progress=not args.no_progress)
        seconds = time.perf_counter() - start
        accuracy = model.score(ddf, "label")
    h = result.history
    print(_loss_curve(h))
    print(f"{result.n_iter} iterations in {seconds:.1f} s ({h['seconds'].median() * 1000:.1f} ms per iteration, "
          f"median); converged: {result.converged}")
    print(f"final loss {h['loss'].iloc[-1]:.5f}; training accuracy {accuracy:.4f}")
    if args.plot:
        _plot(h, args.plot, "dask-scar demo: softmax regression")
        print(f"loss curve written to {args.plot}")
    return 0


def train(args: argparse.Namespace) -> int:
    from distributed import Client, LocalCluster

    import dask.dataframe as dd

    import dask_scar as scar

    reader = dd.read_csv if args.data.endswith((".csv", ".csv.gz")) else dd.read_parquet
    ddf = reader(args.data)
    models = {
        "softmax": lambda: scar.SoftmaxRegression(l2=args.l2, learning_rate=args.learning_rate, momentum=args.momentum),
        "linear": lambda: scar.LinearRegression(l2=args.l2, learning_rate=args.learning_rate, momentum=args.momentum),
        "mf": lambda: scar.MatrixFactorization(rank=args.rank, l2=args.l2),
    }
    model = models[args.model]()
    cluster = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
    try:
        features = args.features.split(",") if args.features else None
        result = scar.Trainer(client, model).fit(ddf, target=args.target, features=features,
                                                 max_iter=args.max_iter, tol=args.tol,
                                                 progress=not args.no_progress)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(_loss_curve(result.history))
    print(f"{result.n_iter} iterations; final loss {result.history['loss'].iloc[-1]:.6g}; "
          f"converged: {result.converged}")
    if args.out:
        np.savez(args.out, **result.params)
        print(f"parameters written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dask-scar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train on an embedded LocalCluster and show the loss curve")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--features", type=int, default=50)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--max-iter", type=int, default=150)
    p.add_argument("--quick", action="store_true", help="a small run that takes seconds")
    p.add_argument("--plot", metavar="PNG", help="also save the loss curve as a picture")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=demo)

    p = sub.add_parser("train", help="train a model on a Parquet or CSV dataset")
    p.add_argument("data", help="path or URL of Parquet files, or CSV files ending in .csv")
    p.add_argument("--model", choices=["softmax", "linear", "mf"], default="softmax")
    p.add_argument("--target", help="target column (ratings column for mf)")
    p.add_argument("--features", help="comma-separated feature columns (default: all others)")
    p.add_argument("--scheduler", help="address of a running scheduler (default: an embedded LocalCluster)")
    p.add_argument("--workers", type=int, default=2, help="workers of the embedded LocalCluster")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--learning-rate", type=float, default=0.5)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", help="save the parameters to this .npz file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=train)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from dask_scar.exceptions import ScarError

    try:
        return args.func(args)
    except ScarError as exc:
        print(f"dask-scar: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
