//! Issue 13 §3 on the real binary: authorization rules in the store, changed live through the
//! CLI and the admin API, filter what each principal lists and may use, in both eras, for
//! built-in and federated tools (another Haven node as upstream `up`), resources and prompts;
//! a refused call is answered as if its item did not exist and is recorded in the audit log.
//! The admin API takes the same tokens and API keys with viewer/operator/admin roles; the
//! admin token stays as break-glass access.

mod common;

use std::time::Duration;

use common::auth::{bearer_client as client, cli, cli_ok, session};
use common::{Haven, free_port};
use haven_testkit::idp::TestIdp;
use serde_json::{Value, json};

async fn stateless(client: &reqwest::Client, url: &str, method: &str, params: Value) -> Value {
    common::stateless(client, url, 1, method, params, json!({}))
        .await
        .json()
        .await
        .unwrap()
}

fn names(v: &Value, list: &str, field: &str) -> Vec<String> {
    let mut n: Vec<String> = v["result"][list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {v}"))
        .iter()
        .map(|t| t[field].as_str().unwrap().to_owned())
        .collect();
    n.sort();
    n
}

/// What `c` sees in both eras: the tool names (the two eras must agree).
async fn tools_seen(c: &reqwest::Client, url: &str) -> Vec<String> {
    let legacy = names(
        &session(c, url)
            .await
            .request(1, "tools/list", json!({}))
            .await,
        "tools",
        "name",
    );
    let now = names(
        &stateless(c, url, "tools/list", json!({})).await,
        "tools",
        "name",
    );
    assert_eq!(legacy, now, "the eras list different tools");
    legacy
}

/// Waits (bounded) until the node has `n` rules in force: rules reach the engine through the
/// store's change feed.
async fn wait_for_rules(h: &Haven, n: u64) {
    let ok = haven_testkit::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(10),
        || async { h.status().await["authorization"]["rules"] == json!(n) },
    )
    .await;
    assert!(ok, "the node did not apply {n} rules: {}", h.status().await);
}

