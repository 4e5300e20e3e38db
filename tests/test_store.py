"""The Zarr checkpoint store and the checkpoint policies, on real stores (no cluster)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr
from conftest import wait_for

import dask_scar as scar
from dask_scar.checkpoint import Trend, prepare_chunk
from dask_scar.chunks import Chunk, ChunkId, place, split_rows
from dask_scar import store as store_module
from dask_scar.policy import from_json
from dask_scar.store import ZarrStore, being_created, make_layouts, probe
from dask_scar.trainer import _check_store_path

MODEL = {"class": "dask_scar.models.softmax.SoftmaxRegression", "params": {"l2": 0.0001}}


def new_store(url, shapes=None, n_chunks=4, blocks_per_chunk=4):
    layouts = make_layouts(shapes or {"weights": ((65, 10), "float32")}, n_chunks, blocks_per_chunk)
    return ZarrStore.create(url, MODEL, layouts, scar.FullCheckpoint(every=5).to_json())


def test_blocks_tile_the_chunks_and_never_straddle_them():
    layouts = make_layouts({"users": ((1001, 8), "float32"), "items": ((7, 8), "float32")}, 4, 8)
    assert layouts["users"].block_rows == 32 and layouts["users"].n_blocks == 32
    assert layouts["items"].block_rows == 1 and layouts["items"].n_blocks == 7
    for name, layout in layouts.items():
        ids = [c for c in split_rows(layouts, 4) if c.name == name]
        assert ids[0].start == 0 and ids[-1].stop == layout.shape[0]
        assert all(a.stop == b.start for a, b in zip(ids, ids[1:]))
        blocks = [list(layout.blocks(c.start, c.stop)) for c in ids]
        assert sum(blocks, []) == list(range(layout.n_blocks))   # each block in exactly one chunk
    with pytest.raises(ValueError, match="block boundaries"):
        layouts["users"].blocks(5, 64)
    # each parameter starts on a worker of its own: three chunks each on two workers, three a worker
    owners = place(split_rows({"users": layouts["users"], "items": layouts["items"]}, 3), ["w-b", "w-a"])
    assert [(c.name, c.index, w) for c, w in owners.items()] == [
        ("users", 0, "w-a"), ("users", 1, "w-b"), ("users", 2, "w-a"),
        ("items", 0, "w-b"), ("items", 1, "w-a"), ("items", 2, "w-b")]


def test_write_read_records_and_info(tmp_path):
    store = new_store(tmp_path / "ckpt.zarr")
    lay = store.layouts["weights"]
    assert (lay.block_rows, lay.n_blocks) == (5, 13)
    rows = np.arange(50, dtype=np.float32).reshape(5, 10)
    nbytes = store.write_blocks("weights", {0: rows, 12: rows + 7}, iteration=9, epoch=1, round=3)
    files = [tmp_path / "ckpt.zarr/params/weights/c/0/0/0", tmp_path / "ckpt.zarr/params/weights/c/0/12/0"]
    assert nbytes == sum(os.path.getsize(f) for f in files)
    store.commit({"round": 3, "iteration": 9, "epoch": 1})

    reopened = scar.open_store(tmp_path / "ckpt.zarr")
    saved = reopened.saved_at
    assert saved[saved.iteration >= 0].block.tolist() == [0, 12]
    assert saved.loc[saved.block == 0, ["iteration", "epoch", "round"]].values.tolist() == [[9, 1, 3]]
    loaded = reopened.load()["weights"]
    np.testing.assert_array_equal(loaded[:5], rows)
    assert np.isnan(loaded[5:60]).all()          # never saved: NaN, never zeros
    info = reopened.info()
    assert info["blocks"] == 13 and info["blocks_saved"] == 2
    assert info["manifest"]["iteration"] == 9 and info["staleness"] == {"0": 2}
    assert info["newer_blocks"] == 0 and info["newest_iteration"] == 9
    # a round that never committed (its driver died): counted apart, not as 0 iterations old
    store.write_blocks("weights", {1: rows, 12: rows}, iteration=14, epoch=1, round=4)
    info = scar.open_store(tmp_path / "ckpt.zarr").info()
    assert info["staleness"] == {"0": 1} and info["newer_blocks"] == 2 and info["newest_iteration"] == 14
    assert info["nbytes_parameters"] == 65 * 10 * 4
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for kind in ("params", "saved")     # (each array's)
                  for d, _, names in os.walk(tmp_path / "ckpt.zarr" / kind / "weights") for f in names)
    assert info["nbytes_stored"] == on_disk > 2 * nbytes
    # metadata is plain JSON
    meta = json.loads((tmp_path / "ckpt.zarr/zarr.json").read_text())["attributes"]
    assert meta["dask_scar"]["model"] == MODEL and meta["manifest"]["round"] == 3


def test_a_block_keeps_its_two_newest_versions_and_a_write_spares_the_newest(tmp_path):
    store = new_store(tmp_path / "ckpt.zarr")
    ones = np.ones((5, 10), np.float32)
    assert store.read_blocks("weights", [2], previous=True) == {}
    sizes = [store.write_blocks("weights", {2: ones * k}, iteration=10 * k, epoch=0, round=k) for k in (1, 2)]
    newest = tmp_path / "ckpt.zarr/params/weights/c/1/2/0"        # the second write, in the other slot
    before = newest.read_bytes()
    store.write_blocks("weights", {2: ones * 3}, iteration=30, epoch=1, round=3)   # over the first
    assert newest.read_bytes() == before
    reopened = scar.open_store(tmp_path / "ckpt.zarr")
    assert reopened.records("weights", [2])[:, :3].tolist() == [[30, 1, 3]]
    assert reopened.records("weights", [2], previous=True)[:, :3].tolist() == [[20, 0, 2]]
    assert reopened.read_blocks("weights", [2])[2][0, 0] == 3.0
    assert reopened.read_blocks("weights", [2], previous=True)[2][0, 0] == 2.0
    assert reopened.load()["weights"][10, 0] == 3.0 and reopened.saved_at.iteration[2] == 30
    assert reopened.records("weights", [2, 3], previous=True)[:, 0].tolist() == [20, -1]   # 3: never saved
    assert sizes[1] == os.path.getsize(newest)       # a write costs one version's bytes, not two


def test_a_resume_forgets_what_a_diverged_fit_saved_from_the_iteration_it_went_wrong(tmp_path):
    """A fit that diverged marks the store; the resume that claims it next forgets every
    version saved from that iteration on (both slots) and goes back to the newest
    round left."""
    store = new_store(tmp_path / "ckpt.zarr")
    ones = np.ones((5, 10), np.float32)
    for k, blocks in ((1, [2]), (2, [4]), (3, [2])):      # iterations 5, 10 and 15
        store.write_blocks("weights", {b: ones * k for b in blocks}, iteration=5 * k, epoch=0, round=k)
    store.claim("a")
    store.commit({"round": 2, "iteration": 10, "epoch": 0, "run": "a"})    # round 3 never committed
    store.mark_diverged("other", 10)          # not the store's writer: nothing recorded
    assert scar.open_store(tmp_path / "ckpt.zarr").diverged is None
    store.mark_diverged("a", 10)       # the loss of iteration 11 went wrong: 10 and after are forgotten
    store.release("a")
    assert scar.open_store(tmp_path / "ckpt.zarr").info()["diverged"] == 10

    resumed = ZarrStore.open(tmp_path / "ckpt.zarr", mode="r+")
    resumed.claim("b")
    # block 2's version of iteration 15 and block 4's of 10 (its only one); round 3 the highest
    assert resumed.drop_diverged("b") == (2, 1, 3)
    again = scar.open_store(tmp_path / "ckpt.zarr")
    assert again.records("weights", [2, 4])[:, :3].tolist() == [[5, 0, 1], [-1, -1, -1]]
    assert again.records("weights", [2], previous=True)[:, 0].tolist() == [-1]
    assert again.read_blocks("weights", [2, 4]) == {2: pytest.approx(ones)}
    assert (again.manifest["round"], again.manifest["iteration"], again.diverged) == (1, 5, None)
    assert again.last_written() == (1, 5, 0)


def test_a_rollback_goes_to_the_oldest_round_held_whole_and_forgets_the_later_ones(tmp_path):
    """Round 2 committed; rounds 3 and 4 wrote block 2 since (its version of round 2 is
    gone), round 4 block 6. The rollback goes to round 3, the oldest at or after the
    committed one that the store holds for every block, and forgets round 4. With the
    round a resume started from (4) as a floor, it keeps round 4. A run that is not the
    store's writer any more changes nothing (it erased the newer fit's versions)."""
    def store_with_rounds(path):
        store = new_store(path)
        store.claim("a")
        for k, blocks in ((1, [2, 6]), (2, [2, 6]), (3, [2]), (4, [2, 6])):
            store.write_blocks("weights", {b: np.full((5, 10), k, np.float32) for b in blocks}, 5 * k, 0, k)
        store.commit({"round": 2, "iteration": 10, "epoch": 0, "run": "a"})
        return store

    store = store_with_rounds(tmp_path / "one.zarr")
    assert store.roll_back("a") == 15
    again = scar.open_store(tmp_path / "one.zarr")
    assert (again.manifest["round"], again.manifest["iteration"]) == (3, 15)
    assert again.records("weights", [2, 6])[:, 2].tolist() == [3, 2]
    assert again.load()["weights"][[10, 30], 0].tolist() == [3.0, 2.0]

    store = store_with_rounds(tmp_path / "two.zarr")
    assert store.roll_back("a", floor=4) == 20
    assert scar.open_store(tmp_path / "two.zarr").records("weights", [2, 6])[:, 2].tolist() == [4, 4]

    store = store_with_rounds(tmp_path / "three.zarr")
    other = ZarrStore.open(tmp_path / "three.zarr", mode="r+")
    other.claim("b")
    with pytest.raises(scar.CheckpointError, match="another fit took the checkpoint store at .* over"):
        store.roll_back("a")
    assert scar.open_store(tmp_path / "three.zarr").records("weights", [2, 6])[:, 2].tolist() == [4, 4]


def test_a_write_to_a_deleted_store_makes_no_folders_again(tmp_path):
    """A write in flight when the store was deleted: its folders would be a path the next
    fit refuses ("not empty and holds no readable dask_scar checkpoint")."""
    store = new_store(tmp_path / "ckpt.zarr")
    ones = np.ones((5, 10), np.float32)
    store.write_blocks("weights", {2: ones}, iteration=5, epoch=0, round=1)
    shutil.rmtree(tmp_path / "ckpt.zarr")
    with pytest.raises(scar.CheckpointError, match="the checkpoint store at .*ckpt.zarr is gone: it was deleted"):
        store.write_blocks("weights", {3: ones}, iteration=5, epoch=0, round=1)
    assert not (tmp_path / "ckpt.zarr").exists()


class _Killed(BaseException):
    pass


def test_a_version_a_cut_short_write_replaced_is_not_used(tmp_path):
    """A worker killed while writing a round, after the blocks' data and before their
    records: the older slot holds new data under its old record. The block's newest
    version stays what it was, the one before counts as gone, and a restore does
    not extrapolate from it (it did: 10 read as the version of iteration 8, and the
    block walked backwards, to 7)."""
    puts = 1
    url = tmp_path / "ckpt.zarr"
    layouts = make_layouts({"w": ((4, 1), "float32")}, 1, 1)    # one block of 4 rows
    store = ZarrStore.create(url, MODEL, layouts, None)

    def at(iteration):      # the parameter walks +1 an iteration
        return np.full((4, 1), float(iteration), np.float32)

    store.write_blocks("w", {0: at(8)}, iteration=8, epoch=0, round=1)
    store.write_blocks("w", {0: at(9)}, iteration=9, epoch=0, round=2)
    put, done = store._io.put, []

    def put_then_die(items):
        if len(done) == puts:
            raise _Killed
        done.append(items)
        put(items)

    store._io.put = put_then_die
    with pytest.raises(_Killed):
        store.write_blocks("w", {0: at(10)}, iteration=10, epoch=0, round=3)

    def restored_after(iteration):
        chunk = Chunk(ChunkId("w", 0, 0, 4), {"value": np.zeros((4, 1), np.float32)}, version=iteration)
        trend = Trend(paths=np.arange(iteration + 1, dtype=float), first_round=0, fresh=True)
        prepare_chunk(chunk, str(url), store.meta["id"], {"w": 4}, True, False, trends={chunk.id: trend})
        return chunk.value[0, 0]

    store = ZarrStore.open(url, mode="r+")
    assert store.records("w")[0].tolist()[:3] == [9, 0, 2]
    np.testing.assert_array_equal(store.read_blocks("w", [0])[0], at(9))
    assert store.read_blocks("w", [0], previous=True) == {}
    assert restored_after(11) == 9          # as saved: nothing to extrapolate from
    # the next write takes the same slot, and restores extrapolate again
    store.write_blocks("w", {0: at(10)}, iteration=10, epoch=0, round=3)
    np.testing.assert_array_equal(store.read_blocks("w", [0], previous=True)[0], at(9))
    assert restored_after(11) == 11


def test_blocks_are_written_as_plain_zarr_chunks(tmp_path):
    # write_blocks encodes the chunks itself: Zarr alone must read them back, the
    # block at the array's edge (3 rows of a 4-row chunk) included
    store = new_store(tmp_path / "ckpt.zarr", {"weights": ((63, 10), "float32")})
    assert (store.layouts["weights"].block_rows, store.layouts["weights"].n_blocks) == (4, 16)
    rng = np.random.default_rng(1)
    rows = {0: rng.random((4, 10), dtype=np.float32), 15: rng.random((3, 10), dtype=np.float32)}
    store.write_blocks("weights", rows, iteration=4, epoch=2, round=1)
    store.write_blocks("weights", {15: rows[15] + 1}, iteration=8, epoch=2, round=2)
    params = zarr.open_array(tmp_path / "ckpt.zarr/params/weights", mode="r")
    np.testing.assert_array_equal(params[0, :4], rows[0])
    np.testing.assert_array_equal(params[0, 60:], rows[15])
    np.testing.assert_array_equal(params[1, 60:], rows[15] + 1)
    assert np.isnan(params[1, :60]).all()
    saved = zarr.open_array(tmp_path / "ckpt.zarr/saved/weights", mode="r")
    assert saved[15, :, :3].tolist() == [[4, 2, 1], [8, 2, 2]] and saved[0].tolist()[1] == [-1, -1, -1, -1]
    # each record's check: the last 4 bytes (the CRC-32C) of the data chunk it describes
    stored = (tmp_path / "ckpt.zarr/params/weights/c/1/15/0").read_bytes()
    assert saved[15, 1, 3] == int.from_bytes(stored[-4:], "little")
    assert not list((tmp_path / "ckpt.zarr").rglob("*.partial"))


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    store = new_store(tmp_path / "ckpt.zarr")
    rng = np.random.default_rng(0)
    store.write_blocks("weights", {3: rng.random((5, 10), dtype=np.float32)}, 4, 0, 1)
    path = tmp_path / "ckpt.zarr/params/weights/c/0/3/0"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(scar.CheckpointError, match=r"block 3 \(rows 15:20, slot 0\) of parameter 'weights'.*corrupt"):
        scar.open_store(tmp_path / "ckpt.zarr").load()


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    url = f"memory://ckpt-{os.getpid()}.zarr" if scheme == "memory" else f"file://{tmp_path}/ckpt.zarr"
    probe(url)
    store = new_store(url)
    store.write_blocks("weights", {1: np.ones((5, 10), np.float32)}, 2, 0, 1)
    np.testing.assert_array_equal(scar.open_store(url).load()["weights"][5:10], 1.0)
    if scheme == "file":
        assert (tmp_path / "ckpt.zarr/params/weights/c/0/1/0").exists()


def test_store_for_another_model_is_refused_saying_what_differs(tmp_path):
    store = new_store(tmp_path / "ckpt.zarr")
    other = make_layouts({"weights": ((33, 10), "float64")}, 4, 4)
    with pytest.raises(scar.StoreMismatchError) as info:
        store.check_compatible({"class": "dask_scar.models.linear.LinearRegression", "params": {}}, other)
    message = str(info.value)
    assert "model class: store has dask_scar.models.softmax.SoftmaxRegression" in message
    assert "shape of 'weights': store has (65, 10), model has (33, 10)" in message
    assert "dtype of 'weights': store has float32, model has float64" in message
    with pytest.raises(scar.CheckpointError, match="already holds a Zarr group"):
        new_store(tmp_path / "ckpt.zarr")


def test_changed_columns_are_named_not_listed():
    from dask_scar.store import _column_change

    wide = [f"f{i}" for i in range(2000)]
    assert _column_change({"features": wide, "target": "y"}, {"features": wide[:-1], "target": "y"}) == \
        "features missing from the data: 'f1999'"
    assert _column_change({"features": wide, "target": "y"}, {"features": [*wide, *"abcdefghijkl"], "target": "z"}) \
        == ("the store has target 'y', the data 'z'; features not in the store: 'a', 'b', 'c', 'd', 'e', 'f', 'g', "
            "'h', 'i', 'j' and 2 more")
    assert _column_change({"features": ["a", "b", "c"], "target": "y"}, {"features": ["a", "c", "b"], "target": "y"}) \
        == "the same features in another order (position 1: the store has 'b', the data 'c')"


def test_unwritable_and_missing_paths(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(scar.CheckpointError, match="cannot write to the checkpoint store at .*a-file/ckpt.zarr"):
        probe(blocker / "ckpt.zarr")
    with pytest.raises(scar.CheckpointError, match="no checkpoint store at"):
        scar.open_store(tmp_path / "nothing-here.zarr")


def test_probes_and_a_create_go_on_while_other_fits_probes_make_and_remove_the_directory(tmp_path):
    # Fits started on one new path at once: a probe that found no directory makes it, and
    # removes it again once it is empty -- also while another fit's probe writes there. A
    # write that met the directory going (mkdir(exist_ok=True) raising FileExistsError)
    # failed its fit with "cannot write": here 2 to 9 probes of 2,000 did.
    url = tmp_path / "ckpt.zarr"
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import contextlib, os, time
        while True:
            with contextlib.suppress(FileExistsError):
                os.mkdir({str(url)!r})
            time.sleep(0.001)
            with contextlib.suppress(OSError):
                os.rmdir({str(url)!r})
        """)])
    try:
        for _ in range(2000):
            probe(url)
        new_store(url)
    finally:
        other.kill()
        other.wait()
    assert scar.open_store(url).unused


