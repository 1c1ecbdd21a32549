//! The node's web UI: the consult queue for hub experts, the clinic page (submit a
//! case, read its report), and the admin page. axum, server-rendered HTML (maud:
//! every interpolation escaped), a little JavaScript (countdowns, live reload on
//! server-sent events), every asset served by the node itself.
//!
//! Security: every page and API needs a session (pages redirect to `/login`, APIs
//! answer 401); every state-changing request carries the session's CSRF token (403
//! without it); roles are checked on the server (403); a strict Content-Security-Policy
//! forbids inline scripts. Started by the daemon when `node.toml` has a `[web]`
//! section.
//!
//! This module must never change a case itself: claims, releases, reports,
//! escalations and submissions become the core's inputs through [`ControlHandle`].

// Handlers refuse with a ready `Response` (status and page); it is large, but the
// error path is the rare one and boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod ecg_svg;
mod pages;
mod viewers;

use crate::blobs::BlobStore;
use crate::config::WebConfig;
use crate::daemon::{CaseSnapshot, ControlHandle, ExpertAction, SubmitRequest};
use auth::{COOKIE, LoginLimiter, Role, Session, Sessions};
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use federation_proto::{CaseId, Modality, NodeName, Tier, Urgency};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Longest clinical question accepted from the clinic form, in bytes.
pub const QUESTION_LEN_MAX: usize = 4 * 1024;
/// Longest structured report field, in bytes.
pub const FIELD_LEN_MAX: usize = 4 * 1024;
/// Most findings lines in one report.
pub const FINDINGS_MAX: usize = 32;
/// Most files in one submission.
pub const UPLOAD_FILES_MAX: usize = 16;
/// Longest escalation reason, in bytes.
pub const REASON_LEN_MAX: usize = 1024;
/// Live-event streams (server-sent events) open at once at most.
pub const EVENT_STREAMS_MAX: usize = 256;

/// Holds one of the [`EVENT_STREAMS_MAX`] places while a stream is open.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the web server needs from the daemon.
#[derive(Clone)]
pub struct WebContext {
    pub node: NodeName,
    pub tier: Tier,
    /// This node's certificate's notAfter, seconds since the Unix epoch.
    pub cert_not_after_s: u64,
    /// Configured parents (name, tier, address), primary first.
    pub parents: Vec<(String, String, String)>,
    pub data_dir: PathBuf,
    pub blobs: BlobStore,
    pub control: ControlHandle,
}

struct App {
    /// The session cookie's name: per port, since browsers share cookies across the
    /// ports of one host (two nodes on one machine must not log each other out).
    cookie_name: String,
    ctx: WebContext,
    cfg: WebConfig,
    sessions: Sessions,
    limiter: LoginLimiter,
    event_streams: Arc<std::sync::atomic::AtomicUsize>,
}

type AppState = Arc<App>;

/// Binds the web server and serves it until the returned task is aborted.
pub async fn serve(cfg: WebConfig, ctx: WebContext) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let upload_max = usize::try_from(cfg.upload_bytes_max).unwrap_or(usize::MAX);
    let cookie_name = format!("{COOKIE}_{}", addr.port());
    let app: AppState = Arc::new(App {
        cookie_name,
        ctx,
        cfg,
        sessions: Sessions::default(),
        limiter: LoginLimiter::default(),
        event_streams: Arc::default(),
    });
    let router = Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login_post))
        .route("/logout", post(logout))
        .route("/queue", get(queue))
        .route("/case/{id}", get(case_page))
        .route("/case/{id}/claim", post(claim))
        .route("/case/{id}/release", post(release))
        .route("/case/{id}/sign", post(sign))
        .route("/case/{id}/escalate", post(escalate))
        .route("/case/{id}/attachment/{n}/ecg.svg", get(viewers::ecg_svg))
        .route("/case/{id}/attachment/{n}/image.png", get(viewers::image_png))
        .route("/case/{id}/attachment/{n}/tile/{level}/{x}/{y}", get(viewers::slide_tile))
        .route("/clinic", get(clinic))
        .route("/clinic/submit", post(submit).layer(DefaultBodyLimit::max(upload_max.saturating_add(64 * 1024))))
        .route("/admin", get(admin))
        .route("/events", get(events))
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("../../assets/app.css")) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("../../assets/app.js")) }),
        )
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await {
            tracing::error!("web UI stopped: {e}");
        }
    });
    Ok((addr, task))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    );
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-frame-options", "DENY");
    set(h, "cache-control", "no-store");
    res
}

