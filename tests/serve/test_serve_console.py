"""`cxrage serve --weights demo` as a user starts it in a terminal: every answer and the page say the weights are
the demo ones, the console shows only our own lines (no Ray or Ray Serve log lines, no colour codes), and Ctrl-C
ends it cleanly, Serve before Ray (issue 25).

Its own server (one per module, as in test_serve.py), on the demo weights, in its own process group so that
Ctrl-C can be sent the way a terminal sends it: to the whole foreground group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrage_ray.report.page import demo_banner_html
from processes import wait_until_healthy
from imagegen import pillow_bytes, radiograph

requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90
ANSI_ESCAPE = re.compile(r"\x1b\[")
#: Lines of Ray's own that must not reach the terminal: forwarded worker/raylet output, Serve's INFO lines.
RAY_MARKERS = ("(raylet)", "ServeController", "ServeReplica", "ProxyActor", "INFO ", "WARNING ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`cxrage serve --weights demo` on a free loopback port; yields (base URL, stdout path, stderr path, process).
    The test that stops it reads the exit code; if a test failed first it is stopped here."""
    root = tmp_path_factory.mktemp("demo-serve")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               CXRAGE_HOME=str(root / "home"))
    port = _free_port()
    out_path, err_path = root / "stdout.txt", root / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cxrage_ray.cli", "serve", "--weights", "demo",
                                 "--port", str(port), "--num-cpus", "4"],
                                env=env, stdout=out, stderr=err, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, err_path, START_TIMEOUT_S)
        yield base, out_path, err_path, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_every_answer_and_the_page_say_demo(demo_server):
    base, _, _, _ = demo_server
    film = pillow_bytes(radiograph(520, 480, seed=4), "PNG")
    answer = requests.post(f"{base}/v1/score", files=[("files", ("film.png", film)),
                                                     ("files", ("notes.txt", b"not a picture"))], timeout=120)
    assert answer.status_code == 200
    scored, refused = answer.json()
    assert scored["status"] == "ok" and refused["status"] == "error"
    assert scored["weights_name"] == refused["weights_name"] == "demo"  # as every batch row scored with them
    alone = requests.post(f"{base}/v1/score", files=[("files", ("empty.png", b""))], timeout=60)
    assert alone.status_code == 415 and alone.json()["weights_name"] == "demo"
    assert requests.get(f"{base}/v1/model", timeout=60).json()["weights_name"] == "demo"
    page = requests.get(base, timeout=60).text
    assert demo_banner_html() in page  # the report's banner: same wording, same style
    assert page.index('id="demo-weights-banner"') < page.index("<h1>")


def test_the_console_is_quiet_and_ctrl_c_stops_cleanly(demo_server):
    base, out_path, err_path, proc = demo_server
    requests.get(f"{base}/v1/model", timeout=60)  # a request, so the replicas had something to log
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
    code = proc.wait(timeout=STOP_TIMEOUT_S)
    out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    assert code in (0, 130), (code, err[-3000:])
    for text in (out, err):
        assert not ANSI_ESCAPE.search(text), text[-3000:]
        assert not [m for m in RAY_MARKERS if m in text], text[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("cxrage: ") for line in lines), lines
    assert any("serving on" in line for line in lines)
    logs = next(line for line in lines if "Ray Serve's logs: " in line).split("Ray Serve's logs: ", 1)[1]
    driver_log = Path(logs) / "cxrage-serve-driver.log"
    assert "is ready" in driver_log.read_text()  # Serve's own lines went to its log folder, not the terminal
