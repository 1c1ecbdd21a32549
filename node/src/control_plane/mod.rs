//! The control plane: a libp2p swarm (QUIC) among admitted federation nodes.
//!
//! It tells every node what the federation can do right now and spreads bad news
//! fast. It runs as its own task ([`start`]) and talks to the daemon's core task
//! through bounded channels only: adverts and CRLs to publish go in
//! ([`ControlPlaneHandle`]), verified adverts, CRL updates and admission outcomes
//! come out ([`FromControl`]).
//!
//! - Identity: the node's one Ed25519 key, so its PeerId is the one
//!   [`certs::verify::PeerIdentity`] derives from its certificate.
//! - [`admission`]: a peer takes part only after its federation certificate chain
//!   verified and its key matched its PeerId; until then its gossip is rejected
//!   (gossipsub manual validation) and never propagated.
//! - [`gossip`]: signed capacity adverts and CRLs, verified before use.
//! - [`discovery`]: bootstrap peers plus Kademlia; the alternate-parent rule.
//!
//! libp2p's own TLS carries a self-signed certificate with the PeerId, not the
//! federation chain (see NOTES on libp2p-tls); the federation chain travels in the
//! admission exchange instead. This module must never decide where a case goes and
//! never hand the core anything unverified.

pub mod admission;
pub mod adversary;
pub mod discovery;
pub mod gossip;

use admission::{ADMIT_PROTOCOL, AdmissionError, AdmitRequest, AdmitResponse, CRLS_MAX};
use certs::verify::{PeerIdentity, TrustStore};
use ed25519_dalek::SigningKey;
use federation_proto::SignedEnvelope;
use gossip::{ADVERT_TOPIC, AdvertError, CRL_TOPIC, GOSSIP_MESSAGE_BYTES_MAX, GossipMessage, VerifiedAdvert};
use libp2p::futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, gossipsub, kad, request_response};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Commands queued for the control-plane task at most.
pub const COMMAND_QUEUE_MAX: usize = 256;
/// Events queued for the core at most (adverts beyond this are dropped; the next
/// periodic advert replaces them).
pub const EVENT_QUEUE_MAX: usize = 1024;
/// Peers this node keeps connections to at most (discovery stops dialling beyond).
pub const CONNECTED_PEERS_MAX: usize = 64;
/// Kademlia protocol name of the federation's DHT.
pub const KAD_PROTOCOL: &str = "/telemed/kad/1";
/// Gossip messages an admitted peer may forward that fail verification before it is
/// disconnected (an honest relay forwards only what it verified).
pub const REJECTED_GOSSIP_MAX: u32 = 32;
/// How often the control plane re-dials bootstrap peers and walks the DHT.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);

/// The `[control]` section of `node.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// libp2p listen address, e.g. `/ip4/0.0.0.0/tcp/7500`.
    pub listen: String,
    /// Peers to join through, each `/ip4/../tcp/../p2p/<PeerId>`.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Adverts are published this often, and whenever capacity changes.
    #[serde(default = "default_advert_interval_ms")]
    pub advert_interval_ms: u64,
    /// How long an advert stays valid (receivers drop it after).
    #[serde(default = "default_advert_ttl_ms")]
    pub advert_ttl_ms: u64,
    /// A connected peer must complete admission within this long.
    #[serde(default = "default_admission_timeout_ms")]
    pub admission_timeout_ms: u64,
    /// The data-plane address to advertise (default: the QUIC listen address if it
    /// is not a wildcard).
    #[serde(default)]
    pub data_addr: Option<SocketAddr>,
}

fn default_advert_interval_ms() -> u64 {
    30_000
}
fn default_advert_ttl_ms() -> u64 {
    120_000
}
fn default_admission_timeout_ms() -> u64 {
    10_000
}

impl ControlConfig {
    /// Checks what serde cannot: addresses parse, bootstrap peers name their PeerId,
    /// intervals are positive and an advert outlives the interval it is sent at.
    pub fn check(&self) -> Result<(), String> {
        self.listen.parse::<Multiaddr>().map_err(|e| format!("[control] listen `{}`: {e}", self.listen))?;
        for b in &self.bootstrap {
            let addr: Multiaddr = b.parse().map_err(|e| format!("[control] bootstrap `{b}`: {e}"))?;
            if split_p2p(&addr).is_none() {
                return Err(format!("[control] bootstrap `{b}` must end in /p2p/<PeerId>"));
            }
        }
        if self.advert_interval_ms == 0 || self.admission_timeout_ms == 0 {
            return Err("[control] advert_interval_ms and admission_timeout_ms must be > 0".into());
        }
        if self.advert_ttl_ms <= self.advert_interval_ms {
            return Err(format!(
                "[control] advert_ttl_ms ({}) must exceed advert_interval_ms ({}), or adverts lapse between sends",
                self.advert_ttl_ms, self.advert_interval_ms
            ));
        }
        Ok(())
    }

