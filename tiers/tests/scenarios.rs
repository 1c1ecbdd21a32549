//! Scenario tests: several cores stepped together through simulated time by the
//! harness, pinning the escalation behaviour end to end.

use federation_proto::{
    CaseOffer, EscalationReason, HopRecord, Message, Millis, Modality, NodeName, Reader, Report, ReportDelivery,
    SignedEnvelope, Tier, Urgency, content_type,
};
use federation_proto::{ContentHash, PublicKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tiers::harness::{AutoExperts, Harness, ModelScript, public_key_for};
use tiers::{CaseStatus, Event, ExpertPool, ModelSpec, ReportDown, Upstream};

const MIN: u64 = 60_000;

fn ecg_experts(on_duty: u32, service_ms: u64) -> ExpertPool {
    ExpertPool { modality: Modality::Ecg, on_duty, service_ms }
}

fn experts_everywhere(h: &mut Harness, node: &str, modality: Modality) {
    h.configure(node, |c| c.experts = vec![ExpertPool { modality, on_duty: 2, service_ms: 5 * MIN }]);
    h.node_mut(node).experts = Some(AutoExperts { name: format!("dr.{node}"), claim_after_ms: MIN, read_ms: 2 * MIN });
}

fn ecg_model(threshold_stat: f32) -> ModelSpec {
    ModelSpec {
        id: "ecg-rhythm".into(),
        version: "1.0.0".into(),
        modality: Modality::Ecg,
        tasks: vec!["ecg.rhythm".into()],
        threshold: [threshold_stat, 0.9, 0.85],
        cases_per_hour: 600,
    }
}

/// Decoded hop records of a case's trail at a node.
fn hops(h: &Harness, node: &str, case: federation_proto::CaseId) -> Vec<HopRecord> {
    h.case_at(node, case)
        .expect("case at node")
        .trail
        .iter()
        .map(|e| e.open::<HopRecord>(content_type::HOP).expect("hop verifies").body)
        .collect()
}

fn assert_invariants(h: &Harness) {
    let problems = h.check_invariants();
    assert!(problems.is_empty(), "invariants broken: {problems:?}");
}

fn report_at(h: &Harness, node: &str, case: federation_proto::CaseId) -> Report {
    h.case_at(node, case)
        .and_then(|c| c.report.as_ref())
        .expect("report present")
        .open::<Report>(content_type::REPORT)
        .expect("report verifies")
        .body
}

#[test]
fn stat_ecg_at_village_without_model_reaches_nearest_tier_with_ecg_expert() {
    let mut h = Harness::seven_tier_chain(1);
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 3 * MIN)]);
    h.configure("city", |c| c.experts = vec![ecg_experts(4, 3 * MIN)]);
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "chest pain, rule out STEMI");
    h.run_for(30_000);

    assert!(matches!(h.case_at("county", case).unwrap().status, CaseStatus::Queued { .. }));
    assert!(h.case_at("city", case).is_none(), "the case must stop at the nearest tier that can read it");
    assert!(
        matches!(&h.case_at("village", case).unwrap().status, CaseStatus::Forwarded { to, .. } if to.as_str() == "township")
    );
    assert!(
        matches!(&h.case_at("township", case).unwrap().status, CaseStatus::Forwarded { to, .. } if to.as_str() == "county")
    );
    let trail = hops(&h, "county", case);
    let path: Vec<(&str, &str)> = trail.iter().map(|r| (r.from.as_str(), r.to.as_str())).collect();
    assert_eq!(path, [("village", "township"), ("township", "county")]);
    assert!(trail.iter().all(|r| r.reason == EscalationReason::NoLocalCapacity));
    assert_invariants(&h);
}

#[test]
fn confident_village_model_resolves_case_locally() {
    let mut h = Harness::seven_tier_chain(2);
    h.configure("village", |c| c.models = vec![ecg_model(0.95)]);
    h.node_mut("village").models.insert(
        "ecg-rhythm".into(),
        ModelScript { label: "normal_sinus_rhythm".into(), confidence: 0.98, run_ms: 800 },
    );
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "palpitations");
    h.run_for(10 * MIN);

    let report = report_at(&h, "village", case);
    assert!(report.machine_made);
    assert_eq!(
        report.reader,
        Reader::Model { model: "ecg-rhythm".into(), version: "1.0.0".into() },
        "the model spec's version"
    );
    assert_eq!(report.labels[0].label, "normal_sinus_rhythm");
    assert_eq!(h.case_at("village", case).unwrap().report_down, ReportDown::AtOrigin);
    assert!(h.delivered.iter().all(|(_, _, _, kind)| *kind != "case_offer"), "nothing should leave the village");
    assert!(h.events_at("village").any(|e| matches!(e, Event::ReportAtOrigin { case_id } if *case_id == case)));
    assert_invariants(&h);
}

