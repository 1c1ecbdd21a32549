//! Tests of the wire protocol, in four parts:
//!
//! - **golden files** (`tests/golden/*.hex`) pin the encoding of one fully populated
//!   value of every `Message` variant and one signed envelope of every content type;
//! - **property tests** pin round-trips and that hostile bytes (random, mutated,
//!   truncated, flipped) are refused without a panic;
//! - **limits**: frame size, trailing bytes, nesting depth, declared lengths;
//! - **version tolerance and envelopes**: newer peers' extra fields, unknown codes
//!   and variants, and every way a signed envelope must be refused.
//!
//! After a deliberate change to the wire format, regenerate the golden files with
//! `UPDATE_GOLDEN=1 cargo test -p federation-proto --test proto golden` and review
//! the diff: every changed file is a change that older peers will see.

use ciborium::Value;
use coset::{CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, iana};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use federation_proto::codec::{CHUNK_LEN_MAX, FRAME_HEADER_LEN, frame_len, from_cbor, to_cbor};
use federation_proto::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::LazyLock;

// ---------------------------------------------------------------------------------
// Keys and representative values
// ---------------------------------------------------------------------------------

/// Seed of the key that signs every golden envelope. Ed25519 signatures are
/// deterministic, so the same seed and body always give the same envelope bytes.
const GOLDEN_SEED: [u8; 32] = *b"telemed-federation-golden-seed-1";
/// Seed of a second, equally valid node key: "someone else".
const OTHER_SEED: [u8; 32] = *b"telemed-federation-other-seed-02";

static GOLDEN_KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&GOLDEN_SEED));
static OTHER_KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&OTHER_SEED));

fn public(key: &SigningKey) -> PublicKey {
    PublicKey(key.verifying_key().to_bytes())
}

const VILLAGE: &str = "v017.gaocheng.dengfeng.zhengzhou.henan.cn";
const TOWNSHIP: &str = "gaocheng.dengfeng.zhengzhou.henan.cn";
const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";
const CITY: &str = "zhengzhou.henan.cn";
const ALT_CITY: &str = "kaifeng.henan.cn";
const PROVINCE: &str = "henan.cn";
const NATION: &str = "cn";
const INTERNATIONAL: &str = "referral.who.int";

/// When the golden case was created: 2024-05-31T16:08:37Z.
const T0: u64 = 1_717_171_717_000;
const MINUTE_MS: u64 = 60_000;

fn at(minutes: u64) -> Millis {
    Millis(T0 + minutes * MINUTE_MS)
}

fn node(s: &str) -> NodeName {
    NodeName::from(s)
}

fn case_id() -> CaseId {
    "5c1f0e2a9b3d4c7e8f60718293a4b5c6".parse().unwrap()
}

fn ecg_hash() -> ContentHash {
    ContentHash::of(b"12-lead ECG, 10 s at 500 Hz")
}

fn xray_hash() -> ContentHash {
    ContentHash::of(b"chest radiograph, PA view")
}

fn manifest() -> CaseManifest {
    CaseManifest {
        case_id: case_id(),
        origin: node(VILLAGE),
        origin_tier: Tier::Village,
        modality: Modality::Ecg,
        task: "ecg.stemi".into(),
        urgency: Urgency::Stat,
        // Non-ASCII on purpose: pins that text travels as UTF-8.
        clinical_question: "Chest pain for 40 min, ST elevation V2–V4: STEMI?".into(),
        patient: PatientRef { pseudonym: "pt-3f9a2c".into(), sex: Some("F".into()), age_years: Some(63) },
        created_at: at(0),
        deadline_at: at(15),
        attachments: vec![
            AttachmentRef {
                hash: ecg_hash(),
                size_bytes: 48_000,
                media_type: "application/dicom".into(),
                name: "ecg-12-lead.dcm".into(),
                priority: Priority::Urgent,
            },
            AttachmentRef {
                hash: xray_hash(),
                size_bytes: 6_291_456,
                media_type: "application/dicom".into(),
                name: "chest-pa.dcm".into(),
                priority: Priority::Bulk,
            },
        ],
        deidentified: vec![],
    }
}

/// The escalation trail of the golden case, oldest first: one hop per
/// `EscalationReason` variant. The county's first try (the primary city) was
/// unreachable, so the trail holds that hop and the re-routed one after it.
fn hops() -> Vec<HopRecord> {
    let hop = |from: &str, from_tier, to: &str, to_tier, minutes: (u64, u64), skipped: &[&str], reason| HopRecord {
        case_id: case_id(),
        from: node(from),
        from_tier,
        to: node(to),
        to_tier,
        arrived_at: at(minutes.0),
        left_at: at(minutes.1),
        skipped: skipped.iter().map(|s| node(s)).collect(),
        reason,
    };
    vec![
        hop(VILLAGE, Tier::Village, COUNTY, Tier::County, (0, 1), &[TOWNSHIP], EscalationReason::NoLocalCapacity),
        hop(
            COUNTY,
            Tier::County,
            CITY,
            Tier::City,
            (1, 4),
            &[],
            EscalationReason::ExpertEscalated {
                expert: "dr.wang".into(),
                reason: "possible posterior extension; needs cardiology".into(),
            },
        ),
        hop(
            COUNTY,
            Tier::County,
            ALT_CITY,
            Tier::City,
            (4, 5),
            &[],
            EscalationReason::Rerouted { unreachable: node(CITY) },
        ),
        hop(
            ALT_CITY,
            Tier::City,
            PROVINCE,
            Tier::Provincial,
            (5, 6),
            &[],
            EscalationReason::ModelNotConfident { model: "ecg-stemi-net".into(), confidence: 0.625, threshold: 0.9 },
        ),
        hop(
            PROVINCE,
            Tier::Provincial,
            NATION,
            Tier::National,
            (6, 7),
            &[],
            EscalationReason::QueueTooLong { eta_ms: 40 * MINUTE_MS, time_left_ms: 8 * MINUTE_MS },
        ),
        hop(NATION, Tier::National, INTERNATIONAL, Tier::International, (7, 10), &[], EscalationReason::ClaimTimeout),
    ]
}

fn findings() -> Vec<Finding> {
    vec![
        Finding {
            case_id: case_id(),
            node: node(COUNTY),
            tier: Tier::County,
            reader: Reader::Expert { expert: "dr.wang".into() },
            labels: vec![Label { label: "stemi.anterior".into(), confidence: 0.75 }],
            at: at(3),
        },
        Finding {
            case_id: case_id(),
            node: node(ALT_CITY),
            tier: Tier::City,
            reader: Reader::Model { model: "ecg-stemi-net".into(), version: "3.1.0".into() },
            labels: vec![
                Label { label: "stemi.anterior".into(), confidence: 0.625 },
                Label { label: "sinus_rhythm".into(), confidence: 0.875 },
            ],
            at: at(6),
        },
    ]
}

fn report() -> Report {
    Report {
        case_id: case_id(),
        node: node(INTERNATIONAL),
        tier: Tier::International,
        reader: Reader::Expert { expert: "dr.okafor".into() },
        machine_made: false,
        labels: vec![Label { label: "stemi.anterior".into(), confidence: 0.96875 }],
        fields: vec![("rhythm".into(), "sinus".into()), ("st_elevation_mm".into(), "3".into())],
        text: "Anterior STEMI. Activate the catheter lab now.".into(),
        signed_at: at(12),
    }
}

fn custody_receipt() -> CustodyReceipt {
    CustodyReceipt {
        case_id: case_id(),
        receiver: node(INTERNATIONAL),
        from: node(NATION),
        manifest_hash: sign(&manifest()).hash(),
        attachments: vec![ecg_hash(), xray_hash()],
        at: at(11),
    }
}

fn report_receipt() -> ReportReceipt {
    ReportReceipt { case_id: case_id(), receiver: node(NATION), report_hash: sign(&report()).hash(), at: at(13) }
}

fn advert() -> CapacityAdvert {
    CapacityAdvert {
        node: node(COUNTY),
        tier: Tier::County,
        issued_at: at(0),
        valid_until: at(5),
        capacity: vec![
            ModalityCapacity {
                modality: Modality::Ecg,
                model_tasks: vec!["ecg.rhythm".into(), "ecg.stemi".into()],
                experts_on_duty: 2,
                queue_len: 5,
                eta_ms: 15 * MINUTE_MS,
                model_cases_per_hour: 0,
            },
            ModalityCapacity {
                modality: Modality::Imaging,
                model_tasks: vec!["xray.chest".into()],
                experts_on_duty: 1,
                queue_len: 12,
                eta_ms: 90 * MINUTE_MS,
                model_cases_per_hour: 0,
            },
            ModalityCapacity {
                modality: Modality::Pathology,
                model_tasks: vec!["wsi.triage".into()],
                experts_on_duty: 3,
                queue_len: 1,
                eta_ms: 240 * MINUTE_MS,
                model_cases_per_hour: 0,
            },
        ],
    }
}

fn recall() -> Recall {
    Recall { case_id: case_id(), origin: node(VILLAGE), reason: "patient transferred by ambulance".into(), at: at(14) }
}

/// A signed body of any content type, so that one helper can sign, open and
/// compare all eight.
#[derive(Debug, Clone, PartialEq)]
enum Body {
    Manifest(CaseManifest),
    Hop(HopRecord),
    Finding(Finding),
    Report(Report),
    CustodyReceipt(CustodyReceipt),
    ReportReceipt(ReportReceipt),
    Advert(CapacityAdvert),
    Recall(Recall),
}

/// Every content type, with the name of its golden file.
const CONTENT_TYPES: [(&str, &str); 8] = [
    ("manifest", content_type::MANIFEST),
    ("hop", content_type::HOP),
    ("finding", content_type::FINDING),
    ("report", content_type::REPORT),
    ("custody_receipt", content_type::CUSTODY_RECEIPT),
    ("report_receipt", content_type::REPORT_RECEIPT),
    ("capacity_advert", content_type::ADVERT),
    ("recall", content_type::RECALL),
];

