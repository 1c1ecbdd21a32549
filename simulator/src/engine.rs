//! The deterministic discrete-event engine: simulated time, a seeded RNG, links with
//! latency and bandwidth, faults, and the people and models around each node, all
//! driving the real [`tiers::Node`] through its `handle_*` inputs and `poll_*` outputs.
//!
//! The engine plays the driver's part exactly as `node` does with real I/O: it acts
//! on every output in the order polled (persisting before anything after it), delivers
//! messages after link delay, fetches attachments, runs scripted models, lets on-duty
//! experts claim queued cases in urgency-then-deadline order and sign reports, and
//! crashes and restores cores from their stores. Cores are created lazily (a village
//! on its first case), but every case goes through real cores.
//!
//! Every event is folded into a SHA-256 trace hash: one seed reproduces a run bit for
//! bit. Invariants (no case lost, none read twice, every report reaches its origin)
//! are checked during and after every run.
//!
//! This module must never make an escalation decision of its own (that is the core's
//! job), read the wall clock for anything but the run's cost figures, or use an
//! unseeded random source.

use crate::crypto::{CryptoMode, KeyedHashCrypto, Memo};
use crate::fastmap::FastMap;
use crate::metrics::{
    LinkLoadRow, Metrics, QueueSample, ResolvedRow, TierCount, TierLoadRow, TurnaroundRow, UtilisationRow, percentile,
};
use crate::scenario::{Dist, Fault, ModelCapacity, Scenario, ScenarioError};
use crate::topology::Topology;
use federation_proto::{
    AttachmentRef, CaseId, ContentHash, Label, Message, Millis, Modality, NodeName, PatientRef, Priority, PublicKey,
    SignedEnvelope, Tier, Urgency,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Distribution;
use sha2::{Digest, Sha256};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use tiers::store::Change;
use tiers::{DeadlinePolicy, Event, ExpertPool, ModelOutcome, ModelSpec, NewCase, Node, NodeConfig, Output, Peer};
use tiers::{ReportDraft, Upstream};

/// Simulated time starts at this instant (a midnight), so hour-of-day is `rel / 1 h`.
pub const EPOCH_MS: u64 = 1_699_920_000_000;
const HOUR_MS: u64 = 3_600_000;
/// Rough size of a control message (accept, receipt, reject) on the wire.
const SMALL_MESSAGE_BYTES: u64 = 256;
/// How long after a report reaches its origin the cores on its path forget the case
/// (`Node::archive`); retried at this interval while any of them still owes a receipt.
const ARCHIVE_AFTER_MS: u64 = 30 * 60_000;
/// Each core's own memory of verified envelopes under the keyed-hash stand-in: none,
/// the run's shared memo (`Crypto::recall_opened`) serves every core. Per-core
/// memories of 256 were a third of the heap of the `china` day (34,000 townships).
const NODE_VERIFIED_ENVELOPES_MAX: usize = 0;

/// What happened to one case, for the metrics and for validation tests.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseLog {
    pub case_id: CaseId,
    pub origin: u32,
    pub modality: Modality,
    pub urgency: Urgency,
    /// Milliseconds since the start of the run.
    pub created_ms: u64,
    pub deadline_ms: u64,
    /// First time the case entered a consult queue, anywhere.
    pub queued_ms: Option<u64>,
    /// When an expert claimed it.
    pub claimed_ms: Option<u64>,
    /// The service time the claiming expert drew.
    pub service_ms: u64,
    pub reported_at_origin_ms: Option<u64>,
    pub read_at: Option<Tier>,
    pub read_by_model: bool,
    pub reads: u32,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub metrics: Metrics,
    pub cases: Vec<CaseLog>,
}

impl RunOutcome {
    /// Fails loudly when any invariant broke.
    pub fn check(&self) -> Result<(), InvariantError> {
        if self.metrics.violations.is_empty() {
            Ok(())
        } else {
            Err(InvariantError { violations: self.metrics.violations.clone() })
        }
    }
}

/// Invariants the run broke; the run's figures cannot be trusted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} invariant violation(s), first: {}", violations.len(), violations.first().map_or("", |s| s.as_str()))]
pub struct InvariantError {
    pub violations: Vec<String>,
}