    /// A control plane on loopback with an ephemeral port (tests and the demo).
    pub fn loopback() -> ControlConfig {
        ControlConfig {
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            bootstrap: Vec::new(),
            advert_interval_ms: default_advert_interval_ms(),
            advert_ttl_ms: default_advert_ttl_ms(),
            admission_timeout_ms: default_admission_timeout_ms(),
            data_addr: None,
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Local misuse: a bad address or key.
    #[error("control plane configuration: {0}")]
    Config(String),
    #[error("control plane could not listen on {addr}: {detail}")]
    Listen { addr: String, detail: String },
}

/// What the control plane tells the core.
#[derive(Debug)]
#[non_exhaustive]
pub enum FromControl {
    /// A peer proved its federation identity.
    Admitted(Box<PeerIdentity>),
    /// A peer was refused and disconnected.
    Refused { peer_id: String, reason: String },
    /// A verified advert (from any admitted node, possibly relayed).
    Advert(Box<VerifiedAdvert>),
    /// A newer CRL was loaded into the shared trust store: re-check data-plane links.
    CrlLoaded { issuer: String },
    /// An admitted peer's certificate no longer verifies; it was cut off.
    Revoked(Box<PeerIdentity>),
}

/// A snapshot of the control plane, for status pages and tests.
#[derive(Debug, Clone, Default)]
pub struct ControlStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<Multiaddr>,
    /// Admitted peers: (node name, PeerId).
    pub admitted: Vec<(String, String)>,
    /// PeerIds with an open connection.
    pub connected: Vec<String>,
    /// Gossip messages rejected so far (not admitted, bad signature, bad chain...).
    pub gossip_rejected: u64,
    /// Adverts accepted so far.
    pub adverts_accepted: u64,
    /// CRLs in the trust store: (issuer, CRL number).
    pub crls: Vec<(String, String)>,
}

enum ToControl {
    PublishAdvert { envelope: SignedEnvelope, data_addr: Option<SocketAddr> },
    InjectCrl { pem: String, reply: oneshot::Sender<Result<String, String>> },
    Status(oneshot::Sender<ControlStatus>),
}

/// A cloneable handle to the running control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneHandle {
    tx: mpsc::Sender<ToControl>,
    /// This node's PeerId (base58).
    pub peer_id: String,
    /// Where it listens, each with `/p2p/<PeerId>` (what others bootstrap from).
    pub listen_addrs: Vec<Multiaddr>,
}

impl ControlPlaneHandle {
    /// Publishes this node's signed advert (dropped if the task is busy: the next
    /// periodic advert supersedes it).
    pub fn publish_advert(&self, envelope: SignedEnvelope, data_addr: Option<SocketAddr>) {
        if let Err(e) = self.tx.try_send(ToControl::PublishAdvert { envelope, data_addr }) {
            tracing::debug!("advert not queued for gossip: {e}");
        }
    }

    /// Loads a CRL (PEM, with its issuer's chain) into the trust store, cuts off the
    /// peers it revokes and gossips it. Returns the issuer.
    pub async fn inject_crl(&self, pem: String) -> Result<String, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ToControl::InjectCrl { pem, reply }).await.map_err(|_| "control plane stopped".to_owned())?;
        rx.await.map_err(|_| "control plane stopped".to_owned())?
    }

    pub async fn status(&self) -> Option<ControlStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(ToControl::Status(reply)).await.ok()?;
        rx.await.ok()
    }

    /// A bootstrap address for others: the first listen address.
    pub fn bootstrap_addr(&self) -> Option<String> {
        self.listen_addrs.first().map(|a| a.to_string())
    }
}

/// The swarm's behaviours.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    block: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    admit: request_response::cbor::Behaviour<AdmitRequest, AdmitResponse>,
    gossip: gossipsub::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

