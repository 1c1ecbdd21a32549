//! The real recordings of DESIGN.md §8 in training (issue #5, ADR 0007): each real
//! file is split once, by a fixed rule written here, into a part that trains and a
//! part that is only ever measured.
//!
//! | model | trains on (augmented copies) | held out, only measured |
//! |---|---|---|
//! | ECG | MIT-BIH 208 excerpt, first [`ECG_TRAIN_SECONDS`] s, label "ectopic"; `waveform_ecg.dcm`, every lead but II, label "normal sinus rhythm" | 208 after [`ECG_TRAIN_SECONDS`] s; `waveform_ecg.dcm` lead II |
//! | imaging | [`IMAGING_TRAIN`]: a CT (`693_J2KR.dcm`), an obstetric ultrasound (`OBXXXX1A_rle.dcm`), two MR images ("other") | `CT_small.dcm`, `US1_J2KR.dcm`, `RG1_J2KI.dcm` (chest), `RG3_J2KI.dcm` (tibia) |
//! | pathology | CMU slide, tiles in the left half of the grid, tissue label by [`pathology::tissue_share_by_rule`] (clear tiles only) | tiles in the right half |
//!
//! The labels are what the sources document: record 208's rhythm in the MIT-BIH
//! directory is sinus with frequent PVCs (992 of 2,955 beats), so a training window is
//! labelled "ectopic" as a record-level (weak) label; `waveform_ecg.dcm` is a normal
//! 12-lead ECG; an image's class is its DICOM Modality; a tile's tissue label is the
//! documented colour rule. Copies are augmented (sampling rate, gain, noise, baseline
//! wander, crop; flips and brightness for images and tiles), seeded from the training
//! seed, so a run is reproducible byte for byte.
//!
//! This module must never let a held-out part into training: the split is by time,
//! lead, file and tile column, and [`held_out_report`] measures only the other side.

use super::ecg::{self, RATE_HZ, WINDOW_S};
use super::imaging::{self, GrayImage};
use super::pathology::{self, RgbTile};
use super::synth::{COMMON_RATES_HZ, Rhythm, rng_for};
use rand::Rng;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Seconds of the MIT-BIH 208 excerpt (300 s) used for training; the rest is held out.
pub const ECG_TRAIN_SECONDS: f64 = 150.0;
/// The lead of `waveform_ecg.dcm` kept out of training (the lead the model reads).
pub const ECG_HELD_OUT_LEAD: &str = "II";
/// Augmented copies of the 208 training part (each a random 10 s window in it).
pub const ECG_208_COPIES: u64 = 120;
/// Augmented copies of each training lead of `waveform_ecg.dcm`.
pub const ECG_NSR_COPIES_PER_LEAD: u64 = 10;
/// Real DICOM images that train the imaging model, with the class each one is.
pub const IMAGING_TRAIN: [(&str, usize); 4] =
    [("693_J2KR.dcm", 1), ("OBXXXX1A_rle.dcm", 2), ("MR2_J2KI.dcm", 3), ("emri_small.dcm", 3)];
/// Held-out real images and the class each one is (`None`: anything but chest X-ray).
pub const IMAGING_HELD_OUT: [(&str, Option<usize>); 4] =
    [("CT_small.dcm", Some(1)), ("US1_J2KR.dcm", Some(2)), ("RG1_J2KI.dcm", Some(0)), ("RG3_J2KI.dcm", None)];
/// Augmented copies of the real training images of one class (shared among that
/// class's files, so each class weighs the same).
pub const IMAGING_COPIES_PER_CLASS: u64 = 12;
/// Augmented copies of each clear training tile.
pub const TILE_COPIES: u64 = 4;
/// Tissue share (by the rule) at or above which a tile is tissue, and at or below
/// which it is background; tiles in between are left out of training and measuring.
pub const TILE_TISSUE_MIN: f32 = 0.5;
pub const TILE_BACKGROUND_MAX: f32 = 0.05;

/// Stream offsets keep the real examples' random streams apart from the synthetic
/// ones (which use the example index as the stream).
const STREAM_ECG: u64 = 1 << 40;
const STREAM_IMAGING: u64 = 2 << 40;
const STREAM_TILES: u64 = 3 << 40;

/// Feature vectors and labels.
pub type Examples = (Vec<Vec<f32>>, Vec<u32>);

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The two real ECG records, read.
struct RealEcg {
    /// MIT-BIH 208 lead MLII, mV, at its own rate.
    mitdb: (Vec<f32>, f64),
    /// `waveform_ecg.dcm`: (lead name, mV) at its rate.
    leads: (Vec<(String, Vec<f32>)>, f64),
}

