//! The node's half of the privacy boundary (ADR 0005): pseudonyms and DICOM
//! de-identification, done at the origin when a case is submitted.
//!
//! - [`Deidentifier::pseudonym`]: a stable pseudonym for a patient ID, HMAC-SHA256
//!   under a key only the origin holds (derived from its node key), so the same
//!   patient gets the same pseudonym at this origin and nobody above can reverse it.
//! - [`Deidentifier::deidentify_file`]: a DICOM file rewritten per DICOM PS3.15
//!   Annex E, Basic Application Level Confidentiality Profile, the whole of Table
//!   E.1-1's Basic Profile column (`deid_table.rs`, generated from the 2026c edition):
//!   every listed attribute gets its action (D dummy, Z empty, X removed, U UID
//!   replaced, and the combinations X/Z, X/D, X/Z/D, Z/D, X/Z/U*, resolved as
//!   [`Action::resolve`] says), at every depth of every sequence; private tags are
//!   removed; UIDs are replaced by `2.25.<HMAC of the old UID>`, the same for the same
//!   UID in every file, case and restart of this origin, so study, series, instance
//!   and references inside sequences stay consistent; PatientIdentityRemoved = YES,
//!   DeidentificationMethod and DeidentificationMethodCodeSequence (DCM 113100) are
//!   set. A file whose BurnedInAnnotation is YES is refused, or passed with a flag in
//!   its method text when the policy says so ([`BurnedInPolicy`]): burned-in text is
//!   pixel data, which this module never rewrites. So is an image without the
//!   attribute (or with it empty) of a kind that commonly shows text in its pixels
//!   ([`burned_in_text`]: ultrasound, endoscopy, photos, secondary captures, ...).
//!
//! The core decides who may see identifiers (`tiers::PrivacyPolicy`); this module
//! only transforms bytes. It must never log a patient identifier or write the
//! original file anywhere but the destination it is given.

use std::path::Path;

use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

/// What DeidentificationMethod (0012,0063) says.
pub const DEIDENTIFICATION_METHOD: &str =
    "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile (telemed-node)";
/// DeidentificationMethod (0012,0063) in the file: LO values, 64 characters at most.
const FILE_METHOD_VALUES: [&str; 3] =
    ["DICOM PS3.15 E.1 Basic Application Level Confidentiality", "Profile, Table E.1-1 of DICOM 2026c", "telemed-node"];
/// The further DeidentificationMethod value of a file passed with burned-in text.
const FILE_BURNED_IN_VALUE: &str = "BurnedInAnnotation YES: pixel data not cleaned";
/// The same for a file passed although it may show burned-in text (64 chars max).
const FILE_BURNED_IN_SUSPECTED_VALUE: &str = "burned-in text suspected: pixel data not cleaned";
/// Domain separation of the pseudonym key derivation.
const KEY_DOMAIN: &[u8] = b"telemed-pseudonym-key-v1\0";
/// Deepest sequence nesting de-identified; a deeper file is refused (real data sets
/// nest a few levels).
const DEPTH_MAX: usize = 16;
/// DeidentificationMethodCodeSequence: DICOM PS3.16 CID 7050, "Basic Application
/// Confidentiality Profile".
const BASIC_PROFILE_CODE: (&str, &str, &str) = ("113100", "DCM", "Basic Application Confidentiality Profile");

/// An action of DICOM PS3.15 Table E.1-1's Basic Profile column (E.1.1 defines them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace with a non-zero-length dummy value consistent with the VR.
    D,
    /// Replace with a zero-length value (or a dummy).
    Z,
    /// Remove.
    X,
    /// Replace with a non-zero-length UID, consistent across the instances.
    U,
    /// Z unless D is needed for IOD conformance.
    ZD,
    /// X unless Z is needed for IOD conformance.
    XZ,
    /// X unless D is needed for IOD conformance.
    XD,
    /// X unless Z or D is needed for IOD conformance.
    XZD,
    /// X unless Z, or replacing the UIDs inside the sequence (U), is needed.
    XZUStar,
}

/// What is done to one element, once its VR is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Remove,
    Empty,
    Dummy,
    ReplaceUid,
    /// A sequence kept, its items de-identified by the same table.
    CleanItems,
}

impl Action {
    /// The choice for a combined action. The node does not know which IOD module
    /// (and so which attribute Type) applies, so it takes the choice that keeps any
    /// IOD conformant and carries no original value: a dummy where D is allowed (a
    /// dummy is also a valid Z), empty where Z is the strongest, removal only for
    /// plain X. Sequences cannot hold a dummy value: D keeps the sequence and
    /// de-identifies its items, a combination with Z empties it, X/D removes it,
    /// X/Z/U* keeps it and replaces the UIDs inside (the items' own rules do).
    pub fn resolve(self, is_sequence: bool) -> Effect {
        use Action::*;
        match (self, is_sequence) {
            (X, _) | (XD, true) => Effect::Remove,
            (Z | XZ | XZD, true) | (Z | XZ, false) | (XZUStar, false) => Effect::Empty,
            (D | ZD | U | XZUStar, true) => Effect::CleanItems,
            (D | ZD | XD | XZD, false) => Effect::Dummy,
            (U, false) => Effect::ReplaceUid,
        }
    }
}

