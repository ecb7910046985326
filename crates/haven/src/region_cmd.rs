//! `haven region bootstrap`: a cold region built from another region's backups.
//!
//! The backup is restored (as `haven backup restore` does) into a temporary data directory,
//! its folded state is written into the new region's empty stream as merges (records and
//! events keep their versions, so the merge rules treat them as the writes they are), and the
//! cursor of the source region is set to the restored sequence: the new region's nodes then
//! apply the source's log from the next entry on, without a gap or a repeat. The backup also
//! holds the source region's cursors of every other region, so those links resume where the
//! source had got.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use haven_backup::RestoreOptions;
use haven_cluster::regions::{Cursor, LOCAL_NS, cursor_key};
use haven_state::{Batch, Change, HybridClock, Op, Origin, RedbStore, Store};

use crate::backup_cmd::{open_target, point_of, require_key};
use crate::settings::RegionBootstrapArgs;

/// Most operations one bootstrap commit holds (under JetStream's atomic batch limit).
const BATCH: usize = 500;

/// Whether a restored change is copied into the new region: everything but the source's own
/// region-local bookkeeping, except its cursors of other regions (they say how far the
/// restored state holds those regions' logs).
fn copied(change: &Change) -> bool {
    match change {
        Change::Record(r) if r.namespace == LOCAL_NS => r.key.starts_with("cursor/"),
        _ => true,
    }
}

/// The source region named by the restored state's backup generation record
/// (`local/backup-generation/<region>`).
async fn source_of(store: &dyn Store) -> Result<Option<String>> {
    let records = store.scan_all(LOCAL_NS, "backup-generation/").await?;
    Ok(records
        .first()
        .and_then(|r| r.record.key.strip_prefix("backup-generation/"))
        .map(str::to_owned))
}

pub async fn bootstrap(a: RegionBootstrapArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let servers = crate::settings::nats_servers(&a.store)?
        .context("--store must name the new region's NATS servers (nats://HOST:PORT,...)")?;
    // Before anything is created on them: these must be the new region's servers.
    let nats_tls = a.nats_tls.resolve_flags(&servers)?;
    crate::check_domain(&servers, &a.region, &nats_tls).await?;
    let (target, key) = open_target(&a.target)?;
    let key = require_key(key)?;
    let point = point_of(a.at.as_deref(), a.seq)?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let data = tmp.path().join("restored");
    let opts = RestoreOptions {
        to: data.clone(),
        point,
        generation: None,
        overwrite: false,
    };
    let report = haven_backup::restore(&target, &key, &opts, &|_, _, _| {}).await?;
    if !report.complete {
        bail!(
            "the backup could not restore the requested point (see `haven backup restore`): {:?}",
            report.lost
        );
    }
    let restored = RedbStore::open(
        &data,
        Origin::new("bootstrap", "bootstrap"),
        Arc::new(HybridClock::default()),
    )
    .map_err(|e| anyhow::anyhow!("opening the restored state: {e}"))?;
    let source = match &a.source_region {
        Some(s) => s.clone(),
        None => source_of(&restored).await?.context(
            "the backup does not say which region shipped it: pass --source-region NAME",
        )?,
    };
    if source == a.region {
        bail!("the new region must have another name than the source region {source}");
    }
    let (_, entries) = restored.state_entries().await?;
    drop(restored);

    let config = haven_state::NatsConfig {
        servers: servers.clone(),
        region: a.region.clone(),
        replicas: a.store_replicas,
        tls: nats_tls,
    };
    let node = format!("bootstrap-{}", std::process::id());
    let store = haven_state::NatsStore::open(
        &config,
        Origin::new(a.region.as_str(), node.as_str()),
        Arc::new(HybridClock::default()),
    )
    .await
    .map_err(|e| anyhow::anyhow!("opening region {}'s store: {e}", a.region))?;
    let store: Arc<dyn Store> = Arc::new(store);
    let existing = store.last_seq().await?;
    if existing > 0 && !a.force {
        bail!(
            "region {}'s stream already holds {existing} entries: bootstrap builds a new region (pass --force to merge the backup into it anyway)",
            a.region
        );
    }
    let ops: Vec<Op> = entries
        .into_iter()
        .filter(|e| copied(&e.change))
        .map(|e| match e.change {
            Change::Record(r) => Op::Merge(r),
            Change::Event(ev) => Op::MergeEvent(ev),
        })
        .collect();
    let total = ops.len();
    let mut written = 0usize;
    let mut chunk = Vec::with_capacity(BATCH);
    for op in ops {
        chunk.push(op);
        if chunk.len() == BATCH {
            written += chunk.len();
            store
                .commit(Batch {
                    ops: std::mem::take(&mut chunk),
                })
                .await
                .context("writing the restored state into the new region")?;
        }
    }
    if !chunk.is_empty() {
        written += chunk.len();
        store
            .commit(Batch { ops: chunk })
            .await
            .context("writing the restored state into the new region")?;
    }
    let cursor = Cursor {
        seq: report.restored_seq,
        at_millis: store.clock().wall_millis(),
    };
    store
        .commit(Batch::new().put(
            LOCAL_NS,
            &cursor_key(&source),
            serde_json::to_vec(&cursor).expect("a cursor serializes"),
        ))
        .await
        .context("writing the cursor of the source region")?;
    record_bootstrap(&store, &a.region).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "region {} bootstrapped from region {source}'s backup: the state as of its sequence {} ({}), {written} of {total} records and events in {secs:.1} s; start its nodes with --region {} --peer-regions {source},... and they apply {source}'s log from sequence {}",
        a.region,
        report.restored_seq,
        haven_backup::fmt_millis(report.restored_millis),
        a.region,
        report.restored_seq + 1
    );
    Ok(ExitCode::SUCCESS)
}

/// Records the bootstrap in the new region's audit log, as the operator, in a chain of this
/// command's own (`<region>/bootstrap-<pid>`, signed with a key that lives only for this run).
/// A failure is reported, not fatal: the region is built.
async fn record_bootstrap(store: &Arc<dyn Store>, region: &str) {
    use haven_audit::{Actor, Audit, AuditConfig, Event, Outcome, Target, actions};
    let done = async {
        let audit = Audit::start(
            store.clone(),
            haven_audit::key::ephemeral(),
            AuditConfig::default(),
        )
        .await?;
        audit
            .record_wait(
                Event::new(
                    Actor::Operator,
                    actions::REGION_BOOTSTRAP,
                    Target::named("region", region),
                    Outcome::Ok,
                ),
                std::time::Duration::from_secs(30),
            )
            .await?;
        audit.close().await
    };
    if let Err(e) = done.await {
        eprintln!("haven: warning: recording the bootstrap in the audit log failed: {e}");
    }
}
