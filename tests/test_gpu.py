"""The CuPy path: run where CuPy and a GPU are present (skipped elsewhere)."""

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

cp = pytest.importorskip("cupy")
try:
    cp.cuda.runtime.getDeviceCount()
except cp.cuda.runtime.CUDARuntimeError:  # pragma: no cover - CuPy installed without a GPU
    pytest.skip("CuPy is installed but no GPU is visible", allow_module_level=True)

import dask_scar as scar  # noqa: E402
from conftest import kill_worker, low_rank_ratings, new_cluster  # noqa: E402
from dask_scar.local import fit_local, prepare_local  # noqa: E402


def test_local_maths_on_the_gpu_equal_numpy(digits):
    model = scar.SoftmaxRegression(momentum=0.9)
    block = prepare_local(model, digits, "label")
    _, host_losses = fit_local(model, block, max_iter=20)
    device_block = {k: cp.asarray(v) for k, v in block.items()}
    params, device_losses = fit_local(model, device_block, max_iter=20, xp=cp)
    assert isinstance(params["weights"], cp.ndarray)
    np.testing.assert_allclose(device_losses, host_losses, rtol=1e-4)


def _linear_frame(rows=4000, features=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features)).astype(np.float32)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    frame["y"] = X @ rng.standard_normal(features).astype(np.float32) + 0.5
    return frame


@pytest.mark.parametrize("make, frame, target, rtol", [
    (lambda: scar.SoftmaxRegression(momentum=0.9), "digits", "label", 2e-4),
    (lambda: scar.SoftmaxRegression(batch_size=400), "digits", "label", 2e-4),
    # a line search's accept/reject can flip on rounding: a looser tolerance
    (lambda: scar.SoftmaxRegression(l2=1e-3, solver="lbfgs"), "digits", "label", 2e-3),
    (lambda: scar.LinearRegression(l2=0.1, momentum=0.9), "linear", "y", 2e-4),
    (lambda: scar.MatrixFactorization(rank=5, l2=1e-3), "ratings", None, 2e-4),
], ids=["softmax", "softmax-minibatch", "softmax-lbfgs", "linear", "als"])
def test_trainer_on_cupy_equals_the_numpy_maths(client, digits, make, frame, target, rtol):
    """Blocks and chunks live on the GPU; losses equal a NumPy run of the same blocks
    (minibatches are drawn per block), and fitted parameters come back to the host."""
    frame = dd.from_pandas({"digits": digits, "linear": _linear_frame(), "ratings": low_rank_ratings()[0]}[frame],
                           npartitions=4)
    results = {backend: scar.Trainer(client, make(), backend=backend).fit(
        frame, target=target, max_iter=40, tol=0, progress=False) for backend in ("numpy", "cupy")}
    assert all(isinstance(v, np.ndarray) for v in results["cupy"].params.values())
    np.testing.assert_allclose(results["cupy"].history["loss"], results["numpy"].history["loss"], rtol=rtol)
    assert results["cupy"].history["loss"].iloc[-1] < results["cupy"].history["loss"].iloc[0]


def test_digits_accuracy_on_cupy(client, digits):
    model = scar.SoftmaxRegression(momentum=0.9)
    scar.Trainer(client, model, backend="cupy").fit(digits, target="label", max_iter=60, progress=False)
    assert model.score(digits, "label") > 0.95


@pytest.mark.slow
def test_killed_gpu_worker_is_recovered(tmp_path, digits):
    """SIGKILL a worker that holds CuPy chunks: its chunks come back (from the Zarr store,
    or from copies on the live worker) onto the GPU, and all 60 iterations run."""
    from test_recovery import fit_killed_midway, scar_client

    big = pd.concat([digits] * 20, ignore_index=True)
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        trainer = scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / "ckpt.zarr",
                               n_chunks=4, backend="cupy")
        result, victim = fit_killed_midway(client, trainer, big, version=10)
    (event,) = result.events
    assert event.worker == victim and len(event.lost_chunks + event.moved_chunks + event.peer_chunks) == 2
    assert result.n_iter == 60 and np.isfinite(result.history["loss"]).all()
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0] / 2


def test_als_on_the_gpu():
    frame, _ = low_rank_ratings()
    model = scar.MatrixFactorization(rank=5, l2=1e-6)
    block = {k: cp.asarray(v) for k, v in prepare_local(model, frame).items()}
    params, losses = fit_local(model, block, max_iter=50, xp=cp)
    model.params_ = {k: cp.asnumpy(v) for k, v in params.items()}
    assert model.rmse(frame) < 1e-3


