//! The federated catalog: Haven's own catalog plus every enabled upstream's lists (read from
//! the list records, so every node serves the same), with calls routed by prefix.

use std::sync::Arc;

use async_trait::async_trait;
use haven_control::registry::{served_name, served_uri, split_name, split_uri};
use haven_mcp::catalog::{Catalog, CatalogInfo, Ctx, Round, Step, TaskSupport};
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, ClientRequest, CompleteRequest,
    CompleteRequestParams, CompleteResult, ErrorData, GetPromptRequest, GetPromptRequestParams,
    GetPromptResult, JsonObject, Prompt, ReadResourceRequest, ReadResourceRequestParams,
    ReadResourceResult, Reference, Resource, ResourceContents, ResourceTemplate, ServerResult,
    Tool,
};

use crate::Upstreams;
use crate::lists::{self, LISTS_NS, UpstreamLists, valid_served_name};

/// Haven's own catalog plus the upstreams' tools, prompts, resources and templates.
pub struct FederatedCatalog {
    upstreams: Upstreams,
    base: Arc<dyn Catalog>,
}

/// The upstream lists could not be read; marked retryable when the store is unavailable.
fn store_error(e: haven_state::StoreError) -> ErrorData {
    haven_mcp::outcome::store_failure(format!("reading upstream lists failed: {e}"), &e)
}

impl FederatedCatalog {
    /// Serves `base` and the upstreams of `upstreams`.
    pub fn new(upstreams: Upstreams, base: Arc<dyn Catalog>) -> FederatedCatalog {
        FederatedCatalog { upstreams, base }
    }

    /// The lists of every enabled registered upstream, by name.
    pub async fn upstream_lists(&self) -> Result<Vec<(String, Arc<UpstreamLists>)>, ErrorData> {
        let store = &*self.upstreams.inner.shared.store;
        let enabled: Vec<String> = lists::registered(store)
            .await
            .map_err(store_error)?
            .into_iter()
            .filter(|s| !s.disabled)
            .map(|s| s.name)
            .collect();
        let records = lists::scan_all(store, LISTS_NS)
            .await
            .map_err(store_error)?;
        let mut out = Vec::new();
        let mut cache = self.upstreams.inner.lists_cache.lock();
        cache.retain(|k, _| records.contains_key(k));
        for name in enabled {
            let Some((revision, bytes)) = records.get(&name) else {
                continue;
            };
            let lists = match cache.get(&name) {
                Some((r, l)) if r == revision => l.clone(),
                _ => {
                    let Some(l) = lists::decode_lists(&name, bytes) else {
                        continue;
                    };
                    let l = Arc::new(l);
                    cache.insert(name.clone(), (*revision, l.clone()));
                    l
                }
            };
            out.push((name, lists));
        }
        Ok(out)
    }

    /// `(upstream, original)` if `name` is a served name of a known upstream.
    async fn route<'a>(&self, name: &'a str) -> Option<(&'a str, &'a str)> {
        let (up, orig) = split_name(name)?;
        self.is_upstream(up).await.then_some((up, orig))
    }

    async fn route_uri<'a>(&self, uri: &'a str) -> Option<(&'a str, &'a str)> {
        let (up, orig) = split_uri(uri)?;
        self.is_upstream(up).await.then_some((up, orig))
    }

    async fn is_upstream(&self, name: &str) -> bool {
        if self.upstreams.knows(name) {
            return true;
        }
        // Registered but not (yet) picked up by this node's pool: still the upstream's name.
        matches!(
            self.upstreams
                .inner
                .shared
                .store
                .get(haven_control::registry::REGISTRY_NS, name)
                .await,
            Ok(Some(_))
        )
    }
}

#[async_trait]
impl Catalog for FederatedCatalog {
    fn info(&self) -> CatalogInfo {
        let mut info = self.base.info();
        let caps = &mut info.capabilities;
        let mut tools = caps.tools.take().unwrap_or_default();
        tools.list_changed = Some(true);
        caps.tools = Some(tools);
        let mut prompts = caps.prompts.take().unwrap_or_default();
        prompts.list_changed = Some(true);
        caps.prompts = Some(prompts);
        let mut resources = caps.resources.take().unwrap_or_default();
        resources.list_changed = Some(true);
        caps.resources = Some(resources);
        info
    }

