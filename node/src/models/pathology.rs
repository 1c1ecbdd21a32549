//! The pathology tile model: tissue vs background for each tile of a slide, and a
//! tile-quality flag (adequate, blurred, pen mark, over-exposed).
//!
//! A tile (RGB, any size) is reduced to colour and texture features: channel means
//! and spreads, saturation, optical density, the share of near-white, pen-coloured
//! and clipped pixels, sharpness, and a 4×4 colour thumbnail. Two small candle MLPs
//! read them, trained on synthetic H&E-like tiles ([`tile`]) and temperature-scaled
//! on a held-out split.
//!
//! This module must never make a diagnosis: it tells where the tissue is and
//! whether a tile is fit to read, so a slide reaches a pathologist with its
//! quality known. Its read is a finding, never a report on its own.

use super::ecg::{Split, split_of};
use super::mlp::{Metrics, Mlp, ModelError, TrainSpec, argmax};
use super::synth::{gauss, rng_for};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub const TISSUE: [&str; 2] = ["background", "tissue"];
pub const QUALITY: [&str; 4] = ["tile_adequate", "tile_blurred", "tile_pen_mark", "tile_overexposed"];
const GLOBAL: usize = 15;
pub const FEATURES: usize = GLOBAL + 4 * 4 * 3;
pub static WEIGHTS: &[u8] = include_bytes!("../../models/pathology.safetensors");

/// An RGB tile, 8 bits per channel, row-major `[r, g, b, r, g, b, ...]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbTile {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// The two models.
#[derive(Debug, Clone)]
pub struct PathologyModel {
    pub tissue: Mlp,
    pub quality: Mlp,
}

/// The model's read of one tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileRead {
    pub tissue_probs: Vec<f32>,
    pub quality_probs: Vec<f32>,
}

impl TileRead {
    pub fn is_tissue(&self) -> bool {
        self.tissue_probs[1] >= 0.5
    }
    pub fn quality(&self) -> (&'static str, f32) {
        let (i, p) = argmax(&self.quality_probs);
        (QUALITY[i], p)
    }
}

impl PathologyModel {
    pub fn shipped() -> Result<PathologyModel, ModelError> {
        PathologyModel::from_bytes(WEIGHTS)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<PathologyModel, ModelError> {
        let mut map = super::mlp::load_map(bytes)?;
        Ok(PathologyModel {
            tissue: Mlp::from_map(&mut map, "a.", FEATURES, TISSUE.len())?,
            quality: Mlp::from_map(&mut map, "b.", FEATURES, QUALITY.len())?,
        })
    }
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        super::mlp::join_pair(&self.tissue, &self.quality)
    }
    pub fn read(&self, tiles: &[RgbTile]) -> Result<Vec<TileRead>, ModelError> {
        for t in tiles {
            if t.width < 8 || t.height < 8 || t.rgb.len() != t.width * t.height * 3 {
                return Err(ModelError::Input(format!("tile {}×{} is too small or inconsistent", t.width, t.height)));
            }
        }
        let f: Vec<Vec<f32>> = tiles.iter().map(features).collect();
        let tissue = self.tissue.predict(&f)?;
        let quality = self.quality.predict(&f)?;
        Ok(tissue.into_iter().zip(quality).map(|(t, q)| TileRead { tissue_probs: t, quality_probs: q }).collect())
    }
}

/// The documented reference rule for tissue (used to label real tiles in tests and
/// the model card): the share of pixels whose optical density summed over the
/// three channels exceeds 0.3 (not white glass) and whose saturation exceeds 0.1.
pub fn tissue_share_by_rule(t: &RgbTile) -> f32 {
    let n = t.width * t.height;
    let hits = t
        .rgb
        .chunks_exact(3)
        .filter(|p| {
            let od: f32 = p.iter().map(|&c| -((c as f32 + 1.0) / 256.0).log10()).sum();
            od > 0.3 && saturation(p) > 0.1
        })
        .count();
    hits as f32 / n as f32
}

fn saturation(p: &[u8]) -> f32 {
    let max = p.iter().copied().max().unwrap_or(0) as f32;
    let min = p.iter().copied().min().unwrap_or(0) as f32;
    if max <= 0.0 { 0.0 } else { (max - min) / max }
}

