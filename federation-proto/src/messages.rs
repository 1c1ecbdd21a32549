//! Every message of a case's life on the wire, from hello to recall.
//!
//! Structs are encoded as CBOR maps keyed by field name, so a peer running a newer
//! version may add fields and an older peer still decodes what it knows. Fields
//! added later must be `#[serde(default)]` so that older peers' messages decode too.
//! Anything that must survive several hops unchanged (the manifest, hop records,
//! findings, receipts, reports, adverts, recalls) travels as a [`SignedEnvelope`]
//! whose exact bytes are kept.
//!
//! This module must never hold behaviour: it is the vocabulary only.

use crate::envelope::SignedEnvelope;
use crate::types::*;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build still accepts.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// ALPN identifier of the data plane.
pub const ALPN: &[u8] = b"telemed-fed/1";

/// What a node says about itself in a hello. The claims must match the node's
/// verified certificate; the receiver checks that before acknowledging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeClaim {
    pub name: NodeName,
    pub tier: Tier,
    pub public_key: PublicKey,
}

/// First message on a new link, from the connecting side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub protocol_version_min: u16,
    pub node: NodeClaim,
    /// Free-form software identification, for logs only.
    #[serde(default)]
    pub software: String,
}

/// The accepting side's answer: the link is trusted only once this arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The version both sides will speak (the highest both support).
    pub protocol_version: u16,
    pub node: NodeClaim,
}

/// Machine-readable reasons for refusing something. Unknown codes from newer peers
/// decode as [`RejectCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// No common protocol version.
    VersionUnsupported,
    /// The hello's claims do not match the verified certificate.
    IdentityMismatch,
    /// A signature did not verify.
    BadSignature,
    /// The message could not be decoded or breaks a protocol rule.
    Malformed,
    /// The sender may not send this here (e.g. a case offered downwards).
    WrongDirection,
    /// The receiver is at its limit; try an alternate.
    Busy,
    /// The message refers to a case the receiver does not know.
    UnknownCase,
    /// The message refers to a case the sender has no standing on.
    NotCustodian,
    /// The case was recalled by its origin.
    Recalled,
    /// An attachment's bytes do not match its hash.
    HashMismatch,
    /// A requested byte range lies outside the attachment.
    RangeOutOfBounds,
    /// A message replayed outside its validity window.
    Replayed,
    /// Any code this build does not know.
    #[serde(other)]
    Other,
}

/// A patient reference as the origin chooses to send it. Direct identifiers stay
/// at the origin where policy says so; above the privacy boundary only the
/// pseudonym travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRef {
    /// Stable pseudonym, unique within the origin.
    pub pseudonym: String,
    /// Sex and age band are often clinically needed and not directly identifying.
    #[serde(default)]
    pub sex: Option<String>,
    #[serde(default)]
    pub age_years: Option<u16>,
}

/// A patient's direct identifiers, signed by the origin as a separate envelope
/// ([`crate::content_type::PATIENT_IDENTITY`]) that travels beside the case only to
/// nodes the federation's privacy policy allows (never above the boundary, never
/// to an international node). The manifest itself never carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientIdentity {
    pub case_id: CaseId,
    /// The pseudonym the manifest carries, tying the two together.
    pub pseudonym: String,
    /// The patient ID or national ID-card number.
    pub patient_id: String,
    #[serde(default)]
    pub name: String,
    /// As written at the origin (e.g. `1980-01-01`).
    #[serde(default)]
    pub birth_date: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub phone: String,
}

/// An attachment the origin de-identified before signing the manifest: which
/// original it was made from (the original stays at the origin) and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deidentification {
    /// The de-identified attachment, as listed in `attachments`.
    pub hash: ContentHash,
    /// The identified original, held only at the origin.
    pub original_hash: ContentHash,
    /// E.g. the DICOM PS3.15 profile applied.
    pub method: String,
}

/// Whether an attachment should travel before bulk data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Small parts a reader needs first: the ECG, key images, the AI summary.
    Urgent,
    /// Full studies, whole slides.
    Bulk,
}

/// One file of a case, addressed by the content hash (BLAKE3) of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRef {
    pub hash: ContentHash,
    pub size_bytes: u64,
    /// IANA media type, e.g. `application/dicom`.
    pub media_type: String,
    /// A file name for people; never used as a path.
    #[serde(default)]
    pub name: String,
    pub priority: Priority,
}

