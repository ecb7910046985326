//! A real Prometheus (Debian's `prometheus`, or the tools folder's) on loopback, scraping
//! Haven nodes every second, and its HTTP API; stopped (and reaped) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::free_port;

/// A Prometheus server on loopback, stopped (and reaped) when dropped.
pub struct Prometheus {
    child: Child,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            eprintln!("the last lines of prometheus' log:\n{tail}");
        }
    }
}

/// The `prometheus` binary: the tools folder's, else the first on `PATH`.
pub fn prometheus_bin() -> PathBuf {
    let tools = haven_testkit::tools_dir().join("bin").join("prometheus");
    if tools.exists() {
        return tools;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("prometheus");
        if p.exists() {
            return p;
        }
    }
    panic!("prometheus not found (scripts/install-tools installs Debian's prometheus package)");
}

impl Prometheus {
    /// Scrapes `targets` (address, token file) every second, one job per target (`haven-0`,
    /// `haven-1`, ...: each node has its own admin token), each target labelled
    /// `service="haven"`.
    pub async fn start(targets: &[(String, PathBuf)]) -> Prometheus {
        let mut jobs = String::new();
        for (i, (addr, token)) in targets.iter().enumerate() {
            jobs.push_str(&format!(
                "  - job_name: haven-{i}\n    metrics_path: /metrics\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['{addr}']\n        labels:\n          service: haven\n",
                token.display()
            ));
        }
        Prometheus::start_with(&jobs).await
    }

    /// Starts Prometheus with `scrape_configs` (the YAML list items under `scrape_configs:`,
    /// indented by two spaces), a scrape and evaluation interval of one second, and waits
    /// (bounded) until it is ready.
    pub async fn start_with(scrape_configs: &str) -> Prometheus {
        Prometheus::start_on(free_port(), scrape_configs, &[]).await
    }

    /// On `port`, with these rule files loaded (evaluated every second).
    pub async fn start_on(port: u16, scrape_configs: &str, rule_files: &[PathBuf]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut rules = String::new();
        if !rule_files.is_empty() {
            rules.push_str("rule_files:\n");
            for f in rule_files {
                rules.push_str(&format!("  - {}\n", f.display()));
            }
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n{rules}scrape_configs:\n{scrape_configs}"
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--enable-feature=exemplar-storage")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let ready = haven_testkit::wait_until(
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async {
                reqwest::get(format!("{}/-/ready", p.url))
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        assert!(ready, "prometheus did not get ready");
        p
    }

    /// The whole answer of an instant query (`status`, `data` or `error`).
    pub async fn query_raw(&self, q: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The result vector of an instant query.
    pub async fn query(&self, q: &str) -> Vec<Value> {
        let v = self.query_raw(q).await;
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (bounded: scrapes happen every second) until `q` returns `n` series, each of
    /// whose value satisfies `ok`; returns them.
    pub async fn until(&self, q: &str, n: usize, ok: impl Fn(f64) -> bool) -> Vec<Value> {
        let last = std::sync::Mutex::new(Vec::new());
        let found = haven_testkit::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(250),
            || async {
                let got = self.query(q).await;
                let good = got.len() == n
                    && got.iter().all(|s| {
                        s["value"][1]
                            .as_str()
                            .and_then(|v| v.parse::<f64>().ok())
                            .is_some_and(&ok)
                    });
                *last.lock().unwrap() = got;
                good
            },
        )
        .await;
        let last = last.into_inner().unwrap();
        assert!(found, "{q}: wanted {n} series, got {last:?}");
        last
    }
}

/// The value of one series of an instant query's result (`NaN` when it is not a number).
pub fn value_of(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}
