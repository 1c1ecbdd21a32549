//! Turns a file into a model input with the readers, by its content (attachments
//! in the blob store have no names): DICOM waveform → ECG, DICOM image → image,
//! SciPy's `.npz` ECG, a WFDB header (`.hea`, with its signal file beside it),
//! TIFF/SVS → tiles.
//!
//! This module must never guess: a file no reader accepts is an error that says
//! what each reader objected to.

use super::local::Input;
use std::path::Path;

/// Longest file read whole here (the readers enforce their own limits too).
pub const INPUT_BYTES_MAX: u64 = crate::readers::FILE_BYTES_MAX;

pub fn load(path: &Path) -> Result<Input, String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "hea" {
        return crate::readers::read_wfdb_record(path).map(Input::Ecg).map_err(|e| e.to_string());
    }
    if ext == "dat" && path.with_extension("hea").exists() {
        return crate::readers::read_wfdb_record(path.with_extension("hea")).map(Input::Ecg).map_err(|e| e.to_string());
    }
    let len = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    if len > INPUT_BYTES_MAX {
        return Err(format!("{}: {len} bytes is more than the {INPUT_BYTES_MAX} read", path.display()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    from_bytes(&bytes)
}

/// Reads bytes of any supported kind.
pub fn from_bytes(bytes: &[u8]) -> Result<Input, String> {
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        let ecg_err = match crate::readers::read_dicom_ecg(bytes) {
            Ok(ecg) => return Ok(Input::Ecg(ecg)),
            Err(e) => e,
        };
        return Err(format!("DICOM: not an ECG this build reads ({ecg_err})"));
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return crate::readers::read_scipy_ecg(bytes).map(Input::Ecg).map_err(|e| e.to_string());
    }
    Err("not a file the models read (DICOM, SciPy .npz ECG, WFDB .hea, TIFF/SVS)".into())
}
