//! MIT/WFDB records (PhysioNet's format, as in the MIT-BIH Arrhythmia
//! Database): the header (`.hea`) and its signal files in format 212 (two
//! 12-bit samples in three bytes), 16 (16-bit little endian) or 80 (8-bit
//! offset binary), converted with each signal's gain and baseline to
//! millivolts; and SciPy's `electrocardiogram()` excerpt of MIT-BIH record 208
//! (an `.npz` holding the raw ADC values).
//!
//! Header fields follow the WFDB specification (`header(5)`): the record line
//! `name[/segments] signals [fs[/counter][(base)] [samples [time [date]]]]`,
//! then one line per signal `file format[xN][:skew][+offset]
//! gain[(baseline)][/units] [resolution [zero [initial [checksum [block
//! [description]]]]]]`. Multi-segment records, skewed signals and several
//! samples per frame are refused as unsupported, not approximated.
//!
//! Signal files are named by the header: only plain file names in the
//! header's own directory are opened (no path separators, no `..`). Every size
//! is checked against the bytes present before decoding; when the header gives
//! checksums, they are verified.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::{Ecg, FILE_BYTES_MAX, Lead, ReadError, read_file_limited};

const HEADER: &str = "WFDB header";
const SIGNALS: &str = "WFDB signal file";
const NPZ: &str = "SciPy electrocardiogram (.npz)";

/// Largest header accepted (real ones are a few hundred bytes).
pub const HEADER_BYTES_MAX: usize = 64 * 1024;
/// Most signals accepted in one record.
pub const SIGNALS_MAX: usize = 256;

/// A parsed WFDB header (single-segment record).
#[derive(Debug, Clone, PartialEq)]
pub struct WfdbHeader {
    pub record_name: String,
    pub sample_rate_hz: f32,
    /// Samples per signal, if the header says.
    pub samples_per_signal: Option<u64>,
    pub signals: Vec<WfdbSignal>,
    /// `#` comment lines, without the `#`.
    pub comments: Vec<String>,
}

/// One signal line of a WFDB header.
#[derive(Debug, Clone, PartialEq)]
pub struct WfdbSignal {
    pub file_name: String,
    /// Storage format: 212, 16 or 80 are decoded.
    pub format: u16,
    /// Bytes to skip at the start of the signal file.
    pub byte_offset: u64,
    /// ADC units per physical unit (200 when the header gives 0 or nothing).
    pub adc_gain: f64,
    /// ADC value of physical zero.
    pub baseline: i64,
    /// Physical unit ("mV" when the header gives none).
    pub units: String,
    pub adc_resolution_bits: Option<u32>,
    pub adc_zero: i64,
    /// 16-bit checksum of all samples, if given.
    pub checksum: Option<i16>,
    /// Signal description, e.g. "MLII", "V1".
    pub description: String,
}

