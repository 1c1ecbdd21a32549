//! The common ECG type ([`Ecg`]: leads in millivolts at one sampling rate), its
//! band-limited resampler, and the reader for DICOM waveform storage (12-lead
//! ECG, General ECG and other waveform IODs: PS3.3 C.10.9 / C.10.10).
//!
//! The DICOM reader walks the file's structure before parsing (no allocation
//! from an unchecked length), then checks every waveform attribute it uses
//! against the others (channel count × sample count × bytes per sample must be
//! the size of the waveform data) before decoding. It never guesses: a missing
//! sampling frequency or an unknown sensitivity unit is an error, not a default.

use std::path::Path;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::{FILE_BYTES_MAX, ReadError, dicom_number as number, dicom_text as text, parse_dicom, read_file_limited};

/// One lead (channel) of an ECG.
#[derive(Debug, Clone, PartialEq)]
pub struct Lead {
    /// Standard lead name where the source says which lead it is: "I", "II",
    /// "III", "aVR", "aVL", "aVF", "V1".."V6", "MLII", ...; otherwise the
    /// source's own label.
    pub name: String,
    /// Samples in millivolts, at [`Ecg::sample_rate_hz`].
    pub millivolts: Vec<f32>,
}

/// An ECG: leads in millivolts, all sampled at the same rate and of the same
/// length.
#[derive(Debug, Clone, PartialEq)]
pub struct Ecg {
    pub sample_rate_hz: f32,
    pub leads: Vec<Lead>,
}

/// Highest sampling rate accepted from a file or asked of [`Ecg::resample`].
pub const SAMPLE_RATE_HZ_MAX: f32 = 100_000.0;
/// Lowest sampling rate the readers accept for an ECG: slower signals (trend
/// data, minute-by-minute vitals) are not waveforms a model can read, and a
/// bound here bounds what resampling can allocate.
pub const ECG_SAMPLE_RATE_HZ_MIN: f32 = 50.0;

impl Ecg {
    /// Number of samples per lead (0 for an ECG without leads).
    pub fn samples_per_lead(&self) -> usize {
        self.leads.first().map_or(0, |l| l.millivolts.len())
    }

    /// Duration in seconds.
    pub fn duration_s(&self) -> f32 {
        self.samples_per_lead() as f32 / self.sample_rate_hz
    }

    /// The lead of that name (exact match first, then ignoring ASCII case).
    pub fn lead(&self, name: &str) -> Option<&Lead> {
        self.leads
            .iter()
            .find(|l| l.name == name)
            .or_else(|| self.leads.iter().find(|l| l.name.eq_ignore_ascii_case(name)))
    }

    /// The same ECG sampled at `hz`, by band-limited (windowed-sinc)
    /// interpolation, each lead independently:
    ///
    /// `y(t) = Σₖ x[k] · h(t·fs_in − k) / Σₖ h(t·fs_in − k)`, for output times
    /// `t = n / hz`, where `h(d) = sinc(2·fc·d) · kaiser(d / half_width)` with
    /// cutoff `fc = 0.45 · min(fs_in, hz) / fs_in` cycles per input sample
    /// (a low-pass at 90 % of the lower Nyquist frequency, so downsampling
    /// does not alias) and `half_width` = 10 zero crossings of that sinc
    /// (Kaiser β = 8, about 80 dB stop-band). Dividing by the sum of the
    /// kernel weights keeps DC gain at exactly 1, also at the record's edges,
    /// where the kernel is cut short.
    ///
    /// The kernel is tabulated once (512 points per input sample, linearly
    /// interpolated) and each output time's weights serve every lead.
    ///
    /// The output has `round(duration · hz)` samples per lead (at most
    /// `hz / ECG_SAMPLE_RATE_HZ_MIN` times the input, since readers refuse
    /// rates below [`ECG_SAMPLE_RATE_HZ_MIN`]). Cost is `O(output samples ×
    /// kernel width × leads)`; the kernel is ≈ 45 input samples wide when
    /// upsampling and widens in proportion to the ratio when downsampling
    /// (1000 → 100 Hz: ≈ 445).
    ///
    /// # Panics
    /// If `hz` is not finite, not positive or above [`SAMPLE_RATE_HZ_MAX`]:
    /// the target rate is the caller's constant, never read from input.
    pub fn resample(&self, hz: f32) -> Ecg {
        assert!(hz.is_finite() && hz > 0.0 && hz <= SAMPLE_RATE_HZ_MAX, "resample to {hz} Hz");
        if hz == self.sample_rate_hz {
            return self.clone();
        }
        let n_in = self.samples_per_lead();
        let n_out = (n_in as f64 * f64::from(hz) / f64::from(self.sample_rate_hz)).round() as usize;
        let kernel = SincKernel::new(f64::from(self.sample_rate_hz), f64::from(hz));
        let inputs: Vec<&[f32]> = self.leads.iter().map(|l| l.millivolts.as_slice()).collect();
        let outputs = kernel.resample(&inputs, n_out);
        let leads = self
            .leads
            .iter()
            .zip(outputs)
            .map(|(lead, millivolts)| Lead { name: lead.name.clone(), millivolts })
            .collect();
        Ecg { sample_rate_hz: hz, leads }
    }
}

