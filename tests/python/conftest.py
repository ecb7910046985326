"""Fixtures: a real `haven serve --catalog default` per test session, and a client factory.

HAVEN_BIN        path of the binary (default: <repo>/target/debug/haven)
HAVEN_TEST_LOGS  log folder root (default: <repo>/target/test-logs); the server log goes to
                 <root>/python/haven-<port>.log
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcp import Client

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = float(os.environ.get("HAVEN_READY_TIMEOUT", "60"))

# Both protocol eras on the same endpoint: the initialize/session era (the client offers
# 2025-11-25) and the stateless 2026-07-28 era.
MODES = ["legacy", "2026-07-28"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class HavenServer:
    url: str  # the MCP endpoint, http://127.0.0.1:PORT/mcp
    base: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _start_haven(data_dir: Path, log_dir: Path) -> HavenServer:
    binary = Path(os.environ.get("HAVEN_BIN", REPO_ROOT / "target" / "debug" / "haven"))
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"Haven binary not found at {binary} (run `cargo build --workspace` or set HAVEN_BIN)")
    last_error = "never started"
    for _attempt in range(3):  # a new port if the chosen one was taken before Haven bound it
        port = _free_port()
        log_path = log_dir / f"haven-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data", str(data_dir), "--catalog", "default"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        server = HavenServer(url=f"{base}/mcp", base=base, process=process, data_dir=data_dir, log_path=log_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                last_error = f"exited with status {process.returncode}:\n{server.log_tail()}"
                break
            if _http_status(f"{base}/readyz") == 200:
                return server
            time.sleep(0.2)
        else:
            _stop(process)
            pytest.fail(f"Haven not ready within {READY_TIMEOUT_S:.0f}s on {base}:\n{server.log_tail()}")
    pytest.fail(f"Haven did not start: {last_error}")


@pytest.fixture(scope="session")
def haven() -> Iterator[HavenServer]:
    """One Haven process for the whole test session (temp data dir, free port, 127.0.0.1)."""
    log_dir = Path(os.environ.get("HAVEN_TEST_LOGS", REPO_ROOT / "target" / "test-logs")) / "python"
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="haven-pytest-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        server = _start_haven(data_dir, log_dir)
        try:
            yield server
        finally:
            _stop(server.process)
    assert server.process.returncode is not None


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def make_client(haven: HavenServer, mode: str) -> Client:
    return Client(haven.url, mode=mode, read_timeout_seconds=30)
