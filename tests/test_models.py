"""The maths of each model, in one process, against independent references."""

import json
import re
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import low_rank_ratings

import dask_scar as scar
from dask_scar.exceptions import DataError, NotFittedError
from dask_scar.local import fit_local, prepare_local
from dask_scar.segment import converged


def _objective(model, block, weights):
    c = model.contribution(0, block, {"weights": weights}, np)
    return c.loss / c.count + c.penalty


@pytest.mark.parametrize("model", [scar.SoftmaxRegression(l2=0.1), scar.LinearRegression(l2=0.1)])
def test_gradient_matches_finite_differences(model):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(rng.standard_normal((50, 4)), columns=list("abcd"))
    frame["t"] = rng.integers(0, 3, 50)
    block = prepare_local(model, frame, "t")
    block = {k: v.astype(np.float64) if k == "X" or model.target_dtype == "float32" else v for k, v in block.items()}
    w = rng.standard_normal(model.parameter_specs()["weights"].shape)
    c = model.contribution(0, block, {"weights": w}, np)
    grad = c.parts["weights"] / c.count
    grad[:4] += model.l2 * w[:4]
    numeric = np.zeros_like(w)
    for i in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[i] = 1e-6
        numeric[i] = (_objective(model, block, w + step) - _objective(model, block, w - step)) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", [scar.SoftmaxRegression(), scar.LinearRegression()])
def test_kernel_tiles_give_the_whole_block_result(digits, model):
    """The kernel's tiles (and the shorter last one) add up to the untiled computation."""
    import dask

    results = {}
    for tile in (100, len(digits)):      # 1797 rows: 17 tiles of 100 and one of 97, or one tile
        with dask.config.set({"scar.tile-rows": tile}):     # read where the model is set up
            block = prepare_local(model, digits, "label")
        w = np.random.default_rng(2).standard_normal(model.parameter_specs()["weights"].shape).astype(np.float32)
        results[tile] = model.contribution(0, block, {"weights": w}, np)
    tiled, whole = results.values()
    assert tiled.count == whole.count == len(digits)
    assert tiled.loss == pytest.approx(whole.loss, rel=1e-6)
    np.testing.assert_allclose(tiled.parts["weights"], whole.parts["weights"], rtol=1e-4, atol=1e-3)


def test_many_classes_take_shorter_tiles_with_the_same_result(digits, monkeypatch):
    """Softmax shortens its tiles where their temporaries would pass TILE_BYTES (here
    set to 80 rows' worth of digits' 10 classes), and the result is the same."""
    from dask_scar.models import _gradient

    model = scar.SoftmaxRegression()
    block = prepare_local(model, digits, "label")
    w = np.random.default_rng(2).standard_normal(model.parameter_specs()["weights"].shape).astype(np.float32)
    whole = model.contribution(0, block, {"weights": w}, np)
    monkeypatch.setattr(_gradient, "TILE_BYTES", 80 * 10 * 4 * 2)
    assert model._tile_rows(len(digits), np, row_bytes=10 * 4 * 2) == 80
    tiled = model.contribution(0, block, {"weights": w}, np)
    assert tiled.loss == pytest.approx(whole.loss, rel=1e-6)
    np.testing.assert_allclose(tiled.parts["weights"], whole.parts["weights"], rtol=1e-4, atol=1e-3)


def test_linear_regression_reaches_the_closed_form_ridge_solution():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 8))
    y = X @ rng.standard_normal(8) + 0.5 + 0.1 * rng.standard_normal(1000)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(8)]).assign(y=y)
    l2 = 0.05
    model = scar.LinearRegression(l2=l2, learning_rate=0.5, momentum=0.9)
    params, losses = fit_local(model, prepare_local(model, frame, "y"), max_iter=300)
    # ridge with an unpenalised intercept: (A^T A / n + l2 * D) w = A^T y / n
    A = np.c_[X, np.ones(len(X))]
    D = np.diag([1.0] * 8 + [0.0])
    exact = np.linalg.solve(A.T @ A / len(X) + l2 * D, A.T @ y / len(X))
    np.testing.assert_allclose(params["weights"][:, 0], exact, atol=1e-5)
    assert losses[-1] < losses[0]


def test_softmax_regression_matches_scikit_learn_loss(digits):
    from sklearn.linear_model import LogisticRegression

    l2 = 1e-3
    model = scar.SoftmaxRegression(l2=l2, learning_rate=0.5, momentum=0.9)
    block = prepare_local(model, digits, "label")
    model.params_, losses = fit_local(model, block, max_iter=1500)
    X, y = digits.drop(columns="label").to_numpy(np.float64), digits["label"].to_numpy()
    reference = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(X, y)
    p = reference.predict_proba(X)
    sk_loss = -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * l2 * (reference.coef_ ** 2).sum()
    assert abs(losses[-1] - sk_loss) < 1e-3
    assert losses[-1] >= sk_loss - 1e-6  # sklearn's optimum is the true minimum
    # the fitted attributes are shaped as scikit-learn's, and near its values
    assert model.coef_.shape == reference.coef_.shape and model.intercept_.shape == reference.intercept_.shape
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=0.05)


