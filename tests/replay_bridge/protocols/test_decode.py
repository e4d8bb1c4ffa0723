"""Wire decoding: every engine format round-trips, every malformed input is a named verdict."""

from __future__ import annotations

import io
import json

import numpy as np
import orjson
import pybase64
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_bridge.checks import accept, check_sample
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import decode_response, parse_npy
from replay_bridge.protocols import split_payloads as split

from tests.replay_bridge.protocols.engines import routing, sglang_generate, vllm_completion

GEOMETRIES = [
    RoutingGeometry(4, (0, 1, 2, 3), 2, 8),
    RoutingGeometry(6, (2, 3, 4, 5), 4, 64),  # leading dense layers
    RoutingGeometry(5, (1, 2, 3, 4), 8, 256),  # uint8 edge
    RoutingGeometry(3, (0, 2), 3, 300),  # uint16, dense in the middle
    RoutingGeometry(4, (0, 1, 2, 3), 1, 16),  # top_k 1
]


def _moe(r: np.ndarray, g: RoutingGeometry) -> np.ndarray:
    return r[:, list(g.moe_layers), :]


@settings(max_examples=40, deadline=None)
@given(gi=st.integers(0, len(GEOMETRIES) - 1), prompt_len=st.integers(1, 12),
       out_len=st.integers(0, 10), data=st.data())
def test_sglang_round_trip(gi, prompt_len, out_len, data):
    g = GEOMETRIES[gi]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    start = data.draw(st.integers(0, prompt_len))
    dtype = data.draw(st.sampled_from([None, "int32", "uint16"] + (["uint8"] if g.num_experts <= 256 else [])))
    rows = max(prompt_len + out_len - 1 - start, 0)
    r = routing(rng, rows, g)
    prompt = rng.integers(0, 1000, prompt_len).tolist()
    output = rng.integers(0, 1000, out_len).tolist()
    req, body = sglang_generate(prompt, output, r, dtype=dtype, start=start,
                                pretty=data.draw(st.booleans()))
    [ws] = decode_response("sglang", req, body, g, "s")
    report, routed = accept(ws, g)
    assert report.ok, report.message
    assert routed.routed.dtype == g.id_dtype
    np.testing.assert_array_equal(routed.routed, _moe(r, g))
    assert routed.tokens.tolist() == prompt + output
    assert (routed.prompt_len, routed.routed_start) == (prompt_len, start)


@settings(max_examples=40, deadline=None)
@given(gi=st.integers(0, len(GEOMETRIES) - 1), prompt_len=st.integers(1, 10),
       n=st.integers(1, 3), data=st.data())
def test_vllm_round_trip(gi, prompt_len, n, data):
    g = GEOMETRIES[gi]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dtype = data.draw(st.sampled_from(["int32", "uint16"] + (["uint8"] if g.num_experts <= 256 else [])))
    start = data.draw(st.integers(0, prompt_len))
    prompt = rng.integers(0, 1000, prompt_len).tolist()
    outs = [rng.integers(0, 1000, int(rng.integers(1, 8))).tolist() for _ in range(n)]
    rs = [routing(rng, prompt_len + len(o) - 1 - start, g) for o in outs]
    req, body = vllm_completion(prompt, outs, rs, dtype, start=start)
    samples = decode_response("vllm", req, body, g, "v")
    assert [s.sample_id for s in samples] == ([f"v/{i}" for i in range(n)] if n > 1 else ["v"])
    for s, r, o in zip(samples, rs, outs):
        report, routed = accept(s, g)
        assert report.ok, report.message
        np.testing.assert_array_equal(routed.routed, _moe(r, g))
        assert routed.routed.dtype == g.id_dtype
        assert routed.tokens.tolist() == prompt + o
        assert routed.logprobs.shape == (len(o),)


