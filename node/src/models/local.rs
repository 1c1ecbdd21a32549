//! The models a node runs, loaded once, and what they read in files.
//!
//! [`LocalModels`] loads each configured model's safetensors (the shipped weights
//! or a file named in `[[models]]`), measures its inference time on this machine,
//! and turns a file into a [`Reading`]: labels with calibrated confidences, the
//! decisive one first, ready to become a `tiers::ModelOutcome`.
//!
//! This module must never decide what a confidence means for a case: thresholds
//! are compared by the `tiers` core.

use super::ecg::EcgModel;
use super::imaging::{GrayImage, ImagingModel, KIND_OTHER, KINDS};
use super::pathology::{PathologyModel, RgbTile};
use super::synth::Rhythm;
use super::{ModelError, ModelKind, version_of};
use federation_proto::Label;
use std::path::Path;
use std::time::{Duration, Instant};

/// Default confidence a model needs to sign a machine report alone, per urgency
/// `[stat, urgent, routine]`. Pathology tile reads are never a report alone (>1).
/// The ECG STAT threshold sits above every read of the real recordings (the MIT-BIH
/// 208 read is 0.988): a STAT ECG goes to a human unless a node sets it lower.
pub fn default_thresholds(kind: ModelKind) -> [f32; 3] {
    match kind {
        ModelKind::Ecg => [0.995, 0.93, 0.90],
        ModelKind::Imaging => [0.98, 0.95, 0.90],
        ModelKind::Pathology => [1.01, 1.01, 1.01],
    }
}

/// What a model read in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub kind: ModelKind,
    pub version: String,
    /// The decisive label first (its confidence is what thresholds compare), then
    /// details (other classes, quality).
    pub labels: Vec<Label>,
    /// One line for people.
    pub summary: String,
}

/// One loaded model.
#[derive(Debug, Clone)]
pub enum Loaded {
    Ecg(EcgModel),
    Imaging(ImagingModel),
    Pathology(PathologyModel),
}

/// A loaded model with its version and its measured speed.
#[derive(Debug, Clone)]
pub struct LocalModel {
    pub kind: ModelKind,
    pub version: String,
    pub model: Loaded,
    /// Median inference time on a standard input on this machine.
    pub read_time: Duration,
}

impl LocalModel {
    /// Loads `kind` from `weights` and measures it on a standard synthetic input.
    pub fn load(kind: ModelKind, weights: &[u8]) -> Result<LocalModel, ModelError> {
        let model = match kind {
            ModelKind::Ecg => Loaded::Ecg(EcgModel::from_bytes(weights)?),
            ModelKind::Imaging => Loaded::Imaging(ImagingModel::from_bytes(weights)?),
            ModelKind::Pathology => Loaded::Pathology(PathologyModel::from_bytes(weights)?),
        };
        let mut m = LocalModel { kind, version: version_of(kind, weights), model, read_time: Duration::ZERO };
        m.read_time = m.measure(5)?;
        Ok(m)
    }

    /// The shipped weights of `kind`.
    pub fn shipped(kind: ModelKind) -> Result<LocalModel, ModelError> {
        LocalModel::load(kind, kind.shipped_weights())
    }