pub fn features(t: &RgbTile) -> Vec<f32> {
    let n = (t.width * t.height) as f32;
    let mut mean = [0f32; 3];
    let mut sq = [0f32; 3];
    let (mut sat, mut od, mut white, mut pen, mut clipped, mut dark) = (0f32, 0f32, 0f32, 0f32, 0f32, 0f32);
    for p in t.rgb.chunks_exact(3) {
        for c in 0..3 {
            let v = p[c] as f32 / 255.0;
            mean[c] += v;
            sq[c] += v * v;
        }
        sat += saturation(p);
        od += p.iter().map(|&c| -((c as f32 + 1.0) / 256.0).log10()).sum::<f32>();
        let (r, g, b) = (p[0] as i32, p[1] as i32, p[2] as i32);
        if r > 215 && g > 215 && b > 215 {
            white += 1.0;
        }
        if r >= 250 && g >= 250 && b >= 250 {
            clipped += 1.0;
        }
        // Ink: blue or green dominant (H&E is red/purple: red is never far below blue).
        if (b > r + 40 && b > g) || (g > r + 15 && g > b + 5) {
            pen += 1.0;
        }
        if r + g + b < 150 {
            dark += 1.0;
        }
    }
    let mut f = Vec::with_capacity(FEATURES);
    for c in 0..3 {
        let m = mean[c] / n;
        f.push(m);
        f.push((sq[c] / n - m * m).max(0.0).sqrt());
    }
    // Sharpness: mean |Laplacian| of grey relative to its spread.
    let grey: Vec<f32> = t.rgb.chunks_exact(3).map(|p| (p[0] as f32 + p[1] as f32 + p[2] as f32) / 765.0).collect();
    let (w, h) = (t.width, t.height);
    let mut lap = 0f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let c = grey[y * w + x];
            lap +=
                (4.0 * c - grey[y * w + x - 1] - grey[y * w + x + 1] - grey[(y - 1) * w + x] - grey[(y + 1) * w + x])
                    .abs();
        }
    }
    lap /= ((w - 2) * (h - 2)) as f32;
    let gmean = grey.iter().sum::<f32>() / n;
    let gstd = (grey.iter().map(|v| (v - gmean).powi(2)).sum::<f32>() / n).sqrt();
    // The same at half resolution (2×2 means): pixel noise averages out there, so
    // blur shows even on a noisy scan.
    let (w2, h2) = (w / 2, h / 2);
    let g2: Vec<f32> = (0..w2 * h2)
        .map(|i| {
            let (x, y) = (2 * (i % w2), 2 * (i / w2));
            (grey[y * w + x] + grey[y * w + x + 1] + grey[(y + 1) * w + x] + grey[(y + 1) * w + x + 1]) / 4.0
        })
        .collect();
    let mut lap2 = 0f32;
    for y in 1..h2.saturating_sub(1) {
        for x in 1..w2.saturating_sub(1) {
            let c = g2[y * w2 + x];
            lap2 +=
                (4.0 * c - g2[y * w2 + x - 1] - g2[y * w2 + x + 1] - g2[(y - 1) * w2 + x] - g2[(y + 1) * w2 + x]).abs();
        }
    }
    lap2 /= (w2.saturating_sub(2) * h2.saturating_sub(2)).max(1) as f32;
    f.extend([sat / n, od / n, white / n, pen / n, clipped / n, dark / n, lap / gstd.max(0.01), lap * 10.0]);
    f.push(lap2 / gstd.max(0.01));
    // 4×4 colour thumbnail.
    for ty in 0..4 {
        for tx in 0..4 {
            let (x0, x1, y0, y1) = (tx * w / 4, (tx + 1) * w / 4, ty * h / 4, (ty + 1) * h / 4);
            let mut s = [0f32; 3];
            for y in y0..y1 {
                for x in x0..x1 {
                    for (c, sc) in s.iter_mut().enumerate() {
                        *sc += t.rgb[(y * w + x) * 3 + c] as f32;
                    }
                }
            }
            let cnt = ((x1 - x0) * (y1 - y0)).max(1) as f32 * 255.0;
            f.extend(s.iter().map(|v| v / cnt));
        }
    }
    debug_assert_eq!(f.len(), FEATURES);
    f
}