impl Behaviour {
    fn new(key: &libp2p::identity::Keypair) -> Result<Behaviour, String> {
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(GOSSIP_MESSAGE_BYTES_MAX)
            .heartbeat_interval(Duration::from_millis(500))
            .message_id_fn(|m: &gossipsub::Message| {
                use sha2::Digest;
                gossipsub::MessageId::new(&sha2::Sha256::digest(&m.data)[..20])
            })
            .build()
            .map_err(|e| format!("gossipsub: {e}"))?;
        let gossip = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)
            .map_err(|e| format!("gossipsub: {e}"))?;
        let admit = request_response::cbor::Behaviour::new(
            [(StreamProtocol::new(ADMIT_PROTOCOL), request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
        );
        let peer_id = key.public().to_peer_id();
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_query_timeout(Duration::from_secs(10));
        let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Loopback and private networks confirm no external address: serve anyway.
        kad.set_mode(Some(kad::Mode::Server));
        Ok(Behaviour { block: Default::default(), admit, gossip, kad })
    }
}

/// Builds a swarm over TCP + Noise + yamux with `key` as its identity (ADR 0009: not
/// libp2p's QUIC, which would link a second TLS crypto provider, aws-lc, into every node).
pub(crate) fn build_swarm(key: &SigningKey) -> Result<Swarm<Behaviour>, ControlError> {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes())
        .map_err(|e| ControlError::Config(format!("node key as libp2p identity: {e}")))?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| ControlError::Config(format!("libp2p transport: {e}")))?
        .with_behaviour(|key| Behaviour::new(key).map_err(Into::into))
        .map_err(|e| ControlError::Config(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}

/// Starts listening on `listen` and waits (bounded) for the bound addresses.
pub(crate) async fn listen(swarm: &mut Swarm<Behaviour>, listen: &str) -> Result<Vec<Multiaddr>, ControlError> {
    let addr: Multiaddr = listen.parse().map_err(|e| ControlError::Config(format!("listen `{listen}`: {e}")))?;
    swarm.listen_on(addr).map_err(|e| ControlError::Listen { addr: listen.into(), detail: e.to_string() })?;
    let me = *swarm.local_peer_id();
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => return Ok(address),
                SwarmEvent::ListenerError { error, .. } => return Err(error.to_string()),
                SwarmEvent::ListenerClosed { reason: Err(e), .. } => return Err(e.to_string()),
                _ => {}
            }
        }
    };
    let first = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .map_err(|_| ControlError::Listen { addr: listen.into(), detail: "no address within 5 s".into() })?
        .map_err(|detail| ControlError::Listen { addr: listen.into(), detail })?;
    Ok(vec![first.with_p2p(me).unwrap_or_else(|a| a)])
}

/// Splits `/…/p2p/<id>` into the PeerId and the address without it.
fn split_p2p(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut a = addr.clone();
    match a.pop() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some((peer, a)),
        _ => None,
    }
}

struct AdmittedPeer {
    identity: PeerIdentity,
    chain: Vec<CertificateDer<'static>>,
}

struct State {
    trust: Arc<TrustStore>,
    my_chain: Vec<serde_bytes::ByteBuf>,
    my_peer_id: PeerId,
    admission_timeout: Duration,
    bootstrap: Vec<(PeerId, Multiaddr)>,
    admitted: HashMap<PeerId, AdmittedPeer>,
    pending: HashMap<PeerId, Instant>,
    addresses: HashMap<PeerId, Multiaddr>,
    /// CRLs held (PEM) by issuer, shared with peers at admission and re-gossiped.
    crls: BTreeMap<String, String>,
    listen_addrs: Vec<Multiaddr>,
    to_core: mpsc::Sender<FromControl>,
    adverts_accepted: u64,
    gossip_rejected: u64,
    /// Rejected gossip per admitted peer since it was admitted.
    rejected_from: HashMap<PeerId, u32>,
    advert_topic: gossipsub::IdentTopic,
    crl_topic: gossipsub::IdentTopic,
}

