//! Ingest from devices: a DICOM C-STORE receiver (SCP) and a watched inbox
//! folder, both feeding a [`StudyStore`].
//!
//! Received instances are grouped into *studies*. A study never becomes a case
//! by itself: the clinician submits it (`StudyStore::files` gives the list of
//! files for a `SubmitRequest`). Nothing here guesses that a study is
//! "complete" from elapsed time.
//!
//! # Layout and safety
//!
//! `<data_dir>/studies/<StudyInstanceUID>/<SOPInstanceUID>.dcm`, each file a
//! DICOM Part-10 file (preamble, file meta group, then the data set exactly as
//! received). Files are written to `<data_dir>/studies/.incoming/`, fsynced,
//! then renamed into place (and the directory fsynced), so a reader never sees
//! a partial instance. UIDs are validated (1–64 characters, dot-separated
//! non-empty runs of digits) before they are used as path components.
//!
//! Before an instance is accepted its whole element structure is walked
//! (without loading values into memory): a truncated or malformed data set is
//! refused rather than stored.
//!
//! # Memory bounds of the SCP
//!
//! `dicom-ul` (sync API) reads one whole PDU at a time; with strict mode on it
//! refuses any PDU larger than the maximum PDU length we announce
//! ([`ScpLimits::max_pdu`], 256 KiB by default). Each P-DATA value is written
//! to the temporary file as soon as it arrives, so an association holds at
//! most about two PDUs in memory whatever the instance size; instances up to
//! [`ScpSettings::max_instance_bytes`] are streamed to disk. Command sets are
//! bounded to 64 KiB. At most [`ScpLimits::max_associations`] associations run
//! at once (each on a blocking thread); further callers are rejected at
//! association with "local limit exceeded" (transient).
//!
//! # Inbox
//!
//! A file in the inbox is ingested once its size and modification time are the
//! same on two consecutive polls. Devices that can should write to a hidden
//! name (`.name`) or a `*.part`/`*.tmp` name and rename when done: such names
//! are ignored. Empty files are left alone. Files that are not readable DICOM,
//! are truncated, or carry invalid UIDs are moved to `<inbox>/rejected/` with a
//! `<name>.reason.txt` next to them.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject, OpenFileOptions};
use dicom_ul::Pdu;
use dicom_ul::association::Association;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJServiceUserReason, PDataValue, PDataValueType, PresentationContextResultReason, UserIdentity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

// ---------------------------------------------------------------------------
// UIDs

/// Maximum length of a DICOM UID.
pub const MAX_UID_LEN: usize = 64;

/// Whether `s` is a syntactically valid DICOM UID: 1–64 characters,
/// dot-separated components, each a non-empty run of ASCII digits. This is
/// what makes a UID safe as a path component (no `/`, no `..`, no `.`).
pub fn valid_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_UID_LEN
        && s.split('.').all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

fn trim_value(s: &str) -> &str {
    s.trim_end_matches(['\0', ' '])
}

// ---------------------------------------------------------------------------
// Errors

/// Why an instance was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Local storage failed (disk full, permissions on the store...).
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
    /// The source file could not be read.
    #[error("unreadable file: {0}")]
    Unreadable(io::Error),
    /// Not DICOM, truncated, or structurally broken.
    #[error("malformed DICOM: {0}")]
    Malformed(String),
    /// A UID that is missing or not a valid UID (never used as a path).
    #[error("invalid {attribute}: {value:?}")]
    InvalidUid { attribute: &'static str, value: String },
    /// The data set does not match what the C-STORE request announced.
    #[error("data set does not match request: {0}")]
    Mismatch(String),
    /// A transfer syntax we do not store (big endian, deflated, unknown).
    #[error("unsupported transfer syntax {0}")]
    UnsupportedTransferSyntax(String),
}

impl IngestError {
    /// The C-STORE response status for this error (PS3.4 Annex B.2.3).
    fn status(&self) -> u16 {
        match self {
            IngestError::Io(_) | IngestError::Unreadable(_) => status::OUT_OF_RESOURCES,
            IngestError::Mismatch(_) => status::DATA_SET_DOES_NOT_MATCH,
            IngestError::Malformed(_) | IngestError::InvalidUid { .. } | IngestError::UnsupportedTransferSyntax(_) => {
                status::CANNOT_UNDERSTAND
            }
        }
    }
}

mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATA_SET_DOES_NOT_MATCH: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

// ---------------------------------------------------------------------------
// Study store

/// One study as held by the [`StudyStore`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StudySummary {
    pub study_uid: String,
    /// Patient ID exactly as received (distinct values joined with `\` if the
    /// instances disagree, which deserves a look before submitting).
    pub patient_id: String,
    /// Distinct modalities of the instances, joined with `\`.
    pub modality: String,
    pub instances: usize,
    pub bytes: u64,
    /// Milliseconds since the Unix epoch when the first / last instance was
    /// written (file modification times).
    pub first_received_ms: u64,
    pub last_received_ms: u64,
    /// The instance files, sorted by path.
    pub files: Vec<PathBuf>,
}

/// One instance that was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInstance {
    pub study_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub modality: String,
    pub patient_id: String,
    pub path: PathBuf,
    pub bytes: u64,
}

/// Received studies on disk: `<data_dir>/studies/<StudyUID>/<SOPUID>.dcm`.
#[derive(Debug, Clone)]
pub struct StudyStore {
    root: Arc<PathBuf>,
}

