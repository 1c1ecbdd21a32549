//! Clinical deadlines, claim windows and the core's hard limits.
//!
//! Defaults follow the clinical figures of DESIGN.md §2: STAT ECG 10 min, STAT
//! imaging 45 min, STAT (frozen-section) pathology 30 min, urgent 1 h, routine
//! 24 h (48 h for pathology). Every figure is configurable.
//! This module must never read a clock: it turns durations into deadlines given `now`.

use federation_proto::{Modality, Urgency};
use serde::{Deserialize, Serialize};

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

/// Report deadlines per modality × urgency, in milliseconds after creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlinePolicy {
    /// Indexed `[modality][urgency]` in the order of `Modality::ALL` / `Urgency::ALL`.
    pub report_ms: [[u64; 3]; 3],
    /// How long a case may wait unclaimed in one tier's queue before it moves on,
    /// per urgency. Capped so an expert still has the service time before the deadline.
    pub claim_window_ms: [u64; 3],
    /// A claim lasts this many expected service times (at least a minute); a case
    /// still unreported then goes back to the queue for another expert.
    #[serde(default = "default_claim_lease_factor")]
    pub claim_lease_factor: u64,
}

fn default_claim_lease_factor() -> u64 {
    3
}

impl Default for DeadlinePolicy {
    fn default() -> Self {
        DeadlinePolicy {
            report_ms: [
                // ecg: stat, urgent, routine
                [10 * MINUTE_MS, HOUR_MS, 24 * HOUR_MS],
                // imaging
                [45 * MINUTE_MS, HOUR_MS, 24 * HOUR_MS],
                // pathology (frozen section for STAT)
                [30 * MINUTE_MS, HOUR_MS, 48 * HOUR_MS],
            ],
            claim_window_ms: [3 * MINUTE_MS, 15 * MINUTE_MS, 4 * HOUR_MS],
            claim_lease_factor: default_claim_lease_factor(),
        }
    }
}

impl DeadlinePolicy {
    pub fn report_ms(&self, modality: Modality, urgency: Urgency) -> u64 {
        self.report_ms[modality as usize][urgency as usize]
    }
    pub fn claim_window_ms(&self, urgency: Urgency) -> u64 {
        self.claim_window_ms[urgency as usize]
    }
}

/// Retry timing for custody offers and report deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub initial_ms: u64,
    pub max_ms: u64,
    /// Unanswered attempts to one peer before the case is offered to the next candidate.
    pub attempts_before_reroute: u32,
    /// Jitter as a fraction of the delay, in per-mille (200 = ±20 %).
    pub jitter_permille: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial_ms: 2_000, max_ms: 60_000, attempts_before_reroute: 4, jitter_permille: 200 }
    }
}

/// Hard limits on what one node holds or accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Cases this node holds that are not finished (offers beyond it get `Busy`).
    pub cases_active_max: usize,
    /// Longest escalation trail accepted (there are only seven tiers; reroutes add a few).
    pub trail_len_max: usize,
    /// Most findings carried with one case.
    pub findings_max: usize,
    /// Most attachments in one case.
    pub attachments_max: usize,
    /// Longest clinical question or report text, in bytes.
    pub text_len_max: usize,
    /// Envelopes remembered as verified here, so each is verified once (about 200
    /// bytes of memory each when full).
    #[serde(default = "verified_envelopes_max_default")]
    pub verified_envelopes_max: usize,
}

fn verified_envelopes_max_default() -> usize {
    4096
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cases_active_max: 100_000,
            trail_len_max: 32,
            findings_max: 64,
            attachments_max: 256,
            text_len_max: 64 * 1024,
            verified_envelopes_max: verified_envelopes_max_default(),
        }
    }
}

/// The federation's privacy boundary: which tiers may hold a patient's direct
/// identifiers (the origin-signed `PatientIdentity`). Every node applies the same
/// policy when it offers a case (identifiers go only to allowed tiers) and when it
/// takes one (identifiers offered to a tier that may not hold them are dropped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacyPolicy {
    /// The highest tier allowed to hold direct identifiers; `None`: only the origin.
    #[serde(default)]
    pub identifiers_up_to: Option<federation_proto::Tier>,
}

impl PrivacyPolicy {
    /// Whether a node of `tier` may hold the direct identifiers of a case that
    /// started at a node of `origin_tier`. International nodes never may.
    pub fn may_hold_identifiers(&self, origin_tier: federation_proto::Tier, tier: federation_proto::Tier) -> bool {
        if tier == federation_proto::Tier::International {
            return false;
        }
        tier <= self.identifiers_up_to.unwrap_or(origin_tier).max(origin_tier)
    }
}

#[cfg(test)]
mod privacy_tests {
    use super::PrivacyPolicy;
    use federation_proto::Tier;

    #[test]
    fn identifiers_stay_at_or_below_the_boundary_and_never_go_international() {
        let origin_only = PrivacyPolicy::default();
        assert!(origin_only.may_hold_identifiers(Tier::Village, Tier::Village));
        assert!(!origin_only.may_hold_identifiers(Tier::Village, Tier::Township));
        let county = PrivacyPolicy { identifiers_up_to: Some(Tier::County) };
        assert!(county.may_hold_identifiers(Tier::Village, Tier::County));
        assert!(!county.may_hold_identifiers(Tier::Village, Tier::City));
        // A case that starts above the boundary keeps its identifiers at its origin only.
        assert!(county.may_hold_identifiers(Tier::City, Tier::City));
        assert!(!county.may_hold_identifiers(Tier::City, Tier::Provincial));
        let everywhere = PrivacyPolicy { identifiers_up_to: Some(Tier::International) };
        assert!(everywhere.may_hold_identifiers(Tier::Village, Tier::National));
        assert!(!everywhere.may_hold_identifiers(Tier::Village, Tier::International));
        assert!(!everywhere.may_hold_identifiers(Tier::International, Tier::International));
    }
}
