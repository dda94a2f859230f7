"""An S3-compatible server on loopback (moto's ThreadedMotoServer) for tests that need object storage.

`s3_server` (session): the running server's endpoint URL.
`s3_env` (per test): AWS_* variables pointing at it (via monkeypatch) and an `S3Helper` with a boto3 client,
an s3fs filesystem and `make_bucket(name)`. The server is shared: use bucket names unique to your test.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class S3Helper:
    endpoint: str
    client: Any  # boto3 S3 client
    fs: Any  # s3fs.S3FileSystem, not from fsspec's instance cache

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (>= 3 characters) if needed; returns the name."""
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if name not in existing:
            self.client.create_bucket(Bucket=name)
        return name

    def put(self, uri: str, data: bytes) -> str:
        """Upload `data` to ``s3://bucket/key``; returns the uri."""
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return uri

    def get(self, uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Helper]:
    import boto3
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    yield S3Helper(endpoint=s3_server, client=client, fs=fs)