/// A TCP proxy on loopback to `127.0.0.1:target`, keeping every byte sent through it towards
/// the target. It stops with the test's runtime.
async fn recording_proxy(target: u16) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = sent.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = ri.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                        if wo.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = wo.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut ro, &mut wi).await;
                    let _ = wi.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (port, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_filter_lists_and_refuse_calls_in_both_eras_and_change_live() {
    let idp = TestIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The upstream: another Haven node, without authentication, on loopback.
    let up = Haven::start(&dir.path().join("up"), free_port(), "default", &[]).await;
    let data = dir.path().join("data");
    let port = free_port();
    let resource = format!("http://127.0.0.1:{port}/mcp");
    let h = Haven::start(
        &data,
        port,
        "default",
        &[
            "--oauth-issuer",
            idp.issuer(),
            "--oauth-resource",
            &resource,
            "--oauth-scopes",
            "mcp",
        ],
    )
    .await;
    let url = h.url();
    // Haven reaches the upstream through a recording proxy: what it sends upstream is kept.
    let (proxy_port, sent) = recording_proxy(up.port).await;
    let up_url = format!("http://127.0.0.1:{proxy_port}/mcp");
    cli_ok(&data, &["registry", "add", "up", "--url", &up_url]);

    let token_for = |sub: &str, groups: &[&str]| {
        let mut c = idp.claims(sub, &resource, "mcp");
        c["groups"] = json!(groups);
        idp.sign(&c)
    };
    let alice_token = token_for("alice", &["team-a"]);
    let alice = client(&alice_token);
    let bob = client(&token_for("bob", &["team-b"]));

    // No rules: everything is open; the upstream's tools appear (bounded wait: the node
    // connects to the upstream in the background, so they may appear between the two eras'
    // lists; the wait reads one era, and the eras are compared once they have appeared).
    let appeared = haven_testkit::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            names(
                &stateless(&alice, &url, "tools/list", json!({})).await,
                "tools",
                "name",
            )
            .contains(&"up__echo".to_owned())
        },
    )
    .await;
    assert!(appeared, "up__echo never listed");
    let everything = tools_seen(&alice, &url).await;
    assert!(
        everything.contains(&"notes_put".to_owned()),
        "{everything:?}"
    );
    assert!(
        everything.contains(&"up__sleep".to_owned()),
        "{everything:?}"
    );
    // A note to read later (as resource note://shared).
    let a = session(&alice, &url).await;
    let v = a
        .call_tool(1, "notes_put", json!({"name": "shared", "text": "hello"}))
        .await;
    assert_eq!(v["result"]["isError"], json!(false), "{v}");

    // Rules, through the CLI: team-a gets echo, the upstream's tools but not its sleep, and
    // the prompt; bob gets the notes tools and the note resources.
    cli_ok(
        &data,
        &[
            "auth",
            "rules",
            "set",
            "team-a",
            "--principal",
            "group:team-a",
            "--tool",
            "echo",
            "--tool",
            "up__*",
            "--prompt",
            "discuss_*",
        ],
    );
    cli_ok(
        &data,
        &[
            "auth",
            "rules",
            "set",
            "no-upstream-sleep",
            "--deny",
            "--principal",
            "authenticated",
            "--tool",
            "up__sleep",
        ],
    );
    cli_ok(
        &data,
        &[
            "auth",
            "rules",
            "set",
            "bob-notes",
            "--principal",
            "sub:bob",
            "--tool",
            "notes_*",
            "--resource",
            "note://*",
        ],
    );
    wait_for_rules(&h, 3).await;
    let listed = cli_ok(&data, &["auth", "rules", "list"]);
    for want in [
        "team-a",
        "no-upstream-sleep",
        "bob-notes",
        "deny",
        "group:team-a",
    ] {
        assert!(listed.contains(want), "{want} not in:\n{listed}");
    }

    // Lists are filtered, the same in both eras.
    let seen = tools_seen(&alice, &url).await;
    assert!(seen.contains(&"echo".to_owned()) && seen.contains(&"up__echo".to_owned()));
    assert!(
        seen.iter()
            .all(|t| t == "echo" || (t.starts_with("up__") && t != "up__sleep")),
        "{seen:?}"
    );
    let seen = tools_seen(&bob, &url).await;
    assert!(
        !seen.is_empty() && seen.iter().all(|t| t.starts_with("notes_")),
        "{seen:?}"
    );

    // A call outside the rules is answered as if the tool did not exist, in both eras.
    let a = session(&alice, &url).await;
    for (tool, args) in [
        ("notes_put", json!({"name": "x", "text": "y"})),
        ("up__sleep", json!({"seconds": 0})),
    ] {
        let v = a.call_tool(2, tool, args.clone()).await;
        assert_eq!(
            v["error"]["message"],
            json!(format!("Unknown tool: {tool}")),
            "{v}"
        );
        let v = stateless(
            &alice,
            &url,
            "tools/call",
            json!({"name": tool, "arguments": args}),
        )
        .await;
        assert_eq!(
            v["error"]["message"],
            json!(format!("Unknown tool: {tool}")),
            "{v}"
        );
    }
    // The same error as a tool that does not exist at all.
    let v = a.call_tool(3, "no_such_tool", json!({})).await;
    assert_eq!(v["error"]["code"], json!(-32602), "{v}");
    // What the rules allow works, federated too.
    let v = a.call_tool(4, "up__echo", json!({"text": "via up"})).await;
    assert_eq!(v["result"]["content"][0]["text"], "via up", "{v}");
    let v = stateless(
        &alice,
        &url,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "hi"}}),
    )
    .await;
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");
    let v = stateless(
        &alice,
        &url,
        "tools/call",
        json!({"name": "up__echo", "arguments": {"text": "via up, stateless"}}),
    )
    .await;
    assert_eq!(
        v["result"]["content"][0]["text"], "via up, stateless",
        "{v}"
    );
    // The client's token never went upstream: no byte Haven sent there holds it, or any
    // Authorization header (the upstream is registered without one).
    let upstream_bytes = String::from_utf8_lossy(&sent.lock().unwrap()).to_lowercase();
    assert!(upstream_bytes.contains("via up"), "the proxy saw no call");
    assert!(
        !upstream_bytes.contains("authorization:"),
        "{upstream_bytes}"
    );
    let signature = alice_token.rsplit('.').next().unwrap().to_lowercase();
    assert!(
        !upstream_bytes.contains(&signature),
        "alice's token went upstream"
    );

    // Resources: bob lists and reads the note; alice neither lists nor reads it.
    let b = session(&bob, &url).await;
    let v = b.request(5, "resources/list", json!({})).await;
    assert!(
        names(&v, "resources", "uri").contains(&"note://shared".to_owned()),
        "{v}"
    );
    let v = b
        .request(6, "resources/read", json!({"uri": "note://shared"}))
        .await;
    assert_eq!(v["result"]["contents"][0]["text"], "hello", "{v}");
    let v = a.request(7, "resources/list", json!({})).await;
    assert_eq!(names(&v, "resources", "uri"), Vec::<String>::new(), "{v}");
    let v = a.request(8, "resources/templates/list", json!({})).await;
    assert_eq!(v["result"]["resourceTemplates"], json!([]), "{v}");
    let v = a
        .request(9, "resources/read", json!({"uri": "note://shared"}))
        .await;
    let missing = a
        .request(10, "resources/read", json!({"uri": "note://nothing"}))
        .await;
    assert_eq!(
        v["error"]["code"], missing["error"]["code"],
        "{v} / {missing}"
    );
    let v = stateless(
        &alice,
        &url,
        "resources/read",
        json!({"uri": "note://shared"}),
    )
    .await;
    assert!(v["error"].is_object() && v["result"].is_null(), "{v}");
    let v = a
        .request(11, "resources/subscribe", json!({"uri": "note://shared"}))
        .await;
    assert!(v["error"].is_object(), "{v}");

    // Prompts: alice has discuss_note, bob does not.
    let v = a.request(12, "prompts/list", json!({})).await;
    assert_eq!(names(&v, "prompts", "name"), vec!["discuss_note"], "{v}");
    let v = b.request(13, "prompts/list", json!({})).await;
    assert_eq!(names(&v, "prompts", "name"), Vec::<String>::new(), "{v}");
    let v = b
        .request(
            14,
            "prompts/get",
            json!({"name": "discuss_note", "arguments": {"name": "shared"}}),
        )
        .await;
    assert_eq!(v["error"]["message"], "Unknown prompt: discuss_note", "{v}");
    // A completion for a prompt bob may not use completes nothing.
    let v = b
        .request(
            15,
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "discuss_note"}, "argument": {"name": "name", "value": "sh"}}),
        )
        .await;
    assert_eq!(v["result"]["completion"]["values"], json!([]), "{v}");

    // Every refusal is in the audit log, with the principal and the item.
    cli_ok(&data, &["audit", "checkpoint"]);
    let denied = cli_ok(&data, &["audit", "list", "--action", "call.denied"]);
    assert!(
        denied.contains("up__sleep") && denied.contains("notes_put") && denied.contains("#alice"),
        "{denied}"
    );
    let changes = cli_ok(&data, &["audit", "list", "--action", "auth.rule.set"]);
    assert!(
        changes.contains("team-a") && changes.contains("bob-notes"),
        "{changes}"
    );

    // Changed live: without bob's rule, bob has nothing; without any rule, all is open again.
    cli_ok(&data, &["auth", "rules", "remove", "bob-notes"]);
    wait_for_rules(&h, 2).await;
    assert_eq!(tools_seen(&bob, &url).await, Vec::<String>::new());
    cli_ok(&data, &["auth", "rules", "remove", "team-a"]);
    cli_ok(&data, &["auth", "rules", "remove", "no-upstream-sleep"]);
    wait_for_rules(&h, 0).await;
    assert_eq!(tools_seen(&alice, &url).await, everything);

    // Bad rules are refused with a reason and change nothing.
    let out = cli(
        &data,
        &[
            "auth",
            "rules",
            "set",
            "bad",
            "--principal",
            "user:x",
            "--tool",
            "echo",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("selector"));
    let out = cli(&data, &["auth", "rules", "remove", "nothing-here"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no authorization rule"));
    assert_eq!(h.status().await["authorization"]["rules"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_tokens_and_api_keys_by_role() {
    let idp = TestIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let resource = format!("http://127.0.0.1:{port}/mcp");
    let h = Haven::start(
        &data,
        port,
        "default",
        &[
            "--oauth-issuer",
            idp.issuer(),
            "--oauth-resource",
            &resource,
        ],
    )
    .await;
    let admin_url = |p: &str| format!("http://127.0.0.1:{port}/admin/v1{p}");
    let token = |sub: &str, scope: &str| client(&idp.sign(&idp.claims(sub, &resource, scope)));
    let rule = json!({"name": "r1", "principals": ["*"], "tools": ["echo"]});

    // A viewer (a token with scope haven:viewer) reads, and may not change.
    let viewer = token("vera", "mcp haven:viewer");
    let r = viewer.get(admin_url("/auth/rules")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = viewer
        .post(admin_url("/auth/rules"))
        .json(&rule)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let why = r.text().await.unwrap();
    assert!(why.contains("admin role") && why.contains("#vera"), "{why}");
    let r = viewer
        .post(admin_url("/audit/checkpoint"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // An operator (an API key with the group haven:operator) operates, and may not change
    // rules.
    let out = cli_ok(
        &data,
        &[
            "auth",
            "keys",
            "create",
            "--name",
            "ops",
            "--group",
            "haven:operator",
            "--json",
        ],
    );
    let key: Value = serde_json::from_str(&out).unwrap();
    let operator = client(key["api_key"].as_str().unwrap());
    let r = operator
        .post(admin_url("/audit/checkpoint"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = operator
        .post(admin_url("/auth/rules"))
        .json(&rule)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // An admin changes rules; the audit record names the principal.
    let admin = token("ada", "haven:admin");
    let r = admin
        .post(admin_url("/auth/rules"))
        .json(&rule)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = admin
        .post(admin_url("/auth/rules"))
        .json(&json!({"name": "r1", "principals": ["*"], "tools": ["echo", "sleep"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "replacing answers 200");
    // Bad bodies: 400 and nothing changed.
    for bad in [
        json!({"name": "r2", "principals": ["*"]}),
        json!({"name": "r2", "principals": ["nobody"], "tools": ["x"]}),
        json!({"name": "r2", "principals": ["*"], "tools": ["x"], "extra": 1}),
        json!({"name": "r2", "principals": ["*"], "tools": ["x"], "updated_by": "me"}),
        json!(["r2"]),
    ] {
        let r = admin
            .post(admin_url("/auth/rules"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let v: Value = admin
        .get(admin_url("/auth/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["rules"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        v["rules"][0]["updated_by"],
        json!(format!("token:{}#ada", idp.issuer()))
    );
    cli_ok(&data, &["audit", "checkpoint"]);
    let set = cli_ok(&data, &["audit", "list", "--action", "auth.rule.set"]);
    assert!(set.contains("#ada") && set.contains("r1"), "{set}");
    let denied = cli_ok(&data, &["audit", "list", "--action", "call.denied"]);
    assert!(
        denied.contains("#vera") && denied.contains("key:"),
        "{denied}"
    );

    // Without a role: 403; with a bad token: 401; the admin token still works (break-glass).
    let nobody = token("nora", "mcp");
    let r = nobody.get(admin_url("/status")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = client("not-a-token")
        .get(admin_url("/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(h.status().await["authorization"]["rules"], json!(1));
}