const INCOMING: &str = ".incoming";
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl StudyStore {
    /// Opens (creating if needed) the store under `<data_dir>/studies`.
    /// Safe to call from any process (it does not touch files being written).
    pub fn open(data_dir: impl AsRef<Path>) -> io::Result<StudyStore> {
        let root = data_dir.as_ref().join("studies");
        fs::create_dir_all(root.join(INCOMING))?;
        Ok(StudyStore { root: Arc::new(root) })
    }

    /// Removes temporary files left by an interrupted run. Call once at daemon
    /// start, before [`serve_scp`] / [`watch_inbox`]: it would also delete
    /// files being received right now.
    pub fn clean_incoming(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join(INCOMING))? {
            let entry = entry?;
            if entry.file_type()?.is_file() && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The `studies` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn study_dir(&self, study_uid: &str) -> io::Result<PathBuf> {
        if !valid_uid(study_uid) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid study UID {study_uid:?}")));
        }
        Ok(self.root.join(study_uid))
    }

    /// All studies, oldest first.
    pub fn list(&self) -> io::Result<Vec<StudySummary>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&*self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(uid) = name.to_str() else { continue };
            if !valid_uid(uid) || !entry.file_type()?.is_dir() {
                continue;
            }
            if let Some(summary) = self.summarize(uid)? {
                out.push(summary);
            }
        }
        out.sort_by(|a, b| (a.first_received_ms, &a.study_uid).cmp(&(b.first_received_ms, &b.study_uid)));
        Ok(out)
    }

    fn summarize(&self, study_uid: &str) -> io::Result<Option<StudySummary>> {
        let files = match self.files(study_uid) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if files.is_empty() {
            return Ok(None);
        }
        let mut s = StudySummary {
            study_uid: study_uid.to_string(),
            patient_id: String::new(),
            modality: String::new(),
            instances: files.len(),
            bytes: 0,
            first_received_ms: u64::MAX,
            last_received_ms: 0,
            files: Vec::new(),
        };
        let mut patients: Vec<String> = Vec::new();
        let mut modalities: Vec<String> = Vec::new();
        for f in &files {
            let meta = fs::metadata(f)?;
            s.bytes += meta.len();
            let ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            s.first_received_ms = s.first_received_ms.min(ms);
            s.last_received_ms = s.last_received_ms.max(ms);
            if let Ok(h) = read_header_with(f, false) {
                if !patients.contains(&h.patient_id) {
                    patients.push(h.patient_id);
                }
                if !h.modality.is_empty() && !modalities.contains(&h.modality) {
                    modalities.push(h.modality);
                }
            }
        }
        s.patient_id = patients.join("\\");
        s.modality = modalities.join("\\");
        s.files = files;
        Ok(Some(s))
    }

    /// The instance files of a study, sorted. `NotFound` if there is no such
    /// study; `InvalidInput` if `study_uid` is not a valid UID.
    pub fn files(&self, study_uid: &str) -> io::Result<Vec<PathBuf>> {
        let dir = self.study_dir(study_uid)?;
        let mut files = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let is_instance = path.extension().is_some_and(|e| e == "dcm")
                && path.file_stem().and_then(|s| s.to_str()).is_some_and(valid_uid);
            if is_instance && entry.file_type()?.is_file() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Deletes a study and its files (e.g. once it has been submitted).
    pub fn remove(&self, study_uid: &str) -> io::Result<()> {
        let dir = self.study_dir(study_uid)?;
        fs::remove_dir_all(&dir)?;
        sync_dir(&self.root);
        Ok(())
    }

    /// Copies a DICOM Part-10 file into the store (validating it exactly like
    /// a received instance). The source is left in place.
    pub fn import_file(&self, src: &Path) -> Result<StoredInstance, IngestError> {
        // Cheap check first, so junk is not copied.
        let header = read_header(src)?;
        let mut temp = self.create_temp()?;
        let mut input = File::open(src).map_err(IngestError::Unreadable)?;
        io::copy(&mut input, &mut temp.writer)?;
        self.commit(temp, Some((header.sop_class_uid.as_str(), header.sop_instance_uid.as_str())))
    }

    fn create_temp(&self) -> io::Result<TempInstance> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = self.root.join(INCOMING).join(format!(
            "{}-{}-{:08x}.part",
            std::process::id(),
            n,
            nanos ^ rand::random::<u32>()
        ));
        let file = fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok(TempInstance { path: Some(path), writer: BufWriter::with_capacity(256 * 1024, file) })
    }

    /// Validates a finished temporary file and renames it into its study.
    /// `expected` is the (SOP class, SOP instance) announced by the sender.
    fn commit(&self, mut temp: TempInstance, expected: Option<(&str, &str)>) -> Result<StoredInstance, IngestError> {
        temp.writer.flush()?;
        temp.writer.get_ref().sync_all()?;
        let temp_path = temp.path.clone().expect("temp path present until commit");
        let header = read_header(&temp_path)?;
        if let Some((class, instance)) = expected {
            if header.sop_instance_uid != instance {
                return Err(IngestError::Mismatch(format!(
                    "SOP Instance UID {:?} in data set, {instance:?} announced",
                    header.sop_instance_uid
                )));
            }
            if header.sop_class_uid != class {
                return Err(IngestError::Mismatch(format!(
                    "SOP Class UID {:?} in data set, {class:?} announced",
                    header.sop_class_uid
                )));
            }
        }
        let dir = self.root.join(&header.study_uid);
        let new_dir = !dir.exists();
        fs::create_dir_all(&dir)?;
        if new_dir {
            sync_dir(&self.root);
        }
        let dest = dir.join(format!("{}.dcm", header.sop_instance_uid));
        fs::rename(&temp_path, &dest)?;
        temp.path = None; // committed: nothing to clean up
        sync_dir(&dir);
        let bytes = fs::metadata(&dest)?.len();
        Ok(StoredInstance {
            study_uid: header.study_uid,
            sop_instance_uid: header.sop_instance_uid,
            sop_class_uid: header.sop_class_uid,
            transfer_syntax: header.transfer_syntax,
            modality: header.modality,
            patient_id: header.patient_id,
            path: dest,
            bytes,
        })
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file being written in `.incoming`; removed on drop unless committed.
struct TempInstance {
    path: Option<PathBuf>,
    writer: BufWriter<File>,
}

impl Drop for TempInstance {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------
// Reading and checking instances

#[derive(Debug)]
struct InstanceHeader {
    transfer_syntax: String,
    sop_class_uid: String,
    sop_instance_uid: String,
    study_uid: String,
    modality: String,
    patient_id: String,
}

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    let s = e.to_str().ok()?;
    Some(trim_value(&s).trim_start().to_string())
}

fn uid_attr(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<String, IngestError> {
    let value = text(obj, tag).unwrap_or_default();
    if valid_uid(&value) { Ok(value) } else { Err(IngestError::InvalidUid { attribute: name, value }) }
}

/// Checks the structure of the whole file, then reads the file meta group and
/// the first attributes of the data set (up to the Study Instance UID; pixel
/// and waveform data are not loaded).
fn read_header(path: &Path) -> Result<InstanceHeader, IngestError> {
    read_header_with(path, true)
}

/// `read_header`, optionally without the structure walk (for listing files
/// that were checked when stored).
fn read_header_with(path: &Path, check: bool) -> Result<InstanceHeader, IngestError> {
    // Distinguish "cannot open" from "not DICOM".
    File::open(path).map_err(IngestError::Unreadable)?;
    // Structure first, before the DICOM parser reads any value: it allocates the
    // length an element declares, so every length must be shown to fit in the file
    // (a 45 KB file declaring a 3 GB value made it allocate 3 GB; found by
    // fuzz/dicom_ingest). Also, a broken data set is reported as such, not as
    // whatever attribute happened to be unreadable.
    if check {
        check_structure(path)?;
    }
    let obj = OpenFileOptions::new()
        .read_until(tags::SERIES_INSTANCE_UID)
        .open_file(path)
        .map_err(|e| IngestError::Malformed(format!("not a readable DICOM file: {e}")))?;
    let transfer_syntax = trim_value(obj.meta().transfer_syntax()).to_string();
    Ok(InstanceHeader {
        sop_class_uid: uid_attr(&obj, tags::SOP_CLASS_UID, "SOP Class UID")?,
        sop_instance_uid: uid_attr(&obj, tags::SOP_INSTANCE_UID, "SOP Instance UID")?,
        study_uid: uid_attr(&obj, tags::STUDY_INSTANCE_UID, "Study Instance UID")?,
        modality: text(&obj, tags::MODALITY).unwrap_or_default(),
        patient_id: text(&obj, tags::PATIENT_ID).unwrap_or_default(),
        transfer_syntax,
    })
}

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Walks the whole element structure of a Part-10 file without keeping
/// values: every element, item and delimiter must fit, and the data set must
/// end exactly at the end of the file. Catches truncated transfers anywhere,
/// including inside pixel data, with constant memory.
pub(crate) fn check_structure(path: &Path) -> Result<(), IngestError> {
    let file = File::open(path).map_err(IngestError::Unreadable)?;
    let len = file.metadata()?.len();
    walk_structure(BufReader::with_capacity(64 * 1024, file), len)
}

/// `check_structure` over a file already in memory (the readers in
/// `crate::readers` run it before the DICOM parser, which allocates whatever
/// length an element declares).
pub(crate) fn check_structure_bytes(bytes: &[u8]) -> Result<(), IngestError> {
    walk_structure(io::Cursor::new(bytes), bytes.len() as u64)
}

fn walk_structure<R: Read + Seek>(r: R, len: u64) -> Result<(), IngestError> {
    let mut w = Walker { r, pos: 0, len };
    let transfer_syntax =
        w.walk_meta().map_err(|e| IngestError::Malformed(format!("not a readable DICOM file: {e}")))?;
    let explicit = match transfer_syntax.as_str() {
        IMPLICIT_VR_LE => false,
        "1.2.840.10008.1.2.2" | "1.2.840.10008.1.2.1.99" => {
            return Err(IngestError::UnsupportedTransferSyntax(transfer_syntax));
        }
        // Explicit VR LE and every encapsulated (compressed) syntax.
        _ => true,
    };
    w.walk_dataset(explicit, 0, Some(len)).map_err(IngestError::Malformed)
}

struct Walker<R> {
    r: R,
    pos: u64,
    len: u64,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const MAX_DEPTH: u32 = 32;

/// Every value representation of PS3.5 §6.2 (2023 edition onwards).
const KNOWN_VRS: [[u8; 2]; 34] = [
    *b"AE", *b"AS", *b"AT", *b"CS", *b"DA", *b"DS", *b"DT", *b"FD", *b"FL", *b"IS", *b"LO", *b"LT", *b"OB", *b"OD",
    *b"OF", *b"OL", *b"OV", *b"OW", *b"PN", *b"SH", *b"SL", *b"SQ", *b"SS", *b"ST", *b"SV", *b"TM", *b"UC", *b"UI",
    *b"UL", *b"UN", *b"UR", *b"US", *b"UT", *b"UV",
];

impl<R: Read + Seek> Walker<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| format!("truncated at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn skip(&mut self, n: u64, bound: u64) -> Result<(), String> {
        if self.pos + n > bound.min(self.len) {
            return Err(format!("value of {n} bytes at byte {} runs past the end ({})", self.pos, bound.min(self.len)));
        }
        self.r.seek_relative(n as i64).map_err(|e| format!("seek: {e}"))?;
        self.pos += n;
        Ok(())
    }

    fn tag(&mut self) -> Result<(u16, u16), String> {
        let b = self.bytes::<4>()?;
        Ok((u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[2], b[3]])))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }

    /// The rest of an element header after its tag: (VR if explicit, length).
    fn header(&mut self, explicit: bool) -> Result<(Option<[u8; 2]>, u32), String> {
        if !explicit {
            return Ok((None, self.u32()?));
        }
        let vr = self.bytes::<2>()?;
        // Only the VRs PS3.5 §6.2 defines. The parser reads any other pair of
        // letters as UN, whose length field is four bytes after two reserved ones,
        // so the walk and the parser would part ways and the parser would allocate
        // a length the walk never checked.
        if !KNOWN_VRS.contains(&vr) {
            return Err(format!("invalid VR {:?} at byte {}", String::from_utf8_lossy(&vr), self.pos - 2));
        }
        let long = matches!(
            &vr,
            b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT" | b"UV"
        );
        let len = if long {
            self.bytes::<2>()?;
            self.u32()?
        } else {
            u16::from_le_bytes(self.bytes::<2>()?) as u32
        };
        Ok((Some(vr), len))
    }

    /// The preamble and the file meta group; returns the transfer syntax UID.
    fn walk_meta(&mut self) -> Result<String, String> {
        // Preamble (128 bytes) then "DICM"; tolerate files that start with
        // the magic code directly.
        if self.bytes::<4>()? != *b"DICM" {
            self.skip(124, self.len)?;
            if self.bytes::<4>()? != *b"DICM" {
                return Err("no DICM magic code".into());
            }
        }
        // File meta group: explicit VR little endian, group 0002.
        let mut transfer_syntax = String::new();
        loop {
            if self.pos == self.len {
                return Ok(transfer_syntax);
            }
            let (g, e) = self.tag()?;
            if g != 0x0002 {
                self.r.seek_relative(-4).map_err(|e| e.to_string())?;
                self.pos -= 4;
                return Ok(transfer_syntax);
            }
            let (_, len) = self.header(true)?;
            if len == UNDEFINED {
                return Err(format!("undefined length in meta element (0002,{e:04X})"));
            }
            if e == 0x0010 && len <= 64 {
                let mut uid = vec![0u8; len as usize];
                self.r.read_exact(&mut uid).map_err(|e| format!("truncated at byte {}: {e}", self.pos))?;
                self.pos += u64::from(len);
                transfer_syntax = trim_value(&String::from_utf8_lossy(&uid)).to_string();
            } else {
                self.skip(len as u64, self.len)?;
            }
        }
    }

    /// Elements until `end` (defined length) or an item delimiter (`None`).
    fn walk_dataset(&mut self, explicit: bool, depth: u32, end: Option<u64>) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("sequences nested too deeply".into());
        }
        loop {
            match end {
                Some(end) if self.pos == end => return Ok(()),
                Some(end) if self.pos > end => {
                    return Err(format!("item overruns its length at byte {}", self.pos));
                }
                _ => {}
            }
            let (g, e) = self.tag()?;
            if g == 0xFFFE {
                self.u32()?;
                if e == 0xE00D && end.is_none() {
                    return Ok(());
                }
                return Err(format!("unexpected delimiter (FFFE,{e:04X}) at byte {}", self.pos - 8));
            }
            let (vr, len) = self.header(explicit)?;
            let bound = end.unwrap_or(self.len);
            // Encapsulated pixel data: items are fragments of bytes, not data sets.
            let fragments = (g, e) == (0x7FE0, 0x0010) || matches!(vr.as_ref(), Some(b"OB" | b"OW"));
            // Items inside UN are implicit VR.
            let inner_explicit = explicit && vr.as_ref() != Some(b"UN");
            if len == UNDEFINED {
                // Sequence, encapsulated pixel data, or UN.
                self.walk_items(inner_explicit, depth + 1, bound, None, fragments)?;
            } else if !fragments && self.is_sequence(vr, len)? {
                // A sequence of defined length: the parser reads its items as data
                // sets and allocates what their elements declare, so they are walked
                // too (fuzz/dicom_ingest found an element of 4 GB in such an item).
                let seq_end = self.end_of(len, bound)?;
                self.walk_items(inner_explicit, depth + 1, seq_end, Some(seq_end), false)?;
            } else {
                self.skip(len as u64, bound)?;
            }
        }
    }

    /// Whether a defined-length value is a sequence the parser will read as items:
    /// `SQ` in explicit VR; in implicit VR (no VR on the wire, the parser takes it
    /// from its dictionary) a value that starts with an item tag.
    fn is_sequence(&mut self, vr: Option<[u8; 2]>, len: u32) -> Result<bool, String> {
        match vr {
            Some(vr) => Ok(&vr == b"SQ"),
            None if len >= 8 => {
                let start = self.tag()?;
                self.r.seek_relative(-4).map_err(|e| format!("seek: {e}"))?;
                self.pos -= 4;
                Ok(start == (0xFFFE, 0xE000))
            }
            None => Ok(false),
        }
    }

    /// Where a value of `len` bytes starting here ends, if it fits in `bound`.
    fn end_of(&self, len: u32, bound: u64) -> Result<u64, String> {
        let end = self.pos + u64::from(len);
        if end > bound.min(self.len) {
            return Err(format!(
                "value of {len} bytes at byte {} runs past the end ({})",
                self.pos,
                bound.min(self.len)
            ));
        }
        Ok(end)
    }

    /// Items until a sequence delimiter (`end` None) or until `end`. Items of
    /// defined length are walked as data sets, unless they are `fragments`.
    fn walk_items(
        &mut self,
        explicit: bool,
        depth: u32,
        bound: u64,
        end: Option<u64>,
        fragments: bool,
    ) -> Result<(), String> {
        loop {
            if end == Some(self.pos) {
                return Ok(());
            }
            let (g, e) = self.tag()?;
            let len = self.u32()?;
            match (g, e) {
                (0xFFFE, 0xE0DD) if end.is_none() => return Ok(()),
                (0xFFFE, 0xE000) if len == UNDEFINED => self.walk_dataset(explicit, depth, None)?,
                (0xFFFE, 0xE000) if fragments => self.skip(len as u64, bound)?,
                (0xFFFE, 0xE000) => {
                    let item_end = self.end_of(len, bound)?;
                    self.walk_dataset(explicit, depth + 1, Some(item_end))?;
                }
                _ => {
                    return Err(format!("expected an item, found ({g:04X},{e:04X}) at byte {}", self.pos - 8));
                }
            }
            if self.pos > bound {
                return Err("sequence overruns its container".into());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// DIMSE command sets (always Implicit VR Little Endian, group 0000)

mod dimse {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const NO_DATA_SET: u16 = 0x0101;

    pub const AFFECTED_SOP_CLASS: u16 = 0x0002;
    pub const COMMAND_FIELD: u16 = 0x0100;
    pub const MESSAGE_ID: u16 = 0x0110;
    pub const MESSAGE_ID_RESPONDED: u16 = 0x0120;
    #[cfg(test)]
    pub const PRIORITY: u16 = 0x0700;
    pub const DATA_SET_TYPE: u16 = 0x0800;
    pub const STATUS: u16 = 0x0900;
    pub const ERROR_COMMENT: u16 = 0x0902;
    pub const AFFECTED_SOP_INSTANCE: u16 = 0x1000;

    /// A parsed command set: (element number, raw value) in group 0000.
    #[derive(Debug, Default)]
    pub struct Command(Vec<(u16, Vec<u8>)>);

    impl Command {
        pub fn parse(mut buf: &[u8]) -> Result<Command, String> {
            let mut out = Vec::new();
            while !buf.is_empty() {
                if buf.len() < 8 {
                    return Err("truncated command element".into());
                }
                let group = u16::from_le_bytes([buf[0], buf[1]]);
                let elem = u16::from_le_bytes([buf[2], buf[3]]);
                let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                if group != 0 {
                    return Err(format!("element ({group:04X},{elem:04X}) in command set"));
                }
                if buf.len() - 8 < len {
                    return Err("command element overruns command set".into());
                }
                out.push((elem, buf[8..8 + len].to_vec()));
                buf = &buf[8 + len..];
            }
            Ok(Command(out))
        }

        pub fn raw(&self, elem: u16) -> Option<&[u8]> {
            self.0.iter().find(|(e, _)| *e == elem).map(|(_, v)| v.as_slice())
        }

        pub fn us(&self, elem: u16) -> Option<u16> {
            match self.raw(elem)? {
                [a, b] => Some(u16::from_le_bytes([*a, *b])),
                _ => None,
            }
        }

        pub fn ui(&self, elem: u16) -> Option<String> {
            let v = std::str::from_utf8(self.raw(elem)?).ok()?;
            Some(super::trim_value(v).to_string())
        }
    }

    pub enum Value<'a> {
        Us(u16),
        Ui(&'a str),
        Lo(&'a str),
    }

    /// Encodes elements (in ascending order) with a leading group length.
    pub fn encode(fields: &[(u16, Value<'_>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (elem, value) in fields {
            let bytes: Vec<u8> = match value {
                Value::Us(v) => v.to_le_bytes().to_vec(),
                Value::Ui(s) => {
                    let mut b = s.as_bytes().to_vec();
                    if b.len() % 2 == 1 {
                        b.push(0);
                    }
                    b
                }
                Value::Lo(s) => {
                    let mut b: Vec<u8> = s
                        .chars()
                        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '\\')
                        .take(64)
                        .map(|c| c as u8)
                        .collect();
                    if b.len() % 2 == 1 {
                        b.push(b' ');
                    }
                    b
                }
            };
            body.extend_from_slice(&0u16.to_le_bytes());
            body.extend_from_slice(&elem.to_le_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            body.extend_from_slice(&bytes);
        }
        let mut out = Vec::with_capacity(body.len() + 12);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }
}

// ---------------------------------------------------------------------------
// C-STORE SCP

/// What the SCP is, who may call it, and how big an instance may be.
#[derive(Debug, Clone)]
pub struct ScpSettings {
    /// Our (called) AE title; associations addressed to another title are
    /// rejected ("called AE title not recognized").
    pub ae_title: String,
    pub listen: SocketAddr,
    /// Calling AE titles allowed to associate. Empty means nobody; `"*"`
    /// allows any caller (only for a closed clinic LAN).
    pub allowed_callers: Vec<String>,
    /// Larger instances are refused with status A700 (out of resources); the
    /// data is streamed to disk, never held in memory.
    pub max_instance_bytes: u64,
}

/// Per-association limits with defaults suited to a small clinic box.
#[derive(Debug, Clone, Copy)]
pub struct ScpLimits {
    /// Maximum PDU length we receive (bounds memory per association).
    pub max_pdu: u32,
    /// Associations served at once; more are rejected (transient).
    pub max_associations: usize,
    /// Instances per association; further C-STOREs get status A700.
    pub max_instances: u32,
    /// A silent peer is dropped after this long (socket read/write timeout).
    pub idle_timeout: Duration,
}

impl Default for ScpLimits {
    fn default() -> Self {
        ScpLimits {
            max_pdu: 256 * 1024,
            max_associations: 4,
            max_instances: 10_000,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Storage SOP classes we accept, plus Verification.
pub const ACCEPTED_SOP_CLASSES: &[&str] = &[
    uids::VERIFICATION,
    uids::CT_IMAGE_STORAGE,
    uids::ENHANCED_CT_IMAGE_STORAGE,
    uids::MR_IMAGE_STORAGE,
    uids::ENHANCED_MR_IMAGE_STORAGE,
    uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PROCESSING,
    uids::ULTRASOUND_IMAGE_STORAGE,
    uids::ULTRASOUND_MULTI_FRAME_IMAGE_STORAGE,
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_SINGLE_BIT_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_BYTE_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_TRUE_COLOR_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::TWELVE_LEAD_ECG_WAVEFORM_STORAGE,
    uids::GENERAL_ECG_WAVEFORM_STORAGE,
    uids::VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE,
    uids::VL_PHOTOGRAPHIC_IMAGE_STORAGE,
    uids::ENCAPSULATED_PDF_STORAGE,
];

/// Transfer syntaxes we accept. Compressed ones are stored as received (we
/// never decode pixel data here).
pub const ACCEPTED_TRANSFER_SYNTAXES: &[&str] = &[
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    "1.2.840.10008.1.2.4.50",  // JPEG Baseline
    "1.2.840.10008.1.2.4.51",  // JPEG Extended
    "1.2.840.10008.1.2.4.57",  // JPEG Lossless
    "1.2.840.10008.1.2.4.70",  // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  // JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  // JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  // JPEG 2000
    "1.2.840.10008.1.2.4.201", // HTJ2K Lossless
    "1.2.840.10008.1.2.4.202", // HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203", // HTJ2K
    "1.2.840.10008.1.2.5",     // RLE Lossless
];

const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The AE title rules, checked during association negotiation.
struct AeGate {
    allowed: Arc<Vec<String>>,
    peer: SocketAddr,
}

impl AccessControl for AeGate {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let calling = calling_ae_title.trim();
        let called = called_ae_title.trim();
        if called != this_ae_title.trim() {
            warn!(peer = %self.peer, calling, called, "DICOM association rejected: called AE title not ours");
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self.allowed.iter().any(|a| a == "*" || a.trim() == calling) {
            warn!(peer = %self.peer, calling, called, "DICOM association rejected: calling AE title not allowed");
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

fn check_ae_title(t: &str) -> io::Result<()> {
    let t = t.trim();
    if t.is_empty() || t.len() > 16 || !t.chars().all(|c| c.is_ascii_graphic() || c == ' ') || t.contains('\\') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid AE title {t:?} (1-16 printable ASCII characters, no backslash)"),
        ));
    }
    Ok(())
}

struct ScpContext {
    settings: ScpSettings,
    limits: ScpLimits,
    store: StudyStore,
    allowed: Arc<Vec<String>>,
}

/// Starts the C-STORE SCP with default [`ScpLimits`].
/// Returns the bound address (useful with port 0) and the accept-loop task.
pub async fn serve_scp(settings: ScpSettings, store: StudyStore) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_scp_with_limits(settings, ScpLimits::default(), store).await
}

/// Starts the C-STORE SCP with explicit limits.
pub async fn serve_scp_with_limits(
    settings: ScpSettings,
    limits: ScpLimits,
    store: StudyStore,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    check_ae_title(&settings.ae_title)?;
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let addr = listener.local_addr()?;
    let limits = ScpLimits {
        max_pdu: limits.max_pdu.clamp(16 * 1024, 16 * 1024 * 1024),
        max_associations: limits.max_associations.max(1),
        ..limits
    };
    let ctx = Arc::new(ScpContext { allowed: Arc::new(settings.allowed_callers.clone()), settings, limits, store });
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_associations));
    info!(%addr, ae_title = %ctx.settings.ae_title, "DICOM C-STORE SCP listening");
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("DICOM SCP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "DICOM association rejected: too many concurrent associations");
                tokio::spawn(reject_busy(tcp));
                continue;
            };
            let stream = match tcp.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            }) {
                Ok(s) => s,
                Err(e) => {
                    warn!(%peer, "DICOM SCP socket setup failed: {e}");
                    continue;
                }
            };
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                run_association(stream, peer, &ctx);
            });
        }
    });
    Ok((addr, task))
}

