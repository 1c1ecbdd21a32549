//! What people see of a case: the decoded manifest, trail, findings and report, as
//! `telemed-node show` prints it and (later) the web pages render it.
//!
//! This module must never change a case; it only reads signed records it is given.

use federation_proto::{Finding, HopRecord, Millis, Report, content_type};
use serde::{Deserialize, Serialize};
use tiers::{CaseRecord, CaseStatus};

/// One hop of the trail, decoded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopView {
    pub from: String,
    pub from_tier: String,
    pub to: String,
    pub to_tier: String,
    pub arrived_at_ms: u64,
    pub left_at_ms: u64,
    pub reason: String,
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FindingView {
    pub node: String,
    pub tier: String,
    pub reader: String,
    pub labels: Vec<(String, f32)>,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportView {
    pub node: String,
    pub tier: String,
    pub reader: String,
    pub machine_made: bool,
    pub labels: Vec<(String, f32)>,
    pub fields: Vec<(String, String)>,
    pub text: String,
    pub signed_at_ms: u64,
}

/// A case as shown to people.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseView {
    pub case_id: String,
    pub origin: String,
    pub modality: String,
    pub urgency: String,
    pub task: String,
    pub question: String,
    /// The pseudonym the case travels under.
    pub patient: String,
    /// The patient's direct identifiers, only where this node holds them (the
    /// origin, and tiers up to the privacy boundary): how the report finds its
    /// patient.
    #[serde(default)]
    pub identity: Option<federation_proto::PatientIdentity>,
    pub status: String,
    /// Where the case is, in words.
    pub where_: String,
    pub created_at_ms: u64,
    pub deadline_at_ms: u64,
    pub updated_at_ms: u64,
    pub attachments: Vec<(String, u64, String)>,
    pub trail: Vec<HopView>,
    pub findings: Vec<FindingView>,
    pub report: Option<ReportView>,
}

fn reader_name(r: &federation_proto::Reader) -> String {
    match r {
        federation_proto::Reader::Model { model, version } => format!("model {model} {version}"),
        federation_proto::Reader::Expert { expert } => format!("expert {expert}"),
    }
}

fn labels(l: &[federation_proto::Label]) -> Vec<(String, f32)> {
    l.iter().map(|l| (l.label.clone(), l.confidence)).collect()
}

