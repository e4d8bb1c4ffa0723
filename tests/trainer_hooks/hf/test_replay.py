"""Proof that the Hugging Face hook replays rollout routing, per covered family (CPU, tiny
random-init ``transformers`` models in float32).

What the experts really received is read by forward pre-hooks on each MoE block's ``experts``
module (``support.ExpertsCapture``), never through the hook's own code, and compared with the
stored ids one sample at a time (``support.expected_rows``, not the hook's layout code):

- on 100.000% of data rows (prompt and completion rows with rollout routing) the experts
  receive exactly the stored ids, padded on the left and on the right and packed;
- at pad and native rows they receive the router's own routing of that run (ids and weights
  bit for bit, from the router's own ``forward`` on the experts' input); rows before
  ``routed_start`` route as with replay off (ids bit for bit);
- the combine weights equal the family's normalisation of the model's own logits at the
  replayed ids (an independent formula, ``support.family_weights``), and their gradient
  reaches the router's weight as that formula's does;
- with replay off the same comparison fails (so it can fail);
- with gradient checkpointing the recompute hands the experts the same ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.trainer_hooks.hf import support as S
from trainer_hooks.hf import NATIVE, PAD, RoutingReplay, model_geometry

LAYOUTS = ["right", "left", "packed"]


def _batch(samples, layout: str, seq: int = 14) -> tuple[dict[str, torch.Tensor], list]:
    """The model inputs and each sample's (first flat row, length) on the grid."""
    if layout == "packed":
        batch = S.packed_batch(samples, pad=3)
        starts = np.concatenate(([0], np.cumsum([s.num_tokens for s in samples])[:-1]))
        return batch, [(int(a), s.num_tokens) for a, s in zip(starts, samples)]
    batch = S.padded_batch(samples, seq, layout)
    spans = [(i * seq + (0 if layout == "right" else seq - s.num_tokens), s.num_tokens)
             for i, s in enumerate(samples)]
    return batch, spans


def _prepare(replay: RoutingReplay, samples, batch, layout: str):
    if layout == "packed":
        return replay.prepare(samples, position_ids=batch["position_ids"],
                              attention_mask=batch.get("attention_mask"), packing="packed")
    return replay.prepare(samples, attention_mask=batch["attention_mask"])


def _run(model, batch, backward: bool = True) -> None:
    out = model(**batch)
    if backward:
        out.logits.float().pow(2).mean().backward()


def _agreement(cap: S.ExpertsCapture, geometry, samples, spans, total: int,
               call: int = 0) -> tuple[int, int]:
    """(data rows whose experts got exactly the stored ids, data rows), over all MoE layers."""
    same = rows = 0
    for j, layer in enumerate(geometry.moe_layers):
        want, has = S.expected_rows(samples, spans, total, j)
        got = cap.calls[layer][call]["ids"].numpy()
        same += int((got[has] == want[has]).all(-1).sum())
        rows += int(has.sum())
    return same, rows


