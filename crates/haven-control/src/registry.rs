//! The registry of upstream MCP servers: one record per upstream in namespace
//! [`REGISTRY_NS`], keyed by the upstream's name. Records are last-writer-wins registers
//! (the state layer's merge rule); removing an upstream writes a tombstone, so a removal made on
//! one node wins over an older add replicated from another.
//!
//! Naming rule (what clients see, documented in the README): an upstream's name is 1 to 32
//! characters of `a-z`, `0-9` and `-`, starting with a letter. Its tools and prompts are
//! served as `<upstream>__<name>`; its resources and resource templates as
//! `<upstream>+<uri>` (the upstream's name prefixed to the URI scheme, which keeps the URI valid
//! and leaves template variables intact). Since an upstream name holds no `_` or `+`, the first
//! `__` of a tool name and the first `+` of a URI always split them unambiguously.

use std::collections::{BTreeMap, BTreeSet};

use haven_state::{Batch, Expect, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Namespace of registry records.
pub const REGISTRY_NS: &str = "registry";
/// Separator between an upstream's name and a tool or prompt name.
pub const NAME_SEPARATOR: &str = "__";
/// Separator between an upstream's name and a resource URI.
pub const URI_SEPARATOR: char = '+';
/// Longest upstream name.
pub const MAX_NAME_LEN: usize = 32;
/// Longest per-upstream timeout, in milliseconds (10 minutes).
pub const MAX_TIMEOUT_MILLIS: u64 = 600_000;

/// Errors of registry operations. Messages say what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The entry is invalid; nothing was changed.
    #[error("invalid upstream entry: {0}")]
    Invalid(String),
    /// An upstream of that name exists already.
    #[error(
        "an upstream named '{0}' is already registered; remove it first, or add it again with --replace (API: ?replace=true)"
    )]
    Duplicate(String),
    /// No upstream of that name.
    #[error("no upstream named '{0}' is registered (see `haven registry list`)")]
    NotFound(String),
    /// The entry references secrets that do not exist.
    #[error(
        "the entry references unknown secret(s) {0}; create them first with `haven secrets set NAME`"
    )]
    UnknownSecrets(String),
    /// A stored record could not be read.
    #[error("registry record '{0}' is unreadable: {1}")]
    Corrupt(String, String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How Haven reaches an upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum Transport {
    /// A Streamable HTTP MCP server.
    Http {
        /// The MCP endpoint, `http://` or `https://`.
        url: String,
        /// Extra request headers; values may reference secrets (`${secret:NAME}`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
    /// A local process speaking MCP over stdin/stdout.
    Stdio {
        /// Program to run.
        command: String,
        /// Its arguments.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        args: Vec<String>,
        /// Extra environment; values may reference secrets (`${secret:NAME}`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
        /// Working directory, if not the node's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
}

/// One registered upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSpec {
    /// Name, the prefix of everything the upstream serves (see the module's naming rule).
    pub name: String,
    /// How to reach it.
    #[serde(flatten)]
    pub transport: Transport,
    /// Per-call timeout in milliseconds; `None` uses the `upstream.timeout_ms` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A disabled upstream stays registered but is not connected or served.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Checks an upstream name against the naming rule.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let ok_len = !name.is_empty() && name.len() <= MAX_NAME_LEN;
    let mut chars = name.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok_len && ok_first && ok_rest && !name.ends_with('-') {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "name '{name}' must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and '-', start with a letter and not end with '-'"
        )))
    }
}

pub use haven_secrets::template::{Piece, is_secret_name_char};

/// Splits a value into literal text and secret references (see
/// [`haven_secrets::template::parse_template`]); a malformed reference makes the entry invalid.
pub fn parse_template(value: &str) -> Result<Vec<Piece<'_>>, RegistryError> {
    haven_secrets::template::parse_template(value).map_err(|e| RegistryError::Invalid(e.0))
}

