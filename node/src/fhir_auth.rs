//! Who may call the FHIR API (ADR 0008, ADR 0011): registered clients, each with
//! SMART-style system scopes and a client secret for the OAuth 2.0
//! client-credentials grant (`fhir_oauth.rs`), and/or a static bearer token; both
//! stored only as their SHA-256.
//!
//! A client file (`[fhir] clients_file`, written by `telemed-node fhir client
//! add|revoke`, see [`add_client`] and [`revoke_client`]) lists the hospital systems:
//!
//! ```toml
//! [[client]]
//! id = "his-integration-engine"
//! secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! scopes = ["system/ServiceRequest.rs", "system/Task.rs", "system/DiagnosticReport.rs", "system/Observation.rs"]
//! added = "2026-11-28T09:52:41.123Z"
//! # revoked = true: no new access tokens, and those issued stop working
//! # token_sha256 = "...": a static bearer token (ADR 0008), optional
//! ```
//!
//! Secrets and tokens are 256-bit random values, so a plain SHA-256 (not a slow
//! password hash) is enough to make a stolen file useless.
//!
//! Scopes follow SMART App Launch v2 system scopes, `system/<Type or *>.<perms>`,
//! where perms is a subset of `cruds` in that order (this API serves `r` read by id
//! and `s` search) or the v1 forms `read` (= `rs`) and `*`. A token with no scope for
//! a resource type gets 403; an unknown token 401. The old single `token_file` is a
//! client named `token-file` with `system/*.rs`.
//!
//! This module never stores or logs a token or secret, only its digest and the
//! client id.

use std::path::Path;

use subtle::ConstantTimeEq;

/// Most clients in one file.
pub const CLIENTS_MAX: usize = 256;
/// Most scopes of one client.
pub const SCOPES_MAX: usize = 64;
/// Shortest token accepted from the legacy token file.
pub const TOKEN_CHARS_MIN: usize = 16;

/// What a request does with a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    /// GET `[type]/[id]`: the `r` permission.
    Read,
    /// GET `[type]?...`: the `s` permission.
    Search,
}

/// One granted scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The resource type, `None` for `*`.
    pub resource: Option<String>,
    pub read: bool,
    pub search: bool,
    /// `c`, `u`, `d` (v1 `write`): parsed and kept, granting nothing here (the API
    /// is read-only), but part of what a client may ask for in a token.
    pub write: [bool; 3],
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        let bad = |why: &str| format!("scope {s:?}: {why} (expected system/<Type or *>.<perms>)");
        let rest = s.strip_prefix("system/").ok_or_else(|| bad("only system scopes are accepted"))?;
        let (resource, perms) = rest.split_once('.').ok_or_else(|| bad("no permissions"))?;
        if resource.is_empty() || !(resource == "*" || resource.chars().all(|c| c.is_ascii_alphanumeric())) {
            return Err(bad("bad resource type"));
        }
        let p = match perms {
            "read" => "rs",
            "write" => "cud",
            "*" => "cruds",
            p => {
                // v2: a subsequence of "cruds", in that order.
                let mut order = "cruds".chars();
                if p.is_empty() || !p.chars().all(|c| order.any(|o| o == c)) {
                    return Err(bad("permissions must be read, write, *, or letters of cruds in order"));
                }
                p
            }
        };
        Ok(Scope {
            resource: (resource != "*").then(|| resource.to_owned()),
            read: p.contains('r'),
            search: p.contains('s'),
            write: [p.contains('c'), p.contains('u'), p.contains('d')],
        })
    }
}

impl std::fmt::Display for Scope {
    /// The SMART v2 form, `system/<Type or *>.<cruds letters>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [c, u, d] = self.write;
        let perms: String = [(c, 'c'), (self.read, 'r'), (u, 'u'), (d, 'd'), (self.search, 's')]
            .iter()
            .filter_map(|&(on, letter)| on.then_some(letter))
            .collect();
        write!(f, "system/{}.{perms}", self.resource.as_deref().unwrap_or("*"))
    }
}

