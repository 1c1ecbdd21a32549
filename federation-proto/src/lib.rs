//! Wire protocol of the telemedicine federation: the messages of a case's life,
//! their binary codec with hard size limits, and signed envelopes.
//!
//! This is the only crate that knows the bytes on the wire. It is pure: it must
//! never depend on an async runtime, socket, database or ML crate, never read a
//! clock, and never panic on bytes from a peer.

pub mod codec;
pub mod envelope;
pub mod messages;
pub mod types;

pub use codec::{FRAME_LEN_MAX, decode, decode_frame, encode, encode_frame};
pub use envelope::{SignedEnvelope, Verified, content_type};
pub use messages::*;
pub use types::*;

/// Everything that can go wrong encoding, decoding or verifying, grouped by cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Peer misbehaved: a frame longer than the limit. Also returned when encoding
    /// a message too large to send (local misuse).
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: u64, max: usize },
    /// Peer misbehaved: the bytes end in the middle of a message.
    #[error("truncated message: the bytes end before the message does")]
    Truncated,
    /// Peer misbehaved or is incompatible: bytes that are not a valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    /// Peer misbehaved: bytes after the end of the message.
    #[error("{extra} unexpected bytes after the end of the message")]
    TrailingBytes { extra: usize },
    /// Invalid signature envelope (structure, algorithm, key id or content type).
    #[error("bad signed envelope: {0}")]
    BadEnvelope(String),
    /// The signature does not verify under the key it names.
    #[error("signature does not verify")]
    BadSignature,
    /// Signed correctly, but by another key than the one expected.
    #[error("signed by {found:?}, expected {expected:?}")]
    UnexpectedSigner { expected: PublicKey, found: PublicKey },
    /// Local misuse: a value that cannot be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl Error {
    /// The wire code a peer receives when this error refuses its message.
    pub fn reject_code(&self) -> RejectCode {
        match self {
            Error::BadSignature | Error::UnexpectedSigner { .. } => RejectCode::BadSignature,
            _ => RejectCode::Malformed,
        }
    }
}
