"""Ulysses-style sequence parallelism, two SP ranks simulated in one process (CPU, tiny
random-init models of every covered family).

Under DeepSpeed-Ulysses (verl, VeOmni) each rank holds a contiguous half of every row's
columns through the MLP/MoE layers; attention gathers the whole sequence by all-to-all, so the
hidden states entering each MoE block on rank ``r`` are the unsliced run's at columns
``[r * seq/2, (r + 1) * seq/2)``. The simulation takes those hidden states from a replayed
unsliced run (pre-hooks on the MoE blocks), feeds rank ``r``'s slice to each MoE block in
layer order inside a pass of ``prepare(..., sp_size=2, sp_rank=r)``, and reads what the
experts really got (``support.ExpertsCapture``): the stored ids on 100.000% of the slice's data
rows (compared one sample at a time), the unsliced run's ids on every row bit for bit, the
router's own routing on pad and native rows, the MoE output of the unsliced run, and the same
agreement figures summed over the two ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.trainer_hooks.hf import support as S
from trainer_hooks.hf import (
    NATIVE,
    PAD,
    LayoutError,
    ReplayStateError,
    RoutingReplay,
    model_geometry,
)

SP = 2


def _batch(samples, layout: str, seq: int = 14):
    if layout == "packed":  # 29 tokens + 3 padding: 32 columns, a multiple of SP
        batch = S.packed_batch(samples, pad=3)
        starts = np.concatenate(([0], np.cumsum([s.num_tokens for s in samples])[:-1]))
        return batch, [(int(a), s.num_tokens) for a, s in zip(starts, samples)]
    batch = S.padded_batch(samples, seq, layout)
    spans = [(i * seq + (0 if layout == "right" else seq - s.num_tokens), s.num_tokens)
             for i, s in enumerate(samples)]
    return batch, spans


def _prepare(replay, samples, batch, layout, **sp):
    if layout == "packed":
        return replay.prepare(samples, position_ids=batch["position_ids"],
                              attention_mask=batch["attention_mask"], packing="packed", **sp)
    return replay.prepare(samples, attention_mask=batch["attention_mask"], **sp)


def _columns(a: np.ndarray | torch.Tensor, shape, rank: int):
    """Rank ``rank``'s columns of a flat ``[batch * seq, ...]`` array, flat again."""
    b, s = shape
    w = s // SP
    return a.reshape(b, s, *a.shape[1:])[:, rank * w:(rank + 1) * w].reshape(b * w, *a.shape[1:])


@pytest.fixture(scope="module", params=S.FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_each_sp_rank_replays_its_slice_of_the_sequence(family: str, layout: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [9, 14, 6], seed=11, routed_start=[0, 4],
                             native={2: [1]})
    batch, spans = _batch(samples, layout)
    shape = tuple(batch["input_ids"].shape)
    total = batch["input_ids"].numel()
    blocks = {layer: model.get_submodule(f"model.layers.{layer}.mlp")
              for layer in geometry.moe_layers}
    hidden: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(mod, args, out) -> None:
            h = args[0].shape[-1]   # kept flat: [batch * seq, hidden]
            hidden[layer] = args[0].detach().reshape(-1, h)
            outs[layer] = out.detach().reshape(-1, h)
        return hook

    hooks = [m.register_forward_hook(keep(layer)) for layer, m in blocks.items()]
    replay = RoutingReplay(model, geometry)

    # The unsliced run (what every SP rank's attention reconstructs before the MoE layers).
    full_mb = _prepare(replay, samples, batch, layout)
    full = S.ExpertsCapture(model)
    with replay.replaying(full_mb), torch.no_grad():
        model(**batch)
    full.close()
    for h in hooks:
        h.remove()
    full_metrics = replay.metrics()
    assert full_metrics["routing_replay/native/tokens"] > 0

    data = same = 0
    for rank in range(SP):
        mb = _prepare(replay, samples, batch, layout, sp_size=SP, sp_rank=rank)
        assert mb.shape == (shape[0], shape[1] // SP) and mb.num_tokens == total // SP
        region = _columns(full_mb.host.region, shape, rank)
        assert np.array_equal(mb.host.region, region)
        cap = S.ExpertsCapture(model)
        with replay.replaying(mb), torch.no_grad():
            for layer, block in blocks.items():   # this rank's MoE blocks, in layer order
                x = _columns(hidden[layer], shape, rank)
                out = block(x.reshape(shape[0], -1, x.shape[-1]))
                torch.testing.assert_close(out.reshape(x.shape),
                                           _columns(outs[layer], shape, rank))
        cap.close()
        own_rows = torch.from_numpy((region == PAD) | (region == NATIVE))
        for j, layer in enumerate(geometry.moe_layers):
            got = cap.calls[layer][0]
            want, has = S.expected_rows(samples, spans, total, j)
            want, has = _columns(want, shape, rank), _columns(has, shape, rank)
            ids = got["ids"].numpy()
            same += int((ids[has] == want[has]).all(-1).sum())
            data += int(has.sum())
            # Every row, bit for bit, as in the unsliced run.
            assert torch.equal(got["ids"], _columns(full.calls[layer][0]["ids"], shape, rank))
            assert torch.equal(got["ids"][own_rows], got["own_ids"][own_rows])
            assert torch.equal(got["weights"][own_rows], got["own_weights"][own_rows])
    assert data == full_metrics["routing_replay/tokens"] > 0   # every data row, on one rank
    assert same == data, f"{family} {layout}: {100 * same / data:.3f}% of data rows replayed"
    # Both ranks' agreement (as metrics(group=sp_group) sums it) is the unsliced run's.
    assert replay.metrics() == full_metrics
    replay.close()


def test_sp_guards(family: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [9, 14, 6], seed=12)
    batch, _ = _batch(samples, "right")
    with RoutingReplay(model, geometry) as replay:
        with pytest.raises(LayoutError, match="not a multiple of the sequence-parallel size 3"):
            _prepare(replay, samples, batch, "right", sp_size=3, sp_rank=0)
        with pytest.raises(LayoutError, match="rank 2 of 2 is out of range"):
            _prepare(replay, samples, batch, "right", sp_size=SP, sp_rank=2)
        # A rank's slice of the routing with the whole batch fed to the model: refused.
        mb = _prepare(replay, samples, batch, "right", sp_size=SP, sp_rank=1)
        with replay.replaying(mb), pytest.raises(ReplayStateError, match="sees 42 tokens"):
            model(**batch)
