"""Hostile engine answers: every wrongly typed, non-integer or unreadable value is a
``malformed`` verdict for its own sample, naming the field and the first bad position; decoding
never raises and never coerces."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pybase64
import pytest

from replay_bridge.checks import accept, check_sample
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import (Completion, SamplingParams, decode_parsed, decode_response,
                                     get_protocol, split_payloads, unanswered)
from replay_bridge.sample import WireSample, field_problem

from tests.replay_bridge.protocols.engines import routing, sglang_generate, vllm_completion

Mutation = Callable[[dict[str, Any]], Any]


class Replace:
    """What a mutation returns to replace the whole answer (``None`` included)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _decode(engine: str, req: dict[str, Any], body: Any, g: RoutingGeometry,
            sid: str = "s", **kw: Any) -> list[WireSample]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return decode_response(engine, req, raw, g, sid, **kw)


def _only_verdict(engine: str, req: dict[str, Any], body: Any, g: RoutingGeometry
                  ) -> tuple[tuple[str, ...], str]:
    [ws] = _decode(engine, req, body, g)
    report = check_sample(ws, g)
    return report.kinds, report.message


def _sglang(tiny: RoutingGeometry, rng: np.random.Generator) -> tuple[dict[str, Any], dict]:
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    return req, orjson.loads(body)


def _openai(tiny: RoutingGeometry, rng: np.random.Generator) -> tuple[dict[str, Any], dict]:
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, tiny))
    b64 = orjson.loads(body)["meta_info"]["routed_experts"]
    return ({"prompt": [1, 2, 3], "n": 1},
            {"choices": [{"index": 0, "token_ids": [4, 5], "finish_reason": "stop",
                          "logprobs": {"token_logprobs": [-0.5, -0.25]}}],
             "sglext": {"routed_experts": b64}})


def _meta(f: Callable[[dict[str, Any]], Any]) -> Mutation:
    return lambda body: f(body["meta_info"])


# ---- item 2: one malformed value is a verdict for that one sample --------------------------

SGLANG_BAD: dict[str, tuple[Mutation, str]] = {
    "meta_info a list": (lambda b: b.update(meta_info=[1]), "meta_info is a list"),
    "meta_info a number": (lambda b: b.update(meta_info=7), "meta_info is an int"),
    "meta_info an empty string": (lambda b: b.update(meta_info=""), "meta_info is a str"),
    "logprobs an int": (_meta(lambda m: m.update(output_token_logprobs=3)),
                        "output_token_logprobs is an int"),
    "logprobs a dict": (_meta(lambda m: m.update(output_token_logprobs={"a": 1})),
                        "output_token_logprobs is a dict"),
    "logprobs dicts and ints": (
        _meta(lambda m: m.update(output_token_logprobs=[{"logprob": -1.0}, 3])),
        "output_token_logprobs: item 0 is a dict, expected a [logprob, token id, text] list"),
    "logprobs plain numbers": (
        _meta(lambda m: m.update(output_token_logprobs=[-1.0, -2.0])),
        "output_token_logprobs: item 0 is a float, expected a [logprob, token id, text] list"),
    "logprobs triples and ints": (
        _meta(lambda m: m.update(output_token_logprobs=[[-1.0, 4, None], 3])),
        "output_token_logprobs: item 1 is an int"),
    "logprobs an empty triple": (
        _meta(lambda m: m.update(output_token_logprobs=[[-1.0, 4, None], []])),
        "output_token_logprobs: item 1 is an empty list"),
    "finish_reason a list": (_meta(lambda m: m.update(finish_reason=[1])), "finish_reason"),
    "finish_reason type a number": (_meta(lambda m: m.update(finish_reason={"type": 3})),
                                    "finish_reason"),
    "weight_version a list": (_meta(lambda m: m.update(weight_version=["v"])),
                              "weight_version ['v'] is a list"),
    "weight_version a bool": (_meta(lambda m: m.update(weight_version=True)),
                              "weight_version True is a bool"),
    "weight_versions not a list": (_meta(lambda m: m.update(weight_versions="v1")),
                                   "weight_versions is a str"),
    "weight_versions a scalar span": (_meta(lambda m: m.update(weight_versions=["v1"])),
                                      "weight_versions: span 0 is a str"),
    "weight_versions a string start": (
        _meta(lambda m: m.update(weight_versions=[{"version": "v", "start": "0", "end": 2}])),
        "weight_versions: span 0"),
    "weight_versions past the completion": (
        _meta(lambda m: m.update(weight_versions=[{"version": "v", "start": 0, "end": 9}])),
        "weight_versions: span 0"),
    "routed_experts_dtype a list": (_meta(lambda m: m.update(routed_experts_dtype=["int32"])),
                                    "routed_experts_dtype"),
    "routed_experts_dtype false": (_meta(lambda m: m.update(routed_experts_dtype=False)),
                                   "routed_experts_dtype"),
    "routed_experts a number": (_meta(lambda m: m.update(routed_experts=5)), "routed_experts"),
    "output_ids a string": (lambda b: b.update(output_ids="4,5"), "completion token ids"),
    "output_ids a dict": (lambda b: b.update(output_ids={"0": 4}), "completion token ids"),
    "output_ids nested": (lambda b: b.update(output_ids=[[4], [5]]), "completion token ids"),
    "item a list": (lambda b: Replace([b]), "list of 1 items"),
    "item a number": (lambda b: Replace(3), "the answer is an int"),
    "item null": (lambda b: Replace(None), "the answer is a NoneType"),
}


