//! The telemedicine federation node: the daemon hospitals and clinics run, its
//! client commands, and the demo federation.
//!
//! `node` drives the sans-IO core in `tiers` with real I/O. It is the only crate
//! that may touch sockets, databases, ML runtimes and the web UI. It must never
//! make an escalation decision itself: every decision goes through `tiers::Node`,
//! and every state change the UI asks for goes through the core's inputs.

pub mod atna;
pub mod atna_sender;
pub mod blobs;
pub mod chunk_index;
pub mod config;
pub mod control;
pub mod control_plane;
pub mod daemon;
pub mod deid;
pub mod deid_table;
pub mod demo;
pub mod disk_guard;
pub mod fhir;
pub mod fhir_auth;
pub mod ingest;
pub mod load;
pub mod loadgen;
#[cfg(feature = "models")]
pub mod models;
pub mod readers;
pub mod scrub;
pub mod store;
pub mod transfer;
pub mod transport;
pub mod triage;
pub mod view;
pub mod web;
