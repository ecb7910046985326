//! TLS on Haven's listeners (rustls): the certificate and key from PEM files, TLS 1.3 only
//! unless 1.2 is asked for, and reloading without a restart. A task polls the two files'
//! metadata; when either changed, the pair is read again and, if it is sound, swapped in for
//! the handshakes that follow (connections already open keep the one they began with). A
//! broken pair — unreadable, not PEM, a key that does not belong to the certificate, a key
//! file others may read — is refused with an error in the log and the pair in force stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use haven_state::tls::{load_certs, load_key, provider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// The oldest TLS version a listener accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only (the default): a client offering only 1.2 or older is refused.
    #[default]
    Tls13,
}

impl std::str::FromStr for MinVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "1.3" => Ok(MinVersion::Tls13),
            "1.2" => Ok(MinVersion::Tls12),
            other => Err(format!(
                "invalid TLS version {other:?}: use 1.3 (the default) or 1.2"
            )),
        }
    }
}

impl std::fmt::Display for MinVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MinVersion::Tls12 => "1.2",
            MinVersion::Tls13 => "1.3",
        })
    }
}

/// Where a listener's certificate chain and key are (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, the leaf first.
    pub cert: PathBuf,
    /// Its private key; refused when group or others may read it.
    pub key: PathBuf,
}

/// What identifies a version of a file: its size, modification time, inode (a file replaced
/// by a rename, or a symbolic link switched to another target, changes it) and mode (a key
/// file refused for its mode is tried again once it is restricted).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
    mode: u32,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (ino, mode) = {
        use std::os::unix::fs::MetadataExt;
        (meta.ino(), meta.mode())
    };
    #[cfg(not(unix))]
    let (ino, mode) = (0, 0);
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        ino,
        mode,
    })
}

/// Hands every handshake the certified key in force; swapped whole on a reload.
#[derive(Debug)]
struct Resolver {
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// A listener's TLS: the configuration its acceptor uses and the pair in force.
pub struct ServerTls {
    files: TlsFiles,
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    /// The files' stamps as of the last reading (successful or not).
    seen: parking_lot::Mutex<(Option<Stamp>, Option<Stamp>)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Reads and checks a certificate chain and its key.
fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key, "TLS key file")?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the key in {}: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "the key in {} does not belong to the certificate in {} ({e})",
            files.key.display(),
            files.cert.display()
        )
    })?;
    Ok(certified)
}

impl ServerTls {
    /// Reads the pair (an error names what is wrong with it) and builds the listener's TLS
    /// configuration: `min` and newer, HTTP/1.1 announced by ALPN.
    pub fn load(files: TlsFiles, min: MinVersion) -> Result<Arc<ServerTls>, String> {
        let seen = (stamp(&files.cert), stamp(&files.key));
        let certified = load_pair(&files)?;
        let resolver = Arc::new(Resolver {
            current: parking_lot::RwLock::new(Arc::new(certified)),
        });
        let versions: &[&'static rustls::SupportedProtocolVersion] = match min {
            MinVersion::Tls13 => &[&rustls::version::TLS13],
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(ServerTls {
            files,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            seen: parking_lot::Mutex::new(seen),
        }))
    }

    /// The acceptor for new connections (it follows reloads).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The files this listener's pair comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The leaf certificate in force (DER).
    pub fn certificate(&self) -> Vec<u8> {
        self.resolver
            .current
            .read()
            .end_entity_cert()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// Reads the pair again if either file changed since it was last read: `None` when
    /// nothing changed, else whether the new pair is now in force (an error leaves the old
    /// one). A failed reading is not retried until a file changes again.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let now = (stamp(&self.files.cert), stamp(&self.files.key));
        {
            let mut seen = self.seen.lock();
            if *seen == now {
                return None;
            }
            *seen = now;
        }
        Some(load_pair(&self.files).map(|certified| {
            *self.resolver.current.write() = Arc::new(certified);
        }))
    }

    /// Polls the files every `every` and reloads the pair when they change, logging the
    /// outcome, until the returned task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let checking = tls.clone();
                let outcome =
                    match tokio::task::spawn_blocking(move || checking.reload_if_changed()).await {
                        Ok(o) => o,
                        Err(e) => Some(Err(format!("the reload task failed: {e}"))),
                    };
                match outcome {
                    None => {}
                    Some(Ok(())) => tracing::info!(
                        cert = %tls.files.cert.display(),
                        key = %tls.files.key.display(),
                        "TLS certificate reloaded: new connections use it"
                    ),
                    Some(Err(e)) => tracing::error!(
                        cert = %tls.files.cert.display(),
                        key = %tls.files.key.display(),
                        "TLS certificate not reloaded, the previous one stays in force: {e}"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        _dir: tempfile::TempDir,
        files: TlsFiles,
    }

    fn cert(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn write(files: &TlsFiles, (c, k): &(String, String)) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&files.cert, c).unwrap();
        // Replaced by a rename, as an operator's tooling would: a new inode every time.
        let tmp = files.key.with_extension("tmp");
        std::fs::write(&tmp, k).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, &files.key).unwrap();
    }

    fn pair(name: &str) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        write(&files, &cert(name));
        Pair { _dir: dir, files }
    }

    fn leaf(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn min_version_parses_and_names_itself() {
        assert_eq!("1.3".parse::<MinVersion>().unwrap(), MinVersion::Tls13);
        assert_eq!("1.2".parse::<MinVersion>().unwrap(), MinVersion::Tls12);
        assert!("1.1".parse::<MinVersion>().unwrap_err().contains("1.3"));
        assert_eq!(MinVersion::default().to_string(), "1.3");
    }

    #[test]
    fn a_pair_loads_and_a_changed_pair_replaces_it() {
        let p = pair("one.test");
        let tls = ServerTls::load(p.files.clone(), MinVersion::Tls13).unwrap();
        assert!(tls.reload_if_changed().is_none(), "nothing changed");
        let two = cert("two.test");
        write(&p.files, &two);
        tls.reload_if_changed().unwrap().unwrap();
        assert_eq!(tls.certificate(), leaf(&two.0));
    }

    #[test]
    fn a_broken_pair_is_refused_and_the_old_one_stays() {
        let p = pair("one.test");
        let tls = ServerTls::load(p.files.clone(), MinVersion::Tls13).unwrap();
        let before = tls.certificate();
        // A key of another certificate.
        let (other_cert, _) = cert("two.test");
        std::fs::write(&p.files.cert, other_cert).unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        assert_eq!(tls.certificate(), before);
        // Not PEM at all.
        std::fs::write(&p.files.cert, "not a certificate").unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        assert_eq!(tls.certificate(), before);
        // Unchanged since the failed reading: not tried again.
        assert!(tls.reload_if_changed().is_none());
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let p = pair("one.test");
        std::fs::set_permissions(&p.files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ServerTls::load(p.files.clone(), MinVersion::Tls13).unwrap_err();
        assert!(e.contains("TLS key file"), "{e}");
        // On a reload too; restricting the file is a change that is picked up.
        std::fs::set_permissions(&p.files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tls = ServerTls::load(p.files.clone(), MinVersion::Tls13).unwrap();
        let before = tls.certificate();
        let two = cert("two.test");
        write(&p.files, &two);
        std::fs::set_permissions(&p.files.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = tls.reload_if_changed().unwrap().unwrap_err();
        assert!(e.contains("TLS key file"), "{e}");
        assert_eq!(tls.certificate(), before);
        std::fs::set_permissions(&p.files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        tls.reload_if_changed().unwrap().unwrap();
        assert_eq!(tls.certificate(), leaf(&two.0));
    }
}
