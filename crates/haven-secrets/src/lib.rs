//! The secrets service: secret values kept in the store under envelope encryption.
//!
//! Every secret is one last-writer-wins record in namespace [`SECRETS_NS`], keyed by its name.
//! Its value is encrypted (AES-256-GCM) under a fresh random *data key* (DEK) on every `set`;
//! the data key is stored *wrapped* (encrypted) under a *key-encryption key* (KEK). KEKs never
//! enter the store: a node reads them from a key file and/or the `HAVEN_SECRETS_KEYS`
//! environment variable ([`KekSource`], [`KekRing`]). Only ciphertext is stored, so a copy of
//! the store (a backup, the change log, a replica) reveals no secret without the key file.
//!
//! Both encryptions bind the secret's name as associated data, so a record copied under another
//! name, or altered, fails to decrypt instead of yielding a value.
//!
//! Key file format (text): one key per line, `<kid> <base64 of 32 bytes>`; `#` comments and
//! blank lines are ignored; in `HAVEN_SECRETS_KEYS` the lines may also be separated by `;`.
//! The **last** key listed is the primary: it wraps new data keys; the others only unwrap.
//! Rotation: append a new key ([`KekRing::append_new_key`]), then [`Secrets::rotate_kek`]
//! re-wraps every data key under it (the values themselves are not re-encrypted);
//! [`Secrets::kek_usage`] tells when an old key wraps nothing any more and may be removed.
//!
//! Names beginning with [`RESERVED_PREFIX`] (`system/`) are reserved for Haven itself (for
//! example the request-state HMAC keys); the `*_user` operations refuse them.
//!
//! Secret values never appear in `Debug` output, error messages or logs.
//!
//! This crate sits on the state layer: it depends on `haven-state` only, so that the protocol
//! engine (whose request-state keys are secrets) and the control plane both use it.

pub mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use haven_state::{Batch, Expect, Store, StoreError, StoredRecord};
use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
pub use zeroize::Zeroizing;

use crate::template::{Piece, is_secret_name_char, parse_template};

/// Namespace of secret records.
pub const SECRETS_NS: &str = "secrets";
/// Names beginning with this prefix are reserved for Haven.
pub const RESERVED_PREFIX: &str = "system/";
/// Longest secret name.
pub const MAX_NAME_LEN: usize = 128;
/// Largest secret value, in bytes (64 KiB).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest key-encryption key id.
pub const MAX_KID_LEN: usize = 32;
/// Environment variable holding key lines (separated by newlines or `;`).
pub const KEYS_ENV: &str = "HAVEN_SECRETS_KEYS";

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const DEK_AAD: &[u8] = b"haven-dek\0";
const SECRET_AAD: &[u8] = b"haven-secret\0";
/// Attempts of a compare-and-set loop before giving up with the last conflict.
const CAS_ATTEMPTS: usize = 64;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Errors of the secrets service. Messages say what was wrong and what to do; they name
/// secrets and key ids, never a value or key material.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The request is invalid (a bad name, an oversized value, a malformed template); nothing
    /// was changed.
    #[error("{0}")]
    Invalid(String),
    /// No secret of that name.
    #[error("there is no secret named '{0}' (see `haven secrets list`)")]
    NotFound(String),
    /// The name is reserved for Haven.
    #[error(
        "secret name '{0}' is reserved for Haven (names beginning with '{RESERVED_PREFIX}'); choose another name"
    )]
    Reserved(String),
    /// The secret's data key is wrapped under a key-encryption key this node does not have.
    #[error(
        "secret '{name}' is wrapped under key-encryption key '{kid}', which this node does not have: add the line for '{kid}' back to the key file (or {KEYS_ENV}) and reload the keys"
    )]
    UnknownKek {
        /// The secret.
        name: String,
        /// Id of the missing key-encryption key.
        kid: String,
    },
    /// Authentication of the wrapped data key or of the value failed.
    #[error(
        "secret '{name}' failed authentication of its {what}: the record was altered or copied from another secret's name (or the key line for its key id changed); set the secret again"
    )]
    Tampered {
        /// The secret.
        name: String,
        /// `data key` or `value`.
        what: &'static str,
    },
    /// A stored record is not a secret record.
    #[error("secret record '{name}' is unreadable: {detail}; set the secret again")]
    Corrupt {
        /// The secret.
        name: String,
        /// What was wrong.
        detail: String,
    },
    /// A line of a key file (or of the key environment variable) is malformed.
    #[error("{origin}, line {line}: {reason}")]
    KeyLine {
        /// The key file or environment variable.
        origin: String,
        /// Line (or `;`-separated entry) number, from 1.
        line: usize,
        /// What is wrong (never the key material).
        reason: String,
    },
    /// Two key lines carry the same id with different keys.
    #[error(
        "key id '{kid}' is listed twice ({first} and {second}) with different keys; every key needs its own id"
    )]
    DuplicateKid {
        /// The id.
        kid: String,
        /// Where it appears first.
        first: String,
        /// Where it appears again.
        second: String,
    },
    /// No key-encryption key is configured.
    #[error(
        "no key-encryption key is configured ({0}); create a key file with `haven secrets new-key --key-file FILE` and pass --secrets-key-file FILE, or set {KEYS_ENV}"
    )]
    NoKeys(String),
    /// Reading or writing a key file failed.
    #[error("{action} the key file {path}: {error}")]
    KeyFile {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// `create_file` found a file in place.
    #[error(
        "the key file {0} exists already and was left unchanged; add a key to it with `haven secrets new-key --key-file FILE` instead"
    )]
    KeyFileExists(String),
    /// A template references a secret that does not exist.
    #[error(
        "the value references secret '{0}', which does not exist; create it with `haven secrets set {0}`"
    )]
    MissingSecret(String),
    /// A key file that others may read, or a key command that failed.
    #[error(transparent)]
    KeySource(#[from] haven_state::files::KeySourceError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result alias of the secrets service.
pub type SecretsResult<T> = Result<T, SecretsError>;

/// A name as shown in an error: at most 80 characters.
fn shown(name: &str) -> String {
    name.chars().take(80).collect()
}

/// Checks a secret name: 1 to [`MAX_NAME_LEN`] characters of
/// [`is_secret_name_char`].
pub fn validate_name(name: &str) -> SecretsResult<()> {
    // `/` separates parts of a name (`github/token`); every part must be a real name, so that
    // a name can travel in a URL path without `.`/`..` or empty segments changing its meaning.
    let parts_ok = name
        .split('/')
        .all(|p| !p.is_empty() && p != "." && p != "..");
    if !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(is_secret_name_char)
        && parts_ok
    {
        Ok(())
    } else {
        Err(SecretsError::Invalid(format!(
            "invalid secret name '{}': a name is 1 to {MAX_NAME_LEN} characters of letters, digits, '_', '-', '.' and '/', with no empty, '.' or '..' part between slashes",
            shown(name)
        )))
    }
}

/// Whether `name` is reserved for Haven (begins with [`RESERVED_PREFIX`]).
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// Whether `kid` is a valid key id: 1 to [`MAX_KID_LEN`] characters of `A-Z a-z 0-9 _ -`.
pub fn is_valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_key() -> Zeroizing<[u8; KEY_LEN]> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    rand::rng().fill_bytes(&mut k[..]);
    k
}