#[derive(Debug)]
enum Ev {
    Arrival,
    Submit {
        origin: u32,
        new: Box<NewCase>,
    },
    Deliver {
        from: u32,
        to: u32,
        message: Box<Message>,
    },
    PeerDown {
        node: u32,
        peer: u32,
    },
    ModelDone {
        node: u32,
        epoch: u32,
        case_id: CaseId,
        outcome: Box<ModelOutcome>,
    },
    BlobArrived {
        node: u32,
        from: u32,
        epoch: u32,
        case_id: CaseId,
        attachment: Box<AttachmentRef>,
    },
    ExpertDone {
        node: u32,
        epoch: u32,
        modality: Modality,
        case_id: CaseId,
        expert: u64,
    },
    Timer {
        node: u32,
        at: Millis,
    },
    HourTick,
    Sample,
    Crash {
        node: u32,
    },
    Restart {
        node: u32,
    },
    Cut {
        a: u32,
        b: u32,
    },
    Heal {
        a: u32,
        b: u32,
    },
    /// Bookkeeping, not simulation: drop a finished case from the cores that held it.
    Archive {
        case_id: CaseId,
    },
    /// Every live node publishes its capacity advert.
    AdvertTick,
    /// An advert reaches a node that may send cases to its publisher.
    AdvertArrives {
        node: u32,
        advert: Box<SignedEnvelope>,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// One modality's consult queue and experts at one node, as the reading room plays it.
#[derive(Default)]
struct Pool {
    on_duty: u32,
    busy: u32,
    /// (urgency, deadline, arrival order, case): the consult queue's order.
    queue: BTreeSet<(Urgency, u64, u64, CaseId)>,
    keys: FastMap<CaseId, (Urgency, u64, u64)>,
}

/// Rosters of one tier: per modality, on duty by hour and the service distribution.
#[derive(Clone)]
struct Roster {
    by_hour: [u32; 24],
    service_min: Dist,
}

struct CaseTrack {
    log: CaseLog,
    /// Nodes that held the case (origin, then each that took custody): where to
    /// archive it once it is finished.
    holders: Vec<u32>,
}

/// A simulation of one scenario with one seed.
pub struct Engine {
    scenario: Scenario,
    seed: u64,
    crypto: CryptoMode,
    memo: std::sync::Arc<std::sync::Mutex<Memo>>,
    topo: Topology,
    now: u64,
    end: u64,
    arrivals_end: u64,
    heap: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    // Per node.
    cores: Vec<Option<Box<Node>>>,
    created: Vec<bool>,
    down: Vec<bool>,
    epoch: Vec<u32>,
    armed: Vec<Option<Millis>>,
    stores: FastMap<u32, BTreeMap<CaseId, std::sync::Arc<tiers::CaseRecord>>>,
    pools: Vec<Option<Box<[Pool; 3]>>>,
    public_keys: FastMap<u32, PublicKey>,
    // Per tier.
    rosters: [[Option<Roster>; 3]; 7],
    models: [Vec<ModelCapacity>; 7],
    waiting: [u64; 7],
    tier_counts: [usize; 7],
    // Links.
    cut: BTreeSet<(u32, u32)>,
    link_busy: FastMap<(u32, u32), u64>,
    // Randomness: one stream per purpose, so adding a fault does not shift arrivals.
    rng_arrivals: ChaCha8Rng,
    rng_service: ChaCha8Rng,
    rng_models: ChaCha8Rng,
    // Workload.
    diurnal: [f64; 24],
    diurnal_max: f64,
    rate_per_ms: f64,
    mix_cdf: Vec<f64>,
    deadlines: DeadlinePolicy,
    // Accounting.
    trace: Sha256,
    cases: BTreeMap<CaseId, CaseTrack>,
    open_cases: u64,
    events: u64,
    delivered: u64,
    escalations: u64,
    reroutes: u64,
    refusals: u64,
    no_capacity: u64,
    next_expert: u64,
    arrival_seq: u64,
    violations: Vec<String>,
    tier_load: BTreeMap<(Tier, Modality), u64>,
    busy_ms: [Vec<u64>; 7],
    link_load: Vec<[(u64, u64); 7]>,
    queue_samples: Vec<QueueSample>,
}

impl Engine {
    /// Builds the topology and schedules arrivals and faults. Nothing runs yet.
    pub fn new(scenario: Scenario, seed: u64) -> Result<Engine, ScenarioError> {
        scenario.validate()?;
        let topo = Topology::build(&scenario.topology)?;
        let n = topo.len();
        let mut rosters: [[Option<Roster>; 3]; 7] = Default::default();
        let mut models: [Vec<ModelCapacity>; 7] = Default::default();
        for cap in &scenario.capacity {
            for e in &cap.experts {
                rosters[cap.tier as usize][e.modality as usize] =
                    Some(Roster { by_hour: e.by_hour(), service_min: e.service_min.clone() });
            }
            models[cap.tier as usize] = cap.models.clone();
        }
        let diurnal_raw = scenario.workload.diurnal.clone().unwrap_or_else(|| vec![1.0; 24]);
        let mean = diurnal_raw.iter().sum::<f64>() / 24.0;
        let mut diurnal = [0.0; 24];
        for (d, r) in diurnal.iter_mut().zip(&diurnal_raw) {
            *d = r / mean;
        }
        let diurnal_max = diurnal.iter().copied().fold(0.0, f64::max);
        let total_weight: f64 = scenario.workload.mix.iter().map(|m| m.weight).sum();
        let mut acc = 0.0;
        let mix_cdf = scenario
            .workload
            .mix
            .iter()
            .map(|m| {
                acc += m.weight / total_weight;
                acc
            })
            .collect();
        let rate_per_ms =
            scenario.workload.cases_per_origin_per_day * topo.origins.len() as f64 / (24.0 * HOUR_MS as f64);
        let end = scenario.end_ms();
        let arrivals_end = (scenario.duration_h * HOUR_MS as f64) as u64;
        let tier_counts = topo.count_by_tier();
        let stream = |k: u64| ChaCha8Rng::seed_from_u64(seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut engine = Engine {
            seed,
            crypto: CryptoMode::default(),
            memo: Memo::shared(),
            now: 0,
            end,
            arrivals_end,
            heap: BinaryHeap::new(),
            seq: 0,
            cores: (0..n).map(|_| None).collect(),
            created: vec![false; n],
            down: vec![false; n],
            epoch: vec![0; n],
            armed: vec![None; n],
            stores: FastMap::default(),
            pools: (0..n).map(|_| None).collect(),
            public_keys: FastMap::default(),
            rosters,
            models,
            waiting: [0; 7],
            tier_counts,
            cut: BTreeSet::new(),
            link_busy: FastMap::default(),
            rng_arrivals: stream(1),
            rng_service: stream(2),
            rng_models: stream(3),
            diurnal,
            diurnal_max,
            rate_per_ms,
            mix_cdf,
            deadlines: DeadlinePolicy::default(),
            trace: Sha256::new(),
            cases: BTreeMap::new(),
            open_cases: 0,
            events: 0,
            delivered: 0,
            escalations: 0,
            reroutes: 0,
            refusals: 0,
            no_capacity: 0,
            next_expert: 0,
            arrival_seq: 0,
            violations: Vec::new(),
            tier_load: BTreeMap::new(),
            busy_ms: Default::default(),
            link_load: Vec::new(),
            queue_samples: Vec::new(),
            topo,
            scenario,
        };
        engine.trace.update(b"telemed-sim trace v1");
        engine.trace.update(seed.to_le_bytes());
        engine.schedule_faults()?;
        if engine.rate_per_ms > 0.0 {
            engine.schedule_next_arrival();
        }
        engine.schedule(HOUR_MS, Ev::HourTick);
        engine.schedule(0, Ev::Sample);
        if engine.scenario.adverts.is_some() {
            engine.schedule(0, Ev::AdvertTick);
        }
        Ok(engine)
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Which crypto the cores sign and verify with (default: the keyed-hash stand-in).
    pub fn with_crypto(mut self, mode: CryptoMode) -> Engine {
        self.crypto = mode;
        self
    }

    /// A core for node `n`, fresh or restored from `records`.
    fn make_core(&mut self, n: u32, records: Vec<tiers::CaseRecord>) -> Node {
        let config = self.config(n);
        let now = self.abs();
        let crypto: Box<dyn tiers::Crypto> = match self.crypto {
            CryptoMode::KeyedHash => Box::new(KeyedHashCrypto::new(self.public_key(n), self.memo.clone())),
            CryptoMode::Real => Box::new(tiers::Ed25519Crypto::new(tiers::harness::key_for(config.name.as_str()))),
        };
        if records.is_empty() {
            Node::with_crypto(config, crypto)
        } else {
            Node::restore_with_crypto(config, crypto, records, now)
        }
    }

    fn schedule_faults(&mut self) -> Result<(), ScenarioError> {
        let faults = self.scenario.faults.clone();
        for (i, f) in faults.iter().enumerate() {
            let ms = |h: f64| (h * HOUR_MS as f64) as u64;
            match f {
                Fault::Outage { node, start_h, duration_h } => {
                    let n = self.topo.resolve(node, &format!("faults[{i}].node"))?;
                    self.stores.entry(n).or_default();
                    self.schedule(ms(*start_h), Ev::Crash { node: n });
                    self.schedule(ms(start_h + duration_h), Ev::Restart { node: n });
                }
                Fault::CrashRestart { node, at_h, restart_after_min } => {
                    let n = self.topo.resolve(node, &format!("faults[{i}].node"))?;
                    self.stores.entry(n).or_default();
                    for at in at_h {
                        self.schedule(ms(*at), Ev::Crash { node: n });
                        self.schedule(ms(*at) + (restart_after_min * 60_000.0) as u64, Ev::Restart { node: n });
                    }
                }
                Fault::Partition { a, b, start_h, duration_h } => {
                    let a = self.topo.resolve(a, &format!("faults[{i}].a"))?;
                    let b = self.topo.resolve(b, &format!("faults[{i}].b"))?;
                    self.schedule(ms(*start_h), Ev::Cut { a, b });
                    self.schedule(ms(start_h + duration_h), Ev::Heal { a, b });
                }
            }
        }
        Ok(())
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse(Scheduled { at: at.max(self.now), seq: self.seq, ev }));
    }

    fn abs(&self) -> Millis {
        Millis(EPOCH_MS + self.now)
    }

    fn hour_of_day(&self) -> usize {
        ((self.now / HOUR_MS) % 24) as usize
    }

    fn trace_event(&mut self, node: u32, tag: u8, case: Option<&CaseId>) {
        self.trace.update(self.now.to_le_bytes());
        self.trace.update(node.to_le_bytes());
        self.trace.update([tag]);
        if let Some(c) = case {
            self.trace.update(c.0);
        }
    }

    /// Runs to the end of the drain period (or until every case is back at its
    /// origin after arrivals stop). `progress` is told (simulated ms, end ms) now and then.
    pub fn run(mut self, progress: &mut dyn FnMut(u64, u64)) -> RunOutcome {
        let started = std::time::Instant::now();
        while let Some(Reverse(s)) = self.heap.pop() {
            if s.at > self.end {
                break;
            }
            debug_assert!(s.at >= self.now, "time never goes back");
            self.now = s.at;
            if let Ev::Archive { case_id } = s.ev {
                self.archive(case_id);
                continue;
            }
            self.events += 1;
            if self.events.is_multiple_of(8192) {
                progress(self.now, self.end);
            }
            self.process(s.ev);
            if self.now >= self.arrivals_end && self.open_cases == 0 && self.pending_work_done() {
                break;
            }
        }
        progress(self.end, self.end);
        let wall = started.elapsed().as_secs_f64();
        self.finish(wall)
    }

    /// After arrivals stop and every case is home, only bookkeeping events remain.
    fn pending_work_done(&self) -> bool {
        !self.heap.iter().any(|Reverse(s)| matches!(s.ev, Ev::Submit { .. } | Ev::Restart { .. }))
    }

    fn process(&mut self, ev: Ev) {
        match ev {
            Ev::Arrival => self.on_arrival(),
            Ev::Submit { origin, new } => self.on_submit(origin, *new),
            Ev::Deliver { from, to, message } => self.on_deliver(from, to, *message),
            Ev::PeerDown { node, peer } => {
                if let Some(core) = self.cores[node as usize].as_mut() {
                    let name = self.topo.nodes[peer as usize].name.clone();
                    core.handle_peer_down(Millis(EPOCH_MS + self.now), &name);
                    self.trace_event(node, 1, None);
                    self.pump(node);
                }
            }
            Ev::ModelDone { node, epoch, case_id, outcome } => {
                if self.epoch[node as usize] == epoch
                    && let Some(core) = self.cores[node as usize].as_mut()
                {
                    let now = Millis(EPOCH_MS + self.now);
                    if let Err(e) = core.handle_model_result(now, case_id, Ok(*outcome)) {
                        self.violations.push(format!("model result refused at {}: {e}", self.name(node)));
                    }
                    self.pump(node);
                }
            }
            Ev::BlobArrived { node, from, epoch, case_id, attachment } => {
                self.on_blob(node, from, epoch, case_id, *attachment)
            }
            Ev::ExpertDone { node, epoch, modality, case_id, expert } => {
                self.on_expert_done(node, epoch, modality, case_id, expert)
            }
            Ev::Timer { node, at } => {
                if self.armed[node as usize] == Some(at)
                    && let Some(core) = self.cores[node as usize].as_mut()
                {
                    self.armed[node as usize] = None;
                    core.handle_timeout(Millis(EPOCH_MS + self.now));
                    self.pump(node);
                }
            }
            Ev::HourTick => self.on_hour(),
            Ev::Sample => {
                let t_h = self.now as f64 / HOUR_MS as f64;
                for tier in Tier::ALL {
                    if self.tier_counts[tier as usize] > 0 {
                        let waiting = self.waiting[tier as usize];
                        self.queue_samples.push(QueueSample { t_h, tier: tier.as_str().into(), waiting });
                    }
                }
                let next = self.now + (self.scenario.sample_interval_min * 60_000.0) as u64;
                self.schedule(next, Ev::Sample);
            }
            Ev::Crash { node } => self.crash(node),
            Ev::Restart { node } => self.restart(node),
            Ev::Cut { a, b } => {
                self.trace_event(a, 2, None);
                self.cut.insert((a.min(b), a.max(b)));
            }
            Ev::Archive { case_id } => self.archive(case_id),
            Ev::AdvertTick => self.on_advert_tick(),
            Ev::AdvertArrives { node, advert } => {
                if let Some(core) = self.cores[node as usize].as_mut() {
                    // An advert that expired on the way is dropped by the core, as a real
                    // node drops it; one older than the one held is ignored.
                    let _ = core.handle_advert(Millis(EPOCH_MS + self.now), &advert);
                }
            }
            Ev::Heal { a, b } => {
                self.trace_event(a, 3, None);
                self.cut.remove(&(a.min(b), a.max(b)));
                self.link_up(a, b);
                self.link_up(b, a);
                self.pump(a);
                self.pump(b);
            }
        }
    }

    // ----- capacity adverts (control plane) -----

    /// Each live node signs its capacity now; each node that lists it upstream gets
    /// the advert `hops × hop_delay` later, hops being the tiers between them.
    fn on_advert_tick(&mut self) {
        let Some(spec) = self.scenario.adverts.clone() else { return };
        let now = Millis(EPOCH_MS + self.now);
        let validity_ms = (spec.validity_s * 1000.0) as u64;
        let hop_ms = (spec.hop_delay_s * 1000.0) as u64;
        let mut signed: HashMap<u32, SignedEnvelope> = HashMap::new();
        let mut deliveries = Vec::new();
        for (m, node) in self.topo.nodes.iter().enumerate() {
            if self.cores[m].is_none() {
                continue;
            }
            for &u in &node.upstream {
                let advert = match signed.get(&u) {
                    Some(a) => a.clone(),
                    None => {
                        let Some(core) = self.cores[u as usize].as_ref() else { continue };
                        let Ok(a) = core.capacity_advert_for(now, validity_ms) else { continue };
                        signed.insert(u, a.clone());
                        a
                    }
                };
                let hops = (self.topo.nodes[u as usize].tier as u64).saturating_sub(node.tier as u64).max(1);
                deliveries.push((self.now + hops * hop_ms, m as u32, advert));
            }
        }
        for (at, node, advert) in deliveries {
            self.schedule(at, Ev::AdvertArrives { node, advert: Box::new(advert) });
        }
        let next = self.now + ((spec.interval_s * 1000.0) as u64).max(1);
        if self.now < self.arrivals_end || self.open_cases > 0 {
            self.schedule(next, Ev::AdvertTick);
        }
    }

    // ----- arrivals -----

    fn schedule_next_arrival(&mut self) {
        // Thinning of a non-homogeneous Poisson process with the diurnal rate.
        let max_rate = self.rate_per_ms * self.diurnal_max;
        let mut t = self.now as f64;
        loop {
            let u: f64 = self.rng_arrivals.random();
            t += -(1.0 - u).ln() / max_rate;
            if t >= self.arrivals_end as f64 {
                return;
            }
            let hour = ((t as u64 / HOUR_MS) % 24) as usize;
            let accept: f64 = self.rng_arrivals.random();
            if accept * self.diurnal_max <= self.diurnal[hour] {
                break;
            }
        }
        self.schedule(t as u64, Ev::Arrival);
    }

    fn on_arrival(&mut self) {
        let origin = self.topo.origins[self.rng_arrivals.random_range(0..self.topo.origins.len())];
        let pick: f64 = self.rng_arrivals.random();
        let mix_idx = self.mix_cdf.iter().position(|&c| pick <= c).unwrap_or(self.mix_cdf.len() - 1);
        let mix = self.scenario.workload.mix[mix_idx].clone();
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.rng_arrivals.random::<u64>().to_le_bytes());
        id[8..].copy_from_slice(&self.rng_arrivals.random::<u64>().to_le_bytes());
        let case_id = CaseId(id);
        let attachments = mix
            .attachment_bytes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let mut seed = id.to_vec();
                seed.push(i as u8);
                AttachmentRef {
                    hash: ContentHash::of(&seed),
                    size_bytes: size,
                    media_type: "application/octet-stream".into(),
                    name: format!("part{i}"),
                    priority: if i == 0 { Priority::Urgent } else { Priority::Bulk },
                }
            })
            .collect();
        let new = NewCase {
            case_id,
            modality: mix.modality,
            task: mix.task.clone(),
            urgency: mix.urgency,
            clinical_question: format!("{} {}", mix.urgency, mix.task),
            patient: PatientRef { pseudonym: format!("p{}", self.arrival_seq), sex: None, age_years: None },
            attachments,
            deidentified: Vec::new(),
            identity: None,
        };
        self.arrival_seq += 1;
        self.on_submit(origin, new);
        self.schedule_next_arrival();
    }

