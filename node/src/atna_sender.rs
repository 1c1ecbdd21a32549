//! Live ATNA export: the daemon's task that sends every committed audit record to an
//! audit record repository as a DICOM PS3.15 A.5 message over syslog (`[audit.syslog]`
//! in `node.toml`), over TLS (RFC 5425, mutual TLS, as IHE ATNA requires) or UDP
//! (RFC 5426).
//!
//! The audit log in the store is the source of truth; this task only follows it. The
//! daemon wakes it after each group commit through a bounded channel of capacity 1
//! (`try_send`: a wake already queued covers the next commit too), so the core never
//! waits for it. The task reads the records after its cursor from the store, sends
//! them, and persists the cursor (the last delivered seq) atomically in
//! `<data_dir>/audit-syslog.cursor`; after a restart or an outage it resends from
//! there, so delivery is at least once (a repository may see a record twice; the
//! seq and hash in each message's ParticipantObjectDetail identify it).
//!
//! RFC 5425 has no acknowledgements, so "delivered" is as much as TCP can tell: a
//! record counts as delivered once it was written on a connection that stayed open
//! for `confirm_ms` afterwards (the repository sends nothing, so any byte, alert or
//! EOF it sends means the connection is over). When a connection ends, every record
//! not yet confirmed is sent again on the next one. Over UDP a record counts as
//! delivered once its datagram left (UDP can lose it; the store still has it).
//!
//! Limits: a batch of at most [`BATCH_MAX`] records per store read, reconnects
//! backing off from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], at most [`UNCONFIRMED_MAX`]
//! records in flight. This module must never write to the store, block the core, or
//! add anything about patients to a message (it sends what `atna.rs` formats).

use crate::atna::{self, AtnaError};
use crate::store::{AuditRecord, Store};
use federation_proto::NodeName;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Records read from the store and sent per round.
pub const BATCH_MAX: u32 = 256;
/// Records sent but not yet confirmed, at most (the sender waits for confirmations).
pub const UNCONFIRMED_MAX: usize = 4_096;
/// First wait before reconnecting to an unreachable repository.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The store is read this often even without a wake (records written by another
/// process, a missed wake).
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A "behind" log line at most this often while the repository cannot be reached.
pub const BEHIND_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// The cursor file in the data directory.
pub const CURSOR_FILE: &str = "audit-syslog.cursor";

/// `[audit]` in `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Live export of the audit log to an ATNA audit record repository.
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
}

/// How audit messages travel to the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    /// RFC 5425 syslog over TLS with mutual authentication (what IHE ATNA requires).
    Tls,
    /// RFC 5426 syslog over UDP: unauthenticated, unencrypted, may lose messages.
    Udp,
}

/// `[audit.syslog]`: where and how the node sends its audit messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    pub transport: SyslogTransport,
    /// The repository, `host:port` (`TELEMED_AUDIT_SYSLOG_ADDRESS` overrides it).
    pub address: String,
    /// The CA that issued the repository's certificate (PEM); required for TLS.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name the repository's certificate must carry, if not the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Syslog facility, 0–23 (default 10, security/authorization).
    #[serde(default = "default_facility")]
    pub facility: u8,
    /// How long a TLS connection must stay open after a write before the records
    /// written count as delivered, in milliseconds.
    #[serde(default = "default_confirm_ms")]
    pub confirm_ms: u64,
}

fn default_facility() -> u8 {
    atna::FACILITY_DEFAULT
}

fn default_confirm_ms() -> u64 {
    2_000
}

impl SyslogConfig {
    /// What the types cannot check.
    pub fn check(&self) -> Result<(), String> {
        if self.facility > 23 {
            return Err(format!("[audit.syslog] facility = {}: syslog facilities are 0-23", self.facility));
        }
        if self.transport == SyslogTransport::Tls && self.ca.is_none() {
            return Err("[audit.syslog] transport = \"tls\" needs `ca`, the repository's CA certificate (PEM)".into());
        }
        if !self.address.contains(':') {
            return Err(format!("[audit.syslog] address = \"{}\": expected host:port", self.address));
        }
        if self.confirm_ms > 600_000 {
            return Err("[audit.syslog] confirm_ms: at most 600000".into());
        }
        Ok(())
    }
}

