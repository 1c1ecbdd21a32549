//! Load and latency of custody transfer into one county node, over real QUIC on
//! loopback with real certificates and a real SQLite store.
//!
//! Phase 1 (latency): one village offers 200 cases of 120 KB one after another on an
//! open link; time from offer to signed custody receipt (one hop: offer, accept,
//! chunk fetch with hash checks, two SQLite commits, receipt).
//! Phase 2 (load): N villages connected at once (default 500), each offering K cases
//! (default 4) back to back; cases/s, p50/p99 time to custody, and whether every case
//! is held at the county (no loss).
//!
//! Run: `cargo run --release -p node --example bench_county` (env: BENCH_VILLAGES,
//! BENCH_CASES_PER_VILLAGE). Peak RSS is the whole process: the county node and all
//! the played villages together.

use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use federation_proto::{CaseId, Modality, Tier, Urgency};
use node::demo::{PlannedNode, provision};
use node::loadgen::PlayedChild;
use std::sync::Arc;
use std::time::{Duration, Instant};

const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let villages: usize = std::env::var("BENCH_VILLAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let per_village: usize = std::env::var("BENCH_CASES_PER_VILLAGE").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let dir = tempfile::tempdir()?;
    let mut plan = vec![PlannedNode { name: COUNTY.into(), tier: Tier::County, parent: None, experts: vec![] }];
    for i in 0..villages.max(1) {
        plan.push(PlannedNode {
            name: format!("v{i:04}.gaocheng.dengfeng.zhengzhou.henan.cn"),
            tier: Tier::Village,
            parent: Some(COUNTY.into()),
            experts: vec![],
        });
    }
    let configs = provision(dir.path(), &plan)?;
    let county = node::daemon::start(configs[0].clone()).await?;
    let trust = Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&configs[0].tls.root)?)?);
    let ecg = Arc::new((0..120 * 1024).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
    let mut counter = 0u64;
    let mut next_id = move || {
        counter += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&counter.to_le_bytes());
        id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
        CaseId(id)
    };

    // Phase 1: per-hop latency on an open link.
    let c = &configs[1];
    let creds = NodeCredentials::load(&c.tls.chain, &c.tls.key)?;
    let v =
        PlayedChild::connect(&creds, c.name.as_str().into(), Tier::Village, trust.clone(), COUNTY.into(), county.addr)
            .await?;
    let mut lat = Vec::new();
    for i in 0..220 {
        let mut data = (*ecg).clone();
        data[0] = (i % 256) as u8;
        data[1] = (i / 256) as u8;
        let offer = v.make_offer(next_id(), Modality::Ecg, Urgency::Stat, Arc::new(data));
        let took = v.offer_until_receipt(offer, Duration::from_secs(30)).await.expect("receipt");
        if i >= 20 {
            lat.push(took); // the first 20 warm up
        }
    }
    lat.sort();
    println!(
        "per-hop time to custody, 120 KB ECG case, open link, n={}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );

    // Phase 2: many villages at once.
    let connect_start = Instant::now();
    let mut children = Vec::new();
    for c in configs.iter().skip(1).take(villages) {
        let creds = NodeCredentials::load(&c.tls.chain, &c.tls.key)?;
        children.push(Arc::new(
            PlayedChild::connect(
                &creds,
                c.name.as_str().into(),
                Tier::Village,
                trust.clone(),
                COUNTY.into(),
                county.addr,
            )
            .await?,
        ));
    }
    println!("{} village links up in {:.1} s", children.len(), connect_start.elapsed().as_secs_f64());
    let offers: Vec<Vec<_>> = children
        .iter()
        .enumerate()
        .map(|(vi, child)| {
            (0..per_village)
                .map(|k| {
                    let mut data = (*ecg).clone();
                    data[..8].copy_from_slice(&((vi * per_village + k) as u64 + 1_000_000).to_le_bytes());
                    child.make_offer(next_id(), Modality::Ecg, Urgency::Urgent, Arc::new(data))
                })
                .collect()
        })
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (child, offers) in children.iter().cloned().zip(offers) {
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            for offer in offers {
                times.push(child.offer_until_receipt(offer, Duration::from_secs(120)).await);
            }
            times
        }));
    }
    let mut times = Vec::new();
    let mut lost = 0;
    for t in tasks {
        for r in t.await? {
            match r {
                Some(d) => times.push(d),
                None => lost += 1,
            }
        }
    }
    let wall = start.elapsed();
    times.sort();
    let total = villages * per_village;
    let held = county.status().await?.cases.len();
    println!(
        "{villages} villages x {per_village} cases of 120 KB: {} receipts in {:.1} s = {:.0} cases/s; time to custody p50 {:.0} ms, p99 {:.0} ms; {lost} without receipt; county holds {held} cases (expected {})",
        times.len(),
        wall.as_secs_f64(),
        times.len() as f64 / wall.as_secs_f64(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        total + 220
    );
    println!("peak RSS (county node + all played villages, one process): {:.0} MiB", vm_hwm_mib());
    county.shutdown().await?;
    Ok(())
}
