"""Property: in a dump of structurally valid engine traffic, corrupting one field of one line
(its type, its value, its length or its encoding) never raises, gives the corrupted sample(s) a
verdict that is not ``stored``, and stores every other sample of the file exactly.

Lines come from the protocols' own encoders (``sglang``, ``vllm``) and from two hand-built
paths (SGLang's OpenAI answer with ``sglext``, and vLLM's older JSON-list routing), each with
``group_id`` and ``policy_version``. A mutation is a *site* (where), a value (what goes there)
and a decision taken here, per site, of what the bridge must make of it:

- ``bad``: the corrupted sample(s) are not stored; every verdict that is not ``stored`` names
  them, the line's own id, its stray choices or the line (``line-<N>``); the run reads on.
- ``harmless``: an unknown extra key, or an encoding that changes bytes but not the JSON
  (spaces, ``\\/`` for ``/``, the routing key spelled with a ``\\u`` escape): every sample is
  stored exactly.

Value changes that keep a valid type and shape (a different expert id in range, another
finish reason string) are not corruptions the bridge can see, and are not generated.
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from replay_bridge.cli import command_line
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.ingest import ingest
from replay_bridge.shards import ShardReader
from tests.replay_bridge.protocols.engines import routing, sglang_generate, vllm_completion

GEOMETRIES = [RoutingGeometry.from_preset("tiny-qwen3-moe"),
              RoutingGeometry(6, (2, 3, 4, 5), 4, 64)]

Path_ = tuple[Any, ...]


@dataclass
class Site:
    """Where a line can be corrupted and with what: ``op`` is ``set`` (replace the value at
    ``path`` by one of ``values``, each a value or a function of the old one), ``add`` (a new
    key ``path[-1]``), ``del`` or ``bytes`` (``values`` transform the serialized line)."""

    op: str
    path: Path_
    values: list[Any]
    harmless: bool = False
    affected: tuple[str, ...] | None = None
    """The samples the corruption hits (``None``: every sample of the line)."""


@dataclass
class Line:
    engine: str
    obj: dict[str, Any]
    samples: dict[str, tuple[list[int], int, np.ndarray]]
    """sample id -> (tokens, routed_start, routing of the MoE layers)."""
    sites: list[Site] = field(default_factory=list)


# ---- corrupt values -----------------------------------------------------------------------

def _elem(i: int, value: Any) -> Callable[[list], list]:
    def put(old: list) -> list:
        new = list(old)
        new[i] = value(new[i]) if callable(value) else value
        return new
    return put


def _token_list_sites(path: Path_, affected: tuple[str, ...] | None) -> list[Site]:
    """Token ids: wrong element types, out of range, one too few or many, wrong list type."""
    last = -1
    values: list[Any] = [_elem(last, lambda t: t + 0.5), _elem(last, True), _elem(last, None),
                         _elem(last, -1), _elem(last, 2**40), _elem(last, lambda t: float(t)),
                         lambda old: old[:-1], lambda old: old + [5], "4 5", {"0": 4}, 3,
                         [[4]]]
    return [Site("set", path, values, affected=affected)]


def _b64_sites(path: Path_, affected: tuple[str, ...] | None, *, npy: bool) -> list[Site]:
    bad_npy = io.BytesIO()
    np.save(bad_npy, np.zeros((2, 2), np.float32))
    values: list[Any] = [
        None, 5, True, {}, [1.5], "", "!!!!",
        lambda old: old[:len(old) // 2] + "!" + old[len(old) // 2 + 1:],  # not base64
        lambda old: old[:-4],  # three bytes short
        lambda old: old + "AAAA",  # three bytes over
    ]
    if npy:
        values += [pybase64.b64encode(bad_npy.getvalue()).decode(),
                   lambda old: pybase64.b64encode(
                       b"\x93NUMPX" + pybase64.b64decode(old)[6:]).decode()]
    return [Site("set", path, values, affected=affected), Site("del", path, [None],
                                                                affected=affected)]


def _logprob_sites(path: Path_, affected: tuple[str, ...] | None, *, triples: bool) -> list[Site]:
    junk_item: list[Any] = ["x", True, [1], {"logprob": "x"}]
    if triples:
        junk_item = [3, {"logprob": -1.0}, [], ["x", 4, None], [True, 4, None]]
    return [Site("set", path, [3, {"a": 1}, "x", True, lambda old: old + old[:1] * 2]
                 + [_elem(0, j) for j in junk_item], affected=affected)]


def _envelope_sites(line: Line) -> list[Site]:
    return [
        Site("set", ("sample_id",), [1, 1.5, True, None, "", ["l"], {"a": 1}]),
        Site("set", ("group_id",), [1, True, 1.5, ["g"], {"g": 1}]),
        Site("set", ("policy_version",), [True, 1.5, "7", [7], 2**63, -(2**63) - 1]),
        Site("set", ("request",), [None, [], "x", 1]),
        Site("set", ("response",), [None, [], "x", 1, {}]),
        Site("del", ("request",), [None]),
        Site("del", ("response",), [None]),
        Site("add", ("zz_unknown",), [1, {"a": [1]}], harmless=True),
        Site("bytes", (), [_spaced, _escaped_slash, _escaped_key], harmless=True),
        Site("bytes", (), [lambda b: b[:len(b) // 2], lambda b: b + b" x",
                           lambda b: b.replace(b'"sample_id":"', b'"sample_id":"\xff', 1),
                           lambda b: b.replace(b'"policy_version":7', b'"policy_version":NaN')]),
    ]


def _spaced(raw: bytes) -> bytes:
    return json.dumps(json.loads(raw), separators=(", ", ": "), ensure_ascii=False).encode()


def _escaped_slash(raw: bytes) -> bytes:
    return raw.replace(b"/", b"\\/")


def _escaped_key(raw: bytes) -> bytes:
    return raw.replace(b'"routed_experts"', b'"routed\\u005fexperts"')


def _start_values(prompt_len: int, start: int) -> list[Any]:
    other = start + 1 if start < prompt_len else start - 1
    return [1.5, "0", True, [0], -1, prompt_len + 1, other, float(start)]


# ---- lines --------------------------------------------------------------------------------

def _start(rng: np.random.Generator, prompt_len: int, shortest_out: int) -> int:
    """A start offset that leaves at least one routing row (so a byte-level corruption of the
    routing always changes what it decodes to)."""
    return int(rng.integers(0, min(prompt_len, prompt_len + shortest_out - 2) + 1))


def _moe(r: np.ndarray, g: RoutingGeometry) -> np.ndarray:
    return r[:, list(g.moe_layers), :]


def _sglang_line(sid: str, rng: np.random.Generator, g: RoutingGeometry) -> Line:
    prompt = rng.integers(0, 1000, int(rng.integers(1, 7))).tolist()
    out = rng.integers(0, 1000, int(rng.integers(1, 5))).tolist()
    start = _start(rng, len(prompt), len(out))
    r = routing(rng, len(prompt) + len(out) - 1 - start, g)
    req, body = sglang_generate(prompt, out, r, start=start)
    line = Line("sglang", _envelope(sid, req, body), {sid: (prompt + out, start, _moe(r, g))})
    q, m = ("request",), ("response", "meta_info")
    line.sites = _envelope_sites(line) + _token_list_sites(q + ("input_ids",), None) + \
        _token_list_sites(("response", "output_ids"), None) + \
        _b64_sites(m + ("routed_experts",), None, npy=False) + \
        _logprob_sites(m + ("output_token_logprobs",), None, triples=True) + [
        Site("set", q + ("routed_experts_start_len",), _start_values(len(prompt), start)),
        Site("add", q + ("sampling_params", "n"), ["2", 1.5, True, 0, 2, -1]),
        Site("add", q + ("zz",), [1], harmless=True),
        Site("set", ("response", "output_ids"), [None]),
        Site("set", m, [None, [], [1], "x", 3, True]),
        Site("add", m + ("routed_experts_dtype",),
             [5, ["int32"], "float32", "bogus", "uint8", "int16", "int64", True, ""]),
        Site("set", m + ("finish_reason",), [3, [1], {"type": 3}, True, 1.5]),
        Site("add", m + ("weight_version",), [["v"], {"v": 1}, True, 1.5]),
        Site("add", m + ("weight_versions",),
             ["v", 3, ["v"], [{"version": "v", "start": "0", "end": 1}],
              [{"version": "v", "start": 0, "end": 10**6}],
              [{"version": True, "start": 0, "end": 1}]]),
        Site("add", m + ("zz",), [[1, 2]], harmless=True),
        Site("set", ("response",), [lambda old: [old]]),
    ]
    return line


def _vllm_line(sid: str, rng: np.random.Generator, g: RoutingGeometry) -> Line:
    n = int(rng.integers(1, 3))
    prompt = rng.integers(0, 1000, int(rng.integers(1, 7))).tolist()
    outs = [rng.integers(0, 1000, int(rng.integers(1, 5))).tolist() for _ in range(n)]
    start = _start(rng, len(prompt), min(len(o) for o in outs))
    rs = [routing(rng, len(prompt) + len(o) - 1 - start, g) for o in outs]
    req, body = vllm_completion(prompt, outs, rs, str(g.id_dtype), start=start)
    ids = [f"{sid}/{i}" for i in range(n)] if n > 1 else [sid]
    line = Line("vllm", _envelope(sid, req, body),
                {i: (prompt + o, start, _moe(r, g)) for i, o, r in zip(ids, outs, rs)})
    q = ("request",)
    line.sites = _envelope_sites(line) + [
        Site("set", q + ("n",), ["2", 1.5, True, 0, -1, 10**9]),
        Site("set", q + ("prompt",), [_elem(-1, lambda t: t + 0.5), _elem(-1, True),
                                      _elem(-1, None), _elem(-1, -1), _elem(-1, 2**40),
                                      lambda old: old[:-1] or [None], lambda old: old + [5]]),
        Site("set", q + ("routed_experts_prompt_start",), _start_values(len(prompt), start)),
        Site("set", ("response", "choices"), [None, {}, "x", 1, []]),
        Site("add", ("response", "zz"), [{}], harmless=True),
    ]
    for i, sample in enumerate(ids):
        c = ("response", "choices", i)
        one = (sample,)
        line.sites += [
            Site("set", c, [None, 3, "x", []], affected=one),
            Site("set", c + ("index",), ["0", 1.5, True, -1, n], affected=one),
            Site("set", c + ("finish_reason",), [3, [1], {"type": 3}, True], affected=one),
            Site("set", c + ("logprobs",), [[-0.5], 5, "x", True], affected=one),
            Site("set", c + ("token_ids",), [None], affected=one),
            Site("add", c + ("zz",), [None], harmless=True),
            Site("drop", c, [None], affected=one),
        ] + _token_list_sites(c + ("token_ids",), one) + \
            _b64_sites(c + ("routed_experts",), one, npy=True) + \
            _logprob_sites(c + ("logprobs", "token_logprobs"), one, triples=False)
    return line


def _openai_line(sid: str, rng: np.random.Generator, g: RoutingGeometry) -> Line:
    """SGLang's OpenAI answer, built by hand: raw little-endian int32 ids, base64, in
    ``sglext``."""
    prompt = rng.integers(0, 1000, int(rng.integers(1, 7))).tolist()
    out = rng.integers(0, 1000, int(rng.integers(1, 5))).tolist()
    start = _start(rng, len(prompt), len(out))
    r = routing(rng, len(prompt) + len(out) - 1 - start, g)
    req = {"prompt": prompt, "n": 1, "max_tokens": len(out), "return_routed_experts": True,
           "routed_experts_start_len": start}
    body = {"id": "x", "object": "text_completion",
            "choices": [{"index": 0, "text": "", "token_ids": out, "finish_reason": "stop",
                         "logprobs": {"token_logprobs": [-0.125] * len(out)}}],
            "sglext": {"routed_experts": pybase64.b64encode(r.astype("<i4").tobytes()).decode()}}
    line = Line("sglang-openai", _envelope(sid, req, orjson.dumps(body)),
                {sid: (prompt + out, start, _moe(r, g))})
    q, c, x = ("request",), ("response", "choices", 0), ("response", "sglext")
    line.sites = _envelope_sites(line) + _token_list_sites(q + ("prompt",), None) + \
        _token_list_sites(c + ("token_ids",), None) + \
        _b64_sites(x + ("routed_experts",), None, npy=False) + \
        _logprob_sites(c + ("logprobs", "token_logprobs"), None, triples=False) + [
        Site("set", q + ("n",), ["2", 1.5, True, 0, -1]),
        Site("set", q + ("routed_experts_start_len",), _start_values(len(prompt), start)),
        Site("set", x, [None, [1], "x", 5]),
        Site("add", x + ("routed_experts_dtype",), [5, "float32", "uint8", True]),
        Site("add", c + ("meta_info",), [[3], "x", 5]),
        Site("set", c, [None, 3, "x"]),
        Site("set", c + ("index",), ["0", 1.5, True, -1, 1]),
        Site("set", c + ("finish_reason",), [3, [1], {"type": 3}]),
        Site("set", ("response", "choices"), [None, {}, []]),
        Site("add", c + ("zz",), [1], harmless=True),
    ]
    return line


def _legacy_line(sid: str, rng: np.random.Generator, g: RoutingGeometry) -> Line:
    """vLLM's older form, built by hand: prompt rows at response level, generated rows per
    choice, both as JSON lists."""
    n = int(rng.integers(1, 3))
    prompt = rng.integers(0, 1000, int(rng.integers(1, 7))).tolist()
    start = int(rng.integers(0, len(prompt)))  # at least one prompt row
    outs = [rng.integers(0, 1000, int(rng.integers(1, 5))).tolist() for _ in range(n)]
    prompt_rows = routing(rng, len(prompt) - start, g)
    gens = [routing(rng, len(o) - 1, g) for o in outs]
    req = {"prompt": prompt, "n": n, "routed_experts_prompt_start": start}
    body = {"prompt_routed_experts": prompt_rows.tolist(),
            "choices": [{"index": i, "token_ids": o, "routed_experts": r.tolist()}
                        for i, (o, r) in enumerate(zip(outs, gens))]}
    ids = [f"{sid}/{i}" for i in range(n)] if n > 1 else [sid]
    line = Line("vllm", _envelope(sid, req, orjson.dumps(body)), {
        i: (prompt + o, start, _moe(np.concatenate([prompt_rows, r]), g))
        for i, o, r in zip(ids, outs, gens)})
    pr = ("response", "prompt_routed_experts")
    deep = [lambda old: _deep(old, lambda v: v + 0.5), lambda old: _deep(old, str),
            lambda old: _deep(old, lambda v: True), lambda old: _deep(old, lambda v: None),
            lambda old: _deep(old, lambda v: [v])]
    line.sites = _envelope_sites(line) + [
        Site("set", pr, ["x", 5, {}, [[1.5]]] + deep),
    ]
    for i, sample in enumerate(ids):
        if len(gens[i]):
            line.sites.append(Site("set", ("response", "choices", i, "routed_experts"), deep,
                                   affected=(sample,)))
    return line


def _deep(rows: list, change: Callable[[Any], Any]) -> list:
    rows = copy.deepcopy(rows)
    rows[0][0][0] = change(rows[0][0][0])
    return rows


def _envelope(sid: str, req: dict[str, Any], body: bytes) -> dict[str, Any]:
    return {"sample_id": sid, "group_id": "g", "policy_version": 7, "request": req,
            "response": orjson.loads(body)}


BUILDERS = {"sglang": [_sglang_line], "sglang-openai": [_openai_line],
            "vllm": [_vllm_line, _legacy_line]}


# ---- apply one mutation -------------------------------------------------------------------

def _serialize(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _mutate(line: Line, site: Site, value: Any) -> bytes:
    obj = copy.deepcopy(line.obj)
    if site.op == "bytes":
        return value(_serialize(obj))
    parent = obj
    for key in site.path[:-1]:
        parent = parent[key]
    key = site.path[-1]
    if site.op == "del":
        del parent[key]
    elif site.op == "drop":
        del parent[key]
    else:
        parent[key] = value(parent[key]) if callable(value) else value
    return _serialize(obj)


@st.composite
def corrupted_dumps(draw: st.DrawFn, geometries: list[RoutingGeometry] = GEOMETRIES
                    ) -> tuple[RoutingGeometry, str, list[Line], int, Site, list[bytes]]:
    g = draw(st.sampled_from(geometries))
    engine = draw(st.sampled_from(sorted(BUILDERS)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lines = [draw(st.sampled_from(BUILDERS[engine]))(f"l{i}", rng, g)
             for i in range(draw(st.integers(2, 4)))]
    k = draw(st.integers(0, len(lines) - 1))
    site = draw(st.sampled_from(lines[k].sites))
    value = draw(st.sampled_from(site.values))
    raw = [_serialize(x.obj) if i != k else _mutate(x, site, value)
           for i, x in enumerate(lines)]
    assert b"\n" not in b"".join(raw)
    return g, engine, lines, k, site, raw


def _check(result_samples: list[dict[str, Any]], out: Path, lines: list[Line], k: int,
           site: Site) -> None:
    reader = ShardReader(out)
    stored = set(reader.sample_ids())
    hit = lines[k]
    affected = set() if site.harmless else \
        set(hit.samples if site.affected is None else site.affected)
    for line in lines:
        for sid, (tokens, start, moe) in line.samples.items():
            if sid in affected:
                assert sid not in stored, (sid, site)
                continue
            assert sid in stored, (sid, site, result_samples)
            s = reader[sid]
            assert s.tokens.tolist() == tokens and s.routed_start == start
            np.testing.assert_array_equal(s.routed, moe)
            assert (s.group_id, s.policy_version) == ("g", 7)
    not_stored = [v for v in result_samples if not v["stored"]]
    base = next(iter(hit.samples)).split("/")[0]
    if site.harmless:
        assert not not_stored, not_stored
        return
    assert not_stored, site
    for v in not_stored:
        # the corrupted samples, their line's id, its stray choices, or the line itself
        sid = v["sample_id"]
        whole_line = site.affected is None and (sid == base or sid.startswith(f"{base}/"))
        assert sid in affected or whole_line or sid == f"line-{k + 1}" or \
            sid.startswith(f"{base}/choice-"), (sid, site)
        assert v["outcome"] in ("rejected", "failed") and v["kinds"], v
        assert v["message"] and "decoder error" not in v["message"], v


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=corrupted_dumps())
def test_one_corrupted_field_is_one_verdict_and_the_rest_is_stored(case):
    g, engine, lines, k, site, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dump.jsonl"
        path.write_bytes(b"\n".join(raw) + b"\n")
        result = ingest(path, g, engine, Path(tmp) / "out")
        assert result.lines == len(lines)
        _check(result.samples, Path(tmp) / "out", lines, k, site)
        assert (result.rejected > 0) != site.harmless


runner = CliRunner()


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=corrupted_dumps(GEOMETRIES[:1]).filter(lambda c: not c[4].harmless))
def test_the_cli_reads_on_prints_json_and_exits_1(case):
    g, engine, lines, k, site, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dump.jsonl"
        path.write_bytes(b"\n".join(raw) + b"\n")
        out = Path(tmp) / "out"
        res = runner.invoke(command_line(), [
            "ingest", str(path), "--model", "tiny-qwen3-moe", "--engine", engine, "--out",
            str(out), "--json"])
        assert res.exit_code == 1, res.output
        doc = orjson.loads(res.stdout)
        assert doc["totals"]["lines"] == len(lines)
        _check(doc["samples"], out, lines, k, site)

