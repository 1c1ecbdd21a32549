//! What a run measured, in a serialisable form: per-tier utilisation, queue lengths
//! over time, turnaround percentiles by modality × urgency, where cases were resolved,
//! deadline misses, link load and the run's own cost. JSON and CSV writers live here.
//!
//! [`Metrics`] is the contract between `run`, `compare` and the HTML report: a
//! `compare` reads two JSON files written by this module. This module must never
//! drive a core or decide anything about cases; it only counts.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// Every figure of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Metrics {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    /// SHA-256 over the ordered event stream: equal hashes mean identical runs.
    pub trace_hash: String,
    pub nodes_total: u64,
    pub nodes_by_tier: Vec<TierCount>,
    /// Cores actually instantiated (villages are created on their first case).
    pub cores_created: u64,
    pub cases_submitted: u64,
    pub cases_reported_at_origin: u64,
    pub events_processed: u64,
    pub messages_delivered: u64,
    pub simulated_h: f64,
    pub arrivals_h: f64,
    pub wall_s: f64,
    pub cases_per_wall_s: f64,
    pub events_per_wall_s: f64,
    pub escalations: u64,
    /// Escalations because the chosen node was unreachable or refused.
    pub reroutes: u64,
    pub peer_refusals: u64,
    pub no_capacity_events: u64,
    pub turnaround: Vec<TurnaroundRow>,
    pub resolved: Vec<ResolvedRow>,
    /// Cases that reached each tier (custody taken there), by modality.
    pub tier_load: Vec<TierLoadRow>,
    pub utilisation: Vec<UtilisationRow>,
    pub queue: Vec<QueueSample>,
    pub link_load: Vec<LinkLoadRow>,
    /// Broken invariants; a run with any is a failed run.
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierCount {
    pub tier: String,
    pub nodes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnaroundRow {
    pub modality: String,
    pub urgency: String,
    pub cases: u64,
    pub deadline_min: f64,
    pub mean_min: f64,
    pub p50_min: f64,
    pub p90_min: f64,
    pub p95_min: f64,
    pub p99_min: f64,
    pub max_min: f64,
    pub deadline_missed: u64,
    pub deadline_missed_pct: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedRow {
    pub tier: String,
    pub modality: String,
    pub by_model: u64,
    pub by_expert: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierLoadRow {
    pub tier: String,
    pub modality: String,
    pub cases: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UtilisationRow {
    pub tier: String,
    pub hour: u32,
    pub busy_expert_h: f64,
    pub on_duty_expert_h: f64,
    pub utilisation: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueSample {
    pub t_h: f64,
    pub tier: String,
    /// Cases waiting in consult queues (not yet claimed), summed over the tier.
    pub waiting: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkLoadRow {
    /// Links named by their lower tier: `village` is every village's uplink.
    pub link: String,
    pub hour: u32,
    pub bytes: u64,
    pub messages: u64,
    /// Mean throughput over the hour, summed over every link of this kind.
    pub mbit_s: f64,
}

/// Percentile of a sorted slice (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Metrics {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("metrics always serialise")
    }

    pub fn from_json(text: &str) -> Result<Metrics, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// One CSV per table, named `<stem>-<table>.csv`.
    pub fn csv_tables(&self) -> Vec<(&'static str, String)> {
        let mut summary = String::from("key,value\n");
        let kv: [(&str, String); 14] = [
            ("scenario", self.scenario.clone()),
            ("seed", self.seed.to_string()),
            ("trace_hash", self.trace_hash.clone()),
            ("nodes_total", self.nodes_total.to_string()),
            ("cores_created", self.cores_created.to_string()),
            ("cases_submitted", self.cases_submitted.to_string()),
            ("cases_reported_at_origin", self.cases_reported_at_origin.to_string()),
            ("events_processed", self.events_processed.to_string()),
            ("messages_delivered", self.messages_delivered.to_string()),
            ("simulated_h", format!("{:.3}", self.simulated_h)),
            ("wall_s", format!("{:.3}", self.wall_s)),
            ("cases_per_wall_s", format!("{:.1}", self.cases_per_wall_s)),
            ("events_per_wall_s", format!("{:.1}", self.events_per_wall_s)),
            ("violations", self.violations.len().to_string()),
        ];
        for (k, v) in kv {
            let _ = writeln!(summary, "{k},{v}");
        }
        let mut turnaround = String::from(
            "modality,urgency,cases,deadline_min,mean_min,p50_min,p90_min,p95_min,p99_min,max_min,deadline_missed,deadline_missed_pct\n",
        );
        for r in &self.turnaround {
            let _ = writeln!(
                turnaround,
                "{},{},{},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{},{:.2}",
                r.modality,
                r.urgency,
                r.cases,
                r.deadline_min,
                r.mean_min,
                r.p50_min,
                r.p90_min,
                r.p95_min,
                r.p99_min,
                r.max_min,
                r.deadline_missed,
                r.deadline_missed_pct
            );
        }
        let mut resolved = String::from("tier,modality,by_model,by_expert\n");
        for r in &self.resolved {
            let _ = writeln!(resolved, "{},{},{},{}", r.tier, r.modality, r.by_model, r.by_expert);
        }
        let mut load = String::from("tier,modality,cases\n");
        for r in &self.tier_load {
            let _ = writeln!(load, "{},{},{}", r.tier, r.modality, r.cases);
        }
        let mut util = String::from("tier,hour,busy_expert_h,on_duty_expert_h,utilisation\n");
        for r in &self.utilisation {
            let _ = writeln!(
                util,
                "{},{},{:.3},{:.3},{:.4}",
                r.tier, r.hour, r.busy_expert_h, r.on_duty_expert_h, r.utilisation
            );
        }
        let mut queue = String::from("t_h,tier,waiting\n");
        for r in &self.queue {
            let _ = writeln!(queue, "{:.3},{},{}", r.t_h, r.tier, r.waiting);
        }
        let mut link = String::from("link,hour,bytes,messages,mbit_s\n");
        for r in &self.link_load {
            let _ = writeln!(link, "{},{},{},{},{:.4}", r.link, r.hour, r.bytes, r.messages, r.mbit_s);
        }
        vec![
            ("summary", summary),
            ("turnaround", turnaround),
            ("resolved", resolved),
            ("tier_load", load),
            ("utilisation", util),
            ("queue", queue),
            ("link_load", link),
        ]
    }

    /// Writes `metrics.json` and the CSV tables into `dir`.
    pub fn write_files(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("metrics.json"), self.to_json())?;
        for (name, body) in self.csv_tables() {
            std::fs::write(dir.join(format!("{name}.csv")), body)?;
        }
        Ok(())
    }

    /// Cases of a modality that reached a tier.
    pub fn load_at(&self, tier: &str, modality: &str) -> u64 {
        self.tier_load.iter().filter(|r| r.tier == tier && r.modality == modality).map(|r| r.cases).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