/// Answers an association request with A-ASSOCIATE-RJ (transient, service
/// provider, local limit exceeded), without a blocking thread.
async fn reject_busy(mut tcp: tokio::net::TcpStream) {
    let work = async {
        let mut header = [0u8; 6];
        tcp.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as u64;
        if header[0] != 0x01 || len > 64 * 1024 {
            return Ok(());
        }
        tokio::io::copy(&mut (&mut tcp).take(len), &mut tokio::io::sink()).await?;
        tcp.write_all(&[0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2]).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), work).await;
}

fn run_association(stream: TcpStream, peer: SocketAddr, ctx: &ScpContext) {
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(AeGate { allowed: ctx.allowed.clone(), peer })
        .ae_title(ctx.settings.ae_title.trim().to_string())
        .max_pdu_length(ctx.limits.max_pdu)
        .strict(true)
        .read_timeout(ctx.limits.idle_timeout)
        .write_timeout(ctx.limits.idle_timeout);
    for sop in ACCEPTED_SOP_CLASSES {
        options = options.with_abstract_syntax(*sop);
    }
    for ts in ACCEPTED_TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*ts);
    }
    let mut assoc = match options.establish(stream) {
        Ok(a) => a,
        Err(e) => {
            // Rejections were logged (with reason) by the gate.
            debug!(%peer, "DICOM association not established: {e}");
            return;
        }
    };
    let contexts: HashMap<u8, (String, String)> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| (pc.id, (trim_value(&pc.abstract_syntax).to_string(), trim_value(&pc.transfer_syntax).to_string())))
        .collect();
    let calling = assoc.peer_ae_title().trim().to_string();
    info!(%peer, calling = %calling, contexts = contexts.len(), "DICOM association accepted");
    let mut session = Session {
        ctx,
        calling,
        contexts,
        command: Vec::new(),
        command_pc: None,
        incoming: None,
        received: 0,
        stored: 0,
    };
    loop {
        let pdu = match assoc.receive() {
            Ok(pdu) => pdu,
            Err(e) => {
                warn!(%peer, "DICOM association aborted: {e}");
                let _ = assoc.abort();
                return;
            }
        };
        match pdu {
            Pdu::PData { data } => {
                for pdv in data {
                    match session.on_pdv(pdv) {
                        Ok(None) => {}
                        Ok(Some(reply)) => {
                            if let Err(e) = assoc.send(&reply) {
                                warn!(%peer, "DICOM response not sent: {e}");
                                return;
                            }
                        }
                        Err(reason) => {
                            warn!(%peer, "DICOM protocol error, aborting association: {reason}");
                            let _ = assoc.abort();
                            return;
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                if session.incoming.is_some() {
                    warn!(%peer, "association released in the middle of an instance; discarded");
                }
                let _ = assoc.send(&Pdu::ReleaseRP);
                info!(%peer, stored = session.stored, "DICOM association released");
                return;
            }
            Pdu::AbortRQ { source } => {
                info!(%peer, "DICOM association aborted by peer: {source:?}");
                return;
            }
            other => {
                warn!(%peer, "unexpected PDU, aborting: {other:?}");
                let _ = assoc.abort();
                return;
            }
        }
    }
}

/// A C-STORE whose data set is arriving.
struct Incoming {
    pc: u8,
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    sink: Option<TempInstance>,
    bytes: u64,
    /// Set when the instance will be refused; its data is then discarded.
    refusal: Option<(u16, String)>,
}

struct Session<'a> {
    ctx: &'a ScpContext,
    calling: String,
    /// Accepted presentation contexts: id -> (abstract syntax, transfer syntax).
    contexts: HashMap<u8, (String, String)>,
    command: Vec<u8>,
    command_pc: Option<u8>,
    incoming: Option<Incoming>,
    received: u32,
    stored: u32,
}

fn command_pdu(pc: u8, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Command,
            is_last: true,
            data,
        }],
    }
}