// ---------------------------------------------------------------------------------------------
// Key-encryption keys
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Kek {
    kid: String,
    key: Zeroizing<[u8; KEY_LEN]>,
    /// Where it was read, for error messages.
    at: String,
}

/// The key-encryption keys a node holds, in the order listed; the last one is the primary.
/// Never empty. Key material is zeroized on drop; `Debug` shows only the ids.
#[derive(Clone)]
pub struct KekRing {
    keys: Vec<Kek>,
}

impl fmt::Debug for KekRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KekRing")
            .field("kids", &self.kids())
            .field("primary", &self.primary_kid())
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl KekRing {
    /// Parses key-file text: one `<kid> <base64 of 32 bytes>` per line, `#` comments and blank
    /// lines ignored. `origin` names the text in error messages (e.g. `key file /etc/haven/keys`).
    pub fn parse(text: &str, origin: &str) -> SecretsResult<KekRing> {
        let ring = Self::parse_lines(text.split('\n').enumerate(), origin)?;
        ring.ok_or_else(|| SecretsError::NoKeys(format!("{origin} holds no key line")))
    }

    /// Parses the value of [`KEYS_ENV`]: key lines separated by newlines or `;` (entries are
    /// numbered in that order in error messages).
    pub fn parse_env(text: &str) -> SecretsResult<KekRing> {
        let ring = Self::parse_lines(text.split(['\n', ';']).enumerate(), KEYS_ENV)?;
        ring.ok_or_else(|| SecretsError::NoKeys(format!("{KEYS_ENV} holds no key line")))
    }

    fn parse_lines<'a>(
        lines: impl Iterator<Item = (usize, &'a str)>,
        origin: &str,
    ) -> SecretsResult<Option<KekRing>> {
        let mut keys: Vec<Kek> = Vec::new();
        for (i, raw) in lines {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let bad = |reason: String| SecretsError::KeyLine {
                origin: origin.to_owned(),
                line: n,
                reason,
            };
            let mut fields = line.split_whitespace();
            let (Some(kid), Some(material), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(
                    "expected `<kid> <base64 of 32 bytes>` (two fields separated by a space)"
                        .into(),
                ));
            };
            if !is_valid_kid(kid) {
                // The field is not shown: a line written the wrong way round would print a key.
                return Err(bad(format!(
                    "the key id (first field) must be 1 to {MAX_KID_LEN} characters of A-Z, a-z, 0-9, '_' and '-'"
                )));
            }
            let decoded = Zeroizing::new(B64.decode(material).map_err(|_| {
                bad(format!(
                    "the key of '{kid}' is not valid base64 (write the base64 of 32 random bytes)"
                ))
            })?);
            if decoded.len() != KEY_LEN {
                return Err(bad(format!(
                    "the key of '{kid}' is {} bytes; a key is exactly {KEY_LEN} bytes (base64 of 32 random bytes)",
                    decoded.len()
                )));
            }
            let at = format!("{origin} line {n}");
            if let Some(prev) = keys.iter().find(|k| k.kid == kid) {
                return Err(SecretsError::DuplicateKid {
                    kid: kid.to_owned(),
                    first: prev.at.clone(),
                    second: at,
                });
            }
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            key.copy_from_slice(&decoded);
            keys.push(Kek {
                kid: kid.to_owned(),
                key,
                at,
            });
        }
        Ok((!keys.is_empty()).then_some(KekRing { keys }))
    }

    /// Reads a key file.
    /// Refused when group or others may read or change it (its mode is not 0600 or 0400).
    pub fn from_file(path: &Path) -> SecretsResult<KekRing> {
        let text = read_key_file(path)?;
        Self::parse(&text, &format!("key file {}", path.display()))
    }

    /// Reads the key lines a key command prints (see [`haven_state::files::run_key_command`]):
    /// the format of a key file.
    pub fn from_command(command: &str) -> SecretsResult<KekRing> {
        let out = haven_state::files::run_key_command(command, "secrets key")?;
        let text = std::str::from_utf8(&out).map_err(|_| SecretsError::KeyLine {
            origin: "the secrets key command's output".into(),
            line: 1,
            reason: "it is not UTF-8 text; print `<kid> <base64 key>` lines".into(),
        })?;
        Self::parse(text, "the secrets key command's output")
    }

    /// `self`'s keys followed by `later`'s (whose last key becomes the primary). An id present
    /// in both is fine if the keys are equal (the later position counts), an error otherwise.
    pub fn chain(mut self, later: KekRing) -> SecretsResult<KekRing> {
        for k in later.keys {
            if let Some(pos) = self.keys.iter().position(|e| e.kid == k.kid) {
                if self.keys[pos].key[..] != k.key[..] {
                    return Err(SecretsError::DuplicateKid {
                        kid: k.kid,
                        first: self.keys[pos].at.clone(),
                        second: k.at,
                    });
                }
                self.keys.remove(pos);
            }
            self.keys.push(k);
        }
        Ok(self)
    }

    /// Id of the primary key (the last listed), which wraps new data keys.
    pub fn primary_kid(&self) -> &str {
        &self.primary().kid
    }

    /// Ids of every key, in the order listed.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// Whether the ring holds key `kid`.
    pub fn contains(&self, kid: &str) -> bool {
        self.key(kid).is_some()
    }

    fn primary(&self) -> &Kek {
        self.keys.last().expect("a key ring is never empty")
    }

    fn key(&self, kid: &str) -> Option<&[u8; KEY_LEN]> {
        self.keys.iter().find(|k| k.kid == kid).map(|k| &*k.key)
    }

    /// A new key line `<kid> <base64 of 32 random bytes>` (no line break). `kid` defaults to
    /// `k<unix seconds in hex>`.
    ///
    /// # Panics
    ///
    /// If `kid` is given and is not a valid key id (check with [`is_valid_kid`]).
    pub fn generate_line(kid: Option<&str>) -> String {
        let kid = match kid {
            Some(k) => {
                assert!(
                    is_valid_kid(k),
                    "a key id is 1 to {MAX_KID_LEN} characters of A-Z, a-z, 0-9, '_' and '-'"
                );
                k.to_owned()
            }
            None => default_kid(),
        };
        let key = random_key();
        format!("{kid} {}", B64.encode(&key[..]))
    }

    /// Creates a key file holding one generated key (mode 0600 on Unix) and returns its id.
    /// Refuses to overwrite an existing file.
    pub fn create_file(path: &Path) -> SecretsResult<String> {
        let kid = default_kid();
        let line = Zeroizing::new(Self::generate_line(Some(&kid)));
        let text = Zeroizing::new(format!(
            "# Haven key-encryption keys: one `<kid> <base64 of 32 bytes>` per line.\n\
             # The last key listed is the primary (it wraps new data keys); the others only\n\
             # unwrap. Keep a copy of this file outside Haven's data directory: secrets cannot be\n\
             # decrypted without it. Every node of a cluster needs the same keys.\n\
             {}\n",
            line.as_str()
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::AlreadyExists {
                SecretsError::KeyFileExists(path.display().to_string())
            } else {
                key_file_error("creating", path, error)
            }
        })?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| key_file_error("writing", path, e))?;
        Ok(kid)
    }

    /// Appends a generated key to an existing key file (it becomes the primary) and returns
    /// its id. The file must parse; its other lines are left as they are.
    pub fn append_new_key(path: &Path) -> SecretsResult<String> {
        let text = read_key_file(path)?;
        let origin = format!("key file {}", path.display());
        let existing = Self::parse_lines(text.split('\n').enumerate(), &origin)?;
        let taken = |kid: &str| existing.as_ref().is_some_and(|r| r.contains(kid));
        let base = default_kid();
        let mut kid = base.clone();
        let mut n = 2;
        while taken(&kid) {
            kid = format!("{base}-{n}");
            n += 1;
        }
        let line = Zeroizing::new(Self::generate_line(Some(&kid)));
        let sep = if text.is_empty() || text.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let out = Zeroizing::new(format!("{sep}{}\n", line.as_str()));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| key_file_error("opening", path, e))?;
        file.write_all(out.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| key_file_error("writing", path, e))?;
        Ok(kid)
    }
}

