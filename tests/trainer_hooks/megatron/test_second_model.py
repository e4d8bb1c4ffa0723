"""A second model in the process: a reference or teacher beside the policy, a decoder that a
builder made and dropped, a second replay on a second model. The replayed model replays the
stored ids exactly, every other model routes natively (bit for bit as if no replay existed), and
the guard still refuses a router of the replayed model that the replay does not control."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from tests.trainer_hooks.megatron import support as S
from trainer_hooks.megatron import Packing, ReplayConfigError, RoutingReplay, model_geometry
from trainer_hooks.megatron.steps import make_forward_step

pytestmark = pytest.mark.usefixtures("megatron_cpu")

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
PACKING = Packing.thd(1)  # no padding: sample j's rows start where the samples before it end
STEPS = 3
POLICY_SEED, REFERENCE_SEED = 1, 2
GLOBAL_METHODS = ("set_replay_data", "get_recorded_data", "clear_global_indices",
                  "set_global_router_replay_action", "clear_global_router_replay_action",
                  "clear_global_router_replay_instances")


def _gpt(seed: int, cls: type | None = None, **overrides: Any) -> Any:
    """A tiny GPTModel built as ``support.build_model`` builds it, but without clearing
    megatron's process-wide RouterReplay list first (models built earlier stay listed)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    torch.manual_seed(seed)
    config = S.model_config(**overrides)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return (cls or GPTModel)(
        config=config, transformer_layer_spec=spec, vocab_size=S.VOCAB,
        max_sequence_length=256, position_embedding_type="rope",
    )


