//! The imaging model: what kind of image this is (chest X-ray, CT slice,
//! ultrasound, or something else it does not read) and whether its quality is
//! adequate (noise, blur, over- or under-exposure).
//!
//! An image (grey levels scaled to 0..1 by its stored bit depth) is reduced to a
//! 16×16 thumbnail of its contrast-normalised pixels plus global features (how much
//! is black background, left-right symmetry, corner darkness, speckle, dynamic
//! range, saturated area, noise and sharpness). Two small candle MLPs read them:
//! one for the kind, one for quality. Both are trained on synthetic phantoms
//! ([`phantom`]) only and temperature-scaled on a held-out split.
//!
//! It is honest about what it cannot judge: "other" is a class of its own (MR,
//! photographs, documents, noise), its probability is reported, and the decisive
//! label is the best *recognised* kind, so an image it does not know gets a low
//! confidence and goes to a person. This module must never read findings (no
//! pneumonia, no fracture): kind and quality only.

use super::mlp::{Metrics, Mlp, ModelError, TrainSpec, argmax};
use super::synth::{gauss, rng_for};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The kinds, in output order.
pub const KINDS: [&str; 4] = ["chest_xray", "ct", "ultrasound", "other"];
pub const KIND_OTHER: usize = 3;
/// Quality classes, in output order.
pub const QUALITY: [&str; 2] = ["image_quality_adequate", "image_quality_poor"];
const THUMB: usize = 16;
const GLOBAL: usize = 14;
pub const FEATURES: usize = THUMB * THUMB + GLOBAL;
pub static WEIGHTS: &[u8] = include_bytes!("../../models/imaging.safetensors");

/// A grey-level image, values 0..1 (0 = black as displayed).
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

impl GrayImage {
    fn at(&self, x: usize, y: usize) -> f32 {
        self.pixels[y * self.width + x]
    }
    /// Area-averaged resize to `w`×`h`.
    pub fn resize(&self, w: usize, h: usize) -> GrayImage {
        let mut out = vec![0f32; w * h];
        for (oy, row) in out.chunks_mut(w).enumerate() {
            let y0 = oy * self.height / h;
            let y1 = ((oy + 1) * self.height / h).max(y0 + 1).min(self.height);
            for (ox, o) in row.iter_mut().enumerate() {
                let x0 = ox * self.width / w;
                let x1 = ((ox + 1) * self.width / w).max(x0 + 1).min(self.width);
                let mut s = 0f32;
                for y in y0..y1 {
                    s += self.pixels[y * self.width + x0..y * self.width + x1].iter().sum::<f32>();
                }
                *o = s / ((y1 - y0) * (x1 - x0)) as f32;
            }
        }
        GrayImage { width: w, height: h, pixels: out }
    }
}

/// What the DICOM header says, where it says it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    pub modality: Option<String>,
    pub body_part: Option<String>,
}

impl Header {
    /// Whether the header contradicts a pixel read of `kind`.
    pub fn contradicts(&self, kind: &str) -> bool {
        match self.kind() {
            Some("radiograph") => kind != "chest_xray",
            Some(h) => h != kind,
            None => false,
        }
    }

    /// The kind (one of [`KINDS`]) the header implies, if it implies one: CT,
    /// US, a CR/DX radiograph of the chest, or "other" for anything else named
    /// (MR, a radiograph of another part, ...); "radiograph" when it names no part.
    pub fn kind(&self) -> Option<&'static str> {
        let m = self.modality.as_deref()?.trim().to_ascii_uppercase();
        let part = self.body_part.as_deref().map(|p| p.trim().to_ascii_uppercase());
        Some(match m.as_str() {
            "CT" => "ct",
            "US" => "ultrasound",
            "CR" | "DX" | "RG" => match part.as_deref() {
                Some("CHEST") | Some("THORAX") => "chest_xray",
                None | Some("") => "radiograph",
                Some(_) => "other",
            },
            "" | "OT" => return None,
            _ => "other",
        })
    }
}

/// The two models.
#[derive(Debug, Clone)]
pub struct ImagingModel {
    pub kind: Mlp,
    pub quality: Mlp,
}

/// What the model read in one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRead {
    pub kind_probs: Vec<f32>,
    pub quality_probs: Vec<f32>,
}