    /// Median time of `runs` reads of a standard input: a 10 s 12-lead ECG at
    /// 500 Hz, a 512×512 image, or one 256×256 tile.
    pub fn measure(&self, runs: usize) -> Result<Duration, ModelError> {
        let input = standard_input(self.kind);
        let mut times = Vec::new();
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            self.read_input(&input)?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times[times.len() / 2])
    }

    /// Cases per hour one worker reads (for the core's `ModelSpec`).
    pub fn cases_per_hour(&self) -> u32 {
        let ms = self.read_time.as_secs_f64() * 1000.0;
        (3_600_000.0 / ms.max(0.001)).min(u32::MAX as f64) as u32
    }

    pub fn read_input(&self, input: &Input) -> Result<Reading, ModelError> {
        match (&self.model, input) {
            (Loaded::Ecg(m), Input::Ecg(ecg)) => {
                let read = m.read(ecg)?;
                let mut order: Vec<usize> = (0..read.probs.len()).collect();
                order.sort_by(|a, b| read.probs[*b].total_cmp(&read.probs[*a]));
                let labels = order
                    .iter()
                    .map(|&i| Label { label: Rhythm::ALL[i].label().into(), confidence: read.probs[i] })
                    .collect();
                let counts: Vec<String> = read
                    .windows_per_class
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(i, n)| format!("{} {n}", Rhythm::ALL[i].label()))
                    .collect();
                let (top, p) = read.top();
                Ok(self.reading(
                    labels,
                    format!(
                        "{} ({p:.3}); {} window(s) of 10 s: {}",
                        top.label(),
                        read.windows.len(),
                        counts.join(", ")
                    ),
                ))
            }
            (Loaded::Imaging(m), Input::Image((img, header))) => {
                let read = m.read(img)?;
                let (kind, p) = read.recognised();
                // The DICOM header may contradict the pixels (e.g. a radiograph of a
                // knee looks like no phantom the model knows): then the read is
                // capped below every threshold and says why.
                let header_kind = header.kind();
                let (top, tp) = read.top();
                // Pixels that say "other" agree with a header that says "other"
                // (e.g. a radiograph of a tibia): not a contradiction to report.
                let both_other = top == KINDS[KIND_OTHER] && header_kind == Some(KINDS[KIND_OTHER]);
                let disagrees = header.contradicts(kind) && !both_other;
                let p = if disagrees { p.min(0.5) } else { p };
                let (quality, q) = read.quality();
                let labels = vec![
                    Label { label: kind.into(), confidence: p },
                    Label { label: KINDS[KIND_OTHER].into(), confidence: read.kind_probs[KIND_OTHER] },
                    Label { label: quality.into(), confidence: q },
                ];
                let mut labels = labels;
                if let (true, Some(h)) = (disagrees, header_kind) {
                    labels.push(Label { label: format!("dicom_header_says_{h}"), confidence: 1.0 });
                }
                let summary = if let (true, Some(h)) = (disagrees, header_kind) {
                    format!(
                        "pixels say {kind} ({p:.3}) but the DICOM header says {h}: not decisive; {quality} ({q:.3})"
                    )
                } else if top == KINDS[KIND_OTHER] {
                    format!(
                        "not an image this model reads (other {tp:.3}; best known kind {kind} {p:.3}); {quality} ({q:.3})"
                    )
                } else {
                    format!("{kind} ({p:.3}); {quality} ({q:.3})")
                };
                Ok(self.reading(labels, summary))
            }
            (Loaded::Pathology(m), Input::Tiles(tiles)) => {
                let reads = m.read(tiles)?;
                let tissue: Vec<_> = reads.iter().filter(|r| r.is_tissue()).collect();
                let adequate = tissue.iter().filter(|r| r.quality().0 == super::pathology::QUALITY[0]).count();
                let p_tissue = reads.iter().map(|r| r.tissue_probs[1]).fold(0.0, f32::max);
                let share = if tissue.is_empty() { 0.0 } else { adequate as f32 / tissue.len() as f32 };
                let labels = vec![
                    Label { label: "tissue_present".into(), confidence: p_tissue },
                    Label { label: "tissue_tiles_adequate_share".into(), confidence: share },
                ];
                let summary =
                    format!("{} of {} tiles tissue; {adequate} of those adequate quality", tissue.len(), reads.len());
                Ok(self.reading(labels, summary))
            }
            _ => Err(ModelError::Input(format!("the {} model cannot read this input", self.kind.name()))),
        }
    }

    fn reading(&self, labels: Vec<Label>, summary: String) -> Reading {
        Reading { kind: self.kind, version: self.version.clone(), labels, summary }
    }
}

/// A file turned into what a model reads.
#[derive(Debug, Clone)]
pub enum Input {
    Ecg(crate::readers::Ecg),
    Image((GrayImage, super::imaging::Header)),
    Tiles(Vec<RgbTile>),
}

impl Input {
    pub fn kind(&self) -> ModelKind {
        match self {
            Input::Ecg(_) => ModelKind::Ecg,
            Input::Image(_) => ModelKind::Imaging,
            Input::Tiles(_) => ModelKind::Pathology,
        }
    }
}

/// Reads a file with the readers into a model input (by content, not by name).
pub fn load_input(path: &Path) -> Result<Input, String> {
    super::inputs::load(path)
}

/// The standard input of each model's speed figure: a 10 s 12-lead ECG at 500 Hz
/// (synthetic sinus rhythm); a 192×192 image (the size the model reads, after the
/// reader's downsampling); one 256×256 RGB tile after its reduction to 64×64.
pub fn standard_input(kind: ModelKind) -> Input {
    let mut rng = super::synth::rng_for(u64::MAX, 0);
    match kind {
        ModelKind::Ecg => {
            let lead = super::synth::ecg(&mut rng, Rhythm::NormalSinus, 10.0, 500.0);
            let leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
                .iter()
                .map(|n| crate::readers::Lead { name: (*n).into(), millivolts: lead.millivolts.clone() })
                .collect();
            Input::Ecg(crate::readers::Ecg { sample_rate_hz: 500.0, leads })
        }
        ModelKind::Imaging => {
            let img = super::imaging::phantom(&mut rng, 0, false);
            Input::Image((img.resize(192, 192), super::imaging::Header::default()))
        }
        ModelKind::Pathology => {
            let t = super::pathology::tile(&mut rng, true, 0);
            // Enlarge to 256×256 (nearest neighbour), then reduce as slide tiles are.
            let mut rgb = Vec::with_capacity(256 * 256 * 3);
            for y in 0..256 {
                for x in 0..256 {
                    let (sx, sy) = (x * t.width / 256, y * t.height / 256);
                    rgb.extend_from_slice(&t.rgb[(sy * t.width + sx) * 3..(sy * t.width + sx) * 3 + 3]);
                }
            }
            Input::Tiles(vec![super::inputs::shrink_tile(&rgb, 256, 256, super::inputs::TILE_SIDE)])
        }
    }
}
