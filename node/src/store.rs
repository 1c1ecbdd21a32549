//! The node's durable store: SQLite in WAL mode through sqlx.
//!
//! It holds three things:
//! - **cases**: the whole [`CaseRecord`] the core persists ([`Change::PutCase`],
//!   ADR 0002), as CBOR, with index columns for listing ([`SqliteStore::summaries`]);
//! - **derived rows** in `hops`, `findings`, `reports` and `receipts`: one row per
//!   signed envelope in a record, keyed by the content hash (BLAKE3) of its exact bytes, so that
//!   `show CASE` and tools can query the trail without decoding records. They are an
//!   index, never read back by the core: the record is the truth;
//! - the **audit log**: append-only (SQLite triggers refuse `UPDATE` and `DELETE`),
//!   hash-chained and signed with the node key ([`SqliteStore::audit`],
//!   [`SqliteStore::verify_audit_chain`]).
//!
//! - the **blob journal**: the bytes of small attachments committed with the case
//!   that took custody of them, until their files are durable (ADR 0010,
//!   [`Write::Blob`], [`Write::ForgetBlob`]).
//!
//! WAL checkpoints run on a connection of their own in the background, right after a
//! commit (in the gap before the next) or on a timer when idle, so no commit pays
//! for one (a safety-valve autocheckpoint stays at a high page count).
//!
//! Durability contract: [`SqliteStore::apply`] returns only after its transaction
//! committed with `synchronous=FULL`, so the driver may act on the core's later
//! outputs (send a receipt, forward a case) as soon as it returns; so does
//! [`Store::commit`], which makes a whole batch of changes and audit records durable
//! in one transaction (group commit: one flush for many writes). Writes go through
//! one connection behind a FIFO lock, so they commit in call order.
//!
//! This module must never make a decision about a case (the core does), never panic
//! on database contents (bad bytes give [`StoreError::Corrupt`] naming the case), and
//! never claim durability for a change that did not commit.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::MutexGuard;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use federation_proto::codec::{from_cbor, to_cbor};
use federation_proto::{
    CaseId, ContentHash, CustodyReceipt, FRAME_LEN_MAX, Finding, HopRecord, Label, Millis, Modality, NodeName,
    PublicKey, Reader, Report, ReportReceipt, SignedEnvelope, Urgency, content_type,
};
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, Sqlite, SqliteConnection};
use tiers::{CaseRecord, CaseStatus, Change, ReportDown};

/// How long a connection waits for another process's lock before failing.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Connections that serve reads (WAL lets them run beside the one writer).
const READ_CONNECTIONS_MAX: u32 = 4;
/// Longest audit detail kept, in bytes; longer details are cut at a char boundary.
pub const AUDIT_DETAIL_LEN_MAX: usize = 4096;
/// Longest audit kind, in bytes.
pub const AUDIT_KIND_LEN_MAX: usize = 64;
/// Most records [`SqliteStore::audit_tail`] returns.
pub const AUDIT_TAIL_MAX: u32 = 10_000;
/// Audit records read per query while verifying the chain (bounds memory).
const AUDIT_VERIFY_BATCH: i64 = 1_000;
/// The audit kind of the record that hands the chain to a new node key.
pub const AUDIT_KEY_CHANGED: &str = "audit.key_changed";
/// Domain separation for the audit hash, and the encoding's version.
const AUDIT_HASH_DOMAIN: &[u8] = b"telemed-audit-v1\0";
/// SQLite's primary result code for "database or disk is full".
const SQLITE_FULL: i32 = 13;

#[cfg(feature = "hub")]
mod postgres;
#[cfg(feature = "hub")]
pub use postgres::PgStore;

/// `url` with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let Some((userinfo, host)) = authority.rsplit_once('@') else { return url.to_owned() };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let sep = if rest.contains('/') { "/" } else { "" };
    let pass = if userinfo.contains(':') { ":***" } else { "" };
    format!("{scheme}://{user}{pass}@{host}{sep}{path}")
}

/// The refusal of a PostgreSQL store by a build without the `hub` feature.
#[cfg(not(feature = "hub"))]
fn no_postgres(url: &str) -> StoreError {
    StoreError::Invalid {
        what: "the store URL",
        reason: format!(
            "{}: this build has no PostgreSQL support (the village build leaves it out); \
             use SQLite (no `[store] url`) or a build with the `hub` feature",
            redact_url(url)
        ),
    }
}

/// One embedded schema migration.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only; never edit one that has shipped (the
/// migrator refuses a database whose applied migration no longer matches).
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "initial", sql: include_str!("../migrations/sqlite/0001_initial.sql") },
    Migration { version: 2, name: "blob_journal", sql: include_str!("../migrations/sqlite/0002_blob_journal.sql") },
];

/// Everything that can go wrong in the store, grouped by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file system refused (creating the data directory, opening the file).
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed while doing `op`.
    #[error("database error while trying to {op}: {source}")]
    Database {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The disk (or the database's page limit) is full: nothing more can be stored.
    /// What was stored before is intact; refuse new cases, keep serving held ones.
    #[error("disk full: cannot {op}; cases already stored are intact")]
    DiskFull { op: &'static str },
    /// A stored case does not decode or does not match its key.
    #[error("stored record of case {case} is corrupt: {reason}")]
    Corrupt { case: String, reason: String },
    /// The audit log fails verification at `seq` (the first bad record).
    #[error("audit chain broken at seq {seq}: {reason}")]
    AuditChainBroken { seq: u64, reason: String },
    /// The database was made by another build: newer schema, or an applied migration
    /// that differs from this build's.
    #[error("incompatible database schema: {0}")]
    Schema(String),
    /// Local misuse: a write on a store opened with [`SqliteStore::open_read_only`].
    #[error("the store is open read-only: cannot {op}")]
    ReadOnly { op: &'static str },
    /// Local misuse: a value the store refuses to keep (it could not be restored).
    #[error("cannot store {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

impl StoreError {
    fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| {
            if is_disk_full(&source) { StoreError::DiskFull { op } } else { StoreError::Database { op, source } }
        }
    }
}

fn is_disk_full(e: &sqlx::Error) -> bool {
    match e {
        // PostgreSQL's SQLSTATE 53100 disk_full.
        sqlx::Error::Database(d) if d.code().as_deref() == Some("53100") => true,
        #[cfg(feature = "hub")]
        sqlx::Error::Database(d) if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() => false,
        sqlx::Error::Database(d) => {
            d.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|code| code & 0xff == SQLITE_FULL)
        }
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
        _ => false,
    }
}

/// One line of `telemed-node status`: a case as the index columns describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseSummary {
    pub id: CaseId,
    pub origin: NodeName,
    pub modality: Modality,
    pub urgency: Urgency,
    /// [`CaseStatus::name`], e.g. `forwarded`.
    pub status: String,
    pub created_at: Millis,
    pub deadline_at: Millis,
    pub updated_at: Millis,
    /// The node that signed the report, once there is one.
    pub read_at_node: Option<NodeName>,
}

/// One record of the audit log, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: Millis,
    pub kind: String,
    pub case: Option<CaseId>,
    pub peer: Option<String>,
    pub detail: String,
    pub prev_hash: ContentHash,
    pub hash: ContentHash,
    /// The key that signed `hash` (the node key when it was written).
    pub signer: PublicKey,
    pub signature: Vec<u8>,
}

/// The node's SQLite store. Cheap to clone: clones share the connection pools.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Read-only connections (WAL: they never block the writer).
    read: SqlitePool,
    /// `None` when opened read-only.
    write: Option<Writer>,
}

struct Writer {
    /// Exactly one connection.
    pool: SqlitePool,
    /// FIFO: writes commit in the order they were called.
    order: tokio::sync::Mutex<()>,
    key: SigningKey,
    /// Woken after each group commit: the checkpointer runs in the gap after one.
    committed: Arc<tokio::sync::Notify>,
    /// The background checkpointer: dropping the sender stops it.
    checkpointer: std::sync::Mutex<Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

/// How often, at the longest, the background checkpointer copies committed WAL
/// pages into the database file (`PRAGMA wal_checkpoint(PASSIVE)` on a connection
/// of its own), so that no commit pays for a checkpoint: with attachments journaled
/// in the store (ADR 0010) the WAL passes SQLite's default 1000 pages every few
/// dozen cases, and the commit that crossed it would copy and fsync megabytes
/// before returning.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// While commits come, the checkpointer runs right after one (woken by it), at most
/// this often: in the gap before the next commit, with ~1 MB to copy and flush
/// instead of the ~20 MB that half a second of 120 KB cases leaves. A timed
/// checkpoint every 500 ms landed on a custody commit's own flush and was most of
/// the per-hop p99 (issue #4; docs/benchmarks.md).
const CHECKPOINT_AFTER_COMMIT_MIN: Duration = Duration::from_millis(25);
/// WAL pages after which the writer checkpoints by itself after a commit: a safety
/// valve should the background checkpointer fall behind.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// Checkpoints the WAL after a commit (at most every [`CHECKPOINT_AFTER_COMMIT_MIN`])
/// or after [`CHECKPOINT_INTERVAL`] without one, until `stop` fires or its sender is
/// dropped. Failures are logged and tried again: a checkpoint only moves
/// committed pages, so a missed one costs WAL size, never data.
async fn checkpointer(
    options: SqliteConnectOptions,
    committed: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use sqlx::ConnectOptions;
    let mut conn = match options.connect().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!("WAL checkpointer could not connect (the writer checkpoints by itself): {e}");
            return;
        }
    };
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = committed.notified() => {
                if last.elapsed() < CHECKPOINT_AFTER_COMMIT_MIN {
                    continue;
                }
            }
            _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
        }
        last = tokio::time::Instant::now();
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut conn).await {
            tracing::debug!("WAL checkpoint: {e}");
        }
    }
    let _ = conn.close().await;
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("writable", &self.inner.write.is_some())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Takes the write order (FIFO) and the one writer connection. Run one
    /// `BEGIN IMMEDIATE` transaction on it, then hand the result to [`Self::finish`].
    async fn session(&self, op: &'static str) -> Result<(MutexGuard<'_, ()>, PoolConnection<Sqlite>), StoreError> {
        let order = self.order.lock().await;
        let conn = self.pool.acquire().await.map_err(StoreError::db(op))?;
        Ok((order, conn))
    }

    /// After a failed write the connection is discarded (the pool opens a fresh one).
    /// SQLite rolls a transaction back by itself on some errors (`SQLITE_FULL`, I/O
    /// errors); sqlx then still counts it as open and refuses every later `BEGIN` on
    /// that connection, so a disk-full moment would otherwise disable all writes.
    fn finish<T>(mut conn: PoolConnection<Sqlite>, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            conn.close_on_drop();
        }
        result
    }
}

/// Where a node keeps its store: the embedded SQLite file (every node's default) or
/// a PostgreSQL database (hubs that outgrow one file; `[store] url` in node.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            StoreLocation::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

/// The store the daemon and the client commands use: one interface, two backends
/// with identical behaviour (one test suite, `node/tests/node/store_suite.rs`, runs
/// against both). Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    #[cfg(feature = "hub")]
    Postgres(PgStore),
}

