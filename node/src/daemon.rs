//! The daemon: drives one `tiers::Node` with real time, QUIC links, the SQLite store
//! and the blob directory.
//!
//! One task owns the core. Everything else (links, attachment transfers, the control
//! socket, simulated experts, timers) talks to it through a bounded channel of
//! [`Input`]s. After every input the task acts on the core's outputs **in order**;
//! an `Output::Persist` is awaited until the store has committed it before any later
//! output is acted on. If the store fails, the daemon stops (fail-stop): on restart
//! the core is restored from what is durable, and custody rules make re-sending safe.
//!
//! Writes are group-committed (see [`Core::drain`]); small attachments are journaled
//! in the store with the commit that takes custody of them (ADR 0010). Shutdown waits
//! for running fetches and closes the store: nothing is written to the data
//! directory after [`Running::shutdown`] returns.
//!
//! This module must never decide where a case goes: it only executes the core's
//! outputs and feeds it inputs.

use crate::blobs::BlobStore;
use crate::config::Config;
use crate::store::Store;
use crate::transfer::{self, TransferLimits};
use crate::transport::{self, AcceptPolicy, Link, LiveLinks};
use crate::view::{CaseView, now};
use certs::FederationVerifier;
use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use federation_proto::{
    AttachmentRef, CaseId, ContentHash, Message, NodeClaim, NodeName, PatientRef, Priority, Reject, RejectCode,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tiers::{Event, ExpertPool, NewCase, Node, NodeConfig, Output, Peer, ReportDraft, Upstream};
use tokio::sync::{mpsc, oneshot};

#[path = "control_plane/glue.rs"]
mod control_glue;

/// Inputs queued for the core task at most (senders wait when it is full).
pub const INPUT_QUEUE_MAX: usize = 1024;
/// A message that a peer has not taken within this long means the link is dead.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer has this long to deliver one frame on a stream it opened.
pub const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most inputs the core task handles before it commits their writes together (group
/// commit across inputs: under load, one flush serves many cases).
pub const INPUT_BATCH_MAX: usize = 64;
/// On shutdown, attachment fetches still running get this long to stop (their links
/// are closed first, so they only finish the local disk work they started: writing
/// queued chunks, or installing a blob that arrived whole); any still running after
/// it are aborted, which leaves at most a partial file that a later fetch resumes.
pub const SHUTDOWN_FETCH_WAIT: Duration = Duration::from_secs(10);
/// Bytes of small attachments held in memory at most, between their fetch and the
/// commit that journals them (ADR 0010); past it, small ones go the file way too.
pub const JOURNAL_BYTES_IN_FLIGHT_MAX: usize = 64 * 1024 * 1024;
/// Journaled blobs whose files are fsynced in one background batch at most; their
/// journal rows are dropped with later commits ([`JOURNAL_FORGETS_PER_COMMIT`]).
pub const JOURNAL_SYNC_BATCH_MAX: usize = 256;
/// Journal rows of durable blobs dropped with one commit at most, besides one for
/// each blob that commit journals (so the drops keep up with the arrivals). Dropping
/// a row frees its ~30 overflow pages, about 75 µs each row on the machine of
/// docs/benchmarks.md; a commit carrying a whole sync batch of them (60–70 under a
/// steady stream of cases) took 6–8 ms, and the case whose custody commit it was
/// waited for all of it: that was the tail of the per-hop latency (issue #4).
pub const JOURNAL_FORGETS_PER_COMMIT: usize = 4;
/// When durable blobs' journal rows wait and nothing else commits for this long, a
/// commit of its own drops [`JOURNAL_FORGETS_PER_COMMIT`] of them.
pub const JOURNAL_FORGET_IDLE: Duration = Duration::from_millis(100);
/// A background sync of journaled blobs' files waits this long before it starts, so
/// that one sync (a few flushes) serves every blob received meanwhile and stays out
/// of the way of the commits that custody waits for.
pub const JOURNAL_SYNC_DELAY: Duration = Duration::from_millis(200);
/// Writes whose only dependent messages are offer acceptances wait at most this long
/// for a later commit to ride with (see [`Core::drain`]): the commit that takes
/// custody of a small case, a few milliseconds later, then also makes its
/// `receiving` state durable, and the offer costs no flush of its own. Far below a
/// sender's first offer retry (2 s).
pub const COMMIT_DEFER_MAX: Duration = Duration::from_millis(20);

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("blobs: {0}")]
    Blobs(#[from] crate::blobs::BlobError),
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    #[error("the node has stopped")]
    Stopped,
}

/// A case as a client submits it: files on this machine plus what they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// Files on this machine; may be empty when `study` names a received study.
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// A study received from a device (C-STORE or inbox), by StudyInstanceUID.
    #[serde(default)]
    pub study: Option<String>,
    pub modality: federation_proto::Modality,
    pub urgency: federation_proto::Urgency,
    pub question: String,
    /// The patient ID (e.g. the national ID-card number). It never leaves this node
    /// as such: the case carries a pseudonym of it (see `deid.rs`, ADR 0005).
    pub patient: String,
    #[serde(default)]
    pub task: Option<String>,
    /// Further direct identifiers, kept beside the case and sent only to tiers the
    /// privacy policy allows.
    #[serde(default)]
    pub details: PatientDetails,
}

/// A patient's direct identifiers besides the ID (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientDetails {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub birth_date: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub phone: String,
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub tier: String,
    pub links: Vec<(String, String)>,
    pub cases: Vec<CaseLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseLine {
    pub case_id: String,
    pub origin: String,
    pub modality: String,
    pub urgency: String,
    pub status: String,
    pub where_: String,
    pub since_ms: u64,
    pub deadline_at_ms: u64,
    pub read_by: Option<String>,
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    pub cases_submitted: AtomicU64,
    pub custody_taken: AtomicU64,
    pub custody_passed: AtomicU64,
    pub reports_signed: AtomicU64,
    pub reports_at_origin: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub peer_refusals: AtomicU64,
    pub links_up: AtomicU64,
    /// The live ATNA audit export (`[audit.syslog]`, atna_sender.rs).
    pub atna: Arc<crate::atna_sender::SenderMetrics>,
}

impl Metrics {
    pub fn render(&self, node: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, help, v) in [
            ("telemed_cases_submitted_total", "Cases created at this node", g(&self.cases_submitted)),
            ("telemed_custody_taken_total", "Cases taken into custody from children", g(&self.custody_taken)),
            ("telemed_custody_passed_total", "Cases handed to a parent with a receipt", g(&self.custody_passed)),
            ("telemed_reports_signed_total", "Reports signed at this node", g(&self.reports_signed)),
            ("telemed_reports_at_origin_total", "Reports delivered to this origin", g(&self.reports_at_origin)),
            ("telemed_messages_in_total", "Messages received from peers", g(&self.messages_in)),
            ("telemed_messages_out_total", "Messages sent to peers", g(&self.messages_out)),
            ("telemed_peer_refusals_total", "Peer messages refused", g(&self.peer_refusals)),
            ("telemed_links_up", "Links currently up", g(&self.links_up)),
            ("telemed_audit_syslog_sent_total", "Audit records delivered to the ATNA repository", g(&self.atna.sent)),
            (
                "telemed_audit_syslog_behind",
                "Audit records not yet delivered to the ATNA repository",
                g(&self.atna.behind),
            ),
            (
                "telemed_audit_syslog_connection_failures_total",
                "ATNA repository connections that failed or ended",
                g(&self.atna.connection_failures),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {}\n{name}{{node=\"{node}\"}} {v}\n",
                if name.ends_with("_total") { "counter" } else { "gauge" }
            ));
        }
        out
    }
}

