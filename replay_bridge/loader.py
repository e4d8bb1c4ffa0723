"""A trainer rank's share of a step: which samples each data-parallel rank trains on, and that
rank's micro-batches (token ids, loss masks, positions, routing laid out for its routers).

Every rank plans the whole step from the reader's compact index (``reader.index``: sample id,
group id, token count, prompt length, routing start), the same way and without communication,
then reads only its own samples (``reader.read(ids)``). The plan (:func:`plan_step`):

1. groups: a sample's group is its ``group_id``; a sample without one is a group of its own.
   Groups are ordered by key (never by storage order), so the plan depends only on what the
   dataset holds;
2. the step's groups: every group (``groups_per_step=None``), or ``groups_per_step`` groups of a
   shuffle of all groups per epoch (``seed``, epoch), ``len(groups) // groups_per_step`` steps
   an epoch;
3. ranks: groups sorted by token count (largest first, ties in a ``(seed, step)`` order) are
   dealt out in a snake (0..W-1, W-1..0, ...) over a ``(seed, step)`` permutation of the ranks:
   every group on one rank, every rank at least one group, and any two ranks' token counts
   differ by at most the largest group's;
4. micro-batches: a rank's groups in a ``(seed, step)`` order, the samples of a group by id;
   cut every ``micro_batch_size`` samples, or (THD) greedily into packs of at most
   ``max_tokens`` padded tokens.

Pure NumPy / Arrow, vectorised over samples; see ``docs/loader.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .geometry import RoutingGeometry
from .layout import HostRouting, Packing, RankSlice, layout_routing
from .sample import RoutedSample

__all__ = [
    "INDEX_COLUMNS",
    "IndexedReader",
    "LoaderError",
    "MicroBatch",
    "RankLoader",
    "StepPlan",
    "assemble",
    "plan_step",
]

INDEX_COLUMNS = ("sample_id", "group_id", "tokens", "prompt_len", "routed_start")
"""The index columns the loader reads (one row per stored sample)."""


class LoaderError(ValueError):
    """A step that cannot be planned as asked (too few groups for the ranks, a sample longer
    than the packing allows, a bad argument)."""


class IndexedReader(Protocol):
    """What the loader needs of a reader (``replay_bridge.shards.ShardReader`` is one)."""

    geometry: RoutingGeometry

    @property
    def index(self) -> pa.Table: ...

    def read(self, ids: Sequence[str]) -> list[RoutedSample]: ...


# ---- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Groups:
    """The index grouped, independent of the step: samples sorted by (solo, group key,
    sample id), so each group's samples are contiguous."""

    sample_id: pa.Array  # string, sorted order
    key: pa.Array  # string: the group id, or the sample id of a solo sample
    tokens: np.ndarray  # int64 per sorted sample
    group_of: np.ndarray  # int64 per sorted sample: its group
    starts: np.ndarray  # int64 per group: its first sorted sample
    sizes: np.ndarray  # int64 per group: samples
    group_tokens: np.ndarray  # int64 per group

    @classmethod
    def from_index(cls, index: pa.Table) -> _Groups:
        missing = [c for c in ("sample_id", "group_id", "tokens") if c not in index.column_names]
        if missing:
            raise LoaderError(f"the reader's index has no column(s) {missing}")
        n = index.num_rows
        if n == 0:
            raise LoaderError("the dataset holds no samples")
        sid = index.column("sample_id").combine_chunks()
        gid = index.column("group_id").combine_chunks().cast(pa.string())
        if pc.count_distinct(sid).as_py() != n:
            raise LoaderError("the reader's index lists a sample id twice")
        key = pc.coalesce(gid, sid)
        solo = pc.is_null(gid)
        order = pc.sort_indices(
            pa.table({"solo": solo, "key": key, "sid": sid}),
            [("solo", "ascending"), ("key", "ascending"), ("sid", "ascending")],
        )
        sid, key, solo = sid.take(order), key.take(order), solo.take(order)
        tokens = index.column("tokens").to_numpy().astype(np.int64)[order.to_numpy()]
        # A new group where the key changes and at every solo sample (solo ones sort last).
        new = solo.to_numpy(zero_copy_only=False).copy()
        new[0] = True
        if n > 1:
            new[1:] |= pc.not_equal(key.slice(1), key.slice(0, n - 1)).to_numpy(
                zero_copy_only=False)
        starts = np.flatnonzero(new).astype(np.int64)
        sizes = np.diff(np.append(starts, n))
        return cls(sid, key.take(pa.array(starts)), tokens, np.cumsum(new) - 1, starts, sizes,
                   np.add.reduceat(tokens, starts))

    @property
    def count(self) -> int:
        return int(self.starts.size)