@pytest.fixture(scope="module", params=S.FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("layout", LAYOUTS)
def test_experts_receive_the_stored_ids_on_every_data_row(family: str, layout: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [9, 14, 6], seed=1)
    batch, spans = _batch(samples, layout)
    total = batch["input_ids"].numel()
    replay = RoutingReplay(model, geometry)
    mb = _prepare(replay, samples, batch, layout)
    cap = S.ExpertsCapture(model)
    with replay.replaying(mb):
        _run(model, batch)
    cap.close()
    same, rows = _agreement(cap, geometry, samples, spans, total)
    assert rows == geometry.num_moe_layers * sum(s.rows for s in samples)
    assert same == rows, f"{family} {layout}: {100 * same / rows:.3f}% of data rows replayed"

    # Pad rows (padding, each sample's last position) route with the router's own top-k.
    for layer in geometry.moe_layers:
        c = cap.calls[layer][0]
        pad = mb.host.region == PAD
        assert pad.any()
        assert torch.equal(c["ids"][pad], c["own_ids"][pad])
        assert torch.equal(c["weights"][pad], c["own_weights"][pad])

    # Agreement was counted on every data block, with the Megatron hook's names.
    m = replay.metrics()
    assert m["routing_replay/tokens"] == rows
    assert m["routing_replay/native/tokens"] == 0
    assert 0.0 <= m["routing_replay/exact"] < 0.5  # random rollout ids vs the model's own
    replay.close()

    # The same comparison with replay off disagrees: the test can fail.
    cap = S.ExpertsCapture(model)
    with torch.no_grad():
        _run(model, batch, backward=False)
    cap.close()
    same, rows = _agreement(cap, geometry, samples, spans, total)
    assert same < 0.5 * rows, f"{family} {layout}: replay off agrees on {same}/{rows} rows"


def test_combine_weights_are_the_familys_own_and_reach_the_router(family: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [11, 7], seed=2)
    batch, spans = _batch(samples, "right", seq=12)
    replay = RoutingReplay(model, geometry)
    mb = _prepare(replay, samples, batch, "right")
    cap = S.ExpertsCapture(model)
    with replay.replaying(mb):
        _run(model, batch, backward=False)
    cap.close()
    data = torch.from_numpy(mb.host.region < PAD)
    for layer in geometry.moe_layers:
        c = cap.calls[layer][0]
        gate = cap.gates[layer]
        want = S.family_weights(family, gate, c["hidden"], c["ids"])
        got = c["weights"]
        assert got.dtype == c["own_weights"].dtype
        torch.testing.assert_close(got[data], want[data], rtol=1e-6, atol=1e-7)
        # The replayed weights carry the gradient into the router as the formula's do.
        (g_got,) = torch.autograd.grad(got[data].pow(2).sum(), gate.weight, retain_graph=True)
        (g_want,) = torch.autograd.grad(want[data].pow(2).sum(), gate.weight, retain_graph=True)
        assert g_got.abs().sum() > 0
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    replay.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_where_the_adapter_says_so_its_combine_at_own_ids_is_the_routers_own(
        family: str, dtype: torch.dtype) -> None:
    """The hook skips the ``where`` between the combine's weights and the router's own when
    ``combine_is_own``: at the router's own ids the combine then gives its weights bit for bit,
    and the router weight's gradient through them bit for bit too."""
    model = S.build_model(family).to(dtype)
    replay = RoutingReplay(model, model_geometry(model))
    adapter = replay.adapter
    replay.close()
    torch.manual_seed(5)
    for site in adapter.routers(model):
        router = site.module
        hidden = torch.randn(24, model.config.hidden_size, dtype=dtype)
        logits, own_w, own_ids = router(hidden)
        if not adapter.combine_is_own(logits):
            assert family == "mixtral" and dtype != torch.float32
            continue
        w = adapter.combine(router, logits, own_ids)
        assert w.dtype == own_w.dtype and torch.equal(w, own_w)
        g = torch.randn(own_w.shape, dtype=own_w.dtype)
        (g_own,) = torch.autograd.grad((own_w * g).sum(), router.weight, retain_graph=True)
        (g_comb,) = torch.autograd.grad((w * g).sum(), router.weight)
        assert g_own.abs().sum() > 0 and torch.equal(g_comb, g_own)


def test_a_training_step_puts_gradients_on_every_router(family: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [10, 8], seed=3)
    batch, _ = _batch(samples, "packed")
    with RoutingReplay(model, geometry) as replay:
        with replay.replaying(_prepare(replay, samples, batch, "packed")):
            _run(model, batch)
    grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert len(grads) == geometry.num_moe_layers
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_native_rows_route_with_the_routers_own_top_k(family: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    # Sample 0 has routing from position 3 on; sample 1 marks two of its rows native.
    samples = S.make_samples(geometry, [10, 9], seed=4, routed_start=[3],
                             native={1: [2, 5]})
    batch, spans = _batch(samples, "left", seq=12)
    total = batch["input_ids"].numel()
    replay = RoutingReplay(model, geometry)
    mb = _prepare(replay, samples, batch, "left")
    native = mb.host.region == NATIVE
    assert int(native.sum()) == 3 + 2
    cap = S.ExpertsCapture(model)
    with replay.replaying(mb):
        _run(model, batch, backward=False)
    cap.close()
    same, rows = _agreement(cap, geometry, samples, spans, total)
    assert same == rows
    for layer in geometry.moe_layers:
        c = cap.calls[layer][0]
        assert torch.equal(c["ids"][native], c["own_ids"][native])
        assert torch.equal(c["weights"][native], c["own_weights"][native])
    assert replay.metrics()["routing_replay/native/tokens"] == 5 * geometry.num_moe_layers
    replay.close()

    # Rows before routed_start see only native rows before them: the same experts as with
    # replay off (ids bit for bit; weights to float rounding, an expert's matmul over another
    # set of tokens may round differently).
    off = S.ExpertsCapture(model)
    with torch.no_grad():
        _run(model, batch, backward=False)
    off.close()
    prefix = np.zeros(total, bool)
    prefix[spans[0][0]:spans[0][0] + 3] = True
    for layer in geometry.moe_layers:
        on_ids = cap.calls[layer][0]["ids"][prefix]
        assert torch.equal(on_ids, off.calls[layer][0]["ids"][prefix])
        torch.testing.assert_close(cap.calls[layer][0]["weights"][prefix].detach(),
                                   off.calls[layer][0]["weights"][prefix])


@pytest.mark.parametrize("layout", ["right", "packed"])
def test_gradient_checkpointing_recompute_replays_the_same_ids(family: str, layout: str) -> None:
    model = S.build_model(family)
    model.gradient_checkpointing_enable()
    model.train()
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [12, 7, 9], seed=5)
    batch, spans = _batch(samples, layout)
    total = batch["input_ids"].numel()
    replay = RoutingReplay(model, geometry)
    mb = _prepare(replay, samples, batch, layout)
    cap = S.ExpertsCapture(model)
    with replay.replaying(mb):
        _run(model, batch)
    cap.close()
    for layer in geometry.moe_layers:
        assert len(cap.calls[layer]) == 2, "the layer was not recomputed"
        assert torch.equal(cap.calls[layer][0]["ids"], cap.calls[layer][1]["ids"])
    for call in (0, 1):
        same, rows = _agreement(cap, geometry, samples, spans, total, call)
        assert same == rows, f"call {call}: {same}/{rows}"
    # Agreement counted once per block, not again in the recompute.
    assert replay.metrics()["routing_replay/tokens"] == rows
    assert all(p.grad is not None for n, p in model.named_parameters()
               if n.endswith("mlp.gate.weight"))
    replay.close()


def test_outside_a_pass_and_after_close_the_model_routes_natively(family: str) -> None:
    model = S.build_model(family)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [8], seed=6)
    batch, _ = _batch(samples, "right", seq=8)
    replay = RoutingReplay(model, geometry)

    def routed() -> list[Any]:
        cap = S.ExpertsCapture(model)
        with torch.no_grad():
            _run(model, batch, backward=False)
        cap.close()
        return [(c["ids"], c["own_ids"]) for layer in geometry.moe_layers
                for c in cap.calls[layer]]

    for ids, own in routed():
        assert torch.equal(ids, own)
    replay.close()
    for ids, own in routed():
        assert torch.equal(ids, own)
    assert not any(m._forward_hooks for n, m in model.named_modules() if n.endswith("mlp.gate"))


