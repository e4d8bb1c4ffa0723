"""Write examples/traffic/sglang-pd.jsonl: SGLang /generate traffic for the tiny Qwen3-MoE
geometry, with the faults seen in the field mixed in (the offline example of the README).

    python examples/traffic/make_traffic.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from replay_bridge.benchmarks.traffic import valid_routing
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import get_protocol

OUT = Path(__file__).with_name("sglang-pd.jsonl")


def main() -> None:
    g = RoutingGeometry.from_preset("tiny-qwen3-moe")
    sglang = get_protocol("sglang")
    rng = np.random.default_rng(7)
    lines = []
    for i in range(24):
        group, member = divmod(i, 4)
        prompt = rng.integers(3, 500, int(rng.integers(8, 24))).tolist()
        output = rng.integers(3, 500, int(rng.integers(4, 16))).tolist()
        r = valid_routing(rng, len(prompt) + len(output) - 1, g)
        meta = {
            "id": f"req-{i}", "prompt_tokens": len(prompt), "completion_tokens": len(output),
            "finish_reason": {"type": "length", "length": len(output)},
            "output_token_logprobs": [[round(float(-rng.random() * 3), 4), t, None]
                                      for t in output],
            "weight_version": "1",
        }
        fault = {5: "prefill-zero-rows", 11: "prefill-zero-rows", 14: "duplicate-ids",
                 17: "drop-routed-experts", 20: "bad-base64", 22: "extra-row"}.get(i)
        if fault == "prefill-zero-rows":  # SGLang PR #23885: prompt rows never copied
            r[: len(prompt)] = 0
        elif fault == "duplicate-ids":
            r[len(prompt) + 1, 2] = r[len(prompt) + 1, 2, 0]
        elif fault == "extra-row":
            r = np.concatenate([r, r[-1:]])
        b64 = sglang.encode_routing(r)
        if fault == "bad-base64":
            b64 = b64[:-3] + "!!!"
        if fault != "drop-routed-experts":
            meta["routed_experts"] = b64
        lines.append(orjson.dumps({
            "sample_id": f"prompt{group}-{member}",
            "group_id": f"prompt{group}",
            "policy_version": 1,
            "request": {"input_ids": prompt, "return_routed_experts": True,
                        "return_logprob": True,
                        "sampling_params": {"max_new_tokens": len(output), "temperature": 1.0}},
            "response": {"text": "", "output_ids": output, "meta_info": meta},
        }))
    OUT.write_bytes(b"\n".join(lines) + b"\n")
    print(f"wrote {len(lines)} lines to {OUT}")


if __name__ == "__main__":
    main()
