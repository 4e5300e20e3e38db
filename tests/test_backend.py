import numpy as np
import pytest

from dask_scar.backend import array_module, get_array_module, to_device, to_host
from dask_scar.exceptions import BackendError


def test_numpy_arrays_and_scalars_give_numpy():
    assert get_array_module(np.zeros(3), 1.0, None, np.ones((2, 2))) is np
    assert get_array_module() is np


def test_non_arrays_are_refused_with_their_type():
    with pytest.raises(BackendError, match="got list"):
        get_array_module([1, 2, 3])


def test_host_round_trip_is_identity_for_numpy():
    a = np.arange(6.0).reshape(2, 3)
    assert to_host(a) is a
    assert to_device(a, np) is a


def test_unknown_backend_name():
    with pytest.raises(BackendError, match="unknown array backend 'tpu'"):
        array_module("tpu")


def test_mixed_numpy_and_cupy_raise():
    cp = pytest.importorskip("cupy")
    with pytest.raises(BackendError, match="mixed"):
        get_array_module(np.zeros(2), cp.zeros(2))
    assert get_array_module(cp.zeros(2)) is cp
    np.testing.assert_array_equal(to_host(cp.arange(3)), np.arange(3))


def test_a_model_refuses_a_backend_it_does_not_run_on():
    import dask_scar as scar

    with pytest.raises(BackendError, match=r"LDA runs on numpy only, not backend='cupy'.*backend='numpy'"):
        scar.Trainer(None, scar.LDA(), backend="cupy")