/// Starts the control plane: binds, subscribes, dials the bootstrap peers, and runs
/// until the handle's last clone is dropped. `crl_pems` are the CRLs the node loaded
/// at start (shared with peers on admission).
pub async fn start(
    config: &ControlConfig,
    key: &SigningKey,
    chain: &[CertificateDer<'static>],
    trust: Arc<TrustStore>,
    crl_pems: Vec<String>,
) -> Result<(ControlPlaneHandle, mpsc::Receiver<FromControl>, tokio::task::JoinHandle<()>), ControlError> {
    let mut swarm = build_swarm(key)?;
    let listen_addrs = listen(&mut swarm, &config.listen).await?;
    let advert_topic = gossipsub::IdentTopic::new(ADVERT_TOPIC);
    let crl_topic = gossipsub::IdentTopic::new(CRL_TOPIC);
    for topic in [&advert_topic, &crl_topic] {
        swarm.behaviour_mut().gossip.subscribe(topic).map_err(|e| ControlError::Config(format!("subscribe: {e}")))?;
    }
    let mut bootstrap = Vec::new();
    for b in &config.bootstrap {
        let addr: Multiaddr = b.parse().map_err(|e| ControlError::Config(format!("bootstrap `{b}`: {e}")))?;
        let (peer, bare) =
            split_p2p(&addr).ok_or_else(|| ControlError::Config(format!("bootstrap `{b}` lacks /p2p/<PeerId>")))?;
        swarm.behaviour_mut().kad.add_address(&peer, bare.clone());
        bootstrap.push((peer, bare));
    }
    let mut crls = BTreeMap::new();
    for pem in crl_pems.into_iter().take(CRLS_MAX) {
        if let Ok(info) = trust.load_crl(&pem) {
            crls.insert(info.issuer, pem);
        }
    }
    let (to_core, events) = mpsc::channel(EVENT_QUEUE_MAX);
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
    let my_peer_id = *swarm.local_peer_id();
    let state = State {
        trust,
        my_chain: chain.iter().map(|c| serde_bytes::ByteBuf::from(c.to_vec())).collect(),
        my_peer_id,
        admission_timeout: Duration::from_millis(config.admission_timeout_ms),
        bootstrap,
        admitted: HashMap::new(),
        pending: HashMap::new(),
        addresses: HashMap::new(),
        crls,
        listen_addrs: listen_addrs.clone(),
        to_core,
        adverts_accepted: 0,
        gossip_rejected: 0,
        rejected_from: HashMap::new(),
        advert_topic,
        crl_topic,
    };
    tracing::info!(peer_id = %my_peer_id, addrs = ?listen_addrs, "control plane listening");
    let task = tokio::spawn(run(swarm, state, rx));
    let handle = ControlPlaneHandle { tx, peer_id: my_peer_id.to_base58(), listen_addrs };
    Ok((handle, events, task))
}

async fn run(mut swarm: Swarm<Behaviour>, mut st: State, mut rx: mpsc::Receiver<ToControl>) {
    st.dial_bootstrap(&mut swarm);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let started = Instant::now();
    let mut next_discovery = started + Duration::from_millis(750);
    loop {
        tokio::select! {
            event = swarm.select_next_some() => st.on_swarm_event(&mut swarm, event),
            command = rx.recv() => match command {
                None => break,
                Some(command) => st.on_command(&mut swarm, command),
            },
            _ = tick.tick() => {
                st.expire_pending(&mut swarm);
                if Instant::now() >= next_discovery {
                    st.dial_bootstrap(&mut swarm);
                    if swarm.behaviour_mut().kad.bootstrap().is_err() {
                        tracing::debug!("no known peers to walk the DHT from yet");
                    }
                    // Quickly at first, then at the steady interval.
                    let since = started.elapsed();
                    next_discovery = Instant::now() + if since < Duration::from_secs(5) { Duration::from_secs(1) } else { DISCOVERY_INTERVAL };
                }
            }
        }
    }
    tracing::info!("control plane stopped");
}

impl State {
    fn notify(&self, event: FromControl) {
        match self.to_core.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => match event {
                FromControl::Advert(_) => tracing::debug!("core busy: advert dropped (the next one supersedes it)"),
                other => {
                    // Never lose revocation or admission news; never block the swarm.
                    let tx = self.to_core.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(other).await;
                    });
                }
            },
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn dial_bootstrap(&self, swarm: &mut Swarm<Behaviour>) {
        for (peer, addr) in &self.bootstrap {
            if !swarm.is_connected(peer) && *peer != self.my_peer_id {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(*peer).addresses(vec![addr.clone()]).build();
                if let Err(e) = swarm.dial(opts) {
                    tracing::debug!(%peer, "bootstrap dial: {e}");
                }
            }
        }
    }

    fn on_command(&mut self, swarm: &mut Swarm<Behaviour>, command: ToControl) {
        match command {
            ToControl::PublishAdvert { envelope, data_addr } => {
                let message = GossipMessage::Advert { chain: self.my_chain.clone(), advert: envelope, data_addr };
                self.publish(swarm, true, &message);
            }
            ToControl::InjectCrl { pem, reply } => {
                let result = self.load_crl(swarm, &pem).map(|(issuer, _)| issuer);
                if result.is_ok() {
                    self.publish(swarm, false, &GossipMessage::Crl { pem });
                }
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            ToControl::Status(reply) => {
                let _ = reply.send(ControlStatus {
                    peer_id: self.my_peer_id.to_base58(),
                    listen_addrs: self.listen_addrs.clone(),
                    admitted: self.admitted.iter().map(|(p, a)| (a.identity.name.to_string(), p.to_base58())).collect(),
                    connected: swarm.connected_peers().map(|p| p.to_base58()).collect(),
                    gossip_rejected: self.gossip_rejected,
                    adverts_accepted: self.adverts_accepted,
                    crls: self
                        .trust
                        .crls()
                        .into_iter()
                        .map(|c| (c.issuer, c.crl_number.map(|n| n.to_string()).unwrap_or_default()))
                        .collect(),
                });
            }
        }
    }

    fn publish(&self, swarm: &mut Swarm<Behaviour>, advert: bool, message: &GossipMessage) {
        let topic = if advert { &self.advert_topic } else { &self.crl_topic };
        match message.encode() {
            Ok(bytes) => {
                if let Err(e) = swarm.behaviour_mut().gossip.publish(topic.clone(), bytes) {
                    tracing::debug!(topic = %topic, "gossip publish: {e}");
                }
            }
            Err(e) => tracing::warn!("gossip message not sent: {e}"),
        }
    }

    /// Loads a CRL; returns its issuer and whether it was news (a higher CRL number
    /// than held, or a first CRL from that issuer). Re-checks admitted peers.
    fn load_crl(&mut self, swarm: &mut Swarm<Behaviour>, pem: &str) -> Result<(String, bool), certs::VerifyError> {
        let before = self.trust.crls();
        let info = self.trust.load_crl(pem)?;
        let news = !before.iter().any(|c| c.issuer == info.issuer && c.crl_number == info.crl_number);
        if news {
            tracing::info!(issuer = %info.issuer, revoked = info.revoked.len(), "CRL loaded");
            if self.crls.len() < CRLS_MAX || self.crls.contains_key(&info.issuer) {
                self.crls.insert(info.issuer.clone(), pem.to_owned());
            }
            self.notify(FromControl::CrlLoaded { issuer: info.issuer.clone() });
            self.recheck_admitted(swarm);
        }
        Ok((info.issuer, news))
    }

    /// Re-verifies every admitted peer's chain; cuts off those that fail.
    fn recheck_admitted(&mut self, swarm: &mut Swarm<Behaviour>) {
        let failed: Vec<(PeerId, String)> = self
            .admitted
            .iter()
            .filter_map(|(p, a)| self.trust.identity_of_peer(&a.chain).err().map(|e| (*p, e.to_string())))
            .collect();
        for (peer, reason) in failed {
            if let Some(a) = self.admitted.get(&peer) {
                self.notify(FromControl::Revoked(Box::new(a.identity.clone())));
            }
            self.refuse(swarm, peer, AdmissionError::Certificate(reason));
        }
    }

    fn refuse(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, error: AdmissionError) {
        let name = self.admitted.remove(&peer).map(|a| a.identity.name.to_string());
        self.pending.remove(&peer);
        self.rejected_from.remove(&peer);
        tracing::warn!(peer = %peer, node = ?name, reason = %error, "control plane: peer refused; disconnecting");
        if error.is_revocation() {
            swarm.behaviour_mut().block.block_peer(peer);
            swarm.behaviour_mut().gossip.blacklist_peer(&peer);
        }
        swarm.behaviour_mut().kad.remove_peer(&peer);
        let _ = swarm.disconnect_peer_id(peer);
        self.notify(FromControl::Refused { peer_id: peer.to_base58(), reason: error.to_string() });
    }

    fn expire_pending(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        let late: Vec<PeerId> = self.pending.iter().filter(|(_, at)| **at <= now).map(|(p, _)| *p).collect();
        let ms = self.admission_timeout.as_millis() as u64;
        for peer in late {
            self.refuse(swarm, peer, AdmissionError::Timeout(ms));
        }
    }

    fn admission_request(&self) -> AdmitRequest {
        AdmitRequest { chain: self.my_chain.clone(), crls: self.crls.values().cloned().collect() }
    }

    fn on_swarm_event(&mut self, swarm: &mut Swarm<Behaviour>, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                if endpoint.is_dialer() {
                    self.addresses.insert(peer_id, endpoint.get_remote_address().clone());
                }
                if !self.admitted.contains_key(&peer_id) && !self.pending.contains_key(&peer_id) {
                    if swarm.connected_peers().count() > CONNECTED_PEERS_MAX {
                        let _ = swarm.disconnect_peer_id(peer_id);
                        return;
                    }
                    self.pending.insert(peer_id, Instant::now() + self.admission_timeout);
                    let request = self.admission_request();
                    swarm.behaviour_mut().admit.send_request(&peer_id, request);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.pending.remove(&peer_id);
                if let Some(a) = self.admitted.remove(&peer_id) {
                    tracing::debug!(peer = %peer_id, node = %a.identity.name, "control-plane peer disconnected");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Admit(event)) => self.on_admit(swarm, event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let verdict = self.validate(swarm, &propagation_source, &message);
                let rejected = verdict == gossipsub::MessageAcceptance::Reject;
                if verdict != gossipsub::MessageAcceptance::Accept {
                    self.gossip_rejected += 1;
                }
                swarm.behaviour_mut().gossip.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    verdict,
                );
                if rejected && self.admitted.contains_key(&propagation_source) {
                    let count = self.rejected_from.entry(propagation_source).or_default();
                    *count += 1;
                    if *count > REJECTED_GOSSIP_MAX {
                        let reason = format!("forwarded more than {REJECTED_GOSSIP_MAX} invalid gossip messages");
                        self.refuse(swarm, propagation_source, AdmissionError::Misbehaved(reason));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, is_new_peer: true, ..
            })) if !swarm.is_connected(&peer) && swarm.connected_peers().count() < CONNECTED_PEERS_MAX => {
                // Discovery: connect to newly found peers so gossip reaches them.
                let _ = swarm.dial(peer);
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with_p2p(self.my_peer_id).unwrap_or_else(|a| a);
                if !self.listen_addrs.contains(&full) {
                    self.listen_addrs.push(full);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, "control-plane dial failed: {error}");
            }
            _ => {}
        }
    }

    fn on_admit(&mut self, swarm: &mut Swarm<Behaviour>, event: request_response::Event<AdmitRequest, AdmitResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                // CRLs first (each verified against the root), so a revoked newcomer
                // that carries the CRL revoking itself is refused by it.
                for pem in request.crls.iter().take(CRLS_MAX) {
                    if let Err(e) = self.load_crl(swarm, pem)
                        && !matches!(e, certs::VerifyError::StaleCrl { .. })
                    {
                        tracing::warn!(%peer, "CRL offered at admission refused: {e}");
                    }
                }
                let verdict = admission::chain_of(&request).and_then(|chain| {
                    admission::admit(&self.trust, &chain, &peer.to_base58()).map(|identity| (identity, chain))
                });
                match verdict {
                    Ok((identity, chain)) => {
                        let response = AdmitResponse { admitted: true, reason: String::new() };
                        let _ = swarm.behaviour_mut().admit.send_response(channel, response);
                        self.pending.remove(&peer);
                        if !self.admitted.contains_key(&peer) {
                            tracing::info!(%peer, node = %identity.name, tier = %identity.tier, "control-plane peer admitted");
                            if let Some(addr) = self.addresses.get(&peer) {
                                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                            }
                            self.notify(FromControl::Admitted(Box::new(identity.clone())));
                        }
                        self.admitted.insert(peer, AdmittedPeer { identity, chain });
                    }
                    Err(error) => {
                        let response = AdmitResponse { admitted: false, reason: error.to_string() };
                        let _ = swarm.behaviour_mut().admit.send_response(channel, response);
                        self.refuse(swarm, peer, error);
                    }
                }
            }
            Event::Message { peer, message: Message::Response { response, .. }, .. } => {
                if !response.admitted {
                    tracing::warn!(%peer, reason = %response.reason, "this node was refused admission by a peer");
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                if self.pending.contains_key(&peer) {
                    if let request_response::OutboundFailure::UnsupportedProtocols = error {
                        self.refuse(swarm, peer, AdmissionError::Exchange("admission protocol not supported".into()));
                    } else {
                        tracing::debug!(%peer, "admission request failed: {error}");
                    }
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, "admission request from peer failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// Decides what to do with a gossip message: only admitted peers may forward
    /// anything, and only verified content is accepted (and so propagated).
    fn validate(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        from: &PeerId,
        message: &gossipsub::Message,
    ) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        if !self.admitted.contains_key(from) {
            tracing::warn!(peer = %from, "gossip from a peer that is not admitted rejected (not used, not propagated)");
            return Reject;
        }
        let decoded = match GossipMessage::decode(&message.data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(peer = %from, "gossip rejected: {e}");
                return Reject;
            }
        };
        match decoded {
            GossipMessage::Advert { chain, advert, data_addr } => {
                let Some(source) = message.source else {
                    tracing::warn!(peer = %from, "advert rejected: unsigned gossip (no source)");
                    return Reject;
                };
                let now = crate::view::now();
                match gossip::verify_advert(&self.trust, &source.to_base58(), &chain, &advert, data_addr, now) {
                    Ok(v) => {
                        self.adverts_accepted += 1;
                        tracing::debug!(origin = %v.origin.name, via = %from, "advert accepted");
                        self.notify(FromControl::Advert(Box::new(v)));
                        Accept
                    }
                    Err(AdvertError::Expired(origin)) => {
                        tracing::debug!(%origin, "stale advert ignored");
                        Ignore
                    }
                    Err(e) => {
                        tracing::warn!(peer = %from, origin = %source, "advert rejected: {e}");
                        Reject
                    }
                }
            }
            GossipMessage::Crl { pem } => match self.load_crl(swarm, &pem) {
                Ok((_, true)) => Accept,
                Ok((_, false)) => Ignore,
                Err(certs::VerifyError::StaleCrl { .. }) => Ignore,
                Err(e) => {
                    tracing::warn!(peer = %from, "CRL rejected: {e}");
                    Reject
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::admission::{AdmissionError, admit};
    use super::discovery::{Directory, choose_alternate};
    use super::gossip::VerifiedAdvert;
    use certs::ca::{CertificateAuthority, IntermediateOptions, RootOptions, Validity};
    use certs::keys::NodeCredentials;
    use certs::verify::{PeerIdentity, TrustStore};
    use federation_proto::{CapacityAdvert, Millis, SignedEnvelope, Tier, content_type};

    struct Pki {
        _dir: tempfile::TempDir,
        henan: CertificateAuthority,
        trust: TrustStore,
    }

    fn pki(region: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut root = CertificateAuthority::init_root(&dir.path().join("root"), &RootOptions::new(region)).unwrap();
        let henan = root
            .issue_intermediate(&dir.path().join("henan"), &IntermediateOptions::new("henan.cn", Tier::Provincial))
            .unwrap();
        let trust = TrustStore::from_root_pem(&root.root_pem()).unwrap();
        Pki { _dir: dir, henan, trust }
    }

    fn node(pki: &mut Pki, name: &str, tier: Tier) -> (NodeCredentials, ed25519_dalek::SigningKey) {
        let (key_pem, csr) = certs::enrol::generate_key_and_csr(&name.into(), tier).unwrap();
        let issued = pki.henan.sign_csr(&csr, tier, Validity::Days(30)).unwrap();
        (
            NodeCredentials::from_pem(&issued.chain_pem, &key_pem).unwrap(),
            certs::keys::signing_key_from_pem(&key_pem).unwrap(),
        )
    }

    fn libp2p_peer_id(key: &ed25519_dalek::SigningKey) -> String {
        libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes()).unwrap().public().to_peer_id().to_base58()
    }

    #[test]
    fn admission_needs_a_valid_chain_whose_key_is_the_connections_peer_id() {
        let mut p = pki("cn");
        let (county, county_key) = node(&mut p, "dengfeng.zhengzhou.henan.cn", Tier::County);
        let (_, other_key) = node(&mut p, "gongyi.zhengzhou.henan.cn", Tier::County);
        // One key, one identity: the swarm's PeerId is the certificate's.
        let id = admit(&p.trust, &county.chain, &libp2p_peer_id(&county_key)).unwrap();
        assert_eq!(id.name.as_str(), "dengfeng.zhengzhou.henan.cn");
        // A valid certificate presented over someone else's connection.
        let err = admit(&p.trust, &county.chain, &libp2p_peer_id(&other_key)).unwrap_err();
        assert!(matches!(err, AdmissionError::PeerIdMismatch { .. }), "{err}");
        // A chain from another federation's root.
        let mut foreign = pki("cn");
        let (stranger, stranger_key) = node(&mut foreign, "dengfeng.zhengzhou.henan.cn", Tier::County);
        let err = admit(&p.trust, &stranger.chain, &libp2p_peer_id(&stranger_key)).unwrap_err();
        assert!(matches!(err, AdmissionError::Certificate(_)), "{err}");
        assert!(!err.is_revocation());
    }

    fn entry(p: &mut Pki, name: &str, tier: Tier, now: Millis, ttl: u64) -> VerifiedAdvert {
        let (creds, key) = node(p, name, tier);
        let origin: PeerIdentity = p.trust.identity_of_peer(&creds.chain).unwrap();
        let advert = CapacityAdvert {
            node: name.into(),
            tier,
            issued_at: now,
            valid_until: now.saturating_add(ttl),
            capacity: vec![],
        };
        let envelope = SignedEnvelope::sign(&key, content_type::ADVERT, &advert).unwrap();
        VerifiedAdvert { origin, advert, envelope, data_addr: Some("127.0.0.1:7400".parse().unwrap()) }
    }

    #[test]
    fn alternate_is_the_lowest_higher_tier_whose_region_holds_this_node() {
        let mut p = pki("cn");
        let now = Millis(1_000_000);
        let (me_creds, _) = node(&mut p, "gaocheng.dengfeng.zhengzhou.henan.cn", Tier::Township);
        let me = p.trust.identity_of_peer(&me_creds.chain).unwrap();
        let mut dir = Directory::default();
        for (name, tier, ttl) in [
            ("dengfeng.zhengzhou.henan.cn", Tier::County, 60_000), // the dead parent
            ("gongyi.zhengzhou.henan.cn", Tier::County, 60_000),   // sibling county: region zhengzhou
            ("zhengzhou.henan.cn", Tier::City, 60_000),            // also holds me, but higher
            ("yichuan.luoyang.henan.cn", Tier::County, 60_000),    // another city's region
            ("xinmi.zhengzhou.henan.cn", Tier::County, 0),         // advert expired
            ("dajindian.dengfeng.zhengzhou.henan.cn", Tier::Township, 60_000), // same tier
        ] {
            dir.record(&entry(&mut p, name, tier, now, ttl));
        }
        let exclude = vec!["dengfeng.zhengzhou.henan.cn".into()];
        let chosen = choose_alternate(&me, &dir, &exclude, now).unwrap();
        assert_eq!(chosen.identity.name.as_str(), "gongyi.zhengzhou.henan.cn");
        dir.forget(&"gongyi.zhengzhou.henan.cn".into());
        let chosen = choose_alternate(&me, &dir, &exclude, now).unwrap();
        assert_eq!(chosen.identity.name.as_str(), "zhengzhou.henan.cn");
    }

    #[test]
    fn an_advert_is_believed_only_from_its_certified_author_with_its_certified_claims() {
        use super::gossip::{AdvertError, verify_advert};
        let mut p = pki("cn");
        let now = Millis(1_000_000);
        let (creds, key) = node(&mut p, "gongyi.zhengzhou.henan.cn", Tier::County);
        let (_, other_key) = node(&mut p, "xinmi.zhengzhou.henan.cn", Tier::County);
        let chain: Vec<serde_bytes::ByteBuf> =
            creds.chain.iter().map(|c| serde_bytes::ByteBuf::from(c.to_vec())).collect();
        let source = libp2p_peer_id(&key);
        let advert = |name: &str, tier| CapacityAdvert {
            node: name.into(),
            tier,
            issued_at: now,
            valid_until: now.saturating_add(1_000),
            capacity: vec![],
        };
        let sign = |k: &ed25519_dalek::SigningKey, a: &CapacityAdvert| {
            SignedEnvelope::sign(k, content_type::ADVERT, a).unwrap()
        };
        let good = sign(&key, &advert("gongyi.zhengzhou.henan.cn", Tier::County));
        assert!(verify_advert(&p.trust, &source, &chain, &good, None, now).is_ok());
        let check = |source: &str, env: &SignedEnvelope, at: Millis| {
            verify_advert(&p.trust, source, &chain, env, None, at).unwrap_err()
        };
        assert!(matches!(check(&libp2p_peer_id(&other_key), &good, now), AdvertError::SourceMismatch(..)));
        assert!(matches!(
            check(&source, &sign(&other_key, &advert("gongyi.zhengzhou.henan.cn", Tier::County)), now),
            AdvertError::WrongSigner(_)
        ));
        assert!(matches!(
            check(&source, &sign(&key, &advert("gongyi.zhengzhou.henan.cn", Tier::City)), now),
            AdvertError::ClaimMismatch { .. }
        ));
        assert!(matches!(
            check(&source, &sign(&key, &advert("xinmi.zhengzhou.henan.cn", Tier::County)), now),
            AdvertError::ClaimMismatch { .. }
        ));
        let mut bytes = good.as_bytes().to_vec();
        *bytes.last_mut().unwrap() ^= 1;
        assert!(matches!(check(&source, &SignedEnvelope::from_bytes(bytes), now), AdvertError::BadSignature(_)));
        assert!(matches!(check(&source, &good, now.saturating_add(1_000)), AdvertError::Expired(_)));
    }

    #[test]
    fn control_section_parses_and_bad_values_are_refused_with_their_name() {
        let base = r#"
name = "v1.gaocheng.dengfeng.zhengzhou.henan.cn"
tier = "village"
data_dir = "data"
listen = "127.0.0.1:7401"
[tls]
root = "root.pem"
chain = "node.pem"
key = "node.key"
[control]
listen = "/ip4/0.0.0.0/tcp/7500"
"#;
        let config: crate::config::Config = toml::from_str(base).unwrap();
        let control = config.control.clone().unwrap();
        assert_eq!((control.advert_interval_ms, control.advert_ttl_ms), (30_000, 120_000));
        config.check().unwrap();
        let with = |extra: &str| {
            let c: crate::config::Config = toml::from_str(&format!("{base}{extra}\n")).unwrap();
            c.check().unwrap_err().to_string()
        };
        assert!(with("bootstrap = [\"/ip4/127.0.0.1/tcp/7500\"]").contains("/p2p/<PeerId>"));
        assert!(with("advert_ttl_ms = 1000").contains("advert_ttl_ms"));
        let bad_listen: crate::config::Config =
            toml::from_str(&base.replace("/ip4/0.0.0.0/tcp/7500", "tcp:7500")).unwrap();
        assert!(bad_listen.check().unwrap_err().to_string().contains("[control] listen"));
    }
}
