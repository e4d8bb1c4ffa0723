"""The protocol registry: every protocol plans, decodes and encodes; encodings are pinned by
hand-written wire bytes; each protocol's field names live in its own module only."""

from __future__ import annotations

import io
import re

import numpy as np
import orjson
import pybase64
import pytest

from replay_bridge.checks import accept
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import (PROTOCOLS, Completion, Protocol, SamplingParams,
                                     decode_response, get_protocol, splice_routing)

from tests.replay_bridge.protocols.engines import routing
from tests.support.processes import ROOT

# Every integer dtype each protocol can carry (SGLang: routed_experts_dtype names; vLLM: any
# integer .npy); None is the protocol's default.
DTYPES = {
    "sglang": [None, "int32", "uint16", "uint8", "int16", "int64"],
    "sglang-openai": [None, "int32", "uint16", "uint8", "int16", "int64"],
    "vllm": [None, "int32", "uint16", "uint8", "int16", "int64"],
}
CASES = [(name, dtype) for name in PROTOCOLS for dtype in DTYPES[name]]


def test_registry_is_complete() -> None:
    assert set(PROTOCOLS) == {"sglang", "sglang-openai", "vllm"} == set(DTYPES)
    for name, p in PROTOCOLS.items():
        assert isinstance(p, Protocol) and p.name == name and get_protocol(name) is p
        assert p.path.startswith("/") and p.start_field
        for method in ("plan", "decode", "encode_routing", "decode_routing", "encode_response"):
            assert getattr(type(p), method) is not getattr(Protocol, method), (name, method)
    with pytest.raises(ValueError, match="unknown engine 'trtllm'; one of sglang, "
                                         "sglang-openai, vllm"):
        get_protocol("trtllm")


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_plan_asks_for_the_start_offset_in_the_protocols_field(name: str) -> None:
    p = get_protocol(name)
    calls = p.plan(np.array([1, 2, 3, 4, 5, 6]), ["a/0", "a/1", "a/2"], SamplingParams(4),
                   routed_start=5)
    assert len(calls) == p.calls_per_prompt(3)
    assert [sid for c in calls for sid in c.sample_ids] == ["a/0", "a/1", "a/2"]
    for c in calls:
        assert c.path == p.path
        assert c.payload[p.start_field] == 5 and p.requested_start(c.payload) == 5
        assert orjson.loads(orjson.dumps(c.payload)) == c.payload  # plain JSON


@pytest.mark.parametrize("name, dtype", CASES)
def test_encode_then_decode_round_trips(name: str, dtype: str | None,
                                        rng: np.random.Generator) -> None:
    g = RoutingGeometry(6, (2, 3, 4, 5), 4, 64)
    p = get_protocol(name)
    prompt = rng.integers(0, 1000, 7).tolist()
    outs = [rng.integers(0, 1000, 5).tolist() for _ in range(3)]
    start = 2
    rows = [routing(rng, len(prompt) + len(o) - 1 - start, g) for o in outs]
    got = {}
    for call in p.plan(prompt, ["s/0", "s/1", "s/2"], SamplingParams(5), routed_start=start):
        picked = [("s/0", "s/1", "s/2").index(sid) for sid in call.sample_ids]
        answer = p.encode_response(call.payload, [
            Completion(outs[i], rows[i], logprobs=[-0.5] * 5) for i in picked], dtype=dtype)
        wires = decode_response(name, call.payload, orjson.dumps(answer), g, "x")
        assert [w.index for w in wires] == list(range(len(picked)))
        got.update({call.sample_ids[w.index]: w for w in wires})
    for i, sid in enumerate(("s/0", "s/1", "s/2")):
        report, routed = accept(got[sid], g)
        assert report.ok, report.message
        np.testing.assert_array_equal(routed.routed, rows[i][:, list(g.moe_layers)])
        assert routed.tokens.tolist() == prompt + outs[i]
        assert routed.routed_start == start and routed.engine == name
        np.testing.assert_array_equal(routed.logprobs, np.full(5, -0.5, np.float32))


@pytest.mark.parametrize("name, dtype", CASES)
def test_decode_routing_inverts_encode_routing(name: str, dtype: str | None,
                                               rng: np.random.Generator) -> None:
    g = RoutingGeometry(4, (0, 1, 2, 3), 2, 16)
    p = get_protocol(name)
    r = routing(rng, 9, g)
    back = p.decode_routing(p.encode_routing(r, dtype), g, dtype)
    np.testing.assert_array_equal(back, r)
    with pytest.raises(ValueError):
        p.decode_routing("@@ not base64 @@", g, dtype)


# ---- hand-written wire bytes: encoders and decoders against numpy + base64 directly --------

