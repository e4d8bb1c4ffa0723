"""The writer never writes through a link out of its directory, never loses accepted samples
to one value Arrow refuses, and takes only ASCII digits in member names."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import (Manifest, ShardError, ShardReader, ShardWriter,
                                  UnstorableSample)
from replay_bridge.shards import _manifest, _writer
from replay_bridge.sink import SampleSink

from .conftest import make_sample
from .helpers import run_cli, write_dir

TEMP_NAMES = ("manifest.json.tmp", "quarantine-000000.jsonl.tmp", "shard-000000.arrow.tmp")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside.txt"
    victim.write_text("precious\n")
    return victim


def _exercise(w: ShardWriter, tiny: RoutingGeometry, first: int) -> None:
    """Every kind of file a writer makes: shard, quarantine chunk, manifest."""
    for i in range(first, first + 3):
        w.add(make_sample(tiny, f"s{i}", 12, seed=i))
    w.quarantine(CheckReport(f"q{first}", kinds=("all_zero",), message="zeros"))
    w.flush()


@pytest.mark.parametrize("name", TEMP_NAMES)
def test_a_planted_temp_link_in_a_new_directory_is_never_written_through(
        tmp_path: Path, tiny: RoutingGeometry, name: str) -> None:
    victim = _victim(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(victim, d / name)
    with ShardWriter(d, tiny) as w:
        _exercise(w, tiny, 0)
    assert victim.read_text() == "precious\n"
    assert not (d / name).is_symlink()
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == ["s0", "s1", "s2"] and len(list(r.quarantined())) == 1


@pytest.mark.parametrize("name", ["manifest.json.tmp", "quarantine-000001.jsonl.tmp",
                                  "shard-000001.arrow.tmp"])
def test_a_planted_temp_link_in_a_resumed_directory_is_never_written_through(
        tmp_path: Path, tiny: RoutingGeometry, name: str) -> None:
    victim = _victim(tmp_path)
    d = tmp_path / "d"
    with ShardWriter(d, tiny) as w:
        _exercise(w, tiny, 0)
    with ShardWriter(d, tiny, resume=True) as w:
        os.symlink(victim, d / name)  # planted after the resumed writer cleaned up
        _exercise(w, tiny, 10)
    assert victim.read_text() == "precious\n"
    assert len(ShardReader(d)) == 6


def test_a_dangling_link_and_a_stale_temp_file_are_replaced(tmp_path: Path,
                                                            tiny: RoutingGeometry) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(tmp_path / "nowhere" / "file", d / "manifest.json.tmp")
    (d / "quarantine-000000.jsonl.tmp").write_bytes(b"half a line")
    with ShardWriter(d, tiny) as w:
        _exercise(w, tiny, 0)
    assert not (tmp_path / "nowhere").exists()
    assert run_cli("validate", d, "--json")[0] == 0


def test_a_directory_where_a_temp_file_goes_is_an_error_not_a_removal(
        tmp_path: Path, tiny: RoutingGeometry) -> None:
    d = tmp_path / "d"
    (d / "manifest.json.tmp").mkdir(parents=True)
    (d / "manifest.json.tmp" / "keep").write_text("x")
    with pytest.raises(ShardError, match="manifest.json.tmp is a directory"):
        ShardWriter(d, tiny)
    assert (d / "manifest.json.tmp" / "keep").read_text() == "x"


def test_the_output_path_must_be_a_directory(tmp_path: Path, tiny: RoutingGeometry) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ShardError, match="is not a directory"):
        ShardWriter(f, tiny)
    assert f.read_text() == "x"


@pytest.mark.parametrize("value", [True, 1.5, 2.0, "3", 1 << 64])
def test_a_policy_version_that_is_not_an_int64_is_unstorable_at_claim(
        tmp_path: Path, tiny: RoutingGeometry, value: object) -> None:
    bad = dataclasses.replace(make_sample(tiny, "bad", 12, seed=1), policy_version=value)
    with ShardWriter(tmp_path / "d", tiny) as w:
        with pytest.raises(UnstorableSample, match="sample 'bad': policy_version"):
            w.claim(bad)
        assert "bad" not in w


@pytest.mark.parametrize("background", [False, True])
def test_a_bad_value_past_the_door_loses_no_good_sample(tmp_path: Path, tiny: RoutingGeometry,
                                                        background: bool) -> None:
    """40 good samples share a record batch with one whose policy_version is True: the 40 are
    stored, the one is rejected as unstorable, and the directory resumes cleanly."""
    d = tmp_path / "d"
    good = [make_sample(tiny, f"s{i:02d}", 10, seed=i) for i in range(40)]
    bad = dataclasses.replace(make_sample(tiny, "bad", 10, seed=99), policy_version=True)
    with ShardWriter(d, tiny, batch_bytes=1 << 30) as w, \
            SampleSink(w, background=background) as sink:
        verdicts = [sink.add_checked(CheckReport(s.sample_id), s) for s in good[:20]]
        verdicts.append(sink.add_checked(CheckReport("bad"), bad))
        verdicts += [sink.add_checked(CheckReport(s.sample_id), s) for s in good[20:]]
    assert [v.outcome for v in verdicts].count("stored") == 40
    assert verdicts[20].outcome == "rejected" and verdicts[20].kinds == ("unstorable",)
    assert "policy_version" in verdicts[20].message
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == [s.sample_id for s in good]
    assert r.manifest.outcomes == {"stored": 40, "rejected": 1, "failed": 0}
    with ShardWriter(d, tiny, resume=True) as w:  # and the next run goes on
        w.add(make_sample(tiny, "bad", 10, seed=99))
    assert len(ShardReader(d)) == 41


def test_a_record_batch_arrow_refuses_keeps_every_sample_it_can(
        tmp_path: Path, tiny: RoutingGeometry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a value ever reach the record batch that Arrow refuses, the batch is rebuilt
    without it: the others are stored, the offender is quarantined as unstorable and its id
    is free again."""
    real = _writer.to_record_batch

    def picky(samples, geometry, schema):  # noqa: ANN001, ANN202
        if any(s.sample_id == "s03" for s in samples):
            raise TypeError("Expected integer, got bool")
        return real(samples, geometry, schema)

    monkeypatch.setattr(_writer, "to_record_batch", picky)
    d = tmp_path / "d"
    with ShardWriter(d, tiny, batch_bytes=1 << 30) as w:
        for i in range(8):
            w.add(make_sample(tiny, f"s{i:02d}", 10, seed=i))
        w.flush()
        assert "s03" not in w
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == [f"s{i:02d}" for i in range(8) if i != 3]
    (rec,) = list(r.quarantined())
    assert rec["sample_id"] == "s03" and rec["kinds"] == ["unstorable"]
    assert "record batch refused" in rec["message"]
    assert r.manifest.outcomes == {"stored": 7, "rejected": 1, "failed": 0}


@pytest.mark.parametrize("name", ["shard-٠٠٠٠٠٠.arrow", "quarantine-۱۲۳۴۵۶.jsonl",
                                  "shard-１２３４５６.arrow"])
def test_member_names_take_ascii_digits_only(tmp_path: Path, tiny: RoutingGeometry,
                                             samples, name: str) -> None:
    assert not _manifest.is_member_name(name)
    assert not _manifest.is_temp_name(name + ".tmp")
    d = write_dir(tmp_path / "d", tiny, samples[:2])
    doc = Manifest.read(d).to_dict()
    doc["shards"][0]["file"] = name
    with pytest.raises(ShardError, match="not a"):
        Manifest.from_dict(doc, d)
