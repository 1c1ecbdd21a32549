//! Frame and message decoding: whatever a peer writes on a stream.
//! Never panics; what decodes re-encodes to a frame that decodes to the same message.
#![no_main]

use federation_proto::{FRAME_LEN_MAX, codec, decode, decode_frame, encode, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a length-prefixed frame (possibly partial, possibly several).
    let mut rest = data;
    while let Ok(Some((msg, used))) = decode_frame(rest) {
        assert!(used > 0 && used <= rest.len(), "decode_frame consumed {used} of {}", rest.len());
        let again = encode_frame(&msg).expect("a decoded message encodes");
        let (back, n) = decode_frame(&again).expect("re-encoded frame decodes").expect("whole frame");
        assert_eq!(n, again.len());
        assert_eq!(back, msg, "decode(encode(m)) == m");
        rest = &rest[used..];
    }
    // The header alone.
    if let Ok(header) = <[u8; 4]>::try_from(data.get(..4).unwrap_or_default()) {
        if let Ok(len) = codec::frame_len(header) {
            assert!(len <= FRAME_LEN_MAX);
        }
    }
    // As a bare CBOR payload.
    if let Ok(msg) = decode(data) {
        let bytes = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode(&bytes).expect("re-encoded payload decodes"), msg);
    }
});
