"""The CuPy path: run where CuPy and a GPU are present (skipped elsewhere)."""

import numpy as np
import pytest

cp = pytest.importorskip("cupy")

import dask_scar as scar  # noqa: E402
from dask_scar.local import fit_local, prepare_local  # noqa: E402


def test_local_maths_on_the_gpu_equal_numpy(digits):
    model = scar.SoftmaxRegression(momentum=0.9)
    block = prepare_local(model, digits, "label")
    _, host_losses = fit_local(model, block, max_iter=20)
    device_block = {k: cp.asarray(v) for k, v in block.items()}
    params, device_losses = fit_local(model, device_block, max_iter=20, xp=cp)
    assert isinstance(params["weights"], cp.ndarray)
    np.testing.assert_allclose(device_losses, host_losses, rtol=1e-4)


def test_trainer_with_cupy_backend(client, digits):
    model = scar.SoftmaxRegression(momentum=0.9)
    result = scar.Trainer(client, model, backend="cupy").fit(digits, target="label", max_iter=60, progress=False)
    assert isinstance(result.params["weights"], np.ndarray)
    assert model.score(digits, "label") > 0.95


def test_als_on_the_gpu():
    from conftest import low_rank_ratings

    frame, _ = low_rank_ratings()
    model = scar.MatrixFactorization(rank=5, l2=1e-6)
    block = {k: cp.asarray(v) for k, v in prepare_local(model, frame).items()}
    params, losses = fit_local(model, block, max_iter=50, xp=cp)
    model.params_ = {k: cp.asnumpy(v) for k, v in params.items()}
    assert model.rmse(frame) < 1e-3
