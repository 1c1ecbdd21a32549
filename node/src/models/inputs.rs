//! Turns a file into a model input with the readers (`readers::read_any`, by
//! content): an ECG stays an ECG; a DICOM image becomes a windowed grey image of
//! at most [`IMAGE_SIDE_MAX`] pixels a side (the scale the imaging model was
//! trained at) with the header's modality and body part; a slide becomes RGB
//! tiles of its best-fitting level, each reduced to [`TILE_SIDE`] pixels.
//!
//! This module must never guess: a file no reader accepts is an error that says
//! what the readers objected to.

use super::imaging::{GrayImage, Header};
use super::local::Input;
use super::pathology::RgbTile;
use crate::readers::{AnyFile, DicomImage, Slide};
use std::path::Path;

/// Longest side of an image as the imaging model sees it.
pub const IMAGE_SIDE_MAX: usize = 192;
/// Side of a tile as the pathology model sees it.
pub const TILE_SIDE: usize = 64;
/// Most tiles read from one slide (a grid over the chosen level).
pub const TILES_MAX: usize = 400;

pub fn load(path: &Path) -> Result<Input, String> {
    match crate::readers::read_any(path).map_err(|e| e.to_string())? {
        AnyFile::Ecg { ecg, .. } => Ok(Input::Ecg(ecg)),
        AnyFile::Image(img) => Ok(Input::Image(image_input(&img)?)),
        AnyFile::Slide(mut slide) => Ok(Input::Tiles(slide_tiles(&mut slide)?.into_iter().map(|(_, t)| t).collect())),
    }
}

/// A DICOM image as the imaging model takes it.
pub fn image_input(img: &DicomImage) -> Result<(GrayImage, Header), String> {
    let (w, h) = (img.columns as usize, img.rows as usize);
    if w < 8 || h < 8 {
        return Err(format!("image {w}×{h} is too small to read"));
    }
    let scale = (IMAGE_SIDE_MAX as f64 / w.max(h) as f64).min(1.0);
    let (dw, dh) = (((w as f64 * scale).round() as usize).max(8), ((h as f64 * scale).round() as usize).max(8));
    let pixels = img.model_input(dw as u32, dh as u32);
    let header = Header { modality: img.modality.clone(), body_part: img.body_part_examined.clone() };
    Ok((GrayImage { width: dw, height: dh, pixels }, header))
}

/// A tile's (column, row) in its level's grid.
pub type TileIndex = (u32, u32);

/// Tiles of a slide: the level whose tile grid is closest to (not above)
/// [`TILES_MAX`] tiles, each tile reduced to [`TILE_SIDE`]², with its (x, y) index.
pub fn slide_tiles(slide: &mut Slide) -> Result<Vec<(TileIndex, RgbTile)>, String> {
    let levels = slide.levels().to_vec();
    let level = levels
        .iter()
        .enumerate()
        .filter(|(_, l)| (l.tiles_across as usize) * (l.tiles_down as usize) <= TILES_MAX)
        .max_by_key(|(_, l)| l.tiles_across * l.tiles_down)
        .or_else(|| levels.iter().enumerate().next_back())
        .map(|(i, _)| i)
        .ok_or("the slide has no tiled level")?;
    let l = &levels[level];
    let mut out = Vec::new();
    for ty in 0..l.tiles_down {
        for tx in 0..l.tiles_across {
            if out.len() >= TILES_MAX {
                return Ok(out);
            }
            let t = slide.read_tile(level, tx, ty).map_err(|e| e.to_string())?;
            if t.width < 8 || t.height < 8 {
                continue; // a sliver at the edge says nothing
            }
            out.push(((tx, ty), shrink_tile(&t.rgb, t.width as usize, t.height as usize, TILE_SIDE)));
        }
    }
    Ok(out)
}

/// Box-filter reduction of an RGB tile to `side`².
pub fn shrink_tile(rgb: &[u8], w: usize, h: usize, side: usize) -> RgbTile {
    let mut out = Vec::with_capacity(side * side * 3);
    for oy in 0..side {
        let (y0, y1) = (oy * h / side, ((oy + 1) * h / side).max(oy * h / side + 1).min(h));
        for ox in 0..side {
            let (x0, x1) = (ox * w / side, ((ox + 1) * w / side).max(ox * w / side + 1).min(w));
            let mut s = [0u32; 3];
            for y in y0..y1 {
                for x in x0..x1 {
                    for c in 0..3 {
                        s[c] += u32::from(rgb[(y * w + x) * 3 + c]);
                    }
                }
            }
            let n = ((y1 - y0) * (x1 - x0)).max(1) as u32;
            out.extend(s.iter().map(|v| (v / n) as u8));
        }
    }
    RgbTile { width: side, height: side, rgb: out }
}
