//! rustls verifiers for both ends of a federation link.
//!
//! [`FederationVerifier`] implements rustls' `ClientCertVerifier` (server side: client
//! authentication is mandatory) and `ServerCertVerifier` (client side). Both run the
//! complete [`TrustStore::identity_from_chain`] check; the server side additionally
//! checks that a server dialled by DNS name presents a certificate for that name.
//! Only Ed25519 is accepted, for certificate and handshake signatures alike.
//!
//! rustls does not hand a verifier's result to the application, so after the handshake
//! the caller gets the [`super::PeerIdentity`] with
//! [`TrustStore::identity_of_peer`] on the connection's peer certificates.
//!
//! **Session resumption skips these verifiers.** A TLS 1.3 resumed session does not
//! present certificates again, so a certificate revoked since the first handshake is
//! not re-checked by rustls. Either disable resumption on federation links, or (as a
//! link must anyway, to learn who the peer is) call
//! [`TrustStore::identity_of_peer`] after every handshake: it re-verifies the peer's
//! chain at the current time with the current CRLs (pinned by a test in
//! `tests/pki.rs`).
//!
//! Rejections are logged (`log::warn!`) with the full reason. Standard causes map to
//! rustls' own certificate errors (so the peer receives the matching TLS alert);
//! federation-specific ones (tier, region, profile) travel as
//! `CertificateError::Other` holding the [`VerifyError`] (see
//! [`VerifyError::from_rustls`]).
//!
//! These verifiers must never accept a handshake that `identity_from_chain` refuses,
//! nor a signature scheme other than Ed25519.

use super::{TrustStore, VerifyError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// Ed25519 only: certificate signatures and TLS handshake signatures.
pub(crate) static ED25519_ONLY: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[webpki::ring::ED25519],
    mapping: &[(SignatureScheme::ED25519, &[webpki::ring::ED25519])],
};

/// Verifies federation peers for rustls, on either end of a link. Cheap to clone;
/// CRLs loaded into the shared [`TrustStore`] take effect on the next handshake.
#[derive(Debug, Clone)]
pub struct FederationVerifier {
    trust: Arc<TrustStore>,
    root_hints: Vec<DistinguishedName>,
}

impl FederationVerifier {
    pub fn new(trust: Arc<TrustStore>) -> FederationVerifier {
        let root_hints = vec![DistinguishedName::in_sequence(trust.anchor().subject.as_ref())];
        FederationVerifier { trust, root_hints }
    }

    /// The trust store this verifier consults.
    pub fn trust_store(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    /// The signature algorithms the federation accepts (Ed25519 only).
    pub fn supported_algorithms() -> WebPkiSupportedAlgorithms {
        ED25519_ONLY
    }

    fn verify(
        &self,
        role: &str,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        expected: Option<&str>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let result = self.trust.identity_from_chain(end_entity, intermediates, now).and_then(|id| match expected {
            Some(expected) if !expected.eq_ignore_ascii_case(id.name.as_str()) => {
                Err(VerifyError::WrongPeer { expected: expected.to_owned(), presented: id.name.to_string() })
            }
            _ => Ok(id),
        });
        match result {
            Ok(id) => {
                log::debug!("{role} certificate accepted: `{}` ({}, {})", id.name, id.tier, id.peer_id);
                Ok(())
            }
            Err(err) => {
                log::warn!("{role} certificate rejected: {err}");
                Err(err.into())
            }
        }
    }
}

impl From<VerifyError> for rustls::Error {
    fn from(err: VerifyError) -> rustls::Error {
        let cert_err = match err {
            VerifyError::Expired { .. } => CertificateError::Expired,
            VerifyError::NotYetValid { .. } => CertificateError::NotValidYet,
            VerifyError::Revoked { .. } => CertificateError::Revoked,
            VerifyError::RevocationUnknown { .. } => CertificateError::UnknownRevocationStatus,
            VerifyError::UntrustedChain { .. } => CertificateError::UnknownIssuer,
            VerifyError::WrongPeer { .. } => CertificateError::NotValidForName,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert_err)
    }
}

impl ClientCertVerifier for FederationVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify("client", end_entity, intermediates, None, now).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &ED25519_ONLY)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ED25519_ONLY)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ED25519_ONLY.supported_schemes()
    }
}

impl ServerCertVerifier for FederationVerifier {
    /// A server dialled by DNS name must present a certificate for exactly that node
    /// name. A server dialled by IP address is checked for everything but its name:
    /// the caller must then compare [`TrustStore::identity_of_peer`] with whom it meant
    /// to reach.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match server_name {
            ServerName::DnsName(name) => Some(name.as_ref()),
            _ => None,
        };
        self.verify("server", end_entity, intermediates, expected, now).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &ED25519_ONLY)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ED25519_ONLY)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ED25519_ONLY.supported_schemes()
    }
}
