"""Prefill/decode disaggregation: each worker's rows, and the router's merge."""

from __future__ import annotations

import numpy as np

from .conftest import post, post_stream, routing

PROMPT = [33, 2, 480, 61, 17, 250, 9]
N_NEW = 8


def _req(seed=21, **over):
    body = {"input_ids": PROMPT, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": N_NEW, "temperature": 1.0}}
    if seed is not None:
        body["sampling_params"]["sampling_seed"] = seed
    return {**body, **over}


def test_prefill_returns_prompt_rows_and_the_first_token(pd, unified):
    ref = post(unified + "/generate", _req())[1]
    r = post(pd.prefill + "/generate", _req())[1]
    assert r["output_ids"] == ref["output_ids"][:1]
    rows = routing(r["meta_info"]["routed_experts"])
    assert rows.shape[0] == len(PROMPT)
    np.testing.assert_array_equal(rows, routing(ref["meta_info"]["routed_experts"])[: len(PROMPT)])


def test_decode_returns_all_rows_with_zero_prompt_rows(pd, unified):
    ref = post(unified + "/generate", _req())[1]
    r = post(pd.decode + "/generate", _req())[1]
    assert r["output_ids"] == ref["output_ids"]
    rows = routing(r["meta_info"]["routed_experts"])
    ref_rows = routing(ref["meta_info"]["routed_experts"])
    assert rows.shape == ref_rows.shape == (len(PROMPT) + N_NEW - 1, 4, 2)
    assert not rows[: len(PROMPT)].any()
    np.testing.assert_array_equal(rows[len(PROMPT):], ref_rows[len(PROMPT):])


def test_both_workers_agree_on_tokens_from_bootstrap_room(pd):
    body = _req(seed=None, bootstrap_host="127.0.0.1", bootstrap_port=8998,
                bootstrap_room=987654321987)
    firsts = {post(pd.prefill + "/generate", body)[1]["output_ids"][0] for _ in range(2)}
    decodes = {tuple(post(pd.decode + "/generate", body)[1]["output_ids"]) for _ in range(2)}
    assert len(firsts) == 1 and len(decodes) == 1
    assert next(iter(decodes))[0] == next(iter(firsts))


def test_router_merge_equals_unified(pd, unified, runner):
    for start in (0, 4):
        ref = post(unified + "/generate", _req(routed_experts_start_len=start))[1]
        r = post(pd.router + "/generate", _req(routed_experts_start_len=start))[1]
        assert r["output_ids"] == ref["output_ids"]
        assert r["meta_info"]["routed_experts"] == ref["meta_info"]["routed_experts"]
        rows = routing(r["meta_info"]["routed_experts"])
        np.testing.assert_array_equal(
            rows, runner.forward_routing(PROMPT + r["output_ids"])[start:-1])


def test_router_unseeded_sampling_still_agrees(pd, runner):
    # No seed: the router's bootstrap_room makes both workers sample the same tokens.
    r = post(pd.router + "/generate", _req(seed=None))[1]
    rows = routing(r["meta_info"]["routed_experts"])
    np.testing.assert_array_equal(rows, runner.forward_routing(PROMPT + r["output_ids"])[:-1])


def test_quick_finish(pd, unified):
    first = post(unified + "/generate", _req())[1]["output_ids"][0]
    body = _req(sampling_params={"max_new_tokens": N_NEW, "temperature": 1.0,
                                 "sampling_seed": 21, "stop_token_ids": [first]})
    d = post(pd.decode + "/generate", body)[1]
    assert d["output_ids"] == [first]
    assert d["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert "routed_experts" not in d["meta_info"]
    ref = post(unified + "/generate", body)[1]
    r = post(pd.router + "/generate", body)[1]
    assert routing(r["meta_info"]["routed_experts"]).shape[0] == len(PROMPT)
    assert r["meta_info"]["routed_experts"] == ref["meta_info"]["routed_experts"]


def test_router_does_not_merge_batched_requests(pd, runner):
    prompts = [PROMPT, [7, 8, 9, 10]]
    r = post(pd.router + "/generate", _req(input_ids=prompts))[1]
    assert isinstance(r, list) and len(r) == 2
    for prompt, item in zip(prompts, r):
        rows = routing(item["meta_info"]["routed_experts"])
        assert not rows[: len(prompt)].any()
        np.testing.assert_array_equal(
            rows[len(prompt):], runner.forward_routing(prompt + item["output_ids"])[len(prompt):-1])


def test_router_does_not_merge_streams(pd, runner):
    chunks = post_stream(pd.router + "/generate", _req(stream=True))
    final = chunks[-1]
    rows = routing(final["meta_info"]["routed_experts"])
    assert rows.shape[0] == len(PROMPT) + N_NEW - 1
    assert not rows[: len(PROMPT)].any()
    np.testing.assert_array_equal(
        rows[len(PROMPT):], runner.forward_routing(PROMPT + final["output_ids"])[len(PROMPT):-1])


def test_router_completions_merge(pd, unified):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0.0,
            "return_routed_experts": True, "return_meta_info": True}
    ref = post(unified + "/v1/completions", body)[1]
    r = post(pd.router + "/v1/completions", body)[1]
    assert r["sglext"]["routed_experts"] == ref["sglext"]["routed_experts"]
    assert r["choices"][0]["meta_info"]["routed_experts"] == ref["sglext"]["routed_experts"]


def test_router_health(pd):
    import urllib.request

    with urllib.request.urlopen(pd.router + "/health", timeout=30) as resp:
        assert resp.status == 200


def test_router_chat_completions_merge(pd, unified):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
            "temperature": 0.0, "return_routed_experts": True}
    ref = post(unified + "/v1/chat/completions", body)[1]
    r = post(pd.router + "/v1/chat/completions", body)[1]
    assert r["choices"][0]["message"] == ref["choices"][0]["message"]
    assert r["sglext"]["routed_experts"] == ref["sglext"]["routed_experts"]


def test_router_names_an_unreachable_worker(pd):
    from reference_engine import in_background, serve_router
    from tests.support.processes import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with in_background(serve_router(pd.prefill, dead)) as router:
        status, r = post(router + "/generate", _req())
    assert status == 502
    assert dead in r["error"]["message"]


def test_bfloat16_pd_pair_agrees_with_a_bfloat16_unified_worker(tiny_model_dir):
    from reference_engine import ModelRunner, in_background, serve_pd, serve_worker

    runner16 = ModelRunner(tiny_model_dir, dtype="bfloat16")
    with in_background(serve_worker(runner16)) as unified16, \
            in_background(serve_pd(runner16)) as pd16:
        for seed in (1, 2, 3):
            ref = post(unified16 + "/generate", _req(seed=seed))[1]
            r = post(pd16.router + "/generate", _req(seed=seed))[1]
            assert r["output_ids"] == ref["output_ids"]
            assert r["meta_info"]["routed_experts"] == ref["meta_info"]["routed_experts"]
