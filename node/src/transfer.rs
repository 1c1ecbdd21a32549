//! Chunked, resumable transfer of attachments between two nodes over a trusted link.
//!
//! The receiver pulls: [`fetch`] asks for byte ranges with `ChunkRequest`s, one
//! bidirectional stream per exchange, from the resume point the [`BlobStore`] keeps
//! (the bytes of the partial blob already on disk), so a transfer cut by a dropped
//! link or a restart continues where it stopped. Up to
//! [`TransferLimits::chunks_in_flight`] requests are pipelined, but chunks are
//! appended strictly in order. The sender answers each request with [`serve_chunk`].
//!
//! Two hash checks guard the store:
//! - per chunk: a `ChunkResponse` whose `chunk_hash` is not the content hash of its data,
//!   or that is not exactly the range asked for, is never appended;
//! - per file: a [`PartialWriter`] keeps the content hash of the whole partial file while
//!   appending (re-hashing the bytes already on disk once when a transfer resumes),
//!   and a file that does not match the attachment's hash is deleted, never becomes
//!   an object.
//!
//! Attachments of at most [`JOURNAL_BLOB_LEN_MAX`] may instead be fetched whole into
//! memory with [`fetch_to_memory`] (same checks, nothing written here), for the
//! daemon to journal them in the store with the custody commit (ADR 0010).
//!
//! Each received chunk is checked against its hash by the task that asked for it,
//! then written and added to the whole-file hash on a blocking thread while the
//! next ones arrive; partial files are synced in the background, not per chunk, and
//! an object is installed only once its data is fsynced (see [`crate::blobs`] for
//! what a crash leaves behind).
//!
//! Memory is bounded by `chunks_in_flight` chunks (each at most
//! [`CHUNK_LEN_MAX`], plus its frame while decoding) plus the writer's queue of
//! [`crate::blobs::WRITE_QUEUE_DEPTH`] chunks, whatever the attachment size.
//!
//! Authorization is the caller's job and must never be done here: the daemon calls
//! [`serve_chunk`] only for attachments of cases it offered to that peer, and
//! [`fetch`] only for attachments of cases the peer offered to it. This module
//! never interprets cases: it moves verified bytes.

use crate::blobs::{BlobError, BlobStore, PartialWriter};
use crate::transport::{self, TransportError};
use federation_proto::codec::CHUNK_LEN_MAX;
use federation_proto::{AttachmentRef, CaseId, ChunkRequest, ChunkResponse, ContentHash, Message, Reject, RejectCode};
use quinn::{Connection, SendStream};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Most chunk requests one transfer keeps in flight. Each takes a stream, and a
/// link allows [`transport::STREAMS_PER_PEER_MAX`] for everything.
pub const CHUNKS_IN_FLIGHT_MAX: usize = 32;
/// A transfer with no chunk arriving for this long is abandoned (resumable).
pub const CHUNK_STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// How a transfer may use the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferLimits {
    /// Bytes asked for per request, 1..=[`CHUNK_LEN_MAX`].
    pub chunk_len: u32,
    /// Requests pipelined at once, 1..=[`CHUNKS_IN_FLIGHT_MAX`].
    pub chunks_in_flight: usize,
    /// Rate cap for weak links. Applied per request, so for smooth pacing choose
    /// `chunk_len` at most a fraction of a second's worth of bytes.
    pub bytes_per_s: Option<u64>,
}

impl Default for TransferLimits {
    fn default() -> Self {
        TransferLimits { chunk_len: CHUNK_LEN_MAX, chunks_in_flight: 8, bytes_per_s: None }
    }
}

impl TransferLimits {
    fn check(&self) -> Result<(), TransferError> {
        if !(1..=CHUNK_LEN_MAX).contains(&self.chunk_len) {
            return Err(TransferError::Limits(format!("chunk_len {} not in 1..={CHUNK_LEN_MAX}", self.chunk_len)));
        }
        if !(1..=CHUNKS_IN_FLIGHT_MAX).contains(&self.chunks_in_flight) {
            return Err(TransferError::Limits(format!(
                "chunks_in_flight {} not in 1..={CHUNKS_IN_FLIGHT_MAX}",
                self.chunks_in_flight
            )));
        }
        if self.bytes_per_s == Some(0) {
            return Err(TransferError::Limits("bytes_per_s must be positive (None for no cap)".into()));
        }
        Ok(())
    }
}

/// What can go wrong moving an attachment, grouped by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    // --- the peer misbehaved: nothing it sent was stored --------------------------------
    /// A chunk's data does not match its `chunk_hash`.
    #[error("chunk at offset {offset} of {hash:?} does not match its hash; not stored")]
    HashMismatch { hash: ContentHash, offset: u64 },
    /// Every chunk matched its own hash, but the whole file does not match the
    /// attachment's. The received bytes were deleted.
    #[error("{hash:?} as received hashes to {actual:?}; the received bytes were deleted")]
    FileHashMismatch { hash: ContentHash, actual: ContentHash },
    /// The peer's size for the attachment differs from the manifest's.
    #[error("peer says {hash:?} has {announced} bytes, the manifest says {expected}")]
    WrongSize { hash: ContentHash, expected: u64, announced: u64 },
    /// An answer that is not the range asked for, or not a chunk at all.
    #[error("bad answer for {hash:?} at offset {offset}: {detail}")]
    BadResponse { hash: ContentHash, offset: u64, detail: String },
    /// The peer refused our request.
    #[error("peer refused {hash:?} at offset {offset}: {code:?}: {detail}")]
    Rejected { hash: ContentHash, offset: u64, code: RejectCode, detail: String },
    /// We refused the peer's request, and told it so with a `Reject` frame.
    #[error("refused a request for {hash:?}: {code:?}: {detail}")]
    RequestRefused { hash: ContentHash, code: RejectCode, detail: String },

    // --- the link failed: resumable -----------------------------------------------------
    /// The connection or a chunk's stream broke. What was received is kept.
    #[error("link lost while transferring {hash:?}: {detail} (resumable)")]
    ConnectionLost { hash: ContentHash, detail: String },
    /// No chunk arrived for [`CHUNK_STALL_TIMEOUT`].
    #[error("no chunk of {hash:?} arrived for {:?} (resumable)", CHUNK_STALL_TIMEOUT)]
    Stalled { hash: ContentHash },

    // --- local ----------------------------------------------------------------------------
    /// Local misuse: limits out of range.
    #[error("invalid transfer limits: {0}")]
    Limits(String),
    /// The local blob directory failed (disk full, I/O error).
    #[error(transparent)]
    Blob(BlobError),
}

