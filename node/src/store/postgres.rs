//! The store on PostgreSQL, for hubs that outgrow one SQLite file.
//!
//! Same tables, same statements ([`super::sql`]), same record encoding, audit hash
//! and chain rules as [`super::SqliteStore`]; one test suite runs against both
//! (`node/tests/node/store_suite.rs`). What differs is only how a write is made
//! safe: each write is one transaction that first takes `LOCK TABLE audit IN
//! EXCLUSIVE MODE`, so writers from any process append to one chain in turn
//! (readers are not blocked), and commits with `synchronous_commit = on`, so
//! [`PgStore::apply`] returns only once the server has flushed the change to disk.
//!
//! This module must never make a decision about a case, never panic on database
//! contents, and never log the store URL with its password.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use federation_proto::{CaseId, ContentHash, Millis, NodeName, PublicKey};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Row};
use tiers::{CaseRecord, Change};

use super::{
    AUDIT_KEY_CHANGED, AUDIT_TAIL_MAX, AUDIT_VERIFY_BATCH, AuditEntry, AuditRecord, CaseSummary, ChainCheck,
    StoreError, Write, bind_values, case_values, decode_audit_row, decode_case_row, decode_summary_row, derived_rows,
    describe, encode_batch, key_change_detail, last_audit, redact_url, seal_audit, sha256_of, sql, sql_millis,
    wall_clock,
};

/// Connections in the pool (reads run beside the one writer).
const CONNECTIONS_MAX: u32 = 8;
/// How long to wait for a connection (server down or pool exhausted).
const ACQUIRE_TIMEOUT_MS: u64 = 10_000;
/// Advisory lock key serialising migrations of one database ("telemed" in ASCII).
const MIGRATION_LOCK: i64 = 0x0074_656c_656d_6564;

/// One embedded schema migration (PostgreSQL dialect).
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order, matching the SQLite list version by version.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "initial", sql: include_str!("../../migrations/postgres/0001_initial.sql") },
    Migration {
        version: 2,
        name: "blob_journal",
        sql: include_str!("../../migrations/postgres/0002_blob_journal.sql"),
    },
];

/// A hub's PostgreSQL store. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The URL without its password, for messages.
    shown: String,
    pool: PgPool,
    /// `None` when opened read-only.
    write: Option<Writer>,
}

struct Writer {
    /// FIFO within this process: writes commit in the order they were called.
    order: tokio::sync::Mutex<()>,
    key: SigningKey,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.inner.shown)
            .field("writable", &self.inner.write.is_some())
            .finish_non_exhaustive()
    }
}

fn options(url: &str, read_only: bool) -> Result<PgConnectOptions, StoreError> {
    let parsed: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| StoreError::Invalid {
        what: "the store URL",
        reason: format!("{}: {e}", redact_url(url)),
    })?;
    let mut settings = vec![("synchronous_commit", "on")];
    if read_only {
        settings.push(("default_transaction_read_only", "on"));
    }
    Ok(parsed.options(settings).application_name("telemed-node"))
}

