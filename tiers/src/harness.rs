//! A deterministic harness that steps several [`Node`]s together through simulated
//! time with no sockets, in the manner of quinn-proto's test `Pair`.
//!
//! The harness plays the driver's part for every node: it applies persisted
//! changes to a [`MemStore`], delivers messages after a fixed latency over the
//! configured links, "transfers" attachments between blob sets, runs scripted
//! models, and can play on-duty experts who claim and report. It can crash a node
//! (dropping every output not yet acted on), restart it from its store, and cut
//! links. Everything is seeded: the same calls give the same run.
//!
//! This module must never hold escalation logic of its own: it only drives
//! [`Node`]. It is public so the scenario tests, the demo and tools can use it.

use crate::node::{Event, ModelOutcome, NewCase, Node, NodeConfig, Output, Peer, ReportDraft};
use crate::store::{MemStore, Store};
use crate::{CaseRecord, CaseStatus};
use ed25519_dalek::SigningKey;
use federation_proto::{
    AttachmentRef, CaseId, ContentHash, Label, Message, Millis, Modality, NodeName, PatientRef, Priority, PublicKey,
    Tier, Urgency,
};
use std::collections::{BTreeMap, BTreeSet};

/// A key derived from a name, so harness runs are reproducible.
pub fn key_for(name: &str) -> SigningKey {
    SigningKey::from_bytes(&ContentHash::of(format!("harness-key:{name}").as_bytes()).0)
}

/// The public key [`key_for`] gives a name.
pub fn public_key_for(name: &str) -> PublicKey {
    PublicKey(key_for(name).verifying_key().to_bytes())
}

/// What a scripted model answers for every case it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelScript {
    pub label: String,
    pub confidence: f32,
    pub run_ms: u64,
}

/// Experts the harness plays: they claim a queued case after `claim_after_ms`
/// and sign a report `read_ms` later.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoExperts {
    pub name: String,
    pub claim_after_ms: u64,
    pub read_ms: u64,
}

/// One node as the harness drives it.
pub struct SimNode {
    pub config: NodeConfig,
    key: SigningKey,
    /// `None` while crashed.
    pub core: Option<Node>,
    pub store: MemStore,
    /// Attachments held (by hash), as the node's blob directory would.
    pub blobs: BTreeSet<ContentHash>,
    pub models: BTreeMap<String, ModelScript>,
    pub experts: Option<AutoExperts>,
    /// Crash right after this many more persisted changes.
    pub crash_after_persists: Option<u32>,
}

#[derive(Debug, Clone)]
enum Pending {
    Deliver { from: NodeName, to: NodeName, message: Box<Message> },
    PeerDown { node: NodeName, peer: NodeName },
    ModelDone { node: NodeName, case_id: CaseId, outcome: ModelOutcome },
    BlobArrived { node: NodeName, from: NodeName, case_id: CaseId, hash: ContentHash },
    Claim { node: NodeName, case_id: CaseId, expert: String, read_ms: u64 },
    SignReport { node: NodeName, case_id: CaseId, expert: String },
}

/// Several nodes, their links, and simulated time.
pub struct Harness {
    pub now: Millis,
    pub nodes: BTreeMap<NodeName, SimNode>,
    links: BTreeSet<(NodeName, NodeName)>,
    queue: BTreeMap<(Millis, u64), Pending>,
    seq: u64,
    pub latency_ms: u64,
    rng: u64,
    /// Every event every node emitted, in order.
    pub events: Vec<(Millis, NodeName, Event)>,
    /// Messages delivered, for tests that count them.
    pub delivered: Vec<(Millis, NodeName, NodeName, &'static str)>,
    /// Peer errors the cores returned.
    pub peer_errors: Vec<(Millis, NodeName, String)>,
}

impl Harness {
    pub fn new(seed: u64) -> Harness {
        Harness {
            now: Millis(1_700_000_000_000),
            nodes: BTreeMap::new(),
            links: BTreeSet::new(),
            queue: BTreeMap::new(),
            seq: 0,
            latency_ms: 50,
            rng: seed,
            events: Vec::new(),
            delivered: Vec::new(),
            peer_errors: Vec::new(),
        }
    }

