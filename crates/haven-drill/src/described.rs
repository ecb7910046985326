//! An existing deployment, described in a file, for `haven drill run --deployment FILE`: where
//! its load balancer and nodes are, the admin token they accept, and for each drill the
//! commands that cause its fault and repair it (a systemd or ssh command, run with `sh -c`).
//!
//! ```toml
//! name = "staging-eu"
//! load_balancer = "http://lb.staging:8080"
//! admin_token_file = "/etc/haven/admin.token"
//!
//! [[nodes]]
//! name = "node0"
//! url = "http://10.0.0.10:8080"
//!
//! [faults.process-crash]
//! cause = "ssh 10.0.0.12 sudo systemctl kill -s KILL haven"
//! repair = "ssh 10.0.0.12 sudo systemctl start haven"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::DrillError;
use crate::scenario::{Fault, Scenario};

/// The commands of one drill's fault.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultCommands {
    /// Causes the fault (`sh -c`); must end once it is caused.
    pub cause: String,
    /// Repairs it (`sh -c`); should end once the repair is done (e.g. `systemctl start`).
    pub repair: String,
}

/// One node of the deployment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// Its name, in reports.
    pub name: String,
    /// Its base URL: MCP at `/mcp`, the admin API at `/admin/v1/…`, `/metrics`.
    pub url: String,
}

/// The file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Described {
    /// The deployment's name: what the confirmation asks to be typed.
    pub name: String,
    /// The load balancer's base URL (MCP at `/mcp`); the drill's load goes through it.
    pub load_balancer: String,
    /// A file holding the admin token every node accepts [default: `HAVEN_ADMIN_TOKEN`].
    pub admin_token_file: Option<PathBuf>,
    /// Every node.
    pub nodes: Vec<NodeEntry>,
    /// Fault and repair commands, by drill name.
    #[serde(default)]
    pub faults: BTreeMap<String, FaultCommands>,
    #[serde(skip)]
    admin_token: String,
    #[serde(skip)]
    dir: PathBuf,
}

fn http_url(what: &str, url: &str) -> Result<String, DrillError> {
    let u = url.trim_end_matches('/');
    // Plain HTTP only, for now: the drill's client carries no trust roots.
    let rest = u.strip_prefix("http://");
    match rest {
        Some(r) if !r.is_empty() && !r.contains('/') => Ok(u.to_owned()),
        _ => Err(DrillError::Usage(format!(
            "{what}: '{url}' is not a base URL (http://HOST:PORT, no path; https is not supported by drills yet)"
        ))),
    }
}

