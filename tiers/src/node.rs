//! The per-node state machine: the decision every node makes for every case.
//!
//! Inputs arrive through `handle_*` methods, each with the current time `now`;
//! outputs leave through [`Node::poll_output`] (messages to send, changes to
//! persist, models to run, events for people) and [`Node::poll_timeout`] (when to
//! call [`Node::handle_timeout`] next). The driver must process outputs **in the
//! order they are polled**, making each [`Output::Persist`] durable before acting on
//! any output after it: that is how "a change is durable before any message that
//! depends on it leaves" holds.
//!
//! This module must never do I/O, read a clock, or use an unseeded random source.

use crate::capacity::{ExpertPool, KnownAdvert, ModelSpec};
use crate::case::{CaseRecord, CaseStatus, ReportDown};
use crate::crypto::{Crypto, Ed25519Crypto, VerifiedEnvelopes};
use crate::policy::{DeadlinePolicy, Limits, RetryPolicy};
use crate::store::Change;
use ed25519_dalek::SigningKey;
use federation_proto::{
    AlreadyHave, AttachmentRef, CapacityAdvert, CaseId, CaseManifest, CaseOffer, ContentHash, CustodyReceipt,
    EscalationReason, Finding, HopRecord, Label, Message, Millis, Modality, ModalityCapacity, NodeName, OfferAccept,
    PatientRef, PublicKey, Reader, Recall, Reject, RejectCode, Report, ReportDelivery, ReportReceipt, SignedEnvelope,
    Tier, Urgency, Verified, content_type,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// How long an advert this node makes stays valid.
pub const ADVERT_VALIDITY_MS: u64 = 5 * 60_000;

/// A node this one may send cases up to, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub name: NodeName,
    pub tier: Tier,
    /// If set, the key this node must present (pinned); otherwise any key its
    /// verified certificate carries.
    #[serde(default)]
    pub public_key: Option<PublicKey>,
}

/// A peer whose identity the transport has verified (certificate and hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub name: NodeName,
    pub tier: Tier,
    pub public_key: PublicKey,
}

/// Everything a node is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub name: NodeName,
    pub tier: Tier,
    /// The primary parent first, then alternates, then ancestors a case may skip to.
    pub upstream: Vec<Upstream>,
    pub models: Vec<ModelSpec>,
    pub experts: Vec<ExpertPool>,
    pub deadlines: DeadlinePolicy,
    pub retry: RetryPolicy,
    pub limits: Limits,
    /// Seed for retry jitter.
    pub seed: u64,
    /// Which tiers may hold direct identifiers.
    pub privacy: crate::policy::PrivacyPolicy,
}

impl NodeConfig {
    pub fn new(name: impl Into<NodeName>, tier: Tier) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            tier,
            upstream: Vec::new(),
            models: Vec::new(),
            experts: Vec::new(),
            deadlines: DeadlinePolicy::default(),
            retry: RetryPolicy::default(),
            limits: Limits::default(),
            seed: 0,
            privacy: crate::policy::PrivacyPolicy::default(),
        }
    }
}

/// A case as a clinician submits it at its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCase {
    /// Chosen by the driver from a good random source (never reused).
    pub case_id: CaseId,
    pub modality: Modality,
    pub task: String,
    pub urgency: Urgency,
    pub clinical_question: String,
    pub patient: PatientRef,
    /// Attachments already stored durably by the driver.
    pub attachments: Vec<AttachmentRef>,
    /// Attachments the driver de-identified, with their originals' hashes.
    pub deidentified: Vec<federation_proto::Deidentification>,
    /// The patient's direct identifiers (`case_id` and `pseudonym` are filled in
    /// here); signed and kept apart from the manifest.
    pub identity: Option<federation_proto::PatientIdentity>,
}

/// What a model said about a case.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutcome {
    pub model: String,
    pub version: String,
    /// Labels with calibrated confidences. The first is the reading whose
    /// confidence is compared with the urgency's threshold; the rest are details.
    pub labels: Vec<Label>,
}

/// An expert's report before the node signs it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportDraft {
    pub labels: Vec<Label>,
    pub fields: Vec<(String, String)>,
    pub text: String,
}

/// Something people (clinic page, consult queue, logs) should hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    CaseCreated {
        case_id: CaseId,
    },
    CustodyTaken {
        case_id: CaseId,
        from: NodeName,
    },
    ModelRead {
        case_id: CaseId,
        model: String,
        confidence: f32,
        decisive: bool,
    },
    Queued {
        case_id: CaseId,
        claim_deadline: Millis,
    },
    Claimed {
        case_id: CaseId,
        expert: String,
    },
    /// A claim lapsed without a report; the case is back in the queue.
    ClaimExpired {
        case_id: CaseId,
        expert: String,
    },
    Escalating {
        case_id: CaseId,
        to: NodeName,
        reason: EscalationReason,
    },
    CustodyPassed {
        case_id: CaseId,
        to: NodeName,
    },
    /// A report was signed here (by a local expert or model).
    Reported {
        case_id: CaseId,
        machine_made: bool,
    },
    /// A report read above arrived here on its way to the origin.
    ReportReceived {
        case_id: CaseId,
        from: NodeName,
    },
    /// The report reached the origin: the clinic can read it.
    ReportAtOrigin {
        case_id: CaseId,
    },
    Recalled {
        case_id: CaseId,
    },
    /// A second, different report arrived; the first one stands.
    ConflictingReport {
        case_id: CaseId,
        from: NodeName,
    },
    /// Nobody anywhere above can take the case; it waits here.
    NoCapacity {
        case_id: CaseId,
    },
    /// A peer sent something the core refused.
    PeerRefused {
        peer: NodeName,
        code: RejectCode,
        detail: String,
    },
}

/// One thing the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Make durable before acting on any later output.
    Persist(Change),
    Send {
        to: NodeName,
        message: Message,
    },
    /// Run a local model on the case's attachments; answer with `handle_model_result`.
    RunModel {
        case_id: CaseId,
        model: String,
    },
    /// Fetch these attachments from `from` (skipping ones already stored) and call
    /// `handle_attachment_stored` for each once durable.
    FetchAttachments {
        case_id: CaseId,
        from: NodeName,
        attachments: Vec<AttachmentRef>,
    },
    Notify(Event),
}

