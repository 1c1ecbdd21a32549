//! Accounts, sessions, CSRF tokens and login rate limiting for the web UI.
//!
//! Users live in `users.json` in the node's data directory (mode 0600), written by
//! `telemed-node user add`; passwords are stored only as Argon2id PHC strings.
//! Sessions are held in memory (a restart logs everyone out): a random 256-bit id in
//! an `HttpOnly; SameSite=Strict` cookie (`Secure` when the UI is served through a
//! TLS proxy), an expiry, and a per-session synchronizer CSRF token compared in
//! constant time. This module must never log or store a password or a session id.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Sessions held at once at most (logged in or waiting on the login form).
pub const SESSIONS_MAX: usize = 10_000;
/// A login form's anonymous session lives this long.
pub const LOGIN_FORM_TTL: Duration = Duration::from_secs(30 * 60);
/// Failed logins allowed per user name per window.
pub const LOGIN_FAILURES_MAX: u32 = 5;
/// Failed logins allowed per client address per window (a shared reading room
/// may sit behind one address).
pub const LOGIN_FAILURES_PER_ADDR_MAX: u32 = 20;
/// The window of [`LOGIN_FAILURES_MAX`]; a locked-out name waits this long.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Rate-limit entries kept at most (oldest windows are dropped first).
pub const RATE_ENTRIES_MAX: usize = 10_000;
/// Shortest password `user add` accepts.
pub const PASSWORD_LEN_MIN: usize = 8;
/// Longest password accepted anywhere (argon2 cost is per byte of input).
pub const PASSWORD_LEN_MAX: usize = 256;
/// The session cookie's name, before the server's port (`telemed_session_8080`).
pub const COOKIE: &str = "telemed_session";

/// What a user may do. Enforced by the server on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads cases in this node's consult queue: claim, release, report, escalate.
    Expert,
    /// Submits cases from this node and reads their reports.
    Clinician,
    /// Sees the admin page (identity, links, queues, audit).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Expert => "expert",
            Role::Clinician => "clinician",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "expert" => Ok(Role::Expert),
            "clinician" => Ok(Role::Clinician),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role `{other}` (expert, clinician or admin)")),
        }
    }
}

/// One account in `users.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// Argon2id, PHC string format.
    pub password_hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<User>,
}

/// Why an account could not be added or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The users file of a node whose data directory is `data_dir`.
pub fn users_path(data_dir: &Path) -> PathBuf {
    data_dir.join("users.json")
}

fn read_users(path: &Path) -> Result<UsersFile, AccountError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| AccountError::Parse { path: path.into(), message: e.to_string() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UsersFile::default()),
        Err(source) => Err(AccountError::Io { path: path.into(), source }),
    }
}

/// Hashes `password` with Argon2id and a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| AccountError::Invalid(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Invalid(format!("hashing failed: {e}")))
}

/// Adds (or replaces the password and role of) `name` in the node's users file.
pub fn add_user(data_dir: &Path, name: &str, role: Role, password: &str) -> Result<(), AccountError> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !name_ok {
        return Err(AccountError::Invalid(format!(
            "user name `{name}`: 1 to 64 characters of letters, digits, `.`, `-`, `_`"
        )));
    }
    if password.len() < PASSWORD_LEN_MIN || password.len() > PASSWORD_LEN_MAX {
        return Err(AccountError::Invalid(format!(
            "password must be {PASSWORD_LEN_MIN} to {PASSWORD_LEN_MAX} bytes long"
        )));
    }
    std::fs::create_dir_all(data_dir).map_err(|source| AccountError::Io { path: data_dir.into(), source })?;
    let path = users_path(data_dir);
    let mut file = read_users(&path)?;
    let user = User { name: name.to_owned(), role, password_hash: hash_password(password)? };
    file.users.retain(|u| u.name != name);
    file.users.push(user);
    let text = serde_json::to_string_pretty(&file).map_err(|e| AccountError::Invalid(e.to_string()))?;
    // Written to a temporary file with mode 0600, then renamed over the old one.
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| AccountError::Io { path: tmp.clone(), source })?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|source| AccountError::Io { path: tmp.clone(), source })?;
    }
    std::fs::rename(&tmp, &path).map_err(|source| AccountError::Io { path: path.clone(), source })
}

/// Checks a name and password against the users file. `None` if either is wrong
/// (the same answer for both, and the same work: an unknown name is hashed too).
pub fn verify_login(data_dir: &Path, name: &str, password: &str) -> Result<Option<User>, AccountError> {
    if password.len() > PASSWORD_LEN_MAX {
        return Ok(None);
    }
    let file = read_users(&users_path(data_dir))?;
    let user = file.users.into_iter().find(|u| u.name == name);
    let hash = match &user {
        Some(u) => u.password_hash.clone(),
        // A fixed, valid hash so unknown names cost as much as known ones.
        None => DUMMY_HASH.get_or_init(|| hash_password("not a password of anyone").unwrap_or_default()).clone(),
    };
    let Ok(parsed) = PasswordHash::new(&hash) else {
        return Err(AccountError::Invalid(format!("user {name}: stored hash is not a PHC string")));
    };
    let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
    Ok(if ok { user } else { None })
}

