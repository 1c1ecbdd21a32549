//! The federation PKI end to end, with real certificates: issuing, verification,
//! revocation, forged certificates built directly with rcgen, in-memory mutual-TLS
//! handshakes through the rustls verifiers, and the `telemed-ca` binary itself.

use certs::ca::{CertificateAuthority, IntermediateOptions, RevokeReason, RootOptions, Validity};
use certs::keys::NodeCredentials;
use certs::profile::{self, CertSummary, Serial};
use certs::verify::{FederationVerifier, PeerIdentity, TrustStore, VerifyError, check_parent_link};
use certs::{CaError, enrol};
use federation_proto::{NodeName, Tier};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use time::OffsetDateTime;

const VILLAGE: &str = "v017.gaocheng.dengfeng.zhengzhou.henan.cn";
const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";

// --- fixtures ----------------------------------------------------------------------

/// root `cn` → national CA (region `cn`) → provincial CA (region `henan.cn`).
struct Federation {
    dir: tempfile::TempDir,
    root: CertificateAuthority,
    national: CertificateAuthority,
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
    Federation { dir, root, national, henan, trust }
}

/// A node enrolled the normal way: its own key and CSR, signed by `ca`.
struct Node {
    key_pem: String,
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
    serial: Serial,
}

impl Node {
    fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
    fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain[1..]
    }
}

fn enrol_node(ca: &mut CertificateAuthority, name: &str, tier: Tier, validity: Validity) -> Node {
    let (key_pem, csr_pem) = enrol::generate_key_and_csr(&NodeName::from(name), tier).unwrap();
    let issued = ca.sign_csr(&csr_pem, tier, validity).unwrap();
    Node {
        key_pem,
        chain: profile::pem_certificates(&issued.chain_pem).unwrap(),
        chain_pem: issued.chain_pem,
        serial: issued.serial,
    }
}

fn enrol(ca: &mut CertificateAuthority, name: &str, tier: Tier) -> Node {
    enrol_node(ca, name, tier, Validity::Days(30))
}

fn now() -> UnixTime {
    UnixTime::now()
}

/// The CA's chain without the root, as a node issued by it presents it.
fn intermediates_of(ca: &CertificateAuthority) -> Vec<CertificateDer<'static>> {
    let chain = profile::pem_certificates(&std::fs::read_to_string(ca.dir().join("chain.pem")).unwrap()).unwrap();
    chain[..chain.len() - 1].to_vec()
}

/// Signs whatever `params` say with `ca`'s key, bypassing every check of the CA code:
/// what an attacker holding (or a buggy tool using) an intermediate key could make.
fn forge(
    ca: &CertificateAuthority,
    params: &rcgen::CertificateParams,
    key: &rcgen::KeyPair,
) -> CertificateDer<'static> {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.dir().join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.certificate(), &ca_key).unwrap();
    params.signed_by(key, &issuer).unwrap().der().clone()
}

fn forged_node_params(name: &str, tier: Tier) -> rcgen::CertificateParams {
    let now = OffsetDateTime::now_utc();
    certs::ca::node_params(
        &NodeName::from(name),
        tier,
        &Serial::random().unwrap(),
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap()
}

fn ed25519_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap()
}

fn verify(fed: &Federation, node: &Node) -> Result<PeerIdentity, VerifyError> {
    fed.trust.identity_from_chain(node.leaf(), node.intermediates(), now())
}

// --- verification ------------------------------------------------------------------