// ----- synthetic tiles -----

/// Draws a synthetic tile: `tissue` decides the content; `quality` (index into
/// [`QUALITY`]) the defect applied.
pub fn tile(rng: &mut ChaCha8Rng, tissue: bool, quality: usize) -> RgbTile {
    let size = rng.random_range(48..=96usize);
    let (w, h) = (size, size);
    let mut px = vec![[0f32; 3]; w * h];
    let glass = [rng.random_range(228.0..252.0), rng.random_range(228.0..252.0), rng.random_range(230.0..254.0)];
    for p in px.iter_mut() {
        *p = glass;
    }
    // Tissue occupies the whole tile, or for background tiles at most a sliver.
    let eosin = [rng.random_range(200.0..245.0), rng.random_range(120.0..190.0), rng.random_range(170.0..225.0)];
    let hema = [rng.random_range(60.0..150.0), rng.random_range(40.0..110.0), rng.random_range(120.0..200.0)];
    let nuclei = if tissue { rng.random_range(5..60) } else { 0 };
    let edge = if tissue { rng.random_range(-0.3..0.0) } else { rng.random_range(0.93..1.2) };
    let (fx, fy) = (rng.random_range(0.05..0.4f32), rng.random_range(0.05..0.4f32));
    for y in 0..h {
        for x in 0..w {
            let u = x as f32 / w as f32;
            if u < edge {
                continue;
            }
            // Stroma with fibres and pale holes (lumens, fat).
            let fibre = ((x as f32 * fx + (y as f32 * fy).sin() * 3.0).sin() * 0.5 + 0.5) * 0.35;
            let k = 0.65 + fibre;
            px[y * w + x] =
                [eosin[0] * k + 255.0 * (1.0 - k), eosin[1] * k + 255.0 * (1.0 - k), eosin[2] * k + 255.0 * (1.0 - k)];
        }
    }
    for _ in 0..nuclei {
        let (cx, cy) = (rng.random_range(0.0..w as f32), rng.random_range(0.0..h as f32));
        let (rx, ry) = (rng.random_range(1.5..4.5), rng.random_range(1.5..4.5));
        if cx / (w as f32) < edge {
            continue;
        }
        for y in (cy - ry).max(0.0) as usize..((cy + ry) as usize).min(h) {
            for x in (cx - rx).max(0.0) as usize..((cx + rx) as usize).min(w) {
                if ((x as f32 - cx) / rx).powi(2) + ((y as f32 - cy) / ry).powi(2) <= 1.0 {
                    px[y * w + x] = hema;
                }
            }
        }
    }
    match quality {
        1 => {
            let r = rng.random_range(2..5);
            for _ in 0..2 {
                box_blur(&mut px, w, h, r);
            }
        }
        2 => {
            // A pen stroke: a thick band of blue, green or black ink.
            let ink = match rng.random_range(0..3) {
                0 => [rng.random_range(20.0..80.0), rng.random_range(40.0..110.0), rng.random_range(150.0..230.0)],
                1 => [rng.random_range(20.0..80.0), rng.random_range(120.0..190.0), rng.random_range(60.0..120.0)],
                _ => [rng.random_range(10.0..50.0), rng.random_range(10.0..50.0), rng.random_range(10.0..60.0)],
            };
            let (a, b) = (rng.random_range(-1.0..1.0f32), rng.random_range(0.0..h as f32));
            let thick = rng.random_range(0.15..0.4) * h as f32;
            for y in 0..h {
                for x in 0..w {
                    if ((y as f32 - a * x as f32 - b).abs()) < thick {
                        let p = &mut px[y * w + x];
                        for c in 0..3 {
                            p[c] = p[c] * 0.25 + ink[c] * 0.75;
                        }
                    }
                }
            }
        }
        3 => {
            let gain = rng.random_range(1.4..2.2);
            for p in px.iter_mut() {
                for c in p.iter_mut() {
                    *c = 255.0 - (255.0 - *c) / gain + 40.0;
                }
            }
        }
        _ => {}
    }
    let noise = rng.random_range(1.0..6.0);
    let rgb =
        px.iter().flat_map(|p| p.map(|c| (c + noise * gauss(rng) as f32).round().clamp(0.0, 255.0) as u8)).collect();
    RgbTile { width: w, height: h, rgb }
}