impl Session<'_> {
    /// Handles one P-DATA value. `Ok(Some(pdu))` is a response to send;
    /// `Err` is a protocol violation (the association is aborted).
    fn on_pdv(&mut self, pdv: PDataValue) -> Result<Option<Pdu>, String> {
        match pdv.value_type {
            PDataValueType::Command => {
                if self.incoming.is_some() {
                    return Err("command received while a data set was expected".into());
                }
                match self.command_pc {
                    Some(pc) if pc != pdv.presentation_context_id => {
                        return Err("command fragments on different presentation contexts".into());
                    }
                    _ => self.command_pc = Some(pdv.presentation_context_id),
                }
                if self.command.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                    return Err("command set too large".into());
                }
                self.command.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    return Ok(None);
                }
                let bytes = std::mem::take(&mut self.command);
                let pc = self.command_pc.take().unwrap_or(pdv.presentation_context_id);
                let command = dimse::Command::parse(&bytes)?;
                self.on_command(pc, command)
            }
            PDataValueType::Data => {
                let max = self.ctx.settings.max_instance_bytes;
                let inc = self.incoming.as_mut().ok_or("data set received without a command")?;
                if inc.pc != pdv.presentation_context_id {
                    return Err("data set on another presentation context".into());
                }
                inc.bytes += pdv.data.len() as u64;
                if inc.refusal.is_none() {
                    if inc.bytes > max {
                        inc.sink = None; // deletes the partial file
                        inc.refusal = Some((status::OUT_OF_RESOURCES, format!("instance larger than {max} bytes")));
                    } else if let Some(sink) = inc.sink.as_mut()
                        && let Err(e) = sink.writer.write_all(&pdv.data)
                    {
                        inc.sink = None;
                        inc.refusal = Some((status::OUT_OF_RESOURCES, format!("disk write: {e}")));
                    }
                }
                if !pdv.is_last {
                    return Ok(None);
                }
                let inc = self.incoming.take().expect("checked above");
                Ok(Some(self.finish(inc)))
            }
        }
    }

    fn on_command(&mut self, pc: u8, cmd: dimse::Command) -> Result<Option<Pdu>, String> {
        let field = cmd.us(dimse::COMMAND_FIELD).ok_or("command without Command Field")?;
        let message_id = cmd.us(dimse::MESSAGE_ID).ok_or("command without Message ID")?;
        let (abstract_syntax, transfer_syntax) =
            self.contexts.get(&pc).cloned().ok_or_else(|| format!("presentation context {pc} was not accepted"))?;
        let has_data = cmd.us(dimse::DATA_SET_TYPE) != Some(dimse::NO_DATA_SET);
        use dimse::Value::*;
        match field {
            dimse::C_ECHO_RQ if !has_data => {
                debug!(calling = %self.calling, "C-ECHO");
                Ok(Some(command_pdu(
                    pc,
                    dimse::encode(&[
                        (dimse::AFFECTED_SOP_CLASS, Ui(uids::VERIFICATION)),
                        (dimse::COMMAND_FIELD, Us(dimse::C_ECHO_RSP)),
                        (dimse::MESSAGE_ID_RESPONDED, Us(message_id)),
                        (dimse::DATA_SET_TYPE, Us(dimse::NO_DATA_SET)),
                        (dimse::STATUS, Us(status::SUCCESS)),
                    ]),
                )))
            }
            dimse::C_STORE_RQ if has_data => {
                let sop_class = cmd.ui(dimse::AFFECTED_SOP_CLASS).unwrap_or_default();
                let sop_instance = cmd.ui(dimse::AFFECTED_SOP_INSTANCE).unwrap_or_default();
                self.received += 1;
                let mut refusal = None;
                let mut sink = None;
                if self.received > self.ctx.limits.max_instances {
                    refusal = Some((
                        status::OUT_OF_RESOURCES,
                        format!("more than {} instances in one association", self.ctx.limits.max_instances),
                    ));
                } else if abstract_syntax == uids::VERIFICATION || sop_class != abstract_syntax {
                    refusal = Some((
                        status::SOP_CLASS_NOT_SUPPORTED,
                        format!("SOP class {sop_class} not negotiated on this context"),
                    ));
                } else if !valid_uid(&sop_instance) {
                    refusal = Some((status::CANNOT_UNDERSTAND, format!("invalid SOP Instance UID {sop_instance:?}")));
                } else {
                    match self.start_file(&sop_class, &sop_instance, &transfer_syntax) {
                        Ok(t) => sink = Some(t),
                        Err(e) => refusal = Some((status::OUT_OF_RESOURCES, format!("cannot store: {e}"))),
                    }
                }
                self.incoming = Some(Incoming { pc, message_id, sop_class, sop_instance, sink, bytes: 0, refusal });
                Ok(None)
            }
            other => Err(format!("unsupported DIMSE command 0x{other:04X}")),
        }
    }

    /// Opens the temporary file and writes preamble and file meta group.
    fn start_file(&self, sop_class: &str, sop_instance: &str, transfer_syntax: &str) -> Result<TempInstance, String> {
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(sop_class)
            .media_storage_sop_instance_uid(sop_instance)
            .transfer_syntax(transfer_syntax)
            .implementation_class_uid(dicom_ul::IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(dicom_ul::IMPLEMENTATION_VERSION_NAME)
            .source_application_entity_title(self.calling.as_str())
            .build()
            .map_err(|e| e.to_string())?;
        let mut temp = self.ctx.store.create_temp().map_err(|e| e.to_string())?;
        temp.writer.write_all(&[0u8; 128]).and_then(|_| temp.writer.write_all(b"DICM")).map_err(|e| e.to_string())?;
        meta.write(&mut temp.writer).map_err(|e| e.to_string())?;
        Ok(temp)
    }

    /// Stores (or refuses) a complete instance and builds the C-STORE-RSP.
    fn finish(&mut self, inc: Incoming) -> Pdu {
        let (code, comment) = match (inc.refusal, inc.sink) {
            (Some((code, why)), _) => (code, Some(why)),
            (None, None) => (status::OUT_OF_RESOURCES, Some("no file".to_string())),
            (None, Some(sink)) => match self.ctx.store.commit(sink, Some((&inc.sop_class, &inc.sop_instance))) {
                Ok(stored) => {
                    self.stored += 1;
                    info!(
                        calling = %self.calling,
                        study = %stored.study_uid,
                        instance = %stored.sop_instance_uid,
                        modality = %stored.modality,
                        bytes = stored.bytes,
                        "DICOM instance stored"
                    );
                    (status::SUCCESS, None)
                }
                Err(e) => (e.status(), Some(e.to_string())),
            },
        };
        if let Some(why) = &comment {
            warn!(calling = %self.calling, instance = %inc.sop_instance, status = format!("{code:04X}"), "C-STORE refused: {why}");
        }
        use dimse::Value::*;
        let mut fields = vec![
            (dimse::AFFECTED_SOP_CLASS, Ui(&inc.sop_class)),
            (dimse::COMMAND_FIELD, Us(dimse::C_STORE_RSP)),
            (dimse::MESSAGE_ID_RESPONDED, Us(inc.message_id)),
            (dimse::DATA_SET_TYPE, Us(dimse::NO_DATA_SET)),
            (dimse::STATUS, Us(code)),
        ];
        if let Some(c) = &comment {
            fields.push((dimse::ERROR_COMMENT, Lo(c)));
        }
        fields.push((dimse::AFFECTED_SOP_INSTANCE, Ui(&inc.sop_instance)));
        command_pdu(inc.pc, dimse::encode(&fields))
    }
}

