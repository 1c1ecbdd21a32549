//! The node's half of the privacy boundary (ADR 0005): pseudonyms and DICOM
//! de-identification, done at the origin when a case is submitted.
//!
//! - [`Deidentifier::pseudonym`]: a stable pseudonym for a patient ID, HMAC-SHA256
//!   under a key only the origin holds (derived from its node key), so the same
//!   patient gets the same pseudonym at this origin and nobody above can reverse it.
//! - [`Deidentifier::deidentify_file`]: a DICOM file rewritten per DICOM PS3.15
//!   Annex E, Basic Application Level Confidentiality Profile: the attributes the
//!   profile lists are removed (X) or emptied (Z), UIDs are replaced (U) by
//!   `2.25.<HMAC of the old UID>` (consistent across files, cases and restarts of
//!   this origin), private tags are removed, the same rules apply inside sequences,
//!   and PatientIdentityRemoved = YES with DeidentificationMethod is set.
//!
//! The core decides who may see identifiers (`tiers::PrivacyPolicy`); this module
//! only transforms bytes. It must never log a patient identifier or write the
//! original file anywhere but the destination it is given.

use std::path::Path;

use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

/// What DeidentificationMethod (0012,0063) says.
pub const DEIDENTIFICATION_METHOD: &str =
    "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile (telemed-node)";
/// Domain separation of the pseudonym key derivation.
const KEY_DOMAIN: &[u8] = b"telemed-pseudonym-key-v1\0";
/// Deepest sequence nesting walked (real data sets nest a few levels).
const DEPTH_MAX: usize = 16;

/// Attributes the Basic Profile removes (action X, or X/Z, X/D ... taken as X).
const REMOVE: &[Tag] = &[
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::REFERRING_PHYSICIAN_ADDRESS,
    tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
    tags::STATION_NAME,
    tags::STUDY_DESCRIPTION,
    tags::SERIES_DESCRIPTION,
    tags::INSTITUTIONAL_DEPARTMENT_NAME,
    tags::PHYSICIANS_OF_RECORD,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::OPERATORS_NAME,
    tags::ADMITTING_DIAGNOSES_DESCRIPTION,
    tags::REFERENCED_PATIENT_SEQUENCE,
    tags::DERIVATION_DESCRIPTION,
    tags::SERIES_DATE,
    tags::ACQUISITION_DATE,
    tags::SERIES_TIME,
    tags::ACQUISITION_TIME,
    tags::ACQUISITION_DATE_TIME,
    tags::INSTANCE_CREATION_DATE,
    tags::INSTANCE_CREATION_TIME,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_TIME,
    tags::PATIENT_INSURANCE_PLAN_CODE_SEQUENCE,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::OTHER_PATIENT_NAMES,
    tags::PATIENT_BIRTH_NAME,
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    tags::PATIENT_ADDRESS,
    tags::PATIENT_MOTHER_BIRTH_NAME,
    tags::MILITARY_RANK,
    tags::BRANCH_OF_SERVICE,
    Tag(0x0010, 0x1090), // Medical Record Locator (retired, still in the profile)
    tags::PATIENT_TELEPHONE_NUMBERS,
    Tag(0x0010, 0x2160), // Ethnic Group (retired, still in the profile)
    tags::OCCUPATION,
    tags::ADDITIONAL_PATIENT_HISTORY,
    tags::PATIENT_RELIGIOUS_PREFERENCE,
    tags::PATIENT_COMMENTS,
    tags::RESPONSIBLE_PERSON,
    tags::RESPONSIBLE_ORGANIZATION,
    tags::DEVICE_SERIAL_NUMBER,
    tags::PROTOCOL_NAME,
    tags::IMAGE_COMMENTS,
    tags::REQUESTING_PHYSICIAN,
    tags::REQUESTING_SERVICE,
    tags::REQUEST_ATTRIBUTES_SEQUENCE,
    tags::PERFORMED_PROCEDURE_STEP_ID,
    tags::PERFORMED_PROCEDURE_STEP_START_DATE,
    tags::PERFORMED_PROCEDURE_STEP_START_TIME,
    tags::PERFORMED_PROCEDURE_STEP_DESCRIPTION,
    tags::SCHEDULED_PROCEDURE_STEP_ID,
    tags::CONTENT_CREATOR_NAME,
    tags::VERIFYING_OBSERVER_NAME,
    tags::PERSON_NAME,
];

