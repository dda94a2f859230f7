"""A real Orthanc with its DICOMweb plugin on loopback, for the PACS tests (no mocks).

`OrthancServer` starts `Orthanc` on free loopback ports with a temporary config and storage folder, can be
stopped and started again on the same ports and storage (to test an archive going away mid-job), and
uploads DICOM files through Orthanc's REST API. `orthanc_binary()` skips the calling test with a clear
reason when Orthanc or the plugin is not installed (CI installs both: see .ci/run).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str:
    """Path of the Orthanc executable; skips the test when Orthanc or its DICOMweb plugin is missing."""
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; CI does: see .ci/run)")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip(f"the Orthanc DICOMweb plugin is not installed at {DICOMWEB_PLUGIN} (apt-get install orthanc-dicomweb)")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OrthancServer:
    """One Orthanc process on loopback.

    Args:
        folder: holds config.json, the storage/index and orthanc.log.
        binary: the Orthanc executable.
        limit_find_instances: Orthanc's LimitFindInstances (QIDO-RS results per request at most; 0 = no cap).
    """

    folder: Path
    binary: str
    limit_find_instances: int = 0
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_root(self) -> str:
        """The DICOMweb root as cxrage spells it (``dicomweb+http://127.0.0.1:PORT/dicom-web``)."""
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self, timeout_s: float = 30.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxrage-test", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LimitFindInstances": self.limit_find_instances, "LimitFindResults": self.limit_find_instances,
            "ConcurrentJobs": 1, "HttpThreadsCount": 8,
        }
        (self.folder / "config.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([self.binary, str(self.folder / "config.json")], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start-up; see {self.folder / 'orthanc.log'}")
            try:
                if requests.get(f"{self.rest}/system", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s}s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, data: bytes) -> dict:
        """POST one DICOM file to /instances; returns Orthanc's answer (``Status``: Success / AlreadyStored)."""
        response = requests.post(f"{self.rest}/instances", data=data, timeout=60)
        response.raise_for_status()
        return response.json()

    def upload_many(self, files: list[bytes], threads: int = 8) -> list[dict]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.upload, files))

    def qido_instances(self, **filters: str) -> list[dict]:
        response = requests.get(f"{self.rest}/dicom-web/instances", params=filters, timeout=60)
        response.raise_for_status()
        return response.json() if response.content else []


class ArchiveOutage:
    """A loopback HTTP proxy in front of a real `OrthancServer` that stops Orthanc after `retrieves_before_stop`
    WADO-RS instance retrieves have been answered: the archive going down in the middle of a job, at a
    deterministic point. Requests that reach the stopped archive get their connection dropped, as a client of
    a dead server sees it. `root` is the DICOMweb root to give cxrage.
    """

    def __init__(self, orthanc: OrthancServer, retrieves_before_stop: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.orthanc = orthanc
        self.remaining = retrieves_before_stop
        self.lock = threading.Lock()
        outage = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                outage.forward(self, "GET")

            def do_POST(self) -> None:
                outage.forward(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def root(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def forward(self, handler, method: str) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0)) if method == "POST" else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        try:
            upstream = requests.request(method, self.orthanc.rest + handler.path, data=body, headers=headers,
                                        timeout=60)
        except requests.ConnectionError:
            handler.close_connection = True  # no answer at all: the archive is down
            return
        handler.send_response(upstream.status_code)
        for key, value in upstream.headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "content-encoding"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(upstream.content)))
        handler.end_headers()
        handler.wfile.write(upstream.content)
        handler.wfile.flush()
        if method == "GET" and "/instances/" in handler.path and not handler.path.endswith("/metadata"):
            with self.lock:
                self.remaining -= 1
                if self.remaining == 0:
                    self.orthanc.stop()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
