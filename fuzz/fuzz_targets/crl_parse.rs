//! CRLs as a node loads them (`tls.crls` files, re-fetched lists): arbitrary bytes
//! as a PEM file, and as DER wrapped in an `X509 CRL` PEM section, into a trust store
//! built from a fixed federation root. Never panics; a CRL that is not signed by the
//! root or a CA chaining to it is never installed.
#![no_main]

use certs::verify::TrustStore;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::UnixTime;
use std::time::Duration;

/// The root the corpus CRLs were made under (fixtures/README.md says how).
const ROOT_PEM: &str = include_str!("../fixtures/root.pem");
/// A fixed "now" inside the fixtures' validity, so runs are reproducible.
const NOW_SECS: u64 = include!("../fixtures/now_secs.txt");

fn load(pem: &str) {
    let store = TrustStore::from_root_pem(ROOT_PEM).expect("fixture root loads");
    let now = UnixTime::since_unix_epoch(Duration::from_secs(NOW_SECS));
    match store.load_crl_at(pem, now) {
        Ok(info) => {
            // Installed: the store now lists it, and loading the same list again is not
            // a rollback.
            assert!(store.crls().contains(&info), "a loaded CRL is listed");
            let _ = store.load_crl_at(pem, now);
        }
        Err(_) => assert!(store.crls().is_empty(), "a refused CRL leaves nothing installed"),
    }
    let _ = store.replace_crls_at(&[pem, pem], now);
}

fuzz_target!(|data: &[u8]| {
    load(&String::from_utf8_lossy(data));
    load(&pem::encode(&pem::Pem::new("X509 CRL", data.to_vec())));
});
