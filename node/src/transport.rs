//! The data plane's links: QUIC (quinn) with mutual TLS 1.3 from the federation PKI,
//! length-prefixed frames on streams, and the application-level hello/ack that makes
//! a link trusted.
//!
//! In TLS 1.3 a client may finish its handshake before the server has judged the
//! client's certificate, so `connect` alone proves nothing. A link is up only when
//! the server has (1) verified the client's chain, tier and region
//! (`certs::FederationVerifier`), (2) checked the hello's claims against that
//! certificate and the parent-link rules, and (3) answered with a `HelloAck`.
//! [`connect`] returns a [`Link`] only after that ack; [`accept`] only after sending it.
//!
//! This module must never interpret cases: it moves frames and proves identities.

use certs::keys::NodeCredentials;
use certs::verify::{PeerIdentity, TrustStore, check_parent_link};
use certs::{FederationVerifier, VerifyError};
use federation_proto::codec::{FRAME_HEADER_LEN, frame_len};
use federation_proto::{
    ALPN, Hello, HelloAck, Message, NodeClaim, NodeName, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, Reject, RejectCode,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Application close codes on a link.
pub const CLOSE_CERTIFICATE: u32 = 2;
pub const CLOSE_HELLO_REFUSED: u32 = 1;
pub const CLOSE_REVOKED: u32 = 3;

/// How long the hello/ack exchange may take before the link is abandoned.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most concurrent bidirectional streams a peer may open on one link.
pub const STREAMS_PER_PEER_MAX: u32 = 64;
/// Idle time after which a link is closed (keep-alives keep live links open).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Receive window per stream and per connection: bounds in-flight bytes per peer.
pub const STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// What can go wrong on a link, grouped by who is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Local misuse: bad credentials or configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The peer's certificate failed verification.
    #[error("peer certificate refused: {0}")]
    Certificate(#[from] VerifyError),
    /// The peer broke the protocol (bad frame, wrong first message, claims mismatch).
    #[error("protocol violation by {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// The peer refused us, with its reason.
    #[error("refused by {peer}: {code:?}: {detail}")]
    Refused { peer: String, code: RejectCode, detail: String },
    /// The connection failed or was closed (for a client whose certificate the
    /// server rejected, this is where it shows).
    #[error("connection to {peer}: {detail}")]
    Connection { peer: String, detail: String },
    #[error("hello/ack with {peer} timed out after {HELLO_TIMEOUT:?}")]
    Timeout { peer: String },
    #[error("frame: {0}")]
    Frame(#[from] federation_proto::Error),
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(STREAMS_PER_PEER_MAX.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_WINDOW_BYTES.into());
    t.receive_window(CONNECTION_WINDOW_BYTES.into());
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("20 s fits")));
    Arc::new(t)
}

/// The server side of links: requires and verifies a federation client certificate.
pub fn server_config(
    creds: &NodeCredentials,
    verifier: Arc<FederationVerifier>,
) -> Result<quinn::ServerConfig, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| TransportError::Config(format!("node certificate/key: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: a resumed session would skip the certificate verifier.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// The client side of links: presents the node's certificate, verifies the server's.
pub fn client_config(
    creds: &NodeCredentials,
    verifier: Arc<FederationVerifier>,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| TransportError::Config(format!("node certificate/key: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// An endpoint that both serves children and dials parents.
///
/// The stateless-reset key is derived from the node's private key, so a node that
/// restarts (even after `kill -9`) can tell its peers at once that their old
/// connections are gone, instead of leaving them to wait for the idle timeout.
pub fn endpoint(
    listen: SocketAddr,
    creds: &NodeCredentials,
    verifier: Arc<FederationVerifier>,
) -> Result<Endpoint, TransportError> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"telemed-federation/quic-stateless-reset/v1");
    h.update(creds.key.secret_der());
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize());
    let socket =
        std::net::UdpSocket::bind(listen).map_err(|e| TransportError::Config(format!("bind {listen}: {e}")))?;
    let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Config("no async runtime".into()))?;
    let mut ep = Endpoint::new(
        quinn::EndpointConfig::new(Arc::new(reset_key)),
        Some(server_config(creds, verifier.clone())?),
        socket,
        runtime,
    )
    .map_err(|e| TransportError::Config(format!("endpoint on {listen}: {e}")))?;
    ep.set_default_client_config(client_config(creds, verifier)?);
    Ok(ep)
}

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, message: &Message) -> Result<(), TransportError> {
    let lost = |e: quinn::WriteError| TransportError::Connection { peer: "stream".into(), detail: e.to_string() };
    let frame = federation_proto::encode_frame(message)?;
    send.write_all(&frame).await.map_err(lost)
}

