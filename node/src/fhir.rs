//! Interop with hospital systems: cases, reports and the audit log as FHIR R4
//! resources, and the HTTP API that serves them (axum) on a hub's `[fhir]` listener.
//!
//! - a consult is a `ServiceRequest` (what was asked) plus a `Task` whose status
//!   follows the case here (received, ready, in-progress, completed, ...);
//! - the report is a `DiagnosticReport` with one `Observation` per labelled finding
//!   of the report (value: the reader's confidence);
//! - each audit record is an `AuditEvent` carrying its seq, hash, previous hash and
//!   signature, so the exported log can still be checked as a chain.
//!
//! Resources are built from the store (the durable truth), never from the core's
//! memory, and carry only the pseudonym as the subject: this API never serves a
//! direct identifier. Every request needs `Authorization: Bearer <token>` of a client
//! whose scopes cover the resource type: an access token from the OAuth 2.0
//! client-credentials endpoint `POST /fhir/auth/token` (`fhir_oauth.rs`, ADR 0011)
//! or a static client token (`fhir_auth.rs`, ADR 0008); errors are
//! `OperationOutcome`s. `GET /fhir/metadata` (CapabilityStatement) and
//! `/fhir/.well-known/smart-configuration` say where the token endpoint is.
//!
//! Every read, search, refusal (401/403) and token request is written to the
//! node's hash-chained audit log through the daemon's group commit
//! ([`crate::daemon::ControlHandle::audit_durable`]) with the client id, the
//! resource type and id (case ids, which the log already holds; never a patient
//! identifier) and the outcome, and the response leaves only once that record is
//! committed (a request whose record cannot be written gets 503, not data).
//! Refusals are recorded up to [`REFUSALS_AUDITED_PER_MINUTE`] a minute, the rest
//! counted in the next record. This module must never change a case.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use federation_proto::{CaseId, Label, Millis, NodeName, Reader, Report, content_type};
use serde_json::{Value, json};
use tiers::{CaseRecord, CaseStatus};

use crate::store::{AuditRecord, Store};

/// The media type of every response.
pub const FHIR_JSON: &str = "application/fhir+json";
/// Most entries in one search result.
pub const PAGE_MAX: u32 = 1_000;
/// Code system of the audit kinds this node writes (`case.forwarded`, ...).
pub const AUDIT_KIND_SYSTEM: &str = "urn:telemed:audit-kind";
/// Identifier system of case ids.
pub const CASE_SYSTEM: &str = "urn:telemed:case";
/// Identifier system of patient pseudonyms.
pub const PSEUDONYM_SYSTEM: &str = "urn:telemed:pseudonym";

/// Refused requests (401/403, failed token requests) written to the audit log per
/// minute; beyond it they are counted and the count goes in the next record.
pub const REFUSALS_AUDITED_PER_MINUTE: u32 = 120;

/// What the API serves from.
#[derive(Clone)]
pub struct FhirState {
    pub store: Store,
    pub node: NodeName,
    /// The clients admitted and the tokens issued to them (`fhir_oauth.rs`).
    pub authority: Arc<crate::fhir_oauth::Authority>,
    /// The daemon, which writes the audit records (group commit).
    pub control: crate::daemon::ControlHandle,
    /// Refusals audited in the current minute: (window start, audited, not audited).
    refusals: Arc<std::sync::Mutex<(std::time::Instant, u32, u32)>>,
}

impl FhirState {
    pub fn new(
        store: Store,
        node: NodeName,
        authority: Arc<crate::fhir_oauth::Authority>,
        control: crate::daemon::ControlHandle,
    ) -> FhirState {
        let refusals = Arc::new(std::sync::Mutex::new((std::time::Instant::now(), 0, 0)));
        FhirState { store, node, authority, control, refusals }
    }

