"""A real multi-process Ray cluster on loopback, started the way a cloud node starts it (`ray start`), for the
cluster tests and `benchmarks/chaos.py` (issue 23).

In:  a short scratch folder (Ray's socket paths must stay under ~100 characters) and the environment every node
     gets (AWS_* for a loopback S3, PATH with this venv's `python` first).
Out: `LoopbackCluster`: a head with the job API (`job_api`) and worker nodes, each a `ray start --block` process
     whose descendants are that node's processes; `kill_node` SIGKILLs one node's whole tree at once (a preempted
     spot node), `stop_node` ends it like `ray stop` does (SIGTERM, then SIGKILL after a grace period), `close`
     ends every process any node ever started, by PID.

Every port a node opens is chosen free here (the GCS, raylet, object manager, client server, dashboard and its
agents, runtime-env agent, metrics, a worker port list, and the autoscaler's and dashboard's metrics ports that
Ray otherwise fixes at 44217/44227). `ray stop` is never run: it stops every Ray on the machine, other people's
too. A head restarted on the same ports is a new cluster (no GCS fault tolerance without Redis): the worker
nodes of the old one are stopped with it and started again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
#: worker processes a node may run at once (prestarted CPU workers, actors, the job's supervisor and driver)
WORKER_PORTS_PER_NODE = 32


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on loopback a moment ago (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    """One `ray start --block` process and what it started."""

    name: str
    args: list[str]
    proc: subprocess.Popen
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant ever recorded, by pid

    def record(self) -> list[psutil.Process]:
        """The node's live processes now (the `ray start` process and its descendants), remembered for `close`."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            self.seen.setdefault(proc.pid, proc)
        return tree


class LoopbackCluster:
    """Head + worker nodes on 127.0.0.1, each in its own session (so no signal to the test reaches them)."""

    def __init__(self, root: Path, env: dict[str, str], *, head_cpus: int = 0) -> None:
        self.root = Path(root)
        self.temp_dir = self.root / "ray"  # every node's sessions and logs (Ray takes the head's for all nodes)
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.head_cpus = head_cpus
        self.gcs_port, self.dashboard_port, autoscaler_metrics, dashboard_metrics = free_ports(4)
        self.env.update(AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics))
        self.nodes: list[Node] = []
        self.head: Node | None = None
        self.submissions = 0

    # ------------------------------------------------------------------------------------------------ nodes

    @property
    def job_api(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _node_ports(self) -> list[str]:
        ports = free_ports(7 + WORKER_PORTS_PER_NODE)
        named = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        args = [f"{flag}={port}" for flag, port in zip(named, ports)]
        return [*args, f"--worker-port-list={','.join(map(str, ports[7:]))}"]

    def _start(self, name: str, args: list[str]) -> Node:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        log.close()
        node = Node(name, args, proc)
        self.nodes.append(node)
        return node

    def start_head(self) -> Node:
        client_port = free_ports(1)[0]
        args = [f"--head", f"--port={self.gcs_port}", f"--ray-client-server-port={client_port}",
                f"--num-cpus={self.head_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", *self._node_ports()]
        self.head = self._start("head", args)
        self._wait(lambda: self._alive_nodes() >= 1, "the head's job API", self.head)
        return self.head

    def add_worker(self, num_cpus: int) -> Node:
        before = self._alive_nodes()
        node = self._start(f"worker{len(self.nodes)}", [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                                                         *self._node_ports()])
        self._wait(lambda: self._alive_nodes() > before, f"{node.name} to join", node)
        return node

    def _alive_nodes(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.job_api}/api/v0/nodes?limit=100", timeout=5) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(n.get("state") == "ALIVE" for n in nodes)

    def _wait(self, ready, what: str, node: Node, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while not ready():
            if node.proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {node.name} exited {node.proc.returncode}: "
                                   f"{(self.root / f'{node.name}.log').read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {limit_s:.0f}s for {what}")
            time.sleep(0.5)
        node.record()

    def kill_node(self, node: Node) -> int:
        """SIGKILL every process of `node` at once, as when a spot instance is reclaimed; returns how many."""
        tree = node.record()
        for proc in tree:  # stopped first: none can fork or notice its siblings dying while they are killed
            _signal(proc, signal.SIGSTOP)
        for proc in tree:
            _signal(proc, signal.SIGKILL)
        node.proc.wait(timeout=30)
        return len(tree)

    def stop_node(self, node: Node, grace_s: float = 15) -> None:
        """End `node` as `ray stop` would: SIGTERM to each of its processes, SIGKILL to what is left after grace_s."""
        tree = node.record()
        for proc in tree:
            _signal(proc, signal.SIGTERM)
        _gone, left = psutil.wait_procs(tree, timeout=grace_s)
        for proc in left:
            _signal(proc, signal.SIGKILL)
        node.proc.wait(timeout=30)

    def restart_head(self, worker_cpus: list[int]) -> None:
        """`ray stop` + `ray start` on the head (same ports): a new cluster, whose workers start again too."""
        for node in [n for n in self.nodes if n is not self.head and n.proc.poll() is None]:
            self.stop_node(node)
        self.stop_node(self.head)
        self.start_head()
        for cpus in worker_cpus:
            self.add_worker(cpus)

    def close(self) -> list[int]:
        """End every process any node started (live ones recorded now too); returns the pids still alive after."""
        for node in self.nodes:
            node.record()
        every = [proc for node in self.nodes for proc in node.seen.values()]
        every += self._strays({proc.pid for proc in every})
        for proc in every:
            _signal(proc, signal.SIGKILL)
        psutil.wait_procs(every, timeout=10)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return [proc.pid for proc in every if _running(proc)]

    def _strays(self, known: set[int]) -> list[psutil.Process]:
        """Processes outside every recorded tree whose command line names this cluster's folder (re-parented orphans
        of a killed node, say): ended with the rest."""
        strays = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] not in known and proc.info["pid"] != os.getpid() and \
                    any(str(self.root) in part for part in proc.info["cmdline"] or []):
                strays.append(proc)
        return strays

    # ------------------------------------------------------------------------------------------------- jobs

    def submit(self, working_dir: Path, entrypoint: list[str], timeout_s: float, *, wait: bool = True
               ) -> subprocess.Popen | subprocess.CompletedProcess:
        """`ray job submit --address JOB_API --working-dir WORKING_DIR -- ENTRYPOINT`, run from `working_dir`."""
        cmd = [RAY, "job", "submit", f"--address={self.job_api}", "--working-dir", ".", "--", *entrypoint]
        if not wait:  # its output goes to a file (a pipe nobody reads while waiting would fill and block it)
            self.submissions += 1
            log_path = self.root / f"submit-{self.submissions}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, env=self.env, cwd=working_dir, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            proc.log_path = log_path  # type: ignore[attr-defined]
            return proc
        return subprocess.run(cmd, env=self.env, cwd=working_dir, capture_output=True, text=True, timeout=timeout_s)


def _signal(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.Error:
        pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