@pytest.mark.parametrize("case", list(SGLANG_BAD))
def test_sglang_malformed_values_are_verdicts(tiny, rng, case):
    mutate, needle = SGLANG_BAD[case]
    req, body = _sglang(tiny, rng)
    changed = mutate(body)
    kinds, message = _only_verdict("sglang", req,
                                   changed.value if isinstance(changed, Replace) else body, tiny)
    assert kinds == ("malformed",), (case, message)
    assert "'s'" in message and needle in message, message


OPENAI_BAD: dict[str, tuple[Mutation, Mutation | None, str]] = {
    "sglext a list": (lambda b: b.update(sglext=[1]), None, "sglext is a list"),
    "sglext a string": (lambda b: b.update(sglext="x"), None, "sglext is a str"),
    "choice meta_info a list": (lambda b: b["choices"][0].update(meta_info=[3]), None,
                                "meta_info is a list"),
    "n a string": (lambda b: None, lambda r: r.update(n="x"), "n='x'"),
    "n a float": (lambda b: None, lambda r: r.update(n=1.5), "n=1.5"),
    "n a bool": (lambda b: None, lambda r: r.update(n=True), "n=True"),
    "n zero": (lambda b: None, lambda r: r.update(n=0), "n=0"),
    "n huge": (lambda b: None, lambda r: r.update(n=10**9), "n=1000000000"),
    "logprobs a list": (lambda b: b["choices"][0].update(logprobs=[-0.5]), None,
                        "logprobs is a list"),
    "token_logprobs numeric strings": (
        lambda b: b["choices"][0].update(logprobs={"token_logprobs": ["-0.5", "-0.25"]}), None,
        "token_logprobs: item 0 is a str"),
    "token_logprobs triples": (
        lambda b: b["choices"][0].update(logprobs={"token_logprobs": [[-0.5], [-0.25]]}), None,
        "token_logprobs: item 0 is a list"),
    "token_logprobs bools": (
        lambda b: b["choices"][0].update(logprobs={"token_logprobs": [-0.5, True]}), None,
        "token_logprobs: item 1 is a bool"),
    "chat content without logprob": (
        lambda b: b["choices"][0].update(logprobs={"content": [{"logprob": -1.0}, {"x": 1}]}),
        None, "content: item 1"),
    "more log-probs than tokens": (
        lambda b: b["choices"][0].update(logprobs={"token_logprobs": [-0.5] * 50}), None,
        "50 log-probs for 2 completion tokens"),
    "prompt_token_ids a string": (
        lambda b: b["choices"][0].update(prompt_token_ids="1 2 3"),
        lambda r: r.update(prompt="hello"), "prompt token ids is a str"),
    "index a bool": (lambda b: b["choices"][0].update(index=True), None, "index True"),
    "index out of range": (lambda b: b["choices"][0].update(index=3), None, "index 3"),
    "choices not a list": (lambda b: b.update(choices={"0": {}}), None, "choices"),
    "a choice not an object": (lambda b: b.update(choices=[7]), None, "not an object"),
}


@pytest.mark.parametrize("case", list(OPENAI_BAD))
def test_sglang_openai_malformed_values_are_verdicts(tiny, rng, case):
    mutate_body, mutate_req, needle = OPENAI_BAD[case]
    req, body = _openai(tiny, rng)
    mutate_body(body)
    if mutate_req is not None:
        mutate_req(req)
    wires = _decode("sglang-openai", req, body, tiny)
    assert wires, case
    for ws in wires:
        report = check_sample(ws, tiny)
        assert report.kinds == ("malformed",), (case, report.message)
        assert needle in report.message, report.message


