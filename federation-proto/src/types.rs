//! The shared vocabulary of the federation: tiers, modalities, urgencies, identifiers.
//!
//! These types are on the wire, so they live here; `tiers` re-exports them.
//! This module must never grow behaviour that depends on a clock or on I/O.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The seven tiers of the federation, lowest first. `Ord` follows the hierarchy:
/// `Tier::Village < Tier::Township < ... < Tier::International`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Village,
    Township,
    County,
    City,
    Provincial,
    National,
    International,
}

impl Tier {
    pub const ALL: [Tier; 7] = [
        Tier::Village,
        Tier::Township,
        Tier::County,
        Tier::City,
        Tier::Provincial,
        Tier::National,
        Tier::International,
    ];

    /// The tier directly above, or `None` at the top.
    pub fn parent(self) -> Option<Tier> {
        Tier::ALL.get(self as usize + 1).copied()
    }

    /// Stable lowercase name, as used in configs and certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Village => "village",
            Tier::Township => "township",
            Tier::County => "county",
            Tier::City => "city",
            Tier::Provincial => "provincial",
            Tier::National => "national",
            Tier::International => "international",
        }
    }

    /// Numeric level 0 (village) ..= 6 (international); stable, used in certificates.
    pub fn level(self) -> u8 {
        self as u8
    }

    pub fn from_level(level: u8) -> Option<Tier> {
        Tier::ALL.get(level as usize).copied()
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Tier {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownName { kind: "tier", name: s.to_owned() })
    }
}

/// A name that does not denote any known tier, modality or urgency.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{name}`")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
}

/// What kind of material a case carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Ecg,
    Imaging,
    Pathology,
}

impl Modality {
    pub const ALL: [Modality; 3] = [Modality::Ecg, Modality::Imaging, Modality::Pathology];
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Ecg => "ecg",
            Modality::Imaging => "imaging",
            Modality::Pathology => "pathology",
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Modality {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Modality::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownName { kind: "modality", name: s.to_owned() })
    }
}

/// How soon a report is needed. `Ord`: `Stat < Urgent < Routine` (most urgent first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Urgency {
    Stat,
    Urgent,
    Routine,
}

impl Urgency {
    pub const ALL: [Urgency; 3] = [Urgency::Stat, Urgency::Urgent, Urgency::Routine];
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::Stat => "stat",
            Urgency::Urgent => "urgent",
            Urgency::Routine => "routine",
        }
    }
}

impl fmt::Display for Urgency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Urgency {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Urgency::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownName { kind: "urgency", name: s.to_owned() })
    }
}

/// A case identifier: 16 random bytes chosen by the origin. Shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CaseId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl fmt::Display for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaseId({self})")
    }
}

impl std::str::FromStr for CaseId {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)?;
        Ok(CaseId(out))
    }
}

/// The federation's content hash: BLAKE3 (256-bit output) of some bytes.
/// Attachments are addressed by it, chunks are checked with it, and a signed
/// envelope is identified by it. BLAKE3 rather than SHA-256 because a node hashes
/// every attachment byte twice on receipt (each chunk, then the whole file) and
/// BLAKE3 is about four times faster here (ADR 0012).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContentHash(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }
}

/// The content hash of bytes that arrive in pieces: `update` with each piece in
/// order, then `finalize` gives what [`ContentHash::of`] gives for all of them.
#[derive(Debug, Clone, Default)]
pub struct ContentHasher(blake3::Hasher);

impl ContentHasher {
    pub fn new() -> ContentHasher {
        ContentHasher::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finalize(&self) -> ContentHash {
        ContentHash(*self.0.finalize().as_bytes())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{self}")
    }
}

impl std::str::FromStr for ContentHash {
    type Err = hex::FromHexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.strip_prefix("blake3:").unwrap_or(s), &mut out)?;
        Ok(ContentHash(out))
    }
}

/// A node's Ed25519 public key: the same key is in its certificate, signs its
/// messages and is its libp2p identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{self}")
    }
}

/// Milliseconds since the Unix epoch (or since a simulation's epoch). The core never
/// reads a clock: every time it sees arrives as one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub fn saturating_add(self, d: u64) -> Millis {
        Millis(self.0.saturating_add(d))
    }
    pub fn saturating_sub(self, other: Millis) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A hierarchical node name, most specific label first, e.g.
/// `v017.gaocheng.dengfeng.zhengzhou.henan.cn`. A region is a name suffix.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeName(pub String);

impl NodeName {
    pub fn new(s: impl Into<String>) -> NodeName {
        NodeName(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether this name lies inside `region` (equal to it, or ending in `.region`).
    pub fn is_within(&self, region: &str) -> bool {
        region.is_empty()
            || self.0 == region
            || (self.0.len() > region.len()
                && self.0.ends_with(region)
                && self.0.as_bytes()[self.0.len() - region.len() - 1] == b'.')
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<&str> for NodeName {
    fn from(s: &str) -> Self {
        NodeName(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_is_blake3_and_a_hasher_fed_in_pieces_agrees_with_it() {
        // BLAKE3's published values for "" and "abc" (the reference test vectors).
        assert_eq!(
            ContentHash::of(b"").to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            ContentHash::of(b"abc").to_string(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for cut in [0, 1, 1024, 65_537, 262_144, 299_999] {
            let mut h = ContentHasher::new();
            h.update(&bytes[..cut]);
            h.update(&bytes[cut..]);
            assert_eq!(h.finalize(), ContentHash::of(&bytes), "cut at {cut}");
        }
        let hash = ContentHash::of(b"abc");
        assert_eq!(format!("{hash:?}"), format!("blake3:{hash}"));
        assert_eq!(format!("{hash:?}").parse::<ContentHash>().unwrap(), hash);
        assert_eq!(hash.to_string().parse::<ContentHash>().unwrap(), hash);
    }

    #[test]
    fn tiers_are_ordered_village_to_international() {
        assert!(Tier::Village < Tier::Township);
        assert!(Tier::National < Tier::International);
        assert_eq!(Tier::County.parent(), Some(Tier::City));
        assert_eq!(Tier::International.parent(), None);
        assert_eq!("Provincial".parse::<Tier>().unwrap(), Tier::Provincial);
        assert!("hamlet".parse::<Tier>().is_err());
    }

    #[test]
    fn region_is_a_label_suffix() {
        let n = NodeName::from("v017.gaocheng.dengfeng.henan.cn");
        assert!(n.is_within("henan.cn"));
        assert!(n.is_within("v017.gaocheng.dengfeng.henan.cn"));
        assert!(!n.is_within("nan.cn"));
        assert!(!n.is_within("hubei.cn"));
    }
}