/// A new key id: the creation time and a random part, so that keys made in the same second
/// (on different machines, or a node's first key next to an operator's) never share an id.
fn default_kid() -> String {
    format!("k{:x}{:04x}", unix_secs(), rand::random::<u16>())
}

fn key_file_error(action: &'static str, path: &Path, error: std::io::Error) -> SecretsError {
    SecretsError::KeyFile {
        action,
        path: path.display().to_string(),
        error,
    }
}

/// Reads a key file; refuses one that group or others may read or change.
fn read_key_file(path: &Path) -> SecretsResult<Zeroizing<String>> {
    if path.exists() {
        haven_state::files::check_private_file(path, "secrets key file")?;
    }
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| key_file_error("reading", path, e))
}

/// Where a node's key-encryption keys come from: a key file or a key command (which prints
/// a key file's content, e.g. from a KMS or a vault), key lines given as text (the value of
/// [`KEYS_ENV`]), or one of the first two and the text (the file's or command's keys first, so
/// the text's last key is the primary). Read again by [`Secrets::reload_keys`] (the command is
/// run again). `Debug` does not show the text.
#[derive(Clone, Default)]
pub struct KekSource {
    /// A key file.
    pub file: Option<PathBuf>,
    /// A command whose standard output is a key file's content (see
    /// [`haven_state::files::run_key_command`]); not together with `file`.
    pub command: Option<String>,
    /// Key lines in the format of [`KEYS_ENV`] (separated by newlines or `;`).
    pub env: Option<String>,
}

