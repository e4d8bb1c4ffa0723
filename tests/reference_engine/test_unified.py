"""A unified worker: SGLang's /generate and /v1/completions with real routing."""

from __future__ import annotations

import numpy as np
import pytest

from reference_engine import ModelRunner

from .conftest import post, post_stream, routing

PROMPT = [17, 250, 3, 99, 41, 7, 300, 12]


def _req(**over):
    body = {"input_ids": PROMPT, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0.0}}
    sp = over.pop("sampling_params", None)
    if sp:
        body["sampling_params"] = {**body["sampling_params"], **sp}
    return {**body, **over}


def _forward(runner: ModelRunner, tokens: list[int]) -> np.ndarray:
    """Routing rows of one transformers forward pass over the final tokens (last one dropped)."""
    return runner.forward_routing(tokens)[:-1]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "sampling_seed": 7}])
def test_routing_equals_a_forward_pass(unified, runner, sampling):
    status, r = post(unified + "/generate", _req(sampling_params=sampling))
    assert status == 200
    out = r["output_ids"]
    meta = r["meta_info"]
    assert len(out) == meta["completion_tokens"] == 12
    assert meta["prompt_tokens"] == len(PROMPT)
    assert meta["finish_reason"] == {"type": "length", "length": 12}
    rows = routing(meta["routed_experts"])
    assert rows.shape == (len(PROMPT) + len(out) - 1, 4, 2)
    np.testing.assert_array_equal(rows, _forward(runner, PROMPT + out))
    # A sane engine: ids in range, two distinct experts per block, several experts used.
    assert rows.min() >= 0 and rows.max() < 8
    assert (rows[..., 0] != rows[..., 1]).all()
    assert len(np.unique(rows)) == 8


def test_seeded_sampling_is_reproducible_and_unseeded_is_not_fixed(unified):
    a = post(unified + "/generate", _req(sampling_params={"temperature": 1.0, "sampling_seed": 3}))[1]
    b = post(unified + "/generate", _req(sampling_params={"temperature": 1.0, "sampling_seed": 3}))[1]
    assert a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["routed_experts"] == b["meta_info"]["routed_experts"]
    outs = {tuple(post(unified + "/generate", _req(sampling_params={"temperature": 1.0}))[1]
                  ["output_ids"]) for _ in range(3)}
    assert len(outs) > 1


def test_start_len_skips_rows(unified, runner):
    full = post(unified + "/generate", _req())[1]
    for start in (0, 3, len(PROMPT)):
        r = post(unified + "/generate", _req(routed_experts_start_len=start))[1]
        assert r["output_ids"] == full["output_ids"]
        rows = routing(r["meta_info"]["routed_experts"])
        assert rows.shape[0] == len(PROMPT) + 12 - 1 - start
        np.testing.assert_array_equal(rows, routing(full["meta_info"]["routed_experts"])[start:])


@pytest.mark.parametrize("start", [-1, len(PROMPT) + 1])
def test_start_len_out_of_range_is_refused(unified, start):
    status, r = post(unified + "/generate", _req(routed_experts_start_len=start))
    assert status == 400
    assert "routed_experts_start_len" in r["error"]["message"]
    assert f"prompt_len={len(PROMPT)}" in r["error"]["message"]


def test_no_routing_unless_asked(unified):
    r = post(unified + "/generate", _req(return_routed_experts=False))[1]
    assert "routed_experts" not in r["meta_info"]
    assert len(r["output_ids"]) == 12


def test_logprobs(unified):
    r = post(unified + "/generate", _req(return_logprob=True))[1]
    lps = r["meta_info"]["output_token_logprobs"]
    assert len(lps) == len(r["output_ids"]) == r["meta_info"]["completion_tokens"]
    assert [t for _, t, _ in lps] == r["output_ids"]
    assert all(lp <= 0 and text is None for lp, _, text in lps)