/// Counters the metrics endpoint shows.
#[derive(Debug, Default)]
pub struct SenderMetrics {
    /// Records confirmed delivered since start.
    pub sent: AtomicU64,
    /// Committed records not yet confirmed delivered (as last measured).
    pub behind: AtomicU64,
    /// Connections to the repository that failed or ended.
    pub connection_failures: AtomicU64,
}

/// The last delivered seq, as persisted (0: none yet).
pub fn read_cursor(data_dir: &Path) -> Result<u64, String> {
    let path = data_dir.join(CURSOR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Persists the cursor atomically: a temporary file, fsync, rename, fsync of the
/// directory.
pub fn write_cursor(data_dir: &Path, seq: u64) -> std::io::Result<()> {
    let tmp = data_dir.join(format!("{CURSOR_FILE}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{seq}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, data_dir.join(CURSOR_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// What the sender needs to run.
pub struct SenderParts {
    pub config: SyslogConfig,
    pub store: Store,
    pub node: NodeName,
    pub data_dir: PathBuf,
    /// The node's certificate chain and key (the TLS client certificate).
    pub creds: certs::keys::NodeCredentials,
    pub metrics: Arc<SenderMetrics>,
}

/// Starts the sender: returns the wake channel for the daemon (send `()` after each
/// commit with `try_send`; never wait on it) and the task.
pub fn spawn(parts: SenderParts) -> Result<(mpsc::Sender<()>, tokio::task::JoinHandle<()>), String> {
    parts.config.check()?;
    let cursor = read_cursor(&parts.data_dir)?;
    let tls = match parts.config.transport {
        SyslogTransport::Tls => {
            let ca_path = parts.config.ca.as_ref().expect("checked");
            let ca = std::fs::read_to_string(ca_path)
                .map_err(|e| format!("[audit.syslog] ca {}: {e}", ca_path.display()))?;
            Some(
                atna::tls_client_config(&ca, parts.creds.chain.clone(), parts.creds.key.clone_key())
                    .map_err(|e| e.to_string())?,
            )
        }
        SyslogTransport::Udp => None,
    };
    let (wake_tx, wake_rx) = mpsc::channel(1);
    let sender =
        Sender { parts, tls, wake: wake_rx, delivered: cursor, unconfirmed: VecDeque::new(), last_behind_log: None };
    tracing::info!(resume_after = cursor, "ATNA audit export starting");
    Ok((wake_tx, tokio::spawn(sender.run())))
}

/// An open connection to the repository.
enum Conn {
    Tls {
        write: tokio::io::WriteHalf<atna::TlsStream>,
        /// Fires when the repository sent anything, closed, or failed.
        closed: tokio::sync::oneshot::Receiver<String>,
        reader: tokio::task::JoinHandle<()>,
    },
    Udp(atna::SyslogUdp),
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Conn::Tls { reader, .. } = self {
            reader.abort();
        }
    }
}

struct Sender {
    parts: SenderParts,
    tls: Option<Arc<rustls::ClientConfig>>,
    wake: mpsc::Receiver<()>,
    /// The last seq confirmed delivered (and persisted).
    delivered: u64,
    /// Sent on the current connection, not yet confirmed: (seq, when written).
    unconfirmed: VecDeque<(u64, Instant)>,
    last_behind_log: Option<Instant>,
}

impl Sender {
    async fn run(mut self) {
        // A cursor beyond the log means the store was replaced under this data
        // directory: its records were never sent, so start from its beginning.
        if let Ok(tail) = self.parts.store.audit_tail(1).await {
            let head = tail.last().map_or(0, |r| r.seq);
            if self.delivered > head {
                tracing::warn!(
                    cursor = self.delivered,
                    head,
                    "ATNA export cursor is beyond the audit log (a new store?); sending the log from its start"
                );
                self.delivered = 0;
            }
        }
        self.update_behind().await;
        let mut backoff = BACKOFF_MIN;
        let mut down_since: Option<Instant> = None;
        loop {
            let conn = match self.connect().await {
                Ok(conn) => conn,
                Err(e) => {
                    self.parts.metrics.connection_failures.fetch_add(1, Ordering::Relaxed);
                    let since = *down_since.get_or_insert_with(Instant::now);
                    self.report_behind(&e.to_string(), since).await;
                    self.idle(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            if let Some(since) = down_since.take() {
                tracing::info!(
                    address = %self.parts.config.address,
                    down_s = since.elapsed().as_secs(),
                    resume_after = self.delivered,
                    "ATNA audit repository reachable again, resending from the last delivered record"
                );
                self.last_behind_log = None;
            }
            let (before, started) = (self.delivered, Instant::now());
            let why = self.serve(conn).await;
            // Everything not confirmed on that connection goes again on the next.
            self.unconfirmed.clear();
            self.parts.metrics.connection_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                address = %self.parts.config.address,
                resume_after = self.delivered,
                "ATNA audit repository connection ended ({why}); unconfirmed records will be sent again"
            );
            down_since = Some(Instant::now());
            // A connection that delivered nothing (e.g. a repository that refuses our
            // certificate after the handshake) counts as a failed attempt: back off.
            if self.delivered > before || started.elapsed() >= BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            self.idle(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<Conn, AtnaError> {
        let addr = &self.parts.config.address;
        match &self.tls {
            Some(tls) => {
                let stream = atna::connect_tls(addr, self.parts.config.server_name.as_deref(), tls.clone()).await?;
                let (mut read, write) = tokio::io::split(stream);
                let (tx, closed) = tokio::sync::oneshot::channel();
                let reader = tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = [0u8; 512];
                    let why = match read.read(&mut buf).await {
                        Ok(0) => "closed by the repository".to_owned(),
                        Ok(_) => "the repository sent data (syslog receivers send none)".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    let _ = tx.send(why);
                });
                Ok(Conn::Tls { write, closed, reader })
            }
            None => {
                let sock: std::net::SocketAddr = tokio::net::lookup_host(addr.as_str())
                    .await
                    .map_err(|source| AtnaError::Connect { addr: addr.clone(), source })?
                    .next()
                    .ok_or_else(|| AtnaError::TlsSetup(format!("{addr}: no address")))?;
                Ok(Conn::Udp(atna::SyslogUdp::new(sock)?))
            }
        }
    }

    /// Sends on one connection until it fails; returns why it ended.
    async fn serve(&mut self, mut conn: Conn) -> String {
        let confirm = Duration::from_millis(self.parts.config.confirm_ms);
        // The next seq to send on this connection.
        let mut next = self.delivered + 1;
        loop {
            if let Conn::Tls { closed, .. } = &mut conn
                && let Ok(why) = closed.try_recv()
            {
                return why;
            }
            self.confirm_older_than(confirm).await;
            let room = UNCONFIRMED_MAX.saturating_sub(self.unconfirmed.len()).min(BATCH_MAX as usize) as u32;
            let batch = if room == 0 {
                Vec::new()
            } else {
                match self.parts.store.audit_from(next, room).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::warn!("ATNA export: reading the audit log: {e}");
                        Vec::new()
                    }
                }
            };
            for record in &batch {
                if let Err(e) = self.send(&mut conn, record).await {
                    return e.to_string();
                }
                next = record.seq + 1;
            }
            if matches!(conn, Conn::Udp(..)) {
                // A datagram that left is as delivered as UDP can tell.
                self.confirm_older_than(Duration::ZERO).await;
            }
            if batch.len() == room as usize && room > 0 {
                continue; // more may be waiting
            }
            self.update_behind().await;
            // Wait for a commit, a confirmation due, the poll interval, or the end.
            let wait = match self.unconfirmed.front() {
                Some((_, at)) => {
                    (*at + confirm).saturating_duration_since(Instant::now()).max(Duration::from_millis(10))
                }
                None => POLL_INTERVAL,
            };
            match &mut conn {
                Conn::Tls { closed, .. } => {
                    tokio::select! {
                        why = closed => return why.unwrap_or_else(|_| "reader stopped".into()),
                        _ = self.wake.recv() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Conn::Udp(..) => {
                    tokio::select! {
                        _ = self.wake.recv() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn send(&mut self, conn: &mut Conn, record: &AuditRecord) -> Result<(), AtnaError> {
        let msg = atna::syslog_message_as(record, &self.parts.node, self.parts.config.facility);
        match conn {
            Conn::Tls { write, .. } => atna::write_frame(write, &self.parts.config.address, &msg).await?,
            Conn::Udp(udp) => udp.send_bytes(&msg).await?,
        }
        self.unconfirmed.push_back((record.seq, Instant::now()));
        Ok(())
    }

    /// Confirms records written at least `age` ago on a connection still open, and
    /// persists the new cursor.
    async fn confirm_older_than(&mut self, age: Duration) {
        let mut last = None;
        while let Some(&(seq, at)) = self.unconfirmed.front() {
            if at.elapsed() < age {
                break;
            }
            self.unconfirmed.pop_front();
            last = Some(seq);
        }
        let Some(seq) = last else { return };
        let confirmed = seq.saturating_sub(self.delivered);
        self.delivered = seq;
        self.parts.metrics.sent.fetch_add(confirmed, Ordering::Relaxed);
        let dir = self.parts.data_dir.clone();
        match tokio::task::spawn_blocking(move || write_cursor(&dir, seq)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("ATNA export: cannot persist the cursor (records may be sent twice): {e}"),
            Err(e) => tracing::warn!("ATNA export: cursor task failed: {e}"),
        }
    }

    /// Measures how many committed records are not yet confirmed delivered.
    async fn update_behind(&self) -> u64 {
        let head = match self.parts.store.audit_tail(1).await {
            Ok(tail) => tail.last().map_or(0, |r| r.seq),
            Err(_) => return self.parts.metrics.behind.load(Ordering::Relaxed),
        };
        let behind = head.saturating_sub(self.delivered);
        self.parts.metrics.behind.store(behind, Ordering::Relaxed);
        behind
    }

    /// Logs (at most every [`BEHIND_LOG_INTERVAL`]) that the repository cannot be
    /// reached and how far behind the export is.
    async fn report_behind(&mut self, error: &str, since: Instant) {
        let behind = self.update_behind().await;
        if self.last_behind_log.is_some_and(|t| t.elapsed() < BEHIND_LOG_INTERVAL) {
            return;
        }
        self.last_behind_log = Some(Instant::now());
        tracing::warn!(
            address = %self.parts.config.address,
            behind,
            down_s = since.elapsed().as_secs(),
            "ATNA audit export behind: {behind} audit records not delivered; {error}; resending from seq {} when it is back",
            self.delivered + 1
        );
    }

    /// Waits `d`, draining wakes meanwhile (the records stay in the store).
    async fn idle(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                w = self.wake.recv() => if w.is_none() { tokio::time::sleep_until(until).await; return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_survives_a_rewrite_and_a_missing_file_means_none_sent() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), 0);
        write_cursor(dir.path(), 41).unwrap();
        write_cursor(dir.path(), 42).unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), 42);
        std::fs::write(dir.path().join(CURSOR_FILE), "forty-two").unwrap();
        assert!(read_cursor(dir.path()).unwrap_err().contains(CURSOR_FILE));
    }

    #[test]
    fn tls_without_a_ca_and_bad_facilities_are_refused() {
        let mut c = SyslogConfig {
            transport: SyslogTransport::Tls,
            address: "audit.example:6514".into(),
            ca: None,
            server_name: None,
            facility: 10,
            confirm_ms: 2_000,
        };
        assert!(c.check().unwrap_err().contains("needs `ca`"));
        c.ca = Some("ca.pem".into());
        c.check().unwrap();
        c.facility = 24;
        assert!(c.check().unwrap_err().contains("0-23"));
        c.facility = 4;
        c.address = "audit.example".into();
        assert!(c.check().unwrap_err().contains("host:port"));
    }
}
