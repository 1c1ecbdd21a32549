//! The binary codec: CBOR (RFC 8949) via serde, in length-prefixed frames.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one CBOR
//! item. The length is checked against [`FRAME_LEN_MAX`] *before* anything is
//! allocated or read, and decoding refuses trailing bytes, so a frame means exactly
//! one message. Decoding never panics, whatever the bytes (property-tested).
//!
//! This module must never read from a socket or file itself: callers hand it bytes.

use crate::Error;
use crate::messages::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Hard upper bound on one frame's payload, in bytes (1 MiB). Attachment chunks
/// are at most [`CHUNK_LEN_MAX`], so every legitimate message fits well inside.
pub const FRAME_LEN_MAX: usize = 1024 * 1024;
/// Largest attachment chunk a node requests or serves (256 KiB).
pub const CHUNK_LEN_MAX: u32 = 256 * 1024;
/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;
/// Nesting depth at which CBOR decoding gives up (no message nests this deep).
const RECURSION_LIMIT: usize = 64;

/// Encodes any serde value as CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes one CBOR item that must span all of `bytes`.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.len() > FRAME_LEN_MAX {
        return Err(Error::FrameTooLarge { len: bytes.len() as u64, max: FRAME_LEN_MAX });
    }
    let mut reader = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, RECURSION_LIMIT).map_err(decode_error)?;
    if !reader.is_empty() {
        return Err(Error::TrailingBytes { extra: reader.len() });
    }
    Ok(value)
}

/// Says in words what is wrong with the bytes. ciborium's own `Display` is its
/// `Debug` (`Semantic(None, "...")`), which is no message for a log or a peer.
fn decode_error<E>(e: ciborium::de::Error<E>) -> Error {
    use ciborium::de::Error as E;
    match e {
        // Reading from a slice fails only when the slice ends.
        E::Io(_) => Error::Truncated,
        E::Syntax(at) => Error::Decode(format!("invalid CBOR at byte {at}")),
        E::Semantic(Some(at), why) => Error::Decode(format!("{why} (item at byte {at})")),
        E::Semantic(None, why) => Error::Decode(why),
        E::RecursionLimitExceeded => Error::Decode(format!("nested deeper than {RECURSION_LIMIT} levels")),
    }
}

/// Encodes a message as a frame payload (no length prefix).
pub fn encode(msg: &Message) -> Result<Vec<u8>, Error> {
    let bytes = to_cbor(msg)?;
    if bytes.len() > FRAME_LEN_MAX {
        return Err(Error::FrameTooLarge { len: bytes.len() as u64, max: FRAME_LEN_MAX });
    }
    Ok(bytes)
}

/// Decodes a frame payload (no length prefix) into a message.
pub fn decode(payload: &[u8]) -> Result<Message, Error> {
    from_cbor(payload)
}

/// Encodes a message as a complete frame: length prefix and payload.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, Error> {
    let payload = encode(msg)?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Reads a frame header and returns the payload length, refusing one over the limit.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, Error> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_LEN_MAX {
        return Err(Error::FrameTooLarge { len: len as u64, max: FRAME_LEN_MAX });
    }
    Ok(len)
}

/// Decodes one frame from the front of `buf`. Returns `Ok(None)` when more bytes are
/// needed, or the message and the number of bytes it used.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, Error> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header)?;
    let Some(payload) = buf[FRAME_HEADER_LEN..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode(payload)?, FRAME_HEADER_LEN + len)))
}