impl ImageRead {
    /// The best recognised kind (never "other") and its probability.
    pub fn recognised(&self) -> (&'static str, f32) {
        let (i, p) = argmax(&self.kind_probs[..KIND_OTHER]);
        (KINDS[i], p)
    }
    pub fn top(&self) -> (&'static str, f32) {
        let (i, p) = argmax(&self.kind_probs);
        (KINDS[i], p)
    }
    pub fn quality(&self) -> (&'static str, f32) {
        let (i, p) = argmax(&self.quality_probs);
        (QUALITY[i], p)
    }
}

impl ImagingModel {
    pub fn shipped() -> Result<ImagingModel, ModelError> {
        ImagingModel::from_bytes(WEIGHTS)
    }
    /// The file holds both networks: the kind (`a.*`) and quality (`b.*`).
    pub fn from_bytes(bytes: &[u8]) -> Result<ImagingModel, ModelError> {
        let mut map = super::mlp::load_map(bytes)?;
        Ok(ImagingModel {
            kind: Mlp::from_map(&mut map, "a.", FEATURES, KINDS.len())?,
            quality: Mlp::from_map(&mut map, "b.", FEATURES, QUALITY.len())?,
        })
    }
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        super::mlp::join_pair(&self.kind, &self.quality)
    }

    pub fn read(&self, image: &GrayImage) -> Result<ImageRead, ModelError> {
        if image.width < 8 || image.height < 8 || image.pixels.len() != image.width * image.height {
            return Err(ModelError::Input(format!(
                "image {}×{} is too small or inconsistent",
                image.width, image.height
            )));
        }
        let f = vec![features(image)];
        Ok(ImageRead {
            kind_probs: self.kind.predict(&f)?.remove(0),
            quality_probs: self.quality.predict(&f)?.remove(0),
        })
    }
}

/// The feature vector of one image.
pub fn features(img: &GrayImage) -> Vec<f32> {
    let small = img.resize(64, 64);
    let mut sorted = small.pixels.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f32| sorted[((sorted.len() - 1) as f32 * q) as usize];
    let (lo, hi) = (pct(0.01), pct(0.99));
    let range = (hi - lo).max(1e-3);
    let norm: Vec<f32> = small.pixels.iter().map(|v| ((v - lo) / range).clamp(0.0, 1.0)).collect();
    let n64 = GrayImage { width: 64, height: 64, pixels: norm };
    let thumb = n64.resize(THUMB, THUMB);
    let mut f = thumb.pixels.clone();
    let frac = |p: &dyn Fn(f32) -> bool| n64.pixels.iter().filter(|v| p(**v)).count() as f32 / n64.pixels.len() as f32;
    let black = frac(&|v| v < 0.08);
    let bright = frac(&|v| v > 0.92);
    let mean = n64.pixels.iter().sum::<f32>() / 4096.0;
    // Left-right symmetry of the thumbnail.
    let mut sym = 0f32;
    for y in 0..THUMB {
        for x in 0..THUMB / 2 {
            sym += (thumb.at(x, y) - thumb.at(THUMB - 1 - x, y)).abs();
        }
    }
    sym /= (THUMB * THUMB / 2) as f32;
    let corners = [(0, 0), (THUMB - 2, 0), (0, THUMB - 2), (THUMB - 2, THUMB - 2)]
        .iter()
        .map(|&(x, y)| (thumb.at(x, y) + thumb.at(x + 1, y) + thumb.at(x, y + 1) + thumb.at(x + 1, y + 1)) / 4.0)
        .fold(0f32, f32::max);
    // Texture at 64×64 on normalised values: mean absolute Laplacian (speckle) and
    // gradient (edges), inside the non-black part.
    let (mut lap, mut grad, mut cnt) = (0f32, 0f32, 0f32);
    for y in 1..63 {
        for x in 1..63 {
            let c = n64.at(x, y);
            if c < 0.08 {
                continue;
            }
            let l = 4.0 * c - n64.at(x - 1, y) - n64.at(x + 1, y) - n64.at(x, y - 1) - n64.at(x, y + 1);
            lap += l.abs();
            grad += (n64.at(x + 1, y) - n64.at(x - 1, y)).abs() + (n64.at(x, y + 1) - n64.at(x, y - 1)).abs();
            cnt += 1.0;
        }
    }
    let (lap, grad) = (lap / cnt.max(1.0), grad / cnt.max(1.0));
    // Quality on the raw image: noise (median |Laplacian| on a centre crop at full
    // resolution, relative to the dynamic range), saturation, dynamic range.
    let (cw, ch) = (img.width.min(128), img.height.min(128));
    let (x0, y0) = ((img.width - cw) / 2, (img.height - ch) / 2);
    let mut lapv = Vec::new();
    for y in y0 + 1..y0 + ch - 1 {
        for x in x0 + 1..x0 + cw - 1 {
            let c = img.at(x, y);
            lapv.push((4.0 * c - img.at(x - 1, y) - img.at(x + 1, y) - img.at(x, y - 1) - img.at(x, y + 1)).abs());
        }
    }
    let noise = if lapv.is_empty() {
        0.0
    } else {
        let mid = lapv.len() / 2;
        *lapv.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1 / range
    };
    let sat_hi = small.pixels.iter().filter(|v| **v >= 0.985).count() as f32 / 4096.0;
    let aspect = (img.width as f32 / img.height as f32).ln();
    f.extend([
        black,
        bright,
        mean,
        sym,
        corners,
        lap,
        grad,
        noise.min(5.0),
        sat_hi,
        range,
        hi,
        lo,
        aspect,
        (img.width.min(img.height) as f32).ln() / 8.0,
    ]);
    debug_assert_eq!(f.len(), FEATURES);
    f
}

