//! The node's configuration file (`node.toml`) and its environment overrides.
//!
//! Every setting has a TOML key; a few that operators commonly change per machine
//! can be overridden by environment variables (`TELEMED_NAME`, `TELEMED_LISTEN`,
//! `TELEMED_DATA_DIR`, `TELEMED_METRICS`, `TELEMED_AUDIT_SYSLOG_ADDRESS`). This module must never start anything:
//! it only reads and checks settings.

use federation_proto::{Modality, NodeName, Tier};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A parent (or alternate parent) this node sends cases up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    pub name: String,
    pub tier: Tier,
    pub addr: SocketAddr,
}

/// Experts on duty here for one modality.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertsConfig {
    pub modality: Modality,
    pub on_duty: u32,
    /// Expected minutes to read one case.
    pub service_min: u64,
}

/// Experts simulated by the node itself (demo and tests only, until the consult
/// queue UI exists): they claim queued cases and sign a report after a delay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedExperts {
    pub name: String,
    pub claim_after_ms: u64,
    pub read_ms: u64,
}

/// Certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The federation root certificate (PEM).
    pub root: PathBuf,
    /// This node's certificate followed by its intermediates (PEM).
    pub chain: PathBuf,
    /// This node's Ed25519 private key (PEM, mode 0600).
    pub key: PathBuf,
    /// CRL files to load at start and on reload.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// The DICOM C-STORE receiver for devices on the clinic's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomConfig {
    /// Our (called) AE title.
    pub ae_title: String,
    pub listen: SocketAddr,
    /// Calling AE titles allowed to send (empty: nobody; `"*"`: anyone).
    pub allowed_callers: Vec<String>,
    #[serde(default = "default_max_instance_bytes")]
    pub max_instance_bytes: u64,
}

fn default_max_instance_bytes() -> u64 {
    2 * 1024 * 1024 * 1024
}

/// A folder watched for DICOM files dropped by devices or people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxConfig {
    pub dir: PathBuf,
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    2_000
}

/// Where the store lives, when not in the data directory's SQLite file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/db` (hubs); TLS with `?sslmode=verify-full`.
    /// `TELEMED_STORE_URL` overrides it (keeps a password out of the file).
    pub url: String,
}

/// The federation's privacy policy as this node applies it (the same at every node).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// The highest tier allowed to hold a patient's direct identifiers. Absent: the
    /// origin's own tier (identifiers never leave the clinic). International is
    /// never allowed, whatever this says.
    #[serde(default)]
    pub identifiers_up_to: Option<Tier>,
    /// An image whose BurnedInAnnotation is YES: `refuse` (default) or `flag`
    /// (sent, with the flag in its de-identification method; deid.rs).
    #[serde(default)]
    pub burned_in_annotation: crate::deid::BurnedInPolicy,
}

/// The FHIR R4 API for hospital systems (hubs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    pub listen: SocketAddr,
    /// A file holding one bearer token shared by every client, with every read
    /// scope (mode 0600). Optional when `clients_file` is given.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Registered clients: token digests and SMART system scopes (`fhir_auth.rs`).
    #[serde(default)]
    pub clients_file: Option<PathBuf>,
}

/// A local AI model this node runs (`[[models]]`; needs the `models` feature).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `ecg`, `imaging` or `pathology`.
    pub kind: String,
    /// Minimum calibrated confidence for a machine report, `[stat, urgent, routine]`
    /// (above 1.0: never alone). Defaults per model (see docs/models/).
    #[serde(default)]
    pub thresholds: Option<[f32; 3]>,
    /// A safetensors file to load instead of the weights built into the binary.
    #[serde(default)]
    pub weights: Option<PathBuf>,
}

/// Everything in `node.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    pub tier: Tier,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Primary parent first, then alternates.
    #[serde(default)]
    pub parents: Vec<ParentConfig>,
    /// Children allowed to connect across region boundaries.
    #[serde(default)]
    pub cross_links: Vec<String>,
    pub tls: TlsConfig,
    #[serde(default)]
    pub experts: Vec<ExpertsConfig>,
    #[serde(default)]
    pub simulated_experts: Option<SimulatedExperts>,
    /// `host:port` for the Prometheus metrics endpoint; none if absent.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Cap on attachment transfer rate in bytes per second (weak links): applies to
    /// what this node fetches and, shared across all links, to what it serves.
    #[serde(default)]
    pub rate_limit_bytes_per_s: Option<u64>,
    /// DICOM devices push studies here (optional).
    #[serde(default)]
    pub dicom: Option<DicomConfig>,
    /// A watched inbox folder (optional).
    #[serde(default)]
    pub inbox: Option<InboxConfig>,
    /// Local AI models (optional).
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// PostgreSQL instead of the embedded SQLite file (optional, hubs).
    #[serde(default)]
    pub store: Option<StoreConfig>,
    /// The privacy boundary (optional; the default keeps identifiers at the origin).
    #[serde(default)]
    pub privacy: PrivacyConfig,
    /// The FHIR R4 API (optional, hubs).
    #[serde(default)]
    pub fhir: Option<FhirConfig>,
    /// The libp2p control plane (optional): admission, adverts, CRL gossip, discovery.
    #[serde(default)]
    pub control: Option<crate::control_plane::ControlConfig>,
    /// The web UI (consult queue, clinic page, admin page); none if absent.
    #[serde(default)]
    pub web: Option<WebConfig>,
    /// Audit export: `[audit.syslog]` sends every audit record live to an IHE ATNA
    /// audit record repository (optional; `atna_sender.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::atna_sender::AuditConfig>,
}

