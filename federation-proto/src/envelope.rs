//! Signed envelopes: COSE_Sign1 (RFC 9052) with EdDSA over Ed25519.
//!
//! An envelope keeps the exact bytes it was signed over. The protected header names
//! the algorithm (EdDSA), the signer's public key (as the key id) and a content type
//! that binds the payload's meaning, so a signed receipt can never be passed off as a
//! report. Verification happens on the raw bytes *before* the payload is decoded.
//! Only the one encoding [`SignedEnvelope::sign`] makes verifies (an empty unprotected
//! header, no critical parameters, canonical CBOR), so nobody but the signer can
//! change an envelope's bytes, and its hash identifies it in receipts.
//!
//! This module says whether bytes were signed by a key; whether that key belongs to
//! a trusted federation node is for the caller (the certificate layer) to decide.
//! It must never decode an unverified payload.

use crate::Error;
use crate::codec::{from_cbor, to_cbor};
use crate::types::{ContentHash, PublicKey};
use coset::{CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, iana};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Content types bound into the protected header of each signed body.
pub mod content_type {
    pub const MANIFEST: &str = "application/telemed.manifest+cbor";
    pub const HOP: &str = "application/telemed.hop+cbor";
    pub const FINDING: &str = "application/telemed.finding+cbor";
    pub const REPORT: &str = "application/telemed.report+cbor";
    pub const CUSTODY_RECEIPT: &str = "application/telemed.custody-receipt+cbor";
    pub const REPORT_RECEIPT: &str = "application/telemed.report-receipt+cbor";
    pub const ADVERT: &str = "application/telemed.capacity-advert+cbor";
    pub const RECALL: &str = "application/telemed.recall+cbor";
}

/// A COSE_Sign1 structure, kept as the exact bytes that were received or made.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SignedEnvelope(#[serde(with = "serde_bytes")] Vec<u8>);

impl std::fmt::Debug for SignedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedEnvelope({} bytes, {:?})", self.0.len(), self.hash())
    }
}

/// A verified envelope's signer and decoded body.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified<T> {
    pub signer: PublicKey,
    pub body: T,
}

impl SignedEnvelope {
    /// Encodes `body` and signs it with `key` under `content_type`.
    pub fn sign<T: Serialize>(key: &SigningKey, content_type: &str, body: &T) -> Result<Self, Error> {
        let payload = to_cbor(body)?;
        let kid = key.verifying_key().to_bytes().to_vec();
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::EdDSA)
            .key_id(kid)
            .content_type(content_type.to_owned())
            .build();
        let sign1 = CoseSign1Builder::new()
            .protected(protected)
            .payload(payload)
            .create_signature(b"", |data| key.sign(data).to_bytes().to_vec())
            .build();
        let bytes = sign1.to_vec().map_err(|e| Error::Encode(e.to_string()))?;
        Ok(SignedEnvelope(bytes))
    }

    /// Wraps bytes received from a peer; nothing is checked until [`Self::verify`].
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        SignedEnvelope(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// SHA-256 of the exact envelope bytes.
    pub fn hash(&self) -> ContentHash {
        ContentHash::of(&self.0)
    }

    fn parse(&self) -> Result<(CoseSign1, PublicKey), Error> {
        let sign1 = CoseSign1::from_slice(&self.0)
            .map_err(|e| Error::BadEnvelope(format!("not a COSE_Sign1 structure: {e}")))?;
        let alg = &sign1.protected.header.alg;
        if *alg != Some(coset::Algorithm::Assigned(iana::Algorithm::EdDSA)) {
            return Err(Error::BadEnvelope(format!("algorithm {alg:?} is not EdDSA")));
        }
        // RFC 9052 §3.1: a parameter listed as critical must be understood. This build
        // understands none beyond alg, kid and content type, which need no listing.
        let crit = &sign1.protected.header.crit;
        if !crit.is_empty() {
            return Err(Error::BadEnvelope(format!("critical header parameters {crit:?} are not understood")));
        }
        // The envelope's hash is its identity (custody and report receipts name it), so
        // nobody but the signer may be able to change its bytes. The unprotected header
        // is not signed: anyone relaying the envelope could add to it.
        if !sign1.unprotected.is_empty() {
            return Err(Error::BadEnvelope("the unprotected header must be empty: it is not signed".into()));
        }
        // Likewise the CBOR around the signed parts (integer widths, a COSE tag): only
        // the one encoding `sign` makes is accepted, so one signature has one hash.
        let canonical = sign1.clone().to_vec().map_err(|e| Error::BadEnvelope(e.to_string()))?;
        if canonical != self.0 {
            return Err(Error::BadEnvelope("not canonically encoded".into()));
        }
        let kid: [u8; 32] = sign1
            .protected
            .header
            .key_id
            .as_slice()
            .try_into()
            .map_err(|_| Error::BadEnvelope("key id is not a 32-byte Ed25519 public key".into()))?;
        Ok((sign1, PublicKey(kid)))
    }

    /// The key the envelope claims to be signed by. Unverified: use it only to look
    /// up whether that key is trusted, then call [`Self::verify`].
    pub fn claimed_signer(&self) -> Result<PublicKey, Error> {
        self.parse().map(|(_, k)| k)
    }

    /// Checks the signature and content type, and returns the signer and raw payload.
    /// The payload is not decoded.
    pub fn verify(&self, content_type: &str) -> Result<(PublicKey, Vec<u8>), Error> {
        let (sign1, signer) = self.parse()?;
        match &sign1.protected.header.content_type {
            Some(coset::ContentType::Text(t)) if t == content_type => {}
            other => {
                return Err(Error::BadEnvelope(format!("content type {other:?} where {content_type} was expected")));
            }
        }
        let key = VerifyingKey::from_bytes(&signer.0)
            .map_err(|_| Error::BadEnvelope("key id is not a valid Ed25519 point".into()))?;
        sign1.verify_signature(b"", |sig, data| {
            let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| Error::BadSignature)?;
            key.verify_strict(data, &sig).map_err(|_| Error::BadSignature)
        })?;
        let payload = sign1.payload.ok_or_else(|| Error::BadEnvelope("detached payloads are not used here".into()))?;
        Ok((signer, payload))
    }

    /// Verifies, then decodes the payload. The signer is whoever the key id names:
    /// check it against the expected node with [`Self::open_from`] where one is known.
    pub fn open<T: DeserializeOwned>(&self, content_type: &str) -> Result<Verified<T>, Error> {
        let (signer, payload) = self.verify(content_type)?;
        Ok(Verified { signer, body: from_cbor(&payload)? })
    }

    /// Verifies that `expected` signed it, then decodes the payload. Bytes signed by
    /// anyone else are refused before they are decoded.
    pub fn open_from<T: DeserializeOwned>(&self, content_type: &str, expected: &PublicKey) -> Result<T, Error> {
        let (signer, payload) = self.verify(content_type)?;
        if signer != *expected {
            return Err(Error::UnexpectedSigner { expected: *expected, found: signer });
        }
        from_cbor(&payload)
    }
}
