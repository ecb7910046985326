//! `haven registry|config|secrets|auth`: commands that talk to a running node's admin API. Output
//! is a table by default and the node's JSON with `--json`.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{admin_request, node_url, segment, token};
use crate::settings::{
    AuthCommand, AuthKeysCommand, AuthKeysCreateArgs, AuthKeysRevokeArgs, AuthRulesCommand,
    AuthRulesRemoveArgs, AuthRulesSetArgs, ConfigCommand, NodeArgs, RegistryAddArgs,
    RegistryCommand, SecretsCommand, SecretsDeleteArgs, SecretsListArgs, SecretsNewKeyArgs,
    SecretsRetireArgs, SecretsSetArgs,
};

struct Node {
    url: String,
    token: String,
    json: bool,
}

impl Node {
    fn from(a: &NodeArgs) -> Result<Node> {
        Ok(Node {
            url: node_url(a.node.as_ref(), a.data.as_ref()),
            token: token(a.admin_token_file.as_ref(), a.data.as_ref())?,
            json: a.json,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        admin_request(&self.url, &self.token, method, path, body).await
    }

    /// Prints `v` as JSON when asked to; returns whether it did.
    fn json(&self, v: &Value) -> Result<bool> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        }
        Ok(self.json)
    }
}

/// The admin API path of an upstream, its name checked first.
fn upstream_path(name: &str) -> Result<String> {
    haven_control::registry::validate_name(name)?;
    Ok(format!("/admin/v1/registry/{}", segment(name)))
}

