//! The signing seam: how a node signs what it makes and checks what it receives.
//!
//! [`Node`](crate::Node) never touches a key directly; it asks a [`Crypto`] to sign a
//! payload under a content type and to verify an envelope. The default,
//! [`Ed25519Crypto`], is the real thing: COSE_Sign1 with Ed25519 exactly as
//! [`SignedEnvelope::sign`] and [`SignedEnvelope::verify`] make and check it. Other
//! implementations (a hardware key; a simulator's cheap deterministic stand-in) plug
//! in through [`Node::with_crypto`](crate::Node::with_crypto), in the way
//! `quinn-proto` takes its crypto session.
//!
//! Also here: [`VerifiedEnvelopes`], the bounded memory of envelopes a node has
//! already verified, so a case's trail and findings are checked once per node and
//! not on every message that carries them.
//!
//! This module must never read a clock, do I/O or use an unseeded random source.

use ed25519_dalek::SigningKey;
use federation_proto::{ContentHash, Error, PublicKey, SignedEnvelope};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Signs and verifies COSE_Sign1 envelopes for one node.
///
/// Contract: `verify` accepts an envelope only if it is well formed, carries
/// `content_type`, and its signature was made by the key its key id names, as this
/// implementation defines "made by"; it returns that key and the raw payload, which
/// the caller decodes only afterwards. `sign` makes envelopes that `verify` (of any
/// instance of the same implementation) accepts, naming [`Crypto::public_key`].
pub trait Crypto: Send + Sync {
    /// This node's public key (the key id of everything it signs).
    fn public_key(&self) -> PublicKey;
    /// Signs an encoded `payload` under `content_type`.
    fn sign(&self, content_type: &str, payload: Vec<u8>) -> Result<SignedEnvelope, Error>;
    /// Checks structure, content type and signature; returns the signer and the
    /// payload, not decoded.
    fn verify(&self, env: &SignedEnvelope, content_type: &str) -> Result<(PublicKey, Vec<u8>), Error>;
    /// [`Crypto::verify`] for a caller that already computed `hash`, the envelope's
    /// [`SignedEnvelope::hash`] (the node does, for its own memory of verified
    /// envelopes). An implementation that keys anything by that hash can skip
    /// hashing again; by default the hash is ignored.
    fn verify_hashed(
        &self,
        env: &SignedEnvelope,
        hash: &ContentHash,
        content_type: &str,
    ) -> Result<(PublicKey, Vec<u8>), Error> {
        let _ = hash;
        self.verify(env, content_type)
    }
    /// A memory of opened envelopes that reaches beyond one node (e.g. every node of
    /// one simulated run shares it): the signer of these exact bytes (`hash` is their
    /// [`SignedEnvelope::hash`]) if a node told [`Crypto::note_opened`] that they
    /// verified under `content_type` and decoded as that content type's body (or
    /// that it signed them). The node then neither verifies nor decodes them again,
    /// as for a hit in its own [`VerifiedEnvelopes`]. By default there is no such
    /// memory: `None`.
    fn recall_opened(&self, hash: &ContentHash, content_type: &str) -> Option<PublicKey> {
        let _ = (hash, content_type);
        None
    }
    /// The node verified and decoded these bytes under `content_type`, or signed
    /// them: an implementation with a shared memory (see [`Crypto::recall_opened`])
    /// remembers it. By default nothing is kept.
    fn note_opened(&self, hash: &ContentHash, content_type: &'static str, signer: PublicKey) {
        let _ = (hash, content_type, signer);
    }
}

/// The real crypto: Ed25519 COSE_Sign1, as on the wire between real nodes.
pub struct Ed25519Crypto {
    key: SigningKey,
    public_key: PublicKey,
}

impl Ed25519Crypto {
    pub fn new(key: SigningKey) -> Ed25519Crypto {
        let public_key = PublicKey(key.verifying_key().to_bytes());
        Ed25519Crypto { key, public_key }
    }
}

