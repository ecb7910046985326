"""Federated upstreams through the real Python `mcp` client, in both protocol eras: a Python
FastMCP server over Streamable HTTP and `@modelcontextprotocol/server-everything` over stdio,
registered with Haven's admin API, called as `<upstream>__<tool>` through Haven's /mcp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import REPO_ROOT, HavenServer, _free_port, _start_haven, _stop, make_client
from mcp_types import TextContent

from mcp import MCPError

pytestmark = pytest.mark.anyio

TOOLS = Path(os.environ.get("HAVEN_TOOLS_DIR", REPO_ROOT / ".tools"))
NODE = TOOLS / "node22" / "node_modules" / ".bin" / "node"
EVERYTHING = TOOLS / "everything" / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
LOOPBACK = REPO_ROOT / "tests" / "upstreams" / "loopback.cjs"
FASTMCP = REPO_ROOT / "tests" / "upstreams" / "fastmcp_upstream.py"


def _admin(haven: HavenServer, method: str, path: str, body: dict | None = None) -> dict:
    token = (haven.data_dir / "admin.token").read_text().strip()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        haven.base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def federated() -> Iterator[HavenServer]:
    """A Haven of its own with two upstreams registered and their tools listed."""
    for p in (NODE, EVERYTHING):
        if not p.exists():
            pytest.fail(f"{p} is missing: run scripts/install-tools")
    log_dir = Path(os.environ.get("HAVEN_TEST_LOGS", REPO_ROOT / "target" / "test-logs")) / "python"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    fast = subprocess.Popen(
        [sys.executable, str(FASTMCP), "http", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory(prefix="haven-pytest-fed-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        haven = _start_haven(data_dir, log_dir)
        try:
            _admin(haven, "POST", "/admin/v1/registry", {"name": "fast", "transport": "http", "url": f"http://127.0.0.1:{port}/mcp"})
            _admin(
                haven,
                "POST",
                "/admin/v1/registry",
                {"name": "ev", "transport": "stdio", "command": str(NODE), "args": ["--require", str(LOOPBACK), str(EVERYTHING), "stdio"]},
            )
            deadline = time.monotonic() + 60
            while True:
                ups = _admin(haven, "GET", "/admin/v1/registry")["upstreams"]
                if all((u.get("status") or {}).get("state") == "connected" for u in ups):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"upstreams not connected: {ups}\n{haven.log_tail()}")
                time.sleep(0.2)
            yield haven
        finally:
            _stop(haven.process)
            fast.terminate()
            try:
                fast.wait(timeout=5)
            except subprocess.TimeoutExpired:
                fast.kill()
                fast.wait(timeout=5)


def _text(result) -> str:
    return "".join(b.text for b in result.content if isinstance(b, TextContent))


async def test_federated_tools_are_listed_with_their_prefix(federated: HavenServer, mode: str) -> None:
    async with make_client(federated, mode) as client:
        names = set()
        with anyio.fail_after(30):
            while not {"fast__add", "ev__echo"} <= names:
                names = {t.name for t in (await client.list_tools()).tools}
                if not {"fast__add", "ev__echo"} <= names:
                    await anyio.sleep(0.2)
        assert "echo" in names  # Haven's own tools stay unprefixed


async def test_a_fastmcp_tool_is_called_through_haven(federated: HavenServer, mode: str) -> None:
    async with make_client(federated, mode) as client:
        result = await client.call_tool("fast__add", {"a": 19, "b": 23})
        assert not result.is_error, _text(result)
        assert "42" in _text(result)


async def test_a_stdio_server_everything_tool_is_called_through_haven(federated: HavenServer, mode: str) -> None:
    async with make_client(federated, mode) as client:
        result = await client.call_tool("ev__echo", {"message": f"hello {mode}"})
        assert not result.is_error, _text(result)
        assert _text(result) == f"Echo: hello {mode}"


async def test_an_upstream_tool_error_reaches_the_client(federated: HavenServer, mode: str) -> None:
    async with make_client(federated, mode) as client:
        try:
            result = await client.call_tool("fast__add", {"a": "not a number", "b": 1})
        except MCPError as e:  # a JSON-RPC error is as good as an error result
            assert str(e)
        else:
            assert result.is_error, _text(result)
