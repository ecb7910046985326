//! The `conformance` catalog: exactly the fixtures of the official MCP conformance suite.