#[test]
fn unsure_village_model_escalates_and_its_finding_travels_with_the_case() {
    let mut h = Harness::seven_tier_chain(3);
    h.configure("village", |c| c.models = vec![ecg_model(0.95)]);
    h.node_mut("village").models.insert(
        "ecg-rhythm".into(),
        ModelScript { label: "atrial_fibrillation".into(), confidence: 0.71, run_ms: 800 },
    );
    experts_everywhere(&mut h, "township", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "irregular pulse");
    h.run_for(10 * MIN);

    let trail = hops(&h, "township", case);
    assert!(
        matches!(&trail[0].reason, EscalationReason::ModelNotConfident { confidence, threshold, .. } if *confidence < *threshold)
    );
    let findings = &h.case_at("township", case).unwrap().findings;
    assert_eq!(findings.len(), 1, "the village model's finding must travel up");
    let report = report_at(&h, "village", case);
    assert!(!report.machine_made, "an unsure model must not issue the report");
    assert_invariants(&h);
}

#[test]
fn capacity_exhausted_at_county_sends_case_on_to_city() {
    let mut h = Harness::seven_tier_chain(4);
    // One county reader taking 6 min per ECG: a second STAT ECG cannot be read in 10 min.
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 6 * MIN)]);
    h.configure("city", |c| c.experts = vec![ecg_experts(3, 3 * MIN)]);
    let first = h.submit("village", Modality::Ecg, Urgency::Stat, "syncope");
    h.run_for(5_000);
    let second = h.submit("village", Modality::Ecg, Urgency::Stat, "chest pain");
    h.run_for(30_000);

    assert!(matches!(h.case_at("county", first).unwrap().status, CaseStatus::Queued { .. }));
    assert!(matches!(h.case_at("city", second).unwrap().status, CaseStatus::Queued { .. }));
    let trail = hops(&h, "city", second);
    let last = trail.last().unwrap();
    assert_eq!((last.from.as_str(), last.to.as_str()), ("county", "city"));
    assert!(matches!(last.reason, EscalationReason::QueueTooLong { eta_ms, time_left_ms } if eta_ms > time_left_ms));
    assert_invariants(&h);
}

#[test]
fn unclaimed_case_re_escalates_at_its_claim_deadline() {
    let mut h = Harness::seven_tier_chain(5);
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 3 * MIN)]); // on duty, but nobody claims
    experts_everywhere(&mut h, "city", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "bradycardia?");
    h.run_for(20_000);
    let CaseStatus::Queued { claim_deadline, .. } = h.case_at("county", case).unwrap().status else {
        panic!("expected the case queued at the county");
    };
    h.run_until(Millis(claim_deadline.0 - 1));
    assert!(h.case_at("city", case).is_none(), "must not move before its claim deadline");
    h.run_for(10 * MIN);

    let trail = hops(&h, "city", case);
    assert_eq!(trail.last().unwrap().reason, EscalationReason::ClaimTimeout);
    let report = report_at(&h, "village", case);
    assert_eq!(report.node.as_str(), "city");
    assert_invariants(&h);
}

#[test]
fn expert_can_escalate_manually_with_a_reason() {
    let mut h = Harness::seven_tier_chain(6);
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 3 * MIN)]);
    experts_everywhere(&mut h, "city", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Urgent, "wide QRS");
    h.run_for(10_000);
    let now = h.now;
    h.core_mut("county").handle_claim(now, case, "dr.wang").unwrap();
    assert!(
        h.core_mut("county").handle_claim(now, case, "dr.zhao").is_err(),
        "a claimed case cannot be claimed by another"
    );
    h.core_mut("county").handle_expert_escalate(now, case, "dr.wang", "needs electrophysiologist").unwrap();
    h.pump_all();
    h.run_for(10 * MIN);
    let trail = hops(&h, "city", case);
    assert!(
        matches!(&trail.last().unwrap().reason, EscalationReason::ExpertEscalated { expert, reason } if expert == "dr.wang" && reason.contains("electrophysiologist"))
    );
    assert_eq!(report_at(&h, "village", case).node.as_str(), "city");
    assert_invariants(&h);
}

/// A village with two townships above it: `township` (primary) and `township2`.
fn chain_with_alternate(seed: u64) -> Harness {
    let mut h = Harness::seven_tier_chain(seed);
    let mut alt = tiers::NodeConfig::new("township2", Tier::Township);
    alt.upstream =
        vec![Upstream { name: "county".into(), tier: Tier::County, public_key: Some(public_key_for("county")) }];
    h.add_node(alt);
    h.link("township2", "county");
    h.link("village", "township2");
    h.configure("village", |c| {
        c.upstream.push(Upstream {
            name: "township2".into(),
            tier: Tier::Township,
            public_key: Some(public_key_for("township2")),
        })
    });
    h
}

