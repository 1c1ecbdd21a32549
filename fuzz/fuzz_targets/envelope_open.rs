//! Signed envelopes (COSE_Sign1) from peers: parsing, verification and, for every
//! content type, decoding of the body. Never panics; nothing unsigned verifies.
#![no_main]

use federation_proto::codec::from_cbor;
use federation_proto::*;
use libfuzzer_sys::fuzz_target;

/// Opens `env` as `T` the way a node does, and decodes the payload as `T` as if the
/// signature had verified (the only way a fuzzer reaches the body decoders).
fn open_as<T: serde::de::DeserializeOwned>(env: &SignedEnvelope, ct: &str) {
    if env.open::<T>(ct).is_ok() {
        // Only the corpus' real signatures get here.
        assert!(env.verify(ct).is_ok());
    }
    if let Ok((_, payload)) = env.verify_with(ct, |_, _, _| Ok(())) {
        // Every envelope that passes the structural checks has the canonical layout
        // payload_range walks, and it finds exactly the payload verify returns.
        let range = env.payload_range().expect("a structurally valid envelope has a payload range");
        assert_eq!(&env.as_bytes()[range], payload.as_slice());
        let _ = from_cbor::<T>(&payload);
    }
}

fuzz_target!(|data: &[u8]| {
    let env = SignedEnvelope::from_bytes(data.to_vec());
    let _ = env.hash();
    let _ = env.payload_range();
    let _ = env.claimed_signer();
    open_as::<CaseManifest>(&env, content_type::MANIFEST);
    open_as::<HopRecord>(&env, content_type::HOP);
    open_as::<Finding>(&env, content_type::FINDING);
    open_as::<Report>(&env, content_type::REPORT);
    open_as::<CustodyReceipt>(&env, content_type::CUSTODY_RECEIPT);
    open_as::<ReportReceipt>(&env, content_type::REPORT_RECEIPT);
    open_as::<CapacityAdvert>(&env, content_type::ADVERT);
    open_as::<Recall>(&env, content_type::RECALL);
    // A signature by anyone but the expected key is refused before decoding.
    let stranger = PublicKey([7; 32]);
    if let Ok(signer) = env.claimed_signer() {
        if signer != stranger {
            assert!(env.open_from::<HopRecord>(content_type::HOP, &stranger).is_err());
        }
    }
});
