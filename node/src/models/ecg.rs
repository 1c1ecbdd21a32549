//! The ECG rhythm model: normal sinus rhythm, atrial fibrillation, sinus
//! bradycardia, sinus tachycardia, ectopic (premature ventricular) beats.
//!
//! A lead is resampled to [`RATE_HZ`], its baseline removed, QRS complexes found
//! (a Pan–Tompkins-style energy detector), and each 10 s window reduced to
//! scale-free features: RR-interval statistics (rate, variability, prematurity and
//! compensatory pauses) and beat morphology (correlation with the window's median
//! beat, QRS width and amplitude outliers, P-wave presence, residual baseline
//! activity). A small candle MLP reads the features; its softmax is
//! temperature-scaled on a held-out split. A longer record is read window by window.
//!
//! This module must never claim more than rhythm: no ST, QT or axis reading.

use super::mlp::{Metrics, Mlp, ModelError, TrainSpec, argmax};
use super::synth::{self, COMMON_RATES_HZ, Rhythm};
use rand::Rng;

/// The rate every lead is resampled to before features are computed.
pub const RATE_HZ: f64 = 250.0;
/// The window the model reads.
pub const WINDOW_S: f64 = 10.0;
/// Number of features per window.
pub const FEATURES: usize = 18;
/// The shipped weights (what `telemed-node models train ecg` writes).
pub static WEIGHTS: &[u8] = include_bytes!("../../models/ecg.safetensors");
/// Shortest record the model reads (fewer beats say nothing about rhythm).
pub const MIN_SECONDS: f64 = 4.0;
/// Longest record read (a day of ECG at most is refused, not read for an hour).
pub const MAX_SECONDS: f64 = 3600.0;

/// The trained ECG model.
#[derive(Debug, Clone)]
pub struct EcgModel {
    pub mlp: Mlp,
}

/// The model's read of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRead {
    pub start_s: f64,
    pub probs: Vec<f32>,
    pub beats: usize,
}

/// The model's read of a whole record.
#[derive(Debug, Clone, PartialEq)]
pub struct EcgRead {
    /// Record-level probability per class: the mean over windows.
    pub probs: Vec<f32>,
    pub windows: Vec<WindowRead>,
    /// Windows whose most likely class is each class.
    pub windows_per_class: Vec<usize>,
}

impl EcgRead {
    pub fn top(&self) -> (Rhythm, f32) {
        let (i, p) = argmax(&self.probs);
        (Rhythm::ALL[i], p)
    }
}