fn read_ecgs(dir: &Path) -> Result<RealEcg, String> {
    let m =
        crate::readers::read_scipy_ecg_file(file(dir, "scipy_ecg.dat")).map_err(|e| format!("scipy_ecg.dat: {e}"))?;
    let lead = m.leads.first().ok_or("scipy_ecg.dat has no lead")?;
    let w = crate::readers::read_dicom_ecg_file(file(dir, "waveform_ecg.dcm"))
        .map_err(|e| format!("waveform_ecg.dcm: {e}"))?;
    Ok(RealEcg {
        mitdb: (lead.millivolts.clone(), m.sample_rate_hz as f64),
        leads: (w.leads.iter().map(|l| (l.name.clone(), l.millivolts.clone())).collect(), w.sample_rate_hz as f64),
    })
}

/// One augmented copy of `x` (at `fs`): resampled to a random common rate and back
/// to the model's rate, scaled, with noise and baseline wander; its features.
fn augmented_ecg_features(rng: &mut impl Rng, x: &[f32], fs: f64) -> Vec<f32> {
    let rate = COMMON_RATES_HZ[rng.random_range(0..COMMON_RATES_HZ.len())];
    let gain: f32 = rng.random_range(0.6..1.6);
    let noise: f32 = rng.random_range(0.0..0.03);
    let wander: f32 = rng.random_range(0.0..0.15);
    let wander_hz: f32 = rng.random_range(0.1..0.5);
    let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let at_rate = ecg::resample(x, fs, rate);
    let y: Vec<f32> = at_rate
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let t = i as f32 / rate as f32;
            // Sum of two uniforms: a cheap, bounded, roughly bell-shaped noise.
            let n = (rng.random::<f32>() + rng.random::<f32>() - 1.0) * noise * 2.0;
            v * gain + n + wander * (std::f32::consts::TAU * wander_hz * t + phase).sin()
        })
        .collect();
    ecg::features(&ecg::resample(&y, rate, RATE_HZ), RATE_HZ).values
}

/// The ECG model's real training examples.
pub fn ecg_examples(dir: &Path, seed: u64) -> Result<Examples, String> {
    let real = read_ecgs(dir)?;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let (x, fs) = &real.mitdb;
    let train_end = ((ECG_TRAIN_SECONDS * fs) as usize).min(x.len());
    let win = (WINDOW_S * fs) as usize;
    if train_end < win {
        return Err("scipy_ecg.dat is shorter than one training window".into());
    }
    for i in 0..ECG_208_COPIES {
        let mut rng = rng_for(seed, STREAM_ECG + i);
        let start = rng.random_range(0..=train_end - win);
        xs.push(augmented_ecg_features(&mut rng, &x[start..start + win], *fs));
        ys.push(Rhythm::Ectopic as u32);
    }
    let (leads, fs) = &real.leads;
    for (k, (name, mv)) in leads.iter().enumerate() {
        if name == ECG_HELD_OUT_LEAD {
            continue;
        }
        for i in 0..ECG_NSR_COPIES_PER_LEAD {
            let mut rng = rng_for(seed, STREAM_ECG + 10_000 + (k as u64) * 1000 + i);
            // A crop of 7–10 s, so copies of one 10 s lead differ in their beats.
            let len = ((rng.random_range(7.0..=WINDOW_S)) * fs) as usize;
            let len = len.min(mv.len());
            let start = rng.random_range(0..=mv.len() - len);
            xs.push(augmented_ecg_features(&mut rng, &mv[start..start + len], *fs));
            ys.push(Rhythm::NormalSinus as u32);
        }
    }
    Ok((xs, ys))
}

fn load_image(dir: &Path, name: &str) -> Result<GrayImage, String> {
    let img = crate::readers::read_dicom_image_file(file(dir, name)).map_err(|e| format!("{name}: {e}"))?;
    Ok(super::inputs::image_input(&img).map_err(|e| format!("{name}: {e}"))?.0)
}