def test_bfloat16_models_get_weights_in_the_familys_dtype(family: str) -> None:
    model = S.build_model(family).to(torch.bfloat16)
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [9, 6], seed=7)
    batch, spans = _batch(samples, "packed")
    with RoutingReplay(model, geometry) as replay:
        cap = S.ExpertsCapture(model)
        with replay.replaying(_prepare(replay, samples, batch, "packed")):
            _run(model, batch)
        cap.close()
    same, rows = _agreement(cap, geometry, samples, spans, batch["input_ids"].numel())
    assert same == rows
    for layer in geometry.moe_layers:
        c = cap.calls[layer][0]
        assert c["weights"].dtype == c["own_weights"].dtype


@pytest.mark.parametrize("family_", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_the_aux_loss_reads_the_routers_own_logits(family_: str) -> None:
    """Replay leaves the router logits alone: the logits the model records for its
    load-balancing loss are the router's own on the experts' input, and the aux loss is the
    family's function of them (the model's own top-k), replay on or off."""
    model = S.build_model(family_)
    model.config.output_router_logits = True
    geometry = model_geometry(model)
    samples = S.make_samples(geometry, [9, 6], seed=8)
    batch, _ = _batch(samples, "right", seq=10)
    with RoutingReplay(model, geometry) as replay:
        cap = S.ExpertsCapture(model)
        with replay.replaying(_prepare(replay, samples, batch, "right")), torch.no_grad():
            on = model(**batch)
        cap.close()
    with torch.no_grad():
        off = model(**batch)
    assert len(on.router_logits) == geometry.num_moe_layers
    for logits, layer in zip(on.router_logits, geometry.moe_layers):
        gate = cap.gates[layer]
        want = torch.nn.functional.linear(cap.calls[layer][0]["hidden"], gate.weight)
        assert torch.equal(logits, want)
    # The first MoE layer's input is the same replay on or off, so is its part of the loss.
    torch.testing.assert_close(on.router_logits[0], off.router_logits[0])
    assert on.aux_loss is not None and torch.isfinite(on.aux_loss)