/// One row of Table E.1-1. A tag matches when `tag.group & group_mask == group` and
/// `tag.element & element_mask == element` (the repeating groups 50xx and 60xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub group: u16,
    pub element: u16,
    pub group_mask: u16,
    pub element_mask: u16,
    pub action: Action,
    pub name: &'static str,
}

/// The Basic Profile's action for a standard attribute, if the table lists it.
pub fn basic_profile_action(tag: Tag) -> Option<Action> {
    static EXACT: std::sync::OnceLock<std::collections::HashMap<(u16, u16), Action>> = std::sync::OnceLock::new();
    let exact = EXACT.get_or_init(|| {
        crate::deid_table::BASIC_PROFILE
            .iter()
            .filter(|r| r.group_mask == 0xFFFF && r.element_mask == 0xFFFF)
            .map(|r| ((r.group, r.element), r.action))
            .collect()
    });
    if let Some(a) = exact.get(&(tag.group(), tag.element())) {
        return Some(*a);
    }
    crate::deid_table::BASIC_PROFILE
        .iter()
        .filter(|r| r.group_mask != 0xFFFF || r.element_mask != 0xFFFF)
        .find(|r| tag.group() & r.group_mask == r.group && tag.element() & r.element_mask == r.element)
        .map(|r| r.action)
}

/// What to do with an image whose BurnedInAnnotation (0028,0301) is YES: its pixels
/// show text (often the patient's name), which header de-identification cannot remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BurnedInPolicy {
    /// Refuse the file: the case cannot be submitted with it (the default).
    #[default]
    Refuse,
    /// Send it, de-identified in its header, with the flag in its method text
    /// ([`BURNED_IN_FLAG`]) and BurnedInAnnotation = YES kept, so every tier sees it.
    Flag,
}

/// Appended to the method text of a file passed with burned-in annotation.
pub const BURNED_IN_FLAG: &str = "; BurnedInAnnotation=YES: pixel data NOT cleaned (passed by policy)";
/// Appended to the method text of a file passed although it may show burned-in text
/// (BurnedInAnnotation absent or empty on a kind of image that often has it).
pub const BURNED_IN_SUSPECTED_FLAG: &str = "; BurnedInAnnotation absent on an image kind that often has burned-in text: pixel data NOT cleaned (passed by policy)";

/// Modalities whose images commonly show text in the pixels (patient name, dates,
/// device and operator text), like the modality/SOP-class filters of RSNA CTP's
/// DicomPixelAnonymizer script: ultrasound (the scanner writes the patient's name
/// and the date into every frame), endoscopy (ES), external-camera photography
/// (XC), general microscopy (GM), document (DOC) and other (OT) images.
pub const BURNED_IN_MODALITIES: &[&str] = &["US", "IVUS", "ES", "XC", "GM", "DOC", "OT"];

/// SOP classes (a UID and the UIDs below it; a trailing `.`: only those below) whose images are made from a screen or a camera, not
/// by an acquisition device writing pixel data alone: Secondary Capture (all five,
/// incl. multi-frame: dose screens, scanned forms, screenshots), ultrasound (single
/// and multi-frame, incl. the retired ones), VL endoscopic / photographic images and
/// video (`…77.1.1`, `…77.1.4`, video `…77.1.1.1`, `…77.1.4.1`), and encapsulated
/// documents (PDF, CDA).
pub const BURNED_IN_SOP_CLASS_PREFIXES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.6.",
    "1.2.840.10008.5.1.4.1.1.3.",
    "1.2.840.10008.5.1.4.1.1.77.1.1",
    "1.2.840.10008.5.1.4.1.1.77.1.4",
    "1.2.840.10008.5.1.4.1.1.104.",
];

/// Why an image is treated as showing burned-in text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BurnedIn {
    /// BurnedInAnnotation (0028,0301) is YES.
    Yes,
    /// The attribute is absent or empty and the image is of a kind that commonly
    /// shows text (the reason says which).
    Suspected(String),
}

fn element_text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = e.to_str().ok()?;
    Some(s.trim_matches(['\0', ' ']).to_owned())
}

