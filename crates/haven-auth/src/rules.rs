//! Authorization rules: which principals may use which tools, resources and prompts.
//!
//! A [`Rule`] names principals by [`Selector`]s (`sub:alice`, `client:ci-bot`,
//! `group:team-a`, `key:<id>`, `scope:mcp:admin`, `id:<principal id>`, `authenticated`,
//! `anonymous`, `*`) and items by name patterns, per kind: tool names (`weather__*` covers
//! every tool of the federated upstream `weather`), resource URIs (`notes://team-a/*`) and
//! prompt names. `*` matches any run of characters (`/` included) and `?` one character;
//! nothing else is special.
//!
//! **How a decision is made.** With no rules at all, everything is allowed (authorization is
//! open, as before rules existed). Once one rule exists, an item is allowed to a principal
//! exactly when an `allow` rule that selects the principal covers the item and no `deny` rule
//! that selects the principal covers it: the first rule closes everything it does not open,
//! and a deny always wins. A record in the rules namespace that cannot be read (written by a
//! newer version, or damaged) counts as a rule denying everything to everyone, so that
//! damage never opens anything.
//!
//! Rules live in namespace [`RULES_NS`], one record per rule name, like every other
//! control-plane record: cluster nodes share them through the region's log, region links
//! replicate them, backups hold them. A [`Policy`] keeps the current [`RuleSet`] of a node in
//! memory and replaces it whenever the node's store applies a change to the namespace, so a
//! change takes effect on a node the moment its store has it, without a restart.

use std::sync::Arc;

use haven_state::{Batch, Store, StoreError};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use wildmatch::WildMatch;

use crate::principal::{Principal, PrincipalKind};

/// Namespace of rule records, keyed by rule name.
pub const RULES_NS: &str = "auth-rules";
/// Longest rule name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest selector or pattern.
pub const MAX_PATTERN_LEN: usize = 512;
/// Most selectors, and most patterns of each kind, in a rule.
pub const MAX_ITEMS: usize = 64;
/// Most rules a store may hold.
pub const MAX_RULES: usize = 1000;
/// Longest description.
const MAX_DESCRIPTION_LEN: usize = 512;

/// Errors of rule operations.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rule is not valid; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// No rule has this name.
    #[error("no authorization rule named '{0}' (see `haven auth rules list`)")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a rule does to what it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Opens the covered items to the selected principals.
    #[default]
    Allow,
    /// Closes them, whatever allow rules say.
    Deny,
}

/// The kinds of item a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A tool, by name.
    Tool,
    /// A resource, by URI (a resource template, by its URI template).
    Resource,
    /// A prompt, by name.
    Prompt,
}

impl Kind {
    /// The word used in messages and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Resource => "resource",
            Kind::Prompt => "prompt",
        }
    }
}

/// One authorization rule, as stored and as the CLI and admin API show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name: 1 to 64 of `A-Za-z0-9._-`.
    pub name: String,
    /// Allow (the default) or deny.
    #[serde(default)]
    pub effect: Effect,
    /// Who the rule is about: [`Selector`]s in their text form.
    pub principals: Vec<String>,
    /// Tool name patterns.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Resource URI patterns.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Prompt name patterns.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Free text for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Who wrote this version of the rule (set by the node, not by the caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
    /// When, in seconds since the Unix epoch (set by the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<u64>,
}

