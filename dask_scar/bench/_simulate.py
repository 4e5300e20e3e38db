"""Simulated failures: the trainer's maths and checkpointing in one process, no Dask.

A :class:`Simulation` runs a model exactly as :class:`~dask_scar.Trainer` does --
the same parameter chunks (:func:`~dask_scar.chunks.split_rows`), placed on
workers the same way (:func:`~dask_scar.chunks.place`, with stand-in worker
names in the same order), the same checkpoint blocks, one data block per
worker, the same policies selecting blocks at the same iterations, and the same
recovery rules -- but a "failure" only puts back, in place, the values a real
recovery would restore:

* a round selected after iteration ``t`` is written with the values of ``t``
  while iteration ``t + 1`` runs, and is abandoned if a worker dies first (as in
  the real runs, whose ``callback`` keeps graphs from being submitted ahead; a fit
  without one writes it while ``t + 2`` runs);
* ``partial``: the chunks of the dead workers take their blocks as last saved
  (blocks never saved: their initial value) -- extrapolated along the drift
  between their last two saved versions, by the chunk's path since over its path
  between them (:func:`dask_scar.checkpoint.trend_factors`), unless the strategy or
  the model says not to, but for the blocks whose drift turned when priorities were
  last measured (:func:`dask_scar.checkpoint.distances`) -- optimizer state
  restarts (Nesterov's velocity from that drift, where it is extrapolated), every
  other chunk keeps its value, and the iteration in flight is redone -- or, with
  ``copies``, they take the previous iteration's state, which every live
  worker's contribution task had copied (the current state for models whose
  update tasks keep replicas of every chunk: :func:`dask_scar.iteration.replicates`);
* ``full``: every chunk goes back to the last committed round, and so does the
  iteration count;
* a dead worker's data block loses its partition-local state (LDA's topic
  assignments), which the model rebuilds from the current parameters.

One failure-free pass tracks every policy's store at once (the parameters do
not depend on the policy until a failure) and keeps a snapshot at each failure
iteration, so a trial only runs from its failure on. This is what makes many
trials cheap; :mod:`dask_scar.bench._real` runs the same cases with real kills,
and the two agree (``tests/test_bench.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from ..checkpoint import (block_distances, chunk_blocks, drift_step, extrapolated, held_back, step_scales,
                          trend_factors)
from ..chunks import Chunk, ChunkId, place, split_rows
from ..iteration import replicates
from ..models import Model
from ..models._base import LOCAL_STATE
from ..policy import CheckpointPolicy
from ..store import BlockLayout, make_layouts


@dataclass
class Strategy:
    """A checkpoint policy and a recovery mode, under a short name."""

    name: str
    policy: CheckpointPolicy
    recovery: str           # "partial" or "full"
    copies: bool = False    # restore from live workers' earlier copies (scar.recovery.replicas)
    extrapolate: bool = True   # extrapolate restored blocks (scar.recovery.extrapolate)
    hold_turned: bool = True   # but blocks whose drift turned, taken as saved (False: the restore before)


@dataclass
class SimStore:
    """What one policy's checkpoint store holds, and the round selected but not yet written."""

    policy: CheckpointPolicy
    stored: dict[str, np.ndarray]          # blocks as last saved; initial values where never saved
    saved_at: dict[str, np.ndarray]        # per block: iteration saved, -1 never
    previous: dict[str, np.ndarray]        # blocks as saved the time before (the store's other slot)
    previous_at: dict[str, np.ndarray]     # per block: iteration of that, -1 none
    paths: dict[str, np.ndarray]           # per block: its chunk's path when saved, and the time before
    extrapolate: bool = False              # priorities: distance from where a restore would put a block
    turned: dict[str, np.ndarray] | None = None     # per block: its drift turned, as last measured (None: never held)
    round: int = 0
    committed: int = 0                     # iteration of the last committed round
    pending: tuple[int, dict[str, np.ndarray]] | None = None   # (iteration, block numbers per parameter)
    bytes_written: int = 0
    rounds_written: int = 0

    @property
    def bytes_per_iteration(self) -> float:
        """Bytes the policy writes per iteration (rounds written so far, spread over its interval)."""
        return self.bytes_written / self.rounds_written / self.policy.every if self.rounds_written else 0.0


