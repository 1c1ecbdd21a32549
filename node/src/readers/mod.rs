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
pub mod wfdb;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use ecg::{Ecg, Lead, read_dicom_ecg, read_dicom_ecg_file};
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