impl Body {
    fn name(&self) -> &'static str {
        CONTENT_TYPES[self.ordinal()].0
    }

    fn content_type(&self) -> &'static str {
        CONTENT_TYPES[self.ordinal()].1
    }

    fn ordinal(&self) -> usize {
        match self {
            Body::Manifest(_) => 0,
            Body::Hop(_) => 1,
            Body::Finding(_) => 2,
            Body::Report(_) => 3,
            Body::CustodyReceipt(_) => 4,
            Body::ReportReceipt(_) => 5,
            Body::Advert(_) => 6,
            Body::Recall(_) => 7,
        }
    }

    fn sign_with(&self, key: &SigningKey) -> SignedEnvelope {
        let ct = self.content_type();
        match self {
            Body::Manifest(b) => SignedEnvelope::sign(key, ct, b),
            Body::Hop(b) => SignedEnvelope::sign(key, ct, b),
            Body::Finding(b) => SignedEnvelope::sign(key, ct, b),
            Body::Report(b) => SignedEnvelope::sign(key, ct, b),
            Body::CustodyReceipt(b) => SignedEnvelope::sign(key, ct, b),
            Body::ReportReceipt(b) => SignedEnvelope::sign(key, ct, b),
            Body::Advert(b) => SignedEnvelope::sign(key, ct, b),
            Body::Recall(b) => SignedEnvelope::sign(key, ct, b),
        }
        .expect("every body can be signed")
    }

    /// The CBOR bytes of the body: what the envelope's payload must be.
    fn payload(&self) -> Vec<u8> {
        match self {
            Body::Manifest(b) => to_cbor(b),
            Body::Hop(b) => to_cbor(b),
            Body::Finding(b) => to_cbor(b),
            Body::Report(b) => to_cbor(b),
            Body::CustodyReceipt(b) => to_cbor(b),
            Body::ReportReceipt(b) => to_cbor(b),
            Body::Advert(b) => to_cbor(b),
            Body::Recall(b) => to_cbor(b),
        }
        .expect("every body can be encoded")
    }

    /// Opens `env` as a body of the same type and content type as `self`,
    /// requiring `signer`.
    fn open_same_type(&self, env: &SignedEnvelope, signer: &PublicKey) -> Result<Body, Error> {
        let ct = self.content_type();
        Ok(match self {
            Body::Manifest(_) => Body::Manifest(env.open_from(ct, signer)?),
            Body::Hop(_) => Body::Hop(env.open_from(ct, signer)?),
            Body::Finding(_) => Body::Finding(env.open_from(ct, signer)?),
            Body::Report(_) => Body::Report(env.open_from(ct, signer)?),
            Body::CustodyReceipt(_) => Body::CustodyReceipt(env.open_from(ct, signer)?),
            Body::ReportReceipt(_) => Body::ReportReceipt(env.open_from(ct, signer)?),
            Body::Advert(_) => Body::Advert(env.open_from(ct, signer)?),
            Body::Recall(_) => Body::Recall(env.open_from(ct, signer)?),
        })
    }
}

/// Signs with the golden key under the content type that belongs to the body's type.
fn sign(body: &impl IntoBody) -> SignedEnvelope {
    body.clone().into_body().sign_with(&GOLDEN_KEY)
}

trait IntoBody: Clone {
    fn into_body(self) -> Body;
}

macro_rules! into_body {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl IntoBody for $ty {
            fn into_body(self) -> Body {
                Body::$variant(self)
            }
        })*
    };
}

into_body! {
    CaseManifest => Manifest,
    HopRecord => Hop,
    Finding => Finding,
    Report => Report,
    CustodyReceipt => CustodyReceipt,
    ReportReceipt => ReportReceipt,
    CapacityAdvert => Advert,
    Recall => Recall,
}

fn golden_bodies() -> Vec<Body> {
    vec![
        Body::Manifest(manifest()),
        Body::Hop(hops().swap_remove(3)),
        Body::Finding(findings().swap_remove(1)),
        Body::Report(report()),
        Body::CustodyReceipt(custody_receipt()),
        Body::ReportReceipt(report_receipt()),
        Body::Advert(advert()),
        Body::Recall(recall()),
    ]
}

/// One fully populated value of every `Message` variant: every `Option` is `Some`,
/// every list non-empty, every defaulted field set.
fn golden_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            protocol_version_min: PROTOCOL_VERSION_MIN,
            node: NodeClaim { name: node(COUNTY), tier: Tier::County, public_key: public(&GOLDEN_KEY) },
            software: "telemed-node 0.1.0".into(),
        }),
        Message::HelloAck(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            node: NodeClaim { name: node(CITY), tier: Tier::City, public_key: public(&OTHER_KEY) },
        }),
        Message::CaseOffer(CaseOffer {
            manifest: sign(&manifest()),
            trail: hops().iter().map(sign).collect(),
            findings: findings().iter().map(sign).collect(),
            identity: None,
        }),
        Message::OfferAccept(OfferAccept { case_id: case_id(), missing: vec![ecg_hash(), xray_hash()] }),
        Message::AlreadyHave(AlreadyHave { case_id: case_id() }),
        Message::Reject(Reject {
            case_id: Some(case_id()),
            code: RejectCode::Busy,
            detail: "ECG queue is 40 min, the deadline is in 11 min".into(),
        }),
        Message::ChunkRequest(ChunkRequest {
            case_id: case_id(),
            hash: xray_hash(),
            offset: 3 * u64::from(CHUNK_LEN_MAX),
            len: CHUNK_LEN_MAX,
        }),
        Message::ChunkResponse({
            let data: Vec<u8> = (0..=255u8).step_by(3).collect();
            ChunkResponse {
                hash: ecg_hash(),
                offset: 2 * u64::from(CHUNK_LEN_MAX),
                total_size: 6_291_456,
                chunk_hash: ContentHash::of(&data),
                data,
            }
        }),
        Message::CustodyReceipt(sign(&custody_receipt())),
        Message::ReportDelivery(ReportDelivery {
            case_id: case_id(),
            report: sign(&report()),
            trail: hops().iter().map(sign).collect(),
            findings: findings().iter().map(sign).collect(),
        }),
        Message::ReportReceipt(sign(&report_receipt())),
        Message::CapacityAdvert(sign(&advert())),
        Message::Recall(sign(&recall())),
    ]
}

/// Number of `Message` variants.
const MESSAGE_VARIANTS: usize = 13;

/// The position of a message's variant in declaration order. Exhaustive on purpose:
/// a new variant does not compile here until it gets a golden value and a strategy.
fn variant_ordinal(msg: &Message) -> usize {
    match msg {
        Message::Hello(_) => 0,
        Message::HelloAck(_) => 1,
        Message::CaseOffer(_) => 2,
        Message::OfferAccept(_) => 3,
        Message::AlreadyHave(_) => 4,
        Message::Reject(_) => 5,
        Message::ChunkRequest(_) => 6,
        Message::ChunkResponse(_) => 7,
        Message::CustodyReceipt(_) => 8,
        Message::ReportDelivery(_) => 9,
        Message::ReportReceipt(_) => 10,
        Message::CapacityAdvert(_) => 11,
        Message::Recall(_) => 12,
    }
}

fn golden_message(kind: &str) -> Message {
    golden_messages().into_iter().find(|m| m.kind() == kind).expect("a golden message of that kind")
}

// ---------------------------------------------------------------------------------
// Golden files
// ---------------------------------------------------------------------------------

const UPDATE_COMMAND: &str = "UPDATE_GOLDEN=1 cargo test -p federation-proto --test proto golden";
const UPDATE_HINT: &str = "if this change to the wire format is intended, regenerate the golden files \
     with `UPDATE_GOLDEN=1 cargo test -p federation-proto --test proto golden` and review the diff";

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("golden")
}

fn updating_golden() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// Tells the person running the tests, past the test harness's output capture.
fn announce(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Lowercase hex, 64 characters a line, ending in a newline.
fn hex_lines(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    let mut out = String::with_capacity(hex.len() + hex.len() / 64 + 1);
    for line in hex.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("hex is ASCII"));
        out.push('\n');
    }
    out
}

fn hex_window(bytes: &[u8], at: usize) -> String {
    let start = at.saturating_sub(8);
    let end = (at + 24).min(bytes.len());
    format!("[{start}..{end}] {}", hex::encode(&bytes[start.min(end)..end]))
}

/// What a golden file holds, and how it differs from today's encoding.
struct Golden {
    bytes: Vec<u8>,
    mismatch: Option<String>,
}

/// Reads the golden file `name`.hex and compares it with `encoded`; under
/// `UPDATE_GOLDEN=1` rewrites it instead. Fails only if the file cannot be read.
fn check_golden(name: &str, encoded: &[u8]) -> Result<Golden, String> {
    let path = golden_dir().join(format!("{name}.hex"));
    let text = hex_lines(encoded);
    if updating_golden() {
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            fs::create_dir_all(golden_dir()).expect("create tests/golden");
            fs::write(&path, &text).expect("write golden file");
            announce(&format!("UPDATE_GOLDEN=1: rewrote {}", path.display()));
        }
        return Ok(Golden { bytes: encoded.to_vec(), mismatch: None });
    }
    let found = fs::read_to_string(&path).map_err(|e| {
        format!("{}: cannot read the golden file ({e}); create it with `{UPDATE_COMMAND}`", path.display())
    })?;
    let compact: String = found.split_whitespace().collect();
    let bytes = hex::decode(compact).map_err(|e| format!("{}: not hex ({e}); {UPDATE_HINT}", path.display()))?;
    let mismatch = (bytes != encoded).then(|| {
        let first = bytes.iter().zip(encoded).position(|(a, b)| a != b).unwrap_or(bytes.len().min(encoded.len()));
        format!(
            "{}: the encoding changed ({} bytes in the file, {} now; first difference at byte {first})\n  \
             file: {}\n  now:  {}\n  {UPDATE_HINT}",
            path.display(),
            bytes.len(),
            encoded.len(),
            hex_window(&bytes, first),
            hex_window(encoded, first),
        )
    });
    Ok(Golden { bytes, mismatch })
}

/// Combines an encoding mismatch with whether the file's bytes still decode to the
/// value: if they do, the change is one older peers' bytes survive.
fn golden_failure(name: &str, mismatch: Option<String>, decoded: Result<(), String>) -> Option<String> {
    match (mismatch, decoded) {
        (None, Ok(())) => None,
        (Some(m), Ok(())) => {
            Some(format!("{m}\n  (golden/{name}.hex still decodes to the value: old bytes are still understood)"))
        }
        (None, Err(e)) => Some(format!("golden/{name}.hex: {e}")),
        (Some(m), Err(e)) => Some(format!("{m}\n  and golden/{name}.hex {e}: older peers' bytes are refused")),
    }
}

