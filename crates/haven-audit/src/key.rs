//! The checkpoint signing key: an Ed25519 key in a file of the node's data directory
//! (`audit.key`, 32 bytes as hex), created 0600 on first start and refused when other users
//! may read it, like Haven's other key files.

use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Name of the key file in the data directory.
pub const KEY_FILE: &str = "audit.key";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file may be read by others.
    #[error(transparent)]
    Open(#[from] haven_state::files::KeySourceError),
    /// Reading or creating it failed.
    #[error("the audit signing key file {path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// Its content is not a key.
    #[error(
        "the audit signing key file {0} does not hold a key (64 hex characters); move it away to have a new one created (checkpoints it signed stay verifiable by its public key in the store)"
    )]
    Malformed(String),
}

/// The key id of a public key: the first 16 hex characters of its SHA-256.
pub fn kid_of(public: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

/// A public key from 64 hex characters.
pub fn parse_public(hex_text: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_text.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// A key that lives only in memory: for a one-off writer such as an operator's command, whose
/// chain is one run (its public key is published in the store like any other).
pub fn ephemeral() -> SigningKey {
    SigningKey::from_bytes(&rand::random())
}

/// The signing key in `dir/audit.key`, created (0600) when missing; refused when others may
/// read it.
pub fn load_or_create(dir: &Path) -> Result<SigningKey, KeyError> {
    let path = dir.join(KEY_FILE);
    let io = |error| KeyError::Io {
        path: path.display().to_string(),
        error,
    };
    if path.exists() {
        haven_state::files::check_private_file(&path, "audit signing key file")?;
        let text = std::fs::read_to_string(&path).map_err(io)?;
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Malformed(path.display().to_string()))?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    let seed: [u8; 32] = rand::random();
    use std::io::Write;
    let mut f = haven_state::files::private_options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    f.write_all(hex::encode(seed).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    tracing::info!(
        "created the audit signing key {} (its public key is published in the store)",
        path.display()
    );
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_private_reused_and_refused_when_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let f = dir.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "nonsense").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(KeyError::Malformed(_))
        ));
    }
}
