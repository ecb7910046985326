//! The default catalog's notes, called directly on a real store: listing reads each note's
//! metadata (written with the note), and notes stored before the metadata existed are
//! listed after a one-time backfill.

use std::sync::Arc;

use haven_catalogs::DefaultCatalog;
use haven_catalogs::default::{NOTES_META_NS, NOTES_NS};
use haven_mcp::catalog::{Caller, Catalog, Round, Step};
use haven_mcp::context::{Era, RequestContext};
use haven_state::{Batch, Store};
use rmcp::model::JsonObject;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn call(catalog: &DefaultCatalog, store: &Arc<dyn Store>, name: &str, args: Value) -> Value {
    let ctx = RequestContext::new(
        store.clone(),
        Era::Stateless {
            protocol_version: "2026-07-28".into(),
        },
        Caller::default(),
        None,
        None,
        CancellationToken::new(),
    );
    let args: JsonObject = serde_json::from_value(args).unwrap();
    match catalog.call_tool(&ctx, name, args, Round::default()).await {
        Ok(Step::Done(r)) => serde_json::to_value(r).unwrap(),
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn listing_reads_metadata_and_backfills_old_notes() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = haven_testkit::redb_store(dir.path());
    let catalog = DefaultCatalog::new();
    // A note stored the way an earlier version stored it: no metadata.
    store
        .commit(Batch::new().put(
            NOTES_NS,
            "old",
            serde_json::to_vec(&json!({"text": "abc", "updated_millis": 1})).unwrap(),
        ))
        .await
        .unwrap();
    call(
        &catalog,
        &store,
        "notes_put",
        json!({"name": "new", "text": "hello"}),
    )
    .await;
    let listed = call(&catalog, &store, "notes_list", json!({})).await;
    let notes = &listed["structuredContent"]["notes"];
    assert_eq!(notes[0]["name"], "new", "{listed}");
    assert_eq!(notes[0]["bytes"], 5);
    assert_eq!(notes[1]["name"], "old");
    assert_eq!(notes[1]["bytes"], 3);
    assert!(store.get(NOTES_META_NS, "old").await.unwrap().is_some());
    // A delete removes the metadata with the note.
    call(&catalog, &store, "notes_delete", json!({"name": "old"})).await;
    let listed = call(&catalog, &store, "notes_list", json!({})).await;
    assert_eq!(
        listed["structuredContent"]["notes"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{listed}"
    );
    assert!(store.get(NOTES_META_NS, "old").await.unwrap().is_none());
}
