"""merge_prefill_decode: prefill's prompt rows + decode's completion rows, from SGLang-shaped
worker answers; the same sample the PD router's splice gives, and every inconsistency a named
fault."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest

from replay_bridge import (DecodeFault, WireSample, accept, accept_batch, decode_response,
                           merge_prefill_decode)
from replay_bridge.protocols import splice_routing
from tests.replay_bridge.adapters.batches import (DENSE_PREFIX, JUNK, Rollout,
                                                  assert_same_verdict, engine_verdict,
                                                  rollout)
from tests.replay_bridge.protocols.engines import sglang_generate

G = DENSE_PREFIX


def answer(s: Rollout, output: np.ndarray, rows: np.ndarray | None) -> tuple[dict, bytes]:
    return sglang_generate(s.prompt.tolist(), output.tolist(), rows, start=s.start)


def decoded(request: dict, body: bytes, sid: str = "s") -> WireSample:
    (wire,) = decode_response("sglang", request, body, G, sid)
    return wire


def prefill_of(s: Rollout) -> WireSample:
    """The prefill worker's answer: the first token, the prompt rows."""
    return decoded(*answer(s, s.completion[:1], s.rows[: s.prompt.size - s.start]))


def decode_of(s: Rollout, junk: int | None = 0, *, completion_only: bool = False
              ) -> WireSample:
    """The decode worker's answer: every token, every row with junk prompt rows (or only the
    completion rows)."""
    p = s.prompt.size - s.start
    rows = s.rows.copy()
    if junk is not None:
        rows[:p] = junk
    return decoded(*answer(s, s.completion, rows[p:] if completion_only else rows))


@pytest.fixture(params=[0, 2], ids=["start0", "start2"])
def pd(request, rng) -> Rollout:
    return rollout(rng, G, "s", 6, 5, start=request.param)


@pytest.mark.parametrize("junk", [0, JUNK], ids=["zero", "garbage"])
def test_decode_with_every_row_equals_the_routers_splice(pd, junk):
    prefill, decode = prefill_of(pd), decode_of(pd, junk)
    merged = merge_prefill_decode(prefill, decode)
    assert merged.fault is None and merged.routing.shape == (pd.n - 1 - pd.start, 5, 4)

    # SGLang's router: prefill's bytes, then decode's past prefill's length.
    request, p_body = answer(pd, pd.completion[:1], pd.rows[: pd.prompt.size - pd.start])
    _, d_body = answer(pd, pd.completion, decode.routing)
    body = orjson.loads(d_body)
    body["meta_info"]["routed_experts"] = splice_routing(
        orjson.loads(p_body)["meta_info"]["routed_experts"], body["meta_info"]["routed_experts"])
    spliced = decoded(request, orjson.dumps(body))
    np.testing.assert_array_equal(merged.routing, spliced.routing)
    np.testing.assert_array_equal(merged.tokens, spliced.tokens)
    assert_same_verdict(accept(merged, G), accept(spliced, G))
    assert_same_verdict(accept(merged, G), engine_verdict(pd, G))


def test_decode_with_completion_rows_only(pd):
    merged = merge_prefill_decode(prefill_of(pd), decode_of(pd, completion_only=True))
    assert_same_verdict(accept(merged, G), engine_verdict(pd, G))


def test_the_decoded_answer_is_the_requests(pd):
    decode = decode_of(pd)
    merged = merge_prefill_decode(prefill_of(pd), decode)
    np.testing.assert_array_equal(merged.tokens, decode.tokens)
    np.testing.assert_array_equal(merged.logprobs, decode.logprobs)
    assert (merged.finish_reason, merged.engine, merged.prompt_len, merged.routed_start) == (
        "stop", "sglang", 6, pd.start)


def test_without_a_merge_the_junk_prompt_rows_are_rejected(pd):
    """What a router that does not merge stores: decode's junk prompt rows."""
    assert accept(decode_of(pd), G)[0].kinds == ("all_zero",)


def test_first_token_finished_the_request(rng):
    s = rollout(rng, G, "s", 6, 1)
    prefill = prefill_of(s)
    decode = decoded(*answer(s, s.completion, None))  # quick finish: no routed_experts
    assert decode.fault.kind == "missing_routing"
    for d in (decode, None):
        merged = merge_prefill_decode(prefill, d)
        assert merged.fault is None
        assert_same_verdict(accept(merged, G), engine_verdict(s, G))


def test_no_decode_routing_for_completion_rows_is_missing_routing(pd):
    decode = decoded(*answer(pd, pd.completion, None))
    merged = merge_prefill_decode(prefill_of(pd), decode)
    assert merged.routing is None and merged.fault.kind == "missing_routing"
    assert merged.fault.message == "decode returned no routing for the 4 completion rows " \
                                   "(positions 6..9)"
    report, routed = accept(merged, G)
    assert report.kinds == ("missing_routing",) and routed is None


