"""Checkpointing while training, on real multi-process clusters and real stores on disk."""

import importlib.util
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import committed, wait_for
from distributed import Client, LocalCluster

import dask_scar as scar
from dask_scar.cli import main
from dask_scar.local import fit_local, prepare_local
from dask_scar.store import ZarrStore, make_layouts


def synthetic(n_rows=2000, n_features=127, n_classes=10, seed=0) -> pd.DataFrame:
    """128 weight rows with the intercept: 32 blocks of 4 rows on 4 chunks."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_rows, n_features)).astype(np.float32)
    y = (X @ rng.standard_normal((n_features, n_classes))).argmax(axis=1)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(n_features)])
    frame["label"] = y
    return frame


def chunk_files(store_path, slot: int) -> int:
    """Bytes of the parameter blocks in one slot of a store on disk."""
    root = os.path.join(store_path, "params")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
               if f != "zarr.json" and os.path.relpath(d, root).split(os.sep)[2:3] == [str(slot)])


def test_prioritized_rounds_write_the_blocks_that_moved_most(client, digits, tmp_path):
    model = scar.SoftmaxRegression(momentum=0.9)
    # the paper's priority: distance from the saved value (by default, from where an
    # extrapolated restore would put the block: see the test below)
    with dask.config.set({"scar.recovery.extrapolate": False}):
        result = scar.Trainer(client, model, store=tmp_path / "ckpt.zarr",
                              policy=scar.PrioritizedCheckpoint(0.25, every=3)).fit(
            digits, target="label", max_iter=60, tol=0, progress=False)

    # checkpointing does not change training
    reference = scar.SoftmaxRegression(momentum=0.9)
    _, losses = fit_local(reference, prepare_local(reference, digits, "label"), max_iter=60)
    np.testing.assert_allclose(result.history["loss"], losses, rtol=1e-5)

    rounds, end = result.checkpoints.iloc[:-1], result.checkpoints.iloc[-1]
    assert rounds["iteration"].tolist() == list(range(3, 61, 3)) and (result.checkpoints["error"] == "").all()
    by_iteration = result.history.set_index("iteration")
    at_rounds = by_iteration.loc[rounds["iteration"]]
    assert (at_rounds["checkpoint_bytes"] > 0).all() and (at_rounds["checkpoint_seconds"] > 0).all()
    summed = result.checkpoints.groupby("iteration")["bytes"].sum()     # (iteration 60: the last round, the end's)
    assert by_iteration.loc[summed.index, "checkpoint_bytes"].tolist() == summed.tolist()
    assert (result.checkpoints["seconds"] > 0).all()
    others = by_iteration.drop(index=result.checkpoints["iteration"])
    assert (others["checkpoint_bytes"] == 0).all() and (others["checkpoint_seconds"] == 0).all()
    for _, r in rounds.iterrows():   # every round wrote the 6 of 22 blocks with the largest priority
        chosen = np.zeros(22, bool)
        chosen[r["blocks"]] = True
        assert chosen.sum() == 6 and r["priorities"][chosen].min() >= r["priorities"][~chosen].max()
    # the fit's end wrote the other 16 blocks of iteration 60
    last = rounds.iloc[-1]
    assert end["iteration"] == 60 and sorted(end["blocks"]) == sorted(set(range(22)) - set(last["blocks"]))

    store = scar.open_store(tmp_path / "ckpt.zarr")
    assert store.manifest["round"] == 21 and store.manifest["iteration"] == 60
    # before the end, a mosaic of blocks from different rounds: the newest versions of
    # the last round's blocks, the versions before of the others
    in_last = np.isin(np.arange(22), last["blocks"])
    newest, before = store.records("weights"), store.records("weights", previous=True)
    mosaic = np.where(in_last, newest[:, 0], before[:, 0])
    assert len(set(mosaic)) >= 4, mosaic
    assert set(mosaic) <= set(range(3, 61, 3)) | {-1} and (newest[:, 0] == 60).all()

    # the priorities were the true distances from the last saved values
    final, stored = result.params["weights"], store.load()["weights"]
    np.testing.assert_array_equal(stored, final)
    previous = store.read_blocks("weights", list(range(22)), previous=True)
    initial = model.init_rows("weights", 0, 65)
    for block in range(22):
        rows = slice(*store.layouts["weights"].bounds(block))
        if not in_last[block]:
            saved_value = previous[block] if block in previous else initial[rows]
            np.testing.assert_allclose(last["priorities"][block], np.linalg.norm(final[rows] - saved_value),
                                       rtol=1e-4)


def test_a_round_writes_the_values_it_was_chosen_from(client, digits, tmp_path):
    """A round is chosen after iteration t and written while a later one runs (the
    graph after t's was submitted before t ended; after the last iteration, by a task
    of its own): what it writes is the values of t, kept by their owners."""
    result = scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / "ckpt.zarr",
                          policy=scar.PrioritizedCheckpoint(1.0, every=3)).fit(
        digits, target="label", max_iter=10, tol=0, progress=False)
    # (and the fit's end writes every block of 10)
    assert result.checkpoints["iteration"].tolist() == [3, 6, 9, 10] and (result.checkpoints["error"] == "").all()

    def local(iterations):
        model = scar.SoftmaxRegression()
        return fit_local(model, prepare_local(model, digits, "label"), max_iter=iterations)[0]["weights"]

    store = scar.open_store(tmp_path / "ckpt.zarr")
    blocks = list(range(store.layouts["weights"].n_blocks))
    assert (store.records("weights")[:, 0] == 10).all()
    assert (store.records("weights", previous=True)[:, 0] == 9).all()
    previous = np.concatenate([v for _, v in sorted(store.read_blocks("weights", blocks, previous=True).items())])
    at9, at10 = local(9), local(10)
    assert np.abs(at10 - at9).max() > 1e-3                  # a version off would show
    np.testing.assert_allclose(previous, at9, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(store.load()["weights"], at10, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.params["weights"], at10, rtol=1e-4, atol=1e-7)


def test_equal_byte_budget_full_vs_prioritized(client, tmp_path):
    frame = synthetic()
    per_iteration = {}
    for name, policy in [("full", scar.FullCheckpoint(every=8)), ("scar", scar.PrioritizedCheckpoint(0.25, every=2))]:
        result = scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.1), store=tmp_path / f"{name}.zarr",
                              policy=policy, n_chunks=4).fit(frame, target="label", max_iter=64, tol=0,
                                                             progress=False)
        rounds = result.checkpoints[~result.checkpoints["end"]]
        # a full round at 64 leaves nothing for the fit's end to write; a prioritized one 3/4
        assert len(rounds) == 64 // policy.every and result.checkpoints["end"].sum() == (name == "scar")
        per_iteration[name] = rounds["bytes"].sum() / 64
        if name == "full":   # a full round's bytes are the store's blocks on disk, in one slot
            last = 1 - len(result.checkpoints) % 2       # slots alternate, the first round in slot 0
            assert result.checkpoints["bytes"].iloc[-1] == chunk_files(tmp_path / "full.zarr", last)
    assert per_iteration["scar"] == pytest.approx(per_iteration["full"], rel=0.05)


def test_a_resume_checkpoints_with_the_stores_policy_unless_given_another(client, digits, tmp_path, monkeypatch):
    store = tmp_path / "ckpt.zarr"

    def fit(max_iter, **kwargs):
        return scar.Trainer(client, scar.SoftmaxRegression(), store=store, **kwargs).fit(
            digits, target="label", max_iter=max_iter, resume=max_iter > 8, tol=0, progress=False)

    first = fit(8, policy=scar.FullCheckpoint(every=4))
    every_block = first.checkpoints["blocks"].iloc[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = fit(12)      # no policy=: the store's, not the default PrioritizedCheckpoint(0.25, every=5)
    assert kept.checkpoints["iteration"].tolist() == [12] and kept.checkpoints["blocks"].tolist() == [every_block]
    assert scar.open_store(store).meta["policy"] == scar.FullCheckpoint(every=4).to_json()
    with pytest.warns(scar.CheckpointWarning, match=re.escape(
            "resuming with PrioritizedCheckpoint(fraction=0.5, every=2, reference_dtype=None); the store was "
            "written with FullCheckpoint(every=4). The store records the new policy once this fit has started")):
        other = fit(16, policy=scar.PrioritizedCheckpoint(0.5, every=2))
    assert other.checkpoints["iteration"].tolist() == [14, 16, 16]     # and the rest of 16's at the end
    half = round(len(every_block) / 2)
    assert [len(blocks) for blocks in other.checkpoints["blocks"]] == [half, half, len(every_block) - half]
    assert scar.open_store(store).meta["policy"] == scar.PrioritizedCheckpoint(0.5, every=2).to_json()
    monkeypatch.setenv("HOME", str(tmp_path))      # open_store expands ~ as the Trainer does
    assert scar.open_store("~/ckpt.zarr").meta == scar.open_store(store).meta


def test_store_for_another_model_or_corrupt_is_refused(client, digits, tmp_path):
    store = tmp_path / "ckpt.zarr"
    first = scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=3)).fit(
        digits, target="label", max_iter=6, progress=False)
    with pytest.warns(UserWarning, match="is at iteration 6, and max_iter=6: nothing to train") as said:
        again = scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(
            digits, target="label", max_iter=6, resume=True, progress=False)
    assert {w.filename for w in said} == {__file__}       # the warnings point at the fit() call
    assert again.n_iter == 6 and len(again.history) == 0
    np.testing.assert_array_equal(again.params["weights"], first.params["weights"])
    # other hyperparameters: said, and recorded, so that the store tells what trained it last
    with pytest.warns(scar.CheckpointWarning, match=r"resuming with l2=0\.001; the store was written with "
                                                    r"l2=0\.0001\. The store records the new values once this fit "
                                                    r"has started") as said:
        scar.Trainer(client, scar.SoftmaxRegression(l2=1e-3), store=store, policy=scar.FullCheckpoint(every=3)).fit(
            digits, target="label", max_iter=9, resume=True, progress=False)
    assert {w.filename for w in said} == {__file__}
    meta = scar.open_store(store).meta
    assert meta["model"]["params"]["l2"] == 1e-3 and meta["policy"] == scar.FullCheckpoint(every=3).to_json()
    # the same columns in another order would put every weight on the wrong feature
    swapped = digits[[*digits.columns[:-1][::-1], "label"]]
    with pytest.raises(scar.StoreMismatchError, match=r"columns: the same features in another order \(position 0: "
                                                      r"the store has 'p0', the data 'p63'\) \(give the same names"):
        scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(swapped, target="label", max_iter=9,
                                                                        resume=True, progress=False)
    with pytest.raises(scar.CheckpointError, match="already holds a dask_scar checkpoint: pass resume=True"):
        scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(digits, target="label", max_iter=6)
    with pytest.raises(scar.StoreMismatchError, match=r"model class: store has .*SoftmaxRegression, trainer has "
                                                      r"\S*LinearRegression\): use another store path"):
        scar.Trainer(client, scar.LinearRegression(), store=store).fit(digits, target="label", max_iter=9,
                                                                       resume=True, progress=False)
    for path in store.glob("params/weights/c/*/4/0"):      # both saved versions of block 4
        raw = bytearray(path.read_bytes())
        raw[-6] ^= 0x10
        path.write_bytes(bytes(raw))
    with pytest.raises(scar.CheckpointError, match=r"block 4 \(rows 12:15, slot \d\) of parameter 'weights'.* corrupt"), \
            pytest.warns(scar.CheckpointWarning, match="resuming with l2=0.01"):
        scar.Trainer(client, scar.SoftmaxRegression(l2=1e-2), store=store).fit(digits, target="label", max_iter=12,
                                                                               resume=True, progress=False)
    # the failed resume left the store's record as it was: its model, its policy, no writer
    assert scar.open_store(store).meta == meta and scar.open_store(store).writer is None
    with pytest.raises(scar.CheckpointError, match="no dask_scar checkpoint store at"):
        scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / "none.zarr").fit(
            digits, target="label", resume=True)


def test_a_diverged_fit_is_resumed_from_before_it_went_wrong(client, tmp_path, capsys):
    """Least squares with too large a step: its loss grows 1.7-fold an iteration, and
    the fit stops at 10,000 times its first loss, while its segment has saved blocks
    further on. The error says what the store keeps; a resume with a smaller step
    forgets the versions saved from the iteration whose parameters went wrong, and
    trains."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((2000, 8)), columns=[f"x{i}" for i in range(8)])
    frame["y"] = frame.to_numpy() @ rng.standard_normal(8) + 0.1 * rng.standard_normal(2000)
    store = tmp_path / "ckpt.zarr"
    with pytest.raises(scar.DivergenceError, match=rf"loss \S+ at iteration 15 \(it started at 1.72558\); lower "
                                                   rf"learning_rate \(now 2.3\) or scale the features\. The checkpoint "
                                                   rf"store {re.escape(str(store))} keeps this fit as saved before "
                                                   r"iteration 14: fit\(\.\.\., resume=True\) goes on from there"):
        scar.Trainer(client, scar.LinearRegression(learning_rate=2.3), store=store).fit(
            frame, target="y", max_iter=100, progress=False)
    saved = scar.open_store(store).saved_at
    assert scar.open_store(store).diverged == 14 and saved.iteration.max() >= 14     # written further on
    diverged = scar.open_store(store)
    versions = np.concatenate([diverged.versions(name).reshape(-1, 4) for name in diverged.layouts])
    kept = versions[(versions[:, 0] >= 0) & (versions[:, 0] < 14)]      # iteration, epoch, round, check
    start = kept[kept[:, 2].argmax(), 0]        # of the newest round left: where the resume starts
    capsys.readouterr()
    assert main(["inspect", str(store)]) == 0
    assert ("the fit that wrote it diverged: resume=True starts from the versions saved before iteration 14"
            in capsys.readouterr().out)
    with pytest.warns(scar.CheckpointWarning, match=r"the fit that wrote .* diverged: this one resumes from "
                                                    rf"iteration {start}, as saved before iteration 14; \d+ block "
                                                    r"versions saved from then on are forgotten"):
        result = scar.Trainer(client, scar.LinearRegression(learning_rate=0.5), store=store).fit(
            frame, target="y", max_iter=60, resume=True, progress=False)
    # the values it starts from are the diverged fit's before it passed 10,000 times its first loss
    assert result.history.iteration.iloc[0] == start + 1
    assert result.history.loss.iloc[0] < 1e4 * 1.72558 and result.history.loss.iloc[-1] < 0.01
    # its rounds rank above every round the diverged fit wrote: a write of that fit still
    # in flight could not pass for a newer version
    assert result.checkpoints["round"].min() > saved["round"].max()
    assert scar.open_store(store).diverged is None


