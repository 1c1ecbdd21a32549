//! Attachment transfer over one loopback hop: `transfer::fetch` against a raw quinn
//! stream of the same bytes, same machine, same run, same certificates and the
//! node's transport configuration.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-blobs cargo run --release -p node --example bench_transfer
//! BENCH_SIZE_MIB=256 BENCH_CHUNKS_IN_FLIGHT=16 cargo run --release -p node --example bench_transfer
//! ```
//!
//! Prints MiB/s for each, the ratio, and the process's peak RSS (VmHWM) during each
//! phase. Both ends run in this process, so the RSS figure covers sender and
//! receiver together. Peaks are reset between phases via `/proc/self/clear_refs`.
//!
//! A second phase measures per-hop latency on the open link: `BENCH_LAT_N` (200)
//! fetches of distinct `BENCH_LAT_BYTES` (120 000-byte, an ECG) attachments, each timed
//! from the first `ChunkRequest` to the object installed (verified and fsynced), and,
//! for comparison, the same number of bare chunk round trips (request, response,
//! nothing stored). Prints p50 / p99 / max.
//!
//! Knobs: `BENCH_SIZE_MIB` (1024), `BENCH_CHUNKS_IN_FLIGHT` (8), `BENCH_CHUNK_KIB`
//! (256), `BENCH_DIR` (the temporary directory), `BENCH_LAT_N`, `BENCH_LAT_BYTES`;
//! `BENCH_FETCH_ONLY=1` runs the fetch alone (to profile it).

use certs::ca::{CertificateAuthority, IntermediateOptions, RootOptions, Validity};
use certs::enrol;
use certs::keys::NodeCredentials;
use certs::verify::{FederationVerifier, TrustStore};
use federation_proto::codec::{FRAME_HEADER_LEN, frame_len};
use federation_proto::{AttachmentRef, CaseId, ChunkRequest, Message, NodeClaim, NodeName, Priority, Tier};
use node::blobs::BlobStore;
use node::transfer::{self, TransferLimits};
use node::transport::{self, AcceptPolicy};
use rand::RngCore;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
const VILLAGE: &str = "v001.gaocheng.dengfeng.zhengzhou.henan.cn";
const MIB: u64 = 1024 * 1024;
/// First bytes of a stream asking for the raw bytes instead of a chunk.
const RAW_MAGIC: [u8; FRAME_HEADER_LEN] = *b"RAW!";
/// Buffer for the raw stream on both ends.
const RAW_BUF_LEN: usize = MIB as usize;

struct Node {
    name: NodeName,
    tier: Tier,
    creds: NodeCredentials,
}

impl Node {
    fn claim(&self) -> NodeClaim {
        NodeClaim { name: self.name.clone(), tier: self.tier, public_key: self.creds.public_key }
    }
}

fn enrol(ca: &mut CertificateAuthority, name: &str, tier: Tier) -> anyhow::Result<Node> {
    let (key_pem, csr_pem) = enrol::generate_key_and_csr(&NodeName::from(name), tier)?;
    let issued = ca.sign_csr(&csr_pem, tier, Validity::Days(1))?;
    Ok(Node { name: name.into(), tier, creds: NodeCredentials::from_pem(&issued.chain_pem, &key_pem)? })
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Peak resident set size of this process since the last reset, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// CPU time (user + system) of this process so far, both ends together, in seconds.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which ends with the last ')': utime, stime are
    // the 12th and 13th of them, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn write_random_file(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rand::rng().fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// Serves chunk requests with `transfer::serve_chunk`, and raw streams of the blob
/// `raw` to streams that start with [`RAW_MAGIC`].
async fn serve_stream(
    blobs: BlobStore,
    raw: std::path::PathBuf,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await?;
    if header == RAW_MAGIC {
        let mut file = tokio::fs::File::open(&raw).await?;
        let mut buf = vec![0u8; RAW_BUF_LEN];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n]).await?;
        }
        send.finish()?;
        let _ = send.stopped().await;
        return Ok(());
    }
    let mut payload = vec![0u8; frame_len(header)?];
    recv.read_exact(&mut payload).await?;
    match federation_proto::decode(&payload)? {
        Message::ChunkRequest(req) => {
            let _ = transfer::serve_chunk(&blobs, &req, &mut send, None).await;
        }
        other => anyhow::bail!("unexpected {}", other.kind()),
    }
    Ok(())
}