fn assert_no_failures(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} golden check(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

#[test]
fn golden_messages_pin_the_encoding_of_every_variant() {
    let mut failures = Vec::new();
    for msg in golden_messages() {
        let encoded = encode(&msg).expect("golden messages encode");
        let golden = match check_golden(msg.kind(), &encoded) {
            Ok(golden) => golden,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let decoded = match decode(&golden.bytes) {
            Ok(decoded) if decoded == msg => Ok(()),
            Ok(decoded) => Err(format!("decodes to another value:\n  {decoded:?}\nexpected\n  {msg:?}")),
            Err(e) => Err(format!("no longer decodes ({e})")),
        };
        failures.extend(golden_failure(msg.kind(), golden.mismatch, decoded));
    }
    assert_no_failures(failures);
}

#[test]
fn golden_envelopes_pin_the_signed_encoding_of_every_content_type() {
    let mut failures = Vec::new();
    for body in golden_bodies() {
        let name = format!("envelope_{}", body.name());
        let env = body.sign_with(&GOLDEN_KEY);
        let golden = match check_golden(&name, env.as_bytes()) {
            Ok(golden) => golden,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let opened = match body.open_same_type(&SignedEnvelope::from_bytes(golden.bytes), &public(&GOLDEN_KEY)) {
            Ok(opened) if opened == body => Ok(()),
            Ok(opened) => Err(format!("opens to another body:\n  {opened:?}\nexpected\n  {body:?}")),
            Err(e) => Err(format!("no longer opens ({e})")),
        };
        failures.extend(golden_failure(&name, golden.mismatch, opened));
    }
    assert_no_failures(failures);
}

#[test]
fn golden_values_cover_every_message_variant_and_content_type() {
    let ordinals: Vec<usize> = golden_messages().iter().map(variant_ordinal).collect();
    assert_eq!(ordinals, (0..MESSAGE_VARIANTS).collect::<Vec<_>>(), "one golden message per variant, in order");

    let names: Vec<&str> = golden_bodies().iter().map(Body::name).collect();
    let all: Vec<&str> = CONTENT_TYPES.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, all, "one golden envelope per content type, in order");
    let distinct: BTreeSet<&str> = CONTENT_TYPES.iter().map(|(_, ct)| *ct).collect();
    assert_eq!(distinct.len(), CONTENT_TYPES.len(), "content types are distinct");
}

#[test]
fn golden_directory_holds_no_stale_files() {
    let expected: BTreeSet<String> = golden_messages()
        .iter()
        .map(|m| format!("{}.hex", m.kind()))
        .chain(CONTENT_TYPES.iter().map(|(name, _)| format!("envelope_{name}.hex")))
        .collect();
    let Ok(entries) = fs::read_dir(golden_dir()) else {
        assert!(updating_golden(), "{} is missing; create it with `{UPDATE_COMMAND}`", golden_dir().display());
        return;
    };
    let mut stale = Vec::new();
    for entry in entries {
        let path = entry.expect("list tests/golden").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !expected.contains(&name) {
            if updating_golden() {
                fs::remove_file(&path).expect("remove stale golden file");
                announce(&format!("UPDATE_GOLDEN=1: removed stale {}", path.display()));
            } else {
                stale.push(name);
            }
        }
    }
    assert!(stale.is_empty(), "golden files that no test checks: {stale:?}; delete them, or run `{UPDATE_COMMAND}`");
}

// ---------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------

/// Any text, control characters and astral planes included.
fn arb_text() -> BoxedStrategy<String> {
    prop_oneof!["[a-z0-9._ -]{0,12}", prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),].boxed()
}

fn arb_node() -> BoxedStrategy<NodeName> {
    prop_oneof!["[a-z0-9]{1,6}(\\.[a-z0-9]{1,6}){0,5}".prop_map(NodeName::new), arb_text().prop_map(NodeName),].boxed()
}

fn arb_tier() -> BoxedStrategy<Tier> {
    prop::sample::select(Tier::ALL.to_vec()).boxed()
}

fn arb_modality() -> BoxedStrategy<Modality> {
    prop::sample::select(Modality::ALL.to_vec()).boxed()
}

fn arb_urgency() -> BoxedStrategy<Urgency> {
    prop::sample::select(Urgency::ALL.to_vec()).boxed()
}

fn arb_priority() -> BoxedStrategy<Priority> {
    prop::sample::select(vec![Priority::Urgent, Priority::Bulk]).boxed()
}

const REJECT_CODES: [(RejectCode, &str); 13] = [
    (RejectCode::VersionUnsupported, "version_unsupported"),
    (RejectCode::IdentityMismatch, "identity_mismatch"),
    (RejectCode::BadSignature, "bad_signature"),
    (RejectCode::Malformed, "malformed"),
    (RejectCode::WrongDirection, "wrong_direction"),
    (RejectCode::Busy, "busy"),
    (RejectCode::UnknownCase, "unknown_case"),
    (RejectCode::NotCustodian, "not_custodian"),
    (RejectCode::Recalled, "recalled"),
    (RejectCode::HashMismatch, "hash_mismatch"),
    (RejectCode::RangeOutOfBounds, "range_out_of_bounds"),
    (RejectCode::Replayed, "replayed"),
    (RejectCode::Other, "other"),
];

fn arb_reject_code() -> BoxedStrategy<RejectCode> {
    prop::sample::select(REJECT_CODES.map(|(code, _)| code).to_vec()).boxed()
}

fn arb_case_id() -> BoxedStrategy<CaseId> {
    any::<[u8; 16]>().prop_map(CaseId).boxed()
}

fn arb_hash() -> BoxedStrategy<ContentHash> {
    any::<[u8; 32]>().prop_map(ContentHash).boxed()
}

fn arb_public_key() -> BoxedStrategy<PublicKey> {
    any::<[u8; 32]>().prop_map(PublicKey).boxed()
}

fn arb_millis() -> BoxedStrategy<Millis> {
    any::<u64>().prop_map(Millis).boxed()
}

/// Finite `f32`s of every class: normal, subnormal, zero, either sign.
fn arb_f32() -> BoxedStrategy<f32> {
    use prop::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    (POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO).boxed()
}

fn arb_patient() -> BoxedStrategy<PatientRef> {
    (arb_text(), prop::option::of(arb_text()), prop::option::of(any::<u16>()))
        .prop_map(|(pseudonym, sex, age_years)| PatientRef { pseudonym, sex, age_years })
        .boxed()
}

fn arb_attachment() -> BoxedStrategy<AttachmentRef> {
    (arb_hash(), any::<u64>(), arb_text(), arb_text(), arb_priority())
        .prop_map(|(hash, size_bytes, media_type, name, priority)| AttachmentRef {
            hash,
            size_bytes,
            media_type,
            name,
            priority,
        })
        .boxed()
}

fn arb_manifest() -> BoxedStrategy<CaseManifest> {
    (
        (arb_case_id(), arb_node(), arb_tier(), arb_modality(), arb_text(), arb_urgency()),
        (arb_text(), arb_patient(), arb_millis(), arb_millis(), prop::collection::vec(arb_attachment(), 0..3)),
    )
        .prop_map(
            |(
                (case_id, origin, origin_tier, modality, task, urgency),
                (clinical_question, patient, created_at, deadline_at, attachments),
            )| CaseManifest {
                case_id,
                origin,
                origin_tier,
                modality,
                task,
                urgency,
                clinical_question,
                patient,
                created_at,
                deadline_at,
                attachments,
                deidentified: vec![],
            },
        )
        .boxed()
}

fn arb_reason() -> BoxedStrategy<EscalationReason> {
    prop_oneof![
        Just(EscalationReason::NoLocalCapacity),
        (arb_text(), arb_f32(), arb_f32()).prop_map(|(model, confidence, threshold)| {
            EscalationReason::ModelNotConfident { model, confidence, threshold }
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(eta_ms, time_left_ms)| EscalationReason::QueueTooLong { eta_ms, time_left_ms }),
        Just(EscalationReason::ClaimTimeout),
        (arb_text(), arb_text()).prop_map(|(expert, reason)| EscalationReason::ExpertEscalated { expert, reason }),
        arb_node().prop_map(|unreachable| EscalationReason::Rerouted { unreachable }),
    ]
    .boxed()
}

fn arb_hop() -> BoxedStrategy<HopRecord> {
    (
        (arb_case_id(), arb_node(), arb_tier(), arb_node(), arb_tier()),
        (arb_millis(), arb_millis(), prop::collection::vec(arb_node(), 0..3), arb_reason()),
    )
        .prop_map(|((case_id, from, from_tier, to, to_tier), (arrived_at, left_at, skipped, reason))| HopRecord {
            case_id,
            from,
            from_tier,
            to,
            to_tier,
            arrived_at,
            left_at,
            skipped,
            reason,
        })
        .boxed()
}

fn arb_label() -> BoxedStrategy<Label> {
    (arb_text(), arb_f32()).prop_map(|(label, confidence)| Label { label, confidence }).boxed()
}

fn arb_reader() -> BoxedStrategy<Reader> {
    prop_oneof![
        (arb_text(), arb_text()).prop_map(|(model, version)| Reader::Model { model, version }),
        arb_text().prop_map(|expert| Reader::Expert { expert }),
    ]
    .boxed()
}

fn arb_finding() -> BoxedStrategy<Finding> {
    (arb_case_id(), arb_node(), arb_tier(), arb_reader(), prop::collection::vec(arb_label(), 0..3), arb_millis())
        .prop_map(|(case_id, node, tier, reader, labels, at)| Finding { case_id, node, tier, reader, labels, at })
        .boxed()
}

fn arb_report() -> BoxedStrategy<Report> {
    (
        (arb_case_id(), arb_node(), arb_tier(), arb_reader(), any::<bool>()),
        (
            prop::collection::vec(arb_label(), 0..3),
            prop::collection::vec((arb_text(), arb_text()), 0..3),
            arb_text(),
            arb_millis(),
        ),
    )
        .prop_map(|((case_id, node, tier, reader, machine_made), (labels, fields, text, signed_at))| Report {
            case_id,
            node,
            tier,
            reader,
            machine_made,
            labels,
            fields,
            text,
            signed_at,
        })
        .boxed()
}

fn arb_custody_receipt() -> BoxedStrategy<CustodyReceipt> {
    (arb_case_id(), arb_node(), arb_node(), arb_hash(), prop::collection::vec(arb_hash(), 0..3), arb_millis())
        .prop_map(|(case_id, receiver, from, manifest_hash, attachments, at)| CustodyReceipt {
            case_id,
            receiver,
            from,
            manifest_hash,
            attachments,
            at,
        })
        .boxed()
}

fn arb_report_receipt() -> BoxedStrategy<ReportReceipt> {
    (arb_case_id(), arb_node(), arb_hash(), arb_millis())
        .prop_map(|(case_id, receiver, report_hash, at)| ReportReceipt { case_id, receiver, report_hash, at })
        .boxed()
}

fn arb_modality_capacity() -> BoxedStrategy<ModalityCapacity> {
    (arb_modality(), prop::collection::vec(arb_text(), 0..3), any::<u32>(), any::<u32>(), any::<u64>())
        .prop_map(|(modality, model_tasks, experts_on_duty, queue_len, eta_ms)| ModalityCapacity {
            modality,
            model_tasks,
            experts_on_duty,
            queue_len,
            eta_ms,
            model_cases_per_hour: eta_ms as u32 % 7,
        })
        .boxed()
}

fn arb_advert() -> BoxedStrategy<CapacityAdvert> {
    (arb_node(), arb_tier(), arb_millis(), arb_millis(), prop::collection::vec(arb_modality_capacity(), 0..4))
        .prop_map(|(node, tier, issued_at, valid_until, capacity)| CapacityAdvert {
            node,
            tier,
            issued_at,
            valid_until,
            capacity,
        })
        .boxed()
}

fn arb_recall() -> BoxedStrategy<Recall> {
    (arb_case_id(), arb_node(), arb_text(), arb_millis())
        .prop_map(|(case_id, origin, reason, at)| Recall { case_id, origin, reason, at })
        .boxed()
}

fn arb_body() -> BoxedStrategy<Body> {
    prop_oneof![
        arb_manifest().prop_map(Body::Manifest),
        arb_hop().prop_map(Body::Hop),
        arb_finding().prop_map(Body::Finding),
        arb_report().prop_map(Body::Report),
        arb_custody_receipt().prop_map(Body::CustodyReceipt),
        arb_report_receipt().prop_map(Body::ReportReceipt),
        arb_advert().prop_map(Body::Advert),
        arb_recall().prop_map(Body::Recall),
    ]
    .boxed()
}

/// A body signed by a key from an arbitrary seed.
fn arb_signed(body: BoxedStrategy<Body>) -> BoxedStrategy<SignedEnvelope> {
    (any::<[u8; 32]>(), body).prop_map(|(seed, body)| body.sign_with(&SigningKey::from_bytes(&seed))).boxed()
}

/// A signed body, or opaque bytes: messages carry envelopes unverified, so the
/// codec must carry any bytes unchanged.
fn arb_envelope(body: BoxedStrategy<Body>) -> BoxedStrategy<SignedEnvelope> {
    prop_oneof![
        3 => arb_signed(body),
        1 => prop::collection::vec(any::<u8>(), 0..48).prop_map(SignedEnvelope::from_bytes),
    ]
    .boxed()
}

fn arb_node_claim() -> BoxedStrategy<NodeClaim> {
    (arb_node(), arb_tier(), arb_public_key())
        .prop_map(|(name, tier, public_key)| NodeClaim { name, tier, public_key })
        .boxed()
}

fn arb_message() -> BoxedStrategy<Message> {
    let envelopes = |body: fn() -> BoxedStrategy<Body>, max: usize| prop::collection::vec(arb_envelope(body()), 0..max);
    let hop = || arb_hop().prop_map(Body::Hop).boxed();
    let finding = || arb_finding().prop_map(Body::Finding).boxed();
    prop_oneof![
        (any::<u16>(), any::<u16>(), arb_node_claim(), arb_text()).prop_map(
            |(protocol_version, protocol_version_min, node, software)| {
                Message::Hello(Hello { protocol_version, protocol_version_min, node, software })
            }
        ),
        (any::<u16>(), arb_node_claim())
            .prop_map(|(protocol_version, node)| Message::HelloAck(HelloAck { protocol_version, node })),
        (arb_envelope(arb_manifest().prop_map(Body::Manifest).boxed()), envelopes(hop, 3), envelopes(finding, 3))
            .prop_map(|(manifest, trail, findings)| {
                Message::CaseOffer(CaseOffer { manifest, trail, findings, identity: None })
            }),
        (arb_case_id(), prop::collection::vec(arb_hash(), 0..4))
            .prop_map(|(case_id, missing)| Message::OfferAccept(OfferAccept { case_id, missing })),
        arb_case_id().prop_map(|case_id| Message::AlreadyHave(AlreadyHave { case_id })),
        (prop::option::of(arb_case_id()), arb_reject_code(), arb_text())
            .prop_map(|(case_id, code, detail)| Message::Reject(Reject { case_id, code, detail })),
        (arb_case_id(), arb_hash(), any::<u64>(), any::<u32>()).prop_map(|(case_id, hash, offset, len)| {
            Message::ChunkRequest(ChunkRequest { case_id, hash, offset, len })
        }),
        (arb_hash(), any::<u64>(), any::<u64>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(
            |(hash, offset, total_size, data)| {
                Message::ChunkResponse(ChunkResponse {
                    hash,
                    offset,
                    total_size,
                    chunk_hash: ContentHash::of(&data),
                    data,
                })
            }
        ),
        arb_envelope(arb_custody_receipt().prop_map(Body::CustodyReceipt).boxed()).prop_map(Message::CustodyReceipt),
        (
            arb_case_id(),
            arb_envelope(arb_report().prop_map(Body::Report).boxed()),
            envelopes(hop, 3),
            envelopes(finding, 3)
        )
            .prop_map(|(case_id, report, trail, findings)| {
                Message::ReportDelivery(ReportDelivery { case_id, report, trail, findings })
            }),
        arb_envelope(arb_report_receipt().prop_map(Body::ReportReceipt).boxed()).prop_map(Message::ReportReceipt),
        arb_envelope(arb_advert().prop_map(Body::Advert).boxed()).prop_map(Message::CapacityAdvert),
        arb_envelope(arb_recall().prop_map(Body::Recall).boxed()).prop_map(Message::Recall),
    ]
    .boxed()
}

/// Field and variant names of the protocol, so that random CBOR maps often have
/// the keys the decoder looks for and get past the first check.
const VOCABULARY: &[&str] = &[
    "hello",
    "hello_ack",
    "case_offer",
    "offer_accept",
    "already_have",
    "reject",
    "chunk_request",
    "chunk_response",
    "custody_receipt",
    "report_delivery",
    "report_receipt",
    "capacity_advert",
    "recall",
    "protocol_version",
    "protocol_version_min",
    "node",
    "name",
    "tier",
    "public_key",
    "software",
    "manifest",
    "trail",
    "findings",
    "case_id",
    "missing",
    "code",
    "detail",
    "hash",
    "offset",
    "len",
    "total_size",
    "chunk_hash",
    "data",
    "report",
    "county",
    "busy",
    "kind",
];

/// Arbitrary CBOR, biased toward the protocol's shapes.
fn arb_cbor() -> BoxedStrategy<Value> {
    let key = prop_oneof![3 => prop::sample::select(VOCABULARY).prop_map(|k| Value::Text(k.into())), 1 => arb_text().prop_map(Value::Text)];
    let leaf = prop_oneof![
        any::<u64>().prop_map(|n| Value::Integer(n.into())),
        any::<i64>().prop_map(|n| Value::Integer(n.into())),
        (0u64..70_000).prop_map(|n| Value::Integer(n.into())),
        any::<f64>().prop_map(Value::Float),
        prop::sample::select(VOCABULARY).prop_map(|k| Value::Text(k.into())),
        arb_text().prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner.clone()), 0..6).prop_map(Value::Map),
            (any::<u64>(), inner).prop_map(|(tag, v)| Value::Tag(tag, Box::new(v))),
        ]
    })
    .boxed()
}