    /// Writes one audit record of an API request and waits until it is committed.
    /// `refusal`: counts against [`REFUSALS_AUDITED_PER_MINUTE`] (beyond it nothing
    /// is written and `Ok` returned).
    pub(crate) async fn audit(
        &self,
        kind: &str,
        case: Option<CaseId>,
        client: Option<&str>,
        detail: &str,
        refusal: bool,
    ) -> Result<(), FhirError> {
        let mut detail = detail.to_owned();
        {
            let mut r = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            if r.0.elapsed() >= std::time::Duration::from_secs(60) {
                let missed = r.2;
                *r = (std::time::Instant::now(), 0, 0);
                if missed > 0 {
                    detail.push_str(&format!(" ({missed} refused requests in the minute before not recorded)"));
                }
            }
            if refusal {
                if r.1 >= REFUSALS_AUDITED_PER_MINUTE {
                    r.2 = r.2.saturating_add(1);
                    return Ok(());
                }
                r.1 += 1;
            }
        }
        let peer = client.map(|c| format!("{FHIR_CLIENT_PREFIX}{c}"));
        let write = crate::store::Write::audit(crate::view::now(), kind, case, peer.as_deref(), &detail);
        self.control.audit_durable(write).await.map_err(|e| {
            tracing::warn!("FHIR API: audit record not written: {e}");
            FhirError::new(StatusCode::SERVICE_UNAVAILABLE, "transient", "the audit log cannot be written; try again")
        })
    }
}

/// How an API client is named in an audit record's peer field.
pub const FHIR_CLIENT_PREFIX: &str = "fhir-client:";

/// `YYYY-MM-DDThh:mm:ss.sssZ` for ms since the Unix epoch (FHIR `instant`).
pub fn instant(t: Millis) -> String {
    let ms = t.0 % 1000;
    let secs = t.0 / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (H. Hinnant), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

fn subject(record: &CaseRecord) -> Value {
    json!({ "identifier": { "system": PSEUDONYM_SYSTEM, "value": record.info.patient.pseudonym } })
}

fn priority(record: &CaseRecord) -> &'static str {
    match record.info.urgency {
        federation_proto::Urgency::Stat => "stat",
        federation_proto::Urgency::Urgent => "urgent",
        federation_proto::Urgency::Routine => "routine",
    }
}

fn opened_report(record: &CaseRecord) -> Option<Report> {
    let env = record.report.as_ref()?;
    env.open::<Report>(content_type::REPORT).ok().map(|v| v.body).filter(|r| r.case_id == record.info.case_id)
}

/// The consult as asked: a `ServiceRequest`.
pub fn service_request(record: &CaseRecord) -> Value {
    let info = &record.info;
    let status = match record.status {
        CaseStatus::Reported { .. } => "completed",
        CaseStatus::Recalled { .. } => "revoked",
        _ => "active",
    };
    json!({
        "resourceType": "ServiceRequest",
        "id": info.case_id.to_string(),
        "identifier": [{ "system": CASE_SYSTEM, "value": info.case_id.to_string() }],
        "status": status,
        "intent": "order",
        "category": [{ "text": info.modality.as_str() }],
        "priority": priority(record),
        "code": { "text": info.task },
        "subject": subject(record),
        "authoredOn": instant(info.created_at),
        "requester": { "display": info.origin.as_str() },
        "reasonCode": [{ "text": info.clinical_question }],
        "note": [{ "text": format!("report wanted by {}", instant(info.deadline_at)) }],
    })
}

/// The FHIR Task status of a case here.
pub fn task_status(status: &CaseStatus) -> &'static str {
    match status {
        CaseStatus::Receiving | CaseStatus::Held => "received",
        CaseStatus::Queued { .. } => "ready",
        CaseStatus::AwaitingModel { .. }
        | CaseStatus::Claimed { .. }
        | CaseStatus::Forwarding { .. }
        | CaseStatus::Forwarded { .. } => "in-progress",
        CaseStatus::Reported { .. } => "completed",
        CaseStatus::Recalled { .. } => "cancelled",
        CaseStatus::NoCapacity { .. } => "on-hold",
    }
}

