//! `haven audit list|export|verify|checkpoint`: the audit log through a running node's admin
//! API (as `haven registry|config|secrets` do). A restored backup is checked by starting a
//! node on it and asking that node (`haven backup restore`, then `haven serve`, then
//! `haven audit verify --trusted-key …`).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{admin_request, node_url, token};
use crate::settings::{AuditCommand, AuditListArgs, AuditVerifyArgs, NodeArgs};

struct Node {
    url: String,
    token: String,
}

impl Node {
    fn from(a: &NodeArgs) -> Result<Node> {
        Ok(Node {
            url: node_url(a.node.as_ref(), a.data.as_ref()),
            token: token(a.admin_token_file.as_ref(), a.data.as_ref())?,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        admin_request(&self.url, &self.token, method, path, body).await
    }

    /// Every item of the log whose key starts with `prefix`, in key order.
    async fn all(&self, prefix: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/admin/v1/audit/records?limit=1000&prefix={prefix}");
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", crate::client::segment(a)));
            }
            let page = self.call(Method::GET, &path, None).await?;
            if let Some(items) = page["items"].as_array() {
                out.extend(items.iter().cloned());
            }
            match page["next_after"].as_str() {
                Some(a) => after = Some(a.to_owned()),
                None => return Ok(out),
            }
        }
    }
}

/// Runs `haven audit ...`.
pub async fn run(cmd: AuditCommand) -> Result<ExitCode> {
    match cmd {
        AuditCommand::List(a) => list(a).await,
        AuditCommand::Export(n) => {
            let node = Node::from(&n)?;
            for item in node.all("").await? {
                println!("{}", serde_json::to_string(&item)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify(a) => verify(a).await,
        AuditCommand::Checkpoint(n) => {
            let node = Node::from(&n)?;
            let v = node
                .call(Method::POST, "/admin/v1/audit/checkpoint", None)
                .await?;
            if n.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "signed a checkpoint of chain {}",
                    v["chain"].as_str().unwrap_or("?")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_since(text: &str) -> Result<u64> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    Ok(haven_backup::parse_time(text)?)
}

fn action_matches(filter: &str, action: &str) -> bool {
    match filter.strip_suffix('*') {
        Some(prefix) => action.starts_with(prefix),
        None if filter.ends_with('.') => action.starts_with(filter),
        None => action == filter,
    }
}

async fn list(a: AuditListArgs) -> Result<ExitCode> {
    let since = a.since.as_deref().map(parse_since).transpose()?;
    let node = Node::from(&a.node)?;
    let mut rows: Vec<Value> = node
        .all("r/")
        .await?
        .into_iter()
        .filter_map(|item| item.get("value").cloned())
        .filter(|v| since.is_none_or(|s| v["at_millis"].as_u64().unwrap_or(0) >= s))
        .filter(|v| {
            a.principal
                .as_deref()
                .is_none_or(|p| v["principal"].as_str() == Some(p))
        })
        .filter(|v| {
            a.action
                .as_deref()
                .is_none_or(|f| action_matches(f, v["action"].as_str().unwrap_or("")))
        })
        .collect();
    rows.sort_by_key(|v| {
        (
            v["at_millis"].as_u64().unwrap_or(0),
            v["hlc"].as_u64().unwrap_or(0),
        )
    });
    if a.node.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "records": rows }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("No audit records match.");
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|v| {
            [
                haven_backup::fmt_millis(v["at_millis"].as_u64().unwrap_or(0)),
                text(&v["principal"]),
                text(&v["action"]),
                text(&v["target"]),
                text(&v["outcome"]),
                text(&v["region"]) + "/" + &text(&v["node"]),
                format!("{}#{}", text(&v["chain"]), v["seq"]),
            ]
        })
        .collect();
    let header = [
        "TIME",
        "PRINCIPAL",
        "ACTION",
        "TARGET",
        "OUTCOME",
        "NODE",
        "RECORD",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &table {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            out.push_str(&format!("{c:<w$}  ", w = widths[i]));
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in &table {
        line(r.iter().map(String::as_str).collect());
    }
    Ok(ExitCode::SUCCESS)
}

/// The trusted keys given: each a key in hex, or a file holding keys one a line.
fn trusted_keys(given: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for g in given {
        if haven_audit::key::parse_public(g).is_some() {
            out.push(g.trim().to_owned());
            continue;
        }
        let path = std::path::Path::new(g);
        if !path.exists() {
            bail!(
                "--trusted-key {g:?} is neither a public key (64 hex characters) nor a file of them"
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if haven_audit::key::parse_public(l).is_none() {
                bail!(
                    "{}: {l:?} is not a public key (64 hex characters)",
                    path.display()
                );
            }
            out.push(l.to_owned());
        }
    }
    Ok(out)
}

async fn verify(a: AuditVerifyArgs) -> Result<ExitCode> {
    let keys = trusted_keys(&a.trusted_keys)?;
    let node = Node::from(&a.node)?;
    let v = node
        .call(
            Method::POST,
            "/admin/v1/audit/verify",
            Some(&json!({ "trusted_keys": keys })),
        )
        .await?;
    let ok = v["ok"].as_bool() == Some(true);
    if a.node.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let chains = v["chains"].as_array().cloned().unwrap_or_default();
        for c in &chains {
            let pruned = c["pruned_through"]
                .as_u64()
                .map(|p| format!(", records up to {p} pruned by retention"))
                .unwrap_or_default();
            println!(
                "chain {}: {} records ({}..{}), {} good checkpoints, signed through {}{pruned}",
                c["chain"].as_str().unwrap_or("?"),
                c["records"],
                c["first_seq"],
                c["last_seq"],
                c["checkpoints"],
                c["checkpointed_through"]
                    .as_u64()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        println!(
            "checkpoint keys ({}): {}",
            if v["keys_from"] == "given" {
                "given with --trusted-key"
            } else {
                "published in the store; pin them with --trusted-key"
            },
            v["keys"]
                .as_array()
                .map(|k| k
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
        for k in v["published_keys"].as_array().into_iter().flatten() {
            println!(
                "  key {} of chain {}: {}",
                k["kid"].as_str().unwrap_or("?"),
                k["chain"].as_str().unwrap_or("?"),
                k["public_key"].as_str().unwrap_or("?")
            );
        }
        let problems = v["problems"].as_array().cloned().unwrap_or_default();
        if ok {
            println!("the audit log verifies: no record altered, removed or reordered");
        } else {
            let first = &problems[0];
            println!(
                "FIRST BAD RECORD: {}/{} ({}): {}",
                first["chain"].as_str().unwrap_or("?"),
                first["seq"],
                first["kind"].as_str().unwrap_or("?"),
                first["detail"].as_str().unwrap_or("")
            );
            for p in problems.iter().skip(1) {
                println!(
                    "  also {}/{} ({}): {}",
                    p["chain"].as_str().unwrap_or("?"),
                    p["seq"],
                    p["kind"].as_str().unwrap_or("?"),
                    p["detail"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