/// One edit of an encoding, as a fuzzer would make it.
#[derive(Debug, Clone)]
enum Mutation {
    Xor(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Overwrite(Index, [u8; 4]),
}

fn arb_mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Xor(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        (any::<Index>(), any::<[u8; 4]>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
    .boxed()
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match mutation {
        Mutation::Xor(i, x) => {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        Mutation::Insert(i, b) => {
            let i = i.index(bytes.len() + 1);
            bytes.insert(i, *b);
        }
        Mutation::Remove(i) => {
            let i = i.index(bytes.len());
            bytes.remove(i);
        }
        Mutation::Overwrite(i, b) => {
            let i = i.index(bytes.len());
            let end = (i + b.len()).min(bytes.len());
            bytes[i..end].copy_from_slice(&b[..end - i]);
        }
    }
}

/// Calls every fallible entry point of the envelope API on `env`. Only panics count.
fn exercise_envelope(env: &SignedEnvelope) {
    let _ = env.claimed_signer();
    let _ = env.hash();
    let _ = format!("{env:?}");
    let key = public(&GOLDEN_KEY);
    for (_, ct) in CONTENT_TYPES {
        let _ = env.verify(ct);
    }
    let _ = env.open::<CaseManifest>(content_type::MANIFEST);
    let _ = env.open::<HopRecord>(content_type::HOP);
    let _ = env.open::<Finding>(content_type::FINDING);
    let _ = env.open::<Report>(content_type::REPORT);
    let _ = env.open::<CustodyReceipt>(content_type::CUSTODY_RECEIPT);
    let _ = env.open::<ReportReceipt>(content_type::REPORT_RECEIPT);
    let _ = env.open::<CapacityAdvert>(content_type::ADVERT);
    let _ = env.open::<Recall>(content_type::RECALL);
    let _ = env.open::<Message>(content_type::RECALL);
    let _ = env.open_from::<Recall>(content_type::RECALL, &key);
}

/// Decodes `bytes` as a payload and as a frame. Only panics count, and a message
/// that does decode must survive a second round-trip.
fn exercise_decoders(bytes: &[u8]) {
    if let Ok(msg) = decode(bytes) {
        let again = encode(&msg).expect("a decoded message re-encodes");
        assert_eq!(decode(&again).as_ref(), Ok(&msg), "a decoded message round-trips");
    }
    if let Ok(Some((_, used))) = decode_frame(bytes) {
        assert!(used >= FRAME_HEADER_LEN && used <= bytes.len(), "decode_frame used {used} of {} bytes", bytes.len());
    }
}

// ---------------------------------------------------------------------------------
// Raw COSE helpers: envelopes this crate would never make
// ---------------------------------------------------------------------------------

/// The protected header `SignedEnvelope::sign` writes, as a builder to tweak.
fn eddsa_header(key: &SigningKey, ct: &str) -> HeaderBuilder {
    HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .key_id(key.verifying_key().to_bytes().to_vec())
        .content_type(ct.to_owned())
}

/// Signs `payload` (raw bytes, any at all) with `key` under the given headers.
fn sign_raw(
    key: &SigningKey,
    protected: coset::Header,
    unprotected: coset::Header,
    payload: Option<Vec<u8>>,
) -> SignedEnvelope {
    let mut builder = CoseSign1Builder::new().protected(protected).unprotected(unprotected);
    if let Some(payload) = payload {
        builder = builder.payload(payload);
    }
    let sign1 = builder.create_signature(b"", |data| key.sign(data).to_bytes().to_vec()).build();
    SignedEnvelope::from_bytes(sign1.to_vec().expect("COSE_Sign1 encodes"))
}

/// Signs raw payload bytes exactly as `SignedEnvelope::sign` would sign a body.
fn sign_payload(key: &SigningKey, ct: &str, payload: Vec<u8>) -> SignedEnvelope {
    sign_raw(key, eddsa_header(key, ct).build(), coset::Header::default(), Some(payload))
}

/// Encodes a CBOR byte string header, minimal or always with a 4-byte length.
fn bstr(bytes: &[u8], four_byte_len: bool) -> Vec<u8> {
    let len = bytes.len();
    let mut out = match len {
        _ if four_byte_len => [&[0x5a][..], &(len as u32).to_be_bytes()].concat(),
        0..24 => vec![0x40 | len as u8],
        24..256 => vec![0x58, len as u8],
        256..65_536 => [&[0x59][..], &(len as u16).to_be_bytes()].concat(),
        _ => [&[0x5a][..], &(len as u32).to_be_bytes()].concat(),
    };
    out.extend_from_slice(bytes);
    out
}

fn cbor_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).expect("CBOR value encodes");
    out
}

fn cbor_value(bytes: &[u8]) -> Value {
    let value: Value = ciborium::de::from_reader(bytes).expect("valid CBOR");
    assert_eq!(cbor_bytes(&value), bytes, "ciborium::Value re-encodes our bytes unchanged");
    value
}

fn map_entries(value: &mut Value) -> &mut Vec<(Value, Value)> {
    match value {
        Value::Map(entries) => entries,
        other => panic!("expected a CBOR map, found {other:?}"),
    }
}

/// The map inside a message's externally tagged variant: `{ "kind": { ... } }`.
fn message_body(value: &mut Value) -> &mut Value {
    let entries = map_entries(value);
    assert_eq!(entries.len(), 1, "a message is a one-entry map");
    &mut entries[0].1
}

fn field<'v>(value: &'v mut Value, name: &str) -> &'v mut Value {
    map_entries(value)
        .iter_mut()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no field `{name}`"))
}

