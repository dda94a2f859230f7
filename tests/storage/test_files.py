"""The storage package (uris, retries, files, atomic, digest) against the local disk and a real S3 endpoint (moto
on loopback), including real transient failures injected by a loopback HTTP proxy in front of moto."""

from __future__ import annotations

import http.client
import logging
import os
import pickle
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cxrage_ray.config import StorageConfig
from cxrage_ray.errors import EmptyFileError, ReadError
from cxrage_ray.storage.atomic import (
    atomic_path,
    current_umask,
    move_into_place,
    write_atomic,
)
from cxrage_ray.storage.digest import hash_file_into, sha256_file
from cxrage_ray.storage.files import (
    exists,
    filesystem_for,
    join_uri,
    list_files,
    parent_uri,
    read_bytes,
    write_bytes,
)
from cxrage_ray.storage.retries import RetryCounts, backoff_delay
from cxrage_ray.storage.uris import endpoint_of, protocol_of

# ---------------------------------------------------------------- StorageConfig


def test_from_pairs_types_values_and_nests_dotted_keys():
    cfg = StorageConfig.from_pairs(
        ["anon=true", "requester_pays=False", "max_concurrency=8", "timeout=2.5", "region=eu-west-1",
         "config_kwargs.retries.max_attempts=3", "token=a=b"]
    )
    opts = cfg.fs_options("s3")
    assert opts["anon"] is True and opts["requester_pays"] is False
    assert opts["max_concurrency"] == 8 and isinstance(opts["max_concurrency"], int)
    assert opts["timeout"] == 2.5
    assert opts["region"] == "eu-west-1"
    assert opts["config_kwargs"] == {"retries": {"max_attempts": 3}}
    assert opts["token"] == "a=b"  # only the first '=' splits


@pytest.mark.parametrize("bad", ["novalue", "=x", ""])
def test_from_pairs_rejects_malformed(bad):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        StorageConfig.from_pairs([bad])


def test_config_is_hashable_picklable_and_order_independent():
    a = StorageConfig.from_pairs(["b=1", "a=2"])
    b = StorageConfig(options={"a": 2, "b": 1})
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a


def test_repr_never_shows_secrets():
    cfg = StorageConfig.from_pairs(["key=AKIAEXAMPLE", "secret=hunter2", "token=t0k", "anon=false"])
    text = repr(cfg) + str(cfg.redacted())
    for secret in ("AKIAEXAMPLE", "hunter2", "t0k"):
        assert secret not in text
    assert "anon" in text


def test_from_env_takes_only_the_endpoint():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_SECRET_ACCESS_KEY": "hunter2", "AWS_ACCESS_KEY_ID": "AK"}
    cfg = StorageConfig.from_env_and_pairs(env, ["anon=true"])
    assert cfg.endpoint_url == "http://127.0.0.1:9"
    # botocore's own retries off: ours are the only ones, so every retry is counted
    assert cfg.fs_options("s3") == {"endpoint_url": "http://127.0.0.1:9", "anon": True,
                                    "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(pickle.dumps(cfg))
    # the S3-specific variable wins; other protocols never get an S3 endpoint, local ones get no options
    cfg = StorageConfig.from_env_and_pairs({**env, "AWS_ENDPOINT_URL_S3": "http://s3.local"}, ["anon=true"])
    assert cfg.fs_options("s3")["endpoint_url"] == "http://s3.local"
    assert "endpoint_url" not in cfg.fs_options("gs")
    assert cfg.fs_options("file") == {}
    assert StorageConfig.from_env_and_pairs({}, []).endpoint_url is None


def test_backoff_doubles_with_jitter_and_is_capped():
    cfg = StorageConfig(backoff_s=0.5)
    for attempt in range(4):
        d = backoff_delay(attempt, cfg)
        assert 0.25 * 2**attempt <= d <= 0.5 * 2**attempt
    assert backoff_delay(30, cfg) <= 30.0


def test_uri_helpers():
    assert join_uri("s3://b/dir", "img/../x.png") == "s3://b/dir/x.png"
    assert join_uri("s3://b/dir/", "./a/b.dcm") == "s3://b/dir/a/b.dcm"
    assert join_uri("/data/m", "../y/z.png") == "/data/y/z.png"
    assert parent_uri("s3://b/d/m.csv") == "s3://b/d"
    assert parent_uri("/x/y/m.parquet") == "/x/y"
    assert protocol_of("S3://b/k") == "s3" and protocol_of("/local/x") == "file"
    assert protocol_of("dicomweb+https://pacs/dicom-web") == "dicomweb+https"
    assert endpoint_of("s3://b/k", StorageConfig(endpoint_url="http://127.0.0.1:9/")) == "s3 endpoint 127.0.0.1:9"
    assert endpoint_of("https://user-free.example/a/b", StorageConfig()) == "https host user-free.example"


def test_dicomweb_uris_are_not_read_here():
    """storage never imports pacs: a DICOMweb instance uri is `cxrage_ray.pacs.read`'s to read."""
    with pytest.raises(ReadError, match="unsupported scheme 'dicomweb\\+http'"):
        read_bytes("dicomweb+http://127.0.0.1:9/dicom-web/studies/1/series/2/instances/3", StorageConfig())


# ---------------------------------------------------------------- local disk


def test_local_roundtrip_atomic_write_and_listing(tmp_path: Path):
    cfg = StorageConfig.from_pairs(["anon=true"])  # options must not reach the local filesystem
    target = tmp_path / "out" / "deep" / "a.bin"
    write_bytes(str(target), b"first", cfg)
    write_bytes(str(target), b"second", cfg)  # overwrite replaces whole
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]  # no temp file left behind
    assert read_bytes(str(target), cfg) == b"second"
    assert read_bytes(target.as_uri(), cfg) == b"second"  # file:// too
    (tmp_path / "out" / "b.txt").write_bytes(b"x")
    assert exists(str(target), cfg) and exists(str(tmp_path / "out"), cfg)
    assert not exists(str(tmp_path / "nope"), cfg)
    listed = list_files(str(tmp_path / "out"), cfg)
    assert listed == [str(tmp_path / "out" / "b.txt"), str(target)]
    assert list_files((tmp_path / "out").as_uri(), cfg) == [Path(p).as_uri() for p in listed]
    assert list_files(str(tmp_path / "missing"), cfg) == []