enum Input {
    PeerUp(Box<Link>),
    PeerDown {
        peer: NodeName,
        connection_id: usize,
    },
    Message {
        from: NodeName,
        message: Box<Message>,
    },
    Stored {
        case_id: CaseId,
        hash: ContentHash,
    },
    FetchDone {
        case_id: CaseId,
        hash: ContentHash,
        error: Option<String>,
    },
    /// A small attachment arrived whole and verified, in memory: it is journaled with
    /// the next commit and its file written after it (ADR 0010).
    Received {
        case_id: CaseId,
        hash: ContentHash,
        bytes: Arc<Vec<u8>>,
        permit: tokio::sync::OwnedSemaphorePermit,
    },
    /// A background sync of journaled blobs' files ended.
    BlobsSynced(Vec<ContentHash>, Result<(), String>),
    Submit(SubmitRequest, oneshot::Sender<Result<CaseId, String>>),
    Status(oneshot::Sender<StatusReport>),
    Show(CaseId, oneshot::Sender<Option<CaseView>>),
    Studies(oneshot::Sender<Result<Vec<crate::ingest::StudySummary>, String>>),
    ExpertClaim {
        case_id: CaseId,
        expert: String,
    },
    ExpertSign {
        case_id: CaseId,
        expert: String,
    },
    /// A person at the consult queue (web UI) acts on a case; the core decides.
    Expert {
        case_id: CaseId,
        expert: String,
        action: ExpertAction,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Every case held here, as people see it, with its queue state.
    Snapshot(oneshot::Sender<Vec<CaseSnapshot>>),
    /// What the admin page shows.
    Admin(oneshot::Sender<AdminSnapshot>),
    /// Something people did that the audit log must hold (e.g. a web login).
    Audit {
        kind: String,
        detail: String,
    },
    /// An audit record that must be durable before its sender goes on (FHIR API
    /// requests): answered once the group commit holding it has committed.
    AuditDurable(crate::store::Write, oneshot::Sender<()>),
    /// A local model finished reading a case (see `triage`).
    ModelDone {
        case_id: CaseId,
        outcome: Result<tiers::ModelOutcome, String>,
    },
    Shutdown,
    Control(Box<crate::control_plane::FromControl>),
    AdvertTick,
    LoadCrl(String, oneshot::Sender<Result<String, String>>),
    KnownAdverts(oneshot::Sender<Vec<federation_proto::CapacityAdvert>>),
}

/// What an expert at the consult queue can do to a case (web UI). Each becomes the
/// matching `tiers::Node::handle_*` call.
#[derive(Debug, Clone)]
pub enum ExpertAction {
    Claim,
    Release,
    /// Sign and return a report the expert wrote (structured fields and free text).
    Sign(ReportDraft),
    /// Send the case on to the tier above, with the expert's reason.
    Escalate(String),
}

/// A case held at this node, with what the consult queue needs beyond [`CaseView`].
#[derive(Debug, Clone)]
pub struct CaseSnapshot {
    pub view: CaseView,
    /// Set while the case waits in the local consult queue.
    pub claim_deadline_ms: Option<u64>,
    /// The expert reading it, while claimed.
    pub claimed_by: Option<String>,
    /// The expert whose claim lapsed (they may still sign while nobody else claims).
    pub lapsed_claim: Option<String>,
    /// The child that handed it here; `None` for cases created at this node.
    pub came_from: Option<String>,
    /// The attachments' content hashes (blob store keys), in `view.attachments` order.
    pub attachment_hashes: Vec<ContentHash>,
}

/// A change people should see at once (the web UI's server-sent events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiEvent {
    /// What happened, as in the audit log (`case.queued`, `report.at_origin`, ...).
    pub kind: String,
    pub case_id: Option<String>,
}

/// Events buffered per web subscriber; a slower one skips ahead (it reloads).
pub const UI_EVENTS_MAX: usize = 256;

/// What the admin page shows about this node.
#[derive(Debug, Clone)]
pub struct AdminSnapshot {
    pub status: StatusReport,
    /// This node's current capacity advert (what it tells peers it can read).
    pub advert: Option<federation_proto::CapacityAdvert>,
    /// The most recent audit records, oldest first.
    pub audit: Vec<crate::store::AuditRecord>,
    pub metrics: String,
}

/// A running node: its address and a handle to talk to it.
pub struct Running {
    pub name: NodeName,
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// Where the web UI listens, when the configuration has a `[web]` section.
    pub web_addr: Option<SocketAddr>,
    /// Where the FHIR API listens, when `[fhir]` is configured.
    pub fhir_addr: Option<SocketAddr>,
    /// The control plane, if `[control]` is configured.
    pub control_plane: Option<crate::control_plane::ControlPlaneHandle>,
    control: ControlHandle,
    task: tokio::task::JoinHandle<Result<(), DaemonError>>,
    /// Accept loop, parent dialers, metrics server: stopped on shutdown.
    background: Vec<tokio::task::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
}

impl std::ops::Deref for Running {
    type Target = ControlHandle;
    /// Submit, status and show are the control handle's.
    fn deref(&self) -> &ControlHandle {
        &self.control
    }
}

impl Running {
    pub fn sender(&self) -> ControlHandle {
        self.control.clone()
    }

    /// Stops accepting work, closes links and waits for the core task.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        for task in &self.background {
            task.abort();
        }
        self.control.shutdown().await;
        let result = self.task.await.unwrap_or(Err(DaemonError::Stopped));
        self.endpoint.close(0u32.into(), b"shutdown");
        result
    }

    /// Waits until the core task ends (it ends on shutdown or on a store failure).
    pub async fn wait(self) -> Result<(), DaemonError> {
        let result = self.task.await.unwrap_or(Err(DaemonError::Stopped));
        for task in &self.background {
            task.abort();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        result
    }
}

/// A cloneable handle for the control socket.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Input>,
    events: tokio::sync::broadcast::Sender<UiEvent>,
}

impl ControlHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Input) -> Result<T, DaemonError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| DaemonError::Stopped)?;
        rx.await.map_err(|_| DaemonError::Stopped)
    }
    pub async fn submit(&self, req: SubmitRequest) -> Result<Result<CaseId, String>, DaemonError> {
        self.ask(|tx| Input::Submit(req, tx)).await
    }
    pub async fn status(&self) -> Result<StatusReport, DaemonError> {
        self.ask(Input::Status).await
    }
    pub async fn show(&self, id: CaseId) -> Result<Option<CaseView>, DaemonError> {
        self.ask(|tx| Input::Show(id, tx)).await
    }
    /// Studies received from devices and not yet submitted.
    pub async fn studies(&self) -> Result<Result<Vec<crate::ingest::StudySummary>, String>, DaemonError> {
        self.ask(Input::Studies).await
    }
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Input::Shutdown).await;
    }
    /// An expert's action on a case (claim, release, sign, escalate), through the core.
    pub async fn expert(
        &self,
        case_id: CaseId,
        expert: &str,
        action: ExpertAction,
    ) -> Result<Result<(), String>, DaemonError> {
        let expert = expert.to_owned();
        self.ask(|reply| Input::Expert { case_id, expert, action, reply }).await
    }
    /// Every case held here, with its queue state.
    pub async fn snapshot(&self) -> Result<Vec<CaseSnapshot>, DaemonError> {
        self.ask(Input::Snapshot).await
    }
    /// Identity, links, queues, capacity advert and recent audit records.
    pub async fn admin(&self) -> Result<AdminSnapshot, DaemonError> {
        self.ask(Input::Admin).await
    }
    /// Appends `kind`/`detail` to the node's audit log (web logins and the like).
    pub async fn audit(&self, kind: &str, detail: &str) -> Result<(), DaemonError> {
        let input = Input::Audit { kind: kind.to_owned(), detail: detail.to_owned() };
        self.tx.send(input).await.map_err(|_| DaemonError::Stopped)
    }
    /// Appends `write` (an audit record) to the node's audit log and returns once
    /// it is committed (group commit). Err if the node stopped or its store failed.
    pub async fn audit_durable(&self, write: crate::store::Write) -> Result<(), DaemonError> {
        self.ask(|tx| Input::AuditDurable(write, tx)).await
    }
    /// Changes to cases as they happen (for live pages).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<UiEvent> {
        self.events.subscribe()
    }
    /// Loads a CRL (PEM with its issuer's chain): data-plane links it revokes close
    /// and, with a control plane, it is gossiped to the federation. Returns the issuer.
    pub async fn load_crl(&self, pem: String) -> Result<Result<String, String>, DaemonError> {
        self.ask(|tx| Input::LoadCrl(pem, tx)).await
    }
    /// The fresh capacity adverts the core holds from other nodes.
    pub async fn known_adverts(&self) -> Result<Vec<federation_proto::CapacityAdvert>, DaemonError> {
        self.ask(Input::KnownAdverts).await
    }
}

/// Blobs each peer may read: the attachments of cases offered to it.
type Authorized = Arc<Mutex<BTreeMap<NodeName, BTreeSet<ContentHash>>>>;

