//! DICOM Part-10 files as the node ingests them (inbox files, `submit` of a file,
//! and the same validation a C-STORE'd instance goes through): `StudyStore::import_file`
//! on arbitrary bytes. Never panics; what is accepted is stored whole and listed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node::ingest::StudyStore;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Scratch {
    _dir: tempfile::TempDir,
    input: PathBuf,
    store: StudyStore,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        // tmpfs where there is one: import_file fsyncs.
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
        let dir = tempfile::Builder::new().prefix("dicom-fuzz").tempdir_in(base).expect("scratch dir");
        let store = StudyStore::open(dir.path()).expect("study store");
        Scratch { input: dir.path().join("input.dcm"), store, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    std::fs::write(&s.input, data).expect("write input");
    if let Ok(stored) = s.store.import_file(&s.input) {
        assert_eq!(stored.bytes, data.len() as u64, "stored whole");
        assert_eq!(std::fs::read(&stored.path).expect("stored file"), data);
        let studies = s.store.list().expect("list");
        assert!(studies.iter().any(|st| st.study_uid == stored.study_uid), "accepted study is listed");
        s.store.remove(&stored.study_uid).expect("remove");
    }
});
