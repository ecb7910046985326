//! The `default` catalog: a few genuinely useful tools, resources and a prompt, so that
//! `haven serve` does something real out of the box. Notes live in Haven's replicated state;
//! `sleep` is a long call that reports progress and can run as a task, which makes failover
//! visible.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use haven_state::{Batch, Expect, StoreError};
use rmcp::model::{
    CallToolResult, CompleteRequestParams, CompleteResult, CompletionInfo, ContentBlock, ErrorData,
    GetPromptResult, Implementation, JsonObject, PromptArgument, PromptMessage, PromptsCapability,
    ReadResourceResult, Reference, Resource, ResourceContents, ResourceTemplate,
    ResourcesCapability, Role, ServerCapabilities, Tool, ToolAnnotations, ToolsCapability,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use haven_mcp::catalog::{Catalog, CatalogInfo, Ctx, Round, Step, TaskSupport, tool};
use haven_mcp::context::{Announcement, with_announcements};
use haven_mcp::jsonrpc::{internal, invalid_params};

/// Namespace of notes in the store.
pub const NOTES_NS: &str = "notes";
/// Longest note name.
const MAX_NAME: usize = 200;
/// Key of the notes' count (namespace `notes.index`), kept with every note created or
/// deleted.
const COUNT_KEY: &str = "count";
/// Longest `sleep`.
const MAX_SLEEP_SECONDS: f64 = 24.0 * 3600.0;
const NOTE_SCHEME: &str = "note://";

/// A stored note.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Note {
    /// Note text.
    pub text: String,
    /// Last change, Unix milliseconds.
    pub updated_millis: u64,
}

/// Limits on notes, changed at runtime by the binary (`limits.max_note_bytes`,
/// `limits.max_notes`); each is read when a note is written.
#[derive(Debug)]
pub struct NoteLimits {
    /// Bytes of one note's text.
    pub max_note_bytes: AtomicUsize,
    /// Notes the store holds.
    pub max_notes: AtomicU64,
}

impl Default for NoteLimits {
    fn default() -> Self {
        NoteLimits {
            max_note_bytes: AtomicUsize::new(1024 * 1024),
            max_notes: AtomicU64::new(100_000),
        }
    }
}

/// The default catalog.
#[derive(Clone, Debug)]
pub struct DefaultCatalog {
    tools: Vec<Tool>,
    limits: Arc<NoteLimits>,
}

impl Default for DefaultCatalog {
    fn default() -> Self {
        DefaultCatalog::new()
    }
}

fn annotations(read_only: bool, idempotent: bool) -> ToolAnnotations {
    ToolAnnotations::new()
        .read_only(read_only)
        .idempotent(idempotent)
}

impl DefaultCatalog {
    /// The default catalog.
    pub fn new() -> DefaultCatalog {
        let name_prop = json!({ "type": "string", "description": "Note name (1-200 characters)" });
        let tools = vec![
            tool("echo", "Returns the given text unchanged.", json!({
                "type": "object",
                "properties": { "text": { "type": "string", "description": "Text to echo" } },
                "required": ["text"]
            }))
            .with_annotations(annotations(true, true)),
            tool("time_now", "Returns the server's current time in UTC (RFC 3339) and as Unix milliseconds.", json!({
                "type": "object", "properties": {}
            }))
            .with_raw_output_schema(std::sync::Arc::new(
                json!({
                    "type": "object",
                    "properties": {
                        "utc": { "type": "string", "format": "date-time" },
                        "unixMillis": { "type": "integer" }
                    },
                    "required": ["utc", "unixMillis"]
                })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            ))
            .with_annotations(annotations(true, false)),
            tool("notes_put", "Saves a note under a name, replacing any note of that name. Notes are durable and shared by every Haven node.", json!({
                "type": "object",
                "properties": { "name": name_prop, "text": { "type": "string", "description": "Note text" } },
                "required": ["name", "text"]
            }))
            .with_annotations(annotations(false, true)),
            tool("notes_get", "Returns the text of a note.", json!({
                "type": "object", "properties": { "name": name_prop }, "required": ["name"]
            }))
            .with_annotations(annotations(true, true)),
            tool("notes_list", "Lists the names of all notes.", json!({
                "type": "object", "properties": {}
            }))
            .with_annotations(annotations(true, true)),
            tool("notes_delete", "Deletes a note.", json!({
                "type": "object", "properties": { "name": name_prop }, "required": ["name"]
            }))
            .with_annotations(annotations(false, true)),
            tool("sleep", "Waits the given number of seconds, reporting progress every second when the request has a progress token. Runs as a task for clients of the tasks extension.", json!({
                "type": "object",
                "properties": { "seconds": { "type": "number", "minimum": 0, "maximum": MAX_SLEEP_SECONDS, "description": "How long to wait" } },
                "required": ["seconds"]
            }))
            .with_annotations(annotations(true, true)),
        ];
        DefaultCatalog {
            tools,
            limits: Arc::default(),
        }
    }