#[test]
fn parent_down_sends_case_to_alternate_parent() {
    let mut h = chain_with_alternate(7);
    experts_everywhere(&mut h, "county", Modality::Imaging);
    h.crash("township");
    let case = h.submit("village", Modality::Imaging, Urgency::Urgent, "fracture?");
    h.run_for(20 * MIN);

    let trail = hops(&h, "county", case);
    assert_eq!(trail[0].to.as_str(), "township2");
    assert!(
        matches!(&trail[0].reason, EscalationReason::Rerouted { unreachable } if unreachable.as_str() == "township")
    );
    assert_eq!(report_at(&h, "village", case).node.as_str(), "county");
    // The report came back down through the alternate, acknowledged at each hop.
    assert!(
        matches!(&h.case_at("township2", case).unwrap().report_down, ReportDown::Acked { to, .. } if to.as_str() == "village")
    );
    assert_invariants(&h);
}

#[test]
fn alternate_found_at_run_time_takes_the_case_stranded_on_a_dead_parent() {
    let mut h = chain_with_alternate(9);
    // The village knows only its primary; the alternate is learnt later (control plane).
    h.configure("village", |c| c.upstream.retain(|u| u.name.as_str() != "township2"));
    experts_everywhere(&mut h, "county", Modality::Imaging);
    h.crash("township");
    let case = h.submit("village", Modality::Imaging, Urgency::Urgent, "fracture?");
    h.run_for(5 * MIN);
    assert!(
        matches!(&h.case_at("village", case).unwrap().status, CaseStatus::Forwarding { to, .. } if to.as_str() == "township"),
        "with no alternate the case keeps waiting on the dead primary"
    );
    assert!(h.case_at("county", case).is_none());

    let now = h.now;
    let alternate =
        Upstream { name: "township2".into(), tier: Tier::Township, public_key: Some(public_key_for("township2")) };
    assert!(h.core_mut("village").handle_upstream_added(now, alternate.clone()));
    assert!(!h.core_mut("village").handle_upstream_added(now, alternate), "added once");
    let same_tier = Upstream { name: "village2".into(), tier: Tier::Village, public_key: None };
    assert!(!h.core_mut("village").handle_upstream_added(now, same_tier), "never a peer of the same tier");
    h.pump_all();
    h.run_for(20 * MIN);

    let trail = hops(&h, "county", case);
    assert_eq!(trail[0].to.as_str(), "township2");
    assert_eq!(report_at(&h, "village", case).node.as_str(), "county");
    assert_invariants(&h);
}

#[test]
fn duplicate_offer_creates_no_duplicate_case_or_report() {
    let mut h = Harness::seven_tier_chain(8);
    experts_everywhere(&mut h, "county", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Urgent, "tachycardia");
    h.run_for(20_000);
    // Re-send the village's offer, as a sender that lost the receipt would.
    let record = h.case_at("village", case).unwrap().clone();
    let offer = CaseOffer {
        manifest: record.manifest.clone(),
        trail: record.trail.clone(),
        findings: record.findings.clone(),
        identity: None,
    };
    let before = h.delivered.iter().filter(|d| d.3 == "case_offer").count();
    let now = h.now;
    for _ in 0..3 {
        h.core_mut("township").handle_message(now, &"village".into(), Message::CaseOffer(offer.clone())).unwrap();
    }
    h.run_for(30 * MIN);

    assert_eq!(h.node("township").store.len(), 1);
    assert_eq!(h.node("county").store.len(), 1);
    let offers_to_county = h.delivered.iter().filter(|d| d.3 == "case_offer" && d.2.as_str() == "county").count();
    assert_eq!(offers_to_county, 1, "the township must not offer the case up again");
    assert!(h.delivered.iter().filter(|d| d.3 == "case_offer").count() == before);
    let receipts_to_village =
        h.delivered.iter().filter(|d| d.3 == "custody_receipt" && d.2.as_str() == "village").count();
    assert_eq!(receipts_to_village, 4, "each (re-)offer is answered with a receipt");
    let reports = h
        .events
        .iter()
        .filter(|(_, n, e)| n.as_str() == "village" && matches!(e, Event::ReportAtOrigin { .. }))
        .count();
    assert_eq!(reports, 1);
    assert_invariants(&h);
}

#[test]
fn report_returns_to_origin_with_the_full_trail() {
    let mut h = Harness::seven_tier_chain(9);
    // A township model that is not sure, then nobody until the provincial hub.
    h.configure("township", |c| {
        c.models = vec![ModelSpec {
            id: "img-triage".into(),
            version: "0.3.0".into(),
            modality: Modality::Imaging,
            tasks: vec!["imaging.triage".into()],
            threshold: [0.97, 0.95, 0.9],
            cases_per_hour: 100,
        }]
    });
    h.node_mut("township").models.insert(
        "img-triage".into(),
        ModelScript { label: "opacity_right_lower_lobe".into(), confidence: 0.6, run_ms: 2_000 },
    );
    experts_everywhere(&mut h, "provincial", Modality::Imaging);
    let case = h.submit("village", Modality::Imaging, Urgency::Stat, "dyspnoea, fever");
    h.run_for(45 * MIN);

    let report = report_at(&h, "village", case);
    assert_eq!(report.node.as_str(), "provincial");
    assert_eq!(report.reader, Reader::Expert { expert: "dr.provincial".into() });
    let trail = hops(&h, "village", case);
    let path: Vec<&str> = trail.iter().map(|r| r.to.as_str()).collect();
    assert_eq!(path, ["township", "county", "city", "provincial"]);
    for pair in trail.windows(2) {
        assert!(pair[0].left_at <= pair[1].left_at, "hops are in order with times");
    }
    let origin = h.case_at("village", case).unwrap();
    assert_eq!(origin.findings.len(), 1, "the township model's finding is shown at the origin");
    for node in ["township", "county", "city"] {
        assert!(
            matches!(h.case_at(node, case).unwrap().report_down, ReportDown::Acked { .. }),
            "{node} must hold a receipt for the report"
        );
    }
    assert!(report.signed_at <= origin.info.deadline_at, "a STAT image read within 45 min");
    assert_invariants(&h);
}