fn remove_field(value: &mut Value, name: &str) {
    let entries = map_entries(value);
    let before = entries.len();
    entries.retain(|(k, _)| k.as_text() != Some(name));
    assert_eq!(entries.len() + 1, before, "field `{name}` was there to remove");
}

/// What a newer peer might add: a scalar, a nested map and a list of maps.
fn future_fields() -> Vec<(Value, Value)> {
    vec![
        (Value::Text("x_future_note".into()), Value::Text("added by protocol v9".into())),
        (
            Value::Text("x_future_limits".into()),
            Value::Map(vec![
                (Value::Text("depth".into()), Value::Integer(3.into())),
                (Value::Text("ratio".into()), Value::Float(0.5)),
            ]),
        ),
        (
            Value::Text("x_future_list".into()),
            Value::Array(vec![Value::Map(vec![(Value::Text("k".into()), Value::Bytes(vec![1, 2, 3]))]), Value::Null]),
        ),
    ]
}

/// Adds `future_fields` to every map inside `value`, at every depth.
fn add_future_fields(value: &mut Value) {
    match value {
        Value::Map(entries) => {
            for (_, v) in entries.iter_mut() {
                add_future_fields(v);
            }
            entries.extend(future_fields());
        }
        Value::Array(items) => items.iter_mut().for_each(add_future_fields),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn messages_round_trip_through_encode_and_decode(msg in arb_message()) {
        let bytes = encode(&msg)?;
        prop_assert_eq!(decode(&bytes)?, msg);
    }

    #[test]
    fn messages_round_trip_through_frames(msg in arb_message()) {
        let frame = encode_frame(&msg)?;
        let payload_len = frame_len(*frame.first_chunk::<FRAME_HEADER_LEN>().unwrap())?;
        prop_assert_eq!(payload_len + FRAME_HEADER_LEN, frame.len());
        prop_assert_eq!(decode_frame(&frame)?, Some((msg, frame.len())));
    }

    #[test]
    fn signed_bodies_open_to_the_body_and_signer(body in arb_body(), seed in any::<[u8; 32]>()) {
        let key = SigningKey::from_bytes(&seed);
        let env = body.sign_with(&key);
        prop_assert_eq!(env.claimed_signer()?, public(&key));
        prop_assert_eq!(env.verify(body.content_type())?, (public(&key), body.payload()));
        prop_assert_eq!(body.open_same_type(&env, &public(&key))?, body);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise_decoders(&bytes);
        // The same bytes behind a header that announces exactly their length.
        let mut frame = (bytes.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&bytes);
        exercise_decoders(&frame);
    }

    #[test]
    fn envelope_api_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise_envelope(&SignedEnvelope::from_bytes(bytes));
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_cbor(value in arb_cbor(), variant in prop::sample::select(VOCABULARY)) {
        exercise_decoders(&cbor_bytes(&value));
        // Wrapped as a message variant, to get past the outer enum.
        exercise_decoders(&cbor_bytes(&Value::Map(vec![(Value::Text(variant.into()), value)])));
    }

    #[test]
    fn open_never_panics_on_validly_signed_arbitrary_payloads(
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            arb_cbor().prop_map(|v| cbor_bytes(&v)),
        ],
        ct in prop::sample::select(CONTENT_TYPES.map(|(_, ct)| ct).to_vec()),
    ) {
        exercise_envelope(&sign_payload(&GOLDEN_KEY, ct, payload));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_mutated_messages(
        msg in arb_message(),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut payload = encode(&msg)?;
        let mut frame = encode_frame(&msg)?;
        for m in &mutations {
            mutate(&mut payload, m);
            mutate(&mut frame, m);
        }
        exercise_decoders(&payload);
        exercise_decoders(&frame);
    }

    #[test]
    fn envelope_api_never_panics_on_mutated_envelopes(
        body in arb_body(),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut bytes = body.sign_with(&GOLDEN_KEY).as_bytes().to_vec();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        exercise_envelope(&SignedEnvelope::from_bytes(bytes));
    }

    #[test]
    fn flipped_envelope_byte_never_verifies_as_a_different_payload(
        body in arb_body(),
        index in any::<Index>(),
        mask in 1..=255u8,
    ) {
        let env = body.sign_with(&GOLDEN_KEY);
        let mut bytes = env.as_bytes().to_vec();
        let i = index.index(bytes.len());
        bytes[i] ^= mask;
        let flipped = SignedEnvelope::from_bytes(bytes);
        if let Ok((signer, payload)) = flipped.verify(body.content_type()) {
            prop_assert_eq!(signer, public(&GOLDEN_KEY), "flip at byte {} changed the signer", i);
            prop_assert_eq!(payload, body.payload(), "flip at byte {} changed the payload", i);
        }
        if let Ok(opened) = body.open_same_type(&flipped, &public(&GOLDEN_KEY)) {
            prop_assert_eq!(opened, body, "flip at byte {} changed the body", i);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_strict_prefix_of_a_message_is_truncated(msg in arb_message()) {
        let bytes = encode(&msg)?;
        for n in 0..bytes.len() {
            prop_assert_eq!(decode(&bytes[..n]), Err(Error::Truncated), "prefix of {} of {} bytes", n, bytes.len());
        }
        let frame = encode_frame(&msg)?;
        for n in 0..frame.len() {
            prop_assert_eq!(decode_frame(&frame[..n]), Ok(None), "frame prefix of {} of {} bytes", n, frame.len());
        }
    }

    #[test]
    fn every_strict_prefix_of_an_envelope_fails_to_open(body in arb_body()) {
        let bytes = body.sign_with(&GOLDEN_KEY).as_bytes().to_vec();
        for n in 0..bytes.len() {
            let prefix = SignedEnvelope::from_bytes(bytes[..n].to_vec());
            let result = prefix.verify(body.content_type());
            prop_assert!(matches!(result, Err(Error::BadEnvelope(_))), "prefix of {} bytes: {:?}", n, result);
        }
    }
}

#[test]
fn strategies_generate_every_message_variant_and_body_type() {
    let mut runner = TestRunner::deterministic();
    let messages = arb_message();
    let bodies = arb_body();
    let mut variants = BTreeSet::new();
    let mut body_types = BTreeSet::new();
    for _ in 0..400 {
        variants.insert(variant_ordinal(&messages.new_tree(&mut runner).unwrap().current()));
        body_types.insert(bodies.new_tree(&mut runner).unwrap().current().ordinal());
    }
    assert_eq!(variants, (0..MESSAGE_VARIANTS).collect(), "arb_message generates every variant");
    assert_eq!(body_types, (0..CONTENT_TYPES.len()).collect(), "arb_body generates every body type");
}

#[test]
fn no_single_byte_flip_makes_a_golden_envelope_verify() {
    // Stronger than the property test: no flip verifies at all, not even to the same
    // payload, so an envelope's hash (its identity in receipts) cannot be changed by
    // anyone but its signer without breaking it.
    for body in golden_bodies() {
        let bytes = body.sign_with(&GOLDEN_KEY).as_bytes().to_vec();
        for i in 0..bytes.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut flipped = bytes.clone();
                flipped[i] ^= mask;
                let result = SignedEnvelope::from_bytes(flipped).verify(body.content_type());
                assert!(result.is_err(), "{} envelope with byte {i} ^ {mask:#04x} still verifies", body.name());
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------

/// A chunk response whose encoding is exactly `payload_len` bytes (≥ 70 000).
fn chunk_response_encoding_to(payload_len: usize) -> Message {
    let with_data = |len: usize| {
        Message::ChunkResponse(ChunkResponse {
            hash: ecg_hash(),
            offset: 0,
            total_size: 6_291_456,
            chunk_hash: xray_hash(),
            data: vec![0xa5; len],
        })
    };
    // Empty data costs a 1-byte header; 65 536 bytes or more cost a 5-byte one.
    let overhead = encode(&with_data(0)).unwrap().len() - 1 + 5;
    let msg = with_data(payload_len - overhead);
    assert_eq!(to_cbor(&msg).unwrap().len(), payload_len, "chunk response of the intended size");
    msg
}

#[test]
fn oversize_frame_is_refused_before_allocation() {
    let len = FRAME_LEN_MAX + 1;
    let header = (len as u32).to_be_bytes();
    let err = frame_len(header).unwrap_err();
    assert_eq!(err, Error::FrameTooLarge { len: len as u64, max: FRAME_LEN_MAX });
    let shown = err.to_string();
    assert!(shown.contains(&len.to_string()) && shown.contains(&FRAME_LEN_MAX.to_string()), "{shown}");

    // decode_frame refuses on the header alone: it neither waits for 4 GiB to arrive
    // nor asks for a buffer of that size.
    let err = decode_frame(&u32::MAX.to_be_bytes()).unwrap_err();
    assert_eq!(err, Error::FrameTooLarge { len: u64::from(u32::MAX), max: FRAME_LEN_MAX });
    let shown = err.to_string();
    assert!(shown.contains("4294967295") && shown.contains("1048576"), "{shown}");
    assert_eq!(decode_frame(&header), Err(Error::FrameTooLarge { len: len as u64, max: FRAME_LEN_MAX }));
}

#[test]
fn message_of_exactly_the_limit_is_accepted_and_one_byte_more_is_refused() {
    assert_eq!(frame_len((FRAME_LEN_MAX as u32).to_be_bytes()), Ok(FRAME_LEN_MAX));

    let largest = chunk_response_encoding_to(FRAME_LEN_MAX);
    let payload = encode(&largest).expect("a message of exactly the limit encodes");
    assert_eq!(decode(&payload).as_ref(), Ok(&largest));
    let frame = encode_frame(&largest).unwrap();
    assert_eq!(frame.len(), FRAME_HEADER_LEN + FRAME_LEN_MAX);
    assert_eq!(decode_frame(&frame), Ok(Some((largest, frame.len()))));

    let too_large = chunk_response_encoding_to(FRAME_LEN_MAX + 1);
    let refused = Err(Error::FrameTooLarge { len: FRAME_LEN_MAX as u64 + 1, max: FRAME_LEN_MAX });
    assert_eq!(encode(&too_large), refused);
    assert_eq!(encode_frame(&too_large), refused);
    assert_eq!(
        decode(&to_cbor(&too_large).unwrap()),
        Err(Error::FrameTooLarge { len: FRAME_LEN_MAX as u64 + 1, max: FRAME_LEN_MAX })
    );
}

#[test]
fn encoding_a_message_over_the_limit_is_an_error() {
    let msg = Message::ChunkResponse(ChunkResponse {
        hash: ecg_hash(),
        offset: 0,
        total_size: 2 << 20,
        chunk_hash: xray_hash(),
        data: vec![7; 2 << 20],
    });
    for result in [encode(&msg), encode_frame(&msg)] {
        match result {
            Err(Error::FrameTooLarge { len, max }) => {
                assert!(len > 2 << 20, "reported length {len} is the encoded size");
                assert_eq!(max, FRAME_LEN_MAX);
            }
            other => panic!("expected FrameTooLarge, got {:?}", other.map(|b| b.len())),
        }
    }
}

#[test]
fn trailing_bytes_after_a_message_are_refused() {
    let msg = golden_message("already_have");
    let mut payload = encode(&msg).unwrap();
    payload.extend_from_slice(&[0x00, 0xff]);
    assert_eq!(decode(&payload), Err(Error::TrailingBytes { extra: 2 }));

    // A frame whose length covers one byte more than the message.
    let mut frame = encode_frame(&msg).unwrap();
    frame.push(0xf6);
    let len = u32::from_be_bytes(*frame.first_chunk().unwrap()) + 1;
    frame[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    assert_eq!(decode_frame(&frame), Err(Error::TrailingBytes { extra: 1 }));

    // A second CBOR item after a signed body is refused too.
    let mut body = to_cbor(&recall()).unwrap();
    body.push(0x00);
    let env = sign_payload(&GOLDEN_KEY, content_type::RECALL, body);
    assert_eq!(env.open::<Recall>(content_type::RECALL), Err(Error::TrailingBytes { extra: 1 }));
}

#[test]
fn empty_frame_is_a_truncated_message() {
    assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(Error::Truncated));
    assert_eq!(decode(&[]), Err(Error::Truncated));
}

#[test]
fn decode_frame_waits_for_a_whole_frame() {
    for msg in golden_messages() {
        let frame = encode_frame(&msg).unwrap();
        for n in 0..frame.len() {
            assert_eq!(decode_frame(&frame[..n]), Ok(None), "{} frame cut at {n} of {}", msg.kind(), frame.len());
        }
        assert_eq!(decode_frame(&frame), Ok(Some((msg, frame.len()))));
    }
}

#[test]
fn decode_frame_consumes_exactly_one_of_two_concatenated_frames() {
    let first = golden_message("hello");
    let second = golden_message("case_offer");
    let first_frame = encode_frame(&first).unwrap();
    let second_frame = encode_frame(&second).unwrap();
    let third_frame = encode_frame(&golden_message("recall")).unwrap();
    let mut buf = [first_frame.as_slice(), &second_frame, &third_frame[..third_frame.len() - 1]].concat();

    let (msg, used) = decode_frame(&buf).unwrap().expect("the first frame is complete");
    assert_eq!((msg, used), (first, first_frame.len()));
    buf.drain(..used);
    let (msg, used) = decode_frame(&buf).unwrap().expect("the second frame is complete");
    assert_eq!((msg, used), (second, second_frame.len()));
    buf.drain(..used);
    assert_eq!(decode_frame(&buf), Ok(None), "the third frame lacks its last byte");
}

#[test]
fn deeply_nested_cbor_is_refused_without_overflowing_the_stack() {
    // 100 000 nested one-element arrays around a zero.
    let mut deep = vec![0x81; 100_000];
    deep.push(0x00);
    assert!(matches!(decode(&deep), Err(Error::Decode(_))), "{:?}", decode(&deep));
    // The same as an unknown field, which serde skips by walking it: this is
    // where the nesting limit has to hold.
    let mut in_hello = cbor_bytes(&Value::Map(vec![(
        Value::Text("hello".into()),
        Value::Map(vec![(Value::Text("x_future".into()), Value::Null)]),
    )]));
    in_hello.pop(); // drop the null, put the deep array there instead
    in_hello.extend_from_slice(&deep);
    match decode(&in_hello) {
        Err(Error::Decode(why)) => assert!(why.contains("nested deeper than"), "{why}"),
        other => panic!("expected a decode error, got {other:?}"),
    }
    // And inside a validly signed body.
    let mut in_recall = cbor_bytes(&Value::Map(vec![(Value::Text("x_future".into()), Value::Null)]));
    in_recall.pop();
    in_recall.extend_from_slice(&deep);
    let env = sign_payload(&GOLDEN_KEY, content_type::RECALL, in_recall);
    assert!(matches!(env.open::<Recall>(content_type::RECALL), Err(Error::Decode(_))));
    // And as an envelope, which the COSE parser reads.
    let env = SignedEnvelope::from_bytes(deep);
    assert!(matches!(env.verify(content_type::RECALL), Err(Error::BadEnvelope(_))));
    exercise_envelope(&env);
}

#[test]
fn huge_declared_lengths_are_refused_without_allocating() {
    // Byte string, text string, array and map, each claiming 2^64 - 1 items.
    for major in [0x5b, 0x7b, 0x9b, 0xbb] {
        let mut bytes = vec![major];
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&[0; 16]);
        assert!(decode(&bytes).is_err(), "{major:#04x}");
        assert!(SignedEnvelope::from_bytes(bytes.clone()).verify(content_type::RECALL).is_err());
        // As the value of a known field and of an unknown one.
        for key in ["missing", "x_future"] {
            let mut msg = cbor_bytes(&Value::Map(vec![(
                Value::Text("offer_accept".into()),
                Value::Map(vec![(Value::Text(key.into()), Value::Null)]),
            )]));
            msg.pop();
            msg.extend_from_slice(&bytes);
            assert!(decode(&msg).is_err(), "{major:#04x} as `{key}`");
        }
    }
}

// ---------------------------------------------------------------------------------
// Version tolerance
// ---------------------------------------------------------------------------------

#[test]
fn newer_peer_fields_are_ignored_in_every_message() {
    for msg in golden_messages() {
        let mut value = cbor_value(&encode(&msg).unwrap());
        add_future_fields(message_body(&mut value));
        let bytes = cbor_bytes(&value);
        assert_eq!(decode(&bytes).as_ref(), Ok(&msg), "{} with fields from a newer peer", msg.kind());
    }
}

#[test]
fn newer_peer_fields_are_ignored_in_every_signed_body() {
    for body in golden_bodies() {
        assert_eq!(
            sign_payload(&GOLDEN_KEY, body.content_type(), body.payload()),
            body.sign_with(&GOLDEN_KEY),
            "the raw signing helper signs as the crate does"
        );
        let mut value = cbor_value(&body.payload());
        add_future_fields(&mut value);
        let env = sign_payload(&GOLDEN_KEY, body.content_type(), cbor_bytes(&value));
        assert_eq!(
            body.open_same_type(&env, &public(&GOLDEN_KEY)).as_ref(),
            Ok(&body),
            "{} with fields from a newer peer",
            body.name()
        );
    }
}

/// `Hello` as a future version might define it: fields in another order, new
/// fields at both levels, a newer protocol version.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum NewerMessage {
    Hello(NewerHello),
}

#[derive(Serialize)]
struct NewerHello {
    features: Vec<String>,
    protocol_version: u16,
    node: NewerNodeClaim,
    protocol_version_min: u16,
    max_frame_len: u64,
    software: String,
}

#[derive(Serialize)]
struct NewerNodeClaim {
    region: String,
    name: NodeName,
    tier: Tier,
    public_key: PublicKey,
    certificate_serial: Option<u64>,
}

#[test]
fn hello_from_a_newer_peer_decodes_into_the_current_types() {
    let newer = NewerMessage::Hello(NewerHello {
        features: vec!["resumable-chunks-v2".into(), "zstd".into()],
        protocol_version: 3,
        node: NewerNodeClaim {
            region: "henan.cn".into(),
            name: node(COUNTY),
            tier: Tier::County,
            public_key: public(&GOLDEN_KEY),
            certificate_serial: Some(42),
        },
        protocol_version_min: 1,
        max_frame_len: 4 << 20,
        software: "telemed-node 3.0.0".into(),
    });
    let bytes = to_cbor(&newer).unwrap();
    let expected = Message::Hello(Hello {
        protocol_version: 3,
        protocol_version_min: 1,
        node: NodeClaim { name: node(COUNTY), tier: Tier::County, public_key: public(&GOLDEN_KEY) },
        software: "telemed-node 3.0.0".into(),
    });
    assert_eq!(decode(&bytes), Ok(expected));
}

#[test]
fn older_peer_may_omit_fields_marked_default() {
    // Messages: Hello.software; ReportDelivery.trail and .findings.
    let mut hello = cbor_value(&encode(&golden_message("hello")).unwrap());
    remove_field(message_body(&mut hello), "software");
    match decode(&cbor_bytes(&hello)) {
        Ok(Message::Hello(h)) => assert_eq!(h.software, ""),
        other => panic!("{other:?}"),
    }
    let mut delivery = cbor_value(&encode(&golden_message("report_delivery")).unwrap());
    remove_field(message_body(&mut delivery), "trail");
    remove_field(message_body(&mut delivery), "findings");
    match decode(&cbor_bytes(&delivery)) {
        Ok(Message::ReportDelivery(d)) => assert!(d.trail.is_empty() && d.findings.is_empty()),
        other => panic!("{other:?}"),
    }

    // Signed bodies: PatientRef.sex and .age_years, AttachmentRef.name,
    // HopRecord.skipped, Report.fields.
    let mut m = cbor_value(&to_cbor(&manifest()).unwrap());
    remove_field(field(&mut m, "patient"), "sex");
    remove_field(field(&mut m, "patient"), "age_years");
    match field(&mut m, "attachments") {
        Value::Array(items) => items.iter_mut().for_each(|a| remove_field(a, "name")),
        other => panic!("{other:?}"),
    }
    let env = sign_payload(&GOLDEN_KEY, content_type::MANIFEST, cbor_bytes(&m));
    let opened: CaseManifest = env.open_from(content_type::MANIFEST, &public(&GOLDEN_KEY)).unwrap();
    assert_eq!((opened.patient.sex, opened.patient.age_years), (None, None));
    assert!(opened.attachments.iter().all(|a| a.name.is_empty()));

    let mut h = cbor_value(&to_cbor(&hops()[0]).unwrap());
    remove_field(&mut h, "skipped");
    let env = sign_payload(&GOLDEN_KEY, content_type::HOP, cbor_bytes(&h));
    assert!(env.open_from::<HopRecord>(content_type::HOP, &public(&GOLDEN_KEY)).unwrap().skipped.is_empty());

    let mut r = cbor_value(&to_cbor(&report()).unwrap());
    remove_field(&mut r, "fields");
    let env = sign_payload(&GOLDEN_KEY, content_type::REPORT, cbor_bytes(&r));
    assert!(env.open_from::<Report>(content_type::REPORT, &public(&GOLDEN_KEY)).unwrap().fields.is_empty());
}

#[test]
fn missing_required_field_is_a_decode_error_naming_it() {
    let mut hello = cbor_value(&encode(&golden_message("hello")).unwrap());
    remove_field(message_body(&mut hello), "protocol_version");
    match decode(&cbor_bytes(&hello)) {
        Err(Error::Decode(why)) => assert!(why.contains("protocol_version"), "{why}"),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn unknown_reject_code_decodes_as_other() {
    let mut reject = cbor_value(&encode(&golden_message("reject")).unwrap());
    *field(message_body(&mut reject), "code") = Value::Text("quota_exceeded".into());
    match decode(&cbor_bytes(&reject)) {
        Ok(Message::Reject(r)) => {
            assert_eq!(r.code, RejectCode::Other);
            assert_eq!(r.case_id, Some(case_id()), "the rest of the message survives");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wire_names_of_enums_are_stable() {
    fn wire_name<T: Serialize>(v: &T) -> String {
        match Value::serialized(v).unwrap() {
            Value::Text(t) => t,
            other => panic!("expected a text, got {other:?}"),
        }
    }
    for (code, name) in REJECT_CODES {
        assert_eq!(wire_name(&code), name);
        assert_eq!(from_cbor::<RejectCode>(&to_cbor(&code).unwrap()), Ok(code));
    }
    for tier in Tier::ALL {
        assert_eq!(wire_name(&tier), tier.as_str());
    }
    for modality in Modality::ALL {
        assert_eq!(wire_name(&modality), modality.as_str());
    }
    for urgency in Urgency::ALL {
        assert_eq!(wire_name(&urgency), urgency.as_str());
    }
    assert_eq!([wire_name(&Priority::Urgent), wire_name(&Priority::Bulk)], ["urgent", "bulk"]);
}

#[test]
fn unknown_message_variant_is_a_clear_decode_error() {
    let teleport = Value::Map(vec![(
        Value::Text("teleport".into()),
        Value::Map(vec![(Value::Text("case_id".into()), Value::Bytes(vec![0; 16]))]),
    )]);
    match decode(&cbor_bytes(&teleport)) {
        Err(Error::Decode(why)) => {
            assert!(why.contains("unknown variant") && why.contains("teleport"), "{why}");
            assert!(!why.contains("Semantic("), "the error reads as prose, not as a Debug dump: {why}");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

#[test]
fn message_of_the_wrong_shape_is_a_decode_error() {
    for value in [
        Value::Map(vec![(Value::Text("hello".into()), Value::Integer(5.into()))]),
        Value::Map(vec![
            (Value::Text("hello".into()), Value::Map(vec![])),
            (Value::Text("recall".into()), Value::Null),
        ]),
        Value::Array(vec![]),
        Value::Map(vec![]),
        Value::Integer(1.into()),
        Value::Null,
    ] {
        let result = decode(&cbor_bytes(&value));
        assert!(matches!(result, Err(Error::Decode(_))), "{value:?} gave {result:?}");
    }
    // A bare kind with no body is refused too (ciborium reads a text as an
    // enum's tag and then waits for the body, so this one reads as truncated).
    assert!(decode(&cbor_bytes(&Value::Text("hello".into()))).is_err());
}

// ---------------------------------------------------------------------------------
// Envelopes
// ---------------------------------------------------------------------------------

#[test]
fn signed_envelope_opens_to_its_body_and_signer() {
    let env = SignedEnvelope::sign(&GOLDEN_KEY, content_type::RECALL, &recall()).unwrap();
    assert_eq!(env.claimed_signer(), Ok(public(&GOLDEN_KEY)));
    assert_eq!(env.open::<Recall>(content_type::RECALL), Ok(Verified { signer: public(&GOLDEN_KEY), body: recall() }));
    assert_eq!(env.open_from::<Recall>(content_type::RECALL, &public(&GOLDEN_KEY)), Ok(recall()));
    assert_eq!(env.hash(), ContentHash::of(env.as_bytes()));
}

#[test]
fn envelope_under_another_content_type_is_rejected() {
    let env = sign(&custody_receipt());
    match env.open::<ReportReceipt>(content_type::REPORT_RECEIPT) {
        Err(Error::BadEnvelope(why)) => {
            assert!(why.contains(content_type::CUSTODY_RECEIPT) && why.contains(content_type::REPORT_RECEIPT), "{why}")
        }
        other => panic!("expected BadEnvelope, got {other:?}"),
    }
}

#[test]
fn tampered_payload_fails_with_bad_signature() {
    let env = sign(&report());
    let mut sign1 = CoseSign1::from_slice(env.as_bytes()).unwrap();
    let mut forged = report();
    forged.text = "Normal ECG. No action.".into();
    sign1.payload = Some(to_cbor(&forged).unwrap());
    let tampered = SignedEnvelope::from_bytes(sign1.to_vec().unwrap());
    assert_eq!(tampered.open::<Report>(content_type::REPORT), Err(Error::BadSignature));
    assert_eq!(tampered.open_from::<Report>(content_type::REPORT, &public(&GOLDEN_KEY)), Err(Error::BadSignature));
}

#[test]
fn tampered_content_type_fails_with_bad_signature() {
    // A receipt relabelled as a report receipt keeps its signature, which no longer
    // covers the protected header.
    let env = sign(&custody_receipt());
    let mut sign1 = CoseSign1::from_slice(env.as_bytes()).unwrap();
    sign1.protected.original_data = None;
    sign1.protected.header.content_type = Some(coset::ContentType::Text(content_type::REPORT_RECEIPT.into()));
    let relabelled = SignedEnvelope::from_bytes(sign1.to_vec().unwrap());
    assert_eq!(relabelled.verify(content_type::REPORT_RECEIPT), Err(Error::BadSignature));
}

#[test]
fn envelope_from_another_signer_is_rejected_by_open_from() {
    let env = SignedEnvelope::sign(&OTHER_KEY, content_type::RECALL, &recall()).unwrap();
    let err = env.open_from::<Recall>(content_type::RECALL, &public(&GOLDEN_KEY)).unwrap_err();
    assert_eq!(err, Error::UnexpectedSigner { expected: public(&GOLDEN_KEY), found: public(&OTHER_KEY) });
    let shown = err.to_string();
    assert!(shown.contains(&public(&GOLDEN_KEY).to_string()) && shown.contains(&public(&OTHER_KEY).to_string()));
    assert_eq!(err.reject_code(), RejectCode::BadSignature);
}

#[test]
fn open_from_checks_the_signer_before_decoding_the_body() {
    // Validly signed by someone else, with a payload that is not a Recall: the
    // answer is about the signer, and the stranger's bytes are never decoded.
    let env = sign_payload(&OTHER_KEY, content_type::RECALL, vec![0xff, 0x00]);
    assert_eq!(
        env.open_from::<Recall>(content_type::RECALL, &public(&GOLDEN_KEY)),
        Err(Error::UnexpectedSigner { expected: public(&GOLDEN_KEY), found: public(&OTHER_KEY) })
    );
}

#[test]
fn key_id_naming_another_key_fails_with_bad_signature() {
    let protected = eddsa_header(&OTHER_KEY, content_type::RECALL).build();
    let payload = to_cbor(&recall()).unwrap();
    let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), Some(payload));
    assert_eq!(env.claimed_signer(), Ok(public(&OTHER_KEY)));
    assert_eq!(env.open::<Recall>(content_type::RECALL), Err(Error::BadSignature));
}

#[test]
fn non_eddsa_algorithm_is_rejected() {
    let payload = to_cbor(&recall()).unwrap();
    let es256 = eddsa_header(&GOLDEN_KEY, content_type::RECALL).algorithm(iana::Algorithm::ES256).build();
    let env = sign_raw(&GOLDEN_KEY, es256, coset::Header::default(), Some(payload.clone()));
    match env.verify(content_type::RECALL) {
        Err(Error::BadEnvelope(why)) => assert!(why.contains("EdDSA"), "{why}"),
        other => panic!("expected BadEnvelope, got {other:?}"),
    }

    let mut no_alg = eddsa_header(&GOLDEN_KEY, content_type::RECALL).build();
    no_alg.alg = None;
    let env = sign_raw(&GOLDEN_KEY, no_alg, coset::Header::default(), Some(payload.clone()));
    assert!(matches!(env.verify(content_type::RECALL), Err(Error::BadEnvelope(_))));

    // EdDSA named only in the unprotected header does not count.
    let mut no_alg = eddsa_header(&GOLDEN_KEY, content_type::RECALL).build();
    no_alg.alg = None;
    let unprotected = HeaderBuilder::new().algorithm(iana::Algorithm::EdDSA).build();
    let env = sign_raw(&GOLDEN_KEY, no_alg, unprotected, Some(payload));
    assert!(matches!(env.verify(content_type::RECALL), Err(Error::BadEnvelope(_))));
}

#[test]
fn key_id_of_wrong_length_is_rejected() {
    let kid = GOLDEN_KEY.verifying_key().to_bytes();
    for bad_kid in [kid[..31].to_vec(), [&kid[..], &[0]].concat(), kid[..1].to_vec()] {
        let protected = eddsa_header(&GOLDEN_KEY, content_type::RECALL).key_id(bad_kid.clone()).build();
        let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), Some(to_cbor(&recall()).unwrap()));
        for err in [env.claimed_signer().unwrap_err(), env.verify(content_type::RECALL).unwrap_err()] {
            match err {
                Error::BadEnvelope(why) => assert!(why.contains("32-byte"), "{why}"),
                other => panic!("kid of {} bytes: expected BadEnvelope, got {other:?}", bad_kid.len()),
            }
        }
    }
    // No kid at all.
    let mut protected = eddsa_header(&GOLDEN_KEY, content_type::RECALL).build();
    protected.key_id.clear();
    let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), Some(to_cbor(&recall()).unwrap()));
    assert!(matches!(env.verify(content_type::RECALL), Err(Error::BadEnvelope(_))));
}

#[test]
fn key_id_that_is_not_a_curve_point_is_rejected() {
    let not_a_point = (0..=255u8)
        .map(|b| [b; 32])
        .find(|candidate| VerifyingKey::from_bytes(candidate).is_err())
        .expect("some 32-byte string is not a point");
    let protected = eddsa_header(&GOLDEN_KEY, content_type::RECALL).key_id(not_a_point.to_vec()).build();
    let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), Some(to_cbor(&recall()).unwrap()));
    assert_eq!(env.claimed_signer(), Ok(PublicKey(not_a_point)), "the claim itself parses");
    assert!(matches!(env.verify(content_type::RECALL), Err(Error::BadEnvelope(_))));
}

#[test]
fn missing_content_type_is_rejected() {
    let mut protected = eddsa_header(&GOLDEN_KEY, content_type::RECALL).build();
    protected.content_type = None;
    let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), Some(to_cbor(&recall()).unwrap()));
    assert!(matches!(env.verify(content_type::RECALL), Err(Error::BadEnvelope(_))));
}

#[test]
fn detached_payload_is_rejected() {
    let protected = eddsa_header(&GOLDEN_KEY, content_type::RECALL).build();
    let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), None);
    match env.verify(content_type::RECALL) {
        Err(Error::BadEnvelope(why)) => assert!(why.contains("detached"), "{why}"),
        other => panic!("expected BadEnvelope, got {other:?}"),
    }
}