    /// The default catalog with note limits that someone else changes.
    pub fn with_limits(limits: Arc<NoteLimits>) -> DefaultCatalog {
        DefaultCatalog {
            limits,
            ..DefaultCatalog::new()
        }
    }
}

fn text_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(text)])
}

fn error_result(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

fn str_arg<'a>(args: &'a JsonObject, name: &str) -> Result<&'a str, ErrorData> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_params(format!("Invalid arguments: '{name}' must be a string")))
}

fn note_name(args: &JsonObject) -> Result<&str, ErrorData> {
    let name = str_arg(args, "name")?;
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(invalid_params(format!(
            "Invalid arguments: 'name' must be 1-{MAX_NAME} characters without control characters"
        )));
    }
    Ok(name)
}

/// A note operation the store refused; marked retryable when the store is unavailable, so that
/// the client is told to come back rather than that its request failed.
fn store_failure(e: StoreError) -> ErrorData {
    haven_mcp::outcome::store_failure(format!("The note store is unavailable: {e}"), &e)
}

async fn load_note(ctx: &Ctx, name: &str) -> Result<Option<Note>, ErrorData> {
    let Some(r) = ctx
        .store()
        .get(NOTES_NS, name)
        .await
        .map_err(store_failure)?
    else {
        return Ok(None);
    };
    serde_json::from_slice(r.value())
        .map(Some)
        .map_err(|e| internal(format!("Corrupt note {name}: {e}")))
}

/// Namespace of the notes' metadata (size, last change), written with each note, so that
/// listing reads these small records rather than every note whole.
pub const NOTES_META_NS: &str = "notes.meta";
/// Namespace of the marker that the metadata of notes written before it existed was built.
const NOTES_INDEX_NS: &str = "notes.index";

/// What listing shows of a note.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NoteMeta {
    /// Size of the text, bytes.
    pub bytes: u64,
    /// Last change, Unix milliseconds.
    pub updated_millis: u64,
}

impl NoteMeta {
    fn of(note: &Note) -> NoteMeta {
        NoteMeta {
            bytes: note.text.len() as u64,
            updated_millis: note.updated_millis,
        }
    }
}

/// Every note's name and metadata, in name order.
async fn list_notes(ctx: &Ctx) -> Result<Vec<(String, NoteMeta)>, ErrorData> {
    backfill_meta(ctx).await?;
    let records = ctx
        .store()
        .scan_all(NOTES_META_NS, "")
        .await
        .map_err(store_failure)?;
    Ok(records
        .into_iter()
        .filter_map(|r| {
            let meta = serde_json::from_slice::<NoteMeta>(r.value()).ok()?;
            Some((r.record.key, meta))
        })
        .collect())
}

/// How many times a note's creation or deletion is tried again when another one changed the
/// count first.
const COUNT_RETRIES: u32 = 64;

/// A short random pause before trying again, growing with the attempts (up to ~8 ms), so that
/// writers contending for the count spread out.
async fn conflict_pause(attempt: u32) {
    let most = u64::from(attempt.min(16)) * 500;
    let micros = haven_state::ids::random_u64() % most.max(1);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

/// How many notes the store holds, and the condition to update the count against: the count
/// record, or (once, when there is none yet) the notes' metadata counted.
async fn note_count(ctx: &Ctx) -> Result<(u64, Expect), ErrorData> {
    let store = ctx.store();
    if let Some(r) = store
        .get(NOTES_INDEX_NS, COUNT_KEY)
        .await
        .map_err(store_failure)?
    {
        let n = std::str::from_utf8(r.value())
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| internal("Corrupt note count"))?;
        return Ok((n, Expect::Revision(r.revision)));
    }
    backfill_meta(ctx).await?;
    let n = store
        .scan_all(NOTES_META_NS, "")
        .await
        .map_err(store_failure)?
        .len() as u64;
    Ok((n, Expect::Absent))
}

