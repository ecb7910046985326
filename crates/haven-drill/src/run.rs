//! Running drills: load through the load balancer, the fault and its repair at their times,
//! then the read-back and the report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::DrillError;
use crate::described::Described;
use crate::link::LinkState;
use crate::load::{self, Ack, Load, LoadOptions, Recorder};
use crate::local::Local;
use crate::report::{Inputs, Mark, Report};
use crate::scenario::{Component, Fault, Scenario};

/// How each drill runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Load before the fault.
    pub warmup: Duration,
    /// Load after the repair (and the scenario's own measurement).
    pub after: Duration,
    /// How long a kill or an outage lasts before its repair (`None`: the scenario's own).
    pub outage: Option<Duration>,
    /// Requests per second of the paced clients.
    pub rate: f64,
    /// Seconds each long call sleeps.
    pub long_seconds: u32,
    /// Where reports are kept (a directory per drill).
    pub reports: PathBuf,
}

/// A finished drill: its report and the directory it was written to.
pub struct Finished {
    /// The report.
    pub report: Report,
    /// Its directory (`report.json`, `report.md`, `timeline.svg`).
    pub dir: PathBuf,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Marks {
    rec: Arc<Recorder>,
    list: Vec<Mark>,
    /// A point-in-time restore's point (seconds since the start).
    restore_point: Option<f64>,
}

impl Marks {
    fn add(&mut self, kind: &str, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(at = self.rec.now(), kind, "{what}");
        self.list.push(Mark {
            at: self.rec.now(),
            kind: kind.into(),
            what,
        });
    }
}

/// What a drill runs against.
pub enum Target<'a> {
    /// A deployment this program started ([`Local`]).
    Local(&'a mut Local),
    /// An existing deployment, described in a file ([`Described`]).
    Described(&'a Described),
}

impl Target<'_> {
    pub(crate) fn lb_base(&self) -> String {
        match self {
            Target::Local(l) => l.lb_base(),
            Target::Described(d) => d.load_balancer.clone(),
        }
    }

    pub(crate) fn node_bases(&self) -> Vec<String> {
        match self {
            Target::Local(l) => l.node_bases(),
            Target::Described(d) => d.node_bases(),
        }
    }

    pub(crate) fn admin_token(&self) -> String {
        match self {
            Target::Local(l) => l.admin_token().to_owned(),
            Target::Described(d) => d.admin_token().to_owned(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Target::Local(l) if l.two_regions() => "a local deployment of two regions, A and B (each one NATS server in its own JetStream domain and one Haven node, B's leafnode link to A cuttable), HAProxy as the global load balancer".to_owned(),
            Target::Local(l) => format!(
                "a local deployment ({} NATS servers in one JetStream cluster, {} Haven nodes, HAProxy{})",
                l.nats_count(),
                l.node_bases().len(),
                l.backup_place()
                    .map(|p| format!(", a backup every second to {p}"))
                    .unwrap_or_default()
            ),
            Target::Described(d) => format!(
                "the deployment '{}' ({} nodes behind {})",
                d.name,
                d.nodes.len(),
                d.load_balancer
            ),
        }
    }

    /// Waits until the deployment is whole again (what each drill starts from).
    pub(crate) async fn ensure_ready(&mut self) -> Result<(), DrillError> {
        match self {
            Target::Local(l) => l.ensure_all_ready().await,
            Target::Described(d) => {
                let http = reqwest::Client::new();
                let deadline = Instant::now() + Duration::from_secs(300);
                for base in d.node_bases().iter().chain([&d.load_balancer]) {
                    let url = format!("{base}/readyz");
                    while crate::local::http_status(&http, &url).await != Some(200) {
                        if Instant::now() > deadline {
                            return Err(DrillError::Deployment(format!(
                                "{url} did not answer 200 within 5 minutes"
                            )));
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Runs `scenarios` one after another, each with its own load and report. The deployment
/// must be whole before each drill starts (it is waited for, at most 5 minutes).
pub async fn run_all(
    mut target: Target<'_>,
    scenarios: &[Scenario],
    opts: &RunOptions,
    on_done: &mut dyn FnMut(&Finished),
) -> Result<Vec<Finished>, DrillError> {
    let mut done = Vec::new();
    for s in scenarios {
        target.ensure_ready().await?;
        let f = run_one(&mut target, s, opts).await?;
        if let Target::Described(d) = &target {
            // What the deployment's own monitoring shows of its drills.
            match d.record(&f.report).await {
                Ok(node) => tracing::info!("the drill's result is recorded (by {node})"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        on_done(&f);
        done.push(f);
    }
    target.ensure_ready().await?;
    Ok(done)
}

async fn run_one(
    target: &mut Target<'_>,
    scenario: &Scenario,
    opts: &RunOptions,
) -> Result<Finished, DrillError> {
    let started_unix = unix_now();
    let run = format!("{started_unix}-{}", scenario.name);
    let rec = Recorder::new();
    let base = target.lb_base();
    let token = target.admin_token();
    let load = Load::start(
        LoadOptions {
            base: base.clone(),
            admin_token: Some(token.clone()),
            rate: opts.rate,
            clients_per_kind: 2,
            long_clients: 3,
            task_clients: 2,
            long_seconds: opts.long_seconds,
            run,
        },
        rec.clone(),
    );
    let mut marks = Marks {
        rec: rec.clone(),
        list: Vec::new(),
        restore_point: None,
    };
    tokio::time::sleep(opts.warmup).await;
    let outage = opts.outage.unwrap_or(scenario.outage);
    let mut measured = Vec::new();
    let admin = Admin {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a client with no TLS settings always builds"),
        token,
        nodes: target.node_bases(),
    };
    let mut overload_figures = None;
    let fault = match target {
        _ if scenario.fault == Fault::Overload => {
            let nodes = target.node_bases();
            let figures = crate::overload::overload(&base, &nodes, &admin.token, outage, |rate| {
                marks.add(
                    "fault",
                    format!("{rate:.0} calls/s offered (twice the capacity)"),
                )
            })
            .await;
            marks.add("repair", "the overload stopped");
            overload_figures = Some(figures);
            Ok(())
        }
        Target::Local(local) => {
            cause_and_repair(local, scenario, outage, &admin, &mut marks, &mut measured).await
        }
        Target::Described(d) => {
            by_commands(d, scenario, outage, &admin, &mut marks, &mut measured).await
        }
    };
    if let Err(e) = fault {
        load.stop().await;
        return Err(e);
    }
    // Load goes on until every client is served again (or long past the target: then the
    // report says who never recovered), then for `after` more.
    let give_up = scenario.haven_rto * 2 + Duration::from_secs(30);
    let settled = wind_down(load, &rec, &base, give_up, opts.after, |m| {
        marks.add("note", m)
    })
    .await?;
    let (duration, acks, missing) = (settled.duration, settled.acks, settled.missing);
    let restore_point = marks.restore_point;
    let left = load::clean_up(&base, &rec).await;
    if left > 0 {
        tracing::warn!("{left} of the drill's notes could not be deleted");
    }
    let report = Report::build(Inputs {
        scenario,
        deployment: target.describe(),
        rate: opts.rate,
        started_unix,
        duration,
        samples: &rec.samples(),
        acks: &acks,
        missing: &missing,
        long_calls: &rec.long_calls(),
        tasks: &rec.tasks(),
        marks: marks.list,
        measured,
        restore_point,
    });
    let mut report = report;
    if let Some(o) = overload_figures {
        report.findings.extend(o.findings());
        report.passed = report.findings.is_empty();
        report.overload = serde_json::to_value(&o).ok();
    }
    let dir = save(&opts.reports, &report)?;
    Ok(Finished { report, dir })
}

/// What the clients saw, once their load stopped and was read back.
pub(crate) struct Settled {
    /// Seconds from the start to the load's stop.
    pub duration: f64,
    /// Every acknowledged write.
    pub acks: Vec<Ack>,
    /// The acknowledged writes missing when read back.
    pub missing: Vec<String>,
}

/// Lets the load run on until every client is served again (at most `give_up`; `note` is
/// told when they are) and `after` more, stops it, and reads back the long calls' streams
/// and the acknowledged writes through `base`.
pub(crate) async fn wind_down(
    load: Load,
    rec: &Recorder,
    base: &str,
    give_up: Duration,
    after: Duration,
    mut note: impl FnMut(&str),
) -> Result<Settled, DrillError> {
    let repaired = rec.now();
    let deadline = Instant::now() + give_up;
    while !rec.all_served_since(repaired) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if rec.all_served_since(repaired) {
        note("every client served again");
    }
    tokio::time::sleep(after).await;
    load.stop().await;
    let duration = rec.now();
    load::read_back_long_calls(base, rec).await;
    load::read_back_tasks(base, rec).await;
    let acks = rec.acks();
    let missing = load::missing_writes(base, &acks)
        .await
        .map_err(DrillError::Deployment)?;
    Ok(Settled {
        duration,
        acks,
        missing,
    })
}

/// A drill on a described deployment: its own commands cause and repair the fault; the
/// configuration push and the key rotation go through the admin API as on a local one.
async fn by_commands(
    d: &Described,
    scenario: &Scenario,
    outage: Duration,
    admin: &Admin,
    marks: &mut Marks,
    measured: &mut Vec<(Component, Option<f64>, String)>,
) -> Result<(), DrillError> {
    let Some(c) = d.commands(scenario)? else {
        return through_admin(scenario, admin, marks, measured).await;
    };
    if scenario.fault == Fault::CorruptData {
        // The drill makes the bad change itself, on its own notes, through the load
        // balancer; the deployment's commands take the region out of service and restore it
        // to the point, which the repair command is given.
        let point = bad_change(&admin.http, &d.load_balancer, marks).await;
        let seq = admin.ship_backup().await?;
        marks.add(
            "note",
            format!("the backup holds the region's log up to sequence {seq}"),
        );
        d.run_command("the fault's command", &c.cause, &[]).await?;
        marks.add("note", c.cause.clone());
        d.run_command(
            "the repair's command",
            &c.repair,
            &[("HAVEN_DRILL_RESTORE_POINT", point.as_str())],
        )
        .await?;
        marks.add("repair", format!("{} (restore point {point})", c.repair));
        return Ok(());
    }
    d.run_command("the fault's command", &c.cause, &[]).await?;
    marks.add("fault", c.cause.clone());
    tokio::time::sleep(outage).await;
    d.run_command("the repair's command", &c.repair, &[])
        .await?;
    marks.add("repair", c.repair.clone());
    Ok(())
}

/// The admin API of every node.
struct Admin {
    http: reqwest::Client,
    token: String,
    nodes: Vec<String>,
}

impl Admin {
    /// Ships what the region's log holds now to the backup (`POST /admin/v1/backup/now` on
    /// the first node that takes it); the shipped sequence.
    async fn ship_backup(&self) -> Result<u64, DrillError> {
        let mut last = String::from("no node answered");
        for base in &self.nodes {
            match self
                .http
                .post(format!("{base}/admin/v1/backup/now"))
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(30))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await.unwrap_or_default();
                    return Ok(v["shipped_seq"].as_u64().unwrap_or(0));
                }
                Ok(r) => last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(DrillError::Deployment(format!(
            "shipping the backup now failed: {last}"
        )))
    }

    async fn get(&self, node: usize, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.nodes[node]))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    async fn send(
        &self,
        node: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DrillError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.nodes[node]))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = req
            .send()
            .await
            .map_err(|e| DrillError::Deployment(format!("{path}: {e}")))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(DrillError::Deployment(format!("{path}: {status}: {text}")));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Waits until `check` holds on every node (at most `within`); the time it took, or
    /// `None` when it did not.
    async fn until_every_node(
        &self,
        path: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Option<f64> {
        let start = Instant::now();
        let mut pending: Vec<usize> = (0..self.nodes.len()).collect();
        while start.elapsed() < within {
            let mut still = Vec::new();
            for n in pending {
                if !self.get(n, path).await.is_some_and(|v| check(&v)) {
                    still.push(n);
                }
            }
            pending = still;
            if pending.is_empty() {
                return Some(start.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

/// The node a drill breaks: the one running the most requests (`haven_running_requests`),
/// so that work in flight is interrupted; the last node when none reports any.
async fn victim(local: &Local, admin: &Admin) -> usize {
    let mut best = (0.0, local.node_bases().len() - 1);
    for n in 0..admin.nodes.len() {
        let Ok(r) = admin
            .http
            .get(format!("{}/metrics", admin.nodes[n]))
            .bearer_auth(&admin.token)
            .send()
            .await
        else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        let running: f64 = text
            .lines()
            .filter(|l| l.starts_with("haven_running_requests"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if running > best.0 {
            best = (running, n);
        }
    }
    best.1
}

async fn cause_and_repair(
    local: &mut Local,
    scenario: &Scenario,
    outage: Duration,
    admin: &Admin,
    marks: &mut Marks,
    measured: &mut Vec<(Component, Option<f64>, String)>,
) -> Result<(), DrillError> {
    match scenario.fault {
        Fault::KillNode => {
            let i = victim(local, admin).await;
            local.kill_node(i);
            marks.add("fault", format!("kill -9 {}", local.node_name(i)));
            tokio::time::sleep(outage).await;
            local.start_node(i).await?;
            marks.add("repair", format!("{} restarted, ready", local.node_name(i)));
        }
        Fault::LoseNode => {
            let i = victim(local, admin).await;
            let nats = i % local.nats_count();
            local.kill_node(i);
            local.kill_nats(nats);
            marks.add(
                "fault",
                format!(
                    "machine lost: kill -9 {} and {}",
                    local.node_name(i),
                    local.nats_name(nats)
                ),
            );
            tokio::time::sleep(outage).await;
            local.start_nats(nats).await?;
            local.start_node(i).await?;
            marks.add(
                "repair",
                format!(
                    "{} and {} restarted, ready",
                    local.nats_name(nats),
                    local.node_name(i)
                ),
            );
        }
        Fault::KillNatsLeader => {
            let leader = local.stream_leader().await.unwrap_or(0);
            local.kill_nats(leader);
            marks.add(
                "fault",
                format!("kill -9 {} (stream leader)", local.nats_name(leader)),
            );
            tokio::time::sleep(outage).await;
            local.start_nats(leader).await?;
            marks.add(
                "repair",
                format!("{} restarted, healthy", local.nats_name(leader)),
            );
        }
        Fault::StoreOutage => {
            for i in 0..local.nats_count() {
                local.kill_nats(i);
            }
            marks.add("fault", "every NATS server killed");
            tokio::time::sleep(outage).await;
            local.start_all_nats().await?;
            marks.add("repair", "every NATS server restarted, healthy");
        }
        Fault::Switchover => {
            let i = victim(local, admin).await;
            marks.add("fault", format!("{} drained (SIGTERM)", local.node_name(i)));
            local.drain_node(i).await?;
            marks.add("note", format!("{} exited", local.node_name(i)));
            tokio::time::sleep(outage).await;
            local.start_node(i).await?;
            marks.add("repair", format!("{} restarted, ready", local.node_name(i)));
        }
        Fault::ConfigPush | Fault::KeyRotation => {
            through_admin(scenario, admin, marks, measured).await?;
        }
        Fault::RegionLoss | Fault::RegionPartition | Fault::RegionSwitchover => {
            if !local.two_regions() {
                return Err(DrillError::Usage(format!(
                    "{} needs a two-region deployment",
                    scenario.name
                )));
            }
            region_fault(local, scenario, outage, marks).await?;
        }
        Fault::CorruptData | Fault::ColdRegion => {
            if !local.has_backup() {
                return Err(DrillError::Usage(format!(
                    "{} needs a deployment whose nodes ship a backup (a one-region local deployment)",
                    scenario.name
                )));
            }
            restore(local, scenario, outage, admin, marks).await?;
        }
        Fault::Chaos | Fault::Overload => {
            return Err(DrillError::Usage(format!(
                "{} is not caused on the deployment's processes",
                scenario.name
            )));
        }
    }
    Ok(())
}

/// The restore drills: a bad change undone by a point-in-time restore, or a region lost with
/// its disks replaced by a cold region built from the backups.
async fn restore(
    local: &mut Local,
    scenario: &Scenario,
    outage: Duration,
    admin: &Admin,
    marks: &mut Marks,
) -> Result<(), DrillError> {
    if scenario.fault == Fault::ColdRegion {
        local.lose_region();
        marks.add(
            "fault",
            "the region lost with its disks: every node and NATS server kill -9, their data removed",
        );
        tokio::time::sleep(outage).await;
        let region = local.restore_region(None).await?;
        marks.add(
            "repair",
            format!(
                "cold region {region} built from the backup (its latest point), every node serving it"
            ),
        );
        return Ok(());
    }
    let point = bad_change(&admin.http, &admin.nodes[0], marks).await;
    // The backup holds the bad change, and so everything before it; then the region is
    // taken out of service and rebuilt as of the point.
    let seq = admin.ship_backup().await?;
    marks.add(
        "note",
        format!("the backup holds the region's log up to sequence {seq}"),
    );
    let region = local.restore_region(Some(&point)).await?;
    marks.add(
        "repair",
        format!("region {region} restored to {point} from the backup, every node serving it"),
    );
    Ok(())
}

/// The bad change of `point-in-time-restore`, through `base`: the point is taken (now, in
/// RFC 3339 with milliseconds), then every note the drill acknowledged so far is overwritten
/// (even ones) or deleted (odd ones). Only the drill's own notes are touched. The point.
async fn bad_change(http: &reqwest::Client, base: &str, marks: &mut Marks) -> String {
    // Every write acknowledged before the point must come back, with its text.
    let point = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    marks.restore_point = Some(marks.rec.now());
    // Commits carry millisecond times: the bad change begins after the point's millisecond.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let acks = marks.rec.acks();
    let (mut overwritten, mut deleted) = (0, 0);
    for (n, a) in acks.iter().enumerate() {
        let (tool, args) = if n % 2 == 0 {
            (
                "notes_put",
                json!({"name": a.name, "text": "overwritten by mistake"}),
            )
        } else {
            ("notes_delete", json!({"name": a.name}))
        };
        if load::stateless_call(http, base, n as u64 + 1, tool, args)
            .await
            .is_ok()
        {
            if n % 2 == 0 {
                overwritten += 1;
            } else {
                deleted += 1;
            }
        }
    }
    marks.add(
        "fault",
        format!(
            "a bad change after {point}: {overwritten} of the drill's notes overwritten, {deleted} deleted"
        ),
    );
    point
}

/// Retries `f` every 250 ms until it succeeds or `within` passes (the last error then).
async fn retrying<F, Fut>(within: Duration, mut f: F) -> Result<(), DrillError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), DrillError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Back to region A as the active one (after a drill moved it): B demoted, A promoted once
/// it has applied all of B's log, the load balancer on A.
async fn fail_back(local: &Local, marks: &mut Marks) -> Result<(), DrillError> {
    let (a, b) = (local.nodes_of("A")[0], local.nodes_of("B")[0]);
    retrying(Duration::from_secs(60), || local.demote(b)).await?;
    retrying(Duration::from_secs(120), || local.promote(a, false)).await?;
    local.wait_lb_region("A").await?;
    marks.add("note", "failed back: A active again, clients on A");
    Ok(())
}

/// Notes that a region's node does not serve (read from that node directly).
async fn not_served(base: &str, names: &[Ack]) -> Vec<String> {
    load::missing_writes(base, names)
        .await
        .unwrap_or_else(|_| names.iter().map(|a| a.name.clone()).collect())
}

async fn region_fault(
    local: &mut Local,
    scenario: &Scenario,
    outage: Duration,
    marks: &mut Marks,
) -> Result<(), DrillError> {
    let (a, b) = (local.nodes_of("A")[0], local.nodes_of("B")[0]);
    match scenario.fault {
        Fault::RegionLoss => {
            for n in local.nodes_of("A") {
                local.kill_node(n);
            }
            for s in local.nats_of("A") {
                local.kill_nats(s);
            }
            marks.add("fault", "region A lost: its node and NATS server kill -9");
            // The runbook: with A gone (and two regions, no majority to fail over by
            // itself), promote B by force; the load balancer already sends clients to B.
            retrying(Duration::from_secs(30), || local.promote(b, true)).await?;
            marks.add("note", "B promoted (forced)");
            tokio::time::sleep(outage).await;
            local.ensure_all_ready().await?;
            marks.add("repair", "region A restarted");
            fail_back(local, marks).await?;
        }
        Fault::RegionPartition => {
            local.set_region_link(LinkState {
                cut: true,
                latency_ms: 0,
            });
            marks.add("fault", "the link between regions A and B cut");
            // Both sides written to while cut: A through the load balancer (the drill's
            // load), B directly.
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a client with no TLS settings always builds");
            let b_base = local.node_bases()[b].clone();
            let mut b_writes = Vec::new();
            let until = Instant::now() + outage;
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let name = format!("drill-partition-b-{}-{n}", marks.rec.now() as u64);
                let written = load::stateless_call(
                    &http,
                    &b_base,
                    n,
                    "notes_put",
                    serde_json::json!({"name": name, "text": "b"}),
                )
                .await;
                if written.is_ok() {
                    b_writes.push(Ack {
                        name,
                        at: marks.rec.now(),
                        text: "b".into(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            local.set_region_link(LinkState::default());
            marks.add(
                "repair",
                format!(
                    "the link healed ({} writes acknowledged by B while cut)",
                    b_writes.len()
                ),
            );
            // Convergence: every write acknowledged on either side served by both.
            let healed = Instant::now();
            let a_base = local.node_bases()[a].clone();
            let acks = marks.rec.acks();
            loop {
                let on_b = not_served(&b_base, &acks).await;
                let on_a = not_served(&a_base, &b_writes).await;
                if on_a.is_empty() && on_b.is_empty() {
                    marks.add(
                        "note",
                        format!(
                            "both regions serve every write {:.2} s after the heal",
                            healed.elapsed().as_secs_f64()
                        ),
                    );
                    break;
                }
                if healed.elapsed() > Duration::from_secs(60) {
                    return Err(DrillError::Deployment(format!(
                        "the regions did not converge within 60 s of the heal: B lacks {} of A's writes, A lacks {} of B's",
                        on_b.len(),
                        on_a.len()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let mut cleanup = b_writes.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
            for (i, name) in cleanup.drain(..).enumerate() {
                let _ = load::stateless_call(
                    &http,
                    &b_base,
                    i as u64,
                    "notes_delete",
                    serde_json::json!({ "name": name }),
                )
                .await;
            }
        }
        Fault::RegionSwitchover => {
            local.demote(a).await?;
            marks.add("fault", "planned switchover: A demoted");
            retrying(Duration::from_secs(60), || local.promote(b, false)).await?;
            marks.add("note", "B promoted");
            local.wait_lb_region("B").await?;
            marks.add("repair", "clients on B");
            tokio::time::sleep(outage).await;
            fail_back(local, marks).await?;
        }
        _ => unreachable!("only region faults come here"),
    }
    Ok(())
}

/// The drills done through the admin API alone: a configuration push and a key rotation,
/// each timed until every node has the change.
async fn through_admin(
    scenario: &Scenario,
    admin: &Admin,
    marks: &mut Marks,
    measured: &mut Vec<(Component, Option<f64>, String)>,
) -> Result<(), DrillError> {
    match scenario.fault {
        Fault::ConfigPush => {
            const KEY: &str = "audit.retention_days";
            let before = admin.get(0, &format!("/admin/v1/config/{KEY}")).await;
            let was_set = before
                .as_ref()
                .is_some_and(|v| v.get("value").is_some_and(|x| !x.is_null()));
            let current = before
                .as_ref()
                .and_then(|v| v["in_force"].as_u64())
                .unwrap_or(90);
            let value = if current == 91 { 92 } else { 91 };
            marks.add("fault", format!("{KEY} set to {value} on node 0"));
            admin
                .send(
                    0,
                    reqwest::Method::PUT,
                    &format!("/admin/v1/config/{KEY}"),
                    Some(json!({ "value": value })),
                )
                .await?;
            let took = admin
                .until_every_node(
                    &format!("/admin/v1/config/{KEY}"),
                    Duration::from_secs(60),
                    |v| v["in_force"].as_u64() == Some(value),
                )
                .await;
            marks.add("repair", "every node has the new value in force");
            measured.push((
                Component::Configuration,
                took,
                format!("PUT {KEY} on one node until every node has it in force"),
            ));
            // Put it back as it was.
            if was_set {
                admin
                    .send(
                        0,
                        reqwest::Method::PUT,
                        &format!("/admin/v1/config/{KEY}"),
                        Some(json!({ "value": current })),
                    )
                    .await?;
            } else {
                admin
                    .send(
                        0,
                        reqwest::Method::DELETE,
                        &format!("/admin/v1/config/{KEY}"),
                        None,
                    )
                    .await?;
            }
        }
        Fault::KeyRotation => {
            marks.add(
                "fault",
                "keys rotated on node 0 (POST /admin/v1/keys/rotate)",
            );
            let rotated = admin
                .send(0, reqwest::Method::POST, "/admin/v1/keys/rotate", None)
                .await?;
            let kid = rotated["request_state"]["signing"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let took = admin
                .until_every_node("/admin/v1/keys", Duration::from_secs(60), |v| {
                    v["request_state"]["signing"].as_str() == Some(kid.as_str())
                })
                .await;
            marks.add("repair", "every node signs with the new key");
            measured.push((
                Component::Secrets,
                took,
                "POST /admin/v1/keys/rotate on one node until every node signs with the new key"
                    .into(),
            ));
        }
        _ => {
            return Err(DrillError::Usage(format!(
                "{} is not done through the admin API",
                scenario.name
            )));
        }
    }
    Ok(())
}

/// Writes a report's three files into a new directory of `reports`; that directory.
pub fn save(reports: &Path, report: &Report) -> Result<PathBuf, DrillError> {
    let stamp = report
        .started
        .replace([':', '-'], "")
        .trim_end_matches('Z')
        .to_owned();
    let mut dir = reports.join(format!("{stamp}Z-{}", report.scenario));
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = reports.join(format!("{stamp}Z-{}-{n}", report.scenario));
    }
    let io = |e: std::io::Error| DrillError::Reports(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let json = serde_json::to_string_pretty(report).expect("a report serializes");
    std::fs::write(dir.join("report.json"), json).map_err(io)?;
    std::fs::write(dir.join("report.md"), report.markdown()).map_err(io)?;
    std::fs::write(dir.join("timeline.svg"), report.svg()).map_err(io)?;
    Ok(dir)
}