def test_stop_token_and_max_new_tokens(unified, runner):
    first = post(unified + "/generate", _req())[1]["output_ids"]
    stop = first[4]
    r = post(unified + "/generate", _req(sampling_params={"stop_token_ids": [stop]}))[1]
    k = first.index(stop)
    assert r["output_ids"] == first[: k + 1]
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    rows = routing(r["meta_info"]["routed_experts"])
    np.testing.assert_array_equal(rows, _forward(runner, PROMPT + r["output_ids"]))
    # max_new_tokens = 0: the prompt runs, its last row is missing (rows = prompt_len - 1).
    z = post(unified + "/generate", _req(sampling_params={"max_new_tokens": 0}))[1]
    assert z["output_ids"] == []
    assert routing(z["meta_info"]["routed_experts"]).shape[0] == len(PROMPT) - 1


def test_batched_generate_returns_a_list(unified, runner):
    prompts = [PROMPT, [5, 6, 7], [400, 401, 402, 403, 404]]
    status, r = post(unified + "/generate", _req(input_ids=prompts, routed_experts_start_len=2))
    assert status == 200 and isinstance(r, list) and len(r) == 3
    for prompt, item in zip(prompts, r):
        rows = routing(item["meta_info"]["routed_experts"])
        np.testing.assert_array_equal(rows, _forward(runner, prompt + item["output_ids"])[2:])
    assert len({item["meta_info"]["id"] for item in r}) == 3


def test_text_prompt(unified, runner):
    status, r = post(unified + "/generate", {"text": "what is 12 plus 30?", "return_routed_experts": True,
                                             "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    assert status == 200
    assert r["prompt_token_ids"] == runner.encode("what is 12 plus 30?")
    assert isinstance(r["text"], str)
    rows = routing(r["meta_info"]["routed_experts"])
    np.testing.assert_array_equal(rows, _forward(runner, r["prompt_token_ids"] + r["output_ids"]))


def test_streaming_only_the_final_chunk_has_routing(unified):
    body = _req(sampling_params={"temperature": 1.0, "sampling_seed": 11}, stream=True)
    chunks = post_stream(unified + "/generate", body)
    plain = post(unified + "/generate", {**body, "stream": False})[1]
    assert len(chunks) == 12
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 13))
    assert all("routed_experts" not in c["meta_info"] for c in chunks[:-1])
    assert chunks[-1]["output_ids"] == plain["output_ids"]
    assert chunks[-1]["meta_info"]["routed_experts"] == plain["meta_info"]["routed_experts"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_completions_sglext_is_the_first_choice(unified, runner):
    status, r = post(unified + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 5,
        "return_routed_experts": True, "return_meta_info": True, "return_token_ids": True,
        "logprobs": 1})
    assert status == 200
    choices = r["choices"]
    assert len(choices) == 3
    assert r["sglext"]["routed_experts"] == choices[0]["meta_info"]["routed_experts"]
    assert len({tuple(c["token_ids"]) for c in choices}) > 1  # distinct samples per choice
    for c in choices:
        rows = routing(c["meta_info"]["routed_experts"])
        np.testing.assert_array_equal(rows, _forward(runner, PROMPT + c["token_ids"]))
        assert len(c["logprobs"]["token_logprobs"]) == len(c["token_ids"])
    assert r["prompt_token_ids"] == PROMPT
    assert r["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)
    assert r["metadata"]["weight_version"] == "default"


def test_completions_without_meta_info(unified):
    r = post(unified + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "n": 2,
                                           "return_routed_experts": True})[1]
    assert all("meta_info" not in c for c in r["choices"])
    assert routing(r["sglext"]["routed_experts"]).shape[0] == len(PROMPT) + 3 - 1


def test_health_and_info(unified):
    import urllib.request

    for path in ("/health", "/health_generate"):
        with urllib.request.urlopen(unified + path, timeout=30) as resp:
            assert resp.status == 200
    import json

    with urllib.request.urlopen(unified + "/get_model_info", timeout=30) as resp:
        info = json.loads(resp.read())
    assert info["routed_experts_geometry"]["num_layers"] == 4
    assert info["is_generation"] is True


