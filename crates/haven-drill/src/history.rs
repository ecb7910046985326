//! Kept reports, for `haven drill history`: every drill's verdict and figures over time.

use std::fmt::Write as _;
use std::path::Path;

use crate::DrillError;
use crate::report::Report;

/// Every report under `reports`, oldest first. A directory without a readable
/// `report.json` is skipped; a `reports` that does not exist has none.
pub fn load(reports: &Path) -> Result<Vec<Report>, DrillError> {
    let entries = match std::fs::read_dir(reports) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DrillError::Reports(format!("{}: {e}", reports.display()))),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join("report.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match serde_json::from_str::<Report>(&text) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
        }
    }
    out.sort_by(|a, b| {
        a.started_unix
            .cmp(&b.started_unix)
            .then(a.scenario.cmp(&b.scenario))
    });
    Ok(out)
}

/// The table `haven drill history` prints, with a summary per scenario (runs, passes, the
/// last run's age, and the mean and last RTO and MTTR: the trend).
pub fn table(reports: &[Report], now_unix: u64) -> String {
    let secs = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.2}"));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<22} {:<15} {:<7} {:>8} {:>8} {:>10} {:>10}",
        "started", "scenario", "result", "RTO s", "MTTR s", "lost", "failed"
    );
    for r in reports {
        let _ = writeln!(
            t,
            "{:<22} {:<15} {:<7} {:>8} {:>8} {:>10} {:>10}",
            r.started,
            r.scenario,
            if r.passed { "passed" } else { "FAILED" },
            secs(r.rto),
            secs(r.mttr),
            format!("{}/{}", r.rpo.missing, r.rpo.acknowledged),
            format!("{}/{}", r.failed, r.requests),
        );
    }
    let mut names: Vec<&str> = reports.iter().map(|r| r.scenario.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if !names.is_empty() {
        let _ = writeln!(
            t,
            "\n{:<15} {:>5} {:>7} {:>12} {:>11} {:>9} {:>11}",
            "scenario", "runs", "passed", "last passed", "mean RTO s", "last RTO", "mean MTTR s"
        );
    }
    for name in names {
        let runs: Vec<&Report> = reports.iter().filter(|r| r.scenario == name).collect();
        let passed = runs.iter().filter(|r| r.passed).count();
        let last_pass = runs
            .iter()
            .filter(|r| r.passed)
            .map(|r| r.started_unix)
            .max()
            .map_or("never".to_owned(), |t| age(now_unix.saturating_sub(t)));
        let mean = |f: &dyn Fn(&Report) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", v.iter().sum::<f64>() / v.len() as f64)
            }
        };
        let _ = writeln!(
            t,
            "{:<15} {:>5} {:>7} {:>12} {:>11} {:>9} {:>11}",
            name,
            runs.len(),
            passed,
            last_pass,
            mean(&|r| r.rto),
            secs(runs.last().and_then(|r| r.rto)),
            mean(&|r| r.mttr),
        );
    }
    t
}

/// `3d 4h`, `5h 2m`, `40s` ago.
fn age(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d}d {h}h ago")
    } else if h > 0 {
        format!("{h}h {m}m ago")
    } else if m > 0 {
        format!("{m}m ago")
    } else {
        format!("{secs}s ago")
    }
}

/// The time of the last drill that passed, over every scenario (Unix seconds).
pub fn last_success(reports: &[Report]) -> Option<u64> {
    reports
        .iter()
        .filter(|r| r.passed)
        .map(|r| r.started_unix)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(40), "40s ago");
        assert_eq!(age(3 * 60 + 5), "3m ago");
        assert_eq!(age(2 * 3600 + 60), "2h 1m ago");
        assert_eq!(age(8 * 86400 + 3600), "8d 1h ago");
    }

    #[test]
    fn a_missing_reports_directory_has_no_history() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("none")).unwrap().is_empty());
        assert!(table(&[], 0).lines().count() == 1);
    }
}