/// Whether `obj` shows (or, lacking the attribute, probably shows) burned-in text:
/// - BurnedInAnnotation YES → [`BurnedIn::Yes`]; NO → `None` (the device says so);
/// - absent or empty, on an image (it has PixelData) whose Modality is one of
///   [`BURNED_IN_MODALITIES`], or whose SOP class is one of
///   [`BURNED_IN_SOP_CLASS_PREFIXES`], or whose ImageType says SECONDARY or
///   SCREEN SAVE (a derived screen: CT dose reports, 3D captures) →
///   [`BurnedIn::Suspected`];
/// - otherwise `None`: CT, MR, CR, DX, MG, NM, PT ... images made by the
///   acquisition device rarely carry text in the pixels, and refusing every file
///   without the (Type 3) attribute would refuse most real files.
pub fn burned_in_text(obj: &InMemDicomObject) -> Option<BurnedIn> {
    let value = element_text(obj, tags::BURNED_IN_ANNOTATION).unwrap_or_default();
    if value.eq_ignore_ascii_case("YES") {
        return Some(BurnedIn::Yes);
    }
    if !value.is_empty() || obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return None;
    }
    let modality = element_text(obj, tags::MODALITY).unwrap_or_default().to_ascii_uppercase();
    if BURNED_IN_MODALITIES.contains(&modality.as_str()) {
        return Some(BurnedIn::Suspected(format!("modality {modality}")));
    }
    let sop_class = element_text(obj, tags::SOP_CLASS_UID).unwrap_or_default();
    let family = |root: &&str| match sop_class.strip_prefix(root.trim_end_matches('.')) {
        Some(rest) => (rest.is_empty() && !root.ends_with('.')) || rest.starts_with('.'),
        None => false,
    };
    if BURNED_IN_SOP_CLASS_PREFIXES.iter().any(family) {
        return Some(BurnedIn::Suspected(format!("SOP class {sop_class}")));
    }
    let image_type = element_text(obj, tags::IMAGE_TYPE).unwrap_or_default().to_ascii_uppercase();
    if image_type.split('\\').any(|v| v.trim() == "SECONDARY" || v.trim() == "SCREEN SAVE") {
        return Some(BurnedIn::Suspected(format!("image type {image_type}")));
    }
    None
}

/// Why a file could not be de-identified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeidError {
    #[error("not a readable DICOM file: {0}")]
    Unreadable(String),
    #[error("cannot write the de-identified file: {0}")]
    Write(String),
    #[error("the image has burned-in annotation (BurnedInAnnotation = YES); the privacy policy refuses it")]
    BurnedInAnnotation,
    #[error(
        "the image may have burned-in text ({0}; BurnedInAnnotation absent or empty); the privacy policy refuses it"
    )]
    BurnedInSuspected(String),
    #[error("sequences nested deeper than {DEPTH_MAX} levels")]
    TooDeep,
}

/// What was done to one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeidSummary {
    pub removed: usize,
    pub emptied: usize,
    pub dummied: usize,
    pub uids_replaced: usize,
    /// Private elements removed (counted in `removed` too).
    pub private_removed: usize,
    /// The file's BurnedInAnnotation was YES (or it is suspected, below) and the
    /// policy let it through.
    pub burned_in_flagged: bool,
    /// Flagged because the attribute is absent or empty on an image of a kind that
    /// commonly shows burned-in text ([`burned_in_text`]).
    pub burned_in_suspected: bool,
}

impl DeidSummary {
    /// The DeidentificationMethod text recorded for this file (in the file and in
    /// the manifest's `Deidentification.method`).
    pub fn method(&self) -> String {
        if self.burned_in_suspected {
            format!("{DEIDENTIFICATION_METHOD}{BURNED_IN_SUSPECTED_FLAG}")
        } else if self.burned_in_flagged {
            format!("{DEIDENTIFICATION_METHOD}{BURNED_IN_FLAG}")
        } else {
            DEIDENTIFICATION_METHOD.to_owned()
        }
    }
}

/// The origin's pseudonym and de-identification key.
pub struct Deidentifier {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for Deidentifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deidentifier(..)")
    }
}

