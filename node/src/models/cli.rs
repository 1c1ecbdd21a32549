//! The `models` and `classify` commands of `telemed-node`: train a model
//! reproducibly, benchmark the shipped ones, and say what they read in a file.
//!
//! This module must never change a node's state: it reads files and writes only the
//! weights file it is asked to write.

use super::{ModelKind, ecg, version_of};
use std::fmt::Write as _;
use std::path::Path;

/// Trains `kind` with `seed` on its synthetic data plus the training part of the real
/// files in `real_data` ([`super::real`]), writes `DIR/KIND.safetensors`, and returns
/// a Markdown summary of the held-out metrics, synthetic and real (what the model
/// card quotes).
pub fn train(kind: ModelKind, out: &Path, seed: u64, real_data: &Path) -> Result<String, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let started = std::time::Instant::now();
    let (bytes, report) = match kind {
        ModelKind::Ecg => {
            let real = super::real::ecg_examples(real_data, seed)?;
            let real_count = real.1.len();
            let t = ecg::EcgTraining { seed, real, ..Default::default() };
            let trained = ecg::train(&t).map_err(|e| e.to_string())?;
            let bytes = trained.model.mlp.to_safetensors().map_err(|e| e.to_string())?;
            let names: Vec<&str> = super::synth::Rhythm::ALL.iter().map(|r| r.label()).collect();
            let report = metrics_table(&names, &trained.before, &trained.after, trained.model.mlp.temperature);
            (
                bytes,
                format!(
                    "records: {} synthetic 10 s windows plus {real_count} augmented real windows (seed {seed})\n\
                 synthetic test split:\n{report}",
                    t.records
                ),
            )
        }
        ModelKind::Imaging => {
            let real = super::real::imaging_examples(real_data, seed)?;
            let real_count = real.1.len();
            let t = super::imaging::ImagingTraining { seed, real, ..Default::default() };
            let tr = super::imaging::train(&t).map_err(|e| e.to_string())?;
            let bytes = tr.model.to_bytes().map_err(|e| e.to_string())?;
            let kind =
                metrics_table(&super::imaging::KINDS, &tr.kind_before, &tr.kind_after, tr.model.kind.temperature);
            let quality = metrics_table(
                &super::imaging::QUALITY,
                &tr.quality_before,
                &tr.quality_after,
                tr.model.quality.temperature,
            );
            (
                bytes,
                format!(
                    "images: {} synthetic phantoms plus {real_count} augmented real images (seed {seed})\n\n\
                     synthetic test split, kind:\n{kind}\nquality:\n{quality}",
                    t.images
                ),
            )
        }
        ModelKind::Pathology => {
            let real = super::real::tile_examples(real_data, seed)?;
            let real_count = real.1.len();
            let t = super::pathology::PathologyTraining { seed, real, ..Default::default() };
            let tr = super::pathology::train(&t).map_err(|e| e.to_string())?;
            let bytes = tr.model.to_bytes().map_err(|e| e.to_string())?;
            let tissue = metrics_table(
                &super::pathology::TISSUE,
                &tr.tissue_before,
                &tr.tissue_after,
                tr.model.tissue.temperature,
            );
            let quality = metrics_table(
                &super::pathology::QUALITY,
                &tr.quality_before,
                &tr.quality_after,
                tr.model.quality.temperature,
            );
            (
                bytes,
                format!(
                    "tiles: {} synthetic tiles plus {real_count} augmented real tiles (seed {seed})\n\n\
                     synthetic test split, tissue:\n{tissue}\nquality:\n{quality}",
                    t.tiles
                ),
            )
        }
    };
    let report = format!("{report}\n{}", super::real::held_out_report(kind, &bytes, real_data)?);
    let path = out.join(kind.file_name());
    std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "wrote {} ({} bytes, version {}) in {:.1} s\n{report}",
        path.display(),
        bytes.len(),
        version_of(kind, &bytes),
        started.elapsed().as_secs_f64()
    ))
}

