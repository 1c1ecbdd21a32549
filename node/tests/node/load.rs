//! The short load profile (issue #10, item 4): 100 played villages offer cases to one
//! real county node (QUIC with real certificates, SQLite, blob store) for 20 s, and
//! every offered case must be held by the county exactly once: checked case by case
//! against the county's own store afterwards (`node::load::check_custody`). The
//! 10-minute, 1,000-village run is `BENCH_DURATION_S=600 cargo run --release -p node
//! --example bench_county` (docs/benchmarks.md).

use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use federation_proto::Tier;
use node::demo::{PlannedNode, provision};
use node::load::{LoadProfile, check_custody, run};
use node::loadgen::PlayedChild;
use std::sync::Arc;
use std::time::Duration;

const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_villages_for_twenty_seconds_lose_no_case_and_none_is_taken_twice() {
    let villages: usize = std::env::var("TELEMED_LOAD_VILLAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let secs: u64 = std::env::var("TELEMED_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let tmp = tempfile::tempdir().unwrap();
    let mut plan = vec![PlannedNode { name: COUNTY.into(), tier: Tier::County, parent: None, experts: vec![] }];
    for i in 0..villages {
        plan.push(PlannedNode {
            name: format!("v{i:04}.gaocheng.dengfeng.zhengzhou.henan.cn"),
            tier: Tier::Village,
            parent: Some(COUNTY.into()),
            experts: vec![],
        });
    }
    let configs = provision(tmp.path(), &plan).unwrap();
    let county = node::daemon::start(configs[0].clone()).await.unwrap();
    let trust = Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&configs[0].tls.root).unwrap()).unwrap());
    let mut children = Vec::new();
    for c in &configs[1..] {
        let creds = NodeCredentials::load(&c.tls.chain, &c.tls.key).unwrap();
        let child = PlayedChild::connect(
            &creds,
            c.name.as_str().into(),
            Tier::Village,
            trust.clone(),
            COUNTY.into(),
            county.addr,
        )
        .await
        .unwrap();
        children.push(Arc::new(child));
    }
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
