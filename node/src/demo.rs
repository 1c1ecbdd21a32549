//! The seven-tier demo federation, run in one process.
//!
//! Until the data plane lands (issue #4), the demo drives seven real `tiers` cores
//! through the in-memory harness (simulated time, no sockets): a village clinic
//! submits cases, and the demo prints each case's life — model reads, escalation
//! hops with their reasons, custody transfers, the report and its trail.
//! This module must never hold escalation logic; it only configures and narrates.

use federation_proto::{CaseId, HopRecord, Millis, Modality, Reader, Report, Urgency, content_type};
use std::fmt::Write as _;
use tiers::harness::{AutoExperts, Harness, ModelScript};
use tiers::{Event, ExpertPool, ModelSpec};

const MIN: u64 = 60_000;

/// Builds the demo federation: a seven-tier chain with an ECG model at the village,
/// an imaging model at the township, and experts from the county up.
pub fn federation(seed: u64) -> Harness {
    let mut h = Harness::seven_tier_chain(seed);
    h.configure("village", |c| {
        c.models = vec![ModelSpec {
            id: "ecg-rhythm".into(),
            version: "0.1.0".into(),
            modality: Modality::Ecg,
            tasks: vec!["ecg.rhythm".into()],
            threshold: [0.95, 0.9, 0.85],
            cases_per_hour: 600,
        }]
    });
    h.node_mut("village").models.insert(
        "ecg-rhythm".into(),
        ModelScript { label: "normal_sinus_rhythm".into(), confidence: 0.97, run_ms: 900 },
    );
    h.configure("township", |c| {
        c.models = vec![ModelSpec {
            id: "img-triage".into(),
            version: "0.1.0".into(),
            modality: Modality::Imaging,
            tasks: vec!["imaging.triage".into()],
            threshold: [0.97, 0.95, 0.9],
            cases_per_hour: 120,
        }]
    });
    h.node_mut("township").models.insert(
        "img-triage".into(),
        ModelScript { label: "possible_consolidation".into(), confidence: 0.62, run_ms: 2_500 },
    );
    let staff: [(&str, Modality, u32); 4] = [
        ("county", Modality::Imaging, 1),
        ("city", Modality::Imaging, 3),
        ("provincial", Modality::Pathology, 2),
        ("national", Modality::Pathology, 4),
    ];
    for (node, modality, on_duty) in staff {
        h.configure(node, |c| c.experts = vec![ExpertPool { modality, on_duty, service_ms: 8 * MIN }]);
        h.node_mut(node).experts =
            Some(AutoExperts { name: format!("dr.{node}"), claim_after_ms: 2 * MIN, read_ms: 6 * MIN });
    }
    h
}

/// Runs the demo and returns its narration.
pub fn run(seed: u64) -> String {
    let mut h = federation(seed);
    let start = h.now;
    let cases = [
        (Modality::Ecg, Urgency::Stat, "palpitations, 12-lead ECG"),
        (Modality::Imaging, Urgency::Stat, "fever and dyspnoea, chest X-ray"),
        (Modality::Pathology, Urgency::Routine, "skin lesion biopsy, margins?"),
    ];
    let mut ids = Vec::new();
    for (modality, urgency, question) in cases {
        ids.push((h.submit("village", modality, urgency, question), question));
        h.run_for(30_000);
    }
    h.run_for(3 * 60 * MIN);

    let mut out = String::new();
    let _ = writeln!(out, "Seven-tier demo federation (in-process cores, simulated time; seed {seed})\n");
    for (id, question) in &ids {
        narrate(&mut out, &h, *id, question, start);
    }
    let problems = h.check_invariants();
    let _ = writeln!(
        out,
        "Invariants (no case lost, none read twice): {}",
        if problems.is_empty() { "hold".to_owned() } else { format!("BROKEN: {problems:?}") }
    );
    out
}

fn narrate(out: &mut String, h: &Harness, id: CaseId, question: &str, start: Millis) {
    let t = |m: Millis| format!("+{:>5.1} min", m.saturating_sub(start) as f64 / 60_000.0);
    let Some(record) = h.case_at("village", id) else { return };
    let info = &record.info;
    let _ = writeln!(out, "Case {id} — {} {} — \"{question}\"", info.urgency, info.modality);
    let _ = writeln!(out, "  deadline {}", t(info.deadline_at));
    for (at, node, event) in h.events.iter().filter(|(_, _, e)| event_case(e) == Some(id)) {
        let line = match event {
            Event::CaseCreated { .. } => "case created and signed".to_owned(),
            Event::ModelRead { model, confidence, decisive, .. } => {
                format!(
                    "model {model} read it, confidence {confidence:.2}{}",
                    if *decisive { " (decisive)" } else { " (not sure)" }
                )
            }
            Event::Queued { .. } => "entered the consult queue".to_owned(),
            Event::Claimed { expert, .. } => format!("claimed by {expert}"),
            Event::Escalating { to, reason, .. } => format!("escalating to {to}: {reason}"),
            Event::CustodyPassed { to, .. } => format!("custody passed to {to} (signed receipt)"),
            Event::Reported { machine_made, .. } => {
                format!("report signed{}", if *machine_made { " (machine-made)" } else { "" })
            }
            Event::ReportReceived { from, .. } => format!("report received from {from}, acknowledged"),
            Event::ReportAtOrigin { .. } => "report is at the clinic".to_owned(),
            _ => continue,
        };
        let _ = writeln!(out, "  {} {node:>13}  {line}", t(*at));
    }
    if let Some(report) = record.report.as_ref().and_then(|r| r.open::<Report>(content_type::REPORT).ok()) {
        let reader = match &report.body.reader {
            Reader::Model { model, version } => format!("model {model} {version}"),
            Reader::Expert { expert } => format!("expert {expert}"),
        };
        let hops: Vec<String> = record
            .trail
            .iter()
            .filter_map(|e| e.open::<HopRecord>(content_type::HOP).ok())
            .map(|v| format!("{}→{}", v.body.from, v.body.to))
            .collect();
        let within = if report.body.signed_at <= info.deadline_at { "within" } else { "PAST" };
        let _ = writeln!(
            out,
            "  => read at {} ({}) by {reader}, {within} deadline; trail: {}\n",
            report.body.node,
            report.body.tier,
            if hops.is_empty() { "none (read locally)".to_owned() } else { hops.join(", ") }
        );
    } else {
        let _ = writeln!(out, "  => no report yet\n");
    }
}

fn event_case(e: &Event) -> Option<CaseId> {
    match e {
        Event::CaseCreated { case_id }
        | Event::CustodyTaken { case_id, .. }
        | Event::ModelRead { case_id, .. }
        | Event::Queued { case_id, .. }
        | Event::Claimed { case_id, .. }
        | Event::Escalating { case_id, .. }
        | Event::CustodyPassed { case_id, .. }
        | Event::Reported { case_id, .. }
        | Event::ReportReceived { case_id, .. }
        | Event::ReportAtOrigin { case_id }
        | Event::Recalled { case_id }
        | Event::ConflictingReport { case_id, .. }
        | Event::NoCapacity { case_id } => Some(*case_id),
        Event::PeerRefused { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_reads_every_case_and_keeps_the_invariants() {
        let text = super::run(7);
        assert_eq!(text.matches("=> read at").count(), 3, "{text}");
        assert!(text.contains("Invariants (no case lost, none read twice): hold"), "{text}");
        assert!(text.contains("machine-made"), "the village ECG model resolves the ECG: {text}");
    }
}
