"""Native rows: rows a sample's ``native`` mask marks are skipped by the block checks and
counted apart, while an engine's ``-1`` or zero row (never marked) is still rejected."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from replay_bridge.checks import CheckReport, CheckTally, accept, check_routed, check_sample
from replay_bridge.cli import check_table
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.sample import WireSample
from tests.replay_bridge.protocols.engines import routing

G = RoutingGeometry(6, (1, 2, 3, 4, 5), 4, 64)  # layer 0 dense
PROMPT, COMPLETION = 9, 7
ROWS = PROMPT + COMPLETION - 1


def _sample(r: np.ndarray, native: object = None, start: int = 0, sid: str = "s") -> WireSample:
    tokens = np.arange(PROMPT + COMPLETION, dtype=np.int32)
    return WireSample(sid, tokens, PROMPT, routed_start=start, routing=r, native=native)


def _mask(rows: int, *marked: int) -> np.ndarray:
    m = np.zeros(rows, bool)
    m[list(marked)] = True
    return m


@pytest.fixture
def good(rng) -> np.ndarray:
    return routing(rng, ROWS, G)


# ---- an engine never marks: its -1 and zero rows are faults, exactly as before ---------------


def test_engine_minus_one_row_is_out_of_range(good):
    good[3, :, :] = -1  # the NeMo-RL mark, but from an engine: nobody marked the row
    report, routed = accept(_sample(good), G)
    assert routed is None and report.kinds == ("out_of_range",)
    assert report.first["out_of_range"] == (3, 1)  # dense layer 0 is never looked at
    assert report.bad_by_region("out_of_range") == {"prompt": 5, "completion": 0}
    assert report.native_rows == 0 and "native_rows" not in report.to_dict()


def test_engine_zero_row_is_all_zero(good):
    good[12, :, :] = 0
    report = check_sample(_sample(good), G)
    assert report.kinds == ("all_zero",)
    assert report.first["all_zero"] == (12, 1)
    assert report.bad_by_region("all_zero") == {"prompt": 0, "completion": 5}


def test_partly_marked_row_is_not_native(good):
    """A row whose ids are -1 in some layers only stays out_of_range: the checks see ids,
    the mask says which rows are native, and this one is not marked."""
    good[4, 2:, :] = -1
    report = check_sample(_sample(good, native=_mask(ROWS, 7)), G)
    assert report.kinds == ("out_of_range",)
    assert report.first["out_of_range"] == (4, 2)
    assert report.bad_layers("out_of_range") == [2, 3, 4, 5]
    assert report.native_rows == 1


# ---- marked rows are skipped, unmarked neighbours still checked ------------------------------


def test_marked_minus_one_row_accepted_and_zeroed(good):
    good[2, :, :] = -1
    good[11, :, :] = -1
    native = _mask(ROWS, 2, 11)
    report, routed = accept(_sample(good, native=native), G)
    assert report.ok, report.message
    assert report.native_rows == 2
    assert report.native_by_region == {"prompt": 1, "completion": 1}
    assert report.checked_rows == ROWS - 2 and report.prompt_rows == PROMPT - 1
    assert routed.routed.dtype == G.id_dtype
    assert (routed.routed[[2, 11]] == 0).all()
    keep = ~native
    np.testing.assert_array_equal(routed.routed[keep], good[keep][:, 1:, :])
    np.testing.assert_array_equal(routed.native, native)
    assert report.to_dict()["native_rows"] == 2
    full = routed.full_routing()
    assert (full[[2, 11]] == -1).all() and (full[3] == good[3, 1:]).all()


def test_unmarked_minus_one_next_to_a_marked_one_is_rejected(good):
    good[5, :, :] = -1  # marked
    good[6, 3, 2] = -1  # not marked: an engine fault beside it
    report, routed = accept(_sample(good, native=_mask(ROWS, 5)), G)
    assert routed is None and report.kinds == ("out_of_range",)
    assert report.first["out_of_range"] == (6, 3)
    assert report.bad_by_region("out_of_range") == {"prompt": 1, "completion": 0}
    assert report.bad_layers("out_of_range") == [3]
    assert "first at position 6 layer 3" in report.message and "'s'" in report.message


def test_marked_zero_row_accepted_unmarked_zero_row_rejected(good):
    good[9, :, :] = 0
    assert accept(_sample(good, native=_mask(ROWS, 9)), G)[0].ok
    good[13, :, :] = 0
    report = check_sample(_sample(good, native=_mask(ROWS, 9)), G)
    assert report.kinds == ("all_zero",)
    assert report.first["all_zero"] == (13, 1)
    assert report.bad_by_region("all_zero") == {"prompt": 0, "completion": 5}


def test_marked_duplicate_and_wide_ids_not_looked_at(good):
    good[1, 2] = [3, 3, 3, 3]
    good[8, :, :] = 1000
    report, routed = accept(_sample(good, native=_mask(ROWS, 1, 8)), G)
    assert report.ok and (routed.routed[[1, 8]] == 0).all()


def test_positions_with_routed_start_and_marks(good):
    """With routed_start=4, row r is position 4 + r; prompt rows are the first 5."""
    r = good[4:].copy()
    r[0, :, :] = -1  # position 4, marked
    r[2, 4, 0] = 64  # position 6, layer 4: out of range, unmarked
    report = check_sample(_sample(r, native=_mask(len(r), 0), start=4), G)
    assert report.kinds == ("out_of_range",)
    assert report.first["out_of_range"] == (6, 4)
    assert report.native_by_region == {"prompt": 1, "completion": 0}
    assert report.prompt_rows == 4 and report.checked_rows == len(r) - 1


def test_every_row_marked(good):
    good[:] = -1
    report, routed = accept(_sample(good, native=np.ones(ROWS, bool)), G)
    assert report.ok and report.checked_rows == 0 and report.native_rows == ROWS
    assert routed.routed.shape == (ROWS, 5, 4) and not routed.routed.any()


def test_all_false_mask_becomes_none(good):
    report, routed = accept(_sample(good, native=np.zeros(ROWS, bool)), G)
    assert report.ok and report.native_rows == 0 and routed.native is None
    np.testing.assert_array_equal(routed.routed, good[:, 1:, :])


def test_row_count_is_still_row_count(good):
    extra = np.concatenate([good, good[-1:]])
    report = check_sample(_sample(extra, native=_mask(ROWS + 1, 0)), G)
    assert report.kinds == ("row_count",)


@pytest.mark.parametrize("native, said", [
    (np.zeros(ROWS - 1, bool), "native mask has 14 rows, the routing 15"),
    (np.zeros(ROWS + 1, bool), "native mask has 16 rows, the routing 15"),
    (np.zeros(ROWS, np.int8), "native mask is int8"),
    (np.zeros((ROWS, 1), bool), "native mask is bool of shape (15, 1)"),
    ([False] * ROWS, "native mask is a list"),
])
def test_bad_mask_is_malformed(good, native, said):
    report, routed = accept(_sample(good, native=native, sid="bad-mask"), G)
    assert routed is None and report.kinds == ("malformed",)
    assert said in report.message and report.message.startswith("sample 'bad-mask': malformed")


# ---- stored samples (validate) ---------------------------------------------------------------


def test_check_routed_skips_native_rows(good):
    good[3, :, :] = -1
    _, routed = accept(_sample(good, native=_mask(ROWS, 3)), G)
    report = check_routed(routed, G)
    assert report.ok and report.native_rows == 1
    routed.routed[7, 2] = 0  # an unmarked zero block
    report = check_routed(routed, G)
    assert report.kinds == ("all_zero",) and report.first["all_zero"] == (7, 3)


@pytest.mark.parametrize("native", [np.zeros(ROWS - 2, bool), np.zeros(ROWS, np.uint8), "xx"])
def test_check_routed_refuses_a_bad_mask(good, native):
    _, routed = accept(_sample(good, sid="stored-1"), G)
    routed.native = native
    report = check_routed(routed, G)
    assert report.kinds == ("malformed",)
    assert report.message.startswith("sample 'stored-1': malformed: native mask")


# ---- totals and tables -----------------------------------------------------------------------


def test_tally_counts_native_rows_apart(good):
    tally = CheckTally(G)
    plain = check_sample(_sample(good), G)
    marked = good.copy()
    marked[[0, 1, 10], :, :] = -1
    tally.add(plain)
    tally.add(check_sample(_sample(marked, native=_mask(ROWS, 0, 1, 10)), G))
    d = tally.to_dict()
    assert d["regions"]["prompt"]["native_rows"] == 2
    assert d["regions"]["completion"]["native_rows"] == 1
    assert d["regions"]["prompt"]["tokens"] == 2 * PROMPT - 2
    assert d["regions"]["completion"]["tokens"] == 2 * (COMPLETION - 1) - 1
    assert d["regions"]["prompt"]["blocks"] == (2 * PROMPT - 2) * 5
    assert d["good"] == 2 and d["regions"]["prompt"]["bad_blocks"] == 0
    assert tally.native.tolist() == [2, 1]


def _render(tally: CheckTally) -> str:
    console = Console(record=True, width=200)
    console.print(check_table(tally))
    return console.export_text()


def test_check_table_shows_native_rows_only_when_any(good):
    tally = CheckTally(G)
    tally.add(check_sample(_sample(good), G))
    plain = _render(tally)
    assert "native" not in plain
    marked = good.copy()
    marked[[2, 12], :, :] = -1
    tally.add(check_sample(_sample(marked, native=_mask(ROWS, 2, 12)), G))
    text = _render(tally)
    assert "native rows" in text
    cells = [line.replace("│", " ").split() for line in text.splitlines()]
    lines = {c[0]: c for c in cells if c and c[0] in ("prompt", "completion", "total")}
    assert lines["prompt"][1:3] == [f"{2 * PROMPT - 1:,}", "1"]
    assert lines["completion"][1:3] == [f"{2 * (COMPLETION - 1) - 1:,}", "1"]
    assert lines["total"][1:3] == [f"{2 * ROWS - 2:,}", "2"]


def test_report_defaults_have_no_native_rows():
    r = CheckReport("x")
    assert r.native_rows == 0 and r.native_by_region == {"prompt": 0, "completion": 0}