/// Reads a raw stream of the blob to its end; into `sink` if given, else discarded.
async fn raw_fetch(conn: &quinn::Connection, mut sink: Option<std::fs::File>) -> anyhow::Result<u64> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&RAW_MAGIC).await?;
    send.finish()?;
    let mut buf = vec![0u8; RAW_BUF_LEN];
    let mut total = 0u64;
    while let Some(n) = recv.read(&mut buf).await? {
        if let Some(file) = &mut sink {
            file.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    if let Some(file) = &sink {
        file.sync_all()?;
    }
    Ok(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let size = env_u64("BENCH_SIZE_MIB", 1024) * MIB;
    let limits = TransferLimits {
        chunks_in_flight: env_u64("BENCH_CHUNKS_IN_FLIGHT", 8) as usize,
        chunk_len: (env_u64("BENCH_CHUNK_KIB", 256) * 1024) as u32,
        ..TransferLimits::default()
    };
    let dir = tempfile::tempdir_in(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )?;

    // Certificates: root → national → provincial CA, a county and its village.
    let mut root = CertificateAuthority::init_root(&dir.path().join("root"), &RootOptions::new("cn"))?;
    let mut national =
        root.issue_intermediate(&dir.path().join("national"), &IntermediateOptions::new("cn", Tier::National))?;
    let mut henan = national
        .issue_intermediate(&dir.path().join("henan"), &IntermediateOptions::new("henan.cn", Tier::Provincial))?;
    let trust = Arc::new(TrustStore::from_root_pem(&root.root_pem())?);
    let county = enrol(&mut henan, COUNTY, Tier::County)?;
    let village = enrol(&mut henan, VILLAGE, Tier::Village)?;
    let verifier = || Arc::new(FederationVerifier::new(trust.clone()));

    // The attachment, held by the county.
    println!("preparing a {} MiB random attachment in {}", size / MIB, dir.path().display());
    let county_blobs = BlobStore::open(&dir.path().join("county"))?;
    let village_blobs = BlobStore::open(&dir.path().join("village"))?;
    let source = dir.path().join("source.bin");
    write_random_file(&source, size)?;
    let (hash, size_bytes) = county_blobs.import_file(&source).await?;
    std::fs::remove_file(&source)?;
    let att = AttachmentRef {
        hash,
        size_bytes,
        media_type: "application/octet-stream".into(),
        name: "slide".into(),
        priority: Priority::Bulk,
    };

    // The county serves; the village dials it.
    let server = transport::endpoint("127.0.0.1:0".parse()?, &county.creds, verifier())?;
    let addr = server.local_addr()?;
    let policy =
        AcceptPolicy { me: trust.identity_of_peer(&county.creds.chain)?, claim: county.claim(), cross_links: vec![] };
    let (ep, blobs, raw_path, accept_trust) =
        (server.clone(), county_blobs.clone(), county_blobs.path_of(&hash), trust.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(link) = transport::accept(incoming, &policy, &accept_trust).await else { continue };
            let (blobs, raw_path) = (blobs.clone(), raw_path.clone());
            tokio::spawn(async move {
                while let Ok((send, recv)) = link.connection.accept_bi().await {
                    tokio::spawn(serve_stream(blobs.clone(), raw_path.clone(), send, recv));
                }
            });
        }
    });
    let client = transport::endpoint("127.0.0.1:0".parse()?, &village.creds, verifier())?;
    let conn = transport::connect(&client, addr, &county.name, &village.claim(), &trust).await?.connection;
    let mib_s = |bytes: u64, secs: f64| bytes as f64 / MIB as f64 / secs;

    let setup_rss = peak_rss_mib();

    // BENCH_FETCH_ONLY=1: only the fetch, for profiling it (`perf record`) alone.
    if env_u64("BENCH_FETCH_ONLY", 0) == 1 {
        let (t, cpu) = (Instant::now(), cpu_s());
        transfer::fetch(&conn, &village_blobs, CaseId([1; 16]), &att, &limits).await?;
        let (fetch_s, fetch_cpu) = (t.elapsed().as_secs_f64(), cpu_s() - cpu);
        anyhow::ensure!(village_blobs.contains(&hash), "fetched blob missing");
        println!("transfer::fetch: {:.1} MiB/s, {fetch_s:.2} s, CPU {fetch_cpu:.2} s", mib_s(size, fetch_s));
        return Ok(());
    }

    // 1. Raw stream, bytes discarded: the link's ceiling.
    reset_peak_rss();
    let (t, cpu) = (Instant::now(), cpu_s());
    let n = raw_fetch(&conn, None).await?;
    let (raw_s, raw_cpu) = (t.elapsed().as_secs_f64(), cpu_s() - cpu);
    anyhow::ensure!(n == size, "raw stream moved {n} of {size} bytes");
    let raw_rss = peak_rss_mib();

    // 2. transfer::fetch: chunked, per-chunk and whole-file hash checks, fsynced.
    reset_peak_rss();
    let (t, cpu) = (Instant::now(), cpu_s());
    transfer::fetch(&conn, &village_blobs, CaseId([1; 16]), &att, &limits).await?;
    let (fetch_s, fetch_cpu) = (t.elapsed().as_secs_f64(), cpu_s() - cpu);
    anyhow::ensure!(village_blobs.contains(&hash), "fetched blob missing");
    let fetch_rss = peak_rss_mib();

    // 3. Raw stream written to a file and fsynced (no hashing): the disk's share.
    reset_peak_rss();
    let sink = std::fs::File::create(dir.path().join("raw-sink.bin"))?;
    let (t, cpu) = (Instant::now(), cpu_s());
    raw_fetch(&conn, Some(sink)).await?;
    let (raw_file_s, raw_file_cpu) = (t.elapsed().as_secs_f64(), cpu_s() - cpu);
    let raw_file_rss = peak_rss_mib();

    let (raw, fetched, raw_file) = (mib_s(size, raw_s), mib_s(size, fetch_s), mib_s(size, raw_file_s));
    println!();
    println!(
        "attachment {} MiB, chunk {} KiB x {} in flight, one loopback hop, mTLS QUIC",
        size / MIB,
        limits.chunk_len / 1024,
        limits.chunks_in_flight
    );
    println!("{:<38} {:>9} {:>8} {:>8} {:>14}", "", "MiB/s", "s", "CPU s", "peak RSS MiB");
    println!("{:<38} {raw:>9.1} {raw_s:>8.2} {raw_cpu:>8.2} {raw_rss:>14.1}", "raw quinn stream (discard)");
    println!(
        "{:<38} {raw_file:>9.1} {raw_file_s:>8.2} {raw_file_cpu:>8.2} {raw_file_rss:>14.1}",
        "raw quinn stream (to file + fsync)"
    );
    println!(
        "{:<38} {fetched:>9.1} {fetch_s:>8.2} {fetch_cpu:>8.2} {fetch_rss:>14.1}",
        "transfer::fetch (verified, fsynced)"
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("(CPU s: user + system of the whole process, both ends; {cores} CPUs available)");
    println!();
    println!("fetch / raw (discard)      = {:.1} %", 100.0 * fetched / raw);
    println!("fetch / raw (to file)      = {:.1} %", 100.0 * fetched / raw_file);
    let whole = [setup_rss, raw_rss, fetch_rss, raw_file_rss].into_iter().fold(0.0, f64::max);
    println!("peak RSS of the process (VmHWM, whole run incl. setup) = {whole:.1} MiB");

    // 4. Per-hop latency of a small attachment on the open link.
    let lat_n = env_u64("BENCH_LAT_N", 200) as usize;
    let lat_bytes = env_u64("BENCH_LAT_BYTES", 120_000) as usize;
    if lat_n > 0 {
        let mut atts = Vec::with_capacity(lat_n);
        let mut bytes = vec![0u8; lat_bytes];
        for _ in 0..lat_n {
            rand::rng().fill_bytes(&mut bytes);
            let (hash, size_bytes) = county_blobs.import_bytes(&bytes).await?;
            atts.push(AttachmentRef { hash, size_bytes, priority: Priority::Urgent, ..att.clone() });
        }
        // Bare chunk round trips: request, response, per-chunk hash checked; no disk.
        let mut rtt = Vec::with_capacity(lat_n);
        for a in &atts {
            let t = Instant::now();
            let (mut send, mut recv) = conn.open_bi().await?;
            let req = ChunkRequest { case_id: CaseId([2; 16]), hash: a.hash, offset: 0, len: lat_bytes as u32 };
            transport::write_frame(&mut send, &Message::ChunkRequest(req)).await?;
            send.finish()?;
            let Message::ChunkResponse(resp) = transport::read_frame(&mut recv).await? else {
                anyhow::bail!("expected a chunk response");
            };
            anyhow::ensure!(federation_proto::ContentHash::of(&resp.data) == resp.chunk_hash, "chunk hash");
            rtt.push(t.elapsed());
        }
        // Whole fetches: request pipeline start to object verified, fsynced, installed.
        let mut fetched = Vec::with_capacity(lat_n);
        for a in &atts {
            let t = Instant::now();
            transfer::fetch(&conn, &village_blobs, CaseId([3; 16]), a, &TransferLimits::default()).await?;
            fetched.push(t.elapsed());
            anyhow::ensure!(village_blobs.contains(&a.hash), "fetched blob missing");
        }
        println!();
        println!("per-hop latency, {lat_n} attachments of {lat_bytes} bytes, one at a time on the open link");
        println!("{:<38} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
        for (name, mut v) in [("chunk round trip (no disk)", rtt), ("transfer::fetch (verified, fsynced)", fetched)] {
            v.sort();
            let (p50, p99, max) = (pct(&v, 50.0), pct(&v, 99.0), v[v.len() - 1]);
            println!("{name:<38} {:>9.2} {:>9.2} {:>9.2}", ms(p50), ms(p99), ms(max));
        }
    }

    conn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    Ok(())
}

/// The `p`th percentile of sorted durations (nearest rank).
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
