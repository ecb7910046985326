//! A drill's figures, worked out from what its clients saw, and their three forms: JSON (kept
//! for `haven drill history`), a Markdown report for people, and an SVG timeline.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::load::{Ack, LongCall, Sample, TaskRun};
use crate::scenario::{Component, Scenario};

/// Something that happened to the deployment, at a time in seconds since the drill started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mark {
    /// When.
    pub at: f64,
    /// `fault`, `repair` or `note`.
    pub kind: String,
    /// What, in words.
    pub what: String,
}

/// One client's worst outage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientRto {
    /// The client.
    pub client: u32,
    /// What kind of client.
    pub kind: String,
    /// When its first failed request of the outage was sent.
    pub first_failure: f64,
    /// When the first success after it arrived (`None`: never, before the drill ended).
    pub recovered: Option<f64>,
    /// The outage as the client saw it (first failure to first success), seconds.
    pub rto: Option<f64>,
}

/// A row of the design's recovery-time table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ComponentRow {
    /// The component.
    pub component: String,
    /// The design's target, seconds.
    pub seed_target: f64,
    /// Haven's target, seconds.
    pub haven_target: f64,
    /// The recovery time measured, seconds (`None`: it never recovered); 0 when it never
    /// failed.
    pub actual: Option<f64>,
    /// How it was measured.
    pub measured_by: String,
    /// Whether `actual` is within Haven's target.
    pub passed: bool,
}

/// Long calls' final answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExactlyOnce {
    /// Long calls sent (that reached a stream).
    pub calls: u64,
    /// Those whose stored stream holds exactly one final answer.
    pub answered_once: u64,
    /// Those answered more than once (client or stored stream).
    pub answered_twice: u64,
    /// Those with no final answer (client and stored stream).
    pub never_answered: u64,
    /// Those whose stream could not be read back.
    pub unread: u64,
    /// Never answered, and forgotten as the target allows: sent after a restore point, or
    /// within a cold region's window before the fault (the restored state holds no stream).
    #[serde(default)]
    pub rolled_back: u64,
    /// Resumptions with `Last-Event-ID` over all calls.
    pub resumes: u64,
}

/// The tasks of the drill's load: each must end, once, and keep its end.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// Tasks whose creation was acknowledged.
    pub created: u64,
    /// Of those, completed.
    pub completed: u64,
    /// Failed or cancelled (e.g. with the "interrupted" error after a takeover): an end.
    pub failed: u64,
    /// Unknown to the deployment afterwards, beyond what the drill's data-loss target
    /// allows.
    pub lost: u64,
    /// Forgotten as the target allows: created after a restore point, or within a cold
    /// region's window before the fault.
    pub rolled_back: u64,
    /// Not ended within the client's deadline.
    pub unfinished: u64,
    /// Read back after the drill with another end than the one its client saw.
    pub changed: u64,
}

/// Acknowledged writes and those missing afterwards.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rpo {
    /// Writes acknowledged to their clients.
    pub acknowledged: u64,
    /// Of those, missing when read back after the drill.
    pub missing: u64,
    /// The span of time whose acknowledged writes were lost, seconds (0 when none).
    pub window: f64,
    /// The first missing notes' names.
    pub missing_names: Vec<String>,
    /// A point-in-time restore's point, seconds since the start: the state was taken back
    /// to it, so writes acknowledged after it are rolled back, not lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_point: Option<f64>,
    /// Writes acknowledged after the restore point and absent afterwards, as the restore
    /// intends (not counted in `missing`).
    #[serde(default)]
    pub rolled_back: u64,
    /// How long before the fault the oldest lost write was acknowledged, seconds (0 when
    /// none): what a restore from backups lost of a region lost without warning.
    #[serde(default)]
    pub before_fault: f64,
}

/// Requests per second bucket of the timeline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the bucket, seconds.
    pub at: f64,
    /// Successful MCP requests that ended in it.
    pub ok: u64,
    /// Failed MCP requests that ended in it.
    pub failed: u64,
}

/// The README of the source tree this binary was built from, when it is still there: the
/// report links its runbook there (a link relative to the report's directory would not
/// resolve).
fn readme() -> Option<std::path::PathBuf> {
    std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .canonicalize()
        .ok()
}

/// The runbook's line: the README section named in words (`drill-node-loss` is the section
/// "Drill node-loss"), linked by the README's absolute path when it is known.
fn runbook_text(anchor: &str, readme: Option<std::path::PathBuf>) -> String {
    let section = match anchor.strip_prefix("drill-") {
        Some(name) => format!("Drill {name}"),
        None => anchor.to_owned(),
    };
    match readme {
        Some(path) => format!(
            "the README's section \"{section}\" ([{}#{anchor}]({}#{anchor}))",
            path.display(),
            path.display()
        ),
        None => format!(
            "the README's section \"{section}\" (Haven's README.md, under \"Drill runbooks\")"
        ),
    }
}

