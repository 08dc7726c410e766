//! TLS configuration: the proxy's server side (clients) and its client side
//! (backends).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use thiserror::Error;

use crate::config::{BackendTlsMode, BackendTlsSection, TlsSection};

pub mod continued;
pub mod end_point;
pub mod handover;

#[derive(Debug, Error)]
pub enum TlsConfigError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, reason: impl ToString) -> TlsConfigError {
    TlsConfigError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// The server side toward clients.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// `tls-server-end-point` data of the certificate (SCRAM-SHA-256-PLUS); `None` when its
    /// signature algorithm gives no hash, and then -PLUS is not offered.
    pub end_point: Option<Vec<u8>>,
}

/// The rustls server config for client connections, and the channel binding data of its
/// certificate, computed here once from the very bytes rustls serves.
pub fn server_tls(tls: &TlsSection) -> Result<ServerTls, TlsConfigError> {
    let certs = load_certs(&tls.cert)?;
    // The leaf comes first in the chain (load_certs refuses an empty file).
    let end_point = certs
        .first()
        .and_then(|leaf| end_point::tls_server_end_point(leaf));
    if end_point.is_none() {
        tracing::warn!(
            cert = %tls.cert.display(),
            "the TLS certificate's signature algorithm gives no tls-server-end-point hash \
             (e.g. Ed25519): SCRAM-SHA-256-PLUS (channel binding) is not offered"
        );
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| file_err(&tls.key, e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // A session's TLS keys can be handed to another process (tls::handover).
    cfg.enable_secret_extraction = true;
    Ok(ServerTls {
        config: Arc::new(cfg),
        end_point,
    })
}

/// The rustls client config for backend connections; `None` when disabled.
pub fn backend_client_config(
    section: &BackendTlsSection,
) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let mut cfg = match section.mode {
        BackendTlsMode::Disable => return Ok(None),
        BackendTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth(),
        BackendTlsMode::VerifyFull => {
            let ca = section.ca.as_deref().ok_or_else(|| {
                file_err(Path::new("backend_tls.ca"), "verify-full needs a CA file")
            })?;
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| file_err(ca, e))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    // A session's TLS keys can be handed to another process (tls::handover).
    cfg.enable_secret_extraction = true;
    Ok(Some(Arc::new(cfg)))
}

/// `sslmode=require` semantics: encrypt, accept any certificate, but still
/// check that the handshake signatures are valid.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