impl From<BlobError> for TransferError {
    fn from(e: BlobError) -> Self {
        match e {
            // While receiving, a whole-file mismatch is the sender's fault.
            BlobError::HashMismatch { expected, actual } => TransferError::FileHashMismatch { hash: expected, actual },
            e => TransferError::Blob(e),
        }
    }
}

impl TransferError {
    /// Whether trying again later (on a new link, or once disk space is freed)
    /// continues the transfer from where it stopped.
    pub fn is_resumable(&self) -> bool {
        matches!(
            self,
            TransferError::ConnectionLost { .. }
                | TransferError::Stalled { .. }
                | TransferError::Blob(BlobError::DiskFull { .. })
        )
    }

    /// The code to send the peer when this error is its fault.
    pub fn reject_code(&self) -> Option<RejectCode> {
        match self {
            TransferError::HashMismatch { .. } | TransferError::FileHashMismatch { .. } => {
                Some(RejectCode::HashMismatch)
            }
            TransferError::WrongSize { .. } | TransferError::BadResponse { .. } => Some(RejectCode::Malformed),
            TransferError::RequestRefused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A rate cap shared by every transfer that clones it: [`Pacer::pace`] returns only
/// once the bytes fit under `bytes_per_s` since the pacer was last idle. Bytes are
/// paid for before they are sent, so moving `n` bytes takes at least `n / rate`.
/// Unused time is not saved up (no bursts after idle periods).
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_s: u64,
    next_free: Arc<Mutex<Option<Instant>>>,
}

impl Pacer {
    /// A pacer allowing `bytes_per_s` (at least 1).
    pub fn new(bytes_per_s: u64) -> Pacer {
        Pacer { bytes_per_s: bytes_per_s.max(1), next_free: Arc::default() }
    }

    /// Waits until `bytes` more may be sent.
    pub async fn pace(&self, bytes: u64) {
        let due = {
            let mut next_free = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = next_free.map_or(now, |t| t.max(now));
            let due = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
            *next_free = Some(due);
            due
        };
        tokio::time::sleep_until(due).await;
    }
}

/// Fetches `att` of `case_id` from the peer on `conn` into `blobs`, resuming from
/// the bytes already received, and completes it with the whole-file check. Returns
/// at once if the blob is already complete. Only one fetch of a blob runs at a time
/// in this process; a second waits and then finds it complete.
pub async fn fetch(
    conn: &Connection,
    blobs: &BlobStore,
    case_id: CaseId,
    att: &AttachmentRef,
    limits: &TransferLimits,
) -> Result<(), TransferError> {
    limits.check()?;
    let (hash, size) = (att.hash, att.size_bytes);
    let _lock = blobs.lock_transfer(&hash).await;
    if blobs.contains(&hash) {
        return Ok(());
    }
    if blobs.partial_len(&hash).await > size {
        tracing::warn!(%hash, size, "partial blob longer than the attachment; starting over");
        blobs.discard_partial(&hash).await?;
    }
    let mut writer = blobs.partial_writer(&hash, size).await?;
    let resumed_at = writer.resumed_at();
    match receive(conn, Sink::File(&mut writer), case_id, size, limits).await {
        Ok(()) => writer.finish().await?,
        Err(e) => {
            // Keep what was checked and queued as the resume point. A disk error
            // here is secondary to the one that stopped the transfer.
            if let Err(close) = writer.close().await {
                tracing::warn!(%hash, "closing the partial blob after a failed transfer: {close}");
            }
            return Err(e);
        }
    }
    tracing::debug!(%hash, size, resumed_at, "attachment received and verified");
    Ok(())
}

/// Fetches the whole attachment `att`, at most [`JOURNAL_BLOB_LEN_MAX`] bytes, into
/// memory: every chunk checked against its hash, the whole against the attachment's
/// hash. Nothing is written to disk (the caller journals the bytes in the store,
/// ADR 0010); a failed fetch keeps nothing, and the next one starts over.
pub async fn fetch_to_memory(
    conn: &Connection,
    case_id: CaseId,
    att: &AttachmentRef,
    limits: &TransferLimits,
) -> Result<Vec<u8>, TransferError> {
    limits.check()?;
    let (hash, size) = (att.hash, att.size_bytes);
    if size > JOURNAL_BLOB_LEN_MAX {
        return Err(TransferError::Limits(format!(
            "{size} bytes is over {JOURNAL_BLOB_LEN_MAX} for a fetch to memory"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    let mut first_chunk = None;
    receive(conn, Sink::Memory { hash, bytes: &mut bytes, first_chunk: &mut first_chunk }, case_id, size, limits)
        .await?;
    // One chunk is the whole file: its checked hash is the file's.
    let actual = match first_chunk {
        Some(chunk_hash) if bytes.len() as u64 == size && size <= u64::from(limits.chunk_len) => chunk_hash,
        _ => ContentHash::of(&bytes),
    };
    if actual != hash {
        return Err(TransferError::FileHashMismatch { hash, actual });
    }
    Ok(bytes)
}

/// Attachments up to this size are received into memory and journaled in the store
/// with the commit that takes custody (one flush, ADR 0010), instead of being written
/// and fsynced as a file (two more flushes) before that commit.
pub const JOURNAL_BLOB_LEN_MAX: u64 = 1024 * 1024;

/// Where [`receive`] puts checked chunks.
enum Sink<'a> {
    File(&'a mut PartialWriter),
    /// Chunks appended to `bytes`; `first_chunk` is the checked hash of the first.
    Memory {
        hash: ContentHash,
        bytes: &'a mut Vec<u8>,
        first_chunk: &'a mut Option<ContentHash>,
    },
}

impl Sink<'_> {
    fn hash(&self) -> ContentHash {
        match self {
            Sink::File(w) => w.hash(),
            Sink::Memory { hash, .. } => *hash,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Sink::File(w) => w.len(),
            Sink::Memory { bytes, .. } => bytes.len() as u64,
        }
    }

    async fn put(&mut self, offset: u64, data: Vec<u8>, chunk_hash: ContentHash) -> Result<(), TransferError> {
        match self {
            Sink::File(w) => Ok(w.append_verified(offset, data, chunk_hash).await?),
            Sink::Memory { bytes, first_chunk, .. } => {
                first_chunk.get_or_insert(chunk_hash);
                bytes.extend_from_slice(&data);
                Ok(())
            }
        }
    }
}

/// Pipelines chunk requests from the sink's resume point to `size` and hands each
/// checked chunk, in order, to `sink`.
async fn receive(
    conn: &Connection,
    mut sink: Sink<'_>,
    case_id: CaseId,
    size: u64,
    limits: &TransferLimits,
) -> Result<(), TransferError> {
    let hash = sink.hash();
    let pacer = limits.bytes_per_s.map(Pacer::new);
    let mut received = sink.len();
    let mut requested = received;
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(limits.chunks_in_flight);
    while received < size {
        while in_flight.len() < limits.chunks_in_flight && requested < size {
            let len = (size - requested).min(u64::from(limits.chunk_len)) as u32;
            if let Some(pacer) = &pacer {
                pacer.pace(u64::from(len)).await;
            }
            let req = ChunkRequest { case_id, hash, offset: requested, len };
            in_flight.push_back(InFlight(tokio::spawn(request_chunk(conn.clone(), req, size))));
            requested += u64::from(len);
        }
        let mut front = in_flight.pop_front().expect("bytes outstanding, so a request is in flight");
        let data = match tokio::time::timeout(CHUNK_STALL_TIMEOUT, &mut front.0).await {
            Err(_) => return Err(TransferError::Stalled { hash }),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Ok(Err(join)) => return Err(TransferError::ConnectionLost { hash, detail: join.to_string() }),
            Ok(Ok(result)) => result?,
        };
        let (data, chunk_hash) = data;
        let n = data.len() as u64;
        debug_assert!(received + n <= size);
        sink.put(received, data, chunk_hash).await?;
        received += n;
    }
    debug_assert!(in_flight.is_empty());
    Ok(())
}

/// Fetches every attachment in `atts` that `blobs` does not hold yet, one after the
/// other: urgent attachments first, then smallest first. Stops at the first error.
pub async fn fetch_all(
    conn: &Connection,
    blobs: &BlobStore,
    case_id: CaseId,
    atts: &[AttachmentRef],
    limits: &TransferLimits,
) -> Result<(), TransferError> {
    let mut order: Vec<&AttachmentRef> = atts.iter().collect();
    order.sort_by_key(|a| (a.priority, a.size_bytes));
    for att in order {
        fetch(conn, blobs, case_id, att, limits).await?;
    }
    Ok(())
}

/// A pipelined chunk request; aborted if dropped before it is consumed (on error).
struct InFlight(JoinHandle<Result<(Vec<u8>, ContentHash), TransferError>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One exchange on its own stream: the request, then one response, checked against
/// the request in every field. Returns the chunk's data (and its hash) only if it is
/// exactly the range asked for and matches its hash.
async fn request_chunk(
    conn: Connection,
    req: ChunkRequest,
    size: u64,
) -> Result<(Vec<u8>, ContentHash), TransferError> {
    let (hash, offset) = (req.hash, req.offset);
    let lost = |detail: String| TransferError::ConnectionLost { hash, detail };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    transport::write_frame(&mut send, &Message::ChunkRequest(req.clone())).await.map_err(|e| lost(e.to_string()))?;
    let _ = send.finish();
    let answer = match transport::read_frame(&mut recv).await {
        Ok(message) => message,
        Err(TransportError::Frame(e)) => {
            return Err(TransferError::BadResponse { hash, offset, detail: e.to_string() });
        }
        Err(e) => return Err(lost(conn.close_reason().map_or_else(|| e.to_string(), |r| r.to_string()))),
    };
    let resp = match answer {
        Message::ChunkResponse(resp) => resp,
        Message::Reject(Reject { code, detail, .. }) => {
            return Err(TransferError::Rejected { hash, offset, code, detail });
        }
        other => {
            let detail = format!("expected chunk_response, got {}", other.kind());
            return Err(TransferError::BadResponse { hash, offset, detail });
        }
    };
    let bad = |detail: String| Err(TransferError::BadResponse { hash, offset, detail });
    if resp.hash != hash {
        return bad(format!("answer is for {:?}", resp.hash));
    }
    if resp.offset != offset {
        return bad(format!("answer is for offset {}", resp.offset));
    }
    if resp.total_size != size {
        return Err(TransferError::WrongSize { hash, expected: size, announced: resp.total_size });
    }
    if resp.data.len() as u64 != u64::from(req.len) {
        return bad(format!("{} bytes asked for, {} received", req.len, resp.data.len()));
    }
    // Hashed here, on the async worker: a chunk is at most CHUNK_LEN_MAX (256 KiB),
    // about 35 µs of BLAKE3 with AVX-512 and under 0.3 ms without SIMD. Handing each
    // chunk to the blocking pool instead cost more than the hash: on the 2-core
    // build machine the fetch of 1 GiB ran 3–15 % faster and used 0.1–0.6 s less
    // CPU without the handoff (docs/benchmarks.md).
    let actual = ContentHash::of(&resp.data);
    if actual != resp.chunk_hash {
        return Err(TransferError::HashMismatch { hash, offset });
    }
    Ok((resp.data, actual))
}

/// Answers one `ChunkRequest` on `send`, the stream it arrived on, and finishes the
/// stream: a `ChunkResponse` with the range (cut at [`CHUNK_LEN_MAX`] and at the end
/// of the blob) and its hash, or a `Reject` — `RangeOutOfBounds` for a range outside
/// the blob, `UnknownCase` when the blob is not here, `Malformed` for an empty
/// range. A refusal is returned as [`TransferError::RequestRefused`] after the peer
/// was told.
///
/// With a `pacer` (shared by everything this node uploads over a capped link), the
/// chunk's bytes are paid for before they are sent, so the answers to any number of
/// requests leave no faster than its rate. Refusals are not paced.
///
/// The caller must already have checked that this peer may read this blob.
pub async fn serve_chunk(
    blobs: &BlobStore,
    req: &ChunkRequest,
    send: &mut SendStream,
    pacer: Option<&Pacer>,
) -> Result<(), TransferError> {
    let hash = req.hash;
    let result = match blobs.read_chunk_hashed(&hash, req.offset, req.len).await {
        Ok(chunk) => Ok(Ok(chunk)),
        Err(BlobError::NotFound { .. }) => Ok(Err((RejectCode::UnknownCase, format!("no attachment {hash:?} here")))),
        Err(BlobError::RangeOutOfBounds { .. }) if req.len == 0 => {
            Ok(Err((RejectCode::Malformed, "empty range requested".to_owned())))
        }
        Err(BlobError::RangeOutOfBounds { offset, len, size, .. }) => Ok(Err((
            RejectCode::RangeOutOfBounds,
            format!("range {offset}+{len} lies outside the {size}-byte attachment"),
        ))),
        Err(e) => Err(e),
    };
    let lost = |e: TransportError| TransferError::ConnectionLost { hash, detail: e.to_string() };
    match result {
        Ok(Ok((total_size, data, chunk_hash))) => {
            if let Some(pacer) = pacer {
                pacer.pace(data.len() as u64).await;
            }
            let resp = ChunkResponse { hash, offset: req.offset, total_size, chunk_hash, data };
            transport::write_chunk_response(send, resp).await.map_err(lost)?;
            let _ = send.finish();
            Ok(())
        }
        Ok(Err((code, detail))) => {
            let reject = Reject { case_id: Some(req.case_id), code, detail: detail.clone() };
            transport::write_frame(send, &Message::Reject(reject)).await.map_err(lost)?;
            let _ = send.finish();
            Err(TransferError::RequestRefused { hash, code, detail })
        }
        Err(e) => {
            // Our disk failed: end the stream without an answer; the peer retries later.
            let _ = send.reset(0u32.into());
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::AcceptPolicy;
    use certs::ca::{CertificateAuthority, IntermediateOptions, RootOptions, Validity};
    use certs::enrol;
    use certs::keys::NodeCredentials;
    use certs::verify::{FederationVerifier, PeerIdentity, TrustStore};
    use federation_proto::{NodeClaim, NodeName, Priority, Tier};
    use quinn::Endpoint;
    use rand::RngCore;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
    const VILLAGE: &str = "v001.gaocheng.dengfeng.zhengzhou.henan.cn";
    const CASE: CaseId = CaseId([7; 16]);
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;

    // --- federation fixtures (as in node/tests/node.rs) ----------------------------

    struct Federation {
        _dir: tempfile::TempDir,
        trust: Arc<TrustStore>,
        county: Enrolled,
        village: Enrolled,
    }

    struct Enrolled {
        name: NodeName,
        tier: Tier,
        creds: NodeCredentials,
    }

    impl Enrolled {
        fn claim(&self) -> NodeClaim {
            NodeClaim { name: self.name.clone(), tier: self.tier, public_key: self.creds.public_key }
        }
    }

    fn enrol(ca: &mut CertificateAuthority, name: &str, tier: Tier) -> Enrolled {
        let (key_pem, csr_pem) = enrol::generate_key_and_csr(&NodeName::from(name), tier).unwrap();
        let issued = ca.sign_csr(&csr_pem, tier, Validity::Days(30)).unwrap();
        Enrolled { name: name.into(), tier, creds: NodeCredentials::from_pem(&issued.chain_pem, &key_pem).unwrap() }
    }

    /// Root → national → provincial CA, and a county and one of its villages.
    fn federation() -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(&dir.path().join("root"), &RootOptions::new("cn")).unwrap();
        let mut national = root
            .issue_intermediate(&dir.path().join("national"), &IntermediateOptions::new("cn", Tier::National))
            .unwrap();
        let mut henan = national
            .issue_intermediate(&dir.path().join("henan"), &IntermediateOptions::new("henan.cn", Tier::Provincial))
            .unwrap();
        let trust = Arc::new(TrustStore::from_root_pem(&root.root_pem()).unwrap());
        let county = enrol(&mut henan, COUNTY, Tier::County);
        let village = enrol(&mut henan, VILLAGE, Tier::Village);
        Federation { _dir: dir, trust, county, village }
    }

    fn verifier(trust: &Arc<TrustStore>) -> Arc<FederationVerifier> {
        Arc::new(FederationVerifier::new(trust.clone()))
    }

    fn identity(trust: &TrustStore, n: &Enrolled) -> PeerIdentity {
        trust.identity_of_peer(&n.creds.chain).unwrap()
    }

    // --- a county serving chunks, honestly or not ------------------------------------

    /// How the test server answers chunk requests.
    #[derive(Clone)]
    enum Behaviour {
        Honest,
        /// Flips a bit of the chunk at `offset` but sends the hash of the true data.
        CorruptChunk {
            offset: u64,
        },
        /// Flips a bit of the chunk at `offset` and sends the hash of what it sends:
        /// every chunk checks out, only the whole file does not.
        ConsistentLie {
            offset: u64,
        },
        /// Answers requests for the first `chunks` chunks; on any later request, waits
        /// until the client has stored those (`client` holds `hash`), then closes the
        /// connection.
        DropAfter {
            chunks: u64,
            client: BlobStore,
            hash: ContentHash,
            chunk_len: u64,
        },
        /// Honest, but every chunk sent is paid for to this shared pacer first.
        Paced(Pacer),
    }

    struct Server {
        endpoint: Endpoint,
        addr: SocketAddr,
        /// Requests received, in order of arrival.
        requests: Arc<Mutex<Vec<ChunkRequest>>>,
        served: Arc<AtomicUsize>,
        refused: Arc<Mutex<Vec<TransferError>>>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.endpoint.close(0u32.into(), b"test over");
        }
    }

    fn serve(fed: &Federation, blobs: &BlobStore, behaviour: Behaviour) -> Server {
        let endpoint =
            transport::endpoint("127.0.0.1:0".parse().unwrap(), &fed.county.creds, verifier(&fed.trust)).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let policy =
            AcceptPolicy { me: identity(&fed.trust, &fed.county), claim: fed.county.claim(), cross_links: vec![] };
        let server = Server {
            endpoint: endpoint.clone(),
            addr,
            requests: Arc::default(),
            served: Arc::default(),
            refused: Arc::default(),
        };
        let (trust, blobs) = (fed.trust.clone(), blobs.clone());
        let (requests, served, refused) = (server.requests.clone(), server.served.clone(), server.refused.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(link) = transport::accept(incoming, &policy, &trust).await else { continue };
                let (blobs, behaviour) = (blobs.clone(), behaviour.clone());
                let (requests, served, refused) = (requests.clone(), served.clone(), refused.clone());
                tokio::spawn(async move {
                    let conn = link.connection;
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let (blobs, behaviour, conn) = (blobs.clone(), behaviour.clone(), conn.clone());
                        let (requests, served, refused) = (requests.clone(), served.clone(), refused.clone());
                        tokio::spawn(async move {
                            let Ok(Message::ChunkRequest(req)) = transport::read_frame(&mut recv).await else {
                                return;
                            };
                            requests.lock().unwrap().push(req.clone());
                            match answer(&blobs, &behaviour, &conn, &req, &mut send).await {
                                Ok(true) => {
                                    served.fetch_add(1, Ordering::SeqCst);
                                }
                                Ok(false) => {}
                                Err(e) => refused.lock().unwrap().push(e),
                            }
                        });
                    }
                });
            }
        });
        server
    }

    /// Answers one request as `behaviour` says; true if it sent a chunk.
    async fn answer(
        blobs: &BlobStore,
        behaviour: &Behaviour,
        conn: &Connection,
        req: &ChunkRequest,
        send: &mut SendStream,
    ) -> Result<bool, TransferError> {
        match behaviour {
            Behaviour::CorruptChunk { offset } if *offset == req.offset => lie(blobs, req, send, false).await,
            Behaviour::ConsistentLie { offset } if *offset == req.offset => lie(blobs, req, send, true).await,
            Behaviour::DropAfter { chunks, client, hash, chunk_len } if req.offset >= chunks * chunk_len => {
                for _ in 0..500 {
                    if client.partial_len(hash).await >= chunks * chunk_len {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                conn.close(0u32.into(), b"dropped by the test");
                Ok(false)
            }
            Behaviour::Paced(pacer) => serve_chunk(blobs, req, send, Some(pacer)).await.map(|()| true),
            _ => serve_chunk(blobs, req, send, None).await.map(|()| true),
        }
    }

    /// Sends the chunk with one bit flipped, and either the true chunk's hash or
    /// (`consistent`) the hash of the flipped bytes.
    async fn lie(
        blobs: &BlobStore,
        req: &ChunkRequest,
        send: &mut SendStream,
        consistent: bool,
    ) -> Result<bool, TransferError> {
        let mut data = blobs.read_chunk(&req.hash, req.offset, req.len).await.unwrap();
        let mut chunk_hash = ContentHash::of(&data);
        data[0] ^= 1;
        if consistent {
            chunk_hash = ContentHash::of(&data);
        }
        let total_size = blobs.object_len(&req.hash).await.unwrap();
        let resp = ChunkResponse { hash: req.hash, offset: req.offset, total_size, chunk_hash, data };
        transport::write_chunk_response(send, resp).await.unwrap();
        let _ = send.finish();
        Ok(true)
    }

    /// Waits (bounded) until `cond` holds.
    async fn eventually(cond: impl Fn() -> bool) -> bool {
        for _ in 0..200 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// The village's link to the county at `addr`.
    async fn connect(fed: &Federation, addr: SocketAddr) -> Connection {
        let ep = transport::endpoint("127.0.0.1:0".parse().unwrap(), &fed.village.creds, verifier(&fed.trust)).unwrap();
        transport::connect(&ep, addr, &fed.county.name, &fed.village.claim(), &fed.trust).await.unwrap().connection
    }

    fn random_bytes(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rng().fill_bytes(&mut v);
        v
    }

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        (dir, store)
    }

    /// A county holding one attachment of `len` random bytes.
    async fn county_with(len: usize, priority: Priority) -> (tempfile::TempDir, BlobStore, Vec<u8>, AttachmentRef) {
        let (dir, blobs) = store();
        let bytes = random_bytes(len);
        let (hash, size) = blobs.import_bytes(&bytes).await.unwrap();
        let att = AttachmentRef {
            hash,
            size_bytes: size,
            media_type: "application/octet-stream".into(),
            name: String::new(),
            priority,
        };
        (dir, blobs, bytes, att)
    }

    fn limits(chunk_len: usize) -> TransferLimits {
        TransferLimits { chunk_len: chunk_len as u32, chunks_in_flight: 4, bytes_per_s: None }
    }

    // --- tests -----------------------------------------------------------------------

    #[tokio::test]
    async fn fetch_of_a_multi_megabyte_attachment_verifies_and_equals_the_source() {
        let fed = federation();
        let (_c, county, bytes, att) = county_with(5 * MIB + 123, Priority::Bulk).await;
        let server = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, server.addr).await;
        let (_v, village) = store();

        fetch(&conn, &village, CASE, &att, &TransferLimits::default()).await.unwrap();
        assert!(village.contains(&att.hash));
        assert_eq!(std::fs::read(village.path_of(&att.hash)).unwrap(), bytes);
        let chunks = (5 * MIB + 123).div_ceil(CHUNK_LEN_MAX as usize);
        assert!(eventually(|| server.served.load(Ordering::SeqCst) == chunks).await);

        // Fetching what is already held asks the peer for nothing.
        fetch(&conn, &village, CASE, &att, &TransferLimits::default()).await.unwrap();
        assert_eq!(server.requests.lock().unwrap().len(), 21);
    }

    #[tokio::test]
    async fn tampered_chunk_is_refused_and_a_retry_against_an_honest_peer_completes() {
        let fed = federation();
        let chunk = 64 * KIB;
        let (_c, county, bytes, att) = county_with(20 * chunk, Priority::Bulk).await;
        let bad_at = 7 * chunk as u64;
        let liar = serve(&fed, &county, Behaviour::CorruptChunk { offset: bad_at });
        let conn = connect(&fed, liar.addr).await;
        let (_v, village) = store();

        let err = fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap_err();
        assert!(
            matches!(err, TransferError::HashMismatch { hash, offset } if hash == att.hash && offset == bad_at),
            "{err}"
        );
        assert_eq!(err.reject_code(), Some(RejectCode::HashMismatch));
        assert!(!err.is_resumable());
        // Only the good prefix was stored.
        assert_eq!(village.partial_len(&att.hash).await, bad_at);
        let partial = std::fs::read(village.partial_path(&att.hash)).unwrap();
        assert_eq!(partial, &bytes[..bad_at as usize]);
        assert!(!village.contains(&att.hash));

        let honest = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, honest.addr).await;
        fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap();
        assert_eq!(std::fs::read(village.path_of(&att.hash)).unwrap(), bytes);
        assert!(eventually(|| honest.served.load(Ordering::SeqCst) == 20 - 7).await, "resumed at the bad chunk");
    }

    #[tokio::test]
    async fn consistent_lie_fails_the_whole_file_check_and_never_becomes_an_object() {
        let fed = federation();
        let chunk = 64 * KIB;
        let (_c, county, _bytes, att) = county_with(10 * chunk, Priority::Bulk).await;
        let liar = serve(&fed, &county, Behaviour::ConsistentLie { offset: 3 * chunk as u64 });
        let conn = connect(&fed, liar.addr).await;
        let (_v, village) = store();

        let err = fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap_err();
        assert!(matches!(err, TransferError::FileHashMismatch { hash, .. } if hash == att.hash), "{err}");
        assert!(!village.contains(&att.hash));
        assert!(!village.path_of(&att.hash).exists());
        assert_eq!(village.partial_len(&att.hash).await, 0, "bad bytes are deleted");
    }

    /// The in-memory fetch (small attachments, ADR 0010) checks the whole file too:
    /// for one chunk through the chunk's own checked hash, for several by hashing
    /// them all. A sender that lies consistently (bytes and chunk hash agree, the
    /// file hash does not) is refused either way, and an honest one gives the bytes.
    #[tokio::test]
    async fn fetch_to_memory_checks_the_whole_file_with_one_chunk_or_many() {
        let fed = federation();
        let chunk = 64 * KIB;
        for (what, len) in [("one chunk", chunk - 17), ("one full chunk", chunk), ("four chunks", 4 * chunk - 5)] {
            let (_c, county, bytes, att) = county_with(len, Priority::Urgent).await;
            let liar = serve(&fed, &county, Behaviour::ConsistentLie { offset: 0 });
            let conn = connect(&fed, liar.addr).await;
            let err = fetch_to_memory(&conn, CASE, &att, &limits(chunk)).await.unwrap_err();
            assert!(matches!(err, TransferError::FileHashMismatch { hash, .. } if hash == att.hash), "{what}: {err}");

            let honest = serve(&fed, &county, Behaviour::Honest);
            let conn = connect(&fed, honest.addr).await;
            let got = fetch_to_memory(&conn, CASE, &att, &limits(chunk)).await.unwrap();
            assert!(got == bytes, "{what}: the bytes fetched differ from the source");
        }
    }

    #[tokio::test]
    async fn dropped_link_resumes_from_the_bytes_received() {
        let fed = federation();
        let chunk = 64 * KIB;
        let total_chunks = 40;
        let (_c, county, bytes, att) = county_with(total_chunks * chunk - 1000, Priority::Bulk).await;
        let (_v, village) = store();
        let flaky = serve(
            &fed,
            &county,
            Behaviour::DropAfter { chunks: 13, client: village.clone(), hash: att.hash, chunk_len: chunk as u64 },
        );
        let conn = connect(&fed, flaky.addr).await;

        let err = fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap_err();
        assert!(matches!(err, TransferError::ConnectionLost { .. }), "{err}");
        assert!(err.is_resumable());
        assert_eq!(village.partial_len(&att.hash).await, 13 * chunk as u64);

        // A new link (as after a restart: the resume point is on disk).
        let village = BlobStore::open(_v.path()).unwrap();
        let honest = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, honest.addr).await;
        fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap();
        assert!(
            eventually(|| honest.served.load(Ordering::SeqCst) == total_chunks - 13).await,
            "only the missing chunks are fetched again: {}",
            honest.served.load(Ordering::SeqCst)
        );
        assert_eq!(honest.requests.lock().unwrap()[0].offset, 13 * chunk as u64);
        assert_eq!(ContentHash::of(&std::fs::read(village.path_of(&att.hash)).unwrap()), att.hash);
        assert_eq!(std::fs::read(village.path_of(&att.hash)).unwrap(), bytes);
    }

    #[tokio::test]
    async fn transfer_cut_at_random_points_completes_with_the_right_hash() {
        use rand::Rng;
        let fed = federation();
        let chunk = 32 * KIB;
        let total_chunks = 50u64;
        let (_c, county, bytes, att) = county_with(total_chunks as usize * chunk - 77, Priority::Bulk).await;
        let (v, _) = store();
        let mut cut_at = 0;
        for _ in 0..4 {
            cut_at = rand::rng().random_range(cut_at + 1..cut_at + total_chunks / 5);
            // Each try is a new process's store and a new link.
            let village = BlobStore::open(v.path()).unwrap();
            let behaviour = Behaviour::DropAfter {
                chunks: cut_at,
                client: village.clone(),
                hash: att.hash,
                chunk_len: chunk as u64,
            };
            let flaky = serve(&fed, &county, behaviour);
            let conn = connect(&fed, flaky.addr).await;
            let err = fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap_err();
            assert!(err.is_resumable(), "{err}");
            assert_eq!(village.partial_len(&att.hash).await, cut_at * chunk as u64);
        }
        let village = BlobStore::open(v.path()).unwrap();
        let honest = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, honest.addr).await;
        fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap();
        assert_eq!(ContentHash::of(&std::fs::read(village.path_of(&att.hash)).unwrap()), att.hash);
        assert_eq!(std::fs::read(village.path_of(&att.hash)).unwrap(), bytes);
        assert_eq!(honest.requests.lock().unwrap().len() as u64, total_chunks - cut_at);
    }

    #[tokio::test]
    async fn fetch_all_takes_urgent_attachments_first_then_smallest_first() {
        let fed = federation();
        let (_c, county) = store();
        let mut atts = Vec::new();
        for (len, priority) in [
            (300 * KIB, Priority::Bulk),
            (200 * KIB, Priority::Urgent),
            (5 * KIB, Priority::Bulk),
            (9, Priority::Urgent),
        ] {
            let (hash, size_bytes) = county.import_bytes(&random_bytes(len)).await.unwrap();
            atts.push(AttachmentRef { hash, size_bytes, media_type: String::new(), name: String::new(), priority });
        }
        let server = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, server.addr).await;
        let (_v, village) = store();

        fetch_all(&conn, &village, CASE, &atts, &TransferLimits::default()).await.unwrap();
        assert!(atts.iter().all(|a| village.contains(&a.hash)));
        let mut first_seen: Vec<ContentHash> = Vec::new();
        for req in server.requests.lock().unwrap().iter() {
            if !first_seen.contains(&req.hash) {
                first_seen.push(req.hash);
            }
        }
        assert_eq!(first_seen, [atts[3].hash, atts[1].hash, atts[2].hash, atts[0].hash]);
    }