impl UpstreamSpec {
    /// Checks everything that can be checked without the network: the name, the URL or
    /// command, header names, the timeout and the syntax of secret references.
    pub fn validate(&self) -> Result<(), RegistryError> {
        validate_name(&self.name)?;
        if let Some(t) = self.timeout_ms
            && (t == 0 || t > MAX_TIMEOUT_MILLIS)
        {
            return Err(RegistryError::Invalid(format!(
                "timeout_ms {t} must be between 1 and {MAX_TIMEOUT_MILLIS}"
            )));
        }
        match &self.transport {
            Transport::Http { url, headers } => {
                // Errors show the URL without its credentials and query string.
                let shown = crate::redact::redact_url(url);
                let parsed = url::Url::parse(url).map_err(|e| {
                    RegistryError::Invalid(format!(
                        "url '{shown}' is not a valid URL ({e}); write e.g. http://127.0.0.1:3001/mcp"
                    ))
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(RegistryError::Invalid(format!(
                        "url '{shown}' must use http or https, not '{}'",
                        parsed.scheme()
                    )));
                }
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(RegistryError::Invalid(format!("url '{shown}' has no host")));
                }
                if url_has_credentials(&parsed)
                    && headers
                        .keys()
                        .any(|k| k.eq_ignore_ascii_case("authorization"))
                {
                    return Err(RegistryError::Invalid(format!(
                        "url '{shown}' carries credentials (user:password@) and an Authorization header is configured too; \
                         the URL's credentials would be sent as 'Authorization: Basic' in place of the header. \
                         Give only one: remove the credentials from the URL (keep the header, with a ${{secret:NAME}} reference), \
                         or drop the header"
                    )));
                }
                for (k, v) in headers {
                    let valid_name = !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                    if !valid_name {
                        return Err(RegistryError::Invalid(format!(
                            "header name '{k}' is not a valid HTTP header name"
                        )));
                    }
                    let lower = k.to_ascii_lowercase();
                    if matches!(
                        lower.as_str(),
                        "host"
                            | "content-length"
                            | "content-type"
                            | "accept"
                            | "mcp-session-id"
                            | "mcp-protocol-version"
                            | "transfer-encoding"
                            | "connection"
                    ) {
                        return Err(RegistryError::Invalid(format!(
                            "header '{k}' is set by Haven's MCP client and cannot be configured"
                        )));
                    }
                    if v.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
                        return Err(RegistryError::Invalid(format!(
                            "the value of header '{k}' contains a line break or NUL"
                        )));
                    }
                    parse_template(v)?;
                }
            }
            Transport::Stdio {
                command, env, args, ..
            } => {
                if command.trim().is_empty() {
                    return Err(RegistryError::Invalid(
                        "a stdio upstream needs a command".into(),
                    ));
                }
                if command.contains('\0') || args.iter().any(|a| a.contains('\0')) {
                    return Err(RegistryError::Invalid(
                        "the command or an argument contains a NUL byte".into(),
                    ));
                }
                for (k, v) in env {
                    if k.is_empty() || k.contains('=') || k.contains('\0') {
                        return Err(RegistryError::Invalid(format!(
                            "environment variable name '{k}' is not valid"
                        )));
                    }
                    if v.contains('\0') {
                        return Err(RegistryError::Invalid(format!(
                            "the value of environment variable '{k}' contains a NUL byte"
                        )));
                    }
                    parse_template(v)?;
                }
            }
        }
        Ok(())
    }

    /// Names of the secrets the entry references, sorted.
    pub fn secret_references(&self) -> BTreeSet<String> {
        let values: Vec<&String> = match &self.transport {
            Transport::Http { headers, .. } => headers.values().collect(),
            Transport::Stdio { env, .. } => env.values().collect(),
        };
        let mut out = BTreeSet::new();
        for v in values {
            if let Ok(pieces) = parse_template(v) {
                for p in pieces {
                    if let Piece::Secret(s) = p {
                        out.insert(s.to_owned());
                    }
                }
            }
        }
        out
    }

    /// The effective per-call timeout.
    pub fn timeout(&self, default_millis: u64) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.unwrap_or(default_millis))
    }
}

/// Whether a URL carries credentials (`user@` or `user:password@`), which Haven's HTTP client
/// sends as `Authorization: Basic`.
pub fn url_has_credentials(url: &url::Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

impl UpstreamSpec {
    /// Which credentials win for an entry stored before the combination of URL credentials and
    /// an `Authorization` header was refused (see [`UpstreamSpec::validate`]): such an entry
    /// keeps working, with the URL's credentials sent as `Authorization: Basic` and the
    /// configured header left out. `None` for every other entry.
    pub fn credentials_conflict(&self) -> Option<&'static str> {
        let Transport::Http { url, headers } = &self.transport else {
            return None;
        };
        let parsed = url::Url::parse(url).ok()?;
        (url_has_credentials(&parsed)
            && headers.keys().any(|k| k.eq_ignore_ascii_case("authorization")))
        .then_some(
            "the url carries credentials and an Authorization header is configured too: the url's credentials win (sent as 'Authorization: Basic'); the configured Authorization header is not sent. Registering this combination is refused now: keep one of them",
        )
    }
}

