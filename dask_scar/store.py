"""The checkpoint store: blocks of the model's parameters in Zarr v3.

Layout of a store (a Zarr group at any path or fsspec URL)::

    zarr.json            group attributes, JSON, written by the driver only:
                           "dask_scar": format, model, parameter layouts, policy
                                        (written once the arrays are: see create)
                           "manifest":  the last committed round (written last)
    params/<name>        one array per parameter, (2, *shape): two slots, each
                         holding one saved version of every block; one Zarr chunk
                         == one block of ``block_rows`` rows in one slot; fill
                         value NaN; crc32c on every chunk
    saved/<name>         (n_blocks, 2, 4) int64: iteration, epoch and round at which
                         each block was written into each slot, and the check of
                         its data (the chunk's CRC-32C); -1 where never (stores
                         written before the check have 3 fields)

A block is written into the slot holding its *older* version, so the store keeps
the two newest versions of every block for the writes of one, and a write never
touches the newest (a write cut short leaves it intact). Recovery reads both to
extrapolate the block's drift since (see :func:`dask_scar.checkpoint.prepare_chunk`);
everything else reads the newest. A write cut short between the data and the
record leaves the older slot with new data under its old record: its check tells,
and that version counts as gone.

A missing Zarr chunk reads back as the fill value without error, so whether a
block was saved is read from ``saved/<name>``, never inferred from the data. The
worker that holds a block writes it, data first and record second, and no other
process writes that Zarr chunk. Nothing from a store is unpickled.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.group import GroupMetadata
from zarr.core.sync import sync

from .exceptions import CheckpointError, MissingPackageError, StoreMismatchError

logger = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT_VERSION = 2
ATTRS = "dask_scar"
#: The attribute a store has in place of :data:`ATTRS` while :meth:`ZarrStore.create`
#: makes its arrays: a store that still has it was never finished (its driver was killed).
CREATING = "dask_scar_creating"
#: An unfinished store whose metadata is younger than this is a creation in progress.
CREATION_SECONDS = 10.0
NEVER = -1
#: A version's record. ``check``: the last 4 bytes of its stored data chunk (the
#: chunk's CRC-32C), so that data a write cut short left under an older record is
#: told from the version the record describes; stores written before it have 3
#: fields, and their checks read as :data:`NEVER` (unknown).
_RECORD = ("iteration", "epoch", "round", "check")
SLOTS = 2                   # versions kept of every block


def pick(versions: np.ndarray, previous: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The records (blocks, 4) of each block's newest version (``previous``: of the one
    before it) among the two slots' ``versions`` (blocks, 2, 4), and their slots.
    Rounds only grow, so the higher is newer; the first write of a block goes to slot 0."""
    newest = 1 - np.argmin(versions[:, :, 2], axis=1)
    slots = 1 - newest if previous else newest
    return versions[np.arange(len(versions)), slots], slots


class Written(NamedTuple):
    """What a store's blocks were last written in (:meth:`CheckpointStore.last_written`)."""

    round: int
    iteration: int
    epoch: int