/// Parses a WFDB header.
pub fn parse_wfdb_header(text: &str) -> Result<WfdbHeader, ReadError> {
    if text.len() > HEADER_BYTES_MAX {
        return Err(ReadError::TooLarge {
            what: "WFDB header".into(),
            bytes: text.len() as u64,
            limit_bytes: HEADER_BYTES_MAX as u64,
        });
    }
    let mut comments = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(c) = line.strip_prefix('#') {
            comments.push(c.trim().to_string());
        } else if !line.is_empty() {
            // A `#` after the fields starts a comment too.
            lines.push((i + 1, line.split('#').next().unwrap_or(line)));
        }
    }
    let Some(&(_, record_line)) = lines.first() else {
        return Err(ReadError::malformed(HEADER, "no record line"));
    };
    let mut f = record_line.split_whitespace();
    let name_field = f.next().unwrap_or_default();
    if name_field.contains('/') {
        return Err(ReadError::unsupported(HEADER, format!("multi-segment record {name_field:?}")));
    }
    let record_name = name_field.to_string();
    let nsig: usize = f
        .next()
        .ok_or_else(|| ReadError::malformed(HEADER, "the record line has no number of signals"))?
        .parse()
        .map_err(|_| ReadError::malformed(HEADER, format!("bad number of signals in {record_line:?}")))?;
    if nsig > SIGNALS_MAX {
        return Err(ReadError::malformed(HEADER, format!("{nsig} signals (at most {SIGNALS_MAX})")));
    }
    // "360", "360/1", "360(0)", "360/1(0)": the frequency is the leading number.
    let sample_rate_hz = match f.next() {
        None => 250.0, // the specification's default
        Some(field) => {
            let num = field.split(['/', '(']).next().unwrap_or(field);
            num.parse::<f32>().map_err(|_| ReadError::malformed(HEADER, format!("bad sampling frequency {field:?}")))?
        }
    };
    if !(sample_rate_hz > 0.0 && sample_rate_hz <= super::ecg::SAMPLE_RATE_HZ_MAX) {
        return Err(ReadError::malformed(HEADER, format!("sampling frequency {sample_rate_hz} Hz")));
    }
    let samples_per_signal = match f.next() {
        None => None,
        Some(n) => {
            // 0 means "not given", as in the WFDB library.
            Some(n.parse::<u64>().map_err(|_| ReadError::malformed(HEADER, format!("bad number of samples {n:?}")))?)
                .filter(|&n| n > 0)
        }
    };
    let signal_lines = &lines[1..];
    if signal_lines.len() < nsig {
        return Err(ReadError::malformed(
            HEADER,
            format!("the record line announces {nsig} signals, {} signal lines follow", signal_lines.len()),
        ));
    }
    let signals = signal_lines[..nsig]
        .iter()
        .map(|&(line_no, line)| {
            parse_signal_line(line).map_err(|why| ReadError::malformed(HEADER, format!("line {line_no}: {why}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WfdbHeader { record_name, sample_rate_hz, samples_per_signal, signals, comments })
}

fn parse_signal_line(line: &str) -> Result<WfdbSignal, String> {
    let mut f = line.splitn(9, char::is_whitespace).filter(|s| !s.is_empty());
    let file_name = f.next().ok_or("empty signal line")?.to_string();
    let fmt_field = f.next().ok_or("no format")?;
    // format[xsamples][:skew][+offset]
    let (fmt_field, byte_offset) = match fmt_field.split_once('+') {
        Some((a, off)) => (a, off.parse::<u64>().map_err(|_| format!("bad byte offset {off:?}"))?),
        None => (fmt_field, 0),
    };
    let (fmt_field, skew) = match fmt_field.split_once(':') {
        Some((a, s)) => (a, s.parse::<i64>().map_err(|_| format!("bad skew {s:?}"))?),
        None => (fmt_field, 0),
    };
    let (fmt_field, per_frame) = match fmt_field.split_once('x') {
        Some((a, n)) => (a, n.parse::<u32>().map_err(|_| format!("bad samples per frame {n:?}"))?),
        None => (fmt_field, 1),
    };
    let format: u16 = fmt_field.parse().map_err(|_| format!("bad format {fmt_field:?}"))?;
    if skew != 0 {
        return Err(format!("skew {skew} is not supported"));
    }
    if per_frame != 1 {
        return Err(format!("{per_frame} samples per frame are not supported"));
    }
    // gain[(baseline)][/units]
    let (mut adc_gain, mut baseline, mut units) = (0.0, None, "mV".to_string());
    if let Some(g) = f.next() {
        let (g, u) = match g.split_once('/') {
            Some((g, u)) => (g, Some(u)),
            None => (g, None),
        };
        let (g, b) = match g.split_once('(') {
            Some((g, b)) => (g, Some(b.strip_suffix(')').ok_or_else(|| format!("bad baseline in {g:?}"))?)),
            None => (g, None),
        };
        adc_gain = g.parse::<f64>().map_err(|_| format!("bad ADC gain {g:?}"))?;
        baseline = b.map(|b| b.parse::<i64>().map_err(|_| format!("bad baseline {b:?}"))).transpose()?;
        if let Some(u) = u {
            units = u.to_string();
        }
    }
    if !adc_gain.is_finite() || adc_gain < 0.0 {
        return Err(format!("ADC gain {adc_gain}"));
    }
    if adc_gain == 0.0 {
        adc_gain = 200.0; // the specification's default
    }
    let adc_resolution_bits =
        f.next().map(|r| r.parse::<u32>().map_err(|_| format!("bad ADC resolution {r:?}"))).transpose()?;
    let adc_zero =
        f.next().map(|z| z.parse::<i64>().map_err(|_| format!("bad ADC zero {z:?}"))).transpose()?.unwrap_or(0);
    let _initial_value = f.next();
    let checksum = f.next().map(|c| c.parse::<i16>().map_err(|_| format!("bad checksum {c:?}"))).transpose()?;
    let _block_size = f.next();
    let description = f.next().unwrap_or_default().trim().to_string();
    Ok(WfdbSignal {
        file_name,
        format,
        byte_offset,
        adc_gain,
        baseline: baseline.unwrap_or(adc_zero),
        units,
        adc_resolution_bits,
        adc_zero,
        checksum,
        description,
    })
}

/// Reads a record from its header file: the signal files are looked up in the
/// header's directory. Only signals in voltage units become leads.
pub fn read_wfdb_record(header_path: impl AsRef<Path>) -> Result<Ecg, ReadError> {
    let header_path = header_path.as_ref();
    let text = read_file_limited(header_path, HEADER_BYTES_MAX as u64)?;
    let text = String::from_utf8(text).map_err(|_| ReadError::malformed(HEADER, "not text (invalid UTF-8)"))?;
    let header = parse_wfdb_header(&text)?;
    let dir = header_path.parent().unwrap_or(Path::new("."));
    let mut files = HashMap::new();
    for s in &header.signals {
        if !files.contains_key(&s.file_name) {
            check_file_name(&s.file_name)?;
            files.insert(s.file_name.clone(), read_file_limited(&dir.join(&s.file_name), FILE_BYTES_MAX)?);
        }
    }
    decode_wfdb(&header, &files)
}

fn check_file_name(name: &str) -> Result<(), ReadError> {
    if name == "~" {
        return Err(ReadError::unsupported(HEADER, "signals without a file (\"~\")"));
    }
    let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    if !plain {
        return Err(ReadError::malformed(HEADER, format!("signal file {name:?} is not a plain file name")));
    }
    Ok(())
}

/// Decodes the signals of `header` from the signal files' contents (by file
/// name), in millivolts. Signals whose unit is not a voltage (µV, mV, V) are
/// left out; a record without any is refused.
pub fn decode_wfdb(header: &WfdbHeader, files: &HashMap<String, Vec<u8>>) -> Result<Ecg, ReadError> {
    // Signals sharing a file are interleaved in header order.
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, s) in header.signals.iter().enumerate() {
        match groups.iter_mut().find(|(f, _)| *f == s.file_name) {
            Some((_, members)) => members.push(i),
            None => groups.push((&s.file_name, vec![i])),
        }
    }
    let mut raw: Vec<Vec<i32>> = vec![Vec::new(); header.signals.len()];
    for (file, members) in &groups {
        let first = &header.signals[members[0]];
        if let Some(other) = members
            .iter()
            .map(|&m| &header.signals[m])
            .find(|s| s.format != first.format || s.byte_offset != first.byte_offset)
        {
            return Err(ReadError::unsupported(
                SIGNALS,
                format!(
                    "{file}: signals of different formats or offsets in one file ({} and {})",
                    first.format, other.format
                ),
            ));
        }
        let bytes = files.get(*file).ok_or_else(|| ReadError::malformed(SIGNALS, format!("{file} not provided")))?;
        let data = usize::try_from(first.byte_offset).ok().and_then(|o| bytes.get(o..)).ok_or_else(|| {
            ReadError::malformed(SIGNALS, format!("{file}: byte offset {} past the end", first.byte_offset))
        })?;
        let n = members.len();
        let frames = frames_in(first.format, data.len(), n).ok_or_else(|| {
            ReadError::unsupported(SIGNALS, format!("{file}: format {} (212, 16 and 80 are supported)", first.format))
        })?;
        let frames = match header.samples_per_signal {
            Some(want) if want > frames as u64 => {
                return Err(ReadError::malformed(
                    SIGNALS,
                    format!("{file} is truncated: {want} samples per signal announced, {frames} present"),
                ));
            }
            Some(want) => want as usize,
            None => frames,
        };
        let mut out: Vec<Vec<i32>> = (0..n).map(|_| Vec::with_capacity(frames)).collect();
        decode_samples(first.format, data, n, frames, &mut out);
        for (k, &m) in members.iter().enumerate() {
            raw[m] = std::mem::take(&mut out[k]);
        }
    }
    if header.sample_rate_hz < super::ecg::ECG_SAMPLE_RATE_HZ_MIN {
        return Err(ReadError::unsupported(
            HEADER,
            format!(
                "sampling frequency {} Hz (below {} Hz is not an ECG waveform)",
                header.sample_rate_hz,
                super::ecg::ECG_SAMPLE_RATE_HZ_MIN
            ),
        ));
    }
    let mut leads = Vec::new();
    for (i, (s, samples)) in header.signals.iter().zip(raw).enumerate() {
        if let Some(expected) = s.checksum {
            let sum = samples.iter().fold(0i16, |acc, &v| acc.wrapping_add(v as i16));
            if header.samples_per_signal.is_some() && sum != expected {
                return Err(ReadError::malformed(
                    SIGNALS,
                    format!("{}: signal {} checksum {sum} does not match the header's {expected}", s.file_name, i + 1),
                ));
            }
        }
        let mv_per_unit = match s.units.as_str() {
            "mV" => 1.0,
            "uV" | "µV" => 1e-3,
            "V" => 1e3,
            _ => continue,
        };
        let invalid = invalid_sample(s.format);
        let mut last = 0.0f32;
        let millivolts = samples
            .iter()
            .map(|&v| {
                // WFDB marks missing samples with the format's most negative
                // value: hold the previous value (0 before the first).
                if v != invalid {
                    last = ((f64::from(v) - s.baseline as f64) / s.adc_gain * mv_per_unit) as f32;
                }
                last
            })
            .collect();
        let name = if s.description.is_empty() { format!("signal {}", i + 1) } else { s.description.clone() };
        leads.push(Lead { name, millivolts });
    }
    if leads.is_empty() {
        return Err(ReadError::unsupported(HEADER, "no signal in voltage units (mV, uV, V)"));
    }
    Ok(Ecg { sample_rate_hz: header.sample_rate_hz, leads })
}

/// Whole frames of `n` signals in `len` bytes, or `None` for an unknown format.
fn frames_in(format: u16, len: usize, n: usize) -> Option<usize> {
    match format {
        // 12 bits per sample: 2 samples in 3 bytes.
        212 => Some(len * 2 / 3 / n),
        16 => Some(len / 2 / n),
        80 => Some(len / n),
        _ => None,
    }
}

fn invalid_sample(format: u16) -> i32 {
    match format {
        212 => -2048,
        16 => -32768,
        _ => -128,
    }
}

/// Decodes `frames` frames of `n` interleaved signals (the caller checked
/// that they fit in `data`).
fn decode_samples(format: u16, data: &[u8], n: usize, frames: usize, out: &mut [Vec<i32>]) {
    let total = frames * n;
    let mut push = |i: usize, v: i32| out[i % n].push(v);
    match format {
        212 => {
            for i in 0..total {
                let b = &data[(i / 2) * 3..];
                let v = if i % 2 == 0 {
                    i32::from(b[0]) | (i32::from(b[1] & 0x0F) << 8)
                } else {
                    i32::from(b[2]) | (i32::from(b[1] & 0xF0) << 4)
                };
                // Sign-extend 12 bits.
                push(i, (v << 20) >> 20);
            }
        }
        16 => {
            for (i, c) in data[..2 * total].chunks_exact(2).enumerate() {
                push(i, i32::from(i16::from_le_bytes([c[0], c[1]])));
            }
        }
        80 => {
            for (i, &b) in data[..total].iter().enumerate() {
                push(i, i32::from(b) - 128);
            }
        }
        _ => unreachable!("format checked by frames_in"),
    }
}

// ---------------------------------------------------------------------------
// SciPy's electrocardiogram excerpt

/// Sampling rate of SciPy's excerpt (that of the MIT-BIH database).
pub const SCIPY_ECG_SAMPLE_RATE_HZ: f32 = 360.0;
/// SciPy's conversion, `scipy/misc/_common.py` (1.11.4): `(ecg - 1024) / 200.0`.
const SCIPY_ECG_ADC_ZERO: f64 = 1024.0;
const SCIPY_ECG_ADC_GAIN: f64 = 200.0;
/// Largest `.npy` member accepted (the real one is 216 128 bytes).
pub const NPY_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Reads SciPy's `ecg.dat` (`scipy/misc/ecg.dat`, `scipy/datasets`'
/// `ecg.dat`): an `.npz` archive whose `ecg.npy` member is a 1-D array of
/// unsigned 16-bit ADC values of lead MLII of MIT-BIH record 208 (an excerpt,
/// 19:35 to 24:35), at 360 Hz. Converted as SciPy does: `(x − 1024) / 200` mV.
pub fn read_scipy_ecg(bytes: &[u8]) -> Result<Ecg, ReadError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| ReadError::malformed(NPZ, format!("not a zip archive: {e}")))?;
    let mut member =
        archive.by_name("ecg.npy").map_err(|e| ReadError::malformed(NPZ, format!("no ecg.npy member: {e}")))?;
    if member.size() > NPY_BYTES_MAX {
        return Err(ReadError::TooLarge { what: "ecg.npy".into(), bytes: member.size(), limit_bytes: NPY_BYTES_MAX });
    }
    let mut npy = Vec::with_capacity(member.size() as usize);
    // The declared size may lie: never inflate past the limit.
    (&mut member)
        .take(NPY_BYTES_MAX + 1)
        .read_to_end(&mut npy)
        .map_err(|e| ReadError::malformed(NPZ, format!("ecg.npy does not inflate: {e}")))?;
    if npy.len() as u64 > NPY_BYTES_MAX {
        return Err(ReadError::TooLarge {
            what: "ecg.npy".into(),
            bytes: npy.len() as u64,
            limit_bytes: NPY_BYTES_MAX,
        });
    }
    let values = npy_u16_vector(&npy)?;
    let millivolts =
        values.iter().map(|&v| ((f64::from(v) - SCIPY_ECG_ADC_ZERO) / SCIPY_ECG_ADC_GAIN) as f32).collect();
    Ok(Ecg { sample_rate_hz: SCIPY_ECG_SAMPLE_RATE_HZ, leads: vec![Lead { name: "MLII".into(), millivolts }] })
}

/// [`read_scipy_ecg`] on a file.
pub fn read_scipy_ecg_file(path: impl AsRef<Path>) -> Result<Ecg, ReadError> {
    read_scipy_ecg(&read_file_limited(path.as_ref(), NPY_BYTES_MAX)?)
}

/// The values of a 1-D little-endian `uint16` `.npy` array (format versions
/// 1–3). The header is a Python dict literal; only the three keys NumPy
/// writes are read, and the shape must match the data length exactly.
fn npy_u16_vector(npy: &[u8]) -> Result<Vec<u16>, ReadError> {
    const NPY: &str = "NumPy array (.npy)";
    if npy.len() < 10 || &npy[..6] != b"\x93NUMPY" {
        return Err(ReadError::malformed(NPY, "no \\x93NUMPY magic"));
    }
    let (header_len, start): (usize, usize) = match npy[6] {
        1 => (usize::from(u16::from_le_bytes([npy[8], npy[9]])), 10),
        2 | 3 if npy.len() >= 12 => (u32::from_le_bytes([npy[8], npy[9], npy[10], npy[11]]) as usize, 12),
        v => return Err(ReadError::unsupported(NPY, format!("format version {v}"))),
    };
    let header = npy
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| ReadError::malformed(NPY, format!("header of {header_len} bytes runs past the end")))?;
    let header = std::str::from_utf8(header).map_err(|_| ReadError::malformed(NPY, "header is not text"))?;
    let value_of = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = value_of("descr").ok_or_else(|| ReadError::malformed(NPY, "no descr"))?;
    if !descr.starts_with("'<u2'") {
        return Err(ReadError::unsupported(NPY, format!("dtype {}", descr.split(',').next().unwrap_or(descr))));
    }
    if !value_of("fortran_order").is_some_and(|v| v.starts_with("False")) {
        return Err(ReadError::unsupported(NPY, "Fortran order or no fortran_order"));
    }
    let shape = value_of("shape").ok_or_else(|| ReadError::malformed(NPY, "no shape"))?;
    let dims = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| ReadError::malformed(NPY, format!("bad shape {shape:?}")))?;
    let dims: Vec<&str> = dims.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let [n] = dims[..] else {
        return Err(ReadError::unsupported(NPY, format!("{}-dimensional array (1-D expected)", dims.len())));
    };
    let n: usize = n.parse().map_err(|_| ReadError::malformed(NPY, format!("bad length {n:?}")))?;
    let data = &npy[start + header_len..];
    if n.checked_mul(2) != Some(data.len()) {
        return Err(ReadError::malformed(
            NPY,
            format!("shape ({n},) of uint16 needs {} bytes, {} present", n.saturating_mul(2), data.len()),
        ));
    }
    Ok(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::test_support::{flips, testdata, truncations};

    #[test]
    fn scipy_ecg_dat_is_five_minutes_of_mlii_at_360_hz() {
        let ecg = read_scipy_ecg(&testdata("scipy_ecg.dat")).unwrap();
        assert_eq!(ecg.sample_rate_hz, 360.0);
        assert_eq!(ecg.leads.len(), 1);
        assert_eq!(ecg.leads[0].name, "MLII");
        assert_eq!(ecg.samples_per_lead(), 108_000);
        assert!((ecg.duration_s() - 300.0).abs() < 1e-3);
        // SciPy 1.11.4's own docstring: electrocardiogram() starts with
        // [-0.245, -0.215, -0.185, ...], ends with [..., -0.405, -0.395, -0.385],
        // and has mean -0.16510875 mV.
        let mv = &ecg.leads[0].millivolts;
        for (got, want) in mv[..3].iter().zip([-0.245, -0.215, -0.185]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        for (got, want) in mv[mv.len() - 3..].iter().zip([-0.405, -0.395, -0.385]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let mean = mv.iter().map(|&v| f64::from(v)).sum::<f64>() / mv.len() as f64;
        assert!((mean - -0.16510875).abs() < 1e-6, "mean {mean}");
    }

    #[test]
    fn scipy_ecg_dat_truncated_or_corrupted_gives_errors_not_panics() {
        let bytes = testdata("scipy_ecg.dat");
        for (what, b) in truncations(&bytes) {
            let msg = read_scipy_ecg(&b).map(|e| e.samples_per_lead()).unwrap_err().to_string();
            assert!(msg.contains(".npz") || msg.contains(".npy"), "{what}: {msg}");
        }
        for (what, b) in flips(&bytes, 100) {
            // The zip CRC-32 catches flips in the compressed data; a flip in an
            // unused header byte may pass. No panic either way.
            if let Ok(ecg) = read_scipy_ecg(&b) {
                assert_eq!(ecg.samples_per_lead(), 108_000, "{what}");
            }
        }
    }

    #[test]
    fn npy_header_lies_are_refused() {
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<u2', 'fortran_order': False, 'shape': (1000000,), }";
        npy.extend((header.len() as u16).to_le_bytes());
        npy.extend(header.as_bytes());
        npy.extend([0u8; 8]);
        let err = npy_u16_vector(&npy).unwrap_err().to_string();
        assert!(err.contains("needs 2000000 bytes, 8 present"), "{err}");
        let err = npy_u16_vector(&npy.replace_bytes(b"<u2", b"<f8")).unwrap_err().to_string();
        assert!(err.contains("dtype '<f8'"), "{err}");
    }

    fn record_208() -> (WfdbHeader, HashMap<String, Vec<u8>>) {
        let text = String::from_utf8(testdata("mitdb208_excerpt.hea")).unwrap();
        let header = parse_wfdb_header(&text).unwrap();
        let files = HashMap::from([("mitdb208_excerpt.dat".to_string(), testdata("mitdb208_excerpt.dat"))]);
        (header, files)
    }

    #[test]
    fn format_212_header_of_the_record_208_excerpt_parses() {
        let (h, _) = record_208();
        assert_eq!(h.record_name, "mitdb208_excerpt");
        assert_eq!(h.sample_rate_hz, 360.0);
        assert_eq!(h.samples_per_signal, Some(108_000));
        assert_eq!(h.signals.len(), 1);
        let s = &h.signals[0];
        assert_eq!(
            (s.file_name.as_str(), s.format, s.adc_gain, s.baseline, s.units.as_str()),
            ("mitdb208_excerpt.dat", 212, 200.0, 1024, "mV")
        );
        assert_eq!((s.adc_resolution_bits, s.adc_zero, s.checksum), (Some(12), 0, Some(5363)));
        assert_eq!(s.description, "MLII");
        assert_eq!(h.comments.len(), 1);
    }

    #[test]
    fn format_212_samples_match_the_wfdb_python_package() {
        let ecg = read_wfdb_record(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/mitdb208_excerpt.hea")).unwrap();
        assert_eq!(ecg.sample_rate_hz, 360.0);
        assert_eq!(ecg.leads.len(), 1);
        assert_eq!(ecg.leads[0].name, "MLII");
        let mv = &ecg.leads[0].millivolts;
        assert_eq!(mv.len(), 108_000);
        // Expected values from wfdb 4.3.1 (PyPI), obtained once with
        // `r = wfdb.rdrecord("testdata/mitdb208_excerpt")`: r.p_signal[:5, 0],
        // r.p_signal[50000:50003, 0] and r.p_signal[-3:, 0].
        let close = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6);
        assert!(close(&mv[..5], &[-0.245, -0.215, -0.185, -0.175, -0.17]), "{:?}", &mv[..5]);
        assert!(close(&mv[50_000..50_003], &[-0.035, -0.065, -0.095]), "{:?}", &mv[50_000..50_003]);
        assert!(close(&mv[mv.len() - 3..], &[-0.405, -0.395, -0.385]), "{:?}", &mv[mv.len() - 3..]);
        // And every sample equals SciPy's conversion of the same excerpt.
        let scipy = read_scipy_ecg(&testdata("scipy_ecg.dat")).unwrap();
        assert_eq!(&scipy.leads[0].millivolts, mv);
    }

    #[test]
    fn a_flipped_sample_fails_the_header_checksum() {
        let (h, mut files) = record_208();
        files.get_mut("mitdb208_excerpt.dat").unwrap()[90_000] ^= 0x01;
        let err = decode_wfdb(&h, &files).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn truncated_or_corrupted_records_give_errors_not_panics() {
        let (h, files) = record_208();
        let dat = &files["mitdb208_excerpt.dat"];
        for (what, b) in truncations(dat) {
            let files = HashMap::from([("mitdb208_excerpt.dat".to_string(), b)]);
            let err = decode_wfdb(&h, &files).unwrap_err().to_string();
            assert!(err.contains("truncated"), "{what}: {err}");
        }
        let hea = testdata("mitdb208_excerpt.hea");
        let mut refused = 0;
        for (what, b) in truncations(&hea).into_iter().chain(flips(&hea, 60)) {
            let parsed = std::str::from_utf8(&b).map_err(|_| ()).and_then(|t| parse_wfdb_header(t).map_err(|_| ()));
            match parsed.map(|h| decode_wfdb(&h, &files)) {
                Ok(Ok(ecg)) => {
                    assert!(ecg.leads.iter().all(|l| l.millivolts.len() == ecg.samples_per_lead()), "{what}")
                }
                _ => refused += 1,
            }
        }
        assert!(refused > 20, "only {refused} corrupted headers refused");
    }

    #[test]
    fn two_signals_interleave_in_formats_212_16_and_80() {
        // Two signals, three frames: (1, -1), (2047, -2047), (0, 100).
        let frames = [(1i32, -1i32), (2047, -2047), (0, 100)];
        let flat: Vec<i32> = frames.iter().flat_map(|&(a, b)| [a, b]).collect();
        let mut f212 = Vec::new();
        for pair in flat.chunks(2) {
            let (a, b) = (pair[0] & 0xFFF, pair[1] & 0xFFF);
            f212.extend([(a & 0xFF) as u8, (((a >> 8) & 0x0F) | ((b >> 4) & 0xF0)) as u8, (b & 0xFF) as u8]);
        }
        let f16: Vec<u8> = flat.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect();
        let f80: Vec<u8> = [(1, -1), (127, -127), (0, 100)]
            .iter()
            .flat_map(|&(a, b): &(i32, i32)| [(a + 128) as u8, (b + 128) as u8])
            .collect();
        // (format, file, signal II's raw values, the two checksums).
        let cases = [
            (212, f212, [-1, -2047, 100], (2048, -1948)),
            (16, f16, [-1, -2047, 100], (2048, -1948)),
            (80, f80, [-1, -127, 100], (128, -28)),
        ];
        for (format, bytes, want_b, (sum_a, sum_b)) in cases {
            let text = format!(
                "r 2 500 3\nr.dat {format} 100(0)/mV 12 0 0 {sum_a} 0 I\nr.dat {format} 1000/uV 12 0 0 {sum_b} 0 II\n"
            );
            let h = parse_wfdb_header(&text).unwrap();
            let ecg = decode_wfdb(&h, &HashMap::from([("r.dat".to_string(), bytes)])).unwrap();
            assert_eq!(ecg.leads[0].name, "I");
            let want_a: Vec<f32> = if format == 80 { vec![0.01, 1.27, 0.0] } else { vec![0.01, 20.47, 0.0] };
            assert_eq!(ecg.leads[0].millivolts, want_a, "format {format}");
            // Signal II: 1000 ADC units per µV → raw / 1000 µV = raw / 1e6 mV.
            let want_b: Vec<f32> = want_b.iter().map(|&v: &i32| (f64::from(v) / 1000.0 * 1e-3) as f32).collect();
            assert_eq!(ecg.leads[1].millivolts, want_b, "format {format}");
        }
    }

    #[test]
    fn header_defaults_and_refusals() {
        // Gain 0 means 200; no baseline means the ADC zero; no units means mV.
        let h = parse_wfdb_header("r 1 360\nr.dat 16 0 16 12\n").unwrap();
        assert_eq!((h.signals[0].adc_gain, h.signals[0].baseline, h.signals[0].units.as_str()), (200.0, 12, "mV"));
        assert_eq!(h.samples_per_signal, None);
        for (text, why) in [
            ("r/3 2 360\n", "multi-segment"),
            ("r 2 360\nr.dat 212 200\n", "2 signals, 1 signal lines"),
            ("r 1 360\nr.dat 212x4 200\n", "samples per frame"),
            ("r 1 360\nr.dat 212:3 200\n", "skew"),
            ("r 1 -5\nr.dat 212 200\n", "sampling frequency"),
            ("r 99999 360\n", "99999 signals"),
            ("", "no record line"),
        ] {
            let err = parse_wfdb_header(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        // 0 samples means "not given".
        assert_eq!(parse_wfdb_header("r 1 360 0\nr.dat 16 200\n").unwrap().samples_per_signal, None);
        let slow = parse_wfdb_header("r 1 1\nr.dat 16 200\n").unwrap();
        let err = decode_wfdb(&slow, &HashMap::from([("r.dat".to_string(), vec![0; 12])])).unwrap_err().to_string();
        assert!(err.contains("below 50 Hz"), "{err}");
        let h = parse_wfdb_header("r 1 360\nr.dat 310 200\n").unwrap();
        let err = decode_wfdb(&h, &HashMap::from([("r.dat".to_string(), vec![0; 12])])).unwrap_err().to_string();
        assert!(err.contains("format 310"), "{err}");
    }

    #[test]
    fn signal_files_outside_the_header_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let hea = dir.path().join("r.hea");
        for name in ["../secret.dat", "/etc/passwd", "sub/r.dat", ".."] {
            std::fs::write(&hea, format!("r 1 360\n{name} 16 200 16 0 0 0 0 I\n")).unwrap();
            let err = read_wfdb_record(&hea).unwrap_err().to_string();
            assert!(err.contains("not a plain file name"), "{name}: {err}");
        }
    }

    trait ReplaceBytes {
        fn replace_bytes(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }
    impl ReplaceBytes for Vec<u8> {
        fn replace_bytes(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            let at = self.windows(from.len()).position(|w| w == from).unwrap();
            [&self[..at], to, &self[at + from.len()..]].concat()
        }
    }
}