impl fmt::Debug for KekSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KekSource")
            .field("file", &self.file)
            .field("command", &self.command)
            .field("env", &self.env.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl KekSource {
    /// Keys from a key file.
    pub fn file(path: impl Into<PathBuf>) -> KekSource {
        KekSource {
            file: Some(path.into()),
            ..KekSource::default()
        }
    }

    /// Keys from text in the format of [`KEYS_ENV`] (lines separated by newlines or `;`).
    pub fn text(text: impl Into<String>) -> KekSource {
        KekSource {
            env: Some(text.into()),
            ..KekSource::default()
        }
    }

    /// One freshly generated key held in memory only (tests, throwaway nodes): whatever it
    /// encrypts is lost with the process.
    pub fn generated() -> KekSource {
        let kid = format!("gen-{:08x}", rand::random::<u32>());
        KekSource::text(KekRing::generate_line(Some(&kid)))
    }

    /// Keys from a key command.
    pub fn command(command: impl Into<String>) -> KekSource {
        KekSource {
            command: Some(command.into()),
            ..KekSource::default()
        }
    }

    /// Reads the keys (runs the key command, if any: this blocks until it ends).
    pub fn load(&self) -> SecretsResult<KekRing> {
        let from_file = match (&self.file, &self.command) {
            (Some(_), Some(_)) => {
                return Err(SecretsError::Invalid(
                    "the secrets keys come from a key file or a key command, not both".into(),
                ));
            }
            (Some(f), None) => Some(KekRing::from_file(f)?),
            (None, Some(c)) => Some(KekRing::from_command(c)?),
            (None, None) => None,
        };
        let from_env = self.env.as_deref().map(KekRing::parse_env).transpose()?;
        match (from_file, from_env) {
            (Some(f), Some(t)) => f.chain(t),
            (Some(r), None) | (None, Some(r)) => Ok(r),
            (None, None) => Err(SecretsError::NoKeys(
                "neither a key file, a key command nor key text was given".into(),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records and envelope encryption
// ---------------------------------------------------------------------------------------------

/// A secret record as stored (only ciphertext).
#[derive(Clone, Serialize, Deserialize)]
struct SealedRecord {
    /// Id of the key-encryption key that wraps the data key.
    kek: String,
    /// base64(nonce || AES-256-GCM ciphertext of the data key).
    wrapped_dek: String,
    /// base64 nonce of the value's encryption.
    nonce: String,
    /// base64 AES-256-GCM ciphertext of the value under the data key.
    ciphertext: String,
    created_millis: u64,
    updated_millis: u64,
    version: u64,
}

/// What is known about a secret without decrypting it. Never holds the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// The secret's name.
    pub name: String,
    /// Id of the key-encryption key that wraps its data key.
    pub kek: String,
    /// When it was first set, Unix milliseconds.
    pub created_millis: u64,
    /// When its value was last set, Unix milliseconds.
    pub updated_millis: u64,
    /// How many times its value was set (1 for a new secret).
    pub version: u64,
    /// Size of the value in bytes.
    pub size: usize,
}

/// The outcome of [`Secrets::rotate_kek`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RotationReport {
    /// The primary key every data key is now wrapped under.
    pub primary: String,
    /// Data keys re-wrapped, counted by the key that wrapped them before.
    pub rewrapped: BTreeMap<String, usize>,
    /// Secrets already under the primary (including ones set meanwhile).
    pub unchanged: usize,
    /// Secrets that could not be re-wrapped (name → reason), e.g. under a key this node lacks.
    pub failed: BTreeMap<String, String>,
    /// After the rotation: the key-encryption keys that still wrap some data key (the primary
    /// included). A key absent here wraps nothing and may be removed from the key files.
    pub still_in_use: BTreeSet<String>,
}

fn aad(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(prefix.len() + name.len());
    a.extend_from_slice(prefix);
    a.extend_from_slice(name.as_bytes());
    a
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut n);
    n
}

fn cipher(key: &[u8; KEY_LEN]) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
}

fn wrap_dek(kek: &[u8; KEY_LEN], name: &str, dek: &[u8; KEY_LEN]) -> String {
    let nonce = random_nonce();
    let ct = cipher(kek)
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: dek,
                aad: &aad(DEK_AAD, name),
            },
        )
        .expect("AES-GCM encryption of 32 bytes cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    B64.encode(out)
}

fn decode_b64(name: &str, field: &str, text: &str) -> SecretsResult<Vec<u8>> {
    B64.decode(text).map_err(|_| SecretsError::Corrupt {
        name: name.to_owned(),
        detail: format!("field '{field}' is not base64"),
    })
}

fn unwrap_dek(
    kek: &[u8; KEY_LEN],
    name: &str,
    wrapped: &str,
) -> SecretsResult<Zeroizing<[u8; KEY_LEN]>> {
    let raw = decode_b64(name, "wrapped_dek", wrapped)?;
    if raw.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
        return Err(SecretsError::Corrupt {
            name: name.to_owned(),
            detail: format!("the wrapped data key is {} bytes, not 60", raw.len()),
        });
    }
    let (nonce, ct) = raw.split_at(NONCE_LEN);
    let plain = Zeroizing::new(
        cipher(kek)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: &aad(DEK_AAD, name),
                },
            )
            .map_err(|_| SecretsError::Tampered {
                name: name.to_owned(),
                what: "data key",
            })?,
    );
    let mut dek = Zeroizing::new([0u8; KEY_LEN]);
    dek.copy_from_slice(&plain);
    Ok(dek)
}