@dataclass(frozen=True)
class BlockLayout:
    """How parameter ``name`` of ``shape`` is cut into checkpoint blocks of ``block_rows`` rows."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    block_rows: int

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.shape[0] / self.block_rows)

    def bounds(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.shape[0])

    def blocks(self, start: int, stop: int) -> range:
        """The blocks covering rows ``start:stop`` (which must be block-aligned)."""
        if start % self.block_rows or (stop % self.block_rows and stop != self.shape[0]):
            raise ValueError(f"rows {start}:{stop} of {self.name!r} do not fall on block boundaries")
        return range(start // self.block_rows, math.ceil(stop / self.block_rows))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "block_rows": self.block_rows}

    @classmethod
    def from_json(cls, name: str, meta: dict) -> BlockLayout:
        return cls(name, tuple(meta["shape"]), meta["dtype"], int(meta["block_rows"]))


def make_layouts(shapes: dict[str, tuple[tuple[int, ...], str]], n_chunks: int,
                 blocks_per_chunk: int) -> dict[str, BlockLayout]:
    """Layouts giving each of ``n_chunks`` row chunks about ``blocks_per_chunk`` blocks."""
    return {name: BlockLayout(name, tuple(shape), str(dtype), max(1, math.ceil(shape[0] / (n_chunks * blocks_per_chunk))))
            for name, (shape, dtype) in shapes.items()}


class CheckpointStore(abc.ABC):
    """Where checkpoint blocks are kept. Host (NumPy) arrays only.

    Subclasses provide the primitives; reading the whole checkpoint and the
    summaries are built on them.
    """

    url: str
    layouts: dict[str, BlockLayout]
    meta: dict

    @abc.abstractmethod
    def write_blocks(self, name: str, values: dict[int, np.ndarray], iteration: int, epoch: int,
                     round: int) -> int:
        """Write blocks (index -> rows) of ``name``; returns the bytes they take in the store."""

    @abc.abstractmethod
    def versions(self, name: str, blocks: list[int] | None = None) -> np.ndarray:
        """(blocks, 2, 4) int64: the record (iteration, epoch, round, check) of the
        version in each of a block's two slots (-1 where none was saved; :func:`pick`
        tells them apart).
        Blocks default to all of them."""

    def records(self, name: str, blocks: list[int] | None = None, previous: bool = False) -> np.ndarray:
        """(blocks, 4): the records of each block's newest version (``previous``: of the
        version before it)."""
        return pick(self.versions(name, blocks), previous)[0]

    @abc.abstractmethod
    def read_blocks(self, name: str, blocks: list[int], previous: bool = False,
                    versions: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """The saved ones among ``blocks``, newest versions (``previous``: the versions
        before them); raises :class:`CheckpointError` for a corrupt block. ``versions``:
        what :meth:`versions` of these blocks returned, not to read the records again."""

    def last_written(self) -> Written:
        """The highest round any block was written in, its iteration, and the highest
        epoch (0, 0, -1: none), from one read of the records. Rounds that never
        committed count: a resume goes on from the newest blocks it loads, and numbers
        its rounds and epochs after them."""
        newest, epoch = (0, 0), -1
        for name in self.layouts:
            records = self.records(name)
            if len(records) and records[:, 2].max() > newest[0]:
                newest = (int(records[:, 2].max()), int(records[records[:, 2].argmax(), 0]))
            epoch = max(epoch, int(records[:, 1].max(initial=-1)))
        return Written(*newest, epoch)

    def resumes_from(self, written: Written | None = None) -> int:
        """The iteration a resume goes on from: the newest round's written (a resume
        loads the newest version of every block, those of rounds that never committed
        included), else the last committed round's. ``written``: what
        :meth:`last_written` returned, not to read the records again."""
        written = self.last_written() if written is None else written
        if written.epoch < 0:   # no block saved (those of a diverged fit forgotten): the initial values
            return 0
        manifest = self.manifest
        return (written.iteration if written.round > int(manifest.get("round", 0))
                else int(manifest.get("iteration", 0)))

    @abc.abstractmethod
    def commit(self, manifest: dict) -> None:
        """Record a finished round (driver only). Written after the round's blocks.
        Raises :class:`CheckpointError` where the store is gone, or another run than
        ``manifest["run"]`` claimed it (see :meth:`ZarrStore.claim`)."""

    @property
    @abc.abstractmethod
    def manifest(self) -> dict:
        """The last committed round: round, iteration, epoch (empty before the first)."""

    @abc.abstractmethod
    def nbytes_stored(self) -> int:
        """Bytes the checkpoint takes in the store."""

    @property
    def diverged(self) -> int | None:
        """The iteration from which the fit that wrote here last saved diverged values
        (None: it did not diverge)."""
        return None

    def check_present(self) -> None:
        """:class:`CheckpointError` if the store is gone (deleted while training)."""

    # -- built on the primitives ------------------------------------------------
    @property
    def saved_at(self) -> pd.DataFrame:
        """One row per block: parameter, block, start, stop, iteration, epoch, round (-1: never saved)."""
        frames = []
        for name, layout in self.layouts.items():
            rec = self.records(name)
            bounds = np.array([layout.bounds(b) for b in range(layout.n_blocks)]).reshape(-1, 2)
            frames.append(pd.DataFrame({
                "parameter": name, "block": np.arange(layout.n_blocks), "start": bounds[:, 0],
                "stop": bounds[:, 1], **{k: rec[:, i] for i, k in enumerate(_RECORD)}}))
        return pd.concat(frames, ignore_index=True)

    def load(self) -> dict[str, np.ndarray]:
        """Every parameter as a NumPy array; rows of never-saved blocks are NaN."""
        out = {}
        for name, layout in self.layouts.items():
            value = np.full(layout.shape, np.nan, dtype=layout.dtype)
            for block, rows in self.read_blocks(name, list(range(layout.n_blocks))).items():
                start, stop = layout.bounds(block)
                value[start:stop] = rows
            out[name] = value
        return out

    def verify(self) -> tuple[int, list[str], int]:
        """Read every saved version of every block (the newest and the one before),
        checking each against its record: the versions read, what is wrong (a block's
        data missing, or not what its record describes, or corrupt), and the older
        versions overwritten by a newer write cut short (its worker died before the
        record: no damage, that version is gone). Reads the whole store."""
        read, problems, overwritten = 0, [], 0
        for name, layout in self.layouts.items():
            for block in range(layout.n_blocks):
                try:
                    versions = self.versions(name, [block])
                except CheckpointError as exc:      # its record
                    problems.append(str(exc))
                    continue
                for previous in (False, True):
                    try:
                        got = len(self.read_blocks(name, [block], previous, versions))
                    except CheckpointError as exc:
                        problems.append(str(exc))
                        continue
                    read += got
                    overwritten += int(pick(versions, previous)[0][0, 0] != NEVER) - got
        return read, problems, overwritten

    def info(self) -> dict[str, Any]:
        """Size and freshness: bytes stored, blocks saved, how many iterations old
        the saved blocks are at the last committed round (a histogram), and how many
        were written after it (``newer_blocks``, by rounds that never committed: a
        driver or writer died first; a resume and a partial restore read them, a
        rollback does not), up to iteration ``newest_iteration``."""
        saved = self.saved_at
        done = saved[saved["iteration"] != NEVER]
        newest = int(done["iteration"].max()) if len(done) else None
        now = self.manifest.get("iteration", newest or 0)
        newer = done["iteration"] > now
        staleness = now - done["iteration"][~newer]
        edges = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, np.inf]
        counts, _ = np.histogram(staleness, bins=edges)
        labels = [f"{int(a)}" if b - a == 1 else f"{int(a)}-{b - 1:g}" for a, b in zip(edges[:-1], edges[1:])]
        return {
            "url": self.url,
            "model": self.meta.get("model", {}).get("class"),
            "nbytes_stored": self.nbytes_stored(),
            "nbytes_parameters": sum(math.prod(lay.shape) * np.dtype(lay.dtype).itemsize
                                     for lay in self.layouts.values()),
            "blocks": len(saved),
            "blocks_saved": len(done),
            "manifest": self.manifest,
            "staleness": {label: int(c) for label, c in zip(labels, counts) if c},
            "newer_blocks": int(newer.sum()),
            "newest_iteration": newest,
            "resumes_from": self.resumes_from(),
            "diverged": self.diverged,
        }

    def check_compatible(self, model: dict, layouts: dict[str, BlockLayout] | None = None) -> None:
        """Raise :class:`StoreMismatchError` if the store was written for another model:
        its class or columns, and (given ``layouts``, known once the data is read) the
        shapes of its parameters."""
        mine = self.meta["model"]
        diffs = []
        if mine["class"] != model["class"]:
            diffs.append(f"model class: store has {mine['class']}, trainer has {model['class']}")
        ours, theirs = mine.get("columns"), model.get("columns")    # earlier stores do not say
        if ours and theirs and ours != theirs:
            diffs.append(f"columns: {_column_change(ours, theirs)} (give the same names, in the same order)")
        layouts = self.layouts if layouts is None else layouts
        if set(self.layouts) != set(layouts):
            diffs.append(f"parameters: store has {sorted(self.layouts)}, model has {sorted(layouts)}")
        for name in sorted(set(self.layouts) & set(layouts)):
            a, b = self.layouts[name], layouts[name]
            if a.shape != b.shape:
                diffs.append(f"shape of {name!r}: store has {a.shape}, model has {b.shape}")
            if a.dtype != b.dtype:
                diffs.append(f"dtype of {name!r}: store has {a.dtype}, model has {b.dtype}")
        if diffs:
            raise StoreMismatchError(
                f"the checkpoint store {self.url} was written for another model ({'; '.join(diffs)}): "
                "use another store path, or the model and data the store was written for")


def _column_change(stored: dict, now: dict) -> str:
    """How the data's features and target differ from those a store was written for."""
    before, after, out = stored["features"], now["features"], []
    if stored["target"] != now["target"]:
        out.append(f"the store has target {stored['target']!r}, the data {now['target']!r}")
    had, has = set(before), set(after)
    missing, new = [c for c in before if c not in has], [c for c in after if c not in had]
    if missing:
        out.append(f"features missing from the data: {_few(missing)}")
    if new:
        out.append(f"features not in the store: {_few(new)}")
    if not missing and not new and before != after:
        i = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), None)
        out.append("the same features, some named more than once" if i is None else
                   f"the same features in another order (position {i}: the store has {before[i]!r}, "
                   f"the data {after[i]!r})")
    return "; ".join(out)


