//! TLS material from PEM files, shared by the server side (`haven-server`: the MCP listener and
//! the admin API) and the clients (NATS, the command line's admin calls): certificate chains,
//! private keys (refused when others may read them), root stores and client configurations.
//!
//! One crypto provider, aws-lc-rs, is named explicitly everywhere: the dependency tree enables
//! both of rustls's providers, and rustls then refuses to pick a default on its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider Haven's TLS uses (aws-lc-rs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes [`provider`] the process's default, for libraries that build their TLS
/// configurations with rustls's defaults. Harmless when a default is already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The certificates of a PEM file (a chain: the leaf first), at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (a PEM `-----BEGIN CERTIFICATE-----` block)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1). The file is refused when group or
/// others may read it, as every key file of Haven's is (`what` names it in the error).
pub fn load_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    crate::files::check_private_file(path, what).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "{} holds no usable private key (PEM PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        )
    })
}

/// The roots a client trusts: the certificates of `ca_file` when given, else the system's.
pub fn root_store(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => add_ca_file(&mut roots, f)?,
        None => add_system_roots(&mut roots),
    }
    Ok(roots)
}

/// The system's roots and the certificates of `ca_file`.
pub fn root_store_with_system(ca_file: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    add_system_roots(&mut roots);
    add_ca_file(&mut roots, ca_file)?;
    Ok(roots)
}

fn add_ca_file(roots: &mut rustls::RootCertStore, f: &Path) -> Result<(), String> {
    for cert in load_certs(f)? {
        roots
            .add(cert)
            .map_err(|e| format!("the CA certificate in {}: {e}", f.display()))?;
    }
    Ok(())
}

fn add_system_roots(roots: &mut rustls::RootCertStore) {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "reading the system's CA certificates");
    }
    let (_added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "system CA certificates that could not be used");
    }
}

/// A client certificate and its key, for mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (owner-only).
    pub key: PathBuf,
}

/// A client configuration (TLS 1.3 and 1.2) that verifies servers against `ca_file` (else the
/// system's roots) and presents `identity` when given.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<&Identity>,
) -> Result<rustls::ClientConfig, String> {
    let roots = root_store(ca_file)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let certs = load_certs(&id.cert)?;
            let key = load_key(&id.key, "TLS client key file")?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                format!(
                    "the client certificate {} and key {}: {e}",
                    id.cert.display(),
                    id.key.display()
                )
            })
        }
    }
}
