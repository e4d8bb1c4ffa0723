"""The S3-compatible server the storage tests run on (``tests/support/s3.py``): it answers on
loopback, pyarrow and boto3 reach it through the environment alone, child processes inherit
that environment, and every test gets a dataset URI nothing has written to."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from tests.support.processes import child_env

pytestmark = pytest.mark.timeout(120)


def test_server_is_on_loopback_and_the_environment_points_at_it(s3):
    assert s3.endpoint.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3.endpoint
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_PROFILE" not in os.environ


def test_pyarrow_writes_what_boto3_lists(s3):
    uri = s3.fresh_uri(label="roundtrip")
    fs, path = pafs.FileSystem.from_uri(f"{uri}/a/b.bin?endpoint_override={s3.endpoint}")
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_output_stream(path) as out:
        out.write(b"payload")
    assert s3.keys(uri) == ["a/b.bin"]
    assert s3.get(f"{uri}/a/b.bin") == b"payload"
    s3.put(f"{uri}/c.txt", b"x")
    assert s3.keys(uri) == ["a/b.bin", "c.txt"]
    with fs.open_input_file(path) as f:
        assert f.read() == b"payload"


def test_child_processes_reach_the_server_through_their_environment(s3):
    uri = s3.fresh_uri(label="child")
    s3.put(f"{uri}/seen.txt", b"hello")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    code = ("import boto3, sys; c = boto3.client('s3'); "  # endpoint, keys, region: environment
            f"r = c.list_objects_v2(Bucket={bucket!r}, Prefix={prefix!r}); "
            "print(*[o['Key'] for o in r['Contents']])")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{prefix}/seen.txt"]


def test_each_test_gets_a_fresh_dataset_uri(dataset_uri, request):
    if request.node.callspec.params["dataset_uri"] == "local":
        assert not os.path.exists(dataset_uri) and os.path.isabs(dataset_uri)
    else:
        s3 = request.getfixturevalue("s3")
        assert dataset_uri.startswith("s3://replay-bridge-tests/test-each-test-gets")
        assert s3.keys(dataset_uri) == []
        assert dataset_uri != s3.fresh_uri(label="test-each-test-gets-a-fresh-dataset-uri-s3")