macro_rules! each_backend {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            #[cfg(feature = "hub")]
            Store::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (creating or migrating as needed) the store at `location` for writing;
    /// `audit_key` signs every audit record.
    pub async fn open(location: &StoreLocation, audit_key: SigningKey) -> Result<Store, StoreError> {
        Ok(match location {
            StoreLocation::Sqlite(path) => Store::Sqlite(SqliteStore::open(path, audit_key).await?),
            #[cfg(feature = "hub")]
            StoreLocation::Postgres(url) => Store::Postgres(PgStore::open(url, audit_key).await?),
            #[cfg(not(feature = "hub"))]
            StoreLocation::Postgres(url) => return Err(no_postgres(url)),
        })
    }

    /// Opens an existing store for reading only.
    pub async fn open_read_only(location: &StoreLocation) -> Result<Store, StoreError> {
        Ok(match location {
            StoreLocation::Sqlite(path) => Store::Sqlite(SqliteStore::open_read_only(path).await?),
            #[cfg(feature = "hub")]
            StoreLocation::Postgres(url) => Store::Postgres(PgStore::open_read_only(url).await?),
            #[cfg(not(feature = "hub"))]
            StoreLocation::Postgres(url) => return Err(no_postgres(url)),
        })
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            #[cfg(feature = "hub")]
            Store::Postgres(_) => "postgres",
        }
    }

    /// See [`SqliteStore::schema_version`].
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        each_backend!(self, s => s.schema_version().await)
    }

    /// See [`SqliteStore::close`].
    pub async fn close(&self) {
        each_backend!(self, s => s.close().await)
    }

    /// Makes `change` durable before returning; see [`SqliteStore::apply`].
    pub async fn apply(&self, change: &Change) -> Result<(), StoreError> {
        each_backend!(self, s => s.apply(change).await)
    }

    /// Group commit: makes every write in `writes` durable in ONE transaction (one
    /// flush), in order, before returning; all or nothing. Each write has exactly the
    /// effect [`Store::apply`] or [`Store::audit`] would have had on its own. An empty
    /// batch writes nothing.
    pub async fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        each_backend!(self, s => s.commit(writes).await)
    }

    /// Every stored case record, for `Node::restore`.
    pub async fn load(&self) -> Result<Vec<CaseRecord>, StoreError> {
        each_backend!(self, s => s.load().await)
    }

    /// The hashes of the blobs in the blob journal ([`Write::Blob`]), at most `limit`.
    pub async fn journaled_blobs(&self, limit: u32) -> Result<Vec<ContentHash>, StoreError> {
        each_backend!(self, s => s.journaled_blobs(limit).await)
    }

    /// The journaled bytes of blob `hash`, if it is in the journal.
    pub async fn journaled_blob(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, StoreError> {
        each_backend!(self, s => s.journaled_blob(hash).await)
    }

    /// One case's record, if stored.
    pub async fn case(&self, id: &CaseId) -> Result<Option<CaseRecord>, StoreError> {
        each_backend!(self, s => s.case(id).await)
    }

    /// Every case, most urgent first, then by deadline.
    pub async fn summaries(&self) -> Result<Vec<CaseSummary>, StoreError> {
        each_backend!(self, s => s.summaries().await)
    }

    /// Appends one audit record and returns its seq; see [`SqliteStore::audit`].
    pub async fn audit(
        &self,
        at: Millis,
        kind: &str,
        case: Option<CaseId>,
        peer: Option<&str>,
        detail: &str,
    ) -> Result<u64, StoreError> {
        each_backend!(self, s => s.audit(at, kind, case, peer, detail).await)
    }

    /// The last `n` audit records, oldest first.
    pub async fn audit_tail(&self, n: u32) -> Result<Vec<AuditRecord>, StoreError> {
        each_backend!(self, s => s.audit_tail(n).await)
    }

    /// Audit records with seq ≥ `from`, oldest first, at most `limit`.
    pub async fn audit_from(&self, from: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        each_backend!(self, s => s.audit_from(from, limit).await)
    }

    /// Verifies the whole audit chain; see [`SqliteStore::verify_audit_chain`].
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        each_backend!(self, s => s.verify_audit_chain().await)
    }
}

/// One write of a group commit ([`Store::commit`]): a change the core asked to
/// persist, or an audit record.
#[derive(Debug, Clone)]
pub enum Write {
    /// As [`Store::apply`] (including its `case.<status>` audit record).
    Change(Change),
    /// As [`Store::audit`].
    Audit { at: Millis, kind: String, case: Option<CaseId>, peer: Option<String>, detail: String },
    /// Keeps the bytes of a small attachment in the blob journal (ADR 0010), durable
    /// with the rest of the batch. The caller has checked that `bytes` hash to
    /// `hash`. Idempotent: a hash already journaled is left as it is.
    Blob { hash: ContentHash, bytes: Arc<Vec<u8>> },
    /// Drops a blob's journal row: its file under `objects/` is durable now.
    ForgetBlob(ContentHash),
}

impl Write {
    /// An audit record to append.
    pub fn audit(at: Millis, kind: &str, case: Option<CaseId>, peer: Option<&str>, detail: &str) -> Write {
        Write::Audit { at, kind: kind.to_owned(), case, peer: peer.map(str::to_owned), detail: detail.to_owned() }
    }

    fn entry(&self) -> Option<AuditEntry<'_>> {
        match self {
            Write::Audit { at, kind, case, peer, detail } => {
                Some(AuditEntry { at: *at, kind, case: *case, peer: peer.as_deref(), detail })
            }
            Write::Change(_) | Write::Blob { .. } | Write::ForgetBlob(_) => None,
        }
    }
}

/// What to write into the audit log (before seq, hashes and signature).
struct AuditEntry<'a> {
    at: Millis,
    kind: &'a str,
    case: Option<CaseId>,
    peer: Option<&'a str>,
    detail: &'a str,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` for the daemon: WAL,
    /// `synchronous=FULL`, foreign keys on, a busy timeout, and migrations applied.
    /// `audit_key` signs every audit record this store appends.
    pub async fn open(path: &Path, audit_key: SigningKey) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|source| StoreError::Io {
                op: "create the data directory",
                path: parent.to_owned(),
                source,
            })?;
        }
        let options = base_options(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string());
        let write_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(open_error(path))?;
        migrate(&write_pool).await?;
        let read = read_pool(path).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let committed = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(checkpointer(
            base_options(path).journal_mode(SqliteJournalMode::Wal).synchronous(SqliteSynchronous::Full),
            committed.clone(),
            stopped,
        ));
        let writer = Writer {
            pool: write_pool,
            order: tokio::sync::Mutex::new(()),
            key: audit_key,
            committed,
            checkpointer: std::sync::Mutex::new(Some((stop, task))),
        };
        let store = SqliteStore { inner: Arc::new(Inner { path: path.to_owned(), read, write: Some(writer) }) };
        store.record_key_change().await?;
        Ok(store)
    }

    /// Opens an existing store for reading only (`telemed-node status`/`show` while
    /// the daemon runs). Writes return [`StoreError::ReadOnly`].
    pub async fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Err(source) = tokio::fs::metadata(path).await {
            return Err(StoreError::Io { op: "open the store", path: path.to_owned(), source });
        }
        let read = read_pool(path).await?;
        let store = SqliteStore { inner: Arc::new(Inner { path: path.to_owned(), read, write: None }) };
        let version = store.schema_version().await?;
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if version > known {
            return Err(StoreError::Schema(format!(
                "the database is at schema version {version}, newer than this build's {known}"
            )));
        }
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The highest migration applied to the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let row = sqlx::query(sql::SCHEMA_VERSION)
            .fetch_one(&self.inner.read)
            .await
            .map_err(StoreError::db("read the schema version"))?;
        row.try_get::<i64, _>(0).map_err(StoreError::db("read the schema version"))
    }

    /// Closes the connections (waiting for them to finish). Everything `apply` and
    /// `audit` returned from is already durable; this only releases the file.
    pub async fn close(&self) {
        if let Some(w) = &self.inner.write {
            let checkpointer = w.checkpointer.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((stop, task)) = checkpointer {
                let _ = stop.send(());
                let _ = task.await;
            }
            w.pool.close().await;
        }
        self.inner.read.close().await;
    }

    fn writer(&self, op: &'static str) -> Result<&Writer, StoreError> {
        self.inner.write.as_ref().ok_or(StoreError::ReadOnly { op })
    }

    /// Makes `change` durable: on return, its transaction has committed with
    /// `synchronous=FULL`. One transaction upserts the case row, inserts the derived
    /// rows of envelopes not seen before and appends a `case.<status>` audit record.
    /// Applying a change equal to what is stored writes nothing.
    pub async fn apply(&self, change: &Change) -> Result<(), StoreError> {
        let writer = self.writer("apply a change")?;
        match change {
            Change::PutCase(record) => put_case(writer, record).await,
        }
    }

    /// See [`Store::commit`]: one `BEGIN IMMEDIATE` transaction, one WAL flush.
    pub async fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        const OP: &str = "commit a batch";
        if writes.is_empty() {
            return Ok(());
        }
        let writer = self.writer(OP)?;
        let encoded = encode_batch(writes)?;
        let (_order, mut conn) = writer.session(OP).await?;
        let result = async {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
            let mut tail = AuditTail::default();
            let mut forgets = Vec::new();
            for (write, bytes) in writes.iter().zip(&encoded) {
                match (write, bytes) {
                    (Write::Change(Change::PutCase(record)), Some(bytes)) => {
                        put_case_tx(&mut tx, &writer.key, record, bytes, &mut tail).await?
                    }
                    (Write::Blob { hash, bytes }, _) => {
                        // A journal write lands after the drops queued before it.
                        forget_blobs(&mut tx, &mut forgets).await?;
                        sqlx::query(sql::JOURNAL_BLOB)
                            .bind(hash.to_string())
                            .bind(&bytes[..])
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::db("journal a blob"))?;
                    }
                    (Write::ForgetBlob(hash), _) => forgets.push(hash.to_string()),
                    _ => {
                        let entry = write.entry().expect("an audit write");
                        tail.append(&mut tx, &writer.key, &entry).await?;
                    }
                }
            }
            forget_blobs(&mut tx, &mut forgets).await?;
            tail.flush(&mut tx).await?;
            tx.commit().await.map_err(StoreError::db(OP))
        }
        .await;
        if result.is_ok() {
            writer.committed.notify_one();
        }
        Writer::finish(conn, result)
    }

    /// Every stored case record, for `Node::restore`.
    pub async fn load(&self) -> Result<Vec<CaseRecord>, StoreError> {
        let rows =
            sqlx::query(sql::CASES).fetch_all(&self.inner.read).await.map_err(StoreError::db("load the cases"))?;
        rows.iter().map(decode_case_row).collect()
    }

    /// See [`Store::journaled_blobs`].
    pub async fn journaled_blobs(&self, limit: u32) -> Result<Vec<ContentHash>, StoreError> {
        const OP: &str = "list the blob journal";
        let rows = sqlx::query(sql::JOURNALED_BLOBS)
            .bind(i64::from(limit))
            .fetch_all(&self.inner.read)
            .await
            .map_err(StoreError::db(OP))?;
        rows.iter().map(|r| journal_hash(r.try_get(0).map_err(StoreError::db(OP))?)).collect()
    }

    /// See [`Store::journaled_blob`].
    pub async fn journaled_blob(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, StoreError> {
        const OP: &str = "read a journaled blob";
        let row = sqlx::query(sql::JOURNALED_BLOB)
            .bind(hash.to_string())
            .fetch_optional(&self.inner.read)
            .await
            .map_err(StoreError::db(OP))?;
        row.map(|r| r.try_get::<Vec<u8>, _>(0).map_err(StoreError::db(OP))).transpose()
    }

    /// One case's record, if stored.
    pub async fn case(&self, id: &CaseId) -> Result<Option<CaseRecord>, StoreError> {
        let row = sqlx::query(sql::CASE_RECORD)
            .bind(id.to_string())
            .fetch_optional(&self.inner.read)
            .await
            .map_err(StoreError::db("read a case"))?;
        row.as_ref().map(decode_case_row).transpose()
    }

    /// Every case, most urgent first, then by deadline (earliest first).
    pub async fn summaries(&self) -> Result<Vec<CaseSummary>, StoreError> {
        let rows =
            sqlx::query(sql::SUMMARIES).fetch_all(&self.inner.read).await.map_err(StoreError::db("list the cases"))?;
        rows.iter().map(decode_summary_row).collect()
    }

    /// Appends one audit record and returns its seq. `kind` names what happened
    /// (e.g. `peer.rejected`), `detail` says it for people (cut at
    /// [`AUDIT_DETAIL_LEN_MAX`] bytes).
    pub async fn audit(
        &self,
        at: Millis,
        kind: &str,
        case: Option<CaseId>,
        peer: Option<&str>,
        detail: &str,
    ) -> Result<u64, StoreError> {
        const OP: &str = "append to the audit log";
        let writer = self.writer(OP)?;
        let (_order, mut conn) = writer.session(OP).await?;
        let result = async {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
            let seq = append_audit(&mut tx, &writer.key, &AuditEntry { at, kind, case, peer, detail }).await?;
            tx.commit().await.map_err(StoreError::db(OP))?;
            Ok(seq)
        }
        .await;
        Writer::finish(conn, result)
    }

    /// The last `n` audit records (at most [`AUDIT_TAIL_MAX`]), oldest first.
    pub async fn audit_tail(&self, n: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let n = n.min(AUDIT_TAIL_MAX);
        let rows = sqlx::query(sql::AUDIT_TAIL)
            .bind(i64::from(n))
            .fetch_all(&self.inner.read)
            .await
            .map_err(StoreError::db("read the audit log"))?;
        rows.iter().map(decode_audit_row).collect()
    }

    /// Audit records with seq ≥ `from`, oldest first, at most `limit` (capped at
    /// [`AUDIT_TAIL_MAX`]): page through the whole log for export.
    pub async fn audit_from(&self, from: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(sql::AUDIT_FROM)
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit.min(AUDIT_TAIL_MAX)))
            .fetch_all(&self.inner.read)
            .await
            .map_err(StoreError::db("read the audit log"))?;
        rows.iter().map(decode_audit_row).collect()
    }

    /// Recomputes every audit record's hash, checks the chain of `prev_hash`es, the
    /// seqs (no gap), and every signature. A change of signer must be announced by an
    /// [`AUDIT_KEY_CHANGED`] record, and on a writable store the last record must be
    /// signed by this store's key. Returns how many records verified; the error names
    /// the first bad seq.
    ///
    /// This proves the log was written by the keys it names and not altered since,
    /// except by someone holding such a key; whether those keys belong to this node
    /// is for the caller to check against the node's certificate.
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let mut chain = ChainCheck::new();
        loop {
            let rows = sqlx::query(sql::AUDIT_FROM)
                .bind(chain.next_seq())
                .bind(AUDIT_VERIFY_BATCH)
                .fetch_all(&self.inner.read)
                .await
                .map_err(StoreError::db("read the audit log"))?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                chain.check(&decode_audit_row(row)?)?;
            }
        }
        chain.finish(self.inner.write.as_ref().map(|w| PublicKey(w.key.verifying_key().to_bytes())))
    }

    /// On open: if the log's last record was signed by another key (the node key was
    /// rotated), append a record that hands the chain over to this key.
    async fn record_key_change(&self) -> Result<(), StoreError> {
        const OP: &str = "check the audit key";
        let writer = self.writer(OP)?;
        let (_order, mut conn) = writer.session(OP).await?;
        let result = async {
            let own = PublicKey(writer.key.verifying_key().to_bytes());
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
            let last = sqlx::query(sql::AUDIT_LAST).fetch_optional(&mut *tx).await.map_err(StoreError::db(OP))?;
            let Some(last) = last else {
                return tx.rollback().await.map_err(StoreError::db(OP));
            };
            let seq: i64 = last.try_get("seq").map_err(StoreError::db(OP))?;
            let signer: Vec<u8> = last.try_get("signer").map_err(StoreError::db(OP))?;
            let Some(detail) = key_change_detail(&signer, own, seq)? else {
                return tx.rollback().await.map_err(StoreError::db(OP));
            };
            let entry =
                AuditEntry { at: wall_clock(), kind: AUDIT_KEY_CHANGED, case: None, peer: None, detail: &detail };
            append_audit(&mut tx, &writer.key, &entry).await?;
            tx.commit().await.map_err(StoreError::db(OP))?;
            Ok(())
        }
        .await;
        Writer::finish(conn, result)
    }
}

