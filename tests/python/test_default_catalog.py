"""Haven's default catalog through the real Python `mcp` 2.3 client, in both protocol eras."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from conftest import HavenServer, make_client
from mcp_types import CallToolResult, TextContent

from mcp import Client, MCPError

pytestmark = pytest.mark.anyio

DEFAULT_TOOLS = {"echo", "time_now", "notes_put", "notes_get", "notes_list", "notes_delete", "sleep"}

# RFC 3339 date-time (section 5.6), e.g. 2026-11-26T23:44:06.123456789Z or ...+00:00
RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<time>\d{2}:\d{2}:\d{2})(?P<frac>\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})"
)


def parse_rfc3339(text: str) -> datetime:
    m = RFC3339.fullmatch(text.strip())
    assert m, f"not an RFC 3339 date-time: {text!r}"
    frac = (m["frac"] or ".0")[1:7].ljust(6, "0")  # datetime keeps microseconds
    offset = "+00:00" if m["offset"] in ("Z", "z") else m["offset"]
    return datetime.fromisoformat(f"{m['date']}T{m['time']}.{frac}{offset}")


def texts(result: CallToolResult) -> list[str]:
    return [block.text for block in result.content if isinstance(block, TextContent)]


def only_text(result: CallToolResult) -> str:
    assert len(result.content) == 1, f"expected one content block, got {result.content!r}"
    block = result.content[0]
    assert isinstance(block, TextContent), f"expected text content, got {block!r}"
    return block.text


async def call_ok(client: Client, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> CallToolResult:
    result = await client.call_tool(name, arguments or {}, **kw)
    assert not result.is_error, f"{name}({arguments}) returned an error result: {texts(result)}"
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def test_connects_in_requested_era(haven: HavenServer, mode: str) -> None:
    async with make_client(haven, mode) as client:
        expected = "2025-11-25" if mode == "legacy" else "2026-07-28"
        assert client.protocol_version == expected
        if mode == "legacy":  # an explicit modern mode skips discovery: capabilities are not fetched
            assert client.server_capabilities.tools is not None


async def test_auto_mode_negotiates_2026_07_28(haven: HavenServer) -> None:
    # `auto` probes server/discover first; Haven speaks the stateless era, so no fallback.
    async with make_client(haven, "auto") as client:
        assert client.protocol_version == "2026-07-28"
        assert client.server_capabilities.tools is not None
        assert "echo" in {tool.name for tool in (await client.list_tools()).tools}


async def test_list_tools(haven: HavenServer, mode: str) -> None:
    async with make_client(haven, mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert DEFAULT_TOOLS <= set(tools), f"missing tools: {DEFAULT_TOOLS - set(tools)}"
        for tool in tools.values():
            assert tool.input_schema.get("type") == "object", tool
        assert "text" in tools["echo"].input_schema.get("properties", {})
        assert set(tools["notes_put"].input_schema.get("properties", {})) >= {"name", "text"}
        assert "seconds" in tools["sleep"].input_schema.get("properties", {})


@pytest.mark.parametrize(
    "text", ["hello", "héllo wörld ✓ 🚀 \"quoted\" \\ back\nslash", ""], ids=["ascii", "unicode", "empty"]
)
async def test_echo_returns_exact_text(haven: HavenServer, mode: str, text: str) -> None:
    async with make_client(haven, mode) as client:
        result = await call_ok(client, "echo", {"text": text})
        assert only_text(result) == text


async def test_time_now_is_current_utc(haven: HavenServer, mode: str) -> None:
    async with make_client(haven, mode) as client:
        before = datetime.now(timezone.utc)
        result = await call_ok(client, "time_now")
        after = datetime.now(timezone.utc)
    slack = timedelta(seconds=5)

    text = " ".join(texts(result))
    m = RFC3339.search(text)
    assert m, f"no RFC 3339 time in the text content: {text!r}"
    from_text = parse_rfc3339(m.group(0))
    assert from_text.utcoffset() == timedelta(0), f"not UTC: {m.group(0)}"
    assert before - slack <= from_text <= after + slack, (from_text, before, after)

    sc = result.structured_content
    assert isinstance(sc, dict), f"missing structuredContent: {result!r}"
    utc = parse_rfc3339(sc["utc"])
    assert utc.utcoffset() == timedelta(0), f"not UTC: {sc['utc']}"
    assert before - slack <= utc <= after + slack, (utc, before, after)
    millis = sc["unixMillis"]
    assert isinstance(millis, int) and not isinstance(millis, bool), f"unixMillis not an integer: {millis!r}"
    assert abs(millis - utc.timestamp() * 1000) < 1000, (millis, sc["utc"])


async def test_notes_crud(haven: HavenServer, mode: str) -> None:
    name = unique(f"crud-{mode}")
    body = f"note body for {mode}: ünïcödé ✓\nsecond line"
    async with make_client(haven, mode) as client:
        put = await call_ok(client, "notes_put", {"name": name, "text": body})
        assert only_text(put) == f"Saved note {name}"

        got = await call_ok(client, "notes_get", {"name": name})
        assert only_text(got) == body

        listed = await call_ok(client, "notes_list")
        sc = listed.structured_content
        assert isinstance(sc, dict) and isinstance(sc.get("notes"), list), f"bad structuredContent: {sc!r}"
        assert name in [note.get("name") for note in sc["notes"]], sc
        assert any(name in t for t in texts(listed)), f"{name} missing from the text listing: {texts(listed)}"

        # Overwrite keeps one note with the new text.
        await call_ok(client, "notes_put", {"name": name, "text": "v2"})
        assert only_text(await call_ok(client, "notes_get", {"name": name})) == "v2"
        sc = (await call_ok(client, "notes_list")).structured_content
        assert [note["name"] for note in sc["notes"]].count(name) == 1, sc

        await call_ok(client, "notes_delete", {"name": name})
        gone = await client.call_tool("notes_get", {"name": name})
        assert gone.is_error, f"notes_get of a deleted note should be an error result, got {gone!r}"
        sc = (await call_ok(client, "notes_list")).structured_content
        assert name not in [note.get("name") for note in sc["notes"]], sc


async def test_notes_get_missing_is_error_result(haven: HavenServer, mode: str) -> None:
    async with make_client(haven, mode) as client:
        result = await client.call_tool("notes_get", {"name": unique("never-written")})
        assert result.is_error, result
        assert texts(result), "an error result should explain itself in text content"


async def test_sleep_reports_progress(haven: HavenServer, mode: str) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with make_client(haven, mode) as client:
        started = time.monotonic()
        result = await call_ok(client, "sleep", {"seconds": 2}, progress_callback=on_progress)
        elapsed = time.monotonic() - started
        await anyio.sleep(0.2)  # progress callbacks run as separate tasks; let the last one land

    m = re.fullmatch(r"Slept (\d+(?:\.\d+)?) seconds?", only_text(result))
    assert m and 1.5 <= float(m.group(1)) <= 3, f"unexpected sleep result: {only_text(result)!r}"
    assert 1.5 <= elapsed < 10, f"sleep 2 took {elapsed:.2f}s"
    assert len(updates) >= 2, f"expected >= 2 progress notifications, got {updates}"
    values = [p for p, _, _ in updates]
    assert values == sorted(values) and len(set(values)) == len(values), f"progress must increase: {values}"


async def test_unknown_tool_is_an_error(haven: HavenServer, mode: str) -> None:
    name = unique("no_such_tool").replace("-", "_")
    async with make_client(haven, mode) as client:
        try:
            result = await client.call_tool(name, {})
        except MCPError as e:  # a JSON-RPC error (e.g. -32602 unknown tool) is fine
            assert e.code < 0, e
        else:  # ... and so is a tool result with isError
            assert result.is_error, f"calling unknown tool {name} succeeded: {result!r}"


async def test_legacy_and_2026_clients_share_the_store(haven: HavenServer) -> None:
    name = unique("cross-era")
    body = json.dumps({"written_by": "legacy", "n": 1})
    async with make_client(haven, "legacy") as legacy:
        await call_ok(legacy, "notes_put", {"name": name, "text": body})

    async with make_client(haven, "2026-07-28") as modern:
        assert only_text(await call_ok(modern, "notes_get", {"name": name})) == body
        sc = (await call_ok(modern, "notes_list")).structured_content
        assert name in [note.get("name") for note in sc["notes"]], sc
        await call_ok(modern, "notes_put", {"name": name, "text": "updated by 2026-07-28"})

    # Both eras open at once, each seeing the other's writes immediately.
    async with make_client(haven, "legacy") as legacy, make_client(haven, "2026-07-28") as modern:
        assert only_text(await call_ok(legacy, "notes_get", {"name": name})) == "updated by 2026-07-28"
        await call_ok(legacy, "notes_delete", {"name": name})
        gone = await modern.call_tool("notes_get", {"name": name})
        assert gone.is_error, gone