#[test]
fn chain_root_national_provincial_node_verifies_and_yields_the_identity() {
    let mut fed = federation();
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    assert_eq!(node.chain.len(), 3, "node, provincial CA, national CA");

    let id = verify(&fed, &node).unwrap();
    assert_eq!(id.name, NodeName::from(VILLAGE));
    assert_eq!(id.tier, Tier::Village);
    assert_eq!(id.region, "gaocheng.dengfeng.zhengzhou.henan.cn");
    assert_eq!(id.serial, node.serial);

    // One key: the certificate's key is the node's signing key and libp2p identity.
    let signing = certs::keys::signing_key_from_pem(&node.key_pem).unwrap();
    assert_eq!(id.public_key.0, signing.verifying_key().to_bytes());
    let mut secret = signing.to_bytes();
    let libp2p = libp2p_identity::Keypair::ed25519_from_bytes(&mut secret).unwrap();
    assert_eq!(id.peer_id, libp2p.public().to_peer_id().to_base58());
    assert!(id.matches_peer_id(&libp2p.public().to_peer_id().to_base58()));
    assert!(id.peer_id.starts_with("12D3KooW"), "{}", id.peer_id);
}

#[test]
fn nodes_issued_at_every_level_verify_with_their_tier() {
    let mut fed = federation();
    let national_hub = enrol(&mut fed.root, "cn", Tier::National);
    let provincial_hub = enrol(&mut fed.national, "henan.cn", Tier::Provincial);
    let county_hub = enrol(&mut fed.henan, COUNTY, Tier::County);
    for (node, tier) in [(national_hub, Tier::National), (provincial_hub, Tier::Provincial), (county_hub, Tier::County)]
    {
        assert_eq!(verify(&fed, &node).unwrap().tier, tier);
    }
}

#[test]
fn certificate_from_another_federation_is_rejected() {
    let fed = federation();
    let mut other = federation(); // same names, different keys
    let stranger = enrol(&mut other.henan, VILLAGE, Tier::Village);
    let err = verify(&fed, &stranger).unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");
    assert!(err.to_string().contains(VILLAGE), "{err}");
}

#[test]
fn self_signed_node_certificate_is_rejected() {
    let fed = federation();
    let key = ed25519_key();
    let cert = forged_node_params(VILLAGE, Tier::Village).self_signed(&key).unwrap();
    let err = fed.trust.identity_from_chain(cert.der(), &[], now()).unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");
}

#[test]
fn chain_without_its_intermediates_is_rejected() {
    let mut fed = federation();
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let err = fed.trust.identity_from_chain(node.leaf(), &[], now()).unwrap_err();
    assert!(matches!(err, VerifyError::UntrustedChain { .. }), "{err}");
}

#[test]
fn expired_and_not_yet_valid_certificates_are_rejected() {
    let mut fed = federation();
    let t = OffsetDateTime::now_utc();
    let expired = enrol_node(
        &mut fed.henan,
        VILLAGE,
        Tier::Village,
        Validity::Window { not_before: t - time::Duration::days(30), not_after: t - time::Duration::days(1) },
    );
    let err = verify(&fed, &expired).unwrap_err();
    assert!(matches!(&err, VerifyError::Expired { subject, .. } if subject == VILLAGE), "{err}");

    let future = enrol_node(
        &mut fed.henan,
        VILLAGE,
        Tier::Village,
        Validity::Window { not_before: t + time::Duration::days(1), not_after: t + time::Duration::days(30) },
    );
    let err = verify(&fed, &future).unwrap_err();
    assert!(matches!(&err, VerifyError::NotYetValid { subject, .. } if subject == VILLAGE), "{err}");

    // A valid node is rejected once time passes its notAfter.
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now().as_secs() + 40 * 86_400));
    let err = fed.trust.identity_from_chain(node.leaf(), node.intermediates(), later).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");
}