/// Windowed-sinc kernel for one rate conversion (see [`Ecg::resample`]),
/// tabulated once and linearly interpolated.
struct SincKernel {
    /// Input samples per output sample.
    step: f64,
    /// Half the kernel width, in input samples.
    half_width: f64,
    /// Table entries per input sample.
    per_sample: f64,
    /// The kernel at `d = j / per_sample`, `j = 0..` (it is symmetric).
    table: Vec<f32>,
}

impl SincKernel {
    const ZERO_CROSSINGS: f64 = 10.0;
    const KAISER_BETA: f64 = 8.0;
    /// Table resolution: 512 entries per input sample, fewer for very wide
    /// kernels so the table stays under 64 Ki entries.
    const TABLE_PER_SAMPLE_MAX: f64 = 512.0;
    const TABLE_LEN_MAX: f64 = 65_536.0;

    fn new(fs_in: f64, fs_out: f64) -> SincKernel {
        let fc = 0.45 * fs_in.min(fs_out) / fs_in;
        let half_width = Self::ZERO_CROSSINGS / (2.0 * fc);
        let per_sample = (Self::TABLE_LEN_MAX / half_width).min(Self::TABLE_PER_SAMPLE_MAX);
        let len = (half_width * per_sample).ceil() as usize + 2;
        let i0_beta = bessel_i0(Self::KAISER_BETA);
        let table = (0..len)
            .map(|j| {
                let d = j as f64 / per_sample;
                let r = d / half_width;
                if r >= 1.0 {
                    return 0.0;
                }
                let x = std::f64::consts::PI * 2.0 * fc * d;
                let sinc = if x < 1e-12 { 1.0 } else { x.sin() / x };
                (sinc * bessel_i0(Self::KAISER_BETA * (1.0 - r * r).sqrt()) / i0_beta) as f32
            })
            .collect();
        SincKernel { step: fs_in / fs_out, half_width, per_sample, table }
    }

    fn weight(&self, d: f64) -> f32 {
        let p = d.abs() * self.per_sample;
        let j = p as usize;
        match (self.table.get(j), self.table.get(j + 1)) {
            (Some(&a), Some(&b)) => a + (b - a) * (p - j as f64) as f32,
            _ => 0.0,
        }
    }

    /// Resamples every input (all of one length) to `n_out` samples; the
    /// weights for each output time are computed once for all inputs.
    fn resample(&self, inputs: &[&[f32]], n_out: usize) -> Vec<Vec<f32>> {
        let n_in = inputs.first().map_or(0, |x| x.len());
        if n_in == 0 {
            return inputs.iter().map(|_| vec![0.0; n_out]).collect();
        }
        let last = (n_in - 1) as f64;
        let mut outputs: Vec<Vec<f32>> = inputs.iter().map(|_| Vec::with_capacity(n_out)).collect();
        let mut weights = Vec::new();
        for n in 0..n_out {
            let t = n as f64 * self.step;
            let lo = (t - self.half_width).ceil().max(0.0) as usize;
            let hi = (t + self.half_width).floor().min(last);
            weights.clear();
            if hi >= lo as f64 {
                weights.extend((lo..=hi as usize).map(|k| self.weight(t - k as f64)));
            }
            let norm: f32 = weights.iter().sum();
            for (x, out) in inputs.iter().zip(&mut outputs) {
                out.push(if norm.abs() > 1e-6 {
                    x[lo..lo + weights.len()].iter().zip(&weights).map(|(v, w)| v * w).sum::<f32>() / norm
                } else {
                    // Past the last input sample by more than the kernel reaches
                    // (only possible from rounding at the very end): hold.
                    x[(t.round() as usize).min(n_in - 1)]
                });
            }
        }
        outputs
    }
}

