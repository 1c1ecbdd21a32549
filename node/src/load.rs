//! A timed load test of custody transfer: many played villages
//! ([`crate::loadgen::PlayedChild`]) each offer cases to one node for a fixed time,
//! and [`check_custody`] then proves from the node's own store that no case was lost
//! or taken twice.
//!
//! Each village runs a closed loop: offer a new case (one unique attachment), wait
//! for the signed custody receipt, then think for a random (exponential) time before
//! the next one. A case whose receipt does not come within
//! [`LoadProfile::receipt_timeout`] is offered again (as a real village re-offers:
//! custody transfer is idempotent), at most [`LoadProfile::tries_max`] times in all.
//! Time to custody is measured from the first offer to the receipt, retries included.
//!
//! Used by `node/examples/bench_county.rs` (the 10-minute, 1,000-village run) and by a
//! short profile in the node integration tests. This module must never be used by the
//! daemon: it plays peers from outside.

use crate::blobs::BlobStore;
use crate::config::Config;
use crate::demo::PlannedNode;
use crate::loadgen::PlayedChild;
use crate::store::{AUDIT_TAIL_MAX, Store, StoreError};
use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use federation_proto::Tier;
use federation_proto::{CaseId, ContentHash, Modality, Urgency};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name of the county every load test's villages hang under.
pub const COUNTY: &str = "dengfeng.zhengzhou.henan.cn";

/// A provisioning plan ([`crate::demo::provision`]) of one county ([`COUNTY`]) and
/// `villages` villages under it, named `v0000…`.
pub fn county_plan(villages: usize) -> Vec<PlannedNode> {
    let mut plan = vec![PlannedNode { name: COUNTY.into(), tier: Tier::County, parent: None, experts: vec![] }];
    plan.extend((0..villages).map(|i| PlannedNode {
        name: format!("v{i:04}.gaocheng.dengfeng.zhengzhou.henan.cn"),
        tier: Tier::Village,
        parent: Some(COUNTY.into()),
        experts: vec![],
    }));
    plan
}

/// Links every village of `configs` (as provisioned from [`county_plan`]; the county
/// first) to the county at `addr`, one after the other.
pub async fn connect_villages(
    configs: &[Config],
    addr: SocketAddr,
) -> Result<Vec<Arc<PlayedChild>>, Box<dyn std::error::Error + Send + Sync>> {
    let county = configs.first().ok_or("no county in the plan")?;
    let trust = Arc::new(TrustStore::from_root_pem(&std::fs::read_to_string(&county.tls.root)?)?);
    let mut villages = Vec::with_capacity(configs.len().saturating_sub(1));
    for c in &configs[1..] {
        let creds = NodeCredentials::load(&c.tls.chain, &c.tls.key)?;
        let child =
            PlayedChild::connect(&creds, c.name.as_str().into(), Tier::Village, trust.clone(), COUNTY.into(), addr)
                .await?;
        villages.push(Arc::new(child));
    }
    Ok(villages)
}

/// The shape of one load run.
#[derive(Debug, Clone)]
pub struct LoadProfile {
    /// How long villages keep offering new cases (cases in flight at the end are
    /// still waited for).
    pub duration: Duration,
    /// Mean think time between a village's receipt and its next offer (exponential;
    /// zero offers back to back).
    pub think_mean: Duration,
    /// Bytes of each case's one attachment (each case's content is unique).
    pub attachment_len: usize,
    /// How long one offer waits for its receipt before it is made again.
    pub receipt_timeout: Duration,
    /// Offers of one case at most, the first included.
    pub tries_max: u32,
}

/// What the villages saw.
#[derive(Debug, Clone, Default)]
pub struct LoadOutcome {
    /// Every case offered, in no particular order.
    pub offered: Vec<CaseId>,
    /// Time to custody of every case that got its receipt, sorted.
    pub latencies: Vec<Duration>,
    /// Cases that never got a receipt after [`LoadProfile::tries_max`] offers.
    pub unreceipted: Vec<CaseId>,
    /// Offers made again after a receipt timeout.
    pub retries: u64,
    /// From the first offer to the last receipt (or give-up).
    pub wall: Duration,
}

impl LoadOutcome {
    /// Receipts per second over the whole run.
    pub fn cases_per_s(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The `p` quantile (0..=1) of time to custody; zero with no receipts.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
        self.latencies[i]
    }
}