@dataclass(frozen=True)
class StepPlan:
    """Which samples every rank trains on in one step, in the order each rank reads them.

    Rows are in plan order: rank, then micro-batch, then position in the micro-batch.
    ``sample_id`` / ``group`` (the group id, or the sample id of a sample without one) are
    Arrow string arrays; ``rank``, ``micro_batch`` (numbered from 0 on each rank) and
    ``tokens`` NumPy arrays.
    """

    seed: int
    step: int
    world_size: int
    sample_id: pa.Array
    group: pa.Array
    rank: np.ndarray
    micro_batch: np.ndarray
    tokens: np.ndarray
    _bounds: np.ndarray = field(repr=False)

    def _rows(self, rank: int) -> slice:
        if not 0 <= rank < self.world_size:
            raise LoaderError(f"rank {rank} is outside a world of {self.world_size}")
        b = self._bounds
        return slice(int(b[rank]), int(b[rank + 1]))

    def ids(self, rank: int) -> list[str]:
        """The sample ids of ``rank``, in the order it reads them."""
        return self.sample_id[self._rows(rank)].to_pylist()

    def micro_batches(self, rank: int) -> list[list[str]]:
        """The sample ids of each of ``rank``'s micro-batches."""
        rows = self._rows(rank)
        ids, mb = self.sample_id[rows].to_pylist(), self.micro_batch[rows]
        cuts = np.flatnonzero(np.diff(mb)) + 1
        edges = [0, *cuts.tolist(), len(ids)] if ids else [0]
        return [ids[a:b] for a, b in zip(edges[:-1], edges[1:])]

    def tokens_per_rank(self) -> np.ndarray:
        """``int64 [world_size]``: the tokens each rank trains on this step."""
        return np.bincount(self.rank, weights=self.tokens, minlength=self.world_size).astype(
            np.int64)

    def micro_batches_per_rank(self) -> np.ndarray:
        """``int64 [world_size]``: each rank's micro-batch count."""
        out = np.zeros(self.world_size, np.int64)
        np.maximum.at(out, self.rank, self.micro_batch.astype(np.int64) + 1)
        return out

    def to_table(self) -> pa.Table:
        """The plan as one table (for logging): sample_id, group, rank, micro_batch, tokens."""
        return pa.table({"sample_id": self.sample_id, "group": self.group, "rank": self.rank,
                         "micro_batch": self.micro_batch, "tokens": self.tokens})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: seed, step, world size and per rank its tokens and micro-batches."""
        tokens = self.tokens_per_rank()
        return {"seed": self.seed, "step": self.step, "world_size": self.world_size,
                "ranks": [{"rank": r, "tokens": int(tokens[r]),
                           "micro_batches": self.micro_batches(r)}
                          for r in range(self.world_size)]}


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(words)))


def _select(groups: _Groups, seed: int, step: int, groups_per_step: int | None) -> np.ndarray:
    """The step's groups (indices into ``groups``)."""
    n = groups.count
    if groups_per_step is None:
        return np.arange(n, dtype=np.int64)
    if not 0 < groups_per_step <= n:
        raise LoaderError(f"groups_per_step must be in [1, {n}] (the dataset's groups), "
                          f"got {groups_per_step}")
    per_epoch = n // groups_per_step
    epoch, slot = divmod(step, per_epoch)
    perm = _rng(seed, 0, epoch).permutation(n)
    return np.sort(perm[slot * groups_per_step : (slot + 1) * groups_per_step])