    fn on_submit(&mut self, origin: u32, new: NewCase) {
        if !self.ensure_core(origin) {
            // The clinic's node is down: the clinician submits again a minute later.
            self.schedule(self.now + 60_000, Ev::Submit { origin, new: Box::new(new) });
            return;
        }
        let case_id = new.case_id;
        let deadline_ms = self.deadlines.report_ms(new.modality, new.urgency);
        self.cases.insert(
            case_id,
            CaseTrack {
                log: CaseLog {
                    case_id,
                    origin,
                    modality: new.modality,
                    urgency: new.urgency,
                    created_ms: self.now,
                    deadline_ms,
                    queued_ms: None,
                    claimed_ms: None,
                    service_ms: 0,
                    reported_at_origin_ms: None,
                    read_at: None,
                    read_by_model: false,
                    reads: 0,
                },
                holders: vec![origin],
            },
        );
        self.open_cases += 1;
        let now = self.abs();
        let core = self.cores[origin as usize].as_mut().expect("ensured");
        if let Err(e) = core.handle_submit(now, new) {
            self.violations.push(format!("submit refused at {}: {e}", self.topo.nodes[origin as usize].name));
        }
        self.pump(origin);
    }

    // ----- cores -----

    fn name(&self, n: u32) -> &NodeName {
        &self.topo.nodes[n as usize].name
    }

