//! Inputs found by fuzzing (`fuzz/`, target `jsonrpc`), kept as tests.

use haven_mcp::jsonrpc::{self, Incoming};

/// A JSON array took the fast path of `parse`, where serde reads a struct by position: the
/// array `[4, ","]` was read as a message with id `","` (the generic path, rightly, calls
/// any array a batch), and `["2.0", 1, "tools/list"]` as a request. Every array is now an
/// invalid request without an id. Minimised input of the `jsonrpc` target: `[4,","]`.
#[test]
fn an_array_is_never_read_as_a_message_by_position() {
    for body in [
        &br#"[4,","]"#[..],
        br#"["2.0",1,"tools/list"]"#,
        br#" ["2.0",1,"tools/call",{"name":"echo","arguments":{"text":"x"}}]"#,
        br#"["2.0","n"]"#,
    ] {
        match jsonrpc::parse(body) {
            Err(m) => {
                assert_eq!(m.error.code.0, -32600, "{}", String::from_utf8_lossy(body));
                assert!(m.id.is_none());
                assert!(m.error.message.contains("batches"), "{}", m.error.message);
            }
            Ok(other) => panic!("{} was read as {other:?}", String::from_utf8_lossy(body)),
        }
    }
    // Objects still take the fast path, with any leading whitespace.
    assert!(matches!(
        jsonrpc::parse(b" \n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}"),
        Ok(Incoming::Request(_))
    ));
}
