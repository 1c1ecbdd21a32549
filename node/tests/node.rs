//! The node's links over real QUIC on loopback with real federation certificates:
//! the hello/ack, every way a peer can be refused, and revocation of live links.

use certs::ca::{CertificateAuthority, IntermediateOptions, RevokeReason, RootOptions, Validity};
use certs::enrol;
use certs::keys::NodeCredentials;
use certs::profile::{self, Serial};
use certs::verify::{FederationVerifier, PeerIdentity, TrustStore};
use federation_proto::{NodeClaim, NodeName, RejectCode, Tier};
use node::transport::{self, AcceptPolicy, Link, LiveLinks, TransportError};
use quinn::Endpoint;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use time::OffsetDateTime;
use tokio::sync::mpsc;

const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";

// --- captured logs -----------------------------------------------------------------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    let buf = LOGS.get_or_init(|| Arc::new(Mutex::new(Vec::new()))).clone();
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || Capture(buf.clone()))
        .try_init();
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.get().unwrap().lock().unwrap()).into_owned()
}

/// Waits (bounded) until the captured logs contain `needle`.
async fn logged(needle: &str) -> bool {
    for _ in 0..100 {
        if logs().contains(needle) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

// --- federation fixtures -------------------------------------------------------------

struct Federation {
    _dir: tempfile::TempDir,
    henan: CertificateAuthority,
    trust: Arc<TrustStore>,
}

fn federation() -> Federation {
    let dir = tempfile::tempdir().unwrap();
    let mut root = CertificateAuthority::init_root(&dir.path().join("root"), &RootOptions::new("cn")).unwrap();
    let mut national =
        root.issue_intermediate(&dir.path().join("national"), &IntermediateOptions::new("cn", Tier::National)).unwrap();
    let henan = national
        .issue_intermediate(&dir.path().join("henan"), &IntermediateOptions::new("henan.cn", Tier::Provincial))
        .unwrap();
    let trust = Arc::new(TrustStore::from_root_pem(&root.root_pem()).unwrap());
    Federation { _dir: dir, henan, trust }
}

struct Enrolled {
    name: NodeName,
    tier: Tier,
    creds: NodeCredentials,
    serial: Serial,
}

impl Enrolled {
    fn claim(&self) -> NodeClaim {
        NodeClaim { name: self.name.clone(), tier: self.tier, public_key: self.creds.public_key }
    }
}

fn enrol_with(ca: &mut CertificateAuthority, name: &str, tier: Tier, validity: Validity) -> Enrolled {
    let (key_pem, csr_pem) = enrol::generate_key_and_csr(&NodeName::from(name), tier).unwrap();
    let issued = ca.sign_csr(&csr_pem, tier, validity).unwrap();
    Enrolled {
        name: name.into(),
        tier,
        creds: NodeCredentials::from_pem(&issued.chain_pem, &key_pem).unwrap(),
        serial: issued.serial,
    }
}

fn enrol(ca: &mut CertificateAuthority, name: &str, tier: Tier) -> Enrolled {
    enrol_with(ca, name, tier, Validity::Days(30))
}

fn verifier(trust: &Arc<TrustStore>) -> Arc<FederationVerifier> {
    Arc::new(FederationVerifier::new(trust.clone()))
}

fn identity(trust: &TrustStore, n: &Enrolled) -> PeerIdentity {
    trust.identity_of_peer(&n.creds.chain).unwrap()
}

/// A county node serving on loopback; every accept result goes to the channel.
struct Server {
    endpoint: Endpoint,
    addr: SocketAddr,
    results: mpsc::Receiver<Result<Link, TransportError>>,
    links: LiveLinks,
}

fn serve(trust: &Arc<TrustStore>, county: &Enrolled) -> Server {
    let endpoint = transport::endpoint("127.0.0.1:0".parse().unwrap(), &county.creds, verifier(trust)).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let policy = AcceptPolicy { me: identity(trust, county), claim: county.claim(), cross_links: vec![] };
    let (tx, results) = mpsc::channel(16);
    let links = LiveLinks::default();
    let (ep, trust, live) = (endpoint.clone(), trust.clone(), links.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let result = transport::accept(incoming, &policy, &trust).await;
            if let Ok(link) = &result {
                live.add(link.clone());
            }
            if tx.send(result).await.is_err() {
                break;
            }
        }
    });
    Server { endpoint, addr, results, links }
}

fn client(trust: &Arc<TrustStore>, node: &Enrolled) -> Endpoint {
    transport::endpoint("127.0.0.1:0".parse().unwrap(), &node.creds, verifier(trust)).unwrap()
}

async fn next_result(server: &mut Server) -> Result<Link, TransportError> {
    tokio::time::timeout(std::time::Duration::from_secs(15), server.results.recv()).await.unwrap().unwrap()
}

