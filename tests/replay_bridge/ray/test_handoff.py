"""The in-memory hand-off on a 2-node Ray cluster: checked samples as record batches in the
object store, read by another actor without a copy, refused when a check or a storage rule
fails, and replayed through RoutingReplay on a CPU Megatron model with 100% agreement."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ray import HandoffError, HandoffSource, handoff_batch, put_samples
from replay_bridge.sample import RoutedSample

pytestmark = [pytest.mark.ray]

ray = pytest.importorskip("ray")

GEOMETRY = RoutingGeometry.from_preset("tiny-qwen3-moe")


def samples(n: int, prefix: str = "s", seed: int = 0, geometry: RoutingGeometry = GEOMETRY,
            vocab: int = 500) -> list[RoutedSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = 6 + i % 5
        keys = rng.random((t - 1, geometry.num_moe_layers, geometry.num_experts))
        out.append(RoutedSample(
            sample_id=f"{prefix}{i}", tokens=rng.integers(0, vocab, t).astype(np.int32),
            prompt_len=3, group_id=f"g{i // 2}",
            routed=np.argsort(keys, axis=-1)[..., : geometry.top_k].astype(np.uint8)))
    return out


@ray.remote(num_cpus=0)
def produce(prefix: str, n: int) -> pa.RecordBatch:
    """A rollout task: its checked samples go into the object store as one record batch."""
    return handoff_batch(samples(n, prefix, seed=len(prefix)), GEOMETRY)


@ray.remote(num_cpus=0)
class Trainer:
    """A trainer actor: reads routing through a HandoffSource sent to it."""

    def routing(self, source: HandoffSource, ids: list[str]) -> list[np.ndarray]:
        return [np.array(source[i].routed) for i in ids]

    def zero_copy(self, source: HandoffSource) -> dict[str, Any]:
        """The batch's routing buffer: read-only object-store memory, and the same address
        every time the batch is fetched again (a mapping, not a copy per read)."""
        first = source.batches()[0]
        again = HandoffSource(source._items, source.geometry).batches()[0]  # noqa: SLF001
        buf = first.column("routed").buffers()
        buf2 = again.column("routed").buffers()
        sample = next(iter(source.values()))
        data = [b for b in buf if b is not None][-1]
        data2 = [b for b in buf2 if b is not None][-1]
        lo, hi = data.address, data.address + data.size
        addr = sample.routed.__array_interface__["data"][0]
        return {"mutable": data.is_mutable, "same": data.address == data2.address,
                "view": lo <= addr < hi, "len": len(source)}


def test_handoff_batches_reach_a_trainer_actor_without_a_copy(cluster: Any) -> None:
    refs = [produce.remote("a", 6), produce.remote("bb", 5), put_samples(samples(3, "c"),
                                                                          GEOMETRY)]
    source = HandoffSource(refs, GEOMETRY)
    assert len(source) == 14 and "a0" in source and "c2" in source and "zz" not in source
    expected = {s.sample_id: s for s in samples(6, "a", seed=1)}
    got = source["a3"]
    np.testing.assert_array_equal(got.routed, expected["a3"].routed)
    np.testing.assert_array_equal(got.tokens, expected["a3"].tokens)
    assert got.group_id == "g1" and got.prompt_len == 3
    trainer = Trainer.remote()
    routed = ray.get(trainer.routing.remote(source, ["a3", "bb4", "c0"]))
    np.testing.assert_array_equal(routed[0], expected["a3"].routed)
    info = ray.get(trainer.zero_copy.remote(source))
    assert info == {"mutable": False, "same": True, "view": True, "len": 14}, info
    assert isinstance(pickle.loads(pickle.dumps(HandoffSource([], GEOMETRY))), HandoffSource)


def test_samples_that_fail_a_check_are_refused_by_name() -> None:
    good = samples(3)
    bad = samples(1, "zero")[0]
    bad.routed[2] = 0  # a block of all zeros: a capture that never happened
    with pytest.raises(HandoffError, match="refused: sample 'zero0': all_zero") as e:
        handoff_batch([*good, bad], GEOMETRY)
    assert e.value.sample_id == "zero0"
    dup = samples(1, "dup")[0]
    dup.routed[1, 0] = 3
    with pytest.raises(HandoffError, match="refused: sample 'dup0': duplicate_ids"):
        handoff_batch([dup], GEOMETRY)
    with pytest.raises(HandoffError, match="'s1' is given twice"):
        handoff_batch([*good, good[1]], GEOMETRY)
    short = samples(1, "short")[0]
    short.routed = short.routed[:-1]
    with pytest.raises(HandoffError, match="short0.*row_count"):
        handoff_batch([short], GEOMETRY)


def test_a_batch_that_breaks_a_storage_rule_is_refused_naming_the_sample(cluster: Any) -> None:
    batch = handoff_batch(samples(4), GEOMETRY)
    # Forge a batch whose routing holds an expert id out of range (as a faulty or hostile
    # producer could put it): the consumer refuses it, naming the sample.
    col = batch.column("routed")
    flat = col
    while hasattr(flat, "values") and not pa.types.is_integer(flat.type):
        flat = flat.values
    ids = np.array(flat.to_numpy(zero_copy_only=False))
    offsets = [0]
    for s in samples(4):
        offsets.append(offsets[-1] + s.routed.size)
    ids[offsets[2]] = GEOMETRY.num_experts + 3  # the first id of sample s2
    forged_flat = pa.array(ids, type=flat.type)
    forged = _rebuild(col, forged_flat)
    bad = pa.RecordBatch.from_arrays(
        [forged if n == "routed" else batch.column(n) for n in batch.schema.names],
        schema=batch.schema)
    source = HandoffSource([ray.put(bad)], GEOMETRY)
    with pytest.raises(HandoffError, match="s2"):
        source["s0"]
    other = HandoffSource([batch, handoff_batch(samples(1), GEOMETRY)], GEOMETRY)
    with pytest.raises(HandoffError, match="sample 's0' is in hand-off batches 0 and 1"):
        len(other)


def _rebuild(col: pa.Array, flat: pa.Array) -> pa.Array:
    """``col`` (nested lists ending in integers) with its innermost values replaced."""
    if pa.types.is_integer(col.type):
        return flat
    inner = _rebuild(col.values, flat)
    if isinstance(col, pa.FixedSizeListArray):
        return pa.FixedSizeListArray.from_arrays(inner, col.type.list_size)
    cls = type(col)
    return cls.from_arrays(col.offsets, inner)


def test_handoff_source_replays_through_megatron_with_full_agreement(cluster: Any) -> None:
    """Record a CPU Megatron model's own routing of some samples, hand the samples off through
    the object store, replay them by id from the HandoffSource: the routers route exactly
    the handed-off ids, and agreement is 100%."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    import torch

    from tests.trainer_hooks.megatron import support as S
    from trainer_hooks.megatron import Packing, RoutingReplay, model_geometry
    from trainer_hooks.megatron.cpu_world import megatron_cpu_world

    with megatron_cpu_world(torch.get_num_threads()):
        model = S.build_model()
        geo = model_geometry(model.config)
        packing = Packing.bshd(10)
        rollout = S.make_samples(geo, [10, 8, 9], prompt_lens=[4, 3, 5], seed=5)
        native = RoutingReplay(model, geo, packing=packing)
        cap = S.RoutingCapture(model)
        b = len(rollout)
        S.run_pass(model, native, [S.batch_inputs(rollout, packing)], 1, 10, b,
                   forward_only=True)
        cap.close()
        for i, layer in enumerate(native.layers):
            ids = S.routing_map_ids(cap.calls[layer][0], geo.top_k).reshape(10, b, geo.top_k)
            for j, s in enumerate(rollout):
                s.routed[:, i, :] = ids[: s.num_tokens - 1, j, :]
        native.close()

        ref = put_samples(rollout, geo)
        del rollout  # the trainer side sees only the object store
        source = HandoffSource([ref], geo)
        replay = RoutingReplay(model, geo, source=source, packing=packing)
        order = ["s0", "s1", "s2"]
        mb = replay.prepare(order)
        batch = S.batch_inputs([source[i] for i in order], packing)
        cap = S.RoutingCapture(model)
        with replay.replaying([mb], forward_only=True):
            S.run_pass(model, replay, [batch], 1, 10, b, forward_only=True)
        cap.close()
        m = replay.metrics()
        assert m["routing_replay/exact"] == 1.0 and m["routing_replay/overlap"] == 1.0
        for i, layer in enumerate(replay.layers):
            np.testing.assert_array_equal(
                S.routing_map_ids(cap.calls[layer][0], geo.top_k),
                np.sort(mb.host.ids[:, i, :].astype(np.int64), axis=-1))
        replay.close()


@ray.remote(num_cpus=0)
def read_share(reader: Any, ids: list[str]) -> list[int]:
    """A Ray task given a ShardReader: it reopens the dataset on its node and reads its ids."""
    return [int(s.routed.astype(np.int64).sum()) for s in reader.read(ids)]


def test_a_shard_reader_travels_to_ray_tasks_as_a_handle(cluster: Any, tmp_path) -> None:  # noqa: ANN001
    from replay_bridge.shards import ShardReader, ShardWriter

    items = samples(12, prefix="r")
    uri = str(tmp_path / "ds")
    with ShardWriter(uri, GEOMETRY, samples_per_shard=4) as w:
        for s in items:
            w.add(s)
    reader = ShardReader(uri)
    assert len(pickle.dumps(reader)) < 4096  # what travels is a handle, not the data
    shares = [[s.sample_id for s in items[r::3]] for r in range(3)]
    got = ray.get([read_share.remote(reader, ids) for ids in shares])
    want = {s.sample_id: int(s.routed.astype(np.int64).sum()) for s in items}
    assert got == [[want[i] for i in ids] for ids in shares]