#[test]
fn revoked_certificate_is_accepted_before_the_crl_and_rejected_after() {
    let mut fed = federation();
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let sibling = enrol(&mut fed.henan, "v018.gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Village);

    // A CRL that does not list the node changes nothing.
    let first = fed.henan.crl(7).unwrap();
    let info = fed.trust.load_crl(&first).unwrap();
    assert!(info.revoked.is_empty());
    assert!(verify(&fed, &node).is_ok());

    fed.henan.revoke(&node.serial, RevokeReason::KeyCompromise).unwrap();
    assert!(verify(&fed, &node).is_ok(), "revocation takes effect with the CRL, not before");
    let second = fed.henan.crl(7).unwrap();
    let info = fed.trust.load_crl(&second).unwrap();
    assert_eq!(info.revoked, vec![node.serial.clone()]);

    let err = verify(&fed, &node).unwrap_err();
    assert!(matches!(&err, VerifyError::Revoked { subject } if subject == VILLAGE), "{err}");
    assert!(verify(&fed, &sibling).is_ok(), "only the revoked serial is affected");

    // Replaying the older CRL cannot un-revoke the node.
    let err = fed.trust.load_crl(&first).unwrap_err();
    assert!(matches!(err, VerifyError::StaleCrl { .. }), "{err}");
    assert!(verify(&fed, &node).is_err());

    // The CRL set can be replaced at runtime as a whole.
    fed.trust.replace_crls(&[&second]).unwrap();
    assert!(verify(&fed, &node).is_err());
}

#[test]
fn revoking_an_intermediate_rejects_every_node_below_it() {
    let mut fed = federation();
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let national_serial = fed.national.summary().serial.clone();
    fed.root.revoke(&national_serial, RevokeReason::CaCompromise).unwrap();
    fed.trust.load_crl(&fed.root.crl(7).unwrap()).unwrap();
    let err = verify(&fed, &node).unwrap_err();
    assert!(matches!(err, VerifyError::Revoked { .. }), "{err}");
}

#[test]
fn crl_with_a_bad_signature_is_refused_on_load() {
    let mut fed = federation();
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    fed.henan.revoke(&node.serial, RevokeReason::Unspecified).unwrap();
    let pem = fed.henan.crl(7).unwrap();
    let mut sections = profile::pem_sections(&pem).unwrap();
    let crl_der = &mut sections[0].1;
    let last = crl_der.len() - 1;
    crl_der[last] ^= 0x01; // corrupt the signature
    let tampered: String = sections
        .iter()
        .map(|(kind, der)| {
            profile::to_pem(
                if *kind == rustls_pki_types::pem::SectionKind::Crl { "X509 CRL" } else { "CERTIFICATE" },
                der,
            )
        })
        .collect();
    let err = fed.trust.load_crl(&tampered).unwrap_err();
    assert!(matches!(err, VerifyError::CrlBadSignature { .. }), "{err}");
    assert!(fed.trust.crls().is_empty());
    assert!(verify(&fed, &node).is_ok(), "a refused CRL revokes nothing");
}

#[test]
fn crl_from_another_federations_ca_is_refused_on_load() {
    let fed = federation();
    let mut other = federation();
    let err = fed.trust.load_crl(&other.henan.crl(7).unwrap()).unwrap_err();
    assert!(matches!(err, VerifyError::UnknownCrlIssuer { .. }), "{err}");
    let err = fed.trust.load_crl(&other.root.crl(7).unwrap()).unwrap_err();
    assert!(matches!(err, VerifyError::CrlBadSignature { .. }), "{err}");
}

#[test]
fn forged_name_outside_the_intermediates_region_is_rejected() {
    let fed = federation();
    // The henan.cn CA's key signs a node in hubei.cn: the CA code would refuse, so
    // build the certificate directly.
    let key = ed25519_key();
    let forged = forge(&fed.henan, &forged_node_params("x.wuhan.hubei.cn", Tier::Village), &key);
    let err = fed.trust.identity_from_chain(&forged, &intermediates_of(&fed.henan), now()).unwrap_err();
    match &err {
        VerifyError::OutsideRegion { name, region, .. } => {
            assert_eq!(name, "x.wuhan.hubei.cn");
            assert_eq!(region, "henan.cn");
        }
        other => panic!("expected OutsideRegion, got {other}"),
    }
}

#[test]
fn forged_tier_not_below_the_issuer_is_rejected() {
    let fed = federation();
    let key = ed25519_key();
    for tier in [Tier::Provincial, Tier::National] {
        let forged = forge(&fed.henan, &forged_node_params("zhengzhou.henan.cn", tier), &key);
        let err = fed.trust.identity_from_chain(&forged, &intermediates_of(&fed.henan), now()).unwrap_err();
        assert!(matches!(err, VerifyError::TierNotPermitted { tier: t, .. } if t == tier), "{err}");
    }

    // A forged sub-CA claiming a tier above its issuer cannot lend it to its nodes.
    let sub_key = ed25519_key();
    let mut sub = rcgen::CertificateParams::default();
    sub.distinguished_name = rcgen::DistinguishedName::new();
    sub.distinguished_name.push(rcgen::DnType::CommonName, "zhengzhou.henan.cn forged CA");
    sub.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    sub.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    sub.custom_extensions.push(rcgen::CustomExtension::from_oid_content(
        profile::TIER_EXTENSION_OID_ARCS,
        profile::encode_tier(Tier::National),
    ));
    let sub_cert = forge(&fed.henan, &sub, &sub_key);
    let issuer = rcgen::Issuer::new(sub.clone(), &sub_key);
    let node = forged_node_params("v1.zhengzhou.henan.cn", Tier::Village).signed_by(&ed25519_key(), &issuer).unwrap();
    let mut chain = vec![sub_cert];
    chain.extend(intermediates_of(&fed.henan));
    let err = fed.trust.identity_from_chain(node.der(), &chain, now()).unwrap_err();
    assert!(
        matches!(&err, VerifyError::TierNotPermitted { tier: Tier::National, subject, .. } if subject.contains("forged CA")),
        "{err}"
    );
}

#[test]
fn node_certificate_without_a_tier_claim_is_rejected() {
    let fed = federation();
    let mut params = forged_node_params(VILLAGE, Tier::Village);
    params.custom_extensions.clear();
    let forged = forge(&fed.henan, &params, &ed25519_key());
    let err = fed.trust.identity_from_chain(&forged, &intermediates_of(&fed.henan), now()).unwrap_err();
    assert!(matches!(err, VerifyError::MissingTierClaim { .. }), "{err}");
}

#[test]
fn node_certificate_with_a_non_ed25519_key_is_rejected() {
    let fed = federation();
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = forge(&fed.henan, &forged_node_params(VILLAGE, Tier::Village), &p256);
    let err = fed.trust.identity_from_chain(&forged, &intermediates_of(&fed.henan), now()).unwrap_err();
    assert!(matches!(err, VerifyError::Malformed(_)), "{err}");
}

#[test]
fn garbage_is_rejected_without_panicking() {
    let fed = federation();
    for bytes in [&b""[..], b"\x30\x03\x02\x01\x01", &[0xff; 64]] {
        let err = fed.trust.identity_from_chain(&CertificateDer::from(bytes.to_vec()), &[], now()).unwrap_err();
        assert!(matches!(err, VerifyError::Malformed(_)), "{err}");
    }
    assert!(TrustStore::from_root_pem("not pem").is_err());
    assert!(fed.trust.load_crl("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").is_err());
}

#[test]
fn parent_link_check_uses_verified_identities() {
    let mut fed = federation();
    let mut identity = |name: &str, tier: Tier| {
        let node = enrol(&mut fed.henan, name, tier);
        fed.trust.identity_from_chain(node.leaf(), node.intermediates(), now()).unwrap()
    };
    let county = identity(COUNTY, Tier::County);
    let township = identity("gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Township);
    let city = identity("zhengzhou.henan.cn", Tier::City);
    let far = identity("t1.luoyang.henan.cn", Tier::Township);
    assert!(check_parent_link(&county, &township, &[]).is_ok());
    assert!(matches!(check_parent_link(&county, &city, &[]), Err(VerifyError::TierNotPermitted { .. })));
    assert!(matches!(check_parent_link(&county, &far, &[]), Err(VerifyError::OutsideRegion { .. })));
    assert!(check_parent_link(&county, &far, std::slice::from_ref(&far.name)).is_ok());
}

#[test]
fn node_credentials_refuse_a_key_that_is_not_the_certificates() {
    let mut fed = federation();
    let node = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    assert!(NodeCredentials::from_pem(&node.chain_pem, &node.key_pem).is_ok());
    let other = ed25519_key().serialize_pem();
    let err = NodeCredentials::from_pem(&node.chain_pem, &other).unwrap_err();
    assert!(matches!(err, CaError::InvalidKey { .. }), "{err}");
}

// --- issuing ----------------------------------------------------------------------

#[test]
fn ca_refuses_out_of_region_and_wrong_tier_csrs() {
    let mut fed = federation();
    let (_, hubei) = enrol::generate_key_and_csr(&NodeName::from("x.wuhan.hubei.cn"), Tier::Village).unwrap();
    let err = fed.henan.sign_csr(&hubei, Tier::Village, Validity::Days(1)).unwrap_err();
    assert!(matches!(err, CaError::OutsideRegion { .. }), "{err}");

    let (_, hub) = enrol::generate_key_and_csr(&NodeName::from("henan.cn"), Tier::Provincial).unwrap();
    let err = fed.henan.sign_csr(&hub, Tier::Provincial, Validity::Days(1)).unwrap_err();
    assert!(matches!(err, CaError::TierNotBelowIssuer { .. }), "{err}");

    let (_, village) = enrol::generate_key_and_csr(&NodeName::from(VILLAGE), Tier::Village).unwrap();
    let err = fed.henan.sign_csr(&village, Tier::City, Validity::Days(1)).unwrap_err();
    assert!(matches!(err, CaError::TierMismatch { .. }), "{err}");
    assert!(fed.henan.index().issued.is_empty(), "nothing issued on refusal");
}

#[cfg(unix)]
#[test]
fn private_key_files_have_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let fed = federation();
    let node_dir = fed.dir.path().join("node");
    let (key, _) = enrol::write_key_and_csr(&node_dir, &NodeName::from(VILLAGE), Tier::Village).unwrap();
    for path in [fed.root.dir().join("ca.key"), fed.national.dir().join("ca.key"), fed.henan.dir().join("ca.key"), key]
    {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = CertificateAuthority::init_root(dir.path(), &RootOptions::new("cn")).unwrap();
    let key_before = std::fs::read(dir.path().join("ca.key")).unwrap();
    drop(root);
    let err = CertificateAuthority::init_root(dir.path(), &RootOptions::new("cn")).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), key_before);
    // Nor can keygen overwrite a node key.
    enrol::write_key_and_csr(dir.path(), &NodeName::from(VILLAGE), Tier::Village).unwrap();
    let err = enrol::write_key_and_csr(dir.path(), &NodeName::from(VILLAGE), Tier::Village).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
}