/// A county serving and a village linked to it: (the village's link, the county's,
/// the county's server, the village's endpoint, the enrolled county and village).
async fn county_and_village_linked() -> (Link, Link, Server, Endpoint, Enrolled, Enrolled) {
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let village = enrol(&mut fed.henan, "v001.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    let mut server = serve(&fed.trust, &county);
    let ep = client(&fed.trust, &village);
    let link = transport::connect(&ep, server.addr, &county.name, &village.claim(), &fed.trust).await.unwrap();
    let accepted = next_result(&mut server).await.unwrap();
    (link, accepted, server, ep, county, village)
}

// --- tests ---------------------------------------------------------------------------

#[tokio::test]
async fn valid_chain_gives_a_link_and_both_ends_know_the_peer() {
    init_logs();
    let (link, accepted, server, _ep, county, village) = county_and_village_linked().await;
    assert_eq!(link.peer.name, county.name);
    assert_eq!(link.peer.tier, Tier::County);
    assert_eq!(accepted.peer.name, village.name);
    assert_eq!(accepted.peer.tier, Tier::Village);
    assert_eq!(accepted.peer.region, "gaocheng.dengfeng.zhengzhou.henan.cn");
    assert_eq!(accepted.peer.public_key, village.creds.public_key);
    assert_eq!(accepted.peer.peer_id, certs::keys::peer_id_of(&village.creds.public_key).unwrap());
    assert_eq!(accepted.protocol_version, federation_proto::PROTOCOL_VERSION);

    // Frames flow on a fresh stream once the link is up.
    let (mut send, _recv) = link.connection.open_bi().await.unwrap();
    let msg = federation_proto::Message::AlreadyHave(federation_proto::AlreadyHave {
        case_id: federation_proto::CaseId([7; 16]),
    });
    transport::write_frame(&mut send, &msg).await.unwrap();
    send.finish().unwrap();
    let (_s, mut recv) = accepted.connection.accept_bi().await.unwrap();
    assert_eq!(transport::read_frame(&mut recv).await.unwrap(), msg);
    assert!(logged("child link accepted").await);
    server.endpoint.close(0u32.into(), b"");
}

/// `read_frame` reads back every kind of frame whole, however the sender cut it into
/// writes: a chunk response larger than the bytes it peeks at first (its data goes
/// to a buffer of its own), one smaller than them, and another message larger than
/// them. A frame whose stream ends early is an error that says how many bytes came.
#[tokio::test]
async fn frames_read_back_whole_in_any_pieces_and_a_cut_frame_is_an_error() {
    use federation_proto::{ChunkResponse, ContentHash, Message, Reject};
    init_logs();
    let (link, accepted, server, _ep, _county, _village) = county_and_village_linked().await;

    let chunk = |len: usize| {
        Message::ChunkResponse(ChunkResponse {
            hash: ContentHash([1; 32]),
            offset: 1 << 20,
            total_size: 3 << 20,
            chunk_hash: ContentHash([2; 32]),
            data: (0..len).map(|i| (i % 251) as u8).collect(),
        })
    };
    let reject = Message::Reject(Reject { case_id: None, code: RejectCode::Malformed, detail: "why ".repeat(300) });
    for (msg, piece) in [
        (chunk(federation_proto::codec::CHUNK_LEN_MAX as usize), 1000),
        (chunk(256 * 1024 - 1), 7),
        (chunk(10), 3),
        (chunk(0), 1),
        (reject.clone(), 100),
    ] {
        let frame = federation_proto::encode_frame(&msg).unwrap();
        let (mut send, _r) = link.connection.open_bi().await.unwrap();
        let writer = tokio::spawn(async move {
            for part in frame.chunks(piece) {
                send.write_all(part).await.unwrap();
            }
            send.finish().unwrap();
            send
        });
        let (_s, mut recv) = accepted.connection.accept_bi().await.unwrap();
        assert_eq!(transport::read_frame(&mut recv).await.unwrap(), msg, "{} in pieces of {piece}", msg.kind());
        drop(writer.await.unwrap());
    }

    // Cut short: inside the first bytes, inside a chunk's data, inside another message.
    for (msg, keep) in [(chunk(1000), 40), (chunk(1000), 700), (reject, 900)] {
        let frame = federation_proto::encode_frame(&msg).unwrap();
        let (mut send, _r) = link.connection.open_bi().await.unwrap();
        send.write_all(&frame[..keep]).await.unwrap();
        send.finish().unwrap();
        let (_s, mut recv) = accepted.connection.accept_bi().await.unwrap();
        let err = transport::read_frame(&mut recv).await.expect_err("a cut frame must not decode");
        let payload = frame.len() - federation_proto::codec::FRAME_HEADER_LEN;
        let came = keep - federation_proto::codec::FRAME_HEADER_LEN;
        assert!(
            err.to_string().contains(&format!("stream ended after {came} of {payload} bytes of a frame")),
            "{} cut at {keep}: {err}",
            msg.kind()
        );
    }
    server.endpoint.close(0u32.into(), b"");
}

/// Connects with `node`'s credentials and expects the server to refuse it during or
/// after the handshake, logging `reason`.
async fn expect_refused(
    fed: &Federation,
    server: &mut Server,
    ep: &Endpoint,
    node: &Enrolled,
    reason: &str,
) -> TransportError {
    let err = transport::connect(ep, server.addr, &NodeName::from(COUNTY), &node.claim(), &fed.trust)
        .await
        .expect_err("the link must not come up");
    let server_side = next_result(server).await.expect_err("the server must refuse");
    assert!(logged(reason).await, "server log should say `{reason}`; server error: {server_side}; logs:\n{}", logs());
    err
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let village = enrol(&mut fed.henan, "v002.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    let mut server = serve(&fed.trust, &county);
    // A client that presents no certificate at all.
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier(&fed.trust))
        .with_no_client_auth();
    tls.alpn_protocols = vec![federation_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let err = transport::connect(&ep, server.addr, &county.name, &village.claim(), &fed.trust).await.unwrap_err();
    let server_side = next_result(&mut server).await.unwrap_err();
    assert!(server_side.to_string().to_lowercase().contains("certificate"), "{server_side}");
    assert!(logged("link refused").await);
    assert!(!matches!(err, TransportError::Timeout { .. }), "refused promptly, not by timeout: {err}");
}

#[tokio::test]
async fn self_signed_and_foreign_federation_certificates_are_refused() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let mut server = serve(&fed.trust, &county);

    // Self-signed, with the right profile and name.
    let name = "v003.gaocheng.dengfeng.zhengzhou.henan.cn";
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let now = OffsetDateTime::now_utc();
    let params = certs::ca::node_params(
        &name.into(),
        Tier::Village,
        &Serial::random().unwrap(),
        now,
        now + time::Duration::days(1),
    )
    .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let self_signed = Enrolled {
        name: name.into(),
        tier: Tier::Village,
        creds: NodeCredentials::from_pem(&cert.pem(), &key.serialize_pem()).unwrap(),
        serial: Serial::random().unwrap(),
    };
    let ep = client(&fed.trust, &self_signed);
    expect_refused(
        &fed,
        &mut server,
        &ep,
        &self_signed,
        &format!("client certificate rejected: certificate `{name}` is not trusted"),
    )
    .await;

    // Issued by another federation's CA.
    let mut other = federation();
    let name = "v004.gaocheng.dengfeng.zhengzhou.henan.cn";
    let foreign = enrol(&mut other.henan, name, Tier::Village);
    // It trusts our root (so it accepts the county), but its own chain is foreign.
    let ep = client(&fed.trust, &foreign);
    expect_refused(&fed, &mut server, &ep, &foreign, &format!("certificate `{name}` is not trusted")).await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let mut server = serve(&fed.trust, &county);
    let t = OffsetDateTime::now_utc();
    let name = "v005.gaocheng.dengfeng.zhengzhou.henan.cn";
    let expired = enrol_with(
        &mut fed.henan,
        name,
        Tier::Village,
        Validity::Window { not_before: t - time::Duration::days(30), not_after: t - time::Duration::days(1) },
    );
    // The client must not refuse to present it: build its endpoint from the same trust.
    let ep = client(&fed.trust, &expired);
    expect_refused(&fed, &mut server, &ep, &expired, &format!("certificate `{name}` expired")).await;

    let name = "v006.gaocheng.dengfeng.zhengzhou.henan.cn";
    let future = enrol_with(
        &mut fed.henan,
        name,
        Tier::Village,
        Validity::Window { not_before: t + time::Duration::days(1), not_after: t + time::Duration::days(30) },
    );
    let ep = client(&fed.trust, &future);
    expect_refused(&fed, &mut server, &ep, &future, &format!("certificate `{name}` is not valid before")).await;
}

#[tokio::test]
async fn revoked_certificate_is_refused_and_its_open_link_is_closed_on_crl_update() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let name = "v007.gaocheng.dengfeng.zhengzhou.henan.cn";
    let village = enrol(&mut fed.henan, name, Tier::Village);
    let sibling = enrol(&mut fed.henan, "v008.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    let mut server = serve(&fed.trust, &county);

    let ep = client(&fed.trust, &village);
    let link = transport::connect(&ep, server.addr, &county.name, &village.claim(), &fed.trust).await.unwrap();
    next_result(&mut server).await.unwrap();
    let sib_ep = client(&fed.trust, &sibling);
    let sib_link = transport::connect(&sib_ep, server.addr, &county.name, &sibling.claim(), &fed.trust).await.unwrap();
    next_result(&mut server).await.unwrap();
    assert_eq!(server.links.open().len(), 2);

    fed.henan.revoke(&village.serial, RevokeReason::KeyCompromise).unwrap();
    let crl = fed.henan.crl(7).unwrap();
    let cut = transport::apply_crl(&fed.trust, &crl, &server.links).unwrap();
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].0.as_str(), name);
    // The village sees its link closed by the county, with the reason.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), link.connection.closed()).await.unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if u64::from(c.error_code) == u64::from(transport::CLOSE_REVOKED)),
        "{closed}"
    );
    assert!(sib_link.connection.close_reason().is_none(), "other links stay up");
    assert!(logged(&format!("peer={name}")).await && logged("closing link: certificate no longer verifies").await);

    // A new connection from the revoked node is refused at the handshake.
    let ep = client(&fed.trust, &village);
    expect_refused(&fed, &mut server, &ep, &village, &format!("certificate `{name}` has been revoked")).await;
}

