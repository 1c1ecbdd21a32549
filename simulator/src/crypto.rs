//! The simulator's stand-in for Ed25519: a keyed hash in the signature's place.
//!
//! Every node the simulator runs is the real [`tiers::Node`], but signing and
//! checking hundreds of thousands of cases' envelopes with Ed25519 would cost most of
//! a run's time while deciding nothing: in a simulation nobody forges, so every
//! signature the core checks is valid either way. [`KeyedHashCrypto`] keeps
//! everything about an envelope except the cost: the same COSE_Sign1 bytes
//! (protected header with EdDSA, key id and content type; the payload), a 64-byte
//! "signature" in the same place, so envelopes, messages and link loads have the
//! same sizes; and `verify` still checks structure, content type and that the bytes
//! were signed under the key id they name, so a broken driver that altered an
//! envelope would still be caught. It is not a signature scheme (anyone who knows a
//! public key can "sign" for it) and must never leave the simulator.
//!
//! Most of what is left of the cost is checking and decoding the same envelope
//! again at every node it passes. So the nodes of one run share a [`Memo`], every
//! core's memory of opened envelopes ([`Crypto::recall_opened`]): the hashes of the
//! envelopes a core signed, or verified and decoded as its content type's body,
//! with that content type and the signer. A core that meets the exact bytes again
//! reads the payload in place, and does not decode envelopes it only keeps (a
//! trail's hops, findings); on a miss (the memo is bounded) it does the full check.
//! Same bytes, same answer. The cores keep no memory of their own (256 envelopes
//! per core were a third of the `china` day's heap).
//!
//! `telemed-sim run --crypto real` runs the same scenario with [`tiers::Ed25519Crypto`];
//! the trace hash is the same (see `tests/sim.rs`).

use federation_proto::{ContentHash, Error, PublicKey, SignedEnvelope, content_type};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex};
use tiers::Crypto;
use tiers::crypto::DigestHasher;

/// How many envelopes the memo remembers (~100 bytes each): as many as a table of
/// 2^20 slots holds (seven eighths); one more would double it to 2^21 slots.
pub const MEMO_LEN_MAX: usize = (1 << 20) / 8 * 7;

/// Envelopes the cores of this run signed or opened (verified and decoded as their
/// content type's body): hash → (content type, signer), oldest forgotten first.
#[derive(Debug, Default)]
pub struct Memo {
    opened: HashMap<ContentHash, (u8, PublicKey), BuildHasherDefault<DigestHasher>>,
    order: VecDeque<ContentHash>,
}

impl Memo {
    pub fn shared() -> Arc<Mutex<Memo>> {
        Arc::new(Mutex::new(Memo::default()))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn insert(&mut self, hash: ContentHash, ct: u8, signer: PublicKey) {
        // The same bytes name one content type and one key id: a known entry stays.
        if let std::collections::hash_map::Entry::Vacant(slot) = self.opened.entry(hash) {
            slot.insert((ct, signer));
            self.order.push_back(hash);
            if self.order.len() > MEMO_LEN_MAX
                && let Some(old) = self.order.pop_front()
            {
                self.opened.remove(&old);
            }
        }
    }
}

/// A small id for each content type the core uses (the memo stores no strings).
fn content_type_id(ct: &str) -> Option<u8> {
    [
        content_type::MANIFEST,
        content_type::HOP,
        content_type::FINDING,
        content_type::REPORT,
        content_type::CUSTODY_RECEIPT,
        content_type::REPORT_RECEIPT,
        content_type::ADVERT,
        content_type::RECALL,
    ]
    .iter()
    .position(|c| *c == ct)
    .map(|i| i as u8)
}

/// Which crypto the cores use in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CryptoMode {
    /// [`KeyedHashCrypto`]: same bytes, same decisions, ~100x cheaper.
    #[default]
    KeyedHash,
    /// Real Ed25519 COSE, as between real nodes.
    Real,
}

/// A deterministic, cheap stand-in for Ed25519 signatures (see the module docs).
pub struct KeyedHashCrypto {
    public_key: PublicKey,
    memo: Arc<Mutex<Memo>>,
}