fn seal(
    ring: &KekRing,
    name: &str,
    value: &[u8],
    created_millis: u64,
    updated_millis: u64,
    version: u64,
) -> SealedRecord {
    let dek = random_key();
    let primary = ring.primary();
    let nonce = random_nonce();
    let ciphertext = cipher(&dek)
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: value,
                aad: &aad(SECRET_AAD, name),
            },
        )
        .expect("AES-GCM encryption within the size limit cannot fail");
    SealedRecord {
        kek: primary.kid.clone(),
        wrapped_dek: wrap_dek(&primary.key, name, &dek),
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(ciphertext),
        created_millis,
        updated_millis,
        version,
    }
}

fn open(ring: &KekRing, name: &str, rec: &SealedRecord) -> SecretsResult<Zeroizing<Vec<u8>>> {
    let kek = ring.key(&rec.kek).ok_or_else(|| SecretsError::UnknownKek {
        name: name.to_owned(),
        kid: rec.kek.clone(),
    })?;
    let dek = unwrap_dek(kek, name, &rec.wrapped_dek)?;
    let nonce = decode_b64(name, "nonce", &rec.nonce)?;
    if nonce.len() != NONCE_LEN {
        return Err(SecretsError::Corrupt {
            name: name.to_owned(),
            detail: format!("the nonce is {} bytes, not {NONCE_LEN}", nonce.len()),
        });
    }
    let ct = decode_b64(name, "ciphertext", &rec.ciphertext)?;
    cipher(&dek)
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &ct,
                aad: &aad(SECRET_AAD, name),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SecretsError::Tampered {
            name: name.to_owned(),
            what: "value",
        })
}

/// How many secrets each key-encryption key wraps in `store`, read from the records without
/// any key (e.g. to tell which key file a data directory restored from backup needs).
pub async fn kek_usage_in(store: &dyn Store) -> SecretsResult<BTreeMap<String, usize>> {
    let mut usage = BTreeMap::new();
    for r in store.scan_all(SECRETS_NS, "").await? {
        match decode(&r.record.key, r.value()) {
            Ok(rec) => *usage.entry(rec.kek).or_default() += 1,
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable secret record"),
        }
    }
    Ok(usage)
}

