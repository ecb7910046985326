//! The list records: each upstream's last fetched tools, prompts, resources and templates, one
//! record per upstream in namespace [`LISTS_NS`], shared by every node.

use std::collections::BTreeMap;

use haven_control::registry::{REGISTRY_NS, UpstreamSpec};
use haven_mcp::context::{Announcement, with_announcements};
use haven_state::{Batch, Expect, Store, StoreError};
use rmcp::model::{Prompt, Resource, ResourceTemplate, Tool};
use serde::{Deserialize, Serialize};

/// Namespace of the list records (key: the upstream's name).
pub const LISTS_NS: &str = "upstream-lists";

/// Longest served tool or prompt name.
pub const MAX_SERVED_NAME_LEN: usize = 128;

/// The value of a list record: what the upstream listed (original names and URIs) and when.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpstreamLists {
    /// `tools/list`, every page.
    #[serde(default)]
    pub tools: Vec<Tool>,
    /// `prompts/list`, every page.
    #[serde(default)]
    pub prompts: Vec<Prompt>,
    /// `resources/list`, every page.
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// `resources/templates/list`, every page.
    #[serde(default)]
    pub templates: Vec<ResourceTemplate>,
    /// Wall-clock milliseconds of the fetch that produced these lists (a later fetch that finds
    /// the same lists leaves the record alone).
    #[serde(default)]
    pub fetched_at_millis: u64,
}

/// Whether a served tool or prompt name is valid for clients: 1 to 128 characters of
/// `A-Z a-z 0-9 _ . -`.
pub fn valid_served_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVED_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn same<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

impl UpstreamLists {
    /// The announcements that tell clients about the difference from `old` to `self`.
    pub(crate) fn changes_from(&self, old: Option<&UpstreamLists>) -> Vec<Announcement> {
        let empty = UpstreamLists::default();
        let old = old.unwrap_or(&empty);
        let mut out = Vec::new();
        if !same(&self.tools, &old.tools) {
            out.push(Announcement::ToolsChanged);
        }
        if !same(&self.prompts, &old.prompts) {
            out.push(Announcement::PromptsChanged);
        }
        if !same(&self.resources, &old.resources) || !same(&self.templates, &old.templates) {
            out.push(Announcement::ResourcesChanged);
        }
        out
    }

    /// Names that cannot be served under `upstream`'s prefix.
    pub(crate) fn invalid_names(&self, upstream: &str) -> Vec<String> {
        let tools = self.tools.iter().map(|t| t.name.to_string());
        let prompts = self.prompts.iter().map(|p| p.name.clone());
        tools
            .chain(prompts)
            .filter(|n| !valid_served_name(&haven_control::registry::served_name(upstream, n)))
            .collect()
    }

    /// Counts of what is served: (tools, prompts, resources, templates).
    pub(crate) fn served_counts(&self, upstream: &str) -> (usize, usize, usize, usize) {
        let ok = |n: &str| valid_served_name(&haven_control::registry::served_name(upstream, n));
        (
            self.tools.iter().filter(|t| ok(&t.name)).count(),
            self.prompts.iter().filter(|p| ok(&p.name)).count(),
            self.resources.len(),
            self.templates.len(),
        )
    }
}

fn decode(name: &str, bytes: &[u8]) -> Option<UpstreamLists> {
    match serde_json::from_slice(bytes) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(upstream = name, error = %e, "unreadable upstream list record; ignoring it");
            None
        }
    }
}