impl Rule {
    /// Checks the rule; a valid rule compiles. Errors say what to change.
    pub fn validate(&self) -> Result<(), RuleError> {
        validate_name(&self.name)?;
        if self.principals.is_empty() {
            return Err(RuleError::Invalid(format!(
                "rule '{}' selects no principal: give at least one of sub:<subject>, client:<client id>, group:<group>, key:<key id>, scope:<scope>, id:<principal id>, authenticated, anonymous, *",
                self.name
            )));
        }
        if self.tools.is_empty() && self.resources.is_empty() && self.prompts.is_empty() {
            return Err(RuleError::Invalid(format!(
                "rule '{}' covers nothing: give at least one tool, resource or prompt pattern",
                self.name
            )));
        }
        for (what, list) in [
            ("principals", &self.principals),
            ("tools", &self.tools),
            ("resources", &self.resources),
            ("prompts", &self.prompts),
        ] {
            if list.len() > MAX_ITEMS {
                return Err(RuleError::Invalid(format!(
                    "rule '{}' has {} {what}; at most {MAX_ITEMS}",
                    self.name,
                    list.len()
                )));
            }
            for p in list {
                check_text(p, what)?;
            }
        }
        for s in &self.principals {
            Selector::parse(s)?;
        }
        if let Some(d) = &self.description
            && d.chars().count() > MAX_DESCRIPTION_LEN
        {
            return Err(RuleError::Invalid(format!(
                "the description is longer than {MAX_DESCRIPTION_LEN} characters"
            )));
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), RuleError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RuleError::Invalid(format!(
            "rule name {name:?} must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-'"
        )))
    }
}