/// How many secrets each key-encryption key wraps in `store`, split into users' secrets and
/// Haven's own (reserved names, [`is_reserved`]), read from the records without any key.
pub async fn kek_usage_by_owner_in(store: &dyn Store) -> SecretsResult<BTreeMap<String, Wrapped>> {
    let mut usage: BTreeMap<String, Wrapped> = BTreeMap::new();
    for r in store.scan_all(SECRETS_NS, "").await? {
        match decode(&r.record.key, r.value()) {
            Ok(rec) => {
                let w = usage.entry(rec.kek).or_default();
                if is_reserved(&r.record.key) {
                    w.haven.push(r.record.key.clone());
                } else {
                    w.user += 1;
                }
            }
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable secret record"),
        }
    }
    Ok(usage)
}

/// The secrets one key-encryption key wraps: how many of users (what `haven secrets list`
/// shows) and the names of Haven's own (`haven secrets list --all`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wrapped {
    /// Users' secrets.
    pub user: usize,
    /// Names of Haven's own secrets (`system/...`).
    pub haven: Vec<String>,
}

fn decode(name: &str, value: &[u8]) -> SecretsResult<SealedRecord> {
    serde_json::from_slice(value).map_err(|e| SecretsError::Corrupt {
        name: name.to_owned(),
        detail: format!("not a secret record ({e})"),
    })
}

fn meta_of(name: &str, rec: &SealedRecord) -> SecretMeta {
    // The base64 length gives the ciphertext length without decoding it.
    let padding = rec
        .ciphertext
        .bytes()
        .rev()
        .take_while(|&b| b == b'=')
        .count();
    let ct_len = (rec.ciphertext.len() / 4 * 3).saturating_sub(padding);
    SecretMeta {
        name: name.to_owned(),
        kek: rec.kek.clone(),
        created_millis: rec.created_millis,
        updated_millis: rec.updated_millis,
        version: rec.version,
        size: ct_len.saturating_sub(TAG_LEN),
    }
}

// ---------------------------------------------------------------------------------------------
// The service
// ---------------------------------------------------------------------------------------------

struct Inner {
    store: Arc<dyn Store>,
    source: KekSource,
    ring: RwLock<Arc<KekRing>>,
}

/// The secrets service on a store. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Secrets {
    inner: Arc<Inner>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secrets")
            .field("source", &self.inner.source)
            .field("keys", &*self.inner.ring.read())
            .finish()
    }
}

impl Secrets {
    /// The secrets kept in `store`, with key-encryption keys from `source` (read now).
    pub fn open(store: Arc<dyn Store>, source: KekSource) -> SecretsResult<Secrets> {
        let ring = source.load()?;
        Ok(Secrets {
            inner: Arc::new(Inner {
                store,
                source,
                ring: RwLock::new(Arc::new(ring)),
            }),
        })
    }

    /// The key-encryption keys currently loaded (`Debug` shows only their ids).
    pub fn keys(&self) -> Arc<KekRing> {
        self.inner.ring.read().clone()
    }

    /// Id of the primary key-encryption key (wraps new data keys).
    pub fn primary_kid(&self) -> String {
        self.keys().primary_kid().to_owned()
    }

    /// Ids of every key-encryption key this node holds, in the order listed.
    pub fn known_kids(&self) -> Vec<String> {
        self.keys().kids()
    }

    /// Where the keys come from.
    pub fn source(&self) -> &KekSource {
        &self.inner.source
    }

    /// Reads the key source again (after a key was added to or removed from the key file).
    /// On error the keys loaded before stay in use.
    pub fn reload_keys(&self) -> SecretsResult<()> {
        let ring = self.inner.source.load()?;
        tracing::info!(
            kids = ?ring.kids(),
            primary = ring.primary_kid(),
            "loaded the secrets key-encryption keys"
        );
        *self.inner.ring.write() = Arc::new(ring);
        Ok(())
    }

