"""Secrets never leave the client: the API key and the endpoint's ``user:password@`` are
redacted from every error, repr, log line, quarantine record and CLI output, even when the
engine echoes the request's headers back in its error body."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from aiohttp import web
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.client import (HTTPError, HTTPTransport, MockTransport, Prompt, RetryPolicy,
                                  RolloutClient, SamplingParams, TransportError, collect,
                                  redact)
from replay_bridge.client._http import SNIPPET_CHARS
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader, ShardWriter

from .conftest import running
from .test_transport import answer

KEY = "sk-live-7Hq2ZpX9vRt4"
USER, PASSWORD = "alice", "pa55:w0rd@Qz"
USERINFO = f"{USER}:{PASSWORD}"
FAST = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.01, max_elapsed=0.0)


def forms(secret: str) -> list[str]:
    """How a secret may show up: as is, URL-encoded, base64."""
    b64 = base64.b64encode(secret.encode()).decode()
    return [secret, quote(secret, safe=""), b64, b64.rstrip("=")]


SECRETS = [*forms(KEY), *forms(PASSWORD), *forms(USERINFO), f"{USER}:{quote(PASSWORD, safe='')}"]


def leaks(text: str | bytes) -> list[str]:
    """The secret forms found in ``text``."""
    if isinstance(text, bytes):
        return [s for s in SECRETS if s.encode() in text]
    return [s for s in SECRETS if s in text]


def echo_app(geometry: RoutingGeometry, seen: list[dict[str, str]]) -> web.Application:
    """An engine that answers prompt [1, ...] properly and echoes the request (headers first,
    then URL and body) into a 500 for [2, ...] and a 401 for [3, ...]."""

    async def generate(request: web.Request) -> web.Response:
        body = await request.read()
        payload = orjson.loads(body)
        headers = dict(request.headers)
        seen.append(headers)
        first = payload["input_ids"][0]
        if first == 1:
            return web.Response(body=orjson.dumps(answer("sglang", geometry, payload)),
                                content_type="application/json")
        echo = f"headers={headers} url={request.url} body={body.decode()}"
        return web.Response(status=500 if first == 2 else 401, text=echo)

    app = web.Application()
    app.router.add_post("/generate", generate)
    return app


def with_userinfo(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{quote(PASSWORD, safe='')}@")


# ---- the one rule ---------------------------------------------------------------------------


def test_redact_removes_every_form_of_a_known_secret() -> None:
    text = " | ".join([f"key {f}" for f in forms(KEY)] + [json.dumps({"k": KEY})])
    out = redact(text, [KEY])
    assert KEY not in out and not leaks(out)
    assert out.count("***") == 5
    assert redact("nothing to hide: 12 tokens, layer 3", [KEY]) == \
        "nothing to hide: 12 tokens, layer 3"


@pytest.mark.parametrize("text, expected", [
    ("POST http://bob:hunter2@10.0.0.1:8000/generate failed",
     "POST http://***@10.0.0.1:8000/generate failed"),
    ("https://tok3n@host/v1", "https://***@host/v1"),
    ("Authorization: Bearer abcdef123456\r\nHost: x", "Authorization: ***\r\nHost: x"),
    ('{"authorization": "Basic Ym9iOmh1bnRlcjI="}', '{"authorization": "***"}'),
    ("sent Bearer abcdef123456 upstream", "sent Bearer *** upstream"),
    ("GET /v1?api_key=abc123&n=2", "GET /v1?api_key=***&n=2"),
    ("x-api-key: zzz999 ok", "x-api-key: *** ok"),
])
def test_redact_recognises_credentials_without_knowing_them(text: str, expected: str) -> None:
    assert redact(text) == expected


# ---- the HTTP transport ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt_first, status", [(2, 500), (3, 401)])
def test_echoed_headers_and_userinfo_never_reach_the_error(
        prompt_first: int, status: int, tiny: RoutingGeometry, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("REPLAY_BRIDGE_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    seen: list[dict[str, str]] = []

    async def go() -> HTTPError:
        async with running(echo_app(tiny, seen)) as url, \
                HTTPTransport(with_userinfo(url), retry=FAST) as t:
            assert not leaks(repr(t)) and "***@" in repr(t)
            with pytest.raises(HTTPError) as ei:
                await t.post("/generate", {"input_ids": [prompt_first, 5]})
            return ei.value

    e = asyncio.run(go())
    assert seen[0]["Authorization"] == f"Bearer {KEY}"  # the engine did get the key ...
    assert e.status == status and f"HTTP {status}" in str(e)
    for text in (str(e), repr(e), e.snippet, caplog.text):
        assert not leaks(text), text  # ... and no message carries it, nor the password
    assert "Authorization" in e.snippet and "***" in e.snippet  # still a useful snippet
    assert "User-Agent" in e.snippet or len(e.snippet) > SNIPPET_CHARS
    if status == 500:
        assert "retrying" in caplog.text


def test_userinfo_is_sent_as_basic_auth_and_never_shown(tiny: RoutingGeometry,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLAY_BRIDGE_API_KEY", raising=False)
    seen: list[dict[str, str]] = []

    async def go() -> tuple[bytes, HTTPError]:
        async with running(echo_app(tiny, seen)) as url, \
                HTTPTransport(with_userinfo(url), retry=FAST) as t:
            good = await t.post("/generate", {"input_ids": [1, 5], "sampling_params": {}})
            with pytest.raises(HTTPError) as ei:
                await t.post("/generate", {"input_ids": [3, 5]})
            return good, ei.value

    good, e = asyncio.run(go())
    assert b"meta_info" in good
    basic = base64.b64encode(USERINFO.encode()).decode()
    assert seen[0]["Authorization"] == f"Basic {basic}"
    assert not leaks(str(e)) and not leaks(e.snippet)


def test_a_secret_across_the_snippet_cut_leaves_no_prefix() -> None:
    """The body is redacted before it is cut, so no head of the key survives at the end."""
    body = b"x" * (SNIPPET_CHARS - 5) + KEY.encode() + b"y" * 100

    async def go() -> TransportError:
        def handler(path: str, payload: Any) -> bytes:
            raise HTTPError(401, "mock://e" + path, body, redact=lambda s: redact(s, [KEY]))

        with pytest.raises(TransportError) as ei:
            await MockTransport(handler).post("/generate", {})
        return ei.value

    e = asyncio.run(go())
    assert KEY[:5] not in str(e) and str(e).endswith("...")


# ---- through the client and collect ---------------------------------------------------------


def test_unexpected_transport_errors_are_failed_samples_without_secrets(
        tiny: RoutingGeometry, tmp_path: Path) -> None:
    """A handler that raises anything (not a TransportError) fails its sample only; the
    message that reaches the quarantine is redacted."""

    def handler(path: str, payload: dict[str, Any]) -> Any:
        first = payload["input_ids"][0]
        if first == 2:
            raise HTTPError(500, f"http://{USERINFO}@mock{path}",
                            f"Authorization: Bearer {KEY}".encode())
        if first == 3:
            raise KeyError(f"no route for token {KEY}")
        return answer("sglang", tiny, payload)

    prompts = [Prompt(f"s{i}", [first, 7, 8]) for i, first in enumerate([1, 2, 3, 1])]

    async def go() -> Any:
        with ShardWriter(tmp_path / "o", tiny) as writer:
            async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(3),
                                     transport=MockTransport(handler, secrets=[KEY])) as c:
                return await collect(c, prompts, writer, keep_verdicts=True)

    summary = asyncio.run(go())
    assert (summary.stored, summary.failed) == (2, 2)
    by_id = {v["sample_id"]: v for v in summary.verdicts}
    assert by_id["s1"]["outcome"] == "failed" and "HTTP 500" in by_id["s1"]["message"]
    assert by_id["s2"]["outcome"] == "failed" and "KeyError" in by_id["s2"]["message"]
    assert not leaks(json.dumps(summary.verdicts))
    for f in (tmp_path / "o").rglob("*"):
        if f.is_file():
            assert not leaks(f.read_bytes()), f
    with ShardReader(tmp_path / "o") as reader:
        assert sorted(reader.sample_ids()) == ["s0", "s3"]


@contextlib.contextmanager
def serve_in_thread(app: web.Application) -> Iterator[str]:
    """Serve ``app`` on a loopback port from a thread of its own (the CLI runs its own loop)."""
    loop = asyncio.new_event_loop()
    ready: list[str] = []
    stop = asyncio.Event()

    async def main() -> None:
        async with running(app) as url:
            ready.append(url)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        while not ready:
            if not thread.is_alive():
                raise RuntimeError("the echo engine did not start")
            threading.Event().wait(0.01)
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("with_key", [True, False], ids=["api-key", "basic-auth"])
def test_cli_collect_leaks_no_secret_anywhere(with_key: bool, tiny: RoutingGeometry,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """collect against an engine that echoes the request into its 500 and 401 bodies: stdout,
    stderr, the log and every file of the output directory are searched for the key, the
    password and the userinfo (raw, URL-encoded, base64)."""
    if with_key:
        monkeypatch.setenv("REPLAY_BRIDGE_API_KEY", KEY)
    else:
        monkeypatch.delenv("REPLAY_BRIDGE_API_KEY", raising=False)
    caplog.set_level(logging.DEBUG)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "input_ids": [first, 4, 5]})
                               + "\n" for i, first in enumerate([1, 2, 3, 1])))
    out = tmp_path / "o"
    seen: list[dict[str, str]] = []
    with serve_in_thread(echo_app(tiny, seen)) as url:
        for as_json in (True, False):
            target = out if as_json else tmp_path / "o-text"
            args = ["collect", "--endpoint", with_userinfo(url), "--engine", "sglang",
                    "--prompts", str(prompts), "--model", "tiny-qwen3-moe", "--out",
                    str(target), "--max-new-tokens", "3", "--retries", "1",
                    "--retry-seconds", "0", "--max-retry-delay", "0.01"]
            result = CliRunner().invoke(command_line(), args + (["--json"] if as_json else []))
            assert result.exit_code == 1, (result.stdout, result.stderr)
            assert not leaks(result.stdout) and not leaks(result.stderr)
            for f in target.rglob("*"):
                if f.is_file():
                    assert not leaks(f.read_bytes()), (f, f.read_bytes()[:400])
            if as_json:
                doc = json.loads(result.stdout)
                assert (doc["totals"]["stored"], doc["totals"]["failed"]) == (2, 2)
                assert doc["endpoint"] == with_userinfo(url).replace(
                    f"{USER}:{quote(PASSWORD, safe='')}", "***")
                by_id = {s["sample_id"]: s for s in doc["samples"]}
                assert "HTTP 500" in by_id["p1"]["message"]
                assert "HTTP 401" in by_id["p2"]["message"]
            else:
                assert "HTTP 401" in result.stderr or "failed" in result.stderr
    assert not leaks(caplog.text)
    auth = {h.get("Authorization") for h in seen}
    assert auth == ({f"Bearer {KEY}"} if with_key else
                    {f"Basic {base64.b64encode(USERINFO.encode()).decode()}"})
