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
use coset::{CborSerializable, CoseSign1, iana};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

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
///
/// The bytes never change once wrapped, so clones share them (a case's manifest,
/// trail and findings are held by every node on its path and sent in every offer
/// and report delivery) and the content hash [`Self::hash`] is computed at most once per
/// envelope, whichever clone asks first. On the wire it is a CBOR byte string.
#[derive(Clone)]
pub struct SignedEnvelope(Arc<EnvelopeBytes>);

struct EnvelopeBytes {
    bytes: Box<[u8]>,
    hash: OnceLock<ContentHash>,
}

impl PartialEq for SignedEnvelope {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.bytes == other.0.bytes
    }
}

impl Eq for SignedEnvelope {}

impl std::hash::Hash for SignedEnvelope {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.bytes.hash(state);
    }
}

impl Serialize for SignedEnvelope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0.bytes)
    }
}

impl<'de> Deserialize<'de> for SignedEnvelope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        Ok(SignedEnvelope::from_bytes(bytes.into_vec()))
    }
}

impl std::fmt::Debug for SignedEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedEnvelope({} bytes, {:?})", self.0.bytes.len(), self.hash())
    }
}

/// COSE header label of the algorithm (RFC 9052 §3.1).
const LABEL_ALG: u8 = 0x01;
/// COSE header label of the content type.
const LABEL_CONTENT_TYPE: u8 = 0x03;
/// COSE header label of the key id.
const LABEL_KID: u8 = 0x04;
/// CBOR of the EdDSA algorithm id, -8 (RFC 9053 §2.2).
const ALG_EDDSA: u8 = 0x27;

/// Appends the head of a CBOR item of `major` type with argument `len`, in the
/// shortest form (RFC 8949 §4.2.1), as `coset` and `ciborium` write it.
fn cbor_head(out: &mut Vec<u8>, major: u8, len: usize) {
    let m = major << 5;
    let len = len as u64;
    if len < 24 {
        out.push(m | len as u8);
    } else if len <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, len as u8]);
    } else if len <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else if len <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Bytes of a CBOR head with argument `len` (see [`cbor_head`]).