    /// Adds a node; its key comes from [`key_for`] its name.
    pub fn add_node(&mut self, config: NodeConfig) {
        let key = key_for(config.name.as_str());
        let core = Node::new(config.clone(), key.clone());
        let name = config.name.clone();
        self.nodes.insert(
            name,
            SimNode {
                config,
                key,
                core: Some(core),
                store: MemStore::default(),
                blobs: BTreeSet::new(),
                models: BTreeMap::new(),
                experts: None,
                crash_after_persists: None,
            },
        );
    }

    pub fn node(&self, name: &str) -> &SimNode {
        &self.nodes[&NodeName::from(name)]
    }

    pub fn node_mut(&mut self, name: &str) -> &mut SimNode {
        self.nodes.get_mut(&NodeName::from(name)).expect("no such node")
    }

    pub fn core(&self, name: &str) -> &Node {
        self.node(name).core.as_ref().expect("node is down")
    }

    pub fn core_mut(&mut self, name: &str) -> &mut Node {
        self.node_mut(name).core.as_mut().expect("node is down")
    }

    /// The record of a case at a node, from the live core.
    pub fn case_at(&self, node: &str, case_id: CaseId) -> Option<&CaseRecord> {
        self.node(node).core.as_ref()?.case(&case_id)
    }

    /// Links two nodes (both directions) and tells each the other's identity.
    pub fn link(&mut self, a: &str, b: &str) {
        let (a, b) = (NodeName::from(a), NodeName::from(b));
        self.links.insert((a.clone(), b.clone()));
        self.links.insert((b.clone(), a.clone()));
        self.peer_up(&a, &b);
        self.peer_up(&b, &a);
    }

    fn peer_up(&mut self, node: &NodeName, peer: &NodeName) {
        let now = self.now;
        let Some(p) = self.nodes.get(peer) else { return };
        if p.core.is_none() {
            return;
        }
        let identity = Peer { name: peer.clone(), tier: p.config.tier, public_key: public_key_for(peer.as_str()) };
        if let Some(core) = self.nodes.get_mut(node).and_then(|n| n.core.as_mut()) {
            let _ = core.handle_peer_up(now, identity);
        }
    }

    fn linked(&self, a: &NodeName, b: &NodeName) -> bool {
        self.links.contains(&(a.clone(), b.clone()))
    }