impl EcgModel {
    pub fn shipped() -> Result<EcgModel, ModelError> {
        EcgModel::from_bytes(WEIGHTS)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<EcgModel, ModelError> {
        Ok(EcgModel { mlp: Mlp::from_safetensors(bytes, FEATURES, Rhythm::ALL.len())? })
    }

    /// Reads an ECG: lead II if it has one (MLII in MIT-BIH records), else its
    /// first lead.
    pub fn read(&self, ecg: &crate::readers::Ecg) -> Result<EcgRead, ModelError> {
        let lead = ["II", "MLII"]
            .iter()
            .find_map(|n| ecg.lead(n))
            .or(ecg.leads.first())
            .ok_or_else(|| ModelError::Input("the ECG has no leads".into()))?;
        self.read_lead(&lead.millivolts, ecg.sample_rate_hz as f64)
    }

    /// Reads one lead sampled at `sample_rate_hz` (any common rate).
    pub fn read_lead(&self, millivolts: &[f32], sample_rate_hz: f64) -> Result<EcgRead, ModelError> {
        if !(20.0..=20_000.0).contains(&sample_rate_hz) {
            return Err(ModelError::Input(format!("sampling rate {sample_rate_hz} Hz is not an ECG rate")));
        }
        let seconds = millivolts.len() as f64 / sample_rate_hz;
        if seconds < MIN_SECONDS {
            return Err(ModelError::Input(format!("{seconds:.1} s of ECG is too short (at least {MIN_SECONDS} s)")));
        }
        if seconds > MAX_SECONDS {
            return Err(ModelError::Input(format!("{seconds:.0} s of ECG is longer than the {MAX_SECONDS} s read")));
        }
        let x = resample(millivolts, sample_rate_hz, RATE_HZ);
        let win = (WINDOW_S * RATE_HZ) as usize;
        // Windows of 10 s; a shorter record is one window; a tail under half a
        // window is folded into the last one.
        let mut starts: Vec<usize> = (0..).map(|k| k * win).take_while(|s| s + win <= x.len()).collect();
        if starts.is_empty() {
            starts.push(0);
        }
        let mut feats = Vec::new();
        let mut beats = Vec::new();
        for (k, &s) in starts.iter().enumerate() {
            let end = if k + 1 == starts.len() && x.len() - (s + win.min(x.len())) < win / 2 {
                x.len()
            } else {
                (s + win).min(x.len())
            };
            let f = features(&x[s..end], RATE_HZ);
            beats.push(f.beats);
            feats.push(f.values);
        }
        let probs = self.mlp.predict(&feats)?;
        let classes = Rhythm::ALL.len();
        let mut mean = vec![0f32; classes];
        let mut per_class = vec![0usize; classes];
        for p in &probs {
            for (m, v) in mean.iter_mut().zip(p) {
                *m += v / probs.len() as f32;
            }
            per_class[argmax(p).0] += 1;
        }
        let windows = starts
            .iter()
            .zip(probs)
            .zip(beats)
            .map(|((s, probs), beats)| WindowRead { start_s: *s as f64 / RATE_HZ, probs, beats })
            .collect();
        Ok(EcgRead { probs: mean, windows, windows_per_class: per_class })
    }
}

/// One lead resampled with the readers' band-limited resampler.
pub fn resample(x: &[f32], from_hz: f64, to_hz: f64) -> Vec<f32> {
    use crate::readers::{Ecg, Lead};
    let ecg = Ecg { sample_rate_hz: from_hz as f32, leads: vec![Lead { name: String::new(), millivolts: x.to_vec() }] };
    ecg.resample(to_hz as f32).leads.remove(0).millivolts
}

/// Centred moving mean over `w` samples (edges use the samples available).
fn moving_mean(x: &[f32], w: usize) -> Vec<f32> {
    let n = x.len();
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0f64);
    for v in x {
        prefix.push(prefix.last().unwrap() + *v as f64);
    }
    let h = w / 2;
    (0..n)
        .map(|i| {
            let a = i.saturating_sub(h);
            let b = (i + w - h).min(n);
            ((prefix[b] - prefix[a]) / (b - a) as f64) as f32
        })
        .collect()
}

/// Features of one window, and how many beats were found in it.
pub struct Features {
    pub values: Vec<f32>,
    pub beats: usize,
}

/// R-peak sample indices in a baseline-free signal at `fs`.
pub fn detect_qrs(x: &[f32], fs: f64) -> Vec<usize> {
    let n = x.len();
    if n < 8 {
        return Vec::new();
    }
    // Band-limit: remove < ~5 Hz with a short moving mean, smooth > ~20 Hz.
    let hp: Vec<f32> = x.iter().zip(moving_mean(x, (0.1 * fs) as usize)).map(|(a, b)| a - b).collect();
    let bp = moving_mean(&hp, ((0.016 * fs) as usize).max(1));
    let mut energy = vec![0f32; n];
    for i in 2..n - 2 {
        let d = (2.0 * bp[i + 2] + bp[i + 1] - bp[i - 1] - 2.0 * bp[i - 2]) * fs as f32 / 8.0;
        energy[i] = d * d;
    }
    let integ = moving_mean(&energy, (0.12 * fs) as usize);
    // Candidate peaks: local maxima, non-maximum suppressed over 250 ms, largest first.
    let refractory = (0.25 * fs) as usize;
    let mut order: Vec<usize> = (1..n - 1).filter(|&i| integ[i] >= integ[i - 1] && integ[i] > integ[i + 1]).collect();
    order.sort_by(|&a, &b| integ[b].total_cmp(&integ[a]).then(a.cmp(&b)));
    let mut taken: Vec<usize> = Vec::new();
    for i in order {
        if taken.iter().all(|&t| t.abs_diff(i) > refractory) {
            taken.push(i);
        }
    }
    if taken.is_empty() {
        return Vec::new();
    }
    // Threshold relative to a typical (not the largest) beat, so big ectopic beats
    // do not hide normal ones.
    let mut vals: Vec<f32> = taken.iter().map(|&i| integ[i]).collect();
    vals.sort_by(|a, b| b.total_cmp(a));
    let top = &vals[..vals.len().min((WINDOW_S * 3.5) as usize).max(1)];
    let reference = top[top.len() / 4];
    let thr = 0.2 * reference;
    let mut peaks: Vec<usize> = taken.into_iter().filter(|&i| integ[i] >= thr).collect();
    peaks.sort_unstable();
    // Locate the R peak: the largest |signal| within ±80 ms of the energy peak.
    let reach = (0.08 * fs) as usize;
    let mut r: Vec<usize> = peaks
        .iter()
        .map(|&p| {
            let (a, b) = (p.saturating_sub(reach + (0.06 * fs) as usize), (p + reach).min(n - 1));
            (a..=b).max_by(|&i, &j| hp[i].abs().total_cmp(&hp[j].abs()).then(j.cmp(&i))).unwrap_or(p)
        })
        .collect();
    r.dedup_by(|a, b| a.abs_diff(*b) < refractory / 2);
    r
}