/// Saves a note: a new one only while the store holds fewer than `limits.max_notes`, its
/// count and its announcements (resource updated, resource list changed) written in the same
/// commit (retried when another write came first). Overwriting a
/// note is an unconditional write, as it always was (the last writer wins, concurrent
/// writers of one note never conflict); an overwrite racing a deletion of the same note may
/// leave the count one short.
async fn save_note(
    ctx: &Ctx,
    limits: &NoteLimits,
    name: &str,
    value: Vec<u8>,
    meta: Vec<u8>,
) -> Result<(), ErrorData> {
    let store = ctx.store();
    for attempt in 0..COUNT_RETRIES {
        if attempt > 0 {
            conflict_pause(attempt).await;
        }
        let batch = match store.get(NOTES_NS, name).await.map_err(store_failure)? {
            Some(_) => Batch::new().put(NOTES_NS, name, value.clone()).put(
                NOTES_META_NS,
                name,
                meta.clone(),
            ),
            None => {
                let (count, expect) = note_count(ctx).await?;
                let max = limits.max_notes.load(Ordering::Relaxed);
                if count >= max {
                    return Err(invalid_params(format!(
                        "Invalid arguments: the store holds {count} notes, at most {max} are allowed (setting limits.max_notes); delete one first"
                    )));
                }
                Batch::new()
                    .put_if(NOTES_NS, name, value.clone(), Expect::Absent)
                    .put(NOTES_META_NS, name, meta.clone())
                    .put_if(
                        NOTES_INDEX_NS,
                        COUNT_KEY,
                        (count + 1).to_string().into_bytes(),
                        expect,
                    )
            }
        };
        let batch = with_announcements(batch, &**store, &note_announcements(name));
        match store.commit(batch).await {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(store_failure(e)),
        }
    }
    Err(store_failure(StoreError::Unavailable(
        "the note is written too often concurrently".into(),
    )))
}

/// Deletes a note, counts it out and announces it, in one commit (retried when another write
/// came first); `false` when there is no such note.
async fn delete_note(ctx: &Ctx, name: &str) -> Result<bool, ErrorData> {
    let store = ctx.store();
    for attempt in 0..COUNT_RETRIES {
        if attempt > 0 {
            conflict_pause(attempt).await;
        }
        let Some(r) = store.get(NOTES_NS, name).await.map_err(store_failure)? else {
            return Ok(false);
        };
        let (count, expect) = note_count(ctx).await?;
        let batch = Batch::new()
            .delete_if(NOTES_NS, name, Expect::Revision(r.revision))
            .delete(NOTES_META_NS, name)
            .put_if(
                NOTES_INDEX_NS,
                COUNT_KEY,
                count.saturating_sub(1).to_string().into_bytes(),
                expect,
            );
        let batch = with_announcements(batch, &**store, &note_announcements(name));
        match store.commit(batch).await {
            Ok(_) => return Ok(true),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(store_failure(e)),
        }
    }
    Err(store_failure(StoreError::Unavailable(
        "the note is written too often concurrently".into(),
    )))
}

/// Once per store: writes the metadata of notes stored before it was kept, reading them a
/// page at a time (a later write of a note wins over what this writes).
async fn backfill_meta(ctx: &Ctx) -> Result<(), ErrorData> {
    let store = ctx.store();
    if store
        .get(NOTES_INDEX_NS, "built")
        .await
        .map_err(store_failure)?
        .is_some()
    {
        return Ok(());
    }
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan(NOTES_NS, "", after.as_deref(), 32)
            .await
            .map_err(store_failure)?;
        for r in &page.records {
            if let Ok(note) = serde_json::from_slice::<Note>(r.value()) {
                let meta = serde_json::to_vec(&NoteMeta::of(&note)).expect("metadata serializes");
                let batch = Batch::new().put_if(NOTES_META_NS, &r.record.key, meta, Expect::Absent);
                // Upkeep, not a change of the request's own: a retry may do it again.
                match ctx.commit_upkeep(batch).await {
                    Ok(_) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(store_failure(e)),
                }
            }
        }
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    ctx.commit_upkeep(Batch::new().put(NOTES_INDEX_NS, "built", b"1".to_vec()))
        .await
        .map_err(store_failure)?;
    Ok(())
}