impl Described {
    /// Reads and checks the file; the admin token comes from its `admin_token_file` or, when
    /// it names none, from `HAVEN_ADMIN_TOKEN`.
    pub fn load(path: &Path) -> Result<Described, DrillError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DrillError::Usage(format!(
                "reading the deployment file {}: {e}",
                path.display()
            ))
        })?;
        let mut d: Described = toml::from_str(&text).map_err(|e| {
            DrillError::Usage(format!("the deployment file {}: {e}", path.display()))
        })?;
        d.dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        d.load_balancer = http_url("load_balancer", &d.load_balancer)?;
        if d.nodes.is_empty() {
            return Err(DrillError::Usage(
                "the deployment file names no node ([[nodes]] with name and url)".into(),
            ));
        }
        for n in &mut d.nodes {
            n.url = http_url(&format!("node {}", n.name), &n.url)?;
        }
        let known: Vec<&str> = crate::scenario::all().iter().map(|s| s.name).collect();
        for name in d.faults.keys() {
            if !known.contains(&name.as_str()) {
                return Err(DrillError::Usage(format!(
                    "the deployment file has commands for '{name}', which is no drill (the drills are: {})",
                    known.join(", ")
                )));
            }
        }
        d.admin_token = match &d.admin_token_file {
            Some(f) => {
                let f = if f.is_relative() {
                    d.dir.join(f)
                } else {
                    f.clone()
                };
                std::fs::read_to_string(&f)
                    .map_err(|e| {
                        DrillError::Usage(format!("reading admin_token_file {}: {e}", f.display()))
                    })?
                    .trim()
                    .to_owned()
            }
            None => std::env::var("HAVEN_ADMIN_TOKEN").unwrap_or_default(),
        };
        if d.admin_token.is_empty() {
            return Err(DrillError::Usage(
                "no admin token: name admin_token_file in the deployment file or set HAVEN_ADMIN_TOKEN"
                    .into(),
            ));
        }
        Ok(d)
    }

    /// The admin token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Every node's base URL.
    pub fn node_bases(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The commands of `scenario`'s fault, or why the drill cannot run here.
    pub fn commands(&self, scenario: &Scenario) -> Result<Option<&FaultCommands>, DrillError> {
        if matches!(
            scenario.fault,
            Fault::ConfigPush | Fault::KeyRotation | Fault::Overload
        ) {
            // Done through the admin API or by the load itself: no command needed.
            return Ok(None);
        }
        self.faults.get(scenario.name).map(Some).ok_or_else(|| {
            DrillError::Usage(format!(
                "the deployment file has no [faults.{}] with the cause and repair commands of that drill",
                scenario.name
            ))
        })
    }

    /// The commands of the drill called `name`.
    pub fn commands_of(&self, name: &str) -> Result<&FaultCommands, DrillError> {
        self.faults.get(name).ok_or_else(|| {
            DrillError::Usage(format!(
                "the deployment file has no [faults.{name}] with the cause and repair commands of that drill"
            ))
        })
    }

    /// The drills with commands in the file, in its order of names.
    pub fn fault_names(&self) -> Vec<String> {
        self.faults.keys().cloned().collect()
    }

    /// The plan of `scenarios` in words, for `--dry-run` and the confirmation.
    pub fn plan(
        &self,
        scenarios: &[Scenario],
        warmup: Duration,
        outage: Option<Duration>,
    ) -> String {
        let mut p = format!(
            "deployment '{}': load through {}/mcp, {} nodes ({})\n",
            self.name,
            self.load_balancer,
            self.nodes.len(),
            self.nodes
                .iter()
                .map(|n| format!("{} {}", n.name, n.url))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for s in scenarios {
            let outage = outage.unwrap_or(s.outage);
            p.push_str(&format!("\n{}: {}\n", s.name, s.summary));
            p.push_str(&format!("  {:.0} s of load, then\n", warmup.as_secs_f64()));
            match self.commands(s) {
                Ok(Some(c)) if s.fault == Fault::CorruptData => {
                    p.push_str("  the restore point taken; every note the drill wrote so far overwritten or deleted through the load balancer (its own notes only)\n");
                    p.push_str("  POST /admin/v1/backup/now on the first node that takes it\n");
                    p.push_str(&format!("  cause:  sh -c {:?}\n", c.cause));
                    p.push_str(&format!(
                        "  repair: sh -c {:?}, with HAVEN_DRILL_RESTORE_POINT set to the point (RFC 3339)\n",
                        c.repair
                    ));
                }
                Ok(Some(c)) => {
                    p.push_str(&format!("  cause:  sh -c {:?}\n", c.cause));
                    p.push_str(&format!("  wait {:.0} s\n", outage.as_secs_f64()));
                    p.push_str(&format!("  repair: sh -c {:?}\n", c.repair));
                }
                Ok(None) if s.fault == Fault::Overload => p.push_str(&format!(
                    "  32 closed-loop clients for 5 s measure the capacity; then twice it offered for {:.0} s\n",
                    outage.as_secs_f64()
                )),
                Ok(None) if s.fault == Fault::ConfigPush => p.push_str(
                    "  PUT /admin/v1/config/audit.retention_days on the first node, timed until every node has it in force; then put back\n",
                ),
                Ok(None) => p.push_str(
                    "  POST /admin/v1/keys/rotate on the first node, timed until every node signs with the new key\n",
                ),
                Err(e) => p.push_str(&format!("  cannot run: {e}\n")),
            }
            p.push_str("  load until every client is served again, then the read-backs\n");
        }
        p
    }

    /// Records a drill's result in the deployment (`POST /admin/v1/drills` on the first node
    /// that takes it): the last drill, and the last successful one, that its status page,
    /// `haven status` and `haven_drill_last_success_timestamp_seconds` (the overdue-drill
    /// alert's metric) show.
    pub async fn record(&self, report: &crate::report::Report) -> Result<String, DrillError> {
        let body = serde_json::json!({
            "scenario": report.scenario,
            "ok": report.passed,
            "finished_millis": ((report.started_unix as f64 + report.duration) * 1000.0) as u64,
            "rto_seconds": report.rto,
            "rpo_seconds": report.rpo.window,
        });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a client with no TLS settings always builds");
        let mut last = String::new();
        for n in &self.nodes {
            match http
                .post(format!("{}/admin/v1/drills", n.url))
                .bearer_auth(&self.admin_token)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(n.name.clone()),
                Ok(r) => {
                    last = format!(
                        "{}: {}: {}",
                        n.name,
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )
                }
                Err(e) => last = format!("{}: {e}", n.name),
            }
        }
        Err(DrillError::Deployment(format!(
            "no node recorded the drill's result (last: {last})"
        )))
    }

    /// Runs one of its commands (`sh -c`, in the file's directory); fails when it exits with
    /// an error or runs over 10 minutes.
    pub async fn run_command(
        &self,
        what: &str,
        command: &str,
        env: &[(&str, &str)],
    ) -> Result<(), DrillError> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .envs(env.iter().copied())
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(600), child)
            .await
            .map_err(|_| DrillError::Deployment(format!("{what} `{command}` ran over 10 minutes")))?
            .map_err(|e| DrillError::Deployment(format!("{what} `{command}`: {e}")))?;
        if !out.status.success() {
            return Err(DrillError::Deployment(format!(
                "{what} `{command}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("deployment.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::write(dir.join("token"), "secret\n").unwrap();
        p
    }

    #[test]
    fn a_file_is_checked_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let ok = "name = \"t\"\nload_balancer = \"http://127.0.0.1:1\"\nadmin_token_file = \"token\"\n[[nodes]]\nname = \"a\"\nurl = \"http://127.0.0.1:2/\"\n[faults.process-crash]\ncause = \"true\"\nrepair = \"true\"\n";
        let d = Described::load(&write(dir.path(), ok)).unwrap();
        assert_eq!(d.admin_token(), "secret");
        assert_eq!(d.node_bases(), ["http://127.0.0.1:2"]);
        let crash = crate::scenario::find("process-crash").unwrap();
        assert!(d.commands(&crash).unwrap().is_some());
        let nats = crate::scenario::find("nats-loss").unwrap();
        assert!(d.commands(&nats).is_err());
        let push = crate::scenario::find("config-push").unwrap();
        assert!(d.commands(&push).unwrap().is_none());
        let plan = d.plan(&[crash, nats], Duration::from_secs(5), None);
        assert!(plan.contains("cause:  sh -c \"true\""), "{plan}");
        assert!(plan.contains("cannot run"), "{plan}");

        for (bad, says) in [
            (
                ok.replace("http://127.0.0.1:1", "127.0.0.1:1"),
                "not a base URL",
            ),
            (
                ok.replace("[faults.process-crash]", "[faults.typo]"),
                "which is no drill",
            ),
            (
                ok.replace("name = \"a\"\nurl = \"http://127.0.0.1:2/\"\n", ""),
                "missing field",
            ),
            (
                ok.replace("admin_token_file", "admin_tokn_file"),
                "unknown field",
            ),
        ] {
            let e = Described::load(&write(dir.path(), &bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_restore_drill_gives_its_repair_command_the_point() {
        let dir = tempfile::tempdir().unwrap();
        let text = "name = \"t\"\nload_balancer = \"http://127.0.0.1:1\"\nadmin_token_file = \"token\"\n[[nodes]]\nname = \"a\"\nurl = \"http://127.0.0.1:2/\"\n[faults.point-in-time-restore]\ncause = \"true\"\nrepair = \"test \\\"$HAVEN_DRILL_RESTORE_POINT\\\" = 2026-12-06T01:00:00.000Z\"\n";
        let d = Described::load(&write(dir.path(), text)).unwrap();
        let pitr = crate::scenario::find("point-in-time-restore").unwrap();
        let c = d.commands(&pitr).unwrap().unwrap().clone();
        let plan = d.plan(&[pitr], Duration::from_secs(5), None);
        assert!(plan.contains("HAVEN_DRILL_RESTORE_POINT"), "{plan}");
        assert!(plan.contains("backup/now"), "{plan}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let point = [("HAVEN_DRILL_RESTORE_POINT", "2026-12-06T01:00:00.000Z")];
            d.run_command("repair", &c.repair, &point).await.unwrap();
            // Without the point, the same command fails: it did read it.
            assert!(d.run_command("repair", &c.repair, &[]).await.is_err());
        });
    }
}