/// The case as its origin created it. Signed by the origin and never changed after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseManifest {
    pub case_id: CaseId,
    pub origin: NodeName,
    pub origin_tier: Tier,
    pub modality: Modality,
    /// The reading task, e.g. `ecg.rhythm`; models advertise the tasks they cover.
    pub task: String,
    pub urgency: Urgency,
    pub clinical_question: String,
    pub patient: PatientRef,
    pub created_at: Millis,
    /// The report is wanted by then; set by the origin from its deadline policy.
    pub deadline_at: Millis,
    pub attachments: Vec<AttachmentRef>,
    /// Attachments de-identified at the origin, with their originals' hashes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deidentified: Vec<Deidentification>,
}

/// Why a case left a node for the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EscalationReason {
    /// No model or expert here could take it.
    NoLocalCapacity,
    /// A local model read it but was not confident enough for this urgency.
    ModelNotConfident { model: String, confidence: f32, threshold: f32 },
    /// Experts are on duty but their queue cannot meet the deadline.
    QueueTooLong { eta_ms: u64, time_left_ms: u64 },
    /// Nobody claimed it before the claim deadline.
    ClaimTimeout,
    /// An expert sent it on, with a reason.
    ExpertEscalated { expert: String, reason: String },
    /// The previous custodian refused it or was unreachable; this is the next try.
    Rerouted { unreachable: NodeName },
}

impl std::fmt::Display for EscalationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EscalationReason::NoLocalCapacity => f.write_str("no model or expert here for this case"),
            EscalationReason::ModelNotConfident { model, confidence, threshold } => {
                write!(f, "model {model} not confident enough ({confidence:.2} < {threshold:.2})")
            }
            EscalationReason::QueueTooLong { eta_ms, time_left_ms } => {
                write!(f, "local queue too long (read in ~{} min, {} min left)", eta_ms / 60_000, time_left_ms / 60_000)
            }
            EscalationReason::ClaimTimeout => f.write_str("nobody claimed it before the claim deadline"),
            EscalationReason::ExpertEscalated { expert, reason } => write!(f, "{expert} escalated it: {reason}"),
            EscalationReason::Rerouted { unreachable } => write!(f, "{unreachable} unreachable or refused; rerouted"),
        }
    }
}

/// One step of the escalation trail, signed by the node that sent the case on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopRecord {
    pub case_id: CaseId,
    pub from: NodeName,
    pub from_tier: Tier,
    pub to: NodeName,
    pub to_tier: Tier,
    /// When the case arrived at `from` (custody taken or created).
    pub arrived_at: Millis,
    /// When `from` decided to send it on.
    pub left_at: Millis,
    /// Tiers between `from` and `to` skipped because their adverts showed no capacity.
    #[serde(default)]
    pub skipped: Vec<NodeName>,
    pub reason: EscalationReason,
}

/// A label with its calibrated confidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub label: String,
    pub confidence: f32,
}

/// Who or what made a finding or report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Reader {
    /// A machine reading: the model and its version.
    Model { model: String, version: String },
    /// A human expert, by their account name at `node`.
    Expert { expert: String },
}

/// A reading made on the way, kept with the case whether or not it was decisive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub case_id: CaseId,
    pub node: NodeName,
    pub tier: Tier,
    pub reader: Reader,
    pub labels: Vec<Label>,
    pub at: Millis,
}

/// The answer to a case. Signed by the node where it was read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub case_id: CaseId,
    pub node: NodeName,
    pub tier: Tier,
    pub reader: Reader,
    /// True when a model, not a person, made this report.
    pub machine_made: bool,
    pub labels: Vec<Label>,
    /// Structured fields (name → value) and free text.
    #[serde(default)]
    pub fields: Vec<(String, String)>,
    pub text: String,
    pub signed_at: Millis,
}

/// Offer of custody of a case to the next node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseOffer {
    /// The origin-signed [`CaseManifest`].
    pub manifest: SignedEnvelope,
    /// Signed [`HopRecord`]s, oldest first; the last one names the receiver.
    pub trail: Vec<SignedEnvelope>,
    /// Signed [`Finding`]s made so far.
    pub findings: Vec<SignedEnvelope>,
    /// The origin-signed [`PatientIdentity`], only where the privacy policy lets
    /// the receiver hold direct identifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SignedEnvelope>,
}