def test_local_errors(tmp_path: Path):
    cfg = StorageConfig(retries=3, backoff_s=0.01)
    with pytest.raises(ReadError, match=r"^not found: .*nope\.png$") as info:
        read_bytes(str(tmp_path / "nope.png"), cfg)
    assert not isinstance(info.value, EmptyFileError)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EmptyFileError, match="0 bytes"):
        read_bytes(str(tmp_path / "empty.png"), cfg)
    with pytest.raises(ReadError, match="folder"):
        read_bytes(str(tmp_path), cfg)


def test_failed_local_write_leaves_nothing(tmp_path: Path):
    (tmp_path / "blocker").write_bytes(b"a file where a folder should be")
    with pytest.raises(OSError):
        write_bytes(str(tmp_path / "blocker" / "x.bin"), b"data", StorageConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


# ---------------------------------------------------------------- atomic writes and digests


def test_write_atomic_replaces_whole_with_open_permissions(tmp_path: Path):
    target = tmp_path / "new" / "folder" / "part-1.parquet"
    write_atomic(target, b"one")
    write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert (target.stat().st_mode & 0o777) == 0o666 & ~current_umask()  # not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["part-1.parquet"]


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path: Path):
    target = tmp_path / "w.pth"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and not target.exists()
        # a reader globbing like the target (or like parts) never sees the half-written file
        assert not tmp.name.endswith(".pth") and not tmp.name.startswith("part-") and tmp.name.startswith(".")
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights"
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"weights"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temp file left


def test_move_into_place_renames_a_finished_file(tmp_path: Path):
    part = tmp_path / "w.pth.part"
    part.write_bytes(b"verified")
    move_into_place(part, tmp_path / "w.pth")
    assert not part.exists() and (tmp_path / "w.pth").read_bytes() == b"verified"


def test_sha256_file_and_resumed_hashing(tmp_path: Path):
    import hashlib

    data = os.urandom((1 << 20) * 2 + 17)  # over two read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256(b"prefix")
    hash_file_into(tmp_path / "f", digest)
    assert digest.hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


# ---------------------------------------------------------------- S3 (moto)


def test_s3fs_honours_aws_endpoint_url_by_itself(s3_env):
    bucket = s3_env.make_bucket("st-envonly")
    s3_env.put(f"s3://{bucket}/k.bin", b"payload")
    # no endpoint in the config: s3fs/botocore read AWS_ENDPOINT_URL from the environment themselves
    assert read_bytes(f"s3://{bucket}/k.bin", StorageConfig()) == b"payload"


