//! Load and latency of custody transfer into one county node, over real QUIC on
//! loopback with real certificates and a real SQLite store.
//!
//! Phase 1 (latency): one village offers `BENCH_PHASE1_CASES` (200) cases of 120 KB
//! one after another on an open link, after 20 to warm up; time from offer to signed
//! custody receipt (one hop: offer, chunk fetch with hash checks, the custody commit,
//! receipt), then that time split at the steps the village sees (first chunk
//! request, last chunk answered, offer accepted). `BENCH_PHASE2=0` stops after it.
//! Phase 2 (load): N villages connected at once (default 500), each offering K cases
//! (default 4) back to back, re-offering a case after 5 s without its receipt as a
//! real village does; cases/s, p50/p99 time to custody, re-offers, and whether every
//! case is held at the county (no loss).
//!
//! Run: `cargo run --release -p node --example bench_county` (env: BENCH_VILLAGES,
//! BENCH_CASES_PER_VILLAGE). Peak RSS is the whole process: the county node and all
//! the played villages together.
//!
//! Duration mode (issue #10, load): with `BENCH_DURATION_S` set, only a timed load
//! run is made (`node::load`): BENCH_VILLAGES villages (default 1000) each offer a
//! case, wait for its receipt, think for an exponential time of mean
//! `BENCH_THINK_MS` (default 10000), and again, for BENCH_DURATION_S seconds. The
//! county runs in its own process (this example re-executed with
//! `BENCH_COUNTY_CONFIG`), so its RSS is measured alone (sampled every second from
//! /proc); at the end the county is stopped and its store checked case by case
//! (`node::load::check_custody`). Each village is one UDP socket, so raise
//! `ulimit -n` above BENCH_VILLAGES + 100.

use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use federation_proto::{CaseId, Modality, Tier, Urgency};
use node::demo::provision;
use node::load::{COUNTY, connect_villages, county_plan};
use node::loadgen::PlayedChild;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Phase 2: a village re-offers a case after this long without its receipt (a real
/// node's offer retry backs off from 2 s; the load here makes 2 s receipts normal).
const REOFFER_AFTER: Duration = Duration::from_secs(5);
/// Phase 2: re-offers of one case at most.
const REOFFERS_MAX: u32 = 11;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// "p50 …, p99 …, max …" of a sorted, non-empty list, in ms.
fn spread(sorted: &[Duration]) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(sorted[sorted.len() - 1])
    )
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `VmRSS` or `VmHWM` (peak) of process `pid` in MiB.
fn proc_mib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The county's process in duration mode: runs the node from the JSON config until
/// stdin closes.
async fn run_county(config_path: &str) -> anyhow::Result<()> {
    let config: node::config::Config = serde_json::from_str(&std::fs::read_to_string(config_path)?)?;
    let county = node::daemon::start(config).await?;
    println!("LISTENING {}", county.addr);
    use std::io::Write;
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await?;
    county.shutdown().await?;
    Ok(())
}