/// A random crop (75–100 % of each side), maybe mirrored, with a gamma change and noise.
fn augmented_image(rng: &mut impl Rng, img: &GrayImage) -> GrayImage {
    let cw = ((img.width as f32 * rng.random_range(0.75..=1.0)) as usize).max(8);
    let ch = ((img.height as f32 * rng.random_range(0.75..=1.0)) as usize).max(8);
    let x0 = rng.random_range(0..=img.width - cw);
    let y0 = rng.random_range(0..=img.height - ch);
    let mirror = rng.random_bool(0.5);
    let gamma: f32 = rng.random_range(0.75..1.35);
    let noise: f32 = rng.random_range(0.0..0.03);
    let mut pixels = Vec::with_capacity(cw * ch);
    for y in 0..ch {
        for x in 0..cw {
            let sx = if mirror { x0 + cw - 1 - x } else { x0 + x };
            let v = img.pixels[(y0 + y) * img.width + sx].clamp(0.0, 1.0).powf(gamma);
            let n = (rng.random::<f32>() - 0.5) * 2.0 * noise;
            pixels.push((v + n).clamp(0.0, 1.0));
        }
    }
    GrayImage { width: cw, height: ch, pixels }
}

/// The imaging model's real training examples (kind labels only).
pub fn imaging_examples(dir: &Path, seed: u64) -> Result<Examples, String> {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (f, (name, kind)) in IMAGING_TRAIN.iter().enumerate() {
        let img = load_image(dir, name)?;
        let files_of_class = IMAGING_TRAIN.iter().filter(|(_, k)| k == kind).count() as u64;
        for i in 0..IMAGING_COPIES_PER_CLASS / files_of_class {
            let mut rng = rng_for(seed, STREAM_IMAGING + (f as u64) * 10_000 + i);
            xs.push(imaging::features(&augmented_image(&mut rng, &img)));
            ys.push(*kind as u32);
        }
    }
    Ok((xs, ys))
}

/// The slide's tiles with their grid column and the rule's clear label (`None`
/// for tiles in between), and the number of grid columns.
#[allow(clippy::type_complexity)]
pub fn labelled_tiles(dir: &Path) -> Result<(Vec<(u32, RgbTile, Option<bool>)>, u32), String> {
    let mut slide = crate::readers::Slide::open(file(dir, "cmu_small_region.svs"))
        .map_err(|e| format!("cmu_small_region.svs: {e}"))?;
    let tiles = super::inputs::slide_tiles(&mut slide)?;
    let columns = tiles.iter().map(|((x, _), _)| x + 1).max().unwrap_or(0);
    let out = tiles
        .into_iter()
        .map(|((x, _), t)| {
            let share = pathology::tissue_share_by_rule(&t);
            let label = if share >= TILE_TISSUE_MIN {
                Some(true)
            } else if share <= TILE_BACKGROUND_MAX {
                Some(false)
            } else {
                None
            };
            (x, t, label)
        })
        .collect();
    Ok((out, columns))
}

/// Whether a tile in grid column `x` of `columns` trains (left half) or is held out.
pub fn tile_trains(x: u32, columns: u32) -> bool {
    x < columns / 2
}