def test_a_resume_after_a_divergence_that_overwrote_every_saved_block_starts_from_the_beginning(client, tmp_path):
    """A fit saved iteration 10, then a resume diverged, and its rounds wrote every block
    twice before it stopped: no version from before the divergence is left. The next
    resume starts from the initial values, and numbers its iterations from 1 (it went on
    from 11, as if the store still held iteration 10)."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((2000, 8)), columns=[f"x{i}" for i in range(8)])
    frame["y"] = frame.to_numpy() @ rng.standard_normal(8) + 0.1 * rng.standard_normal(2000)
    store = tmp_path / "ckpt.zarr"

    def fit(learning_rate, max_iter, resume):
        return scar.Trainer(client, scar.LinearRegression(learning_rate=learning_rate), store=store,
                            policy=scar.FullCheckpoint(every=2)).fit(frame, target="y", max_iter=max_iter, tol=0,
                                                                     resume=resume, progress=False)

    fresh = fit(0.1, 10, False)
    with pytest.raises(scar.DivergenceError):
        fit(3.5, 200, True)
    diverged = scar.open_store(store).diverged
    versions = scar.open_store(store).versions("weights")
    assert (versions[:, :, 0] >= diverged).all()        # both slots of every block: saved after it went wrong
    with pytest.warns(scar.CheckpointWarning, match=r"this one resumes from iteration 0, as saved before iteration "
                                                    r"\d+; \d+ block versions saved from then on are forgotten, "
                                                    r"and \d+ blocks saved only then start again"):
        result = fit(0.1, 12, True)
    assert result.history["iteration"].tolist() == list(range(1, 13))
    np.testing.assert_allclose(result.history["loss"].iloc[:10], fresh.history["loss"], rtol=1e-6)
    assert scar.open_store(store).manifest["iteration"] == 12


def test_a_store_path_that_holds_something_else_is_named(client, digits, tmp_path):
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for url in (other, f"file://{other}"):
        with pytest.raises(scar.CheckpointError, match=f"{url} is a directory that is not empty and holds no "
                                                       "readable dask_scar checkpoint: choose a new"):
            scar.Trainer(client, scar.SoftmaxRegression(), store=url).fit(digits, target="label", progress=False)
    assert os.listdir(other) == ["notes.txt"]
    store = tmp_path / "ckpt.zarr"
    scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(digits, target="label", max_iter=3,
                                                                  progress=False)
    meta = store / "zarr.json"
    meta.write_text(meta.read_text()[:40])           # cut short by something other than dask_scar
    damaged = r"the checkpoint store at .*ckpt.zarr is damaged: its metadata \(zarr.json\) is not JSON"
    with pytest.raises(scar.CheckpointError, match=damaged):
        scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(digits, target="label", resume=True,
                                                                      progress=False)
    with pytest.raises(scar.CheckpointError, match=damaged):
        scar.open_store(store)


def test_a_store_that_a_fit_left_with_nothing_saved_is_started_afresh(client, digits, tmp_path):
    """A fit that stops before its first checkpoint round (its callback fails) leaves
    a store with no block saved: the next fit on that path starts afresh in it. A
    store another fit writes now is refused, and the message names that fit, also one
    that fit has only just created (nothing saved yet)."""
    store = tmp_path / "ckpt.zarr"

    def fails(iteration, loss):
        raise RuntimeError("the user's callback")

    trainer = scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=5))
    with pytest.raises(RuntimeError, match="the user's callback"):
        trainer.fit(digits, target="label", max_iter=20, callback=fails, progress=False)
    assert scar.open_store(store).unused
    result = trainer.fit(digits, target="label", max_iter=5, progress=False)
    assert result.n_iter == 5 and scar.open_store(store).manifest["iteration"] == 5

    ZarrStore.open(store, mode="r+").claim("0badc0de")        # as a fit does while it runs
    with pytest.raises(scar.CheckpointError, match=r"already holds a dask_scar checkpoint that run 0badc0de writes, "
                                                   r"last committed \d+ s ago \(unless its driver died\): a resume "
                                                   r"takes the store over from it"):
        trainer.fit(digits, target="label", max_iter=5, progress=False)
    starting = tmp_path / "starting.zarr"       # as a fit makes it, before it has saved anything
    ZarrStore.create(starting, trainer._store_model(list(digits.columns[:-1]), "label"),
                     make_layouts({"weights": ((65, 10), "float32")}, 4, 4), None, writer="5ca1ab1e")
    assert not scar.open_store(starting).unused
    with pytest.raises(scar.CheckpointError, match="already holds a dask_scar checkpoint that run 5ca1ab1e writes "
                                                   r"\(unless its driver died\)"):
        scar.Trainer(client, scar.SoftmaxRegression(), store=starting).fit(digits, target="label", max_iter=5,
                                                                           progress=False)


def test_two_fits_started_on_one_new_store_at_once(client, digits, tmp_path):
    """One trains; the other is told which run writes the store, whichever step of its
    start found it (a group made while it loaded its data; a creation in progress)."""
    store = tmp_path / "ckpt.zarr"
    outcomes = {}

    def fit(name):
        try:
            outcomes[name] = scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(
                digits, target="label", max_iter=5, progress=False).n_iter
        except Exception as exc:       # noqa: BLE001 -- said below
            outcomes[name] = exc

    for _ in range(3):
        shutil.rmtree(store, ignore_errors=True)
        threads = [threading.Thread(target=fit, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        errors = [o for o in outcomes.values() if isinstance(o, Exception)]
        assert sorted(o for o in outcomes.values() if not isinstance(o, Exception)) == [5] and len(errors) == 1
        assert re.search(r"already holds a dask_scar checkpoint( that run \w+ writes)?.*(resume=True)", str(errors[0]))


def test_a_fit_interrupted_while_it_creates_its_store_can_start_afresh(client, digits, tmp_path, monkeypatch):
    import zarr

    def interrupted(self, *args, **kwargs):     # Ctrl-C while the store's arrays are made
        raise KeyboardInterrupt

    store = tmp_path / "ckpt.zarr"
    with monkeypatch.context() as patched:
        patched.setattr(zarr.Group, "create_array", interrupted)
        with pytest.raises(KeyboardInterrupt):
            scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(digits, target="label", max_iter=3,
                                                                          progress=False)
    with pytest.raises(scar.CheckpointError, match=r"no (dask_scar )?checkpoint store at"):     # nothing to resume
        scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(digits, target="label", resume=True,
                                                                      progress=False)
    result = scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=3)).fit(
        digits, target="label", max_iter=3, progress=False)
    assert result.n_iter == 3 and scar.open_store(store).manifest["iteration"] == 3


def _limit_file_size(limit: int) -> None:
    # a process writing past RLIMIT_FSIZE gets EFBIG ("File too large"), like a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_unwritable_store_fails_before_training(client, digits, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(scar.CheckpointError, match="cannot write to the checkpoint store at .*a-file/ckpt.zarr"):
        scar.Trainer(client, scar.SoftmaxRegression(), store=blocker / "ckpt.zarr").fit(digits, target="label")
    client.run(_limit_file_size, 0)      # the driver can write, the workers cannot
    try:
        with pytest.raises(scar.CheckpointError, match="worker tcp://.* cannot use the checkpoint store.*"
                                                       "File too large"):
            scar.Trainer(client, scar.SoftmaxRegression(), store=tmp_path / "ckpt.zarr").fit(
                digits, target="label", max_iter=5, progress=False)
    finally:
        client.run(_limit_file_size, resource.RLIM_INFINITY)
    assert not (tmp_path / "ckpt.zarr").exists()     # the store it made is gone again: a retry starts afresh
    assert not [k for k in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
                if str(k).startswith("scar-chunk")]



def test_a_store_url_whose_filesystem_is_not_installed_is_named_before_the_data_is_read(client):
    """fsspec's ImportError for s3:// without s3fs names neither the URL nor what to run;
    the fit says both before it reads any data, and open_store keeps fsspec's hint."""
    for package in ("s3fs", "gcsfs"):
        if importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed")

    def unread():
        raise RuntimeError("the data was read")

    frame = dd.from_delayed([dask.delayed(unread)()], meta=pd.DataFrame({"a": [0.0], "label": [0]}))
    with pytest.raises(ImportError, match=r"the checkpoint store s3://bucket/ckpt.zarr needs a filesystem package "
                                          r"that is not installed \(.*s3fs.*\): pip install s3fs, here and on "
                                          "every worker") as raised:
        scar.Trainer(client, scar.SoftmaxRegression(), store="s3://bucket/ckpt.zarr").fit(frame, target="label",
                                                                                         progress=False)
    assert isinstance(raised.value, scar.ScarError)      # the command line says it without a traceback
    with pytest.raises(ImportError, match=r"the checkpoint store gcs://bucket/ckpt.zarr needs .*gcsfs"):
        scar.open_store("gcs://bucket/ckpt.zarr")