/// Duration mode: see the module docs.
async fn duration_mode(secs: u64) -> anyhow::Result<()> {
    use std::io::BufRead;
    let villages: usize = env_or("BENCH_VILLAGES", 1000);
    let think_ms: u64 = env_or("BENCH_THINK_MS", 10_000);
    let attachment_len: usize = env_or("BENCH_ATTACHMENT_BYTES", 120 * 1024);
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d)?,
        Err(_) => tempfile::tempdir()?,
    };
    let configs = provision(dir.path(), &county_plan(villages.max(1)))?;
    let county_json = dir.path().join("county.json");
    std::fs::write(&county_json, serde_json::to_vec(&configs[0])?)?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .env("BENCH_COUNTY_CONFIG", &county_json)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id().to_string();
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().ok_or_else(|| anyhow::anyhow!("county exited before listening"))??;
        if let Some(a) = line.strip_prefix("LISTENING ") {
            break a.parse()?;
        }
    };
    let connect_start = Instant::now();
    let children = connect_villages(&configs, addr).await.map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "{} village links up in {:.1} s; county RSS {:.0} MiB; load average {}",
        children.len(),
        connect_start.elapsed().as_secs_f64(),
        proc_mib(&pid, "VmRSS:"),
        loadavg()
    );
    let profile = node::load::LoadProfile {
        duration: Duration::from_secs(secs),
        think_mean: Duration::from_millis(think_ms),
        attachment_len,
        receipt_timeout: Duration::from_secs(60),
        tries_max: 3,
    };
    // County RSS, sampled every second; a line a minute.
    let sampler = {
        let pid = pid.clone();
        tokio::spawn(async move {
            let (start, mut peak, mut samples) = (Instant::now(), 0f64, Vec::new());
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let rss = proc_mib(&pid, "VmRSS:");
                if rss == 0.0 {
                    break;
                }
                peak = peak.max(rss);
                let t = start.elapsed().as_secs();
                if t % 60 == 0 {
                    samples.push((t, rss));
                    println!(
                        "  t={t:>4} s  county RSS {rss:.0} MiB (peak so far {peak:.0})  load average {}",
                        loadavg()
                    );
                }
            }
            (peak, samples)
        })
    };
    let outcome = node::load::run(&children, &profile).await;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let hwm = proc_mib(&pid, "VmHWM:");
    println!(
        "{villages} villages, {secs} s, think {think_ms} ms mean, {attachment_len}-byte cases: {} offered, {} receipted in {:.1} s = {:.1} cases/s; time to custody p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} retries; {} without receipt",
        outcome.offered.len(),
        outcome.latencies.len(),
        outcome.wall.as_secs_f64(),
        outcome.cases_per_s(),
        outcome.percentile(0.5).as_secs_f64() * 1e3,
        outcome.percentile(0.99).as_secs_f64() * 1e3,
        outcome.percentile(1.0).as_secs_f64() * 1e3,
        outcome.retries,
        outcome.unreceipted.len()
    );
    println!("county: peak RSS (VmHWM) {hwm:.0} MiB, open fds at the end {fds}; load average {}", loadavg());
    drop(children);
    drop(child.stdin.take());
    let status = child.wait()?;
    let (peak, _) = sampler.await?;
    println!("county exited ({status}); sampled RSS peak {peak:.0} MiB");
    let store = node::store::Store::open_read_only(&configs[0].store_location()).await?;
    let blobs = node::blobs::BlobStore::open(&configs[0].blob_dir())?;
    let check = node::load::check_custody(&store, &blobs, &outcome.offered).await?;
    println!(
        "custody check against the county's store: {} offered, {} missing, {} incomplete, {} without blob, {} not taken exactly once, {} unexpected; audit chain of {} records verifies",
        outcome.offered.len(),
        check.missing.len(),
        check.incomplete.len(),
        check.without_blob.len(),
        check.custody_not_once.len(),
        check.unexpected,
        check.audit_records
    );
    store.close().await;
    anyhow::ensure!(check.is_clean() && outcome.unreceipted.is_empty(), "loss or double custody: {check:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(config) = std::env::var("BENCH_COUNTY_CONFIG") {
        return run_county(&config).await;
    }
    if let Some(secs) = std::env::var("BENCH_DURATION_S").ok().and_then(|v| v.parse().ok()) {
        return duration_mode(secs).await;
    }
    let villages: usize = std::env::var("BENCH_VILLAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let per_village: usize = std::env::var("BENCH_CASES_PER_VILLAGE").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let dir = tempfile::tempdir()?;
    let configs = provision(dir.path(), &county_plan(villages.max(1)))?;
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
    let phase1: usize = env_or("BENCH_PHASE1_CASES", 200);
    v.keep_timelines();
    let mut lat = Vec::new();
    let mut ids = Vec::new();
    for i in 0..phase1 + 20 {
        let mut data = (*ecg).clone();
        data[0] = (i % 256) as u8;
        data[1] = (i / 256) as u8;
        let id = next_id();
        let offer = v.make_offer(id, Modality::Ecg, Urgency::Stat, Arc::new(data));
        let took = v.offer_until_receipt(offer, Duration::from_secs(30)).await.expect("receipt");
        if i >= 20 {
            lat.push(took); // the first 20 warm up
            ids.push(id);
        }
    }
    lat.sort();
    println!("per-hop time to custody, 120 KB ECG case, open link, n={}: {}", lat.len(), spread(&lat));

    // Where the time went, as the village saw it.
    let timelines: Vec<_> = ids.iter().filter_map(|id| v.timeline(id)).collect();
    let split = |name: &str,
                 from: fn(&node::loadgen::Timeline) -> Option<Instant>,
                 to: fn(&node::loadgen::Timeline) -> Option<Instant>| {
        let mut d: Vec<Duration> =
            timelines.iter().filter_map(|t| Some(to(t)?.saturating_duration_since(from(t)?))).collect();
        d.sort();
        if !d.is_empty() {
            println!("  {name:<44} n={:>3}  {}", d.len(), spread(&d));
        }
    };
    split("offer sent -> first chunk request", |t| t.offered, |t| t.first_request);
    split("first chunk request -> last chunk answered", |t| t.first_request, |t| t.last_answer);
    split("last chunk answered -> custody receipt", |t| t.last_answer, |t| t.receipted);
    split("offer sent -> offer accepted", |t| t.offered, |t| t.accepted);
    if std::env::var("BENCH_PHASE2").is_ok_and(|v| v == "0") {
        county.shutdown().await?;
        return Ok(());
    }

    // Phase 2: many villages at once.
    let connect_start = Instant::now();
    let children = connect_villages(&configs[..=villages], county.addr).await.map_err(|e| anyhow::anyhow!(e))?;
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
                // As a real village: re-offer after a while without a receipt.
                times.push(child.offer_with_retries(offer, REOFFER_AFTER, REOFFERS_MAX + 1).await);
            }
            times
        }));
    }
    let mut times = Vec::new();
    let (mut lost, mut reoffers) = (0, 0);
    for t in tasks {
        for (r, retries) in t.await? {
            reoffers += retries;
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
        "{villages} villages x {per_village} cases of 120 KB: {} receipts in {:.1} s = {:.0} cases/s; time to custody p50 {:.0} ms, p99 {:.0} ms; {reoffers} re-offers; {lost} without receipt; county holds {held} cases (expected {})",
        times.len(),
        wall.as_secs_f64(),
        times.len() as f64 / wall.as_secs_f64(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        total + phase1 + 20
    );
    println!("peak RSS (county node + all played villages, one process): {:.0} MiB", vm_hwm_mib());
    county.shutdown().await?;
    Ok(())
}
