"""The writer never writes through a link out of its dataset (local temp files, the
``_routing_replay`` folders), never loses accepted samples to one value Arrow refuses, and takes
only ASCII names (writer ids, sequence digits) for the format's objects."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import (Manifest, ShardError, ShardReader, ShardWriter,
                                  UnstorableSample)
from replay_bridge.shards import _manifest, _writer
from replay_bridge.sink import SampleSink

from .conftest import make_sample
from .helpers import (WRITER, FOLDER, index_name, manifest_doc, manifest_name,
                      object_names, quarantine_name, run_cli, shard_name, temp_name, write_dir)


def _temps(writer: str, seq: int = 0) -> tuple[str, ...]:
    """The local temp files a writer writes its objects through."""
    return tuple(temp_name(n) for n in (manifest_name(writer), quarantine_name(writer, seq),
                                        shard_name(writer, seq), index_name(writer, seq)))


TEMP_NAMES = _temps(WRITER)


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
    (d / name).parent.mkdir(parents=True)
    os.symlink(victim, d / name)
    with ShardWriter(d, tiny, writer_id=WRITER) as w:
        _exercise(w, tiny, 0)
    assert victim.read_text() == "precious\n"
    assert not (d / name).is_symlink()
    r = ShardReader(d)
    assert sorted(r.sample_ids()) == ["s0", "s1", "s2"] and len(list(r.quarantined())) == 1


@pytest.mark.parametrize("name", _temps("w1", 0))
def test_a_planted_temp_link_in_a_resumed_directory_is_never_written_through(
        tmp_path: Path, tiny: RoutingGeometry, name: str) -> None:
    victim = _victim(tmp_path)
    d = tmp_path / "d"
    with ShardWriter(d, tiny, writer_id=WRITER) as w:
        _exercise(w, tiny, 0)
    with ShardWriter(d, tiny, resume=True, writer_id="w1") as w:
        os.symlink(victim, d / name)  # planted after the resumed writer published itself
        _exercise(w, tiny, 10)
    assert victim.read_text() == "precious\n"
    assert len(ShardReader(d)) == 6


@pytest.mark.parametrize("folder", [FOLDER, f"{FOLDER}/manifests", f"{FOLDER}/quarantine",
                                    f"{FOLDER}/index"])
def test_a_format_folder_that_is_a_link_out_of_the_dataset_is_refused(
        tmp_path: Path, tiny: RoutingGeometry, folder: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    d = tmp_path / "d"
    (d / folder).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, d / folder)
    with pytest.raises(ShardError, match="symlink|outside the dataset") as e:
        with ShardWriter(d, tiny, writer_id=WRITER) as w:
            _exercise(w, tiny, 0)
    assert e.value.kind == "unsafe_path"
    assert list(outside.iterdir()) == []


def test_a_dangling_link_and_a_stale_temp_file_are_replaced(tmp_path: Path,
                                                            tiny: RoutingGeometry) -> None:
    d = tmp_path / "d"
    manifest_tmp, chunk_tmp = TEMP_NAMES[:2]
    for name in (manifest_tmp, chunk_tmp):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path / "nowhere" / "file", d / manifest_tmp)
    (d / chunk_tmp).write_bytes(b"half a line")
    with ShardWriter(d, tiny, writer_id=WRITER) as w:
        _exercise(w, tiny, 0)
    assert not any(n.endswith(".tmp") for n in object_names(d))
    assert not (tmp_path / "nowhere").exists()
    assert run_cli("validate", d, "--json")[0] == 0


def test_a_directory_where_a_temp_file_goes_is_an_error_not_a_removal(
        tmp_path: Path, tiny: RoutingGeometry) -> None:
    d = tmp_path / "d"
    tmp = TEMP_NAMES[0]
    (d / tmp).mkdir(parents=True)
    (d / tmp / "keep").write_text("x")
    with pytest.raises(ShardError, match=f"{Path(tmp).name} is a directory"):
        ShardWriter(d, tiny, writer_id=WRITER)
    assert (d / tmp / "keep").read_text() == "x"


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


@pytest.mark.parametrize("name", ["part-w0-٠٠٠٠٠٠.arrow", "_routing_replay/quarantine/w0-۱۲۳۴۵۶.jsonl",
                                  "part-w0-１２３４５６.arrow", "part-wé-000000.arrow",
                                  "part-w０-000000.arrow"])
def test_object_names_take_ascii_only(tmp_path: Path, tiny: RoutingGeometry, samples,
                                      name: str) -> None:
    assert _manifest.writer_of(name) is None
    d = write_dir(tmp_path / "d", tiny, samples[:2])
    doc = manifest_doc(d)
    doc["shards" if name.endswith(".arrow") else "quarantine"].insert(0, dict(
        file=name, rows=0, tokens=0, routed_rows=0, records=0, bytes=0, xxh3_128="0" * 32))
    with pytest.raises(ShardError, match="not a"):
        Manifest.from_dict(doc, manifest_name(WRITER))
    writer = name.split("-")[1]
    if not writer.isascii():  # nor does a writer take such an id
        with pytest.raises(ValueError, match="writer_id must match"):
            ShardWriter(tmp_path / "e", tiny, writer_id=writer)
    assert Manifest.from_dict(manifest_doc(d), manifest_name(WRITER)).samples == 2


@pytest.mark.parametrize("uri", ["nosuchscheme://bucket/x", "s4://bucket/x"])
def test_a_uri_of_an_unknown_scheme_is_refused_never_a_local_folder(
        tmp_path: Path, tiny: RoutingGeometry, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.chdir(tmp_path)
    for open_it in (lambda: ShardWriter(uri, tiny), lambda: ShardReader(uri)):
        with pytest.raises(ShardError, match="unsupported dataset URI") as e:
            open_it()
        assert e.value.kind == "uri"
    assert list(tmp_path.iterdir()) == []