def test_a_decode_rows_count_of_neither_kind(pd):
    decode = decode_of(pd)
    decode.routing = decode.routing[1:]
    merged = merge_prefill_decode(prefill_of(pd), decode)
    full = pd.n - 1 - pd.start
    assert merged.fault == DecodeFault("row_count", f"decode returned {full - 1} routing rows, "
                                       f"expected {full} (tokens 11 - 1 - routed_start "
                                       f"{pd.start}) or 4 (its completion positions 6..9)")


def test_a_prefill_without_its_last_prompt_row(pd):
    prefill = prefill_of(pd)
    prefill.routing = prefill.routing[:-1]
    merged = merge_prefill_decode(prefill, decode_of(pd))
    assert merged.fault.kind == "row_count"
    assert merged.fault.message.startswith(f"prefill returned {5 - pd.start} routing rows, "
                                           f"expected prompt_len 6 - routed_start {pd.start}")
    assert accept(merged, G)[0].message.startswith("sample 's': row_count: prefill returned")


def test_halves_of_different_requests_are_malformed(pd, rng):
    prefill, decode = prefill_of(pd), decode_of(pd)
    other = dataclasses.replace(pd, prompt=pd.prompt.copy())
    other.prompt[3] += 1
    cases = {
        "prompt": (prefill_of(other), f"prefill's token at position 3 is {other.prompt[3]}, "
                                      f"decode's {pd.prompt[3]}"),
        "first token": (dataclasses.replace(prefill, tokens=prefill.tokens + np.int32(
            np.arange(prefill.num_tokens) == 6)), "prefill's token at position 6 is"),
        "start": (dataclasses.replace(prefill, routed_start=pd.start + 1),
                  f"prefill's routed_start is {pd.start + 1}, decode's {pd.start}"),
        "id": (dataclasses.replace(prefill, sample_id="t"), "prefill's sample_id is 't', "
                                                          "decode's 's'"),
        "prompt_len": (dataclasses.replace(prefill, prompt_len=5), "prefill's prompt_len is 5"),
    }
    for what, (p, message) in cases.items():
        merged = merge_prefill_decode(p, decode)
        assert merged.fault.kind == "malformed", what
        assert merged.fault.message.startswith(message), (what, merged.fault.message)
        assert merged.routing is None


def test_more_prefill_tokens_than_decode_tokens(pd):
    decode = decoded(*answer(pd, pd.completion[:0], None))  # the prompt alone
    merged = merge_prefill_decode(prefill_of(pd), decode)
    assert merged.fault == DecodeFault("malformed", "prefill holds 7 tokens, more than "
                                                    "decode's 6")


def test_worker_faults_carry_their_kind(pd):
    prefill, decode = prefill_of(pd), decode_of(pd)
    bad = dataclasses.replace(decode, routing=None, fault=DecodeFault("malformed", "bad base64"))
    merged = merge_prefill_decode(prefill, bad)
    assert merged.fault == DecodeFault("malformed", "decode: bad base64")
    bad = dataclasses.replace(prefill, routing=None, fault=DecodeFault("shape", "MoE only"))
    assert merge_prefill_decode(bad, decode).fault == DecodeFault("shape", "prefill: MoE only")
    none = dataclasses.replace(prefill, routing=None)
    assert merge_prefill_decode(none, decode).fault.kind == "missing_routing"


def test_routing_axes_that_differ_are_a_shape_fault(pd):
    decode = decode_of(pd)
    decode.routing = decode.routing[:, :, :3]
    merged = merge_prefill_decode(prefill_of(pd), decode)
    assert merged.fault == DecodeFault("shape", "prefill's routing rows are (5, 4), decode's "
                                                "(5, 3) (layers x top_k)")


def test_native_marks_of_both_halves_are_kept(rng):
    s = rollout(rng, G, "s", 4, 4)
    prefill, decode = prefill_of(s), decode_of(s)
    prefill.native = np.array([False, True, False, False])
    decode.native = np.zeros(7, bool)
    decode.native[[0, 5]] = True  # row 0 is a junk prompt row: not taken
    prefill.routing = prefill.routing.copy()
    prefill.routing[1] = 0
    merged = merge_prefill_decode(prefill, decode)
    assert merged.native.tolist() == [False, True, False, False, False, True, False]
    merge_batch = accept_batch([merged], G)
    assert merge_batch.ok and merge_batch.samples[0].native_rows == 2


def test_merged_samples_feed_accept_batch(rng):
    samples = [rollout(rng, G, f"s{i}", 5, 3) for i in range(3)]
    merged = [merge_prefill_decode(prefill_of(s), decode_of(s)) for s in samples]
    merged[1] = merge_prefill_decode(prefill_of(samples[1]),
                                     decoded(*answer(samples[1], samples[1].completion, None)))
    batch = accept_batch(merged, G)
    assert [r.kinds for r in batch.reports] == [(), ("missing_routing",), ()]
    assert len(batch.accepted) == 2


def test_a_native_mask_of_the_wrong_length_is_malformed(rng):
    s = rollout(rng, G, "s", 4, 4)
    prefill, decode = prefill_of(s), decode_of(s)
    decode.native = np.zeros(3, bool)
    merged = merge_prefill_decode(prefill, decode)
    assert merged.fault == DecodeFault("malformed", "decode's native mask has shape (3,), its "
                                                    "routing 7 rows")