// --- sessions and checks ---------------------------------------------------------------

/// A logged-in request: who and with which session.
pub(crate) struct Who {
    pub name: String,
    pub role: Role,
    pub session: Session,
}

/// How to refuse a request without a session.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// Redirect to the login page.
    Page,
    /// 401.
    Api,
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name && v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then(|| v.to_owned())
    })
}

pub(crate) fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Html(pages::message(status, message).into_string())).into_response()
}

impl App {
    fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie_value(headers, &self.cookie_name)?;
        self.sessions.get(&id).map(|s| (id, s))
    }

    /// The logged-in user, if their role is one of `roles`.
    pub(crate) fn require(&self, headers: &HeaderMap, roles: &[Role], kind: Kind) -> Result<Who, Response> {
        let Some((_, session)) = self.session(headers) else {
            return Err(match kind {
                Kind::Page => Redirect::to("/login").into_response(),
                Kind::Api => refuse(StatusCode::UNAUTHORIZED, "Log in first."),
            });
        };
        let Some((name, role)) = session.user.clone() else {
            return Err(match kind {
                Kind::Page => Redirect::to("/login").into_response(),
                Kind::Api => refuse(StatusCode::UNAUTHORIZED, "Log in first."),
            });
        };
        if !roles.contains(&role) {
            return Err(refuse(StatusCode::FORBIDDEN, &format!("A {} may not do this.", role.as_str())));
        }
        Ok(Who { name, role, session })
    }

    /// [`App::require`] for a state-changing request: the CSRF token (form field or
    /// `X-CSRF-Token` header) must match the session's. Checked before the role.
    fn require_csrf(&self, headers: &HeaderMap, form_token: &str, roles: &[Role]) -> Result<Who, Response> {
        let who = self.require(headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Api)?;
        let presented = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or(form_token);
        if !auth::csrf_matches(&who.session, presented) {
            return Err(refuse(StatusCode::FORBIDDEN, "Missing or wrong CSRF token; reload the page and try again."));
        }
        if !roles.contains(&who.role) {
            return Err(refuse(StatusCode::FORBIDDEN, &format!("A {} may not do this.", who.role.as_str())));
        }
        Ok(who)
    }

    fn cookie(&self, id: &str, max_age_s: u64) -> HeaderValue {
        let secure = if self.cfg.behind_tls_proxy { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}",
            self.cookie_name
        ))
        .unwrap_or(HeaderValue::from_static(""))
    }

    async fn snapshot(&self) -> Result<Vec<CaseSnapshot>, Response> {
        self.ctx.control.snapshot().await.map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()))
    }

    /// The case, if `who` may see it: experts and admins see every case held here,
    /// clinicians only the cases this node created.
    pub(crate) async fn visible_case(&self, who: &Who, id: &str) -> Result<CaseSnapshot, Response> {
        let id: CaseId = id.parse().map_err(|_| refuse(StatusCode::NOT_FOUND, "No such case."))?;
        let case = self
            .snapshot()
            .await?
            .into_iter()
            .find(|c| c.view.case_id == id.to_string())
            .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "No such case at this node."))?;
        if who.role == Role::Clinician && case.came_from.is_some() {
            return Err(refuse(StatusCode::FORBIDDEN, "This case was not submitted at this clinic."));
        }
        Ok(case)
    }
}

// --- login -----------------------------------------------------------------------------

async fn index(State(app): State<AppState>, headers: HeaderMap) -> Response {
    match app.require(&headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Page) {
        Ok(who) => Redirect::to(match who.role {
            Role::Expert => "/queue",
            Role::Clinician => "/clinic",
            Role::Admin => "/admin",
        })
        .into_response(),
        Err(r) => r,
    }
}

async fn login_page(State(app): State<AppState>, headers: HeaderMap) -> Response {
    login_form(&app, &headers, None, StatusCode::OK)
}