/// Errors a local caller (clinician, expert, driver) can cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    #[error("case {0} is not known at this node")]
    UnknownCase(CaseId),
    #[error("case {0} already exists")]
    DuplicateCase(CaseId),
    #[error("case {case_id} is {status}, which does not allow {action}")]
    WrongState { case_id: CaseId, status: &'static str, action: &'static str },
    #[error("case {case_id} is claimed by {expert}")]
    ClaimedByOther { case_id: CaseId, expert: String },
    #[error("only the origin may {0}")]
    NotOrigin(&'static str),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// Why the core refused a peer's message (also sent to the peer as a `Reject`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{peer}: {code:?}: {detail}")]
pub struct PeerError {
    pub peer: NodeName,
    pub code: RejectCode,
    pub detail: String,
}

/// The escalation core of one node.
pub struct Node {
    config: NodeConfig,
    crypto: Box<dyn Crypto>,
    public_key: PublicKey,
    /// Envelopes whose signatures were already checked (or made) here.
    verified: VerifiedEnvelopes,
    /// Shared with the `Persist` outputs that carry them: a record is copied only
    /// when it changes while an earlier output still holds it (`Arc::make_mut`).
    cases: BTreeMap<CaseId, Arc<CaseRecord>>,
    /// What each case contributes to the counters below, as last indexed.
    index: BTreeMap<CaseId, CaseIndex>,
    counts: Counts,
    /// Wake-ups, ordered: (when, case).
    timers: BTreeSet<(Millis, CaseId)>,
    /// The wake-up currently armed for each case.
    armed: BTreeMap<CaseId, Millis>,
    peers: Peers,
    /// Peers the driver reported unreachable.
    down: BTreeSet<NodeName>,
    adverts: BTreeMap<NodeName, KnownAdvert>,
    outputs: VecDeque<Output>,
    rng: u64,
}

impl Node {
    /// A fresh node with no cases, signing with `key` (Ed25519 COSE).
    pub fn new(config: NodeConfig, key: SigningKey) -> Node {
        Node::with_crypto(config, Box::new(Ed25519Crypto::new(key)))
    }

    /// A fresh node with no cases that signs and verifies through `crypto`.
    pub fn with_crypto(config: NodeConfig, crypto: Box<dyn Crypto>) -> Node {
        let public_key = crypto.public_key();
        let rng = config.seed ^ 0x9E37_79B9_7F4A_7C15;
        let verified = VerifiedEnvelopes::new(config.limits.verified_envelopes_max);
        Node {
            config,
            crypto,
            public_key,
            verified,
            cases: BTreeMap::new(),
            index: BTreeMap::new(),
            counts: Counts::default(),
            timers: BTreeSet::new(),
            armed: BTreeMap::new(),
            peers: Peers::default(),
            down: BTreeSet::new(),
            adverts: BTreeMap::new(),
            outputs: VecDeque::new(),
            rng,
        }
    }

    /// A node restarted from its persisted records. Unfinished work resumes:
    /// offers and report deliveries are re-sent, fetches and model runs re-issued,
    /// queue deadlines re-armed.
    pub fn restore(config: NodeConfig, key: SigningKey, records: Vec<CaseRecord>, now: Millis) -> Node {
        Node::restore_with_crypto(config, Box::new(Ed25519Crypto::new(key)), records, now)
    }

    /// [`Node::restore`] with another [`Crypto`] (see [`Node::with_crypto`]).
    pub fn restore_with_crypto(
        config: NodeConfig,
        crypto: Box<dyn Crypto>,
        records: Vec<CaseRecord>,
        now: Millis,
    ) -> Node {
        let mut node = Node::with_crypto(config, crypto);
        for mut record in records {
            let id = record.info.case_id;
            if let Some(from) = &record.came_from
                && !node.peers.contains_key(from)
            {
                // The child's verified identity comes back with its next hello; until
                // then we still know its name and tier from the trail.
                if let Some(peer) = node.peer_from_trail(&record, from) {
                    node.peers.insert(peer);
                }
            }
            match &mut record.status {
                CaseStatus::Forwarding { next_retry_at, .. } => *next_retry_at = now,
                CaseStatus::Receiving => {
                    if let Some(from) = record.came_from.clone() {
                        let missing = record
                            .info
                            .attachments
                            .iter()
                            .filter(|a| !record.held.contains(&a.hash))
                            .cloned()
                            .collect();
                        node.emit(Output::FetchAttachments { case_id: id, from, attachments: missing });
                    }
                }
                CaseStatus::AwaitingModel { model } => {
                    node.emit(Output::RunModel { case_id: id, model: model.clone() })
                }
                _ => {}
            }
            if let ReportDown::Pending { next_retry_at, .. } = &mut record.report_down {
                *next_retry_at = now;
            }
            let held_undecided = matches!(record.status, CaseStatus::Held);
            node.cases.insert(id, Arc::new(record));
            node.rearm(id);
            if held_undecided {
                node.decide(now, id);
            }
        }
        node
    }

    pub fn name(&self) -> &NodeName {
        &self.config.name
    }
    pub fn tier(&self) -> Tier {
        self.config.tier
    }
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }
    pub fn case(&self, id: &CaseId) -> Option<&CaseRecord> {
        self.cases.get(id).map(|c| &**c)
    }
    pub fn cases(&self) -> impl Iterator<Item = &CaseRecord> {
        self.cases.values().map(|c| &**c)
    }

    /// The next output to act on, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Node::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.timers.first().map(|(t, _)| *t)
    }

    // ----- inputs: the link layer -----

    /// The transport verified a peer (certificate + hello/ack). Re-sends what was
    /// waiting for it.
    pub fn handle_peer_up(&mut self, now: Millis, peer: Peer) -> Result<(), PeerError> {
        let name = peer.name.clone();
        if let Some(pinned) = self.config.upstream.iter().find(|u| u.name == name).and_then(|u| u.public_key)
            && pinned != peer.public_key
        {
            let detail = format!("{name} presented a key other than the one pinned in the configuration");
            self.emit(Output::Notify(Event::PeerRefused {
                peer: name.clone(),
                code: RejectCode::IdentityMismatch,
                detail: detail.clone(),
            }));
            return Err(PeerError { peer: name, code: RejectCode::IdentityMismatch, detail });
        }
        self.peers.insert(peer);
        self.down.remove(&name);
        // Cases offered to it or with a report on the way to it: most urgent first,
        // then earliest deadline (a village back online after days sends STAT first).
        let mut waiting: Vec<CaseId> =
            self.counts.waiting_on.get(&name).map(|s| s.iter().copied().collect()).unwrap_or_default();
        waiting.sort_by_key(|id| {
            let info = &self.cases[id].info;
            (info.urgency, info.deadline_at, *id)
        });
        for id in waiting {
            self.retry_now(now, id);
        }
        Ok(())
    }

    /// The transport could not reach `peer` or lost the link. Cases being offered
    /// to it that it never answered move on to the next candidate.
    pub fn handle_peer_down(&mut self, now: Millis, peer: &NodeName) {
        self.down.insert(peer.clone());
        let stranded: Vec<CaseId> = self
            .counts
            .waiting_on
            .get(peer)
            .into_iter()
            .flatten()
            .filter(|id| {
                matches!(&self.cases[*id].status, CaseStatus::Forwarding { to, answered: false, .. } if to == peer)
            })
            .copied()
            .collect();
        for id in stranded {
            self.reroute(now, id, peer.clone());
        }
    }

    /// A message from a verified peer.
    pub fn handle_message(&mut self, now: Millis, from: &NodeName, message: Message) -> Result<(), PeerError> {
        let Some(peer) = self.peers.get(from).cloned() else {
            return Err(self.refuse(from, None, RejectCode::NotCustodian, "peer has not completed hello".into()));
        };
        match message {
            Message::CaseOffer(offer) => self.on_offer(now, &peer, offer),
            Message::OfferAccept(OfferAccept { case_id, .. }) | Message::AlreadyHave(AlreadyHave { case_id }) => {
                self.on_offer_answered(&peer, case_id);
                Ok(())
            }
            Message::Reject(reject) => {
                self.on_reject(now, &peer, reject);
                Ok(())
            }
            Message::CustodyReceipt(env) => self.on_custody_receipt(now, &peer, env),
            Message::ReportDelivery(delivery) => self.on_report(now, &peer, delivery),
            Message::ReportReceipt(env) => self.on_report_receipt(now, &peer, env),
            Message::CapacityAdvert(env) => self.handle_advert(now, &env).map_err(|detail| PeerError {
                peer: from.clone(),
                code: RejectCode::BadSignature,
                detail,
            }),
            Message::Recall(env) => self.on_recall(now, &peer, env),
            other => Err(self.refuse(
                from,
                None,
                RejectCode::Malformed,
                format!("{} is handled by the transport, not the core", other.kind()),
            )),
        }
    }

    /// A capacity advert (from gossip or a direct link). Ignored unless signed by the
    /// key of the node it names, as far as that key is known here.
    pub fn handle_advert(&mut self, now: Millis, env: &SignedEnvelope) -> Result<(), String> {
        let v = self.open::<CapacityAdvert>(env, content_type::ADVERT).map_err(|e| format!("advert: {e}"))?;
        if let Some(peer) = self.peers.get(&v.body.node)
            && peer.public_key != v.signer
        {
            return Err(format!("advert for {} signed by another key", v.body.node));
        }
        if v.body.valid_until <= now {
            return Err(format!("advert from {} expired", v.body.node));
        }
        if let Some(old) = self.adverts.get(&v.body.node)
            && old.advert.issued_at > v.body.issued_at
        {
            return Ok(()); // an older advert arriving late
        }
        self.adverts.insert(v.body.node.clone(), KnownAdvert { advert: v.body });
        Ok(())
    }

    // ----- inputs: local actions -----

    /// A clinician creates a case here. Its attachments are already stored.
    pub fn handle_submit(&mut self, now: Millis, new: NewCase) -> Result<CaseId, ActionError> {
        let limits = &self.config.limits;
        if self.cases.contains_key(&new.case_id) {
            return Err(ActionError::DuplicateCase(new.case_id));
        }
        if new.clinical_question.len() > limits.text_len_max {
            return Err(ActionError::Invalid("clinical question too long".into()));
        }
        if new.attachments.len() > limits.attachments_max {
            return Err(ActionError::Invalid(format!("more than {} attachments", limits.attachments_max)));
        }
        let deadline_ms = self.config.deadlines.report_ms(new.modality, new.urgency);
        let info = CaseManifest {
            case_id: new.case_id,
            origin: self.config.name.clone(),
            origin_tier: self.config.tier,
            modality: new.modality,
            task: new.task,
            urgency: new.urgency,
            clinical_question: new.clinical_question,
            patient: new.patient,
            created_at: now,
            deadline_at: now.saturating_add(deadline_ms),
            attachments: new.attachments,
            deidentified: new.deidentified,
        };
        let manifest = self.sign(content_type::MANIFEST, &info)?;
        let identity = match new.identity {
            Some(mut identity) => {
                identity.case_id = info.case_id;
                identity.pseudonym = info.patient.pseudonym.clone();
                Some(self.sign(content_type::PATIENT_IDENTITY, &identity)?)
            }
            None => None,
        };
        let held = info.attachments.iter().map(|a| a.hash).collect();
        let record = CaseRecord {
            manifest,
            info,
            trail: Vec::new(),
            findings: Vec::new(),
            came_from: None,
            arrived_at: now,
            held,
            status: CaseStatus::Held,
            model_tried: false,
            offered_to: Vec::new(),
            refused_by: Vec::new(),
            report: None,
            report_down: ReportDown::None,
            custody_receipt: None,
            updated_at: now,
            identity,
        };
        let id = record.info.case_id;
        self.cases.insert(id, Arc::new(record));
        self.persist(now, id);
        self.emit(Output::Notify(Event::CaseCreated { case_id: id }));
        self.decide(now, id);
        Ok(id)
    }

    /// An attachment of a case being received is now stored durably.
    pub fn handle_attachment_stored(
        &mut self,
        now: Millis,
        case_id: CaseId,
        hash: ContentHash,
    ) -> Result<(), ActionError> {
        let case = self.cases.get_mut(&case_id).map(Arc::make_mut).ok_or(ActionError::UnknownCase(case_id))?;
        if !case.info.attachments.iter().any(|a| a.hash == hash) {
            return Err(ActionError::Invalid(format!("{hash:?} is not an attachment of case {case_id}")));
        }
        if !case.held.contains(&hash) {
            case.held.push(hash);
        }
        if case.status == CaseStatus::Receiving && case.missing_attachments().is_empty() {
            self.take_custody(now, case_id);
        } else {
            self.persist(now, case_id);
        }
        Ok(())
    }

    /// A local model finished reading a case.
    pub fn handle_model_result(
        &mut self,
        now: Millis,
        case_id: CaseId,
        outcome: Result<ModelOutcome, String>,
    ) -> Result<(), ActionError> {
        let case = self.cases.get(&case_id).ok_or(ActionError::UnknownCase(case_id))?;
        let CaseStatus::AwaitingModel { model } = &case.status else {
            return Err(self.wrong_state(case_id, "model result"));
        };
        let spec = self.config.models.iter().find(|m| &m.id == model).cloned();
        let (Ok(outcome), Some(spec)) = (outcome, spec) else {
            // The model failed (or was removed): carry on as if there were none.
            self.set_status(now, case_id, CaseStatus::Held);
            self.decide(now, case_id);
            return Ok(());
        };
        // The first label is the model's reading; later ones are details (other
        // classes, a quality flag) and never make a read decisive.
        let confidence = outcome.labels.first().map_or(0.0, |l| l.confidence);
        let threshold = spec.threshold(case.info.urgency);
        let decisive = confidence.is_finite() && confidence >= threshold;
        let reader = Reader::Model { model: outcome.model.clone(), version: outcome.version.clone() };
        let finding = Finding {
            case_id,
            node: self.config.name.clone(),
            tier: self.config.tier,
            reader: reader.clone(),
            labels: outcome.labels.clone(),
            at: now,
        };
        let finding = self.sign(content_type::FINDING, &finding)?;
        let case = self.cases.get_mut(&case_id).map(Arc::make_mut).expect("checked above");
        if case.findings.len() < self.config.limits.findings_max {
            case.findings.push(finding);
        }
        self.emit(Output::Notify(Event::ModelRead { case_id, model: spec.id.clone(), confidence, decisive }));
        if decisive {
            let report = Report {
                case_id,
                node: self.config.name.clone(),
                tier: self.config.tier,
                reader,
                machine_made: true,
                labels: outcome.labels,
                fields: Vec::new(),
                text: format!(
                    "Machine read by {} {} with confidence {confidence:.3} (threshold {threshold:.3}).",
                    outcome.model, outcome.version
                ),
                signed_at: now,
            };
            self.issue_report(now, case_id, report)
        } else {
            self.set_status(now, case_id, CaseStatus::Held);
            self.decide_after_model(now, case_id, Some((spec.id, confidence, threshold)));
            Ok(())
        }
    }

    /// An expert claims a queued case.
    pub fn handle_claim(&mut self, now: Millis, case_id: CaseId, expert: &str) -> Result<(), ActionError> {
        let case = self.cases.get(&case_id).ok_or(ActionError::UnknownCase(case_id))?;
        match &case.status {
            CaseStatus::Queued { .. } => {}
            CaseStatus::Claimed { expert: other, .. } if other == expert => return Ok(()),
            CaseStatus::Claimed { expert: other, .. } => {
                return Err(ActionError::ClaimedByOther { case_id, expert: other.clone() });
            }
            _ => return Err(self.wrong_state(case_id, "claim")),
        }
        let service = self.pool(self.cases[&case_id].info.modality).map_or(0, |p| p.service_ms);
        let lease_ms = service.saturating_mul(self.config.deadlines.claim_lease_factor).max(60_000);
        let lease_until = now.saturating_add(lease_ms);
        self.set_status(now, case_id, CaseStatus::Claimed { expert: expert.to_owned(), at: now, lease_until });
        self.emit(Output::Notify(Event::Claimed { case_id, expert: expert.to_owned() }));
        Ok(())
    }

    /// An expert gives a claimed case back to the queue. Its claim deadline is the
    /// one it had, so a case cannot be held back by claiming and releasing.
    pub fn handle_release(&mut self, now: Millis, case_id: CaseId, expert: &str) -> Result<(), ActionError> {
        self.check_claimed_by(case_id, expert, "release")?;
        let case = &self.cases[&case_id];
        let claim_deadline = self.claim_deadline(now, case).max(now);
        self.set_status(now, case_id, CaseStatus::Queued { since: now, claim_deadline, lapsed_claim: None });
        Ok(())
    }

    /// The expert who claimed the case signs a report.
    pub fn handle_sign_report(
        &mut self,
        now: Millis,
        case_id: CaseId,
        expert: &str,
        draft: ReportDraft,
    ) -> Result<(), ActionError> {
        let lapsed_mine = matches!(
            self.cases.get(&case_id).map(|c| &c.status),
            Some(CaseStatus::Queued { lapsed_claim: Some(e), .. }) if e == expert
        );
        if !lapsed_mine {
            self.check_claimed_by(case_id, expert, "sign a report")?;
        }
        if draft.text.len() > self.config.limits.text_len_max {
            return Err(ActionError::Invalid("report text too long".into()));
        }
        let report = Report {
            case_id,
            node: self.config.name.clone(),
            tier: self.config.tier,
            reader: Reader::Expert { expert: expert.to_owned() },
            machine_made: false,
            labels: draft.labels,
            fields: draft.fields,
            text: draft.text,
            signed_at: now,
        };
        self.issue_report(now, case_id, report)
    }

    /// An expert sends a queued or claimed case on, with a reason.
    pub fn handle_expert_escalate(
        &mut self,
        now: Millis,
        case_id: CaseId,
        expert: &str,
        reason: &str,
    ) -> Result<(), ActionError> {
        let case = self.cases.get(&case_id).ok_or(ActionError::UnknownCase(case_id))?;
        match &case.status {
            CaseStatus::Queued { .. } => {}
            CaseStatus::Claimed { expert: e, .. } if e == expert => {}
            CaseStatus::Claimed { expert: e, .. } => {
                return Err(ActionError::ClaimedByOther { case_id, expert: e.clone() });
            }
            _ => return Err(self.wrong_state(case_id, "escalate")),
        }
        if self.config.upstream.is_empty() {
            return Err(ActionError::Invalid("this node has no tier above it".into()));
        }
        let reason = EscalationReason::ExpertEscalated { expert: expert.to_owned(), reason: reason.to_owned() };
        self.escalate(now, case_id, reason);
        Ok(())
    }

    /// The origin withdraws a case; the recall follows the case up its path.
    pub fn handle_recall(&mut self, now: Millis, case_id: CaseId, reason: &str) -> Result<(), ActionError> {
        let case = self.cases.get(&case_id).ok_or(ActionError::UnknownCase(case_id))?;
        if case.came_from.is_some() {
            return Err(ActionError::NotOrigin("recall a case"));
        }
        if case.report.is_some() {
            return Err(self.wrong_state(case_id, "recall"));
        }
        let recall = Recall { case_id, origin: self.config.name.clone(), reason: reason.to_owned(), at: now };
        let env = self.sign(content_type::RECALL, &recall)?;
        self.apply_recall(now, case_id, env);
        Ok(())
    }

    /// Timers due at or before `now` fire: claim deadlines, offer and report retries.
    pub fn handle_timeout(&mut self, now: Millis) {
        while let Some(&(at, id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, id));
            self.armed.remove(&id);
            self.fire(now, id);
        }
    }

    /// Drops a finished case from memory; its record stays in the store. Allowed
    /// only once this node owes nobody anything for it: its report is at the origin
    /// (here) or acknowledged by the child it went to, or the case was recalled with
    /// no report on its way down. Whatever arrives for it afterwards is answered as
    /// for an unknown case.
    pub fn archive(&mut self, case_id: CaseId) -> Result<(), ActionError> {
        let case = self.cases.get(&case_id).ok_or(ActionError::UnknownCase(case_id))?;
        let finished = match case.status {
            CaseStatus::Reported { .. } => matches!(case.report_down, ReportDown::AtOrigin | ReportDown::Acked { .. }),
            CaseStatus::Recalled { .. } => !matches!(case.report_down, ReportDown::Pending { .. }),
            _ => false,
        };
        if !finished {
            return Err(self.wrong_state(case_id, "archive"));
        }
        self.cases.remove(&case_id);
        self.rearm(case_id); // drops its timer and its counters
        debug_assert!(!self.armed.contains_key(&case_id) && !self.index.contains_key(&case_id));
        if self.cases.is_empty() {
            self.release_idle_memory();
        }
        Ok(())
    }

    /// With no case held any more, gives back what the emptied maps still allocate
    /// (an emptied `BTreeMap` keeps its last node, some hundred bytes): most nodes of
    /// a large network (villages) hold a case now and then and nothing in between.
    fn release_idle_memory(&mut self) {
        macro_rules! release_if_empty {
            ($($field:expr),*) => {$(
                if $field.is_empty() {
                    $field = Default::default();
                }
            )*};
        }
        release_if_empty!(
            self.cases,
            self.index,
            self.timers,
            self.armed,
            self.counts.waiting_on,
            self.counts.no_capacity,
            self.outputs
        );
    }

    /// This node's capacity right now, signed, for gossip and direct links.
    pub fn capacity_advert(&self, now: Millis) -> Result<SignedEnvelope, ActionError> {
        self.capacity_advert_for(now, ADVERT_VALIDITY_MS)
    }

    /// This node's capacity per modality right now (what [`Node::capacity_advert`]
    /// signs), so a driver can tell whether it changed without signing anything.
    pub fn capacity(&self) -> Vec<ModalityCapacity> {
        Modality::ALL
            .into_iter()
            .map(|modality| {
                let pool = self.pool(modality);
                let queue_len = self.queue_len(modality);
                ModalityCapacity {
                    modality,
                    model_tasks: self
                        .config
                        .models
                        .iter()
                        .filter(|m| m.modality == modality)
                        .flat_map(|m| m.tasks.iter().cloned())
                        .collect(),
                    experts_on_duty: pool.map_or(0, |p| p.on_duty),
                    queue_len: queue_len as u32,
                    eta_ms: pool.and_then(|p| p.eta_ms(queue_len)).unwrap_or(u64::MAX),
                    model_cases_per_hour: self
                        .config
                        .models
                        .iter()
                        .filter(|m| m.modality == modality)
                        .map(|m| m.cases_per_hour)
                        .fold(0u32, u32::saturating_add),
                }
            })
            .collect()
    }

    /// As [`Node::capacity_advert`], valid for `ttl_ms` instead of
    /// [`ADVERT_VALIDITY_MS`] (the control plane's configured advert TTL).
    pub fn capacity_advert_for(&self, now: Millis, ttl_ms: u64) -> Result<SignedEnvelope, ActionError> {
        let advert = CapacityAdvert {
            node: self.config.name.clone(),
            tier: self.config.tier,
            issued_at: now,
            valid_until: now.saturating_add(ttl_ms),
            capacity: self.capacity(),
        };
        self.sign_only(content_type::ADVERT, &advert)
    }

    /// Fresh adverts received from other nodes (expired ones are not returned).
    pub fn known_adverts(&self, now: Millis) -> impl Iterator<Item = &CapacityAdvert> {
        self.adverts.values().filter(move |a| a.is_fresh(now)).map(|a| &a.advert)
    }

    /// The driver found an alternate upstream at run time (e.g. the control plane saw
    /// an admitted, certificate-checked node of a higher tier advertise while the
    /// parent is unreachable). It joins the upstream list after every candidate of
    /// the same or a lower tier, so the configured order is kept. Cases stranded on
    /// an unreachable peer are rerouted at once. Returns false (and changes nothing)
    /// if the node is already a candidate or is not of a higher tier than this one.
    pub fn handle_upstream_added(&mut self, now: Millis, upstream: Upstream) -> bool {
        if upstream.tier <= self.config.tier || self.config.upstream.iter().any(|u| u.name == upstream.name) {
            return false;
        }
        let at = self.config.upstream.iter().position(|u| u.tier > upstream.tier).unwrap_or(self.config.upstream.len());
        self.config.upstream.insert(at, upstream);
        let stranded: Vec<(CaseId, NodeName)> = self
            .cases
            .iter()
            .filter_map(|(id, c)| match &c.status {
                CaseStatus::Forwarding { to, answered: false, .. } if self.down.contains(to) => Some((*id, to.clone())),
                _ => None,
            })
            .collect();
        for (id, to) in stranded {
            self.reroute(now, id, to);
        }
        let waiting: Vec<CaseId> = self.counts.no_capacity.iter().copied().collect();
        for id in waiting {
            self.decide_after_model(now, id, None);
        }
        true
    }

    /// Who is on duty changed (a shift change). Queued cases are re-checked at their
    /// claim deadlines as usual; cases waiting for any capacity are decided again.
    pub fn handle_experts_changed(&mut self, now: Millis, experts: Vec<ExpertPool>) {
        self.config.experts = experts;
        let waiting: Vec<CaseId> = self.counts.no_capacity.iter().copied().collect();
        for id in waiting {
            self.decide_after_model(now, id, None);
        }
    }

    // ----- peer messages -----

    fn on_offer(&mut self, now: Millis, peer: &Peer, offer: CaseOffer) -> Result<(), PeerError> {
        let refuse =
            |this: &mut Self, id: Option<CaseId>, code, detail: String| Err(this.refuse(&peer.name, id, code, detail));
        let info = match self.open::<CaseManifest>(&offer.manifest, content_type::MANIFEST) {
            Ok(v) => {
                if v.body.origin == peer.name && v.signer != peer.public_key {
                    return refuse(
                        self,
                        Some(v.body.case_id),
                        RejectCode::BadSignature,
                        "manifest not signed by its origin".into(),
                    );
                }
                (v.body, v.signer)
            }
            Err(e) => return refuse(self, None, e.reject_code(), format!("manifest: {e}")),
        };
        let (info, manifest_signer) = info;
        let id = info.case_id;
        if peer.tier >= self.config.tier {
            return refuse(
                self,
                Some(id),
                RejectCode::WrongDirection,
                format!("cases go up: {} is {} and this node is {}", peer.name, peer.tier, self.config.tier),
            );
        }
        if let Some(existing) = self.cases.get(&id) {
            // Idempotent re-offer: never a second copy of the case.
            if existing.manifest != offer.manifest {
                return refuse(
                    self,
                    Some(id),
                    RejectCode::Malformed,
                    "a different manifest under a known case id".into(),
                );
            }
            match &existing.status {
                CaseStatus::Receiving => {
                    let missing = existing.missing_attachments();
                    let attachments: Vec<AttachmentRef> =
                        existing.info.attachments.iter().filter(|a| missing.contains(&a.hash)).cloned().collect();
                    self.send(&peer.name, Message::OfferAccept(OfferAccept { case_id: id, missing }));
                    // The earlier fetch may have failed: ask the driver again (it skips
                    // what it already holds or is fetching).
                    self.emit(Output::FetchAttachments { case_id: id, from: peer.name.clone(), attachments });
                }
                CaseStatus::Recalled { .. } => {
                    return refuse(self, Some(id), RejectCode::Recalled, "case was recalled by its origin".into());
                }
                _ => {
                    self.send(&peer.name, Message::AlreadyHave(AlreadyHave { case_id: id }));
                    self.send_custody_receipt(now, id, &peer.name);
                }
            }
            return Ok(());
        }
        let limits = &self.config.limits;
        if offer.trail.len() > limits.trail_len_max
            || offer.findings.len() > limits.findings_max
            || info.attachments.len() > limits.attachments_max
            || info.clinical_question.len() > limits.text_len_max
        {
            return refuse(
                self,
                Some(id),
                RejectCode::Malformed,
                "trail, findings, attachments or question over the limit".into(),
            );
        }
        let active = self.counts.active;
        if active >= limits.cases_active_max {
            return refuse(self, Some(id), RejectCode::Busy, format!("{active} active cases, the limit"));
        }
        // The trail: every record must verify, the last one is the sender's hop to us.
        let mut last_hop = None;
        for env in &offer.trail {
            match self.open::<HopRecord>(env, content_type::HOP) {
                Ok(v) if v.body.case_id == id => last_hop = Some(v),
                Ok(_) => return refuse(self, Some(id), RejectCode::Malformed, "hop record for another case".into()),
                Err(e) => return refuse(self, Some(id), e.reject_code(), format!("hop record: {e}")),
            }
        }
        match last_hop {
            Some(v) if v.signer == peer.public_key && v.body.from == peer.name && v.body.to == self.config.name => {}
            _ => {
                return refuse(
                    self,
                    Some(id),
                    RejectCode::Malformed,
                    "the last hop record must be the sender's, naming this node".into(),
                );
            }
        }
        for env in &offer.findings {
            if let Err(e) = self.check::<Finding>(env, content_type::FINDING) {
                return refuse(self, Some(id), e.reject_code(), format!("finding: {e}"));
            }
        }
        // Direct identifiers: kept only if signed by the manifest's signer, about this
        // case, and this tier may hold them; otherwise dropped, never stored.
        let identity = match offer.identity {
            Some(env) if self.config.privacy.may_hold_identifiers(info.origin_tier, self.config.tier) => {
                match self.open::<federation_proto::PatientIdentity>(&env, content_type::PATIENT_IDENTITY) {
                    Ok(v) if v.body.case_id == id && v.signer == manifest_signer => Some(env),
                    _ => None,
                }
            }
            _ => None,
        };
        let record = CaseRecord {
            manifest: offer.manifest,
            info,
            trail: offer.trail,
            findings: offer.findings,
            came_from: Some(peer.name.clone()),
            arrived_at: now,
            held: Vec::new(),
            status: CaseStatus::Receiving,
            model_tried: false,
            offered_to: Vec::new(),
            refused_by: Vec::new(),
            report: None,
            report_down: ReportDown::None,
            custody_receipt: None,
            updated_at: now,
            identity,
        };
        let missing = record.missing_attachments();
        let attachments = record.info.attachments.clone();
        self.cases.insert(id, Arc::new(record));
        self.persist(now, id);
        self.send(&peer.name, Message::OfferAccept(OfferAccept { case_id: id, missing }));
        if attachments.is_empty() {
            self.take_custody(now, id);
        } else {
            self.emit(Output::FetchAttachments { case_id: id, from: peer.name.clone(), attachments });
        }
        Ok(())
    }

    fn on_offer_answered(&mut self, peer: &Peer, case_id: CaseId) {
        if let Some(case) = self.cases.get_mut(&case_id).map(Arc::make_mut)
            && let CaseStatus::Forwarding { to, answered, attempts, .. } = &mut case.status
            && *to == peer.name
        {
            *answered = true;
            *attempts = 0;
        }
    }

    fn on_reject(&mut self, now: Millis, peer: &Peer, reject: Reject) {
        self.emit(Output::Notify(Event::PeerRefused {
            peer: peer.name.clone(),
            code: reject.code,
            detail: reject.detail.clone(),
        }));
        let Some(id) = reject.case_id else { return };
        let Some(case) = self.cases.get_mut(&id).map(Arc::make_mut) else { return };
        if matches!(&case.status, CaseStatus::Forwarding { to, .. } if *to == peer.name) {
            if !case.refused_by.contains(&peer.name) {
                case.refused_by.push(peer.name.clone());
            }
            self.reroute(now, id, peer.name.clone());
        }
    }

    fn on_custody_receipt(&mut self, now: Millis, peer: &Peer, env: SignedEnvelope) -> Result<(), PeerError> {
        let receipt: CustodyReceipt = match self.open_from(&env, content_type::CUSTODY_RECEIPT, &peer.public_key) {
            Ok(r) => r,
            Err(e) => return Err(self.refuse(&peer.name, None, e.reject_code(), format!("custody receipt: {e}"))),
        };
        let id = receipt.case_id;
        let Some(case) = self.cases.get(&id) else {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::UnknownCase,
                "receipt for an unknown case".into(),
            ));
        };
        let expected_attachments: BTreeSet<_> = case.info.attachments.iter().map(|a| a.hash).collect();
        let receipt_attachments: BTreeSet<_> = receipt.attachments.iter().copied().collect();
        if receipt.manifest_hash != case.manifest.hash()
            || receipt_attachments != expected_attachments
            || receipt.receiver != peer.name
        {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::Malformed,
                "receipt does not cover this case's manifest and attachments".into(),
            ));
        }
        match &case.status {
            CaseStatus::Forwarding { to, hop, .. } if *to == peer.name => {
                let hop = hop.clone();
                let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
                case.trail.push(hop);
                case.custody_receipt = Some(env);
                self.set_status(now, id, CaseStatus::Forwarded { to: peer.name.clone(), at: now });
                self.emit(Output::Notify(Event::CustodyPassed { case_id: id, to: peer.name.clone() }));
                Ok(())
            }
            // A duplicate receipt, or one from a peer we offered to earlier: it holds a
            // copy, and will return any report it makes (accepted from `offered_to`).
            _ => Ok(()),
        }
    }

    fn on_report(&mut self, now: Millis, peer: &Peer, delivery: ReportDelivery) -> Result<(), PeerError> {
        let id = delivery.case_id;
        let Some(case) = self.cases.get(&id) else {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::UnknownCase,
                "report for a case this node never sent".into(),
            ));
        };
        if !case.offered_to.contains(&peer.name) {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::NotCustodian,
                "report from a node this case was never sent to".into(),
            ));
        }
        match self.open::<Report>(&delivery.report, content_type::REPORT) {
            Ok(v) if v.body.case_id == id => {}
            Ok(_) => {
                return Err(self.refuse(
                    &peer.name,
                    Some(id),
                    RejectCode::Malformed,
                    "report names another case".into(),
                ));
            }
            Err(e) => return Err(self.refuse(&peer.name, Some(id), e.reject_code(), format!("report: {e}"))),
        };
        let report_hash = delivery.report.hash();
        if let Some(existing_hash) = self.cases[&id].report.as_ref().map(|r| r.hash()) {
            if existing_hash != report_hash {
                self.emit(Output::Notify(Event::ConflictingReport { case_id: id, from: peer.name.clone() }));
            }
            // Acknowledge again so the sender stops; nothing is forwarded twice.
            self.send_report_receipt(now, id, &peer.name, report_hash);
            return Ok(());
        }
        // Verify the trail and findings from above before keeping them.
        for env in &delivery.trail {
            if let Err(e) = self.check::<HopRecord>(env, content_type::HOP) {
                return Err(self.refuse(&peer.name, Some(id), e.reject_code(), format!("hop record: {e}")));
            }
        }
        for env in &delivery.findings {
            if let Err(e) = self.check::<Finding>(env, content_type::FINDING) {
                return Err(self.refuse(&peer.name, Some(id), e.reject_code(), format!("finding: {e}")));
            }
        }
        let limits = self.config.limits.clone();
        let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
        merge_envelopes(&mut case.trail, delivery.trail, limits.trail_len_max);
        merge_envelopes(&mut case.findings, delivery.findings, limits.findings_max);
        self.emit(Output::Notify(Event::ReportReceived { case_id: id, from: peer.name.clone() }));
        self.accept_report(now, id, delivery.report);
        self.send_report_receipt(now, id, &peer.name, report_hash);
        Ok(())
    }

    fn on_report_receipt(&mut self, now: Millis, peer: &Peer, env: SignedEnvelope) -> Result<(), PeerError> {
        let receipt: ReportReceipt = match self.open_from(&env, content_type::REPORT_RECEIPT, &peer.public_key) {
            Ok(r) => r,
            Err(e) => return Err(self.refuse(&peer.name, None, e.reject_code(), format!("report receipt: {e}"))),
        };
        let id = receipt.case_id;
        let Some(case) = self.cases.get(&id) else {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::UnknownCase,
                "report receipt for an unknown case".into(),
            ));
        };
        let matches = matches!(&case.report_down, ReportDown::Pending { to, .. } if *to == peer.name)
            && case.report.as_ref().map(|r| r.hash()) == Some(receipt.report_hash);
        if matches {
            let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
            case.report_down = ReportDown::Acked { to: peer.name.clone(), receipt: env };
            case.updated_at = now;
            self.persist(now, id);
            self.rearm(id);
        }
        Ok(())
    }

    fn on_recall(&mut self, now: Millis, peer: &Peer, env: SignedEnvelope) -> Result<(), PeerError> {
        let recall = match self.open::<Recall>(&env, content_type::RECALL) {
            Ok(v) => v,
            Err(e) => return Err(self.refuse(&peer.name, None, e.reject_code(), format!("recall: {e}"))),
        };
        let id = recall.body.case_id;
        let Some(case) = self.cases.get(&id) else {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::UnknownCase,
                "recall for an unknown case".into(),
            ));
        };
        let origin_key = case.manifest.claimed_signer().ok();
        if case.came_from.as_ref() != Some(&peer.name) || origin_key != Some(recall.signer) {
            return Err(self.refuse(
                &peer.name,
                Some(id),
                RejectCode::NotCustodian,
                "recall not signed by the origin or not from the case's sender".into(),
            ));
        }
        if !matches!(case.status, CaseStatus::Recalled { .. }) {
            self.apply_recall(now, id, env);
        }
        Ok(())
    }

    // ----- decisions -----

    /// The local decision: model, then experts, then escalation.
    fn decide(&mut self, now: Millis, id: CaseId) {
        let case = &self.cases[&id];
        if !case.model_tried
            && let Some(model) = self.config.models.iter().find(|m| m.covers(case.info.modality, &case.info.task))
        {
            let model = model.id.clone();
            let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
            case.model_tried = true;
            self.set_status(now, id, CaseStatus::AwaitingModel { model: model.clone() });
            self.emit(Output::RunModel { case_id: id, model });
            return;
        }
        self.decide_after_model(now, id, None);
    }

    fn decide_after_model(&mut self, now: Millis, id: CaseId, model: Option<(String, f32, f32)>) {
        let case = &self.cases[&id];
        let time_left = case.info.deadline_at.saturating_sub(now);
        let pool = self.pool(case.info.modality).cloned();
        let queue_len = self.queue_len(case.info.modality);
        let eta = pool.as_ref().and_then(|p| p.eta_ms(queue_len));
        let has_upstream = !self.config.upstream.is_empty();
        match eta {
            Some(eta) if eta <= time_left || (!has_upstream) => {
                let claim_deadline = self.claim_deadline(now, case);
                self.set_status(now, id, CaseStatus::Queued { since: now, claim_deadline, lapsed_claim: None });
                self.emit(Output::Notify(Event::Queued { case_id: id, claim_deadline }));
            }
            _ if !has_upstream => {
                self.set_status(now, id, CaseStatus::NoCapacity { since: now });
                self.emit(Output::Notify(Event::NoCapacity { case_id: id }));
            }
            _ => {
                let reason = match (model, eta) {
                    (Some((model, confidence, threshold)), _) => {
                        EscalationReason::ModelNotConfident { model, confidence, threshold }
                    }
                    (None, Some(eta_ms)) => EscalationReason::QueueTooLong { eta_ms, time_left_ms: time_left },
                    (None, None) => EscalationReason::NoLocalCapacity,
                };
                self.escalate(now, id, reason);
            }
        }
    }

    /// When an unclaimed case must move on from this tier's queue.
    fn claim_deadline(&self, now: Millis, case: &CaseRecord) -> Millis {
        let window = self.config.deadlines.claim_window_ms(case.info.urgency);
        let service = self.pool(case.info.modality).map_or(0, |p| p.service_ms);
        let latest_start = case.info.deadline_at.saturating_sub(Millis(service));
        let by_window = now.saturating_add(window);
        if self.config.upstream.is_empty() {
            // Nowhere to go: the deadline only marks the case as at risk.
            return by_window;
        }
        by_window.min(Millis(latest_start)).max(now)
    }

    /// Picks where the case goes next: the first upstream candidate that is
    /// reachable, has not refused it, and is not known (by a fresh advert) to be
    /// unable to read it. Returns the target and the candidates skipped on the way.
    fn choose_upstream(&self, now: Millis, case: &CaseRecord) -> Option<(Upstream, Vec<NodeName>)> {
        let usable: Vec<&Upstream> = self
            .config
            .upstream
            .iter()
            .filter(|u| !self.down.contains(&u.name) && !case.refused_by.contains(&u.name))
            .collect();
        let mut skipped = Vec::new();
        for (i, u) in usable.iter().enumerate() {
            let unable = self.adverts.get(&u.name).is_some_and(|a| {
                a.is_fresh(now) && !a.can_help(case.info.modality, &case.info.task, now, case.info.deadline_at)
            });
            let something_after = usable[i + 1..].iter().any(|n| n.tier > u.tier);
            if unable && something_after {
                skipped.push(u.name.clone());
                continue;
            }
            return Some(((*u).clone(), skipped));
        }
        None
    }

    fn escalate(&mut self, now: Millis, id: CaseId, reason: EscalationReason) {
        let case = &self.cases[&id];
        let Some((target, skipped)) = self.choose_upstream(now, case).or_else(|| {
            // Every candidate is down or refused: keep trying the primary (never drop).
            self.config.upstream.first().map(|u| (u.clone(), Vec::new()))
        }) else {
            self.set_status(now, id, CaseStatus::NoCapacity { since: now });
            self.emit(Output::Notify(Event::NoCapacity { case_id: id }));
            return;
        };
        let hop = HopRecord {
            case_id: id,
            from: self.config.name.clone(),
            from_tier: self.config.tier,
            to: target.name.clone(),
            to_tier: target.tier,
            arrived_at: case.arrived_at,
            left_at: now,
            skipped,
            reason: reason.clone(),
        };
        let hop = match self.sign(content_type::HOP, &hop) {
            Ok(h) => h,
            Err(_) => unreachable!("a hop record always encodes"),
        };
        let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
        if !case.offered_to.contains(&target.name) {
            case.offered_to.push(target.name.clone());
        }
        let status =
            CaseStatus::Forwarding { to: target.name.clone(), hop, attempts: 0, next_retry_at: now, answered: false };
        self.emit(Output::Notify(Event::Escalating { case_id: id, to: target.name.clone(), reason }));
        self.set_status(now, id, status);
        self.retry_now(now, id);
    }

    /// After a peer refused or could not be reached: the next candidate.
    fn reroute(&mut self, now: Millis, id: CaseId, unreachable: NodeName) {
        let case = &self.cases[&id];
        match self.choose_upstream(now, case) {
            Some((next, _)) if next.name != unreachable => {
                self.escalate(now, id, EscalationReason::Rerouted { unreachable });
            }
            // No other candidate: keep offering to the same peer with backoff.
            _ => self.schedule_retry(now, id),
        }
    }

    fn issue_report(&mut self, now: Millis, id: CaseId, report: Report) -> Result<(), ActionError> {
        let machine_made = report.machine_made;
        let env = self.sign(content_type::REPORT, &report)?;
        self.emit(Output::Notify(Event::Reported { case_id: id, machine_made }));
        self.accept_report(now, id, env);
        Ok(())
    }

    /// Stores a report and sends it one tier down (or keeps it, at the origin).
    fn accept_report(&mut self, now: Millis, id: CaseId, report: SignedEnvelope) {
        let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
        case.report = Some(report);
        case.report_down = match &case.came_from {
            None => ReportDown::AtOrigin,
            Some(child) => ReportDown::Pending { to: child.clone(), attempts: 0, next_retry_at: now },
        };
        let at_origin = case.came_from.is_none();
        self.set_status(now, id, CaseStatus::Reported { at: now });
        if at_origin {
            self.emit(Output::Notify(Event::ReportAtOrigin { case_id: id }));
        } else {
            self.retry_now(now, id);
        }
    }

    fn apply_recall(&mut self, now: Millis, id: CaseId, env: SignedEnvelope) {
        let case = &self.cases[&id];
        let upward = match &case.status {
            CaseStatus::Forwarding { to, .. } | CaseStatus::Forwarded { to, .. } => Some(to.clone()),
            _ => None,
        };
        let offered = case.offered_to.clone();
        self.set_status(now, id, CaseStatus::Recalled { at: now });
        self.emit(Output::Notify(Event::Recalled { case_id: id }));
        for peer in offered.into_iter().chain(upward).collect::<BTreeSet<_>>() {
            self.send(&peer, Message::Recall(env.clone()));
        }
    }

    fn take_custody(&mut self, now: Millis, id: CaseId) {
        let from = self.cases[&id].came_from.clone().expect("received cases have a sender");
        self.set_status(now, id, CaseStatus::Held); // persisted before the receipt leaves
        self.send_custody_receipt(now, id, &from);
        self.emit(Output::Notify(Event::CustodyTaken { case_id: id, from }));
        self.decide(now, id);
    }

    // ----- timers and retries -----

    fn fire(&mut self, now: Millis, id: CaseId) {
        let Some(case) = self.cases.get(&id) else { return };
        if let CaseStatus::Claimed { expert, lease_until, .. } = &case.status
            && lease_until.0 > 0
            && *lease_until <= now
        {
            // The claim lapsed: back to the queue, with a fresh claim window.
            let expert = expert.clone();
            let claim_deadline = self.claim_deadline(now, case).max(now);
            let lapsed_claim = Some(expert.clone());
            self.set_status(now, id, CaseStatus::Queued { since: now, claim_deadline, lapsed_claim });
            self.emit(Output::Notify(Event::ClaimExpired { case_id: id, expert }));
            self.emit(Output::Notify(Event::Queued { case_id: id, claim_deadline }));
        }
        let Some(case) = self.cases.get(&id) else { return };
        if let CaseStatus::Queued { claim_deadline, .. } = case.status
            && claim_deadline <= now
            && !self.config.upstream.is_empty()
        {
            self.escalate(now, id, EscalationReason::ClaimTimeout);
        }
        let case = &self.cases[&id];
        if let CaseStatus::Forwarding { next_retry_at, attempts, answered, to, .. } = &case.status
            && *next_retry_at <= now
        {
            // Reroute on silence only when the transport does not vouch for the link:
            // a live link that is slow (a big study ahead of the offer on a weak
            // uplink) must not get a second custodian. A dead link shows up as
            // `handle_peer_down`, which reroutes at once.
            let link_up = self.peers.contains_key(to) && !self.down.contains(to);
            if !answered && !link_up && *attempts >= self.config.retry.attempts_before_reroute {
                let to = to.clone();
                self.down.insert(to.clone());
                self.reroute(now, id, to);
            } else {
                self.retry_now(now, id);
            }
        }
        let case = &self.cases[&id];
        if let ReportDown::Pending { next_retry_at, .. } = case.report_down
            && next_retry_at <= now
        {
            self.retry_now(now, id);
        }
        self.rearm(id);
    }

    /// (Re-)sends whatever the case is waiting on, now, and schedules the next try.
    fn retry_now(&mut self, now: Millis, id: CaseId) {
        let case = &self.cases[&id];
        if let CaseStatus::Forwarding { to, hop, .. } = &case.status {
            let mut trail = case.trail.clone();
            trail.push(hop.clone());
            let to_tier = self.config.upstream.iter().find(|u| u.name == *to).map(|u| u.tier);
            let identity = case.identity.clone().filter(|_| {
                to_tier.is_some_and(|t| self.config.privacy.may_hold_identifiers(case.info.origin_tier, t))
            });
            let offer = CaseOffer { manifest: case.manifest.clone(), trail, findings: case.findings.clone(), identity };
            let to = to.clone();
            self.send(&to, Message::CaseOffer(offer));
        }
        let case = &self.cases[&id];
        if let (ReportDown::Pending { to, .. }, Some(report)) = (&case.report_down, &case.report) {
            let delivery = ReportDelivery {
                case_id: id,
                report: report.clone(),
                trail: case.trail.clone(),
                findings: case.findings.clone(),
            };
            let to = to.clone();
            self.send(&to, Message::ReportDelivery(delivery));
        }
        self.schedule_retry(now, id);
    }

    fn schedule_retry(&mut self, now: Millis, id: CaseId) {
        let retry = self.config.retry.clone();
        let jitter = self.next_rand();
        let delay = |attempts: u32| {
            let base = retry.initial_ms.saturating_mul(1u64 << attempts.min(20)).min(retry.max_ms);
            let spread = base * retry.jitter_permille / 1000;
            base - spread + if spread == 0 { 0 } else { jitter % (2 * spread + 1) }
        };
        let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
        if let CaseStatus::Forwarding { attempts, next_retry_at, .. } = &mut case.status {
            *next_retry_at = now.saturating_add(delay(*attempts));
            *attempts = attempts.saturating_add(1);
        }
        if let ReportDown::Pending { attempts, next_retry_at, .. } = &mut case.report_down {
            *next_retry_at = now.saturating_add(delay(*attempts));
            *attempts = attempts.saturating_add(1);
        }
        self.rearm(id);
    }

    /// Re-computes the case's single wake-up from its state.
    fn rearm(&mut self, id: CaseId) {
        self.reindex(id);
        if let Some(old) = self.armed.remove(&id) {
            self.timers.remove(&(old, id));
        }
        let Some(case) = self.cases.get(&id) else { return };
        let mut wake = match &case.status {
            CaseStatus::Queued { claim_deadline, .. } if !self.config.upstream.is_empty() => Some(*claim_deadline),
            CaseStatus::Forwarding { next_retry_at, .. } => Some(*next_retry_at),
            CaseStatus::Claimed { lease_until, .. } if lease_until.0 > 0 => Some(*lease_until),
            _ => None,
        };
        if let ReportDown::Pending { next_retry_at, .. } = case.report_down {
            wake = Some(wake.map_or(next_retry_at, |w| w.min(next_retry_at)));
        }
        if let Some(at) = wake {
            self.timers.insert((at, id));
            self.armed.insert(id, at);
        }
    }

    // ----- helpers -----

    fn set_status(&mut self, now: Millis, id: CaseId, status: CaseStatus) {
        let case = self.cases.get_mut(&id).map(Arc::make_mut).expect("present");
        case.status = status;
        case.updated_at = now;
        self.persist(now, id);
        self.rearm(id);
    }

    fn persist(&mut self, _now: Millis, id: CaseId) {
        self.reindex(id);
        let record = Arc::clone(&self.cases[&id]);
        self.emit(Output::Persist(Change::PutCase(record)));
    }

    fn emit(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    fn send(&mut self, to: &NodeName, message: Message) {
        self.emit(Output::Send { to: to.clone(), message });
    }

    fn send_custody_receipt(&mut self, now: Millis, id: CaseId, to: &NodeName) {
        let case = &self.cases[&id];
        let receipt = CustodyReceipt {
            case_id: id,
            receiver: self.config.name.clone(),
            from: to.clone(),
            manifest_hash: case.manifest.hash(),
            attachments: case.info.attachments.iter().map(|a| a.hash).collect(),
            at: now,
        };
        if let Ok(env) = self.sign(content_type::CUSTODY_RECEIPT, &receipt) {
            self.send(to, Message::CustodyReceipt(env));
        }
    }

    fn send_report_receipt(&mut self, now: Millis, id: CaseId, to: &NodeName, report_hash: ContentHash) {
        let receipt = ReportReceipt { case_id: id, receiver: self.config.name.clone(), report_hash, at: now };
        if let Ok(env) = self.sign(content_type::REPORT_RECEIPT, &receipt) {
            self.send(to, Message::ReportReceipt(env));
        }
    }

    fn refuse(&mut self, peer: &NodeName, case_id: Option<CaseId>, code: RejectCode, detail: String) -> PeerError {
        self.send(peer, Message::Reject(Reject { case_id, code, detail: detail.clone() }));
        self.emit(Output::Notify(Event::PeerRefused { peer: peer.clone(), code, detail: detail.clone() }));
        PeerError { peer: peer.clone(), code, detail }
    }

    /// Encodes and signs `body`. Envelopes signed here count as verified here.
    fn sign<T: Serialize>(&mut self, content_type: &'static str, body: &T) -> Result<SignedEnvelope, ActionError> {
        let env = self.sign_only(content_type, body)?;
        self.remember_opened(env.hash(), content_type, self.public_key);
        Ok(env)
    }

    fn sign_only<T: Serialize>(&self, content_type: &str, body: &T) -> Result<SignedEnvelope, ActionError> {
        let payload = federation_proto::codec::to_cbor(body).map_err(|e| ActionError::Signing(e.to_string()))?;
        self.crypto.sign(content_type, payload).map_err(|e| ActionError::Signing(e.to_string()))
    }

    /// Verifies `env` under `content_type` once per node: bytes verified (and
    /// decoded) here before, found by hash, are read in place; anything else goes
    /// to the [`Crypto`]. Returns the signer, the payload (not yet decoded), and
    /// whether the bytes are new here (the caller remembers them once they decode).
    fn verify<'e>(
        &mut self,
        env: &'e SignedEnvelope,
        content_type: &'static str,
    ) -> Result<(PublicKey, std::borrow::Cow<'e, [u8]>, bool), federation_proto::Error> {
        let hash = env.hash();
        if let Some(signer) = self.recall_opened(&hash, content_type) {
            return Ok((signer, std::borrow::Cow::Borrowed(&env.as_bytes()[env.payload_range()?]), false));
        }
        let (signer, payload) = self.crypto.verify_hashed(env, &hash, content_type)?;
        Ok((signer, std::borrow::Cow::Owned(payload), true))
    }

    /// Verifies (see [`Node::verify`]), then decodes the payload. Bytes that verify
    /// and decode are remembered, so the memory of verified envelopes only holds
    /// envelopes whose body decodes as the content type's type (each content type
    /// is opened as one type here).
    fn open<T: DeserializeOwned>(
        &mut self,
        env: &SignedEnvelope,
        content_type: &'static str,
    ) -> Result<Verified<T>, federation_proto::Error> {
        let (signer, payload, new) = self.verify(env, content_type)?;
        let body = federation_proto::codec::from_cbor(&payload)?;
        if new {
            self.remember_opened(env.hash(), content_type, signer);
        }
        Ok(Verified { signer, body })
    }

    /// Checks that `env` verifies under `content_type` and that its body decodes as
    /// `T`, for envelopes kept but not read (a trail's earlier hops, findings).
    /// Bytes that passed this here before are not decoded again.
    fn check<T: DeserializeOwned>(
        &mut self,
        env: &SignedEnvelope,
        content_type: &'static str,
    ) -> Result<PublicKey, federation_proto::Error> {
        if let Some(signer) = self.recall_opened(&env.hash(), content_type) {
            return Ok(signer);
        }
        self.open::<T>(env, content_type).map(|v| v.signer)
    }

    /// [`Node::open`], refusing bytes signed by anyone but `expected` before decoding.
    fn open_from<T: DeserializeOwned>(
        &mut self,
        env: &SignedEnvelope,
        content_type: &'static str,
        expected: &PublicKey,
    ) -> Result<T, federation_proto::Error> {
        let (signer, payload, new) = self.verify(env, content_type)?;
        if signer != *expected {
            return Err(federation_proto::Error::UnexpectedSigner { expected: *expected, found: signer });
        }
        let body = federation_proto::codec::from_cbor(&payload)?;
        if new {
            self.remember_opened(env.hash(), content_type, signer);
        }
        Ok(body)
    }

    /// The signer, if these bytes were opened (verified and decoded) or signed here
    /// before, or, through the [`Crypto`]'s shared memory, by another node.
    fn recall_opened(&self, hash: &ContentHash, content_type: &'static str) -> Option<PublicKey> {
        self.verified.get(hash, content_type).or_else(|| self.crypto.recall_opened(hash, content_type))
    }

    /// Remembers bytes opened or signed here, in this node's memory and the
    /// [`Crypto`]'s.
    fn remember_opened(&mut self, hash: ContentHash, content_type: &'static str, signer: PublicKey) {
        self.verified.insert(hash, content_type, signer);
        self.crypto.note_opened(&hash, content_type, signer);
    }

    fn wrong_state(&self, case_id: CaseId, action: &'static str) -> ActionError {
        let status = self.cases.get(&case_id).map_or("unknown", |c| c.status.name());
        ActionError::WrongState { case_id, status, action }
    }

    fn check_claimed_by(&self, case_id: CaseId, expert: &str, action: &'static str) -> Result<(), ActionError> {
        let case = self.cases.get(&case_id).ok_or(ActionError::UnknownCase(case_id))?;
        match &case.status {
            CaseStatus::Claimed { expert: e, .. } if e == expert => Ok(()),
            CaseStatus::Claimed { expert: e, .. } => Err(ActionError::ClaimedByOther { case_id, expert: e.clone() }),
            _ => Err(self.wrong_state(case_id, action)),
        }
    }

    fn pool(&self, modality: Modality) -> Option<&ExpertPool> {
        self.config.experts.iter().find(|p| p.modality == modality && p.on_duty > 0)
    }

    /// Cases of this modality waiting for or being read by local experts.
    fn queue_len(&self, modality: Modality) -> usize {
        self.counts.queue_len[modality as usize]
    }

    fn peer_from_trail(&mut self, record: &CaseRecord, name: &NodeName) -> Option<Peer> {
        record.trail.iter().rev().find_map(|env| {
            let v = self.open::<HopRecord>(env, content_type::HOP).ok()?;
            (v.body.from == *name).then(|| Peer { name: name.clone(), tier: v.body.from_tier, public_key: v.signer })
        })
    }

    /// Brings the counters up to date with case `id`'s current state (or its absence).
    fn reindex(&mut self, id: CaseId) {
        // Most calls find the case contributing what it did (a persist and a rearm
        // of the same change): tell that without building a new index.
        let unchanged = match (self.cases.get(&id), self.index.get(&id)) {
            (Some(case), Some(old)) => old.describes(case),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            debug_assert_eq!(self.cases.get(&id).map(|c| CaseIndex::of(c)).as_ref(), self.index.get(&id));
            return;
        }
        let new = self.cases.get(&id).map(|c| CaseIndex::of(c));
        let old = match &new {
            Some(new) => self.index.insert(id, new.clone()),
            None => self.index.remove(&id),
        };
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.counts.apply(id, &old, false);
        }
        if let Some(new) = new {
            self.counts.apply(id, &new, true);
        }
        #[cfg(debug_assertions)]
        {
            self.counts.changes += 1;
            if self.cases.len() <= 64 || self.counts.changes.is_multiple_of(256) {
                self.check_counts();
            }
        }
    }

    /// Recomputes every counter from the records and compares (debug builds).
    #[cfg(debug_assertions)]
    fn check_counts(&self) {
        let mut fresh = Counts::default();
        for (id, case) in &self.cases {
            fresh.apply(*id, &CaseIndex::of(case), true);
        }
        assert_eq!(fresh.queue_len, self.counts.queue_len, "queue length per modality");
        assert_eq!(fresh.active, self.counts.active, "active cases");
        assert_eq!(fresh.waiting_on, self.counts.waiting_on, "cases waiting per peer");
        assert_eq!(fresh.no_capacity, self.counts.no_capacity, "cases waiting for capacity");
        assert_eq!(self.index.len(), self.cases.len(), "every case indexed once");
    }

    /// splitmix64: a seeded, deterministic source for retry jitter.
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The verified peers of a node, sorted by name: a vector, as most nodes (villages)
/// know a handful of peers, for which a `BTreeMap` allocates a whole node of eleven
/// slots (and keeps each name twice).
#[derive(Debug, Default)]
struct Peers(Vec<Peer>);

