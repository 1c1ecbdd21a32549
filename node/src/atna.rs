//! The audit log as IHE ATNA audit messages (issue #11): each hash-chained audit
//! record as a DICOM PS3.15 Annex A.5 audit message (the XML derived from RFC 3881),
//! framed for syslog (RFC 5424, IHE's `IHE+RFC-3881` MSGID) and sent to an audit
//! record repository over TLS (RFC 5425: octet-counted frames, TLS 1.2+, the
//! repository's certificate checked against a configured CA, the node's own
//! certificate presented as the client certificate: IHE ATNA's secure node) or over
//! UDP (RFC 5426), or written one message per line by `telemed-node audit export
//! --format atna`. The daemon's live sender (`atna_sender.rs`) uses the same parts.
//!
//! Vocabulary: EventID from DICOM's audit events (CID 400: 110110 Patient Record for
//! case and report events, 110114 User Authentication for link and peer events,
//! 110100 Application Activity otherwise), the same mapping as the FHIR AuditEvent
//! export (`fhir.rs`); the node is the audit source (type 4, application server);
//! the case is a participant object (type 2 system object, role 3 report, ID type
//! 110180 Study Instance UID is not used: cases have their own ID scheme, so the
//! ID type is the node's code `telemed-case`); the hash chain (seq, hash, previous
//! hash, signer, signature) goes in ParticipantObjectDetail values (base64).
//!
//! Audit records carry case IDs and node names, never patient identifiers; this
//! module must never add any. It only formats and sends; the store is the record.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use federation_proto::NodeName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::store::AuditRecord;

/// The syslog facility audit messages go out with unless configured: 10
/// (security/authorization messages, `authpriv`).
pub const FACILITY_DEFAULT: u8 = 10;
/// The severity of every audit message: 5 (notice).
const SEVERITY: u8 = 5;
/// The largest syslog message sent over TLS (RFC 5425 asks receivers to take at
/// least 2 048 octets and recommends 8 192; an audit record's detail is bounded, so
/// real messages stay near 1–2 KiB).
pub const TLS_MESSAGE_BYTES_MAX: usize = 65_000;
/// How long a TCP connect plus TLS handshake with the repository may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one frame may take to be written to the repository.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The MSGID IHE ITI TF-2 (ITI-20) gives DICOM/RFC 3881 audit messages.
pub const MSGID: &str = "IHE+RFC-3881";
/// Largest syslog message sent over UDP (RFC 5426 says 480 octets must be accepted,
/// and that larger messages should fit the path MTU; 65 000 fits one datagram on
/// loopback and most audit repositories accept it).
pub const UDP_MESSAGE_BYTES_MAX: usize = 65_000;