def _sklearn_loss(digits, l2):
    from sklearn.linear_model import LogisticRegression

    X, y = digits.drop(columns="label").to_numpy(np.float64), digits["label"].to_numpy()
    reference = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(X, y)
    p = reference.predict_proba(X)
    return -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * l2 * (reference.coef_ ** 2).sum()


def test_lbfgs_reaches_scikit_learns_optimum_in_far_fewer_iterations(digits):
    l2 = 1e-3
    target = _sklearn_loss(digits, l2) + 1e-3
    reached = {}
    for solver, momentum in (("gd", 0.9), ("lbfgs", 0.0)):
        model = scar.SoftmaxRegression(l2=l2, momentum=momentum, solver=solver)
        params, losses = fit_local(model, prepare_local(model, digits, "label"), max_iter=150)
        reached[solver] = next((k + 1 for k, loss in enumerate(losses) if loss <= target), None)
        model.params_ = params
    assert reached["lbfgs"] is not None and reached["lbfgs"] <= 60     # measured: 45
    assert reached["gd"] is None                                       # Nesterov: 359
    # the fitted weights are the last accepted point, whose loss was measured
    block = prepare_local(model, digits, "label")
    assert _objective(model, block, params["weights"]) <= min(losses) + 1e-9


def test_lbfgs_reaches_the_closed_form_ridge_solution():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 8)) * np.linspace(0.2, 5, 8)     # badly scaled on purpose
    y = X @ rng.standard_normal(8) + 0.5 + 0.1 * rng.standard_normal(1000)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(8)]).assign(y=y)
    l2 = 0.05
    model = scar.LinearRegression(l2=l2, learning_rate=0.01, solver="lbfgs")
    params, _ = fit_local(model, prepare_local(model, frame, "y"), max_iter=40)
    A = np.c_[X, np.ones(len(X))]
    exact = np.linalg.solve(A.T @ A / len(X) + l2 * np.diag([1.0] * 8 + [0.0]), A.T @ y / len(X))
    np.testing.assert_allclose(params["weights"][:, 0], exact, atol=1e-4)


def test_lbfgs_restarts_when_the_chunks_disagree(digits):
    """A recovery that restores some chunks from the store leaves them without the
    optimizer's memory: the next update starts L-BFGS afresh from the current point
    instead of mixing memories of different points."""
    from dask_scar.chunks import ChunkId

    model = scar.SoftmaxRegression(l2=1e-3, solver="lbfgs")
    block = prepare_local(model, digits, "label")
    rows = model.parameter_specs()["weights"].shape[0]
    ids = [ChunkId("weights", 0, 0, 30), ChunkId("weights", 1, 30, rows)]
    states = {c: model.new_state("weights", model.init_rows("weights", c.start, c.stop)) for c in ids}

    def step(states):
        w = np.concatenate([states[c]["value"] for c in ids])
        out = model.contribution(0, block, {"weights": w}, np)
        totals = {c: model.combine("weights", [out.parts["weights"]], c.start, c.stop, np) for c in ids}
        return model.update_chunks(states, totals, out.count, out.loss / out.count + out.penalty, np)

    for _ in range(6):
        states = step(states)
    assert states[ids[0]]["lbfgs"]["sy"] and states[ids[0]]["lbfgs"]["step"] == 6
    states[ids[1]] = model.new_state("weights", states[ids[1]]["value"])   # restored: no memory
    after = step(states)
    meta = after[ids[0]]["lbfgs"]
    assert meta["step"] == 1 and meta["sy"] == () and meta["t"] == model.learning_rate
    assert after[ids[1]]["lbfgs"] is meta or after[ids[1]]["lbfgs"] == meta


def test_als_recovers_a_noise_free_rank_5_matrix():
    frame, R = low_rank_ratings()
    model = scar.MatrixFactorization(rank=5, l2=1e-6)
    params, losses = fit_local(model, prepare_local(model, frame), max_iter=100)
    model.params_ = params
    full = params["user_factors"] @ params["item_factors"].T
    assert np.sqrt(((full - R)[frame["user"], frame["item"]] ** 2).mean()) < 1e-3
    assert model.rmse(frame) < 1e-3
    assert np.sqrt(((full - R) ** 2).mean()) < 1e-2  # unobserved entries too
    # fitted on ratings named otherwise: scored on that column
    stars = frame.rename(columns={"rating": "stars"})
    model.params_, _ = fit_local(model, prepare_local(model, stars, "stars"), max_iter=100)
    assert model.rmse(stars) < 1e-3 and model.score(stars) > 0.99


