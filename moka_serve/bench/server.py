"""Start an OpenAI-compatible server as a subprocess and wait until it answers ``/health``."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited or did not become healthy; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    cmd: list[str], env: dict, log: Path, port: int, timeout_s: float
) -> Iterator[str]:
    """Start ``cmd`` (logging to ``log``), wait for ``/health``, yield its URL, then stop it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-4000:]
                raise ServerError(f"server exited ({proc.returncode}):\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                tail = log.read_text(errors="replace")[-4000:]
                raise ServerError(f"server did not start in {timeout_s:.0f} s:\n{tail}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def children_rss_bytes() -> int:
    """Resident memory of every process this one started (the server and its engine)."""
    import psutil

    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total