def _fit_in_a_thread(client, digits, store, max_iter):
    """A fit of four copies of digits, a full checkpoint every 2 iterations, started
    in a thread: the thread, and what it puts in ``outcome`` (``result``, and the
    ``warnings`` of class CheckpointWarning)."""
    outcome = {}

    def train():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome["result"] = scar.Trainer(client, scar.SoftmaxRegression(), store=store,
                                             policy=scar.FullCheckpoint(every=2)).fit(
                pd.concat([digits] * 4, ignore_index=True), target="label", max_iter=max_iter, tol=0,
                progress=False)
        outcome["warnings"] = [w for w in caught if issubclass(w.category, scar.CheckpointWarning)]

    thread = threading.Thread(target=train)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_failing_writes_warn_and_training_goes_on(own_client, digits, tmp_path):
    store = tmp_path / "ckpt.zarr"
    thread, outcome = _fit_in_a_thread(own_client, digits, store, 600)
    wait_for(lambda: committed(store, "round") >= 3,
             what="three committed rounds")
    # The disk is "full" for a while: a few rounds' time, well short of the fit's rest
    # (later segments run ~1 s each; at 300 iterations the whole rest once fitted in 1 s).
    own_client.run(_limit_file_size, 0)
    time.sleep(0.3)
    stored_during = scar.open_store(store).load()["weights"]       # readable, intact
    own_client.run(_limit_file_size, resource.RLIM_INFINITY)
    thread.join(timeout=120)
    result = outcome["result"]
    failures = result.history[result.history["event"].str.contains("failed")]
    assert len(failures) >= 2 and failures["event"].str.contains("File too large").all()
    # one warning, pointing at the fit() call above; the rest go to the history and the log
    (warning,) = outcome["warnings"]
    assert warning.filename == __file__ and "later failures of this fit" in str(warning.message)
    assert result.n_iter == 600 and np.isfinite(result.history["loss"]).all()
    assert np.isfinite(stored_during).all()
    assert not list(store.rglob("*.partial"))          # no half-written files left behind
    final = scar.open_store(store)
    assert final.manifest["iteration"] == 600            # later rounds were written again
    np.testing.assert_array_equal(final.load()["weights"], result.params["weights"])