/// A `ChunkResponse` frame: the same bytes as [`write_frame`] would send (and
/// `encode_frame` makes; property-tested in federation-proto), but the chunk is
/// neither copied through CBOR nor into quinn's send buffer: its bytes are handed
/// over as they are (a sender's only copy of them after the read from disk).
pub async fn write_chunk_response(
    send: &mut SendStream,
    resp: federation_proto::ChunkResponse,
) -> Result<(), TransportError> {
    let lost = |e: quinn::WriteError| TransportError::Connection { peer: "stream".into(), detail: e.to_string() };
    let head = federation_proto::codec::chunk_response_frame_head(&resp)?;
    send.write_all(&head).await.map_err(lost)?;
    send.write_chunk(bytes::Bytes::from(resp.data)).await.map_err(lost)
}

/// Reads one frame; the length is checked against the limit before the payload is read.
///
/// The payload is copied once, from quinn's buffers into the message: a
/// `ChunkResponse`'s data goes straight into the `Vec` it is returned in
/// ([`federation_proto::codec::decode_split`]), and no buffer is zeroed first.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Message, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|e| read_error(e.to_string()))?;
    let len = frame_len(header)?;
    let mut head = Vec::with_capacity(len.min(FRAME_PEEK_LEN));
    read_to_len(recv, &mut head, len.min(FRAME_PEEK_LEN), (0, len)).await?;
    let (head, mut rest) = match federation_proto::codec::chunk_response_head_len(&head, len) {
        Some(head_len) => {
            let mut data = Vec::with_capacity(len - head_len);
            data.extend_from_slice(&head[head_len..]);
            head.truncate(head_len);
            (head, data)
        }
        None => {
            head.reserve_exact(len - head.len());
            (Vec::new(), head)
        }
    };
    let before = head.len();
    read_to_len(recv, &mut rest, len - before, (before, len)).await?;
    Ok(federation_proto::codec::decode_split(&head, rest)?)
}

/// Bytes of a frame read before the rest: enough for the head of a `ChunkResponse`
/// up to its data (131 to about 150 bytes, with the offsets' sizes), so that the data
/// can be read into its own buffer.
const FRAME_PEEK_LEN: usize = 256;

/// Appends what `recv` delivers to `buf` until it holds `len` bytes; an early end of
/// the stream is an error. `(before, payload)`: bytes of the payload read before
/// `buf`'s and its length, for the error message.
async fn read_to_len(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
    len: usize,
    (before, payload): (usize, usize),
) -> Result<(), TransportError> {
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                let came = before + buf.len();
                return Err(read_error(format!("stream ended after {came} of {payload} bytes of a frame")));
            }
            Err(e) => return Err(read_error(e.to_string())),
        }
    }
    Ok(())
}

fn read_error(detail: String) -> TransportError {
    TransportError::Connection { peer: "stream".into(), detail }
}

/// A trusted link: the peer's certificate verified and the hello/ack done.
#[derive(Debug, Clone)]
pub struct Link {
    pub connection: Connection,
    pub peer: PeerIdentity,
    /// The peer's certificate chain, kept to re-verify it when CRLs change.
    pub chain: Vec<CertificateDer<'static>>,
    /// The protocol version both sides speak on this link.
    pub protocol_version: u16,
}