/// Modified Bessel function of the first kind, order 0 (power series; converges
/// fast for the arguments used here, ≤ 8).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term, q) = (1.0, 1.0, x * x / 4.0);
    for k in 1..50 {
        term *= q / (k * k) as f64;
        sum += term;
        if term < 1e-16 * sum {
            break;
        }
    }
    sum
}

// ---------------------------------------------------------------------------
// DICOM waveform storage

const FORMAT: &str = "DICOM waveform";

/// Most channels accepted in one multiplex group (the standard allows 13 for
/// 12-lead ECG, a few hundred for other waveforms).
pub const CHANNELS_MAX: usize = 512;

/// Reads the ECG in a DICOM waveform object (a Part-10 file in memory).
///
/// Of several multiplex groups (12-lead ECG files usually carry "RHYTHM" and
/// "MEDIAN BEAT"), the one labelled "RHYTHM" is read, else the longest.
/// Values are `raw × ChannelSensitivity × ChannelSensitivityCorrectionFactor +
/// ChannelBaseline` in the channel's sensitivity unit (µV, mV or V, as UCUM
/// codes), converted to millivolts; the same formula as pydicom's
/// `waveform_array`. Supported sample encodings: 8-bit SB/UB, 16-bit SS/US,
/// 32-bit SL/UL, channels interleaved.
pub fn read_dicom_ecg(bytes: &[u8]) -> Result<Ecg, ReadError> {
    let obj = parse_dicom(bytes)?;
    ecg_from_dicom(&obj)
}

/// [`read_dicom_ecg`] on an object already parsed.
pub(crate) fn ecg_from_dicom(obj: &InMemDicomObject) -> Result<Ecg, ReadError> {
    let groups = seq(obj, tags::WAVEFORM_SEQUENCE, "Waveform Sequence")?;
    if groups.is_empty() {
        return Err(ReadError::malformed(FORMAT, "the Waveform Sequence is empty"));
    }
    let label = |g: &InMemDicomObject| text(g, tags::MULTIPLEX_GROUP_LABEL).unwrap_or_default();
    let chosen = match groups.iter().position(|g| label(g).eq_ignore_ascii_case("RHYTHM")) {
        Some(i) => i,
        None => {
            let duration = |g: &InMemDicomObject| {
                let n = number(g, tags::NUMBER_OF_WAVEFORM_SAMPLES).unwrap_or(0.0);
                let fs = number(g, tags::SAMPLING_FREQUENCY).filter(|f| *f > 0.0).unwrap_or(f64::INFINITY);
                n / fs
            };
            (0..groups.len()).max_by(|&a, &b| duration(&groups[a]).total_cmp(&duration(&groups[b]))).unwrap_or(0)
        }
    };
    read_multiplex_group(&groups[chosen]).map_err(|e| match e {
        ReadError::Malformed { format, why } => ReadError::Malformed {
            format,
            why: format!("multiplex group {} ({:?}): {why}", chosen + 1, label(&groups[chosen])),
        },
        other => other,
    })
}

/// [`read_dicom_ecg`] on a file (at most [`FILE_BYTES_MAX`] bytes).
pub fn read_dicom_ecg_file(path: impl AsRef<Path>) -> Result<Ecg, ReadError> {
    read_dicom_ecg(&read_file_limited(path.as_ref(), FILE_BYTES_MAX)?)
}