/// The work on the consult here: a `Task` whose status follows the case.
pub fn task(record: &CaseRecord, node: &NodeName) -> Value {
    let id = record.info.case_id.to_string();
    let mut task = json!({
        "resourceType": "Task",
        "id": id,
        "identifier": [{ "system": CASE_SYSTEM, "value": id }],
        "basedOn": [{ "reference": format!("ServiceRequest/{id}") }],
        "status": task_status(&record.status),
        "businessStatus": { "text": crate::view::CaseView::of(record).where_ },
        "intent": "order",
        "priority": priority(record),
        "focus": { "reference": format!("ServiceRequest/{id}") },
        "for": subject(record),
        "authoredOn": instant(record.info.created_at),
        "lastModified": instant(record.updated_at),
        "requester": { "display": record.info.origin.as_str() },
        "owner": { "display": node.as_str() },
        "restriction": { "period": { "end": instant(record.info.deadline_at) } },
    });
    if let CaseStatus::Claimed { expert, .. } = &record.status {
        task["owner"] = json!({ "display": format!("{expert} at {node}") });
    }
    if record.report.is_some() {
        task["output"] = json!([{
            "type": { "text": "report" },
            "valueReference": { "reference": format!("DiagnosticReport/{id}") },
        }]);
    }
    task
}

fn reader_text(reader: &Reader) -> String {
    match reader {
        Reader::Model { model, version } => format!("model {model}@{version}"),
        Reader::Expert { expert } => expert.clone(),
    }
}

/// The signed report as a `DiagnosticReport`, if the case has one.
pub fn diagnostic_report(record: &CaseRecord) -> Option<Value> {
    let report = opened_report(record)?;
    let id = record.info.case_id.to_string();
    let results: Vec<Value> = (1..=report.labels.len() + report.fields.len())
        .map(|n| json!({ "reference": format!("Observation/{id}-{n}") }))
        .collect();
    let mut value = json!({
        "resourceType": "DiagnosticReport",
        "id": id,
        "identifier": [{ "system": CASE_SYSTEM, "value": id }],
        "basedOn": [{ "reference": format!("ServiceRequest/{id}") }],
        "status": "final",
        "category": [{ "text": record.info.modality.as_str() }],
        "code": { "text": record.info.task },
        "subject": subject(record),
        "issued": instant(report.signed_at),
        "performer": [{ "display": format!("{} at {} ({})", reader_text(&report.reader), report.node, report.tier) }],
        "conclusion": report.text,
    });
    if !results.is_empty() {
        value["result"] = Value::Array(results);
    }
    Some(value)
}

/// What one observation states: a labelled finding with its confidence, or a
/// structured field of the report (name and text).
enum Finding<'a> {
    Label(&'a Label),
    Field(&'a str, &'a str),
}

fn observation(record: &CaseRecord, report: &Report, n: usize, finding: Finding<'_>) -> Value {
    let id = record.info.case_id.to_string();
    let (code, value_key, value) = match finding {
        Finding::Label(label) => (
            label.label.as_str(),
            "valueQuantity",
            json!({
                "value": (f64::from(label.confidence) * 1000.0).round() / 1000.0,
                "unit": "confidence",
                "system": "http://unitsofmeasure.org",
                "code": "1",
            }),
        ),
        Finding::Field(name, text) => (name, "valueString", json!(text)),
    };
    let mut obs = json!({
        "resourceType": "Observation",
        "id": format!("{id}-{n}"),
        "basedOn": [{ "reference": format!("ServiceRequest/{id}") }],
        "status": "final",
        "code": { "text": code },
        "subject": subject(record),
        "issued": instant(report.signed_at),
        "performer": [{ "display": reader_text(&report.reader) }],
        "method": { "text": if report.machine_made { "machine read" } else { "expert read" } },
    });
    obs[value_key] = value;
    obs
}

/// The report's findings: one `Observation` per label, then one per structured field.
pub fn observations(record: &CaseRecord) -> Vec<Value> {
    let Some(report) = opened_report(record) else { return Vec::new() };
    let findings = report
        .labels
        .iter()
        .map(Finding::Label)
        .chain(report.fields.iter().map(|(name, text)| Finding::Field(name, text)));
    findings.enumerate().map(|(i, f)| observation(record, &report, i + 1, f)).collect()
}