fn box_blur(px: &mut [[f32; 3]], w: usize, h: usize, r: usize) {
    let src = px.to_vec();
    for y in 0..h {
        for x in 0..w {
            let mut s = [0f32; 3];
            let mut n = 0.0;
            for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                    for c in 0..3 {
                        s[c] += src[yy * w + xx][c];
                    }
                    n += 1.0;
                }
            }
            px[y * w + x] = s.map(|v| v / n);
        }
    }
}

// ----- training -----

#[derive(Debug, Clone)]
pub struct PathologyTraining {
    pub seed: u64,
    pub tiles: u64,
    pub epochs: usize,
    /// Real training examples for the first head ([`super::real`]); calibration and
    /// the test split stay synthetic.
    pub real: super::real::Examples,
}

impl Default for PathologyTraining {
    fn default() -> Self {
        PathologyTraining { seed: 1, tiles: 2400, epochs: 300, real: Default::default() }
    }
}

/// One synthetic example: features, tissue (0/1), quality class.
pub fn example(seed: u64, index: u64) -> (Vec<f32>, u32, u32) {
    let mut rng = rng_for(seed, index);
    let tissue = index % 2 == 1;
    let quality = if rng.random_bool(0.5) { 0 } else { rng.random_range(1..4) };
    let t = tile(&mut rng, tissue, quality);
    (features(&t), tissue as u32, quality as u32)
}

pub struct TrainedPathology {
    pub model: PathologyModel,
    pub tissue_before: Metrics,
    pub tissue_after: Metrics,
    pub quality_before: Metrics,
    pub quality_after: Metrics,
}

#[allow(clippy::type_complexity)]
fn dataset(seed: u64, n: u64, split: Split) -> (Vec<Vec<f32>>, Vec<u32>, Vec<u32>) {
    let mut x = Vec::new();
    let mut a = Vec::new();
    let mut b = Vec::new();
    for i in (0..n).filter(|i| split_of(*i) == split) {
        let (f, t, q) = example(seed, i);
        x.push(f);
        a.push(t);
        b.push(q);
    }
    (x, a, b)
}

pub fn train(t: &PathologyTraining) -> Result<TrainedPathology, ModelError> {
    let (xtr, ttr, qtr) = dataset(t.seed, t.tiles, Split::Train);
    // Real tiles train the tissue head only (their quality is not labelled).
    let (mut xt, mut tt) = (xtr.clone(), ttr.clone());
    xt.extend(t.real.0.iter().cloned());
    tt.extend(t.real.1.iter().copied());
    let (xca, tca, qca) = dataset(t.seed, t.tiles, Split::Calibrate);
    let (xte, tte, qte) = dataset(t.seed, t.tiles, Split::Test);
    let spec = TrainSpec { hidden: vec![24], epochs: t.epochs, learning_rate: 0.01, weight_decay: 1e-3, seed: t.seed };
    let mut tissue = Mlp::train(&xt, &tt, TISSUE.len(), &spec)?;
    let mut quality = Mlp::train(&xtr, &qtr, QUALITY.len(), &TrainSpec { seed: t.seed + 1, ..spec })?;
    let tissue_before = Metrics::of(&tissue.predict(&xte)?, &tte, TISSUE.len());
    let quality_before = Metrics::of(&quality.predict(&xte)?, &qte, QUALITY.len());
    tissue.fit_temperature(&xca, &tca)?;
    quality.fit_temperature(&xca, &qca)?;
    let tissue_after = Metrics::of(&tissue.predict(&xte)?, &tte, TISSUE.len());
    let quality_after = Metrics::of(&quality.predict(&xte)?, &qte, QUALITY.len());
    Ok(TrainedPathology {
        model: PathologyModel { tissue, quality },
        tissue_before,
        tissue_after,
        quality_before,
        quality_after,
    })
}