    /// Submits a case at `origin` with one attachment of `size_bytes`.
    pub fn submit(&mut self, origin: &str, modality: Modality, urgency: Urgency, question: &str) -> CaseId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_rand().to_le_bytes());
        id[8..].copy_from_slice(&self.next_rand().to_le_bytes());
        let case_id = CaseId(id);
        let bytes = format!("attachment of {case_id}");
        let hash = ContentHash::of(bytes.as_bytes());
        let node = self.node_mut(origin);
        node.blobs.insert(hash);
        let task = match modality {
            Modality::Ecg => "ecg.rhythm",
            Modality::Imaging => "imaging.triage",
            Modality::Pathology => "pathology.triage",
        };
        let new = NewCase {
            case_id,
            modality,
            task: task.into(),
            urgency,
            clinical_question: question.into(),
            patient: PatientRef {
                pseudonym: format!("p-{}", &case_id.to_string()[..8]),
                sex: None,
                age_years: Some(54),
            },
            attachments: vec![AttachmentRef {
                hash,
                size_bytes: bytes.len() as u64,
                media_type: "application/octet-stream".into(),
                name: "study".into(),
                priority: Priority::Urgent,
            }],
            deidentified: Vec::new(),
            // Every harness case carries direct identifiers, so scenarios can check
            // where they travel (the privacy boundary).
            identity: Some(federation_proto::PatientIdentity {
                case_id,
                pseudonym: String::new(),
                patient_id: format!("id-{}", &case_id.to_string()[..8]),
                name: "Test^Patient".into(),
                birth_date: "1970-01-01".into(),
                address: String::new(),
                phone: String::new(),
            }),
        };
        let now = self.now;
        self.core_mut(origin).handle_submit(now, new).expect("submit");
        self.pump_all();
        case_id
    }

    /// Crashes a node: the core and every output it had not yet had acted on are lost;
    /// its store survives.
    pub fn crash(&mut self, name: &str) {
        self.node_mut(name).core = None;
    }

    /// Restarts a crashed node from its store and re-establishes its links.
    pub fn restart(&mut self, name: &str) {
        let now = self.now;
        let node = self.node_mut(name);
        let records = node.store.load().expect("in-memory store");
        node.core = Some(Node::restore(node.config.clone(), node.key.clone(), records, now));
        node.crash_after_persists = None;
        let me = NodeName::from(name);
        let peers: Vec<NodeName> = self.links.iter().filter(|(a, _)| *a == me).map(|(_, b)| b.clone()).collect();
        for peer in peers {
            self.peer_up(&me, &peer);
            self.peer_up(&peer, &me);
        }
        self.pump_all();
    }

    /// Runs until simulated time `until`, or until nothing is left to do.
    pub fn run_until(&mut self, until: Millis) {
        let mut steps = 0u64;
        loop {
            self.pump_all();
            let next_queue = self.queue.keys().next().map(|(t, _)| *t);
            let next_timer = self.nodes.values().filter_map(|n| n.core.as_ref()?.poll_timeout()).min();
            let Some(next) = [next_queue, next_timer].into_iter().flatten().min() else { break };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            steps += 1;
            assert!(steps < 10_000_000, "harness run does not settle");
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let pending = entry.remove();
                self.process(pending);
                self.pump_all();
            }
            let now = self.now;
            for node in self.nodes.values_mut() {
                if let Some(core) = node.core.as_mut()
                    && core.poll_timeout().is_some_and(|t| t <= now)
                {
                    core.handle_timeout(now);
                }
            }
        }
        self.now = self.now.max(until);
    }

    /// Runs for `ms` of simulated time.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now.saturating_add(ms);
        self.run_until(until);
    }

    fn schedule(&mut self, at: Millis, pending: Pending) {
        self.seq += 1;
        self.queue.insert((at, self.seq), pending);
    }

    fn process(&mut self, pending: Pending) {
        let now = self.now;
        match pending {
            Pending::Deliver { from, to, message } => {
                let up = self.nodes.get(&to).is_some_and(|n| n.core.is_some());
                if !up || !self.linked(&from, &to) {
                    self.schedule(now, Pending::PeerDown { node: from, peer: to });
                    return;
                }
                self.delivered.push((now, from.clone(), to.clone(), message.kind()));
                let core = self.nodes.get_mut(&to).and_then(|n| n.core.as_mut()).expect("up");
                if let Err(e) = core.handle_message(now, &from, *message) {
                    self.peer_errors.push((now, to, e.to_string()));
                }
            }
            Pending::PeerDown { node, peer } => {
                if let Some(core) = self.nodes.get_mut(&node).and_then(|n| n.core.as_mut()) {
                    core.handle_peer_down(now, &peer);
                }
            }
            Pending::ModelDone { node, case_id, outcome } => {
                if let Some(core) = self.nodes.get_mut(&node).and_then(|n| n.core.as_mut()) {
                    let _ = core.handle_model_result(now, case_id, Ok(outcome));
                }
            }
            Pending::BlobArrived { node, from, case_id, hash } => {
                let source_has = self.nodes.get(&from).is_some_and(|n| n.core.is_some() && n.blobs.contains(&hash));
                if !source_has || !self.linked(&node, &from) {
                    return; // the fetch fails; a re-offer or restart starts it again
                }
                let Some(n) = self.nodes.get_mut(&node) else { return };
                let Some(core) = n.core.as_mut() else { return };
                n.blobs.insert(hash);
                let _ = core.handle_attachment_stored(now, case_id, hash);
            }
            Pending::Claim { node, case_id, expert, read_ms } => {
                if let Some(core) = self.nodes.get_mut(&node).and_then(|n| n.core.as_mut())
                    && core.handle_claim(now, case_id, &expert).is_ok()
                {
                    self.schedule(now.saturating_add(read_ms), Pending::SignReport { node, case_id, expert });
                }
            }
            Pending::SignReport { node, case_id, expert } => {
                if let Some(core) = self.nodes.get_mut(&node).and_then(|n| n.core.as_mut()) {
                    let draft = ReportDraft {
                        labels: vec![Label { label: "read".into(), confidence: 1.0 }],
                        fields: vec![("impression".into(), "see text".into())],
                        text: format!("Read by {expert} at {node}."),
                    };
                    let _ = core.handle_sign_report(now, case_id, &expert, draft);
                }
            }
        }
    }

    /// Acts on every output of every live node until none is left.
    pub fn pump_all(&mut self) {
        loop {
            let mut any = false;
            let names: Vec<NodeName> = self.nodes.keys().cloned().collect();
            for name in names {
                any |= self.pump(&name);
            }
            if !any {
                break;
            }
        }
    }

    /// Acts on one node's outputs, in order. Returns whether there were any.
    fn pump(&mut self, name: &NodeName) -> bool {
        let now = self.now;
        let latency = self.latency_ms;
        let mut any = false;
        loop {
            let node = self.nodes.get_mut(name).expect("known");
            let Some(core) = node.core.as_mut() else { return any };
            let Some(output) = core.poll_output() else { return any };
            any = true;
            match output {
                Output::Persist(change) => {
                    node.store.apply(&change).expect("in-memory store");
                    if let Some(n) = node.crash_after_persists.as_mut() {
                        if *n <= 1 {
                            node.crash_after_persists = None;
                            node.core = None; // everything not yet acted on is lost
                            return any;
                        }
                        *n -= 1;
                    }
                }
                Output::Send { to, message } => {
                    if self.linked(name, &to) && self.nodes.get(&to).is_some_and(|n| n.core.is_some()) {
                        self.schedule(
                            now.saturating_add(latency),
                            Pending::Deliver { from: name.clone(), to, message: Box::new(message) },
                        );
                    } else {
                        // The connection attempt fails quickly.
                        self.schedule(now.saturating_add(latency), Pending::PeerDown { node: name.clone(), peer: to });
                    }
                }
                Output::RunModel { case_id, model } => {
                    let script = node.models.get(&model).cloned();
                    let version = node.config.models.iter().find(|m| m.id == model).map(|m| m.version.clone());
                    let outcome = script.as_ref().map(|s| ModelOutcome {
                        model: model.clone(),
                        version: version.unwrap_or_default(),
                        labels: vec![Label { label: s.label.clone(), confidence: s.confidence }],
                    });
                    match (outcome, script) {
                        (Some(outcome), Some(s)) => self.schedule(
                            now.saturating_add(s.run_ms),
                            Pending::ModelDone { node: name.clone(), case_id, outcome },
                        ),
                        _ => {
                            let _ = core.handle_model_result(now, case_id, Err("model not installed".into()));
                        }
                    }
                }
                Output::FetchAttachments { case_id, from, attachments } => {
                    for a in attachments {
                        let at = now.saturating_add(latency * 2 + a.size_bytes / 1_000);
                        self.schedule(
                            at,
                            Pending::BlobArrived { node: name.clone(), from: from.clone(), case_id, hash: a.hash },
                        );
                    }
                }
                Output::Notify(event) => {
                    if let (Event::Queued { case_id, .. }, Some(experts)) = (&event, &node.experts) {
                        let claim = Pending::Claim {
                            node: name.clone(),
                            case_id: *case_id,
                            expert: experts.name.clone(),
                            read_ms: experts.read_ms,
                        };
                        let at = now.saturating_add(experts.claim_after_ms);
                        self.schedule(at, claim);
                    }
                    self.events.push((now, name.clone(), event));
                }
            }
        }
    }

    /// Events of one kind at one node, for assertions.
    pub fn events_at<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
        self.events.iter().filter(move |(_, n, _)| n.as_str() == node).map(|(_, _, e)| e)
    }

    /// The federation-wide invariants every run must keep. Returns what broke.
    ///
    /// - no case is lost: every case submitted is reported at its origin, or held
    ///   with custody by some live or stored node;
    /// - no case is read twice: at most one distinct report per case anywhere;
    /// - every report at a non-origin node that was delivered down was acknowledged
    ///   or is still being retried (never dropped).
    pub fn check_invariants(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut origins: BTreeMap<CaseId, NodeName> = BTreeMap::new();
        let mut reports: BTreeMap<CaseId, BTreeSet<ContentHash>> = BTreeMap::new();
        let mut custody: BTreeMap<CaseId, u32> = BTreeMap::new();
        for (name, node) in &self.nodes {
            let records = node.store.load().expect("in-memory store");
            for r in records {
                let id = r.info.case_id;
                if r.came_from.is_none() {
                    origins.insert(id, name.clone());
                }
                if let Some(rep) = &r.report {
                    reports.entry(id).or_default().insert(rep.hash());
                    // A report held above the origin is on its way down or acknowledged.
                    if r.came_from.is_some()
                        && !matches!(r.report_down, crate::ReportDown::Pending { .. } | crate::ReportDown::Acked { .. })
                    {
                        problems.push(format!(
                            "case {id}: the report at {name} is neither being delivered nor acknowledged"
                        ));
                    }
                }
                if r.status.holds_custody() {
                    *custody.entry(id).or_default() += 1;
                }
            }
        }
        for (id, origin) in &origins {
            let at_origin = self.nodes[origin].store.get(id).is_some_and(|r| r.report.is_some());
            let recalled =
                self.nodes[origin].store.get(id).is_some_and(|r| matches!(r.status, CaseStatus::Recalled { .. }));
            if !at_origin && !recalled && custody.get(id).copied().unwrap_or(0) == 0 {
                problems.push(format!("case {id} from {origin} is held by nobody"));
            }
        }
        for (id, hashes) in &reports {
            if hashes.len() > 1 {
                problems.push(format!("case {id} was read {} times", hashes.len()));
            }
        }
        problems
    }

    /// A seven-tier chain, one node per tier, each linked to its parent:
    /// `village`, `township`, `county`, `city`, `provincial`, `national`,
    /// `international`. No models, no experts: scenarios add them.
    pub fn seven_tier_chain(seed: u64) -> Harness {
        let mut h = Harness::new(seed);
        let names: Vec<String> = Tier::ALL.iter().map(|t| t.as_str().to_owned()).collect();
        for (i, tier) in Tier::ALL.into_iter().enumerate() {
            let mut config = NodeConfig::new(names[i].as_str(), tier);
            config.seed = seed.wrapping_add(i as u64);
            if let Some(parent) = names.get(i + 1) {
                config.upstream.push(crate::node::Upstream {
                    name: parent.as_str().into(),
                    tier: Tier::ALL[i + 1],
                    public_key: Some(public_key_for(parent)),
                });
            }
            h.add_node(config);
        }
        for pair in names.windows(2) {
            h.link(&pair[0], &pair[1]);
        }
        h
    }

    /// Replaces a node's configuration (models, experts, upstream) before it runs.
    pub fn configure(&mut self, name: &str, f: impl FnOnce(&mut NodeConfig)) {
        let now = self.now;
        let node = self.node_mut(name);
        f(&mut node.config);
        let records = node.store.load().expect("in-memory store");
        node.core = Some(Node::restore(node.config.clone(), node.key.clone(), records, now));
        let me = NodeName::from(name);
        let peers: Vec<NodeName> = self.links.iter().filter(|(a, _)| *a == me).map(|(_, b)| b.clone()).collect();
        for peer in peers {
            self.peer_up(&me, &peer);
        }
    }

    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