fn cbor_head_len(len: usize) -> usize {
    match len as u64 {
        0..24 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
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
        // The one layout this federation signs, written directly (what `coset` writes
        // for it, byte for byte: the golden files in tests/golden pin it, and
        // `sign_with_writes_what_coset_writes` compares the two):
        //   protected = {1: -8 (EdDSA), 3: content type (text), 4: key id (32 bytes)}
        //   Sig_structure = ["Signature1", protected, h'' (no external aad), payload]
        //   COSE_Sign1 = [protected, {} (unprotected), payload, signature], untagged
        let mut protected = Vec::with_capacity(6 + content_type.len() + 34);
        protected.extend_from_slice(&[0xa3, LABEL_ALG, ALG_EDDSA, LABEL_CONTENT_TYPE]);
        cbor_head(&mut protected, 3, content_type.len());
        protected.extend_from_slice(content_type.as_bytes());
        protected.push(LABEL_KID);
        cbor_head(&mut protected, 2, kid.0.len());
        protected.extend_from_slice(&kid.0);
        let protected_len = cbor_head_len(protected.len()) + protected.len();
        let payload_len = cbor_head_len(payload.len()) + payload.len();

        let mut tbs = Vec::with_capacity(1 + 11 + protected_len + 1 + payload_len);
        tbs.extend_from_slice(b"\x84\x6aSignature1");
        cbor_head(&mut tbs, 2, protected.len());
        tbs.extend_from_slice(&protected);
        tbs.push(0x40);
        cbor_head(&mut tbs, 2, payload.len());
        tbs.extend_from_slice(&payload);
        let sig = signature(&tbs);
        drop(tbs);

        let mut out = Vec::with_capacity(1 + protected_len + 1 + payload_len + cbor_head_len(sig.len()) + sig.len());
        out.push(0x84);
        cbor_head(&mut out, 2, protected.len());
        out.extend_from_slice(&protected);
        out.push(0xa0);
        cbor_head(&mut out, 2, payload.len());
        out.extend_from_slice(&payload);
        cbor_head(&mut out, 2, sig.len());
        out.extend_from_slice(&sig);
        Ok(SignedEnvelope::from_bytes(out))
    }

    /// Wraps bytes received from a peer; nothing is checked until [`Self::verify`].
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        SignedEnvelope(Arc::new(EnvelopeBytes { bytes: bytes.into_boxed_slice(), hash: OnceLock::new() }))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0.bytes
    }

    /// The content hash (BLAKE3) of the exact envelope bytes (computed once, shared by all clones).
    pub fn hash(&self) -> ContentHash {
        *self.0.hash.get_or_init(|| ContentHash::of(&self.0.bytes))
    }

    fn parse(&self) -> Result<(CoseSign1, PublicKey), Error> {
        let sign1 = CoseSign1::from_slice(self.as_bytes())
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
        if canonical != self.as_bytes() {
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
        let b = self.as_bytes();
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

    /// What `sign_with` wrote with `coset` before it wrote the layout directly.
    fn coset_envelope(kid: &PublicKey, content_type: &str, payload: Vec<u8>, sig: &[u8]) -> Vec<u8> {
        use coset::{CoseSign1Builder, HeaderBuilder};
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::EdDSA)
            .key_id(kid.0.to_vec())
            .content_type(content_type.to_owned())
            .build();
        let mut tbs = Vec::new();
        let sign1 = CoseSign1Builder::new()
            .protected(protected)
            .payload(payload)
            .create_signature(b"", |data| {
                tbs = data.to_vec();
                sig.to_vec()
            })
            .build();
        let payload = sign1.payload.clone().unwrap();
        let bytes = sign1.to_vec().unwrap();
        // The Sig_structure handed to the signer must be the same too.
        let ours = SignedEnvelope::sign_with(kid, content_type, payload, |data| {
            assert_eq!(data, tbs.as_slice(), "Sig_structure differs from coset's");
            sig.to_vec()
        })
        .unwrap();
        assert_eq!(ours.as_bytes(), bytes.as_slice());
        bytes
    }

    #[test]
    fn sign_with_writes_what_coset_writes() {
        let kid = PublicKey([0xab; 32]);
        let sig = [0x5a; 64];
        // Every CBOR head width for the payload, content types short and long.
        for len in [0, 1, 23, 24, 255, 256, 65_535, 65_536, 70_000] {
            for ct in [content_type::HOP, content_type::CUSTODY_RECEIPT, "x", &"t".repeat(300)] {
                let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                coset_envelope(&kid, ct, payload, &sig);
            }
        }
        // And a real Ed25519 signature through `sign`, which verifies.
        let key = SigningKey::from_bytes(&[3; 32]);
        let env = SignedEnvelope::sign(&key, content_type::REPORT, &"body").unwrap();
        assert_eq!(env.verify(content_type::REPORT).unwrap().0, PublicKey(key.verifying_key().to_bytes()));
    }

    #[test]
    fn clones_share_bytes_and_hash_and_compare_by_bytes() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let env = SignedEnvelope::sign(&key, content_type::HOP, &"hop").unwrap();
        let clone = env.clone();
        assert_eq!(clone.hash(), ContentHash::of(env.as_bytes()));
        assert_eq!(env.hash(), clone.hash());
        let copy = SignedEnvelope::from_bytes(env.as_bytes().to_vec());
        assert_eq!(copy, env, "equal bytes are equal envelopes, shared or not");
        let mut other = env.as_bytes().to_vec();
        *other.last_mut().unwrap() ^= 1;
        assert_ne!(SignedEnvelope::from_bytes(other), env);
        // On the wire it is a CBOR byte string of exactly its bytes.
        let cbor = crate::codec::to_cbor(&env).unwrap();
        let bytes: serde_bytes::ByteBuf = crate::codec::from_cbor(&cbor).unwrap();
        assert_eq!(bytes.as_slice(), env.as_bytes());
        assert_eq!(crate::codec::from_cbor::<SignedEnvelope>(&cbor).unwrap(), env);
    }

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
