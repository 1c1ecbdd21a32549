//! Synthetic training data: a physiological ECG generator, and phantom images and
//! H&E-like tiles for the imaging and pathology models.
//!
//! The ECG generator is a beat-template model in the spirit of McSharry's ECGSYN:
//! each beat is a sum of Gaussian waves (P, Q, R, S, T) placed around its R time,
//! the T wave moved with the RR interval; the rhythm decides the beat times and
//! which waves are present (sinus with respiratory RR variation; atrial
//! fibrillation with irregularly irregular RR, no P waves and a fibrillatory
//! baseline; premature wide ventricular beats with a compensatory pause), and every
//! record gets noise, baseline wander and mains hum. It is evaluated in continuous
//! time, so it samples at any rate.
//!
//! Every sample is drawn from its own seeded RNG (`seed`, index), so any subset of a
//! data set can be regenerated alone. This module must never be used as evidence of
//! accuracy on its own: every claim is also measured on real recordings.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f64::consts::PI;

/// The rhythm classes of the ECG model, in output order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rhythm {
    NormalSinus = 0,
    AtrialFibrillation = 1,
    Bradycardia = 2,
    Tachycardia = 3,
    Ectopic = 4,
}

impl Rhythm {
    pub const ALL: [Rhythm; 5] =
        [Rhythm::NormalSinus, Rhythm::AtrialFibrillation, Rhythm::Bradycardia, Rhythm::Tachycardia, Rhythm::Ectopic];
    /// The label this class carries in findings and reports.
    pub fn label(self) -> &'static str {
        match self {
            Rhythm::NormalSinus => "normal_sinus_rhythm",
            Rhythm::AtrialFibrillation => "atrial_fibrillation",
            Rhythm::Bradycardia => "sinus_bradycardia",
            Rhythm::Tachycardia => "sinus_tachycardia",
            Rhythm::Ectopic => "ectopic_beats_pvc",
        }
    }
}

/// A per-sample RNG: sample `index` of the data set seeded by `seed`.
pub fn rng_for(seed: u64, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(index);
    r
}

/// One Gaussian wave of a beat: amplitude (mV), centre (s from R) and width (s).
#[derive(Debug, Clone, Copy)]
struct Wave {
    amp: f64,
    at: f64,
    width: f64,
}

/// One beat placed at time `t` (its R peak).
#[derive(Debug, Clone)]
struct Beat {
    t: f64,
    waves: Vec<Wave>,
}

/// The morphology of one simulated lead for one record.
struct Morph {
    p: f64,
    q: f64,
    r: f64,
    s: f64,
    t: f64,
    qrs_w: f64,
    pr: f64,
}

fn morph(rng: &mut ChaCha8Rng) -> Morph {
    let r: f64 = rng.random_range(0.5..2.0);
    Morph {
        p: rng.random_range(0.06..0.25) * r.sqrt(),
        q: -rng.random_range(0.0..0.15) * r,
        r,
        s: -rng.random_range(0.05..0.45) * r,
        // Mostly upright T; some leads have flat or inverted T.
        t: if rng.random_bool(0.85) { rng.random_range(0.1..0.5) } else { -rng.random_range(0.05..0.3) } * r.sqrt(),
        qrs_w: rng.random_range(0.008..0.014),
        pr: rng.random_range(0.14..0.2),
    }
}

fn sinus_beat(m: &Morph, t: f64, rr: f64, p_wave: bool) -> Beat {
    let qt_shift = 0.22 + 0.12 * rr.clamp(0.3, 2.0).sqrt();
    let mut waves = vec![
        Wave { amp: m.q, at: -2.5 * m.qrs_w, width: m.qrs_w },
        Wave { amp: m.r, at: 0.0, width: m.qrs_w },
        Wave { amp: m.s, at: 2.5 * m.qrs_w, width: m.qrs_w * 1.1 },
        Wave { amp: m.t, at: qt_shift, width: 0.045 + 0.02 * rr.min(1.5) },
    ];
    if p_wave {
        waves.push(Wave { amp: m.p, at: -m.pr, width: 0.025 });
    }
    Beat { t, waves }
}

fn pvc_beat(rng: &mut ChaCha8Rng, m: &Morph, t: f64) -> Beat {
    let sign = if rng.random_bool(0.6) { 1.0 } else { -1.0 };
    let amp = m.r.abs().max(0.6) * rng.random_range(1.1..2.2) * sign;
    let w = rng.random_range(0.025..0.045);
    Beat {
        t,
        waves: vec![
            Wave { amp, at: 0.0, width: w },
            Wave { amp: -amp * rng.random_range(0.2..0.6), at: 2.2 * w, width: w * 1.2 },
            Wave { amp: -amp * rng.random_range(0.25..0.5), at: rng.random_range(0.28..0.36), width: 0.06 },
        ],
    }
}

/// A synthetic single-lead ECG: its samples (mV) at `sample_rate_hz`, and its class.
#[derive(Debug, Clone)]
pub struct SynthEcg {
    pub sample_rate_hz: f64,
    pub millivolts: Vec<f32>,
    pub rhythm: Rhythm,
    /// Heart rate the generator aimed at (beats per minute).
    pub target_bpm: f64,
}

/// Sampling rates clinics' devices commonly use.
pub const COMMON_RATES_HZ: [f64; 5] = [250.0, 360.0, 500.0, 1000.0, 128.0];

