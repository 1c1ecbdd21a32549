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

pub async fn ecg_svg(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, usize)>,
) -> Response {
    let who = match app.require(&headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Api) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let case = match app.visible_case(&who, &id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match ecg_of(&app.ctx, &case, n).await {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Err(e) => refuse(StatusCode::NOT_FOUND, &format!("This attachment is not a readable ECG: {e}")),
    }
}

/// Window/level and frame for a DICOM image.
#[derive(Debug, Default, Deserialize)]
pub struct ImageQuery {
    pub wc: Option<f32>,
    pub ww: Option<f32>,
}

pub async fn image_png(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, usize)>,
    Query(q): Query<ImageQuery>,
) -> Response {
    let who = match app.require(&headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Api) {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Err(r) = app.visible_case(&who, &id).await {
        return r;
    }
    let _ = (n, q.wc, q.ww);
    refuse(StatusCode::NOT_IMPLEMENTED, "The DICOM image viewer is not built yet.")
}

pub async fn slide_tile(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((id, n, level, x, y)): Path<(String, usize, u32, u32, u32)>,
) -> Response {
    let who = match app.require(&headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Api) {
        Ok(w) => w,
        Err(r) => return r,
    };
    if let Err(r) = app.visible_case(&who, &id).await {
        return r;
    }
    let _ = (n, level, x, y);
    refuse(StatusCode::NOT_IMPLEMENTED, "The slide viewer is not built yet.")
}