#[test]
fn restart_between_persist_and_send_loses_nothing_at_the_origin() {
    let mut h = Harness::seven_tier_chain(10);
    experts_everywhere(&mut h, "township", Modality::Ecg);
    // The village crashes right after the case is written, before anything is sent.
    h.node_mut("village").crash_after_persists = Some(1);
    let case = h.submit("village", Modality::Ecg, Urgency::Urgent, "dizziness");
    assert!(h.node("village").core.is_none(), "the crash happened");
    assert!(h.node("village").store.get(&case).is_some(), "the case was durable before the crash");
    assert!(h.delivered.is_empty());
    h.run_for(MIN);
    h.restart("village");
    h.run_for(30 * MIN);
    assert_eq!(report_at(&h, "village", case).node.as_str(), "township");
    assert_invariants(&h);
}

#[test]
fn restart_between_custody_persist_and_receipt_loses_nothing() {
    let mut h = Harness::seven_tier_chain(11);
    experts_everywhere(&mut h, "county", Modality::Ecg);
    // The township persists "receiving" then "held", and crashes before the receipt leaves.
    h.node_mut("township").crash_after_persists = Some(2);
    let case = h.submit("village", Modality::Ecg, Urgency::Urgent, "ST depression");
    h.run_for(10_000);
    assert!(h.node("township").core.is_none(), "the crash happened");
    assert!(matches!(h.node("township").store.get(&case).unwrap().status, CaseStatus::Held));
    assert!(
        matches!(h.case_at("village", case).unwrap().status, CaseStatus::Forwarding { .. }),
        "the village keeps custody without a receipt"
    );
    h.run_for(MIN);
    h.restart("township");
    h.run_for(30 * MIN);
    assert!(matches!(&h.case_at("village", case).unwrap().status, CaseStatus::Reported { .. }));
    assert_eq!(report_at(&h, "village", case).node.as_str(), "county");
    assert_eq!(h.node("county").store.len(), 1);
    assert_invariants(&h);
}

#[test]
fn stat_ecg_skips_township_whose_advert_shows_no_capacity() {
    let mut h = Harness::seven_tier_chain(12);
    h.link("village", "county");
    h.configure("village", |c| {
        c.upstream.push(Upstream {
            name: "county".into(),
            tier: Tier::County,
            public_key: Some(public_key_for("county")),
        })
    });
    experts_everywhere(&mut h, "county", Modality::Ecg);
    let now = h.now;
    let township_advert = h.core("township").capacity_advert(now).unwrap();
    let county_advert = h.core("county").capacity_advert(now).unwrap();
    h.core_mut("village").handle_advert(now, &township_advert).unwrap();
    h.core_mut("village").handle_advert(now, &county_advert).unwrap();
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "STEMI?");
    h.run_for(10 * MIN);

    let trail = hops(&h, "village", case);
    assert_eq!(trail[0].to.as_str(), "county");
    assert_eq!(trail[0].skipped, vec![NodeName::from("township")]);
    assert!(h.case_at("township", case).is_none());
    assert_eq!(report_at(&h, "village", case).node.as_str(), "county");
    assert_invariants(&h);
}

#[test]
fn advert_signed_by_another_key_is_ignored() {
    let mut h = Harness::seven_tier_chain(13);
    let now = h.now;
    // The county's advert as the township would forge it: right name, wrong key.
    let advert = federation_proto::CapacityAdvert {
        node: "township".into(),
        tier: Tier::Township,
        issued_at: now,
        valid_until: now.saturating_add(60_000),
        capacity: vec![],
    };
    let forged = SignedEnvelope::sign(&tiers::harness::key_for("county"), content_type::ADVERT, &advert).unwrap();
    assert!(h.core_mut("village").handle_advert(now, &forged).is_err());
}