fn check_text(p: &str, what: &str) -> Result<(), RuleError> {
    if p.is_empty() || p.len() > MAX_PATTERN_LEN || p.chars().any(char::is_control) {
        return Err(RuleError::Invalid(format!(
            "{what}: {p:?} must be 1 to {MAX_PATTERN_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

/// Who a rule is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Every caller, authenticated or not (`*`).
    Anyone,
    /// Every authenticated caller (`authenticated`).
    Authenticated,
    /// The caller when authentication is off (`anonymous`).
    Anonymous,
    /// A token's subject, from any accepted issuer (`sub:<subject>`).
    Subject(String),
    /// The OAuth client a token was issued to (`client:<client id>`).
    Client(String),
    /// A group or role from the token's claims or the API key (`group:<name>`).
    Group(String),
    /// An API key (`key:<key id>`).
    Key(String),
    /// A granted scope (`scope:<scope>`).
    Scope(String),
    /// One exact principal id as the audit log names it (`id:token:<iss>#<sub>`).
    Id(String),
}

impl Selector {
    /// Reads the text form.
    pub fn parse(text: &str) -> Result<Selector, RuleError> {
        let s = match text {
            "*" => return Ok(Selector::Anyone),
            "authenticated" => return Ok(Selector::Authenticated),
            "anonymous" => return Ok(Selector::Anonymous),
            _ => text,
        };
        let (kind, value) = s.split_once(':').ok_or_else(|| bad_selector(text))?;
        if value.is_empty() {
            return Err(bad_selector(text));
        }
        let v = value.to_owned();
        Ok(match kind {
            "sub" => Selector::Subject(v),
            "client" => Selector::Client(v),
            "group" => Selector::Group(v),
            "key" => Selector::Key(v),
            "scope" => Selector::Scope(v),
            "id" => Selector::Id(v),
            _ => return Err(bad_selector(text)),
        })
    }

    /// Whether `p` is selected.
    pub fn selects(&self, p: &Principal) -> bool {
        match self {
            Selector::Anyone => true,
            Selector::Authenticated => !p.is_anonymous(),
            Selector::Anonymous => p.is_anonymous(),
            Selector::Subject(s) => p.kind == PrincipalKind::Token && &p.subject == s,
            Selector::Client(c) => p.client_id.as_deref() == Some(c.as_str()),
            Selector::Group(g) => p.groups.iter().any(|x| x == g),
            Selector::Key(k) => p.kind == PrincipalKind::ApiKey && &p.subject == k,
            Selector::Scope(s) => p.has_scope(s),
            Selector::Id(id) => &p.id() == id,
        }
    }
}

fn bad_selector(text: &str) -> RuleError {
    RuleError::Invalid(format!(
        "principal selector {text:?} is not one of sub:<subject>, client:<client id>, group:<group>, key:<key id>, scope:<scope>, id:<principal id>, authenticated, anonymous, *"
    ))
}

/// A rule ready to match.
#[derive(Debug)]
struct Compiled {
    effect: Effect,
    selectors: Vec<Selector>,
    tools: Vec<WildMatch>,
    resources: Vec<WildMatch>,
    prompts: Vec<WildMatch>,
}

impl Compiled {
    fn of(rule: &Rule) -> Result<Compiled, RuleError> {
        rule.validate()?;
        let pats = |l: &[String]| l.iter().map(|p| WildMatch::new(p)).collect();
        Ok(Compiled {
            effect: rule.effect,
            selectors: rule
                .principals
                .iter()
                .map(|s| Selector::parse(s))
                .collect::<Result<_, _>>()?,
            tools: pats(&rule.tools),
            resources: pats(&rule.resources),
            prompts: pats(&rule.prompts),
        })
    }

    /// A rule that denies everything to everyone: what an unreadable record counts as.
    fn deny_all() -> Compiled {
        let all = || vec![WildMatch::new("*")];
        Compiled {
            effect: Effect::Deny,
            selectors: vec![Selector::Anyone],
            tools: all(),
            resources: all(),
            prompts: all(),
        }
    }

    fn selects(&self, p: &Principal) -> bool {
        self.selectors.iter().any(|s| s.selects(p))
    }

    fn covers(&self, kind: Kind, name: &str) -> bool {
        let pats = match kind {
            Kind::Tool => &self.tools,
            Kind::Resource => &self.resources,
            Kind::Prompt => &self.prompts,
        };
        pats.iter().any(|m| m.matches(name))
    }
}

/// A node's rules, compiled.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Compiled>,
    unreadable: usize,
}

impl RuleSet {
    /// Compiles `rules`; an invalid one is an error.
    pub fn new(rules: &[Rule]) -> Result<RuleSet, RuleError> {
        Ok(RuleSet {
            rules: rules.iter().map(Compiled::of).collect::<Result<_, _>>()?,
            unreadable: 0,
        })
    }

    /// Whether no rule exists (everything is allowed).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many rules are in force (unreadable records included).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no rule exists (the same as [`is_open`](Self::is_open)).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many records could not be read (each denies everything).
    pub fn unreadable(&self) -> usize {
        self.unreadable
    }

    /// What `p` may use: the rules that select it.
    pub fn grant<'a>(&'a self, p: &Principal) -> Grant<'a> {
        Grant {
            open: self.is_open(),
            rules: self.rules.iter().filter(|r| r.selects(p)).collect(),
        }
    }

    /// Whether `p` may use the item `name` of `kind`.
    pub fn allows(&self, p: &Principal, kind: Kind, name: &str) -> bool {
        self.grant(p).allows(kind, name)
    }
}

/// The rules that select one principal: answers many questions about it at the cost of one
/// selection (a list is filtered through one grant).
pub struct Grant<'a> {
    open: bool,
    rules: Vec<&'a Compiled>,
}

impl Grant<'_> {
    /// Whether the item `name` of `kind` is allowed.
    pub fn allows(&self, kind: Kind, name: &str) -> bool {
        if self.open {
            return true;
        }
        let mut allowed = false;
        for r in &self.rules {
            if r.covers(kind, name) {
                if r.effect == Effect::Deny {
                    return false;
                }
                allowed = true;
            }
        }
        allowed
    }
}

/// Rule operations on a store (the CLI and the admin API go through these).
#[derive(Clone)]
pub struct Rules {
    store: Arc<dyn Store>,
}

