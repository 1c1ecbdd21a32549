//! What a node can read: models, experts on duty, their queue, and the ETA that
//! follows; and what other nodes advertise they can read.
//!
//! This module must never decide where a case goes; it only answers "can this node
//! read this case in time?" for the escalation logic in [`crate::node`].

use federation_proto::{CapacityAdvert, Millis, Modality, NodeName, Urgency};
use serde::{Deserialize, Serialize};

/// A model this node runs, with its coverage and the confidence it needs per urgency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub id: String,
    pub version: String,
    pub modality: Modality,
    /// Reading tasks covered, e.g. `ecg.rhythm`.
    pub tasks: Vec<String>,
    /// Minimum calibrated confidence to issue a machine report, per urgency
    /// (`[stat, urgent, routine]`); a confidence above 1.0 means "never alone".
    pub threshold: [f32; 3],
    /// Cases per hour the model can read on this node's hardware.
    pub cases_per_hour: u32,
}

impl ModelSpec {
    pub fn covers(&self, modality: Modality, task: &str) -> bool {
        self.modality == modality && self.tasks.iter().any(|t| t == task)
    }
    pub fn threshold(&self, urgency: Urgency) -> f32 {
        self.threshold[urgency as usize]
    }
}

/// Experts on duty for one modality at this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertPool {
    pub modality: Modality,
    pub on_duty: u32,
    /// Expected time for one expert to read one case.
    pub service_ms: u64,
}

impl ExpertPool {
    /// Expected time until a case joining a queue of `queue_len` (queued or being
    /// read) is read: the queue drains `on_duty` cases per service time.
    /// `None` when nobody is on duty.
    pub fn eta_ms(&self, queue_len: usize) -> Option<u64> {
        if self.on_duty == 0 {
            return None;
        }
        let rounds = (queue_len as u64) / u64::from(self.on_duty) + 1;
        Some(rounds.saturating_mul(self.service_ms))
    }
}

/// An advert received from another node, kept until it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownAdvert {
    pub advert: CapacityAdvert,
}

impl KnownAdvert {
    pub fn is_fresh(&self, now: Millis) -> bool {
        now < self.advert.valid_until
    }

    /// Whether the advertising node can read this case before `deadline_at`:
    /// a model covers the task, or experts are on duty with an ETA that fits.
    pub fn can_help(&self, modality: Modality, task: &str, now: Millis, deadline_at: Millis) -> bool {
        self.advert.capacity.iter().filter(|c| c.modality == modality).any(|c| {
            c.model_tasks.iter().any(|t| t == task)
                || (c.experts_on_duty > 0 && now.saturating_add(c.eta_ms) <= deadline_at)
        })
    }

    pub fn node(&self) -> &NodeName {
        &self.advert.node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_grows_by_one_service_time_per_full_round_of_experts() {
        let pool = ExpertPool { modality: Modality::Ecg, on_duty: 2, service_ms: 300_000 };
        assert_eq!(pool.eta_ms(0), Some(300_000));
        assert_eq!(pool.eta_ms(1), Some(300_000));
        assert_eq!(pool.eta_ms(2), Some(600_000));
        let nobody = ExpertPool { on_duty: 0, ..pool };
        assert_eq!(nobody.eta_ms(0), None);
    }
}