    async fn tools(&self, ctx: &Ctx) -> Result<Vec<Tool>, ErrorData> {
        let mut out = self.base.tools(ctx).await?;
        for (up, lists) in self.upstream_lists().await? {
            for t in &lists.tools {
                let name = served_name(&up, &t.name);
                if valid_served_name(&name) {
                    let mut t = t.clone();
                    t.name = name.into();
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    fn tracks_effects(&self, tool: &str) -> bool {
        match split_name(tool) {
            Some((up, _)) if self.upstreams.knows(up) => false,
            _ => self.base.tracks_effects(tool),
        }
    }

    fn task_support(&self, tool: &str) -> TaskSupport {
        match split_name(tool) {
            Some((up, _)) if self.upstreams.knows(up) => TaskSupport::Forbidden,
            _ => self.base.task_support(tool),
        }
    }

    async fn call_tool(
        &self,
        ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let Some((up, orig)) = self.route(name).await else {
            return self.base.call_tool(ctx, name, arguments, round).await;
        };
        let params = CallToolRequestParams::new(orig.to_owned()).with_arguments(arguments);
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        let result = self
            .upstreams
            .request(up, "tools/call", request, ctx, |r| match r {
                ServerResult::CallToolResult(r) => Some(r),
                // A result without content (rmcp reads `{}` as the empty result).
                ServerResult::EmptyResult(_) => Some(CallToolResult::success(Vec::new())),
                _ => None,
            })
            .await?;
        Ok(Step::Done(result))
    }

    async fn resources(&self, ctx: &Ctx) -> Result<Vec<Resource>, ErrorData> {
        let mut out = self.base.resources(ctx).await?;
        for (up, lists) in self.upstream_lists().await? {
            for r in &lists.resources {
                let mut r = r.clone();
                r.uri = served_uri(&up, &r.uri);
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn resource_templates(&self, ctx: &Ctx) -> Result<Vec<ResourceTemplate>, ErrorData> {
        let mut out = self.base.resource_templates(ctx).await?;
        for (up, lists) in self.upstream_lists().await? {
            for t in &lists.templates {
                let mut t = t.clone();
                t.uri_template = served_uri(&up, &t.uri_template);
                out.push(t);
            }
        }
        Ok(out)
    }

    async fn read_resource(
        &self,
        ctx: &Ctx,
        uri: &str,
        round: Round,
    ) -> Result<Step<ReadResourceResult>, ErrorData> {
        let Some((up, orig)) = self.route_uri(uri).await else {
            return self.base.read_resource(ctx, uri, round).await;
        };
        let request = ClientRequest::ReadResourceRequest(ReadResourceRequest::new(
            ReadResourceRequestParams::new(orig),
        ));
        let mut result = self
            .upstreams
            .request(up, "resources/read", request, ctx, |r| match r {
                ServerResult::ReadResourceResult(r) => Some(r),
                _ => None,
            })
            .await?;
        for c in &mut result.contents {
            match c {
                ResourceContents::TextResourceContents { uri, .. }
                | ResourceContents::BlobResourceContents { uri, .. } => {
                    *uri = served_uri(up, uri);
                }
                _ => {}
            }
        }
        Ok(Step::Done(result))
    }

    async fn prompts(&self, ctx: &Ctx) -> Result<Vec<Prompt>, ErrorData> {
        let mut out = self.base.prompts(ctx).await?;
        for (up, lists) in self.upstream_lists().await? {
            for p in &lists.prompts {
                let name = served_name(&up, &p.name);
                if valid_served_name(&name) {
                    let mut p = p.clone();
                    p.name = name;
                    out.push(p);
                }
            }
        }
        Ok(out)
    }

    async fn get_prompt(
        &self,
        ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<GetPromptResult>, ErrorData> {
        let Some((up, orig)) = self.route(name).await else {
            return self.base.get_prompt(ctx, name, arguments, round).await;
        };
        let mut params = GetPromptRequestParams::new(orig);
        if !arguments.is_empty() {
            params = params.with_arguments(arguments);
        }
        let request = ClientRequest::GetPromptRequest(GetPromptRequest::new(params));
        let result = self
            .upstreams
            .request(up, "prompts/get", request, ctx, |r| match r {
                ServerResult::GetPromptResult(r) => Some(r),
                _ => None,
            })
            .await?;
        Ok(Step::Done(result))
    }

    async fn complete(
        &self,
        ctx: &Ctx,
        params: CompleteRequestParams,
    ) -> Result<CompleteResult, ErrorData> {
        let target = match &params.r#ref {
            Reference::Prompt(p) => self
                .route(&p.name)
                .await
                .map(|(up, orig)| (up.to_owned(), orig.to_owned())),
            Reference::Resource(r) => self
                .route_uri(&r.uri)
                .await
                .map(|(up, orig)| (up.to_owned(), orig.to_owned())),
            _ => None,
        };
        let Some((up, orig)) = target else {
            return self.base.complete(ctx, params).await;
        };
        let mut params = params;
        match &mut params.r#ref {
            Reference::Prompt(p) => p.name = orig,
            Reference::Resource(r) => r.uri = orig,
            _ => {}
        }
        let request = ClientRequest::CompleteRequest(CompleteRequest::new(params));
        self.upstreams
            .request(&up, "completion/complete", request, ctx, |r| match r {
                ServerResult::CompleteResult(r) => Some(r),
                _ => None,
            })
            .await
    }
}
