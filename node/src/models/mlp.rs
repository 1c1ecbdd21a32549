//! The one network shape every local model uses: a small multi-layer perceptron on
//! hand-made, scale-free features, trained with candle and stored as safetensors.
//!
//! Training here is deterministic: weights start from a seeded ChaCha RNG (candle's
//! own CPU initialisers cannot be seeded), batches are full-batch, and the feature
//! normalisation, temperature and class count live in the same safetensors file as
//! the weights, so a file is a complete model. This module must never read files
//! or the clock: callers hand it bytes and numbers.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Why a model file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("model file: {0}")]
    Format(String),
    #[error("model file is for {found} inputs, this code computes {expected}")]
    Shape { expected: usize, found: usize },
    #[error("input: {0}")]
    Input(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A trained, calibrated classifier: `softmax(mlp((x - mean) / std) / temperature)`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `(weight [out, in], bias [out])` per layer; ReLU between layers.
    layers: Vec<(Tensor, Tensor)>,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Fitted on a held-out calibration split (1.0 before fitting).
    pub temperature: f32,
}

/// Training settings for [`Mlp::train`].
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Mlp {
    pub fn inputs(&self) -> usize {
        self.mean.len()
    }
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |(w, _)| w.dims()[0])
    }

    /// Trains on `x` (rows of features) and class indices `y` with AdamW, full batch.
    pub fn train(x: &[Vec<f32>], y: &[u32], classes: usize, spec: &TrainSpec) -> Result<Mlp, ModelError> {
        let n = x.len();
        let d = x.first().map_or(0, |r| r.len());
        if n == 0 || d == 0 || y.len() != n {
            return Err(ModelError::Input("empty or mismatched training set".into()));
        }
        let (mean, std) = norm_stats(x);
        let dev = Device::Cpu;
        let xs = Tensor::from_vec(normalise_rows(x, &mean, &std), (n, d), &dev)?;
        let ys = Tensor::from_vec(y.to_vec(), n, &dev)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
        let mut sizes = vec![d];
        sizes.extend(&spec.hidden);
        sizes.push(classes);
        let mut vars = Vec::new();
        for pair in sizes.windows(2) {
            let (i, o) = (pair[0], pair[1]);
            // He-uniform initialisation from the seeded RNG.
            let bound = (6.0 / i as f64).sqrt() as f32;
            let w: Vec<f32> = (0..i * o).map(|_| rng.random_range(-bound..bound)).collect();
            vars.push(Var::from_tensor(&Tensor::from_vec(w, (o, i), &dev)?)?);
            vars.push(Var::from_tensor(&Tensor::zeros(o, DType::F32, &dev)?)?);
        }
        let params = ParamsAdamW { lr: spec.learning_rate, weight_decay: spec.weight_decay, ..Default::default() };
        let mut opt = candle_nn::AdamW::new(vars.clone(), params)?;
        for _ in 0..spec.epochs {
            let logits = forward_raw(&xs, vars.chunks(2).map(|p| (p[0].as_tensor(), p[1].as_tensor())))?;
            let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
            opt.backward_step(&loss)?;
        }
        let layers = vars.chunks(2).map(|p| (p[0].as_tensor().detach(), p[1].as_tensor().detach())).collect();
        Ok(Mlp { layers, mean, std, temperature: 1.0 })
    }

    /// Raw logits (before temperature) for each row.
    pub fn logits(&self, x: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let d = self.inputs();
        if let Some(bad) = x.iter().find(|r| r.len() != d) {
            return Err(ModelError::Shape { expected: d, found: bad.len() });
        }
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let xs = Tensor::from_vec(normalise_rows(x, &self.mean, &self.std), (x.len(), d), &Device::Cpu)?;
        let out = forward_raw(&xs, self.layers.iter().map(|(w, b)| (w, b)))?;
        Ok(out.to_vec2::<f32>()?)
    }

    /// Calibrated class probabilities for each row.
    pub fn predict(&self, x: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        Ok(self.logits(x)?.iter().map(|l| softmax(l, self.temperature)).collect())
    }

    /// Fits the temperature that minimises the negative log-likelihood on a held-out
    /// split (a 1-D search over a log grid, then a finer one around the best).
    pub fn fit_temperature(&mut self, x: &[Vec<f32>], y: &[u32]) -> Result<(), ModelError> {
        let logits = self.logits(x)?;
        let nll = |t: f32| -> f64 {
            logits.iter().zip(y).map(|(l, &c)| -(softmax(l, t)[c as usize].max(1e-12) as f64).ln()).sum::<f64>()
        };
        let mut best = (f64::INFINITY, 1.0f32);
        for k in 0..=60 {
            let t = 10f32.powf(-1.0 + 2.0 * k as f32 / 60.0);
            let v = nll(t);
            if v < best.0 {
                best = (v, t);
            }
        }
        let centre = best.1;
        for k in 0..=40 {
            let t = centre * 10f32.powf(-0.05 + 0.1 * k as f32 / 40.0);
            let v = nll(t);
            if v < best.0 {
                best = (v, t);
            }
        }
        self.temperature = best.1;
        Ok(())
    }

    /// The model as safetensors bytes (names sorted, so the bytes are deterministic).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        serialize(self.tensors("")?)
    }

    /// The named tensors of this model, each name prefixed with `prefix`.
    pub fn tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>, ModelError> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            tensors.push((format!("{prefix}layer{i}.weight"), w.clone()));
            tensors.push((format!("{prefix}layer{i}.bias"), b.clone()));
        }
        let d = self.mean.len();
        tensors.push((format!("{prefix}norm.mean"), Tensor::from_vec(self.mean.clone(), d, &Device::Cpu)?));
        tensors.push((format!("{prefix}norm.std"), Tensor::from_vec(self.std.clone(), d, &Device::Cpu)?));
        tensors.push((format!("{prefix}temperature"), Tensor::from_vec(vec![self.temperature], 1, &Device::Cpu)?));
        Ok(tensors)
    }

    /// Loads a model written by [`Mlp::to_safetensors`]; `inputs` is the feature
    /// count the calling code computes (a mismatch is an error, not a panic).
    pub fn from_safetensors(bytes: &[u8], inputs: usize, classes: usize) -> Result<Mlp, ModelError> {
        Mlp::from_map(&mut load_map(bytes)?, "", inputs, classes)
    }

    /// Takes the tensors named `prefix*` out of `map` and checks their shapes.
    pub fn from_map(
        map: &mut HashMap<String, Tensor>,
        prefix: &str,
        inputs: usize,
        classes: usize,
    ) -> Result<Mlp, ModelError> {
        let mut take = |name: &str| {
            map.remove(&format!("{prefix}{name}"))
                .ok_or_else(|| ModelError::Format(format!("no tensor `{prefix}{name}`")))
        };
        let mean: Vec<f32> = take("norm.mean")?.to_dtype(DType::F32)?.to_vec1()?;
        let std: Vec<f32> = take("norm.std")?.to_dtype(DType::F32)?.to_vec1()?;
        let temperature = take("temperature")?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let temperature = *temperature.first().ok_or_else(|| ModelError::Format("empty temperature".into()))?;
        if mean.len() != inputs || std.len() != inputs {
            return Err(ModelError::Shape { expected: inputs, found: mean.len() });
        }
        if !(temperature.is_finite() && temperature > 0.0) || std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ModelError::Format("temperature or normalisation not positive and finite".into()));
        }
        let mut layers = Vec::new();
        let mut width = inputs;
        for i in 0..16 {
            let Ok(w) = take(&format!("layer{i}.weight")) else { break };
            let b = take(&format!("layer{i}.bias"))?;
            let (w, b) = (w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
            let dims = w.dims().to_vec();
            if dims.len() != 2 || dims[1] != width || b.dims() != [dims[0]] {
                return Err(ModelError::Format(format!("layer {i} has shape {dims:?}, expected [_, {width}]")));
            }
            width = dims[0];
            layers.push((w, b));
        }
        if layers.is_empty() || width != classes {
            return Err(ModelError::Format(format!(
                "{} layers ending in {width} outputs, expected {classes}",
                layers.len()
            )));
        }
        Ok(Mlp { layers, mean, std, temperature })
    }
}

