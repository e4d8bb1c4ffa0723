"""Each injected fault produces its protocol.md symptom, and the bridge's checks see it."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.checks import check_sample
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import WireSample
from reference_engine import in_background, serve_pd, serve_router, serve_worker

from .conftest import post, routing

PROMPT = [120, 45, 300, 8, 77, 19, 250, 3, 64]
N_NEW = 10
P, ROWS = len(PROMPT), len(PROMPT) + N_NEW - 1


def _req(**over):
    return {"input_ids": PROMPT, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": N_NEW, "temperature": 1.0, "sampling_seed": 4},
            **over}


def _check(r, start=0):
    tokens = np.asarray(PROMPT + r["output_ids"], dtype=np.int32)
    value = r["meta_info"].get("routed_experts")
    sample = WireSample(sample_id="s0", tokens=tokens, prompt_len=P, routed_start=start,
                        routing=None if value is None else routing(value))
    return check_sample(sample, RoutingGeometry.from_preset("tiny-qwen3-moe"))


def _through_pd(runner, fault, where):
    """(status, answer) to ``_req()`` through a PD trio whose router or workers inject ``fault``."""
    kw = {"router_fault": fault} if where == "router" else {"worker_fault": fault}
    with in_background(serve_pd(runner, **kw)) as pd:
        return post(pd.router + "/generate", _req())


@pytest.fixture(scope="module")
def reference(unified):
    r = post(unified + "/generate", _req())[1]
    assert _check(r).ok
    return r


def test_the_clean_router_passes_the_checks(pd, reference):
    r = post(pd.router + "/generate", _req())[1]
    assert _check(r).ok
    assert r["meta_info"]["routed_experts"] == reference["meta_info"]["routed_experts"]


def test_prefill_zero_rows_on_the_pd_workers(runner, reference):
    r = _through_pd(runner, "prefill-zero-rows", "worker")[1]
    rows = routing(r["meta_info"]["routed_experts"])
    ref = routing(reference["meta_info"]["routed_experts"])
    assert r["output_ids"] == reference["output_ids"]
    assert not rows[:P].any()  # every prompt row, every MoE layer
    np.testing.assert_array_equal(rows[P:], ref[P:])
    report = _check(r)
    assert report.kinds == ("all_zero",)
    assert report.bad_by_region("all_zero") == {"prompt": P * 4, "completion": 0}
    assert report.bad_layers("all_zero") == [0, 1, 2, 3]


def test_prefill_zero_rows_on_a_unified_worker_respects_start_len(runner, reference):
    with in_background(serve_worker(runner, fault="prefill-zero-rows")) as url:
        r = post(url + "/generate", _req(routed_experts_start_len=3))[1]
    rows = routing(r["meta_info"]["routed_experts"])
    assert rows.shape[0] == ROWS - 3
    assert not rows[: P - 3].any() and rows[P - 3:].all(axis=(1, 2)).any()
    np.testing.assert_array_equal(rows[P - 3:],
                                  routing(reference["meta_info"]["routed_experts"])[P:])
    assert _check(r, start=3).bad_by_region("all_zero") == {"prompt": (P - 3) * 4, "completion": 0}


@pytest.mark.parametrize("where", ["router", "worker"])
def test_drop_routed_experts(runner, where):
    status, r = _through_pd(runner, "drop-routed-experts", where)
    assert status == 200 and len(r["output_ids"]) == N_NEW
    assert "routed_experts" not in r["meta_info"]
    assert _check(r).kinds == ("missing_routing",)


def test_no_merge_returns_decodes_zero_prompt_rows(pd, runner, reference):
    with in_background(serve_router(pd.prefill, pd.decode, fault="no-merge")) as router:
        r = post(router + "/generate", _req())[1]
    rows = routing(r["meta_info"]["routed_experts"])
    assert rows.shape[0] == ROWS
    assert not rows[:P].any()
    np.testing.assert_array_equal(rows[P:], routing(reference["meta_info"]["routed_experts"])[P:])
    report = _check(r)
    assert report.kinds == ("all_zero",)
    assert report.bad_by_region("all_zero")["completion"] == 0


def test_no_merge_is_refused_by_a_worker(runner):
    with pytest.raises(ValueError, match="no-merge"):
        with in_background(serve_worker(runner, fault="no-merge")):
            pass


@pytest.mark.parametrize("where", ["router", "worker"])
def test_duplicate_ids(runner, reference, where):
    r = _through_pd(runner, "duplicate-ids", where)[1]
    rows = routing(r["meta_info"]["routed_experts"])
    ref = routing(reference["meta_info"]["routed_experts"])
    dup = rows[..., 0] == rows[..., 1]
    expected = np.zeros(ROWS, dtype=bool)
    expected[P::3] = True
    np.testing.assert_array_equal(dup.all(axis=1), expected)
    np.testing.assert_array_equal(dup.any(axis=1), expected)
    np.testing.assert_array_equal(rows[~expected], ref[~expected])
    report = _check(r)
    assert report.kinds == ("duplicate_ids",)
    assert report.bad_by_region("duplicate_ids") == {"prompt": 0, "completion": int(expected.sum()) * 4}


@pytest.mark.parametrize("where", ["router", "worker"])
def test_extra_row(runner, reference, where):
    r = _through_pd(runner, "extra-row", where)[1]
    rows = routing(r["meta_info"]["routed_experts"])
    ref = routing(reference["meta_info"]["routed_experts"])
    assert rows.shape[0] == ROWS + 1
    # Behind the router both workers' extra rows meet in the splice: prefill's extra row
    # takes the place of decode's first completion row.
    good = ROWS if where == "router" else P
    np.testing.assert_array_equal(rows[:good], ref[:good])
    np.testing.assert_array_equal(rows[-1], rows[-2])
    assert _check(r).kinds == ("row_count",)


def test_stale_prompt_rows_look_valid_but_are_another_requests(runner, reference):
    with in_background(serve_worker(runner, fault="stale-prompt-rows")) as url:
        fresh = post(url + "/generate", _req(input_ids=[5, 6, 7]))[1]
        assert not routing(fresh["meta_info"]["routed_experts"])[:3].any()  # a fresh buffer
        r = post(url + "/generate", _req())[1]
    rows = routing(r["meta_info"]["routed_experts"])
    ref = routing(reference["meta_info"]["routed_experts"])
    # The buffer held the first request's real routing; its rows now sit at our prompt rows.
    earlier = runner.forward_routing([5, 6, 7] + fresh["output_ids"])[:-1]
    np.testing.assert_array_equal(rows[:P], np.resize(earlier, (P, 4, 2)))
    np.testing.assert_array_equal(rows[P:], ref[P:])
    assert (rows[:P] != ref[:P]).any()
    assert _check(r).ok  # invisible to per-block checks: only replay agreement can tell


def test_stale_prompt_rows_is_refused_by_the_router(pd):
    with pytest.raises(ValueError, match="stale-prompt-rows"):
        with in_background(serve_router(pd.prefill, pd.decode, fault="stale-prompt-rows")):
            pass