def test_the_good_openai_answer_is_good(tiny, rng):
    """The base the cases above mutate decodes and passes."""
    req, body = _openai(tiny, rng)
    [ws] = _decode("sglang-openai", req, body, tiny)
    assert check_sample(ws, tiny).ok


@pytest.mark.parametrize("engine", ["sglang", "sglang-openai", "vllm"])
@pytest.mark.parametrize("version, needle", [
    (True, "policy_version True is a bool"), (1.0, "policy_version 1.0 is a float"),
    ("3", "policy_version '3' is a str"), (2**63, "outside int64"),
    (-(2**63) - 1, "outside int64")])
def test_policy_version_must_be_an_int64(tiny, rng, engine, version, needle):
    req, body = _answer(engine, tiny, rng, 2)
    wires = _decode(engine, req, body, tiny, policy_version=version)
    assert len(wires) == get_protocol(engine).samples_asked(req)
    for ws in wires:
        report = check_sample(ws, tiny)
        assert report.kinds == ("malformed",) and needle in report.message, report.message
        assert ws.policy_version is None  # the bad value goes nowhere
    assert not unanswered(engine, req, wires, "s")


@pytest.mark.parametrize("group", [5, True, ["g"], {"g": 1}])
def test_group_id_must_be_a_string(tiny, rng, group):
    req, body = _answer("vllm", tiny, rng, 2)
    wires = _decode("vllm", req, body, tiny, group_id=group)
    assert [check_sample(w, tiny).kinds for w in wires] == [("malformed",)] * 2
    assert all("group_id" in check_sample(w, tiny).message for w in wires)


def test_field_problem_rules():
    assert field_problem("sample_id", "a") is None
    assert field_problem("sample_id", "") == "sample_id is empty"
    assert "is missing" in field_problem("sample_id", None)
    assert "int" in field_problem("sample_id", 3)
    assert field_problem("group_id", None) is None and field_problem("group_id", "g") is None
    assert field_problem("policy_version", None) is None
    assert field_problem("policy_version", 2**63 - 1) is None
    assert field_problem("policy_version", -(2**63)) is None
    assert "outside int64" in field_problem("policy_version", 2**63)


def _answer(engine: str, g: RoutingGeometry, rng: np.random.Generator, n: int
            ) -> tuple[dict[str, Any], bytes]:
    """A good request and answer with ``n`` samples (one for SGLang's two protocols)."""
    if engine == "vllm":
        outs = [[4, 5], [6, 7, 8]][:n]
        return vllm_completion([1, 2, 3], outs, [routing(rng, 2 + len(o), g) for o in outs],
                               "int32")
    return sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, g)) if engine == "sglang" \
        else (_openai(g, rng)[0], orjson.dumps(_openai(g, rng)[1]))


# ---- item 4: no silent coercion ----------------------------------------------------------

@pytest.mark.parametrize("bad, needle", [
    ([4.7, 5], "completion token ids: position 0 is a float (4.7)"),
    ([4, True], "completion token ids: position 1 is a bool (True)"),
    ([4, "5"], "completion token ids: position 1 is a str ('5')"),
    ([4, None], "completion token ids: position 1 is a NoneType"),
    ([4, -1], "completion token ids: position 1 is -1"),
    ([4, 2**40], "completion token ids: position 1 is 1099511627776"),
    ([4, 2**64 - 1], "completion token ids: position 1 is 18446744073709551615"),
])
def test_completion_token_ids_are_never_coerced(tiny, rng, bad, needle):
    req, body = _sglang(tiny, rng)
    body["output_ids"] = bad
    kinds, message = _only_verdict("sglang", req, body, tiny)
    assert kinds == ("malformed",) and needle in message, message