impl Scope {
    /// Whether this scope grants everything `asked` grants (a client may ask for
    /// a token with any part of its registered scopes, never more).
    pub fn covers(&self, asked: &Scope) -> bool {
        let type_ok = match (&self.resource, &asked.resource) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
            (Some(_), None) => false,
        };
        let perm_ok = |mine: bool, theirs: bool| mine || !theirs;
        type_ok
            && perm_ok(self.read, asked.read)
            && perm_ok(self.search, asked.search)
            && (0..3).all(|i| perm_ok(self.write[i], asked.write[i]))
    }

    pub(crate) fn allows(&self, resource: &str, interaction: Interaction) -> bool {
        self.resource.as_deref().is_none_or(|r| r == resource)
            && match interaction {
                Interaction::Read => self.read,
                Interaction::Search => self.search,
            }
    }
}

/// One registered client.
#[derive(Debug, Clone)]
pub struct Client {
    pub id: String,
    /// A static bearer token (ADR 0008), if the client has one.
    token_sha256: Option<[u8; 32]>,
    /// The client-credentials secret (`fhir_oauth.rs`), if the client has one.
    secret_sha256: Option<[u8; 32]>,
    pub scopes: Vec<Scope>,
    /// Revoked clients stay listed (who had access, until when) but get nothing.
    pub revoked: bool,
    /// When `fhir client add` registered it (FHIR instant), if known.
    pub added: Option<String>,
}

impl Client {
    /// Whether `secret` is this client's secret (constant time; false when revoked
    /// or without one).
    pub fn secret_matches(&self, secret: &str) -> bool {
        let ok = self.secret_sha256.is_some_and(|d| bool::from(d.ct_eq(&digest(secret))));
        ok && !self.revoked
    }

    /// Whether one of the client's scopes lets it do `interaction` on `resource`.
    pub fn may(&self, resource: &str, interaction: Interaction) -> bool {
        !self.revoked && self.scopes.iter().any(|s| s.allows(resource, interaction))
    }
}

#[derive(serde::Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    client: Vec<ClientEntry>,
}

#[derive(serde::Deserialize, serde::Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_sha256: Option<String>,
    scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    added: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    revoked: bool,
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an Authorization: Bearer token is required")]
    NoToken,
    #[error("the bearer token is not valid here")]
    UnknownToken,
    #[error("the access token has expired; ask the token endpoint for a new one")]
    Expired,
    #[error("client {client} has no scope for {interaction:?} on {resource}")]
    OutOfScope { client: String, resource: String, interaction: Interaction },
}

/// The clients the API admits.
#[derive(Debug, Clone, Default)]
pub struct FhirClients {
    clients: Vec<Client>,
}

pub(crate) fn digest(token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.trim().as_bytes()).into()
}

impl FhirClients {
    /// The single shared token of `[fhir] token_file`: every resource, read and search.
    pub fn from_legacy_token(token: &str) -> Result<FhirClients, String> {
        let token = token.trim();
        if token.chars().count() < TOKEN_CHARS_MIN {
            return Err(format!("the FHIR token is shorter than {TOKEN_CHARS_MIN} characters"));
        }
        let scopes = vec!["system/*.rs".parse()?];
        let client = Client {
            id: "token-file".into(),
            token_sha256: Some(digest(token)),
            secret_sha256: None,
            scopes,
            revoked: false,
            added: None,
        };
        Ok(FhirClients { clients: vec![client] })
    }

    /// Parses a clients file (see the module doc).
    pub fn parse(text: &str) -> Result<FhirClients, String> {
        let file: ClientsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.client.len() > CLIENTS_MAX {
            return Err(format!("{} clients (at most {CLIENTS_MAX})", file.client.len()));
        }
        let mut clients: Vec<Client> = Vec::new();
        for c in file.client {
            if c.id.is_empty() || clients.iter().any(|o| o.id == c.id) {
                return Err(format!("client id {:?} is empty or listed twice", c.id));
            }
            if !valid_client_id(&c.id) {
                return Err(format!("client id {:?}: use 1 to {CLIENT_ID_CHARS_MAX} of A-Z a-z 0-9 . _ -", c.id));
            }
            let hash = |field: &str, v: &Option<String>| -> Result<Option<[u8; 32]>, String> {
                v.as_deref()
                    .map(|h| {
                        hex::decode(h.trim())
                            .ok()
                            .and_then(|b| <[u8; 32]>::try_from(b).ok())
                            .ok_or_else(|| format!("client {}: {field} must be 64 hex digits", c.id))
                    })
                    .transpose()
            };
            let token_sha256 = hash("token_sha256", &c.token_sha256)?;
            let secret_sha256 = hash("secret_sha256", &c.secret_sha256)?;
            if token_sha256.is_none() && secret_sha256.is_none() {
                return Err(format!("client {}: needs a secret_sha256 or a token_sha256", c.id));
            }
            if c.scopes.len() > SCOPES_MAX {
                return Err(format!("client {}: more than {SCOPES_MAX} scopes", c.id));
            }
            let scopes = c.scopes.iter().map(|s| s.parse()).collect::<Result<Vec<Scope>, String>>()?;
            clients.push(Client { id: c.id, token_sha256, secret_sha256, scopes, revoked: c.revoked, added: c.added });
        }
        Ok(FhirClients { clients })
    }