static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// One browser session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Logged-in user and role; `None` while on the login form.
    pub user: Option<(String, Role)>,
    /// The synchronizer token every form and state-changing request must carry.
    pub csrf: String,
    pub expires_at: Instant,
}

/// 256 random bits, hex.
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Constant-time comparison of a presented CSRF token with the session's.
pub fn csrf_matches(session: &Session, presented: &str) -> bool {
    let (a, b) = (session.csrf.as_bytes(), presented.as_bytes());
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The sessions of one web server.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session; `None` when [`SESSIONS_MAX`] live sessions exist.
    pub fn create(&self, user: Option<(String, Role)>, ttl: Duration) -> Option<(String, Session)> {
        let mut map = self.lock();
        if map.len() >= SESSIONS_MAX {
            let now = Instant::now();
            map.retain(|_, s| s.expires_at > now);
            if map.len() >= SESSIONS_MAX {
                return None;
            }
        }
        let id = random_token();
        let session = Session { user, csrf: random_token(), expires_at: Instant::now() + ttl };
        map.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session with this id (expired ones are dropped).
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.expires_at > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Failed-login counters per key (user name, client address).
#[derive(Debug, Default)]
pub struct LoginLimiter {
    map: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginLimiter {
    /// Whether `key` may try to log in now, after at most `max` failures per window.
    pub fn allowed(&self, key: &str, max: u32) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((n, since)) => *n < max || since.elapsed() > LOGIN_WINDOW,
            None => true,
        }
    }

    pub fn failed(&self, key: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RATE_ENTRIES_MAX {
            map.retain(|_, (_, since)| since.elapsed() <= LOGIN_WINDOW);
            if map.len() >= RATE_ENTRIES_MAX {
                // Still full: forget the oldest window rather than grow.
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| k.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        let entry = map.entry(key.to_owned()).or_insert((0, Instant::now()));
        if entry.1.elapsed() > LOGIN_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, key: &str) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_user_logs_in_with_their_password_only() {
        let dir = tempfile::tempdir().unwrap();
        add_user(dir.path(), "dr.li", Role::Expert, "correct horse").unwrap();
        let text = std::fs::read_to_string(users_path(dir.path())).unwrap();
        assert!(text.contains("$argon2id$"), "stored as an Argon2id PHC string");
        assert!(!text.contains("correct horse"), "never the password itself");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(users_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let user = verify_login(dir.path(), "dr.li", "correct horse").unwrap().unwrap();
        assert_eq!(user.role, Role::Expert);
        assert!(verify_login(dir.path(), "dr.li", "wrong horse!").unwrap().is_none());
        assert!(verify_login(dir.path(), "nobody", "correct horse").unwrap().is_none());
    }

    #[test]
    fn bad_names_and_short_passwords_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(add_user(dir.path(), "<script>", Role::Admin, "long enough").is_err());
        assert!(add_user(dir.path(), "ok", Role::Admin, "short").is_err());
    }

    #[test]
    fn csrf_compare_needs_the_exact_token() {
        let s = Session { user: None, csrf: "ab".repeat(32), expires_at: Instant::now() };
        assert!(csrf_matches(&s, &"ab".repeat(32)));
        assert!(!csrf_matches(&s, &"ab".repeat(31)));
        assert!(!csrf_matches(&s, &format!("{}ac", "ab".repeat(31))));
        assert!(!csrf_matches(&s, ""));
    }

    #[test]
    fn limiter_locks_a_key_after_the_allowed_failures() {
        let l = LoginLimiter::default();
        for _ in 0..LOGIN_FAILURES_MAX {
            assert!(l.allowed("u", LOGIN_FAILURES_MAX));
            l.failed("u");
        }
        assert!(!l.allowed("u", LOGIN_FAILURES_MAX));
        assert!(l.allowed("u", LOGIN_FAILURES_PER_ADDR_MAX));
        assert!(l.allowed("v", LOGIN_FAILURES_MAX));
    }

    #[test]
    fn sessions_expire_and_are_bounded() {
        let s = Sessions::default();
        let (id, _) = s.create(None, Duration::from_millis(0)).unwrap();
        assert!(s.get(&id).is_none(), "expired session is gone");
        let (id, sess) = s.create(Some(("a".into(), Role::Admin)), Duration::from_secs(60)).unwrap();
        assert_eq!(id.len(), 64, "256 bits");
        assert_ne!(id, sess.csrf);
        assert!(s.get(&id).is_some());
    }
}