impl Deidentifier {
    /// The key is SHA-256 over a domain tag and the node's secret key: only this
    /// node can compute it, and it is the same after every restart. Rotating the
    /// node key changes pseudonyms from then on (the origin keeps the old mapping
    /// in its case records).
    pub fn from_node_key(key: &SigningKey) -> Deidentifier {
        let mut h = Sha256::new();
        h.update(KEY_DOMAIN);
        h.update(key.to_bytes());
        let derived: [u8; 32] = h.finalize().into();
        Deidentifier { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derived) }
    }

    fn mac(&self, purpose: &str, value: &str) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(purpose.as_bytes());
        ctx.update(&[0]);
        ctx.update(value.as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// The patient's pseudonym: `psn-` and 32 hex digits (128 bits of the HMAC).
    pub fn pseudonym(&self, patient_id: &str) -> String {
        format!("psn-{}", hex::encode(&self.mac("patient", patient_id.trim())[..16]))
    }

    /// The replacement of a UID: `2.25.` and a 128-bit integer (PS3.5 B.2), the
    /// same for the same UID at this origin.
    pub fn uid(&self, old: &str) -> String {
        let mac = self.mac("uid", old.trim_end_matches(['\0', ' ']));
        let mut n = [0u8; 16];
        n.copy_from_slice(&mac[..16]);
        format!("2.25.{}", u128::from_be_bytes(n) >> 1)
    }

    /// Reads the DICOM file `src`, de-identifies it (burned-in annotation refused),
    /// and writes it to `dst`.
    pub fn deidentify_file(&self, src: &Path, dst: &Path) -> Result<DeidSummary, DeidError> {
        self.deidentify_file_with(src, dst, BurnedInPolicy::Refuse)
    }

    /// [`Self::deidentify_file`] with the policy for burned-in annotation.
    pub fn deidentify_file_with(
        &self,
        src: &Path,
        dst: &Path,
        burned_in: BurnedInPolicy,
    ) -> Result<DeidSummary, DeidError> {
        // Structure first: the DICOM parser allocates whatever length an element
        // declares, so a damaged file (or one with bytes appended) could make it
        // allocate gigabytes. A file that cannot be parsed cannot be de-identified,
        // so it is refused, never sent on as it is.
        crate::ingest::check_structure(src).map_err(|e| DeidError::Unreadable(e.to_string()))?;
        let mut obj = dicom_object::open_file(src).map_err(|e| DeidError::Unreadable(e.to_string()))?;
        let mut summary = DeidSummary::default();
        if let Some(burned) = burned_in_text(&obj) {
            match burned_in {
                BurnedInPolicy::Refuse => {
                    return Err(match burned {
                        BurnedIn::Yes => DeidError::BurnedInAnnotation,
                        BurnedIn::Suspected(why) => DeidError::BurnedInSuspected(why),
                    });
                }
                BurnedInPolicy::Flag => {
                    summary.burned_in_flagged = true;
                    summary.burned_in_suspected = matches!(burned, BurnedIn::Suspected(_));
                }
            }
        }
        self.clean(&mut obj, &mut summary, 0)?;
        obj.put(DataElement::new(tags::PATIENT_IDENTITY_REMOVED, VR::CS, PrimitiveValue::from("YES")));
        // In the file the method is several LO values of at most 64 characters each
        // (the manifest carries the one-line text); dciodvfy checks the lengths.
        let mut values: Vec<String> = FILE_METHOD_VALUES.iter().map(|v| v.to_string()).collect();
        if summary.burned_in_suspected {
            values.push(FILE_BURNED_IN_SUSPECTED_VALUE.into());
        } else if summary.burned_in_flagged {
            values.push(FILE_BURNED_IN_VALUE.into());
        }
        obj.put(DataElement::new(tags::DEIDENTIFICATION_METHOD, VR::LO, PrimitiveValue::Strs(values.into())));
        let (value, scheme, meaning) = BASIC_PROFILE_CODE;
        let code = InMemDicomObject::from_element_iter([
            DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
            DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, PrimitiveValue::from(scheme)),
            DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
        ]);
        obj.put(DataElement::new(
            tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(vec![code], Length::UNDEFINED),
        ));
        let sop = self.uid(obj.meta().media_storage_sop_instance_uid());
        obj.update_meta(|m| {
            m.media_storage_sop_instance_uid = sop;
            // The file meta may name the sending device, and carry private data.
            m.source_application_entity_title = None;
            m.private_information_creator_uid = None;
            m.private_information = None;
        });
        obj.write_to_file(dst).map_err(|e| DeidError::Write(e.to_string()))?;
        Ok(summary)
    }

    fn clean(&self, obj: &mut InMemDicomObject, summary: &mut DeidSummary, depth: usize) -> Result<(), DeidError> {
        if depth > DEPTH_MAX {
            return Err(DeidError::TooDeep);
        }
        let present: Vec<(Tag, VR, bool)> =
            obj.iter().map(|e| (e.header().tag, e.header().vr, matches!(e.value(), Value::Sequence(_)))).collect();
        for (tag, vr, is_sequence) in present {
            if tag.group() % 2 == 1 {
                obj.remove_element(tag);
                summary.removed += 1;
                summary.private_removed += 1;
                continue;
            }
            let effect = match basic_profile_action(tag) {
                Some(action) => action.resolve(is_sequence),
                // Attributes the table does not list are kept; sequences among them
                // may still hold listed attributes in their items.
                None if is_sequence => Effect::CleanItems,
                None => continue,
            };
            match effect {
                Effect::Remove => {
                    obj.remove_element(tag);
                    summary.removed += 1;
                }
                Effect::Empty => {
                    if is_sequence {
                        obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::<InMemDicomObject>::empty()));
                    } else {
                        obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
                    }
                    summary.emptied += 1;
                }
                Effect::Dummy if vr == VR::UI => {
                    self.replace_uids(obj, tag);
                    summary.uids_replaced += 1;
                }
                Effect::Dummy => {
                    obj.put(DataElement::new(tag, vr, dummy(vr)));
                    summary.dummied += 1;
                }
                Effect::ReplaceUid => {
                    self.replace_uids(obj, tag);
                    summary.uids_replaced += 1;
                }
                Effect::CleanItems => {
                    let mut result = Ok(());
                    obj.update_value(tag, |v| {
                        if let Some(items) = v.items_mut() {
                            for item in items.iter_mut() {
                                if result.is_ok() {
                                    result = self.clean(item, summary, depth + 1);
                                }
                            }
                        }
                    });
                    result?;
                }
            }
        }
        Ok(())
    }

    fn replace_uids(&self, obj: &mut InMemDicomObject, tag: Tag) {
        let Ok(Some(e)) = obj.element_opt(tag) else { return };
        let olds: Vec<String> = e.value().to_multi_str().map(|v| v.to_vec()).unwrap_or_default();
        let news: Vec<String> =
            olds.iter().filter(|u| !u.trim_end_matches(['\0', ' ']).is_empty()).map(|u| self.uid(u)).collect();
        obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::Strs(news.into())));
    }
}