impl Peers {
    fn position(&self, name: &NodeName) -> Result<usize, usize> {
        self.0.binary_search_by(|p| p.name.cmp(name))
    }

    fn get(&self, name: &NodeName) -> Option<&Peer> {
        self.position(name).ok().map(|i| &self.0[i])
    }

    fn contains_key(&self, name: &NodeName) -> bool {
        self.position(name).is_ok()
    }

    /// Inserts or replaces the peer of that name.
    fn insert(&mut self, peer: Peer) {
        match self.position(&peer.name) {
            Ok(i) => self.0[i] = peer,
            Err(i) => self.0.insert(i, peer),
        }
    }
}

/// What one case contributes to a node's counters; recomputed from its record on
/// every change, so the counters never drift from the records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CaseIndex {
    /// Modality, when queued for or claimed by a local expert.
    queued: Option<Modality>,
    active: bool,
    no_capacity: bool,
    /// Peers it waits on: the one it is offered to, the one its report goes to.
    waits_on: Vec<NodeName>,
}

impl CaseIndex {
    fn of(case: &CaseRecord) -> CaseIndex {
        let queued =
            matches!(case.status, CaseStatus::Queued { .. } | CaseStatus::Claimed { .. }).then_some(case.info.modality);
        let mut waits_on = Vec::new();
        if let CaseStatus::Forwarding { to, .. } = &case.status {
            waits_on.push(to.clone());
        }
        if let ReportDown::Pending { to, .. } = &case.report_down
            && !waits_on.contains(to)
        {
            waits_on.push(to.clone());
        }
        CaseIndex {
            queued,
            active: case.is_active(),
            no_capacity: matches!(case.status, CaseStatus::NoCapacity { .. }),
            waits_on,
        }
    }
}