/// A tile rotated by a multiple of 90°, maybe mirrored, with its brightness changed.
fn augmented_tile(rng: &mut impl Rng, t: &RgbTile) -> RgbTile {
    let (w, h) = (t.width, t.height);
    let turns = rng.random_range(0..4u8);
    let mirror = rng.random_bool(0.5);
    let gain: f32 = rng.random_range(0.9..1.1);
    let mut rgb = vec![0u8; w * h * 3];
    // Square tiles (the inputs module makes them TILE_SIDE²); a non-square tile is
    // only mirrored.
    let turns = if w == h { turns } else { 0 };
    for y in 0..h {
        for x in 0..w {
            let (mut sx, mut sy) = (x, y);
            for _ in 0..turns {
                (sx, sy) = (sy, w - 1 - sx);
            }
            if mirror {
                sx = w - 1 - sx;
            }
            for c in 0..3 {
                let v = f32::from(t.rgb[(sy * w + sx) * 3 + c]) * gain;
                rgb[(y * w + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbTile { width: w, height: h, rgb }
}

/// The pathology model's real training examples (tissue labels only).
pub fn tile_examples(dir: &Path, seed: u64) -> Result<Examples, String> {
    let (tiles, columns) = labelled_tiles(dir)?;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (k, (x, t, label)) in tiles.iter().enumerate() {
        let Some(tissue) = label else { continue };
        if !tile_trains(*x, columns) {
            continue;
        }
        for i in 0..TILE_COPIES {
            let mut rng = rng_for(seed, STREAM_TILES + (k as u64) * 100 + i);
            xs.push(pathology::features(&augmented_tile(&mut rng, t)));
            ys.push(*tissue as u32);
        }
    }
    if ys.is_empty() {
        return Err("the slide gave no clear training tile".into());
    }
    Ok((xs, ys))
}

/// What a freshly trained model reads on the held-out real parts only, as a
/// Markdown list (what `models train` prints and the model cards quote).
pub fn held_out_report(kind: super::ModelKind, weights: &[u8], dir: &Path) -> Result<String, String> {
    use super::ModelKind;
    let mut s = String::from("real held-out parts (never trained on):\n");
    match kind {
        ModelKind::Ecg => {
            let m = ecg::EcgModel::from_bytes(weights).map_err(|e| e.to_string())?;
            let real = read_ecgs(dir)?;
            let (x, fs) = &real.mitdb;
            let start = (ECG_TRAIN_SECONDS * fs) as usize;
            let read = m.read_lead(&x[start.min(x.len())..], *fs).map_err(|e| e.to_string())?;
            let pvc = read.windows_per_class[Rhythm::Ectopic as usize];
            let _ = writeln!(
                s,
                "- MIT-BIH 208, {ECG_TRAIN_SECONDS:.0}-300 s: ectopic (PVC) in {pvc} of {} windows; windows per class {:?}",
                read.windows.len(),
                read.windows_per_class
            );
            let (leads, fs) = &real.leads;
            let ii = leads.iter().find(|(n, _)| n == ECG_HELD_OUT_LEAD).ok_or("waveform_ecg.dcm has no lead II")?;
            let read = m.read_lead(&ii.1, *fs).map_err(|e| e.to_string())?;
            let (top, p) = read.top();
            let _ = writeln!(s, "- waveform_ecg.dcm lead II: {} ({p:.3})", top.label());
        }
        ModelKind::Imaging => {
            let m = imaging::ImagingModel::from_bytes(weights).map_err(|e| e.to_string())?;
            for (name, truth) in IMAGING_HELD_OUT {
                let read = m.read(&load_image(dir, name)?).map_err(|e| e.to_string())?;
                let (top, p) = read.top();
                let expected = truth.map_or("not chest_xray", |k| imaging::KINDS[k]);
                let _ = writeln!(s, "- {name}: pixels say {top} ({p:.3}); truth {expected}");
            }
        }
        ModelKind::Pathology => {
            let m = pathology::PathologyModel::from_bytes(weights).map_err(|e| e.to_string())?;
            let (tiles, columns) = labelled_tiles(dir)?;
            let held: Vec<_> = tiles.iter().filter(|(x, _, l)| l.is_some() && !tile_trains(*x, columns)).collect();
            let reads =
                m.read(&held.iter().map(|(_, t, _)| t.clone()).collect::<Vec<_>>()).map_err(|e| e.to_string())?;
            let agree = held.iter().zip(&reads).filter(|((_, _, l), r)| Some(r.is_tissue()) == *l).count();
            let tissue = held.iter().filter(|(_, _, l)| *l == Some(true)).count();
            let _ = writeln!(
                s,
                "- CMU slide, right half: {agree} of {} clear tiles agree with the rule ({tissue} tissue, {} background)",
                held.len(),
                held.len() - tissue
            );
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        crate::demo::testdata_dir()
    }

    #[test]
    fn real_examples_are_reproducible_and_never_use_a_held_out_part() {
        let a = ecg_examples(&dir(), 1).unwrap();
        let b = ecg_examples(&dir(), 1).unwrap();
        assert_eq!(a, b, "same seed, same examples");
        assert_eq!(a.0.len() as u64, ECG_208_COPIES + 11 * ECG_NSR_COPIES_PER_LEAD, "lead II is left out");
        assert_ne!(a, ecg_examples(&dir(), 2).unwrap());
        let (tiles, columns) = labelled_tiles(&dir()).unwrap();
        let train_tiles = tiles.iter().filter(|(x, _, l)| l.is_some() && tile_trains(*x, columns)).count();
        assert!(train_tiles >= 10, "{train_tiles} clear training tiles");
        let (xs, _) = tile_examples(&dir(), 1).unwrap();
        assert_eq!(xs.len() as u64, train_tiles as u64 * TILE_COPIES, "only left-half tiles train");
        for (name, _) in IMAGING_TRAIN {
            assert!(IMAGING_HELD_OUT.iter().all(|(h, _)| *h != name), "{name} both trains and is held out");
        }
    }

    #[test]
    fn a_missing_real_file_is_a_clear_error() {
        let empty = tempfile::tempdir().unwrap();
        let e = ecg_examples(empty.path(), 1).unwrap_err();
        assert!(e.contains("scipy_ecg.dat"), "{e}");
        let e = imaging_examples(empty.path(), 1).unwrap_err();
        assert!(e.contains("693_J2KR.dcm"), "{e}");
    }
}