/// The admin API path of a setting, its key checked first.
fn setting_path(key: &str) -> Result<String> {
    use haven_control::config::SETTINGS;
    if SETTINGS.iter().any(|d| d.key == key) {
        return Ok(format!("/admin/v1/config/{}", segment(key)));
    }
    bail!(
        "unknown setting '{key}'; known settings: {}",
        SETTINGS
            .iter()
            .map(|d| d.key)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The admin API path of a secret, its name checked first.
fn secret_path(name: &str) -> Result<String> {
    haven_secrets::validate_name(name)?;
    Ok(format!("/admin/v1/secrets/{}", segment(name)))
}

/// The elements of a JSON array; none when `v` is not one.
fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Prints rows as a table with a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Runs `haven registry ...`.
pub async fn registry(cmd: RegistryCommand) -> Result<ExitCode> {
    match cmd {
        RegistryCommand::Add(a) => registry_add(a).await,
        RegistryCommand::List(n) => {
            let node = Node::from(&n)?;
            let v = node.call(Method::GET, "/admin/v1/registry", None).await?;
            if node.json(&v)? {
                return Ok(ExitCode::SUCCESS);
            }
            let list = items(&v["upstreams"]);
            if list.is_empty() {
                println!(
                    "No upstreams registered. Add one with `haven registry add NAME --url URL` or `haven registry add NAME -- COMMAND ARGS...`."
                );
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = list.iter().map(upstream_row).collect();
            table(
                &[
                    "NAME",
                    "TRANSPORT",
                    "TARGET",
                    "STATE",
                    "TOOLS",
                    "LAST ERROR",
                ],
                &rows,
            );
            // What a stdio upstream that is not connected said last on its stderr.
            for u in list {
                let st = &u["status"];
                if st["state"] == "connected" {
                    continue;
                }
                if let Some(last) = st["stderr"].as_array().and_then(|l| l.last()) {
                    println!(
                        "{} stderr (last line; `haven registry show {}` has more): {}",
                        text(&u["name"]),
                        text(&u["name"]),
                        tail(&text(last), 100)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RegistryCommand::Show(a) => {
            let node = Node::from(&a.node)?;
            let v = node
                .call(Method::GET, &upstream_path(&a.name)?, None)
                .await?;
            if node.json(&v)? {
                return Ok(ExitCode::SUCCESS);
            }
            print_upstream(&v);
            Ok(ExitCode::SUCCESS)
        }
        RegistryCommand::Remove(a) => {
            let node = Node::from(&a.node)?;
            let v = node
                .call(Method::DELETE, &upstream_path(&a.name)?, None)
                .await?;
            if !node.json(&v)? {
                println!("Removed upstream '{}'.", a.name);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn target(v: &Value) -> String {
    match v["transport"].as_str() {
        Some("http") => text(&v["url"]),
        Some("stdio") => {
            let mut parts = vec![text(&v["command"])];
            for a in items(&v["args"]) {
                parts.push(text(a));
            }
            parts.join(" ")
        }
        _ => "?".into(),
    }
}

fn upstream_row(v: &Value) -> Vec<String> {
    let st = &v["status"];
    let state = if v["disabled"] == true {
        "disabled".to_owned()
    } else {
        st["state"].as_str().unwrap_or("unknown").to_owned()
    };
    vec![
        text(&v["name"]),
        text(&v["transport"]),
        target(v),
        state,
        st["tools"]
            .as_u64()
            .map(|n| n.to_string())
            .unwrap_or("-".into()),
        last_error(st),
    ]
}

/// The LAST ERROR column: the error's kind first (e.g. `unreachable`), then its text, cut at
/// the end when long (`haven registry show` has it whole).
fn last_error(status: &Value) -> String {
    let Some(e) = status["last_error"].as_str() else {
        return String::new();
    };
    let text = match status["last_error_reason"].as_str() {
        Some(r) => format!("{r}: {e}"),
        None => e.to_owned(),
    };
    head(&text, 70)
}

/// The first `n` characters of a text, marked when cut.
fn head(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        return text.to_owned();
    }
    let kept: String = text.chars().take(n - 1).collect();
    format!("{kept}…")
}

/// The last `n` characters of an error (its most specific part), marked when cut.
fn tail(text: &str, n: usize) -> String {
    let count = text.chars().count();
    if count <= n {
        return text.to_owned();
    }
    let rest: String = text.chars().skip(count - n + 1).collect();
    format!("…{rest}")
}

fn print_upstream(v: &Value) {
    println!("Upstream {}", text(&v["name"]));
    println!("  transport:   {}", text(&v["transport"]));
    println!("  target:      {}", target(v));
    if let Some(h) = v["headers"].as_object() {
        for (k, val) in h {
            println!("  header:      {k}: {}", text(val));
        }
    }
    if let Some(e) = v["env"].as_object() {
        for (k, val) in e {
            println!("  env:         {k}={}", text(val));
        }
    }
    if let Some(t) = v["timeout_ms"].as_u64() {
        println!("  timeout:     {t} ms");
    }
    if v["disabled"] == true {
        println!("  disabled:    yes");
    }
    if let Some(d) = v["description"].as_str() {
        println!("  description: {d}");
    }
    let st = &v["status"];
    if st.is_object() {
        println!("On this node:");
        for (k, val) in st.as_object().into_iter().flatten() {
            if k != "name" && k != "transport" && k != "stderr" {
                println!("  {:<22} {}", format!("{k}:"), text(val));
            }
        }
        if let Some(lines) = st["stderr"].as_array() {
            println!("  stderr (last {} lines):", lines.len());
            for l in lines {
                println!("    {}", text(l));
            }
        }
    }
}

fn pairs(items: &[String], what: &str, seps: &[char]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        let Some(at) = item.find(|c| seps.contains(&c)) else {
            if seps.contains(&':') {
                bail!("{what} {item:?} must be written 'Name: value' or Name=value");
            }
            bail!("{what} {item:?} must be written NAME=VALUE");
        };
        let (k, v) = item.split_at(at);
        out.insert(k.trim().to_owned(), v[1..].trim_start().to_owned());
    }
    Ok(out)
}

async fn registry_add(a: RegistryAddArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    let mut spec = json!({ "name": a.name });
    match (&a.url, a.command.is_empty()) {
        (Some(url), true) => {
            if !a.env.is_empty() || a.cwd.is_some() {
                bail!("--env and --cwd are for stdio upstreams; an HTTP upstream takes --header");
            }
            spec["transport"] = json!("http");
            spec["url"] = json!(url);
            spec["headers"] = json!(pairs(&a.headers, "header", &[':', '='])?);
        }
        (None, false) => {
            if !a.headers.is_empty() {
                bail!("--header is for HTTP upstreams; a stdio upstream takes --env");
            }
            spec["transport"] = json!("stdio");
            spec["command"] = json!(a.command[0]);
            spec["args"] = json!(a.command[1..]);
            spec["env"] = json!(pairs(&a.env, "environment variable", &['='])?);
            if let Some(c) = &a.cwd {
                spec["cwd"] = json!(c);
            }
        }
        (Some(_), false) => bail!("give either --url or a command after --, not both"),
        (None, true) => bail!(
            "say how to reach the upstream: --url http://HOST:PORT/mcp, or -- COMMAND ARGS... for stdio"
        ),
    }
    if let Some(t) = a.timeout_ms {
        spec["timeout_ms"] = json!(t);
    }
    if a.disabled {
        spec["disabled"] = json!(true);
    }
    if let Some(d) = &a.description {
        spec["description"] = json!(d);
    }
    let path = if a.replace {
        "/admin/v1/registry?replace=true"
    } else {
        "/admin/v1/registry"
    };
    let v = node.call(Method::POST, path, Some(&spec)).await?;
    if !node.json(&v)? {
        if a.disabled {
            println!(
                "Registered upstream '{}' ({}), disabled: it is not connected or served until enabled.",
                a.name,
                target(&v)
            );
        } else {
            println!(
                "Registered upstream '{}' ({}). Its tools are served as {}__TOOL; see `haven registry show {}`.",
                a.name,
                target(&v),
                a.name,
                a.name
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `haven config ...`.
pub async fn config(cmd: ConfigCommand) -> Result<ExitCode> {
    match cmd {
        ConfigCommand::List(n) => {
            let node = Node::from(&n)?;
            let v = node.call(Method::GET, "/admin/v1/config", None).await?;
            if node.json(&v)? {
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = items(&v["settings"])
                .iter()
                .map(|e| {
                    vec![
                        text(&e["key"]),
                        text(&e["value"]),
                        text(&e["source"]),
                        text(&e["help"]),
                    ]
                })
                .collect();
            table(&["KEY", "VALUE", "SOURCE", "MEANING"], &rows);
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Get(a) => {
            let node = Node::from(&a.node)?;
            let v = node.call(Method::GET, &setting_path(&a.key)?, None).await?;
            if !node.json(&v)? {
                print_setting(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Set(a) => {
            let node = Node::from(&a.node)?;
            let v = node
                .call(
                    Method::PUT,
                    &setting_path(&a.key)?,
                    Some(&json!({ "value": a.value })),
                )
                .await?;
            if !node.json(&v)? {
                println!(
                    "{} = {} (every node applies it as soon as it sees the change, without a restart)",
                    a.key,
                    text(&v["value"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Unset(a) => {
            let node = Node::from(&a.node)?;
            let v = node
                .call(Method::DELETE, &setting_path(&a.key)?, None)
                .await?;
            if !node.json(&v)? {
                println!("{} back to its default, {}", a.key, text(&v["value"]));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_setting(v: &Value) {
    println!("{} = {}", text(&v["key"]), text(&v["value"]));
    println!("  source:    {}", text(&v["source"]));
    println!("  default:   {}", text(&v["default"]));
    if !v["in_force"].is_null() && v["in_force"] != v["value"] {
        println!("  on this node still: {} (applying)", text(&v["in_force"]));
    }
    println!("  meaning:   {}", text(&v["help"]));
}

fn millis_text(v: &Value) -> String {
    v.as_u64()
        .map(haven_backup::fmt_millis)
        .unwrap_or_else(|| "-".into())
}

/// Runs `haven secrets ...`.
pub async fn secrets(cmd: SecretsCommand) -> Result<ExitCode> {
    match cmd {
        SecretsCommand::NewKey(a) => new_key(a).await,
        SecretsCommand::Set(a) => set_secret(a).await,
        SecretsCommand::List(a) => list_secrets(a).await,
        SecretsCommand::Delete(a) => delete_secret(a).await,
        SecretsCommand::RotateKey(n) => rotate_key(n).await,
        SecretsCommand::RetireKey(a) => retire_key(a).await,
        SecretsCommand::Keys(n) => show_keys(n).await,
    }
}

/// `haven secrets new-key`: a new key-encryption key in a key file (created if missing).
async fn new_key(a: SecretsNewKeyArgs) -> Result<ExitCode> {
    let kid = if a.key_file.exists() {
        haven_secrets::KekRing::append_new_key(&a.key_file)?
    } else {
        haven_secrets::KekRing::create_file(&a.key_file)?
    };
    println!(
        "Added key-encryption key {kid} to {}. Copy the file to every node, then run `haven secrets rotate-key`.",
        a.key_file.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `haven secrets set NAME`: the value from standard input or a file.
async fn set_secret(a: SecretsSetArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    let value = match &a.value_file {
        Some(f) => std::fs::read(f)
            .with_context(|| format!("reading the secret value from {}", f.display()))?,
        None if a.multiline => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            // One line: its line break is not part of the value.
            if buf.ends_with(b"\n") {
                buf.pop();
                if buf.ends_with(b"\r") {
                    buf.pop();
                }
            }
            if buf.contains(&b'\n') {
                bail!(
                    "standard input holds more than one line; pass --multiline to store all of it as the value (or --value-file FILE)"
                );
            }
            buf
        }
    };
    if a.value_file.is_some() && value.ends_with(b"\n") {
        eprintln!(
            "note: the value from {} ends with a line break, which is stored as part of it",
            a.value_file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        );
    }
    if value.is_empty() {
        bail!("the secret value is empty: pipe it on standard input or pass --value-file");
    }
    let body = match String::from_utf8(value) {
        Ok(s) => json!({ "value": s }),
        Err(e) => {
            use base64::Engine as _;
            json!({ "value_base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()) })
        }
    };
    let v = node
        .call(Method::PUT, &secret_path(&a.name)?, Some(&body))
        .await?;
    if !node.json(&v)? {
        println!(
            "Stored secret '{}' (version {}, under key {}). Reference it as ${{secret:{}}}.",
            a.name,
            text(&v["version"]),
            text(&v["kek"]),
            a.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven secrets list`.
async fn list_secrets(a: SecretsListArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    let path = if a.all {
        "/admin/v1/secrets?all=true"
    } else {
        "/admin/v1/secrets"
    };
    let v = node.call(Method::GET, path, None).await?;
    if node.json(&v)? {
        return Ok(ExitCode::SUCCESS);
    }
    let list = items(&v["secrets"]);
    if list.is_empty() {
        println!("No secrets. Store one with `haven secrets set NAME` (value on standard input).");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                text(&m["name"]),
                text(&m["version"]),
                text(&m["kek"]),
                millis_text(&m["updated_millis"]),
            ]
        })
        .collect();
    table(&["NAME", "VERSION", "KEY", "UPDATED"], &rows);
    Ok(ExitCode::SUCCESS)
}

/// `haven secrets delete NAME`.
async fn delete_secret(a: SecretsDeleteArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    let mut path = secret_path(&a.name)?;
    if a.force {
        path.push_str("?force=true");
    }
    let v = node.call(Method::DELETE, &path, None).await?;
    if !node.json(&v)? {
        println!("Deleted secret '{}'.", a.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven secrets rotate-key`: re-wraps data keys under the primary key and rotates the request-state key.
async fn rotate_key(n: NodeArgs) -> Result<ExitCode> {
    let node = Node::from(&n)?;
    let v = node
        .call(Method::POST, "/admin/v1/keys/rotate", None)
        .await?;
    if node.json(&v)? {
        return Ok(ExitCode::SUCCESS);
    }
    let k = &v["kek"];
    let moved: Vec<String> = k["rewrapped"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(kid, n)| format!("{} from {kid}", text(n)))
        .collect();
    println!(
        "Data keys now wrapped under {}: {}.",
        text(&k["primary"]),
        if moved.is_empty() {
            "none needed re-wrapping".to_owned()
        } else {
            format!("re-wrapped {}", moved.join(", "))
        }
    );
    let still: Vec<String> = items(&k["still_in_use"])
        .iter()
        .map(text)
        .filter(|kid| Some(kid.as_str()) != k["primary"].as_str())
        .collect();
    if still.is_empty() {
        println!(
            "No secret uses an older key-encryption key: older keys can be removed from the key files."
        );
    } else {
        println!(
            "Still in use: {} (a concurrent change or an unreadable record; run rotate-key again)",
            still.join(", ")
        );
    }
    println!(
        "Request state is now signed with {}; older keys still verify until retired.",
        text(&v["request_state"]["signing"])
    );
    Ok(ExitCode::SUCCESS)
}

/// `haven secrets retire-key KID`.
async fn retire_key(a: SecretsRetireArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    let v = node
        .call(
            Method::POST,
            "/admin/v1/keys/retire",
            Some(&json!({ "kid": a.kid })),
        )
        .await?;
    if !node.json(&v)? {
        println!(
            "Retired request-state key {}: values it sealed no longer verify.",
            a.kid
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven secrets keys`: key-encryption keys and request-state keys in use.
async fn show_keys(n: NodeArgs) -> Result<ExitCode> {
    let node = Node::from(&n)?;
    let v = node.call(Method::GET, "/admin/v1/keys", None).await?;
    if node.json(&v)? {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Key-encryption keys (primary {}):",
        text(&v["kek"]["primary"])
    );
    let usage = v["kek"]["usage"].as_object().cloned().unwrap_or_default();
    let owners = &v["kek"]["by_owner"];
    let known: Vec<String> = items(&v["kek"]["known"]).iter().map(text).collect();
    // SECRETS counts what `haven secrets list` shows; HAVEN'S OWN what `--all` adds.
    let counts = |kid: &str| -> (String, String) {
        match owners.get(kid) {
            Some(o) => (
                o["user"].as_u64().unwrap_or(0).to_string(),
                items(&o["haven"]).len().to_string(),
            ),
            None => (
                usage.get(kid).map(text).unwrap_or_else(|| "0".into()),
                "-".into(),
            ),
        }
    };
    let mut rows: Vec<Vec<String>> = known
        .iter()
        .map(|k| {
            let (user, own) = counts(k);
            vec![k.clone(), user, own, "in the key file".into()]
        })
        .collect();
    for kid in usage.keys() {
        if !known.contains(kid) {
            let (user, own) = counts(kid);
            rows.push(vec![
                kid.clone(),
                user,
                own,
                "MISSING from the key file".into(),
            ]);
        }
    }
    table(&["KID", "SECRETS", "HAVEN'S OWN", "WHERE"], &rows);
    let own: Vec<String> = owners
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
        .flat_map(|o| items(&o["haven"]))
        .map(text)
        .collect();
    if !own.is_empty() {
        println!(
            "HAVEN'S OWN: {} (`haven secrets list --all`); a key is needed while it wraps any secret.",
            crate::admin::describe_own_secrets(&own)
        );
    }
    println!();
    println!(
        "Request-state keys (signing {}):",
        text(&v["request_state"]["signing"])
    );
    let rows: Vec<Vec<String>> = items(&v["request_state"]["keys"])
        .iter()
        .map(|k| {
            vec![
                text(&k["kid"]),
                millis_text(&k["created_millis"]),
                if k["retired"] == true {
                    "retired"
                } else {
                    "live"
                }
                .into(),
            ]
        })
        .collect();
    table(&["KID", "CREATED", "STATE"], &rows);
    Ok(ExitCode::SUCCESS)
}

/// Runs `haven auth ...`.
pub async fn auth(cmd: AuthCommand) -> Result<ExitCode> {
    match cmd {
        AuthCommand::Keys(AuthKeysCommand::Create(a)) => create_api_key(a).await,
        AuthCommand::Keys(AuthKeysCommand::List(n)) => list_api_keys(n).await,
        AuthCommand::Keys(AuthKeysCommand::Revoke(a)) => revoke_api_key(a).await,
        AuthCommand::Rules(AuthRulesCommand::Set(a)) => set_rule(a).await,
        AuthCommand::Rules(AuthRulesCommand::List(n)) => list_rules(n).await,
        AuthCommand::Rules(AuthRulesCommand::Remove(a)) => remove_rule(a).await,
    }
}

/// `haven auth rules set`.
async fn set_rule(a: AuthRulesSetArgs) -> Result<ExitCode> {
    let rule = haven_auth::Rule {
        name: a.name,
        effect: if a.deny {
            haven_auth::Effect::Deny
        } else {
            haven_auth::Effect::Allow
        },
        principals: a.principals,
        tools: a.tools,
        resources: a.resources,
        prompts: a.prompts,
        description: a.description,
        updated_by: None,
        updated_at: None,
    };
    // Checked here first for a quick, clear answer; the node checks again.
    rule.validate()?;
    let node = Node::from(&a.node)?;
    let body = serde_json::to_value(&rule)?;
    let v = node
        .call(Method::POST, "/admin/v1/auth/rules", Some(&body))
        .await?;
    if !node.json(&v)? {
        println!(
            "Rule {} set: every node applies it as soon as its store has it.",
            text(&v["name"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven auth rules list`.
async fn list_rules(n: NodeArgs) -> Result<ExitCode> {
    let node = Node::from(&n)?;
    let v = node.call(Method::GET, "/admin/v1/auth/rules", None).await?;
    if node.json(&v)? {
        return Ok(ExitCode::SUCCESS);
    }
    let list = items(&v["rules"]);
    if list.is_empty() {
        println!(
            "No authorization rules: every principal that authenticates may use every tool, resource and prompt. Add one with `haven auth rules set NAME --principal SELECTOR --tool PATTERN`."
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                text(&r["name"]),
                text(&r["effect"]),
                list_text(&r["principals"]),
                list_text(&r["tools"]),
                list_text(&r["resources"]),
                list_text(&r["prompts"]),
                format!(
                    "{} by {}",
                    secs_text(&r["updated_at"]),
                    text(&r["updated_by"])
                ),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "EFFECT",
            "PRINCIPALS",
            "TOOLS",
            "RESOURCES",
            "PROMPTS",
            "UPDATED",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// `haven auth rules remove NAME`.
async fn remove_rule(a: AuthRulesRemoveArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    let v = node
        .call(
            Method::DELETE,
            &format!("/admin/v1/auth/rules/{}", segment(&a.name)),
            None,
        )
        .await?;
    if !node.json(&v)? {
        println!("Rule {} removed.", text(&v["name"]));
    }
    Ok(ExitCode::SUCCESS)
}

fn secs_text(v: &Value) -> String {
    v.as_u64()
        .map(haven_auth::apikeys::fmt_time)
        .unwrap_or_else(|| "-".into())
}

fn list_text(v: &Value) -> String {
    let l: Vec<String> = items(v).iter().map(text).collect();
    if l.is_empty() {
        "-".into()
    } else {
        l.join(",")
    }
}

/// `haven auth keys create`: the key is printed once.
async fn create_api_key(a: AuthKeysCreateArgs) -> Result<ExitCode> {
    // Checked here first for a quick, clear answer; the node checks again.
    for s in &a.scopes {
        haven_auth::apikeys::validate_scope(s)?;
    }
    for g in &a.groups {
        haven_auth::apikeys::validate_group(g)?;
    }
    let node = Node::from(&a.node)?;
    let body = json!({
        "name": a.name,
        "scopes": a.scopes,
        "groups": a.groups,
        "expires": a.expires,
    });
    let v = node
        .call(Method::POST, "/admin/v1/auth/keys", Some(&body))
        .await?;
    if node.json(&v)? {
        return Ok(ExitCode::SUCCESS);
    }
    let expires = match v["expires_at"].as_u64() {
        Some(_) => secs_text(&v["expires_at"]),
        None => "never".into(),
    };
    println!(
        "Created API key {} ({:?}): scopes {}, groups {}, expires {}.",
        text(&v["id"]),
        text(&v["name"]),
        list_text(&v["scopes"]),
        list_text(&v["groups"]),
        expires
    );
    println!("The key, shown this once (only a hash of it is kept; store it now):");
    println!("{}", text(&v["api_key"]));
    println!("Clients send it as `Authorization: Bearer <key>`.");
    Ok(ExitCode::SUCCESS)
}

/// `haven auth keys list`.
async fn list_api_keys(n: NodeArgs) -> Result<ExitCode> {
    let node = Node::from(&n)?;
    let v = node.call(Method::GET, "/admin/v1/auth/keys", None).await?;
    if node.json(&v)? {
        return Ok(ExitCode::SUCCESS);
    }
    let list = items(&v["keys"]);
    if list.is_empty() {
        println!("No API keys. Create one with `haven auth keys create --name NAME`.");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|k| {
            let state = match (k["state"].as_str(), k["revoked_at"].as_u64()) {
                (Some("revoked"), Some(_)) => format!(
                    "revoked {} by {}",
                    secs_text(&k["revoked_at"]),
                    text(&k["revoked_by"])
                ),
                _ => text(&k["state"]),
            };
            vec![
                text(&k["id"]),
                text(&k["name"]),
                list_text(&k["scopes"]),
                list_text(&k["groups"]),
                secs_text(&k["created_at"]),
                secs_text(&k["expires_at"]),
                state,
            ]
        })
        .collect();
    table(
        &[
            "ID", "NAME", "SCOPES", "GROUPS", "CREATED", "EXPIRES", "STATE",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// `haven auth keys revoke ID`.
async fn revoke_api_key(a: AuthKeysRevokeArgs) -> Result<ExitCode> {
    let node = Node::from(&a.node)?;
    // An id holds only a-z and 0-9; anything else names no key (and is not sent as a path).
    if a.id.is_empty()
        || !a
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        bail!(
            "no API key with id '{}' (an id is the 12 characters of a-z0-9 after hvn_; see `haven auth keys list`)",
            a.id
        );
    }
    let v = node
        .call(
            Method::POST,
            &format!("/admin/v1/auth/keys/{}/revoke", segment(&a.id)),
            None,
        )
        .await?;
    if !node.json(&v)? {
        println!(
            "Revoked API key {} ({:?}); every node refuses it from now on.",
            text(&v["id"]),
            text(&v["name"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_error_column_shows_the_kind_first_and_cuts_at_the_end() {
        let st = serde_json::json!({
            "last_error": "MCP handshake failed: error sending request for url (https://mcp.example.com/mcp), when send initialize request",
            "last_error_reason": "unreachable",
        });
        let shown = last_error(&st);
        assert_eq!(shown.chars().count(), 70);
        assert!(
            shown.starts_with("unreachable: MCP handshake failed: error sending request"),
            "{shown}"
        );
        assert!(shown.ends_with('…'), "{shown}");
        assert_eq!(last_error(&serde_json::json!({})), "");
        assert_eq!(
            last_error(&serde_json::json!({"last_error": "short"})),
            "short"
        );
    }
}