@pytest.mark.slow
def test_a_store_that_fails_to_the_end_is_said_once_in_the_log_and_at_the_end(own_client, digits, tmp_path,
                                                                                caplog, monkeypatch):
    """Every round fails from some point to the end of the fit: the first failure is a
    warning, the log gets a line per NOTE_SECONDS (here 0.5 s) with the count of those
    in between (it got one every round: hundreds a second), and the fit ends with a
    warning that the store holds an older iteration."""
    from dask_scar import checkpoint

    monkeypatch.setattr(checkpoint, "NOTE_SECONDS", 0.5)
    store = tmp_path / "ckpt.zarr"
    thread, outcome = _fit_in_a_thread(own_client, digits, store, 400)
    try:
        wait_for(lambda: committed(store, "round") >= 3, what="three committed rounds")
        own_client.run(_limit_file_size, 0)
        thread.join(timeout=120)
    finally:
        own_client.run(_limit_file_size, resource.RLIM_INFINITY)
    result = outcome["result"]
    failed = result.history[result.history["event"].str.contains("failed")]
    last_commit, held = scar.open_store(store).manifest["iteration"], scar.open_store(store).resumes_from()
    assert result.n_iter == 400 and len(failed) >= 20 and last_commit <= held < 400
    first, last = (str(w.message) for w in outcome["warnings"])
    assert "later failures of this fit" in first
    assert re.fullmatch(rf"the checkpoint store {store} committed iteration {last_commit} last, and this fit reached "
                        rf"400: its later rounds were not all written or recorded \(the last failure: checkpoint "
                        rf"round \d+ \(iteration \d+\) failed: .*File too large.*\)\. "
                        rf"fit\(\.\.\., resume=True\) would go on from iteration {held}, with the blocks "
                        rf"written since", last)
    logged = [r.getMessage() for r in caplog.records if r.name == "dask_scar.checkpoint"
              and r.levelno >= logging.WARNING]
    assert len(logged) < len(failed) - 1
    # each line counts the failures since the line before (none, where a stalled machine
    # kept the next failure more than NOTE_SECONDS away); those after the last line are
    # in the history only
    counts = [int(m.group(1)) if (m := re.search(r" \((\d+) more since the last, in history\['event'\]\)$", line))
              else 0 for line in logged]
    failures = int(result.history["event"].str.count(r"\) failed: ").sum())
    assert sum(counts) > 0 and len(logged) + sum(counts) <= failures - 1, (logged, failures)


def test_a_failing_manifest_write_warns_and_training_goes_on(client, digits, tmp_path):
    """The driver's own write (the manifest, once per round) on a full disk: the rounds
    stay uncommitted, the fit trains on, and a later round commits. (A callback runs in
    the driver between iterations: one graph each, one commit each.)"""
    store = tmp_path / "ckpt.zarr"
    seen = {}

    def full_disk_for_a_while(k, loss):
        if k == 10:
            seen["committed"] = scar.open_store(store).manifest["round"]
            _limit_file_size(0)      # this process (the driver) cannot write; the workers still can
        elif k == 20:
            _limit_file_size(resource.RLIM_INFINITY)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = scar.Trainer(client, scar.SoftmaxRegression(), store=store,
                                  policy=scar.FullCheckpoint(every=2)).fit(
                digits, target="label", max_iter=40, tol=0, progress=False, callback=full_disk_for_a_while)
    finally:
        _limit_file_size(resource.RLIM_INFINITY)
    (warning,) = [w for w in caught if issubclass(w.category, scar.CheckpointWarning)]
    assert warning.filename == __file__
    assert re.search(rf"could not record checkpoint round \d+ \(iteration \d+\) in the checkpoint store at "
                     rf"{store}: .*File too large; the store keeps round {seen['committed']} as its newest",
                     str(warning.message))
    failed = result.history[result.history["event"].str.contains("could not record")]
    assert len(failed) >= 3 and failed["iteration"].between(6, 20).all()   # rounds commit an iteration or two late
    assert result.n_iter == 40 and np.isfinite(result.history["loss"]).all()
    final = scar.open_store(store)
    assert final.manifest["iteration"] == 40 and final.writer is None      # later rounds commit; released
    np.testing.assert_array_equal(final.load()["weights"], result.params["weights"])


def _train_for(seconds: float) -> None:
    from dask_scar.checkpoint import training_task
    training_task(time.sleep)(seconds)      # a training task that never pauses


def _hand_a_write(url: str, store_id: str) -> None:
    from dask_scar.checkpoint import Orders, save
    from dask_scar.chunks import Chunk, ChunkId

    cid = ChunkId("w", 0, 0, 4)
    orders = Orders("run-w", url, store_id, 0, {"w": 2}, round=1, blocks={cid: (0, 1)}, version=3)
    save({cid: Chunk(cid, {"value": np.full((4, 2), 7.0, np.float32)}, 3)}, orders, scar.LinearRegression())


def test_a_write_is_not_held_back_by_tasks_that_never_pause(tmp_path):
    """The writer writes between training tasks; where they overlap (two threads) it
    must not wait for a gap that never comes."""

    store = ZarrStore.create(tmp_path / "ckpt.zarr", {"class": "test", "params": {}},
                             make_layouts({"w": ((4, 2), "float32")}, 1, 2), None)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as c:
        training = c.submit(_train_for, 30.0, pure=False)
        wait_for(lambda: c.processing() and any(c.processing().values()), what="the training task to start")
        c.submit(_hand_a_write, str(tmp_path / "ckpt.zarr"), store.meta["id"], pure=False).result()
        wait_for(lambda: scar.open_store(tmp_path / "ckpt.zarr").records("w")[:, 0].tolist() == [3, 3],
                 what="the write")
        assert not training.done()          # it landed while the training task still ran
        np.testing.assert_array_equal(scar.open_store(tmp_path / "ckpt.zarr").load()["w"], 7.0)
        c.cancel(training)


DRIVER = textwrap.dedent("""
    import sys
    import pandas as pd
    from distributed import Client
    import dask_scar as scar
    frame = pd.read_parquet(sys.argv[2])
    with Client(sys.argv[1]) as client:
        scar.Trainer(client, scar.SoftmaxRegression(), store=sys.argv[3],
                     policy=scar.FullCheckpoint(every=5)).fit(frame, target="label", max_iter=100000, tol=0,
                                                             progress=False)
""")


@pytest.mark.slow
def test_resume_after_the_driver_process_died(client, digits, tmp_path):
    store = tmp_path / "ckpt.zarr"
    digits.to_parquet(tmp_path / "digits.parquet")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, client.scheduler.address,
                               str(tmp_path / "digits.parquet"), str(store)])
    try:
        wait_for(lambda: committed(store) >= 20, timeout=120, what="the driver to commit iteration 20")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # the workers' writers finish the rounds the dead driver handed out: wait until they have
    records = []

    def settled() -> bool:
        records.append(scar.open_store(store).saved_at)
        return len(records) > 1 and records[-1].equals(records[-2])

    wait_for(settled, interval=0.5, what="the writes to settle")
    checkpoint = scar.open_store(store)
    saved = checkpoint.load()["weights"]
    # the newest round written, committed or not: the resume loads its blocks, and goes on from there
    written, start, _ = checkpoint.last_written()
    assert start >= checkpoint.manifest["iteration"]

    model = scar.SoftmaxRegression()
    # the dead driver never ended its run: a resume so soon after its last commit says what that means
    with pytest.warns(scar.CheckpointWarning, match=r"committed to .* s ago and did not end: if that fit still runs"):
        result = scar.Trainer(client, model, store=store, policy=scar.FullCheckpoint(every=5)).fit(
            digits, target="label", max_iter=start + 30, tol=0, resume=True, progress=False)
    assert result.history["iteration"].tolist() == list(range(start + 1, start + 31))
    assert result.n_iter == start + 30
    # rounds the dead driver handed out but never committed keep their numbers: new ones follow
    assert result.checkpoints["round"].min() == written + 1
    # the first loss is the loss of exactly what the store held
    block = prepare_local(scar.SoftmaxRegression(), digits, "label")
    local = scar.SoftmaxRegression()
    prepare_local(local, digits, "label")
    c = local.contribution(0, block, {"weights": saved}, np)
    assert result.history["loss"].iloc[0] == pytest.approx(c.loss / c.count + c.penalty, rel=1e-5)
    # and training goes on from there: below where a fresh start is after as many iterations
    _, fresh = fit_local(local, block, max_iter=30)
    assert result.history["loss"].iloc[-1] < fresh[-1]
    assert scar.open_store(store).manifest["epoch"] == 1


@pytest.mark.parametrize("policy", [scar.FullCheckpoint(every=10), scar.PrioritizedCheckpoint(0.25, every=5)],
                         ids=["full", "prioritized"])