// ---------------------------------------------------------------------------
// Watched inbox

/// The inbox state machine; [`watch_inbox`] runs [`Inbox::poll_once`] on a
/// timer.
pub struct Inbox {
    dir: PathBuf,
    store: StudyStore,
    /// (size, modification time) of each candidate at the previous poll.
    seen: HashMap<PathBuf, (u64, Option<SystemTime>)>,
}

/// What one poll did.
#[derive(Debug, Default)]
pub struct PollReport {
    pub ingested: Vec<StoredInstance>,
    /// (where the file now is, why).
    pub rejected: Vec<(PathBuf, String)>,
}

const REJECTED: &str = "rejected";

impl Inbox {
    pub fn new(dir: PathBuf, store: StudyStore) -> Inbox {
        Inbox { dir, store, seen: HashMap::new() }
    }

    fn ignored_name(name: &str) -> bool {
        name.starts_with('.')
            || name.ends_with('~')
            || [".part", ".tmp", ".partial", ".crdownload", ".reason.txt"].iter().any(|s| name.ends_with(s))
    }

    fn scan(&self, dir: &Path, depth: u32, out: &mut HashMap<PathBuf, (u64, Option<SystemTime>)>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if Self::ignored_name(name) {
                continue;
            }
            // symlink_metadata: links are not followed.
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                if depth == 0 && name == REJECTED {
                    continue;
                }
                if depth < 8 {
                    self.scan(&path, depth + 1, out);
                }
            } else if meta.is_file() && meta.len() > 0 {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }

    /// Ingests every file unchanged since the previous poll.
    pub fn poll_once(&mut self) -> PollReport {
        let mut report = PollReport::default();
        if let Err(e) = fs::create_dir_all(self.dir.join(REJECTED)) {
            warn!(dir = %self.dir.display(), "inbox not usable: {e}");
            return report;
        }
        let mut now = HashMap::new();
        self.scan(&self.dir.clone(), 0, &mut now);
        let mut next = HashMap::new();
        for (path, sig) in now {
            if self.seen.get(&path) != Some(&sig) {
                next.insert(path, sig); // new or still changing
                continue;
            }
            match self.store.import_file(&path) {
                Ok(stored) => {
                    if let Err(e) = fs::remove_file(&path) {
                        warn!(file = %path.display(), "ingested but not removed from inbox: {e}");
                    }
                    info!(file = %path.display(), study = %stored.study_uid, "inbox file ingested");
                    report.ingested.push(stored);
                }
                Err(IngestError::Unreadable(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(IngestError::Io(e)) => {
                    // Our store failed, not the file: keep it and retry.
                    warn!(file = %path.display(), "inbox file kept, store error: {e}");
                    next.insert(path, sig);
                }
                Err(e) => match self.reject(&path, &e.to_string()) {
                    Ok(moved) => {
                        warn!(file = %path.display(), "inbox file rejected: {e}");
                        report.rejected.push((moved, e.to_string()));
                    }
                    Err(io_err) => {
                        warn!(file = %path.display(), "inbox file bad ({e}) and not movable: {io_err}")
                    }
                },
            }
        }
        self.seen = next;
        report
    }

    fn reject(&self, path: &Path, reason: &str) -> io::Result<PathBuf> {
        let dir = self.dir.join(REJECTED);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
        let mut dest = dir.join(&name);
        let mut n = 1;
        while dest.exists() {
            dest = dir.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &dest)?;
        let mut why = dest.clone().into_os_string();
        why.push(".reason.txt");
        fs::write(PathBuf::from(why), format!("{}\nfrom: {}\n", reason, path.display()))?;
        Ok(dest)
    }
}

/// Polls `dir` every `poll` and moves complete DICOM files into `store`
/// (see the module documentation for the rules).
pub async fn watch_inbox(dir: PathBuf, store: StudyStore, poll: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut inbox = Inbox::new(dir, store);
        let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            inbox = match tokio::task::spawn_blocking(move || {
                inbox.poll_once();
                inbox
            })
            .await
            {
                Ok(i) => i,
                Err(e) => {
                    warn!("inbox watcher stopped: {e}");
                    return;
                }
            };
        }
    })
}