// ----- synthetic phantoms -----

/// Draws one phantom of kind `kind` (index into [`KINDS`]) and whether its quality
/// was degraded.
pub fn phantom(rng: &mut ChaCha8Rng, kind: usize, degrade: bool) -> GrayImage {
    let w = rng.random_range(96..=192usize);
    let h = (w as f32 * rng.random_range(0.75..1.3)) as usize;
    let mut img = GrayImage { width: w, height: h, pixels: vec![0.0; w * h] };
    match kind {
        0 => chest_xray(rng, &mut img),
        1 => ct(rng, &mut img),
        2 => ultrasound(rng, &mut img),
        _ => other(rng, &mut img),
    }
    if degrade {
        match rng.random_range(0..4) {
            0 => {
                let sigma = rng.random_range(0.12..0.3);
                add_noise(rng, &mut img, sigma)
            }
            1 => {
                let r = (w.min(h) as f32 * rng.random_range(0.03..0.07)) as usize;
                blur(&mut img, r.max(2));
                blur(&mut img, r.max(2));
            }
            2 => {
                let gain = rng.random_range(2.0..5.0);
                img.pixels.iter_mut().for_each(|v| *v = (*v * gain).min(1.0));
            }
            _ => {
                let gain = rng.random_range(0.04..0.12);
                img.pixels.iter_mut().for_each(|v| *v *= gain);
            }
        }
    } else {
        let sigma = rng.random_range(0.002..0.03);
        add_noise(rng, &mut img, sigma);
        if rng.random_bool(0.3) {
            blur(&mut img, 1);
        }
    }
    // Stored as 12-bit grey levels.
    img.pixels.iter_mut().for_each(|v| *v = (v.clamp(0.0, 1.0) * 4095.0).round() / 4095.0);
    img
}

fn fill(img: &mut GrayImage, f: impl Fn(f32, f32) -> Option<f32>) {
    let (w, h) = (img.width, img.height);
    for y in 0..h {
        for x in 0..w {
            // Coordinates centred, y down, unit = half the width.
            let (u, v) =
                ((x as f32 - w as f32 / 2.0) / (w as f32 / 2.0), (y as f32 - h as f32 / 2.0) / (w as f32 / 2.0));
            if let Some(val) = f(u, v) {
                img.pixels[y * w + x] = val;
            }
        }
    }
}

fn ellipse(u: f32, v: f32, cu: f32, cv: f32, ru: f32, rv: f32) -> bool {
    ((u - cu) / ru).powi(2) + ((v - cv) / rv).powi(2) <= 1.0
}