/// Commits `batch` (a compare-and-set of a list record) with the announcements of `changes`.
/// Returns the announcements once stored, or `None` when a concurrent write won and attempts
/// are left (of five): the caller reads the record again and retries.
async fn commit_announcing(
    store: &dyn Store,
    batch: Batch,
    changes: Vec<Announcement>,
    attempt: u32,
) -> Result<Option<Vec<Announcement>>, StoreError> {
    match store
        .commit(with_announcements(batch, store, &changes))
        .await
    {
        Ok(_) => Ok(Some(changes)),
        Err(StoreError::Conflict { .. }) if attempt < 5 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stores `lists` as `upstream`'s record if they differ from the stored ones (compare-and-set,
/// retried on a concurrent write) and announces what changed. Returns the announcements made.
pub(crate) async fn publish(
    store: &dyn Store,
    upstream: &str,
    mut lists: UpstreamLists,
) -> Result<Vec<Announcement>, StoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let current = store.get(LISTS_NS, upstream).await?;
        let (old, expect) = match &current {
            Some(r) => (decode(upstream, r.value()), Expect::Revision(r.revision)),
            None => (None, Expect::Absent),
        };
        let changes = lists.changes_from(old.as_ref());
        if old.is_some() && changes.is_empty() {
            return Ok(Vec::new());
        }
        lists.fetched_at_millis = store.clock().wall_millis();
        let value = serde_json::to_vec(&lists).expect("lists serialize");
        let batch = Batch::new().put_if(LISTS_NS, upstream, value, expect);
        if let Some(made) = commit_announcing(store, batch, changes, attempts).await? {
            return Ok(made);
        }
    }
}

/// Deletes `upstream`'s record, if any, and announces the lists it held. Returns the
/// announcements made.
pub(crate) async fn remove(
    store: &dyn Store,
    upstream: &str,
) -> Result<Vec<Announcement>, StoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Some(current) = store.get(LISTS_NS, upstream).await? else {
            return Ok(Vec::new());
        };
        let changes =
            UpstreamLists::default().changes_from(decode(upstream, current.value()).as_ref());
        let batch = Batch::new().delete_if(LISTS_NS, upstream, Expect::Revision(current.revision));
        if let Some(made) = commit_announcing(store, batch, changes, attempts).await? {
            return Ok(made);
        }
    }
}

/// Every live record of `namespace`: key → (revision, value).
pub(crate) async fn scan_all(
    store: &dyn Store,
    namespace: &str,
) -> Result<BTreeMap<String, (u64, Vec<u8>)>, StoreError> {
    let records = store.scan_all(namespace, "").await?;
    Ok(records
        .into_iter()
        .map(|r| {
            let value = r.value().to_vec();
            (r.record.key, (r.revision, value))
        })
        .collect())
}

/// The registered upstreams (unreadable entries are skipped with a warning).
pub(crate) async fn registered(store: &dyn Store) -> Result<Vec<UpstreamSpec>, StoreError> {
    Ok(scan_all(store, REGISTRY_NS)
        .await?
        .into_iter()
        .filter_map(|(key, (_, v))| decode_spec(&key, &v))
        .collect())
}

/// A registry record's value, if readable.
pub(crate) fn decode_spec(key: &str, value: &[u8]) -> Option<UpstreamSpec> {
    match serde_json::from_slice::<UpstreamSpec>(value) {
        Ok(s) if s.name == key => Some(s),
        Ok(s) => {
            tracing::warn!(key, name = %s.name, "registry record names another upstream; ignoring it");
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "unreadable registry record; ignoring it");
            None
        }
    }
}

pub(crate) fn decode_lists(name: &str, bytes: &[u8]) -> Option<UpstreamLists> {
    decode(name, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_names_follow_the_client_rule() {
        assert!(valid_served_name("ev__get-sum.v2"));
        assert!(!valid_served_name("ev__bad name"));
        assert!(!valid_served_name("ev__ümlaut"));
        assert!(!valid_served_name(&"a".repeat(129)));
        assert!(valid_served_name(&"a".repeat(128)));
        assert!(!valid_served_name(""));
    }

    #[test]
    fn changes_name_the_lists_that_differ() {
        let a = UpstreamLists::default();
        let mut b = UpstreamLists::default();
        assert!(b.changes_from(Some(&a)).is_empty());
        b.templates
            .push(ResourceTemplate::new("test://items/{id}", "item"));
        assert_eq!(
            b.changes_from(Some(&a)),
            vec![Announcement::ResourcesChanged]
        );
        b.fetched_at_millis = 5;
        b.prompts.push(Prompt::new("greet", Some("hi"), None));
        assert_eq!(
            b.changes_from(None),
            vec![Announcement::PromptsChanged, Announcement::ResourcesChanged]
        );
    }
}