fn read_multiplex_group(g: &InMemDicomObject) -> Result<Ecg, ReadError> {
    let channels = required_number(g, tags::NUMBER_OF_WAVEFORM_CHANNELS, "Number of Waveform Channels")?;
    let samples = required_number(g, tags::NUMBER_OF_WAVEFORM_SAMPLES, "Number of Waveform Samples")?;
    let fs = required_number(g, tags::SAMPLING_FREQUENCY, "Sampling Frequency")?;
    if !(channels >= 1.0 && channels <= CHANNELS_MAX as f64 && channels.fract() == 0.0) {
        return Err(ReadError::malformed(FORMAT, format!("{channels} channels (1..={CHANNELS_MAX} expected)")));
    }
    if !(samples >= 1.0 && samples.fract() == 0.0 && samples <= u32::MAX as f64) {
        return Err(ReadError::malformed(FORMAT, format!("{samples} samples per channel")));
    }
    if !(fs > 0.0 && fs <= f64::from(SAMPLE_RATE_HZ_MAX)) {
        return Err(ReadError::malformed(FORMAT, format!("sampling frequency {fs} Hz")));
    }
    if fs < f64::from(ECG_SAMPLE_RATE_HZ_MIN) {
        return Err(ReadError::unsupported(
            FORMAT,
            format!("sampling frequency {fs} Hz (below {ECG_SAMPLE_RATE_HZ_MIN} Hz is not an ECG waveform)"),
        ));
    }
    let (channels, samples) = (channels as usize, samples as usize);
    let bits = required_number(g, tags::WAVEFORM_BITS_ALLOCATED, "Waveform Bits Allocated")?;
    let interpretation = text(g, tags::WAVEFORM_SAMPLE_INTERPRETATION)
        .ok_or_else(|| ReadError::malformed(FORMAT, "no Waveform Sample Interpretation"))?;
    let decode: fn(&[u8]) -> f64 = match (bits as u32, interpretation.as_str()) {
        (8, "SB") => |b| f64::from(b[0] as i8),
        (8, "UB") => |b| f64::from(b[0]),
        (16, "SS") => |b| f64::from(i16::from_le_bytes([b[0], b[1]])),
        (16, "US") => |b| f64::from(u16::from_le_bytes([b[0], b[1]])),
        (32, "SL") => |b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        (32, "UL") => |b| f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        (bits, interp) => {
            return Err(ReadError::unsupported(
                FORMAT,
                format!("{bits}-bit samples with interpretation {interp:?} (SB/UB/SS/US/SL/UL supported)"),
            ));
        }
    };
    let width = bits as usize / 8;
    let data = g
        .element_opt(tags::WAVEFORM_DATA)
        .ok()
        .flatten()
        .ok_or_else(|| ReadError::malformed(FORMAT, "no Waveform Data"))?
        .to_bytes()
        .map_err(|e| ReadError::malformed(FORMAT, format!("Waveform Data: {e}")))?;
    let expected = channels.checked_mul(samples).and_then(|n| n.checked_mul(width));
    // Values of odd length are padded to even length: allow one byte more.
    if expected.is_none_or(|e| data.len() < e || data.len() > e + 1) {
        return Err(ReadError::malformed(
            FORMAT,
            format!(
                "Waveform Data has {} bytes, {channels} channels × {samples} samples × {width} bytes need {}",
                data.len(),
                expected.map_or("more than usize".into(), |e| e.to_string())
            ),
        ));
    }

    let defs = seq(g, tags::CHANNEL_DEFINITION_SEQUENCE, "Channel Definition Sequence")?;
    if defs.len() != channels {
        return Err(ReadError::malformed(
            FORMAT,
            format!("{} channel definitions for {channels} channels", defs.len()),
        ));
    }
    let mut leads = Vec::with_capacity(channels);
    for (c, def) in defs.iter().enumerate() {
        let (scale, offset) =
            channel_scale_mv(def).map_err(|why| ReadError::malformed(FORMAT, format!("channel {}: {why}", c + 1)))?;
        let millivolts = (0..samples)
            .map(|s| {
                let at = (s * channels + c) * width;
                (decode(&data[at..at + width]) * scale + offset) as f32
            })
            .collect();
        leads.push(Lead { name: channel_name(def, c), millivolts });
    }
    Ok(Ecg { sample_rate_hz: fs as f32, leads })
}