@pytest.mark.parametrize("bad, needle", [
    ([1, 2.0, 3], "prompt token ids: position 1 is a float (2.0)"),
    (["1", 2, 3], "prompt token ids: position 0 is a str ('1')"),
    ([1, False, 3], "prompt token ids: position 1 is a bool (False)"),
])
def test_prompt_token_ids_are_never_coerced(tiny, rng, bad, needle):
    req, body = _sglang(tiny, rng)
    req["input_ids"] = bad
    kinds, message = _only_verdict("sglang", req, body, tiny)
    assert kinds == ("malformed",) and needle in message, message
    # and as the OpenAI request's prompt
    oreq, obody = _openai(tiny, rng)
    oreq["prompt"] = bad
    kinds, message = _only_verdict("sglang-openai", oreq, obody, tiny)
    assert kinds == ("malformed",) and needle in message, message


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
@pytest.mark.parametrize("spoil, needle", [
    (lambda r: _set(r, (1, 2, 0), 0.9), "routed_experts: element [1, 2, 0] is a float (0.9)"),
    (lambda r: _set(r, (0, 0, 1), 3.0), "routed_experts: element [0, 0, 1] is a float (3.0)"),
    (lambda r: _set(r, (2, 1, 1), "3"), "routed_experts: element [2, 1, 1] is a str ('3')"),
    (lambda r: _set(r, (3, 3, 0), True), "routed_experts: element [3, 3, 0] is a bool (True)"),
    (lambda r: _set(r, (0, 1, 0), None), "routed_experts: element [0, 1, 0] is a NoneType"),
    (lambda r: _set(r, (0, 1), [1]), "routed_experts"),
])
def test_routing_lists_are_never_coerced(tiny, rng, engine, spoil, needle):
    r = routing(rng, 4, tiny)
    rows = spoil(r.tolist())
    if engine == "sglang":
        req, body = _sglang(tiny, rng)
        body["meta_info"]["routed_experts"] = rows
    else:
        req = {"prompt": [1, 2, 3]}
        body = {"choices": [{"index": 0, "token_ids": [4, 5], "routed_experts": rows}]}
    kinds, message = _only_verdict(engine, req, body, tiny)
    assert kinds == ("malformed",) and needle in message, message


def _set(rows: list, at: tuple[int, ...], value: Any) -> list:
    target = rows
    for i in at[:-1]:
        target = target[i]
    target[at[-1]] = value
    return rows


def test_vllm_legacy_prompt_rows_are_never_coerced(tiny, rng):
    r = routing(rng, 4, tiny)
    prompt_rows = r[:3].tolist()
    prompt_rows[0][0][0] = 1.5
    body = {"prompt_routed_experts": prompt_rows,
            "choices": [{"index": 0, "token_ids": [4, 5], "routed_experts": r[3:].tolist()}]}
    kinds, message = _only_verdict("vllm", {"prompt": [1, 2, 3]}, body, tiny)
    assert kinds == ("malformed",)
    assert "prompt_routed_experts: element [0, 0, 0] is a float (1.5)" in message


def test_start_offset_is_never_coerced(tiny, rng):
    req, body = _sglang(tiny, rng)
    for bad in (False, 0.0, "", [], "1"):
        kinds, message = _only_verdict("sglang", {**req, "routed_experts_start_len": bad},
                                       body, tiny)
        assert kinds == ("malformed",) and "routed_experts_start_len" in message, (bad, message)


# ---- item 5: the payload fast path cannot be fooled ---------------------------------------

def test_an_escaped_key_cannot_borrow_another_items_payload(tiny, rng):
    """Item 0 carries its routing under the plain key; item 1 spells the key with a JSON
    escape (which the byte scan does not split) and gives the literal placeholder text the
    scan once used: item 1 must not be decoded from item 0's bytes."""
    r0 = routing(rng, 4, tiny)
    b64 = pybase64.b64encode(r0.tobytes()).decode()
    req = {"input_ids": [[1, 2, 3], [1, 2, 3]]}
    body = (b'[{"output_ids":[4,5],"meta_info":{"routed_experts":"' + b64.encode() + b'"}},'
            b'{"output_ids":[4,5],"meta_info":{"routed\\u005fexperts":"#0"}}]')
    assert orjson.loads(body)[1]["meta_info"]["routed_experts"] == "#0"
    w0, w1 = decode_response("sglang", req, body, tiny, "b")
    report0, routed0 = accept(w0, tiny)
    assert report0.ok
    np.testing.assert_array_equal(routed0.routed, r0)
    report1 = check_sample(w1, tiny)
    assert report1.kinds == ("malformed",) and "base64" in report1.message
    # The placeholder the scan uses is unique to each body and unknowable to its sender:
    # whatever text item 1 carries, the decoded result is what parsing the body without the
    # scan gives.
    skeleton, payloads = split_payloads(body)
    placeholder = orjson.loads(skeleton)[0]["meta_info"]["routed_experts"]
    assert placeholder != "#0" and len(placeholder) > 16
    assert split_payloads(body)[1].prefix != payloads.prefix  # each body has its own nonce
    forged = body.replace(b'"#0"', orjson.dumps(placeholder))
    w0, w1 = decode_response("sglang", req, forged, tiny, "b")
    assert check_sample(w1, tiny).kinds == ("malformed",)
    np.testing.assert_array_equal(accept(w0, tiny)[1].routed, r0)