#[test]
fn recall_withdraws_the_case_along_its_path() {
    let mut h = Harness::seven_tier_chain(14);
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 3 * MIN)]);
    let case = h.submit("village", Modality::Ecg, Urgency::Routine, "routine check");
    h.run_for(20_000);
    assert!(matches!(h.case_at("county", case).unwrap().status, CaseStatus::Queued { .. }));
    let now = h.now;
    h.core_mut("village").handle_recall(now, case, "patient transferred").unwrap();
    h.run_for(MIN);
    for node in ["village", "township", "county"] {
        assert!(
            matches!(h.case_at(node, case).unwrap().status, CaseStatus::Recalled { .. }),
            "{node} must mark the case recalled"
        );
    }
    let now = h.now;
    assert!(h.core_mut("county").handle_claim(now, case, "dr.wang").is_err(), "a recalled case cannot be claimed");
    assert!(h.core_mut("township").handle_recall(now, case, "x").is_err(), "only the origin recalls");
    assert_invariants(&h);
}

#[test]
fn report_for_a_case_never_sent_is_refused() {
    let mut h = Harness::seven_tier_chain(15);
    let case = h.submit("village", Modality::Pathology, Urgency::Routine, "margin?");
    h.run_for(5_000);
    let now = h.now;
    let report = Report {
        case_id: case,
        node: "county".into(),
        tier: Tier::County,
        reader: Reader::Expert { expert: "mallory".into() },
        machine_made: false,
        labels: vec![],
        fields: vec![],
        text: "benign".into(),
        signed_at: now,
    };
    let env = SignedEnvelope::sign(&tiers::harness::key_for("county"), content_type::REPORT, &report).unwrap();
    let delivery = ReportDelivery { case_id: case, report: env, trail: vec![], findings: vec![] };
    // The county never had this case offered by the village.
    h.link("village", "county");
    let err =
        h.core_mut("village").handle_message(now, &"county".into(), Message::ReportDelivery(delivery)).unwrap_err();
    assert_eq!(err.code, federation_proto::RejectCode::NotCustodian);
    assert!(h.case_at("village", case).unwrap().report.is_none());
}

#[test]
fn offer_from_a_higher_tier_is_refused_as_wrong_direction() {
    let mut h = Harness::seven_tier_chain(16);
    experts_everywhere(&mut h, "county", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Urgent, "x");
    h.run_for(20_000);
    let record = h.case_at("county", case).unwrap().clone();
    let offer = CaseOffer { manifest: record.manifest, trail: record.trail, findings: vec![], identity: None };
    let now = h.now;
    // A parent offering a case down, whether or not the child knows it, is refused.
    for (to, from) in [("township", "county"), ("village", "township")] {
        let err = h.core_mut(to).handle_message(now, &from.into(), Message::CaseOffer(offer.clone())).unwrap_err();
        assert_eq!(err.code, federation_proto::RejectCode::WrongDirection, "{from} -> {to}");
    }
    assert_eq!(h.node("township").store.len(), 1);
    assert_invariants(&h);
}

#[test]
fn tampered_manifest_is_refused_with_bad_signature() {
    let mut h = Harness::seven_tier_chain(17);
    let case = h.submit("village", Modality::Ecg, Urgency::Urgent, "x");
    h.run_for(20_000);
    let record = h.case_at("township", case).unwrap().clone();
    let mut bytes = record.manifest.as_bytes().to_vec();
    let n = bytes.len();
    bytes[n - 70] ^= 0x01; // inside the payload
    let offer = CaseOffer {
        manifest: SignedEnvelope::from_bytes(bytes),
        trail: record.trail,
        findings: vec![],
        identity: None,
    };
    let now = h.now;
    let err = h.core_mut("county").handle_message(now, &"township".into(), Message::CaseOffer(offer)).unwrap_err();
    assert!(
        matches!(err.code, federation_proto::RejectCode::BadSignature | federation_proto::RejectCode::Malformed),
        "{err}"
    );
}

#[test]
fn same_seed_gives_the_same_run() {
    fn run(seed: u64) -> Vec<String> {
        let mut h = chain_with_alternate(seed);
        experts_everywhere(&mut h, "city", Modality::Ecg);
        experts_everywhere(&mut h, "county", Modality::Imaging);
        h.crash("township");
        for i in 0..5 {
            h.submit("village", if i % 2 == 0 { Modality::Ecg } else { Modality::Imaging }, Urgency::Urgent, "q");
            h.run_for(7_000);
        }
        h.run_for(60 * MIN);
        assert_invariants(&h);
        h.events.iter().map(|(t, n, e)| format!("{t} {n} {e:?}")).collect()
    }
    let a = run(42);
    assert_eq!(a, run(42));
    assert!(a.len() > 20);
}

#[test]
fn top_tier_without_capacity_keeps_the_case_and_says_so() {
    let mut h = Harness::seven_tier_chain(18);
    let case = h.submit("village", Modality::Pathology, Urgency::Routine, "rare tumour");
    h.run_for(30 * MIN);
    assert!(matches!(h.case_at("international", case).unwrap().status, CaseStatus::NoCapacity { .. }));
    assert!(h.events_at("international").any(|e| matches!(e, Event::NoCapacity { .. })));
    // Experts come on duty: the waiting case enters the queue.
    let now = h.now;
    h.core_mut("international").handle_experts_changed(
        now,
        vec![ExpertPool { modality: Modality::Pathology, on_duty: 1, service_ms: 30 * MIN }],
    );
    h.pump_all();
    assert!(matches!(h.case_at("international", case).unwrap().status, CaseStatus::Queued { .. }));
    assert_invariants(&h);
}