/// An audit record kind in the DICOM audit vocabulary (shared by the FHIR
/// AuditEvent and the ATNA export).
pub(crate) struct AuditClass {
    /// DICOM CID 400 audit event ID and its meaning.
    pub code: &'static str,
    pub meaning: &'static str,
    /// Event action: C(reate) or E(xecute).
    pub action: &'static str,
    /// A refusal: outcome 4 (minor failure).
    pub refused: bool,
}

impl AuditClass {
    pub(crate) fn of(kind: &str) -> AuditClass {
        // FHIR API requests (fhir.rs): reads, queries, token and refusals.
        let fhir = match kind {
            "fhir.read" => Some(("110110", "Patient Record", "R", false)),
            "fhir.search" => Some(("110112", "Query", "E", false)),
            "fhir.failed" => Some(("110110", "Patient Record", "R", true)),
            "fhir.token" => Some(("110114", "User Authentication", "E", false)),
            "fhir.refused" | "fhir.token_refused" => Some(("110114", "User Authentication", "E", true)),
            _ => None,
        };
        if let Some((code, meaning, action, refused)) = fhir {
            return AuditClass { code, meaning, action, refused };
        }
        let (code, meaning) = if kind.starts_with("case.") || kind.starts_with("report.") {
            ("110110", "Patient Record")
        } else if kind.starts_with("link.") || kind.starts_with("peer.") {
            ("110114", "User Authentication")
        } else {
            ("110100", "Application Activity")
        };
        let action = if kind.ends_with(".created") || kind == "case.held" { "C" } else { "E" };
        let refused = kind.contains("refused") || kind.contains("rejected");
        AuditClass { code, meaning, action, refused }
    }
}

/// One audit record as an `AuditEvent` (DICOM audit vocabulary for type and action).
pub fn audit_event(record: &AuditRecord, node: &NodeName) -> Value {
    let kind = record.kind.as_str();
    let AuditClass { code: type_code, meaning: type_display, action, refused } = AuditClass::of(kind);
    let mut entities = Vec::new();
    let chain = json!([
        { "type": "seq", "valueString": record.seq.to_string() },
        { "type": "hash", "valueBase64Binary": b64(&record.hash.0) },
        { "type": "prev_hash", "valueBase64Binary": b64(&record.prev_hash.0) },
        { "type": "signer", "valueBase64Binary": b64(&record.signer.0) },
        { "type": "signature", "valueBase64Binary": b64(&record.signature) },
    ]);
    if let Some(case) = record.case {
        entities.push(json!({
            "what": { "identifier": { "system": CASE_SYSTEM, "value": case.to_string() } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
            "description": "case",
        }));
    }
    let client = record.peer.as_deref().and_then(|p| p.strip_prefix(FHIR_CLIENT_PREFIX));
    if let Some(peer) = record.peer.as_ref().filter(|_| client.is_none()) {
        entities.push(json!({
            "what": { "display": peer },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
            "description": "peer node",
        }));
    }
    entities.push(json!({ "what": { "display": "audit record" }, "description": "hash chain", "detail": chain }));
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("audit-{}", record.seq),
        "type": { "system": "http://dicom.nema.org/resources/ontology/DCM", "code": type_code, "display": type_display },
        "subtype": [{ "system": AUDIT_KIND_SYSTEM, "code": kind }],
        "action": action,
        "recorded": instant(record.at),
        "outcome": if refused { "4" } else { "0" },
        "outcomeDesc": record.detail,
        "agent": [{
            "type": { "coding": [{ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID" }] },
            "who": { "display": node.as_str() },
            "requestor": false,
        }],
        "source": {
            "site": node.as_str(),
            "observer": { "display": node.as_str() },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server" }],
        },
        "entity": entities,
    });
    if let Some(client) = client {
        // The FHIR API client that made the request: the requesting agent.
        let agent = json!({
            "type": { "coding": [{ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID" }] },
            "who": { "identifier": { "system": "urn:telemed:fhir-client", "value": client } },
            "requestor": true,
        });
        if let Some(agents) = event["agent"].as_array_mut() {
            agents.push(agent);
        }
    }
    prune(&mut event);
    event
}

/// Removes empty strings, arrays and objects (FHIR allows no empty values), deep.
pub fn prune(value: &mut Value) {
    let empty = |v: &Value| match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Null => true,
        _ => false,
    };
    match value {
        Value::Object(map) => {
            map.values_mut().for_each(prune);
            map.retain(|_, v| !empty(v));
        }
        Value::Array(items) => {
            items.iter_mut().for_each(prune);
            items.retain(|v| !empty(v));
        }
        _ => {}
    }
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `Bundle` of `resources` (`searchset` for the API, `collection` for exports).
pub fn bundle(kind: &str, resources: Vec<Value>) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let url = format!("{}/{}", r["resourceType"].as_str().unwrap_or(""), r["id"].as_str().unwrap_or(""));
            json!({ "fullUrl": url, "resource": r })
        })
        .collect();
    json!({ "resourceType": "Bundle", "type": kind, "total": entries.len(), "entry": entries })
}

// --- the HTTP API --------------------------------------------------------------------

/// An `OperationOutcome` error with its HTTP status.
#[derive(Debug)]
pub struct FhirError {
    status: StatusCode,
    code: &'static str,
    text: String,
}

impl FhirError {
    fn new(status: StatusCode, code: &'static str, text: impl Into<String>) -> FhirError {
        FhirError { status, code, text: text.into() }
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": "error", "code": self.code, "diagnostics": self.text }],
        });
        let mut response = fhir_json(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"fhir\""));
        }
        response
    }
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let mut body = body.clone();
    prune(&mut body);
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// One API request as the audit log records it.
struct Access {
    resource: &'static str,
    interaction: crate::fhir_auth::Interaction,
    /// The resource id asked for (checked characters only), if any.
    id: Option<String>,
    /// The client, once its token was recognised.
    client: Option<String>,
}