impl Rules {
    /// The rules kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Rules {
        Rules { store }
    }

    /// Every rule, by name. An unreadable record is an error here (the operator must see it).
    pub async fn list(&self) -> Result<Vec<Rule>, RuleError> {
        let records = self.store.scan_all(RULES_NS, "").await?;
        records
            .iter()
            .map(|r| {
                serde_json::from_slice::<Rule>(r.value()).map_err(|e| {
                    RuleError::Invalid(format!(
                        "the stored rule '{}' cannot be read ({e}); it denies everything until it is replaced or removed",
                        r.record.key
                    ))
                })
            })
            .collect()
    }

    /// One rule.
    pub async fn get(&self, name: &str) -> Result<Option<Rule>, RuleError> {
        validate_name(name)?;
        match self.store.get(RULES_NS, name).await? {
            Some(r) => serde_json::from_slice(r.value()).map(Some).map_err(|e| {
                RuleError::Invalid(format!("the stored rule '{name}' cannot be read ({e})"))
            }),
            None => Ok(None),
        }
    }

    /// Creates or replaces the rule of `rule.name`. Bad input changes nothing. Returns the rule
    /// as stored, and whether it replaced one.
    pub async fn put(&self, mut rule: Rule, by: &str) -> Result<(Rule, bool), RuleError> {
        rule.validate()?;
        rule.updated_by = Some(by.to_owned());
        rule.updated_at = Some(self.store.clock().wall_millis() / 1000);
        let existed = self.store.get(RULES_NS, &rule.name).await?.is_some();
        if !existed {
            let count = self.store.scan_all(RULES_NS, "").await?.len();
            if count >= MAX_RULES {
                return Err(RuleError::Invalid(format!(
                    "there are already {count} rules; at most {MAX_RULES}"
                )));
            }
        }
        let value = serde_json::to_vec(&rule).expect("a rule serializes");
        self.store
            .commit(Batch::new().put(RULES_NS, &rule.name, value))
            .await?;
        tracing::info!(rule = %rule.name, by, "authorization rule written");
        Ok((rule, existed))
    }

    /// Removes a rule.
    pub async fn remove(&self, name: &str) -> Result<Rule, RuleError> {
        let Some(rule) = self.get(name).await.or_else(|e| match e {
            // A damaged record can still be removed.
            RuleError::Invalid(_) if validate_name(name).is_ok() => Ok(Some(Rule {
                name: name.to_owned(),
                effect: Effect::Deny,
                principals: Vec::new(),
                tools: Vec::new(),
                resources: Vec::new(),
                prompts: Vec::new(),
                description: Some("unreadable".into()),
                updated_by: None,
                updated_at: None,
            })),
            e => Err(e),
        })?
        else {
            return Err(RuleError::NotFound(name.to_owned()));
        };
        self.store
            .commit(Batch::new().delete(RULES_NS, name))
            .await?;
        tracing::info!(rule = %name, "authorization rule removed");
        Ok(rule)
    }

    /// The store's rules, compiled; an unreadable record becomes a deny-everything rule.
    pub async fn load(&self) -> Result<RuleSet, StoreError> {
        let records = self.store.scan_all(RULES_NS, "").await?;
        let mut set = RuleSet::default();
        for r in &records {
            let compiled = serde_json::from_slice::<Rule>(r.value())
                .map_err(|e| e.to_string())
                .and_then(|rule| Compiled::of(&rule).map_err(|e| e.to_string()));
            match compiled {
                Ok(c) => set.rules.push(c),
                Err(why) => {
                    tracing::error!(rule = %r.record.key, %why, "an authorization rule cannot be read; it denies everything until it is replaced or removed");
                    set.unreadable += 1;
                    set.rules.push(Compiled::deny_all());
                }
            }
        }
        Ok(set)
    }
}

/// A node's live rules: the current [`RuleSet`], replaced whenever the store applies a change
/// to the rules namespace. Cloning shares it; the watcher stops with the last clone.
#[derive(Clone)]
pub struct Policy {
    current: Arc<RwLock<Arc<RuleSet>>>,
    _watcher: Option<Arc<Watcher>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.current();
        f.debug_struct("Policy")
            .field("rules", &set.rules.len())
            .field("unreadable", &set.unreadable)
            .finish()
    }
}