struct Core {
    config: Config,
    core: Node,
    store: Store,
    blobs: BlobStore,
    studies: crate::ingest::StudyStore,
    /// Pseudonyms and DICOM de-identification at submission (privacy boundary).
    deid: Arc<crate::deid::Deidentifier>,
    links: BTreeMap<NodeName, Link>,
    live: LiveLinks,
    authorized: Authorized,
    fetching: BTreeSet<(CaseId, ContentHash)>,
    /// The attachment fetches running, so that shutdown can wait for them: a fetch
    /// writes into the data directory, and nothing may write there once
    /// [`Running::shutdown`] has returned.
    fetches: tokio::task::JoinSet<()>,
    /// Bounds the bytes of small attachments between fetch and install.
    journal_budget: Arc<tokio::sync::Semaphore>,
    /// Journaled blobs of the writes pending: their files are written once those
    /// writes have committed, before anything that may read them happens.
    to_install: Vec<(ContentHash, Arc<Vec<u8>>, tokio::sync::OwnedSemaphorePermit)>,
    /// Journaled blobs whose files are not known to be durable yet.
    unsynced: Vec<ContentHash>,
    /// Journaled blobs whose files are durable: their rows go with later commits.
    synced: Vec<ContentHash>,
    /// When some of `synced` go in a commit of their own if no other commit took them.
    forget_due: Option<tokio::time::Instant>,
    /// The background sync of journaled blobs' files (at most one runs).
    syncs: tokio::task::JoinSet<()>,
    /// Offer acceptances held back with the writes they follow (see [`Core::drain`]).
    deferred: Vec<Output>,
    /// When the deferred writes must commit at the latest.
    commit_due: Option<tokio::time::Instant>,
    /// Commit whatever is pending at the next drain (deadline reached, shutdown).
    force_commit: bool,
    tx: mpsc::Sender<Input>,
    metrics: Arc<Metrics>,
    ui_events: tokio::sync::broadcast::Sender<UiEvent>,
    limits: TransferLimits,
    /// The rate cap on what this node serves to peers (a village's uplink), shared
    /// by every link.
    upload_pacer: Option<Arc<transfer::Pacer>>,
    trust: Arc<TrustStore>,
    control: Option<control_glue::ControlGlue>,
    /// Local AI models (answers `Output::RunModel`).
    models: crate::triage::ModelHost,
    /// Writes (persists and audit records) of the inputs handled since the last
    /// commit; [`Core::drain`] commits them in one transaction before any message
    /// that may depend on them leaves.
    pending: Vec<crate::store::Write>,
    /// UI events of those inputs, published once their writes committed.
    ui_pending: Vec<UiEvent>,
    /// Senders waiting for their audit records to commit ([`Input::AuditDurable`]).
    committed_pending: Vec<oneshot::Sender<()>>,
    /// Wakes the live ATNA export after a commit (capacity 1, `try_send`: never waits).
    atna_wake: Option<mpsc::Sender<()>>,
}

/// Starts a node from its configuration: opens the store and blobs, restores the
/// core, binds the QUIC endpoint, dials parents, serves children.
pub async fn start(config: Config) -> Result<Running, DaemonError> {
    let chain_pem = std::fs::read_to_string(&config.tls.chain)
        .map_err(|e| DaemonError::Credentials(format!("{}: {e}", config.tls.chain.display())))?;
    let key_pem = std::fs::read_to_string(&config.tls.key)
        .map_err(|e| DaemonError::Credentials(format!("{}: {e}", config.tls.key.display())))?;
    let root_pem = std::fs::read_to_string(&config.tls.root)
        .map_err(|e| DaemonError::Credentials(format!("{}: {e}", config.tls.root.display())))?;
    let creds = NodeCredentials::from_pem(&chain_pem, &key_pem).map_err(|e| DaemonError::Credentials(e.to_string()))?;
    let signing_key =
        certs::keys::signing_key_from_pem(&key_pem).map_err(|e| DaemonError::Credentials(e.to_string()))?;
    let trust = Arc::new(TrustStore::from_root_pem(&root_pem).map_err(|e| DaemonError::Credentials(e.to_string()))?);
    for crl in &config.tls.crls {
        let pem =
            std::fs::read_to_string(crl).map_err(|e| DaemonError::Credentials(format!("{}: {e}", crl.display())))?;
        trust.load_crl(&pem).map_err(|e| DaemonError::Credentials(format!("{}: {e}", crl.display())))?;
    }
    let me =
        trust.identity_of_peer(&creds.chain).map_err(|e| DaemonError::Credentials(format!("own certificate: {e}")))?;
    if me.name.as_str() != config.name || me.tier != config.tier {
        return Err(DaemonError::Config(format!(
            "config says {} ({}) but the certificate says {} ({})",
            config.name, config.tier, me.name, me.tier
        )));
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| DaemonError::Config(format!("{}: {e}", config.data_dir.display())))?;
    let store = Store::open(&config.store_location(), signing_key.clone()).await?;
    let blobs = BlobStore::open(&config.blob_dir())?;
    restore_journaled_blobs(&store, &blobs).await?;
    let studies = crate::ingest::StudyStore::open(&config.data_dir)
        .map_err(|e| DaemonError::Config(format!("study store in {}: {e}", config.data_dir.display())))?;
    if let Ok(n) = studies.clean_incoming()
        && n > 0
    {
        tracing::info!(removed = n, "removed partial DICOM instances left by a crash");
    }

    let mut node_config = NodeConfig::new(config.node_name(), config.tier);
    node_config.upstream = config
        .parents
        .iter()
        .map(|p| Upstream { name: p.name.as_str().into(), tier: p.tier, public_key: None })
        .collect();
    node_config.experts = config
        .experts
        .iter()
        .map(|e| ExpertPool { modality: e.modality, on_duty: e.on_duty, service_ms: e.service_min * 60_000 })
        .collect();
    node_config.seed = rand::random();
    node_config.privacy = tiers::PrivacyPolicy { identifiers_up_to: config.privacy.identifiers_up_to };
    let deid = Arc::new(crate::deid::Deidentifier::from_node_key(&signing_key));
    let model_configs = config.models.clone();
    let models = tokio::task::spawn_blocking(move || crate::triage::ModelHost::load(&model_configs))
        .await
        .map_err(|e| DaemonError::Config(format!("loading models: {e}")))?
        .map_err(DaemonError::Config)?;
    node_config.models = models.specs();
    let records = store.load().await?;
    let restored = records.len();
    let control_key = signing_key.clone();
    let core = Node::restore(node_config, signing_key, records, now());

    let verifier = Arc::new(FederationVerifier::new(trust.clone()));
    let endpoint = transport::endpoint(config.listen, &creds, verifier)?;
    let addr = endpoint.local_addr().map_err(|e| DaemonError::Config(e.to_string()))?;
    let claim = NodeClaim { name: config.node_name(), tier: config.tier, public_key: creds.public_key };
    let (tx, rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let metrics = Arc::new(Metrics::default());
    let authorized: Authorized = Arc::default();
    tracing::info!(node = %config.name, tier = %config.tier, %addr, restored, "node started");

    // Children.
    let policy = AcceptPolicy {
        me: me.clone(),
        claim: claim.clone(),
        cross_links: config.cross_links.iter().map(|s| NodeName::new(s.as_str())).collect(),
    };
    let mut background = Vec::new();
    {
        let (endpoint, trust, tx) = (endpoint.clone(), trust.clone(), tx.clone());
        background.push(tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (policy, trust, tx) = (policy.clone(), trust.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(link) = transport::accept(incoming, &policy, &trust).await {
                        let _ = tx.send(Input::PeerUp(Box::new(link))).await;
                    }
                });
            }
        }));
    }
    // Parents.
    for parent in config.parents.clone() {
        let (endpoint, trust, tx, claim) = (endpoint.clone(), trust.clone(), tx.clone(), claim.clone());
        background.push(tokio::spawn(dial_parent(endpoint, parent, claim, trust, tx)));
    }
    // Devices: DICOM C-STORE receiver and inbox folder.
    if let Some(d) = &config.dicom {
        let settings = crate::ingest::ScpSettings {
            ae_title: d.ae_title.clone(),
            listen: d.listen,
            allowed_callers: d.allowed_callers.clone(),
            max_instance_bytes: d.max_instance_bytes,
        };
        let (scp_addr, task) = crate::ingest::serve_scp(settings, studies.clone())
            .await
            .map_err(|e| DaemonError::Config(format!("DICOM receiver on {}: {e}", d.listen)))?;
        tracing::info!(ae_title = %d.ae_title, addr = %scp_addr, "DICOM C-STORE receiver listening");
        background.push(task);
    }
    if let Some(inbox) = &config.inbox {
        std::fs::create_dir_all(&inbox.dir)
            .map_err(|e| DaemonError::Config(format!("inbox {}: {e}", inbox.dir.display())))?;
        background.push(
            crate::ingest::watch_inbox(inbox.dir.clone(), studies.clone(), Duration::from_millis(inbox.poll_ms)).await,
        );
    }
    // Metrics.
    if let Some(metrics_addr) = config.metrics {
        let (m, name) = (metrics.clone(), config.name.clone());
        match tokio::net::TcpListener::bind(metrics_addr).await {
            Ok(listener) => {
                background.push(tokio::spawn(serve_metrics(listener, m, name)));
            }
            Err(e) => return Err(DaemonError::Config(format!("metrics listener {metrics_addr}: {e}"))),
        }
    }

    let (ui_events, _) = tokio::sync::broadcast::channel(UI_EVENTS_MAX);
    let handle = ControlHandle { tx: tx.clone(), events: ui_events.clone() };
    // The FHIR R4 API for hospital systems (hubs).
    let mut fhir_addr = None;
    if let Some(fhir) = &config.fhir {
        let mut clients = crate::fhir_auth::FhirClients::default();
        if let Some(token_file) = &fhir.token_file {
            let token = std::fs::read_to_string(token_file)
                .map_err(|e| DaemonError::Config(format!("FHIR token file {}: {e}", token_file.display())))?;
            clients = crate::fhir_auth::FhirClients::from_legacy_token(&token)
                .map_err(|e| DaemonError::Config(format!("FHIR token file {}: {e}", token_file.display())))?;
        }
        let lifetime_s = fhir.token_lifetime_s.unwrap_or(crate::fhir_oauth::TOKEN_LIFETIME_DEFAULT_S);
        let authority = crate::fhir_oauth::Authority::new(clients, fhir.clients_file.clone(), lifetime_s)
            .map_err(|e| DaemonError::Config(format!("FHIR clients: {e}")))?;
        if authority.is_empty() {
            return Err(DaemonError::Config("[fhir] needs a token_file or a clients_file with a client".into()));
        }
        let listener = tokio::net::TcpListener::bind(fhir.listen)
            .await
            .map_err(|e| DaemonError::Config(format!("FHIR listener {}: {e}", fhir.listen)))?;
        fhir_addr = listener.local_addr().ok();
        let app = crate::fhir::router(crate::fhir::FhirState::new(
            store.clone(),
            config.node_name(),
            Arc::new(authority),
            handle.clone(),
        ));
        background.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("FHIR API stopped: {e}");
            }
        }));
        tracing::info!(addr = ?fhir_addr, "FHIR R4 API listening");
    }
    // Control plane (libp2p), if configured.
    let control = match &config.control {
        Some(control) => {
            let parts = control_glue::GlueParts {
                control,
                config: &config,
                key: &control_key,
                creds: &creds,
                trust: trust.clone(),
                me: me.clone(),
                endpoint: endpoint.clone(),
                claim: claim.clone(),
                data_addr: addr,
                tx: tx.clone(),
            };
            Some(control_glue::start(parts, &mut background).await?)
        }
        None => None,
    };
    let control_plane = control.as_ref().map(|c| c.handle.clone());
    // Live ATNA audit export (optional): its own task follows the committed log.
    let mut atna_wake = None;
    if let Some(syslog) = config.audit.as_ref().and_then(|a| a.syslog.clone()) {
        let (wake, task) = crate::atna_sender::spawn(crate::atna_sender::SenderParts {
            config: syslog,
            store: store.clone(),
            node: config.node_name(),
            data_dir: config.data_dir.clone(),
            creds: NodeCredentials {
                chain: creds.chain.clone(),
                key: creds.key.clone_key(),
                public_key: creds.public_key,
            },
            metrics: metrics.atna.clone(),
        })
        .map_err(DaemonError::Config)?;
        atna_wake = Some(wake);
        background.push(task);
    }

    let limits = TransferLimits {
        chunk_len: federation_proto::codec::CHUNK_LEN_MAX,
        chunks_in_flight: 8,
        bytes_per_s: config.rate_limit_bytes_per_s,
    };
    // The web UI (optional): pages for experts, clinicians and admins.
    let mut web_addr = None;
    if let Some(web) = &config.web {
        let ctx = crate::web::WebContext {
            node: config.node_name(),
            tier: config.tier,
            cert_not_after_s: me.not_after.as_secs(),
            parents: config.parents.iter().map(|p| (p.name.clone(), p.tier.to_string(), p.addr.to_string())).collect(),
            data_dir: config.data_dir.clone(),
            blobs: blobs.clone(),
            control: handle.clone(),
        };
        let (addr_bound, task) = crate::web::serve(web.clone(), ctx)
            .await
            .map_err(|e| DaemonError::Config(format!("web UI on {}: {e}", web.listen)))?;
        tracing::info!(addr = %addr_bound, "web UI listening on http://{addr_bound}/");
        web_addr = Some(addr_bound);
        background.push(task);
    }
    let state = Core {
        config: config.clone(),
        core,
        store,
        blobs,
        studies,
        deid,
        links: BTreeMap::new(),
        live: LiveLinks::default(),
        authorized,
        fetching: BTreeSet::new(),
        fetches: tokio::task::JoinSet::new(),
        journal_budget: Arc::new(tokio::sync::Semaphore::new(JOURNAL_BYTES_IN_FLIGHT_MAX)),
        to_install: Vec::new(),
        unsynced: Vec::new(),
        synced: Vec::new(),
        forget_due: None,
        syncs: tokio::task::JoinSet::new(),
        deferred: Vec::new(),
        commit_due: None,
        force_commit: false,
        tx: tx.clone(),
        metrics: metrics.clone(),
        ui_events,
        limits,
        upload_pacer: config.rate_limit_bytes_per_s.map(|r| Arc::new(transfer::Pacer::new(r))),
        trust: trust.clone(),
        control,
        models,
        pending: Vec::new(),
        ui_pending: Vec::new(),
        committed_pending: Vec::new(),
        atna_wake,
    };
    let task = tokio::spawn(state.run(rx));
    Ok(Running {
        name: config.node_name(),
        addr,
        metrics,
        fhir_addr,
        control_plane,
        control: handle,
        web_addr,
        task,
        background,
        endpoint,
    })
}

