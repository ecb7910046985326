//! Issue 13 §2 and §4 on the real binary, with a real issuer on loopback (the testkit's
//! `TestIdp`, which Haven discovers through its metadata): the protected resource metadata,
//! the 401 challenge, the attack set refused over HTTP, scopes (403), API keys as a second way
//! in, and sessions, streams and tasks bound to the principal that created them.

mod common;

use common::auth::{bearer_client as client, cli_ok as cli, initialize, session};
use common::{Haven, LEGACY, Legacy, free_port};
use haven_testkit::idp::TestIdp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_api_keys_authenticate_and_sessions_and_tasks_belong_to_their_principal() {
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
            "--oauth-scopes",
            "mcp",
        ],
    )
    .await;
    let url = h.url();
    let anonymous = reqwest::Client::new();

    // RFC 9728 metadata, at the path-suffixed and the bare well-known URI, without credentials.
    let metadata_url = format!("http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp");
    for u in [
        metadata_url.clone(),
        format!("http://127.0.0.1:{port}/.well-known/oauth-protected-resource"),
    ] {
        let m: Value = anonymous
            .get(&u)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(m["resource"], resource, "{m}");
        assert_eq!(m["authorization_servers"], json!([idp.issuer()]), "{m}");
        assert_eq!(m["scopes_supported"], json!(["mcp"]), "{m}");
    }
    // Health stays open.
    let r = anonymous
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // No credential: 401 with the challenge that leads a client to the metadata.
    let r = initialize(&anonymous, &url).await;
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.starts_with("Bearer ")
            && challenge.contains(&format!("resource_metadata=\"{metadata_url}\""))
            && challenge.contains("scope=\"mcp\""),
        "{challenge}"
    );

    // The attack set, over HTTP: each 401 invalid_token, and nothing created.
    let good = idp.claims("alice", &resource, "mcp");
    let mut expired = good.clone();
    expired["exp"] = json!(good["iat"].as_u64().unwrap() - 300);
    let mut early = good.clone();
    early["nbf"] = json!(good["iat"].as_u64().unwrap() + 3600);
    let mut issuer = good.clone();
    issuer["iss"] = json!("http://127.0.0.1:1");
    let mut audience = good.clone();
    audience["aud"] = json!("http://127.0.0.1:1/mcp");
    let signed = idp.sign(&good);
    let (head, sig) = signed.rsplit_once('.').unwrap();
    let flipped = format!(
        "{head}.{}{}",
        if sig.starts_with('A') { 'B' } else { 'A' },
        &sig[1..]
    );
    let attacks = [
        ("alg none", idp.unsigned(&good)),
        (
            "HS256 with the public key",
            idp.sign_hs256_with_public_key(&good),
        ),
        ("expired", idp.sign(&expired)),
        ("not yet valid", idp.sign(&early)),
        ("wrong issuer", idp.sign(&issuer)),
        ("another resource", idp.sign(&audience)),
        ("unknown kid", idp.sign_with_unknown_key(&good, "rogue")),
        ("altered signature", flipped),
        ("garbage", "x.y.z".to_owned()),
        (
            "revoked-looking API key",
            "hvn_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".into(),
        ),
    ];
    for (what, token) in &attacks {
        let r = initialize(&client(token), &url).await;
        assert_eq!(r.status(), 401, "{what}");
        let c = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(c.contains("error=\"invalid_token\""), "{what}: {c}");
    }
    // A valid token without the required scope: 403 insufficient_scope.
    let r = initialize(
        &client(&idp.sign(&idp.claims("alice", &resource, "other"))),
        &url,
    )
    .await;
    assert_eq!(r.status(), 403);
    let c = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        c.contains("error=\"insufficient_scope\"") && c.contains("scope=\"mcp\""),
        "{c}"
    );

    // Alice works in both eras.
    let alice = client(&signed);
    let a = session(&alice, &url).await;
    let v = a
        .call_tool(
            1,
            "notes_put",
            json!({"name": "alice-note", "text": "mine"}),
        )
        .await;
    assert_eq!(v["result"]["isError"], json!(false), "{v}");
    let caps = json!({"extensions":{"io.modelcontextprotocol/tasks":{}}});
    let v: Value = common::stateless(
        &alice,
        &url,
        2,
        "tools/call",
        json!({"name":"echo","arguments":{"text":"hi"}}),
        caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");

    // Bob, with a valid token of his own, cannot use Alice's session: not found, as if it
    // did not exist — requests, the standalone stream, and its end.
    let bob = client(&idp.sign(&idp.claims("bob", &resource, "mcp")));
    let stolen = Legacy {
        client: bob.clone(),
        url: url.clone(),
        session: a.session.clone(),
    };
    let r = stolen
        .post_raw(json!({"jsonrpc":"2.0","id":3,"method":"tools/list"}))
        .await;
    assert_eq!(r.status(), 404);
    let r = bob
        .get(&url)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &a.session)
        .header("mcp-protocol-version", LEGACY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = bob
        .delete(&url)
        .header("mcp-session-id", &a.session)
        .header("mcp-protocol-version", LEGACY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Alice's session is untouched.
    let v = a.request(4, "tools/list", json!({})).await;
    assert!(v["result"]["tools"].is_array(), "{v}");

    // A stateless task of Alice's is not found by Bob, and is by Alice.
    let v: Value = common::stateless(
        &alice,
        &url,
        5,
        "tools/call",
        json!({"name":"sleep","arguments":{"seconds":2}}),
        caps.clone(),
    )
    .await
    .json()
    .await
    .unwrap();
    let task = v["result"]["taskId"]
        .as_str()
        .or(v["result"]["task"]["taskId"].as_str())
        .unwrap_or_else(|| panic!("no task: {v}"))
        .to_owned();
    let get = |c: reqwest::Client, id: i64| {
        let url = url.clone();
        let task = task.clone();
        let caps = caps.clone();
        async move {
            let v: Value =
                common::stateless(&c, &url, id, "tasks/get", json!({"taskId": task}), caps)
                    .await
                    .json()
                    .await
                    .unwrap();
            v
        }
    };
    let v = get(bob.clone(), 6).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not found")),
        "{v}"
    );
    let v = get(alice.clone(), 7).await;
    assert!(v.get("result").is_some(), "{v}");

    // An API key is a second way in; revoked, it is refused.
    let out = cli(
        &data,
        &[
            "auth", "keys", "create", "--name", "ci", "--scope", "mcp", "--json",
        ],
    );
    let created: Value = serde_json::from_str(&out).unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let id = created["id"]
        .as_str()
        .or(created["key"]["id"].as_str())
        .unwrap_or_else(|| panic!("{created}"))
        .to_owned();
    let k = session(&client(&key), &url).await;
    // The key's session is its own: Alice's token cannot use it.
    let stolen = Legacy {
        client: alice.clone(),
        url: url.clone(),
        session: k.session.clone(),
    };
    let r = stolen
        .post_raw(json!({"jsonrpc":"2.0","id":8,"method":"tools/list"}))
        .await;
    assert_eq!(r.status(), 404);
    cli(&data, &["auth", "keys", "revoke", &id]);
    let r = initialize(&client(&key), &url).await;
    assert_eq!(r.status(), 401);

    // The refusals are in the audit log, under no principal, and no token is. (A checkpoint
    // commits what the node queued before it: the records of the refused requests.)
    cli(&data, &["audit", "checkpoint"]);
    let out = cli(&data, &["audit", "list", "--action", "auth.failure"]);
    let listed = out;
    assert!(listed.contains("unauthenticated"), "{listed}");
    let out = cli(&data, &["audit", "export"]);
    let exported = out;
    assert!(!exported.contains(&signed) && !exported.contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_authentication_off_everything_is_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let r = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/.well-known/oauth-protected-resource",
            h.port
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A bearer credential is not looked at when authentication is off.
    let c = session(&client("anything"), &h.url()).await;
    let v = c.request(1, "tools/list", json!({})).await;
    assert!(v["result"]["tools"].is_array(), "{v}");
}

/// A sealed `requestState` is bound to the principal that got it and to the request's
/// arguments: replayed by another principal, or with other arguments, it is refused; its own
/// principal completes the request with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_state_replayed_by_another_principal_is_refused() {
    let idp = TestIdp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let resource = format!("http://127.0.0.1:{port}/mcp");
    let h = Haven::start(
        &dir.path().join("data"),
        port,
        "conformance",
        &[
            "--oauth-issuer",
            idp.issuer(),
            "--oauth-resource",
            &resource,
        ],
    )
    .await;
    let url = h.url();
    let alice = client(&idp.sign(&idp.claims("alice", &resource, "mcp")));
    let bob = client(&idp.sign(&idp.claims("bob", &resource, "mcp")));
    let caps = json!({"elicitation":{}});
    let tool = json!({"name":"test_input_required_result_request_state","arguments":{}});
    let first: Value = common::stateless(&alice, &url, 1, "tools/call", tool.clone(), caps.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let state = first["result"]["requestState"].as_str().unwrap().to_owned();
    let key = first["result"]["inputRequests"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let mut retry = tool.clone();
    retry["inputResponses"] = json!({ key: {"action":"accept","content":{"ok":true}} });
    retry["requestState"] = json!(state);
    let refused = |v: &Value| {
        v["error"]["code"] == -32602
            && v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("requestState"))
    };
    // Bob replays Alice's state.
    let v: Value = common::stateless(&bob, &url, 2, "tools/call", retry.clone(), caps.clone())
        .await
        .json()
        .await
        .unwrap();
    assert!(refused(&v), "{v}");
    // Alice, with other arguments.
    let mut other = retry.clone();
    other["arguments"] = json!({"extra": 1});
    let v: Value = common::stateless(&alice, &url, 3, "tools/call", other, caps.clone())
        .await
        .json()
        .await
        .unwrap();
    assert!(refused(&v), "{v}");
    // Alice, as issued.
    let v: Value = common::stateless(&alice, &url, 4, "tools/call", retry, caps)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["result"]["resultType"], "complete", "{v}");
}
