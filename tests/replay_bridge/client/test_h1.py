"""The buffered HTTP/1.1 reader: answers land in pooled buffers that are reused only when nothing
views them, so a recycled buffer never changes a sample decoded earlier; bodies of every
framing (length, chunked, until close), interim answers, refused codings."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from replay_bridge.client import (BaseTransport, HTTPTransport, Prompt, RetryPolicy,
                                  RolloutClient, SamplingParams, TransportError)
from replay_bridge.client._h1 import BufferPool, give_back
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.protocols import Completion, get_protocol
from reference_engine.loopback import synthetic_routing

from .conftest import running

ONCE = RetryPolicy(max_attempts=1, max_elapsed=0.0)


@asynccontextmanager
async def raw_server(answers: list[list[bytes]]) -> AsyncIterator[tuple[str, list[int]]]:
    """Answer the i-th request (on any connection) with the pieces ``answers[i]``, written one
    at a time with a pause between them, and close the connection after the last answer;
    yields the URL and the client ports seen, one per request."""
    ports: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while len(ports) < len(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                ports.append(writer.get_extra_info("peername")[1])
                for piece in answers[len(ports) - 1]:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)
            writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", ports
    finally:
        server.close()


def test_request_line_keeps_the_base_path_and_encodes_the_rest() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        await request.read()
        return web.Response(body=b"{}")

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        async with running(app) as url, HTTPTransport(url + "/api/é v1/", retry=ONCE) as t:
            assert await t.post("/generate", {}) == b"{}"
    asyncio.run(go())
    assert seen == ["/api/%C3%A9%20v1/generate"]


def test_chunked_body_read_in_small_pieces() -> None:
    body = b'{"a": "' + b"x" * 3000 + b'"}'
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 700]), body[i:i + 700])
                      for i in range(0, len(body), 700))
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nT: 1\r\n\r\n"
    pieces = [wire[i:i + 37] for i in range(0, len(wire), 37)]  # sizes and CRLFs cut apart

    async def go() -> None:
        async with raw_server([pieces]) as (url, _), HTTPTransport(url, retry=ONCE) as t:
            assert await t.post("/generate", {}) == body
    asyncio.run(go())


def test_interim_answer_skipped_and_keep_alive_reused() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"

    async def go() -> None:
        async with raw_server([[ok[:20], ok[20:]], [interim]]) as (url, ports), \
                HTTPTransport(url, retry=ONCE) as t:
            assert await t.post("/generate", {}) == b"first"
            assert await t.post("/generate", {}) == b"second"
            assert ports[0] == ports[1]  # one keep-alive connection
    asyncio.run(go())


@pytest.mark.parametrize("head, reused", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", True),
])
def test_connection_kept_only_when_the_answer_allows(head: bytes, reused: bool) -> None:
    async def go() -> None:
        async with raw_server([[head + b"ok"], [head + b"ok"]]) as (url, ports), \
                HTTPTransport(url, retry=ONCE) as t:
            assert await t.post("/generate", {}) == b"ok"
            assert await t.post("/generate", {}) == b"ok"
            assert (ports[0] == ports[1]) is reused
    asyncio.run(go())


def test_close_fails_an_exchange_in_flight() -> None:
    async def go() -> None:
        half = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart"
        async with raw_server([[half], [half]]) as (url, _):  # the server keeps it open
            t = HTTPTransport(url, retry=ONCE)
            pending = asyncio.ensure_future(t.post("/generate", {}))
            await asyncio.sleep(0.2)  # the answer is half read
            await t.close()
            with pytest.raises(TransportError, match="connection closed before the answer"):
                await pending
    asyncio.run(go())


def test_body_until_close_and_empty_204() -> None:
    async def go() -> None:
        async with raw_server([[b"HTTP/1.1 204 No Content\r\n\r\n"],
                               [b"HTTP/1.1 200 OK\r\n\r\nto the", b" end"]]) as (url, ports), \
                HTTPTransport(url, retry=ONCE) as t:
            assert await t.post("/generate", {}) == b""
            assert await t.post("/generate", {}) == b"to the end"
    asyncio.run(go())


@pytest.mark.parametrize("answer, match", [
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
     "gzip-encoded; identity was asked for"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short", "before the answer ended"),
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.1 answer"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
])
def test_unreadable_answers_are_retryable_errors(answer: bytes, match: str) -> None:
    async def go() -> None:
        async with raw_server([[answer]]) as (url, _), HTTPTransport(url, retry=ONCE) as t:
            with pytest.raises(TransportError, match=match) as ei:
                await t.post("/generate", {})
            assert ei.value.retryable
    asyncio.run(go())


def test_pool_reuses_only_buffers_nothing_views() -> None:
    pool = BufferPool()
    buf = pool.take()
    held = np.frombuffer(buf, np.uint8)[:4]  # an array still reading the buffer
    assert not pool.give(memoryview(buf)[10:20])
    assert pool.take() is not buf
    del held
    body = memoryview(buf)[10:20]
    assert pool.give(body)
    with pytest.raises(ValueError):
        bytes(body)  # a recycled body is released: reading it fails loudly
    assert pool.take() is buf


def test_pool_takes_back_only_its_own_buffers() -> None:
    pool, other = BufferPool(), BufferPool()
    foreign = bytearray(1 << 16)  # someone else's: they may write to it again
    assert not pool.give(foreign) and not give_back(memoryview(foreign))
    theirs = other.take()
    assert not pool.give(theirs)
    assert give_back(memoryview(theirs)[:5])  # to its own pool
    assert other.take() is theirs and pool.take() is not theirs


def test_pool_holds_at_most_its_byte_bound() -> None:
    pool = BufferPool(keep_bytes=3 * (1 << 20))
    bufs = [pool.new(1 << 20) for _ in range(5)]
    for b in bufs:
        assert pool.give(b)  # taken back, but only three are kept
    kept = [pool.take() for _ in range(4)]
    assert sum(any(k is b for b in bufs) for k in kept) == 3


class Delegating(BaseTransport):
    """A transport that sends through an inner HTTP transport (as a round-robin one does)."""

    def __init__(self, inner: HTTPTransport) -> None:
        super().__init__()
        self.inner = inner

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def send_once(self, path: str, payload: Any) -> bytes | memoryview:
        return await self.inner.send_once(path, payload)


@pytest.mark.parametrize("delegated", [False, True])
def test_recycled_buffer_never_changes_an_earlier_sample(tiny: RoutingGeometry,
                                                          delegated: bool) -> None:
    """Two answers read through one connection and one pooled buffer: the first sample,
    decoded and kept, must be unchanged after its buffer held the second answer. A transport
    that delegates to an HTTP one gets its buffers back to that one's pool too."""
    sglang = get_protocol("sglang")

    async def handler(request: web.Request) -> web.Response:
        payload = await request.json()
        out = np.arange(4, dtype=np.int32) + 7
        tokens = np.concatenate([np.asarray(payload["input_ids"]), out])
        answer = sglang.encode_response(payload, [Completion(out, synthetic_routing(tokens,
                                                                                    tiny))])
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/generate", handler)

    async def go() -> None:
        async with running(app) as url, RolloutClient(
                url, "sglang", tiny, params=SamplingParams(max_new_tokens=4), concurrency=1,
                transport=Delegating(HTTPTransport(url)) if delegated else None) as client:
            first = await client.fetch(Prompt("p0", list(range(1, 40))))
            buf = first[0].body.obj  # type: ignore[union-attr]
            (r0,) = client.finish(first)
            assert r0.sample is not None
            kept = r0.sample.routed.copy()
            client.recycle(first)
            second = await client.fetch(Prompt("p1", list(range(2, 41))))
            assert second[0].body.obj is buf  # type: ignore[union-attr]  # the same buffer
            (r1,) = client.finish(second)
            client.recycle(second)
            assert r1.sample is not None
            assert not np.array_equal(r1.sample.routed, kept)
            np.testing.assert_array_equal(r0.sample.routed, kept)
            for r in (r0, r1):
                assert not np.may_share_memory(r.sample.routed, np.frombuffer(buf, np.uint8))
    asyncio.run(go())


def test_https_answer_read_through_the_buffer(tmp_path: Path) -> None:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    body = bytes(range(256)) * 1200

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body)

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/generate", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert_file, key_file)
        site = web.TCPSite(runner, "localhost", 0, ssl_context=server_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with HTTPTransport(f"https://localhost:{port}", retry=ONCE) as t:
                assert t._h1 is not None and t._h1._ssl is not None
                t._h1._ssl.load_verify_locations(cert_file)  # trust the test's own certificate
                for _ in range(2):
                    got = await t.post_view("/generate", {})
                    assert isinstance(got, memoryview) and got == body
                    t.recycle(got)
        finally:
            await runner.cleanup()
    asyncio.run(go())