def test_s3_read_write_list_exists(s3_env):
    cfg = StorageConfig.from_env_and_pairs(os.environ, [])
    assert cfg.endpoint_url == s3_env.endpoint
    bucket = s3_env.make_bucket("st-basic")
    write_bytes(f"s3://{bucket}/out/b/2.bin", b"two", cfg)
    write_bytes(f"s3://{bucket}/out/a.bin", b"one", cfg)
    s3_env.put(f"s3://{bucket}/other/c.bin", b"c")
    assert s3_env.get(f"s3://{bucket}/out/b/2.bin") == b"two"
    assert read_bytes(f"s3://{bucket}/out/a.bin", cfg) == b"one"
    assert list_files(f"s3://{bucket}/out", cfg) == [f"s3://{bucket}/out/a.bin", f"s3://{bucket}/out/b/2.bin"]
    assert list_files(f"s3://{bucket}/out/", cfg) == list_files(f"s3://{bucket}/out", cfg)
    assert list_files(f"s3://{bucket}/nothing-here", cfg) == []
    assert exists(f"s3://{bucket}/out/a.bin", cfg) and exists(f"s3://{bucket}/out", cfg)
    assert not exists(f"s3://{bucket}/out/zzz.bin", cfg)
    # a listing sees objects written behind this process's back (no stale directory cache)
    s3_env.put(f"s3://{bucket}/out/c.bin", b"late")
    assert f"s3://{bucket}/out/c.bin" in list_files(f"s3://{bucket}/out", cfg)
    fs, path = filesystem_for(f"s3://{bucket}/out/a.bin", cfg)
    assert path == f"{bucket}/out/a.bin" and fs.protocol[0] == "s3"


def test_s3_missing_and_empty(s3_env):
    cfg = StorageConfig.from_env_and_pairs(os.environ, [])
    bucket = s3_env.make_bucket("st-errors")
    s3_env.put(f"s3://{bucket}/empty.dcm", b"")
    with pytest.raises(ReadError, match=rf"^not found: s3://{bucket}/missing\.png$"):
        read_bytes(f"s3://{bucket}/missing.png", cfg)
    with pytest.raises(ReadError, match="^not found"):
        read_bytes("s3://st-no-such-bucket/x.png", cfg)
    with pytest.raises(EmptyFileError, match="0 bytes"):
        read_bytes(f"s3://{bucket}/empty.dcm", cfg)


# ---------------------------------------------------------------- real transient failures