fn note_uri(name: &str) -> String {
    format!("{NOTE_SCHEME}{}", percent_encode(name))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a change of note `name` announces, in the commit of the change itself.
fn note_announcements(name: &str) -> [Announcement; 2] {
    [
        Announcement::ResourceUpdated(note_uri(name)),
        Announcement::ResourcesChanged,
    ]
}

#[async_trait]
impl Catalog for DefaultCatalog {
    fn info(&self) -> CatalogInfo {
        let mut capabilities = ServerCapabilities::default();
        let mut tools = ToolsCapability::default();
        tools.list_changed = Some(true);
        capabilities.tools = Some(tools);
        let mut resources = ResourcesCapability::default();
        resources.subscribe = Some(true);
        resources.list_changed = Some(true);
        capabilities.resources = Some(resources);
        let mut prompts = PromptsCapability::default();
        prompts.list_changed = Some(true);
        capabilities.prompts = Some(prompts);
        capabilities.completions = Some(JsonObject::new());
        capabilities.logging = Some(JsonObject::new());
        CatalogInfo {
            server_info: Implementation::new("haven", env!("CARGO_PKG_VERSION")),
            capabilities,
            instructions: Some(
                "Haven's default catalog: echo, time_now, durable notes (notes_put, notes_get, notes_list, notes_delete; also readable as note:// resources) and sleep, a long call with progress."
                    .into(),
            ),
        }
    }

    async fn tools(&self, _ctx: &Ctx) -> Result<Vec<Tool>, ErrorData> {
        Ok(self.tools.clone())
    }

    fn tracks_effects(&self, _tool: &str) -> bool {
        // Notes are the only state these tools change, and they live in the store.
        true
    }

    fn task_support(&self, tool: &str) -> TaskSupport {
        if tool == "sleep" {
            TaskSupport::Optional
        } else {
            TaskSupport::Forbidden
        }
    }

    // Long by design: a flat match of the catalog's tools.
    async fn call_tool(
        &self,
        ctx: &Ctx,
        name: &str,
        args: JsonObject,
        _round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let result = match name {
            "echo" => text_result(str_arg(&args, "text")?),
            "time_now" => {
                let millis = ctx.store().clock().wall_millis();
                let utc = haven_mcp::engine::tasks::rfc3339(millis);
                let mut r = text_result(utc.clone());
                r.structured_content = Some(json!({ "utc": utc, "unixMillis": millis }));
                r
            }
            "notes_put" => {
                let name = note_name(&args)?;
                let text = str_arg(&args, "text")?;
                let max = self.limits.max_note_bytes.load(Ordering::Relaxed);
                if text.len() > max {
                    return Err(invalid_params(format!(
                        "Invalid arguments: 'text' is {} bytes long, at most {max} are allowed (setting limits.max_note_bytes)",
                        text.len()
                    )));
                }
                let note = Note {
                    text: text.to_owned(),
                    updated_millis: ctx.store().clock().wall_millis(),
                };
                let value = serde_json::to_vec(&note).expect("notes serialize");
                let meta = serde_json::to_vec(&NoteMeta::of(&note)).expect("metadata serializes");
                save_note(ctx, &self.limits, name, value, meta).await?;
                text_result(format!("Saved note {name}"))
            }
            "notes_get" => {
                let name = note_name(&args)?;
                match load_note(ctx, name).await? {
                    Some(n) => text_result(n.text),
                    None => error_result(format!("No note named {name}")),
                }
            }
            "notes_list" => {
                let notes = list_notes(ctx).await?;
                let text = if notes.is_empty() {
                    "No notes.".to_owned()
                } else {
                    notes
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                let mut r = text_result(text);
                r.structured_content = Some(json!({
                    "notes": notes.iter().map(|(n, note)| json!({
                        "name": n,
                        "updated": haven_mcp::engine::tasks::rfc3339(note.updated_millis),
                        "bytes": note.bytes,
                    })).collect::<Vec<_>>()
                }));
                r
            }
            "notes_delete" => {
                let name = note_name(&args)?;
                if !delete_note(ctx, name).await? {
                    return Ok(Step::Done(error_result(format!("No note named {name}"))));
                }
                text_result(format!("Deleted note {name}"))
            }
            "sleep" => {
                let seconds = args
                    .get("seconds")
                    .and_then(Value::as_f64)
                    .filter(|s| s.is_finite() && (0.0..=MAX_SLEEP_SECONDS).contains(s))
                    .ok_or_else(|| invalid_params(format!("Invalid arguments: 'seconds' must be a number from 0 to {MAX_SLEEP_SECONDS}")))?;
                if seconds > 0.0 && !ctx.is_task() {
                    ctx.become_task().await?;
                }
                let total = seconds.ceil() as u64;
                ctx.progress(
                    0.0,
                    Some(seconds),
                    Some(format!("Sleeping {seconds} seconds")),
                );
                let started = tokio::time::Instant::now();
                for step in 1..=total {
                    let until = started + Duration::from_secs_f64((step as f64).min(seconds));
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = ctx.cancelled().cancelled() => {
                            return Err(ErrorData::new(rmcp::model::ErrorCode(-32800), "Request cancelled", None));
                        }
                    }
                    let done = (step as f64).min(seconds);
                    ctx.progress(
                        done,
                        Some(seconds),
                        Some(format!("Slept {done} of {seconds} seconds")),
                    );
                }
                text_result(format!("Slept {seconds} seconds"))
            }
            other => return Err(haven_mcp::catalog::unknown_tool(other)),
        };
        Ok(Step::Done(result))
    }

    async fn resources(&self, ctx: &Ctx) -> Result<Vec<Resource>, ErrorData> {
        Ok(list_notes(ctx)
            .await?
            .into_iter()
            .map(|(name, note)| {
                Resource::new(note_uri(&name), name.clone())
                    .with_description(format!("Note {name}"))
                    .with_mime_type("text/plain")
                    .with_size(note.bytes)
            })
            .collect())
    }

    async fn resource_templates(&self, _ctx: &Ctx) -> Result<Vec<ResourceTemplate>, ErrorData> {
        Ok(vec![
            ResourceTemplate::new("note://{name}", "note")
                .with_description("A note saved with notes_put")
                .with_mime_type("text/plain"),
        ])
    }

    async fn read_resource(
        &self,
        ctx: &Ctx,
        uri: &str,
        _round: Round,
    ) -> Result<Step<ReadResourceResult>, ErrorData> {
        let Some(name) = uri.strip_prefix(NOTE_SCHEME).and_then(percent_decode) else {
            return Err(haven_mcp::catalog::resource_not_found(uri));
        };
        match load_note(ctx, &name).await? {
            Some(n) => Ok(Step::Done(ReadResourceResult::new(vec![
                ResourceContents::text(n.text, uri).with_mime_type("text/plain"),
            ]))),
            None => Err(haven_mcp::catalog::resource_not_found(uri)),
        }
    }

    async fn prompts(&self, _ctx: &Ctx) -> Result<Vec<rmcp::model::Prompt>, ErrorData> {
        Ok(vec![rmcp::model::Prompt::new(
            "discuss_note",
            Some("Starts a conversation about a saved note, with the note embedded."),
            Some(vec![
                PromptArgument::new("name")
                    .with_description("Name of the note")
                    .with_required(true),
            ]),
        )])
    }

    async fn get_prompt(
        &self,
        ctx: &Ctx,
        name: &str,
        args: JsonObject,
        _round: Round,
    ) -> Result<Step<GetPromptResult>, ErrorData> {
        if name != "discuss_note" {
            return Err(invalid_params(format!("Unknown prompt: {name}")));
        }
        let note = note_name(&args)?;
        let Some(n) = load_note(ctx, note).await? else {
            return Err(invalid_params(format!("No note named {note}")));
        };
        let uri = note_uri(note);
        Ok(Step::Done(GetPromptResult::new(vec![
            PromptMessage::new(
                Role::User,
                ContentBlock::resource(
                    ResourceContents::text(n.text, uri).with_mime_type("text/plain"),
                ),
            ),
            PromptMessage::new_text(Role::User, format!("Let's discuss the note {note} above.")),
        ])))
    }

    async fn complete(
        &self,
        ctx: &Ctx,
        params: CompleteRequestParams,
    ) -> Result<CompleteResult, ErrorData> {
        let wants_note = match &params.r#ref {
            Reference::Prompt(p) => p.name == "discuss_note",
            Reference::Resource(r) => r.uri == "note://{name}",
            _ => false,
        } && params.argument.name == "name";
        if !wants_note {
            return Ok(CompleteResult::default());
        }
        let values: Vec<String> = list_notes(ctx)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(&params.argument.value))
            .take(CompletionInfo::MAX_VALUES)
            .collect();
        let info = CompletionInfo::with_all_values(values).map_err(internal)?;
        Ok(CompleteResult::new(info))
    }
}
