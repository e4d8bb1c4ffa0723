"""Checks: each protocol.md fault yields its named verdict at the right region and layer."""

from __future__ import annotations

import numpy as np
import pytest

from replay_bridge.checks import CheckTally, accept, check_routed, check_sample
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import WireSample
from tests.replay_bridge.protocols.engines import routing

G = RoutingGeometry(6, (1, 2, 3, 4, 5), 4, 64)  # layer 0 dense (DeepSeek-style)
PROMPT, COMPLETION = 9, 7


def _sample(r: np.ndarray, start: int = 0, sid: str = "s") -> WireSample:
    tokens = np.arange(PROMPT + COMPLETION, dtype=np.int32)
    return WireSample(sid, tokens, PROMPT, routed_start=start, routing=r)


@pytest.fixture
def good(rng) -> np.ndarray:
    return routing(rng, PROMPT + COMPLETION - 1, G)


def test_good_sample_passes_and_dense_layer_is_ignored(good):
    good[:, 0, :] = 77  # dense-layer garbage (out of range, duplicate) is never looked at
    report, routed = accept(_sample(good), G)
    assert report.ok and report.kinds == ()
    assert routed.routed.shape == (PROMPT + COMPLETION - 1, 5, 4)
    np.testing.assert_array_equal(routed.routed, good[:, 1:, :])


def test_pr23885_prompt_rows_all_zero(good):
    """SGLang PR #23885: prefill never copied its capture -> prompt rows all zero."""
    good[:PROMPT, :, :] = 0
    report = check_sample(_sample(good), G)
    assert report.kinds == ("all_zero",)
    assert report.bad_by_region("all_zero") == {"prompt": PROMPT * 5, "completion": 0}
    assert report.bad_layers("all_zero") == [1, 2, 3, 4, 5]
    assert report.first["all_zero"] == (0, 1)
    assert "prompt 45, completion 0" in report.message


def test_duplicate_ids_located(good):
    good[11, 3] = [5, 9, 5, 2]
    report = check_sample(_sample(good), G)
    assert report.kinds == ("duplicate_ids",)
    assert report.first["duplicate_ids"] == (11, 3)
    assert report.bad_by_region("duplicate_ids") == {"prompt": 0, "completion": 1}


def test_out_of_range_and_negative(good):
    good[2, 5, 1] = 64
    good[12, 1, 0] = -1
    report = check_sample(_sample(good), G)
    assert report.kinds == ("out_of_range",)
    assert report.bad_by_region("out_of_range") == {"prompt": 1, "completion": 1}
    assert report.first["out_of_range"] == (2, 5)
    assert report.bad_layers("out_of_range") == [1, 5]


def test_row_count_extra_row(good):
    extra = np.concatenate([good, good[-1:]])
    report = check_sample(_sample(extra), G)
    assert report.kinds == ("row_count",)
    assert "16 routing rows, expected 15" in report.message


def test_row_count_missing_last_prompt_row(good):
    report = check_sample(_sample(good[:-1]), G)
    assert report.kinds == ("row_count",)


def test_start_offset_regions(good):
    """With routed_start=4 row r is position 4 + r; prompt rows are the first 5."""
    r = good[4:]
    r[:5, 2] = 0
    report = check_sample(_sample(r, start=4), G)
    assert report.kinds == ("all_zero",)
    assert report.bad_by_region("all_zero") == {"prompt": 5, "completion": 0}
    assert report.first["all_zero"] == (4, 2)


def test_top_k_one_zero_is_a_route():
    g = RoutingGeometry(2, (0, 1), 1, 8)
    r = np.zeros((PROMPT + COMPLETION - 1, 2, 1), np.int32)
    assert check_sample(_sample(r), g).ok


def test_several_kinds_counted_once_each(good):
    good[0, 1] = 0  # all-zero
    good[1, 1] = [3, 3, 1, 2]  # duplicate
    good[2, 1] = [0, 0, 0, 99]  # out of range wins over duplicate
    report = check_sample(_sample(good), G)
    assert report.kinds == ("out_of_range", "all_zero", "duplicate_ids")
    assert report.bad_blocks() == 3


def test_wide_kinds_and_uint16():
    g = RoutingGeometry(3, (0, 1, 2), 8, 300)
    rng = np.random.default_rng(0)
    r = routing(rng, PROMPT + COMPLETION - 1, g)
    report, routed = accept(_sample(r), g)
    assert report.ok and routed.routed.dtype == np.uint16
    r[3, 2, 7] = 300
    assert check_sample(_sample(r), g).kinds == ("out_of_range",)


def test_check_routed_and_tally(good):
    _, routed = accept(_sample(good), G)
    assert check_routed(routed, G).ok
    routed.routed[0:3, 4] = 0
    report = check_routed(routed, G)
    assert report.kinds == ("all_zero",) and report.first["all_zero"] == (0, 5)
    tally = CheckTally(G)
    tally.add(report)
    tally.add(check_sample(_sample(good), G))
    d = tally.to_dict()
    assert d["samples"] == 2 and d["good"] == 1
    assert d["regions"]["prompt"]["all_zero_blocks"] == 3
    assert d["regions"]["prompt"]["tokens"] == 2 * PROMPT
    assert d["layers"]["5"]["all_zero_blocks"] == [3, 0]
    rows = tally.region_totals()
    assert rows[0] == ("prompt", 2 * PROMPT, 2 * PROMPT * 5, 3, 3)
    assert rows[-1] == ("total", 2 * (PROMPT + COMPLETION - 1),
                        2 * (PROMPT + COMPLETION - 1) * 5, 3, 3)