class FlakyProxy:
    """HTTP proxy on loopback in front of moto: answers the first `fail[path]` requests for a path with an
    S3 error (status, code), then forwards. Records every request as (method, path)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.fail: dict[str, list[tuple[int, str]]] = {}
        self.seen: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self):
                path = self.path.split("?", 1)[0]
                proxy.seen.append((self.command, path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                queue = proxy.fail.get(path)
                if queue:
                    status, code = queue.pop(0)
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                               f"<Message>injected {code}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def requests_for(self, path: str, method: str = "GET") -> int:
        return sum(1 for m, p in self.seen if m == method and p == path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(s3_env):
    proxy = FlakyProxy(s3_env.endpoint)
    yield proxy
    proxy.close()


def _only_our_retries(endpoint: str, retries: int) -> StorageConfig:
    """botocore retries on its own; switch that off so every retry observed is ours (s3fs also retries
    SlowDown by itself, 5 tries, and has no option to change that: see the SlowDown test)."""
    return StorageConfig(
        options={"config_kwargs.retries.total_max_attempts": 1, "skip_instance_cache": True},
        endpoint_url=endpoint, retries=retries, backoff_s=0.01,
    )


@pytest.mark.parametrize("status,code", [(503, "ServiceUnavailable"), (500, "InternalError"), (502, "BadGateway"),
                                         (504, "GatewayTimeout")])
def test_read_retries_transient_errors_then_succeeds(s3_env, flaky, caplog, status, code):
    bucket = s3_env.make_bucket(f"st-flaky-{status}")
    s3_env.put(f"s3://{bucket}/img.png", b"pixels")
    flaky.fail[f"/{bucket}/img.png"] = [(status, code)] * 3
    cfg = _only_our_retries(flaky.endpoint, retries=4)
    with caplog.at_level(logging.WARNING, logger="cxrage_ray.storage.retries"):
        assert read_bytes(f"s3://{bucket}/img.png", cfg) == b"pixels"
    assert flaky.requests_for(f"/{bucket}/img.png") == 4, flaky.seen  # three injected failures, then the real object
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert "testing" not in caplog.text  # the secret key never reaches the log


def test_slowdown_outlasting_s3fs_own_retries_is_retried_by_ours(s3_env, flaky, caplog):
    bucket = s3_env.make_bucket("st-flaky-slowdown")
    s3_env.put(f"s3://{bucket}/img.png", b"pixels")
    # s3fs retries SlowDown 5 times itself; 7 failures exhaust that once, and our layer tries again
    flaky.fail[f"/{bucket}/img.png"] = [(503, "SlowDown")] * 7
    with caplog.at_level(logging.WARNING, logger="cxrage_ray.storage.retries"):
        assert read_bytes(f"s3://{bucket}/img.png", _only_our_retries(flaky.endpoint, retries=3)) == b"pixels"
    assert flaky.requests_for(f"/{bucket}/img.png") == 8
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 1


def test_read_gives_up_after_configured_retries(s3_env, flaky):
    bucket = s3_env.make_bucket("st-flaky-giveup")
    s3_env.put(f"s3://{bucket}/img.png", b"pixels")
    flaky.fail[f"/{bucket}/img.png"] = [(503, "ServiceUnavailable")] * 10
    with pytest.raises(ReadError, match=r"after 3 attempts \(throttled or unreachable\)"):
        read_bytes(f"s3://{bucket}/img.png", _only_our_retries(flaky.endpoint, retries=2))
    assert flaky.requests_for(f"/{bucket}/img.png") == 3


def test_missing_key_is_not_retried(s3_env, flaky):
    bucket = s3_env.make_bucket("st-flaky-missing")
    with pytest.raises(ReadError, match=rf"^not found: s3://{bucket}/gone\.png$"):
        read_bytes(f"s3://{bucket}/gone.png", _only_our_retries(flaky.endpoint, retries=5))
    assert flaky.requests_for(f"/{bucket}/gone.png") == 1


def test_write_retries_throttling(s3_env, flaky):
    bucket = s3_env.make_bucket("st-flaky-write")
    flaky.fail[f"/{bucket}/parts/p.parquet"] = [(503, "ServiceUnavailable")] * 2
    write_bytes(f"s3://{bucket}/parts/p.parquet", b"part", _only_our_retries(flaky.endpoint, retries=3))
    assert flaky.requests_for(f"/{bucket}/parts/p.parquet", "PUT") == 3
    assert s3_env.get(f"s3://{bucket}/parts/p.parquet") == b"part"


def test_connection_refused_is_retried_then_reported(s3_env, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    uri = f"s3://st-dead-{uuid.uuid4().hex[:6]}/x.png"
    with caplog.at_level(logging.WARNING, logger="cxrage_ray.storage.retries"):
        with pytest.raises(ReadError, match="after 3 attempts"):
            read_bytes(uri, _only_our_retries(dead, retries=2))
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2


# ---------------------------------------------------------------- error kinds and retry counts (issue 11)


def test_unsupported_scheme_is_a_read_error_naming_the_uri():
    with pytest.raises(ReadError, match=r"^cannot read gopher://host/x\.png: unsupported scheme 'gopher'$"):
        read_bytes("gopher://host/x.png", StorageConfig())
    with pytest.raises(ReadError, match="unsupported scheme 'gopher'"):  # an INPUT folder too (exit 2, not a trace)
        list_files("gopher://host/films/", StorageConfig())
    with pytest.raises(ReadError, match="unsupported scheme 'gopher'"):
        exists("gopher://host/films/", StorageConfig())


def test_local_errors_do_not_repeat_a_resolved_path(tmp_path: Path):
    (tmp_path / "locked.png").write_bytes(b"x")
    (tmp_path / "locked.png").chmod(0)
    try:
        if os.access(tmp_path / "locked.png", os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ReadError) as info:
            read_bytes((tmp_path / "locked.png").as_uri(), StorageConfig())
    finally:
        (tmp_path / "locked.png").chmod(0o644)
    # the uri as given, and no "[Errno 13] ...: '/abs/path'" behind it
    assert str(info.value) == f"permission denied: {(tmp_path / 'locked.png').as_uri()}"


def test_connection_refused_names_the_endpoint(s3_env):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counts = RetryCounts()
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01)
    with pytest.raises(ReadError) as info:
        read_bytes("s3://st-refused/x.png", cfg, counts)
    assert str(info.value).startswith("could not read s3://st-refused/x.png after 3 attempts")
    assert str(info.value).endswith(f"connection refused by s3 endpoint 127.0.0.1:{port}")
    assert counts == {"ConnectionRefused": 2}


def test_every_retry_is_ours_and_counted_by_kind(s3_env, flaky):
    """With default options botocore and s3fs do not retry behind our back: each injected fault is one
    request, one retry here, counted under its S3 error code."""
    bucket = s3_env.make_bucket("st-counted")
    s3_env.put(f"s3://{bucket}/img.png", b"pixels")
    flaky.fail[f"/{bucket}/img.png"] = [(503, "SlowDown")] * 2 + [(500, "InternalError")]
    counts = RetryCounts()
    cfg = StorageConfig(endpoint_url=flaky.endpoint, retries=4, backoff_s=0.01)
    assert read_bytes(f"s3://{bucket}/img.png", cfg, counts) == b"pixels"
    assert flaky.requests_for(f"/{bucket}/img.png") == 4
    assert counts == {"SlowDown": 2, "InternalError": 1}


def test_os_errors_say_what_happened_not_the_resolved_path():
    from cxrage_ray.storage.retries import _as_read_error

    error = _as_read_error(OSError(5, "Input/output error", "/abs/films/x.png"), "file:///abs/films/x.png", "read",
                           transient=False, attempts=1)
    assert str(error) == "could not read file:///abs/films/x.png: input/output error"