impl Access {
    fn new(resource: &'static str, interaction: crate::fhir_auth::Interaction, id: Option<&str>) -> Access {
        // Ids here are case ids (hex) and `<case>-<n>`; anything else is shown cut
        // and reduced to safe characters (it is attacker text).
        let id = id.map(|i| {
            i.chars()
                .take(80)
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
                .collect()
        });
        Access { resource, interaction, id, client: None }
    }
}

fn authorize(state: &FhirState, headers: &HeaderMap, access: &mut Access) -> Result<(), FhirError> {
    use crate::fhir_auth::AuthError;
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.authority.authorize(header, access.resource, access.interaction) {
        Ok(caller) => {
            access.client = Some(caller.client);
            Ok(())
        }
        Err(e @ AuthError::NoToken) => Err(FhirError::new(StatusCode::UNAUTHORIZED, "login", e.to_string())),
        Err(e @ (AuthError::UnknownToken | AuthError::Expired)) => {
            Err(FhirError::new(StatusCode::UNAUTHORIZED, "security", e.to_string()))
        }
        Err(e @ AuthError::OutOfScope { .. }) => {
            if let AuthError::OutOfScope { client, .. } = &e {
                access.client = Some(client.clone());
            }
            Err(FhirError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()))
        }
    }
}

/// Writes the audit record of `access` with the result's status, then returns the
/// result (or 503 if the record could not be written).
async fn audited(state: &FhirState, access: Access, result: FhirResult) -> FhirResult {
    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status,
    };
    let what = match access.interaction {
        crate::fhir_auth::Interaction::Read => "read",
        crate::fhir_auth::Interaction::Search => "search",
    };
    let target = match &access.id {
        Some(id) => format!("{}/{id}", access.resource),
        None => access.resource.to_owned(),
    };
    let refusal = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    let kind = if refusal {
        "fhir.refused"
    } else if !status.is_success() {
        "fhir.failed"
    } else if what == "read" {
        "fhir.read"
    } else {
        "fhir.search"
    };
    let client = access.client.as_deref().unwrap_or("?");
    let detail = format!("client {client}: {what} {target}: {}", status.as_u16());
    // The case the resource belongs to (ids are `<case>` or `<case>-<n>`).
    let case = access.id.as_deref().and_then(|id| id.get(..32)).and_then(|c| c.parse::<CaseId>().ok());
    state.audit(kind, case, access.client.as_deref(), &detail, refusal).await?;
    result
}