def test_a_fit_that_ends_saves_where_it_ended_and_a_resume_goes_on_exactly(client, digits, tmp_path, policy):
    """The last iteration (25) is no round of the policy's: the fit's end writes every
    block not written with its values already, so the store holds the fitted model and
    a resume that trains further goes on as if never stopped."""
    store = tmp_path / "ckpt.zarr"
    result = scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=policy).fit(
        digits, target="label", max_iter=25, tol=0, progress=False)
    saved = scar.open_store(store)
    np.testing.assert_array_equal(saved.load()["weights"], result.params["weights"])
    assert saved.manifest["iteration"] == 25
    assert (saved.saved_at["iteration"] == 25).all()
    last = result.checkpoints.iloc[-1]
    assert last["iteration"] == 25 and not last["error"] and last["end"]

    resumed = scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(
        digits, target="label", max_iter=30, tol=0, progress=False, resume=True)
    straight = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=30, tol=0,
                                                                 progress=False)
    assert resumed.history["iteration"].tolist() == list(range(26, 31))
    np.testing.assert_allclose(resumed.history["loss"], straight.history["loss"].iloc[25:], rtol=1e-6)


def test_a_resume_that_fails_on_a_corrupt_record_leaves_the_store_to_no_writer(client, digits, tmp_path):
    """The store is claimed before its records are read: a resume that fails there
    (a corrupt record) lets it go again, so that no later fit or inspect names a run
    that never trained as its writer. Once the record is deleted, the resume trains."""
    path = tmp_path / "ckpt.zarr"
    scar.Trainer(client, scar.SoftmaxRegression(), store=path).fit(digits, target="label", max_iter=4,
                                                                 progress=False)
    record = sorted((path / "saved/weights/c").glob("*/*/0"))[0]
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    record.write_bytes(bytes(raw))
    with pytest.raises(scar.CheckpointError, match=r"the record of block \d+ \(slot \d\) of parameter 'weights' "
                                                   r".* is corrupt"):
        scar.Trainer(client, scar.SoftmaxRegression(), store=path).fit(digits, target="label", max_iter=8,
                                                                     resume=True, progress=False)
    assert scar.open_store(path).writer is None
    record.unlink()
    result = scar.Trainer(client, scar.SoftmaxRegression(), store=path).fit(digits, target="label", max_iter=8,
                                                                          resume=True, progress=False)
    assert result.history["iteration"].tolist() == [5, 6, 7, 8]
    assert scar.open_store(path).writer is None


def test_a_resume_with_nothing_to_train_records_no_new_settings(client, digits, tmp_path):
    """The store records a resume's hyperparameters once it has started to train: one
    with nothing to train (max_iter reached) leaves the store's as they were."""
    path = tmp_path / "ckpt.zarr"
    scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.5), store=path).fit(digits, target="label",
                                                                                  max_iter=5, progress=False)
    with pytest.warns(UserWarning, match="nothing to train"):
        scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.1), store=path).fit(
            digits, target="label", max_iter=5, resume=True, progress=False)
    assert scar.open_store(path).meta["model"]["params"]["learning_rate"] == 0.5
    scar.Trainer(client, scar.SoftmaxRegression(learning_rate=0.1), store=path).fit(
        digits, target="label", max_iter=6, resume=True, progress=False)
    assert scar.open_store(path).meta["model"]["params"]["learning_rate"] == 0.1


def test_a_line_search_saves_its_accepted_points_so_the_store_ends_as_the_fitted_model(client, digits, tmp_path):
    """L-BFGS keeps the last accepted point beside the trial it evaluates next: the
    rounds saved the trial, so a finished fit's store was not its fitted model (0.056
    apart after 20 iterations), and a restore took a point the line search might
    reject. Rounds save what the fitted model keeps (Model.fitted_value)."""
    path = tmp_path / "ckpt.zarr"
    result = scar.Trainer(client, scar.SoftmaxRegression(l2=1e-3, solver="lbfgs"), store=path,
                          policy=scar.FullCheckpoint(every=3)).fit(digits, target="label", max_iter=20, tol=0,
                                                                  progress=False)
    store = scar.open_store(path)
    assert store.manifest["iteration"] == 20
    np.testing.assert_array_equal(store.load()["weights"], result.params["weights"])


def test_a_resume_goes_on_from_the_newest_round_written_though_it_never_committed(client, digits, tmp_path):
    """A round whose writes landed but whose driver stopped before it committed it (a
    Ctrl-C while segments run ahead): the resume loads its blocks, so it goes on from
    its iteration, not from the older one the manifest names."""
    store = tmp_path / "ckpt.zarr"
    scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=5)).fit(
        digits, target="label", max_iter=20, tol=0, progress=False)
    straight = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=30, tol=0,
                                                                 progress=False)
    at_25 = scar.Trainer(client, scar.SoftmaxRegression()).fit(digits, target="label", max_iter=25, tol=0,
                                                              progress=False).params["weights"]
    writer = ZarrStore.open(store, mode="r+")
    layout = writer.layouts["weights"]
    number = writer.last_written()[0] + 1
    # (in epoch 3: the stopped fit had recovered three times since its last commit)
    writer.write_blocks("weights", {b: at_25[slice(*layout.bounds(b))] for b in range(layout.n_blocks)},
                        iteration=25, epoch=3, round=number)
    assert writer.manifest["iteration"] == 20          # the round of iteration 25 never committed

    resumed = scar.Trainer(client, scar.SoftmaxRegression(), store=store).fit(
        digits, target="label", max_iter=30, tol=0, progress=False, resume=True)
    assert resumed.history["iteration"].tolist() == list(range(26, 31))
    np.testing.assert_allclose(resumed.history["loss"], straight.history["loss"].iloc[25:], rtol=1e-6)
    assert resumed.checkpoints["round"].min() == number + 1
    assert scar.open_store(store).manifest["epoch"] == 4        # above every epoch written


def test_memory_store_on_a_threaded_cluster(digits):
    url = f"memory://scar-test-{os.getpid()}.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        result = scar.Trainer(c, scar.SoftmaxRegression(), store=url, policy=scar.FullCheckpoint(every=4)).fit(
            digits, target="label", max_iter=8, progress=False)
    np.testing.assert_array_equal(scar.open_store(url).load()["weights"], result.params["weights"])


@pytest.mark.parametrize("owner_lost", [False, True])
def test_a_worker_that_joins_and_cannot_see_the_store_is_named(digits, tmp_path, owner_lost):
    """A worker joins a fit from a node without the store (here: a worker process of its
    own, where the threaded cluster's memory:// store does not exist). Before any chunk
    goes to it, the fit ends with the CheckpointError the start would have given (it
    failed with a bare Exception, or hung). With ``owner_lost``, an owner of chunks goes
    too before the next iteration: the recovery, which comes first, asks the joiner
    before it places a lost chunk there (it restored onto it unasked)."""
    url = f"memory://scar-joiner-{owner_lost}-{os.getpid()}.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        joiner = None

        def join(k, loss):
            nonlocal joiner
            if k != 3:
                return
            joiner = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                       cluster.scheduler_address, "--nthreads", "1", "--no-nanny",
                                       "--host", "127.0.0.1", "--local-directory", str(tmp_path)], cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c.wait_for_workers(3, timeout=60)
            if owner_lost:
                cluster.sync(cluster.workers[sorted(cluster.workers)[0]].close)     # its chunks go with it
                wait_for(lambda: len(c.scheduler_info()["workers"]) == 2, what="the owner's removal")
        try:    # (no copies on the survivor: lost chunks come from the store)
            with dask.config.set({"scar.recovery.replicas": False}), pytest.raises(
                    scar.CheckpointError, match=r"worker tcp://\S+ \(joined during the fit\) cannot use the "
                                                rf"checkpoint store: no checkpoint store at {url}\. The workers "
                                                r"must see the same storage as the driver"):
                scar.Trainer(c, scar.SoftmaxRegression(), store=url, policy=scar.FullCheckpoint(every=2)).fit(
                    digits, target="label", max_iter=50, tol=0, progress=False, callback=join)
        finally:
            if joiner is not None:
                joiner.kill()
                joiner.wait()


def two_saves(tmp_path):
    """A store of one chunk ``w`` (8 x 2, 4 blocks of 2 rows) whose block 0 was saved at
    iterations 10 (value 1) and 20 (3), block 1 once at 20 (4), block 2 by another fit
    (5), block 3 never; and a fresh fit's Drift in which the chunk walked 1.0 per
    iteration, then 0.5 from iteration 21 to 30. Returns the store, the chunk and the drift."""
    from dask_scar.chunks import ChunkId
    from dask_scar.recovery import Drift
    from dask_scar.store import BlockLayout, ZarrStore

    layout = BlockLayout("w", (8, 2), "float32", 2)           # 4 blocks of 2 rows, one chunk
    store = ZarrStore.create(tmp_path / "ckpt.zarr", {"class": "test", "params": {}}, {"w": layout}, None)
    cid = ChunkId("w", 0, 0, 8)
    drift = Drift([cid], fresh=True, first_round=0)
    for k in range(1, 31):               # the chunk walks 1.0 per iteration, then 0.5 from iteration 21
        drift.record(k, {"w/0": 1.0 if k <= 20 else 0.5})
    full = np.full((2, 2), 1.0, np.float32)
    store.write_blocks("w", {0: 1 * full}, 10, 0, 1)
    store.write_blocks("w", {0: 3 * full, 1: 4 * full}, 20, 0, 2)
    store.write_blocks("w", {2: 5 * full}, 4, 0, 0)               # round 0: another fit's
    return store, cid, drift


