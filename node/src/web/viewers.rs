//! Viewers for a case's attachments: the 12-lead ECG as SVG, DICOM images as PNG at
//! a chosen window/level, and pathology slide tiles. Each reads the attachment from
//! the blob store with the file readers in `crate::readers`.
//!
//! This module must never serve a blob to someone who may not see its case, nor
//! decode an attachment without the readers' size limits.

use super::{AppState, Kind, refuse};
use crate::daemon::CaseSnapshot;
use crate::web::WebContext;
use crate::web::auth::Role;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

/// The index of the case's first ECG attachment the readers can decode, and its SVG.
pub async fn inline_ecg(ctx: &WebContext, case: &CaseSnapshot) -> Option<String> {
    if case.view.modality != "ecg" {
        return None;
    }
    for n in 0..case.view.attachments.len() {
        if let Ok(svg) = ecg_of(ctx, case, n).await {
            return Some(svg);
        }
    }
    None
}

/// Attachment `n` of the case read as an ECG and drawn as 12-lead paper.
async fn ecg_of(ctx: &WebContext, case: &CaseSnapshot, n: usize) -> Result<String, String> {
    let (name, _, media) = case.view.attachments.get(n).ok_or("no such attachment")?;
    let hash = case.attachment_hashes.get(n).ok_or("no such attachment")?;
    if !ctx.blobs.contains(hash) {
        return Err("the attachment is not stored here yet".into());
    }
    let path = ctx.blobs.path_of(hash);
    let (media, name) = (media.clone(), name.clone());
    tokio::task::spawn_blocking(move || {
        let ecg = match media.as_str() {
            "application/dicom" => crate::readers::read_dicom_ecg_file(&path).map_err(|e| e.to_string())?,
            other => return Err(format!("{other} is not an ECG format the viewer reads")),
        };
        let leads: Vec<(&str, &[f32])> = ecg.leads.iter().map(|l| (l.name.as_str(), l.millivolts.as_slice())).collect();
        Ok(super::ecg_svg::render(f64::from(ecg.sample_rate_hz), &leads, &name))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The case a viewer request names, if the session may see it (any role, and only
/// cases routed to this node, as `AppState::visible_case` decides).
async fn viewable_case(app: &AppState, headers: &HeaderMap, id: &str) -> Result<CaseSnapshot, Response> {
    let who = app.require(headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Api)?;
    app.visible_case(&who, id).await
}

pub async fn ecg_svg(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, usize)>,
) -> Response {
    let case = match viewable_case(&app, &headers, &id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match ecg_of(&app.ctx, &case, n).await {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Err(e) => refuse(StatusCode::NOT_FOUND, &format!("This attachment is not a readable ECG: {e}")),
    }
}

/// Longest edge of a rendered DICOM image, in pixels (larger ones are reduced).
pub const IMAGE_EDGE_MAX: u32 = 2048;

/// Window/level for a DICOM image (empty or absent: the file's default window).
#[derive(Debug, Default, Deserialize)]
pub struct ImageQuery {
    #[serde(default)]
    pub wc: String,
    #[serde(default)]
    pub ww: String,
}

/// An 8-bit grey or RGB raster as PNG.
pub fn encode_png(width: u32, height: u32, rgb: bool, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(if rgb { png::ColorType::Rgb } else { png::ColorType::Grayscale });
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(data).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// The blob of attachment `n` with the media type, if it is stored here.
fn attachment(ctx: &WebContext, case: &CaseSnapshot, n: usize) -> Result<(std::path::PathBuf, String), String> {
    let (_, _, media) = case.view.attachments.get(n).ok_or("no such attachment")?;
    let hash = case.attachment_hashes.get(n).ok_or("no such attachment")?;
    if !ctx.blobs.contains(hash) {
        return Err("the attachment is not stored here yet".into());
    }
    Ok((ctx.blobs.path_of(hash), media.clone()))
}

/// Renders a DICOM image through a window (reduced to [`IMAGE_EDGE_MAX`]) as PNG.
pub fn render_dicom_png(path: &std::path::Path, window: Option<(f32, f32)>) -> Result<Vec<u8>, String> {
    let image = crate::readers::read_dicom_image_file(path).map_err(|e| e.to_string())?;
    let (w0, h0) = (image.columns, image.rows);
    let scale = (f64::from(w0.max(h0)) / f64::from(IMAGE_EDGE_MAX)).max(1.0);
    let (w, h) = (((f64::from(w0) / scale) as u32).max(1), ((f64::from(h0) / scale) as u32).max(1));
    let image = if (w, h) == (w0, h0) {
        image
    } else {
        let pixels = image.downsample(w, h);
        crate::readers::image::DicomImage { rows: h, columns: w, samples_per_pixel: 1, pixels, ..image }
    };
    let default = image.default_window();
    let (center, width) = window.unwrap_or((default.center, default.width));
    encode_png(w, h, false, &image.render_window(center, width))
}

pub async fn image_png(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, usize)>,
    Query(q): Query<ImageQuery>,
) -> Response {
    let case = match viewable_case(&app, &headers, &id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let parse = |s: &str| s.trim().parse::<f32>().ok().filter(|v| v.is_finite());
    let window = match (q.wc.trim().is_empty() && q.ww.trim().is_empty(), parse(&q.wc), parse(&q.ww)) {
        (true, _, _) => None,
        (false, Some(c), Some(w)) if w > 0.0 => Some((c, w)),
        _ => return refuse(StatusCode::BAD_REQUEST, "Window centre and width must be numbers, the width above 0."),
    };
    let (path, media) = match attachment(&app.ctx, &case, n) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::NOT_FOUND, &e),
    };
    if media != "application/dicom" {
        return refuse(StatusCode::NOT_FOUND, "This attachment is not a DICOM image.");
    }
    match tokio::task::spawn_blocking(move || render_dicom_png(&path, window)).await {
        Ok(Ok(png)) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        Ok(Err(e)) => refuse(StatusCode::UNPROCESSABLE_ENTITY, &format!("Not a readable DICOM image: {e}")),
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "The image could not be rendered."),
    }
}

/// A slide's levels for the viewer: `[width, height, tile_width, tile_height]`, level 0 first.
pub fn slide_levels(path: &std::path::Path) -> Result<Vec<[u32; 4]>, String> {
    let slide = crate::readers::slide::Slide::open(path).map_err(|e| e.to_string())?;
    Ok(slide.levels().iter().map(|l| [l.width, l.height, l.tile_width, l.tile_height]).collect())
}

pub async fn slide_tile(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, n, level, x, y)): Path<(String, usize, usize, u32, u32)>,
) -> Response {
    let case = match viewable_case(&app, &headers, &id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (path, media) = match attachment(&app.ctx, &case, n) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::NOT_FOUND, &e),
    };
    if media != "image/tiff" {
        return refuse(StatusCode::NOT_FOUND, "This attachment is not a slide.");
    }
    let tile = tokio::task::spawn_blocking(move || {
        let mut slide = crate::readers::slide::Slide::open(&path).map_err(|e| e.to_string())?;
        let tile = slide.read_tile(level, x, y).map_err(|e| e.to_string())?;
        encode_png(tile.width, tile.height, true, &tile.rgb)
    })
    .await;
    match tile {
        Ok(Ok(png)) => ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], png)
            .into_response(),
        Ok(Err(e)) => refuse(StatusCode::NOT_FOUND, &format!("No such tile: {e}")),
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "The tile could not be read."),
    }
}

