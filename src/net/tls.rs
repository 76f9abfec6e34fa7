//! TLS for `tls` and `wss` listeners: the rustls server configuration (TLS 1.2 and 1.3, the
//! `ring` provider) from PEM files, optional or required client certificates, and the
//! identity a verified client certificate gives its client.

use std::path::Path;
use std::sync::Arc;

use futures_rustls::rustls::crypto::ring;
use futures_rustls::rustls::server::WebPkiClientVerifier;
use futures_rustls::rustls::{version, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ListenerConfig;

/// Reads the listener's files and builds its TLS configuration. The error is one line
/// naming the key and the file.
pub fn server_config(cfg: &ListenerConfig) -> Result<Arc<ServerConfig>, String> {
    let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else {
        return Err("cert_file and key_file are needed".into());
    };
    let certs =
        read_certs(cert_file).map_err(|e| format!("cert_file {}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("key_file {}: {}", key_file.display(), pem_error(e)))?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let ca_err = |e: String| format!("client_ca_file {}: {e}", ca_file.display());
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca_file).map_err(ca_err)? {
                roots
                    .add(cert)
                    .map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if cfg.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| ca_err(format!("cannot verify clients with it: {e}")))?,
            )
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "cert_file {} / key_file {}: {e}",
            cert_file.display(),
            key_file.display()
        )
    })?;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    crate::config::pem_reason(e)
}

/// The identity of a verified client certificate: its subject's Common Name, else its
/// whole subject. `None` when the certificate cannot be parsed.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Some(cn.unwrap_or_else(|| subject.to_string()))
}
