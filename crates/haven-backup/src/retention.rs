//! Retention: which backup objects to keep, which to move to the archive storage class, and
//! which to delete. Deciding is a pure function of the catalog, the time and the policy, so it
//! is tested with a simulated clock; applying the decision is a separate step.
//!
//! The rules, in order:
//! 1. Point-in-time window: every point of the last `pitr_window` stays restorable. In each
//!    generation that reaches into the window, the newest snapshot at or before the window's
//!    start (or the oldest snapshot, when none is that old) is kept with every object after it.
//! 2. The head: the snapshot the newest generation restores its latest point from, and the
//!    segments after it, are always kept.
//! 3. Grandfather-father-son: among all snapshots, the newest of each of the last `hourly`
//!    hours, `daily` days, `monthly` months and `yearly` years that hold one are kept.
//! 4. Archive retention: a snapshot older than `archive_retention` is not kept by rule 3.
//! 5. Everything else is deleted. A segment is only ever kept together with the snapshot it
//!    continues, so nothing kept depends on something deleted.
//!
//! Kept objects older than `archive_after` move to the archive storage class (S3 only).

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use crate::catalog::{Catalog, Point};
use crate::error::Result;
use crate::manifest::{ManifestEntry, generation_key};
use crate::target::{Target, TargetKind};

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

/// How long backups are kept and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Every point of this most recent period stays restorable, milliseconds.
    pub pitr_window_millis: u64,
    /// Hourly snapshots kept.
    pub hourly: usize,
    /// Daily snapshots kept.
    pub daily: usize,
    /// Monthly snapshots kept.
    pub monthly: usize,
    /// Yearly snapshots kept.
    pub yearly: usize,
    /// Objects older than this move to `archive_class`, milliseconds; `None`: never.
    pub archive_after_millis: Option<u64>,
    /// Storage class of the archive tier (S3), e.g. `GLACIER_IR` or `DEEP_ARCHIVE`.
    pub archive_class: String,
    /// Nothing older than this is kept (except the newest restorable point), milliseconds.
    pub archive_retention_millis: u64,
    /// Objects no manifest names (interrupted uploads) are deleted after this, milliseconds.
    pub unreferenced_grace_millis: u64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            pitr_window_millis: DAY,
            hourly: 24,
            daily: 30,
            monthly: 12,
            yearly: 7,
            archive_after_millis: Some(30 * DAY),
            archive_class: "GLACIER_IR".into(),
            archive_retention_millis: 7 * 365 * DAY + 2 * DAY,
            unreferenced_grace_millis: HOUR,
        }
    }
}

/// What retention decided.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetentionPlan {
    /// Objects kept.
    pub keep: Vec<ManifestEntry>,
    /// Kept objects to move to the archive class.
    pub archive: Vec<ManifestEntry>,
    /// Objects to delete (manifest entry first, then the object).
    pub delete: Vec<ManifestEntry>,
    /// Unreferenced objects to delete.
    pub delete_unreferenced: Vec<String>,
    /// Generations left with nothing kept, whose records are deleted.
    pub delete_generations: Vec<String>,
}

