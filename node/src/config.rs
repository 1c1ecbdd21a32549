//! The node's configuration file (`node.toml`) and its environment overrides.
//!
//! Every setting has a TOML key; a few that operators commonly change per machine
//! can be overridden by environment variables (`TELEMED_NAME`, `TELEMED_LISTEN`,
//! `TELEMED_DATA_DIR`, `TELEMED_METRICS`). This module must never start anything:
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
        for m in &mut self.models {
            if let Some(w) = &mut m.weights {
                fix(w);
            }
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