#[tokio::test]
async fn name_outside_the_issuing_cas_region_is_refused() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let mut server = serve(&fed.trust, &county);
    // The henan.cn CA's key signs a node in hubei.cn, bypassing the CA tool's checks.
    let name = "v009.wuhan.hubei.cn";
    let forged = forge(&fed.henan, name, Tier::Village);
    let ep = client(&fed.trust, &forged);
    expect_refused(&fed, &mut server, &ep, &forged, &format!("`{name}` is outside region `henan.cn`")).await;
}

/// A node certificate signed with `ca`'s key directly, with whatever name and tier.
fn forge(ca: &CertificateAuthority, name: &str, tier: Tier) -> Enrolled {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.dir().join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.certificate(), &ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let now = OffsetDateTime::now_utc();
    let params = certs::ca::node_params(
        &name.into(),
        tier,
        &Serial::random().unwrap(),
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let chain = std::fs::read_to_string(ca.dir().join("chain.pem")).unwrap();
    let mut chain_certs = profile::pem_certificates(&chain).unwrap();
    chain_certs.pop(); // the root is not presented
    let mut pem = cert.pem();
    for c in chain_certs {
        pem.push_str(&::pem::encode(&::pem::Pem::new("CERTIFICATE", c.to_vec())));
    }
    Enrolled {
        name: name.into(),
        tier,
        creds: NodeCredentials::from_pem(&pem, &key.serialize_pem()).unwrap(),
        serial: Serial::random().unwrap(),
    }
}

#[tokio::test]
async fn tier_inflation_is_refused() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let mut server = serve(&fed.trust, &county);

    // A county-tier CA (limited to its county) issuing a provincial certificate.
    let ca_dir = tempfile::tempdir().unwrap();
    let county_ca = fed
        .henan
        .issue_intermediate(&ca_dir.path().join("county-ca"), &IntermediateOptions::new(COUNTY, Tier::County))
        .unwrap();
    let name = "x1.gaocheng.dengfeng.zhengzhou.henan.cn";
    let inflated = forge(&county_ca, name, Tier::Provincial);
    let ep = client(&fed.trust, &inflated);
    expect_refused(&fed, &mut server, &ep, &inflated, &format!("tier provincial of `{name}` is not permitted")).await;

    // A village key presenting a higher tier in its hello than its certificate says.
    let name = "v010.gaocheng.dengfeng.zhengzhou.henan.cn";
    let village = enrol(&mut fed.henan, name, Tier::Village);
    let mut claim = village.claim();
    claim.tier = Tier::City;
    let ep = client(&fed.trust, &village);
    let err = transport::connect(&ep, server.addr, &county.name, &claim, &fed.trust).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Refused { code: RejectCode::IdentityMismatch, detail, .. } if detail.contains("city")),
        "{err}"
    );
    next_result(&mut server).await.unwrap_err();
    assert!(logged(&format!("hello claims {name} (city) but the certificate says {name} (village)")).await);

    // A peer of the same tier is not a child: refused by the parent-link rule.
    let name = "other-county.zhengzhou.henan.cn";
    let peer = enrol(&mut fed.henan, name, Tier::County);
    let ep = client(&fed.trust, &peer);
    let err = transport::connect(&ep, server.addr, &county.name, &peer.claim(), &fed.trust).await.unwrap_err();
    assert!(matches!(&err, TransportError::Refused { code: RejectCode::WrongDirection, .. }), "{err}");
    next_result(&mut server).await.unwrap_err();
}

#[tokio::test]
async fn client_refuses_a_server_that_is_not_the_parent_it_dialled() {
    init_logs();
    let mut fed = federation();
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let server = serve(&fed.trust, &county);
    let village = enrol(&mut fed.henan, "v011.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    let ep = client(&fed.trust, &village);
    let err = transport::connect(&ep, server.addr, &NodeName::from("zhengzhou.henan.cn"), &village.claim(), &fed.trust)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connection { .. }), "{err}");
    assert!(logged("server certificate rejected: expected peer `zhengzhou.henan.cn` but its certificate names").await);
}