def _budget_cuts(padded: np.ndarray, bounds: np.ndarray, budget: int) -> np.ndarray:
    """Micro-batch number of each sample: next-fit packs of at most ``budget`` padded tokens,
    restarting at each rank's first sample. One search per micro-batch, not per sample."""
    mb = np.empty(padded.size, np.int32)
    ends = np.cumsum(padded)
    for r in range(bounds.size - 1):
        a, z, k = int(bounds[r]), int(bounds[r + 1]), 0
        while a < z:
            before = int(ends[a - 1]) if a else 0
            b = min(int(np.searchsorted(ends, before + budget, side="right")), z)
            mb[a:b] = k
            a, k = b, k + 1
    return mb


def _plan(
    groups: _Groups,
    *,
    world_size: int,
    seed: int,
    step: int,
    packing: Packing,
    micro_batch_size: int | None,
    max_tokens: int | None,
    groups_per_step: int | None,
) -> StepPlan:
    _check_sizes(packing, micro_batch_size, max_tokens)
    if world_size < 1:
        raise LoaderError(f"world_size must be >= 1, got {world_size}")
    if seed < 0 or step < 0:
        raise LoaderError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    sel = _select(groups, seed, step, groups_per_step)
    m = sel.size
    if m < world_size:
        raise LoaderError(f"step {step} has {m} group(s), fewer than the {world_size} ranks: "
                          "every rank needs at least one")
    rng = _rng(seed, 1, step)
    tie, rank_order, group_order = rng.random(m), rng.permutation(world_size), rng.random(m)
    # Snake deal of the groups, largest first, over a seeded permutation of the ranks.
    order = np.lexsort((tie, -groups.group_tokens[sel]))
    i = np.arange(m)
    turn, pos = np.divmod(i, world_size)
    slot = np.where(turn % 2 == 0, pos, world_size - 1 - pos)
    rank_of = np.empty(m, np.int64)
    rank_of[order] = rank_order[slot]

    # Expand groups to samples (sorted-sample indices), then order by rank, group, id.
    sizes = groups.sizes[sel]
    first = np.repeat(groups.starts[sel] - np.cumsum(sizes) + sizes, sizes)
    rows = first + np.arange(int(sizes.sum()))
    s_rank = np.repeat(rank_of, sizes)
    plan_order = np.lexsort((rows, np.repeat(group_order, sizes), s_rank))
    rows, s_rank = rows[plan_order], s_rank[plan_order]
    tokens = groups.tokens[rows]
    bounds = np.searchsorted(s_rank, np.arange(world_size + 1), side="left").astype(np.int64)
    sample_id = groups.sample_id.take(pa.array(rows))

    if packing.format == "bshd" and (tokens > packing.seq_length).any():
        j = int(np.argmax(tokens > packing.seq_length))
        raise LoaderError(f"sample {sample_id[j].as_py()!r} has {int(tokens[j])} tokens, more "
                          f"than the bshd seq_length {packing.seq_length}")
    if max_tokens is not None:
        padded = packing.padded_lengths(tokens)
        if (padded > max_tokens).any():
            j = int(np.argmax(padded > max_tokens))
            raise LoaderError(f"sample {sample_id[j].as_py()!r} takes {int(padded[j])} padded "
                              f"tokens, more than max_tokens={max_tokens}")
        mb = _budget_cuts(padded, bounds, max_tokens)
    else:
        within = np.arange(rows.size) - bounds[s_rank]
        mb = (within // int(micro_batch_size or 1)).astype(np.int32)
    return StepPlan(seed, step, world_size, sample_id, groups.key.take(groups.group_of[rows]),
                    s_rank.astype(np.int32), mb, tokens, bounds)


def _check_sizes(packing: Packing, micro_batch_size: int | None,
                 max_tokens: int | None) -> None:
    if (micro_batch_size is None) == (max_tokens is None):
        raise LoaderError("give exactly one of micro_batch_size (samples) and max_tokens")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise LoaderError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if max_tokens is not None:
        if packing.format != "thd":
            raise LoaderError("max_tokens (a token budget per micro-batch) needs thd packing")
        if max_tokens < 1:
            raise LoaderError(f"max_tokens must be >= 1, got {max_tokens}")


def plan_step(
    index: pa.Table,
    *,
    world_size: int,
    packing: Packing,
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    step: int = 0,
    groups_per_step: int | None = None,
) -> StepPlan:
    """Plan one step for every rank from a reader's index (columns ``sample_id``, ``group_id``,
    ``tokens``): see the module docstring for the rule. Every rank computes the same plan."""
    return _plan(_Groups.from_index(index), world_size=world_size, seed=seed, step=step,
                 packing=packing, micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                 groups_per_step=groups_per_step)


# ---- micro-batches -----------------------------------------------------------------------


@dataclass
class MicroBatch:
    """One micro-batch of a rank, laid out as the trainer packs it.

    ``bshd``: ``tokens``, ``loss_mask`` and ``position_ids`` are ``[b, seq_length]``; ``thd``:
    ``[t]`` (sequences concatenated, each padded to the packing's multiple, the pack to
    ``pad_total_multiple``). Padding is token 0 and never in the loss mask. ``loss_mask`` is
    True at completion tokens (``prompt_len <= position < num_tokens``); ``label_mask`` is the
    same shifted to the position that predicts each of them. ``routing`` is this rank's routing
    (``layout_routing``), or ``None`` when the loader was asked for none.
    """

    index: int
    sample_ids: tuple[str, ...]
    samples: list[RoutedSample]
    tokens: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    seq_lengths: np.ndarray
    cu_seqlens: np.ndarray
    cu_seqlens_padded: np.ndarray
    packing: Packing
    routing: HostRouting | None = None

    @property
    def label_mask(self) -> np.ndarray:
        """True at positions ``t`` whose next token (``t + 1``, same sequence) is a
        completion token: the mask for a loss over next-token log-probs at ``t``."""
        out = np.zeros_like(self.loss_mask)
        out[..., :-1] = self.loss_mask[..., 1:] & (self.position_ids[..., 1:] > 0)
        return out

    @property
    def num_tokens(self) -> int:
        """Laid-out token positions, padding included."""
        return int(self.tokens.size)


def assemble(samples: Sequence[RoutedSample], packing: Packing, index: int = 0) -> MicroBatch:
    """Token ids, loss mask, positions and sequence offsets of ``samples`` laid out as
    ``packing`` says (no routing)."""
    if not samples:
        raise LoaderError("a micro-batch needs at least one sample")
    b = len(samples)
    n = np.fromiter((s.num_tokens for s in samples), np.int64, b)
    plen = np.fromiter((s.prompt_len for s in samples), np.int64, b)
    if packing.format == "bshd" and (n > packing.seq_length).any():
        j = int(np.argmax(n > packing.seq_length))
        raise LoaderError(f"sample {samples[j].sample_id!r} has {int(n[j])} tokens, more than "
                          f"the bshd seq_length {packing.seq_length}")
    padded = packing.pack_lengths(n)
    starts = np.concatenate(([0], np.cumsum(padded)[:-1]))
    seg = np.repeat(np.arange(b), padded)
    pos = np.arange(int(padded.sum()), dtype=np.int64) - starts[seg]
    real = pos < n[seg]
    tokens = np.zeros(pos.size, np.int64)
    tokens[real] = np.concatenate([s.tokens for s in samples])
    loss = real & (pos >= plen[seg])
    shape = (b, int(packing.seq_length)) if packing.format == "bshd" else (pos.size,)
    return MicroBatch(
        index=index,
        sample_ids=tuple(s.sample_id for s in samples),
        samples=list(samples),
        tokens=tokens.reshape(shape),
        loss_mask=loss.reshape(shape),
        position_ids=pos.reshape(shape),
        seq_lengths=n.astype(np.int32),
        cu_seqlens=np.concatenate(([0], np.cumsum(n))).astype(np.int32),
        cu_seqlens_padded=np.concatenate(([0], np.cumsum(padded))).astype(np.int32),
        packing=packing,
    )


class RankLoader:
    """One data-parallel rank's micro-batches for one step.

    ``reader``: anything with ``index`` (:data:`INDEX_COLUMNS`), ``read(ids)`` and ``geometry``
    (a ``ShardReader``). ``world_size`` / ``rank``: the data-parallel world and this rank.
    ``micro_batch_size`` samples per micro-batch, or (``thd``) ``max_tokens`` padded tokens.
    ``groups_per_step``: groups a step takes (all by default). ``rank_slice`` / ``layers``:
    passed to :func:`~replay_bridge.layout.layout_routing` (tensor / context / sequence
    parallel slice; this rank's MoE layers); ``routing=False`` yields no routing.

    Iterating reads the rank's samples one micro-batch at a time (``reader.read``), never
    another rank's. :meth:`for_step` gives the next step's loader without re-grouping the index.
    """

    def __init__(
        self,
        reader: IndexedReader,
        *,
        world_size: int,
        rank: int,
        packing: Packing,
        micro_batch_size: int | None = None,
        max_tokens: int | None = None,
        seed: int = 0,
        step: int = 0,
        groups_per_step: int | None = None,
        rank_slice: RankSlice = RankSlice(),
        layers: Sequence[int] | None = None,
        routing: bool = True,
        validate_ids: bool = True,
        _groups: _Groups | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} is outside a world of {world_size}")
        self.reader = reader
        self.world_size, self.rank = int(world_size), int(rank)
        self.packing = packing
        self.micro_batch_size, self.max_tokens = micro_batch_size, max_tokens
        self.seed, self.step, self.groups_per_step = int(seed), int(step), groups_per_step
        self.rank_slice = rank_slice
        self.layers = None if layers is None else tuple(layers)
        self.routing, self.validate_ids = routing, validate_ids
        self._groups = _groups if _groups is not None else _Groups.from_index(reader.index)
        self.plan = _plan(self._groups, world_size=self.world_size, seed=self.seed,
                          step=self.step, packing=packing, micro_batch_size=micro_batch_size,
                          max_tokens=max_tokens, groups_per_step=groups_per_step)
        self._micro_batches = self.plan.micro_batches(self.rank)

    def for_step(self, step: int) -> RankLoader:
        """The same loader at another step."""
        return RankLoader(
            self.reader, world_size=self.world_size, rank=self.rank, packing=self.packing,
            micro_batch_size=self.micro_batch_size, max_tokens=self.max_tokens, seed=self.seed,
            step=step, groups_per_step=self.groups_per_step, rank_slice=self.rank_slice,
            layers=self.layers, routing=self.routing, validate_ids=self.validate_ids,
            _groups=self._groups)

    @property
    def sample_ids(self) -> list[str]:
        """This rank's sample ids this step, in reading order."""
        return [i for mb in self._micro_batches for i in mb]

    def __len__(self) -> int:
        return len(self._micro_batches)

    def __iter__(self) -> Iterator[MicroBatch]:
        geometry = self.reader.geometry if self.routing else None
        for k, ids in enumerate(self._micro_batches):
            samples = self.reader.read(ids)
            got = [s.sample_id for s in samples]
            if got != ids:
                raise LoaderError(f"the reader returned {got[:4]}... for {ids[:4]}...")
            mb = assemble(samples, self.packing, k)
            if geometry is not None:
                mb.routing = layout_routing(samples, geometry, self.packing, self.rank_slice,
                                            self.layers, validate=self.validate_ids)
            yield mb

    def __repr__(self) -> str:
        return (f"RankLoader(rank {self.rank}/{self.world_size}, step {self.step}, seed "
                f"{self.seed}, {len(self.sample_ids)} samples in {len(self)} micro-batches)")