/// Attributes the Basic Profile keeps but empties (action Z, or Z/D taken as Z).
const EMPTY: &[Tag] = &[
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::ACCESSION_NUMBER,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::CONTENT_DATE,
    tags::CONTENT_TIME,
    tags::STUDY_ID,
];

/// UIDs the Basic Profile replaces (action U).
const REPLACE_UID: &[Tag] = &[
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::FRAME_OF_REFERENCE_UID,
    tags::REFERENCED_SOP_INSTANCE_UID,
    tags::REFERENCED_FRAME_OF_REFERENCE_UID,
    tags::SYNCHRONIZATION_FRAME_OF_REFERENCE_UID,
    tags::CONCATENATION_UID,
    tags::DIMENSION_ORGANIZATION_UID,
    tags::IRRADIATION_EVENT_UID,
    tags::STORAGE_MEDIA_FILE_SET_UID,
    tags::INSTANCE_CREATOR_UID,
    tags::TRANSACTION_UID,
    tags::DEVICE_UID,
    tags::UID,
];

/// Why a file could not be de-identified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeidError {
    #[error("not a readable DICOM file: {0}")]
    Unreadable(String),
    #[error("cannot write the de-identified file: {0}")]
    Write(String),
}

/// What was done to one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeidSummary {
    pub removed: usize,
    pub emptied: usize,
    pub uids_replaced: usize,
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

    /// Reads the DICOM file `src`, de-identifies it, and writes it to `dst`.
    pub fn deidentify_file(&self, src: &Path, dst: &Path) -> Result<DeidSummary, DeidError> {
        // Structure first: the DICOM parser allocates whatever length an element
        // declares, so a damaged file (or one with bytes appended) could make it
        // allocate gigabytes. A file that cannot be parsed cannot be de-identified,
        // so it is refused, never sent on as it is.
        crate::ingest::check_structure(src).map_err(|e| DeidError::Unreadable(e.to_string()))?;
        let mut obj = dicom_object::open_file(src).map_err(|e| DeidError::Unreadable(e.to_string()))?;
        let mut summary = DeidSummary::default();
        self.clean(&mut obj, &mut summary, 0);
        obj.put(DataElement::new(tags::PATIENT_IDENTITY_REMOVED, VR::CS, PrimitiveValue::from("YES")));
        obj.put(DataElement::new(tags::DEIDENTIFICATION_METHOD, VR::LO, PrimitiveValue::from(DEIDENTIFICATION_METHOD)));
        let sop = self.uid(obj.meta().media_storage_sop_instance_uid());
        obj.update_meta(|m| m.media_storage_sop_instance_uid = sop);
        obj.write_to_file(dst).map_err(|e| DeidError::Write(e.to_string()))?;
        Ok(summary)
    }

    fn clean(&self, obj: &mut InMemDicomObject, summary: &mut DeidSummary, depth: usize) {
        let before = obj.tags().count();
        obj.retain(|e| {
            let tag = e.header().tag;
            tag.group() % 2 == 0 && !REMOVE.contains(&tag)
        });
        summary.removed += before - obj.tags().count();
        for &tag in EMPTY {
            if let Ok(Some(e)) = obj.element_opt(tag) {
                let vr = e.header().vr;
                obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
                summary.emptied += 1;
            }
        }
        for &tag in REPLACE_UID {
            let Ok(Some(e)) = obj.element_opt(tag) else { continue };
            let olds: Vec<String> = e.value().to_multi_str().map(|v| v.to_vec()).unwrap_or_default();
            let news: Vec<String> = olds.iter().map(|u| self.uid(u)).collect();
            obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::Strs(news.into())));
            summary.uids_replaced += 1;
        }
        if depth >= DEPTH_MAX {
            return;
        }
        let sequences: Vec<Tag> =
            obj.iter().filter(|e| matches!(e.value(), Value::Sequence(_))).map(|e| e.header().tag).collect();
        for tag in sequences {
            obj.update_value(tag, |v| {
                if let Some(items) = v.items_mut() {
                    for item in items.iter_mut() {
                        self.clean(item, summary, depth + 1);
                    }
                }
            });
        }
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
        assert_eq!(s(&out, tags::DEIDENTIFICATION_METHOD).as_deref(), Some(DEIDENTIFICATION_METHOD));
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

    #[test]
    fn a_file_that_is_not_dicom_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("x.dcm");
        std::fs::write(&src, b"not dicom at all").unwrap();
        assert!(matches!(key(1).deidentify_file(&src, &dir.path().join("y")), Err(DeidError::Unreadable(_))));
    }
}
