//! Errors of the issuing side: CA directories, key files, CSRs, signing, revocation.
//!
//! Verification errors are [`crate::verify::VerifyError`]; this module is only about
//! what an administrator (or the node's `keygen`) asked for and why it was refused.

use crate::profile::{MalformedError, NameError, Serial};
use federation_proto::Tier;
use std::path::PathBuf;

/// Why an issuing-side operation failed. Grouped by cause: local files, refused
/// requests (policy), malformed input, internal failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    // --- local files -------------------------------------------------------------
    /// Reading or writing a file or directory failed.
    #[error("{action} `{}`: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key, certificate or CA file already exists; it is never overwritten.
    #[error(
        "refusing to overwrite `{}`: it already exists (move it away first if you really mean to replace it)",
        path.display()
    )]
    AlreadyExists { path: PathBuf },
    /// Another process holds the CA directory's lock.
    #[error(
        "CA directory is locked by `{}`: another telemed-ca is running on it (if none is, the lock is stale: remove the file)",
        path.display()
    )]
    Locked { path: PathBuf },
    /// A CA directory is incomplete or inconsistent.
    #[error("CA directory `{}` is not usable: {reason}", dir.display())]
    InvalidCaDir { dir: PathBuf, reason: String },

    // --- refused by policy -------------------------------------------------------
    /// The name (or sub-CA region) is not inside the CA's region.
    #[error("`{name}` is outside this CA's region `{region}`: a CA may only issue inside its own region")]
    OutsideRegion { name: String, region: String },
    /// The tier asked for is not strictly below the CA's tier.
    #[error("tier {requested} is not below this CA's tier {ca_tier}: a CA may only certify lower tiers")]
    TierNotBelowIssuer { requested: Tier, ca_tier: Tier },
    /// The CSR asks for a different tier than the administrator approved.
    #[error(
        "the CSR requests tier {in_csr} but {approved} was approved: re-run keygen with the right tier or approve the requested one"
    )]
    TierMismatch { in_csr: Tier, approved: Tier },
    /// A CA of this tier could not certify anything.
    #[error("no CA of tier {tier} can exist: it could only certify tiers below {tier}")]
    TierTooLowForCa { tier: Tier },
    /// The CA's path length constraint forbids issuing another CA below it.
    #[error("this CA's path length constraint forbids issuing sub-CAs")]
    PathLenExhausted,
    /// The CA certificate is not valid now.
    #[error("this CA's certificate is not valid now (valid {not_before} .. {not_after})")]
    CaNotValidNow { not_before: String, not_after: String },
    /// A request that makes no sense (empty name, empty validity, ...).
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    /// `revoke` named a serial this CA never issued.
    #[error("serial {serial} was not issued by this CA (see its index.json)")]
    UnknownSerial { serial: Serial },
    /// `revoke` named a serial that is already revoked.
    #[error("serial {serial} is already revoked")]
    AlreadyRevoked { serial: Serial },

    // --- malformed input ---------------------------------------------------------
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error(transparent)]
    Malformed(#[from] MalformedError),
    /// The CSR's signature does not verify, or it does not follow the profile.
    #[error("certificate signing request refused: {reason}")]
    InvalidCsr { reason: String },
    /// A private key file could not be used.
    #[error("private key refused: {reason}")]
    InvalidKey { reason: String },

    // --- internal ----------------------------------------------------------------
    /// rcgen refused to build or sign something.
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
    /// The index file could not be read or written as JSON.
    #[error("index `{}` is not valid: {source}", path.display())]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl CaError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CaError::Io { action, path: path.into(), source }
    }
}
