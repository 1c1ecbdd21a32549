//! A scripted child node for load tests and benchmarks: it links to a real node
//! with real certificates, offers cases it signs itself, serves their attachment
//! chunks, and measures the time until each custody receipt arrives.
//!
//! This module must never be used by the daemon itself; it plays a peer from outside.

use crate::transport::{self, Link};
use certs::FederationVerifier;
use certs::keys::NodeCredentials;
use certs::verify::TrustStore;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use federation_proto::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type Waiters = Arc<Mutex<BTreeMap<CaseId, oneshot::Sender<Instant>>>>;

/// When this child saw each step of one case's custody transfer (its own clock;
/// benchmarks split the time to custody with it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeline {
    pub offered: Option<Instant>,
    /// The first chunk request for the case arrived.
    pub first_request: Option<Instant>,
    /// The last chunk answer was written and its stream finished.
    pub last_answer: Option<Instant>,
    pub accepted: Option<Instant>,
    pub receipted: Option<Instant>,
}

/// Timelines of the cases offered since [`PlayedChild::keep_timelines`] (bounded).
type Timelines = Arc<Mutex<Option<BTreeMap<CaseId, Timeline>>>>;
const TIMELINES_MAX: usize = 100_000;

fn stamp(timelines: &Timelines, case_id: CaseId, step: impl FnOnce(&mut Timeline)) {
    if let Some(map) = timelines.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
        && (map.len() < TIMELINES_MAX || map.contains_key(&case_id))
    {
        step(map.entry(case_id).or_default());
    }
}

/// What [`PlayedChild::make_offer_with`] signs, open to tampering before it is signed.
pub struct OfferParts {
    pub manifest: CaseManifest,
    pub hop: HopRecord,
    pub manifest_key: SigningKey,
    pub hop_key: SigningKey,
}

/// A child node played by a test or benchmark.
pub struct PlayedChild {
    pub name: NodeName,
    pub tier: Tier,
    pub link: Link,
    key: SigningKey,
    parent: NodeName,
    blobs: Arc<Mutex<BTreeMap<ContentHash, Arc<Vec<u8>>>>>,
    waiters: Waiters,
    timelines: Timelines,
    /// Every message the node sent us other than chunk traffic, in arrival order
    /// (dropped when nobody reads and the queue is full).
    pub answers: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Message>>,
    answers_tx: tokio::sync::mpsc::Sender<Message>,
    _endpoint: quinn::Endpoint,
}