/// Safetensors bytes of named tensors, in name order (deterministic bytes).
pub fn serialize(mut tensors: Vec<(String, Tensor)>) -> Result<Vec<u8>, ModelError> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| ModelError::Format(e.to_string()))
}

/// Every tensor in a safetensors file (errors, never panics, on malformed bytes).
pub fn load_map(bytes: &[u8]) -> Result<HashMap<String, Tensor>, ModelError> {
    // Parse the header with the safetensors crate first: it checks offsets and
    // sizes against the buffer before any tensor is built.
    safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Format(e.to_string()))?;
    Ok(candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?)
}

/// Two models in one file (`a.*` and `b.*` tensors), e.g. a kind and a quality head.
pub fn join_pair(a: &Mlp, b: &Mlp) -> Result<Vec<u8>, ModelError> {
    let mut t = a.tensors("a.")?;
    t.extend(b.tensors("b.")?);
    serialize(t)
}

fn forward_raw<'a>(xs: &Tensor, layers: impl Iterator<Item = (&'a Tensor, &'a Tensor)>) -> candle_core::Result<Tensor> {
    let layers: Vec<_> = layers.collect();
    let mut h = xs.clone();
    for (i, (w, b)) in layers.iter().enumerate() {
        h = h.matmul(&w.t()?)?.broadcast_add(b)?;
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    Ok(h)
}

fn norm_stats(x: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
    let d = x[0].len();
    let n = x.len() as f64;
    let mut mean = vec![0f64; d];
    for r in x {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += *v as f64 / n;
        }
    }
    let mut var = vec![0f64; d];
    for r in x {
        for ((s, v), m) in var.iter_mut().zip(r).zip(&mean) {
            *s += (*v as f64 - m).powi(2) / n;
        }
    }
    (mean.iter().map(|m| *m as f32).collect(), var.iter().map(|v| (v.sqrt() as f32).max(1e-4)).collect())
}