/// What the case page shows for each attachment.
#[derive(Debug, Clone)]
pub enum ViewerKind {
    Image,
    /// A slide with its levels (`[width, height, tile_width, tile_height]`).
    Slide(Vec<[u32; 4]>),
}

/// Viewers for the case's image and slide attachments, by attachment index.
pub async fn viewers_of(ctx: &WebContext, case: &CaseSnapshot) -> Vec<(usize, ViewerKind)> {
    let mut out = Vec::new();
    for n in 0..case.view.attachments.len() {
        let Ok((path, media)) = attachment(ctx, case, n) else { continue };
        match (case.view.modality.as_str(), media.as_str()) {
            ("imaging", "application/dicom") => out.push((n, ViewerKind::Image)),
            (_, "image/tiff") => {
                if let Ok(Ok(levels)) = tokio::task::spawn_blocking(move || slide_levels(&path)).await {
                    out.push((n, ViewerKind::Slide(levels)));
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn png_encoder_writes_a_png_of_the_given_size() {
        let png = super::encode_png(3, 2, false, &[0, 128, 255, 255, 128, 0]).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        // IHDR: width and height, big-endian, right after the chunk type.
        assert_eq!(&png[16..24], &[0, 0, 0, 3, 0, 0, 0, 2]);
        assert!(super::encode_png(3, 2, true, &[0; 6]).is_err(), "RGB needs 3 bytes a pixel");
    }
}