/// The peer's verified identity from its TLS certificate chain. The verifier already
/// checked it during the handshake; checking again here also covers resumed sessions
/// and CRLs loaded since.
fn peer_identity(
    conn: &Connection,
    trust: &TrustStore,
) -> Result<(PeerIdentity, Vec<CertificateDer<'static>>), TransportError> {
    let chain =
        conn.peer_identity().and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok()).ok_or_else(|| {
            TransportError::Protocol { peer: conn.remote_address().to_string(), detail: "no certificate".into() }
        })?;
    let identity =
        trust.identity_of_peer(&chain).inspect_err(|_| conn.close(CLOSE_CERTIFICATE.into(), b"certificate refused"))?;
    Ok((identity, *chain))
}

fn claim_matches(claim: &NodeClaim, id: &PeerIdentity) -> bool {
    claim.name == id.name && claim.tier == id.tier && claim.public_key == id.public_key
}

/// Dials `parent` (by its node name, which its certificate must carry) at `addr`,
/// and returns only once the parent has acknowledged our hello.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    parent: &NodeName,
    me: &NodeClaim,
    trust: &TrustStore,
) -> Result<Link, TransportError> {
    let peer = parent.to_string();
    let conn_err = |e: &dyn std::fmt::Display| TransportError::Connection { peer: peer.clone(), detail: e.to_string() };
    let exchange = async {
        let connecting = endpoint.connect(addr, parent.as_str()).map_err(|e| conn_err(&e))?;
        let conn = connecting.await.map_err(|e| conn_err(&e))?;
        let (identity, chain) = peer_identity(&conn, trust)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| conn_err(&e))?;
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            protocol_version_min: PROTOCOL_VERSION_MIN,
            node: me.clone(),
            software: concat!("telemed-node/", env!("CARGO_PKG_VERSION")).into(),
        };
        write_frame(&mut send, &Message::Hello(hello)).await?;
        let _ = send.finish();
        // If the server refused our certificate, this read is where it shows.
        let answer = read_frame(&mut recv).await.map_err(|e| match conn.close_reason() {
            Some(reason) => conn_err(&format!("the server closed the link: {reason}")),
            None => e,
        })?;
        match answer {
            Message::HelloAck(ack) => {
                if !claim_matches(&ack.node, &identity) {
                    conn.close(0u32.into(), b"identity mismatch");
                    return Err(TransportError::Protocol {
                        peer: peer.clone(),
                        detail: "ack claims differ from its certificate".into(),
                    });
                }
                if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&ack.protocol_version) {
                    return Err(TransportError::Protocol {
                        peer: peer.clone(),
                        detail: format!("version {} not offered", ack.protocol_version),
                    });
                }
                Ok(Link { connection: conn, peer: identity, chain, protocol_version: ack.protocol_version })
            }
            Message::Reject(Reject { code, detail, .. }) => {
                Err(TransportError::Refused { peer: peer.clone(), code, detail })
            }
            other => Err(TransportError::Protocol {
                peer: peer.clone(),
                detail: format!("expected hello_ack, got {}", other.kind()),
            }),
        }
    };
    let result = tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| TransportError::Timeout { peer: parent.to_string() })
        .and_then(|r| r);
    match &result {
        Ok(link) => tracing::info!(peer = %link.peer.name, tier = %link.peer.tier, "link up (hello acknowledged)"),
        Err(e) => tracing::warn!(peer = %parent, %addr, "link not established: {e}"),
    }
    result
}

/// What the accepting side requires of a connecting node.
#[derive(Debug, Clone)]
pub struct AcceptPolicy {
    /// This node's own verified identity (for the parent-link rules).
    pub me: PeerIdentity,
    pub claim: NodeClaim,
    /// Nodes allowed to connect across region boundaries.
    pub cross_links: Vec<NodeName>,
}

