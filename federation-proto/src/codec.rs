//! The binary codec: CBOR (RFC 8949) via serde, in length-prefixed frames.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one CBOR
//! item. The length is checked against [`FRAME_LEN_MAX`] *before* anything is
//! allocated or read, and decoding refuses trailing bytes, so a frame means exactly
//! one message. Decoding never panics, whatever the bytes (property-tested).
//!
//! This module must never read from a socket or file itself: callers hand it bytes.

use crate::Error;
use crate::messages::{ChunkResponse, Message};
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

/// Encodes a `ChunkResponse` frame without passing its data through the CBOR
/// encoder: returns the frame's first bytes (length prefix, CBOR up to and including
/// the data's byte-string header); the complete frame is these bytes followed by
/// `resp.data`. Byte for byte what [`encode_frame`] gives for
/// `Message::ChunkResponse(resp)` (tested), with two copies of the data fewer.
pub fn chunk_response_frame_head(resp: &ChunkResponse) -> Result<Vec<u8>, Error> {
    let empty = ChunkResponse {
        hash: resp.hash,
        offset: resp.offset,
        total_size: resp.total_size,
        chunk_hash: resp.chunk_hash,
        data: Vec::new(),
    };
    let mut payload = to_cbor(&Message::ChunkResponse(empty))?;
    // `data` is the last field of the last (only) variant's map: an empty byte string.
    if payload.pop() != Some(EMPTY_BYTES) {
        return Err(Error::Encode("chunk_response does not end with its data".into()));
    }
    push_bytes_header(&mut payload, resp.data.len() as u64);
    let len = payload.len() + resp.data.len();
    if len > FRAME_LEN_MAX {
        return Err(Error::FrameTooLarge { len: len as u64, max: FRAME_LEN_MAX });
    }
    let mut head = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    head.extend_from_slice(&(len as u32).to_be_bytes());
    head.extend_from_slice(&payload);
    Ok(head)
}

/// Where the data of a `ChunkResponse` payload of `len` bytes starts, read from the
/// payload's first bytes `prefix`: the length of the head to pass to
/// [`decode_split`], so that a reader can put the data straight into a buffer of its
/// own. `None` when the payload is not a chunk response whose last item is the
/// `data` byte string ending the payload, or when its head is longer than `prefix`
/// (a reader then reads the whole payload and calls [`decode`]).
pub fn chunk_response_head_len(prefix: &[u8], len: usize) -> Option<usize> {
    chunk_response_data_at(prefix, len).map(|(_, data_at)| data_at)
}

/// Decodes the payload `head` followed by `rest` exactly as [`decode`] decodes the
/// two joined: accepts and refuses the same bytes, wherever they are split (tested).
/// When `head` is a `ChunkResponse` up to its data ([`chunk_response_head_len`]),
/// `rest` becomes the response's data without being copied, through CBOR or
/// otherwise: only the head is decoded, with an empty byte string in place of the
/// data. Anything else is joined and decoded by [`decode`].
pub fn decode_split(head: &[u8], rest: Vec<u8>) -> Result<Message, Error> {
    let len = head.len() + rest.len();
    if let Some((value_at, data_at)) = chunk_response_data_at(head, len)
        && data_at == head.len()
    {
        let mut fields = Vec::with_capacity(value_at + 1);
        fields.extend_from_slice(&head[..value_at]);
        fields.push(EMPTY_BYTES);
        if let Ok(Message::ChunkResponse(mut resp)) = decode(&fields)
            && resp.data.is_empty()
        {
            resp.data = rest;
            return Ok(Message::ChunkResponse(resp));
        }
        // Refused (or not what the walk saw): the plain decoder says why.
    }
    let mut payload = Vec::with_capacity(len);
    payload.extend_from_slice(head);
    payload.extend_from_slice(&rest);
    decode(&payload)
}

/// CBOR's empty byte string.
const EMPTY_BYTES: u8 = 0x40;

fn push_bytes_header(out: &mut Vec<u8>, len: u64) {
    // The shortest form, as ciborium writes it.
    match len {
        0..=23 => out.push(EMPTY_BYTES | len as u8),
        24..=0xff => out.extend_from_slice(&[0x58, len as u8]),
        0x100..=0xffff => {
            out.push(0x59);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0x5a);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
        _ => {
            out.push(0x5b);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
}

/// If a payload of `len` bytes that starts with `payload` (all of it or a prefix) is
/// `{"chunk_response": {..., "data": <bytes>}}` with the data's definite-length byte
/// string ending the payload: where that value starts and where its bytes start.
/// `None` for anything else, or if the data's header is not within `payload` (then
/// the plain decoder runs).
fn chunk_response_data_at(payload: &[u8], len: usize) -> Option<(usize, usize)> {
    let mut at = 0;
    let (major, n) = head(payload, &mut at)?;
    if major != 5 || n != 1 {
        return None;
    }
    if text(payload, &mut at)? != b"chunk_response" {
        return None;
    }
    let (major, pairs) = head(payload, &mut at)?;
    if major != 5 || pairs == 0 {
        return None;
    }
    for _ in 0..pairs - 1 {
        skip(payload, &mut at, 0)?;
        skip(payload, &mut at, 0)?;
    }
    if text(payload, &mut at)? != b"data" {
        return None;
    }
    let value_at = at;
    let (major, data_len) = head(payload, &mut at)?;
    (major == 2 && len.checked_sub(at)? as u64 == data_len).then_some((value_at, at))
}

/// Reads an item's initial byte and argument: (major type, argument). Refuses
/// indefinite lengths and reserved values (the plain decoder then decides).
fn head(buf: &[u8], at: &mut usize) -> Option<(u8, u64)> {
    let first = *buf.get(*at)?;
    *at += 1;
    let (major, info) = (first >> 5, first & 0x1f);
    let n = match info {
        0..=23 => u64::from(info),
        24..=27 => {
            let len = 1usize << (info - 24);
            let bytes = buf.get(*at..*at + len)?;
            *at += len;
            bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
        _ => return None,
    };
    Some((major, n))
}

fn text<'a>(buf: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let (major, len) = head(buf, at)?;
    if major != 3 {
        return None;
    }
    let end = at.checked_add(usize::try_from(len).ok()?)?;
    let s = buf.get(*at..end)?;
    *at = end;
    Some(s)
}

/// Skips one well-formed, definite-length item.
fn skip(buf: &[u8], at: &mut usize, depth: usize) -> Option<()> {
    if depth > RECURSION_LIMIT {
        return None;
    }
    let (major, n) = head(buf, at)?;
    match major {
        0 | 1 | 7 => {}
        2 | 3 => {
            *at = at.checked_add(usize::try_from(n).ok()?)?;
            if *at > buf.len() {
                return None;
            }
        }
        4 | 5 => {
            let items = if major == 5 { n.checked_mul(2)? } else { n };
            if items > buf.len() as u64 {
                return None;
            }
            for _ in 0..items {
                skip(buf, at, depth + 1)?;
            }
        }
        6 => skip(buf, at, depth + 1)?,
        _ => return None,
    }
    Some(())
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