def test_chat_completions(unified, runner):
    messages = [{"role": "user", "content": "what is 12 plus 30?"}]
    status, r = post(unified + "/v1/chat/completions", {
        "messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True,
        "return_routed_experts": True, "return_token_ids": True})
    assert status == 200 and r["object"] == "chat.completion"
    prompt = runner.chat_prompt(messages)
    assert r["prompt_token_ids"] == prompt
    choice = r["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])
    np.testing.assert_array_equal(routing(r["sglext"]["routed_experts"]),
                                  _forward(runner, prompt + choice["token_ids"]))


def test_bad_requests_are_refused_with_the_rule(unified):
    cases = [
        ({"input_ids": [1, 2, 100000]}, "outside the vocabulary"),
        ({"input_ids": []}, "input_ids"),
        ({"sampling_params": {}}, "input_ids or text"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"input_ids": [[1, 2], [3]], "rid": ["a"]}, "rid has 1 entries for 2 prompts"),
        ({"input_ids": [1, 2], "sampling_params": {"stop": ["\n"]}}, "stop_token_ids"),
    ]
    for body, needle in cases:
        status, r = post(unified + "/generate", body)
        assert status == 400, body
        assert needle in r["error"]["message"], (needle, r)
    status, r = post(unified + "/v1/completions", {"prompt": [1, 2], "stop": ["x"]})
    assert status == 400 and "stop_token_ids" in r["error"]["message"]


def test_a_server_without_the_feature_returns_no_routing(runner):
    from reference_engine import in_background, serve_worker

    with in_background(serve_worker(runner, return_routed_experts=False)) as url:
        status, r = post(url + "/generate", _req())
    assert status == 200 and len(r["output_ids"]) == 12
    assert "routed_experts" not in r["meta_info"]


def test_concurrent_requests_keep_their_own_routing(unified, pd, runner):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 500, 5 + i)]
               for i in range(6)]
    jobs = [(url, p) for p in prompts for url in (unified, pd.router)]

    def run(job):
        url, prompt = job
        return post(url + "/generate", _req(input_ids=prompt,
                                            sampling_params={"max_new_tokens": 6}))[1]

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(run, jobs))
    for (_, prompt), r in zip(jobs, results):
        np.testing.assert_array_equal(routing(r["meta_info"]["routed_experts"]),
                                      _forward(runner, prompt + r["output_ids"]))


def test_weight_version_update_mid_generation_splits_the_spans(runner):
    import json
    import urllib.request

    from reference_engine import in_background, serve_worker

    with in_background(serve_worker(runner, weight_version="v1")) as url:
        body = _req(stream=True, sampling_params={"max_new_tokens": 200, "ignore_eos": True})
        req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            first = resp.readline()
            assert first.startswith(b"data: ")
            status, ok = post(url + "/update_weight_version", {"new_version": "v2"})
            assert status == 200 and ok["success"]
            chunks = [line[6:] for line in resp.read().decode().split("\n")
                      if line.startswith("data: ")]
        final = json.loads(chunks[-2])
    meta = final["meta_info"]
    spans = meta["weight_versions"]
    assert meta["weight_version"] == "v2"
    assert [s["version"] for s in spans] == ["v1", "v2"]
    assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] > 0
    assert spans[1]["end"] == meta["completion_tokens"] == 200


def test_input_token_logprobs(unified, runner):
    import torch

    with torch.inference_mode():
        logits = runner.model(input_ids=torch.tensor([PROMPT])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(PROMPT) - 1),
                                              torch.tensor(PROMPT[1:])].tolist()
    r = post(unified + "/generate", _req(return_logprob=True, logprob_start_len=0))[1]
    got = r["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == PROMPT
    assert got[0][0] is None
    np.testing.assert_allclose([lp for lp, _, _ in got[1:]], expected, rtol=1e-4, atol=1e-5)
    # SGLang's default (-1): only the last prompt token.
    last = post(unified + "/generate", _req(return_logprob=True))[1]["meta_info"]
    assert len(last["input_token_logprobs"]) == 1
    np.testing.assert_allclose(last["input_token_logprobs"][0][0], expected[-1], rtol=1e-4)
    status, err = post(unified + "/generate", _req(return_logprob=True,
                                                   logprob_start_len=len(PROMPT)))
    assert status == 400 and "logprob_start_len" in err["error"]["message"]