fn chest_xray(rng: &mut ChaCha8Rng, img: &mut GrayImage) {
    let soft = rng.random_range(0.55..0.8);
    let lung = rng.random_range(0.08..0.3);
    let (lw, lh) = (rng.random_range(0.28..0.38), rng.random_range(0.45..0.7));
    let gap = rng.random_range(0.12..0.2);
    let cy = rng.random_range(-0.15..0.05);
    let heart = (rng.random_range(0.1..0.2), rng.random_range(0.2..0.3));
    let rib_f = rng.random_range(9.0..14.0);
    let rib_a = rng.random_range(0.05..0.15);
    let air = rng.random_range(0.0..0.12);
    let body_w = rng.random_range(0.85..1.1);
    fill(img, |u, v| {
        if u.abs() > body_w && v < 0.9 {
            return Some(air);
        }
        let mut val = soft + 0.1 * (1.0 - u.abs());
        let in_l = ellipse(u, v, -gap - lw, cy, lw, lh) || ellipse(u, v, gap + lw, cy, lw, lh);
        if in_l {
            val = lung + 0.15 * (v - cy + lh) / (2.0 * lh);
            // Ribs: bright arcs across the lung fields.
            let rib = ((v + 0.25 * u * u) * rib_f).sin();
            if rib > 0.6 {
                val += rib_a;
            }
        }
        if ellipse(u, v, 0.08, cy + lh * 0.45, heart.0 + 0.1, heart.1) {
            val = val.max(soft + 0.05);
        }
        if u.abs() < 0.06 {
            val = val.max(soft + 0.12); // spine
        }
        if v > cy + lh * 0.9 {
            val = val.max(soft + 0.05); // diaphragm and abdomen
        }
        Some(val)
    });
    blur(img, 1);
}

fn ct(rng: &mut ChaCha8Rng, img: &mut GrayImage) {
    let (rx, ry) = (rng.random_range(0.55..0.92), rng.random_range(0.4..0.8));
    let head = rng.random_bool(0.3);
    let soft = rng.random_range(0.35..0.6);
    let fat = soft - rng.random_range(0.08..0.2);
    let thorax = !head && rng.random_bool(0.5);
    let ry = if head { rx * rng.random_range(0.95..1.25) } else { ry };
    let blobs: Vec<(f32, f32, f32, f32)> = (0..rng.random_range(2..6))
        .map(|_| {
            (
                rng.random_range(-0.5..0.5),
                rng.random_range(-0.4..0.4),
                rng.random_range(0.05..0.2),
                rng.random_range(-0.12..0.12),
            )
        })
        .collect();
    let table = rng.random_bool(0.7);
    fill(img, |u, v| {
        let r = (u / rx).powi(2) + (v / ry).powi(2);
        if table && (v - ry - 0.08 - 0.05 * u * u).abs() < 0.02 {
            return Some(0.55);
        }
        if r > 1.0 {
            return Some(0.0);
        }
        if head {
            return Some(if r > 0.8 { 0.95 } else { soft });
        }
        let mut val = if r > 0.75 { fat } else { soft };
        for (bu, bv, br, dv) in &blobs {
            if ellipse(u, v, *bu * rx, *bv * ry, *br, *br * 0.8) {
                val = soft + dv;
            }
        }
        if thorax
            && (ellipse(u, v, -0.45 * rx, -0.05, 0.3 * rx, 0.55 * ry)
                || ellipse(u, v, 0.45 * rx, -0.05, 0.3 * rx, 0.55 * ry))
        {
            val = 0.04;
        }
        if ellipse(u, v, 0.0, 0.65 * ry, 0.12, 0.1) {
            val = 0.95; // vertebra
        }
        Some(val)
    });
    blur(img, 1);
}