    pub fn load(path: &Path) -> Result<FhirClients, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Adds the clients of `other` (ids must stay unique).
    pub fn extend(&mut self, other: FhirClients) -> Result<(), String> {
        for c in other.clients {
            if self.clients.iter().any(|o| o.id == c.id) {
                return Err(format!("client id {:?} listed twice", c.id));
            }
            self.clients.push(c);
        }
        Ok(())
    }

    /// The client registered as `id`, revoked or not.
    pub fn get(&self, id: &str) -> Option<&Client> {
        self.clients.iter().find(|c| c.id == id)
    }

    /// Every registered client, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.clients.iter()
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The client presenting `authorization` (the header's value), if it may do
    /// `interaction` on `resource`. Every client's digest is compared, in constant
    /// time, whatever matched.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        resource: &str,
        interaction: Interaction,
    ) -> Result<&Client, AuthError> {
        let token = authorization.and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).ok_or(AuthError::NoToken)?;
        let presented = digest(token);
        let mut found = None;
        for c in &self.clients {
            let stored = c.token_sha256.unwrap_or([0; 32]);
            if bool::from(stored.ct_eq(&presented)) && c.token_sha256.is_some() && !c.revoked {
                found = Some(c);
            }
        }
        let client = found.ok_or(AuthError::UnknownToken)?;
        if client.may(resource, interaction) {
            Ok(client)
        } else {
            Err(AuthError::OutOfScope { client: client.id.clone(), resource: resource.into(), interaction })
        }
    }
}

/// Longest client id.
pub const CLIENT_ID_CHARS_MAX: usize = 64;
/// Largest clients file read.
pub const CLIENTS_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// A client id: 1 to [`CLIENT_ID_CHARS_MAX`] of `A-Z a-z 0-9 . _ -` (it is written
/// to the audit log and the clients file as it is).
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= CLIENT_ID_CHARS_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn read_file(path: &Path) -> Result<ClientsFile, String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ClientsFile::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
        Ok(m) if m.len() > CLIENTS_FILE_BYTES_MAX => {
            return Err(format!("{}: larger than {CLIENTS_FILE_BYTES_MAX} bytes", path.display()));
        }
        Ok(_) => {}
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Checked as the node reads it (ids, digests, scopes) before it is edited.
    FhirClients::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes the file whole: a temporary file (mode 0600) renamed over it, so the