fn store_error(e: crate::store::StoreError) -> FhirError {
    tracing::warn!("FHIR API: store: {e}");
    FhirError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", "the store could not be read")
}

async fn case_of(state: &FhirState, id: &str) -> Result<CaseRecord, FhirError> {
    let case_id: CaseId =
        id.parse().map_err(|_| FhirError::new(StatusCode::NOT_FOUND, "not-found", format!("no resource {id}")))?;
    state
        .store
        .case(&case_id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| FhirError::new(StatusCode::NOT_FOUND, "not-found", format!("no case {id} here")))
}

type FhirResult = Result<Response, FhirError>;

use crate::fhir_auth::Interaction::{Read, Search};

async fn get_service_request(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    let mut access = Access::new("ServiceRequest", Read, Some(&id));
    let result = async {
        authorize(&s, &headers, &mut access)?;
        Ok(fhir_json(StatusCode::OK, &service_request(&case_of(&s, &id).await?)))
    }
    .await;
    audited(&s, access, result).await
}

async fn get_task(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    let mut access = Access::new("Task", Read, Some(&id));
    let result = async {
        authorize(&s, &headers, &mut access)?;
        Ok(fhir_json(StatusCode::OK, &task(&case_of(&s, &id).await?, &s.node)))
    }
    .await;
    audited(&s, access, result).await
}

async fn search_tasks(State(s): State<FhirState>, headers: HeaderMap) -> FhirResult {
    let mut access = Access::new("Task", Search, None);
    let result = async {
        authorize(&s, &headers, &mut access)?;
        search_tasks_inner(&s).await
    }
    .await;
    audited(&s, access, result).await
}

async fn search_tasks_inner(s: &FhirState) -> FhirResult {
    let mut tasks = Vec::new();
    for summary in s.store.summaries().await.map_err(store_error)?.into_iter().take(PAGE_MAX as usize) {
        if let Some(record) = s.store.case(&summary.id).await.map_err(store_error)? {
            tasks.push(task(&record, &s.node));
        }
    }
    Ok(fhir_json(StatusCode::OK, &bundle("searchset", tasks)))
}

async fn get_diagnostic_report(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    let mut access = Access::new("DiagnosticReport", Read, Some(&id));
    let result = async {
        authorize(&s, &headers, &mut access)?;
        let record = case_of(&s, &id).await?;
        let report = diagnostic_report(&record).ok_or_else(|| {
            FhirError::new(StatusCode::NOT_FOUND, "not-found", format!("case {id} has no report yet"))
        })?;
        Ok(fhir_json(StatusCode::OK, &report))
    }
    .await;
    audited(&s, access, result).await
}

async fn get_observation(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    let mut access = Access::new("Observation", Read, Some(&id));
    let result = async {
        authorize(&s, &headers, &mut access)?;
        observation_inner(&s, &id).await
    }
    .await;
    audited(&s, access, result).await
}

async fn observation_inner(s: &FhirState, id: &str) -> FhirResult {
    let not_found = || FhirError::new(StatusCode::NOT_FOUND, "not-found", format!("no Observation {id}"));
    let (case, n) = id.rsplit_once('-').ok_or_else(not_found)?;
    let n: usize = n.parse().map_err(|_| not_found())?;
    let record = case_of(s, case).await?;
    let obs = observations(&record);
    let value = n.checked_sub(1).and_then(|i| obs.get(i)).ok_or_else(not_found)?;
    Ok(fhir_json(StatusCode::OK, value))
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    /// First seq to return (paging), default 1.
    #[serde(default)]
    from: Option<u64>,
    #[serde(default, rename = "_count")]
    count: Option<u32>,
}

async fn search_audit(State(s): State<FhirState>, headers: HeaderMap, Query(q): Query<AuditQuery>) -> FhirResult {
    let mut access = Access::new("AuditEvent", Search, None);
    let result = async {
        authorize(&s, &headers, &mut access)?;
        search_audit_inner(&s, q).await
    }
    .await;
    audited(&s, access, result).await
}

