//! The FHIR API's OAuth 2.0 authorization server (ADR 0011): the client-credentials
//! grant of RFC 6749 §4.4 at `POST /fhir/auth/token`, and the [`Authority`] that
//! decides, for every FHIR request, which client presents the bearer token.
//!
//! - A registered client (`fhir_auth.rs`, `telemed-node fhir client add`)
//!   authenticates with its id and secret, by HTTP Basic (`client_secret_basic`) or
//!   in the form body (`client_secret_post`), and asks for `scope`s (a space list,
//!   each covered by one of its registered scopes; none asked: all of them).
//! - It gets a random 256-bit access token, `expires_in` seconds long
//!   (`[fhir] token_lifetime_s`, default [`TOKEN_LIFETIME_DEFAULT_S`]). The node
//!   keeps only the token's SHA-256, its client, scopes and expiry, in memory (a
//!   restart ends every token: clients ask again).
//! - Errors are RFC 6749 §5.2 JSON: `invalid_request`, `invalid_client` (401),
//!   `unsupported_grant_type`, `invalid_scope`; too many requests get 429
//!   `temporarily_unavailable` with `Retry-After`.
//! - The clients file is re-read (at most every [`RELOAD_CHECK`]) when it changes:
//!   a revoked client gets no token and the tokens it holds stop working.
//! - Static bearer tokens of ADR 0008 (`token_sha256`, the legacy `token_file`)
//!   keep working beside issued ones.
//!
//! What this is not: SMART Backend Services' `private_key_jwt` client
//! authentication (asymmetric keys, JWKS) — see ADR 0011. This module never logs or
//! stores a secret or token, only digests and client ids.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::fhir_auth::{AuthError, Client, FhirClients, Interaction, Scope, digest, valid_client_id};

/// Default access-token lifetime.
pub const TOKEN_LIFETIME_DEFAULT_S: u64 = 15 * 60;
/// Shortest and longest lifetimes accepted in the configuration.
pub const TOKEN_LIFETIME_MIN_S: u64 = 1;
pub const TOKEN_LIFETIME_MAX_S: u64 = 24 * 3600;
/// Live access tokens per client; a new one past this ends the client's oldest.
pub const TOKENS_PER_CLIENT_MAX: usize = 16;
/// Token requests a client may make per [`RATE_WINDOW`].
pub const TOKEN_REQUESTS_PER_WINDOW_MAX: u32 = 30;
/// Failed client authentications (any client id) per [`RATE_WINDOW`] before the
/// token endpoint answers 429 to every failing attempt until the window ends.
pub const AUTH_FAILURES_PER_WINDOW_MAX: u32 = 60;
/// The rate-limit window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Largest token request body.
pub const TOKEN_REQUEST_BYTES_MAX: usize = 4 * 1024;
/// How often the clients file is checked for changes (revocations, new clients).
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// An access token the node issued.
#[derive(Debug, Clone)]
struct Issued {
    client: String,
    scopes: Vec<Scope>,
    expires: Instant,
}

/// Counters per key in fixed windows (bounded: at most `keys_max` keys a window).
#[derive(Debug)]
struct RateWindow {
    started: Instant,
    counts: HashMap<String, u32>,
}

const RATE_KEYS_MAX: usize = 1024;

impl RateWindow {
    fn new(now: Instant) -> RateWindow {
        RateWindow { started: now, counts: HashMap::new() }
    }
    /// Counts one event for `key`; returns the count in this window.
    fn hit(&mut self, key: &str, now: Instant) -> u32 {
        if now.duration_since(self.started) >= RATE_WINDOW {
            *self = RateWindow::new(now);
        }
        let key = if self.counts.len() >= RATE_KEYS_MAX && !self.counts.contains_key(key) { "*" } else { key };
        let n = self.counts.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }
    fn retry_after_s(&self, now: Instant) -> u64 {
        RATE_WINDOW.saturating_sub(now.duration_since(self.started)).as_secs().max(1)
    }
}

struct Registry {
    clients: std::sync::Arc<FhirClients>,
    /// The clients file as last read.
    text: Option<String>,
    checked: Instant,
}

struct Tokens {
    issued: HashMap<[u8; 32], Issued>,
    requests: RateWindow,
    failures: RateWindow,
}

