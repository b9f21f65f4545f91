"""Local Ray clusters for tests, started with ``ray start`` and stopped by PID.

The deployment tests attach to a two-node cluster; the in-process simulations of the suite
attach to one single-node cluster for the whole session (:func:`conftest.ray_address`), so
they pay for Ray's start once instead of once per run.  Each cluster has a temporary
directory of its own (in every one of its processes' command lines) and fixed port blocks,
so stopping it never touches another Ray on the machine (``ray stop`` would stop them all).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedtune.runtime.processes import stop_processes


@dataclass
class RayCluster:
    address: str
    temp_dir: str

    def pids(self) -> set[int]:
        """This cluster's processes (its temp dir or its address is in their command lines) and their children."""
        own = {p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
               if self.temp_dir in " ".join(p.info["cmdline"] or []) or self.address in " ".join(p.info["cmdline"] or [])}
        children = set()
        for pid in own:
            try:
                children.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return own | children


def free_port(lo: int, hi: int, span: int = 1) -> int:
    """The first port p in [lo, hi) with p..p+span-1 all free on 127.0.0.1."""
    for port in range(lo, hi - span):
        try:
            for p in range(port, port + span):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {span} free ports in [{lo}, {hi})")


def _ray(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _ray_ports(base: int) -> list[str]:
    """A node's ports, ``base`` to ``base + 39``."""
    return ["--node-manager-port", str(base), "--object-manager-port", str(base + 1),
            "--runtime-env-agent-port", str(base + 2), "--dashboard-agent-grpc-port", str(base + 3),
            "--dashboard-agent-listen-port", str(base + 4), "--metrics-export-port", str(base + 5),
            "--min-worker-port", str(base + 10), "--max-worker-port", str(base + 39)]


@contextmanager
def local_ray_cluster(node_cpus: list[int], head_ports: tuple[int, int], port_blocks: list[int],
                      object_store_mb: int = 100) -> Iterator[RayCluster]:
    """A Ray head (``node_cpus[0]`` CPUs, its GCS port free in ``head_ports``) and one more
    node per further entry, node ``i`` on the 40 ports from ``port_blocks[i]``."""
    temp_dir = tempfile.mkdtemp(prefix="ftray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head = free_port(*head_ports)
    cluster = RayCluster(f"127.0.0.1:{head}", temp_dir)
    env = {**os.environ, "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(2 * object_store_mb * 2**20),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    store = ["--object-store-memory", str(object_store_mb * 2**20)]
    try:
        _ray(["start", "--head", "--node-ip-address=127.0.0.1", f"--port={head}", f"--num-cpus={node_cpus[0]}",
              "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={head + 1}",
              f"--temp-dir={temp_dir}", *store, *_ray_ports(port_blocks[0])], env)
        for cpus, block in zip(node_cpus[1:], port_blocks[1:]):
            _ray(["start", f"--address={cluster.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                  "--num-gpus=0", *store, *_ray_ports(block)], env)
        yield cluster
    finally:  # all at once, 2 s grace: gcs_server, raylet and the autoscaler monitor outlast 10 s of SIGTERM anyway
        stop_processes(sorted(cluster.pids()), timeout_s=2)
        shutil.rmtree(temp_dir, ignore_errors=True)
