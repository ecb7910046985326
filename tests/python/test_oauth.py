"""Haven as an OAuth 2.1 resource server, with a third-party issuer (npm `oauth2-mock-server`)
issuing client-credentials tokens, used by the real Python `mcp` 2.3 client in both eras."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from conftest import MODES, REPO_ROOT, READY_TIMEOUT_S, _free_port, _http_status, _stop
from mcp.client.streamable_http import streamable_http_client

from mcp import Client

pytestmark = pytest.mark.anyio

TOOLS = Path(os.environ.get("HAVEN_TOOLS_DIR", REPO_ROOT / ".tools"))
NODE = TOOLS / "node22" / "node_modules" / ".bin" / "node"
MOCK = TOOLS / "oauth2-mock-server" / "node_modules" / "oauth2-mock-server" / "dist" / "index.mjs"


@dataclass
class Protected:
    url: str
    issuer: str
    admin_token: str


@pytest.fixture(scope="module")
def protected() -> Iterator[Protected]:
    if not (NODE.exists() and MOCK.exists()):
        pytest.fail(f"oauth2-mock-server or Node 22 missing under {TOOLS} (run scripts/install-tools)")
    issuer_proc = subprocess.Popen(
        [str(NODE), str(Path(__file__).with_name("oauth_issuer.mjs")), str(MOCK)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert issuer_proc.stdout is not None
        issuer = issuer_proc.stdout.readline().decode().strip()
        assert issuer.startswith("http://127.0.0.1:"), f"the issuer did not start: {issuer!r}"
        binary = Path(os.environ.get("HAVEN_BIN", REPO_ROOT / "target" / "debug" / "haven"))
        log_dir = Path(os.environ.get("HAVEN_TEST_LOGS", REPO_ROOT / "target" / "test-logs")) / "python"
        log_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="haven-oauth-") as tmp:
            port = _free_port()
            base = f"http://127.0.0.1:{port}"
            with open(log_dir / f"haven-oauth-{port}.log", "wb") as log:
                haven = subprocess.Popen(
                    [
                        str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data", str(Path(tmp) / "data"),
                        "--catalog", "default", "--oauth-issuer", issuer,
                        "--oauth-resource", f"{base}/mcp", "--oauth-scopes", "mcp",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                deadline = time.monotonic() + READY_TIMEOUT_S
                while _http_status(f"{base}/readyz") != 200:
                    assert haven.poll() is None, "haven exited"
                    assert time.monotonic() < deadline, "haven not ready"
                    time.sleep(0.2)
                admin_token = (Path(tmp) / "data" / "admin.token").read_text().strip()
                yield Protected(url=f"{base}/mcp", issuer=issuer, admin_token=admin_token)
            finally:
                _stop(haven)
    finally:
        _stop(issuer_proc)


def client_credentials(issuer: str, client_id: str, scope: str, audience: str) -> str:
    """A token from the issuer's token endpoint (client-credentials grant)."""
    body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": scope, "aud": audience}).encode()
    request = urllib.request.Request(f"{issuer}/token", data=body, method="POST")
    request.add_header("content-type", "application/x-www-form-urlencoded")
    request.add_header("authorization", "Basic " + base64.b64encode(f"{client_id}:secret".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["access_token"]


def bearer_client(url: str, token: str, mode: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return Client(streamable_http_client(url, http_client=http), mode=mode, read_timeout_seconds=30)


@pytest.mark.parametrize("mode", MODES)
async def test_a_client_credentials_token_opens_haven_in_both_eras(protected: Protected, mode: str) -> None:
    token = client_credentials(protected.issuer, "agent-a", "mcp", protected.url)
    async with bearer_client(protected.url, token, mode) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "echo" in tools
        result = await client.call_tool("echo", {"text": "through a token"})
        assert not result.is_error
        assert result.content[0].text == "through a token"


def status_of(url: str, token: str | None) -> tuple[int, str]:
    """POST of an initialize with `token`: the status and the WWW-Authenticate header."""
    body = json.dumps({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }).encode()
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("content-type", "application/json")
    request.add_header("accept", "application/json, text/event-stream")
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("www-authenticate", "")


def test_tokens_the_issuer_made_for_something_else_are_refused(protected: Protected) -> None:
    # No token: the challenge names the metadata, which names the issuer.
    status, challenge = status_of(protected.url, None)
    assert status == 401 and "resource_metadata=" in challenge, challenge
    metadata_url = challenge.split('resource_metadata="')[1].split('"')[0]
    with urllib.request.urlopen(metadata_url, timeout=10) as response:
        metadata = json.load(response)
    assert metadata["authorization_servers"] == [protected.issuer]
    assert metadata["resource"] == protected.url
    # A token for another resource, and one without the scope.
    other = client_credentials(protected.issuer, "agent-a", "mcp", "http://127.0.0.1:1/mcp")
    status, challenge = status_of(protected.url, other)
    assert status == 401 and 'error="invalid_token"' in challenge, challenge
    unscoped = client_credentials(protected.issuer, "agent-a", "other", protected.url)
    status, challenge = status_of(protected.url, unscoped)
    assert status == 403 and 'error="insufficient_scope"' in challenge, challenge
    good = client_credentials(protected.issuer, "agent-a", "mcp", protected.url)
    assert status_of(protected.url, good)[0] == 200


def admin(protected: Protected, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """A request to the node's admin API with its admin token."""
    base = protected.url.removesuffix("/mcp")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/admin/v1{path}", data=data, method=method)
    request.add_header("authorization", f"Bearer {protected.admin_token}")
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def rules_in_force(protected: Protected, n: int) -> None:
    """Waits (bounded) until the node applies `n` rules (they reach it through its store's feed)."""
    deadline = time.monotonic() + 30
    while admin(protected, "GET", "/status")[1]["authorization"]["rules"] != n:
        assert time.monotonic() < deadline, f"{n} rules not in force"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", MODES)
async def test_authorization_rules_filter_what_the_real_client_sees(protected: Protected, mode: str) -> None:
    status, _ = admin(protected, "POST", "/auth/rules", {"name": "agent-a-echo", "principals": ["sub:agent-a"], "tools": ["echo"]})
    assert status == 201
    try:
        rules_in_force(protected, 1)
        a = client_credentials(protected.issuer, "agent-a", "mcp", protected.url)
        async with bearer_client(protected.url, a, mode) as client:
            assert [t.name for t in (await client.list_tools()).tools] == ["echo"]
            assert (await client.call_tool("echo", {"text": "allowed"})).content[0].text == "allowed"
            with pytest.raises(Exception, match="Unknown tool: notes_put"):
                await client.call_tool("notes_put", {"name": "n", "text": "t"})
            assert (await client.list_prompts()).prompts == []
        b = client_credentials(protected.issuer, "agent-b", "mcp", protected.url)
        async with bearer_client(protected.url, b, mode) as client:
            assert (await client.list_tools()).tools == []
    finally:
        assert admin(protected, "DELETE", "/auth/rules/agent-a-echo")[0] == 200
        rules_in_force(protected, 0)