/// Before the core starts: every blob still in the store's journal (its file was
/// written without fsync, ADR 0010) is checked against its file, rewritten from the
/// journal if a power cut lost or damaged it, made durable, and dropped from the
/// journal. Bounded: each round drops the rows it handled.
async fn restore_journaled_blobs(store: &Store, blobs: &BlobStore) -> Result<(), DaemonError> {
    let mut restored = 0;
    loop {
        let hashes = store.journaled_blobs(JOURNAL_SYNC_BATCH_MAX as u32).await?;
        if hashes.is_empty() {
            break;
        }
        for hash in &hashes {
            if let Some(bytes) = store.journaled_blob(hash).await? {
                blobs.restore_journaled(hash, bytes).await?;
            }
        }
        restored += hashes.len();
        let forget: Vec<_> = hashes.into_iter().map(crate::store::Write::ForgetBlob).collect();
        store.commit(&forget).await?;
    }
    if restored > 0 {
        tracing::info!(restored, "journaled blobs checked against their files and made durable");
    }
    Ok(())
}

async fn dial_parent(
    endpoint: quinn::Endpoint,
    parent: crate::config::ParentConfig,
    claim: NodeClaim,
    trust: Arc<TrustStore>,
    tx: mpsc::Sender<Input>,
) {
    let name = NodeName::new(parent.name.as_str());
    let mut backoff = Duration::from_millis(200);
    loop {
        match transport::connect(&endpoint, parent.addr, &name, &claim, &trust).await {
            Ok(link) if link.peer.tier != parent.tier => {
                tracing::warn!(peer = %name, "parent's certificate says {} but the configuration {}", link.peer.tier, parent.tier);
                link.connection.close(transport::CLOSE_HELLO_REFUSED.into(), b"unexpected tier");
            }
            Ok(link) => {
                backoff = Duration::from_millis(200);
                let conn = link.connection.clone();
                if tx.send(Input::PeerUp(Box::new(link))).await.is_err() {
                    return;
                }
                let reason = conn.closed().await;
                tracing::info!(peer = %name, "link to parent closed: {reason}");
            }
            Err(_) => {} // connect() logged why
        }
        if tx.is_closed() {
            return;
        }
        // Exponential backoff with ±25 % jitter, capped.
        let jitter = 0.75 + rand::random::<f64>() * 0.5;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, node: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut sock, _)) = listener.accept().await {
        let (metrics, node) = (metrics.clone(), node.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics") {
                let body = metrics.render(&node);
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
            };
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}