/// Splits a served tool or prompt name into (upstream, original name).
pub fn split_name(served: &str) -> Option<(&str, &str)> {
    let (up, name) = served.split_once(NAME_SEPARATOR)?;
    (validate_name(up).is_ok() && !name.is_empty()).then_some((up, name))
}

/// The served name of an upstream's tool or prompt.
pub fn served_name(upstream: &str, name: &str) -> String {
    format!("{upstream}{NAME_SEPARATOR}{name}")
}

/// Splits a served resource URI into (upstream, original URI).
pub fn split_uri(served: &str) -> Option<(&str, &str)> {
    let (up, uri) = served.split_once(URI_SEPARATOR)?;
    (validate_name(up).is_ok() && uri.contains(':')).then_some((up, uri))
}

/// The served URI of an upstream's resource or template.
pub fn served_uri(upstream: &str, uri: &str) -> String {
    format!("{upstream}{URI_SEPARATOR}{uri}")
}

/// Registry operations on a store.
#[derive(Clone)]
pub struct Registry {
    store: std::sync::Arc<dyn Store>,
}

impl Registry {
    /// The registry kept in `store`.
    pub fn new(store: std::sync::Arc<dyn Store>) -> Registry {
        Registry { store }
    }

    /// Every registered upstream, by name.
    pub async fn list(&self) -> Result<Vec<UpstreamSpec>, RegistryError> {
        let records = self.store.scan_all(REGISTRY_NS, "").await?;
        records
            .iter()
            .map(|r| decode(&r.record.key, r.value()))
            .collect()
    }

    /// One upstream.
    pub async fn get(&self, name: &str) -> Result<Option<UpstreamSpec>, RegistryError> {
        match self.store.get(REGISTRY_NS, name).await? {
            Some(r) => Ok(Some(decode(name, r.value())?)),
            None => Ok(None),
        }
    }

