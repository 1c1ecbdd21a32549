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
    pub const PATIENT_IDENTITY: &str = "application/telemed.patient-identity+cbor";
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
        let kid = PublicKey(key.verifying_key().to_bytes());
        Self::sign_with(&kid, content_type, to_cbor(body)?, |data| key.sign(data).to_bytes().to_vec())
    }

    /// Builds the envelope [`Self::sign`] builds, over an already-encoded `payload`,
    /// with the signature `signature` returns for the COSE `Sig_structure` bytes it is
    /// given. `kid` is the signer's public key. This is the seam for other signers
    /// (a hardware key, a simulator's stand-in): the bytes around the signature are
    /// exactly those of [`Self::sign`], so an Ed25519 `signature` gives the same
    /// envelope, bit for bit.
    pub fn sign_with(
        kid: &PublicKey,
        content_type: &str,
        payload: Vec<u8>,
        signature: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Result<Self, Error> {
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::EdDSA)
            .key_id(kid.0.to_vec())
            .content_type(content_type.to_owned())
            .build();
        let sign1 =
            CoseSign1Builder::new().protected(protected).payload(payload).create_signature(b"", signature).build();
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

    /// Where the payload lies in [`Self::as_bytes`], found by walking the one layout
    /// every verifying envelope has (an untagged four-element array: protected header,
    /// empty unprotected map, payload, signature) without decoding anything. For a
    /// caller that remembers which envelopes it verified (by [`Self::hash`]) and
    /// re-reads their payloads without parsing them again; on bytes that were never
    /// verified it says nothing about who signed them.
    pub fn payload_range(&self) -> Result<std::ops::Range<usize>, Error> {
        let bad = || Error::BadEnvelope("not in the canonical COSE_Sign1 layout".into());
        let b = &self.0;
        // (major type, argument, position after the head) of the CBOR item at `at`.
        let head = |at: usize| -> Option<(u8, usize, usize)> {
            let first = *b.get(at)?;
            let (major, info) = (first >> 5, first & 0x1f);
            let (arg, len) = match info {
                0..=23 => (u64::from(info), 1),
                24 => (u64::from(*b.get(at + 1)?), 2),
                25 => (u64::from(u16::from_be_bytes(b.get(at + 1..at + 3)?.try_into().ok()?)), 3),
                26 => (u64::from(u32::from_be_bytes(b.get(at + 1..at + 5)?.try_into().ok()?)), 5),
                _ => return None,
            };
            Some((major, usize::try_from(arg).ok()?, at + len))
        };
        let (major, n, at) = head(0).ok_or_else(bad)?;
        if (major, n) != (4, 4) {
            return Err(bad());
        }
        let (major, protected_len, at) = head(at).ok_or_else(bad)?;
        if major != 2 {
            return Err(bad());
        }
        let (major, n, at) = head(at + protected_len).ok_or_else(bad)?;
        if (major, n) != (5, 0) {
            return Err(bad());
        }
        let (major, payload_len, start) = head(at).ok_or_else(bad)?;
        let end = start.checked_add(payload_len).filter(|e| *e <= b.len()).ok_or_else(bad)?;
        if major != 2 {
            return Err(bad());
        }
        Ok(start..end)
    }

    /// The key the envelope claims to be signed by. Unverified: use it only to look
    /// up whether that key is trusted, then call [`Self::verify`].
    pub fn claimed_signer(&self) -> Result<PublicKey, Error> {
        self.parse().map(|(_, k)| k)
    }

    /// Checks the signature and content type, and returns the signer and raw payload.
    /// The payload is not decoded.
    pub fn verify(&self, content_type: &str) -> Result<(PublicKey, Vec<u8>), Error> {
        self.verify_with(content_type, |signer, data, sig| {
            let key = VerifyingKey::from_bytes(&signer.0)
                .map_err(|_| Error::BadEnvelope("key id is not a valid Ed25519 point".into()))?;
            let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| Error::BadSignature)?;
            key.verify_strict(data, &sig).map_err(|_| Error::BadSignature)
        })
    }

    /// [`Self::verify`] with the signature check left to `check(signer, data,
    /// signature)`, where `data` is the COSE `Sig_structure` the signature covers.
    /// Everything else (structure, canonical bytes, algorithm, content type) is
    /// checked here first; the payload is returned only if `check` succeeds, and is
    /// not decoded.
    pub fn verify_with(
        &self,
        content_type: &str,
        check: impl FnOnce(&PublicKey, &[u8], &[u8]) -> Result<(), Error>,
    ) -> Result<(PublicKey, Vec<u8>), Error> {
        let (sign1, signer) = self.parse()?;
        match &sign1.protected.header.content_type {
            Some(coset::ContentType::Text(t)) if t == content_type => {}
            other => {
                return Err(Error::BadEnvelope(format!("content type {other:?} where {content_type} was expected")));
            }
        }
        sign1.verify_signature(b"", |sig, data| check(&signer, data, sig))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_range_finds_the_payload_verify_returns() {
        let key = SigningKey::from_bytes(&[3; 32]);
        for body in [String::new(), "x".repeat(23), "y".repeat(300), "z".repeat(70_000)] {
            let env = SignedEnvelope::sign(&key, content_type::HOP, &body).unwrap();
            let (_, payload) = env.verify(content_type::HOP).unwrap();
            assert_eq!(&env.as_bytes()[env.payload_range().unwrap()], payload.as_slice());
        }
        assert!(SignedEnvelope::from_bytes(vec![0x84, 0x41]).payload_range().is_err());
        assert!(SignedEnvelope::from_bytes(Vec::new()).payload_range().is_err());
    }
}