fn login_form(app: &App, headers: &HeaderMap, error: Option<&str>, status: StatusCode) -> Response {
    let (id, session) = match app.session(headers) {
        Some((_, s)) if s.user.is_some() => return Redirect::to("/").into_response(),
        Some(found) => found,
        None => match app.sessions.create(None, auth::LOGIN_FORM_TTL) {
            Some(created) => created,
            None => return refuse(StatusCode::SERVICE_UNAVAILABLE, "Too many sessions; try again later."),
        },
    };
    let page = pages::login(&app.ctx, &session.csrf, error);
    let mut res = (status, Html(page.into_string())).into_response();
    res.headers_mut().insert(header::SET_COOKIE, app.cookie(&id, auth::LOGIN_FORM_TTL.as_secs()));
    res
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
}

async fn login_post(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let Some((old_id, session)) = app.session(&headers) else {
        return refuse(StatusCode::FORBIDDEN, "The login form expired; reload it.");
    };
    if !auth::csrf_matches(&session, &form.csrf) {
        return refuse(StatusCode::FORBIDDEN, "Missing or wrong CSRF token; reload the login form.");
    }
    let (name_key, ip_key) = (format!("user:{}", form.name), format!("ip:{}", peer.ip()));
    if !app.limiter.allowed(&name_key, auth::LOGIN_FAILURES_MAX)
        || !app.limiter.allowed(&ip_key, auth::LOGIN_FAILURES_PER_ADDR_MAX)
    {
        let _ = app.ctx.control.audit("web.login_limited", &format!("{} from {}", form.name, peer.ip())).await;
        return refuse(StatusCode::TOO_MANY_REQUESTS, "Too many failed logins; wait 15 minutes.");
    }
    let (dir, name, password) = (app.ctx.data_dir.clone(), form.name.clone(), form.password);
    let verdict = tokio::task::spawn_blocking(move || auth::verify_login(&dir, &name, &password)).await;
    match verdict {
        Ok(Ok(Some(user))) => {
            app.limiter.succeeded(&name_key);
            app.sessions.remove(&old_id); // a fresh id after login (no session fixation)
            let ttl = Duration::from_secs(app.cfg.session_min.saturating_mul(60));
            let Some((id, _)) = app.sessions.create(Some((user.name.clone(), user.role)), ttl) else {
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "Too many sessions; try again later.");
            };
            let _ = app
                .ctx
                .control
                .audit("web.login", &format!("{} ({}) from {}", user.name, user.role.as_str(), peer.ip()))
                .await;
            let mut res = Redirect::to("/").into_response();
            res.headers_mut().insert(header::SET_COOKIE, app.cookie(&id, ttl.as_secs()));
            res
        }
        Ok(Ok(None)) => {
            app.limiter.failed(&name_key);
            app.limiter.failed(&ip_key);
            let _ = app.ctx.control.audit("web.login_failed", &format!("{} from {}", form.name, peer.ip())).await;
            login_form(&app, &headers, Some("Wrong user name or password."), StatusCode::UNAUTHORIZED)
        }
        Ok(Err(e)) => {
            tracing::error!("users file: {e}");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "The users file cannot be read; see the node's log.")
        }
        Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "Login failed."),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(app): State<AppState>, headers: HeaderMap, axum::Form(form): axum::Form<CsrfForm>) -> Response {
    if let Err(r) = app.require_csrf(&headers, &form.csrf, &[Role::Expert, Role::Clinician, Role::Admin]) {
        return r;
    }
    if let Some((id, _)) = app.session(&headers) {
        app.sessions.remove(&id);
    }
    let mut res = Redirect::to("/login").into_response();
    res.headers_mut().insert(header::SET_COOKIE, app.cookie("", 0));
    res
}

// --- consult queue and case page -------------------------------------------------------

/// Queue filters (all optional).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct QueueFilter {
    #[serde(default)]
    pub modality: String,
    #[serde(default)]
    pub urgency: String,
    /// `open` (queued or claimed; the default), `queued`, `claimed`, `reported`, `all`.
    #[serde(default)]
    pub status: String,
}

/// Orders the consult queue: most urgent first, then least time left to the deadline.
pub(crate) fn queue_order(cases: &mut [CaseSnapshot]) {
    let rank = |u: &str| u.parse::<Urgency>().map_or(u8::MAX, |u| u as u8);
    cases.sort_by_key(|c| (rank(&c.view.urgency), c.view.deadline_at_ms, c.view.created_at_ms));
}