    #[tokio::test]
    async fn rate_cap_makes_a_transfer_take_at_least_size_over_rate() {
        let fed = federation();
        let (_c, county, _bytes, att) = county_with(MIB, Priority::Bulk).await;
        let server = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, server.addr).await;
        let (_v, village) = store();
        let bytes_per_s = 4 * MIB as u64;
        let capped = TransferLimits { chunk_len: 64 * KIB as u32, chunks_in_flight: 4, bytes_per_s: Some(bytes_per_s) };

        let started = std::time::Instant::now();
        fetch(&conn, &village, CASE, &att, &capped).await.unwrap();
        let took = started.elapsed();
        let floor = Duration::from_secs_f64(att.size_bytes as f64 / bytes_per_s as f64);
        assert!(took >= floor.mul_f64(0.9), "took {took:?}, the cap allows no less than {floor:?}");
        assert!(village.contains(&att.hash));
    }

    #[tokio::test]
    async fn out_of_range_and_unknown_requests_are_refused() {
        let fed = federation();
        let (_c, county, _bytes, att) = county_with(1000, Priority::Urgent).await;
        let server = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, server.addr).await;

        let ask = |offset: u64, len: u32, hash: ContentHash| {
            let conn = conn.clone();
            async move {
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                let req = ChunkRequest { case_id: CASE, hash, offset, len };
                transport::write_frame(&mut send, &Message::ChunkRequest(req)).await.unwrap();
                send.finish().unwrap();
                transport::read_frame(&mut recv).await.unwrap()
            }
        };
        for (offset, len, hash, code) in [
            (1000, 1, att.hash, RejectCode::RangeOutOfBounds),
            (u64::MAX, CHUNK_LEN_MAX, att.hash, RejectCode::RangeOutOfBounds),
            (0, 0, att.hash, RejectCode::Malformed),
            (0, 10, ContentHash([1; 32]), RejectCode::UnknownCase),
        ] {
            match ask(offset, len, hash).await {
                Message::Reject(r) => {
                    assert_eq!((r.code, r.case_id), (code, Some(CASE)), "{offset}+{len}: {}", r.detail)
                }
                other => panic!("{offset}+{len}: expected a reject, got {other:?}"),
            }
        }
        assert!(eventually(|| server.refused.lock().unwrap().len() == 4).await);
        let refused = std::mem::take(&mut *server.refused.lock().unwrap());
        let codes: Vec<RejectCode> = refused
            .iter()
            .filter_map(|e| match e {
                TransferError::RequestRefused { code, .. } => Some(*code),
                _ => None,
            })
            .collect();
        assert_eq!(codes.len(), 4, "{refused:?}");
        for code in [RejectCode::RangeOutOfBounds, RejectCode::Malformed, RejectCode::UnknownCase] {
            assert!(codes.contains(&code), "{codes:?}");
        }

        // A fetch that runs into a refusal says so.
        let (_v, village) = store();
        let missing = AttachmentRef { hash: ContentHash([2; 32]), size_bytes: 10, ..att.clone() };
        let err = fetch(&conn, &village, CASE, &missing, &TransferLimits::default()).await.unwrap_err();
        assert!(matches!(err, TransferError::Rejected { code: RejectCode::UnknownCase, .. }), "{err}");
        // A manifest size the peer disagrees with is refused before anything is stored.
        let wrong = AttachmentRef { size_bytes: 999, ..att.clone() };
        let err = fetch(&conn, &village, CASE, &wrong, &TransferLimits::default()).await.unwrap_err();
        assert!(matches!(err, TransferError::WrongSize { expected: 999, announced: 1000, .. }), "{err}");
        assert_eq!(village.partial_len(&att.hash).await, 0);
    }

    #[tokio::test]
    async fn resume_rehashes_the_prefix_on_disk_and_catches_a_chunk_tampered_there() {
        let fed = federation();
        let chunk = 64 * KIB;
        let total_chunks = 20;
        let (_c, county, bytes, att) = county_with(total_chunks * chunk, Priority::Bulk).await;
        let (v, village) = store();
        let flaky = serve(
            &fed,
            &county,
            Behaviour::DropAfter { chunks: 5, client: village.clone(), hash: att.hash, chunk_len: chunk as u64 },
        );
        let conn = connect(&fed, flaky.addr).await;
        let err = fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap_err();
        assert!(err.is_resumable(), "{err}");
        assert_eq!(village.partial_len(&att.hash).await, 5 * chunk as u64);

        // While the node is down, a checked chunk already on disk is damaged.
        let partial = village.partial_path(&att.hash);
        let mut on_disk = std::fs::read(&partial).unwrap();
        on_disk[2 * chunk + 100] ^= 0x40;
        std::fs::write(&partial, &on_disk).unwrap();

        // The restarted node resumes at chunk 5 (the damaged prefix is not fetched
        // again), but its running hash starts from the bytes on disk.
        let village = BlobStore::open(v.path()).unwrap();
        let honest = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, honest.addr).await;
        let err = fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap_err();
        let mut tampered = on_disk.clone();
        tampered.extend_from_slice(&bytes[5 * chunk..]);
        assert!(
            matches!(err, TransferError::FileHashMismatch { hash, actual }
                if hash == att.hash && actual == ContentHash::of(&tampered)),
            "{err}"
        );
        assert_eq!(honest.requests.lock().unwrap()[0].offset, 5 * chunk as u64);
        assert!(!village.contains(&att.hash));
        assert!(!village.path_of(&att.hash).exists());
        assert_eq!(village.partial_len(&att.hash).await, 0, "the damaged bytes are deleted");

        // The next try starts over and completes.
        fetch(&conn, &village, CASE, &att, &limits(chunk)).await.unwrap();
        assert_eq!(std::fs::read(village.path_of(&att.hash)).unwrap(), bytes);
    }

    #[tokio::test]
    async fn serve_side_pacer_caps_everything_it_uploads() {
        let fed = federation();
        let (_c, county, _bytes, first) = county_with(512 * KIB, Priority::Bulk).await;
        let (hash, size_bytes) = county.import_bytes(&random_bytes(512 * KIB)).await.unwrap();
        let second = AttachmentRef { hash, size_bytes, ..first.clone() };
        let bytes_per_s = 4 * MIB as u64;
        let server = serve(&fed, &county, Behaviour::Paced(Pacer::new(bytes_per_s)));
        // Two villages on two links, fetching at once with no cap of their own.
        let (conn_a, conn_b) = (connect(&fed, server.addr).await, connect(&fed, server.addr).await);
        let ((_va, village_a), (_vb, village_b)) = (store(), store());
        let fast = TransferLimits { chunk_len: 64 * KIB as u32, chunks_in_flight: 8, bytes_per_s: None };

        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(
            fetch(&conn_a, &village_a, CASE, &first, &fast),
            fetch(&conn_b, &village_b, CASE, &second, &fast)
        );
        let took = started.elapsed();
        a.unwrap();
        b.unwrap();
        assert!(village_a.contains(&first.hash) && village_b.contains(&second.hash));
        // Bytes are paid for before they are sent: 1 MiB at 4 MiB/s, shared.
        let floor = Duration::from_secs_f64((first.size_bytes + second.size_bytes) as f64 / bytes_per_s as f64);
        assert!(took >= floor.mul_f64(0.95), "took {took:?}, the shared cap allows no less than {floor:?}");
    }

    #[tokio::test]
    async fn limits_out_of_range_are_refused() {
        let fed = federation();
        let (_c, county, _bytes, att) = county_with(10, Priority::Urgent).await;
        let server = serve(&fed, &county, Behaviour::Honest);
        let conn = connect(&fed, server.addr).await;
        let (_v, village) = store();
        for bad in [
            TransferLimits { chunk_len: 0, ..Default::default() },
            TransferLimits { chunk_len: CHUNK_LEN_MAX + 1, ..Default::default() },
            TransferLimits { chunks_in_flight: 0, ..Default::default() },
            TransferLimits { chunks_in_flight: CHUNKS_IN_FLIGHT_MAX + 1, ..Default::default() },
            TransferLimits { bytes_per_s: Some(0), ..Default::default() },
        ] {
            let err = fetch(&conn, &village, CASE, &att, &bad).await.unwrap_err();
            assert!(matches!(err, TransferError::Limits(_)), "{bad:?}: {err}");
        }
        assert!(server.requests.lock().unwrap().is_empty());
    }
}
