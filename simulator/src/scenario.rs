//! Scenario files: what the admin describes (topology, workload, capacity, links,
//! faults), parsed from TOML with serde and checked before a run starts.
//!
//! A [`Scenario`] is plain data. Parsing errors name the file, the field and what was
//! wrong, so an admin can fix the file without reading code.
//! This module must never run anything or hold escalation logic: the engine turns a
//! scenario into inputs for the real `tiers` core.

use federation_proto::{Modality, Tier, Urgency};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything wrong with a scenario, grouped by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or does not match the scenario schema.
    #[error("scenario {origin} is not valid: {message}")]
    Syntax { origin: String, message: String },
    /// The file parses, but a value is out of range or inconsistent.
    #[error("scenario field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid { field: field.into(), reason: reason.into() }
}

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Hours of arrivals.
    pub duration_h: f64,
    /// Hours after the last arrival for cases in flight to finish.
    #[serde(default = "default_drain_h")]
    pub drain_h: f64,
    /// Queue lengths are sampled at this interval.
    #[serde(default = "default_sample_min")]
    pub sample_interval_min: f64,
    pub topology: TopologySpec,
    pub workload: Workload,
    #[serde(default)]
    pub capacity: Vec<TierCapacity>,
    #[serde(default)]
    pub links: Links,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Capacity adverts over the control plane (absent: no adverts, so no node
    /// ever skips a tier on capacity grounds).
    #[serde(default)]
    pub adverts: Option<Adverts>,
}

/// How capacity adverts spread: every node publishes its signed capacity every
/// `interval_s`; an advert reaches a node `hop_delay_s` per tier between them later
/// (gossip relayed up or down the hierarchy, one hop per tier). A node's view of
/// another's capacity is therefore up to `interval_s + hops × hop_delay_s` old.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adverts {
    pub interval_s: f64,
    #[serde(default)]
    pub hop_delay_s: f64,
    /// How long an advert stays valid after it is issued (default: 5 min, the
    /// core's default validity).
    #[serde(default = "default_advert_validity_s")]
    pub validity_s: f64,
}

fn default_advert_validity_s() -> f64 {
    300.0
}

fn default_drain_h() -> f64 {
    72.0
}
fn default_sample_min() -> f64 {
    10.0
}

/// Which nodes exist and who is whose parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// `henan` or `china`; absent when `nodes` lists the federation explicitly.
    #[serde(default)]
    pub preset: Option<Preset>,
    /// Fraction of the preset's node counts below the provincial tier (1.0 = full size).
    #[serde(default = "one")]
    pub scale: f64,
    /// Alternate parents per node in presets (a sibling of the parent), used when the
    /// primary is unreachable.
    #[serde(default = "one_u32")]
    pub alternates: u32,
    /// An explicit federation manifest.
    #[serde(default)]
    pub nodes: Vec<NodeSpec>,
}

fn one() -> f64 {
    1.0
}
fn one_u32() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// One province (Henan-sized) with national and international nodes above it.
    Henan,
    /// A national network (~650,000 nodes).
    China,
}

/// One node of an explicit federation manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub tier: Tier,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub alternates: Vec<String>,
}

/// Case arrivals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Mean cases per origin node (village, or leaf of an explicit topology) per day.
    pub cases_per_origin_per_day: f64,
    /// Relative arrival rate for each hour of the day (24 values, scaled to mean 1);
    /// absent means flat.
    #[serde(default)]
    pub diurnal: Option<Vec<f64>>,
    pub mix: Vec<MixEntry>,
}

/// One kind of case in the workload mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixEntry {
    pub modality: Modality,
    pub urgency: Urgency,
    /// The reading task, matched against model coverage (e.g. `ecg.rhythm`).
    pub task: String,
    /// Relative weight in the mix.
    pub weight: f64,
    /// Sizes of the case's attachments, urgent part first.
    #[serde(default)]
    pub attachment_bytes: Vec<u64>,
}

/// Models and experts at every node of one tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierCapacity {
    pub tier: Tier,
    #[serde(default)]
    pub models: Vec<ModelCapacity>,
    #[serde(default)]
    pub experts: Vec<ExpertRoster>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCapacity {
    pub id: String,
    pub modality: Modality,
    pub tasks: Vec<String>,
    /// Confidence needed for a machine report, `[stat, urgent, routine]`.
    pub threshold: [f32; 3],
    /// Distribution of the model's top-label confidence on the cases it reads.
    pub confidence: Dist,
    #[serde(default = "default_model_run_s")]
    pub run_s: f64,
}

