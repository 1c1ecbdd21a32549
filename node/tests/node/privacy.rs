//! The privacy boundary over real QUIC: a village, a township and a county node
//! provisioned as the demo does, every node configured with identifiers allowed up
//! to the township. A CT slice carrying a patient's name, ID-card number and birth
//! date is submitted at the village and read at the county; nothing identifying
//! may be found at the county (case record, manifest, every byte of its data
//! directory, the DICOM headers of the blobs it received, the logs), while the
//! township holds the origin-signed identity and the village matches the report
//! to the patient. A second case carries what is not DICOM: a clinical question
//! naming the patient, a WFDB ECG whose header comments name the patient, and an
//! Aperio SVS slide whose description names the patient, and a phone photo
//! (`testdata/zhang_wei_photo.jpg`) whose EXIF, GPS, XMP, IPTC and comment name
//! the patient; none of it may reach the county either.

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

/// Files under `dir` once nothing is mid-write there: two listings 100 ms apart agree
/// and hold no temporary file. A stopped node's last background write (a chunk index,
/// written as a temporary file and renamed) may land just after `shutdown` returns.
fn settled_files_under(dir: &Path) -> Vec<PathBuf> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = files_under(dir);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = files_under(dir);
        let settled = now == last && !now.iter().any(|p| p.extension().is_some_and(|x| x == "tmp"));
        assert!(settled || std::time::Instant::now() < end, "{} never settled: {now:?}", dir.display());
        if settled {
            return now;
        }
        last = now;
    }
}

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
    out.sort();
    out
}

