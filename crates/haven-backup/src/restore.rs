//! Point-in-time restore: a new data directory holding exactly the state as of a point, built
//! from the newest usable snapshot at or before it and the segments after that snapshot.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use haven_state::{LogEntry, Restorer};
use serde::Serialize;

use crate::catalog::{Catalog, Plan, Point};
use crate::crypto::BackupKey;
use crate::error::{BackupError, Result};
use crate::target::Target;
use crate::verify::{Problem, check_key, fetch_checked};

/// What to restore, and where.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Directory to create.
    pub to: PathBuf,
    /// The point to restore.
    pub point: Point,
    /// Generation to restore from (default: chosen from the point).
    pub generation: Option<String>,
    /// Replace `to` if it is not empty.
    pub overwrite: bool,
}

/// A range of history the backup could not restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostRange {
    /// First sequence not restored.
    pub from_seq: u64,
    /// Commit time of the last restored change (the loss starts after it).
    pub after_millis: u64,
    /// Commit time of the first change not restored, when known.
    pub from_millis: Option<u64>,
    /// Why.
    pub reason: String,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// Generation restored from.
    pub generation: String,
    /// The restored state holds every change up to this sequence.
    pub restored_seq: u64,
    /// Commit time of the newest restored change.
    pub restored_millis: u64,
    /// Entries written.
    pub entries: u64,
    /// Objects read.
    pub objects: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Whether the state reaches the requested point (otherwise see `lost`).
    pub complete: bool,
    /// What could not be restored, when `complete` is false.
    pub lost: Option<LostRange>,
    /// Damaged objects met on the way.
    pub problems: Vec<Problem>,
    /// The newest change the generation holds (its restorable range's end): a point after
    /// it restores it, and the backup may lag behind that point.
    pub newest_seq: u64,
    /// Commit time of that change.
    pub newest_millis: u64,
    /// When an object of the generation was last written, Unix milliseconds.
    pub last_written_millis: u64,
}

/// Progress of a restore: objects done and total, entries written.
pub type RestoreProgress = dyn Fn(u64, u64, u64) + Send + Sync;

fn dir_is_empty(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackupError::io(format!("reading {}", dir.display()), e)),
    }
}