fn default_model_run_s() -> f64 {
    2.0
}

/// Experts for one modality at each node of a tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertRoster {
    pub modality: Modality,
    /// Experts on duty around the clock (when `shifts` is empty).
    #[serde(default)]
    pub on_duty: u32,
    /// Shifts by hour of day; hours not covered have nobody on duty.
    #[serde(default)]
    pub shifts: Vec<Shift>,
    /// Time one expert takes to read one case, in minutes.
    pub service_min: Dist,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shift {
    pub start_h: u32,
    pub end_h: u32,
    pub on_duty: u32,
}

impl ExpertRoster {
    /// Experts on duty in each hour of the day.
    pub fn by_hour(&self) -> [u32; 24] {
        if self.shifts.is_empty() {
            return [self.on_duty; 24];
        }
        let mut hours = [0u32; 24];
        for s in &self.shifts {
            let mut h = s.start_h % 24;
            while h != s.end_h % 24 {
                hours[h as usize] += s.on_duty;
                h = (h + 1) % 24;
            }
        }
        hours
    }
}

/// A probability distribution, as written in scenario files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    Fixed {
        value: f64,
    },
    Exponential {
        mean: f64,
    },
    /// Log-normal with the given mean and shape `sigma`.
    Lognormal {
        mean: f64,
        sigma: f64,
    },
    Uniform {
        low: f64,
        high: f64,
    },
    Beta {
        a: f64,
        b: f64,
    },
}

impl Dist {
    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed { value } => value,
            Dist::Exponential { mean } | Dist::Lognormal { mean, .. } => mean,
            Dist::Uniform { low, high } => (low + high) / 2.0,
            Dist::Beta { a, b } => a / (a + b),
        }
    }

    fn validate(&self, field: &str) -> Result<(), ScenarioError> {
        let ok = match *self {
            Dist::Fixed { value } => value >= 0.0 && value.is_finite(),
            Dist::Exponential { mean } => mean > 0.0 && mean.is_finite(),
            Dist::Lognormal { mean, sigma } => mean > 0.0 && sigma >= 0.0 && mean.is_finite() && sigma.is_finite(),
            Dist::Uniform { low, high } => low >= 0.0 && high >= low && high.is_finite(),
            Dist::Beta { a, b } => a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite(),
        };
        if ok { Ok(()) } else { Err(invalid(field, format!("{self:?} has parameters out of range"))) }
    }
}

/// Link latency and bandwidth, keyed by the lower tier of a link (a village's uplink is
/// `village`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    #[serde(default = "default_latency")]
    pub latency_ms: BTreeMap<Tier, u64>,
    #[serde(default = "default_bandwidth")]
    pub bandwidth_mbit_s: BTreeMap<Tier, f64>,
    /// How long a sender takes to notice a peer is unreachable.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// How long the data plane waits before retrying a failed attachment fetch.
    #[serde(default = "default_fetch_retry")]
    pub fetch_retry_ms: u64,
}

fn default_latency() -> BTreeMap<Tier, u64> {
    [
        (Tier::Village, 150),
        (Tier::Township, 60),
        (Tier::County, 30),
        (Tier::City, 20),
        (Tier::Provincial, 30),
        (Tier::National, 120),
    ]
    .into_iter()
    .collect()
}
fn default_bandwidth() -> BTreeMap<Tier, f64> {
    [
        (Tier::Village, 5.0),
        (Tier::Township, 20.0),
        (Tier::County, 100.0),
        (Tier::City, 500.0),
        (Tier::Provincial, 1000.0),
        (Tier::National, 200.0),
    ]
    .into_iter()
    .collect()
}
fn default_connect_timeout() -> u64 {
    5_000
}
fn default_fetch_retry() -> u64 {
    30_000
}

impl Default for Links {
    fn default() -> Self {
        Links {
            latency_ms: default_latency(),
            bandwidth_mbit_s: default_bandwidth(),
            connect_timeout_ms: default_connect_timeout(),
            fetch_retry_ms: default_fetch_retry(),
        }
    }
}

impl Links {
    pub fn latency_ms(&self, lower: Tier) -> u64 {
        self.latency_ms.get(&lower).copied().unwrap_or(50)
    }
    /// Bytes per millisecond on a link whose lower end is `lower`.
    pub fn bytes_per_ms(&self, lower: Tier) -> f64 {
        self.bandwidth_mbit_s.get(&lower).copied().unwrap_or(100.0) * 1e6 / 8.0 / 1000.0
    }
}