impl fmt::Display for StudySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} patient={} modality={} instances={} bytes={}",
            self.study_uid, self.patient_id, self.modality, self.instances, self.bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_ul::ClientAssociationOptions;
    use std::process::{Command, Output};

    const NODE_AE: &str = "VILLAGE_NODE";
    const DEVICE_AE: &str = "ECG_CART";

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata").join(name)
    }

    /// Runs a dcmtk tool; a missing tool is a test failure, never a skip.
    fn dcmtk(tool: &str, args: &[String]) -> Output {
        match Command::new(tool).args(args).output() {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "dcmtk's `{tool}` is required by the DICOM ingest tests but was not found: \
                 install dcmtk (Debian/Ubuntu: apt-get install -y dcmtk)"
            ),
            Err(e) => panic!("cannot run {tool}: {e}"),
        }
    }

    async fn dcmtk_async(tool: &'static str, args: Vec<String>) -> (bool, String) {
        let out = tokio::task::spawn_blocking(move || dcmtk(tool, &args)).await.unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn scu_args(addr: SocketAddr, calling: &str, called: &str) -> Vec<String> {
        vec![
            "-v".into(),
            "-aet".into(),
            calling.into(),
            "-aec".into(),
            called.into(),
            addr.ip().to_string(),
            addr.port().to_string(),
        ]
    }

    async fn storescu(addr: SocketAddr, calling: &str, called: &str, files: &[PathBuf]) -> (bool, String) {
        // -R -xv: propose the files' own transfer syntaxes (incl. JPEG 2000
        // lossless) in separate contexts, as a device would, so nothing is
        // converted on the way.
        let mut args = vec!["-R".to_string(), "-xv".to_string()];
        args.extend(scu_args(addr, calling, called));
        args.extend(files.iter().map(|f| f.display().to_string()));
        dcmtk_async("storescu", args).await
    }

    async fn start(dir: &Path, max_instance_bytes: u64, limits: ScpLimits) -> (SocketAddr, JoinHandle<()>, StudyStore) {
        let store = StudyStore::open(dir).unwrap();
        let settings = ScpSettings {
            ae_title: NODE_AE.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            allowed_callers: vec![DEVICE_AE.into(), "XRAY_1".into()],
            max_instance_bytes,
        };
        let (addr, task) = serve_scp_with_limits(settings, limits, store.clone()).await.unwrap();
        (addr, task, store)
    }

    /// The data set part of a Part-10 file (after preamble, magic, meta group).
    fn data_set(file: &[u8]) -> &[u8] {
        assert_eq!(&file[128..132], b"DICM");
        assert_eq!(&file[132..138], &[2, 0, 0, 0, b'U', b'L']);
        let group_len = u32::from_le_bytes(file[140..144].try_into().unwrap()) as usize;
        &file[144 + group_len..]
    }

    /// The file re-encoded by dcmtk: explicit lengths, no group lengths, no
    /// padding.
    fn canonical(file: &Path, scratch: &Path) -> Vec<u8> {
        let out = scratch.join(format!("canonical-{}", TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
        let args: Vec<String> = ["+e", "-g", "-p"]
            .iter()
            .map(|s| s.to_string())
            .chain([file.display().to_string(), out.display().to_string()])
            .collect();
        let res = dcmtk("dcmconv", &args);
        assert!(res.status.success(), "dcmconv: {res:?}");
        let bytes = fs::read(&out).unwrap();
        fs::remove_file(&out).unwrap();
        bytes
    }

    fn incoming_is_empty(store: &StudyStore) -> bool {
        fs::read_dir(store.root().join(INCOMING)).unwrap().next().is_none()
    }

    #[test]
    fn uid_validation() {
        for ok in ["1.2.840.10008.1.1", "1", "0.0", &"1".repeat(64)] {
            assert!(valid_uid(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../../x", "1..2", ".1", "1.", "1/2", "1.2\0", "1 2", &"1".repeat(65), "a.b"] {
            assert!(!valid_uid(bad), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = StudyStore::open(dir.path()).unwrap();
        assert_eq!(store.files("../..").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(store.remove("..").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(dir.path().exists());
        // Leftovers of an interrupted run are removed only on request.
        fs::write(store.root().join(INCOMING).join("1-2-3.part"), b"half").unwrap();
        let again = StudyStore::open(dir.path()).unwrap();
        assert!(!incoming_is_empty(&again));
        assert_eq!(again.clean_incoming().unwrap(), 1);
        assert!(incoming_is_empty(&store));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescu_delivers_three_instances_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, task, store) = start(dir.path(), 2 << 30, ScpLimits::default()).await;
        let sources = [testdata("CT_small.dcm"), testdata("US1_J2KR.dcm"), testdata("waveform_ecg.dcm")];
        let (ok, log) = storescu(addr, DEVICE_AE, NODE_AE, &sources).await;
        assert!(ok, "storescu failed:\n{log}");
        assert_eq!(log.matches("Received Store Response (Success)").count(), 3, "{log}");
        assert_eq!(log.matches("Requesting Association").count(), 1, "one association:\n{log}");

        let studies = store.list().unwrap();
        assert_eq!(studies.len(), 3, "{studies:#?}");
        let expect = [
            (
                "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
                "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
                "CT",
                "1CT1",
                0,
            ),
            (
                "1.3.6.1.4.1.5962.1.2.13.20040826185059.5457",
                "1.3.6.1.4.1.5962.1.1.13.1.2.20040826185059.5457",
                "US",
                "13US1",
                1,
            ),
            (
                "1.3.76.13.65829.2.20130125082826.1072139.2",
                "1.3.6.1.4.1.20029.40.20130125105919.5407.1.1",
                "ECG",
                "642341",
                2,
            ),
        ];
        for (study_uid, sop_uid, modality, patient, src) in expect {
            let s = studies.iter().find(|s| s.study_uid == study_uid).expect(study_uid);
            assert_eq!((s.instances, s.modality.as_str(), s.patient_id.as_str()), (1, modality, patient));
            assert!(s.first_received_ms > 0 && s.first_received_ms <= s.last_received_ms);
            let path = store.root().join(study_uid).join(format!("{sop_uid}.dcm"));
            assert_eq!(s.files, vec![path.clone()]);
            assert_eq!(store.files(study_uid).unwrap(), vec![path.clone()]);
            assert_eq!(s.bytes, fs::metadata(&path).unwrap().len());

            // storescu re-encodes what it sends (explicit sequence lengths,
            // no trailing padding), so compare both data sets after the same
            // dcmtk canonical re-encoding. That the SCP stores the wire bytes
            // exactly is checked with a raw SCU in
            // `malformed_data_set_fails_and_stores_nothing`.
            let (x, y) = (canonical(&path, dir.path()), canonical(&sources[src], dir.path()));
            assert!(data_set(&x) == data_set(&y), "{study_uid}: data set differs");
            // Meta group rebuilt from the association: same syntax and UIDs.
            let a = dicom_object::open_file(&path).unwrap();
            let b = dicom_object::open_file(&sources[src]).unwrap();
            assert_eq!(a.meta().transfer_syntax(), b.meta().transfer_syntax());
            assert_eq!(a.meta().media_storage_sop_class_uid(), b.meta().media_storage_sop_class_uid());
            assert_eq!(a.meta().media_storage_sop_instance_uid(), b.meta().media_storage_sop_instance_uid());
            assert_eq!(a.meta().source_application_entity_title(), Some(DEVICE_AE));
            // And dcmtk agrees it is a valid Part-10 file.
            let check = dcmtk("dcmftest", &[path.display().to_string()]);
            assert!(String::from_utf8_lossy(&check.stdout).starts_with("yes"), "{check:?}");
        }
        assert!(incoming_is_empty(&store));

        // Clinician submits one study: files for the SubmitRequest, then removal.
        let ct = expect[0].0;
        assert_eq!(store.files(ct).unwrap().len(), 1);
        store.remove(ct).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        assert_eq!(store.files(ct).unwrap_err().kind(), io::ErrorKind::NotFound);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn echoscu_and_ae_title_checks() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, task, store) = start(dir.path(), 2 << 30, ScpLimits::default()).await;

        let (ok, log) = dcmtk_async("echoscu", scu_args(addr, DEVICE_AE, NODE_AE)).await;
        assert!(ok, "echoscu failed:\n{log}");
        assert!(log.contains("Received Echo Response (Success)"), "{log}");

        let (ok, log) = dcmtk_async("echoscu", scu_args(addr, "INTRUDER", NODE_AE)).await;
        assert!(!ok, "unknown caller must be rejected:\n{log}");
        assert!(log.contains("Association Rejected"), "{log}");
        assert!(log.contains("Calling AE Title Not Recognized"), "{log}");

        let (ok, log) = dcmtk_async("echoscu", scu_args(addr, DEVICE_AE, "SOMEONE_ELSE")).await;
        assert!(!ok, "wrong called AE title must be rejected:\n{log}");
        assert!(log.contains("Called AE Title Not Recognized"), "{log}");

        let (ok, log) = storescu(addr, "INTRUDER", NODE_AE, &[testdata("CT_small.dcm")]).await;
        assert!(!ok && log.contains("Calling AE Title Not Recognized"), "{log}");
        assert!(store.list().unwrap().is_empty());
        task.abort();
    }

    fn dataset_of(path: &Path) -> Vec<u8> {
        data_set(&fs::read(path).unwrap()).to_vec()
    }

    /// A raw SCU (dicom-ul client) sending one C-STORE with arbitrary bytes.
    fn raw_store(addr: SocketAddr, sop_class: &str, sop_instance: &str, data: &[u8]) -> (u16, String) {
        let mut assoc = ClientAssociationOptions::new()
            .calling_ae_title(DEVICE_AE)
            .called_ae_title(NODE_AE)
            .with_presentation_context(sop_class, vec![EXPLICIT_VR_LE])
            .establish(addr)
            .unwrap();
        let pc = assoc.presentation_contexts()[0].clone();
        assert_eq!(pc.reason, PresentationContextResultReason::Acceptance);
        use dimse::Value::*;
        let cmd = dimse::encode(&[
            (dimse::AFFECTED_SOP_CLASS, Ui(sop_class)),
            (dimse::COMMAND_FIELD, Us(dimse::C_STORE_RQ)),
            (dimse::MESSAGE_ID, Us(7)),
            (dimse::PRIORITY, Us(0)),
            (dimse::DATA_SET_TYPE, Us(0)),
            (dimse::AFFECTED_SOP_INSTANCE, Ui(sop_instance)),
        ]);
        assoc.send(&command_pdu(pc.id, cmd)).unwrap();
        let chunks: Vec<&[u8]> = data.chunks(16 * 1024).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc.id,
                    value_type: PDataValueType::Data,
                    is_last: i + 1 == chunks.len(),
                    data: chunk.to_vec(),
                }],
            };
            assoc.send(&pdu).unwrap();
        }
        let rsp = match assoc.receive().unwrap() {
            Pdu::PData { data } => dimse::Command::parse(&data[0].data).unwrap(),
            other => panic!("expected C-STORE-RSP, got {other:?}"),
        };
        assoc.release().unwrap();
        assert_eq!(rsp.us(dimse::COMMAND_FIELD), Some(dimse::C_STORE_RSP));
        assert_eq!(rsp.us(dimse::MESSAGE_ID_RESPONDED), Some(7));
        let comment =
            rsp.raw(dimse::ERROR_COMMENT).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        (rsp.us(dimse::STATUS).unwrap(), comment)
    }

    /// Sixth-session fuzz finding (dicom_ingest): a defined-length sequence
    /// (0010,1002) whose item holds an item declaring 0xFFFFFF1C bytes. The walk
    /// used to skip defined-length sequences whole; the parser read their items as
    /// data sets and allocated 4 GB. The walk now goes into them.
    /// (The input is kept as fuzz/corpus/dicom_ingest/regression-oom-item-in-defined-length-sequence.dcm.)
    #[test]
    fn an_element_inside_a_defined_length_sequence_is_checked_before_the_parser_allocates_it() {
        let found = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/dicom_ingest/regression-oom-item-in-defined-length-sequence.dcm"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = StudyStore::open(dir.path()).unwrap();
        match store.import_file(Path::new(found)) {
            Err(IngestError::Malformed(why)) => assert!(!why.starts_with("not a readable"), "{why}"),
            other => panic!("expected a malformed-structure error, got {other:?}"),
        }
        assert!(store.list().unwrap().is_empty());
        // Real files with sequences of defined length still pass the walk.
        let dicom: Vec<_> = fs::read_dir(testdata(""))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
            .collect();
        assert!(dicom.len() >= 9, "{dicom:?}");
        for path in dicom {
            check_structure(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    /// Regression (fuzz/dicom_ingest, out-of-memory): CT_small.dcm with four bytes of
    /// its file meta group changed misaligns the data set so that an element declares
    /// a 3.2 GB value in a 39 KB file; the DICOM parser allocated it before anything
    /// checked it. The structure walk now refuses it before the parser runs.
    /// (The input is also kept as fuzz/corpus/dicom_ingest/regression-oom-3gb-value.dcm.)
    #[test]
    fn a_value_longer_than_the_file_is_refused_before_the_parser_allocates_it() {
        let mut bytes = fs::read(testdata("CT_small.dcm")).unwrap();
        for (at, value) in [(140, 0xC4), (164, 0x1C), (190, 0x36), (191, 0x2E)] {
            bytes[at] = value;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("mutated.dcm");
        fs::write(&src, &bytes).unwrap();
        let store = StudyStore::open(dir.path()).unwrap();
        match store.import_file(&src) {
            // Refused by the structure walk ("invalid VR ..." where the misaligned data
            // set starts), not by the parser after its allocation ("not a readable ...").
            Err(IngestError::Malformed(why)) => {
                assert!(why.starts_with("invalid VR") || why.contains("runs past the end"), "{why}")
            }
            other => panic!("expected a malformed-structure error, got {other:?}"),
        }
        assert!(store.list().unwrap().is_empty());
        assert!(incoming_is_empty(&store));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_data_set_fails_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, task, store) = start(dir.path(), 2 << 30, ScpLimits::default()).await;
        let ct = dataset_of(&testdata("CT_small.dcm"));
        let ct_sop = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322";
        let cases: Vec<(&str, Vec<u8>)> = vec![
            // Cut inside the pixel data: the header alone looks fine.
            ("truncated", ct[..ct.len() * 3 / 4].to_vec()),
            // Cut early, in the middle of the header attributes.
            ("cut early", ct[..ct.len() / 4 + 3].to_vec()),
            ("garbage", b"this is not a DICOM data set at all, just text..".repeat(10)),
        ];
        for (what, bytes) in cases {
            let (status, comment) =
                tokio::task::spawn_blocking(move || raw_store(addr, uids::CT_IMAGE_STORAGE, ct_sop, &bytes))
                    .await
                    .unwrap();
            assert_eq!(status, status::CANNOT_UNDERSTAND, "{what}: {comment}");
            assert!(comment.contains("malformed"), "{what}: {comment}");
            assert!(store.list().unwrap().is_empty(), "{what}");
            assert!(incoming_is_empty(&store), "{what}");
        }
        // The same path with the whole data set succeeds (the raw SCU is sound).
        let (status, _) =
            tokio::task::spawn_blocking(move || raw_store(addr, uids::CT_IMAGE_STORAGE, ct_sop, &ct)).await.unwrap();
        assert_eq!(status, status::SUCCESS);
        assert_eq!(store.list().unwrap().len(), 1);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn path_traversal_uids_are_refused() {
        // Inside a directory of its own, so "../../x" from the store would land in a
        // place this test owns (not in /tmp, where an unrelated `x` may exist).
        let outer = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir_in(outer.path()).unwrap();
        let data_dir = dir.path().join("data");
        let (addr, task, store) = start(&data_dir, 2 << 30, ScpLimits::default()).await;

        // A data set whose StudyInstanceUID is "../../x", sent by storescu.
        let mut obj = dicom_object::open_file(testdata("CT_small.dcm")).unwrap();
        obj.put(DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, PrimitiveValue::from("../../x")));
        let evil = dir.path().join("evil.dcm");
        obj.write_to_file(&evil).unwrap();
        let (_, log) = storescu(addr, DEVICE_AE, NODE_AE, &[evil]).await;
        assert!(!log.contains("Store Response (Success)"), "{log}");
        assert!(log.contains("Received Store Response (Error: CannotUnderstand)"), "{log}");

        // A C-STORE whose SOP Instance UID is a path (raw SCU).
        let ct = dataset_of(&testdata("CT_small.dcm"));
        let (status, comment) =
            tokio::task::spawn_blocking(move || raw_store(addr, uids::CT_IMAGE_STORAGE, "../../y", &ct)).await.unwrap();
        assert_eq!(status, status::CANNOT_UNDERSTAND, "{comment}");

        assert!(store.list().unwrap().is_empty());
        assert!(incoming_is_empty(&store));
        for p in ["x", "y", "data/x", "data/y", "x.dcm"] {
            assert!(!dir.path().join(p).exists(), "{p} was created");
        }
        assert!(!outer.path().join("x").exists() && !outer.path().join("y").exists());
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_association_limits() {
        let dir = tempfile::tempdir().unwrap();
        // Instances above 10 kB refused; the 39 kB CT is one of them.
        let limits = ScpLimits { max_instances: 1, ..ScpLimits::default() };
        let (addr, task, store) = start(dir.path(), 10_000, limits).await;
        let (_, log) = storescu(addr, DEVICE_AE, NODE_AE, &[testdata("CT_small.dcm")]).await;
        assert!(log.contains("Received Store Response (Refused: OutOfResources)"), "{log}");
        assert!(store.list().unwrap().is_empty());
        assert!(incoming_is_empty(&store));
        task.abort();

        // One instance per association: the second one is refused.
        let (addr, task, store) = start(&dir.path().join("b"), 2 << 30, limits).await;
        let files = [testdata("waveform_ecg.dcm"), testdata("CT_small.dcm")];
        let (_, log) = storescu(addr, DEVICE_AE, NODE_AE, &files).await;
        assert_eq!(log.matches("Received Store Response (Success)").count(), 1, "{log}");
        assert_eq!(store.list().unwrap().len(), 1);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn associations_beyond_the_limit_are_rejected_transiently() {
        let dir = tempfile::tempdir().unwrap();
        let limits = ScpLimits { max_associations: 1, ..ScpLimits::default() };
        let (addr, task, _store) = start(dir.path(), 2 << 30, limits).await;
        // Hold the only slot with an open association.
        let held = tokio::task::spawn_blocking(move || {
            ClientAssociationOptions::new()
                .calling_ae_title(DEVICE_AE)
                .called_ae_title(NODE_AE)
                .with_abstract_syntax(uids::VERIFICATION)
                .establish(addr)
                .unwrap()
        })
        .await
        .unwrap();
        let (ok, log) = dcmtk_async("echoscu", scu_args(addr, DEVICE_AE, NODE_AE)).await;
        assert!(!ok, "{log}");
        assert!(log.contains("Rejected Transient") && log.contains("Local Limit Exceeded"), "{log}");
        tokio::task::spawn_blocking(move || held.release().unwrap()).await.unwrap();
        // The slot is free again once the association is released.
        let mut ok = false;
        for _ in 0..50 {
            if dcmtk_async("echoscu", scu_args(addr, DEVICE_AE, NODE_AE)).await.0 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "echo after release");
        task.abort();
    }

    #[test]
    fn inbox_ingests_good_files_and_rejects_junk() {
        let dir = tempfile::tempdir().unwrap();
        let store = StudyStore::open(dir.path().join("data")).unwrap();
        let inbox_dir = dir.path().join("inbox");
        fs::create_dir_all(inbox_dir.join("device1")).unwrap();
        let mut inbox = Inbox::new(inbox_dir.clone(), store.clone());
        fs::copy(testdata("CT_small.dcm"), inbox_dir.join("ct.dcm")).unwrap();
        fs::copy(testdata("US1_J2KR.dcm"), inbox_dir.join("device1/IM0001")).unwrap();
        fs::write(inbox_dir.join("junk.dcm"), b"not dicom at all").unwrap();
        fs::write(inbox_dir.join(".hidden.dcm"), b"being written").unwrap();
        let cut = fs::read(testdata("waveform_ecg.dcm")).unwrap();
        fs::write(inbox_dir.join("cut.dcm"), &cut[..cut.len() - 1000]).unwrap();

        let first = inbox.poll_once();
        assert!(first.ingested.is_empty() && first.rejected.is_empty(), "{first:?}");
        let second = inbox.poll_once();
        assert_eq!(second.ingested.len(), 2, "{second:?}");
        assert_eq!(second.rejected.len(), 2, "{second:?}");
        assert!(!inbox_dir.join("ct.dcm").exists());
        assert!(!inbox_dir.join("device1/IM0001").exists());
        let studies = store.list().unwrap();
        assert_eq!(studies.len(), 2);
        let ct = store.files("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322").unwrap();
        assert_eq!(fs::read(&ct[0]).unwrap(), fs::read(testdata("CT_small.dcm")).unwrap());

        let rejected = inbox_dir.join(REJECTED);
        assert!(rejected.join("junk.dcm").exists());
        let why = fs::read_to_string(rejected.join("junk.dcm.reason.txt")).unwrap();
        assert!(why.contains("not a readable DICOM file"), "{why}");
        let why = fs::read_to_string(rejected.join("cut.dcm.reason.txt")).unwrap();
        assert!(why.contains("malformed"), "{why}");
        assert!(inbox_dir.join(".hidden.dcm").exists(), "hidden files are ignored");

        // Nothing left to do; rejected files are not looked at again.
        let third = inbox.poll_once();
        assert!(third.ingested.is_empty() && third.rejected.is_empty(), "{third:?}");
        assert!(incoming_is_empty(&store));
    }

    #[test]
    fn inbox_waits_for_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StudyStore::open(dir.path().join("data")).unwrap();
        let inbox_dir = dir.path().join("inbox");
        fs::create_dir_all(&inbox_dir).unwrap();
        let mut inbox = Inbox::new(inbox_dir.clone(), store.clone());
        let bytes = fs::read(testdata("waveform_ecg.dcm")).unwrap();
        let target = inbox_dir.join("ecg.dcm");
        let mut file = File::create(&target).unwrap();
        let chunks: Vec<&[u8]> = bytes.chunks(bytes.len() / 4 + 1).collect();
        for chunk in &chunks {
            file.write_all(chunk).unwrap();
            file.flush().unwrap();
            let r = inbox.poll_once();
            // Truncated so far, yet neither ingested nor rejected: still growing.
            assert!(r.ingested.is_empty() && r.rejected.is_empty(), "{r:?}");
            assert!(target.exists());
        }
        drop(file);
        // Size now stable across two polls: ingested.
        let r = inbox.poll_once();
        assert_eq!(r.ingested.len(), 1, "{r:?}");
        assert_eq!(r.ingested[0].modality, "ECG");
        assert!(!target.exists());
        assert_eq!(fs::read(&r.ingested[0].path).unwrap(), bytes);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_inbox_task_ingests() {
        let dir = tempfile::tempdir().unwrap();
        let store = StudyStore::open(dir.path().join("data")).unwrap();
        let inbox_dir = dir.path().join("inbox");
        let task = watch_inbox(inbox_dir.clone(), store.clone(), Duration::from_millis(30)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        fs::copy(testdata("waveform_ecg.dcm"), inbox_dir.join("ecg.dcm")).unwrap();
        fs::write(inbox_dir.join("notes.txt"), b"hello").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let done =
                store.list().unwrap().len() == 1 && inbox_dir.join(REJECTED).join("notes.txt.reason.txt").exists();
            if done {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "inbox not processed in 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }
}