impl KeyedHashCrypto {
    /// The stand-in for the node whose identity is `public_key`, sharing `memo`
    /// with the other nodes of the run.
    pub fn new(public_key: PublicKey, memo: Arc<Mutex<Memo>>) -> KeyedHashCrypto {
        KeyedHashCrypto { public_key, memo }
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The 64-byte stand-in signature of `data` (a COSE `Sig_structure`) under `key`:
/// SHA-256 over key and data (hardware-accelerated here, about twice as fast as
/// SHA-512 on these machines), then SHA-256 of that to fill the 64 bytes.
fn keyed_hash(key: &PublicKey, data: &[u8]) -> [u8; 64] {
    let mut h = Sha256::new();
    h.update(b"telemed-sim keyed-hash signature v2");
    h.update(key.0);
    h.update(data);
    let first: [u8; 32] = h.finalize().into();
    let second: [u8; 32] = Sha256::digest(first).into();
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&first);
    out[32..].copy_from_slice(&second);
    out
}

impl Crypto for KeyedHashCrypto {
    fn public_key(&self) -> PublicKey {
        self.public_key
    }

    fn sign(&self, content_type: &str, payload: Vec<u8>) -> Result<SignedEnvelope, Error> {
        // The core notes what it signs (`note_opened`) if it keeps it.
        SignedEnvelope::sign_with(&self.public_key, content_type, payload, |data| {
            keyed_hash(&self.public_key, data).to_vec()
        })
    }

    fn verify(&self, env: &SignedEnvelope, content_type: &str) -> Result<(PublicKey, Vec<u8>), Error> {
        env.verify_with(content_type, |signer, data, signature| {
            if signature == keyed_hash(signer, data).as_slice() { Ok(()) } else { Err(Error::BadSignature) }
        })
    }

    fn recall_opened(&self, hash: &ContentHash, content_type: &str) -> Option<PublicKey> {
        let ct = content_type_id(content_type)?;
        let (known_ct, signer) = self.memo().opened.get(hash).copied()?;
        (known_ct == ct).then_some(signer)
    }

    fn note_opened(&self, hash: &ContentHash, content_type: &'static str, signer: PublicKey) {
        if let Some(ct) = content_type_id(content_type) {
            self.memo().insert(*hash, ct, signer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_proto::codec::to_cbor;
    use federation_proto::content_type::{HOP, REPORT};

    #[test]
    fn keyed_hash_envelopes_have_the_size_of_real_ones_and_verify_only_unaltered() {
        let key = tiers::harness::key_for("county-0");
        let real = tiers::Ed25519Crypto::new(key);
        let sim = KeyedHashCrypto::new(real.public_key(), Memo::shared());
        let payload = to_cbor(&("case", 7u32)).unwrap();
        let a = sim.sign(HOP, payload.clone()).unwrap();
        let b = real.sign(HOP, payload).unwrap();
        assert_eq!(a.as_bytes().len(), b.as_bytes().len());
        assert_eq!(sim.verify(&a, HOP).unwrap().0, real.public_key());
        assert!(sim.verify(&a, REPORT).is_err(), "content type is checked");
        let mut bytes = a.as_bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(sim.verify(&SignedEnvelope::from_bytes(bytes), HOP).is_err(), "altered bytes are refused");
        // Another node of the run, and one of another run (no memo): same answers.
        let other = KeyedHashCrypto::new(PublicKey([9; 32]), sim.memo.clone());
        let fresh = KeyedHashCrypto::new(PublicKey([9; 32]), Memo::shared());
        for v in [&other, &fresh] {
            assert_eq!(v.verify(&a, HOP).unwrap(), sim.verify(&a, HOP).unwrap());
            assert!(v.verify(&a, REPORT).is_err());
        }
    }

    #[test]
    fn the_memo_recalls_only_envelopes_a_node_opened_and_only_under_their_content_type() {
        let sim = KeyedHashCrypto::new(PublicKey([3; 32]), Memo::shared());
        let env = sim.sign(HOP, to_cbor(&("case", 7u32)).unwrap()).unwrap();
        let hash = env.hash();
        assert_eq!(sim.recall_opened(&hash, HOP), None, "signed, but no core noted it yet");
        let other = KeyedHashCrypto::new(PublicKey([9; 32]), sim.memo.clone());
        other.note_opened(&hash, HOP, PublicKey([3; 32]));
        assert_eq!(sim.recall_opened(&hash, HOP), Some(PublicKey([3; 32])), "shared by the run's nodes");
        assert_eq!(sim.recall_opened(&hash, REPORT), None, "content type must match");
        let fresh = KeyedHashCrypto::new(PublicKey([9; 32]), Memo::shared());
        assert_eq!(fresh.recall_opened(&hash, HOP), None, "another run's memo knows nothing of it");
        // A note with another content type for the same bytes changes nothing.
        other.note_opened(&hash, REPORT, PublicKey([3; 32]));
        assert_eq!(sim.recall_opened(&hash, REPORT), None);
        assert_eq!(sim.memo().len(), 1);
    }
}
