//! Kept reports, for `haven drill history`: every drill's verdict and figures over time.

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
    let mut rows = vec![
        [
            "started", "scenario", "result", "RTO s", "MTTR s", "lost", "failed",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in reports {
        rows.push(vec![
            r.started.clone(),
            r.scenario.clone(),
            if r.passed { "passed" } else { "FAILED" }.to_owned(),
            secs(r.rto),
            secs(r.mttr),
            format!("{}/{}", r.rpo.missing, r.rpo.acknowledged),
            format!("{}/{}", r.failed, r.requests),
        ]);
    }
    let mut t = aligned(&rows, &[false, false, false, true, true, true, true]);
    let mut names: Vec<&str> = reports.iter().map(|r| r.scenario.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return t;
    }
    let mut rows = vec![
        [
            "scenario",
            "runs",
            "passed",
            "last passed",
            "mean RTO s",
            "last RTO s",
            "mean MTTR s",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
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
        rows.push(vec![
            name.to_owned(),
            runs.len().to_string(),
            passed.to_string(),
            last_pass,
            mean(&|r| r.rto),
            secs(runs.last().and_then(|r| r.rto)),
            mean(&|r| r.mttr),
        ]);
    }
    t.push('\n');
    t.push_str(&aligned(
        &rows,
        &[false, true, true, true, true, true, true],
    ));
    t
}

/// Rows as a text table: each column as wide as its widest cell, columns two spaces apart,
/// numbers (`right`) aligned right; a row may have more cells than `right` names (the last
/// ones left-aligned). No trailing spaces.
pub fn aligned(rows: &[Vec<String>], right: &[bool]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut width = vec![0; cols];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut t = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width[i] - cell.chars().count();
            if right.get(i).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        t.push_str(line.trim_end());
        t.push('\n');
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

    /// The cells of a table line (runs of two or more spaces part them) as char ranges.
    pub(crate) fn spans(line: &str) -> Vec<(usize, usize)> {
        let chars: Vec<char> = line.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            while i < chars.len() && chars[i] == ' ' {
                i += 1;
            }
            let start = i;
            while i < chars.len() && !(chars[i] == ' ' && chars.get(i + 1) == Some(&' ')) {
                i += 1;
            }
            if start < i {
                out.push((start, i));
            }
        }
        out
    }

    /// Every line of each block of `text` (blocks part at empty lines) has its header's
    /// cells, each starting (left-aligned) or ending (right-aligned) where its header's does.
    pub(crate) fn assert_columns(text: &str, right: &[&[bool]]) {
        for (block, right) in text.split("\n\n").zip(right) {
            let lines: Vec<&str> = block.lines().collect();
            let header = spans(lines[0]);
            for line in &lines[1..] {
                let cells = spans(line);
                assert!(cells.len() >= header.len(), "{line:?} in\n{text}");
                for (i, (h, c)) in header.iter().zip(&cells).enumerate() {
                    if right.get(i).copied().unwrap_or(false) {
                        assert_eq!(h.1, c.1, "column {i} of {line:?} in\n{text}");
                    } else {
                        assert_eq!(h.0, c.0, "column {i} of {line:?} in\n{text}");
                    }
                }
            }
        }
    }

    #[test]
    fn history_columns_align_for_every_scenario_name() {
        let sample: Report =
            serde_json::from_str(include_str!("../../../docs/drills/sample-region-loss.json"))
                .unwrap();
        let mut reports = Vec::new();
        for (i, name) in [
            "region-switchover",
            "node-loss",
            "region-partition",
            "overload",
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = sample.clone();
            r.scenario = name.to_owned();
            r.started_unix += i as u64;
            r.passed = i % 2 == 0;
            r.rto = if i == 3 { None } else { Some(123.456) };
            reports.push(r);
        }
        let text = table(&reports, sample.started_unix + 90_000);
        assert!(text.contains("last RTO s  mean MTTR s"), "{text}");
        assert_columns(
            &text,
            &[
                &[false, false, false, true, true, true, true],
                &[false, true, true, true, true, true, true],
            ],
        );
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text}");
    }
}
