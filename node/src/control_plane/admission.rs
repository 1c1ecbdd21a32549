//! Admission to the control plane: who may gossip with this node.
//!
//! libp2p authenticates a connection with the peer's own key (its PeerId) but knows
//! nothing of the federation. Right after a connection opens, each side sends its
//! federation certificate chain over the `/telemed/admit/1` request-response protocol
//! (with the CRLs it holds, so revocations reach newcomers too). A peer is admitted
//! only if its chain verifies against the trust store now (chain, validity, tier and
//! region claims, not revoked) **and** the certificate's Ed25519 key is exactly the
//! key behind the connection's PeerId. Anything else — a bad chain, someone else's
//! certificate, silence past the admission timeout — is refused: the peer is
//! disconnected, logged and audited.
//!
//! This module only decides; it must never touch the swarm or trust a chain it has
//! not verified.

use certs::verify::{PeerIdentity, TrustStore};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// The admission protocol's name.
pub const ADMIT_PROTOCOL: &str = "/telemed/admit/1";
/// Most certificates in a presented chain (leaf and intermediates).
pub const CHAIN_LEN_MAX: usize = 8;
/// Most CRLs carried in one admission request.
pub const CRLS_MAX: usize = 16;
/// Largest admission request or response, in bytes.
pub const ADMIT_MESSAGE_BYTES_MAX: u64 = 1024 * 1024;

/// What each side sends when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmitRequest {
    /// The sender's certificate chain, leaf first (DER).
    pub chain: Vec<serde_bytes::ByteBuf>,
    /// CRLs (PEM, each with its issuer's chain) the sender holds.
    #[serde(default)]
    pub crls: Vec<String>,
}

/// The answer: admitted, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmitResponse {
    pub admitted: bool,
    pub reason: String,
}

/// Why a peer was not admitted, grouped by cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmissionError {
    /// The peer presented no chain, or one too long.
    #[error("malformed admission request: {0}")]
    Malformed(String),
    /// The chain does not verify (untrusted, expired, revoked, bad tier claim...).
    #[error("certificate refused: {0}")]
    Certificate(String),
    /// The certificate is valid but belongs to another key than the connection's.
    #[error("certificate of {name} is for PeerId {cert_peer_id}, the connection is {peer_id}")]
    PeerIdMismatch { name: String, cert_peer_id: String, peer_id: String },
    /// The peer did not complete admission in time.
    #[error("no admission within {0} ms")]
    Timeout(u64),
    /// An admitted peer misbehaved (e.g. kept forwarding invalid gossip).
    #[error("misbehaved: {0}")]
    Misbehaved(String),
    /// The peer could not be asked (protocol unsupported, connection failed).
    #[error("admission exchange failed: {0}")]
    Exchange(String),
}

impl AdmissionError {
    /// Whether the refusal means the peer must be kept out for good (its certificate
    /// is revoked), not just disconnected.
    pub fn is_revocation(&self) -> bool {
        matches!(self, AdmissionError::Certificate(reason) if reason.contains("revoked"))
    }
}

/// The chain as DER certificates, checked for shape only.
pub fn chain_of(request: &AdmitRequest) -> Result<Vec<CertificateDer<'static>>, AdmissionError> {
    if request.chain.is_empty() {
        return Err(AdmissionError::Malformed("no certificate presented".into()));
    }
    if request.chain.len() > CHAIN_LEN_MAX {
        return Err(AdmissionError::Malformed(format!(
            "{} certificates presented, at most {CHAIN_LEN_MAX}",
            request.chain.len()
        )));
    }
    Ok(request.chain.iter().map(|c| CertificateDer::from(c.to_vec())).collect())
}

/// The admission decision: the chain verifies now and its key is the PeerId's.
pub fn admit(trust: &TrustStore, chain: &[CertificateDer<'_>], peer_id: &str) -> Result<PeerIdentity, AdmissionError> {
    let identity = trust.identity_of_peer(chain).map_err(|e| AdmissionError::Certificate(e.to_string()))?;
    if !identity.matches_peer_id(peer_id) {
        return Err(AdmissionError::PeerIdMismatch {
            name: identity.name.to_string(),
            cert_peer_id: identity.peer_id.clone(),
            peer_id: peer_id.to_owned(),
        });
    }
    Ok(identity)
}