/// The feature vector of one window of baseline-carrying signal at `fs`.
pub fn features(raw: &[f32], fs: f64) -> Features {
    let x: Vec<f32> = {
        let base = moving_mean(&moving_mean(raw, (0.6 * fs) as usize), (0.3 * fs) as usize);
        raw.iter().zip(base).map(|(a, b)| a - b).collect()
    };
    let r = detect_qrs(&x, fs);
    let dur = x.len() as f64 / fs;
    let mut f = vec![0f32; FEATURES];
    f[17] = (r.len() as f64 / dur * 60.0 / 100.0) as f32;
    if r.len() < 3 {
        // Too few beats: only the beat count speaks (asystole, noise, very slow).
        return Features { values: f, beats: r.len() };
    }
    let rr: Vec<f64> = r.windows(2).map(|w| (w[1] - w[0]) as f64 / fs).collect();
    let mean_rr = rr.iter().sum::<f64>() / rr.len() as f64;
    let med_rr = median(&rr);
    let sd_rr = (rr.iter().map(|v| (v - mean_rr).powi(2)).sum::<f64>() / rr.len() as f64).sqrt();
    let drr: Vec<f64> = rr.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
    let rmssd = if drr.is_empty() { 0.0 } else { (drr.iter().map(|d| d * d).sum::<f64>() / drr.len() as f64).sqrt() };
    let irregular =
        if drr.is_empty() { 0.0 } else { drr.iter().filter(|d| **d > 0.1 * med_rr).count() as f64 / drr.len() as f64 };
    let premature: Vec<bool> = (0..rr.len())
        .map(|i| rr[i] < 0.85 * med_rr && rr.get(i + 1).is_some_and(|next| *next > 1.1 * med_rr))
        .collect();
    // Beat morphology around each R: ±100 ms.
    let h = (0.1 * fs) as usize;
    let segs: Vec<&[f32]> = r.iter().filter(|&&p| p >= h && p + h < x.len()).map(|&p| &x[p - h..p + h]).collect();
    let mut template = vec![0f32; 2 * h];
    let mut corr = Vec::new();
    let mut widths = Vec::new();
    let mut amps = Vec::new();
    if !segs.is_empty() {
        for (k, t) in template.iter_mut().enumerate() {
            let mut col: Vec<f64> = segs.iter().map(|s| s[k] as f64).collect();
            *t = median_mut(&mut col) as f32;
        }
        for s in &segs {
            corr.push(pearson(s, &template));
            let peak = s.iter().fold(0f32, |m, v| m.max(v.abs()));
            amps.push(peak as f64);
            widths.push(s.iter().filter(|v| v.abs() > 0.3 * peak).count() as f64 / fs);
        }
    }
    let outlier = corr.iter().filter(|c| **c < 0.75).count() as f64 / corr.len().max(1) as f64;
    let min_corr = corr.iter().copied().fold(1.0f64, f64::min);
    let med_w = median(&widths).max(1e-3);
    let wide = widths.iter().filter(|w| **w > 1.5 * med_w).count() as f64 / widths.len().max(1) as f64;
    let max_w = widths.iter().copied().fold(0.0, f64::max) / med_w;
    let med_a = median(&amps).max(1e-3);
    let max_a = amps.iter().copied().fold(0.0, f64::max) / med_a;
    // Premature AND different in shape: the PVC signature. Beat i+1 ends interval i.
    let beat_off = r.iter().position(|&p| p >= h).unwrap_or(0);
    let pvc_like = premature
        .iter()
        .enumerate()
        .filter(|(i, p)| **p && corr.get((i + 1).wrapping_sub(beat_off)).is_some_and(|c| *c < 0.8))
        .count() as f64
        / rr.len() as f64;
    // P wave on the median of a longer window around typical beats: 250..80 ms before R.
    let (pa, pb, lead) = ((0.25 * fs) as usize, (0.08 * fs) as usize, (0.3 * fs) as usize);
    let normal: Vec<usize> = r
        .iter()
        .zip(corr.iter().chain(std::iter::repeat(&1.0)))
        .filter(|(p, c)| **c >= 0.9 && **p >= lead && **p + h < x.len())
        .map(|(p, _)| *p)
        .collect();
    let mut p_index = 0.0;
    let mut residual = 0.0;
    if !normal.is_empty() {
        let mut pseg = vec![0f64; pa - pb];
        for (k, v) in pseg.iter_mut().enumerate() {
            let mut col: Vec<f64> = normal.iter().map(|&p| x[p - pa + k] as f64).collect();
            *v = median_mut(&mut col);
        }
        // Detrend with the line between the ends, then the largest bump.
        let (a, b) = (pseg[0], pseg[pseg.len() - 1]);
        let m = pseg.len() as f64;
        let bump = pseg.iter().enumerate().map(|(i, v)| (v - (a + (b - a) * i as f64 / m)).abs()).fold(0.0, f64::max);
        p_index = bump / med_a;
        // Baseline activity between beats (f-waves, noise): per-beat pre-P segment
        // minus the median, relative to the R amplitude.
        let mut acc = 0.0;
        let mut cnt = 0.0;
        for &p in &normal {
            for (k, med) in pseg.iter().enumerate() {
                acc += (x[p - pa + k] as f64 - med).powi(2);
                cnt += 1.0;
            }
        }
        residual = (acc / cnt).sqrt() / med_a;
    }
    let values = [
        60.0 / med_rr / 100.0,
        60.0 / mean_rr / 100.0,
        sd_rr / mean_rr,
        rmssd / mean_rr,
        irregular,
        premature.iter().filter(|p| **p).count() as f64 / rr.len() as f64,
        outlier,
        min_corr,
        wide,
        max_w,
        max_a,
        pvc_like,
        p_index,
        residual,
        rr.iter().copied().fold(0.0, f64::max) / med_rr,
        rr.iter().copied().fold(f64::INFINITY, f64::min) / med_rr,
        median(&drr) / med_rr,
    ];
    for (o, v) in f.iter_mut().zip(values) {
        *o = if v.is_finite() { v as f32 } else { 0.0 };
    }
    Features { values: f, beats: r.len() }
}