pub(crate) fn queue_filter(cases: Vec<CaseSnapshot>, f: &QueueFilter, node: &str) -> Vec<CaseSnapshot> {
    cases
        .into_iter()
        .filter(|c| {
            let s = c.view.status.as_str();
            let status_ok = match f.status.as_str() {
                "" | "open" => matches!(s, "queued" | "claimed"),
                "reported" => s == "reported" && c.view.report.as_ref().is_some_and(|r| r.node == node),
                "all" => true,
                other => s == other,
            };
            status_ok
                && (f.modality.is_empty() || c.view.modality == f.modality)
                && (f.urgency.is_empty() || c.view.urgency == f.urgency)
        })
        .collect()
}

async fn queue(State(app): State<AppState>, headers: HeaderMap, Query(filter): Query<QueueFilter>) -> Response {
    let who = match app.require(&headers, &[Role::Expert, Role::Admin], Kind::Page) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let cases = match app.snapshot().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut cases = queue_filter(cases, &filter, app.ctx.node.as_str());
    queue_order(&mut cases);
    Html(pages::queue(&app.ctx, &who, &filter, &cases).into_string()).into_response()
}

async fn case_page(State(app): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let who = match app.require(&headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Page) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let case = match app.visible_case(&who, &id).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let ecg = viewers::inline_ecg(&app.ctx, &case).await;
    let others = viewers::viewers_of(&app.ctx, &case).await;
    Html(pages::case(&app.ctx, &who, &case, ecg.as_deref(), &others).into_string()).into_response()
}

async fn expert_action(app: &App, headers: &HeaderMap, id: &str, csrf: &str, action: ExpertAction) -> Response {
    let who = match app.require_csrf(headers, csrf, &[Role::Expert]) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let Ok(case_id) = id.parse::<CaseId>() else {
        return refuse(StatusCode::NOT_FOUND, "No such case.");
    };
    let release = matches!(action, ExpertAction::Release);
    match app.ctx.control.expert(case_id, &who.name, action).await {
        Ok(Ok(())) => {
            // Claims, reports and escalations are audited by the daemon from the core's
            // events; a release has no event, so it is audited here.
            if release {
                let _ = app.ctx.control.audit("case.released", &format!("{} released case {case_id}", who.name)).await;
            }
            Redirect::to(&format!("/case/{case_id}")).into_response()
        }
        Ok(Err(e)) => refuse(StatusCode::CONFLICT, &e),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn claim(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<CsrfForm>,
) -> Response {
    expert_action(&app, &headers, &id, &f.csrf, ExpertAction::Claim).await
}

async fn release(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<CsrfForm>,
) -> Response {
    expert_action(&app, &headers, &id, &f.csrf, ExpertAction::Release).await
}

/// The report editor's fields.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ReportForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub conclusion: String,
    /// One finding per line.
    #[serde(default)]
    pub findings: String,
    #[serde(default)]
    pub recommendation: String,
    /// `none`, `routine`, `urgent` or `stat`.
    #[serde(default)]
    pub follow_up: String,
    #[serde(default)]
    pub text: String,
}

impl ReportForm {
    /// The structured report the expert signs, or what is wrong with the form.
    pub(crate) fn draft(&self) -> Result<tiers::ReportDraft, String> {
        let conclusion = self.conclusion.trim();
        if conclusion.is_empty() {
            return Err("A report needs a conclusion (diagnosis).".into());
        }
        let follow_up = match self.follow_up.as_str() {
            "" | "none" => "none",
            "routine" => "routine",
            "urgent" => "urgent",
            "stat" => "stat",
            other => return Err(format!("Unknown follow-up urgency `{other}`.")),
        };
        let findings: Vec<&str> = self.findings.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if findings.len() > FINDINGS_MAX {
            return Err(format!("At most {FINDINGS_MAX} findings."));
        }
        for f in [conclusion, self.recommendation.trim()].iter().chain(findings.iter()) {
            if f.len() > FIELD_LEN_MAX {
                return Err(format!("A field is longer than {FIELD_LEN_MAX} bytes."));
            }
        }
        let mut fields = vec![("conclusion".to_owned(), conclusion.to_owned())];
        fields.extend(findings.iter().map(|f| ("finding".to_owned(), (*f).to_owned())));
        if !self.recommendation.trim().is_empty() {
            fields.push(("recommendation".into(), self.recommendation.trim().to_owned()));
        }
        fields.push(("follow_up".into(), follow_up.to_owned()));
        Ok(tiers::ReportDraft { labels: vec![], fields, text: self.text.trim().to_owned() })
    }
}

async fn sign(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<ReportForm>,
) -> Response {
    let draft = match f.draft() {
        Ok(d) => d,
        Err(e) => {
            // CSRF and role first: an anonymous caller learns nothing from validation.
            if let Err(r) = app.require_csrf(&headers, &f.csrf, &[Role::Expert]) {
                return r;
            }
            return refuse(StatusCode::UNPROCESSABLE_ENTITY, &e);
        }
    };
    expert_action(&app, &headers, &id, &f.csrf, ExpertAction::Sign(draft)).await
}

#[derive(Deserialize)]
struct EscalateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn escalate(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(f): axum::Form<EscalateForm>,
) -> Response {
    let reason = f.reason.trim();
    if reason.is_empty() || reason.len() > REASON_LEN_MAX {
        if let Err(r) = app.require_csrf(&headers, &f.csrf, &[Role::Expert]) {
            return r;
        }
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "Say why the case goes on (1 to 1024 bytes).");
    }
    expert_action(&app, &headers, &id, &f.csrf, ExpertAction::Escalate(reason.to_owned())).await
}