fn base_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new().filename(path).foreign_keys(true).busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
}

async fn read_pool(path: &Path) -> Result<SqlitePool, StoreError> {
    SqlitePoolOptions::new()
        .max_connections(READ_CONNECTIONS_MAX)
        .connect_with(base_options(path).read_only(true))
        .await
        .map_err(open_error(path))
}

fn open_error(path: &Path) -> impl FnOnce(sqlx::Error) -> StoreError {
    let path = path.to_owned();
    move |e| match e {
        sqlx::Error::Io(source) => StoreError::Io { op: "open the store", path, source },
        other => StoreError::db("open the store")(other),
    }
}

fn wall_clock() -> Millis {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// SQLite integers are signed: times past `i64::MAX` ms (in 292 million years) are
/// clamped. The audit hash covers the clamped value, so verification still holds.
fn sql_millis(t: Millis) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn sha256_of(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Applies every embedded migration the database has not seen, each in its own
/// `BEGIN IMMEDIATE` transaction recorded in `schema_version`.
async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    const OP: &str = "migrate the schema";
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version       INTEGER NOT NULL PRIMARY KEY,
             name          TEXT    NOT NULL,
             sha256        TEXT    NOT NULL,
             applied_at_ms INTEGER NOT NULL
         ) STRICT",
    )
    .execute(pool)
    .await
    .map_err(StoreError::db(OP))?;
    for m in MIGRATIONS {
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db(OP))?;
        let applied = sqlx::query(sql::MIGRATION_SHA)
            .bind(m.version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let sha = sha256_of(m.sql);
        if let Some(row) = applied {
            let stored: String = row.try_get(0).map_err(StoreError::db(OP))?;
            if stored != sha {
                return Err(StoreError::Schema(format!(
                    "migration {} ({}) applied to this database differs from this build's",
                    m.version, m.name
                )));
            }
            tx.rollback().await.map_err(StoreError::db(OP))?;
            continue;
        }
        sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(StoreError::db(OP))?;
        sqlx::query(sql::MIGRATION_RECORD)
            .bind(m.version)
            .bind(m.name)
            .bind(&sha)
            .bind(sql_millis(wall_clock()))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        tx.commit().await.map_err(StoreError::db(OP))?;
        tracing::info!(version = m.version, name = m.name, "applied store migration");
    }
    let newest = sqlx::query(sql::SCHEMA_VERSION)
        .fetch_one(pool)
        .await
        .map_err(StoreError::db(OP))?
        .try_get::<i64, _>(0)
        .map_err(StoreError::db(OP))?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if newest > known {
        return Err(StoreError::Schema(format!(
            "the database is at schema version {newest}, newer than this build's {known}"
        )));
    }
    Ok(())
}

fn urgency_rank(u: Urgency) -> i64 {
    match u {
        Urgency::Stat => 0,
        Urgency::Urgent => 1,
        Urgency::Routine => 2,
    }
}

async fn put_case(writer: &Writer, record: &CaseRecord) -> Result<(), StoreError> {
    const OP: &str = "store a case";
    let bytes = encode_case(record)?;
    let (_order, mut conn) = writer.session(OP).await?;
    let result = put_case_in(&mut conn, &writer.key, record, &bytes).await;
    Writer::finish(conn, result)
}

/// The CBOR a case is stored as, refusing what could not be restored.
fn encode_case(record: &CaseRecord) -> Result<Vec<u8>, StoreError> {
    let bytes = to_cbor(record).map_err(|e| StoreError::Invalid { what: "a case record", reason: e.to_string() })?;
    if bytes.len() > FRAME_LEN_MAX {
        // `from_cbor` refuses it on load: never claim durability for what cannot be restored.
        return Err(StoreError::Invalid {
            what: "a case record",
            reason: format!("{} bytes of CBOR exceed the {FRAME_LEN_MAX}-byte limit", bytes.len()),
        });
    }
    Ok(bytes)
}

async fn put_case_in(
    conn: &mut SqliteConnection,
    key: &SigningKey,
    record: &CaseRecord,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db("store a case"))?;
    let mut tail = AuditTail::default();
    put_case_tx(&mut tx, key, record, bytes, &mut tail).await?;
    tail.flush(&mut tx).await?;
    tx.commit().await.map_err(StoreError::db("commit a case"))?;
    Ok(())
}

/// The CBOR of every case a batch writes (`None` for audit records), encoded before
/// the write lock is taken; refuses the whole batch if one cannot be stored.
/// A blob journal key back to its hash.
fn journal_hash(hex: String) -> Result<ContentHash, StoreError> {
    let bytes: [u8; 32] = hex::decode(&hex).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| {
        StoreError::Corrupt { case: "(blob journal)".into(), reason: format!("bad blob hash {hex:?}") }
    })?;
    Ok(ContentHash(bytes))
}

fn encode_batch(writes: &[Write]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    writes
        .iter()
        .map(|w| match w {
            Write::Change(Change::PutCase(record)) => encode_case(record).map(Some),
            Write::Audit { .. } | Write::Blob { .. } | Write::ForgetBlob(_) => Ok(None),
        })
        .collect()
}

/// Upserts a case, indexes its new envelopes and audits it, inside the caller's
/// `BEGIN IMMEDIATE` transaction. A record equal byte for byte to the stored one
/// writes nothing.
async fn put_case_tx(
    tx: &mut SqliteConnection,
    key: &SigningKey,
    record: &CaseRecord,
    bytes: &[u8],
    tail: &mut AuditTail,
) -> Result<(), StoreError> {
    const OP: &str = "store a case";
    let id = record.info.case_id.to_string();
    // One statement, no read first: the upsert changes no row when the stored record
    // is the same byte for byte (a duplicate delivery), and then nothing else is
    // written either.
    let changed = bind_values(sqlx::query(sql::CASE_UPSERT), case_values(record, &id, bytes))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(OP))?
        .rows_affected();
    if changed == 0 {
        return Ok(()); // already stored, byte for byte
    }

    let known = sqlx::query(sql::DERIVED_HASHES)
        .bind(&id)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::db("index a case's envelopes"))?;
    let known: HashSet<String> = known.iter().filter_map(|r| r.try_get::<String, _>(0).ok()).collect();
    for row in derived_rows(record, &id, &known) {
        bind_values(sqlx::query(row.sql), row.values)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("index a case's envelopes"))?;
    }

    let (peer, detail) = describe(record);
    let kind = format!("case.{}", record.status.name());
    let entry = AuditEntry {
        at: record.updated_at,
        kind: &kind,
        case: Some(record.info.case_id),
        peer: peer.as_ref().map(NodeName::as_str),
        detail: &detail,
    };
    tail.append(tx, key, &entry).await?;
    Ok(())
}