/// The receiver takes the case and asks for the attachments it does not hold yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferAccept {
    pub case_id: CaseId,
    pub missing: Vec<ContentHash>,
}

/// The receiver already holds the case durably; a [`CustodyReceipt`] follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlreadyHave {
    pub case_id: CaseId,
}

/// The receiver refuses the case (or another message about it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub case_id: Option<CaseId>,
    pub code: RejectCode,
    /// For people and logs: what and why.
    pub detail: String,
}

/// Ask for a byte range of an attachment (resumable: ask from where you stopped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub case_id: CaseId,
    pub hash: ContentHash,
    pub offset: u64,
    pub len: u32,
}

/// A byte range of an attachment, with the hash of this chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkResponse {
    pub hash: ContentHash,
    pub offset: u64,
    pub total_size: u64,
    pub chunk_hash: ContentHash,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Signed by the receiver once it holds the manifest and every attachment durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyReceipt {
    pub case_id: CaseId,
    pub receiver: NodeName,
    pub from: NodeName,
    /// Hash of the exact manifest envelope bytes received.
    pub manifest_hash: ContentHash,
    pub attachments: Vec<ContentHash>,
    pub at: Millis,
}

/// A report travelling down toward the origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportDelivery {
    pub case_id: CaseId,
    /// The signed [`Report`].
    pub report: SignedEnvelope,
    /// Signed [`Finding`]s and [`HopRecord`]s above the receiver, so the origin sees
    /// the full trail.
    #[serde(default)]
    pub trail: Vec<SignedEnvelope>,
    #[serde(default)]
    pub findings: Vec<SignedEnvelope>,
}

/// Signed by the receiver of a report once it is stored durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportReceipt {
    pub case_id: CaseId,
    pub receiver: NodeName,
    pub report_hash: ContentHash,
    pub at: Millis,
}

/// What a node can read right now, per modality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModalityCapacity {
    pub modality: Modality,
    /// Tasks a local model covers with calibrated confidence.
    pub model_tasks: Vec<String>,
    pub experts_on_duty: u32,
    pub queue_len: u32,
    /// Expected time until a newly queued case of this modality is read.
    pub eta_ms: u64,
    /// How fast the local models for these tasks read, in cases per hour on this
    /// node's hardware (measured at start-up; 0 when no model covers them). Added
    /// after version 1 shipped: absent from older adverts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub model_cases_per_hour: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A signed statement of a node's capacity, valid until `valid_until`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityAdvert {
    pub node: NodeName,
    pub tier: Tier,
    pub issued_at: Millis,
    pub valid_until: Millis,
    pub capacity: Vec<ModalityCapacity>,
}

/// The origin withdraws a case. Signed by the origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recall {
    pub case_id: CaseId,
    pub origin: NodeName,
    pub reason: String,
    pub at: Millis,
}

/// Every message that travels between two nodes on the data plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    CaseOffer(CaseOffer),
    OfferAccept(OfferAccept),
    AlreadyHave(AlreadyHave),
    Reject(Reject),
    ChunkRequest(ChunkRequest),
    ChunkResponse(ChunkResponse),
    /// A signed [`CustodyReceipt`].
    CustodyReceipt(SignedEnvelope),
    ReportDelivery(ReportDelivery),
    /// A signed [`ReportReceipt`].
    ReportReceipt(SignedEnvelope),
    /// A signed [`CapacityAdvert`].
    CapacityAdvert(SignedEnvelope),
    /// A signed [`Recall`].
    Recall(SignedEnvelope),
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::HelloAck(_) => "hello_ack",
            Message::CaseOffer(_) => "case_offer",
            Message::OfferAccept(_) => "offer_accept",
            Message::AlreadyHave(_) => "already_have",
            Message::Reject(_) => "reject",
            Message::ChunkRequest(_) => "chunk_request",
            Message::ChunkResponse(_) => "chunk_response",
            Message::CustodyReceipt(_) => "custody_receipt",
            Message::ReportDelivery(_) => "report_delivery",
            Message::ReportReceipt(_) => "report_receipt",
            Message::CapacityAdvert(_) => "capacity_advert",
            Message::Recall(_) => "recall",
        }
    }
}