struct Watcher(tokio::task::JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Policy {
    /// Loads the rules of `store` and keeps following it. Fails when the rules cannot be
    /// read at all (a node must not serve without knowing them).
    pub async fn follow(store: Arc<dyn Store>) -> Result<Policy, StoreError> {
        // Subscribed before the first load: no change falls between the two.
        let feed = store.subscribe();
        let rules = Rules::new(store);
        let first = rules.load().await?;
        let current = Arc::new(RwLock::new(Arc::new(first)));
        let task = tokio::spawn(watch(rules, Arc::downgrade(&current), feed));
        Ok(Policy {
            current,
            _watcher: Some(Arc::new(Watcher(task))),
        })
    }

    /// Fixed rules (tests, and nodes without a store to follow).
    pub fn fixed(set: RuleSet) -> Policy {
        Policy {
            current: Arc::new(RwLock::new(Arc::new(set))),
            _watcher: None,
        }
    }

    /// The rules now.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.read().clone()
    }
}

async fn watch(
    rules: Rules,
    current: std::sync::Weak<RwLock<Arc<RuleSet>>>,
    mut feed: broadcast::Receiver<Arc<haven_state::LogEntry>>,
) {
    let mut stale = false;
    loop {
        if stale {
            match rules.load().await {
                Ok(set) => {
                    let Some(c) = current.upgrade() else { return };
                    *c.write() = Arc::new(set);
                    stale = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the authorization rules failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        match feed.recv().await {
            Ok(entry) => {
                if let haven_state::Change::Record(r) = &entry.change
                    && r.namespace == RULES_NS
                {
                    stale = true;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => stale = true,
            Err(broadcast::error::RecvError::Closed) => return,
        }
        if current.strong_count() == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, effect: Effect, principals: &[&str], tools: &[&str]) -> Rule {
        Rule {
            name: name.into(),
            effect,
            principals: principals.iter().map(|s| s.to_string()).collect(),
            tools: tools.iter().map(|s| s.to_string()).collect(),
            resources: Vec::new(),
            prompts: Vec::new(),
            description: None,
            updated_by: None,
            updated_at: None,
        }
    }

    fn token(sub: &str, groups: &[&str]) -> Principal {
        Principal {
            kind: PrincipalKind::Token,
            issuer: Some("https://idp.example".into()),
            subject: sub.into(),
            client_id: Some(format!("{sub}-app")),
            groups: groups.iter().map(|s| s.to_string()).collect(),
            scopes: vec!["mcp:tools".into()],
            expires_at: None,
        }
    }

    #[test]
    fn no_rules_is_open_and_the_first_rule_closes_the_rest() {
        let alice = token("alice", &["team-a"]);
        let open = RuleSet::new(&[]).unwrap();
        assert!(open.allows(&alice, Kind::Tool, "anything"));
        let set =
            RuleSet::new(&[rule("a", Effect::Allow, &["group:team-a"], &["weather__*"])]).unwrap();
        assert!(set.allows(&alice, Kind::Tool, "weather__forecast"));
        assert!(!set.allows(&alice, Kind::Tool, "echo"));
        assert!(!set.allows(&alice, Kind::Prompt, "weather__forecast"));
        assert!(!set.allows(&token("bob", &[]), Kind::Tool, "weather__forecast"));
        assert!(!set.allows(&Principal::anonymous(), Kind::Tool, "weather__x"));
    }

    #[test]
    fn deny_wins_and_selectors_match_their_part() {
        let alice = token("alice", &["team-a"]);
        let set = RuleSet::new(&[
            rule("all", Effect::Allow, &["authenticated"], &["*"]),
            rule("no-admin", Effect::Deny, &["sub:alice"], &["admin_*"]),
        ])
        .unwrap();
        assert!(set.allows(&alice, Kind::Tool, "echo"));
        assert!(!set.allows(&alice, Kind::Tool, "admin_reset"));
        assert!(set.allows(&token("bob", &[]), Kind::Tool, "admin_reset"));
        assert!(!set.allows(&Principal::anonymous(), Kind::Tool, "echo"));
        for (sel, yes) in [
            ("client:alice-app", true),
            ("client:bob-app", false),
            ("scope:mcp:tools", true),
            ("id:token:https://idp.example#alice", true),
            ("id:token:https://other#alice", false),
            ("key:alice", false),
            ("*", true),
            ("anonymous", false),
        ] {
            assert_eq!(Selector::parse(sel).unwrap().selects(&alice), yes, "{sel}");
        }
        let mut key = alice.clone();
        key.kind = PrincipalKind::ApiKey;
        key.subject = "abc123def456".into();
        assert!(Selector::parse("key:abc123def456").unwrap().selects(&key));
        assert!(!Selector::parse("sub:abc123def456").unwrap().selects(&key));
    }

    #[test]
    fn bad_rules_are_refused_with_reasons() {
        for (r, want) in [
            (rule("", Effect::Allow, &["*"], &["x"]), "rule name"),
            (rule("a b", Effect::Allow, &["*"], &["x"]), "rule name"),
            (
                rule("a", Effect::Allow, &[], &["x"]),
                "selects no principal",
            ),
            (rule("a", Effect::Allow, &["*"], &[]), "covers nothing"),
            (rule("a", Effect::Allow, &["user:x"], &["x"]), "selector"),
            (rule("a", Effect::Allow, &["sub:"], &["x"]), "selector"),
            (rule("a", Effect::Allow, &["*"], &[""]), "tools"),
            (rule("a", Effect::Allow, &["*"], &["a\nb"]), "tools"),
        ] {
            let e = r.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[tokio::test]
    async fn a_policy_follows_the_store_and_an_unreadable_record_denies_everything() {
        use haven_state::{HybridClock, ManualClock, MemStore, Origin};
        let clock = Arc::new(HybridClock::new(Arc::new(ManualClock::new(
            1_796_083_200_000,
        ))));
        let store: Arc<dyn Store> = Arc::new(
            MemStore::open_alone(Origin::new("r", "n1"), clock)
                .await
                .unwrap(),
        );
        let rules = Rules::new(store.clone());
        let policy = Policy::follow(store.clone()).await.unwrap();
        let alice = token("alice", &[]);
        assert!(policy.current().is_open());
        let mut feed = store.subscribe();
        rules
            .put(rule("a", Effect::Allow, &["sub:alice"], &["echo"]), "test")
            .await
            .unwrap();
        // The policy's watcher sees the same feed: wait for the entry, then for the reload.
        feed.recv().await.unwrap();
        wait_for(|| !policy.current().is_open()).await;
        assert!(policy.current().allows(&alice, Kind::Tool, "echo"));
        assert!(!policy.current().allows(&alice, Kind::Tool, "sleep"));
        store
            .commit(Batch::new().put(RULES_NS, "broken", b"{not json".to_vec()))
            .await
            .unwrap();
        wait_for(|| policy.current().unreadable() == 1).await;
        assert!(!policy.current().allows(&alice, Kind::Tool, "echo"));
        assert!(rules.list().await.is_err());
        rules.remove("broken").await.unwrap();
        wait_for(|| policy.current().unreadable() == 0).await;
        assert!(policy.current().allows(&alice, Kind::Tool, "echo"));
        rules.remove("a").await.unwrap();
        wait_for(|| policy.current().is_open()).await;
        assert!(matches!(
            rules.remove("a").await,
            Err(RuleError::NotFound(_))
        ));
    }

    /// Yields until `f` holds; the watcher runs on the same runtime.
    async fn wait_for(f: impl Fn() -> bool) {
        for _ in 0..100_000 {
            if f() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the policy did not follow the store");
    }
}