/// The statements both backends run. Placeholders are `$N`, which PostgreSQL and
/// sqlx's SQLite driver both accept; the schema is the same table by table.
mod sql {
    pub const JOURNAL_BLOB: &str =
        "INSERT INTO blob_journal (hash, bytes) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING";
    pub const JOURNALED_BLOBS: &str = "SELECT hash FROM blob_journal ORDER BY hash LIMIT $1";
    pub const JOURNALED_BLOB: &str = "SELECT bytes FROM blob_journal WHERE hash = $1";
    pub const CASE_RECORD: &str = "SELECT case_id, record FROM cases WHERE case_id = $1";
    pub const CASES: &str = "SELECT case_id, record FROM cases ORDER BY case_id";
    pub const CASE_UPSERT: &str = "INSERT INTO cases (case_id, origin, modality, urgency, urgency_rank, status,
                                       created_at, deadline_at, updated_at, record)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (case_id) DO UPDATE SET
             origin = excluded.origin, modality = excluded.modality, urgency = excluded.urgency,
             urgency_rank = excluded.urgency_rank, status = excluded.status, created_at = excluded.created_at,
             deadline_at = excluded.deadline_at, updated_at = excluded.updated_at, record = excluded.record
         WHERE cases.record IS DISTINCT FROM excluded.record";
    pub const SUMMARIES: &str = "SELECT c.case_id, c.origin, c.modality, c.urgency, c.status, c.created_at,
                c.deadline_at, c.updated_at,
                (SELECT r.node FROM reports r WHERE r.case_id = c.case_id
                 ORDER BY r.signed_at, r.envelope_hash LIMIT 1) AS read_at_node
         FROM cases c
         ORDER BY c.urgency_rank, c.deadline_at, c.case_id";
    pub const DERIVED_HASHES: &str = "SELECT envelope_hash FROM hops WHERE case_id = $1
         UNION ALL SELECT envelope_hash FROM findings WHERE case_id = $1
         UNION ALL SELECT envelope_hash FROM reports WHERE case_id = $1
         UNION ALL SELECT envelope_hash FROM receipts WHERE case_id = $1";
    pub const HOP_INSERT: &str = "INSERT INTO hops (envelope_hash, case_id, position, signer, from_node,
                 from_tier, to_node, to_tier, arrived_at, left_at, skipped, reason_kind, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (envelope_hash) DO NOTHING";
    pub const FINDING_INSERT: &str = "INSERT INTO findings (envelope_hash, case_id, position, signer, node, tier,
                 reader_kind, reader, labels, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (envelope_hash) DO NOTHING";
    pub const REPORT_INSERT: &str = "INSERT INTO reports (envelope_hash, case_id, signer, node, tier, reader_kind,
                 reader, machine_made, labels, text, signed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (envelope_hash) DO NOTHING";
    pub const RECEIPT_INSERT: &str = "INSERT INTO receipts (envelope_hash, case_id, kind, signer, receiver,
                 from_node, subject_hash, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (envelope_hash) DO NOTHING";
    /// [`AUDIT_INSERT`] for `rows` records in one statement.
    pub fn audit_insert(rows: usize) -> String {
        let mut q = String::from(AUDIT_INSERT.split(" VALUES ").next().unwrap_or(AUDIT_INSERT));
        q.push_str(" VALUES ");
        for r in 0..rows {
            let b = r * 10;
            if r > 0 {
                q.push_str(", ");
            }
            let params: Vec<String> = (1..=10).map(|i| format!("${}", b + i)).collect();
            q.push('(');
            q.push_str(&params.join(", "));
            q.push(')');
        }
        q
    }
    /// Drops `n` blob journal rows by hash.
    pub fn forget_blobs(n: usize) -> String {
        let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        format!("DELETE FROM blob_journal WHERE hash IN ({})", params.join(", "))
    }
    pub const AUDIT_LAST: &str = "SELECT seq, hash, signer FROM audit ORDER BY seq DESC LIMIT 1";
    pub const AUDIT_INSERT: &str = "INSERT INTO audit (seq, at_ms, kind, case_id, peer, detail, prev_hash, hash,
                 signer, signature)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    pub const AUDIT_TAIL: &str = "SELECT * FROM (SELECT seq, at_ms, kind, case_id, peer, detail, prev_hash, hash,
                                         signer, signature
                            FROM audit ORDER BY seq DESC LIMIT $1) AS tail
         ORDER BY seq";
    pub const AUDIT_FROM: &str = "SELECT seq, at_ms, kind, case_id, peer, detail, prev_hash, hash, signer, signature
         FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2";
    pub const SCHEMA_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM schema_version";
    pub const MIGRATION_SHA: &str = "SELECT sha256 FROM schema_version WHERE version = $1";
    pub const MIGRATION_RECORD: &str =
        "INSERT INTO schema_version (version, name, sha256, applied_at_ms) VALUES ($1, $2, $3, $4)";
}

/// A value bound to one of the [`sql`] statements, the same for both backends.
#[derive(Debug, Clone)]
enum SqlValue {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    Bytes(Vec<u8>),
}

fn text(s: impl Into<String>) -> SqlValue {
    SqlValue::Text(s.into())
}

/// Binds `values` in order (to `$1`, `$2`, ...).
fn bind_values<'q, DB: sqlx::Database>(
    mut q: sqlx::query::Query<'q, DB, DB::Arguments>,
    values: Vec<SqlValue>,
) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    Option<String>: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    Vec<u8>: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    for v in values {
        q = match v {
            SqlValue::Text(s) => q.bind(s),
            SqlValue::OptText(s) => q.bind(s),
            SqlValue::Int(i) => q.bind(i),
            SqlValue::Bytes(b) => q.bind(b),
        };
    }
    q
}

/// Column access both backends' rows share (by column name).
trait StoreRow {
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, col: &str) -> Result<i64, sqlx::Error>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>, sqlx::Error>;
}

macro_rules! impl_store_row {
    ($row:ty) => {
        impl StoreRow for $row {
            fn text(&self, col: &str) -> Result<String, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(col)
            }
            fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
                self.try_get(col)
            }
            fn bytes(&self, col: &str) -> Result<Vec<u8>, sqlx::Error> {
                self.try_get(col)
            }
        }
    };
}
impl_store_row!(sqlx::sqlite::SqliteRow);
#[cfg(feature = "hub")]
impl_store_row!(sqlx::postgres::PgRow);

/// The values of [`sql::CASE_UPSERT`].
fn case_values(record: &CaseRecord, id: &str, bytes: &[u8]) -> Vec<SqlValue> {
    let info = &record.info;
    vec![
        text(id),
        text(info.origin.as_str()),
        text(info.modality.as_str()),
        text(info.urgency.as_str()),
        SqlValue::Int(urgency_rank(info.urgency)),
        text(record.status.name()),
        SqlValue::Int(sql_millis(info.created_at)),
        SqlValue::Int(sql_millis(info.deadline_at)),
        SqlValue::Int(sql_millis(record.updated_at)),
        SqlValue::Bytes(bytes.to_vec()),
    ]
}

/// The peer a case's status is about, and a line for people.
fn describe(record: &CaseRecord) -> (Option<NodeName>, String) {
    let from = || record.came_from.as_ref().map_or_else(|| "submitted here".to_owned(), |c| format!("from {c}"));
    let (peer, what) = match &record.status {
        CaseStatus::Receiving => {
            (record.came_from.clone(), format!("receiving {} ({} attachments missing)", from(), missing(record)))
        }
        CaseStatus::Held => (record.came_from.clone(), format!("held, {}", from())),
        CaseStatus::AwaitingModel { model } => (None, format!("model {model} reading")),
        CaseStatus::Queued { claim_deadline, .. } => (None, format!("queued for experts, claim by {claim_deadline}")),
        CaseStatus::Claimed { expert, .. } => (None, format!("claimed by {expert}")),
        CaseStatus::Forwarding { to, attempts, .. } => {
            (Some(to.clone()), format!("offered to {to} (attempt {attempts})"))
        }
        CaseStatus::Forwarded { to, .. } => (Some(to.clone()), format!("custody passed to {to}")),
        CaseStatus::Reported { .. } => match &record.report_down {
            ReportDown::Pending { to, attempts, .. } => {
                (Some(to.clone()), format!("reported; delivering to {to} (attempt {attempts})"))
            }
            ReportDown::Acked { to, .. } => (Some(to.clone()), format!("reported; {to} acknowledged the report")),
            ReportDown::AtOrigin => (None, "reported; the report is at its origin".to_owned()),
            ReportDown::None => (None, "reported".to_owned()),
        },
        CaseStatus::Recalled { .. } => (None, "recalled by its origin".to_owned()),
        CaseStatus::NoCapacity { .. } => (None, "no capacity anywhere above; waiting".to_owned()),
    };
    let detail = format!(
        "{what}; {} hops, {} findings, report {}",
        record.trail.len(),
        record.findings.len(),
        if record.report.is_some() { "present" } else { "absent" }
    );
    (peer, detail)
}

fn missing(record: &CaseRecord) -> usize {
    record.missing_attachments().len()
}

fn labels_json(labels: &[Label]) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "[]".to_owned())
}

fn reader_columns(reader: &Reader) -> (&'static str, String) {
    match reader {
        Reader::Model { model, version } => ("model", format!("{model}@{version}")),
        Reader::Expert { expert } => ("expert", expert.clone()),
    }
}

/// One INSERT of a derived row.
struct DerivedRow {
    sql: &'static str,
    values: Vec<SqlValue>,
}

fn position(i: usize) -> SqlValue {
    SqlValue::Int(i64::try_from(i).unwrap_or(i64::MAX))
}

/// The derived rows of every envelope of the record not in `known` (the envelope
/// hashes already indexed). An envelope that does not verify or belongs to another
/// case is skipped with a warning: the record itself is stored regardless, and is
/// the truth.
fn derived_rows(record: &CaseRecord, id: &str, known: &HashSet<String>) -> Vec<DerivedRow> {
    let mut out = Vec::new();
    let case_id = record.info.case_id;
    let fresh = |env: &SignedEnvelope| {
        let hash = env.hash().to_string();
        (!known.contains(&hash)).then_some(hash)
    };
    let skip = |what: &str, env: &SignedEnvelope, why: &dyn std::fmt::Display| {
        tracing::warn!(case = %case_id, envelope = %env.hash(), "not indexing {what}: {why}");
    };

    for (i, env) in record.trail.iter().enumerate() {
        let Some(hash) = fresh(env) else { continue };
        let hop = match env.open::<HopRecord>(content_type::HOP) {
            Ok(v) if v.body.case_id == case_id => v,
            Ok(_) => {
                skip("a hop", env, &"it names another case");
                continue;
            }
            Err(e) => {
                skip("a hop", env, &e);
                continue;
            }
        };
        let reason_kind = serde_json::to_value(&hop.body.reason)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
            .unwrap_or_default();
        let skipped = serde_json::to_string(&hop.body.skipped).unwrap_or_else(|_| "[]".to_owned());
        let b = &hop.body;
        out.push(DerivedRow {
            sql: sql::HOP_INSERT,
            values: vec![
                text(hash),
                text(id),
                position(i),
                text(hop.signer.to_string()),
                text(b.from.as_str()),
                text(b.from_tier.as_str()),
                text(b.to.as_str()),
                text(b.to_tier.as_str()),
                SqlValue::Int(sql_millis(b.arrived_at)),
                SqlValue::Int(sql_millis(b.left_at)),
                text(skipped),
                text(reason_kind),
                text(b.reason.to_string()),
            ],
        });
    }

    for (i, env) in record.findings.iter().enumerate() {
        let Some(hash) = fresh(env) else { continue };
        let finding = match env.open::<Finding>(content_type::FINDING) {
            Ok(v) if v.body.case_id == case_id => v,
            Ok(_) => {
                skip("a finding", env, &"it names another case");
                continue;
            }
            Err(e) => {
                skip("a finding", env, &e);
                continue;
            }
        };
        let (reader_kind, reader) = reader_columns(&finding.body.reader);
        let b = &finding.body;
        out.push(DerivedRow {
            sql: sql::FINDING_INSERT,
            values: vec![
                text(hash),
                text(id),
                position(i),
                text(finding.signer.to_string()),
                text(b.node.as_str()),
                text(b.tier.as_str()),
                text(reader_kind),
                text(reader),
                text(labels_json(&b.labels)),
                SqlValue::Int(sql_millis(b.at)),
            ],
        });
    }

    if let Some(env) = &record.report
        && let Some(hash) = fresh(env)
    {
        match env.open::<Report>(content_type::REPORT) {
            Ok(v) if v.body.case_id == case_id => {
                let (reader_kind, reader) = reader_columns(&v.body.reader);
                let b = &v.body;
                out.push(DerivedRow {
                    sql: sql::REPORT_INSERT,
                    values: vec![
                        text(hash),
                        text(id),
                        text(v.signer.to_string()),
                        text(b.node.as_str()),
                        text(b.tier.as_str()),
                        text(reader_kind),
                        text(reader),
                        SqlValue::Int(i64::from(b.machine_made)),
                        text(labels_json(&b.labels)),
                        text(b.text.clone()),
                        SqlValue::Int(sql_millis(b.signed_at)),
                    ],
                });
            }
            Ok(_) => skip("a report", env, &"it names another case"),
            Err(e) => skip("a report", env, &e),
        }
    }

    let receipt = |hash: String,
                   kind: &str,
                   signer: PublicKey,
                   receiver: &NodeName,
                   from: Option<&NodeName>,
                   subject: ContentHash,
                   at: Millis| DerivedRow {
        sql: sql::RECEIPT_INSERT,
        values: vec![
            text(hash),
            text(id),
            text(kind),
            text(signer.to_string()),
            text(receiver.as_str()),
            SqlValue::OptText(from.map(|f| f.as_str().to_owned())),
            text(subject.to_string()),
            SqlValue::Int(sql_millis(at)),
        ],
    };
    if let Some(env) = &record.custody_receipt
        && let Some(hash) = fresh(env)
    {
        match env.open::<CustodyReceipt>(content_type::CUSTODY_RECEIPT) {
            Ok(v) if v.body.case_id == case_id => {
                let b = &v.body;
                out.push(receipt(hash, "custody", v.signer, &b.receiver, Some(&b.from), b.manifest_hash, b.at));
            }
            Ok(_) => skip("a custody receipt", env, &"it names another case"),
            Err(e) => skip("a custody receipt", env, &e),
        }
    }

    if let ReportDown::Acked { receipt: env, .. } = &record.report_down
        && let Some(hash) = fresh(env)
    {
        match env.open::<ReportReceipt>(content_type::REPORT_RECEIPT) {
            Ok(v) if v.body.case_id == case_id => {
                let b = &v.body;
                out.push(receipt(hash, "report", v.signer, &b.receiver, None, b.report_hash, b.at));
            }
            Ok(_) => skip("a report receipt", env, &"it names another case"),
            Err(e) => skip("a report receipt", env, &e),
        }
    }
    out
}