def _few(names: list, most: int = 10) -> str:
    shown = ", ".join(map(repr, names[:most]))
    return shown if len(names) <= most else f"{shown} and {len(names) - most:,} more"


def local_path(url: str) -> str | None:
    """The local path a store URL names (a path, or a ``file://`` URL); None for others."""
    url = url[len("file://"):] if url.startswith("file://") else url
    return None if "://" in url else url


def _zarr_store(url: str, read_only: bool) -> zarr.abc.store.Store:
    path = local_path(url)
    if path is not None:
        return zarr.storage.LocalStore(path, read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(url, read_only=read_only)
    except ImportError as exc:     # fsspec's message names the package (not always its pip name), not the URL
        fix = "pip install s3fs" if url.startswith(("s3://", "s3a://")) else "install it"
        raise MissingPackageError(f"the checkpoint store {url} needs a filesystem package that is not installed "
                                  f"({exc}): {fix}, here and on every worker") from exc


def _codecs() -> list:
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


_PROTOTYPE = default_buffer_prototype()


def _key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"


def _encode(array: zarr.Array, coords: tuple[int, ...], value: np.ndarray) -> Buffer:
    """The stored bytes of ``array``'s chunk at ``coords`` holding ``value`` (padded
    with the fill value where the chunk reaches past the array's edge)."""
    meta, pipeline = array.metadata, array._async_array.codec_pipeline
    spec = meta.get_chunk_spec(coords, array._async_array.config, _PROTOTYPE)
    if value.shape != spec.shape:
        full = np.full(spec.shape, meta.fill_value, dtype=value.dtype)
        full[tuple(slice(0, n) for n in value.shape)] = value
        value = full
    chunk = _PROTOTYPE.nd_buffer.from_numpy_array(np.ascontiguousarray(value))
    for codec in pipeline.array_array_codecs:
        chunk = codec._encode_sync(chunk, spec)
    buf = pipeline.array_bytes_codec._encode_sync(chunk, spec)
    for codec in pipeline.bytes_bytes_codecs:
        buf = codec._encode_sync(buf, spec)
    return buf


def _check(buf: Buffer) -> int:
    """A stored chunk's last 4 bytes (its CRC-32C, the last codec's), as a number."""
    return int.from_bytes(bytes(buf.as_numpy_array()[-4:]), "little")


def _decode(array: zarr.Array, coords: tuple[int, ...], buf: Buffer) -> np.ndarray:
    pipeline = array._async_array.codec_pipeline
    spec = array.metadata.get_chunk_spec(coords, array._async_array.config, _PROTOTYPE)
    for codec in reversed(pipeline.bytes_bytes_codecs):
        buf = codec._decode_sync(buf, spec)
    chunk = pipeline.array_bytes_codec._decode_sync(buf, spec)
    for codec in reversed(pipeline.array_array_codecs):
        chunk = codec._decode_sync(chunk, spec)
    return chunk.as_numpy_array()


def _gone(url: Any) -> CheckpointError:
    return CheckpointError(f"the checkpoint store at {url} is gone: it was deleted while training")


class _ChunkIO:
    """Whole stored objects by key, many at a time: files on a local disk directly
    (each replaced atomically, as Zarr's LocalStore does), through the store's
    asynchronous API in one call otherwise."""

    def __init__(self, store: zarr.abc.store.Store):
        self.store = store
        self.root = store.root if isinstance(store, zarr.storage.LocalStore) else None

    def get(self, keys: list[str]) -> list[Buffer | None]:
        if self.root is None:
            async def get_all() -> list[Buffer | None]:
                return await asyncio.gather(*(self.store.get(k, _PROTOTYPE) for k in keys))
            return sync(get_all())
        out = []
        for key in keys:
            try:
                out.append(_PROTOTYPE.buffer.from_bytes((self.root / key).read_bytes()))
            except FileNotFoundError:
                out.append(None)
            except OSError as exc:  # a folder where a block's file belongs, no permission to read it
                raise CheckpointError(f"cannot read {self.root / key}: {exc.strerror or exc}") from None
        return out

    def put(self, items: list[tuple[str, Buffer]]) -> None:
        if self.root is None:
            async def set_all() -> None:
                await asyncio.gather(*(self.store.set(k, buf) for k, buf in items))
            sync(set_all())
            return
        for key, buf in items:
            path = self.root / key
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
            try:
                try:
                    tmp.write_bytes(buf.as_buffer_like())
                except FileNotFoundError:       # the first chunk in its folder, or the store is gone
                    if not (self.root / "zarr.json").exists():
                        # a write in flight would make the deleted store's folders again, and
                        # the next fit would find a folder that holds no store at its path
                        raise _gone(self.root) from None
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp.write_bytes(buf.as_buffer_like())
                tmp.replace(path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


class ZarrStore(CheckpointStore):
    """:class:`CheckpointStore` in a Zarr v3 group at a path or fsspec URL
    (``file://``, ``s3://``, ``memory://`` — the latter only within one process)."""

    def __init__(self, url: str | os.PathLike, group: zarr.Group):
        self.url = os.fspath(url)
        self.group = group
        self.meta = dict(group.attrs[ATTRS])
        if self.meta.get("format") != FORMAT_VERSION:
            raise StoreMismatchError(f"{self.url} is a dask_scar store of format {self.meta.get('format')}; "
                                     f"this version reads format {FORMAT_VERSION}")
        self.layouts = {name: BlockLayout.from_json(name, m) for name, m in self.meta["parameters"].items()}
        self._arrays: dict[str, zarr.Array] = {}
        self._io = _ChunkIO(group.store)

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "r") -> ZarrStore:
        """Open an existing store; ``mode="r+"`` to write blocks into it."""
        url = os.fspath(url)
        path = local_path(url)
        try:
            # (a local store opened to write makes its folder: not for one that is not there)
            group = None if path is not None and not os.path.isdir(path) else zarr.open_group(
                _zarr_store(url, read_only=mode == "r"), mode=mode)
        except FileNotFoundError:       # (zarr's NodeNotFoundError too)
            group = None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"the checkpoint store at {url} is damaged: its metadata (zarr.json) is not "
                                  f"JSON ({exc}). Restore it from a copy, or start afresh in another path") from exc
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot open the checkpoint store at {url}: {exc}") from exc
        if group is None:   # raised here, not in the handler: zarr's error as its context could not
            # travel from a worker to the driver (its two bases defeat unpickling: a bare Exception arrived)
            raise CheckpointError(f"no checkpoint store at {url}")
        if ATTRS not in group.attrs:
            if CREATING in group.attrs:
                raise CheckpointError(
                    f"{url} holds a checkpoint store whose creation did not finish (its fit was killed before "
                    "it had made the store's arrays, or is making them now): it holds nothing. Unless a fit is "
                    "starting on it now, delete it; or choose another store path")
            raise StoreMismatchError(f"{url} holds a Zarr group that is not a dask_scar checkpoint store")
        return cls(url, group)

    @classmethod
    def exists(cls, url: str | os.PathLike) -> bool:
        """True if ``url`` holds a dask_scar store, also one whose creation did not finish
        (:meth:`open` raises for that one)."""
        attrs = _group_attrs(url)
        return ATTRS in attrs or CREATING in attrs

    @classmethod
    def create(cls, url: str | os.PathLike, model: dict, layouts: dict[str, BlockLayout],
               policy: dict | None, writer: str | None = None) -> ZarrStore:
        """Create an empty store (the driver does this once, before training), claimed
        by ``writer`` from the start (:meth:`claim`): another fit does not take it for
        one left :attr:`unused`.

        The arrays are made first, and the attributes that make the group a dask_scar
        store last (:data:`CREATING` stands in for them until then). A creation that
        fails or is interrupted (Ctrl-C) removes what it wrote; one whose process is
        killed leaves a group that :meth:`open` says was never finished."""
        url = os.fspath(url)
        meta = {"format": FORMAT_VERSION, "id": uuid.uuid4().hex, "model": model, "policy": policy,
                "parameters": {name: lay.to_json() for name, lay in layouts.items()}}
        try:
            zstore = _zarr_store(url, read_only=False)
            # Zarr's mode="w-" checks, then writes: two fits creating a store on one path at once
            # could both pass the check. The group's metadata is written where none is (at once,
            # in a local directory), and the fit goes on only if what is there is its own.
            metadata = GroupMetadata(attributes={CREATING: meta["id"]}).to_buffer_dict(default_buffer_prototype())

            def claim() -> bool:
                """Write the metadata where none is; whether that made the store's directory."""
                made = _makes_root(zstore)
                sync(zstore.set_if_not_exists("zarr.json", metadata["zarr.json"]))
                # LocalStore.set_if_not_exists takes a FileExistsError for "already there", the
                # directory race's too (its mkdir), where nothing was written: a race to try again
                if not sync(zstore.exists("zarr.json")):
                    raise FileNotFoundError(f"{url}: zarr.json not written")
                return made

            made_root = _past_directory_races(claim)
            if _group_attrs(url).get(CREATING) != meta["id"]:
                raise CheckpointError(f"{url} already holds a Zarr group, or another fit is creating its store "
                                      "there; choose another store path")
            group = zarr.open_group(zstore, mode="r+")
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointError(f"cannot create the checkpoint store at {url}: {exc}; "
                                  "choose a writable path or URL") from exc
        try:
            for name, lay in layouts.items():
                group.create_array(f"params/{name}", shape=(SLOTS, *lay.shape), dtype=lay.dtype,
                                   chunks=(1, lay.block_rows, *lay.shape[1:]), fill_value=np.nan,
                                   compressors=_codecs())
                group.create_array(f"saved/{name}", shape=(lay.n_blocks, SLOTS, len(_RECORD)), dtype="int64",
                                   chunks=(1, 1, len(_RECORD)), fill_value=NEVER, compressors=[Crc32cCodec()])
            group.attrs.put({ATTRS: meta, "writer": writer})
        except BaseException as exc:
            _remove_unfinished(zstore, made_root)
            if isinstance(exc, OSError):
                raise CheckpointError(f"cannot create the checkpoint store at {url}: {exc}; "
                                      "choose a writable path or URL") from exc
            raise
        return cls(url, group)

    # -- primitives ------------------------------------------------------------------
    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            try:
                self._arrays[path] = self.group[path]
            except KeyError:
                raise CheckpointError(f"the checkpoint store at {self.url} is damaged: its array {path!r} is "
                                      "missing (was the store deleted while a fit wrote it?). To start afresh, "
                                      "delete it, or choose another store path") from None
        return self._arrays[path]

    def check_arrays(self) -> None:
        """Raise :class:`CheckpointError` where one of the store's arrays is missing."""
        for name in self.layouts:
            for kind in ("params", "saved"):
                self._array(f"{kind}/{name}")

    def write_blocks(self, name: str, values: dict[int, np.ndarray], iteration: int, epoch: int,
                     round: int) -> int:
        # Zarr chunks encoded here with the arrays' own codecs and put with one call,
        # not through Array.__setitem__: a few small blocks a round, and Zarr's cost per
        # chunk (a thread hop each for the codec and the file) was most of a round's.
        data, saved = self._array(f"params/{name}"), self._array(f"saved/{name}")
        blocks = list(values)
        slots = pick(self.versions(name, blocks), previous=True)[1]     # a write replaces the older
        chunks, records = [], []
        for b, slot in zip(blocks, slots):
            coords = (int(slot), b) + (0,) * (data.ndim - 2)
            buf = _encode(data, coords, values[b][None])
            chunks.append((_key(data, coords), buf))
            record = np.array([[[iteration, epoch, round, _check(buf)]]], dtype=np.int64)[..., :saved.shape[2]]
            coords = (b, int(slot), 0)
            records.append((_key(saved, coords), _encode(saved, coords, record)))
        # Every record only once every block's data is in. A write cut short (its
        # worker killed) may leave new data in the older slot under its old record:
        # the record's check tells (see read_blocks).
        self._io.put(chunks)
        self._io.put(records)
        return sum(len(buf) for _, buf in chunks)

    def versions(self, name: str, blocks: list[int] | None = None) -> np.ndarray:
        saved = self._array(f"saved/{name}")
        blocks = range(self.layouts[name].n_blocks) if blocks is None else blocks
        coords = [(int(b), s, 0) for b in blocks for s in range(SLOTS)]
        out = np.full((len(coords), len(_RECORD)), NEVER, dtype=np.int64)
        for i, (c, buf) in enumerate(zip(coords, self._io.get([_key(saved, c) for c in coords]))):
            if buf is None:
                continue
            try:
                out[i, :saved.shape[2]] = _decode(saved, c, buf).reshape(-1)
            except Exception as exc:  # noqa: BLE001  (a codec error: checksum, truncated data)
                raise CheckpointError(
                    f"the record of block {c[0]} (slot {c[1]}) of parameter {name!r} in {self.url} is corrupt "
                    f"({exc}): restore the store from a copy, or delete that record (saved/{name} chunk "
                    f"{c[0]}.{c[1]}) so that the block counts as never saved in that slot") from exc
        return out.reshape(-1, SLOTS, len(_RECORD))

    def read_blocks(self, name: str, blocks: list[int], previous: bool = False,
                    versions: np.ndarray | None = None, _tries: int = 3) -> dict[int, np.ndarray]:
        layout = self.layouts[name]
        data = self._array(f"params/{name}")
        records, slots = pick(self.versions(name, blocks) if versions is None else versions, previous)
        saved = [(block, int(s), record) for block, s, record in zip(blocks, slots, records) if record[0] != NEVER]
        coords = [(s, block) + (0,) * (data.ndim - 2) for block, s, _ in saved]
        out, retry = {}, False
        for (block, s, record), c, buf in zip(saved, coords, self._io.get([_key(data, c) for c in coords])):
            start, stop = layout.bounds(block)
            if buf is None:
                raise CheckpointError(f"block {block} (slot {s}) of parameter {name!r} in {self.url} is recorded "
                                      f"as saved at iteration {record[0]} but its data is missing")
            try:
                if record[3] != NEVER and _check(buf) != record[3]:
                    if previous:    # a newer write into this slot was cut short: this version is gone
                        continue
                    if versions is None and _tries > 1:     # a fit writing here rewrote it since its record was read
                        retry = True
                        break
                    raise ValueError(f"its data is not the version its record describes, iteration {record[0]}")
                rows = _decode(data, c, buf)[0, :stop - start]
            except Exception as exc:  # noqa: BLE001  (a codec error: checksum, truncated data)
                raise CheckpointError(
                    f"block {block} (rows {start}:{stop}, slot {s}) of parameter {name!r} in {self.url} is "
                    f"corrupt ({exc}); it cannot be loaded. Restore the store from a copy, or delete that "
                    f"block's record (saved/{name} chunk {block}.{s}) so it counts as never saved") from exc
            out[block] = rows
        if retry:   # (outside the handler above: an error of the next try is not wrapped in this one's)
            return self.read_blocks(name, blocks, _tries=_tries - 1)
        return out

    def commit(self, manifest: dict) -> None:
        group = self._fresh()
        writer = group.attrs.get("writer")
        if writer != manifest.get("run"):   # (None: one that took it over has ended since)
            raise CheckpointError(f"another fit ({f'run {writer}' if writer else 'one that has ended since'}) took "
                                  f"the checkpoint store at {self.url} over: fit(..., resume=True) from another driver")
        group.attrs.update({"manifest": manifest})
        self.group = group

    def claim(self, run: str) -> None:
        """Record the fit now writing here: its ``run``, from then on the only one whose
        commits are taken."""
        self._update({"writer": run})

    def _update(self, attrs: dict) -> None:
        """Set the group's ``attrs`` as it is stored now (:meth:`_fresh`)."""
        group = self._fresh()
        group.attrs.update(attrs)
        self.group = group

    def record(self, run: str, model: dict, policy: dict) -> None:
        """Record the model (class, hyperparameters, columns) and the policy of ``run``,
        once it has loaded what it resumes from, unless another fit claimed the store
        meanwhile. It raises nothing: where this cannot be written, neither can the
        run's rounds, which say so."""
        try:
            group = self._fresh()
            if group.attrs.get("writer") != run:
                return
            meta = {**self.meta, "model": model, "policy": policy}
            group.attrs.update({ATTRS: meta})
            self.meta, self.group = meta, group
        except OSError:
            logger.warning("could not record the model and policy in the checkpoint store at %s", self.url,
                           exc_info=True)

    def destroy(self) -> None:
        """Delete the whole store, if it is still this one (another fit creating a store
        on the same path at the same moment may have made its own there)."""
        if _group_attrs(self.url).get(ATTRS, {}).get("id") == self.meta["id"]:
            sync(self.group.store.delete_dir(""))

    def release(self, run: str) -> None:
        """``run`` has ended: no fit writes here now (unless another claimed the store
        since). It runs however the fit ended, so it raises nothing: a failure here must
        not hide the fit's own (a store gone, a full disk)."""
        self._set_if_writer(run, {"writer": None}, "release")

    def mark_diverged(self, run: str, iteration: int) -> None:
        """Record that ``run``, still the store's writer, diverged: the versions saved
        from ``iteration`` on are not to be resumed from (:meth:`drop_diverged`). It
        raises nothing, like :meth:`release`: the fit's own error comes first."""
        self._set_if_writer(run, {"diverged": int(iteration)}, "mark as diverged")

    def _set_if_writer(self, run: str, attrs: dict, doing: str) -> None:
        """Set the group's ``attrs`` if ``run`` is still the store's writer; raises
        nothing (a failure is logged as not being able to do ``doing``)."""
        try:
            group = self._fresh()
            if group.attrs.get("writer") == run:
                group.attrs.update(attrs)
                self.group = group
        except Exception:  # noqa: BLE001
            logger.debug("could not %s the checkpoint store at %s", doing, self.url, exc_info=True)

    @property
    def diverged(self) -> int | None:
        return self.group.attrs.get("diverged")

    def check_present(self) -> None:
        self._fresh()

    def roll_back(self, run: str, floor: int = 0) -> int:
        """For a full recovery of ``run``, once no write is in flight: make the oldest
        round of which the store still holds every block's version, at or after the
        last committed one and ``floor`` (the round the fit started from), the last
        committed one, and forget every version written after it (the timeline rolled
        back). That is the committed round, or a later one where writes since
        overwrote a block's version of it (the manifest lags the writes, and a block
        keeps two versions). Returns its iteration. Raises :class:`CheckpointError`,
        having changed nothing, where ``run`` is not the store's writer any more."""
        group = self._fresh()
        if group.attrs.get("writer") != run:
            raise CheckpointError(f"another fit took the checkpoint store at {self.url} over")
        self.group = group
        manifest, versions = self.manifest, {name: self.versions(name) for name in self.layouts}
        committed = int(manifest.get("round", 0))
        rounds = np.concatenate([v[:, :, 2] for v in versions.values()])
        older = rounds[(rounds != NEVER).all(axis=1)].min(axis=1)    # blocks written twice: the older round
        back = max(committed, floor, int(older.max(initial=0)))
        for name, v in versions.items():
            self._forget_versions(name, v[:, :, 2] > back)
        if back == committed:
            return int(manifest.get("iteration", 0))
        record = max(tuple(r[:3]) for v in versions.values() for r in v.reshape(-1, v.shape[2]) if r[2] == back)
        self.commit({**manifest, "round": back, "iteration": int(record[0]), "epoch": int(record[1]), "run": run})
        return int(record[0])

    def _forget_versions(self, name: str, which: np.ndarray) -> None:
        """Record the versions ``which`` (blocks, slots) of parameter ``name`` as never saved."""
        saved = self._array(f"saved/{name}")
        never = np.full((1, 1, saved.shape[2]), NEVER, dtype=np.int64)
        self._io.put([(_key(saved, (int(b), int(s), 0)), _encode(saved, (int(b), int(s), 0), never))
                      for b, s in zip(*np.nonzero(which))])

    def drop_diverged(self, run: str) -> tuple[int, int, int]:
        """For ``run``, a resume that claimed the store: forget every version saved from
        the iteration :meth:`mark_diverged` recorded on, and make the newest round left
        the last committed one (the manifest's) where it was later. Returns the versions
        forgotten, the blocks left with none (they start again from their initial
        values), and the highest round written before: ``run`` numbers its rounds after
        it, so that a write of the diverged fit still in flight cannot rank as newer."""
        cutoff, dropped, emptied, highest, newest = self.diverged, 0, 0, 0, (0, 0)   # newest: round, iteration
        for name in self.layouts:
            versions = self.versions(name)
            late, written = versions[:, :, 0] >= cutoff, versions[:, :, 2] != NEVER
            self._forget_versions(name, late)
            dropped += int(late.sum())
            emptied += int((written.any(axis=1) & ~(written & ~late).any(axis=1)).sum())
            highest = max(highest, int(versions[:, :, 2].max(initial=0)))
            kept = versions[written & ~late]
            if len(kept):
                newest = max(newest, (int(kept[:, 2].max()), int(kept[kept[:, 2].argmax(), 0])))
        manifest = self.manifest    # (its round's versions may be gone too: overwritten by the diverged fit's)
        if manifest and (manifest.get("iteration", 0) >= cutoff or manifest.get("round", 0) > newest[0]):
            self.commit({**manifest, "round": newest[0], "iteration": newest[1], "run": run})
        self._update({"diverged": None})
        return dropped, emptied, highest

    @property
    def unused(self) -> bool:
        """Whether no fit writes here and none ever saved a block (one stopped before its
        first checkpoint round: a callback's error, Ctrl-C): nothing to resume from."""
        return self.writer is None and not self.manifest and all(
            (self.versions(name)[:, :, 0] == NEVER).all() for name in self.layouts)

    @property
    def writer(self) -> str | None:
        """The run writing here, as last read (None: none, or one that ended)."""
        return self.group.attrs.get("writer")

    def _fresh(self) -> zarr.Group:
        """The group as it is stored now (another driver may have written its
        attributes since this one read them); :class:`CheckpointError` if it is gone."""
        try:
            group = zarr.open_group(self.group.store, mode="r+")
        except FileNotFoundError:      # (zarr's NodeNotFoundError too)
            group = None
        if group is None or ATTRS not in group.attrs:
            raise _gone(self.url)
        return group

    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs.get("manifest", {}))

    def nbytes_stored(self) -> int:
        # Zarr's own nbytes_stored lists the files, then sizes them: a fit's write renames its
        # temporary file in between (info() failed in about one call in ten while a fit wrote).
        # A file gone meanwhile, or one being written, counts as nothing.
        async def size(store, key: str) -> int:
            try:
                return await store.getsize(key)
            except FileNotFoundError:
                return 0

        async def total(places) -> int:
            sizes = []
            for where in places:
                keys = [key async for key in where.store.list_prefix(where.path) if not key.endswith(".partial")]
                sizes += await concurrent_map([(where.store, key) for key in keys], size,
                                              limit=zarr.config.get("async.concurrency"))
            return sum(sizes)

        return sync(total([self._array(f"{kind}/{name}").store_path for name in self.layouts
                           for kind in ("params", "saved")]))


