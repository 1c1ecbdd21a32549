//! A case as one node holds it: the signed material, where it came from, where it is
//! in its life here, and the report on its way down.
//!
//! A [`CaseRecord`] is the unit of persistence: the core hands whole records to the
//! store (`Change::PutCase`), and a node restarts from the records alone.
//! This module must never hold decisions; [`crate::node`] makes them.

use federation_proto::{CaseManifest, ContentHash, Millis, NodeName, SignedEnvelope};
use serde::{Deserialize, Serialize};

/// Where a case stands at this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum CaseStatus {
    /// Offer accepted; attachments still arriving. The sender keeps custody.
    Receiving,
    /// Held durably here; the local decision has not run yet (or must run again).
    Held,
    /// A local model is reading it.
    AwaitingModel { model: String },
    /// In the local consult queue, waiting for an expert.
    Queued {
        since: Millis,
        claim_deadline: Millis,
        /// The expert whose claim lapsed, if that is how the case came back here:
        /// they may still sign it while nobody else has claimed it.
        #[serde(default)]
        lapsed_claim: Option<String>,
    },
    /// An expert is reading it.
    /// An expert is reading it. If no report comes by `lease_until` (the expert
    /// walked away, or the reading station crashed), it goes back to the queue.
    Claimed {
        expert: String,
        at: Millis,
        #[serde(default)]
        lease_until: Millis,
    },
    /// Offered to `to`; custody stays here until its receipt arrives.
    Forwarding {
        to: NodeName,
        /// The signed hop record naming `to`, sent with every (re-)offer.
        hop: SignedEnvelope,
        attempts: u32,
        next_retry_at: Millis,
        /// `to` answered (accepted or already had it): do not reroute away from it.
        answered: bool,
    },
    /// Custody passed to `to` at `at`; the report will come back from there.
    Forwarded { to: NodeName, at: Millis },
    /// A report exists here (read here, or received from above).
    Reported { at: Millis },
    /// The origin withdrew the case.
    Recalled { at: Millis },
    /// Top of the hierarchy and nobody can read it: waits for capacity.
    NoCapacity { since: Millis },
}

impl CaseStatus {
    pub fn name(&self) -> &'static str {
        match self {
            CaseStatus::Receiving => "receiving",
            CaseStatus::Held => "held",
            CaseStatus::AwaitingModel { .. } => "awaiting_model",
            CaseStatus::Queued { .. } => "queued",
            CaseStatus::Claimed { .. } => "claimed",
            CaseStatus::Forwarding { .. } => "forwarding",
            CaseStatus::Forwarded { .. } => "forwarded",
            CaseStatus::Reported { .. } => "reported",
            CaseStatus::Recalled { .. } => "recalled",
            CaseStatus::NoCapacity { .. } => "no_capacity",
        }
    }

    /// Whether this node still holds custody (it must not lose the case).
    pub fn holds_custody(&self) -> bool {
        !matches!(self, CaseStatus::Receiving | CaseStatus::Forwarded { .. })
    }
}

/// Delivery of the report one tier down (toward the origin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ReportDown {
    /// No report yet, or this node is the origin.
    None,
    /// Sent to `to`, not yet acknowledged.
    Pending { to: NodeName, attempts: u32, next_retry_at: Millis },
    /// `to` acknowledged it with a signed receipt (kept here).
    Acked { to: NodeName, receipt: SignedEnvelope },
    /// This node is the origin: the report is here for the clinic.
    AtOrigin,
}

/// Everything one node keeps about one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    /// The origin-signed manifest, exact bytes.
    pub manifest: SignedEnvelope,
    /// The manifest decoded (after its signature was checked).
    pub info: CaseManifest,
    /// Signed hop records, oldest first.
    pub trail: Vec<SignedEnvelope>,
    /// Signed findings, oldest first.
    pub findings: Vec<SignedEnvelope>,
    /// The child that handed the case here; `None` at the origin.
    pub came_from: Option<NodeName>,
    pub arrived_at: Millis,
    /// Attachments held durably here.
    pub held: Vec<ContentHash>,
    pub status: CaseStatus,
    /// The local model already read it here (do not read twice).
    pub model_tried: bool,
    /// Peers offered this case (a report from any of them is accepted).
    pub offered_to: Vec<NodeName>,
    /// Peers that refused it; not offered again.
    pub refused_by: Vec<NodeName>,
    /// The signed report, once there is one.
    pub report: Option<SignedEnvelope>,
    pub report_down: ReportDown,
    /// The signed receipt from the node that took custody from here.
    pub custody_receipt: Option<SignedEnvelope>,
    pub updated_at: Millis,
    /// The origin-signed `PatientIdentity`, held only where the privacy policy
    /// allows (at the origin, and up to the boundary).
    #[serde(default)]
    pub identity: Option<SignedEnvelope>,
}

impl CaseRecord {
    pub fn missing_attachments(&self) -> Vec<ContentHash> {
        self.info.attachments.iter().map(|a| a.hash).filter(|h| !self.held.contains(h)).collect()
    }

    /// Whether the case still needs this node's work or attention.
    pub fn is_active(&self) -> bool {
        match &self.status {
            CaseStatus::Reported { .. } => matches!(self.report_down, ReportDown::Pending { .. }),
            CaseStatus::Forwarded { .. } | CaseStatus::Recalled { .. } => false,
            _ => true,
        }
    }
}