/// A Markdown table of per-class precision and recall after calibration, with the
/// expected calibration error before and after temperature scaling.
pub fn metrics_table(names: &[&str], before: &super::mlp::Metrics, after: &super::mlp::Metrics, t: f32) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| class | precision | recall | test support |\n|---|---|---|---|");
    for (k, name) in names.iter().enumerate() {
        let _ = writeln!(s, "| {name} | {:.3} | {:.3} | {} |", after.precision[k], after.recall[k], after.support[k]);
    }
    let _ = writeln!(
        s,
        "\naccuracy {:.3}; temperature {t:.3}; ECE before scaling {:.4}, after {:.4}",
        after.accuracy, before.ece, after.ece
    );
    s
}

/// Measures the shipped models' inference time (see docs/benchmarks.md): the
/// median and 95th percentile over `iterations` reads of each model's standard
/// input, on the calling thread (one core).
pub fn bench(iterations: u32) -> Result<String, String> {
    use super::local::{Input, LocalModel, standard_input};
    let mut s = String::new();
    let _ = writeln!(s, "| model | input | median | p95 | reads/s (one core) |\n|---|---|---|---|---|");
    for kind in ModelKind::ALL {
        let model = LocalModel::shipped(kind).map_err(|e| e.to_string())?;
        let input = standard_input(kind);
        let raw_tile: Option<Vec<u8>> = match &input {
            Input::Tiles(_) => Some((0..256 * 256 * 3).map(|i| (150 + (i * 7919) % 90) as u8).collect()),
            _ => None,
        };
        let mut times = Vec::new();
        for _ in 0..iterations.max(1) {
            let t = std::time::Instant::now();
            match &raw_tile {
                // A tile is timed from its decoded 256×256 RGB: reduction, features, networks.
                Some(rgb) => {
                    let tile = super::inputs::shrink_tile(rgb, 256, 256, super::inputs::TILE_SIDE);
                    model.read_input(&Input::Tiles(vec![tile])).map_err(|e| e.to_string())?;
                }
                None => {
                    model.read_input(&input).map_err(|e| e.to_string())?;
                }
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times[times.len() / 2];
        let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
        let what = match kind {
            ModelKind::Ecg => "10 s 12-lead ECG, 500 Hz",
            ModelKind::Imaging => "one image (192×192 after the reader)",
            ModelKind::Pathology => "one 256×256 RGB tile",
        };
        let _ = writeln!(s, "| {} | {what} | {median:.3} ms | {p95:.3} ms | {:.0} |", kind.name(), 1000.0 / median);
    }
    Ok(s)
}

/// What the models read in `file`.
pub fn classify(file: &Path, config: Option<&crate::config::Config>) -> Result<String, String> {
    let input = super::local::load_input(file)?;
    let kind = input.kind();
    let weights = match config.and_then(|c| c.models.iter().find(|m| m.kind == kind.name())) {
        Some(m) if m.weights.is_some() => {
            let p = m.weights.as_ref().expect("checked");
            std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?
        }
        _ => kind.shipped_weights().to_vec(),
    };
    let thresholds = config
        .and_then(|c| c.models.iter().find(|m| m.kind == kind.name()))
        .and_then(|m| m.thresholds)
        .unwrap_or(super::local::default_thresholds(kind));
    let model = super::local::LocalModel::load(kind, &weights).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let reading = model.read_input(&input).map_err(|e| e.to_string())?;
    let took = started.elapsed();
    let mut s = String::new();
    let _ = writeln!(s, "file:     {}", file.display());
    let _ = writeln!(s, "model:    {} {} ({:.2} ms)", kind.name(), reading.version, took.as_secs_f64() * 1000.0);
    let _ = writeln!(s, "read:     {}", reading.summary);
    let _ = writeln!(s, "labels:");
    for l in &reading.labels {
        let _ = writeln!(s, "  {:<32} {:.3}", l.label, l.confidence);
    }
    let decisive = reading.labels.first().map_or(0.0, |l| l.confidence);
    for (urgency, t) in federation_proto::Urgency::ALL.iter().zip(thresholds) {
        let verdict = if decisive >= t { "resolve here (machine report)" } else { "send up with this finding" };
        let _ = writeln!(s, "{:<9} threshold {t:.2}: {verdict}", format!("{urgency}:"));
    }
    Ok(s)
}