// --- TLS handshakes in memory --------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(trust: &Arc<TrustStore>, node: &Node) -> Arc<ServerConfig> {
    let creds = NodeCredentials::from_pem(&node.chain_pem, &node.key_pem).unwrap();
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(FederationVerifier::new(Arc::clone(trust))))
        .with_single_cert(creds.chain, creds.key)
        .unwrap();
    Arc::new(config)
}

fn client_config(trust: &Arc<TrustStore>, node: &Node) -> Arc<ClientConfig> {
    let creds = NodeCredentials::from_pem(&node.chain_pem, &node.key_pem).unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FederationVerifier::new(Arc::clone(trust))))
        .with_client_auth_cert(creds.chain, creds.key)
        .unwrap();
    Arc::new(config)
}

#[derive(Debug, PartialEq)]
enum Side {
    Client,
    Server,
}

/// Pumps TLS records between the two ends until both finish the handshake or one fails.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), (Side, rustls::Error)> {
    for _ in 0..16 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().map_err(|e| (Side::Server, e))?;
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().map_err(|e| (Side::Client, e))?;
        }
        if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() && !server.wants_write() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

fn connect(
    client_cfg: Arc<ClientConfig>,
    server_cfg: Arc<ServerConfig>,
    server_name: &str,
) -> (ClientConnection, ServerConnection, Result<(), (Side, rustls::Error)>) {
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut client = ClientConnection::new(client_cfg, name).unwrap();
    let mut server = ServerConnection::new(server_cfg).unwrap();
    let result = handshake(&mut client, &mut server);
    (client, server, result)
}

