//! The sans-IO escalation core of the telemedicine federation.
//!
//! [`Node`] is one node's decision logic as a state machine: cases come in
//! (submitted, offered by a child, reported from above), and out come the things to
//! do (persist, send, run a model, notify). The real node (`node` crate) and the
//! simulator both drive this one state machine, so what the simulator predicts is
//! what the network does.
//!
//! This crate must never do I/O, read a clock, use an unseeded random source, or
//! depend on an async runtime, socket, database or ML crate.

pub mod capacity;
pub mod case;
pub mod crypto;
pub mod harness;
pub mod node;
pub mod policy;
pub mod store;

pub use capacity::{ExpertPool, KnownAdvert, ModelSpec};
pub use case::{CaseRecord, CaseStatus, ReportDown};
pub use crypto::{Crypto, Ed25519Crypto};
pub use federation_proto::{Modality, Tier, Urgency};
pub use node::{
    ActionError, Event, ModelOutcome, NewCase, Node, NodeConfig, Output, Peer, PeerError, ReportDraft, Upstream,
};
pub use policy::{DeadlinePolicy, Limits, PrivacyPolicy, RetryPolicy};
pub use store::{Change, MemStore, Store};
