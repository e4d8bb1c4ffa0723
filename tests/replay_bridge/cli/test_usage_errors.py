"""Bad arguments and unusable directories: every command prints a message naming the problem
and exits 2, never a traceback, and writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import RoutedSample
from replay_bridge.shards import ShardWriter
from tests.replay_bridge.protocols.engines import routing, sglang_generate

TINY = RoutingGeometry.from_preset("tiny-qwen3-moe")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, size and mtime (what a write would change)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def usage_error(tmp_path: Path, *args: object, words: str) -> str:
    """Run the CLI; assert exit 2 with ``words`` in the message, no traceback, and nothing
    written under ``tmp_path``; return the text output. Also with ``--json``: one error
    object."""
    before = snapshot(tmp_path)
    text = ""
    for as_json in (False, True):
        argv = [str(a) for a in args] + (["--json"] if as_json else [])
        result = CliRunner().invoke(command_line(), argv)
        assert isinstance(result.exception, SystemExit), (argv, repr(result.exception),
                                                          result.output)
        assert result.exit_code == 2, (argv, result.output)
        assert "Traceback" not in result.output
        if as_json:
            doc = orjson.loads(result.stdout)
            assert doc["exit_code"] == 2 and words in doc["error"], doc
        else:
            text = " ".join(result.output.split())
            assert words in text, result.output
        assert snapshot(tmp_path) == before, f"{argv} wrote into {tmp_path}"
    return text


@pytest.fixture
def traffic(tmp_path: Path, rng) -> Path:
    req, body = sglang_generate([1, 2, 3], [4, 5], routing(rng, 4, TINY))
    path = tmp_path / "traffic.jsonl"
    path.write_bytes(orjson.dumps({"sample_id": "a", "request": req,
                                   "response": orjson.loads(body)}) + b"\n")
    return path


@pytest.fixture
def shard_dir(tmp_path: Path, rng) -> Path:
    d = tmp_path / "shards"
    with ShardWriter(d, TINY) as w:
        w.add(RoutedSample("a", rng.integers(0, 100, 6).astype("int32"), 3,
                           routed=routing(rng, 5, TINY).astype("uint8")))
    return d


def _config(tmp_path: Path, **values) -> Path:
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 8,
           "num_experts_per_tok": 2, **values}
    path = tmp_path / "model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(cfg))
    return path


# ---- ingest ---------------------------------------------------------------------------------


def _ingest(traffic, out, *extra, model="tiny-qwen3-moe"):
    return ("ingest", traffic, "--model", model, "--engine", "sglang", "--out", out, *extra)


def test_ingest_out_is_a_regular_file(tmp_path, traffic):
    out = tmp_path / "out"
    out.write_text("not a directory")
    usage_error(tmp_path, *_ingest(traffic, out), words=f"--out {out} is not a directory")
    usage_error(tmp_path, *_ingest(traffic, out / "sub"),
                words=f"--out {out / 'sub'}: {out} is not a directory")
    usage_error(tmp_path, *_ingest(traffic, out / "sub" / "deeper"),
                words=f"{out} is not a directory")


def test_ingest_unknown_compression(tmp_path, traffic):
    usage_error(tmp_path, *_ingest(traffic, tmp_path / "out", "--compression", "bogus"),
                words="--compression must be one of zstd, lz4, none, got 'bogus'")


def test_ingest_append_with_another_model(tmp_path, traffic, shard_dir):
    usage_error(tmp_path, *_ingest(traffic, shard_dir, "--append", model="qwen3-30b-a3b"),
                words=f"cannot add to {shard_dir} with --append: the shards in {shard_dir} "
                      "and --model differ: num_layers: 4 vs 48")


def _manifest(d: Path) -> Path:
    (path,) = (d / "_routing_replay" / "manifests").glob("*.json")
    return path


def test_ingest_append_to_an_unreadable_shard_directory(tmp_path, traffic, shard_dir):
    manifest = _manifest(shard_dir)
    manifest.write_text("{not json")
    usage_error(tmp_path, *_ingest(traffic, shard_dir, "--append"),
                words=f"{manifest.name}: not valid JSON")
    usage_error(tmp_path, *_ingest(traffic, shard_dir),
                words="exists and is not empty; pass --append to add to it")


@pytest.mark.timeout(60)
def test_ingest_input_that_is_not_a_readable_file(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    os.mkfifo(tmp_path / "fifo.jsonl")
    out = tmp_path / "out"
    usage_error(tmp_path, *_ingest(tmp_path / "dir.jsonl", out), words="is not a regular file")
    usage_error(tmp_path, *_ingest(tmp_path / "fifo.jsonl", out), words="is not a regular file")
    usage_error(tmp_path, *_ingest(tmp_path / "missing.jsonl", out), words="no such file")


@pytest.mark.parametrize("values, words", [
    ({"num_hidden_layers": 10**13}, "num_hidden_layers must be an integer of at most 65536"),
    ({"num_hidden_layers": "many"}, "num_hidden_layers must be an integer"),
    ({"num_experts_per_tok": 99}, "top_k must be an integer in [1, 8]"),
    ({"num_experts": [8]}, "num_experts must be an integer"),
    ({"mlp_only_layers": ["x"]}, "cannot read a routing geometry"),
])
def test_ingest_absurd_model_config(tmp_path, traffic, values, words):
    usage_error(tmp_path, *_ingest(traffic, tmp_path / "out", model=_config(tmp_path, **values)),
                words=words)


def test_ingest_model_that_cannot_be_read(tmp_path, traffic):
    (tmp_path / "m" / "config.json").mkdir(parents=True)
    usage_error(tmp_path, *_ingest(traffic, tmp_path / "out", model=tmp_path / "m"),
                words="cannot read")
    usage_error(tmp_path, *_ingest(traffic, tmp_path / "out", model="no-such-model"),
                words="is neither a model directory")
    usage_error(tmp_path, *_ingest(traffic, tmp_path / "out", "--engine", "tgi"),
                words="--engine must be one of")


# ---- collect --------------------------------------------------------------------------------


def _collect(tmp_path, out, *extra, model="tiny-qwen3-moe", prompts=None):
    if prompts is None:
        prompts = tmp_path / "p.jsonl"
        if not prompts.exists():
            prompts.write_text('{"prompt_id": "p0", "input_ids": [1, 2, 3]}\n')
    return ("collect", "--endpoint", "http://127.0.0.1:9", "--engine", "sglang", "--prompts",
            prompts, "--model", model, "--out", out, *extra)


def test_collect_usage_errors(tmp_path, shard_dir):
    pytest.importorskip("aiohttp")
    args = _collect(tmp_path, tmp_path / "out")  # writes p.jsonl before the snapshot
    (tmp_path / "file").write_text("x")
    usage_error(tmp_path, *_collect(tmp_path, tmp_path / "file"), words="is not a directory")
    usage_error(tmp_path, *args, "--compression", "bogus",
                words="compression must be one of")
    usage_error(tmp_path, *_collect(tmp_path, shard_dir, "--resume", model="qwen3-30b-a3b"),
                words="differ: num_layers: 4 vs 48")
    usage_error(tmp_path, *_collect(tmp_path, tmp_path / "out", prompts=tmp_path),
                words="is not a regular file")
    usage_error(tmp_path, *_collect(tmp_path, tmp_path / "out",
                                    model=_config(tmp_path, num_hidden_layers=10**13)),
                words="num_hidden_layers must be an integer of at most 65536")


# ---- validate and inspect -------------------------------------------------------------------


def _set_geometry(d: Path, **values) -> None:
    path = _manifest(d)
    doc = json.loads(path.read_text())
    doc["geometry"].update(values)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("values, words", [
    ({"num_layers": 10**13}, "bad geometry: num_layers must be an integer in [1, 65536], got "
                             "10000000000000"),
    ({"num_experts": 10**30}, "num_experts must be an integer in [1, 65536]"),
    ({"top_k": 2**11}, "top_k must be an integer in [1, 8]"),
    ({"moe_layers": "0123"}, "moe_layers must be a sequence of integers"),
    ({"moe_layers": [0, 1, 2, 3.0]}, "moe_layers must be integers"),
    ({"num_layers": "4"}, "num_layers must be an integer"),
])
@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_absurd_geometry_in_a_manifest(tmp_path, shard_dir, command, values, words):
    _set_geometry(shard_dir, **values)
    usage_error(tmp_path, command, shard_dir, words=words)


def test_not_a_shard_directory_with_markup_in_its_name(tmp_path):
    odd = tmp_path / "[bold]x[" / "]"  # the path reads ".../[bold]x[/]"
    odd.mkdir(parents=True)
    out = usage_error(tmp_path, "validate", odd, words="is not a routing-replay dataset")
    assert "[bold]x[/]" in out
    (tmp_path / "plain-file").write_text("x")
    usage_error(tmp_path, "inspect", tmp_path / "plain-file", words="is not a directory")


def test_markup_in_a_geometry_name_is_printed_as_is(tmp_path, shard_dir):
    _set_geometry(shard_dir, name="[/oops]")
    for command in ("validate", "inspect"):
        result = CliRunner().invoke(command_line(), [command, str(shard_dir)])
        assert result.exit_code == 0, result.output
        assert "[/oops]" in result.output


# ---- bench ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (("bench", "ingest", "--model", "no-such-model", "--repeats", "1", "--no-peer"),
     "is neither a model directory"),
    (("bench", "shards", "--model", "no-such-model", "--repeats", "1"),
     "unknown model preset 'no-such-model'"),
    (("bench", "shards", "--workdir", "{file}", "--tokens", "1000", "--repeats", "1"),
     "Not a directory"),
])
def test_bench_usage_errors(tmp_path, args, words):
    (tmp_path / "file").write_text("x")
    argv = [a.format(file=tmp_path / "file") for a in args]
    result = CliRunner().invoke(command_line(), argv)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert words in orjson.loads(result.stdout)["error"]
    assert "Traceback" not in result.output