/// Which node a fault hits: by name, or the `index`-th node of a tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRef {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tier: Option<Tier>,
    #[serde(default)]
    pub index: usize,
}

/// Something that goes wrong during the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The node is down from `start_h` for `duration_h` hours; it comes back from its store.
    Outage { node: NodeRef, start_h: f64, duration_h: f64 },
    /// The node crashes at each of `at_h` and restarts `restart_after_min` later.
    CrashRestart { node: NodeRef, at_h: Vec<f64>, restart_after_min: f64 },
    /// Every link between `a` and `b` is cut for the duration.
    Partition { a: NodeRef, b: NodeRef, start_h: f64, duration_h: f64 },
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Io { path: path.to_owned(), source })?;
        Scenario::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Syntax { origin: origin.to_owned(), message: e.to_string() })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks ranges and consistency that the schema cannot express.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.duration_h) {
            return Err(invalid("duration_h", "must be a positive number of hours"));
        }
        if !(self.drain_h.is_finite() && self.drain_h >= 0.0) {
            return Err(invalid("drain_h", "must be zero or a positive number of hours"));
        }
        if !finite_pos(self.sample_interval_min) {
            return Err(invalid("sample_interval_min", "must be positive"));
        }
        let t = &self.topology;
        match (t.preset, t.nodes.is_empty()) {
            (Some(_), false) => {
                return Err(invalid("topology", "give either `preset` or `nodes`, not both"));
            }
            (None, true) => return Err(invalid("topology", "give a `preset` (henan, china) or a `nodes` list")),
            _ => {}
        }
        if !(t.scale.is_finite() && t.scale > 0.0 && t.scale <= 1.0) {
            return Err(invalid("topology.scale", format!("{} is not in (0, 1]", t.scale)));
        }
        let w = &self.workload;
        if !(w.cases_per_origin_per_day.is_finite() && w.cases_per_origin_per_day >= 0.0) {
            return Err(invalid("workload.cases_per_origin_per_day", "must be zero or positive"));
        }
        if let Some(d) = &w.diurnal
            && (d.len() != 24 || d.iter().any(|x| !x.is_finite() || *x < 0.0) || d.iter().sum::<f64>() <= 0.0)
        {
            return Err(invalid("workload.diurnal", "needs 24 non-negative hourly weights, not all zero"));
        }
        if w.mix.is_empty() {
            return Err(invalid("workload.mix", "needs at least one entry"));
        }
        for (i, m) in w.mix.iter().enumerate() {
            if !(m.weight.is_finite() && m.weight >= 0.0) {
                return Err(invalid(format!("workload.mix[{i}].weight"), "must be zero or positive"));
            }
        }
        if w.mix.iter().map(|m| m.weight).sum::<f64>() <= 0.0 {
            return Err(invalid("workload.mix", "weights sum to zero"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.capacity.iter().enumerate() {
            if !seen.insert(c.tier) {
                return Err(invalid(format!("capacity[{i}].tier"), format!("{} is listed twice", c.tier)));
            }
            for (j, m) in c.models.iter().enumerate() {
                m.confidence.validate(&format!("capacity[{i}].models[{j}].confidence"))?;
                if !(m.run_s.is_finite() && m.run_s >= 0.0) {
                    return Err(invalid(format!("capacity[{i}].models[{j}].run_s"), "must be zero or positive"));
                }
            }
            for (j, e) in c.experts.iter().enumerate() {
                e.service_min.validate(&format!("capacity[{i}].experts[{j}].service_min"))?;
                if e.service_min.mean() <= 0.0 {
                    return Err(invalid(format!("capacity[{i}].experts[{j}].service_min"), "mean must be positive"));
                }
                for (k, s) in e.shifts.iter().enumerate() {
                    if s.start_h > 24 || s.end_h > 24 || s.start_h % 24 == s.end_h % 24 {
                        return Err(invalid(
                            format!("capacity[{i}].experts[{j}].shifts[{k}]"),
                            "start_h and end_h must be distinct hours in 0..=24",
                        ));
                    }
                }
            }
        }
        if let Some(a) = &self.adverts {
            if !finite_pos(a.interval_s) {
                return Err(invalid("adverts.interval_s", "must be a positive number of seconds"));
            }
            if !(a.hop_delay_s.is_finite() && a.hop_delay_s >= 0.0) {
                return Err(invalid("adverts.hop_delay_s", "must be zero or a positive number of seconds"));
            }
            if !finite_pos(a.validity_s) {
                return Err(invalid("adverts.validity_s", "must be a positive number of seconds"));
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            let (start, dur) = match f {
                Fault::Outage { start_h, duration_h, .. } | Fault::Partition { start_h, duration_h, .. } => {
                    (*start_h, *duration_h)
                }
                Fault::CrashRestart { at_h, restart_after_min, .. } => {
                    if at_h.is_empty() {
                        return Err(invalid(format!("faults[{i}].at_h"), "needs at least one time"));
                    }
                    (at_h.iter().copied().fold(f64::INFINITY, f64::min), *restart_after_min)
                }
            };
            if !(start.is_finite() && start >= 0.0 && dur.is_finite() && dur >= 0.0) {
                return Err(invalid(format!("faults[{i}]"), "times must be zero or positive"));
            }
        }
        Ok(())
    }

    /// The capacity configured for a tier, if any.
    pub fn capacity_of(&self, tier: Tier) -> Option<&TierCapacity> {
        self.capacity.iter().find(|c| c.tier == tier)
    }

    /// Total simulated time: arrivals plus drain, in milliseconds.
    pub fn end_ms(&self) -> u64 {
        ((self.duration_h + self.drain_h) * 3_600_000.0) as u64
    }
}

/// One node with `c` experts, Poisson arrivals (`lambda_per_h`) and exponential
/// service (`mu_per_h` per expert), nowhere to escalate: an M/M/c queue through the
/// real core, for validation against Erlang C.
pub fn erlang_scenario(lambda_per_h: f64, mu_per_h: f64, c: u32, hours: f64) -> Scenario {
    Scenario {
        name: format!("mm{c}-lambda{lambda_per_h}-mu{mu_per_h}"),
        description: "M/M/c validation: one node, c experts, Poisson arrivals, exponential service".into(),
        duration_h: hours,
        drain_h: 48.0,
        sample_interval_min: 60.0,
        topology: TopologySpec {
            preset: None,
            scale: 1.0,
            alternates: 0,
            nodes: vec![NodeSpec { name: "hub.test".into(), tier: Tier::County, parent: None, alternates: vec![] }],
        },
        workload: Workload {
            cases_per_origin_per_day: lambda_per_h * 24.0,
            diurnal: None,
            mix: vec![MixEntry {
                modality: Modality::Ecg,
                urgency: Urgency::Routine,
                task: "ecg.rhythm".into(),
                weight: 1.0,
                attachment_bytes: vec![],
            }],
        },
        capacity: vec![TierCapacity {
            tier: Tier::County,
            models: vec![],
            experts: vec![ExpertRoster {
                modality: Modality::Ecg,
                on_duty: c,
                shifts: vec![],
                service_min: Dist::Exponential { mean: 60.0 / mu_per_h },
            }],
        }],
        links: Links::default(),
        faults: vec![],
        adverts: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        duration_h = 1
        [topology]
        preset = "henan"
        scale = 0.001
        [workload]
        cases_per_origin_per_day = 1
        [[workload.mix]]
        modality = "ecg"
        urgency = "stat"
        task = "ecg.rhythm"
        weight = 1
    "#;

    #[test]
    fn minimal_scenario_parses_with_defaults() {
        let s = Scenario::from_toml(MINIMAL, "minimal").unwrap();
        assert_eq!(s.drain_h, 72.0);
        assert_eq!(s.links.latency_ms(Tier::Village), 150);
    }

    #[test]
    fn shifts_wrap_around_midnight() {
        let r = ExpertRoster {
            modality: Modality::Ecg,
            on_duty: 0,
            shifts: vec![Shift { start_h: 20, end_h: 8, on_duty: 2 }, Shift { start_h: 8, end_h: 20, on_duty: 3 }],
            service_min: Dist::Fixed { value: 5.0 },
        };
        let h = r.by_hour();
        assert_eq!((h[23], h[0], h[7], h[8], h[19]), (2, 2, 2, 3, 3));
    }

    #[test]
    fn scale_out_of_range_names_the_field() {
        let text = MINIMAL.replace("scale = 0.001", "scale = 2");
        let err = Scenario::from_toml(&text, "bad").unwrap_err().to_string();
        assert!(err.contains("topology.scale"), "{err}");
    }
}
