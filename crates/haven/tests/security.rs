//! Issue 13 §7 and §9 on the real binary: the data directory and its files are private, key
//! and token files that others can read are refused, keys come from commands, the headers
//! Haven reads must be single and ASCII (written by hand over TCP: HTTP clients merge or
//! refuse such headers), the `Bearer` scheme is case-insensitive, and the admin API can listen
//! on its own address.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Haven, free_port, haven_bin, run_ok, write_key_file};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Every file and directory under `dir` (itself excluded), depth first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// `haven ARGS` to its end.
fn haven(args: &[&str]) -> Output {
    Command::new(haven_bin())
        .args(args)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .env_remove("HAVEN_NODE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `haven serve --data DATA EXTRA` that must refuse to start: its output once it exited. A
/// process still running after 60 s is killed and the test fails (a guard, not a measure).
fn serve_refused(data: &Path, extra: &[&str]) -> Output {
    let child = Command::new(haven_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data")
        .arg(data)
        .args(extra)
        .env_remove("HAVEN_SECRETS_KEYS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => {
            let out = out.unwrap();
            assert!(
                !out.status.success(),
                "haven serve {extra:?} started: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("haven serve {extra:?} kept running; it should have refused to start");
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_every_file_in_it_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = dir.path().join("backup.key");
    write_key_file(&key, format!("{}\n", "ab".repeat(32)));
    let backup = dir.path().join("backup");
    let (b, k) = (backup.to_str().unwrap(), key.to_str().unwrap());
    let extra = ["--backup-url", b, "--backup-key-file", k];
    let port = free_port();
    let h = Haven::start(&data, port, "default", &extra).await;
    // A write (the write-ahead log), and a backup round (its state file).
    let r = common::stateless(
        &reqwest::Client::new(),
        &h.url(),
        1,
        "tools/call",
        json!({"name": "notes_put", "arguments": {"name": "n", "text": "private"}}),
        json!({}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let d = data.to_str().unwrap();
    run_ok(Command::new(haven_bin()).args(["backup", "now", "--data", d]));

    let check = |data: &Path| {
        assert_eq!(mode(data), 0o700, "{}", data.display());
        let all = walk(data);
        let names: Vec<String> = all
            .iter()
            .map(|p| p.strip_prefix(data).unwrap().display().to_string())
            .collect();
        for expected in [
            "state.redb",
            "wal",
            "admin.token",
            "admin.url",
            "node-id",
            "secrets.keys",
            "backup-generation.json",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
        }
        assert!(
            names.iter().any(|n| n.starts_with("wal/")),
            "a log segment: {names:?}"
        );
        for p in &all {
            let want = if p.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(p), want, "{}", p.display());
        }
    };
    check(&data);
    drop(h);

    // An existing directory and Haven's files in it that others can reach are tightened on
    // the next start, and the log says so.
    chmod(&data, 0o755);
    chmod(&data.join("wal"), 0o755);
    for f in ["state.redb", "node-id", "backup-generation.json"] {
        chmod(&data.join(f), 0o644);
    }
    let h = Haven::start(&data, port, "default", &extra).await;
    check(&data);
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(
        log.contains("restricted it to Haven's user") && log.contains("0755"),
        "{log}"
    );
    drop(h);

    // A restored data directory is private too.
    let restored = dir.path().join("restored");
    run_ok(Command::new(haven_bin()).args([
        "backup",
        "restore",
        "--backup-url",
        b,
        "--backup-key-file",
        k,
        "--to",
        restored.to_str().unwrap(),
    ]));
    assert_eq!(mode(&restored), 0o700);
    for p in walk(&restored) {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&p), want, "{}", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_token_files_others_can_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, content: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        chmod(&p, 0o644);
        p
    };
    let backup_key = open("backup.key", format!("{}\n", "ab".repeat(32)));
    let secrets_key = open(
        "secrets.keys",
        "k1 QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n".into(),
    );
    let token = open("admin.token", "0123456789abcdef0123456789abcdef\n".into());
    let backup = dir.path().join("backup");
    let data = dir.path().join("data");
    let expect = |out: &Output, what: &str, file: &Path| {
        let e = stderr(out);
        for needle in [
            what.to_owned(),
            file.display().to_string(),
            "0644".into(),
            format!("chmod 600 {}", file.display()),
        ] {
            assert!(e.contains(&needle), "{needle:?} not in: {e}");
        }
    };
    let (bk, sk, tk) = (
        backup_key.to_str().unwrap(),
        secrets_key.to_str().unwrap(),
        token.to_str().unwrap(),
    );
    let b = backup.to_str().unwrap();
    for (extra, what, file) in [
        (
            vec!["--backup-url", b, "--backup-key-file", bk],
            "backup key file",
            &backup_key,
        ),
        (
            vec!["--secrets-key-file", sk],
            "secrets key file",
            &secrets_key,
        ),
        (vec!["--admin-token-file", tk], "admin token file", &token),
    ] {
        let out = serve_refused(&data, &extra);
        expect(&out, what, file);
        // Refused before anything was created.
        assert!(!data.exists(), "{what}: the data directory was created");
        assert!(!backup.exists(), "{what}: the backup was started");
        assert_eq!(mode(file), 0o644, "{what}: the file was changed");
    }
    // The files Haven keeps in its data directory are refused the same way.
    let home = dir.path().join("home");
    let h = Haven::start(&home, free_port(), "default", &[]).await;
    drop(h);
    for f in ["admin.token", "secrets.keys"] {
        let p = home.join(f);
        chmod(&p, 0o640);
        let out = serve_refused(&home, &[]);
        let e = stderr(&out);
        assert!(
            e.contains("0640") && e.contains(&format!("chmod 600 {}", p.display())),
            "{f}: {e}"
        );
        chmod(&p, 0o600);
    }
    // The commands that read a key or a token refuse too: the CLI's token, a backup key,
    // and adding a key to a secrets key file (which stays as it was).
    let out = haven(&["status", "--admin-token-file", tk]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    expect(&out, "admin token file", &token);
    std::fs::create_dir(&backup).unwrap();
    let out = haven(&[
        "backup",
        "verify",
        "--backup-url",
        b,
        "--backup-key-file",
        bk,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    expect(&out, "backup key file", &backup_key);
    let before = std::fs::read(&secrets_key).unwrap();
    let out = haven(&["secrets", "new-key", "--key-file", sk]);
    assert!(!out.status.success());
    expect(&out, "secrets key file", &secrets_key);
    assert_eq!(std::fs::read(&secrets_key).unwrap(), before);
    // Keys Haven creates are private.
    let made = dir.path().join("new.key");
    run_ok(Command::new(haven_bin()).args(["backup", "keygen", "--out", made.to_str().unwrap()]));
    assert_eq!(mode(&made), 0o600);
    let made = dir.path().join("new.keys");
    run_ok(Command::new(haven_bin()).args([
        "secrets",
        "new-key",
        "--key-file",
        made.to_str().unwrap(),
    ]));
    assert_eq!(mode(&made), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_commands() {
    let dir = tempfile::tempdir().unwrap();
    // The "KMS": files only this test's commands read.
    let kms = dir.path().join("kms");
    std::fs::create_dir(&kms).unwrap();
    let secrets_keys = kms.join("secrets");
    write_key_file(
        &secrets_keys,
        "kms-1 QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n",
    );
    let backup_key = kms.join("backup");
    write_key_file(&backup_key, format!("{}\n", "cd".repeat(32)));
    let secrets_cmd = format!("cat '{}'", secrets_keys.display());
    let backup_cmd = format!("cat '{}'", backup_key.display());
    let backup = dir.path().join("backup");
    let b = backup.to_str().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let h = Haven::start(
        &data,
        free_port(),
        "default",
        &[
            "--secrets-key-command",
            &secrets_cmd,
            "--backup-url",
            b,
            "--backup-key-command",
            &backup_cmd,
        ],
    )
    .await;
    // No key file is made in the data directory when a command gives the keys.
    assert!(!data.join("secrets.keys").exists());
    // A secret is wrapped under the command's key.
    let mut set = Command::new(haven_bin())
        .args(["secrets", "set", "app/token", "--data", d])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), b"hunter2").unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_ok(Command::new(haven_bin()).args(["secrets", "list", "--json", "--data", d]));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.to_string().contains("kms-1"), "{list}");
    // The backup is encrypted under the command's key: it verifies with the key from a
    // command, and with the same key from a file.
    run_ok(Command::new(haven_bin()).args(["backup", "now", "--data", d]));
    drop(h);
    run_ok(Command::new(haven_bin()).args([
        "backup",
        "verify",
        "--backup-url",
        b,
        "--backup-key-command",
        &backup_cmd,
    ]));
    run_ok(Command::new(haven_bin()).args([
        "backup",
        "verify",
        "--backup-url",
        b,
        "--backup-key-file",
        backup_key.to_str().unwrap(),
    ]));
    // The node starts again on the same command (the secret still opens: checked at start).
    let h = Haven::start(
        &data,
        free_port(),
        "default",
        &["--secrets-key-command", &secrets_cmd],
    )
    .await;
    drop(h);

    // A failing command, a silent one, a bad output and a missing program refuse the start
    // with a clear error; what the command wrote to its standard error is not shown.
    let fresh = dir.path().join("fresh");
    for (cmd, needle) in [
        (
            "sh -c 'echo LEAKED-KEY-MATERIAL >&2; exit 3'",
            "secrets key command \"sh\" failed (exit status: 3)",
        ),
        ("true", "printed nothing"),
        ("echo not-a-key-line", "the secrets key command's output"),
        ("/no/such/kms-client", "starting the secrets key command"),
        ("echo 'unbalanced", "cannot be split into words"),
    ] {
        let out = serve_refused(&fresh, &["--secrets-key-command", cmd]);
        let e = stderr(&out);
        assert!(e.contains(needle), "{cmd}: {needle:?} not in: {e}");
        assert!(!e.contains("LEAKED-KEY-MATERIAL"), "{cmd}: {e}");
    }
    for (cmd, needle) in [
        ("false", "backup key command \"false\" failed"),
        ("true", "printed nothing"),
        ("echo 1234", "64 hexadecimal digits"),
    ] {
        let out = haven(&[
            "backup",
            "verify",
            "--backup-url",
            b,
            "--backup-key-command",
            cmd,
        ]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{cmd}: {}", stderr(&out));
    }
    // A file and a command at once is refused.
    let out = serve_refused(
        &fresh,
        &[
            "--secrets-key-command",
            &secrets_cmd,
            "--secrets-key-file",
            secrets_keys.to_str().unwrap(),
        ],
    );
    assert!(stderr(&out).contains("both set"), "{}", stderr(&out));
}

/// Writes `request` to 127.0.0.1:`port` as it is and reads the answer to its end (the request
/// asks the server to close): status and JSON body.
async fn raw(port: u16, request: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A POST of `body` to `path` with the header lines `headers` (each `Name: value`, bytes as
/// given), and `Host` unless `no_host`.
fn post(path: &str, host: Option<&[u8]>, headers: &[&[u8]], body: &str) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\n").into_bytes();
    if let Some(h) = host {
        r.extend_from_slice(b"Host: ");
        r.extend_from_slice(h);
        r.extend_from_slice(b"\r\n");
    }
    for h in headers {
        r.extend_from_slice(h);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(
        format!(
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    r
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;

// Long by design: a table of bad requests, each refused with nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_haven_reads_must_be_single_ascii_and_host_present() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let h = Haven::start(&dir.path().join("data"), port, "default", &[]).await;
    let host: &[u8] = b"127.0.0.1";
    let note = |name: &str| {
        json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"notes_put","arguments":{"name":name,"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}})
        .to_string()
    };
    const V26: &[u8] = b"Mcp-Protocol-Version: 2026-07-28";
    let stateless: [&[u8]; 3] = [V26, b"Mcp-Method: tools/call", b"Mcp-Name: notes_put"];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "no Host",
            post("/mcp", None, &[], INITIALIZE),
            "must carry a Host header",
        ),
        (
            "two Host",
            post("/mcp", Some(host), &[b"Host: evil.example.com"], INITIALIZE),
            "at most one Host header, this one has 2",
        ),
        (
            "two Origin",
            post(
                "/mcp",
                Some(host),
                &[
                    b"Origin: http://127.0.0.1",
                    b"Origin: http://evil.example.com",
                ],
                INITIALIZE,
            ),
            "at most one Origin header",
        ),
        (
            "two Mcp-Session-Id",
            post(
                "/mcp",
                Some(host),
                &[b"Mcp-Session-Id: a", b"Mcp-Session-Id: b"],
                INITIALIZE,
            ),
            "at most one Mcp-Session-Id header",
        ),
        (
            "two Mcp-Method",
            post(
                "/mcp",
                Some(host),
                &[
                    V26,
                    b"Mcp-Method: tools/call",
                    b"Mcp-Method: tools/list",
                    b"Mcp-Name: notes_put",
                ],
                &note("dup-method"),
            ),
            "at most one Mcp-Method header",
        ),
        (
            "two Mcp-Name",
            post(
                "/mcp",
                Some(host),
                &[
                    V26,
                    b"Mcp-Method: tools/call",
                    b"Mcp-Name: notes_put",
                    b"Mcp-Name: echo",
                ],
                &note("dup-name"),
            ),
            "at most one Mcp-Name header",
        ),
        (
            "two Mcp-Param-Name",
            post(
                "/mcp",
                Some(host),
                &[
                    &stateless[..],
                    &[b"Mcp-Param-Name: a", b"Mcp-Param-Name: b"],
                ]
                .concat(),
                &note("dup-param"),
            ),
            "at most one Mcp-Param-name header",
        ),
        (
            "non-ASCII Host",
            post("/mcp", Some(b"caf\xc3\xa9.local"), &[], INITIALIZE),
            "the Host header's value is not visible ASCII",
        ),
        (
            "non-UTF-8 Origin",
            post(
                "/mcp",
                Some(host),
                &[b"Origin: http://\xff\xfe"],
                INITIALIZE,
            ),
            "the Origin header's value is not visible ASCII",
        ),
        (
            "non-ASCII Mcp-Session-Id",
            post(
                "/mcp",
                Some(host),
                &[b"Mcp-Session-Id: s\xc3\xa9"],
                INITIALIZE,
            ),
            "the Mcp-Session-Id header's value",
        ),
        (
            "non-ASCII Mcp-Method",
            post(
                "/mcp",
                Some(host),
                &[
                    V26,
                    b"Mcp-Method: tools/c\xc3\xa0ll",
                    b"Mcp-Name: notes_put",
                ],
                &note("ascii-method"),
            ),
            "the Mcp-Method header's value",
        ),
        (
            "non-ASCII Mcp-Name",
            post(
                "/mcp",
                Some(host),
                &[
                    V26,
                    b"Mcp-Method: tools/call",
                    b"Mcp-Name: notes_p\xc3\xbct",
                ],
                &note("ascii-name"),
            ),
            "the Mcp-Name header's value",
        ),
        (
            "non-ASCII Mcp-Param",
            post(
                "/mcp",
                Some(host),
                &[&stateless[..], &[b"Mcp-Param-Name: \xe2\x82\xac"]].concat(),
                &note("ascii-param"),
            ),
            "the Mcp-Param-name header's value",
        ),
    ];
    for (what, request, message) in &cases {
        let (status, body) = raw(port, request).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["jsonrpc"], "2.0", "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(message)),
            "{what}: {message:?} not in {body}"
        );
    }
    // Nothing changed: no session was created and no note written.
    let status = h.status().await;
    assert_eq!(status["live_sessions"], 0, "{status}");
    let http = reqwest::Client::new();
    let list = common::stateless(
        &http,
        &h.url(),
        3,
        "tools/call",
        json!({"name": "notes_list", "arguments": {}}),
        json!({}),
    )
    .await
    .json::<Value>()
    .await
    .unwrap();
    assert!(!list.to_string().contains("dup-"), "{list}");
    assert!(!list.to_string().contains("ascii-"), "{list}");
    // The same requests well formed are served (the raw client is not the reason).
    let (status, body) = raw(port, &post("/mcp", Some(host), &[], INITIALIZE)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw(port, &post("/mcp", Some(host), &stateless, &note("good"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.status().await["live_sessions"], 1);

    // The admin API: the same checks, answered its own way; the Bearer scheme in any case.
    let token = std::fs::read_to_string(h.data.join("admin.token")).unwrap();
    let token = token.trim();
    let get = |host: Option<&str>, extra: &str, auth: &str| {
        let mut r = "GET /admin/v1/status HTTP/1.1\r\n".to_owned();
        if let Some(h) = host {
            r += &format!("Host: {h}\r\n");
        }
        r += extra;
        r += &format!("Authorization: {auth}\r\nConnection: close\r\n\r\n");
        r.into_bytes()
    };
    let bearer = format!("Bearer {token}");
    for (what, request, want, message) in [
        (
            "no Host",
            get(None, "", &bearer),
            400,
            "must carry a Host header",
        ),
        (
            "two Host",
            get(Some("127.0.0.1"), "Host: evil.example.com\r\n", &bearer),
            400,
            "at most one Host header",
        ),
        (
            "two Origin",
            get(
                Some("127.0.0.1"),
                "Origin: http://127.0.0.1\r\nOrigin: http://evil.example.com\r\n",
                &bearer,
            ),
            400,
            "at most one Origin header",
        ),
        (
            "two Authorization",
            get(
                Some("127.0.0.1"),
                &format!("Authorization: {bearer}\r\n"),
                &bearer,
            ),
            400,
            "at most one Authorization header",
        ),
        (
            "foreign Host",
            get(Some("evil.example.com"), "", &bearer),
            403,
            "Host evil.example.com is not allowed",
        ),
        (
            "foreign Origin",
            get(
                Some("127.0.0.1"),
                "Origin: http://evil.example.com\r\n",
                &bearer,
            ),
            403,
            "Origin http://evil.example.com is not allowed",
        ),
        (
            "wrong token",
            get(Some("127.0.0.1"), "", "Bearer not-the-token-at-all"),
            401,
            "admin token",
        ),
    ] {
        let (status, body) = raw(port, &request).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|m| m.contains(message)),
            "{what}: {message:?} not in {body}"
        );
    }
    for scheme in ["Bearer", "bearer", "BEARER", "beaRer"] {
        let (status, body) = raw(
            port,
            &get(Some("127.0.0.1"), "", &format!("{scheme} {token}")),
        )
        .await;
        assert_eq!(status, 200, "{scheme}: {body}");
        assert!(body["node"].is_string(), "{scheme}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_can_listen_on_its_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let [port, admin_port] = haven_testkit::free_ports(2)[..] else {
        unreachable!("two ports were asked for")
    };
    let admin_addr = format!("127.0.0.1:{admin_port}");
    let h = Haven::start(&data, port, "default", &["--admin-listen", &admin_addr]).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let http = reqwest::Client::new();
    let status_at = |p: u16| {
        http.get(format!("http://127.0.0.1:{p}/admin/v1/status"))
            .bearer_auth(token.trim())
            .send()
    };
    // The admin API answers on its own listener only; /mcp and the health checks stay on the
    // MCP listener.
    let r = status_at(admin_port).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status_at(port).await.unwrap().status(), 404);
    for (p, path, want) in [
        (port, "/healthz", 200),
        (port, "/regionz", 200),
        (admin_port, "/healthz", 404),
    ] {
        let r = http
            .get(format!("http://127.0.0.1:{p}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{p}{path}");
    }
    let r = http
        .post(format!("http://127.0.0.1:{admin_port}/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(INITIALIZE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "/mcp is not served on the admin listener");
    // The same Host/Origin checks on the admin listener.
    let (status, body) = raw(
        admin_port,
        format!(
            "GET /admin/v1/status HTTP/1.1\r\nHost: evil.example.com\r\nAuthorization: bearer {}\r\nConnection: close\r\n\r\n",
            token.trim()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // The CLI finds the admin API through the data directory, or is told with --node.
    assert_eq!(
        std::fs::read_to_string(data.join("admin.url")).unwrap(),
        format!("http://{admin_addr}")
    );
    let out = run_ok(Command::new(haven_bin()).args(["status", "--json", "--data", d]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["node"].is_string(), "{v}");
    let node = format!("http://{admin_addr}");
    run_ok(Command::new(haven_bin()).args([
        "config",
        "set",
        "upstream.timeout_ms",
        "5000",
        "--node",
        &node,
        "--data",
        d,
    ]));
    let out = run_ok(Command::new(haven_bin()).args([
        "config",
        "get",
        "upstream.timeout_ms",
        "--data",
        d,
    ]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5000"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Pointed at the MCP listener, a command says where the admin API is to be found.
    let out = haven(&[
        "status",
        "--node",
        &format!("http://127.0.0.1:{port}"),
        "--data",
        d,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--admin-listen"), "{}", stderr(&out));
    drop(h);

    // An admin address that cannot be had refuses the start.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let out = serve_refused(&dir.path().join("other"), &["--admin-listen", &busy_addr]);
    assert!(
        stderr(&out).contains(&format!("listening on {busy_addr} (admin_listen")),
        "{}",
        stderr(&out)
    );
}