    /// Registers an upstream after validating it. `known_secrets` are the names of existing
    /// secrets; a reference to any other is refused. Without `replace`, an existing name is
    /// refused (checked atomically by the store, so two concurrent adds cannot both win).
    pub async fn add(
        &self,
        spec: &UpstreamSpec,
        known_secrets: &BTreeSet<String>,
        replace: bool,
    ) -> Result<(), RegistryError> {
        spec.validate()?;
        let missing: Vec<String> = spec
            .secret_references()
            .into_iter()
            .filter(|s| !known_secrets.contains(s))
            .collect();
        if !missing.is_empty() {
            return Err(RegistryError::UnknownSecrets(
                missing
                    .iter()
                    .map(|m| format!("'{m}'"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        let value = serde_json::to_vec(spec).expect("an upstream spec serializes");
        let expect = if replace { Expect::Any } else { Expect::Absent };
        match self
            .store
            .commit(Batch::new().put_if(REGISTRY_NS, &spec.name, value, expect))
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(RegistryError::Duplicate(spec.name.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes an upstream (a tombstone).
    pub async fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let Some(current) = self.store.get(REGISTRY_NS, name).await? else {
            return Err(RegistryError::NotFound(name.to_owned()));
        };
        match self
            .store
            .commit(Batch::new().delete_if(REGISTRY_NS, name, Expect::Revision(current.revision)))
            .await
        {
            Ok(_) => Ok(()),
            // Changed meanwhile: removal still wins over what is there now.
            Err(StoreError::Conflict { .. }) => {
                self.store
                    .commit(Batch::new().delete(REGISTRY_NS, name))
                    .await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Result<UpstreamSpec, RegistryError> {
    serde_json::from_slice(value).map_err(|e| RegistryError::Corrupt(key.to_owned(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(name: &str, url: &str) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            transport: Transport::Http {
                url: url.into(),
                headers: BTreeMap::new(),
            },
            timeout_ms: None,
            disabled: false,
            description: None,
        }
    }

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "everything", "fs-2", "a1-b2"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "A", "1a", "a_b", "a+b", "a.b", "a-", &"a".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn served_names_and_uris_split_back() {
        assert_eq!(split_name("ev__get_sum"), Some(("ev", "get_sum")));
        assert_eq!(split_name("ev__a__b"), Some(("ev", "a__b")));
        assert_eq!(split_name("echo"), None);
        assert_eq!(split_name("Bad__x"), None);
        assert_eq!(
            split_uri("ev+test://static/resource/1"),
            Some(("ev", "test://static/resource/1"))
        );
        assert_eq!(split_uri("notes://x"), None);
        assert_eq!(served_uri("ev", "file:///a"), "ev+file:///a");
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let e = http("x", "not a url").validate().unwrap_err().to_string();
        assert!(e.contains("not a valid URL"), "{e}");
        let e = http("x", "ftp://h/").validate().unwrap_err().to_string();
        assert!(e.contains("http or https"), "{e}");
        let mut s = http("x", "http://127.0.0.1:1/mcp");
        s.timeout_ms = Some(0);
        assert!(s.validate().is_err());
        let mut s = http("x", "http://127.0.0.1:1/mcp");
        if let Transport::Http { headers, .. } = &mut s.transport {
            headers.insert("Authorization".into(), "Bearer ${secret:tok".into());
        }
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("unterminated")
        );
        let mut s = http("x", "http://127.0.0.1:1/mcp");
        if let Transport::Http { headers, .. } = &mut s.transport {
            headers.insert("Mcp-Session-Id".into(), "x".into());
        }
        assert!(s.validate().is_err());
    }

    #[test]
    fn url_credentials_and_an_authorization_header_are_refused_together() {
        let with_header = |url: &str, header: &str| {
            let mut s = http("x", url);
            if let Transport::Http { headers, .. } = &mut s.transport {
                headers.insert(header.into(), "Bearer ${secret:tok}".into());
            }
            s
        };
        for url in [
            "https://user:pa55word@h/mcp?key=q",
            "https://user@h/mcp",
            "https://:pa55word@h/mcp",
        ] {
            for header in ["Authorization", "authorization", "AUTHORIZATION"] {
                let s = with_header(url, header);
                let e = s.validate().unwrap_err().to_string();
                assert!(e.contains("carries credentials"), "{url} {header}: {e}");
                // The error names the URL without its password or query.
                assert!(!e.contains("pa55word") && !e.contains("key=q"), "{e}");
                assert!(s.credentials_conflict().is_some());
            }
        }
        // Either alone is fine.
        with_header("https://h/mcp", "Authorization")
            .validate()
            .unwrap();
        http("x", "https://user:pa55word@h/mcp").validate().unwrap();
        with_header("https://user:pa55word@h/mcp", "X-Api-Key")
            .validate()
            .unwrap();
        assert!(
            with_header("https://h/mcp", "Authorization")
                .credentials_conflict()
                .is_none()
        );
        // Other errors do not echo a password either.
        let e = http("x", "ftp://u:pa55word@h/")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http or https") && !e.contains("pa55word"),
            "{e}"
        );
    }

    #[test]
    fn secret_references_are_collected() {
        assert!(parse_template("${secret:a b}").is_err());
        let mut s = http("x", "http://127.0.0.1:1/mcp");
        if let Transport::Http { headers, .. } = &mut s.transport {
            headers.insert("A".into(), "${secret:one}${secret:two}".into());
        }
        assert_eq!(
            s.secret_references().into_iter().collect::<Vec<_>>(),
            vec!["one".to_string(), "two".to_string()]
        );
    }

    #[test]
    fn specs_round_trip_through_json() {
        let s = UpstreamSpec {
            name: "ev".into(),
            transport: Transport::Stdio {
                command: "npx".into(),
                args: vec!["server-everything".into()],
                env: BTreeMap::from([("TOKEN".into(), "${secret:t}".into())]),
                cwd: None,
            },
            timeout_ms: Some(5000),
            disabled: false,
            description: None,
        };
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["transport"], "stdio");
        assert_eq!(serde_json::from_value::<UpstreamSpec>(j).unwrap(), s);
    }
}
