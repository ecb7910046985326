//! Errors of the backup subsystem. Every message says what was wrong and, where it can, what
//! to do about it.

use haven_state::StoreError;

/// What can go wrong while shipping, verifying, restoring or pruning a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The backup URL, key file or another setting is invalid.
    #[error("{0}")]
    Config(String),
    /// The object store refused or failed an operation.
    #[error("object store error on {target}: {source}")]
    Target {
        /// Target URL.
        target: String,
        /// The underlying error (shown in the message, not chained, so it prints once).
        source: object_store::Error,
    },
    /// The key does not match the one the backup was written with.
    #[error(
        "wrong backup key: the backup at {target} was written with key {expected}, the given key is {found}"
    )]
    WrongKey {
        /// Target URL.
        target: String,
        /// Fingerprint recorded in the backup.
        expected: String,
        /// Fingerprint of the given key.
        found: String,
    },
    /// The backup (or one object of it) belongs to another deployment.
    #[error(
        "the backup at {target} belongs to deployment {found}, not to this deployment ({expected}); use another backup URL"
    )]
    OtherDeployment {
        /// Target URL.
        target: String,
        /// This deployment.
        expected: String,
        /// The deployment the backup belongs to.
        found: String,
    },
    /// An object is missing, truncated, altered or cannot be decoded.
    #[error("backup object {object} is damaged: {reason}")]
    Damaged {
        /// Object key.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// There is nothing to restore at the requested point.
    #[error("{0}")]
    NothingToRestore(String),
    /// Another node holds the region's shipping lease; this one stands by.
    #[error("{0}")]
    Standby(String),
    /// A restore target is not empty.
    #[error("{0}")]
    Refused(String),
    /// The state layer failed.
    #[error(transparent)]
    State(#[from] StoreError),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error (shown in the message, not chained, so it prints once).
        source: std::io::Error,
    },
}

impl BackupError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> BackupError {
        BackupError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of the backup subsystem.
pub type Result<T> = std::result::Result<T, BackupError>;
