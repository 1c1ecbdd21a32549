//! Readers for the files clinics really have: 12-lead ECGs in DICOM waveform
//! storage, MIT/WFDB records, DICOM images and tiled TIFF/SVS slides. They turn
//! bytes into plain data ([`Ecg`], ...) for the models and the viewers.
//!
//! Every reader takes untrusted input. It must never panic on it, and never
//! allocate from a length field before checking that length against the bytes
//! actually there (or a fixed limit): a malformed or truncated file gives a
//! [`ReadError`] that says what was wrong and why. Readers never touch the
//! network, the store or the core; they only read.

pub mod ecg;
pub mod image;
pub mod slide;
pub mod wfdb;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use ecg::{Ecg, Lead, read_dicom_ecg, read_dicom_ecg_file};
pub use image::{DicomImage, Window, read_dicom_image, read_dicom_image_file};
pub use slide::{Level, Slide, Tile};
pub use wfdb::{read_scipy_ecg, read_scipy_ecg_file, read_wfdb_record};

/// Largest file any reader loads into memory whole (DICOM objects, WFDB
/// signal files). Slides are read tile by tile and are not bound by this.
pub const FILE_BYTES_MAX: u64 = 512 * 1024 * 1024;

/// Why a file could not be read. One enum for every reader; the message names
/// the format, what was wrong and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The file could not be opened or read (missing, permissions...).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The input is larger than the reader accepts.
    #[error("{what} is too large: {bytes} bytes, the limit is {limit_bytes}")]
    TooLarge { what: String, bytes: u64, limit_bytes: u64 },
    /// The input claims to be `format` but is broken or truncated.
    #[error("malformed {format}: {why}")]
    Malformed { format: &'static str, why: String },
    /// Well-formed, but uses a feature this reader does not implement.
    #[error("unsupported {format}: {what}")]
    Unsupported { format: &'static str, what: String },
    /// Not in any format the readers know.
    #[error("unrecognised file: {0}")]
    Unrecognised(String),
}

impl ReadError {
    pub(crate) fn malformed(format: &'static str, why: impl Into<String>) -> ReadError {
        ReadError::Malformed { format, why: why.into() }
    }

    pub(crate) fn unsupported(format: &'static str, what: impl Into<String>) -> ReadError {
        ReadError::Unsupported { format, what: what.into() }
    }
}

/// What [`read_any`] found in a file.
#[derive(Debug)]
pub enum AnyFile {
    /// An ECG, from a DICOM waveform object, a WFDB record or SciPy's `.npz`.
    Ecg { ecg: Ecg, source: EcgSource },
    /// The first frame of a DICOM image.
    Image(DicomImage),
    /// A tiled TIFF / SVS slide, open for reading tiles.
    Slide(Box<Slide>),
}

/// The format an [`AnyFile::Ecg`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcgSource {
    DicomWaveform,
    Wfdb,
    ScipyNpz,
}

/// Reads any file the readers know, recognised by its content: a DICOM
/// Part-10 file ("DICM" at byte 128 or 0: a waveform object becomes an ECG,
/// anything with pixel data an image), a TIFF (slide), a zip archive with an
/// `ecg.npy` member (SciPy's ECG), or a WFDB record given by its header
/// (`.hea`, checked by parsing) or by a signal file with a `.hea` of the same
/// name beside it. A bare `.npy` array is refused: it carries no sampling
/// rate.
pub fn read_any(path: impl AsRef<Path>) -> Result<AnyFile, ReadError> {
    let path = path.as_ref();
    let io = |source| ReadError::Io { path: path.to_path_buf(), source };
    let mut head = Vec::with_capacity(132);
    std::fs::File::open(path).map_err(io)?.take(132).read_to_end(&mut head).map_err(io)?;
    let is_dicom = head.get(128..132) == Some(b"DICM") || head.starts_with(b"DICM");
    if is_dicom {
        let obj = parse_dicom(&read_file_limited(path, FILE_BYTES_MAX)?)?;
        let has = |tag| obj.element_opt(tag).ok().flatten().is_some();
        return if has(dicom_dictionary_std::tags::WAVEFORM_SEQUENCE) {
            Ok(AnyFile::Ecg { ecg: ecg::ecg_from_dicom(&obj)?, source: EcgSource::DicomWaveform })
        } else if has(dicom_dictionary_std::tags::PIXEL_DATA) {
            Ok(AnyFile::Image(image::image_from_dicom(&obj)?))
        } else {
            Err(ReadError::unsupported(
                "DICOM file",
                "neither waveform nor pixel data (a report, a structured document...)",
            ))
        };
    }
    if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        return Ok(AnyFile::Slide(Box::new(Slide::open(path)?)));
    }
    if head.starts_with(b"II+\0") || head.starts_with(b"MM\0+") {
        return Err(ReadError::unsupported("TIFF slide", "BigTIFF"));
    }
    if head.starts_with(b"PK\x03\x04") {
        return Ok(AnyFile::Ecg { ecg: read_scipy_ecg_file(path)?, source: EcgSource::ScipyNpz });
    }
    if head.starts_with(b"\x93NUMPY") {
        return Err(ReadError::unsupported("NumPy array (.npy)", "a bare array carries no sampling rate"));
    }
    let header = if path.extension().is_some_and(|e| e == "hea") {
        Some(path.to_path_buf())
    } else {
        Some(path.with_extension("hea")).filter(|h| h.is_file())
    };
    if let Some(header) = header {
        return Ok(AnyFile::Ecg { ecg: read_wfdb_record(header)?, source: EcgSource::Wfdb });
    }
    Err(ReadError::Unrecognised(format!(
        "{}: not DICOM, TIFF, a SciPy .npz or a WFDB record (first bytes {:02x?})",
        path.display(),
        &head[..head.len().min(8)]
    )))
}