/// The web UI. Plain HTTP: serve it on loopback, or behind a TLS-terminating reverse
/// proxy (`behind_tls_proxy = true`, which also marks session cookies `Secure`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    #[serde(default = "default_web_listen")]
    pub listen: SocketAddr,
    /// Browsers reach this server only through HTTPS (a proxy terminates TLS).
    /// Required for a non-loopback `listen`; session cookies are then `Secure`.
    #[serde(default)]
    pub behind_tls_proxy: bool,
    /// Largest upload accepted from the clinic page, in bytes.
    #[serde(default = "default_upload_bytes_max")]
    pub upload_bytes_max: u64,
    /// Session lifetime after login, in minutes.
    #[serde(default = "default_session_min")]
    pub session_min: u64,
}

fn default_web_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_upload_bytes_max() -> u64 {
    512 * 1024 * 1024
}

fn default_session_min() -> u64 {
    12 * 60
}

/// A configuration that cannot be used, with what and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`, applies environment overrides, and checks the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        config.apply_env(|k| std::env::var(k).ok())?;
        // Relative paths are relative to the config file.
        if let Some(base) = path.parent() {
            config.resolve_paths(base);
        }
        config.check()?;
        Ok(config)
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("TELEMED_NAME") {
            self.name = v;
        }
        if let Some(v) = get("TELEMED_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("TELEMED_LISTEN") {
            self.listen = v.parse().map_err(|e| ConfigError::Env { var: "TELEMED_LISTEN", message: format!("{e}") })?;
        }
        if let Some(v) = get("TELEMED_STORE_URL") {
            self.store = Some(StoreConfig { url: v });
        }
        if let Some(v) = get("TELEMED_AUDIT_SYSLOG_ADDRESS") {
            match self.audit.as_mut().and_then(|a| a.syslog.as_mut()) {
                Some(syslog) => syslog.address = v,
                None => {
                    return Err(ConfigError::Env {
                        var: "TELEMED_AUDIT_SYSLOG_ADDRESS",
                        message: "set, but node.toml has no [audit.syslog] section to apply it to".into(),
                    });
                }
            }
        }
        if let Some(v) = get("TELEMED_METRICS") {
            self.metrics =
                Some(v.parse().map_err(|e| ConfigError::Env { var: "TELEMED_METRICS", message: format!("{e}") })?);
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.tls.root);
        fix(&mut self.tls.chain);
        fix(&mut self.tls.key);
        self.tls.crls.iter_mut().for_each(fix);
        if let Some(inbox) = &mut self.inbox {
            fix(&mut inbox.dir);
        }
        if let Some(fhir) = &mut self.fhir {
            fhir.token_file.iter_mut().chain(fhir.clients_file.iter_mut()).for_each(fix);
        }
        for m in &mut self.models {
            if let Some(w) = &mut m.weights {
                fix(w);
            }
        }
        if let Some(ca) = self.audit.as_mut().and_then(|a| a.syslog.as_mut()).and_then(|s| s.ca.as_mut()) {
            fix(ca);
        }
    }

    /// Checks what the types cannot: parents above this tier, sane numbers.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::Invalid("`name` is empty".into()));
        }
        for p in &self.parents {
            if p.tier <= self.tier {
                return Err(ConfigError::Invalid(format!(
                    "parent {} is {} but this node is {}: parents must be of a higher tier",
                    p.name, p.tier, self.tier
                )));
            }
        }
        if let Some(web) = &self.web
            && !web.listen.ip().is_loopback()
            && !web.behind_tls_proxy
        {
            return Err(ConfigError::Invalid(format!(
                "[web] listen = {} is not loopback: the UI serves plain HTTP, so put it behind a TLS proxy \
                 and set behind_tls_proxy = true",
                web.listen
            )));
        }
        if let Some(control) = &self.control {
            control.check().map_err(ConfigError::Invalid)?;
        }
        if let Some(syslog) = self.audit.as_ref().and_then(|a| a.syslog.as_ref()) {
            syslog.check().map_err(ConfigError::Invalid)?;
        }
        for e in &self.experts {
            if e.on_duty > 0 && e.service_min == 0 {
                return Err(ConfigError::Invalid(format!("experts for {}: service_min must be > 0", e.modality)));
            }
        }
        for m in &self.models {
            if !["ecg", "imaging", "pathology"].contains(&m.kind.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "model kind `{}`: expected ecg, imaging or pathology",
                    m.kind
                )));
            }
            if self.models.iter().filter(|o| o.kind == m.kind).count() > 1 {
                return Err(ConfigError::Invalid(format!("model `{}` is listed twice", m.kind)));
            }
            if let Some(t) = m.thresholds
                && t.iter().any(|v| !(v.is_finite() && *v > 0.0))
            {
                return Err(ConfigError::Invalid(format!("model `{}`: thresholds must be positive", m.kind)));
            }
            if !cfg!(feature = "models") {
                return Err(ConfigError::Invalid(format!(
                    "model `{}` is configured but this build has no model runtime (built without the `models` feature)",
                    m.kind
                )));
            }
        }
        Ok(())
    }

    pub fn node_name(&self) -> NodeName {
        NodeName::new(self.name.as_str())
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("node.sqlite")
    }
    /// The store to open: `[store] url` if set, else the SQLite file [`Self::db_path`].
    pub fn store_location(&self) -> crate::store::StoreLocation {
        match &self.store {
            Some(s) => crate::store::StoreLocation::Postgres(s.url.clone()),
            None => crate::store::StoreLocation::Sqlite(self.db_path()),
        }
    }
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
name = "v1.gaocheng.dengfeng.zhengzhou.henan.cn"
tier = "village"
data_dir = "data"
listen = "127.0.0.1:7401"
parents = [{ name = "gaocheng.dengfeng.zhengzhou.henan.cn", tier = "township", addr = "127.0.0.1:7402" }]
[tls]
root = "root.pem"
chain = "node.pem"
key = "node.key"
"#;

    #[test]
    fn sample_parses_and_env_overrides_apply() {
        let mut c: Config = toml::from_str(SAMPLE).unwrap();
        c.apply_env(|k| (k == "TELEMED_LISTEN").then(|| "127.0.0.1:9999".to_owned())).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999".parse().unwrap());
        c.resolve_paths(Path::new("/etc/telemed"));
        assert_eq!(c.tls.key, PathBuf::from("/etc/telemed/node.key"));
        c.check().unwrap();
    }

    #[test]
    fn audit_syslog_section_parses_resolves_its_ca_and_takes_its_env_override() {
        let text = format!(
            "{SAMPLE}\n[audit.syslog]\ntransport = \"tls\"\naddress = \"audit.example:6514\"\nca = \"audit-ca.pem\"\n"
        );
        let mut c: Config = toml::from_str(&text).unwrap();
        c.apply_env(|k| (k == "TELEMED_AUDIT_SYSLOG_ADDRESS").then(|| "10.0.0.5:6514".to_owned())).unwrap();
        c.resolve_paths(Path::new("/etc/telemed"));
        c.check().unwrap();
        let syslog = c.audit.unwrap().syslog.unwrap();
        assert_eq!(syslog.address, "10.0.0.5:6514");
        assert_eq!(syslog.ca, Some(PathBuf::from("/etc/telemed/audit-ca.pem")));
        assert_eq!((syslog.facility, syslog.confirm_ms), (10, 2_000));
        // The override needs the section; a TLS section needs its CA.
        let mut bare: Config = toml::from_str(SAMPLE).unwrap();
        let err = bare.apply_env(|k| (k == "TELEMED_AUDIT_SYSLOG_ADDRESS").then(|| "x:1".to_owned())).unwrap_err();
        assert!(err.to_string().contains("[audit.syslog]"), "{err}");
        let no_ca: Config =
            toml::from_str(&format!("{SAMPLE}\n[audit.syslog]\ntransport = \"tls\"\naddress = \"a:1\"\n")).unwrap();
        assert!(no_ca.check().unwrap_err().to_string().contains("needs `ca`"));
    }

    #[test]
    fn parent_below_this_tier_is_refused() {
        let mut c: Config = toml::from_str(SAMPLE).unwrap();
        c.tier = Tier::City;
        assert!(c.check().unwrap_err().to_string().contains("parents must be of a higher tier"));
    }

    #[test]
    fn unknown_keys_and_bad_env_values_are_refused_with_their_name() {
        let err = toml::from_str::<Config>(&format!("{SAMPLE}\nlisten_adress = 1")).unwrap_err();
        assert!(err.to_string().contains("listen_adress"), "{err}");
        let mut c: Config = toml::from_str(SAMPLE).unwrap();
        let err = c.apply_env(|k| (k == "TELEMED_LISTEN").then(|| "nope".to_owned())).unwrap_err();
        assert!(err.to_string().contains("TELEMED_LISTEN"));
    }
}