fn median(v: &[f64]) -> f64 {
    let mut c = v.to_vec();
    median_mut(&mut c)
}

fn median_mut(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1
}

fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().map(|v| *v as f64).sum::<f64>() / n, b.iter().map(|v| *v as f64).sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (*x as f64 - ma, *y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa <= 0.0 || sbb <= 0.0 { 0.0 } else { sab / (saa * sbb).sqrt() }
}

// ----- training -----

/// Which split a data-set index belongs to: 70 % train, 15 % calibration, 15 % test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Calibrate,
    Test,
}

pub fn split_of(index: u64) -> Split {
    // Hash the index (splitmix64) so the split is independent of the class, which
    // the generators take from `index % classes`.
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    match z % 20 {
        0..=13 => Split::Train,
        14..=16 => Split::Calibrate,
        _ => Split::Test,
    }
}

/// Settings of one training run (the defaults are what the shipped weights used).
#[derive(Debug, Clone)]
pub struct EcgTraining {
    pub seed: u64,
    pub records: u64,
    pub epochs: usize,
    /// Real training examples added to the synthetic training split
    /// ([`super::real::ecg_examples`]); calibration and the test split stay synthetic.
    pub real: super::real::Examples,
}

impl Default for EcgTraining {
    fn default() -> Self {
        EcgTraining { seed: 1, records: 3000, epochs: 600, real: Default::default() }
    }
}