impl CaseIndex {
    /// Whether [`CaseIndex::of`] `case` would be `self` (without allocating).
    fn describes(&self, case: &CaseRecord) -> bool {
        let queued =
            matches!(case.status, CaseStatus::Queued { .. } | CaseStatus::Claimed { .. }).then_some(case.info.modality);
        let forwarding_to = match &case.status {
            CaseStatus::Forwarding { to, .. } => Some(to),
            _ => None,
        };
        let report_to = match &case.report_down {
            ReportDown::Pending { to, .. } if Some(to) != forwarding_to => Some(to),
            _ => None,
        };
        let mut expected = forwarding_to.into_iter().chain(report_to);
        self.queued == queued
            && self.active == case.is_active()
            && self.no_capacity == matches!(case.status, CaseStatus::NoCapacity { .. })
            && self.waits_on.iter().all(|w| expected.next() == Some(w))
            && expected.next().is_none()
    }
}

/// Counters maintained from [`CaseIndex`]es instead of scanning every case held.
#[derive(Debug, Default)]
struct Counts {
    queue_len: [usize; Modality::ALL.len()],
    active: usize,
    /// Per peer, the cases offered to it or with a report pending to it.
    waiting_on: BTreeMap<NodeName, BTreeSet<CaseId>>,
    no_capacity: BTreeSet<CaseId>,
    #[cfg(debug_assertions)]
    changes: u64,
}

impl Counts {
    fn apply(&mut self, id: CaseId, ix: &CaseIndex, add: bool) {
        let step = |n: &mut usize| {
            if add {
                *n += 1;
            } else {
                *n = n.checked_sub(1).expect("counter never goes below zero");
            }
        };
        if let Some(m) = ix.queued {
            step(&mut self.queue_len[m as usize]);
        }
        if ix.active {
            step(&mut self.active);
        }
        if ix.no_capacity {
            if add {
                self.no_capacity.insert(id);
            } else {
                self.no_capacity.remove(&id);
            }
        }
        for peer in &ix.waits_on {
            if add {
                self.waiting_on.entry(peer.clone()).or_default().insert(id);
            } else if let Some(set) = self.waiting_on.get_mut(peer) {
                set.remove(&id);
                if set.is_empty() {
                    self.waiting_on.remove(peer);
                }
            }
        }
    }
}

/// Appends envelopes not yet present (by exact bytes), up to `max` in all.
fn merge_envelopes(into: &mut Vec<SignedEnvelope>, from: Vec<SignedEnvelope>, max: usize) {
    for env in from {
        if into.len() >= max {
            break;
        }
        if !into.contains(&env) {
            into.push(env);
        }
    }
}
