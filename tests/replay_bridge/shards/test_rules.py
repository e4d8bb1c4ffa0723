"""The storage rules (``shards/_rules.py``): the writer refuses a sample that breaks one, and
after a consistent rewrite of a shard (manifest re-hashed, index re-pointed and re-checksummed,
so only the contents are wrong) ``validate`` reports the row and the reader refuses it, naming
the sample and the rule, on a local directory and on an S3-compatible server."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pyarrow as pa
import pytest

from replay_bridge.shards import ShardError, ShardReader, ShardWriter, UnstorableSample, \
    validate_dir
from replay_bridge.shards._rules import RULES, batch_breaks, conform, sample_break
from replay_bridge.shards._schema import schema_for, to_record_batch

from .helpers import WRITER, rewrite_shard, run_cli, shard_name, write_dir

FIRST = shard_name(WRITER, 0)


def _rewrite_row(d, name, row, column, fn):
    """Set one value of one row of a shard with plain pyarrow, then re-list it (manifest and
    index): a dataset consistent in every respect but that value."""
    def edit(table):
        i = table.schema.get_field_index(column)
        values = table.column(i).to_pylist()
        values[row] = fn(values[row])
        return table.set_column(i, table.schema.field(i),
                                pa.array(values, table.schema.field(i).type))
    rewrite_shard(d, name, edit)


def _negative_first(tokens):
    return [-5] + tokens[1:]


def _id_out_of_range(routed):
    return [200] + routed[1:]


# (column, new value from old, rule, words in the message)
REWRITES = {
    "prompt_len beyond the tokens": ("prompt_len", lambda v: 999, "positions",
                                     "prompt_len (999) <= tokens (20)"),
    "negative prompt_len": ("prompt_len", lambda v: -1, "positions", "prompt_len (-1)"),
    "negative routed_start": ("routed_start", lambda v: -3, "positions", "routed_start (-3)"),
    "empty sample id": ("sample_id", lambda v: "", "sample_id",
                        "sample id must be a non-empty string"),
    "negative token id": ("tokens", _negative_first, "tokens",
                          "token id -5 at position 0 is outside [0, 2147483648)"),
    "more log-probs than completion tokens": ("logprobs", lambda v: [0.0] * 50, "logprobs",
                                              "50 log-probs for 10 completion tokens"),
    "expert id out of range": ("routed", _id_out_of_range, "expert_ids",
                               "expert ids outside [0, 8): 200 at position 0, layer 0"),
    "weight_versions not a list": ("weight_versions", lambda v: '{"version": 1}', "fields",
                                   "weight_versions is not a list"),
}


@pytest.fixture
def shard_dir(dataset_uri, tiny, samples):
    return write_dir(dataset_uri, tiny, samples, samples_per_shard=5)


@pytest.mark.parametrize("case", list(REWRITES))
def test_validate_and_the_reader_recheck_every_storage_rule(shard_dir, case):
    column, fn, rule, words = REWRITES[case]
    _rewrite_row(shard_dir, FIRST, 4, column, fn)  # s004: 20 tokens, prompt 10
    sid = "" if column == "sample_id" else "s004"

    report = validate_dir(shard_dir)
    assert not report.ok and report.sample_faults == 1
    (fault,) = report.faults
    assert (fault.file, fault.kind) == (FIRST, "storage_rule")
    assert words in fault.message and f"sample {sid!r}" in fault.message
    assert report.samples == 12 and report.tally.samples == 11  # the others still re-checked

    code, doc, _ = run_cli("validate", shard_dir, "--json")
    assert code == 1 and doc["faults"][0]["message"] == fault.message

    reader = ShardReader(shard_dir)
    key = re.escape(words[:12])
    with pytest.raises(ShardError, match=f"{FIRST}: sample {sid!r}: .*{key}") as e:
        reader.routing(sid)
    assert e.value.kind == "storage_rule" and f"storage rule {rule!r}" in str(e.value)
    with pytest.raises(ShardError, match=key):
        reader[sid]
    assert reader["s003"].sample_id == "s003"  # same record batch, keeps every rule
    assert reader.routing("s003").shape[1:] == (4, 2)
    seen = []
    with pytest.raises(ShardError, match=key):
        for s in reader:
            seen.append(s.sample_id)
    assert seen == ["s000", "s001", "s002", "s003"]
    with pytest.raises(ShardError, match=key):
        list(reader.iter_batches())


@pytest.mark.parametrize("case", list(REWRITES))
def test_the_writer_refuses_what_validate_flags(tmp_path, tiny, samples, case):
    column, fn, rule, words = REWRITES[case]
    s = samples[4]
    bad = _edit_sample(s, column, fn, tiny)
    with ShardWriter(tmp_path / "w", tiny) as w:
        with pytest.raises(UnstorableSample, match=re.escape(words[:12])):
            w.add(bad)
        assert bad.sample_id not in w
        w.add(s)  # the id was not taken
        assert sample_break(bad, tiny).rule == rule
    assert ShardReader(tmp_path / "w").sample_ids() == ["s004"]


def _edit_sample(s, column, fn, geometry):
    if column == "routed":
        flat = fn(s.routed.reshape(-1).astype(np.int64).tolist())
        return dataclasses.replace(s, routed=np.asarray(flat).reshape(s.routed.shape))
    if column == "tokens":
        return dataclasses.replace(s, tokens=np.asarray(fn(s.tokens.tolist()), np.int32))
    if column == "logprobs":
        return dataclasses.replace(s, logprobs=np.asarray(fn(None), np.float32))
    if column == "weight_versions":
        return dataclasses.replace(s, weight_versions={"version": 1})
    return dataclasses.replace(s, **{column: fn(getattr(s, column))})


@pytest.mark.parametrize("case", list(REWRITES))
def test_one_rule_set_for_a_sample_and_a_record_batch(tiny, samples, case):
    """``batch_breaks`` (vectorised, what the reader and validate run) finds in a record batch
    exactly the rule ``sample_break`` (what the writer runs) finds in the sample."""
    column, fn, rule, _ = REWRITES[case]
    batch_samples = list(samples[:6])
    batch_samples[4] = _edit_sample(samples[4], column, fn, tiny)
    if column == "weight_versions":  # the schema stores it as JSON text
        batch_samples[4] = dataclasses.replace(batch_samples[4], weight_versions=None)
        batch = to_record_batch(batch_samples, tiny, schema_for(tiny))
        wv = batch.column("weight_versions").to_pylist()
        wv[4] = '{"version": 1}'
        batch = batch.set_column(10, "weight_versions", pa.array(wv, pa.string()))
    else:
        batch = to_record_batch(batch_samples, tiny, schema_for(tiny))
    (found,) = batch_breaks(batch, tiny)
    assert (found.row, found.rule) == (4, rule)
    if column != "weight_versions":
        assert found.message == sample_break(batch_samples[4], tiny).message
    assert batch_breaks(to_record_batch(samples, tiny, schema_for(tiny)), tiny) == []
    assert all(sample_break(s, tiny) is None for s in samples)


def test_rules_are_checked_in_their_documented_order(tiny, samples):
    s = samples[4]
    worst = dataclasses.replace(s, sample_id="", prompt_len=-1,
                                logprobs=np.zeros(50, np.float32))
    assert sample_break(worst, tiny).rule == "sample_id"
    assert sample_break(dataclasses.replace(worst, sample_id="x"), tiny).rule == "positions"
    assert RULES == ("sample_id", "fields", "tokens", "positions", "routing", "expert_ids",
                     "logprobs")


@pytest.mark.parametrize("edit, words", [
    (dict(policy_version=True), "policy_version must be a 64-bit integer"),
    (dict(policy_version=2**63), "policy_version must be a 64-bit integer"),
    (dict(group_id=5), "group_id must be a string or null"),
    (dict(engine=b"x"), "engine must be a string or null"),
    (dict(prompt_len=2.0), "need 0 <= routed_start"),
    (dict(routed_start=True), "need 0 <= routed_start"),
    (dict(tokens=np.array([1.5, 2.0])), "tokens must be a 1-D integer array"),
    (dict(tokens=np.arange(20, dtype=np.int64) + 2**31), "token id 2147483648 at position 0"),
    (dict(logprobs=np.array(["a"] * 3)), "logprobs must be a 1-D array of real numbers"),
    (dict(weight_versions=[{1, 2}]), "weight_versions is not JSON"),
])
def test_wrong_typed_fields_are_unstorable_and_lose_nothing(tmp_path, tiny, samples, edit,
                                                            words):
    with ShardWriter(tmp_path / "w", tiny, samples_per_shard=4) as w:
        w.add(samples[0])
        with pytest.raises(UnstorableSample, match=words):
            w.add(dataclasses.replace(samples[4], **edit))
        w.add(samples[1])
    assert ShardReader(tmp_path / "w").sample_ids() == ["s000", "s001"]


def test_ids_of_the_id_dtype_are_range_checked_too(tiny, samples):
    """uint8 ids need no narrowing, yet 8 experts leave 248 values that are no expert."""
    s = samples[4]
    r = s.routed.copy()
    r[3, 2, 1] = 9
    with pytest.raises(UnstorableSample, match=r"expert ids outside \[0, 8\): 9 at position 3, "
                       "layer 2"):
        conform(dataclasses.replace(s, routed=r), tiny)
    assert conform(s, tiny) is s.routed  # nothing copied for a sample that fits