/// One synthetic training example, regenerated from (`seed`, `index`) alone.
pub fn example(seed: u64, index: u64) -> (Vec<f32>, u32) {
    let mut rng = synth::rng_for(seed, index);
    let rhythm = Rhythm::ALL[(index % Rhythm::ALL.len() as u64) as usize];
    let rate = COMMON_RATES_HZ[rng.random_range(0..COMMON_RATES_HZ.len())];
    let rec = synth::ecg(&mut rng, rhythm, WINDOW_S, rate);
    let x = resample(&rec.millivolts, rate, RATE_HZ);
    (features(&x, RATE_HZ).values, rhythm as u32)
}

/// What a training run produced and measured.
#[derive(Debug, Clone)]
pub struct Trained {
    pub model: EcgModel,
    pub before: Metrics,
    pub after: Metrics,
}

pub fn dataset(seed: u64, records: u64, split: Split) -> (Vec<Vec<f32>>, Vec<u32>) {
    (0..records).filter(|i| split_of(*i) == split).map(|i| example(seed, i)).unzip()
}

/// Trains, calibrates and measures the ECG model.
pub fn train(t: &EcgTraining) -> Result<Trained, ModelError> {
    let (mut xtr, mut ytr) = dataset(t.seed, t.records, Split::Train);
    xtr.extend(t.real.0.iter().cloned());
    ytr.extend(t.real.1.iter().copied());
    let (xca, yca) = dataset(t.seed, t.records, Split::Calibrate);
    let (xte, yte) = dataset(t.seed, t.records, Split::Test);
    let spec =
        TrainSpec { hidden: vec![32, 32], epochs: t.epochs, learning_rate: 0.01, weight_decay: 1e-3, seed: t.seed };
    let mut mlp = Mlp::train(&xtr, &ytr, Rhythm::ALL.len(), &spec)?;
    let before = Metrics::of(&mlp.predict(&xte)?, &yte, Rhythm::ALL.len());
    mlp.fit_temperature(&xca, &yca)?;
    let after = Metrics::of(&mlp.predict(&xte)?, &yte, Rhythm::ALL.len());
    Ok(Trained { model: EcgModel { mlp }, before, after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let m = EcgModel::shipped().unwrap();
        assert!(m.read_lead(&[0.0; 100], 250.0).is_err(), "too short");
        assert!(m.read_lead(&[0.0; 5000], f64::NAN).is_err(), "no rate");
        assert!(m.read_lead(&[0.0; 5000], 1.0e9).is_err(), "absurd rate");
        assert!(m.read(&crate::readers::Ecg { sample_rate_hz: 500.0, leads: vec![] }).is_err());
        // A flat line and a line of NaN are read (no beats), not a crash.
        let flat = m.read_lead(&[0.0; 2500], 250.0).unwrap();
        assert_eq!(flat.windows[0].beats, 0);
        let nan = m.read_lead(&[f32::NAN; 2500], 250.0).unwrap();
        assert!(nan.probs.iter().all(|p| p.is_finite()));
    }

    #[test]
    fn a_record_is_read_in_ten_second_windows_with_a_short_tail_folded_in() {
        let m = EcgModel::shipped().unwrap();
        let mut rng = synth::rng_for(3, 3);
        let rec = synth::ecg(&mut rng, Rhythm::NormalSinus, 34.0, 250.0);
        let read = m.read_lead(&rec.millivolts, 250.0).unwrap();
        assert_eq!(read.windows.len(), 3);
        assert_eq!(read.windows_per_class.iter().sum::<usize>(), 3);
    }
}
