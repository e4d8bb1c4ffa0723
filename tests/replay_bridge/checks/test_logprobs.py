"""At most one log-prob per completion token: more is a ``malformed`` verdict at the door
(``checks.accept``), so ``ingest`` never stores 50 log-probs for 1 completion token."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from replay_bridge.checks import accept, check_sample
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ingest import ingest
from replay_bridge.sample import WireSample
from replay_bridge.shards import ShardReader, validate_dir
from tests.replay_bridge.protocols.engines import routing, sglang_generate

G = RoutingGeometry(4, (0, 1, 2, 3), 2, 8)


def _sample(rng, completion: int, logprobs: int | None) -> WireSample:
    tokens = np.arange(5 + completion, dtype=np.int32)
    lp = None if logprobs is None else np.full(logprobs, -0.5, np.float32)
    return WireSample("s", tokens, 5, logprobs=lp, routing=routing(rng, 4 + completion, G))


@pytest.mark.parametrize("completion, logprobs", [(1, 50), (3, 4), (0, 1)])
def test_more_log_probs_than_completion_tokens_is_malformed(rng, completion, logprobs):
    report, routed = accept(_sample(rng, completion, logprobs), G)
    assert routed is None and report.kinds == ("malformed",)
    assert (f"{logprobs} log-probs for {completion} completion tokens (at most one per "
            "completion token)") in report.message
    assert check_sample(_sample(rng, completion, logprobs), G).kinds == ("malformed",)


@pytest.mark.parametrize("completion, logprobs", [(3, 3), (3, 1), (3, 0), (3, None), (0, 0)])
def test_one_or_fewer_per_completion_token_passes(rng, completion, logprobs):
    report, routed = accept(_sample(rng, completion, logprobs), G)
    assert report.ok and routed is not None


def test_ingest_quarantines_50_log_probs_for_1_token_and_stores_the_rest(tmp_path, rng):
    lines = []
    for sid in ("a", "fifty", "b"):
        req, body = sglang_generate([1, 2, 3], [4], routing(rng, 3, G))
        doc = orjson.loads(body)
        if sid == "fifty":
            doc["meta_info"]["output_token_logprobs"] = [[-0.25, 4, None]] * 50
        lines.append(orjson.dumps({"sample_id": sid, "request": req, "response": doc}))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = ingest(path, G, "sglang", tmp_path / "out")
    verdicts = {v["sample_id"]: v for v in result.samples}
    assert verdicts["fifty"]["outcome"] == "rejected"
    assert verdicts["fifty"]["kinds"] == ["malformed"]
    assert "50 log-probs for 1 completion tokens" in verdicts["fifty"]["message"]
    reader = ShardReader(tmp_path / "out")
    assert sorted(reader.sample_ids()) == ["a", "b"]
    assert reader["a"].logprobs.tolist() == [-0.25]
    assert validate_dir(tmp_path / "out").ok