fn normalise_rows(x: &[Vec<f32>], mean: &[f32], std: &[f32]) -> Vec<f32> {
    x.iter()
        .flat_map(|r| r.iter().zip(mean).zip(std).map(|((v, m), s)| if v.is_finite() { (v - m) / s } else { 0.0 }))
        .collect()
}

/// Softmax of `logits / temperature`.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| ((l - m) / temperature).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Held-out quality of a classifier: per-class precision and recall, accuracy, and
/// expected calibration error (10 equal-width confidence bins).
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub accuracy: f32,
    pub precision: Vec<f32>,
    pub recall: Vec<f32>,
    pub support: Vec<usize>,
    pub ece: f32,
}

impl Metrics {
    pub fn of(probs: &[Vec<f32>], y: &[u32], classes: usize) -> Metrics {
        let mut tp = vec![0usize; classes];
        let mut predicted = vec![0usize; classes];
        let mut support = vec![0usize; classes];
        let mut bins = [(0usize, 0f64, 0f64); 10];
        let mut correct = 0usize;
        for (p, &c) in probs.iter().zip(y) {
            let (argmax, conf) = argmax(p);
            predicted[argmax] += 1;
            support[c as usize] += 1;
            let hit = argmax == c as usize;
            if hit {
                tp[argmax] += 1;
                correct += 1;
            }
            let b = ((conf * 10.0) as usize).min(9);
            bins[b].0 += 1;
            bins[b].1 += conf as f64;
            bins[b].2 += if hit { 1.0 } else { 0.0 };
        }
        let n = probs.len().max(1) as f64;
        let ece = bins.iter().filter(|b| b.0 > 0).map(|b| (b.1 - b.2).abs() / n).sum::<f64>() as f32;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f32 / b as f32 };
        Metrics {
            accuracy: ratio(correct, probs.len()),
            precision: (0..classes).map(|k| ratio(tp[k], predicted[k])).collect(),
            recall: (0..classes).map(|k| ratio(tp[k], support[k])).collect(),
            support,
            ece,
        }
    }
}

/// Index and value of the largest entry.
pub fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter().copied().enumerate().fold((0, f32::NEG_INFINITY), |a, (i, v)| if v > a.1 { (i, v) } else { a })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(seed: u64) -> (Vec<Vec<f32>>, Vec<u32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..300 {
            let c = (i % 3) as u32;
            x.push(vec![c as f32 * 2.0 + rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]);
            y.push(c);
        }
        (x, y)
    }

    #[test]
    fn training_is_deterministic_and_round_trips_through_safetensors() {
        let (x, y) = blobs(1);
        let spec = TrainSpec { hidden: vec![8], epochs: 50, learning_rate: 0.05, weight_decay: 0.0, seed: 3 };
        let mut a = Mlp::train(&x, &y, 3, &spec).unwrap();
        let b = Mlp::train(&x, &y, 3, &spec).unwrap();
        a.fit_temperature(&x, &y).unwrap();
        let bytes = a.to_safetensors().unwrap();
        let mut b2 = b.clone();
        b2.temperature = a.temperature;
        assert_eq!(bytes, b2.to_safetensors().unwrap(), "same seed, same bytes");
        let loaded = Mlp::from_safetensors(&bytes, 2, 3).unwrap();
        assert_eq!(loaded.predict(&x).unwrap(), a.predict(&x).unwrap());
        let m = Metrics::of(&loaded.predict(&x).unwrap(), &y, 3);
        assert!(m.accuracy > 0.8, "{m:?}");
    }

    #[test]
    fn malformed_model_files_are_errors_not_panics() {
        assert!(Mlp::from_safetensors(b"not a model", 2, 3).is_err());
        let (x, y) = blobs(2);
        let spec = TrainSpec { hidden: vec![4], epochs: 2, learning_rate: 0.01, weight_decay: 0.0, seed: 1 };
        let bytes = Mlp::train(&x, &y, 3, &spec).unwrap().to_safetensors().unwrap();
        assert!(matches!(Mlp::from_safetensors(&bytes, 5, 3), Err(ModelError::Shape { .. })));
        assert!(Mlp::from_safetensors(&bytes, 2, 4).is_err());
        assert!(Mlp::from_safetensors(&bytes[..bytes.len() / 2], 2, 3).is_err());
    }

    #[test]
    fn ece_is_zero_for_perfectly_calibrated_certainty_and_large_for_confident_errors() {
        let y = vec![0, 1];
        assert_eq!(Metrics::of(&[vec![1.0, 0.0], vec![0.0, 1.0]], &y, 2).ece, 0.0);
        assert!(Metrics::of(&[vec![0.0, 1.0], vec![1.0, 0.0]], &y, 2).ece > 0.9);
    }
}