/// `(scale, offset)` such that `raw × scale + offset` is in millivolts.
fn channel_scale_mv(def: &InMemDicomObject) -> Result<(f64, f64), String> {
    let sensitivity = number(def, tags::CHANNEL_SENSITIVITY).ok_or("no Channel Sensitivity")?;
    let correction = number(def, tags::CHANNEL_SENSITIVITY_CORRECTION_FACTOR).unwrap_or(1.0);
    let baseline = number(def, tags::CHANNEL_BASELINE).unwrap_or(0.0);
    let units = def
        .element_opt(tags::CHANNEL_SENSITIVITY_UNITS_SEQUENCE)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .and_then(|items| items.first())
        .and_then(|unit| text(unit, tags::CODE_VALUE))
        .ok_or("no Channel Sensitivity Units")?;
    let mv_per_unit = match units.as_str() {
        "uV" => 1e-3,
        "mV" => 1.0,
        "V" => 1e3,
        "nV" => 1e-6,
        other => return Err(format!("sensitivity unit {other:?} is not a voltage (uV, mV, V)")),
    };
    if ![sensitivity, correction, baseline].iter().all(|v| v.is_finite()) || sensitivity == 0.0 || correction == 0.0 {
        return Err(format!("sensitivity {sensitivity} × correction {correction}, baseline {baseline}"));
    }
    Ok((sensitivity * correction * mv_per_unit, baseline * mv_per_unit))
}

/// The lead a channel records: from the Channel Source Sequence's code (SCPECG
/// `5.6.3-9-N` or MDC `2:N` codes), else its code meaning ("Lead V1" → "V1",
/// "Lead I (Einthoven)" → "I"), else the Channel Label, else "channel N".
fn channel_name(def: &InMemDicomObject, index: usize) -> String {
    let source = def
        .element_opt(tags::CHANNEL_SOURCE_SEQUENCE)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .and_then(|items| items.first());
    if let Some(source) = source {
        if let Some(name) = text(source, tags::CODE_VALUE).and_then(|v| lead_from_code(&v)) {
            return name.to_string();
        }
        if let Some(meaning) = text(source, tags::CODE_MEANING) {
            let m = meaning.trim();
            let m = m.strip_prefix("Lead ").unwrap_or(m);
            let m = m.split(" (").next().unwrap_or(m).trim();
            if !m.is_empty() {
                return m.to_string();
            }
        }
    }
    text(def, tags::CHANNEL_LABEL).filter(|l| !l.is_empty()).unwrap_or_else(|| format!("channel {}", index + 1))
}

fn lead_from_code(code: &str) -> Option<&'static str> {
    const LIMB_AND_CHEST: [(u32, &str); 12] = [
        (1, "I"),
        (2, "II"),
        (3, "V1"),
        (4, "V2"),
        (5, "V3"),
        (6, "V4"),
        (7, "V5"),
        (8, "V6"),
        (61, "III"),
        (62, "aVR"),
        (63, "aVL"),
        (64, "aVF"),
    ];
    let n: u32 = code.strip_prefix("5.6.3-9-").or_else(|| code.strip_prefix("2:"))?.parse().ok()?;
    LIMB_AND_CHEST.iter().find(|(c, _)| *c == n).map(|(_, name)| *name)
}

