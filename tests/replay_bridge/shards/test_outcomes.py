"""Outcome counts count each sample id once: stored wins, else the latest record's outcome; a
resumed writer quarantines an already-listed sample no second time; validate counts the same
way. On a local directory and on an S3-compatible server."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay_bridge.checks import CheckReport
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import Manifest, ShardReader, ShardWriter

from .conftest import make_sample
from .helpers import edit_manifest, manifest_doc, run_cli


def zeros(sid: str) -> CheckReport:
    return CheckReport(sid, kinds=("all_zero",), message=f"sample {sid!r}: all_zero")


def validate(d: str | Path) -> dict:
    code, doc, out = run_cli("validate", d, "--json")
    assert doc is not None, out
    doc["code"] = code
    return doc


def test_failed_then_stored_on_resume_counts_once_as_stored(dataset_uri: str, tiny: RoutingGeometry) -> None:
    d = dataset_uri
    with ShardWriter(d, tiny) as w:
        w.add(make_sample(tiny, "a", 10, seed=1))
        w.record_failure("b", TimeoutError("timed out"))
        w.quarantine(zeros("c"))
    with ShardWriter(d, tiny, resume=True) as w:
        w.add(make_sample(tiny, "b", 10, seed=2))  # the failed one, asked again and stored
        w.add(make_sample(tiny, "c", 10, seed=3))  # the rejected one, stored this time
    m = Manifest.read(d)
    assert m.outcomes == {"stored": 3, "rejected": 0, "failed": 0}
    assert m.quarantined == 2  # the old records stay, as history
    doc = validate(d)
    assert doc["code"] == 0, doc["faults"]
    assert doc["quarantine"]["outcomes"] == {"rejected": 0, "failed": 0}
    assert doc["quarantine"]["records"] == 2


def test_the_latest_record_wins(dataset_uri: str, tiny: RoutingGeometry) -> None:
    d = dataset_uri
    with ShardWriter(d, tiny, quarantine_records=1) as w:
        w.record_failure("x", "HTTP 503")
        w.quarantine(zeros("x"))          # answered on a retry, but with zeros
        w.record_failure("y", "HTTP 503")
    with ShardWriter(d, tiny, resume=True) as w:
        w.record_failure("x", "HTTP 503")  # failed again in the next run
    m = Manifest.read(d)
    assert m.outcomes == {"stored": 0, "rejected": 0, "failed": 2}
    assert m.quarantined == 4
    assert validate(d)["quarantine"]["outcomes"] == {"rejected": 0, "failed": 2}


def test_stored_in_the_same_run_after_a_rejection_counts_as_stored(
        dataset_uri: str, tiny: RoutingGeometry) -> None:
    d = dataset_uri
    with ShardWriter(d, tiny, samples_per_shard=2, quarantine_records=1) as w:
        w.quarantine(zeros("s0"))  # sealed and counted as rejected ...
        assert Manifest.read(d).outcomes["rejected"] == 1
        w.add(make_sample(tiny, "s0", 10, seed=0))  # ... until its shard is sealed
        assert w.stats.quarantined == 1
        w.add(make_sample(tiny, "s1", 10, seed=1))
        assert Manifest.read(d).outcomes == {"stored": 2, "rejected": 0, "failed": 0}
        assert w.stats.quarantined == 0
        w.quarantine(zeros("s1"))  # a bad copy of a stored id: a record, but stored wins
    assert Manifest.read(d).outcomes == {"stored": 2, "rejected": 0, "failed": 0}
    assert validate(d)["code"] == 0


def test_a_resumed_writer_does_not_quarantine_a_listed_sample_again(
        dataset_uri: str, tiny: RoutingGeometry) -> None:
    """Three runs meet the same 30 rejected samples (a dump ingested again after each kill):
    30 records, not 90."""
    d = dataset_uri
    for run in range(3):
        with ShardWriter(d, tiny, resume=run > 0, quarantine_records=7) as w:
            for i in range(30):
                w.quarantine(zeros(f"r{i:02d}"))
                if f"s{i:02d}" not in w:
                    w.add(make_sample(tiny, f"s{i:02d}", 10, seed=i))
    m = Manifest.read(d)
    assert m.quarantined == 30
    assert m.outcomes == {"stored": 30, "rejected": 30, "failed": 0}
    assert sorted(r["sample_id"] for r in ShardReader(d).quarantined()) == \
        [f"r{i:02d}" for i in range(30)]


def test_a_new_reason_is_a_new_record(dataset_uri: str, tiny: RoutingGeometry) -> None:
    d = dataset_uri
    with ShardWriter(d, tiny) as w:
        w.quarantine(zeros("r"))
        w.quarantine(zeros("r"))  # the same again: nothing new to say
        w.quarantine(CheckReport("r", kinds=("out_of_range",), message="sample 'r': 9 >= 8"))
    assert [r["kinds"] for r in ShardReader(d).quarantined()] == [["all_zero"],
                                                                   ["out_of_range"]]
    assert Manifest.read(d).outcomes["rejected"] == 1


def test_a_manifest_that_counts_records_is_a_fault_of_its_writer_only(
        dataset_uri: str, tiny: RoutingGeometry) -> None:
    """A writer's manifest whose outcomes count records (two for one id rejected twice):
    validate names that writer's counts; the dataset's outcomes, read from the indexes, count
    each id once; a resumed writer publishes its own manifest and never rewrites another's."""
    d = dataset_uri
    with ShardWriter(d, tiny, quarantine_records=2, writer_id="old") as w:
        w.quarantine(zeros("r1"))
        w.quarantine(CheckReport("r1", kinds=("shape",), message="sample 'r1': shape"))
        w.record_failure("r2", "HTTP 503")
    edit_manifest(d, lambda doc: doc["outcomes"].update(rejected=2))  # per record
    doc = validate(d)
    assert doc["code"] == 1
    assert [(f["file"], f["kind"]) for f in doc["faults"]] == [("writer old", "counts")]
    assert "outcomes say" in doc["faults"][0]["message"]
    assert Manifest.read(d).outcomes == {"stored": 0, "rejected": 1, "failed": 1}
    edit_manifest(d, lambda doc: doc["outcomes"].update(rejected=0, failed=2))
    assert [f["kind"] for f in validate(d)["faults"]] == ["counts"]
    with ShardWriter(d, tiny, resume=True, writer_id="new") as w:
        w.quarantine(zeros("r3"))
    assert manifest_doc(d, "old")["outcomes"] == {"stored": 0, "rejected": 0, "failed": 2}
    assert manifest_doc(d, "new")["outcomes"] == {"stored": 0, "rejected": 1, "failed": 0}
    assert Manifest.read(d).outcomes == {"stored": 0, "rejected": 2, "failed": 1}
    edit_manifest(d, lambda doc: doc["outcomes"].update(rejected=1, failed=1), "old")
    doc = validate(d)
    assert doc["code"] == 0, doc["faults"]
    assert doc["quarantine"]["outcomes"] == {"rejected": 2, "failed": 1}


@pytest.mark.parametrize("extra", [1, 5])
def test_counts_never_exceed_the_records(dataset_uri: str, tiny: RoutingGeometry,
                                         extra: int) -> None:
    from replay_bridge.shards import ShardError

    d = dataset_uri
    with ShardWriter(d, tiny) as w:
        w.quarantine(zeros("r"))
    edit_manifest(d, lambda doc: doc["outcomes"].update(rejected=1 + extra))
    with pytest.raises(ShardError, match="quarantine records"):
        Manifest.read(d)