fn ultrasound(rng: &mut ChaCha8Rng, img: &mut GrayImage) {
    let sector = rng.random_bool(0.75);
    let half_angle = rng.random_range(0.45..0.8f32);
    let apex_v = -(img.height as f32 / img.width as f32) * rng.random_range(0.85..1.0);
    let depth = rng.random_range(1.2..1.9);
    let echo = rng.random_range(0.2..0.5);
    let cysts: Vec<(f32, f32, f32)> = (0..rng.random_range(0..4))
        .map(|_| (rng.random_range(-0.4..0.4), rng.random_range(0.0..0.6), rng.random_range(0.06..0.2)))
        .collect();
    let mut speckle = GrayImage { width: img.width, height: img.height, pixels: vec![0.0; img.width * img.height] };
    for p in speckle.pixels.iter_mut() {
        // Rayleigh-like speckle.
        *p = (-2.0 * rng.random_range(1e-6f32..1.0).ln()).sqrt() * 0.6;
    }
    blur(&mut speckle, 1);
    let (w, h) = (img.width, img.height);
    let labels = rng.random_bool(0.7);
    fill(img, |u, v| {
        let inside = if sector {
            let (du, dv) = (u, v - apex_v);
            let r = (du * du + dv * dv).sqrt();
            dv > 0.0 && du.atan2(dv).abs() < half_angle && r < depth
        } else {
            u.abs() < 0.7 && v > apex_v + 0.1 && v < apex_v + depth
        };
        if !inside {
            return Some(0.0);
        }
        let mut e = echo * (1.0 - 0.3 * (v - apex_v) / depth);
        for (cu, cv, cr) in &cysts {
            if ellipse(u, v, *cu, *cv, *cr, *cr * 0.7) {
                e *= 0.1;
            }
        }
        Some(e)
    });
    for (i, p) in img.pixels.iter_mut().enumerate() {
        *p *= speckle.pixels[i];
    }
    if labels {
        // Burnt-in text and depth marks in the black margin.
        for k in 0..rng.random_range(3..12) {
            let (x, y) = (rng.random_range(0..w / 4), (k * 7 + 3) % h);
            for dy in 0..3 {
                for dx in 0..rng.random_range(4..16) {
                    if let Some(p) = img.pixels.get_mut((y + dy).min(h - 1) * w + (x + dx).min(w - 1)) {
                        *p = 0.9;
                    }
                }
            }
        }
    }
}

// A random phase range of 0..6.28 is part of the seeded recipe of the shipped
// weights (TAU would change every phantom drawn after it).
#[allow(clippy::approx_constant)]
fn other(rng: &mut ChaCha8Rng, img: &mut GrayImage) {
    match rng.random_range(0..5) {
        0 => {
            // MR-like head: grey matter, white matter, dark CSF, bright scalp, no bright skull.
            let r0 = rng.random_range(0.6..0.9);
            fill(img, |u, v| {
                let r = ((u / r0).powi(2) + (v / (r0 * 1.2)).powi(2)).sqrt();
                Some(if r > 1.0 {
                    0.0
                } else if r > 0.93 {
                    0.8
                } else if r > 0.85 {
                    0.05
                } else if ellipse(u, v, 0.0, 0.0, 0.12, 0.25) {
                    0.1
                } else if r > 0.7 {
                    0.45
                } else {
                    0.6
                })
            });
            blur(img, 1);
        }
        1 => {
            // Smooth random field (photograph-like).
            let freq: Vec<(f32, f32, f32, f32)> = (0..6)
                .map(|_| {
                    (
                        rng.random_range(0.5..6.0),
                        rng.random_range(0.5..6.0),
                        rng.random_range(0.0..6.28),
                        rng.random_range(0.05..0.2),
                    )
                })
                .collect();
            let base = rng.random_range(0.3..0.7);
            fill(img, |u, v| {
                Some(base + freq.iter().map(|(a, b, p, amp)| amp * (a * u + b * v + p).sin()).sum::<f32>())
            });
        }
        2 => {
            // A document: light page, dark text lines.
            let ink = rng.random_range(0.0..0.2);
            let page = rng.random_range(0.8..1.0);
            let pitch = rng.random_range(0.06..0.12);
            let mut seed: Vec<f32> = (0..64).map(|_| rng.random_range(0.3..0.95)).collect();
            seed.push(0.0);
            fill(img, |u, v| {
                let line = ((v + 1.0) / pitch) as i32;
                let in_line = ((v + 1.0) / pitch).fract() < 0.4;
                let len = seed[(line.unsigned_abs() as usize) % 64];
                Some(if in_line && u > -0.85 && u < -0.85 + 1.7 * len && ((u * 40.0).sin() > -0.2) {
                    ink
                } else {
                    page
                })
            });
        }
        3 => {
            // Pure noise or a flat field.
            let base = rng.random_range(0.0..1.0);
            for p in img.pixels.iter_mut() {
                *p = base + rng.random_range(-0.5..0.5) * rng.random_range(0.0f32..1.0);
            }
        }
        _ => {
            // Geometric shapes (a test pattern).
            let shapes: Vec<(f32, f32, f32, f32)> = (0..rng.random_range(2..8))
                .map(|_| {
                    (
                        rng.random_range(-0.8..0.8),
                        rng.random_range(-0.8..0.8),
                        rng.random_range(0.05..0.4),
                        rng.random_range(0.0..1.0),
                    )
                })
                .collect();
            let bg = rng.random_range(0.0..1.0);
            fill(img, |u, v| {
                let mut val = bg;
                for (cu, cv, r, g) in &shapes {
                    if (u - cu).abs() < *r && (v - cv).abs() < *r * 0.7 {
                        val = *g;
                    }
                }
                Some(val)
            });
        }
    }
}