#[test]
fn mutual_tls_handshake_succeeds_and_both_ends_learn_the_peer_identity() {
    let mut fed = federation();
    let hub = enrol(&mut fed.henan, COUNTY, Tier::County);
    let village = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let (client, server, result) =
        connect(client_config(&fed.trust, &village), server_config(&fed.trust, &hub), COUNTY);
    result.unwrap();

    let seen_by_server = fed.trust.identity_of_peer(server.peer_certificates().unwrap()).unwrap();
    assert_eq!(seen_by_server.name, NodeName::from(VILLAGE));
    assert_eq!(seen_by_server.tier, Tier::Village);
    let seen_by_client = fed.trust.identity_of_peer(client.peer_certificates().unwrap()).unwrap();
    assert_eq!(seen_by_client.name, NodeName::from(COUNTY));
    assert_eq!(seen_by_client.tier, Tier::County);
    assert!(check_parent_link(&seen_by_client, &seen_by_server, &[]).is_ok());
}

#[test]
fn handshake_fails_when_the_client_certificate_is_from_another_root() {
    let mut fed = federation();
    let mut other = federation();
    let hub = enrol(&mut fed.henan, COUNTY, Tier::County);
    let stranger = enrol(&mut other.henan, VILLAGE, Tier::Village);
    // The stranger trusts our root (so it would accept our server) but holds a foreign cert.
    let (_, _, result) = connect(client_config(&fed.trust, &stranger), server_config(&fed.trust, &hub), COUNTY);
    let (side, err) = result.unwrap_err();
    assert_eq!(side, Side::Server, "the server rejects the client: {err}");
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)), "{err}");
}

