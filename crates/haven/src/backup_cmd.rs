//! `haven backup now|list|verify|restore|keygen`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use haven_backup::catalog::{Catalog, Generation};
use haven_backup::{BackupKey, Point, RestoreOptions, Target, fmt_millis};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{admin_call, node_url, token};
use crate::settings::{
    BackupCommand, BackupKeygenArgs, BackupListArgs, BackupNowArgs, BackupRestoreArgs,
    BackupTargetArgs, backup_target,
};

/// Runs a backup subcommand.
pub async fn run(cmd: BackupCommand) -> Result<ExitCode> {
    match cmd {
        BackupCommand::Keygen(a) => keygen(a),
        BackupCommand::Now(a) => now(a).await,
        BackupCommand::List(a) => list(a).await,
        BackupCommand::Verify(a) => verify(a).await,
        BackupCommand::Restore(a) => restore(a).await,
    }
}

/// `haven status`: asks a running node for its view of the region.
pub async fn status(a: crate::settings::NodeArgs) -> Result<ExitCode> {
    let node = node_url(a.node.as_ref(), a.data.as_ref());
    let token = token(a.admin_token_file.as_ref(), a.data.as_ref())?;
    let mut v = admin_call(&node, &token, reqwest::Method::GET, "/admin/v1/status").await?;
    // Every region and node, their health and traffic (a node older than the overview
    // has only its own region's nodes to show).
    let overview = admin_call(&node, &token, reqwest::Method::GET, "/admin/v1/overview")
        .await
        .ok();
    if a.json {
        if let Some(o) = overview {
            v["overview"] = o;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Region {} — asked node {} (version {}){}",
        v["region"].as_str().unwrap_or("?"),
        v["node"].as_str().unwrap_or("?"),
        v["version"].as_str().unwrap_or("?"),
        if v["draining"] == true {
            ", draining"
        } else {
            ""
        }
    );
    match &overview {
        Some(o) => print!("{}", crate::status::render_text(o)),
        None => print_nodes(&v["nodes"]),
    }
    if v["clock"]["skewed"] == true {
        println!();
        println!(
            "  warning: clocks of this region's nodes differ by up to {} ms (allowed {} ms); fix their time synchronisation (NTP). Liveness does not depend on clocks, but record expiry and timestamps do.",
            v["clock"]["max_offset_ms"], v["clock"]["allowed_skew_ms"]
        );
    }
    println!();
    print_store(&v["store"]);
    match v["writable"].as_str() {
        None => println!("Writable: yes"),
        Some(e) => println!("Writable: NO ({e})"),
    }
    if !v["backup"].is_null() {
        let also = v["backup"]["also"].as_array().cloned().unwrap_or_default();
        for b in std::iter::once(&v["backup"]).chain(&also) {
            println!(
                "Backup: {} to {}, lag {} entries ({} ms)",
                b["state"].as_str().unwrap_or("?"),
                b["target"].as_str().unwrap_or("?"),
                b["lag_entries"],
                b["lag_millis"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The nodes table of `haven status`.
/// `haven region promote|demote`: posts to `path` and prints the new roles.
pub async fn region_change(a: crate::settings::NodeArgs, path: &str) -> Result<ExitCode> {
    let node = node_url(a.node.as_ref(), a.data.as_ref());
    let token = token(a.admin_token_file.as_ref(), a.data.as_ref())?;
    let v = admin_call(&node, &token, reqwest::Method::POST, path).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "Roles, epoch {}: active region {} ({})",
            v["epoch"],
            v["active"].as_str().unwrap_or("none"),
            v["reason"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven region takeover`.
pub async fn region_takeover(a: crate::settings::RegionTakeoverArgs) -> Result<ExitCode> {
    if a.region.is_empty()
        || !a
            .region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        anyhow::bail!(
            "invalid region {:?}: a region's name is letters, digits, '-' and '_'",
            a.region
        );
    }
    let node = node_url(a.node.node.as_ref(), a.node.data.as_ref());
    let token = token(a.node.admin_token_file.as_ref(), a.node.data.as_ref())?;
    let path = format!(
        "/admin/v1/regions/takeover?region={}&confirm_dead={}",
        a.region, a.confirm_dead
    );
    let v = admin_call(&node, &token, reqwest::Method::POST, &path).await?;
    if a.node.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "took over {} running executions of region {}",
            v["taken"],
            v["region"].as_str().unwrap_or("?")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven region status`.
pub async fn region_status(a: crate::settings::RegionStatusArgs) -> Result<ExitCode> {
    let node = node_url(a.node.node.as_ref(), a.node.data.as_ref());
    let token = token(a.node.admin_token_file.as_ref(), a.node.data.as_ref())?;
    let path = if a.digest {
        "/admin/v1/regions?digest=true"
    } else {
        "/admin/v1/regions"
    };
    let v = admin_call(&node, &token, reqwest::Method::GET, path).await?;
    if a.node.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let writable = match v["writable"].as_str() {
        None => "writable".to_owned(),
        Some(e) => format!("NOT WRITABLE: {e}"),
    };
    println!(
        "Region {} (this one, {}) — asked node {}: nodes alive {}, {}",
        v["region"].as_str().unwrap_or("?"),
        v["role"].as_str().unwrap_or("?"),
        v["node"].as_str().unwrap_or("?"),
        v["nodes_alive"],
        writable
    );
    println!(
        "Roles epoch {}: active region {}{}",
        v["roles"]["epoch"],
        v["roles"]["active"].as_str().unwrap_or("none"),
        v["roles"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let unreachable: Vec<&str> = v["unreachable"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r.as_str()).collect())
        .unwrap_or_default();
    if !unreachable.is_empty() {
        println!(
            "warning: cut off from {}: this region keeps serving and taking writes; what those regions wrote since their last heartbeat here is missing until the link works again",
            unreachable.join(", ")
        );
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("No other region: this node applies no other region's log (--peer-regions).");
    } else {
        println!();
        println!(
            "  {:<16} {:<8} {:<12} {:<7} {:>10} {:>10} {:>8} {:>6}  LAST HEARD",
            "REGION", "ROLE", "LINK", "HEALTH", "APPLIED", "BEHIND", "LAG", "NODES"
        );
        for p in &peers {
            let behind = p["behind_entries"]
                .as_u64()
                .map_or("?".to_owned(), |b| b.to_string());
            let lag = p["lag_seconds"]
                .as_f64()
                .map_or("-".to_owned(), |l| format!("{l:.1}s"));
            let heard = match p["last_heartbeat_millis"].as_u64() {
                Some(ms) => fmt_millis(ms),
                None => "never".into(),
            };
            // The link of this node: `standby` there means another node of this region
            // applies that region's log.
            let link = match p["link"].as_str().unwrap_or("?") {
                "standby" => "other node",
                l => l,
            };
            let health = if p["silent"] == true { "SILENT" } else { "ok" };
            println!(
                "  {:<16} {:<8} {:<12} {:<7} {:>10} {:>10} {:>8} {:>6}  {}",
                p["name"].as_str().unwrap_or("?"),
                p["role"].as_str().unwrap_or("?"),
                link,
                health,
                p["applied_seq"].as_u64().unwrap_or(0).to_string(),
                behind,
                lag,
                p["nodes"].as_u64().unwrap_or(0).to_string(),
                heard
            );
            if let Some(e) = p["error"].as_str() {
                println!("    error: {e}");
            }
        }
    }
    print_takeovers(&v["takeover"]);
    if let Some(d) = v.get("digest") {
        println!();
        println!(
            "State digest: {} ({} records and events)",
            d["sha256"].as_str().unwrap_or("?"),
            d["items"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The region lease of the asked node and the automatic takeovers held there.
fn print_takeovers(t: &serde_json::Value) {
    match t["lease_holds"].as_bool() {
        None => return,
        Some(true) => println!(
            "Region lease: holds ({:.1} s left): work started now may be taken over by another region if this one fails",
            t["lease_remaining_seconds"].as_f64().unwrap_or(0.0)
        ),
        Some(false) => println!(
            "Region lease: LAPSED (a majority of regions has not echoed this region lately): work started now stays this region's; work that others may take over waits"
        ),
    }
    for (region, echo) in t["echoes"].as_object().cloned().unwrap_or_default() {
        if let Some(f) = echo["frozen"].as_object() {
            println!(
                "  frozen: this region no longer echoes {region} (for {}'s takeover, round {})",
                f.get("claimer").and_then(|c| c.as_str()).unwrap_or("?"),
                f.get("round").cloned().unwrap_or_default()
            );
        }
    }
    for x in t["takeovers"].as_array().cloned().unwrap_or_default() {
        println!(
            "  takeover of {} by {}, round {}: {} — {} ({} claimed) at {}",
            x["source"].as_str().unwrap_or("?"),
            x["claimer"].as_str().unwrap_or("?"),
            x["round"],
            x["stage"].as_str().unwrap_or("?"),
            x["reason"].as_str().unwrap_or(""),
            x["claimed"],
            fmt_millis(x["at_millis"].as_u64().unwrap_or(0))
        );
    }
}

fn print_nodes(nodes: &serde_json::Value) {
    println!();
    println!(
        "  {:<20} {:<8} {:<22} {:<12} {:<10} BOOT",
        "NODE", "STATE", "LAST HEARTBEAT", "CLOCK", "VERSION"
    );
    for n in nodes.as_array().cloned().unwrap_or_default() {
        let info = &n["info"];
        let state = if info["left"] == true {
            "left"
        } else if n["alive"] == true {
            if info["draining"] == true {
                "draining"
            } else {
                "alive"
            }
        } else {
            "dead"
        };
        // The heartbeat's age as this node measured it (no clock comparison).
        let silent = n["silent_millis"].as_u64().unwrap_or(0);
        let beat = format!("{:.1}s ago", silent as f64 / 1000.0);
        let clock = match n["clock_offset_millis"].as_i64() {
            Some(o) if n["clock_skewed"] == true => format!("{o:+}ms SKEW"),
            Some(o) => format!("{o:+}ms"),
            None => "-".into(),
        };
        println!(
            "  {:<20} {:<8} {:<22} {:<12} {:<10} {}",
            info["node"].as_str().unwrap_or("?"),
            state,
            beat,
            clock,
            info["version"].as_str().unwrap_or("?"),
            info["boot"].as_str().unwrap_or("?")
        );
    }
}

/// The store's part of `haven status`.
fn print_store(store: &serde_json::Value) {
    match store["backend"].as_str() {
        Some("nats") => {
            println!(
                "Store: NATS JetStream stream {}, {} replicas, leader {}, last sequence {}, applied here {}",
                store["stream"].as_str().unwrap_or("?"),
                number_or_unknown(&store["replicas"]),
                store["leader"].as_str().unwrap_or("none"),
                number_or_unknown(&store["last_seq"]),
                number_or_unknown(&store["applied_seq"])
            );
            println!(
                "  connected to {} ({}:{}), {}",
                store["connected_server"]["name"].as_str().unwrap_or("?"),
                store["connected_server"]["host"].as_str().unwrap_or("?"),
                number_or_unknown(&store["connected_server"]["port"]),
                store["connection"].as_str().unwrap_or("?")
            );
            for p in store["peers"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  replica {}: {}{}, lag {}",
                    p["name"].as_str().unwrap_or("?"),
                    if p["current"] == true {
                        "current"
                    } else {
                        "behind"
                    },
                    if p["offline"] == true {
                        ", OFFLINE"
                    } else {
                        ""
                    },
                    number_or_unknown(&p["lag"])
                );
            }
            let sync = &store["sync"];
            if sync["checked"] == true {
                let servers = sync["servers"].as_array().cloned().unwrap_or_default();
                let not: Vec<String> = servers
                    .iter()
                    .filter(|s| s["sync_always"] == false)
                    .map(|s| s["server"].as_str().unwrap_or("?").to_owned())
                    .collect();
                let unknown = servers.iter().filter(|s| s["error"].is_string()).count();
                if !not.is_empty() {
                    println!(
                        "  WARNING: not every write is synced to disk on {} (set jetstream {{ sync_interval: always }})",
                        not.join(", ")
                    );
                } else if unknown > 0 {
                    println!(
                        "  sync to disk: unknown on {unknown} of {} servers (their /varz could not be read)",
                        servers.len()
                    );
                } else {
                    println!(
                        "  sync to disk: every write, on all {} servers checked",
                        servers.len()
                    );
                }
            } else if sync["checked"] == false {
                println!("  sync to disk: not checked (--nats-monitor)");
            }
            if let Some(e) = store["error"].as_str() {
                println!("  ERROR: {e}");
            }
        }
        _ => println!("Store: embedded (redb)"),
    }
}

/// A number from a status answer, or "unknown" when it is absent (an older node, or a
/// value the store did not report), never JSON's `null`.
fn number_or_unknown(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => n.to_string(),
        _ => "unknown".into(),
    }
}

fn keygen(a: BackupKeygenArgs) -> Result<ExitCode> {
    if a.out.exists() {
        bail!(
            "{} already exists; keygen never overwrites a key (a lost key makes its backups unreadable)",
            a.out.display()
        );
    }
    let key = BackupKey::generate();
    crate::admin::write_private(&a.out, format!("{}\n", key.to_hex()).as_bytes())?;
    println!(
        "created {} (fingerprint {})",
        a.out.display(),
        key.fingerprint()
    );
    println!(
        "keep a copy outside the node's data directory: without it the backups cannot be read"
    );
    Ok(ExitCode::SUCCESS)
}

pub fn open_target(a: &BackupTargetArgs) -> Result<(Target, Option<BackupKey>)> {
    let (url, key_source) = backup_target(a)?;
    let target = Target::open_existing(&url)?;
    let key = key_source.map(|k| k.backup_key()).transpose()?;
    Ok((target, key))
}

/// The point `--at TIME` or `--seq N` names (neither: the latest backed-up change).
pub fn point_of(at: Option<&str>, seq: Option<u64>) -> Result<Point> {
    Ok(match (at, seq) {
        (Some(t), _) => Point::Time(haven_backup::parse_time(t)?),
        (None, Some(n)) => Point::Seq(n),
        (None, None) => Point::Latest,
    })
}

pub fn require_key(key: Option<BackupKey>) -> Result<BackupKey> {
    key.context("this command reads the backup's content: pass --backup-key-file FILE or --backup-key-command COMMAND (or set HAVEN_BACKUP_KEY_FILE or HAVEN_BACKUP_KEY_COMMAND)")
}

async fn now(a: BackupNowArgs) -> Result<ExitCode> {
    let node = node_url(a.node.node.as_ref(), a.node.data.as_ref());
    let token = token(a.node.admin_token_file.as_ref(), a.node.data.as_ref())?;
    let spinner = ProgressBar::new_spinner().with_message("shipping");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let path = if a.snapshot {
        "/admin/v1/backup/now?snapshot=true"
    } else {
        "/admin/v1/backup/now"
    };
    let r = admin_call(&node, &token, reqwest::Method::POST, path).await;
    spinner.finish_and_clear();
    let r = r?;
    if a.node.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "shipped {} entries in {} segment(s){}; the backup holds generation {} up to sequence {}",
            r["entries"],
            r["segments"],
            if r["snapshot"].as_bool() == Some(true) {
                " and a snapshot"
            } else {
                ""
            },
            r["generation"].as_str().unwrap_or("?"),
            r["shipped_seq"]
        );
        if let Some(why) = r["snapshot_skipped"].as_str() {
            println!("no new snapshot: {why}");
        }
        let also = r["also"].as_array().cloned().unwrap_or_default();
        for o in &also {
            if let Some(why) = o["snapshot_skipped"].as_str() {
                println!("no new snapshot in the additional backup: {why}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / 1024.0 / 1024.0 / 1024.0)
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

fn age(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn list(l: BackupListArgs) -> Result<ExitCode> {
    let a = &l.target;
    let (target, _) = open_target(a)?;
    let catalog = Catalog::load(&target).await?;
    let verification = haven_backup::verify::load_latest(&target).await?;
    // The live lag, when the node answers.
    let node = node_url(l.node.as_ref(), l.data.as_ref());
    let live = match token(l.admin_token_file.as_ref(), l.data.as_ref()) {
        Ok(t) => admin_call(&node, &t, reqwest::Method::GET, "/admin/v1/backup")
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let now = now_millis();
    let last_segment = catalog
        .generations
        .iter()
        .flat_map(|g| g.segments.iter())
        .map(|s| s.created_millis)
        .max();
    if a.json {
        let out = list_json(&target, &catalog, last_segment, &verification, &live);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(dep) = &catalog.deployment else {
        println!("{} holds no Haven backup yet", target.url());
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "Backup at {} — deployment {}, key {}",
        target.url(),
        dep.id,
        dep.key_fingerprint
    );
    for g in &catalog.generations {
        print_generation(g);
    }
    println!();
    match last_segment {
        Some(t) => println!("Last segment written: {} ({})", fmt_millis(t), age(now, t)),
        None => println!("Last segment written: never"),
    }
    match &verification {
        Some(v) => println!(
            "Last verification: {} ({}): {}, {} objects",
            fmt_millis(v.checked_at_millis),
            age(now, v.checked_at_millis),
            if v.ok {
                "intact".to_owned()
            } else {
                format!("{} problem(s)", v.problems.len() + v.gaps.len())
            },
            v.objects
        ),
        None => println!("Last verification: never"),
    }
    match live {
        Ok(v) if v["target"].as_str() != Some(target.url()) => println!(
            "Node lag: unknown (the node at {node} ships to {}, not to this backup)",
            v["target"].as_str().unwrap_or("?")
        ),
        Ok(v) => println!(
            "Node lag: {} entries ({} ms behind), state {}",
            v["lag_entries"],
            v["lag_millis"],
            v["state"].as_str().unwrap_or("?")
        ),
        Err(e) => println!("Node lag: unknown ({e})"),
    }
    if !catalog.unreferenced.is_empty() {
        println!(
            "{} unreferenced object(s) (interrupted uploads; removed by retention)",
            catalog.unreferenced.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `haven backup list --json`.
fn list_json(
    target: &Target,
    catalog: &Catalog,
    last_segment: Option<u64>,
    verification: &Option<haven_backup::verify::VerifyReport>,
    live: &Result<serde_json::Value, String>,
) -> serde_json::Value {
    let gens: Vec<_> = catalog
        .generations
        .iter()
        .map(|g| {
            serde_json::json!({
                "id": g.id,
                "info": g.info,
                "restorable": g.restorable(),
                "gaps": g.gaps(),
                "snapshots": g.snapshots,
                "segments": g.segments,
            })
        })
        .collect();
    serde_json::json!({
        "target": target.url(),
        "deployment": catalog.deployment,
        "generations": gens,
        "unreferenced_objects": catalog.unreferenced.len(),
        "last_segment_millis": last_segment,
        "last_verification": verification,
        "node": match &live { Ok(v) => v.clone(), Err(e) => serde_json::json!({ "unreachable": e }) },
    })
}

/// One generation of `haven backup list`: what it can restore, its snapshots, segments and gaps.
fn print_generation(g: &Generation) {
    let seg_bytes: u64 = g.segments.iter().map(|s| s.size).sum();
    println!();
    println!(
        "Generation {}{}",
        g.id,
        g.info
            .as_ref()
            .map(|i| format!(
                " (started {} by {} at sequence {})",
                fmt_millis(i.created_millis),
                i.origin,
                i.start_seq
            ))
            .unwrap_or_default()
    );
    match g.restorable() {
        Some(r) => println!(
            "  restorable: {} (seq {}) → {} (seq {})",
            fmt_millis(r.first_millis),
            r.first_seq,
            fmt_millis(r.last_millis),
            r.last_seq
        ),
        None => println!("  restorable: nothing (no snapshot)"),
    }
    println!(
        "  {:<10} {:>22} {:>26} {:>10}  CLASS",
        "SNAPSHOT", "SEQUENCE", "AS OF", "SIZE"
    );
    for s in &g.snapshots {
        println!(
            "  {:<10} {:>22} {:>26} {:>10}  {}",
            "",
            s.last_seq,
            fmt_millis(s.last_millis),
            size(s.size),
            s.storage_class.as_deref().unwrap_or("standard")
        );
    }
    if let (Some(f), Some(l)) = (g.segments.first(), g.segments.last()) {
        println!(
            "  segments: {} covering sequences {}..={} ({} → {}), {}",
            g.segments.len(),
            f.first_seq,
            l.last_seq,
            fmt_millis(f.first_millis),
            fmt_millis(l.last_millis),
            size(seg_bytes)
        );
    } else {
        println!("  segments: none");
    }
    for gap in g.gaps() {
        println!(
            "  GAP: sequences {}..{} missing ({} → {})",
            gap.after_seq + 1,
            gap.resumes_at_seq - 1,
            fmt_millis(gap.after_millis),
            fmt_millis(gap.resumes_at_millis)
        );
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} objects ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

async fn verify(a: BackupTargetArgs) -> Result<ExitCode> {
    let (target, key) = open_target(&a)?;
    let key = require_key(key)?;
    let pb = bar(0, "verifying");
    let started = Instant::now();
    let report = haven_backup::verify::verify(&target, &key, now_millis(), &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })
    .await;
    pb.finish_and_clear();
    let report = report?;
    haven_backup::verify::save(&target, &report).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} objects ({}) in {:.1} s: {}",
            report.objects,
            size(report.bytes),
            started.elapsed().as_secs_f64(),
            if report.ok {
                "intact and continuous"
            } else {
                "DAMAGED"
            }
        );
        for p in &report.problems {
            println!("  {p}");
        }
        for g in &report.gaps {
            println!(
                "  chain break in generation {}: sequences {}..{} cannot be restored ({} → {})",
                g.generation,
                g.after_seq + 1,
                g.resumes_at_seq.saturating_sub(1),
                fmt_millis(g.after_millis),
                fmt_millis(g.resumes_at_millis)
            );
        }
        if report.unreferenced > 0 {
            println!(
                "  {} unreferenced object(s) (interrupted uploads; not damage)",
                report.unreferenced
            );
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn restore(a: BackupRestoreArgs) -> Result<ExitCode> {
    let (target, key) = open_target(&a.target)?;
    let key = require_key(key)?;
    let point = point_of(a.at.as_deref(), a.seq)?;
    let opts = RestoreOptions {
        to: a.to.clone(),
        point,
        generation: a.generation.clone(),
        overwrite: a.overwrite,
    };
    let pb = bar(0, "restoring");
    let started = Instant::now();
    let report = haven_backup::restore(&target, &key, &opts, &|done, total, entries| {
        pb.set_length(total);
        pb.set_position(done);
        pb.set_message(format!("restoring ({entries} entries)"));
    })
    .await;
    pb.finish_and_clear();
    let report = report?;
    let secs = started.elapsed().as_secs_f64();
    let warning = match point {
        Point::Time(t) => lag_warning(t, &report),
        _ => None,
    };
    let steps = next_steps(&a.to).await;
    if a.target.json {
        let mut v = serde_json::to_value(&report)?;
        v["warnings"] = serde_json::json!(warning.iter().collect::<Vec<_>>());
        v["next_steps"] = serde_json::to_value(&steps)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "restored {} from generation {}: the state as of sequence {} ({}), {} entries from {} objects ({}) in {:.1} s ({:.0} entries/s)",
            a.to.display(),
            report.generation,
            report.restored_seq,
            fmt_millis(report.restored_millis),
            report.entries,
            report.objects,
            size(report.bytes),
            secs,
            report.entries as f64 / secs.max(1e-9)
        );
        for p in &report.problems {
            println!("  damaged: {p}");
        }
        if let Some(l) = &report.lost {
            println!(
                "  INCOMPLETE: changes from sequence {} on (after {}) could not be restored: {}",
                l.from_seq,
                fmt_millis(l.after_millis),
                l.reason
            );
        }
        if let Some(w) = &warning {
            println!("warning: {w}");
        }
        println!();
        println!(
            "Before {} can serve (checked in the restored state):",
            a.to.display()
        );
        for step in &steps {
            println!("  - {}: {}", step.item, step.text);
        }
    }
    Ok(if report.complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// A restore `--at TIME` later than the newest change the backup holds: the backup may lag
/// behind TIME (changes committed before TIME but not shipped are not in it).
fn lag_warning(at: u64, report: &haven_backup::RestoreReport) -> Option<String> {
    if at <= report.newest_millis {
        return None;
    }
    Some(format!(
        "{} is after the newest change the backup holds (sequence {}, committed {}, {} before it): the backup may lag behind that time, and what was committed after {} and not yet shipped is not in it{}",
        fmt_millis(at),
        report.newest_seq,
        fmt_millis(report.newest_millis),
        span(at - report.newest_millis),
        fmt_millis(report.newest_millis),
        if report.last_written_millis > 0 {
            format!(
                " (the backup was last written {})",
                fmt_millis(report.last_written_millis)
            )
        } else {
            String::new()
        }
    ))
}

/// A duration in words: `2 h 5 min`, `3 min 12 s`, `850 ms`.
fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms} ms"),
        1..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} days {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// One thing a restored data directory needs before it serves.
#[derive(serde::Serialize)]
struct Step {
    item: &'static str,
    text: String,
}

/// What the restored directory `dir` still needs before it can serve, read from its state:
/// the secrets key file, the admin token, what its registered upstreams do, its node id.
async fn next_steps(dir: &std::path::Path) -> Vec<Step> {
    let d = dir.display();
    let mut steps = Vec::new();
    let store = haven_state::RedbStore::open(
        dir,
        haven_state::Origin::new("restore", "check"),
        std::sync::Arc::new(haven_state::HybridClock::default()),
    );
    let (secrets, upstreams) = match &store {
        Ok(s) => (
            haven_secrets::kek_usage_by_owner_in(s)
                .await
                .map_err(|e| e.to_string()),
            registered_upstreams(s).await.map_err(|e| e.to_string()),
        ),
        Err(e) => (Err(e.to_string()), Err(e.to_string())),
    };
    drop(store);
    steps.push(Step {
        item: "secrets key",
        text: match secrets {
            Ok(usage) if usage.is_empty() => format!(
                "the restored state holds no secret; a new key file is created as {d}/secrets.keys on first start (or give the deployment's with --secrets-key-file FILE)"
            ),
            Ok(usage) => format!(
                "the restored state holds {} wrapped by key-encryption key(s) {}: copy the deployment's secrets key file as it is after its latest rotation (`haven secrets new-key`/`rotate-key`; it must hold {}) to {d}/secrets.keys, or start with --secrets-key-file FILE or --secrets-key-command COMMAND; without it the node refuses to start. Backups never hold that key",
                crate::admin::describe_wrapped(
                    usage.values().map(|w| w.user).sum(),
                    &usage
                        .values()
                        .flat_map(|w| w.haven.iter().cloned())
                        .collect::<Vec<_>>()
                ),
                usage.keys().cloned().collect::<Vec<_>>().join(", "),
                if usage.len() == 1 { "that key" } else { "every one of them" }
            ),
            Err(e) => format!(
                "could not read the restored secrets ({e}); the node needs the deployment's secrets key file as it is after its latest rotation ({d}/secrets.keys or --secrets-key-file FILE)"
            ),
        },
    });
    steps.push(Step {
        item: "admin token",
        text: format!(
            "backups do not hold it: start with the old node's token (--admin-token-file FILE, or copy it to {d}/admin.token, owner-only) or let the node create a new {d}/admin.token on first start, and give the new one to whoever uses the admin API"
        ),
    });
    steps.push(Step {
        item: "upstreams",
        text: match upstreams {
            Ok(names) if names.is_empty() => {
                "no upstream is registered in the restored state".to_owned()
            }
            Ok(names) => format!(
                "{} registered upstream(s) ({}) start when it serves: stdio upstreams' processes are spawned and HTTP upstreams are called. To serve without starting them (a restore drill), start it with `haven serve --data {d} --hold-upstreams`",
                names.len(),
                names.join(", ")
            ),
            Err(e) => format!(
                "could not read the registry ({e}); registered upstreams start when it serves (`haven serve --hold-upstreams` holds them)"
            ),
        },
    });
    steps.push(Step {
        item: "node id",
        text: format!(
            "the restored node gets a new node id on first start ({d}/node-id; backups do not hold the old one) and a new audit signing key ({d}/audit.key); `haven status` shows the new id"
        ),
    });
    steps.push(Step {
        item: "backups",
        text: "started with --backup-url it ships a new generation; for a drill, serve it without --backup-url".to_owned(),
    });
    steps.push(Step {
        item: "then",
        text: format!(
            "`haven serve --data {d} ...`, and check it with `haven status --data {d}` and `haven registry list --data {d}`"
        ),
    });
    steps
}

/// Names of the enabled upstreams registered in `store`.
async fn registered_upstreams(store: &haven_state::RedbStore) -> Result<Vec<String>> {
    use haven_state::Store as _;
    let mut names = Vec::new();
    for r in store
        .scan_all(haven_control::registry::REGISTRY_NS, "")
        .await?
    {
        let spec: serde_json::Value = serde_json::from_slice(r.value()).unwrap_or_default();
        if spec["disabled"] != true {
            names.push(r.record.key.clone());
        }
    }
    Ok(names)
}