async fn connect(url: &str, read_only: bool) -> Result<PgPool, StoreError> {
    let shown = redact_url(url);
    PgPoolOptions::new()
        .max_connections(CONNECTIONS_MAX)
        .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
        .connect_with(options(url, read_only)?)
        .await
        .map_err(|source| StoreError::Database {
            op: if read_only {
                "connect to the PostgreSQL store (read-only)"
            } else {
                "connect to the PostgreSQL store"
            },
            source: sqlx::Error::Configuration(format!("{shown}: {source}").into()),
        })
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`; TLS with
    /// `?sslmode=require` or `verify-full`), applies migrations, and hands the audit
    /// chain over to `audit_key` if another key signed its last record.
    pub async fn open(url: &str, audit_key: SigningKey) -> Result<PgStore, StoreError> {
        let pool = connect(url, false).await?;
        migrate(&pool).await?;
        let writer = Writer { order: tokio::sync::Mutex::new(()), key: audit_key };
        let store = PgStore { inner: Arc::new(Inner { shown: redact_url(url), pool, write: Some(writer) }) };
        store.record_key_change().await?;
        Ok(store)
    }

    /// Connects for reading only (every transaction is read-only on the server).
    pub async fn open_read_only(url: &str) -> Result<PgStore, StoreError> {
        let pool = connect(url, true).await?;
        let store = PgStore { inner: Arc::new(Inner { shown: redact_url(url), pool, write: None }) };
        let version = store.schema_version().await?;
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if version > known {
            return Err(StoreError::Schema(format!(
                "the database is at schema version {version}, newer than this build's {known}"
            )));
        }
        Ok(store)
    }

    /// The URL this store connects to, without its password.
    pub fn url(&self) -> &str {
        &self.inner.shown
    }

    /// The highest migration applied to the database.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('schema_version')::text")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(StoreError::db("read the schema version"))?;
        if exists.is_none() {
            return Err(StoreError::Schema(format!("{} holds no telemed store (no schema_version)", self.url())));
        }
        sqlx::query_scalar::<_, i64>(sql::SCHEMA_VERSION)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(StoreError::db("read the schema version"))
    }

    /// Closes the pool. Everything `apply` and `audit` returned from is durable.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    fn writer(&self, op: &'static str) -> Result<&Writer, StoreError> {
        self.inner.write.as_ref().ok_or(StoreError::ReadOnly { op })
    }

    /// Takes the write order (FIFO in this process) and a connection, and begins a
    /// transaction holding the audit table's lock (writers of every process append
    /// in turn). Dropping the transaction without commit rolls it back.
    async fn begin(
        &self,
        op: &'static str,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, &SigningKey, PoolConnection<Postgres>), StoreError> {
        let writer = self.writer(op)?;
        let order = writer.order.lock().await;
        let conn = self.inner.pool.acquire().await.map_err(StoreError::db(op))?;
        Ok((order, &writer.key, conn))
    }

    /// Makes `change` durable (committed and flushed by the server) before returning.
    /// Applying a change equal to what is stored writes nothing.
    pub async fn apply(&self, change: &Change) -> Result<(), StoreError> {
        match change {
            Change::PutCase(record) => self.put_case(record).await,
        }
    }

    async fn put_case(&self, record: &CaseRecord) -> Result<(), StoreError> {
        self.commit(&[Write::Change(Change::PutCase(Arc::new(record.clone())))]).await
    }

    /// See [`super::Store::commit`]: one transaction holding the audit lock, one flush.
    pub async fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        const OP: &str = "commit a batch";
        if writes.is_empty() {
            return Ok(());
        }
        let encoded = encode_batch(writes)?;
        let (_order, key, mut conn) = self.begin(OP).await?;
        let mut tx = locked(&mut conn, OP).await?;
        for (write, bytes) in writes.iter().zip(&encoded) {
            match (write, bytes) {
                (Write::Change(Change::PutCase(record)), Some(bytes)) => {
                    put_case_tx(&mut tx, key, record, bytes).await?
                }
                (Write::Blob { hash, bytes }, _) => {
                    sqlx::query(sql::JOURNAL_BLOB)
                        .bind(hash.to_string())
                        .bind(&bytes[..])
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::db("journal a blob"))?;
                }
                (Write::ForgetBlob(hash), _) => {
                    sqlx::query(sqlx::AssertSqlSafe(sql::forget_blobs(1)))
                        .bind(hash.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::db("forget a journaled blob"))?;
                }
                _ => {
                    let entry = write.entry().expect("an audit write");
                    append_audit(&mut tx, key, &entry).await?;
                }
            }
        }
        tx.commit().await.map_err(StoreError::db(OP))
    }

    /// Every stored case record, for `Node::restore`.
    pub async fn load(&self) -> Result<Vec<CaseRecord>, StoreError> {
        let rows =
            sqlx::query(sql::CASES).fetch_all(&self.inner.pool).await.map_err(StoreError::db("load the cases"))?;
        rows.iter().map(decode_case_row).collect()
    }

    /// See [`super::Store::journaled_blobs`].
    pub async fn journaled_blobs(&self, limit: u32) -> Result<Vec<ContentHash>, StoreError> {
        const OP: &str = "list the blob journal";
        let rows = sqlx::query(sql::JOURNALED_BLOBS)
            .bind(i64::from(limit))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(StoreError::db(OP))?;
        rows.iter().map(|r| super::journal_hash(r.try_get(0).map_err(StoreError::db(OP))?)).collect()
    }

    /// See [`super::Store::journaled_blob`].
    pub async fn journaled_blob(&self, hash: &ContentHash) -> Result<Option<Vec<u8>>, StoreError> {
        const OP: &str = "read a journaled blob";
        let row = sqlx::query(sql::JOURNALED_BLOB)
            .bind(hash.to_string())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::db(OP))?;
        row.map(|r| r.try_get::<Vec<u8>, _>(0).map_err(StoreError::db(OP))).transpose()
    }

    /// One case's record, if stored.
    pub async fn case(&self, id: &CaseId) -> Result<Option<CaseRecord>, StoreError> {
        let row = sqlx::query(sql::CASE_RECORD)
            .bind(id.to_string())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::db("read a case"))?;
        row.as_ref().map(decode_case_row).transpose()
    }

    /// Every case, most urgent first, then by deadline (earliest first).
    pub async fn summaries(&self) -> Result<Vec<CaseSummary>, StoreError> {
        let rows =
            sqlx::query(sql::SUMMARIES).fetch_all(&self.inner.pool).await.map_err(StoreError::db("list the cases"))?;
        rows.iter().map(decode_summary_row).collect()
    }

    /// Appends one audit record and returns its seq.
    pub async fn audit(
        &self,
        at: Millis,
        kind: &str,
        case: Option<CaseId>,
        peer: Option<&str>,
        detail: &str,
    ) -> Result<u64, StoreError> {
        const OP: &str = "append to the audit log";
        let (_order, key, mut conn) = self.begin(OP).await?;
        let mut tx = locked(&mut conn, OP).await?;
        let seq = append_audit(&mut tx, key, &AuditEntry { at, kind, case, peer, detail }).await?;
        tx.commit().await.map_err(StoreError::db(OP))?;
        Ok(seq)
    }

    /// The last `n` audit records (at most [`AUDIT_TAIL_MAX`]), oldest first.
    pub async fn audit_tail(&self, n: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(sql::AUDIT_TAIL)
            .bind(i64::from(n.min(AUDIT_TAIL_MAX)))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(StoreError::db("read the audit log"))?;
        rows.iter().map(decode_audit_row).collect()
    }

    /// Audit records with seq ≥ `from`, oldest first, at most `limit`.
    pub async fn audit_from(&self, from: u64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(sql::AUDIT_FROM)
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit.min(AUDIT_TAIL_MAX)))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(StoreError::db("read the audit log"))?;
        rows.iter().map(decode_audit_row).collect()
    }

    /// Verifies the whole audit chain exactly as [`super::SqliteStore::verify_audit_chain`].
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let mut chain = ChainCheck::new();
        loop {
            let rows = sqlx::query(sql::AUDIT_FROM)
                .bind(chain.next_seq())
                .bind(AUDIT_VERIFY_BATCH)
                .fetch_all(&self.inner.pool)
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

    async fn record_key_change(&self) -> Result<(), StoreError> {
        const OP: &str = "check the audit key";
        let (_order, key, mut conn) = self.begin(OP).await?;
        let mut tx = locked(&mut conn, OP).await?;
        {
            let own = PublicKey(key.verifying_key().to_bytes());
            let Some(last) = sqlx::query(sql::AUDIT_LAST).fetch_optional(&mut *tx).await.map_err(StoreError::db(OP))?
            else {
                return Ok(()); // an empty log: nothing to hand over
            };
            let seq: i64 = last.try_get("seq").map_err(StoreError::db(OP))?;
            let signer: Vec<u8> = last.try_get("signer").map_err(StoreError::db(OP))?;
            if let Some(detail) = key_change_detail(&signer, own, seq)? {
                let entry =
                    AuditEntry { at: wall_clock(), kind: AUDIT_KEY_CHANGED, case: None, peer: None, detail: &detail };
                append_audit(&mut tx, key, &entry).await?;
            }
        }
        tx.commit().await.map_err(StoreError::db(OP))
    }
}

/// Upserts a case, indexes its new envelopes and audits it, inside the caller's
/// locked transaction. A record equal byte for byte to the stored one writes nothing.
async fn put_case_tx(
    tx: &mut PgConnection,
    key: &SigningKey,
    record: &CaseRecord,
    bytes: &[u8],
) -> Result<(), StoreError> {
    const OP: &str = "store a case";
    let id = record.info.case_id.to_string();
    let stored = sqlx::query(sql::CASE_RECORD).bind(&id).fetch_optional(&mut *tx).await.map_err(StoreError::db(OP))?;
    if let Some(row) = stored
        && row.try_get::<Vec<u8>, _>("record").is_ok_and(|old| old == bytes)
    {
        return Ok(()); // already stored, byte for byte
    }
    bind_values(sqlx::query(sql::CASE_UPSERT), case_values(record, &id, bytes))
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(OP))?;
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
    append_audit(tx, key, &entry).await?;
    Ok(())
}

/// Begins a transaction on `conn` holding `LOCK TABLE audit IN EXCLUSIVE MODE`.
async fn locked<'c>(
    conn: &'c mut PoolConnection<Postgres>,
    op: &'static str,
) -> Result<sqlx::Transaction<'c, Postgres>, StoreError> {
    let mut tx = conn.begin().await.map_err(StoreError::db(op))?;
    sqlx::query("LOCK TABLE audit IN EXCLUSIVE MODE").execute(&mut *tx).await.map_err(StoreError::db(op))?;
    Ok(tx)
}

async fn append_audit(tx: &mut PgConnection, key: &SigningKey, entry: &AuditEntry<'_>) -> Result<u64, StoreError> {
    const OP: &str = "append to the audit log";
    let last = sqlx::query(sql::AUDIT_LAST).fetch_optional(&mut *tx).await.map_err(StoreError::db(OP))?;
    let (seq, _, values) = seal_audit(last_audit(last.as_ref())?, key, entry)?;
    bind_values(sqlx::query(sql::AUDIT_INSERT), values).execute(&mut *tx).await.map_err(StoreError::db(OP))?;
    Ok(seq)
}

/// Applies every embedded migration the database has not seen, in one transaction
/// holding an advisory lock (two hubs starting at once migrate once), recording
/// each in `schema_version`.
async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    const OP: &str = "migrate the schema";
    let mut conn = pool.acquire().await.map_err(StoreError::db(OP))?;
    let mut tx = conn.begin().await.map_err(StoreError::db(OP))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(OP))?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version       BIGINT NOT NULL PRIMARY KEY,
             name          TEXT   NOT NULL,
             sha256        TEXT   NOT NULL,
             applied_at_ms BIGINT NOT NULL
         )",
    )
    .execute(&mut *tx)
    .await
    .map_err(StoreError::db(OP))?;
    for m in MIGRATIONS {
        let applied: Option<String> = sqlx::query_scalar(sql::MIGRATION_SHA)
            .bind(m.version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(OP))?;
        let sha = sha256_of(m.sql);
        if let Some(stored) = applied {
            if stored != sha {
                return Err(StoreError::Schema(format!(
                    "migration {} ({}) applied to this database differs from this build's",
                    m.version, m.name
                )));
            }
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
        tracing::info!(version = m.version, name = m.name, "applied store migration (PostgreSQL)");
    }
    let newest: i64 = sqlx::query_scalar(sql::SCHEMA_VERSION).fetch_one(&mut *tx).await.map_err(StoreError::db(OP))?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if newest > known {
        return Err(StoreError::Schema(format!(
            "the database is at schema version {newest}, newer than this build's {known}"
        )));
    }
    tx.commit().await.map_err(StoreError::db(OP))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn store_urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("postgres://hub:s3cret@db.example:5432/telemed"),
            "postgres://hub:***@db.example:5432/telemed"
        );
        assert_eq!(redact_url("postgres://hub@127.0.0.1/telemed"), "postgres://hub@127.0.0.1/telemed");
        assert_eq!(redact_url("postgres://h:p@host"), "postgres://h:***@host");
    }
}