def test_duplicate_scan_matches_sort_reference(rng, monkeypatch):
    """The XOR/min duplicate scan and the repeat mask agree with a sort-based reference on
    random blocks, over several cache-sized chunks and any leading shape."""
    from replay_bridge import checks
    from replay_bridge.checks import has_repeated_ids, repeated_ids

    monkeypatch.setattr(checks, "_CHUNK_BLOCKS", 1024)
    for k in (2, 3, 8):
        blocks = rng.integers(0, 12, size=(5000, k)).astype(np.uint8)
        ref = (np.diff(np.sort(blocks, axis=1), axis=1) == 0).any(axis=1)
        assert has_repeated_ids(blocks) == bool(ref.any())
        np.testing.assert_array_equal(repeated_ids(blocks), ref)
        np.testing.assert_array_equal(repeated_ids(blocks.reshape(1000, 5, k)),
                                      ref.reshape(1000, 5))
        distinct = np.argsort(rng.random((5000, 16)), axis=1)[:, :k].astype(np.uint8)
        assert not has_repeated_ids(distinct)
        assert not repeated_ids(distinct).any()
        # One repeat in the last chunk only is found.
        distinct[-1, -1] = distinct[-1, 0]
        assert has_repeated_ids(distinct)
        assert np.flatnonzero(repeated_ids(distinct)).tolist() == [4999]
    one = rng.integers(0, 12, size=(10, 4, 1)).astype(np.uint8)  # top-1: nothing to repeat
    assert not has_repeated_ids(one) and repeated_ids(one).shape == (10, 4)


@pytest.mark.parametrize("moe_layers", [(1, 2, 3, 4, 5), (0, 1, 2), (1, 3, 5), tuple(range(6))])
@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
def test_moe_layers_kept_for_every_layer_pattern(rng, moe_layers, dtype):
    """Dense prefix, dense suffix, interleaved and all-MoE layers, wide and narrow wire ids:
    the stored routing is the MoE layers, contiguous, and faults name the wire layer."""
    g = RoutingGeometry(6, moe_layers, 4, 64)
    r = routing(rng, PROMPT + COMPLETION - 1, g).astype(dtype)
    report, routed = accept(_sample(r), g)
    assert report.ok
    assert routed.routed.dtype == np.uint8 and routed.routed.flags.c_contiguous
    np.testing.assert_array_equal(routed.routed, r[:, list(moe_layers), :])
    r[5, moe_layers[-1]] = [7, 7, 1, 2]
    report = check_sample(_sample(r), g)
    assert report.kinds == ("duplicate_ids",)
    assert report.first["duplicate_ids"] == (5, moe_layers[-1])


@pytest.mark.parametrize("chunk", [4, 7, 1 << 14])
def test_faults_found_in_every_run_of_the_chunked_scan(rng, monkeypatch, chunk):
    """Range, narrowing and the repeated-id scan go over runs of rows: a fault in any run,
    and faults of different kinds in different runs, are all found and located."""
    import replay_bridge.checks as checks

    monkeypatch.setattr(checks, "_CHUNK_BLOCKS", chunk)  # runs of 1-2 rows, or the whole
    rows = 40
    tokens = np.arange(rows + 1, dtype=np.int32)
    good = routing(rng, rows, G)
    for row, layer, kind in [(0, 1, "duplicate_ids"), (17, 4, "duplicate_ids"),
                             (39, 5, "duplicate_ids"), (23, 2, "all_zero")]:
        r = good.copy()
        r[row, layer] = [3, 3, 8, 9] if kind == "duplicate_ids" else 0
        report, routed = accept(WireSample("s", tokens, 10, routing=r), G)
        assert report.kinds == (kind,) and routed is None
        assert report.first[kind] == (row, layer)
    r = good.copy()
    r[30, 3, 2] = 64      # out of range in a late run
    r[2, 2] = [7, 1, 7, 0]  # a repeat in an early run
    report = check_sample(WireSample("s", tokens, 10, routing=r), G)
    assert report.kinds == ("out_of_range", "duplicate_ids")
    assert report.first["out_of_range"] == (30, 3) and report.first["duplicate_ids"] == (2, 2)
    report, routed = accept(WireSample("s", tokens, 10, routing=good), G)
    assert report.ok
    np.testing.assert_array_equal(routed.routed, good[:, 1:, :].astype(np.uint8))


def test_repeat_scan_of_signed_ids_with_negatives():
    """A XOR of two different negative ids is negative in a signed dtype: the scan must still
    see the zero of a repeat elsewhere in the same chunk."""
    from replay_bridge.checks import has_repeated_ids

    blocks = np.array([[-1, -2, 3, 4], [5, 6, 5, 7]], dtype=np.int32)
    assert has_repeated_ids(blocks)
    assert not has_repeated_ids(blocks[:1])
    assert has_repeated_ids(np.array([[-3, 1, -3, 2]], dtype=np.int16))