#[test]
fn handshake_fails_when_the_server_certificate_is_from_another_root() {
    let mut fed = federation();
    let mut other = federation();
    let impostor = enrol(&mut other.henan, COUNTY, Tier::County);
    let village = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let (_, _, result) = connect(client_config(&fed.trust, &village), server_config(&fed.trust, &impostor), COUNTY);
    let (side, err) = result.unwrap_err();
    assert_eq!(side, Side::Client, "the client rejects the server: {err}");
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)), "{err}");
}

#[test]
fn handshake_fails_when_the_server_is_not_the_node_dialled() {
    let mut fed = federation();
    let hub = enrol(&mut fed.henan, COUNTY, Tier::County);
    let village = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let (_, _, result) =
        connect(client_config(&fed.trust, &village), server_config(&fed.trust, &hub), "xinmi.zhengzhou.henan.cn");
    let (side, err) = result.unwrap_err();
    assert_eq!(side, Side::Client);
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)), "{err}");
}

#[test]
fn handshake_fails_for_a_forged_tier_and_the_error_carries_the_reason() {
    let mut fed = federation();
    let hub = enrol(&mut fed.henan, COUNTY, Tier::County);
    let key = ed25519_key();
    let forged = forge(&fed.henan, &forged_node_params("v9.zhengzhou.henan.cn", Tier::Provincial), &key);
    let mut chain_pem = profile::to_pem("CERTIFICATE", &forged);
    for c in intermediates_of(&fed.henan) {
        chain_pem.push_str(&profile::to_pem("CERTIFICATE", &c));
    }
    let liar = Node { key_pem: key.serialize_pem(), chain: Vec::new(), chain_pem, serial: "01".parse().unwrap() };
    let (_, _, result) = connect(client_config(&fed.trust, &liar), server_config(&fed.trust, &hub), COUNTY);
    let (side, err) = result.unwrap_err();
    assert_eq!(side, Side::Server);
    assert!(matches!(VerifyError::from_rustls(&err), Some(VerifyError::TierNotPermitted { .. })), "{err}");
}