/// Who may call the API: static clients, the clients file (re-read when it
/// changes) and the access tokens issued to them.
pub struct Authority {
    /// Clients from the legacy token file (never re-read).
    fixed: FhirClients,
    clients_file: Option<PathBuf>,
    registry: Mutex<Registry>,
    tokens: Mutex<Tokens>,
    lifetime: Duration,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("clients_file", &self.clients_file).finish_non_exhaustive()
    }
}

/// What a valid bearer token stands for.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: String,
}

impl Authority {
    /// From the legacy token's clients (may be empty) and the clients file, read
    /// now (an unreadable or invalid file is an error here, at start).
    pub fn new(fixed: FhirClients, clients_file: Option<PathBuf>, lifetime_s: u64) -> Result<Authority, String> {
        if !(TOKEN_LIFETIME_MIN_S..=TOKEN_LIFETIME_MAX_S).contains(&lifetime_s) {
            return Err(format!(
                "token_lifetime_s = {lifetime_s}: give {TOKEN_LIFETIME_MIN_S} to {TOKEN_LIFETIME_MAX_S} seconds"
            ));
        }
        let now = Instant::now();
        let (clients, text) = match &clients_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                (FhirClients::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?, Some(text))
            }
            None => (FhirClients::default(), None),
        };
        let mut all = fixed.clone();
        all.extend(clients.clone())?;
        Ok(Authority {
            fixed,
            clients_file,
            registry: Mutex::new(Registry { clients: std::sync::Arc::new(all), text, checked: now }),
            tokens: Mutex::new(Tokens {
                issued: HashMap::new(),
                requests: RateWindow::new(now),
                failures: RateWindow::new(now),
            }),
            lifetime: Duration::from_secs(lifetime_s),
        })
    }

    /// Whether any client is registered.
    pub fn is_empty(&self) -> bool {
        self.clients().is_empty()
    }

    /// The current registry: re-reads the clients file if it changed (at most
    /// every [`RELOAD_CHECK`]). A file that no longer parses leaves the last good
    /// registry in force (logged); a missing file means no file clients.
    pub fn clients(&self) -> std::sync::Arc<FhirClients> {
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = &self.clients_file else { return reg.clients.clone() };
        if reg.checked.elapsed() < RELOAD_CHECK {
            return reg.clients.clone();
        }
        reg.checked = Instant::now();
        let text = match std::fs::metadata(path) {
            Ok(m) if m.len() > crate::fhir_auth::CLIENTS_FILE_BYTES_MAX => {
                tracing::warn!(file = %path.display(), "FHIR clients file too large; keeping the clients in force");
                return reg.clients.clone();
            }
            Ok(_) => std::fs::read_to_string(path).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(String::new()),
            Err(_) => None,
        };
        let Some(text) = text else { return reg.clients.clone() };
        if reg.text.as_deref() == Some(text.as_str()) {
            return reg.clients.clone();
        }
        match FhirClients::parse(&text) {
            Ok(clients) => {
                let mut all = self.fixed.clone();
                if let Err(e) = all.extend(clients) {
                    tracing::warn!(file = %path.display(), "FHIR clients file not applied: {e}");
                    return reg.clients.clone();
                }
                tracing::info!(file = %path.display(), clients = all.len(), "FHIR clients file re-read");
                reg.clients = std::sync::Arc::new(all);
                reg.text = Some(text);
            }
            Err(e) => tracing::warn!(file = %path.display(), "FHIR clients file not applied: {e}"),
        }
        reg.clients.clone()
    }

    /// The client presenting `authorization`, if it may do `interaction` on
    /// `resource`: an issued access token (unexpired, its client still registered
    /// and not revoked, in the token's scopes and the client's current ones), or a
    /// static token.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        resource: &str,
        interaction: Interaction,
    ) -> Result<Caller, AuthError> {
        let token = authorization.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).ok_or(AuthError::NoToken)?;
        let clients = self.clients();
        let issued = {
            let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            let key = digest(token);
            match tokens.issued.get(&key) {
                Some(t) if t.expires <= Instant::now() => {
                    tokens.issued.remove(&key);
                    return Err(AuthError::Expired);
                }
                other => other.cloned(),
            }
        };
        if let Some(t) = issued {
            let client = clients.get(&t.client).filter(|c| !c.revoked).ok_or(AuthError::UnknownToken)?;
            if t.scopes.iter().any(|s| s.allows(resource, interaction)) && client.may(resource, interaction) {
                return Ok(Caller { client: t.client });
            }
            return Err(AuthError::OutOfScope { client: t.client, resource: resource.into(), interaction });
        }
        clients.authorize(authorization, resource, interaction).map(|c| Caller { client: c.id.clone() })
    }

    /// Live issued tokens (for tests and metrics).
    pub fn live_tokens(&self) -> usize {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.issued.values().filter(|t| t.expires > Instant::now()).count()
    }

    fn issue(&self, client: &Client, scopes: Vec<Scope>) -> Result<(String, u64), TokenError> {
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| TokenError::server("no randomness"))?;
        let token = hex::encode(raw);
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.issued.retain(|_, t| t.expires > now);
        let mut mine: Vec<([u8; 32], Instant)> =
            tokens.issued.iter().filter(|(_, t)| t.client == client.id).map(|(k, t)| (*k, t.expires)).collect();
        if mine.len() >= TOKENS_PER_CLIENT_MAX {
            mine.sort_by_key(|(_, e)| *e);
            for (k, _) in &mine[..=mine.len() - TOKENS_PER_CLIENT_MAX] {
                tokens.issued.remove(k);
            }
        }
        tokens
            .issued
            .insert(digest(&token), Issued { client: client.id.clone(), scopes, expires: now + self.lifetime });
        Ok((token, self.lifetime.as_secs()))
    }
}