/// Escapes text for an XML attribute value.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 forbids most control characters, even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A coded value in the A.5 form: `csd-code`, `codeSystemName`, `originalText`.
fn coded(element: &str, code: &str, system: &str, meaning: &str) -> String {
    format!(r#"<{element} csd-code="{}" codeSystemName="{}" originalText="{}"/>"#, esc(code), esc(system), esc(meaning))
}

/// One audit record as a DICOM PS3.15 A.5 `AuditMessage` (one line, no declaration).
pub fn audit_message(record: &AuditRecord, node: &NodeName) -> String {
    let kind = record.kind.as_str();
    let crate::fhir::AuditClass { code: event_code, meaning: event_meaning, action, refused } =
        crate::fhir::AuditClass::of(kind);
    let outcome = if refused { "4" } else { "0" };
    let node = esc(node.as_str());
    let mut xml = String::with_capacity(1024);
    xml.push_str("<AuditMessage>");
    xml.push_str(&format!(
        r#"<EventIdentification EventActionCode="{action}" EventDateTime="{}" EventOutcomeIndicator="{outcome}">"#,
        crate::fhir::instant(record.at)
    ));
    xml.push_str(&coded("EventID", event_code, "DCM", event_meaning));
    xml.push_str(&coded("EventTypeCode", kind, "telemed-audit-kind", kind));
    if !record.detail.is_empty() {
        xml.push_str(&format!("<EventOutcomeDescription>{}</EventOutcomeDescription>", esc(&record.detail)));
    }
    xml.push_str("</EventIdentification>");
    xml.push_str(&format!(r#"<ActiveParticipant UserID="{node}" UserIsRequestor="false">"#));
    xml.push_str(&coded("RoleIDCode", "110153", "DCM", "Source Role ID"));
    xml.push_str("</ActiveParticipant>");
    if let Some(peer) = &record.peer {
        xml.push_str(&format!(r#"<ActiveParticipant UserID="{}" UserIsRequestor="false">"#, esc(peer)));
        xml.push_str(&coded("RoleIDCode", "110152", "DCM", "Destination Role ID"));
        xml.push_str("</ActiveParticipant>");
    }
    xml.push_str(&format!(r#"<AuditSourceIdentification AuditSourceID="{node}">"#));
    xml.push_str(&coded("AuditSourceTypeCode", "4", "DCM", "Application Server"));
    xml.push_str("</AuditSourceIdentification>");
    let detail = |name: &str, bytes: &[u8]| {
        format!(r#"<ParticipantObjectDetail type="{name}" value="{}"/>"#, crate::fhir::b64(bytes))
    };
    let chain = [
        detail("seq", record.seq.to_string().as_bytes()),
        detail("hash", &record.hash.0),
        detail("prev_hash", &record.prev_hash.0),
        detail("signer", &record.signer.0),
        detail("signature", &record.signature),
    ]
    .concat();
    if let Some(case) = record.case {
        xml.push_str(&format!(
            r#"<ParticipantObjectIdentification ParticipantObjectID="{case}" ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">"#
        ));
        xml.push_str(&coded("ParticipantObjectIDTypeCode", "telemed-case", "telemed", "Case ID"));
        // The A.5.1 schema requires a name (or a query); a case's name is its kind of
        // object, never anything about the patient.
        xml.push_str("<ParticipantObjectName>telemed case</ParticipantObjectName>");
        xml.push_str(&chain);
        xml.push_str("</ParticipantObjectIdentification>");
    } else {
        xml.push_str(&format!(
            r#"<ParticipantObjectIdentification ParticipantObjectID="{}" ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="13">"#,
            record.seq
        ));
        xml.push_str(&coded("ParticipantObjectIDTypeCode", "telemed-audit-seq", "telemed", "Audit record"));
        xml.push_str("<ParticipantObjectName>telemed audit record</ParticipantObjectName>");
        xml.push_str(&chain);
        xml.push_str("</ParticipantObjectIdentification>");
    }
    xml.push_str("</AuditMessage>");
    xml
}

/// An audit message as one RFC 5424 syslog message: `<85>1 TIMESTAMP HOST
/// telemed-node - IHE+RFC-3881 - BOM<?xml ...?><AuditMessage>...`.
pub fn syslog_message(record: &AuditRecord, node: &NodeName) -> Vec<u8> {
    syslog_message_as(record, node, FACILITY_DEFAULT)
}

/// [`syslog_message`] with another syslog facility (0–23; larger values are clamped).
pub fn syslog_message_as(record: &AuditRecord, node: &NodeName, facility: u8) -> Vec<u8> {
    let pri = u16::from(facility.min(23)) * 8 + u16::from(SEVERITY);
    // HOSTNAME is PRINTUSASCII, at most 255 characters: a node name is.
    let host: String = node.as_str().chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    let header = format!("<{pri}>1 {} {host} telemed-node - {MSGID} - ", crate::fhir::instant(record.at));
    let mut out = header.into_bytes();
    out.extend_from_slice(b"\xEF\xBB\xBF"); // the UTF-8 BOM RFC 5424 asks for before UTF-8 text
    out.extend_from_slice(br#"<?xml version="1.0" encoding="UTF-8"?>"#);
    out.extend_from_slice(audit_message(record, node).as_bytes());
    out
}

/// One syslog message in RFC 5425's octet-counting framing: `MSG-LEN SP SYSLOG-MSG`,
/// MSG-LEN the message's length in octets, in decimal.
pub fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut frame = format!("{} ", msg.len()).into_bytes();
    frame.extend_from_slice(msg);
    frame
}

/// Why audit messages could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AtnaError {
    #[error("syslog over UDP to {addr}: {source}")]
    Send { addr: SocketAddr, source: std::io::Error },
    #[error("an audit message of {bytes} bytes is larger than one syslog datagram ({UDP_MESSAGE_BYTES_MAX})")]
    TooLarge { bytes: usize },
    /// Local misuse: a CA file, the node's certificate or key, or an address that
    /// cannot be used.
    #[error("syslog over TLS: {0}")]
    TlsSetup(String),
    #[error("cannot reach the audit repository {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    /// The handshake failed: the repository's certificate is not from the configured
    /// CA or does not name the address dialled, or the repository refused ours.
    #[error("TLS handshake with the audit repository {addr} failed: {reason}{hint}")]
    Handshake { addr: String, reason: String, hint: &'static str },
    #[error("syslog over TLS to {addr}: {source}")]
    TlsSend { addr: String, source: std::io::Error },
    /// The repository ended the connection; `reason` is what it said (a TLS alert
    /// about our certificate means it does not trust the federation CA).
    #[error(
        "the audit repository {addr} ended the connection: {reason} \
         (an alert about the certificate means it does not accept this node's certificate)"
    )]
    Closed { addr: String, reason: String },
}

/// The TLS client settings for an audit repository: its CA (PEM file with one or more
/// certificates) is the only trust anchor; the node's own certificate chain and key
/// are the client certificate (mutual TLS, as IHE ATNA requires). TLS 1.2 and 1.3.
pub fn tls_client_config(
    ca_pem: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, AtnaError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| AtnaError::TlsSetup(format!("syslog CA: {e}")))?;
        roots.add(cert).map_err(|e| AtnaError::TlsSetup(format!("syslog CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(AtnaError::TlsSetup("the syslog CA file holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| AtnaError::TlsSetup(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| AtnaError::TlsSetup(format!("node certificate/key: {e}")))?;
    Ok(Arc::new(config))
}

/// Splits `host:port` (or `[v6]:port`) and picks the name the repository's
/// certificate must carry: `server_name` if given, else the host.
fn server_name_of(addr: &str, server_name: Option<&str>) -> Result<ServerName<'static>, AtnaError> {
    let host = match server_name {
        Some(name) => name,
        None => {
            let (host, _port) =
                addr.rsplit_once(':').ok_or_else(|| AtnaError::TlsSetup(format!("`{addr}` is not host:port")))?;
            host.trim_start_matches('[').trim_end_matches(']')
        }
    };
    ServerName::try_from(host.to_owned()).map_err(|e| AtnaError::TlsSetup(format!("server name `{host}`: {e}")))
}

/// A TLS connection to an audit repository.
pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Connects to the audit repository at `addr` (`host:port`) and completes the TLS
/// handshake, within [`CONNECT_TIMEOUT`]. The repository's certificate must chain
/// to `config`'s CA and name `server_name` (default: the host of `addr`).
pub async fn connect_tls(
    addr: &str,
    server_name: Option<&str>,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream, AtnaError> {
    let name = server_name_of(addr, server_name)?;
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| AtnaError::Connect { addr: addr.into(), source: timed_out() })?
        .map_err(|source| AtnaError::Connect { addr: addr.into(), source })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let handshake_error = |e: std::io::Error| {
        let reason = e.to_string();
        let hint = if reason.contains("invalid peer certificate") {
            " (the repository's certificate is not from the syslog CA, or not for this name)"
        } else if reason.contains("received fatal alert") {
            " (the repository refused the connection; an alert about the certificate means it does not accept this node's certificate)"
        } else {
            ""
        };
        AtnaError::Handshake { addr: addr.into(), reason, hint }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| handshake_error(timed_out()))?
        .map_err(handshake_error)
}

/// Writes one syslog message as an RFC 5425 frame and flushes it, within
/// [`WRITE_TIMEOUT`].
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    addr: &str,
    msg: &[u8],
) -> Result<(), AtnaError> {
    if msg.len() > TLS_MESSAGE_BYTES_MAX {
        return Err(AtnaError::TooLarge { bytes: msg.len() });
    }
    let frame = octet_counted(msg);
    let write = async {
        stream.write_all(&frame).await?;
        stream.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))
        .and_then(|r| r)
        .map_err(|source| AtnaError::TlsSend { addr: addr.into(), source })
}

/// Writes one frame on a TLS connection ([`write_frame`]); when that fails, reads
/// what the repository sent before it went (most often a TLS alert refusing our
/// certificate, which TLS 1.3 delivers after the client's handshake is done) to say
/// why.
pub async fn send_tls(stream: &mut TlsStream, addr: &str, msg: &[u8]) -> Result<(), AtnaError> {
    match write_frame(stream, addr, msg).await {
        Err(AtnaError::TlsSend { source, .. }) => {
            let mut buf = [0u8; 256];
            let reason = match tokio::time::timeout(std::time::Duration::from_secs(1), stream.read(&mut buf)).await {
                Ok(Err(e)) => e.to_string(),
                _ => source.to_string(),
            };
            Err(AtnaError::Closed { addr: addr.into(), reason })
        }
        other => other,
    }
}

/// Ends a TLS syslog session: sends close_notify and FIN, then waits (at most
/// `wait`) for the repository to close its side. A repository that refused our
/// client certificate says so here (TLS 1.3 lets the client finish its handshake
/// before the server has checked the client's certificate), so an error here means
/// what was sent may not have been taken.
pub async fn close_tls(mut stream: TlsStream, addr: &str, wait: std::time::Duration) -> Result<(), AtnaError> {
    let shutdown = stream.shutdown().await;
    let mut buf = [0u8; 256];
    let closed = |reason: String| AtnaError::Closed { addr: addr.into(), reason };
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Ok(Err(e)) if e.kind() != std::io::ErrorKind::UnexpectedEof => Err(closed(e.to_string())),
        // EOF (with or without its close_notify), or nothing within `wait`: the
        // repository took what was sent.
        _ => shutdown.map_err(|e| closed(e.to_string())),
    }
}

/// How many datagrams `SyslogUdp` sends back to back before it paces them.
pub const UDP_BURST: u32 = 16;
/// The rate `SyslogUdp` paces datagrams to after a burst, unless told otherwise.
/// RFC 5426 §3.6: UDP has no congestion control, so a syslog sender should limit
/// its rate; a receiver's socket buffer (208 KiB by default on Linux, about fifty
/// of these messages) drops whatever arrives faster than the receiver reads.
pub const UDP_DATAGRAMS_PER_SECOND: u32 = 1_000;

/// A token bucket: up to `burst` datagrams at once, then `rate` per second.
/// Pure (the caller passes the time), so it is tested without a clock.
#[derive(Debug, Clone)]
pub struct UdpPace {
    rate: f64,
    burst: f64,
    /// Negative: owed, paid back by waiting.
    tokens: f64,
    at: Option<std::time::Instant>,
}

impl UdpPace {
    pub fn new(rate_per_second: u32, burst: u32) -> UdpPace {
        let burst = f64::from(burst.max(1));
        UdpPace { rate: f64::from(rate_per_second.max(1)), burst, tokens: burst, at: None }
    }

    /// Takes one datagram's token at `now`; returns how long to wait before sending it.
    pub fn take(&mut self, now: std::time::Instant) -> std::time::Duration {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Sends audit messages to an audit record repository over syslog/UDP (RFC 5426),
/// one datagram each, paced (`UdpPace`). UDP gives no delivery guarantee: the store
/// stays the record, and a lost message can be sent again by a later export.
pub struct SyslogUdp {
    socket: UdpSocket,
    addr: SocketAddr,
    pace: UdpPace,
}

impl SyslogUdp {
    /// A sender paced to `UDP_DATAGRAMS_PER_SECOND` after a burst of `UDP_BURST`.
    pub fn new(addr: SocketAddr) -> Result<SyslogUdp, AtnaError> {
        SyslogUdp::with_rate(addr, UDP_DATAGRAMS_PER_SECOND)
    }

    pub fn with_rate(addr: SocketAddr, datagrams_per_second: u32) -> Result<SyslogUdp, AtnaError> {
        let local: SocketAddr =
            if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        let socket = UdpSocket::bind(local).map_err(|source| AtnaError::Send { addr, source })?;
        Ok(SyslogUdp { socket, addr, pace: UdpPace::new(datagrams_per_second, UDP_BURST) })
    }

    pub async fn send(&mut self, record: &AuditRecord, node: &NodeName) -> Result<(), AtnaError> {
        self.send_bytes(&syslog_message(record, node)).await
    }

    /// Sends one formatted syslog message as one datagram, once the pace allows.
    pub async fn send_bytes(&mut self, msg: &[u8]) -> Result<(), AtnaError> {
        if msg.len() > UDP_MESSAGE_BYTES_MAX {
            return Err(AtnaError::TooLarge { bytes: msg.len() });
        }
        let wait = self.pace.take(std::time::Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.socket.send_to(msg, self.addr).map_err(|source| AtnaError::Send { addr: self.addr, source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation_proto::{CaseId, ContentHash, PublicKey};

    fn record(kind: &str, detail: &str) -> AuditRecord {
        AuditRecord {
            seq: 7,
            at: federation_proto::Millis(1_764_000_000_000),
            kind: kind.into(),
            case: Some(CaseId([3; 16])),
            peer: Some("gaocheng.dengfeng.zhengzhou.henan.cn".into()),
            detail: detail.into(),
            prev_hash: ContentHash([1; 32]),
            hash: ContentHash([2; 32]),
            signer: PublicKey([4; 32]),
            signature: vec![5; 64],
        }
    }

    #[test]
    fn udp_pace_sends_a_burst_then_one_datagram_per_interval_and_refills_when_idle() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let mut pace = UdpPace::new(1_000, 4);
        for _ in 0..4 {
            assert_eq!(pace.take(t0), Duration::ZERO, "the burst goes at once");
        }
        let waits: Vec<Duration> = (0..3).map(|_| pace.take(t0)).collect();
        let ms: Vec<u128> = waits.iter().map(|w| w.as_micros().div_ceil(1_000)).collect();
        assert_eq!(ms, [1, 2, 3], "then each datagram waits one more interval");
        // The sender waited its 3 ms: the next one is owed 1 ms, not 4.
        let t3 = t0 + Duration::from_millis(3);
        assert_eq!(pace.take(t3).as_micros().div_ceil(1_000), 1);
        // A long idle refills the bucket, but never beyond the burst.
        let later = t3 + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(pace.take(later), Duration::ZERO);
        }
        assert!(pace.take(later) > Duration::ZERO, "the bucket holds one burst, no more");
    }

    #[test]
    fn a_syslog_message_has_the_rfc_5424_header_and_escapes_the_detail() {
        let node = NodeName::from("v1.gaocheng.dengfeng.zhengzhou.henan.cn");
        let msg = syslog_message(&record("case.refused", r#"a <b> & "c""#), &node);
        let text = String::from_utf8(msg).unwrap();
        let (header, body) = text.split_once('\u{feff}').expect("BOM before the message");
        assert_eq!(
            header,
            "<85>1 2025-11-24T16:00:00.000Z v1.gaocheng.dengfeng.zhengzhou.henan.cn telemed-node - IHE+RFC-3881 - "
        );
        assert!(body.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?><AuditMessage>"));
        assert!(body.contains("EventOutcomeIndicator=\"4\""), "refused is a minor failure");
        assert!(body.contains("a &lt;b&gt; &amp; &quot;c&quot;"), "{body}");
        assert!(!body.contains("<b>"));
    }
}