async fn search_audit_inner(s: &FhirState, q: AuditQuery) -> FhirResult {
    let count = q.count.unwrap_or(100).clamp(1, PAGE_MAX);
    let records = s.store.audit_from(q.from.unwrap_or(1), count).await.map_err(store_error)?;
    let events = records.iter().map(|r| audit_event(r, &s.node)).collect();
    Ok(fhir_json(StatusCode::OK, &bundle("searchset", events)))
}

async fn unknown(State(s): State<FhirState>, headers: HeaderMap) -> FhirResult {
    // Any valid token learns only that the path does not exist.
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(e) = s.authority.authorize(header, "*", crate::fhir_auth::Interaction::Read)
        && !matches!(e, crate::fhir_auth::AuthError::OutOfScope { .. })
    {
        let err = FhirError::new(StatusCode::UNAUTHORIZED, "security", e.to_string());
        s.audit("fhir.refused", None, None, &format!("client ?: unknown path: 401 ({e})"), true).await?;
        return Err(err);
    }
    Err(FhirError::new(StatusCode::NOT_FOUND, "not-supported", "no such resource type or operation here"))
}

/// The resources and interactions this API serves (CapabilityStatement and docs).
pub const SERVED: &[(&str, &[&str])] = &[
    ("ServiceRequest", &["read"]),
    ("Task", &["read", "search-type"]),
    ("DiagnosticReport", &["read"]),
    ("Observation", &["read"]),
    ("AuditEvent", &["search-type"]),
];

/// `GET /fhir/metadata`: the server's CapabilityStatement, with the OAuth token
/// endpoint in its SMART security extension. No token needed (FHIR R4 §3.1.0.2.2).
pub fn capability_statement(base: &str, at: Millis) -> Value {
    let resources: Vec<Value> = SERVED
        .iter()
        .map(|(ty, interactions)| {
            json!({
                "type": ty,
                "interaction": interactions.iter().map(|i| json!({ "code": i })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(at),
        "kind": "instance",
        "software": { "name": "telemed-node", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "telemed-node FHIR R4 API (consults, reports, audit log)", "url": base },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{ "url": "token", "valueUri": format!("{base}/auth/token") }],
                }],
                "service": [{ "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }] }],
                "description": "OAuth 2.0 client-credentials grant (RFC 6749 4.4) with SMART v2 system scopes; client_secret_basic or client_secret_post",
            },
            "resource": resources,
        }],
    })
}

async fn metadata(headers: HeaderMap) -> Response {
    fhir_json(StatusCode::OK, &capability_statement(&crate::fhir_oauth::base_url(&headers), crate::view::now()))
}

async fn smart_configuration(headers: HeaderMap) -> Response {
    let body = crate::fhir_oauth::smart_configuration(&crate::fhir_oauth::base_url(&headers));
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The FHIR R4 API, mounted under `/fhir`.
pub fn router(state: FhirState) -> Router {
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/.well-known/smart-configuration", get(smart_configuration))
        .route(
            "/fhir/auth/token",
            axum::routing::post(crate::fhir_oauth::token_endpoint)
                .layer(axum::extract::DefaultBodyLimit::max(crate::fhir_oauth::TOKEN_REQUEST_BYTES_MAX)),
        )
        .route("/fhir/ServiceRequest/{id}", get(get_service_request))
        .route("/fhir/Task", get(search_tasks))
        .route("/fhir/Task/{id}", get(get_task))
        .route("/fhir/DiagnosticReport/{id}", get(get_diagnostic_report))
        .route("/fhir/Observation/{id}", get(get_observation))
        .route("/fhir/AuditEvent", get(search_audit))
        .fallback(unknown)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_utc_with_milliseconds() {
        assert_eq!(instant(Millis(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(instant(Millis(951_782_400_000)), "2000-02-29T00:00:00.000Z");
        assert_eq!(instant(Millis(1_795_859_561_123)), "2026-11-28T09:52:41.123Z");
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (raw, enc) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(b64(raw.as_bytes()), enc);
        }
    }
}