/// A token-endpoint error (RFC 6749 §5.2).
#[derive(Debug)]
pub struct TokenError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// `WWW-Authenticate: Basic` on a failed Basic authentication.
    basic: bool,
    retry_after_s: Option<u64>,
}

impl TokenError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> TokenError {
        TokenError { status, error, description: description.into(), basic: false, retry_after_s: None }
    }
    fn bad(error: &'static str, description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::BAD_REQUEST, error, description)
    }
    fn server(description: &str) -> TokenError {
        TokenError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", description)
    }
    /// The RFC 6749 error code.
    pub fn code(&self) -> &'static str {
        self.error
    }
}

fn no_store(response: &mut Response) {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "error_description": self.description });
        let mut response = (self.status, axum::Json(body)).into_response();
        no_store(&mut response);
        if self.basic {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"fhir\""));
        }
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// The form of a token request (`application/x-www-form-urlencoded`).
#[derive(Debug, serde::Deserialize)]
pub struct TokenForm {
    grant_type: Option<String>,
    scope: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// `Authorization: Basic` credentials: base64 of `id:secret`, each
/// form-urlencoded (RFC 6749 §2.3.1).
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let encoded = value.strip_prefix("Basic ")?.trim();
    let bytes = b64_decode(encoded)?;
    let text = String::from_utf8(bytes).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// `application/x-www-form-urlencoded` decoding of one value (`+` is a space).
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() > 1024 || !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let bytes = s.as_bytes();
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pad as u32;
        let b = n.to_be_bytes();
        out.extend_from_slice(&b[1..4 - pad]);
    }
    Some(out)
}

/// What one token request came to, for the audit log.
#[derive(Debug)]
pub struct TokenOutcome {
    /// The client id as given (checked: only a valid id's characters), if any.
    pub client: Option<String>,
    pub result: Result<String, &'static str>,
}

/// Handles one token request; returns the HTTP response and what to audit.
pub fn token_request(authority: &Authority, headers: &HeaderMap, form: TokenForm) -> (Response, TokenOutcome) {
    let mut outcome = TokenOutcome { client: None, result: Err("invalid_request") };
    let result = token_request_inner(authority, headers, form, &mut outcome.client);
    match result {
        Ok((body, scope)) => {
            outcome.result = Ok(scope);
            let mut response = (StatusCode::OK, axum::Json(body)).into_response();
            no_store(&mut response);
            (response, outcome)
        }
        Err(e) => {
            outcome.result = Err(e.error);
            (e.into_response(), outcome)
        }
    }
}

