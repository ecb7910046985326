//! Redaction of what Haven says about upstreams to operators (log, admin API, `haven registry
//! list`): [`redact`] is the one function every such text goes through.
//!
//! It removes, in this order:
//!
//! 1. every known secret value (see [`Secrets`]: the decrypted values of the secrets an
//!    upstream's headers or environment reference, the values of credential-like headers, the
//!    password of a URL, …), also in the forms an echoing server would show them (JSON-escaped,
//!    percent-encoded; a URL's `user:password` also as its `Basic` base64), however short;
//! 2. from every URL (`scheme://…`): its credentials (`user:password@`), its query string and
//!    its fragment;
//! 3. the credentials after an HTTP authentication scheme (`Bearer …`, `Basic …`), so that a
//!    token Haven does not know of (a literal one, or one the upstream made up) is not shown
//!    either.
//!
//! Each removed piece becomes [`REDACTED`].

use std::collections::BTreeSet;

use base64::Engine;

/// What a removed piece is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Authentication schemes whose credentials [`redact`] removes (compared case-insensitively).
const AUTH_SCHEMES: &[&str] = &["bearer", "basic", "digest"];

/// Shortest word after an authentication scheme that [`redact`] takes for credentials (so that
/// prose such as "basic check" stays readable; known values are removed however short).
const MIN_SCHEME_CREDENTIAL: usize = 8;

/// Header names (lower case) whose values are credentials even without a secret reference.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// Parts of a header, environment variable or query parameter name that mark its value as a
/// credential.
const CREDENTIAL_NAME_PARTS: &[&str] = &[
    "auth",
    "token",
    "secret",
    "key",
    "password",
    "passwd",
    "pass",
    "credential",
    "session",
    "cookie",
    "signature",
    "sig",
];

/// Whether a header, environment variable or query parameter named `name` holds a credential.
pub fn is_credential_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    CREDENTIAL_HEADERS.contains(&lower.as_str())
        || CREDENTIAL_NAME_PARTS.iter().any(|p| lower.contains(p))
}

/// The known secret values of one upstream (or any other context), to be removed by
/// [`redact`]. Values are kept with the encoded forms they may be shown in.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    values: BTreeSet<String>,
}

impl Secrets {
    /// No known values.
    pub fn new() -> Secrets {
        Secrets::default()
    }

    /// Adds a secret value (empty values are ignored).
    pub fn add(&mut self, value: &str) {
        if value.is_empty() {
            return;
        }
        self.values.insert(value.to_owned());
        // As a JSON string would show it (an echoed header in a JSON body).
        if let Ok(json) = serde_json::to_string(value) {
            let inner = &json[1..json.len() - 1];
            if inner != value {
                self.values.insert(inner.to_owned());
            }
        }
        // As a URL would carry it.
        let encoded: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
        if encoded != value {
            self.values.insert(encoded);
        }
        let encoded = percent_encode_strict(value);
        if encoded != value {
            self.values.insert(encoded);
        }
    }

    /// Adds a header value that carries credentials: the whole value and, after an
    /// authentication scheme (`Bearer xyz`), the credentials alone.
    pub fn add_credential(&mut self, value: &str) {
        self.add(value.trim());
        if let Some((scheme, rest)) = value.trim().split_once(' ')
            && !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            self.add(rest.trim());
        }
    }

    /// Adds the credentials of `url` (the password, and `user:password` as its `Basic`
    /// base64), its whole query string and the values of its credential-like query
    /// parameters.
    pub fn add_url(&mut self, url: &str) {
        let Ok(parsed) = url::Url::parse(url) else {
            return;
        };
        if let Some(password) = parsed.password() {
            self.add(password);
            let decoded = percent_decode(password);
            self.add(&decoded);
            let user = percent_decode(parsed.username());
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{decoded}"));
            self.add(&basic);
        }
        // The whole query string: an echo of a relative request URI (`/mcp?…`) shows it
        // without the scheme that marks a URL.
        if let Some(q) = parsed.query() {
            self.add(q);
        }
        for (k, v) in parsed.query_pairs() {
            if is_credential_name(&k) {
                self.add(&v);
            }
        }
    }

    /// Adds every value of `other`.
    pub fn extend(&mut self, other: &Secrets) {
        self.values.extend(other.values.iter().cloned());
    }

    /// Whether no value is known.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The values, longest first (so that a value containing another is removed whole).
    fn by_length(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.values.iter().map(String::as_str).collect();
        v.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        v
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_owned())
}