def test_als_rows_solve_their_own_equations_from_any_blocks_and_chunks():
    """Each user's row is the ridge solution of that user's ratings, whether the ratings
    come in one block or three and the rows in one chunk or three; a user without
    ratings gets 0, one with many (40) and ones with one or two are solved alike."""
    rng = np.random.default_rng(3)
    users = rng.integers(0, 60, 700)
    users[users == 7] = 8
    users[:40], users[-1] = 3, 59
    frame = pd.DataFrame({"user": users, "item": rng.integers(0, 30, 700), "rating": rng.standard_normal(700)})
    model = scar.MatrixFactorization(rank=3, l2=0.2)
    block = prepare_local(model, frame)
    params = {"user_factors": np.zeros((60, 3), np.float32),
              "item_factors": rng.standard_normal((30, 3)).astype(np.float32)}

    def update(blocks, bounds):
        parts = [model.contribution(0, b, params, np).parts["user_factors"] for b in blocks]
        return np.concatenate([model.update("user_factors", None, model.combine("user_factors", parts, a, z, np),
                                            0, a, z, np)["value"] for a, z in bounds])

    expected = np.zeros((60, 3))
    for u in range(60):
        mine = block["X"][:, 0] == u
        F = params["item_factors"][block["X"][mine, 1]].astype(np.float64)
        expected[u] = np.linalg.solve(F.T @ F + (0.2 + 1e-9) * np.eye(3), F.T @ block["y"][mine])
    thirds = [{k: v[s] for k, v in block.items()} for s in (slice(0, 250), slice(250, 500), slice(500, None))]
    np.testing.assert_allclose(update([block], [(0, 60)]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(update(thirds, [(0, 8), (8, 41), (41, 60)]), expected, rtol=1e-5, atol=1e-6)
    assert not expected[7].any() and expected[3].any()


@pytest.mark.parametrize("most", [3, 65536])
def test_als_batched_normal_equations_equal_the_row_by_row_sums(most):
    """Rows grouped by how many each id has, ``most`` at a time, give what adding every
    row's outer product in place (the GPU's way) gives."""
    from dask_scar.models.factorization import _normal_equations, _normal_equations_scattered

    rng = np.random.default_rng(4)
    ids = rng.integers(0, 50, 400)
    ids[:30] = 5
    factors, ratings = rng.standard_normal((400, 4)).astype(np.float32), rng.standard_normal(400).astype(np.float32)
    for got, want in zip(_normal_equations(ids, factors, ratings, np, most=most),
                         _normal_equations_scattered(ids, factors, ratings, np)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_init_does_not_depend_on_chunking():
    frame, _ = low_rank_ratings(n_users=3000, n_items=40)
    model = scar.MatrixFactorization(rank=4)
    prepare_local(model, frame)
    whole = model.init_rows("user_factors", 0, 3000)
    pieces = [model.init_rows("user_factors", a, b) for a, b in [(0, 700), (700, 2049), (2049, 3000)]]
    np.testing.assert_array_equal(whole, np.concatenate(pieces))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_chunked_update_equals_whole_update(digits, momentum):
    model = scar.SoftmaxRegression(l2=0.01, momentum=momentum)
    block = prepare_local(model, digits, "label")
    rows = model.parameter_specs()["weights"].shape[0]
    w = np.random.default_rng(0).standard_normal((rows, 10)).astype(np.float32)
    c = model.contribution(0, block, {"weights": w}, np)
    state = model.new_state("weights", w)
    whole = model.update("weights", state, model.combine("weights", [c.parts["weights"]], 0, rows, np),
                         c.count, 0, rows, np)
    for a, b in [(0, 30), (30, 64), (64, rows)]:
        part = model.update("weights", {k: v[a:b] for k, v in state.items()},
                            model.combine("weights", [c.parts["weights"]], a, b, np), c.count, a, b, np)
        np.testing.assert_array_equal(part["value"], whole["value"][a:b])


@pytest.mark.parametrize("labels, message", [
    ([0, 1, -1, 2], "negative values"),
    ([0, 1, 1.5, 2], "non-integer values"),
    ([0, 1, 3.0000000000000004, 2], r"non-integer values \(min 0, max 3.0000000000000004\)"),   # round-off
    ([3, 3, 3, 3], "single class"),
])
def test_bad_class_labels_are_named(labels, message):
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "label": labels})
    with pytest.raises(DataError, match=f"'label'.*{message}|{message}"):
        prepare_local(scar.SoftmaxRegression(), frame, "label")


@pytest.mark.parametrize("model, frame, message", [
    # one stray label or id would size the model by itself: 40 GB of weights here
    (scar.SoftmaxRegression(), pd.DataFrame({"a": [0.0, 1.0, 2.0], "label": [0, 1, 10**7]}),
     r"'label' holds class labels up to 10,000,000: the model would need 10,000,001 of them for 3 rows"),
    (scar.MatrixFactorization(rank=2), pd.DataFrame({"user": [0, 1, 2**40], "item": [0, 1, 2], "rating": 1.0}),
     r"'user' holds ids up to 1,099,511,627,776"),
    (scar.SoftmaxRegression(), pd.DataFrame({"a": [0.0, 1.0], "label": ["cat", "dog"]}),
     r"target column 'label' \((object|str|string)\) is not numeric: encode the classes as integers 0, 1, 2"),
    (scar.LinearRegression(), pd.DataFrame({"a": [0.0, 1.0], "y": [1 + 1j, 2.0]}),
     r"target column 'y' \(complex128\) is not numeric: convert it to numbers"),
    (scar.LinearRegression(), pd.DataFrame({"a": [0.0, 1.0], "z": [1 + 1j, 2.0], "y": 1.0}),
     r"column\(s\) 'z' \(complex128\) are not numeric"),
    (scar.LinearRegression(), pd.DataFrame([[0.0, 1.0, 2.0]], columns=["a", "a", "y"]),
     "more than one column named 'a'"),
])
def test_unusable_columns_are_named_with_a_fix(model, frame, message):
    target = "y" if isinstance(model, scar.LinearRegression) else "label"
    with pytest.raises(DataError, match=message):
        prepare_local(model, frame, None if isinstance(model, scar.MatrixFactorization) else target)


@pytest.mark.parametrize("model, frame", [
    (scar.MatrixFactorization(rank=2), pd.DataFrame({"user": pd.Categorical([0, 1, 2]), "item": [0, 1, 2],
                                                     "rating": 1.0})),
    (scar.LDA(n_topics=2), pd.DataFrame({"doc": [0, 0, 1], "word": ["a", "b", "a"], "count": 1})),
])
def test_ids_that_are_not_numbers_get_advice_for_ids(model, frame):
    """Id columns cannot be left out or one-hot encoded: they are to become 0, 1, 2, ..."""
    with pytest.raises(DataError, match=rf"are not numeric; {type(model).__name__} reads integer ids 0, 1, 2, "
                                        r"\.\.\.: encode them \(column\.cat\.codes .*pandas\.factorize") as caught:
        prepare_local(model, frame)
    assert "get_dummies" not in str(caught.value) and "features=" not in str(caught.value)


@pytest.mark.parametrize("model, frame, target, message", [
    (scar.SoftmaxRegression(), pd.DataFrame({"a": np.arange(30.0), "label": [0, 1] * 14 + [0, 500]}), "label",
     "column 'label' holds class labels up to 500: the model trains 501 of them for 30 rows. Encode the column"),
    (scar.MatrixFactorization(rank=2), pd.DataFrame({"user": [0, 1, 40], "item": [0, 1, 2], "rating": 1.0}), None,
     "column 'user' holds ids up to 40: the model trains 41 of them for 3 rows"),
])
def test_sparse_labels_or_ids_are_warned_of(model, frame, target, message):
    """Under the size that is refused, labels or ids more than ten times the rows (one
    stray value) are trained, and said."""
    with pytest.warns(scar.DataWarning, match=re.escape(message)):
        prepare_local(model, frame, target)


def test_every_warning_dask_scar_gives_has_a_category_of_its_own():
    """A pipeline filters dask_scar's warnings by category (their stacklevel points them
    at the caller's file, so a module= filter cannot): every warnings.warn in the package
    names a ScarWarning subclass."""
    import ast
    from pathlib import Path

    categories = {}
    for path in Path(scar.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn":
                category = node.args[1] if len(node.args) > 1 else None
                categories[f"{path.name}:{node.lineno}"] = ast.unparse(category) if category is not None else None
    assert len(categories) >= 10
    assert {name: c for name, c in categories.items()
            if not (c and issubclass(getattr(scar, c, type(None)), scar.ScarWarning))} == {}
    assert issubclass(scar.ScarWarning, UserWarning) and scar.CheckpointWarning.__mro__[1] is scar.ScarWarning


def test_unscaled_features_are_warned_of(digits):
    """A column far from zero (a year, an income) makes L-BFGS stop near the initial
    loss with converged=True: the warning names it; digits' pixels (0..16) pass."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 3))
    y = (X @ rng.normal(size=(3, 3)) + rng.gumbel(size=(400, 3))).argmax(1)
    frame = pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "year": 2000 + X[:, 2], "label": y})
    model = scar.SoftmaxRegression(solver="lbfgs")
    with pytest.warns(UserWarning, match=r"feature column\(s\) 'year' \(up to 2e\+03\) lie far from zero.*"
                                         r"Scale the features first"):
        block = prepare_local(model, frame, "label")

    def stopped_at(block):      # the loss where a fit with tol=1e-6 stops
        _, losses = fit_local(model, block, 60)
        return next(b for a, b in zip(losses, losses[1:]) if converged(a, b, 1e-6))

    initial = np.log(3)
    assert stopped_at(block) > 0.99 * initial   # what the warning is for
    frame["year"] -= 2000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_local(scar.SoftmaxRegression(), digits, "label")
        assert stopped_at(prepare_local(model, frame, "label")) < 0.8 * initial


def test_a_target_among_the_features_is_refused():
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0], "label": [0, 1, 1]})
    with pytest.raises(DataError, match="the target column 'label' is also in features="):
        prepare_local(scar.SoftmaxRegression(), frame, "label", ["a", "label"])
    ratings, _ = low_rank_ratings()
    with pytest.raises(DataError, match=r"MatrixFactorization would read column 'user' as user and as the target: "
                                        r"it reads user='user' and item='item', and the target 'user'; give each"):
        prepare_local(scar.MatrixFactorization(rank=2), ratings, "user")
    with pytest.raises(DataError, match="MatrixFactorization would read column 'item' as user and as item"):
        prepare_local(scar.MatrixFactorization(rank=2, user="item"), ratings)


def test_a_column_named_twice_is_refused_only_where_the_fit_reads_it():
    frame = pd.DataFrame([[0.0, 1.0, 2.0, 3.0, 1], [4.0, 5.0, 6.0, 7.0, 0]], columns=["a", "b", "note", "note",
                                                                                     "label"])
    with pytest.raises(DataError, match="the data has more than one column named 'note': rename them"):
        prepare_local(scar.SoftmaxRegression(), frame, "label")
    block = prepare_local(scar.SoftmaxRegression(), frame, "label", ["a", "b"])
    np.testing.assert_array_equal(block["X"], [[0.0, 1.0], [4.0, 5.0]])


def test_target_and_features_must_name_columns():
    """Labels held apart are no target=, and a Series no list of features: said, with
    what to do, before anything is read."""
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0], "label": [0, 1, 1]})
    for target in (frame["label"], dd.from_pandas(frame, npartitions=1)["label"], ["label"]):
        with pytest.raises(DataError, match=r"target= must be one column name of the frame, got (Series|list): "
                                            r"to train on labels held apart, add them as a column \(ddf.assign"):
            prepare_local(scar.SoftmaxRegression(), frame, target)
    for features in (frame["a"], [["a"]], 5):
        with pytest.raises(DataError, match=r"features= must be a list of column names of the frame \(features="):
            prepare_local(scar.SoftmaxRegression(), frame, "label", features)


def test_score_reads_any_column_name_that_fit_accepts(digits):
    """A target that names a column (a number, a tuple) is that column, for score as for
    fit; labels are a Series, an array or a list; None is the model's own column."""
    numbered = digits.set_axis(range(digits.shape[1]), axis=1)     # as a frame made from a NumPy array
    tupled = digits.set_axis(pd.MultiIndex.from_tuples([("x", c) for c in digits.columns[:-1]] + [("t", "y")]),
                             axis=1)
    for frame, target in ((numbered, 64), (tupled, ("t", "y"))):
        model = scar.SoftmaxRegression()
        model.params_, _ = fit_local(model, prepare_local(model, frame, target), max_iter=5)
        accuracy = (model.predict(frame) == digits["label"]).mean()
        assert 0.5 < accuracy < 1
        assert model.score(frame, target) == accuracy
        assert model.score(frame, tuple(digits["label"])) == accuracy     # labels, not a column name
        if frame is numbered:    # Dask cannot select a column by a tuple
            assert model.score(dd.from_pandas(frame, npartitions=2), target) == accuracy
    with pytest.raises(DataError, match=r"column\(s\) \[70\] not in the data; available columns: \[0, 1, "):
        model.score(numbered, 70)
    ratings, _ = low_rank_ratings()
    ratings = ratings.rename(columns={"rating": 0})
    model = scar.MatrixFactorization(rank=5, rating=0)
    model.params_, _ = fit_local(model, prepare_local(model, ratings), max_iter=5)
    r2 = model.score(ratings)
    assert 0.5 < r2 < 1
    assert model.score(ratings, ratings[0]) == model.score(ratings, 0) == model.score(ratings, list(ratings[0])) == r2
    assert model.rmse(ratings, ratings[0].to_numpy()) == model.rmse(ratings)


def test_predictions_check_their_columns_and_values(digits):
    model = scar.SoftmaxRegression()
    model.params_, _ = fit_local(model, prepare_local(model, digits, "label"), max_iter=5)
    with pytest.raises(DataError, match=r"column\(s\) \['p3'\] not in the data: the model was fitted on "
                                        r"\[.*\]; the data has \['p0', 'p1', 'p2', 'p4', .*, 'p20'\] and 44 more$"):
        model.predict(dd.from_pandas(digits.drop(columns="p3"), npartitions=2))     # before any computing
    text = digits.head(5).assign(p5="a")
    for data in (text, dd.from_pandas(text, npartitions=2)):     # the Dask frame: before any computing
        with pytest.raises(DataError, match=r"column\(s\) 'p5' \((object|str|string)\) are not numeric; the model "
                                            "was fitted on numbers"):
            model.predict(data)
    holes = digits.head(5).copy()
    holes.loc[2, "p7"] = np.nan
    with pytest.raises(DataError, match=r"NaN/inf values \(or values beyond float32's range\) in column\(s\) "
                                        r"\['p7'\]"):
        model.predict(holes)
    holes.loc[2, "p7"] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # (no NumPy overflow warning on the way)
        for data in (holes, dd.from_pandas(holes, npartitions=1)):
            with pytest.raises(DataError, match=r"values beyond float32's range\) in column\(s\) \['p7'\]"):
                model.predict(data).compute() if hasattr(data, "compute") else model.predict(data)
    with pytest.raises(DataError, match=r"the data to predict on must be numbers \(could not convert string to "
                                        r"float: .*'1.5x'.*\): the model was fitted on 64 numeric columns"):
        model.predict(np.full((2, 64), "1.5x"))
    with pytest.raises(DataError, match="expected the 64 feature column\\(s\\) as a frame, got a Dask Series"):
        model.predict(dd.from_pandas(digits, npartitions=2)["p0"])
    # a lazy prediction declares what it computes
    lazy = dd.from_pandas(digits, npartitions=2)
    assert model.predict(lazy).dtype == model.predict(lazy).compute().dtype == np.int64
    assert (model.predict_proba(lazy).dtypes == np.float32).all()
    assert model.predict_proba(lazy).compute().dtypes.eq(np.float32).all()
    # labels in memory against lazy predictions
    assert model.score(lazy, digits["label"].to_numpy()) == pytest.approx(model.score(digits, "label"))
    with pytest.raises(DataError, match=r"column\(s\) \['Label'\] not in the data; available columns: \['p0', "):
        model.score(digits, "Label")


def test_duplicated_columns_are_refused_at_predict_and_score_as_in_training(digits):
    model = scar.SoftmaxRegression()
    model.params_, _ = fit_local(model, prepare_local(model, digits, "label"), max_iter=2)
    twice = "the data has more than one column named '{}': rename them"
    for column in ("p1", "label"):
        frame = pd.concat([digits, digits[[column]]], axis=1)
        with pytest.raises(DataError, match=twice.format(column)):
            model.score(frame, "label")
        if column != "label":
            for data in (frame, dd.from_pandas(frame, npartitions=2)):
                with pytest.raises(DataError, match=twice.format(column)):
                    model.predict(data)
    ratings, _ = low_rank_ratings()
    factorization = scar.MatrixFactorization(rank=2)
    factorization.params_, _ = fit_local(factorization, prepare_local(factorization, ratings), max_iter=1)
    with pytest.raises(DataError, match=twice.format("item")):
        factorization.predict(pd.concat([ratings, ratings[["item"]]], axis=1))


def test_a_lazy_prediction_keeps_the_model_it_was_made_with(digits):
    """A refit (other columns, other labels, fewer ids) before a lazy prediction is
    computed does not change it."""
    lazy = dd.from_pandas(digits, npartitions=2)
    model = scar.SoftmaxRegression()
    model.params_, _ = fit_local(model, prepare_local(model, digits, "label"), max_iter=5)
    made = model.predict(lazy), model.predict_proba(lazy)
    expected = model.predict(digits), model.predict_proba(digits)
    other = digits[["p20", "p30", "p40", "label"]].assign(label=9 - digits["label"])
    model.params_, _ = fit_local(model, prepare_local(model, other, "label"), max_iter=5)
    predicted, probabilities, now = dask.compute(*made, model.predict(lazy))
    np.testing.assert_array_equal(predicted, expected[0])
    # to float32 rounding: a partition's rows and all rows may take different BLAS kernels
    np.testing.assert_allclose(probabilities, expected[1], rtol=1e-6)
    np.testing.assert_array_equal(now, model.predict(other))

    ratings, _ = low_rank_ratings()
    factorization = scar.MatrixFactorization(rank=5)
    factorization.params_, _ = fit_local(factorization, prepare_local(factorization, ratings), max_iter=2)
    made = factorization.predict(dd.from_pandas(ratings, npartitions=2))
    expected = factorization.predict(ratings)
    fewer = ratings[ratings["user"] < 10]
    factorization.params_, _ = fit_local(factorization, prepare_local(factorization, fewer), max_iter=2)
    np.testing.assert_allclose(made.compute(), expected, rtol=1e-6)


def test_scores_check_their_labels(digits):
    """A label that is no class (NaN, a label the model never saw) would count as a
    wrong prediction, and text as every one wrong: refused, for lazy data too."""
    model = scar.SoftmaxRegression()
    model.params_, _ = fit_local(model, prepare_local(model, digits, "label"), max_iter=5)
    holes = digits.assign(label=digits["label"].where(digits.index % 2 == 0))
    for data in (holes, dd.from_pandas(holes, npartitions=3)):
        with pytest.raises(DataError, match=r"the target column 'label': 898 of 1,797 values are not class labels "
                                            r"0\.\.9 \(NaN, inf or out of range\); drop or fix those rows"):
            model.score(data, "label")
    with pytest.raises(DataError, match="the labels: 180 of 1,797 values are not class labels 0..9"):
        model.score(digits, digits["label"] + 1)         # 1-based: the 9s become 10s
    with pytest.raises(DataError, match=r"the labels \((object|str|string)\): score needs class labels 0..9"):
        model.score(digits, digits["label"].astype(str))
    with pytest.raises(DataError, match="no rows to score"):
        model.score(digits.head(0), "label")
    assert model.score(digits, pd.array(digits["label"], dtype="Int64")) == model.score(digits, "label")
    lazy = dd.from_pandas(digits, npartitions=3)
    for data, labels in ((digits, digits[["label"]]), (lazy, lazy[["label"]]), (digits, digits[["label"]].to_numpy())):
        with pytest.raises(DataError, match=r"the labels must be one column \(a Series, or a 1-d array\), got "
                                            r"\w+ of 2 dimensions: pass the column itself \(df\['label'\]\)"):
            model.score(data, labels)


def test_dask_labels_are_scored_partition_by_partition_with_the_data():
    """Dask labels go with the data's rows in order, partition by partition, as labels
    in memory go in order, whatever their index; labels that do not line up are refused."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((400, 3)), columns=["a", "b", "c"])
    frame["y"] = frame @ [2.0, 1.0, -1.0] + 0.1 * rng.standard_normal(400)
    model = scar.LinearRegression(learning_rate=0.3)
    model.params_, _ = fit_local(model, prepare_local(model, frame, "y"), max_iter=50)
    whole = model.score(frame, "y")
    assert 0.9 < whole < 1
    data = dd.from_pandas(frame, npartitions=4)
    shifted = dd.from_pandas(frame["y"].set_axis(frame.index + 1000), npartitions=4)
    for labels in (data["y"], data["y"].reset_index(drop=True), shifted):
        assert model.score(data, labels) == pytest.approx(whole)
    fix = r"pass the target's column name \(score\(ddf, 'label'\)\), or labels with the same partitions as the data"
    with pytest.raises(DataError, match=f"a partition of the data has 100 rows, its labels 50: {fix}"):
        model.score(data, dd.from_pandas(frame["y"].iloc[:200], npartitions=4))
    with pytest.raises(DataError, match=f"the labels have 1 partitions, the data 4: {fix}"):
        model.score(data, dd.from_pandas(frame["y"], npartitions=1))


def test_a_parquet_dataset_of_several_files_is_scored_by_its_target_column_name(tmp_path, digits):
    """Dask reads one column of a Parquet dataset of small files into fewer partitions
    than the whole frame. The target's name scores anyway (the predictions and the
    column come from the same tasks); the column itself is refused with that advice."""
    model = scar.SoftmaxRegression()
    model.params_, _ = fit_local(model, prepare_local(model, digits, "label"), max_iter=20)
    dd.from_pandas(digits, npartitions=4).to_parquet(tmp_path / "digits")
    data = dd.read_parquet(tmp_path / "digits")
    assert (data.npartitions, data["label"].optimize().npartitions) == (4, 2)     # what this test is about
    assert model.score(data, "label") == model.score(digits, "label") > 0.9
    with pytest.raises(DataError, match=r"the labels have 2 partitions, the data 4: pass the target's column name "
                                        r".*a column of a Parquet dataset into fewer partitions"):
        model.score(data, data["label"])


def test_an_infinite_label_raises_without_a_numpy_warning(digits):
    """R^2 of an infinite label divides inf by inf: the labels are checked before that
    division, for lazy data too, so the DataError comes alone."""
    model = scar.LinearRegression()
    model.params_, _ = fit_local(model, prepare_local(model, digits, "label"), max_iter=5)
    infinite = digits.assign(label=digits["label"].astype(float).where(digits.index != 3, np.inf))
    for data in (infinite, dd.from_pandas(infinite, npartitions=2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(DataError, match="the target column 'label': 1 of 1,797 values are not finite numbers"):
                model.score(data, "label")
        assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []



def test_r2_of_a_constant_target_is_finite_as_scikit_learns():
    """No spread to explain: 1.0 for perfect predictions, else 0.0 (scikit-learn's
    r2_score, force_finite=True), for pandas and Dask data, in both R^2 models."""
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "y": 3.0})
    model = scar.LinearRegression()
    prepare_local(model, frame, "y")
    ratings = pd.DataFrame({"user": [0, 1, 0, 1], "item": [0, 0, 1, 1], "rating": 3.0})
    factorization = scar.MatrixFactorization(rank=1)
    prepare_local(factorization, ratings)
    for intercept, r2 in [(3.0, 1.0), (2.0, 0.0)]:
        model.params_ = {"weights": np.array([[0.0], [intercept]], dtype=np.float32)}
        factorization.params_ = {"user_factors": np.ones((2, 1), np.float32),
                                 "item_factors": np.full((2, 1), intercept, np.float32)}
        for data in (frame, dd.from_pandas(frame, npartitions=2)):
            assert model.score(data, "y") == r2
        for data in (ratings, dd.from_pandas(ratings, npartitions=2)):
            assert factorization.score(data) == r2

def test_factorization_predictions_refuse_fractional_and_unknown_ids():
    frame, _ = low_rank_ratings()
    model = scar.MatrixFactorization(rank=5)
    model.params_, _ = fit_local(model, prepare_local(model, frame), max_iter=2)
    for bad in (frame.assign(user=frame["user"] + 0.5), frame.assign(item=frame["item"] + 1000),
                frame.assign(user=frame["user"].astype("Int64").where(frame.index > 0, pd.NA))):
        with pytest.raises(DataError, match="must hold integer ids in the fitted range"):
            model.predict(bad)
    with pytest.raises(DataError, match=r"column\(s\) 'item' \((object|str|string)\) are not numeric; user and item"):
        model.predict(frame.assign(item=frame["item"].astype(str)))
    with pytest.raises(DataError, match="MatrixFactorization.predict needs a DataFrame with the columns "
                                        "user='user' and item='item', got ndarray"):
        model.predict(frame[["user", "item"]].to_numpy())


def test_bad_ids_for_factorization_are_named():
    frame = pd.DataFrame({"user": [0, 1, -2], "item": [0, 1, 2], "rating": [1.0, 2.0, 3.0]})
    with pytest.raises(DataError, match=r"'user' must hold ids 0, 1, 2, \.\.\.; found negative values"):
        prepare_local(scar.MatrixFactorization(rank=2), frame)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": 0}, "learning_rate must be a finite number > 0, got 0"),
    ({"learning_rate": "0.1"}, "learning_rate must be a finite number > 0, got '0.1'"),
    ({"momentum": 1.0}, "momentum must be a finite number >= 0 and < 1, got 1.0"),
    ({"l2": -1}, "l2 must be a finite number >= 0, got -1"),
    ({"l2": float("inf")}, "l2 must be a finite number >= 0, got inf"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0, got inf"),
    ({"random_state": -1}, "random_state must be an integer >= 0, got -1"),
    ({"random_state": "x"}, "random_state must be an integer >= 0, got 'x'"),
    ({"batch_size": 0}, "batch_size"),
    ({"solver": "newton"}, "solver must be one of"),
    ({"solver": "lbfgs", "batch_size": 100}, "solver='lbfgs' needs the whole data"),
    ({"solver": "lbfgs", "momentum": 0.9}, "momentum applies to solver='gd' only"),
    ({"solver": "lbfgs", "memory": 0}, r"memory \(L-BFGS correction pairs\) must be an integer >= 1, got 0"),
])
def test_bad_hyperparameters_are_refused(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_local(scar.SoftmaxRegression(**kwargs), digits, "label")


@pytest.mark.parametrize("model", [scar.MatrixFactorization(random_state=1.5), scar.LDA(random_state=-3)])
def test_every_model_checks_its_random_state(model):
    with pytest.raises(ValueError, match="random_state must be an integer >= 0"):
        model.check_params()


def test_predict_before_fit_raises():
    with pytest.raises(NotFittedError, match="not fitted"):
        scar.SoftmaxRegression().predict(np.zeros((2, 3)))
    with pytest.raises(NotFittedError, match="SoftmaxRegression is not fitted yet: call Trainer"):
        scar.SoftmaxRegression().predict_proba(pd.DataFrame({"a": [0.1, 0.2]}))


def test_minibatch_sgd_decreases_the_loss(digits):
    model = scar.SoftmaxRegression(l2=1e-4, learning_rate=0.5, batch_size=256)
    _, losses = fit_local(model, prepare_local(model, digits, "label"), max_iter=200)
    assert np.mean(losses[-20:]) < 0.5 * losses[0]


def test_get_params_round_trips():
    model = scar.MatrixFactorization(rank=3, l2=0.5, user="u")
    assert model.get_params()["rank"] == 3
    assert type(model)(**model.get_params()).get_params() == model.get_params()
    assert repr(model).startswith("MatrixFactorization(rank=3")
    # hyper-parameters from a NumPy grid: a checkpoint store records them as JSON
    params = scar.SoftmaxRegression(batch_size=np.int64(500), l2=np.float32(0.5)).get_params()
    assert json.loads(json.dumps(params))["batch_size"] == 500 and params["l2"] == 0.5


def test_models_clone_and_set_params_as_scikit_learn_does():
    from sklearn.base import clone

    model = scar.SoftmaxRegression(l2=0.5, solver="lbfgs")
    copy = clone(model)
    assert copy is not model and type(copy) is scar.SoftmaxRegression and copy.get_params() == model.get_params()
    assert model.set_params(l2=0.25, memory=4) is model and (model.l2, model.memory) == (0.25, 4)
    with pytest.raises(ValueError, match="momentum applies to solver='gd' only"):
        model.set_params(momentum=0.9)
    with pytest.raises(ValueError, match=r"SoftmaxRegression has no parameter 'alpha': it takes l2, learning_rate"):
        model.set_params(alpha=1.0)
    assert model.momentum == 0.0 and model.get_params() == {**copy.get_params(), "l2": 0.25, "memory": 4}
