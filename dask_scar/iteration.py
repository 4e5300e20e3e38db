"""One training iteration as one task graph, and the functions its tasks run.

For each phase of the model's iteration:

* one *contribution* task per data block, on the block's worker, reads the full
  current parameters (chunks travel to it) and returns the block's partial sums;
* one *update* task per worker, pinned there, combines all blocks' contributions
  for the chunks that worker holds, computes their new state and keeps it as the
  next version of those chunks (:func:`dask_scar.chunks.detach`); where updates
  are cheap (:func:`replicates`) it updates the other chunks too, as replicas, so
  that the next iteration's contribution on the same worker, submitted before this
  one ends, needs nothing from another worker;
* the first update task of phase 0 adds up the loss and sends it to the driver
  with its chunks' registration, as an event on the ``scar-progress`` topic, so
  no task and no round trip is spent on it.

So an iteration has ``(blocks + workers) * phases`` tasks, however many
partitions the data has. Where updates are replicated, a worker's update task
also computes its block's contribution to the *next* iteration, from the values it
just made (:func:`update_and_contribute`): one task per worker and iteration, so
one hand-over through the scheduler fewer. Where updates are replicated and no
callback runs between iterations, :mod:`dask_scar.segment` goes further: many
iterations in one task per worker, sharing :func:`step` with :func:`update`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dask._task_spec import List, Task, TaskRef
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from . import checkpoint
from .backend import get_array_module
from .chunks import Chunk, ChunkId, ParameterChunks, assemble, detach, flatten, reattach, remember
from .models import Contribution, Model


@checkpoint.training_task
def contribute(model: Model, phase: int, block: dict, sources: list, iteration: int, block_id: int,
               run: str) -> Contribution:
    xp = get_array_module(block["X"])
    chunks = flatten(sources)
    remember(run, chunks)       # a copy to restore from, should a chunk's owner die
    params = assemble(chunks, model.phase_inputs(phase), xp)
    return model.contribution(phase, block, params, xp, iteration=iteration, block_id=block_id)


@dataclass
class Fused:
    """An update task's result that also holds its block's next contribution."""

    chunks: dict[ChunkId, Chunk]
    contribution: Contribution


@checkpoint.training_task
def update_and_contribute(model: Model, sources: list, contributions: list, keys: dict[ChunkId, str],
                          iteration: int, client_id: str, run: str, epoch: int, report_loss: bool,
                          orders: checkpoint.Orders | None, block: dict, block_id: int) -> Fused:
    """:func:`update` of ``iteration``, then ``block``'s contribution to the next one."""
    new = update(model, sources, contributions, keys, iteration, client_id, run, epoch, report_loss, orders)
    return Fused(new, contribute(model, 0, block, [new], iteration + 1, block_id, run))


@checkpoint.training_task
def update(model: Model, sources: list, contributions: list[Contribution], keys: dict[ChunkId, str],
           iteration: int, client_id: str, run: str, epoch: int, report_loss: bool,
           orders: checkpoint.Orders | None) -> dict[ChunkId, Chunk]:
    """The new version of every chunk in ``sources`` (see :func:`step`); those in
    ``keys`` (the chunks this worker owns) are kept as data, checkpointed and
    reported. The others are replicas (see :func:`replicates`): the result hands
    them to the next iteration's contribution on this worker."""
    new, progress = step(model, flatten(sources), contributions, list(keys), iteration, run, epoch, orders)
    if not report_loss:
        del progress["loss"]
    detach({key: new[cid] for cid, key in keys.items()}, client_id, run, epoch, [progress])
    remember(run, {cid: chunk for cid, chunk in new.items() if cid not in keys})   # current replicas
    return new


def step(model: Model, current: dict[ChunkId, Chunk], contributions: list, own: list[ChunkId], iteration: int,
         run: str, epoch: int, orders: checkpoint.Orders | None, report: list[ChunkId] | None = None,
         inline: bool = False) -> tuple[dict[ChunkId, Chunk], dict]:
    """Iteration ``iteration`` of every chunk in ``current``, from the blocks'
    ``contributions``; returns the new chunks and the progress event for the driver
    (the loss, and the step norm of each chunk in ``report``, default ``own``).
    Only ``own`` chunks, those this worker owns, are checkpointed as ``orders`` say,
    and carry the checkpoint trail (``inline``: the task writes them itself, see
    :func:`dask_scar.checkpoint.write_now`)."""
    contributions = [getattr(c, "contribution", c) for c in contributions]   # some come in a Fused
    mine = {cid: current[cid] for cid in own}
    for cid, chunk in mine.items():
        if chunk.reference is None and not reattach(run, chunk) and orders is not None \
                and orders.reference is not False:   # a copy from another worker carries none
            initial = model.init_rows(cid.name, cid.start, cid.stop, get_array_module(chunk.value))
            checkpoint.restore_reference(chunk, initial, orders)
    if orders is not None and orders.blocks:
        checkpoint.save(mine, orders, model, inline)   # the values the round was chosen from
    xp = get_array_module(*(chunk.value for chunk in current.values()))
    states, loss = model.apply({cid: chunk.state for cid, chunk in current.items()}, contributions, xp)
    new = {cid: Chunk(cid, states[cid], iteration, chunk.reference, chunk.trail) for cid, chunk in current.items()}
    steps = {}
    for cid in own if report is None else report:
        change = (new[cid].value - current[cid].value).ravel()
        steps[cid.tag] = norm = float(xp.sqrt(xp.vdot(change, change)))  # for recovery's estimates
        if cid in mine and new[cid].trail is not None:
            new[cid].trail.path += norm
    if orders is not None and orders.keep:
        checkpoint.keep(run, {cid: new[cid] for cid in own}, model)
    progress = {"run": run, "epoch": epoch, "iteration": iteration, "steps": steps, "loss": loss}
    if orders is not None and orders.priorities:
        progress["priorities"], progress["turned"] = checkpoint.distances({cid: new[cid] for cid in own}, orders, model)
    return new, progress