def test_sglang_wire_bytes_by_hand(rng: np.random.Generator) -> None:
    g = RoutingGeometry(3, (0, 2), 3, 300)
    r = routing(rng, 5, g)
    b64 = pybase64.b64encode(r.astype("<u2").tobytes()).decode()
    assert get_protocol("sglang").encode_routing(r, "uint16") == b64
    assert get_protocol("sglang-openai").encode_routing(r, "uint16") == b64
    assert get_protocol("sglang").encode_routing(r) == pybase64.b64encode(
        r.astype("<i4").tobytes()).decode()
    body = b'{"text":"","output_ids":[7,8,9],"meta_info":{"routed_experts_dtype":"uint16",' \
           b'"routed_experts":"' + b64.encode() + b'"}}'
    req = {"input_ids": [1, 2, 3, 4], "routed_experts_start_len": 1}
    [ws] = decode_response("sglang", req, body, g, "h")
    assert ws.fault is None and ws.routed_start == 1 and ws.routing.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(ws.routing, r)


def test_vllm_wire_bytes_by_hand(rng: np.random.Generator) -> None:
    g = RoutingGeometry(4, (0, 1, 2, 3), 2, 8)
    r = routing(rng, 4, g).astype(np.uint8)
    buf = io.BytesIO()
    np.save(buf, r, allow_pickle=False)
    b64 = pybase64.b64encode(buf.getvalue()).decode()
    encoded = get_protocol("vllm").encode_routing(r)
    np.testing.assert_array_equal(
        np.load(io.BytesIO(pybase64.b64decode(encoded)), allow_pickle=False), r)
    body = orjson.dumps({"choices": [{"index": 0, "token_ids": [4, 5],
                                      "routed_experts": b64}]})
    req = {"prompt": [1, 2, 3], "routed_experts_prompt_start": 0}
    [ws] = decode_response("vllm", req, body, g, "h")
    assert ws.fault is None and ws.sample_id == "h" and ws.index == 0
    np.testing.assert_array_equal(ws.routing, r)


def test_vllm_choices_out_of_order_keep_their_index(rng: np.random.Generator) -> None:
    g = RoutingGeometry(4, (0, 1, 2, 3), 2, 8)
    outs = {0: [10, 11], 1: [20, 21], 2: [30, 31]}

    def choice(i: int) -> dict:
        buf = io.BytesIO()
        np.save(buf, np.full((4, 4, 2), i, np.uint8), allow_pickle=False)
        return {"index": i, "token_ids": outs[i],
                "routed_experts": pybase64.b64encode(buf.getvalue()).decode()}

    body = orjson.dumps({"choices": [choice(2), choice(0), choice(1)]})
    wires = decode_response("vllm", {"prompt": [1, 2, 3], "n": 3}, body, g, "v")
    assert [(w.sample_id, w.index) for w in wires] == [("v/2", 2), ("v/0", 0), ("v/1", 1)]
    for w in wires:
        assert w.tokens[3:].tolist() == outs[w.index] and (w.routing == w.index).all()
    # A choice whose index is not an integer answers no sample: it is malformed, named by
    # its position.
    body = orjson.dumps({"choices": [{**choice(0), "index": "a"}, choice(1)]})
    wires = decode_response("vllm", {"prompt": [1, 2, 3], "n": 2}, body, g, "v")
    assert [(w.sample_id, w.index) for w in wires] == [("v/choice-0", -1), ("v/1", 1)]
    assert wires[0].fault.kind == "malformed" and "index 'a'" in wires[0].fault.message


def test_splice_routing_is_prefills_bytes_then_decodes_rest() -> None:
    prefill = np.arange(3 * 2 * 2, dtype="<i4").reshape(3, 2, 2)  # the prompt rows
    decode = np.zeros((5, 2, 2), "<i4")  # prompt rows never recorded, then 2 generated
    decode[3:] = 7
    merged = splice_routing(pybase64.b64encode(prefill.tobytes()).decode(),
                            pybase64.b64encode(decode.tobytes()).decode())
    got = np.frombuffer(pybase64.b64decode(merged), "<i4").reshape(5, 2, 2)
    np.testing.assert_array_equal(got[:3], prefill)
    np.testing.assert_array_equal(got[3:], decode[3:])


# ---- one home per field name -------------------------------------------------------------

FIELD_HOMES = {
    "routed_experts_start_len": "replay_bridge/protocols/_sglang_generate.py",
    "routed_experts_prompt_start": "replay_bridge/protocols/_vllm.py",
}


@pytest.mark.parametrize("field, home", sorted(FIELD_HOMES.items()))
def test_a_protocol_field_name_is_spelled_in_its_module_only(field: str, home: str) -> None:
    spelled = sorted(
        str(path.relative_to(ROOT))
        for package in ("replay_bridge", "reference_engine")
        for path in (ROOT / package).rglob("*.py")
        if re.search(rf"\b{field}\b", path.read_text(encoding="utf-8"))
    )
    assert spelled == [home]