def test_sglang_batched_list_response(tiny, rng):
    prompts = [[1, 2, 3], [4, 5]]
    outs = [[7, 8], [9]]
    items = []
    rs = []
    for p, o in zip(prompts, outs):
        r = routing(rng, len(p) + len(o) - 1, tiny)
        rs.append(r)
        _, b = sglang_generate(p, o, r)
        items.append(orjson.loads(b))
    req = {"input_ids": prompts, "return_routed_experts": True}
    samples = decode_response("sglang", req, orjson.dumps(items), tiny, "b")
    assert [s.sample_id for s in samples] == ["b/0", "b/1"]
    for s, r in zip(samples, rs):
        np.testing.assert_array_equal(accept(s, tiny)[1].routed, r)


def test_sglang_openai_sglext_and_meta_info(tiny, rng):
    prompt, outs = [1, 2, 3], [[4, 5], [6, 7, 8]]
    rs = [routing(rng, len(prompt) + len(o) - 1, tiny) for o in outs]
    b64 = [pybase64.b64encode(r.tobytes()).decode() for r in rs]
    # n > 1 without return_meta_info: only the first choice's routing comes back.
    body = {"choices": [{"index": i, "text": "", "token_ids": o, "finish_reason": "stop"}
                        for i, o in enumerate(outs)],
            "sglext": {"routed_experts": b64[0]}}
    s0, s1 = decode_response("sglang-openai", {"prompt": prompt, "n": 2}, orjson.dumps(body),
                             tiny, "o")
    np.testing.assert_array_equal(accept(s0, tiny)[1].routed, rs[0])
    r1 = check_sample(s1, tiny)
    assert r1.kinds == ("missing_routing",) and "first choice" in r1.message
    # with return_meta_info every choice carries its own
    for c, b in zip(body["choices"], b64):
        c["meta_info"] = {"routed_experts": b}
    s0, s1 = decode_response("sglang-openai", {"prompt": prompt, "n": 2}, orjson.dumps(body),
                             tiny, "o")
    np.testing.assert_array_equal(accept(s1, tiny)[1].routed, rs[1])


def test_escaped_slash_and_plain_json(rng):
    g = RoutingGeometry(1, (0,), 3, 256)
    r = np.array([[[253, 254, 255]], [[255, 3, 7]]], dtype=np.int32)
    req, body = sglang_generate([1, 2], [4], r, dtype="uint8")
    escaped = body.replace(b"/", b"\\/")
    assert escaped != body  # the uint8 payload "/f7/..." holds slashes
    for raw in (escaped, json.dumps(orjson.loads(body), indent=1).encode()):
        [ws] = decode_response("sglang", req, raw, g, "e")
        np.testing.assert_array_equal(accept(ws, g)[1].routed, r)


def test_payload_stays_bytes(tiny, rng):
    """The scan splits the payload out of the body: the parsed skeleton holds a placeholder."""
    r = routing(rng, 6, tiny)
    _, body = sglang_generate([1, 2, 3], [4, 5, 6, 7], r)
    skeleton, payloads = split(body)
    assert len(skeleton) < len(body) - 40
    placeholder = orjson.loads(skeleton)["meta_info"]["routed_experts"]
    assert placeholder == payloads.placeholder(0).decode()
    assert isinstance(payloads.views[0], memoryview)
    assert payloads.resolve(placeholder) is payloads.views[0]