#[test]
fn finished_case_can_be_archived_but_one_still_in_flight_cannot() {
    let mut h = Harness::seven_tier_chain(5);
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 3 * MIN)]);
    h.node_mut("county").experts =
        Some(AutoExperts { name: "dr.county".into(), claim_after_ms: MIN, read_ms: 2 * MIN });
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "chest pain");
    // Held at the county, not read yet: nobody may forget it.
    h.run_for(MIN / 2);
    for node in ["village", "township", "county"] {
        assert!(h.core_mut(node).archive(case).is_err(), "{node} still owes work on the case");
    }
    h.run_for(30 * MIN);
    assert!(report_at(&h, "village", case).node.as_str() == "county");
    assert_invariants(&h);
    for node in ["village", "township", "county"] {
        h.core_mut(node).archive(case).unwrap_or_else(|e| panic!("{node}: {e}"));
        assert!(h.case_at(node, case).is_none());
        assert!(h.core(node).poll_timeout().is_none(), "{node}: no timer left for an archived case");
    }
    assert!(matches!(h.core_mut("city").archive(case), Err(tiers::ActionError::UnknownCase(_))));
    // With nothing held any more (its maps given back), a node carries the next case
    // exactly as the first.
    let next = h.submit("village", Modality::Ecg, Urgency::Stat, "chest pain again");
    h.run_for(30 * MIN);
    assert_eq!(report_at(&h, "village", next).node.as_str(), "county");
    assert!(h.core("township").case(&next).is_some_and(|c| matches!(c.report_down, ReportDown::Acked { .. })));
    assert_invariants(&h);
}