fn token_request_inner(
    authority: &Authority,
    headers: &HeaderMap,
    form: TokenForm,
    audited_client: &mut Option<String>,
) -> Result<(serde_json::Value, String), TokenError> {
    let now = Instant::now();
    let basic = match headers.get(header::AUTHORIZATION) {
        Some(v) => {
            let v = v.to_str().map_err(|_| TokenError::bad("invalid_request", "unreadable Authorization header"))?;
            Some(basic_credentials(v).ok_or_else(|| {
                let mut e = TokenError::new(StatusCode::UNAUTHORIZED, "invalid_client", "malformed Basic credentials");
                e.basic = true;
                e
            })?)
        }
        None => None,
    };
    let (id, secret, by_basic) = match (basic, &form.client_secret) {
        (Some(_), Some(_)) => {
            return Err(TokenError::bad("invalid_request", "use one client authentication method, not two"));
        }
        (Some((id, secret)), None) => {
            if form.client_id.as_ref().is_some_and(|f| f != &id) {
                return Err(TokenError::bad("invalid_request", "client_id differs from the Basic credentials"));
            }
            (id, secret, true)
        }
        (None, Some(secret)) => {
            let id = form
                .client_id
                .clone()
                .ok_or_else(|| TokenError::bad("invalid_request", "client_secret without client_id"))?;
            (id, secret.clone(), false)
        }
        (None, None) => {
            let mut e = TokenError::new(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication required");
            e.basic = true;
            return Err(e);
        }
    };
    if valid_client_id(&id) {
        *audited_client = Some(id.clone());
    }
    let clients = authority.clients();
    // The secret's digest is compared in constant time; client ids are not secret
    // (they are in the audit log), so finding the id first leaks nothing.
    let client = clients.get(&id).filter(|c| c.secret_matches(&secret));
    let Some(client) = client else {
        let mut tokens = authority.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let failures = tokens.failures.hit("*", now);
        if failures > AUTH_FAILURES_PER_WINDOW_MAX {
            let mut e = TokenError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                "too many failed client authentications; retry later",
            );
            e.retry_after_s = Some(tokens.failures.retry_after_s(now));
            return Err(e);
        }
        let mut e =
            TokenError::new(StatusCode::UNAUTHORIZED, "invalid_client", "unknown client, wrong secret or revoked");
        e.basic = by_basic;
        return Err(e);
    };
    {
        let mut tokens = authority.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.requests.hit(&client.id, now) > TOKEN_REQUESTS_PER_WINDOW_MAX {
            let mut e = TokenError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                format!(
                    "more than {TOKEN_REQUESTS_PER_WINDOW_MAX} token requests a minute; reuse the token until it expires"
                ),
            );
            e.retry_after_s = Some(tokens.requests.retry_after_s(now));
            return Err(e);
        }
    }
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(other) => {
            let shown: String = other.chars().take(40).filter(|c| c.is_ascii_graphic()).collect();
            return Err(TokenError::bad("unsupported_grant_type", format!("grant_type {shown} is not supported here")));
        }
        None => return Err(TokenError::bad("invalid_request", "grant_type is required")),
    }
    let scopes: Vec<Scope> = match form.scope.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => client.scopes.clone(),
        Some(asked) => {
            let parts: Vec<&str> = asked.split_ascii_whitespace().collect();
            if parts.len() > crate::fhir_auth::SCOPES_MAX {
                return Err(TokenError::bad("invalid_scope", "too many scopes"));
            }
            let mut out = Vec::new();
            for part in parts {
                let scope: Scope = part.parse().map_err(|e: String| TokenError::bad("invalid_scope", e))?;
                if !client.scopes.iter().any(|mine| mine.covers(&scope)) {
                    return Err(TokenError::bad(
                        "invalid_scope",
                        format!("{scope} is not within the scopes registered for this client"),
                    ));
                }
                out.push(scope);
            }
            out
        }
    };
    let scope_text = scopes.iter().map(Scope::to_string).collect::<Vec<_>>().join(" ");
    let (token, expires_in) = authority.issue(client, scopes)?;
    let body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": scope_text,
    });
    Ok((body, scope_text))
}

/// `POST /fhir/auth/token`.
pub async fn token_endpoint(
    State(s): State<crate::fhir::FhirState>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let (response, outcome) = match form {
        Ok(Form(form)) => token_request(&s.authority, &headers, form),
        Err(e) => {
            let status = e.status();
            let mut r = TokenError::bad("invalid_request", format!("the body must be a form: {}", e.body_text()));
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                r.status = status;
            }
            (r.into_response(), TokenOutcome { client: None, result: Err("invalid_request") })
        }
    };
    let client = outcome.client.as_deref().unwrap_or("?");
    let (kind, detail) = match &outcome.result {
        Ok(scope) => ("fhir.token", format!("client {client}: access token issued, scope {scope}")),
        Err(code) => ("fhir.token_refused", format!("client {client}: token request refused: {code}")),
    };
    match s.audit(kind, None, outcome.client.as_deref(), &detail, outcome.result.is_err()).await {
        Ok(()) => response,
        Err(e) => e.into_response(),
    }
}