/// A drill's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Format version of this JSON.
    pub format: u32,
    /// The scenario's name.
    pub scenario: String,
    /// What it rehearses.
    pub summary: String,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// How long it ran, seconds.
    pub duration: f64,
    /// What it ran against.
    pub deployment: String,
    /// The load asked for (requests per second of the paced clients).
    pub rate: f64,
    /// Whether every target was met.
    pub passed: bool,
    /// Every target missed, in words.
    pub findings: Vec<String>,
    /// The design's recovery-time target, seconds.
    pub seed_rto: f64,
    /// The design's data-loss window target, seconds.
    pub seed_rpo: f64,
    /// Haven's recovery-time target, seconds.
    pub haven_rto: f64,
    /// Haven's data-loss target for a region lost without warning: writes acknowledged
    /// within this long before the fault may be lost, seconds (0: none may be).
    #[serde(default)]
    pub haven_rpo_window: f64,
    /// Whether the RTO counts from the repair (the whole store was away).
    pub rto_from_repair: bool,
    /// The worst client outage counted as the target says (from the fault or from the
    /// repair), seconds; `None` when a client never recovered.
    pub rto: Option<f64>,
    /// The worst outage any client saw, first failure to first success, seconds.
    pub worst_outage: Option<f64>,
    /// Each client whose requests failed.
    pub clients: Vec<ClientRto>,
    /// Acknowledged writes lost.
    pub rpo: Rpo,
    /// Final answers of long calls.
    pub exactly_once: ExactlyOnce,
    /// Ends of tasks.
    #[serde(default)]
    pub tasks: TaskOutcome,
    /// The design's component table, target against actual.
    pub components: Vec<ComponentRow>,
    /// Mean time to recovery over the drill's faults, seconds (fault to the last client's
    /// recovery).
    pub mttr: Option<f64>,
    /// MCP requests in all.
    pub requests: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Failed requests (MCP and probes) by kind of failure.
    pub errors: BTreeMap<String, u64>,
    /// Faults and repairs.
    pub marks: Vec<Mark>,
    /// Successful and failed MCP requests per bucket.
    pub timeline: Vec<Bucket>,
    /// The README runbook of the scenario.
    pub runbook: String,
    /// A chaos run's seed and schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos: Option<serde_json::Value>,
    /// The overload drill's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overload: Option<serde_json::Value>,
}

/// Everything a report is worked out from.
pub struct Inputs<'a> {
    /// The drill.
    pub scenario: &'a Scenario,
    /// What it ran against.
    pub deployment: String,
    /// Load asked for.
    pub rate: f64,
    /// Start time (Unix seconds).
    pub started_unix: u64,
    /// How long it ran.
    pub duration: f64,
    /// Every request.
    pub samples: &'a [Sample],
    /// Acknowledged writes.
    pub acks: &'a [Ack],
    /// Names of acknowledged writes missing afterwards.
    pub missing: &'a [String],
    /// Long calls.
    pub long_calls: &'a [LongCall],
    /// Tasks.
    pub tasks: &'a [TaskRun],
    /// Faults and repairs.
    pub marks: Vec<Mark>,
    /// Recovery times measured directly by the scenario (e.g. configuration propagation),
    /// replacing what the probes saw for that component.
    pub measured: Vec<(Component, Option<f64>, String)>,
    /// A point-in-time restore's point (seconds since the start): acknowledged writes after
    /// it are rolled back by the restore.
    pub restore_point: Option<f64>,
}

/// Each client's outages: (first failed request's start, first success's end after it).
fn outages(samples: &[&Sample]) -> Vec<(f64, Option<f64>)> {
    let mut sorted: Vec<&Sample> = samples.to_vec();
    sorted.sort_by(|a, b| a.end.total_cmp(&b.end));
    let mut out = Vec::new();
    let mut open: Option<f64> = None;
    for s in sorted {
        match (&s.error, open) {
            (Some(_), None) => open = Some(s.start),
            (None, Some(from)) => {
                out.push((from, Some(s.end)));
                open = None;
            }
            _ => {}
        }
    }
    if let Some(from) = open {
        out.push((from, None));
    }
    out
}