/// Ed25519 with a memory of opened envelopes shared by several nodes (as the
/// simulator's stand-in shares one per run), counting the checks it really makes.
struct SharedMemoryCrypto {
    inner: tiers::Ed25519Crypto,
    opened: Arc<Mutex<HashMap<(ContentHash, &'static str), PublicKey>>>,
    verifies: Arc<AtomicUsize>,
}

impl tiers::Crypto for SharedMemoryCrypto {
    fn public_key(&self) -> PublicKey {
        self.inner.public_key()
    }
    fn sign(&self, content_type: &str, payload: Vec<u8>) -> Result<SignedEnvelope, federation_proto::Error> {
        self.inner.sign(content_type, payload)
    }
    fn verify(
        &self,
        env: &SignedEnvelope,
        content_type: &str,
    ) -> Result<(PublicKey, Vec<u8>), federation_proto::Error> {
        self.verifies.fetch_add(1, Ordering::Relaxed);
        self.inner.verify(env, content_type)
    }
    fn recall_opened(&self, hash: &ContentHash, content_type: &str) -> Option<PublicKey> {
        let opened = self.opened.lock().unwrap();
        opened.iter().find(|((h, ct), _)| h == hash && *ct == content_type).map(|(_, signer)| *signer)
    }
    fn note_opened(&self, hash: &ContentHash, content_type: &'static str, signer: PublicKey) {
        self.opened.lock().unwrap().insert((*hash, content_type), signer);
    }
}

#[test]
fn a_crypto_memory_shared_by_nodes_spares_checking_what_another_node_opened() {
    let opened = Arc::new(Mutex::new(HashMap::new()));
    let verifies = Arc::new(AtomicUsize::new(0));
    let core = |name: &str, tier: Tier, upstream: Option<&str>, opened: &Arc<Mutex<_>>| {
        let mut config = tiers::NodeConfig::new(name, tier);
        config.upstream = upstream
            .map(|u| Upstream { name: u.into(), tier: Tier::Township, public_key: Some(public_key_for(u)) })
            .into_iter()
            .collect();
        config.experts = if tier == Tier::Township { vec![ecg_experts(1, 5 * MIN)] } else { Vec::new() };
        let crypto = SharedMemoryCrypto {
            inner: tiers::Ed25519Crypto::new(tiers::harness::key_for(name)),
            opened: Arc::clone(opened),
            verifies: Arc::clone(&verifies),
        };
        tiers::Node::with_crypto(config, Box::new(crypto))
    };
    let peer = |name: &str, tier: Tier| tiers::Peer { name: name.into(), tier, public_key: public_key_for(name) };
    let now = Millis(1_700_000_000_000);
    let offer_from = |village: &mut tiers::Node, to: &str| {
        village.handle_peer_up(now, peer(to, Tier::Township)).unwrap();
        let new = tiers::NewCase {
            case_id: federation_proto::CaseId([7; 16]),
            modality: Modality::Ecg,
            task: "ecg.rhythm".into(),
            urgency: Urgency::Stat,
            clinical_question: "chest pain".into(),
            patient: federation_proto::PatientRef { pseudonym: "p1".into(), sex: None, age_years: None },
            attachments: Vec::new(),
            deidentified: Vec::new(),
            identity: None,
        };
        village.handle_submit(now, new).unwrap();
        std::iter::from_fn(|| village.poll_output())
            .find_map(|o| match o {
                tiers::Output::Send { message: Message::CaseOffer(offer), .. } => Some(offer),
                _ => None,
            })
            .expect("the village offers the case up")
    };
    // The village signed the manifest and its hop: the township that shares its
    // memory opens both without checking them again, and takes the case as usual.
    let mut village = core("village", Tier::Village, Some("township"), &opened);
    let mut township = core("township", Tier::Township, None, &opened);
    let offer = offer_from(&mut village, "township");
    township.handle_peer_up(now, peer("village", Tier::Village)).unwrap();
    township.handle_message(now, &"village".into(), Message::CaseOffer(offer.clone())).unwrap();
    assert_eq!(verifies.load(Ordering::Relaxed), 0, "nothing checked twice within the shared memory");
    let queued = |node: &tiers::Node| {
        matches!(node.case(&federation_proto::CaseId([7; 16])).map(|c| &c.status), Some(CaseStatus::Queued { .. }))
    };
    assert!(queued(&township), "no attachments: custody at once, then the township's queue");
    // A township outside that memory checks every envelope itself, same outcome.
    let mut other = core("township", Tier::Township, None, &Arc::new(Mutex::new(HashMap::new())));
    other.handle_peer_up(now, peer("village", Tier::Village)).unwrap();
    other.handle_message(now, &"village".into(), Message::CaseOffer(offer.clone())).unwrap();
    assert_eq!(verifies.load(Ordering::Relaxed), 2, "manifest and hop checked");
    assert!(queued(&other));
}

#[test]
fn cases_waiting_for_a_parent_go_out_most_urgent_first_when_it_returns() {
    let mut h = Harness::seven_tier_chain(19);
    experts_everywhere(&mut h, "township", Modality::Ecg);
    h.crash("township");
    // Queued while the parent is down: routine first, then urgent, then STAT.
    let routine = h.submit("village", Modality::Ecg, Urgency::Routine, "routine");
    h.run_for(1_000);
    let urgent = h.submit("village", Modality::Ecg, Urgency::Urgent, "urgent");
    h.run_for(1_000);
    let stat = h.submit("village", Modality::Ecg, Urgency::Stat, "stat");
    h.run_for(10 * MIN);
    for id in [routine, urgent, stat] {
        assert!(
            matches!(h.case_at("village", id).unwrap().status, CaseStatus::Forwarding { .. }),
            "held at the village"
        );
    }
    h.restart("township");
    h.run_for(MIN);
    let urgency_of = |id: &federation_proto::CaseId| h.case_at("village", *id).unwrap().info.urgency;
    let firsts: Vec<Urgency> = h
        .events
        .iter()
        .filter(|(_, n, _)| n.as_str() == "township")
        .filter_map(|(_, _, e)| match e {
            Event::CustodyTaken { case_id, .. } => Some(urgency_of(case_id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        firsts,
        vec![Urgency::Stat, Urgency::Urgent, Urgency::Routine],
        "order in which the parent took custody"
    );
    assert_invariants(&h);
}

#[test]
fn a_claim_that_lapses_without_a_report_returns_the_case_to_the_queue() {
    let mut h = Harness::seven_tier_chain(20);
    h.configure("county", |c| c.experts = vec![ecg_experts(2, 3 * MIN)]);
    let case = h.submit("village", Modality::Ecg, Urgency::Routine, "routine ECG");
    h.run_for(20_000);
    let now = h.now;
    h.core_mut("county").handle_claim(now, case, "dr.wang").unwrap();
    h.pump_all();
    let CaseStatus::Claimed { lease_until, .. } = h.case_at("county", case).unwrap().status else { panic!("claimed") };
    assert_eq!(lease_until.0 - now.0, 9 * MIN, "three service times");
    h.run_until(Millis(lease_until.0 - 1));
    assert!(matches!(h.case_at("county", case).unwrap().status, CaseStatus::Claimed { .. }));
    h.run_for(2);
    assert!(matches!(h.case_at("county", case).unwrap().status, CaseStatus::Queued { .. }), "back in the queue");
    assert!(h.events_at("county").any(|e| matches!(e, Event::ClaimExpired { expert, .. } if expert == "dr.wang")));
    // Another expert can take it now.
    let now = h.now;
    h.core_mut("county").handle_claim(now, case, "dr.zhao").unwrap();
    assert_invariants(&h);
}

#[test]
fn a_lapsed_claim_on_a_stat_case_near_its_deadline_moves_the_case_on() {
    let mut h = Harness::seven_tier_chain(21);
    h.configure("county", |c| c.experts = vec![ecg_experts(1, 3 * MIN)]);
    experts_everywhere(&mut h, "city", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "STAT ECG");
    h.run_for(10_000);
    let now = h.now;
    h.core_mut("county").handle_claim(now, case, "dr.wang").unwrap();
    h.pump_all();
    h.run_for(20 * MIN);
    // Nine minutes into a ten-minute deadline there is no time for another county
    // reader: the case moves on at once rather than waiting in the queue.
    let trail = hops(&h, "city", case);
    let from_county = trail.iter().find(|r| r.from.as_str() == "county").expect("the county sent it on");
    assert_eq!(from_county.reason, EscalationReason::ClaimTimeout);
    assert!(h.events_at("county").any(|e| matches!(e, Event::ClaimExpired { .. })));
    assert_invariants(&h);
}

/// Where the origin-signed patient identity is held along a seven-tier climb, with
/// the given boundary configured at every node.
fn identity_holders(boundary: Option<Tier>) -> Vec<(String, bool)> {
    let mut h = Harness::seven_tier_chain(31);
    for node in ["village", "township", "county", "city", "provincial", "national", "international"] {
        h.configure(node, |c| c.privacy = tiers::PrivacyPolicy { identifiers_up_to: boundary });
    }
    h.configure("international", |c| c.experts = vec![ecg_experts(1, 5 * MIN)]);
    h.node_mut("international").experts =
        Some(AutoExperts { name: "dr.world".into(), claim_after_ms: MIN, read_ms: MIN });
    let case = h.submit("village", Modality::Ecg, Urgency::Routine, "rare rhythm");
    h.run_for(6 * 60 * MIN);
    let at_village = h.case_at("village", case).expect("at the origin");
    assert!(at_village.report.is_some(), "the report came back to the origin");
    ["village", "township", "county", "city", "provincial", "national", "international"]
        .iter()
        .map(|n| (n.to_string(), h.case_at(n, case).expect("case climbed through every tier").identity.is_some()))
        .collect()
}

#[test]
fn direct_identifiers_stay_at_the_origin_by_default_and_up_to_a_configured_boundary() {
    let held = |b| identity_holders(b).into_iter().filter(|(_, h)| *h).map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(held(None), ["village"], "default: the origin only");
    assert_eq!(held(Some(Tier::County)), ["village", "township", "county"]);
    // International never, whatever the policy says.
    assert_eq!(held(Some(Tier::International)), ["village", "township", "county", "city", "provincial", "national"]);
}

#[test]
fn only_the_first_label_of_a_model_read_decides_and_details_never_resolve_a_case() {
    // A model answers "chest X-ray, 0.62" with a confident quality detail after it:
    // the detail's 0.99 must not make the read decisive.
    let mut h = Harness::seven_tier_chain(11);
    h.configure("village", |c| c.models = vec![ecg_model(0.95)]);
    // A slow scripted model keeps the case waiting for the read we hand in below.
    h.node_mut("village")
        .models
        .insert("ecg-rhythm".into(), ModelScript { label: "late".into(), confidence: 1.0, run_ms: 60 * MIN });
    experts_everywhere(&mut h, "township", Modality::Ecg);
    let case = h.submit("village", Modality::Ecg, Urgency::Stat, "palpitations");
    h.run_for(1_000);
    assert!(matches!(h.case_at("village", case).unwrap().status, CaseStatus::AwaitingModel { .. }));
    let now = h.now;
    let outcome = tiers::ModelOutcome {
        model: "ecg-rhythm".into(),
        version: "1.0.0".into(),
        labels: vec![
            federation_proto::Label { label: "atrial_fibrillation".into(), confidence: 0.62 },
            federation_proto::Label { label: "signal_quality_adequate".into(), confidence: 0.99 },
        ],
    };
    h.node_mut("village").core.as_mut().unwrap().handle_model_result(now, case, Ok(outcome)).unwrap();
    h.run_for(10 * MIN);

    let trail = hops(&h, "township", case);
    assert!(matches!(
        &trail[0].reason,
        EscalationReason::ModelNotConfident { confidence, .. } if (*confidence - 0.62).abs() < 1e-6
    ));
    let finding = h.case_at("township", case).unwrap().findings[0]
        .open::<federation_proto::Finding>(content_type::FINDING)
        .unwrap()
        .body;
    assert_eq!(finding.labels.len(), 2, "the finding carries every label, details included");
    assert!(!report_at(&h, "village", case).machine_made);
    assert_invariants(&h);
}

#[test]
fn capacity_advert_states_model_tasks_and_measured_speed() {
    let mut h = Harness::seven_tier_chain(12);
    h.configure("village", |c| c.models = vec![ecg_model(0.95)]);
    let advert = h.node_mut("village").core.as_ref().unwrap().capacity_advert(Millis(1)).unwrap();
    let advert = advert.open::<federation_proto::CapacityAdvert>(content_type::ADVERT).unwrap().body;
    let ecg = advert.capacity.iter().find(|c| c.modality == Modality::Ecg).unwrap();
    assert_eq!(ecg.model_tasks, ["ecg.rhythm"]);
    assert_eq!(ecg.model_cases_per_hour, 600, "the model spec's measured speed");
    let imaging = advert.capacity.iter().find(|c| c.modality == Modality::Imaging).unwrap();
    assert_eq!(imaging.model_cases_per_hour, 0);
}