/// A dummy value for a VR (action D): no information, valid for the VR.
fn dummy(vr: VR) -> PrimitiveValue {
    match vr {
        VR::DA => PrimitiveValue::from("19000101"),
        VR::TM => PrimitiveValue::from("000000"),
        VR::DT => PrimitiveValue::from("19000101000000"),
        VR::AS => PrimitiveValue::from("000D"),
        VR::IS | VR::DS => PrimitiveValue::from("0"),
        VR::AE | VR::CS | VR::LO | VR::LT | VR::PN | VR::SH | VR::ST | VR::UC | VR::UT => {
            PrimitiveValue::from("ANONYMIZED")
        }
        VR::US => PrimitiveValue::from(0_u16),
        VR::SS => PrimitiveValue::from(0_i16),
        VR::UL => PrimitiveValue::from(0_u32),
        VR::SL => PrimitiveValue::from(0_i32),
        VR::FL => PrimitiveValue::from(0_f32),
        VR::FD => PrimitiveValue::from(0_f64),
        // Binary and other values have no meaningful dummy: empty.
        _ => PrimitiveValue::Empty,
    }
}

/// Whether `head` (the first 132 bytes of a file) starts a DICOM Part 10 file.
pub fn is_dicom(head: &[u8]) -> bool {
    head.len() >= 132 && &head[128..132] == b"DICM"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(name)
    }

    fn key(seed: u8) -> Deidentifier {
        Deidentifier::from_node_key(&SigningKey::from_bytes(&[seed; 32]))
    }

    #[test]
    fn pseudonyms_are_stable_per_origin_and_differ_between_origins() {
        let (a, b) = (key(1), key(2));
        assert_eq!(a.pseudonym("410102198001011234"), a.pseudonym("410102198001011234"));
        assert_ne!(a.pseudonym("410102198001011234"), a.pseudonym("410102198001011235"));
        assert_ne!(a.pseudonym("410102198001011234"), b.pseudonym("410102198001011234"));
        assert!(a.pseudonym("x").starts_with("psn-") && a.pseudonym("x").len() == 36);
        let uid = a.uid("1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322");
        assert!(uid.starts_with("2.25.") && uid.len() <= 64, "{uid}");
        assert_eq!(uid, a.uid("1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322\0"));
    }

    #[test]
    fn a_damaged_dicom_file_is_refused_before_the_parser_allocates_its_lengths() {
        // Text appended to a real CT reads as an element declaring a 1.7 GB value;
        // before the structure check the parser tried to allocate it (seen in the
        // chaos suite). It must be refused at once, and nothing written.
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("damaged.dcm");
        let mut bytes = std::fs::read(testdata("CT_small.dcm")).unwrap();
        bytes.extend_from_slice(b"round 0 case 1");
        std::fs::write(&src, bytes).unwrap();
        let dst = dir.path().join("deid.dcm");
        match key(1).deidentify_file(&src, &dst) {
            // The structure walk names the overrun; the parser would not have got there.
            Err(DeidError::Unreadable(why)) => {
                assert!(why.contains("malformed DICOM") && why.contains("at byte"), "{why}")
            }
            other => panic!("a damaged file must be refused as unreadable, got {other:?}"),
        }
        assert!(!dst.exists(), "nothing written for a refused file");
    }

    #[test]
    fn a_ct_slice_loses_its_identifiers_and_keeps_its_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("identified.dcm");
        let mut obj = dicom_object::open_file(testdata("CT_small.dcm")).unwrap();
        obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Zhang^Wei")));
        obj.put(DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("410102198001011234")));
        obj.put(DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, PrimitiveValue::from("19800101")));
        obj.put(DataElement::new(tags::PATIENT_ADDRESS, VR::LO, PrimitiveValue::from("12 Jinshui Road")));
        obj.put(DataElement::new(Tag(0x0009, 0x0010), VR::LO, PrimitiveValue::from("PRIVATE CREATOR")));
        obj.write_to_file(&src).unwrap();
        let original = dicom_object::open_file(&src).unwrap();
        let dst = dir.path().join("deid.dcm");
        let d = key(1);
        let summary = d.deidentify_file(&src, &dst).unwrap();
        assert!(summary.removed > 0 && summary.emptied >= 3 && summary.uids_replaced >= 3, "{summary:?}");

        let bytes = std::fs::read(&dst).unwrap();
        for needle in ["Zhang", "410102198001011234", "19800101", "Jinshui", "PRIVATE CREATOR"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} left in the file");
        }
        let out = dicom_object::open_file(&dst).unwrap();
        let s = |o: &dicom_object::DefaultDicomObject, t: Tag| {
            o.element_opt(t).unwrap().map(|e| e.to_str().unwrap().trim_end_matches(['\0', ' ']).to_owned())
        };
        assert_eq!(s(&out, tags::PATIENT_IDENTITY_REMOVED).as_deref(), Some("YES"));
        assert_eq!(
            s(&out, tags::DEIDENTIFICATION_METHOD).as_deref(),
            Some(FILE_METHOD_VALUES.join("\\").as_str()),
            "the method, as LO values"
        );
        assert_eq!(s(&out, tags::PATIENT_NAME).as_deref(), Some(""));
        assert_eq!(s(&out, tags::PATIENT_ADDRESS), None);
        let old_sop = s(&original, tags::SOP_INSTANCE_UID).unwrap();
        let new_sop = s(&out, tags::SOP_INSTANCE_UID).unwrap();
        assert_eq!(new_sop, d.uid(&old_sop), "UIDs are replaced consistently");
        assert_eq!(out.meta().media_storage_sop_instance_uid().trim_end_matches('\0'), new_sop);
        assert!(out.iter().all(|e| e.header().tag.group() % 2 == 0), "no private tags left");
        assert_eq!(
            out.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap(),
            original.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap(),
            "pixel data untouched"
        );
    }

    fn text(o: &InMemDicomObject, t: Tag) -> Option<String> {
        o.element_opt(t).unwrap().map(|e| e.to_str().unwrap().trim_end_matches(['\0', ' ']).to_owned())
    }

    #[test]
    fn the_table_is_the_whole_basic_profile_column() {
        let table = crate::deid_table::BASIC_PROFILE;
        // DICOM 2026c Table E.1-1 as transcribed: 655 rows.
        assert_eq!(table.len(), 655);
        let count = |a: Action| table.iter().filter(|r| r.action == a).count();
        assert_eq!(
            [
                Action::D,
                Action::Z,
                Action::X,
                Action::U,
                Action::ZD,
                Action::XZ,
                Action::XD,
                Action::XZD,
                Action::XZUStar
            ]
            .map(count),
            [93, 42, 415, 55, 6, 11, 23, 8, 2]
        );
        for (tag, action) in [
            (tags::PATIENT_NAME, Action::Z),
            (tags::PATIENT_ID, Action::ZD), // Z until 2024b's edition
            (tags::PATIENT_BIRTH_DATE, Action::Z),
            (tags::PATIENT_ADDRESS, Action::X),
            (tags::STUDY_INSTANCE_UID, Action::U),
            (tags::INSTITUTION_NAME, Action::XZD),
            (tags::CONTENT_DATE, Action::ZD),
            (tags::REFERENCED_IMAGE_SEQUENCE, Action::XZUStar),
            (tags::ACQUISITION_DATE, Action::XZ),
            (tags::CONTENT_SEQUENCE, Action::D),
            (Tag(0x6002, 0x3000), Action::X), // Overlay Data, repeating group 60xx
            (Tag(0x501E, 0x0010), Action::X), // Curve Data, 50xx,xxxx
        ] {
            assert_eq!(basic_profile_action(tag), Some(action), "{tag}");
        }
        assert_eq!(basic_profile_action(tags::PIXEL_DATA), None);
        assert_eq!(basic_profile_action(tags::SOP_CLASS_UID), None, "the SOP class is kept");
    }

    #[test]
    fn every_action_is_applied_at_every_depth_and_references_stay_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let d = key(7);
        let base = dicom_object::open_file(testdata("CT_small.dcm")).unwrap();
        let sop = |o: &dicom_object::DefaultDicomObject| text(o, tags::SOP_INSTANCE_UID).unwrap();
        let study = text(&base, tags::STUDY_INSTANCE_UID).unwrap();
        let first_sop = sop(&base);

        // A second instance of the same study that references the first, with
        // identifiers hidden in nested sequences, a private creator inside an
        // item, and one attribute of each combined action.
        let mut second = base.clone();
        let second_sop = format!("{first_sop}.2");
        second.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(second_sop.as_str())));
        second.update_meta(|m| m.media_storage_sop_instance_uid = second_sop.clone());
        let inner = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PERSON_NAME, VR::PN, PrimitiveValue::from("Zhang^Wei")),
            DataElement::new(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(first_sop.as_str())),
            DataElement::new(Tag(0x0019, 0x0010), VR::LO, PrimitiveValue::from("PRIVATE CREATOR")),
        ]);
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(tags::REFERENCED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2")),
            DataElement::new(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(first_sop.as_str())),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Zhang^Wei")),
            // An unlisted sequence inside a listed one: still walked.
            DataElement::new(
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                VR::SQ,
                DataSetSequence::new(vec![inner], Length::UNDEFINED),
            ),
        ]);
        second.put(DataElement::new(
            tags::REFERENCED_IMAGE_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(vec![item], Length::UNDEFINED),
        ));
        second.put(DataElement::new(
            tags::INSTITUTION_NAME,
            VR::LO,
            PrimitiveValue::from("Dengfeng People's Hospital"),
        ));
        second.put(DataElement::new(tags::CONTENT_DATE, VR::DA, PrimitiveValue::from("20260101")));
        second.put(DataElement::new(tags::ACQUISITION_DATE, VR::DA, PrimitiveValue::from("20260101")));
        second.put(DataElement::new(tags::OPERATORS_NAME, VR::PN, PrimitiveValue::from("Li^Na")));
        second.put(DataElement::new(Tag(0x6000, 0x4000), VR::LT, PrimitiveValue::from("overlay by Li Na")));
        let (a_src, b_src) = (dir.path().join("a.dcm"), dir.path().join("b.dcm"));
        base.write_to_file(&a_src).unwrap();
        second.write_to_file(&b_src).unwrap();
        let (a_dst, b_dst) = (dir.path().join("a-deid.dcm"), dir.path().join("b-deid.dcm"));
        d.deidentify_file(&a_src, &a_dst).unwrap();
        let summary = d.deidentify_file(&b_src, &b_dst).unwrap();
        assert!(summary.dummied >= 2 && summary.private_removed >= 1, "{summary:?}");

        let (a, b) = (dicom_object::open_file(&a_dst).unwrap(), dicom_object::open_file(&b_dst).unwrap());
        // U: the same study UID in both, and the reference points at the new first SOP.
        assert_eq!(text(&a, tags::STUDY_INSTANCE_UID), text(&b, tags::STUDY_INSTANCE_UID));
        assert_ne!(text(&a, tags::STUDY_INSTANCE_UID).unwrap(), study);
        let items = b.element(tags::REFERENCED_IMAGE_SEQUENCE).unwrap().items().unwrap().to_vec();
        assert_eq!(items.len(), 1, "X/Z/U*: the reference sequence is kept");
        assert_eq!(text(&items[0], tags::REFERENCED_SOP_INSTANCE_UID), Some(sop(&a)), "references stay consistent");
        assert_eq!(text(&items[0], tags::REFERENCED_SOP_CLASS_UID).as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(text(&items[0], tags::PATIENT_NAME).as_deref(), Some(""), "Z inside a sequence");
        let nested = items[0].element(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE).unwrap().items().unwrap().to_vec();
        assert_eq!(text(&nested[0], tags::PERSON_NAME).as_deref(), Some("ANONYMIZED"), "D two levels down");
        assert_eq!(text(&nested[0], tags::REFERENCED_SOP_INSTANCE_UID), Some(sop(&a)), "U two levels down");
        assert!(nested[0].iter().all(|e| e.header().tag.group() % 2 == 0), "private tags removed in items");
        // X/Z/D -> a dummy, Z/D -> a dummy, X/Z -> empty, X/Z/D on a name, X on an overlay group.
        assert_eq!(text(&b, tags::INSTITUTION_NAME).as_deref(), Some("ANONYMIZED"));
        assert_eq!(text(&b, tags::CONTENT_DATE).as_deref(), Some("19000101"));
        assert_eq!(text(&b, tags::ACQUISITION_DATE).as_deref(), Some(""));
        assert_eq!(text(&b, tags::OPERATORS_NAME).as_deref(), Some("ANONYMIZED"));
        assert_eq!(text(&b, Tag(0x6000, 0x4000)), None);
        // The method, and its code.
        let code = b.element(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE).unwrap().items().unwrap().to_vec();
        assert_eq!(text(&code[0], tags::CODE_VALUE).as_deref(), Some("113100"));
        assert_eq!(text(&code[0], tags::CODING_SCHEME_DESIGNATOR).as_deref(), Some("DCM"));
        let bytes = std::fs::read(&b_dst).unwrap();
        for needle in ["Zhang", "Li^Na", "Li Na", "Dengfeng", "20260101", "PRIVATE CREATOR", first_sop.as_str()] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} left in the file");
        }
    }

    #[test]
    fn burned_in_annotation_is_refused_by_default_and_flagged_when_the_policy_allows() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("burned.dcm");
        let mut obj = dicom_object::open_file(testdata("CT_small.dcm")).unwrap();
        obj.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, PrimitiveValue::from("YES")));
        obj.write_to_file(&src).unwrap();
        let dst = dir.path().join("out.dcm");
        assert!(matches!(key(1).deidentify_file(&src, &dst), Err(DeidError::BurnedInAnnotation)));
        assert!(!dst.exists(), "nothing written for a refused file");
        let summary = key(1).deidentify_file_with(&src, &dst, BurnedInPolicy::Flag).unwrap();
        assert!(summary.burned_in_flagged);
        assert!(summary.method().contains("BurnedInAnnotation=YES"));
        let out = dicom_object::open_file(&dst).unwrap();
        assert_eq!(text(&out, tags::BURNED_IN_ANNOTATION).as_deref(), Some("YES"), "the flag stays in the file");
        assert!(text(&out, tags::DEIDENTIFICATION_METHOD).unwrap().contains("pixel data not cleaned"));
        // "NO" passes under the default policy.
        obj.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, PrimitiveValue::from("NO")));
        obj.write_to_file(&src).unwrap();
        assert!(!key(1).deidentify_file(&src, &dst).unwrap().burned_in_flagged);
    }

    #[test]
    fn images_without_the_attribute_are_judged_by_their_kind() {
        // The real files as they come (pydicom-data): none but emri_small carries
        // BurnedInAnnotation; the two ultrasounds lack it and are refused.
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.dcm");
        for name in ["US1_J2KR.dcm", "OBXXXX1A_rle.dcm"] {
            let obj = dicom_object::open_file(testdata(name)).unwrap();
            assert!(obj.element_opt(tags::BURNED_IN_ANNOTATION).unwrap().is_none(), "{name} has the attribute");
            match key(1).deidentify_file(&testdata(name), &dst) {
                Err(DeidError::BurnedInSuspected(why)) => assert!(why.contains("modality US"), "{name}: {why}"),
                other => panic!("{name}: {other:?}"),
            }
            let summary = key(1).deidentify_file_with(&testdata(name), &dst, BurnedInPolicy::Flag).unwrap();
            assert!(summary.burned_in_flagged && summary.burned_in_suspected, "{name}");
            assert!(summary.method().contains("BurnedInAnnotation absent"), "{name}");
            let out = dicom_object::open_file(&dst).unwrap();
            assert!(text(&out, tags::DEIDENTIFICATION_METHOD).unwrap().contains("burned-in text suspected"));
        }
        // CT, MR and CR from the acquisition device, without the attribute, pass;
        // so does the enhanced MR with NO and the ECG waveform (no pixel data).
        for name in [
            "CT_small.dcm",
            "693_J2KR.dcm",
            "MR2_J2KI.dcm",
            "RG1_J2KI.dcm",
            "RG3_J2KI.dcm",
            "emri_small.dcm",
            "waveform_ecg.dcm",
        ] {
            let summary = key(1).deidentify_file(&testdata(name), &dst).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!summary.burned_in_flagged, "{name}");
        }
        // An ultrasound whose device says NO passes; an empty value is as absent.
        let mut us = dicom_object::open_file(testdata("US1_J2KR.dcm")).unwrap();
        let src = dir.path().join("us.dcm");
        us.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, PrimitiveValue::from("NO")));
        us.write_to_file(&src).unwrap();
        assert!(!key(1).deidentify_file(&src, &dst).unwrap().burned_in_flagged);
        us.put(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, PrimitiveValue::from("")));
        us.write_to_file(&src).unwrap();
        assert!(matches!(key(1).deidentify_file(&src, &dst), Err(DeidError::BurnedInSuspected(_))));
        // A real CT turned into a Secondary Capture (a dose screen) or a CT whose
        // ImageType says SECONDARY is suspected; other modalities in the list too.
        let ct = || dicom_object::open_file(testdata("CT_small.dcm")).unwrap();
        let cases: [(Tag, &str, &str); 5] = [
            (tags::SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.7", "SOP class"),
            (tags::SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.7.4", "SOP class"),
            (tags::SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.77.1.4", "SOP class"),
            (tags::IMAGE_TYPE, "DERIVED\\SECONDARY\\OTHER", "image type"),
            (tags::MODALITY, "XC", "modality XC"),
        ];
        for (tag, value, why) in cases {
            let mut obj = ct();
            let vr = if tag == tags::SOP_CLASS_UID { VR::UI } else { VR::CS };
            obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
            obj.write_to_file(&src).unwrap();
            match key(1).deidentify_file(&src, &dst) {
                Err(DeidError::BurnedInSuspected(text)) => assert!(text.contains(why), "{value}: {text}"),
                other => panic!("{value}: {other:?}"),
            }
        }
        // A UID that only shares digits with a listed one is not in the family.
        let mut obj = ct();
        obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.77.1.10")));
        obj.write_to_file(&src).unwrap();
        assert!(!key(1).deidentify_file(&src, &dst).unwrap().burned_in_flagged);
    }

    #[test]
    fn a_file_that_is_not_dicom_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("x.dcm");
        std::fs::write(&src, b"not dicom at all").unwrap();
        assert!(matches!(key(1).deidentify_file(&src, &dir.path().join("y")), Err(DeidError::Unreadable(_))));
    }
}
