"""``replay-bridge collect``: JSON, exit codes, resume, text prompts, usage errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.shards import Manifest
from tests.support.processes import free_port, loopback_responder

runner = CliRunner()


@pytest.fixture(scope="module")
def responder() -> Iterator[str]:
    """The light responder (SGLang /generate, tiny geometry) in its own process."""
    with loopback_responder("sglang") as url:
        yield url


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "input_ids": [1, 2, 3 + i]}) + "\n"
                            for i in range(n)))
    return path


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(command_line(), list(args))
    return result.exit_code, result.stdout


def test_json_totals_and_verdicts(responder: str, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    code, out = run("collect", "--endpoint", responder, "--engine", "sglang", "--prompts",
                    str(prompts), "--model", "tiny-qwen3-moe", "--out", str(tmp_path / "o"),
                    "-G", "2", "--max-new-tokens", "5", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["totals"]["samples"] == doc["totals"]["stored"] == 12
    assert doc["totals"]["tokens"] == 6 * 2 * (3 + 5)
    assert doc["check"]["regions"]["completion"]["tokens"] == 12 * 5 - 12  # last token: no row
    assert doc["samples"][0].keys() >= {"sample_id", "stored", "kinds"}
    assert sorted(s["sample_id"] for s in doc["samples"]) == sorted(
        f"p{i}/{j}" for i in range(6) for j in range(2))
    assert doc["shards"]["stored"] == 12

    # Resume: everything is stored, nothing is asked for again.
    code, out = run("collect", "--endpoint", responder, "--engine", "sglang", "--prompts",
                    str(prompts), "--model", "tiny-qwen3-moe", "--out", str(tmp_path / "o"),
                    "-G", "2", "--resume", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["totals"]["prompts_skipped"] == 6 and doc["totals"]["samples"] == 0


def test_rejections_exit_1_with_table(responder: str, tmp_path: Path) -> None:
    # The responder routes 4 layers x top-2; a 48 x 8 geometry rejects every sample.
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    code, out = run("collect", "--endpoint", responder, "--engine", "sglang", "--prompts",
                    str(prompts), "--model", "qwen3-30b-a3b", "--out", str(tmp_path / "o"),
                    "--max-new-tokens", "3", "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["totals"]["rejected"] == 3
    assert all(s["kinds"] == ["malformed"] and not s["stored"] for s in doc["samples"])
    result = runner.invoke(command_line(), ["collect", "--endpoint", responder, "--engine", "sglang",
                                 "--prompts", str(prompts), "--model", "qwen3-30b-a3b",
                                 "--out", str(tmp_path / "o2"), "--max-new-tokens", "3"])
    assert result.exit_code == 1
    assert "rejected samples" in result.stderr and "routing checks" in result.stderr


def test_unreachable_engine_fails_samples(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    code, out = run("collect", "--endpoint", f"http://127.0.0.1:{free_port()}", "--engine",
                    "vllm", "--prompts", str(prompts), "--model", "tiny-qwen3-moe", "--out",
                    str(tmp_path / "o"), "--retries", "1", "--retry-seconds", "0",
                    "--max-retry-delay", "0.01", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["totals"]["failed"] == 2
    assert all(s["outcome"] == "failed" and "gave up after 2 attempts" in s["message"]
               for s in doc["samples"])
    assert Manifest.read(tmp_path / "o").outcomes["failed"] == 2


def test_retry_seconds_keeps_retrying_past_the_retry_count(tmp_path: Path) -> None:
    """--retries 0 with --retry-seconds: a refused connection (answered at once) is tried
    again until the time budget is spent, not once."""
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    code, out = run("collect", "--endpoint", f"http://127.0.0.1:{free_port()}", "--engine",
                    "sglang", "--prompts", str(prompts), "--model", "tiny-qwen3-moe", "--out",
                    str(tmp_path / "o"), "--retries", "0", "--retry-seconds", "0.3",
                    "--max-retry-delay", "0.01", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["totals"]["failed"] == 1 and doc["totals"]["retries"] >= 1
    (sample,) = doc["samples"]
    attempts = int(sample["message"].split("gave up after ")[1].split(" attempts")[0])
    assert attempts == doc["totals"]["retries"] + 1 >= 2


@pytest.mark.parametrize("case", ["not-empty", "bad-line", "bad-engine", "no-text-tokenizer"])
def test_usage_errors_exit_2(case: str, responder: str, tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "o"
    engine = "sglang"
    if case == "not-empty":
        out.mkdir()
        (out / "something").write_text("x")
    elif case == "bad-line":
        with open(prompts, "a") as f:
            f.write('{"prompt_id": "p9", "input_ids": [1, -3]}\n')
    elif case == "bad-engine":
        engine = "tgi"
    else:
        prompts.write_text('{"prompt_id": "t", "text": "hello"}\n')
    code, text = run("collect", "--endpoint", responder, "--engine", engine, "--prompts",
                     str(prompts), "--model", "tiny-qwen3-moe", "--out", str(out), "--json")
    assert code == 2
    message = json.loads(text)["error"]
    expected = {"not-empty": "pass --resume", "bad-line": "p.jsonl:3: input_ids must hold",
                "bad-engine": "--engine must be one of",
                "no-text-tokenizer": "needs the model's tokenizer"}[case]
    assert expected in message


def test_text_prompts_use_the_model_tokenizer(responder: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from reference_engine import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_id": "t0", "text": "the quick brown fox"}\n')
    code, out = run("collect", "--endpoint", responder, "--engine", "sglang", "--prompts",
                    str(prompts), "--model", str(model), "--out", str(tmp_path / "o"),
                    "--max-new-tokens", "2", "--json")
    assert code == 0, out
    from replay_bridge.shards import ShardReader

    sample = ShardReader(tmp_path / "o")["t0"]
    want = AutoTokenizer.from_pretrained(str(model))("the quick brown fox")["input_ids"]
    assert sample.tokens[: sample.prompt_len].tolist() == want


def test_prompt_file_forms(tmp_path: Path) -> None:
    from replay_bridge.client import PromptError, read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_id": 1, "input_ids": [4, 5]}\n\n'
                    '{"prompt_id": "c", "messages": [{"role": "user", "content": "hi"}]}\n')
    a, b = read_prompts(path)
    assert (a.prompt_id, list(a.input_ids), a.messages) == ("1", [4, 5], None)
    assert b.messages == [{"role": "user", "content": "hi"}] and not b.input_ids
    assert a.policy_version is None
    path.write_text('{"prompt_id": "v", "input_ids": [1], "policy_version": 7}\n')
    assert [p.policy_version for p in read_prompts(path)] == [7]
    for bad, rule in [('{"prompt_id": "a/b", "input_ids": [1]}', "must not contain '/'"),
                      ('{"input_ids": [1]}', "needs a prompt_id"),
                      ('{"prompt_id": "x"}', "needs input_ids, text or messages"),
                      ('{"prompt_id": "x", "messages": []}', "messages must be"),
                      ('[1, 2]', "expected a JSON object"),
                      ('{"prompt_id": "1", "input_ids": [1]}\n{"prompt_id": 1, "input_ids": [2]}',
                       ":2: prompt_id '1' repeats"),
                      ('{"prompt_id": "v", "input_ids": [1], "policy_version": true}',
                       ":1: policy_version must be an integer, got True"),
                      ('{"prompt_id": "v", "input_ids": [1], "policy_version": 1.5}',
                       "policy_version must be an integer"),
                      ('{"prompt_id": "v", "messages": [{"role": "user"}], '
                       '"policy_version": "3"}', "policy_version must be an integer")]:
        path.write_text(bad + "\n")
        with pytest.raises(PromptError, match=rule):
            list(read_prompts(path))


def test_chat_prompts_need_an_openai_engine(responder: str, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_id": "c", "messages": [{"role": "user", "content": "hi"}]}\n')
    code, out = run("collect", "--endpoint", responder, "--engine", "sglang", "--prompts",
                    str(prompts), "--model", "tiny-qwen3-moe", "--out", str(tmp_path / "o"),
                    "--json")
    assert code == 2 and "need --engine sglang-openai or vllm" in json.loads(out)["error"]
