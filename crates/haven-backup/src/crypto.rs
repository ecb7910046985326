//! Sealing backup objects: zstd compression, then AES-256-GCM encryption.
//!
//! A sealed object is `"HVB1" || len(deployment) as u8 || deployment || nonce(12) || ciphertext`.
//! The associated data is everything before the ciphertext plus the object's key, so an object
//! cannot be swapped for another one (another range, another deployment) without detection.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{BackupError, Result};

const MAGIC: &[u8; 4] = b"HVB1";
const NONCE_LEN: usize = 12;
/// zstd level: fast, and most of the log (JSON-RPC payloads) compresses well even at 3.
const ZSTD_LEVEL: i32 = 3;

/// A 256-bit backup encryption key.
#[derive(Clone)]
pub struct BackupKey {
    bytes: [u8; 32],
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupKey({})", self.fingerprint())
    }
}

impl BackupKey {
    /// A new random key.
    pub fn generate() -> BackupKey {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        BackupKey { bytes }
    }

    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> BackupKey {
        BackupKey { bytes }
    }

    /// Parses a key file's content: 64 hexadecimal digits (surrounding whitespace ignored) or
    /// exactly 32 raw bytes.
    pub fn parse(content: &[u8]) -> Result<BackupKey> {
        let text = std::str::from_utf8(content).map(str::trim).unwrap_or("");
        if text.len() == 64
            && let Ok(v) = hex::decode(text)
        {
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(&v);
            return Ok(BackupKey { bytes });
        }
        if content.len() == 32 {
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(content);
            return Ok(BackupKey { bytes });
        }
        Err(BackupError::Config(
            "a backup key must be 64 hexadecimal digits or 32 raw bytes; create one with `haven backup keygen --out FILE`".into(),
        ))
    }

    /// Reads a key file; refuses one that group or others may read or change (its mode is not
    /// 0600 or 0400).
    pub fn from_file(path: &std::path::Path) -> Result<BackupKey> {
        if path.exists() {
            haven_state::files::check_private_file(path, "backup key file")
                .map_err(|e| BackupError::Config(e.to_string()))?;
        }
        let content = std::fs::read(path).map_err(|e| {
            BackupError::io(format!("reading the backup key file {}", path.display()), e)
        })?;
        BackupKey::parse(&content).map_err(|e| {
            BackupError::Config(format!("the backup key file {}: {e}", path.display()))
        })
    }

    /// Runs a key command (e.g. one that asks a KMS or a vault) and reads the key it prints on
    /// standard output, in a key file's format (see [`haven_state::files::run_key_command`]).
    /// Blocks until the command ends.
    pub fn from_command(command: &str) -> Result<BackupKey> {
        let out = haven_state::files::run_key_command(command, "backup key")
            .map_err(|e| BackupError::Config(e.to_string()))?;
        BackupKey::parse(&out)
            .map_err(|e| BackupError::Config(format!("the output of the backup key command: {e}")))
    }

    /// The key as 64 hexadecimal digits (what `keygen` writes).
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// A fingerprint that identifies the key without revealing it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"haven-backup-key-fingerprint\0");
        h.update(self.bytes);
        format!("sha256:{}", &hex::encode(h.finalize())[..16])
    }
}

fn header(deployment: &str, nonce: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + deployment.len() + NONCE_LEN);
    out.extend_from_slice(MAGIC);
    out.push(deployment.len() as u8);
    out.extend_from_slice(deployment.as_bytes());
    out.extend_from_slice(nonce);
    out
}

fn aad(header: &[u8], object: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(object.as_bytes());
    aad
}

/// Compresses and encrypts `plain` as object `object` of `deployment`.
pub fn seal(key: &BackupKey, deployment: &str, object: &str, plain: &[u8]) -> Result<Vec<u8>> {
    let compressed = zstd::bulk::compress(plain, ZSTD_LEVEL)
        .map_err(|e| BackupError::io("compressing a backup object", e))?;
    seal_compressed(key, deployment, object, &compressed)
}