#[test]
fn unprotected_header_is_rejected_so_relays_cannot_change_envelope_bytes() {
    // A relay adds an unsigned note to a manifest: the signature still covers
    // everything it did before, but the envelope's bytes, and so the hash that
    // custody receipts name, are no longer the origin's.
    let env = sign(&manifest());
    let mut sign1 = CoseSign1::from_slice(env.as_bytes()).unwrap();
    sign1.unprotected = HeaderBuilder::new().text_value("relayed_by".into(), Value::Text(COUNTY.into())).build();
    let relayed = SignedEnvelope::from_bytes(sign1.to_vec().unwrap());
    assert_ne!(relayed.hash(), env.hash());
    match relayed.verify(content_type::MANIFEST) {
        Err(Error::BadEnvelope(why)) => assert!(why.contains("unprotected"), "{why}"),
        other => panic!("expected BadEnvelope, got {other:?}"),
    }
}

#[test]
fn non_canonical_envelope_encoding_is_rejected() {
    // Re-assemble the envelope by hand: the same protected header, payload and
    // signature, with the payload's length written in 4 bytes instead of 2.
    let env = sign(&manifest());
    let sign1 = CoseSign1::from_slice(env.as_bytes()).unwrap();
    let protected = sign1.protected.original_data.clone().unwrap();
    let payload = sign1.payload.clone().unwrap();
    let assemble = |wide: bool| {
        [vec![0x84], bstr(&protected, false), vec![0xa0], bstr(&payload, wide), bstr(&sign1.signature, false)].concat()
    };
    assert_eq!(assemble(false), env.as_bytes(), "hand assembly reproduces the envelope");
    let wide = SignedEnvelope::from_bytes(assemble(true));
    assert_ne!(wide.hash(), env.hash());
    assert!(
        matches!(wide.verify(content_type::MANIFEST), Err(Error::BadEnvelope(_))),
        "{:?}",
        wide.verify(content_type::MANIFEST)
    );

    // COSE_Sign1 wrapped in its CBOR tag (18): same content, other bytes.
    let tagged = SignedEnvelope::from_bytes([&[0xd2][..], env.as_bytes()].concat());
    assert!(matches!(tagged.verify(content_type::MANIFEST), Err(Error::BadEnvelope(_))));
}

