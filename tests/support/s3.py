"""An S3-compatible server on loopback for the tests: ``moto``'s server mode in its own process.

:func:`s3_server` starts ``python -m moto.server`` on a free port of 127.0.0.1, waits until it
answers, and yields an :class:`S3Server`: its endpoint, the environment that points pyarrow and
boto3 at it (dummy credentials, the endpoint in ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
no profile or config file of the machine), buckets made with boto3, and the keys under a prefix.
Nothing outside loopback is ever reached.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replay_bridge.client import NotHealthyError, free_port, wait_healthy

from .processes import stop

__all__ = ["S3Server", "s3_env", "s3_server"]

REGION = "us-east-1"


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables that point pyarrow's and boto3's S3 clients at ``endpoint``: dummy keys,
    one region, and no credentials or config of the machine (no profile, no instance
    metadata)."""
    missing = str(Path(tempfile.gettempdir()) / "replay-bridge-tests-no-aws-config")
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": missing,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
    }


UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
         "AWS_WEB_IDENTITY_TOKEN_FILE")
"""Variables of the machine that would override :func:`s3_env`'s dummy keys."""


@dataclass
class S3Server:
    """A running S3-compatible server: ``endpoint`` (``http://127.0.0.1:PORT``)."""

    endpoint: str
    process: subprocess.Popen
    log: Path
    buckets: set[str] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def apply(self, environ: dict[str, str] | Any) -> None:
        """Point ``environ`` (``os.environ``, a child's env, a ``MonkeyPatch``) at this
        server."""
        setenv = getattr(environ, "setenv", None) or environ.__setitem__
        delenv = getattr(environ, "delenv", None)
        for name in UNSET:
            if delenv is not None:
                delenv(name, raising=False)
            else:
                environ.pop(name, None)
        for name, value in self.env.items():
            setenv(name, value)

    def client(self) -> Any:
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing-secret")

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (once); return it."""
        if name not in self.buckets:
            self.client().create_bucket(Bucket=name)
            self.buckets.add(name)
        return name

    def fresh_uri(self, bucket: str = "replay-bridge-tests", label: str = "dataset") -> str:
        """``s3://bucket/<label>-<unique>``: a prefix nothing has written to."""
        self.create_bucket(bucket)
        return f"s3://{bucket}/{label}-{uuid.uuid4().hex[:12]}"

    def keys(self, uri: str) -> list[str]:
        """Every object key under ``s3://bucket/prefix``, relative to the prefix, sorted;
        the empty "directory marker" objects pyarrow's ``create_dir`` makes (keys ending in
        ``/``) are left out."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = self.client().get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"][len(prefix):] for o in page.get("Contents", [])
                    if not o["Key"].endswith("/")]
        return sorted(out)

    def put(self, uri: str, data: bytes) -> None:
        """Write one object ``s3://bucket/key`` directly (as a foreign or crashed writer
        would)."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@contextlib.contextmanager
def s3_server(timeout: float = 60.0) -> Iterator[S3Server]:
    """Run ``moto``'s S3 server on a free loopback port for the duration of the block."""
    try:
        import moto  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the S3 tests need moto's server: pip install -e '.[test]' "
                           f"(moto[server]): {e}") from e
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="moto-server-", suffix=".log")[1])
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
    server = S3Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        try:
            wait_healthy(server.endpoint, proc, timeout=timeout, path="/moto-api/")
        except NotHealthyError as e:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"moto's S3 server did not start: {e}\n{tail}") from e
        yield server
    finally:
        stop(proc)
        log.unlink(missing_ok=True)