fn decode_case_row(row: &impl StoreRow) -> Result<CaseRecord, StoreError> {
    let id: String = row.text("case_id").unwrap_or_else(|_| "<unreadable id>".to_owned());
    let corrupt = |reason: String| StoreError::Corrupt { case: id.clone(), reason };
    let bytes: Vec<u8> = row.bytes("record").map_err(|e| corrupt(format!("record column: {e}")))?;
    let record: CaseRecord = from_cbor(&bytes).map_err(|e| corrupt(format!("record does not decode: {e}")))?;
    if record.info.case_id.to_string() != id {
        return Err(corrupt(format!("the record is of case {}", record.info.case_id)));
    }
    Ok(record)
}

fn decode_summary_row(row: &impl StoreRow) -> Result<CaseSummary, StoreError> {
    let id: String = row.text("case_id").unwrap_or_else(|_| "<unreadable id>".to_owned());
    let corrupt = |reason: String| StoreError::Corrupt { case: id.clone(), reason };
    let text = |col: &str| row.text(col).map_err(|e| corrupt(format!("{col}: {e}")));
    let millis = |col: &str| {
        let v: i64 = row.int(col).map_err(|e| corrupt(format!("{col}: {e}")))?;
        u64::try_from(v).map(Millis).map_err(|_| corrupt(format!("{col} is negative")))
    };
    Ok(CaseSummary {
        id: id.parse().map_err(|e| corrupt(format!("case id: {e}")))?,
        origin: NodeName(text("origin")?),
        modality: text("modality")?.parse().map_err(|e| corrupt(format!("{e}")))?,
        urgency: text("urgency")?.parse().map_err(|e| corrupt(format!("{e}")))?,
        status: text("status")?,
        created_at: millis("created_at")?,
        deadline_at: millis("deadline_at")?,
        updated_at: millis("updated_at")?,
        read_at_node: row.opt_text("read_at_node").map_err(|e| corrupt(format!("read_at_node: {e}")))?.map(NodeName),
    })
}

fn key_from(bytes: &[u8]) -> Result<PublicKey, String> {
    <[u8; 32]>::try_from(bytes).map(PublicKey).map_err(|_| format!("signer is {} bytes, not 32", bytes.len()))
}

fn decode_audit_row(row: &impl StoreRow) -> Result<AuditRecord, StoreError> {
    let seq: i64 = row.int("seq").map_err(StoreError::db("read the audit log"))?;
    let seq = u64::try_from(seq).unwrap_or(0);
    let broken = |reason: String| StoreError::AuditChainBroken { seq, reason };
    let col = |e: sqlx::Error| broken(format!("unreadable column: {e}"));
    let hash32 = |bytes: Vec<u8>, what: &str| {
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(ContentHash)
            .map_err(|_| broken(format!("{what} is {} bytes, not 32", bytes.len())))
    };
    let at: i64 = row.int("at_ms").map_err(col)?;
    let case = row
        .opt_text("case_id")
        .map_err(col)?
        .map(|c| c.parse::<CaseId>().map_err(|e| broken(format!("case id `{c}`: {e}"))))
        .transpose()?;
    Ok(AuditRecord {
        seq,
        at: Millis(u64::try_from(at).map_err(|_| broken("at_ms is negative".into()))?),
        kind: row.text("kind").map_err(col)?,
        case,
        peer: row.opt_text("peer").map_err(col)?,
        detail: row.text("detail").map_err(col)?,
        prev_hash: hash32(row.bytes("prev_hash").map_err(col)?, "prev_hash")?,
        hash: hash32(row.bytes("hash").map_err(col)?, "hash")?,
        signer: key_from(&row.bytes("signer").map_err(col)?).map_err(broken)?,
        signature: row.bytes("signature").map_err(col)?,
    })
}

fn verify_signature(record: &AuditRecord) -> Result<(), String> {
    let key = VerifyingKey::from_bytes(&record.signer.0).map_err(|_| "signer is not an Ed25519 key".to_owned())?;
    let signature = Signature::from_slice(&record.signature).map_err(|_| "signature is malformed".to_owned())?;
    key.verify_strict(&record.hash.0, &signature).map_err(|_| "signature does not verify".to_owned())
}

/// Walks the audit log record by record (oldest first), checking what
/// [`SqliteStore::verify_audit_chain`] promises; both backends feed it.
struct ChainCheck {
    expected_seq: u64,
    prev_hash: ContentHash,
    prev_signer: Option<PublicKey>,
}

impl ChainCheck {
    fn new() -> ChainCheck {
        ChainCheck { expected_seq: 1, prev_hash: ContentHash([0; 32]), prev_signer: None }
    }

    /// The seq to read from next.
    fn next_seq(&self) -> i64 {
        i64::try_from(self.expected_seq).unwrap_or(i64::MAX)
    }

    fn check(&mut self, record: &AuditRecord) -> Result<(), StoreError> {
        let broken = |reason: String| StoreError::AuditChainBroken { seq: self.expected_seq, reason };
        if record.seq != self.expected_seq {
            return Err(broken(format!("record missing (the next stored is seq {})", record.seq)));
        }
        if record.prev_hash != self.prev_hash {
            return Err(broken("prev_hash does not match the hash of the record before".into()));
        }
        let entry = AuditEntry {
            at: record.at,
            kind: &record.kind,
            case: record.case,
            peer: record.peer.as_deref(),
            detail: &record.detail,
        };
        if audit_hash(record.seq, &entry, &record.prev_hash, &record.signer) != record.hash {
            return Err(broken("hash does not match the record's contents".into()));
        }
        verify_signature(record).map_err(broken)?;
        if let Some(prev) = self.prev_signer
            && prev != record.signer
            && !(record.kind == AUDIT_KEY_CHANGED && record.detail.contains(&prev.to_string()))
        {
            return Err(broken(format!("signer changed from {prev} without an {AUDIT_KEY_CHANGED} record")));
        }
        self.prev_hash = record.hash;
        self.prev_signer = Some(record.signer);
        self.expected_seq += 1;
        Ok(())
    }

    /// How many records verified; on a writable store (`own` is its key) the last
    /// record must be signed by that key.
    fn finish(self, own: Option<PublicKey>) -> Result<u64, StoreError> {
        let count = self.expected_seq - 1;
        if let (Some(own), Some(last)) = (own, self.prev_signer)
            && last != own
        {
            return Err(StoreError::AuditChainBroken {
                seq: count,
                reason: format!("the last record is signed by {last}, not by this node's key {own}"),
            });
        }
        Ok(count)
    }
}

/// If the log's last record (`last_signer`) was signed by another key than `own`,
/// the detail of the record that hands the chain over.
fn key_change_detail(last_signer: &[u8], own: PublicKey, last_seq: i64) -> Result<Option<String>, StoreError> {
    let signer = key_from(last_signer)
        .map_err(|reason| StoreError::AuditChainBroken { seq: u64::try_from(last_seq).unwrap_or(0), reason })?;
    if signer == own {
        return Ok(None);
    }
    tracing::warn!(old = %signer, new = %own, "audit key changed; recorded in the audit log");
    Ok(Some(format!("audit key changed from {signer} to {own}")))
}

/// Cuts `s` to at most `max` bytes at a char boundary.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// SHA-256 over the canonical encoding of an audit record: a domain tag, then
/// seq and at_ms as u64 big-endian, strings as u64 big-endian length + UTF-8 bytes,
/// optional values as a 0 byte (absent) or a 1 byte and the value, the case id as
/// its 16 bytes, then prev_hash and the signer's public key (32 bytes each).
fn audit_hash(seq: u64, e: &AuditEntry<'_>, prev_hash: &ContentHash, signer: &PublicKey) -> ContentHash {
    fn put_str(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Sha256::new();
    h.update(AUDIT_HASH_DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(e.at.0.to_be_bytes());
    put_str(&mut h, e.kind);
    match e.case {
        None => h.update([0u8]),
        Some(c) => {
            h.update([1u8]);
            h.update(c.0);
        }
    }
    match e.peer {
        None => h.update([0u8]),
        Some(p) => {
            h.update([1u8]);
            put_str(&mut h, p);
        }
    }
    put_str(&mut h, e.detail);
    h.update(prev_hash.0);
    h.update(signer.0);
    ContentHash(h.finalize().into())
}

/// Seals the next audit record after `last` (the stored `(seq, hash)` of the last
/// record, if any): returns its seq and the values of [`sql::AUDIT_INSERT`].
fn seal_audit(
    last: Option<(i64, Vec<u8>)>,
    key: &SigningKey,
    entry: &AuditEntry<'_>,
) -> Result<(u64, AuditHead, Vec<SqlValue>), StoreError> {
    let kind = bounded(entry.kind, AUDIT_KIND_LEN_MAX);
    let detail = bounded(entry.detail, AUDIT_DETAIL_LEN_MAX);
    let entry = AuditEntry {
        at: Millis(entry.at.0.min(i64::MAX as u64)), // what the databases can store; the hash covers this
        kind,
        case: entry.case,
        peer: entry.peer,
        detail,
    };
    let (seq, prev_hash) = match last {
        None => (1u64, ContentHash([0; 32])),
        Some((seq, hash)) => {
            let seq = u64::try_from(seq).unwrap_or(0);
            let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| StoreError::AuditChainBroken {
                seq,
                reason: format!("stored hash is {} bytes, not 32", hash.len()),
            })?;
            (seq + 1, ContentHash(hash))
        }
    };
    let signer = PublicKey(key.verifying_key().to_bytes());
    let hash = audit_hash(seq, &entry, &prev_hash, &signer);
    let signature = key.sign(&hash.0);
    let sealed = (i64::try_from(seq).unwrap_or(i64::MAX), hash.0.to_vec());
    let values = vec![
        SqlValue::Int(i64::try_from(seq).unwrap_or(i64::MAX)),
        SqlValue::Int(sql_millis(entry.at)),
        text(entry.kind),
        SqlValue::OptText(entry.case.map(|c| c.to_string())),
        SqlValue::OptText(entry.peer.map(str::to_owned)),
        text(entry.detail),
        SqlValue::Bytes(prev_hash.0.to_vec()),
        SqlValue::Bytes(hash.0.to_vec()),
        SqlValue::Bytes(signer.0.to_vec()),
        SqlValue::Bytes(signature.to_bytes().to_vec()),
    ];
    Ok((seq, sealed, values))
}

/// The stored `(seq, hash)` of the last audit record, from a row of [`sql::AUDIT_LAST`].
fn last_audit(row: Option<&impl StoreRow>) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
    const OP: &str = "append to the audit log";
    row.map(|r| Ok((r.int("seq").map_err(StoreError::db(OP))?, r.bytes("hash").map_err(StoreError::db(OP))?)))
        .transpose()
}