/// Start of the UTC calendar month and year that hold `millis`, as bucket ids.
fn month_and_year(millis: u64) -> (i64, i64) {
    let t = time::OffsetDateTime::from_unix_timestamp((millis / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let year = i64::from(t.year());
    (year * 12 + i64::from(u8::from(t.month())), year)
}

/// Decides what to keep at time `now` (Unix milliseconds).
pub fn plan(catalog: &Catalog, now: u64, policy: &RetentionPolicy) -> RetentionPlan {
    let mut keep: HashSet<String> = HashSet::new();

    // 1. The point-in-time window.
    let window_start = now.saturating_sub(policy.pitr_window_millis);
    for g in &catalog.generations {
        let Some(r) = g.restorable() else { continue };
        if r.last_millis < window_start {
            continue;
        }
        let base = g
            .snapshots
            .iter()
            .filter(|s| s.last_millis <= window_start)
            .max_by_key(|s| s.last_seq)
            .or_else(|| g.snapshots.first());
        if let Some(base) = base {
            keep.insert(base.object.clone());
            for e in g.entries().filter(|e| e.last_seq > base.last_seq) {
                keep.insert(e.object.clone());
            }
        }
    }

    // 2. The head of the newest generation.
    if let Some(g) = catalog.latest()
        && let Ok(p) = g.plan(Point::Latest, &[])
    {
        keep.insert(p.snapshot.object.clone());
        for s in &p.segments {
            keep.insert(s.object.clone());
        }
    }

    // 3 and 4. Grandfather-father-son over every snapshot young enough.
    let mut snapshots: Vec<&ManifestEntry> = catalog
        .generations
        .iter()
        .flat_map(|g| g.snapshots.iter())
        .filter(|s| now.saturating_sub(s.last_millis) <= policy.archive_retention_millis)
        .collect();
    snapshots.sort_by_key(|s| std::cmp::Reverse((s.last_millis, s.last_seq)));
    let rules: [(usize, &dyn Fn(u64) -> i64); 4] = [
        (policy.hourly, &|m| (m / HOUR) as i64),
        (policy.daily, &|m| (m / DAY) as i64),
        (policy.monthly, &|m| month_and_year(m).0),
        (policy.yearly, &|m| month_and_year(m).1),
    ];
    for (count, bucket) in rules {
        let mut seen = BTreeSet::new();
        for s in &snapshots {
            if seen.len() >= count {
                break;
            }
            if seen.insert(bucket(s.last_millis)) {
                keep.insert(s.object.clone());
            }
        }
    }

    // 5. The rest goes. Segments are kept only when the snapshot they continue is kept.
    let mut out = RetentionPlan::default();
    for g in &catalog.generations {
        let kept_snapshots: Vec<&ManifestEntry> = g
            .snapshots
            .iter()
            .filter(|s| keep.contains(&s.object))
            .collect();
        let mut gen_keeps = false;
        for e in g.entries() {
            let kept = keep.contains(&e.object)
                && (e.kind == crate::manifest::ObjectKind::Snapshot
                    || kept_snapshots.iter().any(|s| s.last_seq < e.first_seq));
            if kept {
                gen_keeps = true;
                let archive = policy
                    .archive_after_millis
                    .is_some_and(|a| now.saturating_sub(e.created_millis) > a)
                    && e.storage_class.as_deref() != Some(policy.archive_class.as_str());
                if archive {
                    out.archive.push(e.clone());
                }
                out.keep.push(e.clone());
            } else {
                out.delete.push(e.clone());
            }
        }
        if !gen_keeps && Some(g.id.as_str()) != catalog.latest().map(|l| l.id.as_str()) {
            out.delete_generations.push(g.id.clone());
        }
    }
    out.delete_unreferenced = catalog
        .unreferenced
        .iter()
        .filter(|(_, modified)| now.saturating_sub(*modified) > policy.unreferenced_grace_millis)
        .map(|(k, _)| k.clone())
        .collect();
    out
}

/// What applying a plan did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetentionReport {
    /// Objects kept.
    pub kept: usize,
    /// Objects deleted (including unreferenced ones).
    pub deleted: usize,
    /// Objects moved to the archive class.
    pub archived: usize,
    /// Generations removed.
    pub generations_deleted: usize,
}

/// Carries out `plan` on `target`. Deletes a manifest entry before its object, so that an
/// interruption leaves at worst an unreferenced object, never an entry naming nothing.
pub async fn apply(
    target: &Target,
    plan: &RetentionPlan,
    archive_class: &str,
) -> Result<RetentionReport> {
    let mut report = RetentionReport {
        kept: plan.keep.len(),
        ..RetentionReport::default()
    };
    for e in &plan.delete {
        target.delete(&e.manifest_key()).await?;
        target.delete(&e.object).await?;
        report.deleted += 1;
    }
    for k in &plan.delete_unreferenced {
        target.delete(k).await?;
        report.deleted += 1;
    }
    for g in &plan.delete_generations {
        target.delete(&generation_key(g)).await?;
        report.generations_deleted += 1;
    }
    if target.kind() == TargetKind::S3 {
        for e in &plan.archive {
            if target.set_storage_class(&e.object, archive_class).await? {
                let mut moved = e.clone();
                moved.storage_class = Some(archive_class.to_owned());
                let json = serde_json::to_vec_pretty(&moved).expect("serializable");
                target.put(&moved.manifest_key(), json, None).await?;
                report.archived += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Generation;
    use crate::manifest::{ObjectKind, segment_key, snapshot_key};

    /// A generation with a snapshot every `snap_every` and a segment every `seg_every`
    /// from `start` to `end`; sequence numbers advance one per minute.
    fn history(start: u64, end: u64, snap_every: u64, seg_every: u64) -> Generation {
        let seq = |t: u64| (t - start) / 60_000 + 1;
        let mut g = Generation {
            id: "g".into(),
            info: None,
            snapshots: Vec::new(),
            segments: Vec::new(),
        };
        let mut t = start;
        while t <= end {
            g.snapshots
                .push(entry(ObjectKind::Snapshot, 0, seq(t), t, t));
            t += snap_every;
        }
        let mut t = start;
        while t + seg_every <= end {
            let first = seq(t) + 1;
            let last = seq(t + seg_every);
            g.segments.push(entry(
                ObjectKind::Segment,
                first,
                last,
                t + 60_000,
                t + seg_every,
            ));
            t += seg_every;
        }
        g
    }

    fn entry(
        kind: ObjectKind,
        first: u64,
        last: u64,
        first_millis: u64,
        last_millis: u64,
    ) -> ManifestEntry {
        let object = match kind {
            ObjectKind::Snapshot => snapshot_key("g", last),
            ObjectKind::Segment => segment_key("g", first, last),
        };
        ManifestEntry {
            kind,
            generation: "g".into(),
            object,
            first_seq: first,
            last_seq: last,
            first_millis,
            last_millis,
            items: 1,
            size: 1,
            sha256: String::new(),
            created_millis: last_millis,
            storage_class: None,
            bridge: false,
        }
    }

    /// The snapshots `p` keeps.
    fn kept_snapshots(p: &RetentionPlan) -> impl Iterator<Item = &ManifestEntry> {
        p.keep.iter().filter(|e| e.kind == ObjectKind::Snapshot)
    }

    fn catalog_of(g: Generation) -> Catalog {
        Catalog {
            generations: vec![g],
            ..Catalog::default()
        }
    }

    /// The catalog as it would be after applying `plan`.
    fn after(catalog: &Catalog, plan: &RetentionPlan) -> Catalog {
        let kept: HashSet<&str> = plan.keep.iter().map(|e| e.object.as_str()).collect();
        let mut c = catalog.clone();
        for g in &mut c.generations {
            g.snapshots.retain(|e| kept.contains(e.object.as_str()));
            g.segments.retain(|e| kept.contains(e.object.as_str()));
        }
        c
    }

    const YEAR0: u64 = 1_700_000_000_000;

    #[test]
    fn every_point_of_the_window_stays_restorable_and_old_points_thin_out() {
        // Two years of hourly snapshots, a segment every 10 minutes over the last 3 days.
        let end = YEAR0 + 2 * 365 * DAY;
        let mut g = history(YEAR0, end, HOUR, 10 * 60_000);
        g.segments.retain(|s| s.first_millis > end - 3 * DAY);
        let catalog = catalog_of(g);
        let policy = RetentionPolicy::default();
        let p = plan(&catalog, end, &policy);
        let pruned = after(&catalog, &p);
        let g = &pruned.generations[0];

        // Every 10-minute point of the last day restores exactly to that point.
        let mut t = end - DAY;
        while t <= end {
            let plan = g.plan(Point::Time(t), &[]).expect("restorable");
            let reached = plan
                .segments
                .last()
                .map_or(plan.snapshot.last_millis, |s| s.last_millis);
            assert!(reached >= t.min(end) - 10 * 60_000 && plan.snapshot.last_millis <= t);
            t += 10 * 60_000;
        }
        // Older points: about one per day for a month, one per month for a year, per year.
        let snaps = g.snapshots.len();
        assert!(snaps <= 24 + 1 + 30 + 12 + 7, "kept {snaps} snapshots");
        assert!(snaps >= 30 + 11, "kept {snaps} snapshots");
        // Segments outside the window are gone; inside it they are all kept.
        assert!(g.segments.iter().all(|s| s.last_millis > end - DAY - HOUR));
        assert!(p.delete.iter().any(|e| e.kind == ObjectKind::Segment));
        // The oldest kept snapshot is about a year old (monthly) or a yearly one.
        let oldest = g.snapshots.first().unwrap().last_millis;
        assert!(end - oldest > 360 * DAY);

        // A second pass with the same clock changes nothing (the plan is stable).
        let again = plan(&pruned, end, &policy);
        assert!(again.delete.is_empty(), "{:?}", again.delete.len());
    }

    #[test]
    fn archive_retention_deletes_old_points_but_never_the_newest() {
        // One snapshot a year for ten years, then nothing new for another eight years.
        let end = YEAR0 + 10 * 365 * DAY;
        let catalog = catalog_of(history(YEAR0, end, 365 * DAY, 365 * DAY));
        let policy = RetentionPolicy::default();
        let p = plan(&catalog, end, &policy);
        let kept: Vec<u64> = kept_snapshots(&p).map(|e| e.last_millis).collect();
        assert!(
            kept.iter()
                .all(|m| end - m <= policy.archive_retention_millis)
        );
        assert_eq!(kept.len(), 8, "years 3..=10: {kept:?}");
        // Eight years later only the newest point survives.
        let later = end + 8 * 365 * DAY;
        let p = plan(&catalog, later, &policy);
        let kept: Vec<_> = kept_snapshots(&p).collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            kept[0].last_millis,
            catalog.generations[0].snapshots.last().unwrap().last_millis
        );
    }

    #[test]
    fn old_kept_objects_move_to_the_archive_class_once() {
        let end = YEAR0 + 100 * DAY;
        let catalog = catalog_of(history(YEAR0, end, DAY, DAY));
        let policy = RetentionPolicy::default();
        let p = plan(&catalog, end, &policy);
        assert!(!p.archive.is_empty());
        assert!(p.archive.iter().all(|e| end - e.created_millis > 30 * DAY));
        let mut moved = catalog.clone();
        let archived: HashSet<String> = p.archive.iter().map(|e| e.object.clone()).collect();
        let g = &mut moved.generations[0];
        for e in g.snapshots.iter_mut().chain(g.segments.iter_mut()) {
            if archived.contains(&e.object) {
                e.storage_class = Some(policy.archive_class.clone());
            }
        }
        assert!(plan(&moved, end, &policy).archive.is_empty());
    }

    #[test]
    fn a_segment_is_never_kept_without_the_snapshot_it_continues() {
        let end = YEAR0 + 5 * DAY;
        let catalog = catalog_of(history(YEAR0, end, DAY, HOUR));
        for now in [end, end + DAY, end + 30 * DAY, end + 400 * DAY] {
            let p = plan(&catalog, now, &RetentionPolicy::default());
            let kept_snaps: Vec<u64> = kept_snapshots(&p).map(|e| e.last_seq).collect();
            for s in p.keep.iter().filter(|e| e.kind == ObjectKind::Segment) {
                assert!(kept_snaps.iter().any(|&b| b < s.first_seq));
            }
            // The newest point is always restorable.
            let pruned = after(&catalog, &p);
            let r = pruned.generations[0].restorable().unwrap();
            assert_eq!(
                r.last_seq,
                catalog.generations[0].restorable().unwrap().last_seq
            );
        }
    }
}