def test_the_scan_never_changes_a_result(tiny, rng):
    """An escaped quote inside a routing value ends the scan's slice early: the body is still
    decoded as its JSON says (here: not base64), never refused as not JSON."""
    req, body = _sglang(tiny, rng)
    raw = orjson.dumps(body).replace(b'"routed_experts":"', b'"routed_experts":"a\\"b')
    assert orjson.loads(raw)["meta_info"]["routed_experts"].startswith('a"b')
    kinds, message = _only_verdict("sglang", req, raw, tiny)
    assert kinds == ("malformed",) and "base64" in message, message


# ---- item 10, the decode side ------------------------------------------------------------

def test_big_endian_npy_is_read_by_its_byte_order(tiny, rng):
    r = routing(rng, 4, tiny)
    for dtype in (">i4", ">u2", ">i8", "<u2"):
        buf = io.BytesIO()
        np.save(buf, r.astype(dtype), allow_pickle=False)
        body = {"choices": [{"index": 0, "token_ids": [4, 5],
                             "routed_experts": pybase64.b64encode(buf.getvalue()).decode()}]}
        [ws] = _decode("vllm", {"prompt": [1, 2, 3]}, body, tiny)
        report, routed = accept(ws, tiny)
        assert report.ok, (dtype, report.message)
        np.testing.assert_array_equal(routed.routed, r)


def test_a_list_answer_to_one_generate_request_says_so(tiny, rng):
    req, body = _sglang(tiny, rng)
    kinds, message = _only_verdict("sglang", req, [body, body], tiny)
    assert kinds == ("malformed",)
    assert "the answer is a list of 2 items" in message and "one sample" in message, message


def test_generate_with_n_samples_of_one_prompt(tiny, rng):
    """``sampling_params.n`` > 1 for one prompt: SGLang answers with a list, every item
    continuing the one prompt."""
    rs = [routing(rng, 4, tiny), routing(rng, 5, tiny)]
    outs = [[4, 5], [6, 7, 8]]
    p = get_protocol("sglang")
    (call,) = p.plan([1, 2, 3], ["s"], SamplingParams(3, extra={"n": 2}))
    body = p.encode_response({**call.payload, "input_ids": [[1, 2, 3]]},
                             [Completion(o, r) for o, r in zip(outs, rs)])
    assert p.samples_asked(call.payload) == 2
    wires = _decode("sglang", call.payload, body, tiny)
    assert [w.sample_id for w in wires] == ["s/0", "s/1"]
    for w, o, r in zip(wires, outs, rs):
        report, routed = accept(w, tiny)
        assert report.ok, report.message
        assert routed.tokens.tolist() == [1, 2, 3] + o
        np.testing.assert_array_equal(routed.routed, r)
    # one item short: every asked-for sample gets a verdict that says so
    short = _decode("sglang", call.payload, body[:1], tiny)
    assert [w.sample_id for w in short] == ["s/0", "s/1"]
    assert all("1 items for 2 samples" in check_sample(w, tiny).message for w in short)


def test_fewer_vllm_choices_than_n_are_unanswered(tiny, rng):
    req, body = _answer("vllm", tiny, rng, 2)
    answer = orjson.loads(body)
    answer["choices"] = answer["choices"][1:]
    wires = _decode("vllm", req, answer, tiny)
    assert [w.sample_id for w in wires] == ["s/1"]
    assert unanswered("vllm", req, wires, "s") == ["s/0"]
    answer["choices"] = []
    assert unanswered("vllm", req, _decode("vllm", req, answer, tiny), "s") == ["s/0", "s/1"]


def test_a_repeated_choice_index_is_malformed(tiny, rng):
    req, body = _answer("vllm", tiny, rng, 2)
    answer = orjson.loads(body)
    answer["choices"][1]["index"] = 0
    wires = _decode("vllm", req, answer, tiny)
    assert check_sample(wires[0], tiny).ok and wires[0].sample_id == "s/0"
    assert wires[1].index == -1 and "repeats index 0" in check_sample(wires[1], tiny).message
    assert unanswered("vllm", req, wires, "s") == ["s/1"]