/// Appends one audit record inside the caller's `BEGIN IMMEDIATE` transaction (so
/// the previous hash read here cannot change before the insert commits).
async fn append_audit(tx: &mut SqliteConnection, key: &SigningKey, entry: &AuditEntry<'_>) -> Result<u64, StoreError> {
    let mut tail = AuditTail::default();
    let seq = tail.append(tx, key, entry).await?;
    tail.flush(tx).await?;
    Ok(seq)
}

/// Drops the journal rows of `hashes` (and empties it) in one statement per
/// [`FORGET_ROWS_MAX`], inside the caller's transaction.
async fn forget_blobs(tx: &mut SqliteConnection, hashes: &mut Vec<String>) -> Result<(), StoreError> {
    let mut rest = &hashes[..];
    for n in statement_sizes(rest.len(), FORGET_ROWS_MAX) {
        let (part, after) = rest.split_at(n);
        rest = after;
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql::forget_blobs(n)));
        for hash in part {
            q = q.bind(hash.as_str());
        }
        q.execute(&mut *tx).await.map_err(StoreError::db("forget journaled blobs"))?;
    }
    hashes.clear();
    Ok(())
}

/// Splits `n` rows into statements of power-of-two sizes up to `max` (largest
/// first), so that a multi-row statement has a handful of shapes, not one per
/// batch size: sqlx keeps each shape prepared in a bounded cache (100 statements).
fn statement_sizes(mut n: usize, max: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let size = 1usize << n.min(max).ilog2();
        n -= size;
        Some(size)
    })
}

/// Journal rows dropped by one statement at most (bound parameters stay far below
/// SQLite's limit of 32,766).
const FORGET_ROWS_MAX: usize = 64;
/// Audit records inserted by one statement at most (10 parameters each).
const AUDIT_INSERT_ROWS_MAX: usize = 32;

/// The last audit record's `(seq, hash)` as one transaction sees it: read with
/// [`sql::AUDIT_LAST`] at the transaction's first append, then carried from append
/// to append; and the records sealed but not yet inserted. Sound only inside one
/// `BEGIN IMMEDIATE` transaction, which holds SQLite's write lock, so no other
/// writer (another handle, another process) can append in between; a failed
/// transaction rolls back and its tail is dropped. A group commit appends ~5
/// records, and each statement saved is a round trip to sqlx's worker thread on the
/// custody path (issue #4): the records go in with one multi-row `INSERT` per
/// [`AUDIT_INSERT_ROWS_MAX`].
///
/// The owner must call [`AuditTail::flush`] before it commits: records still
/// pending when the tail is dropped are not written.
#[derive(Default)]
struct AuditTail {
    head: Option<Option<AuditHead>>,
    pending: Vec<Vec<SqlValue>>,
}

/// An audit record's stored `(seq, hash)`.
type AuditHead = (i64, Vec<u8>);

impl AuditTail {
    async fn append(
        &mut self,
        tx: &mut SqliteConnection,
        key: &SigningKey,
        entry: &AuditEntry<'_>,
    ) -> Result<u64, StoreError> {
        const OP: &str = "append to the audit log";
        let last = match self.head.take() {
            Some(last) => last,
            None => {
                let row = sqlx::query(sql::AUDIT_LAST).fetch_optional(&mut *tx).await.map_err(StoreError::db(OP))?;
                last_audit(row.as_ref())?
            }
        };
        let (seq, sealed, values) = seal_audit(last, key, entry)?;
        self.head = Some(Some(sealed));
        self.pending.push(values);
        if self.pending.len() >= AUDIT_INSERT_ROWS_MAX {
            self.flush(tx).await?;
        }
        Ok(seq)
    }

    /// Inserts the records appended since the last flush, in chain order.
    async fn flush(&mut self, tx: &mut SqliteConnection) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut rows = std::mem::take(&mut self.pending).into_iter();
        for n in statement_sizes(rows.len(), AUDIT_INSERT_ROWS_MAX) {
            let q = sqlx::query(sqlx::AssertSqlSafe(sql::audit_insert(n)));
            bind_values(q, rows.by_ref().take(n).flatten().collect())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db("append to the audit log"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{AssertSqlSafe, Connection};
    use tiers::harness::{AutoExperts, Harness, ModelScript, key_for};
    use tiers::{ExpertPool, ModelSpec, Store};

    const MIN: u64 = 60_000;
    const NODES: [&str; 7] = ["village", "township", "county", "city", "provincial", "national", "international"];

    /// A seven-tier run with real cores: a township ECG model that is never confident
    /// enough (so findings travel up), ECG experts at the county, imaging at the city,
    /// pathology at the provincial node. Four cases from the village, least urgent
    /// first, the second stat ECG a minute after the first.
    fn federation() -> (Harness, Vec<CaseId>) {
        let mut h = Harness::seven_tier_chain(7);
        h.configure("township", |c| {
            c.models = vec![ModelSpec {
                id: "ecg-rhythm".into(),
                version: "1.0.0".into(),
                modality: Modality::Ecg,
                tasks: vec!["ecg.rhythm".into()],
                threshold: [0.99, 0.99, 0.99],
                cases_per_hour: 600,
            }]
        });
        h.node_mut("township")
            .models
            .insert("ecg-rhythm".into(), ModelScript { label: "afib".into(), confidence: 0.6, run_ms: 2_000 });
        for (node, modality) in
            [("county", Modality::Ecg), ("city", Modality::Imaging), ("provincial", Modality::Pathology)]
        {
            h.configure(node, |c| c.experts = vec![ExpertPool { modality, on_duty: 2, service_ms: 5 * MIN }]);
            h.node_mut(node).experts =
                Some(AutoExperts { name: format!("dr.{node}"), claim_after_ms: MIN, read_ms: 2 * MIN });
        }
        let mut ids = vec![
            h.submit("village", Modality::Pathology, Urgency::Routine, "biopsy margins clear?"),
            h.submit("village", Modality::Imaging, Urgency::Urgent, "fracture of the wrist?"),
            h.submit("village", Modality::Ecg, Urgency::Stat, "chest pain, rule out STEMI"),
        ];
        h.run_for(MIN);
        ids.push(h.submit("village", Modality::Ecg, Urgency::Stat, "palpitations"));
        h.run_for(12 * 60 * MIN);
        (h, ids)
    }

    fn records(h: &Harness, node: &str) -> Vec<CaseRecord> {
        let mut records = h.node(node).store.load().expect("in-memory store");
        records.sort_by_key(|r| r.info.case_id);
        records
    }

    fn put(record: &CaseRecord) -> Change {
        Change::PutCase(std::sync::Arc::new(record.clone()))
    }

    fn db_path(dir: &tempfile::TempDir, node: &str) -> PathBuf {
        dir.path().join(node).join("data").join("store.sqlite")
    }

    async fn open(path: &Path, node: &str) -> SqliteStore {
        SqliteStore::open(path, key_for(node)).await.expect("open store")
    }

    async fn store_with(dir: &tempfile::TempDir, node: &str, records: &[CaseRecord]) -> SqliteStore {
        let store = open(&db_path(dir, node), node).await;
        for r in records {
            store.apply(&put(r)).await.expect("apply");
        }
        store
    }

    /// A plain connection to the file, as an operator or attacker with file access has.
    async fn raw(path: &Path) -> SqliteConnection {
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path)).await.expect("raw connection")
    }