def test_a_worker_keeps_values_for_the_rounds_of_a_few_runs_only():
    """Values kept for a checkpoint round go when their run ends (the driver has the
    workers forget it); a driver that died never does, so a worker keeps those of the
    newest few runs only, as it does their chunk copies."""
    from dask_scar import checkpoint
    from dask_scar.chunks import RUNS_REMEMBERED, Chunk, ChunkId

    cid = ChunkId("w", 0, 0, 4)
    runs = [f"scar-test-kept-{i}" for i in range(RUNS_REMEMBERED + 2)]
    try:
        for version, run in enumerate(runs):
            checkpoint.keep(run, {cid: Chunk(cid, {"value": np.full((4, 2), version, np.float32)}, version)},
                            scar.LinearRegression())
        assert [run for run in checkpoint._kept if run.startswith("scar-test-kept-")] == runs[2:]
        checkpoint.forget(runs[-1])
        assert runs[-1] not in checkpoint._kept and runs[-2] in checkpoint._kept
    finally:
        for run in runs:
            checkpoint.forget(run)


def test_a_write_of_a_run_that_ended_is_not_made(tmp_path):
    """A write handed to the writer thread after its run ended (a segment's task that
    found the run over hands its writes on): the run's rounds were given up, and another
    fit may have taken the store, so nothing is written."""
    from dask_scar import checkpoint, chunks
    from dask_scar.chunks import Chunk, ChunkId
    from dask_scar.store import BlockLayout, ZarrStore

    path = tmp_path / "ckpt.zarr"
    store = ZarrStore.create(path, {"class": "test", "params": {}}, {"w": BlockLayout("w", (8, 2), "float32", 2)},
                             None)
    chunk = Chunk(ChunkId("w", 0, 0, 8), {"value": np.zeros((8, 2), np.float32)}, 0)
    values = {1: np.ones((2, 2), np.float32)}
    for run in ("scar-test-live", "scar-test-ended"):
        if run.endswith("ended"):
            chunks.forget(run)
        with checkpoint._writing:       # as save() counts a write it hands on
            checkpoint._writing.count += 1
        checkpoint._write(None, checkpoint.Orders(run, str(path), store.meta["id"], 0, {"w": 2}, round=1 + (
            run.endswith("ended")), version=5), chunk, values, 0.0)
    assert store.records("w", [1])[:, 2].tolist() == [1]    # the live run's round only