impl PlayedChild {
    /// Connects to `parent` at `addr` with these credentials (hello/ack included).
    pub async fn connect(
        creds: &NodeCredentials,
        name: NodeName,
        tier: Tier,
        trust: Arc<TrustStore>,
        parent: NodeName,
        addr: SocketAddr,
    ) -> Result<PlayedChild, transport::TransportError> {
        let key = SigningKey::from_pkcs8_der(creds.key.secret_der())
            .map_err(|e| transport::TransportError::Config(format!("key: {e}")))?;
        let endpoint = transport::endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            creds,
            Arc::new(FederationVerifier::new(trust.clone())),
        )?;
        let claim = NodeClaim { name: name.clone(), tier, public_key: creds.public_key };
        let link = transport::connect(&endpoint, addr, &parent, &claim, &trust).await?;
        let (answers_tx, answers) = tokio::sync::mpsc::channel(256);
        let child = PlayedChild {
            name,
            tier,
            link,
            key,
            parent,
            blobs: Arc::default(),
            waiters: Arc::default(),
            timelines: Arc::default(),
            answers: tokio::sync::Mutex::new(answers),
            answers_tx,
            _endpoint: endpoint,
        };
        child.serve();
        Ok(child)
    }

    fn serve(&self) {
        let (conn, blobs, waiters) = (self.link.connection.clone(), self.blobs.clone(), self.waiters.clone());
        let (answers, timelines) = (self.answers_tx.clone(), self.timelines.clone());
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (blobs, waiters, answers) = (blobs.clone(), waiters.clone(), answers.clone());
                let timelines = timelines.clone();
                tokio::spawn(async move {
                    let Ok(msg) = transport::read_frame(&mut recv).await else { return };
                    match msg {
                        Message::ChunkRequest(req) => {
                            let t = Instant::now();
                            stamp(&timelines, req.case_id, |tl| {
                                tl.first_request.get_or_insert(t);
                            });
                            let data = blobs.lock().unwrap_or_else(|p| p.into_inner()).get(&req.hash).cloned();
                            if let Some(data) = data {
                                let start = (req.offset as usize).min(data.len());
                                let end = (start + req.len as usize).min(data.len());
                                let chunk = data[start..end].to_vec();
                                let resp = ChunkResponse {
                                    hash: req.hash,
                                    offset: req.offset,
                                    total_size: data.len() as u64,
                                    chunk_hash: ContentHash::of(&chunk),
                                    data: chunk,
                                };
                                let _ = transport::write_chunk_response(&mut send, resp).await;
                                let _ = send.finish();
                                let t = Instant::now();
                                stamp(&timelines, req.case_id, |tl| tl.last_answer = Some(t));
                            }
                        }
                        Message::CustodyReceipt(env) => {
                            let t = Instant::now();
                            if let Ok(v) = env.open::<CustodyReceipt>(content_type::CUSTODY_RECEIPT) {
                                stamp(&timelines, v.body.case_id, |tl| tl.receipted = Some(t));
                                if let Some(tx) =
                                    waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&v.body.case_id)
                                {
                                    let _ = tx.send(t);
                                }
                            }
                            let _ = answers.try_send(Message::CustodyReceipt(env));
                        }
                        other => {
                            if let Message::OfferAccept(a) = &other {
                                let t = Instant::now();
                                stamp(&timelines, a.case_id, |tl| tl.accepted = Some(t));
                            }
                            let _ = answers.try_send(other);
                        }
                    }
                });
            }
        });
    }

    /// A signed offer of a new case with one attachment, as an origin makes it.
    pub fn make_offer(
        &self,
        case_id: CaseId,
        modality: Modality,
        urgency: Urgency,
        attachment: Arc<Vec<u8>>,
    ) -> CaseOffer {
        self.make_offer_with(case_id, modality, urgency, attachment, |_| {})
    }

    /// [`Self::make_offer`], with the manifest, the hop record and the keys that sign
    /// them handed to `tamper` first (adversarial tests: a hop signed by another node,
    /// naming another receiver, ...).
    pub fn make_offer_with(
        &self,
        case_id: CaseId,
        modality: Modality,
        urgency: Urgency,
        attachment: Arc<Vec<u8>>,
        tamper: impl FnOnce(&mut OfferParts),
    ) -> CaseOffer {
        let now = crate::view::now();
        let hash = ContentHash::of(&attachment);
        let manifest = CaseManifest {
            case_id,
            origin: self.name.clone(),
            origin_tier: self.tier,
            modality,
            task: "ecg.rhythm".into(),
            urgency,
            clinical_question: "load test".into(),
            patient: PatientRef { pseudonym: "load".into(), sex: None, age_years: None },
            created_at: now,
            deadline_at: now.saturating_add(3_600_000),
            attachments: vec![AttachmentRef {
                hash,
                size_bytes: attachment.len() as u64,
                media_type: "application/dicom".into(),
                name: "case.dcm".into(),
                priority: Priority::Urgent,
            }],
            deidentified: vec![],
        };
        self.blobs.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, attachment);
        let hop = HopRecord {
            case_id,
            from: self.name.clone(),
            from_tier: self.tier,
            to: self.parent.clone(),
            to_tier: self.tier.parent().unwrap_or(Tier::International),
            arrived_at: now,
            left_at: now,
            skipped: vec![],
            reason: EscalationReason::NoLocalCapacity,
        };
        let mut parts = OfferParts { manifest, hop, manifest_key: self.key.clone(), hop_key: self.key.clone() };
        tamper(&mut parts);
        CaseOffer {
            manifest: SignedEnvelope::sign(&parts.manifest_key, content_type::MANIFEST, &parts.manifest)
                .expect("encodes"),
            trail: vec![SignedEnvelope::sign(&parts.hop_key, content_type::HOP, &parts.hop).expect("encodes")],
            findings: vec![],
            identity: None,
        }
    }

    /// Writes `bytes` as they are (no framing) on a new stream and finishes it; returns
    /// the stream's receiving half, where the node answers a frame it refuses.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<quinn::RecvStream, transport::TransportError> {
        let conn_err = |e: &dyn std::fmt::Display| transport::TransportError::Connection {
            peer: self.parent.to_string(),
            detail: e.to_string(),
        };
        let (mut s, r) = self.link.connection.open_bi().await.map_err(|e| conn_err(&e))?;
        s.write_all(bytes).await.map_err(|e| conn_err(&e))?;
        let _ = s.finish();
        Ok(r)
    }

    /// Waits at most `timeout` for a message from the node that `want` picks out,
    /// dropping the ones before it.
    pub async fn wait_for(&self, timeout: Duration, mut want: impl FnMut(&Message) -> bool) -> Option<Message> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let msg = self.next_answer(left).await?;
            if want(&msg) {
                return Some(msg);
            }
        }
    }

    /// Sends a frame on a new stream.
    pub async fn send(&self, msg: &Message) -> Result<(), transport::TransportError> {
        let (mut s, _r) = self.link.connection.open_bi().await.map_err(|e| transport::TransportError::Connection {
            peer: self.parent.to_string(),
            detail: e.to_string(),
        })?;
        transport::write_frame(&mut s, msg).await?;
        let _ = s.finish();
        Ok(())
    }

    /// The next message the node sent us (not chunk traffic), waiting at most `timeout`.
    pub async fn next_answer(&self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, self.answers.lock().await.recv()).await.ok().flatten()
    }

    /// Stops serving the attachment `hash` and frees its bytes (once the node holds
    /// it: a load test's villages would otherwise keep every case in memory).
    pub fn forget_attachment(&self, hash: &ContentHash) {
        self.blobs.lock().unwrap_or_else(|p| p.into_inner()).remove(hash);
    }

    /// The key this child signs with.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Starts keeping a [`Timeline`] of every case offered or asked about from now on.
    pub fn keep_timelines(&self) {
        self.timelines.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(BTreeMap::new);
    }

    /// The timeline of `case_id`, if timelines are kept and the case was seen.
    pub fn timeline(&self, case_id: &CaseId) -> Option<Timeline> {
        self.timelines.lock().unwrap_or_else(|p| p.into_inner()).as_ref()?.get(case_id).copied()
    }

    /// Offers a case until its custody receipt arrives, as a real village re-offers
    /// (custody transfer is idempotent): each offer waits at most `receipt_timeout`,
    /// and at most `tries_max` offers are made in all. Returns the time from the
    /// first offer to the receipt (`None` if none came) and the number of re-offers.
    pub async fn offer_with_retries(
        &self,
        offer: CaseOffer,
        receipt_timeout: Duration,
        tries_max: u32,
    ) -> (Option<Duration>, u64) {
        let first = Instant::now();
        let mut retries = 0;
        for attempt in 0..tries_max.max(1) {
            if attempt > 0 {
                retries += 1;
            }
            if self.offer_until_receipt(offer.clone(), receipt_timeout).await.is_some() {
                return (Some(first.elapsed()), retries);
            }
        }
        (None, retries)
    }

    /// Offers a case and waits for its custody receipt; returns the time it took.
    pub async fn offer_until_receipt(&self, offer: CaseOffer, timeout: Duration) -> Option<Duration> {
        let case_id = offer.manifest.open::<CaseManifest>(content_type::MANIFEST).ok()?.body.case_id;
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(case_id, tx);
        let start = Instant::now();
        stamp(&self.timelines, case_id, |tl| tl.offered = Some(start));
        self.send(&Message::CaseOffer(offer)).await.ok()?;
        let at = tokio::time::timeout(timeout, rx).await.ok()?.ok()?;
        Some(at - start)
    }
}
