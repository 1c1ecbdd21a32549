//! A fixed, fast hash for the engine's lookup tables (node index pairs, case ids,
//! node names): FxHash's multiply-and-rotate over 8-byte words.
//!
//! The standard `HashMap` hashes with SipHash under a random key, which is built to
//! resist hash flooding by an adversary; the simulator's keys come from its own
//! topology and seeded RNG, so there is no adversary, and SipHash was a visible share
//! of a run. No map using this may be iterated where order could reach the trace:
//! the engine only looks keys up (as it did with the randomly keyed hasher).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// FxHash (as in rustc): not for keys an adversary chooses.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_map_finds_what_it_holds_and_spreads_pairs() {
        let mut m: FastMap<(u32, u32), u64> = FastMap::default();
        for a in 0..300u32 {
            for b in 0..3u32 {
                m.insert((a, b), u64::from(a * 10 + b));
            }
        }
        assert_eq!(m.len(), 900);
        assert_eq!(m.get(&(299, 2)), Some(&2992));
        assert_eq!(m.get(&(300, 0)), None);
        // Different pairs give different hashes (no collapse of one coordinate).
        let h = |k: (u32, u32)| std::hash::BuildHasher::hash_one(&BuildHasherDefault::<FastHasher>::default(), k);
        assert_ne!(h((1, 2)), h((2, 1)));
        assert_ne!(h((0, 1)), h((0, 2)));
    }
}
