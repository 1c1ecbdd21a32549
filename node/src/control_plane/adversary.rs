//! A scripted control-plane peer for adversarial tests (never used by the daemon):
//! it speaks the same protocols over the same swarm, but decides for itself what to
//! present at admission and what to gossip — nothing, a certificate that is not its
//! own, an advert with a broken signature.
//!
//! This module must never be reachable from the daemon's code paths.

use super::admission::{AdmitRequest, AdmitResponse};
use super::gossip::{ADVERT_TOPIC, CRL_TOPIC, GossipMessage};
use super::{Behaviour, BehaviourEvent, ControlError, build_swarm, listen};
use ed25519_dalek::SigningKey;
use libp2p::futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, request_response};
use rustls::pki_types::CertificateDer;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What the rogue does at admission.
#[derive(Debug, Clone)]
pub enum Admission {
    /// Sends nothing and answers nothing (the peer must time it out).
    Silent,
    /// Presents this chain (its own, or someone else's) and answers requests.
    Present(Vec<CertificateDer<'static>>),
}

enum Command {
    Dial(Multiaddr),
    Publish(Vec<u8>, oneshot::Sender<Result<(), String>>),
}

/// A running rogue peer.
pub struct Rogue {
    tx: mpsc::Sender<Command>,
    pub peer_id: String,
    task: tokio::task::JoinHandle<()>,
}

impl Rogue {
    /// Starts a rogue peer on loopback with `key` as its libp2p identity.
    pub async fn start(key: &SigningKey, admission: Admission) -> Result<Rogue, ControlError> {
        let mut swarm = build_swarm(key)?;
        listen(&mut swarm, "/ip4/127.0.0.1/tcp/0").await?;
        for topic in [ADVERT_TOPIC, CRL_TOPIC] {
            let _ = swarm.behaviour_mut().gossip.subscribe(&gossipsub::IdentTopic::new(topic));
        }
        let peer_id = swarm.local_peer_id().to_base58();
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(run(swarm, admission, rx));
        Ok(Rogue { tx, peer_id, task })
    }

    pub async fn dial(&self, addr: &str) -> Result<(), String> {
        let addr: Multiaddr = addr.parse().map_err(|e| format!("{e}"))?;
        self.tx.send(Command::Dial(addr)).await.map_err(|_| "rogue stopped".to_owned())
    }

    /// Publishes raw bytes on the advert topic once a peer subscribed to it is
    /// connected (waits at most 10 s).
    pub async fn publish_raw(&self, bytes: Vec<u8>) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Publish(bytes, reply)).await.map_err(|_| "rogue stopped".to_owned())?;
        rx.await.map_err(|_| "rogue stopped".to_owned())?
    }

    /// Publishes an advert message (chain, envelope, address as given).
    pub async fn publish_advert(&self, message: &GossipMessage) -> Result<(), String> {
        self.publish_raw(message.encode()?).await
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// A publish waiting for a subscribed peer: bytes, reply, give-up time.
type Waiting = (Vec<u8>, oneshot::Sender<Result<(), String>>, tokio::time::Instant);

async fn run(mut swarm: Swarm<Behaviour>, admission: Admission, mut rx: mpsc::Receiver<Command>) {
    let topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
    let mut subscribed: HashSet<PeerId> = HashSet::new();
    let mut waiting: Vec<Waiting> = Vec::new();
    let mut unanswered = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    if let Admission::Present(chain) = &admission {
                        let request = AdmitRequest {
                            chain: chain.iter().map(|c| serde_bytes::ByteBuf::from(c.to_vec())).collect(),
                            crls: vec![],
                        };
                        swarm.behaviour_mut().admit.send_request(&peer_id, request);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Admit(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. }, ..
                })) => {
                    if matches!(admission, Admission::Present(_)) {
                        let _ = swarm
                            .behaviour_mut()
                            .admit
                            .send_response(channel, AdmitResponse { admitted: true, reason: String::new() });
                    } else {
                        // Hold the channel (a few at most): never answer.
                        if unanswered.len() < 64 {
                            unanswered.push(channel);
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Subscribed { peer_id, topic: t }))
                    if t == topic.hash() =>
                {
                    subscribed.insert(peer_id);
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    subscribed.remove(&peer_id);
                }
                _ => {}
            },
            command = rx.recv() => match command {
                None => break,
                Some(Command::Dial(addr)) => {
                    let _ = swarm.dial(addr);
                }
                Some(Command::Publish(bytes, reply)) => {
                    waiting.push((bytes, reply, tokio::time::Instant::now() + Duration::from_secs(10)));
                }
            },
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let mut still = Vec::new();
        for (bytes, reply, until) in waiting.drain(..) {
            if !subscribed.is_empty() {
                let result =
                    swarm.behaviour_mut().gossip.publish(topic.clone(), bytes).map(|_| ()).map_err(|e| e.to_string());
                let _ = reply.send(result);
            } else if now >= until {
                let _ = reply.send(Err("no subscribed peer within 10 s".into()));
            } else {
                still.push((bytes, reply, until));
            }
        }
        waiting = still;
    }
}
