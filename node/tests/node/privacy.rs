//! The privacy boundary over real QUIC: a village, a township and a county node
//! provisioned as the demo does, every node configured with identifiers allowed up
//! to the township. A CT slice carrying a patient's name, ID-card number and birth
//! date is submitted at the village and read at the county; nothing identifying
//! may be found at the county (case record, manifest, every byte of its data
//! directory, the DICOM headers of the blobs it received, the logs), while the
//! township holds the origin-signed identity and the village matches the report
//! to the patient.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use federation_proto::{Modality, Tier, Urgency};
use node::daemon::{PatientDetails, SubmitRequest};
use node::demo::{PlannedNode, provision};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NAME: &str = "Zhang^Wei";
const ID_NUMBER: &str = "410102198001011234";
const BIRTH_DICOM: &str = "19800101";
const BIRTH: &str = "1980-01-01";
const ADDRESS: &str = "12 Jinshui Road, Zhengzhou";
const PHONE: &str = "+86 371 5555 0199";

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_none_or(|x| x != "sock") {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_escalated_past_the_boundary_carries_no_direct_identifiers() {
    super::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let county = "dengfeng.zhengzhou.henan.cn";
    let township = format!("gaocheng.{county}");
    let village = format!("v1.{township}");
    let plan = vec![
        PlannedNode { name: county.into(), tier: Tier::County, parent: None, experts: vec![(Modality::Imaging, 1)] },
        PlannedNode { name: township.clone(), tier: Tier::Township, parent: Some(county.into()), experts: vec![] },
        PlannedNode { name: village.clone(), tier: Tier::Village, parent: Some(township.clone()), experts: vec![] },
    ];
    let mut configs = provision(dir.path(), &plan).unwrap();
    for c in &mut configs {
        c.privacy.identifiers_up_to = Some(Tier::Township);
    }
    // Start from the top so each parent's address is known.
    let c_node = node::daemon::start(configs[0].clone()).await.unwrap();
    configs[1].parents =
        vec![node::config::ParentConfig { name: county.into(), tier: Tier::County, addr: c_node.addr }];
    let t_node = node::daemon::start(configs[1].clone()).await.unwrap();
    configs[2].parents =
        vec![node::config::ParentConfig { name: township.clone(), tier: Tier::Township, addr: t_node.addr }];
    let v_node = node::daemon::start(configs[2].clone()).await.unwrap();

    // A real CT slice with the patient's identifiers and a private tag in its header.
    let mut obj = dicom_object::open_file(node::demo::testdata_dir().join("CT_small.dcm")).unwrap();
    obj.put(DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from(NAME)));
    obj.put(DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from(ID_NUMBER)));
    obj.put(DataElement::new(tags::PATIENT_BIRTH_DATE, VR::DA, PrimitiveValue::from(BIRTH_DICOM)));
    obj.put(DataElement::new(tags::PATIENT_ADDRESS, VR::LO, PrimitiveValue::from(ADDRESS)));
    obj.put(DataElement::new(Tag(0x0011, 0x0010), VR::LO, PrimitiveValue::from(ID_NUMBER)));
    let original_uid =
        obj.element(tags::STUDY_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches('\0').to_owned();
    let ct = dir.path().join("zhang-wei-ct.dcm");
    obj.write_to_file(&ct).unwrap();
    let original_hash = federation_proto::ContentHash::of(&std::fs::read(&ct).unwrap());

    let id = v_node
        .submit(SubmitRequest {
            files: vec![ct.clone()],
            study: None,
            modality: Modality::Imaging,
            urgency: Urgency::Urgent,
            question: "fracture?".into(),
            patient: ID_NUMBER.into(),
            task: None,
            details: PatientDetails {
                name: NAME.into(),
                birth_date: BIRTH.into(),
                address: ADDRESS.into(),
                phone: PHONE.into(),
            },
        })
        .await
        .unwrap()
        .unwrap();

    let end = Instant::now() + Duration::from_secs(90);
    let at_village = loop {
        let v = v_node.show(id).await.unwrap().unwrap();
        if v.report.is_some() {
            break v;
        }
        assert!(Instant::now() < end, "no report at the village: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The origin matches the report to the right patient.
    let identity = at_village.identity.as_ref().expect("the origin holds the identity");
    assert_eq!((identity.patient_id.as_str(), identity.name.as_str()), (ID_NUMBER, NAME));
    assert_eq!(identity.pseudonym, at_village.patient);
    assert_eq!(at_village.report.as_ref().unwrap().node, county, "read at the county");

    // The township, inside the boundary, holds the origin-signed identity.
    let at_township = t_node.show(id).await.unwrap().expect("case passed through the township");
    assert_eq!(at_township.identity.as_ref().map(|p| p.patient_id.as_str()), Some(ID_NUMBER));

    // The county, past the boundary: a pseudonym only.
    let at_county = c_node.show(id).await.unwrap().expect("case at the county");
    assert!(at_county.identity.is_none(), "{at_county:?}");
    assert!(at_county.patient.starts_with("psn-") && !at_county.patient.contains(ID_NUMBER));
    let rendered = format!("{at_county:?}{}", at_county.render());
    for needle in [NAME, "Zhang", ID_NUMBER, BIRTH, BIRTH_DICOM, ADDRESS, PHONE, "zhang-wei"] {
        assert!(!rendered.contains(needle), "{needle} in the county's view of the case");
    }
    let store = node::store::SqliteStore::open_read_only(&configs[0].db_path()).await.unwrap();
    let record = store.case(&id).await.unwrap().expect("stored at the county");
    assert!(record.identity.is_none());
    assert_eq!(record.info.deidentified.len(), 1);
    assert_eq!(record.info.deidentified[0].original_hash, original_hash, "the original's hash is recorded");
    assert_eq!(record.info.attachments[0].hash, record.info.deidentified[0].hash);
    store.close().await;

    c_node.shutdown().await.unwrap();
    t_node.shutdown().await.unwrap();
    v_node.shutdown().await.unwrap();

    // Every byte the county wrote: the database (and WAL), blobs, anything else.
    let county_files = files_under(&configs[0].data_dir);
    let mut dicom_blobs = 0;
    for f in &county_files {
        let bytes = std::fs::read(f).unwrap();
        for needle in [NAME, "Zhang", ID_NUMBER, BIRTH, BIRTH_DICOM, "Jinshui", PHONE, original_uid.as_str()] {
            assert!(!contains(&bytes, needle), "{needle} found in {}", f.display());
        }
        if node::deid::is_dicom(&bytes[..bytes.len().min(132)]) {
            dicom_blobs += 1;
            let obj = dicom_object::open_file(f).unwrap();
            let text =
                |t| obj.element_opt(t).unwrap().map(|e| e.to_str().unwrap().trim_end_matches(['\0', ' ']).to_owned());
            assert_eq!(text(tags::PATIENT_IDENTITY_REMOVED).as_deref(), Some("YES"), "{}", f.display());
            assert!(text(tags::DEIDENTIFICATION_METHOD).unwrap().contains("PS3.15"));
            assert_eq!(text(tags::PATIENT_NAME).as_deref(), Some(""));
            // Z/D in the 2026c table: a dummy.
            assert_eq!(text(tags::PATIENT_ID).as_deref(), Some("ANONYMIZED"));
            assert_eq!(text(tags::PATIENT_BIRTH_DATE).as_deref(), Some(""));
            assert!(obj.iter().all(|e| e.header().tag.group() % 2 == 0), "private tags removed");
        }
    }
    assert_eq!(dicom_blobs, 1, "the county received the de-identified slice: {county_files:?}");
    // The identified original never left the village's blob store.
    let village_has_original =
        files_under(&configs[2].data_dir).iter().any(|f| std::fs::read(f).is_ok_and(|b| contains(&b, ID_NUMBER)));
    assert!(village_has_original, "the origin keeps the identified original");

    // Logs: this process's captured tracing output (all three nodes) names none of them.
    let logs = super::logs();
    assert!(logs.contains(&id.to_string()), "the capture holds the nodes' logs");
    for needle in [NAME, "Zhang", ID_NUMBER, BIRTH, BIRTH_DICOM, ADDRESS, PHONE] {
        assert!(!logs.contains(needle), "{needle} in the logs");
    }
}
