"""Weights registry, cache folder, verified/resumable download over a real loopback HTTP server, resolution."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from cxrage_ray.errors import WeightsError
from cxrage_ray.model.registry import (
    DEFAULT_MODEL,
    WeightsSpec,
    fetch_weights,
    load_registry,
    model_card,
    resolve_weights,
    weights_home,
)

# a small synthetic "weights file" (deterministic bytes); the code under test reads in 1 MiB chunks either way
PAYLOAD = bytes((i * 7919 + 13) % 251 for i in range(300_000))


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files[path]` with optional Range support; records every request's Range header."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # simulate a dropped connection mid-body
            self.wfile.write(body[:srv.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.honour_range, srv.cut_after = {}, [], True, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def spec(server) -> WeightsSpec:
    server.files["/w.pth"] = PAYLOAD
    return WeightsSpec(id="tiny", file="tiny.pth", size=len(PAYLOAD), sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                       url=f"{server.base}/w.pth")


def test_registry_names_the_published_model():
    registry = load_registry()
    spec = registry[DEFAULT_MODEL]
    assert DEFAULT_MODEL == "plco-fine-tuned-120419" and spec.id == DEFAULT_MODEL
    assert spec.file == "PLCO_Fine_Tuned_120419.pth"
    assert spec.size == 257_734_705
    assert spec.sha256 == "0b5a0dbcb91709420c261c749bb9e8f9a8f9287617c2713b86a183c8dbfb7aa7"
    assert spec.url == ("https://media.githubusercontent.com/media/vineet1992/CXR-Age/main/development/models/"
                        "PLCO_Fine_Tuned_120419.pth")
    assert "MIT" in spec.license and "10.1016/j.jcmg.2021.01.008" in spec.citation
    card = model_card(spec)
    assert "Raghu" in card and spec.sha256 in card and "257,734,705" in card
    with pytest.raises(Exception):
        spec.size = 1  # frozen


def test_weights_home_precedence(tmp_path):
    assert weights_home({"CXRAGE_HOME": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/c/weights")
    assert weights_home({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/cxrage/weights")
    assert weights_home({"CXRAGE_HOME": "", "XDG_CACHE_HOME": "", "HOME": "/h"}) == Path("/h/.cache/cxrage/weights")
    assert weights_home({"CXRAGE_HOME": "~/cx"}) == Path.home() / "cx" / "weights"


def test_fetch_downloads_verifies_and_renames(spec, server, tmp_path):
    dest = fetch_weights(spec, tmp_path / "home", progress=False)
    assert dest == tmp_path / "home" / "tiny.pth"
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "home" / "tiny.pth.part").exists()
    assert server.requests == [("/w.pth", None)]
    sidecar = json.loads((tmp_path / "home" / "tiny.pth.sha256.json").read_text())
    assert sidecar["sha256"] == spec.sha256 and sidecar["size"] == len(PAYLOAD)
    # the download and its sidecar were written whole: nothing temporary is left beside them
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["tiny.pth", "tiny.pth.sha256.json"]
    # cached and verified: no second download
    assert fetch_weights(spec, tmp_path / "home", progress=False) == dest
    assert len(server.requests) == 1


def test_fetch_resumes_a_truncated_part_file_with_a_range_request(spec, server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny.pth.part").write_bytes(PAYLOAD[:123_457])
    dest = fetch_weights(spec, home, progress=True)  # with the progress bar, to exercise it
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/w.pth", "bytes=123457-")]


def test_fetch_restarts_when_the_server_ignores_range(spec, server, tmp_path):
    server.honour_range = False
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny.pth.part").write_bytes(b"\0" * 1000)  # wrong bytes: must be overwritten, not appended to
    assert fetch_weights(spec, home, progress=False).read_bytes() == PAYLOAD
    assert server.requests == [("/w.pth", "bytes=1000-")]


def test_fetch_of_a_complete_part_file_verifies_without_a_body(spec, server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny.pth.part").write_bytes(PAYLOAD)
    assert fetch_weights(spec, home, progress=False).read_bytes() == PAYLOAD
    assert server.requests == [("/w.pth", f"bytes={len(PAYLOAD)}-")]  # answered 416


def test_interrupted_download_keeps_the_part_and_the_next_fetch_resumes(spec, server, tmp_path):
    home = tmp_path / "home"
    server.cut_after = 100_000
    with pytest.raises(WeightsError, match=r"100,000 of 300,000 bytes .* resumes from there"):
        fetch_weights(spec, home, progress=False)
    assert (home / "tiny.pth.part").stat().st_size == 100_000
    assert not (home / "tiny.pth").exists()
    server.cut_after = None
    assert fetch_weights(spec, home, progress=False).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/w.pth", "bytes=100000-")


def test_sha256_mismatch_deletes_the_part_and_raises(spec, server, tmp_path):
    server.files["/w.pth"] = bytes(reversed(PAYLOAD))  # same size, other content
    home = tmp_path / "home"
    with pytest.raises(WeightsError, match=rf"expected 300,000 bytes with sha256 {spec.sha256}"):
        fetch_weights(spec, home, progress=False)
    assert not (home / "tiny.pth.part").exists() and not (home / "tiny.pth").exists()


def test_corrupt_resumed_prefix_is_caught_by_the_sha256(spec, server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny.pth.part").write_bytes(b"\1" * 5000)
    with pytest.raises(WeightsError, match="is not tiny"):
        fetch_weights(spec, home, progress=False)
    assert not (home / "tiny.pth.part").exists()


def test_oversized_download_is_refused(spec, server, tmp_path):
    server.files["/w.pth"] = PAYLOAD + b"extra"
    with pytest.raises(WeightsError, match="serves 300,005 bytes, but tiny has 300,000"):
        fetch_weights(spec, tmp_path / "home", progress=False)
    assert not (tmp_path / "home" / "tiny.pth.part").exists()
    assert not (tmp_path / "home" / "tiny.pth").exists()


def test_http_error_and_alternative_url(spec, server, tmp_path):
    expected = r"(?s)HTTP Error 404: Not Found\)\.\n.*cxrage weights fetch.*--weights PATH"
    with pytest.raises(WeightsError, match=expected):
        fetch_weights(spec, tmp_path / "home", progress=False, url=f"{server.base}/nope.pth")
    server.files["/mirror/w.pth"] = PAYLOAD
    dest = fetch_weights(spec, tmp_path / "home", progress=False, url=f"{server.base}/mirror/w.pth")
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/mirror/w.pth", None)


def test_resolve_explicit_path(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(b"weights")
    resolved = resolve_weights(str(path), tmp_path / "home", allow_fetch=False)
    assert resolved.path == path.resolve() and resolved.source == "explicit"
    assert resolved.sha256 == hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(WeightsError, match="weights file not found"):
        resolve_weights(str(tmp_path / "absent.pth"), tmp_path / "home", allow_fetch=True)


def test_resolve_without_cache_and_without_fetch_says_how_to_get_them(tmp_path):
    home = tmp_path / "home"
    spec = load_registry()[DEFAULT_MODEL]
    with pytest.raises(WeightsError) as info:
        resolve_weights(None, home, allow_fetch=False)
    message = str(info.value)
    assert "cxrage weights fetch" in message
    assert spec.url in message
    assert str(home / "PLCO_Fine_Tuned_120419.pth") in message
    assert "--weights PATH" in message and spec.sha256 in message
    assert not home.exists() or not any(home.iterdir())  # nothing was downloaded or created


def test_resolve_fetches_then_uses_the_verified_cache(spec, server, tmp_path):
    home = tmp_path / "home"
    first = resolve_weights(None, home, allow_fetch=True, spec=spec, progress=False)
    assert (first.source, first.sha256, first.path) == ("fetched", spec.sha256, home / "tiny.pth")
    second = resolve_weights(None, home, allow_fetch=False, spec=spec)
    assert (second.source, second.sha256, second.path) == ("cache", spec.sha256, home / "tiny.pth")
    assert len(server.requests) == 1


def test_cache_verification_is_remembered_by_size_and_mtime(spec, server, tmp_path):
    home = tmp_path / "home"
    path = fetch_weights(spec, home, progress=False)
    stat = path.stat()
    # same size and mtime, different bytes: the sidecar is trusted, proving the file is not re-hashed
    path.write_bytes(bytes(reversed(PAYLOAD)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resolve_weights(None, home, allow_fetch=False, spec=spec).source == "cache"
    # a new mtime invalidates the sidecar: the file is hashed again and refused, never used silently
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(WeightsError, match=r"is not the published tiny.*Delete it and run `cxrage weights fetch`"):
        resolve_weights(None, home, allow_fetch=True, spec=spec)
    assert len(server.requests) == 1  # and no silent re-download either


def test_resolve_never_falls_back_to_other_weights(spec, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "demo-random-seed0.pth").write_bytes(b"other weights")
    broken = replace(spec, url="http://127.0.0.1:9/unreachable.pth")  # discard port: connection refused
    with pytest.raises(WeightsError, match="downloading http://127.0.0.1:9/unreachable.pth failed"):
        resolve_weights(None, home, allow_fetch=True, spec=broken, progress=False)
