import io
import json
import logging
import os
import socket
import subprocess
import sys
import warnings

import dask
import numpy as np
import pandas as pd
import pytest

from dask_scar.datasets import synthetic_classification


def _run(*args, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "dask-scar")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def _main(capsys, *args):
    """The command line's exit status, output and errors, run in this process (where it
    needs no cluster, or one started in-process is as good: a process costs 2-3 s).
    What it logs is in the errors, as in its own process (there, its logging.basicConfig
    sends it to stderr; here pytest's handlers come first, and it adds none)."""
    from dask_scar.cli import main

    root = logging.getLogger()
    handlers, logged = list(root.handlers), io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
    capsys.readouterr()
    try:
        returncode = main([str(a) for a in args])
    finally:
        root.handlers[:] = handlers
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, out.out, out.err + logged.getvalue())


@pytest.mark.slow
def test_demo_quick_trains_and_plots(tmp_path):
    png = tmp_path / "loss.png"
    out = _run("demo", "--quick", "--no-progress", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert "iterations in" in out.stdout and "training accuracy" in out.stdout
    accuracy = float(out.stdout.split("training accuracy")[1].split()[0])
    assert accuracy > 0.8
    # the same worker killed after iteration 28 under every strategy
    assert "lost at iteration 29: restored 2 chunk(s) from live workers' copies" in out.stdout
    assert "lost at iteration 29: restored 2 chunk(s) (" in out.stdout          # from the store
    assert "lost at iteration 29: rolled every chunk back to iteration 24" in out.stdout
    table = out.stdout.split("iteration cost of the failure")[1].splitlines()[1:4]
    costs = {name: int(cost) for name, cost in (line.split() for line in table)}
    assert costs["traditional"] >= 4 and costs["scar-store"] < costs["traditional"], costs
    assert costs["dask-scar"] <= 1, costs
    assert "dask-scar cuts the iteration cost of this failure by" in out.stdout
    assert "scar-store cuts the iteration cost of this failure by" in out.stdout
    assert png.stat().st_size > 1000
    # killing workers on purpose leaves semaphores for Python's resource tracker to clean
    # up; its "leaked semaphore" warning at exit is not the user's problem
    assert "leaked" not in out.stderr, out.stderr


@pytest.mark.slow
def test_train_on_parquet_with_a_store_then_resume_and_inspect(tmp_path, capsys):
    frame = synthetic_classification(2000, 5, 3)
    path = tmp_path / "data.parquet"
    frame.to_parquet(path)
    params, store = tmp_path / "params.npz", tmp_path / "ckpt.zarr"
    out = _main(capsys, "train", path, "--target", "label", "--max-iter", "20", "--tol", "0", "--no-progress",
                "--out", params, "--store", store)
    assert out.returncode == 0, out.stderr
    assert np.load(params)["weights"].shape == (6, 3)
    out = _main(capsys, "inspect", store)
    assert out.returncode == 0, out.stderr
    assert "dask_scar checkpoint of dask_scar.models.softmax.SoftmaxRegression" in out.stdout
    assert "weights: shape (6, 3) float32" in out.stdout
    assert "last committed round: 5 (iteration 20, epoch 0)" in out.stdout
    assert "iterations since each saved block was written: 0: 6" in out.stdout     # the fit's end wrote every block
    assert "a resume (resume=True, --resume) goes on from iteration 20" in out.stdout
    out = _main(capsys, "train", path, "--target", "label", "--max-iter", "30", "--tol", "0", "--no-progress",
                "--store", store, "--resume")
    assert out.returncode == 0, out.stderr
    assert "30 iterations" in out.stdout and "iter    21" in out.stdout
    assert "last committed round: 8 (iteration 30, epoch 1)" in _main(capsys, "inspect", store).stdout
    # nothing left to train: the stored parameters, no loss curve
    with pytest.warns(UserWarning, match="is at iteration 30, and max_iter=30: nothing to train"):
        out = _main(capsys, "train", path, "--target", "label", "--max-iter", "30", "--no-progress",
                    "--store", store, "--resume", "--out", params)
    assert out.returncode == 0, out.stderr
    assert "nothing trained: the store is at iteration 30, --max-iter 30" in out.stdout
    assert np.load(params)["weights"].shape == (6, 3)


def test_train_with_lbfgs_gets_further_than_gradient_descent(tmp_path, capsys):
    """(and reads CSV files, and trains on the --features named: the text column is left out)"""
    frame = synthetic_classification(2000, 5, 3)
    frame.to_parquet(tmp_path / "data.parquet")
    frame.assign(note="text").to_csv(tmp_path / "data.csv", index=False)
    final = {}
    for solver, data in (("gd", "data.parquet"), ("lbfgs", "data.csv")):
        out = _main(capsys, "train", tmp_path / data, "--target", "label", "--max-iter", "15", "--tol", "0",
                    "--no-progress", "--workers", "1", "--solver", solver, "--features", "x0,x1,x2,x3,x4",
                    "--out", tmp_path / f"{solver}.npz")
        assert out.returncode == 0, out.stderr
        final[solver] = float(out.stdout.split("final loss ")[1].split(";")[0])
    assert final["lbfgs"] < final["gd"] - 0.01, final
    assert np.load(tmp_path / "lbfgs.npz")["weights"].shape == (6, 3)    # (the text column would be refused)


def _periodic(dask_worker) -> dict:
    return {name: pc.callback_time for name, pc in dask_worker.periodic_callbacks.items()}


def test_train_starts_its_local_cluster_quiet():
    """`dask-scar train`'s LocalCluster has no dashboard: Dask's periodic work for it
    (profiler, health check, monitors) is slowed down or off, on every process. Its
    scheduler leaves Dask's port 8787 alone, which another cluster may hold."""
    from distributed import Client

    from dask_scar.cli import local_cluster

    with socket.socket() as other, warnings.catch_warnings():
        try:
            other.bind(("127.0.0.1", 8787))     # (or something else holds it already)
        except OSError:
            pass
        warnings.simplefilter("error")          # Dask warns "Port 8787 is already in use"
        with local_cluster(2) as cluster, Client(cluster) as client:
            workers = client.run(_periodic)
            scheduler = _periodic(cluster.scheduler)
    assert len(workers) == 2
    for callbacks in workers.values():
        assert "profile" not in callbacks and callbacks["tick"] == 1000
        assert callbacks["monitor"] == 5000 and callbacks["memory_monitor"] == 1000
    assert scheduler["tick"] == 1000 and scheduler["monitor"] == 5000


def test_inspect_a_path_that_holds_no_store(tmp_path, capsys):
    out = _main(capsys, "inspect", tmp_path / "nothing.zarr")
    assert out.returncode == 2
    assert "dask-scar: error: no checkpoint store at" in out.stderr and "Traceback" not in out.stderr


def test_inspect_verify_names_damaged_blocks(tmp_path, capsys):
    """A deleted or corrupted block version is not seen by the summary, which reads
    the records only; --verify reads every saved version."""
    from test_store import _damaged_store

    _damaged_store(tmp_path / "ckpt.zarr")
    assert _main(capsys, "inspect", tmp_path / "ckpt.zarr").returncode == 0
    out = _main(capsys, "inspect", tmp_path / "ckpt.zarr", "--verify")
    assert out.returncode == 1, out.stderr
    damaged = [line for line in out.stdout.splitlines() if line.startswith("damaged: ")]
    assert len(damaged) == 2 and "block 5 (slot 0)" in damaged[1] and "data is missing" in damaged[1]
    assert out.stdout.splitlines()[-1] == "verified 1 saved block version(s): 2 damaged"


def test_train_keeps_the_models_defaults_and_refuses_options_it_would_ignore(tmp_path, capsys):
    """Hyperparameters left out keep the model's own defaults (the option's help names
    them); one the model does not take, or a missing --target, is an error that says so."""
    ratings, store = tmp_path / "ratings.parquet", tmp_path / "mf.zarr"
    pd.DataFrame({"user": [0, 1, 2, 0], "item": [0, 1, 1, 2], "rating": [1.0, 2.0, 3.0, 4.0]}).to_parquet(ratings)
    out = _main(capsys, "train", ratings, "--model", "mf", "--learning-rate", "0.1", "--no-progress")
    assert out.returncode == 2 and "dask-scar: error: --model mf takes no --learning-rate" in out.stderr
    path = tmp_path / "data.parquet"
    synthetic_classification(100, 2, 2).to_parquet(path)
    out = _main(capsys, "train", path, "--no-progress")
    assert out.returncode == 2
    assert "dask-scar: error: --model softmax needs --target: one of the columns ['x0', 'x1', 'label']" in out.stderr
    # 5 iterations: a checkpoint round (a store with nothing saved would be started afresh)
    out = _main(capsys, "train", ratings, "--model", "mf", "--max-iter", "5", "--tol", "0", "--no-progress",
                "--workers", "1", "--store", store)
    assert out.returncode == 0, out.stderr
    out = _main(capsys, "train", ratings, "--model", "mf", "--no-progress", "--workers", "1", "--store", store)
    assert out.returncode == 2
    assert "already holds a dask_scar checkpoint: pass resume=True (--resume on the command line)" in out.stderr
    out = _main(capsys, "train", ratings, "--model", "mf", "--no-progress", "--resume")
    assert out.returncode == 2 and "dask-scar: error: --resume needs --store: the path or URL" in out.stderr
    stored = json.loads(_main(capsys, "inspect", store).stdout.splitlines()[0].split("MatrixFactorization ", 1)[1])
    assert stored == {**stored, "l2": 0.1, "rank": 16}       # MatrixFactorization()'s, not another model's
    with pytest.raises(SystemExit):
        _main(capsys, "train", "--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "L2 penalty (default: the model's own: softmax 0.0001, linear 0.0, mf 0.1)" in help_text


def test_train_reports_a_missing_column(tmp_path, capsys):
    path = tmp_path / "data.parquet"
    synthetic_classification(100, 2, 2).to_parquet(path)
    out = _main(capsys, "train", path, "--target", "nope", "--no-progress")
    assert out.returncode != 0
    assert "dask-scar: error: column(s) ['nope'] not in the data" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, said", [
    (["train", "{data}", "--target", "label", "--max-iter", "0"], "--max-iter must be an integer >= 1, got 0"),
    (["train", "{data}", "--target", "label", "--learning-rate", "-1"],
     "--learning-rate must be a finite number > 0, got -1.0"),
    (["train", "{data}", "--target", "label", "--momentum", "1.5"],
     "--momentum must be a finite number >= 0 and < 1, got 1.5"),
    (["train", "{data}", "--target", "label", "--workers", "0"], "--workers must be an integer >= 1, got 0"),
    (["train", "{missing}", "--target", "label"],
     "no data at {missing}: give the path or URL of Parquet files, or of CSV files ending in .csv"),
    (["train", "{data}", "--target", "label", "--solver", "lbfgs", "--momentum", "0.5"],
     "momentum applies to solver='gd' only; use momentum=0 with solver='lbfgs'"),
    (["demo", "--workers", "0"], "--workers must be an integer >= 1, got 0"),
])
def test_bad_options_are_said_as_options_before_a_cluster_starts(tmp_path, capsys, args, said):
    """In this process: a cluster started for nothing would show as its log lines."""
    from dask_scar.cli import main

    paths = {"data": str(tmp_path / "data.parquet"), "missing": str(tmp_path / "none.parquet")}
    synthetic_classification(100, 2, 2).to_parquet(paths["data"])
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err == f"dask-scar: error: {said.format(**paths)}\n"


def test_a_bad_setting_is_said_before_a_cluster_starts(tmp_path, capsys):
    from dask_scar.cli import main

    path = tmp_path / "data.parquet"
    synthetic_classification(100, 2, 2).to_parquet(path)
    with dask.config.set({"scar.chunks-per-worker": 0}):
        assert main(["train", str(path), "--target", "label"]) == 2
    assert capsys.readouterr().err == "dask-scar: error: scar.chunks-per-worker=0: give a whole number, at least 1\n"


def test_a_scheduler_out_of_reach_is_named(tmp_path, capsys):
    from dask_scar.cli import main

    path = tmp_path / "data.parquet"
    synthetic_classification(100, 2, 2).to_parquet(path)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["train", str(path), "--target", "label", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("dask-scar: error: cannot reach the scheduler at tcp://127.0.0.1:1: "
                                              "Timed out trying to connect")
    assert main(["train", str(path), "--target", "label", "--scheduler", "tcp://127.0.0.1"]) == 2
    assert capsys.readouterr().err.startswith("dask-scar: error: cannot reach the scheduler at tcp://127.0.0.1: "
                                              "missing port number")


def test_train_follows_the_progress_setting(tmp_path, capsys):
    """DASK_SCAR__PROGRESS=false turns the bar off as --no-progress does."""
    from dask_scar.cli import main

    path = tmp_path / "data.parquet"
    synthetic_classification(200, 2, 2).to_parquet(path)
    for setting, shown in ((True, True), (False, False)):
        with dask.config.set({"scar.progress": setting}):
            assert main(["train", str(path), "--target", "label", "--max-iter", "2", "--workers", "1"]) == 0
        assert ("SoftmaxRegression:" in capsys.readouterr().err) == shown


def test_errors_give_the_command_lines_words(tmp_path, capsys):
    from dask_scar.cli import main

    path = tmp_path / "data.parquet"
    synthetic_classification(200, 2, 2).assign(x0=lambda f: f["x0"] * 1e4).to_parquet(path)
    assert main(["train", str(path), "--target", "label", "--learning-rate", "1e6", "--workers", "1",
                 "--no-progress", "--store", str(tmp_path / "ckpt.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dask-scar: error: training diverged") and "--resume goes on from there" in err, err


@pytest.mark.slow
def test_train_finds_its_cluster_by_scheduler_file_and_stops_at_sigterm_as_at_ctrl_c(tmp_path, capsys):
    """A batch job: the cluster named by the file its scheduler wrote; the job stopped
    with SIGTERM (scancel, a time limit, a pod deleted) lets go of its store and says
    so, and the job submitted again goes on with --resume."""
    import dask_scar as scar
    from conftest import cli_cluster, committed, wait_for
    from dask_scar.cli import main

    path, store = tmp_path / "data.parquet", tmp_path / "ckpt.zarr"
    synthetic_classification(20000, 5, 3).to_parquet(path)
    exe = os.path.join(os.path.dirname(sys.executable), "dask-scar")
    with cli_cluster(tmp_path, 2) as (cluster, _):
        where = ["--scheduler-file", str(cluster.scheduler_file)]
        job = subprocess.Popen([exe, "train", str(path), "--target", "label", "--max-iter", "1000000", "--tol", "0",
                                "--no-progress", "--store", str(store), *where],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: committed(store, "round") >= 2, timeout=120, what="two committed rounds")
            job.terminate()
            _, err = job.communicate(timeout=60)
        finally:
            job.kill()
        assert job.returncode == 143, err
        assert err.endswith("dask-scar: terminated (SIGTERM); the checkpoint store keeps what it saved, and --resume "
                            "goes on from it\n")
        saved = scar.open_store(store)
        assert saved.writer is None        # let go: the next job takes it without a warning
        # (the workers' writes in flight may still land: a few rounds more)
        until = saved.resumes_from() + 50
        again = _run("train", str(path), "--target", "label", "--max-iter", str(until), "--tol", "0",
                     "--no-progress", "--store", str(store), "--resume", *where)
        assert again.returncode == 0 and "did not end" not in again.stderr, again.stderr
        assert f"\n{until} iterations" in again.stdout
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["train", str(path), "--target", "label", "--scheduler-file", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err == (f"dask-scar: error: no scheduler file at {tmp_path / 'none.json'} after 1 s "
                                       "(distributed.comm.timeouts.connect): start the scheduler with "
                                       f"--scheduler-file {tmp_path / 'none.json'}, on a filesystem this machine "
                                       "sees\n")