@pytest.mark.parametrize("lps, needle", [
    ([[-0.5, 4, None], ["x", 5, None]], "output_token_logprobs: item 1 holds a str ('x')"),
    ([[-0.5, 4, None], [True, 5, None]], "output_token_logprobs: item 1 holds a bool"),
    ([["-0.5", 4, None], [-0.1, 5, None]], "output_token_logprobs: item 0 holds a str"),
    ([[-0.5, 4, None]] * 3, "3 log-probs for 2 completion tokens"),
])
def test_unreadable_log_probs_are_malformed_not_dropped(tiny, rng, lps, needle):
    req, body = _sglang(tiny, rng)
    body["meta_info"]["output_token_logprobs"] = lps
    kinds, message = _only_verdict("sglang", req, body, tiny)
    assert kinds == ("malformed",) and needle in message, message


def test_null_log_probs_are_nan_and_ints_are_numbers(tiny, rng):
    req, body = _sglang(tiny, rng)
    body["meta_info"]["output_token_logprobs"] = [[None, 4, None], [0, 5, None]]
    [ws] = _decode("sglang", req, body, tiny)
    report, routed = accept(ws, tiny)
    assert report.ok
    assert np.isnan(routed.logprobs[0]) and routed.logprobs[1] == 0.0


def _total(engine: str, req: Any, body: Any, g: RoutingGeometry) -> None:
    """Decoding gives every asked-for sample a sample or an unanswered id, with no decoder
    error behind it."""
    wires = _decode(engine, req, body, g)
    assert wires or unanswered(engine, req, wires, "s"), (engine, req, body)
    for w in wires:
        assert w.fault is None or "decoder error" not in w.fault.message, w.fault


def test_decoding_is_total_over_junk(tiny, rng):
    """Whatever JSON stands where a field should be, decoding returns samples, never raises."""
    junk: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], [None], [[]], {}, {"a": []},
                       [1, "a"], [{"logprob": "x"}], 2**64 - 1]
    req, body = _sglang(tiny, rng)
    oreq, obody = _openai(tiny, rng)
    for value in junk:
        for key in ("meta_info", "output_ids", "prompt_token_ids", "text"):
            b = copy.deepcopy(body)
            b[key] = value
            _total("sglang", req, b, tiny)
        for key in ("output_token_logprobs", "routed_experts", "routed_experts_dtype",
                    "finish_reason", "weight_version", "weight_versions", "id"):
            b = copy.deepcopy(body)
            b["meta_info"][key] = value
            _total("sglang", req, b, tiny)
        for key in ("input_ids", "sampling_params", "text", "routed_experts_start_len"):
            _total("sglang", {**req, key: value}, body, tiny)
        _total("sglang", req, value, tiny)
        for key in ("index", "token_ids", "logprobs", "finish_reason", "meta_info",
                    "prompt_token_ids", "routed_experts"):
            b = copy.deepcopy(obody)
            b["choices"][0][key] = value
            _total("sglang-openai", oreq, b, tiny)
            _total("vllm", oreq, b, tiny)
        for key in ("choices", "sglext", "prompt_routed_experts", "prompt_token_ids"):
            _total("sglang-openai", oreq, {**obody, key: value}, tiny)
            _total("vllm", oreq, {**obody, key: value}, tiny)
        for key in ("n", "prompt", "routed_experts_prompt_start", "routed_experts_start_len"):
            _total("vllm", {**oreq, key: value}, obody, tiny)
            _total("sglang-openai", {**oreq, key: value}, obody, tiny)
        _total("vllm", oreq, value, tiny)
        _total("sglang-openai", oreq, value, tiny)
        assert decode_parsed("vllm", value, obody, split_payloads(b"")[1], tiny, "s")


def test_a_long_string_is_never_quoted_in_a_message(tiny, rng):
    """A value an engine echoed (say a bearer token in a wrong place) appears in the verdict
    only as its type and length."""
    secret = "Bearer sk-live-0123456789abcdef"
    req, body = _sglang(tiny, rng)
    body["output_ids"] = [4, secret]
    kinds, message = _only_verdict("sglang", req, body, tiny)
    assert kinds == ("malformed",) and "completion token ids: position 1" in message
    assert "sk-" not in message and f"<str of {len(secret)} chars>" in message, message
    body["output_ids"] = [4, 5]
    body["meta_info"]["finish_reason"] = [secret]
    kinds, message = _only_verdict("sglang", req, body, tiny)
    assert "finish_reason" in message and "sk-" not in message, message