#[test]
fn critical_header_parameters_are_rejected() {
    // A newer signer marks a private header parameter as one the reader must
    // understand; this build does not, so it must refuse (RFC 9052 §3.1).
    const PRIVATE_LABEL: i64 = -70_000;
    let protected = eddsa_header(&GOLDEN_KEY, content_type::RECALL)
        .value(PRIVATE_LABEL, Value::Text("must-understand".into()))
        .add_critical_label(coset::RegisteredLabelWithPrivate::PrivateUse(PRIVATE_LABEL))
        .build();
    let env = sign_raw(&GOLDEN_KEY, protected, coset::Header::default(), Some(to_cbor(&recall()).unwrap()));
    match env.verify(content_type::RECALL) {
        Err(Error::BadEnvelope(why)) => assert!(why.contains("critical"), "{why}"),
        other => panic!("expected BadEnvelope, got {other:?}"),
    }
}

#[test]
fn undecodable_signed_payload_is_a_decode_error() {
    let env = sign_payload(&GOLDEN_KEY, content_type::RECALL, to_cbor(&report()).unwrap());
    assert!(matches!(env.open::<Recall>(content_type::RECALL), Err(Error::Decode(_))));
    let env = sign_payload(&GOLDEN_KEY, content_type::RECALL, vec![0xa4]);
    assert_eq!(env.open::<Recall>(content_type::RECALL), Err(Error::Truncated));
}