/// Encrypts already compressed bytes as object `object` of `deployment`.
pub(crate) fn seal_compressed(
    key: &BackupKey,
    deployment: &str,
    object: &str,
    compressed: &[u8],
) -> Result<Vec<u8>> {
    if deployment.len() > 255 {
        return Err(BackupError::Config(
            "deployment id longer than 255 bytes".into(),
        ));
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let mut out = header(deployment, &nonce);
    let cipher = Aes256Gcm::new_from_slice(&key.bytes).expect("32-byte key");
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: compressed,
                aad: &aad(&out, object),
            },
        )
        .map_err(|_| BackupError::Config("encrypting a backup object failed".into()))?;
    out.extend_from_slice(&ct);
    Ok(out)
}

/// The deployment a sealed object says it belongs to (read from its plaintext header).
pub fn sealed_deployment(sealed: &[u8]) -> Option<&str> {
    if sealed.len() < 5 || &sealed[..4] != MAGIC {
        return None;
    }
    let n = sealed[4] as usize;
    sealed
        .get(5..5 + n)
        .and_then(|b| std::str::from_utf8(b).ok())
}

/// Decrypts and decompresses object `object`, checking that it belongs to `deployment`.
/// `max_plain` bounds the decompressed size.
pub fn open(
    key: &BackupKey,
    deployment: &str,
    object: &str,
    sealed: &[u8],
    max_plain: usize,
) -> Result<Vec<u8>> {
    let damaged = |reason: String| BackupError::Damaged {
        object: object.to_owned(),
        reason,
    };
    let Some(found) = sealed_deployment(sealed) else {
        return Err(damaged("not a Haven backup object (bad header)".into()));
    };
    if found != deployment {
        return Err(BackupError::OtherDeployment {
            target: object.to_owned(),
            expected: deployment.to_owned(),
            found: found.to_owned(),
        });
    }
    let head_len = 5 + found.len() + NONCE_LEN;
    if sealed.len() < head_len + 16 {
        return Err(damaged("truncated (shorter than its header)".into()));
    }
    let (head, ct) = sealed.split_at(head_len);
    let nonce = &head[head_len - NONCE_LEN..];
    let cipher = Aes256Gcm::new_from_slice(&key.bytes).expect("32-byte key");
    let compressed = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: &aad(head, object),
            },
        )
        .map_err(|_| {
            damaged("authentication failed: the object was altered, or the key is wrong".into())
        })?;
    zstd::bulk::decompress(&compressed, max_plain)
        .map_err(|e| damaged(format!("cannot decompress: {e}")))
}

/// SHA-256 of `bytes`, hexadecimal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let key = BackupKey::generate();
        let plain = b"hello hello hello hello".repeat(100);
        let sealed = seal(&key, "dep-1", "segments/a", &plain).unwrap();
        assert!(sealed.len() < plain.len(), "compressed");
        assert_eq!(
            open(&key, "dep-1", "segments/a", &sealed, 1 << 20).unwrap(),
            plain
        );

        // Wrong key, wrong object name, altered byte, truncation, other deployment.
        let other = BackupKey::generate();
        assert!(open(&other, "dep-1", "segments/a", &sealed, 1 << 20).is_err());
        assert!(open(&key, "dep-1", "segments/b", &sealed, 1 << 20).is_err());
        let mut altered = sealed.clone();
        let n = altered.len();
        altered[n / 2] ^= 1;
        assert!(open(&key, "dep-1", "segments/a", &altered, 1 << 20).is_err());
        assert!(open(&key, "dep-1", "segments/a", &sealed[..n - 3], 1 << 20).is_err());
        assert!(matches!(
            open(&key, "dep-2", "segments/a", &sealed, 1 << 20),
            Err(BackupError::OtherDeployment { .. })
        ));
    }

    #[test]
    fn keys_parse_from_hex_or_raw_bytes_and_nothing_else() {
        let key = BackupKey::generate();
        let hex_text = format!("{}\n", key.to_hex());
        let parsed = BackupKey::parse(hex_text.as_bytes()).unwrap();
        assert_eq!(parsed.fingerprint(), key.fingerprint());
        assert_eq!(
            BackupKey::parse(&key.bytes).unwrap().fingerprint(),
            key.fingerprint()
        );
        assert!(BackupKey::parse(b"too short").is_err());
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }
}
