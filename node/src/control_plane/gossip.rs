//! What travels over gossipsub, and how a receiver decides whether to believe it.
//!
//! Two topics: signed capacity adverts and CRLs. An advert message carries the
//! originator's certificate chain, so a node that never met the originator can still
//! check it: the chain must verify against the trust store now, its key must be the
//! gossipsub source (gossipsub signs every message with the originator's libp2p key,
//! which is the node's one Ed25519 key, and checks that signature in strict mode),
//! and the advert's COSE_Sign1 signature must verify with that same key and name the
//! certificate's node and tier. A CRL is believed only if its signature chains to the
//! federation root ([`certs::TrustStore::load_crl`]).
//!
//! This module decides only; it must never pass an advert or CRL on before it has
//! been verified.

use certs::verify::{PeerIdentity, TrustStore};
use federation_proto::{CapacityAdvert, Millis, SignedEnvelope, content_type};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Topic of capacity adverts.
pub const ADVERT_TOPIC: &str = "/telemed/adverts/1";
/// Topic of certificate revocation lists.
pub const CRL_TOPIC: &str = "/telemed/crl/1";
/// Largest gossip message, in bytes (gossipsub drops larger ones).
pub const GOSSIP_MESSAGE_BYTES_MAX: usize = 512 * 1024;

/// One gossip message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GossipMessage {
    /// A node's signed capacity, with its certificate chain and data-plane address.
    Advert {
        chain: Vec<serde_bytes::ByteBuf>,
        advert: SignedEnvelope,
        /// Where its data plane (QUIC, mutual TLS) listens; checked by that TLS.
        data_addr: Option<SocketAddr>,
    },
    /// A CRL in PEM, with its issuer's chain.
    Crl { pem: String },
}

impl GossipMessage {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).map_err(|e| e.to_string())?;
        if out.len() > GOSSIP_MESSAGE_BYTES_MAX {
            return Err(format!("{} bytes exceeds the {GOSSIP_MESSAGE_BYTES_MAX}-byte gossip limit", out.len()));
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<GossipMessage, String> {
        if bytes.len() > GOSSIP_MESSAGE_BYTES_MAX {
            return Err(format!("{} bytes exceeds the {GOSSIP_MESSAGE_BYTES_MAX}-byte gossip limit", bytes.len()));
        }
        ciborium::from_reader(bytes).map_err(|e| format!("not a gossip message: {e}"))
    }
}

/// An advert that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedAdvert {
    /// The originator, as its certificate says.
    pub origin: PeerIdentity,
    pub advert: CapacityAdvert,
    pub envelope: SignedEnvelope,
    pub data_addr: Option<SocketAddr>,
}

/// Why an advert was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdvertError {
    #[error("originator certificate refused: {0}")]
    Certificate(String),
    #[error("originator {0} differs from the gossip source {1}")]
    SourceMismatch(String, String),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("advert signed by a key other than {0}'s certificate key")]
    WrongSigner(String),
    #[error("advert claims {claimed} but the certificate says {certified}")]
    ClaimMismatch { claimed: String, certified: String },
    #[error("advert from {0} expired")]
    Expired(String),
}

/// Checks an advert message from gossip `source` (the gossipsub author, base58).
pub fn verify_advert(
    trust: &TrustStore,
    source: &str,
    chain: &[serde_bytes::ByteBuf],
    envelope: &SignedEnvelope,
    data_addr: Option<SocketAddr>,
    now: Millis,
) -> Result<VerifiedAdvert, AdvertError> {
    if chain.is_empty() || chain.len() > super::admission::CHAIN_LEN_MAX {
        return Err(AdvertError::Certificate(format!("{} certificates carried", chain.len())));
    }
    let ders: Vec<CertificateDer<'static>> = chain.iter().map(|c| CertificateDer::from(c.to_vec())).collect();
    let origin = trust.identity_of_peer(&ders).map_err(|e| AdvertError::Certificate(e.to_string()))?;
    if !origin.matches_peer_id(source) {
        return Err(AdvertError::SourceMismatch(origin.peer_id.clone(), source.to_owned()));
    }
    let verified =
        envelope.open::<CapacityAdvert>(content_type::ADVERT).map_err(|e| AdvertError::BadSignature(e.to_string()))?;
    if verified.signer != origin.public_key {
        return Err(AdvertError::WrongSigner(origin.name.to_string()));
    }
    let advert = verified.body;
    if advert.node != origin.name || advert.tier != origin.tier {
        return Err(AdvertError::ClaimMismatch {
            claimed: format!("{} ({})", advert.node, advert.tier),
            certified: format!("{} ({})", origin.name, origin.tier),
        });
    }
    if advert.valid_until <= now {
        return Err(AdvertError::Expired(origin.name.to_string()));
    }
    Ok(VerifiedAdvert { origin, advert, envelope: envelope.clone(), data_addr })
}