/// Reads the streams a peer opens on a link: chunk requests are served here (for
/// attachments of cases offered to that peer only), everything else goes to the core.
async fn serve_link(
    link: Link,
    tx: mpsc::Sender<Input>,
    blobs: BlobStore,
    authorized: Authorized,
    pacer: Option<Arc<transfer::Pacer>>,
) {
    let peer = link.peer.name.clone();
    let conn = link.connection.clone();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(_) => break,
        };
        let (tx, blobs, authorized, peer, pacer) =
            (tx.clone(), blobs.clone(), authorized.clone(), peer.clone(), pacer.clone());
        tokio::spawn(async move {
            let frame = match tokio::time::timeout(FRAME_READ_TIMEOUT, transport::read_frame(&mut recv)).await {
                Ok(frame) => frame,
                Err(_) => {
                    tracing::warn!(%peer, "stream idle for {FRAME_READ_TIMEOUT:?} without a whole frame; dropped");
                    let _ = send.reset(0u32.into());
                    return;
                }
            };
            match frame {
                Ok(Message::ChunkRequest(req)) => {
                    let allowed = authorized
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&peer)
                        .is_some_and(|s| s.contains(&req.hash));
                    if allowed {
                        if let Err(e) = transfer::serve_chunk(&blobs, &req, &mut send, pacer.as_deref()).await {
                            tracing::warn!(%peer, "chunk request refused: {e}");
                        }
                    } else {
                        tracing::warn!(%peer, hash = %req.hash, "chunk request for an attachment not offered to this peer");
                        let reject = Reject {
                            case_id: Some(req.case_id),
                            code: RejectCode::NotCustodian,
                            detail: "attachment not offered to you".into(),
                        };
                        let _ = transport::write_frame(&mut send, &Message::Reject(reject)).await;
                    }
                    let _ = send.finish();
                }
                Ok(message) => {
                    let _ = send.finish();
                    let _ = tx.send(Input::Message { from: peer, message: Box::new(message) }).await;
                }
                Err(e) => {
                    tracing::warn!(%peer, "bad frame refused: {e}");
                    let reject = Reject { case_id: None, code: RejectCode::Malformed, detail: e.to_string() };
                    let _ = transport::write_frame(&mut send, &Message::Reject(reject)).await;
                    let _ = send.finish();
                }
            }
        });
    }
    let _ = tx.send(Input::PeerDown { peer, connection_id: conn.stable_id() }).await;
}

fn snapshot_of(r: &tiers::CaseRecord) -> CaseSnapshot {
    let (claim_deadline_ms, claimed_by, lapsed_claim) = match &r.status {
        tiers::CaseStatus::Queued { claim_deadline, lapsed_claim, .. } => {
            (Some(claim_deadline.0), None, lapsed_claim.clone())
        }
        tiers::CaseStatus::Claimed { expert, .. } => (None, Some(expert.clone()), None),
        _ => (None, None, None),
    };
    CaseSnapshot {
        view: CaseView::of(r),
        claim_deadline_ms,
        claimed_by,
        lapsed_claim,
        came_from: r.came_from.as_ref().map(|c| c.to_string()),
        attachment_hashes: r.info.attachments.iter().map(|a| a.hash).collect(),
    }
}

fn media_type_of(path: &std::path::Path, head: &[u8]) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if head.len() >= 132 && &head[128..132] == b"DICM" || ext == "dcm" {
        "application/dicom"
    } else if matches!(ext.as_str(), "svs" | "tif" | "tiff") {
        "image/tiff"
    } else if matches!(ext.as_str(), "dat" | "hea" | "atr") {
        "application/x-wfdb"
    } else if ext == "xml" {
        "application/xml"
    } else if crate::scrub_photo::is_jpeg(head) {
        "image/jpeg"
    } else if crate::scrub_photo::is_png(head) {
        "image/png"
    } else {
        "application/octet-stream"
    }
}

fn default_task(modality: federation_proto::Modality) -> &'static str {
    match modality {
        federation_proto::Modality::Ecg => "ecg.rhythm",
        federation_proto::Modality::Imaging => "imaging.triage",
        federation_proto::Modality::Pathology => "pathology.triage",
    }
}