fn add_noise(rng: &mut ChaCha8Rng, img: &mut GrayImage, sigma: f32) {
    for p in img.pixels.iter_mut() {
        *p += sigma * gauss(rng) as f32;
    }
}

/// Box blur of radius `r` (separable).
fn blur(img: &mut GrayImage, r: usize) {
    let (w, h) = (img.width, img.height);
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (x.saturating_sub(r), (x + r).min(w - 1));
            tmp[y * w + x] = img.pixels[y * w + a..=y * w + b].iter().sum::<f32>() / (b - a + 1) as f32;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (y.saturating_sub(r), (y + r).min(h - 1));
            img.pixels[y * w + x] = (a..=b).map(|yy| tmp[yy * w + x]).sum::<f32>() / (b - a + 1) as f32;
        }
    }
}

// ----- training -----

#[derive(Debug, Clone)]
pub struct ImagingTraining {
    pub seed: u64,
    pub images: u64,
    pub epochs: usize,
    /// Real training examples for the first head ([`super::real`]); calibration and
    /// the test split stay synthetic.
    pub real: super::real::Examples,
}

impl Default for ImagingTraining {
    fn default() -> Self {
        ImagingTraining { seed: 1, images: 2400, epochs: 300, real: Default::default() }
    }
}

/// One synthetic example: features, kind, quality (0 adequate, 1 poor).
pub fn example(seed: u64, index: u64) -> (Vec<f32>, u32, u32) {
    let mut rng = rng_for(seed, index);
    let kind = (index % KINDS.len() as u64) as usize;
    let degrade = rng.random_bool(0.3);
    let img = phantom(&mut rng, kind, degrade);
    (features(&img), kind as u32, degrade as u32)
}

pub struct TrainedImaging {
    pub model: ImagingModel,
    pub kind_before: Metrics,
    pub kind_after: Metrics,
    pub quality_before: Metrics,
    pub quality_after: Metrics,
}

#[allow(clippy::type_complexity)]
pub fn dataset(seed: u64, images: u64, split: super::ecg::Split) -> (Vec<Vec<f32>>, Vec<u32>, Vec<u32>) {
    let mut x = Vec::new();
    let mut k = Vec::new();
    let mut q = Vec::new();
    for i in (0..images).filter(|i| super::ecg::split_of(*i) == split) {
        let (f, kind, qual) = example(seed, i);
        x.push(f);
        k.push(kind);
        q.push(qual);
    }
    (x, k, q)
}

pub fn train(t: &ImagingTraining) -> Result<TrainedImaging, ModelError> {
    use super::ecg::Split;
    let (xtr, ktr, qtr) = dataset(t.seed, t.images, Split::Train);
    // Real images train the kind head only (their quality is not labelled).
    let (mut xk, mut kk) = (xtr.clone(), ktr.clone());
    xk.extend(t.real.0.iter().cloned());
    kk.extend(t.real.1.iter().copied());
    let (xca, kca, qca) = dataset(t.seed, t.images, Split::Calibrate);
    let (xte, kte, qte) = dataset(t.seed, t.images, Split::Test);
    let spec = TrainSpec { hidden: vec![32], epochs: t.epochs, learning_rate: 0.01, weight_decay: 1e-3, seed: t.seed };
    let mut kind = Mlp::train(&xk, &kk, KINDS.len(), &spec)?;
    let mut quality = Mlp::train(&xtr, &qtr, QUALITY.len(), &TrainSpec { seed: t.seed + 1, ..spec })?;
    let kind_before = Metrics::of(&kind.predict(&xte)?, &kte, KINDS.len());
    let quality_before = Metrics::of(&quality.predict(&xte)?, &qte, QUALITY.len());
    kind.fit_temperature(&xca, &kca)?;
    quality.fit_temperature(&xca, &qca)?;
    let kind_after = Metrics::of(&kind.predict(&xte)?, &kte, KINDS.len());
    let quality_after = Metrics::of(&quality.predict(&xte)?, &qte, QUALITY.len());
    Ok(TrainedImaging { model: ImagingModel { kind, quality }, kind_before, kind_after, quality_before, quality_after })
}