impl Crypto for Ed25519Crypto {
    fn public_key(&self) -> PublicKey {
        self.public_key
    }

    fn sign(&self, content_type: &str, payload: Vec<u8>) -> Result<SignedEnvelope, Error> {
        use ed25519_dalek::Signer;
        SignedEnvelope::sign_with(&self.public_key, content_type, payload, |data| {
            self.key.sign(data).to_bytes().to_vec()
        })
    }

    fn verify(&self, env: &SignedEnvelope, content_type: &str) -> Result<(PublicKey, Vec<u8>), Error> {
        env.verify(content_type)
    }
}

/// Envelopes this node verified (or signed) itself, by hash, with the content type
/// they were checked against and their signer; the oldest are forgotten first. An
/// envelope's hash covers its exact bytes, signature included, so a hit means
/// "these very bytes verified here before": the caller may then read the payload
/// in place ([`SignedEnvelope::payload_range`]) without parsing or checking again.
#[derive(Debug, Clone)]
pub struct VerifiedEnvelopes {
    /// Keys are BLAKE3 values, so their leading bytes already are a good hash
    /// (nothing here depends on an unseeded random source; the map is never iterated).
    seen: HashMap<ContentHash, (&'static str, PublicKey), BuildHasherDefault<DigestHasher>>,
    order: VecDeque<ContentHash>,
    len_max: usize,
}

/// A `Hasher` for keys that are cryptographic digests: it keeps (a mix of) the
/// first eight bytes of each write instead of hashing all of them again.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
    }
}

impl VerifiedEnvelopes {
    pub fn new(len_max: usize) -> VerifiedEnvelopes {
        VerifiedEnvelopes { seen: HashMap::default(), order: VecDeque::new(), len_max }
    }

    /// The signer, if these bytes verified here under `content_type`.
    pub fn get(&self, hash: &ContentHash, content_type: &str) -> Option<PublicKey> {
        self.seen.get(hash).filter(|(ct, _)| *ct == content_type).map(|(_, signer)| *signer)
    }

    /// Remembers that `hash` verified under `content_type` as signed by `signer`,
    /// forgetting the oldest entry when full.
    pub fn insert(&mut self, hash: ContentHash, content_type: &'static str, signer: PublicKey) {
        if self.len_max == 0 || self.seen.insert(hash, (content_type, signer)).is_some() {
            return;
        }
        self.order.push_back(hash);
        if self.order.len() > self.len_max
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        debug_assert_eq!(self.seen.len(), self.order.len());
        debug_assert!(self.order.len() <= self.len_max);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_envelopes_forget_the_oldest_beyond_the_limit() {
        let mut v = VerifiedEnvelopes::new(2);
        let h = |b: u8| ContentHash::of(&[b]);
        let (ct, key) = (federation_proto::content_type::HOP, PublicKey([1; 32]));
        v.insert(h(1), ct, key);
        v.insert(h(2), ct, key);
        v.insert(h(1), ct, key); // already known: no reordering, no growth
        v.insert(h(3), ct, key);
        assert_eq!(v.get(&h(1), ct), None);
        assert_eq!(v.get(&h(2), ct), Some(key));
        assert_eq!(v.get(&h(3), federation_proto::content_type::REPORT), None, "content type must match");
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn ed25519_crypto_makes_the_envelope_sign_makes() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let crypto = Ed25519Crypto::new(key.clone());
        let body = ("case", 42u32);
        let ct = federation_proto::content_type::HOP;
        let a = crypto.sign(ct, federation_proto::codec::to_cbor(&body).unwrap()).unwrap();
        let b = SignedEnvelope::sign(&key, ct, &body).unwrap();
        assert_eq!(a, b);
        let (signer, _) = crypto.verify(&a, ct).unwrap();
        assert_eq!(signer, crypto.public_key());
        assert!(crypto.verify(&a, federation_proto::content_type::REPORT).is_err());
    }
}
