"""A FastMCP server Haven federates in tests: `python fastmcp_upstream.py http PORT` serves
Streamable HTTP on 127.0.0.1:PORT/mcp; `python fastmcp_upstream.py stdio` serves stdio."""

from __future__ import annotations

import asyncio
import sys

from fastmcp import FastMCP

mcp = FastMCP("haven-test-fastmcp")


@mcp.tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@mcp.tool
def shout(text: str) -> str:
    """Upper-cases a text."""
    return text.upper()


@mcp.tool
async def nap(seconds: float) -> str:
    """Sleeps, then answers."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}s"


@mcp.resource("fast://greeting")
def greeting() -> str:
    """A fixed text."""
    return "hello from fastmcp"


@mcp.prompt
def review(code: str) -> str:
    """Asks for a review of some code."""
    return f"Please review:\n{code}"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "http":
        mcp.run(transport="http", host="127.0.0.1", port=int(sys.argv[2]), show_banner=False)
    else:
        mcp.run(transport="stdio", show_banner=False)