    fn public_key(&mut self, n: u32) -> PublicKey {
        let name = self.topo.nodes[n as usize].name.as_str();
        let mode = self.crypto;
        *self.public_keys.entry(n).or_insert_with(|| match mode {
            CryptoMode::Real => tiers::harness::public_key_for(name),
            // Any 32 bytes serve as an identity for the stand-in; deriving an Ed25519
            // public key costs a scalar multiplication per node.
            CryptoMode::KeyedHash => PublicKey(ContentHash::of(format!("telemed-sim key:{name}").as_bytes()).0),
        })
    }

    fn peer(&mut self, n: u32) -> Peer {
        let public_key = self.public_key(n);
        let node = &self.topo.nodes[n as usize];
        Peer { name: node.name.clone(), tier: node.tier, public_key }
    }

    fn expert_pools(&self, tier: Tier) -> Vec<ExpertPool> {
        let h = self.hour_of_day();
        Modality::ALL
            .into_iter()
            .filter_map(|m| {
                let r = self.rosters[tier as usize][m as usize].as_ref()?;
                Some(ExpertPool {
                    modality: m,
                    on_duty: r.by_hour[h],
                    service_ms: (r.service_min.mean() * 60_000.0) as u64,
                })
            })
            .collect()
    }

    fn config(&mut self, n: u32) -> NodeConfig {
        let up: Vec<u32> = self.topo.nodes[n as usize].upstream.clone();
        let upstream = up
            .into_iter()
            .map(|u| Upstream {
                name: self.name(u).clone(),
                tier: self.topo.nodes[u as usize].tier,
                public_key: Some(self.public_key(u)),
            })
            .collect();
        let node = &self.topo.nodes[n as usize];
        let mut config = NodeConfig::new(node.name.clone(), node.tier);
        config.upstream = upstream;
        // Simulated experts never abandon a claim (service times are drawn whole), so
        // claim leases, the core's guard against that, are set beyond any run.
        config.deadlines.claim_lease_factor = 1 << 30;
        config.models = self.models[node.tier as usize]
            .iter()
            .map(|m| ModelSpec {
                id: m.id.clone(),
                version: "1.0.0".into(),
                modality: m.modality,
                tasks: m.tasks.clone(),
                threshold: m.threshold,
                cases_per_hour: (3600.0 / m.run_s.max(0.001)) as u32,
            })
            .collect();
        config.experts = self.expert_pools(node.tier);
        config.seed = self.seed ^ u64::from(n).wrapping_mul(0xA076_1D64_78BD_642F);
        if self.crypto == CryptoMode::KeyedHash {
            // The run's shared memo spares re-verifying and re-decoding at every core.
            config.limits.verified_envelopes_max = NODE_VERIFIED_ENVELOPES_MAX;
        }
        config
    }

    fn init_pools(&mut self, n: u32) {
        let tier = self.topo.nodes[n as usize].tier;
        let h = self.hour_of_day();
        let rosters = &self.rosters[tier as usize];
        if rosters.iter().all(|r| r.is_none()) {
            return;
        }
        let mut pools: Box<[Pool; 3]> = Box::default();
        for m in Modality::ALL {
            pools[m as usize].on_duty = rosters[m as usize].as_ref().map_or(0, |r| r.by_hour[h]);
        }
        self.pools[n as usize] = Some(pools);
    }

    /// Creates a node's core on first use (and its upstream chain). False while down.
    fn ensure_core(&mut self, n: u32) -> bool {
        if self.cores[n as usize].is_some() {
            return true;
        }
        if self.down[n as usize] {
            return false;
        }
        let up = self.topo.nodes[n as usize].upstream.clone();
        for u in up {
            self.ensure_core(u);
        }
        let records = self.stores.get(&n).map(|s| s.values().map(|r| (**r).clone()).collect()).unwrap_or_default();
        let core = self.make_core(n, records);
        self.cores[n as usize] = Some(Box::new(core));
        self.created[n as usize] = true;
        self.init_pools(n);
        self.trace_event(n, 4, None);
        for nb in self.topo.neighbours[n as usize].clone() {
            if self.cores[nb as usize].is_some() {
                self.link_up(n, nb);
                self.link_up(nb, n);
                self.pump(nb);
            }
        }
        self.pump(n);
        true
    }

