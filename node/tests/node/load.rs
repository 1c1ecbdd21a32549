//! The short load profile (issue #10, item 4): 100 played villages offer cases to one
//! real county node (QUIC with real certificates, SQLite, blob store) for 20 s, and
//! every offered case must be held by the county exactly once: checked case by case
//! against the county's own store afterwards (`node::load::check_custody`). The
//! 10-minute, 1,000-village run is `BENCH_DURATION_S=600 cargo run --release -p node
//! --example bench_county` (docs/benchmarks.md).

use node::demo::provision;
use node::load::{LoadProfile, check_custody, connect_villages, county_plan, run};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_villages_for_twenty_seconds_lose_no_case_and_none_is_taken_twice() {
    let villages: usize = std::env::var("TELEMED_LOAD_VILLAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let secs: u64 = std::env::var("TELEMED_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let configs = provision(tmp.path(), &county_plan(villages)).unwrap();
    let county = node::daemon::start(configs[0].clone()).await.unwrap();
    let children = connect_villages(&configs, county.addr).await.unwrap();
    let profile = LoadProfile {
        duration: Duration::from_secs(secs),
        think_mean: Duration::from_millis(500),
        attachment_len: 120 * 1024,
        receipt_timeout: Duration::from_secs(30),
        tries_max: 3,
    };
    let outcome = run(&children, &profile).await;
    eprintln!(
        "{villages} villages, {secs} s: {} offered, {} receipted, {:.1} cases/s, p50 {:?}, p99 {:?}, {} retries",
        outcome.offered.len(),
        outcome.latencies.len(),
        outcome.cases_per_s(),
        outcome.percentile(0.5),
        outcome.percentile(0.99),
        outcome.retries
    );
    assert!(outcome.unreceipted.is_empty(), "cases without a custody receipt: {:?}", outcome.unreceipted);
    assert!(
        outcome.offered.len() >= villages,
        "every village offered at least one case: {} offers",
        outcome.offered.len()
    );
    assert_eq!(outcome.latencies.len(), outcome.offered.len());

    drop(children);
    county.shutdown().await.unwrap();
    let store = node::store::Store::open_read_only(&configs[0].store_location()).await.unwrap();
    let blobs = node::blobs::BlobStore::open(&configs[0].blob_dir()).unwrap();
    let check = check_custody(&store, &blobs, &outcome.offered).await.unwrap();
    assert!(check.is_clean(), "{check:?}");
    assert_eq!(check.unexpected, 0, "the county holds only offered cases");
    assert!(check.audit_records as usize >= 2 * outcome.offered.len(), "{check:?}");
}
