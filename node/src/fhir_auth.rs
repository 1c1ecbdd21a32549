//! Who may call the FHIR API (ADR 0008): registered clients, each with its own
//! bearer token (stored only as its SHA-256) and SMART-style system scopes.
//!
//! A client file (`[fhir] clients_file`) lists the hospital systems:
//!
//! ```toml
//! [[client]]
//! id = "his-integration-engine"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! scopes = ["system/ServiceRequest.rs", "system/Task.rs", "system/DiagnosticReport.rs", "system/Observation.rs"]
//! ```
//!
//! Scopes follow SMART App Launch v2 system scopes, `system/<Type or *>.<perms>`,
//! where perms is a subset of `cruds` in that order (this API serves `r` read by id
//! and `s` search) or the v1 forms `read` (= `rs`) and `*`. A token with no scope for
//! a resource type gets 403; an unknown token 401. The old single `token_file` is a
//! client named `token-file` with `system/*.rs`.
//!
//! This module never stores or logs a token, only its digest and the client id.

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
        let (read, search) = match perms {
            "read" | "*" => (true, true),
            "write" => (false, false),
            p => {
                // v2: a subsequence of "cruds", in that order.
                let mut order = "cruds".chars();
                if p.is_empty() || !p.chars().all(|c| order.any(|o| o == c)) {
                    return Err(bad("permissions must be read, *, or letters of cruds in order"));
                }
                (p.contains('r'), p.contains('s'))
            }
        };
        Ok(Scope { resource: (resource != "*").then(|| resource.to_owned()), read, search })
    }
}

impl Scope {
    fn allows(&self, resource: &str, interaction: Interaction) -> bool {
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
    token_sha256: [u8; 32],
    pub scopes: Vec<Scope>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    client: Vec<ClientEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    id: String,
    token_sha256: String,
    scopes: Vec<String>,
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an Authorization: Bearer token is required")]
    NoToken,
    #[error("the bearer token is not valid here")]
    UnknownToken,
    #[error("client {client} has no scope for {interaction:?} on {resource}")]
    OutOfScope { client: String, resource: String, interaction: Interaction },
}

/// The clients the API admits.
#[derive(Debug, Clone, Default)]
pub struct FhirClients {
    clients: Vec<Client>,
}

fn digest(token: &str) -> [u8; 32] {
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
        Ok(FhirClients { clients: vec![Client { id: "token-file".into(), token_sha256: digest(token), scopes }] })
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
            let raw = hex::decode(c.token_sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("client {}: token_sha256 must be 64 hex digits", c.id))?;
            if c.scopes.len() > SCOPES_MAX {
                return Err(format!("client {}: more than {SCOPES_MAX} scopes", c.id));
            }
            let scopes = c.scopes.iter().map(|s| s.parse()).collect::<Result<Vec<Scope>, String>>()?;
            clients.push(Client { id: c.id, token_sha256: raw, scopes });
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
            if bool::from(c.token_sha256.ct_eq(&presented)) {
                found = Some(c);
            }
        }
        let client = found.ok_or(AuthError::UnknownToken)?;
        if client.scopes.iter().any(|s| s.allows(resource, interaction)) {
            Ok(client)
        } else {
            Err(AuthError::OutOfScope { client: client.id.clone(), resource: resource.into(), interaction })
        }
    }
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
        assert_eq!(s, Scope { resource: Some("Task".into()), read: true, search: true });
        let s: Scope = "system/*.read".parse().unwrap();
        assert_eq!(s, Scope { resource: None, read: true, search: true });
        let s: Scope = "system/Observation.r".parse().unwrap();
        assert!(s.read && !s.search);
        let s: Scope = "system/Task.cu".parse().unwrap();
        assert!(!s.read && !s.search);
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
        ] {
            let err = FhirClients::parse(text).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert!(FhirClients::from_legacy_token("short").is_err());
    }
}