def test_two_writes_of_a_block_at_once_on_a_worker_take_turns(tmp_path):
    """A segment's task writes its rounds itself while the writer thread may still write
    the round handed over at the last segment's end: both can write the same block.
    Each write puts the block in the older of its two slots; two at once chose the same
    slot, and left one's data under the other's record, read as corrupt (about one pair
    in six). They now take turns, and every read finds the newer write."""
    import dataclasses

    from dask_scar import checkpoint
    from dask_scar.chunks import Chunk, ChunkId
    from dask_scar.store import BlockLayout, ZarrStore

    path = tmp_path / "ckpt.zarr"
    store = ZarrStore.create(path, {"class": "test", "params": {}}, {"w": BlockLayout("w", (8, 2), "float32", 2)},
                             None)
    chunk = Chunk(ChunkId("w", 0, 0, 8), {"value": np.zeros((8, 2), np.float32)}, 0)
    base = checkpoint.Orders("run", str(path), store.meta["id"], 0, {"w": 2})
    together, read = threading.Barrier(2), []

    def write(parity):
        for k in range(1, 101):
            version = 2 * k + parity
            with checkpoint._writing:       # as save() counts a write it hands on
                checkpoint._writing.count += 1
            together.wait()
            checkpoint._write(None, dataclasses.replace(base, round=version, version=version), chunk,
                              {1: np.full((2, 2), version, np.float32)}, 0.0)
            together.wait()
            if parity:
                try:
                    read.append(float(store.read_blocks("w", [1])[1][0, 0]))
                except scar.CheckpointError as exc:
                    read.append(str(exc))

    threads = [threading.Thread(target=write, args=(parity,)) for parity in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert read == [2.0 * k + 1 for k in range(1, 101)]


def test_a_restored_block_is_extrapolated_along_its_last_two_saves(tmp_path):
    """The driver's Drift keeps each chunk's path (its step norms summed); the
    restoring worker extrapolates every block along the two versions the store holds,
    by the path walked since the newest over the path walked between them."""
    from dask_scar.checkpoint import Orders, SaveTrail, _update_reference, distances, prepare_chunk
    from dask_scar.chunks import Chunk
    from dask_scar.recovery import Drift

    store, cid, drift = two_saves(tmp_path)

    def restore(trends, version=30, upto_round=None):
        chunk = Chunk(cid, {"value": np.full((8, 2), -1.0, np.float32)}, version)    # -1: the initial value
        stats = prepare_chunk(chunk, str(tmp_path / "ckpt.zarr"), store.meta["id"], {"w": 2}, True, False, trends,
                              upto_round=upto_round)
        return chunk.value[::2, 0].tolist(), stats

    # block 0: saved at 10 and 20, the chunk walked 10 between them and 5 since: f = 0.5;
    # block 1: saved once in a fresh fit, so from its initial value (iteration 0, path 0): f = 5 / 20;
    # block 2: from another fit, as saved; block 3: never saved, initial
    assert restore(drift.trends([cid])) == ([3 + 0.5 * (3 - 1), 4 + 0.25 * (4 - -1), 5.0, -1.0],
                                            {"bytes": 4 * 16, "never_saved": 1, "extrapolated_blocks": 2,
                                             "older_blocks": 0})
    assert restore(None)[0] == [3.0, 4.0, 5.0, -1.0]               # the paper's restore: as saved
    # a write the driver never heard of is used too: block 0 now holds iterations 20 and 25
    store.write_blocks("w", {0: np.full((2, 2), 9.0, np.float32)}, 25, 0, 3)
    assert restore(drift.trends([cid]))[0][0] == 9 + (25 - 22.5) / (22.5 - 20) * (9 - 3)   # paths 20, 22.5, 25
    # a rollback to round 2 passes that write over; block 2 is as an earlier round saved it
    assert restore(None, upto_round=2) == ([3.0, 4.0, 5.0, -1.0], {"bytes": 3 * 16, "never_saved": 1,
                                                                    "extrapolated_blocks": 0, "older_blocks": 1})
    # a resumed fit knows no path before its start: nothing to go by
    resumed = Drift([cid], fresh=False, first_round=3)
    resumed.record(31, {"w/0": 1.0})
    assert restore(resumed.trends([cid]), version=31)[1]["extrapolated_blocks"] == 0

    # a chunk's owner ranks its blocks by how far such a restore would be off now
    owned = Chunk(cid, {"value": np.zeros((8, 2), np.float32)}, 0, np.zeros((8, 2), np.float32),
                  SaveTrail.new(np.zeros((8, 2), np.float32), 4, fresh=True))
    for k, path in ((10, 10.0), (20, 20.0)):    # block 0 saved at 10 (value 1) and 20 (value 2)
        owned.trail.path, owned.version = path, k
        _update_reference(owned, {0: np.full((2, 2), k / 10, np.float32)}, 2, k, path)
    owned = Chunk(cid, {"value": np.full((8, 2), 3.0, np.float32)}, 30, owned.reference, owned.trail)
    owned.trail.path = 25.0                     # walked 5 since: block 0 predicted at 2 + 0.5 * (2 - 1)
    orders = Orders("run", "url", "id", 0, {"w": 2}, None, priorities=True, extrapolate=True)
    model = scar.LinearRegression()         # (a block's value: its fitted value, the chunk's own here)
    assert distances({cid: owned}, orders, model) == ({"w/0": pytest.approx([0.5 * 2, 3 * 2, 3 * 2, 3 * 2])},
                                                      {"w/0": []})
    paper = Orders(**{**orders.__dict__, "extrapolate": False})
    assert distances({cid: owned}, paper, model) == ({"w/0": pytest.approx([1 * 2, 3 * 2, 3 * 2, 3 * 2])}, {})
    # L-BFGS: a block is where its last accepted point ("base") is, as a save writes it,
    # not where the trial beyond it is (it ranked blocks by the search direction)
    trial = Chunk(cid, {"value": np.full((8, 2), 9.0, np.float32), "base": owned.reference.copy()}, 30,
                  owned.reference, owned.trail)
    assert distances({cid: trial}, paper, model)[0] == {"w/0": [0.0] * 4}
    # block 0 swung back to 1.5: its extrapolation (2.5) is farther than its saved value
    # (2): that is its priority, and the driver has restores take it as saved
    owned.value[:2] = 1.5
    priorities, turned = distances({cid: owned}, orders, model)
    assert priorities["w/0"] == pytest.approx([0.5 * 2, 3 * 2, 3 * 2, 3 * 2]) and turned == {"w/0": [0]}
    drift.prioritized(priorities, turned)
    assert restore(drift.trends([cid])) == ([9.0, 4 + 0.25 * (4 - -1), 5.0, -1.0],   # as saved at 25
                                            {"bytes": 3 * 16, "never_saved": 1, "extrapolated_blocks": 1,
                                             "older_blocks": 0})
    # a new owner's trail knows no two saves, and judges nothing: the driver keeps the list
    moved = Chunk(cid, owned.state, 30, owned.reference, SaveTrail.new(owned.reference, 4, fresh=False))
    assert distances({cid: moved}, orders, model) == ({"w/0": pytest.approx([0.5 * 2, 3 * 2, 3 * 2, 3 * 2])}, {})
    drift.prioritized(*distances({cid: moved}, orders, model))
    assert drift.trends([cid])[cid].held == (0,)
    # steps that grow are no trend to follow far: the factor is capped by the iterations
    from dask_scar.checkpoint import trend_factors
    assert trend_factors(12, 78.0, np.array([10]), np.array([55.0]), np.array([8]), np.array([36.0]), False) == 1.0


def test_a_restored_chunks_velocity_is_the_step_its_drift_gives(tmp_path):
    """Nesterov's velocity is not stored: a chunk restored along its blocks' drift gets,
    per block, its share of the chunk's last step in the drift's direction (zero where
    there is no drift to go by). Plain gradient descent keeps no velocity, and the
    paper's restore (no trend) leaves it at zero."""
    from dask_scar.checkpoint import prepare_chunk
    from dask_scar.chunks import Chunk

    store, cid, drift = two_saves(tmp_path)

    def restore(model, trends):
        chunk = Chunk(cid, model.new_state("w", np.full((8, 2), -1.0, np.float32)), 30)   # -1: the initial value
        prepare_chunk(chunk, str(tmp_path / "ckpt.zarr"), store.meta["id"], {"w": 2}, True, False, trends,
                      model=model)
        return chunk.state

    nesterov = scar.SoftmaxRegression(momentum=0.9)
    state = restore(nesterov, drift.trends([cid]))
    # the last step was 0.5. Block 0 drifted by 2 per element over a path of 10 (iterations
    # 10 to 20): 0.5 / 10 * 2; block 1, saved once, from its initial value over 20: 0.5 / 20 * 5;
    # block 2 is another fit's, block 3 never saved
    assert state["velocity"].dtype == np.float32
    np.testing.assert_allclose(state["velocity"][::2, 0], [0.1, 0.125, 0.0, 0.0], rtol=1e-6)
    assert state["value"][::2, 0].tolist() == [3 + 0.5 * (3 - 1), 4 + 0.25 * (4 - -1), 5.0, -1.0]
    assert not restore(nesterov, None)["velocity"].any()                # as saved: no step to go by
    assert set(restore(scar.SoftmaxRegression(), drift.trends([cid]))) == {"value"}


def test_an_owner_given_a_copy_of_its_chunk_takes_back_its_reference_and_trail():
    """Dask's active memory manager may keep another worker's replica of a chunk's key
    and drop the owner's: the copy the owner then gets carries no reference (nor trail),
    and the owner's own recent copy gives them back, rather than the store."""
    import pickle

    from dask_scar.checkpoint import SaveTrail
    from dask_scar.chunks import Chunk, ChunkId, forget, reattach, remember

    cid = ChunkId("w", 0, 0, 4)
    mine = Chunk(cid, {"value": np.ones((4, 2), np.float32)}, 10, np.zeros((4, 2), np.float32),
                 SaveTrail.new(np.zeros((4, 2), np.float32), 2, fresh=True))
    remember("run-x", {cid: mine})
    copy = pickle.loads(pickle.dumps(Chunk(cid, mine.state, 11, mine.reference, mine.trail)))
    assert copy.reference is None and copy.trail is None              # a copy travels without them
    assert reattach("run-x", copy) and copy.reference is mine.reference and copy.trail is mine.trail
    two_on = pickle.loads(pickle.dumps(Chunk(cid, mine.state, 12, mine.reference, mine.trail)))
    assert reattach("run-x", two_on) and two_on.reference is mine.reference
    three_on = pickle.loads(pickle.dumps(Chunk(cid, mine.state, 13, mine.reference, mine.trail)))
    assert not reattach("run-x", three_on) and three_on.reference is None       # too old to trust
    assert not reattach("run-y", copy)       # another run's
    forget("run-x")


def test_a_write_reported_before_the_driver_chose_its_round_counts(tmp_path):
    """A segment's workers choose a round and write it before the driver, which takes
    the segment's events in once it ends, has chosen it: the report waits for it."""
    from dask_scar.checkpoint import Checkpointer
    from dask_scar.chunks import ChunkId

    layouts = make_layouts({"w": ((16, 4), "float32")}, 2, 2)
    store = ZarrStore.create(tmp_path / "s.zarr", {"class": "test", "params": {}}, layouts, None, writer="run")
    ckpt = Checkpointer(store, scar.FullCheckpoint(every=1), layouts, "run", "id", 0, 0, 2)
    ids = [ChunkId("w", 0, 0, 8), ChunkId("w", 1, 8, 16)]
    reports = [{"kind": "written", "round": 1, "parameter": "w", "chunk": c.index, "version": 1,
                "blocks": [2 * c.index, 2 * c.index + 1], "bytes": 64, "seconds": 0.0, "error": None} for c in ids]
    ckpt.on_written(reports[0])         # before the driver's choice
    ckpt.select(1, ids, {})
    assert ckpt.outstanding() == 1
    ckpt.on_written(reports[1])
    assert ckpt.outstanding() == 0 and store.manifest == {}     # committed once per batch of reports
    ckpt.commit()
    assert store.manifest["round"] == 1
    assert ckpt.table()["bytes"].tolist() == [128]
    # a batch that finishes rounds 2 and 3 writes the manifest once, naming round 3
    for number in (2, 3):
        ckpt.select(number, ids, {})
        for report in reports:
            ckpt.on_written({**report, "round": number})
    assert store.manifest["round"] == 1
    ckpt.commit()
    assert store.manifest["round"] == 3 and store.manifest["iteration"] == 3
    # rounds that finish out of order (5 before 4): the newest is committed
    for number in (4, 5):
        ckpt.select(number, ids, {})
    for number in (5, 4):
        for report in reports:
            ckpt.on_written({**report, "round": number})
    ckpt.commit()
    assert store.manifest["round"] == 5 and store.manifest["iteration"] == 5


def test_a_worker_keeps_the_stores_it_used_last_open_not_every_one(tmp_path):
    from dask_scar import checkpoint

    layouts = make_layouts({"w": ((8, 4), "float32")}, 1, 2)
    stores = [ZarrStore.create(tmp_path / f"{i}.zarr", {"class": "test", "params": {}}, layouts, None)
              for i in range(checkpoint.OPEN_STORES + 3)]
    try:
        for store in stores:
            checkpoint.open_cached(store.url, store.meta["id"])
            first = checkpoint.open_cached(stores[0].url, stores[0].meta["id"])   # used every time: kept
        assert len(checkpoint._stores) == checkpoint.OPEN_STORES
        assert checkpoint.open_cached(stores[0].url, stores[0].meta["id"]) is first
        assert (stores[1].url, stores[1].meta["id"]) not in checkpoint._stores
        assert (stores[-1].url, stores[-1].meta["id"]) in checkpoint._stores
    finally:
        checkpoint._stores.clear()


def test_a_commit_that_cannot_write_is_noted_once_and_the_next_round_commits(tmp_path):
    from dask_scar.checkpoint import Checkpointer
    from dask_scar.chunks import ChunkId

    layouts = make_layouts({"w": ((8, 4), "float32")}, 1, 2)
    store = ZarrStore.create(tmp_path / "s.zarr", {"class": "test", "params": {}}, layouts, None, writer="run")
    ckpt = Checkpointer(store, scar.FullCheckpoint(every=1), layouts, "run", "id", 0, 0, 2)
    ids = [ChunkId("w", 0, 0, 8)]
    for number in (1, 2):
        ckpt.select(number, ids, {})
        ckpt.on_written({"kind": "written", "round": number, "parameter": "w", "chunk": 0, "version": number,
                         "blocks": [0, 1, 2, 3], "bytes": 64, "seconds": 0.0, "error": None})
        if number == 1:
            _limit_file_size(0)
            try:
                with pytest.warns(scar.CheckpointWarning, match=r"could not record checkpoint round 1 \(iteration "
                                  rf"1\) in the checkpoint store at {tmp_path}/s.zarr: .*File too large; the store "
                                  "has no round yet and training goes on"):
                    ckpt.commit()
                ckpt.commit()                # the same round: not tried (nor noted) again
            finally:
                _limit_file_size(resource.RLIM_INFINITY)
            assert store.manifest == {} and len(ckpt.notes[1]) == 1
    ckpt.commit()
    assert store.manifest["round"] == 2 and not ckpt.lost


def test_writes_of_a_stopped_segment_are_heard_up_to_its_last_kept_iteration(tmp_path):
    """A segment stopped after iteration 25 (a worker died) had chosen rounds 1-3 (of
    iterations 10, 20, 30) itself. Their writes reach the store and a recovery may read
    them, so the driver hears of those of iterations up to 25, whenever their reports
    come, but not of iteration 30's: training does that iteration again."""
    from dask_scar.checkpoint import Checkpointer
    from dask_scar.chunks import ChunkId

    layouts = make_layouts({"w": ((16, 4), "float32")}, 2, 2)
    store = ZarrStore.create(tmp_path / "s.zarr", {"class": "test", "params": {}}, layouts, None)
    ckpt = Checkpointer(store, scar.FullCheckpoint(every=10), layouts, "run", "id", 0, 0, 2)
    heard = []
    ckpt.on_saved = lambda iteration, blocks, rows: heard.append((iteration, blocks, rows))

    def report(number, chunk, error=None):
        return {"kind": "written", "round": number, "parameter": "w", "chunk": chunk, "version": 10 * number,
                "blocks": [2 * chunk, 2 * chunk + 1], "bytes": 64, "seconds": 0.0, "error": error}

    ckpt.on_written(report(1, 0))       # during the segment: its round is not chosen here
    assert heard == [] and ckpt.early
    ckpt.skip(3, 25)
    ckpt.on_written(report(2, 1))       # after the stop
    ckpt.on_written(report(3, 0))       # iteration 30: done again
    ckpt.on_written(report(2, 0, error="OSError: disk full"))
    assert heard == [(10, {"w/0": [0, 1]}, {"w": 4}), (20, {"w/1": [2, 3]}, {"w": 4})]
    assert ckpt.early == [] and ckpt.round == 3 and ckpt.table().empty     # never rounds of this driver
    ckpt.select(40, [ChunkId("w", 0, 0, 8), ChunkId("w", 1, 8, 16)], {})
    assert ckpt.table()["round"].tolist() == [4]        # the stopped segment's numbers are not used again



def _fit_in_thread(client, store, frame, max_iter):
    """``fit`` of a store-writing trainer in a thread; returns the thread and its outcome."""
    outcome = {}

    def fit():
        outcome["result"] = scar.Trainer(client, scar.SoftmaxRegression(), store=store,
                                         policy=scar.FullCheckpoint(every=5)).fit(
            frame, target="label", max_iter=max_iter, tol=0, progress=False)
    thread = threading.Thread(target=fit)
    thread.start()
    wait_for(lambda: committed(store) >= 10, what="the first fit's first commits")
    return thread, outcome


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:another fit")       # the first fit's, from its thread
def test_a_store_taken_over_by_another_fit_is_left_to_it(client, digits, tmp_path):
    """A second fit resumes from the store of one still running (a user who thought it
    hung): the second is told the first may still run, and from then on writes the
    store alone; the first says so, and goes on training without checkpoints."""
    store = tmp_path / "ckpt.zarr"
    frame = pd.concat([digits] * 4, ignore_index=True)
    thread, first = _fit_in_thread(client, store, frame, max_iter=6000)
    seen = []
    with pytest.warns(scar.CheckpointWarning, match=r"committed to .* s ago and did not end: if that fit still "
                                                    r"runs, it stops checkpointing at its next commit"):
        second = scar.Trainer(client, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=5)).fit(
            frame, target="label", max_iter=10**6, tol=0, resume=True, progress=False,
            callback=lambda k, loss: seen.append(k) or len(seen) == 40)      # 40 iterations, wherever it starts
    manifest = scar.open_store(store).manifest
    thread.join(timeout=300)
    assert not thread.is_alive() and first["result"].n_iter == 6000
    assert scar.open_store(store).manifest == manifest      # the first fit committed nothing since
    assert manifest["iteration"] == second.n_iter == seen[-1] and seen[-1] % 5 == 0
    taken = [e for e in first["result"].history["event"] if "took the checkpoint store at" in e]
    assert len(taken) == 1 and taken[0] == (f"another fit (run {manifest['run']}) took the checkpoint store at "
                                            f"{store} over: fit(..., resume=True) from another driver; this fit "
                                            "goes on without checkpoints")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the checkpoint store at")