#[test]
fn handshake_fails_after_the_clients_certificate_is_revoked() {
    let mut fed = federation();
    let hub = enrol(&mut fed.henan, COUNTY, Tier::County);
    let village = enrol(&mut fed.henan, VILLAGE, Tier::Village);
    let (client_cfg, server_cfg) = (client_config(&fed.trust, &village), server_config(&fed.trust, &hub));
    connect(Arc::clone(&client_cfg), Arc::clone(&server_cfg), COUNTY).2.unwrap();

    fed.henan.revoke(&village.serial, RevokeReason::KeyCompromise).unwrap();
    fed.trust.load_crl(&fed.henan.crl(7).unwrap()).unwrap();

    // A full handshake consults the trust store's current CRL set and fails.
    let fresh_client = client_config(&fed.trust, &village);
    let fresh_server = server_config(&fed.trust, &hub);
    let (side, err) = connect(fresh_client, fresh_server, COUNTY).2.unwrap_err();
    assert_eq!(side, Side::Server);
    assert!(matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)), "{err}");

    // Pitfall pinned here: a TLS 1.3 *resumed* session skips the certificate
    // verifiers. The peer's chain is still known, and re-checking it after the
    // handshake (as a link must, to learn the peer's identity) catches the revocation.
    let (_, server, result) = connect(client_cfg, server_cfg, COUNTY);
    result.unwrap();
    let err = fed.trust.identity_of_peer(server.peer_certificates().unwrap()).unwrap_err();
    assert!(matches!(err, VerifyError::Revoked { .. }), "{err}");
}

// --- the telemed-ca binary ---------------------------------------------------------

fn ca_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_telemed-ca")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = ca_cmd(args);
    assert!(
        out.status.success(),
        "telemed-ca {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = ca_cmd(args);
    assert!(!out.status.success(), "telemed-ca {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn cli_runs_the_whole_flow_init_intermediate_keygen_sign_inspect_revoke_crl() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| -> PathBuf { dir.path().join(name) };
    ok(&["init", "--dir", p(&d("root")), "--name", "cn", "--region", ""]);
    ok(&["intermediate", "--ca", p(&d("root")), "--out", p(&d("national")), "--region", "cn", "--tier", "national"]);
    ok(&[
        "intermediate",
        "--ca",
        p(&d("national")),
        "--out",
        p(&d("henan")),
        "--region",
        "henan.cn",
        "--tier",
        "provincial",
    ]);
    ok(&["keygen", "--name", VILLAGE, "--tier", "village", "--out", p(&d("node"))]);
    let signed = ok(&[
        "sign",
        "--ca",
        p(&d("henan")),
        "--csr",
        p(&d("node/node.csr")),
        "--tier",
        "village",
        "--out",
        p(&d("node/node.pem")),
    ]);
    assert!(signed.contains(VILLAGE), "{signed}");

    let creds = NodeCredentials::load(&d("node/node.pem"), &d("node/node.key")).unwrap();
    let leaf = CertSummary::from_der(&creds.chain[0]).unwrap();
    let peer_id = certs::keys::peer_id_of(&leaf.public_key.unwrap()).unwrap();
    let report = ok(&["inspect", p(&d("node/node.pem"))]);
    for expected in [
        VILLAGE,
        "village (level 0)",
        "gaocheng.dengfeng.zhengzhou.henan.cn",
        "henan.cn provincial CA",
        &leaf.serial.to_string(),
        &peer_id,
        "valid now",
        "serverAuth, clientAuth",
        "permitted dNSName",
    ] {
        assert!(report.contains(expected), "inspect output lacks `{expected}`:\n{report}");
    }
    let csr_report = ok(&["inspect", p(&d("node/node.csr"))]);
    assert!(csr_report.contains("requested tier:") && csr_report.contains(&peer_id), "{csr_report}");

    // The node verifies against the root the CLI made.
    let root_pem = std::fs::read_to_string(d("root/ca.pem")).unwrap();
    let trust = TrustStore::from_root_pem(&root_pem).unwrap();
    let id = trust.identity_of_peer(&creds.chain).unwrap();
    assert_eq!((id.name.as_str(), id.tier, id.peer_id.as_str()), (VILLAGE, Tier::Village, peer_id.as_str()));

    let serial = leaf.serial.to_string();
    ok(&["revoke", "--ca", p(&d("henan")), "--serial", &serial, "--reason", "key-compromise"]);
    let err = fails(&["revoke", "--ca", p(&d("henan")), "--serial", &serial]);
    assert!(err.contains("already revoked"), "{err}");
    ok(&["crl", "--ca", p(&d("henan")), "--out", p(&d("henan.crl"))]);
    let crl_report = ok(&["inspect", p(&d("henan.crl"))]);
    assert!(crl_report.contains(&serial) && crl_report.contains("next update:"), "{crl_report}");

    trust.load_crl(&std::fs::read_to_string(d("henan.crl")).unwrap()).unwrap();
    let err = trust.identity_of_peer(&creds.chain).unwrap_err();
    assert!(matches!(err, VerifyError::Revoked { .. }), "{err}");

    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d("henan/index.json")).unwrap()).unwrap();
    assert_eq!(index["revoked"][0]["serial"], serial);
    assert_eq!(index["revoked"][0]["reason"], "key-compromise");
    assert!(!d("henan/.lock").exists(), "the lock is released when the command ends");
}

#[test]
fn cli_sign_refuses_out_of_region_and_wrong_tier_csrs_and_init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| -> PathBuf { dir.path().join(name) };
    ok(&["init", "--dir", p(&d("root")), "--name", "cn"]);
    ok(&[
        "intermediate",
        "--ca",
        p(&d("root")),
        "--out",
        p(&d("henan")),
        "--region",
        "henan.cn",
        "--tier",
        "provincial",
    ]);

    ok(&["keygen", "--name", "x.wuhan.hubei.cn", "--tier", "village", "--out", p(&d("hubei"))]);
    let err = fails(&[
        "sign",
        "--ca",
        p(&d("henan")),
        "--csr",
        p(&d("hubei/node.csr")),
        "--tier",
        "village",
        "--out",
        p(&d("hubei.pem")),
    ]);
    assert!(err.contains("outside this CA's region `henan.cn`"), "{err}");

    ok(&["keygen", "--name", "henan.cn", "--tier", "provincial", "--out", p(&d("hub"))]);
    let err = fails(&[
        "sign",
        "--ca",
        p(&d("henan")),
        "--csr",
        p(&d("hub/node.csr")),
        "--tier",
        "provincial",
        "--out",
        p(&d("hub.pem")),
    ]);
    assert!(err.contains("not below this CA's tier provincial"), "{err}");

    ok(&["keygen", "--name", VILLAGE, "--tier", "village", "--out", p(&d("v"))]);
    let err = fails(&[
        "sign",
        "--ca",
        p(&d("henan")),
        "--csr",
        p(&d("v/node.csr")),
        "--tier",
        "city",
        "--out",
        p(&d("v.pem")),
    ]);
    assert!(err.contains("requests tier village"), "{err}");
    for refused in ["hubei.pem", "hub.pem", "v.pem"] {
        assert!(!d(refused).exists(), "{refused} must not be written");
    }

    let key_before = std::fs::read(d("root/ca.key")).unwrap();
    let err = fails(&["init", "--dir", p(&d("root")), "--name", "cn"]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(d("root/ca.key")).unwrap(), key_before);
    let err = fails(&["keygen", "--name", VILLAGE, "--tier", "village", "--out", p(&d("v"))]);
    assert!(err.contains("refusing to overwrite"), "{err}");
}
