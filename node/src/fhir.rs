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
//! whose scopes cover the resource type (`fhir_auth.rs`, ADR 0008); errors
//! are `OperationOutcome`s. This module must never change a case.

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

/// What the API serves from.
#[derive(Clone)]
pub struct FhirState {
    pub store: Store,
    pub node: NodeName,
    /// The clients admitted, their token digests and scopes (`fhir_auth.rs`).
    pub clients: Arc<crate::fhir_auth::FhirClients>,
}

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
    if let Some(peer) = &record.peer {
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

fn authorize(
    state: &FhirState,
    headers: &HeaderMap,
    resource: &str,
    interaction: crate::fhir_auth::Interaction,
) -> Result<(), FhirError> {
    use crate::fhir_auth::AuthError;
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.clients.authorize(header, resource, interaction) {
        Ok(_) => Ok(()),
        Err(e @ AuthError::NoToken) => Err(FhirError::new(StatusCode::UNAUTHORIZED, "login", e.to_string())),
        Err(e @ AuthError::UnknownToken) => Err(FhirError::new(StatusCode::UNAUTHORIZED, "security", e.to_string())),
        Err(e @ AuthError::OutOfScope { .. }) => Err(FhirError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())),
    }
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

async fn get_service_request(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    authorize(&s, &headers, "ServiceRequest", crate::fhir_auth::Interaction::Read)?;
    Ok(fhir_json(StatusCode::OK, &service_request(&case_of(&s, &id).await?)))
}

async fn get_task(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    authorize(&s, &headers, "Task", crate::fhir_auth::Interaction::Read)?;
    Ok(fhir_json(StatusCode::OK, &task(&case_of(&s, &id).await?, &s.node)))
}

async fn search_tasks(State(s): State<FhirState>, headers: HeaderMap) -> FhirResult {
    authorize(&s, &headers, "Task", crate::fhir_auth::Interaction::Search)?;
    let mut tasks = Vec::new();
    for summary in s.store.summaries().await.map_err(store_error)?.into_iter().take(PAGE_MAX as usize) {
        if let Some(record) = s.store.case(&summary.id).await.map_err(store_error)? {
            tasks.push(task(&record, &s.node));
        }
    }
    Ok(fhir_json(StatusCode::OK, &bundle("searchset", tasks)))
}

async fn get_diagnostic_report(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    authorize(&s, &headers, "DiagnosticReport", crate::fhir_auth::Interaction::Read)?;
    let record = case_of(&s, &id).await?;
    let report = diagnostic_report(&record)
        .ok_or_else(|| FhirError::new(StatusCode::NOT_FOUND, "not-found", format!("case {id} has no report yet")))?;
    Ok(fhir_json(StatusCode::OK, &report))
}

async fn get_observation(State(s): State<FhirState>, headers: HeaderMap, Path(id): Path<String>) -> FhirResult {
    authorize(&s, &headers, "Observation", crate::fhir_auth::Interaction::Read)?;
    let not_found = || FhirError::new(StatusCode::NOT_FOUND, "not-found", format!("no Observation {id}"));
    let (case, n) = id.rsplit_once('-').ok_or_else(not_found)?;
    let n: usize = n.parse().map_err(|_| not_found())?;
    let record = case_of(&s, case).await?;
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
    authorize(&s, &headers, "AuditEvent", crate::fhir_auth::Interaction::Search)?;
    let count = q.count.unwrap_or(100).clamp(1, PAGE_MAX);
    let records = s.store.audit_from(q.from.unwrap_or(1), count).await.map_err(store_error)?;
    let events = records.iter().map(|r| audit_event(r, &s.node)).collect();
    Ok(fhir_json(StatusCode::OK, &bundle("searchset", events)))
}

async fn unknown(State(s): State<FhirState>, headers: HeaderMap) -> FhirResult {
    // Any valid token learns only that the path does not exist.
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(e) = s.clients.authorize(header, "*", crate::fhir_auth::Interaction::Read)
        && !matches!(e, crate::fhir_auth::AuthError::OutOfScope { .. })
    {
        return Err(FhirError::new(StatusCode::UNAUTHORIZED, "security", e.to_string()));
    }
    Err(FhirError::new(StatusCode::NOT_FOUND, "not-supported", "no such resource type or operation here"))
}

/// The FHIR R4 API, mounted under `/fhir`.
pub fn router(state: FhirState) -> Router {
    Router::new()
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
