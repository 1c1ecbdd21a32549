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

use certs::ca::{CertificateAuthority, IntermediateOptions, RootOptions, Validity};
use certs::enrol;
use certs::keys::NodeCredentials;
use certs::verify::{FederationVerifier, TrustStore};
use federation_proto::codec::{FRAME_HEADER_LEN, frame_len};
use federation_proto::{AttachmentRef, CaseId, Message, NodeClaim, NodeName, Priority, Tier};
use node::blobs::BlobStore;
use node::transfer::{self, TransferLimits};
use node::transport::{self, AcceptPolicy};
use rand::RngCore;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
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
            let _ = transfer::serve_chunk(&blobs, &req, &mut send).await;
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
    let limits =
        TransferLimits { chunks_in_flight: env_u64("BENCH_CHUNKS_IN_FLIGHT", 8) as usize, ..TransferLimits::default() };
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

    // 1. Raw stream, bytes discarded: the link's ceiling.
    reset_peak_rss();
    let t = Instant::now();
    let n = raw_fetch(&conn, None).await?;
    let raw_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(n == size, "raw stream moved {n} of {size} bytes");
    let raw_rss = peak_rss_mib();

    // 2. transfer::fetch: chunked, per-chunk and whole-file hash checks, fsynced.
    reset_peak_rss();
    let t = Instant::now();
    transfer::fetch(&conn, &village_blobs, CaseId([1; 16]), &att, &limits).await?;
    let fetch_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(village_blobs.contains(&hash), "fetched blob missing");
    let fetch_rss = peak_rss_mib();

    // 3. Raw stream written to a file and fsynced (no hashing): the disk's share.
    reset_peak_rss();
    let sink = std::fs::File::create(dir.path().join("raw-sink.bin"))?;
    let t = Instant::now();
    raw_fetch(&conn, Some(sink)).await?;
    let raw_file_s = t.elapsed().as_secs_f64();
    let raw_file_rss = peak_rss_mib();

    let (raw, fetched, raw_file) = (mib_s(size, raw_s), mib_s(size, fetch_s), mib_s(size, raw_file_s));
    println!();
    println!(
        "attachment {} MiB, chunk {} KiB x {} in flight, one loopback hop, mTLS QUIC",
        size / MIB,
        limits.chunk_len / 1024,
        limits.chunks_in_flight
    );
    println!("{:<38} {:>9} {:>8} {:>14}", "", "MiB/s", "s", "peak RSS MiB");
    println!("{:<38} {raw:>9.1} {raw_s:>8.2} {raw_rss:>14.1}", "raw quinn stream (discard)");
    println!("{:<38} {raw_file:>9.1} {raw_file_s:>8.2} {raw_file_rss:>14.1}", "raw quinn stream (to file + fsync)");
    println!("{:<38} {fetched:>9.1} {fetch_s:>8.2} {fetch_rss:>14.1}", "transfer::fetch (verified, fsynced)");
    println!();
    println!("fetch / raw (discard)      = {:.1} %", 100.0 * fetched / raw);
    println!("fetch / raw (to file)      = {:.1} %", 100.0 * fetched / raw_file);
    let whole = [setup_rss, raw_rss, fetch_rss, raw_file_rss].into_iter().fold(0.0, f64::max);
    println!("peak RSS of the process (VmHWM, whole run incl. setup) = {whole:.1} MiB");

    conn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    Ok(())
}