def replicates(model: Model, block_rows: list[int]) -> bool:
    """Whether every update task updates every chunk, for data blocks of these sizes
    (see :meth:`~dask_scar.models.Model.replicate_updates`)."""
    return len(model.phases) == 1 and bool(block_rows) and model.replicate_updates(min(block_rows))


@dataclass
class IterationGraph:
    graph: HighLevelGraph
    update_keys: list[str]
    outputs: dict[ChunkId, str]     # the update task whose result holds each chunk's new version
    replicas: dict[str, str]        # worker -> its update task, where that one holds every chunk
    fused: dict[int, str]           # block -> the update task that made its next contribution


def build(model: Model, chunks: ParameterChunks, blocks: list[str], block_workers: list[str],
          iteration: int, client_id: str, orders: checkpoint.Orders | None = None,
          after: IterationGraph | None = None, replicated: bool = False, fuse: bool = False) -> IterationGraph:
    """The graph of ``iteration``: it reads chunk version ``chunks.version`` (or,
    ``after`` the graph before, that graph's results: the driver submits the next
    iteration before this one is done where it can, so that no round trip separates
    them, and otherwise right after it) and
    leaves version ``iteration`` of every chunk on its owner; its update tasks
    carry out the checkpoint ``orders``. ``after`` needs the same owners. With
    ``replicated`` (see :func:`replicates`) every update task updates every chunk,
    and with ``fuse`` too, the update task of a worker that holds a data block
    computes that block's contribution to iteration + 1 (the graph built ``after``
    this one then has no contribution task for the block)."""
    tag = f"{chunks.run}-e{chunks.epoch}"   # in task keys: an iteration redone after a recovery is new work
    sources = {cid: TaskRef(after.outputs[cid] if after is not None else chunks.keys[cid]) for cid in chunks.ids}
    replicas = after.replicas if after is not None else {}
    made = after.fused if after is not None else {}
    fuse = fuse and replicated      # replicated: one phase
    layers: dict[tuple[str, bool], dict[str, Task]] = {}

    def add(key: str, task_worker: str, pinned: bool, func, *args) -> TaskRef:
        layers.setdefault((task_worker, pinned), {})[key] = Task(key, func, *args)
        return TaskRef(key)

    update_keys, replicas_next, fused = [], {}, {}
    first_block = {}
    for b, worker in enumerate(block_workers):
        if worker is not None:
            first_block.setdefault(worker, b)
    for phase, names in enumerate(model.phases):
        inputs = model.phase_inputs(phase)
        refs = list({sources[c].key: sources[c] for c in chunks.ids if c.name in inputs}.values())

        def every_chunk(worker: str) -> list[TaskRef]:
            # any worker's replicated update result holds every chunk: best this worker's own
            return [TaskRef(replicas.get(worker) or min(replicas.values()))] if replicas else refs

        contributions = []
        for b, (block, worker) in enumerate(zip(blocks, block_workers)):
            if phase == 0 and b in made:
                contributions.append(TaskRef(made[b]))    # made by the last graph's update task
                continue
            key = f"scar-contrib-{tag}-{iteration}-{phase}-{b}"
            contributions.append(add(key, worker, False, contribute, model, phase, TaskRef(block),
                                     List(*every_chunk(worker)), iteration, b, chunks.run))
        updated = {}
        for w, (worker, own) in enumerate(sorted(chunks.by_worker(names).items())):
            key = f"scar-update-{tag}-{iteration}-{phase}-{w}"
            new_keys = {cid: chunks.key(cid, iteration) for cid in own}
            mine = every_chunk(worker) if replicated else list({sources[c].key: sources[c] for c in own}.values())
            args = (model, List(*mine), List(*contributions), new_keys, iteration, client_id, chunks.run,
                    chunks.epoch, phase == 0 and w == 0, orders)
            b = first_block.get(worker)
            if fuse and b is not None:
                ref = add(key, worker, True, update_and_contribute, *args, TaskRef(blocks[b]), b)
                fused[b] = key
            else:
                ref = add(key, worker, True, update, *args)
            updated.update({cid: ref for cid in own})
            update_keys.append(key)
            if replicated:
                replicas_next[worker] = key
        sources.update(updated)

    hlg_layers = {
        # a block whose worker died has no place yet: the scheduler runs its task where it is rebuilt
        f"scar-iteration-{tag}-{iteration}-{i}": MaterializedLayer(
            tasks, annotations={"workers": [worker], "allow_other_workers": not pinned} if worker else None)
        for i, ((worker, pinned), tasks) in enumerate(layers.items())
    }
    graph = HighLevelGraph(hlg_layers, {name: set() for name in hlg_layers})
    return IterationGraph(graph, update_keys, {cid: ref.key for cid, ref in sources.items()}, replicas_next, fused)