def being_created(url: str | os.PathLike) -> bool:
    """Whether another fit is creating a store at ``url`` right now: the store is not
    finished, and its metadata is under :data:`CREATION_SECONDS` old. (Said of local
    directories only: elsewhere, False.)"""
    path = local_path(os.fspath(url))
    if path is None:
        return False
    try:
        age = time.time() - os.path.getmtime(os.path.join(path, "zarr.json"))
    except OSError:
        return False
    attrs = _group_attrs(url)
    return abs(age) < CREATION_SECONDS and CREATING in attrs and ATTRS not in attrs


def _group_attrs(url: str | os.PathLike) -> dict:
    """The attributes of the Zarr group at ``url`` (empty where there is none)."""
    try:
        return dict(zarr.open_group(_zarr_store(os.fspath(url), read_only=True), mode="r").attrs)
    except (FileNotFoundError, OSError, ValueError):
        return {}


#: How long a failed :meth:`ZarrStore.create` waits for the writes still in flight to end.
SETTLE_SECONDS = 10.0


def _remove_unfinished(store: zarr.abc.store.Store, made_root: bool) -> None:
    """Delete what :meth:`ZarrStore.create` wrote into ``store`` before it was stopped
    (``made_root``: the store's local directory too, once empty). Raises nothing: the
    error that stopped it is the one to see."""
    try:
        # A Ctrl-C stops the driver's thread, not the write it waited for on Zarr's event
        # loop: let that end first, or it would put its file back once the rest is gone.
        sync(_settled(), timeout=SETTLE_SECONDS + 1)
        for prefix in ("params", "saved"):
            sync(store.delete_dir(prefix))
        sync(store.delete("zarr.json"))     # last: until then it tells that the store is unfinished
        if made_root:
            _remove_root(store)
    except Exception:  # noqa: BLE001
        logger.warning("could not remove the unfinished checkpoint store at %s", store, exc_info=True)