/// Runs `profile` with every village in `villages` at once; returns when every
/// village has stopped (its last case receipted or given up).
pub async fn run(villages: &[Arc<PlayedChild>], profile: &LoadProfile) -> LoadOutcome {
    let start = Instant::now();
    let stop_at = start + profile.duration;
    let base: Arc<Vec<u8>> = Arc::new((0..profile.attachment_len.max(16)).map(|i| (i * 7 % 251) as u8).collect());
    let mut tasks = Vec::with_capacity(villages.len());
    for village in villages {
        let (village, profile, base) = (village.clone(), profile.clone(), base.clone());
        tasks.push(tokio::spawn(async move { village_loop(&village, &profile, &base, stop_at).await }));
    }
    let mut outcome = LoadOutcome::default();
    for task in tasks {
        match task.await {
            Ok(one) => {
                outcome.offered.extend(one.offered);
                outcome.latencies.extend(one.latencies);
                outcome.unreceipted.extend(one.unreceipted);
                outcome.retries += one.retries;
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("village task cancelled: {e}"),
        }
    }
    outcome.wall = start.elapsed();
    outcome.latencies.sort();
    outcome
}

async fn village_loop(village: &PlayedChild, profile: &LoadProfile, base: &[u8], stop_at: Instant) -> LoadOutcome {
    let mut out = LoadOutcome::default();
    // Villages start spread over one think time, not all in the same instant.
    tokio::time::sleep(think(profile.think_mean)).await;
    while Instant::now() < stop_at {
        let case_id = CaseId(rand::random());
        let mut data = base.to_vec();
        data[..16].copy_from_slice(&case_id.0);
        let hash = ContentHash::of(&data);
        let offer = village.make_offer(case_id, Modality::Ecg, Urgency::Urgent, Arc::new(data));
        out.offered.push(case_id);
        let (took, retries) = village.offer_with_retries(offer, profile.receipt_timeout, profile.tries_max).await;
        out.retries += retries;
        match took {
            Some(took) => out.latencies.push(took),
            None => out.unreceipted.push(case_id),
        }
        // The county holds it now (or we gave up): the village need not keep serving it.
        village.forget_attachment(&hash);
        // Never think past the end: the run's wall time ends with its last receipt.
        let left = stop_at.saturating_duration_since(Instant::now());
        tokio::time::sleep(think(profile.think_mean).min(left)).await;
    }
    out
}

/// An exponential think time of mean `mean` (capped at 10 means).
fn think(mean: Duration) -> Duration {
    if mean.is_zero() {
        return Duration::ZERO;
    }
    let u: f64 = rand::random::<f64>().max(1e-12);
    mean.mul_f64((-u.ln()).min(10.0))
}

/// What the node's store says about the offered cases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustodyCheck {
    /// Offered cases the store does not hold.
    pub missing: Vec<CaseId>,
    /// Held cases still waiting for an attachment (status `receiving`).
    pub incomplete: Vec<CaseId>,
    /// Held cases whose attachment is not a complete blob in the blob store.
    pub without_blob: Vec<CaseId>,
    /// Offered cases whose `custody.taken` audit record does not appear exactly once,
    /// with the count.
    pub custody_not_once: Vec<(CaseId, u32)>,
    /// Cases in the store that nobody offered (should be none besides `expected_extra`).
    pub unexpected: usize,
    /// Audit records that verified (the whole chain).
    pub audit_records: u64,
}

impl CustodyCheck {
    /// No loss, no double custody.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.incomplete.is_empty()
            && self.without_blob.is_empty()
            && self.custody_not_once.is_empty()
    }
}

/// Checks every case in `offered` against the node's store and blobs: held, complete,
/// its attachment stored, custody taken exactly once (its `custody.taken` audit
/// records), and the audit chain verifies. Reads the audit log in pages, so memory
/// stays bounded by the case count.
pub async fn check_custody(store: &Store, blobs: &BlobStore, offered: &[CaseId]) -> Result<CustodyCheck, StoreError> {
    let mut check = CustodyCheck { audit_records: store.verify_audit_chain().await?, ..CustodyCheck::default() };
    let offered_set: BTreeSet<CaseId> = offered.iter().copied().collect();
    let mut taken: BTreeMap<CaseId, u32> = offered_set.iter().map(|c| (*c, 0)).collect();
    let mut next = 1u64;
    loop {
        let page = store.audit_from(next, AUDIT_TAIL_MAX).await?;
        let Some(last) = page.last() else { break };
        next = last.seq + 1;
        for record in &page {
            if record.kind == "custody.taken"
                && let Some(case) = record.case
                && let Some(n) = taken.get_mut(&case)
            {
                *n += 1;
            }
        }
    }
    check.custody_not_once = taken.into_iter().filter(|(_, n)| *n != 1).collect();

    let mut seen = BTreeSet::new();
    for record in store.load().await? {
        let id = record.info.case_id;
        if !offered_set.contains(&id) {
            check.unexpected += 1;
            continue;
        }
        seen.insert(id);
        if !record.missing_attachments().is_empty() || record.status.name() == "receiving" {
            check.incomplete.push(id);
        }
        if record.info.attachments.iter().any(|a| !blobs.contains(&a.hash)) {
            check.without_blob.push(id);
        }
    }
    check.missing = offered_set.difference(&seen).copied().collect();
    Ok(check)
}