fn details() -> PatientDetails {
    PatientDetails { name: NAME.into(), birth_date: BIRTH.into(), address: ADDRESS.into(), phone: PHONE.into() }
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
        PlannedNode {
            name: county.into(),
            tier: Tier::County,
            parent: None,
            experts: vec![(Modality::Imaging, 1), (Modality::Pathology, 1)],
        },
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
            question: format!("Zhang Wei (ID {ID_NUMBER}, born 01/01/1980) fell at home: fracture?"),
            patient: ID_NUMBER.into(),
            task: None,
            details: details(),
        })
        .await
        .unwrap()
        .unwrap();

    // The second case: non-DICOM attachments naming the patient.
    let hea = dir.path().join("zhang_wei.hea");
    let dat = dir.path().join("zhang_wei.dat");
    let excerpt = std::fs::read_to_string(node::demo::testdata_dir().join("mitdb208_excerpt.hea")).unwrap();
    std::fs::write(
        &hea,
        format!(
            "{}\n# Zhang Wei, 46 M, born {BIRTH}, ID {ID_NUMBER}\n",
            excerpt
                .replace("mitdb208_excerpt.dat", "zhang_wei.dat")
                .replacen("mitdb208_excerpt", "zhang_wei", 1)
                .trim_end()
        ),
    )
    .unwrap();
    std::fs::copy(node::demo::testdata_dir().join("mitdb208_excerpt.dat"), &dat).unwrap();
    let mut svs = std::fs::read(node::demo::testdata_dir().join("cmu_small_region.svs")).unwrap();
    let (user, patient) =
        (b"User = b414003d-95c6-48b0-9369-8010ed517ba7", b"User =Zhang Wei 410102198001011234 1/1/1980");
    while let Some(i) = svs.windows(user.len()).position(|w| w == user) {
        svs[i..i + user.len()].copy_from_slice(patient);
    }
    let slide = dir.path().join("zhang-wei-slide.svs");
    std::fs::write(&slide, &svs).unwrap();
    let id2 = v_node
        .submit(SubmitRequest {
            files: vec![
                slide.clone(),
                hea.clone(),
                dat.clone(),
                node::demo::testdata_dir().join("zhang_wei_photo.jpg"),
            ],
            study: None,
            modality: Modality::Pathology,
            urgency: Urgency::Urgent,
            question: format!("Biopsy of Wei Zhang, {BIRTH}, tel {PHONE}: malignant?"),
            patient: ID_NUMBER.into(),
            task: None,
            details: details(),
        })
        .await
        .unwrap()
        .unwrap();

    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let v = v_node.show(id2).await.unwrap().unwrap();
        if v.report.is_some() {
            break;
        }
        assert!(Instant::now() < end, "no report for the slide case at the village: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let slide_case = c_node.show(id2).await.unwrap().expect("the slide case at the county");
    assert!(slide_case.identity.is_none());
    let rendered = format!("{at_county:?}{}{slide_case:?}{}", at_county.render(), slide_case.render());
    for needle in
        [NAME, "Zhang", "Wei", ID_NUMBER, BIRTH, BIRTH_DICOM, "01/01/1980", ADDRESS, PHONE, "zhang-wei", "zhang_wei"]
    {
        assert!(!rendered.contains(needle), "{needle} in the county's view of the cases");
    }
    assert!(
        rendered.contains("fell at home: fracture?") && rendered.contains("malignant?"),
        "the question's clinical part travels"
    );
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
    let county_files = settled_files_under(&configs[0].data_dir);
    let mut dicom_blobs = 0;
    for f in &county_files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for needle in [
            NAME,
            "Zhang",
            "zhang",
            ID_NUMBER,
            BIRTH,
            BIRTH_DICOM,
            "01/01/1980",
            "1/1/1980",
            "Jinshui",
            PHONE,
            "5555 0199",
            original_uid.as_str(),
        ] {
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
    // The photo arrived without any metadata block (its pixels: photo_scrub.rs).
    let photos: Vec<Vec<u8>> =
        county_files.iter().map(|f| std::fs::read(f).unwrap()).filter(|b| node::scrub_photo::is_jpeg(b)).collect();
    assert_eq!(photos.len(), 1, "the county received the photo: {county_files:?}");
    for marker in ["Exif\0\0", "http://ns.adobe.com/xap/1.0/", "Photoshop 3.0", "bed 4"] {
        assert!(!contains(&photos[0], marker), "{marker:?} left in the photo at the county");
    }
    // The slide and the ECG arrived de-identified, and still read.
    let received: Vec<&PathBuf> = county_files.iter().filter(|f| f.to_string_lossy().contains("objects")).collect();
    let slides: Vec<_> = received.iter().filter(|f| node::scrub::is_tiff(&std::fs::read(f).unwrap())).collect();
    assert_eq!(slides.len(), 1, "{received:?}");
    let read = node::readers::slide::Slide::open(slides[0]).unwrap();
    assert!(read.microns_per_pixel().is_some(), "the slide's MPP travels");
    let headers: Vec<String> = received
        .iter()
        .filter_map(|f| String::from_utf8(std::fs::read(f).unwrap()).ok())
        .filter(|t| t.contains("212 200(1024)/mV"))
        .collect();
    assert_eq!(headers.len(), 1, "the WFDB header arrived");
    let parsed = node::readers::wfdb::parse_wfdb_header(&headers[0]).unwrap();
    assert_eq!((parsed.sample_rate_hz, parsed.signals[0].description.as_str()), (360.0, "MLII"));
    assert!(!headers[0].contains("46 M"), "header comments dropped: {}", headers[0]);
    // The identified original never left the village's blob store.
    let village_has_original =
        files_under(&configs[2].data_dir).iter().any(|f| std::fs::read(f).is_ok_and(|b| contains(&b, ID_NUMBER)));
    assert!(village_has_original, "the origin keeps the identified original");

    // Logs: this process's captured tracing output (all three nodes) names none of them.
    let logs = super::logs();
    assert!(logs.contains(&id.to_string()), "the capture holds the nodes' logs");
    for needle in [NAME, "Zhang", ID_NUMBER, BIRTH, BIRTH_DICOM, "01/01/1980", ADDRESS, PHONE] {
        assert!(!logs.contains(needle), "{needle} in the logs");
    }
}