impl Report {
    /// Works out the figures and judges them against the scenario's targets.
    pub fn build(i: Inputs<'_>) -> Report {
        let s = i.scenario;
        let first_fault = i
            .marks
            .iter()
            .find(|m| m.kind == "fault")
            .map(|m| m.at)
            .unwrap_or(0.0);
        let last_repair = i
            .marks
            .iter()
            .filter(|m| m.kind == "repair")
            .map(|m| m.at)
            .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
        let counted_from = if s.rto_from_repair {
            last_repair.unwrap_or(first_fault)
        } else {
            first_fault
        };

        let mut by_client: BTreeMap<u32, Vec<&Sample>> = BTreeMap::new();
        for x in i.samples {
            by_client.entry(x.client).or_default().push(x);
        }
        let mut clients = Vec::new();
        // Per component: the latest recovery, counted from `counted_from`; `None` inside
        // when a client of it never recovered.
        let mut component_rto: HashMap<Component, Option<f64>> = HashMap::new();
        let mut worst_outage: Option<f64> = Some(0.0);
        for (client, samples) in &by_client {
            let kind = samples[0].kind;
            let list = outages(samples);
            let longest = list
                .iter()
                .max_by(|a, b| {
                    let len = |o: &(f64, Option<f64>)| o.1.map_or(f64::INFINITY, |e| e - o.0);
                    len(a).total_cmp(&len(b))
                })
                .copied();
            let Some((from, to)) = longest else {
                component_rto.entry(kind.component()).or_insert(Some(0.0));
                continue;
            };
            clients.push(ClientRto {
                client: *client,
                kind: serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                first_failure: from,
                recovered: to,
                rto: to.map(|t| t - from),
            });
            // The recovery as the target counts it: the last outage's end after the start.
            let recovered_at = list
                .iter()
                .filter(|o| o.1.is_none_or(|e| e >= counted_from))
                .map(|o| o.1)
                .try_fold(counted_from, |a, b| b.map(|b| a.max(b)));
            let rto = recovered_at.map(|r| r - counted_from);
            let entry = component_rto.entry(kind.component()).or_insert(Some(0.0));
            *entry = match (*entry, rto) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            if kind.is_client() {
                worst_outage = match (worst_outage, to) {
                    (Some(w), Some(t)) => Some(w.max(t - from)),
                    _ => None,
                };
            }
        }
        let client_components = [Component::LoadBalancer, Component::SessionService];
        let rto = client_components
            .iter()
            .map(|c| component_rto.get(c).copied().unwrap_or(Some(0.0)))
            .try_fold(0.0, |a: f64, b| b.map(|b| a.max(b)));
        // Each fault's recovery: from the fault to the end of the last client outage that
        // began before the next fault; MTTR is their mean (`None` if one never ended).
        let faults: Vec<f64> = i
            .marks
            .iter()
            .filter(|m| m.kind == "fault")
            .map(|m| m.at)
            .collect();
        let all_outages: Vec<(f64, Option<f64>)> = by_client
            .values()
            .filter(|v| v[0].kind.is_client())
            .flat_map(|v| outages(v))
            .collect();
        let mut recoveries = Vec::new();
        for (n, &f) in faults.iter().enumerate() {
            let next = faults.get(n + 1).copied().unwrap_or(f64::INFINITY);
            let ends: Vec<Option<f64>> = all_outages
                .iter()
                .filter(|o| o.1.is_none_or(|e| e >= f) && o.0 < next)
                .map(|o| o.1)
                .collect();
            recoveries.push(
                ends.into_iter()
                    .try_fold(f, |a, b| b.map(|b| a.max(b)))
                    .map(|r| r - f),
            );
        }
        let mttr = if recoveries.is_empty() {
            Some(0.0)
        } else {
            recoveries
                .iter()
                .try_fold(0.0, |a, r| r.map(|r| a + r))
                .map(|sum| sum / recoveries.len() as f64)
        };

        let haven_rto = s.haven_rto.as_secs_f64();
        let mut components = Vec::new();
        for c in Component::ALL {
            let measured = i.measured.iter().find(|m| m.0 == c);
            let (actual, how) = match measured {
                Some((_, a, how)) => (*a, how.clone()),
                None => (
                    component_rto.get(&c).copied().unwrap_or(Some(0.0)),
                    match c {
                        Component::LoadBalancer => "stateless calls and writes through it",
                        Component::SessionService => "legacy sessions and long calls",
                        Component::Registry => "GET /admin/v1/registry every 250 ms",
                        Component::Configuration => "GET /admin/v1/config every 250 ms",
                        Component::Secrets => "GET /admin/v1/secrets every 250 ms",
                    }
                    .to_owned(),
                ),
            };
            let seen = measured.is_some() || component_rto.contains_key(&c);
            if !seen {
                continue;
            }
            components.push(ComponentRow {
                component: c.name().into(),
                seed_target: c.seed_rto().as_secs_f64(),
                haven_target: haven_rto,
                actual,
                measured_by: how,
                passed: actual.is_some_and(|a| a <= haven_rto),
            });
        }

        let point = i.restore_point.unwrap_or(f64::INFINITY);
        let absent: Vec<&Ack> = i
            .acks
            .iter()
            .filter(|a| i.missing.contains(&a.name))
            .collect();
        let rolled_back = absent.iter().filter(|a| a.at > point).count() as u64;
        let lost: Vec<&&Ack> = absent.iter().filter(|a| a.at <= point).collect();
        let missing_at: Vec<f64> = lost.iter().map(|a| a.at).collect();
        let fault_at = i
            .marks
            .iter()
            .find(|m| m.kind == "fault")
            .map_or(0.0, |m| m.at);
        let window = match (
            missing_at.iter().copied().reduce(f64::min),
            missing_at.iter().copied().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) => hi - lo,
            _ => 0.0,
        };
        let rpo = Rpo {
            acknowledged: i.acks.len() as u64,
            missing: lost.len() as u64,
            window,
            missing_names: lost.iter().take(20).map(|a| a.name.clone()).collect(),
            restore_point: i.restore_point,
            rolled_back,
            before_fault: missing_at
                .iter()
                .copied()
                .reduce(f64::min)
                .map_or(0.0, |lo| (fault_at - lo).max(0.0)),
        };
        // Lost writes Haven's target allows: none, or for a region lost without warning
        // those acknowledged within its window before the fault.
        let window_allows = |at: f64| {
            !s.haven_rpo_window.is_zero()
                && at <= fault_at
                && fault_at - at <= s.haven_rpo_window.as_secs_f64()
        };
        let lost_beyond_target = missing_at.iter().filter(|at| !window_allows(**at)).count();
        let mut exactly_once = ExactlyOnce::default();
        for c in i.long_calls {
            exactly_once.calls += 1;
            exactly_once.resumes += u64::from(c.resumes);
            let finals = c.finals_stored.unwrap_or(c.finals_seen).max(c.finals_seen);
            match (finals, c.finals_stored) {
                (0, _) if c.start > point || window_allows(c.start) => {
                    exactly_once.rolled_back += 1
                }
                (0, Some(_)) => exactly_once.never_answered += 1,
                (0, None) => exactly_once.unread += 1,
                (1, _) => exactly_once.answered_once += 1,
                _ => exactly_once.answered_twice += 1,
            }
        }