/// `GET /fhir/.well-known/smart-configuration` (SMART App Launch 2.x discovery):
/// the token endpoint and what it supports. No token needed.
pub fn smart_configuration(base: &str) -> serde_json::Value {
    json!({
        "issuer": base,
        "token_endpoint": format!("{base}/auth/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": ["system/ServiceRequest.rs", "system/Task.rs", "system/DiagnosticReport.rs", "system/Observation.rs", "system/AuditEvent.rs", "system/*.rs"],
        "capabilities": ["client-confidential-symmetric"],
        "code_challenge_methods_supported": [],
    })
}

/// The base URL of the API as the caller reached it (`http://<Host>/fhir`).
pub fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .unwrap_or("localhost");
    format!("http://{host}/fhir")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(dir: &std::path::Path) -> (Authority, String, PathBuf) {
        let path = dir.join("clients.toml");
        let now = federation_proto::Millis(0);
        let secret = crate::fhir_auth::add_client(
            &path,
            "engine",
            &["system/Task.rs".into(), "system/Observation.r".into()],
            now,
        )
        .unwrap();
        (Authority::new(FhirClients::default(), Some(path.clone()), 60).unwrap(), secret, path)
    }

    fn form(grant: &str, scope: Option<&str>, id: Option<&str>, secret: Option<&str>) -> TokenForm {
        TokenForm {
            grant_type: Some(grant.into()),
            scope: scope.map(Into::into),
            client_id: id.map(Into::into),
            client_secret: secret.map(Into::into),
        }
    }

    fn basic(id: &str, secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!("Basic {}", crate::fhir::b64(format!("{id}:{secret}").as_bytes()));
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    fn token_of(r: (Response, TokenOutcome)) -> Result<(), (StatusCode, &'static str)> {
        let (response, outcome) = r;
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        outcome.result.map(|_| ()).map_err(|code| (response.status(), code))
    }

    #[test]
    fn base64_decoding_round_trips_and_refuses_junk() {
        for raw in ["", "f", "fo", "foo", "engine:0123", "a:b:c"] {
            assert_eq!(b64_decode(&crate::fhir::b64(raw.as_bytes())).unwrap(), raw.as_bytes());
        }
        for bad in ["Zg=", "Z===", "Zg==Zg==", "****", "Zm9v!"] {
            assert!(b64_decode(bad).is_none(), "{bad}");
        }
        assert_eq!(basic_credentials("Basic ZW5naW5lOnMlM0FjcmV0"), Some(("engine".into(), "s:cret".into())));
    }

    #[test]
    fn client_credentials_grant_issues_scoped_tokens_and_refuses_per_rfc_6749() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, secret, _) = authority(dir.path());
        let none = HeaderMap::new();
        // Basic and post both work; no scope asked: every registered scope.
        let (_, out) = token_request(&auth, &basic("engine", &secret), form("client_credentials", None, None, None));
        assert_eq!(out.result.unwrap(), "system/Task.rs system/Observation.r");
        let (_, out) = token_request(
            &auth,
            &none,
            form("client_credentials", Some("system/Task.s"), Some("engine"), Some(&secret)),
        );
        assert_eq!(out.result.unwrap(), "system/Task.s");
        assert_eq!(auth.live_tokens(), 2);
        let refused = |h: &HeaderMap, f| token_of(token_request(&auth, h, f)).unwrap_err();
        assert_eq!(
            refused(&none, form("client_credentials", None, Some("engine"), Some("wrong"))),
            (StatusCode::UNAUTHORIZED, "invalid_client")
        );
        assert_eq!(
            refused(&basic("nobody", &secret), form("client_credentials", None, None, None)),
            (StatusCode::UNAUTHORIZED, "invalid_client")
        );
        assert_eq!(refused(&none, form("client_credentials", None, None, None)).1, "invalid_client");
        assert_eq!(
            refused(&basic("engine", &secret), form("password", None, None, None)),
            (StatusCode::BAD_REQUEST, "unsupported_grant_type")
        );
        assert_eq!(
            refused(&basic("engine", &secret), form("client_credentials", Some("system/*.rs"), None, None)),
            (StatusCode::BAD_REQUEST, "invalid_scope")
        );
        assert_eq!(
            refused(&basic("engine", &secret), form("client_credentials", Some("system/Observation.rs"), None, None)).1,
            "invalid_scope"
        );
        assert_eq!(
            refused(&basic("engine", &secret), form("client_credentials", Some("patient/Task.rs"), None, None)).1,
            "invalid_scope"
        );
        assert_eq!(
            refused(&basic("engine", &secret), form("client_credentials", None, None, Some(&secret))).1,
            "invalid_request",
            "two authentication methods"
        );
    }

    #[test]
    fn tokens_expire_stay_in_scope_die_with_revocation_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, secret, path) = authority(dir.path());
        let client = auth.clients().get("engine").unwrap().clone();
        let (token, expires_in) = auth.issue(&client, vec!["system/Task.r".parse().unwrap()]).unwrap();
        assert_eq!(expires_in, 60);
        let bearer = format!("Bearer {token}");
        assert_eq!(auth.authorize(Some(&bearer), "Task", Interaction::Read).unwrap().client, "engine");
        assert!(matches!(
            auth.authorize(Some(&bearer), "Task", Interaction::Search),
            Err(AuthError::OutOfScope { .. })
        ));
        assert!(matches!(
            auth.authorize(Some(&bearer), "Observation", Interaction::Read),
            Err(AuthError::OutOfScope { .. })
        ));
        assert_eq!(
            auth.authorize(Some("Bearer nope"), "Task", Interaction::Read).unwrap_err(),
            AuthError::UnknownToken
        );
        // Expired: 401 (the store's entry is backdated; waiting a minute is too slow).
        auth.tokens.lock().unwrap().issued.get_mut(&digest(&token)).unwrap().expires = Instant::now();
        assert_eq!(auth.authorize(Some(&bearer), "Task", Interaction::Read).unwrap_err(), AuthError::Expired);
        assert_eq!(auth.authorize(Some(&bearer), "Task", Interaction::Read).unwrap_err(), AuthError::UnknownToken);
        // At most TOKENS_PER_CLIENT_MAX live tokens: the oldest go.
        let first = auth.issue(&client, client.scopes.clone()).unwrap().0;
        for _ in 0..TOKENS_PER_CLIENT_MAX {
            auth.issue(&client, client.scopes.clone()).unwrap();
        }
        assert_eq!(auth.live_tokens(), TOKENS_PER_CLIENT_MAX);
        assert!(auth.authorize(Some(&format!("Bearer {first}")), "Task", Interaction::Read).is_err());
        // Revocation in the file: the live token stops working once re-read.
        let (live, _) = auth.issue(&client, client.scopes.clone()).unwrap();
        crate::fhir_auth::revoke_client(&path, "engine").unwrap();
        auth.registry.lock().unwrap().checked -= RELOAD_CHECK;
        assert_eq!(
            auth.authorize(Some(&format!("Bearer {live}")), "Task", Interaction::Read).unwrap_err(),
            AuthError::UnknownToken
        );
        let (_, out) = token_request(&auth, &basic("engine", &secret), form("client_credentials", None, None, None));
        assert_eq!(out.result.unwrap_err(), "invalid_client");
    }

    #[test]
    fn token_requests_are_rate_limited_per_client_and_failures_overall() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, secret, _) = authority(dir.path());
        for _ in 0..TOKEN_REQUESTS_PER_WINDOW_MAX {
            let (_, out) =
                token_request(&auth, &basic("engine", &secret), form("client_credentials", None, None, None));
            assert!(out.result.is_ok());
        }
        let (response, out) =
            token_request(&auth, &basic("engine", &secret), form("client_credentials", None, None, None));
        assert_eq!(
            (response.status(), out.result.unwrap_err()),
            (StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable")
        );
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        for _ in 0..AUTH_FAILURES_PER_WINDOW_MAX {
            let (r, _) = token_request(&auth, &basic("engine", "guess"), form("client_credentials", None, None, None));
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        let (r, _) = token_request(&auth, &basic("engine", "guess"), form("client_credentials", None, None, None));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }
}
