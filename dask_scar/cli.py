"""The ``dask-scar`` command line: ``demo``, ``train``, ``inspect`` and ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from .datasets import synthetic_classification
from .recovery import live_workers


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


def _plot(runs: dict[str, pd.DataFrame], path: str, title: str, failure: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if failure is not None else 1, figsize=(11 if failure else 6, 4), squeeze=False)
    for ax in axes[0]:
        for name, history in runs.items():
            ax.plot(np.arange(1, len(history) + 1), history["loss"], label=name)
        ax.set_xlabel("iterations run (rolled-back ones count)")
        ax.set_ylabel("loss")
    axes[0][0].set_yscale("log")
    axes[0][0].set_title(title)
    if failure is not None:
        zoom = axes[0][1]
        zoom.axvline(failure, color="grey", linestyle=":", label=f"worker killed after iteration {failure}")
        after = [h["loss"].iloc[failure - 3:] for h in runs.values()]
        zoom.set_xlim(failure - 3, max(len(h) for h in runs.values()) + 1)
        zoom.set_ylim(min(a.min() for a in after) * 0.995, max(a.iloc[:2].max() for a in after) * 1.05)
        zoom.set_title("around the failure")
        zoom.legend()
    else:
        axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo(args: argparse.Namespace) -> int:
    """Four runs on one embedded cluster: failure-free, then the same worker killed
    after the same iteration under dask-scar's defaults (prioritized checkpoints,
    partial recovery from live workers' copies first), under SCAR from the store
    alone, and under traditional checkpoint/rollback, at the same I/O budget."""
    import tempfile
    import warnings

    import dask
    import dask.dataframe as dd

    import dask_scar as scar
    from dask_scar.bench import iteration_cost
    from dask_scar.bench._real import BenchCluster

    _check_options(workers=(args.workers, 1, True), features=(args.features, 1, True), classes=(args.classes, 2, True),
                   **({} if args.quick else {"rows": (args.rows, 100, True), "max_iter": (args.max_iter, 40, True)}))
    rows = 5_000 if args.quick else args.rows
    max_iter = 40 if args.quick else args.max_iter
    every = max(8, max_iter * 2 // 15)      # a full checkpoint every 20 iterations of 150
    kill_after = every * 7 // 2             # halfway between two full checkpoints
    target = max_iter * 4 // 5
    print(f"dask-scar demo: softmax regression on {rows:,} rows x {args.features} features, "
          f"{args.classes} classes, {args.workers} workers; a worker is killed after iteration {kill_after}")
    frame = synthetic_classification(rows, args.features, args.classes)
    # the same bytes per iteration: a quarter of the blocks four times as often
    # name: (policy, recovery, kill, restore from live workers' copies)
    strategies = {
        "failure-free": (scar.PrioritizedCheckpoint(0.25, every=every // 4), "partial", False, True),
        "dask-scar": (scar.PrioritizedCheckpoint(0.25, every=every // 4), "partial", True, True),
        "scar-store": (scar.PrioritizedCheckpoint(0.25, every=every // 4), "partial", True, False),
        "traditional": (scar.FullCheckpoint(every=every), "full", True, False),
    }
    runs, events, seconds = {}, {}, {}
    # the cluster's own complaints about the worker killed on purpose are not news here
    logging.getLogger("dask_scar").setLevel(logging.ERROR)
    # the data travels in the graph, as an embedded demo's does: that is not news here either
    warnings.filterwarnings("ignore", message="Sending large graph")
    with BenchCluster(args.workers) as cluster, tempfile.TemporaryDirectory(prefix="dask-scar-demo-") as tmp:
        ddf = dd.from_pandas(frame, npartitions=2 * args.workers)
        for name, (policy, recovery, kill, copies) in strategies.items():
            client = cluster.ready()      # the nanny has replaced the worker killed before
            victim = sorted(live_workers(client))[min(1, args.workers - 1)]
            killed = []

            def callback(iteration, loss, victim=victim, kill=kill, killed=killed):
                if kill and iteration == kill_after and not killed:
                    killed.append(iteration)
                    cluster.kill([victim])

            model = scar.SoftmaxRegression(l2=1e-3, learning_rate=1.0)
            trainer = scar.Trainer(client, model, store=f"{tmp}/{name}.zarr", policy=policy, recovery=recovery)
            start = time.perf_counter()
            with dask.config.set({"scar.recovery.replicas": copies}):
                result = trainer.fit(ddf, target="label", max_iter=max_iter, tol=0,
                                     progress=not args.no_progress, callback=callback)
            seconds[name] = time.perf_counter() - start
            runs[name], events[name] = result.history, result.events
            if name == "failure-free":
                accuracy = model.score(ddf, "label")

    free = runs["failure-free"]
    print(_loss_curve(free))
    print(f"failure-free: {len(free)} iterations in {seconds['failure-free']:.1f} s "
          f"({free['seconds'].median() * 1000:.1f} ms per iteration, median); final loss "
          f"{free['loss'].iloc[-1]:.5f}; training accuracy {accuracy:.4f}")
    print()
    failed = [name for name in strategies if name != "failure-free"]
    costs = {name: iteration_cost(runs[name], free, at=target) for name in failed}
    for name in failed:
        policy, recovery, _, copies = strategies[name]
        print(f"{name}: {policy!r}, recovery={recovery!r}"
              + (", restoring from live workers' copies first" if copies else ", from the store alone"))
        for event in events[name]:
            print(f"    {event.describe()}")
    print()
    print(f"iteration cost of the failure: iterations to reach the failure-free loss at iteration {target} "
          f"({free['loss'].iloc[target - 1]:.5f}), minus {target}")
    for name, cost in costs.items():
        print(f"    {name:12s} {'not reached' if cost is None else cost:>5}")
    if None not in costs.values() and costs["traditional"] > 0:
        for name in failed[:-1]:
            reduction = 1 - costs[name] / costs["traditional"]
            print(f"{name} cuts the iteration cost of this failure by {100 * reduction:.0f} % against "
                  "traditional checkpoint/rollback")
    if args.plot:
        _plot(runs, args.plot, "dask-scar demo: one worker killed", failure=kill_after)
        print(f"loss curves written to {args.plot}")
    return 0


def local_cluster(workers: int):
    """The LocalCluster ``dask-scar train`` starts: ``workers`` processes of one thread,
    no dashboard, and so none of Dask's periodic work for it (:data:`dask_scar.config.QUIET`).
    Its nannies fork their workers (:func:`dask_scar.config.own_cluster`), replacements
    included: that setting stays for as long as this process runs."""
    import dask
    from distributed import LocalCluster

    from dask_scar import config

    dask.config.set(config.own_cluster())
    with dask.config.set(config.QUIET):
        return LocalCluster(n_workers=workers, threads_per_worker=1, **config.NO_DASHBOARD)


def _check_options(*checks: Callable[[], None], **numbers: tuple[Any, float, bool]) -> None:
    """Bad numbers said as the options that gave them, before a cluster starts:
    ``checks`` raise ValueError("name must ..."), ``numbers`` are (value, least, whole)."""
    from dask_scar.exceptions import ScarError
    from dask_scar.models._base import check_number

    try:
        for check in checks:
            check()
        for name, (value, least, whole) in numbers.items():
            check_number(name, value, least, integer=whole)
    except ValueError as exc:
        said = re.match(r"(\w+) must (.*)", str(exc), re.S)      # "learning_rate must be ..."
        raise ScarError(f"--{said[1].replace('_', '-')} must {said[2]}" if said else str(exc)) from None


def _wait_for_file(path: str) -> None:
    """A batch job may start before its scheduler has written its file: wait for it as
    long as Dask waits to connect (Dask's own client waits without end)."""
    import os

    import dask
    from dask.utils import parse_timedelta

    from .exceptions import ScarError

    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s")
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise ScarError(f"no scheduler file at {path} after {timeout:g} s (distributed.comm.timeouts.connect): "
                            f"start the scheduler with --scheduler-file {path}, on a filesystem this machine sees")
        time.sleep(0.1)


def train(args: argparse.Namespace) -> int:
    from distributed import Client

    import dask.dataframe as dd

    import dask_scar as scar

    given = {name: getattr(args, name) for name in HYPERPARAMETERS if getattr(args, name) is not None}
    foreign = [name for name in given if args.model not in HYPERPARAMETERS[name]]
    if foreign:
        options = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise scar.ScarError(f"--model {args.model} takes no {options}")
    if args.resume and not args.store:
        raise scar.ScarError("--resume needs --store: the path or URL of the checkpoint store")
    model = getattr(scar, MODELS[args.model])(**given)
    try:
        scar.config.check()     # a bad DASK_SCAR__... setting, before a cluster starts
    except ValueError as exc:
        raise scar.ScarError(str(exc)) from None
    _check_options(model.check_params, max_iter=(args.max_iter, 1, True), tol=(args.tol, 0, False),
                   **({} if args.scheduler or args.scheduler_file else {"workers": (args.workers, 1, True)}))
    reader = dd.read_csv if args.data.endswith((".csv", ".csv.gz")) else dd.read_parquet
    try:
        ddf = reader(args.data)
    except FileNotFoundError:
        raise scar.ScarError(f"no data at {args.data}: give the path or URL of Parquet files, or of CSV files "
                             "ending in .csv") from None
    except OSError as exc:
        raise scar.ScarError(f"cannot read {args.data}: {exc.__cause__ or exc}") from None
    if args.target is None and args.model != "mf":
        raise scar.ScarError(f"--model {args.model} needs --target: one of the columns {list(ddf.columns)}")
    cluster = None
    if args.scheduler or args.scheduler_file:
        where = args.scheduler or f"the address in {args.scheduler_file}"
        if args.scheduler_file:
            _wait_for_file(args.scheduler_file)
        try:
            client = Client(args.scheduler, scheduler_file=args.scheduler_file)
        except (OSError, ValueError, TypeError, KeyError) as exc:   # a timeout; no port; tls:// alone; a bad file
            raise scar.ScarError(f"cannot reach the scheduler at {where}: {exc}") from None
    else:
        cluster = local_cluster(args.workers)
        try:
            client = Client(cluster)
        except BaseException:
            with contextlib.suppress(Exception):    # (the client's error is the one to see)
                cluster.close()
            raise
    try:
        features = args.features.split(",") if args.features else None
        trainer = scar.Trainer(client, model, store=args.store, recovery=args.recovery)
        result = trainer.fit(ddf, target=args.target, features=features, max_iter=args.max_iter, tol=args.tol,
                             resume=args.resume, progress=False if args.no_progress else None)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if len(result.history):
        print(_loss_curve(result.history))
        for event in result.events:
            print(event.describe())
        print(f"{result.n_iter} iterations; final loss {result.history['loss'].iloc[-1]:.6g}; "
              f"converged: {result.converged}")
    else:
        print(f"nothing trained: the store is at iteration {result.n_iter}, --max-iter {args.max_iter}")
    if args.out:
        np.savez(args.out, **result.params)
        print(f"parameters written to {args.out}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    """What a checkpoint store holds: model, size, last committed round, how fresh its blocks are."""
    import json

    import dask_scar as scar

    store = scar.open_store(args.store)
    info = store.info()
    meta = store.meta
    print(f"{info['url']}: dask_scar checkpoint of {info['model']} {json.dumps(meta['model']['params'])}")
    columns = meta["model"].get("columns")
    if columns:
        print(f"trained on features {columns['features']}, target {columns['target']!r}")
    print(f"policy {json.dumps(meta.get('policy'))}")
    for name, layout in store.layouts.items():
        print(f"  {name}: shape {layout.shape} {layout.dtype}, {layout.n_blocks} blocks of {layout.block_rows} rows")
    manifest = info["manifest"]
    print("last committed round: " + (f"{manifest['round']} (iteration {manifest['iteration']}, "
                                      f"epoch {manifest['epoch']})" if manifest else "none"))
    print(f"{info['blocks_saved']} of {info['blocks']} blocks saved; {info['nbytes_stored']:,} bytes stored for "
          f"{info['nbytes_parameters']:,} bytes of parameters")
    if info["staleness"]:
        print("iterations since each saved block was written: "
              + ", ".join(f"{age}: {count}" for age, count in info["staleness"].items()))
    if info["newer_blocks"]:
        print(f"{info['newer_blocks']} block(s) written after that round, up to iteration "
              f"{info['newest_iteration']} (by rounds that never committed: resume=True and partial restores "
              "read them, a full rollback does not)")
    if info["diverged"] is not None:
        print(f"the fit that wrote it diverged: resume=True starts from the versions saved before iteration "
              f"{info['diverged']}")
    elif info["blocks_saved"]:
        print(f"a resume (resume=True, --resume) goes on from iteration {info['resumes_from']}")
    if args.verify:
        read, problems, overwritten = store.verify()
        for problem in problems:
            print(f"damaged: {problem}")
        print(f"verified {read:,} saved block version(s): " + (f"{len(problems)} damaged" if problems else
                                                               "each matches its record")
              + (f"; {overwritten:,} older version(s) overwritten by a write cut short (no damage)"
                 if overwritten else ""))
        return 1 if problems else 0
    return 0


def bench(args: argparse.Namespace) -> int:
    """The iteration cost of failures per model and strategy (see dask_scar.bench)."""
    from dask_scar.bench import CASES, run

    cases = args.cases.split(",") if args.cases else None
    unknown = sorted(set(cases or ()) - set(CASES))
    if unknown or args.trials < 1:
        problem = (f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}" if unknown
                   else "--trials must be at least 1")
        print(f"dask-scar: error: {problem}", file=sys.stderr)
        return 2
    run(quick=args.quick, out=args.out, trials=args.trials, cases=cases, real=not args.simulated_only)
    return 0


#: ``dask-scar train --model``: the model classes
MODELS = {"softmax": "SoftmaxRegression", "linear": "LinearRegression", "mf": "MatrixFactorization"}
#: ``dask-scar train``'s hyperparameter options and the models they apply to; an option
#: left out keeps the model's own default
HYPERPARAMETERS = {"learning_rate": ("softmax", "linear"), "momentum": ("softmax", "linear"),
                   "solver": ("softmax", "linear"), "l2": ("softmax", "linear", "mf"), "rank": ("mf",)}


class _Help(argparse.HelpFormatter):
    """Help that names each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _model_defaults(name: str) -> str:
    """The models' own defaults of hyperparameter ``name``, for its option's help."""
    from inspect import signature

    import dask_scar as scar

    values = [f"{model} {signature(getattr(scar, MODELS[model])).parameters[name].default}"
              for model in HYPERPARAMETERS[name]]
    return f"(default: the model's own: {', '.join(values)})"


class Terminated(KeyboardInterrupt):
    """SIGTERM: a batch system's stop (scancel, a time limit) or a pod's deletion. The
    fit stops as at Ctrl-C: its segments end, and its store is let go."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dask-scar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", formatter_class=_Help,
                       help="train on an embedded LocalCluster, kill a worker, and compare SCAR's "
                            "recovery with traditional checkpoint/rollback")
    p.add_argument("--workers", type=int, default=4, help="worker processes of the embedded LocalCluster")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the synthetic data set")
    p.add_argument("--features", type=int, default=50, help="its feature columns")
    p.add_argument("--classes", type=int, default=10, help="its classes")
    p.add_argument("--max-iter", type=int, default=150, help="iterations of each run")
    p.add_argument("--quick", action="store_true", help="a small run that takes seconds")
    p.add_argument("--plot", metavar="PNG", help="also save the loss curves as a picture")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=demo)

    p = sub.add_parser("train", formatter_class=_Help, help="train a model on a Parquet or CSV dataset")
    p.add_argument("data", help="path or URL of Parquet files, or CSV files ending in .csv or .csv.gz")
    p.add_argument("--model", choices=list(MODELS), default="softmax",
                   help="softmax regression, linear regression, or matrix factorization (alternating least "
                        "squares on user, item and rating columns)")
    p.add_argument("--target", help="target column: integer class labels (softmax), numbers (linear), ratings "
                                    "(mf, default 'rating')")
    p.add_argument("--features", help="comma-separated feature columns (default: all others)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running scheduler (default: an embedded LocalCluster)")
    where.add_argument("--scheduler-file", help="the file a running scheduler wrote its address to (dask scheduler "
                                                "--scheduler-file, dask-mpi, dask-jobqueue)")
    p.add_argument("--workers", type=int, default=2, help="workers of the embedded LocalCluster")
    p.add_argument("--max-iter", type=int, default=100, help="iterations at most")
    p.add_argument("--tol", type=float, default=1e-6, help="stop when the loss moves by less, relatively")
    p.add_argument("--learning-rate", type=float, help="gradient descent's step " + _model_defaults("learning_rate"))
    p.add_argument("--momentum", type=float, help="Nesterov momentum " + _model_defaults("momentum"))
    p.add_argument("--solver", choices=["gd", "lbfgs"],
                   help="gradient descent (with --momentum) or L-BFGS " + _model_defaults("solver"))
    p.add_argument("--l2", type=float, help="L2 penalty " + _model_defaults("l2"))
    p.add_argument("--rank", type=int, help="factors per user and item " + _model_defaults("rank"))
    p.add_argument("--out", help="save the parameters to this .npz file")
    p.add_argument("--store", help="path or URL of a checkpoint store every worker can write")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --store")
    p.add_argument("--recovery", choices=["partial", "full"], default="partial",
                   help="when a worker dies: restore only its chunks (SCAR), or roll everything back")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train)

    p = sub.add_parser("inspect", help="show what a checkpoint store holds")
    p.add_argument("store", help="path or URL of the store")
    p.add_argument("--verify", action="store_true",
                   help="read every saved block version and check it against its record (reads the whole store; "
                        "exits 1 if any is damaged)")
    p.set_defaults(func=inspect)

    p = sub.add_parser("bench", formatter_class=_Help,
                       help="measure the iteration cost of failures under each recovery strategy "
                            "(simulated trials and real kills), as in the SCAR paper")
    p.add_argument("--quick", action="store_true", help="smaller data sets (minutes on 2 cores)")
    p.add_argument("--out", default="bench-out", help="folder for bench.csv, trials.csv, bench.md, recovery.png")
    p.add_argument("--trials", type=int, default=3,
                   help="failure iterations per model; each is tried at every lost fraction")
    p.add_argument("--cases", help="comma-separated subset of: softmax-digits, softmax-synthetic, linear, mf, lda")
    p.add_argument("--simulated-only", action="store_true", help="skip the real kills on a LocalCluster")
    p.set_defaults(func=bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")   # messages name dask_scar
    from dask_scar.exceptions import ScarError

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except ScarError as exc:
        # the library's advice, in this command's words
        said = str(exc).replace("fit(..., resume=True)", "--resume")
        print(f"dask-scar: error: {said}", file=sys.stderr)
        return 2
    except Terminated:
        stored = "; the checkpoint store keeps what it saved, and --resume goes on from it"
        print(f"dask-scar: terminated (SIGTERM){stored if getattr(args, 'store', None) else ''}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("dask-scar: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