        let mut tasks = TaskOutcome::default();
        for t in i.tasks {
            tasks.created += 1;
            let forgotten_as_allowed = t.created > point || window_allows(t.created);
            let read_back_other = match (&t.status, &t.status_read_back) {
                (Some(seen), Some(read)) => seen != read,
                _ => false,
            };
            if forgotten_as_allowed && (t.lost || read_back_other) {
                tasks.rolled_back += 1;
                continue;
            }
            match t.status.as_deref() {
                _ if t.lost => tasks.lost += 1,
                Some("completed") => tasks.completed += 1,
                Some(_) => tasks.failed += 1,
                None => tasks.unfinished += 1,
            }
            if read_back_other {
                tasks.changed += 1;
            }
        }

        let mut errors = BTreeMap::new();
        let (mut requests, mut failed) = (0, 0);
        for x in i.samples {
            if let Some(e) = &x.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
            }
            if x.kind.is_client() {
                requests += 1;
                failed += u64::from(x.error.is_some());
            }
        }

        let width = (i.duration / 600.0).ceil().max(1.0);
        let n = (i.duration / width).ceil().max(1.0) as usize;
        let mut timeline: Vec<Bucket> = (0..n)
            .map(|b| Bucket {
                at: b as f64 * width,
                ok: 0,
                failed: 0,
            })
            .collect();
        for x in i.samples.iter().filter(|x| x.kind.is_client()) {
            let b = ((x.end / width) as usize).min(n - 1);
            if x.error.is_some() {
                timeline[b].failed += 1;
            } else {
                timeline[b].ok += 1;
            }
        }

        let mut findings = Vec::new();
        match rto {
            None => findings.push("a client never recovered before the drill ended".to_owned()),
            Some(r) if r > haven_rto => findings.push(format!(
                "recovery took {r:.2} s (target {haven_rto} s, counted from the {})",
                if s.rto_from_repair { "repair" } else { "fault" }
            )),
            _ => {}
        }
        if lost_beyond_target as u64 > s.haven_rpo_writes {
            findings.push(if s.haven_rpo_window.is_zero() {
                format!(
                    "{} acknowledged writes lost (a window of {:.2} s)",
                    rpo.missing, rpo.window
                )
            } else {
                format!(
                    "{} acknowledged writes lost, the oldest acknowledged {:.2} s before the fault (target: none older than {} s)",
                    rpo.missing,
                    rpo.before_fault,
                    s.haven_rpo_window.as_secs_f64()
                )
            });
        }
        if tasks.lost + tasks.unfinished + tasks.changed > 0 {
            findings.push(format!(
                "tasks: {} lost, {} never ended, {} read back with another end than their client saw",
                tasks.lost, tasks.unfinished, tasks.changed
            ));
        }
        if exactly_once.answered_twice > 0 {
            findings.push(format!(
                "{} long calls answered more than once",
                exactly_once.answered_twice
            ));
        }
        if exactly_once.never_answered + exactly_once.unread > 0 {
            findings.push(format!(
                "{} long calls never answered, {} whose stream could not be read back",
                exactly_once.never_answered, exactly_once.unread
            ));
        }
        for c in &components {
            if !c.passed {
                findings.push(format!(
                    "{}: recovery {} (target {} s)",
                    c.component,
                    c.actual.map_or("never".to_owned(), |a| format!("{a:.2} s")),
                    c.haven_target
                ));
            }
        }
        if requests == 0 || timeline.iter().all(|b| b.ok == 0) {
            findings.push("no request succeeded: the load never ran".to_owned());
        }
        let started = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(i.started_unix),
        )
        .to_string();
        Report {
            format: 1,
            scenario: s.name.into(),
            summary: s.summary.into(),
            started,
            started_unix: i.started_unix,
            duration: i.duration,
            deployment: i.deployment,
            rate: i.rate,
            passed: findings.is_empty(),
            findings,
            seed_rto: s.seed_rto.as_secs_f64(),
            seed_rpo: s.seed_rpo.as_secs_f64(),
            haven_rto,
            haven_rpo_window: s.haven_rpo_window.as_secs_f64(),
            rto_from_repair: s.rto_from_repair,
            rto,
            worst_outage,
            clients,
            rpo,
            exactly_once,
            tasks,
            components,
            mttr,
            requests,
            failed,
            errors,
            marks: i.marks,
            timeline,
            runbook: s.runbook.into(),
            chaos: None,
            overload: None,
        }
    }

    /// The report for people.
    pub fn markdown(&self) -> String {
        let secs = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.2} s"));
        let mut m = String::new();
        let _ = writeln!(
            m,
            "# Drill `{}`: {}\n\n{}\n",
            self.scenario,
            if self.passed { "PASSED" } else { "FAILED" },
            self.summary
        );
        let _ = writeln!(
            m,
            "- Started {} and ran {:.1} s against {}, at {} requests/s.",
            self.started, self.duration, self.deployment, self.rate
        );
        let _ = writeln!(m, "- Runbook: {}.\n", runbook_text(&self.runbook, readme()));
        if !self.findings.is_empty() {
            let _ = writeln!(m, "## Findings\n");
            for f in &self.findings {
                let _ = writeln!(m, "- {f}");
            }
            m.push('\n');
        }
        let _ = writeln!(m, "## Targets\n");
        let _ = writeln!(m, "| measure | design's target | Haven's target | actual |");
        let _ = writeln!(m, "|---|---|---|---|");
        let _ = writeln!(
            m,
            "| RTO (clients, from the {}) | < {} s | ≤ {} s | {} |",
            if self.rto_from_repair {
                "repair"
            } else {
                "fault"
            },
            self.seed_rto,
            self.haven_rto,
            secs(self.rto)
        );
        let _ = writeln!(
            m,
            "| RPO (acknowledged writes lost) | < {} s of writes | {} | {} of {} (window {:.2} s{}) |",
            self.seed_rpo,
            if self.haven_rpo_window > 0.0 {
                format!("≤ {} s of writes", self.haven_rpo_window)
            } else {
                "none".to_owned()
            },
            self.rpo.missing,
            self.rpo.acknowledged,
            self.rpo.window,
            if self.rpo.missing > 0 {
                format!(
                    ", the oldest acknowledged {:.2} s before the fault",
                    self.rpo.before_fault
                )
            } else {
                String::new()
            }
        );
        if let Some(p) = self.rpo.restore_point {
            let _ = writeln!(
                m,
                "| writes after the restore point ({p:.2} s), rolled back by the restore | | | {} |",
                self.rpo.rolled_back
            );
        }
        let _ = writeln!(
            m,
            "| requests answered twice or never | none | none | {} twice, {} never, {} unread (of {} long calls{}) |",
            self.exactly_once.answered_twice,
            self.exactly_once.never_answered,
            self.exactly_once.unread,
            self.exactly_once.calls,
            if self.exactly_once.rolled_back > 0 {
                format!(", {} rolled back", self.exactly_once.rolled_back)
            } else {
                String::new()
            }
        );
        let t = &self.tasks;
        let _ = writeln!(
            m,
            "| tasks lost, never ended or changed after their end | none | none | {} lost, {} never ended, {} changed (of {} tasks: {} completed, {} failed{}) |",
            t.lost,
            t.unfinished,
            t.changed,
            t.created,
            t.completed,
            t.failed,
            if t.rolled_back > 0 {
                format!(", {} rolled back", t.rolled_back)
            } else {
                String::new()
            }
        );
        let _ = writeln!(m, "| MTTR | | | {} |", secs(self.mttr));
        let _ = writeln!(
            m,
            "| worst outage a client saw | | | {} |\n",
            secs(self.worst_outage)
        );
        let _ = writeln!(m, "## Recovery by component\n");
        let _ = writeln!(
            m,
            "| component | design's RTO | Haven's RTO | actual | measured by | |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|");
        for c in &self.components {
            let _ = writeln!(
                m,
                "| {} | < {} s | ≤ {} s | {} | {} | {} |",
                c.component,
                c.seed_target,
                c.haven_target,
                secs(c.actual),
                c.measured_by,
                if c.passed { "met" } else { "missed" }
            );
        }
        let _ = writeln!(
            m,
            "\n## Requests\n\n{} MCP requests, {} failed; {} long calls, {} resumptions by `Last-Event-ID`.\n",
            self.requests, self.failed, self.exactly_once.calls, self.exactly_once.resumes
        );
        if !self.errors.is_empty() {
            let _ = writeln!(m, "| failure | count |\n|---|---|");
            for (k, v) in &self.errors {
                let _ = writeln!(m, "| {k} | {v} |");
            }
            m.push('\n');
        }
        if !self.clients.is_empty() {
            let _ = writeln!(
                m,
                "| client | kind | first failure | recovered | outage |\n|---|---|---|---|---|"
            );
            for c in &self.clients {
                let _ = writeln!(
                    m,
                    "| {} | {} | {:.2} s | {} | {} |",
                    c.client,
                    c.kind,
                    c.first_failure,
                    c.recovered.map_or("never".into(), |r| format!("{r:.2} s")),
                    secs(c.rto)
                );
            }
            m.push('\n');
        }
        if let Some(o) = &self.overload {
            let f = |k: &str| o[k].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                m,
                "## Overload\n\nCapacity {:.0} calls/s (32 closed-loop clients, 5 s); {:.0} calls/s offered for {:.1} s: {:.0} sent, {:.0} admitted (latency p50 {:.3} s, p99 {:.3} s), {:.0} refused with 503/429 ({:.0} with Retry-After; latency p50 {:.3} s, p99 {:.3} s), {:.0} failed otherwise, {:.0} shed by the sender's own limit. Largest node memory {:.0} MiB before, {:.0} MiB during; largest node scheduling delay {:.0} ms.\n",
                f("capacity"),
                f("offered_rate"),
                f("seconds"),
                f("sent"),
                f("admitted"),
                f("admitted_p50"),
                f("admitted_p99"),
                f("refused"),
                f("refused_with_retry_after"),
                f("refused_p50"),
                f("refused_p99"),
                f("failed"),
                f("shed_by_client"),
                f("memory_before") / 1048576.0,
                f("memory_during") / 1048576.0,
                f("node_delay_max") * 1000.0,
            );
        }
        let _ = writeln!(m, "## Timeline\n\n![timeline](timeline.svg)\n");
        for k in &self.marks {
            let _ = writeln!(m, "- {:.2} s, {}: {}", k.at, k.kind, k.what);
        }
        m
    }

    /// Successful and failed requests per second, faults and repairs marked.
    pub fn svg(&self) -> String {
        let (w, h, left, bottom, top) = (900.0, 360.0, 50.0, 40.0, 70.0);
        let plot_w = w - left - 20.0;
        let plot_h = h - bottom - top;
        let width = self.timeline.get(1).map_or(1.0, |b| b.at) - self.timeline[0].at;
        let width = if width > 0.0 { width } else { 1.0 };
        let span = (self.timeline.len() as f64 * width).max(1.0);
        let peak = self
            .timeline
            .iter()
            .map(|b| b.ok + b.failed)
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let x = |t: f64| left + t / span * plot_w;
        let y = |v: f64| top + plot_h - v / peak * plot_h;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"##
        );
        let _ = writeln!(
            s,
            r##"<rect width="{w}" height="{h}" fill="#ffffff"/><text x="{left}" y="18" font-size="13">{} — requests per {} s ({})</text>"##,
            escape(&self.scenario),
            width,
            if self.passed { "passed" } else { "failed" }
        );
        let bar = (plot_w / self.timeline.len() as f64 - 1.0).max(0.5);
        for b in &self.timeline {
            let ok_top = y(b.ok as f64);
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="#2e7d32"><title>{:.0} s: {} ok</title></rect>"##,
                x(b.at),
                ok_top,
                top + plot_h - ok_top,
                b.at,
                b.ok
            );
            if b.failed > 0 {
                let f_top = y((b.ok + b.failed) as f64);
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="#c62828"><title>{:.0} s: {} failed</title></rect>"##,
                    x(b.at),
                    f_top,
                    ok_top - f_top,
                    b.at,
                    b.failed
                );
            }
        }
        let axis_y = top + plot_h;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="#000"/><line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#000"/>"##,
            left + plot_w
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{peak}</text><text x="{}" y="{axis_y}" text-anchor="end">0</text>"##,
            left - 4.0,
            top + 4.0,
            left - 4.0
        );
        let step = nice_step(span);
        let mut t = 0.0;
        while t <= span {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}" text-anchor="middle">{t} s</text>"##,
                x(t),
                axis_y + 14.0
            );
            t += step;
        }
        // With many marks (a chaos run) only the lines: the labels would overlap; the
        // Markdown report lists every mark.
        let labels = self.marks.len() <= 12;
        for (n, k) in self.marks.iter().enumerate() {
            let color = match k.kind.as_str() {
                "fault" => "#c62828",
                "repair" => "#1565c0",
                _ => "#616161",
            };
            let _ = writeln!(
                s,
                r##"<line x1="{0:.1}" y1="{4}" x2="{0:.1}" y2="{axis_y}" stroke="{color}" stroke-dasharray="4 3"/><text x="{1:.1}" y="{2}" fill="{color}">{3}</text>"##,
                x(k.at),
                x(k.at) + 3.0,
                30.0 + 12.0 * (n % 3) as f64,
                if labels {
                    escape(&k.what)
                } else {
                    String::new()
                },
                if labels {
                    22.0 + 12.0 * (n % 3) as f64
                } else {
                    top
                }
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}"><tspan fill="#2e7d32">■ succeeded</tspan>  <tspan fill="#c62828">■ failed</tspan>  dashed: faults (red), repairs (blue), notes (grey)</text>"##,
            h - 8.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// A tick spacing for an axis `span` seconds long: about ten ticks.
fn nice_step(span: f64) -> f64 {
    let raw = span / 10.0;
    [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| *s >= raw)
        .unwrap_or(raw.ceil())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Kind, LongCall};
    use crate::scenario;

    fn sample(client: u32, kind: Kind, start: f64, end: f64, error: Option<&str>) -> Sample {
        Sample {
            client,
            kind,
            start,
            end,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn a_clients_outage_runs_from_its_first_failure_to_its_next_success() {
        let scenario = scenario::find("process-crash").unwrap();
        let samples = vec![
            sample(0, Kind::Stateless, 0.0, 0.1, None),
            sample(0, Kind::Stateless, 1.0, 1.2, Some("http-503")),
            sample(0, Kind::Stateless, 2.0, 2.1, Some("transport")),
            sample(0, Kind::Stateless, 3.0, 3.5, None),
            sample(1, Kind::Session, 0.5, 0.6, None),
            sample(1, Kind::Session, 4.0, 4.1, None),
            sample(2, Kind::Registry, 1.5, 1.6, Some("http-503")),
            sample(2, Kind::Registry, 1.8, 1.9, None),
        ];
        let acks = vec![
            Ack {
                name: "a".into(),
                at: 0.5,
                text: "1".into(),
            },
            Ack {
                name: "b".into(),
                at: 2.5,
                text: "2".into(),
            },
        ];
        let r = Report::build(Inputs {
            scenario: &scenario,
            deployment: "test".into(),
            rate: 1.0,
            started_unix: 0,
            duration: 5.0,
            samples: &samples,
            acks: &acks,
            missing: &["b".to_owned()],
            long_calls: &[],
            tasks: &[],
            marks: vec![Mark {
                at: 0.9,
                kind: "fault".into(),
                what: "kill -9".into(),
            }],
            measured: vec![],
            restore_point: None,
        });
        assert_eq!(r.clients.len(), 2);
        assert_eq!(r.clients[0].rto, Some(2.5));
        assert_eq!(r.worst_outage, Some(2.5));
        // From the fault at 0.9 to the stateless client's recovery at 3.5.
        assert!((r.rto.unwrap() - 2.6).abs() < 1e-9);
        assert!((r.mttr.unwrap() - 2.6).abs() < 1e-9);
        assert_eq!((r.rpo.acknowledged, r.rpo.missing), (2, 1));
        assert!(!r.passed, "a lost write fails the drill");
        assert_eq!(r.errors.get("http-503"), Some(&2));
        assert_eq!((r.requests, r.failed), (6, 2));
        let reg = r
            .components
            .iter()
            .find(|c| c.component == "registry")
            .unwrap();
        assert!((reg.actual.unwrap() - 1.0).abs() < 1e-9);
        assert!(r.markdown().contains("| registry |"));
        assert!(r.svg().starts_with("<svg"));
    }

    #[test]
    fn the_runbook_is_named_in_words_and_linked_where_it_resolves() {
        let elsewhere = std::path::PathBuf::from("/src/haven/README.md");
        assert_eq!(
            runbook_text("drill-node-loss", Some(elsewhere)),
            "the README's section \"Drill node-loss\" ([/src/haven/README.md#drill-node-loss](/src/haven/README.md#drill-node-loss))"
        );
        assert_eq!(
            runbook_text("drill-node-loss", None),
            "the README's section \"Drill node-loss\" (Haven's README.md, under \"Drill runbooks\")"
        );
        // Built in this tree, the README is found, with the section the link names.
        let found = readme().expect("the README of this source tree");
        let text = std::fs::read_to_string(&found).unwrap();
        assert!(text.contains("\n#### Drill node-loss\n"));
    }

    #[test]
    fn a_client_that_never_recovers_fails_the_drill() {
        let scenario = scenario::find("process-crash").unwrap();
        let samples = vec![
            sample(0, Kind::Stateless, 0.0, 0.1, None),
            sample(0, Kind::Stateless, 1.0, 1.2, Some("http-503")),
        ];
        let r = Report::build(Inputs {
            scenario: &scenario,
            deployment: "test".into(),
            rate: 1.0,
            started_unix: 0,
            duration: 2.0,
            samples: &samples,
            acks: &[],
            missing: &[],
            long_calls: &[],
            tasks: &[],
            marks: vec![],
            measured: vec![],
            restore_point: None,
        });
        assert_eq!(r.rto, None);
        assert!(!r.passed);
        assert!(
            r.findings[0].contains("never recovered"),
            "{:?}",
            r.findings
        );
    }

    fn acks_at(times: &[f64]) -> Vec<Ack> {
        times
            .iter()
            .enumerate()
            .map(|(i, at)| Ack {
                name: format!("n{i}"),
                at: *at,
                text: i.to_string(),
            })
            .collect()
    }

    /// The report of drill `name` whose fault struck at 10 s, over `acks` (`missing` read
    /// back absent), `long_calls` and `tasks`, with `restore_point`.
    fn report_at_10(
        name: &str,
        acks: &[Ack],
        missing: &[&str],
        long_calls: &[LongCall],
        tasks: &[TaskRun],
        restore_point: Option<f64>,
    ) -> Report {
        let scenario = scenario::find(name).unwrap();
        let samples = vec![sample(0, Kind::Stateless, 0.0, 0.1, None)];
        let missing: Vec<String> = missing.iter().map(|m| (*m).to_owned()).collect();
        Report::build(Inputs {
            scenario: &scenario,
            deployment: "test".into(),
            rate: 1.0,
            started_unix: 0,
            duration: 20.0,
            samples: &samples,
            acks,
            missing: &missing,
            long_calls,
            tasks,
            marks: vec![Mark {
                at: 10.0,
                kind: "fault".into(),
                what: "the fault".into(),
            }],
            measured: vec![],
            restore_point,
        })
    }

    fn restore_report(
        name: &str,
        acks: &[Ack],
        missing: &[&str],
        restore_point: Option<f64>,
    ) -> Report {
        report_at_10(name, acks, missing, &[], &[], restore_point)
    }

    #[test]
    fn writes_after_a_restore_point_are_rolled_back_and_writes_before_it_must_return() {
        let acks = acks_at(&[1.0, 5.0, 9.9, 10.2, 10.4, 15.0]);
        // Only writes after the point are absent: rolled back, nothing lost.
        let r = restore_report("point-in-time-restore", &acks, &["n3", "n4"], Some(10.0));
        assert_eq!((r.rpo.missing, r.rpo.rolled_back), (0, 2));
        assert_eq!(r.rpo.restore_point, Some(10.0));
        assert!(r.passed, "{:?}", r.findings);
        assert!(
            r.markdown()
                .contains("rolled back by the restore | | | 2 |")
        );
        // A write acknowledged before the point and absent is lost.
        let r = restore_report("point-in-time-restore", &acks, &["n2", "n3"], Some(10.0));
        assert_eq!((r.rpo.missing, r.rpo.rolled_back), (1, 1));
        assert_eq!(r.rpo.missing_names, vec!["n2".to_owned()]);
        assert!(!r.passed);
        assert!(r.findings[0].contains("1 acknowledged writes lost"));
    }

    #[test]
    fn a_region_rebuilt_from_backups_may_lose_only_its_last_seconds() {
        let acks = acks_at(&[1.0, 5.0, 7.5, 9.5, 9.9, 15.0]);
        // Lost writes acknowledged 0.5 s and 0.1 s before the fault: within the 3 s window.
        let r = restore_report("cold-region", &acks, &["n3", "n4"], None);
        assert_eq!(r.rpo.missing, 2);
        assert!((r.rpo.before_fault - 0.5).abs() < 1e-9);
        assert!(r.passed, "{:?}", r.findings);
        assert!(r.markdown().contains("≤ 3 s of writes"));
        // One acknowledged 2.5 s before it is allowed too; one 5 s before is not.
        let r = restore_report("cold-region", &acks, &["n2", "n4"], None);
        assert!(r.passed, "{:?}", r.findings);
        let r = restore_report("cold-region", &acks, &["n1", "n4"], None);
        assert!(!r.passed);
        assert!(
            r.findings[0].contains("5.00 s before the fault"),
            "{:?}",
            r.findings
        );
        // A write acknowledged after the region was rebuilt must never be lost.
        let r = restore_report("cold-region", &acks, &["n5"], None);
        assert!(!r.passed);
        // Any other drill allows no loss at all.
        let r = restore_report("process-crash", &acks, &["n4"], None);
        assert!(!r.passed);
    }

    #[test]
    fn a_task_must_end_once_unless_a_restore_forgot_it() {
        let task = |created: f64, status: Option<&str>, lost: bool, read: Option<&str>| TaskRun {
            client: 9,
            created,
            status: status.map(str::to_owned),
            lost,
            status_read_back: read.map(str::to_owned),
            id: String::new(),
        };
        let tasks = vec![
            task(1.0, Some("completed"), false, Some("completed")),
            task(2.0, Some("failed"), false, Some("failed")),
            // Created after the point: forgotten by the restore, as it should be.
            task(11.0, Some("completed"), false, Some("unknown")),
            task(12.0, None, true, None),
        ];
        let build = |tasks: &[TaskRun], point: Option<f64>| {
            report_at_10("point-in-time-restore", &[], &[], &[], tasks, point)
        };
        let r = build(&tasks, Some(10.0));
        assert_eq!(
            (
                r.tasks.created,
                r.tasks.completed,
                r.tasks.failed,
                r.tasks.rolled_back
            ),
            (4, 1, 1, 2)
        );
        assert!(r.passed, "{:?}", r.findings);
        // Without a restore, the same tasks are one lost and one changed after its end.
        let r = build(&tasks, None);
        assert_eq!((r.tasks.lost, r.tasks.changed), (1, 1));
        assert!(!r.passed);
        assert!(
            r.findings.iter().any(|f| f.contains("1 lost")),
            "{:?}",
            r.findings
        );
        // A task never ended fails the drill.
        let r = build(&[task(1.0, None, false, Some("working"))], None);
        assert_eq!(r.tasks.unfinished, 1);
        assert!(!r.passed);
    }

    #[test]
    fn long_calls_sent_after_a_restore_point_may_be_forgotten_and_no_others() {
        let calls = vec![
            LongCall::seen(1.0, 1, Some(1)),
            // Answered before the restore, its stream taken back: the client had its answer.
            LongCall::seen(10.5, 1, Some(0)),
            // Sent after the point, never answered, its stream gone with the restore.
            LongCall::seen(11.0, 0, None),
            LongCall::seen(11.5, 0, Some(0)),
        ];
        let build = |calls: &[LongCall], point: Option<f64>| {
            report_at_10("point-in-time-restore", &[], &[], calls, &[], point)
        };
        let r = build(&calls, Some(10.0));
        let e = &r.exactly_once;
        assert_eq!(
            (
                e.calls,
                e.answered_once,
                e.rolled_back,
                e.never_answered,
                e.unread
            ),
            (4, 2, 2, 0, 0)
        );
        assert!(r.passed, "{:?}", r.findings);
        assert!(r.markdown().contains("2 rolled back"), "{}", r.markdown());
        // Without a restore, the same calls are never answered or unread: the drill fails.
        let r = build(&calls, None);
        assert_eq!(
            (r.exactly_once.never_answered, r.exactly_once.unread),
            (1, 1)
        );
        assert!(!r.passed);
        // A call sent before the point must be answered.
        let r = build(&[LongCall::seen(9.0, 0, Some(0))], Some(10.0));
        assert_eq!(r.exactly_once.never_answered, 1);
        assert!(!r.passed);
    }
}