#[test]
fn errors_map_to_the_reject_code_the_peer_receives() {
    assert_eq!(Error::BadSignature.reject_code(), RejectCode::BadSignature);
    let unexpected = Error::UnexpectedSigner { expected: public(&GOLDEN_KEY), found: public(&OTHER_KEY) };
    assert_eq!(unexpected.reject_code(), RejectCode::BadSignature);
    for err in [
        Error::FrameTooLarge { len: 1 << 30, max: FRAME_LEN_MAX },
        Error::Truncated,
        Error::Decode("x".into()),
        Error::TrailingBytes { extra: 1 },
        Error::BadEnvelope("x".into()),
    ] {
        assert_eq!(err.reject_code(), RejectCode::Malformed, "{err}");
    }
}

// --- the ChunkResponse fast paths (no copy of the data through CBOR) ----------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The frame head plus the data is exactly `encode_frame`, at every data length
    /// class of the CBOR byte-string header (0..=23, 1-, 2-, 4-byte lengths).
    #[test]
    fn chunk_response_frame_head_plus_data_is_encode_frame(
        hash in arb_hash(),
        chunk_hash in arb_hash(),
        offset in any::<u64>(),
        total_size in any::<u64>(),
        len in prop_oneof![0usize..=23, 24usize..=300, 60_000usize..70_000, Just(CHUNK_LEN_MAX as usize)],
        fill in any::<u8>(),
    ) {
        let resp = ChunkResponse { hash, offset, total_size, chunk_hash, data: vec![fill; len] };
        let mut fast = codec::chunk_response_frame_head(&resp).unwrap();
        fast.extend_from_slice(&resp.data);
        prop_assert_eq!(&fast, &encode_frame(&Message::ChunkResponse(resp.clone())).unwrap());
        let payload = &fast[FRAME_HEADER_LEN..];
        // What a reader does: the head from the first bytes, the data on its own.
        let head_len = codec::chunk_response_head_len(&payload[..payload.len().min(256)], payload.len()).unwrap();
        prop_assert_eq!(head_len, payload.len() - len);
        let data = payload[head_len..].to_vec();
        prop_assert_eq!(codec::decode_split(&payload[..head_len], data).unwrap(), Message::ChunkResponse(resp));
    }

    /// `decode_split` accepts and refuses exactly what `decode` does, whatever the
    /// bytes and wherever they are split: a chunk response with any byte changed, cut
    /// or extended, split at any point and where `chunk_response_head_len` says.
    #[test]
    fn decode_split_agrees_with_decode_on_damaged_chunk_responses(
        at in any::<Index>(),
        byte in any::<u8>(),
        cut in any::<Index>(),
        extra in prop::collection::vec(any::<u8>(), 0..3),
        split in any::<Index>(),
    ) {
        let resp = ChunkResponse {
            hash: ContentHash([3; 32]),
            offset: 7,
            total_size: 9_000,
            chunk_hash: ContentHash([4; 32]),
            data: (0..300u32).map(|i| i as u8).collect(),
        };
        let good = encode(&Message::ChunkResponse(resp)).unwrap();
        let mut changed = good.clone();
        changed[at.index(good.len())] = byte;
        let mut cut_short = good.clone();
        cut_short.truncate(cut.index(good.len()));
        let mut longer = good.clone();
        longer.extend_from_slice(&extra);
        for payload in [changed, cut_short, longer] {
            let plain = decode(&payload).map_err(|e| e.to_string());
            let mut splits = vec![split.index(payload.len() + 1)];
            splits.extend(codec::chunk_response_head_len(&payload, payload.len()));
            for s in splits {
                let (head, rest) = payload.split_at(s);
                let split = codec::decode_split(head, rest.to_vec()).map_err(|e| e.to_string());
                prop_assert_eq!(&split, &plain, "split at {}", s);
            }
        }
    }
}

#[test]
fn decode_split_decodes_every_golden_message_as_decode_does_wherever_it_is_split() {
    for msg in golden_messages() {
        let payload = encode(&msg).unwrap();
        let plain = decode(&payload).unwrap();
        for s in 0..=payload.len() {
            let (head, rest) = payload.split_at(s);
            assert_eq!(codec::decode_split(head, rest.to_vec()).unwrap(), plain, "{} split at {s}", msg.kind());
        }
    }
}

#[test]
fn chunk_response_head_len_needs_the_whole_head_and_the_exact_length() {
    let resp = ChunkResponse {
        hash: ContentHash([3; 32]),
        offset: 7,
        total_size: 9_000,
        chunk_hash: ContentHash([4; 32]),
        data: vec![9; 300],
    };
    let payload = encode(&Message::ChunkResponse(resp)).unwrap();
    let head_len = payload.len() - 300;
    assert_eq!(codec::chunk_response_head_len(&payload, payload.len()), Some(head_len));
    assert_eq!(codec::chunk_response_head_len(&payload[..head_len], payload.len()), Some(head_len));
    // The data's header not yet in the prefix, or a length the data does not fill.
    assert_eq!(codec::chunk_response_head_len(&payload[..head_len - 1], payload.len()), None);
    assert_eq!(codec::chunk_response_head_len(&payload, payload.len() + 1), None);
    assert_eq!(codec::chunk_response_head_len(&payload, payload.len() - 1), None);
    // A prefix given with a smaller length than itself is refused, not a panic.
    assert_eq!(codec::chunk_response_head_len(&payload, 3), None);
    let other =
        encode(&Message::Reject(Reject { case_id: None, code: RejectCode::Malformed, detail: "x".into() })).unwrap();
    assert_eq!(codec::chunk_response_head_len(&other, other.len()), None);
}