@pytest.mark.filterwarnings("ignore:checkpoint round")     # a write the deletion cut short
def test_a_store_deleted_while_training_is_said_and_not_rebuilt(client, digits, tmp_path):
    store = tmp_path / "ckpt.zarr"
    thread, first = _fit_in_thread(client, store, pd.concat([digits] * 4, ignore_index=True), max_iter=3000)
    shutil.rmtree(store, ignore_errors=True)     # (its writers may add files meanwhile)
    thread.join(timeout=300)
    assert not thread.is_alive() and first["result"].n_iter == 3000
    gone = [e for e in first["result"].history["event"] if "is gone" in e]
    assert gone == [f"the checkpoint store at {store} is gone: it was deleted while training; this fit goes on "
                    "without checkpoints"]
    with pytest.raises(scar.CheckpointError, match="no checkpoint store at|not a dask_scar"):
        scar.open_store(store)


@pytest.mark.filterwarnings("ignore:the checkpoint store at")
@pytest.mark.filterwarnings("ignore:checkpoint round")     # a write the deletion cut short
def test_a_fit_that_lost_its_store_takes_in_a_worker_that_joins(digits, tmp_path):
    """A fit whose store was deleted goes on without checkpoints, and a worker that
    joins it then is given chunks, not asked about the store that is gone."""
    from conftest import new_cluster

    store = tmp_path / "ckpt.zarr"
    with new_cluster(2) as cluster, Client(cluster) as c:
        def act(k, loss):
            if k == 4:
                shutil.rmtree(store, ignore_errors=True)
            if k == 8:
                cluster.scale(3)
                c.wait_for_workers(3, timeout=60)

        result = scar.Trainer(c, scar.SoftmaxRegression(), store=store, policy=scar.FullCheckpoint(every=2)).fit(
            digits, target="label", max_iter=14, tol=0, progress=False, callback=act)
    events = " ".join(result.history["event"])
    assert result.n_iter == 14 and "this fit goes on without checkpoints" in events and "rebalanced" in events


def test_store_paths_are_the_drivers_and_one_workers_cannot_see_is_not_left_behind(client, digits, tmp_path,
                                                                                     monkeypatch):
    """A relative path would be resolved in each worker's working directory (another
    machine's, or another folder's): the trainer makes it absolute, ``~`` expanded. A
    store the workers cannot see (a memory:// store lives in the driver's process) is
    refused with what to do, and not left behind to ask for resume=True next time."""
    monkeypatch.chdir(tmp_path)
    assert scar.Trainer(client, scar.SoftmaxRegression(), store="ckpt.zarr").store == str(tmp_path / "ckpt.zarr")
    assert scar.Trainer(client, scar.SoftmaxRegression(), store="~/c.zarr").store == os.path.expanduser("~/c.zarr")
    # a relative file:// URL too (its workers said "The workers must see the same storage as the driver")
    assert scar.Trainer(client, scar.SoftmaxRegression(), store="file://f.zarr").store == str(tmp_path / "f.zarr")
    assert scar.Trainer(client, scar.SoftmaxRegression(), store=f"file://{tmp_path}/g.zarr").store == \
        f"file://{tmp_path}/g.zarr"
    for _ in range(2):
        with pytest.raises(scar.CheckpointError, match=r"worker .* cannot use the checkpoint store: .*no checkpoint "
                                                       r"store at memory://c\.zarr\. The workers must see the same "
                                                       r"storage as the driver"):
            scar.Trainer(client, scar.SoftmaxRegression(), store="memory://c.zarr").fit(digits, target="label",
                                                                                        max_iter=2, progress=False)
