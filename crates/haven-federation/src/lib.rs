//! Federation of upstream MCP servers (see the crate description).