/// node, which re-reads it while running, sees the old or the new file, never half.
fn write_file(path: &Path, file: &ClientsFile) -> Result<(), String> {
    use std::io::Write;
    let text = format!(
        "# FHIR API clients (telemed-node fhir client add|list|revoke). Digests only: the\n\
         # secrets were shown once, when each client was added.\n{}",
        toml::to_string(file).map_err(|e| e.to_string())?
    );
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Registers client `id` with `scopes` in the clients file at `path` (created if
/// missing) and returns its new secret: 256 random bits as 64 hex digits, shown
/// to the caller once and stored only as its SHA-256.
pub fn add_client(path: &Path, id: &str, scopes: &[String], now: federation_proto::Millis) -> Result<String, String> {
    if !valid_client_id(id) {
        return Err(format!("client id {id:?}: use 1 to {CLIENT_ID_CHARS_MAX} of A-Z a-z 0-9 . _ -"));
    }
    if scopes.is_empty() || scopes.len() > SCOPES_MAX {
        return Err(format!("give 1 to {SCOPES_MAX} scopes (--scope system/Task.rs ...)"));
    }
    let scopes =
        scopes.iter().map(|s| s.parse::<Scope>().map(|s| s.to_string())).collect::<Result<Vec<String>, String>>()?;
    let mut file = read_file(path)?;
    if file.client.iter().any(|c| c.id == id) {
        return Err(format!("client {id} is already registered (revoke it and add it under a new id)"));
    }
    if file.client.len() >= CLIENTS_MAX {
        return Err(format!("already {CLIENTS_MAX} clients"));
    }
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| "no randomness from the operating system".to_owned())?;
    let secret = hex::encode(raw);
    file.client.push(ClientEntry {
        id: id.to_owned(),
        secret_sha256: Some(hex::encode(digest(&secret))),
        token_sha256: None,
        scopes,
        added: Some(crate::fhir::instant(now)),
        revoked: false,
    });
    write_file(path, &file)?;
    Ok(secret)
}

/// Marks client `id` revoked in the clients file: it gets no new access tokens,
/// and a running node stops accepting the ones it issued within
/// `fhir_oauth::RELOAD_CHECK` (it re-reads the file).
pub fn revoke_client(path: &Path, id: &str) -> Result<(), String> {
    let mut file = read_file(path)?;
    let entry = file.client.iter_mut().find(|c| c.id == id).ok_or_else(|| format!("no client {id}"))?;
    if entry.revoked {
        return Err(format!("client {id} is already revoked"));
    }
    entry.revoked = true;
    write_file(path, &file)
}

/// The clients in the file at `path`: id, scopes, added, revoked (no digests).
pub fn list_clients(path: &Path) -> Result<Vec<Client>, String> {
    let text = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        _ => {
            read_file(path)?;
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    Ok(FhirClients::parse(&text)?.clients)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(t: &str) -> String {
        hex::encode(digest(t))
    }

    #[test]
    fn scopes_parse_in_smart_v1_and_v2_forms_and_bad_ones_are_refused() {
        let s: Scope = "system/Task.rs".parse().unwrap();
        assert_eq!(s, Scope { resource: Some("Task".into()), read: true, search: true, write: [false; 3] });
        let s: Scope = "system/*.read".parse().unwrap();
        assert_eq!(s, Scope { resource: None, read: true, search: true, write: [false; 3] });
        assert_eq!(s.to_string(), "system/*.rs");
        let s: Scope = "system/Observation.r".parse().unwrap();
        assert!(s.read && !s.search);
        let s: Scope = "system/Task.cu".parse().unwrap();
        assert!(!s.read && !s.search && s.write == [true, true, false]);
        assert_eq!("system/Task.*".parse::<Scope>().unwrap().to_string(), "system/Task.cruds");
        for bad in [
            "patient/Task.rs",
            "user/*.read",
            "system/Task",
            "system/.rs",
            "system/Task.sr",
            "system/Ta-sk.rs",
            "system/Task.x",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn each_client_gets_exactly_its_scopes() {
        let file = format!(
            "[[client]]\nid = \"engine\"\ntoken_sha256 = \"{}\"\nscopes = [\"system/Task.rs\", \"system/DiagnosticReport.r\"]\n\
             [[client]]\nid = \"security\"\ntoken_sha256 = \"{}\"\nscopes = [\"system/AuditEvent.s\"]\n",
            hash("engine-token-0123456789"),
            hash("security-token-0123456789")
        );
        let clients = FhirClients::parse(&file).unwrap();
        let auth = |t: &str, r: &str, i| clients.authorize(Some(&format!("Bearer {t}")), r, i).map(|c| c.id.clone());
        assert_eq!(auth("engine-token-0123456789", "Task", Interaction::Search).unwrap(), "engine");
        assert_eq!(auth("engine-token-0123456789", "DiagnosticReport", Interaction::Read).unwrap(), "engine");
        assert!(matches!(
            auth("engine-token-0123456789", "AuditEvent", Interaction::Search),
            Err(AuthError::OutOfScope { .. })
        ));
        assert!(matches!(
            auth("engine-token-0123456789", "DiagnosticReport", Interaction::Search),
            Err(AuthError::OutOfScope { .. })
        ));
        assert_eq!(auth("security-token-0123456789", "AuditEvent", Interaction::Search).unwrap(), "security");
        assert!(matches!(
            auth("security-token-0123456789", "Task", Interaction::Read),
            Err(AuthError::OutOfScope { .. })
        ));
        assert_eq!(auth("nobody-0123456789", "Task", Interaction::Read), Err(AuthError::UnknownToken));
        assert_eq!(clients.authorize(None, "Task", Interaction::Read).map(|c| c.id.clone()), Err(AuthError::NoToken));
        // The file holds digests only: the token itself is nowhere in it.
        assert!(!file.contains("engine-token"));
    }

    #[test]
    fn a_bad_clients_file_is_refused_with_the_reason() {
        for (text, why) in [
            ("[[client]]\nid = \"a\"\ntoken_sha256 = \"abcd\"\nscopes = []\n", "64 hex digits"),
            (
                &format!("[[client]]\nid = \"a\"\ntoken_sha256 = \"{}\"\nscopes = [\"patient/*.read\"]\n", hash("x")),
                "system scopes",
            ),
            (
                &format!(
                    "[[client]]\nid = \"a\"\ntoken_sha256 = \"{0}\"\nscopes = []\n[[client]]\nid = \"a\"\ntoken_sha256 = \"{0}\"\nscopes = []\n",
                    hash("x")
                ),
                "twice",
            ),
            ("[[client]]\nid = \"a\"\ntoken = \"plain\"\nscopes = []\n", "unknown field"),
            ("[[client]]\nid = \"a\"\nscopes = []\n", "needs a secret_sha256 or a token_sha256"),
            (&format!("[[client]]\nid = \"a b\"\ntoken_sha256 = \"{}\"\nscopes = []\n", hash("x")), "A-Z"),
        ] {
            let err = FhirClients::parse(text).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert!(FhirClients::from_legacy_token("short").is_err());
    }

    #[test]
    fn a_scope_covers_only_what_it_grants() {
        let p = |s: &str| s.parse::<Scope>().unwrap();
        assert!(p("system/*.rs").covers(&p("system/Task.r")));
        assert!(p("system/Task.rs").covers(&p("system/Task.s")));
        assert!(p("system/Task.cruds").covers(&p("system/Task.cu")));
        assert!(!p("system/Task.rs").covers(&p("system/*.r")), "a type does not cover every type");
        assert!(!p("system/Task.r").covers(&p("system/Task.rs")));
        assert!(!p("system/Task.rs").covers(&p("system/Observation.r")));
        assert!(!p("system/Task.rs").covers(&p("system/Task.c")));
    }

    #[test]
    fn clients_are_added_listed_and_revoked_in_the_file_with_digests_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.toml");
        let now = federation_proto::Millis(1_795_859_561_123);
        let secret = add_client(&path, "engine", &["system/Task.read".into()], now).unwrap();
        assert_eq!(secret.len(), 64);
        let other = add_client(&path, "audit-tool", &["system/AuditEvent.s".into()], now).unwrap();
        assert_ne!(secret, other);
        assert!(add_client(&path, "engine", &["system/Task.rs".into()], now).unwrap_err().contains("already"));
        assert!(add_client(&path, "x", &["patient/Task.rs".into()], now).is_err());
        assert!(add_client(&path, "bad id", &["system/Task.rs".into()], now).is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret) && text.contains(&hex::encode(digest(&secret))), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let clients = FhirClients::load(&path).unwrap();
        let engine = clients.get("engine").unwrap();
        assert!(engine.secret_matches(&secret) && !engine.secret_matches(&other));
        assert_eq!(engine.scopes[0].to_string(), "system/Task.rs", "stored in the v2 form");
        assert_eq!(engine.added.as_deref(), Some("2026-11-28T09:52:41.123Z"));
        revoke_client(&path, "engine").unwrap();
        assert!(revoke_client(&path, "engine").unwrap_err().contains("already revoked"));
        assert!(revoke_client(&path, "nobody").is_err());
        let listed = list_clients(&path).unwrap();
        assert_eq!(
            listed.iter().map(|c| (c.id.as_str(), c.revoked)).collect::<Vec<_>>(),
            [("engine", true), ("audit-tool", false)]
        );
        let clients = FhirClients::load(&path).unwrap();
        assert!(!clients.get("engine").unwrap().secret_matches(&secret), "a revoked client's secret is refused");
        assert!(!clients.get("engine").unwrap().may("Task", Interaction::Read));
    }
}
