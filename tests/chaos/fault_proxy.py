"""A fault-injecting HTTP proxy on loopback, in front of the loopback S3 server (moto), for chaos tests.

In:  the upstream endpoint and a plan: for an object path (``/bucket/key``), the faults its successive GETs
     meet, in order: ``"slowdown"`` (503 with an S3 ``SlowDown`` error body), ``"reset"`` (200 with the whole
     Content-Length announced, half the body sent, then the TCP connection reset), ``"slow"`` (the whole body,
     dribbled out over `slow_s` seconds). A GET with no fault left is forwarded untouched; so is every other
     request.
Out: `injected`, a count of the faults served by kind. Deterministic (the plan is consumed in request
     order per path) and bounded: each path meets at most len(plan[path]) faults, every upstream call has a
     timeout, and the server runs on daemon threads stopped by `close()`.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Pieces a slow body is cut into (each followed by a pause of slow_s / SLOW_PIECES).
SLOW_PIECES = 8
#: Seconds any one upstream exchange may take before the proxy gives up on it.
UPSTREAM_TIMEOUT_S = 30
#: Response headers the proxy sets itself rather than copying from upstream.
_HOP_HEADERS = frozenset({"transfer-encoding", "connection", "content-length", "server", "date", "keep-alive"})


class FaultProxy:
    """See the module docstring. Use as a context manager, or call `close()`."""

    def __init__(self, upstream: str, plan: dict[str, list[str]], slow_s: float = 1.0):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.plan = {path: list(faults) for path, faults in plan.items()}
        self.slow_s = slow_s
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fault-proxy")
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def next_fault(self, method: str, path: str) -> str | None:
        """The fault for this request (consumed from the plan), or None to forward it untouched."""
        if method != "GET":
            return None
        with self._lock:
            faults = self.plan.get(path)
            if not faults:
                return None
            fault = faults.pop(0)
            self.injected[fault] += 1
            return fault

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.next_fault(self.command, self.path.split("?", 1)[0])
                if fault == "slowdown":
                    self._slowdown()
                    return
                status, headers, data = self._forward(body)
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "reset":
                    self._reset_after(data[: len(data) // 2])
                elif fault == "slow":
                    self._dribble(data)
                else:
                    self.wfile.write(data)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
                    return resp.status, kept, data
                finally:
                    conn.close()

            def _slowdown(self) -> None:
                payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                           b"<Message>Please reduce your request rate.</Message></Error>")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reset_after(self, part: bytes) -> None:
                """Send `part` of the announced body, then reset the connection (RST, not a clean close)."""
                self.wfile.write(part)
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _dribble(self, data: bytes) -> None:
                step = max(1, -(-len(data) // SLOW_PIECES))
                for start in range(0, len(data), step):
                    self.wfile.write(data[start : start + step])
                    self.wfile.flush()
                    time.sleep(proxy.slow_s / SLOW_PIECES)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler
