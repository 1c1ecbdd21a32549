//! The control plane on loopback: eight real nodes over seven tiers, each with its
//! QUIC data plane (mutual TLS) and its libp2p control plane (QUIC), real
//! certificates from the demo PKI. Every wait is bounded.
//!
//! Tests here run one at a time (they each start a federation; two cores).

use federation_proto::{CapacityAdvert, Modality, SignedEnvelope, Tier, Urgency, content_type};
use node::control_plane::ControlConfig;
use node::control_plane::adversary::{Admission, Rogue};
use node::control_plane::gossip::GossipMessage;
use node::daemon::{self, Running, SubmitRequest};
use node::demo::PlannedNode;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const INT: &str = "hub.telemed.int";
const NAT: &str = "nhc.cn";
const PROV: &str = "hub.henan.cn";
const CITY: &str = "zhengzhou.henan.cn";
const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
const ALT_COUNTY: &str = "gongyi.zhengzhou.henan.cn";
const TOWNSHIP: &str = "gaocheng.dengfeng.zhengzhou.henan.cn";
const VILLAGE: &str = "v01.gaocheng.dengfeng.zhengzhou.henan.cn";

fn plan() -> Vec<PlannedNode> {
    use Tier::*;
    let n = |name: &str, tier, parent: Option<&str>, experts: Vec<(Modality, u32)>| PlannedNode {
        name: name.into(),
        tier,
        parent: parent.map(Into::into),
        experts,
    };
    vec![
        n(INT, International, None, vec![(Modality::Pathology, 1)]),
        n(NAT, National, Some(INT), vec![]),
        n(PROV, Provincial, Some(NAT), vec![]),
        n(CITY, City, Some(PROV), vec![(Modality::Ecg, 2)]),
        n(COUNTY, County, Some(CITY), vec![]),
        n(ALT_COUNTY, County, Some(CITY), vec![(Modality::Imaging, 1)]),
        n(TOWNSHIP, Township, Some(COUNTY), vec![]),
        n(VILLAGE, Village, Some(TOWNSHIP), vec![]),
    ]
}

struct Fed {
    dir: tempfile::TempDir,
    nodes: BTreeMap<String, Running>,
}

impl Fed {
    /// Starts the plan top-down; each node bootstraps its control plane from its
    /// parent's. `extra_parents` adds skip targets (after the primary) per node.
    async fn start(extra_parents: &[(&str, &str)]) -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan();
        let mut configs = node::demo::provision(dir.path(), &plan).unwrap();
        // The root node starts with the Henan CA's current CRL (revoking nothing),
        // from a file it watches; peers receive it at admission.
        let crl = certs::ca::CertificateAuthority::open(&dir.path().join("ca/henan")).unwrap().crl(7).unwrap();
        std::fs::write(dir.path().join("henan-crl.pem"), crl).unwrap();
        configs[0].tls.crls = vec![dir.path().join("henan-crl.pem")];
        let mut nodes: BTreeMap<String, Running> = BTreeMap::new();
        for (p, config) in plan.iter().zip(configs.iter_mut()) {
            let mut parents: Vec<&str> = p.parent.as_deref().into_iter().collect();
            parents.extend(extra_parents.iter().filter(|(n, _)| *n == p.name).map(|(_, q)| *q));
            config.parents = parents
                .iter()
                .map(|q| node::config::ParentConfig {
                    name: (*q).into(),
                    tier: plan.iter().find(|x| x.name == *q).unwrap().tier,
                    addr: nodes[*q].addr,
                })
                .collect();
            let mut control = ControlConfig::loopback();
            control.advert_interval_ms = 500;
            control.advert_ttl_ms = 15_000;
            control.admission_timeout_ms = 2_000;
            if let Some(parent) = &p.parent {
                control.bootstrap = vec![nodes[parent].control_plane.as_ref().unwrap().bootstrap_addr().unwrap()];
            }
            config.control = Some(control);
            let running = daemon::start(config.clone()).await.unwrap();
            nodes.insert(p.name.clone(), running);
        }
        Fed { dir, nodes }
    }

    /// Waits (bounded) until every node but `except` holds a Henan CRL numbered
    /// `number`; returns when each got it, measured from `start`.
    async fn wait_for_crl(&self, number: &str, except: &str, start: Instant) -> BTreeMap<String, Duration> {
        let mut reached = BTreeMap::new();
        while reached.len() < self.nodes.len() - 1 {
            for (name, n) in &self.nodes {
                if reached.contains_key(name) || name == except {
                    continue;
                }
                let status = n.control_plane.as_ref().unwrap().status().await.unwrap();
                if status.crls.iter().any(|(issuer, n)| issuer.contains("henan") && n == number) {
                    reached.insert(name.clone(), start.elapsed());
                }
            }
            assert!(start.elapsed() < Duration::from_secs(10), "CRL {number} reached only {reached:?} within 10 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        reached
    }

    fn node(&self, name: &str) -> &Running {
        &self.nodes[name]
    }

    /// Waits (bounded) until every node holds a fresh advert from every other.
    async fn wait_for_adverts(&self, limit: Duration) -> Duration {
        let start = Instant::now();
        let all: Vec<String> = self.nodes.keys().cloned().collect();
        loop {
            let mut missing = Vec::new();
            for (name, n) in &self.nodes {
                let known: Vec<String> =
                    n.known_adverts().await.unwrap().into_iter().map(|a| a.node.to_string()).collect();
                for other in all.iter().filter(|o| *o != name) {
                    if !known.contains(other) {
                        missing.push(format!("{name} lacks {other}"));
                    }
                }
            }
            if missing.is_empty() {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "adverts not everywhere after {limit:?}: {missing:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn shutdown(self) {
        for (_, n) in self.nodes {
            let _ = n.shutdown().await;
        }
    }
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether one captured log line contains every part.
fn log_line(parts: &[&str]) -> bool {
    super::logs().lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

fn ecg_file() -> std::path::PathBuf {
    node::demo::testdata_dir().join("waveform_ecg.dcm")
}

async fn submit(
    n: &Running,
    modality: Modality,
    urgency: Urgency,
    file: std::path::PathBuf,
) -> federation_proto::CaseId {
    let req = SubmitRequest {
        files: vec![file],
        study: None,
        modality,
        urgency,
        question: "control-plane test".into(),
        patient: "p-cp".into(),
        task: None,
        details: Default::default(),
    };
    n.submit(req).await.unwrap().unwrap()
}

async fn report_of(n: &Running, id: federation_proto::CaseId, limit: Duration) -> node::view::CaseView {
    let start = Instant::now();
    loop {
        if let Some(view) = n.show(id).await.unwrap()
            && view.report.is_some()
        {
            return view;
        }
        assert!(start.elapsed() < limit, "no report for {id} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_issued_at_the_root_reaches_every_node_and_cuts_the_node_off_on_both_planes() {
    let _serial = SERIAL.lock().await;
    super::init_logs();
    let fed = Fed::start(&[]).await;
    let took = fed.wait_for_adverts(Duration::from_secs(30)).await;
    eprintln!("adverts from all 8 nodes at every node after {took:?}");
    // The revoked township has live data-plane links to its county and its village.
    let links = |n: &str| {
        let n = fed.node(n);
        async move { n.status().await.unwrap().links.into_iter().map(|(name, _)| name).collect::<Vec<_>>() }
    };
    wait_for(Duration::from_secs(10), "township linked both ways", || async {
        links(COUNTY).await.contains(&TOWNSHIP.to_owned()) && links(VILLAGE).await.contains(&TOWNSHIP.to_owned())
    })
    .await;
    let township_peer_id = fed.node(TOWNSHIP).control_plane.as_ref().unwrap().peer_id.clone();
    assert!(
        fed.node(COUNTY).control_plane.as_ref().unwrap().status().await.unwrap().connected.contains(&township_peer_id)
    );

    // The Henan CA revokes the township; the CRL is injected at the root node.
    let mut henan = certs::ca::CertificateAuthority::open(&fed.dir.path().join("ca/henan")).unwrap();
    let chain = std::fs::read_to_string(fed.dir.path().join(TOWNSHIP).join("node.pem")).unwrap();
    let summary = certs::profile::CertSummary::from_der(&certs::profile::pem_certificates(&chain).unwrap()[0]).unwrap();
    henan.revoke(&summary.serial, certs::ca::RevokeReason::KeyCompromise).unwrap();
    let crl = henan.crl(7).unwrap();
    let number = crl_number(&fed, &crl);
    let start = Instant::now();
    fed.node(INT).load_crl(crl).await.unwrap().unwrap();
    // Every member but the revoked one (whose peers may cut it off before it hears).
    let reached = fed.wait_for_crl(&number, TOWNSHIP, start).await;
    let slowest = reached.values().max().copied().unwrap();
    eprintln!("revocation reached all {} nodes in {slowest:?}: {reached:?}", reached.len());

    // Data plane: the county and the village closed their links to the township.
    wait_for(Duration::from_secs(5), "data-plane links to the revoked township closed", || async {
        !links(COUNTY).await.contains(&TOWNSHIP.to_owned()) && !links(VILLAGE).await.contains(&TOWNSHIP.to_owned())
    })
    .await;
    // Control plane: nobody keeps it admitted or connected, and it stays out although
    // it keeps re-dialling its bootstrap peer.
    let cut_off = || async {
        for (name, n) in &fed.nodes {
            if name == TOWNSHIP {
                continue;
            }
            let s = n.control_plane.as_ref().unwrap().status().await.unwrap();
            if s.admitted.iter().any(|(node, _)| node == TOWNSHIP) || s.connected.contains(&township_peer_id) {
                return false;
            }
        }
        true
    };
    wait_for(Duration::from_secs(5), "revoked township cut off the control plane", cut_off).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(cut_off().await, "the revoked township was re-admitted");
    assert!(!links(COUNTY).await.contains(&TOWNSHIP.to_owned()), "the revoked township re-linked");
    assert!(super::logs().contains("control plane: peer refused; disconnecting"));
    fed.shutdown().await;
}

/// The CRL number as the nodes report it (checked through a trust store of the root).
fn crl_number(fed: &Fed, pem: &str) -> String {
    let root = std::fs::read_to_string(fed.dir.path().join(INT).join("root.pem")).unwrap();
    let trust = certs::verify::TrustStore::from_root_pem(&root).unwrap();
    trust.load_crl(pem).unwrap().crl_number.unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_file_replaced_at_the_root_is_gossiped_and_closes_the_revoked_villages_links() {
    let _serial = SERIAL.lock().await;
    super::init_logs();
    let fed = Fed::start(&[]).await;
    fed.wait_for_adverts(Duration::from_secs(30)).await;
    // The CRL the root started with reached everyone at admission.
    let first = crl_number(&fed, &std::fs::read_to_string(fed.dir.path().join("henan-crl.pem")).unwrap());
    fed.wait_for_crl(&first, "", Instant::now()).await;
    let village_links =
        || async { fed.node(TOWNSHIP).status().await.unwrap().links.into_iter().any(|(name, _)| name == VILLAGE) };
    wait_for(Duration::from_secs(10), "village linked", village_links).await;

    let mut henan = certs::ca::CertificateAuthority::open(&fed.dir.path().join("ca/henan")).unwrap();
    let chain = std::fs::read_to_string(fed.dir.path().join(VILLAGE).join("node.pem")).unwrap();
    let summary = certs::profile::CertSummary::from_der(&certs::profile::pem_certificates(&chain).unwrap()[0]).unwrap();
    henan.revoke(&summary.serial, certs::ca::RevokeReason::AffiliationChanged).unwrap();
    let crl = henan.crl(7).unwrap();
    let number = crl_number(&fed, &crl);
    assert_ne!(number, first);
    // The operator replaces the file (atomically); the root notices within its poll.
    let tmp = fed.dir.path().join("henan-crl.pem.new");
    std::fs::write(&tmp, &crl).unwrap();
    std::fs::rename(&tmp, fed.dir.path().join("henan-crl.pem")).unwrap();
    let start = Instant::now();
    let reached = fed.wait_for_crl(&number, VILLAGE, start).await;
    eprintln!("CRL file change reached all {} nodes in {:?}", reached.len(), reached.values().max().unwrap());
    wait_for(Duration::from_secs(5), "township closed its link to the revoked village", || async {
        !village_links().await
    })
    .await;
    assert!(log_line(&["CRL file reloaded"]));
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn county_hub_stopped_its_townships_cases_go_to_the_advertised_alternate_and_complete() {
    let _serial = SERIAL.lock().await;
    super::init_logs();
    let mut fed = Fed::start(&[]).await;
    fed.wait_for_adverts(Duration::from_secs(30)).await;
    let county = fed.nodes.remove(COUNTY).unwrap();
    county.shutdown().await.unwrap();

    let ct = testdata_ct();
    let id = submit(fed.node(VILLAGE), Modality::Imaging, Urgency::Urgent, ct).await;
    let view = report_of(fed.node(VILLAGE), id, Duration::from_secs(60)).await;
    let report = view.report.as_ref().unwrap();
    assert_eq!(report.node, ALT_COUNTY, "read by the alternate county's experts: {view:?}");
    let hops: Vec<(String, String)> = view.trail.iter().map(|h| (h.from.clone(), h.to.clone())).collect();
    assert!(hops.contains(&(TOWNSHIP.to_owned(), ALT_COUNTY.to_owned())), "{hops:?}");
    assert!(!hops.iter().any(|(_, to)| to == COUNTY), "{hops:?}");
    assert!(super::logs().contains("parent unreachable: dialling an advertised alternate"));
    fed.shutdown().await;
}

fn testdata_ct() -> std::path::PathBuf {
    node::demo::testdata_dir().join("CT_small.dcm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adverts_from_a_peer_not_admitted_or_with_a_bad_signature_are_ignored_and_logged() {
    let _serial = SERIAL.lock().await;
    super::init_logs();
    let fed = Fed::start(&[]).await;
    fed.wait_for_adverts(Duration::from_secs(30)).await;
    let county_addr = fed.node(COUNTY).control_plane.as_ref().unwrap().bootstrap_addr().unwrap();
    let advert_of = |name: &str, tier: Tier| CapacityAdvert {
        node: name.into(),
        tier,
        issued_at: node::view::now(),
        valid_until: node::view::now().saturating_add(60_000),
        capacity: vec![federation_proto::ModalityCapacity {
            modality: Modality::Ecg,
            model_tasks: vec![],
            experts_on_duty: 9,
            queue_len: 0,
            eta_ms: 1,
            model_cases_per_hour: 0,
        }],
    };
    let known_everywhere = |name: &'static str| {
        let fed = &fed;
        async move {
            let mut at = Vec::new();
            for (n, r) in &fed.nodes {
                if r.known_adverts().await.unwrap().iter().any(|a| a.node.as_str() == name) {
                    at.push(n.clone());
                }
            }
            at
        }
    };

    // 1. A peer with no federation certificate, which never completes admission.
    let (outsider_key_pem, _) =
        certs::enrol::generate_key_and_csr(&"evil.zhengzhou.henan.cn".into(), Tier::County).unwrap();
    let outsider_key = certs::keys::signing_key_from_pem(&outsider_key_pem).unwrap();
    let outsider = Rogue::start(&outsider_key, Admission::Silent).await.unwrap();
    outsider.dial(&county_addr).await.unwrap();
    let env =
        SignedEnvelope::sign(&outsider_key, content_type::ADVERT, &advert_of("evil.zhengzhou.henan.cn", Tier::County))
            .unwrap();
    let message = GossipMessage::Advert { chain: vec![], advert: env, data_addr: None };
    outsider.publish_advert(&message).await.unwrap();
    let peer = format!("peer={}", outsider.peer_id);
    wait_for(Duration::from_secs(5), "rejection of the outsider's gossip logged", || async {
        log_line(&["gossip from a peer that is not admitted rejected", &peer])
    })
    .await;
    wait_for(Duration::from_secs(5), "outsider timed out of admission", || async {
        log_line(&["peer refused; disconnecting", &peer, "no admission within 2000 ms"])
    })
    .await;

    // 2. An admitted federation node whose adverts are forged or damaged.
    let mut henan = certs::ca::CertificateAuthority::open(&fed.dir.path().join("ca/henan")).unwrap();
    let name = "v09.gaocheng.dengfeng.zhengzhou.henan.cn";
    let (key_pem, csr) = certs::enrol::generate_key_and_csr(&name.into(), Tier::Village).unwrap();
    let issued = henan.sign_csr(&csr, Tier::Village, certs::ca::Validity::Days(30)).unwrap();
    let creds = certs::keys::NodeCredentials::from_pem(&issued.chain_pem, &key_pem).unwrap();
    let key = certs::keys::signing_key_from_pem(&key_pem).unwrap();
    let member = Rogue::start(&key, Admission::Present(creds.chain.clone())).await.unwrap();
    member.dial(&county_addr).await.unwrap();
    let member_peer = format!("peer={}", member.peer_id);
    wait_for(Duration::from_secs(5), "member admitted", || async {
        log_line(&["control-plane peer admitted", &member_peer, name])
    })
    .await;
    let chain: Vec<serde_bytes::ByteBuf> = creds.chain.iter().map(|c| serde_bytes::ByteBuf::from(c.to_vec())).collect();

    // 2a. A damaged signature.
    let good = SignedEnvelope::sign(&key, content_type::ADVERT, &advert_of(name, Tier::Village)).unwrap();
    let mut bytes = good.as_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let damaged =
        GossipMessage::Advert { chain: chain.clone(), advert: SignedEnvelope::from_bytes(bytes), data_addr: None };
    member.publish_advert(&damaged).await.unwrap();
    wait_for(Duration::from_secs(5), "bad signature logged", || async {
        log_line(&["advert rejected: bad signature", &member_peer])
    })
    .await;

    // 2b. Signed by another key than the certificate's.
    let forged = SignedEnvelope::sign(&outsider_key, content_type::ADVERT, &advert_of(name, Tier::Village)).unwrap();
    member
        .publish_advert(&GossipMessage::Advert { chain: chain.clone(), advert: forged, data_addr: None })
        .await
        .unwrap();
    wait_for(Duration::from_secs(5), "foreign signer logged", || async {
        log_line(&["advert rejected: advert signed by a key other than", &member_peer])
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(known_everywhere("evil.zhengzhou.henan.cn").await, Vec::<String>::new());
    assert_eq!(known_everywhere("v09.gaocheng.dengfeng.zhengzhou.henan.cn").await, Vec::<String>::new());

    // Control: the same member's correctly signed advert is used, and relayed on.
    member
        .publish_advert(&GossipMessage::Advert { chain: chain.clone(), advert: good, data_addr: None })
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "a good advert reaches every node", || async {
        known_everywhere("v09.gaocheng.dengfeng.zhengzhou.henan.cn").await.len() == fed.nodes.len()
    })
    .await;
    // A member that keeps forwarding invalid gossip is cut off.
    for i in 0..=node::control_plane::REJECTED_GOSSIP_MAX {
        let mut body = advert_of(name, Tier::Village);
        body.issued_at = body.issued_at.saturating_add(u64::from(i) + 1);
        let mut bytes = SignedEnvelope::sign(&key, content_type::ADVERT, &body).unwrap().as_bytes().to_vec();
        *bytes.last_mut().unwrap() ^= 0x55;
        let damaged =
            GossipMessage::Advert { chain: chain.clone(), advert: SignedEnvelope::from_bytes(bytes), data_addr: None };
        member.publish_advert(&damaged).await.unwrap();
    }
    wait_for(Duration::from_secs(5), "persistent forger disconnected", || async {
        log_line(&["peer refused; disconnecting", &member_peer, "more than 32 invalid gossip messages"])
    })
    .await;
    outsider.stop();
    member.stop();
    fed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_ecg_skips_a_tier_whose_adverts_show_no_ecg_capacity() {
    let _serial = SERIAL.lock().await;
    super::init_logs();
    // The township may skip to the city; the county between advertises no ECG.
    let fed = Fed::start(&[(TOWNSHIP, CITY)]).await;
    fed.wait_for_adverts(Duration::from_secs(30)).await;
    let county_advert =
        fed.node(TOWNSHIP).known_adverts().await.unwrap().into_iter().find(|a| a.node.as_str() == COUNTY).unwrap();
    let ecg = county_advert.capacity.iter().find(|c| c.modality == Modality::Ecg).unwrap();
    assert!(ecg.model_tasks.is_empty() && ecg.experts_on_duty == 0, "{county_advert:?}");

    let id = submit(fed.node(VILLAGE), Modality::Ecg, Urgency::Stat, ecg_file()).await;
    let view = report_of(fed.node(VILLAGE), id, Duration::from_secs(60)).await;
    assert_eq!(view.report.as_ref().unwrap().node, CITY);
    let hop = view.trail.iter().find(|h| h.from == TOWNSHIP).expect("a hop from the township");
    assert_eq!(hop.to, CITY, "{:?}", view.trail);
    assert_eq!(hop.skipped, vec![COUNTY.to_owned()]);
    assert!(fed.node(COUNTY).show(id).await.unwrap().is_none(), "the county never held the case");
    fed.shutdown().await;
}
