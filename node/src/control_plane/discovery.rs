//! Finding other federation nodes, and choosing an alternate parent among them.
//!
//! Peers are found from the configured bootstrap addresses and then through
//! Kademlia (the routing table maps PeerIds to addresses; `bootstrap` walks it), so
//! every node ends up connected to, and gossiping with, the admitted federation.
//! What a node is (name, tier, region) comes from its verified certificate, and what
//! it can do and where its data plane listens from its signed adverts: the
//! [`Directory`] keeps the latest of each per node.
//!
//! [`choose_alternate`] is the rule the daemon applies when its parent is gone: an
//! admitted node that advertises recently, is of a higher tier, and whose region
//! contains this node (the same rule its data plane will enforce when accepting us,
//! [`certs::check_parent_link`]); the lowest such tier first, then by name.
//! This module must never dial or send anything itself.

use super::gossip::VerifiedAdvert;
use certs::verify::{PeerIdentity, check_parent_link};
use federation_proto::{CapacityAdvert, Millis, NodeName};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Nodes known from verified adverts, at most this many (the oldest advert goes).
pub const DIRECTORY_LEN_MAX: usize = 4096;

/// What this node knows of another, from its latest verified advert.
#[derive(Debug, Clone)]
pub struct DirectoryEntry {
    pub identity: PeerIdentity,
    pub advert: CapacityAdvert,
    pub data_addr: Option<SocketAddr>,
}

/// Other nodes of the federation, by name.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: BTreeMap<NodeName, DirectoryEntry>,
}

impl Directory {
    /// Records a verified advert (an older one than held is ignored).
    pub fn record(&mut self, v: &VerifiedAdvert) {
        if let Some(old) = self.entries.get(&v.origin.name)
            && old.advert.issued_at > v.advert.issued_at
        {
            return;
        }
        if self.entries.len() >= DIRECTORY_LEN_MAX && !self.entries.contains_key(&v.origin.name) {
            let oldest = self.entries.iter().min_by_key(|(_, e)| e.advert.issued_at).map(|(n, _)| n.clone());
            if let Some(name) = oldest {
                self.entries.remove(&name);
            }
        }
        self.entries.insert(
            v.origin.name.clone(),
            DirectoryEntry { identity: v.origin.clone(), advert: v.advert.clone(), data_addr: v.data_addr },
        );
    }

    /// Forgets a node (e.g. its certificate was revoked).
    pub fn forget(&mut self, name: &NodeName) {
        self.entries.remove(name);
    }

    pub fn get(&self, name: &NodeName) -> Option<&DirectoryEntry> {
        self.entries.get(name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &DirectoryEntry> {
        self.entries.values()
    }
}

/// The alternate parent for `me` among the directory's fresh entries, excluding
/// `exclude` (the parents already configured or tried).
pub fn choose_alternate<'a>(
    me: &PeerIdentity,
    directory: &'a Directory,
    exclude: &[NodeName],
    now: Millis,
) -> Option<&'a DirectoryEntry> {
    directory
        .iter()
        .filter(|e| e.advert.valid_until > now && e.data_addr.is_some())
        .filter(|e| e.identity.tier > me.tier && !exclude.contains(&e.identity.name))
        .filter(|e| check_parent_link(&e.identity, me, &[]).is_ok())
        .min_by(|a, b| (a.identity.tier, &a.identity.name).cmp(&(b.identity.tier, &b.identity.name)))
}