#[tokio::test]
async fn certificate_and_key_mismatch_and_foreign_peer_id_are_refused() {
    init_logs();
    let mut fed = federation();
    let a = enrol(&mut fed.henan, "v012.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    let (other_key, _) =
        enrol::generate_key_and_csr(&"v013.gaocheng.dengfeng.zhengzhou.henan.cn".into(), Tier::Village).unwrap();
    let chain_pem: String =
        a.creds.chain.iter().map(|c| ::pem::encode(&::pem::Pem::new("CERTIFICATE", c.to_vec()))).collect();
    let err = NodeCredentials::from_pem(&chain_pem, &other_key).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("key"), "{err}");

    // Credentials that pair a certificate with another node's key (bypassing the
    // loader's check) cannot bring a link up: the handshake proof of possession fails.
    let county = enrol(&mut fed.henan, COUNTY, Tier::County);
    let mut server = serve(&fed.trust, &county);
    let b = enrol(&mut fed.henan, "v015.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    let forged =
        NodeCredentials { chain: a.creds.chain.clone(), key: b.creds.key.clone_key(), public_key: a.creds.public_key };
    match transport::endpoint("127.0.0.1:0".parse().unwrap(), &forged, verifier(&fed.trust)) {
        Err(e) => assert!(e.to_string().contains("key"), "refused locally: {e}"),
        Ok(ep) => {
            let err = transport::connect(&ep, server.addr, &county.name, &a.claim(), &fed.trust).await.unwrap_err();
            assert!(!matches!(err, TransportError::Timeout { .. }), "{err}");
            assert!(next_result(&mut server).await.is_err());
        }
    }

    // A libp2p PeerId derived from another key does not match the certificate.
    let id = identity(&fed.trust, &a);
    let other = enrol(&mut fed.henan, "v014.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);
    assert!(id.matches_peer_id(&certs::keys::peer_id_of(&a.creds.public_key).unwrap()));
    assert!(!id.matches_peer_id(&certs::keys::peer_id_of(&other.creds.public_key).unwrap()));
}

// --- whole nodes: real processes, real certificates, SQLite, kill -9 ---------------------

#[path = "node/browser.rs"]
mod browser;
#[path = "node/chaos.rs"]
mod chaos;
#[path = "node/load.rs"]
mod load;
#[path = "node/web.rs"]
mod web;

#[path = "node/control_plane.rs"]
mod control_plane;
#[cfg(feature = "models")]
#[path = "node/models.rs"]
mod models;

mod federation_processes {
    use federation_proto::{Modality, Tier};
    use node::config::{Config, ParentConfig};
    use node::control::{Request, Response};
    use node::demo::{PlannedNode, provision};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// Kills every child process when the test ends, however it ends.
    pub(super) struct Procs(pub(super) Vec<(String, Child)>);
    impl Drop for Procs {
        fn drop(&mut self) {
            for (_, c) in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub(super) fn free_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    pub(super) fn spawn(config_path: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_telemed-node"))
            .args(["run", "--config"])
            .arg(config_path)
            .env("TELEMED_LOG", "info,quinn=warn,quinn_proto=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub(super) fn write_config(dir: &Path, config: &Config) -> PathBuf {
        let path = dir.join(format!("{}.toml", config.name));
        std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
        path
    }

    pub(super) async fn ask(config: &Config, req: Request) -> Option<Response> {
        node::control::request(&config.control_socket(), &req).await.ok()
    }

    pub(super) async fn wait_until<F: std::future::Future<Output = bool>>(
        what: &str,
        secs: u64,
        mut f: impl FnMut() -> F,
    ) {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// One node per tier, each the parent of the next, imaging experts at the city;
    /// configs with fixed loopback ports, written to `dir`, ready to spawn.
    pub(super) fn seven_tier_configs(dir: &Path) -> (Vec<Config>, Vec<PathBuf>, Vec<PathBuf>) {
        let names = [
            ("hub.telemed.int", Tier::International),
            ("nhc.cn", Tier::National),
            ("hub.henan.cn", Tier::Provincial),
            ("zhengzhou.henan.cn", Tier::City),
            ("dengfeng.zhengzhou.henan.cn", Tier::County),
            ("gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Township),
            ("v01.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village),
        ];
        let plan: Vec<PlannedNode> = names
            .iter()
            .enumerate()
            .map(|(i, (name, tier))| PlannedNode {
                name: (*name).into(),
                tier: *tier,
                parent: (i > 0).then(|| names[i - 1].0.to_owned()),
                experts: if *tier == Tier::City { vec![(Modality::Imaging, 2)] } else { vec![] },
            })
            .collect();
        let mut configs = provision(dir, &plan).unwrap();
        let ports: Vec<u16> = configs.iter().map(|_| free_port()).collect();
        for i in 0..configs.len() {
            configs[i].listen = format!("127.0.0.1:{}", ports[i]).parse().unwrap();
            if i > 0 {
                configs[i].parents = vec![ParentConfig {
                    name: configs[i - 1].name.clone(),
                    tier: configs[i - 1].tier,
                    addr: configs[i - 1].listen,
                }];
            }
        }
        let paths = configs.iter().map(|c| write_config(dir, c)).collect();
        let logs = configs.iter().map(|c| dir.join(format!("{}.log", c.name))).collect();
        (configs, paths, logs)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seven_real_nodes_deliver_reports_and_survive_kill_9_of_a_middle_node() {
        let tmp = tempfile::tempdir().unwrap();
        let (configs, paths, logs) = seven_tier_configs(tmp.path());
        let mut procs = Procs(Vec::new());
        for i in 0..configs.len() {
            procs.0.push((configs[i].name.clone(), spawn(&paths[i], &logs[i])));
        }
        for c in &configs {
            wait_until("control sockets", 60, || async { ask(c, Request::Status).await.is_some() }).await;
        }
        let village = &configs[6];
        let township = &configs[5];
        let t0 = Instant::now();

        // A large study (kept as one attachment) so the kill lands mid-transfer, and a
        // real small CT.
        let big = tmp.path().join("study.bin");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&big).unwrap();
            let mut x: u64 = 0x9E3779B97F4A7C15;
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..48 {
                for b in buf.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                f.write_all(&buf).unwrap();
            }
        }
        let ct = node::demo::testdata_dir().join("CT_small.dcm");
        let mut ids = Vec::new();
        for (file, urgency) in [(&big, federation_proto::Urgency::Routine), (&ct, federation_proto::Urgency::Urgent)] {
            let req = node::daemon::SubmitRequest {
                study: None,
                files: vec![file.clone()],
                modality: Modality::Imaging,
                urgency,
                question: "test".into(),
                patient: "p-1".into(),
                task: None,
                details: Default::default(),
            };
            match ask(village, Request::Submit(req)).await.unwrap() {
                Response::Submitted { case_id } => ids.push(case_id),
                other => panic!("{other:?}"),
            }
        }

        // Kill the township with SIGKILL while the large study is half-way into it.
        let partial = township.blob_dir().join("partial");
        wait_until("the township receiving the study", 60, || async {
            std::fs::read_dir(&partial)
                .map(|d| d.flatten().any(|e| e.metadata().map(|m| m.len() > 1 << 20).unwrap_or(false)))
                .unwrap_or(false)
        })
        .await;
        eprintln!("{:?}: killing the township mid-transfer", t0.elapsed());
        let (_, child) = &mut procs.0[5];
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let partial_before: u64 =
            std::fs::read_dir(&partial).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
        assert!(partial_before > 0 && partial_before < 48 << 20, "killed mid-transfer ({partial_before} bytes in)");
        tokio::time::sleep(Duration::from_millis(500)).await;
        procs.0[5].1 = spawn(&paths[5], &logs[5]);

        for id in &ids {
            wait_until("every report back at the village", 120, || async {
                matches!(ask(village, Request::Show { case_id: id.clone() }).await, Some(Response::Case(v)) if v.report.is_some())
            })
            .await;
        }
        eprintln!("{:?}: every report is back at the village", t0.elapsed());
        if let Ok(dir) = std::env::var("TELEMED_TEST_KEEP_LOGS") {
            for l in &logs {
                let _ = std::fs::copy(l, Path::new(&dir).join(l.file_name().unwrap()));
            }
        }
        for id in &ids {
            let Some(Response::Case(v)) = ask(village, Request::Show { case_id: id.clone() }).await else { panic!() };
            let report = v.report.as_ref().unwrap();
            assert_eq!(report.node, "zhengzhou.henan.cn", "read at the city, the first tier with imaging experts");
            assert_eq!(v.trail.len(), 3, "village→township→county→city: {:#?}", v.trail);
        }
        // The client commands, as an operator runs them.
        let cli = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_telemed-node")).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let village_toml = paths[6].to_str().unwrap();
        let shown = cli(&["show", "--config", village_toml, &ids[1]]);
        assert!(shown.contains("report by expert dr.zhengzhou at zhengzhou.henan.cn (city)"), "{shown}");
        assert!(shown.contains("(village) → gaocheng.dengfeng.zhengzhou.henan.cn (township)"), "{shown}");
        let status = cli(&["status", "--config", village_toml]);
        assert!(status.contains(&ids[0]) && status.contains("read by expert dr.zhengzhou"), "{status}");

        // Stop everything, then check each store: exactly one report per case everywhere,
        // and every audit chain verifies.
        drop(procs);
        let offline = cli(&["status", "--config", village_toml]);
        assert!(offline.contains("node NOT RUNNING") && offline.contains(&ids[0]), "{offline}");
        for c in &configs {
            let store = node::store::SqliteStore::open_read_only(&c.db_path()).await.unwrap();
            store.verify_audit_chain().await.unwrap_or_else(|e| panic!("{}: {e}", c.name));
            let tail = store.audit_tail(10_000).await.unwrap();
            for id in &ids {
                let signed = tail
                    .iter()
                    .filter(|r| {
                        r.kind == "report.signed" && r.case.map(|c| c.to_string()).as_deref() == Some(id.as_str())
                    })
                    .count();
                let expected = usize::from(c.name == "zhengzhou.henan.cn");
                assert_eq!(signed, expected, "{}: case {id} signed {signed} times", c.name);
            }
            if c.name == village.name {
                for id in &ids {
                    let at_origin = tail
                        .iter()
                        .filter(|r| {
                            r.kind == "report.at_origin"
                                && r.case.map(|c| c.to_string()).as_deref() == Some(id.as_str())
                        })
                        .count();
                    assert_eq!(at_origin, 1, "case {id} reported to the clinic exactly once");
                }
            }
        }
    }
}

// --- a running node refuses bad peer input and keeps working --------------------------

mod bad_peer_input {
    use super::{init_logs, logged};
    use certs::keys::NodeCredentials;
    use certs::verify::TrustStore;
    use federation_proto::*;
    use node::demo::{PlannedNode, provision};
    use node::loadgen::PlayedChild;
    use std::sync::Arc;
    use std::time::Duration;

    const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
    const VILLAGE: &str = "v1.gaocheng.dengfeng.zhengzhou.henan.cn";

    /// Starts a county node in-process and links a village (played by the test) to it.
    async fn setup(dir: &std::path::Path) -> (node::daemon::Running, PlayedChild) {
        let plan = vec![
            PlannedNode { name: COUNTY.into(), tier: Tier::County, parent: None, experts: vec![(Modality::Ecg, 1)] },
            PlannedNode { name: VILLAGE.into(), tier: Tier::Village, parent: Some(COUNTY.into()), experts: vec![] },
        ];
        let configs = provision(dir, &plan).unwrap();
        let mut county_config = configs[0].clone();
        county_config.simulated_experts = None;
        let county = node::daemon::start(county_config).await.unwrap();
        let v = &configs[1];
        let creds = NodeCredentials::load(&v.tls.chain, &v.tls.key).unwrap();
        let trust = Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&v.tls.root).unwrap()).unwrap());
        let child = PlayedChild::connect(&creds, VILLAGE.into(), Tier::Village, trust, COUNTY.into(), county.addr)
            .await
            .unwrap();
        (county, child)
    }

    async fn next_answer(child: &PlayedChild) -> Message {
        child.next_answer(Duration::from_secs(10)).await.expect("an answer from the node")
    }

    #[tokio::test]
    async fn bad_frames_signatures_and_receipts_are_refused_and_good_cases_still_pass() {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let ecg = Arc::new(std::fs::read(node::demo::testdata_dir().join("waveform_ecg.dcm")).unwrap());
        let (county, child) = setup(dir.path()).await;

        // 1. An oversize frame: refused on the same stream, before the payload is read.
        let (mut s, mut r) = child.link.connection.open_bi().await.unwrap();
        s.write_all(&(8u32 * 1024 * 1024).to_be_bytes()).await.unwrap();
        s.write_all(&[0u8; 1024]).await.unwrap();
        let answer =
            tokio::time::timeout(Duration::from_secs(10), node::transport::read_frame(&mut r)).await.unwrap().unwrap();
        assert!(
            matches!(&answer, Message::Reject(Reject { code: RejectCode::Malformed, detail, .. }) if detail.contains("exceeds the 1048576-byte limit")),
            "{answer:?}"
        );

        // 2. A manifest whose signature does not verify.
        let mut bad = child.make_offer(CaseId([1; 16]), Modality::Ecg, Urgency::Urgent, ecg.clone());
        let mut bytes = bad.manifest.as_bytes().to_vec();
        let n = bytes.len();
        bytes[n - 80] ^= 0x20;
        bad.manifest = SignedEnvelope::from_bytes(bytes);
        child.send(&Message::CaseOffer(bad)).await.unwrap();
        let answer = next_answer(&child).await;
        assert!(
            matches!(&answer, Message::Reject(Reject { code: RejectCode::BadSignature | RejectCode::Malformed, .. })),
            "{answer:?}"
        );

        // 3. A custody receipt for a case the node never sent.
        let receipt = CustodyReceipt {
            case_id: CaseId([2; 16]),
            receiver: VILLAGE.into(),
            from: COUNTY.into(),
            manifest_hash: ContentHash::of(b"x"),
            attachments: vec![],
            at: node::view::now(),
        };
        let env = SignedEnvelope::sign(child.signing_key(), content_type::CUSTODY_RECEIPT, &receipt).unwrap();
        child.send(&Message::CustodyReceipt(env)).await.unwrap();
        let answer = next_answer(&child).await;
        assert!(matches!(&answer, Message::Reject(Reject { code: RejectCode::UnknownCase, .. })), "{answer:?}");
        assert!(logged("receipt for an unknown case").await);

        // 4. Nothing was stored for the bad input, and a good case still goes through:
        // accepted, attachment fetched and hash-checked, then a signed custody receipt.
        let good_id = CaseId([3; 16]);
        let offer = child.make_offer(good_id, Modality::Ecg, Urgency::Urgent, ecg.clone());
        assert!(
            child.offer_until_receipt(offer, Duration::from_secs(20)).await.is_some(),
            "custody receipt for the good case"
        );
        let status = county.status().await.unwrap();
        let ids: Vec<&str> = status.cases.iter().map(|c| c.case_id.as_str()).collect();
        assert_eq!(ids, vec![good_id.to_string().as_str()], "only the good case is held");
        county.shutdown().await.unwrap();
    }
}

// --- offline first: a village with no parent for a while ------------------------------

mod offline_first {
    use federation_proto::{Modality, Tier, Urgency};
    use node::config::ParentConfig;
    use node::daemon::SubmitRequest;
    use node::demo::{PlannedNode, provision};
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn case_submitted_while_the_parent_is_unreachable_is_delivered_once_after_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let township = "gaocheng.dengfeng.zhengzhou.henan.cn";
        let plan = vec![
            PlannedNode {
                name: township.into(),
                tier: Tier::Township,
                parent: None,
                experts: vec![(Modality::Ecg, 1)],
            },
            PlannedNode {
                name: format!("v1.{township}"),
                tier: Tier::Village,
                parent: Some(township.into()),
                experts: vec![],
            },
        ];
        let mut configs = provision(dir.path(), &plan).unwrap();
        // The parent's address is reserved but nothing listens there yet.
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let parent_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        configs[0].listen = parent_addr;
        configs[1].parents = vec![ParentConfig { name: township.into(), tier: Tier::Township, addr: parent_addr }];
        let village = node::daemon::start(configs[1].clone()).await.unwrap();

        let req = SubmitRequest {
            study: None,
            files: vec![node::demo::testdata_dir().join("waveform_ecg.dcm")],
            modality: Modality::Ecg,
            urgency: Urgency::Stat,
            question: "palpitations".into(),
            patient: "p-9".into(),
            task: None,
            details: Default::default(),
        };
        let id = village.submit(req).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = village.status().await.unwrap();
        let line = status.cases.iter().find(|c| c.case_id == id.to_string()).unwrap();
        assert_eq!(line.status, "forwarding", "{line:?}");
        assert!(
            line.where_.contains(&format!("waiting to hand over to {township}")),
            "status says what is waiting: {line:?}"
        );
        assert!(status.links.is_empty());

        // The parent comes up: the queued case goes out and the report comes back.
        let parent = node::daemon::start(configs[0].clone()).await.unwrap();
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let v = village.show(id).await.unwrap().unwrap();
            if v.report.is_some() {
                break;
            }
            assert!(Instant::now() < end, "no report after the parent started: {v:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let held = parent.status().await.unwrap().cases;
        assert_eq!(held.len(), 1, "exactly one copy at the parent");
        assert_eq!(parent.metrics.reports_signed.load(std::sync::atomic::Ordering::Relaxed), 1, "read once");
        assert_eq!(village.metrics.reports_at_origin.load(std::sync::atomic::Ordering::Relaxed), 1, "reported once");
        village.shutdown().await.unwrap();
        parent.shutdown().await.unwrap();
    }
}

// --- a DICOM device pushes a study; the clinician submits it as a case ---------------

mod device_ingest {
    use federation_proto::{Modality, Tier, Urgency};
    use node::config::DicomConfig;
    use node::daemon::SubmitRequest;
    use node::demo::{PlannedNode, provision};
    use std::process::Command;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn study_pushed_by_storescu_becomes_a_case_when_the_clinician_submits_it() {
        let dir = tempfile::tempdir().unwrap();
        let plan = vec![PlannedNode {
            name: "v1.gaocheng.dengfeng.zhengzhou.henan.cn".into(),
            tier: Tier::Village,
            parent: None,
            experts: vec![],
        }];
        let mut config = provision(dir.path(), &plan).unwrap().remove(0);
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        config.dicom = Some(DicomConfig {
            ae_title: "TELEMED".into(),
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            allowed_callers: vec!["ECGCART1".into()],
            max_instance_bytes: 64 * 1024 * 1024,
        });
        let village = node::daemon::start(config).await.unwrap();

        // A standard SCU (dcmtk's storescu) pushes a real 12-lead ECG.
        let ecg = node::demo::testdata_dir().join("waveform_ecg.dcm");
        let out = Command::new("storescu")
            .args(["-aet", "ECGCART1", "-aec", "TELEMED", "127.0.0.1", &port.to_string()])
            .arg(&ecg)
            .output()
            .expect("storescu from dcmtk is needed for this test: apt-get install -y dcmtk");
        assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));

        let studies = village.studies().await.unwrap().unwrap();
        assert_eq!(studies.len(), 1, "{studies:?}");
        assert_eq!(studies[0].instances, 1);
        assert_eq!(studies[0].modality, "ECG");
        // Nothing becomes a case by itself.
        assert!(village.status().await.unwrap().cases.is_empty());

        let req = SubmitRequest {
            files: vec![],
            study: Some(studies[0].study_uid.clone()),
            modality: Modality::Ecg,
            urgency: Urgency::Stat,
            question: "palpitations".into(),
            patient: "p-12".into(),
            task: None,
            details: Default::default(),
        };
        let id = village.submit(req).await.unwrap().unwrap();
        let view = village.show(id).await.unwrap().unwrap();
        assert_eq!(view.attachments.len(), 1);
        assert_eq!(view.attachments[0].2, "application/dicom");
        assert!(village.studies().await.unwrap().unwrap().is_empty(), "a submitted study leaves the device list");
        tokio::time::sleep(Duration::from_millis(50)).await;
        village.shutdown().await.unwrap();
    }
}

// --- adversarial peers: what a hostile or broken child can do to a running node -----

mod adversarial {
    //! Each test starts a real county node in-process, links children played by the test
    //! (`node::loadgen::PlayedChild`, real certificates), attacks, and then checks that
    //! the node still takes a good case (signed custody receipt) and holds only the good
    //! cases. A tampered chunk is covered by the unit tests in `node/src/transfer.rs`
    //! (`fetch_refuses_a_chunk_that_does_not_match_its_hash` and neighbours).
    use super::{init_logs, logged};
    use certs::keys::NodeCredentials;
    use certs::verify::TrustStore;
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    use federation_proto::*;
    use node::config::{Config, SimulatedExperts};
    use node::demo::{PlannedNode, provision};
    use node::loadgen::PlayedChild;
    use node::transport::{STREAMS_PER_PEER_MAX, TransportError};
    use std::sync::Arc;
    use std::time::Duration;

    const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
    const V1: &str = "v1.gaocheng.dengfeng.zhengzhou.henan.cn";
    const V2: &str = "v2.gaocheng.dengfeng.zhengzhou.henan.cn";
    const SIBLING_COUNTY: &str = "xinmi.zhengzhou.henan.cn";
    const CITY: &str = "zhengzhou.henan.cn";
    const WAIT: Duration = Duration::from_secs(20);

    struct Federation {
        county: node::daemon::Running,
        configs: Vec<Config>,
        trust: Arc<TrustStore>,
        ecg: Arc<Vec<u8>>,
        _dir: tempfile::TempDir,
    }

    impl Federation {
        /// A county node (with fast simulated experts if `reads`, so cases get reports;
        /// otherwise it only holds them) and certificates for two villages, a sibling
        /// county and the city above it.
        async fn start(reads: bool) -> Federation {
            init_logs();
            let dir = tempfile::tempdir().unwrap();
            let node = |name: &str, tier, parent: Option<&str>| PlannedNode {
                name: name.into(),
                tier,
                parent: parent.map(Into::into),
                experts: if tier == Tier::County { vec![(Modality::Ecg, 1)] } else { vec![] },
            };
            let plan = vec![
                node(COUNTY, Tier::County, None),
                node(V1, Tier::Village, Some(COUNTY)),
                node(V2, Tier::Village, Some(COUNTY)),
                node(SIBLING_COUNTY, Tier::County, None),
                node(CITY, Tier::City, None),
            ];
            let configs = provision(dir.path(), &plan).unwrap();
            let mut county_config = configs[0].clone();
            county_config.simulated_experts =
                reads.then(|| SimulatedExperts { name: "dr.fast".into(), claim_after_ms: 50, read_ms: 100 });
            let county = node::daemon::start(county_config).await.unwrap();
            let trust =
                Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&configs[1].tls.root).unwrap()).unwrap());
            let ecg = Arc::new(std::fs::read(node::demo::testdata_dir().join("waveform_ecg.dcm")).unwrap());
            Federation { county, configs, trust, ecg, _dir: dir }
        }

        fn config(&self, name: &str) -> &Config {
            self.configs.iter().find(|c| c.name == name).unwrap()
        }

        /// Links `name` to the county as a child claiming `tier`.
        async fn connect_as(&self, name: &str, tier: Tier) -> Result<PlayedChild, TransportError> {
            let c = self.config(name);
            let creds = NodeCredentials::load(&c.tls.chain, &c.tls.key).unwrap();
            PlayedChild::connect(&creds, name.into(), tier, self.trust.clone(), COUNTY.into(), self.county.addr).await
        }

        async fn child(&self, name: &str) -> PlayedChild {
            self.connect_as(name, Tier::Village).await.unwrap()
        }

        /// The signing key of a provisioned node (to forge with).
        fn key_of(&self, name: &str) -> SigningKey {
            let c = self.config(name);
            let creds = NodeCredentials::load(&c.tls.chain, &c.tls.key).unwrap();
            SigningKey::from_pkcs8_der(creds.key.secret_der()).unwrap()
        }

        /// Offers a good case from `child` and requires its custody receipt.
        async fn good_case(&self, child: &PlayedChild, id: CaseId) {
            let offer = child.make_offer(id, Modality::Ecg, Urgency::Urgent, self.ecg.clone());
            assert!(child.offer_until_receipt(offer, WAIT).await.is_some(), "custody receipt for good case {id}");
        }

        /// The case ids the county holds, sorted.
        async fn held(&self) -> Vec<String> {
            let mut ids: Vec<String> =
                self.county.status().await.unwrap().cases.into_iter().map(|c| c.case_id).collect();
            ids.sort();
            ids
        }

        async fn assert_holds_only(&self, good: &[CaseId]) {
            let mut want: Vec<String> = good.iter().map(|id| id.to_string()).collect();
            want.sort();
            assert_eq!(self.held().await, want, "the node holds the good cases and nothing else");
        }
    }

    /// Waits for the node's `Reject` with one of `codes`, skipping other answers.
    async fn rejected(child: &PlayedChild, codes: &[RejectCode]) -> Reject {
        let msg =
            child.wait_for(WAIT, |m| matches!(m, Message::Reject(_))).await.expect("the node answers with a Reject");
        let Message::Reject(r) = msg else { unreachable!() };
        assert!(codes.contains(&r.code), "expected one of {codes:?}, got {r:?}");
        r
    }

    fn id(n: u8) -> CaseId {
        CaseId([n; 16])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_truncated_frames_are_refused_on_their_stream() {
        let fed = Federation::start(false).await;
        let v1 = fed.child(V1).await;
        let refusal = |mut r: quinn::RecvStream| async move {
            let msg = tokio::time::timeout(WAIT, node::transport::read_frame(&mut r)).await.unwrap().unwrap();
            let Message::Reject(r) = msg else { panic!("expected a Reject, got {msg:?}") };
            assert_eq!(r.code, RejectCode::Malformed, "{r:?}");
            r.detail
        };
        // A frame of the right length whose payload is not a message.
        let mut junk = 16u32.to_be_bytes().to_vec();
        junk.extend_from_slice(&[0xff; 16]);
        refusal(v1.send_raw(&junk).await.unwrap()).await;
        // A valid message under a header announcing more bytes than the stream carries.
        let mut frame = encode_frame(&Message::AlreadyHave(AlreadyHave { case_id: id(9) })).unwrap();
        frame[3] += 10;
        refusal(v1.send_raw(&frame).await.unwrap()).await;
        // Half a header.
        refusal(v1.send_raw(&[0, 0]).await.unwrap()).await;
        // A message only the transport may send (a hello after the hello).
        let hello = Message::Hello(Hello {
            protocol_version: 1,
            protocol_version_min: 1,
            node: NodeClaim {
                name: V1.into(),
                tier: Tier::Village,
                public_key: PublicKey(fed.key_of(V1).verifying_key().to_bytes()),
            },
            software: String::new(),
        });
        v1.send(&hello).await.unwrap();
        rejected(&v1, &[RejectCode::Malformed]).await;
        assert!(logged("bad frame refused").await);

        fed.good_case(&v1, id(1)).await;
        fed.assert_holds_only(&[id(1)]).await;
        fed.county.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_streams_do_not_starve_an_honest_child_and_are_reset_after_the_frame_timeout() {
        let fed = Federation::start(false).await;
        let attacker = fed.child(V1).await;
        let honest = fed.child(V2).await;

        // Slowloris: every stream the node allows, each with half a frame header and
        // then nothing.
        // (Open until the node grants no more: the hello's stream may still count.)
        let mut idle = Vec::new();
        while let Ok(opened) = tokio::time::timeout(Duration::from_secs(1), attacker.link.connection.open_bi()).await {
            let (mut s, r) = opened.unwrap();
            s.write_all(&[0, 0]).await.unwrap();
            idle.push((s, r));
            assert!(idle.len() <= STREAMS_PER_PEER_MAX as usize, "a stream beyond STREAMS_PER_PEER_MAX opened");
        }
        assert!(idle.len() >= STREAMS_PER_PEER_MAX as usize - 1, "only {} streams opened", idle.len());
        // Meanwhile an honest child is served in full.
        let started = std::time::Instant::now();
        fed.good_case(&honest, id(1)).await;
        assert!(started.elapsed() < node::daemon::FRAME_READ_TIMEOUT, "served while the idle streams were open");

        // After the frame-read timeout the node resets every idle stream...
        let deadline = tokio::time::Instant::now() + node::daemon::FRAME_READ_TIMEOUT + Duration::from_secs(10);
        let n = idle.len();
        for (i, (s, mut r)) in idle.into_iter().enumerate() {
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout_at(deadline, r.read(&mut buf)).await.expect("idle stream reset in time");
            assert!(read.is_err(), "idle stream {i} ended by a reset, got {read:?}");
            drop(s);
        }
        eprintln!("slowloris: {n} idle streams, all reset after {:?}", started.elapsed());
        assert!(logged("without a whole frame; dropped").await);
        // ...which gives the stream budget back: the same child's good case goes through.
        let again = tokio::time::timeout(WAIT, fed.good_case(&attacker, id(2))).await;
        assert!(again.is_ok(), "no stream for the attacker's own good case after the resets");
        fed.assert_holds_only(&[id(1), id(2)]).await;
        fed.county.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replayed_receipts_and_reports_change_nothing() {
        let fed = Federation::start(true).await;
        let v1 = fed.child(V1).await;
        let v2 = fed.child(V2).await;

        // Case 1 goes up and is read; v1 keeps the node's custody receipt and report.
        let offer = v1.make_offer(id(1), Modality::Ecg, Urgency::Urgent, fed.ecg.clone());
        v1.send(&Message::CaseOffer(offer)).await.unwrap();
        let Some(Message::CustodyReceipt(custody)) =
            v1.wait_for(WAIT, |m| matches!(m, Message::CustodyReceipt(_))).await
        else {
            panic!("no custody receipt")
        };
        let Some(Message::ReportDelivery(delivery)) =
            v1.wait_for(WAIT, |m| matches!(m, Message::ReportDelivery(_))).await
        else {
            panic!("no report for case 1")
        };
        let ack = ReportReceipt {
            case_id: id(1),
            receiver: V1.into(),
            report_hash: delivery.report.hash(),
            at: node::view::now(),
        };
        let ack = SignedEnvelope::sign(v1.signing_key(), content_type::REPORT_RECEIPT, &ack).unwrap();
        v1.send(&Message::ReportReceipt(ack.clone())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = fed.county.show(id(1)).await.unwrap().unwrap();
        let metrics = |f: &node::daemon::Running| {
            (
                f.metrics.custody_taken.load(std::sync::atomic::Ordering::Relaxed),
                f.metrics.reports_signed.load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        let counts = metrics(&fed.county);

        // 1. The node's own custody receipt played back to it: not signed by the sender.
        v1.send(&Message::CustodyReceipt(custody.clone())).await.unwrap();
        rejected(&v1, &[RejectCode::BadSignature, RejectCode::UnknownCase]).await;
        // 2. The report receipt again, and again from another child.
        v1.send(&Message::ReportReceipt(ack.clone())).await.unwrap();
        v2.send(&Message::ReportReceipt(ack.clone())).await.unwrap();
        rejected(&v2, &[RejectCode::BadSignature]).await;
        // 3. The node's report delivered back up to it.
        v1.send(&Message::ReportDelivery(delivery.clone())).await.unwrap();
        rejected(&v1, &[RejectCode::NotCustodian]).await;
        // 4. The case offered again (same bytes): idempotent, no second copy.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = fed.county.show(id(1)).await.unwrap().unwrap();
        assert_eq!(
            (after.status.as_str(), after.report.is_some(), after.trail.len()),
            (before.status.as_str(), before.report.is_some(), before.trail.len()),
            "replays changed case 1"
        );
        assert_eq!(metrics(&fed.county), counts, "no new custody or report from replays");

        fed.good_case(&v2, id(3)).await;
        fed.assert_holds_only(&[id(1), id(3)]).await;
        fed.county.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replayed_recalls_change_nothing() {
        let fed = Federation::start(false).await;
        let v1 = fed.child(V1).await;
        let v2 = fed.child(V2).await;
        // Case 2 is recalled by its origin; the recall replayed, replayed by
        // another child, and a recall for a case the node never saw.
        let offer2 = v1.make_offer(id(2), Modality::Ecg, Urgency::Urgent, fed.ecg.clone());
        assert!(v1.offer_until_receipt(offer2.clone(), WAIT).await.is_some(), "custody receipt for case 2");
        let recall = Recall { case_id: id(2), origin: V1.into(), reason: "duplicate".into(), at: node::view::now() };
        let recall = SignedEnvelope::sign(v1.signing_key(), content_type::RECALL, &recall).unwrap();
        v1.send(&Message::Recall(recall.clone())).await.unwrap();
        let recalled = async {
            for _ in 0..100 {
                if fed.county.show(id(2)).await.unwrap().unwrap().status.contains("recalled") {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        assert!(recalled.await, "{:?}", fed.county.show(id(2)).await.unwrap().unwrap().status);
        let recalled_view = fed.county.show(id(2)).await.unwrap().unwrap();
        v1.send(&Message::Recall(recall.clone())).await.unwrap();
        v2.send(&Message::Recall(recall.clone())).await.unwrap();
        rejected(&v2, &[RejectCode::NotCustodian]).await;
        let unknown = Recall { case_id: id(7), origin: V1.into(), reason: "x".into(), at: node::view::now() };
        let unknown = SignedEnvelope::sign(v1.signing_key(), content_type::RECALL, &unknown).unwrap();
        v1.send(&Message::Recall(unknown)).await.unwrap();
        rejected(&v1, &[RejectCode::UnknownCase]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = fed.county.show(id(2)).await.unwrap().unwrap();
        assert_eq!((again.status, again.updated_at_ms), (recalled_view.status, recalled_view.updated_at_ms));
        // A recalled case offered again is refused, not revived.
        v1.send(&Message::CaseOffer(offer2)).await.unwrap();
        rejected(&v1, &[RejectCode::Recalled]).await;

        fed.good_case(&v2, id(3)).await;
        fed.assert_holds_only(&[id(2), id(3)]).await;
        fed.county.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offers_signed_by_another_node_or_naming_another_receiver_are_refused() {
        let fed = Federation::start(false).await;
        let v1 = fed.child(V1).await;
        let other = fed.key_of(V2);
        let offer = |n: u8, tamper: &dyn Fn(&mut node::loadgen::OfferParts)| {
            v1.make_offer_with(id(n), Modality::Ecg, Urgency::Urgent, fed.ecg.clone(), |p| tamper(p))
        };
        let attacks: Vec<(&str, CaseOffer, &[RejectCode])> = vec![
            (
                "hop signed by another node",
                offer(10, &|p| p.hop_key = other.clone()),
                &[RejectCode::Malformed, RejectCode::BadSignature],
            ),
            (
                "manifest of this origin signed by another node",
                offer(11, &|p| p.manifest_key = other.clone()),
                &[RejectCode::BadSignature],
            ),
            ("hop naming another receiver", offer(12, &|p| p.hop.to = SIBLING_COUNTY.into()), &[RejectCode::Malformed]),
            (
                "hop from another node, signed by it",
                offer(13, &|p| {
                    p.hop.from = V2.into();
                    p.hop_key = other.clone();
                }),
                &[RejectCode::Malformed],
            ),
            ("hop for another case", offer(14, &|p| p.hop.case_id = id(99)), &[RejectCode::Malformed]),
        ];
        for (what, offer, codes) in attacks {
            v1.send(&Message::CaseOffer(offer)).await.unwrap();
            let r = rejected(&v1, codes).await;
            eprintln!("{what}: refused {:?} ({})", r.code, r.detail);
        }
        fed.good_case(&v1, id(1)).await;
        fed.assert_holds_only(&[id(1)]).await;
        fed.county.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parent_or_sibling_connecting_as_a_child_is_refused_at_hello() {
        let fed = Federation::start(false).await;
        for (name, tier) in [(SIBLING_COUNTY, Tier::County), (CITY, Tier::City)] {
            match fed.connect_as(name, tier).await {
                Err(TransportError::Refused { code, detail, .. }) => {
                    assert_eq!(code, RejectCode::WrongDirection, "{name}: {detail}")
                }
                Err(e) => panic!("{name}: refused for the wrong reason: {e}"),
                Ok(_) => panic!("{name} ({tier}) linked as a child of a county"),
            }
        }
        // A village claiming in its hello to be a higher tier than its certificate says.
        match fed.connect_as(V1, Tier::County).await {
            Err(TransportError::Refused { code, .. }) => assert_eq!(code, RejectCode::IdentityMismatch),
            Err(e) => panic!("refused for the wrong reason: {e}"),
            Ok(_) => panic!("a village claiming county tier linked"),
        }
        assert!(logged("link refused").await);
        let v1 = fed.child(V1).await;
        fed.good_case(&v1, id(1)).await;
        fed.assert_holds_only(&[id(1)]).await;
        fed.county.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_for_a_case_the_node_never_sent_is_refused() {
        let fed = Federation::start(false).await;
        let v1 = fed.child(V1).await;
        fed.good_case(&v1, id(1)).await;
        let forged = |case: CaseId| {
            let report = Report {
                case_id: case,
                node: V1.into(),
                tier: Tier::Village,
                reader: Reader::Model { model: "forged".into(), version: "0".into() },
                machine_made: true,
                labels: vec![],
                fields: vec![],
                text: "normal".into(),
                signed_at: node::view::now(),
            };
            let report = SignedEnvelope::sign(v1.signing_key(), content_type::REPORT, &report).unwrap();
            Message::ReportDelivery(ReportDelivery { case_id: case, report, trail: vec![], findings: vec![] })
        };
        // For a case the node never heard of.
        v1.send(&forged(id(5))).await.unwrap();
        rejected(&v1, &[RejectCode::UnknownCase]).await;
        // For a case the node holds but never sent to this child (the child sent it up).
        v1.send(&forged(id(1))).await.unwrap();
        rejected(&v1, &[RejectCode::NotCustodian]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(fed.county.show(id(1)).await.unwrap().unwrap().report.is_none(), "forged report stored");
        assert_eq!(fed.county.metrics.reports_at_origin.load(std::sync::atomic::Ordering::Relaxed), 0);

        fed.good_case(&v1, id(2)).await;
        fed.assert_holds_only(&[id(1), id(2)]).await;
        fed.county.shutdown().await.unwrap();
    }
}

#[path = "node/store_suite.rs"]
mod store_suite;

#[path = "node/privacy.rs"]
mod privacy;

#[path = "node/deid_tools.rs"]
mod deid_tools;

#[path = "node/fhir_api.rs"]
mod fhir_api;

#[path = "node/photo_scrub.rs"]
mod photo_scrub;

#[path = "node/fhir_oauth.rs"]
mod fhir_oauth;

#[path = "node/shutdown.rs"]
mod shutdown;

#[path = "node/atna.rs"]
mod atna;
