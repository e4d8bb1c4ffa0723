"""Our prefill/decode pair behind SGLang's own mini load balancer (sglang-router 0.3.2).

It sends the same request to both workers with bootstrap fields added and returns decode's
response unmerged: the prompt rows are decode's zeros (the ``no-merge`` fault, for real).
Needs ``.venv-sglang-router`` (``scripts/sglang_router_env.sh``) or ``SGLANG_ROUTER_PYTHON``.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.processes import REQUIRES_SGLANG_ROUTER, sglang_mini_lb

from .conftest import post, routing

pytestmark = REQUIRES_SGLANG_ROUTER

PROMPT = [12, 200, 31, 4, 88, 150]
N_NEW = 6


@pytest.fixture(scope="module")
def mini_lb(pd):
    with sglang_mini_lb(pd.prefill, pd.decode) as url:
        yield url


def _req(**over):
    return {"input_ids": PROMPT, "return_routed_experts": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": N_NEW, "temperature": 1.0, "sampling_seed": 9},
            **over}


def test_mini_lb_returns_decodes_unmerged_rows(mini_lb, pd, unified, runner):
    status, r = post(mini_lb + "/generate", _req())
    assert status == 200
    ref = post(unified + "/generate", _req())[1]
    merged = post(pd.router + "/generate", _req())[1]
    assert r["output_ids"] == ref["output_ids"] == merged["output_ids"]
    rows = routing(r["meta_info"]["routed_experts"])
    full = runner.forward_routing(PROMPT + r["output_ids"])[:-1]
    assert rows.shape == full.shape
    assert not rows[: len(PROMPT)].any()  # no merge: decode's zero prompt rows
    np.testing.assert_array_equal(rows[len(PROMPT):], full[len(PROMPT):])
    np.testing.assert_array_equal(routing(merged["meta_info"]["routed_experts"]), full)
    assert len(r["meta_info"]["output_token_logprobs"]) == N_NEW


def test_mini_lb_batched_and_completions(mini_lb):
    status, r = post(mini_lb + "/generate", _req(input_ids=[PROMPT, PROMPT[:3]]))
    assert status == 200 and isinstance(r, list) and len(r) == 2
    assert not routing(r[1]["meta_info"]["routed_experts"])[:3].any()
    status, c = post(mini_lb + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "return_routed_experts": True})
    assert status == 200
    rows = routing(c["sglext"]["routed_experts"])
    assert rows.shape[0] == len(PROMPT) + 4 - 1 and not rows[: len(PROMPT)].any()


def test_mini_lb_streams_with_logprobs(mini_lb, pd):
    from .conftest import post_stream

    chunks = post_stream(mini_lb + "/generate", _req(stream=True, logprob_start_len=0))
    final = chunks[-1]["meta_info"]
    # mini_lb prepends prefill's prompt log-probs to every decode chunk.
    assert [t for _, t, _ in final["input_token_logprobs"]] == PROMPT
    assert len(final["output_token_logprobs"]) == N_NEW
    rows = routing(final["routed_experts"])
    assert rows.shape[0] == len(PROMPT) + N_NEW - 1 and not rows[: len(PROMPT)].any()
