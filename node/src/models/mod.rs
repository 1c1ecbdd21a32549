//! Local AI triage: small CPU models (candle) that read a case's attachments and
//! say what they see with a calibrated confidence.
//!
//! - [`ecg`]: rhythm (normal sinus, atrial fibrillation, brady-, tachycardia,
//!   ectopic beats) from one lead or twelve, at any common sampling rate;
//! - [`imaging`]: modality / body part (chest X-ray, CT, ultrasound, other) and an
//!   image-quality flag;
//! - [`pathology`]: tissue vs background per tile and a tile-quality flag.
//!
//! Every model is an [`mlp::Mlp`] on hand-made features, trained from synthetic data
//! ([`synth`]) by `telemed-node models train KIND` and shipped as safetensors under
//! `node/models/`; model cards are in `docs/models/`. [`runtime`] runs them for the
//! daemon off the async runtime with bounded concurrency.
//!
//! This module must never decide where a case goes: it returns labels and
//! confidences; the `tiers` core compares them with the urgency's threshold.

pub mod cli;
pub mod ecg;
pub mod imaging;
pub mod inputs;
pub mod local;
pub mod mlp;
pub mod pathology;
pub mod real;
pub mod synth;

use federation_proto::Modality;
use sha2::{Digest, Sha256};

pub use mlp::ModelError;

/// The kinds of local model this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Ecg,
    Imaging,
    Pathology,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [ModelKind::Ecg, ModelKind::Imaging, ModelKind::Pathology];
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Ecg => "ecg",
            ModelKind::Imaging => "imaging",
            ModelKind::Pathology => "pathology",
        }
    }
    pub fn modality(self) -> Modality {
        match self {
            ModelKind::Ecg => Modality::Ecg,
            ModelKind::Imaging => Modality::Imaging,
            ModelKind::Pathology => Modality::Pathology,
        }
    }
    /// The reading task it covers (the daemon's default task for the modality).
    pub fn task(self) -> &'static str {
        match self {
            ModelKind::Ecg => "ecg.rhythm",
            ModelKind::Imaging => "imaging.triage",
            ModelKind::Pathology => "pathology.triage",
        }
    }
    /// The weights compiled into this binary.
    pub fn shipped_weights(self) -> &'static [u8] {
        match self {
            ModelKind::Ecg => ecg::WEIGHTS,
            ModelKind::Imaging => imaging::WEIGHTS,
            ModelKind::Pathology => pathology::WEIGHTS,
        }
    }
    /// The file name `models train` writes.
    pub fn file_name(self) -> String {
        format!("{}.safetensors", self.name())
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown model `{s}` (expected ecg, imaging or pathology)"))
    }
}

/// A model's version: its architecture name and the first bytes of its weights'
/// SHA-256, so a report names exactly the weights that read it.
pub fn version_of(kind: ModelKind, weights: &[u8]) -> String {
    let h = Sha256::digest(weights);
    format!("{}-mlp-1+{}", kind.name(), hex::encode(&h[..6]))
}

#[cfg(test)]
mod tests {
    use super::ecg::{Split, split_of};
    use super::*;

    /// Held-out (test-split) examples `0..n` of a model's data set.
    fn held_out<T>(n: usize, example: impl Fn(u64) -> T) -> Vec<T> {
        (0u64..).filter(|i| split_of(*i) == Split::Test).take(n).map(example).collect()
    }

    #[test]
    fn shipped_ecg_weights_load_and_score_held_out_records_as_the_card_says() {
        let model = ecg::EcgModel::shipped().unwrap();
        let (x, y): (Vec<_>, Vec<_>) = held_out(40, |i| ecg::example(1, i)).into_iter().unzip();
        let m = mlp::Metrics::of(&model.mlp.predict(&x).unwrap(), &y, 5);
        // The card: accuracy 0.977 on all 432 test records.
        assert!(m.accuracy >= 0.9, "{m:?}");
    }

    #[test]
    fn shipped_imaging_and_pathology_weights_load_and_score_held_out_examples() {
        let img = imaging::ImagingModel::shipped().unwrap();
        let ex = held_out(60, |i| imaging::example(1, i));
        let x: Vec<_> = ex.iter().map(|e| e.0.clone()).collect();
        let kinds: Vec<u32> = ex.iter().map(|e| e.1).collect();
        let m = mlp::Metrics::of(&img.kind.predict(&x).unwrap(), &kinds, imaging::KINDS.len());
        assert!(m.accuracy >= 0.95, "{m:?}");
        let path = pathology::PathologyModel::shipped().unwrap();
        let ex = held_out(60, |i| pathology::example(1, i));
        let x: Vec<_> = ex.iter().map(|e| e.0.clone()).collect();
        let tissue: Vec<u32> = ex.iter().map(|e| e.1).collect();
        let m = mlp::Metrics::of(&path.tissue.predict(&x).unwrap(), &tissue, 2);
        assert!(m.accuracy >= 0.95, "{m:?}");
    }

    #[test]
    fn version_names_the_exact_weights() {
        assert!(version_of(ModelKind::Ecg, ecg::WEIGHTS).starts_with("ecg-mlp-1+"));
        assert_ne!(version_of(ModelKind::Ecg, b"a"), version_of(ModelKind::Ecg, b"b"));
    }

    /// Retrains every model with the shipped seed (synthetic data plus the real
    /// training parts) and checks the bytes are the shipped ones. About two and a
    /// half minutes of CPU in a debug build on the 2-core machine.
    #[test]
    fn retraining_with_the_shipped_seed_reproduces_the_shipped_weights() {
        let dir = tempfile::tempdir().unwrap();
        for kind in ModelKind::ALL {
            cli::train(kind, dir.path(), 1, &crate::demo::testdata_dir()).unwrap();
            let bytes = std::fs::read(dir.path().join(kind.file_name())).unwrap();
            assert!(bytes == kind.shipped_weights(), "{} weights differ from the shipped ones", kind.name());
        }
    }
}