@pytest.mark.slow
def test_extrapolated_restore_on_the_gpu(tmp_path):
    """A deterministic kill after iteration 35 under ``PrioritizedCheckpoint``: the lost
    chunks come back onto the GPU from the store's two newest versions of each block
    (extrapolated along their drift), and training ends where an unbroken run does."""
    from test_recovery import once_at, scar_client, train

    with new_cluster(2) as cluster, scar_client(cluster) as client:
        free = train(client, tmp_path, "free", backend="cupy")
    with dask.config.set({"scar.recovery.replicas": False}), new_cluster(2) as cluster, \
            scar_client(cluster) as client:
        victim = sorted(client.scheduler_info()["workers"])[1]
        result = train(client, tmp_path, "scar", backend="cupy", policy=scar.PrioritizedCheckpoint(0.3, every=3),
                       callback=once_at(35, lambda: kill_worker(client, victim)))
    (event,) = result.events
    assert event.worker == victim and len(event.lost_chunks) == 4 and event.resumed_at == 35
    assert event.extrapolated_blocks > 0 and event.bytes_read > 0
    assert result.n_iter == 100
    assert result.history["loss"].iloc[-1] == pytest.approx(free.history["loss"].iloc[-1], rel=1e-3)


def test_segments_on_cupy_equal_graphs(client, digits, tmp_path):
    """CuPy workers run segments (one task per worker per 20 iterations, contributions
    sent worker to worker): the losses, weights and checkpoint rounds equal one graph
    per iteration on the same GPU."""
    from test_trainer import GraphLog, _segment_inputs

    ddf = dd.from_pandas(digits, npartitions=4)

    def fit(name):
        return scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / name, backend="cupy").fit(
            ddf, target="label", max_iter=25, tol=0, progress=False)

    client.register_plugin(GraphLog())
    fast = fit("segments")
    segments, graphs = _segment_inputs(client)
    assert sorted(segments) == [1, 21] and not graphs
    with dask.config.set({"scar.segment-iterations": 1}):
        slow = fit("graphs")
    np.testing.assert_allclose(fast.history["loss"], slow.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(fast.params["weights"], slow.params["weights"], rtol=1e-5, atol=1e-7)
    columns = ["round", "iteration", "blocks"]
    pd.testing.assert_frame_equal(fast.checkpoints[columns], slow.checkpoints[columns])
    assert (fast.checkpoints["error"] == "").all() and fast.checkpoints["iteration"].tolist()[:4] == [5, 10, 15, 20]
    np.testing.assert_allclose(scar.open_store(tmp_path / "segments").load()["weights"],
                               scar.open_store(tmp_path / "graphs").load()["weights"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_rows_spread_over_gpu_workers_stay_on_the_gpu(digits):
    """CuPy blocks are cut, sent and joined: a third worker joins two (a sixth of the
    rows comes off the end of each block), then one of the three retires (its block
    is moved and cut again). Every block stays a CuPy array, no worker keeps a view
    of a larger block, and the losses equal the NumPy maths."""
    from test_recovery import _block_types, _fit_with_steps, _settled, live_workers, scar_client

    frame = pd.concat([digits] * 3, ignore_index=True)     # 5,391 rows
    with new_cluster(2) as cluster, scar_client(cluster) as client:
        seen = {}

        def grow():
            cluster.scale(3)
            client.wait_for_workers(3, timeout=60)

        def look(name):
            seen[name] = _settled(client)
            seen[name + " types"] = client.run(_block_types)

        steps = {10: grow, 20: lambda: look("three"),
                 25: lambda: client.retire_workers([sorted(live_workers(client))[0]]), 35: lambda: look("two")}
        _fit_with_steps(client, frame, steps, max_iter=45, backend="cupy", rtol=2e-4)
    assert sorted(seen["three"].values()) == [[(1797, False)]] * 3
    assert sorted(sum(n for n, _ in blocks) for blocks in seen["two"].values()) == [2695, 2696]
    assert not any(view for blocks in seen["two"].values() for _, view in blocks)
    assert all(types == ["cupy"] for types in seen["three types"].values())
    assert all(types == ["cupy"] for types in seen["two types"].values())
