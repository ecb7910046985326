//! `haven drill`: every drill runs in a short form on a local deployment (real nats-servers,
//! Haven nodes of this binary, HAProxy), and its report's figures and the exit status are
//! checked. The targets themselves are judged by the drill (its pass or fail), not here.

use std::path::Path;
use std::process::{Command, Output};

/// The tests that start a whole deployment (three NATS servers, three debug nodes, HAProxy)
/// take turns: side by side on a small machine they would measure each other's load.
static DEPLOYMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_deployment_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    DEPLOYMENT.lock().unwrap_or_else(|e| e.into_inner())
}

fn haven(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(args)
        .env("HAVEN_LOG", "warn")
        .output()
        .expect("running haven")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The reports written under `dir`: none when the drill wrote none (it stopped before its
/// first report), so that the caller's assertion shows what the command printed.
fn reports(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<serde_json::Value> = entries
        .map(|e| {
            let p = e.unwrap().path();
            for f in ["report.md", "timeline.svg"] {
                assert!(p.join(f).is_file(), "{} has no {f}", p.display());
            }
            serde_json::from_str(&std::fs::read_to_string(p.join("report.json")).unwrap()).unwrap()
        })
        .collect();
    out.sort_by_key(|r| r["started_unix"].as_u64());
    out
}

#[test]
fn the_list_names_every_drill_with_its_targets() {
    let o = haven(&["drill", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for name in [
        "process-crash",
        "node-loss",
        "nats-loss",
        "store-outage",
        "switchover",
        "config-push",
        "key-rotation",
        "overload",
        "region-loss",
        "region-partition",
        "region-switchover",
        "point-in-time-restore",
        "cold-region",
    ] {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
    // The cold region's own data-loss target is a window, not "no loss".
    assert!(out.contains("last 3s"), "{out}");
    assert!(
        out.contains("15m"),
        "the design's RTO floor is shown:\n{out}"
    );
}

#[test]
fn bad_requests_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let reports = dir.path().join("r");
    let r = reports.to_str().unwrap();
    let o = haven(&["drill", "run", "no-such-drill", "--local", "--reports", r]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("no drill named 'no-such-drill'"),
        "{}",
        text(&o)
    );
    let o = haven(&["drill", "run", "process-crash", "--reports", r]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--local"), "{}", text(&o));
    let o = haven(&[
        "drill",
        "run",
        "process-crash",
        "--local",
        "--rate",
        "0",
        "--reports",
        r,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = haven(&[
        "drill",
        "run",
        "process-crash",
        "--local",
        "--nats-server",
        "/nonexistent/nats-server",
        "--reports",
        r,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("nats-server not found"), "{}", text(&o));
    assert!(!reports.exists(), "a refused drill writes no report");
    // Nor does it leave a deployment directory behind (in a temporary directory of its own).
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["drill", "run", "process-crash", "--local", "--nats-server"])
        .arg("/nonexistent/nats-server")
        .arg("--reports")
        .arg(&reports)
        .env("TMPDIR", &tmp)
        .env("HAVEN_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{}", text(&o));
    // An object store named by a path that is not there.
    let o = haven(&[
        "drill",
        "run",
        "point-in-time-restore",
        "--local",
        "--object-store",
        "/nonexistent/moto_server",
        "--reports",
        r,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--object-store"), "{}", text(&o));
    let o = haven(&["drill", "history", "--reports", r]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no drill reports"));
}

#[test]
fn every_drill_runs_on_a_local_deployment_and_reports_what_clients_saw() {
    let _turn = one_deployment_at_a_time();
    let tools = haven_testkit::tools_dir();
    let nats = tools.join("venv/bin/nats-server");
    let dir = tempfile::tempdir().unwrap();
    let reports_dir = dir.path().join("reports");
    let o = haven(&[
        "drill",
        "run",
        "all",
        "--local",
        "--nats-server",
        nats.to_str().unwrap(),
        "--object-store",
        tools.join("venv/bin/moto_server").to_str().unwrap(),
        "--warmup",
        "2",
        "--after",
        "3",
        "--outage",
        "2",
        "--rate",
        "20",
        "--long-seconds",
        "2",
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    let out = text(&o);
    // The exit status matches the reports' verdicts.
    let all = reports(&reports_dir);
    assert_eq!(all.len(), 13, "{out}");
    let passed = all.iter().all(|r| r["passed"] == true);
    assert_eq!(o.status.code(), Some(if passed { 0 } else { 1 }), "{out}");
    for r in &all {
        let name = r["scenario"].as_str().unwrap();
        // Load ran through the load balancer, and writes were acknowledged and read back.
        assert!(r["requests"].as_u64().unwrap() > 10, "{name}: {r:#}");
        assert!(
            r["rpo"]["acknowledged"].as_u64().unwrap() > 0,
            "{name}: {r:#}"
        );
        // Long calls ran, in every drill (the restore drills' too: event ids tell a
        // restored history from the one before).
        assert!(
            r["exactly_once"]["calls"].as_u64().unwrap() > 0,
            "{name}: {r:#}"
        );
        // Tasks ran through the drill, and the verdict counts their ends.
        assert!(r["tasks"]["created"].as_u64().unwrap() > 0, "{name}: {r:#}");
        let t = &r["tasks"];
        if t["lost"].as_u64().unwrap() + t["unfinished"].as_u64().unwrap() > 0 {
            assert_eq!(r["passed"], false, "{name}: {r:#}");
        }
        // Every figure is consistent with the verdict.
        let findings = r["findings"].as_array().unwrap();
        assert_eq!(r["passed"] == true, findings.is_empty(), "{name}: {r:#}");
        // Lost writes are a finding, except for a region rebuilt from backups: those
        // acknowledged within its window before the fault (what had not shipped yet).
        let window = r["haven_rpo_window"].as_f64().unwrap();
        if r["rpo"]["missing"].as_u64().unwrap() > 0
            && (window == 0.0 || r["rpo"]["before_fault"].as_f64().unwrap() > window)
        {
            assert!(
                findings
                    .iter()
                    .any(|f| f.as_str().unwrap().contains("writes lost"))
            );
        }
        // Each drill broke something and repaired it, both marked on the timeline.
        let marks = r["marks"].as_array().unwrap();
        assert!(marks.iter().any(|m| m["kind"] == "fault"), "{name}: {r:#}");
        assert!(marks.iter().any(|m| m["kind"] == "repair"), "{name}: {r:#}");
        assert!(!r["timeline"].as_array().unwrap().is_empty());
        assert_eq!(r["components"][0]["component"], "load balancer", "{name}");
    }
    let by_name = |n: &str| all.iter().find(|r| r["scenario"] == n).unwrap();
    // The measured propagations are reported as the configuration and secrets rows.
    let row = |r: &serde_json::Value, c: &str| {
        r["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["component"] == c)
            .cloned()
            .unwrap()
    };
    assert!(
        row(by_name("config-push"), "configuration")["measured_by"]
            .as_str()
            .unwrap()
            .contains("in force")
    );
    assert!(
        row(by_name("key-rotation"), "secrets")["measured_by"]
            .as_str()
            .unwrap()
            .contains("signs with the new key")
    );
    // A store outage makes clients fail for a while: the drill saw it.
    assert!(
        by_name("store-outage")["failed"].as_u64().unwrap() > 0,
        "{out}"
    );
    // The overload drill measured a capacity and offered twice it.
    let o = &by_name("overload")["overload"];
    assert!(o["capacity"].as_f64().unwrap() > 0.0, "{o:#}");
    let ratio = o["offered_rate"].as_f64().unwrap() / o["capacity"].as_f64().unwrap();
    assert!((ratio - 2.0).abs() < 1e-6, "{o:#}");
    assert!(o["sent"].as_u64().unwrap() > 0, "{o:#}");
    // The multi-region drills ran on two regions; the partition's regions converged.
    let marked = |name: &str, what: &str| {
        by_name(name)["marks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["what"].as_str().unwrap().contains(what))
    };
    for name in ["region-loss", "region-partition", "region-switchover"] {
        let d = by_name(name)["deployment"].as_str().unwrap().to_owned();
        assert!(d.contains("two regions"), "{name}: {d}");
    }
    assert!(
        marked("region-partition", "both regions serve every write"),
        "{out}"
    );
    // The restore drills rebuilt the region from the backup in the local object store: the
    // point-in-time restore brought back every note the bad change overwrote or deleted
    // (read back with its text) and rolled back only what came after its point; the cold
    // region lost at most the writes of its last seconds.
    for name in ["point-in-time-restore", "cold-region"] {
        let d = by_name(name)["deployment"].as_str().unwrap().to_owned();
        assert!(d.contains("local object store"), "{name}: {d}");
        assert!(marked(name, "from the backup"), "{name}: {out}");
    }
    let pitr = by_name("point-in-time-restore");
    assert!(marked("point-in-time-restore", "overwritten"), "{out}");
    let point = pitr["rpo"]["restore_point"].as_f64().unwrap();
    let fault = pitr["marks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == "fault")
        .unwrap()["at"]
        .as_f64()
        .unwrap();
    assert!(point <= fault, "{pitr:#}");
    let cold = by_name("cold-region");
    assert_eq!(cold["haven_rpo_window"], 3.0, "{cold:#}");
    // The lost region was failed back to: its promotion waited until its view of the roles
    // was current (before, it answered from the roles it held before the loss).
    assert!(marked("region-loss", "failed back"), "{out}");
    assert!(marked("region-switchover", "failed back"), "{out}");

    // History lists every drill and a summary per scenario.
    let o = haven(&[
        "drill",
        "history",
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("store-outage") && table.contains("mean RTO"),
        "{table}"
    );
    let o = haven(&[
        "drill",
        "history",
        "--json",
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 13);
}

/// Haven nodes started by shell scripts, as an operator's service manager would, so that a
/// deployment file's commands can kill and start them; every node still running is killed
/// when this is dropped.
struct ScriptedNodes {
    dir: std::path::PathBuf,
    count: usize,
}

impl Drop for ScriptedNodes {
    fn drop(&mut self) {
        for i in 0..self.count {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("node{i}.pid"))) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

#[test]
fn a_described_deployment_is_drilled_with_its_own_commands() {
    let _turn = one_deployment_at_a_time();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(drill_a_described_deployment());
}

async fn drill_a_described_deployment() {
    let nats = haven_testkit::NatsCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let haven_bin = env!("CARGO_BIN_EXE_haven");
    let made = Command::new(haven_bin)
        .args(["secrets", "new-key", "--key-file"])
        .arg(d.join("secrets.key"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    std::fs::write(d.join("admin.token"), "drill-test-token\n").unwrap();
    let ports = haven_testkit::free_ports(3);
    let nodes = ScriptedNodes {
        dir: d.to_owned(),
        count: 3,
    };
    for (i, port) in ports.iter().enumerate() {
        let script = format!(
            "#!/bin/sh\ncd '{dir}'\nHAVEN_ADMIN_TOKEN=drill-test-token HAVEN_LOG=info setsid '{haven_bin}' serve --listen 127.0.0.1:{port} --data '{dir}/node{i}' --store '{store}' --region drill --node-id node{i} --secrets-key-file '{dir}/secrets.key' >> '{dir}/node{i}.log' 2>&1 < /dev/null &\necho $! > '{dir}/node{i}.pid'\n",
            dir = d.display(),
            store = nats.store_url(),
        );
        let path = d.join(format!("start-node{i}.sh"));
        std::fs::write(&path, script).unwrap();
        let o = Command::new("sh").arg(&path).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    for port in &ports {
        assert!(
            haven_testkit::wait_for_status(*port, "/readyz", std::time::Duration::from_secs(120))
                .await,
            "node on {port} not ready"
        );
    }
    let proxy = haven_testkit::Proxy::start(&ports).await;
    let nodes_toml: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[nodes]]\nname = \"node{i}\"\nurl = \"http://127.0.0.1:{p}\"\n"))
        .collect();
    let file = d.join("deployment.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"rehearsal\"\nload_balancer = \"http://127.0.0.1:{}\"\nadmin_token_file = \"admin.token\"\n{nodes_toml}\n[faults.process-crash]\ncause = \"kill -9 $(cat node2.pid)\"\nrepair = \"sh start-node2.sh\"\n",
            proxy.port
        ),
    )
    .unwrap();
    let reports = d.join("reports");
    let common = [
        "--deployment",
        file.to_str().unwrap(),
        "--reports",
        reports.to_str().unwrap(),
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["drill", "run"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&common);
        haven(&args)
    };

    // The dry run prints the plan, commands included, and changes nothing.
    let pid_before = std::fs::read_to_string(d.join("node2.pid")).unwrap();
    let o = run(&["process-crash", "config-push", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(
        plan.contains("kill -9 $(cat node2.pid)") && plan.contains("start-node2.sh"),
        "{plan}"
    );
    assert!(plan.contains("config-push"), "{plan}");
    // Without a terminal to confirm on, and without --yes, nothing happens either; nor for a
    // drill the file has no commands for.
    let o = run(&["process-crash"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    let o = run(&["nats-loss", "--yes"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("[faults.nats-loss]"), "{}", text(&o));
    assert!(!reports.exists());
    assert_eq!(
        std::fs::read_to_string(d.join("node2.pid")).unwrap(),
        pid_before
    );

    let o = run(&[
        "process-crash",
        "config-push",
        "--yes",
        "--warmup",
        "2",
        "--after",
        "2",
        "--outage",
        "2",
        "--rate",
        "20",
        "--long-seconds",
        "2",
    ]);
    let out = text(&o);
    let all = self::reports(&reports);
    assert_eq!(all.len(), 2, "{out}");
    let passed = all.iter().all(|r| r["passed"] == true);
    assert_eq!(o.status.code(), Some(if passed { 0 } else { 1 }), "{out}");
    let crash = all
        .iter()
        .find(|r| r["scenario"] == "process-crash")
        .unwrap();
    assert!(crash["deployment"].as_str().unwrap().contains("rehearsal"));
    let marks = crash["marks"].as_array().unwrap();
    assert!(
        marks
            .iter()
            .any(|m| m["kind"] == "fault" && m["what"] == "kill -9 $(cat node2.pid)"),
        "{crash:#}"
    );
    assert!(
        marks
            .iter()
            .any(|m| m["kind"] == "repair" && m["what"] == "sh start-node2.sh"),
        "{crash:#}"
    );
    assert!(crash["rpo"]["acknowledged"].as_u64().unwrap() > 0);
    // The results are recorded in the deployment: its status and the overdue-drill alert's
    // metric show them.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", ports[0]);
    let overview: serde_json::Value = http
        .get(format!("{base}/admin/v1/overview"))
        .bearer_auth("drill-test-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(overview["drill"]["scenario"], "config-push", "{overview:#}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth("drill-test-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("haven_drill_last_success_timestamp_seconds"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap();
    assert_eq!(
        gauge > 0.0,
        all.iter().any(|r| r["passed"] == true),
        "{gauge}"
    );
    // A record that is not one is refused and changes nothing.
    for bad in [
        r#"{"scenario":"x"}"#,
        r#"{"scenario":"Bad Name","ok":true,"finished_millis":1}"#,
        r#"{"scenario":"x","ok":true,"finished_millis":1,"rto_seconds":-1}"#,
        r#"{"scenario":"x","ok":true,"finished_millis":99999999999999}"#,
    ] {
        let r = http
            .post(format!("{base}/admin/v1/drills"))
            .bearer_auth("drill-test-token")
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    // The node really was killed and started again by the file's commands.
    let pid_after_drills = std::fs::read_to_string(d.join("node2.pid")).unwrap();
    assert_ne!(pid_after_drills, pid_before);

    // Chaos on the same deployment: its faults are the file's commands, drawn from the seed
    // (here the only drill with commands), with the same invariants.
    let chaos_reports = d.join("chaos-reports");
    let chaos = |extra: &[&str]| {
        let mut args = vec![
            "chaos",
            "--deployment",
            file.to_str().unwrap(),
            "--seed",
            "5",
            "--faults",
            "2",
            "--reports",
            chaos_reports.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        haven(&args)
    };
    let o = chaos(&["--plan"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches("the process-crash fault's commands")
            .count(),
        2,
        "{}",
        text(&o)
    );
    let o = chaos(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    let o = chaos(&["--yes", "--rate", "20", "--long-seconds", "2"]);
    let out = text(&o);
    let all = self::reports(&chaos_reports);
    assert_eq!(all.len(), 1, "{out}");
    let r = &all[0];
    assert_eq!(r["chaos"]["faults_done"], 2, "{r:#}");
    assert!(r["deployment"].as_str().unwrap().contains("rehearsal"));
    assert_eq!(r["rpo"]["missing"], 0, "{out}\n{r:#}");
    assert_eq!(r["exactly_once"]["answered_twice"], 0, "{out}\n{r:#}");
    assert_eq!(
        o.status.code(),
        Some(if r["passed"] == true { 0 } else { 1 }),
        "{out}"
    );
    assert_ne!(
        std::fs::read_to_string(d.join("node2.pid")).unwrap(),
        pid_after_drills
    );
    drop(nodes);
}

#[test]
fn a_chaos_seed_replays_the_same_schedule() {
    let plan = |seed: &str| {
        let o = haven(&[
            "chaos", "--local", "--seed", seed, "--faults", "30", "--plan",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let a = plan("11");
    assert_eq!(a.lines().count(), 30, "{a}");
    assert_eq!(a, plan("11"));
    assert_ne!(a, plan("12"));
    let o = haven(&["chaos", "--local", "--faults", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `haven chaos --local` with `args` (seed, faults, ...) at a light load; its output and its
/// one report.
fn local_chaos(args: &[&str]) -> (std::process::Output, String, serde_json::Value) {
    let nats = haven_testkit::tools_dir().join("venv/bin/nats-server");
    let dir = tempfile::tempdir().unwrap();
    let reports_dir = dir.path().join("reports");
    let mut all_args = vec!["chaos", "--local", "--rate", "20", "--long-seconds", "2"];
    all_args.extend(args);
    all_args.extend([
        "--nats-server",
        nats.to_str().unwrap(),
        "--reports",
        reports_dir.to_str().unwrap(),
    ]);
    let o = haven(&all_args);
    let out = text(&o);
    let mut all = reports(&reports_dir);
    assert_eq!(all.len(), 1, "{out}");
    (o, out, all.remove(0))
}

#[test]
fn chaos_on_a_local_deployment_keeps_every_invariant() {
    let _turn = one_deployment_at_a_time();
    let (o, out, r) = local_chaos(&["--seed", "12", "--faults", "8"]);
    let r = &r;
    assert_eq!(r["chaos"]["seed"], 12, "{r:#}");
    assert_eq!(r["chaos"]["faults_done"], 8, "{r:#}");
    assert_eq!(
        r["marks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["kind"] == "fault")
            .count(),
        8
    );
    assert!(r["rpo"]["acknowledged"].as_u64().unwrap() > 0, "{r:#}");
    // The invariants: no acknowledged write lost, every long call answered once, every node
    // serving every write; the exit status says so.
    assert_eq!(r["rpo"]["missing"], 0, "{out}\n{r:#}");
    assert_eq!(r["exactly_once"]["answered_twice"], 0, "{out}\n{r:#}");
    assert_eq!(r["exactly_once"]["never_answered"], 0, "{out}\n{r:#}");
    assert_eq!(
        o.status.code(),
        Some(if r["passed"] == true { 0 } else { 1 }),
        "{out}"
    );
    assert_eq!(r["passed"], true, "{out}\n{r:#}");
}

#[test]
fn chaos_across_two_regions_keeps_every_invariant() {
    let _turn = one_deployment_at_a_time();
    let (o, out, r) = local_chaos(&["--regions", "2", "--seed", "3", "--faults", "8"]);
    let r = &r;
    assert_eq!(r["chaos"]["regions"], 2, "{r:#}");
    assert_eq!(r["chaos"]["faults_done"], 8, "{r:#}");
    // Seed 3's schedule cuts the link between the regions and kills each region's server.
    let kinds: Vec<&str> = r["chaos"]["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["fault"]["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"cut-regions"), "{kinds:?}");
    assert!(kinds.contains(&"kill-nats"), "{kinds:?}");
    assert!(r["rpo"]["acknowledged"].as_u64().unwrap() > 0, "{r:#}");
    // The invariants, region B serving every write region A acknowledged among them.
    assert_eq!(r["rpo"]["missing"], 0, "{out}\n{r:#}");
    assert_eq!(r["exactly_once"]["answered_twice"], 0, "{out}\n{r:#}");
    assert_eq!(r["exactly_once"]["never_answered"], 0, "{out}\n{r:#}");
    assert_eq!(r["tasks"]["lost"], 0, "{out}\n{r:#}");
    assert_eq!(
        o.status.code(),
        Some(if r["passed"] == true { 0 } else { 1 }),
        "{out}"
    );
    // Every client served again, long-call clients among them: the run goes on until a long
    // call sent after the last repair is answered (one "interrupted" by the last fault was
    // once the last thing such a client saw, "session service: recovery never").
    assert_eq!(r["passed"], true, "{out}\n{r:#}");
}
