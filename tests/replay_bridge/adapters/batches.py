"""What the frameworks hold, built by hand, and what the engine path makes of the same data.

A :class:`Rollout` is one sample as an engine would return it (prompt, completion, wire rows
from ``start``). :func:`padded` lays rollouts out as verl does, with junk wherever the adapter
must not look (padded positions, the last token's routing, positions before ``start``);
:func:`engine_verdict` decodes the same rollout through an SGLang ``/generate`` answer and
the checks, the reference every adapter result is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from replay_bridge import (CheckReport, RoutedSample, RoutingGeometry, accept,
                           decode_response)
from tests.replay_bridge.protocols.engines import routing, sglang_generate

DENSE_PREFIX = RoutingGeometry(5, (2, 3, 4), 4, 32)  # two dense layers first (DeepSeek-style)
SPARSE_STEP = RoutingGeometry(6, (1, 3, 5), 2, 16)  # every other layer (decoder_sparse_step 2)
JUNK = 77  # out of range for both: an adapter that reads a padded position fails the checks
PAD_TOKEN = 3


@dataclass
class Rollout:
    sample_id: str
    prompt: np.ndarray
    completion: np.ndarray
    rows: np.ndarray
    """Wire rows ``[tokens - 1 - start, num_layers, top_k]`` (int32), row r = position start + r."""
    start: int = 0

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate([self.prompt, self.completion]).astype(np.int32)

    @property
    def n(self) -> int:
        return self.prompt.size + self.completion.size

    def moe_rows(self, g: RoutingGeometry) -> np.ndarray:
        return self.rows[:, g.moe_index()]


def rollout(rng: np.random.Generator, g: RoutingGeometry, sid: str, prompt_len: int,
            completion_len: int, start: int = 0) -> Rollout:
    prompt = rng.integers(10, 1000, prompt_len).astype(np.int32)
    completion = rng.integers(10, 1000, completion_len).astype(np.int32)
    rows = routing(rng, max(prompt_len + completion_len - 1 - start, 0), g)
    return Rollout(sid, prompt, completion, rows, start)


def rollouts(rng: np.random.Generator, g: RoutingGeometry, lengths: list[tuple[int, int]],
             start: int = 0) -> list[Rollout]:
    return [rollout(rng, g, f"s{i}", p, c, start) for i, (p, c) in enumerate(lengths)]


@dataclass
class Padded:
    routing: np.ndarray
    """``[batch, seq, layers, k]``: all wire layers, or MoE layers only (``moe_only``)."""
    attention_mask: np.ndarray
    input_ids: np.ndarray
    prompt_lengths: np.ndarray
    sample_ids: list[str]
    routed_start: np.ndarray


def padded(samples: list[Rollout], g: RoutingGeometry, left: list[int], right: list[int],
           *, dtype: str = "int32", moe_only: bool = False) -> Padded:
    """verl's layout: row b is ``left[b]`` pad columns, the sample's tokens, ``right[b]`` pad
    columns; routing at position t is token t's; junk everywhere the sample has no row."""
    seq = max(lp + s.n + rp for s, lp, rp in zip(samples, left, right))
    layers = g.num_moe_layers if moe_only else g.num_layers
    r = np.full((len(samples), seq, layers, g.top_k), JUNK, dtype=dtype)
    mask = np.zeros((len(samples), seq), np.int64)
    ids = np.full((len(samples), seq), PAD_TOKEN, np.int64)
    for b, (s, lp) in enumerate(zip(samples, left)):
        rows = s.moe_rows(g) if moe_only else s.rows
        r[b, lp + s.start: lp + s.n - 1] = rows.astype(dtype)
        mask[b, lp: lp + s.n] = 1
        ids[b, lp: lp + s.n] = s.tokens
    return Padded(r, mask, ids, np.array([s.prompt.size for s in samples]),
                  [s.sample_id for s in samples], np.array([s.start for s in samples]))


def engine_verdict(s: Rollout, g: RoutingGeometry) -> tuple[CheckReport, RoutedSample | None]:
    """The verdict the engine path gives ``s``: its SGLang ``/generate`` answer (int32 ids),
    decoded and checked."""
    request, body = sglang_generate(s.prompt.tolist(), s.completion.tolist(), s.rows,
                                    start=s.start)
    (wire,) = decode_response("sglang", request, body, g, s.sample_id)
    return accept(wire, g)


def assert_same_verdict(got: tuple[CheckReport, RoutedSample | None],
                        want: tuple[CheckReport, RoutedSample | None]) -> None:
    """Same report (kinds, message, counts, first offences) and the same stored sample."""
    (report, sample), (ref, ref_sample) = got, want
    assert report.kinds == ref.kinds
    assert report.message == ref.message
    assert (report.rows, report.expected_rows, report.prompt_rows, report.checked_rows) == (
        ref.rows, ref.expected_rows, ref.prompt_rows, ref.checked_rows)
    assert report.first == ref.first
    assert report.bad.keys() == ref.bad.keys()
    for kind in report.bad:
        np.testing.assert_array_equal(report.bad[kind], ref.bad[kind])
    assert (sample is None) == (ref_sample is None)
    if sample is not None:
        for name in ("sample_id", "prompt_len", "routed_start"):
            assert getattr(sample, name) == getattr(ref_sample, name), name
        np.testing.assert_array_equal(sample.tokens, ref_sample.tokens)
        assert sample.tokens.dtype == np.int32
        np.testing.assert_array_equal(sample.routed, ref_sample.routed)
        assert sample.routed.dtype == ref_sample.routed.dtype
        assert sample.native is None and ref_sample.native is None

