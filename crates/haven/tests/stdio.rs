//! `haven stdio` serves the same catalog over stdio, in both eras.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

#[test]
fn stdio_serves_both_eras() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["stdio", "--data"])
        .arg(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut send = |v: Value| writeln!(stdin, "{v}").unwrap();
    let mut read = || {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    };
    send(
        json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}),
    );
    assert_eq!(read()["result"]["protocolVersion"], "2025-11-25");
    send(json!({"jsonrpc":"2.0","method":"notifications/initialized"}));
    send(
        json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_put","arguments":{"name":"s","text":"over stdio"}}}),
    );
    assert_eq!(read()["result"]["content"][0]["text"], "Saved note s");
    send(
        json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"notes_get","arguments":{"name":"s"},"_meta":{
        "io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}),
    );
    let v = read();
    assert_eq!(v["result"]["content"][0]["text"], "over stdio");
    assert_eq!(v["result"]["resultType"], "complete");
    send(json!({"jsonrpc":"2.0","id":4,"method":"nope"}));
    assert_eq!(read()["error"]["code"], -32601);
    writeln!(stdin, "{{broken").unwrap();
    assert_eq!(read()["error"]["code"], -32700);
    drop(stdin);
    assert!(child.wait().unwrap().success());
}