class _WriteOnlyList(list):
    """Stands for megatron's RouterReplay instance list: routers being built append to it,
    any read fails the test."""

    def _read(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("megatron's process-wide RouterReplay list was read")

    __iter__ = __len__ = __getitem__ = __contains__ = __reversed__ = _read
    index = count = copy = pop = remove = clear = _read

    def held(self) -> list[Any]:
        return list.copy(self)


def _forbid_global_replay_state(monkeypatch: pytest.MonkeyPatch) -> _WriteOnlyList:
    """From here on, reading megatron's instance list or calling RouterReplay's process-wide
    static methods fails the test (the replay must use neither)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    listed = _WriteOnlyList()
    monkeypatch.setattr(RouterReplay, "global_router_replay_instances", listed)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a RouterReplay static method over every instance was called")

    for name in GLOBAL_METHODS:
        monkeypatch.setattr(RouterReplay, name, staticmethod(refused))
    return listed


def _replays_of(model: torch.nn.Module) -> list[Any]:
    return [m.router_replay for m in model.modules()
            if getattr(m, "router_replay", None) is not None]


def _assert_untouched(model: torch.nn.Module) -> None:
    """Routers of a model no replay controls: no action, no targets, no hook ever installed."""
    for rr in _replays_of(model):
        assert rr.router_replay_action is None and rr.target_topk_idx is None
        assert rr.replay_backward_list == [] and "get_replay_topk" not in vars(rr)


# ---- one pass through megatron's schedule ---------------------------------------------------


class _WithReference:
    """A KL-to-reference step's data iterator: each micro-batch, when the policy's forward step
    fetches it (the policy's replay targets already set), first goes through the reference;
    the loss reads its output."""

    def __init__(self, batches: Iterable[Mapping[str, Any]], reference: Any) -> None:
        self._it = iter(batches)
        self.reference = reference
        self.outputs: list[torch.Tensor] = []

    def __iter__(self) -> _WithReference:
        return self

    def __next__(self) -> dict[str, Any]:
        b = next(self._it)
        if self.reference is None:
            return dict(b)
        with torch.no_grad():
            out = self.reference(b["tokens"], b["position_ids"], b["attention_mask"])
        self.outputs.append(out)
        return {**b, "reference": out}


def _loss(batch: Mapping[str, Any], output: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    ref = batch.get("reference")
    d = output.float() - (ref.float() if ref is not None else 0.0)
    loss = d.pow(2).mean()
    return loss, {"loss": loss.detach()}


def _pass(model: Any, replay: RoutingReplay, data: Any, n: int, forward_only: bool) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    get_forward_backward_func()(
        forward_step_func=replay.wrap_forward_step(make_forward_step(_loss)),
        data_iterator=data, model=[model], num_microbatches=n, seq_length=1,
        micro_batch_size=1, forward_only=forward_only,
    )


def _sgd(model: torch.nn.Module, lr: float = 0.05) -> float:
    """One plain SGD step on the gradients the pass left; returns the largest change."""
    moved = 0.0
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                step = lr * p.grad
                p -= step
                moved = max(moved, float(step.abs().max()))
                p.grad = None
    return moved


def _assert_replayed(
    calls: dict[int, list[torch.Tensor]], groups: Sequence[Sequence[RoutedSample]],
    order: Sequence[int], geo: RoutingGeometry,
) -> None:
    """Router call ``c`` of every MoE layer routed exactly the stored ids of micro-batch
    ``order[c]`` (THD, no padding; the last position of each sample has no stored row)."""
    assert sorted(calls) == list(geo.moe_layers)
    for i, layer in enumerate(geo.moe_layers):
        assert len(calls[layer]) == len(order)
        for rm, m in zip(calls[layer], order):
            got = S.routing_map_ids(rm, geo.top_k)
            start = 0
            for s in groups[m]:
                want = np.sort(s.routed[:, i, :].astype(np.int64), axis=-1)
                np.testing.assert_array_equal(got[start : start + s.num_tokens - 1], want)
                start += s.num_tokens
            assert start == len(got)


def _step_groups(geo: RoutingGeometry, seed: int) -> list[list[list[RoutedSample]]]:
    """Per step: two micro-batches of rollout samples."""
    out = []
    for t in range(STEPS):
        samples = S.make_samples(geo, [7, 5, 9, 6], seed=seed + t, prefix=f"t{t}-")
        out.append([samples[:2], samples[2:]])
    return out


def _replay_steps(
    policy: Any, replay: RoutingReplay, steps: list[list[list[RoutedSample]]], reference: Any,
) -> list[tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]]:
    """RL steps on the policy: a log-prob pass then a training pass (backward, recompute) per
    step, each followed by an SGD update; the reference runs inside both passes. Asserts the
    policy replayed exactly; returns the reference's outputs and routing maps per pass."""
    geo = replay.geometry
    seen = []
    for groups in steps:
        batches = [S.batch_inputs(g, PACKING) for g in groups]
        for forward_only in (True, False):
            mbs = [replay.prepare(g) for g in groups]
            data = _WithReference(batches, reference)
            cap = S.RoutingCapture(policy)
            ref_cap = S.RoutingCapture(reference) if reference is not None else None
            with replay.replaying(mbs, forward_only=forward_only):
                _pass(policy, replay, data, len(mbs), forward_only)
            cap.close()
            order = [0, 1] if forward_only else [0, 0, 1, 1]  # recompute in each backward
            _assert_replayed(cap.calls, groups, order, geo)
            if ref_cap is not None:
                ref_cap.close()
                seen.append((data.outputs, ref_cap.calls))
                _assert_untouched(reference)
        assert _sgd(policy) > 0.0
    return seen


def _reference_alone(steps: list[list[list[RoutedSample]]]) -> list[Any]:
    """The reference's outputs and routing with nothing else in the process: no policy, no
    replay, no RouterReplay at all (the same weights: the seed decides them)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    ref = _gpt(REFERENCE_SEED, moe_enable_routing_replay=False)
    assert not RouterReplay.global_router_replay_instances
    out = []
    for groups in steps:
        for _ in (True, False):
            cap = S.RoutingCapture(ref)
            with torch.no_grad():
                logits = [ref(b["tokens"], b["position_ids"], b["attention_mask"])
                          for b in (S.batch_inputs(g, PACKING) for g in groups)]
            cap.close()
            out.append((logits, cap.calls))
    return out


# ---- a reference or teacher model beside the policy -------------------------------------------


@pytest.mark.parametrize("reference_replay", [True, False], ids=["ref_replay_on", "ref_replay_off"])
@pytest.mark.parametrize("order", ["policy_first", "reference_first"])
def test_policy_replays_and_reference_routes_natively(order, reference_replay, monkeypatch):
    """KL to a reference policy: the reference runs inside the policy's replay passes (log-prob
    and training, several steps, the policy updated after each). The policy routes the stored
    ids at every router call; the reference's outputs and routing equal, bit for bit, those of
    the same reference alone in the process. Megatron's process-wide list and static methods
    are never used (reading them fails the test)."""
    geo = model_geometry(S.model_config())
    steps = _step_groups(geo, seed=40)
    alone = _reference_alone(steps)
    listed = _forbid_global_replay_state(monkeypatch)

    def reference() -> Any:
        return _gpt(REFERENCE_SEED, moe_enable_routing_replay=reference_replay)

    if order == "reference_first":
        ref, policy = reference(), _gpt(POLICY_SEED, **RECOMPUTE)
    else:
        policy, ref = _gpt(POLICY_SEED, **RECOMPUTE), reference()
    held = listed.held()
    assert len(held) == (8 if reference_replay else 4)
    assert all(any(r is x for x in held) for r in _replays_of(ref))  # the reference's stay

    replay = RoutingReplay(policy, geo, packing=PACKING)
    with_ref = _replay_steps(policy, replay, steps, ref)
    assert len(with_ref) == len(alone) == 2 * STEPS
    for (outs, calls), (want_outs, want_calls) in zip(with_ref, alone):
        assert len(outs) == len(want_outs) == 2
        for o, w in zip(outs, want_outs):
            assert torch.equal(o, w)
        assert sorted(calls) == sorted(want_calls) == list(geo.moe_layers)
        for layer in want_calls:
            assert len(calls[layer]) == 2
            for a, b in zip(calls[layer], want_calls[layer]):
                assert torch.equal(a, b)
    replay.close()
    _assert_untouched(ref)


def test_a_teacher_with_its_own_geometry_routes_natively_between_policy_passes():
    """Distillation with a differently shaped teacher (dense first layer, 16 experts, top-3),
    run outside the policy's passes and inside them: native every time."""
    geo = model_geometry(S.model_config())
    teacher_kw = dict(moe_layer_freq=[0, 1, 1, 1], num_moe_experts=16, moe_router_topk=3)
    batch = S.batch_inputs(S.make_samples(geo, [8, 6], seed=3), PACKING)

    def teacher_routing(model: Any) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
        cap = S.RoutingCapture(model)
        with torch.no_grad():
            out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        cap.close()
        return out, cap.calls

    want = teacher_routing(_gpt(7, moe_enable_routing_replay=False, **teacher_kw))
    teacher = _gpt(7, **teacher_kw)
    policy = _gpt(POLICY_SEED)
    replay = RoutingReplay(policy, geo, packing=PACKING)
    groups = [S.make_samples(geo, [6, 9], seed=11)]
    mbs = [replay.prepare(g) for g in groups]
    seen = [teacher_routing(teacher)]
    cap = S.RoutingCapture(policy)
    with replay.replaying(mbs):
        seen.append(teacher_routing(teacher))
        _pass(policy, replay, _WithReference([S.batch_inputs(groups[0], PACKING)], None), 1,
              forward_only=False)
        seen.append(teacher_routing(teacher))
    cap.close()
    _assert_replayed(cap.calls, groups, [0], geo)
    seen.append(teacher_routing(teacher))
    for out, calls in seen:
        assert torch.equal(out, want[0])
        assert sorted(calls) == sorted(want[1]) == [1, 2, 3]
        for layer in calls:
            assert torch.equal(calls[layer][0], want[1][layer][0])
    _assert_untouched(teacher)
    replay.close()


# ---- a builder that makes its decoder twice -------------------------------------------------


def _decoder_built_twice(keep: bool = False) -> type:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlock

    class DecoderBuiltTwice(GPTModel):
        """As Megatron-Bridge's Qwen3-VL text model does: ``GPTModel.__init__`` builds a
        decoder, then the subclass builds another one in its place. The first decoder's
        routers are gone (unless ``keep``: then it stays a submodule, ``draft``), their
        RouterReplay instances stay in megatron's list, first."""

        def __init__(self, *, config: Any, transformer_layer_spec: Any, **kw: Any) -> None:
            super().__init__(config=config, transformer_layer_spec=transformer_layer_spec, **kw)
            self.dropped = _replays_of(self.decoder)
            if keep:
                self.draft = self.decoder
            self.decoder = TransformerBlock(
                config=config, spec=transformer_layer_spec, pre_process=self.pre_process,
                post_process=self.post_process, pg_collection=self.pg_collection,
            )

    return DecoderBuiltTwice


def test_a_decoder_built_twice_by_the_model_is_accepted_and_replays_exactly(monkeypatch):
    listed_now = _forbid_global_replay_state(monkeypatch)
    model = _gpt(POLICY_SEED, cls=_decoder_built_twice(), **RECOMPUTE)
    live = _replays_of(model)
    listed = listed_now.held()
    assert len(model.dropped) == len(live) == 4
    assert [id(r) for r in listed] == [id(r) for r in model.dropped + live]  # orphans first
    geo = model_geometry(model.config)
    replay = RoutingReplay(model, geo, packing=PACKING)
    assert [s.replay for s in replay._slots] == live
    _replay_steps(model, replay, _step_groups(geo, seed=60)[:2], None)
    for rr in model.dropped:
        assert rr.router_replay_action is None and rr.target_topk_idx is None
        assert "get_replay_topk" not in vars(rr)
    replay.close()


# ---- two replays on two models ----------------------------------------------------------------


def test_two_replays_on_two_models_at_once_each_replay_their_own():
    """Two policies (different geometries), each with its own RoutingReplay, both passes open at
    once and run one after the other: each model routes its own stored ids."""
    a = _gpt(3, **RECOMPUTE)
    b = _gpt(4, moe_layer_freq=[0, 1, 1, 1], num_moe_experts=16, moe_router_topk=3)
    geo_a, geo_b = model_geometry(a.config), model_geometry(b.config)
    ra = RoutingReplay(a, geo_a, packing=PACKING)
    rb = RoutingReplay(b, geo_b, packing=PACKING)
    for t in range(2):
        ga = _step_groups(geo_a, seed=80 + t)[0]
        gb = _step_groups(geo_b, seed=90 + t)[0]
        mbs_a = [ra.prepare(g) for g in ga]
        mbs_b = [rb.prepare(g) for g in gb]
        cap_a, cap_b = S.RoutingCapture(a), S.RoutingCapture(b)
        with ra.replaying(mbs_a), rb.replaying(mbs_b, forward_only=True):
            _pass(b, rb, _WithReference([S.batch_inputs(g, PACKING) for g in gb], None), 2,
                  forward_only=True)
            _pass(a, ra, _WithReference([S.batch_inputs(g, PACKING) for g in ga], None), 2,
                  forward_only=False)
        cap_a.close()
        cap_b.close()
        _assert_replayed(cap_a.calls, ga, [0, 0, 1, 1], geo_a)
        _assert_replayed(cap_b.calls, gb, [0, 1], geo_b)
        assert _sgd(a) > 0.0
    ra.close()
    rb.close()


# ---- what is still refused: a router of the replayed model the replay does not control ------


def _router_from_another_model(layer_number: int | None) -> Any:
    def attach(model: Any) -> None:
        donor = _gpt(9).decoder.layers[0].mlp.router
        donor.layer_number = layer_number
        model.extra_router = donor
    return attach


class _GroupGate(torch.nn.Module):
    """A custom gate that routes through megatron's RouterReplay but is no TopKRouter."""

    def __init__(self) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplay

        super().__init__()
        self.router_replay = RouterReplay()


def _add_gate(model: Any) -> None:
    model.decoder.layers[2].mlp.group_gate = _GroupGate()


def _share_replay(model: Any) -> None:
    layers = model.decoder.layers
    layers[1].mlp.router.router_replay = layers[0].mlp.router.router_replay


def _drop_replay(model: Any) -> None:
    model.decoder.layers[3].mlp.router.router_replay = None


@pytest.mark.parametrize(
    "change,needle",
    [
        (None, r"layer 0 has 2 routers \(decoder\.layers\.0\.mlp\.router, "
               r"draft\.layers\.0\.mlp\.router\): only one of them can be replayed"),
        (_router_from_another_model(None),
         r"router extra_router has no layer number \(it is in no transformer layer\)"),
        (_router_from_another_model(3),
         r"layer 2 has 2 routers \(decoder\.layers\.2\.mlp\.router, extra_router\)"),
        (_add_gate, r"chunk0:decoder\.layers\.2\.mlp\.group_gate \(_GroupGate\) holds a "
                    r"RouterReplay but is not one of the routers this replay controls"),
        (_share_replay, r"routers chunk0:decoder\.layers\.0\.mlp\.router, "
                        r"chunk0:decoder\.layers\.1\.mlp\.router share one RouterReplay"),
        (_drop_replay, r"router chunk0:decoder\.layers\.3\.mlp\.router has no RouterReplay"),
    ],
    ids=["first_decoder_kept_as_submodule", "router_outside_layers",
         "router_duplicating_a_layer", "non_router_module", "shared_instance",
         "router_without_replay"],
)
def test_a_router_of_the_replayed_model_the_replay_does_not_control_is_refused(change, needle):
    """Routers inside the replayed model that the replay would not drive (they would route
    natively, or replay another router's targets) are refused, named."""
    if change is None:  # a builder that rebuilt its decoder but kept the first one
        model = _gpt(POLICY_SEED, cls=_decoder_built_twice(keep=True))
    else:
        model = _gpt(POLICY_SEED)
        geo = model_geometry(model.config)
        RoutingReplay(model, geo).close()  # accepted before the change
        change(model)
    with pytest.raises(ReplayConfigError, match=needle):
        RoutingReplay(model, model_geometry(model.config))


def test_a_router_at_a_dense_layer_is_refused_by_name():
    model = _gpt(POLICY_SEED, moe_layer_freq=[0, 1, 1, 1])
    _router_from_another_model(1)(model)
    with pytest.raises(ReplayConfigError,
                       match=r"router extra_router is at layer 0, a dense layer in the geometry"):
        RoutingReplay(model, model_geometry(model.config))