// --- clinic ----------------------------------------------------------------------------

async fn clinic(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let who = match app.require(&headers, &[Role::Clinician, Role::Admin], Kind::Page) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let mut cases: Vec<CaseSnapshot> = match app.snapshot().await {
        Ok(c) => c.into_iter().filter(|c| c.came_from.is_none()).collect(),
        Err(r) => return r,
    };
    cases.sort_by_key(|c| std::cmp::Reverse(c.view.created_at_ms));
    Html(pages::clinic(&app.ctx, &who, &cases).into_string()).into_response()
}

/// Removes an upload's temporary directory when the request ends, however it ends.
struct UploadDir(PathBuf);
impl Drop for UploadDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file name safe to create inside the upload directory.
fn safe_file_name(name: &str, n: usize) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String =
        base.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).take(100).collect();
    let clean = clean.trim_start_matches('.');
    if clean.is_empty() { format!("upload-{n}") } else { format!("{n}-{clean}") }
}

async fn submit(State(app): State<AppState>, headers: HeaderMap, mut multipart: Multipart) -> Response {
    // Session first; the CSRF token must come as the form's first field (or header),
    // so nothing is written to disk for a forged request.
    if let Err(r) = app.require(&headers, &[Role::Clinician], Kind::Api) {
        return r;
    }
    let mut who: Option<Who> = None;
    if headers.contains_key("x-csrf-token") {
        match app.require_csrf(&headers, "", &[Role::Clinician]) {
            Ok(w) => who = Some(w),
            Err(r) => return r,
        }
    }
    let dir = app.ctx.data_dir.join("uploads").join(auth::random_token());
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("upload directory: {e}"));
    }
    let _cleanup = UploadDir(dir.clone());
    let (mut modality, mut urgency, mut question, mut patient) = (None, None, String::new(), String::new());
    let mut files = Vec::new();
    let mut total: u64 = 0;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("upload: {e}")),
        };
        let name = field.name().unwrap_or("").to_owned();
        if who.is_none() {
            if name != "csrf" {
                return refuse(StatusCode::FORBIDDEN, "Missing or wrong CSRF token; reload the page and try again.");
            }
            let token = field.text().await.unwrap_or_default();
            match app.require_csrf(&headers, &token, &[Role::Clinician]) {
                Ok(w) => who = Some(w),
                Err(r) => return r,
            }
            continue;
        }
        match name.as_str() {
            "file" => {
                let file_name = field.file_name().unwrap_or("").to_owned();
                if file_name.is_empty() {
                    continue; // an empty file input
                }
                if files.len() >= UPLOAD_FILES_MAX {
                    return refuse(StatusCode::PAYLOAD_TOO_LARGE, &format!("At most {UPLOAD_FILES_MAX} files."));
                }
                let path = dir.join(safe_file_name(&file_name, files.len()));
                let mut out = match tokio::fs::File::create(&path).await {
                    Ok(f) => f,
                    Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("upload: {e}")),
                };
                let mut field = field;
                loop {
                    match field.chunk().await {
                        Ok(Some(bytes)) => {
                            total += bytes.len() as u64;
                            if total > app.cfg.upload_bytes_max {
                                return refuse(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    &format!("Uploads are limited to {} bytes.", app.cfg.upload_bytes_max),
                                );
                            }
                            use tokio::io::AsyncWriteExt;
                            if let Err(e) = out.write_all(&bytes).await {
                                return refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("upload: {e}"));
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("upload: {e}")),
                    }
                }
                use tokio::io::AsyncWriteExt;
                if let Err(e) = out.flush().await {
                    return refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("upload: {e}"));
                }
                files.push(path);
            }
            "modality" => modality = field.text().await.ok().and_then(|t| t.parse::<Modality>().ok()),
            "urgency" => urgency = field.text().await.ok().and_then(|t| t.parse::<Urgency>().ok()),
            "question" => question = field.text().await.unwrap_or_default(),
            "patient" => patient = field.text().await.unwrap_or_default(),
            _ => {} // ignored
        }
    }
    if who.is_none() {
        return refuse(StatusCode::FORBIDDEN, "Missing or wrong CSRF token; reload the page and try again.");
    }
    let (Some(modality), Some(urgency)) = (modality, urgency) else {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "Choose a modality and an urgency.");
    };
    let question = question.trim().to_owned();
    if question.is_empty() || question.len() > QUESTION_LEN_MAX {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "Ask a clinical question (at most 4 KiB).");
    }
    if files.is_empty() {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "Attach at least one file.");
    }
    let patient = patient.trim().to_owned();
    if patient.is_empty() || patient.len() > 128 {
        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "Give the patient's reference at this clinic.");
    }
    let req = SubmitRequest {
        files,
        study: None,
        modality,
        urgency,
        question,
        patient,
        task: None,
        details: Default::default(),
    };
    match app.ctx.control.submit(req).await {
        Ok(Ok(id)) => Redirect::to(&format!("/case/{id}")).into_response(),
        Ok(Err(e)) => refuse(StatusCode::UNPROCESSABLE_ENTITY, &e),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

// --- admin and live events -------------------------------------------------------------

async fn admin(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let who = match app.require(&headers, &[Role::Admin], Kind::Page) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let snap = match app.ctx.control.admin().await {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let cases = match app.snapshot().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    Html(pages::admin(&app.ctx, &who, &snap, &cases, app.sessions.len()).into_string()).into_response()
}

async fn events(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = app.require(&headers, &[Role::Expert, Role::Clinician, Role::Admin], Kind::Api) {
        return r;
    }
    use std::sync::atomic::Ordering;
    if app.event_streams.fetch_add(1, Ordering::Relaxed) >= EVENT_STREAMS_MAX {
        app.event_streams.fetch_sub(1, Ordering::Relaxed);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "Too many live pages open; reload later.");
    }
    let slot = StreamSlot(app.event_streams.clone());
    use tokio_stream::StreamExt;
    let stream = tokio_stream::wrappers::BroadcastStream::new(app.ctx.control.subscribe()).map(move |item| {
        let _open = &slot; // released when the browser goes away and the stream is dropped
        let event = match item {
            Ok(e) => SseEvent::default().event("case").data(format!("{} {}", e.kind, e.case_id.unwrap_or_default())),
            // This subscriber fell behind: tell the page to reload everything.
            Err(_) => SseEvent::default().event("case").data("lagged"),
        };
        Ok::<_, std::convert::Infallible>(event)
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_form_becomes_structured_fields_in_order() {
        let f = ReportForm {
            conclusion: " Sinus rhythm ".into(),
            findings: "rate 70/min\n\n PR 160 ms\n".into(),
            recommendation: "none needed".into(),
            follow_up: "routine".into(),
            text: "free text".into(),
            ..Default::default()
        };
        let d = f.draft().unwrap();
        let keys: Vec<&str> = d.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["conclusion", "finding", "finding", "recommendation", "follow_up"]);
        assert_eq!(d.fields[0].1, "Sinus rhythm");
        assert_eq!(d.fields[2].1, "PR 160 ms");
        assert_eq!(d.text, "free text");
        assert!(ReportForm::default().draft().is_err(), "a conclusion is required");
        let bad = ReportForm { conclusion: "x".into(), follow_up: "later".into(), ..Default::default() };
        assert!(bad.draft().is_err());
    }

    #[test]
    fn upload_names_cannot_leave_the_upload_directory() {
        assert_eq!(safe_file_name("../../etc/passwd", 0), "0-passwd");
        assert_eq!(safe_file_name("..", 1), "upload-1");
        assert_eq!(safe_file_name("C:\\x\\ecg 1.dcm", 2), "2-ecg1.dcm");
    }
}