async def _settled() -> None:
    """Once the other tasks on this event loop (Zarr's) have ended, or after :data:`SETTLE_SECONDS`."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=SETTLE_SECONDS)


PROBE_PREFIX = ".scar-probe-"       # the scratch objects of probe()


def _past_directory_races(write: Callable[[], T]) -> T:
    """``write()``, tried again where it met a local store's directory that another fit's
    probe of the same path made and removed meanwhile: a file opened in a directory just
    gone, or mkdir(exist_ok=True) seeing the directory when it tries and not when it checks
    (FileExistsError). A probe's try removes the directory only where it made it, and
    only while it is empty; five tries leave room for several fits started at once."""
    for tries in range(5, 0, -1):
        try:
            return write()
        except (FileNotFoundError, FileExistsError):
            if tries == 1:
                raise
            time.sleep(0.01)


def probe(url: str | os.PathLike) -> None:
    """Write and delete a scratch object at ``url``: raises :class:`CheckpointError`
    where this process cannot write there. The store's local directory, if it made it,
    goes again (a fit that fails before it creates its store leaves no store directory;
    parent directories it made stay)."""
    url = os.fspath(url)
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"

    def write() -> None:
        store = _zarr_store(url, read_only=False)
        made_root = _makes_root(store)
        try:
            sync(store.set(key, default_buffer_prototype().buffer.from_bytes(b"probe")))
            sync(store.delete(key))
        finally:
            if made_root:
                _remove_root(store)

    try:
        _past_directory_races(write)
    except Exception as exc:  # noqa: BLE001  (whatever the reason, it cannot be written)
        raise CheckpointError(f"cannot write to the checkpoint store at {url}: {exc}; "
                              "choose a writable path or URL") from exc


def _makes_root(store: zarr.abc.store.Store) -> bool:
    """Whether writing to ``store`` makes its local directory (none is there yet)."""
    return isinstance(store, zarr.storage.LocalStore) and not store.root.is_dir()


def _remove_root(store: zarr.storage.LocalStore) -> None:
    """Remove the store's local directory if it is empty (something else may have been
    put there meanwhile)."""
    with contextlib.suppress(OSError):
        store.root.rmdir()


def open_store(url: str | os.PathLike) -> ZarrStore:
    """Open a checkpoint store read-only, for inspection: ``saved_at``, ``load()``, ``info()``
    (a local path's ``~`` expanded, as by :class:`~dask_scar.Trainer`)."""
    url = os.fspath(url)
    return ZarrStore.open(url if "://" in url else os.path.expanduser(url), mode="r")