    /// Tells `node` that `peer` completed its hello.
    fn link_up(&mut self, node: u32, peer: u32) {
        if self.down[peer as usize] || !self.reachable(node, peer) {
            return;
        }
        let p = self.peer(peer);
        let now = self.abs();
        if let Some(core) = self.cores[node as usize].as_mut() {
            let _ = core.handle_peer_up(now, p);
        }
    }

    fn reachable(&self, a: u32, b: u32) -> bool {
        !self.down[a as usize] && !self.down[b as usize] && !self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn crash(&mut self, n: u32) {
        self.trace_event(n, 5, None);
        self.down[n as usize] = true;
        self.cores[n as usize] = None;
        self.epoch[n as usize] += 1;
        self.armed[n as usize] = None;
        let tier = self.topo.nodes[n as usize].tier as usize;
        if let Some(pools) = self.pools[n as usize].as_mut() {
            for p in pools.iter_mut() {
                self.waiting[tier] -= p.queue.len() as u64;
                p.queue.clear();
                p.keys.clear();
                p.busy = 0;
            }
        }
    }

    fn restart(&mut self, n: u32) {
        self.trace_event(n, 6, None);
        self.down[n as usize] = false;
        if !self.created[n as usize] {
            return; // never ran: it is created on first use
        }
        let records: Vec<tiers::CaseRecord> =
            self.stores.get(&n).map(|s| s.values().map(|r| (**r).clone()).collect()).unwrap_or_default();
        let core = self.make_core(n, records);
        // The reading room reopens: queued cases back in the queue, claimed ones re-read.
        let mut queued = Vec::new();
        let mut claimed = Vec::new();
        for c in core.cases() {
            match &c.status {
                tiers::CaseStatus::Queued { .. } => queued.push((c.info.case_id, c.info.modality, c.info.urgency)),
                tiers::CaseStatus::Claimed { expert, .. } => {
                    claimed.push((c.info.case_id, c.info.modality, expert.clone()))
                }
                _ => {}
            }
        }
        self.cores[n as usize] = Some(Box::new(core));
        self.init_pools(n);
        for (id, m, u) in queued {
            self.enqueue(n, id, m, u);
        }
        for (id, m, expert) in claimed {
            let expert_id = expert.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            self.start_reading(n, id, m, expert_id);
        }
        for nb in self.topo.neighbours[n as usize].clone() {
            if self.cores[nb as usize].is_some() {
                self.link_up(n, nb);
                self.link_up(nb, n);
                self.pump(nb);
            }
        }
        self.pump(n);
    }

    /// Acts on a node's outputs in order until none is left, letting experts claim.
    fn pump(&mut self, n: u32) {
        loop {
            let Some(core) = self.cores[n as usize].as_mut() else { return };
            match core.poll_output() {
                Some(out) => self.act(n, out),
                None => {
                    if !self.dispatch(n) {
                        break;
                    }
                }
            }
        }
        let t = self.cores[n as usize].as_ref().and_then(|c| c.poll_timeout());
        if t != self.armed[n as usize] {
            self.armed[n as usize] = t;
            if let Some(at) = t {
                self.schedule(at.0.saturating_sub(EPOCH_MS), Ev::Timer { node: n, at });
            }
        }
    }

    fn act(&mut self, n: u32, out: Output) {
        match out {
            Output::Persist(Change::PutCase(record)) => {
                if !self.stores.is_empty()
                    && let Some(store) = self.stores.get_mut(&n)
                {
                    store.insert(record.info.case_id, record);
                }
            }
            Output::Send { to, message } => {
                let Some(to) = self.topo.index(&to) else {
                    self.violations.push(format!("{} sent to unknown node {to}", self.name(n)));
                    return;
                };
                let bytes = message_bytes(&message);
                match self.transfer(n, to, bytes) {
                    Some(at) => self.schedule(at, Ev::Deliver { from: n, to, message: Box::new(message) }),
                    None => {
                        let at = self.now + self.scenario.links.connect_timeout_ms;
                        self.schedule(at, Ev::PeerDown { node: n, peer: to });
                    }
                }
            }
            Output::RunModel { case_id, model } => {
                let tier = self.topo.nodes[n as usize].tier;
                let spec = self.models[tier as usize].iter().find(|m| m.id == model).cloned();
                match spec {
                    Some(spec) => {
                        let confidence = sample(&spec.confidence, &mut self.rng_models).clamp(0.0, 1.0) as f32;
                        let outcome = ModelOutcome {
                            model: model.clone(),
                            version: "1.0.0".into(),
                            labels: vec![Label { label: "finding".into(), confidence }],
                        };
                        let at = self.now + (spec.run_s * 1000.0) as u64;
                        let epoch = self.epoch[n as usize];
                        self.schedule(at, Ev::ModelDone { node: n, epoch, case_id, outcome: Box::new(outcome) });
                    }
                    None => {
                        let now = self.abs();
                        if let Some(core) = self.cores[n as usize].as_mut() {
                            let _ = core.handle_model_result(now, case_id, Err("model not installed".into()));
                        }
                    }
                }
            }
            Output::FetchAttachments { case_id, from, attachments } => {
                let Some(from) = self.topo.index(&from) else { return };
                for a in attachments {
                    self.fetch(n, from, case_id, a);
                }
            }
            Output::Notify(event) => self.on_event(n, event),
        }
    }

    /// Sends `bytes` from `a` to `b` over their link; the arrival time, or `None` if
    /// the link or either end is down. Each direction of a link is a FIFO pipe.
    fn transfer(&mut self, a: u32, b: u32, bytes: u64) -> Option<u64> {
        if !self.reachable(a, b) {
            return None;
        }
        let lower = self.topo.nodes[a as usize].tier.min(self.topo.nodes[b as usize].tier);
        let links = &self.scenario.links;
        let latency = links.latency_ms(lower);
        let duration = (bytes as f64 / links.bytes_per_ms(lower)).ceil() as u64;
        let busy = self.link_busy.entry((a, b)).or_insert(0);
        let start = (*busy).max(self.now);
        *busy = start + duration;
        let hour = (self.now / HOUR_MS) as usize;
        if self.link_load.len() <= hour {
            self.link_load.resize(hour + 1, [(0, 0); 7]);
        }
        let slot = &mut self.link_load[hour][lower as usize];
        slot.0 += bytes;
        slot.1 += 1;
        Some(start + duration + latency)
    }

    fn fetch(&mut self, node: u32, from: u32, case_id: CaseId, a: AttachmentRef) {
        let epoch = self.epoch[node as usize];
        let at = match self.transfer(from, node, a.size_bytes) {
            Some(at) => at,
            // The data plane retries a failed fetch later.
            None => self.now + self.scenario.links.fetch_retry_ms,
        };
        self.schedule(at, Ev::BlobArrived { node, from, epoch, case_id, attachment: Box::new(a) });
    }

    fn on_blob(&mut self, node: u32, from: u32, epoch: u32, case_id: CaseId, a: AttachmentRef) {
        if self.epoch[node as usize] != epoch || self.cores[node as usize].is_none() {
            return; // crashed meanwhile: the restored core re-issues the fetch
        }
        let still_receiving = self.cores[node as usize]
            .as_ref()
            .and_then(|c| c.case(&case_id))
            .is_some_and(|c| c.status == tiers::CaseStatus::Receiving);
        if !still_receiving {
            return;
        }
        if !self.reachable(from, node) {
            self.fetch(node, from, case_id, a);
            return;
        }
        let now = self.abs();
        let core = self.cores[node as usize].as_mut().expect("checked");
        if let Err(e) = core.handle_attachment_stored(now, case_id, a.hash) {
            self.violations.push(format!("attachment refused at {}: {e}", self.name(node)));
        }
        self.pump(node);
    }

    fn on_deliver(&mut self, from: u32, to: u32, message: Message) {
        if !self.reachable(from, to) {
            self.schedule(self.now, Ev::PeerDown { node: from, peer: to });
            return;
        }
        if !self.ensure_core(to) {
            self.schedule(self.now, Ev::PeerDown { node: from, peer: to });
            return;
        }
        self.delivered += 1;
        self.trace_event(to, 10 + message_tag(&message), message_case(&message).as_ref());
        let now = self.abs();
        let from_name = &self.topo.nodes[from as usize].name;
        let core = self.cores[to as usize].as_mut().expect("ensured");
        if core.handle_message(now, from_name, message).is_err() {
            self.refusals += 1;
        }
        self.pump(to);
    }

    // ----- people -----

    fn on_event(&mut self, n: u32, event: Event) {
        let tier = self.topo.nodes[n as usize].tier;
        let now = self.now;
        match event {
            Event::CaseCreated { case_id } => self.trace_event(n, 30, Some(&case_id)),
            Event::CustodyTaken { case_id, .. } => {
                self.trace_event(n, 31, Some(&case_id));
                if let Some(t) = self.cases.get_mut(&case_id) {
                    *self.tier_load.entry((tier, t.log.modality)).or_default() += 1;
                    if !t.holders.contains(&n) {
                        t.holders.push(n);
                    }
                }
            }
            Event::ModelRead { case_id, decisive, .. } => {
                self.trace_event(n, 32 + u8::from(decisive), Some(&case_id));
                if decisive {
                    self.record_read(n, case_id, true);
                }
            }
            Event::Queued { case_id, .. } => {
                self.trace_event(n, 34, Some(&case_id));
                let (m, u) = match self.cores[n as usize].as_ref().and_then(|c| c.case(&case_id)) {
                    Some(c) => (c.info.modality, c.info.urgency),
                    None => return,
                };
                if let Some(t) = self.cases.get_mut(&case_id) {
                    t.log.queued_ms.get_or_insert(now);
                }
                self.enqueue(n, case_id, m, u);
            }
            Event::Claimed { case_id, .. } => self.trace_event(n, 35, Some(&case_id)),
            Event::ClaimExpired { case_id, .. } => self.trace_event(n, 45, Some(&case_id)),
            Event::Escalating { case_id, reason, .. } => {
                self.trace_event(n, 36, Some(&case_id));
                self.escalations += 1;
                if matches!(reason, federation_proto::EscalationReason::Rerouted { .. }) {
                    self.reroutes += 1;
                }
                self.dequeue(n, case_id);
            }
            Event::CustodyPassed { case_id, .. } => self.trace_event(n, 37, Some(&case_id)),
            Event::Reported { case_id, .. } => self.trace_event(n, 38, Some(&case_id)),
            Event::ReportReceived { case_id, .. } => self.trace_event(n, 44, Some(&case_id)),
            Event::ReportAtOrigin { case_id } => {
                self.trace_event(n, 39, Some(&case_id));
                if let Some(t) = self.cases.get_mut(&case_id)
                    && t.log.reported_at_origin_ms.is_none()
                {
                    t.log.reported_at_origin_ms = Some(now);
                    self.open_cases -= 1;
                    self.schedule(now + ARCHIVE_AFTER_MS, Ev::Archive { case_id });
                }
            }
            Event::Recalled { case_id } => self.trace_event(n, 40, Some(&case_id)),
            Event::ConflictingReport { case_id, from } => {
                self.trace_event(n, 41, Some(&case_id));
                self.violations
                    .push(format!("case {case_id} read twice: a second report came to {} from {from}", self.name(n)));
            }
            Event::NoCapacity { case_id } => {
                self.trace_event(n, 42, Some(&case_id));
                self.no_capacity += 1;
            }
            Event::PeerRefused { .. } => {
                self.trace_event(n, 43, None);
            }
        }
    }

    fn record_read(&mut self, n: u32, case_id: CaseId, by_model: bool) {
        let tier = self.topo.nodes[n as usize].tier;
        let Some(t) = self.cases.get_mut(&case_id) else { return };
        t.log.reads += 1;
        t.log.read_at = Some(tier);
        t.log.read_by_model = by_model;
        let reads = t.log.reads;
        if reads > 1 {
            let name = self.name(n).clone();
            self.violations.push(format!("case {case_id} read {reads} times (last at {name})"));
        }
    }

    fn enqueue(&mut self, n: u32, case_id: CaseId, m: Modality, u: Urgency) {
        let tier = self.topo.nodes[n as usize].tier as usize;
        let deadline = self.cases.get(&case_id).map_or(u64::MAX, |t| t.log.created_ms + t.log.deadline_ms);
        self.arrival_seq += 1;
        let seq = self.arrival_seq;
        let Some(pools) = self.pools[n as usize].as_mut() else {
            self.violations.push(format!("case {case_id} queued at {} which has no experts", self.name(n)));
            return;
        };
        let pool = &mut pools[m as usize];
        if pool.keys.insert(case_id, (u, deadline, seq)).is_none() {
            pool.queue.insert((u, deadline, seq, case_id));
            self.waiting[tier] += 1;
        }
    }

    fn dequeue(&mut self, n: u32, case_id: CaseId) {
        let tier = self.topo.nodes[n as usize].tier as usize;
        let Some(pools) = self.pools[n as usize].as_mut() else { return };
        for pool in pools.iter_mut() {
            if let Some((u, d, s)) = pool.keys.remove(&case_id) {
                pool.queue.remove(&(u, d, s, case_id));
                self.waiting[tier] -= 1;
            }
        }
    }

    /// Free experts claim the most urgent queued cases. True if anyone claimed.
    fn dispatch(&mut self, n: u32) -> bool {
        let tier = self.topo.nodes[n as usize].tier as usize;
        let mut any = false;
        for m in Modality::ALL {
            loop {
                let Some(pools) = self.pools[n as usize].as_mut() else { return any };
                let pool = &mut pools[m as usize];
                if pool.busy >= pool.on_duty {
                    break;
                }
                let Some(first) = pool.queue.pop_first() else { break };
                pool.keys.remove(&first.3);
                self.waiting[tier] -= 1;
                let case_id = first.3;
                self.next_expert += 1;
                let expert_id = self.next_expert;
                let expert = format!("dr-{}-{expert_id}", m.as_str());
                let now = self.abs();
                let Some(core) = self.cores[n as usize].as_mut() else { return any };
                if core.handle_claim(now, case_id, &expert).is_ok() {
                    self.start_reading(n, case_id, m, expert_id);
                    any = true;
                }
            }
        }
        any
    }

    fn start_reading(&mut self, n: u32, case_id: CaseId, m: Modality, expert: u64) {
        let tier = self.topo.nodes[n as usize].tier;
        let service_min = self.rosters[tier as usize][m as usize]
            .as_ref()
            .map_or(Dist::Fixed { value: 10.0 }, |r| r.service_min.clone());
        let service_ms = (sample(&service_min, &mut self.rng_service) * 60_000.0).round().max(1.0) as u64;
        if let Some(pools) = self.pools[n as usize].as_mut() {
            pools[m as usize].busy += 1;
        }
        if let Some(t) = self.cases.get_mut(&case_id) {
            t.log.claimed_ms = Some(self.now);
            t.log.service_ms = service_ms;
        }
        add_interval(&mut self.busy_ms[tier as usize], self.now, self.now + service_ms);
        let epoch = self.epoch[n as usize];
        self.schedule(self.now + service_ms, Ev::ExpertDone { node: n, epoch, modality: m, case_id, expert });
    }

    fn on_expert_done(&mut self, n: u32, epoch: u32, m: Modality, case_id: CaseId, expert: u64) {
        if self.epoch[n as usize] != epoch || self.cores[n as usize].is_none() {
            return; // the node crashed while the expert read; the restart re-reads it
        }
        if let Some(pools) = self.pools[n as usize].as_mut() {
            pools[m as usize].busy -= 1;
        }
        let now = self.abs();
        let name = format!("dr-{}-{expert}", m.as_str());
        let draft = ReportDraft {
            labels: vec![Label { label: "read".into(), confidence: 1.0 }],
            fields: Vec::new(),
            text: format!("Read by {name}."),
        };
        let core = self.cores[n as usize].as_mut().expect("checked");
        match core.handle_sign_report(now, case_id, &name, draft) {
            Ok(()) => self.record_read(n, case_id, false),
            Err(e) => self.violations.push(format!("expert {name} at {} could not sign: {e}", self.name(n))),
        }
        self.pump(n);
    }

    fn on_hour(&mut self) {
        let h = self.hour_of_day();
        let prev = (h + 23) % 24;
        for tier in Tier::ALL {
            let changed = self.rosters[tier as usize].iter().flatten().any(|r| r.by_hour[h] != r.by_hour[prev]);
            if !changed {
                continue;
            }
            let pools_cfg = self.expert_pools(tier);
            let nodes: Vec<u32> = (0..self.topo.len() as u32)
                .filter(|&i| self.topo.nodes[i as usize].tier == tier && self.cores[i as usize].is_some())
                .collect();
            for n in nodes {
                for p in &pools_cfg {
                    if let Some(pools) = self.pools[n as usize].as_mut() {
                        pools[p.modality as usize].on_duty = p.on_duty;
                    }
                }
                let now = self.abs();
                if let Some(core) = self.cores[n as usize].as_mut() {
                    core.handle_experts_changed(now, pools_cfg.clone());
                }
                self.pump(n);
            }
        }
        self.schedule(self.now + HOUR_MS, Ev::HourTick);
    }

    /// Drops a finished case from every core that held it, once none of them owes
    /// anything for it (each has its report at the origin or acknowledged below), so
    /// memory follows the cases in flight, not every case ever seen. Tried again
    /// later while any holder still waits for a receipt.
    fn archive(&mut self, case_id: CaseId) {
        let Some(t) = self.cases.get(&case_id) else { return };
        let holders = t.holders.clone();
        let finished = |c: &tiers::CaseRecord| {
            matches!(c.status, tiers::CaseStatus::Reported { .. })
                && matches!(c.report_down, tiers::ReportDown::AtOrigin | tiers::ReportDown::Acked { .. })
        };
        let all_finished = holders
            .iter()
            .all(|&h| self.cores[h as usize].as_ref().and_then(|c| c.case(&case_id)).is_none_or(finished));
        if !all_finished {
            if self.now + ARCHIVE_AFTER_MS <= self.end {
                self.schedule(self.now + ARCHIVE_AFTER_MS, Ev::Archive { case_id });
            }
            return;
        }
        for h in holders {
            if let Some(core) = self.cores[h as usize].as_mut()
                && core.case(&case_id).is_some()
                && let Err(e) = core.archive(case_id)
            {
                self.violations.push(format!("archive refused at {}: {e}", self.topo.nodes[h as usize].name));
            }
        }
    }

    // ----- results -----

    fn finish(mut self, wall_s: f64) -> RunOutcome {
        // Invariants after the drain: every case home, read exactly once.
        let mut unfinished = 0usize;
        for (id, t) in &self.cases {
            if t.log.reported_at_origin_ms.is_none() {
                unfinished += 1;
                if unfinished <= 20 {
                    let holders: Vec<String> = self
                        .cores
                        .iter()
                        .enumerate()
                        .filter_map(|(i, c)| {
                            let r = c.as_ref()?.case(id)?;
                            r.status.holds_custody().then(|| format!("{}:{}", self.topo.nodes[i].name, r.status.name()))
                        })
                        .collect();
                    self.violations.push(format!(
                        "case {id} ({} {}) from {} never reached its origin with a report by the end of the drain; held by [{}]",
                        t.log.modality,
                        t.log.urgency,
                        self.topo.nodes[t.log.origin as usize].name,
                        holders.join(", ")
                    ));
                }
            } else if t.log.reads != 1 {
                self.violations.push(format!("case {id} reported at origin but read {} times", t.log.reads));
            }
        }
        if unfinished > 20 {
            self.violations.push(format!("... {unfinished} cases in all never reached their origin"));
        }
        let trace_hash = hex::encode(self.trace.clone().finalize());
        let logs: Vec<CaseLog> = self.cases.values().map(|t| t.log.clone()).collect();
        let mut turnaround = Vec::new();
        for m in Modality::ALL {
            for u in Urgency::ALL {
                let of: Vec<&CaseLog> = logs.iter().filter(|l| l.modality == m && l.urgency == u).collect();
                if of.is_empty() {
                    continue;
                }
                let mut times: Vec<u64> =
                    of.iter().filter_map(|l| Some(l.reported_at_origin_ms? - l.created_ms)).collect();
                times.sort_unstable();
                let deadline = self.deadlines.report_ms(m, u);
                let missed =
                    of.iter().filter(|l| l.reported_at_origin_ms.is_none_or(|r| r - l.created_ms > deadline)).count()
                        as u64;
                let min = |ms: u64| ms as f64 / 60_000.0;
                let mean = if times.is_empty() { 0.0 } else { times.iter().sum::<u64>() as f64 / times.len() as f64 };
                turnaround.push(TurnaroundRow {
                    modality: m.as_str().into(),
                    urgency: u.as_str().into(),
                    cases: of.len() as u64,
                    deadline_min: min(deadline),
                    mean_min: mean / 60_000.0,
                    p50_min: min(percentile(&times, 50.0)),
                    p90_min: min(percentile(&times, 90.0)),
                    p95_min: min(percentile(&times, 95.0)),
                    p99_min: min(percentile(&times, 99.0)),
                    max_min: min(times.last().copied().unwrap_or(0)),
                    deadline_missed: missed,
                    deadline_missed_pct: 100.0 * missed as f64 / of.len() as f64,
                });
            }
        }
        let mut resolved = Vec::new();
        for tier in Tier::ALL {
            for m in Modality::ALL {
                let at = logs.iter().filter(|l| l.read_at == Some(tier) && l.modality == m);
                let (by_model, by_expert) =
                    at.fold((0, 0), |(a, b), l| if l.read_by_model { (a + 1, b) } else { (a, b + 1) });
                if by_model + by_expert > 0 {
                    resolved.push(ResolvedRow {
                        tier: tier.as_str().into(),
                        modality: m.as_str().into(),
                        by_model,
                        by_expert,
                    });
                }
            }
        }
        let tier_load = self
            .tier_load
            .iter()
            .map(|((t, m), c)| TierLoadRow { tier: t.as_str().into(), modality: m.as_str().into(), cases: *c })
            .collect();
        let hours = self.now.div_ceil(HOUR_MS).max(1) as usize;
        let mut utilisation = Vec::new();
        for tier in Tier::ALL {
            let count = self.tier_counts[tier as usize] as f64;
            if self.rosters[tier as usize].iter().all(|r| r.is_none()) {
                continue;
            }
            for hour in 0..hours {
                let on_duty: u32 = self.rosters[tier as usize].iter().flatten().map(|r| r.by_hour[hour % 24]).sum();
                let on_duty_h = count * f64::from(on_duty);
                let busy_h = self.busy_ms[tier as usize].get(hour).copied().unwrap_or(0) as f64 / HOUR_MS as f64;
                utilisation.push(UtilisationRow {
                    tier: tier.as_str().into(),
                    hour: hour as u32,
                    busy_expert_h: busy_h,
                    on_duty_expert_h: on_duty_h,
                    utilisation: if on_duty_h > 0.0 { busy_h / on_duty_h } else { 0.0 },
                });
            }
        }
        let mut link_load = Vec::new();
        for (hour, slots) in self.link_load.iter().enumerate() {
            for tier in Tier::ALL.into_iter().take(6) {
                let (bytes, messages) = slots[tier as usize];
                link_load.push(LinkLoadRow {
                    link: tier.as_str().into(),
                    hour: hour as u32,
                    bytes,
                    messages,
                    mbit_s: bytes as f64 * 8.0 / 1e6 / 3600.0,
                });
            }
        }
        let submitted = logs.len() as u64;
        let metrics = Metrics {
            scenario: self.scenario.name.clone(),
            description: self.scenario.description.clone(),
            seed: self.seed,
            trace_hash,
            nodes_total: self.topo.len() as u64,
            nodes_by_tier: Tier::ALL
                .into_iter()
                .map(|t| TierCount { tier: t.as_str().into(), nodes: self.tier_counts[t as usize] as u64 })
                .collect(),
            cores_created: self.created.iter().filter(|c| **c).count() as u64,
            cases_submitted: submitted,
            cases_reported_at_origin: logs.iter().filter(|l| l.reported_at_origin_ms.is_some()).count() as u64,
            events_processed: self.events,
            messages_delivered: self.delivered,
            simulated_h: self.now as f64 / HOUR_MS as f64,
            arrivals_h: self.scenario.duration_h,
            wall_s,
            cases_per_wall_s: submitted as f64 / wall_s.max(1e-9),
            events_per_wall_s: self.events as f64 / wall_s.max(1e-9),
            escalations: self.escalations,
            reroutes: self.reroutes,
            peer_refusals: self.refusals,
            no_capacity_events: self.no_capacity,
            turnaround,
            resolved,
            tier_load,
            utilisation,
            queue: std::mem::take(&mut self.queue_samples),
            link_load,
            violations: std::mem::take(&mut self.violations),
        };
        RunOutcome { metrics, cases: logs }
    }
}

/// Adds `[start, end)` to per-hour buckets of milliseconds.
fn add_interval(buckets: &mut Vec<u64>, start: u64, end: u64) {
    let mut t = start;
    while t < end {
        let hour = (t / HOUR_MS) as usize;
        let hour_end = (hour as u64 + 1) * HOUR_MS;
        let until = end.min(hour_end);
        if buckets.len() <= hour {
            buckets.resize(hour + 1, 0);
        }
        buckets[hour] += until - t;
        t = until;
    }
}

/// Draws from a scenario distribution.
pub fn sample(d: &Dist, rng: &mut ChaCha8Rng) -> f64 {
    match *d {
        Dist::Fixed { value } => value,
        Dist::Exponential { mean } => {
            let u: f64 = rng.random();
            -(1.0 - u).ln() * mean
        }
        Dist::Lognormal { mean, sigma } => {
            let mu = mean.ln() - sigma * sigma / 2.0;
            rand_distr::LogNormal::new(mu, sigma).map_or(mean, |l| l.sample(rng))
        }
        Dist::Uniform { low, high } => low + (high - low) * rng.random::<f64>(),
        Dist::Beta { a, b } => rand_distr::Beta::new(a, b).map_or(a / (a + b), |x| x.sample(rng)),
    }
}

/// Approximate bytes of a message on the wire (signed parts are counted exactly).
fn message_bytes(m: &Message) -> u64 {
    let env = |e: &federation_proto::SignedEnvelope| e.as_bytes().len() as u64;
    match m {
        Message::CaseOffer(o) => {
            env(&o.manifest) + o.trail.iter().map(env).sum::<u64>() + o.findings.iter().map(env).sum::<u64>() + 64
        }
        Message::ReportDelivery(d) => {
            env(&d.report) + d.trail.iter().map(env).sum::<u64>() + d.findings.iter().map(env).sum::<u64>() + 64
        }
        Message::CustodyReceipt(e) | Message::ReportReceipt(e) | Message::CapacityAdvert(e) | Message::Recall(e) => {
            env(e) + 16
        }
        _ => SMALL_MESSAGE_BYTES,
    }
}

fn message_tag(m: &Message) -> u8 {
    match m {
        Message::CaseOffer(_) => 0,
        Message::OfferAccept(_) => 1,
        Message::AlreadyHave(_) => 2,
        Message::Reject(_) => 3,
        Message::CustodyReceipt(_) => 4,
        Message::ReportDelivery(_) => 5,
        Message::ReportReceipt(_) => 6,
        Message::CapacityAdvert(_) => 7,
        Message::Recall(_) => 8,
        _ => 9,
    }
}

fn message_case(m: &Message) -> Option<CaseId> {
    match m {
        Message::OfferAccept(a) => Some(a.case_id),
        Message::AlreadyHave(a) => Some(a.case_id),
        Message::Reject(r) => r.case_id,
        Message::ReportDelivery(d) => Some(d.case_id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_split_across_hours() {
        let mut b = Vec::new();
        add_interval(&mut b, HOUR_MS - 10, HOUR_MS + 20);
        assert_eq!(b, vec![10, 20]);
    }

    #[test]
    fn exponential_sample_mean_is_close() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 200_000;
        let mean = (0..n).map(|_| sample(&Dist::Exponential { mean: 15.0 }, &mut rng)).sum::<f64>() / n as f64;
        assert!((mean - 15.0).abs() < 0.15, "{mean}");
    }
}