fn required_number(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<f64, ReadError> {
    number(obj, tag).ok_or_else(|| ReadError::malformed(FORMAT, format!("no (readable) {name}")))
}

fn seq<'a>(obj: &'a InMemDicomObject, tag: Tag, name: &str) -> Result<&'a [InMemDicomObject], ReadError> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .ok_or_else(|| ReadError::malformed(FORMAT, format!("no {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::test_support::{flips, testdata, truncations};

    const TWELVE_LEADS: [&str; 12] = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"];

    #[test]
    fn pydicom_waveform_ecg_reads_as_twelve_leads_of_ten_seconds_at_1000_hz() {
        let ecg = read_dicom_ecg(&testdata("waveform_ecg.dcm")).unwrap();
        assert_eq!(ecg.sample_rate_hz, 1000.0);
        let names: Vec<&str> = ecg.leads.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, TWELVE_LEADS);
        assert_eq!(ecg.samples_per_lead(), 10_000);
        assert!(ecg.leads.iter().all(|l| l.millivolts.len() == 10_000));
        assert!((ecg.duration_s() - 10.0).abs() < 1e-6);
        // Values as pydicom 3.0.2's `ds.waveform_array(0)` gives them (in µV:
        // raw × 1.25 µV), converted to mV: first sample of I, II, V6; the minimum
        // of V1 and the maximum of V5 over the record.
        let ii = &ecg.lead("II").unwrap().millivolts;
        assert!((ecg.lead("I").unwrap().millivolts[0] - 0.100).abs() < 1e-6);
        assert!((ii[0] - 0.1125).abs() < 1e-6);
        assert!((ecg.lead("V6").unwrap().millivolts[0] - -0.050).abs() < 1e-6);
        let v1 = &ecg.lead("v1").unwrap().millivolts;
        assert!((v1.iter().copied().fold(f32::INFINITY, f32::min) - -1.125).abs() < 1e-6);
        let v5 = &ecg.lead("V5").unwrap().millivolts;
        assert!((v5.iter().copied().fold(f32::NEG_INFINITY, f32::max) - 1.9625).abs() < 1e-6);
        // Every lead within a plausible surface-ECG range.
        for lead in &ecg.leads {
            let peak = lead.millivolts.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(peak > 0.05 && peak < 5.0, "{}: peak {peak} mV", lead.name);
        }
    }

    /// Regression (fuzz/readers, out-of-memory in CI): a mutation turned the VR
    /// of an annotation's (0040,A180) US element into "QS". The structure walk took
    /// any two capitals as a short VR; the parser reads an unknown VR as UN, whose
    /// length is four bytes further on, and asked for a 4 GiB buffer. An unknown VR
    /// is now refused by the walk, before the parser runs. (The input is kept as
    /// fuzz/corpus/readers/regression-oom-unknown-vr.dcm.)
    #[test]
    fn an_unknown_vr_is_refused_before_the_parser_allocates_its_misread_length() {
        let found =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/readers/regression-oom-unknown-vr.dcm"))
                .unwrap();
        let mut made = testdata("waveform_ecg.dcm");
        let at = made.windows(6).position(|w| w == [0x40, 0x00, 0x80, 0xA1, b'U', b'S']).unwrap();
        made[at + 4] = b'Q';
        for (what, bytes) in [("fuzz input", found), ("waveform_ecg.dcm with one VR changed", made)] {
            match read_dicom_ecg(&bytes) {
                Err(ReadError::Malformed { why, .. }) => {
                    assert!(why.contains("invalid VR \"QS\""), "{what}: {why}")
                }
                other => panic!("{what}: expected a malformed-structure error, got {other:?}"),
            }
        }
    }

    #[test]
    fn lead_codes_map_to_standard_names() {
        assert_eq!(lead_from_code("5.6.3-9-61"), Some("III"));
        assert_eq!(lead_from_code("2:64"), Some("aVF"));
        assert_eq!(lead_from_code("5.6.3-9-999"), None);
        assert_eq!(lead_from_code("nonsense"), None);
    }

    fn sine(hz: f32, fs: f32, seconds: f32) -> Ecg {
        let n = (fs * seconds) as usize;
        let mv = (0..n).map(|i| (2.0 * std::f32::consts::PI * hz * i as f32 / fs).sin()).collect();
        Ecg { sample_rate_hz: fs, leads: vec![Lead { name: "II".into(), millivolts: mv }] }
    }

    fn interior_error(ecg: &Ecg, hz: f32) -> f32 {
        let fs = ecg.sample_rate_hz;
        let x = &ecg.leads[0].millivolts;
        let margin = (fs * 0.5) as usize; // skip 0.5 s at each edge
        (margin..x.len() - margin)
            .map(|i| (x[i] - (2.0 * std::f32::consts::PI * hz * i as f32 / fs).sin()).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn resampling_keeps_in_band_signals_at_common_ecg_rates() {
        for (from, to) in [(1000.0, 500.0), (1000.0, 250.0), (360.0, 500.0), (500.0, 360.0), (250.0, 1000.0)] {
            let r = sine(7.0, from, 4.0).resample(to);
            assert_eq!(r.sample_rate_hz, to);
            assert_eq!(r.samples_per_lead(), (4.0 * to) as usize, "{from} → {to}");
            let err = interior_error(&r, 7.0);
            assert!(err < 2e-3, "{from} → {to} Hz: max error {err}");
        }
    }

    #[test]
    fn resampling_down_removes_what_would_alias() {
        // 200 Hz is above the 125 Hz Nyquist of 250 Hz: it must be filtered out,
        // not folded to 50 Hz.
        let r = sine(200.0, 1000.0, 4.0).resample(250.0);
        let x = &r.leads[0].millivolts;
        let peak = x[125..x.len() - 125].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(peak < 0.01, "residual {peak}");
    }

    #[test]
    fn resampling_the_real_12_lead_ecg_to_500_hz_keeps_its_shape() {
        let ecg = read_dicom_ecg(&testdata("waveform_ecg.dcm")).unwrap();
        let r = ecg.resample(500.0);
        assert_eq!((r.sample_rate_hz, r.samples_per_lead(), r.leads.len()), (500.0, 5000, 12));
        for (a, b) in ecg.leads.iter().zip(&r.leads) {
            assert_eq!(a.name, b.name);
            // Output sample n is input time 2n; the ECG's content lies far below
            // the 225 Hz cutoff, so the two agree closely (away from the edges).
            let err = (50..4950).map(|n| (b.millivolts[n] - a.millivolts[2 * n]).abs()).fold(0.0, f32::max);
            assert!(err < 0.05, "{}: max deviation {err} mV", a.name);
        }
    }

    #[test]
    fn an_ecg_sampled_below_50_hz_is_refused() {
        // Patch Sampling Frequency (003A,001A), a DS "1000", to "10  ".
        let mut bytes = testdata("waveform_ecg.dcm");
        let tag = [0x3A, 0x00, 0x1A, 0x00, b'D', b'S', 4, 0];
        let at = bytes.windows(8).position(|w| w == tag).expect("sampling frequency tag") + 8;
        assert_eq!(&bytes[at..at + 4], b"1000");
        bytes[at..at + 4].copy_from_slice(b"10  ");
        let err = read_dicom_ecg(&bytes).unwrap_err().to_string();
        assert!(err.contains("10 Hz (below 50 Hz"), "{err}");
    }

    #[test]
    fn resampling_keeps_dc_to_the_edges() {
        let ecg =
            Ecg { sample_rate_hz: 360.0, leads: vec![Lead { name: "MLII".into(), millivolts: vec![0.75; 1000] }] };
        let r = ecg.resample(500.0);
        assert!(r.leads[0].millivolts.iter().all(|v| (v - 0.75).abs() < 1e-5));
    }

    #[test]
    fn truncated_or_corrupted_waveform_files_give_errors_not_panics() {
        let bytes = testdata("waveform_ecg.dcm");
        for (what, b) in truncations(&bytes) {
            let r = read_dicom_ecg(&b);
            assert!(r.is_err(), "{what}: read as {:?}", r.map(|e| e.samples_per_lead()));
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("DICOM"), "{what}: {msg}");
        }
        // Flipped bytes may land in a value that does not matter (a name, a
        // sample): then reading succeeds; what matters is no panic, and that
        // whatever is read is consistent.
        let mut refused = 0;
        for (what, b) in flips(&bytes, 200) {
            match std::panic::catch_unwind(|| read_dicom_ecg(&b)) {
                Ok(Ok(ecg)) => {
                    assert!(ecg.leads.iter().all(|l| l.millivolts.len() == ecg.samples_per_lead()), "{what}")
                }
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("{what}: panicked"),
            }
        }
        assert!(refused > 0, "no flipped variant was refused");
    }

    #[test]
    fn a_waveform_data_size_that_disagrees_with_the_header_is_refused() {
        // Patch Number of Waveform Samples (003A,0010) of the first group from
        // 10000 to 60000: the data would then need 6× the bytes present.
        let mut bytes = testdata("waveform_ecg.dcm");
        let tag = [0x3A, 0x00, 0x10, 0x00, b'U', b'L', 4, 0];
        let at = bytes.windows(8).position(|w| w == tag).expect("samples tag") + 8;
        assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 10_000);
        bytes[at..at + 4].copy_from_slice(&60_000u32.to_le_bytes());
        let err = read_dicom_ecg(&bytes).unwrap_err().to_string();
        assert!(err.contains("Waveform Data has") && err.contains("60000 samples"), "{err}");
    }

    #[test]
    fn non_waveform_dicom_is_refused_with_the_reason() {
        let err = read_dicom_ecg(&testdata("CT_small.dcm")).unwrap_err().to_string();
        assert!(err.contains("no Waveform Sequence"), "{err}");
        let err = read_dicom_ecg(b"plain text, not DICOM at all").unwrap_err().to_string();
        assert!(err.starts_with("malformed DICOM file"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_dicom_ecg_file("/nonexistent/ecg.dcm").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ecg.dcm"), "{err}");
    }
}