impl CaseView {
    pub fn of(record: &CaseRecord) -> CaseView {
        let info = &record.info;
        let trail = record
            .trail
            .iter()
            .filter_map(|e| e.open::<HopRecord>(content_type::HOP).ok())
            .map(|v| HopView {
                from: v.body.from.to_string(),
                from_tier: v.body.from_tier.to_string(),
                to: v.body.to.to_string(),
                to_tier: v.body.to_tier.to_string(),
                arrived_at_ms: v.body.arrived_at.0,
                left_at_ms: v.body.left_at.0,
                reason: v.body.reason.to_string(),
                skipped: v.body.skipped.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let findings = record
            .findings
            .iter()
            .filter_map(|e| e.open::<Finding>(content_type::FINDING).ok())
            .map(|v| FindingView {
                node: v.body.node.to_string(),
                tier: v.body.tier.to_string(),
                reader: reader_name(&v.body.reader),
                labels: labels(&v.body.labels),
                at_ms: v.body.at.0,
            })
            .collect();
        let report =
            record.report.as_ref().and_then(|e| e.open::<Report>(content_type::REPORT).ok()).map(|v| ReportView {
                node: v.body.node.to_string(),
                tier: v.body.tier.to_string(),
                reader: reader_name(&v.body.reader),
                machine_made: v.body.machine_made,
                labels: labels(&v.body.labels),
                fields: v.body.fields.clone(),
                text: v.body.text.clone(),
                signed_at_ms: v.body.signed_at.0,
            });
        let where_ = match &record.status {
            CaseStatus::Receiving => "receiving attachments".to_owned(),
            CaseStatus::Held => "held here, deciding".to_owned(),
            CaseStatus::AwaitingModel { model } => format!("being read by model {model}"),
            CaseStatus::Queued { .. } => "in the local consult queue".to_owned(),
            CaseStatus::Claimed { expert, .. } => format!("being read by {expert}"),
            CaseStatus::Forwarding { to, attempts, answered, .. } => format!(
                "waiting to hand over to {to} ({}; {attempts} attempt(s))",
                if *answered { "accepted, transferring" } else { "not yet answered" }
            ),
            CaseStatus::Forwarded { to, .. } => format!("handed over to {to}; waiting for the report"),
            CaseStatus::Reported { .. } => "reported".to_owned(),
            CaseStatus::Recalled { .. } => "recalled".to_owned(),
            CaseStatus::NoCapacity { .. } => "no capacity anywhere above; waiting".to_owned(),
        };
        CaseView {
            case_id: info.case_id.to_string(),
            origin: info.origin.to_string(),
            modality: info.modality.to_string(),
            urgency: info.urgency.to_string(),
            task: info.task.clone(),
            question: info.clinical_question.clone(),
            patient: info.patient.pseudonym.clone(),
            identity: record
                .identity
                .as_ref()
                .and_then(|env| env.open::<federation_proto::PatientIdentity>(content_type::PATIENT_IDENTITY).ok())
                .map(|v| v.body)
                .filter(|p| p.case_id == info.case_id),
            status: record.status.name().to_owned(),
            where_,
            created_at_ms: info.created_at.0,
            deadline_at_ms: info.deadline_at.0,
            updated_at_ms: record.updated_at.0,
            attachments: info
                .attachments
                .iter()
                .map(|a| (a.name.clone(), a.size_bytes, a.media_type.clone()))
                .collect(),
            trail,
            findings,
            report,
        }
    }

    /// Human-readable rendering, times relative to the case's creation.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let rel = |ms: u64| format!("+{:.1} min", ms.saturating_sub(self.created_at_ms) as f64 / 60_000.0);
        let mut out = String::new();
        let _ = writeln!(out, "case {}  {} {}  from {}", self.case_id, self.urgency, self.modality, self.origin);
        let _ = writeln!(out, "  question: {}", self.question);
        let _ = writeln!(out, "  patient:  {}", self.patient);
        if let Some(p) = &self.identity {
            let _ = writeln!(out, "  identity: {} {} born {}", p.patient_id, p.name, p.birth_date);
        }
        let _ = writeln!(out, "  status:   {} — {} (deadline {})", self.status, self.where_, rel(self.deadline_at_ms));
        for (name, size, media) in &self.attachments {
            let _ = writeln!(out, "  attachment {name} ({size} bytes, {media})");
        }
        if !self.trail.is_empty() {
            let _ = writeln!(out, "  trail:");
            for h in &self.trail {
                let _ = writeln!(
                    out,
                    "    {} {} ({}) → {} ({}): {}",
                    rel(h.left_at_ms),
                    h.from,
                    h.from_tier,
                    h.to,
                    h.to_tier,
                    h.reason
                );
            }
        }
        for f in &self.findings {
            let _ =
                writeln!(out, "  finding at {} ({}) by {}: {:?} {}", f.node, f.tier, f.reader, f.labels, rel(f.at_ms));
        }
        match &self.report {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "  report by {} at {} ({}){}, signed {}:",
                    r.reader,
                    r.node,
                    r.tier,
                    if r.machine_made { " [machine-made]" } else { "" },
                    rel(r.signed_at_ms)
                );
                for (k, v) in &r.fields {
                    let _ = writeln!(out, "    {k}: {v}");
                }
                let _ = writeln!(out, "    {}", r.text);
            }
            None => {
                let _ = writeln!(out, "  no report yet");
            }
        }
        out
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now() -> Millis {
    Millis(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}