    /// Sets a secret (any valid name, including Haven's reserved ones) under a fresh data
    /// key wrapped by the primary key. Keeps the creation time of an existing secret and
    /// increments its version; concurrent sets are serialized by compare-and-set.
    pub async fn set(&self, name: &str, value: &[u8]) -> SecretsResult<SecretMeta> {
        validate_name(name)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretsError::Invalid(format!(
                "the value of secret '{name}' is {} bytes; the limit is {MAX_VALUE_BYTES} bytes (64 KiB)",
                value.len()
            )));
        }
        let store = &self.inner.store;
        let mut last_conflict = None;
        for _ in 0..CAS_ATTEMPTS {
            let now = store.clock().wall_millis();
            let current = store.get(SECRETS_NS, name).await?;
            let (created, version, expect) = match &current {
                Some(r) => match decode(name, r.value()) {
                    Ok(old) => (
                        old.created_millis,
                        old.version + 1,
                        Expect::Revision(r.revision),
                    ),
                    // An unreadable record is replaced.
                    Err(_) => (now, 1, Expect::Revision(r.revision)),
                },
                None => (now, 1, Expect::Absent),
            };
            let ring = self.keys();
            let rec = seal(&ring, name, value, created, now, version);
            let bytes = serde_json::to_vec(&rec).expect("a secret record serializes");
            match store
                .commit(Batch::new().put_if(SECRETS_NS, name, bytes, expect))
                .await
            {
                Ok(_) => {
                    tracing::debug!(secret = name, kek = %rec.kek, version, "secret set");
                    return Ok(meta_of(name, &rec));
                }
                Err(e @ StoreError::Conflict { .. }) => last_conflict = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_conflict.expect("the loop ran").into())
    }

    /// Sets a secret only if it does not exist yet (compare-and-set on its absence): `true`
    /// when this call created it, `false` when it existed (or another writer created it
    /// first), in which case nothing is changed.
    pub async fn create(&self, name: &str, value: &[u8]) -> SecretsResult<bool> {
        validate_name(name)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretsError::Invalid(format!(
                "the value of secret '{name}' is {} bytes; the limit is {MAX_VALUE_BYTES} bytes (64 KiB)",
                value.len()
            )));
        }
        let store = &self.inner.store;
        if store.get(SECRETS_NS, name).await?.is_some() {
            return Ok(false);
        }
        let now = store.clock().wall_millis();
        let rec = seal(&self.keys(), name, value, now, now, 1);
        let bytes = serde_json::to_vec(&rec).expect("a secret record serializes");
        match store
            .commit(Batch::new().put_if(SECRETS_NS, name, bytes, Expect::Absent))
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Secrets::set`] for users: refuses names reserved for Haven.
    pub async fn set_user(&self, name: &str, value: &[u8]) -> SecretsResult<SecretMeta> {
        refuse_reserved(name)?;
        self.set(name, value).await
    }

    /// A secret's value, if it exists.
    pub async fn get(&self, name: &str) -> SecretsResult<Option<Zeroizing<Vec<u8>>>> {
        validate_name(name)?;
        let Some(r) = self.inner.store.get(SECRETS_NS, name).await? else {
            return Ok(None);
        };
        let rec = decode(name, r.value())?;
        open(&self.keys(), name, &rec).map(Some)
    }

    /// A secret's metadata (no value), if it exists.
    pub async fn meta(&self, name: &str) -> SecretsResult<Option<SecretMeta>> {
        validate_name(name)?;
        match self.inner.store.get(SECRETS_NS, name).await? {
            Some(r) => Ok(Some(meta_of(name, &decode(name, r.value())?))),
            None => Ok(None),
        }
    }

    /// Every secret's metadata (never a value), by name, Haven's reserved ones included.
    pub async fn list(&self) -> SecretsResult<Vec<SecretMeta>> {
        let mut out = Vec::new();
        for r in self.scan_all().await? {
            out.push(meta_of(&r.record.key, &decode(&r.record.key, r.value())?));
        }
        Ok(out)
    }

    /// [`Secrets::list`] without the names reserved for Haven.
    pub async fn list_user(&self) -> SecretsResult<Vec<SecretMeta>> {
        let mut all = self.list().await?;
        all.retain(|m| !is_reserved(&m.name));
        Ok(all)
    }

    /// Names of every secret.
    pub async fn names(&self) -> SecretsResult<BTreeSet<String>> {
        Ok(self
            .scan_all()
            .await?
            .into_iter()
            .map(|r| r.record.key)
            .collect())
    }

    /// Deletes a secret (a tombstone, so the deletion wins over older copies elsewhere).
    /// Returns whether it existed.
    pub async fn delete(&self, name: &str) -> SecretsResult<bool> {
        validate_name(name)?;
        if self.inner.store.get(SECRETS_NS, name).await?.is_none() {
            return Ok(false);
        }
        self.inner
            .store
            .commit(Batch::new().delete(SECRETS_NS, name))
            .await?;
        tracing::debug!(secret = name, "secret deleted");
        Ok(true)
    }

    /// [`Secrets::delete`] for users: refuses names reserved for Haven.
    pub async fn delete_user(&self, name: &str) -> SecretsResult<bool> {
        refuse_reserved(name)?;
        self.delete(name).await
    }

    /// Reloads the key source, then re-wraps every data key not under the primary key. Each
    /// record is replaced by compare-and-set on its revision (retried on conflict), so a
    /// concurrent `set` is never lost; values are not re-encrypted.
    pub async fn rotate_kek(&self) -> SecretsResult<RotationReport> {
        self.reload_keys()?;
        let ring = self.keys();
        let mut report = RotationReport {
            primary: ring.primary_kid().to_owned(),
            ..RotationReport::default()
        };
        for r in self.scan_all().await? {
            let name = r.record.key.clone();
            match self.rewrap(&ring, &name, r).await {
                Ok(Some(previous)) => *report.rewrapped.entry(previous).or_default() += 1,
                Ok(None) => report.unchanged += 1,
                Err(SecretsError::Store(e)) if !matches!(e, StoreError::Conflict { .. }) => {
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "re-wrapping a secret's data key failed");
                    report.failed.insert(name, e.to_string());
                }
            }
        }
        report.still_in_use = self.kek_usage().await?.into_keys().collect();
        tracing::info!(
            primary = %report.primary,
            rewrapped = ?report.rewrapped,
            failed = report.failed.len(),
            still_in_use = ?report.still_in_use,
            "secrets key rotation done"
        );
        Ok(report)
    }

    /// Re-wraps one record's data key under the primary; `Some(previous kid)` if it did.
    async fn rewrap(
        &self,
        ring: &KekRing,
        name: &str,
        mut current: StoredRecord,
    ) -> SecretsResult<Option<String>> {
        let primary = ring.primary();
        let mut last_conflict = None;
        for _ in 0..CAS_ATTEMPTS {
            let rec = decode(name, current.value())?;
            if rec.kek == primary.kid {
                return Ok(None);
            }
            let old = ring.key(&rec.kek).ok_or_else(|| SecretsError::UnknownKek {
                name: name.to_owned(),
                kid: rec.kek.clone(),
            })?;
            let dek = unwrap_dek(old, name, &rec.wrapped_dek)?;
            let previous = rec.kek.clone();
            let new = SealedRecord {
                kek: primary.kid.clone(),
                wrapped_dek: wrap_dek(&primary.key, name, &dek),
                ..rec
            };
            let bytes = serde_json::to_vec(&new).expect("a secret record serializes");
            match self
                .inner
                .store
                .commit(Batch::new().put_if(
                    SECRETS_NS,
                    name,
                    bytes,
                    Expect::Revision(current.revision),
                ))
                .await
            {
                Ok(_) => return Ok(Some(previous)),
                Err(e @ StoreError::Conflict { .. }) => {
                    // Set or deleted meanwhile: look again.
                    last_conflict = Some(e);
                    match self.inner.store.get(SECRETS_NS, name).await? {
                        Some(r) => current = r,
                        None => return Ok(None),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_conflict.expect("the loop ran").into())
    }

    /// How many secrets each key-encryption key wraps (read from the records; nothing is
    /// decrypted). A key absent here may be removed from the key file.
    pub async fn kek_usage(&self) -> SecretsResult<BTreeMap<String, usize>> {
        kek_usage_in(&*self.inner.store).await
    }

    /// [`Secrets::kek_usage`], split into users' secrets and Haven's own.
    pub async fn kek_usage_by_owner(&self) -> SecretsResult<BTreeMap<String, Wrapped>> {
        kek_usage_by_owner_in(&*self.inner.store).await
    }

    /// Replaces every `${secret:NAME}` of `template` by the secret's value (UTF-8 text).
    /// A missing secret is an error naming it; reserved names cannot be referenced.
    pub async fn expand(&self, template: &str) -> SecretsResult<Zeroizing<String>> {
        // The message reads as the registry's (templates are upstream entries' values).
        let pieces = parse_template(template)
            .map_err(|e| SecretsError::Invalid(format!("invalid upstream entry: {e}")))?;
        let mut values = Vec::new();
        for p in &pieces {
            if let Piece::Secret(name) = p {
                refuse_reserved(name)?;
                let v = self
                    .get(name)
                    .await?
                    .ok_or_else(|| SecretsError::MissingSecret((*name).to_owned()))?;
                if std::str::from_utf8(&v).is_err() {
                    return Err(SecretsError::Invalid(format!(
                        "secret '{name}' is not UTF-8 text, so it cannot be used inside a text value"
                    )));
                }
                values.push(v);
            }
        }
        // Allocated once, so that no partial copy is left behind by a reallocation.
        let len = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                Piece::Secret(_) => 0,
            })
            .sum::<usize>()
            + values.iter().map(|v| v.len()).sum::<usize>();
        let mut out = Zeroizing::new(String::with_capacity(len));
        let mut values = values.iter();
        for p in &pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Secret(_) => {
                    let v = values.next().expect("one value per reference");
                    out.push_str(std::str::from_utf8(v).expect("checked above"));
                }
            }
        }
        Ok(out)
    }

    async fn scan_all(&self) -> SecretsResult<Vec<StoredRecord>> {
        Ok(self.inner.store.scan_all(SECRETS_NS, "").await?)
    }
}

fn refuse_reserved(name: &str) -> SecretsResult<()> {
    if is_reserved(name) {
        Err(SecretsError::Reserved(shown(name)))
    } else {
        Ok(())
    }
}
