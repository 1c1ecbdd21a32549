//! Federation PKI: issue node and CA certificates, verify peers, revoke.
//!
//! This crate is the federation's certificate authority tooling and the verification
//! every link relies on. It knows one certificate profile (see `docs/pki.md` at the
//! repository's top level):
//!
//! - a federation **root** CA (`telemed-ca init`), optionally tier-limited;
//! - **intermediate** CAs down the hierarchy, each limited to a region with X.509
//!   name constraints and to tiers strictly below its own with the tier extension;
//! - **node** certificates that name the node (a hierarchical DNS-style name), carry
//!   its tier and its one Ed25519 key (the same key signs its messages and is its
//!   libp2p identity).
//!
//! Map of the crate:
//! - [`profile`]: the certificate profile — OIDs, the tier extension, name rules,
//!   serial numbers, and a tolerant parser ([`profile::CertSummary`]) for display.
//! - [`keys`]: Ed25519 keys, private-key files (mode 0600, never overwritten), the
//!   node's credentials for rustls, PeerId derivation.
//! - [`enrol`]: the node side of enrolment: key + CSR generation, CSR parsing.
//! - [`ca`]: the issuing side: a CA directory, signing CSRs, intermediates, revocation
//!   and CRLs, with an index of everything issued.
//! - [`inspect`]: human-readable reports of certificates, CSRs and CRLs.
//! - [`verify`]: the trust store, CRL loading, the full chain/tier/region check that
//!   yields a [`verify::PeerIdentity`], and the rustls verifiers for both link ends.
//!
//! Architecture invariants:
//! - `certs` never opens a socket. In [`verify`] every check takes the time as an
//!   argument (`*_at`, `identity_from_chain(.., now)`; the rustls verifiers get it from
//!   rustls); only the convenience wrappers documented as such read the system clock.
//! - Private keys never leave the process that generated them: a CA signs CSRs, it
//!   never generates node keys.
//! - Nothing read from a peer or a file is trusted before it has been checked; no
//!   function panics on malformed input.

pub mod ca;
pub mod enrol;
pub mod error;
pub mod inspect;
pub mod keys;
pub mod profile;
pub mod verify;

pub use error::CaError;
pub use verify::{FederationVerifier, PeerIdentity, TrustStore, VerifyError, check_parent_link};