def test_a_create_that_meets_another_probe_removing_the_directory_creates_the_store(tmp_path, monkeypatch):
    # The race above, as it meets create() once: another fit's probe makes the directory and
    # removes it between mkdir's attempt and its check. Zarr's set_if_not_exists took the
    # FileExistsError for a zarr.json already there, wrote nothing, and the fit was told
    # that the empty path "already holds a Zarr group".
    url, mkdir = tmp_path / "ckpt.zarr", os.mkdir
    met = []

    def racing(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(url) and not met:
            met.append(path)
            mkdir(path)
            os.rmdir(path)
            raise FileExistsError(17, "File exists", os.fspath(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing)
    new_store(url)
    assert met and scar.open_store(url).unused


def test_an_interrupted_create_leaves_nothing_a_fresh_fit_trips_over(tmp_path, monkeypatch):
    # A Ctrl-C lands while create() makes the arrays: here once the first is written.
    # It used to leave a zarr.json that fit(resume=False) took for a trained store
    # and fit(resume=True) for a damaged one.
    real, made = zarr.Group.create_array, []

    def interrupted(self, *args, **kwargs):
        if made:
            raise KeyboardInterrupt
        made.append(real(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(zarr.Group, "create_array", interrupted)
    path = tmp_path / "ckpt.zarr"
    with pytest.raises(KeyboardInterrupt):
        new_store(path)
    monkeypatch.undo()
    assert len(made) == 1                       # it was cut short after writing something
    assert not path.exists() and not ZarrStore.exists(path)
    with pytest.raises(scar.CheckpointError, match="resume=True, but there is no dask_scar checkpoint store"):
        _check_store_path(str(path), resume=True)
    _check_store_path(str(path), resume=False)  # what a fresh fit checks first
    new_store(path).write_blocks("weights", {0: np.ones((5, 10), np.float32)}, 1, 0, 1)
    np.testing.assert_array_equal(scar.open_store(path).load()["weights"][:5], 1.0)
    # an empty directory made beforehand (a mounted volume, say) stays
    volume = tmp_path / "volume"
    volume.mkdir()
    monkeypatch.setattr(zarr.Group, "create_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new_store(volume)
    assert volume.is_dir() and os.listdir(volume) == []


def test_a_store_whose_creation_was_killed_says_to_delete_it(tmp_path, monkeypatch):
    # the driver SIGKILLed while it created the store: nothing could tidy up
    path = tmp_path / "ckpt.zarr"
    script = textwrap.dedent(f"""
        import os, signal, zarr
        import dask_scar as scar
        from dask_scar.store import ZarrStore, make_layouts
        real = zarr.Group.create_array
        def killed(self, *args, **kwargs):
            real(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        zarr.Group.create_array = killed
        ZarrStore.create({str(path)!r}, {MODEL!r}, make_layouts({{"weights": ((65, 10), "float32")}}, 4, 4), None)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert (path / "zarr.json").exists()
    unfinished = (rf"{path} holds a checkpoint store whose creation did not finish .* Unless a fit is starting on "
                  "it now, delete it; or choose another")
    assert being_created(path)      # (as another fit making its store looks)
    plain = tmp_path / "plain.zarr"     # a user's own Zarr group is no store being made: nothing to wait for
    zarr.open_group(str(plain), mode="w", attributes={"owner": "someone"})
    assert not being_created(plain)
    with pytest.raises(scar.CheckpointError, match="is a directory that is not empty and holds no readable"):
        _check_store_path(str(plain), resume=False)
    monkeypatch.setattr(store_module, "CREATION_SECONDS", 0.0)      # (a creation younger than that: waited for)
    for resume in (False, True):
        with pytest.raises(scar.CheckpointError, match=unfinished):
            _check_store_path(str(path), resume=resume)
    with pytest.raises(scar.CheckpointError, match=unfinished):
        scar.open_store(path)
    # a store an array of which is gone (deleted by hand): damaged, whether resumed or not
    shutil.rmtree(path)
    new_store(path)
    shutil.rmtree(path / "saved")
    damaged = r"is damaged: its array 'saved/weights' is missing .* delete it, or choose another"
    for resume in (False, True):
        with pytest.raises(scar.CheckpointError, match=damaged):
            _check_store_path(str(path), resume=resume)


# -- policies -------------------------------------------------------------------------------

def test_policies_select_the_right_blocks():
    prio = np.array([0.1, 5.0, 0.3, 4.0, 0.0, 9.0, 0.2, 1.0])
    assert scar.FullCheckpoint(every=8).select(8, 1).tolist() == list(range(8))
    assert scar.PrioritizedCheckpoint(0.25, every=2).select(8, 1, prio).tolist() == [1, 5]
    assert scar.PrioritizedCheckpoint(0.5, every=2).select(8, 1, prio).tolist() == [1, 3, 5, 7]
    rr = scar.RoundRobinCheckpoint(0.25, every=2)
    assert [rr.select(8, r).tolist() for r in (1, 2, 3, 4, 5)] == [[0, 1], [2, 3], [4, 5], [6, 7], [0, 1]]
    rnd = scar.RandomCheckpoint(0.25, every=2, seed=3)
    draws = [rnd.select(8, r).tolist() for r in range(1, 6)]
    assert draws == [scar.RandomCheckpoint(0.25, every=2, seed=3).select(8, r).tolist() for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1 and all(len(d) == 2 for d in draws)
    many = [scar.RandomCheckpoint(0.25, every=2, seed=3).select(32, r) for r in range(1, 20)]
    assert all(len(set(d.tolist())) == 8 for d in many)     # never a block twice
    assert [d.tolist() for d in many] != [scar.RandomCheckpoint(0.25, seed=4).select(32, r).tolist()
                                          for r in range(1, 20)]
    # a fraction too small for one block still saves one
    assert [len(policy.select(10, 1, prio[:1].repeat(10))) for policy in (
        scar.PrioritizedCheckpoint(0.01), scar.RoundRobinCheckpoint(0.01), scar.RandomCheckpoint(0.01))] == [1, 1, 1]
    full, prioritized = scar.FullCheckpoint(every=8), scar.PrioritizedCheckpoint(0.25, every=2)
    # the same blocks per iteration: n/8 each
    assert full.count(32) / full.every == prioritized.count(32) / prioritized.every == 4
    assert [k for k in range(1, 9) if prioritized.due(k)] == [2, 4, 6, 8]


def test_a_policys_repr_builds_it_again():
    for policy in (scar.FullCheckpoint(every=8), scar.PrioritizedCheckpoint(0.3, every=3, reference_dtype="float16"),
                   scar.RoundRobinCheckpoint(0.5), scar.RandomCheckpoint(seed=2)):
        again = eval(repr(policy), vars(scar))
        assert type(again) is type(policy) and again.to_json() == policy.to_json()
        # as a store records it, and a resume rebuilds it
        built = from_json(json.loads(json.dumps(policy.to_json())))
        assert repr(built) == repr(policy)
    assert repr(scar.FullCheckpoint(every=8)) == "FullCheckpoint(every=8)"
    assert from_json({"class": "MyPolicy", "every": 3}) is None


@pytest.mark.parametrize("make, message", [
    (lambda: scar.FullCheckpoint(every=0), "every must be a positive integer"),
    (lambda: scar.RandomCheckpoint(every=True), "every must be a positive integer, got True"),
    (lambda: scar.PrioritizedCheckpoint(fraction=0), "fraction must be a finite number > 0 and <= 1"),
    (lambda: scar.PrioritizedCheckpoint(fraction=1.5), "fraction must be a finite number > 0 and <= 1"),
    (lambda: scar.PrioritizedCheckpoint("0.5"), "fraction must be a finite number > 0 and <= 1, got '0.5'"),
    (lambda: scar.RandomCheckpoint(0.5, seed="x"), "seed must be an integer >= 0, got 'x'"),
    (lambda: scar.PrioritizedCheckpoint(reference_dtype="int8"), "reference_dtype must be"),
    (lambda: scar.PrioritizedCheckpoint(0.25).select(4, 1, None), "needs one priority per block"),
])
def test_bad_policy_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _damaged_store(path):
    """A store whose block 3 was saved twice (the newest version then corrupted) and
    block 5 once (its data then deleted)."""
    store = new_store(path)
    rng = np.random.default_rng(0)
    store.write_blocks("weights", {3: rng.random((5, 10), dtype=np.float32),
                                   5: rng.random((5, 10), dtype=np.float32)}, 4, 0, 1)
    store.write_blocks("weights", {3: rng.random((5, 10), dtype=np.float32)}, 8, 0, 2)
    assert store.verify() == (3, [], 0)
    newest = path / "params/weights/c/1/3/0"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    newest.write_bytes(bytes(raw))
    (path / "params/weights/c/0/5/0").unlink()
    return store


def test_verify_reads_every_saved_version_and_names_each_damaged_one(tmp_path):
    _damaged_store(tmp_path / "ckpt.zarr")
    read, problems, _ = scar.open_store(tmp_path / "ckpt.zarr").verify()
    assert read == 1        # block 3's older version; the other two are damaged
    assert len(problems) == 2
    assert re.match(r"block 3 \(rows 15:20, slot 1\) of parameter 'weights' in .* is corrupt", problems[0])
    assert re.match(r"block 5 \(slot 0\) of parameter 'weights' in .* is recorded as saved at iteration 4 but its "
                    r"data is missing", problems[1])


def test_a_fit_whose_store_was_taken_over_commits_no_more_once_the_other_has_ended(tmp_path):
    """Fit 1 (its driver asleep) lost its store to a resume, which trained and ended:
    fit 1's next commit is refused, as it was while the other ran (it was taken, and
    moved the manifest back over the other's finished result)."""
    path = tmp_path / "ckpt.zarr"
    first = ZarrStore.create(path, {"class": "test", "params": {}}, make_layouts({"w": ((11, 3), "float32")}, 2, 2),
                             None, writer="run1")
    first.commit({"round": 4, "iteration": 20, "epoch": 0, "run": "run1"})
    second = ZarrStore.open(path, mode="r+")
    second.claim("run2")
    second.commit({"round": 5, "iteration": 25, "epoch": 1, "run": "run2"})
    with pytest.raises(scar.CheckpointError, match=r"another fit \(run run2\) took the checkpoint store at .* over"):
        first.commit({"round": 5, "iteration": 22, "epoch": 0, "run": "run1"})
    second.release("run2")
    with pytest.raises(scar.CheckpointError, match=r"another fit \(one that has ended since\) took the checkpoint "
                                                   r"store at .* over: fit\(\.\.\., resume=True\) from another driver"):
        first.commit({"round": 3, "iteration": 15, "epoch": 0, "run": "run1"})
    assert ZarrStore.open(path).manifest["iteration"] == 25


def _write_every_block_again_and_again(url: str, seconds: float) -> None:
    store = ZarrStore.open(url, mode="r+")
    layout = store.layouts["weights"]
    deadline, k = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        k += 1
        store.write_blocks("weights", {b: np.full((layout.block_rows, 10), k, np.float32)
                                       for b in range(layout.n_blocks)}, k, 0, k)


def test_a_store_being_written_reads_while_a_fit_writes_it(tmp_path):
    """info() (dask-scar inspect) and load() while another process writes every block
    again and again, as a fit's workers do: info() failed on a temporary file that a
    write renamed between Zarr's listing and its size (about one call in ten)."""
    import multiprocessing

    path = tmp_path / "ckpt.zarr"
    new_store(path)
    writer = multiprocessing.get_context("spawn").Process(target=_write_every_block_again_and_again,
                                                          args=(str(path), 4.0))
    writer.start()
    try:
        wait_for(lambda: scar.open_store(path).saved_at["round"].max() > 0, what="the first write")
        calls = 0
        while writer.is_alive():
            store = scar.open_store(path)
            assert store.info()["blocks_saved"] == store.info()["blocks"]
            assert np.isfinite(store.load()["weights"]).all()
            calls += 1
    finally:
        writer.join()
    assert calls >= 10 and writer.exitcode == 0


def test_verify_counts_an_older_version_a_write_cut_short_overwrote(tmp_path):
    """A write into a block's older slot whose worker died before the record: that
    version is gone, which is no damage; verify says how many."""
    store = new_store(tmp_path / "ckpt.zarr")
    rng = np.random.default_rng(0)
    for round in (1, 2):
        store.write_blocks("weights", {3: rng.random((5, 10), dtype=np.float32)}, 4 * round, 0, round)
    older, newer = (tmp_path / f"ckpt.zarr/params/weights/c/{slot}/3/0" for slot in (0, 1))
    older.write_bytes(newer.read_bytes())       # new data in the older slot, under its old record
    assert store.verify() == (1, [], 1)


def test_a_folder_where_a_blocks_file_belongs_is_named(tmp_path):
    """verify (dask-scar inspect --verify) names the path it cannot read and goes on
    with the other blocks (it ended with a bare IsADirectoryError)."""
    path = tmp_path / "ckpt.zarr"
    store = new_store(path)
    for b in (1, 2):
        store.write_blocks("weights", {b: np.ones((5, 10), np.float32)}, 5, 0, 1)
    data = path / "params/weights/c/0/1/0"
    data.unlink()
    data.mkdir()
    read, problems, _ = scar.open_store(path).verify()
    assert read == 1 and problems == [f"cannot read {data}: Is a directory"]


def test_a_corrupt_record_is_named(tmp_path):
    """A flipped byte in a block's record: verify names it and reads the other blocks;
    reading the records (a resume, inspect) says which record, not zarr's error."""
    store = _damaged_store(tmp_path / "ckpt.zarr")
    record = tmp_path / "ckpt.zarr/saved/weights/c/5/0/0"
    raw = bytearray(record.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    record.write_bytes(bytes(raw))
    read, problems, _ = scar.open_store(tmp_path / "ckpt.zarr").verify()
    assert read == 1 and len(problems) == 2
    said = (r"the record of block 5 \(slot 0\) of parameter 'weights' in .* is corrupt \(.*\): restore the store "
            r"from a copy, or delete that record \(saved/weights chunk 5.0\)")
    assert re.match(said, problems[1])
    with pytest.raises(scar.CheckpointError, match=said):
        store.versions("weights")


def test_opening_a_store_that_is_not_there_to_write_makes_no_folder(tmp_path):
    """A worker that cannot see the driver's store is told so, and finds no empty
    folder of that name made on its own disk afterwards."""
    for url in (tmp_path / "nothere.zarr", f"file://{tmp_path / 'nor-here.zarr'}"):
        with pytest.raises(scar.CheckpointError, match="no checkpoint store at"):
            ZarrStore.open(url, mode="r+")
    assert not list(tmp_path.iterdir())