/// Accepts a connection and completes the hello/ack. The connecting node must be a
/// verified lower-tier node in our region (or a configured cross-link) whose hello
/// claims exactly what its certificate says; otherwise it gets a `Reject` and the
/// connection is closed.
pub async fn accept(
    incoming: quinn::Incoming,
    policy: &AcceptPolicy,
    trust: &TrustStore,
) -> Result<Link, TransportError> {
    let remote = incoming.remote_address().to_string();
    let conn_err =
        |e: &dyn std::fmt::Display| TransportError::Connection { peer: remote.clone(), detail: e.to_string() };
    let exchange = async {
        let conn = incoming.await.map_err(|e| conn_err(&e))?;
        let (identity, chain) = peer_identity(&conn, trust)?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| conn_err(&e))?;
        let verdict: Result<u16, (RejectCode, String)> = match read_frame(&mut recv).await? {
            Message::Hello(hello) => {
                if !claim_matches(&hello.node, &identity) {
                    Err((
                        RejectCode::IdentityMismatch,
                        format!(
                            "hello claims {} ({}) but the certificate says {} ({})",
                            hello.node.name, hello.node.tier, identity.name, identity.tier
                        ),
                    ))
                } else if hello.protocol_version < PROTOCOL_VERSION_MIN || hello.protocol_version_min > PROTOCOL_VERSION
                {
                    Err((
                        RejectCode::VersionUnsupported,
                        format!(
                            "peer speaks {}..={}, this node {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}",
                            hello.protocol_version_min, hello.protocol_version
                        ),
                    ))
                } else if let Err(e) = check_parent_link(&policy.me, &identity, &policy.cross_links) {
                    Err((RejectCode::WrongDirection, e.to_string()))
                } else {
                    Ok(hello.protocol_version.min(PROTOCOL_VERSION))
                }
            }
            other => Err((RejectCode::Malformed, format!("expected hello, got {}", other.kind()))),
        };
        match verdict {
            Ok(version) => {
                let ack = HelloAck { protocol_version: version, node: policy.claim.clone() };
                write_frame(&mut send, &Message::HelloAck(ack)).await?;
                let _ = send.finish();
                Ok(Link { connection: conn, peer: identity, chain, protocol_version: version })
            }
            Err((code, detail)) => {
                let reject = Reject { case_id: None, code, detail: detail.clone() };
                let _ = write_frame(&mut send, &Message::Reject(reject)).await;
                let _ = send.finish();
                let _ = send.stopped().await;
                conn.close(CLOSE_HELLO_REFUSED.into(), b"hello refused");
                Err(TransportError::Refused { peer: identity.name.to_string(), code, detail })
            }
        }
    };
    let result = tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| TransportError::Timeout { peer: remote.clone() })
        .and_then(|r| r);
    match &result {
        Ok(link) => tracing::info!(peer = %link.peer.name, tier = %link.peer.tier, "child link accepted"),
        Err(e) => tracing::warn!(%remote, "link refused: {e}"),
    }
    result
}

/// The node's open links, so that a CRL update can cut off a revoked peer at once.
#[derive(Debug, Clone, Default)]
pub struct LiveLinks {
    links: Arc<std::sync::Mutex<Vec<Link>>>,
}

impl LiveLinks {
    pub fn add(&self, link: Link) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|l| l.connection.close_reason().is_none());
        links.push(link);
    }

    /// Links still open.
    pub fn open(&self) -> Vec<Link> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|l| l.connection.close_reason().is_none());
        links.clone()
    }

    /// Re-verifies every open link's certificate chain now (after a CRL or trust
    /// change) and closes each link that no longer verifies. Returns who was cut off.
    pub fn recheck(&self, trust: &TrustStore) -> Vec<(NodeName, VerifyError)> {
        let mut cut = Vec::new();
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|link| {
            if link.connection.close_reason().is_some() {
                return false;
            }
            match trust.identity_of_peer(&link.chain) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(peer = %link.peer.name, "closing link: certificate no longer verifies: {e}");
                    link.connection.close(CLOSE_REVOKED.into(), b"certificate revoked");
                    cut.push((link.peer.name.clone(), e));
                    false
                }
            }
        });
        cut
    }
}

/// Loads a CRL into the trust store and closes the open links it revokes.
pub fn apply_crl(
    trust: &TrustStore,
    crl_pem: &str,
    links: &LiveLinks,
) -> Result<Vec<(NodeName, VerifyError)>, VerifyError> {
    trust.load_crl(crl_pem)?;
    Ok(links.recheck(trust))
}