/// Refuses to replace a directory that is not a Haven data directory, that a running Haven
/// has open, or that holds the current working directory.
fn check_replaceable(dir: &Path) -> Result<()> {
    if !dir.join("state.redb").exists() {
        return Err(BackupError::Refused(format!(
            "{} is not a Haven data directory (it has no state.redb); --overwrite only replaces a data directory",
            dir.display()
        )));
    }
    if haven_state::data_dir_in_use(dir) {
        return Err(BackupError::Refused(format!(
            "{} is in use by a running Haven process; stop it before replacing its data",
            dir.display()
        )));
    }
    if let (Ok(cwd), Ok(d)) = (std::env::current_dir(), dir.canonicalize())
        && cwd.canonicalize().is_ok_and(|c| c.starts_with(&d))
    {
        return Err(BackupError::Refused(format!(
            "{} holds the current directory; restore into another directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Restores `opts.point` from `target` into `opts.to`. The directory is built under a
/// temporary name next to it and renamed into place at the end, so a failed restore leaves
/// `opts.to` as it was.
pub async fn restore(
    target: &Target,
    key: &BackupKey,
    opts: &RestoreOptions,
    progress: &(dyn Fn(u64, u64, u64) + Send + Sync),
) -> Result<RestoreReport> {
    if !dir_is_empty(&opts.to)? {
        if !opts.overwrite {
            return Err(BackupError::Refused(format!(
                "{} is not empty; restore into an empty or new directory, or pass --overwrite to replace it",
                opts.to.display()
            )));
        }
        check_replaceable(&opts.to)?;
    }
    let catalog = Catalog::load(target).await?;
    let deployment = check_key(target, &catalog, key)?;
    let generation = match &opts.generation {
        Some(id) => catalog.generation(id).ok_or_else(|| {
            BackupError::NothingToRestore(format!("{} holds no generation {id}", target.url()))
        })?,
        None => catalog.generation_for(opts.point).ok_or_else(|| {
            BackupError::NothingToRestore(match catalog.latest().and_then(|g| g.restorable()) {
                Some(r) => format!(
                    "that point is before the oldest restorable point ({}, sequence {})",
                    crate::fmt_millis(r.first_millis),
                    r.first_seq
                ),
                None => format!("{} holds no restorable snapshot", target.url()),
            })
        })?,
    };
    if let Point::Seq(n) = opts.point {
        let last = generation.last_shipped_seq();
        if n > last {
            return Err(BackupError::NothingToRestore(format!(
                "sequence {n} is beyond the newest backed-up change of generation {} (sequence {last})",
                generation.id
            )));
        }
    }

    // Build under a temporary name.
    let parent = opts
        .to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| BackupError::io(format!("creating {}", parent.display()), e))?;
    let name = opts
        .to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "haven-data".into());
    let tmp = parent.join(format!(".{name}.restoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = build(target, key, &deployment, generation, opts, &tmp, progress).await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if opts.to.exists() {
        std::fs::remove_dir_all(&opts.to)
            .map_err(|e| BackupError::io(format!("removing {}", opts.to.display()), e))?;
    }
    std::fs::rename(&tmp, &opts.to).map_err(|e| {
        BackupError::io(
            format!("moving the restored state into {}", opts.to.display()),
            e,
        )
    })?;
    Ok(report)
}

async fn build(
    target: &Target,
    key: &BackupKey,
    deployment: &str,
    generation: &crate::catalog::Generation,
    opts: &RestoreOptions,
    dir: &Path,
    progress: &(dyn Fn(u64, u64, u64) + Send + Sync),
) -> Result<RestoreReport> {
    let (plan, snapshot_entries, problems) =
        intact_snapshot(target, key, deployment, generation, opts.point).await?;
    let total = 1 + plan.segments.len() as u64;
    let mut restorer = Restorer::create(dir)?;
    let mut report = RestoreReport {
        generation: generation.id.clone(),
        restored_seq: plan.snapshot.last_seq,
        restored_millis: plan.snapshot.last_millis,
        entries: 0,
        objects: 1,
        bytes: plan.snapshot.size,
        complete: true,
        lost: None,
        problems,
        newest_seq: generation.restorable().map_or(0, |r| r.last_seq),
        newest_millis: generation.restorable().map_or(0, |r| r.last_millis),
        last_written_millis: generation
            .segments
            .iter()
            .chain(&generation.snapshots)
            .map(|o| o.created_millis)
            .max()
            .unwrap_or(0),
    };
    write_chunked(&mut restorer, &snapshot_entries)?;
    report.entries += snapshot_entries.len() as u64;
    drop(snapshot_entries);
    progress(1, total, report.entries);

    let mut stopped = false;
    let mut fetches = futures::stream::iter(plan.segments.clone())
        .map(|s| {
            let (target, key, deployment) = (target.clone(), key.clone(), deployment.to_owned());
            async move {
                let r = fetch_checked(&target, &key, &deployment, &s).await;
                (s, r)
            }
        })
        .buffered(target.reads_in_flight(4));
    while let Some((seg, fetched)) = fetches.next().await {
        let entries = match fetched {
            Ok(entries) => entries,
            Err(p) => {
                let lost = LostRange {
                    from_seq: seg.first_seq,
                    after_millis: report.restored_millis,
                    from_millis: Some(seg.first_millis),
                    reason: p.to_string(),
                };
                mark_lost(&mut report, lost);
                report.problems.push(p);
                stopped = true;
                break;
            }
        };
        let mut take = Vec::with_capacity(entries.len());
        for e in entries {
            if e.seq <= report.restored_seq {
                // Already in the snapshot this segment straddles.
                continue;
            }
            let millis = e.change.version().hlc.millis();
            if e.seq > plan.until_seq || plan.until_millis.is_some_and(|t| millis > t) {
                stopped = true;
                break;
            }
            report.restored_seq = e.seq;
            report.restored_millis = report.restored_millis.max(millis);
            take.push(e);
        }
        write_chunked(&mut restorer, &take)?;
        report.entries += take.len() as u64;
        report.objects += 1;
        report.bytes += seg.size;
        progress(report.objects, total, report.entries);
        if stopped {
            break;
        }
    }
    if !stopped {
        note_loss_at_end(&mut report, generation, &plan, opts.point);
    }
    restorer.finish(report.restored_seq)?;
    Ok(report)
}

/// The newest snapshot at or before `point` that is intact (damaged ones are skipped), its
/// plan and entries, and the problems of the snapshots skipped.
async fn intact_snapshot(
    target: &Target,
    key: &BackupKey,
    deployment: &str,
    generation: &crate::catalog::Generation,
    point: Point,
) -> Result<(Plan, Vec<LogEntry>, Vec<Problem>)> {
    let mut problems = Vec::new();
    let mut skip = Vec::new();
    loop {
        let plan = match generation.plan(point, &skip) {
            Ok(p) => p,
            Err(e) if problems.is_empty() => return Err(e),
            Err(_) => {
                let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
                return Err(BackupError::NothingToRestore(format!(
                    "no intact snapshot at or before that point: {}",
                    list.join("; ")
                )));
            }
        };
        match fetch_checked(target, key, deployment, &plan.snapshot).await {
            Ok(entries) => return Ok((plan, entries, problems)),
            Err(p) => {
                skip.push(plan.snapshot.object.clone());
                problems.push(p);
            }
        }
    }
}

/// Marks the restore incomplete: `lost` is the history it could not restore.
fn mark_lost(report: &mut RestoreReport, lost: LostRange) {
    report.complete = false;
    report.lost = Some(lost);
}

/// After every segment of the plan was restored (none was damaged and the point was not
/// passed): records as lost what the point asked for beyond the end of the chain, or beyond a
/// break in it.
fn note_loss_at_end(
    report: &mut RestoreReport,
    generation: &crate::catalog::Generation,
    plan: &Plan,
    point: Point,
) {
    // A sequence beyond the end of the chain is a loss too.
    if let (Point::Seq(n), true) = (point, report.complete)
        && report.restored_seq < n
    {
        mark_lost(
            report,
            LostRange {
                from_seq: report.restored_seq + 1,
                after_millis: report.restored_millis,
                from_millis: None,
                reason: format!(
                    "no segment holds sequences {}..={n}",
                    report.restored_seq + 1
                ),
            },
        );
    }
    // A break in the chain before the point is a loss too.
    if report.complete {
        let (_, gap) = generation.chain_after(&plan.snapshot);
        let wanted_more = match point {
            Point::Seq(n) => report.restored_seq < n,
            Point::Latest => true,
            Point::Time(t) => gap.as_ref().is_some_and(|g| g.resumes_at_millis <= t),
        };
        if let (Some(g), true) = (gap, wanted_more) {
            mark_lost(
                report,
                LostRange {
                    from_seq: g.after_seq + 1,
                    after_millis: g.after_millis,
                    from_millis: None,
                    reason: format!(
                        "no segment holds sequences {}..{} (the chain resumes at {})",
                        g.after_seq + 1,
                        g.resumes_at_seq - 1,
                        g.resumes_at_seq
                    ),
                },
            );
        }
    }
}

fn write_chunked(restorer: &mut Restorer, entries: &[LogEntry]) -> Result<()> {
    for chunk in entries.chunks(20_000) {
        restorer.write(chunk)?;
    }
    Ok(())
}