/// Generates one record of `seconds` of `rhythm`.
pub fn ecg(rng: &mut ChaCha8Rng, rhythm: Rhythm, seconds: f64, sample_rate_hz: f64) -> SynthEcg {
    let m = morph(rng);
    let bpm = match rhythm {
        Rhythm::NormalSinus => rng.random_range(62.0..98.0),
        Rhythm::Bradycardia => rng.random_range(32.0..56.0),
        Rhythm::Tachycardia => rng.random_range(105.0..175.0),
        Rhythm::AtrialFibrillation => rng.random_range(55.0..150.0),
        Rhythm::Ectopic => rng.random_range(50.0..110.0),
    };
    let rr0 = 60.0 / bpm;
    let mut beats = Vec::new();
    // Start before 0 so the record opens mid-rhythm.
    let mut t = -rng.random_range(0.0..rr0);
    let resp_hz = rng.random_range(0.15..0.35);
    let rsa = rng.random_range(0.0..0.05);
    let pvc_rate = rng.random_range(0.08..0.35);
    let mut last_pvc = false;
    let mut pvcs = 0usize;
    while t < seconds + 1.0 {
        let rr = match rhythm {
            Rhythm::AtrialFibrillation => {
                let cv = rng.random_range(0.12..0.3);
                (rr0 * (1.0 + cv * gauss(rng))).clamp(0.28, 2.0)
            }
            _ => rr0 * (1.0 + rsa * (2.0 * PI * resp_hz * t).sin() + 0.015 * gauss(rng)),
        };
        let premature = rhythm == Rhythm::Ectopic && t > 0.3 && !last_pvc && rng.random_bool(pvc_rate);
        if premature {
            let coupling = rr * rng.random_range(0.45..0.72);
            beats.push(pvc_beat(rng, &m, t + coupling));
            pvcs += 1;
            last_pvc = true;
            // Compensatory pause: the next sinus beat comes two cycles after the last one.
            t += 2.0 * rr;
        } else {
            last_pvc = false;
            beats.push(sinus_beat(&m, t, rr, rhythm != Rhythm::AtrialFibrillation));
            t += rr;
        }
    }
    if rhythm == Rhythm::Ectopic && pvcs == 0 {
        // Make sure the record shows what its label says: one PVC mid-record.
        let mid = beats.iter().position(|b| b.t > seconds / 2.0).unwrap_or(1).max(1);
        let t_pvc = beats[mid - 1].t + rr0 * 0.6;
        beats.insert(mid, pvc_beat(rng, &m, t_pvc));
    }
    // Noise sources.
    let noise = rng.random_range(0.002..0.04);
    let wander = (rng.random_range(0.0..0.4), rng.random_range(0.05..0.5), rng.random_range(0.0..2.0 * PI));
    let mains_hz = if rng.random_bool(0.5) { 50.0 } else { 60.0 };
    let mains = if rng.random_bool(0.4) { rng.random_range(0.0..0.05) } else { 0.0 };
    let fib: Vec<(f64, f64, f64)> = if rhythm == Rhythm::AtrialFibrillation {
        let a = rng.random_range(0.01..0.1);
        (0..3)
            .map(|_| (a * rng.random_range(0.3..1.0), rng.random_range(4.0..9.0), rng.random_range(0.0..2.0 * PI)))
            .collect()
    } else {
        Vec::new()
    };
    let n = (seconds * sample_rate_hz).round() as usize;
    let mut out = Vec::with_capacity(n);
    let mut first = 0usize;
    for i in 0..n {
        let x = i as f64 / sample_rate_hz;
        while first < beats.len() && beats[first].t < x - 1.0 {
            first += 1;
        }
        let mut v = 0.0;
        for b in beats[first..].iter().take_while(|b| b.t < x + 0.5) {
            for w in &b.waves {
                let d = (x - b.t - w.at) / w.width;
                if d.abs() < 6.0 {
                    v += w.amp * (-0.5 * d * d).exp();
                }
            }
        }
        v += wander.0 * (2.0 * PI * wander.1 * x + wander.2).sin();
        v += mains * (2.0 * PI * mains_hz * x).sin();
        for (a, f, ph) in &fib {
            v += a * (2.0 * PI * f * x + ph + 0.8 * (2.0 * PI * 0.3 * x).sin()).sin();
        }
        v += noise * gauss(rng);
        out.push(v as f32);
    }
    SynthEcg { sample_rate_hz, millivolts: out, rhythm, target_bpm: bpm }
}

/// A standard normal draw (Box–Muller).
pub fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(1e-12..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_hits_its_rate_and_pvc_records_show_ectopic_beats() {
        let mut rng = rng_for(5, 0);
        let rec = ecg(&mut rng, Rhythm::Bradycardia, 10.0, 360.0);
        assert_eq!(rec.millivolts.len(), 3600);
        assert!(rec.target_bpm < 60.0);
        let f = crate::models::ecg::features(&rec.millivolts, 360.0);
        let bpm = f.values[0] * 100.0;
        assert!((bpm as f64 - rec.target_bpm).abs() < 8.0, "{bpm} vs {}", rec.target_bpm);
        let mut rng = rng_for(5, 1);
        let pvc = ecg(&mut rng, Rhythm::Ectopic, 10.0, 250.0);
        let f = crate::models::ecg::features(&pvc.millivolts, 250.0);
        // Its PVCs show as premature beats or as beats unlike the median beat.
        assert!(f.values[5] > 0.0 || f.values[6] > 0.0, "no ectopic sign: {:?}", f.values);
    }

    #[test]
    fn same_seed_and_index_give_the_same_record() {
        let a = ecg(&mut rng_for(9, 3), Rhythm::AtrialFibrillation, 5.0, 500.0);
        let b = ecg(&mut rng_for(9, 3), Rhythm::AtrialFibrillation, 5.0, 500.0);
        assert_eq!(a.millivolts, b.millivolts);
        let c = ecg(&mut rng_for(9, 4), Rhythm::AtrialFibrillation, 5.0, 500.0);
        assert_ne!(a.millivolts, c.millivolts);
    }
}