def test_body_as_a_view_of_a_larger_buffer(tiny, rng):
    """A body given as a memoryview of a receive buffer (bytes before and after it) decodes as
    the bytes do; its payloads are views of that buffer, never a copy; the decoded routing is
    its own memory, unchanged when the buffer is overwritten."""
    r = routing(rng, 6, tiny)
    req, body = sglang_generate([1, 2, 3], [4, 5, 6, 7], r)
    buf = bytearray(b'"routed_experts": "QUJD"' + body + b'x"}]' * 3)
    view = memoryview(buf)[24:24 + len(body)]
    _, payloads = split(view)
    assert payloads.views[0].obj is buf
    payloads.views[0].release()
    [ws] = decode_response("sglang", req, view, tiny, "v")
    [expected] = decode_response("sglang", req, body, tiny, "v")
    routed = accept(ws, tiny)[1].routed
    np.testing.assert_array_equal(routed, accept(expected, tiny)[1].routed)
    del view
    buf[:] = bytes(len(buf))  # the buffer reused for another answer
    np.testing.assert_array_equal(routed, accept(expected, tiny)[1].routed)
    np.testing.assert_array_equal(ws.routing, expected.routing)
    # A view that is not a flat run of bytes is read from a copy, with the same result.
    flat = bytearray(body + b" " * (len(body) % 2))
    [two_d] = decode_response("sglang", req, memoryview(flat).cast("B", (2, len(flat) // 2)),
                              tiny, "v")
    np.testing.assert_array_equal(two_d.routing, expected.routing)


@pytest.mark.parametrize(
    "mutate, kind, needle",
    [
        (lambda m: m.update(routed_experts="@@not base64@@"), "malformed", "base64"),
        (lambda m: m.update(routed_experts=pybase64.b64encode(b"\x01\x02\x03").decode()),
         "malformed", "whole number"),
        (lambda m: m.pop("routed_experts"), "missing_routing", "no routed_experts"),
        (lambda m: m.update(routed_experts_dtype="float32"), "malformed", "routed_experts_dtype"),
    ],
)
def test_sglang_malformed(tiny, rng, mutate, kind, needle):
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    obj = orjson.loads(body)
    mutate(obj["meta_info"])
    [ws] = decode_response("sglang", req, orjson.dumps(obj), tiny, "bad")
    report = check_sample(ws, tiny)
    assert report.kinds == (kind,)
    assert "'bad'" in report.message and needle in report.message


def test_not_json_is_a_verdict(tiny):
    [ws] = decode_response("sglang", {"input_ids": [1]}, b"{not json", tiny, "x")
    assert check_sample(ws, tiny).kinds == ("malformed",)


def test_moe_only_rows_are_a_shape_fault(rng):
    g = RoutingGeometry(4, (1, 2, 3), 2, 8)
    rows = 5
    r = routing(rng, rows, g)[:, 1:, :]  # engine sent MoE layers only
    req, body = sglang_generate([1, 2, 3], [4, 5, 6], np.ascontiguousarray(r))
    report = check_sample(decode_response("sglang", req, body, g, "m")[0], g)
    assert report.kinds == ("shape",) and "MoE layers" in report.message


def test_npy_never_unpickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled"):
        parse_npy(buf.getvalue())
    with pytest.raises(ValueError, match="magic"):
        parse_npy(b"hello world, not npy")
    good = io.BytesIO()
    np.save(good, np.arange(24, dtype=np.uint16).reshape(3, 4, 2))
    with pytest.raises(ValueError, match="bytes"):
        parse_npy(good.getvalue()[:-2])
    floats = io.BytesIO()
    np.save(floats, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="integer"):
        parse_npy(floats.getvalue())


def test_vllm_npy_shape_mismatch(tiny, rng):
    r = routing(rng, 4, RoutingGeometry(3, (0, 1, 2), 2, 8))  # 3 layers, model has 4
    req, body = vllm_completion([1, 2, 3], [[4, 5]], [r], "uint8")
    report = check_sample(decode_response("vllm", req, body, tiny, "v")[0], tiny)
    assert report.kinds == ("shape",) and "(4, 3, 2)" in report.message


def test_vllm_legacy_json_lists(tiny, rng):
    prompt, out = [1, 2, 3], [4, 5]
    r = routing(rng, 4, tiny)
    body = {"prompt_routed_experts": r[:3].tolist(),
            "choices": [{"index": 0, "token_ids": out, "routed_experts": r[3:].tolist()}]}
    [ws] = decode_response("vllm", {"prompt": prompt}, orjson.dumps(body), tiny, "l")
    np.testing.assert_array_equal(accept(ws, tiny)[1].routed, r)


def test_start_offset_outside_prompt(tiny, rng):
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny), start=5)
    report = check_sample(decode_response("sglang", req, body, tiny, "s")[0], tiny)
    assert report.kinds == ("malformed",) and "routed_experts_start_len=5" in report.message