    async fn count(store: &SqliteStore, table: &str) -> i64 {
        sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&store.inner.read)
            .await
            .expect("count")
            .get(0)
    }

    async fn counts(store: &SqliteStore) -> Vec<i64> {
        let mut out = Vec::new();
        for table in ["cases", "hops", "findings", "reports", "receipts", "audit"] {
            out.push(count(store, table).await);
        }
        out
    }

    #[test]
    fn multi_row_statements_come_in_power_of_two_sizes_that_add_up() {
        for (n, max, want) in [
            (0, 32, vec![]),
            (1, 32, vec![1]),
            (5, 32, vec![4, 1]),
            (32, 32, vec![32]),
            (71, 32, vec![32, 32, 4, 2, 1]),
            (130, 64, vec![64, 64, 2]),
        ] {
            assert_eq!(statement_sizes(n, max).collect::<Vec<_>>(), want, "{n} rows, at most {max}");
        }
        assert_eq!(
            sql::audit_insert(2).split(" VALUES ").nth(1).unwrap(),
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10), ($11, $12, $13, $14, $15, $16, $17, $18, $19, $20)"
        );
        assert_eq!(sql::forget_blobs(3), "DELETE FROM blob_journal WHERE hash IN ($1, $2, $3)");
    }

    /// A batch of more audit records and journal drops than one statement takes:
    /// every record lands once, in order, chained; every dropped row goes, and a
    /// blob journaled after a drop in the same batch stays.
    #[tokio::test]
    async fn a_large_batch_inserts_every_audit_record_in_order_and_drops_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("node.db"), SigningKey::from_bytes(&[7; 32])).await.unwrap();
        let blobs: Vec<(ContentHash, Arc<Vec<u8>>)> = (0..70u32)
            .map(|i| {
                let bytes = Arc::new(i.to_le_bytes().to_vec());
                (ContentHash::of(&bytes), bytes)
            })
            .collect();
        let journal: Vec<Write> =
            blobs.iter().map(|(hash, bytes)| Write::Blob { hash: *hash, bytes: bytes.clone() }).collect();
        store.commit(&journal).await.unwrap();
        assert_eq!(store.journaled_blobs(100).await.unwrap().len(), 70);

        let mut batch: Vec<Write> =
            (0..71u64).map(|i| Write::audit(Millis(i), "link.up", None, None, &format!("#{i}"))).collect();
        batch.extend(blobs[..69].iter().map(|(hash, _)| Write::ForgetBlob(*hash)));
        // Dropped, then journaled again in the same batch: the row must stay.
        batch.push(Write::ForgetBlob(blobs[0].0));
        batch.push(Write::Blob { hash: blobs[0].0, bytes: blobs[0].1.clone() });
        store.commit(&batch).await.unwrap();

        assert_eq!(store.verify_audit_chain().await.unwrap(), 71);
        let details: Vec<String> = store.audit_from(1, 100).await.unwrap().into_iter().map(|r| r.detail).collect();
        assert_eq!(details, (0..71).map(|i| format!("#{i}")).collect::<Vec<_>>());
        let mut left = store.journaled_blobs(100).await.unwrap();
        left.sort();
        let mut want = vec![blobs[0].0, blobs[69].0];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn the_federation_fixture_reports_every_case_back_to_the_village() {
        let (h, ids) = federation();
        for id in ids {
            let at_village = h.case_at("village", id).expect("case at the village");
            assert!(at_village.report.is_some(), "case {id} has no report at the village");
        }
        assert!(h.check_invariants().is_empty());
    }

    #[tokio::test]
    async fn apply_then_load_returns_the_same_records() {
        let (h, ids) = federation();
        let dir = tempfile::tempdir().unwrap();
        for node in NODES {
            let expected = records(&h, node);
            let store = store_with(&dir, node, &expected).await;
            assert_eq!(store.load().await.unwrap(), expected, "at {node}");
            for r in &expected {
                assert_eq!(store.case(&r.info.case_id).await.unwrap().as_ref(), Some(r), "at {node}");
            }
        }
        let store = open(&db_path(&dir, "village"), "village").await;
        assert_eq!(store.load().await.unwrap().len(), ids.len());
        assert_eq!(store.case(&CaseId([0xee; 16])).await.unwrap(), None);
    }

    #[tokio::test]
    async fn records_survive_close_and_reopen() {
        let (h, _) = federation();
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "county");
        let expected = records(&h, "county");
        let store = store_with(&dir, "county", &expected).await;
        let before = counts(&store).await;
        store.close().await;
        drop(store);

        let store = open(&path, "county").await;
        assert_eq!(store.load().await.unwrap(), expected);
        assert_eq!(counts(&store).await, before);
        assert_eq!(store.verify_audit_chain().await.unwrap(), before[5] as u64);
    }

    #[tokio::test]
    async fn derived_rows_match_the_envelopes() {
        let (h, _) = federation();
        let dir = tempfile::tempdir().unwrap();
        let (mut hops_seen, mut findings_seen, mut reports_seen) = (0, 0, 0);
        let (mut custody_seen, mut report_receipts_seen) = (0, 0);
        for node in NODES {
            let recs = records(&h, node);
            let store = store_with(&dir, node, &recs).await;

            let mut hops = Vec::new();
            let mut findings = Vec::new();
            let mut reports = Vec::new();
            let mut receipts = Vec::new();
            for r in &recs {
                let id = r.info.case_id.to_string();
                for (i, env) in r.trail.iter().enumerate() {
                    let v = env.open::<HopRecord>(content_type::HOP).unwrap();
                    let b = v.body;
                    hops.push((id.clone(), i as i64, v.signer.to_string(), b.from.0, b.to.0, b.reason.to_string()));
                }
                for (i, env) in r.findings.iter().enumerate() {
                    let v = env.open::<Finding>(content_type::FINDING).unwrap();
                    findings.push((id.clone(), i as i64, v.body.node.0, reader_columns(&v.body.reader).1));
                }
                if let Some(env) = &r.report {
                    let v = env.open::<Report>(content_type::REPORT).unwrap();
                    reports.push((id.clone(), env.hash().to_string(), v.body.node.0, v.body.machine_made));
                }
                if let Some(env) = &r.custody_receipt {
                    let v = env.open::<CustodyReceipt>(content_type::CUSTODY_RECEIPT).unwrap();
                    receipts.push((
                        id.clone(),
                        "custody".to_owned(),
                        v.body.receiver.0,
                        v.body.manifest_hash.to_string(),
                    ));
                }
                if let ReportDown::Acked { receipt, .. } = &r.report_down {
                    let v = receipt.open::<ReportReceipt>(content_type::REPORT_RECEIPT).unwrap();
                    receipts.push((id.clone(), "report".to_owned(), v.body.receiver.0, v.body.report_hash.to_string()));
                }
            }
            receipts.sort();
            let pool = &store.inner.read;
            let got_hops: Vec<(String, i64, String, String, String, String)> = sqlx::query_as(
                "SELECT case_id, position, signer, from_node, to_node, reason FROM hops ORDER BY case_id, position",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            let got_findings: Vec<(String, i64, String, String)> =
                sqlx::query_as("SELECT case_id, position, node, reader FROM findings ORDER BY case_id, position")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            let got_reports: Vec<(String, String, String, bool)> =
                sqlx::query_as("SELECT case_id, envelope_hash, node, machine_made FROM reports ORDER BY case_id")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            let got_receipts: Vec<(String, String, String, String)> = sqlx::query_as(
                "SELECT case_id, kind, receiver, subject_hash FROM receipts ORDER BY case_id, kind, receiver",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            assert_eq!(got_hops, hops, "hops at {node}");
            assert_eq!(got_findings, findings, "findings at {node}");
            assert_eq!(got_reports, reports, "reports at {node}");
            assert_eq!(got_receipts, receipts, "receipts at {node}");
            hops_seen += hops.len();
            findings_seen += findings.len();
            reports_seen += reports.len();
            custody_seen += receipts.iter().filter(|r| r.1 == "custody").count();
            report_receipts_seen += receipts.iter().filter(|r| r.1 == "report").count();
        }
        // The fixture exercises every table.
        assert!(hops_seen > 0 && findings_seen > 0 && reports_seen > 0);
        assert!(custody_seen > 0 && report_receipts_seen > 0);
    }

    #[tokio::test]
    async fn apply_is_idempotent() {
        let (h, _) = federation();
        let dir = tempfile::tempdir().unwrap();
        let recs = records(&h, "township");
        let store = store_with(&dir, "township", &recs).await;
        let before = counts(&store).await;
        for r in &recs {
            store.apply(&put(r)).await.unwrap();
        }
        assert_eq!(counts(&store).await, before, "a repeated change writes nothing");
        assert_eq!(store.load().await.unwrap(), recs);
    }

    #[tokio::test]
    async fn apply_follows_cases_through_their_life() {
        // Snapshots of the village's records as the run goes on stand for the stream
        // of PutCase changes: each case is upserted as its status moves.
        let mut h = Harness::seven_tier_chain(3);
        h.configure("county", |c| {
            c.experts = vec![ExpertPool { modality: Modality::Ecg, on_duty: 1, service_ms: 5 * MIN }]
        });
        h.node_mut("county").experts =
            Some(AutoExperts { name: "dr.county".into(), claim_after_ms: MIN, read_ms: 2 * MIN });
        let dir = tempfile::tempdir().unwrap();
        let village = open(&db_path(&dir, "village"), "village").await;
        let county = open(&db_path(&dir, "county"), "county").await;
        let id = h.submit("village", Modality::Ecg, Urgency::Stat, "syncope");
        for step in 0..400 {
            h.run_for(if step < 200 { 25 } else { MIN / 4 });
            for r in records(&h, "village") {
                village.apply(&put(&r)).await.unwrap();
            }
            for r in records(&h, "county") {
                county.apply(&put(&r)).await.unwrap();
            }
        }
        assert_eq!(village.load().await.unwrap(), records(&h, "village"));
        assert_eq!(county.load().await.unwrap(), records(&h, "county"));
        let kinds: Vec<String> = village.audit_tail(100).await.unwrap().into_iter().map(|a| a.kind).collect();
        assert!(kinds.contains(&"case.forwarding".to_owned()), "{kinds:?}");
        assert!(kinds.contains(&"case.forwarded".to_owned()), "{kinds:?}");
        assert_eq!(kinds.last().map(String::as_str), Some("case.reported"), "{kinds:?}");
        let county_kinds: Vec<String> = county.audit_tail(100).await.unwrap().into_iter().map(|a| a.kind).collect();
        assert!(county_kinds.contains(&"case.queued".to_owned()), "{county_kinds:?}");
        assert!(county_kinds.contains(&"case.claimed".to_owned()), "{county_kinds:?}");
        let summary = &village.summaries().await.unwrap()[0];
        assert_eq!((summary.id, summary.status.as_str()), (id, "reported"));
        assert_eq!(summary.read_at_node, Some(NodeName::from("county")));
        assert!(village.verify_audit_chain().await.unwrap() >= 3);
        assert!(county.verify_audit_chain().await.unwrap() >= 3);
    }

    #[tokio::test]
    async fn summaries_are_ordered_by_urgency_then_deadline() {
        let (h, ids) = federation();
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(&dir, "village", &records(&h, "village")).await;
        let summaries = store.summaries().await.unwrap();
        let order: Vec<CaseId> = summaries.iter().map(|s| s.id).collect();
        // Submitted routine, urgent, stat, stat (a minute later).
        assert_eq!(order, [ids[2], ids[3], ids[1], ids[0]]);
        assert!(summaries[0].deadline_at < summaries[1].deadline_at);
        let read_at: Vec<Option<&str>> =
            summaries.iter().map(|s| s.read_at_node.as_ref().map(NodeName::as_str)).collect();
        assert_eq!(read_at, [Some("county"), Some("county"), Some("city"), Some("provincial")]);
        for (s, r) in summaries.iter().zip([ids[2], ids[3], ids[1], ids[0]]) {
            let record = h.case_at("village", r).unwrap();
            assert_eq!(s.origin.as_str(), "village");
            assert_eq!((s.modality, s.urgency), (record.info.modality, record.info.urgency));
            assert_eq!(s.status, record.status.name());
            assert_eq!((s.created_at, s.updated_at), (record.info.created_at, record.updated_at));
        }
    }

    #[tokio::test]
    async fn audit_chain_verifies_and_tampering_names_the_seq() {
        let (h, _) = federation();
        let tampering = [
            ("DROP TRIGGER audit_no_update; UPDATE audit SET detail = 'nothing happened' WHERE seq = 3", 3),
            ("DROP TRIGGER audit_no_update; UPDATE audit SET at_ms = at_ms + 1 WHERE seq = 5", 5),
            ("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 4", 4),
            ("DROP TRIGGER audit_no_update; UPDATE audit SET prev_hash = zeroblob(32) WHERE seq = 2", 2),
        ];
        for (attack, bad_seq) in tampering {
            let dir = tempfile::tempdir().unwrap();
            let store = store_with(&dir, "village", &records(&h, "village")).await;
            let peer = Some("township");
            let seq = store.audit(Millis(1), "peer.rejected", None, peer, "bad signature on a hop").await.unwrap();
            assert_eq!(seq, 5);
            store.audit(Millis(2), "node.stopped", None, None, "graceful").await.unwrap();
            assert_eq!(store.verify_audit_chain().await.unwrap(), 6);

            let mut conn = raw(&db_path(&dir, "village")).await;
            sqlx::raw_sql(attack).execute(&mut conn).await.unwrap();
            match store.verify_audit_chain().await {
                Err(StoreError::AuditChainBroken { seq, reason }) => assert_eq!(seq, bad_seq, "{attack}: {reason}"),
                other => panic!("{attack}: expected a broken chain, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_chain_rewritten_under_another_key_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "county");
        let store = open(&path, "county").await;
        for i in 0..3 {
            store.audit(Millis(i), "test", None, None, "entry").await.unwrap();
        }
        store.close().await;
        // An attacker who rewrites the whole log under their own key and leaves it
        // ends with a chain that verifies by itself but is not signed by the node.
        let mut conn = raw(&path).await;
        sqlx::raw_sql("DROP TRIGGER audit_no_delete; DELETE FROM audit").execute(&mut conn).await.unwrap();
        let forged = SqliteStore::open(&path, key_for("mallory")).await.unwrap();
        for i in 0..3 {
            forged.audit(Millis(i), "test", None, None, "entry").await.unwrap();
        }
        assert_eq!(forged.verify_audit_chain().await.unwrap(), 3);
        forged.close().await;
        let store = open(&path, "county").await;
        // Opening with the node key appended a hand-over record naming mallory's key,
        // so the chain is consistent, but anyone comparing signers sees mallory.
        let tail = store.audit_tail(10).await.unwrap();
        assert_eq!(tail.last().unwrap().kind, AUDIT_KEY_CHANGED);
        assert_eq!(tail[0].signer, PublicKey(key_for("mallory").verifying_key().to_bytes()));
        // Forging a record in the middle under another key, without a hand-over, is caught.
        let mut conn = raw(&path).await;
        let fake = AuditEntry { at: Millis(9), kind: "test", case: None, peer: None, detail: "forged" };
        append_audit(&mut conn, &key_for("eve"), &fake).await.unwrap();
        match store.verify_audit_chain().await {
            Err(StoreError::AuditChainBroken { seq: 5, reason }) => {
                assert!(reason.contains("signer changed"), "{reason}")
            }
            other => panic!("expected a broken chain at seq 5, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_rotated_node_key_is_handed_over_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "city");
        let store = SqliteStore::open(&path, key_for("city-2025")).await.unwrap();
        store.audit(Millis(1), "node.started", None, None, "").await.unwrap();
        store.close().await;
        let store = SqliteStore::open(&path, key_for("city-2026")).await.unwrap();
        store.audit(Millis(2), "node.started", None, None, "").await.unwrap();
        assert_eq!(store.verify_audit_chain().await.unwrap(), 3);
        let kinds: Vec<String> = store.audit_tail(3).await.unwrap().into_iter().map(|a| a.kind).collect();
        assert_eq!(kinds, ["node.started", AUDIT_KEY_CHANGED, "node.started"]);
        store.close().await;
        // Going back to the earlier key is handed over the same way.
        let old = SqliteStore::open(&path, key_for("city-2025")).await.unwrap();
        assert_eq!(old.verify_audit_chain().await.unwrap(), 4);
    }

    #[tokio::test]
    async fn audit_update_and_delete_are_refused_by_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "county");
        let store = open(&path, "county").await;
        store.audit(Millis(1), "node.started", None, None, "").await.unwrap();
        store.audit(Millis(2), "peer.up", None, Some("city"), "").await.unwrap();
        let mut conn = raw(&path).await;
        for attack in ["UPDATE audit SET detail = 'x' WHERE seq = 1", "DELETE FROM audit WHERE seq = 2"] {
            let err = sqlx::raw_sql(attack).execute(&mut conn).await.expect_err(attack);
            assert!(err.to_string().contains("append-only"), "{attack}: {err}");
        }
        assert_eq!(store.verify_audit_chain().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn audit_tail_returns_the_last_records_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db_path(&dir, "county"), "county").await;
        let case = CaseId([7; 16]);
        for i in 1..=5u64 {
            let seq = store.audit(Millis(i * 10), "test", Some(case), Some("city"), &format!("n{i}")).await.unwrap();
            assert_eq!(seq, i);
        }
        let tail = store.audit_tail(2).await.unwrap();
        let got: Vec<(u64, Millis, &str)> = tail.iter().map(|a| (a.seq, a.at, a.detail.as_str())).collect();
        assert_eq!(got, [(4, Millis(40), "n4"), (5, Millis(50), "n5")]);
        assert_eq!((tail[0].case, tail[0].peer.as_deref()), (Some(case), Some("city")));
        assert_eq!(tail[1].prev_hash, tail[0].hash);
        let long = "é".repeat(AUDIT_DETAIL_LEN_MAX);
        store.audit(Millis(60), "test", None, None, &long).await.unwrap();
        let last = store.audit_tail(1).await.unwrap().remove(0);
        assert!(last.detail.len() <= AUDIT_DETAIL_LEN_MAX && long.starts_with(&last.detail));
        assert_eq!(store.verify_audit_chain().await.unwrap(), 6);
    }

    #[tokio::test]
    async fn concurrent_writers_keep_one_chain() {
        let (h, _) = federation();
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db_path(&dir, "township"), "township").await;
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..10 {
                    seqs.push(store.audit(Millis(t * 100 + i), "test", None, None, "").await.unwrap());
                }
                seqs
            }));
        }
        for r in records(&h, "township") {
            store.apply(&put(&r)).await.unwrap();
        }
        let mut seqs = Vec::new();
        for t in tasks {
            let mine = t.await.unwrap();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "one caller's writes commit in call order");
            seqs.extend(mine);
        }
        let total = store.verify_audit_chain().await.unwrap();
        assert_eq!(total, 80 + records(&h, "township").len() as u64);
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), 80);
    }

    #[tokio::test]
    async fn a_corrupt_case_blob_is_reported_naming_the_case() {
        let (h, ids) = federation();
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "village");
        let store = store_with(&dir, "village", &records(&h, "village")).await;
        let mut conn = raw(&path).await;
        let victim = ids[1].to_string();
        sqlx::query("UPDATE cases SET record = x'a1ff00' WHERE case_id = ?")
            .bind(&victim)
            .execute(&mut conn)
            .await
            .unwrap();
        match store.load().await {
            Err(StoreError::Corrupt { case, .. }) => assert_eq!(case, victim),
            other => panic!("expected a corrupt case, got {other:?}"),
        }
        assert!(matches!(store.case(&ids[1]).await, Err(StoreError::Corrupt { case, .. }) if case == victim));
        assert!(store.case(&ids[0]).await.unwrap().is_some(), "other cases still read");
        assert_eq!(store.summaries().await.unwrap().len(), ids.len(), "the index columns still list it");

        // A record stored under another case's id is corrupt too.
        sqlx::query("UPDATE cases SET record = (SELECT record FROM cases WHERE case_id = ?) WHERE case_id = ?")
            .bind(ids[0].to_string())
            .bind(&victim)
            .execute(&mut conn)
            .await
            .unwrap();
        match store.case(&ids[1]).await {
            Err(StoreError::Corrupt { case, reason }) => {
                assert_eq!(case, victim);
                assert!(reason.contains(&ids[0].to_string()), "{reason}");
            }
            other => panic!("expected a corrupt case, got {other:?}"),
        }
        // An index column that does not parse.
        sqlx::query("UPDATE cases SET urgency = 'whenever' WHERE case_id = ?")
            .bind(ids[0].to_string())
            .execute(&mut conn)
            .await
            .unwrap();
        assert!(matches!(store.summaries().await, Err(StoreError::Corrupt { case, .. }) if case == ids[0].to_string()));
    }

    #[tokio::test]
    async fn the_writer_runs_wal_with_full_sync_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db_path(&dir, "county"), "county").await;
        let pool = &store.inner.write.as_ref().unwrap().pool;
        let mode: String = sqlx::query("PRAGMA journal_mode").fetch_one(pool).await.unwrap().get(0);
        let sync: i64 = sqlx::query("PRAGMA synchronous").fetch_one(pool).await.unwrap().get(0);
        let fk: i64 = sqlx::query("PRAGMA foreign_keys").fetch_one(pool).await.unwrap().get(0);
        assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1), "journal_mode, synchronous=FULL, foreign_keys");
    }

    #[tokio::test]
    async fn migrations_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "county");
        let store = open(&path, "county").await;
        assert_eq!(store.schema_version().await.unwrap(), 2);
        let applied: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT version, sha256, applied_at_ms FROM schema_version")
                .fetch_all(&store.inner.read)
                .await
                .unwrap();
        assert_eq!(applied.len(), MIGRATIONS.len());
        store.audit(Millis(1), "node.started", None, None, "").await.unwrap();
        store.close().await;
        tokio::time::sleep(Duration::from_millis(5)).await;

        let store = open(&path, "county").await;
        let again: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT version, sha256, applied_at_ms FROM schema_version")
                .fetch_all(&store.inner.read)
                .await
                .unwrap();
        assert_eq!(again, applied, "reopening applies nothing");
        assert_eq!(store.verify_audit_chain().await.unwrap(), 1, "and keeps the data");
        store.close().await;

        // A database from a newer build is refused, not silently used.
        let mut conn = raw(&path).await;
        sqlx::raw_sql("INSERT INTO schema_version VALUES (999, 'future', 'x', 0)").execute(&mut conn).await.unwrap();
        assert!(matches!(SqliteStore::open(&path, key_for("county")).await, Err(StoreError::Schema(_))));
        assert!(matches!(SqliteStore::open_read_only(&path).await, Err(StoreError::Schema(_))));
        // So is one whose applied migration differs from this build's.
        sqlx::raw_sql("DELETE FROM schema_version WHERE version = 999; UPDATE schema_version SET sha256 = 'edited'")
            .execute(&mut conn)
            .await
            .unwrap();
        assert!(matches!(SqliteStore::open(&path, key_for("county")).await, Err(StoreError::Schema(_))));
    }

    #[tokio::test]
    async fn a_full_disk_refuses_new_data_and_keeps_held_cases() {
        let (h, _) = federation();
        let recs = records(&h, "county");
        assert!(recs.len() >= 2);
        let dir = tempfile::tempdir().unwrap();
        let (held, rest) = recs.split_at(recs.len() / 2);
        let store = store_with(&dir, "county", held).await;
        // Cap the file at its current size, as a full disk would.
        let writer = store.inner.write.as_ref().unwrap();
        let pages: i64 = sqlx::query("PRAGMA page_count").fetch_one(&writer.pool).await.unwrap().get(0);
        sqlx::query(AssertSqlSafe(format!("PRAGMA max_page_count = {pages}"))).execute(&writer.pool).await.unwrap();

        // A new case needs new pages: refused, with nothing half-written.
        let err = store.apply(&put(&rest[0])).await.expect_err("a capped database refuses a new case");
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
        assert!(err.to_string().contains("disk full"), "{err}");
        // The failed write cost the writer its connection; the pool opens a fresh one,
        // which a real full disk would still cap.
        let writer = store.inner.write.as_ref().unwrap();
        let pages: i64 = sqlx::query("PRAGMA page_count").fetch_one(&writer.pool).await.unwrap().get(0);
        sqlx::query(AssertSqlSafe(format!("PRAGMA max_page_count = {pages}"))).execute(&writer.pool).await.unwrap();
        let audit_before = count(&store, "audit").await;
        let err = store.audit(Millis(1), "test", None, None, &"x".repeat(4000)).await.expect_err("full");
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err:?}");
        assert_eq!(count(&store, "audit").await, audit_before);
        assert_eq!(store.case(&rest[0].info.case_id).await.unwrap(), None);
        assert_eq!(store.load().await.unwrap(), held, "held cases still load");
        for r in held {
            assert_eq!(store.case(&r.info.case_id).await.unwrap().as_ref(), Some(r));
        }
        store.verify_audit_chain().await.unwrap();

        // Once space returns, writes work again (the connection is not left poisoned).
        for r in rest {
            store.apply(&put(r)).await.expect("writes resume when the disk has room");
        }
        assert_eq!(store.load().await.unwrap(), recs);
        store.verify_audit_chain().await.unwrap();
    }

    #[tokio::test]
    async fn a_read_only_store_reads_beside_the_writer_and_refuses_writes() {
        let (h, _) = federation();
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir, "city");
        let recs = records(&h, "city");
        let (first, rest) = recs.split_at(1);
        let writer = store_with(&dir, "city", first).await;
        let reader = SqliteStore::open_read_only(&path).await.unwrap();
        assert_eq!(reader.load().await.unwrap(), first);
        for r in rest {
            writer.apply(&put(r)).await.unwrap();
        }
        assert_eq!(reader.load().await.unwrap(), recs, "the reader sees what the writer committed");
        assert_eq!(reader.summaries().await.unwrap(), writer.summaries().await.unwrap());
        assert_eq!(reader.audit_tail(100).await.unwrap(), writer.audit_tail(100).await.unwrap());
        assert_eq!(reader.verify_audit_chain().await.unwrap(), recs.len() as u64);
        assert!(matches!(reader.apply(&put(&recs[0])).await, Err(StoreError::ReadOnly { .. })));
        assert!(matches!(reader.audit(Millis(1), "x", None, None, "").await, Err(StoreError::ReadOnly { .. })));

        // With the daemon stopped (its WAL checkpointed and removed), reading still works.
        writer.close().await;
        drop(writer);
        reader.close().await;
        let reader = SqliteStore::open_read_only(&path).await.unwrap();
        assert_eq!(reader.load().await.unwrap(), recs);

        let missing = dir.path().join("nowhere.sqlite");
        assert!(matches!(SqliteStore::open_read_only(&missing).await, Err(StoreError::Io { .. })));
        assert!(!missing.exists(), "a read-only open creates nothing");
    }
}