/// `%XX` for every byte outside `A-Z a-z 0-9 - . _ ~`.
fn percent_encode_strict(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `text` without known secret values, URL credentials, query strings and fragments, and
/// credentials after an authentication scheme (see the module doc). The one redaction
/// function for everything Haven says about an upstream.
pub fn redact(text: &str, secrets: &Secrets) -> String {
    let mut out = text.to_owned();
    for v in secrets.by_length() {
        if out.contains(v) {
            out = out.replace(v, REDACTED);
        }
    }
    let out = redact_urls(&out);
    redact_auth_schemes(&out)
}

/// [`redact`] of a URL alone (no known secrets): `https://[redacted]@host/path?[redacted]`.
pub fn redact_url(url: &str) -> String {
    redact(url, &Secrets::default())
}

/// Characters that end a URL (or a token) in free text.
fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '\\')
}

/// Removes credentials, query strings and fragments of every `scheme://…` in `text`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme: letters, digits, + - . before "://", starting with a letter.
        let before = &rest[..at];
        let scheme_len = before
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .map(char::len_utf8)
            .sum::<usize>();
        let scheme = &before[before.len() - scheme_len..];
        if !scheme.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(&rest[..at + 3]);
            rest = &rest[at + 3..];
            continue;
        }
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let end = after.find(ends_token).unwrap_or(after.len());
        let token = &after[..end];
        // A URL written in parentheses keeps its closing one.
        let opened = before[..before.len() - scheme_len].ends_with('(');
        let (token, closing) = match token.strip_suffix(')') {
            Some(t) if opened => (t, ")"),
            _ => (token, ""),
        };
        let authority_end = token.find(['/', '?', '#']).unwrap_or(token.len());
        let (authority, path) = token.split_at(authority_end);
        match authority.rfind('@') {
            Some(at_sign) => {
                out.push_str(REDACTED);
                out.push_str(&authority[at_sign..]);
            }
            None => out.push_str(authority),
        }
        match path.find(['?', '#']) {
            Some(q) => {
                out.push_str(&path[..q]);
                out.push_str(&path[q..q + 1]);
                out.push_str(REDACTED);
            }
            None => out.push_str(path),
        }
        out.push_str(closing);
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Replaces the credentials after every authentication scheme word (`Bearer xyz` →
/// `Bearer [redacted]`).
fn redact_auth_schemes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'outer: while !rest.is_empty() {
        // The next word boundary followed by a scheme and one space.
        let lower = rest.to_ascii_lowercase();
        let mut best: Option<(usize, usize)> = None;
        for scheme in AUTH_SCHEMES {
            let mut from = 0;
            while let Some(i) = lower[from..].find(scheme) {
                let start = from + i;
                let end = start + scheme.len();
                let word_start = start == 0 || !lower.as_bytes()[start - 1].is_ascii_alphanumeric();
                let spaced = lower.as_bytes().get(end) == Some(&b' ');
                if word_start && spaced {
                    if best.is_none_or(|(s, _)| start < s) {
                        best = Some((start, end + 1));
                    }
                    break;
                }
                from = end;
            }
        }
        let Some((_, cred_start)) = best else {
            out.push_str(rest);
            break 'outer;
        };
        out.push_str(&rest[..cred_start]);
        let cred = &rest[cred_start..];
        if let Some(after) = cred.strip_prefix(REDACTED) {
            out.push_str(REDACTED);
            rest = after;
            continue;
        }
        let cred_end = cred
            .find(|c: char| ends_token(c) || matches!(c, ',' | ';' | '}' | ']' | ')'))
            .unwrap_or(cred.len());
        if cred_end >= MIN_SCHEME_CREDENTIAL {
            out.push_str(REDACTED);
        } else {
            out.push_str(&cred[..cred_end]);
        }
        rest = &cred[cred_end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(values: &[&str]) -> Secrets {
        let mut s = Secrets::new();
        for v in values {
            s.add(v);
        }
        s
    }

    #[test]
    fn known_values_are_removed_in_every_form() {
        let s = known(&["s3cr3t", "with \"quote\"/and space"]);
        let text = r#"401: {"authorization":"Bearer s3cr3t","x":"with \"quote\"/and space"} and with%20%22quote%22%2Fand%20space and with+%22quote%22%2Fand+space"#;
        let r = redact(text, &s);
        assert!(!r.contains("s3cr3t"), "{r}");
        assert!(!r.contains("quote"), "{r}");
        assert!(r.starts_with("401: "), "{r}");
    }

    #[test]
    fn a_value_containing_another_is_removed_whole() {
        let s = known(&["abc", "xxabcxx"]);
        assert_eq!(redact("[xxabcxx] [abc]", &s), "[[redacted]] [[redacted]]");
    }

    #[test]
    fn urls_lose_credentials_query_and_fragment() {
        assert_eq!(
            redact_url("https://user:pa55@example.com:8443/mcp?key=q&x=1#frag"),
            "https://[redacted]@example.com:8443/mcp?[redacted]"
        );
        assert_eq!(
            redact_url("error sending request for url (http://127.0.0.1:9/mcp?token=abc)"),
            "error sending request for url (http://127.0.0.1:9/mcp?[redacted])"
        );
        assert_eq!(
            redact_url("see http://h/p and 'https://u@h2?x' then done"),
            "see http://h/p and 'https://[redacted]@h2?[redacted]' then done"
        );
        // Nothing to remove: unchanged.
        let plain = "connection refused by http://127.0.0.1:3001/mcp (os error 111)";
        assert_eq!(redact_url(plain), plain);
        assert_eq!(redact_url("no url: a://"), "no url: a://");
        assert_eq!(redact_url("://x?y"), "://x?y");
    }

    #[test]
    fn credentials_after_an_auth_scheme_are_removed() {
        assert_eq!(
            redact_url("got Authorization: Bearer abc.def-ghi, then basic Zm9vOmJhcg== end"),
            "got Authorization: Bearer [redacted], then basic [redacted] end"
        );
        assert_eq!(
            redact_url(r#"{"authorization":"BEARER tok-12345"}"#),
            r#"{"authorization":"BEARER [redacted]"}"#
        );
        // Words that merely contain a scheme, and a scheme at the end, are left alone.
        assert_eq!(
            redact_url("subearer xxxxxxxxxx, a basic check, bearer"),
            "subearer xxxxxxxxxx, a basic check, bearer"
        );
    }

    #[test]
    fn url_passwords_and_credential_query_values_are_known_secrets() {
        let mut s = Secrets::new();
        s.add_url("https://alice:p%40ss@h/mcp?api_key=QK-123&page=2");
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:p@ss");
        let text = format!("echo p@ss {basic} QK-123 page 2 /mcp?api_key=QK-123&page=2");
        assert_eq!(
            redact(&text, &s),
            "echo [redacted] [redacted] [redacted] page 2 /mcp?[redacted]"
        );
    }

    #[test]
    fn header_credentials_are_known_with_and_without_their_scheme() {
        let mut s = Secrets::new();
        s.add_credential("Token lit-eral-42");
        assert_eq!(redact("x lit-eral-42 y", &s), format!("x {REDACTED} y"));
        assert!(is_credential_name("X-Api-Key"));
        assert!(is_credential_name("Authorization"));
        assert!(!is_credential_name("X-Client-Name"));
    }

    #[test]
    fn redaction_is_idempotent() {
        let s = known(&["s3cr3t"]);
        let once = redact("Bearer s3cr3t at https://u:s3cr3t@h/?k=s3cr3t", &s);
        assert_eq!(redact(&once, &s), once);
        assert!(!once.contains("s3cr3t"), "{once}");
    }
}