/// Reads a whole file of at most `limit_bytes` (checked before reading, and
/// again while reading in case the file grows).
pub(crate) fn read_file_limited(path: &Path, limit_bytes: u64) -> Result<Vec<u8>, ReadError> {
    let io = |source| ReadError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let too_large = |bytes| ReadError::TooLarge { what: path.display().to_string(), bytes, limit_bytes };
    if len > limit_bytes {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit_bytes + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A DICOM Part-10 object parsed from memory, after the constant-memory
/// structure walk has shown that every element fits in `bytes` (the parser
/// allocates whatever length an element declares).
pub(crate) fn parse_dicom(bytes: &[u8]) -> Result<dicom_object::DefaultDicomObject, ReadError> {
    const FORMAT: &str = "DICOM file";
    crate::ingest::check_structure_bytes(bytes).map_err(|e| match e {
        crate::ingest::IngestError::UnsupportedTransferSyntax(ts) => {
            ReadError::unsupported(FORMAT, format!("transfer syntax {ts}"))
        }
        other => ReadError::malformed(FORMAT, other.to_string()),
    })?;
    // The parser takes the stream from the "DICM" magic code on.
    let from_magic = if bytes.get(128..132) == Some(b"DICM") { &bytes[128..] } else { bytes };
    dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .from_reader(from_magic)
        .map_err(|e| ReadError::malformed(FORMAT, e.to_string()))
}

/// A DICOM attribute as text, without padding; `None` if absent or empty.
pub(crate) fn dicom_text(obj: &dicom_object::InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok()??;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(['\0', ' ']);
    (!s.is_empty()).then(|| s.to_string())
}

/// A DICOM attribute as a number (the first value of a multi-valued one).
pub(crate) fn dicom_number(obj: &dicom_object::InMemDicomObject, tag: dicom_core::Tag) -> Option<f64> {
    obj.element_opt(tag).ok()??.to_float64().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> PathBuf {
        PathBuf::from(format!("{}/../testdata/{name}", env!("CARGO_MANIFEST_DIR")))
    }

    #[test]
    fn read_any_recognises_every_test_file_by_content() {
        let ecg_source = |name| match read_any(path(name)).unwrap() {
            AnyFile::Ecg { ecg, source } => (ecg.leads.len(), ecg.sample_rate_hz, source),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(ecg_source("waveform_ecg.dcm"), (12, 1000.0, EcgSource::DicomWaveform));
        assert_eq!(ecg_source("scipy_ecg.dat"), (1, 360.0, EcgSource::ScipyNpz));
        assert_eq!(ecg_source("mitdb208_excerpt.hea"), (1, 360.0, EcgSource::Wfdb));
        // The signal file, with its header beside it.
        assert_eq!(ecg_source("mitdb208_excerpt.dat"), (1, 360.0, EcgSource::Wfdb));
        for (name, modality) in [("CT_small.dcm", "CT"), ("US1_J2KR.dcm", "US"), ("RG1_J2KI.dcm", "CR")] {
            match read_any(path(name)).unwrap() {
                AnyFile::Image(img) => assert_eq!(img.modality.as_deref(), Some(modality), "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        match read_any(path("cmu_small_region.svs")).unwrap() {
            AnyFile::Slide(s) => assert_eq!(s.levels()[0].width, 2220),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn read_any_names_what_it_cannot_read() {
        let err = read_any(path("PROVENANCE.md")).unwrap_err();
        assert!(matches!(err, ReadError::Unrecognised(_)), "{err}");
        assert!(err.to_string().contains("PROVENANCE.md"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let npy = dir.path().join("x.npy");
        std::fs::write(&npy, b"\x93NUMPY\x01\x00rest").unwrap();
        assert!(read_any(&npy).unwrap_err().to_string().contains("no sampling rate"));
        let err = read_any(dir.path().join("missing.dcm")).unwrap_err();
        assert!(matches!(err, ReadError::Io { .. }), "{err}");
        // A truncated DICOM file is recognised as DICOM and refused as such.
        let cut = dir.path().join("cut.dcm");
        std::fs::write(&cut, &test_support::testdata("CT_small.dcm")[..5000]).unwrap();
        assert!(read_any(&cut).unwrap_err().to_string().starts_with("malformed DICOM"));
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    /// A file under the repository's testdata/.
    pub fn testdata(name: &str) -> Vec<u8> {
        let path = format!("{}/../testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Variants of `bytes` that must all be refused or read without a panic:
    /// cut at several points, and with bytes flipped at several places.
    pub fn truncations(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let n = bytes.len();
        let mut cuts: Vec<usize> = vec![0, 1, 4, 64, 127, 128, 131, 132, 200, 400, 1024, n / 4, n / 2, n * 3 / 4];
        cuts.extend([n.saturating_sub(2), n.saturating_sub(1)]);
        cuts.retain(|&c| c < n);
        cuts.sort_unstable();
        cuts.dedup();
        cuts.into_iter().map(|c| (format!("cut at {c} of {n}"), bytes[..c].to_vec())).collect()
    }

    /// `bytes` with one byte inverted at a spread of positions (deterministic).
    pub fn flips(bytes: &[u8], count: usize) -> Vec<(String, Vec<u8>)> {
        let n = bytes.len();
        (0..count)
            .map(|i| {
                // Dense in the header, then spread over the file.
                let at = if i < count / 2 { (i * 7919) % n.min(2048) } else { (i * 104_729) % n };
                let mut b = bytes.to_vec();
                b[at] ^= 0xFF;
                (format!("byte {at} flipped"), b)
            })
            .collect()
    }
}