@dataclass
class Snapshot:
    iteration: int
    states: dict[ChunkId, dict]
    previous: dict[ChunkId, dict]          # the states one iteration earlier: what contributions copied
    paths: dict[ChunkId, float]            # each chunk's path: its step norms summed
    local: list
    stores: dict[str, SimStore]


@dataclass
class Trial:
    """What one simulated failure cost."""

    strategy: str
    failure_iteration: int
    victims: tuple[int, ...]
    losses: list[float]                    # every iteration run, rolled-back ones included
    lost_chunks: int
    perturbation: float                    # ||restored - lost|| over the parameters
    bytes_read: int
    resumed_at: int


class Simulation:
    """``model`` (set up) on ``blocks`` (one per stand-in worker), chunked like the trainer."""

    def __init__(self, model: Model, blocks: list[dict[str, np.ndarray]], n_chunks: int, blocks_per_chunk: int):
        self.model = model
        self.blocks = blocks
        self.replicated = replicates(model, [len(b["X"]) for b in blocks if "X" in b])
        self.workers = [f"w{i:03d}" for i in range(len(blocks))]
        specs = model.parameter_specs()
        self.layouts: dict[str, BlockLayout] = make_layouts(
            {name: (spec.shape, spec.dtype) for name, spec in specs.items()}, n_chunks, blocks_per_chunk)
        self.ids = split_rows(self.layouts, n_chunks)
        self.owner = place(self.ids, self.workers)
        self.initial = {name: np.asarray(model.init_rows(name, 0, spec.shape[0], np)) for name, spec in specs.items()}

    # -- the maths of one iteration ------------------------------------------------------
    def values(self, states: dict[ChunkId, dict]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([states[c]["value"] for c in self.ids if c.name == name])
                for name in self.layouts}

    def step(self, states: dict[ChunkId, dict], iteration: int) -> float:
        """Iteration ``iteration`` in place on ``states``; returns its loss."""
        model, loss = self.model, math.nan
        for phase, names in enumerate(model.phases):
            params = {n: v for n, v in self.values(states).items() if n in model.phase_inputs(phase)}
            parts = [model.contribution(phase, block, params, np, iteration=iteration, block_id=b)
                     for b, block in enumerate(self.blocks)]
            # all of the phase's chunks at once, as a replicated update task holds them
            # (L-BFGS needs them together; per-chunk updates are the same either way)
            new, phase_loss = model.apply({cid: states[cid] for cid in self.ids if cid.name in names}, parts, np)
            states.update(new)
            if phase == 0:
                loss = phase_loss
        return float(loss)

    def fresh_states(self) -> dict[ChunkId, dict]:
        return {cid: self.model.new_state(cid.name, self.initial[cid.name][cid.start:cid.stop].copy())
                for cid in self.ids}

    # -- checkpointing ---------------------------------------------------------------------
    def extrapolates(self, strategy: Strategy) -> bool:
        """Whether ``strategy`` restores extrapolated (as :meth:`dask_scar.Trainer._extrapolates`)."""
        return strategy.extrapolate and strategy.recovery == "partial" and self.model.extrapolate_restores

    def new_store(self, strategy: Strategy) -> SimStore:
        never = {n: np.full(lay.n_blocks, -1) for n, lay in self.layouts.items()}
        return SimStore(strategy.policy, {n: v.copy() for n, v in self.initial.items()}, never,
                        {n: v.copy() for n, v in self.initial.items()}, copy.deepcopy(never),
                        {n: np.full((lay.n_blocks, 2), np.nan) for n, lay in self.layouts.items()},
                        extrapolate=self.extrapolates(strategy),
                        turned={n: np.zeros(lay.n_blocks, bool) for n, lay in self.layouts.items()}
                        if strategy.hold_turned else None)

    def _write_pending(self, store: SimStore, values: dict[str, np.ndarray], paths: dict[ChunkId, float]) -> None:
        """Write the pending round, with ``values`` of its iteration, when each chunk's
        path was ``paths``."""
        if store.pending is None:
            return
        iteration, chosen = store.pending
        for name, blocks in chosen.items():
            rows = self.layouts[name].block_rows
            for b in blocks:
                span = slice(b * rows, (b + 1) * rows)
                store.previous[name][span] = store.stored[name][span]
                store.stored[name][span] = values[name][span]
                store.bytes_written += values[name][span].nbytes
                cid = next(c for c in self.ids if c.name == name and c.start <= b * rows < c.stop)
                store.paths[name][b] = (paths[cid], store.paths[name][b, 0])
            store.previous_at[name][blocks] = store.saved_at[name][blocks]
            store.saved_at[name][blocks] = iteration
        store.committed, store.pending = iteration, None
        store.rounds_written += 1

    def _select(self, store: SimStore, values: dict[str, np.ndarray], iteration: int,
                paths: dict[ChunkId, float]) -> None:
        if not store.policy.due(iteration):
            return
        priorities = None
        if store.policy.needs_priorities:
            # what the workers compute (dask_scar.checkpoint.distances): each block's
            # distance from its value as last saved or, extrapolating, the nearer of
            # that and where an extrapolated restore would put it (the blocks it would
            # put farther off: turned, restored as saved)
            def measured(targets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return {name: np.array(block_distances(Chunk(ChunkId(name, 0, 0, lay.shape[0]),
                                                             {"value": values[name]}, iteration, store.stored[name]),
                                                       lay.block_rows, targets[name]))
                        for name, lay in self.layouts.items()}

            if not store.extrapolate:
                distances = measured(store.stored)
            else:
                targets = {name: v.copy() for name, v in store.stored.items()}
                for cid in self.ids:
                    self._extrapolate(targets[cid.name][cid.start:cid.stop], cid, store, iteration, paths[cid],
                                      hold=False)
                distances = measured(targets)
                if store.turned is not None:    # (None: every block extrapolated, the restore before)
                    nearer = {name: held_back(moved, saved)
                              for (name, moved), saved in zip(distances.items(), measured(store.stored).values())}
                    store.turned = {name: held for name, (_, held) in nearer.items()}
                    distances = {name: priority for name, (priority, _) in nearer.items()}
            priorities = np.concatenate(list(distances.values()))
        store.round += 1
        n = sum(lay.n_blocks for lay in self.layouts.values())
        chosen = store.policy.select(n, store.round, priorities)
        per_name, offset = {}, 0
        for name, lay in self.layouts.items():
            mine = chosen[(chosen >= offset) & (chosen < offset + lay.n_blocks)] - offset
            if len(mine):
                per_name[name] = mine
            offset += lay.n_blocks
        store.pending = (iteration, per_name)

    def _extrapolate(self, value: np.ndarray, cid: ChunkId, store: SimStore, now: int, path: float,
                     last: float | None = None, hold: bool = True) -> tuple[int, np.ndarray | None]:
        """Move the restored ``value`` of ``cid`` (in place) along its blocks' drift
        between their two saved versions, after iteration ``now`` with the chunk's path
        at ``path`` (:func:`dask_scar.checkpoint.trend_factors`, a fresh fit), but
        (with ``hold``) the blocks whose drift turned; returns
        the bytes of previous versions read (an initial value is not read) and, given
        the norm ``last`` of the chunk's last step, the step per iteration that drift
        gives (:func:`dask_scar.checkpoint.drift_step`)."""
        rows = self.layouts[cid.name].block_rows
        blocks = chunk_blocks(cid, rows)
        span = slice(blocks.start, blocks.stop)
        saved_path, previous_at, previous_path = (store.paths[cid.name][span, 0], store.previous_at[cid.name][span],
                                                  store.paths[cid.name][span, 1])
        factors = trend_factors(now, path, store.saved_at[cid.name][span], saved_path, previous_at, previous_path,
                                True)
        if hold and store.turned is not None:
            factors[store.turned[cid.name][span]] = 0.0
        previous = store.previous[cid.name][cid.start:cid.stop]
        step = None
        if last is not None:
            scales = step_scales(last, factors, saved_path, previous_at, previous_path, True)
            step = drift_step(value, previous, scales, rows).astype(value.dtype)
        value[...] = extrapolated(value, previous, factors, rows)
        read = (factors != 0) & (previous_at >= 0)
        return sum(previous[(b - blocks.start) * rows:(b - blocks.start + 1) * rows].nbytes
                   for b in np.asarray(blocks)[read]), step

    def _saved_bytes(self, cid: ChunkId, store: SimStore) -> int:
        """Bytes of the saved blocks of ``cid`` (never-saved ones are not read)."""
        rows = self.layouts[cid.name].block_rows
        return sum(store.stored[cid.name][b * rows:(b + 1) * rows].nbytes
                   for b in chunk_blocks(cid, rows) if store.saved_at[cid.name][b] >= 0)

    def _walk(self, paths: dict[ChunkId, float], before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
        """Add each chunk's step from ``before`` to ``after`` to its path, as the update tasks measure it."""
        for cid in self.ids:
            step = (after[cid.name][cid.start:cid.stop] - before[cid.name][cid.start:cid.stop]).ravel()
            paths[cid] += float(np.sqrt(np.vdot(step, step)))

    # -- runs ------------------------------------------------------------------------------
    def failure_free(self, max_iter: int, strategies: list[Strategy], snapshot_at: set[int]
                     ) -> tuple[list[float], list[dict[str, np.ndarray]], dict[int, Snapshot], dict[str, SimStore]]:
        """Run ``max_iter`` iterations from the start; returns the losses, the
        parameters after each iteration (index 0: initial), the snapshots taken after
        ``snapshot_at`` and each strategy's store at the end."""
        for block in self.blocks:
            block.pop(LOCAL_STATE, None)
        states = self.fresh_states()
        stores = {s.name: self.new_store(s) for s in strategies}
        losses, trajectory, snapshots = [], [self.values(states)], {}
        paths = {cid: 0.0 for cid in self.ids}
        for k in range(1, max_iter + 1):
            before = trajectory[-1]
            for store in stores.values():
                self._write_pending(store, before, paths)
            previous = copy.deepcopy(states) if k in snapshot_at else None
            losses.append(self.step(states, k))
            values = self.values(states)
            trajectory.append(values)
            self._walk(paths, before, values)
            for store in stores.values():
                self._select(store, values, k, paths)
            if k in snapshot_at:
                snapshots[k] = Snapshot(k, copy.deepcopy(states), previous, dict(paths),
                                        [copy.deepcopy(b.get(LOCAL_STATE)) for b in self.blocks],
                                        copy.deepcopy(stores))
        return losses, trajectory, snapshots, stores

    def trial(self, snapshot: Snapshot, strategy: Strategy, victims: tuple[int, ...], prefix: list[float],
              stop) -> Trial:
        """Workers ``victims`` (indices) die after iteration ``snapshot.iteration``;
        run until ``stop(losses)`` says so. ``prefix`` are the losses before."""
        states = copy.deepcopy(snapshot.states)
        store = copy.deepcopy(snapshot.stores[strategy.name])
        blocks = [dict(b) for b in self.blocks]
        for b, local in zip(blocks, snapshot.local):
            b.pop(LOCAL_STATE, None)
            if local is not None:
                b[LOCAL_STATE] = copy.deepcopy(local)
        for v in victims:
            blocks[v].pop(LOCAL_STATE, None)        # the worker's data block is rebuilt without it
        dead = {self.workers[v] for v in victims}
        lost = [cid for cid in self.ids if self.owner[cid] in dead] if strategy.recovery == "partial" else self.ids
        store.pending = None                        # the round selected after T is never written
        extrapolate = self.extrapolates(strategy)
        squared, nbytes = 0.0, 0
        for cid in lost:
            if strategy.copies:     # a live worker's copy, optimizer state too
                new = copy.deepcopy((snapshot.states if self.replicated else snapshot.previous)[cid])
            else:
                value = store.stored[cid.name][cid.start:cid.stop].copy()
                nbytes += self._saved_bytes(cid, store)
                new = self.model.new_state(cid.name, value)
                if extrapolate:     # as the trainer does, with the chunk's last step (its path's last part)
                    last = np.linalg.norm((snapshot.states[cid]["value"] - snapshot.previous[cid]["value"]).ravel())
                    read, step = self._extrapolate(value, cid, store, snapshot.iteration, snapshot.paths[cid],
                                                   float(last))
                    nbytes += read
                    self.model.restore_slots(new, step)
            squared += float(np.sum((states[cid]["value"].astype(np.float64) - new["value"]) ** 2))
            states[cid] = new
        resumed_at = store.committed if strategy.recovery == "full" else snapshot.iteration
        k = resumed_at + 1
        losses = list(prefix)
        sim = copy.copy(self)
        sim.blocks = blocks
        paths = dict(snapshot.paths)
        while not stop(losses):
            before = sim.values(states)
            sim._write_pending(store, before, paths)
            losses.append(sim.step(states, k))
            values = sim.values(states)
            sim._walk(paths, before, values)
            sim._select(store, values, k, paths)
            k += 1
        return Trial(strategy.name, snapshot.iteration, tuple(victims), losses, len(lost), math.sqrt(squared),
                     nbytes, resumed_at)