impl Core {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) -> Result<(), DaemonError> {
        self.drain().await?;
        self.resume_simulated_experts();
        loop {
            let deadline = self.core.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => {
                        let wait = at.0.saturating_sub(now().0);
                        tokio::time::sleep(Duration::from_millis(wait)).await
                    }
                    None => std::future::pending().await,
                }
            };
            let mut shutdown = false;
            let commit_due = self.commit_due;
            let due = async move {
                match commit_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let forget_due = self.forget_due;
            let forget = async move {
                match forget_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    // Group commit across inputs: take what else is already queued (up
                    // to a bound), then commit all their writes at once in `drain`.
                    let mut next = Some(input);
                    let mut handled = 0;
                    while let Some(input) = next.take() {
                        if matches!(input, Input::Shutdown) {
                            shutdown = true;
                            break;
                        }
                        self.handle(input).await;
                        handled += 1;
                        if handled < INPUT_BATCH_MAX {
                            next = rx.try_recv().ok();
                        }
                    }
                }
                _ = sleep => self.core.handle_timeout(now()),
                _ = due => self.force_commit = true,
                _ = forget => {} // `drain` sees that it is due
            }
            self.force_commit |= shutdown;
            self.drain().await?;
            self.force_commit = false;
            if shutdown {
                tracing::info!(node = %self.config.name, "shutting down");
                for link in self.links.values() {
                    link.connection.close(0u32.into(), b"shutdown");
                }
                rx.close();
                self.stop_fetches().await;
                self.store.close().await;
                break;
            }
            self.control_after_input();
        }
        Ok(())
    }

    /// Waits (at most [`SHUTDOWN_FETCH_WAIT`]) for the attachment fetches to end, then
    /// aborts the rest and waits for them to unwind. Their links are closed, so a
    /// fetch only finishes the disk work it started; what it received stays as the
    /// resume point (the `Stored` inputs it may still send are dropped with the
    /// closed queue: after a restart the case is still `Receiving`, and finding the
    /// blob complete, the node takes custody without fetching it again).
    async fn stop_fetches(&mut self) {
        // A sync waiting to start is not needed: the journal keeps those blobs.
        self.syncs.abort_all();
        while self.syncs.join_next().await.is_some() {}
        let running = self.fetches.len();
        if running == 0 {
            return;
        }
        let all_done = async { while self.fetches.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_FETCH_WAIT, all_done).await.is_err() {
            tracing::warn!(
                node = %self.config.name,
                left = self.fetches.len(),
                "attachment fetches still running after {SHUTDOWN_FETCH_WAIT:?}; aborted (they resume after a restart)"
            );
            self.fetches.abort_all();
            while self.fetches.join_next().await.is_some() {}
        }
        tracing::debug!(node = %self.config.name, running, "attachment fetches stopped");
    }

    /// Queues an audit record for the next group commit.
    fn audit(
        &mut self,
        at: federation_proto::Millis,
        kind: &str,
        case: Option<CaseId>,
        peer: Option<&str>,
        detail: &str,
    ) {
        self.pending.push(crate::store::Write::audit(at, kind, case, peer, detail));
    }

    async fn handle(&mut self, input: Input) {
        let t = now();
        match input {
            Input::PeerUp(link) => {
                let link = *link;
                let peer =
                    Peer { name: link.peer.name.clone(), tier: link.peer.tier, public_key: link.peer.public_key };
                if let Some(old) = self.links.insert(peer.name.clone(), link.clone()) {
                    old.connection.close(0u32.into(), b"replaced by a newer link");
                }
                self.live.add(link.clone());
                self.metrics.links_up.store(self.links.len() as u64, Ordering::Relaxed);
                self.audit(
                    t,
                    "link.up",
                    None,
                    Some(peer.name.as_str()),
                    &format!("{} {}", peer.tier, link.peer.peer_id),
                );
                tokio::spawn(serve_link(
                    link,
                    self.tx.clone(),
                    self.blobs.clone(),
                    self.authorized.clone(),
                    self.upload_pacer.clone(),
                ));
                let name = peer.name.clone();
                if let Err(e) = self.core.handle_peer_up(t, peer) {
                    tracing::warn!("{e}");
                }
                self.control_peer_up(t, &name);
            }
            Input::PeerDown { peer, connection_id } => {
                if self.links.get(&peer).is_some_and(|l| l.connection.stable_id() == connection_id) {
                    self.links.remove(&peer);
                    self.metrics.links_up.store(self.links.len() as u64, Ordering::Relaxed);
                    self.audit(t, "link.down", None, Some(peer.as_str()), "");
                    self.core.handle_peer_down(t, &peer);
                    self.control_peer_down(t, &peer).await;
                }
            }
            Input::Message { from, message } => {
                self.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                if let Some(refusal) = self.refuse_offer_on_full_disk(&message) {
                    tracing::warn!(peer = %from, "case offer refused: {}", refusal.detail);
                    self.audit(t, "peer.refused", refusal.case_id, Some(from.as_str()), &refusal.detail);
                    self.send(from, Message::Reject(refusal));
                    return;
                }
                if let Err(e) = self.core.handle_message(t, &from, *message) {
                    self.metrics.peer_refusals.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %from, "refused: {e}");
                    self.audit(t, "peer.refused", None, Some(from.as_str()), &e.to_string());
                }
            }
            Input::Stored { case_id, hash } => {
                self.fetching.remove(&(case_id, hash));
                if let Err(e) = self.core.handle_attachment_stored(t, case_id, hash) {
                    tracing::warn!(%case_id, "attachment stored: {e}");
                }
            }
            Input::Received { case_id, hash, bytes, permit } => {
                self.fetching.remove(&(case_id, hash));
                // Journaled in the same commit as the case that now holds it.
                self.pending.push(crate::store::Write::Blob { hash, bytes: bytes.clone() });
                self.to_install.push((hash, bytes, permit));
                if let Err(e) = self.core.handle_attachment_stored(t, case_id, hash) {
                    tracing::warn!(%case_id, "attachment received: {e}");
                }
            }
            Input::BlobsSynced(hashes, result) => {
                while self.syncs.try_join_next().is_some() {}
                match result {
                    Ok(()) => {
                        self.synced.extend(hashes);
                        self.sync_journaled();
                    }
                    // Kept in the journal; retried with the next blob received.
                    Err(e) => {
                        tracing::warn!("syncing journaled blobs failed (their journal rows are kept): {e}");
                        self.unsynced.extend(hashes);
                    }
                }
            }
            Input::FetchDone { case_id, hash, error } => {
                self.fetching.remove(&(case_id, hash));
                if let Some(error) = error {
                    tracing::warn!(%case_id, %hash, "attachment transfer stopped: {error}; it resumes on the next offer");
                }
            }
            Input::Submit(req, reply) => {
                let result = self.submit(t, req).await;
                let _ = reply.send(result);
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Show(id, reply) => {
                let _ = reply.send(self.core.case(&id).map(CaseView::of));
            }
            Input::Studies(reply) => {
                let _ = reply.send(self.studies.list().map_err(|e| e.to_string()));
            }
            Input::ExpertClaim { case_id, expert } => {
                if self.core.handle_claim(t, case_id, &expert).is_ok()
                    && let Some(sim) = &self.config.simulated_experts
                {
                    let (tx, read) = (self.tx.clone(), Duration::from_millis(sim.read_ms));
                    tokio::spawn(async move {
                        tokio::time::sleep(read).await;
                        let _ = tx.send(Input::ExpertSign { case_id, expert }).await;
                    });
                }
            }
            Input::ExpertSign { case_id, expert } => {
                let draft = ReportDraft {
                    labels: vec![],
                    fields: vec![("impression".into(), "simulated expert read".into())],
                    text: format!("Read by {expert} (simulated expert) at {}.", self.config.name),
                };
                if let Err(e) = self.core.handle_sign_report(t, case_id, &expert, draft) {
                    tracing::warn!(%case_id, "simulated report: {e}");
                }
            }
            Input::Expert { case_id, expert, action, reply } => {
                let result = match action {
                    ExpertAction::Claim => self.core.handle_claim(t, case_id, &expert),
                    ExpertAction::Release => self.core.handle_release(t, case_id, &expert),
                    ExpertAction::Sign(draft) => self.core.handle_sign_report(t, case_id, &expert, draft),
                    ExpertAction::Escalate(reason) => self.core.handle_expert_escalate(t, case_id, &expert, &reason),
                };
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            Input::Snapshot(reply) => {
                let _ = reply.send(self.core.cases().map(snapshot_of).collect());
            }
            Input::Admin(reply) => {
                let audit = self.store.audit_tail(50).await.unwrap_or_default();
                let _ = reply.send(AdminSnapshot {
                    status: self.status(),
                    advert: self.core.capacity_advert(t).ok().and_then(|env| {
                        env.open::<federation_proto::CapacityAdvert>(federation_proto::content_type::ADVERT)
                            .ok()
                            .map(|v| v.body)
                    }),
                    audit,
                    metrics: self.metrics.render(&self.config.name),
                });
            }
            Input::Audit { kind, detail } => {
                self.audit(t, &kind, None, None, &detail);
                self.ui_pending.push(UiEvent { kind, case_id: None });
            }
            Input::AuditDurable(write, done) => {
                self.pending.push(write);
                self.committed_pending.push(done);
            }
            Input::ModelDone { case_id, outcome } => {
                if let Err(e) = &outcome {
                    tracing::warn!(%case_id, "model read failed, the case goes on without it: {e}");
                }
                if let Err(e) = self.core.handle_model_result(t, case_id, outcome) {
                    tracing::debug!(%case_id, "model result not applied: {e}");
                }
            }
            Input::Shutdown => {}
            Input::Control(event) => self.on_control(t, *event).await,
            Input::AdvertTick => self.publish_advert(t),
            Input::LoadCrl(pem, reply) => {
                let result = self.load_crl(pem).await;
                let _ = reply.send(result);
            }
            Input::KnownAdverts(reply) => {
                let _ = reply.send(self.known_adverts(t));
            }
        }
    }

    /// After a restart, simulated experts pick up where they were: queued cases are
    /// claimed again and their own claimed cases are read (a person at the consult
    /// queue would see the same list).
    fn resume_simulated_experts(&self) {
        let Some(sim) = &self.config.simulated_experts else { return };
        for case in self.core.cases() {
            let case_id = case.info.case_id;
            let (input, wait) = match &case.status {
                tiers::CaseStatus::Queued { .. } => {
                    (Input::ExpertClaim { case_id, expert: sim.name.clone() }, sim.claim_after_ms)
                }
                tiers::CaseStatus::Claimed { expert, .. } if *expert == sim.name => {
                    (Input::ExpertSign { case_id, expert: expert.clone() }, sim.read_ms)
                }
                _ => continue,
            };
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let _ = tx.send(input).await;
            });
        }
    }

    async fn submit(&mut self, t: federation_proto::Millis, req: SubmitRequest) -> Result<CaseId, String> {
        let mut files = req.files.clone();
        if let Some(study) = &req.study {
            files.extend(self.studies.files(study).map_err(|e| format!("study {study}: {e}"))?);
        }
        if files.is_empty() {
            return Err("a case needs at least one file (or a received study)".into());
        }
        // New work only while the disk keeps room for the work already accepted.
        let need = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum::<u64>();
        crate::disk_guard::check(&self.config.data_dir, need.saturating_mul(2))?;
        let mut attachments = Vec::new();
        let mut deidentified = Vec::new();
        let scratch = self.config.data_dir.join("deid-scratch");
        // The patient's own identifiers, looked for in the question and attachments.
        let known = Arc::new(crate::scrub::KnownIdentifiers::new(
            &req.details.name,
            &req.patient,
            &req.details.birth_date,
            &req.details.address,
            &req.details.phone,
        ));
        let question = crate::scrub::scrub_question(&req.question, &known).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&scratch).map_err(|e| format!("scratch directory {}: {e}", scratch.display()))?;
        for (i, path) in files.iter().enumerate() {
            let mut head = vec![0u8; 132];
            let n = {
                use std::io::Read;
                std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).unwrap_or(0)
            };
            let media_type = media_type_of(path, &head[..n]);
            // DICOM, WFDB headers, TIFF slides and XML are de-identified here, at the
            // origin, before the manifest is signed (deid.rs, scrub.rs); the
            // identified original stays in this node's blob store only.
            let out = scratch.join(format!("{}-{i}.clean", hex::encode(rand::random::<[u8; 8]>())));
            let (src, dst, deid, ids) = (path.clone(), out.clone(), self.deid.clone(), known.clone());
            let burned_in = self.config.privacy.burned_in_annotation;
            let cleaned =
                tokio::task::spawn_blocking(move || crate::scrub::clean_attachment(&deid, burned_in, &ids, &src, &dst))
                    .await
                    .map_err(|e| format!("de-identification task: {e}"))?;
            let cleaned = match cleaned {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&out);
                    return Err(format!("attachment {}: {e}", i + 1));
                }
            };
            let (hash, size) = if let Some(method) = cleaned {
                let (original, _) =
                    self.blobs.import_file(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
                let imported = self.blobs.import_file(&out).await.map_err(|e| format!("{}: {e}", out.display()));
                let _ = std::fs::remove_file(&out);
                let (hash, size) = imported?;
                deidentified.push(federation_proto::Deidentification { hash, original_hash: original, method });
                (hash, size)
            } else {
                self.blobs.import_file(path).await.map_err(|e| format!("{}: {e}", path.display()))?
            };
            let priority = if req.modality == federation_proto::Modality::Ecg || size <= 2 * 1024 * 1024 {
                Priority::Urgent
            } else {
                Priority::Bulk
            };
            // File names often carry the patient's name: only the position travels.
            let name = format!(
                "attachment-{}{}",
                i + 1,
                path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default()
            );
            attachments.push(AttachmentRef { hash, size_bytes: size, media_type: media_type.into(), name, priority });
        }
        let new = NewCase {
            case_id: CaseId(rand::random()),
            modality: req.modality,
            task: req.task.unwrap_or_else(|| default_task(req.modality).into()),
            urgency: req.urgency,
            clinical_question: question,
            patient: PatientRef { pseudonym: self.deid.pseudonym(&req.patient), sex: None, age_years: None },
            attachments,
            deidentified,
            identity: Some(federation_proto::PatientIdentity {
                case_id: CaseId([0; 16]), // filled in by the core
                pseudonym: String::new(), // filled in by the core
                patient_id: req.patient,
                name: req.details.name,
                birth_date: req.details.birth_date,
                address: req.details.address,
                phone: req.details.phone,
            }),
        };
        let id = self.core.handle_submit(t, new).map_err(|e| e.to_string())?;
        self.metrics.cases_submitted.fetch_add(1, Ordering::Relaxed);
        if let Some(study) = &req.study {
            // The instances are in the blob store now, owned by the case.
            if let Err(e) = self.studies.remove(study) {
                tracing::warn!(%study, "submitted, but the received study could not be removed: {e}");
            }
        }
        Ok(id)
    }

    fn status(&self) -> StatusReport {
        let mut cases: Vec<CaseLine> = self
            .core
            .cases()
            .map(|r| {
                let v = CaseView::of(r);
                CaseLine {
                    case_id: v.case_id,
                    origin: v.origin,
                    modality: v.modality,
                    urgency: v.urgency,
                    status: v.status,
                    where_: v.where_,
                    since_ms: r.updated_at.0,
                    deadline_at_ms: v.deadline_at_ms,
                    read_by: v.report.map(|r| format!("{} at {}", r.reader, r.node)),
                }
            })
            .collect();
        cases.sort_by(|a, b| (&a.urgency, a.deadline_at_ms).cmp(&(&b.urgency, b.deadline_at_ms)));
        StatusReport {
            name: self.config.name.clone(),
            tier: self.config.tier.to_string(),
            links: self.links.values().map(|l| (l.peer.name.to_string(), l.peer.tier.to_string())).collect(),
            cases,
        }
    }

    /// A `Busy` refusal for a new case offered while the disk is full (see
    /// [`crate::disk_guard`]); `None` lets the core handle the message. A case this
    /// node already holds is never refused here: its re-offer costs no space.
    fn refuse_offer_on_full_disk(&self, message: &Message) -> Option<Reject> {
        let Message::CaseOffer(offer) = message else { return None };
        let manifest =
            offer.manifest.open::<federation_proto::CaseManifest>(federation_proto::content_type::MANIFEST).ok()?;
        let id = manifest.body.case_id;
        if self.core.case(&id).is_some() {
            return None;
        }
        let need = manifest.body.attachments.iter().map(|a| a.size_bytes).fold(0u64, u64::saturating_add);
        let detail = crate::disk_guard::check(&self.config.data_dir, need).err()?;
        Some(Reject { case_id: Some(id), code: RejectCode::Busy, detail })
    }

    /// Acts on every pending output of the core, with group commit: the persists
    /// and audit records of everything handled since the last commit go to the store
    /// in ONE transaction, and the outputs that act on the world beyond this process's
    /// memory (messages to peers, model runs, UI events) are held back until it has
    /// committed. So a change the core asked to persist is durable before any message
    /// that may depend on it is sent, whatever the order of outputs. Attachment
    /// fetches start at once: a chunk request reveals nothing and claims nothing (a
    /// crash before the commit leaves at most a blob that nothing refers to yet; the
    /// sender keeps custody until it holds our receipt).
    ///
    /// One exception saves the offer's flush: when everything held back is an offer
    /// acceptance (`OfferAccept` takes no custody: the sender keeps the case until our
    /// receipt, and re-offers if we forget it), the writes wait, at most
    /// [`COMMIT_DEFER_MAX`], for the next commit, typically the one that takes custody
    /// once the attachments are in.
    async fn drain(&mut self) -> Result<(), DaemonError> {
        loop {
            let mut held = std::mem::take(&mut self.deferred);
            while let Some(output) = self.core.poll_output() {
                match output {
                    Output::Persist(change) => self.pending.push(crate::store::Write::Change(change)),
                    Output::Notify(event) => self.notify(event),
                    Output::FetchAttachments { case_id, from, attachments } => self.fetch(case_id, from, attachments),
                    other => held.push(other),
                }
            }
            let only_acceptances = !held.is_empty()
                && held.iter().all(|o| matches!(o, Output::Send { message: Message::OfferAccept(_), .. }));
            if only_acceptances && !self.pending.is_empty() && self.to_install.is_empty() && !self.force_commit {
                self.deferred = held;
                self.commit_due.get_or_insert_with(|| tokio::time::Instant::now() + COMMIT_DEFER_MAX);
                return Ok(());
            }
            self.commit_due = None;
            let forget_now = self.forget_due.is_some_and(|at| at <= tokio::time::Instant::now());
            if !self.pending.is_empty() || (forget_now && !self.synced.is_empty()) {
                // Journal rows of blobs whose files are durable now ride along, a
                // bounded number (see JOURNAL_FORGETS_PER_COMMIT).
                let journaled = self.pending.iter().filter(|w| matches!(w, crate::store::Write::Blob { .. })).count();
                let n = self.synced.len().min(journaled + JOURNAL_FORGETS_PER_COMMIT);
                let forget: Vec<_> = self.synced.drain(..n).map(crate::store::Write::ForgetBlob).collect();
                let mut writes = std::mem::take(&mut self.pending);
                writes.extend(forget);
                self.forget_due = None;
                if let Err(e) = self.store.commit(&writes).await {
                    tracing::error!(node = %self.config.name, "store failed, stopping (nothing unsaved was sent): {e}");
                    return Err(e.into());
                }
                if let Some(wake) = &self.atna_wake {
                    let _ = wake.try_send(()); // full: a wake is already queued
                }
            }
            if self.synced.is_empty() {
                self.forget_due = None;
            } else if self.forget_due.is_none() {
                self.forget_due = Some(tokio::time::Instant::now() + JOURNAL_FORGET_IDLE);
            }
            // Messages that make no peer read a blob file (receipts, acceptances,
            // reports) go out at once: a custody receipt waits for nothing but the
            // commit. The files of the blobs just journaled are written before
            // anything that may read them (an offer onwards, a model run, a client).
            let acted = !held.is_empty();
            let (early, late): (Vec<_>, Vec<_>) = held
                .into_iter()
                .partition(|o| matches!(o, Output::Send { message, .. } if !matches!(message, Message::CaseOffer(_))));
            for output in early {
                self.act(output);
            }
            self.install_journaled().await?;
            for event in self.ui_pending.drain(..) {
                let _ = self.ui_events.send(event);
            }
            for done in self.committed_pending.drain(..) {
                let _ = done.send(());
            }
            if !acted {
                return Ok(());
            }
            // Acting on these may give the core new inputs (a link found down), whose
            // outputs the next round handles.
            for output in late {
                self.act(output);
            }
        }
    }

    /// Writes the files of the blobs just journaled (no fsync: the journal is their
    /// durable copy) before anything may read them, and starts a background sync of
    /// them. A failure stops the node: the journal rewrites them on restart.
    async fn install_journaled(&mut self) -> Result<(), DaemonError> {
        if self.to_install.is_empty() {
            return Ok(());
        }
        let installs: Vec<_> = self.to_install.drain(..).map(|(hash, bytes, _permit)| (hash, bytes)).collect();
        let hashes: Vec<_> = installs.iter().map(|(h, _)| *h).collect();
        if let Err(e) = self.blobs.install_journaled(installs).await {
            tracing::error!(node = %self.config.name, "writing journaled blobs failed, stopping: {e}");
            return Err(e.into());
        }
        self.unsynced.extend(hashes);
        self.sync_journaled();
        Ok(())
    }

    /// Starts a background sync of the journaled blobs' files not yet durable, unless
    /// one runs: after [`JOURNAL_SYNC_DELAY`], it fsyncs the blobs waiting when it
    /// wakes (at most [`JOURNAL_SYNC_BATCH_MAX`]) and reports them with
    /// `Input::BlobsSynced`, which starts the next if more wait.
    fn sync_journaled(&mut self) {
        while self.syncs.try_join_next().is_some() {}
        if !self.syncs.is_empty() || self.unsynced.is_empty() {
            return;
        }
        let n = self.unsynced.len().min(JOURNAL_SYNC_BATCH_MAX);
        let batch: Vec<_> = self.unsynced.drain(..n).collect();
        let (blobs, tx) = (self.blobs.clone(), self.tx.clone());
        self.syncs.spawn(async move {
            tokio::time::sleep(JOURNAL_SYNC_DELAY).await;
            let result = blobs.sync_objects(batch.clone()).await.map_err(|e| e.to_string());
            let _ = tx.send(Input::BlobsSynced(batch, result)).await;
        });
    }

    /// Acts on one output that was held back until the writes before it committed.
    fn act(&mut self, output: Output) {
        match output {
            Output::Persist(_) | Output::Notify(_) | Output::FetchAttachments { .. } => {
                unreachable!("handled in drain")
            }
            Output::Send { to, message } => self.send(to, message),
            Output::RunModel { case_id, model } => {
                // Off the runtime, bounded (see `triage`); the answer comes back as an input.
                let files = self.core.case(&case_id).map_or_else(Vec::new, |c| {
                    c.info.attachments.iter().map(|a| self.blobs.path_of(&a.hash)).collect()
                });
                let tx = self.tx.clone();
                self.models.run(case_id, &model, files, move |case_id, outcome| {
                    tokio::spawn(async move {
                        let _ = tx.send(Input::ModelDone { case_id, outcome }).await;
                    });
                });
            }
        }
    }

    fn send(&mut self, to: NodeName, message: Message) {
        let Some(link) = self.links.get(&to) else {
            self.core.handle_peer_down(now(), &to);
            return;
        };
        if let Message::CaseOffer(offer) = &message
            && let Ok(v) =
                offer.manifest.open::<federation_proto::CaseManifest>(federation_proto::content_type::MANIFEST)
        {
            self.authorized
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(to.clone())
                .or_default()
                .extend(v.body.attachments.iter().map(|a| a.hash));
        }
        self.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
        let conn = link.connection.clone();
        tokio::spawn(async move {
            let exchange = async {
                let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                transport::write_frame(&mut send, &message).await.map_err(|e| e.to_string())?;
                send.finish().map_err(|e| e.to_string())?;
                let _ = send.stopped().await;
                Ok::<(), String>(())
            };
            match tokio::time::timeout(SEND_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(peer = %to, "send of {} failed: {e}; the core retries", message.kind()),
                Err(_) => {
                    // The peer takes no data: treat the link as dead so it is re-dialled.
                    tracing::warn!(peer = %to, "no progress sending {} for {SEND_TIMEOUT:?}; closing the link", message.kind());
                    conn.close(0u32.into(), b"send timeout");
                }
            }
        });
    }

    fn fetch(&mut self, case_id: CaseId, from: NodeName, mut attachments: Vec<AttachmentRef>) {
        let t = now();
        attachments.retain(|a| {
            if self.blobs.contains(&a.hash) {
                let _ = self.core.handle_attachment_stored(t, case_id, a.hash);
                false
            } else {
                !self.fetching.contains(&(case_id, a.hash))
            }
        });
        if attachments.is_empty() {
            return;
        }
        let Some(link) = self.links.get(&from) else { return };
        // Urgent small parts first.
        attachments.sort_by_key(|a| (a.priority, a.size_bytes));
        for a in &attachments {
            self.fetching.insert((case_id, a.hash));
        }
        let (conn, blobs, tx, limits) =
            (link.connection.clone(), self.blobs.clone(), self.tx.clone(), self.limits.clone());
        let budget = self.journal_budget.clone();
        // Forget the fetches that have ended (bounded: one entry per running fetch).
        while self.fetches.try_join_next().is_some() {}
        self.fetches.spawn(async move {
            for a in attachments {
                // Small ones into memory, to be journaled with the custody commit
                // (ADR 0010), while the memory budget allows.
                let permit = (a.size_bytes <= transfer::JOURNAL_BLOB_LEN_MAX)
                    .then(|| budget.clone().try_acquire_many_owned(a.size_bytes.max(1) as u32).ok())
                    .flatten();
                if let Some(permit) = permit {
                    let input = match transfer::fetch_to_memory(&conn, case_id, &a, &limits).await {
                        Ok(bytes) => Input::Received { case_id, hash: a.hash, bytes: Arc::new(bytes), permit },
                        Err(e) => Input::FetchDone { case_id, hash: a.hash, error: Some(e.to_string()) },
                    };
                    let _ = tx.send(input).await;
                    continue;
                }
                match transfer::fetch(&conn, &blobs, case_id, &a, &limits).await {
                    Ok(()) => {
                        let _ = tx.send(Input::Stored { case_id, hash: a.hash }).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Input::FetchDone { case_id, hash: a.hash, error: Some(e.to_string()) }).await;
                    }
                }
            }
        });
    }

    /// Logs `event`, queues its audit record for the next commit and its UI event for
    /// after that commit.
    fn notify(&mut self, event: Event) {
        let t = now();
        let (kind, case, peer, detail): (&str, Option<CaseId>, Option<String>, String) = match &event {
            Event::CaseCreated { case_id } => ("case.created", Some(*case_id), None, String::new()),
            Event::CustodyTaken { case_id, from } => {
                self.metrics.custody_taken.fetch_add(1, Ordering::Relaxed);
                ("custody.taken", Some(*case_id), Some(from.to_string()), String::new())
            }
            Event::ModelRead { case_id, model, confidence, decisive } => {
                ("model.read", Some(*case_id), None, format!("{model} {confidence:.3} decisive={decisive}"))
            }
            Event::Queued { case_id, claim_deadline } => {
                if let Some(sim) = &self.config.simulated_experts {
                    let (tx, expert, wait) =
                        (self.tx.clone(), sim.name.clone(), Duration::from_millis(sim.claim_after_ms));
                    let case_id = *case_id;
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(Input::ExpertClaim { case_id, expert }).await;
                    });
                }
                ("case.queued", Some(*case_id), None, format!("claim by {}", claim_deadline.0))
            }
            Event::Claimed { case_id, expert } => ("case.claimed", Some(*case_id), None, expert.clone()),
            Event::ClaimExpired { case_id, expert } => ("case.claim_expired", Some(*case_id), None, expert.clone()),
            Event::Escalating { case_id, to, reason } => {
                ("case.escalating", Some(*case_id), Some(to.to_string()), reason.to_string())
            }
            Event::CustodyPassed { case_id, to } => {
                self.metrics.custody_passed.fetch_add(1, Ordering::Relaxed);
                ("custody.passed", Some(*case_id), Some(to.to_string()), String::new())
            }
            Event::Reported { case_id, machine_made } => {
                self.metrics.reports_signed.fetch_add(1, Ordering::Relaxed);
                ("report.signed", Some(*case_id), None, format!("machine_made={machine_made}"))
            }
            Event::ReportReceived { case_id, from } => {
                ("report.received", Some(*case_id), Some(from.to_string()), String::new())
            }
            Event::ReportAtOrigin { case_id } => {
                self.metrics.reports_at_origin.fetch_add(1, Ordering::Relaxed);
                ("report.at_origin", Some(*case_id), None, String::new())
            }
            Event::Recalled { case_id } => ("case.recalled", Some(*case_id), None, String::new()),
            Event::ConflictingReport { case_id, from } => {
                ("report.conflict", Some(*case_id), Some(from.to_string()), String::new())
            }
            Event::NoCapacity { case_id } => ("case.no_capacity", Some(*case_id), None, String::new()),
            Event::PeerRefused { peer, code, detail } => {
                ("peer.refused", None, Some(peer.to_string()), format!("{code:?}: {detail}"))
            }
        };
        tracing::info!(node = %self.config.name, case = ?case.map(|c| c.to_string()), peer = ?peer, "{kind} {detail}");
        self.ui_pending.push(UiEvent { kind: kind.to_owned(), case_id: case.map(|c| c.to_string()) });
        self.audit(t, kind, case, peer.as_deref(), &detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_recognises_dicom_by_magic_and_common_extensions() {
        let mut head = vec![0u8; 132];
        head[128..].copy_from_slice(b"DICM");
        assert_eq!(media_type_of(std::path::Path::new("x.bin"), &head), "application/dicom");
        assert_eq!(media_type_of(std::path::Path::new("slide.svs"), b""), "image/tiff");
        assert_eq!(media_type_of(std::path::Path::new("208.dat"), b""), "application/x-wfdb");
        assert_eq!(media_type_of(std::path::Path::new("notes"), b""), "application/octet-stream");
    }

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let m = Metrics::default();
        m.cases_submitted.fetch_add(3, Ordering::Relaxed);
        let text = m.render("v1");
        assert!(text.contains("# TYPE telemed_cases_submitted_total counter"));
        assert!(text.contains("telemed_cases_submitted_total{node=\"v1\"} 3"));
    }
}
